"""Every training option in one dataclass: its default, its help text, and its validation.

One name per option everywhere: `pgd_steps` in YAML run files, `--pgd-steps` on the command line, `pgd_steps` in
metrics.json, checkpoints and MLflow. A run file (YAML) and flags combine; flags win. Unknown keys are errors.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# A method is a training objective (with the inner attack it needs) and an outer optimizer: "<objective>" trains
# with SGD-momentum, "<objective>_deat" with DEAT's outer step. PGD-AT keeps its historical names: "pgd_at" is
# PGD-AT with SGD-momentum and "deat" PGD-AT with DEAT (the paper's method), so existing configs mean what they meant.
OBJECTIVES = ("pgd_at", "trades", "mart", "fast_at")
OUTER_STEPS = ("sgd", "deat")
_METHOD_PARTS = {"pgd_at": ("pgd_at", "sgd"), "deat": ("pgd_at", "deat"),
                 **{method: (name, step) for name in OBJECTIVES[1:]
                    for method, step in ((name, "sgd"), (f"{name}_deat", "deat"))}}
METHODS = tuple(_METHOD_PARTS)
ARCHITECTURES = ("preact_resnet18", "senet18", "vgg19", "wrn34_10", "small_cnn")
SCHEDULES = ("piecewise", "cosine", "constant")
NORMS = ("linf", "l2")
AUGMENTS = ("auto", "none", "crop", "crop_flip")
PRECISIONS = ("fp32", "bf16")
# torch.compile modes ("default" is torch's mode=None); "none" trains uncompiled.
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune-no-cudagraphs")

# Adversarial weight perturbation (Wu et al. 2020) is defined, and offered here, for these objectives only.
AWP_OBJECTIVES = ("pgd_at", "trades")

# Options that do not change what a run computes: a checkpoint written under other values still resumes.
# cudnn_benchmark picks among cuDNN algorithms for the same convolution: it changes speed, and the result only as
# much as GPU kernels' own nondeterminism does.
NON_RESULT_KEYS = ("out", "device", "data_root", "log_interval_s", "cudnn_benchmark")

def objective_of(method: str) -> str:
    """The training objective of `method`: one of OBJECTIVES ("trades_deat" -> "trades", "deat" -> "pgd_at")."""
    return _METHOD_PARTS[method][0]


def outer_step_of(method: str) -> str:
    """The outer optimizer of `method`: "sgd" (SGD-momentum) or "deat" (DEAT's two-buffer step)."""
    return _METHOD_PARTS[method][1]


def _methods_where(objectives: tuple[str, ...] = OBJECTIVES, outer_steps: tuple[str, ...] = OUTER_STEPS):
    return tuple(m for m in METHODS if objective_of(m) in objectives and outer_step_of(m) in outer_steps)


# Options that only some methods read. For any other method they are not part of the run: left out of its identity
# (the run directory's hash, the check that a checkpoint belongs to the run), its command-line flags and its MLflow
# params, so changing them in a study never touches that method's finished runs.
METHOD_OPTIONS = {
    "momentum": _methods_where(outer_steps=("sgd",)),
    "k1": _methods_where(outer_steps=("deat",)),
    "k2": _methods_where(outer_steps=("deat",)),
    "decoupled_weight_decay": _methods_where(outer_steps=("deat",)),
    # Fast AT takes one FGSM step of its own size; TRADES and MART start at x + 0.001·N(0, 1) as their references do.
    "pgd_steps": _methods_where(objectives=("pgd_at", "trades", "mart")),
    "pgd_step_size": _methods_where(objectives=("pgd_at", "trades", "mart")),
    "random_start": _methods_where(objectives=("pgd_at", "fast_at")),
    "fgsm_step_size": _methods_where(objectives=("fast_at",)),
    "beta": _methods_where(objectives=("trades", "mart")),
    "awp_gamma": _methods_where(objectives=AWP_OBJECTIVES),
}

# Options added after runs were published, with the value that computes what those runs computed: at that value
# the option is left out of the run identity, so the runs keep their directories (the hash of their identity).
LATER_OPTIONS_OFF = {"awp_gamma": 0.0, "ema_tau": 0.0, "co_early_stop": False, "probe_every": 0}


def unused_options(config: dict[str, Any]) -> tuple[str, ...]:
    """The options a run with these settings does not read (e.g. k1 for PGD-AT, momentum for DEAT)."""
    return tuple(key for key, methods in METHOD_OPTIONS.items() if config["method"] not in methods)


def run_identity(config: dict[str, Any]) -> dict[str, Any]:
    """What a run computes: every option except those that do not change the result and those its method ignores.

    Two configs with the same identity train the same model, so a checkpoint of one resumes the other. An option
    missing from `config` (a run written before the option existed) counts as its default.
    """
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    full = {**defaults, **config}
    skip = set(NON_RESULT_KEYS) | set(unused_options(full))
    skip |= {key for key, off in LATER_OPTIONS_OFF.items() if full[key] == off}
    if not full["co_early_stop"]:  # then co_drop only decides which epochs are reported as collapsed
        skip.add("co_drop")
    if not full["probe_every"]:  # probes off: their size is nothing the run computes
        skip.add("probe_batches")
    return {key: full[key] for key in defaults if key not in skip}


def _opt(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class TrainConfig:
    # --- data
    dataset: str = _opt("mnist5k", "cifar10 | cifar100 | svhn | cifar10_small (500 + 100 per class) | mnist5k "
                                   "(offline) | npz:<path>")
    data_root: str = _opt("data", "where torchvision datasets are (or are downloaded to)")
    val_size: int | None = _opt(None, "held-out training images that pick best.pt (null: min(1000, n_train // 10))")
    augment: str = _opt("auto", "auto | none | crop | crop_flip (auto: crop_flip for 32x32 colour, crop for svhn)")
    # --- model
    arch: str = _opt("small_cnn", " | ".join(ARCHITECTURES))
    width: int | None = _opt(None, "base channel width (wrn34_10: widen factor); null: the architecture's usual")
    # --- outer step
    method: str = _opt("deat", "OBJECTIVE (SGD-momentum) or OBJECTIVE_deat (DEAT's two-buffer step, Algorithm 2), "
                               "OBJECTIVE one of pgd_at, trades, mart, fast_at; PGD-AT with DEAT is plain 'deat': "
                               + " | ".join(METHODS))
    lr: float = _opt(0.1, "learning rate alpha")
    batch_size: int = _opt(128, "training batch size b")
    momentum: float = _opt(0.9, "SGD methods only: SGD momentum (0 = the paper's Algorithm 1 as printed)")
    weight_decay: float = _opt(5e-4, "weight decay")
    decoupled_weight_decay: bool = _opt(True, "DEAT methods only: theta *= 1 - lr*wd (PNM's default) instead of g += wd*theta")
    k1: float = _opt(1.0, "DEAT methods only: negative-momentum coefficient k1")
    k2: float = _opt(0.8, "DEAT methods only: buffer decay k2")
    epochs: int = _opt(110, "training epochs")
    schedule: str = _opt("piecewise", "piecewise | cosine | constant, stepped every iteration")
    milestones: list[float] | None = _opt(None, "piecewise: epochs where lr *= gamma (null: 100/110 and 105/110 of epochs)")
    gamma: float = _opt(0.1, "piecewise: lr factor at each milestone")
    # --- inner attack (training)
    eps: float | None = _opt(None, "attack radius in [0,1] pixels, '8/255' accepted (null: 0.3 for mnist5k, else 8/255)")
    norm: str = _opt("linf", "linf | l2")
    pgd_steps: int = _opt(10, "PGD steps K in training (0 = standard training); not fast_at")
    pgd_step_size: float | None = _opt(None, "PGD step size (null: 2.5 * eps / pgd_steps, i.e. 2/255 for 8/255, K=10); "
                                             "not fast_at")
    random_start: bool = _opt(True, "pgd_at and fast_at: uniform random start in the eps-ball (Algorithm 2 writes "
                                    "delta_0 = 0); TRADES and MART always start at x + 0.001*N(0, 1)")
    fgsm_step_size: float | None = _opt(None, "fast_at only: the FGSM step (null: 1.25 * eps, Wong et al. 2020)")
    beta: float = _opt(6.0, "trades and mart only: weight of the KL term (6 for CIFAR-10 in both papers)")
    awp_gamma: float = _opt(0.0, "pgd_at and trades objectives only: adversarial weight perturbation of relative "
                                 "size gamma per layer (Wu et al. 2020; 5e-3 typical; 0 = off)")
    attack_bn_eval: bool = _opt(True, "BatchNorm in eval mode while attacking (the paper's setting)")
    # --- weight averaging and the catastrophic-overfitting guard (deat/averaging.py, deat/guards.py)
    ema_tau: float = _opt(0.0, "exponential moving average of the weights with decay tau, evaluated each epoch beside "
                               "the raw model, its best and last kept as best_ema.pt / last_ema.pt (0 = off; 0.999 "
                               "typical; Gowal et al. 2020's warm-up)")
    co_drop: float = _opt(0.2, "catastrophic overfitting: warn when validation PGD accuracy falls more than this below "
                               "its best so far (Wong et al. 2020's 0.2)")
    co_early_stop: bool = _opt(False, "stop at a catastrophic-overfitting collapse and publish the epoch before it")
    # --- mechanism probes (deat/probes.py): gradient noise, diffusion (alpha/b) tr(Sigma), update noise
    probe_every: int = _opt(0, "measure gradient and update noise every this many epochs on a fixed probe set of "
                               "training images (0 = off); the run trains bit for bit as without")
    probe_batches: int = _opt(8, "probes: minibatches M of the run's batch size (>= 2); the probe set is M x batch_size "
                                 "training images")
    # --- per-epoch evaluation (the paper's per-epoch curve)
    eval_pgd_steps: int = _opt(10, "PGD steps for the per-epoch validation and test accuracy (step 2.5*eps/steps)")
    eval_examples: int | None = _opt(None, "test images evaluated each epoch (null: all); a fixed subset")
    # --- run
    seed: int = _opt(0, "seed for initialisation, batch order, augmentation and attack starts")
    device: str = _opt("auto", "auto | cpu | cuda | cuda:N (auto: cuda when available)")
    precision: str = _opt("fp32", "fp32 | bf16 (bf16 autocast, CUDA only)")
    channels_last: bool = _opt(False, "channels_last memory format (CUDA)")
    cuda_graph: bool = _opt(False, "capture the whole attack + update step in CUDA graphs (CUDA; the CPU runs eager)")
    compile: str = _opt("none", "torch.compile the model: " + " | ".join(COMPILE_MODES) + " (CUDA; the CPU runs eager)")
    cudnn_benchmark: bool = _opt(False, "let cuDNN time its convolution algorithms at the first steps and keep the "
                                        "fastest (CUDA)")
    out: str | None = _opt(None, "run directory: metrics.json, best.pt, last.pt (required for train)")
    log_interval_s: float = _opt(60.0, "seconds between in-epoch progress lines")

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "TrainConfig":
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(unknown_keys_message(source, unknown, sorted(known)))
        parsed = {name: _coerce(value, known[name].type, f"{source}: {name}") for name, value in values.items()}
        cfg = cls(**parsed)
        cfg.validate(source)
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self, source: str = "config") -> None:
        def check(ok: bool, key: str, expected: str) -> None:
            if not ok:
                raise ValueError(f"{source}: {key}={getattr(self, key)!r} is invalid; expected {expected}")

        check(self.dataset in ("cifar10", "cifar100", "svhn", "cifar10_small", "mnist5k")
              or self.dataset.startswith("npz:"),
              "dataset", "one of cifar10, cifar100, svhn, cifar10_small, mnist5k or npz:<path>")
        check(self.arch in ARCHITECTURES, "arch", f"one of {ARCHITECTURES}")
        check(self.method in METHODS, "method", f"one of {METHODS}")
        check(self.schedule in SCHEDULES, "schedule", f"one of {SCHEDULES}")
        check(self.norm in NORMS, "norm", f"one of {NORMS}")
        check(self.augment in AUGMENTS, "augment", f"one of {AUGMENTS}")
        check(self.precision in PRECISIONS, "precision", f"one of {PRECISIONS}")
        check(self.compile in COMPILE_MODES, "compile", f"one of {COMPILE_MODES}")
        check(not (self.cuda_graph and self.compile != "none"), "compile",
              "'none' when cuda_graph is true (the two are alternative ways to remove launch overhead)")
        check(re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None, "device", "auto, cpu, cuda or cuda:N")
        check(self.lr > 0, "lr", "a number > 0")
        check(self.batch_size >= 1, "batch_size", "an integer >= 1")
        check(self.epochs >= 1, "epochs", "an integer >= 1")
        check(0 <= self.momentum < 1, "momentum", "0 <= momentum < 1")
        check(self.weight_decay >= 0, "weight_decay", "a number >= 0")
        check(self.k1 >= 0, "k1", "a number >= 0")
        check(0 <= self.k2 < 1, "k2", "0 <= k2 < 1")
        check(0 < self.gamma <= 1, "gamma", "0 < gamma <= 1")
        check(self.eps is None or self.eps >= 0, "eps", "a number >= 0")
        check(self.pgd_steps >= 0, "pgd_steps", "an integer >= 0")
        check(self.pgd_step_size is None or self.pgd_step_size >= 0, "pgd_step_size", "a number >= 0")
        check(self.fgsm_step_size is None or self.fgsm_step_size >= 0, "fgsm_step_size", "a number >= 0")
        check(self.beta >= 0, "beta", "a number >= 0")
        check(self.awp_gamma >= 0, "awp_gamma", "a number >= 0")
        if self.method in METHODS:
            check(self.awp_gamma == 0 or objective_of(self.method) in AWP_OBJECTIVES, "awp_gamma",
                  f"0 for method {self.method} (AWP is offered for the objectives {AWP_OBJECTIVES} only)")
        # AWP's ascent and its perturb/restore of the weights run in Python around the step: nothing to capture.
        check(self.awp_gamma == 0 or not self.cuda_graph, "awp_gamma",
              "0 when cuda_graph is true (AWP runs eagerly; set cuda_graph false)")
        check(self.awp_gamma == 0 or self.compile == "none", "awp_gamma",
              "0 when compile is not 'none' (AWP runs eagerly; set compile none)")
        check(0 <= self.ema_tau < 1, "ema_tau", "0 <= ema_tau < 1 (0 = off)")
        check(0 < self.co_drop < 1, "co_drop", "a number in (0, 1), in accuracy units")
        check(not self.co_early_stop or self.val_size != 0, "co_early_stop",
              "false when val_size is 0 (the guard watches the validation split)")
        check(self.probe_every >= 0, "probe_every", "an integer >= 0 (0 = off)")
        check(self.probe_batches >= 2, "probe_batches", "an integer >= 2 (a covariance needs two minibatches)")
        check(self.eval_pgd_steps >= 1, "eval_pgd_steps", "an integer >= 1")
        check(self.eval_examples is None or self.eval_examples >= 1, "eval_examples", "null or an integer >= 1")
        check(self.val_size is None or self.val_size >= 0, "val_size", "null or an integer >= 0")
        check(self.width is None or self.width >= 1, "width", "null or an integer >= 1")
        check(self.log_interval_s > 0, "log_interval_s", "a number > 0")
        # Strictly increasing, as optim.build_scheduler requires: caught here, before any data is loaded.
        check(self.milestones is None or (all(a < b for a, b in zip(self.milestones, self.milestones[1:]))
                                          and all(0 < m <= self.epochs for m in self.milestones)),
              "milestones", f"strictly increasing epochs within (0, epochs={self.epochs}]")

    def resolved(self) -> "TrainConfig":
        """Fill the per-dataset defaults (eps, step sizes, milestones) so that the saved config is explicit."""
        eps = self.eps if self.eps is not None else (0.3 if self.dataset == "mnist5k" else 8 / 255)
        # Madry et al.'s rule, step = 2.5 * eps / K: 2/255 for eps 8/255 and K = 10, the paper's setting.
        step = self.pgd_step_size if self.pgd_step_size is not None else 2.5 * eps / max(self.pgd_steps, 1)
        # Wong et al. (2020): FGSM from a uniform random start with step 1.25 * eps (10/255 for eps 8/255).
        fgsm_step = self.fgsm_step_size if self.fgsm_step_size is not None else 1.25 * eps
        # The paper decays at epochs 100 and 105 of 110; shorter runs keep the same fractions.
        milestones = self.milestones if self.milestones is not None else [self.epochs * 100 / 110,
                                                                          self.epochs * 105 / 110]
        return dataclasses.replace(self, eps=eps, pgd_step_size=step, fgsm_step_size=fgsm_step,
                                   milestones=list(milestones))


def parse_number(text: str) -> float:
    """A float, or a fraction such as '8/255' (radii are usually quoted in 1/255 units)."""
    match = re.fullmatch(r"\s*([0-9.eE+-]+)\s*/\s*([0-9.eE+-]+)\s*", text)
    if match:
        denominator = float(match.group(2))
        if denominator == 0:  # a ValueError, not ZeroDivisionError: argparse and _coerce report ValueErrors
            raise ValueError(f"{text!r} divides by zero")
        return float(match.group(1)) / denominator
    return float(text)


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check/convert one value against a field's annotation, e.g. `float | None`, `list[float] | None`."""
    hint = _resolve_annotation(annotation)
    args = typing.get_args(hint)
    if value is None:
        if type(None) in args:
            return None
        raise ValueError(f"{where}: null is not allowed")
    base = next((a for a in args if a is not type(None)), hint) if args and typing.get_origin(hint) in (
        typing.Union, types.UnionType) else hint
    if typing.get_origin(base) is list:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list of numbers, got {value!r}")
        return [_coerce(v, float, where) for v in value]
    if base is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{where}: expected true or false, got {value!r}")
    if base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"{where}: expected an integer, got {value!r}")
    if base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return parse_number(value)
            except ValueError:
                pass
        raise ValueError(f"{where}: expected a number (or a fraction like 8/255), got {value!r}")
    if base is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{where}: expected a string, got {value!r}")
    raise TypeError(f"{where}: unsupported annotation {hint}")


