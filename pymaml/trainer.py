"""pymaml.train: meta-training with MAML, FO-MAML or Reptile on a task family, with progress,
checkpoints, resume and a clean stop on Ctrl-C.

One meta-iteration: sample a meta-batch of tasks, compute the meta-gradient of the whole
batch (one fused op call on the fused backend, no autograd graph), hand it to the outer
torch.optim optimizer. The defaults are the seed's experiment.

The fast path: at the seed's sizes an iteration is a few microseconds of arithmetic, and
calling Python, the dispatcher and torch.optim once per iteration costs several times that.
So on the fused CPU backend, for MAML / FO-MAML on a family that can draw many meta-batches at
once (TaskFamily.sample_many, e.g. every FunctionTasks) with torch.optim's SGD or Adam built
with fused=True (as "sgd" and "adam" are), the trainer draws a chunk of iterations' tasks in
one call and runs them in one torch.ops.pymaml.train_chunk call, which also applies the
optimizer's steps to the real optimizer's state with the fused kernels its step() runs
(pymaml.outer_optim says which optimizers qualify). Chunking changes no result: the loss
history, the weights, the optimizer state and the generator state are bitwise those of the
per-iteration path, which every other run takes (custom samplers, Reptile, other optimizers
or settings, the reference backend).

Reproducibility: the run's randomness is one CPU torch.Generator (seeded by `seed`), used
first for the initial weights, then by the task sampler. A checkpoint holds the weights,
the optimizer state, the generator state and the loss history, so a resumed run ends with
bitwise the same weights as an uninterrupted one (same backend, device and thread count:
the fused op's result does not depend on the thread count).

Several processes: launched under torchrun (or with distributed=True), the run is data-parallel
over tasks, each process drawing its share of the meta-batch from its own stream and one
all-reduce per iteration averaging the meta-gradients (pymaml.distributed says how). Only rank 0
writes the checkpoint, the log lines and the progress bar; a checkpoint holds every process's
task stream, so it resumes under the same number of processes.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import threading
import time
from typing import Any, Dict, Optional, Tuple

import torch

from . import _io
from . import _ops
from . import distributed as _distributed
from . import functional as F
from . import outer_optim as _outer_optim
from . import reference as _reference
from . import tasks as _tasks
from .model import INITS, MetaMLP
from ._version import __version__

__all__ = ["train", "TrainResult", "TrainingDiverged", "ALGORITHMS", "OPTIMIZERS"]

ALGORITHMS = ("maml", "fomaml", "reptile")
OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}
DTYPES = {"float32": torch.float32, "float64": torch.float64}

# Settings that define a run: resuming with a different value of any of them is an error.
# (iterations may grow; backend, device, logging and checkpointing may change.)
_RUN_KEYS = ("task", "algorithm", "sizes", "activation", "loss", "inner_steps", "inner_lr",
             "meta_batch_size", "optimizer", "outer_lr", "optimizer_kwargs", "shots", "queries",
             "init", "dtype", "seed")


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
        model and losses).
    """
    model: MetaMLP
    losses: torch.Tensor
    wall_time: float
    iterations: int
    status: str
    checkpoint: Optional[str]
    config: Dict[str, Any]
    rank: int = 0


# ---- argument checks ----------------------------------------------------------------------------

def _positive_real(name, value):
    if F._check_finite(name, value) <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def _optimizer_class(optimizer):
    if isinstance(optimizer, str):
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(map(repr, OPTIMIZERS))} or a "
                             f"torch.optim.Optimizer class; got {optimizer!r}")
        return OPTIMIZERS[optimizer], optimizer
    if isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer):
        return optimizer, f"{optimizer.__module__}.{optimizer.__qualname__}"
    raise TypeError(f"optimizer must be 'sgd', 'adam' or a torch.optim.Optimizer class, got {optimizer!r}")


# ---- one meta-iteration ---------------------------------------------------------------------------

