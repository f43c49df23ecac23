"""The command line: `python -m pymaml <command>` (or the `pymaml` console script).

    train  meta-train (with no options: the seed's experiment) and write the adapted-sine
           figure, the loss curve, the model and a checkpoint
    eval   the evaluation protocol of a saved model's algorithm (the MAML paper's; DAML's grid
           error per phase), as a table
    plot   figures of a saved model adapted to several tasks
    demo   a short run on the seed's task with the fused op and the autograd reference, timed
    info   build facts: version, whether the fused op and its CUDA kernels are compiled in

Errors are one line each, never a traceback (exit code 2 for flags, 1 for files and runs, 130
for Ctrl-C): docs/training.md's "The command line"; under torchrun: docs/distributed.md. What
differs by algorithm (its flags, output names, report, figure, evaluation) the commands ask of
the algorithm's entry of pymaml.algorithms.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import warnings

import torch

from . import _checks
from . import _io
from . import _paths
from . import _ops
from . import _rates
from . import algorithms
from . import distributed as _distributed
from . import plots
from ._flags import FlagError as _FlagError
from ._flags import available_cpus as _available_cpus  # noqa: F401 (read as cli's by tests)
from ._flags import count as _count, int_list as _int_list, key_value as _key_value
from ._flags import optimizer as _optimizer, real as _real, threads as _threads
from ._version import __version__
from .algorithms import evaluate
from .config import DEFAULTS, OPTIMIZERS, check_optimizer_kwargs
from .evaluate import EVAL_SEED
from .tasks import DATA_FAMILIES, FAMILIES
from .trainer import DTYPES, TrainingDiverged, train


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


# ---- commands -----------------------------------------------------------------------------------

# The flags `train` hands pymaml.train as they are, under the same names.
_SAME_NAMES = ("algorithm", "sizes", "activation", "loss", "inner_steps", "inner_lr",
               "meta_batch_size", "iterations", "optimizer", "outer_lr", "shots", "queries",
               "data", "ways", "backend", "device", "seed", "log_every", "progress",
               "checkpoint_every", "resume", "overwrite", "distributed")


def _save_and_report(result, out):
    """Saves a finished run's model to out["model"] and prints what the run did; returns it."""
    model = result.model
    try:
        model.save(out["model"], overwrite=True)  # (_check_train_outputs asked first)
    except OSError as exc:  # e.g. the disk filled up during training
        raise _io.PathError(exc.errno, f"{exc}; the trained weights are in the checkpoint "
                                 f"{result.checkpoint}: once fixed, rerun with --resume to write "
                                 "the model and figures") from None
    print("\n".join(result.summary()))
    print(f"model: {out['model']}   checkpoint: {result.checkpoint}")
    return model


