"""The pure analysis of ``moat run faults``: from the CO's per-request log (nodetools.co_load:
``{"seq", "sent", "replies": [{"at", "served_by", "result": {"count"}, "ok"}]}``, wall clock)
and the instant a fault was injected, whether service came back, how fast, what was lost,
and whether the counter's state stayed exact.

Definitions (the README's "Fault experiment" says the same):

* lost: requests sent from ``lead`` seconds before the fault (1 s: the window's baseline) to
  the window's end and never answered (``lost_window``: the whole window's, which may hold
  losses left by an earlier fault);
* recovery time: from the fault to the first reply to a request sent after the window's last
  unanswered request (0 when nothing was lost after the fault);
* recovered: after the last unanswered request at least ``tail`` requests were answered and
  the window's last request was answered (service is back and stays back);
* exact: no count value was given to two different requests (none counted twice, no older
  checkpoint serving, never two instances answering) and every copy of one request's reply
  (make-before-break bicast) carries the same count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

__all__ = ["Request", "WindowResult", "TimelineError", "parse_requests", "analyse_window",
           "count_owners", "state_check", "final_check"]


class TimelineError(ValueError):
    """A CO log line that is not a request record."""


@dataclass(frozen=True)
class Request:
    """One request: who sent it (the load's client id: one per fault window), its seq, when it
    was sent, the first reply's time (None: never answered) and the counts its replies carry."""

    client: str
    seq: int
    sent: float
    answered_at: float | None
    counts: tuple[int, ...]
    served_by: tuple[str, ...] = ()

    @property
    def answered(self) -> bool:
        return self.answered_at is not None


def _number(doc: dict[str, Any], key: str) -> float:
    value = doc.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TimelineError(f"request record field {key!r} is not a number: {value!r}")
    return float(value)


def parse_requests(records: Iterable[Any], client: str) -> list[Request]:
    """:class:`Request` s from co_load's records; :class:`TimelineError` on a malformed one.
    Replies that are not ``ok`` do not count as answers (the object refused)."""
    out = []
    for doc in records:
        if not isinstance(doc, dict) or not isinstance(doc.get("replies"), list):
            raise TimelineError(f"not a request record: {doc!r}")
        seq, sent = int(_number(doc, "seq")), _number(doc, "sent")
        times, counts, by = [], [], []
        for reply in doc["replies"]:
            if not isinstance(reply, dict):
                raise TimelineError(f"request {seq}: a reply is not an object: {reply!r}")
            if reply.get("ok") is not True:
                continue
            times.append(_number(reply, "at"))
            result = reply.get("result")
            count = result.get("count") if isinstance(result, dict) else None
            if isinstance(count, int) and not isinstance(count, bool):
                counts.append(count)
            if isinstance(reply.get("served_by"), str):
                by.append(reply["served_by"])
        out.append(Request(client, seq, sent, min(times) if times else None, tuple(counts),
                           tuple(sorted(set(by)))))
    return sorted(out, key=lambda r: (r.sent, r.seq))


@dataclass(frozen=True)
class WindowResult:
    """What one fault's window shows."""

    sent: int
    answered: int
    lost: int
    lost_after_fault: int
    lost_window: int
    recovered: bool
    recovery_s: float | None
    served_before: bool
    last_lost_s: float | None


def analyse_window(requests: list[Request], fault_at: float, tail: int = 50,
                   lead: float = 1.0) -> WindowResult:
    """Loss and recovery of one window (its requests, the fault's wall-clock instant).

    ``tail``: the answered requests needed after the last unanswered one to call service back
    (50 at 200 requests/s: a quarter of a second without a loss). ``lead``: how long before
    the fault a loss still counts as the fault's (a reply in flight when it struck)."""
    if tail < 1 or lead < 0:
        raise ValueError("tail must be at least 1 and lead at least 0")
    reqs = sorted(requests, key=lambda r: (r.sent, r.seq))
    after = [r for r in reqs if r.sent >= fault_at]
    before = [r for r in reqs if r.sent < fault_at]
    lost_all = [r for r in reqs if not r.answered]
    lost = [r for r in lost_all if r.sent >= fault_at - lead]
    lost_after = [r for r in after if not r.answered]
    served_before = any(r.answered for r in before)
    answered = len(reqs) - len(lost_all)
    if not after:
        return WindowResult(len(reqs), answered, len(lost), 0, len(lost_all), False, None,
                            served_before, None)
    if not lost:
        back = [r for r in after if r.answered]
        recovered = len(back) >= min(tail, len(after)) and after[-1].answered
        return WindowResult(len(reqs), answered, 0, 0, len(lost_all), recovered,
                            0.0 if recovered else None, served_before, None)
    last_lost = max(r.sent for r in lost)
    following = [r for r in after if r.sent > last_lost]
    recovered = len(following) >= tail and all(r.answered for r in following)
    recovery = None
    if recovered:
        first = min(r.answered_at for r in following if r.answered_at is not None)
        recovery = round(max(0.0, first - fault_at), 4)
    return WindowResult(len(reqs), answered, len(lost), len(lost_after), len(lost_all), recovered,
                        recovery, served_before, round(last_lost - fault_at, 4))


def count_owners(requests: Iterable[Request]) -> dict[int, set[tuple[str, int]]]:
    """Count value -> the requests (client, seq) whose replies carried it."""
    owners: dict[int, set[tuple[str, int]]] = {}
    for r in requests:
        for c in set(r.counts):
            owners.setdefault(c, set()).add((r.client, r.seq))
    return owners


def state_check(earlier: Iterable[Request], window: Iterable[Request]) -> dict[str, Any]:
    """Whether the window kept the counter exact, given every request answered before it in
    the same epoch (the object's life since it was last placed): ``duplicates`` are count
    values of the window also given to another request (the state went back or two instances
    answered), ``inconsistent`` requests whose reply copies disagree."""
    window = list(window)
    owners = count_owners([*earlier, *window])
    mine = {(r.client, r.seq) for r in window}
    duplicates = sorted(c for c, who in owners.items() if len(who) > 1 and who & mine)
    inconsistent = [r.seq for r in window if len(set(r.counts)) > 1]
    return {"duplicates": len(duplicates), "duplicate_counts": duplicates[:20],
            "inconsistent": len(inconsistent), "exact": not duplicates and not inconsistent}


def final_check(requests: Iterable[Request], object_count: int | None,
                lead: float = 1.0) -> dict[str, Any]:
    """At the end: the object's own count against what the CO saw last. Exact when no count
    was given twice and the object's count is the highest count a reply carried plus at most
    the requests left unanswered after that reply's request (counted, the reply lost; from
    ``lead`` s before it, as requests may be served out of order). Independent of where the
    count started (an object placed again may or may not start from zero)."""
    reqs = list(requests)
    answered = [r for r in reqs if r.answered and r.counts]
    dup = state_check([], reqs)
    top = max((max(r.counts) for r in answered), default=None)
    out: dict[str, Any] = {"answered": len(answered), "lost": sum(1 for r in reqs if not r.answered),
                           "object_count": object_count, "highest_reply_count": top,
                           "counted_not_answered": None, "duplicates": dup["duplicates"],
                           "exact": False}
    if top is None or object_count is None:
        return out
    top_sent = max(r.sent for r in answered if max(r.counts) == top)
    tail_lost = sum(1 for r in reqs if not r.answered and r.sent >= top_sent - lead)
    out["counted_not_answered"] = object_count - top
    out["exact"] = dup["exact"] and top <= object_count <= top + tail_lost
    return out
