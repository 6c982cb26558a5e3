"""deat.report against hand-built metrics.json / eval.json: cell values and formatting, statistics against scipy,
LaTeX well-formedness, figures, partial grids and the paper column."""

import csv
import json
import math
import re
import statistics
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from deat import report
from deat.report import CHECKPOINTS

ARCH = "preact_resnet18"
LRS = [0.01, 0.02, 0.1]
BATCH_SIZES = [64, 128]
SEEDS = [0, 1]
EVAL_NAME = "eval_0123abcd.json"
PROTOCOL = {"dataset": "mnist5k", "epochs": 3, "schedule": "piecewise", "pgd_at_momentum": 0.9, "k1": 1.0,
            "k2": 0.8, "eps": 0.1, "pgd_steps": 5, "seeds": SEEDS,
            "checkpoint_rule": "best = highest PGD accuracy on a held-out validation split",
            "eval": {"n_examples": 500, "pgd_steps": 20}}


def best_pgd10(method: str, lr: float, batch_size: int, seed: int) -> float:
    """The fixture's best-checkpoint PGD-10 accuracy: grows with α and b, DEAT 1.2 (+0.2 per α step) points above
    PGD-AT, seed 1 0.4 points above seed 0; the i·j term keeps correlations below 1."""
    i, j = LRS.index(lr), BATCH_SIZES.index(batch_size)
    gain = 0.012 + 0.002 * i if method == "deat" else 0.0
    return round(0.40 + 0.03 * i + 0.01 * j + 0.002 * i * j + gain + 0.004 * seed, 6)


def write_run(run_dir: Path, method: str, lr: float, batch_size: int, seed: int, momentum: float = 0.9,
              eval_name: str = "eval.json") -> None:
    acc = best_pgd10(method, lr, batch_size, seed)
    step = lr / (1 - momentum) if method == "pgd_at" else lr / math.sqrt(5)
    epochs = [{"epoch": e, "lr": lr, "train_loss": 1.0, "train_robust_acc": acc - 0.1 + 0.1 * e,
               "val_clean_acc": 0.8, "val_pgd_acc": acc, "test_clean_acc": 0.8, "test_pgd_acc": acc - 0.01 * (e % 2)}
              for e in (1, 2, 3)]
    metrics = {"config": {"lr": lr}, "status": "complete", "effective_step": step,
               "environment": {"device": "cpu", "device_name": "test-cpu", "torch": "2.14.1"},
               "epochs": epochs, "best": {"epoch": 2, "test_pgd_acc": acc, "val_pgd_acc": acc},
               "last": {"epoch": 3, "test_pgd_acc": acc - 0.01, "val_pgd_acc": acc}, "wall_time_s": 1.0}
    evaluation = {"settings": {"n_examples": 500}, "examples": {"n": 500},
                  "checkpoints": {"best": {"clean_acc": acc + 0.3, "pgd10_acc": acc, "aa_acc": acc - 0.03},
                                  "last": {"clean_acc": acc + 0.31, "pgd10_acc": acc - 0.02, "aa_acc": acc - 0.05}}}
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    (run_dir / eval_name).write_text(json.dumps(evaluation))


def make_study(root: Path, paper_reference: bool = False) -> dict:
    runs = []
    for method in ("pgd_at", "deat"):
        for lr in LRS:
            for batch_size in BATCH_SIZES:
                for seed in SEEDS:
                    run_dir = root / "runs" / method / f"lr{lr}_bs{batch_size}_seed{seed}"
                    # As the workflow writes it: eval_<hash of the eval settings>.json, named by the manifest.
                    write_run(run_dir, method, lr, batch_size, seed, eval_name=EVAL_NAME)
                    runs.append({"arch": ARCH, "method": method, "lr": lr, "batch_size": batch_size, "seed": seed,
                                 "dir": str(run_dir.relative_to(root)),
                                 "eval": str((run_dir / EVAL_NAME).relative_to(root))})
    return {"study": "unit_test", "description": "fixture", "protocol": PROTOCOL, "paper_reference": paper_reference,
            "runs": runs}


