"""What a user relies on when things go wrong: concurrent jobs, `kill -9` mid-epoch and mid-DAG, bad input, and
the workflow's private MLflow server (loopback only, started and stopped with the run).

Every job is the real CLI (`python -m deat ...`) or the real `snakemake` in a temporary directory, on the CPU, with
a tiny model (small_cnn of width 8) on the offline MNIST digits. docs/reliability.md lists each test's measured
result.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from deat import server
from deat.config import NON_RESULT_KEYS, unused_options
from tiny_study import (FINISHED_STUDY, copy_finished_study, forget_run, job_env, snakemake, snakemake_command,
                        write_config)

TRAIN = ["--dataset", "mnist5k", "--arch", "small_cnn", "--width", "8", "--batch-size", "256", "--eps", "0.1",
         "--pgd-steps", "2", "--val-size", "200", "--eval-examples", "100", "--eval-pgd-steps", "3",
         "--device", "cpu"]
TIMING_KEYS = ("images_per_s", "epoch_time_s", "epoch_wall_time_s", "peak_memory_mb")  # the only per-epoch values allowed to differ between two runs
STUDY = FINISHED_STUDY  # conftest's finished_tiny_study is the uninterrupted reference of the kill -9 tests
SERVER_STUDY = {**STUDY, "mlflow": {**STUDY["mlflow"], "tracking_uri": "server"}}


# ------------------------------------------------------------------------------------------------ helpers

def deat(*args: str, cwd: Path, timeout: int = 300, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, sys.executable, "-m", "deat", *args], cwd=cwd, env=job_env(),
                          capture_output=True, text=True, timeout=timeout)


def make_tracking_file(path: Path, uri_now: str, uri_for_jobs: str) -> str:
    """A study's tracking file as `mlflow-study` writes it; returns the parent run id."""
    from deat.tracking import init_experiment, study_parent_run, write_tracking_file

    experiment_id = init_experiment(uri_now, "deat", artifact_root=path.parent / "artifacts")
    parent = study_parent_run(uri_now, experiment_id, "reliability", {"purpose": "test"})
    write_tracking_file(path, uri_for_jobs, experiment_id, parent)
    return parent


def as_param(value) -> str:
    """How MLflow shows a param: lists as JSON, the rest as str."""
    return json.dumps(value) if isinstance(value, list) else str(value)


def child_runs(uri: str, parent: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("deat")
    return client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")


def assert_mlflow_holds_run(uri: str, run, metrics: dict) -> None:
    """Every param of the run's config and every epoch's every metric, each epoch exactly once."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    assert run.info.status == "FINISHED", run.info.run_name
    skip = set(NON_RESULT_KEYS) | set(unused_options(metrics["config"]))  # k1 is no param of a PGD-AT run
    expected = {k: as_param(v) for k, v in metrics["config"].items() if k not in skip}
    expected.update({f"model_{k}": as_param(v) for k, v in metrics["model"].items()})
    expected["effective_step"] = as_param(metrics["effective_step"])
    assert {k: run.data.params.get(k) for k in expected} == expected
    for key in metrics["epochs"][0]:
        if key == "epoch" or metrics["epochs"][0][key] is None:
            continue
        history = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, f"epoch/{key}")]
        assert sorted(history) == [(r["epoch"], pytest.approx(r[key])) for r in metrics["epochs"]], key


def without_timing(epochs: list[dict]) -> list[dict]:
    return [{k: v for k, v in record.items() if k not in TIMING_KEYS} for record in epochs]


def assert_same_weights(a: Path, b: Path) -> None:
    model_a = torch.load(a, weights_only=True)["model"]
    model_b = torch.load(b, weights_only=True)["model"]
    assert model_a.keys() == model_b.keys()
    for name in model_a:
        assert torch.equal(model_a[name], model_b[name]), name


def listening_addresses(port: int) -> set[str]:
    """Local addresses of the LISTEN sockets on `port`, from /proc/net/tcp{,6} (what `ss -ltn` shows)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, port_hex = local.split(":")
            if state == "0A" and int(port_hex, 16) == port:  # 0A = TCP_LISTEN
                raw = bytes.fromhex(address)
                # The kernel prints each 32-bit word in host (little-endian) order.
                words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                found.add(socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, words))
    return found