def cmd_train(args) -> int:
    entry = algorithms.get(args.algorithm)
    args.task = args.task or entry.default_task
    _check_algorithm_flags(args, entry)
    own = entry.train_kwargs(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    prefix = args.out or entry.out_prefix(args)
    out = dict(figure=prefix + ".png", loss_figure=prefix + "-loss.png", model=prefix + ".pt",
               checkpoint=args.checkpoint or prefix + ".ckpt")
    _paths.check_distinct({"--checkpoint": out["checkpoint"], "model file": out["model"],
                           "figure": out["figure"], "loss figure": out["loss_figure"]})
    _check_train_outputs(args, out)
    init = args.init
    if init not in ("seed", "torch"):
        try:
            init = entry.model_class.load(init)
        except (OSError, ValueError) as exc:
            raise ValueError(f"--init {exc}") from None  # the command line shows only the words
    result = train(args.task, **{name: getattr(args, name) for name in _SAME_NAMES},
                   optimizer_kwargs=dict(args.optimizer_arg), init=init,
                   dtype=DTYPES[args.dtype], checkpoint=out["checkpoint"],
                   distributed_timeout=args.dist_timeout, **own)
    if result.rank != 0:  # the other processes of a distributed run hold the same model
        return 130 if result.status == "interrupted" else 0
    if result.status == "interrupted":
        print(f"stopped at iteration {result.iterations}; continue with the same command and "
              f"--resume (checkpoint: {result.checkpoint})", file=sys.stderr)
        return 130
    model = _save_and_report(result, out)
    for line in entry.report(model, args.task, args.shots):
        print(line)
    if not args.no_plots:
        with _writing(out["figure"]):
            shows = entry.figure(model, out["figure"], args.task, shots=args.shots,
                                 seed=args.seed, data=args.data)
        with _writing(out["loss_figure"]):
            plots.plot_losses(result.losses, out["loss_figure"],
                              title=f"{result.config['algorithm']} on {args.task}")
        print(f"{out['figure']}: {shows};  {out['loss_figure']}: the loss curve")
    held_out = (f" --task {args.task} --data DIR_OF_OTHER_CHARACTERS --shots {args.shots or 1}"
                if args.task in DATA_FAMILIES else "")
    print(f"evaluate with: python -m pymaml eval {out['model']}{held_out}")
    return 0


def _check_algorithm_flags(args, entry) -> None:
    """--task and the algorithms' own flags (their `flags`) fit the run's algorithm."""
    if args.task not in entry.task_names:
        raise _FlagError(f"--algorithm {entry.name} trains {entry.task_kind} "
                         f"({', '.join(entry.task_names)}), not --task {args.task}")
    for other in algorithms.REGISTRY.values():
        foreign = [flag for flag in other.flags if flag not in entry.flags]
        # (a flag's attribute, as argparse names it)
        if any(getattr(args, flag.lstrip("-").replace("-", "_")) is not None for flag in foreign):
            raise _FlagError(f"{' and '.join(foreign)} apply to --algorithm {other.name} only")


@contextlib.contextmanager
def _writing(path):
    """An OSError while writing `path` (a figure), in words that name it."""
    try:
        yield
    except OSError as exc:
        raise _io.io_error(exc, path, "writing") from None


def _check_train_outputs(args, out) -> None:
    """Before training: the flags' values train() would only find wrong later, and every file
    train writes after the run (model, figures; train() checks the checkpoint) writable, an
    existing model replaced only when asked."""
    # Flags left out take the task's defaults (a data set's family's: train checks them then).
    defaults = {} if args.task in DATA_FAMILIES else DEFAULTS
    optimizer = args.optimizer or defaults.get("optimizer")
    outer_lr = defaults.get("outer_lr") if args.outer_lr is None else args.outer_lr
    if optimizer is not None and outer_lr is not None:
        try:
            check_optimizer_kwargs(OPTIMIZERS.get(optimizer, optimizer),
                                   dict(args.optimizer_arg), outer_lr, name="--optimizer-arg")
        except ValueError as exc:
            raise _FlagError(str(exc)) from None
    _distributed.check_not_copies(args.distributed, "--no-distributed")
    if _distributed.env_rank() != 0:
        return  # rank 0 writes the files (under torchrun), so its disk is the one to check
    for kind, key in [("model", "model")] + [("figure", k) for k in ("figure", "loss_figure")
                                                 if not args.no_plots]:
        _io.check_writable(out[key], "model file" if kind == "model" else kind)
        _paths.check_replaceable(out[key], kind, f"this run's {kind}", args.overwrite,
                                 ask="--overwrite")
    if os.path.exists(out["model"]) and not (args.resume or args.overwrite):
        raise FileExistsError(f"{out['model']} already exists: pass --resume to continue its run, "
                              "--overwrite to replace it, or --out to choose another name")


def _saved_model(args):
    """(the model in args.model, whatever its algorithm; that algorithm's entry; the task to
    run it on: --task, else the one it was trained on, else the algorithm's default)."""
    model = _io.load_model(args.model)
    entry = algorithms.for_model(model)
    task = args.task or model.info.get("task") or entry.eval_task
    if task not in entry.task_names:
        names = ", ".join(entry.task_names)
        if args.task is None:
            raise ValueError(f"{args.model} was trained on task {task!r}, which the command "
                             f"line does not know: pass --task ({names})")
        raise ValueError(f"{args.model} holds a {model.kind}: use it on {entry.task_kind} "
                         f"({names}), not {task!r}")
    return model, entry, task


def cmd_eval(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    model, _, task = _saved_model(args)
    options = dict(shots=args.shots, num_tasks=args.tasks, inner_lr=args.inner_lr,
                   seed=args.seed, backend=args.backend)
    if task in DATA_FAMILIES:
        options.update(data=args.data, ways=args.ways, queries=args.queries)
    elif args.data or args.ways or args.queries:
        raise _FlagError("--data, --ways and --queries apply to --task omniglot")
    if args.steps is not None:  # else the protocol's own (MAML's 1, 5, 10; DAML's model's)
        options["steps"] = args.steps
    result = evaluate(model, task, **options)
    print(f"{args.model}: {type(model).__name__}({model.extra_repr()})")
    print(result.table())
    return 0


def cmd_plot(args) -> int:
    model, entry, task = _saved_model(args)
    path = _io.check_writable(args.out or os.path.splitext(args.model)[0] + "-tasks.png",
                              "figure")
    _paths.check_replaceable(path, "figure", "the figure (--out)", ask=None)  # not MODEL itself
    with _writing(path):
        shows = entry.plot(model, path, task, shots=args.shots, num_tasks=args.tasks,
                           steps=args.steps, seed=args.seed, data=args.data)
    print(f"{path}: {shows}")
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
    fused = _ops.available()
    print(f"pymaml {__version__}")
    print(f"torch {torch.__version__} (CUDA: {torch.version.cuda})")
    print(f"fused op compiled: {fused}")
    if not fused:
        print(f"  why not: {_ops.unavailable_reason(torch.device('cpu'), torch.float32)}")
    print(f"CUDA kernels compiled: {_ops.cuda_compiled()}")
    if fused:  # PYMAML_CPU_ISA=generic|avx2 picks a narrower one
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
    t.add_argument("--algorithm", choices=algorithms.NAMES, default="maml",
                   help="meta-learning algorithm (metasgd: per-parameter learned inner rates; "
                        "anil: only the head adapts)")
    t.add_argument("--data", metavar="DIR", help="the Omniglot archives' directory (--task omniglot)")
    t.add_argument("--ways", type=_count(2), help="classes per episode (--task omniglot; default 5)")
    t.add_argument("--sizes", type=_int_list, help="layer widths, e.g. 1,40,40,1 (default: the "
                   "task's: 1,32,32,1; omniglot: 784,256,128,64,64,WAYS)")
    t.add_argument("--activation", choices=_checks.ACTIVATIONS, default="relu", help="hidden activation")
    t.add_argument("--loss", choices=_checks.LOSSES,
                   help="inner and query loss (default: l1; omniglot: cross_entropy)")
    t.add_argument("--inner-steps", type=_count(0), help="SGD steps per task (default: 5; omniglot: 1)")
    t.add_argument("--inner-lr", type=_real(False), help="inner SGD step size (default: 0.03; omniglot: 0.4)")
    t.add_argument("--inner-batch", type=_count(1), metavar="N",
                   help="points per inner step, a minibatch of its own each (default: all)")
    t.add_argument("--learn-inner-lr", choices=_rates.MODES, metavar="MODE",
                   help="learn the inner rates with the weights, starting at --inner-lr: "
                        + ", ".join(_rates.MODES) + " (metasgd: per-parameter)")
    t.add_argument("--adapt-layers", type=_int_list, metavar="I,J",
                   help="the linear layers that adapt in the inner loop, e.g. -1 for the head "
                        "(anil); default: all")
    t.add_argument("--meta-batch-size", type=_count(1),
                   help="tasks per meta-iteration (default: 1; omniglot: 32)")
    t.add_argument("--iterations", type=_count(1),
                   help="meta-iterations (default: 275000; omniglot: 60000)")
    t.add_argument("--optimizer", type=_optimizer,
                   help="sgd, adam, or a torch.optim class name (AdamW, RMSprop, ...; default: "
                        "sgd; omniglot: adam)")
    t.add_argument("--outer-lr", type=_real(True),
                   help="outer optimizer learning rate (default: 0.01; omniglot: 0.001)")
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
    t.add_argument("--dist-timeout", type=_real(True), default=_distributed.DEFAULT_TIMEOUT_S,
                   metavar="SECONDS", help="how long a process waits for the others before the "
                                           "run stops with an error")
    # Each algorithm's own flags (entry.flags), once where entries share them.
    own = {flag: kw for entry in algorithms.REGISTRY.values() for flag, kw in entry.flags.items()}
    for flag, keywords in own.items():
        t.add_argument(flag, **keywords)
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
    e.add_argument("--data", metavar="DIR", help="the Omniglot archives' directory (--task omniglot)")
    e.add_argument("--ways", type=_count(2), help="classes per episode (default: the model's outputs)")
    e.add_argument("--queries", type=_count(1), help="query examples per class (omniglot; default 15)")
    e.add_argument("--steps", type=_int_list,
                   help="adaptation steps, e.g. 0,1,5,10 (default: 1,5,10; omniglot: 1,3,10; "
                        "a DAML model's own)")
    e.add_argument("--tasks", type=_count(2), default=600, help="held-out tasks")
    e.add_argument("--inner-lr", type=_real(False),
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
    p.add_argument("--data", metavar="DIR", help="the Omniglot archives' directory (--task omniglot)")
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
    """Runs the command in `argv` (default: sys.argv); its errors and warnings are said in one
    line each: the command line never shows a traceback. Returns the exit code."""
    args = build_parser().parse_args(argv)
    where = f" (rank {_distributed.env_rank()})" if _distributed.launched_by_torchrun() else ""
    # Warnings as one line each, like the errors (Python's own format adds the source line).
    shown = warnings.showwarning
    warnings.showwarning = lambda message, category, *rest, **kw: print(
        f"pymaml {args.command}: warning: {_one_line(message)}", file=sys.stderr)
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
    finally:
        warnings.showwarning = shown


def _one_line(exc: BaseException) -> str:
    """The first line of an exception's message (torch's may run to many), or its type; an
    allocation that failed (torch's CPU allocator says so in a RuntimeError) in pymaml's words,
    with the flags that size the work."""
    text = str(exc).strip()
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in text:
        asked = re.search(r"tried to allocate (\d+) bytes", text)
        said = f"{int(asked[1]) / 2**30:.3g} GiB asked" if asked else _io.first_line(exc)
        return (f"out of memory ({said}): lower --meta-batch-size, --shots, --tasks or --sizes"
                if text else "out of memory")
    return _io.first_line(exc)


if __name__ == "__main__":
    sys.exit(main())