def read_csv_table(path: Path) -> tuple[list[str], dict[tuple, dict]]:
    """(comment lines, rows keyed by (α, b)) of a Table 2 CSV."""
    lines = path.read_text(encoding="utf-8").splitlines()
    comments = [line for line in lines if line.startswith("#")]
    rows = list(csv.DictReader(line for line in lines if not line.startswith("#")))
    return comments, {(row["α"], row.get("b")): row for row in rows}


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    manifest = make_study(root)
    written = report.build_report(manifest, root / "tables", root / "figures", runs_root=root)
    return root, manifest, written


def test_table2_cells_are_seed_means_with_sample_std_and_delta(full_report):
    root, _, written = full_report
    _, rows = read_csv_table(root / "tables" / "table2_pgd10_best.csv")
    # Hand computation for α=0.01, b=64: PGD-AT seeds 0.400, 0.404; DEAT 0.412, 0.416.
    assert rows[("0.01", "64")][f"{ARCH} PGD-AT"] == "40.20 ± 0.28"
    assert rows[("0.01", "64")][f"{ARCH} DEAT"] == "41.40 ± 0.28"
    assert rows[("0.01", "64")][f"{ARCH} Δ"] == "+1.20"
    for lr in LRS:
        for batch_size in BATCH_SIZES:
            row = rows[(f"{lr:g}", str(batch_size))]
            for method, label in (("pgd_at", "PGD-AT"), ("deat", "DEAT")):
                values = [best_pgd10(method, lr, batch_size, seed) for seed in SEEDS]
                expected = f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"
                assert row[f"{ARCH} {label}"] == expected
    markdown = (root / "tables" / "table2_pgd10_best.md").read_text(encoding="utf-8")
    assert "| 0.01 | 64 | 40.20 ± 0.28 | 41.40 ± 0.28 | +1.20 |" in markdown
    # Last checkpoint is 2 points lower, clean 30 points higher (fixture), AutoAttack 3 points lower.
    _, last = read_csv_table(root / "tables" / "table2_pgd10_last.csv")
    _, clean = read_csv_table(root / "tables" / "table2_clean_best.csv")
    _, autoattack = read_csv_table(root / "tables" / "table2_aa_best.csv")
    assert last[("0.01", "64")][f"{ARCH} PGD-AT"] == "38.20 ± 0.28"
    assert clean[("0.01", "64")][f"{ARCH} PGD-AT"] == "70.20 ± 0.28"
    assert autoattack[("0.01", "64")][f"{ARCH} PGD-AT"] == "37.20 ± 0.28"
    assert {p.suffix for p in written if p.stem == "table2_pgd10_best"} == {".md", ".tex", ".csv"}


def test_every_table_states_its_protocol(full_report):
    root, _, _ = full_report
    for path in (root / "tables").glob("*.csv"):
        if path.name == "runs.csv":
            continue
        text = path.read_text(encoding="utf-8")
        for fact in ("PGD-AT: SGD, momentum 0.9", "checkpoint_rule=best = highest PGD", "seeds=[0, 1]",
                     "eval.n_examples=500", "Ran on: test-cpu (24 runs)"):
            assert fact in text, (path.name, fact)
            assert fact in path.with_suffix(".md").read_text(encoding="utf-8"), (path.name, fact)
        assert all(line.startswith("#") for line in text.splitlines()[:5])
        assert r"pgd\_at\_momentum=0.9" in path.with_suffix(".tex").read_text(encoding="utf-8")


