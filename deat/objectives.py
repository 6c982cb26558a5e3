"""The training objectives of adversarial training, each with its inner attack, and the training step of all of them.

A method (deat.config) is an objective plus an outer optimizer; this module is the objective half, imported by the
training loop (deat/train.py) and by the fast GPU path (deat/fast.py). x, x' are (B, C, H, W) images in [0, 1], y
(B,) class indices, f the model's logits, p = softmax(f); ε, α (`eps`, `pgd_step_size`, `fgsm_step_size`) are in
pixel units; losses are averaged over the batch. KL(p‖q) = Σ_k p_k (log p_k − log q_k), per example.

- PGD-AT (Madry et al., ICLR 2018, eq. 2.1): min_θ E[max_{‖δ‖≤ε} CE(f(x + δ), y)]; the inner max is PGD-K
  (`pgd_steps`, step `pgd_step_size`, default 2.5·ε/K) from a uniform random start (`random_start`).
- TRADES (Zhang et al., ICML 2019, eq. 5): CE(f(x), y) + β · KL(p(x) ‖ p(x')), x' maximising that KL inside the
  ε-ball by PGD-K from x + 0.001·N(0, 1) (a start at x has zero KL gradient). β = 6 for CIFAR-10 (`beta`).
- MART (Wang et al., ICLR 2020, eq. 6): BCE(p(x'), y) + β · KL(p(x) ‖ p(x')) · (1 − p_y(x)), with the boosted
  cross-entropy BCE = CE(f(x'), y) − log(1 − max_{k≠y} p_k(x')), x' by PGD-K on CE from x + 0.001·N(0, 1); β = 6.
- Fast AT (Wong et al., ICLR 2020, Algorithm 3): CE(f(x'), y), x' one FGSM step of `fgsm_step_size` (default
  1.25·ε) from a uniform random start in the ε-ball, projected back onto it and onto [0, 1].
- AWP (Wu et al., NeurIPS 2020, eq. 8-10), `awp_gamma` > 0, on PGD-AT and TRADES: before the outer step each conv /
  linear weight w_l is moved by v_l = γ · ‖w_l‖ · g_l / ‖g_l‖, g_l the gradient of the objective's loss at the
  adversarial examples (one normalised ascent step per layer); the gradient of the outer step is taken at w + v,
  the optimizer updates, then v is subtracted again.

Checked against the authors' reference implementations (yaodongyu/TRADES, YisenWang/MART, locuslab/fast_adversarial,
csdongxian/AWP) where the papers leave a choice open:
- TRADES: the attack maximises the summed KL; the training KL is summed over classes and averaged over the batch
  (KLDivLoss(sum) / batch size); its gradient flows through both p(x) and p(x'). Here the clean forward pass runs
  once per step (the reference runs it twice in train mode, which gives the same logits).
- MART: the reference's numerical guards are kept, as they change the value: −log(1.0001 − max_{k≠y} p_k) and the
  weight (1.0000001 − p_y(x)); the weight is not detached. Its log(p + 1e-12) inside the KL is log_softmax here.
- AWP: the reference finds v on a copy of the model (one SGD step of the negated loss, train-mode BatchNorm) so the
  model's BatchNorm running statistics see each batch once; here the ascent forward runs on copies of the buffers
  (torch.func.functional_call) for the same effect. Only weights with more than one dimension are perturbed (not
  BatchNorm scales or biases); ‖g_l‖ is floored at 1e-20 as in the reference. v is removed after the optimizer step
  (the reference's order), so weight decay of that step acts on w + v. The reference's optional AWP warm-up
  epochs are not offered: AWP acts from the first step.
- All attacks run with BatchNorm in eval mode when `attack_bn_eval` (the TRADES and MART references do; PGD-AT's
  paper setting); Wong et al.'s fast AT attacks in train mode (`attack_bn_eval: false` reproduces that).

The forward step (`adversarial_forward`) has no .item() and no host sync, so fast.py can capture it in a CUDA graph
for every objective; AWP's perturb / restore runs eagerly (config validation refuses it with cuda_graph / compile).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch.func import functional_call

from .attacks import _ascent_direction, _check_attack_args, _pgd, _project, check_pixel_range
from .config import TrainConfig, objective_of

Forward = Callable[[torch.Tensor], torch.Tensor]

TRADES_START_STD = 0.001  # σ of the Gaussian start of the TRADES and MART attacks (both references)
MART_BCE_GUARD = 1e-4  # −log(1 + 1e-4 − max_{k≠y} p_k): the MART reference's guard against log 0
MART_WEIGHT_GUARD = 1e-7  # weight (1 + 1e-7 − p_y(x)): the MART reference's guard
AWP_NORM_FLOOR = 1e-20  # ‖g_l‖ + 1e-20 in the AWP reference: a layer with zero gradient is not moved


def autocast(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast when `cfg.precision` asks for it on CUDA; a no-op elsewhere (the CPU keeps fp32)."""
    if cfg.precision == "bf16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def attacks_in_training(cfg: TrainConfig) -> bool:
    """Whether training sees adversarial examples (False: standard training, K = 0, for the PGD-style objectives)."""
    return objective_of(cfg.method) == "fast_at" or cfg.pgd_steps > 0


