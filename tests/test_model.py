"""MetaMLP: saving and loading (plain, weights_only-readable, atomic), test-time adaptation
and conversion to and from nn.Sequential."""

import os
import random

import pytest
import torch

import pymaml
from pymaml import _io
from pymaml import functional as F

SIZES = [1, 8, 8, 1]
P = F.num_params(SIZES)


def make_model(dtype=torch.float64, **kwargs):
    settings = dict(activation="tanh", loss="mse", inner_lr=0.05, inner_steps=3,
                    info={"task": "sine", "shots": 5, "nested": {"a": [1, 2.5], "b": None}})
    settings.update(kwargs)
    g = torch.Generator().manual_seed(0)
    return pymaml.MetaMLP(SIZES, generator=g, dtype=dtype, **settings)


def task_data(T=None, K=5, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = (K, 1) if T is None else (T, K, 1)
    x = torch.rand(shape, generator=g, dtype=dtype) * 10 - 5
    return x, torch.sin(x) * 2


def assert_plain(value, where="file"):
    """Only tensors and plain values (what weights_only loading allows a pymaml file to hold)."""
    if isinstance(value, torch.Tensor) or value is None or isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            assert_plain(v, f"{where}[{i}]")
        return
    assert isinstance(value, dict), f"{where} is a {type(value).__name__}"
    for k, v in value.items():
        assert isinstance(k, (str, int)), f"{where} has a key of type {type(k).__name__}"
        assert_plain(v, f"{where}[{k!r}]")


def no_temp_files(directory):
    return [n for n in os.listdir(directory) if n.endswith(".tmp")]


# ---- files ------------------------------------------------------------------------------------

def test_save_is_plain_and_weights_only_loadable(tmp_path):
    model = make_model()
    path = tmp_path / "m.pt"
    model.save(path)
    d = torch.load(path, weights_only=True)
    assert_plain(d)
    assert d["format"] == "pymaml.MetaMLP"
    assert d["sizes"] == SIZES
    assert type(d["params"]) is torch.Tensor  # not an nn.Parameter
    assert torch.equal(d["params"], model.params.detach())


def test_load_round_trips_everything(tmp_path):
    model = make_model()
    path = tmp_path / "m.pt"
    model.save(path)
    back = pymaml.load(path)
    assert isinstance(back, pymaml.MetaMLP)
    assert back.params.dtype == torch.float64
    assert torch.equal(back.params, model.params)
    assert back.sizes == SIZES
    assert back.activation == "tanh"
    assert back.loss == "mse"
    assert back.inner_lr == 0.05
    assert back.inner_steps == 3
    assert back.info == {"task": "sine", "shots": 5, "nested": {"a": [1, 2.5], "b": None}}
    assert back.num_tasks is None
    # accepts str paths too, and MetaMLP.load is the same thing
    assert torch.equal(pymaml.MetaMLP.load(str(path)).params, model.params)


def test_load_model_from_training_checkpoint(tmp_path):
    ckpt = tmp_path / "x.ckpt"
    result = pymaml.train(iterations=5, progress=False, log_every=0, checkpoint=ckpt)
    loaded = pymaml.load(ckpt)
    assert torch.equal(loaded.params, result.model.params)
    assert loaded.params.dtype == result.model.params.dtype
    assert loaded.sizes == result.model.sizes == [1, 32, 32, 1]
    assert loaded.loss == "l1" and loaded.inner_steps == 5 and loaded.inner_lr == 0.03
    assert loaded.info["task"] == "seed-sine"
    # training moved the weights away from the seed initialisation
    start = pymaml.MetaMLP([1, 32, 32, 1], init="seed", generator=torch.Generator().manual_seed(0),
                           dtype=torch.float64).params.float()
    assert not torch.equal(loaded.params, start)


def test_atomic_save_over_existing_file(tmp_path):
    path = tmp_path / "m.pt"
    make_model().save(path)
    other = make_model(inner_lr=0.5)
    with torch.no_grad():
        other.params.add_(1.0)
    other.save(path)
    assert sorted(os.listdir(tmp_path)) == ["m.pt"]
    back = pymaml.load(path)
    assert torch.equal(back.params, other.params) and back.inner_lr == 0.5


def test_failed_save_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "m.pt"
    make_model().save(path)
    before = path.read_bytes()

    def boom(obj, f, *args, **kwargs):
        f.write(b"half a file")  # a crash part-way through writing
        raise RuntimeError("disk full")

    monkeypatch.setattr(_io.torch, "save", boom)
    other = make_model(inner_lr=0.5)
    with pytest.raises(RuntimeError, match="disk full"):
        other.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert no_temp_files(tmp_path) == []
    assert sorted(os.listdir(tmp_path)) == ["m.pt"]
    assert pymaml.load(path).inner_lr == 0.05


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        pymaml.load(tmp_path / "nope.pt")


def test_load_random_bytes(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(random.Random(0).randbytes(256))
    with pytest.raises(ValueError, match="garbage.pt"):
        pymaml.load(path)


def test_load_empty_and_corrupt_zip(tmp_path):
    for name, data in (("empty.pt", b""), ("zip.pt", b"PK\x03\x04" + bytes(100))):
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ValueError, match=name):
            pymaml.load(path)


def test_load_dict_without_format_tag(tmp_path):
    path = tmp_path / "plain.pt"
    d = make_model().to_dict()
    del d["format"]
    torch.save(d, path)
    with pytest.raises(ValueError, match="plain.pt"):
        pymaml.load(path)


def test_load_invalid_record_names_path(tmp_path):
    path = tmp_path / "broken.pt"
    d = make_model().to_dict()
    d["params"] = torch.zeros(P + 1, dtype=torch.float64)  # wrong size for the sizes
    torch.save(d, path)
    with pytest.raises(ValueError, match="broken.pt"):
        pymaml.load(path)


# Foreign files make torch.load's unpickler raise KeyError, IndexError, struct.error...:
# load_file promises ValueError for any non-pymaml file.
@pytest.mark.parametrize("data", [b"hello world\n", b"X", b"R\xf1\x0e"], ids=["text", "X", "R"])
def test_load_garbage_that_confuses_the_unpickler(tmp_path, data):
    path = tmp_path / "garbage.pt"
    path.write_bytes(data)
    with pytest.raises(ValueError, match="garbage.pt"):
        pymaml.load(path)


def test_load_checkpoint_tag_without_model(tmp_path):
    path = tmp_path / "badck.pt"
    torch.save({"format": "pymaml.checkpoint"}, path)
    with pytest.raises(ValueError, match="badck.pt"):
        pymaml.load(path)


# ---- adapt --------------------------------------------------------------------------------------

def test_adapt_single_task():
    model = make_model()
    x, y = task_data()
    adapted = model.adapt(x, y)
    assert isinstance(adapted, pymaml.MetaMLP)
    assert adapted.params.shape == (P,)
    assert adapted.num_tasks is None
    assert not torch.equal(adapted.params, model.params)
    assert adapted(x).shape == (5, 1)
    # the adapted model fits the task better than the starting point
    assert (adapted(x) - y).pow(2).mean() < (model(x) - y).pow(2).mean()
    # settings carry over; the original is untouched
    assert (adapted.sizes, adapted.activation, adapted.loss, adapted.inner_lr, adapted.inner_steps) == \
        (SIZES, "tanh", "mse", 0.05, 3)
    assert adapted.params.grad_fn is None


def test_adapt_batched_tasks():
    model = make_model()
    x, y = task_data(T=3)
    adapted = model.adapt(x, y)
    assert adapted.params.shape == (3, P)
    assert adapted.num_tasks == 3
    xq = torch.linspace(-5, 5, 7, dtype=torch.float64).reshape(1, 7, 1).expand(3, 7, 1)
    assert adapted(xq).shape == (3, 7, 1)
    # row t is task t adapted on its own
    for t in range(3):
        single = model.adapt(x[t], y[t])
        torch.testing.assert_close(adapted.params[t], single.params.detach())


def test_adapt_zero_steps_is_identity():
    model = make_model()
    x, y = task_data()
    assert torch.equal(model.adapt(x, y, steps=0).params, model.params)
    xb, yb = task_data(T=2)
    batched = model.adapt(xb, yb, steps=0).params
    assert torch.equal(batched, model.params.detach().expand(2, P))


@pytest.mark.parametrize("overrides", [{}, {"steps": 2, "inner_lr": 0.2}], ids=["defaults", "overrides"])
def test_adapt_matches_functional(overrides):
    model = make_model(loss="l1", activation="relu")
    x, y = task_data(T=2)
    got = model.adapt(x, y, backend="reference", **overrides).params
    want = F.adapt(model.params.detach(), x, y, sizes=SIZES,
                   inner_lr=overrides.get("inner_lr", 0.05), steps=overrides.get("steps", 3),
                   activation="relu", loss="l1", backend="reference")
    torch.testing.assert_close(got, want)
    got_single = model.adapt(x[0], y[0], backend="reference", **overrides).params
    torch.testing.assert_close(got_single.detach(), want[0])


def test_adapt_an_adapted_batch_raises():
    model = make_model()
    x, y = task_data(T=2)
    adapted = model.adapt(x, y)
    with pytest.raises(ValueError, match="already adapted"):
        adapted.adapt(x, y)
    # a single-task adapted model can be adapted further
    assert model.adapt(x[0], y[0]).adapt(x[0], y[0]).params.shape == (P,)


@pytest.mark.parametrize("x", [
    torch.zeros(5, dtype=torch.float64),
    torch.zeros(2, 3, 5, 1, dtype=torch.float64),
    torch.zeros(5, 2, dtype=torch.float64),  # 2 input features for a 1-input net
    [[0.0]] * 5,
], ids=["1d", "4d", "features", "list"])
def test_adapt_bad_x_names_x(x):
    model = make_model()
    _, y = task_data()
    with pytest.raises(ValueError, match=r"^x"):
        model.adapt(x, y)


def test_adapt_x_y_rank_mismatch():
    model = make_model()
    x, y = task_data(T=2)
    with pytest.raises(ValueError, match=r"^x and y"):
        model.adapt(x[0], y)


# ---- nn.Sequential ------------------------------------------------------------------------------

def test_sequential_round_trip():
    model = make_model()
    seq = model.to_sequential()
    assert isinstance(seq, torch.nn.Sequential)
    assert [type(m) for m in seq] == [torch.nn.Linear, torch.nn.Tanh] * 2 + [torch.nn.Linear]
    x = torch.linspace(-5, 5, 11, dtype=torch.float64).unsqueeze(1)
    with torch.no_grad():
        torch.testing.assert_close(seq(x), model(x))
    back = pymaml.MetaMLP.from_sequential(seq, loss="mse", inner_lr=0.05, inner_steps=3)
    assert back.sizes == SIZES and back.activation == "tanh"
    assert torch.equal(back.params, model.params)
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x))
    # a copy, not a view: changing the Sequential leaves the model alone
    with torch.no_grad():
        seq[0].weight.add_(1.0)
    assert torch.equal(back.params, model.params)