def test_correlations_match_scipy_on_the_seed_means(full_report):
    root, _, _ = full_report
    summary = json.loads((root / "tables" / "summary.json").read_text())
    lrs = np.array([lr for lr in LRS for _ in BATCH_SIZES])
    batches = np.array([b for _ in LRS for b in BATCH_SIZES])
    for method in ("pgd_at", "deat"):
        means = np.array([statistics.mean(best_pgd10(method, lr, b, s) for s in SEEDS) for lr in LRS
                          for b in BATCH_SIZES])
        for x_name, x in (("lr", lrs), ("lr_over_batch", lrs / batches)):
            for test, function in (("pearson", stats.pearsonr), ("spearman", stats.spearmanr),
                                   ("kendall", stats.kendalltau)):
                expected = function(x, means)
                (got,) = [r for r in summary["table3_correlation"] if r["method"] == method and r["x"] == x_name
                          and r["test"] == test and r["checkpoint"] == "best"]
                assert got["statistic"] == pytest.approx(expected[0], abs=1e-12)
                assert got["p"] == pytest.approx(expected[1], rel=1e-9)
    text = (root / "tables" / "table3_correlation.csv").read_text(encoding="utf-8")
    pearson = stats.pearsonr(lrs, np.array([statistics.mean(best_pgd10("deat", lr, b, s) for s in SEEDS)
                                            for lr in LRS for b in BATCH_SIZES]))
    p_text = f"{pearson[1]:.3f}" if pearson[1] >= 0.001 else f"{pearson[1]:.1e}"
    assert f"{pearson[0]:.3f} (p={p_text})" in text


def test_perfectly_linear_data_has_correlation_one_and_too_few_points_a_dash(tmp_path):
    manifest = {"study": "linear", "protocol": {}, "runs": []}
    for lr in (0.1, 0.2, 0.3, 0.4):
        run_dir = tmp_path / f"lr{lr}"
        run_dir.mkdir()
        (run_dir / "eval.json").write_text(json.dumps({"checkpoints": {"best": {"pgd10_acc": 0.2 + lr}}}))
        manifest["runs"].append({"arch": "a", "method": "pgd_at", "lr": lr, "batch_size": 128, "seed": 0,
                                 "dir": str(run_dir)})
    manifest["runs"].append({"arch": "a", "method": "deat", "lr": 0.1, "batch_size": 128, "seed": 0,
                             "dir": str(tmp_path / "never_ran")})
    runs, _ = report.load_runs(manifest)
    table, summary = report.correlation_table(runs)
    by_key = {(r["method"], r["test"], r["checkpoint"]): r for r in summary if r["x"] == "lr"}
    for test in ("pearson", "spearman", "kendall"):
        assert by_key[("pgd_at", test, "best")]["statistic"] == pytest.approx(1.0)
    assert by_key[("pgd_at", "kendall", "best")]["p"] == pytest.approx(2 / 24)  # exact: 1 of 4! orderings, two-sided
    deat_row = next(row for row in table.rows if row[1] == "DEAT" and row[2] == "best")
    assert deat_row[3] == "0 of 1" and all(cell == "—ᵃ" for cell in deat_row[4:])
    assert any("fewer than 3 grid points" in note for note in table.notes)


def test_paired_ttest_matches_scipy(full_report):
    root, _, _ = full_report
    summary = json.loads((root / "tables" / "summary.json").read_text())
    points = [(lr, b, s) for lr in LRS for b in BATCH_SIZES for s in SEEDS]
    deat = [best_pgd10("deat", *point) for point in points]
    pgd = [best_pgd10("pgd_at", *point) for point in points]
    expected = stats.ttest_rel(deat, pgd)
    for checkpoint in CHECKPOINTS:  # the fixture's last checkpoint is best − 0.02 for both methods
        (got,) = [r for r in summary["table4_paired_ttest"] if r["metric"] == "pgd10_acc"
                  and r["checkpoint"] == checkpoint]
        assert (got["n_pairs"], got["n_pairs_expected"]) == (12, 12)
        assert got["mean_delta_acc"] == pytest.approx(statistics.mean(d - p for d, p in zip(deat, pgd)))
        assert got["t"] == pytest.approx(expected.statistic, rel=1e-6)
        assert got["p"] == pytest.approx(expected.pvalue, rel=1e-6)
    markdown = (root / "tables" / "table4_paired_ttest.md").read_text(encoding="utf-8")
    # Hand computation: DEAT gains 1.2, 1.4, 1.6 points at the three α, 4 pairs each: mean +1.40.
    assert f"| {ARCH} | PGD-10 robust | best | 12 | +1.40 | {expected.statistic:.2f} | {expected.pvalue:.1e} |" \
        in markdown


