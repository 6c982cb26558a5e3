"""deat.report against hand-built metrics.json / eval.json: cell values and formatting, statistics against scipy's
exact methods and a hand-computed ANOVA, plain CSVs, the protocol file, LaTeX well-formedness, figures, partial
grids, masking flags and the paper column."""

import csv
import json
import math
import re
import shutil
import statistics
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from deat.report import (figures, loading, paper_tables, power, protocol, render, statistics as report_stats,
                         step_tables, study_tables)
from deat.report.cli import get_args_parser, main as report_main
from deat.report.loading import CHECKPOINTS, load_runs
from deat.report.protocol import protocol_markdown
from deat.report.study import build_report

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


def read_csv_table(path: Path) -> dict[tuple, dict]:
    """Rows keyed by (α, b) of a Table 2 CSV, cells as written."""
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    return {(row["α"], row.get("b")): row for row in frame.to_dict("records")}


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    manifest = make_study(root)
    written = build_report(manifest, root / "tables", root / "figures", runs_root=root)
    return root, manifest, written


def test_table2_cells_are_seed_means_with_sample_std_and_delta(full_report):
    root, _, written = full_report
    rows = read_csv_table(root / "tables" / "table2_pgd10_best.csv")
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
    assert re.search(r"\| 0\.01 +\| +64 \| +40\.20 ± 0\.28 \| +41\.40 ± 0\.28 \| +\+1\.20 \|", markdown)
    # Last checkpoint is 2 points lower, clean 30 points higher (fixture), AutoAttack 3 points lower.
    last = read_csv_table(root / "tables" / "table2_pgd10_last.csv")
    clean = read_csv_table(root / "tables" / "table2_clean_best.csv")
    autoattack = read_csv_table(root / "tables" / "table2_aa_best.csv")
    assert last[("0.01", "64")][f"{ARCH} PGD-AT"] == "38.20 ± 0.28"
    assert clean[("0.01", "64")][f"{ARCH} PGD-AT"] == "70.20 ± 0.28"
    assert autoattack[("0.01", "64")][f"{ARCH} PGD-AT"] == "37.20 ± 0.28"
    assert {p.suffix for p in written if p.stem == "table2_pgd10_best"} == {".md", ".tex", ".csv"}


def test_the_protocol_is_written_once_and_every_table_links_it(full_report):
    root, _, written = full_report
    text = (root / "tables" / "protocol.md").read_text(encoding="utf-8")
    assert root / "tables" / "protocol.md" in written
    for fact in ("PGD-AT: SGD, momentum 0.9", "| checkpoint_rule | best = highest PGD", "| seeds | [0, 1] |",
                 "| eval.n_examples | 500 |", "Ran on: test-cpu (24 runs)", "mean ± sample sd (ddof = 1) over seeds"):
        assert fact in text, fact
    for path in (root / "tables").glob("*.md"):
        if path.name == "protocol.md":
            continue
        markdown = path.read_text(encoding="utf-8")
        first = markdown.splitlines()[0]
        assert first.startswith("**") and first.endswith("(protocol: [protocol.md](protocol.md))"), path.name
        assert "checkpoint_rule" not in markdown and "Ran on" not in markdown, path.name  # not repeated
        assert "protocol.md" in path.with_suffix(".tex").read_text(encoding="utf-8")


@pytest.mark.parametrize("decoupled, line", [
    (True, "DEAT: Algorithm 2, k1=1, k2=0.8, decoupled weight decay (θ ← θ·(1 − α·wd), PNM's default)."),
    (False, "DEAT: Algorithm 2, k1=1, k2=0.8, coupled weight decay (g ← g + wd·θ, as SGD's)."),
    ([False, True], "DEAT: Algorithm 2, k1=1, k2=0.8, weight decay swept: coupled weight decay (g ← g + wd·θ, as "
                    "SGD's) and decoupled weight decay (θ ← θ·(1 − α·wd), PNM's default) (each run's variant says "
                    "which)."),  # a study that sweeps it (the workflow writes the swept values)
    (None, "DEAT: Algorithm 2, k1=1, k2=0.8.")])  # a study with no DEAT-decay setting in its protocol
def test_the_protocol_names_deats_kind_of_weight_decay(decoupled, line):
    # Equal steps are not equal decay: a reader of the tables needs to know which decay DEAT had.
    protocol = dict(PROTOCOL) if decoupled is None else {**PROTOCOL, "decoupled_weight_decay": decoupled}
    runs = pd.DataFrame({"method": ["pgd_at", "deat"], "label": ["PGD-AT", "DEAT"], "arch": ARCH, "variant": "",
                         "lr": 0.1, "batch_size": 64, "seed": 0})
    text = protocol_markdown({"study": "decay", "protocol": protocol}, runs)
    assert "Optimizers: PGD-AT: SGD, momentum 0.9; " + line in text


def test_every_csv_loads_with_read_csv_and_no_options(full_report):
    root, _, _ = full_report
    paths = sorted((root / "tables").glob("*.csv"))
    assert len(paths) >= 12
    for path in paths:
        frame = pd.read_csv(path)
        assert len(frame.columns) >= 2 and not any(str(c).startswith("#") for c in frame.columns), path.name
    assert list(pd.read_csv(root / "tables" / "table2_pgd10_best.csv").columns) == [
        "α", "b", f"{ARCH} PGD-AT", f"{ARCH} DEAT", f"{ARCH} Δ"]


def test_milestones_show_as_the_user_wrote_them():
    assert protocol.milestones_text([4 * 100 / 110, 4 * 105 / 110], 4) == \
        "100/110 and 105/110 of the epochs (epoch 3.64, 3.82)"
    assert protocol.milestones_text([2.0, 3.0], 4) == "epoch 2, 3"
    assert protocol.milestones_text([2.5], 4) == "epoch 2.50"


def exact_p(x, y, test: str) -> tuple[float, float]:
    """scipy's exact small-n tests, computed independently of deat.report: every one of the n! orderings."""
    if test == "kendall" and len(set(x)) == len(x) and len(set(y)) == len(y):
        result = stats.kendalltau(x, y, method="exact")
    elif test == "kendall":  # ties: scipy's exact method does not apply; all orderings instead
        result = stats.permutation_test((x,), lambda xs: stats.kendalltau(xs, y).statistic, n_resamples=np.inf,
                                        permutation_type="pairings")
    elif test == "pearson":
        result = stats.pearsonr(x, y, method=stats.PermutationMethod(n_resamples=np.inf))
    else:
        result = stats.permutation_test((x,), lambda xs: stats.spearmanr(xs, y).statistic, n_resamples=np.inf,
                                        permutation_type="pairings")
    return result.statistic, result.pvalue


def test_correlations_match_scipys_exact_tests_on_the_seed_means(full_report):
    root, _, _ = full_report
    summary = json.loads((root / "tables" / "summary.json").read_text())
    lrs = np.array([lr for lr in LRS for _ in BATCH_SIZES])
    batches = np.array([b for _ in LRS for b in BATCH_SIZES])
    for method in ("pgd_at", "deat"):
        means = np.array([statistics.mean(best_pgd10(method, lr, b, s) for s in SEEDS) for lr in LRS
                          for b in BATCH_SIZES])
        for x_name, x in (("lr", lrs), ("lr_over_batch", lrs / batches)):
            for test in ("pearson", "spearman", "kendall"):
                statistic, p = exact_p(x, means, test)
                (got,) = [r for r in summary["table3_correlation"] if r["method"] == method and r["x"] == x_name
                          and r["test"] == test and r["checkpoint"] == "best"]
                assert got["statistic"] == pytest.approx(statistic, rel=1e-8)  # summary.json keeps 9 digits
                assert got["p"] == pytest.approx(p, rel=1e-8), (method, x_name, test)
    text = (root / "tables" / "table3_correlation.csv").read_text(encoding="utf-8")
    means = np.array([statistics.mean(best_pgd10("deat", lr, b, s) for s in SEEDS) for lr in LRS
                      for b in BATCH_SIZES])
    r, p = exact_p(lrs, means, "pearson")
    assert f"{r:.3f} (p={p:.3f})" in text
    assert "exact permutation p (all 6! orderings)" in (root / "tables" / "table3_correlation.md").read_text()


