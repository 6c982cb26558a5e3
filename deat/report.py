"""Paper tables, statistics and figures regenerated from per-run ``metrics.json`` / ``eval.json`` (issue 5).

Regenerate every table and figure of every study committed under ``results/`` (no training):

    python -m deat report --results-dir results

or one study, from the repository root (run directories in a manifest are relative to it):

    python -m deat report --manifest results/studies/quick/manifest.json

Inputs are the study manifest the workflow writes (``{"study", "protocol", "paper_reference", "runs": [...]}``)
and each run's JSON files; nothing else (not MLflow, not checkpoints). A run's evaluation is the file its manifest
entry names under ``eval`` (the workflow's ``eval_<hash>.json``), else ``<dir>/eval.json``. A run may have
``metrics.json``, its evaluation, both or neither: a missing value prints as "—" with a footnote naming the run,
and a mean over fewer seeds than the study asks is marked "†" with "n=k of m seeds"; nothing is silently dropped.

Outputs, per study:
- ``tables_dir``: every table as ``.md``, ``.tex`` (booktabs, ready to ``\\input``) and ``.csv`` (``#`` comment
  lines first), each stating the study's protocol; ``runs.csv`` (one row per run, raw fractions) and
  ``summary.json`` (the key numbers, accuracies as fractions like every JSON file of the project).
- ``figures_dir``: seaborn figures as ``.png`` and ``.pdf``; a figure the grid cannot support is skipped with a
  logged note (also listed under ``skipped`` in ``summary.json``).

Accuracies in the JSON files are fractions; tables print percent with two decimals, std is the sample std
(ddof=1) over seeds, and Δ = DEAT − PGD-AT is the difference of the two seed means.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

log = logging.getLogger(__name__)

METHODS = ("pgd_at", "deat")
METHOD_LABELS = {"pgd_at": "PGD-AT", "deat": "DEAT"}
CHECKPOINTS = ("best", "last")
# eval.json metric key -> (file stem, words for captions)
EVAL_METRICS = {
    "pgd10_acc": ("pgd10", "PGD-10 robust test accuracy"),
    "clean_acc": ("clean", "clean test accuracy"),
    "aa_acc": ("aa", "AutoAttack robust test accuracy"),
}
RUN_KEYS = ("arch", "method", "lr", "batch_size", "seed", "dir")
# "variant" names a study's extra sweep axes ("k1=0.5, k2=0.8"); it is "" for studies without a sweep.
POINT_KEYS = ["arch", "method", "variant", "lr", "batch_size"]
EQUAL_STEP_RTOL = 0.01  # "equal effective step": within 1 % relative (math.isclose semantics)
MIN_CORRELATION_POINTS = 3
MISSING = "—"
PARTIAL = "†"
PAPER_TABLE2_CSV = Path(__file__).with_name("paper_table2.csv")
ROBUST_COLUMN = "eval_best_pgd10_acc"  # the paper's Table 2 metric: PGD-10 robust test accuracy, best checkpoint


# ---------------------------------------------------------------------------------------------- loading


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
        if run["method"] not in METHODS:
            raise ValueError(f"manifest runs[{index}]: method {run['method']!r} is not one of {', '.join(METHODS)}")
        identity = tuple(run[key] for key in RUN_KEYS[:-1]) + (variant_label(run.get("sweep")),)
        if identity in seen:
            raise ValueError(f"manifest runs[{index}]: duplicate run {identity}")
        seen.add(identity)


def variant_label(sweep: dict | None) -> str:
    """{"k1": 0.5, "k2": 0.8} -> "k1=0.5, k2=0.8"; no sweep -> ""."""
    return ", ".join(f"{key}={_render_value(value)}" for key, value in (sweep or {}).items())


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
    α' = lr/√((1+k1)²+k1²), since its two dampened buffers both tend to g and (1+k1)·g − k1·g = g."""
    if method == "pgd_at":
        return float("nan") if pgd_at_momentum is None else lr / (1.0 - pgd_at_momentum)
    return float("nan") if k1 is None else lr / math.sqrt((1.0 + k1) ** 2 + k1**2)


def _run_record(run: dict, protocol: dict, runs_root: Path) -> tuple[dict, list[dict]]:
    """One row of the runs frame (raw fractions) and the run's per-epoch rows."""
    run_dir = runs_root / run["dir"]  # an absolute dir stays absolute
    # The workflow names each evaluation by a hash of its settings (run["eval"]); plain runs have dir/eval.json.
    eval_path = runs_root / run["eval"] if run.get("eval") else run_dir / "eval.json"
    record = {key: run[key] for key in RUN_KEYS}
    record["lr"], record["batch_size"], record["seed"] = float(run["lr"]), int(run["batch_size"]), int(run["seed"])
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
    best, last = metrics.get("best", {}), metrics.get("last", {})
    record.update({
        "metrics_best_epoch": _fraction(best.get("epoch")),
        "metrics_best_test_pgd_acc": _fraction(best.get("test_pgd_acc")),
        "metrics_last_test_pgd_acc": _fraction(last.get("test_pgd_acc")),
        "metrics_final_train_robust_acc": _fraction(final_epoch.get("train_robust_acc")),
        "metrics_final_test_pgd_acc": _fraction(final_epoch.get("test_pgd_acc")),
        "device_name": metrics.get("environment", {}).get("device_name"),
        "torch": metrics.get("environment", {}).get("torch"),
        "eval_n_examples": evaluation.get("examples", {}).get("n"),
    })
    checkpoints = evaluation.get("checkpoints", {})
    for checkpoint in CHECKPOINTS:
        for key in EVAL_METRICS:
            record[f"eval_{checkpoint}_{key}"] = _fraction(checkpoints.get(checkpoint, {}).get(key))

    identity = {key: record[key] for key in ("arch", "method", "variant", "lr", "batch_size", "seed")}
    epoch_rows = [{**identity, "epoch": entry["epoch"], "train_robust_acc": _fraction(entry.get("train_robust_acc")),
                   "test_pgd_acc": _fraction(entry.get("test_pgd_acc"))}
                  for entry in metrics.get("epochs", [])]
    return record, epoch_rows


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
    columns = ["arch", "method", "variant", "lr", "batch_size", "seed", "epoch", "train_robust_acc", "test_pgd_acc"]
    return runs, pd.DataFrame.from_records(epoch_rows, columns=columns)


# ---------------------------------------------------------------------------------------------- formatting


def run_label(row) -> str:
    return f"{point_label(row.arch, row.method, row.lr, row.batch_size, row.variant)} seed {row.seed}"


def point_label(arch: str, method: str, lr: float, batch_size: int, variant: str = "") -> str:
    return f"{arch} {METHOD_LABELS[method]} α={lr:g} b={batch_size}" + (f" {variant}" if variant else "")


