"""DEAT against a literal transcription of Algorithm 2; optimizer and schedule factories against hand values."""

import copy
import io
import math

import pytest
import torch

from deat.config import METHODS
from deat.effective import effective_decay, effective_step
from deat.optim import DEAT, SCHEDULES, build_optimizer, build_scheduler

# Hand-set gradients for a 3-element parameter, one row per step (six steps: three of each parity).
THETA_0 = [0.5, -1.25, 2.0]
GRADS = [[0.3, -0.2, 1.0], [-0.7, 0.4, 0.25], [0.1, 0.9, -0.5], [0.6, -1.1, 0.05], [-0.2, 0.3, 0.8],
         [0.45, 0.15, -0.35]]
# Scheduled lr per step: the normalisation and the decoupled decay must follow the current lr.
LRS = [0.1, 0.1, 0.05, 0.05, 0.02, 0.02]


def algorithm_2_by_hand(k1: float, k2: float, weight_decay: float, decoupled: bool) -> list[float]:
    """Sun et al. 2023, Algorithm 2, in plain floats with one variable per buffer."""
    theta = list(THETA_0)
    h_odd = [0.0, 0.0, 0.0]
    h_even = [0.0, 0.0, 0.0]
    for t, (grad, lr) in enumerate(zip(GRADS, LRS), start=1):
        lr_normalised = lr / math.sqrt((1 + k1) ** 2 + k1 ** 2)
        for i in range(3):
            g = grad[i]
            if decoupled:
                theta[i] = theta[i] * (1 - lr * weight_decay)
            else:
                g = g + weight_decay * theta[i]
            if t % 2 == 1:
                h_odd[i] = k2 * h_odd[i] + (1 - k2) * g
                h_t, h_t_minus_1 = h_odd[i], h_even[i]
            else:
                h_even[i] = k2 * h_even[i] + (1 - k2) * g
                h_t, h_t_minus_1 = h_even[i], h_odd[i]
            theta[i] = theta[i] - lr_normalised * ((1 + k1) * h_t - k1 * h_t_minus_1)
    return theta


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("decoupled", [True, False])
@pytest.mark.parametrize("k1, k2, weight_decay", [(1.0, 0.8, 0.05), (0.5, 0.6, 0.2), (1.0, 0.8, 0.0)])
def test_deat_matches_algorithm_2_by_hand(foreach, decoupled, k1, k2, weight_decay):
    param = torch.nn.Parameter(torch.tensor(THETA_0))
    optimizer = DEAT([param], lr=LRS[0], k1=k1, k2=k2, weight_decay=weight_decay,
                     decoupled_weight_decay=decoupled, foreach=foreach)
    for grad, lr in zip(GRADS, LRS):
        optimizer.param_groups[0]["lr"] = lr
        param.grad = torch.tensor(grad)
        optimizer.step()
    expected = torch.tensor(algorithm_2_by_hand(k1, k2, weight_decay, decoupled))
    torch.testing.assert_close(param.detach(), expected, rtol=0.0, atol=1e-6)
    assert optimizer.state[param]["step"] == len(GRADS)


def make_params(generator: torch.Generator) -> list[torch.nn.Parameter]:
    shapes = [(3,), (4, 5), (2, 3, 3, 3), (7,)]
    return [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in shapes]


def run_steps(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], grads: list[list[torch.Tensor]],
              ) -> None:
    """One optimizer step per entry of grads; a None gradient leaves that parameter out of the step."""
    for step_grads in grads:
        for param, grad in zip(params, step_grads):
            param.grad = None if grad is None else grad.clone()
        optimizer.step()


def random_grads(params: list[torch.nn.Parameter], steps: int, seed: int) -> list[list[torch.Tensor | None]]:
    generator = torch.Generator().manual_seed(seed)
    grads = [[torch.randn(param.shape, generator=generator) for param in params] for _ in range(steps)]
    grads[1][3] = None  # the last parameter skips step 2, so its parity differs from the others afterwards
    return grads