def test_batched_model_has_no_sequential():
    x, y = task_data(T=2)
    with pytest.raises(ValueError):
        make_model().adapt(x, y).to_sequential()


# ---- a model file missing a field, or holding what no model has ---------------------------------

def _without(field):
    def change(d):
        del d[field]
    return change


BAD_RECORDS = [(_without(f), f"field '{f}' of the model record is missing")
               for f in ("sizes", "activation", "loss", "inner_lr", "inner_steps", "params")] + [
    (lambda d: d.update(params=[0.0] * P), "field 'params' of the model record is a list"),
    (lambda d: d.update(info=[1, 2]), "field 'info' of the model record is a list"),
    (lambda d: d.update(inner_steps=-1), "inner_steps must be an int >= 0"),
    (lambda d: d.update(inner_lr=float("nan")), "inner_lr must be a finite number"),
    (lambda d: d.update(activation="gelu"), "activation must be one of"),
    (lambda d: d.update(sizes=[1, 0, 1]), "sizes must hold positive integers"),
    (lambda d: d.update(params=torch.zeros(P, dtype=torch.int64)), "params must be a "
                                                                   "floating-point tensor"),
]


@pytest.mark.parametrize("change,words", BAD_RECORDS, ids=[w.split(" ")[1] if w.startswith("field")
                                                            else w.split(" ")[0] for _, w in BAD_RECORDS])
def test_a_model_file_with_a_bad_field_is_refused_naming_file_and_field(tmp_path, change, words):
    d = make_model().to_dict()
    change(d)
    path = tmp_path / "bad.pt"
    _io.atomic_save(d, path)
    with pytest.raises((ValueError, TypeError), match=f"bad.pt: .*{words}") as err:
        pymaml.load(path)
    assert "\n" not in str(err.value)


def test_a_model_made_under_no_grad_saves_and_loads(tmp_path):
    with torch.no_grad():
        model = make_model()
        model.save(tmp_path / "m.pt")
    assert torch.equal(pymaml.load(tmp_path / "m.pt").params, model.params)
