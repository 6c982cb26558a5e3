"""The fast path (deat/fast.py) and the throughput benchmark.

On CPU: the CUDA-only options fall back to the plain step bit for bit; the graph-safe update (what the CUDA graphs
run) matches torch's SGD and our DEAT step by step under a changing lr; the benchmark's --quick run prints complete
JSON lines. With CUDA (skipped here otherwise): captured steps match the eager step, consume the attack generator
exactly as it does, and feed DEAT's two buffers alternately.
"""

import functools
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from deat.config import TrainConfig, outer_step_of
from deat.fast import CudaGraphStep, GraphSafeUpdate, build_train_step
from deat.models import build_model
from deat.optim import DEAT, build_optimizer, build_scheduler
import deat.objectives as deat_objectives
from deat.objectives import adversarial_step
from deat.objectives import full_precision as real_full_precision
from deat.train import check_same_run, train

REPO = Path(__file__).resolve().parents[1]
TIMING = ("images_per_s", "epoch_time_s", "epoch_wall_time_s", "peak_memory_mb")  # what two equal runs may differ in
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# The keys issue 6 asks of every benchmark line.
BENCHMARK_KEYS = {"arch", "method", "batch_size", "precision", "channels_last", "mode", "device", "device_name",
                  "torch", "clean_ms_per_step", "clean_images_per_s", "at_ms_per_step", "at_images_per_s",
                  "deat_over_pgd_at", "deat_over_sgd", "objective", "outer_step", "awp_gamma", "batch_ms", "augment_ms", "batch_share", "cpu_fallback", "data", "pgd_steps",
                  "date"}


# ------------------------------------------------------------------------------ CPU: fallback is the plain path

def random_npz(path: Path, n_train: int = 96, n_test: int = 32) -> Path:
    rng = np.random.default_rng(0)
    np.savez(path, train_x=rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8),
             train_y=rng.integers(0, 10, n_train), test_x=rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8),
             test_y=rng.integers(0, 10, n_test))
    return path


def test_cpu_fallback_of_every_fast_option_trains_bit_for_bit_like_the_plain_path(tmp_path):
    data = random_npz(tmp_path / "data.npz")

    def run(name: str, **fast) -> tuple[dict, dict, list[str]]:
        messages = []
        cfg = TrainConfig.from_dict(dict(dataset=f"npz:{data}", arch="small_cnn", method="deat", batch_size=16,
                                         epochs=2, val_size=16, pgd_steps=2, eval_pgd_steps=1, eval_examples=16,
                                         device="cpu", out=str(tmp_path / name), **fast))
        metrics = train(cfg, log=messages.append)
        model = torch.load(tmp_path / name / "last.pt", weights_only=True)["model"]
        return metrics, model, messages

    plain_metrics, plain_model, plain_log = run("plain")
    for name, fast in (("graph", dict(cuda_graph=True, precision="bf16", channels_last=True, cudnn_benchmark=True)),
                       ("compile", dict(compile="reduce-overhead", precision="bf16", channels_last=True))):
        metrics, model, messages = run(name, **fast)
        for ours, theirs in zip(metrics["epochs"], plain_metrics["epochs"]):
            assert {k: v for k, v in ours.items() if k not in TIMING} == {
                k: v for k, v in theirs.items() if k not in TIMING}
        assert model.keys() == plain_model.keys()
        assert all(torch.equal(model[k], plain_model[k]) for k in model), f"{name}: weights differ"
        fallback = [m for m in messages if "CUDA only" in m]
        assert len(fallback) == 1 and "precision=bf16" in fallback[0] and "channels_last" in fallback[0]
        assert ("cudnn_benchmark" in fallback[0]) == (name == "graph")
    assert not [m for m in plain_log if "CUDA only" in m]


def test_build_train_step_on_cpu_is_the_eager_step_itself():
    model = build_model("small_cnn", 10, in_channels=3)
    optimizer = build_optimizer("deat", model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, k1=1.0,
                                k2=0.8, decoupled_weight_decay=True)
    step = build_train_step(model, optimizer, TrainConfig(cuda_graph=True), torch.Generator(), log=lambda m: None)
    assert isinstance(step, functools.partial) and step.func is adversarial_step


