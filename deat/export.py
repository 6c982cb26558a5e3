"""Hand a trained model to RobustBench: its weights in the zoo's layout, a model card, and deat's protocol beside them.

    python -m deat export --run-dir results/runs/RUN --checkpoint best --out export/

writes three files into the output folder (NAME defaults to the run's method, architecture and grid point):
- `NAME.pt`: the state dict under RobustBench's key names, normalisation inside the model as RobustBench requires
  (`robustbench.utils.load_model`: the model maps [0, 1] pixels to logits). deat's `Normalized` mean/std become the
  `mu`/`sigma` buffers of the zoo's normalising classes: PreAct-ResNet-18 loads strictly into
  `robustbench.model_zoo.cifar10.Rice2020OverfittingNetL2()` and WideResNet-34-k into
  `robustbench.model_zoo.cifar10.Rice2020OverfittingNet(depth=34, widen_factor=k)` (the zoo's WideResNet with
  mu/sigma). A model trained without normalisation (mean 0, std 1) gets no buffers and loads into the plain
  architecture classes (`PreActResNet(PreActBlockV2, [2, 2, 2, 2], bn_before_fc=True)`, `WideResNet(depth=34, ...)`).
  The architectures RobustBench has no class for (senet18, vgg19, small_cnn) are refused.
- `NAME.json`: the model card in RobustBench's `model_info/<dataset>/<threat model>/<Name>.json` schema (the fields
  of its repository's cards; numbers as strings: "clean_acc": "83.34", "eps": "8/255"), clean and AutoAttack
  accuracy from the run's eval JSON. The footnote states the threat model, ε, the number of evaluated examples and
  whether the AutoAttack run was standard (all four attacks on the full test set); a non-standard evaluation says
  so and why. `unreliable` is true when the evaluation flagged possible gradient masking.
- `NAME.deat.json`: deat's protocol: the attacks and their settings, the seeds, the git commit at export, the
  training command, the compute cost of training and evaluation, and the hashes tying card and weights to the run.
  It is not named like a card on purpose (RobustBench's leaderboard script reads every `*.json` of its folder
  as one, so keep this file out of model_info/).

The eval JSON must be of this very checkpoint file (its `checkpoint_sha256`); `--eval` picks one where the run has
several (one per study evaluation setting).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from .autoattack_runner import AUTOATTACK_NAMES, AUTOATTACK_STANDARD, AUTOATTACK_TARGETS
from .checkpoint import atomic_write, load_checkpoint, write_json
from .checkpoint_formats import (ROBUSTBENCH_CLASSES, ROBUSTBENCH_DATASETS, ROBUSTBENCH_EPS, THREAT_MODELS,
                                 require_mapped, to_robustbench_keys)
from .config import run_identity
from .eval_files import file_sha256, weights_sha256

CHECKPOINTS = ("best", "last")
# The full test sets RobustBench evaluates on.
ROBUSTBENCH_TEST_SIZE = {"cifar10": 10_000, "cifar100": 10_000}
# RobustBench model_info card fields, in the order its cards list them (model_info/cifar10/Linf/*.json).
CARD_FIELDS = ("link", "name", "authors", "additional_data", "number_forward_passes", "dataset", "venue",
               "architecture", "eps", "clean_acc", "reported", "autoattack_acc", "unreliable", "footnote")


def eps_string(eps: float) -> str:
    """RobustBench's way of writing ε: "8/255" where ε is a whole number of 255ths, else the number ("0.5")."""
    steps = eps * 255
    if abs(steps - round(steps)) < 1e-6 and round(steps) > 0:
        return f"{round(steps)}/255"
    return format(eps, ".4g")


def percent(fraction: float) -> str:
    return f"{100 * fraction:.2f}"


def find_eval(run_dir: Path, explicit: str | Path | None) -> Path:
    """The eval JSON to export from: `explicit`, or the run's only one; ValueError naming them where several."""
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise FileNotFoundError(f"eval file {path} does not exist")
        return path
    found = sorted(p for p in run_dir.glob("eval*.json") if not p.name.endswith(".partial.json"))
    if not found:
        raise FileNotFoundError(f"{run_dir} has no eval*.json: evaluate it first (python -m deat evaluate "
                                f"--run-dir {run_dir})")
    if len(found) > 1:
        raise ValueError(f"{run_dir} has {len(found)} evaluations ({', '.join(p.name for p in found)}): pick one "
                         f"with --eval")
    return found[0]


