"""The tiny study the end-to-end tests run with the real snakemake (seconds per job on one CPU core), and the
helpers that run it: a config file in a folder, the jobs' environment, the snakemake command line.

    python tests/tiny_study.py DIR    # run FINISHED_STUDY in DIR (what conftest starts once per test session)
"""

import copy
import os
import shutil
import sqlite3
import subprocess
import sys
import traceback
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def tiny_study(lrs=(0.05,), epochs=2, **train_options) -> dict:
    """A workflow config with one study `tiny`: small_cnn (width 8) on mnist5k, both methods, one seed."""
    return copy.deepcopy({
        "run": ["tiny"],
        "device": "cpu",
        "studies": {
            "tiny": {
                "dataset": "mnist5k",
                "archs": ["small_cnn"],
                "methods": ["pgd_at", "deat"],
                "lrs": list(lrs),
                "batch_sizes": [256],
                "seeds": [0],
                "train": {"epochs": epochs, "eps": 0.1, "pgd_steps": 2, "val_size": 200, "eval_examples": 100,
                          "width": 8, **train_options},
                "eval": {"n_examples": 40, "pgd_steps": 5, "pgd_restarts": 1, "autoattack_attacks": ["apgd-ce"]},
            }
        },
    })


# What conftest's `finished_tiny_study` runs once per test session, for every test that reads a finished study;
# each run's best checkpoint is also logged as an MLflow PyTorch model (off by default) for the MLflow UI check.
FINISHED_STUDY = {**tiny_study(eval_pgd_steps=3), "mlflow": {"log_model": True}}


def write_config(workdir: Path, config: dict) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))


# Where MLflow's sqlite store keeps absolute artifact paths (file: URIs): a copied store must point at its own copy.
ARTIFACT_COLUMNS = {"experiments": "artifact_location", "runs": "artifact_uri", "logged_models": "artifact_location"}


def copy_finished_study(source: Path, workdir: Path) -> Path:
    """A private copy of a finished study folder (file times and Snakemake's metadata kept) whose MLflow store
    writes into the copy: without the rewrite, a run or report in the copy would log its artifacts into `source`."""
    shutil.copytree(source, workdir, symlinks=True)
    store = workdir / "results/mlflow/mlflow.db"
    if store.is_file():
        with sqlite3.connect(store) as db:
            for table, column in ARTIFACT_COLUMNS.items():
                db.execute(f"UPDATE {table} SET {column} = replace({column}, ?, ?)", (str(source), str(workdir)))
        db.close()
    return workdir


def forget_run(workdir: Path, method: str) -> Path:
    """Delete the one run of `method` from a copied finished study: its folder, its train and evaluate logs and its
    MLflow run, so that the workflow has that run to train again. Returns the run's folder."""
    from mlflow.tracking import MlflowClient

    [run] = (workdir / "results/runs").glob(f"*/*/{method}/*/*")
    client = MlflowClient(f"sqlite:///{workdir}/results/mlflow/mlflow.db")
    client.delete_run((run / "mlflow_run_id").read_text().strip())
    shutil.rmtree(run)
    for rule in ("train", "evaluate"):
        shutil.rmtree(workdir / "results/logs" / rule / run.parent.relative_to(workdir / "results/runs"))
    return run


def job_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}


def snakemake_command(workdir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
            *args]


def snakemake(workdir: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(snakemake_command(workdir, *args), env=job_env(), capture_output=True, text=True,
                          timeout=timeout)


STUDY_RETURNCODE = "snakemake_returncode"  # written last by build_finished_study: the study is complete


def build_finished_study(workdir: Path) -> int:
    """Run FINISHED_STUDY to the end in `workdir`; its output goes to snakemake_output.txt, then its exit status
    to STUDY_RETURNCODE (written last, atomically: a reader that sees it sees the finished folder)."""
    try:
        write_config(workdir, FINISHED_STUDY)
        result = snakemake(workdir, "--cores", "2", timeout=900)
        output, returncode = result.stdout + result.stderr, result.returncode
    except subprocess.TimeoutExpired as err:
        output, returncode = f"snakemake timed out after {err.timeout} s", -1
    except Exception:  # noqa: BLE001 - the waiting tests must see why, not wait out their timeout
        output, returncode = traceback.format_exc(), -1
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "snakemake_output.txt").write_text(output)
    (workdir / f"{STUDY_RETURNCODE}.tmp").write_text(str(returncode))
    os.replace(workdir / f"{STUDY_RETURNCODE}.tmp", workdir / STUDY_RETURNCODE)
    return returncode


if __name__ == "__main__":
    sys.exit(0 if build_finished_study(Path(sys.argv[1])) == 0 else 1)
