"""The evaluation's attack cascade on one checkpoint: clean, PGD-10, PGD-k × R restarts, AutoAttack's attacks.

`evaluate_checkpoint` runs each metric not yet done, saving after each (and after each AutoAttack attack) so that a
killed evaluation resumes where it stopped, then the per-example worst case and the masking checks. Every robust
accuracy follows ROBUST_RULE. Progress lines: each attack's start and end with its time, and every `interval_s`
seconds the examples done with an ETA.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
from torch import nn

from .attacks import robust_mask
from .autoattack_runner import autoattack_survivors
from .masking import masking_flags, zero_gradient_mask

METRICS = ("clean", "pgd10", "pgd", "aa")  # computed in this order, each saved before the next starts
PGD10_STEPS = 10
ATTACK_SEED = 0
ROBUST_RULE = "an example is robust only if no iterate of any restart of any attack misclassifies it"


# ------------------------------------------------------------------------------------------- evaluation

def _progress_line(label: str, what: str, acc: float, n_examples: int, seconds: float) -> str:
    rate = f"{n_examples / seconds:.1f}" if seconds > 0 else "—"
    return f"{label} {what}: acc {acc:.2%} on {n_examples} examples, {seconds:.1f} s, {rate} examples/s"


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


class Progress:
    """Start, periodic and end lines for one attack: examples done, elapsed time and an ETA from the rate so far.

    `update(done, total)` logs at most every `interval_s` seconds; the ETA assumes the remaining examples cost
    what the done ones did (for PGD restarts `total` counts every example in every restart: an upper bound, so
    the ETA is one too).
    """

    def __init__(self, log: Callable[[str], None], what: str, total: int, interval_s: float,
                 unit: str = "examples") -> None:
        self.log, self.what, self.interval_s, self.unit = log, what, interval_s, unit
        self.started = self.last = time.perf_counter()
        log(f"{what}: started on {total} {unit}")

    def update(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if now - self.last < self.interval_s or done <= 0:
            return
        self.last = now
        elapsed = now - self.started
        log_eta = _duration(elapsed / done * max(total - done, 0))
        self.log(f"{self.what}: {done}/{total} {self.unit}, {_duration(elapsed)} elapsed, ETA {log_eta}")

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


@torch.no_grad()
def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(N,) bool: whether model classifies each example correctly, batch by batch."""
    return torch.cat([model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]
                      for i in range(0, len(y), batch_size)])


def _run_autoattack(model, x, y, settings, entry, label, save, log, interval_s) -> None:
    """AutoAttack's attacks one at a time on the still-robust examples; progress saved after each attack.

    entry["autoattack"] maps each finished attack to the accuracy after it and its seconds; entry["aa_robust"]
    holds the positions (in x) still robust, the state a resumed run starts from. Each attack goes through
    pyautoattack one batch of `batch_size` examples at a time (what its own loop does, with the same per-batch
    seed, so the result is the same) so that progress lines can report the examples done.
    """
    done = entry.setdefault("autoattack", {})
    if "aa_robust" not in entry:
        entry["aa_robust"] = _correct(model, x, y, settings["batch_size"]).nonzero().squeeze(1).tolist()
    batch_size, num_classes = settings["batch_size"], settings.get("num_classes")
    for attack in settings["autoattack_attacks"]:
        if attack in done:
            log(f"{label} aa/{attack}: done earlier, acc {done[attack]['acc']:.2%}")
            continue
        attacked = torch.tensor(entry["aa_robust"], dtype=torch.long, device=x.device)
        progress = Progress(log, f"{label} aa/{attack}", len(attacked), interval_s)
        survived = []
        if settings["eps"] > 0:
            for i in range(0, len(attacked), batch_size):
                index = attacked[i:i + batch_size]
                survived.append(autoattack_survivors(model, x[index], y[index], attack, settings["eps"],
                                                     settings["norm"], batch_size, settings["attack_seed"],
                                                     num_classes))
                progress.update(i + len(index), len(attacked))
        robust = attacked[torch.cat(survived)] if survived else attacked
        seconds = progress.elapsed()
        entry["aa_robust"] = entry["robust_positions"][f"aa/{attack}"] = robust.tolist()
        done[attack] = {"acc": len(robust) / len(y), "wall_time_s": seconds}
        save()
        log(_progress_line(label, f"aa/{attack}", len(robust) / len(y), len(attacked), seconds))


