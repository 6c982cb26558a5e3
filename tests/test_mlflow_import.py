"""`python -m deat mlflow-import` as a researcher browses it: each run at its own dates (not the import's), named
with its settings hash, and a directory shared by two studies as one run that lists both.

The results tree is written here (a manifest and a metrics.json per run, as the workflow writes them): no training.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("mlflow")

from mlflow.tracking import MlflowClient  # noqa: E402

from deat.config import TrainConfig, settings_hash  # noqa: E402
from deat.mlflow_import import import_results  # noqa: E402

FINISHED = 1_700_000_000  # 2023-11-14 22:13:20 UTC, when the fake runs "finished"


def write_run(results: Path, lr: float, wall_time_s: float = 300.0, epochs: int = 3) -> str:
    config = TrainConfig(dataset="mnist5k", method="deat", lr=lr, epochs=epochs).resolved().to_dict()
    run_dir = (f"results/runs/mnist5k/small_cnn/deat/{settings_hash(config)}/lr{lr:g}_bs128_seed0")
    path = results.parent / run_dir
    path.mkdir(parents=True)
    record = {"epoch_time_s": wall_time_s / epochs, "test_pgd_acc": 0.3, "train_loss": 1.0}
    metrics = {"config": config, "status": "complete", "epochs": [{"epoch": e, **record} for e in range(1, epochs + 1)],
               "best": {"epoch": epochs, "test_pgd_acc": 0.3}, "last": {"epoch": epochs, "test_pgd_acc": 0.3},
               "wall_time_s": wall_time_s, "model": {"arch": "small_cnn"}, "effective_step": lr}
    (path / "metrics.json").write_text(json.dumps(metrics))
    (path / "eval_0123abcd.json").write_text(json.dumps({"checkpoints": {"best": {"pgd_acc": 0.25}}}))
    return run_dir


def write_study(results: Path, name: str, run_dirs: list[str]) -> None:
    (results / "studies" / name).mkdir(parents=True)
    manifest = {"study": name, "description": "", "protocol": {"epochs": 3},
                "runs": [{"dir": d, "method": "deat"} for d in run_dirs]}
    (results / "studies" / name / "manifest.json").write_text(json.dumps(manifest))


def children(uri: str) -> list:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("deat")
    return client.search_runs([experiment.experiment_id], "tags.`deat.role` = 'grid_point'")


def test_imported_runs_keep_their_dates_and_names_show_the_settings_hash(tmp_path):
    """Issue 26: imported runs showed the import as start and end (0.06 s long), so they sorted before the
    user's own runs; two studies' different runs shared a name like "deat small_cnn lr0.2236 bs128 seed0"."""
    results = tmp_path / "results"
    run_dir = write_run(results, 0.2236)
    write_study(results, "study_a", [run_dir])
    metrics, evaluation = (tmp_path / run_dir / "metrics.json"), (tmp_path / run_dir / "eval_0123abcd.json")
    os.utime(metrics, (FINISHED, FINISHED))
    os.utime(evaluation, (FINISHED + 60, FINISHED + 60))  # evaluated a minute after training ended
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    import_results(results, uri, "deat")
    [child] = children(uri)
    assert child.info.start_time == (FINISHED - 300) * 1000  # training's end less its wall time
    assert child.info.end_time == (FINISHED + 60) * 1000  # the last evaluation
    assert child.data.tags["deat.times_from"] == "file time"  # no git checkout here
    assert child.info.run_name == f"deat small_cnn lr0.2236 bs128 seed0 · {run_dir.split('/')[-2]}"
    history = MlflowClient(uri).get_metric_history(child.info.run_id, "epoch/test_pgd_acc")
    assert [m.timestamp for m in sorted(history, key=lambda m: m.step)] == [
        (FINISHED - 300 + 100 * e) * 1000 for e in (1, 2, 3)]  # each epoch at its share of the training time


def test_a_clone_s_runs_are_dated_by_the_commit_that_holds_them_not_by_checkout(tmp_path):
    """In a fresh clone every file time is the checkout's: the last commit that touched a file dates it."""
    results = tmp_path / "results"
    run_dir = write_run(results, 0.1, wall_time_s=120.0)
    write_study(results, "study_a", [run_dir])
    env = {**os.environ, "GIT_AUTHOR_DATE": f"@{FINISHED} +0000", "GIT_COMMITTER_DATE": f"@{FINISHED} +0000",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.org"}
    for command in (["init", "-q"], ["add", "results"], ["commit", "-q", "-m", "results"]):
        subprocess.run(["git", *command], cwd=tmp_path, env=env, check=True)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    import_results(results, uri, "deat")
    [child] = children(uri)
    assert (child.info.start_time, child.info.end_time) == ((FINISHED - 120) * 1000, FINISHED * 1000)
    assert child.data.tags["deat.times_from"] == "git commit"


def test_recorded_start_and_end_times_win(tmp_path):
    from deat.mlflow_import import recorded_times

    metrics = {"started_at": 1000.5, "finished_at": 2000.0, "wall_time_s": 3.0}
    path = tmp_path / "metrics.json"
    path.write_text("{}")
    assert recorded_times(metrics, path, [], {}) == {"start": 1_000_500, "train_end": 2_000_000, "end": 2_000_000,
                                                     "source": "recorded"}


def test_a_directory_shared_by_two_studies_is_one_run_that_lists_both(tmp_path):
    """Issue 26: 161 child runs for 131 directories; a shared directory is now one run linked from each study."""
    results = tmp_path / "results"
    shared, own = write_run(results, 0.1), write_run(results, 0.2)
    write_study(results, "study_a", [shared])
    write_study(results, "study_b", [shared, own])
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert import_results(results, uri, "deat") == {"studies": 2, "runs": 2, "linked": 1}
    runs = {r.data.tags["deat.run_dir"]: r for r in children(uri)}
    assert set(runs) == {shared, own}
    assert runs[shared].data.tags["deat.studies"] == "study_a,study_b"
    assert runs[own].data.tags["deat.studies"] == "study_b"
    parents = {r.data.tags["deat.study"]: r.info.run_id for r in MlflowClient(uri).search_runs(
        [MlflowClient(uri).get_experiment_by_name("deat").experiment_id], "tags.`deat.role` = 'study'")}
    assert runs[shared].data.tags["mlflow.parentRunId"] == parents["study_a"]  # the first study in name order
    assert import_results(results, uri, "deat") == {"studies": 0, "runs": 0, "linked": 0}  # idempotent
