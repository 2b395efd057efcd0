"""The fault experiment's rows, summary schema, table and catalog (experiments/faults/):
a row holds only when it ran, recovered with one instance and stayed exact, and the summary's
verdicts and recovery median/worst are computed from its rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments.faults import catalog
from experiments.faults.report import (ROW_COLUMNS, SummaryError, build_summary, check_summary,
                                        make_row, not_run_row, plot, table)
from experiments.faults.timeline import Request, WindowResult

FAULT = catalog.by_name("kill_foa")


def window(recovered: bool = True, recovery: float | None = 1.2, lost: int = 240) -> WindowResult:
    return WindowResult(sent=2000, answered=2000 - lost, lost=lost, lost_after_fault=lost,
                        lost_window=lost, recovered=recovered, recovery_s=recovery if recovered else None,
                        served_before=True, last_lost_s=1.1 if lost else None)


EXACT = {"exact": True, "duplicates": 0}


def summary_of(rows: list[dict], final_exact: bool = True) -> dict:
    return build_summary("r1", rows, {"exact": final_exact}, variant="full", rate=200.0,
                         measured_at="2026-12-02T02:00:00+00:00", duration_s=12.34)


def test_a_recovered_exact_row_holds() -> None:
    row = make_row(FAULT, window(), EXACT, fault_at=1.0, victim="r18a", agent_restarts=1, instances=1)
    assert row["holds"] and row["recovery_s"] == 1.2 and row["mechanism"] is None
    assert set(ROW_COLUMNS) <= set(row)


@pytest.mark.parametrize("change", [
    dict(result=window(recovered=False)),
    dict(state={"exact": False, "duplicates": 3}),
    dict(instances=2),
    dict(instances=0),
    dict(repaired="r18a's agent started again by the driver"),
])
def test_a_row_does_not_hold_without_each_part(change: dict) -> None:
    args = dict(result=window(), state=EXACT, instances=1, repaired="")
    args.update(change)
    row = make_row(FAULT, args["result"], args["state"], fault_at=1.0, instances=args["instances"],
                   repaired=args["repaired"])
    assert not row["holds"] and row["mechanism"] == FAULT.mechanism
    check_summary(summary_of([row]))  # consistent even so


def test_not_run_rows_do_not_hold_and_say_why() -> None:
    row = not_run_row(catalog.by_name("upgrade_site_down"), "no upgrade step")
    assert row["status"] == "not run" and not row["holds"] and row["note"] == "no upgrade step"
    s = summary_of([row])
    assert s["not_run"] == ["upgrade_site_down"] and not s["holds"]


def test_summary_median_and_worst_over_recovered_rows() -> None:
    rows = [make_row(FAULT, window(recovery=t), EXACT, fault_at=1.0, instances=1) for t in (0.5, 2.0, 1.0)]
    rows.append(make_row(FAULT, window(recovered=False), EXACT, fault_at=1.0, instances=1))
    s = check_summary(summary_of(rows))
    assert (s["recovery_s_median"], s["recovery_s_worst"]) == (1.0, 2.0)
    assert not s["holds"] and len(s["failed"]) == 1
    json.dumps(s)  # summary.json is plain JSON


def test_summary_holds_only_with_the_final_state_exact() -> None:
    rows = [make_row(FAULT, window(), EXACT, fault_at=1.0, instances=1)]
    assert check_summary(summary_of(rows))["holds"]
    assert not check_summary(summary_of(rows, final_exact=False))["holds"]


def test_check_summary_refuses_verdicts_that_disagree() -> None:
    rows = [make_row(FAULT, window(recovered=False), EXACT, fault_at=1.0, instances=1)]
    s = summary_of(rows)
    with pytest.raises(SummaryError, match="holds disagrees with its parts"):
        check_summary(dict(s, rows=[dict(rows[0], holds=True)]))
    with pytest.raises(SummaryError, match="summary holds"):
        check_summary(dict(s, holds=True))
    with pytest.raises(SummaryError, match="median"):
        check_summary(dict(s, recovery_s_worst=0.1))
    with pytest.raises(SummaryError, match="lacks"):
        check_summary({k: v for k, v in s.items() if k != "final"})
    with pytest.raises(SummaryError, match="no rows"):
        check_summary(dict(s, rows=[]))


def test_table_shows_every_row() -> None:
    rows = [make_row(FAULT, window(), EXACT, fault_at=1.0, instances=1, agent_restarts=1),
            not_run_row(catalog.by_name("upgrade_site_down"), "x" * 200)]
    text = table(rows)
    lines = text.splitlines()
    assert len(lines) == 4 and "kill_foa" in lines[2] and "240/2000" in lines[2]
    assert "not run" in lines[3] and "…" in lines[3]


def test_plot_writes_a_timeline(tmp_path: Path) -> None:
    reqs = [Request("w", i, 100 + i / 200, None if 200 <= i < 300 else 100 + i / 200 + 0.002, (i,))
            for i in range(600)]
    row = make_row(FAULT, window(), EXACT, fault_at=101.0, instances=1)
    out = plot(reqs, [row], tmp_path)
    assert out.name == "timeline.png" and out.stat().st_size > 10_000


def test_catalog_names_are_unique_and_short_is_a_subset() -> None:
    assert len(set(catalog.ORDER)) == len(catalog.ORDER)
    assert set(catalog.SHORT) <= set(catalog.ORDER)
    kinds = {f.kind for f in catalog.FAULTS}
    assert kinds == {"kill", "link", "inject", "migration_crash", "upgrade"}
    for f in catalog.FAULTS:
        assert f.mechanism and f.description
        if f.kind == "migration_crash":
            assert f.victim in ("source", "target") and f.mode in (catalog.MBB, catalog.BBM)
            assert f.point.startswith(f.victim + "_after_"), f.name
    with pytest.raises(catalog.UnknownFault):
        catalog.by_name("nosuch")


def test_migration_faults_name_the_roles_points_and_step_lines() -> None:
    """A crash row arms one of the migration role's crash points, an inject row its refuse or
    cut points; where the role lacks a point, the kill is timed by the source's step log
    line, so each marker must begin a step the role reports, or the fault would never fire."""
    from agent.hosting import migration

    source = Path(migration.__file__).read_text()
    for f in catalog.FAULTS:
        if f.kind == "migration_crash":
            assert f.point in migration.CRASH_POINTS, f.name
            if f.marker:
                assert f'report.step("{f.marker}' in source, f.name
        if f.kind == "inject":
            for point in f.point.split("+"):
                assert point in migration.FAULT_POINTS, (f.name, point)