def test_paired_ttest_value_against_scipy(tmp_path):
    manifest = {"study": "ttest", "protocol": {}, "runs": []}
    differences = {0.01: 0.010, 0.02: 0.025, 0.03: -0.004, 0.05: 0.018}
    for lr, difference in differences.items():
        for method, value in (("pgd_at", 0.4 + lr), ("deat", 0.4 + lr + difference)):
            run_dir = tmp_path / f"{method}{lr}"
            run_dir.mkdir()
            (run_dir / "eval.json").write_text(json.dumps({"checkpoints": {"best": {"pgd10_acc": value}}}))
            manifest["runs"].append({"arch": "a", "method": method, "lr": lr, "batch_size": 128, "seed": 0,
                                     "dir": str(run_dir)})
    runs, _ = report.load_runs(manifest)
    table, summary = report.paired_ttest_table(runs)
    expected = stats.ttest_rel([0.4 + lr + d for lr, d in differences.items()], [0.4 + lr for lr in differences])
    (got,) = summary
    assert got["t"] == pytest.approx(expected.statistic) and got["p"] == pytest.approx(expected.pvalue)
    assert table.rows == [["a", "PGD-10 robust", "best", "4", f"{100 * statistics.mean(differences.values()):+.2f}",
                           f"{expected.statistic:.2f}", f"{expected.pvalue:.3f}"]]

    # Every difference equal (up to float rounding): no t-test, rather than an absurd t.
    for path in tmp_path.glob("deat*/eval.json"):
        value = json.loads(path.read_text())["checkpoints"]["best"]["pgd10_acc"]
        lr = next(lr for lr in differences if path.parent.name == f"deat{lr}")
        path.write_text(json.dumps({"checkpoints": {"best": {"pgd10_acc": value - differences[lr] + 0.01}}}))
    table, summary = report.paired_ttest_table(report.load_runs(manifest)[0])
    assert table.rows[0][4:] == ["+1.00", "—", "—"] and summary[0]["t"] is None


def _check_latex(text: str) -> None:
    body = re.sub(r"\\[{}%&_#$]", "", text)  # escaped characters are not structure
    body = "\n".join(line for line in body.splitlines() if not line.startswith("%"))
    depth = 0
    for char in body:
        depth += {"{": 1, "}": -1}.get(char, 0)
        assert depth >= 0, "closing brace without an opening one"
    assert depth == 0, "unbalanced braces"
    environments = []
    for kind, name in re.findall(r"\\(begin|end)\{(\w+)\}", body):
        if kind == "begin":
            environments.append(name)
        else:
            assert environments.pop() == name
    assert not environments
    assert not re.search(r"(?<!\\)[_%&#]", re.sub(r"\\(cmidrule|multicolumn)", "", body).replace(" & ", " "))
    if r"\begin{tabular}" in body:
        assert all(rule in body for rule in (r"\toprule", r"\midrule", r"\bottomrule"))
        columns = len(re.search(r"\\begin\{tabular\}\{(\w+)\}", body).group(1))
        for line in body.splitlines():
            if line.endswith(r"\\") and r"\multicolumn" not in line:
                assert line.count(" & ") == columns - 1, line


