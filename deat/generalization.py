"""The robust generalization gap measured alike on both sides, and the flatness of the robust loss, for one checkpoint.

Training's "train robust accuracy" is a running average over an epoch under the training attack, in train mode,
while the weights move: not comparable with a test accuracy. Here the same model, the same attack (PGD-10 with one
random start, step 2.5·ε/10, every iterate counted as in attack_suite.ROBUST_RULE) and BatchNorm in eval mode are
applied to `train_examples` images of the run's own training split (never the validation split) and to the
evaluation's test subset, so that

    robust_gap_pgd10 = train_pgd10_acc − pgd10_acc

is a difference of two accuracies measured alike. With `flatness` the curves of deat.flatness are added, on the
same training images (the first FLATNESS_EXAMPLES of them; the robust loss: cross-entropy at PGD-10 examples crafted against each perturbed model, with
the same random starts at every perturbation, so that the curve's differences are not attack noise).

Training images: the first `train_examples` of a seeded permutation of the training split, sorted (the rule
evaluate.select_examples applies to the test set), seed = the evaluation's example seed.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .attacks import pgd, robust_mask
from .flatness import GAMMAS, flatness_curves

# What this adds to a checkpoint's entry in eval.json (absent unless the evaluation asks for train_examples).
KEYS = ("train_examples", "train_clean_acc", "train_pgd10_acc", "robust_gap_pgd10", "flatness",
        "generalization_wall_time_s")
DIRECTIONS = 3  # random directions per γ (Li et al. average a few; the AWP paper plots one)
# The flatness curves attack the first FLATNESS_EXAMPLES of the training images (each curve point is a PGD-10 run
# over them: 5 sizes × (3 random directions + the worst case)), the gap all of them.
FLATNESS_EXAMPLES = 256


def training_subset(n_train: int, n: int, seed: int) -> torch.Tensor:
    """Sorted indices of `n` training images: the first n of torch.randperm(n_train) seeded with `seed`."""
    if not 1 <= n <= n_train:
        raise ValueError(f"train_examples={n} is invalid; expected 1 to {n_train} (the run's training split)")
    return torch.randperm(n_train, generator=torch.Generator().manual_seed(seed))[:n].sort().values


def generalization_entry(model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: dict[str, Any],
                         test_pgd10_acc: float, with_flatness: bool) -> dict[str, Any]:
    """KEYS for one checkpoint from (N, C, H, W) training images in [0, 1] and their (N,) labels.

    `settings` are the evaluation's (eps, norm, pgd10_step_size, attack_seed, batch_size); `test_pgd10_acc` is the
    same checkpoint's PGD-10 accuracy on the test subset. The model's weights are left as they were.
    """
    eps, norm, step, seed = settings["eps"], settings["norm"], settings["pgd10_step_size"], settings["attack_seed"]
    batch_size = settings["batch_size"]
    with torch.no_grad():
        correct = torch.cat([model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]
                             for i in range(0, len(y), batch_size)])
    generator = torch.Generator(device=x.device).manual_seed(seed)
    robust = robust_mask(model, x, y, eps, step, settings["pgd10_steps"], norm, batch_size=batch_size,
                         generator=generator)
    entry = {"train_examples": len(y), "train_clean_acc": correct.float().mean().item(),
             "train_pgd10_acc": robust.float().mean().item()}
    entry["robust_gap_pgd10"] = entry["train_pgd10_acc"] - test_pgd10_acc
    entry["flatness"] = None
    if with_flatness:
        xf, yf = x[:FLATNESS_EXAMPLES], y[:FLATNESS_EXAMPLES]

        def robust_loss() -> torch.Tensor:
            start = torch.Generator(device=x.device).manual_seed(seed)  # the same starts at every perturbation
            x_adv = pgd(model, xf, yf, eps, step, settings["pgd10_steps"], norm, generator=start)
            return F.cross_entropy(model(x_adv), yf)

        entry["flatness"] = flatness_curves(model, robust_loss, GAMMAS, DIRECTIONS, seed)
        entry["flatness"]["examples"] = len(yf)
    return entry
