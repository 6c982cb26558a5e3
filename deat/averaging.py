"""Weight averaging: an exponential moving average (EMA) of a model's parameters, the remedy for robust overfitting
that adversarial-training papers compare against (Gowal et al. 2020, "Uncovering the Limits of Adversarial Training
against Norm-Bounded Adversarial Examples"; Rebuffi et al. 2021).

After optimizer step t (t = 1, 2, ...) every parameter of the averaged model is updated as

    θ̄ ← τ_t · θ̄ + (1 − τ_t) · θ,      τ_t = 0                                   for t < t_w,
                                        τ_t = min(τ, (1 + d) / (10 + d)), d = t − t_w  for t ≥ t_w,

the rule of Gowal et al.'s reference code as ported by wzekai99/DM-Improves-AT (`gowal21uncovering/utils/
watrain.py`, `ema_update` with `dynamic_decay=True`): the (1 + d)/(10 + d) ramp, from TensorFlow's
ExponentialMovingAverage with `num_updates`, keeps the first updates from averaging in the random initialisation,
and t_w = WARMUP_FRACTION · (all optimizer steps of the run) steps copy the raw model outright. BatchNorm running
statistics are not averaged: they are copied from the raw model whenever the averaged model is used (the reference's
`update_bn` after each epoch), since averaged weights with the raw model's statistics is what the reference evaluates.

τ = 0 makes τ_t = 0 at every step: θ̄ = 0·θ̄ + 1·θ is the raw model bit for bit.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

WARMUP_FRACTION = 0.025  # DM-Improves-AT: warmup_steps = 0.025 · num_adv_epochs · update_steps


def ema_decay(step: int, tau: float, warmup_steps: int) -> float:
    """τ_t of the update after optimizer step `step` (1-based): 0 before `warmup_steps`, then min(τ, (1+d)/(10+d))."""
    if step < warmup_steps or tau == 0:
        return 0.0
    d = step - warmup_steps
    return min(tau, (1.0 + d) / (10.0 + d))


class WeightAverage:
    """The EMA of `model`'s parameters (see the module docstring), kept in a copy of the model.

    `update(model)` after each optimizer step; `averaged(model)` returns the averaged model with the raw model's
    BatchNorm statistics copied in, ready to evaluate; `state_dict()` / `load_state_dict()` carry the average and its
    step count through a training checkpoint, so a resumed run continues the same average bit for bit.
    """

    def __init__(self, model: torch.nn.Module, tau: float, total_steps: int) -> None:
        if not 0 <= tau < 1:
            raise ValueError(f"ema_tau={tau!r} is invalid; expected 0 <= ema_tau < 1")
        self.tau, self.steps = tau, 0
        self.warmup_steps = int(WARMUP_FRACTION * total_steps)
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.steps += 1
        decay = ema_decay(self.steps, self.tau, self.warmup_steps)
        averaged = list(self.model.parameters())
        torch._foreach_mul_(averaged, decay)
        torch._foreach_add_(averaged, [p.detach() for p in model.parameters()], alpha=1.0 - decay)

    @torch.no_grad()
    def averaged(self, model: torch.nn.Module) -> torch.nn.Module:
        for mine, theirs in zip(self.model.buffers(), model.buffers()):
            mine.copy_(theirs)
        return self.model

    def state_dict(self) -> dict[str, Any]:
        return {"tau": self.tau, "steps": self.steps, "warmup_steps": self.warmup_steps,
                "model": self.model.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps, self.warmup_steps = state["steps"], state["warmup_steps"]
        self.model.load_state_dict(state["model"])
