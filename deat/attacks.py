"""Projected gradient descent (PGD) attacks and the accuracies measured with them.

PGD (Madry et al., ICLR 2018) maximises the cross-entropy of `model` inside an ε-ball around x, intersected with
the pixel box [0, 1]; it is both the inner loop of PGD-AT / DEAT (PAPER.md, Algorithm 2) and the evaluation attack.

These are pure functions: they never call model.train()/model.eval() (the paper attacks with BatchNorm in eval
mode during training; the caller sets that) and never write into parameter .grad (gradients are taken with
torch.autograd.grad w.r.t. the input only). The step loop has fixed shapes, no .item() and no branching on
tensor values, so it runs under bf16 autocast and can be captured in a CUDA graph.

Inputs: the public functions (`pgd`, `clean_accuracy`, `robust_mask`, `robust_accuracy`, and the training
objectives' attacks in deat.objectives) refuse pixels outside [0, 1] with a ValueError naming the function and
the range found (`check_pixel_range`: one aminmax and one host sync, before any attack step), rather than
clipping them: clean and robust accuracy then always see the same images. The training path
(deat.objectives.inner_attack, which deat.fast captures in a CUDA graph) calls the unchecked `_pgd`, as a check
there would sync the host every step and cannot run under capture; its batches come from deat.data.Batches,
uint8 / 255 by construction.

Random start (one draw per restart, from `generator`, in this order):
- ℓ∞: δ ~ Uniform[-ε, ε] elementwise.
- ℓ2: δ = ε·u·v with v a Gaussian vector normalised to unit ℓ2 norm (a uniform direction; drawn first) and
  u ~ Uniform[0, 1] per example (drawn second). The radius is uniform, not uniform in volume: in 3072 dimensions
  the latter puts almost every start on the sphere, leaving no small starts at all.
The start is then clipped to [0, 1]. Restart r of `pgd(..., restarts=R)` therefore starts exactly where the r-th
of R successive `pgd(..., restarts=1)` calls on the same generator would.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F

NORMS = ("linf", "l2")

# Floor for per-example norms we divide by: a zero gradient (or zero perturbation) stays zero instead of NaN.
_TINY = 1e-12


def _check_attack_args(x: torch.Tensor, y: torch.Tensor | None, eps: float, alpha: float, steps: int, norm: str,
                       random_start: bool, restarts: int, generator: torch.Generator | None) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}")
    if restarts > 1 and not random_start:
        raise ValueError("restarts > 1 needs random_start=True: without a random start every restart is identical")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor with pixels in [0, 1], got dtype {x.dtype}")
    if y is not None and y.shape != x.shape[:1]:
        raise ValueError(f"y must have shape ({x.shape[0]},) to match x, got {tuple(y.shape)}")
    if generator is not None and generator.device.type != x.device.type:
        raise ValueError(f"generator must be on x's device type {x.device.type!r}, got {generator.device.type!r}")


def check_pixel_range(x: torch.Tensor, caller: str) -> None:
    """Refuse x unless every value lies in [0, 1] (NaN included): a one-line ValueError naming `caller`.

    One aminmax and one host sync; call it in eager entry points only, never inside a captured CUDA graph.
    """
    if x.numel() == 0:
        return
    low, high = torch.stack(torch.aminmax(x.detach())).tolist()
    if not (low >= 0.0 and high <= 1.0):
        raise ValueError(f"{caller}: pixels must be in [0, 1], found min {low:.6g} and max {high:.6g} "
                         f"(scale images to [0, 1], e.g. uint8 / 255, before attacking)")


def _per_example_norm(t: torch.Tensor) -> torch.Tensor:
    """ℓ2 norm of each example, shaped (B, 1, ..., 1) to broadcast against t."""
    return t.flatten(1).norm(dim=1).view(-1, *[1] * (t.dim() - 1))


def _random_start(x: torch.Tensor, eps: float, norm: str, generator: torch.Generator | None) -> torch.Tensor:
    if norm == "linf":
        delta = (2 * torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) - 1) * eps
    else:
        direction = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        direction = direction / _per_example_norm(direction).clamp_min(_TINY)
        radius = eps * torch.rand(x.shape[0], generator=generator, device=x.device, dtype=x.dtype)
        delta = direction * radius.view(-1, *[1] * (x.dim() - 1))
    return (x + delta).clamp(0, 1)


def _project(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Nearest point of the ε-ball to delta (Euclidean projection for both norms)."""
    if norm == "linf":
        return delta.clamp(-eps, eps)
    return delta * (eps / _per_example_norm(delta).clamp_min(_TINY)).clamp(max=1)


