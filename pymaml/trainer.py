"""pymaml.train: meta-training with any algorithm of the registry (pymaml.algorithms: MAML,
FO-MAML, Reptile, Meta-SGD, ANIL, DAML) on a task family.

A run is one loop for every algorithm (_Run.loop; the registry's entry supplies what
differs): sample a meta-batch, compute its meta-gradient, step the outer torch.optim optimizer,
log, checkpoint. Where each part lives: docs/design.md §6.1-§6.2. The run's randomness is one
CPU torch.Generator (seeded by `seed`), used first for the initial weights, then by the task
sampler, so that a resumed run ends bitwise as an uninterrupted one."""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Dict, List, Optional, Tuple

import torch

from . import _io
from . import checkpoint as _checkpoint
from . import config as _config
from . import distributed as _distributed
from . import outer_optim
from . import progress as _progress
from . import reference as _reference
from .config import ALGORITHMS, DTYPES, OPTIMIZERS, RunConfig, RunOptions  # noqa: F401 (API)

__all__ = ["train", "TrainResult", "TrainingDiverged", "ALGORITHMS", "OPTIMIZERS"]


class TrainingDiverged(RuntimeError):
    """Training hit a NaN or infinite meta-loss (the weights are not updated with it) or an
    optimizer step made the weights non-finite. `iteration` is the 1-based iteration; the
    last checkpoint is kept."""

    def __init__(self, message: str, iteration: int):
        super().__init__(message)
        self.iteration = iteration


