"""DEAT against SGD-momentum at equal effective step: every like-for-like pair (``equal_effective_step``) and the
mean Δ of each pairing over its seeds, and over the pairings with the step as the unit, with the columns of every
comparison table (``equal_effective_step_mean``). Each builder returns ``(Table, list[dict])`` (see
``table_helpers``); the pairs and tests come from ``comparisons``."""

from __future__ import annotations

import pandas as pd

from . import comparisons
from .formatting import MASKED, format_decay, format_delta, format_percent, json_value
from .loading import BASELINE, CHECKPOINTS, OUTER_STEP_LABELS, TREATMENT, label_of, method_label
from .render import Table
from .table_helpers import (COMPARISON_COLUMNS, DECAY_NOTE, MATCHED_WORDS, comparison_cells, comparison_notes,
                            comparison_record, evaluation_notes, metric_words, missing_note, objective_cell,
                            objective_column, outer_step_words, pairs_of, varies_variant)


def _names(runs: pd.DataFrame, pairs: list) -> tuple[str, str]:
    """The two arms' column words: "SGD-momentum"/"DEAT" across objectives, else the pair's own labels."""
    if len(pairs) > 1:
        return OUTER_STEP_LABELS["sgd"], OUTER_STEP_LABELS["deat"]
    _, baseline, treatment = (pairs or [("pgd_at", BASELINE, TREATMENT)])[0]  # none: the paper's names
    present = set(runs.method)
    return (label_of(runs, baseline) if baseline in present else method_label(baseline),
            label_of(runs, treatment) if treatment in present else method_label(treatment))


def equal_step_table(runs: pd.DataFrame, tests: comparisons.Comparisons | None = None) -> tuple[Table, list[dict]]:
    """DEAT vs SGD-momentum at equal effective step (not equal α), per objective run with both outer steps (DEAT
    vs PGD-AT in the paper's grid): runs of the same arch, b, seed and sweep variant whose effective steps agree
    within 1 % relative and whose evaluations are like-for-like, with each one's effective decay and whether the
    pair matches it too. Equal α is not an equal step (SGD momentum 0.9: ≈10α; DEAT: ≈0.45α), nor an equal step
    an equal decay. The accuracy compared is the study's headline: PGD-10 robust test accuracy, or clean test
    accuracy where training has no attack.

    Returns the table and summary records: one per pair ("kind": "pair") and the tests of
    equal_step_mean_table ("kind": "mean_over_seeds" per pairing with ≥ 2 seeds, "step_as_unit" per group of
    pairings), one per checkpoint, each naming its "metric"."""
    tests = tests or comparisons.all_tests(runs)
    pairs, metric = pairs_of(runs), tests.step_metric
    words = metric_words(metric, runs)
    base, treat = _names(runs, pairs)
    with_variant = varies_variant(runs)
    columns = objective_column(pairs) + ["arch", "b", "seed"] + (["variant"] if with_variant else []) + [
        f"α {base}", f"α {treat}", "effective step", f"decay {base}", f"decay {treat}", "matched",
        f"{base} best", f"{treat} best", "Δ best", f"{base} last", f"{treat} last", "Δ last"]
    rows, summary, members = [], [], []
    for pair in tests.step_pairs:
        objective, baseline, treatment, sgd, deat = (pair[k] for k in ("objective", "baseline", "treatment", "sgd",
                                                                         "deat"))
        members += [sgd.Index, deat.Index]
        cells = objective_cell(pairs, objective) + [sgd.arch, str(sgd.batch_size), str(sgd.seed)] + (
            [deat.variant] if with_variant else []) + [
            f"{sgd.lr:g}", f"{deat.lr:g}", f"{sgd.effective_step:.4g}", format_decay(sgd.effective_decay),
            format_decay(deat.effective_decay), MATCHED_WORDS[pair["decay_matched"]]]
        record = {"kind": "pair", **comparison_record(pairs, baseline, treatment), "metric": metric,
                  "arch": sgd.arch, "batch_size": sgd.batch_size,
                  **({"variant": deat.variant} if with_variant else {}),
                  f"lr_{baseline}": sgd.lr, f"lr_{treatment}": deat.lr, "seed": sgd.seed,
                  f"effective_step_{baseline}": sgd.effective_step, f"effective_step_{treatment}": deat.effective_step,
                  f"effective_decay_{baseline}": sgd.effective_decay,
                  f"effective_decay_{treatment}": deat.effective_decay, "decay_matched": pair["decay_matched"]}
        for checkpoint in CHECKPOINTS:
            column = f"eval_{checkpoint}_{metric}"
            before, after = getattr(sgd, column), getattr(deat, column)
            masked = {run: metric != "clean_acc" and getattr(run, f"eval_{checkpoint}_masking")
                      for run in (sgd, deat)}  # masking concerns robust accuracy only
            cells += [format_percent(before) + (MASKED if masked[sgd] else ""),
                      format_percent(after) + (MASKED if masked[deat] else ""), format_delta(after - before)]
            record.update({f"{baseline}_{checkpoint}_acc": before, f"{treatment}_{checkpoint}_acc": after})
        rows.append(cells)
        summary.append({key: json_value(value) for key, value in record.items()})
    summary += [comparisons.summary_record(record) for record in tests.equal_step]

    notes = []
    if rows:
        in_pairs = runs.loc[sorted(set(members))]
        notes += missing_note(in_pairs, [f"eval_{checkpoint}_{metric}" for checkpoint in CHECKPOINTS])
        notes += evaluation_notes(in_pairs, with_skipped=False) if metric != "clean_acc" else []
        notes.append(DECAY_NOTE)
    if len(pairs) > 1:
        notes.append("Effective step: step per unit gradient, lr/(1−m) for SGD with momentum m and "
                     "lr/√((1+k1)²+k1²) for DEAT's outer step, whatever the objective (deat.effective, from each "
                     f"run's settings); {words} (%) per run, Δ = {outer_step_words()} under the same "
                     "objective (pp).")
        caption = f"{treat} vs {base} per objective at equal effective step (within 1 %), {words} (%) per run"
    else:
        notes.append(f"Effective step: step per unit gradient, lr/(1−m) for {base} with SGD momentum m and "
                     f"lr/√((1+k1)²+k1²) for {treat} (deat.effective, from each run's settings); {words} "
                     f"(%) per run, Δ = {treat} − {base} (pp).")
        caption = f"{treat} vs {base} at equal effective step (within 1 %), {words} (%) per run"
    if with_variant:
        notes.append("Pairs are formed within a sweep variant; a run the variant's setting does not change (PGD-AT "
                     "under a DEAT-only setting) is the same run under every variant.")
    if tests.equal_step:
        notes.append("The mean Δ of each pairing over its seeds, and over the pairings with the step as the unit, "
                     "with interval, MDE, Holm-adjusted p and verdict: equal_effective_step_mean.")
    notes += [note for note in comparison_notes(runs, tests, "equal_effective_step") if note.startswith("Left out")]
    scope = "of one objective (same arch, b, seed)" if len(pairs) > 1 else "(same arch, b, seed)"
    empty = f"No {treat}/{base} pair {scope} in this study has effective steps within 1 % of each other" + (
        " and like-for-like evaluations." if any(u["table"] == "equal_effective_step" for u in tests.unlike) else ".")
    return Table("equal_effective_step", caption, columns, rows, notes, empty_message=empty), summary


