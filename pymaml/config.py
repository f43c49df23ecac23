"""A training run's configuration, checked once.

RunConfig holds the settings that define a run: plain values only, so that it is what a
checkpoint stores and what a resume compares. RunOptions holds the rest of what pymaml.train
was asked for: the objects the settings name (the task family, the optimizer class, the
starting weights), and the choices a resumed run may change (backend, device, logging,
checkpointing, processes). `from_train_arguments` turns train()'s keyword arguments into the
two, raising one clear error for the first bad argument."""

from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
import os
from typing import Any, Dict, List, Optional, Tuple

import torch

from . import _checks, _io
from . import algorithms as _algorithms
from . import tasks as _tasks
from . import distributed as _distributed

ALGORITHMS = _algorithms.NAMES  # the registry's (pymaml.algorithms)
OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}
DTYPES = {"float32": torch.float32, "float64": torch.float64}
DEFAULTS = _tasks.SEED_DEFAULTS  # train()'s for the arguments it leaves None (the seed's)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The settings that define a run (pymaml.train's arguments of the same names; `task`,
    `optimizer` and `init` by name, `dtype` as "float32" / "float64"). Resuming a checkpoint
    whose settings differ in any field but `iterations` (which may grow) is an error."""
    task: str
    algorithm: str
    sizes: Tuple[int, ...]
    activation: str
    loss: str
    inner_steps: int
    inner_lr: float
    meta_batch_size: int
    optimizer: str
    outer_lr: float
    optimizer_kwargs: Dict[str, Any]
    shots: Optional[int]
    queries: Optional[int]
    init: str
    dtype: str
    seed: int
    iterations: int
    processes: int = 1  # of a distributed run: a checkpoint resumes under as many
    # The algorithms' own settings (each entry's own_fields; None where they do not apply).
    inner_batch: Optional[int] = None  # points per inner step (tasks.per_step_batches)
    learn_inner_lr: Optional[str] = None  # the learned rates' mode (_rates.MODES), resolved
    adapt_layers: Optional[Tuple[int, ...]] = None  # sorted non-negative indices; None: all
    loss_sizes: Optional[Tuple[int, ...]] = None  # DAML's loss network
    adapt_loss: Optional[str] = None              # DAML's inner loss on its outputs

    @property
    def entry(self):
        """The run's algorithm (pymaml.algorithms)."""
        return _algorithms.get(self.algorithm)

    @property
    def plain(self) -> bool:
        """Whether the inner loop is plain MAML's: one fixed rate, every layer adapting
        (what the chunked fast path and the raw ops serve)."""
        return self.learn_inner_lr is None and self.adapt_layers is None

    def to_dict(self) -> Dict[str, Any]:
        """The settings as plain values (what a checkpoint stores): the common ones and the
        algorithm's own, tuples as lists."""
        keep = _COMMON + self.entry.own_fields
        d = {k: v for k, v in dataclasses.asdict(self).items() if k in keep}
        for k in ("sizes", "adapt_layers", "loss_sizes"):
            if d.get(k) is not None:
                d[k] = list(d[k])
        return d

    def differences(self, saved: Dict[str, Any]) -> List[str]:
        """The settings (all but iterations, which may grow, and processes) in which a
        checkpoint's config dict `saved` differs from this run's, one line each."""
        return [f"{k}={saved.get(k)!r} (this call: {v!r})" for k, v in self.to_dict().items()
                if k not in ("iterations", "processes") and _lists(saved.get(k)) != _lists(v)]


_OWN = {name for entry in _algorithms.REGISTRY.values() for name in entry.own_fields}
_COMMON = tuple(f.name for f in dataclasses.fields(RunConfig) if f.name not in _OWN)


def _lists(value):
    """`value` with its tuples as lists, for comparison (a file may hold either)."""
    if isinstance(value, (list, tuple)):
        return [_lists(v) for v in value]
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    return value


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """The rest of a train() call, checked: what the settings name, and what may change
    between a run and its resume."""
    family: Any
    optimizer_class: type
    init: Any                 # "seed" | "torch" | MetaMLP | [P] tensor
    dtype: torch.dtype
    device: torch.device
    backend: str              # as asked: "auto" | "fused" | "reference"
    log_every: Optional[int]
    progress: Optional[bool]
    checkpoint: Optional[str]
    checkpoint_every: int
    resume_from: Optional[str]
    overwrite: bool
    distributed: Optional[bool]
    distributed_timeout: float
    iterations_given: bool  # False: a resumed run goes on to its checkpoint's iterations


