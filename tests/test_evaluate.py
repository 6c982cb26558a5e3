"""Robustness evaluation: example selection, ε = 0, monotonicity in ε, PGD vs AutoAttack, resume, and the CLI.

Models are trained here with deat.train.train: a normally trained small_cnn on mnist5k (seconds) for most tests,
and a briefly PGD-trained small_cnn on cifar10_small for the PGD-vs-APGD agreement test.
"""

import copy
import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import deat.evaluate as evaluate
from deat import attack_suite, autoattack_runner, eval_files, masking
from deat.checkpoint import save_checkpoint
from deat.config import TrainConfig
from deat.data import load_dataset
from deat.train import train

CIFAR_SMALL = Path(__file__).resolve().parents[1].parent / "shared/data/cifar10_small.npz"
ACCURACIES = ("clean_acc", "pgd10_acc", "pgd_acc", "aa_acc")


def _train_run(out: Path, **options) -> Path:
    config = {"dataset": "mnist5k", "arch": "small_cnn", "method": "pgd_at", "lr": 0.05, "epochs": 2,
              "pgd_steps": 0, "val_size": 0, "eval_examples": 20, "eval_pgd_steps": 1, "device": "cpu",
              "out": str(out), **options}
    train(TrainConfig.from_dict(config), log=lambda line: None)
    return out


@pytest.fixture(scope="module")
def standard_run(tmp_path_factory) -> Path:
    """small_cnn trained normally (no attack) for 2 epochs on mnist5k: about 90 % clean, no robustness."""
    return _train_run(tmp_path_factory.mktemp("standard") / "run")


@pytest.fixture
def run_copy(standard_run, tmp_path) -> Path:
    """A private copy of the standard run, so a test's eval.json and partial file stay its own."""
    return Path(shutil.copytree(standard_run, tmp_path / "run"))


def _evaluate(run_dir: Path, *flags: str) -> dict:
    args = evaluate.get_args_parser().parse_args(["--run-dir", str(run_dir), "--device", "cpu", *flags])
    assert evaluate.main(args) == 0
    return json.loads((Path(args.out) if args.out else run_dir / "eval.json").read_text())


