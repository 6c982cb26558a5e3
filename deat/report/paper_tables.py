"""The paper's tables from a study's runs: Table 2 (accuracy per α), Table 3 (correlation with α and α/b), Table 4
(DEAT − PGD-AT: per α, α as the unit, the paper's pooled t-test) with its method × α ANOVA, and our numbers beside
the paper's own Table 2. Each builder returns ``(Table, list[dict])`` (see ``table_helpers``)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from . import comparisons, statistics
from .formatting import (MASKED, MISSING, PARTIAL, UNLIKE, format_delta, format_mean_std, format_p, json_value, ordered,
                         records)
from .loading import CHECKPOINTS, EVAL_METRICS, POINT_KEYS, label_of, methods_of
from .render import Table
from .table_helpers import (COMPARISON_COLUMNS, VARIANT_NOTE, comparison_cells, comparison_groups, comparison_notes,
                            curve_keys, delta_words, evaluation_notes, grid_rows, headline_metrics, masked_points,
                            masked_runs, metric_words, missing_note, objective_label, outer_step_words, pairs_of,
                            partial_note, seeds_words, varies_batch_size, varies_variant)

PAPER_TABLE2_CSV = Path(__file__).resolve().parent.parent / "paper_table2.csv"

# ------------------------------------------------------------------------------------------------ Table 2


def accuracy_table(runs: pd.DataFrame, metric: str, checkpoint: str) -> tuple[Table, list[dict]]:
    """Table 2 analogue: rows α (and b), columns arch × method plus Δ = DEAT − PGD-AT per arch."""
    column = f"eval_{checkpoint}_{metric}"
    point_stats = statistics.seed_stats(runs, column)
    lookup = {tuple(r[k] for k in POINT_KEYS): r for r in point_stats.to_dict("records")}
    masked = masked_points(runs, checkpoint) if metric != "clean_acc" else set()
    protocols = (runs.groupby(POINT_KEYS, sort=False).eval_protocol.agg(lambda values: set(values) - {""})
                 .to_dict() if "eval_protocol" in runs else {})
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
                unlike = len(protocols.get((arch, baseline, variant, lr, batch_size), set())
                             | protocols.get((arch, treatment, variant, lr, batch_size), set())) > 1
                cells.append(format_delta(delta) + (PARTIAL if partial and not pd.isna(delta) else "")
                             + (UNLIKE if unlike and not pd.isna(delta) else ""))
                deltas.append({"method": f"{treatment}_minus_{baseline}", "arch": arch, "variant": variant,
                               "lr": lr, "batch_size": batch_size, "delta_acc": delta})
        rows.append(cells)

    notes = missing_note(runs, [column]) + partial_note(point_stats, runs)
    notes += evaluation_notes(runs, [checkpoint], with_skipped=metric == "aa_acc") if metric != "clean_acc" else []
    if any("" in row for row in rows):
        notes.append("Blank: not a grid point of this study.")
    if any(UNLIKE in cell for row in rows for cell in row):
        notes.append(f"{UNLIKE} the two methods' evaluations at this point follow a different robust-accuracy rule or "
                     "protocol (eval.json settings, e.g. an older file's last-iterate rule against the any-iterate "
                     "rule): not like-for-like; table4_paired_ttest and equal_effective_step leave such pairs out.")
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
                for test in tests:
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



def paired_table(runs: pd.DataFrame, tests: comparisons.Comparisons | None = None) -> tuple[Table, list[dict]]:
    """Table 4 analogue: Δ = DEAT − PGD-AT per α with a 95 % confidence interval over the pairs at that α, the
    t-test with α as the unit, and the paper's pooled paired t-test over all (α, b, seed) pairs, labelled so; each
    row with n, the paired sd, the interval, the MDE at 80 % power, whether the interval excludes the paper's
    +1.2 points, raw and Holm-adjusted p and the verdict word (``comparisons``, ``power``). A study with several
    objectives run with both outer steps gets these rows per objective (Δ = TRADES + DEAT − TRADES, ...), under
    an objective column. ``tests``: the study's comparisons.all_tests (computed here when not given)."""
    pairs = pairs_of(runs)
    tests = tests or comparisons.all_tests(runs)
    lead, per_variant, _ = comparison_groups(runs, pairs)
    columns = lead + ["arch", "metric", "checkpoint", "α"] + COMPARISON_COLUMNS
    rows, summary = [], []
    for record in tests.equal_alpha:
        baseline, treatment, arch, metric = record["_baseline"], record["_treatment"], record["arch"], record["metric"]
        paired = runs[runs.method.isin([baseline, treatment]) & (runs.arch == arch)]
        if "variant" in record:
            paired = paired[paired.variant == record["variant"]]
        words = metric_words(metric, runs).replace(" test accuracy", "")
        flag = MASKED if metric != "clean_acc" and len(masked_runs(paired, [record["checkpoint"]])) else ""
        where = record["_head"] + [arch, words + flag, record["checkpoint"]]
        if record["test"] == "per_alpha":
            label, n_text = f"{record['lr']:g}", str(record["n"])
        elif record["test"] == "alpha_as_unit":
            label, n_text = "α as the unit", f"{record['n']} α"
        else:
            label = "pooled (paper's test)"
            n_text = f"{record['n']}" + ("" if record["n"] == record["n_pairs_expected"]
                                         else f" of {record['n_pairs_expected']}{PARTIAL}")
        rows.append(where + [label] + comparison_cells(record, n_text))
        summary.append(comparisons.summary_record(record))
    notes = []
    if any(PARTIAL in row[columns.index("n")] for row in rows):
        notes.append(f"{PARTIAL} pairs with a run missing are left out (see the Table 2 footnotes for which).")
    notes += evaluation_notes(runs[runs.method.isin([m for _, *pair in pairs for m in pair])], with_skipped=False)
    if len(pairs) == 1:
        who = f"{label_of(runs, pairs[0][2])} and {label_of(runs, pairs[0][1])} runs"
        delta = delta_words(runs, *pairs[0][1:])
    else:
        who = ("runs of one objective with DEAT's outer step and with SGD-momentum ("
               + "; ".join(f"{label_of(runs, t)} and {label_of(runs, b)}" for _, b, t in pairs) + ")")
        delta = outer_step_words()
    notes.append(f"Pairs: {who} of the same arch, α, b and seed whose evaluations are like-for-like; Δ = {delta} in "
                 "percentage points. Per α: the pairs at that α. α as the unit: one-sample t-test of the per-α mean "
                 "Δs against 0 (n = the α). Pooled (paper's test): every pair, as if the pairs were "
                 "interchangeable (scipy.stats.ttest_rel's t and p); it overstates the evidence when Δ changes with "
                 "α (see table4_anova).")
    notes += comparison_notes(runs, tests, "table4_paired_ttest")
    if per_variant:
        notes.append(VARIANT_NOTE)
    caption = (f"Table 4 analogue: Δ = {delta_words(runs, *pairs[0][1:])}" if len(pairs) == 1 else
               f"Table 4 analogue per objective: Δ = {outer_step_words()}") + \
        " per α with a confidence interval, and paired t-tests"
    return Table("table4_paired_ttest", caption, columns, rows, notes,
                 empty_message="No like-for-like pairs with results."), summary


