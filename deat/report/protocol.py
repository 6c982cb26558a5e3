"""A study's protocol, written once per study to ``protocol.md`` and linked from every table: the manifest's
protocol (whatever keys it has), the optimizers, where the runs ran and how many test examples were evaluated."""

from __future__ import annotations

import math

import pandas as pd

from .loading import label_of, methods_of, objective_and_outer_step, render_value

PROTOCOL_FILE = "protocol.md"
# deat.config's default piecewise milestones, as fractions of the epochs (TrainConfig.milestones: null).
DEFAULT_MILESTONE_FRACTIONS = ((100, 110), (105, 110))


def _flatten(mapping: dict, prefix: str = "") -> list[tuple[str, object]]:
    items = []
    for key, value in mapping.items():
        if isinstance(value, dict):
            items += _flatten(value, f"{prefix}{key}.")
        else:
            items.append((f"{prefix}{key}", value))
    return items


def milestones_text(milestones: list[float], epochs: int | None) -> str:
    """Milestones as the user meant them: the default "100/110 and 105/110 of the epochs (3.64, 3.82)" when the
    resolved numbers are those fractions of ``epochs``, else the epochs rounded to 2 decimals."""
    rounded = ", ".join(f"{m:.4g}" if m == int(m) else f"{m:.2f}" for m in milestones)
    defaults = [epochs * a / b for a, b in DEFAULT_MILESTONE_FRACTIONS] if epochs else []
    if len(milestones) == len(defaults) and all(math.isclose(m, d, rel_tol=1e-9) for m, d in zip(milestones, defaults)):
        fractions = " and ".join(f"{a}/{b}" for a, b in DEFAULT_MILESTONE_FRACTIONS)
        return f"{fractions} of the epochs (epoch {rounded})"
    return f"epoch {rounded}"


def _setting_text(key: str, value, protocol: dict) -> str:
    if key == "milestones" and isinstance(value, list) and value:
        return milestones_text(value, protocol.get("epochs"))
    return render_value(value)


def _deat_decay_words(decoupled) -> str:
    """DEAT's kind of weight decay for the optimizers line: a study sets it (a bool) or sweeps it (a list)."""
    kinds = {True: "decoupled weight decay (θ ← θ·(1 − α·wd), PNM's default)",
             False: "coupled weight decay (g ← g + wd·θ, as SGD's)"}
    if isinstance(decoupled, bool):
        return ", " + kinds[decoupled]
    if isinstance(decoupled, list) and decoupled and all(isinstance(value, bool) for value in decoupled):
        return ", weight decay swept: " + " and ".join(kinds[value] for value in dict.fromkeys(decoupled)) + \
            " (each run's variant says which)"
    return ""


def protocol_markdown(manifest: dict, runs: pd.DataFrame) -> str:
    """protocol.md of a study: what every table of the study states about how its numbers were made."""
    protocol = manifest.get("protocol", {})
    description = manifest.get("description", "").strip()
    lines = [f"# Protocol of study {manifest['study']}", ""]
    if description:
        lines += [description, ""]
    # Every method with SGD-momentum's outer step ("pgd_at", "trades", ...) and every one with DEAT's ("deat",
    # "trades_deat", ...), named together: "PGD-AT, TRADES: SGD, momentum 0.9".
    methods = methods_of(runs)
    sgd = ", ".join(label_of(runs, m) for m in methods if objective_and_outer_step(m)[1] == "sgd")
    deat = ", ".join(label_of(runs, m) for m in methods if objective_and_outer_step(m)[1] == "deat")
    optimizers = []
    if "pgd_at_momentum" in protocol and sgd:
        momentum = protocol["pgd_at_momentum"]
        optimizers.append(f"{sgd}: plain SGD (Algorithm 1)" if momentum == 0 else f"{sgd}: SGD, momentum {momentum:g}")
    if ("k1" in protocol or "k2" in protocol) and deat:
        decay = _deat_decay_words(protocol.get("decoupled_weight_decay"))
        optimizers.append(f"{deat}: Algorithm 2, k1={render_value(protocol.get('k1'))}, "
                          f"k2={render_value(protocol.get('k2'))}{decay}")
    if optimizers:
        lines += ["Optimizers: " + "; ".join(optimizers) + ".", ""]
    if protocol.get("pgd_steps") == 0:
        lines += ["Training without an attack (pgd_steps 0): the methods are the optimizers alone, and the "
                  "question is clean accuracy.", ""]
    if protocol:
        lines += ["| setting | value |", "|:--|:--|"]
        lines += [f"| {key} | {_setting_text(key, value, protocol)} |".replace("\n", " ")
                  for key, value in _flatten(protocol)]
        lines.append("")
    devices = runs.device_name.dropna().value_counts() if "device_name" in runs else pd.Series(dtype=int)
    if len(devices):
        torch_versions = ", ".join(sorted(runs.torch.dropna().unique()))
        lines += ["Ran on: " + ", ".join(f"{name} ({count} runs)" for name, count in devices.items())
                  + f"; torch {torch_versions}.", ""]
    examples = sorted(runs.eval_n_examples.dropna().astype(int).unique()) if "eval_n_examples" in runs else []
    if examples:
        lines += ["Test examples evaluated (eval.json): " + ", ".join(map(str, examples)) + ".", ""]
    seeds = runs.groupby(["arch", "method", "variant", "lr", "batch_size"]).seed.nunique().max() if len(runs) else 0
    spread = ("mean ± sample sd (ddof = 1) over seeds" if seeds and seeds >= 2
              else "one seed per grid point, so no spread over seeds")
    lines += [f"Accuracies in percent, {spread}; α = learning rate, b = batch size; Δ in percentage points.", ""]
    return "\n".join(lines)
