"""Every table of a study as display strings (``render.Table``) plus its summary records (numbers, fractions).

Each builder takes the runs frame of ``loading.load_runs`` and returns ``(Table, list[dict])``. The numbers come
from ``statistics``; this module decides rows, columns, captions and footnotes: a missing value is "—" with a
footnote naming the run, a mean over fewer seeds than the study asks is marked "‡", and a number from a
checkpoint whose evaluation flagged gradient masking is marked "†" with the run and the flag named.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pandas as pd

from . import statistics
from .formatting import (MASKED, MISSING, PARTIAL, format_decay, format_delta, format_mean_std, format_p,
                         format_percent, json_value, ordered, point_label, records, run_label)
from .loading import (BASELINE, CHECKPOINTS, EVAL_METRICS, OBJECTIVE_LABELS, OUTER_STEP_LABELS, POINT_KEYS, TREATMENT,
                      label_of, method_label, methods_of, objective_pairs, study_aa_label, study_pgd_label)
from .render import Table

EQUAL_STEP_RTOL = 0.01  # "equal effective step": within 1 % relative (math.isclose semantics)
MATCHED_WORDS = {True: "step + decay", False: "step only", None: MISSING}
VARIANT_NOTE = ("Per sweep variant: a run the swept setting does not change (PGD-AT under a DEAT-only setting) is "
                "listed under every variant, so pooling the variants would count it more than once.")
DECAY_NOTE = ("Decay: the per-step shrink of the weights by weight decay alone, θ ← θ·(1 − d) (deat.effective."
              "effective_decay of the run's settings, else metrics.json's effective_decay): coupled decay is a "
              "gradient, so d = effective step × wd; DEAT's decoupled decay (PNM's default) is d = α·wd whatever k1. "
              "matched: \"step + decay\" where both agree within 1 %, \"step only\" where the decays differ, "
              f"so that Δ there mixes the outer step with a different regularisation; {MISSING} where a run's decay "
              "is unknown (no weight_decay in its metrics.json or the study's settings).")


def decays_match(baseline: float, treatment: float) -> bool | None:
    """Whether two effective decays agree within EQUAL_STEP_RTOL, as a pair's effective steps must to be paired at
    all (then the pair is matched in step and decay); None where either is unknown (NaN)."""
    if pd.isna(baseline) or pd.isna(treatment):
        return None
    return math.isclose(baseline, treatment, rel_tol=EQUAL_STEP_RTOL, abs_tol=1e-15)

PAPER_TABLE2_CSV = Path(__file__).resolve().parent.parent / "paper_table2.csv"
ROBUST_COLUMN = "eval_best_pgd10_acc"  # the paper's Table 2 metric: PGD-10 robust test accuracy, best checkpoint


def metric_words(metric: str, runs: pd.DataFrame) -> str:
    """"PGD-10 robust test accuracy", "clean test accuracy", "APGD-CE + APGD-T robust test accuracy"."""
    return {"pgd10_acc": "PGD-10 robust", "clean_acc": "clean",
            "aa_acc": f"{study_aa_label(runs)} robust"}[metric] + " test accuracy"


def seeds_words(runs: pd.DataFrame) -> str:
    """", mean ± std over seeds" when some grid point has ≥ 2 seeds, else ", one seed"."""
    most = runs.groupby(POINT_KEYS, sort=False).seed.nunique().max() if len(runs) else 0
    return ", mean ± std over seeds" if most >= 2 else ", one seed"


def pairs_of(runs: pd.DataFrame) -> list[tuple[str, str, str]]:
    """(objective, SGD-momentum method, DEAT method) of every objective the study runs with both outer steps;
    [("pgd_at", "pgd_at", "deat")] for the paper's comparison."""
    return objective_pairs(methods_of(runs))


def _has_delta(runs: pd.DataFrame) -> bool:
    return bool(pairs_of(runs))


def _delta_words(runs: pd.DataFrame, baseline: str = BASELINE, treatment: str = TREATMENT) -> str:
    return f"{label_of(runs, treatment)} − {label_of(runs, baseline)}"


def objective_label(objective: str) -> str:
    return OBJECTIVE_LABELS.get(objective, objective)


# A study that pairs one objective keeps the paper's layout (Δ = DEAT − PGD-AT); one that pairs several shows an
# objective column, names Δ by the outer steps and tags each summary record with its comparison.
def _objective_column(pairs: list) -> list[str]:
    return ["objective"] if len(pairs) > 1 else []


def _objective_cell(pairs: list, objective: str) -> list[str]:
    return [objective_label(objective)] if len(pairs) > 1 else []


def _comparison_record(pairs: list, baseline: str, treatment: str) -> dict:
    return {"comparison": f"{treatment}_minus_{baseline}"} if len(pairs) > 1 else {}


def _outer_step_words() -> str:
    return f"{OUTER_STEP_LABELS['deat']} − {OUTER_STEP_LABELS['sgd']}"


def _varies_batch(runs: pd.DataFrame) -> bool:
    return runs.batch_size.nunique() > 1


def varies_variant(runs: pd.DataFrame) -> bool:
    return runs.variant.nunique() > 1


def variant_groups(runs: pd.DataFrame) -> list[tuple[str | None, pd.DataFrame]]:
    """[(None, runs)], unless one run directory appears under several sweep variants (a method that does not read
    the swept setting, as PGD-AT under a sweep of DEAT's decay): then [(variant, its runs)] per variant, since a
    test pooled over the variants would count that run once per variant, as if they were independent replicates."""
    if varies_variant(runs) and runs.dir.duplicated().any():
        return [(variant, runs[runs.variant == variant]) for variant in ordered(runs.variant)]
    return [(None, runs)]


def _comparison_groups(runs: pd.DataFrame, pairs: list) -> tuple[list[str], bool, list[tuple]]:
    """What Table 4 and its ANOVA iterate over: the leading column names (objective, variant where they vary),
    whether the tests are made per sweep variant (variant_groups), and per (objective, variant group) its
    baseline and treatment methods, its runs, its leading cells and its summary-record tag."""
    groups = variant_groups(runs)
    per_variant = groups[0][0] is not None
    lead = _objective_column(pairs) + (["variant"] if per_variant else [])
    items = [(baseline, treatment, subset, _objective_cell(pairs, objective) + ([variant] if per_variant else []),
              {**_comparison_record(pairs, baseline, treatment), **({"variant": variant} if per_variant else {})})
             for (objective, baseline, treatment), (variant, subset) in itertools.product(pairs, groups)]
    return lead, per_variant, items


def curve_keys(runs: pd.DataFrame) -> list[tuple[str, str, str]]:
    """(arch, method, variant) in arch, method and variant order: one curve over (α, b) each."""
    return [(arch, method, variant) for arch in ordered(runs.arch) for method in methods_of(runs)
            for variant in ordered(runs.variant[runs.method == method])]


