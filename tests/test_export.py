"""Checkpoints both ways: deat's weights into RobustBench's classes with a model card, and others' checkpoints
(RobustBench's, Rice et al.'s) into deat's evaluation; the MLflow model artifact of a run.

Logits are compared on the CPU with random weights and random BatchNorm statistics (so a swapped or misnamed
tensor shows). Tests that need robustbench 1.1.1 skip where it is not installed (`pip install 'deat[robustbench]'`).
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deat.__main__ import build_parser
from deat.__main__ import main as cli
from deat.checkpoint import save_checkpoint, write_json
from deat.checkpoint_formats import (RICE_MEAN, RICE_STD, import_robustbench, load_foreign_checkpoint, model_from,
                                     to_robustbench_keys)
from deat.config import TrainConfig, config_from_args, run_identity
from deat.data import load_dataset
from deat.evaluate import ENTRY_KEYS, file_sha256, select_examples
from deat.export import CARD_FIELDS, export_run
from deat.models import build_model

# The fields of RobustBench's model cards, read from RobustBench/robustbench at commit 78fcc9e,
# model_info/cifar10/Linf/*.json (99 cards): these twelve are in every card ...
ROBUSTBENCH_REQUIRED_FIELDS = {"link": str, "name": str, "authors": str, "additional_data": bool,
                               "number_forward_passes": int, "dataset": str, "venue": str, "architecture": str,
                               "eps": str, "clean_acc": str, "reported": str, "autoattack_acc": str}
# ... and these in some (unreliable: 67 cards, footnote: 57, external: 17).
ROBUSTBENCH_OPTIONAL_FIELDS = {"unreliable": bool, "footnote": str, "external": str}

try:
    import_robustbench()
    HAVE_ROBUSTBENCH, WHY_NOT = True, ""
except (RuntimeError, ImportError) as err:
    HAVE_ROBUSTBENCH, WHY_NOT = False, f"robustbench is not installed ({err})"
needs_robustbench = pytest.mark.skipif(not HAVE_ROBUSTBENCH, reason=WHY_NOT)


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and BatchNorm statistics, eval mode: every tensor of the state dict matters to the logits."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.rand(module.running_mean.shape, generator=generator) * 0.2 - 0.1)
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
            module.bias.data.copy_(torch.rand(module.bias.shape, generator=generator) * 0.2 - 0.1)
    return model.eval()


# ----------------------------------------------------------------------------- Rice et al.'s network, by hand

class RiceBlock(nn.Module):
    """locuslab/robust_overfitting preactresnet.py's PreActBlock: the shortcut takes the pre-activated input."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        return self.conv2(F.relu(self.bn2(self.conv1(out)))) + shortcut


class RicePreActResNet18(nn.Module):
    """Their PreActResNet18: conv1, layer1-4, a BatchNorm before the classifier (`bn`), `linear`; no normaliser."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        widths, cin = (64, 128, 256, 512), 64
        for i, width in enumerate(widths):
            setattr(self, f"layer{i + 1}", nn.Sequential(RiceBlock(cin, width, 1 if i == 0 else 2),
                                                         RiceBlock(width, width, 1)))
            cin = width
        self.bn, self.linear = nn.BatchNorm2d(512), nn.Linear(512, num_classes)

    def forward(self, x):
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        return self.linear(F.avg_pool2d(F.relu(self.bn(out)), 4).flatten(1))


def rice_normalise(x: torch.Tensor) -> torch.Tensor:
    """Their train_cifar.py's normalize(X), outside the model."""
    return (x - torch.tensor(RICE_MEAN).view(1, 3, 1, 1)) / torch.tensor(RICE_STD).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def rice_file(tmp_path_factory) -> tuple[Path, nn.Module]:
    """A model_best.pth as their train_cifar.py saves it: {'state_dict': DataParallel's 'module.'-prefixed keys}."""
    torch.manual_seed(1)
    model = randomise(RicePreActResNet18(), seed=1)
    path = tmp_path_factory.mktemp("rice") / "model_best.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}, "test_robust_acc": 0.5},
               path)
    return path, model


