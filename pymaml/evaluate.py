"""pymaml.evaluate's protocols on held-out tasks (docs/training.md, "pymaml.evaluate" and the
classification and DAML sections): the MAML paper's few-shot regression and classification
episodes for a MetaMLP (`evaluate`), the error after unlabeled adaptation for a DAMLModel
(`evaluate_daml`). Intervals are 1.96 * std / sqrt(num_tasks), the population std, as the
MAML code computes it."""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from . import _checks
from . import _rates
from . import tasks as _tasks
from . import functional as F
from .daml_model import DAMLModel
from .model import MetaMLP
from .plots import phase_name

__all__ = ["evaluate", "EvalResult", "AccuracyResult", "evaluate_daml", "DAMLEvalResult"]

EVAL_SEED = 2_147_483_647  # held-out tasks: a stream no training run uses by default


@dataclasses.dataclass
class EvalResult:
    """Per number of adaptation steps (`steps[i]`): the mean over tasks and the 95 % interval
    of the held-out-point MSE, its median over tasks (robust to the few tasks whose inner SGD
    may diverge at a large step size; a NaN counts as +inf), the number of tasks whose MSE is
    not finite, and (None for families without a target function) the grid MSE and grid MAE.
    For a model with learned inner rates that adapted with them: their mode and summary,
    rows of (label, mean, min, max) per weight matrix / bias vector and per step
    (pymaml._rates.summary); adapt_layers: the layers that adapted (None: all)."""
    task: str
    shots: int
    num_tasks: int
    inner_lr: float
    steps: List[int]
    mse: List[float]
    mse_ci95: List[float]
    mse_median: List[float]
    diverged: List[int]
    grid_mse: Optional[List[float]]
    grid_mse_ci95: Optional[List[float]]
    grid_mae: Optional[List[float]]
    grid_points: int
    learn_inner_lr: Optional[str] = None
    rate_summary: Optional[List[Tuple[str, float, float, float]]] = None
    adapt_layers: Optional[List[int]] = None
    trained_steps: Optional[int] = None  # the inner steps the model was meta-trained with

    def table(self) -> str:
        rate = f"inner lr {self.inner_lr:g}" if self.learn_inner_lr is None else \
            f"learned inner rates ({self.learn_inner_lr})"
        if self.adapt_layers is not None:
            rate += f", adapting layer(s) {', '.join(map(str, self.adapt_layers))} only"
        lines = [f"{self.num_tasks} held-out '{self.task}' tasks, {self.shots}-shot, {rate}; "
                 f"mean ± 1.96·std/√{self.num_tasks}"]
        head = f"{'steps':>5}  {'MSE on ' + str(self.shots) + ' held-out points':>28}  {'median':>8}"
        if self.grid_mse is not None:
            head += f"  {'grid MSE (' + str(self.grid_points) + ' points)':>24}  {'grid MAE':>8}"
        lines.append(head)
        for i, s in enumerate(self.steps):
            row = f"{s:>5}  {self.mse[i]:>18.4f} ± {self.mse_ci95[i]:<7.4f}  {self.mse_median[i]:>8.4f}"
            if self.grid_mse is not None:
                row += f"  {self.grid_mse[i]:>14.4f} ± {self.grid_mse_ci95[i]:<7.4f}  {self.grid_mae[i]:>8.4f}"
            lines.append(row)
        # Learned rates cannot be made smaller; past the steps they were learned for they
        # repeat the last step's, which is where they diverge.
        advice = "try a smaller inner lr" if self.learn_inner_lr is None else (
            f"the learned rates are for {self.trained_steps} steps (beyond them the last step's "
            "repeat): evaluate with no more steps, or pass inner_lr= a number")
        for s, n in zip(self.steps, self.diverged):
            if n:
                lines.append(f"after {s} steps the MSE of {n} of the {self.num_tasks} tasks is not "
                             f"finite (the inner SGD diverged): {advice}")
        if self.rate_summary:
            beyond = "; steps beyond those learned reuse the last step's" \
                if _rates.per_step(self.learn_inner_lr) else ""
            lines.append(f"learned inner rates ({self.learn_inner_lr}{beyond}):")
            lines.append(f"{'':>16}  {'mean':>10}  {'min':>10}  {'max':>10}")
            lines += [f"{label:>16}  {mean:>10.4g}  {low:>10.4g}  {high:>10.4g}"
                      for label, mean, low, high in self.rate_summary]
        return "\n".join(lines)


