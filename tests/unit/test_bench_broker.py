"""``moat bench broker``'s argument bounds and figures (no root, no network)."""

from __future__ import annotations

import pytest

from experiments import bench_broker as bb


def test_defaults_are_short() -> None:
    args = bb.parse_args([])
    assert (args.seconds, args.runs) == (bb.DEFAULT_SECONDS, bb.DEFAULT_RUNS)
    assert 2 * args.seconds + args.runs * 0.05 < 30


@pytest.mark.parametrize("argv", [["--seconds", "0"], ["--seconds", "61"], ["--runs", "0"],
                                  ["--runs", "100000"]])
def test_out_of_bounds_arguments_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        bb.parse_args(argv)


def test_rates_ratios_and_latency() -> None:
    assert bb.rate(300, 2.0) == 150.0 and bb.rate(5, 0.0) == 0.0
    assert bb.ratio(2.0, 4.0) == 0.5 and bb.ratio(None, 1.0) is None and bb.ratio(1.0, 0) is None
    assert bb.latency([]) == {"n": 0, "p50_ms": None, "p95_ms": None}
    stats = bb.latency([float(i) for i in range(1, 101)])
    assert stats["p50_ms"] == 50.5 and stats["p95_ms"] == 95.05


def test_figures_sit_beside_their_baselines() -> None:
    summary = {"network": {"requests_per_s": 200.0, "renewals_per_s": 800.0,
                           "path": {"p50_ms": 3.0, "p95_ms": 4.0},
                           "direct": {"p50_ms": 1.0, "p95_ms": 2.0}},
               "in_process": {"requests_per_s": 10000.0, "renewals_per_s": 40000.0}}
    rows = bb.figure_rows(summary)
    assert [r["ratio"] for r in rows] == [0.02, 0.02, 3.0, 2.0]
    assert all(set(bb.FIGURE_COLUMNS) <= set(r) for r in rows)


def test_timed_loop_is_bounded_by_time() -> None:
    calls = []
    count, seconds = bb.timed_loop(0.05, lambda: calls.append(1))
    assert count == len(calls) > 0 and 0.05 <= seconds < 1.0


def test_the_in_process_baseline_runs_on_the_broker_facade() -> None:
    instances = [{"service": "text2html", "instance_id": "r22a/text2html@1",
                  "address": "10.16.0.1", "port": 5101, "router": "r22a", "share": 100.0,
                  "cpu": 1.0, "consumes": "text", "produces": "html", "used_share": 0,
                  "lifecycle": {"max_duration_s": None, "uptime_s": 1.0, "remaining_s": None}}]
    out = bb.in_process(0.05, instances)
    assert out["requests"] > 0 and out["renewals"] > 0 and out["requests_per_s"] > 0
