"""Throughput of one adversarial-training iteration: one JSON line per case (tables in docs/benchmarks.md).

    PYTHONPATH=. python3 benchmarks/throughput.py --quick                  # small CNN on a 2-core CPU, ~25 s
    PYTHONPATH=. python3 benchmarks/throughput.py --npz .bench_data/cifar10_small.npz \\
        --archs preact_resnet18 --batch-sizes 128 512 1024 \\
        --variants fp32:eager bf16-cl:eager bf16-cl:cuda_graph --out results/bench/throughput.jsonl

A case is (architecture, batch size, variant, method); a method is an objective with an outer step (deat.config:
pgd_at / deat, trades / trades_deat, mart / mart_deat, fast_at / fast_at_deat; --methods, default pgd_at deat).
A variant is PRECISION[-cl]:MODE: PRECISION fp32 | bf16 (autocast), -cl for channels_last, MODE eager |
cuda_graph | compile (torch.compile, mode from --compile-mode).
On a CPU every variant runs the plain eager fp32 step (the fast options are CUDA-only; `cpu_fallback` says so).

Each case times the training loop's per-iteration work (train.train_one_epoch: the step deat.fast chooses,
the lr scheduler, the loss accumulation) on batches made beforehand:
  clean step: the objective's loss and outer step without its attack (pgd_steps=0, eps=0);
  AT step: the objective's attack (PGD-K with K = --pgd-steps; fast AT: one FGSM step) + the same;
  --awp-gamma > 0 adds AWP (Wu et al. 2020) to the methods whose objective admits it (PGD-AT, TRADES).
Per (architecture, batch size) it also times producing one batch (deat.data.Batches on the data's device:
gather, crop/flip, float conversion; `batch_ms`) and the crop/flip alone (`augment_ms`); `batch_share` is
batch_ms / (batch_ms + AT step ms), the fraction of a training iteration spent making its batch.

Timing: --warmup iterations first (cuDNN heuristics, graph capture, compilation; their wall time is `setup_s`),
then --repeats timings of --steps consecutive iterations each: CUDA events after a synchronize on CUDA, the host
clock on CPU. Reported: the median ms per iteration, with the fastest and slowest repeat. The methods of one
(architecture, batch size, variant) are timed in alternation, so `deat_over_sgd` (AT step of the objective's DEAT
method / that of its SGD-momentum method, e.g. trades_deat / trades) compares the two outer steps under the same
machine state; `deat_over_pgd_at` is that ratio for PGD-AT (deat / pgd_at) on every line. Data: --npz (uint8
train_x as in deat.data) or synthetic CIFAR-shaped uint8 images. A case that fails (out of memory, compile error,
a refused option such as AWP with cuda_graph) prints a line with "error".
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import itertools
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from deat.config import AWP_OBJECTIVES, COMPILE_MODES, METHODS, TrainConfig, objective_of, outer_step_of
from deat.data import Batches, augment_batch, load_dataset
from deat.fast import build_train_step, cuda_only_requests
from deat.models import ARCHITECTURES, build_model
from deat.optim import build_optimizer, build_scheduler
from deat.runtime import resolve_device

MODES = ("eager", "cuda_graph", "compile")
PREBUILT_BATCHES = 4  # distinct augmented batches the timed iterations cycle through
QUICK = dict(archs=["small_cnn"], batch_sizes=[32], variants=["fp32:eager", "bf16-cl:cuda_graph"], warmup=1,
             repeats=3, steps=2, synthetic_images=256)
FULL = dict(archs=["preact_resnet18"], batch_sizes=[128, 512], variants=["fp32:eager", "bf16-cl:eager",
            "bf16-cl:cuda_graph"], warmup=8, repeats=5, steps=5, synthetic_images=4096)


@dataclasses.dataclass(frozen=True)
class Variant:
    precision: str
    channels_last: bool
    mode: str

    @classmethod
    def parse(cls, text: str) -> "Variant":
        """'bf16-cl:cuda_graph' -> Variant('bf16', True, 'cuda_graph')."""
        layout, _, mode = text.partition(":")
        precision, _, cl = layout.partition("-")
        if precision not in ("fp32", "bf16") or cl not in ("", "cl") or mode not in MODES:
            raise ValueError(f"--variants: {text!r} is not PRECISION[-cl]:MODE with PRECISION fp32|bf16 and "
                             f"MODE one of {MODES} (e.g. bf16-cl:cuda_graph)")
        return cls(precision, cl == "cl", mode)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"small preset for a CPU: {QUICK} (flags given explicitly still win)")
    parser.add_argument("--archs", nargs="+", choices=ARCHITECTURES, help=f"default {FULL['archs']}")
    parser.add_argument("--batch-sizes", nargs="+", type=int, help=f"default {FULL['batch_sizes']}")
    parser.add_argument("--variants", nargs="+", help=f"PRECISION[-cl]:MODE, default {FULL['variants']}")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=["pgd_at", "deat"],
                        help="objective + outer step, e.g. trades trades_deat (default: pgd_at deat)")
    parser.add_argument("--awp-gamma", type=float, default=0.0,
                        help="AWP's relative perturbation for PGD-AT and TRADES methods (default 0: off)")
    parser.add_argument("--compile-mode", default="reduce-overhead", choices=[m for m in COMPILE_MODES if m != "none"],
                        help="torch.compile mode of the 'compile' variants (default reduce-overhead)")
    parser.add_argument("--cudnn-benchmark", action="store_true",
                        help="cuDNN times its algorithms in the warm-up and keeps the fastest (CUDA)")
    parser.add_argument("--pgd-steps", type=int, default=10, help="PGD steps of the AT step (default 10)")
    parser.add_argument("--npz", help="real data: an npz as deat.data reads it (default: synthetic images)")
    parser.add_argument("--synthetic-images", type=int, help=f"synthetic images (default {FULL['synthetic_images']})")
    parser.add_argument("--warmup", type=int, help=f"untimed iterations first (default {FULL['warmup']})")
    parser.add_argument("--repeats", type=int, help=f"timings per case; the median is reported (default "
                        f"{FULL['repeats']})")
    parser.add_argument("--steps", type=int, help=f"iterations per timing (default {FULL['steps']})")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    parser.add_argument("--seed", type=int, default=0, help="model initialisation and data seed (default 0)")
    parser.add_argument("--out", help="also append the JSON lines to this file")
    return parser


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    preset = QUICK if args.quick else FULL
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.variants = [Variant.parse(v) for v in args.variants]
    if args.awp_gamma < 0:
        raise ValueError(f"--awp-gamma must be >= 0, got {args.awp_gamma}")
    for name in ("warmup", "repeats", "steps", "synthetic_images", "pgd_steps"):
        if getattr(args, name) < (0 if name in ("warmup", "pgd_steps") else 1):
            raise ValueError(f"--{name.replace('_', '-')} must be >= {0 if name in ('warmup', 'pgd_steps') else 1}, "
                             f"got {getattr(args, name)}")
    if any(bs < 1 for bs in args.batch_sizes):
        raise ValueError(f"--batch-sizes must be >= 1, got {args.batch_sizes}")
    return args


# ------------------------------------------------------------------------------------------- data

def load_images(args: argparse.Namespace, device: torch.device) -> dict:
    """uint8 (N, C, H, W) images and labels on `device`, with their name and channel statistics."""
    if args.npz:
        data = load_dataset(f"npz:{args.npz}", val_size=0)
        return {"x": data.train_x.to(device), "y": data.train_y.to(device), "name": f"npz:{Path(args.npz).name}",
                "num_classes": data.num_classes, "mean": data.mean, "std": data.std}
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randint(0, 256, (args.synthetic_images, 3, 32, 32), dtype=torch.uint8, generator=gen)
    y = torch.randint(0, 10, (args.synthetic_images,), generator=gen)
    return {"x": x.to(device), "y": y.to(device), "name": "synthetic", "num_classes": 10,
            "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}


def augment_of(images: torch.Tensor) -> str:
    """The policy train.py's augment="auto" picks: crop_flip for 32×32 colour images, else none."""
    return "crop_flip" if tuple(images.shape[1:]) == (3, 32, 32) else "none"


