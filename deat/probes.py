"""Mechanism probes: the gradient noise and the update noise behind the paper's SDE argument, measured while training.

The paper (Sun, Sinha & Zhang, KDD 2023, §3) models PGD-AT as dθ = −(…)θ dt + √(α/b)·A·B dW with B·Bᵀ the covariance
Σ of the per-example gradient of the robust loss, and DEAT's claim (Theorem 2) is that its two-buffer step enlarges
the noise by a factor k > 1 at the same cost. Every `probe_every` epochs (`probe_batches` = M minibatches of the
run's batch size b, drawn once as a fixed probe set of M·b training images, disjoint), at the current weights:

1. Gradient noise. G_i (P,) = the gradient of the run's own training objective at the adversarial examples of its
   own training attack on minibatch i (AWP included), exactly as a training step computes it (BatchNorm in train
   mode). With Ḡ their mean,
       tr Σ̂    = b/(M − 1) · Σ_i ‖G_i − Ḡ‖²
   is unbiased for tr Σ, the per-example gradient covariance over the training set (divisor N − 1), when the M
   minibatches are disjoint simple random samples: each batch mean has covariance (Σ/b)(1 − b/N), two disjoint ones
   −Σ/N, and E Σ_i ‖G_i − Ḡ‖² = (M − 1)·tr Σ/b exactly (the finite-population terms cancel);
       |G|²̂   = ‖Ḡ‖² − tr Σ̂ · (1/(M·b) − 1/N)
   is unbiased for ‖E G‖², and the simple noise scale is B_simple = tr Σ̂ / |G|²̂ (McCandlish et al. 2018, "An
   Empirical Model of Large-Batch Training", eq. 2.8, Appendix A). The run's diffusion is (α/b)·tr Σ̂ (the SDE's
   diffusion term squared, trace), α the learning rate of that epoch; `diffusion_effective` uses the effective
   step (α/(1 − μ) for SGD with momentum μ, α/√((1+k1)² + k1²) for DEAT, deat.effective) instead of α.
   With BatchNorm in train mode a batch's gradient is not a mean of independent per-example gradients; G_i is the
   gradient training really takes, and tr Σ̂ is the noise of that, per example.
2. Update noise of the outer step actually used. From the optimizer's state at that moment, one step on each of
   the M minibatches: Δθ_i = θ after − θ before. tr Cov(Δθ) = 1/(M − 1) · Σ_i ‖Δθ_i − Δθ̄‖² and ‖Δθ̄‖. The
   state is the same for every i, so only the gradient varies: SGD with momentum gives Δθ_i = −α(μ·m + G_i) and
   tr Cov = α²·tr Σ̂/b; DEAT's Δθ_i = −α′[(1 + k1)(k2·h + (1 − k2)·G_i) − k1·h′] gives α′²(1 + k1)²(1 − k2)²·tr Σ̂/b
   (docs/method.md derives both and the ratio at matched effective step). Weight decay shifts every Δθ_i alike.

After the probe, weights, BatchNorm statistics, optimizer state (in place: a captured CUDA graph keeps pointing at
the same tensors) and every random generator are exactly what they were: a run with probes trains bit for bit like
one without. The probe's own attacks draw from a generator of their own, seeded per probe epoch.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import torch

PROBE_SEED = 2_000_003  # the probe attacks' generator: seed + PROBE_SEED + epoch, apart from training's generators


def flat(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """(P,) float64 concatenation of tensors (gradients or parameters), on their device."""
    return torch.cat([t.detach().reshape(-1).double() for t in tensors])


def gradient_noise(grads: torch.Tensor, batch_size: int, n_train: int) -> dict[str, float]:
    """tr Σ̂, |G|²̂ and B_simple from (M, P) minibatch-mean gradients (see the module docstring); M ≥ 2."""
    m = grads.shape[0]
    if m < 2:
        raise ValueError(f"gradient_noise needs at least 2 minibatch gradients, got {m}")
    mean = grads.mean(dim=0)
    trace = batch_size / (m - 1) * ((grads - mean) ** 2).sum().item()
    mean_sq = (mean ** 2).sum().item()
    grad_sq = mean_sq - trace * (1.0 / (m * batch_size) - 1.0 / n_train)
    return {"grad_trace_sigma": trace, "grad_norm_sq": grad_sq, "grad_norm_sq_plugin": mean_sq,
            "b_simple": trace / grad_sq if grad_sq > 0 else None}


def update_noise(updates: torch.Tensor) -> dict[str, float]:
    """tr Cov(Δθ) (sample covariance, divisor M − 1) and ‖mean Δθ‖ from (M, P) one-step updates."""
    mean = updates.mean(dim=0)
    trace = ((updates - mean) ** 2).sum().item() / (updates.shape[0] - 1)
    return {"update_trace_cov": trace, "update_mean_norm": mean.norm().item()}


class _SavedState:
    """A snapshot of a model, its optimizer and generators, restored in place."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 generators: list[torch.Generator]) -> None:
        self.model = {k: v.detach().clone() for k, v in model.state_dict().items()}
        # The gradient tensors themselves, and their values: a captured step keeps writing into the same ones.
        self.grads = [(p, p.grad, None if p.grad is None else p.grad.detach().clone()) for p in model.parameters()]
        self.optimizer = copy.deepcopy(optimizer.state_dict())
        self.generators = [(g, g.get_state()) for g in generators]
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    @torch.no_grad()
    def restore(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        for key, value in model.state_dict().items():
            value.copy_(self.model[key])
        for param, grad, values in self.grads:
            param.grad = grad
            if grad is not None:
                grad.copy_(values)
        saved = self.optimizer["state"]
        params = [p for group in optimizer.param_groups for p in group["params"]]
        for index, param in enumerate(params):
            state = optimizer.state.get(param)
            if index not in saved:
                if state:  # a buffer the probe's own step created: gone again, as before the probe
                    optimizer.state.pop(param)
                continue
            for key, value in saved[index].items():
                if isinstance(value, torch.Tensor) and isinstance(state.get(key), torch.Tensor):
                    state[key].copy_(value)
                else:
                    state[key] = copy.deepcopy(value)
        for group, saved_group in zip(optimizer.param_groups, self.optimizer["param_groups"]):
            group.update({k: v for k, v in saved_group.items() if k != "params"})
        for generator, state in self.generators:
            generator.set_state(state)
        torch.set_rng_state(self.cpu_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)


def probe_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                minibatches: list[tuple[torch.Tensor, torch.Tensor]],
                step: Callable[[torch.Tensor, torch.Tensor], Any],
                generators: list[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on each minibatch from the same state; returns (M, P) gradients and (M, P) updates.

    `step(x, y)` must zero the gradients, compute the loss, backpropagate and step the optimizer (the run's own
    training step). Afterwards model, optimizer and `generators` (plus torch's global generators) are restored.
    """
    saved = _SavedState(model, optimizer, generators)
    params = [p for p in model.parameters() if p.requires_grad]
    before = flat(params)
    grads, updates = [], []
    try:
        for x, y in minibatches:
            saved.restore(model, optimizer)
            step(x, y)
            grads.append(flat(p.grad if p.grad is not None else torch.zeros_like(p) for p in params))
            updates.append(flat(params) - before)
    finally:
        saved.restore(model, optimizer)
    return torch.stack(grads), torch.stack(updates)


def probe_set(n_train: int, batches: int, batch_size: int, seed: int) -> torch.Tensor:
    """(batches, batch_size) indices into the training split: M disjoint minibatches of a seeded permutation."""
    needed = batches * batch_size
    if needed > n_train:
        raise ValueError(f"probe_batches={batches} x batch_size={batch_size} = {needed} probe images exceed the "
                         f"{n_train} training images; lower probe_batches")
    order = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed + PROBE_SEED))
    return order[:needed].reshape(batches, batch_size)
