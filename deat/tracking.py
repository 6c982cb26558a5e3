"""MLflow tracking: the store and experiment, a parent run per study, a child run per grid point.

The only module that imports mlflow. A run directory keeps its MLflow run id in `mlflow_run_id`, so a job
rerun after a crash continues the same MLflow run instead of creating a duplicate.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

# MLflow's telemetry thread once raced and dropped a run's params (MEASURED.md): off before mlflow is imported.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from .checkpoint import atomic_write, write_json  # noqa: E402
from .config import NON_RESULT_KEYS  # noqa: E402
from .train import RunLogger  # noqa: E402

RUN_ID_FILE = "mlflow_run_id"
# MLflow 3's UI reads this experiment tag to choose between its GenAI (traces) and model-training (runs) views.
EXPERIMENT_KIND_TAG, CLASSIC_ML = "mlflow.experimentKind", "custom_model_development"
# Single-value results of a finished run. MLflow's chart page orders its sections by metric prefix: these go
# under "summary/", after the evaluation's "eval/..." sections.
SUMMARY_PREFIX = "summary"
# Logged with every epoch in one log_batch (one transaction), so its steps are the epochs MLflow holds.
EPOCH_MARKER = "epoch_time_s"


def resolve_tracking_uri(tracking_uri: str) -> str:
    """`server` -> the address of the server this workflow run started (deat.server); any other URI as given."""
    if tracking_uri == "server":
        from .server import live_uri

        return live_uri()
    return tracking_uri


def _client(tracking_uri: str) -> MlflowClient:
    return MlflowClient(resolve_tracking_uri(tracking_uri))


def init_experiment(tracking_uri: str, experiment: str, artifact_root: str | Path | None = None) -> str:
    """Create (once, before any fan-out) the store and the experiment; returns the experiment id.

    The experiment is tagged as a classic ML experiment (MLflow 3's `mlflow.experimentKind`), for the UI to open it
    on its runs table rather than the GenAI traces overview.

    Eight processes creating a new sqlite store at once corrupt it (MEASURED.md), hence a single rule for this.
    """
    if tracking_uri.startswith("sqlite:///"):
        Path(tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    client = _client(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        if found.tags.get(EXPERIMENT_KIND_TAG) != CLASSIC_ML:
            client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, CLASSIC_ML)
        return found.experiment_id
    location = Path(artifact_root).resolve().as_uri() if artifact_root else None
    return client.create_experiment(experiment, artifact_location=location, tags={EXPERIMENT_KIND_TAG: CLASSIC_ML})


def study_parent_run(tracking_uri: str, experiment_id: str, study: str, params: dict[str, Any]) -> str:
    """The study's parent run: found by its tags when it exists (reruns reuse it), else created."""
    client = _client(tracking_uri)
    existing = client.search_runs([experiment_id], filter_string=f"tags.`deat.study` = '{study}' and "
                                                                  f"tags.`deat.role` = 'study'", max_results=1)
    if existing:
        return existing[0].info.run_id
    run = client.create_run(experiment_id, run_name=f"study:{study}",
                            tags={"deat.study": study, "deat.role": "study"})
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


def child_run_id(tracking: dict[str, str], run_dir: str | Path, run_name: str) -> str:
    """The run directory's MLflow run: the one recorded in `mlflow_run_id`, else a new child of the study's run."""
    id_file = Path(run_dir) / RUN_ID_FILE
    client = _client(tracking["tracking_uri"])
    if id_file.is_file():
        run_id = id_file.read_text().strip()
        client.update_run(run_id, status="RUNNING")
        return run_id
    run = client.create_run(tracking["experiment_id"], run_name=run_name,
                            tags={"mlflow.parentRunId": tracking["parent_run_id"], "deat.role": "grid_point",
                                  "deat.run_dir": str(run_dir)})
    atomic_write(id_file, lambda f: f.write(run.info.run_id.encode()))
    return run.info.run_id


def mlflow_run_logger(tracking_file: str | Path, run_dir: str | Path, run_name: str) -> RunLogger:
    """Hooks for deat.train.train: params at start, every epoch's metrics (step=epoch), artifacts at the end."""
    tracking = read_tracking_file(tracking_file)
    client = _client(tracking["tracking_uri"])
    run_id = child_run_id(tracking, run_dir, run_name)
    # Epochs already in MLflow: a resumed run may replay its finished epochs, and each is logged once.
    logged_epochs = {m.step for m in client.get_metric_history(run_id, EPOCH_MARKER)}

    def start(params: dict[str, Any]) -> None:
        client.log_batch(run_id, params=[Param(k, _param(v)) for k, v in sorted(params.items())
                                         if k not in NON_RESULT_KEYS],
                         tags=[RunTag(f"deat.{k}", _param(params[k])) for k in NON_RESULT_KEYS if k in params])

    def epoch(record: dict[str, Any]) -> None:
        if record["epoch"] in logged_epochs:
            return
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, float(v), now, record["epoch"]) for k, v in record.items()
                                          if k != "epoch" and v is not None])
        logged_epochs.add(record["epoch"])

    def end(metrics: dict[str, Any], out: Path) -> None:
        now = int(time.time() * 1000)
        summary = [Metric(f"{SUMMARY_PREFIX}/{which}/{k}", float(v), now, 0) for which in ("best", "last")
                   for k, v in metrics[which].items() if v is not None]
        client.log_batch(run_id, metrics=summary + [Metric(f"{SUMMARY_PREFIX}/wall_time_s", metrics["wall_time_s"],
                                                           now, 0)])
        client.log_artifact(run_id, str(out / "metrics.json"))
        client.log_dict(run_id, metrics["config"], "config.json")
        curves = out / "learning_curves.png"
        plot_learning_curves(metrics, curves)
        client.log_artifact(run_id, str(curves))
        client.set_terminated(run_id, "FINISHED")

    return RunLogger(start=start, epoch=epoch, end=end)


def mark_failed(run_dir: str | Path, tracking_file: str | Path) -> None:
    id_file = Path(run_dir) / RUN_ID_FILE
    if id_file.is_file():
        _client(read_tracking_file(tracking_file)["tracking_uri"]).set_terminated(
            id_file.read_text().strip(), "FAILED")


def log_metrics(tracking_file: str | Path, run_dir: str | Path, values: dict[str, float]) -> None:
    """Final metrics (e.g. `eval/best/aa_acc`) on the run directory's existing MLflow run."""
    tracking = read_tracking_file(tracking_file)
    run_id = (Path(run_dir) / RUN_ID_FILE).read_text().strip()
    now = int(time.time() * 1000)
    _client(tracking["tracking_uri"]).log_batch(
        run_id, metrics=[Metric(k, float(v), now, 0) for k, v in values.items() if v is not None])


def log_artifacts(tracking_file: str | Path, files: list[Path], run_id: str | None = None,
                  artifact_path: str | None = None) -> None:
    """Attach files to a run (default: the study's parent run)."""
    tracking = read_tracking_file(tracking_file)
    client = _client(tracking["tracking_uri"])
    for f in files:
        client.log_artifact(run_id or tracking["parent_run_id"], str(f), artifact_path)


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
