"""The adversarial-training family (deat.objectives): each objective's loss and attack against a hand computation,
AWP's per-layer perturbation, fast AT as one PGD step of 1.25·ε, every method's step, and the run identity of the
committed PGD-AT / DEAT runs, which the new options must not change."""

import ast
import contextlib
import copy
import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

import deat.objectives
from deat.config import (METHODS, OBJECTIVES, TrainConfig, objective_of, outer_step_of, run_identity,
                         unused_options)
from deat.models import build_model
from deat.objectives import (adversarial_step, awp_layers, awp_perturbation, boosted_cross_entropy, full_precision,
                             inner_attack, kl_per_example, mart_attack, mart_loss, trades_attack, trades_loss)
from deat.optim import DEAT, build_optimizer

REPO = Path(__file__).resolve().parents[1]

CLEAN = [[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]]
ADV = [[0.5, 1.5, -0.5], [1.0, 0.0, 2.0]]
LABELS = [0, 1]


def softmax(row):
    exps = [math.exp(v) for v in row]
    return [e / sum(exps) for e in exps]


def hand_kl(clean_row, adv_row):
    p, q = softmax(clean_row), softmax(adv_row)
    return sum(pk * (math.log(pk) - math.log(qk)) for pk, qk in zip(p, q))


def hand_ce(row, label):
    return -math.log(softmax(row)[label])


def tensors():
    return torch.tensor(CLEAN, dtype=torch.float64), torch.tensor(ADV, dtype=torch.float64), torch.tensor(LABELS)


# ---------------------------------------------------------------------------------------- losses by hand

def test_kl_is_kl_of_clean_from_adversarial_per_example():
    clean, adv, _ = tensors()
    expected = [hand_kl(c, a) for c, a in zip(CLEAN, ADV)]
    assert kl_per_example(clean, adv).tolist() == pytest.approx(expected, rel=1e-6)
    # Direction matters: KL(p(x) ‖ p(x')) as in TRADES' eq. 5, not KL(p(x') ‖ p(x)).
    assert kl_per_example(adv, clean).tolist() != pytest.approx(expected, rel=1e-3)


def test_trades_loss_is_clean_cross_entropy_plus_beta_times_mean_kl():
    clean, adv, y = tensors()
    ce = sum(hand_ce(row, label) for row, label in zip(CLEAN, LABELS)) / 2
    kl = sum(hand_kl(c, a) for c, a in zip(CLEAN, ADV)) / 2
    assert trades_loss(clean, adv, y, beta=6.0).item() == pytest.approx(ce + 6.0 * kl, rel=1e-6)
    assert trades_loss(clean, adv, y, beta=0.0).item() == pytest.approx(ce, rel=1e-6)


def test_mart_loss_is_boosted_cross_entropy_plus_beta_times_weighted_kl():
    clean, adv, y = tensors()
    bce, weighted = [], []
    for c, a, label in zip(CLEAN, ADV, LABELS):
        q = softmax(a)
        top_wrong = max(qk for k, qk in enumerate(q) if k != label)
        bce.append(hand_ce(a, label) - math.log(1.0001 - top_wrong))
        weighted.append(hand_kl(c, a) * (1.0000001 - softmax(c)[label]))
    # Example 0: the adversarial top class (1) is wrong; example 1: the top class (2) is wrong, label 1 is second.
    assert boosted_cross_entropy(adv, y).tolist() == pytest.approx(bce, rel=1e-6)
    expected = sum(bce) / 2 + 6.0 * sum(weighted) / 2
    assert mart_loss(clean, adv, y, beta=6.0).item() == pytest.approx(expected, rel=1e-6)


def test_mart_boosted_term_uses_the_second_class_when_the_top_class_is_the_label():
    adv = torch.tensor([[3.0, 1.0, 0.0]], dtype=torch.float64)
    q = softmax([3.0, 1.0, 0.0])
    assert boosted_cross_entropy(adv, torch.tensor([0])).item() == pytest.approx(
        hand_ce([3.0, 1.0, 0.0], 0) - math.log(1.0001 - q[1]), rel=1e-6)