INPUT = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_rice_checkpoint_maps_onto_deats_preact_resnet18_with_the_same_logits(rice_file):
    path, rice = rice_file
    ckpt = load_foreign_checkpoint(path, "preact_resnet18", "rice")
    model = model_from(ckpt, "cpu")
    assert sum(p.numel() for p in rice.parameters()) == sum(p.numel() for p in model.parameters()) == 11_172_170
    assert ckpt["model_spec"]["mean"] == pytest.approx(RICE_MEAN) and ckpt["model_spec"]["std"] == pytest.approx(RICE_STD)
    with torch.no_grad():
        torch.testing.assert_close(model(INPUT), rice(rice_normalise(INPUT)), atol=1e-6, rtol=0)


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.update({"module.layer5.0.conv1.weight": torch.zeros(1)}),
     "key 'module.layer5.0.conv1.weight' matches no parameter"),
    (lambda s: s.pop("module.bn.weight"), "missing key 'bn.weight'"),
    (lambda s: s.update({"module.layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1)}),
     r"key 'layer1.0.conv1.weight' has shape \(64, 64, 1, 1\); .* needs \(64, 64, 3, 3\)"),
])
def test_an_unmatched_missing_or_misshapen_key_is_a_one_line_error_naming_it(rice_file, tmp_path, edit, message):
    state = torch.load(rice_file[0], weights_only=True)["state_dict"]
    edit(state)
    path = tmp_path / "edited.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=message) as err:
        load_foreign_checkpoint(path, "preact_resnet18", "rice")
    assert "\n" not in str(err.value)


