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
records the rule and a sha256 of the index list.

Blocks and seeds: the n examples are cut into fixed blocks of `--batch-size` consecutive examples, and every
attack (PGD-10, PGD-k×R, each AutoAttack attack) runs block by block on that block's survivors only, never
packing survivors of several blocks into one batch. Block b's attacks draw their random starts from fresh
generators seeded with deat.shards.block_seed(ATTACK_SEED, b) (each PGD attack a torch.Generator, AutoAttack its
seed), and block 0's seed is ATTACK_SEED itself. So every (checkpoint, attack, block) result can be recomputed
alone (on the same device), a resumed evaluation equals an uninterrupted one, and a sharded one equals an
unsharded one. With n <= batch size there is one block, seeded as every evaluation was before blocks existed:
the result is bit for bit the earlier one. With n > batch size the random starts differ from those of deat
versions before blocks (which seeded the whole evaluation once and packed survivors across batches), and the
settings say so: `settings["seeding"]` is recorded then only, so one-block evaluations keep their settings and
their results stay up to date.

Sharding (`--shard I/N`, `--merge`; rules in deat.shards): shard I of N attacks the whole blocks
[⌊(I-1)·B/N⌋, ⌊I·B/N⌋) of the B blocks and writes a shard file (per checkpoint and metric, the positions each
attack left robust), resumable through its own partial file; `--merge SHARD_FILE...` joins the shards of one
evaluation, attacking nothing, into the eval.json an unsharded evaluation writes, with the accuracies, worst
case and masking checks computed on the merged per-example outcomes. The shard count is in neither the settings
nor the file name: the merged file differs from an unsharded one only in wall times (summed over the shards) and
`environment` (the first shard's, with each shard's under "shards").

ε = 0 admits no perturbation: every attack then returns the clean accuracy by definition, and AutoAttack is not
run (its Square attack would spend 5,000 queries per example finding nothing).
Models are evaluated in fp32 with BatchNorm in eval mode, whatever precision they were trained in; no reduced
precision is offered for evaluation. On CUDA, `--channels-last` and `--cudnn-benchmark` pick faster kernels for the
same fp32 convolutions (off by default; docs/benchmarks.md): like the device, they are recorded in the environment,
not in the settings, since they change results no more than GPU kernels' own nondeterminism does.

Batch size and memory: `--batch-size` (default 500) examples go through each attack at once, AutoAttack's
attacks included; it also fixes the blocks above, so it is one of the settings. Memory grows linearly with it: a
batch holds the model's activations for a forward and a backward pass (PGD, APGD, Square: one input gradient;
FAB-T: the gradients of two logits) plus a few copies of the batch's images; docs/benchmarks.md has measured
times per batch size.

Cost: a checkpoint is attacked once per content: its weights' sha256 (`weights_sha256`) keys the result, so when
best.pt and last.pt hold the same weights the second reuses the first's result (`reused_from`: "best"). Each
finished checkpoint result is also kept in eval_cache/<weights sha256>_<settings sha256>.json beside the output;
a rerun whose output file was deleted rebuilds it from there in seconds (`reused_from`: that file's name).
Progress lines: each attack's start and end with its time ("best pgd10: acc 43.00% of 100 examples (58 attacked)":
the accuracy is over all examples, the attack ran on those still robust before it), and every `--log-interval-s`
seconds (default 30) the examples done with an ETA for that attack.

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
import json
import platform
import re
import sys
import time
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
from .attack_suite import ATTACK_SEED, PGD10_STEPS, ROBUST_RULE, evaluate_checkpoint, summarize
from .autoattack_runner import (AUTOATTACK_STANDARD, AUTOATTACK_TARGETS, aa_label, attacks_not_runnable,
                                autoattack_target_classes)
from .eval_files import (cache_path, file_sha256, indices_sha256, load_partial, partial_path, read_cache,
                         read_json, same_json, settings_sha256, weights_sha256)
