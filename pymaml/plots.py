"""Figures (matplotlib, written to files): a meta-trained model adapted to a few
examples of a task, drawn as in the seed's maml-sine.png (the true curve, the network after
adapting, the examples as dots), and the meta-loss curve of a training run."""

from __future__ import annotations

import math
from typing import List, Optional

import torch

from . import _checks
from . import tasks as _tasks
from .daml_model import DAMLModel
from .model import MetaMLP

__all__ = ["plot_adaptation", "plot_losses", "plot_daml", "plot_episodes"]


def _figure(**kwargs):
    # A bare Figure renders to files without pyplot, so a user's pyplot backend (a notebook's,
    # say) is left alone.
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise RuntimeError("figures need matplotlib: pip install matplotlib") from None
    return Figure(**kwargs)


def _label_xy(ax) -> None:
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.grid(alpha=0.3)


def _np(*tensors):
    # matplotlib reads tensors through numpy's deprecated __array__ path (a warning per call).
    return [t.detach().cpu().numpy() for t in tensors]


def plot_adaptation(model: MetaMLP, path, *, task="seed-sine", task_ids=None, num_tasks: int = 1,
                    shots: Optional[int] = None, steps: Optional[int] = None, seed: int = 0,
                    grid_points: int = 100) -> List[float]:
    """Adapts `model` on `shots` random examples of each task and draws, per task, the true
    curve, the adapted network and the examples (one panel per task; with one task the figure
    is the seed's). Tasks are `task_ids` ([n, D] as the family's sample_tasks gives, e.g.
    [[math.pi]] for the seed's phase-pi task) or `num_tasks` drawn with `seed`.

    Returns, per task, the adapted network's mean absolute error on `grid_points` evenly
    spaced inputs over the task's input range."""
    family = _tasks.get_family(task, shots=shots)
    if not isinstance(family, _tasks.FunctionTasks):
        raise ValueError("figures need a task family with a known target function "
                         "(seed-sine, sine, or a pymaml.tasks.FunctionTasks subclass)")
    g = torch.Generator().manual_seed(seed)
    ids = family.sample_tasks(num_tasks, g) if task_ids is None else torch.as_tensor(task_ids, dtype=torch.float64)
    width = family.sample_tasks(1, torch.Generator()).shape[1]
    if ids.dim() != 2 or ids.shape[0] < 1 or ids.shape[1] != width:
        raise ValueError(f"task_ids must be [tasks, {width}] for task {family.name!r}, got shape "
                         f"{list(ids.shape)}")
    grid_points = _checks.check_int("grid_points", grid_points, 2)
    n = ids.shape[0]
    dtype, device = model.params.dtype, model.params.device
    x = family.inputs(n, family.shots, g)
    y = family.target(ids, x)
    adapted = model.adapt(x.to(device, dtype), y.to(device, dtype), steps=steps)
    steps = model.inner_steps if steps is None else steps

    def on(xs):  # true and adapted curves of every task on inputs xs [N, 1]
        xs = xs.expand(n, -1, 1)
        with torch.no_grad():
            pred = adapted(xs.to(device, dtype)).double().cpu()
        return xs, family.target(ids, xs), pred

    _, truth, pred = on(family.grid(grid_points))
    maes = (pred - truth).abs().mean(dim=(1, 2)).tolist()

    cols = min(3, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / cols)
    fig = _figure(figsize=(6.4, 4.8) if n == 1 else (4.8 * cols, 3.6 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    dense_x, dense_y, dense_pred = on(family.grid(1000))
    for i in range(rows * cols):
        ax = axes[i // cols][i % cols]
        if i >= n:
            ax.axis("off")
            continue
        ax.plot(*_np(dense_x[i, :, 0], dense_y[i, :, 0]), label="true function")
        ax.plot(*_np(dense_x[i, :, 0], dense_pred[i, :, 0]),
                label=f"net(x) after {steps} step{'s' if steps != 1 else ''}")
        ax.plot(*_np(x[i, :, 0], y[i, :, 0]), "o", label=f"{family.shots} examples")
        if n > 1:
            ax.set_title(f"task {i + 1}, {task_words(family, ids[i])}: MAE {maes[i]:.3f}",
                         fontsize=10)
        _label_xy(ax)
    axes[0][0].legend(fontsize=9)
    if n == 1:
        axes[0][0].set_title(f"{family.name}, task {task_words(family, ids[0])}\nadapted on "
                             f"{family.shots} examples (MAE {maes[0]:.3f} on {grid_points} grid "
                             "points)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return maes


def task_words(family, task_id) -> str:
    """Which task a figure shows, in a few words: its target with the task's numbers (the
    phase of a phase sine, amplitude and phase of sine), else its identity's numbers."""
    values = [float(v) for v in task_id]
    if isinstance(family, _tasks.Sine):
        return f"y = {values[0]:.2f} sin(x - {values[1]:.2f})"
    if isinstance(family, (_tasks.SeedSine, _tasks.DAMLSine)):
        name = phase_name(values[0])
        return "phase 0: y = sin(x)" if name == "0" else f"phase {name}: y = sin(x + {name})"
    return "(" + ", ".join(f"{v:.3g}" for v in values) + ")"


def plot_losses(losses: torch.Tensor, path, *, title: str = "meta-training loss") -> None:
    """The meta-loss per iteration (faint) and its moving average over ~1/100 of the run."""
    losses = torch.as_tensor(losses, dtype=torch.float64).flatten()
    if losses.numel() == 0:
        raise ValueError("there is no loss history to plot (0 iterations)")
    n = losses.numel()
    window = max(1, n // 100)
    smooth = torch.nn.functional.avg_pool1d(losses[None, None], window, stride=1)[0, 0]
    it = torch.arange(1, n + 1)
    fig = _figure(figsize=(6.4, 4.0))
    ax = fig.subplots()
    ax.plot(*_np(it, losses), alpha=0.25, linewidth=0.5, label="meta-loss per iteration")
    ax.plot(*_np(it[window - 1:], smooth), linewidth=1.5,
            label=f"moving average ({window} iterations)")
    if (losses > 0).all():
        ax.set_yscale("log")
    ax.set_xlabel("meta-iteration")
    ax.set_ylabel("post-adaptation query loss")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def phase_name(phase) -> str:
    """A DAML phase in a table or title: "pi", "0", ...; "all" for None (no phases)."""
    if phase is None:
        return "all"
    return "pi" if abs(phase - math.pi) < 1e-9 else f"{phase:g}"


def plot_daml(model: DAMLModel, path, *, task="daml-sine", phases=(math.pi, 0.0),
              shots=None, steps=None, seed: int = 0, grid_points: int = 100):
    """One panel per phase (default: pi, then 0): the true sine and the base network after
    `steps` (default: the model's) inner steps on one draw of unlabeled source inputs (marked
    on the x axis), over [-2pi, 2pi]. Returns each panel's mean absolute error on
    `grid_points` evenly spaced inputs."""
    family = _tasks.get_daml_family(task, shots=shots)
    if not isinstance(family, _tasks.DAMLSine):
        raise ValueError("the DAML figure needs a family with phases and a known target "
                         "(daml-sine)")
    steps = model.inner_steps if steps is None else steps
    g = torch.Generator().manual_seed(seed)
    dtype, device = model.weights.dtype, model.weights.device
    fig = _figure(figsize=(6.4 * len(phases), 5.4), layout="constrained")
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
        ax.plot(*_np(x, truth), label=f"sin(x + {name})" if phase else "sin(x)")
        ax.plot(*_np(x, pred), label=f"net(x) after {steps} steps on source inputs")
        _source_rug(ax, batch.x_source[0])
        ax.set_title(f"{family.name}, phase {name}: grid MAE {maes[-1]:.3f} "
                     f"({grid_points} points)", fontsize=11)
        ax.set_ylim(-1.6, 1.35)
        _label_xy(ax)
        # below the axes: the legend never covers the curves
        ax.legend(fontsize=9, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    fig.savefig(path, dpi=110)
    return maes


def _source_rug(ax, x_source) -> None:
    """The unlabeled source inputs (x_source [K_s, 1], or [steps, K_s, 1]: a batch per inner
    step) as a rug under the curves: a row of ticks per inner step, each row a little higher,
    so that inputs close together (or the same input at every step) stay apart."""
    rows = x_source.reshape(-1, x_source.shape[-2]) if x_source.dim() == 3 \
        else x_source.reshape(1, -1)
    for k, xs in enumerate(rows):
        ax.plot(*_np(xs, torch.full_like(xs, -1.5 + 0.06 * k)), "|", color="C2", markersize=9,
                label=None if k else f"{rows.numel()} unlabeled source inputs" + (
                    ", a row per inner step" if len(rows) > 1 else ""))


def plot_episodes(model: MetaMLP, path, family, *, episodes: int = 3, steps: Optional[int] = None,
                  seed: int = 0) -> float:
    """Draws `episodes` classification episodes of `family` (an Episodes of square images):
    per episode a row of its support images (one per class, titled with the label) and one
    query image per class, titled with the label the adapted model predicts (green when
    right, red when wrong). Returns the accuracy over the drawn queries."""
    batch = family.sample(episodes, generator=torch.Generator().manual_seed(seed),
                          dtype=model.params.dtype, device=model.params.device)
    with torch.no_grad():
        predicted = model.adapt(batch.x_support, batch.y_support, steps=steps)(
            batch.x_query).argmax(-1)
    W, side = family.ways, int(round(math.sqrt(family.n_in)))
    fig = _figure(figsize=(1.1 * 2 * W, 1.3 * episodes))
    axes = fig.subplots(episodes, 2 * W, squeeze=False)
    for e in range(episodes):
        for j in range(W):  # points are ordered class by class (Episodes)
            s, q = j * family.shots, j * family.queries
            right = predicted[e, q].item() == j
            for ax, x, title, color in (
                    (axes[e, j], batch.x_support[e, s], f"class {j}", "black"),
                    (axes[e, W + j], batch.x_query[e, q], f"→ {predicted[e, q].item()}",
                     "green" if right else "red")):
                ax.imshow(*_np(x.reshape(side, side)), cmap="Greys", vmin=0, vmax=1)
                ax.set_title(title, fontsize=8, color=color)
                ax.set_xticks([])
                ax.set_yticks([])
        axes[e, 0].set_ylabel(f"episode {e + 1}", fontsize=8)
    fig.supxlabel("support: one image per class (title: its label)   |   queries (title: the "
                  "adapted model's prediction)", fontsize=8)
    fig.suptitle(f"{W}-way {family.shots}-shot episodes: support (left), queries and the "
                 "adapted model's predictions (right)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return (predicted == batch.y_query).double().mean().item()
