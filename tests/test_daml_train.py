"""DAML training and use (issue 15, item 3): pymaml.train(algorithm="daml"), the chunked fast
path against the per-iteration path (bitwise), resume, the DAMLModel (files, adapt from source
inputs only), pymaml.evaluate on DAML tasks, the CLI. Small and fast: a few hundred iterations
at most."""

import math
import os

import pytest
import torch

import pymaml
from pymaml import daml as D
from pymaml import tasks as T
from pymaml.cli import main
from pymaml.daml_model import DAMLModel, default_loss_sizes
from pymaml.evaluate import evaluate_daml

pytestmark = pytest.mark.skipif(not D.fused_available(), reason="the fused DAML ops are not built")

QUIET = dict(progress=False, log_every=0)


# Subclasses: the same fused step, but not ones the chunked op takes over (outer_optim's
# chunk_spec knows the torch.optim classes themselves), so the run goes iteration by iteration.
class PerIterationSGD(torch.optim.SGD):
    pass


class PerIterationAdam(torch.optim.Adam):
    pass


def _train(**kw):
    task = kw.pop("task", "daml-sine")
    args = dict(algorithm="daml", iterations=60, **QUIET)
    args.update(kw)
    return pymaml.train(task, **args)


def test_defaults_are_the_seeds_experiment():
    r = _train(iterations=3)
    m, c = r.model, r.config
    assert isinstance(m, DAMLModel)
    assert m.sizes == [1, 32, 32, 1] and m.loss_sizes == [65, 32, 32, 1]
    assert (m.activation, m.adapt_loss, m.loss, m.inner_steps, m.inner_lr) == \
        ("relu", "l1", "l1", 5, 0.03)
    assert (c["optimizer"], c["outer_lr"], c["meta_batch_size"], c["task"]) == \
        ("sgd", 0.01, 1, "daml-sine")
    assert c["backend"] == "fused" and r.fast_iterations == 3
    # the initial weights: the base network, then the loss network, seed init (zero biases)
    g = torch.Generator().manual_seed(0)
    w0 = torch.cat([pymaml.init_params(s, generator=g, dtype=torch.float64, zero_bias=True)
                    for s in ([1, 32, 32, 1], [65, 32, 32, 1])]).float()
    assert pymaml.train(algorithm="daml", iterations=0, **QUIET).model.weights.equal(w0)


@pytest.mark.parametrize("optimizer,kwargs", [("sgd", {}), ("sgd", dict(momentum=0.9)),
                                              ("adam", {})])
def test_chunk_and_per_iteration_paths_agree_bitwise(optimizer, kwargs):
    """daml_train_chunk vs daml_loss + torch.optim, one iteration at a time."""
    fast = _train(iterations=200, optimizer=optimizer, optimizer_kwargs=kwargs,
                  outer_lr=1e-3 if optimizer == "adam" else 1e-2)
    cls = {"sgd": PerIterationSGD, "adam": PerIterationAdam}[optimizer]
    slow = _train(iterations=200, optimizer=cls, optimizer_kwargs=dict(kwargs, fused=True),
                  outer_lr=1e-3 if optimizer == "adam" else 1e-2)
    assert fast.fast_iterations >= 199 and slow.fast_iterations == 0
    assert torch.equal(fast.losses, slow.losses)
    assert torch.equal(fast.model.weights, slow.model.weights)


def test_meta_batch_and_float64_agree_too():
    fast = _train(iterations=40, meta_batch_size=3, dtype=torch.float64)
    slow = _train(iterations=40, meta_batch_size=3, dtype=torch.float64,
                  optimizer=PerIterationSGD, optimizer_kwargs=dict(fused=True))
    assert fast.fast_iterations == 40 and slow.fast_iterations == 0
    assert torch.equal(fast.model.weights, slow.model.weights)


def test_reference_backend_matches_closely():
    fused = _train(iterations=20, dtype=torch.float64)
    ref = _train(iterations=20, dtype=torch.float64, backend="reference")
    assert ref.config["backend"] == "reference" and ref.fast_iterations == 0
    torch.testing.assert_close(ref.losses, fused.losses, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ref.model.weights, fused.model.weights, rtol=1e-9, atol=1e-12)


def test_resume_is_bitwise(tmp_path):
    ck = str(tmp_path / "run.ckpt")
    whole = _train(iterations=150)
    part = _train(iterations=70, checkpoint=ck, checkpoint_every=30)
    assert part.checkpoint == ck and os.path.exists(ck)
    rest = _train(iterations=150, checkpoint=ck, resume=True)
    assert rest.iterations == 150
    assert torch.equal(rest.losses, whole.losses)
    assert torch.equal(rest.model.weights, whole.model.weights)
    # a different run may not resume it; nor may an existing checkpoint be replaced
    with pytest.raises(ValueError, match="different run.*inner_lr"):
        _train(iterations=150, checkpoint=ck, resume=True, inner_lr=0.01)
    with pytest.raises(FileExistsError):
        _train(iterations=10, checkpoint=ck)
    # the checkpoint loads as the model it holds
    assert torch.equal(pymaml.load(ck).weights, rest.model.weights)