# ---------------------------------------------------------------------------------------- attacks by hand

class Linear(torch.nn.Module):
    """logits = W · flatten(x): the input gradient of every loss here has a closed form."""

    def __init__(self, weight):
        super().__init__()
        self.weight = torch.nn.Parameter(weight)

    def forward(self, x):
        return x.flatten(1) @ self.weight.T


def linear_problem():
    gen = torch.Generator().manual_seed(3)
    model = Linear(torch.randn(3, 8, generator=gen, dtype=torch.float64))
    x = torch.rand(4, 2, 2, 2, generator=gen, dtype=torch.float64) * 0.8 + 0.1
    y = torch.tensor([0, 1, 2, 1])
    return model, x, y


def one_step(x, start, grad, eps, alpha):
    """One ℓ∞ PGD step written out: x + clip(start − x + α·sign(g), ±ε), clipped to [0, 1]."""
    return (x + (start - x + alpha * grad.sign()).clamp(-eps, eps)).clamp(0, 1)


def test_trades_attack_takes_sign_steps_up_the_kl_from_a_small_gaussian_start():
    model, x, _ = linear_problem()
    eps, alpha = 8 / 255, 2 / 255
    adv = trades_attack(model, x, eps, alpha, steps=1, generator=torch.Generator().manual_seed(5))
    start = x + 0.001 * torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=x.dtype)
    # d/dx' Σ KL(p(x) ‖ softmax(W x')) = Wᵀ (softmax(W x') − p(x)) for a linear model.
    with torch.no_grad():
        grad = ((F.softmax(model(start), 1) - F.softmax(model(x), 1)) @ model.weight).view_as(x)
    torch.testing.assert_close(adv, one_step(x, start, grad, eps, alpha))
    # The attack's objective, KL(p(x) ‖ p(x')), rises from the start over more steps.
    with torch.no_grad():
        more = trades_attack(model, x, eps, alpha, steps=5, generator=torch.Generator().manual_seed(5))
        kl_start, kl_end = kl_per_example(model(x), model(start)), kl_per_example(model(x), model(more))
    assert (kl_end > kl_start).all()
    assert ((more - x).abs().max() <= eps + 1e-12) and more.min() >= 0 and more.max() <= 1


def test_mart_attack_takes_sign_steps_up_the_cross_entropy_from_a_small_gaussian_start():
    model, x, y = linear_problem()
    eps, alpha = 8 / 255, 2 / 255
    adv = mart_attack(model, x, y, eps, alpha, steps=1, generator=torch.Generator().manual_seed(6))
    start = x + 0.001 * torch.randn(x.shape, generator=torch.Generator().manual_seed(6), dtype=x.dtype)
    with torch.no_grad():  # d/dx' CE(W x', y) = Wᵀ (softmax(W x') − onehot(y))
        grad = ((F.softmax(model(start), 1) - F.one_hot(y, 3)) @ model.weight).view_as(x)
    torch.testing.assert_close(adv, one_step(x, start, grad, eps, alpha))


def test_fast_at_is_one_pgd_step_of_1_25_eps_from_a_uniform_start():
    model, x, y = linear_problem()
    eps = 8 / 255
    cfg = TrainConfig(method="fast_at", dataset="cifar10", eps=eps, attack_bn_eval=True).resolved()
    assert cfg.fgsm_step_size == pytest.approx(1.25 * eps)
    adv = inner_attack(model, x, y, cfg, torch.Generator().manual_seed(7))
    uniform = torch.rand(x.shape, generator=torch.Generator().manual_seed(7), dtype=x.dtype)
    start = (x + (2 * uniform - 1) * eps).clamp(0, 1)
    with torch.no_grad():
        grad = ((F.softmax(model(start), 1) - F.one_hot(y, 3)) @ model.weight).view_as(x)
    torch.testing.assert_close(adv, one_step(x, start, grad, eps, 1.25 * eps))
    # The step is 1.25·ε, larger than the ball: every coordinate the sign moves past ±ε ends on the boundary.
    assert ((adv - x).abs() <= eps + 1e-12).all()


