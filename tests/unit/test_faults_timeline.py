"""The fault experiment's pure analysis (experiments/faults/timeline.py): loss, recovery time,
recovered or not, and the counter's exactness, from CO logs built here request by request."""

from __future__ import annotations

import pytest

from experiments.faults.timeline import (Request, TimelineError, analyse_window, final_check,
                                          parse_requests, state_check)

RATE = 200.0


def load(n: int, t0: float = 1000.0, lost: set[int] = frozenset(), latency: float = 0.002,
         client: str = "co", first_count: int = 1, counts: dict[int, int] | None = None) -> list[Request]:
    """``n`` requests at 200/s from ``t0``; ``lost`` seqs unanswered; counts 1, 2, ... over the
    answered ones unless ``counts`` says otherwise."""
    out, count = [], first_count
    for seq in range(1, n + 1):
        sent = t0 + (seq - 1) / RATE
        if seq in lost:
            out.append(Request(client, seq, sent, None, ()))
            continue
        c = (counts or {}).get(seq, count)
        out.append(Request(client, seq, sent, sent + latency, (c,), ("r18b",)))
        count += 1
    return out


def test_no_loss_recovers_at_once() -> None:
    reqs = load(400)
    w = analyse_window(reqs, fault_at=1001.0)
    assert (w.recovered, w.recovery_s, w.lost, w.sent, w.answered) == (True, 0.0, 0, 400, 400)
    assert w.served_before


def test_recovery_time_is_fault_to_first_reply_after_last_loss() -> None:
    # the fault at t=1.0 s (seq 201); seqs 201..400 (1 s) lost; service back from seq 401
    reqs = load(1000, lost=set(range(201, 401)))
    w = analyse_window(reqs, fault_at=1001.0)
    assert w.recovered and w.lost == 200 and w.lost_after_fault == 200
    # seq 401 was sent at 1002.0 and answered 2 ms later
    assert w.recovery_s == pytest.approx(1.002, abs=1e-6)
    assert w.last_lost_s == pytest.approx(0.995, abs=1e-6)


def test_a_late_isolated_loss_extends_recovery() -> None:
    reqs = load(1000, lost=set(range(201, 221)) | {800})
    w = analyse_window(reqs, fault_at=1001.0)
    assert w.recovered and w.lost == 21
    assert w.recovery_s == pytest.approx((800 / RATE) + 0.002 - 1.0, abs=1e-6)


def test_not_recovered_when_the_window_ends_in_losses() -> None:
    reqs = load(1000, lost=set(range(201, 1001)))
    w = analyse_window(reqs, fault_at=1001.0)
    assert not w.recovered and w.recovery_s is None and w.lost == 800


def test_not_recovered_when_too_few_answers_follow_the_last_loss() -> None:
    reqs = load(300, lost=set(range(201, 281)))  # 20 answered after the last loss, tail 50
    w = analyse_window(reqs, fault_at=1001.0, tail=50)
    assert not w.recovered
    assert analyse_window(reqs, fault_at=1001.0, tail=20).recovered


def test_losses_long_before_the_fault_are_not_its_own() -> None:
    reqs = load(1000, lost={5, 395})  # 0.02 s and 1.97 s into the window, the fault at 3 s
    w = analyse_window(reqs, fault_at=1003.0)
    assert w.recovered and w.recovery_s == 0.0
    assert (w.lost, w.lost_after_fault, w.lost_window) == (0, 0, 2)
    # a reply the fault swallowed in flight (sent 0.5 s before it) is the fault's
    w = analyse_window(load(1000, lost={500}), fault_at=1003.0)
    assert (w.lost, w.lost_after_fault) == (1, 0) and w.recovery_s == pytest.approx(0.002, abs=1e-6)
    assert analyse_window(load(1000, lost={500}), fault_at=1003.0, lead=0.2).lost == 0


def test_nothing_sent_after_the_fault_is_not_recovered() -> None:
    w = analyse_window(load(100), fault_at=2000.0)
    assert not w.recovered and w.recovery_s is None