def _check_protocol(steps, num_tasks, grid_points, seed, inner_lr):
    """The arguments both protocols share, checked: (steps as a list, num_tasks, grid_points,
    seed, inner_lr)."""
    if not isinstance(steps, Sequence) or isinstance(steps, str):
        raise TypeError(f"steps must be a list of step counts such as [1, 5, 10], got {steps!r}")
    steps = list(steps)
    if not steps or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in steps):
        raise ValueError(f"steps must be a non-empty list of ints >= 0, got {steps}")
    if inner_lr is not None:
        inner_lr = _checks.check_finite("inner_lr", inner_lr)
    return (steps, _checks.check_int("num_tasks", num_tasks, 2),
            _checks.check_int("grid_points", grid_points, 2), _checks.check_seed(seed), inner_lr)


def _mean_ci(per_task: torch.Tensor):
    n = per_task.numel()
    return per_task.mean().item(), 1.96 * per_task.std(correction=0).item() / math.sqrt(n)


def evaluate(model: MetaMLP, task="sine", *, shots: Optional[int] = None,
             steps: Optional[Sequence[int]] = None, num_tasks: int = 600,
             grid_points: int = 100, inner_lr: Optional[float] = None, seed: int = EVAL_SEED,
             backend: str = "auto", data=None, ways: Optional[int] = None,
             queries: Optional[int] = None, baselines: bool = True):
    """The MAML paper's protocols (pymaml.evaluate runs them for a MetaMLP): evaluates `model`
    on held-out tasks of `task` (a name, TaskFamily or sampler, as in train) after each number
    of adaptation `steps` (an int or a list). Adaptation uses the model's loss, its learned
    inner rates if it has them, else its inner lr (`inner_lr`, a number, replaces either), and
    its adapt_layers.

    Regression (default steps 1, 5, 10): `shots` support and `shots` held-out points per task
    (default: the family's shots); returns an EvalResult. Classification, for "omniglot"
    (data=DIR, ways: default the model's outputs; its characters as they are, unrotated) or
    an Episodes family (default steps 1, 3, 10): `num_tasks` episodes of `ways` classes with
    `shots` support and `queries` (default 15) query examples per class; returns an
    AccuracyResult (.accuracy, .ci95, .table()) with two baselines on the same episodes
    (baselines=False leaves them out: the from-scratch one takes most of the time)."""
    if not isinstance(model, MetaMLP) or model.num_tasks is not None:
        raise TypeError(f"model must be a (not yet adapted) pymaml MetaMLP, got {type(model).__name__}")
    _checks.check_device("the model's device", model.params.device)
    if isinstance(steps, int) and not isinstance(steps, bool):
        steps = [steps]
    if task == "omniglot" or isinstance(task, _tasks.Episodes):
        if not isinstance(baselines, bool):
            raise TypeError(f"baselines must be True or False, got {baselines!r}")
        family = _episodes(task, data, ways or model.sizes[-1], shots, queries)
        steps, num_tasks, _, seed, inner_lr = _check_protocol(
            (1, 3, 10) if steps is None else steps, num_tasks, 2, seed, inner_lr)
        return _evaluate_episodes(model, family, steps, num_tasks, seed, inner_lr, backend,
                                  baselines)
    if data is not None or ways is not None or queries is not None:
        raise ValueError("data, ways and queries apply to classification episodes (task "
                         "'omniglot' or an Episodes family)")
    steps, num_tasks, grid_points, seed, inner_lr = _check_protocol(
        (1, 5, 10) if steps is None else steps, num_tasks, grid_points, seed, inner_lr)
    family = _tasks.get_family(task, shots=shots, queries=shots)
    g = torch.Generator().manual_seed(seed)
    dtype, device = model.params.dtype, model.params.device
    grid = isinstance(family, _tasks.FunctionTasks)  # a known target: the grid errors too
    if grid:
        ids, x, y = family.draw(num_tasks, g)
        batch = family.split(x, y, dtype=dtype, device=device)
        grid_x = family.grid(grid_points).expand(num_tasks, grid_points, 1)
        grid_x, grid_y = (t.to(device=device, dtype=dtype)
                          for t in (grid_x, family.target(ids, grid_x)))
    else:
        batch = _tasks.checked(family).sample(num_tasks, generator=g, dtype=dtype,
                                              device=device)
    mse, mse_ci, median, diverged = [], [], [], []
    gmse, gmse_ci, gmae = ([], [], []) if grid else (None, None, None)
    with torch.no_grad():
        for s in steps:
            adapted = model.adapt(batch.x_support, batch.y_support, steps=s, inner_lr=inner_lr,
                                  backend=backend)
            per_task = (adapted(batch.x_query) - batch.y_query).pow(2).mean(dim=(1, 2)).double()
            m, ci = _mean_ci(per_task)
            mse.append(m)
            mse_ci.append(ci)
            median.append(per_task.nan_to_num(nan=math.inf).median().item())
            diverged.append(int((~per_task.isfinite()).sum()))
            if grid:
                err = (adapted(grid_x) - grid_y).double()
                m, ci = _mean_ci(err.pow(2).mean(dim=(1, 2)))
                gmse.append(m)
                gmse_ci.append(ci)
                gmae.append(err.abs().mean().item())
    learned = model.learned_lr is not None and inner_lr is None  # adapted with them
    return EvalResult(task=family.name, shots=batch.x_support.shape[1], num_tasks=num_tasks,
                      inner_lr=model.inner_lr if inner_lr is None else float(inner_lr),
                      steps=steps, mse=mse, mse_ci95=mse_ci, mse_median=median,
                      diverged=diverged, grid_mse=gmse, grid_mse_ci95=gmse_ci, grid_mae=gmae,
                      grid_points=grid_points,
                      learn_inner_lr=model.learn_inner_lr if learned else None,
                      rate_summary=_rates.summary(model.learned_lr, model.learn_inner_lr,
                                                  model.sizes, model.adapt_layers)
                      if learned else None,
                      adapt_layers=model.adapt_layers, trained_steps=model.inner_steps)


