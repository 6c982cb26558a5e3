"""MLflow tracking: the store and experiment, a parent run per study, a child run per run directory.

With mlflow_import.py (committed results into MLflow), the only module that imports mlflow. A run directory keeps
its MLflow run id in `mlflow_run_id`, so a job rerun after a crash continues the same MLflow run, not a duplicate. A directory shared by several
studies is one MLflow run, a child of the first study that trained (or imported) it; its tag `deat.studies` lists
every study it belongs to. A training process holds an OS lock on `train.lock` in its run directory and records its
host and pid as tags, so `reconcile_runs` can tell a RUNNING run whose process is gone (kill -9) from a live one.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import socket
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# MLflow's telemetry thread once raced and dropped a run's params (MEASURED.md): off before mlflow is imported.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from .checkpoint import atomic_write, write_json  # noqa: E402
from .config import NON_RESULT_KEYS, settings_hash, unused_options  # noqa: E402
from .runtime import RunLogger  # noqa: E402

RUN_ID_FILE = "mlflow_run_id"
# MLflow 3's UI reads this experiment tag to choose between its GenAI (traces) and model-training (runs) views.
EXPERIMENT_KIND_TAG, CLASSIC_ML = "mlflow.experimentKind", "custom_model_development"
# Single-value results of a finished run. MLflow's chart page orders its sections by metric prefix: these go
# under "summary/", after the evaluation's "eval/..." sections.
SUMMARY_PREFIX = "summary"
# Logged with every epoch in one log_batch (one transaction), so its steps are the epochs MLflow holds.
EPOCH_PREFIX = "epoch"
EPOCH_MARKER = f"{EPOCH_PREFIX}/epoch_time_s"
# Held (fcntl.flock, exclusive) by the process training the run directory, from before its MLflow run is set
# RUNNING until the process ends, however it ends: the kernel releases it even after kill -9.
LOCK_FILE = "train.lock"
HOST_TAG, PID_TAG, LOCK_TAG, STUDIES_TAG = "deat.host", "deat.pid", "deat.lock_file", "deat.studies"


def resolve_tracking_uri(tracking_uri: str) -> str:
    """`server` -> the address of the server this workflow run started (deat.server); any other URI as given."""
    if tracking_uri == "server":
        from .server import live_uri

        return live_uri()
    return tracking_uri


def _client(tracking_uri: str) -> MlflowClient:
    return MlflowClient(resolve_tracking_uri(tracking_uri))


@contextmanager
def setup_lock(tracking_uri: str):
    """An exclusive OS lock for creating MLflow things in one store (the store itself, the experiment, a study's parent
    run): whoever gets there first creates, the others find. Beside the sqlite file for an embedded store; for a
    server, in this machine's temp folder (the server itself serialises writes; the lock only avoids duplicate
    parent runs from jobs that start together on one machine). Released when the process exits, even after kill -9.
    """
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///"))
        db.parent.mkdir(parents=True, exist_ok=True)
        path = db.with_name(db.name + ".setup.lock")
    else:
        path = Path(tempfile.gettempdir()) / f"deat-mlflow-{hashlib.sha256(tracking_uri.encode()).hexdigest()[:12]}.lock"
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_name(config: dict[str, Any]) -> str:
    """A run directory's MLflow name from its resolved config (metrics.json's `config`), e.g.
    "deat small_cnn lr0.2236 bs128 seed0 · 1a2b3c4d": the grid axes, then the settings hash of its directory
    (deat.config.settings_hash), so runs of two studies that differ in other settings never share a name."""
    return (f"{config['method']} {config['arch']} lr{config['lr']} bs{config['batch_size']} seed{config['seed']} "
            f"· {settings_hash(config)}")


def ensure_tracking(tracking_file: str | Path, setup: list[str] | None = None) -> dict[str, str]:
    """The study's tracking file's contents; when the file is missing and `setup` ([tracking URI, experiment,
    study]) says how, the store, experiment and parent run are created (or found) instead.

    Training and evaluation jobs do not wait for the workflow's MLflow rules: a run finished long ago must never look
    out of date because a fresh clone or a new store lacks those rules' files. The first job that needs MLflow
    creates what is missing, under `setup_lock`, exactly as `mlflow-init` and `mlflow-study` would. The file itself
    is left to the `mlflow_study` rule that owns it: a job that wrote it first made Snakemake warn that the rule's
    output "was not present when the DAG was created", and delete it under the jobs still reading it.
    """
    path = Path(tracking_file)
    if path.is_file():
        return read_tracking_file(path)
    if not setup:
        raise FileNotFoundError(f"MLflow tracking file {path} does not exist (python -m deat mlflow-study writes it)")
    uri, experiment, study = setup
    with setup_lock(uri):
        experiment_id = init_experiment(uri, experiment)
        return {"tracking_uri": uri, "experiment_id": experiment_id,
                "parent_run_id": study_parent_run(uri, experiment_id, study, {})}


def init_experiment(tracking_uri: str, experiment: str, artifact_root: str | Path | None = None) -> str:
    """Create (once, before any fan-out) the store and the experiment; returns the experiment id.

    The experiment is tagged as a classic ML experiment (MLflow 3's `mlflow.experimentKind`), for the UI to open it
    on its runs table rather than the GenAI traces overview.

    Eight processes creating a new sqlite store at once corrupt it (MEASURED.md): callers hold `setup_lock`. An
    embedded sqlite store keeps its artifacts in `artifacts/` beside it unless `artifact_root` says otherwise.
    """
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///"))
        db.parent.mkdir(parents=True, exist_ok=True)
        artifact_root = artifact_root or db.parent / "artifacts"
    client = _client(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        if found.tags.get(EXPERIMENT_KIND_TAG) != CLASSIC_ML:
            client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, CLASSIC_ML)
        return found.experiment_id
    location = Path(artifact_root).resolve().as_uri() if artifact_root else None
    return client.create_experiment(experiment, artifact_location=location, tags={EXPERIMENT_KIND_TAG: CLASSIC_ML})


def study_parent_run(tracking_uri: str, experiment_id: str, study: str, params: dict[str, Any],
                     description: str = "") -> str:
    """The study's parent run: found by its tags when it exists (reruns reuse it), else created.

    Its params (the protocol) are written once; the description is the run's note, which MLflow lets change.
    """
    client = _client(tracking_uri)
    existing = client.search_runs([experiment_id], filter_string=f"tags.`deat.study` = '{study}' and "
                                                                  f"tags.`deat.role` = 'study'", max_results=1)
    if existing:
        run = existing[0]
        if description:
            client.set_tag(run.info.run_id, "mlflow.note.content", description)  # a reworded description shows
        # A parent a training job created first has no protocol yet; logged params themselves never change.
        client.log_batch(run.info.run_id, params=[Param(k, _param(v)) for k, v in sorted(params.items())
                                                  if k not in run.data.params])
        return run.info.run_id
    run = client.create_run(experiment_id, run_name=f"study:{study}",
                            tags={"deat.study": study, "deat.role": "study", "mlflow.note.content": description})
    client.log_batch(run.info.run_id, params=[Param(k, _param(v)) for k, v in sorted(params.items())])
    return run.info.run_id


def write_tracking_file(path: str | Path, tracking_uri: str, experiment_id: str, parent_run_id: str) -> None:
    write_json(path, {"tracking_uri": tracking_uri, "experiment_id": experiment_id,
                      "parent_run_id": parent_run_id})


def read_tracking_file(path: str | Path) -> dict[str, str]:
    data = json.loads(Path(path).read_text())
    missing = {"tracking_uri", "experiment_id", "parent_run_id"} - set(data)
    if missing:
        raise ValueError(f"{path}: missing key(s) {sorted(missing)}")
    return data


def _param(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def _recorded_run(client: MlflowClient, run_dir: str | Path):
    """The MLflow run named in the run directory's `mlflow_run_id`, or None (no file, or a run this store lacks)."""
    id_file = Path(run_dir) / RUN_ID_FILE
    if not id_file.is_file():
        return None
    try:
        return client.get_run(id_file.read_text().strip())
    except MlflowException:  # the store was replaced or the directory copied from elsewhere: start afresh
        return None


def run_params(params: dict[str, Any]) -> dict[str, str]:
    """A run's MLflow params: its identity (deat.config.run_identity) plus the derived values train adds."""
    skip = set(NON_RESULT_KEYS) | set(unused_options(params))
    return {k: _param(v) for k, v in sorted(params.items()) if k not in skip}


def epoch_metrics(record: dict[str, Any], now_ms: int) -> list[Metric]:
    """One epoch's values as MLflow metrics `epoch/<key>` with step = epoch. The prefix sorts the per-epoch curves
    first on a run's chart page (MLflow groups charts by prefix, alphabetically: epoch/, eval/, summary/)."""
    return [Metric(f"{EPOCH_PREFIX}/{k}", float(v), now_ms, record["epoch"]) for k, v in record.items()
            if k != "epoch" and v is not None]


def summary_metrics(metrics: dict[str, Any], now_ms: int) -> list[Metric]:
    """The best and last checkpoints' values (the weight average's too, where the run kept one), the wall time over
    every attempt and the peak memory, as single-value metrics `summary/...`."""
    summary = [Metric(f"{SUMMARY_PREFIX}/{which}/{k}", float(v), now_ms, 0)
               for which in ("best", "last", "best_ema", "last_ema")
               for k, v in (metrics.get(which) or {}).items() if v is not None]
    totals = {"wall_time_s": metrics.get("wall_time_s"), "peak_memory_mb": metrics.get("peak_memory_mb"),
              "collapses": float(len(metrics["collapses"])) if "collapses" in metrics else None}
    return summary + [Metric(f"{SUMMARY_PREFIX}/{k}", float(v), now_ms, 0) for k, v in totals.items() if v is not None]


def mlflow_run_logger(tracking_file: str | Path, run_dir: str | Path, name: str,
                      setup: list[str] | None = None, log_model: bool = False) -> RunLogger:
    """Hooks for deat.train.train: params at start, every epoch's metrics (step=epoch), artifacts at the end.

    The MLflow run is chosen at `start`, after train has checked that the directory belongs to this config:
    the run recorded in `mlflow_run_id` continues (a resumed job) unless its params differ, which train allows
    only when the earlier attempt finished no epoch (e.g. it diverged); that attempt keeps its own run and this
    one gets a new child run. `stop` marks the run FAILED or KILLED when the process ends early. Nothing touches
    MLflow before `start`: a run that is already complete needs no store (see ensure_tracking for `setup`).
    log_model: at the end, also log best.pt as an MLflow PyTorch model (`log_best_model`).
    """
    current: dict[str, Any] = {"run_id": None, "logged_epochs": set(), "client": None, "lock": None}

    def start(params: dict[str, Any]) -> None:
        # The lock first: from the moment this run shows RUNNING, reconcile_runs finds its process alive.
        current["lock"] = hold_run_lock(run_dir)
        tracking = ensure_tracking(tracking_file, setup)
        client = current["client"] = _client(tracking["tracking_uri"])
        wanted = run_params(params)
        run = _recorded_run(client, run_dir)
        if run is not None and any(run.data.params.get(k, v) != v for k, v in wanted.items()):
            if run.info.status == "RUNNING":
                client.set_terminated(run.info.run_id, "KILLED")
            client.set_tag(run.info.run_id, "deat.superseded", "true")
            run = None
        if run is None:
            run = client.create_run(tracking["experiment_id"], run_name=name,
                                    tags={"mlflow.parentRunId": tracking["parent_run_id"],
                                          "deat.role": "grid_point", "deat.run_dir": str(run_dir)})
            atomic_write(Path(run_dir) / RUN_ID_FILE, lambda f: f.write(run.info.run_id.encode()))
        run_id = current["run_id"] = run.info.run_id
        client.log_batch(run_id, tags=[RunTag(HOST_TAG, socket.gethostname()), RunTag(PID_TAG, str(os.getpid())),
                                       RunTag(LOCK_TAG, str(Path(run_dir, LOCK_FILE).resolve()))])
        client.update_run(run_id, status="RUNNING")
        client.update_run(tracking["parent_run_id"], status="RUNNING")  # the study has work in progress again
        client.log_batch(run_id, params=[Param(k, v) for k, v in wanted.items() if k not in run.data.params],
                         tags=[RunTag(f"deat.{k}", _param(params[k])) for k in NON_RESULT_KEYS if k in params])
        # Epochs already in MLflow: a resumed run replays its finished epochs, and each is logged once.
        current["logged_epochs"] = {m.step for m in client.get_metric_history(run_id, EPOCH_MARKER)}

    def epoch(record: dict[str, Any]) -> None:
        if record["epoch"] in current["logged_epochs"]:
            return
        now = int(time.time() * 1000)
        current["client"].log_batch(current["run_id"], metrics=epoch_metrics(record, now))
        current["logged_epochs"].add(record["epoch"])

    def end(metrics: dict[str, Any], out: Path) -> None:
        client, run_id = current["client"], current["run_id"]
        client.log_batch(run_id, metrics=summary_metrics(metrics, int(time.time() * 1000)))
        client.log_artifact(run_id, str(out / "metrics.json"))
        client.log_dict(run_id, metrics["config"], "config.json")
        curves = out / "learning_curves.png"
        plot_learning_curves(metrics, curves)
        client.log_artifact(run_id, str(curves))
        if log_model:
            log_best_model(client.tracking_uri, run_id, out / "best.pt")
        client.set_terminated(run_id, "FINISHED")

    def stop(status: str) -> None:
        if current["run_id"] is not None:
            current["client"].set_terminated(current["run_id"], status)

    return RunLogger(start=start, epoch=epoch, end=end, stop=stop)


BEST_MODEL_NAME = "best_model"


def log_best_model(tracking_uri: str, run_id: str, checkpoint: str | Path,
                   image_shape: tuple[int, int, int] | None = None) -> str:
    """Log a deat checkpoint's model as an MLflow PyTorch model named `best_model` on run `run_id`; returns its URI.

    The model is deat's `Normalized` network ((B, C, H, W) pixels in [0, 1] -> (B, classes) logits, BatchNorm in
    eval mode), saved in MLflow's default 'pt2' format: a `torch.export` graph with a dynamic batch dimension, which
    `mlflow.pytorch.load_model(uri)` loads without unpickling code (nor needing deat). image_shape (C, H, W) of the
    export example; None reads it from the checkpoint's dataset. Its size is about the state dict's (4 bytes per
    parameter and buffer; docs/benchmarks.md, "Model size").
    """
    import mlflow
    import mlflow.pytorch
    import numpy as np
    import torch
    from mlflow.models import infer_signature

    from .checkpoint import load_checkpoint
    from .models import build_model

    ckpt = load_checkpoint(checkpoint)
    spec = ckpt["model_spec"]
    model = build_model(spec["arch"], spec["num_classes"], in_channels=spec["in_channels"], mean=spec["mean"],
                        std=spec["std"], width=spec["width"])
    model.load_state_dict(ckpt["model"])
    model.eval().requires_grad_(False)
    if image_shape is None:
        from .data import load_dataset  # the training process has it cached

        config = ckpt["config"]
        image_shape = tuple(load_dataset(config["dataset"], config["data_root"], config["val_size"]).test_x.shape[1:])
    example = np.full((2, *image_shape), 0.5, dtype=np.float32)  # batch > 1: export keeps the batch dim dynamic
    with torch.no_grad():
        signature = infer_signature(example, model(torch.from_numpy(example)).numpy())
    mlflow.set_tracking_uri(tracking_uri)
    # start_run on an existing run resumes it; the caller sets its final status right after.
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(model, name=BEST_MODEL_NAME, input_example=example, signature=signature,
                                        serialization_format="pt2",
                                        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
                                        metadata={"deat_checkpoint": Path(checkpoint).name,
                                                  "epoch": ckpt.get("epoch"), "model_spec": spec})
    return info.model_uri


def hold_run_lock(run_dir: str | Path) -> int:
    """Take the exclusive OS lock of a run directory (`train.lock`) and keep it until the process ends; returns its
    file descriptor. Waits while another process holds it (two jobs never train one directory at once)."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    fd = os.open(Path(run_dir) / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.ftruncate(fd, 0)
    os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())
    return fd


def _lock_is_free(path: str) -> bool | None:
    """True when nobody holds the lock at `path` (taken and released at once), False when a process holds it,
    None when there is no such file."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    finally:
        os.close(fd)  # closing releases a lock we took
    return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def reconcile_runs(tracking_uri: str, experiment: str) -> dict[str, list[str]]:
    """Mark KILLED every RUNNING run of `experiment` whose training process is gone (kill -9, the OOM killer, a
    node failure); returns run descriptions by outcome: "killed", "alive", "elsewhere" (another host: cannot be
    checked from here), "unknown" (no host/pid tags: started before deat recorded them).

    A run's process is gone when its `train.lock` can be taken: the process held it from before the run was set
    RUNNING, and the kernel releases it however the process ends. Where the lock file is gone (the directory was
    moved), the recorded pid decides. A run of a live process is never touched, and the status is read again once
    the lock is taken, so a run that finished meanwhile stays FINISHED.
    """
    client = _client(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    outcome: dict[str, list[str]] = {"killed": [], "alive": [], "elsewhere": [], "unknown": []}
    if found is None:
        return outcome
    here = socket.gethostname()
    token = None
    while True:
        page = client.search_runs([found.experiment_id], "attributes.status = 'RUNNING'", max_results=1000,
                                  page_token=token)
        for run in page:
            tags = run.data.tags
            label = f"{run.info.run_name} ({tags.get('deat.run_dir', run.info.run_id)})"
            if tags.get("deat.role") == "study":
                continue  # a study's parent: set FINISHED by its report, FAILED by a failed workflow
            if PID_TAG not in tags or HOST_TAG not in tags:
                outcome["unknown"].append(label)
                continue
            if tags[HOST_TAG] != here:
                outcome["elsewhere"].append(f"{label} on host {tags[HOST_TAG]}")
                continue
            free = _lock_is_free(tags.get(LOCK_TAG, ""))
            gone = free if free is not None else not _pid_alive(int(tags[PID_TAG]))
            if not gone:
                outcome["alive"].append(f"{label}, pid {tags[PID_TAG]}")
                continue
            now = client.get_run(run.info.run_id)
            if now.info.status == "RUNNING" and now.data.tags.get(PID_TAG) == tags[PID_TAG]:
                client.set_terminated(run.info.run_id, "KILLED")
                outcome["killed"].append(f"{label}, pid {tags[PID_TAG]}")
        token = page.token
        if not token:
            return outcome


def describe_reconciled(outcome: dict[str, list[str]], everything: bool = True) -> list[str]:
    """What reconcile_runs did, a line per outcome. `everything=False` (a workflow's start): the runs marked KILLED,
    and only a count of those left unchecked, with the command that names them; nothing about live runs."""
    def named(runs: list[str]) -> str:
        return ": " + "; ".join(runs) if everything else " (python -m deat mlflow-reconcile names them)"

    lines = []
    if outcome["killed"]:
        lines.append(f"MLflow: {len(outcome['killed'])} RUNNING run(s) whose process is gone marked KILLED: "
                     + "; ".join(outcome["killed"]))
    if outcome["elsewhere"]:
        lines.append(f"MLflow: {len(outcome['elsewhere'])} RUNNING run(s) on another host left as they are (their "
                     "process cannot be checked from here)" + named(outcome["elsewhere"]))
    if outcome["unknown"]:
        lines.append(f"MLflow: {len(outcome['unknown'])} RUNNING run(s) record no host and pid (started before deat "
                     "recorded them) and are left as they are" + named(outcome["unknown"]))
    if everything and outcome["alive"]:
        lines.append(f"MLflow: {len(outcome['alive'])} run(s) still running, left as they are: "
                     + "; ".join(outcome["alive"]))
    if everything and not lines:
        lines.append("MLflow: no RUNNING run to reconcile")
    return lines


def store_exists(tracking_uri: str) -> bool:
    """False for an embedded sqlite store whose file is missing (opening it would create one); True otherwise."""
    if tracking_uri.startswith("sqlite:///"):
        return Path(tracking_uri.removeprefix("sqlite:///")).is_file()
    return True


def reconcile_at_start(tracking_uri: str, experiment: str) -> None:
    """The workflow's start (Snakemake's onstart, real runs only): reconcile the configured store, saying only what
    it changed or could not check; never stops the workflow (a store it cannot reach is a warning)."""
    if not store_exists(tracking_uri):
        return
    try:
        for line in describe_reconciled(reconcile_runs(tracking_uri, experiment), everything=False):
            print(line, file=sys.stderr)
    except Exception as err:  # noqa: BLE001  (MLflow's own errors are many kinds; the workflow goes on)
        print(f"warning: could not check MLflow for runs left RUNNING by a killed process: {err}", file=sys.stderr)


def log_metrics(tracking_file: str | Path, run_dir: str | Path, values: dict[str, float],
                setup: list[str] | None = None) -> None:
    """Final metrics (e.g. `eval/best/aa_acc`) on the run directory's MLflow run.

    A directory with no MLflow run in this store (committed results in a fresh clone, before `python -m deat
    mlflow-import`) is said so on stderr and skipped: the evaluation's own file is the record that matters.
    """
    tracking = ensure_tracking(tracking_file, setup)
    client = _client(tracking["tracking_uri"])
    run = _recorded_run(client, run_dir)
    if run is None:
        print(f"note: {run_dir} has no MLflow run in {tracking['tracking_uri']}; its metrics are not logged there "
              f"(python -m deat mlflow-import --results-dir results loads finished runs)", file=sys.stderr)
        return
    now = int(time.time() * 1000)
    client.log_batch(run.info.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in values.items()
                                               if v is not None])


def log_artifacts(tracking_file: str | Path, files: list[Path], run_id: str | None = None,
                  artifact_path: str | None = None) -> None:
    """Attach files to a run (default: the study's parent run)."""
    tracking = read_tracking_file(tracking_file)
    client = _client(tracking["tracking_uri"])
    for f in files:
        client.log_artifact(run_id or tracking["parent_run_id"], str(f), artifact_path)


def fail_study_runs(tracking_files: list[str | Path],
                    setup: tuple[str, str, list[str]] | None = None) -> list[str]:
    """After a failed workflow run: every study parent run still RUNNING becomes FAILED; returns their run ids.

    The report, which would have closed the study, never ran. A study whose tracking file was not written yet (its
    `mlflow_study` rule did not run) is found by its tags when `setup` gives (tracking URI, experiment, studies).
    A later run sets the parent RUNNING again when one of its jobs starts, and FINISHED when its report is written.
    """
    parents = []
    for path in tracking_files:
        if Path(path).is_file():
            tracking = read_tracking_file(path)
            parents.append((tracking["tracking_uri"], tracking["parent_run_id"]))
    if setup is not None and store_exists(setup[0]):
        uri, experiment, studies = setup
        client = _client(uri)
        found = client.get_experiment_by_name(experiment)
        for study in studies if found is not None else []:
            for run in client.search_runs([found.experiment_id], f"tags.`deat.study` = '{study}' and "
                                                                 f"tags.`deat.role` = 'study'", max_results=1):
                parents.append((uri, run.info.run_id))
    failed = []
    for uri, run_id in dict.fromkeys(parents):
        client = _client(uri)
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, "FAILED")
            failed.append(run_id)
    return failed


