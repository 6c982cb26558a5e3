"""Runs check_mlflow_ui.py: the session's finished tiny study in MLflow's UI, seen through headless Chromium."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_study import copy_finished_study

SCRIPT = Path(__file__).resolve().parent / "check_mlflow_ui.py"


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser")),
                    reason="Debian's chromium is not installed (apt-get install chromium)")
def test_mlflow_ui_opens_the_readmes_url_on_the_runs_table_and_shows_the_study_and_a_chart(tmp_path,
                                                                                           finished_tiny_study):
    screenshot, runs_table = tmp_path / "mlflow_ui.png", tmp_path / "mlflow_ui_runs.png"
    workdir = tmp_path / "study"  # a private copy: the server reads the store, other tests may share the original
    copy_finished_study(finished_tiny_study, workdir)
    result = subprocess.run([sys.executable, str(SCRIPT), "--workdir", str(workdir), "--screenshot", str(screenshot),
                             "--readme-screenshot", str(runs_table)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "FAIL" not in result.stdout and screenshot.stat().st_size > 10_000
    # The page the README's URL opens is the runs table (checked in the DOM by the script), screenshotted.
    assert "ok   the README's URL opens the runs table" in result.stdout and runs_table.stat().st_size > 10_000
