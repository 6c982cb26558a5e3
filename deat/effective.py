"""How far each outer step moves the weights: the effective step per unit gradient and the effective weight decay.

Pure arithmetic on config values, without torch, so that the report (which never imports torch) and the trainer
(which records both numbers in metrics.json) share one definition. Equal learning rates are not equal steps
(PAPER.md, "Open points"), and equal steps are not equal decay: a fair DEAT vs SGD-momentum comparison matches both.
"""

import math

from .config import METHODS, outer_step_of


def check_method(method: str) -> None:
    """Raises ValueError naming the known methods unless `method` is one of deat.config.METHODS."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def effective_step(method: str, lr: float, momentum: float, k1: float) -> float:
    """Steady-state distance moved per unit of a constant gradient g, i.e. θ changes by −effective_step · g.

    Equal lr is not an equal step (PAPER.md, "Open points"): SGD's undampened momentum buffer sums the
    gradients to g / (1 − momentum), so SGD steps lr / (1 − momentum) (10·lr at momentum 0.9, lr at 0); DEAT's
    dampened buffers both average to g, so (1 + k1)·h − k1·h = g and it steps lr / √((1 + k1)² + k1²)
    (lr/√5 ≈ 0.45·lr at k1 = 1). The paper compares the methods at equal lr; a matched-effective-step
    comparison needs this number.
    """
    check_method(method)
    if outer_step_of(method) == "sgd":
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        return lr / (1.0 - momentum)
    return lr / math.sqrt((1.0 + k1) ** 2 + k1 ** 2)


def effective_decay(method: str, lr: float, momentum: float, k1: float, weight_decay: float,
                    decoupled_weight_decay: bool) -> float:
    """Steady-state fraction by which weight decay alone shrinks θ per step (zero loss gradient): θ ← θ · (1 − d).

    Coupled decay (g ← g + wd · θ) is a gradient like any other, so it moves θ by effective_step · wd · θ:
    SGD (PGD-AT) shrinks by α · wd / (1 − momentum), coupled DEAT by α · wd / √((1 + k1)² + k1²). DEAT's
    decoupled decay (PNM's default, θ ← θ · (1 − α · wd) with the nominal α) shrinks by α · wd, whatever k1.
    So at equal effective step only coupled DEAT also matches SGD's decay: at wd 5e-4, SGD-momentum 0.9 at α 0.01
    and coupled DEAT at α 0.2236 both shrink by 5.0e-5 per step, decoupled DEAT at α 0.2236 by 1.118e-4. A
    first-order value: exact for decoupled DEAT; for coupled decay the buffers' lag changes it by a relative
    O(d / (1 − momentum)) (SGD) or O(d / (1 − k2)) (DEAT), below 1e-3 at these settings.

    Args: as `build_optimizer`; decoupled_weight_decay is read for DEAT's outer step only (every DEAT method),
        momentum for the SGD-momentum methods only.
    Returns: d, dimensionless, per optimizer step (multiply by the steps per epoch for a per-epoch rate).
    Raises: ValueError for an unknown method, momentum outside [0, 1) or weight_decay < 0.
    """
    check_method(method)
    if not weight_decay >= 0.0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if outer_step_of(method) == "deat" and decoupled_weight_decay:  # every DEAT method: trades_deat too
        return lr * weight_decay
    return effective_step(method, lr, momentum, k1) * weight_decay
