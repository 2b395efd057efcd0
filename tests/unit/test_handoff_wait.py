"""experiments.handoff.analyse: a move's wait (the longest a request of it waited) beside its
disruption (the gap between the old place's last reply and the new place's first), on a
synthetic CO log: at 200 requests/s the gap is at least 5 ms even when nothing waits."""

from __future__ import annotations

from experiments.handoff import analyse, figures

RATE = 200.0


def log(co: str, start: float, n: int, switch_at: float, held_until: float,
        latency: float = 0.0005) -> list[dict]:
    """``n`` requests every 1/RATE s from ``start``; those sent before ``switch_at`` are
    served at r18b, the rest at r20a, and none of those before ``held_until``."""
    out = []
    for seq in range(n):
        sent = start + seq / RATE
        at = max(sent, held_until) + latency if sent >= switch_at else sent + latency
        out.append({"co": co, "seq": seq, "sent": sent,
                    "replies": [{"at": at, "served_by": "r18b" if sent < switch_at else "r20a",
                                 "ok": True, "result": {"count": seq + 1}}]})
    return out


def move(start: float) -> dict:
    return {"n": 1, "mode": "make-before-break", "from": "r18b", "to": "r20a", "ok": True,
            "started": start, "migration_ms": 20.0}


def test_a_move_nobody_waits_for_has_a_gap_of_one_interval_and_no_wait() -> None:
    [row] = analyse(log("co14", 100.0, 200, switch_at=100.5, held_until=0.0), [move(100.2)])
    assert 4.9 <= row["disruption_ms"] <= 5.1  # the floor: one request interval
    assert row["wait_ms"] < 1.0 and row["lost"] == 0


def test_a_held_request_shows_as_its_wait() -> None:
    [row] = analyse(log("co14", 100.0, 200, switch_at=100.5, held_until=100.53),
                    [move(100.2)])
    assert 29.0 <= row["wait_ms"] <= 31.0  # the first request after the switch waited 30 ms
    assert row["wait_ms_co14"] == row["wait_ms"]
    assert row["disruption_ms"] >= row["wait_ms"]


def test_the_summary_gives_the_wait_per_co_and_overall() -> None:
    rows = analyse(log("co12", 100.0, 200, switch_at=100.5, held_until=100.51)
                   + log("co14", 100.0, 200, switch_at=100.5, held_until=100.54), [move(100.2)])
    f = figures(rows, {"co12": "net 12", "co14": "net 14"})
    assert 39.0 <= f["wait_ms_worst"] <= 41.0 and f["wait_ms_median"] == f["wait_ms_worst"]
    assert 9.0 <= f["by_co"]["co12"]["wait_ms_worst"] <= 11.0


def served(co: str, order: list[tuple[int, float]]) -> list[dict]:
    """Requests (seq, sent) answered in the order given: the counter's count is its rank."""
    return [{"co": co, "seq": seq, "sent": at, "replies": [
        {"at": at + 0.001, "served_by": "r20a", "ok": True, "result": {"count": n + 1}}]}
        for n, (seq, at) in enumerate(order)]


MOVES = [{"mode": "make-before-break", "started": 100.0}, {"mode": "break-before-make", "started": 200.0}]


def test_a_request_answered_after_a_newer_one_in_a_break_is_counted_exactly_once() -> None:
    from experiments.handoff import state_survived
    state = state_survived(served("co12", [(1, 150.0), (3, 201.0), (2, 200.5), (4, 202.0)]), MOVES)
    assert state["out_of_order"] == {"break-before-make": 1} and not state["monotonic"]
    assert state["exact"] and state["consistent"]


def test_out_of_order_in_make_before_break_is_not_exact() -> None:
    from experiments.handoff import state_survived
    state = state_survived(served("co12", [(1, 150.0), (3, 151.0), (2, 150.5)]), MOVES)
    assert state["out_of_order"] == {"make-before-break": 1} and not state["exact"]
    assert not state_survived(served("co12", [(2, 150.0), (1, 149.0)]))["exact"]  # no moves