@pytest.mark.parametrize("method", ["pgd_at", "trades", "mart", "fast_at"])
def test_the_training_step_never_runs_the_host_syncing_pixel_check(method, monkeypatch):
    """The public attacks check x in [0, 1] with one aminmax and a host sync, which cannot run in a captured
    graph; the step deat.fast captures (objectives.adversarial_forward) must take the unchecked path."""
    import deat.attacks
    import deat.objectives

    def refuse(x, caller):
        raise AssertionError(f"{caller} checked its input inside the training step")

    monkeypatch.setattr(deat.attacks, "check_pixel_range", refuse)
    monkeypatch.setattr(deat.objectives, "check_pixel_range", refuse)
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, in_channels=3, width=8)
    optimizer = build_optimizer(method, model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, k1=1.0,
                                k2=0.8, decoupled_weight_decay=True)
    cfg = TrainConfig(method=method, dataset="cifar10", pgd_steps=2).resolved()
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    loss, _ = adversarial_step(model, optimizer, x, y, cfg, torch.Generator().manual_seed(1))
    assert torch.isfinite(loss)
    with pytest.raises(AssertionError, match="pgd checked its input"):  # the patch does reach the public path
        deat.attacks.pgd(model, x, y, 0.1, 0.01, 1)


def test_cuda_graph_and_compile_together_or_an_unknown_compile_mode_are_refused():
    with pytest.raises(ValueError, match="compile='default' is invalid; expected 'none' when cuda_graph"):
        TrainConfig.from_dict({"cuda_graph": True, "compile": "default"})
    with pytest.raises(ValueError, match=r"compile='fastest' is invalid; expected one of \('none'"):
        TrainConfig.from_dict({"compile": "fastest"})


# ------------------------------------------------------------------------------ CPU: the graph-safe update

SHAPES = [(4, 3, 3, 3), (4,), (10, 4)]


def twin_optimizers(method: str, decoupled: bool = True, momentum: float = 0.9):
    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(shape, generator=generator) for shape in SHAPES]

    def make():
        copies = [p.clone().requires_grad_(True) for p in params]
        optimizer = build_optimizer(method, copies, lr=0.1, momentum=momentum, weight_decay=5e-3, k1=1.0, k2=0.8,
                                    decoupled_weight_decay=decoupled)
        return copies, optimizer, build_scheduler(optimizer, "cosine", epochs=1, iters_per_epoch=7)

    return make(), make()


@pytest.mark.parametrize("method, decoupled, momentum", [("pgd_at", True, 0.9), ("pgd_at", True, 0.0),
                                                          ("deat", True, 0.9), ("deat", False, 0.9)])
@pytest.mark.parametrize("eager_first_steps", [0, 2])
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")  # no optimizer.step() here
def test_graph_safe_update_follows_the_optimizer_under_an_lr_that_changes_every_step(method, decoupled, momentum,
                                                                                     eager_first_steps):
    (params, optimizer, scheduler), (twin, twin_optimizer, twin_scheduler) = twin_optimizers(method, decoupled,
                                                                                            momentum)
    update = GraphSafeUpdate(twin_optimizer)
    generator = torch.Generator().manual_seed(1)
    for step in range(6):
        grads = [torch.randn(shape, generator=generator) for shape in SHAPES]
        for p, q, g in zip(params, twin, grads):
            p.grad, q.grad = g.clone(), g.clone()
        optimizer.step()
        if step < eager_first_steps:  # the eager optimizer and the graph-safe update may take turns
            twin_optimizer.step()
        else:
            update.refresh()
            update.apply(update.parity())
            update.advance()
        scheduler.step()
        twin_scheduler.step()
        for p, q in zip(params, twin):
            torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)  # float32 rounding: mul + add vs fused
    ours, theirs = twin_optimizer.state_dict()["state"], optimizer.state_dict()["state"]
    assert ours.keys() == theirs.keys()
    for index in ours:
        assert ours[index].keys() == theirs[index].keys()
        for key, value in theirs[index].items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(ours[index][key], value, rtol=1e-6, atol=1e-7)
            else:
                assert ours[index][key] == value  # DEAT's step count


def test_graph_safe_update_parity_follows_deat_step_count():
    (params, optimizer, _), _ = twin_optimizers("deat")
    update = GraphSafeUpdate(optimizer)
    for p in params:
        p.grad = torch.ones_like(p)
    parities = []
    for _ in range(4):
        update.refresh()
        parities.append(update.parity())
        update.apply(parities[-1])
        update.advance()
    assert parities == [1, 0, 1, 0]  # steps 1..4: odd, even, odd, even
    assert {optimizer.state[p]["step"] for p in params} == {4}
    optimizer.state[params[0]]["step"] = 7
    with pytest.raises(ValueError, match=r"different step counts \[4, 7\]"):
        update.parity()


def test_graph_safe_update_refuses_what_it_cannot_capture():
    param = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="SGD options {'nesterov': True} have no graph-safe update"):
        GraphSafeUpdate(torch.optim.SGD([param], lr=0.1, momentum=0.9, nesterov=True))
    with pytest.raises(ValueError, match="supports torch.optim.SGD and deat.optim.DEAT, got Adam"):
        GraphSafeUpdate(torch.optim.Adam([param]))
    update = GraphSafeUpdate(DEAT([param], lr=0.1))
    with pytest.raises(ValueError, match=r"parameters \[0\] of a group have no .grad"):
        update.refresh()


