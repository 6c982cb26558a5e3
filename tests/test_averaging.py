"""Weight averaging (EMA) against its closed form and as a training option; catastrophic overfitting caught per epoch."""

import json
import math

import pytest
import torch

import deat.train
from deat.averaging import WeightAverage, ema_decay
from deat.config import TrainConfig, run_identity
from deat.guards import collapses
from deat.train import train
from test_train import TIMING_KEYS, assert_same_tensors, quiet, run_killed_after, tiny_config


def _one_parameter_model(value: float = 0.0) -> torch.nn.Module:
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(value)
    return model


def test_ema_matches_its_closed_form_after_n_steps():
    # θ̄_n = Π_{t≤n} τ_t · θ̄_0 + Σ_t (1 − τ_t) Π_{s>t} τ_s · θ_t, τ_t = 0 before the warm-up (120 steps · 2.5 % = 3),
    # then min(τ, (1 + d)/(10 + d)), d = t − 3: written out here from the definition, not from the code.
    tau, total = 0.9, 120
    values = [0.5 * t - 0.03 * t * t for t in range(1, 31)]  # the raw parameter after each of 30 steps
    model = _one_parameter_model(7.0)
    average = WeightAverage(model, tau, total_steps=total)
    assert average.warmup_steps == 3
    for value in values:
        with torch.no_grad():
            model.weight.fill_(value)
        average.update(model)
    decays = [0.0, 0.0] + [min(tau, (1 + d) / (10 + d)) for d in range(0, 28)]  # steps 1, 2 < warm-up
    expected = 7.0 * math.prod(decays)
    for t, value in enumerate(values):
        expected += (1 - decays[t]) * math.prod(decays[t + 1:]) * value
    assert average.model.weight.item() == pytest.approx(expected, rel=1e-6)
    assert [ema_decay(t, tau, 1) for t in (1, 2, 11, 1000)] == [pytest.approx(0.1), pytest.approx(2 / 11),
                                                               pytest.approx(11 / 20), 0.9]


def test_tau_zero_gives_the_raw_model_bit_for_bit():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 3))
    average = WeightAverage(model, 0.0, total_steps=10)
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()(torch.randn(8, 5))  # moves the BatchNorm statistics
        average.update(model)
    assert_same_tensors(model.state_dict(), average.averaged(model).state_dict(), "averaged model")


def test_ema_tau_out_of_range_is_a_one_line_error_naming_the_key():
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError) as err:
            TrainConfig.from_dict({"ema_tau": bad})
        assert str(err.value) == f"config: ema_tau={bad!r} is invalid; expected 0 <= ema_tau < 1 (0 = off)"


def test_ema_off_keeps_every_run_identity_and_on_changes_it():
    base = tiny_config("x").resolved().to_dict()
    assert run_identity({**base, "ema_tau": 0.0}) == run_identity({k: v for k, v in base.items() if k != "ema_tau"})
    assert "ema_tau" not in run_identity(base) and run_identity({**base, "ema_tau": 0.99})["ema_tau"] == 0.99
    assert "co_drop" not in run_identity({**base, "co_drop": 0.3})  # only a reporting threshold while not stopping
    assert run_identity({**base, "co_early_stop": True, "co_drop": 0.3})["co_drop"] == 0.3


@pytest.fixture(scope="module")
def ema_runs(tmp_path_factory):
    """The same tiny PGD-AT run without EMA, with EMA, and with EMA killed after epoch 1 and resumed."""
    root = tmp_path_factory.mktemp("ema")
    plain = train(tiny_config(root / "plain", method="pgd_at", lr=0.01, epochs=2), log=quiet)
    averaged = train(tiny_config(root / "ema", method="pgd_at", lr=0.01, epochs=2, ema_tau=0.9), log=quiet)
    killed_cfg = tiny_config(root / "killed", method="pgd_at", lr=0.01, epochs=2, ema_tau=0.9)
    run_killed_after(killed_cfg, epoch=1)
    resumed = train(killed_cfg, log=quiet)
    return root, plain, averaged, resumed


