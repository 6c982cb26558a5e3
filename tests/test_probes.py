"""Mechanism probes against closed forms: gradient noise on linear least squares, the update noise of SGD and of
DEAT's step, and a run with probes training bit for bit like one without."""

import math

import pytest
import torch

from deat.config import TrainConfig
from deat.optim import DEAT
from deat.probes import gradient_noise, probe_set, probe_steps, update_noise
from deat.train import train
from test_train import TIMING_KEYS, assert_same_tensors, quiet, tiny_config

P, N = 6, 600  # parameters, training examples


def _least_squares(seed: int = 0):
    """y = x·w* + noise, loss ½(x·w − y)² per example; returns x (N, P), y (N, 1) and the current weights w."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, P, generator=g, dtype=torch.float64)
    y = x @ torch.arange(1.0, P + 1, dtype=torch.float64).unsqueeze(1) + 0.5 * torch.randn(N, 1, generator=g,
                                                                                            dtype=torch.float64)
    w = torch.randn(1, P, generator=g, dtype=torch.float64)
    return x, y, w


def _model(w: torch.Tensor) -> torch.nn.Module:
    model = torch.nn.Linear(P, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(w)
    return model


def _step(model, optimizer):
    def step(xb, yb):
        optimizer.zero_grad(set_to_none=True)
        (0.5 * (model(xb) - yb) ** 2).mean().backward()
        optimizer.step()
    return step


def _exact(x, y, w):
    """tr Σ (per-example gradient covariance, divisor N − 1) and ‖E g‖², from every example's gradient."""
    per_example = (x @ w.T - y) * x  # (N, P): ∇_w ½(x·w − y)²
    mean = per_example.mean(dim=0)
    return ((per_example - mean) ** 2).sum().item() / (N - 1), (mean ** 2).sum().item()


def test_gradient_noise_estimators_are_unbiased_on_least_squares():
    x, y, w = _least_squares()
    trace, grad_sq = _exact(x, y, w)
    m, b, draws = 6, 20, 300
    estimates = []
    for draw in range(draws):
        model = _model(w)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        index = probe_set(N, m, b, seed=draw)
        grads, _ = probe_steps(model, optimizer, [(x[i], y[i]) for i in index], _step(model, optimizer), [])
        estimates.append(gradient_noise(grads, b, N))
    for key, exact in (("grad_trace_sigma", trace), ("grad_norm_sq", grad_sq)):
        values = torch.tensor([e[key] for e in estimates])
        standard_error = values.std().item() / math.sqrt(draws)
        assert abs(values.mean().item() - exact) < 3 * standard_error, (key, values.mean().item(), exact)


def _updates(optimizer_factory, warm_steps: int = 3, m: int = 5, b: int = 16):
    x, y, w = _least_squares(1)
    model = _model(w)
    optimizer = optimizer_factory(model.parameters())
    step = _step(model, optimizer)
    for i in range(warm_steps):  # a state with non-zero buffers, as mid-training
        step(x[i * b:(i + 1) * b], y[i * b:(i + 1) * b])
    with torch.no_grad():  # back to the same weights for every optimizer: the same minibatch gradients
        model.weight.copy_(w)
    before = model.weight.detach().clone()
    index = probe_set(N, m, b, seed=7)
    grads, updates = probe_steps(model, optimizer, [(x[i], y[i]) for i in index], step, [])
    assert torch.equal(model.weight, before)  # restored
    return gradient_noise(grads, b, N), update_noise(updates), b


def test_update_noise_of_sgd_and_deat_against_their_update_rules():
    alpha, mu, k1, k2 = 0.05, 0.9, 1.0, 0.8
    for momentum in (0.0, mu):
        grad, update, b = _updates(lambda p: torch.optim.SGD(p, lr=alpha, momentum=momentum, weight_decay=5e-4))
        # Δθ_i = −α(μ·m + G_i + wd·θ): only G_i varies, so tr Cov(Δθ) = α² · tr Σ̂ / b exactly.
        assert update["update_trace_cov"] == pytest.approx(alpha ** 2 * grad["grad_trace_sigma"] / b, rel=1e-9)
    lr = alpha * math.sqrt((1 + k1) ** 2 + k1 ** 2) / (1 - mu)  # DEAT's partner at matched effective step
    deat_grad, deat_update, b = _updates(lambda p: DEAT(p, lr=lr, k1=k1, k2=k2, weight_decay=5e-4))
    step = lr / math.sqrt((1 + k1) ** 2 + k1 ** 2)
    # Δθ_i = −α′[(1 + k1)(k2·h + (1 − k2)·G_i) − k1·h′] (− decay): tr Cov = α′²(1 + k1)²(1 − k2)² · tr Σ̂ / b.
    assert deat_update["update_trace_cov"] == pytest.approx(
        step ** 2 * (1 + k1) ** 2 * (1 - k2) ** 2 * deat_grad["grad_trace_sigma"] / b, rel=1e-9)
    _, sgd_update, _ = _updates(lambda p: torch.optim.SGD(p, lr=alpha, momentum=mu, weight_decay=5e-4))
    ratio = deat_update["update_trace_cov"] / sgd_update["update_trace_cov"]  # same weights, same minibatches
    assert ratio == pytest.approx((1 + k1) ** 2 * (1 - k2) ** 2 / (1 - mu) ** 2, rel=1e-9)  # 16 at the defaults


