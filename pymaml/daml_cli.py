"""The command line's DAML part: `python -m pymaml train --algorithm daml` (the task defaults to
daml-sine) and `python -m pymaml eval` / `plot` on a DAML model (pymaml.cli hands them here).

train writes PREFIX.png (default daml-sine.png: the phase-pi task, and the phase-0 one beside
it, the true sine and the network after adapting from unlabeled source inputs alone, over
[-2pi, 2pi]), PREFIX-loss.png, PREFIX.pt (the DAMLModel) and PREFIX.ckpt, and prints the
time and the grid error per phase."""

from __future__ import annotations

import math
import os

import torch

from . import _checks
from . import _io
from . import daml as _daml
from . import tasks as _tasks
from .daml_evaluate import evaluate_daml
from .daml_model import DAMLModel

__all__ = ["add_train_flags", "cmd_train", "cmd_eval", "cmd_plot"]


def add_train_flags(t) -> None:
    """DAML's flags on the train parser."""
    from .cli import _int_list  # (cli imports this module at call time only)
    t.add_argument("--loss-hidden", type=_int_list, metavar="W,W",
                   help="DAML: the loss network's hidden widths (default: 32,32; its input is "
                        "n_out + the base network's hidden widths, its output 1)")
    t.add_argument("--adapt-loss", choices=_checks.ADAPT_LOSSES,
                   help="DAML: the inner loss on the loss network's output h, mean |h| (l1, "
                        "the default) or mean h^2 (mse)")


def _outputs(args):
    prefix = args.out or ("daml-sine" if args.task == "daml-sine" else f"daml-{args.task}")
    return dict(figure=prefix + ".png", loss_figure=prefix + "-loss.png", model=prefix + ".pt",
                checkpoint=args.checkpoint or prefix + ".ckpt")


def _maml_only_flags(args):
    for flag, value in (("--inner-batch", args.inner_batch),
                        ("--learn-inner-lr", args.learn_inner_lr),
                        ("--adapt-layers", args.adapt_layers)):
        if value is not None:
            raise ValueError(f"{flag} does not apply to --algorithm daml")


def cmd_train(args) -> int:
    """`train --algorithm daml`."""
    from . import cli, plots
    from .trainer import train
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.task not in _tasks.DAML_FAMILIES:
        raise cli._FlagError(f"--algorithm daml trains a DAML task family "
                             f"({', '.join(_tasks.DAML_FAMILIES)}), not --task {args.task}")
    _maml_only_flags(args)
    out = _outputs(args)
    clash = [k for k in ("figure", "loss_figure", "model") if out[k] == out["checkpoint"]]
    if clash:
        raise ValueError(f"--checkpoint {out['checkpoint']} is also the "
                         f"{clash[0].replace('_', ' ')} file: choose another path")
    cli._check_train_outputs(args, out)
    if os.path.exists(out["model"]) and not (args.resume or args.overwrite):
        raise FileExistsError(f"{out['model']} already exists: pass --resume to continue its "
                              "run, --overwrite to replace it, or --out to choose another name")
    init = args.init
    if init not in ("seed", "torch"):
        try:
            init = DAMLModel.load(init)
        except (OSError, ValueError) as exc:
            raise ValueError(f"--init {exc}") from None
    loss_sizes = None
    if args.loss_hidden is not None:
        if any(w < 1 for w in args.loss_hidden):
            raise cli._FlagError(f"--loss-hidden widths must be >= 1, got {args.loss_hidden}")
        loss_sizes = [_checks.loss_input_width(args.sizes), *args.loss_hidden, 1]
    result = train(args.task, algorithm="daml", sizes=args.sizes, loss_sizes=loss_sizes,
                   adapt_loss=args.adapt_loss, activation=args.activation, loss=args.loss,
                   inner_steps=args.inner_steps, inner_lr=args.inner_lr,
                   meta_batch_size=args.meta_batch_size, iterations=args.iterations,
                   optimizer=args.optimizer, outer_lr=args.outer_lr,
                   optimizer_kwargs=dict(args.optimizer_arg), shots=args.shots,
                   queries=args.queries, init=init, backend=args.backend, device=args.device,
                   dtype=cli.DTYPES[args.dtype], seed=args.seed, log_every=args.log_every,
                   progress=args.progress, checkpoint=out["checkpoint"],
                   checkpoint_every=args.checkpoint_every, resume=args.resume,
                   overwrite=args.overwrite, distributed=args.distributed or None)
    if result.status == "interrupted":
        return cli._interrupted(result)
    model = cli._save_and_report(result, out)
    if isinstance(_tasks.get_daml_family(args.task), _tasks.DAMLSine):
        held_out = evaluate_daml(model, args.task, shots=args.shots)
        print("after adapting from unlabeled source inputs alone, mean absolute error on a "
              "100-point grid over [-2pi, 2pi] (600 held-out source draws per phase): "
              + ", ".join(f"phase {plots._phase_name(r['phase'])} {r['mae']:.4f}"
                          for r in held_out.rows))
    if not args.no_plots:
        with cli._writing(out["figure"]):
            maes = plots.plot_daml(model, out["figure"], task=args.task, shots=args.shots,
                             seed=args.seed)
        with cli._writing(out["loss_figure"]):
            plots.plot_losses(result.losses, out["loss_figure"], title=f"daml on {args.task}")
        print(f"{out['figure']}: the phase-pi and phase-0 tasks after adapting from one draw "
              f"of source inputs, grid MAE " + ", ".join(f"{m:.4f}" for m in maes)
              + f";  {out['loss_figure']}: the loss curve")
    print(f"evaluate with: python -m pymaml eval {out['model']}")
    return 0


def cmd_eval(args) -> int:
    """`eval` on a DAML model or checkpoint."""
    if args.threads:
        torch.set_num_threads(args.threads)
    model = DAMLModel.load(args.model)
    task = args.task or model.info.get("task") or "daml-sine"
    if task not in _tasks.DAML_FAMILIES:
        raise ValueError(f"{args.model} is a DAML model: evaluate it on a DAML task family "
                         f"({', '.join(_tasks.DAML_FAMILIES)}), not {task!r}")
    result = evaluate_daml(model, task, shots=args.shots, steps=args.steps, num_tasks=args.tasks,
                           inner_lr=args.inner_lr, seed=args.seed, backend=args.backend)
    print(f"{args.model}: DAMLModel({model.extra_repr()})")
    print(result.table())
    return 0


def cmd_plot(args) -> int:
    """`plot` on a DAML model: the DAML figure (both phases)."""
    from . import cli, plots
    model = DAMLModel.load(args.model)
    task = args.task or model.info.get("task") or "daml-sine"
    path = _io.check_writable(args.out or os.path.splitext(args.model)[0] + "-tasks.png",
                              "figure")
    with cli._writing(path):
        maes = plots.plot_daml(model, path, task=task, shots=args.shots, steps=args.steps,
                         seed=args.seed)
    print(f"{path}: phases pi and 0, mean absolute error on a 100-point grid: "
          + ", ".join(f"{m:.3f}" for m in maes))
    return 0
