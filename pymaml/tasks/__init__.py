"""Task families: each samples a whole meta-batch of tasks in one vectorised call.

Two protocols, one per kind of batch (tasks/base.py):

- MAML's: TaskFamily.sample(T, *, generator, dtype, device) -> TaskBatch of labeled support
  and query points, x [T, K, n_in], y [T, K, n_out]; or a callable fn(T, generator) ->
  (xs, ys, xq, yq).
- DAML's: unlabeled SOURCE inputs for the inner loop, labeled TARGET points for the outer
  loss. DAMLTaskFamily.sample_daml(T, *, steps, generator, ...) -> DAMLBatch (x_source,
  x_query, y_query); or a callable fn(T, steps, generator) -> the same three.

Randomness comes only from the CPU torch.Generator passed in, draws made in float64 and then
cast and moved (docs/training.md, "Task sampling"); `sample_many` / `sample_daml_many` draw n
meta-batches at once, bitwise n single draws, or return None when a family cannot promise it.
A user's callable or family is checked at every draw (get_family, checked, ...). pymaml's own
families: "seed-sine", "sine", "daml-sine" (tasks/sines.py) and "omniglot" (tasks/omniglot.py,
episodes drawn by Episodes, tasks/episodes.py, from any labelled data set).
"""
from __future__ import annotations

from typing import Optional

import torch

from .base import (CallableDAMLTasks, CallableTasks, CheckedDAMLTasks, CheckedTasks, DAMLBatch,
                   DAMLTaskFamily, SEED_DEFAULTS, TaskBatch, TaskFamily, _DAML, _Kind, _MAML,
                   check_batch, check_daml_batch)
from .episodes import Episodes, split_classes
from .omniglot import Omniglot, load_omniglot
from .sines import DAMLSine, FunctionTasks, SeedSine, Sine

__all__ = ["TaskBatch", "TaskFamily", "FunctionTasks", "SeedSine", "Sine", "CallableTasks",
           "CheckedTasks", "FAMILIES", "get_family", "checked", "check_batch",
           "DAMLBatch", "DAMLTaskFamily", "DAMLSine", "CallableDAMLTasks", "CheckedDAMLTasks",
           "DAML_FAMILIES", "get_daml_family", "checked_daml", "check_daml_batch",
           "Episodes", "split_classes", "load_omniglot", "Omniglot"]


# pymaml's own classes, whose shapes and dtypes are right by construction or already checked.
# Exact types: a user's subclass of SeedSine, say, may change what it draws, so it is checked.
_TRUSTED = (SeedSine, Sine, Episodes, Omniglot, CallableTasks, CheckedTasks)
_TRUSTED_DAML = (DAMLSine, CallableDAMLTasks, CheckedDAMLTasks)


def checked(family: TaskFamily) -> TaskFamily:
    """`family`, its outputs checked on every draw unless it is one of pymaml's own (whose
    shapes and dtypes are right by construction) or already checks them."""
    return family if type(family) in _TRUSTED else CheckedTasks(family)


def checked_daml(family: DAMLTaskFamily) -> DAMLTaskFamily:
    """`family`, its outputs checked on every draw unless it is one of pymaml's own."""
    return family if type(family) in _TRUSTED_DAML else CheckedDAMLTasks(family)


# ---- by name ------------------------------------------------------------------------------------

DAML_FAMILIES = {DAMLSine.name: DAMLSine}
FAMILIES = {SeedSine.name: SeedSine, Sine.name: Sine, "omniglot": Omniglot, **DAML_FAMILIES}
# The named families that read a data set (data=DIR) and draw classification episodes (ways=N).
DATA_FAMILIES = ("omniglot",)


def _family(kind: _Kind, named: dict, base: type, wrap: type, task, shots, queries,
            data=None, ways=None):
    """get_family and get_daml_family: a family of `base` from a name in `named`, a family
    (as is) or a callable (wrapped in `wrap`)."""
    if isinstance(task, str):
        if task not in named:
            raise ValueError(f"task must be one of {', '.join(map(repr, named))}{kind.scope}, a "
                             f"{kind.family} or a callable {kind.call}; got {task!r}")
        if task not in DATA_FAMILIES and (data is not None or ways is not None):
            raise ValueError(f"data and ways apply to the task families read from a data set "
                             f"({', '.join(DATA_FAMILIES)}), not to {task!r}")
        kwargs = {k: v for k, v in (("shots", shots), ("queries", queries), ("data", data),
                                    ("ways", ways)) if v is not None}
        return named[task](**kwargs)
    if shots is not None or queries is not None or data is not None or ways is not None:
        raise ValueError("shots, queries, data and ways apply to the named task families only; "
                         f"set them on your own {kind.family} or sampler")
    if isinstance(task, base):
        return task
    if isinstance(task, TaskFamily):  # a MAML family asked for DAML (a DAML one is a TaskFamily)
        raise TypeError(f"task {task!r} is a MAML task family (labeled support sets); DAML "
                        "needs a DAMLTaskFamily (unlabeled source inputs, labeled target points)")
    if isinstance(task, type) and issubclass(task, TaskFamily):
        raise TypeError(f"task must be a {kind.family} instance: pass {task.__name__}(), not "
                        "the class")
    return wrap(task)


def get_family(task, *, shots: Optional[int] = None, queries: Optional[int] = None,
               data=None, ways: Optional[int] = None) -> TaskFamily:
    """A TaskFamily from a name in FAMILIES (with optional shots / queries; data and ways for
    "omniglot"), a TaskFamily (returned as is), or a callable sampler fn(T, generator) ->
    (xs, ys, xq, yq)."""
    return _family(_MAML, FAMILIES, TaskFamily, CallableTasks, task, shots, queries, data, ways)


def get_daml_family(task, *, shots: Optional[int] = None,
                    queries: Optional[int] = None) -> DAMLTaskFamily:
    """A DAMLTaskFamily from a name in DAML_FAMILIES (shots: source inputs per inner step,
    queries: labeled target points), a DAMLTaskFamily (returned as is) or a callable
    fn(T, steps, generator) -> (x_source, x_query, y_query)."""
    return _family(_DAML, DAML_FAMILIES, DAMLTaskFamily, CallableDAMLTasks, task, shots, queries)


def per_step_batches(x: torch.Tensor, steps: int, size: int, name: str = "inner_batch"):
    """x [..., N, features] cut into `steps` batches of `size` points, [..., steps, size,
    features]: step k takes points k * size, k * size + 1, ... (mod N), cycling through the N
    points as epochs over a task's data do. The points of a task are drawn independently, so
    consecutive slices are random minibatches, with no draw of their own (which keeps a
    chunk of iterations bitwise the iterations one by one)."""
    n = x.shape[-2]
    if size > n:
        raise ValueError(f"{name}={size} is more than the {n} points a task's inner loop has")
    index = (torch.arange(steps)[:, None] * size + torch.arange(size)) % n
    return x[..., index.to(x.device), :]
