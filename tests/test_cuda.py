"""What only the CUDA kernels have (issue 5): the workspace in global memory and its same bits as
the shared-memory one, the error for a task too big to run, the current stream and device, and
pymaml.train on the GPU; skipped without a GPU and the CUDA kernels. The tests the CPU and CUDA
kernels share (against the reference and the CPU op, gradcheck, opcheck, torch.compile, bitwise
repeatability) run once per device in test_fused_vs_reference.py and test_op_registration.py
(`pytest -k cuda`). The last tests run everywhere (the build facts and the fallback agree)."""

import dataclasses

import pytest
import torch

import pymaml
from pymaml import _ops
from pymaml import functional as F
from pymaml.testing import backend_outputs, to_device

from conftest import check_fused, random_problem, requires_cuda

ops = torch.ops.pymaml


# ---- the workspace ------------------------------------------------------------------------------

@requires_cuda
def test_workspace_in_global_memory(dtype):  # dtype: the fixture of conftest.py
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
        check_fused(pb, "cuda")


@requires_cuda
def test_global_workspace_gives_the_same_bits(dtype, monkeypatch):
    # The same kernels with the workspace in shared or in global memory (forced): same bits.
    pb = to_device(random_problem(11, dtype, max_width=24, max_tasks=4), "cuda")
    pb.steps = max(pb.steps, 2)
    # Unset first: with PYMAML_CUDA_WORKSPACE=global already in the environment both runs would
    # take the global path and the test would compare it with itself.
    monkeypatch.delenv("PYMAML_CUDA_WORKSPACE", raising=False)
    shared = backend_outputs(pb, "fused")
    monkeypatch.setenv("PYMAML_CUDA_WORKSPACE", "global")
    forced = backend_outputs(pb, "fused")
    for key in shared:
        assert torch.equal(forced[key], shared[key]), key


# ---- streams, devices, limits, training -------------------------------------------------------

@requires_cuda
def test_runs_on_the_current_stream():
    pb = to_device(random_problem(7, torch.float64), "cuda")
    expected = F.maml_loss(pb.params, *pb.data, backend="fused", **pb.hyper)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = F.maml_loss(pb.params, *pb.data, backend="fused", **pb.hyper)
    stream.synchronize()
    assert torch.equal(got, expected)


@requires_cuda
def test_runs_on_the_inputs_device():
    # A second GPU: the op's device guard puts the work and the result on the inputs' device.
    if torch.cuda.device_count() < 2:
        pytest.skip("one GPU: no second device to run on")
    pb = to_device(random_problem(7, torch.float64), "cuda:0")
    expected = F.maml_loss(pb.params, *pb.data, backend="fused", **pb.hyper)
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


def test_bench_cuda_section_logic_on_the_cpu():
    # The cuda section's bookkeeping (the reference skipped at large T with a note, tasks/s,
    # TFLOP/s, the targets, its table), run on the CPU with tiny sizes: the GPU run only
    # changes the device.
    from pymaml import bench
    w = bench.W2.replace(sizes=(1, 8, 8, 1), K=3, Q=2, S=1)
    timing = dict(rounds=3, round_s=0.001, cell_budget_s=0.05, max_iter_s=10.0)
    workloads = [w.replace(T=T) for T in (2, bench.CUDA_REFERENCE_MAX_T + 1)]
    rows = bench._cuda_rows(workloads, timing, 1.0, lambda s: None, device="cpu")
    by = {(r["config"]["T"], r["impl"]): r for r in rows}
    big = bench.CUDA_REFERENCE_MAX_T + 1
    assert by[(big, "reference")]["status"] == "skipped"
    assert "not run above" in by[(big, "reference")]["note"]
    names = [n for n in bench.IMPLEMENTATIONS if n != "fused" or pymaml.fused_available()]
    for T in (2, big):
        for name in names:
            r = by[(T, name)]
            if (T, name) == (big, "reference"):
                continue
            assert r["status"] == "ok", r
            assert r["tasks_per_s"] == pytest.approx(T / r["median_s"])
            assert r["tflops"] == pytest.approx(r["flops"] / r["median_s"] / 1e12)
    # The targets are read from W2 rows at the T: none here (other sizes).
    assert bench._cuda_targets(rows) == []
    report = dict(results=rows, matmul={"cuda": {"gflops": 1000.0}}, machine={"cuda_device": "X"})
    table = "\n".join(bench._format_cuda(report))
    assert "tasks/s" in table and "TFLOP/s" in table and "not run above" in table


def test_bench_cuda_targets():
    from pymaml import bench
    rows = []
    for T, impl, median in ((4096, "fused", 1e-3), (4096, "torchfunc", 30e-3),
                            (25, "fused", 40e-6)):
        w = bench.W2.replace(T=T)
        rows.append(dict(section="cuda", status="ok", impl=impl, config=dataclasses.asdict(w),
                         median_s=median, pct_matmul=30.0))
    targets = bench._cuda_targets(rows)
    assert [t["passed"] for t in targets] == [True, True, True]
    assert targets[0]["value"] == pytest.approx(30.0)
    assert "30.0 %" in bench._fmt_target(targets[1])[1]
