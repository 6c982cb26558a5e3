"""The tiny study the end-to-end tests run with the real snakemake (seconds per job on one CPU core), and the
helpers that run it: a config file in a folder, the jobs' environment, the snakemake command line."""

import copy
import os
import subprocess
import sys
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


def job_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}


def snakemake_command(workdir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
            *args]


def snakemake(workdir: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(snakemake_command(workdir, *args), env=job_env(), capture_output=True, text=True,
                          timeout=timeout)