def test_save_load_round_trip(tmp_path):
    m = _train(iterations=5, dtype=torch.float64).model
    path = str(tmp_path / "daml.pt")
    m.save(path)
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "pymaml.DAMLModel" and raw["loss_sizes"] == [65, 32, 32, 1]
    for loaded in (pymaml.load(path), DAMLModel.load(path)):
        assert isinstance(loaded, DAMLModel)
        assert torch.equal(loaded.weights, m.weights)
        assert loaded.extra_repr() == m.extra_repr()
        assert loaded.info["task"] == "daml-sine"
    with pytest.raises(ValueError, match="DAML model"):
        pymaml.MetaMLP.load(path)
    maml = str(tmp_path / "maml.pt")
    pymaml.MetaMLP([1, 8, 1]).save(maml)
    with pytest.raises(ValueError, match="MAML model"):
        DAMLModel.load(maml)
    assert isinstance(pymaml.load(maml), pymaml.MetaMLP)


def test_damaged_file_is_refused(tmp_path):
    path = str(tmp_path / "daml.pt")
    DAMLModel().save(path)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))
    with pytest.raises(ValueError, match="daml.pt"):
        pymaml.load(path)
    with pytest.raises(ValueError, match="daml.pt"):
        DAMLModel.load(path)


def test_bad_model_record_names_the_field():
    d = DAMLModel().to_dict()
    del d["loss_params"]
    with pytest.raises(ValueError, match="loss_params"):
        DAMLModel.from_dict(d)
    d = DAMLModel().to_dict()
    d["loss_sizes"] = [64, 32, 1]
    with pytest.raises(ValueError, match="loss_sizes"):
        DAMLModel.from_dict(d)


