"""Few-shot classification end to end: pymaml.train("omniglot", data=DIR, ...), pymaml.evaluate's
accuracy protocol and the command line, on a tiny archive built in the official layout (the
real small subset is tested in tests/test_omniglot.py when it is there)."""

import math

import pytest
import torch

import pymaml
from pymaml import tasks
from pymaml.cli import main
from pymaml.evaluate import SCRATCH_STEPS

pytest.importorskip("PIL.Image")
from test_omniglot import make_zip  # noqa: E402 (needs Pillow)

ALPHABETS = {"Greek": 4, "Latin": 3}  # 7 characters, x4 rotations in training
SMALL = dict(sizes=[784, 16, 3], iterations=4, meta_batch_size=2, progress=False, log_every=0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("omniglot")
    make_zip(root, "images_background", ALPHABETS)
    return root


def test_train_takes_the_papers_defaults(data):
    result = pymaml.train("omniglot", data=data, ways=3, shots=1, iterations=2,
                          meta_batch_size=2, progress=False, log_every=0)
    c = result.config
    assert c["sizes"] == [784, 256, 128, 64, 64, 3] and c["loss"] == "cross_entropy"
    assert (c["inner_steps"], c["inner_lr"], c["optimizer"], c["outer_lr"]) == (1, 0.4, "adam", 1e-3)
    assert c["task"] == "omniglot" and result.model.loss == "cross_entropy"
    assert torch.isfinite(result.losses).all()


def test_twenty_way_defaults_follow_the_paper(data):
    defaults = tasks.Omniglot(data, ways=20, shots=1).run_defaults()
    assert (defaults["inner_steps"], defaults["inner_lr"], defaults["meta_batch_size"]) == (5, 0.1, 16)


def test_fused_and_reference_runs_agree(data):
    """The fused run and the reference run of the same seed: the same losses to float32
    rounding, so the same accuracy within its interval."""
    runs = [pymaml.train("omniglot", data=data, ways=3, shots=2, backend=b, seed=3, **SMALL)
            for b in ("fused", "reference")]
    torch.testing.assert_close(runs[0].losses, runs[1].losses, rtol=1e-4, atol=1e-5)
    acc = [pymaml.evaluate(r.model, "omniglot", data=data, shots=2, queries=2, steps=[1, 2],
                           num_tasks=40, baselines=False) for r in runs]
    for a, b in zip(acc[0].accuracies, acc[1].accuracies):
        assert abs(a - b) <= acc[0].ci95 + 1e-9


def test_evaluate_reports_accuracy_and_baselines(data):
    model = pymaml.train("omniglot", data=data, ways=3, shots=1, **SMALL).model
    r = pymaml.evaluate(model, "omniglot", data=data, shots=1, queries=3, steps=3, num_tasks=30)
    assert r.steps == [3] and 0 <= r.accuracy <= 1 and r.ci95 > 0 and math.isfinite(r.losses[0])
    assert (r.ways, r.shots, r.queries, r.num_tasks) == (3, 1, 3, 30)
    assert set(r.baselines) == {"nearest class mean (pixels)",
                                f"same MLP from scratch ({SCRATCH_STEPS} steps)"}
    table = r.table()
    assert "3-way 1-shot" in table and "nearest class mean" in table and "%" in table
    # the same episodes again: the same numbers (seeded), and the model's own accuracy
    again = pymaml.evaluate(model, "omniglot", data=data, shots=1, queries=3, steps=[3],
                            num_tasks=30)
    assert again.accuracies == r.accuracies


def test_nearest_mean_baseline_is_exact_on_separable_episodes():
    # Two classes whose examples are the same image: nearest class mean gets every query.
    x = torch.zeros(8, 4, 4)
    x[4:, 0, 0] = 1
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    family = tasks.Episodes(x, labels, ways=2, shots=1, queries=2)
    model = pymaml.MetaMLP([16, 4, 2], loss="cross_entropy", inner_lr=0.1)
    r = pymaml.evaluate(model, family, steps=[0], num_tasks=10)
    assert r.baselines["nearest class mean (pixels)"] == (1.0, 0.0)


@pytest.mark.parametrize("call,match", [
    (lambda d: pymaml.train("omniglot", iterations=1), "task 'omniglot' needs data=DIR"),
    (lambda d: pymaml.train("sine", data=d, iterations=1), "data and ways apply to"),
    (lambda d: pymaml.train("omniglot", data=d, ways=1, iterations=1), "ways must be an int >= 2"),
    (lambda d: pymaml.train("omniglot", data=d, ways=3, sizes=[784, 8, 4], iterations=1),
     "3 output feature"),
    (lambda d: pymaml.evaluate(pymaml.MetaMLP([1, 4, 1]), "sine", data=d), "apply to classification"),
    (lambda d: pymaml.evaluate(pymaml.MetaMLP([784, 4, 3], loss="cross_entropy"), "omniglot",
                               data=d, baselines="yes"), "baselines must be True or False"),
    (lambda d: pymaml.evaluate(pymaml.MetaMLP([10, 4, 3], loss="cross_entropy"), "omniglot",
                               data=d, queries=3), "784 inputs"),
])
def test_errors_name_the_argument(data, call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call(data)


def test_cli_trains_evaluates_and_plots(data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    flags = ["--task", "omniglot", "--data", str(data), "--ways", "3", "--shots", "1"]
    assert main(["train", *flags, "--iterations", "3", "--meta-batch-size", "2",
                 "--sizes", "784,16,3", "--out", "omni"]) == 0
    out = capsys.readouterr().out
    assert "omni.png" in out and "episodes" in out and "eval omni.pt --task omniglot --data" in out
    for name in ("omni.pt", "omni.ckpt", "omni.png", "omni-loss.png"):
        assert (tmp_path / name).is_file()
    assert main(["eval", "omni.pt", *flags, "--queries", "3", "--tasks", "20", "--steps", "1,3"]) == 0
    out = capsys.readouterr().out
    assert "3-way 1-shot" in out and "nearest class mean" in out
    assert main(["plot", "omni.pt", "--task", "omniglot", "--data", str(data), "--tasks", "2"]) == 0
    assert (tmp_path / "omni-tasks.png").is_file()


def test_cli_refuses_data_flags_off_omniglot(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--iterations", "2", "--out", "s", "--no-plots"]) == 0
    capsys.readouterr()
    assert main(["eval", "s.pt", "--data", str(tmp_path), "--tasks", "2"]) == 2
    assert "--data, --ways and --queries apply to --task omniglot" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["negative", "sum"])
def test_class_probabilities_must_be_probabilities(bad):
    import pymaml.functional as F
    sizes = [2, 4, 3]
    p = F.init_params(sizes)
    x = torch.randn(2, 4, 2)
    y = torch.full((2, 4, 3), 1 / 3)
    if bad == "negative":
        y[0, 0] = torch.tensor([1.5, -0.5, 0.0])
    else:
        y[1, 2, 0] = 0.9
    for backend in ("auto", "reference"):
        with pytest.raises(ValueError, match="y_support as class probabilities must be non-negative"):
            F.maml_loss(p, x, y, x, torch.full((2, 4, 3), 1 / 3), sizes=sizes, inner_lr=0.1,
                        steps=1, loss="cross_entropy", backend=backend)
        with pytest.raises(ValueError, match="y_query as class probabilities"):
            F.maml_loss(p, x, torch.full((2, 4, 3), 1 / 3), x, y, sizes=sizes, inner_lr=0.1,
                        steps=1, loss="cross_entropy", backend=backend)
    soft = torch.softmax(torch.randn(2, 4, 3), -1)  # rounding in the sums passes
    F.maml_loss(p, x, soft, x, soft, sizes=sizes, inner_lr=0.1, steps=1, loss="cross_entropy")


def test_float32_probabilities_cast_to_float64_pass():
    # A softmax made in float32 sums to 1 only to float32's rounding: not a mistake.
    import pymaml.functional as F
    sizes = [2, 4, 7]
    p = F.init_params(sizes, dtype=torch.float64)
    x = torch.randn(2, 3, 2, dtype=torch.float64)
    y = torch.softmax(torch.randn(2, 3, 7) * 4, -1).double()
    F.maml_loss(p, x, y, x, y, sizes=sizes, inner_lr=0.1, steps=1, loss="cross_entropy")
