"""The benchmark suite's DAML rows (benchmarks/: the daml section, issue 15): the workload's
label and flop count, every row agreeing with the reference on the meta-gradient of both
networks and stepping alike, torch.func's DAML (pymaml.testing.torch_func_daml, the torch.func
row) against pymaml.daml's reference in float64, the check that keeps a wrong row from being
timed, and the report's issue-15 target on a pytest-benchmark JSON written here."""

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

import pymaml
from pymaml import daml as D
from pymaml.daml_model import init_weights
from pymaml.testing import relative_error, torch_func_daml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import harness  # noqa: E402
from conftest import assert_rows_agree, assert_steps_agree  # noqa: E402
import report  # noqa: E402
from workloads import D1, daml_meta_iteration_flops  # noqa: E402


def tiny(**changes):
    return D1.replace(**dict(dict(sizes=(1, 8, 8, 1), loss_sizes=(17, 8, 1), K=2, Q=3, S=2, T=3),
                             **changes))


def test_label_and_flops_by_hand():
    assert D1.label() == "D1" and D1.test_id() == "D1-2nd"
    assert D1.replace(T=25).label() == "D1 T=25" and D1.replace(T=25).test_id() == "D1-T25-2nd"
    assert tiny().label() == "D1 sizes=1-8-8-1 loss_sizes=17-8-1 K=2 Q=3 S=2 T=3"
    # D1: P_w = 32 + 1024 + 32 = 1088, P_l = 65*32 + 32*32 + 32 = 3136;
    # 3*5*1*(6*1088 + 4*3136) + 6*4*1088 = 286,080 + 26,112.
    assert daml_meta_iteration_flops(D1) == 312_192
    assert daml_meta_iteration_flops(D1.replace(T=25)) == 25 * 312_192
    assert harness.flops_of(D1) == 312_192
    assert D1.hyper == dict(sizes=[1, 32, 32, 1], loss_sizes=[65, 32, 32, 1], inner_lr=0.03,
                            steps=5, activation="relu", loss="l1", adapt_loss="l1")


def test_data_is_the_seeds_workload():
    (xs, xq, yq), weights = harness.make_data(D1)
    assert xs.shape == (1, 5, 1, 1) and xq.shape == yq.shape == (1, 4, 1)
    assert weights.shape == (pymaml.functional.num_params([1, 32, 32, 1])
                             + pymaml.functional.num_params([65, 32, 32, 1]),)
    assert 0.7 < xs.abs().min() and xs.abs().max() < 1.6  # |x_s| in [pi/4, pi/2]


ROWS = list(harness.DAML_IMPLEMENTATIONS)
PER_ITERATION = [n for n in ROWS if harness.DAML_IMPLEMENTATIONS[n].runner is None]


@pytest.mark.parametrize("changes", [dict(), dict(activation="tanh", loss="mse", adapt_loss="mse"),
                                     dict(optimizer="adam", outer_lr=1e-3)],
                         ids=["relu-l1", "tanh-mse", "adam"])
def test_rows_agree_and_step_alike(changes):
    w = tiny(**changes)
    batch, weights = harness.make_data(w)
    names = [n for n in ROWS if harness.skip_reason(n, w) is None]
    assert {"reference", "torchfunc"} <= set(names)
    if changes.get("optimizer") == "adam":  # train_chunk times SGD only
        names = [n for n in names if n != "train_chunk"]
    runners = {n: harness.make_runner(n, w, batch, weights) for n in names}
    grads = assert_rows_agree(runners)
    assert grads["reference"].shape == weights.shape
    for n, grad in grads.items():
        assert harness.verify(n, w, grad)["verify_error"] <= harness.VERIFY_TOLERANCE
    assert_steps_agree(runners, [n for n in PER_ITERATION if n in runners])
    if "train_chunk" in runners:  # a chunk of meta-iterations, in place
        r = runners["train_chunk"]
        assert r.iterations == harness.DAML_CHUNK
        assert torch.isfinite(r.weights()).all() and not torch.equal(r.weights(), weights)


def test_a_wrong_daml_meta_gradient_is_not_timed():
    w = tiny()
    _, expected = harness.oracle(w)
    wrong = expected.clone()
    wrong[-1] += 1.0  # the loss network's half is checked too
    with pytest.raises(AssertionError, match="not timed"):
        harness.verify("fused", w, wrong)