def _resolve_annotation(annotation: Any) -> Any:
    return eval(annotation, vars(typing), {"list": list}) if isinstance(annotation, str) else annotation


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: malformed YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of option: value, got {type(data).__name__}")
    return data


def add_config_arguments(parser: argparse.ArgumentParser, config_cls: type = TrainConfig) -> None:
    """One flag per dataclass field, with its help and default; defaults are SUPPRESSed so we see what was given."""
    parser.add_argument("--config", metavar="FILE", help="YAML run file with any of the options below; flags win")
    for f in dataclasses.fields(config_cls):
        hint = _resolve_annotation(f.type)
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata['help']} (default: {f.default})"
        kwargs: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, help=help_text)
        if hint is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif "list" in str(hint):
            parser.add_argument(flag, nargs="+", type=parse_number, metavar="X", **kwargs)
        else:
            kind = str(hint)
            convert = parse_number if "float" in kind else int if "int" in kind else str
            parser.add_argument(flag, type=convert, metavar=f.name.upper(), **kwargs)


def config_from_args(args: argparse.Namespace, config_cls: type = TrainConfig):
    values = load_yaml(args.config) if getattr(args, "config", None) else {}
    source = args.config if getattr(args, "config", None) else "command line"
    names = {f.name for f in dataclasses.fields(config_cls)}
    values.update({k: v for k, v in vars(args).items() if k in names})
    return config_cls.from_dict(values, source=source)


