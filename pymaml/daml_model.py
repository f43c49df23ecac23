"""DAMLModel: a DAML-trained pair of networks, the base MLP (theta) and the adaptation-loss MLP
(psi), and its test-time adaptation from unlabeled inputs (pymaml.daml). Both networks'
weights live in ONE flat nn.Parameter, `weights` = cat[params, loss_params] (what training
steps with one optimizer, and what torch.ops.pymaml.daml_train_chunk updates in place);
`params` and `loss_params` are views of it. Files as pymaml.MetaMLP's (SavedModel)."""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import nn

from . import _checks
from . import _io
from . import daml as _daml
from . import functional as F
from ._layout import num_params
from ._version import __version__
from .model import MetaMLP, SavedModel

__all__ = ["DAMLModel", "default_loss_sizes"]

DEFAULT_LOSS_HIDDEN = (32, 32)  # the seed's adaptation-loss network: (65)-32-32-1


def default_loss_sizes(sizes, hidden=DEFAULT_LOSS_HIDDEN) -> list:
    """The loss network's layer sizes for a base network of `sizes`: [n_out + sum of the
    hidden widths, *hidden, 1] ([65, 32, 32, 1] for the seed's 1-32-32-1). One output is the
    default (the seed's); any output width may be given as loss_sizes."""
    return [_checks.loss_input_width(list(sizes)), *hidden, 1]


def init_weights(sizes, loss_sizes, *, init: str = "seed", generator=None,
                 dtype=torch.float32, device=None) -> torch.Tensor:
    """cat[params, loss_params]: the base network's weights, then the loss network's, each as
    pymaml.functional.init_params draws them (init "seed": W uniform in ±1/sqrt(fan_in), zero
    biases; "torch": nn.Linear's default), drawn in that order from `generator`."""
    zero_bias = _checks.check_choice("init", init, ("seed", "torch")) == "seed"
    parts = [F.init_params(s, generator=generator, dtype=dtype, device=device,
                           zero_bias=zero_bias) for s in (sizes, loss_sizes)]
    return torch.cat(parts)