def _meta_step_fn(algorithm, backend, *, sizes, activation, loss, inner_lr, inner_steps):
    """fn(params [P] detached, TaskBatch) -> (meta-loss 0-d, gradient [P] for the optimizer).
    The arguments were checked once; the fused backend calls the op directly (no autograd
    wrapper, no per-call Python checks beyond the op's own)."""
    hyper = dict(sizes=sizes, inner_lr=inner_lr, steps=inner_steps, activation=activation, loss=loss)
    if algorithm in ("maml", "fomaml"):
        first_order = algorithm == "fomaml"
        if backend == "fused":
            def step(params, batch):
                return _ops.ops.maml_loss(params, *batch, sizes, inner_lr, inner_steps, activation,
                                          loss, first_order, True)
        else:
            def step(params, batch):
                params = params.requires_grad_()
                value = _reference.maml_loss(params, *batch, first_order=first_order, **hyper)
                (grad,) = torch.autograd.grad(value, params)
                return value.detach(), grad
        return step

    # Reptile: the inner loop trains on support and query together; the update direction is
    # params - mean over tasks of the adapted params, fed to the optimizer as a gradient.
    loss_fn = _reference.LOSSES[loss]

    def step(params, batch):
        x = torch.cat([batch.x_support, batch.x_query], dim=1)
        y = torch.cat([batch.y_support, batch.y_query], dim=1)
        with torch.no_grad():
            if backend == "fused":
                adapted = _ops.ops.adapt(params, x, y, sizes, inner_lr, inner_steps, activation,
                                         loss, True)
            else:
                adapted = _reference.adapt(params, x, y, first_order=True, **hyper)
            value = loss_fn(F.mlp_forward(adapted, batch.x_query, sizes=sizes, activation=activation),
                            batch.y_query)
            return value, params - adapted.mean(0)
    return step


# ---- the chunked fast path ----------------------------------------------------------------------

_CHUNK_FIRST = 16       # iterations of the first train_chunk call, timed to size the next ones
_CHUNK_MAX = 1000       # iterations per call, at most
_CHUNK_SECONDS = 0.05   # the aim for one call: Ctrl-C and the progress bar answer within it

def _next_chunk_size(n: int, seconds: float) -> int:
    """The next chunk's size, so that a call takes about _CHUNK_SECONDS. (Results do not depend
    on chunk sizes: the tasks of a chunk are those of its iterations drawn one by one.)"""
    if seconds <= 0:
        return _CHUNK_MAX
    return max(1, min(_CHUNK_MAX, int(_CHUNK_SECONDS * n / seconds)))


def _train_chunk(*args):
    # One seam for the tests to watch the fast path.
    return _ops.ops.train_chunk(*args)


# ---- Ctrl-C -------------------------------------------------------------------------------------

