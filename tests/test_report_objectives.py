"""deat.report on a grid of several objectives (issue 16): DEAT vs SGD-momentum per objective at equal α and at
matched effective step, the objectives table (accuracy of best and last checkpoints, cost per epoch), and fast AT's
catastrophic overfitting, against a hand-built fixture whose numbers are worked out by hand below."""

import json
import math
from pathlib import Path

import pandas as pd
import pytest
from scipy import stats

from deat.report import loading, paper_tables, step_tables, study_tables
from deat.report.loading import load_runs
from deat.report.study import build_report

ARCH = "small_cnn"
LRS = [0.01, 0.2236]  # DEAT (k1 = 1) at 0.2236 moves 0.2236/√5 ≈ 0.1 = SGD-momentum 0.9's step at 0.01
SEEDS = [0, 1]
METHODS = ["pgd_at", "deat", "trades", "trades_deat", "fast_at"]
PROTOCOL = {"dataset": "npz:cifar10_small.npz", "epochs": 3, "pgd_at_momentum": 0.9, "k1": 1.0, "k2": 0.8,
            "beta": 6.0, "fgsm_step_size": 16 / 255, "seeds": SEEDS}
# Best-checkpoint PGD-10 accuracy per (method, α): seed 0, seed 1.
BEST_PGD10 = {
    ("pgd_at", 0.01): (0.40, 0.42), ("pgd_at", 0.2236): (0.38, 0.40),
    ("deat", 0.01): (0.41, 0.44), ("deat", 0.2236): (0.43, 0.44),
    ("trades", 0.01): (0.45, 0.47), ("trades", 0.2236): (0.44, 0.44),
    ("trades_deat", 0.01): (0.44, 0.48), ("trades_deat", 0.2236): (0.47, 0.49),
    ("fast_at", 0.01): (0.35, 0.36), ("fast_at", 0.2236): (0.30, 0.31),
}
COLLAPSED = ("fast_at", 0.2236, 1)  # per-epoch test PGD 0.30, 0.25, 0.01; last checkpoint PGD-10 0.02


def write_run(run_dir: Path, method: str, lr: float, seed: int, awp_gamma: float | None) -> None:
    best = BEST_PGD10[method, lr][seed]
    collapsed = (method, lr, seed) == COLLAPSED
    last = 0.02 if collapsed else best - 0.02
    per_epoch = [0.30, 0.25, 0.01] if collapsed else [best - 0.02, best, best - 0.01]
    times = [10.0, 12.0, 14.0] if seed == 0 else [12.0, 14.0, 16.0]  # mean 12 and 14 s
    rate = 400.0 if seed == 0 else 300.0
    step = lr / (1 - 0.9) if loading.objective_and_outer_step(method)[1] == "sgd" else lr / math.sqrt(5)
    config = {"lr": lr, "pgd_steps": 3, "eval_pgd_steps": 10}
    if awp_gamma is not None:
        config["awp_gamma"] = awp_gamma
    metrics = {"config": config, "status": "complete", "effective_step": step,
               "environment": {"device": "cpu", "device_name": "test-cpu", "torch": "2.14.1"},
               "epochs": [{"epoch": e + 1, "train_robust_acc": 0.3, "test_clean_acc": 0.7, "test_pgd_acc": acc,
                           "val_pgd_acc": acc, "epoch_time_s": times[e], "images_per_s": rate}
                          for e, acc in enumerate(per_epoch)],
               "best": {"epoch": 1 if collapsed else 2, "test_pgd_acc": max(per_epoch)},
               "last": {"epoch": 3, "test_pgd_acc": per_epoch[-1]}, "wall_time_s": sum(times)}

    def checkpoint(pgd10):
        return {"clean_acc": pgd10 + 0.3, "pgd10_acc": pgd10, "pgd_acc": pgd10 - 0.01, "aa_acc": pgd10 - 0.02}

    evaluation = {"settings": {"pgd_steps": 20, "pgd_restarts": 2, "aa_label": "APGD-CE + APGD-T"},
                  "examples": {"n": 500}, "checkpoints": {"best": checkpoint(best), "last": checkpoint(last)}}
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    (run_dir / "eval.json").write_text(json.dumps(evaluation))