def from_train_arguments(args: Dict[str, Any]) -> Tuple[RunConfig, RunOptions]:
    """pymaml.train's arguments (a dict by name; see its docstring), checked: first the
    settings every algorithm has, then the run's algorithm's own (pymaml.algorithms)."""
    entry = _algorithms.get(args["algorithm"])
    family = entry.family(args["task"], args["shots"], args["queries"], args.get("data"),
                          args.get("ways"))
    defaults = family.run_defaults()  # every family (a user's wrapped) has them
    iterations_given = args["iterations"] is not None
    args = {k: defaults[k] if v is None and k in defaults else v for k, v in args.items()}
    sizes = tuple(_checks.check_sizes(args["sizes"]))
    activation = _checks.check_choice("activation", args["activation"], _checks.ACTIVATIONS)
    loss = _checks.check_choice("loss", args["loss"], _checks.LOSSES)
    if loss == "cross_entropy" and sizes[-1] < 2:
        raise ValueError(f"loss='cross_entropy' classifies into sizes[-1] classes, one output "
                         f"each, and needs at least 2; got sizes {list(sizes)}")
    inner_steps = _checks.check_int("inner_steps", args["inner_steps"], 0)
    inner_lr = _checks.check_finite("inner_lr", args["inner_lr"])
    meta_batch_size = _checks.check_int("meta_batch_size", args["meta_batch_size"], 1)
    iterations = _checks.check_int("iterations", args["iterations"], 0)
    optimizer_class, optimizer_name = _optimizer_class(args["optimizer"])
    outer_lr = _positive_real("outer_lr", args["outer_lr"])
    optimizer_kwargs = _optimizer_kwargs(args["optimizer_kwargs"])
    check_optimizer_kwargs(optimizer_class, optimizer_kwargs, outer_lr)
    for what, n, want in (("input", family.n_in, sizes[0]), ("output", family.n_out, sizes[-1])):
        if n is not None and n != want:
            raise ValueError(f"task {family.name!r} has {n} {what} feature(s) but sizes is "
                             f"{list(sizes)}")
    own = entry.settings(args, sizes, inner_steps, family)
    init = entry.init_name(args["init"])
    if args["dtype"] not in DTYPES.values():
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {args['dtype']!r}")
    config = RunConfig(
        task=family.name, algorithm=entry.name, sizes=sizes, activation=activation, loss=loss,
        inner_steps=inner_steps, inner_lr=inner_lr, meta_batch_size=meta_batch_size,
        optimizer=optimizer_name, outer_lr=outer_lr, optimizer_kwargs=optimizer_kwargs,
        shots=getattr(family, "shots", None), queries=getattr(family, "queries", None),
        init=init, dtype=str(args["dtype"]).replace("torch.", ""),
        seed=_checks.check_seed(args["seed"]), iterations=iterations, **own)
    return config, _options(args, family, optimizer_class, iterations_given)


def _options(args: Dict[str, Any], family, optimizer_class, iterations_given) -> RunOptions:
    """The rest of train()'s arguments, checked."""
    device = _checks.check_device("device", args["device"])
    log_every = args["log_every"]
    if log_every is not None:
        log_every = _checks.check_int("log_every", log_every, 0)
    checkpoint_every = _checks.check_int("checkpoint_every", args["checkpoint_every"], 1)
    distributed = args["distributed"]
    if distributed not in (None, True, False):
        raise TypeError(f"distributed must be None (auto), True or False, got {distributed!r}")
    timeout = _positive_real("distributed_timeout", args["distributed_timeout"])
    _checks.check_choice("backend", args["backend"], _checks.BACKENDS)
    checkpoint, resume_from = _checkpoint_paths(args["checkpoint"], args["resume"])
    return RunOptions(
        family=family, optimizer_class=optimizer_class, init=args["init"], dtype=args["dtype"],
        device=_distributed.local_device(device), backend=args["backend"],
        log_every=log_every, progress=args["progress"], checkpoint=checkpoint,
        checkpoint_every=checkpoint_every, resume_from=resume_from,
        overwrite=bool(args["overwrite"]), distributed=distributed,
        distributed_timeout=timeout, iterations_given=iterations_given)


