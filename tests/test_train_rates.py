"""Training and using learned inner rates and frozen layers (issue 14, item 3): pymaml.train
with algorithm="metasgd" / "anil", learn_inner_lr= and adapt_layers=; the rates' gradient
and its step; fused == reference histories; MetaMLP and checkpoints round-tripping the rates
(bitwise resume); evaluate and the command line; the errors, named by argument. The
gradients themselves are checked against oracles in tests/test_learned_rates*.py."""

import os

import pytest
import torch

import pymaml
from pymaml import _rates, fast_path, tasks
from pymaml import functional as F
from pymaml.config import from_train_arguments

from conftest import assert_one_line, requires_fused, run_cli

QUIET = dict(progress=False, log_every=0)
SIZES = [1, 8, 8, 1]
P = F.num_params(SIZES)
# A small, quick run: 2 inner steps, 2 tasks, Adam (the rates move at its pace).
SMALL = dict(sizes=SIZES, inner_steps=2, inner_lr=0.03, meta_batch_size=2, optimizer="adam",
             outer_lr=1e-2, **QUIET)
DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")

# (train() arguments, the stored rates' shape or None, the layers that adapt or None)
MODES = {
    "metasgd": (dict(algorithm="metasgd"), (P,), None),
    "per-step": (dict(learn_inner_lr="per-step"), (2, 1), None),
    "per-layer-step": (dict(learn_inner_lr="per-layer-step"), (2, 6), None),
    "per-parameter-step": (dict(learn_inner_lr="per-parameter-step"), (2, P), None),
    "fomaml-per-step": (dict(algorithm="fomaml", learn_inner_lr="per-step"), (2, 1), None),
    "anil": (dict(algorithm="anil"), None, [2]),
    "anil-lslr": (dict(algorithm="anil", learn_inner_lr="per-layer-step"), (2, 6), [2]),
    "maml-layers": (dict(adapt_layers=[0, -1]), None, [0, 2]),
}
BACKENDS = [pytest.param("reference", id="reference"),
            pytest.param("fused", id="fused", marks=requires_fused),
            pytest.param("auto", id="auto")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", list(MODES))
def test_each_mode_trains_its_weights_and_rates(mode, backend):
    kw, shape, layers = MODES[mode]
    run = pymaml.train(iterations=6, backend=backend, **kw, **SMALL)
    m = run.model
    # the chunked path serves untied rates and frozen layers (tests/test_fast_path_rates.py)
    chunked = backend != "reference" and kw.get("learn_inner_lr") in (None, "per-parameter-step")
    assert (run.fast_iterations > 0) == chunked and torch.isfinite(run.losses).all()
    assert m.adapt_layers == layers and run.config["adapt_layers"] == layers
    start = pymaml.train(iterations=0, **kw, **SMALL).model
    assert not torch.equal(m.params, start.params)
    if layers is not None:  # the meta-gradient still reaches the frozen first layer
        assert not torch.equal(m.params[:8], start.params[:8])
    if shape is None:
        assert m.learned_lr is None and run.config["learn_inner_lr"] is None
        return
    assert m.learned_lr.shape == shape and m.learned_lr.dtype == m.params.dtype
    assert torch.equal(start.learned_lr, torch.full(shape, 0.03))  # they start at inner_lr
    assert (m.learned_lr != start.learned_lr).any()  # and the outer optimizer moved them
    assert run.config["learn_inner_lr"] == m.learn_inner_lr


def recording(family):
    """A sampler drawing from `family` that keeps what it drew."""
    seen = []

    def sampler(T, generator):
        seen.append(family.sample(T, generator=generator, dtype=torch.float64))
        return seen[-1]
    sampler.__name__ = "recorded"
    return sampler, seen


@pytest.mark.parametrize("mode", ["metasgd", "per-layer-step", "fomaml-per-step", "anil-lslr"])
def test_one_sgd_step_moves_weights_and_rates_by_their_meta_gradient(mode):
    kw, _, layers = MODES[mode]
    sampler, seen = recording(tasks.Sine(shots=5))
    settings = dict(kw, sizes=SIZES, inner_steps=2, inner_lr=0.02, meta_batch_size=3,
                    optimizer="sgd", outer_lr=0.5, dtype=torch.float64, backend="reference",
                    loss="mse", **QUIET)
    start = pymaml.train(sampler, iterations=0, **settings).model
    run = pymaml.train(sampler, iterations=1, **settings).model
    params = start.params.detach().clone().requires_grad_()
    rates = start.learned_lr.detach().clone().requires_grad_()
    b = seen[-1]
    loss = F.maml_loss(params, *b, sizes=SIZES, steps=2, loss="mse", backend="reference",
                       inner_lr=_rates.for_steps(rates, start.learn_inner_lr, SIZES, 2),
                       first_order=kw.get("algorithm") == "fomaml", adapt_layers=layers)
    g_params, g_rates = torch.autograd.grad(loss, [params, rates])
    assert g_rates.abs().max() > 0
    torch.testing.assert_close(run.params.detach(), params.detach() - 0.5 * g_params)
    torch.testing.assert_close(run.learned_lr.detach(), rates.detach() - 0.5 * g_rates)


def test_reptile_with_adapt_layers_moves_those_layers_only():
    run = pymaml.train(algorithm="reptile", adapt_layers=[-1], iterations=5, **SMALL)
    start = pymaml.train(algorithm="reptile", iterations=0, **SMALL).model
    head = F.num_params(SIZES) - 9  # the last Linear's 8 weights and 1 bias
    assert torch.equal(run.model.params[:head], start.params[:head])
    assert not torch.equal(run.model.params[head:], start.params[head:])


@requires_fused
@pytest.mark.parametrize("mode", ["metasgd", "per-layer-step", "anil", "fomaml-per-step"])
def test_fused_and_reference_loss_histories_agree(mode):
    kw = dict(MODES[mode][0], iterations=8, dtype=torch.float64, **SMALL)
    fused = pymaml.train(backend="fused", **kw)
    ref = pymaml.train(backend="reference", **kw)
    assert fused.config["backend"] == "fused" and ref.config["backend"] == "reference"
    torch.testing.assert_close(fused.losses, ref.losses, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fused.model.params, ref.model.params, rtol=1e-10, atol=1e-10)
    if fused.model.learned_lr is not None:
        torch.testing.assert_close(fused.model.learned_lr, ref.model.learned_lr, rtol=1e-10,
                                   atol=1e-10)


@pytest.mark.parametrize("mode", ["per-step", "per-layer-step", "anil-lslr"])
def test_tied_learned_rates_never_take_the_chunked_path(mode):
    config, _ = from_train_arguments(_train_defaults(**MODES[mode][0]))
    cpu = torch.device("cpu")
    assert not config.entry.chunkable(config, "fused", cpu)
    assert fast_path.unserved(config, config.entry)
    plain, _ = from_train_arguments(_train_defaults())
    assert plain.entry.chunkable(plain, "fused", cpu)
    assert fast_path.unserved(plain, plain.entry) is None


def _train_defaults(**overrides):
    """train()'s arguments, by name, with its defaults."""
    import inspect
    params = inspect.signature(pymaml.train).parameters
    return {**{k: p.default for k, p in params.items()}, **overrides}


@pytest.mark.parametrize("mode", ["metasgd", "anil-lslr"])
def test_resume_is_bitwise_with_the_rates_and_their_optimizer_state(tmp_path, mode):
    kw = dict(MODES[mode][0], iterations=12, checkpoint_every=4, **SMALL)
    whole = pymaml.train(checkpoint=tmp_path / "whole.ckpt", **kw)
    ckpt = tmp_path / "half.ckpt"
    pymaml.train(checkpoint=ckpt, **{**kw, "iterations": 5})
    saved = torch.load(ckpt, weights_only=True)
    assert saved["format_version"] == 2 and saved["model"]["learned_lr"] is not None
    assert set(saved["optimizer"]["state"]) == {0, 1}  # Adam's moments of params and rates
    rest = pymaml.train(checkpoint=ckpt, resume=True, **kw)
    assert torch.equal(rest.model.params, whole.model.params)
    assert torch.equal(rest.model.learned_lr, whole.model.learned_lr)
    assert torch.equal(rest.losses, whole.losses)
    # the model inside the checkpoint carries the rates too
    inside = pymaml.load(ckpt)
    assert torch.equal(inside.learned_lr, whole.model.learned_lr)
    assert inside.adapt_layers == whole.model.adapt_layers


def test_init_from_a_model_goes_on_from_its_rates_when_they_fit():
    trained = pymaml.train(algorithm="metasgd", iterations=3, **SMALL).model
    again = pymaml.train(algorithm="metasgd", iterations=0, init=trained, **SMALL).model
    assert torch.equal(again.learned_lr, trained.learned_lr)
    assert again.learned_lr is not trained.learned_lr  # a copy
    other = pymaml.train(learn_inner_lr="per-step", iterations=0, init=trained, **SMALL).model
    assert torch.equal(other.learned_lr, torch.full((2, 1), 0.03))  # another mode: inner_lr


def test_resume_refuses_another_rate_mode_or_layers(tmp_path):
    ckpt = tmp_path / "run.ckpt"
    pymaml.train(algorithm="maml", learn_inner_lr="per-step", iterations=2, checkpoint=ckpt,
                 **SMALL)
    with pytest.raises(ValueError, match="learn_inner_lr='per-step' \\(this call: "
                                         "'per-parameter'\\)"):
        pymaml.train(learn_inner_lr="per-parameter", iterations=4, checkpoint=ckpt,
                     resume=True, **SMALL)
    with pytest.raises(ValueError, match="adapt_layers=None \\(this call: \\[2\\]\\)"):
        pymaml.train(learn_inner_lr="per-step", adapt_layers=[-1], iterations=4,
                     checkpoint=ckpt, resume=True, **SMALL)


def test_a_plain_run_still_writes_version_1_files(tmp_path):
    ckpt = tmp_path / "run.ckpt"
    run = pymaml.train(iterations=2, checkpoint=ckpt, **SMALL)
    saved = torch.load(ckpt, weights_only=True)
    assert saved["format_version"] == 1 and "learned_lr" not in saved["model"]
    assert saved["config"]["learn_inner_lr"] is None and saved["config"]["adapt_layers"] is None
    assert run.model.to_dict()["format_version"] == 1


@pytest.mark.parametrize("name", ["seed_sgd", "sine_adam"])
def test_old_checkpoints_load_as_plain_models(name):
    model = pymaml.load(os.path.join(DATA, f"{name}.ckpt"))
    assert model.learned_lr is None and model.learn_inner_lr is None
    assert model.adapt_layers is None and model.rates() == model.inner_lr


def test_an_old_model_record_loads():
    record = pymaml.MetaMLP(SIZES).to_dict()
    for key in ("learn_inner_lr", "learned_lr", "adapt_layers"):
        record.pop(key, None)
    model = pymaml.MetaMLP.from_dict(dict(record, format_version=1))
    assert model.learned_lr is None and model.adapt_layers is None


@pytest.mark.parametrize("mode", ["per-parameter", "per-layer-step", "per-step"])
def test_model_save_load_round_trips_rates_and_adapts_with_them(tmp_path, mode):
    rates = _rates.initial(mode, SIZES, 3, 0.0)
    rates.uniform_(-0.05, 0.1, generator=torch.Generator().manual_seed(0))
    model = pymaml.MetaMLP(SIZES, inner_steps=3, inner_lr=0.02, learn_inner_lr=mode,
                           learned_lr=rates, adapt_layers=[-2, -1], loss="mse")
    path = tmp_path / "m.pt"
    model.save(path)
    raw = torch.load(path, weights_only=True)  # plain tensors and values only
    assert raw["format_version"] == 2 and raw["learn_inner_lr"] == mode
    back = pymaml.load(path)
    assert torch.equal(back.learned_lr, model.learned_lr) and back.learn_inner_lr == mode
    assert back.adapt_layers == [1, 2] and back.inner_lr == 0.02
    assert [n for n, _ in back.named_parameters()] == ["params", "learned_lr"]

    x = torch.linspace(-3, 3, 6).unsqueeze(1)
    y = torch.sin(x)
    for steps in (3, 5):  # beyond the 3 learned steps: the last step's rates
        want = F.adapt(model.params.detach(), x[None], y[None], sizes=SIZES, steps=steps,
                       inner_lr=_rates.for_steps(rates, mode, SIZES, steps), loss="mse",
                       adapt_layers=[1, 2], backend="reference")[0]
        got = back.adapt(x, y, steps=steps, backend="reference")
        torch.testing.assert_close(got.params, want)
        assert torch.equal(got.learned_lr, model.learned_lr)  # the adapted model keeps them
    # a number replaces the learned rates
    fixed = back.adapt(x, y, inner_lr=0.0)
    torch.testing.assert_close(fixed.params, back.params.detach())


def test_for_steps_reuses_the_last_steps_rates():
    rates = torch.tensor([[0.1], [0.2]])
    assert torch.equal(_rates.for_steps(rates, "per-step", SIZES, 1), torch.tensor([[0.1]]))
    assert torch.equal(_rates.for_steps(rates, "per-step", SIZES, 4),
                       torch.tensor([[0.1], [0.2], [0.2], [0.2]]))
    lslr = _rates.for_steps(torch.arange(6.0).expand(2, 6), "per-layer-step", SIZES, 2)
    assert lslr.shape == (2, P) and lslr[0, 0] == 0 and lslr[0, 8] == 1 and lslr[1, -1] == 5


def test_evaluate_adapts_with_the_learned_rates_and_summarises_them():
    run = pymaml.train(learn_inner_lr="per-layer-step", adapt_layers=[0, 2], iterations=3,
                       **SMALL)
    result = pymaml.evaluate(run.model, "seed-sine", steps=[1, 3], num_tasks=10)
    assert result.learn_inner_lr == "per-layer-step" and result.adapt_layers == [0, 2]
    labels = [row[0] for row in result.rate_summary]
    assert labels == ["W0", "b0", "W1 (frozen)", "b1 (frozen)", "W2", "b2", "step 0",
                      "step 1"]
    text = result.table()
    assert "learned inner rates (per-layer-step" in text and "W1 (frozen)" in text
    assert "adapting layer(s) 0, 2 only" in text
    # the same tasks adapted with one fixed rate give another result, and no summary
    fixed = pymaml.evaluate(run.model, "seed-sine", steps=[1, 3], num_tasks=10, inner_lr=0.03)
    assert fixed.rate_summary is None and fixed.mse != result.mse
    assert "learned inner rates" not in fixed.table()


def test_maml_module_learns_an_nn_parameter_rate_and_freezes_layers():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8),
                              torch.nn.ReLU(), torch.nn.Linear(8, 1))
    rate = torch.nn.Parameter(torch.full((2, 1), 0.05))
    maml = pymaml.MAML(net, inner_lr=rate, steps=2, adapt_layers=[-1])
    assert any(p is rate for p in maml.parameters())  # an optimizer over them learns it
    b = tasks.Sine(shots=5).sample(3, generator=torch.Generator().manual_seed(0))
    maml(*b).backward()
    assert rate.grad is not None and rate.grad.abs().max() > 0
    assert net[0].weight.grad.abs().max() > 0  # frozen in the inner loop, still meta-learned
    adapted = maml.adapt(b.x_support[0], b.y_support[0])
    assert torch.equal(adapted[0].weight, net[0].weight)  # only the head moved
    assert not torch.equal(adapted[4].weight, net[4].weight)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(learn_inner_lr="per-layer"), ValueError, "learn_inner_lr must be None or one of"),
    (dict(learn_inner_lr="per-step", algorithm="reptile"), ValueError,
     "learn_inner_lr: Reptile cannot learn"),
    (dict(algorithm="metasgd", learn_inner_lr="per-step"), ValueError,
     "algorithm='metasgd' learns one inner rate per parameter"),
    (dict(algorithm="anil", adapt_layers=[0]), ValueError, "algorithm='anil' adapts the head"),
    (dict(learn_inner_lr="per-step", inner_steps=0), ValueError,
     "learn_inner_lr needs inner_steps >= 1"),
    (dict(adapt_layers=[3]), ValueError, "adapt_layers index 3 is out of range"),
    (dict(adapt_layers=[-4]), ValueError, "adapt_layers index -4 is out of range"),
    (dict(adapt_layers=[]), ValueError, "adapt_layers must name at least one layer"),
    (dict(adapt_layers=[1, -2]), ValueError, "adapt_layers names a layer twice"),
    (dict(adapt_layers="head"), TypeError, "adapt_layers must be None or a list"),
    (dict(adapt_layers=[1.0]), TypeError, "adapt_layers must hold ints"),
    (dict(algorithm="meta-sgd"), ValueError, "algorithm must be one of"),
])
def test_bad_arguments_name_themselves(kwargs, error, match):
    with pytest.raises(error, match=match):
        pymaml.train(iterations=1, **{**SMALL, **kwargs})