def test_small_n_p_values_are_exact_not_asymptotic():
    # Spearman ρ = 1 from 4 points: exact two-sided p = 2/4! ≈ 0.083 (the asymptotic p is 0).
    x = np.array([0.01, 0.02, 0.05, 0.1])
    for test in ("pearson", "spearman", "kendall"):
        statistic, p = report_stats.correlation(x, 0.3 + x, test)
        assert statistic == pytest.approx(1.0) and p == pytest.approx(2 / 24)
    # ρ = 0.943 at n = 6 (one swapped pair): exact p = 0.0167, where the t approximation gives 0.005.
    y = np.array([1, 3, 2, 4, 5, 6.0])
    statistic, p = report_stats.correlation(np.arange(6.0), y, "spearman")
    assert statistic == pytest.approx(0.942857, abs=1e-6)
    assert p == pytest.approx(exact_p(np.arange(6.0), y, "spearman")[1]) and p == pytest.approx(0.0167, abs=1e-4)
    assert stats.spearmanr(np.arange(6.0), y).pvalue == pytest.approx(0.0048, abs=1e-4)  # what was printed before
    # Ties: Kendall's τ-b by permutation, statistic as scipy's.
    x, y = np.array([1, 2, 2, 3, 4, 4, 5.0]), np.array([3, 1, 2, 2, 5, 6, 6.0])
    statistic, p = report_stats.correlation(x, y, "kendall")
    assert statistic == pytest.approx(stats.kendalltau(x, y).statistic)
    reference = stats.permutation_test((x,), lambda xs: stats.kendalltau(xs, y).statistic, n_resamples=np.inf,
                                       permutation_type="pairings")
    assert p == pytest.approx(reference.pvalue)


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
    runs, _ = load_runs(manifest)
    table, summary = paper_tables.correlation_table(runs)
    by_key = {(r["method"], r["test"], r["checkpoint"]): r for r in summary if r["x"] == "lr"}
    for test in ("pearson", "spearman", "kendall"):
        assert by_key[("pgd_at", test, "best")]["statistic"] == pytest.approx(1.0)
    for test in ("pearson", "spearman", "kendall"):  # exact: 2 of the 4! orderings are as extreme, two-sided
        assert by_key[("pgd_at", test, "best")]["p"] == pytest.approx(2 / 24)
    deat_row = next(row for row in table.rows if row[1] == "DEAT" and row[2] == "best")
    assert deat_row[3] == "0 of 1" and all(cell == "—ᵃ" for cell in deat_row[4:])
    assert any("fewer than 3 grid points" in note for note in table.notes)


def test_pooled_paired_test_is_the_papers_ttest_rel(full_report):
    root, _, _ = full_report
    summary = json.loads((root / "tables" / "summary.json").read_text())
    points = [(lr, b, s) for lr in LRS for b in BATCH_SIZES for s in SEEDS]
    deat = [best_pgd10("deat", *point) for point in points]
    pgd = [best_pgd10("pgd_at", *point) for point in points]
    expected = stats.ttest_rel(deat, pgd)
    for checkpoint in CHECKPOINTS:  # the fixture's last checkpoint is best − 0.02 for both methods
        (got,) = [r for r in summary["table4_paired_ttest"] if r["metric"] == "pgd10_acc"
                  and r["checkpoint"] == checkpoint and r["test"] == "pooled_paired"]
        assert (got["n_pairs"], got["n_pairs_expected"]) == (12, 12)
        assert got["mean_delta_acc"] == pytest.approx(statistics.mean(d - p for d, p in zip(deat, pgd)))
        assert got["t"] == pytest.approx(expected.statistic, rel=1e-6)
        assert got["p"] == pytest.approx(expected.pvalue, rel=1e-6)
    rows = pd.read_csv(root / "tables" / "table4_paired_ttest.csv", dtype=str, keep_default_na=False)
    pooled = rows[(rows["α"] == "pooled (paper's test)") & (rows.checkpoint == "best")
                  & (rows.metric == "PGD-10 robust")].iloc[0]
    # Hand computation: DEAT gains 1.2, 1.4, 1.6 points at the three α, 4 pairs each: mean +1.40.
    assert (pooled.n, pooled["mean Δ (pp)"], pooled.t) == ("12", "+1.40", f"{expected.statistic:.2f}")
    per_alpha = rows[(rows.checkpoint == "best") & (rows.metric == "PGD-10 robust")]["mean Δ (pp)"].tolist()[:3]
    assert per_alpha == ["+1.20", "+1.40", "+1.60"]


def grid_study(tmp_path: Path, values: dict) -> dict:
    """A one-b study from {(method, lr, seed): PGD-10 best accuracy}."""
    manifest = {"study": "grid", "protocol": {}, "runs": []}
    for (method, lr, seed), value in values.items():
        run_dir = tmp_path / f"{method}_{lr}_{seed}"
        run_dir.mkdir()
        (run_dir / "eval.json").write_text(json.dumps({"checkpoints": {"best": {"pgd10_acc": value}}}))
        manifest["runs"].append({"arch": "a", "method": method, "lr": lr, "batch_size": 128, "seed": seed,
                                 "dir": str(run_dir)})
    return manifest


def test_delta_per_alpha_confidence_intervals_alpha_as_unit_and_anova_against_hand_computation(tmp_path):
    """Δ trends with α (as in the issue): per-α CIs, the α-as-unit t-test and the interaction F are checked against
    the textbook formulas, the pooled test against scipy's ttest_rel."""
    lrs, seeds = [0.01, 0.02, 0.05], [0, 1, 2]
    deltas = {0.01: [-0.12, -0.10, -0.14], 0.02: [-0.05, -0.07, -0.04], 0.05: [0.03, 0.05, 0.02]}
    base = {(lr, s): 0.4 + lr + 0.01 * s * (1 + i) for i, lr in enumerate(lrs) for s in seeds}
    values = {("pgd_at", lr, s): base[(lr, s)] for lr in lrs for s in seeds}
    values.update({("deat", lr, s): base[(lr, s)] + deltas[lr][s] for lr in lrs for s in seeds})
    runs, _ = load_runs(grid_study(tmp_path, values))
    table, summary = paper_tables.paired_table(runs)
    per_alpha = [r for r in summary if r["test"] == "per_alpha"]
    t_crit = stats.t.ppf(0.975, df=2)
    for record, lr in zip(per_alpha, lrs):
        d = np.array(deltas[lr])
        half = t_crit * d.std(ddof=1) / math.sqrt(3)
        assert record["mean_delta_acc"] == pytest.approx(d.mean())
        assert (record["ci_low"], record["ci_high"]) == (pytest.approx(d.mean() - half), pytest.approx(d.mean() + half))
    means = np.array([np.mean(deltas[lr]) for lr in lrs])
    (unit,) = [r for r in summary if r["test"] == "alpha_as_unit"]
    t = means.mean() / (means.std(ddof=1) / math.sqrt(3))
    assert unit["t"] == pytest.approx(t) and unit["p"] == pytest.approx(2 * stats.t.sf(abs(t), df=2))
    (pooled,) = [r for r in summary if r["test"] == "pooled_paired"]
    expected = stats.ttest_rel([values[("deat", lr, s)] for lr in lrs for s in seeds],
                               [values[("pgd_at", lr, s)] for lr in lrs for s in seeds])
    assert pooled["p"] == pytest.approx(expected.pvalue) and pooled["n_pairs"] == 9
    assert pooled["p"] < unit["p"]  # pooling the pairs overstates the evidence when Δ trends with α
    labels = [row[3] for row in table.rows]
    assert labels == ["0.01", "0.02", "0.05", "α as the unit", "pooled (paper's test)"]

    # Two-way ANOVA, balanced 2 × 3 with 3 seeds: textbook sums of squares (in percent, as the report fits).
    anova, anova_summary = paper_tables.anova_table(runs)
    y = {(m, lr): 100 * np.array([values[(m, lr, s)] for s in seeds]) for m in ("pgd_at", "deat") for lr in lrs}
    grand = np.mean([v for cell in y.values() for v in cell])
    method_mean = {m: np.mean([y[(m, lr)] for lr in lrs]) for m in ("pgd_at", "deat")}
    lr_mean = {lr: np.mean([y[(m, lr)] for m in ("pgd_at", "deat")]) for lr in lrs}
    ss_interaction = 3 * sum((y[(m, lr)].mean() - method_mean[m] - lr_mean[lr] + grand) ** 2 for (m, lr) in y)
    ss_residual = sum(((cell - cell.mean()) ** 2).sum() for cell in y.values())
    f_interaction = (ss_interaction / 2) / (ss_residual / 12)
    ss_method = 9 * sum((method_mean[m] - grand) ** 2 for m in method_mean)
    got = {r["effect"]: r for r in anova_summary}
    assert got["method × α"]["F"] == pytest.approx(f_interaction)
    assert got["method × α"]["p"] == pytest.approx(stats.f.sf(f_interaction, 2, 12))
    assert got["method"]["F"] == pytest.approx(ss_method / (ss_residual / 12))
    assert got["residual"]["df"] == 12
    assert "p < 0.05 for" in anova.notes[-1] and "method × α" in anova.notes[-1]


