"""DAML as an entry of the registry, the worked example of docs/design.md §6.3 (whose table
lists what each hook does here): a second network, the adaptation-loss network, trained with
the base one. The seed's DAML experiment is the default setting (train(algorithm="daml"))."""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch

from .. import _checks, _flags, _ops, outer_optim
from .. import daml as _daml
from .. import fast_path as _fast_path
from .. import meta_step as _meta_step
from .. import plots as _plots
from .. import tasks as _tasks
from .._layout import num_params
from ..evaluate import evaluate_daml
from ..daml_model import DAMLModel, default_loss_sizes
from .base import Algorithm

# pymaml.train's arguments that DAML has no use for, with the value that means "unset".
_MAML_ONLY = dict(inner_batch=None, learn_inner_lr=None, adapt_layers=None)


class DAML(Algorithm):
    name = "daml"
    summary = "MAML with a learned inner loss on unlabeled inputs (Yu, Finn et al., 2018)"
    op_algorithm = None
    model_class = DAMLModel
    own_fields = ("loss_sizes", "adapt_loss")
    model_fields = ("loss_sizes", "activation", "loss", "adapt_loss", "inner_lr", "inner_steps")
    default_task = "daml-sine"

    def settings(self, args: Dict[str, Any], sizes, inner_steps, family) -> Dict[str, Any]:
        for name, unset in _MAML_ONLY.items():
            if args.get(name) is not unset:
                raise ValueError(f"{name} does not apply to algorithm='daml' (DAML's inner "
                                 f"loop adapts every layer of the base network at one fixed "
                                 f"rate, on its own source batch per step); leave it unset")
        loss_sizes = args.get("loss_sizes")
        loss_sizes = default_loss_sizes(sizes) if loss_sizes is None else loss_sizes
        _, loss_sizes = _checks.check_daml_sizes(sizes, loss_sizes)
        adapt_loss = _checks.check_choice("adapt_loss", args.get("adapt_loss") or "l1",
                                          _checks.ADAPT_LOSSES)
        if inner_steps < 1:
            raise ValueError(f"inner_steps must be >= 1 for DAML: with no inner step the loss "
                             f"network is never used and gets no gradient; got {inner_steps}")
        return dict(loss_sizes=tuple(loss_sizes), adapt_loss=adapt_loss)

    def family(self, task, shots, queries, data=None, ways=None):
        # train()'s default task is the seed's, and DAML's seed experiment is daml-sine
        task = self.default_task if task in (None, "seed-sine") else task
        if data is not None or ways is not None:
            raise ValueError("data and ways (classification episodes) do not apply to "
                             "algorithm 'daml', which trains on DAML task families")
        return _tasks.checked_daml(_tasks.get_daml_family(task, shots=shots, queries=queries))

    def init_name(self, init) -> str:
        if isinstance(init, str):
            return _checks.check_choice("init", init, ("seed", "torch"))
        if isinstance(init, DAMLModel):
            return "given"
        raise TypeError(f"init must be 'seed', 'torch' or a DAMLModel for algorithm='daml', "
                        f"got {type(init).__name__}")

    def initial_model(self, config, init, generator, dtype, device) -> DAMLModel:
        c = config
        settings = dict(loss=c.loss, adapt_loss=c.adapt_loss, inner_lr=c.inner_lr,
                        inner_steps=c.inner_steps,
                        info=dict(task=c.task, algorithm="daml", shots=c.shots,
                                  queries=c.queries))
        if isinstance(init, str):
            # Drawn in float64 on the CPU from the run's generator, then cast: the same start
            # on every device and dtype (as MAML's).
            w = DAMLModel(c.sizes, c.loss_sizes, c.activation, init=init,
                          generator=generator, dtype=torch.float64).weights.detach()
        else:
            if (init.sizes != list(c.sizes) or init.loss_sizes != list(c.loss_sizes)
                    or init.activation != c.activation):
                raise ValueError(f"init is a DAMLModel with sizes {init.sizes}, loss_sizes "
                                 f"{init.loss_sizes} and activation {init.activation!r}, but "
                                 f"training asks for {list(c.sizes)}, {list(c.loss_sizes)} and "
                                 f"{c.activation!r}")
            w = init.weights.detach()
        return DAMLModel(c.sizes, c.loss_sizes, c.activation,
                         weights=w.to(device=device, dtype=dtype), **settings)

    def weights(self, model) -> List[torch.Tensor]:
        return [model.weights]

    def weight_count(self, config) -> int:
        return num_params(list(config.sizes)) + num_params(list(config.loss_sizes))

    def checkpoint_version(self, config) -> int:
        return 3

    def backend(self, config, requested: str, model) -> str:
        return _daml._choose_backend(requested, model.params.detach(),
                                     list(config.sizes), list(config.loss_sizes),
                                     config.inner_steps, ())

    def sample(self, family, config, tasks: int, generator, dtype, device):
        batch = family.sample_daml(tasks, steps=config.inner_steps, generator=generator,
                                   dtype=dtype, device=device)
        return _meta_step.class_targets(config, batch)

    def meta_step(self, config, backend: str):
        c, P = config, num_params(list(config.sizes))
        hyper = dict(sizes=list(c.sizes), loss_sizes=list(c.loss_sizes), inner_lr=c.inner_lr,
                     steps=c.inner_steps, activation=c.activation, loss=c.loss,
                     adapt_loss=c.adapt_loss, backend=backend)

        def step(weights, batch) -> Tuple[torch.Tensor, List[torch.Tensor]]:
            (w,) = weights
            params, loss_params = w[:P].requires_grad_(), w[P:].requires_grad_()
            value = _daml.daml_loss(params, loss_params, *batch, **hyper)
            g_params, g_loss = torch.autograd.grad(value, [params, loss_params])
            return value.detach(), [torch.cat([g_params, g_loss])]
        return step

    def chunkable(self, config, backend: str, device) -> bool:
        return backend == "fused" and device.type == "cpu"

    def fast_path(self, config, optimizer, family, generator, dtype, backend, device):
        spec = outer_optim.chunk_spec(optimizer) if self.chunkable(config, backend,
                                                                   device) else None
        if spec is None:
            return None
        c = config

        def draw(n, device):
            batch = family.sample_daml_many(n, c.meta_batch_size, steps=c.inner_steps,
                                            generator=generator, dtype=dtype, device=device)
            if batch is None:
                return None
            batch = _meta_step.class_targets(c, batch)
            return batch.x_source, batch.x_query, batch.y_query

        def call(weights, state, data, spec):
            return _ops.ops.daml_train_chunk(
                weights[0].detach(), state, *data, list(c.sizes), list(c.loss_sizes),
                c.inner_lr, c.inner_steps, c.activation, c.loss, c.adapt_loss, *spec)
        return _fast_path.FastPath(spec, c.iterations, draw, call)

    def evaluate(self, model, task, **kwargs):
        return evaluate_daml(model, task, **kwargs)

    def report(self, model, task, shots) -> List[str]:
        if not isinstance(_tasks.get_daml_family(task), _tasks.DAMLSine):
            return []  # the grid error per phase needs a family with phases
        held_out = evaluate_daml(model, task, shots=shots)
        return ["after adapting from unlabeled source inputs alone, mean absolute error on a "
                "100-point grid over [-2pi, 2pi] (600 held-out source draws per phase): "
                + ", ".join(f"phase {_plots.phase_name(r['phase'])} {r['mae']:.4f}"
                            for r in held_out.rows)]

    def figure(self, model, path, task, *, shots, seed, data=None) -> str:
        maes = _plots.plot_daml(model, path, task=task, shots=shots, seed=seed)
        return ("the phase-pi and phase-0 tasks after adapting from one draw of source inputs, "
                "grid MAE " + ", ".join(f"{m:.4f}" for m in maes))

    def plot(self, model, path, task, *, shots, num_tasks, steps, seed, data=None) -> str:
        # One panel per phase: the figure has no room for more tasks (num_tasks).
        maes = _plots.plot_daml(model, path, task=task, shots=shots, steps=steps, seed=seed)
        return ("phases pi and 0, mean absolute error on a 100-point grid: "
                + ", ".join(f"{m:.3f}" for m in maes))

    flags = {
        "--loss-hidden": dict(type=_flags.int_list, metavar="W,W", help=(
            "DAML: the loss network's hidden widths (default: 32,32; its input is n_out + the "
            "base network's hidden widths, its output 1)")),
        "--adapt-loss": dict(choices=_checks.ADAPT_LOSSES, help=(
            "DAML: the inner loss on the loss network's output h, mean |h| (l1, the default) "
            "or mean h^2 (mse)")),
    }
    task_kind = "a DAML task family"
    task_names = tuple(_tasks.DAML_FAMILIES)
    eval_task = "daml-sine"

    def train_kwargs(self, args) -> Dict[str, Any]:
        # Refused here in flag words, before any file is touched (settings() says it too).
        for name in _MAML_ONLY:
            if getattr(args, name) is not None:
                raise ValueError(f"--{name.replace('_', '-')} does not apply to --algorithm daml")
        loss_sizes = None
        if args.loss_hidden is not None:
            if any(w < 1 for w in args.loss_hidden):
                raise _flags.FlagError(f"--loss-hidden widths must be >= 1, got "
                                       f"{args.loss_hidden}")
            sizes = args.sizes or _tasks.SEED_DEFAULTS["sizes"]
            loss_sizes = [_checks.loss_input_width(sizes), *args.loss_hidden, 1]
        return dict(loss_sizes=loss_sizes, adapt_loss=args.adapt_loss)

    def out_prefix(self, args) -> str:
        return "daml-sine" if args.task == "daml-sine" else f"daml-{args.task}"