def _grid_rows(runs: pd.DataFrame) -> list[tuple[str, float, int]]:
    """(variant, α, b) of every grid point, variants in manifest order."""
    order = {variant: i for i, variant in enumerate(ordered(runs.variant))}
    return sorted(set(zip(runs.variant, runs.lr, runs.batch_size)), key=lambda v: (order[v[0]], v[1], v[2]))


# ------------------------------------------------------------------------------------------------ footnotes


def missing_note(runs: pd.DataFrame, columns: list[str]) -> list[str]:
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


def partial_note(point_stats: pd.DataFrame, runs: pd.DataFrame) -> list[str]:
    partial = point_stats[(point_stats.n > 0) & (point_stats.n < point_stats.n_expected)]
    if partial.empty:
        return []
    items = [f"{point_label(r.arch, label_of(runs, r.method), r.lr, r.batch_size, r.variant)} "
             f"(n={r.n} of {r.n_expected} seeds)" for r in partial.itertuples()]
    return [f"{PARTIAL} mean over fewer seeds than the study asks: " + "; ".join(items) + "."]


def masked_runs(runs: pd.DataFrame, checkpoints=CHECKPOINTS) -> pd.DataFrame:
    """Runs whose evaluation of one of ``checkpoints`` flagged gradient masking."""
    flagged = np.zeros(len(runs), dtype=bool)
    for checkpoint in checkpoints:
        flagged |= (runs[f"eval_{checkpoint}_masking"] != "").to_numpy()
    return runs[flagged]


def evaluation_notes(runs: pd.DataFrame, checkpoints=CHECKPOINTS, with_skipped: bool = True) -> list[str]:
    """† footnote naming every run/checkpoint whose evaluation flagged gradient masking, and the attacks the
    evaluation skipped (eval.json ``masking_flags`` / ``skipped_attacks``)."""
    notes, masked, skipped = [], [], []
    for row in runs.itertuples():
        for checkpoint in checkpoints:
            if getattr(row, f"eval_{checkpoint}_masking"):
                masked.append(f"{run_label(row)} {checkpoint}: {getattr(row, f'eval_{checkpoint}_masking')}")
            if with_skipped and getattr(row, f"eval_{checkpoint}_skipped"):
                skipped.append(f"{run_label(row)} {checkpoint}: {getattr(row, f'eval_{checkpoint}_skipped')}")
    if masked:
        notes.append(f"{MASKED} gradient-masking signature in the evaluation (robust accuracy may be overstated): "
                     + "; ".join(masked) + ".")
    if skipped:
        notes.append("Attacks not run: " + "; ".join(skipped) + ".")
    return notes


def _masked_points(runs: pd.DataFrame, checkpoint: str) -> set[tuple]:
    return {tuple(getattr(r, k) for k in POINT_KEYS) for r in masked_runs(runs, [checkpoint]).itertuples()}


# ------------------------------------------------------------------------------------------------ Table 2


def accuracy_table(runs: pd.DataFrame, metric: str, checkpoint: str) -> tuple[Table, list[dict]]:
    """Table 2 analogue: rows α (and b), columns arch × method plus Δ = DEAT − PGD-AT per arch."""
    column = f"eval_{checkpoint}_{metric}"
    point_stats = statistics.seed_stats(runs, column)
    lookup = {tuple(r[k] for k in POINT_KEYS): r for r in point_stats.to_dict("records")}
    masked = _masked_points(runs, checkpoint) if metric != "clean_acc" else set()
    archs, methods, varies_batch = ordered(runs.arch), methods_of(runs), _varies_batch(runs)
    pairs = pairs_of(runs)
    delta_labels = ["Δ"] if len(pairs) == 1 else [f"Δ {objective_label(objective)}" for objective, _, _ in pairs]

    by_variant = varies_variant(runs)
    key_columns = (["variant"] if by_variant else []) + (["α", "b"] if varies_batch else ["α"])
    labels = [label_of(runs, m) for m in methods] + delta_labels
    columns = key_columns + [f"{arch} {label}" for arch in archs for label in labels]
    groups = [("", len(key_columns))] + [(arch, len(labels)) for arch in archs]
    subcolumns = key_columns + labels * len(archs)

    rows, deltas = [], []
    for variant, lr, batch_size in _grid_rows(runs):
        cells = ([variant] if by_variant else []) + [f"{lr:g}"] + ([str(batch_size)] if varies_batch else [])
        for arch in archs:
            point = {m: lookup.get((arch, m, variant, lr, batch_size)) for m in methods}
            for method, p in point.items():
                text = "" if p is None else format_mean_std(p["mean"], p["std"], p["n"], p["n_expected"])
                flagged = (arch, method, variant, lr, batch_size) in masked and text not in ("", MISSING)
                cells.append(text + (MASKED if flagged else ""))
            for _, baseline, treatment in pairs:
                before, after = point[baseline], point[treatment]
                delta = float("nan") if before is None or after is None else after["mean"] - before["mean"]
                partial = before is not None and after is not None and (
                    0 < before["n"] < before["n_expected"] or 0 < after["n"] < after["n_expected"])
                cells.append(format_delta(delta) + (PARTIAL if partial and not pd.isna(delta) else ""))
                deltas.append({"method": f"{treatment}_minus_{baseline}", "arch": arch, "variant": variant,
                               "lr": lr, "batch_size": batch_size, "delta_acc": delta})
        rows.append(cells)

    notes = missing_note(runs, [column]) + partial_note(point_stats, runs)
    notes += evaluation_notes(runs, [checkpoint], with_skipped=metric == "aa_acc") if metric != "clean_acc" else []
    if any("" in row for row in rows):
        notes.append("Blank: not a grid point of this study.")
    if len(pairs) == 1:
        notes.append(f"Δ = {_delta_words(runs, *pairs[0][1:])}, difference of the seed means (percentage points).")
    elif pairs:
        notes.append("; ".join(f"{label} = {_delta_words(runs, baseline, treatment)}" for label, (_, baseline,
                     treatment) in zip(delta_labels, pairs)) + ": DEAT's outer step − SGD-momentum under one "
                     "objective, differences of the seed means (percentage points).")
    caption = (f"Table 2 analogue: {metric_words(metric, runs)} (%) of the {checkpoint} checkpoint"
               f"{seeds_words(runs)}")
    summary = [{"metric": metric, "checkpoint": checkpoint, **r} for r in records(
        point_stats.rename(columns={"mean": "mean_acc", "std": "std_acc", "n": "n_seeds",
                                    "n_expected": "n_seeds_expected"}))]
    summary += [{"metric": metric, "checkpoint": checkpoint, **r} for r in records(pd.DataFrame(deltas))]
    return Table(f"table2_{EVAL_METRICS[metric]}_{checkpoint}", caption, columns, rows, notes, groups,
                 subcolumns), summary