@pytest.mark.parametrize("decoupled", [True, False])
def test_loop_and_foreach_give_identical_parameters(decoupled):
    loop_params = make_params(torch.Generator().manual_seed(0))
    foreach_params = [torch.nn.Parameter(param.detach().clone()) for param in loop_params]
    grads = random_grads(loop_params, steps=5, seed=1)
    for params, foreach in ((loop_params, False), (foreach_params, True)):
        optimizer = DEAT(params, lr=0.1, weight_decay=0.01, decoupled_weight_decay=decoupled, foreach=foreach)
        run_steps(optimizer, params, grads)
    for loop_param, foreach_param in zip(loop_params, foreach_params):
        assert torch.equal(loop_param, foreach_param)


def test_parameter_without_grad_is_skipped():
    used, unused = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    optimizer = DEAT([used, unused], lr=0.1)
    used.grad = torch.ones(3)
    optimizer.step()
    assert torch.equal(unused, torch.ones(3))
    assert len(optimizer.state[unused]) == 0
    assert not torch.equal(used, torch.ones(3))


def test_closure_is_evaluated_and_its_loss_returned():
    param = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    optimizer = DEAT([param], lr=0.5, weight_decay=0.0)

    def closure():
        optimizer.zero_grad()
        loss = (param ** 2).sum()
        loss.backward()
        return loss

    loss = optimizer.step(closure)
    assert loss.item() == pytest.approx(5.0)
    # Step 1 with g = 2θ: θ − α/√5 · 2 · (1 − k2) · 2θ.
    torch.testing.assert_close(param.detach(), torch.tensor([1.0, 2.0]) * (1 - 0.5 / math.sqrt(5) * 2 * 0.2 * 2))


def resume_matches_uninterrupted_run(serialise) -> None:
    """3 steps, save, 3 more steps; a fresh DEAT loaded from the save must reproduce the last 3 bitwise."""
    params = make_params(torch.Generator().manual_seed(2))
    grads = random_grads(params, steps=6, seed=3)
    optimizer = DEAT(params, lr=0.1, weight_decay=0.01)
    run_steps(optimizer, params, grads[:3])
    saved_state = serialise(optimizer.state_dict())
    resumed_params = [torch.nn.Parameter(param.detach().clone()) for param in params]

    run_steps(optimizer, params, grads[3:])
    resumed = DEAT(resumed_params, lr=0.5, weight_decay=0.0)  # hyper-parameters come from the saved state
    resumed.load_state_dict(saved_state)
    assert [resumed.state[param]["step"] for param in resumed_params] == [3, 3, 3, 2]
    run_steps(resumed, resumed_params, grads[3:])
    for param, resumed_param in zip(params, resumed_params):
        assert torch.equal(param, resumed_param)


def test_state_dict_round_trip_keeps_parity():
    resume_matches_uninterrupted_run(copy.deepcopy)


def test_state_dict_survives_torch_save_and_weights_only_load():
    def through_torch_save(state_dict):
        buffer = io.BytesIO()
        torch.save(state_dict, buffer)
        buffer.seek(0)
        return torch.load(buffer, weights_only=True)

    resume_matches_uninterrupted_run(through_torch_save)


@pytest.mark.parametrize("argument, value, message", [
    ("lr", -0.1, "lr must be >= 0"),
    ("k1", -1.0, "k1 must be >= 0"),
    ("k2", 1.0, r"k2 must be in \[0, 1\)"),
    ("k2", -0.1, r"k2 must be in \[0, 1\)"),
    ("weight_decay", -1e-4, "weight_decay must be >= 0"),
])
def test_deat_rejects_bad_hyperparameters(argument, value, message):
    kwargs = {"lr": 0.1, argument: value}
    with pytest.raises(ValueError, match=message):
        DEAT([torch.nn.Parameter(torch.zeros(2))], **kwargs)


def test_deat_rejects_bad_hyperparameters_in_a_param_group():
    optimizer = DEAT([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    with pytest.raises(ValueError, match=r"k2 must be in \[0, 1\)"):
        optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "k2": 1.5})


OPTIMIZER_OPTIONS = dict(lr=0.1, momentum=0.0, weight_decay=0.05, k1=1.0, k2=0.8, decoupled_weight_decay=True)