def test_pooled_test_is_undefined_when_every_difference_is_equal(tmp_path):
    values = {(method, lr, 0): 0.4 + lr + (0.01 if method == "deat" else 0.0)
              for method in ("pgd_at", "deat") for lr in (0.01, 0.02, 0.03, 0.05)}
    table, summary = paper_tables.paired_table(load_runs(grid_study(tmp_path, values))[0])
    pooled = dict(zip(table.columns, next(row for row in table.rows if row[3] == "pooled (paper's test)")))
    # Every Δ +1.00: sd 0, the interval shrinks to the mean, t, p and the MDE are undefined, and so is a verdict.
    assert [pooled[c] for c in ("n", "mean Δ (pp)", "sd (pp)", "95% CI (pp)", "MDE 80% (pp)", "t", "p", "verdict")] \
        == ["4", "+1.00", "0.00", "[+1.00, +1.00]", "—", "—", "—", "inconclusive at this size"]
    assert next(r for r in summary if r["test"] == "pooled_paired")["t"] is None
    # One pair per α: no interval.
    assert dict(zip(table.columns, table.rows[0]))["95% CI (pp)"] == "—"


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


def test_latex_escape_handles_specials_and_symbols():
    assert render.latex_escape("a_b 50% & #1 {x} x-1") == r"a\_b 50\% \& \#1 \{x\} x-1"
    assert render.latex_escape("α ± Δ −1 †‡") == (r"$\alpha$ $\pm$ $\Delta$ $-$1 \textsuperscript{\dag}"
                                                   r"\textsuperscript{\ddag}")


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
    runs, _ = load_runs(manifest)
    table, summary = step_tables.equal_step_table(runs)
    assert len(table.rows) == 1 and summary[0]["lr_deat"] == pytest.approx(0.01 * math.sqrt(5) * 1.005)
    pgd, deat = best_pgd10("pgd_at", 0.01, 64, 0), best_pgd10("deat", 0.02, 64, 0)
    first = table.columns.index("PGD-AT best")
    assert table.rows[0][first:first + 3] == [f"{100 * pgd:.2f}", f"{100 * deat:.2f}", f"{100 * (deat - pgd):+.2f}"]
    # The fixture records no weight decay: the decays are unknown, and the table does not call them matched.
    assert table.rows[0][table.columns.index("matched")] == "—" and summary[0]["decay_matched"] is None


def test_equal_step_pairs_say_whether_the_weight_decay_is_matched_too(tmp_path):
    # The case (wd 5e-4): PGD-AT (SGD momentum 0.9) at α 0.01 and its equal-step DEAT partner α 0.2236, once
    # with DEAT's default decoupled decay (2.24x the shrink), once coupled (matched). The PGD-AT run is older than
    # the effective_decay record, so its decay comes from its config; the DEAT runs record theirs.
    manifest = {"study": "decay", "protocol": {"pgd_at_momentum": 0.9, "k1": 1.0, "weight_decay": 5e-4}, "runs": []}
    cases = [("pgd_at", 0.01, None), ("deat", 0.2236, True), ("deat", 0.2236, False)]
    for seed_dir, (method, lr, decoupled) in enumerate(cases):
        run_dir = tmp_path / f"run{seed_dir}"
        write_run(run_dir, method, 0.01, 64, 0)
        metrics = json.loads((run_dir / "metrics.json").read_text())
        metrics["config"] = {"lr": lr, "momentum": 0.9, "k1": 1.0, "weight_decay": 5e-4,
                             "decoupled_weight_decay": bool(decoupled)}
        metrics["effective_step"] = 0.01 / (1 - 0.9) if method == "pgd_at" else lr / math.sqrt(5)
        if method == "deat":
            metrics["effective_decay"] = lr * 5e-4 if decoupled else lr / math.sqrt(5) * 5e-4
        (run_dir / "metrics.json").write_text(json.dumps(metrics))
        sweep = {} if decoupled is None else {"sweep": {"decoupled_weight_decay": decoupled}}
        manifest["runs"].append({"arch": ARCH, "method": method, "lr": lr, "batch_size": 64, "seed": 0,
                                 "dir": str(run_dir), **sweep})
    runs, _ = load_runs(manifest)
    assert runs.effective_decay.tolist() == pytest.approx([5.0e-5, 1.118e-4, 0.2236 / math.sqrt(5) * 5e-4])
    table, summary = step_tables.equal_step_table(runs)
    cells = [dict(zip(table.columns, row)) for row in table.rows]
    assert [(c["decay PGD-AT"], c["decay DEAT"], c["matched"]) for c in cells] == [
        ("5.00e-5", "1.12e-4", "step only"), ("5.00e-5", "5.00e-5", "step + decay")]
    assert [s["decay_matched"] for s in summary] == [False, True]
    assert "whatever k1" in " ".join(table.notes)


def matched_pairs_study(tmp_path: Path, pgd_steps: int) -> dict:
    """PGD-AT (momentum 0.9) α 0.01 and coupled DEAT α 0.2236, matched in step and decay, 3 seeds; evaluation
    values chosen per seed: robust (PGD-10) best Δ = +1, −2, +4 points, clean Δ = −3, −4, −5."""
    manifest = {"study": "pairs", "protocol": {**PROTOCOL, "pgd_steps": pgd_steps, "weight_decay": 5e-4,
                                               "decoupled_weight_decay": False}, "runs": []}
    robust = {"pgd_at": [0.20, 0.22, 0.21], "deat": [0.21, 0.20, 0.25]}
    clean = {"pgd_at": [0.50, 0.52, 0.51], "deat": [0.47, 0.48, 0.46]}
    for method, lr in (("pgd_at", 0.01), ("deat", 0.2236)):
        for seed in range(3):
            run_dir = tmp_path / f"{method}_{seed}"
            write_run(run_dir, method, 0.01, 64, seed)
            metrics = json.loads((run_dir / "metrics.json").read_text())
            del metrics["effective_step"]  # step and decay from the settings (a run older than these records)
            (run_dir / "metrics.json").write_text(json.dumps(metrics))
            evaluation = {"settings": {"n_examples": 500}, "examples": {"n": 500}, "checkpoints": {
                checkpoint: {"clean_acc": clean[method][seed], "pgd10_acc": robust[method][seed] - shift}
                for checkpoint, shift in (("best", 0.0), ("last", 0.01 * seed))}}
            (run_dir / "eval.json").write_text(json.dumps(evaluation))
            manifest["runs"].append({"arch": ARCH, "method": method, "lr": lr, "batch_size": 64, "seed": seed,
                                     "dir": str(run_dir)})
    return manifest


def test_matched_pairs_get_a_mean_delta_with_its_interval_over_seeds(tmp_path):
    runs, _ = load_runs(matched_pairs_study(tmp_path, pgd_steps=5))
    table, summary = step_tables.equal_step_table(runs)
    assert [row[table.columns.index("matched")] for row in table.rows] == ["step + decay"] * 3
    deltas = [0.01, -0.02, 0.04]
    interval = stats.ttest_1samp(deltas, 0.0).confidence_interval(0.95)
    mean_record = next(r for r in summary if r["kind"] == "mean_over_seeds" and r["checkpoint"] == "best")
    assert mean_record["n_seeds"] == 3 and mean_record["mean_delta_acc"] == pytest.approx(0.01)
    assert (mean_record["ci_low"], mean_record["ci_high"]) == pytest.approx((interval.low, interval.high))
    means = step_tables.equal_step_mean_table(runs)
    row = dict(zip(means.columns, next(r for r in means.rows if r[means.columns.index("checkpoint")] == "best")))
    assert (row["α PGD-AT"], row["α DEAT"], row["n"], row["mean Δ (pp)"]) == ("0.01", "0.2236", "3 seeds", "+1.00")
    assert row["95% CI (pp)"] == f"[{100 * interval.low:+.2f}, {100 * interval.high:+.2f}]"
    assert row["sd (pp)"] == f"{100 * np.std(deltas, ddof=1):.2f}" and row["df"] == "2"


def test_a_swept_decay_pairs_within_each_variant_not_across(tmp_path):
    # matched_sgd_momentum's design: DEAT swept over coupled/decoupled decay; PGD-AT does not read the setting, so
    # the manifest lists each PGD-AT run under both variants (one directory). Each variant is one pairing.
    manifest = matched_pairs_study(tmp_path, pgd_steps=5)
    sgd_runs = [run for run in manifest["runs"] if run["method"] == "pgd_at"]
    coupled = [run for run in manifest["runs"] if run["method"] == "deat"]
    decoupled = []
    for run in coupled:
        copy_dir = Path(run["dir"] + "_decoupled")
        shutil.copytree(run["dir"], copy_dir)
        decoupled.append({**run, "dir": str(copy_dir), "sweep": {"decoupled_weight_decay": True}})
        run["sweep"] = {"decoupled_weight_decay": False}
    manifest["runs"] = ([{**run, "sweep": {"decoupled_weight_decay": flag}} for flag in (False, True)
                         for run in sgd_runs] + coupled + decoupled)
    table, summary = step_tables.equal_step_table(load_runs(manifest)[0])
    cells = [dict(zip(table.columns, row)) for row in table.rows]
    assert len(cells) == 6  # 3 seeds × 2 variants, not 3 × 2 × 2
    assert {(c["variant"], c["matched"]) for c in cells} == {("decoupled_weight_decay=False", "step + decay"),
                                                             ("decoupled_weight_decay=True", "step only")}
    means = [r for r in summary if r["kind"] == "mean_over_seeds" and r["checkpoint"] == "best"
             and r["metric"] == "pgd10_acc"]
    assert sorted((r["variant"], r["decay_matched"]) for r in means) == [
        ("decoupled_weight_decay=False", True), ("decoupled_weight_decay=True", False)]


