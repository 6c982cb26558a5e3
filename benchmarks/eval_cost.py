"""Cost of `python -m deat evaluate`: seconds per 1,000 test examples for each attack, at several batch sizes.

    python -m benchmarks.eval_cost                    # from the repository root: the CPU case, plus CUDA if present
    OMP_NUM_THREADS=1 python -m benchmarks.eval_cost --cases cpu --cpu-examples 32 --batch-sizes 8 32

Cases (each trains its model briefly with deat.train first, in a temporary directory):
- cpu: the quick study's model, small_cnn on mnist5k at eps 0.1, one epoch of PGD-5 training (lr 0.05): enough
  for AutoAttack to find robust examples, where nearly all its time goes (an example every attack breaks at once
  costs almost nothing; one that survives gets APGD-CE, 9 APGD-T targets, 9 FAB-T targets and 5,000 Square queries).
- cuda: preact_resnet18 on data/cifar10_small.npz (the prepared `cifar10_small` stand-in) or --cifar-small (random CIFAR-shaped data where it is
  absent, on which AutoAttack finds nothing robust and costs little), eps 8/255, 10 epochs of PGD-10 training.

For every batch size, one JSON line per attack, each attack run ALONE on the same n test examples (the AutoAttack
attacks on the clean-correct ones, with evaluate's settings: standard's, K - 1 targets below 10 classes):
clean, pgd10 (PGD-10), pgd (PGD-50 x 10 restarts, step eps/4), apgd-ce, apgd-t, fab-t, square; then
`autoattack_standard`, the four attacks as evaluate runs them (each on the previous one's survivors), whose time
is what one checkpoint's AutoAttack costs. Keys: seconds, s_per_1000_examples (seconds x 1000 / n, n the examples
evaluated, not only those attacked), acc (robust accuracy after the attack, over n), attacked (examples the attack
ran on), peak_memory_mib (CUDA: torch.cuda.max_memory_allocated during the attack; null on a CPU, where it is
not measured), and the device, torch version, date and command. The cost of an attack depends on how many
examples survive into it, so compare batch sizes within one case, and mind that small n overstates
AutoAttack's per-call overheads.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from deat import attack_suite, autoattack_runner, evaluate
from deat.attacks import robust_mask
from deat.config import TrainConfig
from deat.data import load_dataset
from deat.runtime import environment
from deat.train import train

CIFAR_SMALL = Path(__file__).resolve().parents[1] / "data/cifar10_small.npz"  # deat.data's cifar10_small stand-in
ATTACKS = ("clean", "pgd10", "pgd", *autoattack_runner.AUTOATTACK_STANDARD, "autoattack_standard")
PGD_STEPS, PGD_RESTARTS = 50, 10


def _random_cifar_npz(path: Path) -> Path:
    rng = np.random.default_rng(0)
    arrays = {"train_x": rng.integers(0, 256, (5000, 32, 32, 3), dtype=np.uint8),
              "train_y": np.repeat(np.arange(10), 500), "test_x": rng.integers(0, 256, (1000, 32, 32, 3),
                                                                               dtype=np.uint8),
              "test_y": np.repeat(np.arange(10), 100)}
    np.savez(path, **arrays)
    return path


def _case_config(case: str, workdir: Path, args: argparse.Namespace) -> tuple[dict, str, int]:
    """(training options, data description, number of test examples to evaluate) for a case."""
    if case == "cpu":
        return ({"dataset": "mnist5k", "arch": "small_cnn", "method": "pgd_at", "lr": 0.05, "epochs": 1,
                 "eps": 0.1, "pgd_steps": 5, "val_size": 0, "eval_examples": 100, "device": "cpu"},
                "mnist5k", args.cpu_examples)
    cifar_small = Path(args.cifar_small)
    data = cifar_small if cifar_small.is_file() else _random_cifar_npz(workdir / "random_cifar.npz")
    return ({"dataset": f"npz:{data}", "arch": "preact_resnet18", "method": "pgd_at", "lr": 0.1,
             "epochs": args.cuda_epochs, "eps": 8 / 255, "pgd_steps": 10, "val_size": 0, "eval_examples": 200,
             "device": "cuda"},
            "cifar10_small" if data == cifar_small else "random CIFAR-shaped", args.cuda_examples)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _robust_after(attack: str, model, x, y, eps: float, batch_size: int,
                  num_classes: int) -> tuple[torch.Tensor, int]:
    """(N,) bool robust after `attack` alone (or standard AutoAttack's cascade), and how many examples it attacked."""
    with torch.no_grad():
        correct = torch.cat([model(xb).argmax(1) == yb for xb, yb in zip(x.split(batch_size), y.split(batch_size))])
    if attack == "clean":
        return correct, len(y)
    if attack in ("pgd10", "pgd"):
        steps, restarts = (attack_suite.PGD10_STEPS, 1) if attack == "pgd10" else (PGD_STEPS, PGD_RESTARTS)
        generator = torch.Generator(device=x.device).manual_seed(attack_suite.ATTACK_SEED)
        return robust_mask(model, x, y, eps, eps / 4, steps, "linf", restarts, batch_size, generator), len(y)
    chain = autoattack_runner.AUTOATTACK_STANDARD if attack == "autoattack_standard" else (attack,)
    robust = correct.clone()
    for name in chain:
        index = robust.nonzero().squeeze(1)
        if len(index) == 0:
            break
        survived = [autoattack_runner.autoattack_survivors(model, x[i], y[i], name, eps, "linf", batch_size,
                                                           seed=attack_suite.ATTACK_SEED, num_classes=num_classes)
                    for i in index.split(batch_size)]
        robust[index] = torch.cat(survived)
    return robust, int(correct.sum())


def run_case(case: str, args: argparse.Namespace) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        options, data_name, n = _case_config(case, workdir, args)
        run_dir = workdir / "run"
        train(TrainConfig.from_dict({**options, "out": str(run_dir)}), log=lambda line: None)
        device = torch.device(options["device"])
        model, ckpt = evaluate.load_run_model(run_dir / "last.pt", device)
        data = load_dataset(options["dataset"], "data", options["val_size"])
    index = evaluate.select_examples(len(data.test_y), n, seed=0)
    x, y = (data.test_x[index].float() / 255).to(device), data.test_y[index].to(device)
    num_classes, eps = ckpt["model_spec"]["num_classes"], options["eps"]
    env = environment(device)
    import pyautoattack

    common = {"case": case, "model": options["arch"], "data": data_name, "eps": eps, "n_examples": n,
              "training": {k: options[k] for k in ("method", "epochs", "pgd_steps", "lr")},
              "device": env["device"], "device_name": env["device_name"], "cpu_threads": env["cpu_threads"],
              "torch": env["torch"], "autoattack": pyautoattack.__version__,
              "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "command": " ".join(["python -m benchmarks.eval_cost", *sys.argv[1:]])}
    lines = []
    for batch_size in args.batch_sizes:
        for attack in args.attacks:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            _sync(device)
            started = time.perf_counter()
            robust, attacked = _robust_after(attack, model, x, y, eps, batch_size, num_classes)
            _sync(device)
            seconds = time.perf_counter() - started
            peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
            line = {**common, "attack": attack, "batch_size": batch_size, "seconds": round(seconds, 3),
                    "s_per_1000_examples": round(seconds * 1000 / n, 2), "acc": robust.sum().item() / n,
                    "attacked": attacked, "peak_memory_mib": None if peak is None else round(peak, 1)}
            print(json.dumps(line), flush=True)
            lines.append(line)
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", choices=("cpu", "cuda"), default=None,
                        help="cases to run (default: cpu, plus cuda when CUDA is available)")
    parser.add_argument("--cpu-examples", type=int, default=64, help="test examples in the cpu case (default: 64)")
    parser.add_argument("--cuda-examples", type=int, default=1000, help="test examples in the cuda case "
                        "(default: 1000, all of cifar10_small's test set)")
    parser.add_argument("--cuda-epochs", type=int, default=10, help="PGD-10 training epochs of the cuda case's "
                        "model (default: 10)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[100, 250, 500],
                        help="evaluation batch sizes to time (default: 100 250 500)")
    parser.add_argument("--attacks", nargs="+", choices=ATTACKS, default=list(ATTACKS),
                        help="attacks to time (default: all)")
    parser.add_argument("--cifar-small", default=str(CIFAR_SMALL), help=f"cifar10_small.npz for the cuda case "
                        f"(default: {CIFAR_SMALL}; random data where absent)")
    args = parser.parse_args()
    if min(args.batch_sizes) < 1:
        parser.error(f"--batch-sizes must be >= 1, got {args.batch_sizes}")
    cases = args.cases or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    for case in cases:
        run_case(case, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
