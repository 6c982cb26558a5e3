"""Checks that the fast path stays right, for benchmarks/gpu_check.sh (numerics and accuracy need CUDA).

    PYTHONPATH=. python3 benchmarks/fast_check.py numerics --npz .bench_data/cifar10_small.npz \
        --out OUT/numerics.jsonl
    PYTHONPATH=. python3 benchmarks/fast_check.py accuracy --npz .bench_data/cifar10_small.npz \
        --out OUT/accuracy.jsonl
    PYTHONPATH=. python3 benchmarks/fast_check.py summary OUT

numerics: the same initial weights, batches and attack seed, trained for --steps iterations under a cosine lr
that changes every iteration, along five paths: fp32 eager (the reference) and once more, fp32 CUDA graph, and
bf16 + channels_last eager and CUDA graph. cuDNN is made deterministic and fp32 is true fp32 (no TF32), so
eager vs eager shows the remaining run-to-run noise and fp32 graph vs eager differs only by the graph-safe
update's rounding (deat/fast.py), amplified by PGD's sign(). Exact checks: the attack generator's final state
(the graphs drew the same random numbers), DEAT's step counts, and that DEAT's step t changed only the buffer of
t's parity. Tight checks on the first replayed step (step 2; step 1 runs eagerly on every path, so both paths
enter it with the same weights): its loss, and its update ‖θ2_a − θ2_b‖ / ‖θ2_b − θ1_b‖. A loose check on the
whole loss trajectory: over later steps the update's float rounding, passed through PGD's sign(), grows into
visibly different attacks, so later steps agree only statistically. One JSON line per (method, pair).
accuracy: deat.train.train on the npz for --epochs, fp32 eager vs bf16 + channels_last + CUDA graph, for each
seed and method; one JSON line per run with the per-epoch robust and clean test accuracies.
summary: short tables of every *.jsonl in a folder (throughput, numerics, accuracy, and the lines of
benchmarks/bf16_check.py and benchmarks/autoattack_check.py) against the issues' targets.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from deat.config import METHODS, TrainConfig, outer_step_of
from deat.data import Batches
from deat.fast import CudaGraphStep
from deat.models import build_model
from deat.optim import build_optimizer, build_scheduler
from deat.objectives import adversarial_step

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import augment_of, load_images  # noqa: E402  (the sibling script's data loading)

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py beside this script
from common import emit  # noqa: E402

PATHS = {  # name -> (precision, channels_last, cuda_graph)
    "fp32 eager": ("fp32", False, False),
    "fp32 eager again": ("fp32", False, False),
    "fp32 graph": ("fp32", False, True),
    "bf16-cl eager": ("bf16", True, False),
    "bf16-cl graph": ("bf16", True, True),
}
FIRST_REPLAY = 2  # the step every tight check looks at (see the docstring)
# (a, b, first replay: max relative loss and update difference, whole trajectory: max relative loss difference);
# None: reported, not checked
PAIRS = (
    ("fp32 eager again", "fp32 eager", 1e-6, 1e-6, 1e-6),
    ("fp32 graph", "fp32 eager", 1e-5, 1e-3, 0.05),
    ("bf16-cl graph", "bf16-cl eager", 1e-5, 1e-3, 0.05),
    ("bf16-cl eager", "fp32 eager", None, None, None),
    ("bf16-cl graph", "fp32 eager", None, None, 0.05),
)
FAST_OPTIONS = {"precision": "bf16", "channels_last": True, "cuda_graph": True}
TARGETS = {"at_images_per_s_bs128": 4000, "at_images_per_s_bs512_plus": 7000, "deat_over_pgd_at": 1.01,
           "batch_share": 0.02, "at_images_per_s_bs128_issue25": 6000, "autoattack_10k_s": 120}
TARGETS_10K = 10_000  # images of the AutoAttack target


# ------------------------------------------------------------------------------------------- numerics

def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().flatten().double() for t in tensors])


def deat_buffers(optimizer) -> tuple[torch.Tensor, torch.Tensor] | None:
    """DEAT's (odd, even) buffers flattened, or None before its first step."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if any(p not in optimizer.state for p in params):
        return None
    states = [optimizer.state[p] for p in params]
    return flat(s["odd_momentum"] for s in states), flat(s["even_momentum"] for s in states)


