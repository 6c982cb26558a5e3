"""GPU leasing: concurrent jobs, each a real process holding a real flock, get distinct cards; and, on a CUDA
device (skipped without one), every method's GPU path: bf16 and fp32 training attacks against IEEE fp32, the
captured bf16 step of every objective against the eager one, and the input check of the public attacks."""

import contextlib
import functools
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import deat.objectives
from deat.attacks import pgd
from deat.config import TrainConfig, outer_step_of
from deat.fast import CudaGraphStep
from deat.gpu import FAKE_GPU_COUNT_VAR, lease_gpu, visible_gpus
from deat.models import build_model
from deat.optim import build_optimizer, build_scheduler

REPO_ROOT = Path(__file__).resolve().parents[1]
WAIT_S = 10  # upper bound for any one wait; a passing test takes a fraction of a second per wait

# A training job in miniature: lease a card, report it, hold it until told to release (or killed).
HOLDER_SCRIPT = """
import os, sys, time
from deat.gpu import lease_gpu

lock_dir, runs_per_gpu, report_path, release_path = sys.argv[1:]
lease = lease_gpu(lock_dir, runs_per_gpu=int(runs_per_gpu), poll_s=0.05)
with open(report_path + ".tmp", "w") as report:
    report.write(f"{lease.gpu_id} {lease.slot} {os.environ['CUDA_VISIBLE_DEVICES']}")
os.replace(report_path + ".tmp", report_path)
deadline = time.monotonic() + 15
while not os.path.exists(release_path) and time.monotonic() < deadline:
    time.sleep(0.02)
"""


class Holder:
    def __init__(self, name: str, lock_dir: Path, env: dict[str, str], runs_per_gpu: int = 1):
        self.report_path = lock_dir.parent / f"{name}.leased"
        self.release_path = lock_dir.parent / f"{name}.release"
        self.process = subprocess.Popen(
            [sys.executable, "-c", HOLDER_SCRIPT, str(lock_dir), str(runs_per_gpu), str(self.report_path),
             str(self.release_path)],
            env=env,
        )

    def has_leased(self) -> bool:
        return self.report_path.exists()

    def wait_leased(self) -> tuple[str, int]:
        """(card id, slot) once leased; also checks the holder's CUDA_VISIBLE_DEVICES names that card."""
        deadline = time.monotonic() + WAIT_S
        while not self.has_leased():
            assert self.process.poll() is None, f"holder exited with {self.process.returncode} before leasing"
            assert time.monotonic() < deadline, "holder did not lease a card in time"
            time.sleep(0.02)
        gpu_id, slot, cuda_visible = self.report_path.read_text().split()
        assert cuda_visible == gpu_id
        return gpu_id, int(slot)

    def release(self) -> None:
        self.release_path.touch()
        assert self.process.wait(timeout=WAIT_S) == 0


@pytest.fixture
def holders():
    """Starts holder processes; kills any still running when the test ends, passing or not."""
    started: list[Holder] = []

    def start(*args, **kwargs) -> Holder:
        started.append(Holder(*args, **kwargs))
        return started[-1]

    yield start
    for holder in started:
        if holder.process.poll() is None:
            holder.process.kill()
        holder.process.wait()


def subprocess_env(fake_gpu_count: int | None = None, cuda_visible: str | None = None) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in (FAKE_GPU_COUNT_VAR, "CUDA_VISIBLE_DEVICES")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    if fake_gpu_count is not None:
        env[FAKE_GPU_COUNT_VAR] = str(fake_gpu_count)
    if cuda_visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = cuda_visible
    return env


