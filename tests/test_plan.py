"""`python -m deat plan` against hand-built pilots and configs: the pooled paired sd, the seeds a half-width or an
MDE target needs (a hand computation of the t quantile at each n's own df, and statsmodels' power), the time
from the pilot's measured cost per run, and a configured study's cost from committed runs or the benchmark table."""

import contextlib
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from scipy import stats

from deat import plan
from deat.__main__ import main as deat_main
from deat.config import TrainConfig

REPO = Path(__file__).resolve().parent.parent
# Per-seed Δ = DEAT − PGD-AT of two equal-step pairings: each has sample variance 0.0005/3, so the pooled sd is
# √(0.0005/3) = 1.291 points on 2 × 3 = 6 df.
DELTAS = {0.01: [0.01, 0.03, 0.02, 0.00], 0.02: [-0.01, 0.01, 0.00, -0.02]}
PARTNER = {0.01: 0.2236, 0.02: 0.4472}  # DEAT's equal step and decay (coupled decay) to SGD momentum 0.9's α
PROTOCOL = {"pgd_at_momentum": 0.9, "k1": 1.0, "weight_decay": 5e-4, "decoupled_weight_decay": False,
            "pgd_steps": 3}


def write_pilot(root: Path) -> None:
    runs = []
    for lr, deltas in DELTAS.items():
        for seed, delta in enumerate(deltas):
            for method, run_lr, acc, wall in (("pgd_at", lr, 0.30 + 0.01 * seed, 120.0),
                                              ("deat", PARTNER[lr], 0.30 + 0.01 * seed + delta, 60.0)):
                run_dir = root / "results" / "runs" / f"{method}_{run_lr}_{seed}"
                run_dir.mkdir(parents=True)
                metrics = {"status": "complete", "config": {"lr": run_lr}, "wall_time_s": wall,
                           "environment": {"device": "cpu", "device_name": "test-cpu"},
                           "epochs": [{"epoch": 1, "test_pgd_acc": acc}], "best": {"epoch": 1, "val_pgd_acc": acc},
                           "last": {"epoch": 1}}
                evaluation = {"settings": {"n_examples": 500}, "examples": {"n": 500}, "wall_time_s": 30.0,
                              "checkpoints": {"best": {"pgd10_acc": acc}, "last": {"pgd10_acc": acc}}}
                (run_dir / "metrics.json").write_text(json.dumps(metrics))
                (run_dir / "eval.json").write_text(json.dumps(evaluation))
                runs.append({"arch": "small_cnn", "method": method, "lr": run_lr, "batch_size": 128, "seed": seed,
                             "dir": str(run_dir.relative_to(root))})
    manifest = root / "results" / "studies" / "pilot" / "manifest.json"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"study": "pilot", "protocol": PROTOCOL, "runs": runs}))


@pytest.fixture(scope="module")
def pilot(tmp_path_factory):
    root = tmp_path_factory.mktemp("pilot")
    write_pilot(root)
    return root


def by_hand_seeds(sd: float, half_width: float) -> int:
    n = 2
    while stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n) > half_width:
        n += 1
    return n


def test_seeds_for_a_half_width_from_the_pilots_pooled_paired_sd(pilot):
    result = plan.pilot_plan(pilot / "results" / "studies" / "pilot" / "manifest.json", pilot, half_width=0.01,
                             mde=None)
    sd = math.sqrt(0.0005 / 3)
    assert result["paired_sd"] == pytest.approx(sd) and result["df"] == 6
    assert result["pairs"] == "equal effective step, step + decay matched" and len(result["pairings"]) == 2
    # By hand: n = 8 gives t(0.975, 7)·1.291/√8 = 1.080 > 1 point; n = 9 gives 2.306·1.291/3 = 0.992.
    assert result["seeds_per_arm"] == by_hand_seeds(sd, 0.01) == 9
    assert result["half_width_at_n"] == pytest.approx(stats.t.ppf(0.975, 8) * sd / 3)
    # Cost: PGD-AT 120 + 30 s, DEAT 60 + 30 s per run; 2 pairings × 9 seeds × (150 + 90) s = 4,320 s.
    assert result["cost_per_run_s"]["baseline"]["mean_s"] == pytest.approx(150.0)
    assert result["cost_per_run_s"]["treatment"]["mean_s"] == pytest.approx(90.0)
    assert (result["runs"], result["total_s"]) == (36, pytest.approx(4320.0))
    # The sd's upper 95 % bound from 6 df, and the seeds at it.
    upper = sd * math.sqrt(6 / stats.chi2.ppf(0.05, 6))
    assert result["sd_upper_95"] == pytest.approx(upper)
    assert result["seeds_per_arm_at_sd_upper"] == by_hand_seeds(upper, 0.01)


def test_seeds_for_an_mde_are_statsmodels_power_rounded_up(pilot):
    from statsmodels.stats.power import TTestPower

    result = plan.pilot_plan(pilot / "results" / "studies" / "pilot" / "manifest.json", pilot, half_width=None,
                             mde=0.02)
    n, d = result["seeds_per_arm"], 0.02 / math.sqrt(0.0005 / 3)
    assert TTestPower().power(effect_size=d, nobs=n, alpha=0.05) >= 0.8
    assert TTestPower().power(effect_size=d, nobs=n - 1, alpha=0.05) < 0.8
    assert n == math.ceil(TTestPower().solve_power(effect_size=d, nobs=None, alpha=0.05, power=0.8))
    assert result["mde_at_n"] <= 0.02