def format_percent(fraction: float) -> str:
    return MISSING if pd.isna(fraction) else f"{100 * fraction:.2f}"


def format_delta(fraction: float) -> str:
    return MISSING if pd.isna(fraction) else f"{100 * fraction:+.2f}"


def format_p(p: float) -> str:
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def format_mean_std(mean: float, std: float, n: int, n_expected: int) -> str:
    """"44.30 ± 0.28" (percent); one seed: no ±; fewer seeds than asked: marked †; none: —."""
    if n == 0:
        return MISSING
    text = f"{100 * mean:.2f}" if n < 2 else f"{100 * mean:.2f} ± {100 * std:.2f}"
    return text + (PARTIAL if n < n_expected else "")


def _json_value(value):
    """NaN → null and numpy scalars → Python, for summary.json."""
    if isinstance(value, (np.integer, np.floating)):
        value = value.item()
    return None if isinstance(value, float) and math.isnan(value) else value


def _records(frame: pd.DataFrame) -> list[dict]:
    return [{key: _json_value(value) for key, value in row.items()} for row in frame.to_dict("records")]


# ---------------------------------------------------------------------------------------------- tables


@dataclass
class Table:
    """A table as display strings; ``columns`` name the columns in Markdown/CSV, while LaTeX prints ``groups``
    (label, span) above ``subcolumns`` when given. ``empty_message`` replaces a table without rows."""

    name: str
    title: str
    columns: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)
    groups: list[tuple[str, int]] | None = None
    subcolumns: list[str] | None = None
    empty_message: str = ""


def seed_stats(runs: pd.DataFrame, column: str) -> pd.DataFrame:
    """Per grid point: mean, sample std (ddof=1), seeds with a value (n) and seeds the study asks (n_expected)."""
    grouped = runs.groupby(POINT_KEYS, sort=False)[column]
    return pd.DataFrame({"mean": grouped.mean(), "std": grouped.std(ddof=1), "n": grouped.count(),
                         "n_expected": grouped.size()}).reset_index()


def _missing_note(runs: pd.DataFrame, columns: list[str]) -> list[str]:
    """Footnote naming each run without a value in ``columns`` and why."""
    lacking = runs[runs[columns].isna().any(axis=1)]
    if lacking.empty:
        return []
    reasons = []
    for row in lacking.itertuples():
        column = next(c for c in columns if pd.isna(getattr(row, c)))
        source = column.split("_")[0]
        problem = getattr(row, f"{source}_problem") or f"{column.split('_', 2)[-1]} not computed (null)"
        reasons.append(f"{run_label(row)} ({problem})")
    return [f"{MISSING} no value; runs without one: " + "; ".join(reasons) + "."]


def _partial_note(point_stats: pd.DataFrame) -> list[str]:
    partial = point_stats[(point_stats.n > 0) & (point_stats.n < point_stats.n_expected)]
    if partial.empty:
        return []
    items = [f"{point_label(r.arch, r.method, r.lr, r.batch_size, r.variant)} (n={r.n} of {r.n_expected} seeds)"
             for r in partial.itertuples()]
    return [f"{PARTIAL} mean over fewer seeds than the study asks: " + "; ".join(items) + "."]


def _ordered(values) -> list:
    return list(dict.fromkeys(values))


def _methods(runs: pd.DataFrame) -> list[str]:
    return [method for method in METHODS if method in set(runs.method)]


def _varies_batch(runs: pd.DataFrame) -> bool:
    return runs.batch_size.nunique() > 1


def _curve_keys(runs: pd.DataFrame) -> list[tuple[str, str, str]]:
    """(arch, method, variant) in arch, method and variant order: one curve over (α, b) each."""
    return [(arch, method, variant) for arch in _ordered(runs.arch) for method in _methods(runs)
            for variant in _ordered(runs.variant[runs.method == method])]


def _varies_variant(runs: pd.DataFrame) -> bool:
    return runs.variant.nunique() > 1


def _grid_rows(runs: pd.DataFrame) -> list[tuple[str, float, int]]:
    """(variant, α, b) of every grid point, variants in manifest order."""
    order = {variant: i for i, variant in enumerate(_ordered(runs.variant))}
    return sorted(set(zip(runs.variant, runs.lr, runs.batch_size)), key=lambda v: (order[v[0]], v[1], v[2]))


def accuracy_table(runs: pd.DataFrame, metric: str, checkpoint: str) -> tuple[Table, list[dict]]:
    """Table 2 analogue: rows α (and b), columns arch × method plus Δ = DEAT − PGD-AT per arch."""
    stem, words = EVAL_METRICS[metric]
    column = f"eval_{checkpoint}_{metric}"
    point_stats = seed_stats(runs, column)
    lookup = {tuple(r[k] for k in POINT_KEYS): r for r in point_stats.to_dict("records")}
    archs, methods, varies_batch = _ordered(runs.arch), _methods(runs), _varies_batch(runs)
    with_delta = methods == list(METHODS)

    varies_variant = _varies_variant(runs)
    key_columns = (["variant"] if varies_variant else []) + (["α", "b"] if varies_batch else ["α"])
    labels = [METHOD_LABELS[m] for m in methods] + (["Δ"] if with_delta else [])
    columns = key_columns + [f"{arch} {label}" for arch in archs for label in labels]
    groups = [("", len(key_columns))] + [(arch, len(labels)) for arch in archs]
    subcolumns = key_columns + labels * len(archs)

    rows, deltas = [], []
    for variant, lr, batch_size in _grid_rows(runs):
        cells = ([variant] if varies_variant else []) + [f"{lr:g}"] + ([str(batch_size)] if varies_batch else [])
        for arch in archs:
            point = {m: lookup.get((arch, m, variant, lr, batch_size)) for m in methods}
            cells.extend("" if p is None else format_mean_std(p["mean"], p["std"], p["n"], p["n_expected"])
                         for p in point.values())
            if with_delta:
                pgd, deat = point["pgd_at"], point["deat"]
                delta = float("nan") if pgd is None or deat is None else deat["mean"] - pgd["mean"]
                partial = pgd is not None and deat is not None and (
                    0 < pgd["n"] < pgd["n_expected"] or 0 < deat["n"] < deat["n_expected"])
                cells.append(format_delta(delta) + (PARTIAL if partial and not pd.isna(delta) else ""))
                deltas.append({"arch": arch, "variant": variant, "lr": lr, "batch_size": batch_size,
                               "delta_acc": delta})
        rows.append(cells)

    notes = _missing_note(runs, [column]) + _partial_note(point_stats)
    if any("" in row for row in rows):
        notes.append("Blank: not a grid point of this study.")
    if with_delta:
        notes.append("Δ = DEAT − PGD-AT, difference of the seed means (percentage points).")
    title = f"Table 2 analogue: {words} (%) of the {checkpoint} checkpoint, mean ± std over seeds"
    summary = [{"metric": metric, "checkpoint": checkpoint, **r} for r in _records(
        point_stats.rename(columns={"mean": "mean_acc", "std": "std_acc", "n": "n_seeds",
                                    "n_expected": "n_seeds_expected"}))]
    summary += [{"metric": metric, "checkpoint": checkpoint, "method": "deat_minus_pgd_at", **r}
                for r in _records(pd.DataFrame(deltas))]
    return Table(f"table2_{stem}_{checkpoint}", title, columns, rows, notes, groups, subcolumns), summary