# ------------------------------------------------------------------------------------------------ Table 3


def correlation_table(runs: pd.DataFrame, metric: str = "pgd10_acc") -> tuple[Table, list[dict]]:
    """Table 3 analogue: Pearson r, Spearman ρ, Kendall τ of the seed-mean accuracy per grid point with α and with
    α/b (the paper's claim is about α/b; it only varied α), p-values exact or by permutation at small n."""
    words = metric_words(metric, runs)
    tests = {"pearson": "Pearson r", "spearman": "Spearman ρ", "kendall": "Kendall τ"}
    columns = ["arch", "method", "checkpoint", "points"] + [f"{name} vs {x}" for x in ("α", "α/b")
                                                            for name in tests.values()]
    rows, summary, undefined, sizes = [], [], {}, set()
    for arch, method, variant in curve_keys(runs):
        subset = runs[(runs.arch == arch) & (runs.method == method) & (runs.variant == variant)]
        for checkpoint in CHECKPOINTS:
            point_stats = statistics.seed_stats(subset, f"eval_{checkpoint}_{metric}")
            present = point_stats[point_stats.n > 0]
            partial = (present.n < present.n_expected).any()
            label = label_of(runs, method) + (f" {variant}" if variant else "")
            cells = [arch, label, checkpoint,
                     (f"{len(present)}" if len(present) == len(point_stats)
                      else f"{len(present)} of {len(point_stats)}") + (PARTIAL if partial else "")]
            y = present["mean"].to_numpy()
            for x_name, x in (("lr", present.lr.to_numpy()),
                              ("lr_over_batch", (present.lr / present.batch_size).to_numpy())):
                for test, name in tests.items():
                    statistic, p = statistics.correlation(x, y, test)
                    if pd.isna(statistic):
                        few = len(x) < statistics.MIN_CORRELATION_POINTS
                        why = (f"fewer than {statistics.MIN_CORRELATION_POINTS} grid points with a result" if few
                               else "undefined for constant input")
                        undefined.setdefault(why, []).append(f"{arch} {label} {checkpoint}")
                        text = MISSING + ("ᵃ" if few else "ᵇ")
                    else:
                        text = f"{statistic:.3f} (p={format_p(p)})"
                        sizes.add(len(x))
                    cells.append(text)
                    summary.append({"arch": arch, "method": method, "variant": variant, "checkpoint": checkpoint,
                                    "x": x_name, "test": test, "statistic": json_value(statistic),
                                    "p": json_value(p), "n_points": len(present)})
            rows.append(cells)
    notes = []
    for why, items in undefined.items():
        marker = "ᵃ" if why.startswith("fewer") else "ᵇ"
        notes.append(f"{MISSING}{marker} {why}: " + ", ".join(ordered(items)) + ".")
    p_words = "; ".join(f"n={n}: {statistics.p_value_method(n)}" for n in sorted(sizes))
    notes.append(f"Correlation of the seed-mean {words} per grid point (α, b) with α and with α/b. p: two-sided, "
                 f"from a permutation test of no association ({p_words}; Kendall: scipy's exact distribution "
                 "where there are no ties), not the large-sample approximation. Points: grid points with a result"
                 f" ({PARTIAL}: some seed-means over fewer seeds than the study asks).")
    if not _varies_batch(runs):
        notes.append("One batch size: α/b is α rescaled, so its correlations equal those with α.")
    groups = [("", 4), ("vs α", 3), ("vs α/b", 3)]
    subcolumns = columns[:4] + list(tests.values()) * 2
    caption = f"Table 3 analogue: correlation of {words} with the learning rate α and with α/b"
    return Table("table3_correlation", caption, columns, rows, notes, groups, subcolumns), summary


# ------------------------------------------------------------------------------------------------ Table 4


def _headline_metrics(runs: pd.DataFrame) -> list[str]:
    return [metric for metric in EVAL_METRICS
            if any(runs[f"eval_{c}_{metric}"].notna().any() for c in CHECKPOINTS)]