def nonstandard_reasons(evaluation: dict[str, Any], rb_dataset: str, dataset: str) -> list[str]:
    """Why an evaluation is not RobustBench's standard one (all four AutoAttack attacks, standard settings, the
    full test set); empty when it is."""
    settings, examples = evaluation["settings"], evaluation["examples"]
    reasons = []
    attacks = settings.get("autoattack_attacks") or []
    if settings.get("autoattack") != "standard" or tuple(attacks) != AUTOATTACK_STANDARD:
        ran = " + ".join(AUTOATTACK_NAMES[a] for a in attacks) or "no AutoAttack"
        reasons.append(f"AutoAttack ran {ran}, not standard's APGD-CE, APGD-T, FAB-T and Square")
    if settings.get("autoattack_target_classes", AUTOATTACK_TARGETS) != AUTOATTACK_TARGETS:
        reasons.append(f"{settings['autoattack_target_classes']} target classes, not standard's {AUTOATTACK_TARGETS}")
    full = ROBUSTBENCH_TEST_SIZE[rb_dataset]
    if dataset != rb_dataset:
        reasons.append(f"test set {dataset} ({examples['n_test']:,} images), not {rb_dataset}'s {full:,}")
    if examples["n"] < examples["n_test"]:
        reasons.append(f"{examples['n']:,} of the {examples['n_test']:,} test images")
    return reasons


def _footnote(evaluation: dict[str, Any], entry: dict[str, Any], reasons: list[str], checkpoint: str,
              threat: str, eps: float) -> str:
    settings, examples = evaluation["settings"], evaluation["examples"]
    where = f"{examples['n']:,} test images, {threat} eps = {eps_string(eps)}"
    if reasons:
        text = f"Non-standard evaluation (not RobustBench's standard AutoAttack): {'; '.join(reasons)}. {where}."
    else:
        text = f"Standard AutoAttack (APGD-CE, APGD-T, FAB-T, Square) on the full test set: {where}."
    if abs(eps - ROBUSTBENCH_EPS[settings["norm"]]) > 1e-9:
        text += f" eps {eps_string(eps)} is not the leaderboard's {eps_string(ROBUSTBENCH_EPS[settings['norm']])}."
    if entry.get("masking_flags"):
        text += " Possible gradient masking: " + "; ".join(entry["masking_flags"]) + "."
    return text + f" Evaluated by deat (checkpoint {checkpoint}, epoch {entry.get('epoch')})."


def model_card(config: dict[str, Any], spec: dict[str, Any], evaluation: dict[str, Any], checkpoint: str,
               title: str | None = None, authors: str = "", link: str = "", venue: str = "N/A") -> dict[str, Any]:
    """The RobustBench model_info card of one evaluated checkpoint; ValueError when it has no AutoAttack result."""
    entry = evaluation["checkpoints"][checkpoint]
    if entry.get("aa_acc") is None:
        raise ValueError(f"the evaluation has no AutoAttack accuracy for {checkpoint}: evaluate with --autoattack "
                         f"standard before exporting")
    settings = evaluation["settings"]
    rb_dataset = ROBUSTBENCH_DATASETS[config["dataset"]]
    threat = THREAT_MODELS[settings["norm"]]
    reasons = nonstandard_reasons(evaluation, rb_dataset, config["dataset"])
    architecture = ROBUSTBENCH_CLASSES[spec["arch"]]["architecture"].format(width=spec["width"])
    name = title or (f"deat: {config['method']} {spec['arch']} (lr {config['lr']}, batch {config['batch_size']}, "
                     f"seed {config['seed']}, {checkpoint} checkpoint)")
    card = {"link": link, "name": name, "authors": authors, "additional_data": False, "number_forward_passes": 1,
            "dataset": rb_dataset, "venue": venue, "architecture": architecture, "eps": eps_string(settings["eps"]),
            "clean_acc": percent(entry["clean_acc"]), "reported": percent(entry["aa_acc"]),
            "autoattack_acc": percent(entry["aa_acc"]), "unreliable": bool(entry.get("masking_flags")),
            "footnote": _footnote(evaluation, entry, reasons, checkpoint, threat, settings["eps"])}
    assert tuple(card) == CARD_FIELDS
    return card


def train_command(config: dict[str, Any], run_dir: Path) -> str:
    """`python -m deat train` with the flags that fix the run (its identity) and its output folder."""
    flags = []
    for key, value in run_identity(config).items():
        flag = "--" + key.replace("_", "-")
        if value is None:
            continue
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, list):
            flags.append(f"{flag} " + " ".join(str(v) for v in value))
        else:
            flags.append(f"{flag} {value}")
    return " ".join(["python -m deat train", *flags, f"--out {run_dir}"])