def mlflow_processes_under(folder: Path) -> list[int]:
    """Live processes whose command line names mlflow and `folder` (the store of that workflow's server)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"mlflow" in cmdline and str(folder).encode() in cmdline:
                pids.append(int(entry.name))
    return pids


def wait_until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.2)


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """The workflow's server (deat.server) in a folder of its own; jobs run there resolve `server` through it."""
    workdir = tmp_path_factory.mktemp("server")
    state = server.start_server(workdir / "results")
    yield workdir, state
    server.stop_server(workdir / "results")


# ------------------------------------------------------------------------------------------------ concurrency

@pytest.mark.slow
def test_twelve_concurrent_training_jobs_lose_no_param_and_no_epoch(tmp_path, mlflow_server):
    """Twelve training jobs at once: eight into one embedded sqlite store and four through the workflow's server
    (half PGD-AT, half DEAT in each): every run holds every param and every epoch exactly once."""
    server_dir, state = mlflow_server
    stores = {"sqlite": (tmp_path, f"sqlite:///{tmp_path}/mlflow.db", f"sqlite:///{tmp_path}/mlflow.db", 8),
              "server": (server_dir, state["uri"], "server", 4)}
    parents, jobs = {}, []
    for store, (workdir, uri_now, uri_for_jobs, count) in stores.items():
        tracking = workdir / f"tracking_{store}.json"
        parents[store] = make_tracking_file(tracking, uri_now, uri_for_jobs)
        for i in range(count):
            method, lr = ("pgd_at", "0.05") if i % 2 else ("deat", "0.1")
            args = [*TRAIN, "--method", method, "--lr", lr, "--seed", str(i), "--epochs", "2",
                    "--out", f"runs_{store}/job{i}", "--mlflow", str(tracking)]
            jobs.append(subprocess.Popen([sys.executable, "-m", "deat", "train", *args], cwd=workdir, env=job_env(),
                                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [job.communicate(timeout=600)[0] for job in jobs]
    for job, output in zip(jobs, outputs):
        assert job.returncode == 0 and "Traceback" not in output, output[-2000:]

    for store, (workdir, uri_now, _, count) in stores.items():
        runs = child_runs(uri_now, parents[store])
        assert sorted(r.data.tags["deat.run_dir"] for r in runs) == [f"runs_{store}/job{i}" for i in range(count)]
        for run in runs:
            metrics = json.loads((workdir / run.data.tags["deat.run_dir"] / "metrics.json").read_text())
            assert len(metrics["epochs"]) == 2
            assert_mlflow_holds_run(uri_now, run, metrics)


# ------------------------------------------------------------------------------------------------ kill -9

@pytest.mark.slow
def test_training_killed_mid_epoch_resumes_to_the_uninterrupted_result(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracking = tmp_path / "tracking.json"
    parent = make_tracking_file(tracking, uri, uri)
    flags = [*TRAIN, "--method", "deat", "--lr", "0.1", "--seed", "3", "--epochs", "3"]
    reference = subprocess.Popen([sys.executable, "-m", "deat", "train", *flags, "--out", "reference"],
                                 cwd=tmp_path, env=job_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    victim = subprocess.Popen([sys.executable, "-m", "deat", "train", *flags, "--out", "run", "--mlflow",
                               str(tracking)], cwd=tmp_path, env=job_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    for line in victim.stdout:  # "epoch 1/3 | ..." is printed after epoch 1's checkpoint and MLflow metrics
        if line.startswith("epoch 1/3"):
            victim.send_signal(signal.SIGKILL)
            break
    victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL
    checkpoint = torch.load(tmp_path / "run/running/checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == 1 and not (tmp_path / "run/metrics.json").exists()

    rerun = deat("train", *flags, "--out", "run", "--mlflow", str(tracking), cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "resuming" in rerun.stdout and "after epoch 1 of 3" in rerun.stdout
    assert reference.wait(timeout=300) == 0, reference.stderr.read()[-2000:]

    for name in ("last.pt", "best.pt"):
        assert_same_weights(tmp_path / "reference" / name, tmp_path / "run" / name)
    resumed = json.loads((tmp_path / "run/metrics.json").read_text())
    uninterrupted = json.loads((tmp_path / "reference/metrics.json").read_text())
    assert without_timing(resumed["epochs"]) == without_timing(uninterrupted["epochs"])
    assert (resumed["best"], resumed["last"]) == (uninterrupted["best"], uninterrupted["last"])
    runs = child_runs(uri, parent)
    assert len(runs) == 1  # the rerun continued the killed run's MLflow run
    assert_mlflow_holds_run(uri, runs[0], resumed)


@pytest.mark.slow
def test_snakemake_killed_mid_dag_resumes_to_the_uninterrupted_result(tmp_path, finished_tiny_study):
    """SIGKILL of Snakemake's whole process group (its jobs too) mid-DAG; then the same command again. Also the
    server's life cycle: the killed run's server goes with it, the rerun starts and stops its own. The DAG left to
    run is the session study's DEAT run (deleted from a copy): its training, its evaluation and the report."""
    workdir = copy_finished_study(finished_tiny_study, tmp_path / "study")
    deat_run = forget_run(workdir, "deat")
    [pgd_at_last] = (workdir / "results/runs").glob("*/*/pgd_at/*/*/last.pt")
    pgd_at_written = pgd_at_last.stat().st_mtime_ns
    write_config(workdir, SERVER_STUDY)
    killed = subprocess.Popen(snakemake_command(workdir, "--cores", "2"), env=job_env(), start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # The DEAT run's first metrics.json (running/ has one after every epoch): the kill lands just after an epoch,
    # where a resumed run must still log that epoch to MLflow.
    wait_until(lambda: any(deat_run.rglob("metrics.json")), 600, "a finished epoch")
    killed_server = json.loads(server.state_file(workdir / "results").read_text())
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait(timeout=60)
    assert not (deat_run / "metrics.json").exists()
    # No onerror hook runs after SIGKILL: the kernel's parent-death signal stops the server.
    port = int(killed_server["uri"].rsplit(":", 1)[1])
    wait_until(lambda: not mlflow_processes_under(workdir) and not listening_addresses(port), 60,
               f"the killed run's server (pid {killed_server['pid']}) to stop")

    unlock = snakemake(workdir, "--unlock")  # SIGKILL left Snakemake's directory lock behind
    assert unlock.returncode == 0, unlock.stderr[-2000:]
    rerun = snakemake(workdir, "--cores", "2", "--rerun-incomplete")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "MLflow server http://127.0.0.1:" in rerun.stderr and "stopped" in rerun.stderr
    assert not server.state_file(workdir / "results").exists() and not mlflow_processes_under(workdir)
    assert pgd_at_last.stat().st_mtime_ns == pgd_at_written  # the finished run was not trained again

    manifest = json.loads((workdir / "results/studies/tiny/manifest.json").read_text())
    assert len(manifest["runs"]) == 2
    for run in manifest["runs"]:
        resumed = json.loads((workdir / run["dir"] / "metrics.json").read_text())
        reference = json.loads((finished_tiny_study / run["dir"] / "metrics.json").read_text())
        assert without_timing(resumed["epochs"]) == without_timing(reference["epochs"]), run["dir"]
        assert_same_weights(workdir / run["dir"] / "last.pt", finished_tiny_study / run["dir"] / "last.pt")
        evaluated = json.loads((workdir / run["eval"]).read_text())["checkpoints"]
        expected = json.loads((finished_tiny_study / run["eval"]).read_text())["checkpoints"]
        for checkpoint in ("best", "last"):
            for key in ("clean_acc", "pgd10_acc", "pgd_acc", "aa_acc"):
                assert evaluated[checkpoint][key] == expected[checkpoint][key], (run["dir"], checkpoint, key)

    uri = f"sqlite:///{workdir}/results/mlflow/mlflow.db"  # the server is gone; read its store directly
    parent = json.loads((workdir / "results/studies/tiny/mlflow.json").read_text())["parent_run_id"]
    runs = child_runs(uri, parent)
    assert len(runs) == 2  # no duplicate MLflow run for a resumed job
    for run in runs:
        metrics = json.loads((workdir / run.data.tags["deat.run_dir"] / "metrics.json").read_text())
        assert_mlflow_holds_run(uri, run, metrics)

    again = snakemake(workdir, "--cores", "2")
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr
    assert "MLflow server" not in again.stderr  # nothing to do: no server started


# ------------------------------------------------------------------------------------------------ the server

@pytest.mark.slow
def test_server_listens_on_loopback_only(mlflow_server):
    _, state = mlflow_server
    port = int(state["uri"].rsplit(":", 1)[1])
    assert listening_addresses(port) == {"127.0.0.1"}
    with urllib.request.urlopen(f"{state['uri']}/health", timeout=10) as response:
        assert response.read() == b"OK"


NETNS_PROBE = """
import socket, subprocess, sys, urllib.request
from deat import server
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
subprocess.run(["ip", "address", "add", "10.254.0.1/32", "dev", "lo"], check=True)  # this namespace's own address
state = server.start_server(sys.argv[1])
port = int(state["uri"].rsplit(":", 1)[1])
try:
    with urllib.request.urlopen(state["uri"] + "/health", timeout=10) as response:
        print("loopback", response.read().decode())
    try:
        socket.create_connection(("10.254.0.1", port), timeout=5).close()
        print("other-address accepted")
    except ConnectionRefusedError:
        print("other-address refused")
finally:
    server.stop_server(sys.argv[1])
"""


@pytest.mark.slow
def test_server_refuses_connections_to_the_machines_other_address(tmp_path):
    """In a network namespace of its own (so no traffic leaves this test), the host has a second address."""
    if shutil.which("unshare") is None or shutil.which("ip") is None or subprocess.run(
            ["unshare", "-n", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs `unshare -n` (root or user namespaces) and iproute2's `ip`")
    probe = subprocess.run(["unshare", "-n", sys.executable, "-c", NETNS_PROBE, str(tmp_path / "results")],
                           env=job_env(), capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr[-2000:]
    assert probe.stdout.split("\n")[:2] == ["loopback OK", "other-address refused"]


@pytest.mark.slow
def test_failed_run_stops_its_server(tmp_path):
    (tmp_path / "broken.npz").write_bytes(b"not a zip archive")
    config = json.loads(json.dumps(SERVER_STUDY))
    config["studies"]["tiny"].update(dataset=f"npz:{tmp_path / 'broken.npz'}", methods=["deat"], lrs=[0.1])
    write_config(tmp_path, config)
    result = snakemake(tmp_path, "--cores", "2")
    assert result.returncode != 0
    assert "Error in rule prepare_dataset" in result.stdout + result.stderr
    assert "MLflow server http://127.0.0.1:" in result.stderr and "stopped" in result.stderr
    assert not server.state_file(tmp_path / "results").exists() and not mlflow_processes_under(tmp_path)


def test_dry_run_starts_no_server(tmp_path):
    write_config(tmp_path, SERVER_STUDY)
    result = snakemake(tmp_path, "--cores", "2", "-n", timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "MLflow server" not in result.stderr and not (tmp_path / "results").exists()


def test_server_uri_without_a_running_server_is_a_clear_error(tmp_path):
    tracking = tmp_path / "tracking.json"
    tracking.write_text(json.dumps({"tracking_uri": "server", "experiment_id": "1", "parent_run_id": "x"}))
    result = deat("train", *TRAIN, "--epochs", "1", "--out", "run", "--mlflow", str(tracking), cwd=tmp_path)
    assert result.returncode == 2
    assert "no MLflow server is running (results/mlflow/server.json is missing)" in result.stderr


# ------------------------------------------------------------------------------------------------ bad input

def test_malformed_yaml_config_is_a_clear_error(tmp_path):
    (tmp_path / "config.yaml").write_text("run: [tiny\nstudies: {tiny: {dataset: mnist5k}\n")
    result = snakemake(tmp_path, "--cores", "1", timeout=120)
    assert result.returncode != 0
    assert "Config file is not valid JSON or YAML" in result.stderr  # Snakemake's words; it names no line
    assert not (tmp_path / "results").exists()


def test_malformed_yaml_run_file_is_a_clear_error(tmp_path):
    (tmp_path / "run.yaml").write_text("lr: [0.1\nepochs: 3\n")
    result = deat("train", "--config", "run.yaml", "--out", "run", cwd=tmp_path)
    assert result.returncode == 2 and "run.yaml" in result.stderr and "Traceback" not in result.stderr
    assert files_under(tmp_path) == {"run.yaml"}


class ShellOnLoad:
    """A pickle that runs a shell command when unpickled: what torch.load(weights_only=False) would execute."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _resumable_run(tmp_path: Path) -> Path:
    """A run directory whose running/checkpoint.pt is to be replaced by a bad file."""
    run = tmp_path / "run"
    (run / "running").mkdir(parents=True)
    return run


def test_truncated_checkpoint_is_refused_and_nothing_is_written(tmp_path):
    from deat.checkpoint import save_checkpoint

    run = _resumable_run(tmp_path)
    checkpoint = run / "running/checkpoint.pt"
    save_checkpoint(checkpoint, {"config": {}, "epoch": 1, "model": {"w": torch.ones(1000)}})
    checkpoint.write_bytes(checkpoint.read_bytes()[:3000])
    before = files_under(tmp_path), checkpoint.read_bytes()
    result = deat("train", *TRAIN, "--epochs", "2", "--out", "run", cwd=tmp_path)
    assert result.returncode == 2
    assert f"checkpoint {Path('run/running/checkpoint.pt')} cannot be loaded safely" in result.stderr
    assert (files_under(tmp_path), checkpoint.read_bytes()) == before


def test_checkpoint_with_a_pickled_object_is_refused_unexecuted(tmp_path):
    run = _resumable_run(tmp_path)
    marker = tmp_path / "pwned"
    torch.save({"format": "deat-checkpoint", "version": 1, "payload": ShellOnLoad(marker)},
               run / "running/checkpoint.pt")
    result = deat("train", *TRAIN, "--epochs", "2", "--out", "run", cwd=tmp_path)
    assert result.returncode == 2
    assert "weights_only=True refuses" in result.stderr
    assert not marker.exists()
    assert files_under(tmp_path) == {"run", "run/running", "run/running/checkpoint.pt"}


def test_evaluating_a_truncated_checkpoint_is_refused_and_writes_nothing(tmp_path):
    from deat.checkpoint import save_checkpoint

    run = tmp_path / "run"
    for name in ("best.pt", "last.pt"):
        save_checkpoint(run / name, {"config": {}, "epoch": 1, "model": {"w": torch.ones(1000)}})
        (run / name).write_bytes((run / name).read_bytes()[:3000])
    before = files_under(tmp_path)
    result = deat("evaluate", "--run-dir", "run", "--device", "cpu", cwd=tmp_path)
    assert result.returncode == 2 and "cannot be loaded safely" in result.stderr
    assert files_under(tmp_path) == before


def _private_mount(kind: str, folder: Path) -> tuple[str, ...]:
    """A command prefix running the job in a mount namespace of its own where `folder` is read-only or a nearly
    full tmpfs, then listing the files the job left there; the mount vanishes with the job. (Root ignores file
    permissions, so chmod cannot stand in.)"""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode:
        pytest.skip("needs `unshare -m` (root or user namespaces) to mount a read-only or full folder")
    folder.mkdir()
    mount = (f"mount --bind {folder} {folder} && mount -o remount,bind,ro {folder}" if kind == "read-only" else
             f"mount -t tmpfs -o size=64k tmpfs {folder} && head -c 60k /dev/zero > {folder}/filler")
    listing = f'echo "{FILES_LEFT}"; find {folder} -type f ! -name filler'
    return ("unshare", "-m", "sh", "-c", f'{mount} && {{ "$@"; status=$?; {listing}; exit $status; }}', "sh")


FILES_LEFT = "files left:"


def files_left(result: subprocess.CompletedProcess) -> list[str]:
    return result.stdout.split(FILES_LEFT, 1)[1].split()


@pytest.mark.parametrize("kind, message", [("read-only", "Read-only file system: 'results/run"),
                                           ("full", "No space left on device")])
def test_unwritable_results_folder_is_a_clear_error_and_leaves_no_partial_file(tmp_path, kind, message):
    prefix = _private_mount(kind, tmp_path / "results")
    result = deat("train", *TRAIN, "--epochs", "1", "--out", "results/run", cwd=tmp_path, prefix=prefix)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and "Traceback" not in result.stderr
    assert files_left(result) == []  # a checkpoint's temporary file is removed: no half checkpoint remains
