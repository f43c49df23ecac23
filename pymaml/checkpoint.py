"""Training checkpoints: what one holds, where it may be written, and how a run resumes from it.

A checkpoint is a file of plain tensors and values (loadable with weights_only=True, written
atomically and sealed with a digest by pymaml._io): the run's settings (RunConfig.to_dict,
plus the backend and device it ran on), the iteration, the weights, the optimizer's
state_dict, the task generator's state and the loss history; in a distributed run, every
process's task stream. With those, a resumed run draws the same tasks and ends with bitwise
the same weights as one that was never stopped (same backend, device and thread count).

Every field is checked when a checkpoint is read (`check`): a file missing one, or holding a
value no run writes (a negative iteration, a loss history of another length than the
iteration, weights of another size than the settings give...), is refused with one line
naming the file and the field, before anything is loaded from it."""

from __future__ import annotations

import dataclasses
import numbers
import os
from typing import Any, Dict, List, Optional, Tuple

import torch

from . import _io, _paths
from . import algorithms as _algorithms
from ._version import __version__
from .config import RunConfig, _lists

# The newest this version reads. 2: learned inner rates, adapt_layers; 3: DAML's runs (which
# earlier versions wrote in a format of their own, _io.DAML_CHECKPOINT_FORMAT, still read).
FORMAT_VERSION = 3
FORMATS = (_io.CHECKPOINT_FORMAT, _io.DAML_CHECKPOINT_FORMAT)
_OVERHEAD_BYTES = 64 * 1024  # archive records, pickles and the generator state: ~10 KB measured


def estimated_size(config: RunConfig) -> int:
    """Bytes of the run's last checkpoint, about and on the high side: the weights and up to
    three optimizer buffers of their size, 8 bytes of loss history per iteration."""
    element = torch.finfo(getattr(torch, config.dtype)).bits // 8
    weights = config.entry.weight_count(config)
    return weights * element * 4 + 8 * config.iterations + _OVERHEAD_BYTES


class Checkpoints:
    """Where a run writes its checkpoints (None: nowhere), and whether that file holds this
    run's state yet (it does once written, or when the run resumed from it), which the
    messages of a stopped run mention."""

    def __init__(self, path: Optional[str], resume_from: Optional[str],
                 config: Optional[RunConfig] = None):
        self.path = path
        self.config = config
        self.holds_this_run = (path is not None and resume_from is not None
                               and _paths.same_file(path, resume_from))
        self.iteration: Optional[int] = None  # of the last checkpoint this run wrote

    def check_writable(self, resume_from: Optional[str], overwrite: bool) -> None:
        """Before the first iteration: the path can be written (not a directory, in an
        existing writable directory, with room for the run's last checkpoint; stale
        temporary files of earlier runs removed), and saved training state is never
        replaced unless asked (only the run it holds may write over it, or overwrite=True)."""
        if self.path is None:
            return
        if resume_from is not None and not os.path.lexists(resume_from):
            raise FileNotFoundError(f"checkpoint {resume_from}: no such file, so there is no "
                                    "run to resume")
        _io.check_writable(self.path, "checkpoint")
        resuming_it = resume_from is not None and _paths.same_file(self.path, resume_from)
        if not resuming_it and not overwrite and os.path.exists(self.path):
            raise FileExistsError(f"checkpoint {self.path} already exists: resume it (resume="
                                  "True, --resume), or pass overwrite=True (--overwrite) to "
                                  "start a new run over it, or choose another path")
        if self.config is not None:
            _io.check_space(self.path, estimated_size(self.config), "checkpoint")

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


def check(path: str, saved: Dict[str, Any]) -> None:
    """Refuses (BadCheckpoint, naming the file and the field) a checkpoint `saved`, read from
    `path`, that misses a field or holds a value no pymaml run writes."""
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
    _check_optimizer(path, saved["optimizer"], weights)
    _check_generator(path, "generator", saved["generator"])
    processes = config.get("processes", 1)
    if processes > 1:
        streams = saved.get("task_generators")
        if not isinstance(streams, (list, tuple)) or len(streams) != processes:
            raise _bad(path, "task_generators", f"must hold the task streams of the run's "
                                                f"{processes} processes")
        for rank, s in enumerate(streams):
            _check_generator(path, f"task_generators[{rank}]", s)