@pytest.fixture
def gpu_env(monkeypatch):
    """In-process leases set CUDA_VISIBLE_DEVICES; monkeypatch restores it (and the fake count) after the test."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv(FAKE_GPU_COUNT_VAR, raising=False)
    return monkeypatch


def test_four_jobs_on_four_cards_get_four_distinct_cards_and_a_fifth_waits(tmp_path, holders, gpu_env):
    lock_dir = tmp_path / "locks"
    env = subprocess_env(fake_gpu_count=4)
    first_four = [holders(f"job{index}", lock_dir, env) for index in range(4)]
    cards = [holder.wait_leased()[0] for holder in first_four]
    assert sorted(cards) == ["0", "1", "2", "3"]

    gpu_env.setenv(FAKE_GPU_COUNT_VAR, "4")
    with pytest.raises(TimeoutError, match=re.escape(f"no free GPU slot in {lock_dir} after 0.2 s: all 4 slots")):
        lease_gpu(lock_dir, timeout_s=0.2, poll_s=0.05)

    fifth = holders("job4", lock_dir, env)
    time.sleep(0.3)  # several poll periods: a free slot would have been taken by now
    assert not fifth.has_leased()
    first_four[2].release()
    assert fifth.wait_leased() == (cards[2], 0)


def test_two_runs_per_gpu_spread_over_cards_first_then_fill_each_card_twice(tmp_path, holders, gpu_env):
    lock_dir = tmp_path / "locks"
    env = subprocess_env(fake_gpu_count=2)
    first, second = holders("job0", lock_dir, env, runs_per_gpu=2), holders("job1", lock_dir, env, runs_per_gpu=2)
    first_two = {first.wait_leased(), second.wait_leased()}
    assert first_two == {("0", 0), ("1", 0)}

    # The last two start together: the selection lock still puts one on each card.
    third, fourth = holders("job2", lock_dir, env, runs_per_gpu=2), holders("job3", lock_dir, env, runs_per_gpu=2)
    leases = first_two | {third.wait_leased(), fourth.wait_leased()}
    assert leases == {("0", 0), ("0", 1), ("1", 0), ("1", 1)}
    assert Counter(gpu_id for gpu_id, _ in leases) == {"0": 2, "1": 2}

    gpu_env.setenv(FAKE_GPU_COUNT_VAR, "2")
    with pytest.raises(TimeoutError, match=r"all 4 slots \(2 GPU\(s\) x runs_per_gpu=2\) are held"):
        lease_gpu(lock_dir, runs_per_gpu=2, timeout_s=0)


def test_jobs_starting_at_the_same_instant_still_spread_over_cards(tmp_path, gpu_env):
    # Snakemake starts its 4 jobs together; a job can only spread if no other job takes a slot between its probe and
    # its lock. flock is per open file, so threads of one process contend like processes, with a tighter start.
    gpu_env.setenv(FAKE_GPU_COUNT_VAR, "4")
    for round_index in range(50):
        lock_dir = tmp_path / f"round{round_index}"
        start_together = threading.Barrier(4)
        leases = []

        def job():
            start_together.wait()
            leases.append(lease_gpu(lock_dir, runs_per_gpu=2, timeout_s=0))

        threads = [threading.Thread(target=job) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(lease.gpu_id for lease in leases) == ["0", "1", "2", "3"], f"round {round_index}"
        for lease in leases:
            lease.release()


def test_a_holder_killed_with_sigkill_frees_its_card_at_once(tmp_path, holders, gpu_env):
    lock_dir = tmp_path / "locks"
    holder = holders("job0", lock_dir, subprocess_env(fake_gpu_count=1))
    assert holder.wait_leased() == ("0", 0)
    lock_file = lock_dir / "gpu0.slot0.lock"
    assert lock_file.read_text().startswith(f"pid={holder.process.pid} host={socket.gethostname()} since=")

    gpu_env.setenv(FAKE_GPU_COUNT_VAR, "1")
    with pytest.raises(TimeoutError, match="all 1 slots"):
        lease_gpu(lock_dir, timeout_s=0)

    holder.process.send_signal(signal.SIGKILL)
    assert holder.process.wait(timeout=WAIT_S) == -signal.SIGKILL
    with lease_gpu(lock_dir, timeout_s=0) as lease:
        assert (lease.gpu_id, lease.slot, lease.lock_path) == ("0", 0, lock_file)
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "0"
        assert lock_file.read_text().startswith(f"pid={os.getpid()} ")
    assert not lease.held
    assert lock_file.read_text() == ""  # released: the file stays, emptied for humans


def test_leases_only_cards_listed_in_cuda_visible_devices(tmp_path, holders, gpu_env):
    lock_dir = tmp_path / "locks"
    env = subprocess_env(cuda_visible="3,5")
    first, second = holders("job0", lock_dir, env), holders("job1", lock_dir, env)
    assert {first.wait_leased()[0], second.wait_leased()[0]} == {"3", "5"}
    assert sorted(path.name for path in lock_dir.iterdir()) == ["gpu3.slot0.lock", "gpu5.slot0.lock", "lease.lock"]

    gpu_env.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    with pytest.raises(TimeoutError, match="all 2 slots"):
        lease_gpu(lock_dir, timeout_s=0)


def test_release_frees_the_slot_and_keeps_the_lock_file(tmp_path, gpu_env):
    gpu_env.setenv(FAKE_GPU_COUNT_VAR, "1")
    lease = lease_gpu(tmp_path)
    with pytest.raises(TimeoutError):
        lease_gpu(tmp_path, timeout_s=0)
    lease.release()
    lease.release()  # idempotent
    with lease_gpu(tmp_path, timeout_s=0) as again:
        assert again.gpu_id == "0"
    assert (tmp_path / "gpu0.slot0.lock").exists()


def test_no_visible_gpus_is_a_runtime_error(tmp_path, gpu_env):
    gpu_env.setenv(FAKE_GPU_COUNT_VAR, "0")
    with pytest.raises(RuntimeError, match="no visible GPUs to lease"):
        lease_gpu(tmp_path / "locks")
    gpu_env.delenv(FAKE_GPU_COUNT_VAR)
    gpu_env.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(RuntimeError, match="no visible GPUs to lease"):
        lease_gpu(tmp_path / "locks")


def test_visible_gpus_sources_in_priority_order(tmp_path, gpu_env):
    gpu_env.setenv("PATH", str(tmp_path))  # only the fake nvidia-smi below is on PATH
    assert visible_gpus() == []  # no nvidia-smi at all

    nvidia_smi = tmp_path / "nvidia-smi"
    nvidia_smi.write_text('#!/bin/sh\n[ "$*" = "--query-gpu=index --format=csv,noheader" ] && printf "0\\n1\\n"\n')
    nvidia_smi.chmod(0o755)
    assert visible_gpus() == ["0", "1"]

    gpu_env.setenv("CUDA_VISIBLE_DEVICES", " 3, 5 ")
    assert visible_gpus() == ["3", "5"]
    gpu_env.setenv(FAKE_GPU_COUNT_VAR, "3")
    assert visible_gpus() == ["0", "1", "2"]

    gpu_env.setenv(FAKE_GPU_COUNT_VAR, "two")
    with pytest.raises(ValueError, match="DEAT_FAKE_GPU_COUNT must be a non-negative integer, got 'two'"):
        visible_gpus()


def test_failing_nvidia_smi_means_no_gpus(tmp_path, gpu_env):
    gpu_env.setenv("PATH", str(tmp_path))
    nvidia_smi = tmp_path / "nvidia-smi"
    nvidia_smi.write_text('#!/bin/sh\necho "NVIDIA-SMI has failed" >&2\nexit 9\n')
    nvidia_smi.chmod(0o755)
    assert visible_gpus() == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"runs_per_gpu": 0}, "runs_per_gpu must be an integer >= 1, got 0"),
        ({"runs_per_gpu": 1.5}, "runs_per_gpu must be an integer >= 1, got 1.5"),
        ({"timeout_s": -1}, "timeout_s must be >= 0"),
        ({"poll_s": 0}, "poll_s must be > 0"),
    ],
)
def test_bad_arguments_are_rejected_by_name(tmp_path, gpu_env, kwargs, message):
    gpu_env.setenv(FAKE_GPU_COUNT_VAR, "1")
    with pytest.raises(ValueError, match=re.escape(message)):
        lease_gpu(tmp_path, **kwargs)


def test_importing_the_module_leaves_torch_unimported():
    # Leasing must run before CUDA initialises, so deat.gpu may not pull in torch (not even through deat/__init__).
    check = "import sys, deat.gpu; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", check], env=subprocess_env()).returncode == 0


# ------------------------------------------------------------------------------ CUDA: every method on the GPU
# Issue 25's checks that need a card; benchmarks/gpu_check.sh runs them (`-k cuda`). Without CUDA they skip.

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA device (benchmarks/gpu_check.sh runs these on one)")


@pytest.fixture(scope="module")
def cuda_problem():
    """tests/test_objectives.py's bf16 problem on the GPU."""
    from test_objectives import pattern_problem

    return pattern_problem(torch.device("cuda"))