def test_cuda_graph_step_refuses_a_model_on_the_cpu():
    model = build_model("small_cnn", 10, in_channels=3)
    optimizer = build_optimizer("pgd_at", model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, k1=1.0,
                                k2=0.8, decoupled_weight_decay=True)
    with pytest.raises(ValueError, match="CudaGraphStep needs a model on CUDA, got cpu"):
        CudaGraphStep(model, optimizer, TrainConfig(cuda_graph=True).resolved(), torch.Generator())


# ------------------------------------------------------------------------------ the benchmark script

def test_throughput_quick_prints_one_complete_json_line_per_case():
    # --quick's cases, smaller (batch 16, PGD-2, one timing each). The limit catches a hang, not a busy machine:
    # 30 s was hit on 2 cores shared with a second test worker and two training jobs.
    command = [sys.executable, "benchmarks/throughput.py", "--quick", "--device", "cpu", "--batch-sizes", "16",
               "--pgd-steps", "2", "--repeats", "1", "--steps", "1"]
    done = subprocess.run(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(text) for text in done.stdout.splitlines()]
    cases = {(line["method"], line["precision"], line["mode"]) for line in lines}
    variants = (("fp32", "eager"), ("bf16", "cuda_graph"))  # --quick's two
    assert cases == {(method, *variant) for method in ("pgd_at", "deat") for variant in variants}
    for line in lines:
        assert BENCHMARK_KEYS <= line.keys(), BENCHMARK_KEYS - line.keys()
        assert line["device"] == "cpu" and line["arch"] == "small_cnn" and line["batch_size"] == 16
        assert line["pgd_steps"] == 2 and line["repeats"] == 1 and line["steps_per_repeat"] == 1
        assert line["cpu_fallback"] == (line["mode"] == "cuda_graph")
        for unit in ("clean", "at"):
            assert line[f"{unit}_images_per_s"] == pytest.approx(16_000 / line[f"{unit}_ms_per_step"], rel=1e-2)
        assert line["batch_share"] == pytest.approx(line["batch_ms"] / (line["batch_ms"] + line["at_ms_per_step"]),
                                                    rel=1e-2)
    for mode in ("eager", "cuda_graph"):
        at = {line["method"]: line for line in lines if line["mode"] == mode}
        assert at["deat"]["deat_over_pgd_at"] == at["pgd_at"]["deat_over_pgd_at"] == pytest.approx(
            at["deat"]["at_ms_per_step"] / at["pgd_at"]["at_ms_per_step"], rel=1e-2)
        assert at["deat"]["deat_over_sgd"] == at["deat"]["deat_over_pgd_at"]


# ------------------------------------------------------------------------------ CUDA: captured vs eager

def train_steps(method: str, graph: bool, steps: int = 6, batch_size: int = 32):
    """`steps` PGD-3 iterations of small_cnn on fixed random batches, cosine lr; returns what a resume needs."""
    device = torch.device("cuda")
    cfg = TrainConfig(arch="small_cnn", method=method, batch_size=batch_size, pgd_steps=3, dataset="cifar10",
                      cuda_graph=graph).resolved()
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, in_channels=3).to(device)
    optimizer = build_optimizer(method, model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, k1=1.0,
                                k2=0.8, decoupled_weight_decay=True)
    scheduler = build_scheduler(optimizer, "cosine", epochs=1, iters_per_epoch=steps)
    attack_gen = torch.Generator(device=device).manual_seed(1)
    step = (CudaGraphStep(model, optimizer, cfg, attack_gen, eager_steps=1) if graph else
            functools.partial(adversarial_step, model, optimizer, cfg=cfg, attack_gen=attack_gen))
    data = torch.Generator(device=device).manual_seed(2)
    losses, fed = [], []
    for t in range(1, steps + 1):
        x = torch.rand(batch_size, 3, 32, 32, device=device, generator=data)
        y = torch.randint(0, 10, (batch_size,), device=device, generator=data)
        buffers = ("odd_momentum", "even_momentum")
        before = ([[s[b].clone() for b in buffers] for s in optimizer.state.values()]
                  if outer_step_of(method) == "deat" else None)
        loss, _ = step(x, y)
        losses.append(loss.item())
        if before and t > 1:  # which of the two buffers this step changed: (odd, even)
            changed = tuple(any(not torch.equal(old[i], s[b]) for old, s in zip(before, optimizer.state.values()))
                            for i, b in enumerate(buffers))
            fed.append(changed == (t % 2 == 1, t % 2 == 0))
        scheduler.step()
    return losses, model.state_dict(), optimizer.state_dict(), attack_gen.get_state(), fed


