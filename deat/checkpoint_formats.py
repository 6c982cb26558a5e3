"""Checkpoints deat did not train, and deat's weights in RobustBench's layout: key mapping, shape checks, loaders.

Three layouts of the same two networks (PreAct-ResNet-18, WideResNet-34-k) exist in the field:

| format        | where it comes from                                          | key names                  | normalisation        |
|---------------|--------------------------------------------------------------|----------------------------|----------------------|
| `deat`        | `deat train` (best.pt / last.pt) or a bare deat state dict  | `net.stages.0.0.conv1...`  | `mean`/`std` buffers |
| `robustbench` | RobustBench's model zoo (`robustbench.model_zoo`)            | `layer1.0.conv1...`        | `mu`/`sigma` buffers, where the zoo class has them; none otherwise |
| `rice`        | Rice et al. 2020, locuslab/robust_overfitting `model_*.pth`  | `module.layer1.0.conv1...` | outside the model: their CIFAR-10 mean/std |

RobustBench's and Rice et al.'s names are the same (RobustBench's `PreActResNet(PreActBlockV2, [2, 2, 2, 2],
bn_before_fc=True)` and `WideResNet` are those papers' code): `module.` / `model.` prefixes are dropped (as
`robustbench.utils.load_model` does) and a `{"state_dict": ...}` wrapper is opened. Every key is mapped to deat's
name and checked for shape before anything is computed; a key that maps to nothing, a missing one or a wrong shape
is a one-line ValueError naming it. deat's PreAct-ResNet-18 is Rice et al.'s (11,172,170 parameters): the 1,024 more
than RobustBench's plain `PreActResNet18()` (11,171,146) are the BatchNorm before the classifier (`bn`), and that
class also applies the shortcut to the block's raw input, so its checkpoints (e.g. Wong2020Fast) are refused here
by their missing `bn.*` keys rather than loaded into the wrong function.

Every file is read with `torch.load(weights_only=True)`. robustbench itself is optional (`pip install
'deat[robustbench]'`); only `--robustbench-model` and the tests against its classes need it.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import FORMAT as DEAT_FORMAT
from .checkpoint import load_checkpoint
from .models import ARCHITECTURES, build_model

FORMATS = ("deat", "robustbench", "rice")
# Rice et al.'s normalisation, outside their model (locuslab/robust_overfitting utils.py, CIFAR-10 statistics).
RICE_MEAN = (0.4914, 0.4822, 0.4465)
RICE_STD = (0.2471, 0.2435, 0.2616)
# RobustBench's standard radii (its leaderboards): 8/255 in ℓ∞, 0.5 in ℓ2.
ROBUSTBENCH_EPS = {"linf": 8 / 255, "l2": 0.5}
THREAT_MODELS = {"linf": "Linf", "l2": "L2"}
# deat dataset -> RobustBench's dataset name (cifar10_small is a subset of CIFAR-10's images).
ROBUSTBENCH_DATASETS = {"cifar10": "cifar10", "cifar10_small": "cifar10", "cifar100": "cifar100"}
EXTERNAL = "external"  # the one checkpoint name of an external evaluation in eval.json

# deat name <-> RobustBench / Rice name, per architecture: (deat regex, its replacement, RobustBench regex, its
# replacement). Stage and group indices are 0-based in deat (nn.Sequential) and 1-based in theirs (layer1, block1).
_PLUS1: Callable[[str], str] = lambda s: str(int(s) + 1)
_MINUS1: Callable[[str], str] = lambda s: str(int(s) - 1)
_BLOCK_PARTS = r"(bn1|conv1|bn2|conv2)"
_RULES: dict[str, list[tuple[str, Callable[[re.Match], str], str, Callable[[re.Match], str]]]] = {
    "preact_resnet18": [
        (r"net\.stem\.weight", lambda m: "conv1.weight", r"conv1\.weight", lambda m: "net.stem.weight"),
        (rf"net\.stages\.(\d)\.(\d)\.{_BLOCK_PARTS}\.(\w+)",
         lambda m: f"layer{_PLUS1(m[1])}.{m[2]}.{m[3]}.{m[4]}",
         rf"layer(\d)\.(\d)\.{_BLOCK_PARTS}\.(\w+)",
         lambda m: f"net.stages.{_MINUS1(m[1])}.{m[2]}.{m[3]}.{m[4]}"),
        (r"net\.stages\.(\d)\.(\d)\.projection\.weight", lambda m: f"layer{_PLUS1(m[1])}.{m[2]}.shortcut.0.weight",
         r"layer(\d)\.(\d)\.shortcut\.0\.weight", lambda m: f"net.stages.{_MINUS1(m[1])}.{m[2]}.projection.weight"),
        (r"net\.final_bn\.(\w+)", lambda m: f"bn.{m[1]}", r"bn\.(\w+)", lambda m: f"net.final_bn.{m[1]}"),
        (r"net\.classifier\.(\w+)", lambda m: f"linear.{m[1]}", r"linear\.(\w+)", lambda m: f"net.classifier.{m[1]}"),
    ],
    "wrn34_10": [
        (r"net\.stem\.weight", lambda m: "conv1.weight", r"conv1\.weight", lambda m: "net.stem.weight"),
        (rf"net\.groups\.(\d)\.(\d)\.{_BLOCK_PARTS}\.(\w+)",
         lambda m: f"block{_PLUS1(m[1])}.layer.{m[2]}.{m[3]}.{m[4]}",
         rf"block(\d)\.layer\.(\d)\.{_BLOCK_PARTS}\.(\w+)",
         lambda m: f"net.groups.{_MINUS1(m[1])}.{m[2]}.{m[3]}.{m[4]}"),
        (r"net\.groups\.(\d)\.(\d)\.projection\.weight",
         lambda m: f"block{_PLUS1(m[1])}.layer.{m[2]}.convShortcut.weight",
         r"block(\d)\.layer\.(\d)\.convShortcut\.weight",
         lambda m: f"net.groups.{_MINUS1(m[1])}.{m[2]}.projection.weight"),
        (r"net\.final_bn\.(\w+)", lambda m: f"bn1.{m[1]}", r"bn1\.(\w+)", lambda m: f"net.final_bn.{m[1]}"),
        (r"net\.classifier\.(\w+)", lambda m: f"fc.{m[1]}", r"fc\.(\w+)", lambda m: f"net.classifier.{m[1]}"),
    ],
}
for _rules in _RULES.values():  # the normaliser: deat's Normalized buffers, RobustBench's zoo buffers
    _rules += [(r"mean", lambda m: "mu", r"mu", lambda m: "mean"), (r"std", lambda m: "sigma", r"sigma", lambda m: "std")]

# What RobustBench (1.1.1) offers for each architecture deat can hand over, for messages and the protocol file.
ROBUSTBENCH_CLASSES = {
    "preact_resnet18": {
        "architecture": "PreActResNet-18",
        "normalised": "robustbench.model_zoo.cifar10.Rice2020OverfittingNetL2()",
        "plain": "robustbench.model_zoo.architectures.resnet.PreActResNet(PreActBlockV2, [2, 2, 2, 2], "
                 "num_classes={num_classes}, bn_before_fc=True)",
    },
    "wrn34_10": {
        "architecture": "WideResNet-34-{width}",
        "normalised": "robustbench.model_zoo.cifar10.Rice2020OverfittingNet(depth=34, widen_factor={width})",
        "plain": "robustbench.model_zoo.architectures.wide_resnet.WideResNet(depth=34, widen_factor={width}, "
                 "num_classes={num_classes})",
    },
}
MAPPED_ARCHITECTURES = tuple(_RULES)


def require_mapped(arch: str) -> None:
    """ValueError (one line) for an architecture RobustBench has no class for."""
    if arch not in _RULES:
        raise ValueError(f"RobustBench has no class for architecture {arch!r}; it has classes for: "
                         + ", ".join(f"{a} ({ROBUSTBENCH_CLASSES[a]['architecture'].format(width=10)})"
                                     for a in MAPPED_ARCHITECTURES))


def _convert(arch: str, key: str, to_deat: bool) -> str | None:
    for deat_re, to_theirs, theirs_re, to_ours in _RULES[arch]:
        match = re.fullmatch(theirs_re if to_deat else deat_re, key)
        if match:
            return (to_ours if to_deat else to_theirs)(match)
    return None


def to_robustbench_keys(arch: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """deat's state dict (of `build_model(arch, ...)`) under RobustBench's key names; every key must map."""
    require_mapped(arch)
    out = {}
    for key, value in state.items():
        theirs = _convert(arch, key, to_deat=False)
        if theirs is None:
            raise ValueError(f"deat key {key!r} of {arch} has no RobustBench name")
        out[theirs] = value
    return out


def unwrap(state: dict[str, Any]) -> dict[str, Any]:
    """The state dict inside a `{"state_dict": ...}` wrapper (Rice et al.'s model_best.pth), else `state`."""
    return state["state_dict"] if isinstance(state.get("state_dict"), dict) else state


def strip_prefix(key: str) -> str:
    """A key without `module.` (DataParallel) and `model.` prefixes, as robustbench.utils.load_model drops them."""
    return re.sub(r"^(module\.|model\.)+", "", key)


def _infer_spec(arch: str, mapped: dict[str, torch.Tensor], where: str) -> dict[str, Any]:
    """Classes, input channels and width from the stem and classifier shapes (mean/std are set by the caller)."""
    for key in ("net.stem.weight", "net.classifier.weight"):
        if key not in mapped:
            raise ValueError(f"{where}: no {_convert(arch, key, to_deat=False)!r} key: not a {arch} checkpoint")
    stem, classifier = mapped["net.stem.weight"], mapped["net.classifier.weight"]
    width = stem.shape[0]
    if arch == "wrn34_10":
        first = mapped.get("net.groups.0.0.conv1.weight")
        if first is None:
            raise ValueError(f"{where}: no 'block1.layer.0.conv1.weight' key: not a {arch} checkpoint")
        width = first.shape[0] // 16  # the widen factor k: the first group has 16k channels
    return {"arch": arch, "num_classes": int(classifier.shape[0]), "in_channels": int(stem.shape[1]),
            "width": int(width)}


def to_deat_state(arch: str, state: dict[str, Any], fmt: str, where: str,
                  mean: list[float] | None = None, std: list[float] | None = None
                  ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(deat state dict, model_spec) of a foreign state dict in format `fmt`, every key and shape checked.

    mean / std override the normalisation (only where the file carries none); without them: the file's
    `mu`/`sigma` (RobustBench) or `mean`/`std` (deat), Rice et al.'s CIFAR-10 statistics for `rice`, else 0 / 1.
    Raises ValueError naming the first key that maps to no parameter, is missing, or has the wrong shape.
    """
    require_mapped(arch)
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is unknown; expected one of {', '.join(FORMATS)}")
    mapped, theirs = {}, {}  # deat name -> tensor, deat name -> the file's own name (for messages)
    for key, value in unwrap(state).items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{where}: key {key!r} holds a {type(value).__name__}, not a tensor")
        ours = strip_prefix(key) if fmt == "deat" else _convert(arch, strip_prefix(key), to_deat=True)
        if ours is None:
            raise ValueError(f"{where}: key {key!r} matches no parameter of deat's {arch} (format {fmt})")
        mapped[ours], theirs[ours] = value, key
    spec = _infer_spec(arch, mapped, where)
    has_normaliser = "mean" in mapped or "std" in mapped
    if has_normaliser and (mean is not None or std is not None):
        raise ValueError(f"{where} carries its own normalisation ({'mean/std' if fmt == 'deat' else 'mu/sigma'}); "
                         f"--mean/--std apply only to files without one")
    channels = spec["in_channels"]
    if has_normaliser:
        if "mean" not in mapped or "std" not in mapped:
            raise ValueError(f"{where}: has {theirs.get('mean') or theirs.get('std')!r} but not its partner")
        mean, std = mapped.pop("mean").flatten().tolist(), mapped.pop("std").flatten().tolist()
    elif mean is None and std is None and fmt == "rice":
        mean, std = list(RICE_MEAN), list(RICE_STD)
    spec.update(mean=list(mean) if mean is not None else [0.0] * channels,
                std=list(std) if std is not None else [1.0] * channels)
    model = build_model(arch, spec["num_classes"], in_channels=channels, mean=spec["mean"], std=spec["std"],
                        width=spec["width"])
    expected = model.state_dict()
    mapped.update(mean=expected["mean"], std=expected["std"])  # the normaliser as validated by build_model
    for key in mapped:
        if key not in expected:
            raise ValueError(f"{where}: key {theirs[key]!r} matches no parameter of deat's {arch} (width "
                             f"{spec['width']}, format {fmt})")
    for key, tensor in expected.items():
        name = key if fmt == "deat" else _convert(arch, key, to_deat=False)
        if key not in mapped:
            if key.endswith("num_batches_tracked"):  # older files lack it; evaluation never reads it
                mapped[key] = tensor
                continue
            raise ValueError(f"{where}: missing key {name!r} of {arch} (format {fmt})")
        if mapped[key].shape != tensor.shape:
            raise ValueError(f"{where}: key {name!r} has shape {tuple(mapped[key].shape)}; deat's {arch} "
                             f"(width {spec['width']}, {spec['num_classes']} classes) needs {tuple(tensor.shape)}")
    return {k: mapped[k].to(tensor.dtype) for k, tensor in expected.items()}, spec


def load_foreign_checkpoint(path: str | Path, arch: str, fmt: str, mean: list[float] | None = None,
                            std: list[float] | None = None) -> dict[str, Any]:
    """A checkpoint file of any FORMATS as a deat-like checkpoint dict {"model_spec", "model", "epoch", "source"}.

    A deat checkpoint (best.pt, last.pt) keeps its own model_spec, which must name `arch`.
    """
    if fmt != "deat":
        require_mapped(arch)  # before reading a byte
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated zips and refused pickles
        raise ValueError(f"checkpoint {path} cannot be loaded with weights_only=True (corrupt, or it holds "
                         f"pickled objects): {str(err).splitlines()[0]}") from None
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path} holds a {type(state).__name__}, not a state dict")
    source = {"file": str(path), "format": fmt, "arch": arch}
    if fmt == "deat" and state.get("format") == DEAT_FORMAT:
        ckpt = load_checkpoint(path)
        if ckpt.get("model_spec", {}).get("arch") != arch:
            raise ValueError(f"checkpoint {path} holds a {ckpt.get('model_spec', {}).get('arch')!r} model, not {arch!r}")
        if mean is not None or std is not None:
            raise ValueError(f"checkpoint {path} carries its own normalisation; --mean/--std do not apply")
        return {"model_spec": ckpt["model_spec"], "model": ckpt["model"], "epoch": ckpt.get("epoch"),
                "source": source}
    if fmt == "deat":
        require_mapped(arch)
    model, spec = to_deat_state(arch, state, fmt, str(path), mean, std)
    return {"model_spec": spec, "model": model, "epoch": None, "source": source}


def model_from(ckpt: dict[str, Any], device: str | torch.device) -> nn.Module:
    """The deat model of a checkpoint dict, ready to attack: on `device`, eval mode, parameters frozen."""
    spec = ckpt["model_spec"]
    model = build_model(spec["arch"], spec["num_classes"], in_channels=spec["in_channels"], mean=spec["mean"],
                        std=spec["std"], width=spec["width"])
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------- robustbench itself

def import_robustbench():
    """The robustbench package, with its two import traps handled; RuntimeError (one line) when it is absent.

    robustbench 1.1.1 imports `pkg_resources` (setuptools < 81) and `autoattack` (fra31's package, not on the
    registry); the registry's pyautoattack, which deat already uses, is that code under the module name
    `pyautoattack`, so it stands in for `autoattack`.
    """
    import pyautoattack

    sys.modules.setdefault("autoattack", pyautoattack)
    try:
        import robustbench
        import robustbench.utils
    except ImportError as err:
        hint = " (robustbench 1.1.1 needs setuptools < 81 for pkg_resources)" if "pkg_resources" in str(err) else ""
        raise RuntimeError(f"robustbench cannot be imported: {err}{hint}; install it with "
                           f"pip install 'deat[robustbench]'") from None
    return robustbench


def load_robustbench_model(name: str, dataset: str, norm: str, model_dir: str | Path) -> tuple[nn.Module, Path]:
    """RobustBench's model `name` through its own loader (`robustbench.utils.load_model`), and its weights file.

    The loader reads `model_dir/<dataset>/<threat>/<name>.pt` when it is there and downloads it otherwise. Raises
    ValueError for a name the zoo lacks, RuntimeError (one line) when the download fails, e.g. offline.
    """
    if dataset not in ROBUSTBENCH_DATASETS:
        raise ValueError(f"dataset {dataset!r} has no RobustBench leaderboard; RobustBench models are for "
                         f"{', '.join(sorted(set(ROBUSTBENCH_DATASETS.values())))} "
                         f"(deat datasets {', '.join(ROBUSTBENCH_DATASETS)})")
    robustbench = import_robustbench()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    rb_dataset, threat = BenchmarkDataset(ROBUSTBENCH_DATASETS[dataset]), ThreatModel(THREAT_MODELS[norm])
    known = model_dicts[rb_dataset][threat]
    if name not in known:
        raise ValueError(f"robustbench has no model {name!r} for {rb_dataset.value} {threat.value}; e.g. "
                         f"{', '.join(sorted(known)[:5])} ({len(known)} in all)")
    path = Path(model_dir) / rb_dataset.value / threat.value / f"{name}.pt"
    try:
        model = robustbench.utils.load_model(name, model_dir=str(model_dir), dataset=rb_dataset.value,
                                             threat_model=threat.value)
    except Exception as err:  # gdown, requests and huggingface_hub raise their own types when offline
        message = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise RuntimeError(f"robustbench could not fetch model {name!r} (no network here? it downloads the weights "
                           f"to {path} unless that file exists): {type(err).__name__}: {message}") from None
    if not path.is_file():  # a timm-hosted model: keep the evaluated weights so that eval.json can name their hash
        from .checkpoint import atomic_write

        atomic_write(path, lambda f: torch.save(model.state_dict(), f))
    return model, path


# -------------------------------------------------------------------------------------- the evaluate command

def add_external_arguments(parser: argparse.ArgumentParser) -> None:
    """`deat evaluate`'s options for a checkpoint deat did not train (instead of --run-dir)."""
    group = parser.add_argument_group("a checkpoint deat did not train (instead of --run-dir)")
    group.add_argument("--checkpoint", metavar="FILE", help="state dict or checkpoint file to evaluate "
                       "(read with weights_only=True)")
    group.add_argument("--arch", choices=ARCHITECTURES, help="its architecture (robustbench and rice formats: "
                       + ", ".join(MAPPED_ARCHITECTURES) + ")")
    group.add_argument("--format", choices=FORMATS, default="deat", help="its key names: deat, robustbench (the "
                       "model zoo's classes) or rice (Rice et al. 2020's model_*.pth, 'module.' prefixes) "
                       "(default: deat)")
    group.add_argument("--robustbench-model", metavar="NAME", help="a RobustBench model-zoo model, loaded by "
                       "robustbench's own loader (downloads unless MODEL_DIR holds it)")
    group.add_argument("--model-dir", default="models", help="robustbench's model folder (default: models)")
    group.add_argument("--dataset", help="test set to evaluate on, e.g. cifar10 (required with --checkpoint or "
                       "--robustbench-model)")
    group.add_argument("--mean", type=float, nargs="+", help="per-channel input mean, for files without their own "
                           "normalisation (default: rice: Rice et al.'s CIFAR-10 mean; else none)")
    group.add_argument("--std", type=float, nargs="+", help="per-channel input std (see --mean)")


def external_source(args: argparse.Namespace, device: torch.device
                    ) -> tuple[dict[str, Path], dict[str, tuple[nn.Module, dict[str, Any]]], Path]:
    """(checkpoint paths, {name: (model, checkpoint dict)}, default output) of --checkpoint / --robustbench-model.

    The checkpoint dict is what `evaluate.main` reads of a run's checkpoint: `config` (the dataset, the threat
    model's default ε and norm, RobustBench's), `model_spec`, `model`, `epoch`, plus `source`.
    """
    file, zoo = getattr(args, "checkpoint", None), getattr(args, "robustbench_model", None)
    if bool(file) == bool(zoo) or (getattr(args, "run_dir", None) and (file or zoo)):
        raise ValueError("give exactly one of --run-dir, --checkpoint FILE or --robustbench-model NAME")
    if not args.dataset:
        raise ValueError(f"--dataset is required with {'--checkpoint' if file else '--robustbench-model'}")
    if getattr(args, "mlflow", None):
        raise ValueError("--mlflow logs to a training run's MLflow run: it needs --run-dir")
    norm = args.norm or "linf"
    config = {"dataset": args.dataset, "data_root": args.data_root or "data", "val_size": None,
              "eps": ROBUSTBENCH_EPS[norm], "norm": norm}
    if file:
        if not args.arch:
            raise ValueError("--arch is required with --checkpoint (one of " + ", ".join(ARCHITECTURES) + ")")
        ckpt = load_foreign_checkpoint(file, args.arch, args.format, args.mean, args.std)
        model = model_from(ckpt, device)
        path, out = Path(file), Path(file).with_name(f"{Path(file).stem}_eval.json")
    else:
        if args.mean or args.std:
            raise ValueError("--mean/--std apply to --checkpoint files; a RobustBench model normalises itself")
        model, path = load_robustbench_model(zoo, args.dataset, norm, args.model_dir)
        model = model.to(device).eval().requires_grad_(False)
        num_classes = _output_classes(model, device)
        ckpt = {"model_spec": {"robustbench_model": zoo, "dataset": ROBUSTBENCH_DATASETS[args.dataset],
                               "threat_model": THREAT_MODELS[norm], "num_classes": num_classes},
                "model": model.state_dict(), "epoch": None,
                "source": {"robustbench_model": zoo, "file": str(path), "loader": "robustbench.utils.load_model"}}
        out = path.with_name(f"{zoo}_eval.json")
    ckpt["config"] = config
    return {EXTERNAL: path}, {EXTERNAL: (model, ckpt)}, out


def _output_classes(model: nn.Module, device: torch.device) -> int:
    with torch.no_grad():
        return int(model(torch.zeros(1, 3, 32, 32, device=device)).shape[1])