@dataclasses.dataclass
class TrainResult:
    """What train() returns.

    model: the meta-trained MetaMLP (call `model.adapt(x, y)` for test-time adaptation);
    losses: float64 [iterations done] meta-loss per iteration (the mean post-adaptation query
        loss of the meta-batch; for Reptile, whose inner loop also trains on the query points,
        the same quantity, a training loss);
    wall_time: seconds this call spent in its training loop;
    iterations: meta-iterations done in total (resumed runs count the earlier ones);
    status: "completed" or "interrupted" (Ctrl-C: a checkpoint was written if a path was given);
    checkpoint: the checkpoint path, or None; config: the run's settings;
    rank: this process's rank in a distributed run (0 otherwise; every rank gets the same
        model and losses);
    fast_iterations: how many of this call's iterations ran on the chunked fast path
        (pymaml.fast_path; the others ran one by one);
    start: the iteration this call started from (a resumed run's checkpoint's, else 0).
    """
    model: torch.nn.Module  # a MetaMLP, or the algorithm's own model (DAMLModel)
    losses: torch.Tensor
    wall_time: float
    iterations: int
    status: str
    checkpoint: Optional[str]
    config: Dict[str, Any]
    rank: int = 0
    fast_iterations: int = 0
    start: int = 0

    def summary(self) -> List[str]:
        """What the run did, in lines (the command line prints them): the iterations, how
        they ran and how long this call took; the meta-loss at the end."""
        c, done = self.config, self.iterations - self.start
        processes = c.get("processes", 1)
        spread = f", {processes} processes" if processes > 1 else ""
        took = f"training took {self.wall_time:.1f} s" if done else "nothing left to train"
        if self.start and done:
            took = f"{done} of them in this call (from iteration {self.start}), {took}"
        lines = [f"{self.iterations} meta-iterations done ({c['algorithm']}, {c['backend']} "
                 f"backend{spread}, {torch.get_num_threads()} thread(s)"
                 f"{' each' if spread else ''}); {took}"]
        if self.iterations:
            tail = self.losses[-max(100, self.iterations // 100):]
            lines.append(f"meta-loss over the last {tail.numel()} iterations: "
                         f"{tail.mean().item():.4f}")
        return lines


def train(task="seed-sine", *, algorithm: str = "maml", sizes=None,
          activation: str = "relu", loss: Optional[str] = None, inner_steps: Optional[int] = None,
          inner_lr: Optional[float] = None, meta_batch_size: Optional[int] = None,
          iterations: Optional[int] = None, optimizer=None, outer_lr: Optional[float] = None,
          optimizer_kwargs: Optional[dict] = None,
          shots: Optional[int] = None, queries: Optional[int] = None, init="seed",
          backend: str = "auto", device="cpu", dtype=torch.float32, seed: int = 0,
          log_every: Optional[int] = None, progress: Optional[bool] = None,
          checkpoint=None, checkpoint_every: int = 10_000, resume=False,
          overwrite: bool = False, distributed: Optional[bool] = None,
          distributed_timeout: float = _distributed.DEFAULT_TIMEOUT_S,
          inner_batch: Optional[int] = None, learn_inner_lr: Optional[str] = None,
          adapt_layers=None, loss_sizes=None, adapt_loss: Optional[str] = None,
          data=None, ways: Optional[int] = None) -> TrainResult:
    """Meta-trains an MLP and returns a TrainResult (model, loss history, wall time).

    task: "seed-sine", "sine", "omniglot", a pymaml.tasks.TaskFamily, or a callable
        fn(T, generator) -> (x_support, y_support, x_query, y_query) of [T, points, features];
        shots / queries set the named families' sizes; "omniglot" (pymaml.tasks.Omniglot) also
        takes data (the Omniglot archives' directory) and ways (classes per episode, 5).
    algorithm: "maml" (exact second order), "fomaml" (first order), "reptile" (outer update
        toward the mean adapted weights; inner loop on support and query together),
        "metasgd" (MAML learning one inner rate per parameter: learn_inner_lr=
        "per-parameter") or "anil" (MAML adapting the head only: adapt_layers=[-1]).
    sizes, activation ("relu" | "tanh"), loss ("l1" | "mse" | "cross_entropy"), inner_steps,
        inner_lr: the network and its inner loop. meta_batch_size: tasks per meta-iteration.
        Left None, these and iterations, optimizer, outer_lr take the task's defaults (the
        seed's, config.DEFAULTS; Omniglot's: the MAML paper's, Omniglot.run_defaults).
    learn_inner_lr: None (the inner rate is inner_lr throughout), or the inner rates to learn
        with the weights, each starting at inner_lr, stepped by the same outer optimizer:
        "per-step" (one per inner step), "per-parameter" (one per weight entry, Meta-SGD),
        "per-layer-step" (one per weight matrix and bias vector per step, MAML++'s LSLR) or
        "per-parameter-step". With "maml", "fomaml" (first-order rate gradients) or "anil";
        the model holds them (MetaMLP.learned_lr) and adapts with them.
    adapt_layers: None (every layer adapts in the inner loop) or the indices of the linear
        layers that do ([-1]: the head); the meta-gradient still reaches every layer (for
        Reptile, only these layers move). Runs with rates tied across parameters
        (per-step, per-layer-step) take the per-iteration path (pymaml.fast_path.unserved).
    algorithm="daml": DAML on a DAML task family ("daml-sine", for which "seed-sine" stands),
        returning a DAMLModel; loss_sizes and adapt_loss set its loss network (docs/training.md).
    inner_batch: None (every inner step trains on all of the task's inner-loop points), or
        the points of each step's minibatch, as in Reptile's paper: step k takes the next
        inner_batch points, cycling through them (pymaml.tasks.per_step_batches).
    optimizer: "sgd", "adam" or a torch.optim.Optimizer class, built with lr=outer_lr and
        optimizer_kwargs ("sgd" / "adam" with fused=True too where the chunked fast path can
        serve the run, so that both paths step with the same kernel: pymaml.outer_optim).
    init: "seed" (W uniform in ±1/sqrt(fan_in), zero biases), "torch" (nn.Linear's default),
        or a MetaMLP / [P] tensor to start from (copied).
    backend: "fused", "reference" or "auto". device, dtype (torch.float32 | torch.float64).
    seed: seeds the initial weights and the task sampler.
    log_every: a log line every this many iterations (0: none; default: none when the
        progress bar shows, else ten lines per run). progress: the tqdm bar (default: shown
        when stderr is a terminal).
    checkpoint: a path, written atomically every checkpoint_every iterations, at the end, on
        Ctrl-C; an existing checkpoint is replaced only when resumed or with overwrite=True.
    resume: True (or a checkpoint's path, then written to `checkpoint` or to itself) to go on
        with the run in it, same settings, up to iterations (None: the checkpoint's own).
    distributed: None (default): data-parallel over processes when launched by torchrun with
        two or more processes, or when a torch.distributed process group of two or more is
        initialised; True: always (an error without a launch environment or group); False:
        never. meta_batch_size is the global meta-batch: each of W processes draws
        meta_batch_size / W tasks (W must divide it). See pymaml.distributed.
    distributed_timeout: seconds a process waits for the others at a collective before the
        run stops with pymaml.distributed.DistributedError (when train() creates the group).

    Ctrl-C stops after the current iteration (on the chunked fast path, the current chunk: about
    50 ms of work), writes the checkpoint and returns with status "interrupted". A NaN or infinite
    meta-loss raises TrainingDiverged naming the iteration, before the weights are updated with it
    (as do weights that an optimizer step made non-finite); the last checkpoint is kept.
    """
    config, options = _config.from_train_arguments(dict(locals()))  # every argument, by name
    group = _distributed.Group.join(options.distributed, options.device,
                                    options.distributed_timeout)
    try:
        # The reference's meta-gradient needs autograd, whatever the caller's grad mode.
        with _reference.autograd_on():
            return _Run(config, options, group).loop()
    finally:
        if group is not None:
            group.close()


class _Run:
    """One training run, in one process of one or several: the model, the optimizer, the
    task streams and the loss history, and the loop that advances them."""

    def __init__(self, config: RunConfig, options: RunOptions, group):
        self.group, self.options = group, options
        self.rank, processes = (0, 1) if group is None else (group.rank, group.world_size)
        if config.meta_batch_size % processes:
            raise ValueError(f"meta_batch_size {config.meta_batch_size} does not divide across "
                             f"{processes} processes: it is the global meta-batch, split "
                             f"evenly, so use a multiple of {processes}")
        self.config = config = dataclasses.replace(config, processes=processes)
        self.local_batch = config.meta_batch_size // processes
        self.checkpoints = _checkpoint.Checkpoints(options.checkpoint, options.resume_from)
        if options.checkpoint is not None:
            self._on_rank0(lambda: self.checkpoints.check_writable(
                options.resume_from, options.overwrite, config), "checking the checkpoint path")
        self.entry = entry = config.entry
        self.generator = torch.Generator().manual_seed(config.seed)
        self.model = entry.initial_model(config, options.init, self.generator, options.dtype,
                                         options.device)
        # What the outer optimizer steps: the weights (and the inner rates a run learns).
        self.weights = entry.weights(self.model)
        # Rank 0 draws its tasks from the run's generator, the others from their own streams.
        self.task_generator = self.generator if self.rank == 0 else \
            torch.Generator().manual_seed(_distributed.task_seed(config.seed, self.rank))
        if group is not None:  # the same start everywhere, whatever `init` each was given
            for w in self.weights:
                group.broadcast(w, "sharing rank 0's initial weights")
        self.backend = entry.backend(config, options.backend, self.model)
        # "sgd" / "adam" with the fused kernel the chunk ops step with, where they may serve
        # the run (pymaml.outer_optim)
        kwargs = config.optimizer_kwargs
        if entry.chunkable(config, self.backend, options.device) and \
                config.optimizer in OPTIMIZERS:
            kwargs = outer_optim.build_kwargs(kwargs)
        self.optimizer = options.optimizer_class(self.weights, lr=config.outer_lr, **kwargs)
        self.losses: List[float] = []
        self.start = 0
        if options.resume_from is not None:
            self._resume(options.resume_from)
            config = self.config  # (its iterations may be the checkpoint's)
        self.settings = dict(config.to_dict(), backend=self.backend, device=str(options.device))
        self.meta_step = entry.meta_step(config, self.backend)
        # One process only: the all-reduce sits between an iteration's gradient and its step.
        self.fast = None
        if processes == 1 and self.start < config.iterations:
            self.fast = entry.fast_path(config, self.optimizer, options.family,
                                        self.task_generator, options.dtype, self.backend,
                                        options.device)
        self.fast_iterations = 0

    def _on_rank0(self, fn, what):
        """fn() on rank 0 (whose disk holds the checkpoint), its outcome (an error too) handed
        to every process."""
        return fn() if self.group is None else self.group.from_rank0(fn, what)

    def _resume(self, path: str) -> None:
        saved = self._on_rank0(lambda: _io.load_file(path), f"reading checkpoint {path}")
        total = saved.get("config", {}).get("iterations") if isinstance(saved, dict) else None
        if not self.options.iterations_given and isinstance(total, int) and total >= 0:
            # iterations left unset: the run goes on to its own end, not the default's
            self.config = dataclasses.replace(self.config, iterations=total)
        self.start, self.losses = _checkpoint.restore(path, saved, self.config, self.model,
                                                      self.optimizer, self.generator,
                                                      self.options.device)
        if self.rank > 0:
            self.task_generator.set_state(saved["task_generators"][self.rank])

    def loop(self) -> TrainResult:
        """Runs the iterations left; writes checkpoints every checkpoint_every iterations, at
        the end and on Ctrl-C."""
        total, every = self.config.iterations, self.options.checkpoint_every
        self.bar = _progress.for_run(self.rank, self.options.progress, self.options.log_every,
                                     self.start, total)
        status, it = "completed", self.start
        if self.options.resume_from is not None and self.rank == 0:
            self.bar.say(_checkpoint.resuming(self.options.resume_from, self.start, total))
        began = time.perf_counter()
        with _progress.StopOnInterrupt() as interrupt, self.bar:
            while it < total:
                # the next chunk on the fast path, else the next iteration on its own
                values = None if self.fast is None else self._chunk(it)
                if values is None:
                    value, stop = self._one_iteration(it + 1, interrupt)
                    values = [value]
                else:
                    stop = interrupt.requested
                self._record(it + 1, values)
                it += len(values)
                if stop and it < total:
                    status = "interrupted"
                    self._save(it)
                    if self.rank == 0:
                        path = self.checkpoints.path
                        where = f"; checkpoint written to {path}" if path else ""
                        self.bar.write(f"interrupted at iteration {it}/{total}{where}")
                    break
                if it % every == 0 and it < total:
                    self._save(it)
            else:
                self._save(total)
        wall_time = time.perf_counter() - began
        for w in self.weights:
            w.grad = None
        self.model.info["iterations"] = len(self.losses)
        return TrainResult(model=self.model, losses=torch.tensor(self.losses, dtype=torch.float64),
                           wall_time=wall_time, iterations=len(self.losses), status=status,
                           checkpoint=self.checkpoints.path, config=self.settings,
                           rank=self.rank, fast_iterations=self.fast_iterations,
                           start=self.start)

    def _one_iteration(self, it: int, interrupt) -> Tuple[float, bool]:
        """Iteration `it` on its own: its meta-loss, the weights updated, and whether to stop
        after it (Ctrl-C here, or in a distributed run, in any process)."""
        o = self.options
        batch = self.entry.sample(o.family, self.config, self.local_batch, self.task_generator,
                                  o.dtype, o.device)
        value, grads = self.meta_step([w.detach() for w in self.weights], batch)
        stop = interrupt.requested
        if self.group is not None:
            # One all-reduce: the mean gradients, the mean meta-loss (the global meta-batch's:
            # the shares are equal) and whether any process was asked to stop, so that all
            # stop after the same iteration.
            flag = grads[0].new_full((1,), float(stop))
            buf = torch.cat([g.reshape(-1) for g in grads]
                            + [value.reshape(1).to(flag.dtype), flag])
            buf = self.group.all_reduce_mean(buf, f"the all-reduce of iteration {it}")
            grads = [g.view_as(w) for g, w in
                     zip(buf[:-2].split([w.numel() for w in self.weights]), self.weights)]
            value, stop = buf[-2], bool(buf[-1] > 0)
        value = value.item()
        if not math.isfinite(value):
            raise self._diverged(it, value)
        for w, g in zip(self.weights, grads):
            w.grad = g
        self.optimizer.step()
        if not all(torch.isfinite(w).all() for w in self.weights):
            raise self._diverged(it, value)
        return value, stop

    def _chunk(self, it: int) -> Optional[List[float]]:
        """After `it` iterations, the next chunk on the fast path: its meta-losses, or None
        when this iteration must go the per-iteration way."""
        state = self.fast.state(self.optimizer, self.weights)
        if state is None:
            return None
        n = self.fast.length(it, self.options.checkpoint_every)
        result = self.fast.run(self.weights, state, n)
        if result is None:  # the family cannot draw chunks: per-iteration from now on
            self.fast = None
            return None
        values, done = result
        self.fast_iterations += done
        if done < n:  # the op stopped where _one_iteration would have
            self._record(it + 1, values[:done])
            raise self._diverged(it + 1 + done, values[done])
        return values

    def _diverged(self, it: int, value: float) -> TrainingDiverged:
        """Iteration `it` stopped: its meta-loss `value` was not finite, or (finite) its step
        made the weights non-finite."""
        kept = self.checkpoints.kept()
        if not math.isfinite(value):
            return TrainingDiverged(f"the meta-loss is {value} at iteration {it}: training "
                                    "stopped before updating the weights with it" + kept, it)
        return TrainingDiverged(f"the optimizer step of iteration {it} made the weights "
                                "non-finite (the meta-loss was finite): training stopped"
                                + kept, it)

    def _record(self, first: int, values: List[float]) -> None:
        self.losses.extend(values)
        self.bar.update(first, values)

    def _save(self, iteration: int) -> None:
        if self.checkpoints.path is None:
            return
        state = _checkpoint.state(self.config, self.settings, iteration, self.model,
                                  self.optimizer, self.generator, self.losses)
        if self.group is not None:
            # Every process's task stream (rank 0's is `generator`), so that a resumed run
            # draws the tasks an uninterrupted one would.
            state["task_generators"] = self.group.gather(
                self.task_generator.get_state(),
                f"gathering the task streams at iteration {iteration}")
        self.checkpoints.save(state, write=self.rank == 0)