# ------------------------------------------------------------------------------------ messages and identity

# The axes of a workflow study's grid: the run directory names them; every other setting that changes the result is
# in its settings hash (see settings_hash).
GRID_AXES = ("arch", "method", "lr", "batch_size", "seed")


def settings_hash(config: dict[str, Any]) -> str:
    """The `<settings-hash>` of a run directory (results/runs/<dataset>/<arch>/<method>/<hash>/lr.._bs.._seed..):
    8 hex digits of the sha256 of the run's identity (run_identity) less the grid axes, as canonical JSON.

    One definition for the workflow's paths and MLflow's run names, so a name shows the directory it stands for."""
    settings = {k: v for k, v in run_identity(config).items() if k not in GRID_AXES}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]


def did_you_mean(word: str, choices: typing.Iterable[str]) -> str:
    """" (did you mean 'batch_sizes'?)" for a near miss among `choices` (difflib's ratio >= 0.6), else ""."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def unknown_keys_message(source: str, unknown: typing.Iterable[str], allowed: typing.Iterable[str]) -> str:
    """One line: "<source>: unknown key 'epoch' (did you mean 'epochs'?); allowed: a, b, c"."""
    allowed = list(allowed)
    unknown = sorted(unknown)
    keys = ", ".join(f"{key!r}{did_you_mean(key, allowed)}" for key in unknown)
    return f"{source}: unknown key{'s' if len(unknown) > 1 else ''} {keys}; allowed: {', '.join(allowed)}"


def config_schema_errors(config: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    """Every violation of the workflow's JSON schema (workflow/schemas/config.schema.yaml) in `config`, one short
    line each: where (studies.mine.lrs[0]), what was found, what was expected, and a did-you-mean for a mistyped
    key or value. [] when `config` is valid. jsonschema's own report (the whole sub-schema) is not shown."""
    import jsonschema

    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: [str(p) for p in e.absolute_path])
    lines: list[str] = []
    for error in errors:
        for line in _describe_schema_error(error):
            if line not in lines:
                lines.append(line)
    return lines