from .flatness import GAMMAS
from .generalization import DIRECTIONS, KEYS as GENERALIZATION_KEYS, generalization_entry, training_subset
from .masking import sanity_warnings
from .checkpoint_formats import add_external_arguments, external_source
from .runtime import environment, resolve_device
from .shards import (check_coverage, globalize, merge_entries, n_blocks, parse_shard, shard_examples,
                     shard_path)

CHECKPOINTS = ("best", "last")
EMA_CHECKPOINTS = ("best_ema", "last_ema")  # a run with ema_tau > 0 keeps these beside best.pt and last.pt
SEEDING = "per block of batch_size examples: block b seeded with deat.shards.block_seed(attack_seed, b)"

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
    if getattr(args, "flatness", False) and not getattr(args, "train_examples", 0):
        raise ValueError("flatness: needs train_examples (the training images its robust loss is measured on)")
    return {"dataset": run_config["dataset"], "eps": eps, "norm": norm, "n_examples": n_examples,
            "example_seed": args.example_seed, "pgd10_steps": PGD10_STEPS,
            "pgd10_step_size": 2.5 * eps / PGD10_STEPS if args.pgd10_step_size is None else args.pgd10_step_size,
            "pgd_steps": args.pgd_steps, "pgd_restarts": args.pgd_restarts,
            "pgd_step_size": eps / 4 if args.pgd_step_size is None else args.pgd_step_size,
            "autoattack": args.autoattack, "autoattack_attacks": running, "autoattack_skipped": skipped,
            "num_classes": num_classes,
            "autoattack_target_classes": autoattack_target_classes(num_classes or AUTOATTACK_TARGETS + 1),
            "aa_label": aa_label(running), "robust_rule": ROBUST_RULE,
            "attack_seed": ATTACK_SEED, "batch_size": args.batch_size, "precision": "fp32",
            # Only where it changes something: one block is seeded as every evaluation was before blocks existed.
            **({"seeding": SEEDING} if n_examples > args.batch_size else {}),
            # Issue 22's robust gap and flatness, only when asked (so that other evaluations keep their settings).
            **({"train_examples": args.train_examples} if getattr(args, "train_examples", 0) else {}),
            **({"flatness": {"gammas": list(GAMMAS), "directions": DIRECTIONS, "loss": "CE at PGD-10, BN eval"}}
               if getattr(args, "flatness", False) else {})}


def _examples_record(indices: torch.Tensor, n_test: int, seed: int) -> dict[str, Any]:
    return {"n": len(indices), "n_test": n_test,
            "selection": f"sorted(torch.randperm({n_test}, generator=torch.Generator().manual_seed({seed}))"
                         f"[:{len(indices)}]), test-set indices",
            "indices_sha256": indices_sha256(indices)}




# -------------------------------------------------------------------------------------------------- CLI

def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", metavar="DIR", help="training run directory holding best.pt and last.pt "
                        "(or evaluate another checkpoint: --checkpoint / --robustbench-model below)")
    parser.add_argument("--out", metavar="FILE", default=None, help="result file (default: RUN_DIR/eval.json)")
    parser.add_argument("--checkpoints", nargs="+", choices=CHECKPOINTS + EMA_CHECKPOINTS, default=None,
                        help="checkpoints to evaluate (default: best last, and best_ema last_ema where the run "
                        "kept a weight average)")
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
    parser.add_argument("--train-examples", type=int, default=0, help="also PGD-10 on this many images of the run's "
                        "training split, for the robust gap measured alike on both sides (default: 0, off)")
    parser.add_argument("--flatness", action=argparse.BooleanOptionalAction, default=False, help="also the "
                        "flatness curves of the robust loss on those training images (deat.flatness; default: off)")
    group = parser.add_argument_group("sharding (the result does not depend on it; see deat.shards)")
    group.add_argument("--shard", metavar="I/N", default=None, help="evaluate only shard I of N (whole blocks of "
                       "batch-size examples) and write a shard file (default --out: RUN_DIR/eval.shard_START-STOP"
                       ".json); resumable like a whole evaluation")
    group.add_argument("--merge", nargs="+", metavar="SHARD_FILE", default=None, help="join these shard files "
                       "(every shard of the same settings, examples and checkpoints) into --out, attacking nothing")
    group = parser.add_argument_group("speed on CUDA (ignored on other devices; never part of the settings)")
    group.add_argument("--channels-last", action="store_true", help="model and images in channels_last memory "
                       "format")
    group.add_argument("--cudnn-benchmark", action="store_true", help="let cuDNN time its convolution algorithms "
                       "for each new input shape")
    add_external_arguments(parser)
    return parser