def _masked(runs: pd.DataFrame, record: dict) -> bool:
    """Whether a run of one of the record's pairs flagged gradient masking at its checkpoint."""
    return any(getattr(pair[side], f"eval_{record['checkpoint']}_masking")
               for pair in record["_pairs"] for side in ("sgd", "deat"))


def equal_step_mean_table(runs: pd.DataFrame, tests: comparisons.Comparisons | None = None) -> Table:
    """Per equal-step pairing with ≥ 2 seeds: the mean Δ over its seeds, and per group of pairings (same
    objective, variant, arch, b and decay matching) the mean over the per-pairing means with the step as the
    unit; each with n, paired sd, 95 % interval, MDE at 80 % power, whether it excludes the paper's +1.2, raw and
    Holm-adjusted p and the verdict. Its records are equal_step_table's (kind "mean_over_seeds", "step_as_unit")."""
    tests = tests or comparisons.all_tests(runs)
    pairs, metric = pairs_of(runs), tests.step_metric
    base, treat = _names(runs, pairs)
    with_variant = varies_variant(runs)
    columns = objective_column(pairs) + ["arch", "b"] + (["variant"] if with_variant else []) + [
        "matched", f"α {base}", f"α {treat}", "metric", "checkpoint"] + COMPARISON_COLUMNS
    rows = []
    order = {metric: i for i, metric in enumerate(dict.fromkeys(r["metric"] for r in tests.equal_step))}
    for record in sorted(tests.equal_step, key=lambda r: (order[r["metric"]], r["kind"] == "step_as_unit",
                                                          r["checkpoint"] != "best")):
        baseline, treatment = record["_baseline"], record["_treatment"]
        head = record["_head"] + [record["arch"], str(record["batch_size"])] + (
            [record["variant"]] if with_variant else []) + [MATCHED_WORDS[record["decay_matched"]]]
        if record["kind"] == "mean_over_seeds":
            alphas = [f"{record[f'lr_{baseline}']:g}", f"{record[f'lr_{treatment}']:g}"]
            n_text = f"{record['n']} seeds"
        else:
            alphas = [", ".join(f"{lr:g}" for lr in record[f"lrs_{baseline}"]) + " (step as the unit)",
                      ", ".join(f"{lr:g}" for lr in record[f"lrs_{treatment}"])]
            n_text = f"{record['n']} steps"
        flag = MASKED if record["metric"] != "clean_acc" and _masked(runs, record) else ""
        rows.append(head + alphas + [metric_words(record["metric"], runs).replace(" test accuracy", "") + flag,
                                     record["checkpoint"]] + comparison_cells(record, n_text))
    words = metric_words(metric, runs)
    delta = outer_step_words() if len(pairs) > 1 else f"{treat} − {base}"
    notes = [(f"Δ = {delta} (pp) of each accuracy the evaluation measured ({words} is the one the pairs table shows), "
              "per seed of a pairing (the pairs of equal_effective_step). Per pairing: "
             "the mean over its seeds. Step as the unit: a t-interval over the per-pairing means of the pairings "
             "that share objective, arch, b, variant and decay matching (n = the steps; each pairing's mean over "
             "the seeds it has).")]
    in_pairs = runs.loc[sorted({p[k].Index for p in tests.step_pairs for k in ("sgd", "deat")})]
    notes += evaluation_notes(in_pairs, with_skipped=False)
    notes += comparison_notes(runs, tests, "equal_effective_step")
    caption = (f"{treat} vs {base} at equal effective step: mean Δ per pairing over seeds and with the step as the "
               "unit")
    return Table("equal_effective_step_mean", caption, columns, rows, notes,
                 empty_message="No equal-step pairing has 2 or more evaluated seeds.")