def anova_table(runs: pd.DataFrame) -> tuple[Table, list[dict]]:
    """Method × α two-way ANOVA (statsmodels) per arch, metric and checkpoint, fitted only where the design
    supports it (statistics.method_by_alpha_anova), with a one-line reading of which effects the grid supports at
    the 5 % level and, where no model is shown, why; the methods are one objective's SGD-momentum and DEAT runs,
    per objective the study runs with both (PGD-AT and DEAT in the paper's grid)."""
    pairs = pairs_of(runs)
    lead, per_variant, comparisons_ = comparison_groups(runs, pairs)
    columns = lead + ["arch", "metric", "checkpoint", "effect", "df", "F", "p"]
    rows, summary, readings, not_shown, models, left_out = [], [], [], {}, {}, {}
    for baseline, treatment, subset, head, tag in comparisons_:
        for arch in ordered(subset.arch):
            for metric in headline_metrics(runs):
                for checkpoint in CHECKPOINTS:
                    column = f"eval_{checkpoint}_{metric}"
                    if subset.loc[subset.arch == arch, column].isna().all():
                        continue
                    effects, design = statistics.method_by_alpha_anova(subset[subset.arch == arch], column,
                                                                       baseline, treatment)
                    words = metric_words(metric, runs).replace(" test accuracy", "")
                    where = " ".join(head + [f"{arch} {words} {checkpoint}"])
                    for item in design["left_out"]:
                        left_out.setdefault(item, []).append(where)
                    if effects.empty:
                        not_shown.setdefault(design["why_not"], []).append(where)
                        continue
                    models.setdefault(design["model"], []).append(where)
                    for e in effects.itertuples():
                        rows.append(head + [arch, words, checkpoint, e.effect, f"{e.df:g}",
                                            "" if pd.isna(e.F) else f"{e.F:.2f}", "" if e.effect == "residual"
                                            else format_p(e.p)])
                        summary.append({**tag, "arch": arch, "metric": metric, "checkpoint": checkpoint,
                                        "model": design["model"], "effect": e.effect, "df": json_value(e.df),
                                        "F": json_value(e.F), "p": json_value(e.p)})
                    supported = [e.effect for e in effects.itertuples() if e.effect != "residual" and e.p < 0.05]
                    meaning = (" (Δ depends on α: read it per α, not as one pooled number)"
                               if "method × α" in supported else "")
                    readings.append(f"{where}: " + (("p < 0.05 for " + ", ".join(supported)) if supported
                                                    else "no effect at p < 0.05") + meaning + ".")
    notes = [("Two-way ANOVA of accuracy (%) on method × α, with b and sweep variant as additive blocks where the "
             "study varies them: statsmodels ols + anova_lm (type II). A model is fitted only where the design "
             "supports it, checked before fitting: the α values at which both methods ran (≥ 2 of them; with "
             "per-method learning rates method and α are otherwise confounded), a design matrix of full rank and "
             "residual degrees of freedom. The method × α row appears only where replicates (seeds or batch sizes) "
             "leave residual degrees of freedom for it; a significant interaction means the difference between "
             "the methods depends on α, so a single pooled Δ does not summarise it.")]
    notes += [f"Model {model}: " + "; ".join(wheres) + "." for model, wheres in models.items() if len(models) > 1]
    notes += [f"Not used: {item}: " + "; ".join(wheres) + "." for item, wheres in left_out.items()]
    notes += [f"No model shown ({why}): " + "; ".join(wheres) + "." for why, wheres in not_shown.items()]
    notes += ["Reading: " + " ".join(readings)] if readings else []
    notes += [VARIANT_NOTE] if per_variant else []
    caption = "Table 4 analogue, model: which effects (method, α, method × α) the grid supports"
    empty = "No model can be fitted: " + "; ".join(not_shown) + "." if not_shown else \
        "No model can be fitted (needs both methods at ≥ 2 shared α and residual degrees of freedom)."
    return Table("table4_anova", caption, columns, rows, notes, empty_message=empty), summary



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