def test_a_run_shared_by_sweep_variants_is_not_counted_twice_in_the_tests(tmp_path):
    # PGD-AT does not read DEAT's decay: a sweep over it lists each PGD-AT run under both variants. Pooling the
    # variants would pair every PGD-AT run twice; the tests are made per variant instead.
    manifest = make_study(tmp_path)
    runs = []
    for run in manifest["runs"]:
        if run["method"] == "pgd_at":
            runs += [{**run, "sweep": {"decoupled_weight_decay": flag}} for flag in (False, True)]
        else:
            copy = Path(run["dir"] + "_decoupled")
            shutil.copytree(tmp_path / run["dir"], tmp_path / copy)
            runs += [{**run, "sweep": {"decoupled_weight_decay": False}},
                     {**run, "dir": str(copy), "eval": str(copy / EVAL_NAME), "sweep": {"decoupled_weight_decay": True}}]
    manifest["runs"] = runs
    frame, _ = load_runs(manifest, runs_root=tmp_path)
    table, summary = paper_tables.paired_table(frame)
    assert table.columns[0] == "variant"
    pooled = [dict(zip(table.columns, row)) for row in table.rows if row[table.columns.index("α")].startswith("pooled")]
    assert {row["variant"] for row in pooled} == {"decoupled_weight_decay=False", "decoupled_weight_decay=True"}
    assert {row["n"] for row in pooled} == {str(len(LRS) * len(BATCH_SIZES) * len(SEEDS))}  # 12, not 24
    assert {record["variant"] for record in summary} == {"decoupled_weight_decay=False", "decoupled_weight_decay=True"}
    anova, _ = paper_tables.anova_table(frame)
    assert anova.columns[0] == "variant" and "per sweep variant" in " ".join(anova.notes).lower()


def test_matched_pairs_of_standard_training_compare_clean_accuracy(tmp_path):
    # Without an attack the robust accuracy is near 0 for both methods; the study's question is clean accuracy.
    runs, _ = load_runs(matched_pairs_study(tmp_path, pgd_steps=0))
    table, summary = step_tables.equal_step_table(runs)
    assert "clean test accuracy" in table.caption and "PGD-10" not in table.caption
    first = dict(zip(table.columns, table.rows[0]))
    assert (first["SGD-momentum best"], first["DEAT best"], first["Δ best"]) == ("50.00", "47.00", "-3.00")
    assert next(r for r in summary if r["kind"] == "mean_over_seeds" and r["checkpoint"] == "best")[
        "mean_delta_acc"] == pytest.approx(-0.04)


def test_effective_decay_formula_for_runs_that_did_not_record_it():
    # deat.effective's formula, NaN where a setting it reads is unknown.
    assert loading.formula_effective_decay("pgd_at", 0.01, 0.9, None, 5e-4, None) == pytest.approx(5e-5)
    assert loading.formula_effective_decay("mart_deat", 0.2236, None, 1.0, 5e-4, True) == pytest.approx(1.118e-4)
    assert loading.formula_effective_decay("deat", 0.2236, None, 1.0, 5e-4, False) == pytest.approx(
        0.2236 / math.sqrt(5) * 5e-4)
    assert math.isnan(loading.formula_effective_decay("deat", 0.2236, None, 1.0, 5e-4, None))
    assert math.isnan(loading.formula_effective_decay("pgd_at", 0.01, None, None, 5e-4, None))
    assert math.isnan(loading.formula_effective_decay("pgd_at", 0.01, 0.9, None, None, None))


def test_effective_step_formula():
    assert loading.formula_effective_step("pgd_at", 0.01, 0.9, None) == pytest.approx(0.1)
    assert loading.formula_effective_step("deat", 0.1, None, 1.0) == pytest.approx(0.1 / math.sqrt(5))


def test_robust_overfitting_labels_the_training_accuracy_as_what_it_is(full_report):
    root, _, _ = full_report
    rows = pd.read_csv(root / "tables" / "robust_overfitting.csv", dtype=str)
    row = rows[(rows.method == "DEAT") & (rows["α"] == "0.1") & (rows.b == "128") & (rows.seed == "1")].iloc[0]
    acc = best_pgd10("deat", 0.1, 128, 1)
    # Fixture: last = best − 0.01; final epoch (3): running train = acc + 0.2, end-of-epoch test = acc − 0.01.
    assert row["best − last"] == "+1.00"
    assert row["final train robust acc (running, training attack PGD-5)"] == f"{100 * (acc + 0.2):.2f}"
    assert row["final test robust acc (end of epoch, PGD)"] == f"{100 * (acc - 0.01):.2f}"
    assert not any("gap" in column for column in rows.columns)  # unlike measurements are not subtracted
    assert row["peak test PGD (epoch)"] == f"{100 * acc:.2f} (2)" and row["peak − best"] == "+0.00"


def test_robust_overfitting_shows_what_choosing_on_validation_gave_away(tmp_path):
    # Robust test accuracy peaks at epoch 2 (31 %) and falls; the validation split picked epoch 3 (27 %).
    run_dir = tmp_path / "run"
    write_run(run_dir, "pgd_at", 0.1, 64, 0)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for epoch, acc in zip(metrics["epochs"], (0.25, 0.31, 0.27)):
        epoch["test_pgd_acc"] = acc
    metrics["best"], metrics["last"] = {"epoch": 3, "test_pgd_acc": 0.27}, {"epoch": 3, "test_pgd_acc": 0.27}
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    manifest = {"study": "peak", "protocol": PROTOCOL,
                "runs": [{"arch": ARCH, "method": "pgd_at", "lr": 0.1, "batch_size": 64, "seed": 0, "dir": str(run_dir)}]}
    table, summary = study_tables.robust_overfitting_table(load_runs(manifest)[0])
    row = dict(zip(table.columns, table.rows[0]))
    assert (row["best epoch"], row["peak test PGD (epoch)"], row["peak − best"]) == ("3", "31.00 (2)", "+4.00")
    assert summary[0]["mean_peak_minus_best_acc"] == pytest.approx(0.04)


def test_partial_grid_shows_dash_footnote_and_marks_the_short_mean(tmp_path):
    manifest = make_study(tmp_path)
    dropped = next(r for r in manifest["runs"] if r["method"] == "deat" and r["lr"] == 0.02
                   and r["batch_size"] == 128 and r["seed"] == 1)
    for path in (Path(dropped["dir"]) / "metrics.json", dropped["eval"]):
        (tmp_path / path).unlink()
    both_gone = [r for r in manifest["runs"] if r["method"] == "pgd_at" and r["lr"] == 0.1 and r["batch_size"] == 64]
    for run in both_gone:
        (tmp_path / run["eval"]).unlink()
    build_report(manifest, tmp_path / "tables", tmp_path / "figures", runs_root=tmp_path)

    rows = read_csv_table(tmp_path / "tables" / "table2_pgd10_best.csv")
    assert rows[("0.02", "128")][f"{ARCH} DEAT"] == f"{100 * best_pgd10('deat', 0.02, 128, 0):.2f}‡"
    assert rows[("0.1", "64")][f"{ARCH} PGD-AT"] == "—"
    assert rows[("0.1", "64")][f"{ARCH} Δ"] == "—"
    notes = (tmp_path / "tables" / "table2_pgd10_best.md").read_text(encoding="utf-8")
    assert f"{ARCH} DEAT α=0.02 b=128 (n=1 of 2 seeds)" in notes
    assert f"{ARCH} DEAT α=0.02 b=128 seed 1 (no {EVAL_NAME})" in notes
    assert f"{ARCH} PGD-AT α=0.1 b=64 seed 0 (no {EVAL_NAME})" in notes
    overfitting = (tmp_path / "tables" / "robust_overfitting.md").read_text(encoding="utf-8")
    assert f"{ARCH} DEAT α=0.02 b=128 seed 1 (no metrics.json)" in overfitting
    summary = json.loads((tmp_path / "tables" / "summary.json").read_text())
    (ttest,) = [r for r in summary["table4_paired_ttest"] if r["metric"] == "pgd10_acc" and r["checkpoint"] == "best"
                and r["test"] == "pooled_paired"]
    assert (ttest["n_pairs"], ttest["n_pairs_expected"]) == (9, 12)
    for path in (tmp_path / "tables").glob("*.tex"):
        _check_latex(path.read_text(encoding="utf-8"))


