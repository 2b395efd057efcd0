"""``moat bench peer``: its arguments, its figures, and one short run on loopback (no root)."""

from __future__ import annotations

import json

import pytest

from experiments import bench_peer as bp


@pytest.mark.parametrize("argv", [["--calls", "0"], ["--calls", "1000000"], ["--block", "0"],
                                  ["--calls", "5", "--block", "6"], ["--body-bytes", "10"]])
def test_out_of_bounds_arguments_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        bp.parse_args(argv)


@pytest.mark.parametrize("size", [300, 1500, 20000])
def test_the_commit_body_is_a_pre_copy_commit_of_about_the_size_asked(size: int) -> None:
    body = bp.commit_body(size)
    assert body["action"] == "commit" and body["delta"] is True
    assert set(body["state"]) == {"patch", "digest"}
    length = len(json.dumps(body, separators=(",", ":")))
    assert size - 40 <= length <= size


def test_stats_and_ratio() -> None:
    assert bp.stats([]) == {"n": 0, "p50_us": None, "p95_us": None}
    s = bp.stats([i / 1e6 for i in range(1, 101)])
    assert s["n"] == 100 and s["p50_us"] == 50.5 and s["p95_us"] == 95.0
    assert bp.ratio(300.0, 100.0) == 3.0 and bp.ratio(None, 1.0) is None and bp.ratio(1.0, 0) is None


def test_a_short_run_measures_every_path_against_a_real_server() -> None:
    summary = bp.run(bp.parse_args(["--calls", "4", "--block", "2", "--body-bytes", "1200"]))
    assert [row["path"] for row in summary["paths"]] == list(bp.PATHS)
    assert all(row["calls"] == 4 and row["p50_us"] > 0 for row in summary["paths"])
    assert summary["ratio_old_over_new_p50"] is not None
    # the kept paths reused one connection; the others opened one per call
    assert summary["pool"]["opened"] == 1 and summary["pool"]["reused"] >= 2 * 4 + 4
    parts = {row["part"]: row for row in summary["parts"]}
    assert parts["transport floor (unsigned, refused, kept connection)"]["n"] == 4
    assert summary["frame_bytes"] > 1200
