"""Weight averaging against the raw model (issue 21): the accuracy of every checkpoint of runs with and without an
EMA of the weights, and the three questions a reviewer asks, each as paired differences over seeds with their 95 %
interval, MDE and verdict word (``power.describe``).

Arms: a run with ``ema_tau`` > 0 is "<method> + EMA"; its raw checkpoints (best, last) train exactly as the run
without EMA (the average never touches training), its averaged ones are "best (EMA)" and "last (EMA)", chosen like
best and last (best on the validation split). A run with ``ema_tau`` 0 is the method without EMA. Pairs share arch,
α, b and seed (without/with EMA), or arch, b, seed and an equal effective step (the two outer steps).

1. Does EMA remove the fall? Δ = last (EMA) of the EMA run − last of the run without EMA, per method; beside it the
   per-epoch fall (peak − final test PGD accuracy) of the raw and of the averaged curve.
2. Is DEAT still better with EMA on both? Δ = DEAT + EMA − PGD-AT + EMA, at last (EMA) and best (EMA).
3. Do they add up? The interaction (DEAT + EMA − DEAT) − (PGD-AT + EMA − PGD-AT) at the last checkpoints (last
   (EMA) for the EMA arms), paired by seed: 0 when EMA's gain does not depend on the outer step.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from . import power
from .formatting import MISSING, format_mean_std, json_value, ordered
from .loading import CHECKPOINT_LABELS, CHECKPOINTS, EMA_CHECKPOINTS, label_of, objective_pairs
from .render import Table
from .table_helpers import EQUAL_STEP_RTOL

METRICS = {"pgd10_acc": "PGD-10", "aa_acc": None}  # None: the study's AutoAttack label


def has_averaging(runs: pd.DataFrame) -> bool:
    """Whether some run kept a weight average and its averaged checkpoints were evaluated."""
    return "ema_tau" in runs and bool((runs.ema_tau > 0).any()) and runs["eval_last_ema_pgd10_acc"].notna().any()


def _arm(row) -> str:
    return f"{row.label} + EMA τ={row.ema_tau:g}" if row.ema_tau > 0 else row.label


def _fall(epochs: pd.DataFrame, row, column: str) -> float:
    """Peak − final of one run's per-epoch test PGD accuracy (`column`: test_pgd_acc or ema_test_pgd_acc)."""
    curve = epochs[(epochs.method == row.method) & (epochs.lr == row.lr) & (epochs.batch_size == row.batch_size)
                   & (epochs.seed == row.seed) & (epochs.variant == row.variant)].sort_values("epoch")[column]
    return float(curve.max() - curve.iloc[-1]) if len(curve) and curve.notna().all() else float("nan")


def _cell(values: list[float]) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return MISSING
    return format_mean_std(float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else
                           float("nan"), len(values), len(values))


def _interval(record: dict) -> str:
    if math.isnan(record["ci_low"]):
        return MISSING
    return f"[{100 * record['ci_low']:+.2f}, {100 * record['ci_high']:+.2f}]"


def _row(question: str, what: str, metric: str, values: list[float]) -> tuple[list[str], dict]:
    record = power.describe(values)
    cells = [question, what, metric, str(record["n"]), MISSING if math.isnan(record["mean"]) else
             f"{100 * record['mean']:+.2f}", MISSING if math.isnan(record["sd"]) else f"{100 * record['sd']:.2f}",
             _interval(record) + ("" if record["df"] is None else f" (df {record['df']})"),
             MISSING if math.isnan(record["mde"]) else f"{100 * record['mde']:.2f}", record["verdict"]]
    return cells, {"question": question, "what": what, "metric": metric,
                   **{k: json_value(v) for k, v in record.items()}}


