"""Checkpoints: plain dicts of tensors and Python values, written atomically, loaded with `weights_only=True`."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT = "deat-checkpoint"
VERSION = 1


def atomic_write(path: str | Path, write: Any) -> None:
    """Call `write(file_object)` on a temporary file beside `path`, then rename it over `path`.

    A crash (even kill -9) leaves either the old file or the new one, never half of one. The file gets the mode a
    plain open() would give it (0666 less the umask): mkstemp's private 0600 would hide results from teammates
    on a shared filesystem.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def current_umask() -> int:
    """The process umask. Read from /proc where it is shown (no change to process state); else set and restored."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_json(path: str | Path, data: Any) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(data, indent=2, allow_nan=False) + "\n").encode()))


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda f: torch.save({"format": FORMAT, "version": VERSION, **state}, f))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and check a deat checkpoint; refuse truncated, foreign or pickled-object files with a clear error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for truncated zips and refused pickles
        raise ValueError(f"checkpoint {path} cannot be loaded safely (corrupt, truncated, or it contains "
                         f"pickled objects that weights_only=True refuses): {err}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"checkpoint {path} is not a deat checkpoint (no format={FORMAT!r} marker)")
    if state.get("version") != VERSION:
        raise ValueError(f"checkpoint {path} has format version {state.get('version')}; this deat reads {VERSION}")
    return state