def paired_table(runs: pd.DataFrame) -> tuple[Table, list[dict]]:
    """Table 4 analogue: Δ = DEAT − PGD-AT per α with a 95 % confidence interval over the pairs at that α, the
    t-test with α as the unit, and the paper's pooled paired t-test over all (α, b, seed) pairs, labelled so.
    A study with several objectives run with both outer steps gets these rows per objective (Δ = TRADES + DEAT −
    TRADES, ...), under an objective column."""
    pairs = pairs_of(runs)
    if not pairs:
        return Table("table4_paired_ttest", "Table 4 analogue: needs both DEAT and PGD-AT runs", ["arch"], [],
                     empty_message="The study does not run both methods."), []
    lead, per_variant, comparisons = _comparison_groups(runs, pairs)
    columns = lead + ["arch", "metric", "checkpoint", "α", "pairs", "mean Δ (pp)",
                      f"{statistics.CONFIDENCE:.0%} CI (pp)", "t", "p"]
    rows, summary = [], []
    for baseline, treatment, subset, head, tag in comparisons:
        paired = subset[subset.method.isin([baseline, treatment])]
        for arch in ordered(subset.arch):
            for metric in _headline_metrics(runs):
                for checkpoint in CHECKPOINTS:
                    column = f"eval_{checkpoint}_{metric}"
                    if subset[column].isna().all():
                        continue
                    matched, n_matches = statistics.matched_pairs(subset, column, arch, baseline, treatment)
                    words = metric_words(metric, runs).replace(" test accuracy", "")
                    flag = MASKED if metric != "clean_acc" and len(masked_runs(paired[paired.arch == arch],
                                                                                [checkpoint])) else ""
                    where = head + [arch, words + flag, checkpoint]
                    key = {**tag, "arch": arch, "metric": metric, "checkpoint": checkpoint}
                    per_alpha = statistics.delta_per_alpha(matched)
                    for r in per_alpha.itertuples():
                        interval = (MISSING if pd.isna(r.ci_low)
                                    else f"[{100 * r.ci_low:+.2f}, {100 * r.ci_high:+.2f}]")
                        rows.append(where + [f"{r.lr:g}", str(r.n_pairs), format_delta(r.mean_delta), interval,
                                             "", ""])
                        summary.append({**key, "test": "per_alpha", "lr": r.lr, "n_pairs": r.n_pairs,
                                        "mean_delta_acc": json_value(r.mean_delta), "ci_low": json_value(r.ci_low),
                                        "ci_high": json_value(r.ci_high)})
                    t, p = statistics.alpha_as_unit_ttest(per_alpha)
                    rows.append(where + ["α as the unit", f"{len(per_alpha)} α",
                                         format_delta(per_alpha.mean_delta.mean() if len(per_alpha)
                                                      else float("nan")),
                                         "", MISSING if pd.isna(t) else f"{t:.2f}", format_p(p)])
                    summary.append({**key, "test": "alpha_as_unit", "n_alphas": len(per_alpha), "t": json_value(t),
                                    "p": json_value(p)})
                    differences = statistics.paired_differences(matched).to_numpy()
                    mean = differences.mean() if len(differences) else float("nan")
                    t, p = statistics.pooled_paired_ttest(matched)
                    pairs_text = f"{len(matched)}" + ("" if len(matched) == n_matches
                                                      else f" of {n_matches}{PARTIAL}")
                    rows.append(where + ["pooled (paper's test)", pairs_text, format_delta(mean), "",
                                         MISSING if pd.isna(t) else f"{t:.2f}", format_p(p)])
                    summary.append({**key, "test": "pooled_paired", "n_pairs": len(matched),
                                    "n_pairs_expected": n_matches, "mean_delta_acc": json_value(mean),
                                    "t": json_value(t), "p": json_value(p)})
    notes = []
    if any(PARTIAL in row[columns.index("pairs")] for row in rows):
        notes.append(f"{PARTIAL} pairs with a run missing are left out (see the Table 2 footnotes for which).")
    notes += evaluation_notes(runs[runs.method.isin([m for _, *pair in pairs for m in pair])], with_skipped=False)
    if len(pairs) == 1:
        who = f"{label_of(runs, pairs[0][2])} and {label_of(runs, pairs[0][1])} runs"
        delta = _delta_words(runs, *pairs[0][1:])
    else:
        who = ("runs of one objective with DEAT's outer step and with SGD-momentum ("
               + "; ".join(f"{label_of(runs, t)} and {label_of(runs, b)}" for _, b, t in pairs) + ")")
        delta = _outer_step_words()
    notes.append(f"Pairs: {who} of the same arch, α, b and seed; Δ = {delta} in percentage points. Per α: mean Δ "
                 f"with a {statistics.CONFIDENCE:.0%} t-interval over the pairs at that α ({MISSING}: fewer than 2 "
                 "pairs). α as the unit: one-sample t-test of the per-α means against 0. Pooled (paper's test): "
                 "scipy.stats.ttest_rel over every pair, as if the pairs were interchangeable; it overstates the "
                 "evidence when Δ changes with α (see table4_anova).")
    if per_variant:
        notes.append(VARIANT_NOTE)
    caption = (f"Table 4 analogue: Δ = {_delta_words(runs, *pairs[0][1:])}" if len(pairs) == 1 else
               f"Table 4 analogue per objective: Δ = {_outer_step_words()}") + \
        " per α with a confidence interval, and paired t-tests"
    return Table("table4_paired_ttest", caption, columns, rows, notes,
                 empty_message="No matched DEAT/PGD-AT pairs with results."), summary


def anova_table(runs: pd.DataFrame) -> tuple[Table, list[dict]]:
    """Method × α two-way ANOVA (statsmodels) per arch, metric and checkpoint, with a one-line reading of which
    effects the grid supports at the 5 % level; the methods are one objective's SGD-momentum and DEAT runs, per
    objective the study runs with both (PGD-AT and DEAT in the paper's grid)."""
    pairs = pairs_of(runs)
    lead, per_variant, comparisons = _comparison_groups(runs, pairs)
    columns = lead + ["arch", "metric", "checkpoint", "effect", "df", "F", "p"]
    rows, summary, readings = [], [], []
    for baseline, treatment, subset, head, tag in comparisons:
        for arch in ordered(subset.arch):
            for metric in _headline_metrics(runs):
                for checkpoint in CHECKPOINTS:
                    column = f"eval_{checkpoint}_{metric}"
                    effects = statistics.method_by_alpha_anova(subset[subset.arch == arch], column, baseline,
                                                               treatment)
                    if effects.empty:
                        continue
                    words = metric_words(metric, runs).replace(" test accuracy", "")
                    for e in effects.itertuples():
                        rows.append(head + [arch, words, checkpoint, e.effect, f"{e.df:g}",
                                            "" if pd.isna(e.F) else f"{e.F:.2f}", "" if e.effect == "residual"
                                            else format_p(e.p)])
                        summary.append({**tag, "arch": arch, "metric": metric, "checkpoint": checkpoint,
                                        "effect": e.effect, "df": json_value(e.df), "F": json_value(e.F),
                                        "p": json_value(e.p)})
                    supported = [e.effect for e in effects.itertuples() if e.effect != "residual" and e.p < 0.05]
                    meaning = (" (Δ depends on α: read it per α, not as one pooled number)"
                               if "method × α" in supported else "")
                    readings.append(" ".join(head + [f"{arch} {words} {checkpoint}: "])
                                    + (("p < 0.05 for " + ", ".join(supported)) if supported
                                       else "no effect at p < 0.05") + meaning + ".")
    notes = ["Two-way ANOVA of accuracy (%) on method × α, with b and sweep variant as additive blocks where the "
             "study varies them: statsmodels ols + anova_lm (type II). The method × α row appears only where "
             "replicates (seeds or batch sizes) leave residual degrees of freedom for it; a significant interaction "
             "means the difference between the methods depends on α, so a single pooled Δ does not summarise it."]
    notes += ["Reading: " + " ".join(readings)] if readings else []
    notes += [VARIANT_NOTE] if per_variant else []
    caption = "Table 4 analogue, model: which effects (method, α, method × α) the grid supports"
    return Table("table4_anova", caption, columns, rows, notes,
                 empty_message="The design cannot be fitted (needs both methods at ≥ 2 α and residual degrees of "
                               "freedom)."), summary


# ------------------------------------------------------------------------------------------------ other tables