def test_pgd_at_without_momentum_is_algorithm_1():
    param = torch.nn.Parameter(torch.tensor([0.5, -1.0, 2.0]))
    optimizer = build_optimizer("pgd_at", [param], **OPTIMIZER_OPTIONS)
    param.grad = torch.tensor([0.2, 0.4, -0.6])
    optimizer.step()
    # θ − lr · (g + wd · θ)
    expected = [0.5 - 0.1 * (0.2 + 0.05 * 0.5), -1.0 - 0.1 * (0.4 + 0.05 * -1.0), 2.0 - 0.1 * (-0.6 + 0.05 * 2.0)]
    torch.testing.assert_close(param.detach(), torch.tensor(expected))


def test_build_optimizer_passes_the_options():
    params = [torch.nn.Parameter(torch.zeros(2))]
    sgd = build_optimizer("pgd_at", params, **{**OPTIMIZER_OPTIONS, "momentum": 0.9})
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.defaults["momentum"] == 0.9 and sgd.defaults["nesterov"] is False
    assert sgd.defaults["weight_decay"] == 0.05 and sgd.defaults["dampening"] == 0
    deat = build_optimizer("deat", params, **{**OPTIMIZER_OPTIONS, "k1": 0.5, "k2": 0.7,
                                              "decoupled_weight_decay": False})
    assert isinstance(deat, DEAT)
    group = deat.param_groups[0]
    assert (group["lr"], group["k1"], group["k2"], group["weight_decay"], group["decoupled_weight_decay"]) == (
        0.1, 0.5, 0.7, 0.05, False)


def test_unknown_method_is_rejected():
    assert METHODS[:2] == ("pgd_at", "deat")
    with pytest.raises(ValueError, match=r"method must be one of \('pgd_at', 'deat', 'trades', .*\), got 'adam'"):
        build_optimizer("adam", [torch.nn.Parameter(torch.zeros(2))], **OPTIMIZER_OPTIONS)
    with pytest.raises(ValueError, match="method must be one of"):
        effective_step("adam", lr=0.1, momentum=0.9, k1=1.0)


def test_effective_step_values():
    assert effective_step("pgd_at", lr=0.01, momentum=0.9, k1=1.0) == pytest.approx(0.1)
    assert effective_step("pgd_at", lr=0.01, momentum=0.0, k1=1.0) == pytest.approx(0.01)
    assert effective_step("deat", lr=0.01, momentum=0.9, k1=1.0) == pytest.approx(0.01 / math.sqrt(5))
    # The step belongs to the outer optimizer, whatever the objective.
    assert effective_step("trades", lr=0.01, momentum=0.9, k1=1.0) == pytest.approx(0.1)
    assert effective_step("mart_deat", lr=0.01, momentum=0.9, k1=1.0) == pytest.approx(0.01 / math.sqrt(5))
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\)"):
        effective_step("pgd_at", lr=0.01, momentum=1.0, k1=1.0)


@pytest.mark.parametrize("method, momentum, k1", [("pgd_at", 0.9, 1.0), ("pgd_at", 0.0, 1.0), ("deat", 0.0, 1.0),
                                                  ("deat", 0.0, 0.5)])
def test_effective_step_is_the_steady_state_step_of_the_optimizer(method, momentum, k1):
    param = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    optimizer = build_optimizer(method, [param], lr=0.01, momentum=momentum, weight_decay=0.0, k1=k1, k2=0.8,
                                decoupled_weight_decay=True)
    for _ in range(400):
        before = param.item()
        param.grad = torch.ones(1, dtype=torch.float64)
        optimizer.step()
    assert before - param.item() == pytest.approx(effective_step(method, lr=0.01, momentum=momentum, k1=k1),
                                                  rel=1e-9)


