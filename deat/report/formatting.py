"""How the report prints a number or names a run: percent with two decimals, mean ± sd, the table markers, and
JSON-safe values for summary.json. Accuracies come in as fractions."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

MISSING = "—"
PARTIAL = "‡"  # a mean over fewer seeds than the study asks
MASKED = "†"  # a number from a checkpoint whose evaluation flagged gradient masking
UNLIKE = "§"  # a difference between evaluations under a different robust-accuracy rule or protocol


def run_label(row) -> str:
    return f"{point_label(row.arch, row.label, row.lr, row.batch_size, row.variant)} seed {row.seed}"


def point_label(arch: str, label: str, lr: float, batch_size: int, variant: str = "") -> str:
    return f"{arch} {label} α={lr:g} b={batch_size}" + (f" {variant}" if variant else "")


def format_percent(fraction: float) -> str:
    return MISSING if pd.isna(fraction) else f"{100 * fraction:.2f}"


def format_delta(fraction: float) -> str:
    return MISSING if pd.isna(fraction) else f"{100 * fraction:+.2f}"


def format_decay(value: float) -> str:
    """A per-step weight-decay shrink (deat.effective.effective_decay, dimensionless) for a table cell: "5.00e-5",
    "0" without decay, — for NaN."""
    return MISSING if pd.isna(value) else "0" if value == 0 else f"{value:.2e}".replace("e-0", "e-")


def format_p(p: float) -> str:
    if pd.isna(p):
        return MISSING
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def format_mean_std(mean: float, std: float, n: int, n_expected: int, scale: float = 100.0, digits: int = 2) -> str:
    """"44.30 ± 0.28": a fraction in percent (``scale`` 100), or another quantity at ``scale`` 1 with ``digits``
    decimals ("12.3 ± 0.4" s); one seed: no ±; fewer seeds than asked: marked ‡; none: —."""
    if n == 0:
        return MISSING
    text = f"{scale * mean:.{digits}f}" if n < 2 else f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"
    return text + (PARTIAL if n < n_expected else "")


def json_value(value):
    """NaN → null and numpy scalars → Python, for summary.json."""
    if isinstance(value, (np.integer, np.floating)):
        value = value.item()
    return None if isinstance(value, float) and math.isnan(value) else value


SUMMARY_DIGITS = 9


def rounded(value, digits: int = SUMMARY_DIGITS):
    """`value` (nested dicts and lists) with every float rounded to `digits` significant digits, for summary.json.

    A statistic's last bits depend on the numpy/scipy/statsmodels build and its BLAS: seen, a Pearson r differing in
    the 17th digit between two environments, and an ANOVA F (a ratio of sums of squares that partly cancel)
    differing in the 12th (0.521097046413 vs 0.521097046414). Full-precision floats, or 12 digits, would make a
    regenerated summary.json differ from the committed one although no result changed. 9 digits keep far more than
    any table shows (at most 4) and leave three orders of magnitude for such noise."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}") if math.isfinite(value) else value
    if isinstance(value, dict):
        return {key: rounded(item, digits) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(item, digits) for item in value]
    return value


def records(frame: pd.DataFrame) -> list[dict]:
    return [{key: json_value(value) for key, value in row.items()} for row in frame.to_dict("records")]


def ordered(values) -> list:
    """Distinct values in first-seen order."""
    return list(dict.fromkeys(values))
