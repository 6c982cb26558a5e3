"""MLflow tells the truth after kill -9: a RUNNING run whose training process is gone becomes KILLED, at the start
of a workflow run and with `python -m deat mlflow-reconcile`; a live run, or one on another host, is never touched.

The real CLI and a real SIGKILL: `python -m deat train` on the offline MNIST digits with a width-8 CNN, killed while
it trains.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest
from test_reliability import TRAIN, deat, job_env, make_tracking_file, snakemake, wait_until, write_config
from tiny_study import tiny_study

pytest.importorskip("mlflow")

from mlflow.tracking import MlflowClient  # noqa: E402

from deat import tracking  # noqa: E402


def runs_by_name(uri: str) -> dict:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("deat")
    return {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}


def stand_in_run(uri: str, name: str, tags: dict[str, str]) -> str:
    """A RUNNING grid-point run as a training job leaves it, with the given process tags."""
    client = MlflowClient(uri)
    experiment_id = client.get_experiment_by_name("deat").experiment_id
    run = client.create_run(experiment_id, run_name=name, tags={"deat.role": "grid_point", **tags})
    return run.info.run_id


def dead_pid() -> int:
    """The pid of a process that has ended (this test's own child, reaped)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


@pytest.mark.slow
def test_a_killed_training_run_is_marked_killed_and_live_or_foreign_runs_are_not(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracking_file = tmp_path / "mlflow.json"
    make_tracking_file(tracking_file, uri, uri)
    out = tmp_path / "run"
    # 40 epochs of about a second each: still training when it is killed.
    job = subprocess.Popen([sys.executable, "-m", "deat", "train", *TRAIN, "--method", "deat", "--lr", "0.05",
                            "--epochs", "40", "--out", str(out), "--mlflow", str(tracking_file)], cwd=tmp_path,
                           env=job_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        def running():
            runs = [r for r in runs_by_name(uri).values() if r.data.tags.get("deat.role") == "grid_point"]
            return runs and runs[0].info.status == "RUNNING" and runs[0].data.tags.get("deat.pid") == str(job.pid)

        wait_until(running, 300, "the training job's MLflow run shows RUNNING with its pid")
        [trained] = [r for r in runs_by_name(uri).values() if r.data.tags.get("deat.role") == "grid_point"]
        assert trained.data.tags["deat.host"] == socket.gethostname()
        assert trained.data.tags["deat.lock_file"] == str((out / "train.lock").resolve())
        elsewhere = stand_in_run(uri, "on another host", {"deat.host": "node-17.cluster", "deat.pid": "4242",
                                                          "deat.lock_file": str(tmp_path / "x.lock")})
        untagged = stand_in_run(uri, "from an older deat", {})

        alive = tracking.reconcile_runs(uri, "deat")  # the process is alive: its run must not be touched
        assert alive["killed"] == [] and len(alive["alive"]) == 1 and f"pid {job.pid}" in alive["alive"][0]
        assert runs_by_name(uri)[trained.info.run_name].info.status == "RUNNING"

        job.send_signal(signal.SIGKILL)
        job.wait(timeout=60)
        assert runs_by_name(uri)[trained.info.run_name].info.status == "RUNNING"  # kill -9 cannot be caught
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()

    result = deat("mlflow-reconcile", "--tracking-uri", uri, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0] == (f"MLflow: 1 RUNNING run(s) whose process is gone marked KILLED: {trained.info.run_name} "
                        f"({out}), pid {job.pid}")
    assert lines[1].startswith("MLflow: 1 RUNNING run(s) on another host left as they are (their process cannot be "
                               "checked from here): on another host") and "on host node-17.cluster" in lines[1]
    assert lines[2].startswith("MLflow: 1 RUNNING run(s) record no host and pid")
    client = MlflowClient(uri)
    killed = client.get_run(trained.info.run_id)
    assert killed.info.status == "KILLED" and killed.info.end_time is not None
    assert client.get_run(elsewhere).info.status == "RUNNING" and client.get_run(untagged).info.status == "RUNNING"
    again = deat("mlflow-reconcile", "--tracking-uri", uri, cwd=tmp_path)
    assert "marked KILLED" not in again.stdout  # nothing left to do



def test_a_run_whose_lock_is_held_is_alive_even_if_its_pid_is_gone(tmp_path):
    """The lock decides, not the pid (pids are reused): a held lock is a live process."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracking.init_experiment(uri, "deat", artifact_root=tmp_path / "artifacts")
    held_dir, free_dir = tmp_path / "held", tmp_path / "free"
    held_dir.mkdir()
    # Another process holds the lock as a training job does (deat.tracking.hold_run_lock: flock LOCK_EX).
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, time; fd = os.open("
                               f"{str(held_dir / 'train.lock')!r}, os.O_RDWR | os.O_CREAT); fcntl.flock(fd, "
                               "fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        free_dir.mkdir()
        (free_dir / "train.lock").write_text("")
        for name, folder in (("held", held_dir), ("free", free_dir)):
            stand_in_run(uri, name, {"deat.host": socket.gethostname(), "deat.pid": str(dead_pid()),
                                     "deat.lock_file": str(folder / "train.lock")})
        stand_in_run(uri, "moved", {"deat.host": socket.gethostname(), "deat.pid": str(os.getpid()),
                                    "deat.lock_file": str(tmp_path / "gone/train.lock")})
        outcome = tracking.reconcile_runs(uri, "deat")
    finally:
        holder.kill()
        holder.wait()
    runs = runs_by_name(uri)
    assert runs["held"].info.status == "RUNNING" and runs["free"].info.status == "KILLED"
    assert runs["moved"].info.status == "RUNNING"  # no lock file: its pid (this process) is alive
    assert [line.split(" (")[0] for line in outcome["killed"]] == ["free"]


def test_hold_run_lock_holds_the_lock_reconcile_tests(tmp_path):
    fd = tracking.hold_run_lock(tmp_path / "run")
    try:
        assert tracking._lock_is_free(str(tmp_path / "run/train.lock")) is False
        assert (tmp_path / "run/train.lock").read_text() == f"{socket.gethostname()} {os.getpid()}\n"
    finally:
        os.close(fd)
    assert tracking._lock_is_free(str(tmp_path / "run/train.lock")) is True
    assert tracking._lock_is_free(str(tmp_path / "none.lock")) is None


def test_reconcile_of_a_missing_store_is_one_line_and_creates_nothing(tmp_path, capsys):
    from deat.__main__ import main

    assert main(["mlflow-reconcile", "--tracking-uri", f"sqlite:///{tmp_path}/absent.db"]) == 2
    assert capsys.readouterr().err.splitlines() == [f"error: no MLflow store at {tmp_path}/absent.db (--tracking-uri "
                                                    "names another)"]
    assert not (tmp_path / "absent.db").exists()


@pytest.mark.slow
def test_a_workflow_run_reconciles_at_its_start_and_a_dry_run_does_not(tmp_path):
    """Snakemake's onstart (real runs only) marks KILLED what a kill -9 left RUNNING in the configured store."""
    write_config(tmp_path, tiny_study())
    uri = f"sqlite:///{tmp_path}/results/mlflow/mlflow.db"
    tracking.init_experiment(uri, "deat")
    lock = tmp_path / "old_run/train.lock"
    lock.parent.mkdir()
    lock.write_text("")
    killed = stand_in_run(uri, "killed earlier", {"deat.host": socket.gethostname(), "deat.pid": str(dead_pid()),
                                                  "deat.lock_file": str(lock), "deat.run_dir": "old_run"})
    target = "results/studies/tiny/manifest.json"  # a one-second job: what matters is the start of the run
    dry = snakemake(tmp_path, "--cores", "1", "-n", target, timeout=180)
    assert dry.returncode == 0 and MlflowClient(uri).get_run(killed).info.status == "RUNNING"
    real = snakemake(tmp_path, "--cores", "1", target, timeout=180)
    assert real.returncode == 0, real.stderr[-3000:]
    assert MlflowClient(uri).get_run(killed).info.status == "KILLED"
    assert "MLflow: 1 RUNNING run(s) whose process is gone marked KILLED: killed earlier (old_run)" in real.stderr
    assert json.loads((tmp_path / target).read_text())["study"] == "tiny"
