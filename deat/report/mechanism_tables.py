"""The mechanism (issue 22): what the probes measured while training and what the evaluation measured after it.

Per run, from metrics.json's probe epochs (deat.probes): the mean over probe epochs of tr Σ (gradient noise per
example), of the diffusion (α/b)·tr Σ and of the outer step's one-step update noise tr Cov(Δθ); from eval.json the
robust gap measured alike (PGD-10 on training images − on the test subset, best checkpoint) and the best
checkpoint's PGD-10 test accuracy. Three answers, each with its uncertainty:

1. Does the measured diffusion scale with α/b? The slope of log diffusion on log(α/b) over the runs of each SGD
   method (OLS with its 95 % t-interval, scipy.stats.linregress): 1 when tr Σ does not depend on α and b, as the
   paper's SDE assumes; its tr Σ slope alone is shown beside it.
2. Is DEAT's k above 1 at matched step? Per pair (same arch, b, seed, effective step within 1 %) the ratio of the
   mean update noise DEAT / SGD-momentum; the geometric mean over pairs with a 95 % t-interval of the log ratio,
   beside the one-step value derived from the two update rules for stationary gradient noise,
   k_step = (1 + k1)²(1 − k2)²/(1 − μ)² (docs/method.md).
3. Does diffusion predict the robust gap across runs? Pearson r and Spearman ρ of log diffusion with the gap and
   with the best robust test accuracy, exact or permutation p (statistics.correlation).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats

from . import power, statistics
from .formatting import MISSING, format_p, json_value, run_label
from .loading import objective_pairs
from .render import Table
from .table_helpers import EQUAL_STEP_RTOL

PROBES = {"probe_grad_trace_sigma": "tr Σ", "probe_diffusion": "diffusion (α/b)·tr Σ",
          "probe_update_trace_cov": "update noise tr Cov(Δθ)", "probe_b_simple": "B_simple"}


def has_probes(epochs: pd.DataFrame) -> bool:
    return "probe_diffusion" in epochs and epochs.probe_diffusion.notna().any()


def run_probes(runs: pd.DataFrame, epochs: pd.DataFrame) -> pd.DataFrame:
    """runs with the mean of each probe over its probe epochs (NaN without probes) and the robust gap columns."""
    keys = ["method", "variant", "lr", "batch_size", "seed"]
    means = epochs.dropna(subset=["probe_diffusion"]).groupby(keys)[list(PROBES)].mean().reset_index()
    merged = runs.merge(means, on=keys, how="left")
    merged["robust_gap"] = merged["eval_best_train_pgd10_acc"] - merged["eval_best_pgd10_acc"]
    merged["alpha_over_b"] = merged.lr / merged.batch_size
    return merged


def _number(value: float, digits: int = 3) -> str:
    return MISSING if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}g}"


def _percent(value: float) -> str:
    return MISSING if math.isnan(value) else f"{100 * value:.2f}"


def mechanism_tables(runs: pd.DataFrame, epochs: pd.DataFrame, protocol: dict) -> list[tuple[Table, list[dict]]]:
    """[(diffusion_per_run, records), (diffusion_answers, records)] for a study whose runs were probed."""
    data = run_probes(runs, epochs)
    columns = ["run", "α/b", "effective step"] + list(PROBES.values()) + ["train PGD-10 (%)", "test PGD-10 (%)",
                                                                          "robust gap (pp)"]
    rows, records = [], []
    for row in data.itertuples():
        rows.append([run_label(row), f"{row.alpha_over_b:.3g}", f"{row.effective_step:.4g}"]
                    + [_number(getattr(row, k)) for k in PROBES]
                    + [_percent(row.eval_best_train_pgd10_acc), _percent(row.eval_best_pgd10_acc),
                       MISSING if math.isnan(row.robust_gap) else f"{100 * row.robust_gap:+.2f}"])
        records.append({"arch": row.arch, "method": row.method, "lr": row.lr, "batch_size": row.batch_size,
                        "seed": row.seed, **{k: json_value(getattr(row, k)) for k in
                                             (*PROBES, "robust_gap", "eval_best_train_pgd10_acc",
                                              "eval_best_pgd10_acc")}})
    notes = ["Probes (deat.probes, docs/method.md): means over the run's probe epochs of tr Σ (per-example gradient "
             "covariance of the training objective at its own attack's examples, unbiased from M disjoint "
             "minibatches), the diffusion (α/b)·tr Σ with α the learning rate of that epoch, the outer step's "
             "one-step update noise tr Cov(Δθ) and the simple noise scale B_simple = tr Σ/|G|² (McCandlish et "
             "al. 2018; noisy where |G|² is near 0). Robust gap: the best checkpoint's PGD-10 accuracy on training "
             "images − on the test subset, the same attack in BatchNorm eval mode on both sides (eval.json "
             "train_pgd10_acc − pgd10_acc)."]
    per_run = Table("diffusion_per_run", "The mechanism per run: gradient noise, diffusion, update noise and the "
                    "robust gap measured alike", columns, rows, notes)
    return [(per_run, records), _answers(data, protocol)]


def _slope_row(subset: pd.DataFrame, column: str, label: str, what: str) -> tuple[list[str], dict]:
    ok = subset.dropna(subset=[column])
    ok = ok[ok[column] > 0]
    if len(ok) < 3 or ok.alpha_over_b.nunique() < 2:
        return [what, label, str(len(ok)), MISSING, MISSING, MISSING], {"what": what, "n": len(ok)}
    fit = stats.linregress(np.log(ok.alpha_over_b), np.log(ok[column]))
    half = stats.t.ppf(0.975, len(ok) - 2) * fit.stderr
    cells = [what, label, str(len(ok)), f"{fit.slope:.3f}", f"[{fit.slope - half:.3f}, {fit.slope + half:.3f}] "
             f"(df {len(ok) - 2})", format_p(fit.pvalue)]
    return cells, {"what": what, "n": len(ok), "slope": fit.slope, "ci_low": fit.slope - half,
                   "ci_high": fit.slope + half, "df": len(ok) - 2, "p": fit.pvalue}


def _answers(data: pd.DataFrame, protocol: dict) -> tuple[Table, list[dict]]:
    columns = ["question", "measure", "n", "estimate", "95 % CI", "p"]
    rows, records = [], []
    sgd = data[data.outer_step == "sgd"]
    for method, subset in sgd.groupby("method", sort=False):
        name = subset.label.iloc[0]
        for column, label in (("probe_diffusion", "slope of log diffusion on log α/b"),
                              ("probe_grad_trace_sigma", "slope of log tr Σ on log α/b")):
            cells, record = _slope_row(subset, column, label, f"1 diffusion ∝ α/b? ({name})")
            rows.append(cells)
            records.append({"question": 1, "method": method, "measure": label, **record})
    k1, k2, mu = protocol.get("k1", 1.0), protocol.get("k2", 0.8), protocol.get("pgd_at_momentum", 0.9)
    predicted = (1 + k1) ** 2 * (1 - k2) ** 2 / (1 - mu) ** 2
    for _, baseline, treatment in objective_pairs(list(dict.fromkeys(data.method))):
        base = list(data[data.method == baseline].itertuples())
        ratios = []
        for t in data[data.method == treatment].itertuples():
            for b in base:
                if (b.arch, b.batch_size, b.seed) == (t.arch, t.batch_size, t.seed) and math.isclose(
                        b.effective_step, t.effective_step, rel_tol=EQUAL_STEP_RTOL) \
                        and b.probe_update_trace_cov > 0 and t.probe_update_trace_cov > 0:
                    ratios.append(math.log(t.probe_update_trace_cov / b.probe_update_trace_cov))
        described = power.describe(ratios)
        estimate = MISSING if math.isnan(described["mean"]) else f"{math.exp(described['mean']):.3g}"
        interval = MISSING if math.isnan(described["ci_low"]) else \
            f"[{math.exp(described['ci_low']):.3g}, {math.exp(described['ci_high']):.3g}] (df {described['df']})"
        rows.append([f"2 DEAT's k > 1 at matched step? ({treatment} / {baseline})",
                     f"update noise ratio, geometric mean over pairs (predicted one-step k = {predicted:.3g})",
                     str(described["n"]), estimate, interval, format_p(described["p"])])
        records.append({"question": 2, "baseline": baseline, "treatment": treatment, "n": described["n"],
                        "k_geometric_mean": json_value(math.exp(described["mean"])) if ratios else None,
                        "ci_low": json_value(math.exp(described["ci_low"])) if ratios and not
                        math.isnan(described["ci_low"]) else None,
                        "ci_high": json_value(math.exp(described["ci_high"])) if ratios and not
                        math.isnan(described["ci_high"]) else None,
                        "p_log_ratio_zero": json_value(described["p"]), "k_step_predicted": predicted})
    usable = data.dropna(subset=["probe_diffusion"])
    usable = usable[usable.probe_diffusion > 0]
    for target, label in (("robust_gap", "robust gap"), ("eval_best_pgd10_acc", "best PGD-10 test accuracy")):
        both = usable.dropna(subset=[target])
        for test, name in (("pearson", "Pearson r"), ("spearman", "Spearman ρ")):
            r, p = statistics.correlation(np.log(both.probe_diffusion.to_numpy()), both[target].to_numpy(), test)
            rows.append([f"3 diffusion predicts the {label}?", f"{name} of log diffusion with the {label}",
                         str(len(both)), _number(r), MISSING, format_p(p)])
            records.append({"question": 3, "target": target, "test": test, "n": len(both), "r": json_value(r),
                            "p": json_value(p)})
    notes = ["1: OLS of log diffusion (and of log tr Σ) on log(α/b) over one SGD method's runs (scipy.stats."
             "linregress, 95 % t-interval with n − 2 df): slope 1 when tr Σ does not change with α and b, as the "
             "SDE model assumes, so that the diffusion grows as α/b. 2: DEAT / SGD-momentum update noise per pair "
             "of runs of the same arch, b and seed at equal effective step (within 1 %), geometric mean with a 95 % "
             "t-interval of the log ratio, p against a ratio of 1; the predicted value is the one-step ratio of "
             "the update rules for stationary gradient noise at the study's k1, k2 and momentum (docs/method.md), "
             "which the two runs meet only where their gradient noise is equal. 3: correlation across every probed "
             "run (both methods), " + statistics.p_value_method(max(len(usable), 1)) + " (statistics.correlation)."]
    caption = "The mechanism: does diffusion grow with α/b, is DEAT's k above 1, does diffusion predict the gap"
    return Table("diffusion_answers", caption, columns, rows, notes), records