@pytest.mark.parametrize("sizes, loss_hidden, activation, loss, adapt_loss, per_step, T", [
    ([1, 32, 32, 1], [32, 32], "relu", "l1", "l1", True, 1),
    ([2, 5, 3], [4], "tanh", "mse", "mse", False, 3),
    ([1, 6, 7, 8, 2], [5, 3], "tanh", "l1", "mse", True, 2),
    ([3, 4, 2], [6, 6], "relu", "mse", "l1", False, 2),
])
def test_torch_func_daml_is_the_reference(sizes, loss_hidden, activation, loss, adapt_loss,
                                          per_step, T):
    loss_sizes = [D.loss_input_width(sizes), *loss_hidden, 1]
    g = torch.Generator().manual_seed(len(sizes) + T)
    weights = init_weights(sizes, loss_sizes, init="torch", generator=g, dtype=torch.float64)
    P, S = pymaml.functional.num_params(sizes), 3
    params, loss_params = weights[:P], weights[P:]
    xs = torch.randn((T, S, 4, sizes[0]) if per_step else (T, 4, sizes[0]), generator=g,
                     dtype=torch.float64)
    xq = torch.randn(T, 5, sizes[0], generator=g, dtype=torch.float64)
    yq = torch.randn(T, 5, sizes[-1], generator=g, dtype=torch.float64)
    hyper = dict(sizes=sizes, loss_sizes=loss_sizes, inner_lr=0.1, steps=S,
                 activation=activation, loss=loss, adapt_loss=adapt_loss)
    meta_loss, adapt = torch_func_daml(**hyper)
    (g_params, g_loss_params), value = torch.func.grad_and_value(meta_loss, argnums=(0, 1))(
        params, loss_params, xs, xq, yq)
    leaves = [params.clone().requires_grad_(), loss_params.clone().requires_grad_()]
    expected = D.reference_loss(*leaves, xs, xq, yq, **hyper)
    want = torch.autograd.grad(expected, leaves)
    assert abs(value.item() - expected.item()) <= 1e-12
    assert relative_error(g_params, want[0]) <= 1e-10
    assert relative_error(g_loss_params, want[1]) <= 1e-10
    del hyper["loss"]
    assert relative_error(adapt(params, loss_params, xs),
                          D.reference_adapt(params, loss_params, xs, **hyper)) <= 1e-12


def entry(w, impl, median, timed="meta-iteration", threads=1, device="cpu"):
    """A daml-section benchmark as pytest-benchmark's JSON writes it."""
    config = dict(dataclasses.asdict(w), sizes=list(w.sizes), loss_sizes=list(w.loss_sizes))
    return dict(group=f"daml: {w.label()} {w.order} order", name=f"test[{impl}]",
                stats=dict(median=median),
                extra_info=dict(section="daml", impl=impl, device=device, threads=threads,
                                timed=timed, config=config, workload=w.label(), order=w.order,
                                flops=daml_meta_iteration_flops(w)))


def table_of(benchmarks):
    return report.format_report(dict(machine_info=dict(cpu=dict(brand_raw="CPU", count=2)),
                                     datetime="now", benchmarks=benchmarks,
                                     matmul_gflops=dict(cpu=100.0)))


def test_report_marks_the_issue_15_target():
    t25 = D1.replace(T=25)
    chunk = entry(D1, "train_chunk", 100 * 40e-6)
    chunk["extra_info"]["iterations"] = 100
    benchmarks = [entry(D1, "fused", 200e-6), entry(D1, "fused_op", 120e-6),
                  entry(D1, "fused_op", 95e-6, timed="meta-gradient"), chunk,
                  entry(D1, "reference", 5e-3), entry(D1, "torchfunc", 16e-3),
                  entry(t25, "fused", 1.8e-3), entry(t25, "reference", 120e-3)]
    table = table_of(benchmarks)
    targets = table.split("== targets")[1]
    assert "fused DAML meta-step (D1) >= 30x faster than the reference: MISS (25.00x)" in targets
    assert targets.count("pass") + targets.count("MISS") == 1  # D1 only, not T=25
    assert "== daml: D1 2nd order" in table and "== daml: D1 T=25 2nd order" in table
    assert "fused_op, no step" in table
    chunk_line = next(line for line in table.splitlines() if line.startswith("train_chunk"))
    assert "40.0 us" in chunk_line and "0.20x" in chunk_line  # per iteration
    faster = table_of([entry(D1, "fused", 100e-6), entry(D1, "reference", 5e-3)])
    assert "faster than the reference: pass (50.00x)" in faster


def test_report_reads_daml_rows():
    assert report.workload(entry(D1, "fused", 1e-4)["extra_info"]) == D1
