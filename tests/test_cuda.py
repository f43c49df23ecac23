"""The CUDA kernels (issue 5): against the autograd reference and the CPU fused op on random
configurations (S from 0 to 100, every activation, loss and order, adapt and its VJP too),
gradcheck, opcheck, torch.compile, bitwise repeatability, the workspace in global memory, the
error for a task too big to run, and pymaml.train on the GPU. Skipped without a GPU and the
CUDA kernels; the last tests run everywhere (the build facts and the fallback agree)."""

import pytest
import torch

import pymaml
from pymaml import _ops
from pymaml import functional as F
from pymaml.testing import (LARGE, backend_outputs, check_compile_matches_eager, paper_problems,
                            to_device)

from conftest import assert_matches, random_problem


def _skip_reason():
    if not pymaml.fused_available():
        return "pymaml._C is not built"
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    if not pymaml.cuda_compiled():
        return "pymaml._C was built without CUDA kernels (see setup.py)"
    return None


SKIP_REASON = _skip_reason()
requires_cuda = pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")
DTYPES = [torch.float64, torch.float32]
ops = torch.ops.pymaml


def check(pb, dtype, seed=None):
    """The CUDA op's loss, meta-gradient, adapted parameters and adapt VJP against the CPU
    reference's and the CPU fused op's, in the same dtype, with the oracle tests' tolerances."""
    cuda = backend_outputs(to_device(pb, "cuda"), "fused")
    for other in ("reference", "fused"):
        expected = backend_outputs(pb, other)
        for key in expected:
            assert cuda[key].device.type == "cuda"
            try:
                assert_matches(cuda[key], expected[key], dtype, f"{key} (CUDA vs CPU {other})")
            except AssertionError as e:
                raise AssertionError(f"seed {seed}, {pb.hyper}: {e}") from None


# ---- against the reference and the CPU op -----------------------------------------------------

@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block", range(5))
def test_random_small(dtype, block):
    # 5 blocks x 44 seeds = 220 configurations per dtype (random_problem: every activation,
    # loss and order, S in 0..5, 1-4 layers, 1-4 tasks).
    for seed in range(block * 44, (block + 1) * 44):
        check(random_problem(seed, dtype), dtype, seed)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_random_large(dtype):
    for seed in range(1000, 1012):
        check(random_problem(seed, dtype, **LARGE), dtype, seed)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("steps", [0, 1, 17, 50, 100])
def test_long_inner_loops(dtype, steps):
    # Up to the op's limit of 100 steps, at a small rate so that the inner loop stays finite.
    for seed in (2000, 2001, 2002):
        pb = random_problem(seed, dtype, max_width=16)
        pb.steps, pb.inner_lr = steps, min(pb.inner_lr, 0.01)
        check(pb, dtype, seed)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_paper_workloads(dtype):
    # W1 and W2, both orders. W2 in float32 runs with its workspace in shared memory, in
    # float64 in global memory (H100).
    for pb in paper_problems(dtype):
        check(pb, dtype)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_workspace_in_global_memory(dtype):
    # 1-256-256-1 with S=5, K=Q=10: about 0.7 MB (float32) of workspace per task, over any
    # GPU's shared memory: the kernels keep it in a global scratch buffer instead.
    g = torch.Generator().manual_seed(1)
    sizes = [1, 256, 256, 1]
    for activation, loss, first_order in (("relu", "mse", False), ("tanh", "l1", True)):
        pb = random_problem(5, dtype, max_tasks=3)
        pb.sizes, pb.activation, pb.loss, pb.first_order = sizes, activation, loss, first_order
        pb.steps, pb.inner_lr = 5, 0.01
        pb.params = F.init_params(sizes, generator=g, dtype=dtype)
        T = 3
        pb.xs, pb.xq = (torch.randn(T, 10, 1, generator=g, dtype=torch.float64).to(dtype)
                        for _ in "ab")
        pb.ys, pb.yq = torch.sin(pb.xs), torch.cos(pb.xq)
        check(pb, dtype)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_global_workspace_gives_the_same_bits(dtype, monkeypatch):
    # The same kernels with the workspace in shared or in global memory (forced): same bits.
    pb = to_device(random_problem(11, dtype, max_width=24, max_tasks=4), "cuda")
    pb.steps = max(pb.steps, 2)
    shared = backend_outputs(pb, "fused")
    monkeypatch.setenv("PYMAML_CUDA_WORKSPACE", "global")
    forced = backend_outputs(pb, "fused")
    for key in shared:
        assert torch.equal(forced[key], shared[key]), key


