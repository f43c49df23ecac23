"""The chunked fast path of pymaml.train: many meta-iterations per C++ call.

At the seed's sizes an iteration is a few microseconds of arithmetic, and calling Python, the
dispatcher and torch.optim once per iteration costs several times that. So on the fused CPU
backend, for MAML, FO-MAML and Reptile, and with learned untied rates (Meta-SGD) or frozen
layers (ANIL) (see `unserved`), on a family that can draw many meta-batches at once
(TaskFamily.sample_many, e.g. every FunctionTasks) with torch.optim's SGD or Adam, the trainer
draws a chunk of iterations' tasks in one call and runs them in one torch.ops.pymaml.train_chunk
call, which also applies the optimizer's steps to the real optimizer's
state (to the weights and the learned rates, as one parameter group). Chunking changes
no result: the loss history, the weights, the optimizer state and the generator state are
bitwise those of the per-iteration path, which every other run takes (custom samplers, other
optimizers or settings, the reference backend, several processes). The optimizer's steps are
ATen's fused kernels, which torch.optim's fused=True step runs too (pymaml.outer_optim)."""

from __future__ import annotations

import time
from typing import List, Optional, Tuple

import torch

from . import _ops, meta_step, outer_optim
from .config import RunConfig

CHUNK_FIRST = 16       # iterations of the first train_chunk call, timed to size the next ones
CHUNK_MAX = 1000       # iterations per call, at most
CHUNK_SECONDS = 0.05   # the aim for one call: Ctrl-C and the progress bar answer within it


# The learned-rate modes whose stored rates are the op's rows as they are ([P] or [steps, P]);
# the tied modes (per-step, per-layer-step) would need their gradient summed over the ties.
_UNTIED = ("per-parameter", "per-parameter-step")


def servable(backend: str, device: torch.device, config: Optional[RunConfig] = None) -> bool:
    """Whether train_chunk (with rates for learned rates and frozen layers) can run a
    run's iterations: the fused backend on the CPU (`unserved` says which inner loops; the
    optimizer and the family decide the rest, as the run goes)."""
    return backend == "fused" and device.type == "cpu" and (
        config is None or unserved(config) is None)


def unserved(config: RunConfig) -> Optional[str]:
    """Why the chunked ops cannot run `config`'s iterations at all, or None: learned rates
    tied across parameters (per-step, per-layer-step) go the per-iteration way, through the
    functional API, whose autograd sums their gradient over the ties."""
    if config.learn_inner_lr is not None and config.learn_inner_lr not in _UNTIED:
        return f"train_chunk learns untied rates only, not {config.learn_inner_lr!r} ones"
    if config.algorithm == "reptile" and config.adapt_layers is not None:
        # its per-iteration step is the functional adapt and torch's mean, rounded otherwise
        return "Reptile with frozen layers runs per iteration"
    return None


class FastPath:
    """The chunked path of one run: its optimizer's description for train_chunk, and the
    chunk size, adapted so that a call takes about CHUNK_SECONDS."""

    def __init__(self, spec: outer_optim.ChunkSpec, config: RunConfig, family,
                 generator: torch.Generator, dtype: torch.dtype):
        self.spec = spec
        self.config = config
        self.family = family
        self.generator = generator
        self.dtype = dtype
        self.size = CHUNK_FIRST

    @classmethod
    def for_run(cls, config: RunConfig, optimizer: torch.optim.Optimizer, family,
                generator: torch.Generator, dtype: torch.dtype) -> Optional["FastPath"]:
        """The fast path of a run that `servable` allows, if train_chunk can step its
        optimizer (pymaml.outer_optim.chunk_spec), else None."""
        spec = outer_optim.chunk_spec(optimizer)
        return None if spec is None else cls(spec, config, family, generator, dtype)

    def state(self, optimizer, weights: List[torch.Tensor]) -> Optional[List[torch.Tensor]]:
        """train_chunk's optimizer_state for the stepped weights ([params] or [params,
        rates]), or None while torch.optim has not made it (its first step: that iteration
        goes the per-iteration way). The rates' state as the op's rows (views)."""
        state = []
        for w in weights:
            own = outer_optim.chunk_state(optimizer, w, self.spec)
            if own is None:
                return None
            state += own if w is weights[0] else [self._rows(t) if t.dim() else t for t in own]
        return state

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        # a rates-shaped tensor as the op's [R, P] rows: [P] is one row, [steps, P] is as is
        return t.view(-1, t.shape[-1])

    def length(self, done: int, checkpoint_every: int) -> int:
        """The next chunk's length after `done` iterations: it never crosses a checkpoint or
        the end."""
        return min(self.size, self.config.iterations - done,
                   checkpoint_every - done % checkpoint_every)

    def _rates_chunk(self, params, rates, state, data):
        """train_chunk with rates, for a run with learned (untied) rates or frozen layers."""
        c = self.config
        learn = rates is not None
        rows = self._rows(rates.detach()) if learn else params.new_full(
            (1, params.shape[0]), c.inner_lr)
        layers = None if c.adapt_layers is None else list(c.adapt_layers)
        algorithm = "reptile" if c.algorithm == "reptile" else (
            "fomaml" if c.first_order else "maml")
        return _ops.ops.train_chunk(
            params.detach(), state, *data, list(c.sizes), 0.0, c.inner_steps, c.activation,
            c.loss, algorithm, *self.spec, rows, layers, learn)

    def run(self, weights: List[torch.Tensor], state: List[torch.Tensor],
            n: int) -> Optional[Tuple[List[float], int]]:
        """The next n iterations in one train_chunk call, params and state updated in place:
        (their meta-losses, how many completed: fewer than n when the op stopped before a
        non-finite loss or after a step that made the weights non-finite). None when the
        family cannot draw n meta-batches at once (nothing drawn then)."""
        c = self.config
        params, rates = weights[0], (weights[1] if len(weights) > 1 else None)
        began = time.perf_counter()
        batch = self.family.sample_many(n, c.meta_batch_size, generator=self.generator,
                                        dtype=self.dtype, device=params.device)
        if batch is None:
            return None
        xs, ys = meta_step.inner_data(c, *batch)  # the points the per-iteration path takes
        data = (xs, ys, batch.x_query, batch.y_query)
        if c.plain:
            values, done = _ops.ops.train_chunk(
                params.detach(), state, *data, list(c.sizes), c.inner_lr, c.inner_steps,
                c.activation, c.loss, c.algorithm, *self.spec)
        else:
            values, done = self._rates_chunk(params, rates, state, data)
        seconds = time.perf_counter() - began
        self.size = CHUNK_MAX if seconds <= 0 else \
            max(1, min(CHUNK_MAX, int(CHUNK_SECONDS * n / seconds)))
        return values.tolist(), int(done)