def test_latex_is_well_formed(full_report):
    root, _, _ = full_report
    tex_files = sorted((root / "tables").glob("*.tex"))
    assert len(tex_files) >= 10
    for path in tex_files:
        _check_latex(path.read_text(encoding="utf-8"))
    table2 = (root / "tables" / "table2_pgd10_best.tex").read_text(encoding="utf-8")
    assert r"\multicolumn{3}{c}{preact\_resnet18}" in table2
    assert r"0.01 & 64 & 40.20 $\pm$ 0.28 & 41.40 $\pm$ 0.28 & +1.20 \\" in table2


def test_latex_escape_handles_specials_and_minus():
    assert report.latex_escape("a_b 50% & #1 {x} -0.5 x-1") == r"a\_b 50\% \& \#1 \{x\} $-$0.5 x-1"


def test_figures_are_written_as_png_and_pdf(full_report):
    root, _, written = full_report
    figures = [p for p in written if p.parent == root / "figures"]
    stems = {p.stem for p in figures}
    assert stems == {"robust_acc_vs_lr", "robust_acc_per_epoch", "heatmap_lr_batch", "robust_acc_vs_lr_over_b"}
    for path in figures:
        magic = b"\x89PNG" if path.suffix == ".png" else b"%PDF"
        assert path.stat().st_size > 1000 and path.read_bytes().startswith(magic)


def test_equal_effective_step_pairs_and_the_empty_case(full_report, tmp_path):
    root, _, _ = full_report
    # Momentum 0.9 (×10) vs DEAT (×1/√5) at α ∈ {0.01, 0.02, 0.1}: no equal steps, so the table says so.
    assert "No DEAT/PGD-AT pair" in (root / "tables" / "equal_effective_step.md").read_text(encoding="utf-8")
    manifest = {"study": "pairs", "protocol": {"pgd_at_momentum": 0.0, "k1": 1.0}, "runs": []}
    for method, lr in (("pgd_at", 0.01), ("deat", 0.01 * math.sqrt(5) * 1.005), ("deat", 0.05)):
        run_dir = tmp_path / f"{method}{lr}"
        write_run(run_dir, method, 0.01 if method == "pgd_at" else 0.02, 64, 0, momentum=0.0)
        metrics = json.loads((run_dir / "metrics.json").read_text())
        metrics["effective_step"] = lr if method == "pgd_at" else lr / math.sqrt(5)
        (run_dir / "metrics.json").write_text(json.dumps(metrics))
        manifest["runs"].append({"arch": ARCH, "method": method, "lr": lr, "batch_size": 64, "seed": 0,
                                 "dir": str(run_dir)})
    runs, _ = report.load_runs(manifest)
    table, summary = report.equal_step_table(runs)
    assert len(table.rows) == 1 and summary[0]["lr_deat"] == pytest.approx(0.01 * math.sqrt(5) * 1.005)
    pgd, deat = best_pgd10("pgd_at", 0.01, 64, 0), best_pgd10("deat", 0.02, 64, 0)
    assert table.rows[0][6:9] == [f"{100 * pgd:.2f}", f"{100 * deat:.2f}", f"{100 * (deat - pgd):+.2f}"]


def test_effective_step_formula():
    assert report.formula_effective_step("pgd_at", 0.01, 0.9, None) == pytest.approx(0.1)
    assert report.formula_effective_step("deat", 0.1, None, 1.0) == pytest.approx(0.1 / math.sqrt(5))


def test_robust_overfitting_per_run(full_report):
    root, _, _ = full_report
    rows = list(csv.DictReader(line for line in (root / "tables" / "robust_overfitting.csv")
                               .read_text(encoding="utf-8").splitlines() if not line.startswith("#")))
    row = next(r for r in rows if r["method"] == "DEAT" and r["α"] == "0.1" and r["b"] == "128" and r["seed"] == "1")
    acc = best_pgd10("deat", 0.1, 128, 1)
    # Fixture: last = best − 0.01; final epoch (3): train = acc + 0.2, test = acc − 0.01.
    assert row["best − last"] == "+1.00"
    assert row["train − test gap"] == f"{100 * ((acc + 0.2) - (acc - 0.01)):+.2f}" == "+21.00"


