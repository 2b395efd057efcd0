"""experiments.bench_registration's pure helpers (no root): percentiles, latency summaries,
/proc parsing from fake files, per-phase CPU rows, the load generator's answer reduced."""

from __future__ import annotations

import os

import pytest

from experiments import bench_registration as br
from experiments.bench_tunnel import BenchError

# A real /proc/<pid>/stat line of a Python agent (comm with a space and a parenthesis to
# check the fields are counted from the last ')'); utime 250, stime 50.
STAT = ("4242 (python -m (x)) S 4200 4242 4242 0 -1 4194560 5000 0 0 0 250 50 0 0 20 0 3 0 "
        "123456 200000000 6000 18446744073709551615 1 1 0 0 0 0 0 16781312 16386 0 0 0 17 1 0 0 0 0 0")

STATUS = """Name:\tpython
Umask:\t0022
State:\tS (sleeping)
Pid:\t4242
VmPeak:\t  300000 kB
VmSize:\t  280000 kB
VmHWM:\t   40960 kB
VmRSS:\t   30720 kB
Threads:\t3
"""


def test_percentile_interpolates_between_ranks():
    values = [4.0, 1.0, 3.0, 2.0]  # unsorted on purpose
    assert br.percentile(values, 0) == 1.0
    assert br.percentile(values, 100) == 4.0
    assert br.percentile(values, 50) == pytest.approx(2.5)
    assert br.percentile(values, 25) == pytest.approx(1.75)  # rank 0.75
    assert br.percentile(list(range(1, 101)), 99) == pytest.approx(99.01)


def test_percentile_single_value_and_errors():
    assert br.percentile([7.5], 99) == 7.5
    with pytest.raises(ValueError):
        br.percentile([], 50)
    with pytest.raises(ValueError):
        br.percentile([1.0], 101)
    with pytest.raises(ValueError):
        br.percentile([1.0], -1)


def test_percentile_matches_numpy():
    np = pytest.importorskip("numpy")
    values = [0.3, 1.7, 0.2, 5.5, 2.25, 0.9, 3.1]
    for p in (1, 10, 50, 90, 99):
        assert br.percentile(values, p) == pytest.approx(float(np.percentile(values, p)))


def test_latency_stats_in_milliseconds():
    stats = br.latency_stats([0.001, 0.002, 0.003])
    assert stats == {"n": 3, "min_ms": 1.0, "mean_ms": 2.0, "p50_ms": 2.0, "p99_ms": 2.98,
                     "max_ms": 3.0}
    empty = br.latency_stats([])
    assert empty["n"] == 0 and empty["p50_ms"] is None and empty["max_ms"] is None


def test_parse_proc_status_rss_and_hwm():
    assert br.parse_proc_status(STATUS) == {"rss_mib": 30.0, "hwm_mib": 40.0}
    assert br.parse_proc_status("Name:\tkthreadd\n") == {"rss_mib": None, "hwm_mib": None}
    with pytest.raises(BenchError):
        br.parse_proc_status("VmRSS:\t12 MB\n")


def test_read_proc_from_fake_root(tmp_path):
    pid_dir = tmp_path / "4242"
    pid_dir.mkdir()
    (pid_dir / "stat").write_text(STAT)
    (pid_dir / "status").write_text(STATUS)
    snap = br.read_proc(4242, proc_root=tmp_path)
    assert snap["cpu_s"] == pytest.approx(300 / os.sysconf("SC_CLK_TCK"))
    assert snap["rss_mib"] == 30.0 and snap["hwm_mib"] == 40.0
    with pytest.raises(BenchError, match="pid 99"):
        br.read_proc(99, proc_root=tmp_path)


def test_phase_rows_cpu_share_of_one_core():
    before = {"r22b": {"cpu_s": 1.0}, "r18a": {"cpu_s": 2.0}}
    after = {"r22b": {"cpu_s": 1.5, "rss_mib": 30.0, "hwm_mib": 31.0},
             "r18a": {"cpu_s": 2.0, "rss_mib": 28.0, "hwm_mib": 28.5}}
    rows = br.phase_rows("load", 2.0, before, after, {"r22b": 10, "r18a": 11},
                         {"r22b": "home", "r18a": "foreign"})
    assert rows[0] == {"phase": "load", "router": "r22b", "role": "home", "pid": 10, "wall_s": 2.0,
                       "cpu_s": 0.5, "cpu_pct": 25.0, "rss_mib": 30.0, "hwm_mib": 31.0}
    assert rows[1]["cpu_s"] == 0.0 and rows[1]["cpu_pct"] == 0.0


