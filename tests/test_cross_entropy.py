"""Softmax cross-entropy, loss="cross_entropy" (issue 24: few-shot classification): the fused op
against the autograd reference and the torch.func oracles on random classification problems
(2 to 20 classes, int64 class indices, one-hot, soft and unnormalised class weights as labels),
in float64 and float32: the loss, MAML's and FO-MAML's meta-gradient, adapt and its VJP,
Reptile, learned rates and frozen layers (ANIL), DAML's outer loss, the chunked training op;
the loss against torch.nn.functional.cross_entropy itself, class indices against their one-hot
labels, gradcheck; the label errors; pymaml.train and MetaMLP with class labels."""

import pytest
import torch

import pymaml
from pymaml import daml as D
from pymaml import functional as F
from pymaml import reference, tasks
from pymaml.testing import (LARGE, backend_outputs, class_labels, learned_oracle_outputs,
                            learned_outputs, max_relative, random_learned_problem,
                            random_problem, torch_func_daml)

from conftest import assert_one_line, check_fused, requires_fused, run_cli

pytestmark = requires_fused
ops = torch.ops.pymaml
CE = "cross_entropy"
# max |fused - expected| / max(max |expected|, tiny), per quantity
TOL = {torch.float64: 1e-12, torch.float32: 1e-5}
DTYPES = [pytest.param(torch.float64, id="float64"), pytest.param(torch.float32, id="float32")]


def problem(seed, dtype, **bounds):
    return random_problem(seed, dtype, loss=CE, **bounds)


def one_hot(y, C, dtype):
    return torch.nn.functional.one_hot(y, C).to(dtype) if not y.is_floating_point() else y


def compare(got: dict, expected: dict, dtype, what: str, worst: dict = None, tol=None):
    """Every quantity of `expected` in `got` within TOL (or tol: {key: bound} for some)."""
    for key in expected:
        err = max_relative(got[key], expected[key])
        if worst is not None:
            worst[key] = max(worst.get(key, 0.0), err)
        bound = (tol or {}).get(key, TOL[dtype])
        assert err <= bound, f"{what}: {key} differs by {err:.3g} (relative) > {bound:g}"


# ---- the fused op against the reference -------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block", range(4))
def test_fused_matches_reference(dtype, block):
    # 4 x 60 configurations per dtype (1-4 layers, relu / tanh, 0-5 steps, 1-4 tasks, every
    # kind of label), each in both orders; then deep, wide and long ones (LARGE).
    seeds = [(s, {}) for s in range(block * 60, (block + 1) * 60)]
    seeds += [(s, LARGE) for s in range(1000 + 3 * block, 1003 + 3 * block)]
    for seed, bounds in seeds:
        pb = problem(seed, dtype, **bounds)
        for first_order in (False, True):
            pb.first_order = first_order
            compare(backend_outputs(pb, "fused"), backend_outputs(pb, "reference"), dtype,
                    f"seed {seed}, {pb.hyper}")


def test_every_device(device, dtype):
    # The fused op on the CPU and, where there is a GPU, the CUDA kernels (conftest.check_fused:
    # against the CPU reference and the CPU fused op, to the oracle tests' tolerances).
    for seed in range(40):
        check_fused(problem(seed, dtype), device, seed)


def test_loss_is_torch_cross_entropy():
    # The mean over tasks of F.cross_entropy (mean over the query points) of the adapted
    # network, with class indices and with class probabilities.
    for seed in range(8):
        pb = problem(3 * seed, torch.float64)  # class indices (LABEL_KINDS[0])
        pb.steps = seed % 3
        C = pb.sizes[-1]
        adapted = F.adapt(pb.params, pb.xs, pb.ys, backend="fused", **pb.hyper)
        logits = reference.flat_net(adapted, pb.xq, pb.sizes, pb.activation)
        soft = torch.softmax(torch.randn(pb.yq.shape + (C,), dtype=torch.float64), -1)
        for yq in (pb.yq, soft):
            expected = torch.stack([torch.nn.functional.cross_entropy(z, y)
                                    for z, y in zip(logits, yq)]).mean()
            got = F.maml_loss(pb.params, pb.xs, pb.ys, pb.xq, yq, backend="fused", **pb.hyper)
            torch.testing.assert_close(got, expected, rtol=1e-13, atol=0)


