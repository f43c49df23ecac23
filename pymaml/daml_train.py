"""pymaml.train(..., algorithm="daml"): meta-training DAML (pymaml.daml) on a DAML task family.

The defaults are the seed's DAML experiment (the published continuation of the seed): task
"daml-sine" (one unlabeled source input per inner step, 4 labeled target points), base network
1-32-32-1 ReLU initialised as the seed's MAML network, adaptation-loss network 65-32-32-1 ReLU
(W uniform in ±1/sqrt(fan_in), zero biases), inner loss mean |h|, 5 inner steps at 0.03,
outer SGD at 0.01 on theta and psi together, one task per iteration, 275,000 iterations, L1
outer loss.

The run keeps theta (params, P) and psi (loss_params, P_loss) in ONE flat leaf tensor
`weights` = cat[params, loss_params] (the DAMLModel's parameter), stepped by ONE optimizer.
Two paths, bitwise the same:
- the chunked fast path (fused backend on the CPU, torch.optim SGD / Adam with fused=True,
  a family with sample_daml_many such as DAMLSine): many iterations per call of
  torch.ops.pymaml.daml_train_chunk, which applies the optimizer's steps in place with the
  kernel torch.optim's fused step runs (pymaml.outer_optim);
- the per-iteration path (the reference backend, any torch.optim class, users' samplers):
  sample_daml, pymaml.functional.daml_loss(weights[:P], weights[P:], ...) and its gradients
  to both parts, concatenated into weights.grad, then optimizer.step().

Reproducibility and checkpoints as pymaml.train's MAML runs: one CPU generator seeded by
`seed` draws the initial weights (the base network's, then the loss network's), then the
tasks; a checkpoint (format "pymaml.daml-checkpoint", pymaml._io: atomic, sealed, weights_only)
holds the settings, the iteration, the model, the optimizer's state_dict, the generator's
state and the loss history, and a resumed run ends with bitwise the weights of an
uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Dict, List, Optional, Tuple

import torch

from . import _checks
from . import _io, _ops
from . import checkpoint as _checkpoint
from . import config as _config
from . import daml as _daml
from . import functional as F
from . import outer_optim
from . import progress as _progress
from . import reference as _reference
from . import tasks as _tasks
from ._layout import num_params
from ._version import __version__
from .daml_model import DAMLModel, default_loss_sizes

__all__ = ["train_daml", "DAMLConfig", "check_checkpoint"]

FORMAT_VERSION = 1
CHUNK_FIRST = 16       # as pymaml.fast_path: the first call, timed to size the next ones
CHUNK_MAX = 1000
CHUNK_SECONDS = 0.05

# pymaml.train's arguments that DAML has no use for, with the value that means "unset".
_MAML_ONLY = dict(inner_batch=None, learn_inner_lr=None, adapt_layers=None)


@dataclasses.dataclass(frozen=True)
class DAMLConfig:
    """The settings that define a DAML run (what a checkpoint stores; a resume must match them
    all but `iterations`, which may grow)."""
    task: str
    algorithm: str
    sizes: Tuple[int, ...]
    loss_sizes: Tuple[int, ...]
    activation: str
    loss: str
    adapt_loss: str
    inner_steps: int
    inner_lr: float
    meta_batch_size: int
    optimizer: str
    outer_lr: float
    optimizer_kwargs: Dict[str, Any]
    shots: Optional[int]
    queries: Optional[int]
    init: str
    dtype: str
    seed: int
    iterations: int

    def to_dict(self) -> Dict[str, Any]:
        return dict(dataclasses.asdict(self), sizes=list(self.sizes),
                    loss_sizes=list(self.loss_sizes))

    def differences(self, saved: Dict[str, Any]) -> List[str]:
        mine = self.to_dict()
        return _config.differences(mine, saved, [k for k in mine if k != "iterations"])


@dataclasses.dataclass(frozen=True)
class _Options:
    family: Any
    optimizer_class: type
    init: Any
    dtype: torch.dtype
    device: torch.device
    backend: str
    log_every: Optional[int]
    progress: Optional[bool]
    checkpoint: Optional[str]
    checkpoint_every: int
    resume_from: Optional[str]
    overwrite: bool


def _config_from(args: Dict[str, Any]) -> Tuple[DAMLConfig, _Options]:
    """pymaml.train's arguments (a dict, by name) for a DAML run, checked."""
    for name, unset in _MAML_ONLY.items():
        if args.get(name) is not unset:
            raise ValueError(f"{name} does not apply to algorithm='daml' (DAML's inner loop "
                             f"adapts every layer of the base network at one fixed rate, on its "
                             f"own source batch per step); leave it unset")
    if args.get("distributed"):
        raise ValueError("distributed=True: DAML runs in one process (distributed=None or False)")
    task = args["task"]
    if task == "seed-sine":  # train()'s default task: the seed's, for DAML its DAML experiment
        task = "daml-sine"
    family = _tasks.checked_daml(_tasks.get_daml_family(task, shots=args["shots"],
                                                        queries=args["queries"]))
    sizes = tuple(_checks.check_sizes(args["sizes"]))
    loss_sizes = args.get("loss_sizes")
    loss_sizes = default_loss_sizes(sizes) if loss_sizes is None else loss_sizes
    sizes, loss_sizes = (tuple(s) for s in _checks.check_daml_sizes(sizes, loss_sizes))
    activation = _checks.check_choice("activation", args["activation"], _checks.ACTIVATIONS)
    loss = _checks.check_choice("loss", args["loss"], _checks.LOSSES)
    adapt_loss = args.get("adapt_loss") or "l1"
    adapt_loss = _checks.check_choice("adapt_loss", adapt_loss, _checks.ADAPT_LOSSES)
    inner_steps = _checks.check_int("inner_steps", args["inner_steps"], 0)
    if inner_steps < 1:
        raise ValueError(f"inner_steps must be >= 1 for DAML: with no inner step the loss "
                         f"network is never used and gets no gradient; got {inner_steps}")
    inner_lr = _checks.check_finite("inner_lr", args["inner_lr"])
    meta_batch_size = _checks.check_int("meta_batch_size", args["meta_batch_size"], 1)
    iterations = _checks.check_int("iterations", args["iterations"], 0)
    optimizer_class, optimizer_name = _config._optimizer_class(args["optimizer"])
    outer_lr = _config._positive_real("outer_lr", args["outer_lr"])
    optimizer_kwargs = _config._optimizer_kwargs(args["optimizer_kwargs"])
    _config.check_optimizer_kwargs(optimizer_class, optimizer_kwargs, outer_lr)
    for what, n, want in (("input", family.n_in, sizes[0]), ("output", family.n_out, sizes[-1])):
        if n is not None and n != want:
            raise ValueError(f"task {family.name!r} has {n} {what} feature(s) but sizes is "
                             f"{list(sizes)}")
    dtype = args["dtype"]
    if dtype not in _config.DTYPES.values():
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}")
    device = _checks.check_device("device", args["device"])
    seed = _checks.check_seed(args["seed"])
    log_every = args["log_every"]
    if log_every is not None:
        log_every = _checks.check_int("log_every", log_every, 0)
    checkpoint_every = _checks.check_int("checkpoint_every", args["checkpoint_every"], 1)
    init = args["init"]
    if isinstance(init, str):
        init_name = _checks.check_choice("init", init, ("seed", "torch"))
    elif isinstance(init, DAMLModel):
        init_name = "given"
    else:
        raise TypeError(f"init must be 'seed', 'torch' or a DAMLModel for algorithm='daml', "
                        f"got {type(init).__name__}")
    _checks.check_choice("backend", args["backend"], _checks.BACKENDS)
    checkpoint, resume_from = _config._checkpoint_paths(args["checkpoint"], args["resume"])
    config = DAMLConfig(
        task=family.name, algorithm="daml", sizes=sizes, loss_sizes=loss_sizes,
        activation=activation, loss=loss, adapt_loss=adapt_loss, inner_steps=inner_steps,
        inner_lr=inner_lr, meta_batch_size=meta_batch_size, optimizer=optimizer_name,
        outer_lr=outer_lr, optimizer_kwargs=optimizer_kwargs,
        shots=getattr(family, "shots", None), queries=getattr(family, "queries", None),
        init=init_name, dtype=str(dtype).replace("torch.", ""), seed=seed,
        iterations=iterations)
    options = _Options(family=family, optimizer_class=optimizer_class, init=init, dtype=dtype,
                       device=device, backend=args["backend"], log_every=log_every,
                       progress=args["progress"], checkpoint=checkpoint,
                       checkpoint_every=checkpoint_every, resume_from=resume_from,
                       overwrite=bool(args["overwrite"]))
    return config, options


