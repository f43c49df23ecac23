"""pymaml: fast exact gradient-based meta-learning for PyTorch (MAML, FO-MAML, Reptile,
Meta-SGD, ANIL and DAML, the entries of pymaml.algorithms).

The fused op runs the whole inner loop and the exact meta-gradient of a meta-batch of tasks
in one C++ call; `pymaml.reference` is the pure-autograd oracle it is checked against.
`pymaml.train` meta-trains on a task family (`pymaml.tasks`) with any registered algorithm and
returns its model (a `MetaMLP`, or a `DAMLModel` for DAML), whose `adapt` is test-time
adaptation; `pymaml.evaluate` runs the model's evaluation protocol; `pymaml.MAML` wraps an
nn.Sequential MLP; `pymaml.distributed` is how train() spreads a meta-batch over
torch.distributed processes."""

from . import _entry  # noqa: F401 (first, before torch: the command line's Ctrl-C, one line)
from . import algorithms, daml, distributed, functional, nn, reference, tasks
from ._io import load_model as load
from ._ops import available as fused_available, cuda_compiled
from ._version import __version__
from .algorithms import evaluate
from .daml_model import DAMLModel
from .evaluate import EvalResult
from .functional import adapt, daml_adapt, daml_loss, init_params, maml_loss, mlp_forward
from .model import MetaMLP
from .nn import MAML
from .trainer import TrainingDiverged, TrainResult, train

__all__ = [
    "__version__", "algorithms", "distributed", "functional", "nn", "reference", "tasks",
    "adapt", "init_params", "maml_loss", "mlp_forward", "fused_available", "cuda_compiled",
    "MetaMLP", "load", "train", "TrainResult", "TrainingDiverged", "evaluate", "EvalResult",
    "MAML", "daml_loss", "daml_adapt", "daml", "DAMLModel",
]
