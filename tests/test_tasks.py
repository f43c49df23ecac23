"""Task families: shapes, the distributions they promise, determinism under a seed, user tasks."""

import copy
import math

import pytest
import torch

import pymaml
from pymaml import tasks


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_seed_sine_statistics():
    fam = tasks.get_family("seed-sine")
    b = fam.sample(4000, generator=gen())
    assert [list(t.shape) for t in b] == [[4000, 4, 1]] * 4
    x = torch.cat([b.x_support, b.x_query], 1)
    y = torch.cat([b.y_support, b.y_query], 1)
    assert x.min() >= -2 * math.pi and x.max() <= 2 * math.pi
    assert abs(x.mean().item()) < 0.1 and abs(x.var().item() - (4 * math.pi) ** 2 / 12) < 0.5
    # b in {0, pi}: every task is sin(x) or -sin(x) on all its 8 points, half of each
    sign = torch.sign((y * torch.sin(x)).sum(dim=(1, 2)))
    torch.testing.assert_close(y, sign[:, None, None] * torch.sin(x), atol=1e-6, rtol=0)
    assert abs((sign < 0).float().mean().item() - 0.5) < 0.04


def test_sine_statistics():
    fam = tasks.get_family("sine", shots=5)
    ids, x, y = fam.draw(5000, gen(1))
    assert ids.shape == (5000, 2) and x.shape == (5000, 10, 1) == y.shape
    amplitude, phase = ids[:, 0], ids[:, 1]
    assert amplitude.min() >= 0.1 and amplitude.max() <= 5.0 and abs(amplitude.mean().item() - 2.55) < 0.08
    assert phase.min() >= 0 and phase.max() <= math.pi and abs(phase.mean().item() - math.pi / 2) < 0.05
    assert x.min() >= -5 and x.max() <= 5 and abs(x.mean().item()) < 0.05
    torch.testing.assert_close(y, amplitude[:, None, None] * torch.sin(x - phase[:, None, None]))
    b = fam.sample(3, generator=gen(1))
    assert [t.shape[1] for t in b] == [5, 5, 5, 5]


@pytest.mark.parametrize("shots,queries", [(5, None), (10, None), (20, 7)])
def test_sine_sizes(shots, queries):
    b = tasks.get_family("sine", shots=shots, queries=queries).sample(6, generator=gen())
    q = shots if queries is None else queries
    assert [tuple(t.shape) for t in b] == [(6, shots, 1)] * 2 + [(6, q, 1)] * 2


@pytest.mark.parametrize("name", ["seed-sine", "sine"])
def test_deterministic_under_a_seed(name):
    fam = tasks.get_family(name)
    a = fam.sample(8, generator=gen(3))
    again = fam.sample(8, generator=gen(3))
    other = fam.sample(8, generator=gen(4))
    assert all(torch.equal(s, t) for s, t in zip(a, again))
    assert not torch.equal(a.x_support, other.x_support)
    # the same draws for every dtype: made in float64, then cast
    wide = fam.sample(8, generator=gen(3), dtype=torch.float64)
    assert wide.x_query.dtype == torch.float64
    assert all(torch.equal(s, t.float()) for s, t in zip(a, wide))
    # consecutive samples differ (the generator advances)
    g = gen(5)
    assert not torch.equal(fam.sample(2, generator=g).x_support, fam.sample(2, generator=g).x_support)


def test_user_task_callable():
    def line(T, generator):
        slope = torch.randn(T, 1, 1, generator=generator, dtype=torch.float64)
        x = torch.rand(T, 6, 2, generator=generator, dtype=torch.float64)
        y = slope * x.sum(-1, keepdim=True)
        return x[:, :3], y[:, :3], x[:, 3:], y[:, 3:]

    fam = tasks.get_family(line)
    assert fam.name == "line"
    b = fam.sample(4, generator=gen(), dtype=torch.float32)
    assert b.x_support.shape == (4, 3, 2) and b.y_query.shape == (4, 3, 1)
    assert b.x_support.dtype == torch.float32


def test_user_task_errors():
    with pytest.raises(ValueError, match="must return \\(x_support"):
        tasks.get_family(lambda T, g: torch.zeros(T, 1, 1)).sample(2, generator=gen())
    with pytest.raises(ValueError, match="y_query as a tensor \\[T=2"):
        tasks.get_family(lambda T, g: (torch.zeros(T, 1, 1),) * 3 + (torch.zeros(1, 1, 1),)).sample(2, generator=gen())
    with pytest.raises(ValueError, match="task must be one of"):
        tasks.get_family("cosine")
    with pytest.raises(TypeError, match="task must be"):
        tasks.get_family(42)
    with pytest.raises(ValueError, match="shots must be an int >= 1"):
        tasks.get_family("sine", shots=0)
    with pytest.raises(ValueError, match="named task families only"):
        tasks.get_family(tasks.Sine(), shots=5)
    with pytest.raises(ValueError, match="T must be"):
        tasks.Sine().sample(0, generator=gen())


