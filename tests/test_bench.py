"""The benchmark suite's own logic (benchmarks/): the flop count, every registered
implementation agreeing with the reference and stepping alike, the check that keeps a wrong
implementation from being timed, the caps, the memory script's fresh-process measurement, and
the report script's table, targets and figure (on a pytest-benchmark JSON written here). The
timings themselves are `pytest benchmarks`."""

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

import pymaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import harness  # noqa: E402
from conftest import assert_rows_agree, assert_steps_agree  # noqa: E402
import memory  # noqa: E402
import report  # noqa: E402
from workloads import W1, W2, meta_iteration_flops  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
AVAILABLE = [n for n in harness.IMPLEMENTATIONS if harness.skip_reason(n, W1) is None]


def tiny(**changes):
    return W2.replace(**dict(dict(sizes=(1, 8, 8, 1), K=4, Q=3, S=2, T=3), **changes))


def test_flops_by_hand():
    # W1: P_w = 1*32 + 32*32 + 32*1 = 1088; 6 * 1088 * (3*5*4 + 4) = 417,792 per meta-iteration.
    assert meta_iteration_flops(W1) == 417_792
    assert meta_iteration_flops(W1.replace(first_order=True)) == 6 * 1088 * (5 * 4 + 4)
    # W2: P_w = 40 + 1600 + 40 = 1680; 25 tasks * 6 * 1680 * (3*5*10 + 10) = 40,320,000.
    assert meta_iteration_flops(W2) == 40_320_000
    # Unequal widths, biases ignored: P_w = 3*5 + 5*2 = 25; T=2, S=1, K=2, Q=3.
    w = W2.replace(sizes=(3, 5, 2), S=1, T=2, K=2, Q=3)
    assert meta_iteration_flops(w) == 2 * 6 * 25 * (3 * 2 + 3) == 2700
    assert meta_iteration_flops(w.replace(first_order=True)) == 2 * 6 * 25 * (2 + 3) == 1500


def test_labels_name_what_differs():
    assert W2.label() == "W2"
    assert W2.replace(S=1).label() == "W2 S=1"
    assert W2.replace(sizes=(1, 128, 128, 1), T=64).label() == "W2 w=128 T=64"
    assert W2.replace(T=64, first_order=True).test_id() == "W2-T64-1st"


@pytest.mark.parametrize("activation, loss", [("relu", "mse"), ("tanh", "l1")])
@pytest.mark.parametrize("first_order", [False, True])
def test_implementations_agree_and_step_alike(first_order, activation, loss):
    w = tiny(first_order=first_order, activation=activation, loss=loss)
    batch, params = harness.make_data(w)
    runners = {n: harness.make_runner(n, w, batch, params) for n in AVAILABLE}
    assert_rows_agree(runners)
    assert_steps_agree(runners, list(runners))
    assert not torch.equal(runners["reference"].weights(), params)


@pytest.mark.parametrize("name", AVAILABLE)
def test_every_implementation_honours_first_order(name):
    batch, params = harness.make_data(tiny())
    second = harness.make_runner(name, tiny(), batch, params).meta_grad()[1]
    first = harness.make_runner(name, tiny(first_order=True), batch, params).meta_grad()[1]
    assert (second - first).abs().max() > 1e-4


def test_a_wrong_meta_gradient_is_not_timed():
    w = tiny()
    _, expected = harness.oracle(w)
    assert harness.verify("torchfunc", w, expected * (1 + 1e-6))["verified_against"] == "reference"
    with pytest.raises(AssertionError, match="differs from reference's by .*not timed"):
        harness.verify("torchfunc", w, expected + 1e-2)
    with pytest.raises(AssertionError, match="nan"):
        harness.verify("torchfunc", w, expected * float("nan"))


def test_caps_skip_what_would_take_seconds(monkeypatch):
    big = W2.replace(T=4096)
    assert "over reference's 1 GFLOP cap" in harness.skip_reason("reference", big)
    assert harness.skip_reason("torchfunc", big) is None
    # Where the reference is over its cap, torch.func is the oracle.
    reference = harness.IMPLEMENTATIONS["reference"]
    monkeypatch.setitem(harness.IMPLEMENTATIONS, "reference",
                        reference._replace(max_gflop={"cpu": 0.0}))
    w = tiny(T=2)
    try:
        assert harness.oracle(w)[0] == "torchfunc"
    finally:
        harness.oracle.cache_clear()


