"""What a study's summary.json says at a glance: each method's best setting, chosen on the validation split
(never on the test images it then reports), with the comparisons at the baseline's best α; and the headline
comparisons with their range over objectives. Numbers only (fractions), for the records of ``study``."""

from __future__ import annotations

import pandas as pd

from . import comparisons
from .formatting import json_value, ordered
from .loading import POINT_KEYS, methods_of, objective_and_outer_step

PUBLIC = ("n", "mean", "sd", "df", "ci_low", "ci_high", "mde", "excludes_paper", "t", "p", "p_holm", "verdict")
ROBUST_METRICS = ("pgd10_acc", "aa_acc")


def selection_column(runs: pd.DataFrame) -> str:
    """The validation number training chose ``best.pt`` by (metrics.json best): PGD accuracy on the validation
    split, or clean accuracy where training has no attack."""
    return "metrics_best_val_clean_acc" if len(runs) and (runs.train_pgd_steps == 0).all() \
        else "metrics_best_val_pgd_acc"


def _test_column(runs: pd.DataFrame) -> str:
    return "eval_best_clean_acc" if len(runs) and (runs.train_pgd_steps == 0).all() else "eval_best_pgd10_acc"


def _brief(record: dict | None) -> dict | None:
    return None if record is None else {key: json_value(record[key]) for key in PUBLIC if key in record}


def best_settings(runs: pd.DataFrame, tests: comparisons.Comparisons) -> list[dict]:
    """Per (arch, method): the grid point (α, b, sweep variant) with the highest seed-mean validation accuracy
    of the checkpoint training kept (selection_column), ties to the first in grid order; its test accuracy
    (eval.json, best checkpoint, the study's headline metric); the point the test accuracy would have picked
    (to show the winner's curse it avoids); and, for an SGD-momentum method, the equal-α test at that α and the
    equal-step pairings whose SGD-momentum α it is (Table 4 per-α and equal_effective_step_mean records)."""
    chosen_on, tested_on = selection_column(runs), _test_column(runs)
    unique = runs.drop_duplicates("dir")  # a run listed under several sweep variants counts once
    records = []
    for arch in ordered(unique.arch):
        for method in methods_of(unique[unique.arch == arch]):
            subset = unique[(unique.arch == arch) & (unique.method == method)]
            points = subset.groupby(POINT_KEYS, sort=False).agg(
                val=(chosen_on, "mean"), test=(tested_on, "mean"), n=(chosen_on, "count")).reset_index()
            points = points.dropna(subset=["val"])
            if points.empty:
                continue
            best = points.loc[points.val.idxmax()]
            by_test = points.dropna(subset=["test"])
            test_pick = by_test.loc[by_test.test.idxmax()] if len(by_test) else None
            record = {"arch": arch, "method": method,
                      "chosen_on": f"validation split: metrics.json best.{chosen_on[len('metrics_best_'):]}, seed mean",
                      "lr": float(best.lr), "batch_size": int(best.batch_size),
                      "variant": best.variant, "n_seeds": int(best.n), "val_acc": json_value(best.val),
                      "test_acc": json_value(best.test), "test_metric": tested_on[len("eval_best_"):],
                      "test_would_pick": None if test_pick is None else {
                          "lr": float(test_pick.lr), "batch_size": int(test_pick.batch_size),
                          "variant": test_pick.variant, "test_acc": json_value(test_pick.test)}}
            if objective_and_outer_step(method)[1] == "sgd":
                equal_alpha = [r for r in tests.equal_alpha if r["_baseline"] == method and r["arch"] == arch
                               and r["test"] == "per_alpha" and r["lr"] == best.lr and r["checkpoint"] == "best"]
                record["at_this_alpha"] = [{"metric": r["metric"], **({"variant": r["variant"]} if "variant" in r
                                                                      else {}), **_brief(r)} for r in equal_alpha]
                record["at_this_step"] = [
                    {"treatment_lr": r[f"lr_{r['_treatment']}"], "decay_matched": r["decay_matched"],
                     **({"variant": r["variant"]} if "variant" in r else {}), **_brief(r)}
                    for r in tests.equal_step if r["kind"] == "mean_over_seeds" and r["_baseline"] == method
                    and r["arch"] == arch and r[f"lr_{method}"] == best.lr and r["checkpoint"] == "best"]
            records.append(record)
    return records


def headline_records(runs: pd.DataFrame, tests: comparisons.Comparisons) -> dict:
    """The comparisons a study's verdict cites: per comparison (objective, sweep variant), arch, metric and
    checkpoint the pooled equal-α test over every pair, and the range of their mean Δ over the comparisons per
    (metric, checkpoint) and per checkpoint over the robust metrics; the equal-step tests with the step as the
    unit (or the one pairing's mean where a group has a single pairing)."""
    pooled = [r for r in tests.equal_alpha if r["test"] == "pooled_paired"]

    def tag(r):
        return {key: r[key] for key in ("comparison", "variant") if key in r}

    equal_alpha = [{**tag(r), "arch": r["arch"], "metric": r["metric"], "checkpoint": r["checkpoint"], **_brief(r)}
                   for r in pooled]
    ranges = []
    for scope in [(m, c) for m in ordered(r["metric"] for r in pooled) for c in ordered(r["checkpoint"] for r in pooled)] \
            + [(ROBUST_METRICS, c) for c in ordered(r["checkpoint"] for r in pooled)]:
        metrics, checkpoint = scope
        members = [r for r in pooled if r["checkpoint"] == checkpoint and not pd.isna(r["mean"])
                   and (r["metric"] in metrics if isinstance(metrics, tuple) else r["metric"] == metrics)]
        if not members:
            continue
        ranges.append({"metric": list(metrics) if isinstance(metrics, tuple) else metrics, "checkpoint": checkpoint,
                       "n_comparisons": len(members), "min_mean_delta_acc": json_value(min(r["mean"] for r in members)),
                       "max_mean_delta_acc": json_value(max(r["mean"] for r in members)),
                       "verdicts": sorted({r["verdict"] for r in members})})
    units = [r for r in tests.equal_step if r["kind"] == "step_as_unit"]
    grouped = {tuple(r.get(k) for k in ("comparison", "variant", "arch", "batch_size", "decay_matched", "checkpoint"))
               for r in units}
    singles = [r for r in tests.equal_step if r["kind"] == "mean_over_seeds" and tuple(
        r.get(k) for k in ("comparison", "variant", "arch", "batch_size", "decay_matched", "checkpoint")) not in grouped]
    equal_step = [{**tag(r), "kind": r["kind"], "arch": r["arch"], "batch_size": r["batch_size"],
                   "decay_matched": r["decay_matched"], "metric": r["metric"], "checkpoint": r["checkpoint"],
                   **_brief(r)} for r in units + singles]
    return {"equal_alpha_pooled": equal_alpha, "equal_alpha_range": ranges, "equal_step": equal_step}
