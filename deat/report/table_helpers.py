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

from .formatting import MASKED, MISSING, PARTIAL, format_delta, format_p, ordered, point_label, run_label
from .loading import (BASELINE, CHECKPOINTS, EVAL_METRICS, OBJECTIVE_LABELS, OUTER_STEP_LABELS, POINT_KEYS, TREATMENT,
                      label_of, methods_of, objective_pairs, study_aa_label)
from .power import CONFIDENCE, PAPER_EFFECT, POSSIBLE_RANGE

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


# ------------------------------------------------------------------------------------------------ comparison rows

COMPARISON_COLUMNS = ["n", "mean Δ (pp)", "sd (pp)", "95% CI (pp)", "MDE 80% (pp)", "excludes +1.2", "t", "df", "p",
                      "p Holm", "verdict"]
YES_NO = {True: "yes", False: "no", None: MISSING}


def interval_text(low: float, high: float, df) -> str:
    """"[-3.70, +3.00]"; one reaching past ±100 points (a difference of accuracies cannot) also names its df,
    "[-155.08, +54.58] (df 1)": it says only that n is too small."""
    if pd.isna(low) or pd.isna(high):
        return MISSING
    text = f"[{100 * low:+.2f}, {100 * high:+.2f}]"
    return text + (f" (df {df})" if max(abs(low), abs(high)) > POSSIBLE_RANGE else "")


def comparison_cells(record: dict, n_text: str) -> list[str]:
    """The COMPARISON_COLUMNS cells of one test record (comparisons.all_tests), differences in points."""
    def number(value, digits=2):
        return MISSING if pd.isna(value) else f"{value:.{digits}f}"

    return [n_text, format_delta(record["mean"]), number(100 * record["sd"]),
            interval_text(record["ci_low"], record["ci_high"], record["df"]), number(100 * record["mde"]),
            YES_NO[record["excludes_paper"]], number(record["t"]), MISSING if record["df"] is None else str(record["df"]),
            format_p(record["p"]), format_p(record.get("p_holm", float("nan"))), record["verdict"]]


def comparison_notes(runs: pd.DataFrame, comparisons, table: str) -> list[str]:
    """Footnotes every comparison table shares: what n, sd, the interval, the MDE and the verdict are, which
    family the Holm adjustment runs over, and the matches left out as not like-for-like."""
    pairs = pairs_of(runs)
    delta = delta_words(runs, *pairs[0][1:]) if len(pairs) == 1 else outer_step_words()  # none: the generic words
    families = "; ".join(
        f"{metric_words(metric, runs).replace(' test accuracy', '')}: {family['size']} tests ("
        + " and ".join(family["tables"]) + ")" for metric, family in comparisons.families.items())
    notes = [
        (f"n: the paired differences the row's test uses (pairs of runs, α means, seeds or pairings); sd: their sample "
        f"sd (pp); {CONFIDENCE:.0%} CI: two-sided t-interval with df = n − 1 (scipy.stats.ttest_1samp), an interval "
        f"reaching past ±100 points also names its df; MDE 80%: the smallest true mean Δ a two-sided paired t-test "
        f"at 5 % detects with 80 % power at this n (statsmodels TTestPower.solve_power for the effect size, times "
        f"the sd); excludes +1.2: whether the interval leaves out the paper's claimed gain of DEAT over PGD-AT "
        f"(+{100 * PAPER_EFFECT:g} points of robust accuracy, Table 4 of Sun et al. 2023; the same yardstick for "
        f"every metric). {MISSING}: fewer than 2 differences, or "
        "an sd of 0 (every difference equal at the evaluation's resolution: the interval shrinks to the mean, t is "
        "undefined and the verdict is \"inconclusive at this size\")."),
        ("verdict: \"DEAT better\" / \"DEAT worse\" (DEAT's outer step against SGD-momentum under one objective) only "
        f"where the {CONFIDENCE:.0%} interval excludes 0; \"no difference as large as the paper's\" only where it "
        f"contains 0 and excludes +{100 * PAPER_EFFECT:g}; otherwise \"inconclusive at this size\". Verdicts read the "
        "unadjusted interval."),
        "p Holm: p adjusted by Holm's method (statsmodels multipletests, method \"holm\") within one family per "
        f"metric: every test this study's tables report for {delta} on that metric, both checkpoints, "
        "every objective and sweep variant: Table 4's per-α, α-as-the-unit and pooled tests and the equal-step "
        "pairings' tests (per pairing, and with the step as the unit) where the study compares that metric at "
        "equal step; a test shown twice (the pooled test at a single α is that α's test) counts once. "
        + (f"Families: {families}." if families else "")]
    unlike = [item for item in comparisons.unlike if item["table"] == table]
    if unlike:
        grouped: dict[str, list[str]] = {}
        for item in unlike:
            grouped.setdefault(item["why"], []).append(item["what"])
        notes.append("Left out, not like-for-like (the two runs' evaluations follow a different robust-accuracy rule "
                     "or protocol, eval.json settings; a different draw of random starts alone would not count): "
                     + "; ".join(f"{', '.join(whats)} ({why})" for why, whats in grouped.items()) + ".")
    return notes