# ------------------------------------------------------------------------------------------- timing

def timed_ms(work: Callable[[], None], device: torch.device) -> float:
    """Wall time of `work()` in ms: CUDA events after a synchronize on CUDA, the host clock elsewhere."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        work()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    start_s = time.perf_counter()
    work()
    return (time.perf_counter() - start_s) * 1000


def batch_production_ms(images: dict, batch_size: int, args: argparse.Namespace,
                        device: torch.device) -> tuple[float, float]:
    """(ms to produce one training batch with Batches, ms for its crop/flip alone), medians over the repeats."""
    policy = augment_of(images["x"])
    gen = torch.Generator(device=device).manual_seed(args.seed)
    batches = Batches(images["x"], images["y"], batch_size, shuffle=True, drop_last=True, augment=policy,
                      generator=gen)
    stream = itertools.chain.from_iterable(itertools.repeat(batches))  # epoch after epoch: randperm included
    count = max(args.steps, len(batches))
    raw = images["x"][:batch_size]

    def produce() -> None:
        for _ in range(count):
            next(stream)

    def augment() -> None:
        for _ in range(count):
            augment_batch(raw, policy, gen)

    produce()
    augment()
    batch = statistics.median(timed_ms(produce, device) / count for _ in range(args.repeats))
    augment_time = statistics.median(timed_ms(augment, device) / count for _ in range(args.repeats))
    return batch, augment_time if policy != "none" else 0.0


@dataclasses.dataclass
class MethodRun:
    """One method's model, optimizer, schedule and step functions, and the loop's running sums."""

    method: str
    scheduler: torch.optim.lr_scheduler.LRScheduler
    steps: dict[str, Callable]  # "clean" / "at" -> step(x, y)
    loss_sum: torch.Tensor
    correct: torch.Tensor

    def iterate(self, kind: str, inputs: list, count: int, channels_last: bool) -> None:
        """`count` iterations of train_one_epoch's loop body with the `kind` step."""
        for i in range(count):
            x, y = inputs[i % len(inputs)]
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            loss, n_correct = self.steps[kind](x, y)
            self.scheduler.step()
            self.loss_sum += loss * len(y)
            self.correct += n_correct


