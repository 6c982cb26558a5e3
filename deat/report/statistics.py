"""The report's statistics, as numbers (no formatting): seed means, correlations with exact or permutation
p-values at small n, the like-for-like pairs of DEAT's outer step and SGD-momentum under one objective (DEAT −
PGD-AT, the paper's; TRADES + DEAT − TRADES, ...) and the method × α two-way ANOVA where the design supports it.
The tests of the pairs (interval, MDE, Holm) are in ``power`` and ``comparisons``. Everything comes from
scipy.stats and statsmodels; accuracies are fractions.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
from scipy import stats

from .loading import BASELINE, POINT_KEYS, TREATMENT, protocol_difference

MIN_CORRELATION_POINTS = 3
# Up to 8 points all n! = 40,320 orderings are enumerated (an exact p); above, this many random orderings with a
# fixed seed, so that a rerun prints the same p.
PERMUTATIONS = 50_000
PERMUTATION_SEED = 0
CORRELATIONS = ("pearson", "spearman", "kendall")


def seed_stats(runs: pd.DataFrame, column: str) -> pd.DataFrame:
    """Per grid point: mean, sample std (ddof=1), seeds with a value (n) and seeds the study asks (n_expected)."""
    grouped = runs.groupby(POINT_KEYS, sort=False)[column]
    return pd.DataFrame({"mean": grouped.mean(), "std": grouped.std(ddof=1), "n": grouped.count(),
                         "n_expected": grouped.size()}).reset_index()


def permutation_method() -> stats.PermutationMethod:
    return stats.PermutationMethod(n_resamples=PERMUTATIONS, rng=np.random.default_rng(PERMUTATION_SEED))


def p_value_method(n: int) -> str:
    """How `correlation` gets its p for n points, in words for a footnote."""
    if math.factorial(n) <= PERMUTATIONS:
        return f"exact permutation p (all {n}! orderings)"
    return f"permutation p ({PERMUTATIONS:,} random orderings, seed {PERMUTATION_SEED})"


def correlation(x: np.ndarray, y: np.ndarray, test: str) -> tuple[float, float]:
    """(statistic, two-sided p) of Pearson r, Spearman ρ or Kendall τ.

    The p-value is a permutation test of no association (scipy's ``pearsonr(method=PermutationMethod)``, Spearman
    as Pearson on ranks): exact over all n! orderings up to n = 8, else PERMUTATIONS random orderings; Kendall's
    is scipy's exact null distribution (``kendalltau(method="exact")``), or a permutation test under ties. The
    asymptotic p of scipy's default is wrong at the grid sizes of a study (Spearman ρ = 1 from 4 points:
    asymptotic p = 0, exact p = 2/24 ≈ 0.083).
    NaN, NaN with fewer than MIN_CORRELATION_POINTS points or a constant input."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < MIN_CORRELATION_POINTS or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan"), float("nan")
    if test == "pearson":
        result = stats.pearsonr(x, y, method=permutation_method())
    elif test == "spearman":  # ρ is Pearson's r of the ranks; permuting y permutes its ranks
        result = stats.pearsonr(stats.rankdata(x), stats.rankdata(y), method=permutation_method())
    elif len(set(x)) == len(x) and len(set(y)) == len(y):  # Kendall's exact null distribution assumes no ties
        result = stats.kendalltau(x, y, method="exact")
    else:
        result = stats.permutation_test((x,), lambda xs, axis=-1: kendall_tau_b(xs, y), vectorized=True,
                                        permutation_type="pairings", n_resamples=PERMUTATIONS, batch=1000,
                                        rng=np.random.default_rng(PERMUTATION_SEED))
    return float(result.statistic), float(result.pvalue)


