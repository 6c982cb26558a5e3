"""What every table builder shares: labels and words, which runs pair with which, sweep-variant groups, and the
footnotes (missing values, fewer seeds, gradient-masking flags).

The builders are in ``paper_tables`` (the paper's Tables 2-4 and its comparison) and ``study_tables`` (the tables
this project adds: equal effective step, objectives, robust overfitting, sweep sensitivity). Every builder takes
the runs frame of ``loading.load_runs`` and returns ``(Table, list[dict])``: display strings from numbers computed
in ``statistics``. A missing value is "—" with a footnote naming the run, a mean over fewer seeds than the study
asks is marked "‡", and a number from a checkpoint whose evaluation flagged gradient masking is marked "†" with
the run and the flag named.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd

from .formatting import (MASKED, MISSING, PARTIAL, ordered, point_label, run_label)
from .loading import (BASELINE, CHECKPOINTS, EVAL_METRICS, OBJECTIVE_LABELS, OUTER_STEP_LABELS, POINT_KEYS, TREATMENT,
                      label_of, methods_of, objective_pairs, study_aa_label)

EQUAL_STEP_RTOL = 0.01  # "equal effective step": within 1 % relative (math.isclose semantics)
ROBUST_COLUMN = "eval_best_pgd10_acc"  # the paper's Table 2 metric: PGD-10 robust test accuracy, best checkpoint
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


def has_delta(runs: pd.DataFrame) -> bool:
    return bool(pairs_of(runs))


def delta_words(runs: pd.DataFrame, baseline: str = BASELINE, treatment: str = TREATMENT) -> str:
    return f"{label_of(runs, treatment)} − {label_of(runs, baseline)}"


def objective_label(objective: str) -> str:
    return OBJECTIVE_LABELS.get(objective, objective)


# A study that pairs one objective keeps the paper's layout (Δ = DEAT − PGD-AT); one that pairs several shows an
# objective column, names Δ by the outer steps and tags each summary record with its comparison.
def objective_column(pairs: list) -> list[str]:
    return ["objective"] if len(pairs) > 1 else []


def objective_cell(pairs: list, objective: str) -> list[str]:
    return [objective_label(objective)] if len(pairs) > 1 else []


def comparison_record(pairs: list, baseline: str, treatment: str) -> dict:
    return {"comparison": f"{treatment}_minus_{baseline}"} if len(pairs) > 1 else {}


def outer_step_words() -> str:
    return f"{OUTER_STEP_LABELS['deat']} − {OUTER_STEP_LABELS['sgd']}"


def varies_batch_size(runs: pd.DataFrame) -> bool:
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


def comparison_groups(runs: pd.DataFrame, pairs: list) -> tuple[list[str], bool, list[tuple]]:
    """What Table 4 and its ANOVA iterate over: the leading column names (objective, variant where they vary),
    whether the tests are made per sweep variant (variant_groups), and per (objective, variant group) its
    baseline and treatment methods, its runs, its leading cells and its summary-record tag."""
    groups = variant_groups(runs)
    per_variant = groups[0][0] is not None
    lead = objective_column(pairs) + (["variant"] if per_variant else [])
    items = [(baseline, treatment, subset, objective_cell(pairs, objective) + ([variant] if per_variant else []),
              {**comparison_record(pairs, baseline, treatment), **({"variant": variant} if per_variant else {})})
             for (objective, baseline, treatment), (variant, subset) in itertools.product(pairs, groups)]
    return lead, per_variant, items


def curve_keys(runs: pd.DataFrame) -> list[tuple[str, str, str]]:
    """(arch, method, variant) in arch, method and variant order: one curve over (α, b) each."""
    return [(arch, method, variant) for arch in ordered(runs.arch) for method in methods_of(runs)
            for variant in ordered(runs.variant[runs.method == method])]


def grid_rows(runs: pd.DataFrame) -> list[tuple[str, float, int]]:
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


def masked_points(runs: pd.DataFrame, checkpoint: str) -> set[tuple]:
    return {tuple(getattr(r, k) for k in POINT_KEYS) for r in masked_runs(runs, [checkpoint]).itertuples()}

def headline_metrics(runs: pd.DataFrame) -> list[str]:
    return [metric for metric in EVAL_METRICS
            if any(runs[f"eval_{c}_{metric}"].notna().any() for c in CHECKPOINTS)]