def _versions() -> dict[str, str]:
    import pyautoattack

    return {"torch": str(torch.__version__), "autoattack": pyautoattack.__version__, "deat": __version__,
            "python": platform.python_version()}


def _print_now(line: str) -> None:
    print(line, flush=True)






# What a checkpoint's result holds in eval.json; robust_positions stay in the partial file and the cache.
ENTRY_KEYS = ("epoch", "clean_acc", "pgd10_acc", "pgd_acc", "aa_acc", "worst_case_acc", "autoattack",
              "skipped_attacks", "masking_flags", "masking_checks", "wall_time_s", "weights_sha256", "reused_from")






def _finished(entry: dict[str, Any] | None, needs_gap: bool = False) -> bool:
    """Whether a checkpoint's entry is complete: its attacks (masking_flags is set last by evaluate_checkpoint) and,
    where this job measures it (train_examples asked, and the whole evaluation or its first shard), the robust gap."""
    return entry is not None and "masking_flags" in entry and (not needs_gap or "train_pgd10_acc" in entry)


def _speed_options(args: argparse.Namespace, device: torch.device, models: dict, x: torch.Tensor,
                   log: Callable[[str], None]) -> tuple[torch.Tensor, dict[str, bool]]:
    """Apply --channels-last and --cudnn-benchmark on CUDA; elsewhere say they are ignored. They choose among
    kernels computing the same fp32 convolutions, so they change results only as GPU kernels' own
    nondeterminism does: they are recorded in the environment, never in the settings (docs/design.md)."""
    asked = {"channels_last": bool(getattr(args, "channels_last", False)),
             "cudnn_benchmark": bool(getattr(args, "cudnn_benchmark", False))}
    if not any(asked.values()):
        return x, {}
    if device.type != "cuda":
        log(f"{', '.join(k for k, v in asked.items() if v)}: CUDA only; on {device} the plain path runs")
        return x, {k: False for k in asked}
    torch.backends.cudnn.benchmark = asked["cudnn_benchmark"]
    if asked["channels_last"]:
        for model, _ in models.values():
            model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    return x, asked


def _merge_shards(files: list[str], identity: dict[str, Any], names: list[str], n: int,
                  batch_size: int) -> tuple[dict[str, dict[str, Any]], dict[str, Any], dict[str, str]]:
    """({checkpoint: merged entry}, environment, versions) from shard files of this evaluation (any order).

    Each file must be a shard file of the same settings, examples and checkpoint files, and together they must
    cover every example along block edges; ValueError naming the file otherwise.
    """
    shards = []
    for name in files:
        data = read_json(Path(name))
        if data is None:
            raise ValueError(f"shard file {name} is missing or unreadable: evaluate its shard (--shard I/N) first")
        if "shard" not in data:
            raise ValueError(f"{name} is no shard file (it has no 'shard' record)")
        differ = sorted(k for k in identity if not same_json(data.get(k), identity[k]))
        if differ:
            raise ValueError(f"shard file {name} was written for other {', '.join(differ)} than this merge; pass "
                             f"the flags its shard was evaluated with, or evaluate it again")
        missing = sorted(set(names) - set(data["checkpoints"]))
        if missing:
            raise ValueError(f"shard file {name} has no result for checkpoint(s) {missing}")
        shards.append((tuple(data["shard"]["examples"]), name, data))
    shards.sort(key=lambda s: s[0])
    check_coverage([s[0] for s in shards], n, batch_size, [s[1] for s in shards])
    versions = {json.dumps(s[2]["versions"], sort_keys=True) for s in shards}
    if len(versions) > 1:
        raise ValueError(f"the shards were attacked with different software versions: {sorted(versions)}; "
                         f"evaluate them again with one")
    entries = {c: merge_entries([s[2]["checkpoints"][c] for s in shards]) for c in names}
    for c in names:  # the robust gap and flatness are measured once per checkpoint, by the shard at example 0
        entries[c].update({k: shards[0][2]["checkpoints"][c][k] for k in GENERALIZATION_KEYS
                           if k in shards[0][2]["checkpoints"][c]})
    env = {**shards[0][2]["environment"],
           "shards": [{"examples": list(s[0]), "environment": s[2]["environment"], "wall_time_s": s[2]["wall_time_s"]}
                      for s in shards]}
    return entries, env, shards[0][2]["versions"]