def test_tail_must_be_positive() -> None:
    with pytest.raises(ValueError):
        analyse_window(load(10), 1000.0, tail=0)
    with pytest.raises(ValueError):
        analyse_window(load(10), 1000.0, lead=-1)


def test_state_exact_when_every_count_is_given_once() -> None:
    first = load(200, client="w1")
    second = load(200, t0=1002.0, client="w2", first_count=201, lost={50, 51})
    assert state_check(first, second)["exact"]


def test_an_older_checkpoint_serving_repeats_counts() -> None:
    first = load(200, client="w1")
    # restarted from the state at count 150: the next window's counts 151.. again
    second = load(100, t0=1002.0, client="w2", first_count=151)
    st = state_check(first, second)
    assert not st["exact"] and st["duplicates"] == 50 and st["duplicate_counts"][0] == 151


def test_two_instances_answering_disagree_or_repeat() -> None:
    reqs = load(10, client="w1")
    both = [Request("w1", 11, 1000.05, 1000.06, (11, 12)), Request("w1", 12, 1000.06, 1000.07, (12,))]
    st = state_check(reqs, both)
    assert not st["exact"] and st["inconsistent"] == 1 and st["duplicates"] == 1


def test_bicast_copies_that_agree_are_exact() -> None:
    reqs = [Request("w", 1, 1.0, 1.001, (1, 1)), Request("w", 2, 1.005, 1.006, (2,))]
    assert state_check([], reqs)["exact"]


def test_final_check_allows_counted_requests_whose_reply_was_lost() -> None:
    # the last request (seq 200) was counted (count 200) but its reply lost
    reqs = load(200, lost={200})
    out = final_check(reqs, 200)
    assert out["exact"] and out["counted_not_answered"] == 1 and out["highest_reply_count"] == 199
    assert final_check(reqs, 199)["exact"]  # or it was lost before the object counted it
    assert not final_check(reqs, 198)["exact"]  # fewer than a reply showed: the state went back
    assert not final_check(reqs, 201)["exact"]  # more than were even sent after the last reply
    assert not final_check(reqs, None)["exact"]


def test_final_check_does_not_care_where_the_count_started() -> None:
    reqs = load(100, first_count=5001)  # an object placed again that kept its old count
    assert final_check(reqs, 5100)["exact"]
    assert not final_check(reqs + [Request("co", 101, 2000.0, 2000.1, (5050,))], 5100)["exact"]


def test_parse_requests_reads_co_load_records() -> None:
    records = [
        {"seq": 2, "sent": 10.01, "replies": []},
        {"seq": 1, "sent": 10.0, "replies": [
            {"at": 10.003, "served_by": "r20a", "result": {"count": 7}, "ok": True},
            {"at": 10.002, "served_by": "r18b", "result": {"count": 7}, "ok": True}]},
        {"seq": 3, "sent": 10.02, "replies": [{"at": 10.03, "served_by": "r18b", "ok": False,
                                               "result": None}]},
    ]
    reqs = parse_requests(records, "w1")
    assert [r.seq for r in reqs] == [1, 2, 3]
    assert reqs[0].answered_at == 10.002 and reqs[0].counts == (7, 7)
    assert reqs[0].served_by == ("r18b", "r20a")
    assert not reqs[1].answered and not reqs[2].answered  # a refusal is no answer


@pytest.mark.parametrize("bad", [[], "x", {"seq": 1}, {"seq": "a", "sent": 1.0, "replies": []},
                                 {"seq": 1, "sent": True, "replies": []},
                                 {"seq": 1, "sent": 1.0, "replies": ["x"]},
                                 {"seq": 1, "sent": 1.0, "replies": [{"ok": True, "at": "late"}]}])
def test_parse_requests_refuses_malformed_records(bad: object) -> None:
    with pytest.raises(TimelineError):
        parse_requests([bad], "w1")
