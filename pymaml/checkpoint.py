"""Training checkpoints: what one holds (`state`: the run's settings, the iteration, the
weights, the optimizer's state_dict, the task generators' states and the loss history), where
it may be written (`Checkpoints`), the check of every field before anything is loaded
(`check`), and how a run resumes from one (`restore`), bitwise. What this promises is
docs/training.md's "Checkpoints and resume" and "Files and failures"."""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from typing import Any, Dict, List, Optional, Tuple

import torch

from . import _io, _paths
from . import algorithms as _algorithms
from ._version import __version__
from .config import OPTIMIZERS, RunConfig, _lists

# The newest this version reads. 2: learned inner rates, adapt_layers; 3: DAML's runs (which
# earlier versions wrote in a format of their own, _io.DAML_CHECKPOINT_FORMAT, still read).
FORMAT_VERSION = 3
FORMATS = (_io.CHECKPOINT_FORMAT, _io.DAML_CHECKPOINT_FORMAT)
_OVERHEAD_BYTES = 64 * 1024  # archive records, pickles and the generator state: ~10 KB measured


class Checkpoints:
    """Where a run writes its checkpoints (None: nowhere), and whether that file holds this
    run's state yet (it does once written, or when the run resumed from it), which the
    messages of a stopped run mention."""

    def __init__(self, path: Optional[str], resume_from: Optional[str]):
        self.path = path
        self.holds_this_run = (path is not None and resume_from is not None
                               and _paths.same_file(path, resume_from))
        self.iteration: Optional[int] = None  # of the last checkpoint this run wrote

    def check_writable(self, resume_from: Optional[str], overwrite: bool,
                       config: RunConfig) -> None:
        """Before the first iteration of a run that writes checkpoints: the path can be written
        (not a directory, in an existing writable directory, with room for the run's last
        checkpoint; stale temporary files of earlier runs removed), and saved training state
        is never replaced unless asked (only the run it holds may write over it, or
        overwrite=True)."""
        if resume_from is not None and not os.path.lexists(resume_from):
            raise FileNotFoundError(f"checkpoint {resume_from}: no such file, so there is no "
                                    "run to resume")
        _io.check_writable(self.path, "checkpoint")
        # (before the first save, holds_this_run says whether the run resumes this very file)
        if not self.holds_this_run and not overwrite and os.path.exists(self.path):
            _paths.check_replaceable(self.path, "training checkpoint", "this run's checkpoint",
                                     ask="overwrite=True (--overwrite)")  # a model, a user's
            raise FileExistsError(f"checkpoint {self.path} already exists: resume it (resume="
                                  "True, --resume), or pass overwrite=True (--overwrite) to "
                                  "start a new run over it, or choose another path")
        # The run's last checkpoint, about and on the high side: the weights and up to three
        # optimizer buffers of their size, 8 bytes of loss history per iteration.
        element = torch.finfo(getattr(torch, config.dtype)).bits // 8
        size = config.entry.weight_count(config) * element * 4 + 8 * config.iterations
        _io.check_space(self.path, size + _OVERHEAD_BYTES, "checkpoint")

    def save(self, state: Dict[str, Any], write: bool = True) -> None:
        """Writes `state` (when `write`: in a distributed run, rank 0 writes for all). A failed
        write leaves the previous checkpoint whole, and its message says which one is left."""
        if write:
            try:
                _io.atomic_save(state, self.path)
            except OSError as exc:
                raise _io.PathError(exc.errno, f"{exc.strerror or exc} at iteration "
                                         f"{state['iteration']}{self.kept()}") from None
        self.holds_this_run = True
        self.iteration = state["iteration"]

    def kept(self) -> str:
        """The end of a stopped run's message: which checkpoint is left to resume from."""
        if not self.holds_this_run:
            return ""
        at = f" (at iteration {self.iteration})" if self.iteration is not None else ""
        return f"; the last checkpoint, {self.path}, is kept{at}"


def state(config: RunConfig, settings: Dict[str, Any], iteration: int, model,
          optimizer: torch.optim.Optimizer, generator: torch.Generator,
          losses: List[float]) -> Dict[str, Any]:
    """A checkpoint of a run at `iteration` (its settings dict, as TrainResult.config), of
    the format_version its algorithm says (the oldest that can hold it)."""
    return dict(format=_io.CHECKPOINT_FORMAT,
                format_version=config.entry.checkpoint_version(config),
                pymaml_version=__version__, config=settings, iteration=iteration,
                model=model.to_dict(), optimizer=optimizer.state_dict(),
                generator=generator.get_state(),
                losses=torch.tensor(losses, dtype=torch.float64))