def _positive_real(name, value) -> float:
    if _checks.check_finite(name, value) <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def _optimizer_class(optimizer) -> Tuple[type, str]:
    """(the torch.optim class, the name a checkpoint records) for train()'s `optimizer`."""
    if isinstance(optimizer, str):
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(map(repr, OPTIMIZERS))} or a "
                             f"torch.optim.Optimizer class; got {optimizer!r}")
        return OPTIMIZERS[optimizer], optimizer
    if isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer):
        return optimizer, f"{optimizer.__module__}.{optimizer.__qualname__}"
    raise TypeError("optimizer must be 'sgd', 'adam' or a torch.optim.Optimizer class, got "
                    f"{optimizer!r}")


def _optimizer_kwargs(kwargs) -> Dict[str, Any]:
    if kwargs is not None and not isinstance(kwargs, dict):
        raise TypeError(f"optimizer_kwargs must be a dict, got {type(kwargs).__name__}")
    kwargs = _io.plain("optimizer_kwargs", dict(kwargs or {}))
    if "lr" in kwargs:
        raise ValueError("give the outer learning rate as outer_lr, not in optimizer_kwargs")
    return kwargs


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_optimizer_kwargs(optimizer_class: type, kwargs: Dict[str, Any], outer_lr: float,
                           name: str = "optimizer_kwargs") -> None:
    """Before the run: each keyword is one the optimizer takes, of the kind its default is
    (a number, a bool, a tuple of numbers), and the optimizer accepts them all; ValueError
    naming `name`, the keyword and what was expected."""
    cls = optimizer_class.__name__
    if "lr" in kwargs:
        raise ValueError(f"{name} lr={kwargs['lr']!r}: give the outer learning rate as outer_lr "
                         "(--outer-lr)")
    try:
        accepted = inspect.signature(optimizer_class.__init__).parameters
    except (TypeError, ValueError):  # no signature to read: the constructor will say
        accepted = {}
    open_ended = not accepted or any(p.kind == p.VAR_KEYWORD for p in accepted.values())
    takes = ", ".join(k for k in accepted if k not in ("self", "params", "lr"))
    for key, value in kwargs.items():
        if key not in accepted:
            if open_ended:
                continue
            raise ValueError(f"{name} {key}={value!r}: {cls} takes no argument {key!r} (it "
                             f"takes {takes})")
        default = accepted[key].default
        if _is_number(default) and not (_is_number(value) and math.isfinite(value)):
            raise ValueError(f"{name} {key}={value!r}: {key} must be a finite number for "
                             f"{cls} (default {default}), and {value!r} is not a number")
        if isinstance(default, bool) and not isinstance(value, bool):
            raise ValueError(f"{name} {key}={value!r}: {key} must be True or False for {cls}")
        if isinstance(default, tuple) and all(map(_is_number, default)) and not (
                isinstance(value, (tuple, list)) and len(value) == len(default)
                and all(_is_number(v) and math.isfinite(v) for v in value)):
            raise ValueError(f"{name} {key}={value!r}: {key} must be {len(default)} numbers "
                             f"for {cls}, such as {default}")
    try:  # the optimizer's own checks (ranges such as 0 <= momentum), on a stand-in weight
        optimizer_class([torch.zeros(1, requires_grad=True)], lr=outer_lr, **kwargs)
    except Exception as exc:  # a user's optimizer class may raise anything
        text = _io.first_line(exc)
        if not kwargs:  # then what it refuses is the learning rate
            raise ValueError(f"outer_lr {outer_lr!r}: {cls} refuses it: {text}") from None
        raise ValueError(f"{name} {kwargs}: {cls} refuses them: {text}") from None


def _checkpoint_paths(checkpoint, resume) -> Tuple[Optional[str], Optional[str]]:
    """(the checkpoint to write, the checkpoint to resume from) for train()'s arguments."""
    checkpoint = _path("checkpoint", checkpoint)
    if resume is True:
        if checkpoint is None:
            raise ValueError("resume=True needs the checkpoint path to resume from")
        return checkpoint, checkpoint
    if resume in (False, None):
        return checkpoint, None
    resume_from = _path("resume", resume)
    return checkpoint or resume_from, resume_from


def _path(name, path) -> Optional[str]:
    if path is None:
        return None
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a file path, got {type(path).__name__}")
    return os.fspath(path)
