"""Shared helpers: the device and dtype fixtures (every fused-op test runs on the CPU and, where
there is one, on a GPU: the same test), random MAML problems and the per-dtype tolerances of the
oracle tests."""

import pytest
import torch

import pymaml
from pymaml.testing import (Problem, backend_outputs, random_problem, relative_error,  # noqa: F401
                            to_device)  # (Problem, random_problem: re-exported to the tests)

# max |fused - reference| <= TOL[dtype] * max(1, max |reference|)
TOL = {torch.float64: 1e-10, torch.float32: 1e-4}

requires_fused = pytest.mark.skipif(not pymaml.fused_available(),
                                    reason="pymaml._C is not built")


def cuda_skip_reason():
    """Why the fused op cannot run on a GPU here, or None when it can."""
    if not pymaml.fused_available():
        return "pymaml._C is not built"
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    if not pymaml.cuda_compiled():
        return "pymaml._C was built without CUDA kernels (see setup.py)"
    return None


requires_cuda = pytest.mark.skipif(cuda_skip_reason() is not None,
                                   reason=cuda_skip_reason() or "")

# Where the fused op runs: the CPU always, CUDA when built with its kernels and a GPU is there
# (skipped, with the reason, otherwise). Select one with `pytest -k cpu` / `pytest -k cuda`.
DEVICES = [pytest.param("cpu", id="cpu", marks=requires_fused),
           pytest.param("cuda", id="cuda", marks=requires_cuda)]
DTYPES = [pytest.param(torch.float64, id="float64"), pytest.param(torch.float32, id="float32")]


@pytest.fixture(params=DEVICES)
def device(request):
    """The device the fused op runs on; the oracle it is checked against stays on the CPU."""
    return request.param


@pytest.fixture(params=DTYPES)
def dtype(request):
    return request.param


def assert_matches(actual, expected, dtype, what):
    err = relative_error(actual, expected)
    assert err <= TOL[dtype], f"{what}: max |diff| / max(1, max |ref|) = {err:.3g} > {TOL[dtype]:g}"


def assert_rows_agree(runners) -> dict:
    """The benchmark rows (benchmarks/harness.py runners) against the "reference" row: each
    one's meta-loss and meta-gradient equal to its, to float32 tolerances. {name: gradient}."""
    expected_loss, expected = runners["reference"].meta_grad()
    grads = {}
    for n, runner in runners.items():
        loss, grads[n] = runner.meta_grad()
        torch.testing.assert_close(grads[n], expected, rtol=1e-5, atol=1e-6, msg=n)
        torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6, msg=n)
    return grads


def assert_steps_agree(runners, names) -> None:
    """One meta-iteration of every row, from the same weights with the same optimizer: the rows
    `names` then hold the reference row's weights."""
    for runner in runners.values():
        runner.step()
    for n in names:
        torch.testing.assert_close(runners[n].weights(), runners["reference"].weights(),
                                   rtol=1e-5, atol=1e-6, msg=n)


def run_cli(capsys, *argv):
    """(exit code, stdout, stderr) of `pymaml argv...`; an argparse exit gives its code."""
    from pymaml.cli import main
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line(err):
    """A CLI error: one line on stderr, no traceback."""
    assert err.endswith("\n") and err.count("\n") == 1, f"expected one line on stderr, got {err!r}"
    assert "Traceback" not in err and "usage:" not in err


def check_fused(pb, device, seed=None):
    """The fused op on `device` against the CPU reference and, on any other device, against the
    CPU fused op too: the loss, meta-gradient, adapted parameters and adapt VJP, in pb's dtype,
    within TOL. `pb` is on the CPU; the fused op gets a copy on `device`."""
    dtype = pb.params.dtype
    got = backend_outputs(to_device(pb, device), "fused")
    for other in ("reference",) if device == "cpu" else ("reference", "fused"):
        expected = backend_outputs(pb, other)
        for key in expected:
            assert got[key].device.type == torch.device(device).type, key
            try:
                assert_matches(got[key], expected[key], dtype, f"{key} ({device} vs CPU {other})")
            except AssertionError as e:
                raise AssertionError(f"seed {seed}, {pb.hyper}: {e}") from None
