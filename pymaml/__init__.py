"""pymaml: fast exact gradient-based meta-learning (MAML, FO-MAML, Reptile) for PyTorch.

The fused op runs the whole inner loop and the exact meta-gradient of a meta-batch of tasks
in one C++ call; `pymaml.reference` is the pure-autograd oracle it is checked against."""

from . import functional, nn, reference
from ._ops import available as fused_available, cuda_compiled
from ._version import __version__
from .functional import adapt, init_params, maml_loss, mlp_forward

__all__ = [
    "__version__", "functional", "nn", "reference", "adapt", "init_params", "maml_loss",
    "mlp_forward", "fused_available", "cuda_compiled",
]
