"""Blocks, shards and their merge: how one checkpoint's evaluation splits into jobs that give the unsplit result.

Blocks: the evaluation subset (the sorted test indices of `deat.evaluate.select_examples`) is cut into consecutive
blocks of `batch_size` examples, the last one possibly shorter: block b holds the positions [b·batch_size,
min((b+1)·batch_size, n)). Every attack of the evaluation (PGD-10, PGD-k × R, each AutoAttack attack) runs block by
block on that block's survivors only, its random generator seeded with `block_seed(attack_seed, b)`: an example's
outcome depends on its block alone, never on which other blocks a job evaluates. Block 0 is seeded with
attack_seed itself, so an evaluation of n_examples <= batch_size is bit for bit what it was before blocks existed.

Shards: shard i of N (1-based, written "i/N") evaluates the whole blocks [⌊(i-1)·B/N⌋, ⌊i·B/N⌋) of the B
blocks: contiguous, in order, sizes differing by at most one block. N may not exceed B. A shard writes its
per-example outcomes (positions in the evaluation subset that each attack left robust); `merge_entries` joins
the shards of one checkpoint into the entry an unsharded evaluation builds, from which `attack_suite.summarize`
computes accuracies, the worst case and the masking checks exactly as for an unsharded one.

This module imports no torch: the workflow calls it while Snakemake parses the config.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from pathlib import Path
from typing import Any


def n_blocks(n_examples: int, batch_size: int) -> int:
    """Blocks of batch_size consecutive examples in n_examples (the last one may be shorter)."""
    return -(-n_examples // batch_size)


def block_seed(attack_seed: int, block: int) -> int:
    """Seed of every attack's random generator in block `block`: attack_seed for block 0, else the first 4 bytes
    (big-endian) of sha256(f"{attack_seed},{block}"), a seed below 2**32 that no neighbouring (attack_seed,
    block) pair shares. Recomputable anywhere: block_seed(0, 1) = int(hashlib.sha256(b"0,1").hexdigest()[:8], 16).
    """
    if block < 0:
        raise ValueError(f"block must be >= 0, got {block}")
    if block == 0:
        return attack_seed
    return int.from_bytes(hashlib.sha256(f"{attack_seed},{block}".encode()).digest()[:4], "big")


def parse_shard(text: str) -> tuple[int, int]:
    """"2/4" -> (2, 4): the index (1-based) and count of a shard. ValueError naming the value otherwise."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if match is None or not 1 <= int(match[1]) <= int(match[2]):
        raise ValueError(f"shard={text!r} is invalid; expected I/N with 1 <= I <= N, e.g. 2/4")
    return int(match[1]), int(match[2])