def cuda_attack(model, x, y, objective, steps, precision):
    """The training attack as `precision` trains it ("reference": IEEE fp32, no autocast, TF32 off)."""
    cfg = TrainConfig(method=objective, dataset="cifar10", pgd_steps=steps, attack_bn_eval=True,
                      precision="fp32" if precision == "reference" else precision).resolved()
    context = deat.objectives.full_precision(x.device) if precision == "reference" else contextlib.nullcontext()
    with context:
        x_adv = deat.objectives.inner_attack(model, x, y, cfg, torch.Generator(device=x.device).manual_seed(11))
    model.eval()
    return x_adv


def cuda_fidelity(model, x, y, objective, precision):
    """(first-step sign agreement with IEEE fp32, relative difference of the attack loss after PGD-10)."""
    first = (cuda_attack(model, x, y, objective, 1, precision) ==
             cuda_attack(model, x, y, objective, 1, "reference")).float().mean().item()
    losses = []
    for p in (precision, "reference"):
        x_adv = cuda_attack(model, x, y, objective, 10, p)
        with torch.no_grad(), deat.objectives.full_precision(x.device):
            losses.append(deat.objectives.kl_per_example(model(x), model(x_adv)).mean().item()
                          if objective in ("trades", "mart") else F.cross_entropy(model(x_adv), y).item())
    return first, losses[0] / losses[1] - 1


