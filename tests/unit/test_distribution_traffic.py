"""The traffic rule (agent/distribution/traffic.py): where a primary's requests come from over
a sliding window, and when a duplicate is placed near them (issue 11, item 7)."""

from __future__ import annotations

from agent.distribution.traffic import TrafficRule, TrafficWatch
from fakeclock import FakeClock

OWN, NET14, HOME = "10.12.0.0/24", "10.14.0.0/24", "10.16.0.0/24"
RULE = TrafficRule(window_s=5.0, min_requests=100, share=0.75, cooldown_s=30.0)


def watch() -> tuple[TrafficWatch, FakeClock]:
    clock = FakeClock(100.0)
    return TrafficWatch(RULE, clock), clock


def feed(w: TrafficWatch, clock: FakeClock, per_second: dict[str, int], seconds: int,
         start: dict[str, int] | None = None) -> dict[str, int]:
    counts = dict(start or {})
    w.sample(counts)
    for _ in range(seconds):
        clock.advance(1.0)
        for net, n in per_second.items():
            counts[net] = counts.get(net, 0) + n
        w.sample(counts)
    return counts


def test_most_traffic_from_one_foreign_network_picks_it() -> None:
    w, clock = watch()
    feed(w, clock, {NET14: 40, OWN: 5}, 5)
    assert w.window() == {NET14: 200, OWN: 25}
    assert w.hot_network(OWN, set()) == NET14


def test_too_few_requests_or_too_small_a_share_pick_nothing() -> None:
    w, clock = watch()
    feed(w, clock, {NET14: 15}, 5)  # 75 requests < 100
    assert w.hot_network(OWN, set()) is None
    w, clock = watch()
    feed(w, clock, {NET14: 30, OWN: 20}, 5)  # 60 % < 75 %
    assert w.hot_network(OWN, set()) is None


def test_own_network_a_served_network_and_unknown_sources_pick_nothing() -> None:
    for net, served in ((OWN, set()), (NET14, {NET14}), ("other", set())):
        w, clock = watch()
        feed(w, clock, {net: 50}, 5)
        assert w.hot_network(OWN, served) is None, net


def test_the_window_slides_and_old_traffic_no_longer_counts() -> None:
    w, clock = watch()
    counts = feed(w, clock, {NET14: 50}, 5)
    feed(w, clock, {HOME: 50}, 6, start=counts)  # the last 5 s: only the home network
    assert NET14 not in w.window()
    assert w.hot_network(OWN, set()) == HOME  # a candidate; placement excludes home later


def test_after_a_placement_the_rule_waits_its_cooldown() -> None:
    w, clock = watch()
    counts = feed(w, clock, {NET14: 50}, 5)
    assert w.hot_network(OWN, set()) == NET14
    w.fired()
    counts = feed(w, clock, {NET14: 50}, 5, start=counts)
    assert w.hot_network(OWN, set()) is None  # 5 s after: within the 30 s cooldown
    clock.advance(25.0)
    feed(w, clock, {NET14: 50}, 5, start=counts)
    assert w.hot_network(OWN, set()) == NET14


def test_a_restarted_object_resets_the_window_and_a_disabled_rule_never_fires() -> None:
    w, clock = watch()
    feed(w, clock, {NET14: 50}, 5)
    w.sample({NET14: 3})  # counters went down: the object restarted
    assert w.window() == {}
    off = TrafficWatch(TrafficRule(enabled=False), clock)
    feed(off, clock, {NET14: 500}, 5)
    assert off.hot_network(OWN, set()) is None
