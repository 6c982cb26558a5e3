"""The report's statistics, as numbers (no formatting): seed means, correlations with exact or permutation
p-values at small n, differences of DEAT's outer step from SGD-momentum under one objective (DEAT − PGD-AT, the
paper's; TRADES + DEAT − TRADES, ...: pooled paired t-test, per α with a confidence interval) and the method × α
two-way ANOVA. Everything comes from scipy.stats and statsmodels; accuracies are fractions.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
from scipy import stats

from .loading import BASELINE, POINT_KEYS, TREATMENT

MIN_CORRELATION_POINTS = 3
# Up to 8 points all n! = 40,320 orderings are enumerated (an exact p); above, this many random orderings with a
# fixed seed, so that a rerun prints the same p.
PERMUTATIONS = 50_000
PERMUTATION_SEED = 0
CONFIDENCE = 0.95
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


def matched_pairs(runs: pd.DataFrame, column: str, arch: str, baseline: str = BASELINE,
                  treatment: str = TREATMENT) -> tuple[pd.DataFrame, int]:
    """``treatment`` and ``baseline`` values of one arch (DEAT and PGD-AT unless named, e.g. "trades_deat" and
    "trades") matched on (variant, α, b, seed), both present (columns baseline, treatment in that order, index
    variant, lr, batch_size, seed); and how many matches the grid has."""
    subset = runs[runs.arch == arch]
    keys = ["variant", "lr", "batch_size", "seed"]
    before = subset[subset.method == baseline].set_index(keys)[column]
    after = subset[subset.method == treatment].set_index(keys)[column]
    matched = pd.concat({baseline: before, treatment: after}, axis=1, join="inner")
    return matched.dropna(), len(matched)


def paired_differences(matched: pd.DataFrame) -> pd.Series:
    """Treatment − baseline per pair of a ``matched_pairs`` frame (its second column minus its first)."""
    return matched.iloc[:, 1] - matched.iloc[:, 0]


def pooled_paired_ttest(matched: pd.DataFrame) -> tuple[float, float]:
    """The paper's test: scipy.stats.ttest_rel(treatment, baseline) over all matched pairs taken as
    interchangeable. NaN, NaN with fewer than 2 pairs or every difference equal (t undefined)."""
    differences = paired_differences(matched).to_numpy()
    if len(differences) < 2 or np.std(differences) <= 1e-12 * max(1.0, abs(differences.mean())):
        return float("nan"), float("nan")
    result = stats.ttest_rel(matched.iloc[:, 1], matched.iloc[:, 0])
    return float(result.statistic), float(result.pvalue)


def mean_with_interval(values) -> tuple[float, float, float]:
    """(mean, low, high): the mean of paired differences and its two-sided CONFIDENCE t-interval
    (scipy.stats.ttest_1samp(...).confidence_interval); NaN bounds with fewer than 2 values, the mean as both
    bounds when every value is equal (up to float rounding), NaN throughout for none."""
    values = np.asarray(values, dtype=float)
    if len(values) == 0:
        return float("nan"), float("nan"), float("nan")
    low = high = float("nan")
    if len(values) >= 2:
        if np.std(values, ddof=1) > 1e-12 * max(1.0, abs(values.mean())):
            interval = stats.ttest_1samp(values, 0.0).confidence_interval(CONFIDENCE)
            low, high = float(interval.low), float(interval.high)
        else:
            low = high = float(values.mean())
    return float(values.mean()), low, high


def delta_per_alpha(matched: pd.DataFrame) -> pd.DataFrame:
    """Per α: pairs, mean Δ = treatment − baseline (DEAT − PGD-AT) and its two-sided CONFIDENCE t-interval over
    the pairs at that α (mean_with_interval); NaN bounds with fewer than 2 pairs."""
    rows = []
    for lr, group in paired_differences(matched).groupby(level="lr"):
        mean, low, high = mean_with_interval(group.to_numpy())
        rows.append({"lr": float(lr), "n_pairs": len(group), "mean_delta": mean, "ci_low": low, "ci_high": high})
    return pd.DataFrame(rows, columns=["lr", "n_pairs", "mean_delta", "ci_low", "ci_high"])


def alpha_as_unit_ttest(per_alpha: pd.DataFrame) -> tuple[float, float]:
    """One-sample t-test of the per-α mean Δ against 0, α as the unit (ties the pairs of one α together)."""
    means = per_alpha.mean_delta.dropna().to_numpy()
    if len(means) < 2 or np.ptp(means) == 0:
        return float("nan"), float("nan")
    result = stats.ttest_1samp(means, 0.0)
    return float(result.statistic), float(result.pvalue)


def method_by_alpha_anova(runs: pd.DataFrame, column: str, baseline: str = BASELINE,
                          treatment: str = TREATMENT) -> pd.DataFrame:
    """Two-way ANOVA of ``column`` on method × α (type II sums of squares, statsmodels ``ols`` + ``anova_lm``),
    with batch size and sweep variant as additive blocks where the study varies them.

    Rows: the effects ("method", "α", "method × α", blocks, "residual") with columns df, F, p. The interaction
    needs replicates (seeds or batch sizes) at each (method, α); without residual degrees of freedom for it the
    additive model is fitted and the interaction row is absent. An empty frame when the design cannot be fitted
    (one method, one α, or no residual degrees of freedom). The methods are ``baseline`` and ``treatment``
    (PGD-AT and DEAT unless named)."""
    import statsmodels.formula.api as smf
    from statsmodels.stats.anova import anova_lm

    data = runs[runs.method.isin([baseline, treatment])].dropna(subset=[column])
    data = data.assign(y=100 * data[column])  # percent: readable sums of squares, same F and p
    if data.method.nunique() < 2 or data.lr.nunique() < 2:
        return pd.DataFrame(columns=["effect", "df", "F", "p"])
    blocks = [term for term, varies in (("C(batch_size)", data.batch_size.nunique() > 1),
                                        ("C(variant)", data.variant.nunique() > 1)) if varies]
    names = {"C(method)": "method", "C(lr)": "α", "C(method):C(lr)": "method × α", "C(batch_size)": "b",
             "C(variant)": "variant", "Residual": "residual"}
    for interaction in (True, False):
        terms = ["C(method) * C(lr)" if interaction else "C(method) + C(lr)"] + blocks
        model = smf.ols("y ~ " + " + ".join(terms), data=data).fit()
        if model.df_resid < 1:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a perfect fit divides 0 by 0: p is NaN, shown as —
            table = anova_lm(model, typ=2)
        return pd.DataFrame({"effect": [names.get(term, term) for term in table.index],
                             "df": table["df"].to_numpy(), "F": table["F"].to_numpy(),
                             "p": table["PR(>F)"].to_numpy()})
    return pd.DataFrame(columns=["effect", "df", "F", "p"])


def oneway_anova(groups: list[np.ndarray]) -> tuple[float, float]:
    """scipy.stats.f_oneway across groups (e.g. sweep variants over their seeds); NaN, NaN unless there are ≥ 2
    groups of ≥ 2 values and some spread."""
    if len(groups) >= 2 and all(len(g) >= 2 for g in groups) and any(np.ptp(g) > 0 for g in groups):
        result = stats.f_oneway(*groups)
        return float(result.statistic), float(result.pvalue)
    return float("nan"), float("nan")
