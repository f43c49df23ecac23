"""pymaml.evaluate (the MAML paper's protocol) and the adaptation figure, checked against
direct computations on the same held-out tasks."""

import math

import pytest
import torch

import pymaml
from pymaml import plots, tasks
from pymaml.evaluate import EVAL_SEED


def model():
    return pymaml.MetaMLP([1, 16, 16, 1], loss="mse", inner_lr=0.01, inner_steps=1,
                          generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_protocol_matches_a_direct_computation():
    m = model()
    result = pymaml.evaluate(m, "sine", shots=5, steps=[0, 3], num_tasks=50, grid_points=30)
    fam = tasks.get_family("sine", shots=5, queries=5)
    ids, x, y = fam.draw(50, torch.Generator().manual_seed(EVAL_SEED))
    grid = fam.grid(30).expand(50, 30, 1)
    for i, steps in enumerate([0, 3]):
        adapted = pymaml.functional.adapt(m.params.detach(), x[:, :5], y[:, :5], sizes=m.sizes,
                                          inner_lr=0.01, steps=steps, loss="mse", backend="reference")
        per_task = (pymaml.mlp_forward(adapted, x[:, 5:], sizes=m.sizes) - y[:, 5:]).pow(2).mean((1, 2))
        assert result.mse[i] == pytest.approx(per_task.mean().item(), rel=1e-9)
        assert result.mse_ci95[i] == pytest.approx(1.96 * per_task.std(correction=0).item() / math.sqrt(50), rel=1e-9)
        assert result.mse_median[i] == pytest.approx(per_task.median().item(), rel=1e-9)
        err = pymaml.mlp_forward(adapted, grid, sizes=m.sizes) - fam.target(ids, grid)
        assert result.grid_mse[i] == pytest.approx(err.pow(2).mean().item(), rel=1e-9)
        assert result.grid_mae[i] == pytest.approx(err.abs().mean().item(), rel=1e-9)
    assert result.shots == 5 and result.steps == [0, 3] and result.diverged == [0, 0]
    table = result.table()
    assert "50 held-out 'sine' tasks, 5-shot" in table and len(table.splitlines()) == 4


def test_user_sampler_has_no_grid():
    def sampler(T, generator):
        return tasks.Sine(shots=4).sample(T, generator=generator)
    result = pymaml.evaluate(model(), sampler, steps=[1], num_tasks=10)
    assert result.grid_mse is None and result.shots == 4 and "grid" not in result.table()


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(steps="5"), TypeError, "steps must be a list"),
    (dict(steps=[-1]), ValueError, "steps must be a non-empty list"),
    (dict(num_tasks=1), ValueError, "num_tasks must be an int >= 2"),
    (dict(seed=1.5), ValueError, "seed must be an int"),
    (dict(grid_points=1), ValueError, "grid_points must be"),
])
def test_evaluate_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        pymaml.evaluate(model(), "sine", **kwargs)


def test_adaptation_figure(tmp_path):
    m = pymaml.MetaMLP([1, 8, 1], loss="l1", inner_lr=0.03, inner_steps=2)
    (mae,) = plots.plot_adaptation(m, tmp_path / "one.png", task_ids=[[math.pi]])
    assert (tmp_path / "one.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and mae > 0
    maes = plots.plot_adaptation(m, tmp_path / "four.png", task="seed-sine", num_tasks=4)
    assert len(maes) == 4
    with pytest.raises(ValueError, match="task_ids must be \\[tasks, 1\\]"):
        plots.plot_adaptation(m, tmp_path / "x.png", task_ids=[[1.0, 2.0]])
    with pytest.raises(ValueError, match="no loss history"):
        plots.plot_losses(torch.zeros(0), tmp_path / "loss.png")


def test_diverging_tasks_are_counted_and_the_median_stays_defined():
    m = model()
    result = pymaml.evaluate(m, "sine", steps=[0, 40], num_tasks=20, inner_lr=50.0)
    assert result.diverged[0] == 0 and result.diverged[1] > 0
    assert not math.isnan(result.mse_median[1])
    assert "is not finite (the inner SGD diverged)" in result.table()


def test_diverged_learned_rates_get_advice_that_applies_to_them():
    # Rates far too large for the task, learned for 1 step, evaluated for 10 (Meta-SGD's case):
    # no "smaller inner lr" advice, which cannot apply to learned rates.
    m = pymaml.MetaMLP([1, 8, 1], loss="mse", inner_lr=50.0, inner_steps=1,
                       learn_inner_lr="per-parameter")
    table = pymaml.evaluate(m, "sine", steps=[10], num_tasks=10).table()
    assert "the learned rates are for 1 steps" in table and "smaller inner lr" not in table
    plain = pymaml.MetaMLP([1, 8, 1], loss="mse", inner_lr=50.0, inner_steps=1)
    assert "try a smaller inner lr" in pymaml.evaluate(plain, "sine", steps=[10], num_tasks=10).table()
