"""Data-parallel meta-training over processes with torch.distributed (gloo on CPUs, NCCL on
GPUs): the run's process group (Group: the collectives pymaml.train needs, every failure one
DistributedError) and each rank's task stream (task_seed). How a run spreads over processes,
its random streams and its failures: docs/distributed.md."""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import os
from typing import Any, Callable, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from ._io import first_line

__all__ = ["DistributedError", "Group", "task_seed", "launched_by_torchrun", "env_rank",
           "launch_size", "check_not_copies", "local_device", "DEFAULT_TIMEOUT_S"]

DEFAULT_TIMEOUT_S = 300.0
# What torchrun (and torch.distributed's env:// initialisation) sets in each process.
_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# Groups this process created, counted: each gets its own key prefix in the launch's store, so
# a second train() in the same processes never reads the first group's stale addresses.
_groups_created = itertools.count()


class DistributedError(RuntimeError):
    """A collective of a distributed run failed: another process stopped, or did not answer
    within the process group's timeout."""


def task_seed(seed: int, rank: int) -> int:
    """The seed of rank `rank`'s task stream (rank >= 1; rank 0 continues the run's own
    generator). A 64-bit value from numpy's SeedSequence of (seed, rank): well mixed, so
    neighbouring seeds and ranks give unrelated streams."""
    if rank < 1:
        raise ValueError(f"rank 0 draws from the run's own generator; task_seed needs rank >= 1, got {rank}")
    return int(np.random.SeedSequence([seed % 2**64, rank]).generate_state(1, np.uint64)[0])


def launched_by_torchrun() -> bool:
    """Whether this process has torch.distributed's launch environment (torchrun sets it)."""
    return all(k in os.environ for k in _ENV)


def env_rank() -> int:
    """This process's rank in the launch environment (0 outside one): who writes files."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def launch_size() -> int:
    """How many processes the torchrun launch of this process has (1 outside one)."""
    try:
        return int(os.environ["WORLD_SIZE"]) if launched_by_torchrun() else 1
    except ValueError:
        return 1


def check_not_copies(distributed: Optional[bool], flag: str = "distributed=False") -> None:
    """Refuses `distributed` False in a torchrun launch of several processes where the run
    writes one set of files (the command line): every process would train the whole run and
    write the same files. (train() itself allows it: each process then trains on its own.)"""
    processes = launch_size()
    if distributed is False and processes > 1:
        raise ValueError(f"{flag} under a torchrun launch of {processes} processes: each would "
                         f"train the whole run and write the same files; drop {flag} to train "
                         "data-parallel over them, or launch one process")


@dataclasses.dataclass
class Group:
    """The processes of one training run, and the collectives the trainer needs."""
    rank: int
    world_size: int
    owns: bool                  # pymaml created the process group, and destroys it at the end
    timeout_s: Optional[float]  # the group's timeout, when pymaml set it
    device: torch.device        # where the collectives' tensors live (the backend's device)

    @classmethod
    def join(cls, distributed: Optional[bool], device: torch.device,
             timeout_s: float) -> Optional["Group"]:
        """The run's group, or None for a one-process run.

        distributed None: a group when a torch.distributed process group of two or more
        processes is initialised, or when launched by torchrun with WORLD_SIZE >= 2.
        True: a group (of any size), or an error saying how to launch one. False: None."""
        if distributed is False:
            return None
        if not dist.is_available():
            if distributed:
                raise RuntimeError("distributed=True, but this torch build has no torch.distributed")
            return None
        if dist.is_initialized():
            world_size = dist.get_world_size()
            if world_size == 1 and not distributed:
                return None
            return cls(dist.get_rank(), world_size, owns=False, timeout_s=None,
                       device=_collective_device(dist.get_backend(), device))
        if not launched_by_torchrun():
            if distributed:
                raise ValueError("distributed=True needs a process group: launch with torchrun "
                                 "(it sets " + ", ".join(_ENV) + ") or call "
                                 "torch.distributed.init_process_group before train()")
            return None
        if int(os.environ["WORLD_SIZE"]) == 1 and not distributed:
            return None
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s)
        try:
            store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
            store.set_timeout(timeout)
            store = dist.PrefixStore(f"pymaml.train/{next(_groups_created)}", store)
            dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                    timeout=timeout)
        except (RuntimeError, ValueError) as exc:
            raise DistributedError(f"could not join the process group ({backend}, rank "
                                   f"{os.environ['RANK']} of {os.environ['WORLD_SIZE']}, master "
                                   f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}): "
                                   f"{first_line(exc)}") from None
        return cls(dist.get_rank(), dist.get_world_size(), owns=True, timeout_s=timeout_s,
                   device=_collective_device(backend, device))

    # ---- collectives: every failure becomes one DistributedError that says what happened ----

    def _run(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except RuntimeError as exc:  # DistBackendError and gloo's errors are RuntimeErrors
            waited = f" within the {self.timeout_s:g} s timeout" if self.timeout_s else ""
            raise DistributedError(
                f"rank {self.rank} of {self.world_size}: {what} failed ({first_line(exc)}): "
                f"another process of the run stopped or did not answer{waited}; its own "
                "output says why") from None

    def all_reduce_mean(self, t: torch.Tensor, what: str) -> torch.Tensor:
        """The mean over the processes of each one's `t` (a new tensor on t's device)."""
        buf = t.to(self.device)
        self._run(what, lambda: dist.all_reduce(buf, op=dist.ReduceOp.SUM))
        return buf.div_(self.world_size).to(t.device)

    def broadcast(self, t: torch.Tensor, what: str) -> None:
        """Rank 0's `t` into every process's `t`, in place."""
        buf = t.detach().to(self.device)
        self._run(what, lambda: dist.broadcast(buf, src=0))
        with torch.no_grad():
            t.copy_(buf)

    def gather(self, obj: Any, what: str) -> List[Any]:
        """Every process's `obj` (picklable), in rank order, on every process."""
        out: List[Any] = [None] * self.world_size
        self._run(what, lambda: dist.all_gather_object(out, obj))
        return out

    def from_rank0(self, fn: Callable[[], Any], what: str) -> Any:
        """fn() run on rank 0 alone (file checks and reads: only rank 0's disk counts), its
        result handed to every process. If fn raises, every process raises the same error,
        so none is left waiting for the others."""
        outcome = [None]
        if self.rank == 0:
            try:
                outcome[0] = ("ok", fn())
            except Exception as exc:  # re-raised below, on every rank
                outcome[0] = ("error", exc)
        self._run(what, lambda: dist.broadcast_object_list(outcome, src=0))
        status, value = outcome[0]
        if status == "error":
            raise value
        return value

    def close(self) -> None:
        """Leaves the group if pymaml created it (closing it tells the other processes)."""
        if self.owns and dist.is_initialized():
            try:
                dist.destroy_process_group()
            except RuntimeError:
                pass  # already broken: nothing more to tell the others


def _collective_device(backend: str, device: torch.device) -> torch.device:
    # NCCL reduces GPU tensors; gloo (and anything else) CPU ones.
    return device if backend == "nccl" else torch.device("cpu")


def local_device(device: torch.device) -> torch.device:
    """A bare "cuda" under torchrun means this process's GPU, cuda:LOCAL_RANK."""
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device