def equal_step_table(runs: pd.DataFrame) -> tuple[Table, list[dict]]:
    """DEAT vs SGD-momentum at equal effective step (not equal α), per objective run with both outer steps (DEAT
    vs PGD-AT in the paper's grid): runs of the same arch, b, seed and sweep variant whose effective steps agree
    within 1 % relative, with each one's effective decay and whether the pair matches it too. Equal α is not an
    equal step (SGD momentum 0.9: ≈10α; DEAT: ≈0.45α), nor an equal step an equal decay. The accuracy compared is
    the study's headline: PGD-10 robust test accuracy, or clean test accuracy where training has no attack.

    Returns the table and summary records: one per pair ("kind": "pair") and, for pairings with ≥ 2 seeds, the
    mean Δ with its CONFIDENCE t-interval over seeds ("kind": "mean_over_seeds"), each naming its "metric"."""
    pairs = pairs_of(runs)
    metric = "clean_acc" if len(runs) and (runs.train_pgd_steps == 0).all() else "pgd10_acc"
    words = metric_words(metric, runs)
    present = set(runs.method)
    if len(pairs) > 1:
        base, treat = OUTER_STEP_LABELS["sgd"], OUTER_STEP_LABELS["deat"]
    else:  # one pair, or none (the paper's names on an empty table)
        _, baseline, treatment = (pairs or [("pgd_at", BASELINE, TREATMENT)])[0]
        base = label_of(runs, baseline) if baseline in present else method_label(baseline)
        treat = label_of(runs, treatment) if treatment in present else method_label(treatment)
    with_variant = varies_variant(runs)
    columns = _objective_column(pairs) + ["arch", "b", "seed"] + (["variant"] if with_variant else []) + [
        f"α {base}", f"α {treat}", "effective step", f"decay {base}", f"decay {treat}", "matched",
        f"{base} best", f"{treat} best", "Δ best", f"{base} last", f"{treat} last", "Δ last"]
    rows, summary, members, deltas = [], [], [], {}
    for objective, baseline, treatment in pairs:
        sgd_runs, deat_runs = runs[runs.method == baseline], runs[runs.method == treatment]
        for sgd in sgd_runs.sort_values(["arch", "batch_size", "lr", "seed"]).itertuples():
            same = ((deat_runs.arch == sgd.arch) & (deat_runs.batch_size == sgd.batch_size)
                    & (deat_runs.seed == sgd.seed))
            if sgd.variant:  # a swept study lists an SGD run its sweep does not change under every variant
                same &= deat_runs.variant == sgd.variant
            for deat in deat_runs[same].itertuples():
                if not math.isclose(sgd.effective_step, deat.effective_step, rel_tol=EQUAL_STEP_RTOL):
                    continue
                members += [sgd.Index, deat.Index]
                decay_matched = decays_match(sgd.effective_decay, deat.effective_decay)
                cells = _objective_cell(pairs, objective) + [sgd.arch, str(sgd.batch_size), str(sgd.seed)] + (
                    [deat.variant] if with_variant else []) + [
                    f"{sgd.lr:g}", f"{deat.lr:g}", f"{sgd.effective_step:.4g}", format_decay(sgd.effective_decay),
                    format_decay(deat.effective_decay), MATCHED_WORDS[decay_matched]]
                pairing = {"kind": "pair", **_comparison_record(pairs, baseline, treatment), "metric": metric,
                           "arch": sgd.arch, "batch_size": sgd.batch_size,
                           **({"variant": deat.variant} if with_variant else {}),
                           f"lr_{baseline}": sgd.lr, f"lr_{treatment}": deat.lr}
                record = {**pairing, "seed": sgd.seed,
                          f"effective_step_{baseline}": sgd.effective_step,
                          f"effective_step_{treatment}": deat.effective_step,
                          f"effective_decay_{baseline}": sgd.effective_decay,
                          f"effective_decay_{treatment}": deat.effective_decay, "decay_matched": decay_matched}
                group = deltas.setdefault((objective, baseline, treatment, deat.variant, sgd.lr, deat.lr,
                                           sgd.arch, sgd.batch_size, decay_matched),
                                          {"record": {**pairing, "decay_matched": decay_matched},
                                           **{checkpoint: [] for checkpoint in CHECKPOINTS}})
                for checkpoint in CHECKPOINTS:
                    column = f"eval_{checkpoint}_{metric}"
                    before, after = getattr(sgd, column), getattr(deat, column)
                    masked = {run: metric != "clean_acc" and getattr(run, f"eval_{checkpoint}_masking")
                              for run in (sgd, deat)}  # masking concerns robust accuracy only
                    cells += [format_percent(before) + (MASKED if masked[sgd] else ""),
                              format_percent(after) + (MASKED if masked[deat] else ""),
                              format_delta(after - before)]
                    record.update({f"{baseline}_{checkpoint}_acc": before, f"{treatment}_{checkpoint}_acc": after})
                    group[checkpoint].append(after - before)
                rows.append(cells)
                summary.append({key: json_value(value) for key, value in record.items()})

    interval_words = f"{statistics.CONFIDENCE:.0%} CI"
    mean_notes = []
    for (objective, baseline, treatment, variant, lr_sgd, lr_deat, arch, batch_size, decay_matched), group in \
            deltas.items():
        by_checkpoint = {c: [v for v in group[c] if not pd.isna(v)] for c in CHECKPOINTS}
        if max(map(len, by_checkpoint.values())) < 2:  # one seed (or one evaluated pair): the rows say it all
            continue
        record, parts = {**group["record"], "kind": "mean_over_seeds"}, []
        for checkpoint, values in by_checkpoint.items():
            mean, low, high = statistics.mean_with_interval(values)
            record.update({f"n_pairs_{checkpoint}": len(values), f"mean_delta_{checkpoint}": mean,
                           f"ci_low_{checkpoint}": low, f"ci_high_{checkpoint}": high})
            seeds = f"{len(values)} seed{'s' * (len(values) != 1)}"
            parts.append(f"Δ {checkpoint} {format_delta(mean)} ("
                         + (f"{interval_words} {format_delta(low)} to {format_delta(high)}, " if not pd.isna(low)
                            else "") + f"{seeds})")
        summary.append({key: json_value(value) for key, value in record.items()})
        mean_notes.append(f"{arch} b={batch_size}{' ' + variant if variant else ''}, {label_of(runs, baseline)} "
                          f"α={lr_sgd:g} vs {label_of(runs, treatment)} α={lr_deat:g} "
                          f"({MATCHED_WORDS[decay_matched]}): " + "; ".join(parts) + ".")

    notes = []
    if rows:
        in_pairs = runs.loc[sorted(set(members))]
        notes += missing_note(in_pairs, [f"eval_{checkpoint}_{metric}" for checkpoint in CHECKPOINTS])
        notes += evaluation_notes(in_pairs, with_skipped=False) if metric != "clean_acc" else []
        notes.append(DECAY_NOTE)
    if len(pairs) > 1:
        notes.append("Effective step: step per unit gradient, lr/(1−m) for SGD with momentum m and "
                     "lr/√((1+k1)²+k1²) for DEAT's outer step, whatever the objective (deat.effective, from each "
                     f"run's settings); {words} (%) per run, Δ = {_outer_step_words()} under the same "
                     "objective (pp).")
        caption = f"{treat} vs {base} per objective at equal effective step (within 1 %), {words} (%) per run"
    else:
        notes.append(f"Effective step: step per unit gradient, lr/(1−m) for {base} with SGD momentum m and "
                     f"lr/√((1+k1)²+k1²) for {treat} (deat.effective, from each run's settings); {words} "
                     f"(%) per run, Δ = {treat} − {base} (pp).")
        caption = f"{treat} vs {base} at equal effective step (within 1 %), {words} (%) per run"
    if with_variant:
        notes.append("Pairs are formed within a sweep variant; a run the variant's setting does not change (PGD-AT "
                     "under a DEAT-only setting) is the same run under every variant.")
    if mean_notes:
        notes.append(f"Mean Δ over the seeds of each pairing, with a {statistics.CONFIDENCE:.0%} t-interval over "
                     "its per-seed Δ (scipy.stats.ttest_1samp): " + " ".join(mean_notes))
    scope = "of one objective (same arch, b, seed)" if len(pairs) > 1 else "(same arch, b, seed)"
    empty = f"No {treat}/{base} pair {scope} in this study has effective steps within 1 % of each other."
    return Table("equal_effective_step", caption, columns, rows, notes, empty_message=empty), summary


