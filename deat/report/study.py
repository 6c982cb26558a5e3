"""One study's report: every table (Markdown, LaTeX, CSV), ``protocol.md``, ``runs.csv``, the figures and
``summary.json`` (the key numbers, accuracies as fractions like every JSON file of the project)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from . import (averaging_tables, comparisons, figures, mechanism_tables, paper_tables, selection, step_tables,
               study_tables)
from .formatting import rounded, run_label
from .loading import CHECKPOINTS, EVAL_METRICS, RUNS_CSV_LEAVES_OUT, load_runs, study_aa_label
from .protocol import PROTOCOL_FILE, protocol_markdown
from .render import write_table
from .table_helpers import has_delta, varies_variant

log = logging.getLogger(__name__)


def build_report(manifest: dict, tables_dir: str | Path, figures_dir: str | Path,
                 runs_root: str | Path = ".") -> list[Path]:
    """Write every table, figure and summary.json of one study; returns the files written.

    ``runs_root`` is the directory that relative run directories in the manifest are relative to (the repository
    root). A figure or table the grid cannot support is skipped with a logged note (listed under ``skipped`` in
    summary.json)."""
    tables_dir, figures_dir = Path(tables_dir), Path(figures_dir)
    tables_dir.mkdir(parents=True, exist_ok=True)
    figures_dir.mkdir(parents=True, exist_ok=True)
    study = manifest["study"]
    runs, epochs = load_runs(manifest, runs_root)
    head = figures.headline(manifest.get("protocol", {}))
    skipped: list[str] = []

    built = {}
    for metric, stem in EVAL_METRICS.items():
        for checkpoint in CHECKPOINTS:
            if runs[f"eval_{checkpoint}_{metric}"].isna().all() and metric == "aa_acc":
                skipped.append(f"table2_aa_{checkpoint}: aa_acc is null or absent in every run")
                continue
            built[f"table2_{stem}_{checkpoint}"] = paper_tables.accuracy_table(runs, metric, checkpoint)
    tests = comparisons.all_tests(runs)
    paired = has_delta(runs)
    no_pair = "the study has no objective with both outer steps (e.g. PGD-AT and DEAT)"
    if paired:
        built["equal_effective_step"] = step_tables.equal_step_table(runs, tests)
        if tests.equal_step:
            built["equal_effective_step_mean"] = step_tables.equal_step_mean_table(runs, tests), []
        else:
            skipped.append("equal_effective_step_mean: no equal-step pairing with 2 or more evaluated seeds")
    else:
        skipped += [f"{name}: {no_pair}" for name in ("equal_effective_step", "equal_effective_step_mean")]
    built["table3_correlation"] = paper_tables.correlation_table(runs, head.metric)
    if paired:
        built["table4_paired_ttest"] = paper_tables.paired_table(runs, tests)
        built["table4_anova"] = paper_tables.anova_table(runs)
    else:
        skipped += [f"{name}: {no_pair}" for name in ("table4_paired_ttest", "table4_anova")]
    best = selection.best_settings(runs, tests)
    built["best_setting"] = study_tables.best_setting_table(runs, best), []
    built["robust_overfitting"] = study_tables.robust_overfitting_table(runs)
    if varies_variant(runs):
        built["sweep_sensitivity"] = study_tables.sweep_table(runs)
    if "objective" in runs and runs.objective.nunique() >= 2:
        built["objectives"] = study_tables.objectives_table(runs)
    if manifest.get("paper_reference"):
        for checkpoint in CHECKPOINTS:
            built[f"paper_comparison_{checkpoint}"] = paper_tables.paper_comparison_table(runs, checkpoint)

    if averaging_tables.has_averaging(runs):
        for table, records in averaging_tables.averaging_tables(runs, epochs, study_aa_label(runs)):
            built[table.name] = table, records
    if mechanism_tables.has_probes(epochs):
        for table, records in mechanism_tables.mechanism_tables(runs, epochs, manifest.get("protocol", {})):
            built[table.name] = table, records

    protocol_path = tables_dir / PROTOCOL_FILE
    protocol_path.write_text(protocol_markdown(manifest, runs), encoding="utf-8")
    written = [protocol_path]
    for table, _ in built.values():
        written += write_table(table, study, tables_dir)
    runs_csv = tables_dir / "runs.csv"
    runs.drop(columns=list(RUNS_CSV_LEAVES_OUT), errors="ignore").to_csv(runs_csv, index=False)
    written.append(runs_csv)

    written += figures.figure_accuracy_vs_lr(runs, head, figures_dir, skipped)
    written += figures.figure_accuracy_per_epoch(runs, epochs, head, figures_dir, skipped)
    written += figures.figure_heatmap(runs, head, figures_dir, skipped)
    written += figures.figure_accuracy_vs_ratio(runs, head, figures_dir, skipped)
    if varies_variant(runs):
        written += figures.figure_sweep_heatmap(runs, head, figures_dir, skipped)
    if averaging_tables.has_averaging(runs):
        written += figures.figure_weight_averaging(runs, epochs, figures_dir, skipped)
    if mechanism_tables.has_probes(epochs):
        written += figures.figure_mechanism(runs, epochs, figures_dir, skipped)
    for note in skipped:
        log.info("study %s: skipped %s", study, note)
    # A table or figure this report skips is not left behind from an earlier report of the study.
    for name in (note.split(":")[0] for note in skipped):
        for folder, suffixes in ((tables_dir, (".md", ".tex", ".csv")), (figures_dir, (".png", ".pdf"))):
            for suffix in suffixes:
                (folder / f"{name}{suffix}").unlink(missing_ok=True)

    _, collapse = study_tables.catastrophic_overfitting(runs)  # per fast AT run; none in a study without fast AT
    summary = {
        "study": study,
        "paper_reference": bool(manifest.get("paper_reference")),
        "runs": {"expected": len(runs), "with_metrics": int((runs.metrics_problem == "").sum()),
                 "with_eval": int((runs.eval_problem == "").sum()),
                 "missing": [f"{run_label(r)} ({'; '.join(p for p in (r.metrics_problem, r.eval_problem) if p)})"
                             for r in runs.itertuples() if r.metrics_problem or r.eval_problem]},
        **{name: records for name, (_, records) in built.items()
           if name not in ("equal_effective_step_mean", "best_setting")},
        "tests": {"families": {metric: {"size": family["size"], "tables": family["tables"]}
                               for metric, family in tests.families.items()},
                  "left_out_not_like_for_like": [{key: item[key] for key in ("table", "what", "why")}
                                                 for item in tests.unlike]},
        "headline": selection.headline_records(runs, tests),
        "best_setting": best,
        "per_epoch_figure": {"rule": figures.PER_EPOCH_RULE, "points": figures.per_epoch_points(runs)}
        if len(runs) else {},
        **({"catastrophic_overfitting": collapse} if collapse else {}),
        "skipped": skipped,
    }
    summary_path = tables_dir / "summary.json"
    summary_path.write_text(json.dumps(rounded(summary), indent=2, ensure_ascii=False) + "\n",
                            encoding="utf-8")
    written.append(summary_path)
    return written
