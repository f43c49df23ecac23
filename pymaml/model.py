"""MetaMLP: a meta-learned MLP and its test-time adaptation, a thin object over the
functional API. It holds the flat parameters, the architecture and the adaptation settings it
was meta-trained with (loss, inner learning rate, inner steps; learned inner rates and the
layers that adapt, when training chose them), so `model.adapt(x, y)` does what training did
to each task."""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import nn

from . import _checks
from . import _io, _paths, _rates
from . import functional as F
from . import nn as _pnn
from ._version import __version__

__all__ = ["MetaMLP"]

INITS = ("seed", "torch")


class SavedModel(nn.Module):
    """What a pymaml model is as a file (MetaMLP, DAMLModel): its `to_dict` record, written
    atomically and sealed (pymaml._io), read back by `from_dict`, which names the field that is
    missing or holds the wrong thing. A subclass names its format and fields; defining it
    registers its reader, so pymaml.load reads its files."""

    FORMAT: str  # the record's format tag
    FORMAT_VERSION = 1  # the newest record this version reads
    RECORD = "model"  # what the record is called in messages
    FIELDS = ()  # the fields every record has
    TENSORS = ()  # the fields that must be tensors; OPTIONAL_TENSORS: tensors or None
    OPTIONAL_TENSORS = ()
    HELD_WITH = ()  # (field, setting): the field every record whose setting is set holds

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "FORMAT" in cls.__dict__:  # the format's own class (not a user's subclass of it)
            _io.register_reader(cls.FORMAT, cls._read)

    @classmethod
    def _read(cls, path, record, device):
        try:
            return cls.from_dict(record, device=device)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None

    @classmethod
    def from_dict(cls, d: Dict[str, Any], *, device=None):
        """The model of a record written by to_dict; ValueError naming the field that is
        missing or holds what such a model cannot have."""
        name = f"the {cls.RECORD} record"
        if not isinstance(d, dict):
            raise ValueError(f"{name} is a {type(d).__name__}, not a dict")
        for field in cls.FIELDS:
            if field not in d:
                raise ValueError(f"field {field!r} of {name} is missing")
        for field, setting in cls.HELD_WITH:
            if d.get(setting) is not None and d.get(field) is None:
                raise ValueError(f"field {field!r} of {name} is missing (a model with "
                                 f"{setting}={d[setting]!r} holds it)")
        for field, want, kind in ([(f, torch.Tensor, "tensor") for f in cls.TENSORS]
                                  + [(f, (torch.Tensor, type(None)), "tensor")
                                     for f in cls.OPTIONAL_TENSORS]
                                  + [("info", (dict, type(None)), "dict")]):
            if field in d and not isinstance(d[field], want):
                raise ValueError(f"field {field!r} of {name} is a {type(d[field]).__name__}, "
                                 f"not a {kind}")
        version = d.get("format_version", 1)
        if not isinstance(version, int) or version > cls.FORMAT_VERSION:
            raise ValueError(f"field 'format_version' of {name} is {version!r}: written by a "
                             f"newer pymaml (this is {__version__}, which reads up to "
                             f"{cls.FORMAT_VERSION})")
        try:  # the argument checks name the field
            return cls._from_record(d, lambda t: None if t is None else t.to(device))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{name} holds an invalid value: {exc}") from None

    def save(self, path, *, overwrite: bool = False) -> None:
        """Writes the model atomically with torch.save: plain tensors and metadata only, so
        torch.load(path, weights_only=True) reads it. A model file at `path` is replaced; any
        other file (a training checkpoint, a file not pymaml's) is not, unless overwrite=True
        (FileExistsError naming it)."""
        path = _io.fspath(path)
        _paths.check_replaceable(path, "model", f"{type(self).__name__}.save", overwrite)
        _io.atomic_save(self.to_dict(), path)

    @classmethod
    def load(cls, path, *, device=None):
        """A model saved by `save`, or the model inside a training checkpoint (whose fields
        are all checked: a damaged checkpoint is refused, not half used)."""
        device = _checks.check_device("device", device) if device is not None else None
        return _io.load_model(path, device=device, want=cls)


