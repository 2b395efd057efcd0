"""A row per fault, the run's summary (summary.json), rows.csv, the printed table and the
timeline plot. Pure but for the plot's file.

A row ``holds`` only if the fault ran, service recovered and the counter stayed exact: it is
computed from those, never given. A fault that could not be run has ``status`` "not run" and
its reason; it does not hold (the experiment exits non-zero until it runs and recovers).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Iterable

from .catalog import Fault

__all__ = ["SummaryError", "make_row", "not_run_row", "build_summary", "check_summary",
           "table", "plot", "ROW_COLUMNS", "SUMMARY_KEYS"]

ROW_COLUMNS = ["name", "kind", "status", "holds", "recovered", "recovery_s", "lost", "sent",
               "exact", "duplicates", "victim", "agent_restarts", "instances", "repaired",
               "mechanism", "note"]
SUMMARY_KEYS = ("experiment", "run_id", "measured_at", "variant", "rate", "rows", "holds",
                "recovered", "failed", "not_run", "recovery_s_median", "recovery_s_worst",
                "final", "duration_s")


class SummaryError(ValueError):
    """A summary that does not have the schema of :data:`SUMMARY_KEYS` / :data:`ROW_COLUMNS`."""


def make_row(fault: Fault, window: Any, state: dict[str, Any], *, fault_at: float,
             victim: str = "", agent_restarts: int | None = None, instances: int | None = None,
             repaired: str = "", note: str = "", detail: dict[str, Any] | None = None) -> dict[str, Any]:
    """The row of a fault that ran: ``window`` a :class:`.timeline.WindowResult`, ``state``
    :func:`.timeline.state_check`'s answer. One instance serving at the end is part of it."""
    recovered = bool(window.recovered) and instances == 1
    holds = recovered and bool(state["exact"]) and not repaired
    return {"name": fault.name, "kind": fault.kind, "status": "ran", "holds": holds,
            "recovered": recovered, "recovery_s": window.recovery_s if recovered else None,
            "lost": window.lost, "lost_after_fault": window.lost_after_fault,
            "lost_window": window.lost_window, "sent": window.sent,
            "served_before": window.served_before, "last_lost_s": window.last_lost_s,
            "exact": bool(state["exact"]), "duplicates": state["duplicates"],
            "victim": victim, "agent_restarts": agent_restarts, "instances": instances,
            "repaired": repaired, "fault_at": fault_at,
            "mechanism": None if holds else fault.mechanism, "note": note,
            "detail": detail or {}}


def not_run_row(fault: Fault, reason: str) -> dict[str, Any]:
    """The row of a fault this run could not make: why, and what it would measure."""
    return {"name": fault.name, "kind": fault.kind, "status": "not run", "holds": False,
            "recovered": False, "recovery_s": None, "lost": None, "lost_after_fault": None,
            "lost_window": None,
            "sent": 0, "served_before": None, "last_lost_s": None, "exact": None,
            "duplicates": None, "victim": fault.victim, "agent_restarts": None,
            "instances": None, "repaired": "", "fault_at": None, "mechanism": fault.mechanism,
            "note": reason, "detail": {}}


def _median_worst(values: list[float]) -> tuple[float | None, float | None]:
    return (round(statistics.median(values), 4), round(max(values), 4)) if values else (None, None)