def test_partial_grid_shows_dash_footnote_and_marks_the_short_mean(tmp_path):
    manifest = make_study(tmp_path)
    dropped = next(r for r in manifest["runs"] if r["method"] == "deat" and r["lr"] == 0.02
                   and r["batch_size"] == 128 and r["seed"] == 1)
    for path in (Path(dropped["dir"]) / "metrics.json", dropped["eval"]):
        (tmp_path / path).unlink()
    both_gone = [r for r in manifest["runs"] if r["method"] == "pgd_at" and r["lr"] == 0.1 and r["batch_size"] == 64]
    for run in both_gone:
        (tmp_path / run["eval"]).unlink()
    report.build_report(manifest, tmp_path / "tables", tmp_path / "figures", runs_root=tmp_path)

    comments, rows = read_csv_table(tmp_path / "tables" / "table2_pgd10_best.csv")
    assert rows[("0.02", "128")][f"{ARCH} DEAT"] == f"{100 * best_pgd10('deat', 0.02, 128, 0):.2f}†"
    assert rows[("0.1", "64")][f"{ARCH} PGD-AT"] == "—"
    assert rows[("0.1", "64")][f"{ARCH} Δ"] == "—"
    notes = "\n".join(comments)
    assert f"{ARCH} DEAT α=0.02 b=128 (n=1 of 2 seeds)" in notes
    assert f"{ARCH} DEAT α=0.02 b=128 seed 1 (no {EVAL_NAME})" in notes
    assert f"{ARCH} PGD-AT α=0.1 b=64 seed 0 (no {EVAL_NAME})" in notes
    overfitting = (tmp_path / "tables" / "robust_overfitting.md").read_text(encoding="utf-8")
    assert f"{ARCH} DEAT α=0.02 b=128 seed 1 (no metrics.json)" in overfitting
    summary = json.loads((tmp_path / "tables" / "summary.json").read_text())
    (ttest,) = [r for r in summary["table4_paired_ttest"] if r["metric"] == "pgd10_acc" and r["checkpoint"] == "best"]
    assert (ttest["n_pairs"], ttest["n_pairs_expected"]) == (9, 12)
    for path in (tmp_path / "tables").glob("*.tex"):
        _check_latex(path.read_text(encoding="utf-8"))


def test_paper_reference_study_shows_the_paper_numbers(tmp_path):
    manifest = make_study(tmp_path, paper_reference=True)
    manifest["runs"] = [run for run in manifest["runs"] if run["batch_size"] == 128]  # the paper's only b
    written = report.build_report(manifest, tmp_path / "tables", tmp_path / "figures", runs_root=tmp_path)
    assert tmp_path / "tables" / "paper_comparison_best.tex" in written
    paper = {(row["alpha"], row["arch"], row["method"]): row["robust_acc"] for row in csv.DictReader(
        line for line in report.PAPER_TABLE2_CSV.read_text().splitlines() if not line.startswith("#"))}
    assert paper[("0.010", "preact_resnet18", "pgd_at")] == "44.11" and len(paper) == 84
    rows = {row["α"]: row for row in csv.DictReader(
        line for line in (tmp_path / "tables" / "paper_comparison_best.csv").read_text(encoding="utf-8").splitlines()
        if not line.startswith("#"))}
    assert "b" not in rows["0.01"]  # one batch size: no b column
    assert (rows["0.01"]["PGD-AT paper"], rows["0.01"]["DEAT paper"]) == ("44.11", "45.07")
    assert (rows["0.02"]["PGD-AT paper"], rows["0.1"]["DEAT paper"]) == ("46.30", "48.84")
    ours = statistics.mean(best_pgd10("deat", 0.01, 128, s) for s in SEEDS)
    assert rows["0.01"]["DEAT ours − paper"] == f"{100 * ours - 45.07:+.2f}" == "-2.67"
    # One batch size: no α × b heatmap and no α/b figure, each skipped with a note.
    skipped = json.loads((tmp_path / "tables" / "summary.json").read_text())["skipped"]
    assert [note.split(":")[0] for note in skipped] == ["heatmap_lr_batch", "robust_acc_vs_lr_over_b"]
    assert {p.name for p in written if p.parent.name == "figures"} == {
        "robust_acc_vs_lr.png", "robust_acc_vs_lr.pdf", "robust_acc_per_epoch.png", "robust_acc_per_epoch.pdf"}