class BadCheckpoint(ValueError):
    """A checkpoint missing a field or holding a value no run writes."""


def _bad(path: str, field: str, problem: str) -> BadCheckpoint:
    return BadCheckpoint(f"checkpoint {path}: field {field!r} {problem}")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check(path: str, saved: Dict[str, Any]) -> List[torch.Tensor]:
    """Refuses (BadCheckpoint, naming the file and the field) a checkpoint `saved`, read from
    `path`, that misses a field or holds a value no pymaml run writes; returns its trained
    tensors (what its optimizer steps), detached."""
    for field in ("format_version", "config", "iteration", "model", "optimizer", "generator",
                  "losses"):
        if field not in saved:
            raise _bad(path, field, "is missing")
    version = saved["format_version"]
    if not _is_int(version) or version < 1:
        raise _bad(path, "format_version", f"is {version!r}, expected an int >= 1")
    if version > FORMAT_VERSION:
        raise _bad(path, "format_version", f"is {version}: written by a newer pymaml (this is "
                                           f"{__version__}, which reads up to {FORMAT_VERSION})")
    config = _check_config(path, saved["config"])
    iteration = saved["iteration"]
    if not _is_int(iteration) or not 0 <= iteration <= config["iterations"]:
        raise _bad(path, "iteration", f"is {iteration!r}, expected an int from 0 to the run's "
                                      f"iterations ({config['iterations']})")
    losses = saved["losses"]
    if not (isinstance(losses, torch.Tensor) and losses.dtype == torch.float64
            and losses.dim() == 1):
        raise _bad(path, "losses", "is not a float64 vector (the loss history)")
    if losses.numel() != iteration:
        raise _bad(path, "losses", f"holds {losses.numel()} losses for {iteration} iterations")
    if not torch.isfinite(losses).all():
        raise _bad(path, "losses", "holds a non-finite loss (a run stops before recording one)")
    weights = _check_model(path, saved["model"], config)
    _check_optimizer(path, saved["optimizer"], weights, config, iteration,
                     _named_class(config))
    _check_generator(path, "generator", saved["generator"])
    processes = config.get("processes", 1)
    if processes > 1:
        streams = saved.get("task_generators")
        if not isinstance(streams, (list, tuple)) or len(streams) != processes:
            raise _bad(path, "task_generators", f"must hold the task streams of the run's "
                                                f"{processes} processes")
        for rank, s in enumerate(streams):
            _check_generator(path, f"task_generators[{rank}]", s)
    return weights


# The settings _check_config tests beyond their presence: (name, test, what a run writes).
_SETTINGS = (
    ("iterations", lambda v: _is_int(v) and v >= 0, "an int >= 0"),
    ("processes", lambda v: _is_int(v) and v >= 1, "an int >= 1"),
    ("outer_lr", lambda v: _is_real(v) and 0 < v < math.inf, "a positive finite number"),
    ("optimizer_kwargs", lambda v: isinstance(v, dict), "a dict"),
    ("sizes", lambda v: isinstance(v, (list, tuple)) and len(v) >= 2
     and all(_is_int(n) and n >= 1 for n in v), "layer widths like [1, 40, 1]"),
    ("dtype", lambda v: v in ("float32", "float64"), "'float32' or 'float64'"),
)


def _check_config(path: str, config) -> Dict[str, Any]:
    if not isinstance(config, dict):
        raise _bad(path, "config", f"is a {type(config).__name__}, not the run's settings")
    for field in dataclasses.fields(RunConfig):
        # Settings with a default came later (processes, inner_batch): an older checkpoint
        # has none, and ran with the default.
        if field.name not in config and field.default is dataclasses.MISSING:
            raise _bad(path, f"config.{field.name}", "is missing")
    for name, ok, want in _SETTINGS:
        value = config.get(name, 1)  # (of these, only processes may be missing: it was 1)
        if not ok(value):
            raise _bad(path, f"config.{name}", f"is {value!r}, expected {want}")
    return config