# ------------------------------------------------------------------------------------------------ objectives

# Catastrophic overfitting (Wong et al. 2020, fast AT): robust accuracy falls to near zero within an epoch or two.
# A run collapsed when its final epoch's test PGD accuracy is below COLLAPSE_FINAL_BELOW although an earlier epoch
# reached more than COLLAPSE_PEAK_ABOVE (training's per-epoch evaluation, metrics.json).
COLLAPSE_FINAL_BELOW, COLLAPSE_PEAK_ABOVE = 0.05, 0.20
COLLAPSE_OBJECTIVE = "fast_at"


def objective_row_label(row) -> str:
    """A method as the objectives table names it: "TRADES + DEAT", "PGD-AT + AWP" (awp_gamma > 0), its sweep
    variant after it."""
    return row.label + (" + AWP" if row.awp_gamma > 0 else "") + (f" {row.variant}" if row.variant else "")


def catastrophic_overfitting(runs: pd.DataFrame) -> tuple[list[str], list[dict]]:
    """Per fast AT run: eval.json's PGD-10 of the best and last checkpoints and their gap, and training's
    per-epoch test PGD accuracy at its peak, final and minimum epochs, with the collapse rule applied; a footnote
    (empty without fast AT runs) and records for summary.json."""
    fast = runs[runs.objective == COLLAPSE_OBJECTIVE] if "objective" in runs else runs.iloc[:0]
    if fast.empty:
        return [], []
    attack = "/".join(f"PGD-{k}" for k in ordered(fast.train_eval_pgd_steps.dropna().astype(int))) or "PGD"
    items, summary = [], []
    for row in fast.itertuples():
        gap = row.eval_best_pgd10_acc - row.eval_last_pgd10_acc
        collapsed = bool(row.metrics_final_test_pgd_acc < COLLAPSE_FINAL_BELOW
                         and row.metrics_max_test_pgd_acc > COLLAPSE_PEAK_ABOVE)
        items.append(f"{run_label(row)}: PGD-10 best {format_percent(row.eval_best_pgd10_acc)}, last "
                     f"{format_percent(row.eval_last_pgd10_acc)} (best − last {format_delta(gap)}); per epoch peak "
                     f"{format_percent(row.metrics_max_test_pgd_acc)}, final "
                     f"{format_percent(row.metrics_final_test_pgd_acc)}, minimum "
                     f"{format_percent(row.metrics_min_test_pgd_acc)}: "
                     + ("collapsed" if collapsed else "no collapse"))
        summary.append({"arch": row.arch, "method": row.method, "variant": row.variant, "lr": row.lr,
                        "batch_size": row.batch_size, "seed": row.seed,
                        **{key: json_value(getattr(row, key)) for key in (
                            "eval_best_pgd10_acc", "eval_last_pgd10_acc", "metrics_max_test_pgd_acc",
                            "metrics_final_test_pgd_acc", "metrics_min_test_pgd_acc")},
                        "collapsed": collapsed})
    note = (f"Catastrophic overfitting of fast AT (Wong et al. 2020): a run collapsed when its final epoch's test "
            f"{attack} accuracy (training's per-epoch evaluation, metrics.json) is below "
            f"{100 * COLLAPSE_FINAL_BELOW:g} % although its peak epoch was above {100 * COLLAPSE_PEAK_ABOVE:g} %. "
            "PGD-10 best/last: eval.json, best and last checkpoints; accuracies in %, gap in pp. "
            + "; ".join(items) + ".")
    return [note], summary