def build_run(method: str, arch: str, batch_size: int, variant: Variant, images: dict, args, device) -> MethodRun:
    cfg = TrainConfig(dataset="cifar10", arch=arch, method=method, batch_size=batch_size, pgd_steps=args.pgd_steps,
                      precision=variant.precision, channels_last=variant.channels_last,
                      cuda_graph=variant.mode == "cuda_graph",
                      compile=args.compile_mode if variant.mode == "compile" else "none",
                      cudnn_benchmark=args.cudnn_benchmark, seed=args.seed,
                      awp_gamma=args.awp_gamma if objective_of(method) in AWP_OBJECTIVES else 0.0).resolved()
    cfg.validate("benchmark")
    torch.manual_seed(args.seed)  # both methods start from the same weights
    model = build_model(arch, images["num_classes"], in_channels=images["x"].shape[1], mean=images["mean"],
                        std=images["std"]).to(device)
    if cfg.channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(method, model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay, k1=cfg.k1, k2=cfg.k2,
                                decoupled_weight_decay=cfg.decoupled_weight_decay)
    iterations = args.warmup + args.repeats * args.steps
    scheduler = build_scheduler(optimizer, "cosine", epochs=1, iters_per_epoch=2 * iterations)  # lr moves every step
    attack_gen = torch.Generator(device=device).manual_seed(args.seed + 1)

    def note(message: str) -> None:
        print(f"[{arch} bs{batch_size} {method}] {message}", file=sys.stderr)

    steps = {"at": build_train_step(model, optimizer, cfg, attack_gen, note),
             "clean": build_train_step(model, optimizer, dataclasses.replace(cfg, pgd_steps=0, eps=0.0), attack_gen,
                                       lambda message: None)}  # the same note twice would say nothing new
    return MethodRun(method, scheduler, steps, torch.zeros((), device=device),
                     torch.zeros((), device=device, dtype=torch.long))


def measure_variant(arch: str, batch_size: int, variant: Variant, images: dict, inputs: list, args,
                    device: torch.device) -> dict[str, dict]:
    """{method: timings} for one (arch, batch size, variant), the methods timed in alternation."""
    runs = [build_run(method, arch, batch_size, variant, images, args, device) for method in args.methods]
    channels_last = variant.channels_last and device.type == "cuda"
    times: dict[str, dict[str, list[float]]] = {run.method: {"clean": [], "at": []} for run in runs}
    setup: dict[str, float] = {}
    for run in runs:
        started = time.perf_counter()
        for kind in ("clean", "at"):
            run.iterate(kind, inputs, args.warmup, channels_last)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        setup[run.method] = time.perf_counter() - started
    for _ in range(args.repeats):
        for kind in ("at", "clean"):
            for run in runs:
                elapsed = timed_ms(lambda: run.iterate(kind, inputs, args.steps, channels_last), device)
                times[run.method][kind].append(elapsed / args.steps)
    for run in runs:
        if not torch.isfinite(run.loss_sum).item():
            raise FloatingPointError(f"{run.method}: non-finite training loss while timing")
    return {method: {**t, "setup_s": setup[method]} for method, t in times.items()}