@pytest.mark.parametrize("method", ["pgd_at", "trades", "mart"])
def test_no_attack_steps_is_standard_training_for_the_pgd_style_objectives(method):
    model, x, y = linear_problem()
    cfg = TrainConfig(method=method, dataset="cifar10", pgd_steps=0).resolved()
    assert torch.equal(inner_attack(model, x, y, cfg, torch.Generator().manual_seed(0)), x)


# ------------------------------------------------------------------------------- bf16 fidelity of every attack

BF16_OBJECTIVES = ("pgd_at", "trades", "mart", "fast_at")


def pattern_problem(device: torch.device = torch.device("cpu")):
    """small_cnn (seed 0) trained 60 SGD steps (IEEE fp32) on CIFAR-shaped images with a smooth per-class pattern,
    so that its logits are confident and its input gradients far from zero; and a batch of 64 of those images in
    [0.1, 0.9], on `device` (tests/test_gpu.py runs the same problem on CUDA)."""
    gen = torch.Generator().manual_seed(0)
    patterns = F.interpolate(torch.rand(10, 3, 4, 4, generator=gen), size=32, mode="bilinear")
    y = torch.randint(0, 10, (1024,), generator=gen)
    x = 0.1 + 0.8 * (0.4 * patterns[y] + 0.6 * torch.rand(1024, 3, 32, 32, generator=gen))
    x, y = x.to(device), y.to(device)
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, in_channels=3).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with deat.objectives.full_precision(device):
        for step in range(60):
            batch = slice(64 * (step % 16), 64 * (step % 16 + 1))
            optimizer.zero_grad()
            F.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    return model.eval(), x[:64], y[:64]


@pytest.fixture(scope="module")
def bf16_problem():
    return pattern_problem()


class Float64(torch.nn.Module):
    def forward(self, x):
        return x.double()


def attack_under(precision, model, x, y, objective, steps):
    """inner_attack (the training path) of `objective` with `steps` PGD steps, the attack generator seeded 11:
    in fp32, under CPU bf16 autocast (as training's precision: bf16 runs it on CUDA), or in float64."""
    cfg = TrainConfig(method=objective, dataset="cifar10", pgd_steps=steps, attack_bn_eval=True).resolved()
    if precision == "float64":  # the model in float64 on the same fp32 images, so the random starts are equal
        model = torch.nn.Sequential(Float64(), copy.deepcopy(model).double())
    context = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    with context:
        x_adv = inner_attack(model, x, y, cfg, torch.Generator().manual_seed(11))
    model.eval()  # inner_attack leaves the model in train mode
    return x_adv


def attack_loss(model, x, x_adv, y, objective):
    """The attack's own objective at x', in fp32: mean KL(p(x) ‖ p(x')) for TRADES and MART, mean CE for the others."""
    with torch.no_grad():
        if objective in ("trades", "mart"):
            return kl_per_example(model(x), model(x_adv)).mean().item()
        return F.cross_entropy(model(x_adv), y).item()


def bf16_fidelity(model, x, y, objective):
    """(sign agreement of the first step, bf16 vs fp32; the same for fp32 vs float64; relative difference of the
    attack loss after the full attack, bf16 vs fp32). Equal random starts, so x' differs exactly where a sign does."""
    first = {p: attack_under(p, model, x, y, objective, 1) for p in ("fp32", "bf16", "float64")}
    steps = 10  # PGD-10, the training attack (fast AT: its one step)
    full = {p: attack_loss(model, x, attack_under(p, model, x, y, objective, steps), y, objective)
            for p in ("fp32", "bf16")}
    return ((first["bf16"] == first["fp32"]).float().mean().item(),
            (first["fp32"] == first["float64"]).float().mean().item(), full["bf16"] / full["fp32"] - 1)