def main(args: argparse.Namespace, lease: object | None = None) -> int:
    """Evaluate the run in args.run_dir; writes eval.json and, with args.mlflow, logs eval/<checkpoint>/<metric>.

    With args.shard ("I/N") only that shard's examples are attacked and a shard file is written; with args.merge
    (shard files) nothing is attacked and the shards become the same eval.json an unsharded evaluation writes.
    lease: the GPU lease taken by `python -m deat evaluate --gpu-lock-dir`, held by this reference until we return.
    """
    log = _print_now
    if re.fullmatch(r"auto|cpu|cuda(:\d+)?", args.device) is None:
        raise ValueError(f"device={args.device!r} is invalid; expected auto, cpu, cuda or cuda:N")
    interval_s = getattr(args, "log_interval_s", 30.0)
    if not interval_s > 0:
        raise ValueError(f"log_interval_s={interval_s!r} is invalid; expected a number > 0")
    shard, merge = getattr(args, "shard", None), getattr(args, "merge", None)
    if shard and merge:
        raise ValueError("--shard and --merge exclude each other: a shard job attacks, a merge job joins shard files")
    shard = parse_shard(shard) if shard else None
    if shard and getattr(args, "mlflow", None):
        log("--mlflow: a shard logs nothing to MLflow; the merge of all shards does")
    device = torch.device("cpu") if merge else resolve_device(args.device)  # a merge computes nothing
    run_dir = Path(args.run_dir) if args.run_dir and not (args.checkpoint or args.robustbench_model) else None
    if run_dir is None:  # a checkpoint deat did not train: deat.checkpoint_formats maps and checks it
        paths, models, default_out = external_source(args, device)
        args.checkpoints = list(paths)
    else:
        if not args.checkpoints:  # every checkpoint the run kept: the averaged model's too when it has one
            args.checkpoints = list(CHECKPOINTS) + [c for c in EMA_CHECKPOINTS if (run_dir / f"{c}.pt").is_file()]
        paths = {name: run_dir / f"{name}.pt" for name in args.checkpoints}
        models = {name: load_run_model(path, device) for name, path in paths.items()}
        default_out = run_dir / "eval.json"
    first_ckpt = models[args.checkpoints[0]][1]
    run_config = first_ckpt["config"]
    data = load_dataset(run_config["dataset"], args.data_root or run_config["data_root"], run_config["val_size"])
    n_test = len(data.test_y)
    settings = resolve_settings(args, run_config, n_test, first_ckpt["model_spec"]["num_classes"])
    n, batch_size = settings["n_examples"], settings["batch_size"]
    indices = select_examples(n_test, n, settings["example_seed"])
    identity = {"settings": settings, "examples": _examples_record(indices, n_test, settings["example_seed"]),
                "checkpoint_sha256": {name: file_sha256(path) for name, path in paths.items()}}
    start, stop = shard_examples(n, batch_size, *shard) if shard else (0, n)
    out = Path(args.out) if args.out else default_out
    if shard:
        identity["shard"] = {"examples": [start, stop], "blocks": [start // batch_size, n_blocks(stop, batch_size)]}
        out = Path(args.out) if args.out else shard_path(out, start, stop)
    progress_path = partial_path(out)

    previous = read_json(out)
    if previous is not None and all(same_json(previous.get(k), v) for k, v in identity.items()):
        log(f"{out} is up to date (same settings, examples and checkpoints): nothing to do")
        return 0
    settings_sha = settings_sha256(settings, identity["examples"])
    if merge:
        entries, env, versions = _merge_shards(merge, identity, args.checkpoints, n, batch_size)
        log(f"merging {len(merge)} shard file(s) of {run_dir}: {n} {settings['dataset']} test images")
        for name, entry in entries.items():
            summarize(entry, settings)
            write_json(cache_path(out, entry["weights_sha256"], settings_sha),
                       {"weights_sha256": entry["weights_sha256"], "settings": settings,
                        "examples": identity["examples"], "entry": entry})
        return _write_result(args, identity, run_dir, out, entries, env, versions, log, models)

    x = (data.test_x[indices[start:stop]].float() / 255).to(device)
    y = data.test_y[indices[start:stop]].to(device)
    x, speed = _speed_options(args, device, models, x, log)
    progress = load_partial(progress_path, identity, log) or {**identity, "checkpoints": {}}

    def save() -> None:
        write_json(progress_path, progress)

    part = f", examples [{start}, {stop}) (shard {shard[0]}/{shard[1]})" if shard else ""
    log(f"evaluating {run_dir or paths[args.checkpoints[0]]} on {device}: {n} of {n_test} {settings['dataset']} test images{part}, eps "
        f"{settings['eps']:.5g} ({settings['eps'] * 255:.3g}/255) {settings['norm']}, batch {batch_size}, "
        f"AutoAttack: {settings['aa_label'] or 'none'}")

    done_by_weights = {}
    needs_gap = bool(settings.get("train_examples")) and start == 0
    for name in args.checkpoints:
        model, ckpt = models[name]
        weights_sha = weights_sha256(ckpt)
        cached = cache_path(out, weights_sha, settings_sha, (start, stop) if shard else None)
        entry = progress["checkpoints"].get(name)
        if not _finished(entry, needs_gap):  # a finished result for the same weights and settings is reused
            twin, from_cache = done_by_weights.get(weights_sha), read_cache(cached, identity, weights_sha)
            if twin is not None:
                entry = {**copy.deepcopy(progress["checkpoints"][twin]), "reused_from": twin}
            elif from_cache is not None:
                entry = {**from_cache, "reused_from": f"eval_cache/{cached.name}"}
            if _finished(entry, needs_gap):
                entry["epoch"] = ckpt["epoch"]
                progress["checkpoints"][name] = entry
                log(f"{name}: same weights and settings as {entry['reused_from']}: result reused, nothing attacked")
                save()
        if not _finished(entry, needs_gap):
            entry = progress["checkpoints"].setdefault(name, {"epoch": ckpt["epoch"]})
            entry.setdefault("weights_sha256", weights_sha)
            entry.setdefault("reused_from", None)
            if "masking_flags" not in entry:
                evaluate_checkpoint(model, x, y, settings, entry, name, save, log, interval_s, start // batch_size)
            if needs_gap and "train_pgd10_acc" not in entry:
                entry.update(_generalization(model, data, settings, entry, run_config, log, name))
                save()
            write_json(cached, {"weights_sha256": weights_sha, "settings": settings,
                                "examples": identity["examples"], "entry": entry})
        done_by_weights.setdefault(weights_sha, name)

    env = {**environment(device), **({"speed_options": speed} if speed else {})}
    entries = {name: progress["checkpoints"][name] for name in args.checkpoints}
    if shard:  # per-example outcomes, at positions of the whole subset; accuracies over the shard's examples
        result = {**identity, "run_dir": str(run_dir),
                  "checkpoints": {name: globalize(e, start) for name, e in entries.items()},
                  "environment": env, "versions": _versions(), "wall_time_s": _attack_seconds(entries)}
        write_json(out, result)
        progress_path.unlink(missing_ok=True)
        log(f"wrote shard file {out}: examples [{start}, {stop}) of {n}: " + _summary_line(settings, entries))
        return 0
    return _write_result(args, identity, run_dir, out, entries, env, _versions(), log, models)


def _generalization(model, data, settings: dict[str, Any], entry: dict[str, Any], run_config: dict[str, Any],
                    log: Callable[[str], None], name: str) -> dict[str, Any]:
    """deat.generalization's robust gap (and flatness) of one checkpoint on the run's own training images."""
    device = next(model.parameters()).device
    index = training_subset(len(data.train_y), settings["train_examples"], settings["example_seed"])
    x = (data.train_x[index].float() / 255).to(device)
    y = data.train_y[index].to(device)
    started = time.perf_counter()
    found = generalization_entry(model, x, y, settings, entry["pgd10_acc"], "flatness" in settings)
    found["generalization_wall_time_s"] = time.perf_counter() - started
    log(f"{name} train PGD-10: acc {found['train_pgd10_acc']:.2%} of {len(y)} training images; robust gap "
        f"{found['robust_gap_pgd10']:+.2%}" + (" (flatness curves measured)" if found["flatness"] else ""))
    return found


def _attack_seconds(entries: dict[str, dict[str, Any]]) -> float:
    """Seconds spent attacking: every metric of every checkpoint not reused from another's result."""
    return sum(t for c in entries.values() if not c["reused_from"] for t in c["wall_time_s"].values() if t)


def _summary_line(settings: dict[str, Any], entries: dict[str, dict[str, Any]]) -> str:
    aa = settings["aa_label"] or "AA"
    return "; ".join(
        f"{name} clean {c['clean_acc']:.2%} PGD-10 {c['pgd10_acc']:.2%} PGD-{settings['pgd_steps']}x"
        f"{settings['pgd_restarts']} {c['pgd_acc']:.2%} {aa} "
        + ("—" if c["aa_acc"] is None else f"{c['aa_acc']:.2%}") + f" worst case {c['worst_case_acc']:.2%}"
        for name, c in entries.items())


def _write_result(args: argparse.Namespace, identity: dict[str, Any], run_dir: Path, out: Path,
                  entries: dict[str, dict[str, Any]], env: dict[str, Any], versions: dict[str, str],
                  log: Callable[[str], None], models: dict | None = None) -> int:
    """eval.json from finished checkpoint entries (an evaluation's or a merge's): warnings, MLflow, the file."""
    source = next(iter(models.values()))[1].get("source") if models else None  # an external checkpoint
    settings, warnings = identity["settings"], []
    for name, entry in entries.items():
        warnings += sanity_warnings(name, entry, settings)
        for flag in entry["masking_flags"]:
            log(f"WARNING: {name}: possible gradient masking: {flag}")
    for warning in warnings:
        log(f"WARNING: {warning}")
    # The robust gap and flatness only where the evaluation measured them (older files keep their keys).
    checkpoints = {name: {**{k: entry.get(k) for k in ENTRY_KEYS},
                          **{k: entry[k] for k in GENERALIZATION_KEYS if k in entry}} for name, entry in entries.items()}
    result = {**identity, "run_dir": run_dir and str(run_dir),
              **({"source": source} if source else {}), "checkpoints": checkpoints, "warnings": warnings,
              "environment": env, "versions": versions, "wall_time_s": _attack_seconds(checkpoints)}
    if getattr(args, "mlflow", None):
        from .tracking import log_metrics

        values = {f"eval/{name}/{k}": c[k] for name, c in checkpoints.items()
                  for k in ("clean_acc", "pgd10_acc", "pgd_acc", "aa_acc", "worst_case_acc", "train_pgd10_acc",
                            "robust_gap_pgd10") if k in c}
        values.update({f"eval/{name}/masking_flagged": float(bool(c["masking_flags"]))
                       for name, c in checkpoints.items()})
        log_metrics(args.mlflow, run_dir, values, setup=getattr(args, "mlflow_setup", None))
    write_json(out, result)
    partial_path(out).unlink(missing_ok=True)
    log(f"wrote {out}: " + _summary_line(settings, checkpoints))
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
