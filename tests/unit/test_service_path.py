"""The service-path experiment's pure parts: its plan, the rows and summary it prints, and
its plots, from fake data (no root, no network)."""

from __future__ import annotations

from pathlib import Path

import pytest

from experiments import service_path as sp


def fake_rows() -> list[dict]:
    granted = dict(outcome="granted", reason=None, granted_s=3.0, rtf_bytes=300, rtf_ok=True,
                   leases=["a", "b"], ended="expired", ended_s=4.0, share=30.0, cpu=0.2,
                   duration=3.0)
    return [
        dict(granted, n=1, t_s=0.0, co="co12", path=sp.HTML_PATH, instances="r22a/x,r22b/y",
             request_ms=4.0, rtf_ms=2.0, ended="cancelled"),
        dict(granted, n=2, t_s=0.8, co="co14", path=sp.WORD_PATH, instances="r22c/x,r22c/y",
             request_ms=6.0, rtf_ms=50.0),
        dict(n=3, t_s=1.6, co="co12-b", share=35.0, cpu=0.2, duration=2.0, outcome="denied",
             reason="no_capacity", path=None, instances=None),
        dict(granted, n=4, t_s=2.7, co="co14-b", path=sp.HTML_PATH, instances="r22a/x,r22b/y",
             request_ms=5.0, rtf_ms=3.0),
    ]


def test_each_cycle_fills_a_path_overflows_to_the_other_is_denied_then_frees() -> None:
    steps = sp.plan_requests(10, seed=3)
    assert [s.n for s in steps] == list(range(1, 11))
    assert [s.kind for s in steps[:5]] == ["big"] * 4 + ["small"]
    first, second = steps[:5], steps[5:]
    assert first[0].cancel_at is not None and first[2].at < first[0].cancel_at < first[3].at
    # a big request cannot sit beside another on one path; a small one fits beside a big one
    assert all(s.share > sp.VM_SHARE / 2 for s in first[:4])
    assert first[3].share + first[4].share <= sp.VM_SHARE
    assert first[3].cpu + first[4].cpu <= sp.VM_CPU
    # the next cycle starts once every lease of this one has ended
    assert second[0].at > max(s.cancel_at or s.at + s.duration for s in first)
    assert {s.co for s in steps} <= set(sp.COS)
    assert sp.plan_requests(10, seed=3) == steps and sp.plan_requests(10, seed=4) != steps


@pytest.mark.parametrize("count", [0, sp.MAX_REQUESTS + 1])
def test_the_plan_is_bounded(count: int) -> None:
    with pytest.raises(ValueError):
        sp.plan_requests(count, 1)


def test_summary_counts_paths_denials_and_medians() -> None:
    summary = sp.summarise(fake_rows())
    assert summary["paths"] == {sp.HTML_PATH: 2, sp.WORD_PATH: 1}
    assert summary["denials"] == {"no_capacity": 1}
    assert (summary["requests"], summary["granted"], summary["denied"]) == (4, 3, 1)
    assert summary["request_ms_median"] == 5.0 and summary["rtf_ms_median"] == 3.0
    assert summary["ended"] == {"cancelled": 1, "expired": 2} and summary["rtf_ok"] is True


def test_the_report_has_a_row_per_request_and_the_summary() -> None:
    rows = fake_rows()
    text = sp.format_report(rows, sp.summarise(rows))
    lines = text.splitlines()
    assert lines[0].split() == sp.REQUEST_COLUMNS
    table = text.split("\n\n")[0].splitlines()[2:]
    assert [line.split()[0] for line in table] == [str(r["n"]) for r in rows]
    assert "denied no_capacity" in text and f"path {sp.WORD_PATH}" in text
    assert "3 granted, 1 denied" in text


def test_samples_and_type_names() -> None:
    services = [{"service": "text2html", "instances": [
        {"instance_id": "r22a/text2html@1", "used_share": 30.0, "share": 50.0,
         "used_cpu": 0.2, "cpu": 0.5, "leases": 1}]}]
    (row,) = sp.sample_rows(1.23456, services)
    assert row["t_s"] == 1.235 and row["used_share"] == 30.0 and row["service"] == "text2html"
    assert sp.type_names(["3", "3,6", "13", "x"]) == {"broker_advert": 1, "lease_cancel": 1,
                                                      "lease_request": 2, "x": 1}


def test_the_plots_write_pngs(tmp_path: Path) -> None:
    rows = fake_rows()
    samples = [dict(r, t_s=t) for t in (0.0, 1.0, 2.0) for r in (
        {"instance": "r22a/text2html@1", "service": "text2html", "used_share": 30.0 * t,
         "share": 50.0},
        {"instance": "r22c/word2rtf@1", "service": "word2rtf", "used_share": 10.0,
         "share": 50.0})]
    for path in (sp.plot_paths(rows, tmp_path), sp.plot_shares(samples, rows, tmp_path)):
        assert path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
