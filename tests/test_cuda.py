"""What only the CUDA kernels have (issue 5): the workspace in global memory and its same bits as
the shared-memory one, the error for a task too big to run, the current stream and device, and
pymaml.train on the GPU; skipped without a GPU and the CUDA kernels. The tests the CPU and CUDA
kernels share (against the reference and the CPU op, gradcheck, opcheck, torch.compile, bitwise
repeatability) run once per device in test_fused_vs_reference.py and test_op_registration.py
(`pytest -k cuda`). The last tests run everywhere (the build facts and the fallback agree)."""

import ctypes
import os
import subprocess
import tarfile
import time

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


@requires_cuda
@pytest.mark.parametrize("sizes, steps, points, dtype", [
    ([1, 12, 12, 1], 4, 8, torch.float64),  # 48,768 bytes of workspace
    ([1, 22, 22, 1], 4, 5, torch.float32),  # 49,124 bytes
], ids=["1-12-12-1-float64", "1-22-22-1-float32"])
def test_workspace_just_under_48kb(sizes, steps, points, dtype):
    # Issue 16: dynamic bytes under 48 KB, over it with the kernels' static shared memory: the
    # launch needs the opt-in, which was decided on the dynamic bytes alone ("invalid argument").
    g = torch.Generator().manual_seed(16)
    for activation, loss, first_order in (("relu", "mse", False), ("tanh", "l1", True)):
        pb = random_problem(16, dtype, max_tasks=3)
        pb.sizes, pb.activation, pb.loss, pb.first_order = sizes, activation, loss, first_order
        pb.steps, pb.inner_lr = steps, 0.01
        pb.params = F.init_params(sizes, generator=g, dtype=dtype)
        pb.xs, pb.xq = (torch.randn(3, points, 1, generator=g, dtype=torch.float64).to(dtype)
                        for _ in "ab")
        pb.ys, pb.yq = torch.sin(pb.xs), torch.cos(pb.xq)
        check_fused(pb, "cuda")


def loaded_cudarts():
    """Every CUDA runtime library loaded in this process (pymaml._C calls one of them)."""
    with open("/proc/self/maps") as f:
        paths = {line.split()[-1] for line in f if "libcudart.so" in line}
    return [ctypes.CDLL(p) for p in sorted(paths)]


@requires_cuda
def test_a_stale_cuda_error_is_not_reported_as_pymamls():
    # Issue 16: an earlier failed runtime call elsewhere leaves its error pending; the op clears
    # it before its launches, so that the cudaGetLastError() after them reports its own.
    pb = to_device(random_problem(3, torch.float64), "cuda")
    args = (pb.params, pb.xs, pb.ys, pb.sizes, pb.inner_lr, pb.steps, pb.activation, pb.loss,
            pb.first_order)
    expected = ops.adapt(*args)
    torch.cuda.synchronize()
    cudarts = loaded_cudarts()
    if not cudarts:
        pytest.skip("no libcudart.so in this process (a static runtime): cannot plant an error")
    for cudart in cudarts:  # an invalid ordinal: an error left pending in each runtime
        assert cudart.cudaSetDevice(ctypes.c_int(10 ** 6)) != 0
    got = ops.adapt(*args)  # direct op call: no torch kernel in between to see the error first
    torch.cuda.synchronize()
    assert torch.equal(got, expected)


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
def test_rates_and_frozen_layers_run_on_the_cpu_kernels_only():
    # The CUDA kernels take one scalar rate and every layer adapting: the ops refuse rates and
    # adapt_layers by name, and pymaml.functional serves such calls with the reference there.
    pb = to_device(random_problem(3, torch.float32), "cuda")
    P = pb.params.numel()
    rates = torch.full((1, P), pb.inner_lr, device="cuda")
    args = (pb.sizes, pb.inner_lr, pb.steps, pb.activation, pb.loss, pb.first_order)
    for rule in ((rates, None), (None, [-1])):
        with pytest.raises(NotImplementedError, match="CPU kernels only"):
            ops.maml_loss(pb.params, *pb.data, *args, True, False, *rule)
        with pytest.raises(NotImplementedError, match="CPU kernels only"):
            ops.adapt(pb.params, pb.xs, pb.ys, *args, *rule)
    got = F.maml_loss(pb.params, *pb.data, adapt_layers=[-1], **pb.hyper)
    want = F.maml_loss(pb.params, *pb.data, adapt_layers=[-1], backend="reference", **pb.hyper)
    assert torch.equal(got, want)


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


