"""agent.mobility.bindings: the HOA's binding table and the FOA's visitor list, on a fake clock."""

from __future__ import annotations

import pytest

from agent.mobility.bindings import Binding, BindingTable, TooManyBindings, Visitor, VisitorList
from fakeclock import FakeClock

HOME = "10.0.1.10"
HOME2 = "10.0.1.11"
COA1 = "10.0.2.1"
COA2 = "10.0.3.1"
COA3 = "10.0.4.1"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1000.0)


@pytest.fixture
def table(clock: FakeClock) -> BindingTable:
    return BindingTable(max_bindings=2, clock=clock)


def reg(table: BindingTable, coa: str, lifetime: int = 60, s: bool = False, home: str = HOME,
        name: str = "", ident: int = 0):
    return table.register(home, coa, name or f"obj.{coa}", lifetime, s, "obj@home", ident)


def test_max_bindings_must_be_positive() -> None:
    with pytest.raises(ValueError):
        BindingTable(max_bindings=0)


# --- without S -------------------------------------------------------------------------


def test_first_registration_creates_binding_and_sets_first_away(table: BindingTable, clock: FakeClock) -> None:
    res = reg(table, COA1, 60, ident=7)
    assert res.first_away and not res.now_home and res.removed == []
    b = res.binding
    assert isinstance(b, Binding)
    assert (b.home_address, b.care_of_address, b.care_of_name) == (HOME, COA1, f"obj.{COA1}")
    assert (b.lifetime, b.registered_at, b.identification, b.nai) == (60, clock.now, 7, "obj@home")
    assert table.for_home(HOME) == [b]
    assert len(table) == 1
    assert table.away() == {HOME}


def test_new_care_of_replaces_old_with_new_key(table: BindingTable) -> None:
    first = reg(table, COA1).binding
    res = reg(table, COA2)
    assert not res.first_away and not res.now_home
    assert res.removed == [first]
    assert [b.care_of_address for b in table.for_home(HOME)] == [COA2]
    assert res.binding.gre_key != first.gre_key
    assert len(table) == 1


def test_same_care_of_renewal_keeps_gre_key_and_restarts_lifetime(table: BindingTable, clock: FakeClock) -> None:
    first = reg(table, COA1, 30).binding
    clock.advance(20)
    res = reg(table, COA1, 45)
    assert res.binding.gre_key == first.gre_key
    assert res.binding.registered_at == clock.now
    assert res.binding.lifetime == 45
    assert not res.first_away
    # a renewal is not a removal of anything in force
    assert table.for_home(HOME) == [res.binding]


def test_keys_are_unique_across_objects(table: BindingTable) -> None:
    k1 = reg(table, COA1, home=HOME).binding.gre_key
    k2 = reg(table, COA1, home=HOME2).binding.gre_key
    assert k1 != k2
    assert table.away() == {HOME, HOME2}


def test_without_s_replaces_all_simultaneous_bindings(table: BindingTable) -> None:
    reg(table, COA1, s=True)
    reg(table, COA2, s=True)
    assert len(table.for_home(HOME)) == 2
    res = reg(table, COA3, s=False)
    assert {b.care_of_address for b in res.removed} == {COA1, COA2}
    assert [b.care_of_address for b in table.for_home(HOME)] == [COA3]


def test_without_s_at_existing_coa_drops_the_others_and_keeps_key(table: BindingTable) -> None:
    b1 = reg(table, COA1, s=True).binding
    reg(table, COA2, s=True)
    res = reg(table, COA1, s=False)
    assert [b.care_of_address for b in res.removed] == [COA2]
    assert res.binding.gre_key == b1.gre_key
    assert [b.care_of_address for b in table.for_home(HOME)] == [COA1]


# --- with S ----------------------------------------------------------------------------


