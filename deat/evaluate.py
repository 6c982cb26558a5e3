"""Robustness of a training run's best.pt and last.pt: clean, PGD-10, PGD-k with restarts, AutoAttack -> eval.json.

    python -m deat evaluate --run-dir results/runs/example                 # every test image, the run's eps
    python -m deat evaluate --run-dir RUN --n-examples 200 --autoattack-attacks apgd-ce   # a quick look

Metrics per checkpoint, fractions in [0, 1] of the same fixed test examples:
- clean_acc: no attack.
- pgd10_acc: PGD-10 with one random start, step 2.5·ε/10 (2/255 at ε = 8/255): the paper's evaluation.
- pgd_acc: PGD-k with R random restarts (default k = 50, R = 10), step ε/4 (2/255 at 8/255): the PGD-10 step
  taken 5× as often, so the attack can cross the ball several times; Madry et al.'s 2.5·ε/k would shrink it to
  0.4/255 and make PGD-50 little stronger than PGD-10. An example is robust only if no restart breaks it.
- aa_acc: AutoAttack "standard" (Croce & Hein, ICML 2020: APGD-CE, APGD-T, FAB-T, Square) through the
  reference package pyautoattack 0.2.0 with its standard settings. Like AutoAttack itself we run one attack at a
  time on the examples that every earlier attack left correctly classified; `--autoattack-attacks` keeps a subset
  (standard's settings and order), for quick tests. eval.json records the accuracy after each attack.

Examples: the first n of torch.randperm(N_test) drawn with seed `--example-seed`, sorted, the rule train.py
uses for its per-epoch test subset (so with seed 0 and n = eval_examples both see the same images); eval.json
records the rule and a sha256 of the index list. Seeds: each PGD attack draws its random starts from a fresh
generator seeded with ATTACK_SEED, and AutoAttack gets seed=ATTACK_SEED, so every (checkpoint, attack) result
can be recomputed alone (on the same device) and a resumed evaluation equals an uninterrupted one.
ε = 0 admits no perturbation: every attack then returns the clean accuracy by definition, and AutoAttack is not
run (its Square attack would spend 5,000 queries per example finding nothing).
Models are evaluated in fp32 with BatchNorm in eval mode, whatever precision they were trained in.

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
import hashlib
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
from .attacks import NORMS, clean_accuracy, robust_accuracy
from .checkpoint import load_checkpoint, write_json
from .config import parse_number
from .data import load_dataset
from .models import build_model
from .train import environment, resolve_device

CHECKPOINTS = ("best", "last")
AUTOATTACK_STANDARD = ("apgd-ce", "apgd-t", "fab-t", "square")  # the order AutoAttack runs them in
METRICS = ("clean", "pgd10", "pgd", "aa")  # computed in this order, each saved before the next starts
PGD10_STEPS = 10
ATTACK_SEED = 0
_AUTOATTACK_NORMS = {"linf": "Linf", "l2": "L2"}


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


def autoattack_survivors(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: str, eps: float, norm: str,
                         batch_size: int, seed: int = ATTACK_SEED) -> torch.Tensor:
    """(N,) bool: which of x are still classified correctly after one AutoAttack attack, with standard's settings.

    Runs pyautoattack's own loop (its batching, per-batch reseeding and checks) restricted to `attack`. The
    attacks reseed torch's global generators; fork_rng restores them afterwards.
    """
    from pyautoattack import AutoAttack

    if attack not in AUTOATTACK_STANDARD:
        raise ValueError(f"attack must be one of {AUTOATTACK_STANDARD}, got {attack!r}")
    adversary = AutoAttack(model, eps=eps, norm=_AUTOATTACK_NORMS[norm], version="standard", seed=seed,
                           device=x.device)
    adversary.attacks_to_run = [attack]
    cuda_devices = [x.device.index or 0] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        _, predictions = adversary.run_standard_evaluation(x, y, batch_size=batch_size)
    return predictions == y


def sanity_warnings(label: str, entry: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    """Messages for every PGD accuracy that AutoAttack's exceeds on the same examples (none if AA was off)."""
    if entry["aa_acc"] is None:
        return []
    pgd_name = f"PGD-{settings['pgd_steps']}x{settings['pgd_restarts']}"
    return [f"{label}: AutoAttack accuracy {entry['aa_acc']:.2%} > {name} accuracy {entry[key]:.2%} on the same "
            f"{settings['n_examples']} examples; AutoAttack should be the stronger attack: suspect gradient "
            f"masking, a randomized model or an attack bug"
            for key, name in (("pgd10_acc", "PGD-10"), ("pgd_acc", pgd_name)) if entry["aa_acc"] > entry[key]]