@pytest.mark.parametrize("name", ["seed-sine", "sine"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("n,T", [(1, 1), (7, 1), (13, 3), (400, 2)])
def test_sample_many_is_consecutive_samples(name, dtype, n, T):
    # The trainer's fast path draws a chunk of iterations at once: it must draw exactly the
    # tasks, points and targets of drawing them one meta-batch at a time, and leave the
    # generator where those draws leave it.
    fam = tasks.get_family(name, shots=3, queries=5) if name == "sine" else tasks.get_family(name)
    g_many, g_one = gen(11), gen(11)
    many = fam.sample_many(n, T, generator=g_many, dtype=dtype)
    one = [fam.sample(T, generator=g_one, dtype=dtype) for _ in range(n)]
    for field, got in zip(tasks.TaskBatch._fields, many):
        assert got.shape[:2] == (n, T) and got.dtype == dtype, field
        assert torch.equal(got, torch.stack([b[tasks.TaskBatch._fields.index(field)] for b in one])), field
    assert torch.equal(g_many.get_state(), g_one.get_state())


def test_a_meta_batch_is_one_draw():
    # seed-sine's documented sampling: per task one row of torch.rand(T, 1 + K + Q): b = pi if
    # the first uniform is below 1/2 (else 0), then the points' uniforms scaled to [-2pi, 2pi).
    fam = tasks.SeedSine()
    b = fam.sample(50, generator=gen(2), dtype=torch.float64)
    u = torch.rand(50, 9, generator=gen(2), dtype=torch.float64)
    phase = math.pi * (u[:, :1] < 0.5).double()
    x = -2 * math.pi + 4 * math.pi * u[:, 1:]
    assert torch.equal(b.x_support[..., 0], x[:, :4]) and torch.equal(b.x_query[..., 0], x[:, 4:])
    assert torch.equal(b.y_support[..., 0], torch.sin(x[:, :4] + phase))
    assert torch.equal(b.y_query[..., 0], torch.sin(x[:, 4:] + phase))
    assert 0 < (phase > 0).sum() < 50


def test_sample_many_declines_when_a_subclass_draws_its_own_way():
    class Shuffled(tasks.SeedSine):
        def sample(self, T, *, generator, dtype=torch.float32, device=None):
            b = super().sample(T, generator=generator, dtype=dtype, device=device)
            return tasks.TaskBatch(b.x_query, b.y_query, b.x_support, b.y_support)

    g = gen(4)
    before = g.get_state()
    assert Shuffled().sample_many(5, 2, generator=g) is None
    assert torch.equal(g.get_state(), before)  # nothing drawn
    assert tasks.TaskFamily().sample_many(5, 2, generator=g) is None
    assert tasks.get_family(lambda T, g: None).sample_many(5, 2, generator=g) is None


# ---- a user's family: what it draws is checked, not trained on blindly ----------------------

class _Family(tasks.TaskFamily):
    """A user's family whose draws `change` spoils."""

    def __init__(self, change):
        self.change = change

    def sample(self, T, *, generator, dtype=torch.float32, device=None):
        return self.change(T, tasks.SeedSine().sample(T, generator=generator, dtype=dtype,
                                                      device=device))


SPOILED = {
    "more tasks": (lambda T, b: tasks.SeedSine().sample(T + 1, generator=gen()), ValueError,
                   r"x_support as a tensor \[T=\d+, points, features\] \(the tasks asked for\)"),
    "fewer tasks": (lambda T, b: tasks.TaskBatch(*(t[:0] for t in b)), ValueError, "tasks asked for"),
    "complex": (lambda T, b: tasks.TaskBatch(*(t.to(torch.complex64) for t in b)), TypeError,
                "complex64: pymaml trains on real numbers"),
    "points differ": (lambda T, b: b._replace(y_query=b.y_query[:, :2]), ValueError,
                      "x_query and y_query with different numbers of points"),
    "three tensors": (lambda T, b: tuple(b)[:3], ValueError, "must return \\(x_support"),
}


@pytest.mark.parametrize("spoil", SPOILED)
def test_a_user_familys_bad_draws_are_refused_by_train_and_evaluate(spoil):
    change, error, words = SPOILED[spoil]
    family = _Family(change)
    with pytest.raises(error, match=f"task family 'custom' \\(_Family\\).sample.*{words}"):
        pymaml.train(family, iterations=2, meta_batch_size=2, progress=False, log_every=0)
    with pytest.raises(error, match=words):
        pymaml.evaluate(pymaml.MetaMLP([1, 8, 1]), family, num_tasks=4)


def test_a_user_family_in_another_dtype_is_cast():
    family = _Family(lambda T, b: tasks.TaskBatch(*(t.double() for t in b)))
    run = pymaml.train(family, iterations=3, meta_batch_size=2, progress=False, log_every=0)
    plain = pymaml.train(tasks.SeedSine(), iterations=3, meta_batch_size=2, progress=False,
                         log_every=0)
    assert run.model.params.dtype == torch.float32
    assert torch.equal(run.losses, plain.losses)


def test_a_callable_sampler_returning_complex_numbers_is_refused():
    sampler = lambda T, g: tuple(torch.ones(T, 4, 1, dtype=torch.complex64) for _ in range(4))
    with pytest.raises(TypeError, match="x_support of dtype torch.complex64"):
        pymaml.train(sampler, iterations=2, progress=False, log_every=0)


def test_a_function_family_whose_target_is_misshapen_is_refused():
    class TwoOutputs(tasks.SeedSine):
        def target(self, ids, x):
            return torch.sin(x).repeat(1, 1, 2)

    for draw in (lambda f: f.sample(3, generator=gen()),
                 lambda f: f.sample_many(4, 3, generator=gen())):
        with pytest.raises(ValueError, match=r"\(TwoOutputs\).target must return real y shaped "
                                             r"like x"):
            draw(TwoOutputs())


# ---- a user's DAML family: the same checks, DAML's fields ------------------------------------

class _DAMLFamily(tasks.DAMLTaskFamily):
    """A user's DAML family whose draws `change` spoils, drawing many at once too."""

    def __init__(self, change):
        self.change = change

    def sample_daml(self, T, *, steps, generator, dtype=torch.float32, device=None):
        b = tasks.DAMLSine().sample_daml(T, steps=steps, generator=generator, dtype=dtype,
                                         device=device)
        return self.change(T, b)

    def sample_daml_many(self, n, T, *, steps, generator, dtype=torch.float32, device=None):
        b = tasks.DAMLSine().sample_daml_many(n, T, steps=steps, generator=generator,
                                              dtype=dtype, device=device)
        return self.change(T, b)


SPOILED_DAML = {
    "more tasks": (lambda T, b: tasks.DAMLSine().sample_daml(T + 1, steps=5, generator=gen()),
                   ValueError, r"x_source as a tensor \[(n=\d+, )?T=\d+, steps, K_s, n_in\] or "),
    "complex": (lambda T, b: b._replace(y_query=b.y_query.to(torch.complex64)), TypeError,
                "y_query of dtype torch.complex64: pymaml trains on real numbers"),
    "points differ": (lambda T, b: b._replace(y_query=b.y_query[..., :2, :]), ValueError,
                      "x_query and y_query with different numbers of points"),
    "other steps": (lambda T, b: b._replace(x_source=b.x_source[..., :2, :, :]), ValueError,
                    "x_source with a batch for 2 inner steps, but steps = 5"),
    "other widths": (lambda T, b: b._replace(x_source=b.x_source.repeat_interleave(2, -1)),
                     ValueError, "x_source and x_query with different input widths"),
    "two tensors": (lambda T, b: tuple(b)[:2], ValueError, "must return \\(x_source, x_query"),
}


@pytest.mark.parametrize("spoil", SPOILED_DAML)
def test_a_user_daml_familys_bad_draws_are_refused(spoil):
    change, error, words = SPOILED_DAML[spoil]
    family = tasks.checked_daml(tasks.get_daml_family(_DAMLFamily(change)))
    for method, draw in (("sample_daml", lambda: family.sample_daml(3, steps=5, generator=gen())),
                         ("sample_daml_many",
                          lambda: family.sample_daml_many(2, 3, steps=5, generator=gen()))):
        where = f"task family 'custom' \\(_DAMLFamily\\).{method} "
        with pytest.raises(error, match=where + f".*{words}"):
            draw()
    with pytest.raises(error, match=words):
        pymaml.train(_DAMLFamily(change), algorithm="daml", iterations=2, progress=False,
                     log_every=0)


def test_a_user_daml_family_in_another_dtype_is_cast():
    family = tasks.checked_daml(_DAMLFamily(lambda T, b: tasks.DAMLBatch(*(t.double() for t in b))))
    got = family.sample_daml(3, steps=5, generator=gen(7))
    want = tasks.DAMLSine().sample_daml(3, steps=5, generator=gen(7))
    assert all(g.dtype == torch.float32 and torch.equal(g, w) for g, w in zip(got, want))
    # the same inputs at every step: x_source [T, K_s, n_in] is accepted as it is
    same = tasks.checked_daml(_DAMLFamily(lambda T, b: b._replace(x_source=b.x_source[:, 0])))
    assert same.sample_daml(3, steps=5, generator=gen()).x_source.shape == (3, 1, 1)


def test_the_checking_wrappers_are_the_familys_own():
    # pymaml's own classes are not wrapped (exact types: a subclass may draw its own way)
    own = [tasks.SeedSine(), tasks.Sine(), tasks.get_family(lambda T, g: None)]
    assert all(tasks.checked(f) is f for f in own)
    sub = type("Sub", (tasks.SeedSine,), {})()
    assert type(tasks.checked(sub)) is tasks.CheckedTasks
    wrapped = tasks.checked(sub)
    assert tasks.checked(wrapped) is wrapped
    own_daml = [tasks.DAMLSine(), tasks.get_daml_family(lambda T, s, g: None)]
    assert all(tasks.checked_daml(f) is f for f in own_daml)
    sub_daml = type("SubDAML", (tasks.DAMLSine,), {"tag": 7})()
    wrapped = tasks.checked_daml(sub_daml)
    assert type(wrapped) is tasks.CheckedDAMLTasks and isinstance(wrapped, tasks.DAMLTaskFamily)
    # attributes forwarded, the wrapper's class attributes included (name, n_in, n_out)
    assert (wrapped.name, wrapped.n_in, wrapped.tag, wrapped.queries) == ("daml-sine", 1, 7, 4)
    assert repr(wrapped).startswith("CheckedDAMLTasks(")
    # a wrapper copies (and pickles, with its family) as a plain object does
    twin = copy.deepcopy(wrapped)
    assert type(twin) is tasks.CheckedDAMLTasks and twin.tag == 7 and twin.family is not sub_daml
    # a subclass that draws its own way cannot promise many at once: nothing drawn, None passed on
    own_way = type("OwnWay", (tasks.DAMLSine,), {
        "draw_daml": lambda self, *a, **k: tasks.DAMLSine.draw_daml(self, *a, **k)})()
    g = gen(1)
    before = g.get_state()
    assert tasks.checked_daml(own_way).sample_daml_many(2, 3, steps=2, generator=g) is None
    assert torch.equal(g.get_state(), before)


def test_lookup_errors_name_the_protocol():
    with pytest.raises(ValueError, match="one of 'daml-sine' for DAML, a DAMLTaskFamily"):
        tasks.get_daml_family("sine")
    with pytest.raises(TypeError, match=r"callable fn\(T, steps, generator\), got 42"):
        tasks.get_daml_family(42)
    with pytest.raises(TypeError, match=r"a TaskFamily or a callable fn\(T, generator\), got 42"):
        tasks.get_family(42)
    with pytest.raises(ValueError, match="your own DAMLTaskFamily or sampler"):
        tasks.get_daml_family(tasks.DAMLSine(), shots=2)
    with pytest.raises(TypeError, match=r"DAMLTaskFamily instance: pass DAMLSine\(\)"):
        tasks.get_daml_family(tasks.DAMLSine)
    # a DAML family is a task family: its name works everywhere, its MAML draw says why not
    assert isinstance(tasks.get_family("daml-sine"), tasks.DAMLSine)
    assert tasks.get_daml_family("daml-sine", shots=2, queries=3).queries == 3


@pytest.mark.parametrize("name", ["seed-sine", "sine", "daml-sine"])
def test_task_identities_on_their_own(name):
    fam = tasks.get_family(name)
    ids = fam.sample_tasks(5, gen(2))
    assert ids.shape == (5, fam.task_uniforms) and ids.dtype == torch.float64
    assert torch.equal(fam.grid(7)[[0, -1], 0], torch.tensor([fam.x_low, fam.x_high],
                                                              dtype=torch.float64))
    with pytest.raises(ValueError, match="T must be"):
        fam.sample_tasks(0, gen())