@requires_cuda
def test_many_tasks_reduce_in_order():
    # T identical tasks over more than the kernels' 1024 chunks (several tasks per chunk, a
    # non-contiguous input): the mean meta-gradient is the one-task meta-gradient.
    pb = random_problem(3, torch.float64, max_tasks=1)
    pb = to_device(pb, "cuda")
    one = pb.params.clone().requires_grad_()
    F.maml_loss(one, *pb.data, backend="fused", **pb.hyper).backward()
    T = 3001
    many = pb.params.clone().requires_grad_()
    data = [t.expand(T, *t.shape[1:]) for t in pb.data]
    F.maml_loss(many, *data, backend="fused", **pb.hyper).backward()
    torch.testing.assert_close(many.grad, one.grad, rtol=1e-12, atol=1e-12)
    adapted = F.adapt(pb.params, *data[:2], backend="fused", **pb.hyper)
    torch.testing.assert_close(adapted, adapted[:1].expand(T, -1), rtol=0, atol=0)


# ---- determinism -------------------------------------------------------------------------------

@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_repeated_runs_bitwise_identical(dtype):
    g = torch.Generator().manual_seed(4)
    sizes = [1, 40, 40, 1]
    params = F.init_params(sizes, generator=g, dtype=dtype).cuda()
    for T in (25, 3000):  # one task per chunk; several tasks per chunk
        xs, xq = (torch.rand(T, 10, 1, generator=g, dtype=torch.float64).to(dtype).cuda() * 10 - 5
                  for _ in "ab")
        args = (params, xs, torch.sin(xs), xq, torch.sin(xq), sizes, 0.01, 5, "relu", "mse")
        cot = torch.randn(T, params.numel(), generator=g, dtype=torch.float64).to(dtype).cuda()
        runs = []
        for _ in range(3):
            loss, grad = ops.maml_loss(*args, False, True)
            adapted = ops.adapt(*args[:3], *args[5:], False)
            vjp = ops.adapt_backward(cot, *args[:3], *args[5:])
            runs.append((loss, grad, adapted, vjp))
        for run in runs[1:]:
            for a, b in zip(run, runs[0]):
                assert torch.equal(a, b)


# ---- torch integration -------------------------------------------------------------------------

def small_tanh(seed=0, steps=2):
    pb = random_problem(seed, torch.float64, max_depth=2, max_width=4, max_points=3, max_tasks=2)
    pb.activation, pb.loss, pb.steps, pb.first_order = "tanh", "mse", steps, False
    return to_device(pb, "cuda")


@requires_cuda
@pytest.mark.parametrize("loss", ["mse", "l1"])
def test_gradcheck_maml_loss(loss):
    pb = small_tanh()
    pb.loss = loss
    f = lambda p: F.maml_loss(p, *pb.data, backend="fused", **pb.hyper)
    assert torch.autograd.gradcheck(f, (pb.params.clone().requires_grad_(),))


@requires_cuda
@pytest.mark.parametrize("steps", [0, 1, 3])
def test_gradcheck_adapt(steps):
    pb = small_tanh(seed=1, steps=steps)
    f = lambda p: F.adapt(p, pb.xs, pb.ys, backend="fused", **pb.hyper)
    assert torch.autograd.gradcheck(f, (pb.params.clone().requires_grad_(),))


