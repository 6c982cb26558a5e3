"""The training loop as a user meets it: exact resume after kill -9, refused checkpoints, divergence, real runs
that learn, metrics.json, the CLI help and the progress lines. All on CPU with one torch thread (conftest.py)."""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import deat.objectives
import deat.train
from deat.checkpoint import save_checkpoint
from deat.config import TrainConfig
from deat.train import train

REPO = Path(__file__).resolve().parents[1]
# The only per-epoch values allowed to differ between equal runs: what they cost.
TIMING_KEYS = ("images_per_s", "epoch_time_s", "epoch_wall_time_s", "peak_memory_mb")
EPOCH_KEYS = {"epoch", "lr", "train_loss", "train_robust_acc", "val_clean_acc", "val_pgd_acc", "test_clean_acc",
              "test_pgd_acc", "images_per_s", "epoch_time_s", "epoch_wall_time_s", "peak_memory_mb", "co_collapse"}
# mnist5k holds 4,000 training images; 100 held out leave 3,900, i.e. 15 batches of 256 (the last 60 dropped).
ITERATIONS_PER_EPOCH = 15


def tiny_config(out: Path, **overrides) -> TrainConfig:
    """A run of about a second per epoch: mnist5k, small_cnn, batch 256, PGD-2 training, 100 val/test images."""
    settings = dict(dataset="mnist5k", arch="small_cnn", method="deat", lr=0.1, batch_size=256, epochs=2,
                    val_size=100, pgd_steps=2, eval_pgd_steps=2, eval_examples=100, device="cpu", out=str(out))
    settings.update(overrides)
    return TrainConfig.from_dict(settings)


def quiet(line: str) -> None:
    pass


