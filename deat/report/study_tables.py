"""The tables this project adds to the paper's: DEAT against SGD-momentum at equal effective step, the objectives
side by side (with fast AT's catastrophic overfitting), robust overfitting per run, and sensitivity to a study's
sweep axes. Each builder returns ``(Table, list[dict])`` (see ``table_helpers``)."""

from __future__ import annotations

import math

import pandas as pd

from . import statistics
from .formatting import (MASKED, MISSING, format_decay, format_delta, format_mean_std, format_p,
                         format_percent, json_value, ordered, records, run_label)
from .loading import (BASELINE, CHECKPOINTS, EVAL_METRICS, OUTER_STEP_LABELS, POINT_KEYS, TREATMENT,
                      label_of, method_label, methods_of, study_aa_label, study_pgd_label)
from .render import Table
from .table_helpers import (DECAY_NOTE, EQUAL_STEP_RTOL, MATCHED_WORDS, ROBUST_COLUMN, comparison_record,
                            decays_match, evaluation_notes, headline_metrics, masked_points, metric_words,
                            missing_note, objective_cell, objective_column, outer_step_words, pairs_of, seeds_words,
                            varies_batch_size, varies_variant)

# ------------------------------------------------------------------------------------------------ equal effective step


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
    columns = objective_column(pairs) + ["arch", "b", "seed"] + (["variant"] if with_variant else []) + [
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
                cells = objective_cell(pairs, objective) + [sgd.arch, str(sgd.batch_size), str(sgd.seed)] + (
                    [deat.variant] if with_variant else []) + [
                    f"{sgd.lr:g}", f"{deat.lr:g}", f"{sgd.effective_step:.4g}", format_decay(sgd.effective_decay),
                    format_decay(deat.effective_decay), MATCHED_WORDS[decay_matched]]
                pairing = {"kind": "pair", **comparison_record(pairs, baseline, treatment), "metric": metric,
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
                     f"run's settings); {words} (%) per run, Δ = {outer_step_words()} under the same "
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
    varies_arch, varies_batch = runs.arch.nunique() > 1, varies_batch_size(runs)
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
    masked = {checkpoint: masked_points(runs, checkpoint) for checkpoint in CHECKPOINTS}
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
    metrics = headline_metrics(runs) or list(EVAL_METRICS)
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