def test_ema_does_not_change_the_raw_training_and_is_evaluated_each_epoch(ema_runs):
    root, plain, averaged, _ = ema_runs
    raw_keys = set(plain["epochs"][0]) - set(TIMING_KEYS)
    assert [{k: r[k] for k in raw_keys} for r in averaged["epochs"]] == [{k: r[k] for k in raw_keys}
                                                                         for r in plain["epochs"]]
    assert_same_tensors(torch.load(root / "plain" / "last.pt", weights_only=True)["model"],
                        torch.load(root / "ema" / "last.pt", weights_only=True)["model"], "raw last.pt")
    for record in averaged["epochs"]:
        assert {"ema_val_clean_acc", "ema_val_pgd_acc", "ema_test_clean_acc", "ema_test_pgd_acc"} <= set(record)
    best = max(averaged["epochs"], key=lambda r: r["ema_val_pgd_acc"])  # first maximum: chosen on validation
    assert averaged["best_ema"]["epoch"] == best["epoch"] and averaged["last_ema"]["epoch"] == 2
    last_ema = torch.load(root / "ema" / "last_ema.pt", weights_only=True)
    best_ema = torch.load(root / "ema" / "best_ema.pt", weights_only=True)
    assert last_ema["epoch"] == 2 and best_ema["epoch"] == best["epoch"]
    # The averaged weights differ from the raw ones (τ 0.9 over 30 steps), its BatchNorm statistics are the raw ones.
    raw = torch.load(root / "ema" / "last.pt", weights_only=True)["model"]
    assert any(not torch.equal(raw[k], last_ema["model"][k]) for k in raw if k.endswith("weight"))
    buffers = [k for k in raw if k.endswith(("running_mean", "running_var"))]
    assert buffers and all(torch.equal(raw[k], last_ema["model"][k]) for k in buffers)


def test_resume_restores_the_average_bit_for_bit(ema_runs):
    root, _, averaged, resumed = ema_runs
    for name in ("last_ema.pt", "best_ema.pt", "last.pt"):
        assert_same_tensors(torch.load(root / "ema" / name, weights_only=True)["model"],
                            torch.load(root / "killed" / name, weights_only=True)["model"], name)
    saved = torch.load(root / "killed" / "last.pt", weights_only=True)["ema"]
    assert saved["steps"] == 2 * 15 and saved["tau"] == 0.9
    assert resumed["best_ema"] == averaged["best_ema"] and resumed["last_ema"] == averaged["last_ema"]


# ------------------------------------------------------------------------------------- catastrophic overfitting

# Validation PGD-10 accuracy per epoch (%) of the newcomer's case on this project's 2-core CPU (2026-12-06):
# python -m deat train --dataset mnist5k --method fast_at --eps 0.3 --fgsm-step-size 0.6 --lr 0.1 --batch-size 128
#     --schedule constant --width 16 --epochs 40 --device cpu   (one torch thread)
MEASURED_FAST_AT_VAL_PGD = [2.0, 1.8, 4.0, 6.2, 12.5, 16.5, 27.3, 39.5, 46.5, 49.0, 45.5, 4.0, 38.0, 34.5, 53.5, 48.0,
                            45.8, 11.5, 50.2, 49.5, 55.3, 37.0, 25.5, 65.0, 71.2, 60.5, 62.7, 54.0, 58.2, 42.5, 71.7,
                            65.0, 72.3, 68.8, 68.5, 72.3, 66.0, 72.5, 64.7, 64.0]


def test_a_collapse_is_flagged_at_its_epoch_whether_or_not_the_run_recovers():
    curve = [v / 100 for v in MEASURED_FAST_AT_VAL_PGD]
    found = collapses(curve)
    assert [c["epoch"] for c in found] == [12, 18, 23, 30]
    assert found[0]["best_before"] == pytest.approx(0.49) and found[0]["recovered_epoch"] == 13
    assert [c["epoch"] for c in collapses(curve[:12])] == [12]  # the same run stopped at its collapse
    assert collapses(curve[:12])[0]["recovered_epoch"] is None
    # The report of the same command on another machine: a 70.8 % peak, 2.4 % at epoch 29, then recovery.
    reported = [0.1 + 0.02 * e for e in range(1, 29)] + [0.024] + [0.6] * 11
    reported[20] = 0.708
    assert [c["epoch"] for c in collapses(reported)] == [29] == [c["epoch"] for c in collapses(reported[:29])]
    assert collapses([0.25, 0.10, 0.26, 0.07]) == [] and collapses([0.3, 0.1]) == []  # 20 points is the line
    assert collapses([None, 0.5, None, 0.2])[0]["epoch"] == 4


def test_training_warns_records_and_optionally_stops_at_a_collapse(tmp_path, monkeypatch):
    scripted_val_pgd = [0.30, 0.50, 0.20, 0.55]  # epoch 3 falls 30 points below the best so far
    real_evaluate = deat.train.evaluate_epoch
    calls = []

    def scripted(model, *args, **kwargs):
        calls.append(1)
        return {**real_evaluate(model, *args, **kwargs), "val_pgd_acc": scripted_val_pgd[len(calls) - 1]}

    monkeypatch.setattr(deat.train, "evaluate_epoch", scripted)
    lines = []
    kept = train(tiny_config(tmp_path / "warned", epochs=4, pgd_steps=1, eval_pgd_steps=1, eval_examples=20),
                 log=lines.append)
    assert [r["co_collapse"] for r in kept["epochs"]] == [0.0, 0.0, 1.0, 0.0]
    assert kept["collapses"] == [{"epoch": 3, "val_pgd_acc": 0.2, "best_before": 0.5, "drop": 0.2}]
    assert sum(line.startswith("WARNING: catastrophic overfitting at epoch 3") for line in lines) == 1
    assert kept["last"]["epoch"] == 4 and "stopped_early" not in kept

    calls.clear()
    cfg = tiny_config(tmp_path / "stopped", epochs=4, pgd_steps=1, eval_pgd_steps=1, eval_examples=20,
                      co_early_stop=True)
    stopped = train(cfg, log=quiet)
    assert stopped["stopped_early"] == {"epoch": 3, "kept_epoch": 2, "reason": "catastrophic overfitting"}
    assert [r["epoch"] for r in stopped["epochs"]] == [1, 2, 3] and stopped["last"]["epoch"] == 2
    assert torch.load(tmp_path / "stopped" / "last.pt", weights_only=True)["epoch"] == 2
    assert len(calls) == 3  # epoch 4 never trained
    # metrics.json lost later: published again from last.pt, not retrained (an early stop counts as finished).
    (tmp_path / "stopped" / "metrics.json").unlink()
    assert json.loads(json.dumps(train(cfg, log=quiet)))["stopped_early"]["epoch"] == 3 and len(calls) == 3


