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

from . import _checks
from . import _io
from . import _rates
from . import distributed as _distributed
from . import functional as F
from . import tasks as _tasks
from .model import INITS, MetaMLP

# metasgd: MAML learning one inner rate per parameter (learn_inner_lr="per-parameter");
# anil: MAML adapting the head only (adapt_layers=[-1]).
# daml: a learned inner loss on unlabeled inputs (pymaml.daml_train: a loop of its own).
ALGORITHMS = ("maml", "fomaml", "reptile", "metasgd", "anil", "daml")
OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}
DTYPES = {"float32": torch.float32, "float64": torch.float64}


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
    inner_batch: Optional[int] = None  # points per inner step (tasks.per_step_batches)
    learn_inner_lr: Optional[str] = None  # the learned rates' mode (_rates.MODES), resolved
    adapt_layers: Optional[Tuple[int, ...]] = None  # sorted non-negative indices; None: all

    @property
    def first_order(self) -> bool:
        return self.algorithm == "fomaml"

    @property
    def plain(self) -> bool:
        """Whether the inner loop is plain MAML's: one fixed rate, every layer adapting
        (what the chunked fast path and the raw ops serve)."""
        return self.learn_inner_lr is None and self.adapt_layers is None

    def to_dict(self) -> Dict[str, Any]:
        """The settings as plain values (what a checkpoint stores)."""
        layers = None if self.adapt_layers is None else list(self.adapt_layers)
        return dict(dataclasses.asdict(self), sizes=list(self.sizes), adapt_layers=layers)

    def differences(self, saved: Dict[str, Any]) -> List[str]:
        """The settings (all but iterations, which may grow, and processes) in which a
        checkpoint's config dict `saved` differs from this run's, one line each."""
        return differences(self.to_dict(), saved, _RUN_KEYS)


def differences(mine: Dict[str, Any], saved: Dict[str, Any], keys) -> List[str]:
    """One line for each of `keys` in which a checkpoint's settings `saved` differ from this
    run's `mine` (lists and tuples alike)."""
    return [f"{k}={saved.get(k)!r} (this call: {mine[k]!r})" for k in keys
            if _lists(saved.get(k)) != _lists(mine[k])]


_RUN_KEYS = tuple(f.name for f in dataclasses.fields(RunConfig)
                  if f.name not in ("iterations", "processes"))


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
    family: _tasks.TaskFamily
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


def from_train_arguments(task, *, algorithm, sizes, activation, loss, inner_steps, inner_lr,
                         meta_batch_size, iterations, optimizer, outer_lr, optimizer_kwargs,
                         shots, queries, init, backend, device, dtype, seed, log_every,
                         progress, checkpoint, checkpoint_every, resume, overwrite, distributed,
                         distributed_timeout, inner_batch, learn_inner_lr,
                         adapt_layers) -> Tuple[RunConfig, RunOptions]:
    """pymaml.train's arguments (see its docstring), checked in the order of its signature."""
    _checks.check_choice("algorithm", algorithm, ALGORITHMS)
    sizes = tuple(_checks.check_sizes(sizes))
    _checks.check_choice("activation", activation, _checks.ACTIVATIONS)
    _checks.check_choice("loss", loss, _checks.LOSSES)
    inner_steps = _checks.check_int("inner_steps", inner_steps, 0)
    inner_lr = _checks.check_finite("inner_lr", inner_lr)
    meta_batch_size = _checks.check_int("meta_batch_size", meta_batch_size, 1)
    iterations = _checks.check_int("iterations", iterations, 0)
    optimizer_class, optimizer_name = _optimizer_class(optimizer)
    outer_lr = _positive_real("outer_lr", outer_lr)
    optimizer_kwargs = _optimizer_kwargs(optimizer_kwargs)
    check_optimizer_kwargs(optimizer_class, optimizer_kwargs, outer_lr)
    family = _tasks.checked(_tasks.get_family(task, shots=shots, queries=queries))
    for what, n, want in (("input", family.n_in, sizes[0]), ("output", family.n_out, sizes[-1])):
        if n is not None and n != want:
            raise ValueError(f"task {family.name!r} has {n} {what} feature(s) but sizes is "
                             f"{list(sizes)}")
    if dtype not in DTYPES.values():
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}")
    device = _checks.check_device("device", device)
    seed = _checks.check_seed(seed)
    if log_every is not None:
        log_every = _checks.check_int("log_every", log_every, 0)
    checkpoint_every = _checks.check_int("checkpoint_every", checkpoint_every, 1)
    init_name = _init_name(init)
    if distributed not in (None, True, False):
        raise TypeError(f"distributed must be None (auto), True or False, got {distributed!r}")
    distributed_timeout = _positive_real("distributed_timeout", distributed_timeout)
    checkpoint, resume_from = _checkpoint_paths(checkpoint, resume)
    if inner_batch is not None:
        inner_batch = _checks.check_int("inner_batch", inner_batch, 1)
        if inner_steps < 1:
            raise ValueError("inner_batch gives each inner step a batch of its own: it needs "
                             f"inner_steps >= 1, got {inner_steps}")
        shots, queries = getattr(family, "shots", None), getattr(family, "queries", None)
        points = shots if algorithm != "reptile" else shots and queries and shots + queries
        if points and inner_batch > points:  # a family of unknown size: at its first draw
            raise ValueError(f"inner_batch={inner_batch} is more than the {points} points a "
                             f"task's inner loop has")
    learn_inner_lr, adapt_layers = _inner_loop_options(algorithm, learn_inner_lr, adapt_layers,
                                                       sizes, inner_steps)

    config = RunConfig(
        task=family.name, algorithm=algorithm, sizes=sizes, activation=activation, loss=loss,
        inner_steps=inner_steps, inner_lr=inner_lr, meta_batch_size=meta_batch_size,
        optimizer=optimizer_name, outer_lr=outer_lr, optimizer_kwargs=optimizer_kwargs,
        shots=getattr(family, "shots", None), queries=getattr(family, "queries", None),
        init=init_name, dtype=str(dtype).replace("torch.", ""), seed=seed,
        iterations=iterations, inner_batch=inner_batch, learn_inner_lr=learn_inner_lr,
        adapt_layers=adapt_layers)
    options = RunOptions(
        family=family, optimizer_class=optimizer_class, init=init, dtype=dtype,
        device=_distributed.local_device(device), backend=backend, log_every=log_every,
        progress=progress, checkpoint=checkpoint, checkpoint_every=checkpoint_every,
        resume_from=resume_from, overwrite=overwrite, distributed=distributed,
        distributed_timeout=distributed_timeout)
    return config, options