def build_summary(run_id: str, rows: list[dict[str, Any]], final: dict[str, Any], *,
                  variant: str, rate: float, measured_at: str, duration_s: float,
                  extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """summary.json: every row, which recovered, recovery time's median and worst over the
    faults that recovered, and the end-of-run state check."""
    times = [r["recovery_s"] for r in rows if r["recovered"] and r["recovery_s"] is not None]
    median, worst = _median_worst(times)
    return {"experiment": "faults", "run_id": run_id, "measured_at": measured_at,
            "variant": variant, "rate": rate, "rows": rows,
            "holds": bool(rows) and all(r["holds"] for r in rows) and bool(final.get("exact")),
            "recovered": [r["name"] for r in rows if r["holds"]],
            "failed": [r["name"] for r in rows if r["status"] == "ran" and not r["holds"]],
            "not_run": [r["name"] for r in rows if r["status"] != "ran"],
            "recovery_s_median": median, "recovery_s_worst": worst,
            "final": final, "duration_s": round(duration_s, 1), **(extra or {})}


def check_summary(summary: Any) -> dict[str, Any]:
    """``summary`` if it has the schema and its verdicts agree with its rows; else
    :class:`SummaryError` naming what is wrong."""
    if not isinstance(summary, dict):
        raise SummaryError("a summary is a JSON object")
    missing = [k for k in SUMMARY_KEYS if k not in summary]
    if missing:
        raise SummaryError(f"summary lacks {missing}")
    rows = summary["rows"]
    if not isinstance(rows, list) or not rows:
        raise SummaryError("summary has no rows")
    for row in rows:
        lacking = [k for k in ROW_COLUMNS if k not in row]
        if lacking:
            raise SummaryError(f"row {row.get('name')!r} lacks {lacking}")
        should = (row["status"] == "ran" and row["recovered"] and row["exact"] is True
                  and row["instances"] == 1 and not row["repaired"])
        if row["holds"] != should:
            raise SummaryError(f"row {row['name']!r}: holds disagrees with its parts")
        if row["recovered"] and row["recovery_s"] is None:
            raise SummaryError(f"row {row['name']!r} recovered without a recovery time")
    if summary["holds"] != (all(r["holds"] for r in rows) and bool(summary["final"].get("exact"))):
        raise SummaryError("summary holds disagrees with its rows")
    times = [r["recovery_s"] for r in rows if r["recovered"] and r["recovery_s"] is not None]
    if (summary["recovery_s_median"], summary["recovery_s_worst"]) != _median_worst(times):
        raise SummaryError("recovery median/worst disagree with the rows")
    return summary


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def table(rows: Iterable[dict[str, Any]], width: int = 56) -> str:
    """The printed table: fault, holds, recovered, recovery (s), lost/sent, exact, restarts."""
    head = ["fault", "status", "holds", "recovered", "recovery_s", "lost/sent", "exact", "restarts",
            "note"]
    lines = [head]
    for r in rows:
        note = r.get("note") or ""
        note = note if len(note) <= width else note[:width - 1] + "…"
        lines.append([r["name"], r["status"], _cell(r["holds"]), _cell(r["recovered"]),
                      _cell(r["recovery_s"]), f"{_cell(r['lost'])}/{r['sent']}", _cell(r["exact"]),
                      _cell(r["agent_restarts"]), note])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    text = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


def plot(requests: list[Any], rows: list[dict[str, Any]], dest: Path, bin_s: float = 0.1) -> Path:
    """timeline.png: requests answered and lost per ``bin_s`` over the run (by send time),
    a marker at each fault with its name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = min((r.sent for r in requests), default=0.0)
    end = max((r.sent for r in requests), default=t0) - t0
    n = int(end / bin_s) + 1
    answered, lost = [0] * n, [0] * n
    for r in requests:
        i = int((r.sent - t0) / bin_s)
        (answered if r.answered else lost)[i] += 1
    xs = [i * bin_s for i in range(n)]
    fig, ax = plt.subplots(figsize=(14, 4.8))
    ax.step(xs, [a / bin_s for a in answered], where="post", lw=0.8, color="C0", label="answered/s")
    ax.step(xs, [x / bin_s for x in lost], where="post", lw=0.8, color="red", label="lost/s")
    top = max([1.0] + [a / bin_s for a in answered] + [x / bin_s for x in lost])
    for row in rows:
        if row.get("fault_at") is None:
            continue
        x = row["fault_at"] - t0
        ax.axvline(x, color="grey" if row["holds"] else "red", lw=0.8, ls="--")
        ax.text(x, top * 1.02, row["name"], rotation=90, fontsize=7, va="bottom")
    ax.set_xlabel("time (s, by send time)")
    ax.set_ylabel("requests per second")
    ax.set_title("Fault experiment: the CO's requests answered and lost (dashed: a fault; red: "
                 "not recovered exact)", pad=90)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    out = dest / "timeline.png"
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