def _correlation_cell(x: np.ndarray, y: np.ndarray, test) -> tuple[str, float, float, str]:
    """(display, statistic, p, footnote) for one correlation test; "—" where it is undefined."""
    if len(x) < MIN_CORRELATION_POINTS:
        return MISSING, float("nan"), float("nan"), f"fewer than {MIN_CORRELATION_POINTS} grid points with a result"
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return MISSING, float("nan"), float("nan"), "undefined for constant input"
    statistic, p = test(x, y)
    return f"{statistic:.3f} (p={format_p(p)})", float(statistic), float(p), ""


def correlation_table(runs: pd.DataFrame) -> tuple[Table, list[dict]]:
    """Table 3 analogue: Pearson r, Spearman ρ, Kendall τ of the seed-mean PGD-10 accuracy per grid point with α
    and with α/b (the paper's claim is about α/b; it only varied α)."""
    tests = {"Pearson r": stats.pearsonr, "Spearman ρ": stats.spearmanr, "Kendall τ": stats.kendalltau}
    varies_batch = _varies_batch(runs)
    columns = ["arch", "method", "checkpoint", "points"] + [f"{name} vs {x}" for x in ("α", "α/b") for name in tests]
    rows, summary, undefined = [], [], {}
    for arch, method, variant in _curve_keys(runs):
        subset = runs[(runs.arch == arch) & (runs.method == method) & (runs.variant == variant)]
        for checkpoint in CHECKPOINTS:
            point_stats = seed_stats(subset, f"eval_{checkpoint}_pgd10_acc")
            present = point_stats[point_stats.n > 0]
            partial = (present.n < present.n_expected).any()
            label = METHOD_LABELS[method] + (f" {variant}" if variant else "")
            cells = [arch, label, checkpoint,
                     (f"{len(present)}" if len(present) == len(point_stats)
                      else f"{len(present)} of {len(point_stats)}") + (PARTIAL if partial else "")]
            y = present["mean"].to_numpy()
            for x_name, x in (("lr", present.lr.to_numpy()),
                              ("lr_over_batch", (present.lr / present.batch_size).to_numpy())):
                for name, test in tests.items():
                    text, statistic, p, why = _correlation_cell(x, y, test)
                    if why:
                        undefined.setdefault(why, []).append(f"{arch} {label} {checkpoint}")
                        text += "ᵃ" if why.startswith("fewer") else "ᵇ"
                    cells.append(text)
                    summary.append({"arch": arch, "method": method, "variant": variant, "checkpoint": checkpoint,
                                    "x": x_name,
                                    "test": name.split()[0].lower(), "statistic": _json_value(statistic),
                                    "p": _json_value(p), "n_points": len(present)})
            rows.append(cells)
    notes = []
    for why, items in undefined.items():
        marker = "ᵃ" if why.startswith("fewer") else "ᵇ"
        notes.append(f"{MISSING}{marker} {why}: " + ", ".join(_ordered(items)) + ".")
    notes.append("Correlation of the seed-mean PGD-10 robust test accuracy per grid point (α, b) with α and with "
                 "α/b; p: two-sided p-value (scipy.stats). Points: grid points with a result"
                 f" ({PARTIAL}: some seed-means over fewer seeds than the study asks).")
    if not varies_batch:
        notes.append("One batch size: α/b is α rescaled, so its correlations equal those with α.")
    groups = [("", 4), ("vs α", 3), ("vs α/b", 3)]
    subcolumns = columns[:4] + list(tests) * 2
    title = "Table 3 analogue: correlation of robust accuracy with the learning rate α and with α/b"
    return Table("table3_correlation", title, columns, rows, notes, groups, subcolumns), summary


def _matched_differences(runs: pd.DataFrame, column: str, arch: str) -> tuple[pd.DataFrame, int]:
    """DEAT and PGD-AT values of one arch matched on (variant, α, b, seed), both present; and how many matches
    exist."""
    subset = runs[runs.arch == arch]
    keys = ["variant", "lr", "batch_size", "seed"]
    pgd = subset[subset.method == "pgd_at"].set_index(keys)[column]
    deat = subset[subset.method == "deat"].set_index(keys)[column]
    matched = pd.concat({"pgd_at": pgd, "deat": deat}, axis=1, join="inner")
    return matched.dropna(), len(matched)


def paired_ttest_table(runs: pd.DataFrame) -> tuple[Table, list[dict]]:
    """Table 4 analogue: mean DEAT − PGD-AT improvement and paired t-test over matched (arch, α, b, seed) runs."""
    columns = ["arch", "metric", "checkpoint", "pairs", "mean Δ (pp)", "t", "p"]
    rows, summary, notes = [], [], []
    for arch in _ordered(runs.arch):
        for metric, (_, words) in EVAL_METRICS.items():
            for checkpoint in CHECKPOINTS:
                column = f"eval_{checkpoint}_{metric}"
                if runs[column].isna().all():
                    continue
                matched, n_matches = _matched_differences(runs, column, arch)
                differences = (matched.deat - matched.pgd_at).to_numpy()
                mean = differences.mean() if len(differences) else float("nan")
                t = p = float("nan")
                if len(differences) >= 2 and np.std(differences) > 1e-12 * max(1.0, abs(mean)):
                    t, p = stats.ttest_rel(matched.deat, matched.pgd_at)
                pairs = f"{len(matched)}" + ("" if len(matched) == n_matches else f" of {n_matches}{PARTIAL}")
                rows.append([arch, words.replace(" test accuracy", ""), checkpoint, pairs, format_delta(mean),
                             MISSING if pd.isna(t) else f"{t:.2f}", MISSING if pd.isna(p) else format_p(p)])
                summary.append({"arch": arch, "metric": metric, "checkpoint": checkpoint, "n_pairs": len(matched),
                                "n_pairs_expected": n_matches, "mean_delta_acc": _json_value(mean),
                                "t": _json_value(float(t)), "p": _json_value(float(p))})
    if any(PARTIAL in row[3] for row in rows):
        notes.append(f"{PARTIAL} pairs with a run missing are left out (see the Table 2 footnotes for which).")
    if any(row[5] == MISSING for row in rows):
        notes.append(f"{MISSING}: t-test undefined (fewer than 2 pairs, or every difference equal).")
    notes.append("Pairs: DEAT and PGD-AT runs of the same arch, α, b and seed; mean Δ in percentage points; "
                 "t and two-sided p from scipy.stats.ttest_rel(DEAT, PGD-AT).")
    title = "Table 4 analogue: mean improvement of DEAT over PGD-AT and paired t-test"
    return Table("table4_paired_ttest", title, columns, rows, notes,
                 empty_message="No matched DEAT/PGD-AT pairs with results."), summary