def train_daml(args: Dict[str, Any]):
    """pymaml.train's DAML run: `args` are train()'s arguments by name (see its docstring;
    loss_sizes and adapt_loss are DAML's own). Returns a pymaml.TrainResult whose model is a
    DAMLModel."""
    config, options = _config_from(args)
    with _reference.autograd_on():
        return _Run(config, options).loop()


def _initial_model(config: DAMLConfig, options: _Options, generator) -> DAMLModel:
    c = config
    settings = dict(loss=c.loss, adapt_loss=c.adapt_loss, inner_lr=c.inner_lr,
                    inner_steps=c.inner_steps,
                    info=dict(task=c.task, algorithm="daml", shots=c.shots, queries=c.queries))
    if isinstance(options.init, str):
        # Drawn in float64 on the CPU from the run's generator, then cast: the same start on
        # every device and dtype (as the MAML trainer).
        w = DAMLModel(c.sizes, c.loss_sizes, c.activation, init=options.init,
                      generator=generator, dtype=torch.float64).weights.detach()
    else:
        given = options.init
        if (given.sizes != list(c.sizes) or given.loss_sizes != list(c.loss_sizes)
                or given.activation != c.activation):
            raise ValueError(f"init is a DAMLModel with sizes {given.sizes}, loss_sizes "
                             f"{given.loss_sizes} and activation {given.activation!r}, but "
                             f"training asks for {list(c.sizes)}, {list(c.loss_sizes)} and "
                             f"{c.activation!r}")
        w = given.weights.detach()
    return DAMLModel(c.sizes, c.loss_sizes, c.activation,
                     weights=w.to(device=options.device, dtype=options.dtype), **settings)