def test_paper_reference_study_shows_the_paper_numbers(tmp_path):
    manifest = make_study(tmp_path, paper_reference=True)
    manifest["runs"] = [run for run in manifest["runs"] if run["batch_size"] == 128]  # the paper's only b
    written = build_report(manifest, tmp_path / "tables", tmp_path / "figures", runs_root=tmp_path)
    assert tmp_path / "tables" / "paper_comparison_best.tex" in written
    paper = {(row["alpha"], row["arch"], row["method"]): row["robust_acc"] for row in csv.DictReader(
        line for line in paper_tables.PAPER_TABLE2_CSV.read_text().splitlines() if not line.startswith("#"))}
    assert paper[("0.010", "preact_resnet18", "pgd_at")] == "44.11" and len(paper) == 84
    rows = {row["α"]: row for row in csv.DictReader(
        (tmp_path / "tables" / "paper_comparison_best.csv").read_text(encoding="utf-8").splitlines())}
    assert "b" not in rows["0.01"]  # one batch size: no b column
    assert (rows["0.01"]["PGD-AT paper"], rows["0.01"]["DEAT paper"]) == ("44.11", "45.07")
    assert (rows["0.02"]["PGD-AT paper"], rows["0.1"]["DEAT paper"]) == ("46.30", "48.84")
    ours = statistics.mean(best_pgd10("deat", 0.01, 128, s) for s in SEEDS)
    assert rows["0.01"]["DEAT ours − paper"] == f"{100 * ours - 45.07:+.2f}" == "-2.67"
    # One batch size: no α × b heatmap and no α/b figure, each skipped with a note.
    skipped = json.loads((tmp_path / "tables" / "summary.json").read_text())["skipped"]
    assert [note.split(":")[0] for note in skipped] == ["equal_effective_step_mean", "heatmap_lr_batch",
                                                        "robust_acc_vs_lr_over_b"]
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
    args = get_args_parser().parse_args(["--results-dir", str(tmp_path / "results"),
                                                "--figures-dir", str(tmp_path / "fig-{study}")])
    assert report_main(args) == 0
    for study in ("first", "second"):
        rows = read_csv_table(tmp_path / "results" / "tables" / study / "table2_pgd10_best.csv")
        assert rows[("0.01", "64")][f"{ARCH} PGD-AT"] == "40.20 ± 0.28"
        assert (tmp_path / f"fig-{study}" / "robust_acc_vs_lr.pdf").is_file()


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="method None is not a method name"):
        load_runs({"study": "x", "runs": [{"arch": "a", "method": None, "lr": 0.1, "batch_size": 1,
                                           "seed": 0, "dir": "d"}]})
    with pytest.raises(KeyError, match="missing key 'dir'"):
        load_runs({"study": "x", "runs": [{"arch": "a", "method": "deat", "lr": 0.1, "batch_size": 1,
                                                  "seed": 0}]})
    args = get_args_parser().parse_args(["--manifest", "a.json", "b.json", "--tables-dir", "out"])
    with pytest.raises(ValueError, match="several studies need '\\{study\\}'"):
        report_main(args)


def test_a_study_that_has_not_run_yet_renders_dashes(tmp_path):
    manifest = make_study(tmp_path)
    manifest["runs"] = [dict(run, dir=f"elsewhere/{run['dir']}", eval=None) for run in manifest["runs"]]
    written = build_report(manifest, tmp_path / "tables", tmp_path / "figures", runs_root=tmp_path)
    rows = read_csv_table(tmp_path / "tables" / "table2_pgd10_best.csv")
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
    written = build_report(manifest, tmp_path / "tables", tmp_path / "figures", runs_root=tmp_path)

    rows = pd.read_csv(tmp_path / "tables" / "table2_pgd10_best.csv", dtype=str).to_dict("records")
    assert [row["variant"] for row in rows] == ["k1=0.5, k2=0.6", "k1=0.5, k2=0.9", "k1=2, k2=0.6", "k1=2, k2=0.9"]
    # k1 = 2, k2 = 0.9: 0.36 + 0.004·seed → 36.00, 36.40, 36.80 → mean 36.40, sd 0.40.
    assert rows[3][f"{ARCH} DEAT"] == "36.40 ± 0.40"

    sweep = pd.read_csv(tmp_path / "tables" / "sweep_sensitivity.csv", dtype=str).to_dict("records")
    assert [row["effective step"] for row in sweep] == [f"{lr / math.sqrt(1.5**2 + 0.25):.4g}"] * 2 + [
        f"{lr / math.sqrt(13):.4g}"] * 2
    summary = json.loads((tmp_path / "tables" / "summary.json").read_text())
    robust = next(r for r in summary["sweep_sensitivity"] if r["metric"] == "eval_best_pgd10_acc")
    groups = [[accuracy[(k1, k2, s)] for s in seeds] for k1 in k1s for k2 in k2s]
    means = [statistics.mean(g) for g in groups]
    assert robust["range_of_means_acc"] == pytest.approx(max(means) - min(means))
    assert robust["anova_p"] == pytest.approx(stats.f_oneway(*groups).pvalue)
    assert robust["n_variants"] == 4
    protocol_text = (tmp_path / "tables" / "protocol.md").read_text(encoding="utf-8")
    assert "| k1 | [0.5, 2] |" in protocol_text  # the protocol lists the swept values, not a default
    assert tmp_path / "figures" / "heatmap_sweep.png" in written


def test_a_one_method_study_states_only_its_own_optimizer(tmp_path):
    manifest = make_study(tmp_path)
    manifest["runs"] = [run for run in manifest["runs"] if run["method"] == "pgd_at"]
    build_report(manifest, tmp_path / "tables", tmp_path / "figures", runs_root=tmp_path)
    text = (tmp_path / "tables" / "protocol.md").read_text(encoding="utf-8")
    assert "Optimizers: PGD-AT: SGD, momentum 0.9." in text and "DEAT: Algorithm 2" not in text


def test_masking_flags_skipped_attacks_and_the_autoattack_label_reach_every_table(tmp_path):
    """Issue 13's eval.json keys: a flagged checkpoint's numbers carry † with the run and flag named, skipped
    attacks are listed, and the AutoAttack column says which attacks ran."""
    manifest = make_study(tmp_path)
    flagged = next(r for r in manifest["runs"] if r["method"] == "deat" and r["lr"] == 0.01
                   and r["batch_size"] == 64 and r["seed"] == 1)
    path = tmp_path / flagged["eval"]
    evaluation = json.loads(path.read_text())
    evaluation["settings"]["aa_label"] = "APGD-CE + APGD-T"
    evaluation["checkpoints"]["best"]["masking_flags"] = ["PGD-10 accuracy above clean accuracy"]
    evaluation["checkpoints"]["best"]["skipped_attacks"] = {"square": "budget"}
    path.write_text(json.dumps(evaluation))
    for run in manifest["runs"]:  # the others: older files without aa_label, a subset of the attacks
        if run is not flagged:
            other = json.loads((tmp_path / run["eval"]).read_text())
            other["settings"]["autoattack_attacks"] = ["apgd-ce", "apgd-t"]
            (tmp_path / run["eval"]).write_text(json.dumps(other))
    build_report(manifest, tmp_path / "tables", tmp_path / "figures", runs_root=tmp_path)
    tables_dir = tmp_path / "tables"
    rows = read_csv_table(tables_dir / "table2_pgd10_best.csv")
    assert rows[("0.01", "64")][f"{ARCH} DEAT"] == "41.40 ± 0.28†"
    assert rows[("0.01", "128")][f"{ARCH} DEAT"] == "42.40 ± 0.28"
    assert "†" not in "".join(read_csv_table(tables_dir / "table2_pgd10_last.csv")[("0.01", "64")].values())
    footnote = f"{ARCH} DEAT α=0.01 b=64 seed 1 best: PGD-10 accuracy above clean accuracy"
    for name in ("table2_pgd10_best", "table2_aa_best", "table4_paired_ttest"):
        assert footnote in (tables_dir / f"{name}.md").read_text(encoding="utf-8"), name
    assert "†" not in (tables_dir / "table2_clean_best.md").read_text(encoding="utf-8")
    aa = (tables_dir / "table2_aa_best.md").read_text(encoding="utf-8")
    assert aa.startswith("**Table 2 analogue: APGD-CE + APGD-T robust test accuracy")
    assert f"Attacks not run: {ARCH} DEAT α=0.01 b=64 seed 1 best: square (budget)." in aa
    assert r"\textsuperscript{\dag}" in (tables_dir / "table2_pgd10_best.tex").read_text(encoding="utf-8")


