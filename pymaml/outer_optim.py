"""The outer optimizers of pymaml.train's chunked fast path: which ones it may step, and how.

torch.ops.pymaml.train_chunk applies the outer optimizer's steps in C++ by calling ATen's fused
optimizer kernels (torch._fused_sgd_, _fused_adam_, _fused_adamw_) with the arguments that
torch.optim's own fused=True step gives them. So it may take over exactly the optimizers whose
step() would run those kernels, one parameter tensor at a time: a chunked iteration is then
bitwise a per-iteration one by construction, on any torch build, with no copy of torch's
rounding to keep in sync. That is why pymaml.train builds its named optimizers ("sgd",
"adam") with fused=True (see build_kwargs) in the runs train_chunk can serve (fused CPU
backend, MAML / FO-MAML, in one process or several), and only there: on the CPU the fused
kernels open a thread-parallel region even for a few thousand weights, which torch.optim's
default steps do not, and on a busy machine at 2 threads that made a per-iteration Reptile
run several times slower (benchmarks/NOTES.md)."""

from __future__ import annotations

import math
import numbers
from typing import Dict, List, NamedTuple, Optional

import torch

__all__ = ["ChunkSpec", "build_kwargs", "chunk_spec", "chunk_state"]


# torch.optim classes train_chunk may step, with the op's name for them. AdamW only while it is
# Adam's step with decoupled_weight_decay=True (as in torch 2.13), not a step of its own.
_KINDS = {torch.optim.SGD: "sgd", torch.optim.Adam: "adam"}
if torch.optim.AdamW.step is torch.optim.Adam.step:
    _KINDS[torch.optim.AdamW] = "adam"

# The param_group keys of those classes: a key not listed here is a setting train_chunk's
# arguments cannot carry, so such an optimizer is left to torch.optim.
_SGD_KEYS = {"params", "lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize",
             "foreach", "differentiable", "fused"}
_ADAM_KEYS = {"params", "lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "foreach",
              "capturable", "differentiable", "fused", "decoupled_weight_decay"}


class ChunkSpec(NamedTuple):
    """train_chunk's `optimizer` and `optimizer_hyper` arguments (layout in csrc/ops.cpp)."""
    optimizer: str
    hyper: List[float]


def build_kwargs(kwargs: Dict) -> Dict:
    """The keyword arguments (besides lr) pymaml.train builds "sgd" / "adam" with: the user's
    optimizer_kwargs plus fused=True, so that its per-iteration steps and train_chunk's run the
    same kernel; unless the user chose the implementation (set fused, or foreach=True or
    differentiable=True, which torch.optim refuses with fused=True): their choice wins, and
    the fast path then applies only if it is fused=True."""
    if "fused" in kwargs or kwargs.get("foreach") or kwargs.get("differentiable"):
        return dict(kwargs)
    return {"fused": True, **kwargs}


def _real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def chunk_spec(opt) -> Optional[ChunkSpec]:
    """train_chunk's (optimizer, optimizer_hyper) for `opt`, when its step() is the fused kernel
    train_chunk calls: torch.optim.SGD or Adam (or AdamW) with fused=True alone (not foreach,
    capturable or differentiable), no AMP grad scaler (grad_scale / found_inf, which
    train_chunk does not take), one parameter group, plain-number hyper-parameters. None
    otherwise: the trainer then keeps the per-iteration path, where torch.optim steps opt."""
    name = _KINDS.get(type(opt))
    if name is None or len(opt.param_groups) != 1:
        return None
    g = opt.param_groups[0]
    if not set(g) <= (_SGD_KEYS if name == "sgd" else _ADAM_KEYS):
        return None
    if (g.get("fused") is not True or g.get("foreach") or g.get("capturable")
            or g.get("differentiable") or getattr(opt, "grad_scale", None) is not None
            or getattr(opt, "found_inf", None) is not None):
        return None
    if name == "sgd":
        values = [g["lr"], g["momentum"], g["dampening"], g["weight_decay"]]
        flags = [g["nesterov"], g["maximize"]]
    else:
        betas = tuple(g["betas"])
        if len(betas) != 2:
            return None
        values = [g["lr"], betas[0], betas[1], g["eps"], g["weight_decay"]]
        flags = [g["amsgrad"], g["maximize"], g.get("decoupled_weight_decay", False)]
    if not all(_real(v) for v in values) or not all(isinstance(f, bool) for f in flags):
        return None  # e.g. a tensor learning rate (the kernels' other overload)
    return ChunkSpec(name, [float(v) for v in values] + [float(f) for f in flags])


def _like(t, params) -> bool:
    return (isinstance(t, torch.Tensor) and t.dtype == params.dtype and t.device == params.device
            and t.shape == params.shape and t.is_contiguous())


def chunk_state(opt, params, spec: ChunkSpec) -> Optional[List[torch.Tensor]]:
    """train_chunk's optimizer_state for `params` (the one tensor of opt's group): opt's own
    state tensors, which the op updates in place, so that opt.state_dict() stays torch.optim's.
    None while they do not exist yet: torch.optim makes them at its first step (for SGD with
    momentum, the buffer its fused step creates with is_first_step), which the trainer then
    leaves to torch.optim; None too for state the fused kernel would not be given (e.g. a
    float64 step count, which Adam(fused=True) never keeps)."""
    state = opt.state.get(params, {})
    if spec.optimizer == "sgd":
        if spec.hyper[1] == 0:  # no momentum: no state
            return []
        buffer = state.get("momentum_buffer")
        return [buffer] if _like(buffer, params) else None
    step = state.get("step")
    if not (isinstance(step, torch.Tensor) and step.dim() == 0 and step.dtype == torch.float32
            and step.device == params.device):
        return None
    amsgrad = spec.hyper[5] == 1.0
    tensors = [state.get(k) for k in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ())]
    return [step] + tensors if all(_like(t, params) for t in tensors) else None