def assert_same_tensors(expected, actual, where: str = "state") -> None:
    """Every tensor equal bit for bit (torch.equal), every plain value equal, through nested dicts and lists."""
    if isinstance(expected, torch.Tensor):
        assert torch.equal(expected, actual), f"{where} differs"
    elif isinstance(expected, dict):
        assert expected.keys() == actual.keys(), where
        for key in expected:
            assert_same_tensors(expected[key], actual[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(expected) == len(actual), where
        for i, (a, b) in enumerate(zip(expected, actual)):
            assert_same_tensors(a, b, f"{where}[{i}]")
    else:
        assert expected == actual, f"{where}: {expected!r} != {actual!r}"


def without_timing(epochs: list[dict]) -> list[dict]:
    return [{k: v for k, v in record.items() if k not in TIMING_KEYS} for record in epochs]


# A child process that trains `cfg` and dies with os._exit(137) (what kill -9 leaves: no cleanup, no finally
# blocks, no flush) from the epoch hook, which train() calls once that epoch's checkpoint is on disk.
KILLED_RUN = """
import json, os, sys
import torch
torch.set_num_threads(1)
from deat.config import TrainConfig
from deat.train import RunLogger, train

kill_after = int(sys.argv[2])
def die(record):
    if record["epoch"] == kill_after:
        os._exit(137)
train(TrainConfig.from_dict(json.loads(sys.argv[1])), RunLogger(epoch=die), log=lambda line: None)
"""


def run_killed_after(cfg: TrainConfig, epoch: int) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.run([sys.executable, "-c", KILLED_RUN, json.dumps(cfg.to_dict()), str(epoch)],
                           env=env, capture_output=True, text=True, timeout=300)
    assert child.returncode == 137, child.stderr


# ------------------------------------------------------------------------------------------------ resume

@pytest.mark.parametrize("method,lr", [("deat", 0.1), ("pgd_at", 0.01)])
def test_resume_after_kill_matches_an_uninterrupted_run_bit_for_bit(tmp_path, method, lr):
    straight_cfg = tiny_config(tmp_path / "straight", method=method, lr=lr)
    straight = train(straight_cfg, log=quiet)

    killed_cfg = tiny_config(tmp_path / "killed", method=method, lr=lr)
    run_killed_after(killed_cfg, epoch=1)
    running = tmp_path / "killed" / "running"
    assert torch.load(running / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert not (tmp_path / "killed" / "last.pt").exists() and not (tmp_path / "killed" / "metrics.json").exists()

    log_lines = []
    resumed = train(killed_cfg, log=log_lines.append)  # the same call again: it continues after epoch 1

    assert any("resuming" in line and "after epoch 1 of 2" in line for line in log_lines)
    assert without_timing(resumed["epochs"]) == without_timing(straight["epochs"])
    assert [r["epoch"] for r in resumed["epochs"]] == [1, 2]
    assert resumed["best"] == straight["best"] and resumed["last"] == straight["last"]
    straight_last = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    resumed_last = torch.load(tmp_path / "killed" / "last.pt", weights_only=True)
    assert_same_tensors(straight_last["model"], resumed_last["model"], "model")
    assert_same_tensors(straight_last["optimizer"], resumed_last["optimizer"], "optimizer")
    assert_same_tensors(straight_last["rng"], resumed_last["rng"], "rng")
    if method == "deat":
        # 15 steps per epoch: epoch 2 starts on an even step, so it must feed the other buffer than step 1 did.
        assert ITERATIONS_PER_EPOCH % 2 == 1
        assert resumed_last["optimizer"]["state"][0]["step"] == 2 * ITERATIONS_PER_EPOCH
    assert not running.exists()
    # The history survives the kill: both attempts' time is counted, and the run's log holds both attempts' lines.
    assert [a["attempt"] for a in resumed["attempts"]] == [1, 2]
    assert [(a["first_epoch"], a["last_epoch"]) for a in resumed["attempts"]] == [(1, 1), (2, 2)]
    assert resumed["wall_time_s"] == pytest.approx(sum(a["wall_time_s"] for a in resumed["attempts"]))
    assert resumed["attempts"][0]["wall_time_s"] >= resumed["epochs"][0]["epoch_time_s"]
    run_log = (tmp_path / "killed" / "train.log").read_text().splitlines()
    marker = next(i for i, line in enumerate(run_log) if line.startswith("=== resuming"))
    assert any("iterations/epoch" in line for line in run_log[:marker])  # attempt 1's start line, kept
    assert any(line.startswith("epoch 2/2") for line in run_log[marker:])
    assert log_lines[:marker] == run_log[:marker]  # replayed into the resumed job's own output, then the marker


def test_run_killed_after_its_final_checkpoint_resumes_into_publication(tmp_path):
    cfg = tiny_config(tmp_path / "run", method="pgd_at", lr=0.01, epochs=1)
    run_killed_after(cfg, epoch=1)  # epoch 1 of 1 checkpointed; last.pt, best.pt, metrics.json not yet published
    assert not (tmp_path / "run" / "metrics.json").exists()

    metrics = train(cfg, log=quiet)

    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["status"] == "complete"
    assert saved["last"] == metrics["last"] and saved["last"]["epoch"] == 1
    assert saved["best"]["epoch"] == 1
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["epoch"] == 1
    assert not (tmp_path / "run" / "running").exists()


# --------------------------------------------------------------------------------------- refused checkpoints

def _write_truncated_checkpoint(path: Path) -> None:
    save_checkpoint(path, {"config": {}, "epoch": 1, "model": {"w": torch.ones(1000)}})
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _write_plain_torch_dict(path: Path) -> None:
    torch.save({"model": {"w": torch.ones(3)}, "epoch": 1}, path)


def _write_pickled_namespace(path: Path) -> None:
    torch.save({"args": argparse.Namespace(lr=0.1), "model": {}}, path)


def _write_future_version(path: Path) -> None:
    torch.save({"format": "deat-checkpoint", "version": 99, "model": {}}, path)


@pytest.mark.parametrize("write,message", [
    (_write_truncated_checkpoint, r"cannot be loaded safely \(corrupt, truncated"),
    (_write_plain_torch_dict, r"is not a deat checkpoint \(no format='deat-checkpoint' marker\)"),
    (_write_pickled_namespace, r"cannot be loaded safely .*pickled objects that weights_only=True refuses"),
    (_write_future_version, r"has format version 99; this deat reads 1"),
], ids=["truncated", "plain_torch_dict", "pickled_namespace", "future_version"])
def test_resume_refuses_unusable_checkpoints(tmp_path, write, message):
    cfg = tiny_config(tmp_path / "run")
    (tmp_path / "run" / "running").mkdir(parents=True)
    write(tmp_path / "run" / "running" / "checkpoint.pt")
    with pytest.raises(ValueError, match=message):
        train(cfg, log=quiet)


def test_resume_refuses_a_checkpoint_of_another_config_and_accepts_other_non_result_options(tmp_path):
    train(tiny_config(tmp_path / "a", lr=0.1, epochs=1), log=quiet)
    for name in ("b", "c"):
        (tmp_path / name / "running").mkdir(parents=True)
        shutil.copy(tmp_path / "a" / "last.pt", tmp_path / name / "running" / "checkpoint.pt")
        shutil.copy(tmp_path / "a" / "best.pt", tmp_path / name / "running" / "best.pt")

    with pytest.raises(ValueError, match=r"belongs to a different run \(lr: checkpoint 0\.1 vs now 0\.2\)"):
        train(tiny_config(tmp_path / "b", lr=0.2, epochs=1), log=quiet)

    # out and log_interval_s do not change what a run computes, so the checkpoint is this run's: it resumes.
    metrics = train(tiny_config(tmp_path / "c", lr=0.1, epochs=1, log_interval_s=5.0), log=quiet)
    assert metrics["epochs"] == json.loads((tmp_path / "a" / "metrics.json").read_text())["epochs"]


# ------------------------------------------------------------------------------------------------ divergence

def test_diverging_run_stops_with_an_error_naming_the_epoch(tmp_path):
    # lr 1e8 sends the weights to inf within the first few steps; the loss turns nan.
    cfg = tiny_config(tmp_path / "run", method="pgd_at", lr=1e8, epochs=2)
    with pytest.raises(FloatingPointError, match=r"training loss is nan in epoch 1 .*diverged"):
        train(cfg, log=quiet)
    assert not (tmp_path / "run" / "running" / "checkpoint.pt").exists()
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_infinite_loss_in_a_later_epoch_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    real_forward = deat.objectives.adversarial_forward
    calls = []

    def forward_with_inf_loss_from_epoch_2(*args, **kwargs):
        loss, logits = real_forward(*args, **kwargs)
        calls.append(1)
        if len(calls) > ITERATIONS_PER_EPOCH:  # a constant inf: the value overflows, the gradient stays finite
            loss = loss + float("inf")
        return loss, logits

    monkeypatch.setattr(deat.objectives, "adversarial_forward", forward_with_inf_loss_from_epoch_2)
    cfg = tiny_config(tmp_path / "run", epochs=3)
    with pytest.raises(FloatingPointError, match=r"training loss is inf in epoch 2 "):
        train(cfg, log=quiet)
    checkpoint = torch.load(tmp_path / "run" / "running" / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == 1
    assert not (tmp_path / "run" / "metrics.json").exists()


# ----------------------------------------------------------------------------------- real runs that learn

# Measured on this repository's CPU machine (torch 2.14.1, 1 thread, seed 0), eps 0.1 (0.3 needs far more than
# a few epochs on 3,500 images), PGD-3 training, 4 epochs, batch 128, 500 validation images, PGD-10 on 500 test
# images: PGD-AT lr 0.05: test PGD-10 accuracy 0.302 0.508 0.614 0.720 over epochs 1-4; DEAT lr 0.2: 0.092 0.254
# 0.340 0.410. Chance is 0.1. 11 s and 6 s. The bounds leave room for float drift on other CPUs.
MNIST_RUNS = [("pgd_at", 0.05, 0.5), ("deat", 0.2, 0.3)]

# CIFAR-10 subset, small_cnn (width 16) on 32x32 crops/flips, eps 8/255, PGD-3 training, 6 epochs, batch 128,
# 200 validation images, PGD-10 on 500 test images, measured the same way: PGD-AT lr 0.1: 0.166 0.204 0.188
# 0.182 0.196 0.242 over epochs 1-6; DEAT lr 0.5: 0.120 0.182 0.180 0.144 0.144 0.194. Chance is 0.1 (binomial
# sd at 500 images 0.013), so DEAT's bound, 0.14, is 3 sd above it. About 17 s each.
CIFAR_RUNS = [("pgd_at", 0.1, 0.17), ("deat", 0.5, 0.14)]


@pytest.mark.slow
@pytest.mark.parametrize("method,lr,min_robust_acc", MNIST_RUNS)
def test_short_mnist5k_run_ends_above_chance_in_robust_test_accuracy(tmp_path, method, lr, min_robust_acc):
    cfg = tiny_config(tmp_path / "run", method=method, lr=lr, eps=0.1, pgd_steps=3, epochs=4, batch_size=128,
                      val_size=500, eval_pgd_steps=10, eval_examples=500)
    metrics = train(cfg, log=quiet)
    assert metrics["last"]["test_pgd_acc"] > min_robust_acc
    assert metrics["last"]["test_clean_acc"] >= metrics["last"]["test_pgd_acc"]


@pytest.mark.slow
@pytest.mark.parametrize("method,lr,min_robust_acc", CIFAR_RUNS)
def test_short_cifar10_run_ends_above_chance_in_robust_test_accuracy(tmp_path, shared_cifar, method, lr,
                                                                      min_robust_acc):
    cfg = tiny_config(tmp_path / "run", dataset=f"npz:{shared_cifar}", method=method, lr=lr, epochs=6,
                      batch_size=128, pgd_steps=3, val_size=200, eval_pgd_steps=10, eval_examples=500)
    metrics = train(cfg, log=quiet)
    assert metrics["config"]["eps"] == pytest.approx(8 / 255)
    assert metrics["last"]["test_pgd_acc"] > min_robust_acc
    assert metrics["last"]["test_clean_acc"] >= metrics["last"]["test_pgd_acc"]


# ------------------------------------------------------------------------------- metrics.json, best, rerun

def test_metrics_json_best_by_validation_pgd_and_rerun_is_a_no_op(tmp_path, monkeypatch):
    # Script the validation PGD accuracy so that best is known in advance: epoch 2 (its tie in epoch 3 must not
    # win, and the test curve must not matter), and record each epoch's weights to check best.pt's content.
    scripted_val_pgd = [0.2, 0.5, 0.5, 0.3]
    scripted_test_pgd = [0.9, 0.1, 0.95, 0.1]
    weights_after_epoch = []
    real_evaluate = deat.train.evaluate_epoch

    def scripted_evaluate(model, *args, **kwargs):
        result = real_evaluate(model, *args, **kwargs)
        epoch = len(weights_after_epoch)
        weights_after_epoch.append({k: v.clone() for k, v in model.state_dict().items()})
        return {**result, "val_pgd_acc": scripted_val_pgd[epoch], "test_pgd_acc": scripted_test_pgd[epoch]}

    monkeypatch.setattr(deat.train, "evaluate_epoch", scripted_evaluate)
    cfg = tiny_config(tmp_path / "run", epochs=4, pgd_steps=1, eval_pgd_steps=1, eval_examples=50)
    returned = train(cfg, log=quiet)

    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics == returned
    assert metrics["status"] == "complete"
    assert metrics["config"] == cfg.resolved().to_dict()
    assert metrics["config"]["eps"] == 0.3 and metrics["config"]["milestones"] == [4 * 100 / 110, 4 * 105 / 110]
    assert metrics["environment"]["device"] == "cpu"
    assert metrics["environment"]["torch"] == torch.__version__
    assert [record["epoch"] for record in metrics["epochs"]] == [1, 2, 3, 4]
    for record in metrics["epochs"]:
        assert set(record) == EPOCH_KEYS
        assert all(isinstance(record[k], float) for k in EPOCH_KEYS - {"epoch"})
        assert 0 <= record["train_robust_acc"] <= 1 and 0 <= record["val_clean_acc"] <= 1
        assert record["images_per_s"] > 0 and record["epoch_time_s"] > 0
    assert metrics["epochs"][0]["lr"] == 0.1
    # DEAT at α 0.1, k1 1, decoupled wd 5e-4 (the defaults): step α/√5 per unit gradient, decay α·wd per step.
    assert metrics["effective_step"] == pytest.approx(0.1 / 5 ** 0.5)
    assert metrics["effective_decay"] == pytest.approx(0.1 * 5e-4)
    assert metrics["wall_time_s"] >= sum(record["epoch_time_s"] for record in metrics["epochs"])

    val_pgd = [record["val_pgd_acc"] for record in metrics["epochs"]]
    first_argmax = val_pgd.index(max(val_pgd))
    assert metrics["best"]["epoch"] == first_argmax + 1 == 2
    assert metrics["best"]["test_pgd_acc"] == scripted_test_pgd[first_argmax]
    assert metrics["last"]["epoch"] == 4
    best = torch.load(run / "best.pt", weights_only=True)
    last = torch.load(run / "last.pt", weights_only=True)
    assert best["epoch"] == 2 and last["epoch"] == 4
    assert_same_tensors(weights_after_epoch[1], best["model"], "best.pt model")
    assert_same_tensors(weights_after_epoch[3], last["model"], "last.pt model")
    assert sorted(p.name for p in run.iterdir()) == ["best.pt", "last.pt", "metrics.json", "train.log"]  # no running/
    assert metrics["memory"].startswith("peak resident set size") and metrics["peak_memory_mb"] > 0
    assert metrics["peak_memory_mb"] == max(record["peak_memory_mb"] for record in metrics["epochs"])

    modified = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    log_lines = []
    assert train(cfg, log=log_lines.append) == metrics
    assert log_lines == [f"{run / 'metrics.json'} exists: run already complete, nothing to do"]
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == modified
    assert len(weights_after_epoch) == 4  # nothing was trained or evaluated again


def test_standard_training_picks_best_by_validation_clean_accuracy(tmp_path, monkeypatch):
    # K = 0 trains without an attack, so the clean validation accuracy picks best.pt (scripted: epoch 2).
    scripted = {"val_clean_acc": [0.3, 0.8, 0.6], "val_pgd_acc": [0.9, 0.0, 0.0]}
    real_evaluate = deat.train.evaluate_epoch
    calls = []

    def scripted_evaluate(*args, **kwargs):
        epoch = len(calls)
        calls.append(epoch)
        return {**real_evaluate(*args, **kwargs), **{k: v[epoch] for k, v in scripted.items()}}

    monkeypatch.setattr(deat.train, "evaluate_epoch", scripted_evaluate)
    metrics = train(tiny_config(tmp_path / "run", epochs=3, pgd_steps=0, eval_pgd_steps=1, eval_examples=50),
                    log=quiet)
    assert metrics["best"]["epoch"] == 2


# ----------------------------------------------------------------------------------------- CLI and progress

def test_train_help_lists_every_option_with_its_default():
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    result = subprocess.run([sys.executable, "-m", "deat", "train", "--help"], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    help_text = result.stdout
    expected_defaults = {"--dataset": "mnist5k", "--lr": "0.1", "--batch-size": "128", "--pgd-steps": "10",
                         "--eps": "None", "--k2": "0.8", "--epochs": "110", "--random-start": "True"}
    for flag, default in expected_defaults.items():
        # argparse puts the help after the flag, on the same line or (long flags) the next one.
        assert re.search(rf"{flag}\b[^\n]*\n?[^\n]*\(default: {re.escape(default)}\)", help_text), flag
    for name in TrainConfig.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in help_text, name
    n_options = len(TrainConfig.__dataclass_fields__)
    assert help_text.count("(default: ") >= n_options


def test_progress_lines_show_the_metrics_and_an_eta(tmp_path):
    log_lines = []
    cfg = tiny_config(tmp_path / "run", epochs=2, pgd_steps=1, eval_pgd_steps=1, eval_examples=50,
                      log_interval_s=1e-9)  # an in-epoch progress line after every iteration
    metrics = train(cfg, log=log_lines.append)

    first = metrics["epochs"][0]
    epoch_lines = [line for line in log_lines if line.startswith("epoch ")]
    assert len(epoch_lines) == 2
    assert epoch_lines[0].startswith("epoch 1/2 | lr 0.1 | ")
    assert f"loss {first['train_loss']:.4f}" in epoch_lines[0]
    assert f"val clean/PGD {first['val_clean_acc']:.2%}/{first['val_pgd_acc']:.2%}" in epoch_lines[0]
    assert f"test clean/PGD {first['test_clean_acc']:.2%}/{first['test_pgd_acc']:.2%}" in epoch_lines[0]
    assert re.search(r"\| ETA \d+:\d\d:\d\d$", epoch_lines[0])
    assert epoch_lines[1].endswith("ETA 0:00:00")

    in_epoch = [line for line in log_lines if line.startswith("  epoch 1 [")]
    assert len(in_epoch) == ITERATIONS_PER_EPOCH
    assert re.fullmatch(r"  epoch 1 \[1/15\] loss \d+\.\d{4} robust acc \d+\.\d\d% \d+ img/s, epoch ETA "
                        r"\d+:\d\d:\d\d", in_epoch[0])
    assert in_epoch[-1].startswith("  epoch 1 [15/15]") and in_epoch[-1].endswith("epoch ETA 0:00:00")
