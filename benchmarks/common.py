"""What the benchmark scripts share: one JSON object per line on stdout (also appended to a file when one is
given), and their --quick / full defaults with a check that the sizes are positive."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def emit(line: dict, out: Path | None) -> None:
    text = json.dumps(line)
    print(text, flush=True)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as f:
            f.write(text + "\n")


def fill_defaults(args: argparse.Namespace, defaults: dict, positive: tuple[str, ...]) -> argparse.Namespace:
    """Every option left unset takes `defaults`' value; each of `positive` must then be >= 1 (ValueError)."""
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for name in positive:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args