def test_adapt_from_source_inputs_only():
    m = _train(iterations=40, dtype=torch.float64).model
    fam = T.DAMLSine()
    b = fam.sample_phase(math.pi, 3, steps=5, generator=torch.Generator().manual_seed(1),
                         dtype=torch.float64)
    # [T, steps, K, 1]: T adapted tasks, exactly daml_adapt's parameters
    net = m.adapt(b.x_source)
    want = pymaml.daml_adapt(m.params.detach(), m.loss_params.detach(), b.x_source,
                             sizes=m.sizes, loss_sizes=m.loss_sizes, inner_lr=0.03, steps=5)
    assert isinstance(net, pymaml.MetaMLP) and net.num_tasks == 3
    assert torch.equal(net.params, want)
    assert net(b.x_query).shape == b.y_query.shape
    # one task with a batch per step, and one task with the same inputs at every step
    one = m.adapt(b.x_source[0], per_step=True)
    assert one.num_tasks is None and torch.equal(one.params, want[0])
    same = m.adapt(b.x_source[0, 0])
    assert same.num_tasks is None and same(torch.zeros(4, 1, dtype=torch.float64)).shape == (4, 1)
    # adaptation moves the base network only, and the model is left as it was
    before = m.weights.detach().clone()
    two = m.adapt(b.x_source, steps=2, inner_lr=0.1)  # the first two steps' batches
    assert torch.equal(two.params, m.adapt(b.x_source[:, :2], inner_lr=0.1, steps=2).params)
    assert torch.equal(m.weights, before)
    assert torch.equal(m(b.x_query), pymaml.mlp_forward(m.params, b.x_query, sizes=m.sizes))
    with pytest.raises(ValueError, match="x_source"):
        m.adapt(torch.zeros(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="steps"):
        m.adapt(b.x_source, steps=0)


def test_evaluate_table_per_phase():
    m = _train(iterations=30).model
    r = pymaml.evaluate(m, num_tasks=20)
    assert [row["phase"] for row in r.rows] == [0.0, math.pi]
    assert r.steps == [5] and r.grid_points == 100
    assert all(math.isfinite(row["mae"]) and row["mae"] > 0 for row in r.rows)
    table = r.table()
    assert "phase" in table and "pi" in table and "MAE" in table
    assert r.mae(math.pi) == r.rows[1]["mae"]
    again = evaluate_daml(m, "daml-sine", num_tasks=20)
    assert again.rows == r.rows  # seeded: the same held-out draws
    several = pymaml.evaluate(m, steps=[0, 1, 5], num_tasks=10)
    assert len(several.rows) == 6


def test_evaluate_a_users_sampler():
    m = _train(iterations=5).model

    def sampler(n, steps, generator):
        xs = torch.rand(n, steps, 2, 1, generator=generator)
        xq = torch.rand(n, 3, 1, generator=generator)
        return xs, xq, torch.sin(xq)

    r = evaluate_daml(m, sampler, num_tasks=8)
    assert [row["phase"] for row in r.rows] == [None]
    assert "target points" in r.table()
    # and train on it: a callable sampler takes the per-iteration path
    t = pymaml.train(sampler, algorithm="daml", iterations=5, **QUIET)
    assert t.fast_iterations == 0 and t.iterations == 5


@pytest.mark.parametrize("kwargs,match", [
    (dict(inner_steps=0), "inner_steps"),
    (dict(loss_sizes=[64, 32, 1]), "loss_sizes"),
    (dict(loss_sizes=[65, 32, 0]), "loss_sizes"),  # any output width >= 1 trains
    (dict(adapt_loss="huber"), "adapt_loss"),
    (dict(inner_batch=2), "inner_batch"),
    (dict(learn_inner_lr="per-step"), "learn_inner_lr"),
    (dict(adapt_layers=[-1]), "adapt_layers"),
    (dict(task="sine"), "DAML"),
    (dict(sizes=[2, 32, 1]), "sizes"),
    (dict(outer_lr=-1.0), "outer_lr"),
    (dict(init=torch.zeros(3)), "init"),
    (dict(optimizer="lbfgs"), "optimizer"),
    (dict(meta_batch_size=0), "meta_batch_size"),
])
def test_bad_arguments_name_themselves(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        _train(iterations=1, **kwargs)


def test_daml_arguments_refused_for_maml():
    with pytest.raises(ValueError, match="algorithm='daml'"):
        pymaml.train(iterations=1, adapt_loss="mse", **QUIET)


def test_other_settings_train():
    r = _train(iterations=20, adapt_loss="mse", activation="tanh", loss="mse",
               loss_sizes=[65, 16, 1], inner_steps=2, shots=2, queries=3)
    m = r.model
    assert (m.adapt_loss, m.activation, m.loss_sizes, m.inner_steps) == \
        ("mse", "tanh", [65, 16, 1], 2)
    assert r.fast_iterations == 20 and torch.isfinite(r.losses).all()
    assert default_loss_sizes([1, 40, 1]) == [41, 32, 32, 1]


def test_init_from_a_model():
    first = _train(iterations=10).model
    r = _train(iterations=0, init=first)
    assert torch.equal(r.model.weights, first.weights)
    with pytest.raises(ValueError, match="init"):
        _train(iterations=1, init=DAMLModel([1, 8, 1]))


def test_cli_train_eval_plot(tmp_path, capsys):
    out = str(tmp_path / "d")
    assert main(["train", "--algorithm", "daml", "--iterations", "20", "--out", out,
                 "--no-plots", "--no-progress", "--log-every", "0"]) == 0
    text = capsys.readouterr().out
    assert "20 meta-iterations done (daml" in text and "phase pi" in text
    assert os.path.exists(out + ".pt") and os.path.exists(out + ".ckpt")
    assert isinstance(pymaml.load(out + ".pt"), DAMLModel)
    assert main(["eval", out + ".pt", "--tasks", "10"]) == 0
    text = capsys.readouterr().out
    assert "DAMLModel" in text and "phase" in text and "pi" in text
    assert main(["eval", out + ".pt", "--tasks", "10", "--steps", "1,5,10"]) == 0
    assert capsys.readouterr().out.count("   pi  ") == 3  # one row per steps asked
    # resume to more iterations
    assert main(["train", "--algorithm", "daml", "--iterations", "30", "--out", out,
                 "--no-plots", "--no-progress", "--log-every", "0", "--resume"]) == 0
    assert "30 meta-iterations" in capsys.readouterr().out


def test_cli_figures(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = str(tmp_path / "daml-sine")
    assert main(["train", "--algorithm", "daml", "--iterations", "10", "--out", out,
                 "--no-progress", "--log-every", "0", "--loss-hidden", "16",
                 "--adapt-loss", "mse"]) == 0
    assert os.path.getsize(out + ".png") > 0 and os.path.getsize(out + "-loss.png") > 0
    assert pymaml.load(out + ".pt").loss_sizes == [65, 16, 1]
    assert main(["plot", out + ".pt", "--out", str(tmp_path / "p.png")]) == 0
    assert os.path.getsize(tmp_path / "p.png") > 0


def test_cli_errors(tmp_path, capsys):
    assert main(["train", "--algorithm", "daml", "--task", "sine", "--iterations", "2",
                 "--out", str(tmp_path / "x")]) == 2
    assert "DAML task family" in capsys.readouterr().err
    assert main(["train", "--algorithm", "daml", "--inner-batch", "2", "--iterations", "2",
                 "--out", str(tmp_path / "x")]) == 1
    assert "--inner-batch" in capsys.readouterr().err
    assert main(["train", "--adapt-loss", "mse", "--iterations", "2",
                 "--out", str(tmp_path / "y")]) == 2
    assert "--algorithm daml" in capsys.readouterr().err