def equal_step_table(runs: pd.DataFrame) -> tuple[Table, list[dict]]:
    """DEAT vs PGD-AT at equal effective step (not equal α): runs of the same arch, b and seed whose effective steps
    agree within 1 % relative. Equal α is not an equal step (SGD momentum 0.9: ≈10α; DEAT: ≈0.45α)."""
    columns = ["arch", "b", "seed", "α PGD-AT", "α DEAT", "effective step", "PGD-AT best", "DEAT best", "Δ best",
               "PGD-AT last", "DEAT last", "Δ last"]
    rows, summary = [], []
    pgd_runs, deat_runs = runs[runs.method == "pgd_at"], runs[runs.method == "deat"]
    for pgd in pgd_runs.sort_values(["arch", "batch_size", "lr", "seed"]).itertuples():
        partners = deat_runs[(deat_runs.arch == pgd.arch) & (deat_runs.batch_size == pgd.batch_size)
                             & (deat_runs.seed == pgd.seed)]
        for deat in partners.itertuples():
            if not math.isclose(pgd.effective_step, deat.effective_step, rel_tol=EQUAL_STEP_RTOL):
                continue
            cells = [pgd.arch, str(pgd.batch_size), str(pgd.seed), f"{pgd.lr:g}", f"{deat.lr:g}",
                     f"{pgd.effective_step:.4g}"]
            record = {"arch": pgd.arch, "batch_size": pgd.batch_size, "seed": pgd.seed, "lr_pgd_at": pgd.lr,
                      "lr_deat": deat.lr, "effective_step_pgd_at": pgd.effective_step,
                      "effective_step_deat": deat.effective_step}
            for checkpoint in CHECKPOINTS:
                column = f"eval_{checkpoint}_pgd10_acc"
                before, after = getattr(pgd, column), getattr(deat, column)
                cells += [format_percent(before), format_percent(after), format_delta(after - before)]
                record.update({f"pgd_at_{checkpoint}_acc": before, f"deat_{checkpoint}_acc": after})
            rows.append(cells)
            summary.append({key: _json_value(value) for key, value in record.items()})
    notes = []
    if rows:
        paired = runs[runs.method.isin(METHODS)]
        in_pairs = {(r["arch"], "pgd_at", r["lr_pgd_at"], r["batch_size"], r["seed"]) for r in summary} | {
            (r["arch"], "deat", r["lr_deat"], r["batch_size"], r["seed"]) for r in summary}
        members = paired[[(r.arch, r.method, r.lr, r.batch_size, r.seed) in in_pairs for r in paired.itertuples()]]
        notes += _missing_note(members, ["eval_best_pgd10_acc", "eval_last_pgd10_acc"])
    notes.append("Effective step: step per unit gradient, lr/(1−m) for PGD-AT with SGD momentum m and "
                 "lr/√((1+k1)²+k1²) for DEAT (from metrics.json, else from the protocol); PGD-10 robust test "
                 "accuracy (%), Δ = DEAT − PGD-AT (pp).")
    title = "DEAT vs PGD-AT at equal effective step (within 1 %)"
    empty = "No DEAT/PGD-AT pair (same arch, b, seed) in this study has effective steps within 1 % of each other."
    return Table("equal_effective_step", title, columns, rows, notes, empty_message=empty), summary


def robust_overfitting_table(runs: pd.DataFrame) -> tuple[Table, list[dict]]:
    """Per run: best − last robust test accuracy and the robust train − test gap at the final epoch
    (metrics.json)."""
    columns = ["arch", "method", "α", "b", "seed", "best epoch", "best test PGD", "last test PGD", "best − last",
               "final train robust", "train − test gap"]
    rows = []
    frame = runs.assign(
        best_minus_last_acc=runs.metrics_best_test_pgd_acc - runs.metrics_last_test_pgd_acc,
        train_test_gap_acc=runs.metrics_final_train_robust_acc - runs.metrics_final_test_pgd_acc)
    for row in frame.itertuples():
        method = METHOD_LABELS[row.method] + (f" {row.variant}" if row.variant else "")
        rows.append([row.arch, method, f"{row.lr:g}", str(row.batch_size), str(row.seed),
                     MISSING if pd.isna(row.metrics_best_epoch) else str(int(row.metrics_best_epoch)),
                     format_percent(row.metrics_best_test_pgd_acc), format_percent(row.metrics_last_test_pgd_acc),
                     format_delta(row.best_minus_last_acc), format_percent(row.metrics_final_train_robust_acc),
                     format_delta(row.train_test_gap_acc)])
    notes = _missing_note(runs, ["metrics_best_test_pgd_acc", "metrics_last_test_pgd_acc",
                                 "metrics_final_train_robust_acc", "metrics_final_test_pgd_acc"])
    notes.append("From metrics.json: the per-epoch test PGD accuracy of training's own evaluation (attack as in "
                 "the protocol), best epoch chosen on the validation split; best − last and train − test gap in "
                 "percentage points (robust overfitting: the paper's Fig. 5).")
    per_method = frame.groupby(["arch", "method", "variant"], sort=False)[["best_minus_last_acc", "train_test_gap_acc"]]
    summary = _records(per_method.mean().add_prefix("mean_").join(per_method.count()["best_minus_last_acc"]
                                                                   .rename("n_runs")).reset_index())
    title = "Robust overfitting per run: best − last robust test accuracy and the robust train − test gap (%)"
    return Table("robust_overfitting", title, columns, rows, notes), summary