def bench_entry(group, impl, median, config=None, **info):
    """A benchmark as pytest-benchmark's JSON writes it."""
    extra = dict(dict(section=group.split(":")[0], impl=impl, device="cpu", threads=1,
                      timed="meta-iteration"), **info)
    if config:
        extra.update(config=dataclasses.asdict(config), workload=config.label(),
                     order=config.order, flops=meta_iteration_flops(config))
    return dict(group=group, name=f"test[{impl}]", extra_info=extra, stats=dict(median=median))


def fake_report():
    w2, w2t = W2, W2.replace(T=64)
    core, sweep = "core: W2 2nd order", "T: W2 T=64 2nd order"
    benchmarks = [
        bench_entry(core, "fused", 1e-3, w2, verified_against="reference", verify_error=3e-7),
        bench_entry(core, "reference", 50e-3, w2, verified_against=None, verify_error=0.0),
        bench_entry(sweep, "fused", 2e-3, w2t), bench_entry(sweep, "torchfunc", 40e-3, w2t),
        bench_entry("threads: W2 2nd order", "fused", 1.5e-3, w2),
        bench_entry("threads: W2 2nd order", "fused", 0.5e-3, w2, threads=2),
        bench_entry("train: W1", "pymaml.train chunked", 30e-3, iterations=2000, workload="W1"),
        bench_entry("cuda: W2 T=4096", "fused", 1e-3, w2.replace(T=4096), timed="meta-gradient",
                    device="cuda"),
        bench_entry("cuda: W2 T=4096", "torchfunc", 10e-3, w2.replace(T=4096),
                    timed="meta-gradient", device="cuda"),
    ]
    return dict(machine_info=dict(cpu=dict(brand_raw="CPU", count=2)), datetime="now",
                benchmarks=benchmarks, matmul_gflops=dict(cpu=100.0, cuda=20_000.0))


def test_report_table_ratios_rates_and_targets():
    table = report.format_report(fake_report())
    lines = {line.split("  ")[0].strip() + (" 2" if "thr 2" in line else ""): line
             for line in table.splitlines() if "thr " in line}
    assert "50.00x" in lines["reference"] and "oracle" in table
    assert "40.32 GFLOP/s  40.3 %mm" in table and "check 3e-07 vs reference" in table
    assert "fused W2 <= 600.0 us: MISS (1 ms)" in table
    assert "3.00x/1thr" in lines["fused 2"] and "2 threads >= 1.7x one: pass (3.00x)" in table
    # a train() call of 2000 iterations: the time per iteration
    assert "15.0 us" in lines["pymaml.train chunked"] and "<= 20.0 us/iteration: pass" in table
    # on the GPU: 10x torch.func (target 20x) at 33.0 % of the matmul rate (target 25 %)
    assert "4.096e+06 tasks/s" in table
    assert "on CUDA >= 20x torch.func and >= 25 % of the matmul rate: MISS (10.00x, 33.0 %)" in table


def test_report_speedups_read_w2_rows_against_the_fused_row():
    # torch.func at T=64, against fused at T=64; the reference at T=25 (core), against core's
    # fused row, not the threads section's of the same workload.
    assert report.speedups(fake_report(), "T") == {(1, "reference", "2nd"): [(25, 50.0)],
                                                   (2, "torchfunc", "2nd"): [(64, 20.0)]}
    assert report.speedups(fake_report(), "S") == {(1, "reference", "2nd"): [(5, 50.0)]}


def test_report_cli_writes_the_figure(tmp_path, capsys):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(fake_report()))
    assert report.main([str(path), "--plot", str(tmp_path / "bench.png")]) == 0
    assert "== targets" in capsys.readouterr().out
    assert (tmp_path / "bench.png").read_bytes()[:8] == PNG_SIGNATURE


def test_memory_sees_the_reference_keep_its_graphs():
    # Fresh processes: the reference keeps every task's double-backward graph, well above
    # setup; the fused op keeps none.
    ref = memory.measure("reference", 5, 1)
    assert ref["increase_mb"] > 1.0 and ref["peak_mb"] >= ref["baseline_mb"] > 0
    if pymaml.fused_available():
        assert 0 <= memory.measure("fused", 5, 1)["increase_mb"] < ref["increase_mb"]


@pytest.mark.skipif(not pymaml.fused_available(), reason="pymaml._C is not built")
def test_fused_rows_are_registered():
    assert {"fused", "fused_op", "reference", "torchfunc"} <= set(AVAILABLE)