def make_study(root: Path, methods=METHODS, awp_gamma: float | None = None, lrs=LRS) -> dict:
    runs = []
    for method in methods:
        for lr in lrs:
            for seed in SEEDS:
                run_dir = root / "runs" / method / f"lr{lr}_seed{seed}"
                write_run(run_dir, method, lr, seed, awp_gamma if loading.objective_and_outer_step(method)[0]
                          in ("pgd_at", "trades") else None)
                runs.append({"arch": ARCH, "method": method, "lr": lr, "batch_size": 128, "seed": seed,
                             "dir": str(run_dir.relative_to(root))})
    return {"study": "family", "description": "fixture", "protocol": PROTOCOL, "runs": runs}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    manifest = make_study(root)
    written = build_report(manifest, root / "tables", root / "figures", runs_root=root)
    return root, load_runs(manifest, root)[0], written


def csv_rows(path: Path) -> list[dict]:
    return pd.read_csv(path, dtype=str, keep_default_na=False).to_dict("records")


def test_methods_split_into_objective_and_outer_step_and_pair_per_objective():
    assert loading.objective_and_outer_step("trades_deat") == ("trades", "deat")
    assert loading.objective_and_outer_step("deat") == ("pgd_at", "deat")
    assert loading.objective_and_outer_step("handmade") == ("handmade", "")
    assert loading.objective_pairs(["mart", "trades_deat", "deat", "pgd_at", "trades", "fast_at"]) == [
        ("pgd_at", "pgd_at", "deat"), ("trades", "trades", "trades_deat")]
    # The outer step decides the effective step, whatever the objective.
    assert loading.formula_effective_step("mart", 0.01, 0.9, None) == pytest.approx(0.1)
    assert loading.formula_effective_step("trades_deat", 0.2236, None, 1.0) == pytest.approx(0.2236 / math.sqrt(5))


def test_paired_table_per_objective_at_equal_alpha(family):
    root, _, _ = family
    rows = [r for r in csv_rows(root / "tables" / "table4_paired_ttest.csv")
            if r["metric"] == "PGD-10 robust" and r["checkpoint"] == "best"]
    by = {(r["objective"], r["α"]): r for r in rows}
    assert [r["objective"] for r in rows].count("fast AT") == 0  # fast AT runs with SGD-momentum only: no pair
    t_crit = stats.t.ppf(0.975, df=1)  # two pairs per α: t-interval with 1 degree of freedom, se = sd/√2
    # TRADES + DEAT − TRADES at α = 0.01: 0.44 − 0.45, 0.48 − 0.47 → mean 0, sd √2·0.01, se 0.01.
    assert by["TRADES", "0.01"]["mean Δ (pp)"] == "+0.00"
    assert by["TRADES", "0.01"]["95% CI (pp)"] == f"[{-t_crit:+.2f}, {t_crit:+.2f}]"
    # α = 0.2236: 0.47 − 0.44, 0.49 − 0.44 → mean +4, se 1 pp.
    assert by["TRADES", "0.2236"]["mean Δ (pp)"] == "+4.00"
    assert by["TRADES", "0.2236"]["95% CI (pp)"] == f"[{4 - t_crit:+.2f}, {4 + t_crit:+.2f}]"
    # Pooled over the 4 TRADES pairs: Δ = −1, +1, +3, +5 pp: mean 2, sd √(20/3), t = 2 / (sd/2).
    pooled = by["TRADES", "pooled (paper's test)"]
    t = 2 / (math.sqrt(20 / 3) / 2)
    assert pooled["n"] == "4" and pooled["mean Δ (pp)"] == "+2.00" and pooled["t"] == f"{t:.2f}"
    assert pooled["p"] == f"{2 * stats.t.sf(t, df=3):.3f}"
    # DEAT − PGD-AT, the paper's pair, in the same table: α = 0.01: +1, +2 → +1.50.
    assert by["PGD-AT", "0.01"]["mean Δ (pp)"] == "+1.50"
    markdown = (root / "tables" / "table4_paired_ttest.md").read_text(encoding="utf-8")
    assert "Table 4 analogue per objective: Δ = DEAT − SGD-momentum" in markdown
    assert "TRADES + DEAT and TRADES" in markdown