def test_a_file_with_pickled_objects_is_refused_by_weights_only(tmp_path, capsys):
    path = tmp_path / "pickled.pth"
    torch.save({"model": nn.Linear(2, 2)}, path)  # a whole module: weights_only=True will not unpickle it
    assert cli(["evaluate", "--checkpoint", str(path), "--arch", "preact_resnet18", "--format", "rice",
                "--dataset", "cifar10_small"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "weights_only=True" in err and "\n" not in err


def test_architectures_robustbench_has_no_class_for_are_refused_naming_those_it_has(tmp_path, capsys):
    assert cli(["evaluate", "--checkpoint", str(tmp_path / "x.pt"), "--arch", "senet18", "--format", "rice",
                "--dataset", "cifar10_small"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: RobustBench has no class for architecture 'senet18'; it has classes for: "
                   "preact_resnet18 (PreActResNet-18), wrn34_10 (WideResNet-34-10)")


def test_an_external_checkpoint_gets_a_runs_evaluation(rice_file, shared_cifar, tmp_path):
    """The same attacks, examples, masking checks and JSON as a run's evaluation, of Rice et al.'s file."""
    out = tmp_path / "eval.json"
    assert cli(["evaluate", "--checkpoint", str(rice_file[0]), "--arch", "preact_resnet18", "--format", "rice",
                "--dataset", "cifar10_small", "--data-root", str(shared_cifar.parent), "--n-examples", "6",
                "--pgd-steps", "2", "--pgd-restarts", "1", "--autoattack", "none", "--device", "cpu",
                "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["checkpoints"]) == {"external"} and set(result["checkpoints"]["external"]) == set(ENTRY_KEYS)
    assert result["source"] == {"file": str(rice_file[0]), "format": "rice", "arch": "preact_resnet18"}
    assert result["checkpoint_sha256"] == {"external": file_sha256(rice_file[0])}
    assert result["settings"]["eps"] == pytest.approx(8 / 255) and result["settings"]["norm"] == "linf"
    assert "zero_gradient_examples" in result["checkpoints"]["external"]["masking_checks"]
    # Clean accuracy by hand: Rice's own network, their normalisation, the evaluation's example rule.
    data = load_dataset("cifar10_small", str(shared_cifar.parent))
    indices = select_examples(len(data.test_y), 6, 0)
    x, y = data.test_x[indices].float() / 255, data.test_y[indices]
    with torch.no_grad():
        expected = (rice_file[1](rice_normalise(x)).argmax(1) == y).float().mean().item()
    assert result["checkpoints"]["external"]["clean_acc"] == pytest.approx(expected)


# ------------------------------------------------------------------------------------------ export: a run

def make_run(root: Path, arch: str, evaluation: dict, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26)) -> Path:
    """A finished run directory as deat train and evaluate leave it: best.pt, metrics.json and an eval JSON with
    the checkpoint's hash. Weights random; the evaluation's numbers are the test's inputs."""
    run_dir = root / arch / "lr0.1_bs128_seed0"
    config = TrainConfig.from_dict({"dataset": evaluation["settings"]["dataset"], "arch": arch, "method": "deat",
                                    "epochs": 3, "out": str(run_dir)}).resolved().to_dict()
    spec = {"arch": arch, "num_classes": 10, "in_channels": 3, "mean": list(mean), "std": list(std), "width": None}
    torch.manual_seed(2)
    model = randomise(build_model(arch, 10, mean=mean, std=std), seed=2)
    save_checkpoint(run_dir / "best.pt", {"config": config, "model_spec": spec, "epoch": 2,
                                          "model": model.state_dict(), "metrics": {}})
    epochs = [{"epoch": e, "epoch_time_s": 10.0 * e, "images_per_s": 100.0 * e} for e in (1, 2, 3)]
    write_json(run_dir / "metrics.json", {"config": config, "status": "complete", "model": spec, "epochs": epochs,
                                          "environment": {"device": "cpu", "device_name": "cpu", "deat": "0.1.0"},
                                          "wall_time_s": 60.0})
    write_json(run_dir / "eval_0123abcd.json", {**evaluation,
                                                "checkpoint_sha256": {"best": file_sha256(run_dir / "best.pt")}})
    return run_dir


def evaluation(dataset="cifar10", n=10_000, n_test=10_000, attacks=("apgd-ce", "apgd-t", "fab-t", "square"),
               flags=()) -> dict:
    settings = {"dataset": dataset, "eps": 8 / 255, "norm": "linf", "n_examples": n, "example_seed": 0,
                "pgd_steps": 50, "pgd_restarts": 10, "autoattack": "standard", "autoattack_attacks": list(attacks),
                "autoattack_skipped": {}, "autoattack_target_classes": 9, "attack_seed": 0}
    entry = {"epoch": 2, "clean_acc": 0.8334, "pgd10_acc": 0.5, "pgd_acc": 0.47, "aa_acc": 0.4321,
             "worst_case_acc": 0.43, "autoattack": {}, "skipped_attacks": {}, "masking_flags": list(flags),
             "masking_checks": {}, "wall_time_s": {"clean": 1.0, "aa": 90.0}}
    return {"settings": settings, "examples": {"n": n, "n_test": n_test}, "checkpoints": {"best": entry},
            "environment": {"device": "cuda", "device_name": "NVIDIA H100"}, "wall_time_s": 91.0}


def test_the_card_holds_robustbench_fields_with_the_evaluations_numbers(tmp_path):
    run_dir = make_run(tmp_path, "preact_resnet18", evaluation())
    paths = export_run(run_dir, tmp_path / "out")
    card = json.loads(paths["card"].read_text())
    assert set(ROBUSTBENCH_REQUIRED_FIELDS) <= set(card) <= set(ROBUSTBENCH_REQUIRED_FIELDS) | set(ROBUSTBENCH_OPTIONAL_FIELDS)
    for field, kind in {**ROBUSTBENCH_REQUIRED_FIELDS, **ROBUSTBENCH_OPTIONAL_FIELDS}.items():
        assert field not in card or type(card[field]) is kind, field
    assert tuple(card) == CARD_FIELDS
    assert (card["clean_acc"], card["autoattack_acc"], card["eps"]) == ("83.34", "43.21", "8/255")
    assert (card["dataset"], card["architecture"], card["unreliable"]) == ("cifar10", "PreActResNet-18", False)
    assert card["footnote"].startswith("Standard AutoAttack (APGD-CE, APGD-T, FAB-T, Square) on the full test set: "
                                       "10,000 test images, Linf eps = 8/255.")


@pytest.mark.parametrize("kwargs, reason", [
    ({"dataset": "cifar10_small", "n": 500, "n_test": 1000, "attacks": ("apgd-ce", "apgd-t")},
     ("AutoAttack ran APGD-CE + APGD-T, not standard's APGD-CE, APGD-T, FAB-T and Square; test set cifar10_small "
      "(1,000 images), not cifar10's 10,000; 500 of the 1,000 test images. 500 test images, Linf eps = 8/255.")),
    ({"n": 1000}, "1,000 of the 10,000 test images."),
])
def test_a_nonstandard_evaluation_says_so_in_the_card(tmp_path, kwargs, reason):
    run_dir = make_run(tmp_path, "preact_resnet18", evaluation(**kwargs, flags=["AutoAttack above PGD"]))
    paths = export_run(run_dir, tmp_path / "out")
    card, protocol = json.loads(paths["card"].read_text()), json.loads(paths["protocol"].read_text())
    assert card["footnote"].startswith("Non-standard evaluation (not RobustBench's standard AutoAttack): ")
    assert reason in card["footnote"] and "Possible gradient masking: AutoAttack above PGD." in card["footnote"]
    assert card["unreliable"] is True and protocol["standard_autoattack"] is False


def test_the_protocol_records_attacks_seeds_commit_command_and_cost(tmp_path):
    run_dir = make_run(tmp_path, "preact_resnet18", evaluation())
    protocol = json.loads(export_run(run_dir, tmp_path / "out")["protocol"].read_text())
    assert protocol["standard_autoattack"] is True and protocol["n_examples"] == 10_000
    assert protocol["attacks"]["settings"]["autoattack_attacks"] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert protocol["seeds"] == {"training": 0, "attack": 0, "example_selection": 0}
    assert len(protocol["code"]["commit_at_export"]) == 40
    cost = protocol["compute_cost"]
    assert (cost["training"]["wall_time_s"], cost["training"]["mean_epoch_time_s"]) == (60.0, 20.0)
    assert cost["evaluation"]["wall_time_s"] == {"clean": 1.0, "aa": 90.0}
    # The training command trains the same run: parsed back, it gives the run's identity.
    words = protocol["training"]["command"].split()
    assert words[:4] == ["python", "-m", "deat", "train"]
    args = build_parser("train").parse_args(words[3:])
    config = json.loads((run_dir / "metrics.json").read_text())["config"]
    assert run_identity(config_from_args(args).resolved().to_dict()) == run_identity(config)


def test_export_refuses_what_robustbench_cannot_take(tmp_path):
    with pytest.raises(ValueError, match="RobustBench has no class for architecture 'vgg19'; it has classes for: "
                                         "preact_resnet18"):
        export_run(make_run(tmp_path, "vgg19", evaluation()), tmp_path / "out")
    run_dir = make_run(tmp_path, "preact_resnet18", evaluation())
    other = json.loads((run_dir / "eval_0123abcd.json").read_text())
    write_json(run_dir / "eval_0123abcd.json", {**other, "checkpoint_sha256": {"best": "0" * 64}})
    with pytest.raises(ValueError, match="evaluated another best.pt"):
        export_run(run_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written


# ---------------------------------------------------------------------------------------- against robustbench

def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


@needs_robustbench
def test_exported_preact_resnet18_gives_deats_logits_in_robustbenchs_class(tmp_path):
    from robustbench.model_zoo.architectures.resnet import PreActBlockV2, PreActResNet
    from robustbench.model_zoo.cifar10 import Rice2020OverfittingNetL2

    for mean, std, zoo in (((0.49, 0.48, 0.45), (0.25, 0.24, 0.26), Rice2020OverfittingNetL2),
                           ((0.0,) * 3, (1.0,) * 3, lambda: PreActResNet(PreActBlockV2, [2, 2, 2, 2], bn_before_fc=True))):
        run_dir = make_run(tmp_path / str(mean[0]), "preact_resnet18", evaluation(), mean=mean, std=std)
        weights = torch.load(export_run(run_dir, tmp_path / "out")["weights"], weights_only=True)
        theirs = zoo()
        theirs.load_state_dict(weights)  # strict: every key theirs, none left over
        ours = model_from(torch.load(run_dir / "best.pt", weights_only=True), "cpu")
        torch.testing.assert_close(logits(theirs, INPUT), logits(ours, INPUT), atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def wrn_run(tmp_path_factory) -> Path:
    """One WRN-34-10 run (46 M parameters, 185 MB), built once for the module."""
    return make_run(tmp_path_factory.mktemp("wrn"), "wrn34_10", evaluation())


@needs_robustbench
def test_exported_wrn34_10_gives_deats_logits_in_robustbenchs_class(wrn_run, tmp_path):
    from robustbench.model_zoo.cifar10 import Rice2020OverfittingNet

    paths = export_run(wrn_run, tmp_path / "out")
    theirs = Rice2020OverfittingNet(depth=34, widen_factor=10)
    theirs.load_state_dict(torch.load(paths["weights"], weights_only=True))
    ours = model_from(torch.load(wrn_run / "best.pt", weights_only=True), "cpu")
    # float64: in fp32 the two pooling orders round apart by ~1e-6 on logits of size ~10; in float64 they agree.
    torch.testing.assert_close(logits(theirs.double(), INPUT[:2].double()), logits(ours.double(), INPUT[:2].double()),
                               atol=1e-6, rtol=0)
    assert json.loads(paths["card"].read_text())["architecture"] == "WideResNet-34-10"


@needs_robustbench
def test_robustbench_state_dicts_map_onto_deat_and_a_different_network_is_refused(tmp_path):
    from robustbench.model_zoo.architectures.resnet import PreActResNet18
    from robustbench.model_zoo.cifar10 import Rice2020OverfittingNetL2

    zoo = randomise(Rice2020OverfittingNetL2(), seed=3)
    path = tmp_path / "zoo.pt"
    torch.save(zoo.state_dict(), path)
    ours = model_from(load_foreign_checkpoint(path, "preact_resnet18", "robustbench"), "cpu")
    torch.testing.assert_close(logits(ours, INPUT), logits(zoo, INPUT), atol=1e-6, rtol=0)
    assert to_robustbench_keys("preact_resnet18", ours.state_dict()).keys() == zoo.state_dict().keys()
    # robustbench's plain PreActResNet18 (Wong et al.'s) has no BatchNorm before the classifier: refused, not loaded.
    torch.save(PreActResNet18().state_dict(), path)
    with pytest.raises(ValueError, match="missing key 'bn.weight'"):
        load_foreign_checkpoint(path, "preact_resnet18", "robustbench")


@pytest.fixture
def offline(monkeypatch):
    """No network, as on a machine without one: every name lookup and connection fails."""
    def refuse(*args, **kwargs):
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


@needs_robustbench
def test_robustbench_model_offline_is_a_one_line_error_saying_so(tmp_path, offline, capsys):
    assert cli(["evaluate", "--robustbench-model", "Wong2020Fast", "--dataset", "cifar10",
                "--model-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: robustbench could not fetch model 'Wong2020Fast' (no network here?")
    assert "\n" not in err


@needs_robustbench
def test_robustbench_model_loads_through_robustbenchs_loader_from_a_local_file(tmp_path, offline, shared_cifar):
    from robustbench.model_zoo.cifar10 import Wong2020FastNet

    zoo = randomise(Wong2020FastNet(), seed=4)
    weights = tmp_path / "models/cifar10/Linf/Wong2020Fast.pt"
    weights.parent.mkdir(parents=True)
    torch.save(zoo.state_dict(), weights)
    out = tmp_path / "eval.json"
    assert cli(["evaluate", "--robustbench-model", "Wong2020Fast", "--dataset", "cifar10_small", "--model-dir",
                str(tmp_path / "models"), "--data-root", str(shared_cifar.parent), "--n-examples", "4",
                "--pgd-steps", "1", "--pgd-restarts", "1", "--autoattack", "none", "--device", "cpu",
                "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["source"]["robustbench_model"] == "Wong2020Fast"
    assert result["checkpoint_sha256"] == {"external": file_sha256(weights)}
    assert unknown_model_error(tmp_path) == ("error: robustbench has no model 'NoSuchModel2099' for cifar10 Linf; "
                                             "e.g. ")


def unknown_model_error(tmp_path) -> str:
    import contextlib
    import io

    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        assert cli(["evaluate", "--robustbench-model", "NoSuchModel2099", "--dataset", "cifar10",
                    "--model-dir", str(tmp_path)]) == 2
    return stderr.getvalue().split("e.g. ")[0] + "e.g. "


# ------------------------------------------------------------------------------------------------- MLflow

def test_the_best_checkpoint_logged_to_mlflow_loads_back_as_the_same_model(tmp_path, isolated_mlflow):
    import mlflow.pytorch
    from mlflow.tracking import MlflowClient

    from deat.tracking import log_best_model

    spec = {"arch": "small_cnn", "num_classes": 10, "in_channels": 1, "mean": [0.13], "std": [0.3], "width": 8}
    model = randomise(build_model("small_cnn", 10, in_channels=1, mean=[0.13], std=[0.3], width=8), seed=5)
    save_checkpoint(tmp_path / "best.pt", {"model_spec": spec, "model": model.state_dict(), "epoch": 4,
                                           "config": {"dataset": "mnist5k", "data_root": "data", "val_size": 200}})
    client = MlflowClient(isolated_mlflow)
    run = client.create_run(client.create_experiment("x", artifact_location=(tmp_path / "art").as_uri()))
    uri = log_best_model(isolated_mlflow, run.info.run_id, tmp_path / "best.pt")
    loaded = mlflow.pytorch.load_model(uri)
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(6))  # a batch size other than the example's
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), logits(model, x), atol=1e-6, rtol=0)


def test_mlflow_log_model_needs_mlflow(capsys):
    assert cli(["train", "--mlflow-log-model", "--epochs", "1"]) == 2
    assert capsys.readouterr().err.strip() == ("error: --mlflow-log-model logs to the run's MLflow run: it needs "
                                               "--mlflow FILE")
