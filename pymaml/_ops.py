"""Loads the compiled core (pymaml._C, which registers torch.ops.pymaml.* with their kernels
and, in C++, their autograd) and attaches the fake (meta) kernels, so the ops work under
torch.compile and pass torch.library.opcheck. Importing pymaml never fails because the
extension is missing: the reason is kept and reported when the fused path is asked for."""

from __future__ import annotations

from typing import Optional

import torch

from . import _layout, reference

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

    # ---- fake kernels: shapes only, one per schema (csrc/ops.cpp) -------------------------
    # A gradient not computed (need_grad / need_rate_grad false) is [0].
    def _grad(params, t, wanted):
        return params.new_empty(t.shape if wanted else (0,))

    def _loss_outputs(params, keep_grad, need_grad, inputs, rates, need_rate_grad):
        """The loss ops' list: [loss, a gradient per input (the rates' with rates)], or [loss]
        with keep_grad."""
        out = [params.new_empty(())]
        if keep_grad:
            return out
        out += [_grad(params, t, need_grad) for t in inputs]
        if rates is not None:
            out.append(_grad(params, rates, need_grad and need_rate_grad))
        return out

    @torch.library.register_fake("pymaml::adapt")
    def _adapt_fake(params, x_support, y_support, sizes, inner_lr, steps, activation, loss,
                    first_order, rates=None, adapt_layers=None):
        return params.new_empty((x_support.shape[0], params.shape[0]))

    @torch.library.register_fake("pymaml::adapt_backward")
    def _adapt_backward_fake(grad, params, x_support, y_support, sizes, inner_lr, steps,
                             activation, loss, rates=None, adapt_layers=None, first_order=False,
                             need_rate_grad=False):
        rate_grad = rates is not None and need_rate_grad
        return params.new_empty(params.shape), _grad(params, rates, rate_grad)

    @torch.library.register_fake("pymaml::maml_loss")
    def _maml_loss_fake(params, x_support, y_support, x_query, y_query, sizes, inner_lr, steps,
                        activation, loss, first_order, need_grad, keep_grad=False, rates=None,
                        adapt_layers=None, need_rate_grad=False):
        return _loss_outputs(params, keep_grad, need_grad, [params], rates, need_rate_grad)

    @torch.library.register_fake("pymaml::daml_loss")
    def _daml_loss_fake(params, loss_params, x_source, x_query, y_query, sizes, loss_sizes,
                        inner_lr, steps, activation, loss, adapt_loss, need_grad,
                        keep_grad=False, rates=None, need_rate_grad=False):
        return _loss_outputs(params, keep_grad, need_grad, [params, loss_params], rates,
                             need_rate_grad)

    @torch.library.register_fake("pymaml::daml_adapt")
    def _daml_adapt_fake(params, loss_params, x_source, sizes, loss_sizes, inner_lr, steps,
                         activation, adapt_loss):
        return params.new_empty((x_source.shape[0], params.shape[0]))

    @torch.library.register_fake("pymaml::flatten_params")
    def _flatten_params_fake(parts):
        return parts[0].new_empty((sum(t.numel() for t in parts),))

    @torch.library.register_fake("pymaml::reptile")
    def _reptile_fake(params, x_support, y_support, x_query, y_query, sizes, inner_lr, steps,
                      activation, loss):
        return params.new_empty(()), params.new_empty(params.shape)

    @torch.library.register_fake("pymaml::train_chunk")
    def _train_chunk_fake(params, optimizer_state, x_support, y_support, x_query, y_query, sizes,
                          inner_lr, steps, activation, loss, algorithm, optimizer,
                          optimizer_hyper, rates=None, adapt_layers=None, learn_rates=False):
        # losses [n] and the count of iterations done; params, the rates and the state change
        # in place
        return params.new_empty((x_support.shape[0],)), params.new_empty((), dtype=torch.int64)

    @torch.library.register_fake("pymaml::daml_train_chunk")
    def _daml_train_chunk_fake(weights, optimizer_state, x_source, x_query, y_query, sizes,
                               loss_sizes, inner_lr, steps, activation, loss, adapt_loss,
                               optimizer, optimizer_hyper):
        return weights.new_empty((x_source.shape[0],)), weights.new_empty((), dtype=torch.int64)

    if cuda_compiled():
        @torch.library.register_kernel("pymaml::reptile", "cuda")
        def _reptile_cuda(params, x_support, y_support, x_query, y_query, sizes, inner_lr,
                          steps, activation, loss):
            # The CUDA kernels have no Reptile mode: the fused adapt, then torch for the rest.
            adapted = ops.adapt(params, x_support, y_support, sizes, inner_lr, steps,
                                activation, loss, True)
            predicted = reference.flat_net(adapted, x_query, sizes, activation)
            value = reference.LOSSES[loss](predicted, y_query)
            return value, params - adapted.mean(0)

    # Autograd is registered in C++ (csrc/autograd.cpp): a few microseconds per call where a
    # Python formula cost tens.


def flatten_params(parts) -> torch.Tensor:
    """[W0, b0, W1, b1, ...] as one flat differentiable [P] tensor: torch.ops.pymaml.flatten_params
    (one autograd node, each part's gradient a view of the flat one) where the compiled core is
    loaded, else pymaml._layout.flatten (torch.cat of reshapes)."""
    if _C is None:
        return _layout.flatten(parts)
    return ops.flatten_params(parts)
