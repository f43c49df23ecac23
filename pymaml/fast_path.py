"""The chunked fast path of pymaml.train: many meta-iterations per C++ call
(torch.ops.pymaml.train_chunk, which also steps the run's optimizer with the kernels of
pymaml.outer_optim), bitwise the per-iteration path's results. Which runs it serves and why:
docs/training.md's "The fast path"; `unserved` below."""

from __future__ import annotations

import functools
import time
from typing import Callable, List, Optional, Tuple

import torch

from . import _ops, meta_step, outer_optim

CHUNK_FIRST = 16       # iterations of the first train_chunk call, timed to size the next ones
CHUNK_MAX = 1000       # iterations per call, at most
CHUNK_SECONDS = 0.05   # the aim for one call: Ctrl-C and the progress bar answer within it


# The learned-rate modes whose stored rates are the op's rows as they are ([P] or [steps, P]);
# the tied modes (per-step, per-layer-step) would need their gradient summed over the ties.
_UNTIED = ("per-parameter", "per-parameter-step")


def servable(backend: str, device: torch.device, config, algorithm) -> bool:
    """Whether train_chunk can run a run's iterations: the fused backend on the CPU, an inner
    loop it serves (`unserved`); the optimizer and the family decide the rest, as the run goes."""
    return backend == "fused" and device.type == "cpu" and unserved(config, algorithm) is None


def unserved(config, algorithm) -> Optional[str]:
    """Why the chunked ops cannot run `config`'s iterations at all, or None: learned rates
    tied across parameters (per-step, per-layer-step) go the per-iteration way, through the
    functional API, whose autograd sums their gradient over the ties."""
    if config.learn_inner_lr is not None and config.learn_inner_lr not in _UNTIED:
        return f"train_chunk learns untied rates only, not {config.learn_inner_lr!r} ones"
    if algorithm.reptile_update and config.adapt_layers is not None:
        # its per-iteration step is the functional adapt and torch's mean, rounded otherwise
        return "Reptile with frozen layers runs per iteration"
    return None


class FastPath:
    """The chunked path of one run: its optimizer's description for the chunk op, how a
    chunk is drawn and run (the algorithm's), and the chunk size, adapted so that a call
    takes about CHUNK_SECONDS."""

    def __init__(self, spec: outer_optim.ChunkSpec, iterations: int, draw: Callable,
                 call: Callable):
        self.spec = spec
        self.iterations = iterations
        self.draw = draw  # n -> the chunk's meta-batches, or None when the family cannot
        self.call = call  # (weights, state, batch, spec) -> (losses [n], done)
        self.size = CHUNK_FIRST

    @classmethod
    def for_maml(cls, config, algorithm, optimizer, family, generator,
                 dtype) -> Optional["FastPath"]:
        """The fast path of a MAML-family run that `servable` allows, if the chunk ops can
        step its optimizer (pymaml.outer_optim.chunk_spec), else None."""
        spec = outer_optim.chunk_spec(optimizer)
        if spec is None:
            return None

        def draw(n, device):
            batch = family.sample_many(n, config.meta_batch_size, generator=generator,
                                       dtype=dtype, device=device)
            if batch is None:
                return None
            # the points the per-iteration path takes
            batch = meta_step.class_targets(config, batch)
            xs, ys = meta_step.inner_data(config, algorithm.reptile_update, *batch)
            return xs, ys, batch.x_query, batch.y_query
        return cls(spec, config.iterations, draw, functools.partial(_maml_chunk, config, algorithm))

    def state(self, optimizer, weights: List[torch.Tensor]) -> Optional[List[torch.Tensor]]:
        """The chunk op's optimizer_state for the stepped weights ([params], [params, rates]
        or DAML's [weights]), or None while torch.optim has not made it (its first step:
        that iteration goes the per-iteration way). The rates' state as the op's rows."""
        state = []
        for w in weights:
            own = outer_optim.chunk_state(optimizer, w, self.spec)
            if own is None:
                return None
            state += own if w is weights[0] else [_rows(t) if t.dim() else t for t in own]
        return state

    def length(self, done: int, checkpoint_every: int) -> int:
        """The next chunk's length after `done` iterations: it never crosses a checkpoint or
        the end."""
        return min(self.size, self.iterations - done,
                   checkpoint_every - done % checkpoint_every)

    def run(self, weights: List[torch.Tensor], state: List[torch.Tensor],
            n: int) -> Optional[Tuple[List[float], int]]:
        """The next n iterations in one chunk op call, the weights and state updated in
        place: (their meta-losses, how many completed: fewer than n when the op stopped
        before a non-finite loss or after a step that made the weights non-finite). None when
        the family cannot draw n meta-batches at once (nothing drawn then)."""
        began = time.perf_counter()
        data = self.draw(n, weights[0].device)
        if data is None:
            return None
        values, done = self.call(weights, state, data, self.spec)
        seconds = time.perf_counter() - began
        self.size = CHUNK_MAX if seconds <= 0 else \
            max(1, min(CHUNK_MAX, int(CHUNK_SECONDS * n / seconds)))
        return values.tolist(), int(done)


def _rows(t: torch.Tensor) -> torch.Tensor:
    # a rates-shaped tensor as the op's [R, P] rows: [P] is one row, [steps, P] is as is
    return t.view(-1, t.shape[-1])


def _maml_chunk(c, algorithm, weights, state, data, spec):
    """train_chunk on a chunk; for learned rates or frozen layers, with the rates (the
    learned ones, else inner_lr's row) and the adapting layers."""
    params = weights[0].detach()
    inner_lr, rates = c.inner_lr, ()
    if not c.plain:
        learn = len(weights) > 1
        rows = _rows(weights[1].detach()) if learn else params.new_full((1, params.shape[0]),
                                                                         c.inner_lr)
        layers = None if c.adapt_layers is None else list(c.adapt_layers)
        inner_lr, rates = 0.0, (rows, layers, learn)
    return _ops.ops.train_chunk(params, state, *data, list(c.sizes), inner_lr, c.inner_steps,
                                c.activation, c.loss, algorithm.op_algorithm, *spec, *rates)
