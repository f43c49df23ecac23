"""What an algorithm is to pymaml: the class every entry of the registry is an instance of.

The trainer, the run configuration, the checkpoint, the evaluation and the command line are
written once; they ask the run's algorithm for what differs, through the hooks below
(docs/design.md §6.3 lists them, MAML's and DAML's side by side). This base class is MAML's
(exact second order, every layer adapting at one rate); the other entries change a few
attributes or methods (pymaml/algorithms/maml.py, daml.py)."""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from .. import _checks, _rates
from .. import functional as F
from .. import tasks as _tasks
from .. import fast_path as _fast_path
from .. import meta_step as _meta_step
from .. import plots as _plots
from ..evaluate import evaluate as evaluate_maml
from ..model import INITS, MetaMLP


class Algorithm:
    name = "maml"
    summary = "exact second-order MAML"
    first_order = False    # the meta-gradient drops the inner loop's second-order terms
    # Reptile's rule: the inner loop trains on support and query, and the optimizer is handed
    # the direction params - mean adapted params instead of a gradient.
    reptile_update = False
    op_algorithm = "maml"  # what the chunked op's `algorithm` argument says
    model_class = MetaMLP
    # The RunConfig fields of this algorithm's own (a checkpoint stores them); the common
    # ones every run has are RunConfig's first fields.
    own_fields: Tuple[str, ...] = ("inner_batch", "learn_inner_lr", "adapt_layers")
    # The model record's fields a checkpoint's settings must agree with.
    model_fields: Tuple[str, ...] = ("activation", "loss", "inner_lr", "inner_steps",
                                     "learn_inner_lr", "adapt_layers")
    default_task = "seed-sine"

    # ---- the run's settings -----------------------------------------------------------------

    def settings(self, args: Dict[str, Any], sizes: Tuple[int, ...], inner_steps: int,
                 family) -> Dict[str, Any]:
        """This algorithm's own RunConfig fields from train()'s arguments `args`, checked
        (sizes and inner_steps checked already)."""
        for name in ("loss_sizes", "adapt_loss"):
            if args.get(name) is not None:
                raise ValueError("loss_sizes and adapt_loss (the learned inner loss) apply to "
                                 "algorithm='daml' only")
        inner_batch = args.get("inner_batch")
        if inner_batch is not None:
            inner_batch = self._inner_batch(inner_batch, inner_steps, family)
        learn_inner_lr, adapt_layers = self.inner_rule(args.get("learn_inner_lr"),
                                                       args.get("adapt_layers"), sizes)
        if learn_inner_lr is not None and inner_steps < 1:
            raise ValueError(f"learn_inner_lr needs inner_steps >= 1 (with no inner step there "
                             f"is no rate to learn), got {inner_steps}")
        return dict(inner_batch=inner_batch, learn_inner_lr=learn_inner_lr,
                    adapt_layers=adapt_layers)

    def inner_rule(self, learn_inner_lr, adapt_layers, sizes):
        """(the learned rates' mode, the adapted layers), checked; entries that stand for a
        rule (metasgd, anil) fix theirs."""
        _rates.check_mode("learn_inner_lr", learn_inner_lr)
        return learn_inner_lr, _rates.check_layers("adapt_layers", adapt_layers, len(sizes) - 1)

    def inner_points(self, family) -> Optional[int]:
        """The points a task's inner loop trains on (None: unknown until the first draw)."""
        return getattr(family, "shots", None)

    def _inner_batch(self, inner_batch, inner_steps, family) -> int:
        inner_batch = _checks.check_int("inner_batch", inner_batch, 1)
        if inner_steps < 1:
            raise ValueError("inner_batch gives each inner step a batch of its own: it needs "
                             f"inner_steps >= 1, got {inner_steps}")
        points = self.inner_points(family)
        if points and inner_batch > points:
            raise ValueError(f"inner_batch={inner_batch} is more than the {points} points a "
                             f"task's inner loop has")
        return inner_batch

    def family(self, task, shots, queries, data=None, ways=None):
        """The run's task family, its draws checked."""
        task = self.default_task if task is None else task
        return _tasks.checked(_tasks.get_family(task, shots=shots, queries=queries, data=data,
                                                ways=ways))

    def init_name(self, init) -> str:
        """The name a checkpoint records for `init`: "seed", "torch" or "given" (weights)."""
        if isinstance(init, str):
            return _checks.check_choice("init", init, INITS)
        if isinstance(init, (MetaMLP, torch.Tensor)):
            weights = init.params if isinstance(init, MetaMLP) else init
            if weights.is_floating_point() and not torch.isfinite(weights.detach()).all():
                raise ValueError("init holds non-finite weights (NaN or infinite): training "
                                 "from them would stop at the first iteration")
            return "given"
        raise TypeError(f"init must be 'seed', 'torch', a MetaMLP or a [P] tensor, got "
                        f"{type(init).__name__}")

    # ---- the model ----------------------------------------------------------------------------

    def initial_model(self, config, init, generator: torch.Generator, dtype,
                      device) -> MetaMLP:
        c = config
        settings = dict(loss=c.loss, inner_lr=c.inner_lr, inner_steps=c.inner_steps,
                        info=dict(task=c.task, algorithm=c.algorithm, shots=c.shots),
                        learn_inner_lr=c.learn_inner_lr, adapt_layers=c.adapt_layers)
        if isinstance(init, str):
            # Drawn on the CPU from the run's generator, then moved: the same start anywhere.
            model = MetaMLP(c.sizes, c.activation, init=init, generator=generator,
                            dtype=torch.float64, **settings)
            return model.to(device=device, dtype=dtype)
        start = init.params if isinstance(init, MetaMLP) else init
        if isinstance(init, MetaMLP) and (init.sizes != list(c.sizes)
                                          or init.activation != c.activation):
            raise ValueError(f"init is a MetaMLP with sizes {init.sizes} and activation "
                             f"{init.activation!r}, but training asks for {list(c.sizes)} and "
                             f"{c.activation!r}")
        _checks.check_params(start, list(c.sizes))
        # A model that learned rates of this run's kind goes on from them (else: inner_lr).
        rates = getattr(init, "learned_lr", None)
        if getattr(init, "learn_inner_lr", None) != c.learn_inner_lr or getattr(
                init, "inner_steps", None) != c.inner_steps:
            rates = None
        return MetaMLP(c.sizes, c.activation, **settings, learned_lr=rates,
                       params=start.detach().to(device=device, dtype=dtype))

    def weights(self, model) -> List[torch.Tensor]:
        """What the outer optimizer steps: the weights, and the inner rates a run learns."""
        return [p for p in (model.params, model.learned_lr) if p is not None]

    def weight_count(self, config) -> int:
        """Elements of the trained tensors (a checkpoint's size), from the settings alone."""
        n = F.num_params(list(config.sizes))
        if config.learn_inner_lr is not None:
            shape = _rates.shape(config.learn_inner_lr, config.sizes, config.inner_steps)
            n += int(torch.Size(shape).numel())
        return n

    def checkpoint_version(self, config) -> int:
        """The checkpoint format_version a run writes: 2 with learned rates or frozen layers
        (which earlier versions refuse), else 1, as earlier versions wrote."""
        return 1 if config.learn_inner_lr is None and config.adapt_layers is None else 2

    # ---- one iteration, many iterations ----------------------------------------------------

    def backend(self, config, requested: str, model) -> str:
        """The backend that serves the run: `requested`, or under "auto" the fused op where
        it can (a batch per inner step runs on the CPU kernels or the reference)."""
        params = model.params.detach()
        plain = config.learn_inner_lr is None and config.adapt_layers is None
        backend = F._choose_backend(requested, params, list(config.sizes), config.inner_steps,
                                    (), rule=not plain)
        if backend == "fused" and config.inner_batch is not None and params.device.type != "cpu":
            if requested == "fused":
                raise ValueError(f"inner_batch (a batch per inner step) runs on the CPU kernels "
                                 f"or backend='reference', not on {params.device.type}")
            return "reference"
        return backend

    def sample(self, family, config, tasks: int, generator, dtype, device):
        batch = family.sample(tasks, generator=generator, dtype=dtype, device=device)
        return _meta_step.class_targets(config, batch)

    def meta_step(self, config, backend: str) -> Callable:
        """fn(weights, batch) -> (meta-loss 0-d, [gradient of each weight])."""
        return _meta_step.for_run(config, backend, self)

    def chunkable(self, config, backend: str, device) -> bool:
        """Whether the chunk ops may serve the run (then "sgd" / "adam" are built with
        torch's fused step, the kernel the chunk ops run: pymaml.outer_optim)."""
        return _fast_path.servable(backend, device, config, self)

    def fast_path(self, config, optimizer, family, generator, dtype, backend, device):
        """The chunked path of a run (pymaml.fast_path), or None where it cannot serve it."""
        if not self.chunkable(config, backend, device):
            return None
        return _fast_path.FastPath.for_maml(config, self, optimizer, family, generator, dtype)

    # ---- after training ---------------------------------------------------------------------

    def evaluate(self, model, task, **kwargs):
        return evaluate_maml(model, "sine" if task is None else task, **kwargs)

    def report(self, model, task, shots) -> List[str]:
        """Lines `train` prints about the trained model (MAML's: none; its figure says it)."""
        return []

    def figure(self, model, path, task, *, shots, seed, data=None) -> str:
        """Draws `train`'s figure of the trained model at `path`; returns what it shows."""
        if task in _tasks.DATA_FAMILIES:
            return self._episodes_figure(model, path, shots, 3, None, seed, data)
        # The seed's figure: a phase-pi task (b = pi) for the seed's task, else a random one.
        ids = [[math.pi]] if task == "seed-sine" else None
        (mae,) = _plots.plot_adaptation(model, path, task=task, shots=shots, task_ids=ids,
                                        seed=seed)
        what = "a phase-pi task" if ids else "a random task"
        return (f"adapted on {model.info['shots'] or '?'} points of {what}, mean absolute error "
                f"{mae:.4f} on a 100-point grid")

    @staticmethod
    def _episodes_figure(model, path, shots, episodes, steps, seed, data) -> str:
        """Classification's figure: episodes of Omniglot's characters (unrotated) and the
        adapted model's predictions."""
        family = _tasks.Omniglot(data, ways=model.sizes[-1], shots=shots or 1, queries=1,
                                 rotations=False)
        acc = _plots.plot_episodes(model, path, family, episodes=episodes, steps=steps, seed=seed)
        return f"{episodes} episodes with the adapted model's predictions ({100 * acc:.0f} % right)"

    def plot(self, model, path, task, *, shots, num_tasks, steps, seed, data=None) -> str:
        """Draws `plot`'s figure of a saved model at `path`; returns what it shows."""
        if task in _tasks.DATA_FAMILIES:
            return self._episodes_figure(model, path, shots, num_tasks, steps, seed, data)
        maes = _plots.plot_adaptation(model, path, task=task, shots=shots, num_tasks=num_tasks,
                                      steps=steps, seed=seed)
        return (f"{len(maes)} tasks, mean absolute error on a 100-point grid: "
                + ", ".join(f"{m:.3f}" for m in maes))

    # ---- the command line (pymaml.cli) --------------------------------------------------------

    # `train`'s flags of its own: flag -> argparse keywords, unset = None. The command line
    # refuses them for every other algorithm. MAML's (--inner-batch, --learn-inner-lr,
    # --adapt-layers) are the command line's own, since five entries read them.
    flags: Dict[str, Dict[str, Any]] = {}
    # The named task families its runs and models take, in words and by name ("every one":
    # train() and evaluate() say why a DAML family does not fit), and eval's default task for
    # a model that does not say its own.
    task_kind = "a task family"
    task_names: Tuple[str, ...] = tuple(_tasks.FAMILIES)
    eval_task = "sine"

    def train_kwargs(self, args) -> Dict[str, Any]:
        """train()'s arguments of this algorithm's own, from `train`'s parsed flags `args`."""
        return dict(inner_batch=args.inner_batch, learn_inner_lr=args.learn_inner_lr,
                    adapt_layers=args.adapt_layers)

    def out_prefix(self, args) -> str:
        """`train`'s output name prefix without --out."""
        # A run learning its rates is named after them too: maml-per-layer-step-sine...
        method = self.name + (f"-{args.learn_inner_lr}" if args.learn_inner_lr else "")
        if args.task == "seed-sine":
            return f"{method}-sine"  # the seed's figure is maml-sine.png
        if args.task in _tasks.DATA_FAMILIES:
            return f"{method}-{args.task}-{args.ways or 5}way-{args.shots or 1}shot"
        return f"{method}-{args.task}-{args.shots or _tasks.FAMILIES[args.task]().shots}shot"
