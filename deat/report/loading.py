"""A study's manifest and its runs' JSON files as pandas frames: one row per run, one row per (run, epoch).

Inputs are the study manifest the workflow writes (``{"study", "protocol", "paper_reference", "runs": [...]}``)
and each run's JSON files; nothing else (not MLflow, not checkpoints). A run's evaluation is the file its manifest
entry names under ``eval`` (the workflow's ``eval_<hash>.json``), else ``<dir>/eval.json``. A run may have
``metrics.json``, its evaluation, both or neither: its values are then NaN and ``metrics_problem`` /
``eval_problem`` say why. Accuracies stay fractions, as in every JSON file of the project.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pandas as pd

log = logging.getLogger(__name__)

CHECKPOINTS = ("best", "last")
# eval.json metric key -> file stem of its tables
EVAL_METRICS = {"pgd10_acc": "pgd10", "clean_acc": "clean", "aa_acc": "aa"}
RUN_KEYS = ("arch", "method", "lr", "batch_size", "seed", "dir")
# "variant" names a study's extra sweep axes ("k1=0.5, k2=0.8"); it is "" for studies without a sweep.
POINT_KEYS = ["arch", "method", "variant", "lr", "batch_size"]
# The baseline and the method the paper compares (Δ = DEAT − PGD-AT); other methods are shown, not paired.
BASELINE, TREATMENT = "pgd_at", "deat"
METHOD_LABELS = {"pgd_at": "PGD-AT", "deat": "DEAT", "trades": "TRADES", "mart": "MART", "awp": "AWP",
                 "trades_deat": "TRADES + DEAT", "mart_deat": "MART + DEAT", "awp_deat": "AWP + DEAT"}
# Without the attack (pgd_steps 0) PGD-AT's optimizer is plain SGD with momentum: that is what the runs are.
STANDARD_TRAINING_LABELS = {"pgd_at": "SGD-momentum"}
AUTOATTACK_STANDARD = ("apgd-ce", "apgd-t", "fab-t", "square")


def method_label(method: str, protocol: dict | None = None) -> str:
    """Display name of a method: "PGD-AT", "DEAT", ...; "SGD-momentum" for pgd_at in a study without the attack
    (protocol pgd_steps 0); an unknown method shows as its upper-cased name."""
    if (protocol or {}).get("pgd_steps") == 0 and method in STANDARD_TRAINING_LABELS:
        return STANDARD_TRAINING_LABELS[method]
    return METHOD_LABELS.get(method, method.replace("_", "-").upper())


def autoattack_label(settings: dict) -> str:
    """eval.json's ``settings.aa_label`` when it has one; else from ``settings.autoattack_attacks``: the full four
    attacks are "AutoAttack (standard)", a subset joins its upper-cased names ("APGD-CE + APGD-T")."""
    if settings.get("aa_label"):
        return settings["aa_label"]
    attacks = settings.get("autoattack_attacks")
    if not attacks or sorted(attacks) == sorted(AUTOATTACK_STANDARD):
        return "AutoAttack (standard)"
    return " + ".join(attack.upper() for attack in attacks)


def load_manifest(path: str | Path) -> dict:
    """Read and validate a study manifest; a bad manifest raises with the offending key named."""
    manifest = json.loads(Path(path).read_text())
    for key in ("study", "runs"):
        if key not in manifest:
            raise KeyError(f"manifest {path}: missing key {key!r} (needs 'study' and 'runs')")
    return manifest


def _validate_runs(runs: list[dict]) -> None:
    seen = set()
    for index, run in enumerate(runs):
        for key in RUN_KEYS:
            if key not in run:
                raise KeyError(f"manifest runs[{index}]: missing key {key!r} (each run needs {', '.join(RUN_KEYS)})")
        if not isinstance(run["method"], str) or not run["method"]:
            raise ValueError(f"manifest runs[{index}]: method {run['method']!r} is not a method name")
        identity = tuple(run[key] for key in RUN_KEYS[:-1]) + (variant_label(run.get("sweep")),)
        if identity in seen:
            raise ValueError(f"manifest runs[{index}]: duplicate run {identity}")
        seen.add(identity)


def render_value(value) -> str:
    """A protocol value as text: floats in %g, lists bracketed."""
    if isinstance(value, list):
        return "[" + ", ".join(render_value(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def variant_label(sweep: dict | None) -> str:
    """{"k1": 0.5, "k2": 0.8} -> "k1=0.5, k2=0.8"; no sweep -> ""."""
    return ", ".join(f"{key}={render_value(value)}" for key, value in (sweep or {}).items())


def _read_json(path: Path) -> tuple[dict | None, str]:
    """(content, "") or (None, why it is unusable)."""
    if not path.is_file():
        return None, f"no {path.name}"
    try:
        return json.loads(path.read_text()), ""
    except (OSError, json.JSONDecodeError) as error:
        log.warning("unreadable %s: %s", path, error)
        return None, f"unreadable {path.name}"


def _fraction(value) -> float:
    """A JSON accuracy (fraction or null) as a float, NaN for null/absent."""
    return float("nan") if value is None else float(value)


def formula_effective_step(method: str, lr: float, pgd_at_momentum: float | None, k1: float | None) -> float:
    """Step per unit gradient at steady state: SGD with momentum m moves lr/(1−m); DEAT (Algorithm 2) moves
    α' = lr/√((1+k1)²+k1²), since its two dampened buffers both tend to g and (1+k1)·g − k1·g = g. NaN for a
    method outside these two or without the setting."""
    if method == "pgd_at":
        return float("nan") if pgd_at_momentum is None else lr / (1.0 - pgd_at_momentum)
    if method == "deat":
        return float("nan") if k1 is None else lr / math.sqrt((1.0 + k1) ** 2 + k1**2)
    return float("nan")


def _run_record(run: dict, protocol: dict, runs_root: Path) -> tuple[dict, list[dict]]:
    """One row of the runs frame (raw fractions) and the run's per-epoch rows."""
    run_dir = runs_root / run["dir"]  # an absolute dir stays absolute
    # The workflow names each evaluation by a hash of its settings (run["eval"]); plain runs have dir/eval.json.
    eval_path = runs_root / run["eval"] if run.get("eval") else run_dir / "eval.json"
    record = {key: run[key] for key in RUN_KEYS}
    record["lr"], record["batch_size"], record["seed"] = float(run["lr"]), int(run["batch_size"]), int(run["seed"])
    record["label"] = method_label(run["method"], protocol)
    sweep = run.get("sweep", {})
    record["variant"] = variant_label(sweep)
    record.update({f"sweep_{key}": value for key, value in sweep.items()})

    metrics, record["metrics_problem"] = _read_json(run_dir / "metrics.json")
    if metrics is not None and metrics.get("status") != "complete":
        metrics, record["metrics_problem"] = None, f"training not complete (status={metrics.get('status')})"
    evaluation, record["eval_problem"] = _read_json(eval_path)
    metrics, evaluation = metrics or {}, evaluation or {}

    # metrics.json records the step the trainer used; the formula (deat.optim.effective_step's, restated so the
    # report never imports torch) covers runs without one, so that missing runs still show in the pairing.
    record["effective_step"] = metrics.get("effective_step") or formula_effective_step(
        run["method"], record["lr"], run.get("pgd_at_momentum", protocol.get("pgd_at_momentum")),
        sweep.get("k1", run.get("k1", protocol.get("k1"))))

    final_epoch = (metrics.get("epochs") or [{}])[-1]
    best, last = metrics.get("best") or {}, metrics.get("last") or {}
    settings = evaluation.get("settings", {})
    record.update({
        "metrics_best_epoch": _fraction(best.get("epoch")),
        "metrics_best_test_pgd_acc": _fraction(best.get("test_pgd_acc")),
        "metrics_last_test_pgd_acc": _fraction(last.get("test_pgd_acc")),
        "metrics_final_train_robust_acc": _fraction(final_epoch.get("train_robust_acc")),
        "metrics_final_test_pgd_acc": _fraction(final_epoch.get("test_pgd_acc")),
        "train_pgd_steps": metrics.get("config", {}).get("pgd_steps", protocol.get("pgd_steps")),
        "train_eval_pgd_steps": metrics.get("config", {}).get("eval_pgd_steps"),
        "device_name": metrics.get("environment", {}).get("device_name"),
        "torch": metrics.get("environment", {}).get("torch"),
        "eval_n_examples": evaluation.get("examples", {}).get("n"),
        "aa_label": autoattack_label(settings) if evaluation else None,
    })
    checkpoints = evaluation.get("checkpoints", {})
    for checkpoint in CHECKPOINTS:
        result = checkpoints.get(checkpoint, {})
        for key in EVAL_METRICS:
            record[f"eval_{checkpoint}_{key}"] = _fraction(result.get(key))
        # Issue 13's evaluation: gradient-masking signatures and attacks it did not run (absent in older files).
        record[f"eval_{checkpoint}_masking"] = "; ".join(result.get("masking_flags") or [])
        record[f"eval_{checkpoint}_skipped"] = "; ".join(f"{attack} ({why})" for attack, why in
                                                        (result.get("skipped_attacks") or {}).items())

    identity = {key: record[key] for key in ("arch", "method", "label", "variant", "lr", "batch_size", "seed")}
    epoch_rows = [{**identity, "epoch": entry["epoch"], "train_robust_acc": _fraction(entry.get("train_robust_acc")),
                   "test_pgd_acc": _fraction(entry.get("test_pgd_acc")),
                   "test_clean_acc": _fraction(entry.get("test_clean_acc"))}
                  for entry in metrics.get("epochs", [])]
    return record, epoch_rows