def run_path(method: str, path: str, init_state: dict, inputs: list, images: dict, args) -> dict:
    precision, channels_last, graph = PATHS[path]
    cfg = TrainConfig(dataset="cifar10", arch=args.arch, method=method, batch_size=args.batch_size,
                      precision=precision, channels_last=channels_last, cuda_graph=graph).resolved()
    device = torch.device("cuda")
    model = build_model(args.arch, images["num_classes"], in_channels=images["x"].shape[1], mean=images["mean"],
                        std=images["std"]).to(device)
    model.load_state_dict(init_state)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(method, model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay, k1=cfg.k1, k2=cfg.k2,
                                decoupled_weight_decay=cfg.decoupled_weight_decay)
    scheduler = build_scheduler(optimizer, "cosine", epochs=1, iters_per_epoch=len(inputs))
    attack_gen = torch.Generator(device=device).manual_seed(1)
    if graph:  # one eager step, then both DEAT parities are captured and each graph replayed several times
        step = CudaGraphStep(model, optimizer, cfg, attack_gen, eager_steps=1)
    else:
        step = functools.partial(adversarial_step, model, optimizer, cfg=cfg, attack_gen=attack_gen)
    model.train()
    losses, alternation, snapshots = [], [], {}
    for t, (x, y) in enumerate(inputs, 1):
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        before = deat_buffers(optimizer) if outer_step_of(method) == "deat" else None
        if t == FIRST_REPLAY:
            snapshots["before_first_replay"] = flat(model.parameters())
        loss, _ = step(x, y)
        if t == FIRST_REPLAY:
            snapshots["after_first_replay"] = flat(model.parameters())
        losses.append(loss.item())
        if before is not None:
            after = deat_buffers(optimizer)  # DEAT's step t feeds the odd buffer when t is odd, the even one otherwise
            changed = tuple(not torch.equal(b, a) for b, a in zip(before, after))
            alternation.append(changed == (t % 2 == 1, t % 2 == 0))
        scheduler.step()
    states = [optimizer.state[p] for p in model.parameters()]
    buffers = [s["momentum_buffer"] for s in states] if outer_step_of(method) == "sgd" else (
        [s["odd_momentum"] for s in states] + [s["even_momentum"] for s in states])
    return {"losses": losses, "params": flat(model.parameters()), "buffers": flat(buffers),
            "step_counts": sorted({s.get("step") for s in states}, key=str), "generator": attack_gen.get_state(),
            "alternation_ok": all(alternation) if outer_step_of(method) == "deat" else None, **snapshots}


def compare(a: dict, b: dict, init: torch.Tensor) -> dict:
    loss_diffs = [abs(x - y) for x, y in zip(a["losses"], b["losses"])]
    return {
        "max_loss_diff": max(loss_diffs),
        "max_loss_rel": max(d / max(abs(y), 1e-12) for d, y in zip(loss_diffs, b["losses"])),
        "first_replay_loss_rel": loss_diffs[FIRST_REPLAY - 1] / max(abs(b["losses"][FIRST_REPLAY - 1]), 1e-12),
        "first_replay_update_rel": ((a["after_first_replay"] - b["after_first_replay"]).norm()
                                    / (b["after_first_replay"] - b["before_first_replay"]).norm()).item(),
        "update_rel_diff": ((a["params"] - b["params"]).norm() / (b["params"] - init).norm()).item(),
        "buffer_rel_diff": ((a["buffers"] - b["buffers"]).norm() / b["buffers"].norm().clamp_min(1e-30)).item(),
        "generator_state_equal": torch.equal(a["generator"], b["generator"]),
        "step_counts_equal": a["step_counts"] == b["step_counts"],
    }