def test_with_s_two_bindings_coexist(table: BindingTable) -> None:
    b1 = reg(table, COA1, s=True).binding
    res = reg(table, COA2, s=True)
    assert res.removed == []
    assert not res.first_away
    cur = table.for_home(HOME)
    assert {b.care_of_address for b in cur} == {COA1, COA2}
    assert len({b.gre_key for b in cur}) == 2
    assert b1 in cur
    assert len(table) == 2
    assert table.away() == {HOME}


def test_with_s_cap_raises_and_leaves_table_alone(table: BindingTable) -> None:
    reg(table, COA1, s=True)
    reg(table, COA2, s=True)
    before = table.for_home(HOME)
    with pytest.raises(TooManyBindings):
        reg(table, COA3, s=True)
    assert table.for_home(HOME) == before


def test_with_s_at_cap_renewing_existing_coa_is_allowed(table: BindingTable) -> None:
    b1 = reg(table, COA1, s=True).binding
    reg(table, COA2, s=True)
    res = reg(table, COA1, 90, s=True)
    assert res.binding.gre_key == b1.gre_key
    assert res.binding.lifetime == 90
    cur = table.for_home(HOME)
    assert len(cur) == 2
    assert sorted(b.lifetime for b in cur) == [60, 90]


def test_cap_is_per_object(table: BindingTable) -> None:
    reg(table, COA1, s=True)
    reg(table, COA2, s=True)
    reg(table, COA1, s=True, home=HOME2)
    reg(table, COA2, s=True, home=HOME2)
    assert len(table) == 4


# --- deregistration ----------------------------------------------------------------------


def test_lifetime_zero_removes_only_that_binding(table: BindingTable) -> None:
    b1 = reg(table, COA1, s=True).binding
    b2 = reg(table, COA2, s=True).binding
    res = reg(table, COA1, 0, s=True)
    assert res.binding is None
    assert res.removed == [b1]
    assert not res.now_home
    assert table.for_home(HOME) == [b2]
    assert table.away() == {HOME}


def test_lifetime_zero_on_last_binding_sets_now_home(table: BindingTable) -> None:
    b1 = reg(table, COA1).binding
    res = reg(table, COA1, 0)
    assert res.removed == [b1]
    assert res.now_home and not res.first_away
    assert table.for_home(HOME) == []
    assert table.away() == set()
    assert len(table) == 0


def test_lifetime_zero_with_home_address_as_coa_removes_all(table: BindingTable) -> None:
    reg(table, COA1, s=True)
    reg(table, COA2, s=True)
    reg(table, COA1, home=HOME2)
    res = reg(table, HOME, 0)
    assert {b.care_of_address for b in res.removed} == {COA1, COA2}
    assert res.now_home
    assert table.for_home(HOME) == []
    assert table.away() == {HOME2}  # other objects untouched


def test_deregistering_unknown_coa_or_object_changes_nothing(table: BindingTable) -> None:
    res = reg(table, COA1, 0)
    assert res.removed == [] and not res.now_home and res.binding is None
    b1 = reg(table, COA1).binding
    res = reg(table, COA2, 0)
    assert res.removed == [] and not res.now_home
    assert table.for_home(HOME) == [b1]
    res = reg(table, HOME, 0, home=HOME2)  # object at home, never away
    assert res.removed == [] and not res.now_home


def test_for_home_returns_a_copy(table: BindingTable) -> None:
    reg(table, COA1)
    table.for_home(HOME).clear()
    assert len(table.for_home(HOME)) == 1


# --- expiry ------------------------------------------------------------------------------


def test_expire_removes_exactly_the_expired(table: BindingTable, clock: FakeClock) -> None:
    short = reg(table, COA1, 10, s=True).binding
    long = reg(table, COA2, 30, s=True).binding
    other = reg(table, COA1, 20, home=HOME2).binding
    clock.advance(9.999)
    assert table.expire() == []
    assert len(table) == 3
    clock.advance(0.001)  # exactly at expires_at: gone
    assert table.expire() == [short]
    assert table.for_home(HOME) == [long]
    clock.advance(10)
    assert table.expire() == [other]
    assert table.away() == {HOME}
    clock.advance(10)
    assert table.expire() == [long]
    assert table.away() == set()
    assert len(table) == 0
    assert table.expire() == []


