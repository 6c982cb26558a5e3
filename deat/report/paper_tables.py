"""The paper's tables from a study's runs: Table 2 (accuracy per α), Table 3 (correlation with α and α/b), Table 4
(DEAT − PGD-AT: per α, α as the unit, the paper's pooled t-test) with its method × α ANOVA, and our numbers beside
the paper's own Table 2. Each builder returns ``(Table, list[dict])`` (see ``table_helpers``)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from . import statistics
from .formatting import MASKED, MISSING, PARTIAL, format_delta, format_mean_std, format_p, json_value, ordered, records
from .loading import CHECKPOINTS, EVAL_METRICS, POINT_KEYS, label_of, methods_of
from .render import Table
from .table_helpers import (VARIANT_NOTE, comparison_groups, curve_keys, delta_words, evaluation_notes, grid_rows,
                            headline_metrics, masked_points, masked_runs, metric_words, missing_note, objective_label,
                            outer_step_words, pairs_of, partial_note, seeds_words, varies_batch_size, varies_variant)

PAPER_TABLE2_CSV = Path(__file__).resolve().parent.parent / "paper_table2.csv"

# ------------------------------------------------------------------------------------------------ Table 2


def accuracy_table(runs: pd.DataFrame, metric: str, checkpoint: str) -> tuple[Table, list[dict]]:
    """Table 2 analogue: rows α (and b), columns arch × method plus Δ = DEAT − PGD-AT per arch."""
    column = f"eval_{checkpoint}_{metric}"
    point_stats = statistics.seed_stats(runs, column)
    lookup = {tuple(r[k] for k in POINT_KEYS): r for r in point_stats.to_dict("records")}
    masked = masked_points(runs, checkpoint) if metric != "clean_acc" else set()
    archs, methods, varies_batch = ordered(runs.arch), methods_of(runs), varies_batch_size(runs)
    pairs = pairs_of(runs)
    delta_labels = ["Δ"] if len(pairs) == 1 else [f"Δ {objective_label(objective)}" for objective, _, _ in pairs]

    by_variant = varies_variant(runs)
    key_columns = (["variant"] if by_variant else []) + (["α", "b"] if varies_batch else ["α"])
    labels = [label_of(runs, m) for m in methods] + delta_labels
    columns = key_columns + [f"{arch} {label}" for arch in archs for label in labels]
    groups = [("", len(key_columns))] + [(arch, len(labels)) for arch in archs]
    subcolumns = key_columns + labels * len(archs)

    rows, deltas = [], []
    for variant, lr, batch_size in grid_rows(runs):
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
        notes.append(f"Δ = {delta_words(runs, *pairs[0][1:])}, difference of the seed means (percentage points).")
    elif pairs:
        notes.append("; ".join(f"{label} = {delta_words(runs, baseline, treatment)}" for label, (_, baseline,
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
    if not varies_batch_size(runs):
        notes.append("One batch size: α/b is α rescaled, so its correlations equal those with α.")
    groups = [("", 4), ("vs α", 3), ("vs α/b", 3)]
    subcolumns = columns[:4] + list(tests.values()) * 2
    caption = f"Table 3 analogue: correlation of {words} with the learning rate α and with α/b"
    return Table("table3_correlation", caption, columns, rows, notes, groups, subcolumns), summary


# ------------------------------------------------------------------------------------------------ Table 4



def paired_table(runs: pd.DataFrame) -> tuple[Table, list[dict]]:
    """Table 4 analogue: Δ = DEAT − PGD-AT per α with a 95 % confidence interval over the pairs at that α, the
    t-test with α as the unit, and the paper's pooled paired t-test over all (α, b, seed) pairs, labelled so.
    A study with several objectives run with both outer steps gets these rows per objective (Δ = TRADES + DEAT −
    TRADES, ...), under an objective column."""
    pairs = pairs_of(runs)
    if not pairs:
        return Table("table4_paired_ttest", "Table 4 analogue: needs both DEAT and PGD-AT runs", ["arch"], [],
                     empty_message="The study does not run both methods."), []
    lead, per_variant, comparisons = comparison_groups(runs, pairs)
    columns = lead + ["arch", "metric", "checkpoint", "α", "pairs", "mean Δ (pp)",
                      f"{statistics.CONFIDENCE:.0%} CI (pp)", "t", "p"]
    rows, summary = [], []
    for baseline, treatment, subset, head, tag in comparisons:
        paired = subset[subset.method.isin([baseline, treatment])]
        for arch in ordered(subset.arch):
            for metric in headline_metrics(runs):
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
        delta = delta_words(runs, *pairs[0][1:])
    else:
        who = ("runs of one objective with DEAT's outer step and with SGD-momentum ("
               + "; ".join(f"{label_of(runs, t)} and {label_of(runs, b)}" for _, b, t in pairs) + ")")
        delta = outer_step_words()
    notes.append(f"Pairs: {who} of the same arch, α, b and seed; Δ = {delta} in percentage points. Per α: mean Δ "
                 f"with a {statistics.CONFIDENCE:.0%} t-interval over the pairs at that α ({MISSING}: fewer than 2 "
                 "pairs). α as the unit: one-sample t-test of the per-α means against 0. Pooled (paper's test): "
                 "scipy.stats.ttest_rel over every pair, as if the pairs were interchangeable; it overstates the "
                 "evidence when Δ changes with α (see table4_anova).")
    if per_variant:
        notes.append(VARIANT_NOTE)
    caption = (f"Table 4 analogue: Δ = {delta_words(runs, *pairs[0][1:])}" if len(pairs) == 1 else
               f"Table 4 analogue per objective: Δ = {outer_step_words()}") + \
        " per α with a confidence interval, and paired t-tests"
    return Table("table4_paired_ttest", caption, columns, rows, notes,
                 empty_message="No matched DEAT/PGD-AT pairs with results."), summary


def anova_table(runs: pd.DataFrame) -> tuple[Table, list[dict]]:
    """Method × α two-way ANOVA (statsmodels) per arch, metric and checkpoint, with a one-line reading of which
    effects the grid supports at the 5 % level; the methods are one objective's SGD-momentum and DEAT runs, per
    objective the study runs with both (PGD-AT and DEAT in the paper's grid)."""
    pairs = pairs_of(runs)
    lead, per_variant, comparisons = comparison_groups(runs, pairs)
    columns = lead + ["arch", "metric", "checkpoint", "effect", "df", "F", "p"]
    rows, summary, readings = [], [], []
    for baseline, treatment, subset, head, tag in comparisons:
        for arch in ordered(subset.arch):
            for metric in headline_metrics(runs):
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



def load_paper_table2(path: str | Path = PAPER_TABLE2_CSV) -> pd.DataFrame:
    """The paper's Table 2 (percent) as columns alpha, arch, method, robust_acc."""
    return pd.read_csv(path, comment="#")


def paper_comparison_table(runs: pd.DataFrame, checkpoint: str) -> tuple[Table, list[dict]]:
    """Our PGD-10 robust test accuracy beside the paper's Table 2 number for the same arch, method and α."""
    paper = load_paper_table2()
    paper_lookup = {(r.arch, r.method, round(r.alpha, 9)): r.robust_acc for r in paper.itertuples()}
    point_stats = statistics.seed_stats(runs, f"eval_{checkpoint}_pgd10_acc")
    lookup = {tuple(r[k] for k in POINT_KEYS): r for r in point_stats.to_dict("records")}
    masked = masked_points(runs, checkpoint)
    varies_batch, methods, by_variant = varies_batch_size(runs), methods_of(runs), varies_variant(runs)
    columns = ["arch"] + (["variant"] if by_variant else []) + ["α"] + (["b"] if varies_batch else [])
    for method in methods:
        label = label_of(runs, method)
        columns += [f"{label} ours", f"{label} paper", f"{label} ours − paper"]
    rows, summary = [], []
    for arch in ordered(runs.arch):
        for variant, lr, batch_size in grid_rows(runs[runs.arch == arch]):
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