# ------------------------------------------------------------------------------------------ losses on logits

def kl_per_example(clean_logits: torch.Tensor, adv_logits: torch.Tensor) -> torch.Tensor:
    """(B,) KL(p(x) ‖ p(x')) = Σ_k p_k(x) (log p_k(x) − log p_k(x')) from (B, K) logits, in float32."""
    log_p = F.log_softmax(clean_logits.float(), dim=1)
    log_q = F.log_softmax(adv_logits.float(), dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1)


def trades_loss(clean_logits: torch.Tensor, adv_logits: torch.Tensor, y: torch.Tensor, beta: float) -> torch.Tensor:
    """TRADES' training loss (Zhang et al. 2019, eq. 5): mean CE(f(x), y) + β · mean KL(p(x) ‖ p(x')). Scalar."""
    return F.cross_entropy(clean_logits.float(), y) + beta * kl_per_example(clean_logits, adv_logits).mean()


def boosted_cross_entropy(adv_logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B,) MART's BCE (Wang et al. 2020, eq. 5): CE(f(x'), y) − log(1 + 1e-4 − max_{k≠y} p_k(x'))."""
    logits = adv_logits.float()
    probs = F.softmax(logits, dim=1)
    # The most likely wrong class: the top class unless it is y, then the second (the reference's rule).
    top2 = probs.topk(2, dim=1).indices
    wrong = torch.where(top2[:, 0] == y, top2[:, 1], top2[:, 0])
    p_wrong = probs.gather(1, wrong[:, None]).squeeze(1)
    return F.cross_entropy(logits, y, reduction="none") - torch.log(1 + MART_BCE_GUARD - p_wrong)


def mart_loss(clean_logits: torch.Tensor, adv_logits: torch.Tensor, y: torch.Tensor, beta: float) -> torch.Tensor:
    """MART's training loss (Wang et al. 2020, eq. 6): mean BCE + β · mean[KL(p(x) ‖ p(x')) · (1 − p_y(x))]. Scalar.

    The weight 1 − p_y(x) (with the reference's 1e-7 guard) stresses misclassified clean examples; not detached.
    """
    p_true = F.softmax(clean_logits.float(), dim=1).gather(1, y[:, None]).squeeze(1)
    weighted_kl = kl_per_example(clean_logits, adv_logits) * (1 + MART_WEIGHT_GUARD - p_true)
    return boosted_cross_entropy(adv_logits, y).mean() + beta * weighted_kl.mean()


# ------------------------------------------------------------------------------------------ inner attacks

def _ascend(objective: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, start: torch.Tensor, eps: float,
            alpha: float, steps: int, norm: str) -> torch.Tensor:
    """`steps` projected steepest-ascent steps of the summed `objective(x')` from `start`, as attacks.pgd takes them."""
    x_adv = start
    for _ in range(steps):
        x_adv = x_adv.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(objective(x_adv), x_adv)
        delta = _project(x_adv.detach() - x + alpha * _ascent_direction(grad, norm), eps, norm)
        x_adv = (x + delta).clamp(0, 1)
    return x_adv.detach()


def _gaussian_start(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x + TRADES_START_STD * noise


@contextlib.contextmanager
def full_precision(device: torch.device) -> Iterator[None]:
    """IEEE float32 inside: autocast off for `device.type` and, on CUDA, TF32 off for cuDNN convolutions and
    cuBLAS matmuls (TF32 keeps 11 significant bits, bf16 8). The flags are restored on exit.

    Host-side switches only (no sync): a CUDA graph captured inside records the fp32 kernels, so the replayed
    step computes what the eager step computes. docs/method.md ("Precision of the attacks") gives the rule.
    """
    with torch.autocast(device.type, enabled=False):
        if device.type != "cuda":
            yield
            return
        cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
        try:  # the legacy flags, unless the process has set the per-operator ones (then the legacy getter raises)
            saved, legacy = (cudnn.allow_tf32, matmul.allow_tf32), True
        except RuntimeError:
            saved, legacy = (cudnn.conv.fp32_precision, matmul.fp32_precision), False
        if legacy:
            cudnn.allow_tf32 = matmul.allow_tf32 = False
        else:
            cudnn.conv.fp32_precision = matmul.fp32_precision = "ieee"
        try:
            yield
        finally:
            if legacy:
                cudnn.allow_tf32, matmul.allow_tf32 = saved
            else:
                cudnn.conv.fp32_precision, matmul.fp32_precision = saved


def _trades_attack(model: torch.nn.Module, x: torch.Tensor, eps: float, alpha: float, steps: int, norm: str,
                   generator: torch.Generator | None) -> torch.Tensor:
    """`trades_attack` without its checks (the training path's: no host sync, so deat.fast can capture it)."""
    x = x.detach()
    if steps == 0 or eps == 0:
        return x
    with torch.enable_grad():
        # The clean logits in fp32 whatever the caller's autocast: the KL's gradient near x is proportional to
        # f(x') − f(x), a logit change far below bf16's (and TF32's) rounding of the logits.
        with full_precision(x.device):
            with torch.no_grad():
                clean_logits = model(x).float()

        def objective(x_adv: torch.Tensor) -> torch.Tensor:
            return kl_per_example(clean_logits, model(x_adv)).sum()

        return _ascend_from_gaussian_start(objective, x, eps, alpha, steps, norm, generator)


def _ascend_from_gaussian_start(objective, x: torch.Tensor, eps: float, alpha: float, steps: int, norm: str,
                                generator: torch.Generator | None) -> torch.Tensor:
    """TRADES' and MART's ascent from x + 0.001·N(0, 1): the first step in fp32 (`full_precision`), the others
    under the caller's autocast. At that start the gradient is tiny (TRADES' KL: ∝ f(x') − f(x); MART's
    cross-entropy: ∝ 1 − p_y(x), near 0 on confident examples), so under bf16 its sign is partly rounding noise.
    From the second step on, x' − x is about alpha and bf16 gives the fp32 sign as often as for PGD-AT's attack
    from its uniform start (docs/method.md, "Precision of the attacks", has the measurements)."""
    with full_precision(x.device):
        x_adv = _ascend(objective, x, _gaussian_start(x, generator), eps, alpha, 1, norm)
    return _ascend(objective, x, x_adv, eps, alpha, steps - 1, norm)


def trades_attack(model: torch.nn.Module, x: torch.Tensor, eps: float, alpha: float, steps: int, norm: str = "linf",
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """TRADES' inner max: x' maximising Σ_batch KL(p(x) ‖ p(x')) in the ε-ball ∩ [0, 1], by `steps` steps of size
    alpha (sign for ℓ∞, unit-norm gradient for ℓ2) from x + 0.001·N(0, 1). Labels are not used. steps == 0 or
    eps == 0 returns x. Returns a detached tensor shaped like x; leaves the model's mode alone.

    x: (B, C, H, W) pixels in [0, 1]. Under bf16 autocast the clean logits and the first step run in fp32
    (`full_precision`), the later steps under the caller's autocast. Raises ValueError for a bad argument or a
    pixel outside [0, 1].
    """
    _check_attack_args(x, None, eps, alpha, steps, norm, True, 1, generator)
    check_pixel_range(x, "trades_attack")
    return _trades_attack(model, x, eps, alpha, steps, norm, generator)


def _mart_attack(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float, steps: int,
                 norm: str, generator: torch.Generator | None) -> torch.Tensor:
    x = x.detach()
    if steps == 0 or eps == 0:
        return x
    with torch.enable_grad():
        return _ascend_from_gaussian_start(lambda x_adv: F.cross_entropy(model(x_adv).float(), y, reduction="sum"),
                                           x, eps, alpha, steps, norm, generator)


def mart_attack(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float, steps: int,
                norm: str = "linf", generator: torch.Generator | None = None) -> torch.Tensor:
    """MART's inner max: PGD on the summed cross-entropy from x + 0.001·N(0, 1) (not attacks.pgd's uniform start).
    Same conventions, precision rule and errors as `trades_attack`; y: (B,) class indices."""
    _check_attack_args(x, y, eps, alpha, steps, norm, True, 1, generator)
    check_pixel_range(x, "mart_attack")
    return _mart_attack(model, x, y, eps, alpha, steps, norm, generator)


def fgsm_attack(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float,
                norm: str = "linf", random_start: bool = True,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Fast AT's inner max (Wong et al. 2020): one PGD step of size alpha (1.25·ε there) from a uniform random start,
    i.e. FGSM with random initialisation, projected onto the ε-ball and [0, 1]. Errors as `attacks.pgd`'s, named
    after this function."""
    _check_attack_args(x, y, eps, alpha, 1, norm, random_start, 1, generator)
    check_pixel_range(x, "fgsm_attack")
    return _pgd(model, x, y, eps, alpha, 1, norm, random_start, 1, generator)


def inner_attack(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig,
                 attack_gen: torch.Generator) -> torch.Tensor:
    """The adversarial examples of `cfg.method`'s objective for one batch; x itself when training has no attack.

    BatchNorm is in eval mode during the attack when `cfg.attack_bn_eval`; the model is left in train mode.
    """
    objective = objective_of(cfg.method)
    if not attacks_in_training(cfg):
        return x
    if cfg.attack_bn_eval:
        model.eval()
    with autocast(cfg, x.device):
        # The unchecked attacks: no host sync here (deat.fast captures this); the config was validated and
        # deat.data.Batches yields pixels in [0, 1].
        if objective == "pgd_at":
            x_adv = _pgd(model, x, y, cfg.eps, cfg.pgd_step_size, cfg.pgd_steps, cfg.norm, cfg.random_start, 1,
                         attack_gen)
        elif objective == "trades":
            x_adv = _trades_attack(model, x, cfg.eps, cfg.pgd_step_size, cfg.pgd_steps, cfg.norm, attack_gen)
        elif objective == "mart":
            x_adv = _mart_attack(model, x, y, cfg.eps, cfg.pgd_step_size, cfg.pgd_steps, cfg.norm, attack_gen)
        else:
            x_adv = _pgd(model, x, y, cfg.eps, cfg.fgsm_step_size, 1, cfg.norm, cfg.random_start, 1, attack_gen)
    model.train()
    return x_adv


# ------------------------------------------------------------------------------------------ the training step

def outer_loss(forward: Forward, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor,
               cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The objective the outer step minimises, through `forward` (the model, or AWP's functional call of it).

    Returns (scalar loss, (B, K) logits of x' for the robust training accuracy). Call under `autocast`.
    """
    objective = objective_of(cfg.method)
    if objective in ("pgd_at", "fast_at"):
        adv_logits = forward(x_adv)
        return F.cross_entropy(adv_logits, y), adv_logits
    clean_logits, adv_logits = forward(x), forward(x_adv)
    loss_of = trades_loss if objective == "trades" else mart_loss
    return loss_of(clean_logits, adv_logits, y, cfg.beta), adv_logits


def adversarial_forward(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig,
                        attack_gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The inner max, then the training forward pass. Returns (loss, adversarial logits).

    Kept free of .item() and host syncs so that fast.py can capture it in a CUDA graph.
    """
    x_adv = inner_attack(model, x, y, cfg, attack_gen)
    with autocast(cfg, x.device):
        return outer_loss(model, x, x_adv, y, cfg)


def awp_layers(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters AWP perturbs: weights with more than one dimension (conv and linear), as in the reference."""
    return {name: p for name, p in model.named_parameters() if p.dim() > 1 and name.endswith("weight")}


def awp_perturbation(model: torch.nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor,
                     cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """AWP's weight perturbation (Wu et al. 2020): v_l = γ · ‖w_l‖ · g_l / ‖g_l‖ for each layer of `awp_layers`.

    g_l is the gradient of the objective's loss w.r.t. w_l at the adversarial examples, with the model in train
    mode; the forward pass uses copies of the model's buffers, so its BatchNorm running statistics are untouched.
    Returns {parameter name: v_l} (detached, shaped like w_l); leaves parameters and their .grad alone.
    """
    layers = awp_layers(model)
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    params = dict(model.named_parameters())
    with torch.enable_grad(), autocast(cfg, x.device):
        loss, _ = outer_loss(lambda inputs: functional_call(model, (params, buffers), (inputs,)), x, x_adv, y, cfg)
    grads = torch.autograd.grad(loss, list(layers.values()))
    return {name: cfg.awp_gamma * w.detach().norm() / (g.norm() + AWP_NORM_FLOOR) * g
            for (name, w), g in zip(layers.items(), grads)}


@torch.no_grad()
def _add_to_weights(model: torch.nn.Module, perturbation: dict[str, torch.Tensor], sign: float) -> None:
    params = dict(model.named_parameters())
    for name, v in perturbation.items():
        params[name].add_(v, alpha=sign)


def adversarial_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                     cfg: TrainConfig, attack_gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One iteration: the objective's inner max, then the outer step. Returns (loss, n_correct) tensors.

    With `cfg.awp_gamma` > 0 the gradient is taken at the AWP-perturbed weights w + v and v is removed after the
    optimizer step. The eager step; fast.py wraps it (torch.compile) or replaces it with a captured equivalent.
    """
    if cfg.awp_gamma > 0:
        x_adv = inner_attack(model, x, y, cfg, attack_gen)
        perturbation = awp_perturbation(model, x, x_adv, y, cfg)
        _add_to_weights(model, perturbation, 1.0)
        with autocast(cfg, x.device):
            loss, logits = outer_loss(model, x, x_adv, y, cfg)
    else:
        loss, logits = adversarial_forward(model, x, y, cfg, attack_gen)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if cfg.awp_gamma > 0:
        _add_to_weights(model, perturbation, -1.0)
    return loss.detach(), (logits.argmax(1) == y).sum()
