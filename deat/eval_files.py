"""The evaluation's files: the hashes that identify a result (indices, checkpoint file, weights, settings), the
partial file that makes an evaluation resumable, and the per-checkpoint result cache beside the output.

A result is identified by its settings, its example record and its checkpoints' hashes; a partial file or a cached
result is used only when all of them match (`load_partial`, `read_cache`), so a retrained checkpoint or a changed
setting never reuses old work.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import torch


def indices_sha256(indices: torch.Tensor) -> str:
    """sha256 of the indices written in decimal, comma-separated ("3,17,42"): easy to recompute anywhere."""
    return hashlib.sha256(",".join(str(i) for i in indices.tolist()).encode()).hexdigest()


def partial_path(out: str | Path) -> Path:
    """Progress toward `out`, kept beside it: eval.json -> eval.partial.json. One per output file, so evaluations
    of one run under different settings (eval_<hash>.json) never share one."""
    out = Path(out)
    return out.with_name(f"{out.stem}.partial{out.suffix}")


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_sha256(ckpt: dict[str, Any]) -> str:
    """sha256 of what a checkpoint's predictions depend on: its model_spec and every tensor of its state dict.

    Unlike the file's hash it ignores the epoch, optimizer state and metrics, so best.pt and last.pt that hold
    the same weights (training never improved after that epoch) hash alike.
    """
    digest = hashlib.sha256(json.dumps(ckpt["model_spec"], sort_keys=True).encode())
    for key in sorted(ckpt["model"]):
        tensor = ckpt["model"][key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def settings_sha256(settings: dict[str, Any], examples: dict[str, Any]) -> str:
    """sha256 of the settings and the example record as canonical JSON: together they fix every result."""
    canonical = json.dumps({"settings": settings, "examples": examples}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def same_json(a: Any, b: Any) -> bool:
    """Equality as stored in JSON (tuples become lists), so fresh values compare with ones read back."""
    return json.loads(json.dumps(a)) == json.loads(json.dumps(b))


def read_json(path: Path) -> Any:
    """The file's JSON, or None where it is missing or unreadable (a file cut short by a crash)."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def load_partial(path: Path, identity: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any] | None:
    saved = read_json(path)
    if saved is None:
        return None
    differ = sorted(k for k in identity if not same_json(saved.get(k), identity[k]))
    if differ:
        log(f"{path} was written for other {', '.join(differ)}; ignoring it and starting over")
        return None
    log(f"resuming from {path}")
    return saved


def cache_path(out: Path, weights_sha: str, settings_sha: str, examples: tuple[int, int] | None = None) -> Path:
    """Where a finished checkpoint result is kept: eval_cache/ beside the output, one file per (weights, settings),
    and per examples [start, stop) for a shard's result."""
    part = "" if examples is None else f"_{examples[0]}-{examples[1]}"
    return out.parent / "eval_cache" / f"{weights_sha[:16]}_{settings_sha[:16]}{part}.json"


def read_cache(path: Path, identity: dict[str, Any], weights_sha: str) -> dict[str, Any] | None:
    cached = read_json(path)
    if (cached is None or cached.get("weights_sha256") != weights_sha
            or not all(same_json(cached.get(k), identity[k]) for k in ("settings", "examples"))):
        return None
    return cached["entry"]