def git_commit() -> dict[str, Any]:
    """The commit of deat's source tree now (metrics.json records the deat version, not a commit), and whether
    the tree has uncommitted changes; nulls outside a git checkout."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip() != ""
    except (OSError, subprocess.SubprocessError):
        return {"commit_at_export": None, "uncommitted_changes": None}
    return {"commit_at_export": head, "uncommitted_changes": dirty}


def compute_cost(metrics: dict[str, Any], evaluation: dict[str, Any], checkpoint: str) -> dict[str, Any]:
    """What training and evaluating this checkpoint cost: wall times, throughput, device, and the memory keys
    metrics.json has (peak memory, where the run recorded it)."""
    epochs = metrics.get("epochs", [])
    epoch_times = [r["epoch_time_s"] for r in epochs if r.get("epoch_time_s") is not None]
    rates = [r["images_per_s"] for r in epochs if r.get("images_per_s") is not None]
    memory = {k: v for k, v in metrics.items() if "memory" in k or "peak" in k}
    for key in sorted({k for r in epochs for k in r if "memory" in k or "peak" in k}):
        memory[f"max_epoch_{key}"] = max(r[key] for r in epochs if r.get(key) is not None)
    env = metrics.get("environment", {})
    return {"training": {"wall_time_s": metrics.get("wall_time_s"), "epochs": len(epochs),
                         "mean_epoch_time_s": sum(epoch_times) / len(epoch_times) if epoch_times else None,
                         "mean_images_per_s": sum(rates) / len(rates) if rates else None,
                         "device": env.get("device"), "device_name": env.get("device_name"),
                         "torch": env.get("torch"), **memory},
            "evaluation": {"wall_time_s": evaluation["checkpoints"][checkpoint].get("wall_time_s"),
                           "total_wall_time_s": evaluation.get("wall_time_s"),
                           "device": evaluation.get("environment", {}).get("device"),
                           "device_name": evaluation.get("environment", {}).get("device_name")}}


def export_run(run_dir: str | Path, out_dir: str | Path, checkpoint: str = "best", eval_path: str | Path | None = None,
               name: str | None = None, **card_fields: str) -> dict[str, Path]:
    """Write NAME.pt, NAME.json (card) and NAME.deat.json (protocol) into out_dir; returns their paths.

    Everything is checked before anything is written: an architecture or dataset RobustBench has no class or
    leaderboard for, an evaluation of another checkpoint file, one without AutoAttack.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if checkpoint not in CHECKPOINTS:
        raise ValueError(f"checkpoint={checkpoint!r} is invalid; expected one of {', '.join(CHECKPOINTS)}")
    ckpt_path = run_dir / f"{checkpoint}.pt"
    ckpt = load_checkpoint(ckpt_path)
    spec, config = ckpt["model_spec"], ckpt["config"]
    require_mapped(spec["arch"])
    if spec["in_channels"] != 3 or (spec["arch"] == "preact_resnet18" and spec["width"] not in (None, 64)):
        raise ValueError(f"{ckpt_path}: RobustBench's {spec['arch']} class takes 3 input channels and width 64; "
                         f"this model has {spec['in_channels']} channels, width {spec['width']}")
    if config["dataset"] not in ROBUSTBENCH_DATASETS:
        raise ValueError(f"dataset {config['dataset']!r} has no RobustBench leaderboard; exportable datasets: "
                         f"{', '.join(ROBUSTBENCH_DATASETS)}")
    spec = {**spec, "width": spec["width"] or (64 if spec["arch"] == "preact_resnet18" else 10)}
    eval_file = find_eval(run_dir, eval_path)
    evaluation = json.loads(eval_file.read_text())
    if checkpoint not in evaluation.get("checkpoints", {}):
        raise ValueError(f"{eval_file} has no result for {checkpoint}")
    recorded = evaluation.get("checkpoint_sha256", {}).get(checkpoint)
    entry = evaluation["checkpoints"][checkpoint]
    if recorded is not None and recorded != file_sha256(ckpt_path):
        raise ValueError(f"{eval_file} evaluated another {checkpoint}.pt (checkpoint_sha256 differs): re-evaluate")
    if recorded is None and entry.get("weights_sha256") not in (None, weights_sha256(ckpt)):
        raise ValueError(f"{eval_file} evaluated other weights than {ckpt_path} (weights_sha256 differs)")
    card = model_card(config, spec, evaluation, checkpoint, **card_fields)
    name = name or f"{config['method']}_{spec['arch']}_{run_dir.name}_{checkpoint}"
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"name={name!r} is invalid; expected letters, digits, '_', '.', '-' (a file name)")

    state = {k: v.detach().cpu().float() if v.is_floating_point() else v.detach().cpu()
             for k, v in ckpt["model"].items()}
    plain = all(m == 0 for m in spec["mean"]) and all(s == 1 for s in spec["std"])
    if plain:  # no normaliser: the plain architecture class, which has no mu/sigma buffers
        state = {k: v for k, v in state.items() if k not in ("mean", "std")}
    weights = to_robustbench_keys(spec["arch"], state)
    classes = ROBUSTBENCH_CLASSES[spec["arch"]]
    rb_class = classes["plain" if plain else "normalised"].format(width=spec["width"], num_classes=spec["num_classes"])
    if not plain and spec["num_classes"] != 10:
        rb_class = (f"{classes['plain'].format(width=spec['width'], num_classes=spec['num_classes'])} with mu/sigma "
                    f"buffers (1, 3, 1, 1) applied as (x - mu) / sigma in forward, as the zoo's "
                    f"{classes['normalised'].split('(')[0].rsplit('.', 1)[-1]} does for 10 classes")
    settings = evaluation["settings"]
    protocol = {
        "card": f"{name}.json", "weights": f"{name}.pt",
        "robustbench": {"class": rb_class, "dataset": card["dataset"], "threat_model": THREAT_MODELS[settings["norm"]],
                        "model_info_path": f"model_info/{card['dataset']}/{THREAT_MODELS[settings['norm']]}/{name}.json",
                        "load": f"model = {rb_class.split(' with ')[0]}; model.load_state_dict(torch.load('{name}.pt'))"},
        "standard_autoattack": not nonstandard_reasons(evaluation, card["dataset"], config["dataset"]),
        "nonstandard_reasons": nonstandard_reasons(evaluation, card["dataset"], config["dataset"]),
        "eps": settings["eps"], "norm": settings["norm"], "n_examples": evaluation["examples"]["n"],
        "n_test": evaluation["examples"]["n_test"],
        "attacks": {"settings": settings, "examples": evaluation["examples"],
                    "results": {k: entry.get(k) for k in ("epoch", "clean_acc", "pgd10_acc", "pgd_acc", "aa_acc",
                                                          "worst_case_acc", "autoattack", "skipped_attacks",
                                                          "masking_flags", "masking_checks")},
                    "warnings": evaluation.get("warnings", []), "versions": evaluation.get("versions")},
        "seeds": {"training": config["seed"], "attack": settings.get("attack_seed"),
                  "example_selection": settings.get("example_seed")},
        "code": {"deat_version_at_training": _metrics(run_dir).get("environment", {}).get("deat"), **git_commit()},
        "training": {"command": train_command(config, run_dir), "config": config, "checkpoint": checkpoint,
                     "epoch": ckpt.get("epoch"), "selection": "best: highest validation PGD accuracy (held-out "
                     "training images); last: the final epoch"},
        "compute_cost": compute_cost(_metrics(run_dir), evaluation, checkpoint),
        "source": {"run_dir": str(run_dir), "eval_file": str(eval_file), "checkpoint_file": str(ckpt_path),
                   "checkpoint_sha256": file_sha256(ckpt_path), "weights_sha256": weights_sha256(ckpt),
                   "model_spec": ckpt["model_spec"]},
    }
    paths = {"weights": out_dir / f"{name}.pt", "card": out_dir / f"{name}.json",
             "protocol": out_dir / f"{name}.deat.json"}
    atomic_write(paths["weights"], lambda f: torch.save(weights, f))
    write_json(paths["card"], card)
    write_json(paths["protocol"], protocol)
    return paths