class MetaMLP(SavedModel):
    """An MLP with layer sizes [n_in, hidden..., n_out], one activation between layers and a
    linear output, stored as one flat parameter tensor `params` [P] (pymaml's layout).

    Args:
        sizes: layer widths, e.g. [1, 40, 40, 1].
        activation: "relu" or "tanh".
        params: initial parameters [P] (copied); or None to initialise with `init`.
        loss, inner_lr, inner_steps: how `adapt` fits a task (the meta-training settings).
        learn_inner_lr: None, or the mode of learned inner rates ("per-step",
            "per-parameter", "per-layer-step", "per-parameter-step": pymaml.train's
            argument): the model then holds them in `learned_lr`, an nn.Parameter of the
            mode's shape ([steps, 1], [P], [steps, 2 * layers], [steps, P]), which `adapt`
            uses instead of inner_lr (inner_lr is where they started).
        learned_lr: the learned rates (copied); default: every one inner_lr.
        adapt_layers: None (every layer adapts) or the linear layers that do ([-1]: the head).
        init: "torch" (nn.Linear's default) or "seed" (the same weights, zero biases).
        info: plain metadata saved with the model (the trainer records the task, algorithm...).

    A model adapted to several tasks at once holds per-task parameters [T, P] and is called
    with x [T, N, n_in].
    """

    kind = "MAML model (a MetaMLP)"  # what a file holding one is called in messages
    FORMAT = _io.MODEL_FORMAT
    FORMAT_VERSION = 2  # 2: learned rates, frozen layers
    FIELDS = ("sizes", "activation", "loss", "inner_lr", "inner_steps", "params")
    TENSORS = ("params",)
    OPTIONAL_TENSORS = ("learned_lr",)
    HELD_WITH = (("learned_lr", "learn_inner_lr"),)  # the rates it learned, never re-made

    def __init__(self, sizes, activation: str = "relu", *, params: Optional[torch.Tensor] = None,
                 loss: str = "mse", inner_lr: float = 0.01, inner_steps: int = 1,
                 init: str = "torch", generator: Optional[torch.Generator] = None,
                 dtype: torch.dtype = torch.float32, device=None,
                 info: Optional[Dict[str, Any]] = None, learn_inner_lr: Optional[str] = None,
                 learned_lr: Optional[torch.Tensor] = None, adapt_layers=None):
        super().__init__()
        self.sizes = _checks.check_sizes(sizes)
        self.activation = _checks.check_choice("activation", activation, _checks.ACTIVATIONS)
        self.loss = _checks.check_choice("loss", loss, _checks.LOSSES)
        self.inner_lr = _checks.check_finite("inner_lr", inner_lr)
        self.inner_steps = _checks.check_int("inner_steps", inner_steps, 0)
        self.info = _io.plain("info", dict(info or {}))
        self.learn_inner_lr = _rates.check_mode("learn_inner_lr", learn_inner_lr)
        layers = _rates.check_layers("adapt_layers", adapt_layers, len(self.sizes) - 1)
        self.adapt_layers = None if layers is None else list(layers)
        if learned_lr is not None and learn_inner_lr is None:
            raise ValueError("learned_lr needs learn_inner_lr, the mode its shape follows "
                             f"({', '.join(_rates.MODES)})")
        device = None if device is None else _checks.check_device("device", device)
        # Normal tensors even when made under torch.inference_mode (say, by adapt there):
        # inference tensors never record autograd, and the model may be trained later.
        with torch.inference_mode(False):
            if params is None:
                _checks.check_choice("init", init, INITS)
                params = F.init_params(self.sizes, generator=generator, dtype=dtype,
                                       device=device, zero_bias=init == "seed")
            else:
                _checks.check_params(params, self.sizes, allow_batched=True)
                params = params.detach().clone()
            self.params = nn.Parameter(params, requires_grad=params.dim() == 1)
            self.learned_lr = self._learned(learned_lr)

    def _learned(self, rates: Optional[torch.Tensor]) -> Optional[nn.Parameter]:
        """The learned rates as a Parameter beside params (same dtype and device), or None."""
        if self.learn_inner_lr is None:
            return None
        p = self.params
        if rates is None:
            rates = _rates.initial(self.learn_inner_lr, self.sizes, self.inner_steps,
                                   self.inner_lr, dtype=p.dtype, device=p.device)
        _rates.check_stored("learned_lr", rates, self.learn_inner_lr, self.sizes,
                            self.inner_steps)
        rates = rates.detach().to(dtype=p.dtype, device=p.device).clone()
        return nn.Parameter(rates, requires_grad=p.dim() == 1)

    def rates(self, steps: Optional[int] = None):
        """The inner rate(s) `adapt` uses for `steps` steps (default: the training setting):
        inner_lr, or the learned rates as pymaml.functional takes them (broadcastable to
        [steps, P]; beyond the steps they were learned for, the last step's rates)."""
        steps = self.inner_steps if steps is None else steps
        if self.learned_lr is None or type(steps) is not int or steps <= 0:
            return self.inner_lr  # (a bad `steps`: pymaml.functional.adapt words the error)
        return _rates.for_steps(self.learned_lr, self.learn_inner_lr, self.sizes, steps)

    # ---- use ----------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Predictions: x [..., n_in] -> [..., n_out] (x [T, N, n_in] for an adapted batch)."""
        return F.mlp_forward(self.params, x, sizes=self.sizes, activation=self.activation)

    @property
    def num_tasks(self) -> Optional[int]:
        """T for a model adapted to T tasks at once ([T, P] parameters), else None."""
        return self.params.shape[0] if self.params.dim() == 2 else None

    def adapt(self, x: torch.Tensor, y: torch.Tensor, *, steps: Optional[int] = None,
              inner_lr=None, backend: str = "auto") -> "MetaMLP":
        """Test-time adaptation: a new model after `steps` SGD steps (default: the training
        setting) on the examples x [K, n_in], y [K, n_out]; or, for x [T, K, n_in], a model
        holding T adapted parameter sets. With loss="cross_entropy", y may be integer class
        indices: [K] (or [T, K]). The rate is the learned rates if the model has
        them (`rates`), else inner_lr; `inner_lr` (a number, or a tensor broadcastable to
        [steps, P]) replaces it. Only the adapt_layers move. The result is detached from this
        model; for gradients through adaptation use pymaml.functional.adapt."""
        if self.num_tasks is not None:
            raise ValueError("this model is already adapted to several tasks; adapt the model "
                             "it came from")
        for name, t in (("x", x), ("y", y)):
            if not isinstance(t, torch.Tensor) or t.dim() not in (2, 3):
                if t is y and self._class_indices(y) and y.dim() in (1, 2):
                    continue
                got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name} must be [K, features] or [T, K, features], got {got}")
        if x.dim() != y.dim() + self._class_indices(y):
            labels = " (or class indices [K] / [T, K])" if self.loss == "cross_entropy" else ""
            raise ValueError(f"x and y must both be [K, features] or both [T, K, features]"
                             f"{labels}, got {list(x.shape)} and {list(y.shape)}")
        single = x.dim() == 2
        xs, ys = (x.unsqueeze(0), y.unsqueeze(0)) if single else (x, y)
        steps = self.inner_steps if steps is None else steps
        with torch.no_grad():
            rate = self.rates(steps) if inner_lr is None else inner_lr
            adapted = F.adapt(self.params.detach(), xs, ys, sizes=self.sizes, inner_lr=rate,
                              steps=steps, activation=self.activation, loss=self.loss,
                              adapt_layers=self.adapt_layers, backend=backend)
        return self._like(adapted[0] if single else adapted)

    def _class_indices(self, y) -> bool:
        # Integer class labels, one per point (no features dimension): cross-entropy's.
        return (self.loss == "cross_entropy" and isinstance(y, torch.Tensor)
                and _checks.is_integer(y))

    def _like(self, params: torch.Tensor) -> "MetaMLP":
        return MetaMLP(self.sizes, self.activation, params=params, loss=self.loss,
                       inner_lr=self.inner_lr, inner_steps=self.inner_steps, info=self.info,
                       learn_inner_lr=self.learn_inner_lr, learned_lr=self.learned_lr,
                       adapt_layers=self.adapt_layers)

    # ---- conversion -----------------------------------------------------------------------------

    def to_sequential(self) -> nn.Sequential:
        """An nn.Sequential of Linear and activation layers holding a copy of the parameters."""
        if self.num_tasks is not None:
            raise ValueError("a model adapted to several tasks has no single nn.Sequential")
        return _pnn.to_sequential(self.params.detach(), self.sizes, self.activation)

    @classmethod
    def from_sequential(cls, model: nn.Sequential, **kwargs) -> "MetaMLP":
        """A MetaMLP with a copy of an nn.Sequential's weights (Linear and ReLU/Tanh layers);
        kwargs are MetaMLP's adaptation settings (loss, inner_lr, inner_steps, info)."""
        params, sizes, activation = _pnn.from_sequential(model)
        return cls(sizes, activation, params=params, **kwargs)

    # ---- files ------------------------------------------------------------------------------------

    def to_dict(self) -> Dict[str, Any]:
        """The model as plain tensors and values (what `save` writes). A model with learned
        rates or frozen layers is format_version 2, with the fields learn_inner_lr,
        learned_lr and adapt_layers; others stay version 1, as earlier versions wrote them."""
        d = dict(format=_io.MODEL_FORMAT, format_version=1, pymaml_version=__version__,
                 sizes=list(self.sizes), activation=self.activation, loss=self.loss,
                 inner_lr=self.inner_lr, inner_steps=self.inner_steps, info=dict(self.info),
                 params=self.params.detach().cpu().clone())
        if self.learn_inner_lr is not None or self.adapt_layers is not None:
            learned = self.learned_lr
            d.update(format_version=2, learn_inner_lr=self.learn_inner_lr,
                     learned_lr=None if learned is None else learned.detach().cpu().clone(),
                     adapt_layers=self.adapt_layers)
        return d

    @classmethod
    def _from_record(cls, d, to_device) -> "MetaMLP":
        # version 1 records have none of the last three fields: their defaults
        return cls(d["sizes"], d["activation"], params=to_device(d["params"]), loss=d["loss"],
                   inner_lr=d["inner_lr"], inner_steps=d["inner_steps"], info=d.get("info"),
                   learn_inner_lr=d.get("learn_inner_lr"),
                   learned_lr=to_device(d.get("learned_lr")), adapt_layers=d.get("adapt_layers"))

    def extra_repr(self) -> str:
        batch = f", tasks={self.num_tasks}" if self.num_tasks is not None else ""
        more = ""
        if self.learn_inner_lr is not None:
            more += f", learn_inner_lr={self.learn_inner_lr!r}"
        if self.adapt_layers is not None:
            more += f", adapt_layers={self.adapt_layers}"
        return (f"sizes={self.sizes}, activation={self.activation!r}, loss={self.loss!r}, "
                f"inner_lr={self.inner_lr:g}, inner_steps={self.inner_steps}{more}, "
                f"dtype={self.params.dtype}{batch}")

