"""The fast training step: the whole PGD attack + outer update captured in CUDA graphs, or torch.compile.

At batch size 128 a PGD-10 step of PreAct-ResNet-18 on an H100/H200 is launch-bound: a few thousand small kernels
whose launch cost, not their arithmetic, sets the step time (docs/benchmarks.md). Replaying the whole step as
CUDA graphs removes that cost. `build_train_step(model, optimizer, cfg, attack_gen)` returns `step(x, y) ->
(loss, n_correct)` for `train.train_one_epoch`:

- `cfg.cuda_graph` on CUDA: `CudaGraphStep`;
- `cfg.compile != "none"` on CUDA: the eager step around `torch.compile(model, mode=cfg.compile)`;
- otherwise, and on every non-CUDA device, the eager `objectives.adversarial_step` itself, so the CPU path is
  the plain path bit for bit (cuda_graph, compile, bf16 and channels_last are CUDA-only; the log says so once).

Every objective of deat.objectives (PGD-AT, TRADES, MART, fast AT) runs on every path. AWP (`awp_gamma` > 0)
perturbs and restores the weights around the step in Python and runs eagerly only: config validation refuses it
with cuda_graph or compile.

What a captured step must get right, and how `CudaGraphStep` does it:

- Inputs: each batch is copied into static input/label tensors that the graph reads.
- Learning rate: the schedule changes lr every iteration, but a graph replays the scalars it was captured with.
  `GraphSafeUpdate` performs the optimizer's update with its lr-dependent coefficients read from device tensors,
  refilled from `param_groups[i]["lr"]` before each replay (one small fill kernel, no host sync), so every
  schedule stays exact without re-capture. It updates the optimizer's own state tensors in place, so
  `optimizer.state_dict()`, checkpoints and resume are unchanged; the eager step and the graph can alternate.
- DEAT's two buffers: which buffer step t feeds is chosen in Python from `state["step"]`'s parity, which a graph
  cannot re-evaluate. So DEAT gets two graphs, one per parity (sharing one memory pool; they never run at
  once and keep nothing live in it), replayed alternately; `state["step"]` is advanced in Python after each
  replay, so the count, the parity and the saved state stay exact.
- Random starts: PGD draws its start from the run's attack generator (a user `torch.Generator`, saved in
  checkpoints). The graph registers it (`CUDAGraph.register_generator_state`, torch >= 2.4): its kernels read
  the generator's Philox seed and offset from device memory and each replay advances the offset by what one
  step consumes, as an eager step would. Every replay draws fresh numbers, the very numbers the eager step would
  draw from the same state, and `attack_gen.get_state()` stays exact for checkpoints.
- Gradients: zeroed in place inside the graph (`zero_grad(set_to_none=False)` semantics), so the `.grad`
  tensors the graph writes keep their addresses; they were created by the eager warm-up steps.
- Precision: under bf16 the TRADES attack's first step runs in IEEE fp32 (`objectives.full_precision`). Its
  switches (autocast, cuDNN/cuBLAS TF32) are host-side state read at kernel launch, so the capture records the
  fp32 kernels and every replay computes what the eager step computes.
- No host syncs: the public attacks' input check (one aminmax and a sync) stays out of the captured step, which
  calls the unchecked attacks (`objectives.inner_attack`); its batches come from deat.data in [0, 1].
- Warm-up: the first `eager_steps` iterations run the eager step on the capture stream (they are real training
  steps); they initialise cuDNN/cuBLAS handles and the optimizer state before the capture.

Everything the graph reads is bound at capture: do not call `optimizer.load_state_dict` or replace parameters
after the first capture (train.py loads a checkpoint before building the step). Batches must keep one shape
(train.py drops the last partial batch). The tensors a graph step returns are overwritten by the next call.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch

from .config import TrainConfig
from .optim import DEAT
from .objectives import adversarial_forward, adversarial_step

StepFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

EAGER_WARMUP_STEPS = 3  # torch's CUDA-graph notes warm up with 3 iterations on the capture stream


def cuda_only_requests(cfg: TrainConfig) -> list[str]:
    """The fast-path options `cfg` asks for that act on CUDA only (on other devices the plain step runs)."""
    requested = {"cuda_graph": cfg.cuda_graph, f"compile={cfg.compile}": cfg.compile != "none",
                 "precision=bf16": cfg.precision == "bf16", "channels_last": cfg.channels_last,
                 "cudnn_benchmark": cfg.cudnn_benchmark}
    return [name for name, asked in requested.items() if asked]


def build_train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                     attack_gen: torch.Generator, log: Callable[[str], None] = print) -> StepFn:
    """The step function `cfg` asks for on the model's device: `step(x, y) -> (loss, n_correct)` (see above)."""
    device = next(model.parameters()).device
    eager = functools.partial(adversarial_step, model, optimizer, cfg=cfg, attack_gen=attack_gen)
    if device.type != "cuda":
        ignored = cuda_only_requests(cfg)
        if ignored:
            log(f"{', '.join(ignored)}: CUDA only; on {device} every step runs the plain eager fp32 path")
        return eager
    # Process-wide, which is right here: one training process runs one step function. Its timing runs happen in
    # the eager warm-up steps, before any graph capture.
    torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
    if cfg.cuda_graph:
        log(f"cuda_graph: the first {EAGER_WARMUP_STEPS} steps run eagerly, then the step is captured and replayed")
        return CudaGraphStep(model, optimizer, cfg, attack_gen)
    if cfg.compile != "none":
        log(f"compile: torch.compile(mode={cfg.compile!r}); the first steps include compilation")
        return compiled_step(model, optimizer, cfg, attack_gen)
    return eager


