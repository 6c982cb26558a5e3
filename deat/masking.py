"""Signatures of gradient masking (or of an unreliable evaluation) in one checkpoint's evaluation result.

`masking_flags` lists every signature found, `zero_gradient_mask` finds the examples a gradient attack cannot move,
and `sanity_warnings` the AutoAttack accuracies above a PGD accuracy on the same examples. Thresholds and their
sources are in `masking_flags`'s docstring.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .autoattack_runner import AUTOATTACK_NAMES, aa_label

# Gradient-masking thresholds (see masking_flags).
CE_VS_OTHERS_GAP = 0.10  # Croce & Hein 2020: AutoAttack's margin/targeted attacks often lowered reported robust
#                          accuracy "by more than 10%", the mark of a broken, CE-only evaluation
SQUARE_GAIN = 0.002  # pyautoattack checks.check_square_sr: a black-box attack gaining 0.2 points is suspicious


def sanity_warnings(label: str, entry: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    """Messages for every PGD accuracy that AutoAttack's exceeds on the same examples (none if AA was off)."""
    if entry["aa_acc"] is None:
        return []
    pgd_name = f"PGD-{settings['pgd_steps']}x{settings['pgd_restarts']}"
    return [f"{label}: AutoAttack accuracy {entry['aa_acc']:.2%} > {name} accuracy {entry[key]:.2%} on the same "
            f"{settings['n_examples']} examples; AutoAttack should be the stronger attack: suspect gradient "
            f"masking, a randomized model or an attack bug"
            for key, name in (("pgd10_acc", "PGD-10"), ("pgd_acc", pgd_name)) if entry["aa_acc"] > entry[key]]


# --------------------------------------------------------------------------------------- gradient masking

def zero_gradient_mask(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(N,) bool: examples whose cross-entropy gradient w.r.t. the input is exactly zero.

    A gradient attack cannot move such a point (pyautoattack's checks.check_zero_gradients warns on any).
    Saturated softmax does this: logits scaled by 1e4 keep every prediction but make p_y == 1.0 in fp32.
    """
    zero = [torch.zeros(0, dtype=torch.bool, device=x.device)]  # no examples: no zero gradients
    for i in range(0, len(y), batch_size):
        xb = x[i:i + batch_size].detach().clone().requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(model(xb).float(), y[i:i + batch_size], reduction="sum")
            (grad,) = torch.autograd.grad(loss, xb)
        zero.append(grad.flatten(1).abs().sum(dim=1) == 0)
    return torch.cat(zero)


def masking_flags(entry: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    """One line per signature of gradient masking (or of an unreliable evaluation) found in a checkpoint's result.

    Signatures and thresholds (AutoAttack: Croce & Hein, ICML 2020, and pyautoattack's checks.py; Carlini et
    al., "On Evaluating Adversarial Robustness", 2019, §4-5; RobustBench's guidance follows them):
    1. Zero input gradients: any correctly classified example whose cross-entropy gradient is exactly 0
       (checks.check_zero_gradients flags any). Reads entry["masking_checks"]["zero_gradient_examples"].
    2. Cross-entropy attacks far weaker than the margin/targeted ones: the examples that survive every CE-based
       attack (PGD-10, PGD-k×R, APGD-CE; entry["masking_checks"]["ce_worst_case_acc"]) exceed those that
       survive every attack (worst_case_acc, which adds APGD-T, FAB-T, Square) by more than CE_VS_OTHERS_GAP =
       10 points of the examples: the size of the drops by which Croce & Hein found CE-based evaluations "often"
       overstated robustness. Comparing per-example worst cases, not single accuracies, keeps CE attacks that
       break different examples from looking weak.
    3. Square, a black-box attack, breaks more than SQUARE_GAIN = 0.2 % of the examples after the white-box
       attacks (checks.check_square_sr's alpha = 0.002).
    4. AutoAttack leaves more examples robust than PGD-10 or PGD-k×R on the same examples (stronger attack,
       weaker result; any amount).
    5. More steps and restarts do not help: with k >= 10, PGD-k×R leaves more examples robust than PGD-10 (any
       amount). With the default step sizes PGD-k's first restart replays PGD-10's iterates and goes on, so
       this cannot happen by chance.
    Not checked here: robust accuracy not falling as ε grows needs several evaluations (one per ε).
    """
    flags = []
    n, pgd_name = settings["n_examples"], f"PGD-{settings['pgd_steps']}x{settings['pgd_restarts']}"
    checks = entry.get("masking_checks") or {}
    zero, correct = checks.get("zero_gradient_examples"), round(entry["clean_acc"] * n)
    if zero:
        flags.append(f"zero input gradient of the cross-entropy at {zero} of {correct} correctly classified "
                     f"examples: gradient attacks cannot move them (pyautoattack check_zero_gradients)")
    autoattack = entry.get("autoattack") or {}
    others = [AUTOATTACK_NAMES[a] for a in autoattack if a != "apgd-ce"]
    ce_worst, worst = checks.get("ce_worst_case_acc"), entry.get("worst_case_acc")
    if others and ce_worst is not None and worst is not None and ce_worst - worst > CE_VS_OTHERS_GAP:
        ce_names = ["PGD-10", f"PGD-{settings['pgd_steps']}x{settings['pgd_restarts']}"] + \
            (["APGD-CE"] if "apgd-ce" in autoattack else [])
        flags.append(f"cross-entropy attacks leave far more examples robust than margin/targeted ones: "
                     f"{ce_worst:.2%} survive {' + '.join(ce_names)}, {worst:.2%} also survive "
                     f"{' + '.join(others)} (gap above {CE_VS_OTHERS_GAP:.0%})")
    if "square" in autoattack:
        ran = list(autoattack)
        before = entry["clean_acc"] if ran.index("square") == 0 else autoattack[ran[ran.index("square") - 1]]["acc"]
        if before - autoattack["square"]["acc"] > SQUARE_GAIN:
            gain = before - autoattack["square"]["acc"]
            flags.append(f"the black-box Square attack lowered accuracy by {gain:.2%} after the white-box attacks "
                         f"(above {SQUARE_GAIN:.1%}, pyautoattack check_square_sr)")
    if entry.get("aa_acc") is not None:
        for name, acc in (("PGD-10", entry["pgd10_acc"]), (pgd_name, entry["pgd_acc"])):
            if entry["aa_acc"] > acc:
                flags.append(f"{aa_label(list(autoattack)) or 'AutoAttack'} {entry['aa_acc']:.2%} above {name} "
                             f"{acc:.2%} on the same examples")
    if settings["pgd_steps"] >= settings["pgd10_steps"] and entry["pgd_acc"] > entry["pgd10_acc"]:
        flags.append(f"more steps and restarts did not help: {pgd_name} {entry['pgd_acc']:.2%} above PGD-10 "
                     f"{entry['pgd10_acc']:.2%}")
    return flags
