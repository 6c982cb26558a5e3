"""Optimizers and per-iteration learning-rate schedules for PGD-AT and DEAT.

`DEAT` is the outer step of Diffusion Enhanced Adversarial Training (Sun et al., KDD 2023, Algorithm 2), i.e.
Positive-Negative Momentum (Xie et al., ICML 2021) on top of PGD-AT's inner attack. `build_optimizer` and
`build_scheduler` turn config values into torch objects. How far each optimizer moves per unit gradient and how
much its weight decay shrinks the weights per step (the two knobs a fair comparison matches) are in
`deat.effective`, without torch, so that the report shares them.
"""

import math
from collections.abc import Callable, Iterable, Sequence

import torch

from .config import outer_step_of
from .effective import check_method

SCHEDULES = ("piecewise", "cosine", "constant")


def _check_deat_hyperparameters(lr: float, k1: float, k2: float, weight_decay: float) -> None:
    if not lr >= 0.0:
        raise ValueError(f"lr must be >= 0, got {lr}")
    if not k1 >= 0.0:
        raise ValueError(f"k1 must be >= 0, got {k1}")
    if not 0.0 <= k2 < 1.0:
        raise ValueError(f"k2 must be in [0, 1), got {k2}")
    if not weight_decay >= 0.0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")


def _deat_step_loop(params: list[torch.Tensor], grads: list[torch.Tensor], current: list[torch.Tensor],
                    other: list[torch.Tensor], *, lr: float, k1: float, k2: float, weight_decay: float,
                    decoupled_weight_decay: bool) -> None:
    scale = lr / math.sqrt((1.0 + k1) ** 2 + k1 ** 2)
    for param, grad, h_current, h_other in zip(params, grads, current, other):
        if weight_decay:
            if decoupled_weight_decay:
                param.mul_(1.0 - lr * weight_decay)
            else:
                grad = grad.add(param, alpha=weight_decay)
        h_current.lerp_(grad, 1.0 - k2)  # k2·h_{t-2} + (1 − k2)·g_t
        param.add_(h_current, alpha=-scale * (1.0 + k1))
        param.add_(h_other, alpha=scale * k1)


def _deat_step_foreach(params: list[torch.Tensor], grads: list[torch.Tensor], current: list[torch.Tensor],
                       other: list[torch.Tensor], *, lr: float, k1: float, k2: float, weight_decay: float,
                       decoupled_weight_decay: bool) -> None:
    # The same operations as `_deat_step_loop`, in the same order, one launch per line for all parameters:
    # four multi-tensor ops, as many as SGD-momentum's foreach step, so DEAT adds no launch overhead.
    scale = lr / math.sqrt((1.0 + k1) ** 2 + k1 ** 2)
    if weight_decay:
        if decoupled_weight_decay:
            torch._foreach_mul_(params, 1.0 - lr * weight_decay)
        else:
            grads = torch._foreach_add(grads, params, alpha=weight_decay)
    torch._foreach_lerp_(current, grads, 1.0 - k2)
    torch._foreach_add_(params, current, alpha=-scale * (1.0 + k1))
    torch._foreach_add_(params, other, alpha=scale * k1)