# ---- everywhere: the GPU check scripts' machinery (scripts/gpu_lib.sh) ------------------------

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_lib(tmp_path, body, budget, kill_after=None):
    """Runs `body` after sourcing scripts/gpu_lib.sh (GPU_SCRIPT=t, OUT=tmp_path/out); returns
    (exit status, stdout, the archive's members, summary.txt's lines). kill_after: seconds after
    which the whole script is killed from outside, as the device tool does at its limit."""
    script = tmp_path / "driver.sh"
    script.write_text(f"GPU_SCRIPT=t\nsource {REPO}/scripts/gpu_lib.sh\n{body}\n")
    env = dict(os.environ, OUT=str(tmp_path / "out"), GPU_CHECK_BUDGET=str(budget))
    proc = subprocess.Popen(["bash", str(script)], stdout=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=kill_after)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, _ = proc.communicate()
    with tarfile.open(tmp_path / "out" / "t.tgz") as tar:
        members = sorted(m.name for m in tar.getmembers() if m.isfile())
    summary = (tmp_path / "out" / "summary.txt").read_text().splitlines()
    return proc.returncode, out, members, summary


def test_gpu_lib_steps_deadlines_and_budget(tmp_path):
    # ok, a failure, a step cut by its own deadline, one cut to what is left of the budget, and
    # one with no budget left; every log packed, the summary line of each.
    body = """step quick 10 5 echo hello
step fails 10 5 false
step slow 1 5 sleep 30
step late 60 5 sleep 30
step never 10 5 echo never
exit $status"""
    start = time.monotonic()
    # Budget 12 s, 5 kept to pack: "late" starts at 1-2 s with 5-6 s left (its deadline), then
    # "never" has under the 5 s a step needs.
    rc, out, members, summary = run_lib(tmp_path, body, budget=12)
    assert time.monotonic() - start < 20
    assert rc == 1 and "hello" in out
    assert members == ["t/fails.log", "t/late.log", "t/quick.log", "t/slow.log", "t/summary.txt"]
    assert summary[0].startswith("quick: ok")
    assert summary[1].startswith("fails: FAIL (exit 1)")
    assert summary[2].startswith("slow: TIMEOUT (deadline 1 s)")
    assert summary[3].startswith("late: TIMEOUT (deadline ")  # cut to the budget, not 60 s
    assert int(summary[3].split("deadline ")[1].split()[0]) <= 6
    assert summary[4].startswith("never: skipped (budget spent")


def test_gpu_lib_archive_survives_a_kill(tmp_path):
    # Killed from outside during a step: the archive holds the steps before it.
    rc, _, members, summary = run_lib(tmp_path, "step one 10 5 echo one\nstep hang 60 5 sleep 60",
                                      budget=100, kill_after=3)
    assert rc != 0
    assert members == ["t/one.log", "t/summary.txt"] and summary == [summary[0]]
    assert summary[0].startswith("one: ok")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the script would run")
@pytest.mark.parametrize("script", ["gpu_check.sh", "gpu_bench.sh"])
def test_gpu_scripts_refuse_without_a_gpu(tmp_path, script):
    proc = subprocess.run(["bash", os.path.join(REPO, "scripts", script)], capture_output=True,
                          text=True, env=dict(os.environ, OUT=str(tmp_path)), timeout=120)
    assert proc.returncode == 2
    assert "no CUDA or sees no GPU" in proc.stdout or "pytest-benchmark" in proc.stdout