def sweep_table(runs: pd.DataFrame) -> tuple[Table, list[dict]]:
    """Sensitivity to a study's sweep axes (e.g. DEAT's k1 × k2): per variant the seed-mean accuracies, then per
    (arch, method, α, b) the range of the variant means and a one-way ANOVA across variants over the seeds."""
    columns = ["arch", "method", "α", "b", "variant", "effective step"] + [
        f"{words.split(' test')[0]} {checkpoint}" for _, words in EVAL_METRICS.values() for checkpoint in CHECKPOINTS]
    metric_columns = [f"eval_{checkpoint}_{metric}" for metric in EVAL_METRICS for checkpoint in CHECKPOINTS]
    rows, summary, notes = [], [], []
    for (arch, method, lr, batch_size), curve in runs.groupby(["arch", "method", "lr", "batch_size"], sort=False):
        variants = _ordered(curve.variant)
        for variant in variants:
            point = curve[curve.variant == variant]
            cells = [arch, METHOD_LABELS[method], f"{lr:g}", str(batch_size), variant,
                     f"{point.effective_step.iloc[0]:.4g}"]
            for column in metric_columns:
                values = point[column].dropna()
                cells.append(format_mean_std(values.mean(), values.std(ddof=1), len(values), len(point)))
            rows.append(cells)
        for column in metric_columns:
            groups = [curve[curve.variant == v][column].dropna().to_numpy() for v in variants]
            means = [g.mean() for g in groups if len(g)]
            f = p = float("nan")
            if len(groups) >= 2 and all(len(g) >= 2 for g in groups) and any(np.ptp(g) > 0 for g in groups):
                f, p = stats.f_oneway(*groups)
            spread = max(means) - min(means) if means else float("nan")
            summary.append({"arch": arch, "method": method, "lr": lr, "batch_size": batch_size, "metric": column,
                            "n_variants": len(variants), "range_of_means_acc": _json_value(spread),
                            "anova_f": _json_value(float(f)), "anova_p": _json_value(float(p))})
            if column == ROBUST_COLUMN:
                notes.append(f"{arch} {METHOD_LABELS[method]} α={lr:g} b={batch_size}: PGD-10 best ranges "
                             f"{format_percent(min(means)) if means else MISSING}–"
                             f"{format_percent(max(means)) if means else MISSING} over {len(variants)} variants "
                             f"(range {format_delta(spread)} pp); one-way ANOVA across variants "
                             + (f"F = {f:.2f}, p = {format_p(p)}." if not pd.isna(p)
                                else f"{MISSING} (needs ≥ 2 variants with ≥ 2 seeds each)."))
    notes += _missing_note(runs, metric_columns)
    notes.append("Mean ± std over seeds (%). Effective step: step per unit gradient (see equal_effective_step); "
                 "at a fixed α, DEAT's k1 changes it as 1/√((1+k1)²+k1²). ANOVA: scipy.stats.f_oneway over the "
                 "seeds of each variant.")
    title = "Sensitivity to the swept settings: accuracy per variant (%)"
    return Table("sweep_sensitivity", title, columns, rows, notes), summary


def load_paper_table2(path: str | Path = PAPER_TABLE2_CSV) -> pd.DataFrame:
    """The paper's Table 2 (percent) as columns alpha, arch, method, robust_acc."""
    return pd.read_csv(path, comment="#")


def paper_comparison_table(runs: pd.DataFrame, checkpoint: str) -> tuple[Table, list[dict]]:
    """Our PGD-10 robust test accuracy beside the paper's Table 2 number for the same arch, method and α."""
    paper = load_paper_table2()
    paper_lookup = {(r.arch, r.method, round(r.alpha, 9)): r.robust_acc for r in paper.itertuples()}
    point_stats = seed_stats(runs, f"eval_{checkpoint}_pgd10_acc")
    lookup = {tuple(r[k] for k in POINT_KEYS): r for r in point_stats.to_dict("records")}
    varies_batch, methods = _varies_batch(runs), _methods(runs)
    varies_variant = _varies_variant(runs)
    columns = ["arch"] + (["variant"] if varies_variant else []) + ["α"] + (["b"] if varies_batch else [])
    for method in methods:
        label = METHOD_LABELS[method]
        columns += [f"{label} ours", f"{label} paper", f"{label} ours − paper"]
    rows, summary = [], []
    for arch in _ordered(runs.arch):
        for variant, lr, batch_size in _grid_rows(runs[runs.arch == arch]):
            cells = ([arch] + ([variant] if varies_variant else []) + [f"{lr:g}"]
                     + ([str(batch_size)] if varies_batch else []))
            for method in methods:
                ours = lookup.get((arch, method, variant, lr, batch_size))
                reported = paper_lookup.get((arch, method, round(lr, 9)), float("nan"))
                mean = float("nan") if ours is None or ours["n"] == 0 else 100 * ours["mean"]
                shown = "" if ours is None else format_mean_std(ours["mean"], ours["std"], ours["n"],
                                                                ours["n_expected"])
                cells += [shown,
                          MISSING if pd.isna(reported) else f"{reported:.2f}",
                          MISSING if pd.isna(mean - reported) else f"{mean - reported:+.2f}"]
                summary.append({"arch": arch, "method": method, "lr": lr, "batch_size": batch_size,
                                "checkpoint": checkpoint, "ours_percent": _json_value(mean),
                                "paper_percent": _json_value(float(reported))})
            rows.append(cells)
    notes = _missing_note(runs, [f"eval_{checkpoint}_pgd10_acc"]) + _partial_note(point_stats)
    notes.append("Paper: Sun, Sinha, Zhang, KDD 2023 (arXiv 2306.02618), Table 2 (CIFAR-10, b = 128, mean of 3 "
                 f"runs); {MISSING} in the paper column: α or arch not in the paper. Ours − paper in percentage "
                 "points.")
    title = f"PGD-10 robust test accuracy (%), {checkpoint} checkpoint: ours beside the paper's Table 2"
    return Table(f"paper_comparison_{checkpoint}", title, columns, rows, notes), summary


# ---------------------------------------------------------------------------------------------- protocol text


