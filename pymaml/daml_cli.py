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

__all__ = ["add_train_flags", "cmd_train", "cmd_eval", "cmd_plot", "plot_daml"]


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
              + ", ".join(f"phase {_phase_name(r['phase'])} {r['mae']:.4f}"
                          for r in held_out.rows))
    if not args.no_plots:
        with cli._writing(out["figure"]):
            maes = plot_daml(model, out["figure"], task=args.task, shots=args.shots,
                             seed=args.seed)
        with cli._writing(out["loss_figure"]):
            plots.plot_losses(result.losses, out["loss_figure"], title=f"daml on {args.task}")
        print(f"{out['figure']}: the phase-pi and phase-0 tasks after adapting from one draw "
              f"of source inputs, grid MAE " + ", ".join(f"{m:.4f}" for m in maes)
              + f";  {out['loss_figure']}: the loss curve")
    print(f"evaluate with: python -m pymaml eval {out['model']}")
    return 0


def _phase_name(phase) -> str:
    if phase is None:
        return "all"
    return "pi" if abs(phase - math.pi) < 1e-9 else f"{phase:g}"


def plot_daml(model: DAMLModel, path, *, task="daml-sine", phases=(math.pi, 0.0),
              shots=None, steps=None, seed: int = 0, grid_points: int = 100):
    """One panel per phase (default: pi, then 0): the true sine and the base network after
    `steps` (default: the model's) inner steps on one draw of unlabeled source inputs (marked
    on the x axis), over [-2pi, 2pi]. Returns each panel's mean absolute error on
    `grid_points` evenly spaced inputs."""
    from .plots import _figure
    family = _tasks.get_daml_family(task, shots=shots)
    if not isinstance(family, _tasks.DAMLSine):
        raise ValueError("the DAML figure needs a family with phases and a known target "
                         "(daml-sine)")
    steps = model.inner_steps if steps is None else steps
    g = torch.Generator().manual_seed(seed)
    dtype, device = model.weights.dtype, model.weights.device
    fig = _figure(figsize=(6.4 * len(phases), 4.8))
    axes = fig.subplots(1, len(phases), squeeze=False)[0]
    maes = []
    for ax, phase in zip(axes, phases):
        batch = family.sample_phase(phase, 1, steps=steps, generator=g, dtype=torch.float64)
        net = model.adapt(batch.x_source.to(device, dtype), steps=steps)  # [1, ...]: T = 1
        ids = family.tasks_of_phase(phase, 1)

        def on(n):
            x = family.grid(n).unsqueeze(0)
            with torch.no_grad():
                pred = net(x.to(device, dtype)).double().cpu()
            return x[0, :, 0], family.target(ids, x)[0, :, 0], pred[0, :, 0]

        _, truth, pred = on(grid_points)
        maes.append((pred - truth).abs().mean().item())
        x, truth, pred = on(1000)
        name = "pi" if phase > 1 else "0"
        ax.plot(x, truth, label=f"sin(x + {name})" if phase else "sin(x)")
        ax.plot(x, pred, label=f"net(x) after {steps} steps on source inputs")
        src = batch.x_source.reshape(-1)
        ax.plot(src, torch.full_like(src, -1.15), "x", color="C2",
                label=f"{src.numel()} unlabeled source inputs")
        ax.set_title(f"{family.name}, phase {name}: grid MAE {maes[-1]:.3f} "
                     f"({grid_points} points)", fontsize=11)
        ax.set_ylim(-1.35, 1.35)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return maes


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
    from . import cli
    model = DAMLModel.load(args.model)
    task = args.task or model.info.get("task") or "daml-sine"
    path = _io.check_writable(args.out or os.path.splitext(args.model)[0] + "-tasks.png",
                              "figure")
    with cli._writing(path):
        maes = plot_daml(model, path, task=task, shots=args.shots, steps=args.steps,
                         seed=args.seed)
    print(f"{path}: phases pi and 0, mean absolute error on a 100-point grid: "
          + ", ".join(f"{m:.3f}" for m in maes))
    return 0
