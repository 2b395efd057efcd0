"""``moat run faults``, short (issue 13 item 8): a backbone link down and up, a make-before-break
move whose state transfer is cut, and kill -9 of the FOA's agent, each while co14 sends 200
requests/s to the counter away from home. Each fault must run, recover and leave the counter
exact; the measurements must be real (requests sent and answered around each fault)."""

from __future__ import annotations

import json
from pathlib import Path

from experiments.faults.catalog import SHORT
from experiments.faults.driver import build_parser, run
from experiments.faults.report import check_summary


def test_short_fault_experiment(tmp_path: Path) -> None:
    args = build_parser().parse_args(["--short", "--settle", "6", "--out", str(tmp_path)])
    summary = check_summary(run(args))
    rows = {r["name"]: r for r in summary["rows"]}
    assert list(rows) == list(SHORT)
    for row in summary["rows"]:
        # Not vacuous: the fault was made, with load before and after it.
        assert row["status"] == "ran", (row["name"], row["note"])
        assert row["served_before"] and row["sent"] > 200 * 6, row
    for name in ("cut_transfer_mbb", "kill_foa"):
        row = rows[name]
        assert row["holds"], (name, row["recovered"], row["exact"], row["note"])
    # The link was down 2 s: requests in between were lost, so recovery is not 0.
    link = rows["link_r22a_r18a"]
    assert link["lost"] > 0, link
    assert rows["cut_transfer_mbb"]["detail"]["move"]["ok"] is False
    assert "injected fault" in rows["cut_transfer_mbb"]["detail"]["move"]["error"]
    assert rows["kill_foa"]["detail"]["agent_back"] is True, rows["kill_foa"]
    assert summary["final"]["exact"] and summary["final"]["answered"] > 0
    dest = Path(summary["dir"])
    assert json.loads((dest / "summary.json").read_text())["run_id"] == summary["run_id"]
    assert (dest / "rows.csv").read_text().count("\n") == len(SHORT) + 1
    assert (dest / "timeline.png").stat().st_size > 10_000
    # The static-routes role puts the link's routes back as it comes up: the row holds.
    assert link["holds"], (link["recovered"], link["note"], link["detail"].get("routes_missing_after_up"))
    assert link["recovery_s"] >= 2.0, link
    assert summary["holds"], summary["failed"]