@pytest.mark.parametrize("objective", BF16_OBJECTIVES)
def test_every_training_attack_under_bf16_autocast_takes_the_fp32_steps_and_reaches_the_fp32_loss(
        bf16_problem, objective):
    model, x, y = bf16_problem
    bf16_agreement, fp32_agreement, loss_rel = bf16_fidelity(model, x, y, objective)
    print(f"{objective}: first-step sign agreement bf16/fp32 {bf16_agreement:.4f}, fp32/float64 "
          f"{fp32_agreement:.5f}; attack loss bf16 vs fp32 {loss_rel:+.4f}")
    assert fp32_agreement >= 0.999  # fp32 is a fair reference
    assert bf16_agreement >= 0.99
    assert abs(loss_rel) <= 0.02


def test_without_its_fp32_first_step_the_trades_attack_under_bf16_takes_random_signs(bf16_problem, monkeypatch):
    """The fault the test above guards against: at x + 0.001·N bf16 rounds the KL's gradient away (issue 25)."""
    import deat.objectives

    model, x, y = bf16_problem
    monkeypatch.setattr(deat.objectives, "full_precision", lambda device: contextlib.nullcontext())
    bf16_agreement, _, loss_rel = bf16_fidelity(model, x, y, "trades")
    print(f"trades without full_precision: first-step sign agreement {bf16_agreement:.4f}, KL {loss_rel:+.4f}")
    assert bf16_agreement < 0.9


def test_full_precision_turns_autocast_off_and_tf32_off_on_cuda_and_restores_both():
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    legacy = (cudnn.allow_tf32, matmul.allow_tf32)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with full_precision(torch.device("cpu")):
                assert not torch.is_autocast_enabled("cpu")
            assert torch.is_autocast_enabled("cpu")
        # The TF32 switches are host-side flags, so their handling shows without a GPU (CUDA autocast does not).
        with full_precision(torch.device("cuda")):
            assert (cudnn.allow_tf32, matmul.allow_tf32) == (False, False)
        assert (cudnn.allow_tf32, matmul.allow_tf32) == legacy
        # A process that set the per-operator flags (torch >= 2.9), where the legacy getters raise.
        cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision, matmul.fp32_precision = "tf32", "ieee", "tf32"
        with full_precision(torch.device("cuda")):
            assert (cudnn.conv.fp32_precision, matmul.fp32_precision) == ("ieee", "ieee")
        assert (cudnn.conv.fp32_precision, matmul.fp32_precision) == ("tf32", "tf32")
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = legacy  # the legacy setters reset the per-operator flags


# ---------------------------------------------------------------------------------------------------- AWP

def small_batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(8, 3, 32, 32, generator=gen), torch.randint(0, 10, (8,), generator=gen)


@pytest.mark.parametrize("method", ["pgd_at", "trades"])
def test_awp_perturbs_each_conv_and_linear_weight_by_gamma_times_its_norm_along_its_gradient(method):
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, in_channels=3, width=8).train()
    x, y = small_batch()
    cfg = TrainConfig(method=method, dataset="cifar10", awp_gamma=5e-3, pgd_steps=0).resolved()
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    perturbation = awp_perturbation(model, x, x + 0.01, y, cfg)
    # Conv and linear weights only: small_cnn has 2 convolutions and 2 linear layers; BN scales and biases stay.
    assert sorted(perturbation) == ["net.features.0.weight", "net.features.3.weight", "net.head.1.weight", "net.head.3.weight"]
    assert sorted(perturbation) == sorted(awp_layers(model))
    # The gradient of the objective's loss at the adversarial examples, on an independent copy of the model.
    twin = copy.deepcopy(model)
    logits_clean, logits_adv = twin(x), twin(x + 0.01)
    loss = F.cross_entropy(logits_adv, y) if method == "pgd_at" else trades_loss(logits_clean, logits_adv, y, 6.0)
    loss.backward()
    twin_params = dict(twin.named_parameters())
    for name, v in perturbation.items():
        w = dict(model.named_parameters())[name]
        assert v.norm().item() == pytest.approx(5e-3 * w.norm().item(), rel=1e-5), name
        g = twin_params[name].grad
        assert F.cosine_similarity(v.flatten(), g.flatten(), dim=0).item() == pytest.approx(1.0, abs=1e-5), name
    # The weights, their .grad and the BatchNorm running statistics are untouched.
    for key, value in model.state_dict().items():
        assert torch.equal(value, buffers[key]), key
    assert all(p.grad is None for p in model.parameters())