def compiled_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                  attack_gen: torch.Generator) -> StepFn:
    """The eager step around `torch.compile(model)`: the attack loop and the update stay in Python.

    The model is compiled rather than the whole step: the attack takes input gradients with
    `torch.autograd.grad`, where TorchDynamo breaks the graph, and compiling the model still compiles every
    forward and backward pass the step runs. The caller keeps the uncompiled `model` for state_dicts (the
    compiled wrapper's keys carry an `_orig_mod.` prefix).
    """
    mode = None if cfg.compile == "default" else cfg.compile
    compiled = torch.compile(model, mode=mode)

    def step(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if cfg.compile == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # outputs of the previous iteration may be overwritten
        return adversarial_step(compiled, optimizer, x, y, cfg, attack_gen)

    return step


# ------------------------------------------------------------------------------------ graph-safe update

class GraphSafeUpdate:
    """`optimizer.step()` for a captured graph: lr-dependent coefficients are read from device tensors.

    Supports the two optimizers `optim.build_optimizer` makes: `torch.optim.SGD` (momentum, coupled weight
    decay, no dampening, no Nesterov, not maximize) and `optim.DEAT`. The arithmetic is that of their foreach
    paths, in the same order, except that a step `p += c·t` with a device scalar c is a multiply and an add
    (two roundings) where the eager path fuses them: results agree to float32 rounding, not bit for bit.

    Use, per iteration: `refresh()` outside the graph, then `apply(parity)` (captured, or run directly), then
    `advance()`. Every trainable parameter must have a `.grad`; missing optimizer state is created as the
    eager optimizer's first step would leave it equivalent (zero buffers, step 0).
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        if isinstance(optimizer, DEAT):
            self.kind = "deat"
        elif type(optimizer) is torch.optim.SGD:
            self.kind = "sgd"
            for group in optimizer.param_groups:
                unsupported = {k: group[k] for k in ("dampening", "nesterov", "maximize") if group[k]}
                if unsupported:
                    raise ValueError(f"optimizer: SGD options {unsupported} have no graph-safe update; "
                                     f"cuda_graph supports SGD with momentum and coupled weight decay only")
        else:
            raise ValueError(f"optimizer: cuda_graph supports torch.optim.SGD and deat.optim.DEAT, "
                             f"got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self._coefficients: list[dict[str, torch.Tensor]] = []
        self._lrs: list[float | None] = []

    def trainable(self, group: dict) -> list[torch.Tensor]:
        """The group's parameters that require grad; each must hold a .grad."""
        params = [p for p in group["params"] if p.requires_grad]
        missing = [i for i, p in enumerate(params) if p.grad is None]
        if missing:
            raise ValueError(f"cuda_graph: parameters {missing} of a group have no .grad; a captured step "
                             f"updates every parameter, so every one must receive a gradient")
        return params

    def _init_state(self) -> None:
        for group in self.optimizer.param_groups:
            if self.kind == "sgd" and not group["momentum"]:
                continue  # plain SGD keeps no state
            for param in self.trainable(group):
                state = self.optimizer.state[param]
                zeros = functools.partial(torch.zeros_like, param, memory_format=torch.preserve_format)
                if self.kind == "deat" and not state:
                    state.update(step=0, odd_momentum=zeros(), even_momentum=zeros())
                elif self.kind == "sgd" and state.get("momentum_buffer") is None:
                    state["momentum_buffer"] = zeros()  # SGD's first step sets buf = g: momentum·0 + g is that

    def refresh(self) -> None:
        """Write the current lr of each group into the device scalars (outside the graph, before a replay)."""
        if not self._coefficients:
            self._init_state()
            for group in self.optimizer.param_groups:
                reference = self.trainable(group)[0]
                names = ("neg_lr",) if self.kind == "sgd" else ("decay", "current", "other")
                self._coefficients.append({name: torch.zeros((), device=reference.device, dtype=reference.dtype)
                                           for name in names})
                self._lrs.append(None)
        for i, group in enumerate(self.optimizer.param_groups):
            if group["lr"] == self._lrs[i]:
                continue  # piecewise and constant schedules: no fill most iterations
            lr, values = group["lr"], {}
            if self.kind == "sgd":
                values["neg_lr"] = -lr
            else:
                # The coefficients of optim._deat_step_foreach: α' = α / √((1 + k1)² + k1²).
                scale = lr / math.sqrt((1.0 + group["k1"]) ** 2 + group["k1"] ** 2)
                values["decay"] = 1.0 - lr * group["weight_decay"]
                values["current"] = -scale * (1.0 + group["k1"])
                values["other"] = scale * group["k1"]
            for name, value in values.items():
                self._coefficients[i][name].fill_(value)
            self._lrs[i] = lr

    def parity(self) -> int:
        """1 if the next DEAT step is odd-numbered (it feeds `odd_momentum`), else 0; always 0 for SGD."""
        if self.kind == "sgd":
            return 0
        steps = {self.optimizer.state[p]["step"] for group in self.optimizer.param_groups
                 for p in self.trainable(group)}
        if len(steps) != 1:
            raise ValueError(f"cuda_graph: DEAT parameters are at different step counts {sorted(steps)}; "
                             f"one graph per parity needs them in step")
        return (steps.pop() + 1) % 2

    @torch.no_grad()
    def apply(self, parity: int) -> None:
        """The update itself: graph-safe (no host sync, no Python branch on tensor values)."""
        for group, coefficients in zip(self.optimizer.param_groups, self._coefficients):
            params = self.trainable(group)
            grads = [p.grad for p in params]
            if self.kind == "sgd":
                self._apply_sgd(group, params, grads, coefficients)
            else:
                self._apply_deat(group, params, grads, coefficients, parity)

    def _apply_sgd(self, group, params, grads, coefficients) -> None:
        # torch.optim.SGD's foreach path: g += wd·p; buf = μ·buf + g; p -= lr·buf.
        if group["weight_decay"]:
            grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
        if group["momentum"]:
            buffers = [self.optimizer.state[p]["momentum_buffer"] for p in params]
            torch._foreach_mul_(buffers, group["momentum"])
            torch._foreach_add_(buffers, grads)
            grads = buffers
        torch._foreach_add_(params, torch._foreach_mul(grads, coefficients["neg_lr"]))

    def _apply_deat(self, group, params, grads, coefficients, parity: int) -> None:
        # optim._deat_step_foreach with the lr-dependent scalars on the device (DEAT's docstring has the rule).
        states = [self.optimizer.state[p] for p in params]
        current = [s["odd_momentum"] if parity else s["even_momentum"] for s in states]
        other = [s["even_momentum"] if parity else s["odd_momentum"] for s in states]
        if group["weight_decay"]:
            if group["decoupled_weight_decay"]:
                torch._foreach_mul_(params, coefficients["decay"])
            else:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
        torch._foreach_lerp_(current, grads, 1.0 - group["k2"])
        torch._foreach_add_(params, torch._foreach_mul(current, coefficients["current"]))
        torch._foreach_add_(params, torch._foreach_mul(other, coefficients["other"]))

    def advance(self) -> None:
        """Count the step just taken, as `DEAT.step` does (SGD keeps no count)."""
        if self.kind == "deat":
            for group in self.optimizer.param_groups:
                for param in self.trainable(group):
                    self.optimizer.state[param]["step"] += 1


# ------------------------------------------------------------------------------------ the captured step

class CudaGraphStep:
    """`adversarial_step` as CUDA graphs: warm up eagerly, capture once per DEAT parity, then replay.

    Call it like `step(x, y)`; it returns static (loss, n_correct) tensors, valid until the next call.
    The module docstring explains inputs, lr, DEAT's parity, random starts and gradients under capture.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                 attack_gen: torch.Generator, eager_steps: int = EAGER_WARMUP_STEPS) -> None:
        device = next(model.parameters()).device
        if device.type != "cuda":
            raise ValueError(f"CudaGraphStep needs a model on CUDA, got {device}")
        if attack_gen.device.type != "cuda":
            raise ValueError(f"attack_gen must be a CUDA generator for capture, got one on {attack_gen.device}")
        if not hasattr(torch.cuda.CUDAGraph, "register_generator_state"):
            raise RuntimeError(f"cuda_graph needs torch >= 2.4 (CUDAGraph.register_generator_state) for fresh "
                               f"random starts on every replay; this is torch {torch.__version__}")
        if cfg.awp_gamma > 0:
            raise ValueError(f"awp_gamma={cfg.awp_gamma}: AWP runs eagerly only; set cuda_graph false")
        if eager_steps < 1:
            raise ValueError(f"eager_steps must be >= 1 (warm-up before capture), got {eager_steps}")
        self.model, self.optimizer, self.cfg, self.attack_gen = model, optimizer, cfg, attack_gen
        self.update = GraphSafeUpdate(optimizer)
        self.eager_steps_left = eager_steps
        self.stream = torch.cuda.Stream(device)
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.static_x: torch.Tensor | None = None
        self.static_y: torch.Tensor | None = None
        self.graph_grads: dict[int, list[torch.Tensor]] = {}
        # Outputs live outside the graphs' pool, so nothing in the shared pool outlives a capture.
        self.loss = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device, dtype=torch.long)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.eager_steps_left > 0:
            self.eager_steps_left -= 1
            return self._eager_step(x, y)
        if self.static_x is None:
            self.static_x = torch.empty_like(x)  # keeps x's memory format (channels_last)
            self.static_y = torch.empty_like(y)
        if x.shape != self.static_x.shape or y.shape != self.static_y.shape:
            raise ValueError(f"cuda_graph: batch shapes {tuple(x.shape)}, {tuple(y.shape)} differ from the captured "
                             f"{tuple(self.static_x.shape)}, {tuple(self.static_y.shape)}; use equal batches "
                             f"(drop_last=True)")
        self.static_x.copy_(x)
        self.static_y.copy_(y)
        self.update.refresh()
        parity = self.update.parity()
        if parity not in self.graphs:
            self.graphs[parity] = self._capture(parity)
        self.graphs[parity].replay()
        self.update.advance()
        return self.loss, self.correct

    def _eager_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            loss, correct = adversarial_step(self.model, self.optimizer, x, y, self.cfg, self.attack_gen)
        torch.cuda.current_stream().wait_stream(self.stream)
        return loss, correct

    def _capture(self, parity: int) -> torch.cuda.CUDAGraph:
        # The eager warm-up left these .grad tensors (outside the graphs' pool). The graph zeroes them, lets
        # backward accumulate into them and reads them in the update, all at these addresses; keeping the list
        # keeps them alive whatever later code does to param.grad.
        grads = [p.grad for group in self.optimizer.param_groups for p in self.update.trainable(group)]
        self.graph_grads[parity] = grads
        graph = torch.cuda.CUDAGraph()
        graph.register_generator_state(self.attack_gen)
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
            loss, logits = adversarial_forward(self.model, self.static_x, self.static_y, self.cfg, self.attack_gen)
            torch._foreach_zero_(grads)
            loss.backward()
            self.update.apply(parity)
            self.loss.copy_(loss.detach())
            self.correct.copy_((logits.argmax(1) == self.static_y).sum())
        return graph