def _metrics(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", required=True, metavar="DIR", help="training run directory (best.pt, last.pt, "
                        "eval*.json, metrics.json)")
    parser.add_argument("--checkpoint", choices=CHECKPOINTS, default="best", help="which checkpoint (default: best)")
    parser.add_argument("--eval", metavar="FILE", help="the eval JSON to take accuracies from (default: the run's "
                        "only eval*.json)")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for NAME.pt, NAME.json, NAME.deat.json")
    parser.add_argument("--name", help="file name stem (default: METHOD_ARCH_<grid point>_CHECKPOINT)")
    parser.add_argument("--title", help="card 'name': the paper's title (default: a line naming the run)")
    parser.add_argument("--authors", default="", help="card 'authors' (default: empty)")
    parser.add_argument("--link", default="", help="card 'link': paper or code URL (default: empty)")
    parser.add_argument("--venue", default="N/A", help="card 'venue' (default: N/A)")
    return parser


def main(args: argparse.Namespace) -> int:
    paths = export_run(args.run_dir, args.out, args.checkpoint, args.eval, args.name, title=args.title,
                       authors=args.authors, link=args.link, venue=args.venue)
    card = json.loads(paths["card"].read_text())
    print(f"wrote {paths['weights']}, {paths['card']} and {paths['protocol']}: {card['architecture']}, clean "
          f"{card['clean_acc']} %, AutoAttack {card['autoattack_acc']} % at eps {card['eps']}")
    if not (card["link"] and card["authors"]):
        print("note: fill in the card's link, authors and venue (--link, --authors, --venue) before submitting")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