class _StopOnInterrupt:
    """Turns the first Ctrl-C into a request to stop after the current iteration (checked by
    the loop, which then checkpoints); a second Ctrl-C interrupts at once. Only in the main
    thread, where Python delivers signals, and only over a Python handler (a process that
    ignores SIGINT, or set it from C, keeps its choice)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread() and callable(signal.getsignal(signal.SIGINT)):
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, self._previous)

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


# ---- progress -------------------------------------------------------------------------------------

class _Progress:
    """A tqdm bar with the running meta-loss (when shown) and/or a log line every `log_every`
    iterations with the mean meta-loss since the last line."""

    def __init__(self, show: bool, log_every: int, start: int, total: int):
        self.log_every = log_every
        self.total = total
        self.bar = None
        if show:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, initial=start, unit="it", dynamic_ncols=True,
                            desc="meta-training", smoothing=0.05)
        self.running = None
        self.window_sum, self.window_n = 0.0, 0
        self.started = time.perf_counter()

    def update(self, first: int, values) -> None:
        """Iterations first, first + 1, ... gave the meta-losses `values` (floats)."""
        if self.bar is None and not self.log_every:
            return
        for iteration, loss in enumerate(values, first):
            # Running meta-loss: an exponential moving average over about the last 100 iterations.
            self.running = loss if self.running is None else 0.99 * self.running + 0.01 * loss
            self.window_sum += loss
            self.window_n += 1
            if self.log_every and (iteration % self.log_every == 0 or iteration == self.total):
                self.write(f"iteration {iteration}/{self.total}  meta-loss {self.window_sum / self.window_n:.5f} "
                           f"(mean of the last {self.window_n})  {time.perf_counter() - self.started:.1f} s")
                self.window_sum, self.window_n = 0.0, 0
        if self.bar is not None and values:
            last = first + len(values) - 1
            self.bar.update(len(values))
            # the postfix as of every hundredth iteration (and the last)
            if last // 100 > (first - 1) // 100 or last == self.total:
                self.bar.set_postfix(meta_loss=f"{self.running:.4f}", refresh=False)

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


# ---- the trainer ------------------------------------------------------------------------------------

def train(task="seed-sine", *, algorithm: str = "maml", sizes=(1, 32, 32, 1),
          activation: str = "relu", loss: str = "l1", inner_steps: int = 5,
          inner_lr: float = 3e-2, meta_batch_size: int = 1, iterations: int = 275_000,
          optimizer="sgd", outer_lr: float = 1e-2, optimizer_kwargs: Optional[dict] = None,
          shots: Optional[int] = None, queries: Optional[int] = None, init="seed",
          backend: str = "auto", device="cpu", dtype=torch.float32, seed: int = 0,
          log_every: Optional[int] = None, progress: Optional[bool] = None,
          checkpoint=None, checkpoint_every: int = 10_000, resume=False,
          overwrite: bool = False, distributed: Optional[bool] = None,
          distributed_timeout: float = _distributed.DEFAULT_TIMEOUT_S) -> TrainResult:
    """Meta-trains an MLP and returns a TrainResult (model, loss history, wall time).

    task: "seed-sine", "sine", a pymaml.tasks.TaskFamily, or a callable
        fn(T, generator) -> (x_support, y_support, x_query, y_query) of [T, points, features];
        shots / queries set the named families' support / query sizes.
    algorithm: "maml" (exact second order), "fomaml" (first order) or "reptile" (outer update
        toward the mean adapted weights; inner loop on support and query together).
    sizes, activation ("relu" | "tanh"), loss ("l1" | "mse"), inner_steps, inner_lr: the
        network and its inner loop. meta_batch_size: tasks per meta-iteration.
    optimizer: "sgd", "adam" or a torch.optim.Optimizer class, built with lr=outer_lr and
        optimizer_kwargs ("sgd" / "adam" also with fused=True for MAML / FO-MAML on the fused
        CPU backend, unless optimizer_kwargs set fused, foreach or differentiable).
    init: "seed" (W uniform in ±1/sqrt(fan_in), zero biases), "torch" (nn.Linear's default),
        or a MetaMLP / [P] tensor to start from (copied).
    backend: "fused", "reference" or "auto". device, dtype (torch.float32 | torch.float64).
    seed: seeds the initial weights and the task sampler.
    log_every: a log line every this many iterations (0: none; default: none when the
        progress bar shows, else ten lines per run). progress: the tqdm bar (default: shown
        when stderr is a terminal).
    checkpoint: a path; written atomically every checkpoint_every iterations, at the end, and
        on Ctrl-C. An existing checkpoint is never replaced unless resume or overwrite is set.
    resume: True to continue from `checkpoint`, or the path of a checkpoint to continue from
        (then written to `checkpoint`, or to the same path). The run's settings must match.
    distributed: None (default): data-parallel over processes when launched by torchrun with
        two or more processes, or when a torch.distributed process group of two or more is
        initialised; True: always (an error without a launch environment or group); False:
        never. meta_batch_size is the global meta-batch: each of W processes draws
        meta_batch_size / W tasks (W must divide it). See pymaml.distributed.
    distributed_timeout: seconds a process waits for the others at a collective before the
        run stops with pymaml.distributed.DistributedError (when train() creates the group;
        torchrun's processes then all stop).

    Ctrl-C stops after the current iteration (on the chunked fast path, the current chunk:
    about 50 ms of work), writes the checkpoint and returns with status "interrupted". A NaN or infinite meta-loss raises TrainingDiverged naming the
    iteration, before the weights are updated with it (as do weights that an optimizer step
    made non-finite); the last checkpoint is kept.
    """
    # ---- check the arguments (once: the loop runs without per-iteration checks) ----
    F._check_choice("algorithm", algorithm, ALGORITHMS)
    sizes = F._check_sizes(sizes)
    F._check_choice("activation", activation, F.ACTIVATIONS)
    F._check_choice("loss", loss, F.LOSSES)
    inner_steps = F._check_int("inner_steps", inner_steps, 0)
    inner_lr = F._check_finite("inner_lr", inner_lr)
    meta_batch_size = F._check_int("meta_batch_size", meta_batch_size, 1)
    iterations = F._check_int("iterations", iterations, 0)
    opt_cls, opt_name = _optimizer_class(optimizer)
    outer_lr = _positive_real("outer_lr", outer_lr)
    if optimizer_kwargs is not None and not isinstance(optimizer_kwargs, dict):
        raise TypeError(f"optimizer_kwargs must be a dict, got {type(optimizer_kwargs).__name__}")
    optimizer_kwargs = _io.plain("optimizer_kwargs", dict(optimizer_kwargs or {}))
    if "lr" in optimizer_kwargs:
        raise ValueError("give the outer learning rate as outer_lr, not in optimizer_kwargs")
    family = _tasks.get_family(task, shots=shots, queries=queries)
    for what, n, want in (("input", family.n_in, sizes[0]), ("output", family.n_out, sizes[-1])):
        if n is not None and n != want:
            raise ValueError(f"task {family.name!r} has {n} {what} feature(s) but sizes is {sizes}")
    if dtype not in DTYPES.values():
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be a torch device like 'cpu' or 'cuda', got {device!r}") from None
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as exc:  # e.g. "Torch not compiled with CUDA enabled"
        raise ValueError(f"device {str(device)!r} is not usable here: {exc}") from None
    seed = F._check_seed(seed)
    if log_every is not None:
        log_every = F._check_int("log_every", log_every, 0)
    checkpoint_every = F._check_int("checkpoint_every", checkpoint_every, 1)
    if isinstance(init, str):
        F._check_choice("init", init, INITS)
        init_name = init
    elif isinstance(init, (MetaMLP, torch.Tensor)):
        init_name = "given"
    else:
        raise TypeError(f"init must be 'seed', 'torch', a MetaMLP or a [P] tensor, got {type(init).__name__}")

    if distributed not in (None, True, False):
        raise TypeError(f"distributed must be None (auto), True or False, got {distributed!r}")
    distributed_timeout = _positive_real("distributed_timeout", distributed_timeout)

    config = dict(task=family.name, algorithm=algorithm, sizes=sizes, activation=activation,
                  loss=loss, inner_steps=inner_steps, inner_lr=inner_lr,
                  meta_batch_size=meta_batch_size, optimizer=opt_name, outer_lr=outer_lr,
                  optimizer_kwargs=optimizer_kwargs, shots=getattr(family, "shots", None),
                  queries=getattr(family, "queries", None), init=init_name,
                  dtype=str(dtype).replace("torch.", ""), seed=int(seed), iterations=iterations)
    checkpoint = _check_path("checkpoint", checkpoint)
    resume_from = None
    if resume is True:
        if checkpoint is None:
            raise ValueError("resume=True needs the checkpoint path to resume from")
        resume_from = checkpoint
    elif resume not in (False, None):
        resume_from = _check_path("resume", resume)
        checkpoint = checkpoint or resume_from

    device = _distributed.local_device(device)
    group = _distributed.Group.join(distributed, device, distributed_timeout)
    try:
        return _train(group, config, family, opt_cls, optimizer_kwargs, init, backend, device,
                      dtype, log_every, progress, checkpoint, checkpoint_every, resume_from,
                      overwrite)
    finally:
        if group is not None:
            group.close()


def _train(group, config, family, opt_cls, optimizer_kwargs, init, backend, device, dtype,
           log_every, progress, checkpoint, checkpoint_every, resume_from, overwrite) -> TrainResult:
    """train() after its argument checks, in a run of one process (group None) or of several."""
    sizes, activation, loss = config["sizes"], config["activation"], config["loss"]
    inner_lr, inner_steps, algorithm = config["inner_lr"], config["inner_steps"], config["algorithm"]
    iterations, seed = config["iterations"], config["seed"]
    rank, processes = (0, 1) if group is None else (group.rank, group.world_size)
    meta_batch_size = config["meta_batch_size"]
    if meta_batch_size % processes:
        raise ValueError(f"meta_batch_size {meta_batch_size} does not divide across {processes} "
                         f"processes: it is the global meta-batch, split evenly, so use a "
                         f"multiple of {processes}")
    local_batch = meta_batch_size // processes
    config["processes"] = processes

    # In a distributed run, the file checks and reads happen on rank 0 (whose disk the
    # checkpoint is on) and their outcome, an error included, reaches every process.
    on_rank0 = (lambda fn, what: fn()) if group is None else group.from_rank0

    # ---- the starting state: fresh, or from a checkpoint ----
    def check_checkpoint_path():
        directory = os.path.dirname(os.path.abspath(checkpoint))
        if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
            raise ValueError(f"checkpoint {checkpoint}: the directory {directory} does not exist "
                             "or is not writable")
        # Saved training state is never replaced unless asked: only the run it holds may
        # write over it (resume), or overwrite=True.
        if checkpoint != resume_from and not overwrite and os.path.exists(checkpoint):
            raise FileExistsError(f"checkpoint {checkpoint} already exists: resume it (resume=True, "
                                  "--resume), or pass overwrite=True (--overwrite) to start a new "
                                  "run over it, or choose another path")

    if checkpoint is not None:
        on_rank0(check_checkpoint_path, "checking the checkpoint path")

    generator = torch.Generator().manual_seed(seed)
    info = dict(task=family.name, algorithm=algorithm, shots=config["shots"])
    model = _initial_model(init, sizes, activation, loss, inner_lr, inner_steps, generator,
                           dtype, device, info)
    params = model.params
    # Rank 0 draws its tasks from the run's generator, the others from their own streams.
    task_generator = generator if rank == 0 else \
        torch.Generator().manual_seed(_distributed.task_seed(seed, rank))
    if group is not None:  # the same start everywhere, whatever `init` each process was given
        group.broadcast(params, "sharing rank 0's initial weights")
    which = F._choose_backend(backend, params.detach(), sizes, inner_steps, ())
    # Runs train_chunk can serve (see the module docstring) build "sgd" / "adam" with the
    # kernel it shares, in any number of processes, so that a run's steps do not depend on it.
    chunkable = which == "fused" and device.type == "cpu" and algorithm in ("maml", "fomaml")
    if chunkable and config["optimizer"] in OPTIMIZERS:
        optimizer_kwargs = _outer_optim.build_kwargs(optimizer_kwargs)
    opt = opt_cls([params], lr=config["outer_lr"], **optimizer_kwargs)
    losses = []
    start = 0
    if resume_from is not None:
        saved = on_rank0(lambda: _io.load_file(resume_from), f"reading checkpoint {resume_from}")
        start, losses = _restore(resume_from, saved, config, model, opt, generator, device)
        if rank > 0:
            task_generator.set_state(saved["task_generators"][rank])

    meta_step = _meta_step_fn(algorithm, which, sizes=sizes, activation=activation, loss=loss,
                              inner_lr=inner_lr, inner_steps=inner_steps)
    config["backend"] = which
    config["device"] = str(device)

    owns_checkpoint = checkpoint is not None and checkpoint == resume_from

    def save(iteration):
        nonlocal owns_checkpoint
        if checkpoint is None:
            return
        owns_checkpoint = True
        state = dict(format=_io.CHECKPOINT_FORMAT, format_version=1, pymaml_version=__version__,
                     config=config, iteration=iteration, model=model.to_dict(),
                     optimizer=opt.state_dict(), generator=generator.get_state(),
                     losses=torch.tensor(losses, dtype=torch.float64))
        if group is not None:
            # Every process's task stream (rank 0's is `generator`), so that a resumed run
            # draws the tasks an uninterrupted one would.
            state["task_generators"] = group.gather(task_generator.get_state(),
                                                    f"gathering the task streams at iteration {iteration}")
        if rank == 0:
            _io.atomic_save(state, checkpoint)

    def kept_checkpoint():
        return f"; the last checkpoint, {checkpoint}, is kept" if owns_checkpoint else ""

    show = rank == 0 and (sys.stderr.isatty() if progress is None else bool(progress))
    if log_every is None:
        log_every = 0 if show else max(1, iterations // 10)
    if rank > 0:
        log_every = 0
    bar = _Progress(show and start < iterations, log_every, start, iterations)

    def diverged_loss(value, it):
        return TrainingDiverged(f"the meta-loss is {value} at iteration {it}: training stopped "
                                "before updating the weights with it" + kept_checkpoint(), it)

    def diverged_weights(it):
        return TrainingDiverged(f"the optimizer step of iteration {it} made the weights "
                                "non-finite (the meta-loss was finite): training stopped"
                                + kept_checkpoint(), it)

    def record(first, values):
        losses.extend(values)
        bar.update(first, values)

    def one_iteration(it, interrupt) -> Tuple[float, bool]:
        """The per-iteration path: iteration `it`'s meta-loss, the weights updated, and whether
        to stop after it (Ctrl-C here, or in a distributed run, in any process)."""
        batch = family.sample(local_batch, generator=task_generator, dtype=dtype, device=device)
        value, grad = meta_step(params.detach(), batch)
        stop_requested = interrupt.requested
        if group is not None:
            # One all-reduce: the mean gradient, the mean meta-loss (the global meta-batch's:
            # the shares are equal) and whether any process was asked to stop, so that all
            # stop after the same iteration.
            flag = grad.new_full((1,), float(stop_requested))
            buf = torch.cat([grad.reshape(-1), value.reshape(1).to(grad.dtype), flag])
            buf = group.all_reduce_mean(buf, f"the all-reduce of iteration {it}")
            grad, value, stop_requested = buf[:-2], buf[-2], bool(buf[-1] > 0)
        value = value.item()
        if not math.isfinite(value):
            raise diverged_loss(value, it)
        params.grad = grad
        opt.step()
        if not torch.isfinite(params).all():
            raise diverged_weights(it)
        return value, stop_requested

    # The fast path in one process only (the all-reduce sits between each iteration's
    # meta-gradient and its optimizer step).
    fast = None
    if group is None and chunkable and start < iterations:
        fast = _outer_optim.chunk_spec(opt)
    first_order = algorithm == "fomaml"

    def chunk(first, n, state) -> Optional[list]:
        """Iterations first .. first + n - 1 in one train_chunk call: their meta-losses, or
        None when the family cannot draw them at once (nothing drawn then)."""
        batch = family.sample_many(n, meta_batch_size, generator=task_generator, dtype=dtype,
                                   device=device)
        if batch is None:
            return None
        values, done = _train_chunk(params.detach(), state, *batch, sizes, inner_lr,
                                    inner_steps, activation, loss, first_order, *fast)
        done, values = int(done), values.tolist()
        if done < n:  # the op stopped at iteration first + done, as one_iteration would
            record(first, values[:done])
            value = values[done]
            if math.isfinite(value):
                raise diverged_weights(first + done)
            raise diverged_loss(value, first + done)
        return values

    status = "completed"
    began = time.perf_counter()
    it = start
    size = _CHUNK_FIRST
    try:
        with _StopOnInterrupt() as interrupt:
            while it < iterations:
                values = None
                state = None if fast is None else _outer_optim.chunk_state(opt, params, fast)
                if state is not None:
                    # a chunk never crosses a checkpoint or the end
                    n = min(size, iterations - it, checkpoint_every - it % checkpoint_every)
                    t0 = time.perf_counter()
                    values = chunk(it + 1, n, state)
                    if values is None:
                        fast = None
                    else:
                        size = _next_chunk_size(n, time.perf_counter() - t0)
                        stop = interrupt.requested
                if values is None:
                    value, stop = one_iteration(it + 1, interrupt)
                    values = [value]
                record(it + 1, values)
                it += len(values)
                if stop and it < iterations:
                    status = "interrupted"
                    save(it)
                    if rank == 0:
                        where = f"; checkpoint written to {checkpoint}" if checkpoint else ""
                        bar.write(f"interrupted at iteration {it}/{iterations}{where}")
                    break
                if it % checkpoint_every == 0 and it < iterations:
                    save(it)
            else:
                save(iterations)
    finally:
        bar.close()
    wall_time = time.perf_counter() - began
    params.grad = None
    model.info["iterations"] = len(losses)
    return TrainResult(model=model, losses=torch.tensor(losses, dtype=torch.float64),
                       wall_time=wall_time, iterations=len(losses), status=status,
                       checkpoint=checkpoint, config=config, rank=rank)


def _check_path(name, path):
    if path is None:
        return None
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a file path, got {type(path).__name__}")
    return os.fspath(path)


def _initial_model(init, sizes, activation, loss, inner_lr, inner_steps, generator, dtype,
                   device, info) -> MetaMLP:
    settings = dict(loss=loss, inner_lr=inner_lr, inner_steps=inner_steps, info=info)
    if isinstance(init, str):
        # Drawn on the CPU from the run's generator, then moved: the same start on every device.
        model = MetaMLP(sizes, activation, init=init, generator=generator, dtype=torch.float64,
                        **settings)
        return model.to(device=device, dtype=dtype)
    start = init.params if isinstance(init, MetaMLP) else init
    if isinstance(init, MetaMLP) and (init.sizes != sizes or init.activation != activation):
        raise ValueError(f"init is a MetaMLP with sizes {init.sizes} and activation "
                         f"{init.activation!r}, but training asks for {sizes} and {activation!r}")
    F._check_params(start, sizes)
    return MetaMLP(sizes, activation, params=start.detach().to(device=device, dtype=dtype), **settings)


def _restore(path, d, config, model, opt, generator, device):
    """Loads checkpoint `d` (read from `path`) into model, opt and generator; returns
    (iteration, losses list)."""
    if d["format"] != _io.CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is a saved model, not a training checkpoint: pass it as init= "
                         "to start a new run from its weights")
    saved = d["config"]
    differ = [f"{k}={saved.get(k)!r} (this call: {config[k]!r})" for k in _RUN_KEYS
              if saved.get(k) != config[k]]
    if differ:
        raise ValueError(f"checkpoint {path} was written by a different run: " + "; ".join(differ))
    # Each process's task stream is in the checkpoint: it resumes under as many processes.
    written_by = saved.get("processes", 1)
    if written_by != config["processes"]:
        raise ValueError(f"checkpoint {path} was written by a run of {written_by} process(es); "
                         f"resume it with {written_by} (this run has {config['processes']})")
    iteration = int(d["iteration"])
    if iteration > config["iterations"]:
        raise ValueError(f"checkpoint {path} is at iteration {iteration}, past iterations="
                         f"{config['iterations']}")
    with torch.no_grad():
        model.params.copy_(d["model"]["params"].to(device))
    opt.load_state_dict(d["optimizer"])
    generator.set_state(d["generator"])
    return iteration, d["losses"].tolist()
