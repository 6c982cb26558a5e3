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

from ..config import AWP_OBJECTIVES, METHODS, OBJECTIVES, objective_of, outer_step_of
from ..effective import effective_decay, effective_step

log = logging.getLogger(__name__)

CHECKPOINTS = ("best", "last")
# eval.json metric key -> file stem of its tables
EVAL_METRICS = {"pgd10_acc": "pgd10", "clean_acc": "clean", "aa_acc": "aa"}
RUN_KEYS = ("arch", "method", "lr", "batch_size", "seed", "dir")
# "variant" names a study's extra sweep axes ("k1=0.5, k2=0.8"); it is "" for studies without a sweep.
POINT_KEYS = ["arch", "method", "variant", "lr", "batch_size"]
# The baseline and the method the paper compares (Δ = DEAT − PGD-AT). Every other objective is paired the same
# way: "<objective>" (SGD-momentum) against "<objective>_deat" (DEAT's outer step), see objective_pairs.
BASELINE, TREATMENT = "pgd_at", "deat"
METHOD_LABELS = {"pgd_at": "PGD-AT", "deat": "DEAT", "trades": "TRADES", "trades_deat": "TRADES + DEAT",
                 "mart": "MART", "mart_deat": "MART + DEAT", "fast_at": "fast AT", "fast_at_deat": "fast AT + DEAT"}
OBJECTIVE_LABELS = {"pgd_at": "PGD-AT", "trades": "TRADES", "mart": "MART", "fast_at": "fast AT"}
OUTER_STEP_LABELS = {"sgd": "SGD-momentum", "deat": "DEAT"}
# Without the attack (pgd_steps 0) PGD-AT's optimizer is plain SGD with momentum: that is what the runs are.
STANDARD_TRAINING_LABELS = {"pgd_at": "SGD-momentum"}
AUTOATTACK_STANDARD = ("apgd-ce", "apgd-t", "fab-t", "square")
# What makes two evaluations like-for-like (issue 23): the robust-accuracy rule and the attack settings. An
# eval.json without settings.robust_rule predates the any-iterate rule (issue 13): it counted an example as broken
# only at the last iterate. Which random starts were drawn (attack_seed, seeding, the evaluation batch size) and
# derived records (aa_label, num_classes, ...) do not change the rule, so they are left out.
OLD_ROBUST_RULE = "last iterate (eval.json without settings.robust_rule, before the any-iterate rule)"
PROTOCOL_SETTINGS = {"robust_rule": OLD_ROBUST_RULE, "eps": None, "norm": None, "n_examples": None,
                     "example_seed": None, "pgd10_steps": None, "pgd10_step_size": None, "pgd_steps": None,
                     "pgd_restarts": None, "pgd_step_size": None, "autoattack": None, "autoattack_attacks": None,
                     "precision": "fp32"}


def method_label(method: str, protocol: dict | None = None) -> str:
    """Display name of a method: "PGD-AT", "DEAT", ...; "SGD-momentum" for pgd_at in a study without the attack
    (protocol pgd_steps 0); an unknown method shows as its upper-cased name."""
    if (protocol or {}).get("pgd_steps") == 0 and method in STANDARD_TRAINING_LABELS:
        return STANDARD_TRAINING_LABELS[method]
    return METHOD_LABELS.get(method, method.replace("_", "-").upper())


def objective_and_outer_step(method: str) -> tuple[str, str]:
    """("trades", "deat") for "trades_deat", ("pgd_at", "sgd") for "pgd_at" (deat.config's split); a method
    outside deat.config.METHODS (an older or hand-written manifest) is its own objective, outer step ""."""
    return (objective_of(method), outer_step_of(method)) if method in METHODS else (method, "")


def objective_pairs(methods) -> list[tuple[str, str, str]]:
    """(objective, SGD-momentum method, DEAT method) of every objective that ``methods`` has with both outer
    steps, in deat.config.OBJECTIVES order: [("pgd_at", "pgd_at", "deat"), ("trades", "trades", "trades_deat")]."""
    present = {objective_and_outer_step(m): m for m in methods}
    return [(objective, present[objective, "sgd"], present[objective, "deat"]) for objective in OBJECTIVES
            if (objective, "sgd") in present and (objective, "deat") in present]


