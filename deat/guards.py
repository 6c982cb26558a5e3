"""Catastrophic overfitting caught while it happens: the rule shared by training (a WARNING line, the epoch recorded,
optionally an early stop) and by the report (a flag at any epoch of a finished run's curve). Torch-free.

Catastrophic overfitting (Wong, Rice & Kolter, ICLR 2020, "Fast is better than free", §5; Andriushchenko &
Flammarion, NeurIPS 2020, "Understanding and Improving Fast Adversarial Training", §3) is a sudden collapse of
robust accuracy under a multi-step attack, within an epoch or two, while the single-step training attack is still
resisted. Wong et al.'s early stopping attacks a fixed training batch with PGD after every epoch and stops when its
robust accuracy falls by more than 0.2 from the previous epoch's (locuslab/fast_adversarial, CIFAR-10 code; 0.1
in their MNIST code).

The rule here: epoch e collapsed when its PGD accuracy on held-out training images (the validation split, attacked
in BatchNorm eval mode like every per-epoch evaluation) is more than `drop` below the best of the epochs before
it; `drop` defaults to Wong et al.'s 0.2 (20 points). Measured from the best so far rather than the previous epoch,
a fall spread over two epochs is caught too. 20 points is more than ten binomial standard deviations of a
500-image validation accuracy, so seed noise does not trigger it. Each excursion below the line is one collapse,
reported at its first epoch, with the epoch the accuracy came back (if it did).
"""

from __future__ import annotations

from typing import Any

DEFAULT_DROP = 0.2  # Wong et al. 2020's early-stopping threshold (CIFAR-10), in accuracy units


def is_collapse(accuracy: float | None, best_before: float | None, drop: float = DEFAULT_DROP) -> bool:
    """Whether one epoch's robust accuracy is more than `drop` below the best of the epochs before it."""
    return accuracy is not None and best_before is not None and accuracy < best_before - drop


def collapses(accuracies: list[float | None], drop: float = DEFAULT_DROP) -> list[dict[str, Any]]:
    """Every collapse in a per-epoch robust-accuracy curve (index 0 = epoch 1), oldest first.

    Each is {"epoch": first epoch below best − drop, "accuracy": its accuracy, "best_before": the best before it,
    "best_epoch": where that best was, "lowest": the lowest accuracy of the excursion, "recovered_epoch": the first
    later epoch back at or above best − drop, or None}. None values (no validation split) are skipped.
    """
    found: list[dict[str, Any]] = []
    best, best_epoch, current = None, None, None
    for epoch, acc in enumerate(accuracies, 1):
        if acc is None:
            continue
        if current is not None:
            if acc >= current["best_before"] - drop:
                current["recovered_epoch"] = epoch
                current = None
            else:
                current["lowest"] = min(current["lowest"], acc)
        elif is_collapse(acc, best, drop):
            current = {"epoch": epoch, "accuracy": acc, "best_before": best, "best_epoch": best_epoch,
                       "lowest": acc, "recovered_epoch": None}
            found.append(current)
        if best is None or acc > best:
            best, best_epoch = acc, epoch
    return found
