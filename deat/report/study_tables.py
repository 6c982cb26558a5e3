"""The tables this project adds to the paper's (equal effective step: ``step_tables``): each method's best setting
chosen on the validation split, the objectives side by side (with fast AT's catastrophic overfitting), robust
overfitting per run, and sensitivity to a study's sweep axes. Each builder returns ``(Table, list[dict])`` (see
``table_helpers``)."""

from __future__ import annotations

import pandas as pd

from . import statistics
from .formatting import (MASKED, MISSING, format_decay, format_delta, format_mean_std, format_p, format_percent,
                         json_value, ordered, records, run_label)
from .loading import CHECKPOINTS, EVAL_METRICS, POINT_KEYS, label_of, methods_of, study_aa_label, study_pgd_label
from .render import Table
from ..guards import DEFAULT_DROP, collapses
from .table_helpers import (ROBUST_COLUMN, evaluation_notes, headline_metrics, masked_points, metric_words,
                            missing_note, seeds_words, varies_batch_size, varies_variant)

# ------------------------------------------------------------------------------------------------ best setting


def best_setting_table(runs: pd.DataFrame, best: list[dict]) -> Table:
    """Each method's best setting (selection.best_settings: chosen on the validation split, seed means), its test
    accuracy, the setting the test accuracy would have picked, and for an SGD-momentum method the comparisons at
    that α (equal α, equal step) with their verdicts. Its records are summary.json's best_setting."""
    with_variant = varies_variant(runs)
    columns = ["arch", "method", "α", "b"] + (["variant"] if with_variant else []) + [
        "seeds", "validation acc (chosen on)", "test acc", "test would pick", "at this α / step (best checkpoint)"]
    rows = []
    for record in best:
        pick = record["test_would_pick"]
        picked = MISSING if pick is None else (f"α={pick['lr']:g} b={pick['batch_size']}"
                                               + (f" {pick['variant']}" if pick["variant"] else "")
                                               + f" ({format_percent(pick['test_acc'])})")
        verdicts = [f"equal α, {metric_words(r['metric'], runs).replace(' test accuracy', '')}: Δ {format_delta(r['mean'])} ({r['verdict']})"
                    for r in record.get("at_this_alpha", [])] + [
            f"equal step with DEAT α={r['treatment_lr']:g}: Δ {format_delta(r['mean'])} ({r['verdict']})"
            for r in record.get("at_this_step", [])]
        rows.append([record["arch"], label_of(runs, record["method"]), f"{record['lr']:g}",
                     str(record["batch_size"])] + ([record["variant"]] if with_variant else []) + [
                     str(record["n_seeds"]),
                     format_percent(record["val_acc"]), format_percent(record["test_acc"]), picked,
                     "; ".join(verdicts) or MISSING])
    chosen = best[0]["chosen_on"].split(": ", 1)[-1] if best else "the validation accuracy"
    notes = [(f"Best setting: chosen on validation, never on the test images it reports: per method the grid point "
             f"with the highest validation accuracy of the checkpoint training kept ({chosen}; ties to the first "
             "in grid order). Test acc: the "
             "evaluation's headline accuracy of the best checkpoint at that point (eval.json, seed mean). Test would "
             "pick: the point the test accuracy itself would have chosen, shown to make the winner's curse visible; "
             "nothing else in the report is chosen on it. At this α / step: the equal-α test (table4_paired_ttest) "
             "and the equal-step pairings (equal_effective_step_mean) at an SGD-momentum method's chosen α.")]
    return Table("best_setting", "Each method's best setting, chosen on the validation split", columns, rows, notes,
                 empty_message="No run has a validation accuracy in its metrics.json.")


# ------------------------------------------------------------------------------------------------ objectives

# Catastrophic overfitting (Wong et al. 2020, fast AT): robust accuracy falls to near zero within an epoch or two.
# The rule is deat.guards' (the one training warns by), applied to every epoch of the validation curve.
COLLAPSE_OBJECTIVE = "fast_at"  # listed even without a collapse: the objective known to collapse


def objective_row_label(row) -> str:
    """A method as the objectives table names it: "TRADES + DEAT", "PGD-AT + AWP" (awp_gamma > 0), its sweep
    variant after it."""
    return row.label + (" + AWP" if row.awp_gamma > 0 else "") + (f" {row.variant}" if row.variant else "")