# ---- classification episodes -------------------------------------------------------------------

SCRATCH_STEPS = 100  # the from-scratch baseline's SGD steps on each support set


@dataclasses.dataclass
class AccuracyResult:
    """Per number of adaptation steps (`steps[i]`): the query accuracy's mean over the
    `num_tasks` episodes (in [0, 1]), its 95 % interval (1.96 * std / sqrt(num_tasks)) and the
    mean query cross-entropy. `baselines`: name -> (accuracy, interval) on the same episodes
    without meta-learning: the nearest class mean of the inputs (pixels), and the same MLP
    from a fresh initialisation fitted by SCRATCH_STEPS SGD steps at the model's inner lr."""
    task: str
    ways: int
    shots: int
    queries: int
    num_tasks: int
    inner_lr: float
    steps: List[int]
    accuracies: List[float]
    accuracy_ci95s: List[float]
    losses: List[float]
    baselines: Dict[str, Tuple[float, float]]

    @property
    def accuracy(self) -> float:
        """The accuracy after the last of `steps`."""
        return self.accuracies[-1]

    @property
    def ci95(self) -> float:
        """Its 95 % interval (half-width)."""
        return self.accuracy_ci95s[-1]

    def table(self) -> str:
        pct = lambda a, ci: f"{100 * a:6.2f} ± {100 * ci:4.2f} %"
        lines = [f"{self.num_tasks} held-out {self.ways}-way {self.shots}-shot episodes of "
                 f"'{self.task}' ({self.queries} queries per class), inner lr "
                 f"{self.inner_lr:g}; mean ± 1.96·std/√{self.num_tasks}",
                 f"{'':<34}  {'accuracy':>16}  {'query loss':>10}"]
        lines += [f"{f'meta-learned, {s} step(s)':<34}  {pct(a, ci):>16}  {l:>10.4f}"
                  for s, a, ci, l in zip(self.steps, self.accuracies, self.accuracy_ci95s,
                                         self.losses)]
        lines += [f"{name:<34}  {pct(a, ci):>16}" for name, (a, ci) in self.baselines.items()]
        return "\n".join(lines)


