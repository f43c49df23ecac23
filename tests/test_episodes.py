"""Episodes and split_classes (pymaml/tasks/episodes.py): shapes, labels, reproducibility,
sampling without replacement, class splits, rotations and every argument check."""

import pytest
import torch

from pymaml.tasks import Episodes, TaskBatch, split_classes


def _data(classes=10, per_class=6, side=4):
    """x [N, side, side] whose example i is filled with i (so a point tells which example it
    is), labels [N] with per_class examples of each class, the classes interleaved."""
    N = classes * per_class
    x = torch.arange(N, dtype=torch.float64)[:, None, None].expand(N, side, side).clone()
    labels = torch.arange(N) % classes
    return x, labels


def _asymmetric(classes=4, per_class=5, side=3):
    """Images whose 4 turns all differ: example i is i * 100 + arange(side * side)."""
    N = classes * per_class
    x = (torch.arange(N, dtype=torch.float64)[:, None] * 100
         + torch.arange(side * side)).reshape(N, side, side)
    return x, torch.arange(N) % classes


def _rows(batch, part):
    """The example index of every point of a batch of _data (all pixels of a point equal it)."""
    return batch[part][..., 0].round().long()


def test_shapes_dtypes_and_labels():
    x, labels = _data()
    family = Episodes(x, labels, ways=3, shots=2, queries=4)
    assert (family.n_in, family.n_out) == (16, 3)
    b = family.sample(5, generator=torch.Generator().manual_seed(0))
    assert isinstance(b, TaskBatch)
    assert b.x_support.shape == (5, 6, 16) and b.x_query.shape == (5, 12, 16)
    assert b.x_support.dtype == torch.float32 and b.y_support.dtype == torch.int64
    assert b.y_support.shape == (5, 6) and b.y_query.shape == (5, 12)
    # class by class: label j's points are together, shots (queries) of them
    assert b.y_support[0].tolist() == [0, 0, 1, 1, 2, 2]
    assert b.y_query[3].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    unflat = Episodes(x, labels, flatten=False).sample(2, generator=torch.Generator())
    assert unflat.x_support.shape == (2, 5, 4, 4) and unflat.x_query.shape == (2, 5, 4, 4)
    assert Episodes(x, labels, shots=3).queries == 3  # queries default: as many as shots


def test_points_of_a_label_share_one_class_and_none_repeats():
    x, labels = _data(classes=10, per_class=6)
    family = Episodes(x, labels, ways=4, shots=2, queries=4)  # 6 = all of a class's examples
    b = family.sample(50, generator=torch.Generator().manual_seed(1))
    rows = torch.cat([_rows(b, 0).reshape(50, 4, 2), _rows(b, 2).reshape(50, 4, 4)], dim=2)
    cls = labels[rows]  # [T, ways, 6]
    assert (cls == cls[..., :1]).all()  # one class per label
    assert all(len(set(c.tolist())) == 4 for c in cls[..., 0])  # ways distinct classes
    # without replacement: a class's 6 points are its 6 examples, each once
    assert (rows.sort(dim=2).values == (torch.arange(6) * 10 + cls[..., :1])).all()


def test_classes_and_their_labels_are_drawn_uniformly():
    x, labels = _data(classes=5, per_class=2)
    family = Episodes(x, labels, ways=2, shots=1)
    T = 4000
    draws = family.draw(T, torch.Generator().manual_seed(2))[0]  # [T, ways] class ids
    # every class gets label 0 about T * 2/5 / 2 = T / 5 times
    counts = torch.bincount(draws[:, 0], minlength=5).double() / T
    assert (counts - 0.2).abs().max() < 0.03
    assert not (draws[:, 0] < draws[:, 1]).all()  # the label order is random, not sorted