# ---------------------------------------------------------------------------------------------- settings

def resolve_settings(args: argparse.Namespace, run_config: dict[str, Any], n_test: int) -> dict[str, Any]:
    """Every choice that changes a result, explicit (no nulls for defaults), validated."""
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
    n_examples = n_test if args.n_examples is None else args.n_examples
    select_examples(n_test, n_examples, args.example_seed)  # validates n_examples against the test set
    return {"dataset": run_config["dataset"], "eps": eps, "norm": norm, "n_examples": n_examples,
            "example_seed": args.example_seed, "pgd10_steps": PGD10_STEPS,
            "pgd10_step_size": 2.5 * eps / PGD10_STEPS if args.pgd10_step_size is None else args.pgd10_step_size,
            "pgd_steps": args.pgd_steps, "pgd_restarts": args.pgd_restarts,
            "pgd_step_size": eps / 4 if args.pgd_step_size is None else args.pgd_step_size,
            "autoattack": args.autoattack, "autoattack_attacks": [a for a in AUTOATTACK_STANDARD if a in requested],
            "attack_seed": ATTACK_SEED, "batch_size": args.batch_size, "precision": "fp32"}


def _examples_record(indices: torch.Tensor, n_test: int, seed: int) -> dict[str, Any]:
    return {"n": len(indices), "n_test": n_test,
            "selection": f"sorted(torch.randperm({n_test}, generator=torch.Generator().manual_seed({seed}))"
                         f"[:{len(indices)}]), test-set indices",
            "indices_sha256": indices_sha256(indices)}


def _same_json(a: Any, b: Any) -> bool:
    """Equality as stored in JSON (tuples become lists), so fresh values compare with ones read back."""
    return json.loads(json.dumps(a)) == json.loads(json.dumps(b))


# ------------------------------------------------------------------------------------------- evaluation

def _exact_fraction(accuracy: float, n: int) -> float:
    # attacks.py returns float32 means; k / n in float64 is the value they round (exact for n far below 2^23).
    return round(accuracy * n) / n


def _progress_line(label: str, what: str, acc: float, n_examples: int, seconds: float) -> str:
    rate = f"{n_examples / seconds:.1f}" if seconds > 0 else "—"
    return f"{label} {what}: acc {acc:.2%} on {n_examples} examples, {seconds:.1f} s, {rate} examples/s"


