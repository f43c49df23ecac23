"""Where a call runs: whether tensors are wrapped by a torch.func transform (the fused ops
have no rules for them), and the backend a call falls to when the fused op cannot serve it.
Shared by pymaml.functional (MAML) and pymaml.daml."""

from __future__ import annotations

import warnings

import torch

from . import _ops


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
    wrapped = getattr(functorch, "is_functorch_wrapped_tensor", None)
    return wrapped is not None and any(wrapped(t) for t in tensors)


def backend_for(backend, reason, steps) -> str:
    """"fused" when nothing stands in its way (reason None); else the reference under "auto"
    (warning when the step count alone sent it there), an error under "fused"."""
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
                      "choose it knowingly, or use fewer steps", RuntimeWarning, stacklevel=4)
    return "reference"
