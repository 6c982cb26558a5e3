"""Robustness of a training run's best.pt and last.pt: clean, PGD-10, PGD-k with restarts, AutoAttack -> eval.json.

    python -m deat evaluate --run-dir results/runs/example                 # every test image, the run's eps
    python -m deat evaluate --run-dir RUN --n-examples 200 --autoattack-attacks apgd-ce   # a quick look
    python -m deat evaluate --checkpoint model_best.pth --arch preact_resnet18 --format rice --dataset cifar10
    python -m deat evaluate --robustbench-model Carmon2019Unlabeled --dataset cifar10    # robustbench's loader

A checkpoint deat did not train (Rice et al.'s, RobustBench's, a bare deat state dict) gets the same attacks,
examples, masking checks and eval.json, under the checkpoint name "external", with `source` naming the file and
format; ε and norm default to RobustBench's (8/255 ℓ∞, 0.5 ℓ2). deat/checkpoint_formats.py maps and checks its keys.

Metrics per checkpoint, fractions in [0, 1] of the same fixed test examples. Every robust accuracy follows
AutoAttack's rule (Croce & Hein, ICML 2020): an example is robust only if it is classified correctly clean and at
every point an attack evaluates, i.e. every iterate of every restart, not just the last one.
- clean_acc: no attack.
- pgd10_acc: PGD-10 with one random start, step 2.5·ε/10 (2/255 at ε = 8/255): the paper's evaluation.
- pgd_acc: PGD-k with R random restarts (default k = 50, R = 10), step ε/4 (2/255 at 8/255): the PGD-10 step
  taken 5× as often, so the attack can cross the ball several times; Madry et al.'s 2.5·ε/k would shrink it to
  0.4/255 and make PGD-50 little stronger than PGD-10. An example is robust only if no restart breaks it.
- aa_acc: AutoAttack "standard" (APGD-CE, APGD-T, FAB-T, Square) through the reference package pyautoattack
  0.2.0 with its standard settings, except that the targeted attacks use min(9, K - 1) target classes on a
  K-class dataset (AutoAttack's 9 assume K >= 10). Like AutoAttack itself we run one attack at a time on the
  examples that every earlier attack left correctly classified; `--autoattack-attacks` keeps a subset (standard's
  settings and order). eval.json records the accuracy after each attack, and `settings["aa_label"]` names what
  ran: "AutoAttack (standard)" for all four attacks, else the attacks joined ("APGD-CE + APGD-T").
  An attack the dataset cannot support is skipped, never a crash after training: APGD-T needs K >= 4
  (`check_attacks` gives the reasons; the workflow can call it before any job starts); the reason goes to
  `checkpoints[c]["skipped_attacks"]` and a printed line.
- worst_case_acc: the per-example worst case over every attack run (clean, PGD-10, PGD-k×R, each AutoAttack
  attack): the fraction of examples that none of them broke. Never above any single accuracy.

Gradient masking: `masking_flags` looks for its signatures (thresholds and sources in its docstring); each one
found is a line in `checkpoints[c]["masking_flags"]`, printed as a WARNING and logged to MLflow as
eval/<checkpoint>/masking_flagged = 1 (0 when none).

Examples: the first n of torch.randperm(N_test) drawn with seed `--example-seed`, sorted, the rule train.py
uses for its per-epoch test subset (so with seed 0 and n = eval_examples both see the same images); eval.json
records the rule and a sha256 of the index list. Seeds: each PGD attack draws its random starts from a fresh
generator seeded with ATTACK_SEED, and AutoAttack gets seed=ATTACK_SEED, so every (checkpoint, attack) result
can be recomputed alone (on the same device) and a resumed evaluation equals an uninterrupted one.
ε = 0 admits no perturbation: every attack then returns the clean accuracy by definition, and AutoAttack is not
run (its Square attack would spend 5,000 queries per example finding nothing).
Models are evaluated in fp32 with BatchNorm in eval mode, whatever precision they were trained in.

Batch size and memory: `--batch-size` (default 500) examples go through each attack at once, AutoAttack's
attacks included. Memory grows linearly with it: a batch holds the model's activations for a forward and a
backward pass (PGD, APGD, Square: one input gradient; FAB-T: the gradients of two logits) plus a few copies of
the batch's images; docs/benchmarks.md has measured times per batch size.

Cost: a checkpoint is attacked once per content: its weights' sha256 (`weights_sha256`) keys the result, so when
best.pt and last.pt hold the same weights the second reuses the first's result (`reused_from`: "best"). Each
finished checkpoint result is also kept in eval_cache/<weights sha256>_<settings sha256>.json beside the output;
a rerun whose output file was deleted rebuilds it from there in seconds (`reused_from`: that file's name).
Progress lines: each attack's start and end with its time, and every `--log-interval-s` seconds (default 30) the
examples done with an ETA for that attack.

Resume: after each finished (checkpoint, attack) pair, and after each attack inside AutoAttack (with the mask of
still-robust examples), progress goes to a partial file beside the output (eval.json -> eval.partial.json); a
rerun with the same settings, examples and checkpoint files continues from there, and one with other settings
ignores it. The partial file is deleted once the output is written. An output written with the same settings and
checkpoints means nothing is left to do.

Sanity: AutoAttack should never leave more examples robust than PGD does on the same examples; if it does (a
sign of gradient masking, a randomized model or a bug) a WARNING line is printed and recorded in eval.json.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import platform
import re
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from . import __version__
from .attacks import NORMS
from .checkpoint import load_checkpoint, write_json
from .config import parse_number
from .data import load_dataset
from .models import build_model
from .attack_suite import ATTACK_SEED, PGD10_STEPS, ROBUST_RULE, evaluate_checkpoint
from .autoattack_runner import (AUTOATTACK_STANDARD, AUTOATTACK_TARGETS, aa_label, attacks_not_runnable,
                                autoattack_target_classes)
from .masking import sanity_warnings
from .checkpoint_formats import add_external_arguments, external_source
from .runtime import environment, resolve_device

CHECKPOINTS = ("best", "last")

# ------------------------------------------------------------------------------------------- building blocks

def load_run_model(checkpoint_path: str | Path, device: str | torch.device) -> tuple[nn.Module, dict[str, Any]]:
    """The model of a deat checkpoint, ready to attack: on `device`, eval mode, parameters frozen.

    Frozen parameters matter: attacks need gradients w.r.t. the input only, and on the CPU PGD runs about 5×
    faster when autograd need not track the weights. Returns (model, checkpoint dict).
    """
    ckpt = load_checkpoint(checkpoint_path, map_location="cpu")
    if "model_spec" not in ckpt:
        raise KeyError(f"checkpoint {checkpoint_path} has no 'model_spec' (architecture, classes, normalisation); "
                       f"it was not written by deat.train")
    spec = ckpt["model_spec"]
    model = build_model(spec["arch"], spec["num_classes"], in_channels=spec["in_channels"], mean=spec["mean"],
                        std=spec["std"], width=spec["width"])
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval().requires_grad_(False), ckpt


def select_examples(n_test: int, n_examples: int, seed: int) -> torch.Tensor:
    """Sorted indices of the first n_examples of a seeded permutation of range(n_test): the evaluation subset."""
    if not 1 <= n_examples <= n_test:
        raise ValueError(f"n_examples must be in [1, {n_test}] (the test set's size), got {n_examples}")
    return torch.randperm(n_test, generator=torch.Generator().manual_seed(seed))[:n_examples].sort().values


def indices_sha256(indices: torch.Tensor) -> str:
    """sha256 of the indices written in decimal, comma-separated ("3,17,42"): easy to recompute anywhere."""
    return hashlib.sha256(",".join(str(i) for i in indices.tolist()).encode()).hexdigest()


def partial_path(out: str | Path) -> Path:
    """Progress toward `out`, kept beside it: eval.json -> eval.partial.json. One per output file, so evaluations
    of one run under different settings (eval_<hash>.json) never share one."""
    out = Path(out)
    return out.with_name(f"{out.stem}.partial{out.suffix}")


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()



def weights_sha256(ckpt: dict[str, Any]) -> str:
    """sha256 of what a checkpoint's predictions depend on: its model_spec and every tensor of its state dict.

    Unlike the file's hash it ignores the epoch, optimizer state and metrics, so best.pt and last.pt that hold
    the same weights (training never improved after that epoch) hash alike.
    """
    digest = hashlib.sha256(json.dumps(ckpt["model_spec"], sort_keys=True).encode())
    for key in sorted(ckpt["model"]):
        tensor = ckpt["model"][key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def settings_sha256(settings: dict[str, Any], examples: dict[str, Any]) -> str:
    """sha256 of the settings and the example record as canonical JSON: together they fix every result."""
    canonical = json.dumps({"settings": settings, "examples": examples}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()

# ---------------------------------------------------------------------------------------------- settings

def resolve_settings(args: argparse.Namespace, run_config: dict[str, Any], n_test: int,
                     num_classes: int | None = None) -> dict[str, Any]:
    """Every choice that changes a result, explicit (no nulls for defaults), validated.

    num_classes (the model's) decides AutoAttack's target classes and which attacks are skipped; None keeps
    the standard 9 targets and skips nothing.
    """
    eps = run_config["eps"] if args.eps is None else args.eps
    norm = run_config["norm"] if args.norm is None else args.norm
    checks = [(eps >= 0, "eps", "a number >= 0"), (norm in NORMS, "norm", f"one of {NORMS}"),
              (args.pgd_steps >= 1, "pgd_steps", "an integer >= 1"),
              (args.pgd_restarts >= 1, "pgd_restarts", "an integer >= 1"),
              (args.batch_size >= 1, "batch_size", "an integer >= 1"),
              (args.pgd10_step_size is None or args.pgd10_step_size >= 0, "pgd10_step_size", "a number >= 0"),
              (args.pgd_step_size is None or args.pgd_step_size >= 0, "pgd_step_size", "a number >= 0"),
              (args.autoattack in ("standard", "none"), "autoattack", "standard or none")]
    for ok, key, expected in checks:
        if not ok:
            value = {"eps": eps, "norm": norm}.get(key, getattr(args, key, None))
            raise ValueError(f"{key}={value!r} is invalid; expected {expected}")
    requested = (args.autoattack_attacks or AUTOATTACK_STANDARD) if args.autoattack == "standard" else ()
    unknown = sorted(set(requested) - set(AUTOATTACK_STANDARD))
    if unknown:
        raise ValueError(f"autoattack_attacks: unknown attack(s) {unknown}; allowed: {AUTOATTACK_STANDARD}")
    requested = [a for a in AUTOATTACK_STANDARD if a in requested]
    skipped = attacks_not_runnable(requested, num_classes) if num_classes is not None else {}
    running = [a for a in requested if a not in skipped]
    n_examples = n_test if args.n_examples is None else args.n_examples
    select_examples(n_test, n_examples, args.example_seed)  # validates n_examples against the test set
    return {"dataset": run_config["dataset"], "eps": eps, "norm": norm, "n_examples": n_examples,
            "example_seed": args.example_seed, "pgd10_steps": PGD10_STEPS,
            "pgd10_step_size": 2.5 * eps / PGD10_STEPS if args.pgd10_step_size is None else args.pgd10_step_size,
            "pgd_steps": args.pgd_steps, "pgd_restarts": args.pgd_restarts,
            "pgd_step_size": eps / 4 if args.pgd_step_size is None else args.pgd_step_size,
            "autoattack": args.autoattack, "autoattack_attacks": running, "autoattack_skipped": skipped,
            "num_classes": num_classes,
            "autoattack_target_classes": autoattack_target_classes(num_classes or AUTOATTACK_TARGETS + 1),
            "aa_label": aa_label(running), "robust_rule": ROBUST_RULE,
            "attack_seed": ATTACK_SEED, "batch_size": args.batch_size, "precision": "fp32"}


def _examples_record(indices: torch.Tensor, n_test: int, seed: int) -> dict[str, Any]:
    return {"n": len(indices), "n_test": n_test,
            "selection": f"sorted(torch.randperm({n_test}, generator=torch.Generator().manual_seed({seed}))"
                         f"[:{len(indices)}]), test-set indices",
            "indices_sha256": indices_sha256(indices)}


def _same_json(a: Any, b: Any) -> bool:
    """Equality as stored in JSON (tuples become lists), so fresh values compare with ones read back."""
    return json.loads(json.dumps(a)) == json.loads(json.dumps(b))


# -------------------------------------------------------------------------------------------------- CLI

def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", metavar="DIR", help="training run directory holding best.pt and last.pt "
                        "(or evaluate another checkpoint: --checkpoint / --robustbench-model below)")
    parser.add_argument("--out", metavar="FILE", default=None, help="result file (default: RUN_DIR/eval.json)")
    parser.add_argument("--checkpoints", nargs="+", choices=CHECKPOINTS, default=list(CHECKPOINTS),
                        help="checkpoints to evaluate (default: best last)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto, cuda when "
                        "available)")
    parser.add_argument("--data-root", default=None, help="where the dataset is (default: the run's data_root)")
    parser.add_argument("--eps", type=parse_number, default=None, help="attack radius in [0, 1] pixels, '8/255' "
                        "accepted (default: the run's training eps)")
    parser.add_argument("--norm", choices=NORMS, default=None, help="linf | l2 (default: the run's norm)")
    parser.add_argument("--n-examples", type=int, default=None, help="test examples evaluated, a fixed subset "
                        "(default: all)")
    parser.add_argument("--example-seed", type=int, default=0, help="seed of the permutation whose first "
                        "n-examples are evaluated (default: 0)")
    parser.add_argument("--pgd10-step-size", type=parse_number, default=None, help="PGD-10 step size (default: "
                        "2.5*eps/10, 2/255 at eps 8/255)")
    parser.add_argument("--pgd-steps", type=int, default=50, help="steps k of the PGD-k attack (default: 50)")
    parser.add_argument("--pgd-restarts", type=int, default=10, help="random restarts of the PGD-k attack "
                        "(default: 10)")
    parser.add_argument("--pgd-step-size", type=parse_number, default=None, help="PGD-k step size (default: eps/4, "
                        "2/255 at eps 8/255)")
    parser.add_argument("--autoattack", choices=("standard", "none"), default="standard",
                        help="AutoAttack version, or none to skip it (default: standard)")
    parser.add_argument("--autoattack-attacks", nargs="+", choices=AUTOATTACK_STANDARD, default=None,
                        help="run only these of standard's attacks, with its settings, in its order (default: "
                        "all four)")
    parser.add_argument("--batch-size", type=int, default=500, help="examples per attack batch, for PGD and for "
                        "every AutoAttack attack; memory grows linearly with it (default: 500)")
    parser.add_argument("--log-interval-s", type=float, default=30.0, help="seconds between progress lines inside "
                        "an attack (default: 30)")
    add_external_arguments(parser)
    return parser


def _versions() -> dict[str, str]:
    import pyautoattack

    return {"torch": str(torch.__version__), "autoattack": pyautoattack.__version__, "deat": __version__,
            "python": platform.python_version()}


def _print_now(line: str) -> None:
    print(line, flush=True)


def _read_json(path: Path) -> Any:
    """The file's JSON, or None where it is missing or unreadable (a file cut short by a crash)."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _load_partial(path: Path, identity: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any] | None:
    saved = _read_json(path)
    if saved is None:
        return None
    differ = sorted(k for k in identity if not _same_json(saved.get(k), identity[k]))
    if differ:
        log(f"{path} was written for other {', '.join(differ)}; ignoring it and starting over")
        return None
    log(f"resuming from {path}")
    return saved


# What a checkpoint's result holds in eval.json; robust_positions stay in the partial file and the cache.
ENTRY_KEYS = ("epoch", "clean_acc", "pgd10_acc", "pgd_acc", "aa_acc", "worst_case_acc", "autoattack",
              "skipped_attacks", "masking_flags", "masking_checks", "wall_time_s", "weights_sha256", "reused_from")


def cache_path(out: Path, weights_sha: str, settings_sha: str) -> Path:
    """Where a finished checkpoint result is kept: eval_cache/ beside the output, one file per (weights, settings)."""
    return out.parent / "eval_cache" / f"{weights_sha[:16]}_{settings_sha[:16]}.json"


def _read_cache(path: Path, identity: dict[str, Any], weights_sha: str) -> dict[str, Any] | None:
    cached = _read_json(path)
    if (cached is None or cached.get("weights_sha256") != weights_sha
            or not all(_same_json(cached.get(k), identity[k]) for k in ("settings", "examples"))):
        return None
    return cached["entry"]


def _finished(entry: dict[str, Any] | None) -> bool:
    return entry is not None and "masking_flags" in entry  # set last by evaluate_checkpoint


def main(args: argparse.Namespace, lease: object | None = None) -> int:
    """Evaluate the run in args.run_dir; writes eval.json and, with args.mlflow, logs eval/<checkpoint>/<metric>.

    lease: the GPU lease taken by `python -m deat evaluate --gpu-lock-dir`, held by this reference until we return.
    """
    log = _print_now
    if re.fullmatch(r"auto|cpu|cuda(:\d+)?", args.device) is None:
        raise ValueError(f"device={args.device!r} is invalid; expected auto, cpu, cuda or cuda:N")
    interval_s = getattr(args, "log_interval_s", 30.0)
    if not interval_s > 0:
        raise ValueError(f"log_interval_s={interval_s!r} is invalid; expected a number > 0")
    device = resolve_device(args.device)
    run_dir = Path(args.run_dir) if args.run_dir and not (args.checkpoint or args.robustbench_model) else None
    if run_dir is None:  # a checkpoint deat did not train: deat.checkpoint_formats maps and checks it
        paths, models, default_out = external_source(args, device)
        args.checkpoints = list(paths)
    else:
        paths = {name: run_dir / f"{name}.pt" for name in args.checkpoints}
        models = {name: load_run_model(path, device) for name, path in paths.items()}
        default_out = run_dir / "eval.json"
    out = Path(args.out) if args.out else default_out
    progress_path = partial_path(out)
    first_ckpt = models[args.checkpoints[0]][1]
    run_config = first_ckpt["config"]
    data = load_dataset(run_config["dataset"], args.data_root or run_config["data_root"], run_config["val_size"])
    n_test = len(data.test_y)
    settings = resolve_settings(args, run_config, n_test, first_ckpt["model_spec"]["num_classes"])
    indices = select_examples(n_test, settings["n_examples"], settings["example_seed"])
    x = (data.test_x[indices].float() / 255).to(device)
    y = data.test_y[indices].to(device)
    identity = {"settings": settings, "examples": _examples_record(indices, n_test, settings["example_seed"]),
                "checkpoint_sha256": {name: file_sha256(path) for name, path in paths.items()}}

    previous = _read_json(out)
    if previous is not None and all(_same_json(previous.get(k), v) for k, v in identity.items()):
        log(f"{out} is up to date (same settings, examples and checkpoints): nothing to do")
        return 0
    progress = _load_partial(progress_path, identity, log) or {**identity, "checkpoints": {}}

    def save() -> None:
        write_json(progress_path, progress)

    log(f"evaluating {run_dir or paths[args.checkpoints[0]]} on {device}: {settings['n_examples']} of {n_test} {settings['dataset']} test "
        f"images, eps {settings['eps']:.5g} ({settings['eps'] * 255:.3g}/255) {settings['norm']}, batch "
        f"{settings['batch_size']}, AutoAttack: {settings['aa_label'] or 'none'}")

    settings_sha = settings_sha256(settings, identity["examples"])
    warnings, done_by_weights = [], {}
    for name in args.checkpoints:
        model, ckpt = models[name]
        weights_sha = weights_sha256(ckpt)
        cached = cache_path(out, weights_sha, settings_sha)
        entry = progress["checkpoints"].get(name)
        if not _finished(entry):  # a finished result for the same weights and settings is reused, not redone
            twin, from_cache = done_by_weights.get(weights_sha), _read_cache(cached, identity, weights_sha)
            if twin is not None:
                entry = {**copy.deepcopy(progress["checkpoints"][twin]), "reused_from": twin}
            elif from_cache is not None:
                entry = {**from_cache, "reused_from": f"eval_cache/{cached.name}"}
            if _finished(entry):
                entry["epoch"] = ckpt["epoch"]
                progress["checkpoints"][name] = entry
                log(f"{name}: same weights and settings as {entry['reused_from']}: result reused, nothing attacked")
                save()
        if not _finished(entry):
            entry = progress["checkpoints"].setdefault(name, {"epoch": ckpt["epoch"]})
            entry.update(weights_sha256=weights_sha, reused_from=None)
            evaluate_checkpoint(model, x, y, settings, entry, name, save, log, interval_s)
            write_json(cached, {"weights_sha256": weights_sha, "settings": settings,
                                "examples": identity["examples"], "entry": entry})
        done_by_weights.setdefault(weights_sha, name)
        warnings += sanity_warnings(name, entry, settings)
        for flag in entry["masking_flags"]:
            log(f"WARNING: {name}: possible gradient masking: {flag}")
    for warning in warnings:
        log(f"WARNING: {warning}")

    checkpoints = {name: {k: progress["checkpoints"][name].get(k) for k in ENTRY_KEYS} for name in args.checkpoints}
    result = {**identity, "run_dir": run_dir and str(run_dir), "checkpoints": checkpoints, "warnings": warnings,
              **({"source": first_ckpt["source"]} if "source" in first_ckpt else {}),
              "environment": environment(device), "versions": _versions(),
              "wall_time_s": sum(t for c in checkpoints.values() if not c["reused_from"]
                                 for t in c["wall_time_s"].values() if t)}
    if getattr(args, "mlflow", None):
        from .tracking import log_metrics

        values = {f"eval/{name}/{k}": c[k] for name, c in checkpoints.items()
                  for k in ("clean_acc", "pgd10_acc", "pgd_acc", "aa_acc", "worst_case_acc")}
        values.update({f"eval/{name}/masking_flagged": float(bool(c["masking_flags"]))
                       for name, c in checkpoints.items()})
        log_metrics(args.mlflow, run_dir, values, setup=getattr(args, "mlflow_setup", None))
    write_json(out, result)
    progress_path.unlink(missing_ok=True)
    aa = settings["aa_label"] or "AA"
    log(f"wrote {out}: " + "; ".join(
        f"{name} clean {c['clean_acc']:.2%} PGD-10 {c['pgd10_acc']:.2%} PGD-{settings['pgd_steps']}x"
        f"{settings['pgd_restarts']} {c['pgd_acc']:.2%} {aa} "
        + ("—" if c["aa_acc"] is None else f"{c['aa_acc']:.2%}") + f" worst case {c['worst_case_acc']:.2%}"
        for name, c in checkpoints.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
