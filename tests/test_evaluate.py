"""Robustness evaluation: example selection, ε = 0, monotonicity in ε, PGD vs AutoAttack, resume, and the CLI.

Models are trained here with deat.train.train: a normally trained small_cnn on mnist5k (seconds) for most tests,
and a briefly PGD-trained small_cnn on cifar10_small for the PGD-vs-APGD agreement test.
"""

import copy
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

import deat.evaluate as evaluate
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
    assert evaluate.indices_sha256(chosen) == hashlib.sha256(text.encode()).hexdigest()
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
    survivors = evaluate.autoattack_survivors(model, x[correct], y[correct], "apgd-ce", 0.0, "linf", 500)
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
    assert evaluate.sanity_warnings("best", entry, settings) == []  # equal is fine
    warnings = evaluate.sanity_warnings("best", {**entry, "aa_acc": 0.47}, settings)
    assert len(warnings) == 1 and warnings[0].startswith("best: AutoAttack accuracy 47.00% > PGD-50x10 accuracy")
    assert len(evaluate.sanity_warnings("last", {**entry, "aa_acc": 0.6}, settings)) == 2
    assert evaluate.sanity_warnings("best", {**entry, "aa_acc": None}, settings) == []


def test_autoattack_weaker_than_pgd_is_warned_and_recorded(run_copy, monkeypatch, capsys):
    # A stubbed AutoAttack that breaks nothing: its accuracy is the clean one, far above PGD's at eps 0.3.
    monkeypatch.setattr(evaluate, "autoattack_survivors", lambda model, x, y, *a, **k: torch.ones_like(y, dtype=bool))
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
    real_robust_mask = evaluate.robust_mask

    # Session 1 dies in best's PGD-3x2, after clean and PGD-10 finished.
    pgd = CountingAttack(real_robust_mask, crash_on=2)
    monkeypatch.setattr(evaluate, "robust_mask", pgd)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _evaluate(crashed, *flags)
    partial = json.loads((crashed / "eval.partial.json").read_text())
    assert set(partial["checkpoints"]["best"]["wall_time_s"]) == {"clean", "pgd10"}
    assert not (crashed / "eval.json").exists()

    # Session 2 reruns only best's PGD-3x2, then dies in AutoAttack's second attack (APGD-T).
    pgd = CountingAttack(real_robust_mask)
    autoattack = CountingAttack(_halve, crash_on=2)
    monkeypatch.setattr(evaluate, "robust_mask", pgd)
    monkeypatch.setattr(evaluate, "autoattack_survivors", autoattack)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _evaluate(crashed, *flags)
    assert pgd.calls == 1
    partial = json.loads((crashed / "eval.partial.json").read_text())
    assert set(partial["checkpoints"]["best"]["autoattack"]) == {"apgd-ce"}

    # Session 3: APGD-T for best; last holds best's weights (training stopped improving), so its result is
    # reused, not recomputed. The partial file is gone once eval.json is written.
    pgd, autoattack = CountingAttack(real_robust_mask), CountingAttack(_halve)
    monkeypatch.setattr(evaluate, "robust_mask", pgd)
    monkeypatch.setattr(evaluate, "autoattack_survivors", autoattack)
    resumed = _evaluate(crashed, *flags)
    assert (pgd.calls, autoattack.calls) == (0, 1)
    assert resumed["checkpoints"]["last"]["reused_from"] == "best"
    assert not (crashed / "eval.partial.json").exists()
    assert "resuming from" in capsys.readouterr().out

    # A fourth run finds eval.json up to date and attacks nothing.
    pgd = CountingAttack(real_robust_mask)
    monkeypatch.setattr(evaluate, "robust_mask", pgd)
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
    monkeypatch.setattr(evaluate, "robust_mask", CountingAttack(evaluate.robust_mask, crash_on=2))
    with pytest.raises(RuntimeError, match="simulated crash"):
        _evaluate(run_copy, "--eps", "0.1", *flags)
    assert evaluate.partial_path(run_copy / "eval_abc.json") == run_copy / "eval_abc.partial.json"
    assert (run_copy / "eval_abc.partial.json").is_file()
    pgd = CountingAttack(evaluate.robust_mask.attack)
    monkeypatch.setattr(evaluate, "robust_mask", pgd)
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
    monkeypatch.setattr(deat.tracking, "log_metrics", lambda file, run_dir, values: logged.update(
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
        "autoattack_target_classes": 9, "aa_label": "APGD-CE", "robust_rule": evaluate.ROBUST_RULE,
        "attack_seed": 0, "batch_size": 500, "precision": "fp32"}
    index = evaluate.select_examples(1000, 20, seed=0)
    assert result["examples"]["n"] == 20 and result["examples"]["indices_sha256"] == evaluate.indices_sha256(index)
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