def case_lines(arch: str, batch_size: int, variant: Variant, measured: dict[str, dict], batch: tuple[float, float],
               common: dict) -> list[dict]:
    at_median = {method: statistics.median(t["at"]) for method, t in measured.items()}
    ratio = at_median["deat"] / at_median["pgd_at"] if {"deat", "pgd_at"} <= set(at_median) else None

    def deat_over_sgd(method: str) -> float | None:
        pair = {outer_step_of(m): at_median[m] for m in at_median if objective_of(m) == objective_of(method)}
        return round(pair["deat"] / pair["sgd"], 4) if len(pair) == 2 else None
    batch_ms, augment_ms = batch
    lines = []
    for method, t in measured.items():
        clean_ms, at_ms = statistics.median(t["clean"]), at_median[method]
        lines.append({
            **case_key(arch, method, batch_size, variant, common),
            "clean_ms_per_step": round(clean_ms, 3), "clean_images_per_s": round(batch_size * 1000 / clean_ms, 1),
            "at_ms_per_step": round(at_ms, 3), "at_images_per_s": round(batch_size * 1000 / at_ms, 1),
            "at_ms_min": round(min(t["at"]), 3), "at_ms_max": round(max(t["at"]), 3),
            "deat_over_sgd": deat_over_sgd(method),
            "deat_over_pgd_at": None if ratio is None else round(ratio, 4),
            "batch_ms": round(batch_ms, 4), "augment_ms": round(augment_ms, 4),
            "batch_share": round(batch_ms / (batch_ms + at_ms), 5), "setup_s": round(t["setup_s"], 2),
        })
    return lines


def case_key(arch: str, method: str, batch_size: int, variant: Variant, common: dict) -> dict:
    fallback = common["device"] == "cpu" and bool(cuda_only_requests(TrainConfig(
        precision=variant.precision, channels_last=variant.channels_last, cuda_graph=variant.mode == "cuda_graph",
        compile=common["compile_mode"] if variant.mode == "compile" else "none")))
    return {"arch": arch, "method": method, "objective": objective_of(method), "outer_step": outer_step_of(method),
            "awp_gamma": common["awp_gamma"] if objective_of(method) in AWP_OBJECTIVES else 0.0,
            "batch_size": batch_size, "precision": variant.precision,
            "channels_last": variant.channels_last, "mode": variant.mode,
            "compile_mode": common["compile_mode"] if variant.mode == "compile" else None,
            "cpu_fallback": fallback, **{k: v for k, v in common.items() if k not in ("compile_mode", "awp_gamma")}}


def emit(line: dict, out: Path | None) -> None:
    text = json.dumps(line)
    print(text, flush=True)
    if out is not None:
        with out.open("a") as f:
            f.write(text + "\n")


def main(argv: list[str] | None = None) -> int:
    args = resolve_args(get_args_parser().parse_args(argv))
    device = resolve_device(args.device)
    out = Path(args.out) if args.out else None
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
    images = load_images(args, device)
    common = {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cpu_threads": torch.get_num_threads(), "torch": str(torch.__version__), "data": images["name"],
        "pgd_steps": args.pgd_steps, "warmup": args.warmup, "repeats": args.repeats, "steps_per_repeat": args.steps,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "compile_mode": args.compile_mode,
        "cudnn_benchmark": args.cudnn_benchmark,
        "awp_gamma": args.awp_gamma,
    }
    for arch, batch_size in itertools.product(args.archs, args.batch_sizes):
        if batch_size > len(images["y"]):
            raise ValueError(f"--batch-sizes: {batch_size} exceeds the {len(images['y'])} images")
        batch = batch_production_ms(images, batch_size, args, device)
        gen = torch.Generator(device=device).manual_seed(args.seed)
        source = Batches(images["x"], images["y"], batch_size, shuffle=True, drop_last=True,
                         augment=augment_of(images["x"]), generator=gen)
        made = itertools.chain.from_iterable(itertools.repeat(source))
        inputs = [next(made) for _ in range(PREBUILT_BATCHES)]
        for variant in args.variants:
            try:
                measured = measure_variant(arch, batch_size, variant, images, inputs, args, device)
                lines = case_lines(arch, batch_size, variant, measured, batch, common)
            except Exception as err:  # OOM, compile or capture failure: report it, keep the other cases' numbers
                lines = [{**case_key(arch, method, batch_size, variant, common),
                          "error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
                         for method in args.methods]
            for line in lines:
                emit(line, out)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
