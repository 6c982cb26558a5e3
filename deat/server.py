"""A private MLflow tracking server for one workflow run (`mlflow: {tracking_uri: server}`).

The Snakefile's `onstart` hook calls `start_server()`: `mlflow server` bound to 127.0.0.1 on a free port, its
sqlite store under `results/mlflow/`; `onsuccess` / `onerror` call `stop_server()`. The live address goes into
`results/mlflow/server.json` and nowhere else: tracking files keep the word `server` and every job resolves it
with `live_uri()` when it starts, so a rerun on a new port finds the new server and no file outlives its port.

Stdlib only (the hooks run inside Snakemake; `deat.tracking` is the only module that imports mlflow).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

HOST = "127.0.0.1"  # never another interface: the store has no authentication
# Linux: the kernel sends the server SIGTERM when the process that started it dies, so a `kill -9` of Snakemake
# (which runs no onerror hook) does not leave its server behind.
PR_SET_PDEATHSIG = 1  # linux/prctl.h
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
# MEASURED.md: `mlflow server` answers /health after about 13 s on this 2-core machine; CI may be busier.
START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 30.0  # then SIGKILL: the store has nothing to flush (sqlite commits every request)
PORT_ATTEMPTS = 3


def state_file(results: str | Path = "results") -> Path:
    return Path(results) / "mlflow" / "server.json"


def free_port(host: str = HOST) -> int:
    """A port the kernel reports free now; `start_server` retries if another process takes it first."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    """Between fork and exec in the child: one system call, nothing that could wait on a lock."""
    _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def launch(subcommand: str, backend_store_uri: str, port: int, log_path: str | Path,
           artifact_root: str | Path | None = None) -> subprocess.Popen:
    """Start `mlflow <subcommand>` (server or ui) on HOST:port in its own process group, output to log_path."""
    command = [sys.executable, "-m", "mlflow", subcommand, "--backend-store-uri", backend_store_uri,
               "--host", HOST, "--port", str(port), "--workers", "1"]
    if artifact_root is not None:
        # Clients write artifacts straight to this folder (as with the embedded store), not through the server.
        command += ["--default-artifact-root", Path(artifact_root).resolve().as_uri(), "--no-serve-artifacts"]
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, preexec_fn=_die_with_parent if _LIBC else None,
                                # Tracking only: no telemetry thread, no GenAI job-runner process.
                                env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true",
                                     "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})


def wait_until_healthy(uri: str, process: subprocess.Popen, log_path: str | Path,
                       timeout_s: float = START_TIMEOUT_S) -> None:
    """Poll `<uri>/health` until it answers OK; fail early, with the log's tail, if the process exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow exited with code {process.returncode} before answering {uri}/health; "
                               f"last lines of {log_path}:\n{_tail(log_path)}")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.25)
    stop_process_group(process.pid)
    raise TimeoutError(f"mlflow did not answer {uri}/health within {timeout_s:.0f} s; last lines of "
                       f"{log_path}:\n{_tail(log_path)}")


def start_server(results: str | Path = "results") -> dict:
    """Start the run's server (stopping one a killed earlier run left behind) and record it; returns the record."""
    results = Path(results).resolve()
    stop_server(results)
    store = results / "mlflow" / "mlflow.db"
    store.parent.mkdir(parents=True, exist_ok=True)
    log_path = results / "logs" / "mlflow" / "server.log"
    for attempt in range(PORT_ATTEMPTS):
        port = free_port()
        uri = f"http://{HOST}:{port}"
        process = launch("server", f"sqlite:///{store}", port, log_path, artifact_root=results / "mlflow" / "artifacts")
        try:
            wait_until_healthy(uri, process, log_path)
            break
        except RuntimeError as err:
            # Another process may take the port in the seconds mlflow needs to bind it: try a new one.
            if "address already in use" not in str(err).lower() or attempt + 1 == PORT_ATTEMPTS:
                raise
    state = {"uri": uri, "pid": process.pid, "hostname": socket.gethostname(), "store": f"sqlite:///{store}",
             "log": str(log_path)}
    _write_json(state_file(results), state)
    print(f"MLflow server {uri} (pid {process.pid}, store {store}, log {log_path})", file=sys.stderr)
    return state


def stop_server(results: str | Path = "results") -> bool:
    """Stop the recorded server, if any, and remove its record; True when one was running."""
    path = state_file(results)
    if not path.is_file():
        return False
    state = json.loads(path.read_text())
    was_running = state["hostname"] == socket.gethostname() and stop_process_group(state["pid"])
    path.unlink(missing_ok=True)
    if was_running:
        print(f"MLflow server {state['uri']} stopped", file=sys.stderr)
    return was_running


def stop_process_group(pgid: int, timeout_s: float = STOP_TIMEOUT_S) -> bool:
    """SIGTERM the server's process group (mlflow and its uvicorn worker), SIGKILL what is left after timeout_s."""
    if not _is_mlflow_group(pgid):
        return False
    os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _reap(pgid)
        if not _group_alive(pgid):
            return True
        time.sleep(0.1)
    os.killpg(pgid, signal.SIGKILL)
    return True


def _reap(pid: int) -> None:
    """Collect the exit of a server this process started: until then it stays a zombie that signal 0 still finds."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:  # not our child: its own parent collects it
        pass


def live_uri(results: str | Path = "results") -> str:
    """The address of the server the running workflow started, for `tracking_uri: server`."""
    path = state_file(results)
    if not path.is_file():
        raise RuntimeError(f"mlflow tracking_uri is 'server' but no MLflow server is running ({path} is missing): "
                           f"`snakemake` starts one for each run; for a job run by hand use a sqlite:/// or "
                           f"http(s):// tracking URI")
    state = json.loads(path.read_text())
    if state["hostname"] != socket.gethostname():
        raise RuntimeError(f"the MLflow server in {path} listens on 127.0.0.1 of {state['hostname']}, not of this "
                           f"machine ({socket.gethostname()}): on a cluster set mlflow.tracking_uri to a server "
                           f"every node reaches (http(s)://host:port)")
    if not _group_alive(state["pid"]):
        raise RuntimeError(f"the MLflow server recorded in {path} (pid {state['pid']}) is not running any more; "
                           f"its log: {state['log']}")
    return state["uri"]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _is_mlflow_group(pgid: int) -> bool:
    """The group still runs and, where /proc shows it, its leader is mlflow (a recycled id is left alone)."""
    if not _group_alive(pgid):
        return False
    try:
        cmdline = Path(f"/proc/{pgid}/cmdline").read_bytes()
    except FileNotFoundError:  # the leader exited but its worker lives on, or no /proc (macOS)
        return True
    return not cmdline or b"mlflow" in cmdline  # empty: the leader is a zombie, its worker may live on


def _tail(path: str | Path, lines: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def _write_json(path: Path, data: dict) -> None:
    """Atomic, so a job never reads half a record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