@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_class_indices_are_their_one_hot_labels(backend):
    # Bitwise: indices become one-hot targets before any backend runs, per-step support too.
    for seed in range(0, 30, 3):
        pb = problem(seed, torch.float64)
        hot = [one_hot(y, pb.sizes[-1], torch.float64) for y in (pb.ys, pb.yq)]
        for data in ((pb.xs, pb.ys, pb.xq, pb.yq), (pb.xs, hot[0], pb.xq, hot[1])):
            p = pb.params.clone().requires_grad_()
            loss = F.maml_loss(p, *data, backend=backend, **pb.hyper)
            loss.backward()
            adapted = F.adapt(pb.params, *data[:2], backend=backend, **pb.hyper)
            if data[1] is pb.ys:
                first = (loss, p.grad, adapted)
        for a, b in zip(first, (loss, p.grad, adapted)):
            assert torch.equal(a, b), f"seed {seed}"
    steps, (T, K) = 3, pb.ys.shape
    ys = torch.randint(0, pb.sizes[-1], (T, steps, K))
    xs = torch.randn(T, steps, K, pb.sizes[0], dtype=torch.float64)
    hyper = dict(pb.hyper, steps=steps)
    a = F.maml_loss(pb.params, xs, ys, pb.xq, pb.yq, backend=backend, **hyper)
    b = F.maml_loss(pb.params, xs, one_hot(ys, pb.sizes[-1], torch.float64), pb.xq, pb.yq,
                    backend=backend, **hyper)
    assert torch.equal(a, b)


def test_gradcheck_on_the_op():
    # float64, a small tanh network, second order, soft labels and class indices.
    for seed in (2, 3):
        pb = problem(seed, torch.float64, max_depth=2, max_width=4, max_points=3, max_tasks=2)
        pb.activation, pb.steps, pb.first_order = "tanh", 2, False
        loss = lambda p: F.maml_loss(p, *pb.data, backend="fused", **pb.hyper)
        adapt = lambda p: F.adapt(p, pb.xs, pb.ys, backend="fused", **pb.hyper)
        for f in (loss, adapt):
            assert torch.autograd.gradcheck(f, (pb.params.clone().requires_grad_(),))