@needs_cuda
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
@pytest.mark.parametrize("objective", ["pgd_at", "trades", "mart", "fast_at"])
def test_cuda_training_attacks_take_the_ieee_fp32_steps_and_reach_its_loss(cuda_problem, objective, precision):
    # fp32 on CUDA lets cuDNN use TF32 (10 mantissa bits) by default: TRADES' first step is then in IEEE fp32 too.
    agreement, loss_rel = cuda_fidelity(*cuda_problem, objective, precision)
    print(f"{objective} {precision}: first-step agreement {agreement:.4f}, attack loss {loss_rel:+.4f}")
    assert agreement >= 0.99
    assert abs(loss_rel) <= 0.02


@needs_cuda
def test_cuda_trades_attack_without_its_fp32_first_step_takes_random_signs(cuda_problem, monkeypatch):
    monkeypatch.setattr(deat.objectives, "full_precision", lambda device: contextlib.nullcontext())
    agreement, _ = cuda_fidelity(*cuda_problem, "trades", "bf16")
    assert agreement < 0.9  # the fault of issue 25, so the test above can fail


def bf16_graph_steps(method: str, graph: bool, steps: int = 4, batch_size: int = 32):
    """`steps` PGD-3 iterations of small_cnn in bf16 + channels_last on fixed random batches, cosine lr."""
    device = torch.device("cuda")
    cfg = TrainConfig(arch="small_cnn", method=method, batch_size=batch_size, pgd_steps=3, dataset="cifar10",
                      precision="bf16", channels_last=True, cuda_graph=graph).resolved()
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, in_channels=3).to(device).to(memory_format=torch.channels_last)
    optimizer = build_optimizer(method, model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, k1=1.0,
                                k2=0.8, decoupled_weight_decay=True)
    scheduler = build_scheduler(optimizer, "cosine", epochs=1, iters_per_epoch=steps)
    attack_gen = torch.Generator(device=device).manual_seed(1)
    step = (CudaGraphStep(model, optimizer, cfg, attack_gen, eager_steps=1) if graph else
            functools.partial(deat.objectives.adversarial_step, model, optimizer, cfg=cfg, attack_gen=attack_gen))
    data = torch.Generator(device=device).manual_seed(2)
    losses = []
    for _ in range(steps):
        x = torch.rand(batch_size, 3, 32, 32, device=device, generator=data)
        y = torch.randint(0, 10, (batch_size,), device=device, generator=data)
        loss, _ = step(x.contiguous(memory_format=torch.channels_last), y)
        losses.append(loss.item())
        scheduler.step()
    return losses, attack_gen.get_state(), optimizer


@needs_cuda
@pytest.mark.parametrize("method", ["trades", "mart", "fast_at", "trades_deat"])
def test_cuda_graph_captures_the_bf16_step_of_every_objective_as_eager_runs_it(method, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    eager_losses, eager_gen, eager_optimizer = bf16_graph_steps(method, graph=False)
    losses, gen, optimizer = bf16_graph_steps(method, graph=True)
    assert losses[0] == eager_losses[0]  # step 1 runs eagerly on both paths
    # Step 2 is the first replay, from the same weights: the captured kernels (TRADES' fp32 first step included)
    # compute what the eager step computes; later steps drift apart only as PGD's sign() amplifies rounding.
    assert losses[1] == pytest.approx(eager_losses[1], rel=1e-4)
    assert losses == pytest.approx(eager_losses, rel=5e-2)
    assert torch.equal(gen, eager_gen)
    if outer_step_of(method) == "deat":
        assert [s["step"] for s in optimizer.state.values()] == [s["step"] for s in eager_optimizer.state.values()]


@needs_cuda
def test_cuda_public_attacks_refuse_pixels_outside_the_unit_box():
    model = build_model("small_cnn", 10, in_channels=3).cuda().eval()
    x = torch.rand(4, 3, 32, 32, device="cuda")
    y = torch.zeros(4, dtype=torch.long, device="cuda")
    x[0, 0, 0, 0] = 1.5
    with pytest.raises(ValueError, match=r"^pgd: pixels must be in \[0, 1\], found min .* and max 1\.5"):
        pgd(model, x, y, 0.03, 0.01, 2, generator=torch.Generator(device="cuda").manual_seed(0))
    x_adv = pgd(model, x.clamp(0, 1), y, 0.03, 0.01, 2, generator=torch.Generator(device="cuda").manual_seed(0))
    assert x_adv.min() >= 0 and x_adv.max() <= 1
