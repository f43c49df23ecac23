"""Training checkpoints: what one holds, where it may be written, and how a run resumes from it.

A checkpoint is a file of plain tensors and values (loadable with weights_only=True, written
atomically by pymaml._io): the run's settings (RunConfig.to_dict, plus the backend and
device it ran on), the iteration, the weights, the optimizer's state_dict, the task
generator's state and the loss history; in a distributed run, every process's task stream.
With those, a resumed run draws the same tasks and ends with bitwise the same weights as one
that was never stopped (same backend, device and thread count)."""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Tuple

import torch

from . import _io
from ._version import __version__
from .config import RunConfig

FORMAT_VERSION = 1


class Checkpoints:
    """Where a run writes its checkpoints (None: nowhere), and whether that file holds this
    run's state yet (it does once written, or when the run resumed from it), which the
    messages of a stopped run mention."""

    def __init__(self, path: Optional[str], resume_from: Optional[str]):
        self.path = path
        self.holds_this_run = path is not None and path == resume_from

    def check_writable(self, resume_from: Optional[str], overwrite: bool) -> None:
        """Before the first iteration: the directory must be writable, and saved training
        state is never replaced unless asked (only the run it holds may write over it, or
        overwrite=True)."""
        if self.path is None:
            return
        directory = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
            raise ValueError(f"checkpoint {self.path}: the directory {directory} does not exist "
                             "or is not writable")
        if self.path != resume_from and not overwrite and os.path.exists(self.path):
            raise FileExistsError(f"checkpoint {self.path} already exists: resume it (resume="
                                  "True, --resume), or pass overwrite=True (--overwrite) to "
                                  "start a new run over it, or choose another path")

    def save(self, state: Dict[str, Any], write: bool = True) -> None:
        """Writes `state` (when `write`: in a distributed run, rank 0 writes for all)."""
        if write:
            _io.atomic_save(state, self.path)
        self.holds_this_run = True

    def kept(self) -> str:
        """The end of a stopped run's message: which checkpoint is left to resume from."""
        return f"; the last checkpoint, {self.path}, is kept" if self.holds_this_run else ""


def state(settings: Dict[str, Any], iteration: int, model, optimizer: torch.optim.Optimizer,
          generator: torch.Generator, losses: List[float]) -> Dict[str, Any]:
    """A checkpoint of a run at `iteration` (its settings dict, as TrainResult.config)."""
    return dict(format=_io.CHECKPOINT_FORMAT, format_version=FORMAT_VERSION,
                pymaml_version=__version__, config=settings, iteration=iteration,
                model=model.to_dict(), optimizer=optimizer.state_dict(),
                generator=generator.get_state(),
                losses=torch.tensor(losses, dtype=torch.float64))


def restore(path: str, saved: Dict[str, Any], config: RunConfig, model,
            optimizer: torch.optim.Optimizer, generator: torch.Generator,
            device: torch.device) -> Tuple[int, List[float]]:
    """Loads checkpoint `saved` (read from `path`) into model, optimizer and generator, after
    checking that it was written by this run; returns (iteration, loss history)."""
    if saved["format"] != _io.CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is a saved model, not a training checkpoint: pass it as init= "
                         "to start a new run from its weights")
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
    with torch.no_grad():
        model.params.copy_(saved["model"]["params"].to(device))
    optimizer.load_state_dict(saved["optimizer"])
    generator.set_state(saved["generator"])
    return iteration, saved["losses"].tolist()
