"""What a comparison's design can see, as numbers (no formatting): the paired t-interval with its df, the minimum
detectable effect (MDE) at 80 % power, whether the interval excludes the paper's claimed gain, the verdict word
that follows, Holm's adjustment within a family of tests, and the seeds a target precision needs.

Accuracies and differences are fractions (0.012 = 1.2 percentage points), as everywhere in the report. The power
and adjustment come from statsmodels (``TTestPower``, ``multipletests(method="holm")``), the quantiles and tests
from scipy.stats.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
POWER = 0.80
SIGNIFICANCE = 1 - CONFIDENCE  # two-sided
# The paper's claim: DEAT beats PGD-AT by 1.11-1.22 points of robust accuracy on average (Sun, Sinha, Zhang,
# KDD 2023, Table 4); +1.2 points is the effect a study must be able to tell from 0.
PAPER_EFFECT = 0.012
VERDICTS = ("DEAT better", "DEAT worse", "no difference as large as the paper's", "inconclusive at this size")
# Differences of accuracies lie in [-1, 1]: an interval reaching past that says only that n is too small.
POSSIBLE_RANGE = 1.0


def _spread(values: np.ndarray) -> float:
    """Sample sd (ddof 1), 0 where every value is equal up to float rounding (ties at the evaluation's
    resolution: 2 of 500 images apart is exactly 0.4 points)."""
    sd = float(np.std(values, ddof=1))
    return 0.0 if sd <= 1e-12 * max(1.0, float(np.abs(values).max())) else sd


def minimum_detectable_effect(n: int, sd: float, power: float = POWER, alpha: float = SIGNIFICANCE) -> float:
    """Smallest true mean difference a two-sided one-sample (paired) t-test at level ``alpha`` detects with
    probability ``power`` from ``n`` differences of sd ``sd``: statsmodels' ``TTestPower().solve_power`` for the
    standardised effect d (noncentral t with n − 1 df), times ``sd``. Same unit as ``sd``; NaN for n < 2 or sd 0
    or NaN (no spread observed: nothing says how noisy the differences are)."""
    from statsmodels.stats.power import TTestPower

    if n < 2 or not sd > 0:
        return float("nan")
    d = TTestPower().solve_power(effect_size=None, nobs=n, alpha=alpha, power=power, alternative="two-sided")
    return float(d) * sd


def verdict(low: float, high: float, paper_effect: float = PAPER_EFFECT) -> str:
    """The verdict word of a Δ = DEAT − baseline interval: "DEAT better" / "DEAT worse" only when it excludes 0;
    "no difference as large as the paper's" only when it contains 0 and excludes +``paper_effect``; otherwise
    (and without an interval) "inconclusive at this size"."""
    if math.isnan(low) or math.isnan(high):
        return VERDICTS[3]
    if low > 0:
        return VERDICTS[0]
    if high < 0:
        return VERDICTS[1]
    if high < paper_effect:
        return VERDICTS[2]
    return VERDICTS[3]


def excludes_paper(low: float, high: float, paper_effect: float = PAPER_EFFECT) -> bool | None:
    """Whether the interval leaves out +``paper_effect``; None without an interval."""
    if math.isnan(low) or math.isnan(high):
        return None
    return not (low <= paper_effect <= high)


def describe(values) -> dict:
    """Everything a comparison row shows, from its paired differences (fractions): n, mean, sd (ddof 1), df,
    the two-sided CONFIDENCE t-interval (scipy's ttest_1samp), t and p against 0, the MDE at POWER, whether the
    interval excludes +PAPER_EFFECT, and the verdict word. With fewer than 2 values: no sd, interval, test or
    MDE. With every value equal: sd 0, the mean as both bounds, no t, p or MDE (undefined), and so no verdict but
    "inconclusive at this size"."""
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    n = len(values)
    nan = float("nan")
    record = {"n": n, "mean": float(values.mean()) if n else nan, "sd": nan, "df": n - 1 if n >= 2 else None,
              "ci_low": nan, "ci_high": nan, "t": nan, "p": nan, "mde": nan}
    if n >= 2:
        record["sd"] = sd = _spread(values)
        if sd > 0:
            result = stats.ttest_1samp(values, 0.0)
            interval = result.confidence_interval(CONFIDENCE)
            record.update(ci_low=float(interval.low), ci_high=float(interval.high), t=float(result.statistic),
                          p=float(result.pvalue), mde=minimum_detectable_effect(n, sd))
        else:
            record.update(ci_low=record["mean"], ci_high=record["mean"])
    # No verdict without a test: every difference equal (sd 0, t undefined) is no evidence of a spread of 0.
    tested = not math.isnan(record["p"])
    record["excludes_paper"] = excludes_paper(record["ci_low"], record["ci_high"]) if tested else None
    record["verdict"] = verdict(record["ci_low"], record["ci_high"]) if tested else VERDICTS[3]
    return record


def holm(p_values) -> np.ndarray:
    """Holm's step-down adjustment of a family of p-values (statsmodels ``multipletests(method="holm")``); NaN
    entries are not tests and stay NaN, the others are adjusted among themselves."""
    from statsmodels.stats.multitest import multipletests

    p_values = np.asarray(p_values, dtype=float)
    adjusted = np.full(len(p_values), np.nan)
    defined = ~np.isnan(p_values)
    if defined.any():
        adjusted[defined] = multipletests(p_values[defined], alpha=SIGNIFICANCE, method="holm")[1]
    return adjusted


def seeds_for_half_width(sd: float, half_width: float, confidence: float = CONFIDENCE,
                         limit: int = 100_000) -> int:
    """Smallest n (≥ 2) whose two-sided t-interval of a mean of n paired differences of sd ``sd`` has half-width
    at most ``half_width``: t(1 − (1 − confidence)/2, n − 1) · sd / √n ≤ half_width, the t quantile taken at each
    n's own df (searched upward from the normal approximation's lower bound). Raises ValueError for a
    non-positive sd or half-width, or beyond ``limit``."""
    if not sd > 0 or not half_width > 0:
        raise ValueError(f"sd {sd!r} and half-width {half_width!r} must both be > 0")
    z = stats.norm.ppf(1 - (1 - confidence) / 2)
    n = max(2, math.floor((z * sd / half_width) ** 2))  # t > z: the normal n is a lower bound
    while stats.t.ppf(1 - (1 - confidence) / 2, n - 1) * sd / math.sqrt(n) > half_width:
        n += 1
        if n > limit:
            raise ValueError(f"more than {limit} seeds for a half-width of {half_width!r} at sd {sd!r}")
    return n


def seeds_for_mde(sd: float, mde: float, power: float = POWER, alpha: float = SIGNIFICANCE) -> int:
    """Smallest n (≥ 2) at which a two-sided paired t-test at ``alpha`` detects a true mean difference ``mde``
    with probability ``power`` when the differences have sd ``sd`` (statsmodels ``TTestPower().solve_power`` for
    nobs, rounded up). Raises ValueError for a non-positive sd or MDE."""
    from statsmodels.stats.power import TTestPower

    if not sd > 0 or not mde > 0:
        raise ValueError(f"sd {sd!r} and MDE {mde!r} must both be > 0")
    power_at = TTestPower()
    n = max(2, math.ceil(power_at.solve_power(effect_size=mde / sd, nobs=None, alpha=alpha, power=power,
                                              alternative="two-sided")))
    # solve_power's root is continuous; make sure the integer n reaches the power (and n − 1 does not).
    while power_at.power(effect_size=mde / sd, nobs=n, alpha=alpha, alternative="two-sided") < power:
        n += 1
    while n > 2 and power_at.power(effect_size=mde / sd, nobs=n - 1, alpha=alpha, alternative="two-sided") >= power:
        n -= 1
    return n


def pooled_sd(groups) -> tuple[float, int]:
    """Pooled within-group sample sd of several groups of paired differences, √(Σ (nᵢ − 1)·sᵢ² / Σ (nᵢ − 1)), and
    its degrees of freedom Σ (nᵢ − 1); groups with fewer than 2 values add nothing. (NaN, 0) without any."""
    total, df = 0.0, 0
    for group in groups:
        group = np.asarray(group, dtype=float)
        group = group[~np.isnan(group)]
        if len(group) >= 2:
            total += (len(group) - 1) * float(np.var(group, ddof=1))
            df += len(group) - 1
    return (math.sqrt(total / df), df) if df else (float("nan"), 0)