def averaging_tables(runs: pd.DataFrame, epochs: pd.DataFrame, aa_label: str) -> list[tuple[Table, list[dict]]]:
    """[(weight_averaging, records), (weight_averaging_questions, records)] for a study with EMA runs."""
    metrics = {k: v or aa_label for k, v in METRICS.items()}
    columns = ["arm", "α", "b", "seeds"] + [f"{CHECKPOINT_LABELS[c]} {name}" for c in CHECKPOINTS + EMA_CHECKPOINTS
                                            for name in metrics.values()] + ["fall raw (pp)", "fall EMA (pp)"]
    rows, records = [], []
    for (_, lr, b, tau, method), members in runs.groupby(["arch", "lr", "batch_size", "ema_tau", "method"],
                                                         sort=False):
        first = next(members.itertuples())
        cells = [_arm(first), f"{lr:g}", str(b), str(len(members))]
        record = {"arch": first.arch, "method": method, "ema_tau": tau, "lr": lr, "batch_size": b,
                  "n_seeds": len(members)}
        for checkpoint in CHECKPOINTS + EMA_CHECKPOINTS:
            for metric in metrics:
                values = list(members[f"eval_{checkpoint}_{metric}"])
                cells.append(_cell(values) if tau > 0 or checkpoint in CHECKPOINTS else "")
                record[f"{checkpoint}_{metric}_mean"] = json_value(float(np.nanmean(values))) \
                    if not all(map(math.isnan, values)) else None
        falls = {col: [_fall(epochs, row, col) for row in members.itertuples()]
                 for col in ("test_pgd_acc", "ema_test_pgd_acc")}
        cells += [_cell(falls["test_pgd_acc"]).replace(" ± ", " ± "), _cell(falls["ema_test_pgd_acc"])
                  if tau > 0 else ""]
        record.update(fall_raw_mean=json_value(float(np.nanmean(falls["test_pgd_acc"]))),
                      fall_ema_mean=json_value(float(np.nanmean(falls["ema_test_pgd_acc"]))) if tau > 0 else None)
        rows.append(cells)
        records.append(record)
    notes = ["Accuracy (%) on the evaluation's test examples, mean ± sd over seeds. best and last: the raw model's "
             "checkpoints (best chosen on the validation split); best (EMA) and last (EMA): the weight average's, "
             "best (EMA) also chosen on the validation split (metrics.json ema_val_pgd_acc). An EMA run's raw "
             "checkpoints train exactly as the same run without EMA. Fall: the per-epoch test PGD accuracy's peak "
             "− its final epoch (training's per-epoch evaluation), of the raw model and of the average, in "
             "percentage points; blank where the arm has no average."]
    table = Table("weight_averaging", "Weight averaging: accuracy (%) of every checkpoint with and without an EMA of "
                  "the weights", columns, rows, notes)
    return [(table, records), _questions(runs, epochs, metrics)]


def _pairs_by_seed(left: pd.DataFrame, right: pd.DataFrame) -> list[tuple]:
    right = {(r.arch, r.batch_size, r.seed): r for r in right.itertuples()}
    return [(l, right[l.arch, l.batch_size, l.seed]) for l in left.itertuples() if (l.arch, l.batch_size, l.seed)
            in right]


