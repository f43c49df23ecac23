"""Where a call runs, for pymaml.functional (MAML) and pymaml.daml alike: whether it may go
straight to the fused op (`direct`), and, on the checked path, "fused" or "reference"
(`choose`), with the reason the fused op cannot serve it."""

from __future__ import annotations

import warnings
from typing import Optional

import torch

from . import _checks, _ops


def under_torch_func(tensors) -> bool:
    # The fused ops have no vmap / functorch-grad rules: tensors that torch.func transforms
    # wrap (grad, vmap) need the reference.
    # (torch.compile traces plain tensors here, and cannot trace this check.)
    if torch.compiler.is_compiling():
        return False
    functorch = getattr(torch._C, "_functorch", None)
    # No transform running (a user's plain loop): nothing is wrapped, and asking costs 0.1 us
    # where looking at every tensor costs 2-3 us of the ~20 us hot path.
    peek = getattr(functorch, "peek_interpreter_stack", None)
    if peek is not None and peek() is None:
        return False
    return _checks.wrapped_by_transform(tensors)


def has_tangent(tensors) -> bool:
    """Whether forward-mode AD (torch.autograd.forward_ad.make_dual) gave any of the tensors a
    tangent: the fused ops have no jvp, the reference carries it. Free when no dual level is
    open (a module attribute read)."""
    if torch.autograd.forward_ad._current_level < 0:
        return False
    unpack = torch.autograd.forward_ad.unpack_dual
    return any(isinstance(t, torch.Tensor) and unpack(t).tangent is not None for t in tensors)


def direct(backend, params, data, inner_lr, steps, size_lists, strings, devices) -> bool:
    """Whether a call may go straight to the fused op, which checks every argument itself (in
    C++, csrc/op_args.cpp): the hot path of a user's loop, a few microseconds. Only what the op
    cannot see is looked at here. Any error the op raises sends the call down the checked
    path, which words it in pymaml's terms or picks the reference (see `choose`)."""
    return ((backend == "auto" or backend == "fused") and _ops.available()
            # The dispatcher converts more than pymaml accepts (a bool for a number and back, a
            # tensor for a number, bytes for a string): only the plain types go straight on.
            and isinstance(inner_lr, (float, int)) and type(inner_lr) is not bool
            and type(steps) is int
            and all(type(s) in (list, tuple) and all(type(n) is int for n in s)
                    for s in size_lists)
            and all(type(s) is str for s in strings)
            and not torch.compiler.is_compiling()  # the checked path traces without breaks
            and isinstance(params, torch.Tensor) and params.device.type in devices
            and all(isinstance(t, torch.Tensor) for t in data)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in data))
            and not under_torch_func((params, *data))
            and torch.autograd.forward_ad._current_level < 0)  # no forward-mode AD (jvp)


def fused_refusal(params, named_sizes, steps, data, cpu_only=None, extra=()) -> Optional[str]:
    """Why the fused op cannot serve a checked call, or None. named_sizes: (name, sizes)
    pairs; cpu_only: what about the call needs the CPU kernels, if anything does; extra: other
    tensors of the call (learned rates) that a transform or forward-mode AD may carry."""
    reason = _ops.unavailable_reason(params.device, params.dtype)
    if reason:
        return reason
    limits = _ops._C  # the compiled core states its own limits (the reference has none)
    for name, s in named_sizes:
        if len(s) - 1 > limits.max_depth:
            return f"the fused op supports up to {limits.max_depth} layers, {name} has {len(s) - 1}"
        if max(s) > limits.max_width:
            return f"the fused op supports widths up to {limits.max_width}, {name} has {max(s)}"
    if steps > limits.max_steps:
        return f"the fused op supports up to {limits.max_steps} steps, got {steps}"
    if cpu_only and params.device.type != "cpu":
        return f"{cpu_only} on the CPU kernels only"
    if torch.is_grad_enabled() and any(t.requires_grad for t in data):
        return "the fused op differentiates the parameters only, and a data tensor requires grad"
    if under_torch_func((params, *data, *extra)):
        return "the fused op does not support torch.func transforms (grad, vmap)"
    if has_tangent((params, *data, *extra)):
        return "the fused op has no forward-mode AD (jvp: a tangent from forward_ad.make_dual)"
    return None


def choose(backend, params, named_sizes, steps, data, cpu_only=None, refusal=None,
           extra=()) -> str:
    """"fused" or "reference" for a checked call: the reference when asked for, or under "auto"
    when the fused op cannot serve the call (fused_refusal, or the caller's own `refusal`);
    under "fused" such a call is an error saying why."""
    _checks.check_choice("backend", backend, _checks.BACKENDS)
    if backend == "reference":
        return backend
    reason = fused_refusal(params, named_sizes, steps, data, cpu_only, extra) or refusal
    if reason is None:
        return "fused"
    if backend == "fused":
        raise RuntimeError(f"backend='fused' cannot serve this call: {reason}; "
                           "use backend='reference' or 'auto'")
    if _ops.available() and steps > _ops._C.max_steps:
        # Not silently: the reference's Python loop may not end in any useful time.
        warnings.warn(f"backend='auto': steps={steps} is beyond the fused op's limit of "
                      f"{_ops._C.max_steps}, so the autograd reference runs it, a Python loop "
                      f"of {steps} inner steps per task (second order: a graph that grows with "
                      "every step), far slower than the fused op; pass backend='reference' to "
                      "choose it knowingly, or use fewer steps", RuntimeWarning, stacklevel=3)
    return "reference"
