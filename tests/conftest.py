"""Shared helpers: random MAML problems and the per-dtype tolerances of the oracle tests."""

import pytest
import torch

import pymaml
from pymaml.testing import Problem, random_problem, relative_error  # noqa: F401  (re-exported to tests)

# max |fused - reference| <= TOL[dtype] * max(1, max |reference|)
TOL = {torch.float64: 1e-10, torch.float32: 1e-4}

requires_fused = pytest.mark.skipif(not pymaml.fused_available(),
                                    reason="pymaml._C is not built")


def assert_matches(actual, expected, dtype, what):
    err = relative_error(actual, expected)
    assert err <= TOL[dtype], f"{what}: max |diff| / max(1, max |ref|) = {err:.3g} > {TOL[dtype]:g}"


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