def test_autoattack_label_from_settings():
    assert loading.autoattack_label({"autoattack_attacks": ["apgd-ce", "apgd-t", "fab-t", "square"]}) == \
        "AutoAttack (standard)"
    assert loading.autoattack_label({"autoattack_attacks": ["apgd-ce", "apgd-t"]}) == "APGD-CE + APGD-T"
    assert loading.autoattack_label({"aa_label": "AutoAttack (rand)", "autoattack_attacks": ["apgd-ce"]}) == \
        "AutoAttack (rand)"


def test_standard_training_names_sgd_and_plots_clean_accuracy(tmp_path):
    manifest = make_study(tmp_path)
    manifest["protocol"] = {**PROTOCOL, "pgd_steps": 0}
    written = build_report(manifest, tmp_path / "tables", tmp_path / "figures", runs_root=tmp_path)
    rows = read_csv_table(tmp_path / "tables" / "table2_clean_best.csv")
    assert f"{ARCH} SGD-momentum" in rows[("0.01", "64")] and f"{ARCH} PGD-AT" not in rows[("0.01", "64")]
    assert "SGD-momentum: SGD, momentum 0.9" in (tmp_path / "tables" / "protocol.md").read_text(encoding="utf-8")
    assert "correlation of clean test accuracy" in (tmp_path / "tables" / "table3_correlation.md").read_text()
    stems = {p.stem for p in written if p.parent == tmp_path / "figures"}
    assert stems == {"clean_acc_vs_lr", "clean_acc_per_epoch", "heatmap_lr_batch", "clean_acc_vs_lr_over_b"}
    # best is chosen on clean accuracy there, so no robust peak − best is claimed
    overfitting = pd.read_csv(tmp_path / "tables" / "robust_overfitting.csv", dtype=str, keep_default_na=False)
    assert set(overfitting["peak − best"]) == {"—"}


def test_one_seed_tables_do_not_claim_a_spread(tmp_path):
    manifest = make_study(tmp_path)
    manifest["runs"] = [run for run in manifest["runs"] if run["seed"] == 0]
    build_report(manifest, tmp_path / "tables", tmp_path / "figures", runs_root=tmp_path)
    caption = (tmp_path / "tables" / "table2_pgd10_best.md").read_text(encoding="utf-8").splitlines()[0]
    assert caption.startswith("**Table 2 analogue: PGD-10 robust test accuracy (%) of the best checkpoint, one seed**")
    assert "±" not in (tmp_path / "tables" / "table2_pgd10_best.csv").read_text(encoding="utf-8")
    assert "one seed per grid point" in (tmp_path / "tables" / "protocol.md").read_text(encoding="utf-8")


def test_heatmap_panels_share_one_colour_scale_and_figures_say_what_they_plot(full_report, monkeypatch, tmp_path):
    _, manifest, _ = full_report
    drawn = {}
    monkeypatch.setattr(figures, "_save", lambda figure, _, stem: drawn.setdefault(stem, figure) and [])
    runs, epochs = load_runs(manifest, full_report[0])
    head = figures.headline(manifest["protocol"])
    figures.figure_heatmap(runs, head, tmp_path, [])
    figures.figure_accuracy_vs_lr(runs, head, tmp_path, [])
    figures.figure_accuracy_per_epoch(runs, epochs, head, tmp_path, [])
    from matplotlib.collections import QuadMesh

    figure = drawn["heatmap_lr_batch"]
    panels = [axis for axis in figure.axes if axis.get_title()]
    accuracy = [m for axis in panels if "Δ" not in axis.get_title() for m in axis.collections
                if isinstance(m, QuadMesh)]
    delta = [m for axis in panels if "Δ" in axis.get_title() for m in axis.collections if isinstance(m, QuadMesh)]
    assert len(accuracy) == 2 and len({mesh.get_clim() for mesh in accuracy}) == 1  # one scale for both methods
    low, high = accuracy[0].get_clim()
    assert (low, high) == (pytest.approx(40.2), pytest.approx(100 * statistics.mean(
        best_pgd10("deat", 0.1, 128, s) for s in SEEDS)))  # wider than ±2 binomial sds: the cells' own range
    # Δ = DEAT − PGD-AT is 1.2 to 1.6 points: its diverging scale is centred at 0 and symmetric, at least ±2
    # binomial sds of a Δ of two 2-seed means at 500 test images (the cells' mean accuracy p).
    p = np.mean([best_pgd10(m, lr, b, s) for m in ("pgd_at", "deat") for lr in LRS for b in BATCH_SIZES
                 for s in SEEDS])
    reach = 2 * math.sqrt(2) * 100 * math.sqrt(p * (1 - p) / (500 * 2))
    assert len(delta) == 1 and delta[0].get_clim() == (pytest.approx(-reach), pytest.approx(reach))
    title = figure._suptitle.get_text()
    assert f"one colour scale {low:.1f}–{high:.1f} %" in title and "binomial sds of a cell mean" in title
    assert "Δ centred at 0, symmetric" in title
    assert "best checkpoint" in drawn["robust_acc_vs_lr"]._suptitle.get_text()
    assert "band: ±1 sd over seeds" in drawn["robust_acc_vs_lr"]._suptitle.get_text()
    assert "band: ±1 sd over seeds" in drawn["robust_acc_per_epoch"]._suptitle.get_text()


def test_a_flat_heatmap_spans_the_noise_and_masked_cells_carry_the_dagger(tmp_path, monkeypatch):
    """small_lr_bs's case: cells within the noise get a colour range of at least ±2 binomial sds of a cell, not
    their own 0.4-point spread; a cell whose run flagged gradient masking shows † as in the tables."""
    manifest = make_study(tmp_path)
    manifest["runs"] = [run for run in manifest["runs"] if run["method"] == "pgd_at"]
    for run in manifest["runs"]:
        path = tmp_path / run["eval"]
        evaluation = json.loads(path.read_text())
        evaluation["checkpoints"]["best"]["pgd10_acc"] = 0.25 + 0.002 * run["seed"]  # flat: 25.0 and 25.2
        if (run["lr"], run["batch_size"], run["seed"]) == (0.02, 64, 1):
            evaluation["checkpoints"]["best"]["masking_flags"] = ["zero input gradients at 5 of 50 examples"]
        path.write_text(json.dumps(evaluation))
    drawn = {}
    monkeypatch.setattr(figures, "_save", lambda figure, _, stem: drawn.setdefault(stem, figure) and [])
    runs, _ = load_runs(manifest, tmp_path)
    figures.figure_heatmap(runs, figures.headline(manifest["protocol"]), tmp_path, [])
    from matplotlib.collections import QuadMesh

    figure = drawn["heatmap_lr_batch"]
    (axis,) = [axis for axis in figure.axes if axis.get_title()]
    (mesh,) = [m for m in axis.collections if isinstance(m, QuadMesh)]
    sd = 100 * math.sqrt(0.251 * 0.749 / (500 * 2))  # a 2-seed mean at 500 test images
    assert mesh.get_clim() == (pytest.approx(25.1 - 2 * sd), pytest.approx(25.1 + 2 * sd))
    assert (f"at least ±2 binomial sds of a cell mean (1 sd = {sd:.1f} points at 500 test images, 2 seeds)"
            in figure._suptitle.get_text())
    texts = sorted(text.get_text() for text in axis.texts)
    assert texts.count("25.1†") == 1 and texts.count("25.1") == len(LRS) * len(BATCH_SIZES) - 1
    assert "† gradient-masking flag" in figure._suptitle.get_text()
    assert figures.noise_sd(25.1, 500, 2) == pytest.approx(sd)


def test_a_second_report_run_writes_identical_files(tmp_path):
    manifest = make_study(tmp_path)
    first = build_report(manifest, tmp_path / "tables", tmp_path / "figures", runs_root=tmp_path)
    contents = {path: path.read_bytes() for path in first}
    second = build_report(manifest, tmp_path / "tables", tmp_path / "figures", runs_root=tmp_path)
    assert second == first
    assert [path for path in second if path.read_bytes() != contents[path]] == []


