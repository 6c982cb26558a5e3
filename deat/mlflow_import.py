"""`python -m deat mlflow-import`: committed studies (manifests, metrics.json, eval_*.json) into MLflow, as the
workflow would have logged them, with each run's own start and end times.

MLflow's client comes from deat.tracking (with deat.tracking, the only modules that import mlflow).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from .checkpoint import atomic_write
from .tracking import (
    RUN_ID_FILE,
    STUDIES_TAG,
    _add_study,
    _client,
    epoch_metrics,
    init_experiment,
    run_name,
    run_params,
    setup_lock,
    study_parent_run,
    summary_metrics,
)


def import_results(results_dir: str | Path, tracking_uri: str, experiment: str) -> dict[str, int]:
    """Load committed studies (manifest.json, each run's metrics.json and eval_*.json) into MLflow.

    One parent run per study and one FINISHED run per run directory, as the workflow would have logged them:
    params, per-epoch metrics (step = epoch), best/last summaries, evaluation metrics, metrics.json as an artifact.
    A directory shared by several studies is one run, a child of the first study (in name order) that has it, with
    every study in its tag `deat.studies`. Start and end times are the run's own (see `recorded_times`), not the
    import's. Idempotent: a study or run already in the experiment (found by its tags) is not created again. A run
    directory with no MLflow run of its own gets this one in its `mlflow_run_id`. Returns counts: studies and runs
    created, and runs of another study linked to one more ("linked").
    """
    results_dir = Path(results_dir)
    client = _client(tracking_uri)
    with setup_lock(tracking_uri):
        experiment_id = init_experiment(tracking_uri, experiment)
    created = {"studies": 0, "runs": 0, "linked": 0}
    times = _file_times(results_dir)
    for manifest_path in sorted(results_dir.glob("studies/*/manifest.json")):
        manifest = json.loads(manifest_path.read_text())
        study = manifest["study"]
        found = client.search_runs([experiment_id], f"tags.`deat.study` = '{study}' and tags.`deat.role` = 'study'",
                                   max_results=1)
        if found:
            parent = found[0].info.run_id
        else:
            parent = study_parent_run(tracking_uri, experiment_id, study,
                                      {"n_runs": len(manifest["runs"]), **manifest["protocol"]},
                                      manifest.get("description", ""))
            client.set_tag(parent, "deat.imported_from", str(manifest_path))
            created["studies"] += 1
        for entry in {e["dir"]: e for e in manifest["runs"]}.values():  # a directory once per study
            outcome = _import_run(client, experiment_id, parent, study, results_dir.parent / entry["dir"], entry,
                                  times)
            if outcome:
                created[outcome] += 1
        client.set_terminated(parent, "FINISHED")
    return created


def _file_times(results_dir: Path) -> dict[Path, tuple[float, str]]:
    """Each file's time of writing, as well as it is known: the last commit that touched it (in a clone, file
    times are checkout times) unless the working tree changed it since; {} outside a git checkout."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=results_dir, capture_output=True, text=True, timeout=120,
                                  check=True).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    root = git("rev-parse", "--show-toplevel").strip()
    if not root:
        return {}
    changed = {(Path(root) / line[3:]).resolve() for line in git("status", "--porcelain", "--", ".").splitlines()}
    times: dict[Path, tuple[float, str]] = {}
    stamp = None
    for line in git("log", "--format=@%ct", "--name-only", "--", ".").splitlines():
        if line.startswith("@"):
            stamp = float(line[1:])
        elif line and stamp is not None:
            path = (Path(root) / line).resolve()
            if path not in changed:
                times.setdefault(path, (stamp, "git commit"))
    return times


