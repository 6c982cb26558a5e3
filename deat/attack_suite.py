"""The evaluation's attack cascade on one checkpoint: clean, PGD-10, PGD-k × R restarts, AutoAttack's attacks.

`evaluate_checkpoint` runs each metric not yet done, saving after each (and after each AutoAttack attack) so that a
killed evaluation resumes where it stopped, then `summarize`: the accuracies, the per-example worst case and the
masking checks, all computed from the per-example outcomes (so a merge of shards computes them the same way).
Every robust accuracy follows ROBUST_RULE. Every attack runs block by block (`deat.shards`): on each block of
batch_size consecutive examples, on that block's survivors only, with a generator seeded by
block_seed(attack_seed, block). Progress lines: each attack's start and end with its time, and every `interval_s`
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
from .shards import block_seed

METRICS = ("clean", "pgd10", "pgd", "aa")  # computed in this order, each saved before the next starts
PGD10_STEPS = 10
ATTACK_SEED = 0
ROBUST_RULE = "an example is robust only if no iterate of any restart of any attack misclassifies it"


# ------------------------------------------------------------------------------------------- evaluation

def _progress_line(label: str, what: str, acc: float, n_examples: int, attacked: int | None,
                   seconds: float) -> str:
    """"best pgd10: acc 43.00% of 100 examples (58 attacked), 2.1 s, 27.6 examples/s": the accuracy is over every
    example evaluated, the attack ran on the `attacked` ones still robust before it (None: no attack, clean);
    the rate counts attacked examples."""
    done = n_examples if attacked is None else attacked
    rate = f"{done / seconds:.1f}" if seconds > 0 else "—"
    which = "" if attacked is None else f" ({attacked} attacked)"
    return f"{label} {what}: acc {acc:.2%} of {n_examples} examples{which}, {seconds:.1f} s, {rate} examples/s"


def _blocks(n: int, batch_size: int) -> list[tuple[int, int]]:
    """(start, stop) of each block of batch_size consecutive positions in range(n)."""
    return [(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def _generator(device: torch.device, attack_seed: int, block: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(block_seed(attack_seed, block))


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


def _run_autoattack(model, x, y, settings, entry, label, save, log, interval_s, first_block=0) -> None:
    """AutoAttack's attacks one at a time on the still-robust examples; progress saved after each attack.

    entry["autoattack"] maps each finished attack to the accuracy after it and its seconds; entry["aa_robust"]
    holds the positions (in x) still robust, the state a resumed run starts from. Each attack goes through
    pyautoattack block by block: one call per block of `batch_size` examples on that block's survivors (one
    pyautoattack batch, so its own loop and per-batch reseeding are kept), with seed block_seed(attack_seed,
    first_block + block), so progress lines can report the examples done and no block's result depends on another.
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
        survived, finished = [], 0
        if settings["eps"] > 0:
            for block, (start, stop) in enumerate(_blocks(len(y), batch_size)):
                index = attacked[(attacked >= start) & (attacked < stop)]
                if len(index) == 0:
                    continue
                survived.append(index[autoattack_survivors(
                    model, x[index], y[index], attack, settings["eps"], settings["norm"], batch_size,
                    block_seed(settings["attack_seed"], first_block + block), num_classes)])
                finished += len(index)
                progress.update(finished, len(attacked))
        robust = torch.cat(survived) if survived else attacked  # eps 0: nothing attacked, all survive
        seconds = progress.elapsed()
        entry["aa_robust"] = entry["robust_positions"][f"aa/{attack}"] = robust.tolist()
        done[attack] = {"acc": len(robust) / len(y), "wall_time_s": seconds}
        save()
        log(_progress_line(label, f"aa/{attack}", len(robust) / len(y), len(y), len(attacked), seconds))


def _pgd_block(model, x, y, start, stop, settings, block, steps, step_size, restarts, progress) -> torch.Tensor:
    """(stop - start,) bool: robust_mask on the block's examples x[start:stop], with the block's own generator.

    One block is at most one batch, so each restart attacks the block's survivors in one batch, as robust_mask
    did on a whole evaluation of n <= batch_size examples before blocks existed.
    """
    def on_batch(done: int, total: int) -> None:
        progress.update(start * restarts + done, len(y) * restarts)

    return robust_mask(model, x[start:stop], y[start:stop], settings["eps"], step_size, steps, settings["norm"],
                       restarts, settings["batch_size"], _generator(x.device, settings["attack_seed"], block),
                       on_batch=on_batch)


