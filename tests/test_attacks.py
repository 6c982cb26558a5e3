"""PGD: constraints, the analytic worst case of a linear model, a float64 reference, restarts, and accuracies."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deat.attacks import clean_accuracy, pgd, robust_accuracy, robust_mask
from deat.objectives import fgsm_attack, mart_attack, trades_attack

SHAPE = (1, 4, 4)  # (C, H, W) of the toy images
DIM = 16


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mlp(seed: int = 0, num_classes: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(DIM, 32), nn.Tanh(), nn.Linear(32, num_classes))


def _images(n: int, seed: int, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    return low + (high - low) * torch.rand((n, *SHAPE), generator=_generator(seed))


def _linear_model(seed: int) -> tuple[nn.Module, torch.Tensor]:
    """Two-class linear model logits = W·flatten(x) + b, and W (2, 16)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(DIM, 2))
    return model, model[1].weight.detach()


def _toy_problem(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Separable: the top half's mean exceeds the bottom half's by >= 0.1 in class 1, and the reverse in class 0."""
    g = _generator(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = 0.35 + 0.3 * torch.rand((n, *SHAPE), generator=g)
    shift = torch.where(y == 1, 0.2, -0.2).view(-1, 1, 1, 1)
    x[:, :, :2] += shift
    x[:, :, 2:] -= shift
    return x, y


@pytest.fixture(scope="module")
def trained_model() -> nn.Module:
    model = _mlp(seed=1, num_classes=2)
    x, y = _toy_problem(256, seed=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(40):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    model.zero_grad(set_to_none=True)
    return model.eval()


def _per_example_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return F.cross_entropy(model(x), y, reduction="none")


def _assert_in_ball(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> None:
    assert x_adv.shape == x.shape
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(dim=1) if norm == "linf" else delta.norm(dim=1)
    assert (size <= eps + 1e-6).all()


# ---------------------------------------------------------------- constraints


@pytest.mark.parametrize("norm, eps", [("linf", 0.1), ("l2", 0.5)])
@pytest.mark.parametrize("random_start", [True, False])
def test_output_in_eps_ball_and_pixel_box(norm, eps, random_start):
    model, x = _mlp(), _images(64, seed=3)  # values up to the box edges, so clipping binds
    y = torch.randint(0, 3, (64,), generator=_generator(4))
    x_adv = pgd(model, x, y, eps=eps, alpha=eps / 2, steps=5, norm=norm, random_start=random_start,
                generator=_generator(5))
    _assert_in_ball(x_adv, x, eps, norm)
    assert not x_adv.requires_grad
    assert (x_adv != x).any()


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_random_start_spread(norm):
    # alpha = 0 leaves the random start in place: ℓ∞ uniform in [-ε, ε] (mean |δ| = ε/2), ℓ2 radius uniform in
    # [0, ε] (mean radius ε/2), for x far enough from the box edges.
    eps = 0.1
    x = torch.full((2000, *SHAPE), 0.5)
    y = torch.zeros(2000, dtype=torch.long)
    delta = (pgd(_mlp(), x, y, eps=eps, alpha=0.0, steps=1, norm=norm, generator=_generator(6)) - x).flatten(1)
    size = delta.abs() if norm == "linf" else delta.norm(dim=1)
    assert size.mean().item() == pytest.approx(eps / 2, rel=0.05)
    assert size.max().item() == pytest.approx(eps, rel=0.01)


@pytest.mark.parametrize("eps, steps", [(0.0, 10), (0.1, 0)])
def test_no_attack_returns_the_input(eps, steps):
    x = _images(8, seed=7)
    y = torch.zeros(8, dtype=torch.long)
    torch.testing.assert_close(pgd(_mlp(), x, y, eps=eps, alpha=0.01, steps=steps), x, rtol=0, atol=0)


# ---------------------------------------------------------------- against analytic and plain references


@pytest.mark.parametrize("low, high", [(0.3, 0.7), (0.0, 1.0)])
def test_linf_reaches_linear_worst_case(low, high):
    # For two classes the loss gradient is p_wrong·(w_wrong − w_true): constant sign, so the worst case in the
    # ℓ∞ ball ∩ [0, 1] is clip(x + ε·sign(w_wrong − w_true)). In [0.3, 0.7] with ε = 0.1 no clip binds.
    eps = 0.1
    model, weight = _linear_model(seed=8)
    x = _images(32, seed=9, low=low, high=high)
    y = torch.randint(0, 2, (32,), generator=_generator(10))
    sign = (weight[1 - y] - weight[y]).sign().view(-1, *SHAPE)
    expected = (x + eps * sign).clamp(0, 1)
    x_adv = pgd(model, x, y, eps=eps, alpha=eps, steps=3, generator=_generator(11))
    torch.testing.assert_close(x_adv, expected, rtol=0, atol=0)
    if low == 0.0:
        assert ((x + eps * sign > 1) | (x + eps * sign < 0)).any()


def test_l2_reaches_linear_worst_case():
    eps = 0.1
    model, weight = _linear_model(seed=12)
    x = _images(32, seed=13, low=0.3, high=0.7)
    y = torch.randint(0, 2, (32,), generator=_generator(14))
    direction = weight[1 - y] - weight[y]
    expected = x + eps * (direction / direction.norm(dim=1, keepdim=True)).view(-1, *SHAPE)
    # From a random start the part of δ orthogonal to the gradient shrinks geometrically with each projection.
    x_adv = pgd(model, x, y, eps=eps, alpha=eps, steps=40, norm="l2", generator=_generator(15))
    torch.testing.assert_close(x_adv, expected, rtol=0, atol=1e-6)


def _reference_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float, steps: int,
                   norm: str) -> torch.Tensor:
    """PGD without random start, one example at a time, written out plainly."""
    out = []
    for xi, yi in zip(x, y):
        xa = xi.clone()
        for _ in range(steps):
            xa.requires_grad_(True)
            loss = F.cross_entropy(model(xa[None]), yi[None])
            grad = torch.autograd.grad(loss, xa)[0]
            if norm == "linf":
                delta = torch.clamp(xa.detach() + alpha * grad.sign() - xi, -eps, eps)
            else:
                delta = xa.detach() + alpha * grad / grad.norm() - xi
                if delta.norm() > eps:
                    delta = delta * eps / delta.norm()
            xa = torch.clamp(xi + delta, 0, 1)
        out.append(xa.detach())
    return torch.stack(out)


@pytest.mark.parametrize("norm, eps", [("linf", 0.05), ("l2", 0.3)])
def test_matches_float64_reference(norm, eps):
    model = _mlp(seed=16).double()
    x = _images(12, seed=17).double()
    y = torch.randint(0, 3, (12,), generator=_generator(18))
    expected = _reference_pgd(model, x, y, eps, eps / 2, steps=2, norm=norm)
    x_adv = pgd(model, x, y, eps=eps, alpha=eps / 2, steps=2, norm=norm, random_start=False)
    torch.testing.assert_close(x_adv, expected)


# ---------------------------------------------------------------- attack strength and restarts


@pytest.mark.parametrize("norm, eps", [("linf", 0.25), ("l2", 1.0)])
def test_pgd_raises_loss_and_lowers_accuracy(trained_model, norm, eps):
    x, y = _toy_problem(256, seed=19)
    x_adv = pgd(trained_model, x, y, eps=eps, alpha=eps / 4, steps=10, norm=norm, generator=_generator(20))
    assert _per_example_loss(trained_model, x_adv, y).mean() > 2 * _per_example_loss(trained_model, x, y).mean()
    assert clean_accuracy(trained_model, x, y) > 0.95
    assert clean_accuracy(trained_model, x_adv, y) < 0.5


@pytest.mark.parametrize("norm, eps", [("linf", 0.1), ("l2", 0.5)])
def test_restarts_keep_the_best_restart_per_example(norm, eps):
    model, x = _mlp(seed=21), _images(64, seed=22)
    y = torch.randint(0, 3, (64,), generator=_generator(23))
    args = dict(eps=eps, alpha=eps / 4, steps=3, norm=norm)
    # Four single-restart attacks continuing one generator draw the same starts as one four-restart attack.
    g = _generator(24)
    single = torch.stack([_per_example_loss(model, pgd(model, x, y, **args, generator=g), y) for _ in range(4)])
    multi = _per_example_loss(model, pgd(model, x, y, **args, restarts=4, generator=_generator(24)), y)
    torch.testing.assert_close(multi, single.max(dim=0).values)
    assert (multi >= single[0]).all()
    assert (multi > single[0]).any()


# ---------------------------------------------------------------- accuracies


def test_clean_accuracy_over_uneven_batches(trained_model):
    x, y = _toy_problem(50, seed=25)
    x[:10] = 1 - x[:10]  # flip a few so that some are misclassified
    expected = (trained_model(x).argmax(dim=1) == y).float().mean().item()
    assert expected < 1
    assert clean_accuracy(trained_model, x, y, batch_size=16) == expected


def _linf_iterates(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float, steps: int,
                   seed: int) -> list[torch.Tensor]:
    """Every point one ℓ∞ PGD run evaluates: its random start (drawn by hand as documented: Uniform[-ε, ε], then
    clipped to [0, 1]) and `pgd`'s iterates 1..steps, each replayed from the same seed."""
    start = (x + (2 * torch.rand(x.shape, generator=_generator(seed)) - 1) * eps).clamp(0, 1)
    return [start] + [pgd(model, x, y, eps, alpha, t, generator=_generator(seed)) for t in range(1, steps + 1)]


def test_robust_accuracy_counts_clean_errors_as_broken(trained_model):
    x, y = _toy_problem(100, seed=26)
    x[:20] = 1 - x[:20]
    correct = trained_model(x).argmax(dim=1) == y
    iterates = _linf_iterates(trained_model, x[correct], y[correct], eps=0.2, alpha=0.05, steps=5, seed=27)
    robust = torch.stack([trained_model(x_t).argmax(dim=1) == y[correct] for x_t in iterates]).all(dim=0)
    got = robust_accuracy(trained_model, x, y, eps=0.2, alpha=0.05, steps=5, batch_size=200,
                          generator=_generator(27))
    assert got == pytest.approx(robust.sum().item() / 100, abs=1e-7)
    assert 0 < got < correct.float().mean().item()


class _Band(nn.Module):
    """Two classes on one pixel p: class 1 wins only inside the band |p - 0.3| < 0.1, where class 0's
    cross-entropy peaks. PGD on a class-0 example at p = 0.1 with step 0.25 jumps into the band (misclassified)
    and, as the gradient there points back, out again: the last iterate alone misses that the example broke."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = x.flatten(1)[:, :1]
        return torch.cat([torch.zeros_like(p), 1 - 10 * (p - 0.3).abs()], dim=1)


def test_an_example_broken_at_any_iterate_counts_as_broken():
    # Issue 13, case 4: PGD-20x2 reported more than PGD-10 as only the last iterate of each restart counted.
    model, n, eps, alpha, steps = _Band(), 200, 0.25, 0.25, 4
    x, y = torch.full((n, 1, 1, 1), 0.1), torch.zeros(n, dtype=torch.long)
    iterates = _linf_iterates(model, x, y, eps, alpha, steps, seed=40)
    wrong = torch.stack([model(x_t).argmax(dim=1) != y for x_t in iterates])  # (steps + 1, n)
    last_iterate_robust = ~wrong[-1]
    assert last_iterate_robust.sum() > 0 and wrong.any(dim=0).all()  # the case the old rule got wrong
    mask = robust_mask(model, x, y, eps, alpha, steps, batch_size=64, generator=_generator(40))
    assert torch.equal(mask, ~wrong.any(dim=0))  # by hand: robust only if no evaluated point is misclassified
    assert robust_accuracy(model, x, y, eps, alpha, steps, batch_size=64, generator=_generator(40)) == 0.0


def test_robust_mask_reports_progress_and_matches_robust_accuracy(trained_model):
    x, y = _toy_problem(100, seed=41)
    calls = []
    mask = robust_mask(trained_model, x, y, eps=0.2, alpha=0.05, steps=3, restarts=2, batch_size=32,
                       generator=_generator(42), on_batch=lambda done, total: calls.append((done, total)))
    assert mask.dtype == torch.bool and mask.shape == (100,)
    assert mask.float().mean().item() == robust_accuracy(trained_model, x, y, eps=0.2, alpha=0.05, steps=3,
                                                         restarts=2, batch_size=32, generator=_generator(42))
    assert [t for _, t in calls] == [200] * len(calls)
    assert all(a < b for (a, _), (b, _) in zip(calls, calls[1:]))


def test_robust_accuracy_at_zero_eps_is_clean_accuracy(trained_model):
    x, y = _toy_problem(100, seed=28)
    x[:20] = 1 - x[:20]
    assert robust_accuracy(trained_model, x, y, eps=0.0, alpha=0.01, steps=5, restarts=2) == \
        clean_accuracy(trained_model, x, y)


@pytest.mark.parametrize("norm, eps_grid", [("linf", [0.0, 0.1, 0.15, 0.2, 0.25, 0.3]),
                                            ("l2", [0.0, 0.4, 0.6, 0.8, 1.0, 1.2])])
def test_robust_accuracy_non_increasing_in_eps(trained_model, norm, eps_grid):
    x, y = _toy_problem(200, seed=29)
    accuracies = [robust_accuracy(trained_model, x, y, eps=eps, alpha=eps / 4, steps=10, norm=norm, batch_size=64,
                                  generator=_generator(30)) for eps in eps_grid]
    assert accuracies[0] == clean_accuracy(trained_model, x, y)
    assert all(later <= earlier for earlier, later in zip(accuracies, accuracies[1:]))
    assert accuracies[-1] < accuracies[0]


def test_more_restarts_never_raise_robust_accuracy(trained_model):
    x, y = _toy_problem(200, seed=31)
    args = dict(eps=0.2, alpha=0.05, steps=3, batch_size=64)
    one = robust_accuracy(trained_model, x, y, **args, restarts=1, generator=_generator(32))
    three = robust_accuracy(trained_model, x, y, **args, restarts=3, generator=_generator(32))
    assert three <= one
    assert three < one  # on this model the extra restarts do break more examples


# ---------------------------------------------------------------- purity and precision


@pytest.mark.parametrize("training", [True, False])
def test_model_mode_and_parameter_grads_untouched(training):
    torch.manual_seed(33)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.1),
                          nn.Flatten(), nn.Linear(4 * DIM, 3))
    model.train(training)
    x = _images(16, seed=34)
    y = torch.randint(0, 3, (16,), generator=_generator(35))
    pgd(model, x, y, eps=0.1, alpha=0.03, steps=2, restarts=2, generator=_generator(36))
    robust_accuracy(model, x, y, eps=0.1, alpha=0.03, steps=2, restarts=2, generator=_generator(36))
    clean_accuracy(model, x, y)
    assert all(module.training == training for module in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_works_under_no_grad_and_bf16_autocast(trained_model):
    x, y = _toy_problem(128, seed=37)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        x_adv = pgd(trained_model, x, y, eps=0.25, alpha=0.06, steps=10, generator=_generator(38))
    assert x_adv.dtype == torch.float32
    _assert_in_ball(x_adv, x, 0.25, "linf")
    assert _per_example_loss(trained_model, x_adv, y).mean() > 2 * _per_example_loss(trained_model, x, y).mean()


# ---------------------------------------------------------------- argument errors


@pytest.mark.parametrize("kwargs, message", [
    (dict(norm="l1"), "norm must be one of"),
    (dict(eps=-0.1), "eps must be >= 0"),
    (dict(alpha=-0.1), "alpha must be >= 0"),
    (dict(steps=-1), "steps must be >= 0"),
    (dict(restarts=0), "restarts must be >= 1"),
    (dict(restarts=2, random_start=False), "restarts > 1 needs random_start=True"),
    (dict(y=torch.zeros(3, dtype=torch.long)), r"y must have shape \(4,\)"),
    (dict(x=torch.zeros((4, *SHAPE), dtype=torch.uint8)), "x must be a floating-point tensor"),
    (dict(x=torch.zeros((4, *SHAPE), device="meta"), generator=torch.Generator()), "generator must be on x's device"),
])
def test_pgd_argument_errors(kwargs, message):
    args = dict(model=_mlp(), x=torch.zeros((4, *SHAPE)), y=torch.zeros(4, dtype=torch.long), eps=0.1, alpha=0.01,
                steps=1)
    with pytest.raises(ValueError, match=message):
        pgd(**{**args, **kwargs})


def test_accuracy_argument_errors():
    model, x, y = _mlp(), torch.zeros((4, *SHAPE)), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        clean_accuracy(model, x, y, batch_size=0)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        robust_accuracy(model, x, y, eps=0.1, alpha=0.01, steps=1, batch_size=0)
    with pytest.raises(ValueError, match="norm must be one of"):
        robust_accuracy(model, x, y, eps=0.1, alpha=0.01, steps=1, norm="l1")


class _Uncallable(nn.Module):
    """A model that fails the test if any forward pass runs: the input check comes before compute."""

    def forward(self, x):
        raise AssertionError("the model ran before the input was checked")


# Every public attack and accuracy function, called on x with one epsilon-ball's worth of arguments.
_PUBLIC = {
    "pgd": lambda m, x, y: pgd(m, x, y, eps=0.1, alpha=0.01, steps=1),
    "trades_attack": lambda m, x, y: trades_attack(m, x, eps=0.1, alpha=0.01, steps=1),
    "mart_attack": lambda m, x, y: mart_attack(m, x, y, eps=0.1, alpha=0.01, steps=1),
    "fgsm_attack": lambda m, x, y: fgsm_attack(m, x, y, eps=0.1, alpha=0.125),
    "clean_accuracy": lambda m, x, y: clean_accuracy(m, x, y),
    "robust_mask": lambda m, x, y: robust_mask(m, x, y, eps=0.1, alpha=0.01, steps=1),
    "robust_accuracy": lambda m, x, y: robust_accuracy(m, x, y, eps=0.1, alpha=0.01, steps=1),
}


@pytest.mark.parametrize("name", _PUBLIC)
@pytest.mark.parametrize("low, high, found", [
    (-0.25, 0.5, "found min -0.25 and max 0.5"),
    (0.0, 255.0, "found min 0 and max 255"),  # uint8 pixels converted to float but not scaled
    (float("nan"), 0.5, "found min nan"),
])
def test_public_attacks_and_accuracies_refuse_pixels_outside_the_unit_box(name, low, high, found):
    x = _images(4, seed=40, low=0.2, high=0.4)
    x[0, 0, 0, 0], x[1, 0, 0, 0] = low, high
    with pytest.raises(ValueError, match=rf"^{name}: pixels must be in \[0, 1\], {found}") as error:
        _PUBLIC[name](_Uncallable(), x, torch.zeros(4, dtype=torch.long))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("name", _PUBLIC)
def test_public_attacks_and_accuracies_take_the_box_edges(name):
    x = _images(4, seed=41)
    x[0, 0, 0, 0], x[1, 0, 0, 0] = 0.0, 1.0
    _PUBLIC[name](_mlp(), x, torch.zeros(4, dtype=torch.long))  # no error: 0 and 1 are pixels