def objectives_table(runs: pd.DataFrame) -> tuple[Table, list[dict]]:
    """The study's methods side by side (TRADES, MART, fast AT, each with SGD-momentum or DEAT's outer step, AWP
    where used): clean, PGD-10, PGD-k×R and AutoAttack accuracy of the best and last checkpoints (eval.json), and
    the cost of a training epoch (metrics.json: epoch_time_s and images_per_s, mean over epochs, on the device
    named); mean ± sd over seeds per grid point, with the catastrophic-overfitting footnote for fast AT runs."""
    metrics = {"clean_acc": "clean", "pgd10_acc": "PGD-10", "pgd_acc": study_pgd_label(runs),
               "aa_acc": study_aa_label(runs)}
    varies_arch, varies_batch = runs.arch.nunique() > 1, _varies_batch(runs)
    key_columns = (["arch"] if varies_arch else []) + ["method", "α"] + (["b"] if varies_batch else [])
    cost_columns = ["epoch time (s)", "images/s", "device"]
    columns = key_columns + [f"{checkpoint} {name}" for checkpoint in CHECKPOINTS for name in metrics.values()] \
        + cost_columns
    groups = [("", len(key_columns))] + [(checkpoint, len(metrics)) for checkpoint in CHECKPOINTS] + \
        [("cost per training epoch", len(cost_columns))]
    subcolumns = key_columns + list(metrics.values()) * len(CHECKPOINTS) + cost_columns

    value_columns = [f"eval_{c}_{m}" for c in CHECKPOINTS for m in metrics] + ["mean_epoch_time_s",
                                                                               "mean_images_per_s"]
    point_stats = {column: {tuple(r[k] for k in POINT_KEYS): r
                            for r in statistics.seed_stats(runs, column).to_dict("records")}
                   for column in value_columns}
    masked = {checkpoint: _masked_points(runs, checkpoint) for checkpoint in CHECKPOINTS}
    arch_rank = {arch: i for i, arch in enumerate(ordered(runs.arch))}
    method_rank = {method: i for i, method in enumerate(methods_of(runs))}
    rows, summary = [], []
    # Per arch, methods in METHOD_LABELS order (each objective, then it with DEAT), grid points as they come.
    for key, members in sorted(runs.groupby(POINT_KEYS, sort=False),
                               key=lambda item: (arch_rank[item[0][0]], method_rank[item[0][1]])):
        point = next(members.itertuples())
        cells = ([point.arch] if varies_arch else []) + [objective_row_label(point), f"{point.lr:g}"] + \
            ([str(point.batch_size)] if varies_batch else [])
        record = {"arch": point.arch, "method": point.method, "objective": point.objective,
                  "outer_step": point.outer_step, "awp_gamma": point.awp_gamma, "variant": point.variant,
                  "lr": point.lr, "batch_size": point.batch_size}
        for checkpoint in CHECKPOINTS:
            for metric in metrics:
                stat = point_stats[f"eval_{checkpoint}_{metric}"][key]
                text = format_mean_std(stat["mean"], stat["std"], stat["n"], stat["n_expected"])
                flagged = metric != "clean_acc" and key in masked[checkpoint] and text != MISSING
                cells.append(text + (MASKED if flagged else ""))
                record.update({f"{checkpoint}_{metric}_mean": stat["mean"],
                               f"{checkpoint}_{metric}_std": stat["std"], f"{checkpoint}_{metric}_n_seeds": stat["n"]})
        for column, digits in (("mean_epoch_time_s", 1), ("mean_images_per_s", 0)):
            stat = point_stats[column][key]
            cells.append(format_mean_std(stat["mean"], stat["std"], stat["n"], stat["n_expected"], scale=1.0,
                                         digits=digits))
            record.update({column: stat["mean"], column.replace("mean_", "std_", 1): stat["std"]})
        devices = ordered(members.device_name.fillna(members.device).dropna())
        cells.append(", ".join(devices) or MISSING)
        record["device"] = ", ".join(devices) or None
        rows.append(cells)
        summary.append({k: json_value(v) for k, v in record.items()})

    eval_columns = [c for c in value_columns if c.startswith("eval_")]
    notes = missing_note(runs, eval_columns) + evaluation_notes(runs)
    untimed = runs[runs[["mean_epoch_time_s", "mean_images_per_s"]].isna().any(axis=1)]
    if len(untimed):
        notes.append(f"{MISSING} cost: no per-epoch epoch_time_s / images_per_s in metrics.json for "
                     + "; ".join(f"{run_label(row)} ({row.metrics_problem or 'older metrics.json'})"
                                 for row in untimed.itertuples()) + ".")
    collapse_notes, _ = catastrophic_overfitting(runs)
    notes += collapse_notes
    awp = runs[runs.awp_gamma > 0]
    if len(awp):
        notes.append("+ AWP: adversarial weight perturbation (Wu et al. 2020), γ = "
                     + ", ".join(f"{g:g}" for g in ordered(awp.awp_gamma)) + ".")
    notes.append(f"Accuracy (%) on the evaluation's test examples{seeds_words(runs)}; "
                 f"{metrics['pgd_acc']}: PGD with k steps and R restarts (eval.json settings). Cost per training "
                 "epoch: metrics.json's epoch_time_s and images_per_s (the training pass, without the per-epoch "
                 "evaluation), mean over epochs, then over seeds; device from metrics.json's environment. Times "
                 "compare only between runs on the same device under the same load.")
    caption = "Objectives side by side: accuracy (%) of the best and last checkpoints and cost per training epoch"
    return Table("objectives", caption, columns, rows, notes, groups, subcolumns), summary


def robust_overfitting_table(runs: pd.DataFrame) -> tuple[Table, list[dict]]:
    """Per run, from training's own per-epoch evaluation (metrics.json): best − last robust test accuracy, and
    beside it the final epoch's running training accuracy under the training attack. The two final-epoch
    numbers are not measured alike (running average during the epoch under PGD-K training attack vs end of epoch
    under the test attack), so no difference of them is printed."""
    train_steps = ordered(runs.train_pgd_steps.dropna().astype(int))
    test_steps = ordered(runs.train_eval_pgd_steps.dropna().astype(int))
    attack = "/".join(f"PGD-{k}" for k in train_steps) or "PGD-K"
    test_attack = "/".join(f"PGD-{k}" for k in test_steps) or "PGD"
    train_column = f"final train robust acc (running, training attack {attack})"
    test_column = f"final test robust acc (end of epoch, {test_attack})"
    columns = ["arch", "method", "α", "b", "seed", "best epoch", f"best test {test_attack}",
               f"last test {test_attack}", "best − last", f"peak test {test_attack} (epoch)", "peak − best",
               train_column, test_column]
    rows = []
    # Peak − best only where best was chosen on robust accuracy too (training with an attack); a study without one
    # picks best on clean accuracy, so its robust peak says nothing about that choice.
    chose_on_robust = runs.train_pgd_steps.fillna(1) > 0
    frame = runs.assign(best_minus_last_acc=runs.metrics_best_test_pgd_acc - runs.metrics_last_test_pgd_acc,
                        peak_minus_best_acc=(runs.metrics_max_test_pgd_acc
                                             - runs.metrics_best_test_pgd_acc).where(chose_on_robust))
    for row in frame.itertuples():
        method = row.label + (f" {row.variant}" if row.variant else "")
        peak = MISSING if pd.isna(row.peak_minus_best_acc) else format_percent(row.metrics_max_test_pgd_acc) + (
            "" if pd.isna(row.metrics_peak_epoch) else f" ({int(row.metrics_peak_epoch)})")
        rows.append([row.arch, method, f"{row.lr:g}", str(row.batch_size), str(row.seed),
                     MISSING if pd.isna(row.metrics_best_epoch) else str(int(row.metrics_best_epoch)),
                     format_percent(row.metrics_best_test_pgd_acc), format_percent(row.metrics_last_test_pgd_acc),
                     format_delta(row.best_minus_last_acc), peak, format_delta(row.peak_minus_best_acc),
                     format_percent(row.metrics_final_train_robust_acc),
                     format_percent(row.metrics_final_test_pgd_acc)])
    notes = missing_note(runs, ["metrics_best_test_pgd_acc", "metrics_last_test_pgd_acc",
                                "metrics_final_train_robust_acc", "metrics_final_test_pgd_acc"])
    notes.append(f"From metrics.json: training's own per-epoch evaluation on a fixed test subset ({test_attack}); "
                 "best epoch chosen on the validation split; best − last in percentage points (robust "
                 "overfitting: the paper's Fig. 5). Peak: the highest per-epoch test accuracy and its epoch, picked "
                 "on the test subset itself; peak − best (≥ 0 by construction) bounds from above what choosing on "
                 "the validation split gave away, since the maximum of many noisy per-epoch values is biased "
                 f"upward ({MISSING} where training had no attack and best was chosen on clean accuracy). The train "
                 f"column is the running accuracy over the final epoch's batches under the training attack "
                 f"({attack}, weights changing during the epoch), not an end-of-epoch measurement with the test "
                 "attack: it is shown beside the test column, not subtracted from it.")
    notes += catastrophic_overfitting(runs)[0]
    per_method = frame.groupby(["arch", "method", "variant"], sort=False)[["best_minus_last_acc",
                                                                          "peak_minus_best_acc"]]
    summary = records(per_method.mean().add_prefix("mean_").join(per_method.count()["best_minus_last_acc"]
                                                                  .rename("n_runs")).reset_index())
    caption = "Robust overfitting per run: best − last robust test accuracy (%), with the final training accuracy"
    return Table("robust_overfitting", caption, columns, rows, notes), summary