def test_evaluation_attacks_the_averaged_checkpoints_and_measures_the_robust_gap_alike(ema_runs):
    from deat import evaluate
    from deat.attacks import robust_mask
    from deat.data import load_dataset
    from deat.generalization import training_subset

    root = ema_runs[0]
    flags = ["--n-examples", "40", "--pgd-steps", "3", "--pgd-restarts", "1", "--autoattack-attacks", "apgd-ce",
             "--train-examples", "30", "--flatness", "--device", "cpu"]
    args = evaluate.get_args_parser().parse_args(["--run-dir", str(root / "ema"), *flags])
    assert evaluate.main(args) == 0
    result = json.loads((root / "ema" / "eval.json").read_text())
    assert list(result["checkpoints"]) == ["best", "last", "best_ema", "last_ema"]  # the average's by default
    assert result["settings"]["train_examples"] == 30
    # The gap by hand: PGD-10 with the evaluation's settings on the same 30 training images, minus the test PGD-10.
    data = load_dataset("mnist5k", val_size=100)
    index = training_subset(len(data.train_y), 30, seed=0)
    model, _ = evaluate.load_run_model(root / "ema" / "last_ema.pt", "cpu")
    settings = result["settings"]
    robust = robust_mask(model, data.train_x[index].float() / 255, data.train_y[index], settings["eps"],
                         settings["pgd10_step_size"], 10, settings["norm"], batch_size=settings["batch_size"],
                         generator=torch.Generator().manual_seed(0))
    entry = result["checkpoints"]["last_ema"]
    assert entry["train_pgd10_acc"] == robust.float().mean().item()
    assert entry["robust_gap_pgd10"] == pytest.approx(entry["train_pgd10_acc"] - entry["pgd10_acc"])
    curves = entry["flatness"]
    assert curves["gammas"][0] == 0 and curves["random_rise"][0] == 0 and curves["examples"] == 30
    assert len(curves["worst_rise"]) == len(curves["gammas"])
    plain = evaluate.get_args_parser().parse_args(["--run-dir", str(root / "plain"), *flags[:8], "--device", "cpu"])
    assert evaluate.main(plain) == 0  # a run without an average: best and last only, and no gap when not asked
    plain_result = json.loads((root / "plain" / "eval.json").read_text())
    assert list(plain_result["checkpoints"]) == ["best", "last"]
    assert "train_pgd10_acc" not in plain_result["checkpoints"]["best"]
    assert "train_examples" not in plain_result["settings"]


def test_no_committed_run_is_flagged_as_collapsed():
    # Every run this project has committed, the fast AT runs of at_family included: the rule must not cry wolf.
    from pathlib import Path

    runs = sorted(Path(__file__).resolve().parents[1].glob("results/runs/**/metrics.json"))
    fast_at = [p for p in runs if "/fast_at" in str(p)]
    assert len(runs) > 100 and fast_at
    for path in runs:
        curve = [e.get("val_pgd_acc") for e in json.loads(path.read_text())["epochs"]]
        assert collapses(curve) == [], path


def test_mlflow_summary_carries_the_average_memory_and_collapses():
    pytest.importorskip("mlflow")
    from deat.tracking import summary_metrics

    metrics = {"best": {"epoch": 2, "test_pgd_acc": 0.4}, "last": {"epoch": 3, "test_pgd_acc": 0.3},
               "best_ema": {"epoch": 3, "test_pgd_acc": 0.45}, "last_ema": None, "wall_time_s": 12.0,
               "peak_memory_mb": 800.5, "collapses": [{"epoch": 3}]}
    logged = {m.key: m.value for m in summary_metrics(metrics, 0)}
    assert logged["summary/best_ema/test_pgd_acc"] == 0.45 and logged["summary/peak_memory_mb"] == 800.5
    assert logged["summary/collapses"] == 1.0 and logged["summary/wall_time_s"] == 12.0