def _check_config(path: str, config) -> Dict[str, Any]:
    if not isinstance(config, dict):
        raise _bad(path, "config", f"is a {type(config).__name__}, not the run's settings")
    for field in dataclasses.fields(RunConfig):
        # Settings with a default came later (processes, inner_batch): an older checkpoint
        # has none, and ran with the default.
        if field.name not in config and field.default is dataclasses.MISSING:
            raise _bad(path, f"config.{field.name}", "is missing")
    if not _is_int(config["iterations"]) or config["iterations"] < 0:
        raise _bad(path, "config.iterations", f"is {config['iterations']!r}, expected an int >= 0")
    processes = config.get("processes", 1)
    if not _is_int(processes) or processes < 1:
        raise _bad(path, "config.processes", f"is {processes!r}, expected an int >= 1")
    sizes = config["sizes"]
    if not isinstance(sizes, (list, tuple)) or len(sizes) < 2 or not all(
            _is_int(n) and n >= 1 for n in sizes):
        raise _bad(path, "config.sizes", f"is {sizes!r}, expected layer widths like [1, 40, 1]")
    if config["dtype"] not in ("float32", "float64"):
        raise _bad(path, "config.dtype", f"is {config['dtype']!r}, expected 'float32' or 'float64'")
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


def _check_optimizer(path: str, saved, weights: List[torch.Tensor]) -> None:
    """The optimizer's state_dict: one parameter group over the run's weights (params, and
    the learned rates), and per-parameter buffers shaped like them (scalars such as Adam's
    step count aside). Their values are not checked: a run may legitimately write an
    infinite one (Adam's second moment of an overflowing gradient, which leaves the weights
    finite)."""
    if not (isinstance(saved, dict) and isinstance(saved.get("state"), dict)
            and isinstance(saved.get("param_groups"), list)):
        raise _bad(path, "optimizer", "is not an optimizer state_dict (state, param_groups)")
    groups = saved["param_groups"]
    indices = list(range(len(weights)))
    if len(groups) != 1 or not isinstance(groups[0], dict) or groups[0].get("params") != indices:
        what = "weights" if len(weights) == 1 else "weights and learned rates"
        raise _bad(path, "optimizer.param_groups", f"must be the one group of the run's {what}")
    names = ("", ".rates")  # the buffers of params, of the learned rates
    for index, buffers in saved["state"].items():
        if index not in indices or not isinstance(buffers, dict):
            raise _bad(path, "optimizer.state", "must hold the state of the run's weights only")
        for name, t in buffers.items():
            if not isinstance(t, torch.Tensor) or t.dim() == 0:
                continue  # step counts and other scalars: torch.optim checks them
            if t.shape != weights[index].shape:
                what = "weights" if index == 0 else "learned rates"
                raise _bad(path, f"optimizer.state{names[index]}.{name}", f"has shape "
                           f"{list(t.shape)}; the {what} have {list(weights[index].shape)}")


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
        raise ValueError(f"{path} is a saved model, not a training checkpoint: pass it as init= "
                         "to start a new run from its weights")
    check(path, saved)
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
    try:
        optimizer.load_state_dict(saved["optimizer"])
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise _bad(path, "optimizer", f"does not fit the run's optimizer ({exc})") from None
    entry = config.entry
    kept = entry.weights(entry.model_class.from_dict(saved["model"]))
    with torch.no_grad():
        for w, k in zip(entry.weights(model), kept):
            w.copy_(k.to(device))
    generator.set_state(saved["generator"])
    return iteration, saved["losses"].tolist()


def _read(path: str, saved: Dict[str, Any], device):
    """The model in a training checkpoint, after checking the whole file (pymaml.load)."""
    check(path, saved)
    entry = _algorithms.get(saved["config"]["algorithm"])
    return entry.model_class.from_dict(saved["model"], device=device)


for _format in FORMATS:
    _io.register_reader(_format, _read)
