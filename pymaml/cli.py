"""The command line: `python -m pymaml <command>` (or the `pymaml` console script).

    train  meta-train (with no options: the seed's experiment) and write the adapted-sine
           figure, the loss curve, the model and a checkpoint
    eval   the MAML paper's evaluation protocol on a saved model, as a table
    plot   figures of a saved model adapted to several tasks
    demo   a short run on the seed's task with the fused op and the autograd reference, timed
    info   build facts: version, whether the fused op and its CUDA kernels are compiled in

Mistakes in flags or files print one line and exit with a non-zero code (2 for flags, 1 for
files and runs); Ctrl-C during training writes the checkpoint and exits with code 130.

`torchrun --nproc_per_node=N -m pymaml train ...` trains data-parallel over N processes
(pymaml.distributed); rank 0 alone prints and writes the model, the figures and the checkpoint.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import math
import os
import sys
import warnings

import torch

from . import _checks
from . import _io
from . import _ops
from . import _rates
from . import distributed as _distributed
from ._version import __version__
from .evaluate import EVAL_SEED, evaluate
from .daml_model import DAMLModel
from .model import MetaMLP
from .tasks import FAMILIES
from .trainer import ALGORITHMS, DTYPES, TrainingDiverged, train
from .config import OPTIMIZERS, check_optimizer_kwargs
from . import functional as F
from . import plots


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the usage is a --help away."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


class _Help(argparse.HelpFormatter):
    """Shows each option's default, unless the help already says it or there is none."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.option_strings and action.default not in (None, False, [], argparse.SUPPRESS) \
                and "default" not in text:
            text += " (default: %(default)s)"
        return text


def _count(minimum):
    """argparse type: an int >= minimum, with an error that names the bound."""
    def parse(text):
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    parse.__name__ = "int"  # argparse names the type in its "invalid int value" message
    return parse


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def _threads(text):
    """argparse type for --threads: 1 up to the CPUs this process may run on (torch crashes
    on a huge count, and more threads than CPUs cannot run at once)."""
    value = _count(1)(text)
    cpus = _available_cpus()
    if value > cpus:
        raise argparse.ArgumentTypeError(f"must be at most {cpus}, the CPUs available to this "
                                         f"process, got {value}")
    return value


def _int_list(text):
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,40,40,1, got {text!r}") from None
    return values


def _optimizer(text):
    if text.lower() in ("sgd", "adam"):
        return text.lower()
    cls = getattr(torch.optim, text, None)
    if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer):
        return cls
    raise argparse.ArgumentTypeError(f"expected sgd, adam or a torch.optim class name such as "
                                     f"AdamW or RMSprop, got {text!r}")


def _key_value(text):
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE such as momentum=0.9, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value  # a plain string


def _outputs(args):
    if args.out:
        prefix = args.out
    else:
        # A run learning its rates is named after them too: maml-per-layer-step-sine...
        method = args.algorithm + (f"-{args.learn_inner_lr}" if args.learn_inner_lr else "")
        if args.task == "seed-sine":
            prefix = f"{method}-sine"  # the seed's figure is maml-sine.png
        else:
            prefix = f"{method}-{args.task}-{args.shots or FAMILIES[args.task]().shots}shot"
    return dict(figure=prefix + ".png", loss_figure=prefix + "-loss.png", model=prefix + ".pt",
                checkpoint=args.checkpoint or prefix + ".ckpt")


# ---- commands -----------------------------------------------------------------------------------

def _interrupted(result) -> int:
    print(f"stopped at iteration {result.iterations}; continue with the same command and "
          f"--resume (checkpoint: {result.checkpoint})", file=sys.stderr)
    return 130


