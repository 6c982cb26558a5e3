"""Standard AutoAttack on 10,000 CIFAR-shaped test images for one PreAct-ResNet-18 checkpoint: wall time, images/s.

    PYTHONPATH=.:.bench_data/site python3 benchmarks/autoattack_check.py --npz .bench_data/cifar10_small.npz \
        --out OUT/autoattack.jsonl                                            # GPU (the gpu_check.sh part)
    PYTHONPATH=. python3 benchmarks/autoattack_check.py --quick --device cpu  # CPU: tiny sizes, that it runs

Checkpoint: --checkpoint PATH (a deat run's best.pt / last.pt), else one trained here with deat.train on --npz:
PreAct-ResNet-18, PGD-AT with PGD-10 at ε 8/255, --epochs epochs at batch 128 (on CUDA with bf16, channels_last,
the CUDA graph and cudnn_benchmark, for speed; `train_s`). Images: the npz's test images repeated up to --n-images
(cifar10_small: its 1,000 test images 10×), i.e. real CIFAR-10 images in CIFAR-10's shape, but not CIFAR-10's
test set and each one 10 times. Without --npz (--quick), random CIFAR-shaped images, on which nothing is robust.

The attack is the evaluation's own (deat.attack_suite, as `python -m deat evaluate` runs it): fp32, BatchNorm in
eval mode, AutoAttack standard (APGD-CE, APGD-T, FAB-T, Square through pyautoattack) with each attack on the
previous ones' survivors, --batch-size examples per call (evaluate's default 500), seed 0. Its cost grows with
the examples that survive into the later attacks, so every line reports the accuracies: a model of higher
robust accuracy costs more per image. The images are attacked in chunks of --chunk, each chunk the whole
cascade, with one JSON line per chunk ("check": "autoattack_chunk": seconds per attack, accuracies), so that a run
cut short by a time limit still gives a rate. The last line ("check": "autoattack"): wall_s for all images,
images_per_s, clean_acc and aa_acc, and whether the 10,000-image run met the 120 s target.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from deat import attack_suite, autoattack_runner, evaluate
from deat.config import TrainConfig
from deat.data import load_dataset
from deat.runtime import resolve_device

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py beside this script
from common import emit, fill_defaults  # noqa: E402

TARGET_S, TARGET_IMAGES = 120, 10_000  # issue 25: standard AutoAttack on 10k CIFAR-10 images within 120 s
QUICK = {"n_images": 16, "chunk": 8, "batch_size": 8, "epochs": 1, "arch": "small_cnn", "pgd_steps": 2}
FULL = {"n_images": TARGET_IMAGES, "chunk": 2000, "batch_size": 500, "epochs": 5, "arch": "preact_resnet18",
        "pgd_steps": 10}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"tiny preset for a CPU: {QUICK}")
    parser.add_argument("--npz", help="data (deat.data npz; its test images are attacked); default: random images")
    parser.add_argument("--checkpoint", help="attack this deat checkpoint instead of training one here")
    parser.add_argument("--arch", help=f"architecture of the checkpoint trained here (default {FULL['arch']})")
    parser.add_argument("--epochs", type=int, help=f"PGD-AT epochs of the checkpoint trained here (default "
                        f"{FULL['epochs']})")
    parser.add_argument("--pgd-steps", type=int, help=f"its training attack's steps (default {FULL['pgd_steps']})")
    parser.add_argument("--n-images", type=int, help=f"images attacked (default {FULL['n_images']})")
    parser.add_argument("--chunk", type=int, help=f"images per chunk, one JSON line each (default {FULL['chunk']})")
    parser.add_argument("--batch-size", type=int, help=f"AutoAttack's batch (default {FULL['batch_size']})")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    parser.add_argument("--out", type=Path, help="also append the JSON lines to this file")
    return parser


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    fill_defaults(args, QUICK if args.quick else FULL, ("n_images", "chunk", "batch_size", "epochs"))
    if args.checkpoint and not Path(args.checkpoint).is_file():
        raise ValueError(f"--checkpoint: {args.checkpoint} is not a file")
    return args


def random_npz(path: Path) -> Path:
    rng = np.random.default_rng(0)
    np.savez(path, train_x=rng.integers(0, 256, (256, 32, 32, 3), dtype=np.uint8), train_y=np.arange(256) % 10,
             test_x=rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8), test_y=np.arange(64) % 10)
    return path


def train_checkpoint(npz: Path, args: argparse.Namespace, device: torch.device, workdir: Path) -> tuple[Path, float]:
    fast = {"precision": "bf16", "channels_last": True, "cuda_graph": True,
            "cudnn_benchmark": True} if device.type == "cuda" else {}
    cfg = TrainConfig.from_dict({
        "dataset": f"npz:{npz}", "arch": args.arch, "method": "pgd_at", "epochs": args.epochs, "batch_size": 128,
        "pgd_steps": args.pgd_steps, "eps": 8 / 255, "lr": 0.1, "val_size": 0, "eval_examples": 64,
        "eval_pgd_steps": 1, "device": device.type, "log_interval_s": 3600.0, "out": str(workdir / "run"),
        **fast}, source="autoattack_check")
    from deat.train import train  # the training path only when a checkpoint is made here

    started = time.perf_counter()
    train(cfg, log=lambda message: print(message, file=sys.stderr, flush=True))
    return workdir / "run" / "last.pt", time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    args = resolve_args(get_args_parser().parse_args(argv))
    device = resolve_device(args.device)
    try:
        import pyautoattack
    except ImportError:
        emit({"check": "autoattack", "error": "pyautoattack is not importable (on the GPU machine: run "
              "`bash benchmarks/gpu_check.sh prepare` here first, which copies it to .bench_data/site)"}, args.out)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        npz = Path(args.npz) if args.npz else random_npz(workdir / "random.npz")
        if args.checkpoint:
            checkpoint, train_s, made = Path(args.checkpoint), None, f"given: {args.checkpoint}"
        else:
            checkpoint, train_s = train_checkpoint(npz, args, device, workdir)
            made = f"trained here: {args.arch}, PGD-AT (PGD-{args.pgd_steps}), {args.epochs} epochs on {npz.name}"
        model, ckpt = evaluate.load_run_model(checkpoint, device)
        data = load_dataset(f"npz:{npz}", val_size=0)
    n_test = len(data.test_y)
    index = torch.arange(args.n_images) % n_test
    x, y = (data.test_x[index].float() / 255).to(device), data.test_y[index].to(device)
    settings = {"batch_size": args.batch_size, "num_classes": ckpt["model_spec"]["num_classes"], "eps": 8 / 255,
                "norm": "linf", "attack_seed": attack_suite.ATTACK_SEED,
                "autoattack_attacks": list(autoattack_runner.AUTOATTACK_STANDARD)}
    common = {"arch": ckpt["model_spec"]["arch"], "checkpoint": made, "train_s": None if train_s is None else
              round(train_s, 1), "data": f"{npz.name}: its {n_test} test images repeated to {args.n_images}",
              "eps": settings["eps"], "batch_size": args.batch_size, "device": device.type,
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": str(torch.__version__), "autoattack": pyautoattack.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    totals = {"seconds": 0.0, "clean": 0, "robust": 0, "per_attack_s": dict.fromkeys(settings["autoattack_attacks"],
                                                                                    0.0)}
    for start in range(0, args.n_images, args.chunk):
        xc, yc = x[start:start + args.chunk], y[start:start + args.chunk]
        entry: dict = {"robust_positions": {}}
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        clean = attack_suite._correct(model, xc, yc, args.batch_size)
        attack_suite._run_autoattack(model, xc, yc, settings, entry, "autoattack_check", lambda: None,
                                     lambda message: print(message, file=sys.stderr, flush=True), 3600.0)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - started
        totals["seconds"] += seconds
        totals["clean"] += int(clean.sum())
        totals["robust"] += len(entry["aa_robust"])
        for attack, result in entry["autoattack"].items():
            totals["per_attack_s"][attack] += result["wall_time_s"]
        done = start + len(yc)
        emit({**common, "check": "autoattack_chunk", "images": len(yc), "images_done": done,
              "seconds": round(seconds, 2), "seconds_so_far": round(totals["seconds"], 2),
              "images_per_s_so_far": round(done / totals["seconds"], 1), "clean_acc": int(clean.sum()) / len(yc),
              "aa_acc": len(entry["aa_robust"]) / len(yc),
              "per_attack_s": {a: round(r["wall_time_s"], 2) for a, r in entry["autoattack"].items()}}, args.out)
    wall = totals["seconds"]
    emit({**common, "check": "autoattack", "n_images": args.n_images, "complete": True, "wall_s": round(wall, 2),
          "images_per_s": round(args.n_images / wall, 1), "clean_acc": totals["clean"] / args.n_images,
          "aa_acc": totals["robust"] / args.n_images,
          "per_attack_s": {a: round(s, 2) for a, s in totals["per_attack_s"].items()}, "target_s": TARGET_S,
          "met": wall <= TARGET_S if args.n_images == TARGET_IMAGES else None}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