class DAMLModel(SavedModel):
    """A base MLP (`sizes`, `activation`) with its learned adaptation loss: the loss MLP
    (`loss_sizes`, ReLU hidden layers, linear output; loss_sizes[0] = n_out + sum of the base
    network's hidden widths, any output width loss_sizes[-1]) read at every unlabeled point,
    the inner loss mean |h| ("l1") or mean h^2 ("mse") over the points and all of h's outputs
    (`adapt_loss`), `inner_steps` SGD steps at
    `inner_lr`. `loss` is the supervised target-domain loss it was meta-trained with.

    Args: weights (cat[params, loss_params], copied) or params and loss_params (copied), or
    none of them to initialise with `init` ("seed" | "torch") from `generator`."""

    kind = "DAML model (a base and a loss network)"  # what a file holding one is called
    FORMAT, RECORD = _io.DAML_MODEL_FORMAT, "DAML model"
    FIELDS = ("sizes", "loss_sizes", "activation", "loss", "adapt_loss", "inner_lr",
              "inner_steps", "params", "loss_params")
    TENSORS = ("params", "loss_params")

    def __init__(self, sizes=(1, 32, 32, 1), loss_sizes=None, activation: str = "relu", *,
                 params: Optional[torch.Tensor] = None,
                 loss_params: Optional[torch.Tensor] = None,
                 weights: Optional[torch.Tensor] = None, loss: str = "l1",
                 adapt_loss: str = "l1", inner_lr: float = 0.03, inner_steps: int = 5,
                 init: str = "seed", generator: Optional[torch.Generator] = None,
                 dtype: torch.dtype = torch.float32, device=None,
                 info: Optional[Dict[str, Any]] = None):
        super().__init__()
        if loss_sizes is None:
            loss_sizes = default_loss_sizes(_checks.check_sizes(sizes))
        self.sizes, self.loss_sizes = _checks.check_daml_sizes(sizes, loss_sizes)
        self.activation = _checks.check_choice("activation", activation, _checks.ACTIVATIONS)
        self.loss = _checks.check_choice("loss", loss, _checks.LOSSES)
        self.adapt_loss = _checks.check_choice("adapt_loss", adapt_loss, _checks.ADAPT_LOSSES)
        self.inner_lr = _checks.check_finite("inner_lr", inner_lr)
        self.inner_steps = _checks.check_int("inner_steps", inner_steps, 1)
        self.info = _io.plain("info", dict(info or {}))
        P, P_loss = num_params(self.sizes), num_params(self.loss_sizes)
        device = None if device is None else _checks.check_device("device", device)
        with torch.inference_mode(False):
            if weights is not None:
                if params is not None or loss_params is not None:
                    raise ValueError("give either weights or params and loss_params, not both")
                if not (isinstance(weights, torch.Tensor) and weights.is_floating_point()
                        and weights.dim() == 1 and weights.shape[0] == P + P_loss):
                    got = (f"{weights.dtype} {list(weights.shape)}"
                           if isinstance(weights, torch.Tensor) else type(weights).__name__)
                    raise ValueError(f"weights must be a floating-point [P + P_loss] = "
                                     f"[{P} + {P_loss}] tensor (cat[params, loss_params]), "
                                     f"got {got}")
                w = weights.detach().clone()
            elif params is not None or loss_params is not None:
                if params is None or loss_params is None:
                    raise ValueError("params and loss_params go together (the base network's "
                                     "weights and the loss network's)")
                _checks.check_params(params, self.sizes)
                _checks.check_flat("loss_params", loss_params, self.loss_sizes, "loss_sizes",
                                  params.dtype, params.device)
                w = torch.cat([params.detach(), loss_params.detach()])
            else:
                if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
                    raise TypeError(f"dtype must be a floating-point dtype, got {dtype!r}")
                w = init_weights(self.sizes, self.loss_sizes, init=init, generator=generator,
                                 dtype=dtype, device=device)
            if not torch.isfinite(w).all():
                raise ValueError("the weights hold non-finite values (NaN or infinite)")
            self.weights = nn.Parameter(w.contiguous())
        self._split = P

    # ---- the two networks -----------------------------------------------------------------

    @property
    def params(self) -> torch.Tensor:
        """The base network's flat weights [P] (a view of `weights`)."""
        return self.weights[:self._split]

    @property
    def loss_params(self) -> torch.Tensor:
        """The adaptation-loss network's flat weights [P_loss] (a view of `weights`)."""
        return self.weights[self._split:]

    def base(self) -> MetaMLP:
        """The unadapted base network as a MetaMLP (a copy)."""
        return self._metamlp(self.params.detach())

    def _metamlp(self, params: torch.Tensor) -> MetaMLP:
        return MetaMLP(self.sizes, self.activation, params=params, loss=self.loss,
                       inner_lr=self.inner_lr, inner_steps=self.inner_steps,
                       info=dict(self.info, adapted_by="daml"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The unadapted base network: x [..., n_in] -> [..., n_out]."""
        return F.mlp_forward(self.params, x, sizes=self.sizes, activation=self.activation)

    def adapt(self, x_source: torch.Tensor, *, steps: Optional[int] = None,
              inner_lr: Optional[float] = None, per_step: bool = False,
              backend: str = "auto") -> MetaMLP:
        """Test-time adaptation from unlabeled inputs alone: `steps` (default: the training
        setting) SGD steps of the base network on the learned loss over x_source, returning
        the adapted base network (a MetaMLP; detached from this model).

        x_source: [K, n_in] (one task, the same inputs at every step) -> a MetaMLP to call
        on x [N, n_in]; [T, K, n_in] (T tasks) or [T, steps, K, n_in] (T tasks, a batch per
        step, as the seed's experiment draws a fresh input at each step) -> a MetaMLP holding
        T adapted parameter sets, called on x [T, N, n_in]. per_step=True reads a 3-D x_source
        as [steps, K, n_in]: one task with a batch per step (-> a single-task MetaMLP). With
        batches for more steps than `steps`, the first `steps` are used."""
        if not isinstance(x_source, torch.Tensor):
            raise TypeError(f"x_source must be a torch.Tensor, got {type(x_source).__name__}")
        if per_step not in (True, False):
            raise TypeError(f"per_step must be True or False, got {per_step!r}")
        dims = (3,) if per_step else (2, 3, 4)
        if x_source.dim() not in dims:
            want = ("[steps, K, n_in] (per_step=True: one task, a batch per step)" if per_step
                    else "[K, n_in], [T, K, n_in] or [T, steps, K, n_in]")
            raise ValueError(f"x_source must be {want}, got shape {list(x_source.shape)}")
        single = per_step or x_source.dim() == 2
        xs = x_source.unsqueeze(0) if single else x_source
        steps = self.inner_steps if steps is None else _checks.check_int("steps", steps, 1)
        rate = self.inner_lr if inner_lr is None else _checks.check_finite("inner_lr", inner_lr)
        if xs.dim() == 4 and xs.shape[1] > steps:  # batches for more steps: the first ones
            xs = xs[:, :steps]
        with torch.no_grad():
            adapted = _daml.daml_adapt(self.params.detach(), self.loss_params.detach(), xs,
                                       sizes=self.sizes, loss_sizes=self.loss_sizes,
                                       inner_lr=rate, steps=steps, activation=self.activation,
                                       adapt_loss=self.adapt_loss, backend=backend)
        return self._metamlp(adapted[0] if single else adapted)

    # ---- files ------------------------------------------------------------------------------

    def to_dict(self) -> Dict[str, Any]:
        """The model as plain tensors and values (what `save` writes)."""
        w = self.weights.detach().cpu()
        return dict(format=self.FORMAT, format_version=self.FORMAT_VERSION,
                    pymaml_version=__version__, sizes=list(self.sizes),
                    loss_sizes=list(self.loss_sizes), activation=self.activation,
                    loss=self.loss, adapt_loss=self.adapt_loss, inner_lr=self.inner_lr,
                    inner_steps=self.inner_steps, info=dict(self.info),
                    params=w[:self._split].clone(), loss_params=w[self._split:].clone())

    @classmethod
    def _from_record(cls, d, to_device) -> "DAMLModel":
        return cls(d["sizes"], d["loss_sizes"], d["activation"], params=to_device(d["params"]),
                   loss_params=to_device(d["loss_params"]), loss=d["loss"],
                   adapt_loss=d["adapt_loss"], inner_lr=d["inner_lr"],
                   inner_steps=d["inner_steps"], info=d.get("info"))

    def extra_repr(self) -> str:
        return (f"sizes={self.sizes}, loss_sizes={self.loss_sizes}, "
                f"activation={self.activation!r}, adapt_loss={self.adapt_loss!r}, "
                f"inner_lr={self.inner_lr:g}, inner_steps={self.inner_steps}, "
                f"loss={self.loss!r}, dtype={self.weights.dtype}")