def _test_examples(run_dir: Path, n: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    model, _ = evaluate.load_run_model(run_dir / "best.pt", "cpu")
    data = load_dataset("mnist5k")
    index = evaluate.select_examples(len(data.test_y), n, seed=0)
    return model, data.test_x[index].float() / 255, data.test_y[index]


class CountingAttack:
    """Wraps an attack function: counts calls and raises a simulated crash on call number `crash_on`."""

    def __init__(self, attack, crash_on: int | None = None) -> None:
        self.attack, self.crash_on, self.calls = attack, crash_on, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.crash_on:
            raise RuntimeError("simulated crash")
        return self.attack(*args, **kwargs)


def _halve(model, x, y, attack, eps, norm, batch_size, seed=0, num_classes=None) -> torch.Tensor:
    """A cheap deterministic stand-in for one AutoAttack attack: every other example survives."""
    return torch.arange(len(y)) % 2 == 0


# ---------------------------------------------------------------------------------------- example selection

def test_examples_are_a_sorted_prefix_of_a_seeded_permutation():
    expected = sorted(torch.randperm(1000, generator=torch.Generator().manual_seed(3))[:10].tolist())
    chosen = evaluate.select_examples(1000, 10, seed=3)
    assert chosen.tolist() == expected
    assert set(expected) <= set(evaluate.select_examples(1000, 20, seed=3).tolist())  # more examples, same prefix
    text = ",".join(str(i) for i in expected)
    assert eval_files.indices_sha256(chosen) == hashlib.sha256(text.encode()).hexdigest()
    with pytest.raises(ValueError, match=r"n_examples must be in \[1, 1000\].*got 1001"):
        evaluate.select_examples(1000, 1001, seed=0)
    with pytest.raises(ValueError, match=r"n_examples must be in \[1, 1000\].*got 0"):
        evaluate.select_examples(1000, 0, seed=0)


# ------------------------------------------------------------------------------------------- the metrics

def test_eps_zero_gives_exactly_the_clean_accuracy(run_copy):
    model, x, y = _test_examples(run_copy, 100)
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    result = _evaluate(run_copy, "--eps", "0", "--n-examples", "100", "--pgd-steps", "3", "--pgd-restarts", "2")
    for entry in result["checkpoints"].values():
        assert entry["clean_acc"] == correct.sum().item() / 100
        assert entry["pgd10_acc"] == entry["pgd_acc"] == entry["aa_acc"] == entry["clean_acc"]
    # AutoAttack is short-circuited at eps 0; its own path agrees: APGD-CE breaks no correct example.
    survivors = autoattack_runner.autoattack_survivors(model, x[correct], y[correct], "apgd-ce", 0.0, "linf", 500,
                                                       seed=attack_suite.ATTACK_SEED)
    assert survivors.all()


@pytest.fixture(scope="module")
def eps_sweep(standard_run, tmp_path_factory) -> dict[float, dict]:
    """best.pt of the standard run at growing eps: PGD-10, PGD-10 (as pgd) and APGD-CE on 100 test images."""
    results = {}
    for eps in (0.0, 0.02, 0.05, 0.1, 0.2):
        out = tmp_path_factory.mktemp("sweep") / "eval.json"
        results[eps] = _evaluate(standard_run, "--out", str(out), "--checkpoints", "best", "--eps", str(eps),
                                 "--n-examples", "100", "--pgd-steps", "10", "--pgd-restarts", "1",
                                 "--autoattack-attacks", "apgd-ce")["checkpoints"]["best"]
    return results


def test_robust_accuracy_never_rises_with_eps(eps_sweep):
    for metric in ("pgd10_acc", "pgd_acc", "aa_acc"):
        curve = [eps_sweep[eps][metric] for eps in sorted(eps_sweep)]
        assert curve == sorted(curve, reverse=True), f"{metric} rises with eps: {curve}"
        assert curve[0] == eps_sweep[0.0]["clean_acc"]
    assert eps_sweep[0.2]["pgd_acc"] < eps_sweep[0.02]["pgd_acc"]  # the sweep spans a real drop


def test_autoattack_is_not_weaker_than_pgd_on_the_same_examples(eps_sweep, standard_run):
    for eps, entry in eps_sweep.items():
        assert entry["aa_acc"] <= min(entry["pgd10_acc"], entry["pgd_acc"]), eps
    assert 0 < eps_sweep[0.05]["aa_acc"] < eps_sweep[0.05]["clean_acc"]  # AutoAttack had work to do


def test_undefended_model_falls_to_zero_under_pgd(run_copy):
    # eps 0.3, the usual MNIST radius: a model trained without attack keeps none of its ~90 % clean accuracy.
    result = _evaluate(run_copy, "--eps", "0.3", "--n-examples", "100", "--pgd-steps", "10", "--pgd-restarts", "1",
                       "--autoattack", "none")
    for entry in result["checkpoints"].values():
        assert entry["clean_acc"] >= 0.8
        assert entry["pgd10_acc"] <= 0.02 and entry["pgd_acc"] <= 0.02
        assert entry["aa_acc"] is None and entry["wall_time_s"]["aa"] is None


def test_sanity_warnings_name_each_pgd_accuracy_that_autoattack_exceeds():
    settings = {"pgd_steps": 50, "pgd_restarts": 10, "n_examples": 200}
    entry = {"pgd10_acc": 0.5, "pgd_acc": 0.45, "aa_acc": 0.45}
    assert masking.sanity_warnings("best", entry, settings) == []  # equal is fine
    warnings = masking.sanity_warnings("best", {**entry, "aa_acc": 0.47}, settings)
    assert len(warnings) == 1 and warnings[0].startswith("best: AutoAttack accuracy 47.00% > PGD-50x10 accuracy")
    assert len(masking.sanity_warnings("last", {**entry, "aa_acc": 0.6}, settings)) == 2
    assert masking.sanity_warnings("best", {**entry, "aa_acc": None}, settings) == []


def test_autoattack_weaker_than_pgd_is_warned_and_recorded(run_copy, monkeypatch, capsys):
    # A stubbed AutoAttack that breaks nothing: its accuracy is the clean one, far above PGD's at eps 0.3.
    monkeypatch.setattr(attack_suite, "autoattack_survivors", lambda model, x, y, *a, **k: torch.ones_like(y, dtype=bool))
    result = _evaluate(run_copy, "--eps", "0.3", "--n-examples", "50", "--pgd-steps", "5", "--pgd-restarts", "1")
    assert len(result["warnings"]) == 4  # PGD-10 and PGD-5x1, for best and for last
    assert result["warnings"][0].startswith("best: AutoAttack accuracy")
    assert "WARNING: last: AutoAttack accuracy" in capsys.readouterr().out


def test_pgd_and_apgd_ce_agree_on_an_adversarially_trained_cifar_model(tmp_path):
    if not CIFAR_SMALL.is_file():
        pytest.skip(f"{CIFAR_SMALL} is absent (it lives beside the repository in the project's shared folder)")
    # 3 epochs of PGD-2 training reach about 28 % clean and 14 % PGD accuracy (ε 8/255, 200 test images). Measured:
    # PGD-10, PGD-20 and APGD-CE all left the same 28 of 200 examples robust.
    run = _train_run(tmp_path / "run", dataset=f"npz:{CIFAR_SMALL}", epochs=3, pgd_steps=2, lr=0.1, eps=8 / 255,
                     augment="none")
    entry = _evaluate(run, "--checkpoints", "best", "--n-examples", "200", "--pgd-steps", "20",
                      "--pgd-restarts", "1", "--autoattack-attacks", "apgd-ce")["checkpoints"]["best"]
    assert entry["pgd_acc"] >= 0.05, "the model should keep some robust examples, else the comparison says nothing"
    assert abs(entry["aa_acc"] - entry["pgd_acc"]) <= 0.02
    assert abs(entry["aa_acc"] - entry["pgd10_acc"]) <= 0.02


# -------------------------------------------------------------------------------------------------- resume

def _strip_timings(result: dict) -> dict:
    result = {k: v for k, v in copy.deepcopy(result).items() if k not in ("wall_time_s", "environment", "run_dir")}
    for entry in result["checkpoints"].values():
        del entry["wall_time_s"]
        for attack in entry["autoattack"].values():
            del attack["wall_time_s"]
    return result


def test_resume_skips_finished_work_and_matches_an_uninterrupted_run(standard_run, tmp_path, monkeypatch, capsys):
    flags = ("--eps", "0.1", "--n-examples", "60", "--pgd-steps", "3", "--pgd-restarts", "2",
             "--autoattack-attacks", "apgd-ce", "apgd-t")
    crashed = Path(shutil.copytree(standard_run, tmp_path / "crashed"))
    real_robust_mask = attack_suite.robust_mask

    # Session 1 dies in best's PGD-3x2, after clean and PGD-10 finished.
    pgd = CountingAttack(real_robust_mask, crash_on=2)
    monkeypatch.setattr(attack_suite, "robust_mask", pgd)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _evaluate(crashed, *flags)
    partial = json.loads((crashed / "eval.partial.json").read_text())
    assert set(partial["checkpoints"]["best"]["wall_time_s"]) == {"clean", "pgd10"}
    assert not (crashed / "eval.json").exists()

    # Session 2 reruns only best's PGD-3x2, then dies in AutoAttack's second attack (APGD-T).
    pgd = CountingAttack(real_robust_mask)
    autoattack = CountingAttack(_halve, crash_on=2)
    monkeypatch.setattr(attack_suite, "robust_mask", pgd)
    monkeypatch.setattr(attack_suite, "autoattack_survivors", autoattack)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _evaluate(crashed, *flags)
    assert pgd.calls == 1
    partial = json.loads((crashed / "eval.partial.json").read_text())
    assert set(partial["checkpoints"]["best"]["autoattack"]) == {"apgd-ce"}

    # Session 3: APGD-T for best; last holds best's weights (training stopped improving), so its result is
    # reused, not recomputed. The partial file is gone once eval.json is written.
    pgd, autoattack = CountingAttack(real_robust_mask), CountingAttack(_halve)
    monkeypatch.setattr(attack_suite, "robust_mask", pgd)
    monkeypatch.setattr(attack_suite, "autoattack_survivors", autoattack)
    resumed = _evaluate(crashed, *flags)
    assert (pgd.calls, autoattack.calls) == (0, 1)
    assert resumed["checkpoints"]["last"]["reused_from"] == "best"
    assert not (crashed / "eval.partial.json").exists()
    assert "resuming from" in capsys.readouterr().out

    # A fourth run finds eval.json up to date and attacks nothing.
    pgd = CountingAttack(real_robust_mask)
    monkeypatch.setattr(attack_suite, "robust_mask", pgd)
    _evaluate(crashed, *flags)
    assert pgd.calls == 0 and "nothing to do" in capsys.readouterr().out

    uninterrupted = _evaluate(Path(shutil.copytree(standard_run, tmp_path / "uninterrupted")), *flags)
    assert _strip_timings(resumed) == _strip_timings(uninterrupted)
    best = resumed["checkpoints"]["best"]
    assert best["aa_acc"] == best["autoattack"]["apgd-t"]["acc"]
    assert resumed["wall_time_s"] == pytest.approx(sum(resumed["checkpoints"]["best"]["wall_time_s"].values()))


def test_partial_file_from_other_settings_is_ignored(run_copy, monkeypatch, capsys):
    flags = ("--out", str(run_copy / "eval_abc.json"), "--n-examples", "30", "--pgd-steps", "2",
             "--pgd-restarts", "1", "--autoattack", "none")
    monkeypatch.setattr(attack_suite, "robust_mask", CountingAttack(attack_suite.robust_mask, crash_on=2))
    with pytest.raises(RuntimeError, match="simulated crash"):
        _evaluate(run_copy, "--eps", "0.1", *flags)
    assert eval_files.partial_path(run_copy / "eval_abc.json") == run_copy / "eval_abc.partial.json"
    assert (run_copy / "eval_abc.partial.json").is_file()
    pgd = CountingAttack(attack_suite.robust_mask.attack)
    monkeypatch.setattr(attack_suite, "robust_mask", pgd)
    result = _evaluate(run_copy, "--eps", "0.2", *flags)
    assert "was written for other settings; ignoring it" in capsys.readouterr().out
    # PGD-10 and PGD-2 for best (last has the same weights): nothing was taken from the eps-0.1 session.
    assert pgd.calls == 2
    assert result["settings"]["eps"] == 0.2


# ----------------------------------------------------------------------------------------------------- CLI

def test_cli_end_to_end_writes_every_key_and_logs_to_mlflow(run_copy, tmp_path, monkeypatch):
    import deat.__main__
    import deat.tracking

    logged = {}
    monkeypatch.setattr(deat.tracking, "log_metrics", lambda file, run_dir, values, setup=None: logged.update(
        file=file, run_dir=Path(run_dir), values=values))
    code = deat.__main__.main(["evaluate", "--run-dir", str(run_copy), "--device", "cpu", "--eps", "0.1",
                               "--n-examples", "20", "--pgd-steps", "3", "--pgd-restarts", "2",
                               "--autoattack-attacks", "apgd-ce", "--mlflow", str(tmp_path / "tracking.json")])
    assert code == 0
    result = json.loads((run_copy / "eval.json").read_text())
    assert set(result) == {"settings", "examples", "checkpoint_sha256", "run_dir", "checkpoints", "warnings",
                           "environment", "versions", "wall_time_s"}
    assert result["settings"] == {
        "dataset": "mnist5k", "eps": 0.1, "norm": "linf", "n_examples": 20, "example_seed": 0, "pgd10_steps": 10,
        "pgd10_step_size": pytest.approx(0.025), "pgd_steps": 3, "pgd_restarts": 2, "pgd_step_size": 0.025,
        "autoattack": "standard", "autoattack_attacks": ["apgd-ce"], "autoattack_skipped": {}, "num_classes": 10,
        "autoattack_target_classes": 9, "aa_label": "APGD-CE", "robust_rule": attack_suite.ROBUST_RULE,
        "attack_seed": 0, "batch_size": 500, "precision": "fp32"}
    index = evaluate.select_examples(1000, 20, seed=0)
    assert result["examples"]["n"] == 20 and result["examples"]["indices_sha256"] == eval_files.indices_sha256(index)
    for name in ("best", "last"):
        entry = result["checkpoints"][name]
        assert set(entry) == {"epoch", *ACCURACIES, "worst_case_acc", "autoattack", "skipped_attacks",
                              "masking_flags", "masking_checks", "wall_time_s", "weights_sha256", "reused_from"}
        assert entry["worst_case_acc"] <= min(entry[k] for k in ACCURACIES)
        assert entry["skipped_attacks"] == {} and entry["masking_flags"] == []
        assert entry["epoch"] == 2
        assert all(0 <= entry[k] <= 1 for k in ACCURACIES)
        assert set(entry["wall_time_s"]) == {"clean", "pgd10", "pgd", "aa"}
        assert set(entry["autoattack"]) == {"apgd-ce"}
        assert result["checkpoint_sha256"][name] == hashlib.sha256((run_copy / f"{name}.pt").read_bytes()).hexdigest()
    assert result["versions"]["autoattack"] == "0.2.0" and result["environment"]["device"] == "cpu"
    assert not (run_copy / "eval.partial.json").exists()
    assert logged["file"] == str(tmp_path / "tracking.json") and logged["run_dir"] == run_copy
    assert logged["values"] == {**{f"eval/{name}/{k}": result["checkpoints"][name][k]
                                   for name in ("best", "last") for k in (*ACCURACIES, "worst_case_acc")},
                                **{f"eval/{name}/masking_flagged": 0.0 for name in ("best", "last")}}


def test_bad_arguments_are_refused_with_the_argument_named(run_copy, tmp_path):
    with pytest.raises(ValueError, match=r"n_examples must be in \[1, 1000\]"):
        _evaluate(run_copy, "--n-examples", "5000")
    with pytest.raises(ValueError, match="device='gpu' is invalid"):
        _evaluate(run_copy, "--device", "gpu")
    with pytest.raises(ValueError, match="pgd_restarts=0 is invalid"):
        _evaluate(run_copy, "--pgd-restarts", "0")
    with pytest.raises(FileNotFoundError, match="best.pt does not exist"):
        _evaluate(tmp_path / "no_such_run")
    with pytest.raises(SystemExit):
        evaluate.get_args_parser().parse_args(["--run-dir", "x", "--autoattack-attacks", "fab"])
    save_checkpoint(tmp_path / "foreign.pt", {"config": {}, "epoch": 1, "model": {}})
    with pytest.raises(KeyError, match="has no 'model_spec'"):
        evaluate.load_run_model(tmp_path / "foreign.pt", "cpu")


# ------------------------------------------------------------------------------------ few classes (issue 13)

def _patch_npz(path: Path, num_classes: int, n_train: int = 256, n_test: int = 64) -> Path:
    """16x16 grayscale images, class c lights the c-th 4x4 patch of a 4x4 grid on faint noise (uint8 NHWC)."""
    rng = np.random.default_rng(num_classes)

    def split(n):
        y = np.arange(n) % num_classes
        x = rng.integers(0, 60, (n, 16, 16, 1), dtype=np.uint8)
        for i, c in enumerate(y):
            row, col = divmod(int(c), 4)
            x[i, 4 * row:4 * row + 4, 4 * col:4 * col + 4] = 220
        return x, y

    (train_x, train_y), (test_x, test_y) = split(n_train), split(n_test)
    np.savez(path, train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y)
    return path


@pytest.fixture(scope="module")
def eight_class_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("eight")
    return _train_run(tmp / "run", dataset=f"npz:{_patch_npz(tmp / 'patches8.npz', 8)}", epochs=2, lr=0.1)


def _pyautoattack_robust(model, x, y, attacks, eps, n_target_classes) -> torch.Tensor:
    """pyautoattack run directly, as its README shows, with the target count set by hand: (N,) robust bool."""
    from pyautoattack import AutoAttack

    adversary = AutoAttack(model, norm="Linf", eps=eps, version="standard", seed=0, device=x.device)
    adversary.attacks_to_run = list(attacks)
    adversary.apgd_targeted.n_target_classes = adversary.fab.n_target_classes = n_target_classes
    with torch.random.fork_rng():
        _, predictions = adversary.run_standard_evaluation(x, y, batch_size=500)
    return predictions == y


def test_eight_classes_run_standard_autoattack_with_seven_targets_as_pyautoattack_does(eight_class_run, capsys):
    # Issue 13, case 1: with 8 classes the default AutoAttack asked for 9 target classes and died with
    # IndexError after training. Now the targeted attacks use K - 1 = 7, and the result is pyautoattack's own.
    # At eps 0.15 (measured) examples survive APGD-CE, so APGD-T, FAB-T and Square all have work to do.
    result = _evaluate(eight_class_run, "--checkpoints", "last", "--eps", "0.15", "--n-examples", "12",
                       "--pgd-steps", "10", "--pgd-restarts", "1")
    settings, entry = result["settings"], result["checkpoints"]["last"]
    assert settings["num_classes"] == 8 and settings["autoattack_target_classes"] == 7
    assert settings["aa_label"] == "AutoAttack (standard)" and entry["skipped_attacks"] == {}
    assert list(entry["autoattack"]) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert entry["clean_acc"] >= 0.9, "the model must classify the patches, else the attacks have nothing to do"
    assert entry["autoattack"]["apgd-ce"]["acc"] > 0  # survivors went on to APGD-T, where 9 targets crashed

    model, _ = evaluate.load_run_model(eight_class_run / "last.pt", "cpu")
    data = load_dataset(f"npz:{eight_class_run.parent / 'patches8.npz'}", val_size=0)
    index = evaluate.select_examples(len(data.test_y), 12, seed=0)
    x, y = data.test_x[index].float() / 255, data.test_y[index]
    # pyautoattack's own cascade of the first two attacks (the targeted one included); FAB-T and Square are
    # left out of the direct run only to keep the test short.
    direct = _pyautoattack_robust(model, x, y, ["apgd-ce", "apgd-t"], 0.15, 7)
    assert entry["autoattack"]["apgd-t"]["acc"] == direct.sum().item() / 12
    assert "Traceback" not in capsys.readouterr().out


@pytest.fixture(scope="module")
def three_class_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("three")
    return _train_run(tmp / "run", dataset=f"npz:{_patch_npz(tmp / 'patches3.npz', 3, 96, 24)}", epochs=2, lr=0.1,
                      batch_size=32)


def test_three_classes_skip_apgd_t_with_the_reason_recorded_and_printed(three_class_run, capsys):
    result = _evaluate(three_class_run, "--eps", "0.3", "--n-examples", "12", "--pgd-steps", "5",
                       "--pgd-restarts", "1", "--autoattack-attacks", "apgd-ce", "apgd-t", "fab-t")
    reason = ("APGD-T needs at least 4 classes (its targeted DLR loss uses the 3rd and 4th largest logits); "
              "the dataset has 3")
    assert result["settings"]["autoattack_skipped"] == {"apgd-t": reason}
    assert result["settings"]["aa_label"] == "APGD-CE + FAB-T"
    assert result["settings"]["autoattack_target_classes"] == 2
    for entry in result["checkpoints"].values():
        assert entry["skipped_attacks"] == {"apgd-t": reason}
        assert list(entry["autoattack"]) == ["apgd-ce", "fab-t"]
    assert f"aa/apgd-t: skipped: {reason}" in capsys.readouterr().out


def test_check_attacks_names_each_attack_the_class_count_cannot_support():
    assert autoattack_runner.check_attacks(autoattack_runner.AUTOATTACK_STANDARD, 10) == []
    assert autoattack_runner.check_attacks(autoattack_runner.AUTOATTACK_STANDARD, 4) == []  # APGD-T with 3 targets
    assert autoattack_runner.check_attacks(["apgd-ce", "apgd-t"], 3) == [
        "APGD-T needs at least 4 classes (its targeted DLR loss uses the 3rd and 4th largest logits); "
        "the dataset has 3"]
    assert len(autoattack_runner.check_attacks(autoattack_runner.AUTOATTACK_STANDARD, 1)) == 4
    assert autoattack_runner.check_attacks(["fab"], 10) == [
        "fab is not an AutoAttack standard attack; allowed: apgd-ce, apgd-t, fab-t, square"]
    assert [autoattack_runner.autoattack_target_classes(k) for k in (2, 3, 8, 10, 100)] == [1, 2, 7, 9, 9]
    with pytest.raises(ValueError, match="APGD-T needs at least 4 classes"):
        autoattack_runner.autoattack_survivors(torch.nn.Linear(2, 3), torch.zeros(1, 2),
                                               torch.zeros(1, dtype=torch.long), "apgd-t", 0.1, "linf", 10, seed=0)


def test_aa_label_names_what_ran():
    # Issue 13, case 5: a subset is labelled by its attacks; "AutoAttack (standard)" only for all four.
    assert autoattack_runner.aa_label(["apgd-ce", "apgd-t", "fab-t", "square"]) == "AutoAttack (standard)"
    assert autoattack_runner.aa_label(["apgd-ce", "apgd-t"]) == "APGD-CE + APGD-T"
    assert autoattack_runner.aa_label(["fab-t"]) == "FAB-T"
    assert autoattack_runner.aa_label([]) is None


# --------------------------------------------------------------------------------- gradient masking (issue 13)

def _scaled_copy(run_dir: Path, out: Path, factor: float) -> Path:
    """The run with the classifier's (last layer's) weight and bias multiplied by `factor` in both checkpoints:
    the same predictions, but a softmax so saturated that cross-entropy gradients vanish."""
    out = Path(shutil.copytree(run_dir, out))
    for name in ("best", "last"):
        ckpt = torch.load(out / f"{name}.pt", weights_only=True)
        ckpt["model"]["net.head.3.weight"] *= factor
        ckpt["model"]["net.head.3.bias"] *= factor
        save_checkpoint(out / f"{name}.pt", {k: v for k, v in ckpt.items() if k not in ("format", "version")})
    return out


MASKING_FLAGS = ("--checkpoints", "best", "--eps", "0.1", "--n-examples", "40", "--pgd-steps", "10",
                 "--pgd-restarts", "1", "--autoattack-attacks", "apgd-ce", "apgd-t")


def test_scaled_logits_are_flagged_as_gradient_masking_and_the_plain_model_is_not(standard_run, tmp_path,
                                                                                   monkeypatch, capsys):
    # Issue 13, case 3: logits x 1e4 kept every prediction, PGD-10, PGD-k and APGD-CE reported the clean
    # accuracy, APGD-T broke nearly everything, and eval.json said nothing.
    import deat.tracking

    logged = {}
    monkeypatch.setattr(deat.tracking, "log_metrics", lambda file, run_dir, values, setup=None: logged.update(values))
    plain = _evaluate(standard_run, "--out", str(tmp_path / "plain.json"), *MASKING_FLAGS)["checkpoints"]["best"]
    assert plain["masking_flags"] == [] and plain["masking_checks"]["zero_gradient_examples"] == 0
    capsys.readouterr()

    scaled_run = _scaled_copy(standard_run, tmp_path / "scaled", 1e4)
    import deat.__main__

    assert deat.__main__.main(["evaluate", "--run-dir", str(scaled_run), "--device", "cpu", "--mlflow",
                               str(tmp_path / "tracking.json"), *MASKING_FLAGS]) == 0
    scaled = json.loads((scaled_run / "eval.json").read_text())["checkpoints"]["best"]
    assert scaled["clean_acc"] == plain["clean_acc"]  # same predictions
    ce_accs = (scaled["pgd10_acc"], scaled["pgd_acc"], scaled["autoattack"]["apgd-ce"]["acc"])
    assert ce_accs == (scaled["clean_acc"],) * 3  # the cross-entropy attacks find nothing
    assert scaled["aa_acc"] <= plain["aa_acc"] + 0.05  # APGD-T's DLR loss ignores the scale
    correct = round(scaled["clean_acc"] * 40)
    assert scaled["masking_checks"]["zero_gradient_examples"] == correct
    assert scaled["masking_flags"][0] == (f"zero input gradient of the cross-entropy at {correct} of {correct} "
                                          f"correctly classified examples: gradient attacks cannot move them "
                                          f"(pyautoattack check_zero_gradients)")
    assert scaled["masking_flags"][1].startswith(
        f"cross-entropy attacks leave far more examples robust than margin/targeted ones: "
        f"{scaled['clean_acc']:.2%} survive PGD-10 + PGD-10x1 + APGD-CE, {scaled['worst_case_acc']:.2%} also "
        f"survive APGD-T")
    assert len(scaled["masking_flags"]) == 2
    assert logged["eval/best/masking_flagged"] == 1.0
    out = capsys.readouterr().out
    assert f"WARNING: best: possible gradient masking: {scaled['masking_flags'][0]}" in out


def test_masking_flags_thresholds():
    settings = {"n_examples": 100, "pgd10_steps": 10, "pgd_steps": 50, "pgd_restarts": 10}
    entry = {"clean_acc": 0.9, "pgd10_acc": 0.5, "pgd_acc": 0.45, "aa_acc": 0.4, "worst_case_acc": 0.4,
             "autoattack": {"apgd-ce": {"acc": 0.46}, "apgd-t": {"acc": 0.41}, "fab-t": {"acc": 0.41},
                            "square": {"acc": 0.41}},
             "masking_checks": {"zero_gradient_examples": 0, "ce_worst_case_acc": 0.5}}
    assert masking.masking_flags(entry, settings) == []  # a 10-point gap is not above 10 points
    gap = masking.masking_flags({**entry, "masking_checks": {"ce_worst_case_acc": 0.51}}, settings)
    assert len(gap) == 1 and gap[0].startswith("cross-entropy attacks leave far more")
    square = {**entry["autoattack"], "square": {"acc": 0.407}}
    flags = masking.masking_flags({**entry, "autoattack": square, "aa_acc": 0.407, "worst_case_acc": 0.407},
                                   settings)
    assert flags == ["the black-box Square attack lowered accuracy by 0.30% after the white-box attacks "
                     "(above 0.2%, pyautoattack check_square_sr)"]
    flags = masking.masking_flags({**entry, "pgd_acc": 0.52, "aa_acc": 0.51}, settings)
    assert flags == ["AutoAttack (standard) 51.00% above PGD-10 50.00% on the same examples",
                     "more steps and restarts did not help: PGD-50x10 52.00% above PGD-10 50.00%"]
    assert masking.masking_flags({**entry, "pgd_acc": 0.52}, {**settings, "pgd_steps": 5}) == []


# --------------------------------------------------------------------- worst case, reuse, cache, progress (13)

def test_worst_case_is_the_per_example_intersection_of_every_attack(run_copy):
    flags = ("--checkpoints", "best", "--eps", "0.1", "--n-examples", "40", "--pgd-steps", "5",
             "--pgd-restarts", "2", "--autoattack-attacks", "apgd-ce", "apgd-t")
    entry = _evaluate(run_copy, *flags)["checkpoints"]["best"]
    model, x, y = _test_examples(run_copy, 40)
    seeded = lambda: torch.Generator().manual_seed(0)  # noqa: E731 - each attack gets a fresh generator
    pgd10 = attack_suite.robust_mask(model, x, y, 0.1, 0.025, 10, generator=seeded())
    pgd5 = attack_suite.robust_mask(model, x, y, 0.1, 0.025, 5, restarts=2, generator=seeded())
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    aa = _pyautoattack_robust(model, x, y, ["apgd-ce", "apgd-t"], 0.1, 9)
    assert entry["pgd10_acc"] == pgd10.sum().item() / 40 and entry["pgd_acc"] == pgd5.sum().item() / 40
    assert entry["aa_acc"] == aa.sum().item() / 40
    assert entry["worst_case_acc"] == (correct & pgd10 & pgd5 & aa).sum().item() / 40
    assert entry["worst_case_acc"] <= min(entry["pgd10_acc"], entry["pgd_acc"], entry["aa_acc"])


def test_a_deleted_result_is_rebuilt_from_the_cache_without_attacking(run_copy, monkeypatch, capsys):
    # Issue 13, case 6: best and last with the same weights are attacked once; a rerun after the output was
    # deleted takes every result from eval_cache/ and attacks nothing.
    flags = ("--eps", "0.1", "--n-examples", "30", "--pgd-steps", "3", "--pgd-restarts", "1",
             "--autoattack-attacks", "apgd-ce")
    pgd = CountingAttack(attack_suite.robust_mask)
    monkeypatch.setattr(attack_suite, "robust_mask", pgd)
    first = _evaluate(run_copy, *flags)
    assert pgd.calls == 2  # PGD-10 and PGD-3 for best only
    assert first["checkpoints"]["best"]["reused_from"] is None
    assert first["checkpoints"]["last"]["reused_from"] == "best"
    assert first["checkpoints"]["best"]["weights_sha256"] == first["checkpoints"]["last"]["weights_sha256"]
    assert "last: same weights and settings as best: result reused, nothing attacked" in capsys.readouterr().out

    (run_copy / "eval.json").unlink()
    monkeypatch.setattr(attack_suite, "robust_mask", CountingAttack(None, crash_on=1))
    monkeypatch.setattr(attack_suite, "autoattack_survivors", CountingAttack(None, crash_on=1))
    again = _evaluate(run_copy, *flags)
    cache_file = eval_files.cache_path(run_copy / "eval.json", first["checkpoints"]["best"]["weights_sha256"],
                                     eval_files.settings_sha256(first["settings"], first["examples"]))
    assert cache_file.is_file()
    assert again["checkpoints"]["best"]["reused_from"] == f"eval_cache/{cache_file.name}"
    strip = lambda c: {k: v for k, v in c.items() if k != "reused_from"}  # noqa: E731
    for name in ("best", "last"):
        assert strip(again["checkpoints"][name]) == strip(first["checkpoints"][name])


def test_weights_hash_ignores_everything_but_the_weights(standard_run, tmp_path):
    best = torch.load(standard_run / "best.pt", weights_only=True)
    other = {**best, "epoch": 99, "metrics": {}}
    assert eval_files.weights_sha256(best) == eval_files.weights_sha256(other)
    changed = copy.deepcopy(best)
    changed["model"]["net.head.3.bias"][0] += 1e-6
    assert eval_files.weights_sha256(changed) != eval_files.weights_sha256(best)


def test_progress_lines_give_each_attack_its_start_end_and_eta(run_copy, capsys):
    _evaluate(run_copy, "--checkpoints", "best", "--eps", "0.1", "--n-examples", "40", "--pgd-steps", "3",
              "--pgd-restarts", "2", "--autoattack-attacks", "apgd-ce", "--batch-size", "8",
              "--log-interval-s", "1e-9")
    out = capsys.readouterr().out
    assert "best pgd10: started on 40 examples" in out
    assert "best pgd: started on 80 examples x restarts (at most: restarts attack survivors)" in out
    assert re.search(r"best pgd10: \d/40 examples, \d+ s elapsed, ETA \d+ s", out)  # block 0: its survivors
    assert re.search(r"best aa/apgd-ce: \d+/\d+ examples, \d+ s elapsed, ETA \d+ s", out)
    # Issue 26.8: the accuracy is over all 40 examples, the attack ran on those still robust before it.
    clean = re.search(r"best clean: acc ([\d.]+)% of 40 examples, ", out)
    pgd10 = re.search(r"best pgd10: acc [\d.]+% of 40 examples \((\d+) attacked\), [\d.]+ s", out)
    assert clean and pgd10 and int(pgd10[1]) == round(float(clean[1]) * 40 / 100)
    assert re.search(r"best aa/apgd-ce: acc [\d.]+% of 40 examples \(\d+ attacked\), [\d.]+ s", out)


# ------------------------------------------------------------------------- speed options (issue 25.4)

SPEED_FLAGS = ("--checkpoints", "best", "--eps", "0.1", "--n-examples", "40", "--pgd-steps", "3", "--pgd-restarts",
               "1", "--autoattack-attacks", "apgd-ce")


def test_cuda_speed_options_are_ignored_on_the_cpu_and_kept_out_of_the_settings(run_copy, tmp_path, capsys):
    plain = _evaluate(run_copy, *SPEED_FLAGS, "--out", str(tmp_path / "plain" / "eval.json"))
    fast = _evaluate(run_copy, *SPEED_FLAGS, "--channels-last", "--cudnn-benchmark", "--out",
                     str(tmp_path / "fast" / "eval.json"))
    assert "channels_last, cudnn_benchmark: CUDA only; on cpu the plain path runs" in capsys.readouterr().out
    assert fast["settings"] == plain["settings"] and "speed_options" not in plain["environment"]
    assert fast["environment"]["speed_options"] == {"channels_last": False, "cudnn_benchmark": False}
    assert _strip_timings(fast) == _strip_timings(plain)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="channels_last and cuDNN algorithm search act on CUDA only")
def test_cuda_speed_options_break_the_same_examples_up_to_gpu_nondeterminism(run_copy, tmp_path):
    flags = (*SPEED_FLAGS[:4], "--device", "cuda", *SPEED_FLAGS[6:])
    results = {}
    for name, extra in (("plain", ()), ("fast", ("--channels-last", "--cudnn-benchmark"))):
        args = evaluate.get_args_parser().parse_args(["--run-dir", str(run_copy), *flags, "--n-examples", "200",
                                                      *extra, "--out", str(tmp_path / name / "eval.json")])
        assert evaluate.main(args) == 0
        results[name] = json.loads((tmp_path / name / "eval.json").read_text())
    assert results["fast"]["settings"] == results["plain"]["settings"]
    assert results["fast"]["environment"]["speed_options"] == {"channels_last": True, "cudnn_benchmark": True}
    plain, fast = results["plain"]["checkpoints"]["best"], results["fast"]["checkpoints"]["best"]
    assert fast["clean_acc"] == plain["clean_acc"]
    for key in ("pgd10_acc", "pgd_acc", "aa_acc"):  # at most 1 example of 200 flipped by other kernels
        assert abs(fast[key] - plain[key]) <= 1 / 200, key