def test_equal_effective_step_per_objective(family):
    root, _, _ = family
    rows = csv_rows(root / "tables" / "equal_effective_step.csv")
    # SGD-momentum 0.9 at α = 0.01 (step 0.1) meets DEAT at α = 0.2236 (step 0.09999) per seed; no other pair.
    assert [(r["objective"], r["seed"], r["α SGD-momentum"], r["α DEAT"]) for r in rows] == [
        ("PGD-AT", "0", "0.01", "0.2236"), ("PGD-AT", "1", "0.01", "0.2236"),
        ("TRADES", "0", "0.01", "0.2236"), ("TRADES", "1", "0.01", "0.2236")]
    assert [r["Δ best"] for r in rows] == ["+3.00", "+2.00", "+2.00", "+2.00"]
    assert rows[2]["SGD-momentum best"] == "45.00" and rows[2]["DEAT best"] == "47.00"
    summary = json.loads((root / "tables" / "summary.json").read_text())["equal_effective_step"]
    assert summary[2]["lr_trades"] == 0.01 and summary[2]["trades_deat_best_acc"] == pytest.approx(0.47)


def test_table2_has_a_delta_per_objective(family):
    root, _, _ = family
    row = next(r for r in csv_rows(root / "tables" / "table2_pgd10_best.csv") if r["α"] == "0.2236")
    assert row[f"{ARCH} Δ PGD-AT"] == "+4.50"  # (0.43 + 0.44)/2 − (0.38 + 0.40)/2
    assert row[f"{ARCH} Δ TRADES"] == "+4.00"
    assert f"{ARCH} fast AT" in row and f"{ARCH} Δ fast AT" not in row


def test_objectives_table_side_by_side(family):
    root, _, written = family
    assert {p.name for p in written if p.stem == "objectives"} == {"objectives.md", "objectives.tex",
                                                                     "objectives.csv"}
    rows = csv_rows(root / "tables" / "objectives.csv")
    assert [(r["method"], r["α"]) for r in rows] == [(m, a) for m in ("PGD-AT", "DEAT", "TRADES", "TRADES + DEAT",
                                                                      "fast AT") for a in ("0.01", "0.2236")]
    trades = rows[4]
    # Seeds 0.45, 0.47: mean 46, sd √2 = 1.41; clean +30, PGD-20×2 −1, APGD −2 points; last 2 points lower.
    assert trades["best clean"] == "76.00 ± 1.41" and trades["best PGD-10"] == "46.00 ± 1.41"
    assert trades["best PGD-20×2"] == "45.00 ± 1.41" and trades["best APGD-CE + APGD-T"] == "44.00 ± 1.41"
    assert trades["last PGD-10"] == "44.00 ± 1.41"
    # Epoch time: seed means 12 and 14 s → 13.0 ± √2; images/s 400 and 300 → 350 ± 70.7.
    assert trades["epoch time (s)"] == "13.0 ± 1.4" and trades["images/s"] == "350 ± 71"
    assert trades["device"] == "test-cpu"
    # fast AT at 0.2236: last PGD-10 0.28 (seed 0) and 0.02 (seed 1, collapsed): mean 15, sd 0.26/√2 = 18.38.
    assert rows[9]["last PGD-10"] == "15.00 ± 18.38"
    markdown = (root / "tables" / "objectives.md").read_text(encoding="utf-8")
    assert markdown.splitlines()[0].endswith("(protocol: [protocol.md](protocol.md))")
    tex = (root / "tables" / "objectives.tex").read_text(encoding="utf-8")
    assert r"\cmidrule" in tex and "cost per training epoch" in tex
    protocol = (root / "tables" / "protocol.md").read_text(encoding="utf-8")
    assert "PGD-AT, TRADES, fast AT: SGD, momentum 0.9" in protocol
    assert "DEAT, TRADES + DEAT: Algorithm 2, k1=1, k2=0.8" in protocol