def test_same_seed_same_batch_and_sample_many_is_n_samples():
    x, labels = _data()
    family = Episodes(x, labels, ways=3, shots=1, queries=2, rotations=True)
    a = family.sample(4, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    b = family.sample(4, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    c = family.sample(4, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    assert all(torch.equal(s, t) for s, t in zip(a, b))
    assert not torch.equal(a.x_query, c.x_query)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    many = family.sample_many(3, 4, generator=g1)
    singles = [family.sample(4, generator=g2) for _ in range(3)]
    assert many.x_support.shape == (3, 4, 3, 16) and many.y_query.shape == (3, 4, 6)
    for field, got in zip(TaskBatch._fields, many):
        assert torch.equal(got, torch.stack([getattr(s, field) for s in singles])), field
    assert torch.equal(g1.get_state(), g2.get_state())


def test_sample_many_declines_for_a_subclass_that_changes_draw():
    class Mine(Episodes):
        def draw(self, T, generator):
            return super().draw(T, generator)

    x, labels = _data()
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    assert Mine(x, labels).sample_many(2, 3, generator=g) is None
    assert torch.equal(g.get_state(), state)  # nothing drawn


def test_classes_restricts_the_draws():
    x, labels = _data(classes=10)
    family = Episodes(x, labels, ways=3, classes=[1, 4, 7, 9])
    drawn = family.draw(200, torch.Generator().manual_seed(0))[0]
    assert set(drawn.unique().tolist()) == {1, 4, 7, 9}


def test_uneven_classes_draw_only_their_own_examples():
    labels = torch.tensor([0] * 3 + [1] * 7 + [2] * 4)
    x = torch.arange(14, dtype=torch.float32)[:, None]
    family = Episodes(x, labels, ways=3, shots=1, queries=2)
    _, _, rows = family.draw(300, torch.Generator().manual_seed(0))
    assert (labels[rows] == labels[rows[..., :1]]).all()
    assert set(rows.unique().tolist()) == set(range(14))  # every example of every class is used


def test_split_classes_is_disjoint_sorted_and_reproducible():
    labels = torch.arange(100) % 20
    train, test = split_classes(labels, 15, seed=4)
    assert len(train) == 15 and len(test) == 5
    assert train == sorted(train) and test == sorted(test)
    assert sorted(train + test) == list(range(20))
    assert split_classes(labels, 15, seed=4) == (train, test)
    assert split_classes(labels, 15, seed=5) != (train, test)
    assert [len(s) for s in split_classes(labels, 0.75, seed=0)] == [15, 5]
    assert split_classes(torch.tensor([3, 8, 8, 5]), 1, seed=0)[0][0] in (3, 5, 8)


def test_rotations_keep_a_class_and_its_turns_on_its_side():
    x, labels = _asymmetric(classes=6)
    train, test = split_classes(labels, 3, seed=0)
    family = Episodes(x, labels, ways=5, shots=1, queries=1, classes=train, rotations=True)
    assert family.n_classes == 12
    ids, turns, rows = family.draw(400, torch.Generator().manual_seed(0))
    assert set(ids.unique().tolist()) == set(train)
    assert set(turns.unique().tolist()) == {0, 1, 2, 3}
    b = family.batch(turns, rows, dtype=torch.float64)
    images = b.x_support.reshape(400, 5, 3, 3)
    for t in range(0, 400, 37):
        for j in range(5):
            want = torch.rot90(x[rows[t, j, 0]], int(turns[t, j]), dims=(-2, -1))
            assert torch.equal(images[t, j], want)
    # the 4 turns of one class are 4 classes: an episode may hold two of them
    pairs = ids[:, :, None] == ids[:, None, :]
    assert (pairs.sum(dim=(1, 2)) > 5).any()


def test_float_dtypes_and_device():
    x, labels = _data()
    family = Episodes(x.to(torch.uint8), labels)
    b = family.sample(2, generator=torch.Generator(), dtype=torch.float64, device="cpu")
    assert b.x_query.dtype == torch.float64 and b.x_query.device.type == "cpu"
    assert b.y_query.dtype == torch.int64


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(x=[1, 2]), TypeError, "x must be a torch.Tensor"),
    (dict(x=torch.zeros(60, 4, 4, dtype=torch.complex64)), TypeError, "x must hold real"),
    (dict(x=torch.zeros(59, 4, 4)), ValueError, "N = 60"),
    (dict(x=torch.zeros(60)), ValueError, "x must be [N, ...]"),
    (dict(labels=torch.zeros(60)), TypeError, "labels must hold integer"),
    (dict(labels=torch.zeros(60, dtype=torch.bool)), TypeError, "labels must hold integer"),
    (dict(labels=[0] * 60), TypeError, "labels must be a torch.Tensor"),
    (dict(labels=torch.zeros(60, 1, dtype=torch.int64)), ValueError, "labels must be a non-empty"),
    (dict(ways=1), ValueError, "ways must be an int >= 2"),
    (dict(ways=11), ValueError, "ways=11 is more than the 10 classes"),
    (dict(ways=3, classes=[0, 1]), ValueError, "ways=3 is more than the 2 classes"),
    (dict(shots=0), ValueError, "shots must be an int >= 1"),
    (dict(queries=2.0), ValueError, "queries must be an int >= 1"),
    (dict(shots=4, queries=3), ValueError, "fewer than shots + queries = 7"),
    (dict(classes=[0, 0]), ValueError, "must not repeat"),
    (dict(classes=[0, 10]), ValueError, "ids that no label has: [10]"),
    (dict(classes=[]), ValueError, "classes must be None or a non-empty list"),
    (dict(classes="01"), ValueError, "classes must be None or a non-empty list"),
    (dict(rotations=1), TypeError, "rotations must be True or False"),
    (dict(rotations=True, x=torch.zeros(60, 4, 5)), ValueError, "x must be [N, ..., H, H]"),
    (dict(flatten="yes"), TypeError, "flatten must be True or False"),
    (dict(name=""), TypeError, "name must be a non-empty str"),
])
def test_bad_arguments_are_named(kwargs, error, words):
    x, labels = _data()
    args = dict(x=x, labels=labels)
    args.update(kwargs)
    with pytest.raises(error) as info:
        Episodes(args.pop("x"), args.pop("labels"), **args)
    assert words in str(info.value)


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(T=0), ValueError, "T must be an int >= 1"),
    (dict(dtype=torch.int64), TypeError, "dtype must be a floating torch.dtype"),
    (dict(device="nowhere"), ValueError, "device must be a torch device"),
    (dict(generator=None), TypeError, "generator must be a CPU torch.Generator"),
])
def test_bad_sample_arguments_are_named_and_draw_nothing(kwargs, error, words):
    x, labels = _data()
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    args = dict(T=2, generator=g)
    args.update(kwargs)
    with pytest.raises(error, match=words.replace(".", r"\.")):
        Episodes(x, labels).sample(args.pop("T"), **args)
    assert torch.equal(g.get_state(), state)


@pytest.mark.parametrize("train, words", [
    (0, "each side needs at least one"), (10, "each side needs at least one"),
    (1.0, "train must be a number of classes"), (True, "train must be a number"),
    (0.01, "gives 0 of the 10 classes"),
])
def test_bad_split_arguments_are_named(train, words):
    with pytest.raises(ValueError, match=words):
        split_classes(torch.arange(30) % 10, train, seed=0)
    with pytest.raises(ValueError, match="seed must be an int"):
        split_classes(torch.arange(30) % 10, 5, seed=-1)