def autoattack_label(settings: dict) -> str:
    """eval.json's ``settings.aa_label`` when it has one; else from ``settings.autoattack_attacks``: the full four
    attacks are "AutoAttack (standard)", a subset joins its upper-cased names ("APGD-CE + APGD-T")."""
    if settings.get("aa_label"):
        return settings["aa_label"]
    attacks = settings.get("autoattack_attacks")
    if not attacks or sorted(attacks) == sorted(AUTOATTACK_STANDARD):
        return "AutoAttack (standard)"
    return " + ".join(attack.upper() for attack in attacks)


def evaluation_protocol(evaluation: dict) -> str:
    """The rule and attack settings of an eval.json as canonical JSON (PROTOCOL_SETTINGS, their defaults where an
    older file lacks a key, plus the evaluated examples' hash); "" without an evaluation. Two runs pair only when
    these agree."""
    if not evaluation:
        return ""
    settings = evaluation.get("settings", {})
    protocol = {key: settings.get(key, default) for key, default in PROTOCOL_SETTINGS.items()}
    protocol["examples"] = evaluation.get("examples", {}).get("indices_sha256")
    return json.dumps(protocol, sort_keys=True)


def protocol_difference(first: str, second: str) -> str:
    """What differs between two evaluation_protocol strings, in words: "robust_rule: 'an example is robust ...' vs
    'last iterate ...'"; "" when they agree."""
    a, b = json.loads(first or "{}"), json.loads(second or "{}")

    def words(key, value):
        if key == "robust_rule":
            return "last-iterate rule (older eval.json)" if value == OLD_ROBUST_RULE else (
                "any-iterate rule" if "no iterate" in str(value) else repr(value))
        return f"{key} {value!r}"

    return "; ".join(f"{words(key, a.get(key))} vs {words(key, b.get(key))}" for key in sorted(set(a) | set(b))
                     if a.get(key) != b.get(key))


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
    """deat.effective.effective_step, or NaN for a method outside deat.config.METHODS, without the setting its
    outer step reads (momentum for SGD-momentum, k1 for DEAT), or with an impossible one (momentum ≥ 1): older
    manifests and hand-written runs."""
    needed = {"sgd": pgd_at_momentum, "deat": k1}.get(objective_and_outer_step(method)[1])
    try:
        return float("nan") if needed is None else effective_step(method, lr, pgd_at_momentum or 0.0, k1 or 0.0)
    except ValueError:
        return float("nan")


def formula_effective_decay(method: str, lr: float, pgd_at_momentum: float | None, k1: float | None,
                            weight_decay: float | None, decoupled_weight_decay: bool | None) -> float:
    """deat.effective.effective_decay (per-step shrink of the weights by decay alone), or NaN where a setting it
    reads is unknown or impossible, as formula_effective_step."""
    outer_step = objective_and_outer_step(method)[1]
    decoupled = outer_step == "deat" and bool(decoupled_weight_decay)
    if weight_decay is None or (outer_step == "deat" and decoupled_weight_decay is None) or (
            not decoupled and math.isnan(formula_effective_step(method, lr, pgd_at_momentum, k1))):
        return float("nan")
    try:
        return effective_decay(method, lr, pgd_at_momentum or 0.0, k1 or 0.0, weight_decay, decoupled)
    except ValueError:
        return float("nan")