def test_summarize_load_splits_denials_by_code():
    result = {"sent": 1100, "replies": 1000, "accepted": 990, "timeouts": 3, "late_replies": 32,
              "late_timeouts": 0, "bad_auth": 0, "unmatched": 0, "icmp_errors": 0,
              "codes": {"0 ACCEPTED": 990, "133 HA_IDENTIFICATION_MISMATCH": 10},
              "elapsed": 2.0, "window": 32, "replies_per_s": 500.0, "accepted_per_s": 495.0,
              "latencies": [0.001] * 1000, "generator_cpu_s": 0.5, "request_bytes": 120}
    load = br.summarize_load(result)
    assert load["denied"] == 10
    assert load["denied_by_code"] == {"133 HA_IDENTIFICATION_MISMATCH": 10}
    assert load["replies_per_s"] == 500.0 and load["accepted_per_s"] == 495.0
    assert load["late"] == 32 and load["p50_ms"] == 1.0
    assert load["generator_cpu_pct"] == 25.0


def test_load_cpu_needs_every_pid():
    pids = {"r22b": 10, "r18a": 11}
    assert br.load_cpu({"pid_cpu": {"10": [1.0, 2.0], "11": [3.0, 3.5]}}, pids) == {
        "r22b": (1.0, 2.0), "r18a": (3.0, 3.5)}
    assert br.load_cpu({"pid_cpu": {"10": [1.0, 2.0], "11": [None, 3.5]}}, pids) is None
    assert br.load_cpu({}, pids) is None


def test_rtt_summary_counts_only_accepted_via_the_foa():
    samples = [{"rtt": 0.002, "call": 0.003, "code": 0, "agent": "10.12.0.1"},
               {"rtt": 0.004, "call": 0.005, "code": 0, "agent": "10.12.0.1"},
               {"rtt": 0.001, "call": 0.002, "code": 0, "agent": "10.12.0.2"},
               {"rtt": None, "call": 3.0, "code": None, "agent": "10.12.0.1"}]
    out = br.rtt_summary(samples, "10.12.0.1")
    assert out["n"] == 2 and out["rounds"] == 4 and out["failed"] == 2 and out["other_agent"] == 1
    assert out["p50_ms"] == 3.0 and out["call_p50_ms"] == 4.0


def test_check_args_bounds():
    args = br.build_parser().parse_args([])
    assert br.check_args(args) is None
    assert (args.rounds, args.duration, args.window, args.adv_interval) == (200, 5.0, 32, 1.0)
    for bad in (["--rounds", "0"], ["--duration", "0"], ["--duration", "61"], ["--window", "0"],
                ["--adv-interval", "0"], ["--idle", "0"]):
        assert br.check_args(br.build_parser().parse_args(bad)) is not None, bad


def test_main_refuses_bad_arguments_without_root(capsys):
    assert br.main(["--rounds", "0"]) == 2
    assert "--rounds" in capsys.readouterr().err


def test_main_needs_root(monkeypatch, capsys):
    monkeypatch.setattr(br.os, "geteuid", lambda: 1000)
    assert br.main([]) == 1
    assert "root" in capsys.readouterr().err


def test_print_report_renders_every_section():
    import io

    args = br.build_parser().parse_args(["--rounds", "10", "--duration", "1"])
    env = {"cpu": "Test CPU", "cpus": 2, "kernel": "6.0", "python": "CPython 3.11", "clk_tck": 100}
    rows = br.phase_rows("rtt", 0.05, {"r22b": {"cpu_s": 0.0}}, {"r22b": {"cpu_s": 0.01}},
                         {"r22b": 10}, {"r22b": "home"})
    load = br.summarize_load({"sent": 10, "replies": 10, "accepted": 9, "elapsed": 1.0,
                              "codes": {"0 ACCEPTED": 9, "133 HA_IDENTIFICATION_MISMATCH": 1},
                              "latencies": [0.001] * 10, "window": 32})
    load.update(generator_node="r22a", foa_identity="r20a", hoa="10.16.0.2", hoa_stats_delta={})
    summary = {"run_id": "x", "method": br.method(args, env), "dest": "results/x",
               "rtt": br.rtt_summary([{"rtt": 0.001, "call": 0.002, "code": 0, "agent": "a"}], "a"),
               "load": load, "agents_usage": rows}
    out = io.StringIO()
    br.print_report(summary, out)
    text = out.getvalue()
    assert "Registration round trip" in text and "p99_ms" in text
    assert "133 HA_IDENTIFICATION_MISMATCH: 1" in text
    assert "rtt phase lasted under 1 s" in text
    assert "advertisement interval 1 s" in text and "Test CPU" in text