def test_catastrophic_overfitting_is_flagged_at_any_epoch_by_the_training_rule(family):
    root, runs, _ = family
    notes, records = study_tables.catastrophic_overfitting(runs)
    assert len(records) == 4 and [r["collapsed"] for r in records] == [False, False, False, True]
    collapsed = records[3]
    # Validation PGD 0.30, 0.25, 0.01: epoch 3 is 29 points below the best before it (0.30 at epoch 1).
    assert collapsed["collapses"] == [{"epoch": 3, "accuracy": 0.01, "best_before": 0.30, "best_epoch": 1,
                                       "lowest": 0.01, "recovered_epoch": None}]
    assert "more than 20 points below the best of the epochs before it" in notes[0]
    assert (f"{ARCH} fast AT α=0.2236 b=128 seed 1: collapsed at epoch 3 (validation PGD 1.00 after a best of 30.00 "
            "at epoch 1, lowest 1.00, not recovered); PGD-10 best 31.00, last 2.00 (best − last +29.00)") in notes[0]
    assert f"{ARCH} fast AT α=0.01 b=128 seed 0: no collapse" in notes[0]
    for name in ("objectives", "robust_overfitting"):
        assert notes[0] in (root / "tables" / f"{name}.md").read_text(encoding="utf-8")
    summary = json.loads((root / "tables" / "summary.json").read_text())
    assert [r["collapsed"] for r in summary["catastrophic_overfitting"]] == [False, False, False, True]
    # A collapse the run recovers from counts too, and a run of any method is listed once it collapsed.
    recovered = runs[runs.method == "pgd_at"].head(1).assign(metrics_val_pgd_curve=[(0.5, 0.6, 0.1, 0.6)])
    (record,) = study_tables.catastrophic_overfitting(recovered)[1]
    assert record["collapses"][0]["epoch"] == 3 and record["collapses"][0]["recovered_epoch"] == 4
    # The rule's edge: exactly 20 points below is no collapse.
    edge = runs[runs.method == "fast_at"].head(1).assign(metrics_val_pgd_curve=[(0.5, 0.3)])
    assert study_tables.catastrophic_overfitting(edge)[1][0]["collapsed"] is False


def test_awp_runs_are_labelled_with_their_gamma(tmp_path):
    manifest = make_study(tmp_path, ["pgd_at", "trades", "trades_deat", "fast_at"], awp_gamma=0.005)
    table, summary = study_tables.objectives_table(load_runs(manifest, tmp_path)[0])
    assert [row[0] for row in table.rows] == ["PGD-AT + AWP"] * 2 + ["TRADES + AWP"] * 2 + \
        ["TRADES + DEAT + AWP"] * 2 + ["fast AT"] * 2
    assert "+ AWP: adversarial weight perturbation (Wu et al. 2020), γ = 0.005." in table.notes
    assert summary[0]["awp_gamma"] == 0.005 and summary[-1]["awp_gamma"] == 0.0


def test_one_objective_study_keeps_the_papers_tables_and_has_no_objectives_table(tmp_path):
    manifest = make_study(tmp_path, ["pgd_at", "deat"])
    written = build_report(manifest, tmp_path / "tables", tmp_path / "figures", runs_root=tmp_path)
    assert not any(p.stem == "objectives" for p in written)
    paired = pd.read_csv(tmp_path / "tables" / "table4_paired_ttest.csv")
    assert list(paired.columns)[0] == "arch"
    assert "Δ = DEAT − PGD-AT per α" in (tmp_path / "tables" / "table4_paired_ttest.md").read_text(encoding="utf-8")
    equal = pd.read_csv(tmp_path / "tables" / "equal_effective_step.csv")
    assert list(equal.columns)[:5] == ["arch", "b", "seed", "α PGD-AT", "α DEAT"]
    summary = json.loads((tmp_path / "tables" / "summary.json").read_text())
    assert "comparison" not in summary["table4_paired_ttest"][0]
    assert "catastrophic_overfitting" not in summary
    # runs.csv keeps its columns: the objectives table's additions stay out of it.
    assert "mean_epoch_time_s" not in pd.read_csv(tmp_path / "tables" / "runs.csv").columns