def _same_step(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    return len(a) and len(b) and math.isclose(a.effective_step.iloc[0], b.effective_step.iloc[0],
                                              rel_tol=EQUAL_STEP_RTOL)


def _questions(runs: pd.DataFrame, epochs: pd.DataFrame, metrics: dict) -> tuple[Table, list[dict]]:
    columns = ["question", "comparison", "metric", "n", "mean Δ (pp)", "sd (pp)", "95 % CI (pp)", "MDE 80 % (pp)",
               "verdict"]
    rows, records = [], []

    def add(question, what, metric, values):
        cells, record = _row(question, what, metric, values)
        rows.append(cells)
        records.append(record)

    arms = {}
    for (method, ema), members in runs.groupby(["method", runs.ema_tau > 0], sort=False):
        arms[method, bool(ema)] = members
    for method in ordered(runs.method):
        raw, averaged = arms.get((method, False)), arms.get((method, True))
        if raw is None or averaged is None:
            continue
        name = label_of(runs, method)
        for metric, words in metrics.items():
            pairs = _pairs_by_seed(averaged[averaged.lr.isin(raw.lr)], raw)
            add("1 EMA vs the fall", f"{name}: last (EMA) with EMA − last without", words,
                [getattr(a, f"eval_last_ema_{metric}") - getattr(r, f"eval_last_{metric}") for a, r in pairs])
        pairs = _pairs_by_seed(averaged, averaged)
        add("1 EMA vs the fall", f"{name} + EMA: fall of the raw curve − fall of the average", "per-epoch PGD",
            [_fall(epochs, a, "test_pgd_acc") - _fall(epochs, a, "ema_test_pgd_acc") for a, _ in pairs])
    for _, baseline, treatment in objective_pairs(ordered(runs.method)):
        b_raw, t_raw = arms.get((baseline, False)), arms.get((treatment, False))
        b_ema, t_ema = arms.get((baseline, True)), arms.get((treatment, True))
        words = f"{label_of(runs, treatment)} − {label_of(runs, baseline)}"
        if b_ema is not None and t_ema is not None and _same_step(b_ema, t_ema):
            for metric, name in metrics.items():
                for checkpoint in EMA_CHECKPOINTS:
                    add("2 DEAT with EMA on both", f"{words}, {CHECKPOINT_LABELS[checkpoint]}", name,
                        [getattr(t, f"eval_{checkpoint}_{metric}") - getattr(b, f"eval_{checkpoint}_{metric}")
                         for b, t in _pairs_by_seed(b_ema, t_ema)])
        if b_raw is not None and t_raw is not None and _same_step(b_raw, t_raw):
            for metric, name in metrics.items():
                add("reference: without EMA", f"{words}, last", name,
                    [getattr(t, f"eval_last_{metric}") - getattr(b, f"eval_last_{metric}")
                     for b, t in _pairs_by_seed(b_raw[b_raw.lr.isin(b_raw.lr)], t_raw)])
        if all(arm is not None for arm in (b_raw, t_raw, b_ema, t_ema)):
            for metric, name in metrics.items():
                values = []
                raw_b = {(r.arch, r.batch_size, r.seed): r for r in b_raw.itertuples()}
                raw_t = {(r.arch, r.batch_size, r.seed): r for r in t_raw.itertuples()}
                for bema, tema in _pairs_by_seed(b_ema, t_ema):
                    key = (bema.arch, bema.batch_size, bema.seed)
                    if key in raw_b and key in raw_t:
                        values.append((getattr(tema, f"eval_last_ema_{metric}") - getattr(raw_t[key], f"eval_last_{metric}"))
                                      - (getattr(bema, f"eval_last_ema_{metric}") - getattr(raw_b[key], f"eval_last_{metric}")))
                add("3 do they add up", f"({label_of(runs, treatment)} + EMA − {label_of(runs, treatment)}) − "
                    f"({label_of(runs, baseline)} + EMA − {label_of(runs, baseline)}), last", name, values)
    notes = ["Paired differences over seeds (same arch, b and seed; the two outer steps at equal effective step "
             "within 1 %), in percentage points: n, mean, sd, the 95 % t-interval with its df, the minimum "
             "detectable effect at 80 % power (paired t, two-sided 5 %) and the verdict word (power.describe: "
             "\"better\"/\"worse\" only when the interval excludes 0). Question 1: Δ > 0 means the average's last "
             "checkpoint beats the raw model's, and a positive fall difference that the average falls less. "
             "Question 3: 0 when EMA's gain does not depend on the outer step. The verdict words name DEAT for "
             "DEAT − PGD-AT rows; for the other rows read \"DEAT better\" as \"Δ > 0\"."]
    caption = "Weight averaging: does EMA remove the fall, is DEAT still better with EMA on both, do they add up"
    return Table("weight_averaging_questions", caption, columns, rows, notes,
                 empty_message="No arm with and without EMA to compare."), records
