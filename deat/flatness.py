"""Flatness of the robust loss around a checkpoint, and the robust generalization gap measured alike on both sides.

The AWP paper (Wu, Xia & Wang, NeurIPS 2020, "Adversarial Weight Perturbation Helps Robust Generalization", §3,
Fig. 1) links a flatter weight-loss landscape of the *robust* loss to a smaller robust generalization gap. Two
curves over relative perturbation sizes γ, on a fixed set of training images:

- random: the mean rise L(θ + γ·d) − L(θ) over `directions` random directions d, filter-normalised (Li, Xu,
  Taylor, Studer & Goldstein, NeurIPS 2018, "Visualizing the Loss Landscape of Neural Nets", §4): each filter
  (slice along the output dimension) of each conv / linear weight gets d_f ~ N(0, I) rescaled to ‖d_f‖ = ‖θ_f‖;
  biases and BatchNorm parameters are not perturbed (Li et al. zero those directions; AWP perturbs the same set).
- worst: the rise under AWP's worst-case perturbation of that size, one normalised ascent step per layer,
  v_l = γ·‖w_l‖·g_l/‖g_l‖ with g the gradient of the robust loss (AWP's eq. 9, as deat.objectives' training AWP).

L is the robust loss: the mean cross-entropy at PGD adversarial examples crafted against the model being measured
(the perturbed one: the inner max is taken again at every θ + γ·d, as the robust loss is defined), BatchNorm in
eval mode. A quadratic L(θ) = ½‖θ − θ*‖² without attack has random rise ½γ²‖θ‖² at θ = θ* whatever d (every
direction is normalised to ‖θ‖), and worst rise γ‖w‖‖g‖ + ½γ²‖w‖² for one layer: the tests check both.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

GAMMAS = (0.0, 0.005, 0.01, 0.02, 0.05)  # relative sizes; AWP trains at γ = 5e-3 and plots up to about 0.05
NORM_FLOOR = 1e-20  # ‖g_l‖ + 1e-20, as AWP's reference (a layer with zero gradient is not moved)


def perturbed_layers(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The weights both curves perturb: conv and linear weights (more than one dimension)."""
    return {name: p for name, p in model.named_parameters() if p.dim() > 1 and name.endswith("weight")}


def filter_normalised_direction(layers: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """d ~ N(0, I) per layer, each filter (index along dim 0) rescaled to the norm of the same filter of θ."""
    direction = {}
    for name, w in layers.items():
        d = torch.randn(w.shape, generator=generator, device=w.device, dtype=w.dtype)
        scale = w.detach().flatten(1).norm(dim=1) / d.flatten(1).norm(dim=1).clamp_min(NORM_FLOOR)
        direction[name] = d * scale.view(-1, *([1] * (w.dim() - 1)))
    return direction


def worst_case_direction(layers: dict[str, torch.Tensor], loss: torch.Tensor) -> dict[str, torch.Tensor]:
    """AWP's per-layer direction ‖w_l‖·g_l/‖g_l‖ (scaled by γ by the caller), g the gradient of `loss`."""
    grads = torch.autograd.grad(loss, list(layers.values()))
    return {name: w.detach().norm() * g / (g.norm() + NORM_FLOOR) for (name, w), g in zip(layers.items(), grads)}


@torch.no_grad()
def _shift(layers: dict[str, torch.Tensor], direction: dict[str, torch.Tensor], scale: float) -> None:
    for name, w in layers.items():
        w.add_(direction[name], alpha=scale)


def flatness_curves(model: torch.nn.Module, robust_loss: Callable[[], torch.Tensor], gammas=GAMMAS,
                    directions: int = 3, seed: int = 0) -> dict[str, list[float] | float | int]:
    """The random and worst-case rise of `robust_loss()` (a scalar, recomputed at each perturbed θ) per γ.

    `robust_loss` must build its graph w.r.t. the model's weights (for the worst-case gradient); the model's weights
    are restored exactly afterwards (each shift is undone from a saved copy). Returns {"gammas", "base_loss",
    "random_rise" (mean over directions), "random_rise_sd", "worst_rise", "directions"}.
    """
    layers = perturbed_layers(model)
    saved = {name: w.detach().clone() for name, w in layers.items()}
    requires = {name: w.requires_grad for name, w in layers.items()}
    for w in layers.values():
        w.requires_grad_(True)
    generator = torch.Generator(device=next(iter(layers.values())).device).manual_seed(seed)
    random_dirs = [filter_normalised_direction(layers, generator) for _ in range(directions)]

    def restore() -> None:
        with torch.no_grad():
            for name, w in layers.items():
                w.copy_(saved[name])

    try:
        with torch.enable_grad():
            base = robust_loss()
            worst_dir = worst_case_direction(layers, base)
        base_value = base.item()
        random_rise, random_sd, worst_rise = [], [], []
        for gamma in gammas:
            rises = []
            for direction in random_dirs:
                _shift(layers, direction, gamma)
                with torch.no_grad():
                    rises.append(_value(robust_loss) - base_value)
                restore()
            mean = sum(rises) / len(rises)
            random_rise.append(mean)
            random_sd.append((sum((r - mean) ** 2 for r in rises) / max(len(rises) - 1, 1)) ** 0.5)
            _shift(layers, worst_dir, gamma)
            worst_rise.append(_value(robust_loss) - base_value)
            restore()
    finally:
        restore()
        for name, w in layers.items():
            w.requires_grad_(requires[name])
    return {"gammas": list(gammas), "base_loss": base_value, "random_rise": random_rise,
            "random_rise_sd": random_sd, "worst_rise": worst_rise, "directions": directions}


def _value(robust_loss: Callable[[], torch.Tensor]) -> float:
    # The inner attack needs input gradients even where the curve itself needs none.
    with torch.enable_grad():
        return robust_loss().item()