@requires_cuda
@pytest.mark.parametrize("name", ["adapt", "adapt_backward", "maml_loss"])
def test_opcheck(name):
    for seed, dtype in ((0, torch.float64), (1, torch.float32), (2, torch.float64)):
        pb = to_device(random_problem(seed, dtype, max_tasks=3), "cuda")
        pb.steps = max(pb.steps, 1)
        hyper = (pb.sizes, pb.inner_lr, pb.steps, pb.activation, pb.loss)
        p = pb.params.clone().requires_grad_()
        if name == "adapt":
            samples = [(p, pb.xs, pb.ys, *hyper, pb.first_order)]
        elif name == "adapt_backward":
            cot = torch.randn(pb.xs.shape[0], p.numel(), dtype=dtype, device="cuda")
            samples = [(cot, pb.params, pb.xs, pb.ys, *hyper)]
        else:
            samples = [(p, *pb.data, *hyper, pb.first_order, True),
                       (pb.params, *pb.data, *hyper, pb.first_order, False)]
        for args in samples:
            torch.library.opcheck(getattr(ops, name).default, args)


@requires_cuda
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph(backend):
    pb = to_device(random_problem(4, torch.float32), "cuda")
    pb.steps = 3
    check_compile_matches_eager(pb, backend)


@requires_cuda
def test_runs_on_the_current_stream_and_device():
    pb = to_device(random_problem(7, torch.float64), "cuda")
    expected = F.maml_loss(pb.params, *pb.data, backend="fused", **pb.hyper)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = F.maml_loss(pb.params, *pb.data, backend="fused", **pb.hyper)
    stream.synchronize()
    assert torch.equal(got, expected)
    if torch.cuda.device_count() > 1:
        pb1 = to_device(pb, "cuda:1")
        got = F.maml_loss(pb1.params, *pb1.data, backend="fused", **pb1.hyper)
        assert got.device == torch.device("cuda:1") and torch.equal(got.cpu(), expected.cpu())


@requires_cuda
def test_task_too_big_names_what_to_reduce():
    # 8 layers of width 512, 100 steps, 2000 points: over 2^31 elements of workspace per task.
    sizes = [512] * 9
    params = torch.zeros(F.num_params(sizes), device="cuda")
    x = torch.zeros(1, 2000, 512, device="cuda")
    with pytest.raises(ValueError, match="reduce the inner steps, the points per task"):
        ops.maml_loss(params, x, x, x, x, sizes, 0.01, 100, "relu", "mse", False, True)


@requires_cuda
def test_train_on_cuda():
    # MSE: no sign flips of L1 residuals near zero to amplify float32 rounding differences.
    kw = dict(iterations=30, meta_batch_size=4, loss="mse", inner_lr=0.01, progress=False,
              log_every=0, backend="fused")
    gpu = pymaml.train(device="cuda", **kw)
    cpu = pymaml.train(device="cpu", **kw)
    assert gpu.config["backend"] == "fused" and gpu.model.params.device.type == "cuda"
    assert torch.isfinite(gpu.losses).all()
    torch.testing.assert_close(gpu.losses, cpu.losses, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(gpu.model.params.cpu(), cpu.model.params, rtol=1e-3, atol=1e-4)


# ---- everywhere: the build facts and the fallback ----------------------------------------------

@pytest.mark.skipif(not pymaml.fused_available(), reason="pymaml._C is not built")
def test_cuda_kernels_registered_iff_compiled():
    for name in ("adapt", "adapt_backward", "maml_loss"):
        has = torch._C._dispatch_has_kernel_for_dispatch_key(f"pymaml::{name}", "CUDA")
        assert has == pymaml.cuda_compiled(), name


def test_without_cuda_kernels_the_fused_path_says_why():
    reason = _ops.unavailable_reason(torch.device("cuda"), torch.float32)
    if pymaml.cuda_compiled():
        assert reason is None
    else:
        assert reason and ("CUDA kernels" in reason or "could not be imported" in reason)


@pytest.mark.skipif(pymaml.cuda_compiled() or not torch.cuda.is_available(),
                    reason="needs a GPU and a build without the CUDA kernels")
def test_without_cuda_kernels_auto_falls_back_to_the_reference():
    pb = to_device(random_problem(0, torch.float64), "cuda")
    p = pb.params.clone().requires_grad_()
    F.maml_loss(p, *pb.data, backend="auto", **pb.hyper).backward()
    assert p.grad.device.type == "cuda"
    with pytest.raises(RuntimeError, match="without CUDA kernels"):
        F.maml_loss(pb.params, *pb.data, backend="fused", **pb.hyper)