def _ascent_direction(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """Steepest-ascent direction of unit norm: sign for ℓ∞, the per-example normalised gradient for ℓ2."""
    if norm == "linf":
        return grad.sign()
    return grad / _per_example_norm(grad).clamp_min(_TINY)


def _per_example_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # float() so bf16-autocast logits give a float32 loss: bf16 rounding would blur the comparison of restarts.
    return F.cross_entropy(model(x).float(), y, reduction="none")


def _pgd_from(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor, eps: float,
              alpha: float, steps: int, norm: str, ever_wrong: torch.Tensor | None = None) -> torch.Tensor:
    """`steps` PGD steps from x_adv. With `ever_wrong` ((B,) bool), also marks in place every example that some
    iterate before the last one (the start included) misclassifies: the step's forward pass computes those
    logits anyway. The last iterate is left to the caller, which classifies it."""
    for _ in range(steps):
        x_adv = x_adv.detach().requires_grad_(True)
        logits = model(x_adv).float()
        if ever_wrong is not None:
            ever_wrong |= logits.detach().argmax(dim=1) != y
        # Summed, not averaged, loss: each example's gradient is then independent of the batch size.
        loss = F.cross_entropy(logits, y, reduction="none").sum()
        (grad,) = torch.autograd.grad(loss, x_adv)
        delta = _project(x_adv.detach() - x + alpha * _ascent_direction(grad, norm), eps, norm)
        # Clipping a point of the ball to the box keeps it in the ball, as x itself lies in the box.
        x_adv = (x + delta).clamp(0, 1)
    return x_adv.detach()


def pgd(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float, steps: int,
        norm: str = "linf", random_start: bool = True, restarts: int = 1,
        generator: torch.Generator | None = None) -> torch.Tensor:
    """Adversarial examples maximising the cross-entropy of `model` within the ε-ball around x and within [0, 1].

    x: (B, C, H, W) floats in [0, 1]; y: (B,) class indices; eps, alpha: ball radius and step size in pixel units.
    Each step ascends by alpha along the sign of the gradient (ℓ∞) or the per-example unit-norm gradient (ℓ2),
    projects onto the ε-ball, then clips to [0, 1]. With restarts > 1 each example keeps the restart whose final
    loss is highest, so adding restarts never lowers an example's loss. steps == 0 or eps == 0 returns x
    (K = 0: standard training). The random start is drawn from `generator` (on x's device) if given.
    Returns a detached tensor shaped like x. Raises ValueError for a bad argument or a pixel outside [0, 1].
    """
    _check_attack_args(x, y, eps, alpha, steps, norm, random_start, restarts, generator)
    check_pixel_range(x, "pgd")
    return _pgd(model, x, y, eps, alpha, steps, norm, random_start, restarts, generator)


def _pgd(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float, steps: int,
         norm: str, random_start: bool, restarts: int, generator: torch.Generator | None) -> torch.Tensor:
    """`pgd` without its checks: the training path's (no host sync, so it can be captured; x in [0, 1])."""
    x = x.detach()
    if steps == 0 or eps == 0:
        return x
    # enable_grad: the attack needs input gradients even when the caller evaluates under torch.no_grad().
    with torch.enable_grad():
        best = _pgd_from(model, x, y, _random_start(x, eps, norm, generator) if random_start else x,
                         eps, alpha, steps, norm)
        if restarts == 1:
            return best
        with torch.no_grad():
            best_loss = _per_example_loss(model, best, y)
        for _ in range(restarts - 1):
            candidate = _pgd_from(model, x, y, _random_start(x, eps, norm, generator), eps, alpha, steps, norm)
            with torch.no_grad():
                loss = _per_example_loss(model, candidate, y)
            improved = (loss > best_loss).view(-1, *[1] * (x.dim() - 1))
            best = torch.where(improved, candidate, best)
            best_loss = torch.maximum(loss, best_loss)
    return best


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


@torch.no_grad()
def _correct(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(N,) bool: whether model classifies each example of x correctly, predicted batch by batch."""
    return torch.cat([model(x[i:i + batch_size]).argmax(dim=1) == y[i:i + batch_size]
                      for i in range(0, x.shape[0], batch_size)])


def clean_accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    """Fraction of x ((N, C, H, W) pixels in [0, 1], else ValueError) that model classifies correctly; x and y on
    model's device. Leaves the model mode alone."""
    _check_batch_size(batch_size)
    check_pixel_range(x, "clean_accuracy")
    return _correct(model, x, y, batch_size).float().mean().item()


@torch.no_grad()
def robust_mask(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float, steps: int,
                norm: str = "linf", restarts: int = 1, batch_size: int = 500,
                generator: torch.Generator | None = None,
                on_batch: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """(N,) bool: which examples of x stay correctly classified at every iterate of every PGD restart.

    The standard rule of AutoAttack (Croce & Hein, ICML 2020): an example is broken if it is misclassified clean
    or at ANY point the attack evaluates, i.e. the random start and every iterate of any of the `restarts`
    randomly started PGD runs, not just the last iterate of each. Each restart attacks only the examples still
    robust, so more restarts never raise the accuracy. Restarts form the outer loop, batches the inner one: the
    first restart then draws the same random starts whatever `restarts` is, so with a fixed generator seed
    restarts=R is never above restarts=1. The iterates are exactly those of `pgd` (same random numbers), whose
    output (the last iterate) training uses unchanged. `on_batch(done, total)` is called after each batch with
    the examples attacked so far and the most there can be (N x restarts).
    x ((N, C, H, W) pixels in [0, 1], else ValueError) and y on model's device. Leaves the model mode alone.
    """
    _check_batch_size(batch_size)
    _check_attack_args(x, y, eps, alpha, steps, norm, True, restarts, generator)
    check_pixel_range(x, "robust_mask")
    return _robust_mask(model, x, y, eps, alpha, steps, norm, restarts, batch_size, generator, on_batch)


@torch.no_grad()
def _robust_mask(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float, steps: int,
                 norm: str, restarts: int, batch_size: int, generator: torch.Generator | None,
                 on_batch: Callable[[int, int], None] | None) -> torch.Tensor:
    robust = _correct(model, x, y, batch_size)
    done, total = 0, x.shape[0] * restarts
    if steps == 0 or eps == 0:
        return robust
    for _ in range(restarts):
        still_robust = robust.nonzero().squeeze(1)
        for i in range(0, still_robust.numel(), batch_size):
            index = still_robust[i:i + batch_size]
            xb, yb = x[index], y[index]
            ever_wrong = torch.zeros_like(yb, dtype=torch.bool)
            with torch.enable_grad():
                x_adv = _pgd_from(model, xb, yb, _random_start(xb, eps, norm, generator), eps, alpha, steps, norm,
                                  ever_wrong)
            robust[index] = ~ever_wrong & (model(x_adv).argmax(dim=1) == yb)
            done += len(index)
            if on_batch is not None:
                on_batch(done, total)
    return robust


def robust_accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float,
                    steps: int, norm: str = "linf", restarts: int = 1, batch_size: int = 500,
                    generator: torch.Generator | None = None) -> float:
    """Fraction of x that `robust_mask` leaves robust: correctly classified at every iterate of every restart."""
    _check_batch_size(batch_size)
    _check_attack_args(x, y, eps, alpha, steps, norm, True, restarts, generator)
    check_pixel_range(x, "robust_accuracy")
    return _robust_mask(model, x, y, eps, alpha, steps, norm, restarts, batch_size, generator,
                        None).float().mean().item()
