"""What weight averaging (ema_tau) and the mechanism probes (probe_every) add to a training epoch; prints JSON lines.

    python benchmarks/training_overhead.py                      # overfit_cpu's setting, 3 epochs per variant
    python benchmarks/training_overhead.py --epochs 2 --repeats 1

Each variant trains the same run (overfit_cpu's data, model and attack: 1,000 cifar10_small training images, 4,000
validation, small_cnn width 64, PGD-3, batch 64) in a temporary directory; the variants take turns, `--repeats`
times, so that a machine's drift or a neighbour's load hits them alike. Per variant: the mean wall time of an epoch
(training pass + per-epoch evaluation + whatever the variant adds, metrics.json `epoch_wall_time_s`), the time of the
probes themselves (`probe_time_s`), and the ratio to the plain run. The data file data/cifar10_small.npz must exist
(python -m deat prepare --dataset cifar10_small, or a copy).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from deat.config import TrainConfig  # noqa: E402
from deat.runtime import environment, resolve_device  # noqa: E402
from deat.train import train  # noqa: E402

SETTING = dict(dataset="cifar10_small", arch="small_cnn", width=64, augment="none", eps=8 / 255, pgd_steps=3,
               method="pgd_at", lr=0.05, batch_size=64, momentum=0.9, decoupled_weight_decay=False, val_size=4000,
               eval_examples=1000, schedule="constant")
VARIANTS = {"plain": {}, "ema": {"ema_tau": 0.98}, "probes": {"probe_every": 1, "probe_batches": 8},
            "probes_every_2": {"probe_every": 2, "probe_batches": 8}}


def ema_update_cost(device: str, updates: int = 200) -> dict:
    """Milliseconds of one WeightAverage.update for the setting's model (small_cnn width 64) and PreAct-ResNet-18:
    the part of EMA that runs after every optimizer step."""
    from deat.averaging import WeightAverage
    from deat.models import build_model

    result = {"benchmark": "ema_update", "device": device, "torch": str(torch.__version__),
              "date": time.strftime("%Y-%m-%d")}
    for arch, width in (("small_cnn", 64), ("preact_resnet18", None)):
        model = build_model(arch, 10, in_channels=3, mean=[0.5] * 3, std=[0.25] * 3, width=width).to(device)
        average = WeightAverage(model, 0.98, total_steps=10)
        started = time.perf_counter()
        for _ in range(updates):
            average.update(model)
        result[f"{arch}_ms_per_update"] = round(1000 * (time.perf_counter() - started) / updates, 4)
        result[f"{arch}_parameters"] = sum(p.numel() for p in model.parameters())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--update-only", action="store_true", help="only time one EMA update (no training)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(json.dumps(ema_update_cost(args.device)), flush=True)
    if args.update_only:
        return
    epochs: dict[str, list[float]] = {name: [] for name in VARIANTS}
    probe: dict[str, list[float]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as root:
        for repeat in range(args.repeats):
            for name, extra in VARIANTS.items():
                cfg = TrainConfig.from_dict({**SETTING, **extra, "epochs": args.epochs, "device": args.device,
                                             "out": f"{root}/{name}_{repeat}"})
                metrics = train(cfg, log=lambda line: None)
                epochs[name] += [r["epoch_wall_time_s"] for r in metrics["epochs"]]
                probe[name] += [r["probe_time_s"] for r in metrics["epochs"] if "probe_time_s" in r]
    base = statistics.mean(epochs["plain"])
    env = environment(resolve_device(args.device))
    for name in VARIANTS:
        mean = statistics.mean(epochs[name])
        print(json.dumps({"benchmark": "training_overhead", "variant": name, **VARIANTS[name],
                          "epochs_measured": len(epochs[name]), "epoch_wall_time_s": round(mean, 3),
                          "ratio_to_plain": round(mean / base, 4),
                          "probe_time_s": round(statistics.mean(probe[name]), 3) if probe[name] else None,
                          "device": env["device_name"], "torch": env["torch"], "threads": args.threads,
                          "date": time.strftime("%Y-%m-%d")}), flush=True)


if __name__ == "__main__":
    main()
