"""bf16 fidelity of every training attack, and what each precision costs: one JSON line per (objective, precision).

    PYTHONPATH=. python3 benchmarks/bf16_check.py --npz .bench_data/cifar10_small.npz --out OUT/bf16.jsonl  # GPU
    PYTHONPATH=. python3 benchmarks/bf16_check.py --quick --device cpu                                       # CPU

A model (--arch, default preact_resnet18; --quick: small_cnn) is trained --train-steps clean SGD steps (fp32) so
that its logits are confident and its input gradients far from zero. Then, for each objective, the training
attack itself (deat.objectives.inner_attack: ε 8/255, step 2/255, PGD-10 for PGD-AT, TRADES and MART, one FGSM
step of 1.25·ε for fast AT; BatchNorm in eval mode) runs on one batch (--batch-size) of held-out images in:

  reference     IEEE fp32 (deat.objectives.full_precision: no autocast; on CUDA TF32 off);
  fp32          the process's fp32, i.e. what `precision: fp32` trains with (on CUDA torch lets cuDNN use TF32
                for convolutions by default: `tf32_conv` says whether it did);
  bf16          bf16 autocast, what `precision: bf16` trains with (TRADES and MART: first step in fp32);
  bf16_unfixed  TRADES and MART: bf16 with that fp32 first step switched off (the attacks before issue 25).

Keys: first_step_agreement (fraction of pixels whose first step moves the same way as the reference's: the same
random start, so x' after one step differs exactly where the sign does), attack_loss (the attack's objective at
x' after the whole attack, evaluated in IEEE fp32: mean KL(p(x) ‖ p(x')) for TRADES and MART, mean CE for PGD-AT
and fast AT), attack_loss_rel (relative to the reference's), attack_ms (median wall time of the whole attack over
--repeats), pass (bf16 lines: agreement >= 0.99 and |attack_loss_rel| <= 0.02, the CPU test's criteria;
null elsewhere). The training step's speed under each precision is benchmarks/throughput.py's.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import deat.objectives
from deat.config import TrainConfig
from deat.data import load_dataset
from deat.models import ARCHITECTURES, build_model
from deat.runtime import resolve_device

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py beside this script
from common import emit, fill_defaults  # noqa: E402

OBJECTIVES = ("pgd_at", "trades", "mart", "fast_at")
PRECISIONS = ("reference", "fp32", "bf16", "bf16_unfixed")
MIN_AGREEMENT, MAX_LOSS_REL = 0.99, 0.02  # tests/test_objectives.py's criteria
QUICK = {"arch": "small_cnn", "train_steps": 60, "batch_size": 64, "repeats": 1}
FULL = {"arch": "preact_resnet18", "train_steps": 200, "batch_size": 256, "repeats": 3}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"small preset for a CPU: {QUICK}")
    parser.add_argument("--npz", help="data (deat.data npz); default: synthetic CIFAR-shaped images with a "
                        "smooth pattern per class")
    parser.add_argument("--arch", choices=ARCHITECTURES, help=f"default {FULL['arch']}")
    parser.add_argument("--train-steps", type=int, help=f"clean SGD steps before the attacks (default "
                        f"{FULL['train_steps']})")
    parser.add_argument("--batch-size", type=int, help=f"images attacked (default {FULL['batch_size']})")
    parser.add_argument("--repeats", type=int, help=f"timings of each attack (default {FULL['repeats']})")
    parser.add_argument("--objectives", nargs="+", choices=OBJECTIVES, default=list(OBJECTIVES))
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also append the JSON lines to this file")
    return parser


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    fill_defaults(args, QUICK if args.quick else FULL, ("train_steps", "batch_size", "repeats"))
    return args


def images(args: argparse.Namespace, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                     torch.Tensor, str]:
    """(train x, train y, attacked x, attacked y, data name): float pixels in [0, 1] on `device`."""
    if args.npz:
        data = load_dataset(f"npz:{args.npz}", val_size=0)
        x, y = data.train_x.float() / 255, data.train_y
        held_x, held_y = data.test_x[:args.batch_size].float() / 255, data.test_y[:args.batch_size]
        name = f"npz:{Path(args.npz).name}"
    else:  # a smooth random pattern per class under pixel noise: learnable, so gradients are not trivial
        gen = torch.Generator().manual_seed(args.seed)
        patterns = F.interpolate(torch.rand(10, 3, 4, 4, generator=gen), size=32, mode="bilinear")
        n = 2048 + args.batch_size
        labels = torch.randint(0, 10, (n,), generator=gen)
        pixels = 0.1 + 0.8 * (0.4 * patterns[labels] + 0.6 * torch.rand(n, 3, 32, 32, generator=gen))
        x, y, held_x, held_y = pixels[:2048], labels[:2048], pixels[2048:], labels[2048:]
        name = "synthetic"
    return x.to(device), y.to(device), held_x.to(device), held_y.to(device), name


def trained_model(args: argparse.Namespace, x: torch.Tensor, y: torch.Tensor) -> torch.nn.Module:
    torch.manual_seed(args.seed)
    model = build_model(args.arch, int(y.max()) + 1, in_channels=x.shape[1]).to(x.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator(device=x.device).manual_seed(args.seed)
    with deat.objectives.full_precision(x.device):
        for _ in range(args.train_steps):
            batch = torch.randint(0, len(y), (128,), device=x.device, generator=gen)
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    return model.eval()


@contextlib.contextmanager
def precision_context(precision: str, device: torch.device):
    """The numerics each precision name stands for (see the module docstring)."""
    if precision == "reference":
        with deat.objectives.full_precision(device):
            yield
        return
    if precision == "fp32":
        yield
        return
    fix = deat.objectives.full_precision
    if precision == "bf16_unfixed":
        deat.objectives.full_precision = lambda device: contextlib.nullcontext()
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield
    finally:
        deat.objectives.full_precision = fix


def attack(model, x, y, objective: str, steps: int, precision: str, seed: int) -> torch.Tensor:
    cfg = TrainConfig(method=objective, dataset="cifar10", pgd_steps=steps, attack_bn_eval=True,
                      precision="fp32" if precision in ("reference", "fp32") else "bf16").resolved()
    with precision_context(precision, x.device):
        x_adv = deat.objectives.inner_attack(model, x, y, cfg, torch.Generator(device=x.device).manual_seed(seed))
    model.eval()  # inner_attack leaves the model in train mode
    return x_adv


def attack_loss(model, x, x_adv, y, objective: str) -> float:
    with torch.no_grad(), deat.objectives.full_precision(x.device):
        if objective in ("trades", "mart"):
            return deat.objectives.kl_per_example(model(x), model(x_adv)).mean().item()
        return F.cross_entropy(model(x_adv), y).item()


def timed_ms(work, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    work()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - started) * 1000


def main(argv: list[str] | None = None) -> int:
    args = resolve_args(get_args_parser().parse_args(argv))
    device = resolve_device(args.device)
    train_x, train_y, x, y, data_name = images(args, device)
    started = time.perf_counter()
    model = trained_model(args, train_x, train_y)
    common = {"check": "bf16", "arch": args.arch, "data": data_name, "train_steps": args.train_steps,
              "train_s": round(time.perf_counter() - started, 2), "batch_size": len(y), "device": device.type,
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": str(torch.__version__),
              "tf32_conv": device.type == "cuda" and torch.backends.cudnn.conv.fp32_precision == "tf32",
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    failures = 0
    for objective in args.objectives:
        steps = 10  # PGD-10; fast AT takes its one step whatever pgd_steps says
        precisions = [p for p in PRECISIONS if p != "bf16_unfixed" or objective in ("trades", "mart")]
        first = {p: attack(model, x, y, objective, 1, p, args.seed + 1) for p in precisions}
        full, times = {}, {}
        for precision in precisions:
            full[precision] = attack(model, x, y, objective, steps, precision, args.seed + 1)
            times[precision] = statistics.median(
                timed_ms(lambda: attack(model, x, y, objective, steps, precision, args.seed + 1), device)
                for _ in range(args.repeats))
        reference_loss = attack_loss(model, x, full["reference"], y, objective)
        for precision in full:
            loss = attack_loss(model, x, full[precision], y, objective)
            agreement = (first[precision] == first["reference"]).float().mean().item()
            rel = loss / reference_loss - 1
            ok = agreement >= MIN_AGREEMENT and abs(rel) <= MAX_LOSS_REL if precision == "bf16" else None
            failures += ok is False
            emit({**common, "objective": objective, "precision": precision,
                  "first_step_agreement": round(agreement, 5), "attack_loss": round(loss, 6),
                  "attack_loss_rel": round(rel, 5), "attack_ms": round(times[precision], 2), "pass": ok},
                 args.out)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
