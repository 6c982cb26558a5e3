"""What training, evaluation and tracking all need of the process they run in: the device, a record of the
environment for every output file, and the hooks a tracker plugs into a training run. A leaf: it imports torch and
the standard library only, so evaluation and tracking never sit on top of the training loop."""

from __future__ import annotations

import platform
import resource
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from . import __version__


@dataclass
class RunLogger:
    """Hooks a tracker (MLflow, see tracking.py) plugs into; train.py itself never imports one.

    `start` is called once the run directory is known to belong to this config (never for a refused or already
    complete run); `stop(status)` by the caller when the process ends early: "FAILED" or "KILLED".
    """

    start: Callable[[dict[str, Any]], None] = lambda params: None
    epoch: Callable[[dict[str, Any]], None] = lambda record: None
    end: Callable[[dict[str, Any], Path], None] = lambda metrics, out: None
    stop: Callable[[str], None] = lambda status: None


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda when torch sees a GPU, else cpu; any other name as given. Raises RuntimeError for a CUDA
    device that torch cannot see (a job asked for a GPU on a machine without one)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={name!r} was asked for but torch sees no CUDA device")
    return torch.device(name)


def environment(device: torch.device) -> dict[str, Any]:
    """Where a result was computed, recorded in every metrics.json and eval.json: device and its name, torch, deat
    and Python versions, host name and CPU threads."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    return {"device": str(device), "device_name": name, "torch": str(torch.__version__), "deat": __version__,
            "python": platform.python_version(), "hostname": socket.gethostname(),
            "cpu_threads": torch.get_num_threads()}


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak for `peak_memory_mb` on CUDA; the CPU's peak RSS cannot be reset (a process high-water mark)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory in MiB: on CUDA the most memory tensors held since `reset_peak_memory`
    (torch.cuda.max_memory_allocated, FastAT_Benchmark's measure); on the CPU the process's peak resident set size
    so far (getrusage's ru_maxrss, KiB on Linux)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