def recorded_times(metrics: dict[str, Any], metrics_path: Path, eval_paths: list[Path],
                   times: dict[Path, tuple[float, str]]) -> dict[str, Any]:
    """When a run trained and was evaluated, in ms since the epoch, for its MLflow start and end times.

    Training ends at metrics.json's `finished_at` (Unix seconds) where it records one, else when metrics.json was
    written (its last commit in a clone, else its file time); it started `started_at`, else `wall_time_s` before
    that end. The run ends when its last evaluation file was written (the same rule), or when training ended.
    Returns start, train_end and end (ms) and `source`, which of the rules gave the end of training.
    """
    def written(path: Path) -> tuple[float, str]:
        return times.get(path.resolve()) or (path.stat().st_mtime, "file time")

    if metrics.get("finished_at") is not None:
        train_end, source = float(metrics["finished_at"]), "recorded"
    else:
        train_end, source = written(metrics_path)
    start = float(metrics["started_at"]) if metrics.get("started_at") is not None else (
        train_end - float(metrics.get("wall_time_s") or 0.0))
    end = max([train_end] + [float(json.loads(p.read_text()).get("finished_at") or written(p)[0]) for p in eval_paths])
    return {"start": int(start * 1000), "train_end": int(train_end * 1000), "end": int(end * 1000), "source": source}


def _import_run(client: MlflowClient, experiment_id: str, parent: str, study: str, run_dir: Path, entry: dict,
                times: dict[Path, tuple[float, str]]) -> str | None:
    """One committed run directory as a FINISHED child of `parent`: "runs" when created, "linked" when another
    study's run of the directory now lists this study too, None when there is nothing to do (or it is unfinished)."""
    metrics_path = run_dir / "metrics.json"
    rel_dir = entry["dir"]
    if not metrics_path.is_file():
        return None
    existing = client.search_runs([experiment_id], f"tags.`deat.run_dir` = '{rel_dir}' and "
                                                   f"tags.`deat.role` = 'grid_point'", max_results=1)
    if existing:
        return "linked" if _add_study(client, existing[0], study) else None
    metrics = json.loads(metrics_path.read_text())
    cfg = metrics["config"]
    eval_paths = [p for p in sorted(run_dir.glob("eval_*.json")) if not p.name.endswith(".partial.json")]
    when = recorded_times(metrics, metrics_path, eval_paths, times)
    run = client.create_run(experiment_id, run_name=run_name(cfg), start_time=when["start"],
                            tags={"mlflow.parentRunId": parent, "deat.role": "grid_point", "deat.run_dir": rel_dir,
                                  "deat.imported_from": str(metrics_path), STUDIES_TAG: study,
                                  "deat.times_from": when["source"]})
    run_id = run.info.run_id
    params = {**cfg, **{f"model_{k}": v for k, v in metrics.get("model", {}).items()},
              "effective_step": metrics.get("effective_step")}
    # Each epoch at its share of the training time, so MLflow's wall-time axis shows the run as it went.
    elapsed = [0.0]
    for record in metrics["epochs"]:
        elapsed.append(elapsed[-1] + float(record.get("epoch_time_s") or 1.0))
    span = when["train_end"] - when["start"]
    values = [m for record, t in zip(metrics["epochs"], elapsed[1:])
              for m in epoch_metrics(record, when["start"] + int(span * t / elapsed[-1]))]
    values += summary_metrics(metrics, when["train_end"])
    for eval_path in eval_paths:
        for name, c in json.loads(eval_path.read_text())["checkpoints"].items():
            values += [Metric(f"eval/{name}/{k}", float(c[k]), when["end"], 0)
                       for k in ("clean_acc", "pgd10_acc", "pgd_acc", "aa_acc") if c.get(k) is not None]
    # log_batch takes at most 1,000 metrics per call
    params_list = [Param(k, v) for k, v in run_params(params).items()]
    for i in range(0, max(len(values), 1), 1000):
        client.log_batch(run_id, metrics=values[i:i + 1000], params=params_list if i == 0 else [])
    client.log_artifact(run_id, str(metrics_path))
    client.set_terminated(run_id, "FINISHED", end_time=when["end"])
    if not (run_dir / RUN_ID_FILE).is_file():
        atomic_write(run_dir / RUN_ID_FILE, lambda f: f.write(run_id.encode()))
    return "runs"