def test_awp_step_takes_the_gradient_at_the_perturbed_weights_and_then_removes_the_perturbation():
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, in_channels=3, width=8).train()
    x, y = small_batch(1)
    cfg = TrainConfig(method="pgd_at", dataset="cifar10", awp_gamma=1e-2, pgd_steps=0, momentum=0.0,
                      weight_decay=0.0).resolved()
    lr = 0.1
    perturbation = awp_perturbation(model, x, x, y, cfg)
    expected = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in expected.named_parameters():
            if name in perturbation:
                p.add_(perturbation[name])
    F.cross_entropy(expected(x), y).backward()
    with torch.no_grad():
        for name, p in expected.named_parameters():
            p.sub_(lr * p.grad)
            if name in perturbation:
                p.sub_(perturbation[name])
    optimizer = build_optimizer("pgd_at", model.parameters(), lr=lr, momentum=0.0, weight_decay=0.0, k1=1.0,
                                k2=0.8, decoupled_weight_decay=True)
    adversarial_step(model, optimizer, x, y, cfg, torch.Generator().manual_seed(0))
    for (name, ours), theirs in zip(model.named_parameters(), expected.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7, msg=name)
    # ... and it differs from the plain step, so the test can tell the two apart.
    plain_cfg = TrainConfig(method="pgd_at", dataset="cifar10", pgd_steps=0, momentum=0.0,
                            weight_decay=0.0).resolved()
    torch.manual_seed(0)
    plain = build_model("small_cnn", 10, in_channels=3, width=8).train()
    plain_optimizer = build_optimizer("pgd_at", plain.parameters(), lr=lr, momentum=0.0, weight_decay=0.0,
                                      k1=1.0, k2=0.8, decoupled_weight_decay=True)
    adversarial_step(plain, plain_optimizer, x, y, plain_cfg, torch.Generator().manual_seed(0))
    assert not torch.allclose(plain.net.head[3].weight, model.net.head[3].weight, rtol=1e-6, atol=1e-8)


# ------------------------------------------------------------------------------------- every method's step

@pytest.mark.parametrize("method", METHODS)
def test_every_method_takes_a_finite_step_with_its_outer_optimizer(method):
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, in_channels=3, width=8)
    x, y = small_batch(2)
    cfg = TrainConfig(method=method, dataset="cifar10", pgd_steps=2).resolved()
    optimizer = build_optimizer(method, model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, k1=1.0,
                                k2=0.8, decoupled_weight_decay=True)
    assert isinstance(optimizer, DEAT) == (outer_step_of(method) == "deat")
    before = [p.detach().clone() for p in model.parameters()]
    loss, correct = adversarial_step(model, optimizer, x, y, cfg, torch.Generator().manual_seed(1))
    assert math.isfinite(loss.item()) and 0 <= correct.item() <= len(y)
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_methods_are_every_objective_with_each_outer_step():
    assert {(objective_of(m), outer_step_of(m)) for m in METHODS} == {
        (o, s) for o in OBJECTIVES for s in ("sgd", "deat")}
    assert (objective_of("pgd_at"), outer_step_of("pgd_at")) == ("pgd_at", "sgd")
    assert (objective_of("deat"), outer_step_of("deat")) == ("pgd_at", "deat")
    assert (objective_of("mart_deat"), outer_step_of("mart_deat")) == ("mart", "deat")


def test_the_workflow_schema_accepts_exactly_the_methods():
    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    methods = schema["properties"]["studies"]["additionalProperties"]["properties"]["methods"]
    assert methods["items"]["enum"] == list(METHODS)


# ---------------------------------------------------------------------------------------- run identity