@pytest.mark.parametrize("make,error,match", [
    (lambda: pymaml.MetaMLP(SIZES, learned_lr=torch.zeros(P)), ValueError,
     "learned_lr needs learn_inner_lr"),
    (lambda: pymaml.MetaMLP(SIZES, learn_inner_lr="per-parameter", learned_lr=torch.zeros(3)),
     ValueError, "learned_lr of mode 'per-parameter' must have shape \\[97\\]"),
    (lambda: pymaml.MetaMLP(SIZES, learn_inner_lr="per-step",
                            learned_lr=torch.tensor([[float("nan")]])),
     ValueError, "learned_lr holds non-finite"),
    (lambda: pymaml.MetaMLP(SIZES, learn_inner_lr="per-parameter",
                            learned_lr=torch.zeros(P, dtype=torch.int64)),
     TypeError, "learned_lr must be a floating-point tensor"),
    (lambda: pymaml.MetaMLP(SIZES, adapt_layers=[7]), ValueError, "adapt_layers index 7"),
    (lambda: pymaml.MAML(pymaml.MetaMLP(SIZES).to_sequential(), inner_lr=torch.zeros(3, P),
                         steps=2), ValueError, "inner_lr as a tensor must broadcast"),
    (lambda: pymaml.MAML(pymaml.MetaMLP(SIZES).to_sequential(),
                         inner_lr=torch.zeros(P, dtype=torch.float64), steps=2),
     TypeError, "inner_lr as a tensor must have the weights' dtype"),
    (lambda: pymaml.MAML(pymaml.MetaMLP(SIZES).to_sequential(), inner_lr=0.1, steps=2,
                         adapt_layers=[3]), ValueError, "adapt_layers index 3"),
])
def test_bad_model_arguments_name_themselves(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_a_model_record_with_bad_rates_is_refused_naming_the_field(tmp_path):
    model = pymaml.MetaMLP(SIZES, learn_inner_lr="per-parameter")
    record = dict(model.to_dict(), learned_lr=torch.zeros(5))
    with pytest.raises(ValueError, match="learned_lr of mode 'per-parameter' must have shape"):
        pymaml.MetaMLP.from_dict(record)
    with pytest.raises(ValueError, match="'format_version' .* is 3: written by a newer"):
        pymaml.MetaMLP.from_dict(dict(model.to_dict(), format_version=3))


def test_a_checkpoint_whose_rates_disagree_with_its_settings_is_refused(tmp_path):
    ckpt = tmp_path / "run.ckpt"
    pymaml.train(algorithm="metasgd", iterations=2, checkpoint=ckpt, **SMALL)
    saved = torch.load(ckpt, weights_only=True)
    saved["model"]["learn_inner_lr"] = "per-step"
    saved["model"]["learned_lr"] = torch.zeros(2, 1)
    bad = tmp_path / "bad.ckpt"
    torch.save(saved, bad)
    with pytest.raises(ValueError, match="field 'model.learn_inner_lr' is 'per-step'"):
        pymaml.load(bad)
    saved = torch.load(ckpt, weights_only=True)
    saved["optimizer"]["state"][1]["exp_avg"] = torch.zeros(3)
    torch.save(saved, bad)
    with pytest.raises(ValueError, match="optimizer.state.rates.exp_avg' has shape \\[3\\]"):
        pymaml.load(bad)


def test_cli_trains_metasgd_and_anil_and_evaluates_them(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    small = ["--sizes", "1,8,8,1", "--inner-steps", "2", "--iterations", "4", "--no-plots",
             "--no-progress", "--log-every", "0", "--optimizer", "adam", "--outer-lr", "1e-2"]
    code, out, err = run_cli(capsys, "train", "--algorithm", "metasgd", *small)
    assert code == 0, err
    assert os.path.exists("metasgd-sine.pt") and os.path.exists("metasgd-sine.ckpt")
    code, out, err = run_cli(capsys, "eval", "metasgd-sine.pt", "--tasks", "5", "--steps", "1,3")
    assert code == 0, err
    assert "learn_inner_lr='per-parameter'" in out and "learned inner rates (per-parameter)" in out
    code, out, err = run_cli(capsys, "train", "--learn-inner-lr", "per-layer-step",
                             "--adapt-layers=-1", *small)
    assert code == 0, err
    model = pymaml.load("maml-per-layer-step-sine.pt")
    assert model.learned_lr.shape == (2, 6) and model.adapt_layers == [2]
    code, out, err = run_cli(capsys, "train", "--algorithm", "anil", "--out", "anil", *small)
    assert code == 0 and pymaml.load("anil.pt").adapt_layers == [2]
    code, out, err = run_cli(capsys, "eval", "anil.ckpt", "--tasks", "5")
    assert code == 0 and "adapting layer(s) 2 only" in out


def test_cli_refuses_learned_rates_with_reptile_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, "train", "--algorithm", "reptile", "--learn-inner-lr",
                             "per-step", "--iterations", "2", "--no-plots")
    assert code == 1 and "learn_inner_lr: Reptile cannot learn" in err
    assert_one_line(err)
    code, out, err = run_cli(capsys, "train", "--learn-inner-lr", "per-stp")
    assert code == 2 and "--learn-inner-lr" in err


@requires_fused
@pytest.mark.skipif(not (torch.distributed.is_available()
                         and torch.distributed.is_gloo_available()),
                    reason="this torch has no torch.distributed with gloo")
def test_two_processes_learn_the_rates_one_process_learns(tmp_path):
    import test_distributed as td  # its torchrun launcher and one-process twin

    # (a smaller outer step than the weights-only runs': at 0.02 the rates' large
    # gradients on these amplitudes drive Meta-SGD's inner loop to diverge in a few steps)
    runs = {"metasgd": dict(algorithm="metasgd", iterations=10, outer_lr=0.002),
            "anil-per-step": dict(algorithm="anil", learn_inner_lr="per-step", iterations=10,
                                  outer_lr=0.002)}
    code, output, _ = td.launch(tmp_path, [dict(name=name, train=dict(td.COMMON, dtype="float64",
                                                                      **kw))
                                           for name, kw in runs.items()])
    assert code == 0, output
    for name, kw in runs.items():
        r0, r1 = (td.rank_result(tmp_path, name, rank) for rank in (0, 1))
        assert torch.equal(r0["params"], r1["params"])
        assert r0["config"]["learn_inner_lr"] is not None
        # the weights follow the rates: equal weights after 10 steps need equal rates
        one = td.one_process_same_tasks("float64", **kw)
        assert td.relative_difference(r0["params"], one.model.params.detach()) < 1e-12
        assert torch.equal(r0["losses"], r1["losses"])