def _check_model(path: str, record, config: Dict[str, Any]) -> List[torch.Tensor]:
    """The checkpoint's trained tensors (what its optimizer steps), after checking its model
    record against its settings."""
    try:
        entry = _algorithms.get(config["algorithm"])
    except ValueError as exc:
        raise _bad(path, "config.algorithm", f"is not an algorithm of this pymaml ({exc})"
                   ) from None
    try:
        model = entry.model_class.from_dict(record)
    except ValueError as exc:
        raise _bad(path, "model", f"is not a valid model: {exc}") from None
    weights = [w.detach() for w in entry.weights(model)]
    if model.sizes != list(config["sizes"]) or weights[0].dim() != 1:
        raise _bad(path, "model", f"has sizes {model.sizes} and {list(weights[0].shape)} "
                                  f"weights; the run's settings say sizes "
                                  f"{list(config['sizes'])}")
    for field in entry.model_fields:
        if _lists(getattr(model, field)) != _lists(config.get(field)):
            raise _bad(path, f"model.{field}", f"is {getattr(model, field)!r}; the run's settings "
                                               f"say {config.get(field)!r}")
    if str(weights[0].dtype).replace("torch.", "") != config["dtype"]:
        raise _bad(path, "model.params", f"are {weights[0].dtype}; the run's settings say "
                                         f"{config['dtype']}")
    if not torch.isfinite(weights[0]).all():
        raise _bad(path, "model.params", "hold non-finite weights (a run stops before "
                                         "writing any)")
    # (the learned rates' shape and finiteness: MetaMLP.from_dict checked them)
    return weights


# How an optimizer step runs, not what it computes: a resumed run keeps the checkpoint's
# (fused=None in 0.1.0's checkpoints: tests/test_old_checkpoints.py), unless the run's
# settings name one (optimizer_kwargs).
_IMPLEMENTATION = ("foreach", "fused", "capturable", "differentiable")


def _named_class(config: Dict[str, Any]) -> Optional[type]:
    """The torch.optim class the settings name ("sgd", "adam", "torch.optim.adamw.AdamW"),
    or None for a class of the user's, which only the resuming run has."""
    name = config["optimizer"]
    cls = OPTIMIZERS.get(name) if isinstance(name, str) else None
    if cls is None and isinstance(name, str) and name.startswith("torch.optim."):
        cls = getattr(torch.optim, name.rpartition(".")[2], None)
    return cls if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer) else None


def _probe(path: str, cls: type, config: Dict[str, Any], weights: List[torch.Tensor]):
    """What the run's optimizer looks like: (its param group, its state after one step) for
    a fresh `cls` built as the run builds it (lr=outer_lr, optimizer_kwargs) over zero
    stand-ins of the weights; the state is None where a step cannot be probed."""
    stand_ins = [torch.zeros_like(w, requires_grad=True) for w in weights]
    try:
        optimizer = cls(stand_ins, lr=config["outer_lr"], **config["optimizer_kwargs"])
    except Exception as exc:  # a tampered setting; a user's class may raise anything
        raise _bad(path, "config.optimizer_kwargs", f"is {config['optimizer_kwargs']!r}, "
                   f"which {cls.__name__} refuses ({str(exc).strip()[:200]!r})") from None
    group = optimizer.state_dict()["param_groups"][0]
    try:
        for w in stand_ins:
            w.grad = torch.zeros_like(w)
        optimizer.step()
    except Exception:  # a user's optimizer that cannot step so (a closure...): no state check
        return group, None
    return group, optimizer.state_dict()["state"]


def _check_optimizer(path: str, saved, weights: List[torch.Tensor], config: Dict[str, Any],
                     iteration: int, cls: Optional[type]) -> None:
    """The optimizer's state_dict: one parameter group over the run's weights (params, and
    the learned rates) holding the run's settings (lr = outer_lr, optimizer_kwargs, the
    class's defaults for the rest), and for each of them the buffers the run's optimizer
    keeps, shaped like them, with a step count of `iteration` (their values: _check_values).
    `cls`: the run's optimizer class (None: only the structure is checked)."""
    if not (isinstance(saved, dict) and isinstance(saved.get("state"), dict)
            and isinstance(saved.get("param_groups"), list)):
        raise _bad(path, "optimizer", "is not an optimizer state_dict (state, param_groups)")
    groups = saved["param_groups"]
    indices = list(range(len(weights)))
    if len(groups) != 1 or not isinstance(groups[0], dict) or groups[0].get("params") != indices:
        what = "weights" if len(weights) == 1 else "weights and learned rates"
        raise _bad(path, "optimizer.param_groups", f"must be the one group of the run's {what}")
    for index, buffers in saved["state"].items():
        if index not in indices or not isinstance(buffers, dict):
            raise _bad(path, "optimizer.state", "must hold the state of the run's weights only")
    if cls is None:
        return
    reference, probed = _probe(path, cls, config, weights)
    _check_group(path, groups[0], reference, config["optimizer_kwargs"])
    if probed is not None:
        for index in indices:
            _check_buffers(path, index, saved["state"].get(index) or {},
                           probed.get(index) or {}, weights[index], iteration, cls)


