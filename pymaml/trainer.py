"""pymaml.train: meta-training with MAML, FO-MAML or Reptile on a task family, with progress,
checkpoints, resume and a clean stop on Ctrl-C.

One meta-iteration: sample a meta-batch of tasks, compute the meta-gradient of the whole
batch (one fused op call on the fused backend, no autograd graph), hand it to the outer
torch.optim optimizer. The defaults are the seed's experiment.

Reproducibility: the run's randomness is one CPU torch.Generator (seeded by `seed`), used
first for the initial weights, then by the task sampler. A checkpoint holds the weights,
the optimizer state, the generator state and the loss history, so a resumed run ends with
bitwise the same weights as an uninterrupted one (same backend, device and thread count:
the fused op's result does not depend on the thread count).
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import threading
import time
from typing import Any, Dict, Optional

import torch

from . import _io
from . import _ops
from . import functional as F
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
    checkpoint: the checkpoint path, or None; config: the run's settings.
    """
    model: MetaMLP
    losses: torch.Tensor
    wall_time: float
    iterations: int
    status: str
    checkpoint: Optional[str]
    config: Dict[str, Any]


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

    def update(self, iteration: int, loss: float) -> None:
        # Running meta-loss: an exponential moving average over about the last 100 iterations.
        self.running = loss if self.running is None else 0.99 * self.running + 0.01 * loss
        self.window_sum += loss
        self.window_n += 1
        if self.bar is not None:
            self.bar.update(1)
            if iteration % 100 == 0 or iteration == self.total:
                self.bar.set_postfix(meta_loss=f"{self.running:.4f}", refresh=False)
        if self.log_every and (iteration % self.log_every == 0 or iteration == self.total):
            self.write(f"iteration {iteration}/{self.total}  meta-loss {self.window_sum / self.window_n:.5f} "
                       f"(mean of the last {self.window_n})  {time.perf_counter() - self.started:.1f} s")
            self.window_sum, self.window_n = 0.0, 0

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
          overwrite: bool = False) -> TrainResult:
    """Meta-trains an MLP and returns a TrainResult (model, loss history, wall time).

    task: "seed-sine", "sine", a pymaml.tasks.TaskFamily, or a callable
        fn(T, generator) -> (x_support, y_support, x_query, y_query) of [T, points, features];
        shots / queries set the named families' support / query sizes.
    algorithm: "maml" (exact second order), "fomaml" (first order) or "reptile" (outer update
        toward the mean adapted weights; inner loop on support and query together).
    sizes, activation ("relu" | "tanh"), loss ("l1" | "mse"), inner_steps, inner_lr: the
        network and its inner loop. meta_batch_size: tasks per meta-iteration.
    optimizer: "sgd", "adam" or a torch.optim.Optimizer class, built with lr=outer_lr and
        optimizer_kwargs.
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

    Ctrl-C stops after the current iteration, writes the checkpoint and returns with
    status "interrupted". A NaN or infinite meta-loss raises TrainingDiverged naming the
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

    config = dict(task=family.name, algorithm=algorithm, sizes=sizes, activation=activation,
                  loss=loss, inner_steps=inner_steps, inner_lr=inner_lr,
                  meta_batch_size=meta_batch_size, optimizer=opt_name, outer_lr=outer_lr,
                  optimizer_kwargs=optimizer_kwargs, shots=getattr(family, "shots", None),
                  queries=getattr(family, "queries", None), init=init_name,
                  dtype=str(dtype).replace("torch.", ""), seed=int(seed), iterations=iterations)

    # ---- the starting state: fresh, or from a checkpoint ----
    checkpoint = _check_path("checkpoint", checkpoint)
    resume_from = None
    if resume is True:
        if checkpoint is None:
            raise ValueError("resume=True needs the checkpoint path to resume from")
        resume_from = checkpoint
    elif resume not in (False, None):
        resume_from = _check_path("resume", resume)
        checkpoint = checkpoint or resume_from
    if checkpoint is not None:
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

    generator = torch.Generator().manual_seed(int(seed))
    info = dict(task=family.name, algorithm=algorithm, shots=config["shots"])
    model = _initial_model(init, sizes, activation, loss, inner_lr, inner_steps, generator,
                           dtype, device, info)
    params = model.params
    opt = opt_cls([params], lr=outer_lr, **optimizer_kwargs)
    losses = []
    start = 0
    if resume_from is not None:
        start, losses = _restore(resume_from, config, model, opt, generator, device)

    which = F._choose_backend(backend, params.detach(), sizes, inner_steps, ())
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
        _io.atomic_save(dict(format=_io.CHECKPOINT_FORMAT, format_version=1,
                             pymaml_version=__version__, config=config, iteration=iteration,
                             model=model.to_dict(), optimizer=opt.state_dict(),
                             generator=generator.get_state(),
                             losses=torch.tensor(losses, dtype=torch.float64)), checkpoint)

    def kept_checkpoint():
        return f"; the last checkpoint, {checkpoint}, is kept" if owns_checkpoint else ""

    show = sys.stderr.isatty() if progress is None else bool(progress)
    if log_every is None:
        log_every = 0 if show else max(1, iterations // 10)
    bar = _Progress(show and start < iterations, log_every, start, iterations)
    status = "completed"
    began = time.perf_counter()
    try:
        with _StopOnInterrupt() as interrupt:
            for it in range(start + 1, iterations + 1):
                batch = family.sample(meta_batch_size, generator=generator, dtype=dtype, device=device)
                value, grad = meta_step(params.detach(), batch)
                value = value.item()
                if not math.isfinite(value):
                    raise TrainingDiverged(f"the meta-loss is {value} at iteration {it}: training "
                                           "stopped before updating the weights with it"
                                           + kept_checkpoint(), it)
                params.grad = grad
                opt.step()
                if not torch.isfinite(params).all():
                    raise TrainingDiverged(f"the optimizer step of iteration {it} made the weights "
                                           "non-finite (the meta-loss was finite): training stopped"
                                           + kept_checkpoint(), it)
                losses.append(value)
                bar.update(it, value)
                if interrupt.requested and it < iterations:
                    status = "interrupted"
                    save(it)
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
                       checkpoint=checkpoint, config=config)


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


def _restore(path, config, model, opt, generator, device):
    """Loads a checkpoint into model, opt and generator; returns (iteration, losses list)."""
    d = _io.load_file(path)
    if d["format"] != _io.CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is a saved model, not a training checkpoint: pass it as init= "
                         "to start a new run from its weights")
    saved = d["config"]
    differ = [f"{k}={saved.get(k)!r} (this call: {config[k]!r})" for k in _RUN_KEYS
              if saved.get(k) != config[k]]
    if differ:
        raise ValueError(f"checkpoint {path} was written by a different run: " + "; ".join(differ))
    iteration = int(d["iteration"])
    if iteration > config["iterations"]:
        raise ValueError(f"checkpoint {path} is at iteration {iteration}, past iterations="
                         f"{config['iterations']}")
    with torch.no_grad():
        model.params.copy_(d["model"]["params"].to(device))
    opt.load_state_dict(d["optimizer"])
    generator.set_state(d["generator"])
    return iteration, d["losses"].tolist()