def test_the_command_prints_the_plan_and_names_bad_input(pilot, monkeypatch):
    monkeypatch.chdir(pilot)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert deat_main(["plan", "--pilot", "pilot", "--half-width", "1"]) == 0
    text = out.getvalue()
    assert "paired sd (pooled within pairings): 1.29 points on 6 df" in text
    assert "seeds per arm: 9 " in text and "2 pairings × 9 seeds × 2 arms = 36 runs: 1.2 h" in text
    for argv, message in ((["plan", "--pilot", "pilot"], "--pilot needs a target"),
                          (["plan", "--pilot", "nosuch", "--mde", "1"], "--pilot nosuch: no results/studies/nosuch"),
                          (["plan", "--pilot", "pilot", "--mde", "-1"], "expected a number of points > 0"),
                          (["plan"], "plan needs --pilot STUDY")):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            assert deat_main(argv) == 2
        assert err.getvalue().startswith("error: ") and message in err.getvalue() and "Traceback" not in err.getvalue()


def tiny_config(path: Path, study: dict) -> None:
    path.write_text(yaml.safe_dump({"studies": {"tiny": study}}))


def test_a_cpu_study_is_priced_from_committed_runs_and_skips_what_is_done(tmp_path):
    study = {"dataset": "cifar10_small", "archs": ["small_cnn"], "methods": ["pgd_at", "deat"], "lrs": [0.01],
             "batch_sizes": [128], "seeds": [0, 1],
             "train": {"epochs": 5, "width": 32, "pgd_steps": 3, "val_size": 500}, "eval": {"n_examples": 500}}
    tiny_config(tmp_path / "config.yaml", study)
    # One committed run: PGD-AT seed 0 of this very grid, 4 epochs in 100 s, evaluated on 500 images in 50 s.
    config = TrainConfig.from_dict({**study["train"], "dataset": "cifar10_small", "arch": "small_cnn",
                                    "method": "pgd_at", "lr": 0.01, "batch_size": 128, "seed": 0}).resolved()
    run_dir = tmp_path / "results" / "runs" / "done"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.json").write_text(json.dumps({
        "status": "complete", "config": config.to_dict(), "wall_time_s": 100.0,
        "environment": {"device_name": "test-cpu"}, "epochs": [{}] * 4}))
    (run_dir / "eval_0123abcd.json").write_text(json.dumps({"settings": {"n_examples": 500}, "examples": {"n": 500},
                                                            "wall_time_s": 50.0}))
    cost = plan.study_cost(tmp_path / "config.yaml", "tiny", tmp_path / "results", REPO / "docs" / "benchmarks.md")
    assert (cost["runs"], cost["committed"], cost["to_train"], cost["to_evaluate"]) == (4, 1, 3, 3)
    assert cost["epochs_to_train"] == 15
    # 3 runs × 5 epochs × 25 s per epoch + 3 evaluations × 500 images × 0.1 s.
    assert cost["measured_s"] == pytest.approx(3 * 5 * 25.0 + 3 * 500 * 0.1) and cost["benchmark_s"] == 0
    assert cost["sources"] == ["test-cpu"]


def test_a_gpu_study_is_priced_from_the_benchmark_table(tmp_path):
    study = {"dataset": "cifar10", "archs": ["preact_resnet18", "vgg19"], "methods": ["pgd_at"], "lrs": [0.1],
             "batch_sizes": [128], "seeds": [0], "train": {"epochs": 2, "pgd_steps": 10},
             "eval": {"n_examples": 1000, "pgd_steps": 50, "pgd_restarts": 10, "autoattack": "standard"}}
    tiny_config(tmp_path / "config.yaml", study)
    table = plan.read_cost_table(REPO / "docs" / "benchmarks.md")
    assert {(r["kind"], r["batch"], r["attack"], r["value"]) for r in table} >= {
        ("train", 128, "PGD-10", 4716.0), ("eval", None, "PGD-50×10", 4.0), ("eval", None, "square", 20.6)}
    cost = plan.study_cost(tmp_path / "config.yaml", "tiny", tmp_path / "results", REPO / "docs" / "benchmarks.md")
    # Training: 2 epochs × 49,000 images (50,000 less the default 1,000 validation) / 4,716 images/s; evaluation:
    # 2 checkpoints × 1,000 images × (PGD-50×10 4.0 + PGD-10 0.08 + AutoAttack 1.3 + 8.1 + 14.0 + 20.6) s / 1,000.
    expected = 2 * 49_000 / 4716 + 2 * (4.0 + 4.0 * 10 / 500 + 44.0)
    assert cost["benchmark_s"] == pytest.approx(expected)
    assert cost["unknown_runs"] == 1 and cost["unknown_archs"] == ["vgg19"]
    assert cost["stand_in_s"] == pytest.approx(expected)  # at preact_resnet18's figures, printed as an assumption
    text = plan.format_study(cost)
    assert "1 runs (vgg19) have no measured figure" in text and "an assumption, not a measurement" in text
    with pytest.raises(ValueError, match="--study nosuch: not a study of"):
        plan.study_cost(tmp_path / "config.yaml", "nosuch", tmp_path / "results", REPO / "docs" / "benchmarks.md")


def test_plan_help_is_light():
    code = ("import sys; from deat.__main__ import build_parser; build_parser('plan').format_help(); "
            "print(sorted(m for m in ('torch', 'pandas', 'scipy', 'statsmodels') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert result.stdout.strip() == "[]"
