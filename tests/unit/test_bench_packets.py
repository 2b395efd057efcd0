"""experiments.bench_packets runs and reports positive rates (behaviour, not speed)."""

from __future__ import annotations

import json
import re

import pytest

from experiments import bench_packets

OPERATIONS = ["encode", "decode", "encode+hmac", "decode+verify"]


def test_table_output_has_positive_rates(capsys):
    assert bench_packets.main(["--iterations", "10", "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    assert "perf_counter" in out and "10 calls" in out and "repeated 2 times" in out
    assert "python" in out and "cpu" in out
    for op in OPERATIONS:
        match = re.search(rf"^\s+{re.escape(op)}\s+([\d,]+)\s+([\d,]+)\s+([\d.]+)$", out, re.M)
        assert match, (op, out)
        best, median = (float(g.replace(",", "")) for g in match.groups()[:2])
        assert best > 0 and median > 0 and best >= median


def test_json_output(capsys):
    assert bench_packets.main(["--iterations", "10", "--repeats", "3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["iterations"] == 10 and report["repeats"] == 3
    assert report["message_bytes"] > 24 + 2 * 38
    assert report["cpu"] and report["python"]
    assert [r["operation"] for r in report["results"]] == OPERATIONS
    for r in report["results"]:
        assert len(r["rates_per_s"]) == 3
        assert all(rate > 0 for rate in r["rates_per_s"])
        assert r["best_per_s"] == max(r["rates_per_s"])
        assert 0 < r["median_per_s"] <= r["best_per_s"]


def test_bad_iterations_refused():
    with pytest.raises(SystemExit):
        bench_packets.main(["--iterations", "0"])