def test_cli_results_dir_mode_regenerates_every_study(tmp_path):
    manifest = make_study(tmp_path)
    for study in ("first", "second"):
        runs = [dict(r, dir=f"results/{r['dir']}", eval=f"results/{r['eval']}") for r in manifest["runs"]]
        study_manifest = dict(manifest, study=study, runs=runs)
        path = tmp_path / "results" / "studies" / study / "manifest.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(study_manifest))
    (tmp_path / "runs").rename(tmp_path / "results" / "runs")
    args = report.get_args_parser().parse_args(["--results-dir", str(tmp_path / "results"),
                                                "--figures-dir", str(tmp_path / "fig-{study}")])
    assert report.main(args) == 0
    for study in ("first", "second"):
        _, rows = read_csv_table(tmp_path / "results" / "tables" / study / "table2_pgd10_best.csv")
        assert rows[("0.01", "64")][f"{ARCH} PGD-AT"] == "40.20 ± 0.28"
        assert (tmp_path / f"fig-{study}" / "robust_acc_vs_lr.pdf").is_file()


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="method 'sgd' is not one of pgd_at, deat"):
        report.load_runs({"study": "x", "runs": [{"arch": "a", "method": "sgd", "lr": 0.1, "batch_size": 1,
                                                  "seed": 0, "dir": "d"}]})
    with pytest.raises(KeyError, match="missing key 'dir'"):
        report.load_runs({"study": "x", "runs": [{"arch": "a", "method": "deat", "lr": 0.1, "batch_size": 1,
                                                  "seed": 0}]})
    args = report.get_args_parser().parse_args(["--manifest", "a.json", "b.json", "--tables-dir", "out"])
    with pytest.raises(ValueError, match="several studies need '\\{study\\}'"):
        report.main(args)


def test_a_study_that_has_not_run_yet_renders_dashes(tmp_path):
    manifest = make_study(tmp_path)
    manifest["runs"] = [dict(run, dir=f"elsewhere/{run['dir']}", eval=None) for run in manifest["runs"]]
    written = report.build_report(manifest, tmp_path / "tables", tmp_path / "figures", runs_root=tmp_path)
    _, rows = read_csv_table(tmp_path / "tables" / "table2_pgd10_best.csv")
    assert set(rows[("0.01", "64")].values()) == {"0.01", "64", "—"}
    summary = json.loads((tmp_path / "tables" / "summary.json").read_text())
    assert summary["runs"]["with_metrics"] == summary["runs"]["with_eval"] == 0
    assert not [p for p in written if p.parent == tmp_path / "figures"]
    assert any(note.startswith("heatmap_lr_batch") for note in summary["skipped"])