def _backend(options: _Options, model: DAMLModel, config: DAMLConfig) -> str:
    """The backend serving the run's meta-gradients: "fused" where torch.ops.pymaml.daml_loss
    can serve it (under "auto"), else "reference"."""
    return _daml._choose_backend(options.backend, "daml_loss", model.params.detach(),
                                 list(config.sizes), list(config.loss_sizes),
                                 config.inner_steps, ())


class _Run:
    def __init__(self, config: DAMLConfig, options: _Options):
        self.config, self.options = config, options
        self.checkpoints = _checkpoint.Checkpoints(options.checkpoint, options.resume_from)
        if options.checkpoint is not None:
            self.checkpoints.check_writable(options.resume_from, options.overwrite)
            P = num_params(list(config.sizes)) + num_params(list(config.loss_sizes))
            element = torch.finfo(options.dtype).bits // 8
            _io.check_space(options.checkpoint, P * element * 4 + 8 * config.iterations
                            + 64 * 1024, "checkpoint")
        self.generator = torch.Generator().manual_seed(config.seed)
        self.model = _initial_model(config, options, self.generator)
        self.weights = self.model.weights
        self.P = num_params(list(config.sizes))
        self.backend = _backend(options, self.model, config)
        chunkable = self.backend == "fused" and options.device.type == "cpu"
        kwargs = config.optimizer_kwargs
        if chunkable and config.optimizer in _config.OPTIMIZERS:
            kwargs = outer_optim.build_kwargs(kwargs)
        self.optimizer = options.optimizer_class([self.weights], lr=config.outer_lr, **kwargs)
        self.losses: List[float] = []
        self.start = 0
        if options.resume_from is not None:
            self._resume(options.resume_from)
        self.settings = dict(config.to_dict(), backend=self.backend, device=str(options.device))
        self.spec = outer_optim.chunk_spec(self.optimizer) if chunkable else None
        self.chunk = CHUNK_FIRST
        self.fast_iterations = 0

    # ---- resuming and checkpoints ----------------------------------------------------------

    def _resume(self, path: str) -> None:
        saved = _io.load_file(path)
        if saved["format"] != _io.DAML_CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is not a DAML training checkpoint (its format is "
                             f"{saved['format']!r}): resume DAML runs from the .ckpt a DAML "
                             "run wrote")
        check_checkpoint(path, saved)
        differ = self.config.differences(saved["config"])
        if differ:
            raise ValueError(f"checkpoint {path} was written by a different run: "
                             + "; ".join(differ))
        iteration = int(saved["iteration"])
        if iteration > self.config.iterations:
            raise ValueError(f"checkpoint {path} is at iteration {iteration}, past iterations="
                             f"{self.config.iterations}")
        try:
            self.optimizer.load_state_dict(saved["optimizer"])
        except (KeyError, ValueError, TypeError, RuntimeError) as exc:
            raise _checkpoint._bad(path, "optimizer", f"does not fit the run's optimizer "
                                                      f"({exc})") from None
        m = saved["model"]
        with torch.no_grad():
            self.weights.copy_(torch.cat([m["params"], m["loss_params"]]).to(self.weights))
        self.generator.set_state(saved["generator"])
        self.start, self.losses = iteration, saved["losses"].tolist()

    def _save(self, iteration: int) -> None:
        if self.checkpoints.path is None:
            return
        state = dict(format=_io.DAML_CHECKPOINT_FORMAT, format_version=FORMAT_VERSION,
                     pymaml_version=__version__, config=self.settings, iteration=iteration,
                     model=self.model.to_dict(), optimizer=self.optimizer.state_dict(),
                     generator=self.generator.get_state(),
                     losses=torch.tensor(self.losses, dtype=torch.float64))
        self.checkpoints.save(state)

    # ---- the loop ----------------------------------------------------------------------------

    def loop(self):
        from .trainer import TrainResult  # imported here: trainer dispatches to this module
        total, every = self.config.iterations, self.options.checkpoint_every
        self.bar = _progress.for_run(0, self.options.progress, self.options.log_every,
                                     self.start, total)
        status, it = "completed", self.start
        began = time.perf_counter()
        with _progress.StopOnInterrupt() as interrupt, self.bar:
            while it < total:
                values = self._chunk(it)
                if values is None:
                    values = [self._one_iteration(it + 1)]
                self.losses.extend(values)
                self.bar.update(it + 1, values)
                it += len(values)
                if interrupt.requested and it < total:
                    status = "interrupted"
                    self._save(it)
                    where = f"; checkpoint written to {self.checkpoints.path}" \
                        if self.checkpoints.path else ""
                    self.bar.write(f"interrupted at iteration {it}/{total}{where}")
                    break
                if it % every == 0 and it < total:
                    self._save(it)
            else:
                self._save(total)
        wall_time = time.perf_counter() - began
        self.weights.grad = None
        self.model.info["iterations"] = len(self.losses)
        return TrainResult(model=self.model,
                           losses=torch.tensor(self.losses, dtype=torch.float64),
                           wall_time=wall_time, iterations=len(self.losses), status=status,
                           checkpoint=self.checkpoints.path, config=self.settings, rank=0,
                           fast_iterations=self.fast_iterations)

    def _sample_one(self):
        c = self.config
        return self.options.family.sample_daml(c.meta_batch_size, steps=c.inner_steps,
                                               generator=self.generator,
                                               dtype=self.options.dtype,
                                               device=self.options.device)

    def meta_gradient(self, batch) -> Tuple[torch.Tensor, torch.Tensor]:
        """(meta-loss, gradient [P + P_loss]) of one meta-batch at the current weights."""
        c = self.config
        w = self.weights.detach()
        params = w[:self.P].requires_grad_()
        loss_params = w[self.P:].requires_grad_()
        value = _daml.daml_loss(params, loss_params, *batch, sizes=list(c.sizes),
                                loss_sizes=list(c.loss_sizes), inner_lr=c.inner_lr,
                                steps=c.inner_steps, activation=c.activation, loss=c.loss,
                                adapt_loss=c.adapt_loss, backend=self.backend)
        g_params, g_loss = torch.autograd.grad(value, [params, loss_params])
        return value.detach(), torch.cat([g_params, g_loss])

    def _one_iteration(self, it: int) -> float:
        value, grad = self.meta_gradient(self._sample_one())
        value = value.item()
        if not math.isfinite(value):
            raise self._diverged(it, value)
        self.weights.grad = grad
        self.optimizer.step()
        if not torch.isfinite(self.weights).all():
            raise self._diverged(it, value)
        return value

    def _chunk(self, it: int) -> Optional[List[float]]:
        """The next chunk of iterations on daml_train_chunk, or None when this iteration goes
        the per-iteration way (no fast path, or the optimizer's state not made yet)."""
        if self.spec is None:
            return None
        state = outer_optim.chunk_state(self.optimizer, self.weights, self.spec)
        if state is None:
            return None
        c = self.config
        n = min(self.chunk, c.iterations - it,
                self.options.checkpoint_every - it % self.options.checkpoint_every)
        began = time.perf_counter()
        batch = self.options.family.sample_daml_many(n, c.meta_batch_size, steps=c.inner_steps,
                                                     generator=self.generator,
                                                     dtype=self.options.dtype,
                                                     device=self.options.device)
        if batch is None:  # the family cannot draw chunks: per-iteration from now on
            self.spec = None
            return None
        values, done = _ops.ops.daml_train_chunk(
            self.weights.detach(), state, batch.x_source, batch.x_query, batch.y_query,
            list(c.sizes), list(c.loss_sizes), c.inner_lr, c.inner_steps, c.activation, c.loss,
            c.adapt_loss, *self.spec)
        seconds = time.perf_counter() - began
        self.chunk = CHUNK_MAX if seconds <= 0 else \
            max(1, min(CHUNK_MAX, int(CHUNK_SECONDS * n / seconds)))
        values, done = values.tolist(), int(done)
        self.fast_iterations += done
        if done < n:
            self.losses.extend(values[:done])
            raise self._diverged(it + 1 + done, values[done])
        return values

    def _diverged(self, it: int, value: float):
        from .trainer import TrainingDiverged  # trainer imports this module
        return TrainingDiverged.at(it, value, self.checkpoints.kept())