def too_many_shards(count: int, n_examples: int, batch_size: int) -> str | None:
    """Why `count` shards cannot split n_examples in blocks of batch_size (None when they can)."""
    blocks = n_blocks(n_examples, batch_size)
    if count <= blocks:
        return None
    smaller = -(-n_examples // count)  # the largest batch_size that makes `count` blocks
    return (f"{count} shards but {n_examples} examples make only {blocks} block(s) of batch_size {batch_size}: "
            f"use at most {blocks} shards, or a batch_size of at most {smaller}")


def split(n_examples: int, batch_size: int, count: int) -> list[tuple[int, int]]:
    """[(start, stop)] example positions of each of `count` shards, in order; ValueError if count > blocks."""
    reason = too_many_shards(count, n_examples, batch_size) if count >= 1 else f"shards must be >= 1, got {count}"
    if reason:
        raise ValueError(reason)
    blocks = n_blocks(n_examples, batch_size)
    edges = [min(i * blocks // count * batch_size, n_examples) for i in range(count + 1)]
    return list(itertools.pairwise(edges))


def shard_examples(n_examples: int, batch_size: int, index: int, count: int) -> tuple[int, int]:
    """(start, stop) example positions of shard index/count (1-based index)."""
    return split(n_examples, batch_size, count)[index - 1]


def shard_of(start: int, stop: int, n_examples: int, batch_size: int) -> tuple[int, int]:
    """(index, count) of the fewest shards whose split has the shard [start, stop); ValueError if none has."""
    for count in range(1, n_blocks(n_examples, batch_size) + 1):
        ranges = split(n_examples, batch_size, count)
        if (start, stop) in ranges:
            return ranges.index((start, stop)) + 1, count
    raise ValueError(f"examples [{start}, {stop}) are no shard of {n_examples} examples in blocks of {batch_size}")


def shard_path(out: str | Path, start: int, stop: int) -> Path:
    """The shard file of examples [start, stop) of the evaluation written to `out`: eval_X.json ->
    eval_X.shard_<start>-<stop>.json. Named by its examples, not by i/N, so a shard finished under one shard
    count is found again under another whose split has the same range."""
    out = Path(out)
    return out.with_name(f"{out.stem}.shard_{start}-{stop}{out.suffix}")


def merged_from(out: str | Path) -> list[Path]:
    """The shard files an existing evaluation file was merged from (recorded in its environment); [] for an
    unsharded or unreadable one."""
    try:
        record = json.loads(Path(out).read_text()).get("environment", {}).get("shards") or []
        return [shard_path(out, *shard["examples"]) for shard in record]
    except (OSError, ValueError, TypeError, AttributeError):
        return []


def globalize(entry: dict[str, Any], start: int) -> dict[str, Any]:
    """A shard's checkpoint entry with its robust positions moved from the shard's own (0-based) to the subset's."""
    positions = {k: [p + start for p in v] for k, v in entry["robust_positions"].items()}
    return {**{k: v for k, v in entry.items() if k != "aa_robust"}, "robust_positions": positions}


def _sum_or_none(values: list[float | None]) -> float | None:
    return None if any(v is None for v in values) else sum(values)


def merge_entries(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One checkpoint's entry from its shards' entries (in example order, positions already global): robust
    positions concatenated, zero-gradient counts and wall times summed (seconds of all shards together).

    The accuracies, worst case and masking checks are left to `attack_suite.summarize`, which computes them from
    these per-example outcomes as it does for an unsharded evaluation. ValueError if the shards disagree on the
    checkpoint's weights or on what ran.
    """
    first = parts[0]
    for key in ("weights_sha256", "epoch", "skipped_attacks"):
        values = {json.dumps(p.get(key), sort_keys=True) for p in parts}
        if len(values) > 1:
            raise ValueError(f"the shards disagree on {key}: {sorted(values)}")
    if len({tuple(p["robust_positions"]) for p in parts}) > 1 or len({tuple(p["autoattack"]) for p in parts}) > 1:
        raise ValueError("the shards ran different attacks: " + "; ".join(sorted(
            {", ".join(p["robust_positions"]) for p in parts})))
    reused = {p.get("reused_from") for p in parts}
    entry = {"epoch": first["epoch"], "weights_sha256": first["weights_sha256"],
             "reused_from": reused.pop() if len(reused) == 1 else None,
             "skipped_attacks": first["skipped_attacks"],
             "wall_time_s": {m: _sum_or_none([p["wall_time_s"][m] for p in parts]) for m in first["wall_time_s"]},
             "robust_positions": {k: [i for p in parts for i in p["robust_positions"][k]]
                                  for k in first["robust_positions"]},
             "autoattack": {a: {"wall_time_s": sum(p["autoattack"][a]["wall_time_s"] for p in parts)}
                            for a in first["autoattack"]},
             "masking_checks": {"zero_gradient_examples": sum(p["masking_checks"]["zero_gradient_examples"]
                                                              for p in parts)}}
    if first.get("aa_acc", 0) is None:
        entry["aa_acc"] = None
    return entry


def check_coverage(ranges: list[tuple[int, int]], n_examples: int, batch_size: int, names: list[str]) -> None:
    """ValueError unless the shards' [start, stop) ranges, in order, tile [0, n_examples) along block edges."""
    at = 0
    for (start, stop), name in zip(ranges, names):
        if start != at:
            what = "overlaps the one before" if start < at else f"leaves examples [{at}, {start}) unevaluated"
            raise ValueError(f"shard file {name} (examples [{start}, {stop})) {what}")
        if start % batch_size or (stop % batch_size and stop != n_examples):
            raise ValueError(f"shard file {name} (examples [{start}, {stop})) does not start and end on blocks of "
                             f"batch_size {batch_size}")
        at = stop
    if at != n_examples:
        raise ValueError(f"the shards cover examples [0, {at}) of {n_examples}: examples [{at}, {n_examples}) are "
                         f"missing")
