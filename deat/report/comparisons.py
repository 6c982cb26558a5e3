"""Every DEAT-vs-baseline test a study's tables report, as records (numbers, no formatting), with the
Holm-adjusted p of its family: Table 4's tests at equal α (per α, α as the unit, the paper's pooled test) and the
equal-effective-step pairings' mean Δ over seeds (per pairing, and with the step as the unit).

Family (issue 23): per metric, every test the study's tables report for the DEAT − baseline comparison of that
metric (both checkpoints, every objective and sweep variant); the headline metric's family (PGD-10 robust, or
clean where training has no attack) holds both tables' tests. A test reported twice (the pooled test at a single
α is that α's test) counts once. Each record's ``p_holm`` is its p adjusted within its family
(``power.holm``), ``family_size`` the number of tests there.

Pairs are like-for-like only: two runs pair when their evaluations follow the same rule and protocol
(``loading.evaluation_protocol``); a match that does not is left out, and ``unlike`` names it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd

from . import power, statistics
from .formatting import ordered
from .loading import CHECKPOINTS, protocol_difference
from .table_helpers import (EQUAL_STEP_RTOL, comparison_groups, comparison_record, decays_match, headline_metrics,
                            objective_cell, pairs_of)


@dataclass
class Comparisons:
    """A study's tests: ``equal_alpha`` (Table 4 rows), ``step_pairs`` (equal_effective_step's pairs, one per
    (pairing, seed)), ``equal_step`` (their means per pairing and with the step as the unit), ``unlike`` (matches
    left out as not like-for-like: {"table", "what", "why"}) and ``families`` (metric → tests in it)."""

    equal_alpha: list[dict] = field(default_factory=list)
    step_pairs: list[dict] = field(default_factory=list)
    equal_step: list[dict] = field(default_factory=list)
    unlike: list[dict] = field(default_factory=list)
    families: dict = field(default_factory=dict)
    step_metric: str = "pgd10_acc"


def step_metric(runs: pd.DataFrame) -> str:
    """The accuracy equal_effective_step compares: PGD-10 robust, or clean where training has no attack."""
    return "clean_acc" if len(runs) and (runs.train_pgd_steps == 0).all() else "pgd10_acc"


def _record(base: dict, values, test_id: tuple) -> dict:
    return {**base, **power.describe(values), "_id": test_id}


def equal_alpha_tests(runs: pd.DataFrame) -> tuple[list[dict], list[dict]]:
    """Table 4's tests: per (objective, variant group, arch, metric, checkpoint) the per-α tests, α as the unit
    (over the per-α means) and the paper's pooled test (every pair); records carry "_head" (the leading cells),
    "_tag" (the summary tag) and "_id"; and the unlike matches."""
    records, unlike = [], []
    _lead, _per_variant, comparisons = comparison_groups(runs, pairs_of(runs))
    for baseline, treatment, subset, head, tag in comparisons:
        for arch in ordered(subset.arch):
            for (variant, lr, batch_size, seed), why in statistics.unlike_pairs(subset, arch, baseline, treatment):
                unlike.append({"table": "table4_paired_ttest", "why": why, "key": (arch, baseline, treatment),
                               "what": f"{arch} {treatment} vs {baseline} α={lr:g} b={batch_size}"
                                       + (f" {variant}" if variant else "") + f" seed {seed}"})
            for metric in headline_metrics(runs):
                for checkpoint in CHECKPOINTS:
                    column = f"eval_{checkpoint}_{metric}"
                    if subset[column].isna().all():
                        continue
                    matched, n_matches = statistics.matched_pairs(subset, column, arch, baseline, treatment)
                    if n_matches == 0:  # no like-for-like match at all: the unlike footnote names them
                        continue
                    differences = statistics.paired_differences(matched)
                    base = {**tag, "arch": arch, "metric": metric, "checkpoint": checkpoint, "_head": head,
                            "_baseline": baseline, "_treatment": treatment}
                    where = tuple(sorted(tag.items())) + (arch, metric, checkpoint)
                    by_alpha = list(differences.groupby(level="lr")) if len(differences) else []
                    means = []
                    for lr, group in by_alpha:
                        records.append(_record({**base, "test": "per_alpha", "lr": float(lr)}, group.to_numpy(),
                                               where + ("alpha", float(lr))))
                        means.append(group.mean())
                    records.append(_record({**base, "test": "alpha_as_unit", "n_alphas": len(means)}, means,
                                           where + ("alpha_as_unit",)))
                    pooled_id = where + ("alpha", float(by_alpha[0][0])) if len(by_alpha) == 1 else where + ("pooled",)
                    records.append(_record({**base, "test": "pooled_paired", "n_pairs_expected": n_matches},
                                           differences.to_numpy(), pooled_id))
    return records, unlike


def equal_step_pairs(runs: pd.DataFrame) -> tuple[list[dict], list[dict]]:
    """Runs of one objective with the two outer steps, the same arch, b, seed (and sweep variant), whose effective
    steps agree within EQUAL_STEP_RTOL and whose evaluations are like-for-like: one record per pair
    {"objective", "baseline", "treatment", "sgd", "deat" (runs-frame rows), "decay_matched"}; and the matches
    left out as not like-for-like."""
    pairs, unlike = [], []
    protocols = statistics.like_for_like(runs)
    for objective, baseline, treatment in pairs_of(runs):
        sgd_runs, deat_runs = runs[runs.method == baseline], runs[runs.method == treatment]
        for sgd in sgd_runs.sort_values(["arch", "batch_size", "lr", "seed"]).itertuples():
            same = ((deat_runs.arch == sgd.arch) & (deat_runs.batch_size == sgd.batch_size)
                    & (deat_runs.seed == sgd.seed))
            if sgd.variant:  # a swept study lists an SGD run its sweep does not change under every variant
                same &= deat_runs.variant == sgd.variant
            for deat in deat_runs[same].itertuples():
                if not math.isclose(sgd.effective_step, deat.effective_step, rel_tol=EQUAL_STEP_RTOL):
                    continue
                if protocols and sgd.eval_protocol and deat.eval_protocol and sgd.eval_protocol != deat.eval_protocol:
                    unlike.append({"table": "equal_effective_step", "key": (sgd.arch, baseline, treatment),
                                   "why": protocol_difference(sgd.eval_protocol, deat.eval_protocol),
                                   "what": f"{sgd.arch} {baseline} α={sgd.lr:g} vs {treatment} α={deat.lr:g} "
                                           f"b={sgd.batch_size}" + (f" {deat.variant}" if deat.variant else "")
                                           + f" seed {sgd.seed}"})
                    continue
                pairs.append({"objective": objective, "baseline": baseline, "treatment": treatment, "sgd": sgd,
                              "deat": deat, "decay_matched": decays_match(sgd.effective_decay, deat.effective_decay)})
    return pairs, unlike


def equal_step_tests(runs: pd.DataFrame, pairs: list[dict], metric: str) -> list[dict]:
    """Mean Δ over the seeds of each equal-step pairing with ≥ 2 evaluated seeds ("kind": "mean_over_seeds"),
    and per (objective, variant, arch, b, decay matched or not) with ≥ 2 pairings the t-interval over the
    per-pairing means ("kind": "step_as_unit"), per checkpoint."""
    all_pairs = pairs_of(runs)
    groups: dict[tuple, dict] = {}
    for pair in pairs:
        sgd, deat = pair["sgd"], pair["deat"]
        key = (pair["objective"], pair["baseline"], pair["treatment"], deat.variant, sgd.arch, sgd.batch_size,
               pair["decay_matched"], sgd.lr, deat.lr)
        group = groups.setdefault(key, {**{checkpoint: [] for checkpoint in CHECKPOINTS}, "pairs": []})
        group["pairs"].append(pair)
        for checkpoint in CHECKPOINTS:
            column = f"eval_{checkpoint}_{metric}"
            value = getattr(deat, column) - getattr(sgd, column)
            if not pd.isna(value):
                group[checkpoint].append(value)
    records, pairing_means = [], {}
    with_variant = runs.variant.nunique() > 1
    for key, group in groups.items():
        objective, baseline, treatment, variant, arch, batch_size, decay_matched, lr_sgd, lr_deat = key
        base = {**comparison_record(all_pairs, baseline, treatment), "metric": metric, "arch": arch,
                "batch_size": batch_size, **({"variant": variant} if with_variant else {}),
                "decay_matched": decay_matched, "_objective": objective, "_baseline": baseline,
                "_treatment": treatment, "_head": objective_cell(all_pairs, objective), "_pairs": group["pairs"]}
        for checkpoint in CHECKPOINTS:
            values = group[checkpoint]
            if values:
                pairing_means.setdefault(key[:7] + (checkpoint,), []).append(
                    (lr_sgd, lr_deat, sum(values) / len(values), group["pairs"]))
            if len(values) < 2:  # one seed (or one evaluated pair): equal_effective_step's rows say it all
                continue
            records.append(_record({**base, "kind": "mean_over_seeds", "checkpoint": checkpoint,
                                    f"lr_{baseline}": lr_sgd, f"lr_{treatment}": lr_deat}, values,
                                   ("step", metric, checkpoint) + key))
    for key, means in pairing_means.items():
        objective, baseline, treatment, variant, arch, batch_size, decay_matched, checkpoint = key
        if len(means) < 2:
            continue
        records.append(_record({**comparison_record(all_pairs, baseline, treatment), "metric": metric, "arch": arch,
                                "batch_size": batch_size, **({"variant": variant} if with_variant else {}),
                                "decay_matched": decay_matched, "kind": "step_as_unit", "checkpoint": checkpoint,
                                "n_pairings": len(means), f"lrs_{baseline}": [m[0] for m in means],
                                f"lrs_{treatment}": [m[1] for m in means], "_objective": objective,
                                "_baseline": baseline, "_treatment": treatment,
                                "_head": objective_cell(all_pairs, objective),
                                "_pairs": [pair for m in means for pair in m[3]]},
                               [m[2] for m in means], ("step_as_unit", metric) + key))
    return records


def all_tests(runs: pd.DataFrame) -> Comparisons:
    """Every test of the study with its family's Holm-adjusted p (see the module docstring)."""
    result = Comparisons(step_metric=step_metric(runs))
    result.equal_alpha, unlike = equal_alpha_tests(runs)
    result.step_pairs, step_unlike = equal_step_pairs(runs)
    result.unlike = unlike + step_unlike
    # The equal-step means of every accuracy the study evaluated, its headline (the pairs' metric) first.
    metrics = [result.step_metric] + [m for m in headline_metrics(runs) if m != result.step_metric]
    result.equal_step = [record for metric in metrics
                         for record in equal_step_tests(runs, result.step_pairs, metric)]
    tests = result.equal_alpha + result.equal_step
    for metric in ordered(record["metric"] for record in tests):
        members = [record for record in tests if record["metric"] == metric]
        unique = {record["_id"]: record["p"] for record in members if not pd.isna(record["p"])}
        adjusted = dict(zip(unique, power.holm(list(unique.values()))))
        for record in members:
            record["p_holm"] = adjusted.get(record["_id"], float("nan"))
            record["family_size"] = len(unique)
        result.families[metric] = {
            "size": len(unique),
            "tables": ordered(("table4_paired_ttest" if "test" in record else "equal_effective_step_mean")
                              for record in members if record["_id"] in unique)}
    return result


COUNT_NAMES = {"per_alpha": "n_pairs", "pooled_paired": "n_pairs", "alpha_as_unit": "n_alphas",
               "mean_over_seeds": "n_seeds", "step_as_unit": "n_pairings"}


def summary_record(record: dict) -> dict:
    """A test record for summary.json: its public keys ("n" named for what it counts: n_pairs, n_alphas,
    n_seeds, n_pairings; "mean" as mean_delta_acc), accuracies and differences as fractions."""
    from .formatting import json_value

    count = COUNT_NAMES[record.get("test", record.get("kind"))]
    out = {}
    for key, value in record.items():
        if key.startswith("_"):
            continue
        key = {"n": count, "mean": "mean_delta_acc"}.get(key, key)
        out[key] = value if isinstance(value, list) else json_value(value)
    return out