def test_help_builds_without_torch_pandas_or_seaborn_and_says_what_it_does():
    import contextlib
    import io
    import subprocess
    import sys

    code = ("import sys; from deat.__main__ import build_parser; build_parser().format_help(); "
            "print(sorted(m for m in ('torch', 'pandas', 'scipy', 'seaborn', 'mlflow') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
    from deat.__main__ import build_parser

    def subcommand_help(name: str) -> str:
        with pytest.raises(SystemExit), contextlib.redirect_stdout(io.StringIO()) as out:
            build_parser(name).parse_args([name, "--help"])
        return " ".join(out.getvalue().split())

    train_help = subcommand_help("train")
    assert "train.log" not in train_help
    assert "--out OUT run directory: metrics.json, best.pt, last.pt (required for train)" in train_help
    report_help = subcommand_help("report")
    assert "issue" not in report_help and "--results-dir" in report_help


# ------------------------------------------------------------------------------------------------ issue 23 and 26:
# what a design can see, like-for-like pairs, honest selection, designs the report must not over-fit


def test_mde_is_statsmodels_power_solved_for_the_effect_and_matches_the_noncentral_t():
    from statsmodels.stats.power import TTestPower

    for n, sd in ((2, 0.02), (5, 0.015), (20, 0.02)):
        mde = power.minimum_detectable_effect(n, sd)
        if n > 2:  # statsmodels' power() itself returns NaN at n = 2 and d ≈ 11.5 (its solver does not)
            assert TTestPower().power(effect_size=mde / sd, nobs=n, alpha=0.05, alternative="two-sided") == \
                pytest.approx(0.80, abs=1e-6)
        # By hand: a paired t-test rejects when |T| > t(0.975, n − 1); T is noncentral t with δ = (mde/sd)·√n.
        df, crit, delta = n - 1, stats.t.ppf(0.975, n - 1), mde / sd * math.sqrt(n)
        assert stats.nct.sf(crit, df, delta) + stats.nct.cdf(-crit, df, delta) == pytest.approx(0.80, abs=1e-6)
    assert math.isnan(power.minimum_detectable_effect(1, 0.02)) and math.isnan(power.minimum_detectable_effect(5, 0))


def test_holm_is_statsmodels_multipletests_over_the_defined_p_values():
    from statsmodels.stats.multitest import multipletests

    raw = [0.01, float("nan"), 0.04, 0.03, 0.5]
    got = power.holm(raw)
    expected = multipletests([0.01, 0.04, 0.03, 0.5], method="holm")[1]
    assert math.isnan(got[1]) and list(got[[0, 2, 3, 4]]) == pytest.approx(list(expected))
    # By hand: sorted 0.01, 0.03, 0.04, 0.5 times 4, 3, 2, 1, running maximum: 0.04, 0.09, 0.09, 0.5.
    assert list(got[[0, 3, 2, 4]]) == pytest.approx([0.04, 0.09, 0.09, 0.5])


@pytest.mark.parametrize("low, high, word", [
    (0.001, 0.03, "DEAT better"), (-0.03, -0.001, "DEAT worse"),
    (-0.03, 0.011, "no difference as large as the paper's"), (-0.005, 0.012, "inconclusive at this size"),
    (-0.03, 0.05, "inconclusive at this size"), (float("nan"), float("nan"), "inconclusive at this size")])
def test_verdict_words_follow_the_interval(low, high, word):
    assert power.verdict(low, high) == word


def test_table4_rows_show_n_sd_interval_mde_holm_and_the_verdict(tmp_path):
    """The Δ-trend grid of the hand-computed test above: each row's sd, interval and MDE against scipy and
    statsmodels, the Holm p over the family of the 5 tests (3 per α, α as the unit, pooled), the verdict words."""
    from statsmodels.stats.multitest import multipletests
    from statsmodels.stats.power import TTestPower

    lrs, seeds = [0.01, 0.02, 0.05], [0, 1, 2]
    deltas = {0.01: [-0.12, -0.10, -0.14], 0.02: [-0.05, -0.07, -0.04], 0.05: [0.03, 0.05, 0.02]}
    values = {("pgd_at", lr, s): 0.4 + lr + 0.01 * s for lr in lrs for s in seeds}
    values.update({("deat", lr, s): values[("pgd_at", lr, s)] + deltas[lr][s] for lr in lrs for s in seeds})
    runs, _ = load_runs(grid_study(tmp_path, values))
    table, summary = paper_tables.paired_table(runs)
    samples = [deltas[lr] for lr in lrs] + [[np.mean(deltas[lr]) for lr in lrs], [d for lr in lrs for d in deltas[lr]]]
    raw = [stats.ttest_1samp(sample, 0.0).pvalue for sample in samples]
    holm = multipletests(raw, method="holm")[1]
    rows = [dict(zip(table.columns, row)) for row in table.rows]
    assert [row["α"] for row in rows] == ["0.01", "0.02", "0.05", "α as the unit", "pooled (paper's test)"]
    for row, record, sample, p_holm in zip(rows, summary, samples, holm):
        sample = np.array(sample)
        sd, n = sample.std(ddof=1), len(sample)
        interval = stats.ttest_1samp(sample, 0.0).confidence_interval(0.95)
        mde = TTestPower().solve_power(effect_size=None, nobs=n, alpha=0.05, power=0.8) * sd
        assert (record["sd"], record["ci_low"], record["ci_high"]) == pytest.approx((sd, interval.low, interval.high))
        assert record["mde"] == pytest.approx(mde) and record["df"] == n - 1
        assert record["p_holm"] == pytest.approx(p_holm) and record["family_size"] == 5
        assert row["sd (pp)"] == f"{100 * sd:.2f}" and row["MDE 80% (pp)"] == f"{100 * mde:.2f}"
        assert row["p Holm"] == report_stats_format_p(p_holm)
        word = ("DEAT better" if interval.low > 0 else "DEAT worse" if interval.high < 0 else
                "no difference as large as the paper's" if interval.high < 0.012 else "inconclusive at this size")
        assert row["verdict"] == record["verdict"] == word
        assert row["excludes +1.2"] == ("no" if interval.low <= 0.012 <= interval.high else "yes")
    assert rows[0]["verdict"] == "DEAT worse" and rows[2]["verdict"] == "inconclusive at this size"
    assert any("Families: PGD-10 robust: 5 tests (table4_paired_ttest)" in note for note in table.notes)


def report_stats_format_p(p: float) -> str:
    from deat.report.formatting import format_p

    return format_p(p)


def test_an_interval_wider_than_any_possible_difference_names_its_df(tmp_path):
    # Two pairs, Δ +50 and −30 points: t(0.975, 1) = 12.71 times se 40 → about ±508 points around +10.
    values = {("pgd_at", 0.01, 0): 0.30, ("pgd_at", 0.01, 1): 0.60, ("deat", 0.01, 0): 0.80, ("deat", 0.01, 1): 0.30}
    table, _ = paper_tables.paired_table(load_runs(grid_study(tmp_path, values))[0])
    cell = dict(zip(table.columns, table.rows[0]))["95% CI (pp)"]
    half = stats.t.ppf(0.975, 1) * np.std([0.5, -0.3], ddof=1) / math.sqrt(2)
    assert cell == f"[{100 * (0.1 - half):+.2f}, {100 * (0.1 + half):+.2f}] (df 1)"


NEW_RULE = "an example is robust only if no iterate of any restart of any attack misclassifies it"


def _set_settings(path: Path, **settings) -> None:
    evaluation = json.loads(path.read_text())
    evaluation["settings"] = {**evaluation.get("settings", {}), **settings}
    path.write_text(json.dumps(evaluation))


def test_pairs_are_like_for_like_and_an_unlike_pair_is_left_out_and_named(tmp_path):
    """Issue 23.2: DEAT under the any-iterate rule against PGD-AT whose eval.json predates it (no robust_rule) is
    not a pair; one that differs only in which random starts were drawn (seeding) is."""
    values = {(m, lr, s): 0.40 + 0.01 * s + (0.01 if m == "deat" else 0.0) + (0.002 * s if m == "deat" else 0.0)
              for m in ("pgd_at", "deat") for lr in (0.01, 0.02) for s in (0, 1, 2)}
    manifest = grid_study(tmp_path, values)
    for run in manifest["runs"]:
        path = Path(run["dir"]) / "eval.json"
        old = (run["method"], run["lr"], run["seed"]) == ("pgd_at", 0.01, 2)
        _set_settings(path, n_examples=500, pgd_steps=20, **({} if old else {"robust_rule": NEW_RULE}),
                      **({"seeding": "per example"} if run["seed"] == 1 and run["method"] == "deat" else {}))
    runs, _ = load_runs(manifest)
    table, summary = paper_tables.paired_table(runs)
    by_alpha = {r["lr"]: r for r in summary if r["test"] == "per_alpha"}
    assert (by_alpha[0.01]["n_pairs"], by_alpha[0.02]["n_pairs"]) == (2, 3)  # seed 2 at α 0.01 left out
    assert next(r for r in summary if r["test"] == "pooled_paired")["n_pairs"] == 5
    note = next(note for note in table.notes if note.startswith("Left out, not like-for-like"))
    assert "a deat vs pgd_at α=0.01 b=128 seed 2 (last-iterate rule (older eval.json) vs any-iterate rule)" in note
    assert "seed 1" not in note  # a different draw of random starts is the same rule
    table2, _ = paper_tables.accuracy_table(runs, "pgd10_acc", "best")
    delta = {row[0]: row[-1] for row in table2.rows}
    assert delta["0.01"].endswith("§") and not delta["0.02"].endswith("§")
    assert any(n.startswith("§ the two methods' evaluations") for n in table2.notes)


def test_equal_step_pairs_leave_out_unlike_evaluations(tmp_path):
    manifest = matched_pairs_study(tmp_path, pgd_steps=5)
    for run in manifest["runs"]:
        old = run["method"] == "pgd_at" and run["seed"] == 1
        _set_settings(Path(run["dir"]) / "eval.json", **({} if old else {"robust_rule": NEW_RULE}))
    runs, _ = load_runs(manifest)
    table, summary = step_tables.equal_step_table(runs)
    assert [row[table.columns.index("seed")] for row in table.rows] == ["0", "2"]
    mean = next(r for r in summary if r["kind"] == "mean_over_seeds" and r["checkpoint"] == "best")
    assert mean["n_seeds"] == 2 and mean["mean_delta_acc"] == pytest.approx((0.01 + 0.04) / 2)
    assert any("pgd_at α=0.01 vs deat α=0.2236 b=64 seed 1 (last-iterate rule (older eval.json) vs any-iterate "
               "rule)" in note for note in table.notes)


def confounded_study(tmp_path: Path, lrs: dict, seeds=(0, 1, 2)) -> dict:
    """Per-method learning rates, as overfit_cpu and the matched studies: {method: [α]}, one b."""
    values = {(m, lr, s): 0.2 + 0.1 * lr / (1 + lr) + 0.003 * s * (1 + i) + 0.001 * (m == "deat")
              for m, method_lrs in lrs.items() for i, lr in enumerate(method_lrs) for s in seeds}
    manifest = grid_study(tmp_path, values)
    manifest["protocol"] = {"pgd_steps": 3}
    return manifest


@pytest.mark.parametrize("lrs, why", [
    ({"pgd_at": [0.05], "deat": [0.05, 1.118]}, "one α at which both methods ran (0.05)"),
    ({"pgd_at": [0.01, 0.1], "deat": [0.2236, 2.236]}, "no α at which both methods ran"),
])
def test_a_confounded_design_fits_no_model_and_no_warning_reaches_the_user(tmp_path, lrs, why):
    """Issue 26.3: the report chooses which model to fit; for a design where method and α are confounded it fits
    none, says why, and no statsmodels warning (SingularMatrixWarning, ValueWarning, ...) escapes."""
    import warnings

    manifest = confounded_study(tmp_path, lrs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_report(manifest, tmp_path / "tables", tmp_path / "figures")
    anova = (tmp_path / "tables" / "table4_anova.md").read_text(encoding="utf-8")
    assert f"No model can be fitted: {why}" in anova
    summary = json.loads((tmp_path / "tables" / "summary.json").read_text())
    assert summary["table4_anova"] == []


def test_the_anova_uses_the_alphas_both_methods_ran_and_names_the_others(tmp_path):
    import statsmodels.formula.api as smf
    from statsmodels.stats.anova import anova_lm

    manifest = confounded_study(tmp_path, {"pgd_at": [0.01, 0.02, 0.05], "deat": [0.01, 0.02, 0.2236]})
    runs, _ = load_runs(manifest)
    table, summary = paper_tables.anova_table(runs)
    shared = runs[runs.lr.isin([0.01, 0.02])].assign(y=lambda f: 100 * f.eval_best_pgd10_acc)
    expected = anova_lm(smf.ols("y ~ C(method) * C(lr)", data=shared).fit(), typ=2)
    got = {r["effect"]: r for r in summary if r["metric"] == "pgd10_acc" and r["checkpoint"] == "best"}
    assert got["method × α"]["F"] == pytest.approx(expected.loc["C(method):C(lr)", "F"])
    assert got["method"]["p"] == pytest.approx(expected.loc["C(method)", "PR(>F)"])
    assert any("pgd_at α=0.05, deat α=0.2236" in note for note in table.notes)


def test_a_study_without_a_pair_gets_only_the_tables_its_design_supports(tmp_path):
    """Issue 26.8: only TRADES runs: no Table 4, ANOVA or equal-step files (not placeholders), each skipped with a
    note in summary.json, and a placeholder an older report left behind is removed."""
    values = {("trades", lr, s): 0.3 + lr + 0.01 * s for lr in (0.01, 0.1) for s in (0, 1)}
    manifest = grid_study(tmp_path, values)
    stale = tmp_path / "tables" / "table4_paired_ttest.md"
    stale.parent.mkdir()
    stale.write_text("Table 4 analogue: needs both DEAT and PGD-AT runs\n")
    written = build_report(manifest, tmp_path / "tables", tmp_path / "figures")
    names = {path.stem for path in written}
    for name in ("table4_paired_ttest", "table4_anova", "equal_effective_step", "equal_effective_step_mean"):
        assert name not in names and not (tmp_path / "tables" / f"{name}.md").exists()
    assert "table2_pgd10_best" in names and "best_setting" in names
    skipped = json.loads((tmp_path / "tables" / "summary.json").read_text())["skipped"]
    assert "table4_paired_ttest: the study has no objective with both outer steps (e.g. PGD-AT and DEAT)" in skipped


def test_the_best_setting_is_chosen_on_validation_not_on_the_test_images(tmp_path):
    """Issue 23.2: PGD-AT's validation split prefers α 0.02, its test images α 0.01; the report names 0.02, its
    test accuracy, what the test would have picked, and the equal-α comparison at 0.02."""
    manifest = make_study(tmp_path)
    for run in manifest["runs"]:
        path = tmp_path / run["dir"] / "metrics.json"
        metrics = json.loads(path.read_text())
        val = {0.01: 0.30, 0.02: 0.35, 0.1: 0.32}[run["lr"]] + 0.001 * run["seed"]
        metrics["best"]["val_pgd_acc"] = val + (0.01 if run["method"] == "deat" else 0.0)
        path.write_text(json.dumps(metrics))
        if run["method"] == "pgd_at":
            evaluation = json.loads((tmp_path / run["eval"]).read_text())
            evaluation["checkpoints"]["best"]["pgd10_acc"] = {0.01: 0.50, 0.02: 0.45, 0.1: 0.40}[run["lr"]]
            (tmp_path / run["eval"]).write_text(json.dumps(evaluation))
    build_report(manifest, tmp_path / "tables", tmp_path / "figures", runs_root=tmp_path)
    best = {r["method"]: r for r in json.loads((tmp_path / "tables" / "summary.json").read_text())["best_setting"]}
    pgd = best["pgd_at"]
    assert (pgd["lr"], pgd["batch_size"]) == (0.02, 64)  # 0.35 at b = 64 and 128 alike: the first in grid order
    assert pgd["val_acc"] == pytest.approx(0.3505) and pgd["test_acc"] == pytest.approx(0.45)
    assert pgd["test_would_pick"]["lr"] == 0.01
    assert pgd["chosen_on"] == "validation split: metrics.json best.val_pgd_acc, seed mean"
    (at_alpha,) = [r for r in pgd["at_this_alpha"] if r["metric"] == "pgd10_acc"]
    expected = statistics.mean(best_pgd10("deat", 0.02, b, s) - 0.45 for b in BATCH_SIZES for s in SEEDS)
    assert at_alpha["mean"] == pytest.approx(expected)
    text = (tmp_path / "tables" / "best_setting.md").read_text(encoding="utf-8")
    assert "chosen on validation, never on the test images" in text


def test_results_readme_links_and_embeds_only_files_that_exist():
    """results/README.md is read on the web: every table and figure it names is a link (or an embedded image) to a
    committed file, and every figure a verdict rests on is embedded."""
    import re

    results = Path(__file__).resolve().parents[1] / "results"
    text = (results / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"\]\(((?:tables|figures)/[^)\s]+)\)", text)
    assert len(targets) > 30
    missing = [t for t in targets if not (results / t).is_file()]
    assert missing == []
    assert len(re.findall(r"!\[[^\]]*\]\(figures/[^)]+\.png\)", text)) >= 10


def test_summary_json_floats_do_not_depend_on_the_last_bits_of_a_statistic():
    """Issue 20.1: the committed summary.json files differed from a regeneration in the 17th digit of Pearson's r
    (-0.41375914256494983 vs -0.4137591425649499, two numpy/BLAS builds) and, in a later environment, in the 12th
    digit of an ANOVA F (0.521097046413 vs 0.521097046414); 9 significant digits make both pairs equal."""
    from deat.report.formatting import rounded

    assert rounded(-0.41375914256494983) == rounded(-0.4137591425649499) == -0.413759143
    assert rounded(0.521097046413) == rounded(0.521097046414) == 0.521097046
    assert rounded({"r": [0.08571428571428569, 1, "x", None], "n": 6}) == {"r": [0.0857142857, 1, "x", None],
                                                                           "n": 6}
    assert rounded(float("inf")) == float("inf") and rounded(1e-30 / 3) == 3.33333333e-31