def finish_study_run(tracking_file: str | Path) -> None:
    """The report closes its study: the parent run shows FINISHED in the UI (a rerun may still add children)."""
    tracking = read_tracking_file(tracking_file)
    _client(tracking["tracking_uri"]).set_terminated(tracking["parent_run_id"], "FINISHED")


def plot_learning_curves(metrics: dict[str, Any], path: Path) -> None:
    """Per-epoch accuracies of one run (metrics.json's `epochs`) in percent against whole-numbered epochs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    epochs = [r["epoch"] for r in metrics["epochs"]]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for key, label in (("train_robust_acc", "train robust (running, training attack)"), ("val_pgd_acc", "val PGD"),
                       ("test_pgd_acc", "test PGD"), ("test_clean_acc", "test clean")):
        values = [r[key] for r in metrics["epochs"]]
        if all(v is not None for v in values):
            ax.plot(epochs, [100 * v for v in values], marker="o", markersize=3, label=label)
    cfg = metrics["config"]
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_formatter(PercentFormatter(100, decimals=0))
    ax.set(xlabel="epoch", ylabel="accuracy", title=f"{cfg['method']} {cfg['arch']} lr {cfg['lr']} bs "
                                                     f"{cfg['batch_size']} seed {cfg['seed']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


def _add_study(client: MlflowClient, run, study: str) -> bool:
    """List `study` in the run's `deat.studies` tag; False if it is there already."""
    studies = [s for s in run.data.tags.get(STUDIES_TAG, "").split(",") if s]
    if study in studies:
        return False
    client.set_tag(run.info.run_id, STUDIES_TAG, ",".join(studies + [study]))
    return True


def link_study_runs(tracking_file: str | Path, manifest: dict[str, Any]) -> int:
    """After a study's report: list the study in the `deat.studies` tag of each of its run directories' MLflow
    runs (a directory another study trained first is that study's child run); returns how many were added."""
    tracking = read_tracking_file(tracking_file)
    client = _client(tracking["tracking_uri"])
    linked = 0
    for entry in {e["dir"]: e for e in manifest["runs"]}.values():
        run = _recorded_run(client, entry["dir"])
        if run is not None:
            linked += _add_study(client, run, manifest["study"])
    return linked