def test_one_alpha_study_like_at_family_says_what_it_cannot_show(tmp_path):
    """at_family's design: every method at one α; equal α pairs exist, matched effective steps do not."""
    runs = load_runs(make_study(tmp_path, lrs=[0.2236]), tmp_path)[0]
    equal, summary = step_tables.equal_step_table(runs)
    assert equal.rows == [] and summary == []
    assert equal.empty_message.startswith("No DEAT/SGD-momentum pair of one objective")
    paired, _ = paper_tables.paired_table(runs)
    pooled = [row for row in paired.rows if row[4] == "pooled (paper's test)" and row[2].startswith("PGD-10")
              and row[3] == "best"]
    # Two pairs each: TRADES +3, +5 → +4.00; PGD-AT +5, +4 → +4.50.
    assert [(row[0], row[6]) for row in pooled] == [("PGD-AT", "+4.50"), ("TRADES", "+4.00")]
    assert paper_tables.anova_table(runs)[0].rows == []  # one α: no method × α model


def test_runs_without_timings_are_left_out_of_the_cost_and_named(tmp_path):
    manifest = make_study(tmp_path, ["trades", "fast_at"], lrs=[0.01])
    path = tmp_path / manifest["runs"][0]["dir"] / "metrics.json"  # TRADES α=0.01 seed 0
    metrics = json.loads(path.read_text())
    for epoch in metrics["epochs"]:
        del epoch["epoch_time_s"], epoch["images_per_s"]
    path.write_text(json.dumps(metrics))
    table, _ = study_tables.objectives_table(load_runs(manifest, tmp_path)[0])
    row = dict(zip(table.columns, table.rows[0]))
    assert row["epoch time (s)"] == "14.0‡" and row["images/s"] == "300‡"  # seed 1 alone, fewer seeds than asked
    assert f"— cost: no per-epoch epoch_time_s / images_per_s in metrics.json for {ARCH} TRADES α=0.01 b=128 " \
           "seed 0 (older metrics.json)." in table.notes


def test_summary_gives_the_range_of_the_headline_comparisons_over_objectives(family):
    """at_family's at-a-glance range (issue 23.5): per metric and checkpoint the pooled equal-α Δ of each
    objective, with its verdict, and their range. PGD-10 best, by hand: DEAT − PGD-AT +1, +2, +5, +4 → +3.00;
    TRADES + DEAT − TRADES −1, +1, +3, +5 → +2.00."""
    root, _, _ = family
    headline = json.loads((root / "tables" / "summary.json").read_text())["headline"]
    pooled = {r["comparison"]: r for r in headline["equal_alpha_pooled"]
              if r["metric"] == "pgd10_acc" and r["checkpoint"] == "best"}
    assert pooled["deat_minus_pgd_at"]["mean"] == pytest.approx(0.03)
    assert pooled["trades_deat_minus_trades"]["mean"] == pytest.approx(0.02)
    interval = stats.ttest_1samp([-0.01, 0.01, 0.03, 0.05], 0.0).confidence_interval(0.95)
    assert (pooled["trades_deat_minus_trades"]["ci_low"], pooled["trades_deat_minus_trades"]["ci_high"]) == \
        pytest.approx((interval.low, interval.high))
    (span,) = [r for r in headline["equal_alpha_range"] if r["metric"] == "pgd10_acc" and r["checkpoint"] == "best"]
    assert (span["min_mean_delta_acc"], span["max_mean_delta_acc"]) == (pytest.approx(0.02), pytest.approx(0.03))
    assert span["n_comparisons"] == 2
    families = json.loads((root / "tables" / "summary.json").read_text())["tests"]["families"]
    # PGD-10: 2 objectives × 2 checkpoints × (2 per-α + α as the unit + pooled) = 16, and the equal-step means
    # over 2 seeds (one pairing per objective and checkpoint): PGD-AT's +3, +2 at both checkpoints; TRADES' +2, +2
    # have sd 0, no test. 18 tests.
    assert families["pgd10_acc"] == {"size": 18, "tables": ["table4_paired_ttest", "equal_effective_step_mean"]}