# ---- checking a DAML checkpoint ---------------------------------------------------------------

def check_checkpoint(path: str, saved: Dict[str, Any]) -> None:
    """Refuses (pymaml.checkpoint.BadCheckpoint, naming the file and the field) a DAML
    checkpoint that misses a field or holds a value no DAML run writes."""
    bad = _checkpoint._bad
    for field in ("format_version", "config", "iteration", "model", "optimizer", "generator",
                  "losses"):
        if field not in saved:
            raise bad(path, field, "is missing")
    version = saved["format_version"]
    if not _checkpoint._is_int(version) or not 1 <= version <= FORMAT_VERSION:
        raise bad(path, "format_version", f"is {version!r}: this pymaml ({__version__}) reads "
                                          f"DAML checkpoints of version 1 to {FORMAT_VERSION}")
    config = saved["config"]
    if not isinstance(config, dict):
        raise bad(path, "config", "is not the run's settings (a dict)")
    for field in dataclasses.fields(DAMLConfig):
        if field.name not in config:
            raise bad(path, f"config.{field.name}", "is missing")
    total = config["iterations"]
    if not _checkpoint._is_int(total) or total < 0:
        raise bad(path, "config.iterations", f"is {total!r}, expected an int >= 0")
    iteration = saved["iteration"]
    if not _checkpoint._is_int(iteration) or not 0 <= iteration <= total:
        raise bad(path, "iteration", f"is {iteration!r}, expected an int from 0 to {total}")
    losses = saved["losses"]
    if not (isinstance(losses, torch.Tensor) and losses.dtype == torch.float64
            and losses.dim() == 1 and losses.numel() == iteration):
        raise bad(path, "losses", f"is not the float64 loss history of {iteration} iterations")
    if not torch.isfinite(losses).all():
        raise bad(path, "losses", "holds a non-finite loss (a run stops before recording one)")
    try:
        model = DAMLModel.from_dict(saved["model"])
    except ValueError as exc:
        raise bad(path, "model", f"is not a valid DAML model: {exc}") from None
    for field in ("sizes", "loss_sizes"):
        if getattr(model, field) != list(config[field]):
            raise bad(path, f"model.{field}", f"is {getattr(model, field)}; the run's settings "
                                              f"say {list(config[field])}")
    for field in ("activation", "loss", "adapt_loss", "inner_lr", "inner_steps"):
        if getattr(model, field) != config[field]:
            raise bad(path, f"model.{field}", f"is {getattr(model, field)!r}; the run's "
                                              f"settings say {config[field]!r}")
    if str(model.weights.dtype).replace("torch.", "") != config["dtype"]:
        raise bad(path, "model.params", f"are {model.weights.dtype}; the run's settings say "
                                        f"{config['dtype']}")
    _checkpoint._check_optimizer(path, saved["optimizer"], [model.weights.detach()])
    _checkpoint._check_generator(path, "generator", saved["generator"])