def _where(path: typing.Iterable[Any]) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "the config"


def _describe_schema_error(error: Any) -> list[str]:
    where, schema, instance = _where(error.absolute_path), error.schema, error.instance
    if error.validator == "additionalProperties" and schema.get("additionalProperties") is False:
        allowed = list(schema.get("properties", {}))
        options = {f.name for f in dataclasses.fields(TrainConfig)} if "train" in allowed else set()
        return [f"{_where([*error.absolute_path, key])}: unknown key"
                + (did_you_mean(key, allowed) or (" (a `python -m deat train` option: put it under train:)"
                                                  if key in options else ""))
                + f"; allowed here: {', '.join(allowed)}" for key in sorted(set(instance) - set(allowed))]
    if error.validator == "required":
        missing = error.message.split("'")[1] if error.message.count("'") >= 2 else error.message
        unknown = set(instance) - set(schema.get("properties", {}))
        if any(did_you_mean(key, [missing]) for key in unknown):
            return []  # the mistyped key's line already says "did you mean" this one
        return [f"{where}: missing key {missing!r} (required: {', '.join(schema['required'])})"]
    if error.validator == "enum":
        return [f"{where}: {instance!r} is not allowed{did_you_mean(instance, schema['enum'])}; expected one of "
                f"{', '.join(map(str, schema['enum']))}"]
    if error.validator == "pattern" and "description" in schema:
        choices = [c.strip() for c in schema["description"].split("|")]
        return [f"{where}: {instance!r} is not allowed{did_you_mean(instance, choices)}; expected "
                f"{schema['description']}"]
    return [f"{where}: {error.message}"]