def test_options_a_method_does_not_read_are_left_out_of_its_identity():
    assert {"beta", "fgsm_step_size", "k1", "k2", "decoupled_weight_decay"} <= set(
        unused_options({"method": "pgd_at"}))
    assert {"beta", "fgsm_step_size", "momentum"} <= set(unused_options({"method": "deat"}))
    trades = set(unused_options({"method": "trades_deat"}))
    assert {"momentum", "random_start", "fgsm_step_size"} <= trades and not {"beta", "k1", "awp_gamma"} & trades
    assert {"pgd_steps", "pgd_step_size", "beta", "awp_gamma"} <= set(unused_options({"method": "fast_at"}))
    assert "awp_gamma" in unused_options({"method": "mart"}) and "beta" not in unused_options({"method": "mart"})


def test_new_options_do_not_change_a_pgd_at_or_deat_identity_unless_awp_is_on():
    for method in ("pgd_at", "deat"):
        base = run_identity(TrainConfig(method=method, dataset="cifar10").resolved().to_dict())
        for change in ({"beta": 1.0}, {"fgsm_step_size": 0.1}, {"awp_gamma": 0.0}):
            assert run_identity(TrainConfig(method=method, dataset="cifar10", **change).resolved().to_dict()) == base
        assert "awp_gamma" not in base
        awp = run_identity(TrainConfig(method=method, dataset="cifar10", awp_gamma=5e-3).resolved().to_dict())
        assert awp["awp_gamma"] == 5e-3
    trades = run_identity(TrainConfig(method="trades", dataset="cifar10").resolved().to_dict())
    assert trades["beta"] == 6.0
    assert run_identity(TrainConfig(method="trades", beta=1.0, dataset="cifar10").resolved().to_dict()) != trades


def _top_level_block(source: str, start: str) -> str:
    """The lines of `source` from the one starting with `start` up to the next unindented line."""
    lines = source.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith(start))
    end = next((i for i in range(first + 1, len(lines)) if lines[i] and not lines[i][0].isspace()), len(lines))
    return "\n".join(lines[first:end])


def _workflow_hash_function():
    """short_hash and GRID_KEYS as workflow/rules/common.smk defines them, read from its source (Snakemake syntax,
    so the two plain-Python definitions are cut out of it rather than the file parsed whole)."""
    source = (REPO / "workflow" / "rules" / "common.smk").read_text()
    namespace: dict = {"hashlib": hashlib, "json": json}
    exec(compile(_top_level_block(source, "def short_hash("), "common.smk", "exec"), namespace)
    grid_keys = ast.literal_eval(_top_level_block(source, "GRID_KEYS = ").partition("=")[2].strip())
    return namespace["short_hash"], grid_keys


def test_committed_runs_keep_their_directory_hash():
    """Each committed run directory's hash is the workflow's hash of run_identity(its config) minus the grid axes."""
    short_hash, grid_keys = _workflow_hash_function()
    runs = sorted((REPO / "results" / "runs").glob("*/*/*/*/*/metrics.json"))
    if not runs:
        pytest.skip("no committed runs under results/runs")
    for path in runs:
        config = json.loads(path.read_text())["config"]
        settings = {k: v for k, v in run_identity(config).items() if k not in grid_keys}
        assert short_hash(settings) == path.parent.parent.name, path
        assert path.parent.parent.parent.name == config["method"]


def test_a_fixed_pgd_at_config_keeps_its_hash():
    """small_lr_sweep's PGD-AT settings: the directory results/runs/npz-cifar10_small/small_cnn/pgd_at/ede2aa2c."""
    short_hash, grid_keys = _workflow_hash_function()
    cfg = TrainConfig.from_dict(dict(dataset="npz:../shared/data/cifar10_small.npz", arch="small_cnn",
                                     method="pgd_at", lr=0.1, batch_size=64, seed=0, epochs=15, width=32, eps="8/255",
                                     pgd_steps=3, val_size=500, eval_examples=500)).resolved()
    settings = {k: v for k, v in run_identity(cfg.to_dict()).items() if k not in grid_keys}
    assert short_hash(settings) == "ede2aa2c"
