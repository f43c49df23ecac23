"""The chunked fast path of pymaml.train: many meta-iterations per C++ call.

At the seed's sizes an iteration is a few microseconds of arithmetic, and calling Python, the
dispatcher and torch.optim once per iteration costs several times that. So on the fused CPU
backend, for MAML / FO-MAML on a family that can draw many meta-batches at once
(TaskFamily.sample_many, e.g. every FunctionTasks) with torch.optim's SGD or Adam, the trainer
draws a chunk of iterations' tasks in one call and runs them in one torch.ops.pymaml.train_chunk
call, which also applies the optimizer's steps to the real optimizer's state. Chunking changes
no result: the loss history, the weights, the optimizer state and the generator state are
bitwise those of the per-iteration path, which every other run takes (custom samplers, Reptile,
other optimizers or settings, the reference backend, several processes)."""

from __future__ import annotations

import math
import numbers
import time
import warnings
from typing import Dict, List, Optional, Tuple

import torch

from . import _ops
from .config import RunConfig

CHUNK_FIRST = 16       # iterations of the first train_chunk call, timed to size the next ones
CHUNK_MAX = 1000       # iterations per call, at most
CHUNK_SECONDS = 0.05   # the aim for one call: Ctrl-C and the progress bar answer within it


class FastPath:
    """The chunked path of one run: its optimizer's description for train_chunk, and the
    chunk size, adapted so that a call takes about CHUNK_SECONDS."""

    def __init__(self, spec: Tuple[str, List[float]], config: RunConfig, family,
                 generator: torch.Generator, dtype: torch.dtype):
        self.spec = spec
        self.config = config
        self.family = family
        self.generator = generator
        self.dtype = dtype
        self.size = CHUNK_FIRST

    @classmethod
    def for_run(cls, config: RunConfig, backend: str, device: torch.device, processes: int,
                optimizer: torch.optim.Optimizer, family, generator: torch.Generator,
                dtype: torch.dtype) -> Optional["FastPath"]:
        """The fast path if this run may take it, else None. One process only: in a
        distributed run the all-reduce sits between each iteration's meta-gradient and its
        optimizer step."""
        if (processes != 1 or backend != "fused" or device.type != "cpu"
                or config.algorithm not in ("maml", "fomaml")):
            return None
        spec = _chunk_optimizer(optimizer)
        if spec is None or not (_fits(*spec, dtype)
                                and _reproduces_torch_optim(optimizer, *spec, dtype)):
            return None
        return cls(spec, config, family, generator, dtype)

    def state(self, optimizer, params) -> Optional[List[torch.Tensor]]:
        """train_chunk's optimizer_state, or None while torch.optim has not made it (its first
        step: that iteration goes the per-iteration way)."""
        return _chunk_state(optimizer, params, *self.spec)

    def length(self, done: int, checkpoint_every: int) -> int:
        """The next chunk's length after `done` iterations: it never crosses a checkpoint or
        the end."""
        return min(self.size, self.config.iterations - done,
                   checkpoint_every - done % checkpoint_every)

    def run(self, params: torch.Tensor, state: List[torch.Tensor],
            n: int) -> Optional[Tuple[List[float], int]]:
        """The next n iterations in one train_chunk call, params and state updated in place:
        (their meta-losses, how many completed: fewer than n when the op stopped before a
        non-finite loss or after a step that made the weights non-finite). None when the
        family cannot draw n meta-batches at once (nothing drawn then)."""
        c = self.config
        began = time.perf_counter()
        batch = self.family.sample_many(n, c.meta_batch_size, generator=self.generator,
                                        dtype=self.dtype, device=params.device)
        if batch is None:
            return None
        values, done = _ops.ops.train_chunk(
            params.detach(), state, *batch, list(c.sizes), c.inner_lr, c.inner_steps, c.activation,
            c.loss, c.algorithm == "fomaml", *self.spec)
        seconds = time.perf_counter() - began
        self.size = CHUNK_MAX if seconds <= 0 else \
            max(1, min(CHUNK_MAX, int(CHUNK_SECONDS * n / seconds)))
        return values.tolist(), int(done)


# The param_group keys of the torch.optim versions whose steps train_chunk repeats: a key not
# listed here is a setting the op does not know, so the trainer keeps the per-iteration path.
_SGD_KEYS = {"params", "lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize",
             "foreach", "differentiable", "fused"}
_ADAM_KEYS = {"params", "lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "foreach",
              "capturable", "differentiable", "fused", "decoupled_weight_decay"}


