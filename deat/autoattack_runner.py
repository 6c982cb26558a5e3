"""AutoAttack's attacks one at a time, through the reference package pyautoattack 0.2.0 with its standard settings.

What the evaluation needs to know of AutoAttack: the attacks of version "standard" in the order it runs them, how
many classes each needs (and why), how many target classes the targeted attacks use on a K-class dataset, the name
of what ran, and `autoattack_survivors`: which examples one attack leaves correctly classified (Croce & Hein, ICML
2020).
"""

from __future__ import annotations

import torch
from torch import nn

AUTOATTACK_STANDARD = ("apgd-ce", "apgd-t", "fab-t", "square")  # the order AutoAttack runs them in
AUTOATTACK_NAMES = {"apgd-ce": "APGD-CE", "apgd-t": "APGD-T", "fab-t": "FAB-T", "square": "Square"}
# Fewest classes each attack of pyautoattack 0.2.0 can run on, and why. APGD-T's targeted DLR loss divides by
# z_max - (z_3rd + z_4th) / 2 (autopgd_base.dlr_loss_targeted; checks.check_n_classes refuses K <= 3); the others
# need only a correct class and one other: APGD-CE a cross-entropy, FAB-T and Square the margin to another class.
AUTOATTACK_MIN_CLASSES = {
    "apgd-ce": (2, "its cross-entropy needs a second class"),
    "apgd-t": (4, "its targeted DLR loss uses the 3rd and 4th largest logits"),
    "fab-t": (2, "it needs a target class"),
    "square": (2, "its margin loss needs a second class"),
}
AUTOATTACK_TARGETS = 9  # standard's target classes for APGD-T and FAB-T, meant for K >= 10
_AUTOATTACK_NORMS = {"linf": "Linf", "l2": "L2"}


# ------------------------------------------------------------------------------------- AutoAttack and classes

def autoattack_target_classes(num_classes: int) -> int:
    """Target classes of APGD-T and FAB-T on a num_classes dataset: standard's 9, or every other class if fewer."""
    return min(AUTOATTACK_TARGETS, num_classes - 1)


def attacks_not_runnable(attacks: list[str] | tuple[str, ...], num_classes: int) -> dict[str, str]:
    """{attack: one-line reason} for each of `attacks` that cannot run on a num_classes dataset (see
    AUTOATTACK_MIN_CLASSES); unknown names get a reason too. Empty when all can run."""
    reasons = {}
    for attack in attacks:
        if attack not in AUTOATTACK_MIN_CLASSES:
            allowed = ", ".join(AUTOATTACK_STANDARD)
            reasons[attack] = f"{attack} is not an AutoAttack standard attack; allowed: {allowed}"
            continue
        need, why = AUTOATTACK_MIN_CLASSES[attack]
        if num_classes < need:
            reasons[attack] = (f"{AUTOATTACK_NAMES[attack]} needs at least {need} classes ({why}); the dataset "
                               f"has {num_classes}")
    return reasons


def check_attacks(attacks: list[str] | tuple[str, ...], num_classes: int) -> list[str]:
    """Reasons, one line each, why some of `attacks` (AutoAttack attack names) cannot run on num_classes classes.

    For refusing a study before any job starts: an empty list means every attack can run. evaluate itself skips
    such attacks and records the reasons instead of failing.
    """
    return list(attacks_not_runnable(attacks, num_classes).values())


def aa_label(attacks: list[str] | tuple[str, ...]) -> str | None:
    """The name of what AutoAttack ran: "AutoAttack (standard)" for all four standard attacks in order, otherwise
    the attacks joined ("APGD-CE + APGD-T"); None when none ran."""
    if tuple(attacks) == AUTOATTACK_STANDARD:
        return "AutoAttack (standard)"
    return " + ".join(AUTOATTACK_NAMES[a] for a in attacks) or None


def autoattack_survivors(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: str, eps: float, norm: str,
                         batch_size: int, seed: int, num_classes: int | None = None) -> torch.Tensor:
    """(N,) bool: which of x are still classified correctly after one AutoAttack attack, with standard's settings.

    Runs pyautoattack's own loop (its batching, per-batch reseeding and checks) restricted to `attack`, with
    autoattack_target_classes(num_classes) target classes (num_classes defaults to the model's output width).
    Raises ValueError for an attack the class count cannot support. The attacks reseed torch's global
    generators; fork_rng restores them afterwards.
    """
    from pyautoattack import AutoAttack

    if attack not in AUTOATTACK_STANDARD:
        raise ValueError(f"attack must be one of {AUTOATTACK_STANDARD}, got {attack!r}")
    if num_classes is None:
        with torch.no_grad():
            num_classes = model(x[:1]).shape[1]
    reason = attacks_not_runnable([attack], num_classes).get(attack)
    if reason is not None:
        raise ValueError(reason)
    adversary = AutoAttack(model, eps=eps, norm=_AUTOATTACK_NORMS[norm], version="standard", seed=seed,
                           device=x.device)
    adversary.attacks_to_run = [attack]
    targets = autoattack_target_classes(num_classes)
    adversary.apgd_targeted.n_target_classes = adversary.fab.n_target_classes = targets
    cuda_devices = [x.device.index or 0] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        _, predictions = adversary.run_standard_evaluation(x, y, batch_size=batch_size)
    return predictions == y