def kendall_tau_b(xs: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Kendall's τ-b of each row of ``xs`` (shape (..., n)) with ``y`` (n,): concordant minus discordant pairs
    over √(pairs untied in x · pairs untied in y), as scipy.stats.kendalltau; vectorised for permutation_test."""
    dx = np.sign(xs[..., :, None] - xs[..., None, :])
    dy = np.sign(y[:, None] - y[None, :])
    return (dx * dy).sum(axis=(-1, -2)) / np.sqrt((dx != 0).sum(axis=(-1, -2)) * (dy != 0).sum())


PAIR_KEYS = ["variant", "lr", "batch_size", "seed"]


def _joined(runs: pd.DataFrame, columns: list[str], arch: str, baseline: str, treatment: str) -> pd.DataFrame:
    """``columns`` of the baseline and treatment runs of one arch side by side, matched on PAIR_KEYS."""
    subset = runs[runs.arch == arch]
    sides = {method: subset[subset.method == method].set_index(PAIR_KEYS)[columns] for method in (baseline, treatment)}
    return pd.concat(sides, axis=1, join="inner")


def like_for_like(runs: pd.DataFrame) -> bool:
    """Whether the runs frame records each evaluation's protocol (loading's eval_protocol); frames built by hand
    without it pair as before."""
    return "eval_protocol" in runs


def matched_pairs(runs: pd.DataFrame, column: str, arch: str, baseline: str = BASELINE,
                  treatment: str = TREATMENT) -> tuple[pd.DataFrame, int]:
    """``treatment`` and ``baseline`` values of one arch (DEAT and PGD-AT unless named, e.g. "trades_deat" and
    "trades") matched on (variant, α, b, seed), both present (columns baseline, treatment in that order, index
    variant, lr, batch_size, seed); and how many matches the grid has. A match whose two evaluations follow a
    different rule or protocol (loading.evaluation_protocol; see unlike_pairs) is not a pair: it is in neither."""
    columns = [column] + (["eval_protocol"] if like_for_like(runs) else [])
    joined = _joined(runs, columns, arch, baseline, treatment)
    if like_for_like(runs):
        before, after = joined[(baseline, "eval_protocol")], joined[(treatment, "eval_protocol")]
        joined = joined[(before == after) | (before == "") | (after == "")]  # a missing evaluation is a missing value
    matched = pd.concat({baseline: joined[(baseline, column)], treatment: joined[(treatment, column)]}, axis=1)
    return matched.dropna(), len(matched)


def unlike_pairs(runs: pd.DataFrame, arch: str, baseline: str = BASELINE,
                 treatment: str = TREATMENT) -> list[tuple[tuple, str]]:
    """The (variant, α, b, seed) matches of one arch whose two evaluations differ in rule or protocol, each with
    what differs (loading.protocol_difference): left out of every pair."""
    if not like_for_like(runs):
        return []
    joined = _joined(runs, ["eval_protocol"], arch, baseline, treatment)
    before, after = joined[(baseline, "eval_protocol")], joined[(treatment, "eval_protocol")]
    unlike = joined[(before != after) & (before != "") & (after != "")]
    return [(key, protocol_difference(row[(baseline, "eval_protocol")], row[(treatment, "eval_protocol")]))
            for key, row in unlike.iterrows()]


def paired_differences(matched: pd.DataFrame) -> pd.Series:
    """Treatment − baseline per pair of a ``matched_pairs`` frame (its second column minus its first)."""
    return matched.iloc[:, 1] - matched.iloc[:, 0]


ANOVA_NAMES = {"C(method)": "method", "C(lr)": "α", "C(method):C(lr)": "method × α", "C(batch_size)": "b",
               "C(variant)": "variant", "Residual": "residual"}


def _full_rank_model(formula: str, data: pd.DataFrame):
    """statsmodels' ols model of ``formula`` when its design matrix has full column rank and leaves residual
    degrees of freedom, else None: a rank-deficient design (a confounded term) has no unique estimates, and
    fitting it is what makes statsmodels warn."""
    import statsmodels.formula.api as smf

    model = smf.ols(formula, data=data)
    exog = np.asarray(model.exog)
    rank = np.linalg.matrix_rank(exog)
    return model if rank == exog.shape[1] and len(exog) - rank >= 1 else None


def method_by_alpha_anova(runs: pd.DataFrame, column: str, baseline: str = BASELINE,
                          treatment: str = TREATMENT) -> tuple[pd.DataFrame, dict]:
    """Two-way ANOVA of ``column`` on method × α (type II sums of squares, statsmodels ``ols`` + ``anova_lm``),
    with batch size and sweep variant as additive blocks where the study varies them, fitted only where the
    design supports it (issue 26).

    The design is checked before anything is fitted: only the α values at which both methods ran are used (with
    per-method learning rates, method and α are otherwise confounded); with ≥ 2 such α the method × α model (the
    interaction where replicates leave residual degrees of freedom for it, else the additive one), with one the
    nothing (the method effect at that α is Table 4's paired test), with none nothing; blocks are dropped where they make the design rank-deficient.
    Where the runs' evaluations follow different rules or protocols (loading.evaluation_protocol), only the
    largest group is used. Returns the effects ("method", "α", "method × α", blocks, "residual"; columns df, F,
    p; empty when nothing can be fitted) and the design: {"model": its words, "left_out": runs not used and why,
    "why_not": why no model is shown, or ""}. The methods are ``baseline`` and ``treatment``."""
    from statsmodels.stats.anova import anova_lm

    empty = pd.DataFrame(columns=["effect", "df", "F", "p"])
    data = runs[runs.method.isin([baseline, treatment])].dropna(subset=[column])
    data = data.assign(y=100 * data[column])  # percent: readable sums of squares, same F and p
    design = {"model": "", "left_out": [], "why_not": ""}
    one_protocol = ""
    if like_for_like(data) and data.eval_protocol.nunique() > 1:
        one_protocol = " under one evaluation protocol"
        counts = data.eval_protocol.value_counts(sort=False)
        keep = counts.idxmax()
        design["left_out"].append(f"{int((data.eval_protocol != keep).sum())} runs evaluated under another rule or "
                                  "protocol than the largest group (see table4_paired_ttest)")
        data = data[data.eval_protocol == keep]
    if data.method.nunique() < 2:
        design["why_not"] = "the two methods have no results under one evaluation protocol"
        return empty, design
    alphas = {method: set(data.lr[data.method == method]) for method in (baseline, treatment)}
    shared = sorted(alphas[baseline] & alphas[treatment])
    unshared = data[~data.lr.isin(shared)]
    if len(unshared):
        design["left_out"].append("runs at an α the other method did not run (" + ", ".join(
            f"{method} α={lr:g}" for method, lr in dict.fromkeys(zip(unshared.method, unshared.lr))) + ")")
    data = data[data.lr.isin(shared)]
    if not shared:
        design["why_not"] = f"no α at which both methods ran{one_protocol}: method and α are confounded"
        return empty, design
    blocks = [term for term, varies in (("C(batch_size)", data.batch_size.nunique() > 1),
                                        ("C(variant)", data.variant.nunique() > 1)) if varies]
    if len(shared) == 1:
        design["why_not"] = (f"one α at which both methods ran{one_protocol} ({shared[0]:g}): no α effect to model, and the "
                             "method effect there is table4_paired_ttest's paired test")
        return empty, design
    for terms, words in (("C(method) * C(lr)", "method × α"),
                         ("C(method) + C(lr)", "method + α (no replicates for the interaction)")):
        for with_blocks in ((True, False) if blocks else (False,)):
            model = _full_rank_model("y ~ " + " + ".join([terms] + (blocks if with_blocks else [])), data)
            if model is None:
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # a perfect fit divides 0 by 0: p is NaN, shown as —
                table = anova_lm(model.fit(), typ=2)
            design["model"] = words + ("" if with_blocks or not blocks else "; blocks left out (confounded)")
            return pd.DataFrame({"effect": [ANOVA_NAMES.get(term, term) for term in table.index],
                                 "df": table["df"].to_numpy(), "F": table["F"].to_numpy(),
                                 "p": table["PR(>F)"].to_numpy()}), design
    design["why_not"] = "no residual degrees of freedom"
    return empty, design


def oneway_anova(groups: list[np.ndarray]) -> tuple[float, float]:
    """scipy.stats.f_oneway across groups (e.g. sweep variants over their seeds); NaN, NaN unless there are ≥ 2
    groups of ≥ 2 values and some spread."""
    if len(groups) >= 2 and all(len(g) >= 2 for g in groups) and any(np.ptp(g) > 0 for g in groups):
        result = stats.f_oneway(*groups)
        return float(result.statistic), float(result.pvalue)
    return float("nan"), float("nan")