def sweep_table(runs: pd.DataFrame) -> tuple[Table, list[dict]]:
    """Sensitivity to a study's sweep axes (e.g. DEAT's k1 × k2): per variant the seed-mean accuracies, then per
    (arch, method, α, b) the range of the variant means and a one-way ANOVA across variants over the seeds."""
    metrics = _headline_metrics(runs) or list(EVAL_METRICS)
    columns = ["arch", "method", "α", "b", "variant", "effective step", "decay"] + [
        f"{metric_words(metric, runs).split(' test')[0]} {checkpoint}" for metric in metrics
        for checkpoint in CHECKPOINTS]
    metric_columns = [f"eval_{checkpoint}_{metric}" for metric in metrics for checkpoint in CHECKPOINTS]
    rows, summary, notes = [], [], []
    for (arch, method, lr, batch_size), curve in runs.groupby(["arch", "method", "lr", "batch_size"], sort=False):
        variants = ordered(curve.variant)
        for variant in variants:
            point = curve[curve.variant == variant]
            cells = [arch, label_of(runs, method), f"{lr:g}", str(batch_size), variant,
                     f"{point.effective_step.iloc[0]:.4g}", format_decay(point.effective_decay.iloc[0])]
            for column in metric_columns:
                values = point[column].dropna()
                cells.append(format_mean_std(values.mean(), values.std(ddof=1), len(values), len(point)))
            rows.append(cells)
        for column in metric_columns:
            groups = [curve[curve.variant == v][column].dropna().to_numpy() for v in variants]
            means = [g.mean() for g in groups if len(g)]
            f, p = statistics.oneway_anova(groups)
            spread = max(means) - min(means) if means else float("nan")
            summary.append({"arch": arch, "method": method, "lr": lr, "batch_size": batch_size, "metric": column,
                            "n_variants": len(variants), "range_of_means_acc": json_value(spread),
                            "anova_f": json_value(f), "anova_p": json_value(p)})
            if column == ROBUST_COLUMN:
                notes.append(f"{arch} {label_of(runs, method)} α={lr:g} b={batch_size}: PGD-10 best ranges "
                             f"{format_percent(min(means)) if means else MISSING}–"
                             f"{format_percent(max(means)) if means else MISSING} over {len(variants)} variants "
                             f"(range {format_delta(spread)} pp); one-way ANOVA across variants "
                             + (f"F = {f:.2f}, p = {format_p(p)}." if not pd.isna(p)
                                else f"{MISSING} (needs ≥ 2 variants with ≥ 2 seeds each)."))
    notes += missing_note(runs, metric_columns) + evaluation_notes(runs)
    notes.append(f"Accuracy (%){seeds_words(runs)}. Effective step: step per unit gradient; decay: per-step "
                 "shrink by weight decay alone (both: see equal_effective_step); at a fixed α, DEAT's k1 changes "
                 "the step, and a coupled decay, as 1/√((1+k1)²+k1²), so k1 and the step cannot be told apart "
                 "here. ANOVA: "
                 "scipy.stats.f_oneway over the seeds of each variant.")
    caption = "Sensitivity to the swept settings: accuracy per variant (%)"
    return Table("sweep_sensitivity", caption, columns, rows, notes), summary


def load_paper_table2(path: str | Path = PAPER_TABLE2_CSV) -> pd.DataFrame:
    """The paper's Table 2 (percent) as columns alpha, arch, method, robust_acc."""
    return pd.read_csv(path, comment="#")


def paper_comparison_table(runs: pd.DataFrame, checkpoint: str) -> tuple[Table, list[dict]]:
    """Our PGD-10 robust test accuracy beside the paper's Table 2 number for the same arch, method and α."""
    paper = load_paper_table2()
    paper_lookup = {(r.arch, r.method, round(r.alpha, 9)): r.robust_acc for r in paper.itertuples()}
    point_stats = statistics.seed_stats(runs, f"eval_{checkpoint}_pgd10_acc")
    lookup = {tuple(r[k] for k in POINT_KEYS): r for r in point_stats.to_dict("records")}
    masked = _masked_points(runs, checkpoint)
    varies_batch, methods, by_variant = _varies_batch(runs), methods_of(runs), varies_variant(runs)
    columns = ["arch"] + (["variant"] if by_variant else []) + ["α"] + (["b"] if varies_batch else [])
    for method in methods:
        label = label_of(runs, method)
        columns += [f"{label} ours", f"{label} paper", f"{label} ours − paper"]
    rows, summary = [], []
    for arch in ordered(runs.arch):
        for variant, lr, batch_size in _grid_rows(runs[runs.arch == arch]):
            cells = ([arch] + ([variant] if by_variant else []) + [f"{lr:g}"]
                     + ([str(batch_size)] if varies_batch else []))
            for method in methods:
                ours = lookup.get((arch, method, variant, lr, batch_size))
                reported = paper_lookup.get((arch, method, round(lr, 9)), float("nan"))
                mean = float("nan") if ours is None or ours["n"] == 0 else 100 * ours["mean"]
                shown = "" if ours is None else format_mean_std(ours["mean"], ours["std"], ours["n"],
                                                                ours["n_expected"])
                if (arch, method, variant, lr, batch_size) in masked and shown not in ("", MISSING):
                    shown += MASKED
                cells += [shown,
                          MISSING if pd.isna(reported) else f"{reported:.2f}",
                          MISSING if pd.isna(mean - reported) else f"{mean - reported:+.2f}"]
                summary.append({"arch": arch, "method": method, "lr": lr, "batch_size": batch_size,
                                "checkpoint": checkpoint, "ours_percent": json_value(mean),
                                "paper_percent": json_value(float(reported))})
            rows.append(cells)
    notes = missing_note(runs, [f"eval_{checkpoint}_pgd10_acc"]) + partial_note(point_stats, runs)
    notes += evaluation_notes(runs, [checkpoint], with_skipped=False)
    notes.append("Paper: Sun, Sinha, Zhang, KDD 2023 (arXiv 2306.02618), Table 2 (CIFAR-10, b = 128, mean of 3 "
                 f"runs); {MISSING} in the paper column: α or arch not in the paper. Ours − paper in percentage "
                 "points.")
    caption = (f"PGD-10 robust test accuracy (%), {checkpoint} checkpoint{seeds_words(runs)}: ours beside the "
               "paper's Table 2")
    return Table(f"paper_comparison_{checkpoint}", caption, columns, rows, notes), summary
