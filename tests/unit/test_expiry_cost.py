"""Issue 12, item 8: a housekeeping tick does not scan every binding or visitor.

The binding table and the visitor list keep their expiry times in a heap: a tick looks at
the entries due and nothing else, however many live ones there are (counted through
``examined``), and still expires exactly the ones due, renewals and removals included.
"""

from __future__ import annotations

from agent.mobility.bindings import BindingTable, Visitor, VisitorList
from fakeclock import FakeClock

N = 5000


def home(i: int) -> str:
    return f"10.{16 + i // 65536}.{(i // 256) % 256}.{i % 256}"


def test_a_tick_over_many_live_bindings_looks_only_at_those_due() -> None:
    clock = FakeClock(0.0)
    table = BindingTable(clock=clock)
    for i in range(N):
        table.register(home(i), "10.12.0.1", f"o{i}", 100 + i % 50, False)
    for _ in range(10):  # ten ticks with nothing due
        clock.advance(0.25)
        assert table.expire() == []
    assert table.examined == 0
    clock.advance(100 - 2.5)  # now 100: the ones with lifetime 100 are due
    gone = table.expire()
    assert len(gone) == N // 50 and {b.lifetime for b in gone} == {100}
    assert table.examined == N // 50 and len(table) == N - N // 50


def test_renewed_and_removed_bindings_are_not_expired_by_their_old_entries() -> None:
    clock = FakeClock(0.0)
    table = BindingTable(clock=clock)
    table.register(home(1), "10.12.0.1", "a", 10, False)
    table.register(home(2), "10.12.0.1", "b", 10, False)
    clock.advance(5)
    table.register(home(1), "10.12.0.1", "a", 10, False)  # renewed: now due at 15
    table.register(home(2), "10.12.0.1", "b", 0, False)  # deregistered
    clock.advance(5)
    assert table.expire() == []
    clock.advance(5)
    assert [b.home_address for b in table.expire()] == [home(1)]
    assert len(table) == 0


def test_the_heap_does_not_grow_with_renewals() -> None:
    clock = FakeClock(0.0)
    table = BindingTable(clock=clock)
    for _ in range(10_000):
        table.register(home(1), "10.12.0.1", "a", 1000, False)
        clock.advance(0.01)
    assert len(table._expiry) <= 4 * len(table) + 65


def visitor(i: int, at: float, lifetime: int) -> Visitor:
    return Visitor(home(i), "10.16.0.2", "10.12.0.50", 40000, "n", f"c{i}", lifetime, at,
                   i + 1, "10.12.0.1")


def test_a_tick_over_many_visitors_looks_only_at_those_due() -> None:
    clock = FakeClock(0.0)
    visitors = VisitorList(clock)
    for i in range(N):
        visitors.add(visitor(i, 0.0, 60 + i % 10))
    clock.advance(59.9)
    assert visitors.expire() == [] and visitors.examined == 0
    clock.advance(0.1)
    gone = visitors.expire()
    assert len(gone) == N // 10 and visitors.examined == N // 10
    visitors.add(visitor(1, clock.now, 60))  # renewed
    visitors.remove(home(2))
    clock.advance(1)
    assert [v.home_address for v in visitors.expire()] == [home(1 + 10 * k) for k in range(N // 10)
                                                          if home(1 + 10 * k) != home(1)]
    assert visitors.get(home(1)) is not None and visitors.get(home(2)) is None