def _episodes(task, data, ways, shots, queries):
    """The evaluation's Episodes family: "omniglot" under `data`, unrotated, or `task`."""
    if isinstance(task, _tasks.Episodes):
        if any(v is not None for v in (data, shots, queries)):
            raise ValueError("data, shots and queries are set on the Episodes family itself")
        return task
    return _tasks.Omniglot(data, ways=ways, shots=1 if shots is None else shots,
                           queries=15 if queries is None else queries, rotations=False)


def _accuracy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[T]: each episode's share of query points classified right."""
    return (logits.argmax(-1) == y).double().mean(dim=1)


def _nearest_mean(batch, ways: int) -> torch.Tensor:
    """[T] accuracies of the nearest class mean of the support inputs (Euclidean)."""
    one_hot = torch.nn.functional.one_hot(batch.y_support, ways).to(batch.x_support.dtype)
    means = one_hot.transpose(1, 2) @ batch.x_support / one_hot.sum(1)[..., None]
    return _accuracy(-torch.cdist(batch.x_query, means), batch.y_query)


def _adapted_scores(net, batch, steps, inner_lr, backend, chunk: int):
    """(accuracy per episode [T], mean query cross-entropy) of `net` adapted by `steps` steps
    on each episode's support set, `chunk` episodes at a time (per-task parameters of a large
    MLP are large)."""
    acc, loss = [], 0.0
    for at in range(0, batch.x_support.shape[0], chunk):
        xs, ys, xq, yq = (t[at:at + chunk] for t in batch)
        with torch.no_grad():
            logits = net.adapt(xs, ys, steps=steps, inner_lr=inner_lr, backend=backend)(xq)
        acc.append(_accuracy(logits, yq))
        loss = loss + torch.nn.functional.cross_entropy(logits.flatten(0, 1).double(),
                                                        yq.flatten(), reduction="sum")
    return torch.cat(acc), loss.item() / batch.y_query.numel()


def _evaluate_episodes(model, family, steps, num_tasks, seed, inner_lr, backend, baselines,
                       chunk: int = 100) -> AccuracyResult:
    """Accuracy per step count, and the baselines, on `num_tasks` episodes drawn at once."""
    if family.n_in != model.sizes[0] or family.ways != model.sizes[-1]:
        raise ValueError(f"the episodes have {family.n_in} inputs and {family.ways} classes, "
                         f"the model sizes {model.sizes}")
    dtype, device = model.params.dtype, model.params.device
    batch = family.sample(num_tasks, generator=torch.Generator().manual_seed(seed),
                          dtype=dtype, device=device)
    rate = model.inner_lr if inner_lr is None else inner_lr
    runs = [_adapted_scores(model, batch, s, inner_lr, backend, chunk) for s in steps]
    accs = [_mean_ci(acc) for acc, _ in runs]
    scores = {}
    if baselines:
        fresh = model._like(F.init_params(model.sizes, dtype=dtype, device=device,
                                          generator=torch.Generator().manual_seed(seed)))
        scratch, _ = _adapted_scores(fresh, batch, SCRATCH_STEPS, rate, backend, chunk)
        scores = {"nearest class mean (pixels)": _mean_ci(_nearest_mean(batch, family.ways)),
                  f"same MLP from scratch ({SCRATCH_STEPS} steps)": _mean_ci(scratch)}
    return AccuracyResult(task=family.name, ways=family.ways, shots=family.shots,
                          queries=family.queries, num_tasks=num_tasks, inner_lr=rate,
                          steps=list(steps), accuracies=[a for a, _ in accs],
                          accuracy_ci95s=[ci for _, ci in accs],
                          losses=[loss for _, loss in runs], baselines=scores)