def _save_and_report(result, out):
    """Saves a finished run's model to out["model"] and prints what the run did; returns it."""
    model = result.model
    try:
        model.save(out["model"])
    except OSError as exc:  # e.g. the disk filled up during training
        raise _io.PathError(exc.errno, f"{exc}; the trained weights are in the checkpoint "
                                 f"{result.checkpoint}: once fixed, rerun with --resume to write "
                                 "the model and figures") from None
    processes = result.config.get("processes", 1)
    spread = f", {processes} processes" if processes > 1 else ""
    print(f"{result.iterations} meta-iterations done ({result.config['algorithm']}, "
          f"{result.config['backend']} backend{spread}, {torch.get_num_threads()} thread(s)"
          f"{' each' if spread else ''}); training took {result.wall_time:.1f} s")
    tail = result.losses[-max(100, result.iterations // 100):]
    print(f"meta-loss over the last {tail.numel()} iterations: {tail.mean().item():.4f}")
    print(f"model: {out['model']}   checkpoint: {result.checkpoint}")
    return model


def cmd_train(args) -> int:
    if args.task is None:  # DAML trains its own family (pymaml.daml_cli)
        args.task = "daml-sine" if args.algorithm == "daml" else "seed-sine"
    if args.algorithm == "daml":
        from . import daml_cli
        return daml_cli.cmd_train(args)
    if args.loss_hidden is not None or args.adapt_loss is not None:
        raise _FlagError("--loss-hidden and --adapt-loss apply to --algorithm daml only")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = _outputs(args)
    clash = [k for k in ("figure", "loss_figure", "model") if out[k] == out["checkpoint"]]
    if clash:
        raise ValueError(f"--checkpoint {out['checkpoint']} is also the {clash[0].replace('_', ' ')} "
                         "file: choose another path")
    _check_train_outputs(args, out)
    # Under torchrun, rank 0 writes the files, so its disk is the one to check.
    if (_distributed.env_rank() == 0 and os.path.exists(out["model"])
            and not (args.resume or args.overwrite)):
        raise FileExistsError(f"{out['model']} already exists: pass --resume to continue its run, "
                              "--overwrite to replace it, or --out to choose another name")
    init = args.init if args.init in ("seed", "torch") else _load("--init", args.init)
    result = train(args.task, algorithm=args.algorithm, sizes=args.sizes,
                   activation=args.activation, loss=args.loss, inner_steps=args.inner_steps,
                   inner_batch=args.inner_batch,
                   inner_lr=args.inner_lr, meta_batch_size=args.meta_batch_size,
                   iterations=args.iterations, optimizer=args.optimizer, outer_lr=args.outer_lr,
                   optimizer_kwargs=dict(args.optimizer_arg), shots=args.shots,
                   queries=args.queries, init=init, backend=args.backend, device=args.device,
                   dtype=DTYPES[args.dtype], seed=args.seed, log_every=args.log_every,
                   progress=args.progress, checkpoint=out["checkpoint"],
                   checkpoint_every=args.checkpoint_every, resume=args.resume,
                   overwrite=args.overwrite, distributed=args.distributed,
                   distributed_timeout=args.dist_timeout, learn_inner_lr=args.learn_inner_lr,
                   adapt_layers=args.adapt_layers)
    if result.rank != 0:  # the other processes of a distributed run hold the same model
        return 130 if result.status == "interrupted" else 0
    if result.status == "interrupted":
        return _interrupted(result)
    model = _save_and_report(result, out)
    if not args.no_plots:
        # The seed's figure: a phase-pi task (b = pi) for the seed's task, else a random one.
        ids = [[math.pi]] if args.task == "seed-sine" else None
        with _writing(out["figure"]):
            (mae,) = plots.plot_adaptation(model, out["figure"], task=args.task,
                                           shots=args.shots, task_ids=ids, seed=args.seed)
        with _writing(out["loss_figure"]):
            plots.plot_losses(result.losses, out["loss_figure"],
                              title=f"{result.config['algorithm']} on {args.task}")
        what = "a phase-pi task" if ids else "a random task"
        print(f"{out['figure']}: adapted on {model.info['shots'] or '?'} points of {what}, "
              f"mean absolute error {mae:.4f} on a 100-point grid;  {out['loss_figure']}: the loss curve")
    print(f"evaluate with: python -m pymaml eval {out['model']}")
    return 0


def _load(flag: str, path: str) -> MetaMLP:
    """The model a flag names, its errors prefixed with the flag."""
    try:
        return MetaMLP.load(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{flag} {exc}") from None  # the command line shows only the words


@contextlib.contextmanager
def _writing(path):
    """An OSError while writing `path` (a figure), in words that name it (see _io)."""
    try:
        yield
    except OSError as exc:
        raise _io.io_error(exc, path, "writing") from None


class _FlagError(ValueError):
    """A flag's value found wrong after parsing: exit code 2, as argparse's own."""


def _check_train_outputs(args, out) -> None:
    """Before training: the flags' values train() would only find wrong later, and every file
    train writes after the run (model, figures; train() checks the checkpoint) writable."""
    optimizer = OPTIMIZERS.get(args.optimizer, args.optimizer)
    try:
        check_optimizer_kwargs(optimizer, dict(args.optimizer_arg), args.outer_lr,
                               name="--optimizer-arg")
    except ValueError as exc:
        raise _FlagError(str(exc)) from None
    if _distributed.env_rank() != 0:
        return  # rank 0 writes the files
    _io.check_writable(out["model"], "model file")
    if not args.no_plots:
        _io.check_writable(out["figure"], "figure")
        _io.check_writable(out["loss_figure"], "figure")


def _task_of(args, model) -> str:
    task = args.task or model.info.get("task") or "sine"
    if task not in FAMILIES:
        raise ValueError(f"{args.model} was trained on task {task!r}, which the command line "
                         f"does not know: pass --task ({', '.join(FAMILIES)})")
    return task


def _is_daml(path) -> bool:
    try:
        return isinstance(_io.load_model(path), DAMLModel)
    except (OSError, ValueError):  # the loader words it
        return False


def cmd_eval(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    from . import daml_cli
    if _is_daml(args.model):
        return daml_cli.cmd_eval(args)
    model = MetaMLP.load(args.model)
    task = _task_of(args, model)
    result = evaluate(model, task, shots=args.shots, steps=args.steps or [1, 5, 10],
                      num_tasks=args.tasks,
                      inner_lr=args.inner_lr, seed=args.seed, backend=args.backend)
    print(f"{args.model}: {model.extra_repr()}")
    print(result.table())
    return 0


def cmd_plot(args) -> int:
    from . import daml_cli
    if _is_daml(args.model):
        return daml_cli.cmd_plot(args)
    model = MetaMLP.load(args.model)
    task = _task_of(args, model)
    path = _io.check_writable(args.out or os.path.splitext(args.model)[0] + "-tasks.png",
                              "figure")
    with _writing(path):
        maes = plots.plot_adaptation(model, path, task=task, shots=args.shots,
                                     num_tasks=args.tasks, steps=args.steps, seed=args.seed)
    print(f"{path}: {len(maes)} tasks, mean absolute error on a 100-point grid: "
          + ", ".join(f"{m:.3f}" for m in maes))
    return 0


def cmd_demo(args) -> int:
    fused = _ops.available()
    if not fused:
        print(f"note: {_ops.unavailable_reason(torch.device('cpu'), torch.float32)}; "
              "running the reference backend only")
    settings = dict(meta_batch_size=args.meta_batch_size, optimizer="adam", outer_lr=1e-3,
                    progress=False, log_every=0, seed=args.seed)
    print(f"pymaml {__version__}: MAML on the seed's sine task (1-32-32-1 ReLU, L1, K=4, "
          f"5 inner steps, meta-batch {args.meta_batch_size}, Adam 1e-3)")
    result = train(iterations=args.iterations, backend="fused" if fused else "reference", **settings)
    held_out = evaluate(result.model, "seed-sine", steps=[5], num_tasks=200)
    print(f"  {args.iterations} meta-iterations in {result.wall_time:.1f} s; meta-loss "
          f"{result.losses[:100].mean().item():.3f} (first 100) -> "
          f"{result.losses[-100:].mean().item():.3f} (last 100); held-out MSE after 5 steps "
          f"{held_out.mse[0]:.3f}")
    if fused:
        n = 100
        times = {b: train(iterations=n, backend=b, **settings).wall_time / n
                 for b in ("fused", "reference")}
        print(f"  one meta-iteration: fused {times['fused'] * 1e3:.3f} ms, reference "
              f"{times['reference'] * 1e3:.3f} ms ({times['reference'] / times['fused']:.0f}x); "
              "see benchmarks/ for the measured suite")
    return 0


def cmd_info(args) -> int:
    print(f"pymaml {__version__}")
    print(f"torch {torch.__version__} (CUDA: {torch.version.cuda})")
    print(f"fused op compiled: {_ops.available()}")
    if not _ops.available():
        print(f"  why not: {_ops.unavailable_reason(torch.device('cpu'), torch.float32)}")
    print(f"CUDA kernels compiled: {_ops.cuda_compiled()}")
    if _ops.available():  # PYMAML_CPU_ISA=generic|avx2 picks a narrower one
        print(f"CPU kernels: {_ops._C.cpu_isa()} (best for this CPU: {_ops._C.best_cpu_isa()})")
    print(f"threads: {torch.get_num_threads()}")
    return 0


# ---- the parser ---------------------------------------------------------------------------------

def _add_train_parser(sub, **defaults) -> None:
    t = sub.add_parser("train", help="meta-train; with no options, the seed's experiment", **defaults,
                       description="Meta-trains an MLP (pymaml.train); the defaults are the seed's "
                                   "experiment. Writes PREFIX.png (the model adapted to a task), "
                                   "PREFIX-loss.png, PREFIX.pt (the model) and PREFIX.ckpt.")
    t.add_argument("--task", choices=list(FAMILIES),
                   help="task family (default: seed-sine; daml-sine for --algorithm daml)")
    t.add_argument("--shots", type=_count(1), help="support points per task (default: the task's)")
    t.add_argument("--queries", type=_count(1), help="query points per task (default: = shots)")
    t.add_argument("--algorithm", choices=ALGORITHMS, default="maml",
                   help="meta-learning algorithm (metasgd: per-parameter learned inner rates; "
                        "anil: only the head adapts)")
    t.add_argument("--sizes", type=_int_list, default=[1, 32, 32, 1], help="layer widths, e.g. 1,40,40,1")
    t.add_argument("--activation", choices=_checks.ACTIVATIONS, default="relu", help="hidden activation")
    t.add_argument("--loss", choices=_checks.LOSSES, default="l1", help="inner and query loss")
    t.add_argument("--inner-steps", type=_count(0), default=5, help="SGD steps per task")
    t.add_argument("--inner-lr", type=float, default=3e-2, help="inner SGD step size")
    t.add_argument("--inner-batch", type=_count(1), metavar="N",
                   help="points per inner step, a minibatch of its own each (default: all)")
    t.add_argument("--learn-inner-lr", choices=_rates.MODES, metavar="MODE",
                   help="learn the inner rates with the weights, starting at --inner-lr: "
                        + ", ".join(_rates.MODES) + " (metasgd: per-parameter)")
    t.add_argument("--adapt-layers", type=_int_list, metavar="I,J",
                   help="the linear layers that adapt in the inner loop, e.g. -1 for the head "
                        "(anil); default: all")
    t.add_argument("--meta-batch-size", type=_count(1), default=1, help="tasks per meta-iteration")
    t.add_argument("--iterations", type=_count(1), default=275_000, help="meta-iterations")
    t.add_argument("--optimizer", type=_optimizer, default="sgd",
                   help="sgd, adam, or a torch.optim class name (AdamW, RMSprop, ...)")
    t.add_argument("--outer-lr", type=float, default=1e-2, help="outer optimizer learning rate")
    t.add_argument("--optimizer-arg", type=_key_value, action="append", default=[],
                   metavar="KEY=VALUE", help="an optimizer keyword, e.g. momentum=0.9 (repeatable)")
    t.add_argument("--init", default="seed", help="seed, torch, or a saved model to start from")
    t.add_argument("--backend", choices=_checks.BACKENDS, default="auto", help="fused C++ op or autograd reference")
    t.add_argument("--device", default="cpu", help="torch device")
    t.add_argument("--dtype", choices=list(DTYPES), default="float32", help="parameter and data dtype")
    t.add_argument("--seed", type=int, default=0, help="seeds the initial weights and the tasks")
    t.add_argument("--threads", type=_threads, help="CPU threads (default: torch's)")
    t.add_argument("--log-every", type=_count(0), help="a log line every N iterations (0: none)")
    t.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="the progress bar (default: on when stderr is a terminal)")
    t.add_argument("--out", metavar="PREFIX", help="output name prefix (default: maml-sine for the seed's task)")
    t.add_argument("--checkpoint", help="checkpoint path (default: PREFIX.ckpt)")
    t.add_argument("--checkpoint-every", type=_count(1), default=10_000, help="iterations between checkpoints")
    t.add_argument("--resume", action="store_true", help="continue the run in the checkpoint")
    t.add_argument("--overwrite", action="store_true", help="start afresh over an existing checkpoint and model")
    t.add_argument("--no-plots", action="store_true", help="skip the figures")
    t.add_argument("--distributed", action=argparse.BooleanOptionalAction, default=None,
                   help="data-parallel over the processes of a torchrun launch (default: on when "
                        "torchrun starts two or more)")
    t.add_argument("--dist-timeout", type=float, default=_distributed.DEFAULT_TIMEOUT_S,
                   metavar="SECONDS", help="how long a process waits for the others before the "
                                           "run stops with an error")
    from . import daml_cli
    daml_cli.add_train_flags(t)
    t.set_defaults(run=cmd_train)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pymaml", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    defaults = dict(formatter_class=_Help)
    _add_train_parser(sub, **defaults)

    e = sub.add_parser("eval", help="the MAML paper's evaluation protocol on a saved model", **defaults)
    e.add_argument("model", help="a saved model (.pt) or checkpoint (.ckpt)")
    e.add_argument("--task", choices=list(FAMILIES), help="default: the task the model was trained on")
    e.add_argument("--shots", type=_count(1), help="support = held-out points per task (default: the task's)")
    e.add_argument("--steps", type=_int_list,
                   help="adaptation steps, e.g. 0,1,5,10 (default: 1,5,10; a DAML model's own)")
    e.add_argument("--tasks", type=_count(2), default=600, help="held-out tasks")
    e.add_argument("--inner-lr", type=float,
                   help="one inner rate for every step (default: the model's learned rates, or "
                        "its inner lr)")
    e.add_argument("--seed", type=int, default=EVAL_SEED, help="seeds the held-out tasks")
    e.add_argument("--backend", choices=_checks.BACKENDS, default="auto", help="adaptation backend")
    e.add_argument("--threads", type=_threads, help="CPU threads (default: torch's)")
    e.set_defaults(run=cmd_eval)

    p = sub.add_parser("plot", help="figures of a saved model adapted to several tasks", **defaults)
    p.add_argument("model", help="a saved model (.pt) or checkpoint (.ckpt)")
    p.add_argument("--task", choices=list(FAMILIES), help="default: the task the model was trained on")
    p.add_argument("--shots", type=_count(1), help="examples per task (default: the task's)")
    p.add_argument("--tasks", type=_count(1), default=6, help="how many tasks to draw")
    p.add_argument("--steps", type=_count(0), help="adaptation steps (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="seeds the tasks drawn")
    p.add_argument("--out", help="figure path (default: MODEL-tasks.png)")
    p.set_defaults(run=cmd_plot)

    d = sub.add_parser("demo", help="a short run on the seed's task, fused vs reference timing")
    d.add_argument("--iterations", type=_count(1), default=1500)
    d.add_argument("--meta-batch-size", type=_count(1), default=16)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(run=cmd_demo)

    sub.add_parser("info", help="build facts").set_defaults(run=cmd_info)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # Warnings as one line each, like the errors (Python's own format adds the source line).
    shown = warnings.showwarning
    warnings.showwarning = lambda message, category, *rest, **kw: print(
        f"pymaml {args.command}: warning: {_one_line(message)}", file=sys.stderr)
    try:
        return _run(args)
    finally:
        warnings.showwarning = shown


def _run(args) -> int:
    """args.run(args), its errors in one line each: the command line never shows a traceback."""
    where = f" (rank {_distributed.env_rank()})" if _distributed.launched_by_torchrun() else ""
    try:
        return args.run(args)
    except _FlagError as exc:
        print(f"pymaml {args.command}{where}: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, OSError, RuntimeError, ImportError, MemoryError) as exc:
        # TrainingDiverged, missing or foreign files, bad settings: one line, no traceback.
        kind = "stopped" if isinstance(exc, TrainingDiverged) else "error"
        print(f"pymaml {args.command}{where}: {kind}: {_one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"pymaml {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # never a traceback: a bug, said in one line
        print(f"pymaml {args.command}{where}: internal error: {type(exc).__name__}: "
              f"{_one_line(exc)} (a bug in pymaml: please report it)", file=sys.stderr)
        return 1


def _one_line(exc: BaseException) -> str:
    """The first line of an exception's message (torch's may run to many), or its type."""
    text = str(exc).strip()
    if isinstance(exc, MemoryError):
        return "out of memory" + (f" ({text})" if text else "")
    return text.splitlines()[0] if text else type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