def evaluate_checkpoint(model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: dict[str, Any],
                        entry: dict[str, Any], label: str, save: Callable[[], None],
                        log: Callable[[str], None], interval_s: float = 30.0, first_block: int = 0) -> None:
    """Fill entry[f"{metric}_acc"] and entry["wall_time_s"][metric] for each metric not already there, then
    entry["worst_case_acc"], entry["skipped_attacks"], entry["masking_checks"] and entry["masking_flags"].

    x: (n, C, H, W) in [0, 1] and y: (n,), the examples of consecutive blocks first_block, first_block + 1, ... of
    the evaluation subset (all of it, or one shard's). `entry` is this checkpoint's part of the progress record;
    `save()` persists it after every finished step. entry["robust_positions"][metric] keeps which examples (0-based
    positions in x) each metric left robust: the per-example outcomes the summary and a merge of shards use.
    """
    times = entry.setdefault("wall_time_s", {})
    positions = entry.setdefault("robust_positions", {})
    n, batch_size = len(y), settings["batch_size"]
    blocks = _blocks(n, batch_size)
    entry["skipped_attacks"] = dict(settings.get("autoattack_skipped", {}))
    for attack, reason in entry["skipped_attacks"].items():
        log(f"{label} aa/{attack}: skipped: {reason}")
    for metric in METRICS:
        if metric in times:
            acc = entry[f"{metric}_acc"]
            log(f"{label} {metric}: done earlier" + ("" if acc is None else f", acc {acc:.2%}"))
            continue
        started = time.perf_counter()
        attacked = len(positions["clean"]) if "clean" in positions else None
        if metric == "clean":
            correct = _correct(model, x, y, batch_size)
            zero = sum(int(zero_gradient_mask(model, x[a:b][correct[a:b]], y[a:b][correct[a:b]], batch_size).sum())
                       for a, b in blocks)
            entry["masking_checks"] = {"zero_gradient_examples": zero}
            robust = correct
        elif metric in ("pgd10", "pgd"):
            steps, step_size, restarts = ((PGD10_STEPS, settings["pgd10_step_size"], 1) if metric == "pgd10" else
                                          (settings["pgd_steps"], settings["pgd_step_size"], settings["pgd_restarts"]))
            unit = "examples" if restarts == 1 else "examples x restarts (at most: restarts attack survivors)"
            progress = Progress(log, f"{label} {metric}", n * restarts, interval_s, unit)
            robust = torch.cat([_pgd_block(model, x, y, a, b, settings, first_block + block, steps, step_size,
                                           restarts, progress) for block, (a, b) in enumerate(blocks)])
        elif settings["autoattack"] == "none" or not settings["autoattack_attacks"]:
            entry["aa_acc"], times["aa"] = None, None
            save()
            continue
        else:
            _run_autoattack(model, x, y, settings, entry, label, save, log, interval_s, first_block)
            robust = torch.zeros(n, dtype=torch.bool, device=x.device)
            robust[torch.tensor(entry.pop("aa_robust"), dtype=torch.long, device=x.device)] = True
        positions[metric] = robust.nonzero().squeeze(1).tolist()
        acc = len(positions[metric]) / n
        seconds = time.perf_counter() - started
        if metric == "aa":  # the sum over attacks, some of which may have run before a resume
            seconds = sum(a["wall_time_s"] for a in entry["autoattack"].values())
        entry[f"{metric}_acc"], times[metric] = acc, seconds
        save()
        log(_progress_line(label, metric, acc, n, attacked, seconds))
    summarize(entry, {**settings, "n_examples": n})
    save()


def summarize(entry: dict[str, Any], settings: dict[str, Any]) -> None:
    """Every accuracy of a checkpoint's entry, its worst case and its masking checks and flags, from the
    per-example outcomes entry["robust_positions"] of settings["n_examples"] examples (fractions of them).

    The same computation for an unsharded evaluation and for a merge of shards (`deat.shards.merge_entries`),
    so that both give the same numbers from the same outcomes. Needs entry["masking_checks"]
    ["zero_gradient_examples"] and, for AutoAttack, entry["autoattack"][attack] of each attack run.
    """
    n, positions = settings["n_examples"], entry["robust_positions"]
    for metric in METRICS:
        if metric in positions:
            entry[f"{metric}_acc"] = len(positions[metric]) / n
    if "autoattack" in entry:
        entry["autoattack"] = {attack: {"acc": len(positions[f"aa/{attack}"]) / n,
                                        **{k: v for k, v in record.items() if k != "acc"}}
                               for attack, record in entry["autoattack"].items()}
    robust_everywhere = set(positions["clean"]).intersection(*positions.values())
    ce_attacks = [positions[k] for k in ("pgd10", "pgd", "aa/apgd-ce") if k in positions]
    entry["worst_case_acc"] = len(robust_everywhere) / n
    entry["masking_checks"]["ce_worst_case_acc"] = len(set(positions["clean"]).intersection(*ce_attacks)) / n
    entry["masking_flags"] = masking_flags(entry, settings)