def _check_group(path: str, group: Dict[str, Any], reference: Dict[str, Any],
                 kwargs: Dict[str, Any], loaded: bool = False) -> None:
    """A checkpoint's param group holds the run's settings (`reference`: the group of an
    optimizer built with them). A setting an older torch did not have may be missing (torch
    fills in its default) until `loaded`, when it must be there."""
    for key, want in reference.items():
        field = f"optimizer.param_groups[0].{key}"
        if key in _IMPLEMENTATION and key not in kwargs:  # the checkpoint's own, if a run's
            allowed = (None, False) if key == "differentiable" else (None, False, True)
            if not any(group.get(key) is v for v in allowed):
                raise _bad(path, field, f"is {group[key]!r}, expected one of {allowed}")
            continue
        if key == "params":
            continue
        if key not in group:
            if loaded or key == "lr" or key in kwargs:
                raise _bad(path, field, f"is missing (the run's settings give {want!r})")
            continue
        have = group[key]
        if isinstance(have, bool) != isinstance(want, bool) or _lists(have) != _lists(want):
            said = "outer_lr" if key == "lr" else (f"optimizer_kwargs[{key!r}]" if key in kwargs
                                                   else "the optimizer's default")
            raise _bad(path, field, f"is {have!r}; the run's settings give {want!r} ({said})")


def _check_buffers(path: str, index: int, have: Dict[str, Any], want: Dict[str, Any],
                   weights: torch.Tensor, iteration: int, cls: type) -> None:
    """The optimizer's buffers of the run's weights (index 0) or learned rates (1): the
    ones `cls` keeps after a step (`want`: a probe's), none before the first step."""
    where = "optimizer.state" + ("", ".rates")[index]
    what = ("weights", "learned rates")[index]
    if not have and (iteration == 0 or not want):
        return
    if not have:
        raise _bad(path, where, f"is missing ({cls.__name__} keeps {', '.join(want)} for the "
                                f"{what} after {iteration} iterations)")
    for name in want:
        if name not in have:
            raise _bad(path, f"{where}.{name}", f"is missing ({cls.__name__} keeps it for the "
                                                f"{what} after {iteration} iterations)")
    for name, t in have.items():
        if name not in want:
            raise _bad(path, f"{where}.{name}", f"is not a buffer {cls.__name__} keeps (it "
                                                f"keeps {', '.join(want) or 'none'})")
        field, like = f"{where}.{name}", want[name]
        if isinstance(like, torch.Tensor) and like.dim() > 0:
            if not isinstance(t, torch.Tensor):
                raise _bad(path, field, f"is a {type(t).__name__}, not a tensor")
            if t.shape != weights.shape:
                raise _bad(path, field, f"has shape {list(t.shape)}; the {what} have "
                                        f"{list(weights.shape)}")
            if t.dtype != like.dtype:
                raise _bad(path, field, f"is {t.dtype}; {cls.__name__} keeps it in {like.dtype}")
            _check_values(path, field, name, t)
            continue
        value = t.item() if isinstance(t, torch.Tensor) and t.numel() == 1 else t
        if not _is_real(value) or not math.isfinite(value) or value < 0:
            raise _bad(path, field, f"is {t!r}, expected a count or a non-negative number")
        counted = like.item() if isinstance(like, torch.Tensor) else like
        if name == "step" and counted == 1 and value != iteration:  # one step per iteration
            raise _bad(path, field, f"is {value:g}, but the checkpoint is at iteration "
                                    f"{iteration} (one optimizer step each)")


# The buffers that hold squares (Adam's, RMSprop's, Adagrad's, Adadelta's second moments):
# never negative, and +inf is what a run writes for a square that overflowed (its weights
# stay finite). Every other buffer (a momentum, a first moment) is finite in a checkpoint: a
# run stops before writing the non-finite weights one would give.
_SQUARES = ("exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum", "acc_delta")


