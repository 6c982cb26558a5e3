"""Cost of `python -m deat evaluate`: seconds per 1,000 test examples for PGD-50x10 and AutoAttack standard.

    python -m benchmarks.eval_cost           # from the repository root: the CPU case, plus the GPU case with CUDA
    python -m benchmarks.eval_cost --cases cpu --cpu-examples 64

Cases (each trains its model briefly with deat.train first, in a temporary directory):
- cpu: the quick study's model, small_cnn on mnist5k at eps 0.1, one epoch of PGD-5 training (lr 0.05): enough
  for AutoAttack to find robust examples, where nearly all its time goes (an example every attack breaks at once
  costs almost nothing; one that survives gets APGD-CE, 9 APGD-T targets, 9 FAB-T targets and 5,000 Square queries).
- cuda: preact_resnet18 on ../shared/data/cifar10_small.npz or --cifar-small (random CIFAR-shaped data where it is
  absent, on which AutoAttack finds nothing robust and costs little), eps 8/255, 10 epochs of PGD-10 training.

Evaluation goes through deat.evaluate.main (fp32, batch 500, step eps/4 for PGD-50, 10 restarts). One JSON line per
(case, attack): seconds, seconds per 1,000 examples, accuracies before and after, and for AutoAttack each attack's
seconds. AutoAttack's per-iteration overhead does not shrink with n, so on the CPU a small n overstates the cost per
1,000 examples; the accuracies say how many examples survived to the expensive attacks.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from deat import evaluate
from deat.config import TrainConfig
from deat.train import environment, train

CIFAR_SMALL = Path(__file__).resolve().parents[1].parent / "shared/data/cifar10_small.npz"


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


def run_case(case: str, args: argparse.Namespace) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        options, data_name, n = _case_config(case, workdir, args)
        run_dir = workdir / "run"
        train(TrainConfig.from_dict({**options, "out": str(run_dir)}), log=lambda line: None)
        out = workdir / "eval.json"
        eval_args = evaluate.get_args_parser().parse_args(
            ["--run-dir", str(run_dir), "--out", str(out), "--checkpoints", "last", "--device", options["device"],
             "--n-examples", str(n), "--pgd-steps", "50", "--pgd-restarts", "10", "--autoattack", "standard"])
        with contextlib.redirect_stdout(sys.stderr):  # progress lines to stderr: stdout carries only JSON
            evaluate.main(eval_args)
        result = json.loads(out.read_text())
    entry = result["checkpoints"]["last"]
    common = {"case": case, "model": options["arch"], "data": data_name, "eps": options["eps"],
              "training": {k: options[k] for k in ("method", "epochs", "pgd_steps", "lr")}, "n_examples": n,
              "clean_acc": entry["clean_acc"]}
    env = environment(torch.device(options["device"]))
    stamp = {"device": env["device"], "device_name": env["device_name"], "cpu_threads": env["cpu_threads"],
             "torch": env["torch"], "autoattack": result["versions"]["autoattack"],
             "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
             "command": " ".join([sys.executable, *sys.argv])}
    lines = []
    for attack, key, name in (("pgd", "pgd_acc", "pgd50x10"), ("aa", "aa_acc", "autoattack_standard")):
        seconds = entry["wall_time_s"][attack]
        line = {**common, "attack": name, "acc": entry[key], "seconds": round(seconds, 2),
                "s_per_1000_examples": round(seconds * 1000 / n, 1)}
        if attack == "aa":
            line["per_attack"] = {a: {"acc_after": v["acc"], "seconds": round(v["wall_time_s"], 2)}
                                  for a, v in entry["autoattack"].items()}
        lines.append({**line, **stamp})
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
    parser.add_argument("--cifar-small", default=str(CIFAR_SMALL), help=f"cifar10_small.npz for the cuda case "
                        f"(default: {CIFAR_SMALL}; random data where absent)")
    args = parser.parse_args()
    cases = args.cases or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    for case in cases:
        for line in run_case(case, args):
            print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