def catastrophic_overfitting(runs: pd.DataFrame) -> tuple[list[str], list[dict]]:
    """Collapses at any epoch, by deat.guards' rule on each run's per-epoch validation PGD accuracy (the rule
    training warns by): every fast AT run is listed, collapsed or not, with eval.json's PGD-10 of its best and last
    checkpoints; a run of another method only when it collapsed. A footnote (empty when there is nothing to say)
    and records for summary.json."""
    rows = []
    for row in runs.itertuples():
        found = collapses([v for v in row.metrics_val_pgd_curve], DEFAULT_DROP) if row.metrics_val_pgd_curve else []
        if row.objective == COLLAPSE_OBJECTIVE or found:
            rows.append((row, found))
    if not rows:
        return [], []
    items, summary = [], []
    for row, found in rows:
        gap = row.eval_best_pgd10_acc - row.eval_last_pgd10_acc
        events = "; ".join(
            f"collapsed at epoch {c['epoch']} (validation PGD {format_percent(c['accuracy'])} after a best of "
            f"{format_percent(c['best_before'])} at epoch {c['best_epoch']}, lowest {format_percent(c['lowest'])}, "
            + (f"back by epoch {c['recovered_epoch']})" if c["recovered_epoch"] else "not recovered)") for c in found)
        items.append(f"{run_label(row)}: " + (events or "no collapse") + f"; PGD-10 best "
                     f"{format_percent(row.eval_best_pgd10_acc)}, last {format_percent(row.eval_last_pgd10_acc)} "
                     f"(best − last {format_delta(gap)})")
        summary.append({"arch": row.arch, "method": row.method, "variant": row.variant, "lr": row.lr,
                        "batch_size": row.batch_size, "seed": row.seed,
                        **{key: json_value(getattr(row, key)) for key in (
                            "eval_best_pgd10_acc", "eval_last_pgd10_acc", "metrics_max_test_pgd_acc",
                            "metrics_final_test_pgd_acc", "metrics_min_test_pgd_acc")},
                        "collapsed": bool(found), "collapses": [{k: json_value(v) for k, v in c.items()}
                                                                 for c in found]})
    note = (f"Catastrophic overfitting (Wong et al. 2020; deat.guards): an epoch collapsed when its validation PGD "
            f"accuracy (held-out training images, training's per-epoch evaluation) is more than "
            f"{100 * DEFAULT_DROP:g} points below the best of the epochs before it, Wong et al.'s early-stopping "
            "threshold; every such fall is listed, also one the run recovers from. PGD-10 best/last: eval.json; "
            "accuracies in %, gap in pp. " + "; ".join(items) + ".")
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
    with_memory = "peak_memory_mb" in runs and runs.peak_memory_mb.notna().any()
    cost_columns = ["epoch time (s)", "images/s"] + (["peak memory (MiB)"] if with_memory else []) + ["device"]
    columns = key_columns + [f"{checkpoint} {name}" for checkpoint in CHECKPOINTS for name in metrics.values()] \
        + cost_columns
    groups = [("", len(key_columns))] + [(checkpoint, len(metrics)) for checkpoint in CHECKPOINTS] + \
        [("cost per training epoch", len(cost_columns))]
    subcolumns = key_columns + list(metrics.values()) * len(CHECKPOINTS) + cost_columns

    cost_values = ["mean_epoch_time_s", "mean_images_per_s"] + (["peak_memory_mb"] if with_memory else [])
    value_columns = [f"eval_{c}_{m}" for c in CHECKPOINTS for m in metrics] + cost_values
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
        for column, digits in (("mean_epoch_time_s", 1), ("mean_images_per_s", 0), ("peak_memory_mb", 0))[
                :len(cost_values)]:
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
                 "compare only between runs on the same device under the same load."
                 + (" Peak memory: metrics.json's peak_memory_mb, CUDA max allocated per epoch on a GPU, the "
                    "process's peak resident set size on the CPU (FastAT_Benchmark reports the former); "
                    f"{MISSING} for runs trained before it was recorded." if with_memory else ""))
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