EPOCH_COLUMNS = ["arch", "method", "label", "variant", "lr", "batch_size", "seed", "epoch", "train_robust_acc",
                 "test_pgd_acc", "test_clean_acc"]


def load_runs(manifest: dict, runs_root: str | Path = ".") -> tuple[pd.DataFrame, pd.DataFrame]:
    """The study's runs (one row each, manifest order) and their per-epoch metrics (long format)."""
    _validate_runs(manifest["runs"])
    protocol = manifest.get("protocol", {})
    records, epoch_rows = [], []
    for run in manifest["runs"]:
        record, epochs = _run_record(run, protocol, Path(runs_root))
        records.append(record)
        epoch_rows.extend(epochs)
    runs = pd.DataFrame.from_records(records, columns=None if records else list(RUN_KEYS) + ["variant"])
    nothing_found = runs["metrics_problem"].str.startswith("no ") & runs["eval_problem"].str.startswith("no ")
    if len(runs) and nothing_found.all():
        log.warning("study %s: none of the %d runs has metrics.json or eval.json under %s "
                    "(run directories are relative to the repository root)", manifest["study"], len(runs), runs_root)
    return runs, pd.DataFrame.from_records(epoch_rows, columns=EPOCH_COLUMNS)


def methods_of(runs: pd.DataFrame) -> list[str]:
    """The study's methods: the known ones in METHOD_LABELS order, then others in manifest order."""
    present = list(dict.fromkeys(runs.method))
    return [m for m in METHOD_LABELS if m in present] + [m for m in present if m not in METHOD_LABELS]


def label_of(runs: pd.DataFrame, method: str) -> str:
    return runs.loc[runs.method == method, "label"].iloc[0]


def study_aa_label(runs: pd.DataFrame) -> str:
    """The AutoAttack label of the study's evaluations; several (a mixed study) are joined with " / "."""
    labels = list(dict.fromkeys(runs.aa_label.dropna())) if "aa_label" in runs else []
    return " / ".join(labels) if labels else "AutoAttack"