def _real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _chunk_optimizer(opt) -> Optional[Tuple[str, List[float]]]:
    """(optimizer, optimizer_hyper) for train_chunk when `opt` is torch.optim.SGD or Adam in
    a setting whose step the op repeats: one parameter group, plain-number hyper-parameters,
    and torch.optim's default single-tensor implementation (not foreach, fused, capturable
    or differentiable). None otherwise."""
    if type(opt) not in (torch.optim.SGD, torch.optim.Adam) or len(opt.param_groups) != 1:
        return None
    g = opt.param_groups[0]
    if not set(g) <= (_SGD_KEYS if type(opt) is torch.optim.SGD else _ADAM_KEYS):
        return None
    if g.get("foreach") or g.get("fused") or g.get("differentiable") or g.get("capturable"):
        return None
    # What torch.optim itself runs for these params when foreach and fused are left unset: the
    # single-tensor implementation on CPU tensors in torch 2.13 (a torch that defaulted to
    # another would not take this path).
    try:
        from torch.optim.optimizer import _default_to_fused_or_foreach
        implementation = _default_to_fused_or_foreach(g["params"], differentiable=False,
                                                      use_fused=False)
    except (ImportError, TypeError):
        return None
    if tuple(implementation) != (False, False):
        return None
    if type(opt) is torch.optim.SGD:
        name = "sgd"
        values = [g["lr"], g["momentum"], g["dampening"], g["weight_decay"]]
        flags = [g["nesterov"], g["maximize"]]
    else:
        betas = tuple(g["betas"])
        if len(betas) != 2:
            return None
        name = "adam"
        values = [g["lr"], betas[0], betas[1], g["eps"], g["weight_decay"]]
        flags = [g["amsgrad"], g["maximize"], g.get("decoupled_weight_decay", False)]
    if not all(_real(v) and math.isfinite(v) for v in values) or not all(isinstance(f, bool) for f in flags):
        return None  # e.g. a tensor learning rate
    return name, [float(v) for v in values] + [float(f) for f in flags]


def _chunk_state(opt, params, name, hyper) -> Optional[List[torch.Tensor]]:
    """train_chunk's optimizer_state: the optimizer's own state tensors for params (the op
    updates them in place, so opt.state_dict() stays torch.optim's), or None while there are
    none yet: torch.optim makes its state at its first step, which the trainer then leaves to
    torch.optim (the per-iteration path)."""
    state = opt.state.get(params, {})
    if name == "sgd":
        if hyper[1] == 0:  # no momentum: no state
            return []
        tensors = [state.get("momentum_buffer")]
    else:
        step = state.get("step")
        if not (isinstance(step, torch.Tensor) and step.dim() == 0 and step.device.type == "cpu"
                and step.dtype in (torch.float32, torch.float64)):
            return None
        amsgrad = hyper[5] == 1.0
        tensors = [state.get(k) for k in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ())]
    for t in tensors:
        if not (isinstance(t, torch.Tensor) and t.dtype == params.dtype and t.device == params.device
                and t.shape == params.shape and t.is_contiguous()):
            return None
    return tensors if name == "sgd" else [step] + tensors


def _fits(name, hyper, dtype) -> bool:
    """Whether every scalar the optimizer's step casts to `dtype` (lr, the step sizes
    lr / (1 - beta1 ** step), eps, ...) is well inside its range. torch.optim raises where one
    overflows (and the op refuses it); such runs are left to torch.optim."""
    limit = torch.finfo(dtype).max / 16
    if name == "sgd":
        values = hyper[:4]
    else:
        lr, beta1, _, eps, weight_decay = hyper[:5]
        values = [lr / (1 - beta1), eps, weight_decay, lr * weight_decay]
    return all(abs(v) <= limit for v in values)


_REPRODUCED: Dict[tuple, bool] = {}


def _reproduces_torch_optim(opt, name, hyper, dtype) -> bool:
    """Whether the op's optimizer step is bitwise torch.optim's for these settings on this build.

    The rounding train_chunk repeats was read off torch 2.13's CPU kernels; another torch
    build could round differently. So before the first chunked run of a setting, a few steps
    on random data (a millisecond, once per process and setting) compare the two; on any
    difference the trainer keeps the per-iteration path, with a warning."""
    key = (type(opt), name, tuple(hyper), dtype)
    if key not in _REPRODUCED:
        settings = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
        g = torch.Generator().manual_seed(0)
        P = 1037  # a vector body and a scalar tail for every SIMD width
        start = torch.randn(P, dtype=dtype, generator=g)
        ours = start.clone().requires_grad_()
        theirs = start.clone().requires_grad_()
        ours_opt = type(opt)([ours], **settings)
        theirs_opt = type(opt)([theirs], **settings)
        same = True
        for k in range(6):
            scale = torch.logspace(-4, 2, P, dtype=dtype)[torch.randperm(P, generator=g)]
            grad = torch.randn(P, dtype=dtype, generator=g) * scale
            theirs.grad = grad.clone()
            theirs_opt.step()
            if k == 0:  # torch.optim makes the state, as in training
                ours.grad = grad.clone()
                ours_opt.step()
            else:
                with torch.no_grad():
                    _ops.ops.optimizer_step(ours.detach(), _chunk_state(ours_opt, ours, name, hyper),
                                            grad, name, hyper)
            same = same and torch.equal(ours, theirs)
        theirs_state, ours_state = theirs_opt.state[theirs], ours_opt.state[ours]
        same = same and all(torch.equal(ours_state[k], theirs_state[k]) for k in theirs_state)
        if not same:
            warnings.warn(f"pymaml.train: the fused training op's {name} step differs from "
                          f"torch.optim's on this build (torch {torch.__version__}); training "
                          "takes the slower per-iteration path", RuntimeWarning, stacklevel=3)
        _REPRODUCED[key] = same
    return _REPRODUCED[key]


