"""A row per attack class, the run's summary (summary.json) and the printed table. Pure.

A row holds only if the expected refusal was observed AND the targeted state is unchanged
AND every agent still answers: a row cannot hold by default (``holds`` is computed from the
three, never given).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .catalog import AttackClass

__all__ = ["Row", "SummaryError", "build_summary", "check_summary", "table", "SUMMARY_KEYS",
           "ROW_KEYS"]

SUMMARY_KEYS = ("run_id", "measured_at", "variant", "rows", "holds", "held", "failed",
                "baseline", "duration_s")
ROW_KEYS = ("name", "target", "sent", "expected", "observed", "refused", "state_unchanged",
            "alive", "rss_before_kib", "rss_after_kib", "holds", "defence", "detail")


class SummaryError(ValueError):
    """A summary that does not have the schema of :data:`SUMMARY_KEYS` / :data:`ROW_KEYS`."""


@dataclass
class Row:
    """What one attack class sent, what it expected, what happened."""

    cls: AttackClass
    target: str
    sent: str
    observed: str
    #: The expected refusal was seen (every message of the class was refused).
    refused: bool
    #: The targeted state (bindings, visitors, objects, leases, VMs, ...) is as before.
    state_unchanged: bool
    #: Every agent answered ping after the class (and, for floods, a legit request worked).
    alive: bool
    rss_before_kib: int | None = None
    rss_after_kib: int | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def holds(self) -> bool:
        return self.refused and self.state_unchanged and self.alive

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.cls.name, "target": self.target, "sent": self.sent,
                "expected": self.cls.expected, "observed": self.observed,
                "refused": self.refused, "state_unchanged": self.state_unchanged,
                "alive": self.alive, "rss_before_kib": self.rss_before_kib,
                "rss_after_kib": self.rss_after_kib, "holds": self.holds,
                "defence": None if self.holds else self.cls.defence, "detail": self.detail}


def build_summary(run_id: str, rows: list[Row], baseline: dict[str, Any], variant: str,
                  measured_at: str, duration_s: float) -> dict[str, Any]:
    """summary.json: every row, which hold, the idle baseline of the agents' memory."""
    out = [r.as_dict() for r in rows]
    held = [r["name"] for r in out if r["holds"]]
    failed = [r["name"] for r in out if not r["holds"]]
    return {"run_id": run_id, "measured_at": measured_at, "variant": variant, "rows": out,
            "holds": bool(out) and not failed, "held": held, "failed": failed,
            "baseline": baseline, "duration_s": round(duration_s, 1)}


def check_summary(summary: Any) -> dict[str, Any]:
    """``summary`` if it has the schema; :class:`SummaryError` naming what is missing."""
    if not isinstance(summary, dict):
        raise SummaryError("a summary is a JSON object")
    missing = [k for k in SUMMARY_KEYS if k not in summary]
    if missing:
        raise SummaryError(f"summary lacks {missing}")
    if not isinstance(summary["rows"], list) or not summary["rows"]:
        raise SummaryError("summary has no rows")
    for row in summary["rows"]:
        lacking = [k for k in ROW_KEYS if k not in row]
        if lacking:
            raise SummaryError(f"row {row.get('name')!r} lacks {lacking}")
        if row["holds"] != (row["refused"] and row["state_unchanged"] and row["alive"]):
            raise SummaryError(f"row {row['name']!r}: holds disagrees with its parts")
    if summary["holds"] != all(r["holds"] for r in summary["rows"]):
        raise SummaryError("summary holds disagrees with its rows")
    return summary


def _kib(value: int | None) -> str:
    return "-" if value is None else f"{value / 1024:.1f}"


def table(rows: list[dict[str, Any]], width: int = 60) -> str:
    """The printed table: class, holds, what was sent, what happened, state, memory (MiB)."""
    head = ["class", "holds", "refused", "state", "alive", "MiB before", "MiB after", "observed"]
    lines = [head]
    for r in rows:
        observed = r["observed"] if len(r["observed"]) <= width else r["observed"][:width - 1] + "…"
        lines.append([r["name"], "yes" if r["holds"] else "NO", "yes" if r["refused"] else "no",
                      "same" if r["state_unchanged"] else "CHANGED", "yes" if r["alive"] else "NO",
                      _kib(r["rss_before_kib"]), _kib(r["rss_after_kib"]), observed])
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    text = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)