def numerics(args) -> int:
    if not torch.cuda.is_available():
        raise RuntimeError("numerics compares CUDA paths; no CUDA device is visible")
    torch.backends.cudnn.deterministic = True  # eager vs eager exact: differences then come from the paths
    torch.backends.cudnn.benchmark = False
    # True fp32: with TF32 convolutions a one-ulp weight difference can cross a TF32 rounding step, which PGD's
    # sign() then amplifies; the bf16 paths show the fast path at reduced precision.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    device = torch.device("cuda")
    images = load_images(args, device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    batches = iter(Batches(images["x"], images["y"], args.batch_size, shuffle=True, drop_last=True,
                           augment=augment_of(images["x"]), generator=gen))
    inputs = [next(batches) for _ in range(args.steps)]
    torch.manual_seed(args.seed)
    init_model = build_model(args.arch, images["num_classes"], in_channels=images["x"].shape[1],
                             mean=images["mean"], std=images["std"]).to(device)
    init_state = {k: v.clone() for k, v in init_model.state_dict().items()}
    init = flat(init_model.parameters())
    failures = 0
    for method in args.methods:
        results = {path: run_path(method, path, init_state, inputs, images, args) for path in PATHS}
        measured = {(a, b): compare(results[a], results[b], init) for a, b, *_ in PAIRS}
        reference = measured[("bf16-cl eager", "fp32 eager")]["max_loss_rel"]
        for a, b, replay_loss_tol, replay_update_tol, loss_tol in PAIRS:
            found = measured[(a, b)]
            exact = found["generator_state_equal"] and found["step_counts_equal"] and all(
                results[p]["alternation_ok"] in (True, None) for p in (a, b))
            if a == "bf16-cl graph" and b == "fp32 eager":
                loss_tol = max(loss_tol, 2 * reference)  # bf16 itself moves the loss this much
            within = lambda value, tol: tol is None or value <= tol  # noqa: E731
            ok = exact and within(found["first_replay_loss_rel"], replay_loss_tol) and within(
                found["first_replay_update_rel"], replay_update_tol) and within(found["max_loss_rel"], loss_tol)
            failures += not ok
            emit({"check": "numerics", "method": method, "arch": args.arch, "batch_size": args.batch_size,
                  "steps": args.steps, "pair": f"{a} vs {b}", **found, "first_replay_loss_tol": replay_loss_tol,
                  "first_replay_update_tol": replay_update_tol, "loss_tol": loss_tol, "alternation_ok": results[a]["alternation_ok"], "pass": ok,
                  "losses_a": [round(v, 6) for v in results[a]["losses"]],
                  "losses_b": [round(v, 6) for v in results[b]["losses"]],
                  "device_name": torch.cuda.get_device_name(device), "torch": str(torch.__version__)}, args.out)
    return 1 if failures else 0


# ------------------------------------------------------------------------------------------- accuracy

def accuracy(args) -> int:
    from deat.train import train

    work = Path(tempfile.mkdtemp(prefix="deat-fast-check-"))
    modes = {"fp32 eager": {}, "bf16-cl graph": FAST_OPTIONS}
    for seed in args.seeds:
        for method in args.methods:
            for mode, options in modes.items():
                cfg = TrainConfig.from_dict({
                    "dataset": f"npz:{args.npz}", "arch": args.arch, "method": method, "seed": seed,
                    "epochs": args.epochs, "batch_size": args.batch_size, "eval_examples": args.eval_examples,
                    "device": "cuda", "log_interval_s": 3600.0, "out": str(work / f"{method}_{mode}_{seed}"),
                    **options}, source="fast_check accuracy")
                started = time.perf_counter()
                metrics = train(cfg, log=lambda message: print(message, file=sys.stderr, flush=True))
                epochs = metrics["epochs"]
                emit({"check": "accuracy", "method": method, "mode": mode, "seed": seed, "arch": args.arch,
                      "epochs": args.epochs, "batch_size": args.batch_size, "lr": cfg.lr,
                      "test_pgd_acc": [e["test_pgd_acc"] for e in epochs],
                      "test_clean_acc": [e["test_clean_acc"] for e in epochs],
                      "val_pgd_acc": [e["val_pgd_acc"] for e in epochs],
                      "train_images_per_s": [round(e["images_per_s"], 1) for e in epochs],
                      "wall_time_s": round(time.perf_counter() - started, 1),
                      "device_name": metrics["environment"]["device_name"], "torch": str(torch.__version__)},
                     args.out)
    return 0


# ------------------------------------------------------------------------------------------- summary

def read_lines(folder: Path) -> list[dict]:
    lines = []
    for path in sorted(folder.glob("*.jsonl")):
        lines += [json.loads(text) for text in path.read_text().splitlines() if text.strip()]
    return lines


def summary(args) -> int:
    lines = read_lines(Path(args.folder))
    speed = [line for line in lines if "at_ms_per_step" in line or ("error" in line and "mode" in line)]
    if speed:
        print(f"throughput ({speed[0]['device_name']}, torch {speed[0]['torch']}, {speed[0]['data']}):")
        print(f"{'arch':16} {'bs':>5} {'variant':34} {'method':7} {'AT img/s':>9} {'AT ms':>8} "
              f"{'clean img/s':>11} {'DEAT/AT':>8} {'batch %':>8}")
    for line in speed:
        variant = f"{line['precision']}{'-cl' if line['channels_last'] else ''}:{line['mode']}" + (
            f"({line['compile_mode']})" if line.get("compile_mode") else "")
        if "error" in line:
            print(f"{line['arch']:16} {line['batch_size']:>5} {variant:34} {line['method']:7} {line['error'][:70]}")
            continue
        ratio = "-" if line["deat_over_pgd_at"] is None else f"{line['deat_over_pgd_at']:.3f}"
        print(f"{line['arch']:16} {line['batch_size']:>5} {variant:34} {line['method']:7} "
              f"{line['at_images_per_s']:>9.0f} {line['at_ms_per_step']:>8.2f} {line['clean_images_per_s']:>11.0f} "
              f"{ratio:>8} {100 * line['batch_share']:>7.2f}%")
    measured = [line for line in speed if "error" not in line and line["arch"] == "preact_resnet18"]
    if measured:
        print("targets (preact_resnet18, PGD-AT step, best variant):")
        for label, picked, key, target, higher in (
                ("bs 128 img/s >= 4000", [m for m in measured if m["batch_size"] == 128 and m["method"] == "pgd_at"],
                 "at_images_per_s", TARGETS["at_images_per_s_bs128"], True),
                ("bs 128 img/s >= 6000 (#25)", [m for m in measured if m["batch_size"] == 128
                                                and m["method"] == "pgd_at"],
                 "at_images_per_s", TARGETS["at_images_per_s_bs128_issue25"], True),
                ("bs >= 512 img/s >= 7000", [m for m in measured if m["batch_size"] >= 512 and m["method"] == "pgd_at"],
                 "at_images_per_s", TARGETS["at_images_per_s_bs512_plus"], True),
                ("DEAT / PGD-AT <= 1.01", [m for m in measured if m["method"] == "deat" and m["deat_over_pgd_at"]],
                 "deat_over_pgd_at", TARGETS["deat_over_pgd_at"], False),
                ("batch share < 2 %", measured, "batch_share", TARGETS["batch_share"], False)):
            if not picked:
                continue
            best = (max if higher else min)(picked, key=lambda m: m[key])
            met = best[key] >= target if higher else best[key] <= target
            print(f"  {label:26} {'met' if met else 'MISSED':7} best {best[key]} "
                  f"(bs {best['batch_size']}, {best['precision']}{'-cl' if best['channels_last'] else ''}:"
                  f"{best['mode']})")
    checks = [line for line in lines if line.get("check") == "numerics"]
    if checks:
        print("numerics (first replay: rel loss and update diff; trajectory: max rel loss diff, rel update diff; "
              "generator/steps/alternation exact):")
    for line in checks:
        print(f"  {line['method']:7} {line['pair']:34} first replay {line['first_replay_loss_rel']:.1e} "
              f"{line['first_replay_update_rel']:.1e}  trajectory {line['max_loss_rel']:.1e} "
              f"{line['update_rel_diff']:.1e} exact {line['generator_state_equal']}/{line['step_counts_equal']}/"
              f"{line['alternation_ok']}  {'PASS' if line['pass'] else 'FAIL'}")
    summarise_bf16(lines)
    summarise_autoattack(lines)
    runs = [line for line in lines if line.get("check") == "accuracy"]
    if runs:
        print("accuracy (last-epoch robust test accuracy, PGD-10; mean ± sd over seeds):")
    for method in sorted({r["method"] for r in runs}):
        finals = {}
        for mode in sorted({r["mode"] for r in runs}):
            values = [r["test_pgd_acc"][-1] for r in runs if r["method"] == method and r["mode"] == mode]
            if not values:  # a run cut short by the time limit
                continue
            finals[mode] = values
            sd = statistics.stdev(values) if len(values) > 1 else float("nan")
            print(f"  {method:7} {mode:14} {statistics.mean(values):.4f} ± {sd:.4f}  (n={len(values)}: "
                  f"{', '.join(f'{v:.4f}' for v in values)})")
        if len(finals) == 2:
            (mode_a, a), (mode_b, b) = finals.items()
            pooled = [statistics.stdev(v) for v in (a, b) if len(v) > 1]
            noise = statistics.mean(pooled) if pooled else float("nan")
            print(f"  {method:7} {mode_a} − {mode_b}: {statistics.mean(a) - statistics.mean(b):+.4f}, "
                  f"seed sd (pooled) {noise:.4f}")
    return 0


def summarise_bf16(lines: list[dict]) -> None:
    """benchmarks/bf16_check.py's lines: each objective's attack under each precision against IEEE fp32."""
    checks = [line for line in lines if line.get("check") == "bf16"]
    if checks:
        print(f"bf16 fidelity ({checks[0]['arch']}, {checks[0]['data']}, batch {checks[0]['batch_size']}; against "
              f"IEEE fp32; pass: agreement >= 0.99 and |loss rel| <= 0.02):")
    for line in checks:
        verdict = {True: "PASS", False: "FAIL", None: ""}[line["pass"]]
        print(f"  {line['objective']:7} {line['precision']:12} first-step sign agreement "
              f"{line['first_step_agreement']:.4f}  attack loss {line['attack_loss_rel']:+.4f}  "
              f"attack {line['attack_ms']:.1f} ms  {verdict}")


def summarise_autoattack(lines: list[dict]) -> None:
    """benchmarks/autoattack_check.py's lines; from its chunks alone when a time limit cut the run short."""
    chunks = [line for line in lines if line.get("check") == "autoattack_chunk"]
    final = [line for line in lines if line.get("check") == "autoattack"]
    for line in final:
        if "error" in line:
            print(f"autoattack: {line['error']}")
            continue
        verdict = "" if line["met"] is None else ("met" if line["met"] else "MISSED")
        print(f"autoattack standard ({line['arch']}, {line['data']}; {line['checkpoint']}): {line['wall_s']:.1f} s, "
              f"{line['images_per_s']:.1f} images/s, clean {line['clean_acc']:.3f}, AA {line['aa_acc']:.3f}; "
              f"per attack {line['per_attack_s']}; target <= {line['target_s']} s for 10k: {verdict}")
    if chunks and not [line for line in final if "error" not in line]:
        last = chunks[-1]
        rate = last["images_done"] / last["seconds_so_far"]
        print(f"autoattack standard: cut short after {last['images_done']} images in {last['seconds_so_far']:.1f} s "
              f"({rate:.1f} images/s; 10k images would take about {TARGETS_10K / rate:.0f} s: "
              f"{'MISSED' if TARGETS_10K / rate > TARGETS['autoattack_10k_s'] else 'met'} by extrapolation)")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("numerics", "fast paths vs fp32 eager, step by step (CUDA)"),
                            ("accuracy", "a few epochs fast vs fp32 eager, robust accuracy per seed (CUDA)")):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("--npz", help="data (deat.data npz); numerics falls back to synthetic images")
        command.add_argument("--arch", default="preact_resnet18", help="architecture (default preact_resnet18)")
        command.add_argument("--methods", nargs="+", default=["pgd_at", "deat"], choices=METHODS,
                             help="methods (deat.config.METHODS; default pgd_at deat)")
        command.add_argument("--batch-size", type=int, default=128)
        command.add_argument("--seed", type=int, default=0)
        command.add_argument("--out", type=Path, help="also append the JSON lines to this file")
    numerics_parser, accuracy_parser = commands.choices["numerics"], commands.choices["accuracy"]
    numerics_parser.add_argument("--steps", type=int, default=8, help="training iterations per path (default 8)")
    numerics_parser.add_argument("--synthetic-images", type=int, default=2048)
    accuracy_parser.add_argument("--epochs", type=int, default=4)
    accuracy_parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    accuracy_parser.add_argument("--eval-examples", type=int, default=500, help="test images per epoch")
    summary_parser = commands.add_parser("summary", help="tables of the JSON lines in a folder")
    summary_parser.add_argument("folder")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.command == "accuracy" and not args.npz:
        raise ValueError("accuracy: --npz is required (robust accuracy on synthetic labels means nothing)")
    return {"numerics": numerics, "accuracy": accuracy, "summary": summary}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
