"""``moat run attacks``, short: a few classes and 1,000 fuzzed messages from att12 (issue 12
item 11). Each class must hold, and the suite must be able to see an acceptance."""

from __future__ import annotations

from experiments.attacks.catalog import SHORT
from experiments.attacks.driver import main, run
from experiments.attacks.report import check_summary


def test_short_attack_suite(tmp_path) -> None:
    import argparse

    args = argparse.Namespace(classes=None, short=True, fuzz=1000, flood_scale=0.1, out=tmp_path)
    summary = check_summary(run(args))
    rows = {r["name"]: r for r in summary["rows"]}
    assert sorted(rows) == sorted(SHORT)
    base = summary["baseline"]
    # Not vacuous: real traffic was captured, an authentic message from att12 is accepted,
    # and each class sent something.
    assert base["positive_control"] is True, base
    assert base["captured_rrq"] > 0 and base["captured_relayed"] > 0, base
    assert base["traffic"]["migrate_r22c"] and base["traffic"]["migrate_r18b"], base
    assert rows["fuzz"]["detail"]["fuzz"]["sent"] >= 900, rows["fuzz"]["detail"]
    assert rows["wire_secrets"]["detail"]["keys"] and rows["wire_secrets"]["detail"]["captures"]
    assert rows["registration_replay"]["detail"]["hoa_answers"], rows["registration_replay"]
    for row in summary["rows"]:
        assert row["rss_before_kib"] and row["rss_after_kib"], row
        assert row["holds"], (row["name"], row["observed"], row["detail"].get("changes"))
    assert (tmp_path / "attacks" / summary["run_id"] / "summary.json").stat().st_size > 0


def test_unknown_class_is_refused_before_any_network() -> None:
    import pytest

    with pytest.raises(SystemExit):
        main(["--classes", "nosuch"])
