"""The figures say what they show: axis labels on every panel; the adaptation figure's title
names the task (seed-sine's phase); the DAML figure's legend lies outside the axes (it cannot
cover the curves) and its source inputs are a rug with a row per inner step (the same or close
inputs stay apart). The figures are captured as drawn (plots._figure)."""

import math

import pytest
import torch

import pymaml
from pymaml import plots, tasks

pytest.importorskip("matplotlib")


@pytest.fixture
def figures(monkeypatch):
    made = []

    def capture(**kwargs):
        fig = make(**kwargs)
        made.append(fig)
        return fig

    make = plots._figure
    monkeypatch.setattr(plots, "_figure", capture)
    return made


def labelled(fig):
    axes = [ax for ax in fig.axes if ax.axison]
    assert axes
    for ax in axes:
        assert ax.get_xlabel() and ax.get_ylabel(), ax.get_title()


@pytest.mark.parametrize("phase,words", [(math.pi, "phase pi: y = sin(x + pi)"),
                                         (0.0, "phase 0: y = sin(x)")])
def test_the_adaptation_figure_names_its_task_and_labels_its_axes(tmp_path, figures, phase, words):
    m = pymaml.MetaMLP([1, 8, 1], loss="l1", inner_lr=0.03, inner_steps=2)
    plots.plot_adaptation(m, tmp_path / "one.png", task_ids=[[phase]])
    (fig,) = figures
    labelled(fig)
    assert f"seed-sine, task {words}" in fig.axes[0].get_title()
    plots.plot_adaptation(m, tmp_path / "four.png", task="sine", num_tasks=4)
    labelled(figures[1])
    assert all("y = " in ax.get_title() for ax in figures[1].axes if ax.axison)


def test_the_loss_figure_labels_its_axes(tmp_path, figures):
    plots.plot_losses(torch.rand(50) + 0.1, tmp_path / "loss.png")
    labelled(figures[0])


def test_the_daml_figure_keeps_its_legend_off_the_curves_and_its_source_inputs_apart(
        tmp_path, figures):
    model = pymaml.DAMLModel([1, 8, 1], inner_steps=5, generator=torch.Generator().manual_seed(0))
    plots.plot_daml(model, tmp_path / "daml.png")
    (fig,) = figures
    labelled(fig)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    for ax in fig.axes:
        legend = ax.get_legend().get_window_extent(renderer)
        assert not legend.overlaps(ax.get_window_extent(renderer)), ax.get_title()
        rug = [line for line in ax.get_lines() if line.get_marker() == "|"]
        assert len(rug) == 5  # a row per inner step (daml-sine: one source input a step)
        heights = {float(line.get_ydata()[0]) for line in rug}
        assert len(heights) == 5
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert "5 unlabeled source inputs, a row per inner step" in labels


def test_the_episodes_figure_labels_its_rows_and_columns(tmp_path, figures):
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(8).repeat_interleave(6)
    family = tasks.Episodes(torch.rand(48, 4, 4, generator=g), labels, ways=3, shots=2, queries=3)
    m = pymaml.MetaMLP([16, 8, 3], loss="cross_entropy", inner_lr=0.1, inner_steps=1)
    plots.plot_episodes(m, tmp_path / "ep.png", family, episodes=2)
    (fig,) = figures
    assert fig.axes[0].get_ylabel() == "episode 1"
    assert "support" in fig._supxlabel.get_text()