@torch.no_grad()
def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(N,) bool: whether model classifies each example correctly, batch by batch."""
    return torch.cat([model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]
                      for i in range(0, len(y), batch_size)])


def _run_autoattack(model, x, y, settings, entry, label, save, log) -> None:
    """AutoAttack's attacks one at a time on the still-robust examples; progress saved after each attack.

    entry["autoattack"] maps each finished attack to the accuracy after it and its seconds; entry["aa_robust"]
    holds the positions (in x) still robust, the state a resumed run starts from.
    """
    done = entry.setdefault("autoattack", {})
    if "aa_robust" not in entry:
        entry["aa_robust"] = _correct(model, x, y, settings["batch_size"]).nonzero().squeeze(1).tolist()
    for attack in settings["autoattack_attacks"]:
        if attack in done:
            log(f"{label} aa/{attack}: done earlier, acc {done[attack]['acc']:.2%}")
            continue
        attacked = torch.tensor(entry["aa_robust"], dtype=torch.long, device=x.device)
        started = time.perf_counter()
        robust = attacked
        if len(attacked) > 0 and settings["eps"] > 0:
            survivors = autoattack_survivors(model, x[attacked], y[attacked], attack, settings["eps"],
                                             settings["norm"], settings["batch_size"], settings["attack_seed"])
            robust = attacked[survivors]
        seconds = time.perf_counter() - started
        entry["aa_robust"] = robust.tolist()
        done[attack] = {"acc": len(robust) / len(y), "wall_time_s": seconds}
        save()
        log(_progress_line(label, f"aa/{attack}", len(robust) / len(y), len(attacked), seconds))


def evaluate_checkpoint(model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: dict[str, Any],
                        entry: dict[str, Any], label: str, save: Callable[[], None],
                        log: Callable[[str], None]) -> None:
    """Fill entry[f"{metric}_acc"] and entry["wall_time_s"][metric] for each metric not already there.

    `entry` is this checkpoint's part of the progress record; `save()` persists it after every finished step.
    """
    times = entry.setdefault("wall_time_s", {})
    n, batch_size, eps, norm = len(y), settings["batch_size"], settings["eps"], settings["norm"]
    for metric in METRICS:
        if metric in times:
            acc = entry[f"{metric}_acc"]
            log(f"{label} {metric}: done earlier" + ("" if acc is None else f", acc {acc:.2%}"))
            continue
        started = time.perf_counter()
        if metric == "clean":
            acc = _exact_fraction(clean_accuracy(model, x, y, batch_size), n)
        elif metric in ("pgd10", "pgd"):
            steps, step_size, restarts = ((PGD10_STEPS, settings["pgd10_step_size"], 1) if metric == "pgd10" else
                                          (settings["pgd_steps"], settings["pgd_step_size"], settings["pgd_restarts"]))
            generator = torch.Generator(device=x.device).manual_seed(settings["attack_seed"])
            acc = _exact_fraction(robust_accuracy(model, x, y, eps, step_size, steps, norm, restarts, batch_size,
                                                  generator), n)
        elif settings["autoattack"] == "none":
            entry["aa_acc"], times["aa"] = None, None
            save()
            continue
        else:
            _run_autoattack(model, x, y, settings, entry, label, save, log)
            acc = len(entry.pop("aa_robust")) / n
        seconds = time.perf_counter() - started
        if metric == "aa":  # the sum over attacks, some of which may have run before a resume
            seconds = sum(a["wall_time_s"] for a in entry["autoattack"].values())
        entry[f"{metric}_acc"], times[metric] = acc, seconds
        save()
        log(_progress_line(label, metric, acc, n, seconds))


# -------------------------------------------------------------------------------------------------- CLI

def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", required=True, metavar="DIR", help="training run directory holding best.pt "
                        "and last.pt")
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
    parser.add_argument("--batch-size", type=int, default=500, help="examples per attack batch (default: 500)")
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


def main(args: argparse.Namespace, lease: object | None = None) -> int:
    """Evaluate the run in args.run_dir; writes eval.json and, with args.mlflow, logs eval/<checkpoint>/<metric>.

    lease: the GPU lease taken by `python -m deat evaluate --gpu-lock-dir`, held by this reference until we return.
    """
    log = _print_now
    if re.fullmatch(r"auto|cpu|cuda(:\d+)?", args.device) is None:
        raise ValueError(f"device={args.device!r} is invalid; expected auto, cpu, cuda or cuda:N")
    run_dir = Path(args.run_dir)
    out = Path(args.out) if args.out else run_dir / "eval.json"
    progress_path = partial_path(out)
    device = resolve_device(args.device)

    paths = {name: run_dir / f"{name}.pt" for name in args.checkpoints}
    models = {name: load_run_model(path, device) for name, path in paths.items()}
    run_config = models[args.checkpoints[0]][1]["config"]
    data = load_dataset(run_config["dataset"], args.data_root or run_config["data_root"], run_config["val_size"])
    n_test = len(data.test_y)
    settings = resolve_settings(args, run_config, n_test)
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

    log(f"evaluating {run_dir} on {device}: {settings['n_examples']} of {n_test} {settings['dataset']} test "
        f"images, eps {settings['eps']:.5g} ({settings['eps'] * 255:.3g}/255) {settings['norm']}")

    warnings = []
    for name in args.checkpoints:
        model, ckpt = models[name]
        entry = progress["checkpoints"].setdefault(name, {"epoch": ckpt["epoch"]})
        evaluate_checkpoint(model, x, y, settings, entry, name, save, log)
        warnings += sanity_warnings(name, entry, settings)
    for warning in warnings:
        log(f"WARNING: {warning}")

    metric_keys = ("epoch", "clean_acc", "pgd10_acc", "pgd_acc", "aa_acc", "autoattack", "wall_time_s")
    checkpoints = {name: {k: progress["checkpoints"][name].get(k) for k in metric_keys} for name in args.checkpoints}
    result = {**identity, "run_dir": str(run_dir), "checkpoints": checkpoints, "warnings": warnings,
              "environment": environment(device), "versions": _versions(),
              "wall_time_s": sum(t for c in checkpoints.values() for t in c["wall_time_s"].values() if t)}
    if getattr(args, "mlflow", None):
        from .tracking import log_metrics

        log_metrics(args.mlflow, run_dir, {f"eval/{name}/{k}": c[k] for name, c in checkpoints.items()
                                           for k in ("clean_acc", "pgd10_acc", "pgd_acc", "aa_acc")})
    write_json(out, result)
    progress_path.unlink(missing_ok=True)
    log(f"wrote {out}: " + "; ".join(
        f"{name} clean {c['clean_acc']:.2%} PGD-10 {c['pgd10_acc']:.2%} PGD-{settings['pgd_steps']}x"
        f"{settings['pgd_restarts']} {c['pgd_acc']:.2%} AA " + ("—" if c["aa_acc"] is None else f"{c['aa_acc']:.2%}")
        for name, c in checkpoints.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