@needs_cuda
@pytest.mark.parametrize("method", ["pgd_at", "deat", "trades", "trades_deat", "mart", "mart_deat", "fast_at"])
def test_cuda_graph_step_matches_the_eager_step(method, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)  # eager vs eager exact
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # true fp32: no TF32 rounding steps to cross
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    eager_losses, eager_model, eager_optimizer, eager_gen, _ = train_steps(method, graph=False)
    losses, model, optimizer, gen, fed = train_steps(method, graph=True)
    torch.testing.assert_close(losses, eager_losses, rtol=1e-4, atol=1e-5)
    for key, value in eager_model.items():
        torch.testing.assert_close(model[key], value, rtol=1e-4, atol=1e-5)
    assert torch.equal(gen, eager_gen)  # every replay drew fresh random starts, the same ones eager drew
    for index, state in eager_optimizer["state"].items():
        assert optimizer["state"][index].get("step") == state.get("step")
    if outer_step_of(method) == "deat":
        assert fed == [True] * 5  # steps 2..6 each changed exactly the buffer of their parity


def test_cudnn_benchmark_does_not_change_a_runs_identity(tmp_path):
    """It picks among algorithms for the same convolutions: a run finished without it is the same run with it."""
    saved = TrainConfig(cudnn_benchmark=False).resolved().to_dict()
    check_same_run(saved, TrainConfig(cudnn_benchmark=True).resolved().to_dict(), tmp_path / "metrics.json")
    with pytest.raises(ValueError, match="precision: checkpoint 'fp32' vs now 'bf16'"):
        check_same_run(saved, TrainConfig(precision="bf16").resolved().to_dict(), tmp_path / "metrics.json")


# ------------------------------------------------------------------------------ the GPU check's other scripts

def load_benchmark(name: str):
    """benchmarks/NAME.py as a module, so that its main() runs in this process (no second torch import)."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bf16_and_autoattack_checks_run_on_the_cpu_and_the_summary_reads_them(tmp_path, capsys):
    bf16_check, autoattack_check = load_benchmark("bf16_check"), load_benchmark("autoattack_check")
    out = tmp_path / "out"
    assert bf16_check.main(["--quick", "--device", "cpu", "--train-steps", "10", "--batch-size", "16",
                            "--objectives", "trades", "--out", str(out / "bf16.jsonl")]) == 0
    lines = {line["precision"]: line for line in map(json.loads, (out / "bf16.jsonl").read_text().splitlines())}
    assert list(lines) == ["reference", "fp32", "bf16", "bf16_unfixed"]
    assert lines["reference"]["first_step_agreement"] == 1.0 and lines["reference"]["attack_loss_rel"] == 0.0
    # TRADES' first step runs in fp32 under bf16 now (exactly the reference's), and did not before the fix.
    assert lines["bf16"]["first_step_agreement"] == 1.0 and lines["bf16"]["pass"] is True
    assert lines["bf16_unfixed"]["first_step_agreement"] < 0.9 and lines["bf16_unfixed"]["pass"] is None
    assert deat_objectives.full_precision is real_full_precision  # the script put the fix back

    assert autoattack_check.main(["--quick", "--device", "cpu", "--out", str(out / "autoattack.jsonl")]) == 0
    *chunks, final = map(json.loads, (out / "autoattack.jsonl").read_text().splitlines())
    assert [c["images_done"] for c in chunks] == [8, 16] and all(c["check"] == "autoattack_chunk" for c in chunks)
    assert final["check"] == "autoattack" and final["complete"] and final["n_images"] == 16
    assert final["wall_s"] == pytest.approx(sum(c["seconds"] for c in chunks), abs=0.02)
    assert final["images_per_s"] == pytest.approx(16 / final["wall_s"], rel=0.05)
    assert list(final["per_attack_s"]) == ["apgd-ce", "apgd-t", "fab-t", "square"] and final["met"] is None

    fast_check = load_benchmark("fast_check")
    capsys.readouterr()
    assert fast_check.main(["summary", str(out)]) == 0
    summary = capsys.readouterr().out
    assert "bf16 fidelity (small_cnn" in summary and "trades  bf16_unfixed" in summary and "PASS" in summary
    assert "autoattack standard (small_cnn" in summary and "target <= 120 s for 10k" in summary


def test_gpu_check_script_is_valid_bash_and_refuses_an_unknown_command():
    script = REPO / "benchmarks" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    done = subprocess.run(["bash", str(script), "run"], cwd=REPO, capture_output=True, text=True, check=False)
    assert done.returncode == 2 and "usage:" in done.stderr
