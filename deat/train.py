"""Train one adversarially robust classifier (PGD-AT, TRADES, MART or fast AT, with SGD-momentum or DEAT), with per-epoch checkpoints and exact resume.

    python -m deat train --dataset cifar10 --arch preact_resnet18 --method deat --lr 0.1 --batch-size 128 \\
        --seed 0 --epochs 110 --out results/runs/example

Run directory layout: while training, `running/` holds the resumable state (`checkpoint.pt` after every epoch,
`best.pt`, `metrics.json`); on completion `last.pt`, `best.pt` and `metrics.json` are published in the run
directory and `running/` is removed. Rerunning the same command continues from the last complete epoch.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import math
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .attacks import clean_accuracy, robust_accuracy
from .checkpoint import atomic_write, load_checkpoint, save_checkpoint, write_json
from .config import TrainConfig, add_config_arguments, config_from_args, run_identity
from .data import Batches, augment_policy, load_dataset
from .effective import effective_decay, effective_step
from .fast import build_train_step
from .models import build_model
from .objectives import adversarial_step, attacks_in_training, autocast
from .optim import build_optimizer, build_scheduler
from .averaging import WeightAverage
from .guards import is_collapse
from .probes import PROBE_SEED, gradient_noise, probe_set, probe_steps, update_noise
from .runtime import RunLogger, environment, peak_memory_mb, reset_peak_memory, resolve_device

EVAL_SEED = 0  # per-epoch evaluation uses the same attack starts every epoch, so curves are comparable
LOG_FILE = "train.log"  # every line of every attempt, in the run directory once published
# What a resumed attempt takes over from the checkpoint (the rest is recomputed from the config).
RESUMED_KEYS = ("epochs", "best", "last", "best_ema", "last_ema", "wall_time_s", "attempts", "collapses",
                "peak_memory_mb", "stopped_early", "started_at")
# How peak memory is measured (metrics.json `memory`, beside `peak_memory_mb` and each epoch's value).
MEMORY_KIND = {"cuda": "CUDA max allocated per epoch (torch.cuda.max_memory_allocated)",
               "cpu": "peak resident set size of the process so far (getrusage ru_maxrss)"}


def train_one_epoch(model, optimizer, scheduler, batches, cfg, attack_gen, epoch, log,
                    step: Callable | None = None, average: WeightAverage | None = None) -> dict[str, float]:
    """One pass over `batches`. `step(x, y) -> (loss, n_correct)` defaults to the eager `adversarial_step`;
    `train` passes the one `fast.build_train_step` chose (CUDA graphs, torch.compile or eager). `average`, the
    weight average of `cfg.ema_tau`, is updated after every optimizer step."""
    step = step or functools.partial(adversarial_step, model, optimizer, cfg=cfg, attack_gen=attack_gen)
    model.train()
    loss_sum = torch.zeros((), device=batches.x.device)
    correct = torch.zeros((), device=batches.x.device, dtype=torch.long)
    seen, start, last_log = 0, time.perf_counter(), time.perf_counter()
    for i, (x, y) in enumerate(batches, 1):
        if cfg.channels_last and x.is_cuda:  # a CUDA-only option, like bf16: the CPU keeps the plain path
            x = x.contiguous(memory_format=torch.channels_last)
        loss, n_correct = step(x, y)
        scheduler.step()
        if average is not None:
            average.update(model)
        loss_sum += loss * len(y)
        correct += n_correct
        seen += len(y)
        if time.perf_counter() - last_log > cfg.log_interval_s:  # .item() syncs: only at log steps
            last_log = time.perf_counter()
            rate = seen / (last_log - start)
            log(f"  epoch {epoch} [{i}/{len(batches)}] loss {loss_sum.item() / seen:.4f} "
                f"robust acc {correct.item() / seen:.2%} {rate:.0f} img/s, epoch ETA "
                f"{_hms((len(batches) - i) * (last_log - start) / i)}")
    if batches.x.device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    train_loss = loss_sum.item() / max(seen, 1)
    if not math.isfinite(train_loss):
        raise FloatingPointError(f"training loss is {train_loss} in epoch {epoch} (lr {cfg.lr}, method "
                                 f"{cfg.method}): the run diverged; lower the learning rate")
    return {"train_loss": train_loss, "train_robust_acc": correct.item() / max(seen, 1),
            "images_per_s": seen / elapsed, "epoch_time_s": elapsed}


@torch.no_grad()
def evaluate_epoch(model, data, test_index, cfg: TrainConfig) -> dict[str, float]:
    """Clean and PGD accuracy on the validation split (picks best.pt) and the test split (the paper's curve)."""
    model.eval()
    step = 2.5 * cfg.eps / cfg.eval_pgd_steps
    result = {}
    for split, x, y in (("val", data.val_x, data.val_y), ("test", data.test_x[test_index], data.test_y[test_index])):
        if len(y) == 0:
            result[f"{split}_clean_acc"] = result[f"{split}_pgd_acc"] = None
            continue
        x = x.float() / 255
        gen = torch.Generator(device=x.device).manual_seed(EVAL_SEED)
        with autocast(cfg, x.device):
            result[f"{split}_clean_acc"] = clean_accuracy(model, x, y)
            result[f"{split}_pgd_acc"] = robust_accuracy(model, x, y, cfg.eps, step, cfg.eval_pgd_steps, cfg.norm,
                                                         generator=gen)
    return result


def rng_state(device: torch.device, data_gen: torch.Generator, attack_gen: torch.Generator) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "data": data_gen.get_state(), "attack": attack_gen.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, Any], device: torch.device, data_gen, attack_gen) -> None:
    torch.set_rng_state(state["torch"])
    data_gen.set_state(state["data"])
    attack_gen.set_state(state["attack"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def check_same_run(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Refuse to continue or publish `path` under a config whose run identity differs (see config.run_identity)."""
    saved_identity, current_identity = run_identity(saved), run_identity(current)
    differ = {k: (saved_identity.get(k), v) for k, v in current_identity.items() if saved_identity.get(k) != v}
    if differ:
        details = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in sorted(differ.items()))
        raise ValueError(f"{path} belongs to a different run ({details}); "
                         f"use another --out or delete that directory")


def _device_detail(device: torch.device, environment: dict[str, Any]) -> str:
    """" (NVIDIA H200)" for the start line; "" when the name only repeats the device ("cpu (cpu)")."""
    return "" if environment["device_name"] == str(device) else f" ({environment['device_name']})"


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def train(cfg: TrainConfig, logger: RunLogger | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train (or resume, or skip if complete) the run in `cfg.out`; returns the metrics dict written there."""
    process_started = time.perf_counter()
    if cfg.out is None:
        raise ValueError("out: a run directory is required (--out DIR)")
    logger = logger or RunLogger()
    out, running = Path(cfg.out), Path(cfg.out) / "running"
    final_metrics = out / "metrics.json"
    cfg.validate()
    resolved = cfg.resolved().to_dict()
    if final_metrics.is_file():
        done = _read_json(final_metrics)
        check_same_run(done["config"], resolved, final_metrics)
        shutil.rmtree(running, ignore_errors=True)  # left over if a crash hit between publishing and cleanup
        log(f"{final_metrics} exists: run already complete, nothing to do")
        return done
    published = _republish(out, resolved, log)
    if published is not None:
        return published

    device = resolve_device(cfg.device)
    cfg = cfg.resolved()
    data = load_dataset(cfg.dataset, cfg.data_root, cfg.val_size).to(device)
    torch.manual_seed(cfg.seed)
    model_spec = {"arch": cfg.arch, "num_classes": data.num_classes, "in_channels": data.train_x.shape[1],
                  "mean": list(data.mean), "std": list(data.std), "width": cfg.width}
    model = build_model(model_spec["arch"], model_spec["num_classes"], in_channels=model_spec["in_channels"],
                        mean=model_spec["mean"], std=model_spec["std"], width=cfg.width).to(device)
    if cfg.channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg.method, model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay, k1=cfg.k1, k2=cfg.k2,
                                decoupled_weight_decay=cfg.decoupled_weight_decay)
    data_gen = torch.Generator(device=device).manual_seed(cfg.seed)
    attack_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1_000_003)
    batches = Batches(data.train_x, data.train_y, cfg.batch_size, shuffle=True, drop_last=True,
                      augment=augment_policy(cfg.augment, data), generator=data_gen)
    scheduler = build_scheduler(optimizer, cfg.schedule, cfg.epochs, len(batches), cfg.milestones, cfg.gamma)
    average = WeightAverage(model, cfg.ema_tau, cfg.epochs * len(batches)) if cfg.ema_tau > 0 else None
    probes = probe_set(len(data.train_y), cfg.probe_batches, cfg.batch_size, cfg.seed) if cfg.probe_every else None
    n_test = len(data.test_y)
    test_index = torch.randperm(n_test, generator=torch.Generator().manual_seed(EVAL_SEED))[:cfg.eval_examples]
    test_index = test_index.sort().values.to(device)

    config = cfg.to_dict()
    metrics: dict[str, Any] = {"config": config, "status": "running", "environment": environment(device),
                               "effective_step": effective_step(cfg.method, cfg.lr, cfg.momentum, cfg.k1),
                               "effective_decay": effective_decay(cfg.method, cfg.lr, cfg.momentum, cfg.k1,
                                                                  cfg.weight_decay, cfg.decoupled_weight_decay),
                               "model": model_spec, "epochs": [], "best": None, "last": None, "wall_time_s": 0.0,
                               "attempts": [], "collapses": [], "memory": MEMORY_KIND[device.type],
                               # Unix seconds of the first attempt's start and of publication (mlflow-import dates).
                               "started_at": time.time(), "finished_at": None,
                               "peak_memory_mb": None,
                               "data": {f"n_{split}": len(getattr(data, f"{split}_y")) for split in ("train", "val",
                                                                                                   "test")}}
    if average is not None:
        metrics.update(best_ema=None, last_ema=None)
    checkpoint_path = running / "checkpoint.pt"
    history = running / LOG_FILE
    if checkpoint_path.is_file():
        state = load_checkpoint(checkpoint_path, map_location=device)
        check_same_run(state["config"], config, checkpoint_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        restore_rng(state["rng"], device, data_gen, attack_gen)
        if average is not None:
            average.load_state_dict(state["ema"])
        # `last` too: a run killed after its final epoch's checkpoint resumes straight into publication.
        metrics.update({k: v for k, v in state["metrics"].items() if k in RESUMED_KEYS})
        for line in (history.read_text().splitlines() if history.is_file() else []):
            log(line)  # the earlier attempts' lines, so this job's log holds the whole run
    running.mkdir(parents=True, exist_ok=True)
    log = _RunLog(history, log)
    with _nothing_left_if_nothing_kept(history, checkpoint_path):
        attempt = {"attempt": len(metrics["attempts"]) + 1, "started": _now(), "host": socket.gethostname(),
                   "pid": os.getpid(), "first_epoch": len(metrics["epochs"]) + 1, "last_epoch": None, "wall_time_s": 0.0}
        metrics["attempts"].append(attempt)
        if attempt["attempt"] > 1:
            log(f"=== resuming {out} after epoch {len(metrics['epochs'])} of {cfg.epochs}: attempt {attempt['attempt']} "
                f"(the lines above are from earlier attempts) ===")

        def account_time() -> None:  # this attempt's time so far, and the run's over every attempt
            attempt["wall_time_s"] = time.perf_counter() - process_started
            metrics["wall_time_s"] = sum(a["wall_time_s"] for a in metrics["attempts"])

        step = build_train_step(model, optimizer, cfg, attack_gen, log)
        start_epoch = len(metrics["epochs"]) + 1
        log(f"{cfg.method} {cfg.arch} on {cfg.dataset}: lr {cfg.lr} batch {cfg.batch_size} seed {cfg.seed}, "
            f"{len(batches)} iterations/epoch on {device}" + _device_detail(device, metrics["environment"]))
        logger.start({**config, **{f"model_{k}": v for k, v in model_spec.items()},
                      "effective_step": metrics["effective_step"]})
        for record in metrics["epochs"]:  # epochs finished before a crash: the tracker logs those it has not got
            logger.epoch(record)

        select = "val_pgd_acc" if attacks_in_training(cfg) else "val_clean_acc"
        guard = attacks_in_training(cfg) and len(data.val_y) > 0
        stopped = metrics.get("stopped_early")
        for epoch in range(start_epoch, cfg.epochs + 1):
            if stopped:
                break
            started = time.perf_counter()
            reset_peak_memory(device)
            record = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"]}
            record.update(train_one_epoch(model, optimizer, scheduler, batches, cfg, attack_gen, epoch, log, step,
                                          average))
            if probes is not None and epoch % cfg.probe_every == 0:
                record.update(_probe(model, optimizer, data, probes, cfg, epoch, metrics["effective_step"],
                                     [data_gen, attack_gen]))
            record.update(evaluate_epoch(model, data, test_index, cfg))
            if average is not None:
                record.update({f"ema_{k}": v for k, v in evaluate_epoch(average.averaged(model), data, test_index,
                                                                        cfg).items()})
            record["peak_memory_mb"] = peak_memory_mb(device)
            record["epoch_wall_time_s"] = time.perf_counter() - started
            metrics["peak_memory_mb"] = max(metrics["peak_memory_mb"] or 0.0, record["peak_memory_mb"])
            best_before = max((r["val_pgd_acc"] for r in metrics["epochs"] if r["val_pgd_acc"] is not None), default=None)
            collapsed = guard and is_collapse(record["val_pgd_acc"], best_before, cfg.co_drop)
            record["co_collapse"] = float(collapsed) if guard else None  # MLflow epoch/co_collapse: 1 at a collapse
            metrics["epochs"].append(record)
            if collapsed:
                collapse = {"epoch": epoch, "val_pgd_acc": record["val_pgd_acc"], "best_before": best_before,
                            "drop": cfg.co_drop}
                metrics["collapses"].append(collapse)
                log(f"WARNING: catastrophic overfitting at epoch {epoch}: validation PGD accuracy "
                    f"{_pct(record['val_pgd_acc'])}, more than {cfg.co_drop:.0%} below its best so far "
                    f"{_pct(best_before)}" + ("; stopping, the run keeps epoch " f"{epoch - 1}" if cfg.co_early_stop
                                              else ""))
                if cfg.co_early_stop:  # the collapsed weights are not kept: last.pt is the epoch before
                    metrics["stopped_early"] = stopped = {"epoch": epoch, "kept_epoch": epoch - 1,
                                                          "reason": "catastrophic overfitting"}
                    account_time()
                    _update_saved_metrics(checkpoint_path, metrics)
                    write_json(running / "metrics.json", metrics)
                    logger.epoch(record)
                    break
            summary = {k: record[k] for k in ("epoch", "val_clean_acc", "val_pgd_acc", "test_pgd_acc", "test_clean_acc")}
            metrics["last"] = summary
            # best.pt is picked on held-out training images, never on the test set: by PGD accuracy, or by clean
            # accuracy for standard training (K = 0); without a validation split the latest epoch stands in.
            if metrics["best"] is None or record[select] is None or record[select] > metrics["best"][select]:
                metrics["best"] = summary
                save_checkpoint(running / "best.pt", {"config": config, "model_spec": model_spec, "epoch": epoch,
                                                      "model": model.state_dict(), "metrics": summary})
            state = {"config": config, "model_spec": model_spec, "epoch": epoch, "model": model.state_dict(),
                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "rng": rng_state(device, data_gen, attack_gen)}
            if average is not None:
                _track_average(metrics, record, running, config, model_spec, epoch, average, select)
                state["ema"] = average.state_dict()
            attempt["last_epoch"] = epoch
            account_time()
            save_checkpoint(checkpoint_path, {**state, "metrics": metrics})
            write_json(running / "metrics.json", metrics)
            logger.epoch(record)
            log(_epoch_line(record, cfg.epochs, eta_s=(cfg.epochs - epoch) * metrics["wall_time_s"] / epoch))

        for name, source in (("last.pt", checkpoint_path), ("best.pt", running / "best.pt")):
            atomic_write(out / name, lambda f, source=source: f.write(source.read_bytes()))
        if average is not None:
            last_state = load_checkpoint(checkpoint_path)
            save_checkpoint(out / "last_ema.pt", {"config": config, "model_spec": model_spec,
                                                  "epoch": last_state["epoch"], "model": last_state["ema"]["model"],
                                                  "metrics": metrics["last_ema"]})
            atomic_write(out / "best_ema.pt", lambda f: f.write((running / "best_ema.pt").read_bytes()))
        metrics["status"] = "complete"
        metrics["finished_at"] = time.time()
        account_time()
        write_json(final_metrics, metrics)
        shutil.move(str(history), out / LOG_FILE)
        log.path = out / LOG_FILE
        shutil.rmtree(running)
        logger.end(metrics, out)
        log(f"done: best epoch {metrics['best']['epoch']} (val PGD {_pct(metrics['best']['val_pgd_acc'])}), "
            f"last test PGD {_pct(metrics['last']['test_pgd_acc'])}, {_hms(metrics['wall_time_s'])} in all"
            + (f" over {len(metrics['attempts'])} attempts" if len(metrics["attempts"]) > 1 else ""))
        return metrics


def _probe(model, optimizer, data, probes: torch.Tensor, cfg: TrainConfig, epoch: int, effective: float,
           generators: list[torch.Generator]) -> dict[str, float]:
    """The mechanism probes of deat/probes.py at the current weights, as `probe_*` keys of the epoch's record."""
    started = time.perf_counter()
    probe_gen = torch.Generator(device=data.train_x.device).manual_seed(cfg.seed + PROBE_SEED + epoch)
    minibatches = [(data.train_x[i].float() / 255, data.train_y[i]) for i in probes.to(data.train_x.device)]
    step = functools.partial(adversarial_step, model, optimizer, cfg=cfg, attack_gen=probe_gen)
    grads, updates = probe_steps(model, optimizer, minibatches, step, generators)
    found = {**gradient_noise(grads, cfg.batch_size, len(data.train_y)), **update_noise(updates)}
    lr = found["lr"] = optimizer.param_groups[0]["lr"]  # the lr of the probe's steps: the epoch's last
    found["diffusion"] = lr / cfg.batch_size * found["grad_trace_sigma"]
    found["diffusion_effective"] = effective * lr / cfg.lr / cfg.batch_size * found["grad_trace_sigma"]
    found["time_s"] = time.perf_counter() - started
    return {f"probe_{k}": v for k, v in found.items()}


def _track_average(metrics: dict[str, Any], record: dict[str, Any], running: Path, config: dict[str, Any],
                   model_spec: dict[str, Any], epoch: int, average: WeightAverage, select: str) -> None:
    """The averaged model's last and best summaries; best_ema.pt when its validation accuracy improves (chosen on
    the validation split, like best.pt)."""
    summary = {k: record[f"ema_{k}"] for k in ("val_clean_acc", "val_pgd_acc", "test_pgd_acc", "test_clean_acc")}
    summary = {"epoch": epoch, **summary}
    metrics["last_ema"] = summary
    best = metrics["best_ema"]
    if best is None or summary[select] is None or summary[select] > best[select]:
        metrics["best_ema"] = summary
        save_checkpoint(running / "best_ema.pt", {"config": config, "model_spec": model_spec, "epoch": epoch,
                                                  "model": average.model.state_dict(), "metrics": summary})


def _update_saved_metrics(checkpoint_path: Path, metrics: dict[str, Any]) -> None:
    """Put the final metrics (an early stop) into the resumable checkpoint that becomes last.pt, so that a
    metrics.json lost later is published again from it whole."""
    state = load_checkpoint(checkpoint_path)
    save_checkpoint(checkpoint_path, {**state, "metrics": metrics})


@contextlib.contextmanager
def _nothing_left_if_nothing_kept(history: Path, checkpoint_path: Path):
    """An attempt that fails before any epoch was kept (a full disk, a bad dataset, a crash at the first step)
    leaves no log behind in running/: nothing half-written, and the next attempt starts as the first."""
    try:
        yield
    except BaseException:
        if not checkpoint_path.is_file():
            history.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                history.parent.rmdir()  # only if empty
        raise


class _RunLog:
    """`log`, and every line also appended to `path`: the run's own log, kept over every attempt (a workflow
    engine truncates a job's log before it reruns the job). `path` moves to the run directory on publication."""

    def __init__(self, path: Path, log: Callable[[str], None]) -> None:
        self.path, self.log = path, log

    def __call__(self, line: str) -> None:
        self.log(line)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _republish(out: Path, config: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any] | None:
    """metrics.json again from a finished run's last.pt, when only metrics.json is gone; None when there is none.

    A workflow engine deletes a job's declared output before it reruns the job (Snakemake does, for --forceall or
    a changed rule). last.pt is the final epoch's full checkpoint, metrics included, so the finished run is
    published again in a second instead of being trained again; the checkpoints themselves are never touched.
    """
    last, best = out / "last.pt", out / "best.pt"
    if not (last.is_file() and best.is_file()) or (out / "running" / "checkpoint.pt").is_file():
        return None
    state = load_checkpoint(last)
    check_same_run(state["config"], config, last)
    if state["epoch"] != state["config"]["epochs"] and not state["metrics"].get("stopped_early"):
        return None
    metrics = {**state["metrics"], "status": "complete"}
    write_json(out / "metrics.json", metrics)
    shutil.rmtree(out / "running", ignore_errors=True)
    log(f"{out} finished earlier (last.pt holds epoch {state['epoch']} of {state['epoch']}): metrics.json "
        f"written again from it, nothing trained")
    return metrics


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.2%}"


def _epoch_line(r: dict[str, Any], epochs: int, eta_s: float) -> str:
    return (f"epoch {r['epoch']}/{epochs} | lr {r['lr']:.4g} | loss {r['train_loss']:.4f} | "
            f"train robust {_pct(r['train_robust_acc'])} | val clean/PGD {_pct(r['val_clean_acc'])}/"
            f"{_pct(r['val_pgd_acc'])} | test clean/PGD {_pct(r['test_clean_acc'])}/{_pct(r['test_pgd_acc'])} | "
            f"{r['images_per_s']:.0f} img/s | {r['epoch_time_s']:.1f} s | ETA {_hms(eta_s)}")


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    return parser


def main(args: argparse.Namespace) -> int:
    train(config_from_args(args))
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
