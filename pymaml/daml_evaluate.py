"""pymaml.evaluate on a DAMLModel: the error of the base network after adapting from unlabeled
source inputs alone.

For a family with a known target function and phases (pymaml.tasks.DAMLSine): for each phase
(0 and pi) and each number of inner steps asked, `num_tasks` held-out draws of source inputs
(a fresh one per step, as in training), source-only adaptation, then the mean absolute error
and the MSE of the adapted network against the true sine on `grid_points` evenly spaced
inputs over [-2pi, 2pi] (the figure's measure), averaged over the draws, with the 95 %
interval of the per-draw MAE (1.96 * std / sqrt(num_tasks)). For other DAML families (a user's
sampler): the MAE and MSE on each task's labeled target points, over all tasks.
"""

from __future__ import annotations

import dataclasses
import math
from typing import List, Optional, Sequence

import torch

from . import _checks
from . import tasks as _tasks
from .daml_model import DAMLModel

__all__ = ["evaluate_daml", "DAMLEvalResult"]


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
            phase = "all" if r["phase"] is None else (
                "pi" if abs(r["phase"] - math.pi) < 1e-9 else f"{r['phase']:g}")
            lines.append(f"{phase:>6}  {r['steps']:>5}  {r['mae']:>9.4f} ± {r['mae_ci95']:<6.4f}"
                         f"  {r['mse']:>8.4f}")
        return "\n".join(lines)


def evaluate_daml(model: DAMLModel, task=None, *, steps: Optional[Sequence[int]] = None,
                  num_tasks: int = 600, grid_points: int = 100,
                  inner_lr: Optional[float] = None, seed: int = 2_147_483_647,
                  shots: Optional[int] = None, backend: str = "auto") -> DAMLEvalResult:
    """Evaluates a DAMLModel (see the module docstring). task: a DAML family name, a
    DAMLTaskFamily or a sampler (default: the model's task, else "daml-sine"); steps: the
    inner step counts (default: the model's); shots: source inputs per step (default: the
    family's)."""
    if not isinstance(model, DAMLModel):
        raise TypeError(f"model must be a pymaml DAMLModel, got {type(model).__name__}")
    if task is None:
        task = model.info.get("task") or "daml-sine"
    family = _tasks.checked_daml(_tasks.get_daml_family(task, shots=shots))
    steps = [model.inner_steps] if steps is None else steps
    if not isinstance(steps, Sequence) or isinstance(steps, str):
        raise TypeError(f"steps must be a list of step counts such as [5], got {steps!r}")
    steps = list(steps)
    if not steps or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in steps):
        raise ValueError(f"steps must be a non-empty list of ints >= 0, got {steps}")
    num_tasks = _checks.check_int("num_tasks", num_tasks, 2)
    grid_points = _checks.check_int("grid_points", grid_points, 2)
    seed = _checks.check_seed(seed)
    if inner_lr is not None:
        inner_lr = _checks.check_finite("inner_lr", inner_lr)
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
                per_task = err.abs().mean(dim=(1, 2))
                rows.append(dict(phase=phase, steps=s, mae=per_task.mean().item(),
                                 mae_ci95=1.96 * per_task.std(correction=0).item()
                                 / math.sqrt(num_tasks),
                                 mse=err.pow(2).mean().item(),
                                 where="grid" if phased else "target points"))
    return DAMLEvalResult(task=family.name, num_tasks=num_tasks,
                          inner_lr=model.inner_lr if inner_lr is None else inner_lr,
                          steps=steps, grid_points=grid_points, rows=rows)