class DEAT(torch.optim.Optimizer):
    """Diffusion Enhanced Adversarial Training's outer step (Sun et al., KDD 2023, Algorithm 2).

    This is Positive-Negative Momentum (Xie et al., ICML 2021): two momentum buffers, one fed by the odd-numbered
    steps' gradients and one by the even-numbered steps'. At step t (1-based, counted per parameter)::

        h_t     = k2 · h_{t-2} + (1 − k2) · g_t                       # the buffer of t's parity
        θ_{t+1} = θ_t − α' · [(1 + k1) · h_t − k1 · h_{t-1}]          # h_{t-1}: the other buffer
        α'      = α / √((1 + k1)² + k1²)

    Both buffers start at zero. They hold gradients of disjoint steps, so their weighted difference enlarges the
    gradient-noise (diffusion) term at no extra gradient cost (the paper's Theorem 2).

    Weight decay (the paper leaves the choice open):
      * ``decoupled_weight_decay=True`` (default, as in the PNM reference): θ ← θ · (1 − α · wd) before the
        update, with α the nominal (scheduled) learning rate, not α';
      * ``decoupled_weight_decay=False``: coupled, g ← g + wd · θ, so the decay goes through both buffers.

    ``state[p]["step"]`` is an int per parameter, so the parity survives ``state_dict`` round-trips; parameters
    whose ``grad`` is None are skipped and their step count does not advance. ``foreach=None`` uses the
    multi-tensor path when every parameter to update is on CUDA and the per-parameter loop otherwise; both paths
    perform identical arithmetic.

    Args:
        params: parameters or parameter groups.
        lr: α, the nominal learning rate (≥ 0).
        k1: weight of the negative momentum (≥ 0); paper default 1.0.
        k2: decay of each buffer, in [0, 1); paper default 0.8.
        weight_decay: L2 coefficient (≥ 0).
        decoupled_weight_decay: decoupled (True) or coupled (False) weight decay, see above.
        foreach: True = multi-tensor ops, False = per-parameter loop, None = choose by device.
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict], lr: float, k1: float = 1.0,
                 k2: float = 0.8, weight_decay: float = 5e-4, decoupled_weight_decay: bool = True,
                 foreach: bool | None = None) -> None:
        _check_deat_hyperparameters(lr, k1, k2, weight_decay)
        defaults = dict(lr=lr, k1=k1, k2=k2, weight_decay=weight_decay,
                        decoupled_weight_decay=decoupled_weight_decay, foreach=foreach)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        """Add a parameter group; its own hyper-parameters are validated like the defaults."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_deat_hyperparameters(group["lr"], group["k1"], group["k2"], group["weight_decay"])

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """Perform one DEAT update; `closure` (optional) re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            params, grads, current, other = [], [], [], []
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError("DEAT does not support sparse gradients")
                state = self.state[param]
                if not state:
                    state["step"] = 0
                    state["odd_momentum"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["even_momentum"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["step"] += 1
                odd_step = state["step"] % 2 == 1
                params.append(param)
                grads.append(param.grad)
                current.append(state["odd_momentum"] if odd_step else state["even_momentum"])
                other.append(state["even_momentum"] if odd_step else state["odd_momentum"])
            if not params:
                continue

            foreach = group["foreach"]
            if foreach is None:
                foreach = all(param.is_cuda for param in params)
            update = _deat_step_foreach if foreach else _deat_step_loop
            update(params, grads, current, other, lr=group["lr"], k1=group["k1"], k2=group["k2"],
                   weight_decay=group["weight_decay"], decoupled_weight_decay=group["decoupled_weight_decay"])
        return loss


def build_optimizer(method: str, params: Iterable[torch.Tensor] | Iterable[dict], lr: float, momentum: float,
                    weight_decay: float, k1: float, k2: float,
                    decoupled_weight_decay: bool) -> torch.optim.Optimizer:
    """The outer optimizer of `method`.

    SGD-momentum methods ("pgd_at", "trades", "mart", "fast_at"; deat.config.outer_step_of): ``torch.optim.SGD``
    (coupled weight decay, no dampening, no Nesterov); ``momentum=0`` is the paper's Algorithm 1 as printed, 0.9
    the Bag-of-Tricks code the authors adapted. k1, k2 and decoupled_weight_decay are ignored.
    DEAT methods ("deat", "trades_deat", ...): `DEAT` with k1, k2, weight decay as given; momentum is ignored.
    """
    check_method(method)
    if outer_step_of(method) == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=False)
    return DEAT(params, lr=lr, k1=k1, k2=k2, weight_decay=weight_decay,
                decoupled_weight_decay=decoupled_weight_decay)


class _LrFactor:
    """lr multiplier at a given iteration, for `LambdaLR`.

    A top-level class rather than a lambda so that the scheduler pickles and `LambdaLR.state_dict` saves (and
    `load_state_dict` restores) these attributes.
    """

    def __init__(self, schedule: str, total_iters: int, milestone_iters: tuple[float, ...], gamma: float) -> None:
        self.schedule = schedule
        self.total_iters = total_iters
        self.milestone_iters = milestone_iters
        self.gamma = gamma

    def __call__(self, iteration: int) -> float:
        if self.schedule == "piecewise":
            passed = sum(1 for milestone in self.milestone_iters if milestone <= iteration)
            return self.gamma ** passed
        if self.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(iteration, self.total_iters) / self.total_iters))
        return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: str, epochs: int, iters_per_epoch: int,
                    milestones: Sequence[float] = (100, 105),
                    gamma: float = 0.1) -> torch.optim.lr_scheduler.LRScheduler:
    """A learning-rate schedule to be stepped once per *iteration* (after each `optimizer.step()`).

    At iteration i (completed optimizer steps; epoch progress e = i / iters_per_epoch) the lr is the base lr times
      "piecewise": gamma^k, k = number of milestones (in epochs, may be fractional) ≤ e; the paper's 110 epochs
                   with milestones (100, 105) train epochs 1–100 at α, 101–105 at 0.1α, 106–110 at 0.01α;
      "cosine":    0.5 · (1 + cos(π · i / (epochs · iters_per_epoch))), annealing to zero at the end;
      "constant":  1.
    Milestones and gamma are only used (and validated) for "piecewise". On resume, rebuild the optimizer and this
    scheduler with the same arguments first, then load the optimizer's state, then the scheduler's: building a
    scheduler resets the optimizer's lr to the iteration-0 value, and only the optimizer's state restores it.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if iters_per_epoch < 1:
        raise ValueError(f"iters_per_epoch must be >= 1, got {iters_per_epoch}")
    milestones = tuple(float(milestone) for milestone in milestones)
    if schedule == "piecewise":
        if any(later <= earlier for earlier, later in zip(milestones, milestones[1:])):
            raise ValueError(f"milestones must be strictly increasing, got {milestones}")
        if any(not 0.0 < milestone <= epochs for milestone in milestones):
            raise ValueError(f"milestones must lie in (0, epochs={epochs}], got {milestones}")
        if not gamma > 0.0:
            raise ValueError(f"gamma must be > 0, got {gamma}")
    factor = _LrFactor(schedule, total_iters=epochs * iters_per_epoch,
                       milestone_iters=tuple(milestone * iters_per_epoch for milestone in milestones), gamma=gamma)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