# The measured values (wd 5e-4, zero loss gradient): SGD-momentum at α 0.01, DEAT at its equal-effective-step
# partner α 0.2236 with decoupled and with coupled decay. Hand computation beside each.
DECAY_CASES = [
    ("pgd_at", 0.01, 0.9, False, 0.01 * 5e-4 / (1 - 0.9)),  # 5.00e-5
    ("deat", 0.2236, 0.9, True, 0.2236 * 5e-4),  # 1.118e-4: 2.24x SGD's, though the step is matched
    ("deat", 0.2236, 0.9, False, 0.2236 / math.sqrt(5) * 5e-4),  # 5.00e-5: matched
    ("pgd_at", 0.1, 0.0, False, 0.1 * 5e-4),  # Algorithm 1 as printed: momentum 0
]


@pytest.mark.parametrize("method, lr, momentum, decoupled, by_hand", DECAY_CASES)
def test_effective_decay_against_a_hand_computation(method, lr, momentum, decoupled, by_hand):
    assert effective_decay(method, lr, momentum, k1=1.0, weight_decay=5e-4,
                           decoupled_weight_decay=decoupled) == pytest.approx(by_hand, rel=1e-12)
    assert by_hand == pytest.approx({0.01: 5.00e-5, 0.2236: 1.118e-4 if decoupled else 5.00e-5, 0.1: 5e-5}[lr],
                                    rel=1e-3)


def measured_decay(method: str, lr: float, momentum: float, decoupled: bool) -> float:
    """The per-step shrink of θ under weight decay 5e-4 alone (zero loss gradient), measured over the last 200 of
    3000 steps, after the buffers reach their steady state and θ shrinks by the same factor every step."""
    param = torch.nn.Parameter(torch.ones(1, dtype=torch.float64))
    optimizer = build_optimizer(method, [param], lr=lr, momentum=momentum, weight_decay=5e-4, k1=1.0, k2=0.8,
                                decoupled_weight_decay=decoupled)
    history = []
    for _ in range(3000):
        param.grad = torch.zeros(1, dtype=torch.float64)
        optimizer.step()
        history.append(param.item())
    return 1.0 - (history[-1] / history[-201]) ** (1 / 200)


@pytest.mark.parametrize("method, lr, momentum, decoupled, by_hand", DECAY_CASES)
def test_effective_decay_is_the_measured_shrink_of_the_optimizer(method, lr, momentum, decoupled, by_hand):
    assert measured_decay(method, lr, momentum, decoupled) == pytest.approx(
        effective_decay(method, lr, momentum, k1=1.0, weight_decay=5e-4, decoupled_weight_decay=decoupled), rel=1e-3)


@pytest.mark.parametrize("decoupled", [True, False])
@pytest.mark.parametrize("method", METHODS)
def test_effective_decay_is_the_measured_shrink_for_every_method(method, decoupled):
    # Every objective shares its outer step's decay: TRADES + DEAT with decoupled decay shrinks by α·wd like DEAT
    # (a method-name check once gave it the coupled value).
    assert measured_decay(method, 0.01, 0.9, decoupled) == pytest.approx(
        effective_decay(method, 0.01, 0.9, k1=1.0, weight_decay=5e-4, decoupled_weight_decay=decoupled), rel=1e-3)


def test_effective_decay_ignores_what_the_method_does_not_read():
    # PGD-AT's decay is always coupled; DEAT's decoupled decay does not depend on k1 (nominal α), its coupled one does.
    assert effective_decay("pgd_at", 0.01, 0.9, 1.0, 5e-4, True) == effective_decay("pgd_at", 0.01, 0.9, 2.0, 5e-4,
                                                                                        False)
    assert effective_decay("deat", 0.1, 0.0, 2.0, 5e-4, True) == effective_decay("deat", 0.1, 0.9, 0.5, 5e-4, True)
    assert effective_decay("deat", 0.1, 0.0, 2.0, 5e-4, False) == pytest.approx(0.1 / math.sqrt(13) * 5e-4)
    assert effective_decay("deat", 0.1, 0.0, 1.0, 0.0, False) == 0.0
    with pytest.raises(ValueError, match="weight_decay must be >= 0, got -1"):
        effective_decay("deat", 0.1, 0.0, 1.0, -1.0, True)
    with pytest.raises(ValueError, match="method must be one of"):
        effective_decay("sgd", 0.1, 0.0, 1.0, 5e-4, False)


