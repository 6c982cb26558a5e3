"""The report's weight-averaging and mechanism tables against hand-built runs whose answers are known by hand."""

import json
import math
from pathlib import Path

import pytest
from scipy import stats

from deat.report import averaging_tables, mechanism_tables
from deat.report.loading import load_runs
from deat.report.study import build_report

PROTOCOL = {"dataset": "cifar10_small", "epochs": 3, "pgd_at_momentum": 0.9, "k1": 1.0, "k2": 0.8, "seeds": [0, 1, 2]}


def _write(root: Path, name: str, metrics: dict, evaluation: dict) -> str:
    run = root / name
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({"status": "complete", **metrics}))
    (run / "eval.json").write_text(json.dumps({"settings": {"pgd_steps": 20, "pgd_restarts": 1,
                                                            "aa_label": "APGD-CE", "robust_rule": "r"},
                                               "examples": {"n": 100}, **evaluation}))
    return name


def _checkpoint(pgd10, **extra):
    return {"clean_acc": pgd10 + 0.2, "pgd10_acc": pgd10, "pgd_acc": pgd10, "aa_acc": pgd10 - 0.01, **extra}


# ------------------------------------------------------------------------------------------ weight averaging

# last-checkpoint PGD-10 per (method, with EMA) and seed; the EMA runs' last (EMA) adds EMA_GAIN[method] + seed noise
LAST = {"pgd_at": [0.20, 0.22, 0.21], "deat": [0.24, 0.25, 0.27]}
EMA_GAIN = {"pgd_at": [0.05, 0.06, 0.06], "deat": [0.02, 0.02, 0.03]}


@pytest.fixture(scope="module")
def averaging(tmp_path_factory):
    root = tmp_path_factory.mktemp("wa")
    runs = []
    for method, lr, step in (("pgd_at", 0.05, 0.5), ("deat", 1.118, 0.5)):
        for tau in (0.0, 0.98):
            for seed in range(3):
                last = LAST[method][seed]
                curve = [last + 0.05, last + 0.08, last]  # per-epoch test PGD: peak then a fall of 8 points
                ema_curve = [last + 0.05, last + 0.07, last + EMA_GAIN[method][seed]] if tau else None
                epochs = [{"epoch": e + 1, "test_pgd_acc": a, "val_pgd_acc": a, "train_robust_acc": 0.5,
                           **({"ema_test_pgd_acc": ema_curve[e]} if tau else {})} for e, a in enumerate(curve)]
                checkpoints = {"best": _checkpoint(last + 0.08), "last": _checkpoint(last)}
                if tau:
                    checkpoints.update(best_ema=_checkpoint(last + 0.07), last_ema=_checkpoint(last + EMA_GAIN[
                        method][seed]))
                name = _write(root, f"{method}_{tau}_{seed}", {"config": {"lr": lr, "ema_tau": tau, "momentum": 0.9,
                                                                           "k1": 1.0}, "effective_step": step,
                                                              "epochs": epochs, "best": {"epoch": 2},
                                                              "last": {"epoch": 3}},
                              {"checkpoints": checkpoints})
                runs.append({"arch": "small_cnn", "method": method, "lr": lr, "batch_size": 64, "seed": seed,
                             "sweep": {"ema_tau": tau}, "dir": name})
    manifest = {"study": "wa", "protocol": PROTOCOL, "runs": runs}
    return root, manifest, *load_runs(manifest, root)


def test_weight_averaging_answers_the_three_questions_by_hand(averaging):
    root, manifest, runs, epochs = averaging
    assert averaging_tables.has_averaging(runs)
    (table, rows), (questions, answers) = averaging_tables.averaging_tables(runs, epochs, "APGD-CE")
    assert [r[0] for r in table.rows] == ["PGD-AT", "PGD-AT + EMA τ=0.98", "DEAT", "DEAT + EMA τ=0.98"]
    by = {(a["question"], a["what"], a["metric"]): a for a in answers}
    gain = by["1 EMA vs the fall", "PGD-AT: last (EMA) with EMA − last without", "PGD-10"]
    assert gain["n"] == 3 and gain["mean"] == pytest.approx(sum(EMA_GAIN["pgd_at"]) / 3)
    expected = stats.ttest_1samp(EMA_GAIN["pgd_at"], 0).confidence_interval(0.95)
    assert (gain["ci_low"], gain["ci_high"]) == (pytest.approx(expected.low), pytest.approx(expected.high))
    fall = by["1 EMA vs the fall", "PGD-AT + EMA: fall of the raw curve − fall of the average", "per-epoch PGD"]
    # raw fall 8 points, the average's (last + 0.07) − (last + gain): 7 − gain points
    assert fall["mean"] == pytest.approx(0.08 - (0.07 - sum(EMA_GAIN["pgd_at"]) / 3))
    both = by["2 DEAT with EMA on both", "DEAT − PGD-AT, last (EMA)", "PGD-10"]
    assert both["mean"] == pytest.approx(sum(d + gd - p - gp for d, gd, p, gp in zip(
        LAST["deat"], EMA_GAIN["deat"], LAST["pgd_at"], EMA_GAIN["pgd_at"])) / 3)
    interaction = by["3 do they add up", "(DEAT + EMA − DEAT) − (PGD-AT + EMA − PGD-AT), last", "PGD-10"]
    assert interaction["mean"] == pytest.approx((sum(EMA_GAIN["deat"]) - sum(EMA_GAIN["pgd_at"])) / 3)
    assert interaction["verdict"] == "DEAT worse"  # every seed: EMA helps PGD-AT more than DEAT
    written = build_report(manifest, root / "tables", root / "figures", runs_root=root)
    names = {p.name for p in written}
    assert {"weight_averaging.md", "weight_averaging_questions.md", "weight_averaging_per_epoch.png"} <= names