def test_probe_configuration_errors_are_one_line_and_name_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"^config: probe_batches=1 is invalid; expected an integer >= 2"):
        TrainConfig.from_dict({"probe_every": 1, "probe_batches": 1})
    with pytest.raises(ValueError) as err:  # 100 x 256 probe images from mnist5k's 3,900: refused before training
        train(tiny_config(tmp_path / "run", probe_every=1, probe_batches=100), log=quiet)
    assert str(err.value) == ("probe_batches=100 x batch_size=256 = 25600 probe images exceed the 3900 training "
                              "images; lower probe_batches")
    assert not (tmp_path / "run" / "running" / "checkpoint.pt").exists()


def test_a_run_with_probes_trains_bit_for_bit_like_one_without(tmp_path):
    plain = train(tiny_config(tmp_path / "plain", epochs=2), log=quiet)  # DEAT: the optimizer with a parity
    probed = train(tiny_config(tmp_path / "probed", epochs=2, probe_every=1, probe_batches=3), log=quiet)
    keys = set(plain["epochs"][0]) - set(TIMING_KEYS)
    assert [{k: r[k] for k in keys} for r in probed["epochs"]] == [{k: r[k] for k in keys} for r in plain["epochs"]]
    for name in ("last.pt", "best.pt"):
        a = torch.load(tmp_path / "plain" / name, weights_only=True)
        z = torch.load(tmp_path / "probed" / name, weights_only=True)
        assert_same_tensors(a["model"], z["model"], name)
        if name == "last.pt":
            assert_same_tensors(a["optimizer"], z["optimizer"], "optimizer")
            assert_same_tensors(a["rng"], z["rng"], "rng")
    for record in probed["epochs"]:
        assert record["probe_grad_trace_sigma"] > 0 and record["probe_update_trace_cov"] > 0
        assert record["probe_diffusion"] == pytest.approx(record["probe_lr"] / 256 * record["probe_grad_trace_sigma"])


# ------------------------------------------------------------------------------------------------- flatness

class _Quadratic(torch.nn.Module):
    """Two "layers" and a bias; robust loss ½‖θ − θ*‖² over the weights (no data, no attack)."""

    def __init__(self, at_optimum: bool):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.target = {"a.weight": torch.randn(4, 3, generator=g, dtype=torch.float64),
                       "b.weight": torch.randn(2, 4, 1, 1, generator=g, dtype=torch.float64)}
        self.a = torch.nn.Linear(3, 4).double()
        self.b = torch.nn.Conv2d(4, 2, 1, bias=False).double()
        with torch.no_grad():
            for name, target in self.target.items():
                self.get_parameter(name).copy_(target if at_optimum else target + 0.3)

    def loss(self):
        return sum(0.5 * ((self.get_parameter(n) - t) ** 2).sum() for n, t in self.target.items())


def test_flatness_curves_match_the_closed_forms_of_a_quadratic():
    from deat.flatness import flatness_curves

    gammas = (0.0, 0.01, 0.1, 0.5)
    model = _Quadratic(at_optimum=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    curves = flatness_curves(model, model.loss, gammas, directions=4)
    norm_sq = sum((model.get_parameter(n) ** 2).sum().item() for n in model.target)  # the bias is not perturbed
    assert curves["random_rise"] == pytest.approx([0.5 * g * g * norm_sq for g in gammas], rel=1e-9, abs=1e-12)
    assert curves["random_rise"][0] == 0.0 and curves["worst_rise"] == pytest.approx([0.0] * 4, abs=1e-12)
    assert_same_tensors(before, model.state_dict(), "weights after the curves")

    model = _Quadratic(at_optimum=False)  # gradient 0.3 everywhere: the worst case per layer in closed form
    curves = flatness_curves(model, model.loss, gammas)
    expected = []
    for g in gammas:
        rise = 0.0
        for name in model.target:
            w = model.get_parameter(name).detach()
            w_norm, g_norm = w.norm().item(), 0.3 * w.numel() ** 0.5
            rise += g * w_norm * g_norm + 0.5 * (g * w_norm) ** 2
        expected.append(rise)
    assert curves["worst_rise"] == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert all(w >= r for w, r in zip(curves["worst_rise"], curves["random_rise"]))  # the worst is the worst
