"""Loads the compiled core (pymaml._C, which registers torch.ops.pymaml.*) and attaches the
autograd formulas and fake (meta) kernels, so the ops work under torch.compile and pass
torch.library.opcheck. Importing pymaml never fails because the extension is missing: the
reason is kept and reported when the fused path is asked for."""

from __future__ import annotations

from typing import Optional

import torch

try:
    from . import _C  # noqa: F401  (registers the ops)

    _IMPORT_ERROR: Optional[BaseException] = None
except ImportError as exc:  # not built, or built against another torch
    _C = None
    _IMPORT_ERROR = exc


def available() -> bool:
    """Whether the compiled core is loaded."""
    return _C is not None


def cuda_compiled() -> bool:
    """Whether the compiled core carries CUDA kernels."""
    return _C is not None and bool(_C.cuda_compiled)


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why the fused ops cannot run on this device and dtype, or None if they can."""
    if _C is None:
        return (
            "the compiled extension pymaml._C could not be imported "
            f"({type(_IMPORT_ERROR).__name__}: {_IMPORT_ERROR}); build it with "
            "`pip install --no-build-isolation -e .` against the installed torch"
        )
    if dtype not in (torch.float32, torch.float64):
        return f"the fused ops support float32 and float64, not {dtype}"
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        return None if cuda_compiled() else "pymaml._C was built without CUDA kernels"
    return f"the fused ops have no kernels for device type '{device.type}'"


if _C is not None:
    ops = torch.ops.pymaml

    # ---- fake kernels: shapes only --------------------------------------------------------
    @torch.library.register_fake("pymaml::adapt")
    def _adapt_fake(params, x_support, y_support, sizes, inner_lr, steps, activation, loss,
                    first_order):
        return params.new_empty((x_support.shape[0], params.shape[0]))

    @torch.library.register_fake("pymaml::adapt_backward")
    def _adapt_backward_fake(grad, params, x_support, y_support, sizes, inner_lr, steps,
                             activation, loss):
        return params.new_empty(params.shape)

    @torch.library.register_fake("pymaml::maml_loss")
    def _maml_loss_fake(params, x_support, y_support, x_query, y_query, sizes, inner_lr, steps,
                        activation, loss, first_order, need_grad):
        width = params.shape[0] if need_grad else 0
        return params.new_empty(()), params.new_empty((width,))

    @torch.library.register_fake("pymaml::train_chunk")
    def _train_chunk_fake(params, optimizer_state, x_support, y_support, x_query, y_query, sizes,
                          inner_lr, steps, activation, loss, first_order, optimizer,
                          optimizer_hyper):
        # losses [n] and the count of iterations done; params and the state change in place
        return params.new_empty((x_support.shape[0],)), params.new_empty((), dtype=torch.int64)

    # ---- autograd ---------------------------------------------------------------------------
    # Gradients flow to params only; functional.py sends inputs with differentiable data to
    # the reference backend. Double backward is not supported by the fused ops.

    def _adapt_setup(ctx, inputs, output):
        params, xs, ys, sizes, inner_lr, steps, activation, loss, first_order = inputs
        ctx.save_for_backward(params, xs, ys)
        ctx.hyper = (sizes, inner_lr, steps, activation, loss)
        ctx.first_order = first_order

    def _refuse_double_backward(op):
        # Under create_graph=True the fused gradient would be a constant to autograd, and any
        # higher derivative silently wrong: refuse instead.
        if torch.is_grad_enabled():
            raise RuntimeError(f"{op}: double backward (create_graph=True) is not supported "
                               "by the fused op; use backend='reference'")

    def _refuse_data_gradients(op, ctx, data_slots):
        if any(ctx.needs_input_grad[i] for i in data_slots):
            raise RuntimeError(f"{op}: the fused op differentiates params only, but a data "
                               "tensor requires grad; use backend='reference'")

    def _adapt_grad(ctx, grad):
        _refuse_double_backward("pymaml::adapt")
        _refuse_data_gradients("pymaml::adapt", ctx, (1, 2))
        if ctx.first_order:  # each inner step's Jacobian taken as the identity
            grad_params = grad.sum(0)
        else:
            params, xs, ys = ctx.saved_tensors
            grad_params = ops.adapt_backward(grad, params, xs, ys, *ctx.hyper)
        return (grad_params,) + (None,) * 8

    torch.library.register_autograd("pymaml::adapt", _adapt_grad, setup_context=_adapt_setup)

    def _maml_loss_setup(ctx, inputs, output):
        ctx.save_for_backward(output[1])
        ctx.mark_non_differentiable(output[1])

    def _maml_loss_grad(ctx, grad_loss, _grad_meta_grad):
        _refuse_double_backward("pymaml::maml_loss")
        _refuse_data_gradients("pymaml::maml_loss", ctx, (1, 2, 3, 4))
        (meta_grad,) = ctx.saved_tensors
        if meta_grad.numel() == 0 and ctx.needs_input_grad[0]:
            raise RuntimeError("pymaml::maml_loss was called with need_grad=False, so it has no "
                               "meta-gradient to give: call it with need_grad=True")
        # The meta-gradient was computed in the forward pass, in the same sweep as the loss.
        return (grad_loss * meta_grad,) + (None,) * 11

    torch.library.register_autograd(
        "pymaml::maml_loss", _maml_loss_grad, setup_context=_maml_loss_setup
    )