def test_a_k1_k2_sweep_is_reported_per_variant_with_anova(tmp_path):
    """A DEAT-only k1 × k2 study: every variant is its own row, the sensitivity table's spread and ANOVA match a
    hand computation and scipy, the effective step follows each run's k1, and the k1 × k2 heatmap is drawn."""
    k1s, k2s, seeds, lr = [0.5, 2.0], [0.6, 0.9], [0, 1, 2], LRS[-1]
    accuracy = {(k1, k2, seed): 0.30 + 0.05 * (k1 == 2.0) + 0.01 * (k2 == 0.9) + 0.002 * seed * (1 + (k2 == 0.9))
                for k1 in k1s for k2 in k2s for seed in seeds}
    runs = []
    for (k1, k2, seed), acc in accuracy.items():
        run_dir = tmp_path / "runs" / f"k1{k1}_k2{k2}_seed{seed}"
        write_run(run_dir, "deat", lr, 128, seed)
        metrics = json.loads((run_dir / "metrics.json").read_text())
        del metrics["effective_step"]  # the report must then use the formula with this run's k1
        (run_dir / "metrics.json").write_text(json.dumps(metrics))
        evaluation = json.loads((run_dir / "eval.json").read_text())
        evaluation["checkpoints"]["best"]["pgd10_acc"] = acc
        (run_dir / "eval.json").write_text(json.dumps(evaluation))
        runs.append({"arch": ARCH, "method": "deat", "lr": lr, "batch_size": 128, "seed": seed,
                     "sweep": {"k1": k1, "k2": k2}, "dir": str(run_dir.relative_to(tmp_path))})
    manifest = {"study": "sweep", "protocol": {**PROTOCOL, "k1": k1s, "k2": k2s, "seeds": seeds}, "runs": runs}
    written = report.build_report(manifest, tmp_path / "tables", tmp_path / "figures", runs_root=tmp_path)

    lines = (tmp_path / "tables" / "table2_pgd10_best.csv").read_text(encoding="utf-8").splitlines()
    rows = list(csv.DictReader(line for line in lines if not line.startswith("#")))
    assert [row["variant"] for row in rows] == ["k1=0.5, k2=0.6", "k1=0.5, k2=0.9", "k1=2, k2=0.6", "k1=2, k2=0.9"]
    # k1 = 2, k2 = 0.9: 0.36 + 0.004·seed → 36.00, 36.40, 36.80 → mean 36.40, sd 0.40.
    assert rows[3][f"{ARCH} DEAT"] == "36.40 ± 0.40"

    sweep = list(csv.DictReader(line for line in (tmp_path / "tables" / "sweep_sensitivity.csv")
                                .read_text(encoding="utf-8").splitlines() if not line.startswith("#")))
    assert [row["effective step"] for row in sweep] == [f"{lr / math.sqrt(1.5**2 + 0.25):.4g}"] * 2 + [
        f"{lr / math.sqrt(13):.4g}"] * 2
    summary = json.loads((tmp_path / "tables" / "summary.json").read_text())
    robust = next(r for r in summary["sweep_sensitivity"] if r["metric"] == "eval_best_pgd10_acc")
    groups = [[accuracy[(k1, k2, s)] for s in seeds] for k1 in k1s for k2 in k2s]
    means = [statistics.mean(g) for g in groups]
    assert robust["range_of_means_acc"] == pytest.approx(max(means) - min(means))
    assert robust["anova_p"] == pytest.approx(stats.f_oneway(*groups).pvalue)
    assert robust["n_variants"] == 4
    markdown = (tmp_path / "tables" / "sweep_sensitivity.md").read_text(encoding="utf-8")
    assert "k1=[0.5, 2]" in markdown  # the protocol lists the swept values, not a default
    assert tmp_path / "figures" / "heatmap_sweep.png" in written


def test_a_one_method_study_states_only_its_own_optimizer(tmp_path):
    manifest = make_study(tmp_path)
    manifest["runs"] = [run for run in manifest["runs"] if run["method"] == "pgd_at"]
    report.build_report(manifest, tmp_path / "tables", tmp_path / "figures", runs_root=tmp_path)
    text = (tmp_path / "tables" / "table2_pgd10_best.md").read_text(encoding="utf-8")
    assert "Optimizers: PGD-AT: SGD, momentum 0.9." in text and "DEAT: Algorithm 2" not in text