def _render_value(value) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_render_value(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _flatten(mapping: dict, prefix: str = "") -> list[tuple[str, object]]:
    items = []
    for key, value in mapping.items():
        if isinstance(value, dict):
            items += _flatten(value, f"{prefix}{key}.")
        else:
            items.append((f"{prefix}{key}", value))
    return items


def protocol_lines(manifest: dict, runs: pd.DataFrame) -> list[str]:
    """What every table states about how its numbers were made: the manifest's protocol, whatever keys it has,
    plus where the runs ran (metrics.json environment) and how many test examples eval.json used."""
    protocol = manifest.get("protocol", {})
    description = manifest.get("description", "").rstrip(".")
    lines = [f"Study {manifest['study']}" + (f": {description}." if description else ".")]
    optimizers, methods = [], set(runs.method)
    if "pgd_at_momentum" in protocol and "pgd_at" in methods:
        momentum = protocol["pgd_at_momentum"]
        optimizers.append("PGD-AT: plain SGD (Algorithm 1)" if momentum == 0 else f"PGD-AT: SGD, momentum {momentum:g}")
    if ("k1" in protocol or "k2" in protocol) and "deat" in methods:
        optimizers.append(f"DEAT: Algorithm 2, k1={_render_value(protocol.get('k1'))}, "
                          f"k2={_render_value(protocol.get('k2'))}")
    if optimizers:
        lines.append("Optimizers: " + "; ".join(optimizers) + ".")
    if protocol:
        settings = "; ".join(f"{key}={_render_value(value)}" for key, value in _flatten(protocol))
        lines.append(f"Protocol: {settings}.")
    devices = runs.device_name.dropna().value_counts()
    if len(devices):
        torch_versions = ", ".join(sorted(runs.torch.dropna().unique()))
        lines.append("Ran on: " + ", ".join(f"{name} ({count} runs)" for name, count in devices.items())
                     + f"; torch {torch_versions}.")
    examples = sorted(runs.eval_n_examples.dropna().astype(int).unique())
    if examples:
        lines.append("Test examples evaluated (eval.json): " + ", ".join(map(str, examples)) + ".")
    lines.append("Accuracies in percent; α = learning rate, b = batch size.")
    return lines


# ---------------------------------------------------------------------------------------------- writers


def to_markdown(table: Table, protocol: list[str]) -> str:
    lines = [f"**{table.title}**", ""]
    if table.rows:
        escape = lambda cell: cell.replace("|", "\\|")  # noqa: E731
        lines.append("| " + " | ".join(map(escape, table.columns)) + " |")
        lines.append("|" + "|".join(":--" if i == 0 else "--:" for i in range(len(table.columns))) + "|")
        lines += ["| " + " | ".join(map(escape, row)) + " |" for row in table.rows]
    else:
        lines.append(table.empty_message)
    for paragraph in table.notes + [" ".join(protocol)]:
        lines += ["", paragraph]
    return "\n".join(lines) + "\n"


_LATEX_CHARACTERS = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
    "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "<": r"$<$", ">": r"$>$", "|": r"$|$",
    "±": r"$\pm$", "—": "---", "−": "$-$", "†": r"\textsuperscript{\dag}", "ᵃ": r"\textsuperscript{a}",
    "ᵇ": r"\textsuperscript{b}", "Δ": r"$\Delta$", "α": r"$\alpha$", "ρ": r"$\rho$", "τ": r"$\tau$",
    "ε": r"$\varepsilon$", "√": r"$\surd$", "²": r"\textsuperscript{2}", "×": r"$\times$", "≈": r"$\approx$",
}


def latex_escape(text: str) -> str:
    """Escape LaTeX specials and typeset the few non-ASCII symbols the tables use; a minus sign before a digit
    becomes a math minus."""
    out = []
    for index, char in enumerate(text):
        before = text[index - 1] if index else " "
        after = text[index + 1] if index + 1 < len(text) else ""
        if char == "-" and after.isdigit() and not before.isalnum():
            out.append("$-$")
        else:
            out.append(_LATEX_CHARACTERS.get(char, char))
    return "".join(out)