def evaluate_checkpoint(model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: dict[str, Any],
                        entry: dict[str, Any], label: str, save: Callable[[], None],
                        log: Callable[[str], None], interval_s: float = 30.0) -> None:
    """Fill entry[f"{metric}_acc"] and entry["wall_time_s"][metric] for each metric not already there, then
    entry["worst_case_acc"], entry["skipped_attacks"] and entry["masking_flags"].

    `entry` is this checkpoint's part of the progress record; `save()` persists it after every finished step.
    entry["robust_positions"][metric] keeps which examples each metric left robust (for the worst case).
    """
    times = entry.setdefault("wall_time_s", {})
    positions = entry.setdefault("robust_positions", {})
    n, batch_size, eps, norm = len(y), settings["batch_size"], settings["eps"], settings["norm"]
    entry["skipped_attacks"] = dict(settings.get("autoattack_skipped", {}))
    for attack, reason in entry["skipped_attacks"].items():
        log(f"{label} aa/{attack}: skipped: {reason}")
    for metric in METRICS:
        if metric in times:
            acc = entry[f"{metric}_acc"]
            log(f"{label} {metric}: done earlier" + ("" if acc is None else f", acc {acc:.2%}"))
            continue
        started = time.perf_counter()
        if metric == "clean":
            correct = _correct(model, x, y, batch_size)
            zero = zero_gradient_mask(model, x[correct], y[correct], batch_size)
            entry["masking_checks"] = {"zero_gradient_examples": int(zero.sum())}
            robust = correct
        elif metric in ("pgd10", "pgd"):
            steps, step_size, restarts = ((PGD10_STEPS, settings["pgd10_step_size"], 1) if metric == "pgd10" else
                                          (settings["pgd_steps"], settings["pgd_step_size"], settings["pgd_restarts"]))
            generator = torch.Generator(device=x.device).manual_seed(settings["attack_seed"])
            unit = "examples" if restarts == 1 else "examples x restarts (at most: restarts attack survivors)"
            progress = Progress(log, f"{label} {metric}", n * restarts, interval_s, unit)
            robust = robust_mask(model, x, y, eps, step_size, steps, norm, restarts, batch_size, generator,
                                 on_batch=progress.update)
        elif settings["autoattack"] == "none" or not settings["autoattack_attacks"]:
            entry["aa_acc"], times["aa"] = None, None
            save()
            continue
        else:
            _run_autoattack(model, x, y, settings, entry, label, save, log, interval_s)
            robust = torch.zeros(n, dtype=torch.bool, device=x.device)
            robust[torch.tensor(entry.pop("aa_robust"), dtype=torch.long, device=x.device)] = True
        positions[metric] = robust.nonzero().squeeze(1).tolist()
        acc = len(positions[metric]) / n
        seconds = time.perf_counter() - started
        if metric == "aa":  # the sum over attacks, some of which may have run before a resume
            seconds = sum(a["wall_time_s"] for a in entry["autoattack"].values())
        entry[f"{metric}_acc"], times[metric] = acc, seconds
        save()
        log(_progress_line(label, metric, acc, n, seconds))
    robust_everywhere = set(positions["clean"]).intersection(*positions.values())
    ce_attacks = [positions[k] for k in ("pgd10", "pgd", "aa/apgd-ce") if k in positions]
    entry["worst_case_acc"] = len(robust_everywhere) / n
    entry["masking_checks"]["ce_worst_case_acc"] = len(set(positions["clean"]).intersection(*ce_attacks)) / n
    entry["masking_flags"] = masking_flags(entry, settings)
    save()