def test_renewal_postpones_expiry(table: BindingTable, clock: FakeClock) -> None:
    reg(table, COA1, 10)
    clock.advance(8)
    reg(table, COA1, 10)
    clock.advance(8)
    assert table.expire() == []
    clock.advance(2)
    assert len(table.expire()) == 1


def test_first_away_again_after_expiry(table: BindingTable, clock: FakeClock) -> None:
    reg(table, COA1, 5)
    clock.advance(5)
    table.expire()
    assert reg(table, COA2).first_away


def test_snapshot_remaining(table: BindingTable, clock: FakeClock) -> None:
    reg(table, COA1, 60, s=True)
    reg(table, COA2, 20, s=True)
    clock.advance(12.5)
    snap = {d["care_of_address"]: d for d in table.snapshot()}
    assert snap[COA1]["remaining"] == 47.5
    assert snap[COA2]["remaining"] == 7.5
    assert snap[COA1]["home_address"] == HOME
    assert isinstance(snap[COA1]["gre_key"], int)
    clock.advance(100)
    assert all(d["remaining"] == 0.0 for d in table.snapshot())  # never negative


def test_binding_as_dict_without_now_has_no_remaining() -> None:
    b = Binding(HOME, COA1, "n", 1, 10, 0.0)
    assert "remaining" not in b.as_dict()
    assert b.expires_at == 10
    assert b.remaining(4) == 6


# --- visitor list --------------------------------------------------------------------------


def visitor(home: str, at: float, lifetime: int = 10, name: str = "obj.foa") -> Visitor:
    return Visitor(home, "10.0.1.1", "10.0.2.50", 40000, "obj@home", name, lifetime, at)


def test_visitor_add_get_remove(clock: FakeClock) -> None:
    vl = VisitorList(clock)
    v = visitor(HOME, clock.now)
    vl.add(v)
    assert len(vl) == 1 and vl.get(HOME) is v
    assert vl.get(HOME2) is None
    v2 = visitor(HOME, clock.now, 20, "renamed")
    vl.add(v2)  # same home address: replaced, not duplicated
    assert len(vl) == 1 and vl.get(HOME) is v2
    assert vl.remove(HOME) is v2
    assert vl.remove(HOME) is None
    assert len(vl) == 0


def test_visitor_expire(clock: FakeClock) -> None:
    vl = VisitorList(clock)
    a = visitor(HOME, clock.now, 10)
    b = visitor(HOME2, clock.now, 20)
    vl.add(a)
    vl.add(b)
    clock.advance(9.9)
    assert vl.expire() == []
    clock.advance(0.1)
    assert vl.expire() == [a]
    assert vl.get(HOME) is None and vl.get(HOME2) is b
    snap = vl.snapshot()
    assert len(snap) == 1 and snap[0]["remaining"] == 10.0
    clock.advance(10)
    assert vl.expire() == [b]
    assert len(vl) == 0 and vl.snapshot() == []


def test_gre_keys_are_unpredictable_and_unique_among_live_bindings(clock) -> None:
    """Issue 12: keys drawn at random, never one a live binding has (not 1, 2, 3...)."""
    table = BindingTable(4, clock)
    keys = [table.register(f"10.16.0.{100 + i}", "10.12.0.1", "x", 60, False).binding.gre_key
            for i in range(64)]
    assert len(set(keys)) == 64 and all(1 <= k <= 0xFFFFFFFF for k in keys)
    assert keys != list(range(1, 65))
    renewed = table.register("10.16.0.100", "10.12.0.1", "x", 60, False).binding.gre_key
    assert renewed == keys[0], "a renewal keeps its binding's key"