def _check_values(path: str, field: str, name: str, t: torch.Tensor) -> None:
    """The values of an optimizer buffer `t`, as a run writes them: contiguous (the fused
    optimizer steps read its memory in order), no NaN, no infinity but a square's +inf."""
    if not t.is_contiguous():
        raise _bad(path, field, "is not contiguous (a run writes its buffers whole)")
    if name in _SQUARES:
        if bool(torch.isnan(t).any() or (t < 0).any()):
            raise _bad(path, field, "holds a NaN or a negative value (it is a mean of squares)")
    elif not bool(torch.isfinite(t).all()):
        raise _bad(path, field, "holds a non-finite value (a run stops before writing one)")


def _check_generator(path: str, field: str, value) -> None:
    if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8:
        raise _bad(path, field, "is not a random generator state (a uint8 tensor)")
    try:
        torch.Generator().set_state(value)
    except (RuntimeError, ValueError, TypeError):
        raise _bad(path, field, f"is not a valid CPU generator state ({value.numel()} bytes)"
                   ) from None


def restore(path: str, saved: Dict[str, Any], config: RunConfig, model,
            optimizer: torch.optim.Optimizer, generator: torch.Generator,
            device: torch.device) -> Tuple[int, List[float]]:
    """Loads checkpoint `saved` (read from `path`) into model, optimizer and generator, after
    checking its fields and that it was written by this run; returns (iteration, losses)."""
    if saved["format"] not in FORMATS:
        raise _not_a_checkpoint(path, saved, config)
    kept = check(path, saved)
    algorithm = saved["config"]["algorithm"]
    if algorithm != config.algorithm:
        raise ValueError(f"checkpoint {path} holds a {algorithm} run, not a {config.algorithm} "
                         f"one: resume it with algorithm={algorithm!r} (--algorithm {algorithm})")
    differ = config.differences(saved["config"])
    if differ:
        raise ValueError(f"checkpoint {path} was written by a different run: " + "; ".join(differ))
    # Each process's task stream is in the checkpoint: it resumes under as many processes.
    written_by = saved["config"].get("processes", 1)  # older checkpoints: one process
    if written_by != config.processes:
        raise ValueError(f"checkpoint {path} was written by a run of {written_by} process(es); "
                         f"resume it with {written_by} (this run has {config.processes})")
    iteration = int(saved["iteration"])
    if iteration > config.iterations:
        raise ValueError(f"checkpoint {path} is at iteration {iteration}, past iterations="
                         f"{config.iterations}")
    if _named_class(saved["config"]) is None:  # a class of the user's: the run's own
        _check_optimizer(path, saved["optimizer"], kept, saved["config"], iteration,
                         type(optimizer))
    reference = optimizer.state_dict()["param_groups"][0]
    try:
        optimizer.load_state_dict(saved["optimizer"])
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise _bad(path, "optimizer", f"does not fit the run's optimizer ({exc})") from None
    _check_group(path, optimizer.state_dict()["param_groups"][0], reference,
                 config.optimizer_kwargs, loaded=True)
    with torch.no_grad():
        for w, k in zip(config.entry.weights(model), kept):
            w.copy_(k.to(device))
    generator.set_state(saved["generator"])
    return iteration, saved["losses"].tolist()


def _not_a_checkpoint(path: str, saved: Dict[str, Any], config: RunConfig) -> ValueError:
    """The error of a resume from a saved model: what it holds, and which run it can start."""
    start = "pass it as init= (--init) to start a new run from its weights"
    try:
        model = _io.model_of(path, saved)
    except ValueError:
        return ValueError(f"{path} is a saved model, not a training checkpoint: {start}")
    if not isinstance(model, config.entry.model_class):
        other = _algorithms.for_model(model).name
        start = (f"a {config.algorithm} run cannot start from it either; pass it as init= with "
                 f"algorithm={other!r} (--algorithm {other} --init {path}) to start a new "
                 f"{other} run from its weights")
    return ValueError(f"{path} is a saved {model.kind}, not a training checkpoint, so there "
                      f"is no run to resume: {start}")


def resuming(path: str, iteration: int, total: int) -> str:
    """The line a resumed run starts with: where it resumes, and whether anything is left."""
    line = f"resuming from {path} at iteration {iteration} of {total}"
    if iteration < total:
        return line
    return (f"{line}: the run is finished, nothing left to train (pass a larger iterations, "
            f"--iterations, to train it further)")


def _read(path: str, saved: Dict[str, Any], device):
    """The model in a training checkpoint, after checking the whole file (pymaml.load)."""
    check(path, saved)
    entry = _algorithms.get(saved["config"]["algorithm"])
    return entry.model_class.from_dict(saved["model"], device=device)


for _format in FORMATS:
    _io.register_reader(_format, _read)