# ---- Reptile, learned rates and frozen layers, DAML ------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_reptile_op_matches_the_reference(dtype):
    for seed in range(60):
        pb = problem(seed, dtype)
        C = pb.sizes[-1]
        ys, yq = one_hot(pb.ys, C, dtype), one_hot(pb.yq, C, dtype)  # the op takes targets
        value, direction = ops.reptile(pb.params, pb.xs, ys, pb.xq, yq, pb.sizes, pb.inner_lr,
                                       pb.steps, pb.activation, CE)
        adapted = reference.adapt(pb.params, pb.xs, pb.ys, sizes=pb.sizes, inner_lr=pb.inner_lr,
                                  steps=pb.steps, activation=pb.activation, loss=CE,
                                  first_order=True)
        predicted = F.mlp_forward(adapted, pb.xq, sizes=pb.sizes, activation=pb.activation)
        compare(dict(loss=value, direction=direction),
                dict(loss=reference.cross_entropy(predicted, pb.yq),
                     direction=pb.params - adapted.mean(0)), dtype, f"seed {seed}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_learned_rates_and_frozen_layers(dtype):
    # Every rate shape, layer subsets, a batch per step one time in four; the head alone (ANIL)
    # every third seed. Against the reference and the torch.func oracle. In float32 the rates'
    # gradients, sums over every parameter and task (one number for a rate of shape []), are
    # held to the learned-rate tests' bound (test_learned_rates.py).
    rates = {k: 1e-4 for k in ("grad_rates", "vjp_rates")} if dtype == torch.float32 else None
    worst = {}
    for seed in range(84):
        lp = random_learned_problem(seed, dtype, loss=CE)
        if seed % 3 == 0:
            lp.adapt_layers = [-1]
        fused, what = learned_outputs(lp, "fused"), f"seed {seed}, {lp.describe()}"
        compare(fused, learned_outputs(lp, "reference"), dtype, what + " (vs reference)", worst,
                rates)
        compare(fused, learned_oracle_outputs(lp), dtype, what + " (vs torch.func)", None, rates)
    print(f"learned rates, {dtype}: " + ", ".join(f"{k} {v:.2e}" for k, v in worst.items()))


def daml_problem(seed, dtype):
    """A random DAML call's tensors and keywords with cross-entropy as its outer loss."""
    g = torch.Generator().manual_seed(seed)
    pick = lambda lo, hi: int(torch.randint(lo, hi + 1, (), generator=g))
    sizes = [pick(1, 3)] + [pick(1, 10) for _ in range(pick(0, 2))] + [pick(2, 12)]
    loss_sizes = [sum(sizes[1:])] + [pick(1, 8) for _ in range(pick(0, 2))] + [pick(1, 3)]
    steps, T, K, Q = pick(1, 4), pick(1, 3), pick(1, 4), pick(1, 5)
    x_source = torch.randn(T, *((steps,) if seed % 2 else ()), K, sizes[0], generator=g)
    params = F.init_params(sizes, generator=g, dtype=torch.float64)
    loss_params = F.init_params(loss_sizes, generator=g, dtype=torch.float64)
    x_query = torch.randn(T, Q, sizes[0], generator=g, dtype=torch.float64)
    y_query = class_labels(torch.randn(T, Q, sizes[-1], generator=g, dtype=torch.float64), seed)
    cast = lambda t: t.to(dtype) if t.is_floating_point() else t
    hyper = dict(sizes=sizes, loss_sizes=loss_sizes, inner_lr=0.05 + 0.3 * float(
        torch.rand((), generator=g)), steps=steps, activation=("relu", "tanh")[seed % 2],
        loss=CE, adapt_loss=("l1", "mse")[seed // 2 % 2])
    return [cast(t) for t in (params, loss_params, x_source, x_query, y_query)], hyper


@pytest.mark.parametrize("dtype", DTYPES)
def test_daml_outer_loss(dtype):
    for seed in range(40):
        (params, loss_params, *data), hyper = daml_problem(seed, dtype)
        out = {}
        for name in ("fused", "reference", "torch.func"):
            w = [params.clone().requires_grad_(), loss_params.clone().requires_grad_()]
            if name == "torch.func":
                meta_loss, _ = torch_func_daml(**hyper)
                grads, loss = torch.func.grad_and_value(meta_loss, argnums=(0, 1))(*w, *data)
            else:
                loss = D.daml_loss(*w, *data, backend=name, **hyper)
                grads = torch.autograd.grad(loss, w)
            out[name] = dict(loss=loss.detach(), grad_params=grads[0], grad_loss_params=grads[1])
        for other in ("reference", "torch.func"):
            compare(out["fused"], out[other], dtype, f"seed {seed}, {hyper} (vs {other})")


# ---- the chunked training op against per-iteration reference steps ----------------------------

@pytest.mark.parametrize("algorithm", ["maml", "fomaml"])
def test_train_chunk_matches_reference_iterations(algorithm):
    # 30 iterations of Adam: train_chunk in one call, against reference.maml_loss's gradient
    # and torch.optim.Adam(fused=True) one iteration at a time.
    for seed in range(4):
        pb = problem(seed, torch.float64)
        C, n = pb.sizes[-1], 30
        g = torch.Generator().manual_seed(seed)
        data = [t.unsqueeze(0) + 0.3 * torch.randn((n,) + t.shape, generator=g,
                                                   dtype=torch.float64) for t in (pb.xs, pb.xq)]
        labels = [one_hot(torch.randint(0, C, (n,) + x.shape[:2], generator=g), C,
                          torch.float64) for x in (pb.xs, pb.xq)]
        xs, xq, ys, yq = data[0], data[1], *labels
        ref = pb.params.clone().requires_grad_()
        opt = torch.optim.Adam([ref], lr=1e-2, fused=True)
        expected = []
        for i in range(n):
            loss = reference.maml_loss(ref, xs[i], ys[i], xq[i], yq[i], sizes=pb.sizes,
                                       inner_lr=pb.inner_lr, steps=pb.steps,
                                       activation=pb.activation, loss=CE,
                                       first_order=algorithm == "fomaml")
            (ref.grad,) = torch.autograd.grad(loss, ref)
            opt.step()
            expected.append(loss.detach())
        ours = pb.params.clone()
        state = [torch.tensor(0.0), torch.zeros_like(ours), torch.zeros_like(ours)]
        losses, done = ops.train_chunk(ours, state, xs, ys, xq, yq, pb.sizes, pb.inner_lr,
                                       pb.steps, pb.activation, CE, algorithm, "adam",
                                       [1e-2, 0.9, 0.999, 1e-8, 0.0, 0.0, 0.0, 0.0])
        assert done.item() == n
        torch.testing.assert_close(losses, torch.stack(expected), rtol=1e-11, atol=1e-13)
        torch.testing.assert_close(ours, ref.detach(), rtol=1e-10, atol=1e-12)


# ---- errors -----------------------------------------------------------------------------------

def label_error_cases(pb):
    """(support labels, query labels, error, message) of bad labels for problem pb, whose
    labels are class indices."""
    C = pb.sizes[-1]
    wide = one_hot(pb.yq, C, torch.float64)
    return [
        (torch.full_like(pb.ys, C), pb.yq, ValueError,
         rf"y_support holds class index {C}, outside \[0, {C}\)"),
        (pb.ys, torch.full_like(pb.yq, -C), ValueError,
         rf"y_query holds class index -{C}, outside \[0, {C}\)"),
        (pb.ys.unsqueeze(-1), pb.yq, ValueError, r"y_support as class indices must be \[T, K\]"),
        (pb.ys, torch.cat([wide, wide[..., :1]], -1), ValueError,
         rf"y_query must be \[T, K, {C}\], got shape \[.*, {C + 1}\]"),
        (pb.ys.double(), pb.yq, ValueError, rf"y_support must be \[T, K, {C}\]"),
    ]


@pytest.mark.parametrize("backend", ["auto", "fused", "reference"])
def test_label_errors_name_the_argument(backend):
    pb = problem(0, torch.float64)  # class indices
    kw = dict(pb.hyper, backend=backend)
    for ys, yq, error, match in label_error_cases(pb):
        with pytest.raises(error, match=match):
            F.maml_loss(pb.params, pb.xs, ys, pb.xq, yq, **kw)
        if ys is not pb.ys:  # adapt reads the support set alone
            with pytest.raises(error, match=match):
                F.adapt(pb.params, pb.xs, ys, **kw)
    with pytest.raises(TypeError, match="integer class labels are for loss='cross_entropy'"):
        F.maml_loss(pb.params, *pb.data, **dict(kw, loss="mse"))
    (params, loss_params, xs, xq, yq), hyper = daml_problem(0, torch.float64)
    with pytest.raises(ValueError, match="y_query holds class index 99"):
        D.daml_loss(params, loss_params, xs, xq, torch.full(xq.shape[:2], 99), **hyper)


def test_op_takes_the_loss_name():
    pb = problem(1, torch.float64)
    with pytest.raises(ValueError, match="loss must be 'mse', 'l1' or 'cross_entropy'"):
        ops.adapt(pb.params, pb.xs, one_hot(pb.ys, pb.sizes[-1], torch.float64), pb.sizes, 0.1,
                  1, "relu", "ce", False)


# ---- tasks, MetaMLP, pymaml.train -------------------------------------------------------------

def episodes(seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(8).repeat_interleave(6)  # 8 classes of 6 examples
    x = torch.randn(8, 2, 2, generator=g)[labels] + 0.3 * torch.randn(48, 2, 2, generator=g)
    return tasks.Episodes(x, labels, ways=3, shots=2, queries=3)


def test_checked_batches_keep_class_indices():
    family = tasks.checked(episodes())
    batch = family.sample(4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert batch.y_support.dtype == torch.int64 and batch.y_support.shape == (4, 6)
    assert batch.x_support.dtype == torch.float64
    many = family.sample_many(3, 4, generator=torch.Generator().manual_seed(0))
    assert many.y_query.dtype == torch.int64 and many.y_query.shape == (3, 4, 9)
    # a user's sampler: int32 indices become int64; integer targets [T, K, 1] are still cast
    x = torch.randn(2, 3, 4)
    out = tasks.check_batch("f", (x, torch.zeros(2, 3, dtype=torch.int32), x,
                                  torch.zeros(2, 3, 1, dtype=torch.int32)), (2,),
                            dtype=torch.float32, device=None)
    assert out.y_support.dtype == torch.int64 and out.y_query.dtype == torch.float32


def test_metamlp_adapts_on_class_indices():
    pb = problem(0, torch.float64)
    model = pymaml.MetaMLP(pb.sizes, pb.activation, params=pb.params, loss=CE,
                           inner_lr=pb.inner_lr, inner_steps=2)
    hot = one_hot(pb.ys, pb.sizes[-1], torch.float64)
    assert torch.equal(model.adapt(pb.xs[0], pb.ys[0]).params, model.adapt(pb.xs[0], hot[0]).params)
    assert torch.equal(model.adapt(pb.xs, pb.ys).params, model.adapt(pb.xs, hot).params)
    with pytest.raises(ValueError, match=r"class indices \[K\] / \[T, K\]"):
        model.adapt(pb.xs[0], pb.ys)


@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "reptile", "metasgd", "anil"])
def test_train_fast_path_is_the_per_iteration_path(algorithm):
    # Episodes' int64 labels through pymaml.train: the chunked fast path (train_chunk) and the
    # per-iteration path (a user's own Adam class) give the same bits; the loss falls.
    kw = dict(algorithm=algorithm, sizes=(4, 16, 3), loss=CE, inner_steps=2, inner_lr=0.2,
              meta_batch_size=4, iterations=80, outer_lr=1e-2, dtype=torch.float64,
              progress=False, log_every=0)
    fast = pymaml.train(episodes(), optimizer="adam", **kw)
    own = type("OwnAdam", (torch.optim.Adam,), {})
    slow = pymaml.train(episodes(), optimizer=own, optimizer_kwargs=dict(fused=True), **kw)
    assert fast.fast_iterations > 0 and slow.fast_iterations == 0
    assert torch.equal(fast.losses, slow.losses)
    assert torch.equal(fast.model.params, slow.model.params)
    assert fast.losses[-20:].mean() < fast.losses[:20].mean()


def test_train_refuses_one_output():
    with pytest.raises(ValueError, match="needs at least 2"):
        pymaml.train("sine", sizes=(1, 8, 1), loss=CE, iterations=1, progress=False)


def test_cli_takes_the_loss(tmp_path, monkeypatch, capsys):
    # --loss lists cross_entropy (LOSSES); on the one-output sine task it is refused in words.
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, "train", "--loss", "cross_entropy", "--iterations", "1",
                             "--no-progress", "--no-plots")
    assert code != 0 and "needs at least 2" in err
    assert_one_line(err)


def test_nn_module_wrapper_takes_class_indices():
    pb = problem(3, torch.float64)  # class indices
    model = pymaml.nn.to_sequential(pb.params, pb.sizes, pb.activation)
    maml = pymaml.MAML(model, inner_lr=pb.inner_lr, steps=2, loss=CE)
    hot = [one_hot(y, pb.sizes[-1], torch.float64) for y in (pb.ys, pb.yq)]
    a, b = maml(pb.xs, pb.ys, pb.xq, pb.yq), maml(pb.xs, hot[0], pb.xq, hot[1])
    assert torch.equal(a, b)
    a.backward()
    assert all(p.grad is not None for p in model.parameters())