def to_latex(table: Table, protocol: list[str], study: str) -> str:
    label = re.sub(r"[^A-Za-z0-9-]", "-", f"{study}-{table.name}")
    lines = [f"% {table.name} of study {study}, written by deat.report (python -m deat report); needs booktabs.",
             r"\begin{table}[htbp]", r"\centering", rf"\caption{{{latex_escape(table.title)}}}",
             rf"\label{{tab:{label}}}"]
    if table.rows:
        alignment = "".join("l" if i == 0 else "r" for i in range(len(table.columns)))
        lines += [rf"\begin{{tabular}}{{{alignment}}}", r"\toprule"]
        if table.groups:
            cells, rules, start = [], [], 1
            for group, span in table.groups:
                cells.append(rf"\multicolumn{{{span}}}{{c}}{{{latex_escape(group)}}}" if group
                             else " & ".join([""] * span))
                if group:
                    rules.append(rf"\cmidrule(lr){{{start}-{start + span - 1}}}")
                start += span
            lines += [" & ".join(cells) + r" \\", " ".join(rules)]
        header = table.subcolumns or table.columns
        lines += [" & ".join(map(latex_escape, header)) + r" \\", r"\midrule"]
        lines += [" & ".join(map(latex_escape, row)) + r" \\" for row in table.rows]
        lines += [r"\bottomrule", r"\end{tabular}"]
    else:
        lines.append(latex_escape(table.empty_message) + r"\par")
    notes = [latex_escape(note) for note in table.notes + [" ".join(protocol)]]
    lines += [r"\par\smallskip", r"{\footnotesize " + r"\par ".join(notes) + r"\par}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def to_csv(table: Table, protocol: list[str]) -> str:
    buffer = io.StringIO()
    for line in [table.title] + table.notes + protocol:
        buffer.write(f"# {line}\n")
    if not table.rows:
        buffer.write(f"# {table.empty_message}\n")
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(table.columns)
    writer.writerows(table.rows)
    return buffer.getvalue()


def write_table(table: Table, protocol: list[str], study: str, tables_dir: Path) -> list[Path]:
    paths = []
    for suffix, text in ((".md", to_markdown(table, protocol)), (".tex", to_latex(table, protocol, study)),
                         (".csv", to_csv(table, protocol))):
        path = tables_dir / f"{table.name}{suffix}"
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------- figures


def _pyplot():
    """matplotlib with the Agg backend (headless), imported only when figures are drawn: the CLI imports this module
    for its argument parser."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="paper")
    return plt, sns


def _save(figure, figures_dir: Path, stem: str) -> list[Path]:
    paths = [figures_dir / f"{stem}.png", figures_dir / f"{stem}.pdf"]
    figure.savefig(paths[0], dpi=150, bbox_inches="tight")
    figure.savefig(paths[1], bbox_inches="tight", metadata={"CreationDate": None})  # byte-stable PDFs in git
    _pyplot()[0].close(figure)
    return paths


def _robust_percent(runs: pd.DataFrame) -> pd.DataFrame:
    """Runs with a best-checkpoint PGD-10 accuracy, in percent, with display labels for the legends."""
    data = runs.dropna(subset=[ROBUST_COLUMN])
    return data.assign(robust=100 * data[ROBUST_COLUMN], Method=data.method.map(METHOD_LABELS),
                       batch=data.batch_size.map(lambda b: f"b={b}"), ratio=data.lr / data.batch_size)


def figure_accuracy_vs_lr(runs: pd.DataFrame, figures_dir: Path, skipped: list[str]) -> list[Path]:
    """Paper Fig. 4: PGD-10 robust test accuracy (best checkpoint) against α, one panel per arch, mean ± sd over
    seeds, one line per method (and batch size)."""
    data = _robust_percent(runs)
    if data.lr.nunique() < 2:
        skipped.append("robust_acc_vs_lr: fewer than 2 learning rates with a PGD-10 result")
        return []
    plt, sns = _pyplot()
    style = "variant" if data.variant.nunique() > 1 else "batch" if data.batch_size.nunique() > 1 else None
    grid = sns.relplot(data=data, kind="line", x="lr", y="robust", hue="Method", hue_order=_labels(data),
                       style=style, col="arch", marker="o",
                       errorbar="sd", height=3.2, aspect=1.1)
    grid.set(xscale="log")
    grid.set_axis_labels("α (learning rate)", "PGD-10 robust test acc. (%)")
    return _save(grid.figure, figures_dir, "robust_acc_vs_lr")


def _labels(data: pd.DataFrame) -> list[str]:
    return [METHOD_LABELS[m] for m in METHODS if m in set(data.method)]


def _middle(values) -> float:
    ordered = sorted(set(values))
    return ordered[len(ordered) // 2]


def figure_robust_per_epoch(runs: pd.DataFrame, epochs: pd.DataFrame, figures_dir: Path,
                            skipped: list[str]) -> list[Path]:
    """Paper Fig. 5: robust train and test accuracy per epoch for both methods, one panel per arch. Each method is
    shown at the middle α of its own grid (upper middle for an even count), the middle b and its first sweep
    variant, mean ± sd over seeds."""
    if epochs.empty:
        skipped.append("robust_acc_per_epoch: no metrics.json with epochs")
        return []
    selected = []
    for method in _methods(runs):
        grid = runs[runs.method == method]
        lr, batch_size, variant = _middle(grid.lr), _middle(grid.batch_size), grid.variant.iloc[0]
        rows = epochs[(epochs.method == method) & (epochs.lr == lr) & (epochs.batch_size == batch_size)
                      & (epochs.variant == variant)]
        label = f"{METHOD_LABELS[method]} (α={lr:g}, b={batch_size}" + (f", {variant})" if variant else ")")
        selected.append(rows.assign(Method=label))
    data = pd.concat(selected)
    if data.empty:
        skipped.append("robust_acc_per_epoch: no epochs at the middle grid point")
        return []
    long = data.melt(id_vars=["arch", "Method", "seed", "epoch"], value_vars=["train_robust_acc", "test_pgd_acc"],
                     var_name="split", value_name="accuracy")
    long = long.assign(accuracy=100 * long.accuracy,
                       split=long.split.map({"train_robust_acc": "train (robust)", "test_pgd_acc": "test (PGD)"}))
    plt, sns = _pyplot()
    grid = sns.relplot(data=long, kind="line", x="epoch", y="accuracy", hue="Method", style="split", col="arch",
                       errorbar="sd", height=3.2, aspect=1.1)
    grid.set_axis_labels("epoch", "robust accuracy (%)")
    for axis in grid.axes.flat:
        axis.xaxis.set_major_locator(plt.MaxNLocator(integer=True))  # epochs are whole numbers
    return _save(grid.figure, figures_dir, "robust_acc_per_epoch")


def figure_heatmap(runs: pd.DataFrame, figures_dir: Path, skipped: list[str]) -> list[Path]:
    """Seed-mean PGD-10 robust accuracy over the α × b grid, one heatmap per arch (rows) and method (columns)."""
    if runs.lr.nunique() < 2 or runs.batch_size.nunique() < 2:
        skipped.append("heatmap_lr_batch: the study does not vary both α and b")
        return []
    if _varies_variant(runs):
        skipped.append("heatmap_lr_batch: the study also sweeps other settings; see sweep_sensitivity")
        return []
    if runs[ROBUST_COLUMN].isna().all():
        skipped.append("heatmap_lr_batch: no run has a PGD-10 result")
        return []
    plt, sns = _pyplot()
    archs, methods = _ordered(runs.arch), _methods(runs)
    figure, axes = plt.subplots(len(archs), len(methods), figsize=(4.2 * len(methods), 3.2 * len(archs)),
                                squeeze=False)
    means = seed_stats(runs, ROBUST_COLUMN)
    for i, arch in enumerate(archs):
        for j, method in enumerate(methods):
            subset = means[(means.arch == arch) & (means.method == method)]
            table = (100 * subset.pivot(index="batch_size", columns="lr", values="mean")).sort_index(ascending=False)
            sns.heatmap(table, annot=True, fmt=".1f", cmap="viridis", ax=axes[i][j],
                        cbar_kws={"label": "PGD-10 robust acc. (%)"})
            axes[i][j].set(title=f"{arch} {METHOD_LABELS[method]}", xlabel="α", ylabel="b")
    figure.tight_layout()
    return _save(figure, figures_dir, "heatmap_lr_batch")


def figure_sweep_heatmap(runs: pd.DataFrame, figures_dir: Path, skipped: list[str]) -> list[Path]:
    """Seed-mean PGD-10 robust accuracy over a two-axis sweep (e.g. k1 × k2), one heatmap per arch and method."""
    axes_names = [c[len("sweep_"):] for c in runs.columns if c.startswith("sweep_")]
    if len(axes_names) != 2:
        skipped.append(f"heatmap_sweep: needs exactly two sweep axes, the study has {len(axes_names)}")
        return []
    if runs.lr.nunique() > 1 or runs.batch_size.nunique() > 1:
        skipped.append("heatmap_sweep: the study also varies α or b; see sweep_sensitivity")
        return []
    data = _robust_percent(runs)
    if data.empty:
        skipped.append("heatmap_sweep: no run has a PGD-10 result")
        return []
    plt, sns = _pyplot()
    panels = _ordered(zip(data.arch, data.method))
    figure, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.4), squeeze=False)
    row_key, column_key = (f"sweep_{name}" for name in axes_names)
    for axis, (arch, method) in zip(axes[0], panels):
        subset = data[(data.arch == arch) & (data.method == method)]
        table = subset.pivot_table(index=row_key, columns=column_key, values="robust", aggfunc="mean")
        sns.heatmap(table.sort_index(ascending=False), annot=True, fmt=".1f", cmap="viridis", ax=axis,
                    cbar_kws={"label": "PGD-10 robust acc. (%)"})
        axis.set(title=f"{arch} {METHOD_LABELS[method]} α={data.lr.iloc[0]:g}", xlabel=axes_names[1],
                 ylabel=axes_names[0])
    figure.tight_layout()
    return _save(figure, figures_dir, "heatmap_sweep")


def figure_accuracy_vs_ratio(runs: pd.DataFrame, figures_dir: Path, skipped: list[str]) -> list[Path]:
    """Robust accuracy against α/b (the paper's claim, which it tested only at b = 128). Grid points that share an
    α/b ratio with a different (α, b) are ringed and joined: if α/b alone set robustness they would coincide."""
    data = _robust_percent(runs)
    if data.batch_size.nunique() < 2:
        skipped.append("robust_acc_vs_lr_over_b: one batch size, α/b is α rescaled (see robust_acc_vs_lr)")
        return []
    point_keys = ["arch", "method", "Method", "variant", "lr", "batch_size", "batch", "ratio"]
    means = data.groupby(point_keys, as_index=False).robust.mean()
    plt, sns = _pyplot()
    from matplotlib import ticker

    grid = sns.relplot(data=means, kind="scatter", x="ratio", y="robust", hue="Method", hue_order=_labels(means),
                       style="batch", col="arch", s=50, height=3.2, aspect=1.1)
    equal_ratio_points = 0
    for arch, axis in grid.axes_dict.items():
        for _, group in means[means.arch == arch].groupby(["method", "variant", means.ratio.round(12)]):
            if group.batch_size.nunique() < 2:
                continue
            equal_ratio_points += len(group)
            axis.plot(group.ratio, group.robust, color="0.3", linestyle=":", linewidth=1)
            axis.scatter(group.ratio, group.robust, s=160, facecolors="none", edgecolors="black", linewidths=1,
                         label="_equal α/b")
        axis.set_xscale("log")
        # Ticks at 1, 2 and 5 per decade: matplotlib's labelled minor ticks overlap on a range this short.
        axis.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        axis.xaxis.set_major_formatter(ticker.LogFormatterSciNotation(labelOnlyBase=False))
        axis.xaxis.set_minor_formatter(ticker.NullFormatter())
    if equal_ratio_points:
        grid.figure.text(0.01, -0.02, "ringed and joined: same α/b from different (α, b)", fontsize=8)
    else:
        log.info("robust_acc_vs_lr_over_b: no two grid points share α/b; nothing to ring")
    grid.set_axis_labels("α / b", "PGD-10 robust test acc. (%)")
    return _save(grid.figure, figures_dir, "robust_acc_vs_lr_over_b")


# ---------------------------------------------------------------------------------------------- report


def build_report(manifest: dict, tables_dir: str | Path, figures_dir: str | Path,
                 runs_root: str | Path = ".") -> list[Path]:
    """Write every table, figure and summary.json of one study; returns the files written.

    ``runs_root`` is the directory that relative run directories in the manifest are relative to (the repository
    root)."""
    tables_dir, figures_dir = Path(tables_dir), Path(figures_dir)
    tables_dir.mkdir(parents=True, exist_ok=True)
    figures_dir.mkdir(parents=True, exist_ok=True)
    study = manifest["study"]
    runs, epochs = load_runs(manifest, runs_root)
    protocol = protocol_lines(manifest, runs)
    skipped: list[str] = []

    built = {}
    for metric in EVAL_METRICS:
        for checkpoint in CHECKPOINTS:
            if runs[f"eval_{checkpoint}_{metric}"].isna().all() and metric == "aa_acc":
                skipped.append(f"table2_aa_{checkpoint}: aa_acc is null or absent in every run")
                continue
            built[f"table2_{EVAL_METRICS[metric][0]}_{checkpoint}"] = accuracy_table(runs, metric, checkpoint)
    built["equal_effective_step"] = equal_step_table(runs)
    built["table3_correlation"] = correlation_table(runs)
    built["table4_paired_ttest"] = paired_ttest_table(runs)
    built["robust_overfitting"] = robust_overfitting_table(runs)
    if _varies_variant(runs):
        built["sweep_sensitivity"] = sweep_table(runs)
    if manifest.get("paper_reference"):
        for checkpoint in CHECKPOINTS:
            built[f"paper_comparison_{checkpoint}"] = paper_comparison_table(runs, checkpoint)

    written = []
    for table, _ in built.values():
        written += write_table(table, protocol, study, tables_dir)
    runs_csv = tables_dir / "runs.csv"
    runs.to_csv(runs_csv, index=False)
    written.append(runs_csv)

    written += figure_accuracy_vs_lr(runs, figures_dir, skipped)
    written += figure_robust_per_epoch(runs, epochs, figures_dir, skipped)
    written += figure_heatmap(runs, figures_dir, skipped)
    written += figure_accuracy_vs_ratio(runs, figures_dir, skipped)
    if _varies_variant(runs):
        written += figure_sweep_heatmap(runs, figures_dir, skipped)
    for note in skipped:
        log.info("study %s: skipped %s", study, note)

    summary = {
        "study": study,
        "paper_reference": bool(manifest.get("paper_reference")),
        "runs": {"expected": len(runs), "with_metrics": int((runs.metrics_problem == "").sum()),
                 "with_eval": int((runs.eval_problem == "").sum()),
                 "missing": [f"{run_label(r)} ({'; '.join(p for p in (r.metrics_problem, r.eval_problem) if p)})"
                             for r in runs.itertuples() if r.metrics_problem or r.eval_problem]},
        **{name: records for name, (_, records) in built.items()},
        "skipped": skipped,
    }
    summary_path = tables_dir / "summary.json"
    summary_path.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    written.append(summary_path)
    return written


# ---------------------------------------------------------------------------------------------- CLI


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Tables, statistics and figures of studies, from per-run "
                                     "metrics.json / eval.json (no training).", add_help=add_help)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--manifest", nargs="+", type=Path, metavar="PATH",
                        help="study manifest(s) written by the workflow; run dirs are relative to the current "
                             "directory (the repository root)")
    source.add_argument("--results-dir", type=Path, metavar="DIR",
                        help="regenerate every study found as DIR/studies/*/manifest.json; run dirs are relative "
                             "to DIR's parent")
    parser.add_argument("--tables-dir", default=None,
                        help="where tables go; '{study}' is replaced by the study name "
                             "(default: <results>/tables/{study}, <results> = --results-dir or 'results')")
    parser.add_argument("--figures-dir", default=None,
                        help="where figures go; '{study}' is replaced (default: <results>/figures/{study})")
    return parser


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.results_dir is not None:
        manifest_paths = sorted(args.results_dir.glob("studies/*/manifest.json"))
        if not manifest_paths:
            raise ValueError(f"--results-dir {args.results_dir}: no studies/*/manifest.json under it")
        results_root, runs_root = args.results_dir, args.results_dir.parent
    else:
        manifest_paths, results_root, runs_root = args.manifest, Path("results"), Path(".")
    tables_template = args.tables_dir or str(results_root / "tables" / "{study}")
    figures_template = args.figures_dir or str(results_root / "figures" / "{study}")
    for name, template in (("--tables-dir", tables_template), ("--figures-dir", figures_template)):
        if len(manifest_paths) > 1 and "{study}" not in template:
            raise ValueError(f"{name} {template!r}: several studies need '{{study}}' in the path")

    for path in manifest_paths:
        manifest = load_manifest(path)
        study = manifest["study"]
        written = build_report(manifest, tables_template.format(study=study), figures_template.format(study=study),
                               runs_root)
        log.info("study %s: wrote %d files under %s and %s", study, len(written),
                 tables_template.format(study=study), figures_template.format(study=study))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