# ----------------------------------------------------------------------------------------------- mechanism

GRID = [(0.025, 32), (0.05, 64), (0.1, 128), (0.05, 32), (0.1, 64), (0.025, 64), (0.05, 128), (0.1, 32),
        (0.025, 128)]


@pytest.fixture(scope="module")
def mechanism(tmp_path_factory):
    """PGD-AT with tr Σ = 100 everywhere (diffusion exactly ∝ α/b) and a gap that grows with α/b; DEAT matched at
    α 0.05 with 9× PGD-AT's update noise on every seed."""
    root = tmp_path_factory.mktemp("mech")
    runs = []
    for seed in range(2):
        for method, lr, b in [("pgd_at", lr, b) for lr, b in GRID] + [("deat", 1.118, b) for b in (32, 64, 128)]:
            partner_lr = 0.05 if method == "deat" else lr
            update = 1e-3 * partner_lr * (9 if method == "deat" else 1) * (1 + 0.1 * seed)
            gap = 0.1 + partner_lr / b * 20 + 0.001 * seed
            epochs = [{"epoch": e, "test_pgd_acc": 0.2, "val_pgd_acc": 0.2, "train_robust_acc": 0.4,
                       "probe_lr": lr, "probe_grad_trace_sigma": 100.0, "probe_diffusion": lr / b * 100.0,
                       "probe_update_trace_cov": update, "probe_b_simple": 50.0} for e in (1, 2)]
            name = _write(root, f"{method}_{lr}_{b}_{seed}",
                          {"config": {"lr": lr, "momentum": 0.9, "k1": 1.0}, "epochs": epochs},
                          {"checkpoints": {"best": _checkpoint(0.2, train_pgd10_acc=0.2 + gap),
                                           "last": _checkpoint(0.2)}})
            runs.append({"arch": "small_cnn", "method": method, "lr": lr, "batch_size": b, "seed": seed, "dir": name})
    manifest = {"study": "mech", "protocol": PROTOCOL, "runs": runs}
    return root, manifest, *load_runs(manifest, root)


def test_mechanism_answers_slope_k_and_correlation_by_hand(mechanism):
    root, manifest, runs, epochs = mechanism
    assert mechanism_tables.has_probes(epochs)
    (per_run, _), (answers, records) = mechanism_tables.mechanism_tables(runs, epochs, PROTOCOL)
    assert len(per_run.rows) == 24
    slope = next(r for r in records if r["question"] == 1 and r["measure"].startswith("slope of log diffusion"))
    assert slope["slope"] == pytest.approx(1.0) and slope["n"] == 18
    trace = next(r for r in records if r["question"] == 1 and "tr Σ" in r["measure"])
    assert trace["n"] == 18 and trace["slope"] == pytest.approx(0.0, abs=1e-12)  # tr Σ constant: all in α/b
    (k,) = [r for r in records if r["question"] == 2]
    assert k["n"] == 6 and k["k_geometric_mean"] == pytest.approx(9.0)
    assert k["k_step_predicted"] == pytest.approx(16.0)  # (1 + 1)²(1 − 0.8)²/(1 − 0.9)²
    gap = next(r for r in records if r["question"] == 3 and r["target"] == "robust_gap" and r["test"] == "spearman")
    diffusion = [lr / b * 100 for seed in range(2) for lr, b in GRID + [(1.118, b) for b in (32, 64, 128)]]
    gaps = [0.1 + p / b * 20 + 0.001 * seed for seed in range(2)
            for p, b in GRID + [(0.05, b) for b in (32, 64, 128)]]
    assert gap["n"] == 24 and gap["r"] == pytest.approx(stats.spearmanr(diffusion, gaps).statistic)
    written = build_report(manifest, root / "tables", root / "figures", runs_root=root)
    assert {"diffusion_answers.md", "diffusion_per_epoch.png", "diffusion_vs_robust_gap.png"} <= {p.name for p in
                                                                                                   written}
    assert math.isfinite(k["ci_low"]) if k["ci_low"] is not None else True