@dataclasses.dataclass
class DAMLEvalResult:
    """rows: one per (phase, steps), dicts with phase (None for families without phases),
    steps, mae, mae_ci95, mse, and where (the 'grid' or the 'target points')."""
    task: str
    num_tasks: int
    inner_lr: float
    steps: List[int]
    grid_points: int
    rows: List[dict]

    def mae(self, phase: Optional[float] = None, steps: Optional[int] = None) -> float:
        """The MAE of the row of `phase` (None: the only / first one) after `steps` (None:
        the first steps asked)."""
        steps = self.steps[0] if steps is None else steps
        for r in self.rows:
            if r["steps"] == steps and (phase is None or (r["phase"] is not None
                                                          and abs(r["phase"] - phase) < 1e-9)):
                return r["mae"]
        raise KeyError(f"no row for phase {phase} and steps {steps}")

    def table(self) -> str:
        where = self.rows[0]["where"] if self.rows else "grid"
        lines = [f"{self.num_tasks} held-out source draws per phase of '{self.task}', adapted "
                 f"from unlabeled source inputs only (inner lr {self.inner_lr:g}); error on "
                 + (f"a {self.grid_points}-point grid over the input range" if where == "grid"
                    else "the tasks' labeled target points")
                 + f"; mean ± 1.96·std/√{self.num_tasks}"]
        lines.append(f"{'phase':>6}  {'steps':>5}  {'MAE':>18}  {'MSE':>8}")
        for r in self.rows:
            lines.append(f"{phase_name(r['phase']):>6}  {r['steps']:>5}  {r['mae']:>9.4f} ± "
                         f"{r['mae_ci95']:<6.4f}  {r['mse']:>8.4f}")
        return "\n".join(lines)


def evaluate_daml(model: DAMLModel, task=None, *, steps: Optional[Sequence[int]] = None,
                  num_tasks: int = 600, grid_points: int = 100,
                  inner_lr: Optional[float] = None, seed: int = EVAL_SEED,
                  shots: Optional[int] = None, backend: str = "auto") -> DAMLEvalResult:
    """pymaml.evaluate for a DAMLModel (see the module docstring). task: a DAML family name, a
    DAMLTaskFamily or a sampler (default: the model's task, else "daml-sine"); steps: the
    inner step counts (default: the model's); shots: source inputs per step (default: the
    family's)."""
    if not isinstance(model, DAMLModel):
        raise TypeError(f"model must be a pymaml DAMLModel, got {type(model).__name__}")
    if task is None:
        task = model.info.get("task") or "daml-sine"
    family = _tasks.checked_daml(_tasks.get_daml_family(task, shots=shots))
    steps, num_tasks, grid_points, seed, inner_lr = _check_protocol(
        [model.inner_steps] if steps is None else steps, num_tasks, grid_points, seed, inner_lr)
    dtype, device = model.weights.dtype, model.weights.device
    g = torch.Generator().manual_seed(seed)
    phased = all(hasattr(family, a) for a in ("phases", "sample_phase", "target", "grid"))
    rows = []

    def adapted_on(x_source, s):
        if s == 0:  # the unadapted base network, once per task
            return model.base()._like(model.params.detach().expand(x_source.shape[0], -1))
        return model.adapt(x_source, steps=s, inner_lr=inner_lr, backend=backend)

    with torch.no_grad():
        for phase in (family.phases if phased else (None,)):
            for s in steps:
                draw_steps = max(s, 1)
                if phased:
                    batch = family.sample_phase(phase, num_tasks, steps=draw_steps, generator=g,
                                                dtype=dtype, device=device)
                    x = family.grid(grid_points).expand(num_tasks, grid_points, 1)
                    y = family.target(family.tasks_of_phase(phase, num_tasks), x)
                    x, y = x.to(device, dtype), y.to(device, dtype)
                else:
                    batch = family.sample_daml(num_tasks, steps=draw_steps, generator=g,
                                               dtype=dtype, device=device)
                    x, y = batch.x_query, batch.y_query
                net = adapted_on(batch.x_source, s)
                err = (net(x) - y).double()
                mae, mae_ci = _mean_ci(err.abs().mean(dim=(1, 2)))
                rows.append(dict(phase=phase, steps=s, mae=mae, mae_ci95=mae_ci,
                                 mse=err.pow(2).mean().item(),
                                 where="grid" if phased else "target points"))
    return DAMLEvalResult(task=family.name, num_tasks=num_tasks,
                          inner_lr=model.inner_lr if inner_lr is None else inner_lr,
                          steps=steps, grid_points=grid_points, rows=rows)