def make_scheduler(schedule: str, base_lr: float = 0.2, **kwargs):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=base_lr)
    return optimizer, build_scheduler(optimizer, schedule, **kwargs)


def lrs_over(optimizer, scheduler, iterations: int) -> list[float]:
    """The lr used by each of the next `iterations` optimizer steps."""
    lrs = []
    for _ in range(iterations):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_piecewise_schedule_of_the_paper():
    optimizer, scheduler = make_scheduler("piecewise", epochs=110, iters_per_epoch=10)
    lrs = lrs_over(optimizer, scheduler, 1100)
    # Epochs 1–100 at 0.2, 101–105 at 0.02, 106–110 at 0.002 (iterations 1000 and 1050 start epochs 101 and 106).
    assert lrs[0] == lrs[999] == 0.2
    assert lrs[1000] == pytest.approx(0.02) and lrs[1049] == pytest.approx(0.02)
    assert lrs[1050] == pytest.approx(0.002) and lrs[1099] == pytest.approx(0.002)


def test_piecewise_schedule_with_fractional_milestones():
    optimizer, scheduler = make_scheduler("piecewise", base_lr=1.0, epochs=3, iters_per_epoch=4,
                                          milestones=(1.5, 2), gamma=0.5)
    assert lrs_over(optimizer, scheduler, 12) == [1.0] * 6 + [0.5] * 2 + [0.25] * 4


def test_cosine_schedule():
    optimizer, scheduler = make_scheduler("cosine", epochs=2, iters_per_epoch=5)
    lrs = lrs_over(optimizer, scheduler, 11)
    assert lrs[0] == pytest.approx(0.2)
    assert lrs[5] == pytest.approx(0.1)
    assert lrs[10] == pytest.approx(0.0, abs=1e-12)
    assert lrs[2] == pytest.approx(0.2 * 0.5 * (1 + math.cos(math.pi * 2 / 10)))


def test_constant_schedule():
    optimizer, scheduler = make_scheduler("constant", epochs=2, iters_per_epoch=3)
    assert lrs_over(optimizer, scheduler, 6) == [0.2] * 6


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_scheduler_state_dict_round_trip(schedule):
    options = dict(epochs=4, iters_per_epoch=3, milestones=(1.5, 3), gamma=0.3)
    optimizer, scheduler = make_scheduler(schedule, **options)
    lrs_over(optimizer, scheduler, 5)
    buffer = io.BytesIO()
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    # The documented resume order: build both, then load the optimizer, then the scheduler.
    resumed_optimizer, resumed_scheduler = make_scheduler(schedule, **options)
    resumed_optimizer.load_state_dict(saved["optimizer"])
    resumed_scheduler.load_state_dict(saved["scheduler"])
    assert lrs_over(resumed_optimizer, resumed_scheduler, 7) == lrs_over(optimizer, scheduler, 7)


@pytest.mark.parametrize("kwargs, message", [
    (dict(schedule="step"), r"schedule must be one of \('piecewise', 'cosine', 'constant'\), got 'step'"),
    (dict(milestones=(5, 3)), r"milestones must be strictly increasing, got \(5.0, 3.0\)"),
    (dict(milestones=(3, 3)), "milestones must be strictly increasing"),
    (dict(milestones=(0, 3)), r"milestones must lie in \(0, epochs=10\]"),
    (dict(milestones=(3, 11)), r"milestones must lie in \(0, epochs=10\]"),
    (dict(gamma=0.0), "gamma must be > 0"),
    (dict(epochs=0), "epochs must be >= 1"),
    (dict(iters_per_epoch=0), "iters_per_epoch must be >= 1"),
])
def test_scheduler_rejects_bad_arguments(kwargs, message):
    arguments = dict(schedule="piecewise", epochs=10, iters_per_epoch=5, milestones=(5, 8))
    arguments.update(kwargs)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    with pytest.raises(ValueError, match=message):
        build_scheduler(optimizer, **arguments)


def test_milestones_are_ignored_by_other_schedules():
    # The paper's default milestones (100, 105) must not block a short cosine or constant run.
    for schedule in ("cosine", "constant"):
        make_scheduler(schedule, epochs=2, iters_per_epoch=3)