def _run_record(run: dict, protocol: dict, runs_root: Path) -> tuple[dict, list[dict]]:
    """One row of the runs frame (raw fractions) and the run's per-epoch rows."""
    run_dir = runs_root / run["dir"]  # an absolute dir stays absolute
    # The workflow names each evaluation by a hash of its settings (run["eval"]); plain runs have dir/eval.json.
    eval_path = runs_root / run["eval"] if run.get("eval") else run_dir / "eval.json"
    record = {key: run[key] for key in RUN_KEYS}
    record["lr"], record["batch_size"], record["seed"] = float(run["lr"]), int(run["batch_size"]), int(run["seed"])
    record["label"] = method_label(run["method"], protocol)
    record["objective"], record["outer_step"] = objective_and_outer_step(run["method"])
    sweep = run.get("sweep", {})
    record["variant"] = variant_label(sweep)
    record.update({f"sweep_{key}": value for key, value in sweep.items()})

    metrics, record["metrics_problem"] = _read_json(run_dir / "metrics.json")
    if metrics is not None and metrics.get("status") != "complete":
        metrics, record["metrics_problem"] = None, f"training not complete (status={metrics.get('status')})"
    evaluation, record["eval_problem"] = _read_json(eval_path)
    metrics, evaluation = metrics or {}, evaluation or {}

    # Step and decay from the run's own config where it has one (every metrics.json does), else from the study's
    # settings (a run not trained yet still shows in the pairing); metrics.json's records where a setting is
    # missing. The formula comes first so that one definition serves every run, whatever code trained it.
    def setting(key, protocol_key=None):
        config = metrics.get("config", {})
        return config[key] if key in config else sweep.get(key, run.get(key, protocol.get(protocol_key or key)))

    optimizer_settings = (run["method"], record["lr"], setting("momentum", "pgd_at_momentum"), setting("k1"))
    step = formula_effective_step(*optimizer_settings)
    decay = formula_effective_decay(*optimizer_settings, setting("weight_decay"), setting("decoupled_weight_decay"))
    record["effective_step"] = step if not math.isnan(step) else _fraction(metrics.get("effective_step"))
    record["effective_decay"] = decay if not math.isnan(decay) else _fraction(metrics.get("effective_decay"))

    final_epoch = (metrics.get("epochs") or [{}])[-1]
    best, last = metrics.get("best") or {}, metrics.get("last") or {}
    settings = evaluation.get("settings", {})
    record.update({
        "metrics_best_epoch": _fraction(best.get("epoch")),
        "metrics_best_test_pgd_acc": _fraction(best.get("test_pgd_acc")),
        "metrics_best_val_pgd_acc": _fraction(best.get("val_pgd_acc")),
        "metrics_best_val_clean_acc": _fraction(best.get("val_clean_acc")),
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
    # AWP's γ: what the run used (metrics.json), else what the study set (sweep, protocol); 0 for objectives
    # without AWP, as deat.config leaves it out of their runs.
    gamma = metrics.get("config", {}).get("awp_gamma", sweep.get("awp_gamma", protocol.get("awp_gamma")))
    epoch_times = [entry.get("epoch_time_s") for entry in metrics.get("epochs", [])]
    rates = [entry.get("images_per_s") for entry in metrics.get("epochs", [])]
    test_pgd = [_fraction(entry.get("test_pgd_acc")) for entry in metrics.get("epochs", [])]
    extras = {
        "awp_gamma": float(gamma or 0.0) if record["objective"] in AWP_OBJECTIVES else 0.0,
        "device": metrics.get("environment", {}).get("device"),
        "mean_epoch_time_s": _mean(epoch_times),
        "mean_images_per_s": _mean(rates),
        "metrics_min_test_pgd_acc": _extreme(min, test_pgd),
        "metrics_max_test_pgd_acc": _extreme(max, test_pgd),
        "metrics_peak_epoch": _peak_epoch(metrics.get("epochs", []), test_pgd),
        "eval_protocol": evaluation_protocol(evaluation),
        "metrics_wall_time_s": _fraction(metrics.get("wall_time_s")),
        "eval_wall_time_s": _fraction(evaluation.get("wall_time_s")),
        "epochs_run": len(metrics.get("epochs", [])),
        "eval_pgd_label": (f"PGD-{settings['pgd_steps']}×{settings['pgd_restarts']}"
                           if "pgd_steps" in settings and "pgd_restarts" in settings else None),
    }
    checkpoints = evaluation.get("checkpoints", {})
    for checkpoint in CHECKPOINTS:
        result = checkpoints.get(checkpoint, {})
        for key in EVAL_METRICS:
            record[f"eval_{checkpoint}_{key}"] = _fraction(result.get(key))
        extras[f"eval_{checkpoint}_pgd_acc"] = _fraction(result.get("pgd_acc"))
        # Issue 13's evaluation: gradient-masking signatures and attacks it did not run (absent in older files).
        record[f"eval_{checkpoint}_masking"] = "; ".join(result.get("masking_flags") or [])
        record[f"eval_{checkpoint}_skipped"] = "; ".join(f"{attack} ({why})" for attack, why in
                                                        (result.get("skipped_attacks") or {}).items())
    record.update(extras)
    record.update(_later_columns(metrics, evaluation, sweep, protocol))

    identity = {key: record[key] for key in ("arch", "method", "label", "variant", "lr", "batch_size", "seed")}
    epoch_rows = [{**identity, "epoch": entry["epoch"], "train_robust_acc": _fraction(entry.get("train_robust_acc")),
                   "test_pgd_acc": _fraction(entry.get("test_pgd_acc")),
                   "test_clean_acc": _fraction(entry.get("test_clean_acc")),
                   "epoch_time_s": _fraction(entry.get("epoch_time_s")),
                   "images_per_s": _fraction(entry.get("images_per_s")),
                   **{key: _fraction(entry.get(key)) for key in LATER_EPOCH_COLUMNS}}
                  for entry in metrics.get("epochs", [])]
    return record, epoch_rows


# Per-epoch values of issues 21 and 22, NaN where a run has none: the averaged model's accuracies, the validation
# curve the collapse rule reads, and the probes.
LATER_EPOCH_COLUMNS = ["val_pgd_acc", "ema_test_pgd_acc", "ema_val_pgd_acc", "probe_lr", "probe_grad_trace_sigma",
                       "probe_grad_norm_sq", "probe_b_simple", "probe_diffusion", "probe_diffusion_effective",
                       "probe_update_trace_cov", "probe_update_mean_norm", "probe_time_s"]
# The averaged model's checkpoints (ema_tau > 0): evaluated like best and last, named so in every table.
EMA_CHECKPOINTS = ("best_ema", "last_ema")
CHECKPOINT_LABELS = {"best": "best", "last": "last", "best_ema": "best (EMA)", "last_ema": "last (EMA)"}


def _later_columns(metrics: dict, evaluation: dict, sweep: dict, protocol: dict) -> dict:
    """Columns of issues 21, 22 and 24 (weight averaging, collapses, probes, the robust gap, flatness, peak memory):
    NaN or empty for runs written before them."""
    config = metrics.get("config", {})
    columns = {
        "ema_tau": float(config.get("ema_tau", sweep.get("ema_tau", protocol.get("ema_tau", 0.0))) or 0.0),
        "peak_memory_mb": _fraction(metrics.get("peak_memory_mb")),
        "memory_kind": metrics.get("memory"),
        # A tuple (rows are hashed by some tables): the per-epoch validation PGD accuracy the collapse rule reads.
        "metrics_val_pgd_curve": tuple(entry.get("val_pgd_acc") for entry in metrics.get("epochs", [])),
        "metrics_final_val_pgd_acc": _fraction((metrics.get("epochs") or [{}])[-1].get("val_pgd_acc")),
        "stopped_early_epoch": _fraction((metrics.get("stopped_early") or {}).get("epoch")),
    }
    for which in ("best_ema", "last_ema"):
        columns[f"metrics_{which}_test_pgd_acc"] = _fraction((metrics.get(which) or {}).get("test_pgd_acc"))
        columns[f"metrics_{which}_epoch"] = _fraction((metrics.get(which) or {}).get("epoch"))
    checkpoints = evaluation.get("checkpoints", {})
    for checkpoint in CHECKPOINTS + EMA_CHECKPOINTS:
        result = checkpoints.get(checkpoint, {})
        if checkpoint in EMA_CHECKPOINTS:
            for key in (*EVAL_METRICS, "pgd_acc"):
                columns[f"eval_{checkpoint}_{key}"] = _fraction(result.get(key))
            columns[f"eval_{checkpoint}_masking"] = "; ".join(result.get("masking_flags") or [])
        # The robust gap measured alike on both sides (issue 22): PGD-10 on training images vs on the test subset.
        columns[f"eval_{checkpoint}_train_pgd10_acc"] = _fraction(result.get("train_pgd10_acc"))
        columns[f"eval_{checkpoint}_train_clean_acc"] = _fraction(result.get("train_clean_acc"))
        # As JSON text (a hashable cell); figures and tables parse it back.
        columns[f"eval_{checkpoint}_flatness"] = json.dumps(result["flatness"]) if result.get("flatness") else ""
    return columns


def _peak_epoch(epochs: list[dict], test_pgd: list[float]) -> float:
    """The first epoch at the highest per-epoch test PGD accuracy (where robust test accuracy peaked, picked on the
    test subset itself); NaN as _extreme."""
    peak = _extreme(max, test_pgd)
    return float("nan") if math.isnan(peak) else _fraction(epochs[test_pgd.index(peak)].get("epoch"))


def _extreme(pick, values: list[float]) -> float:
    """min or max of per-epoch accuracies; NaN when there are none or one is missing."""
    return pick(values) if values and not any(map(math.isnan, values)) else float("nan")


def _mean(values: list) -> float:
    """Mean of per-epoch numbers; NaN when there are none or one is missing (an older metrics.json)."""
    if not values or any(value is None for value in values):
        return float("nan")
    return sum(values) / len(values)


EPOCH_COLUMNS = ["arch", "method", "label", "variant", "lr", "batch_size", "seed", "epoch", "train_robust_acc",
                 "test_pgd_acc", "test_clean_acc", "epoch_time_s", "images_per_s", *LATER_EPOCH_COLUMNS]
# Columns added for the objectives table (issue 16). runs.csv leaves them out, so that regenerating a committed
# study's report rewrites none of its files; adding them to runs.csv is a deliberate change of its format.
RUNS_CSV_LEAVES_OUT = ("objective", "outer_step", "awp_gamma", "device", "mean_epoch_time_s", "mean_images_per_s",
                       "metrics_min_test_pgd_acc", "metrics_max_test_pgd_acc", "eval_pgd_label", "eval_best_pgd_acc",
                       "eval_last_pgd_acc", "metrics_peak_epoch", "metrics_best_val_pgd_acc",
                       "metrics_best_val_clean_acc", "eval_protocol", "metrics_wall_time_s", "eval_wall_time_s",
                       "epochs_run", "ema_tau", "peak_memory_mb", "memory_kind", "metrics_val_pgd_curve",
                       "metrics_final_val_pgd_acc", "stopped_early_epoch", "metrics_best_ema_test_pgd_acc",
                       "metrics_best_ema_epoch", "metrics_last_ema_test_pgd_acc", "metrics_last_ema_epoch",
                       *(f"eval_{c}_{key}" for c in ("best_ema", "last_ema") for key in ("pgd10_acc", "clean_acc",
                                                                                         "aa_acc", "pgd_acc",
                                                                                         "masking")),
                       *(f"eval_{c}_{key}" for c in ("best", "last", "best_ema", "last_ema")
                         for key in ("train_pgd10_acc", "train_clean_acc", "flatness")))


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


def _study_label(runs: pd.DataFrame, column: str, fallback: str) -> str:
    labels = list(dict.fromkeys(runs[column].dropna())) if column in runs else []
    return " / ".join(labels) if labels else fallback


def study_aa_label(runs: pd.DataFrame) -> str:
    """The AutoAttack label of the study's evaluations; several (a mixed study) are joined with " / "."""
    return _study_label(runs, "aa_label", "AutoAttack")


def study_pgd_label(runs: pd.DataFrame) -> str:
    """The strong PGD attack of the study's evaluations, "PGD-50×10" (eval.json settings pgd_steps ×
    pgd_restarts); several are joined with " / ", none known is "PGD-k×R"."""
    return _study_label(runs, "eval_pgd_label", "PGD-k×R")
