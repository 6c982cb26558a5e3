"""Per-job GPU leasing with OS file locks.

Snakemake's `--resources gpu=N` caps how many GPU jobs run at once but tells no job which card to use. Each
`python -m deat train|evaluate` therefore leases a card itself, before anything touches CUDA:

    lease = lease_gpu("results/locks/gpu", runs_per_gpu=1)  # sets CUDA_VISIBLE_DEVICES=<card id>
    import torch  # now sees exactly the leased card

A card has `runs_per_gpu` slots, one lock file each: `lock_dir/gpu{id}.slot{k}.lock`. A slot is held by an exclusive
`flock` on an open file descriptor, so the kernel releases it when the process exits, even on `kill -9`; that is why
the lock is the flock and not the file's existence, and why lock files are never deleted (deleting a file another
process is about to flock would let two processes lock two different inodes under one name).

The ids are those of one machine, so all jobs that share a `lock_dir` must run on the same node.

Stdlib only: importing torch here would initialise CUDA before CUDA_VISIBLE_DEVICES is set.
"""

from __future__ import annotations

import fcntl
import os
import re
import socket
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

FAKE_GPU_COUNT_VAR = "DEAT_FAKE_GPU_COUNT"
# Held only while a process probes the slots and takes one, so that concurrent jobs see a consistent count of
# held slots: without it two jobs starting together could both pick the emptiest card.
SELECTION_LOCK_NAME = "lease.lock"
NVIDIA_SMI_TIMEOUT_S = 30


def visible_gpus() -> list[str]:
    """The ids of the cards this process may use, in the order CUDA_VISIBLE_DEVICES accepts them.

    Sources, first match wins: DEAT_FAKE_GPU_COUNT=n (tests) gives "0".."n-1"; CUDA_VISIBLE_DEVICES (set by SLURM or
    the user) gives its comma-separated entries, none when empty; otherwise the indices nvidia-smi lists, none when
    nvidia-smi is missing or fails.
    """
    fake_count = os.environ.get(FAKE_GPU_COUNT_VAR)
    if fake_count is not None:
        if not fake_count.strip().isdigit():
            raise ValueError(f"{FAKE_GPU_COUNT_VAR} must be a non-negative integer, got {fake_count!r}")
        return [str(index) for index in range(int(fake_count))]
    cuda_visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cuda_visible is not None:
        return [entry.strip() for entry in cuda_visible.split(",") if entry.strip()]
    try:
        listing = subprocess.run(
            ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=True,
            timeout=NVIDIA_SMI_TIMEOUT_S,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in listing.stdout.splitlines() if line.strip().isdigit()]


@dataclass
class GpuLease:
    """One held slot of one card; the slot stays held while `fd` is open.

    Dropping the object does not release the slot: the descriptor stays open until `release()` or process exit, so a
    CLI may lease once and forget about it.
    """

    gpu_id: str
    slot: int
    lock_path: Path
    fd: int

    @property
    def held(self) -> bool:
        return self.fd >= 0

    def release(self) -> None:
        """Free the slot (idempotent). CUDA_VISIBLE_DEVICES is left as is: CUDA may already be using the card."""
        if not self.held:
            return
        os.ftruncate(self.fd, 0)  # an empty lock file reads as free to a human
        os.close(self.fd)  # closing the last descriptor drops the flock
        self.fd = -1

    def __enter__(self) -> GpuLease:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def lease_gpu(
    lock_dir: str | Path,
    runs_per_gpu: int = 1,
    timeout_s: float | None = None,
    poll_s: float = 0.5,
) -> GpuLease:
    """Take a free slot on the least-used visible card and point CUDA_VISIBLE_DEVICES at that card.

    Cards are filled spread-first: a job goes to the card with the fewest held slots (ties: the first in
    `visible_gpus()` order), so with 4 cards and runs_per_gpu=2 the first 4 jobs land on 4 different cards.
    When every slot is held, polls every `poll_s` seconds; `timeout_s=None` waits forever, `timeout_s=0` tries once.

    Raises RuntimeError when no card is visible (the caller decides whether to fall back to CPU) and TimeoutError
    when no slot frees within `timeout_s`.
    """
    if isinstance(runs_per_gpu, bool) or not isinstance(runs_per_gpu, int) or runs_per_gpu < 1:
        raise ValueError(f"runs_per_gpu must be an integer >= 1, got {runs_per_gpu!r}")
    if timeout_s is not None and timeout_s < 0:
        raise ValueError(f"timeout_s must be >= 0 or None (wait forever), got {timeout_s!r}")
    if poll_s <= 0:
        raise ValueError(f"poll_s must be > 0 seconds, got {poll_s!r}")
    gpu_ids = visible_gpus()
    if not gpu_ids:
        raise RuntimeError(
            f"no visible GPUs to lease ({FAKE_GPU_COUNT_VAR}, CUDA_VISIBLE_DEVICES and nvidia-smi list none)"
        )
    lock_dir = Path(lock_dir)
    lock_dir.mkdir(parents=True, exist_ok=True)

    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        lease = _try_lease(lock_dir, gpu_ids, runs_per_gpu)
        if lease is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = lease.gpu_id
            return lease
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError(
                f"no free GPU slot in {lock_dir} after {timeout_s:g} s: all {len(gpu_ids) * runs_per_gpu} slots"
                f" ({len(gpu_ids)} GPU(s) x runs_per_gpu={runs_per_gpu}) are held"
            )
        pause_s = poll_s if deadline is None else min(poll_s, max(deadline - time.monotonic(), 0.0))
        time.sleep(pause_s)


def _try_lease(lock_dir: Path, gpu_ids: list[str], runs_per_gpu: int) -> GpuLease | None:
    """One pass over all slots under the selection lock: the lease of the emptiest card, or None when all are held."""
    selection_fd = os.open(lock_dir / SELECTION_LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(selection_fd, fcntl.LOCK_EX)  # held for microseconds: probing never waits
        free_slots = {
            gpu_id: [slot for slot in range(runs_per_gpu) if _slot_is_free(_lock_path(lock_dir, gpu_id, slot))]
            for gpu_id in gpu_ids
        }
        # sorted() is stable, so equally used cards keep visible_gpus() order.
        for gpu_id in sorted(gpu_ids, key=lambda gpu_id: runs_per_gpu - len(free_slots[gpu_id])):
            for slot in free_slots[gpu_id]:
                lease = _try_lock(gpu_id, slot, _lock_path(lock_dir, gpu_id, slot))
                if lease is not None:
                    return lease
        return None
    finally:
        os.close(selection_fd)


def _lock_path(lock_dir: Path, gpu_id: str, slot: int) -> Path:
    # Ids may be UUIDs or MIG names ("MIG-GPU-<uuid>/1/0"); keep them to one safe path component.
    safe_id = re.sub(r"[^A-Za-z0-9._-]", "_", gpu_id)
    return lock_dir / f"gpu{safe_id}.slot{slot}.lock"


def _slot_is_free(lock_path: Path) -> bool:
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # also drops the probe's lock


def _try_lock(gpu_id: str, slot: int, lock_path: Path) -> GpuLease | None:
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        # A process that flocks slot files without the selection lock (e.g. by hand) can still get there first.
        os.close(fd)
        return None
    # Truncate only after locking: before it, the file belongs to whoever holds it.
    os.ftruncate(fd, 0)
    since = datetime.now(timezone.utc).isoformat(timespec="seconds")
    os.pwrite(fd, f"pid={os.getpid()} host={socket.gethostname()} since={since}\n".encode(), 0)
    return GpuLease(gpu_id=gpu_id, slot=slot, lock_path=lock_path, fd=fd)