def _inner_loop_options(algorithm, learn_inner_lr, adapt_layers, sizes,
                        inner_steps) -> Tuple[Optional[str], Optional[Tuple[int, ...]]]:
    """(the learned rates' mode, the adapted layers) the run uses: the arguments, checked,
    with what "metasgd" (per-parameter rates) and "anil" (the head only) stand for."""
    _rates.check_mode("learn_inner_lr", learn_inner_lr)
    depth = len(sizes) - 1
    adapt_layers = _rates.check_layers("adapt_layers", adapt_layers, depth)
    if algorithm == "metasgd":
        if learn_inner_lr not in (None, "per-parameter"):
            raise ValueError(f"algorithm='metasgd' learns one inner rate per parameter; "
                             f"learn_inner_lr={learn_inner_lr!r} asks for another kind: use "
                             f"algorithm='maml' with it")
        learn_inner_lr = "per-parameter"
    if algorithm == "anil":
        if adapt_layers not in (None, (depth - 1,)):
            raise ValueError(f"algorithm='anil' adapts the head only; adapt_layers="
                             f"{list(adapt_layers)} asks for other layers: use algorithm='maml' "
                             "with them")
        adapt_layers = (depth - 1,)
    if learn_inner_lr is not None:
        if algorithm == "reptile":
            raise ValueError("learn_inner_lr: Reptile cannot learn inner rates (its outer "
                             "update is no gradient of the rates); use algorithm='maml', "
                             "'fomaml' or 'metasgd'")
        if inner_steps < 1:
            raise ValueError(f"learn_inner_lr needs inner_steps >= 1 (with no inner step there "
                             f"is no rate to learn), got {inner_steps}")
    return learn_inner_lr, adapt_layers


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
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{name} {kwargs}: {cls} refuses them: {text}") from None


def _init_name(init) -> str:
    """The name a checkpoint records for `init`: "seed", "torch" or "given" (weights)."""
    if isinstance(init, str):
        return _checks.check_choice("init", init, INITS)
    if isinstance(init, (MetaMLP, torch.Tensor)):
        weights = init.params if isinstance(init, MetaMLP) else init
        if weights.is_floating_point() and not torch.isfinite(weights.detach()).all():
            raise ValueError("init holds non-finite weights (NaN or infinite): training from "
                             "them would stop at the first iteration")
        return "given"
    raise TypeError(f"init must be 'seed', 'torch', a MetaMLP or a [P] tensor, got "
                    f"{type(init).__name__}")


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
