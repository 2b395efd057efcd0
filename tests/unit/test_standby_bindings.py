"""Standby bindings (issue 14): a make-before-break move from home keeps the home link on the
instance at home until its switch, and a warm instance on the home link stays dark until it
goes live. The binding table's rules on a fake clock, the journal's record of them, and the
registration client's leave-home / dark / go-live against the real HOA logic on virtual time."""

from __future__ import annotations

import pytest

from agent.mobility.bindings import BindingTable
from agent.mobility.journal import binding_fields
from fakeclock import FakeClock
from packets import ExtType, RequestFlags
from test_registration_client import (COA1, FOA1, HA, HOME, HOME_AGENT, T0, World, ext_types,
                                      run_virtual, until)

COA = "10.0.2.1"
COA2 = "10.0.3.1"


@pytest.fixture
def table() -> BindingTable:
    return BindingTable(max_bindings=2, clock=FakeClock(1000.0))


def at_home(table: BindingTable) -> None:
    """The object says it is at home: a direct deregistration (no S)."""
    table.register(HOME, HOME, "", 0, False)


def warm(table: BindingTable, coa: str = COA, part: str = "primary"):
    return table.register(HOME, coa, "r18b", 60, True, part=part)


def test_a_warm_primary_registered_while_at_home_is_standby_and_not_served(table: BindingTable) -> None:
    at_home(table)
    result = warm(table)
    assert result.binding is not None and result.binding.standby
    assert not result.first_away  # nothing to claim on the home link yet
    assert table.for_home(HOME) == [result.binding]
    assert HOME not in table.served()  # no proxy ARP, no tunnel
    assert HOME in table.take_changed()  # looked at again, and found unserved


def test_leave_home_serves_the_standby_binding_and_keeps_it(table: BindingTable) -> None:
    at_home(table)
    binding = warm(table).binding
    table.take_changed()
    result = table.register(HOME, HOME, "", 0, True)  # leave-home: lifetime 0, S, care-of home
    assert result.binding is None and result.removed == []
    assert result.activated == [binding] and result.first_away
    assert table.served()[HOME] == (binding,) and not binding.standby
    assert HOME in table.take_changed()
    assert HOME not in table.at_home
    renewed = warm(table).binding  # its renewals (with S) stay served
    assert renewed is not None and not renewed.standby and table.served()[HOME] == (renewed,)


def test_a_renewal_before_leave_home_stays_standby(table: BindingTable) -> None:
    at_home(table)
    warm(table)
    again = warm(table).binding
    assert again is not None and again.standby and HOME not in table.served()


def test_away_a_warm_binding_is_served_beside_the_other_bicast(table: BindingTable) -> None:
    """Not at home (registered away without S): the warm instance's binding is served at
    once beside the source's, as before standby bindings."""
    at_home(table)
    source = table.register(HOME, COA2, "r20a", 60, False).binding
    assert HOME not in table.at_home
    target = warm(table).binding
    assert target is not None and not target.standby
    assert table.served()[HOME] == (source, target)


def test_without_a_word_from_home_a_warm_binding_is_served(table: BindingTable) -> None:
    """After an HOA restart nothing says the object is at home: served (the old way)."""
    assert not warm(table).binding.standby
    assert HOME in table.served()


def test_a_duplicate_is_never_standby(table: BindingTable) -> None:
    at_home(table)
    dup = warm(table, part="duplicate").binding
    assert dup is not None and not dup.standby and HOME in table.served()


def test_a_failed_move_deregisters_its_standby_binding_and_the_object_stays_home(
        table: BindingTable) -> None:
    at_home(table)
    warm(table)
    result = table.register(HOME, COA, "r18b", 0, True)  # the target's instance goes
    assert len(result.removed) == 1 and table.for_home(HOME) == []
    assert HOME in table.at_home  # the instance at home serves on
    assert warm(table).binding.standby  # the next try waits again


def test_back_home_clears_the_bindings_and_says_at_home(table: BindingTable) -> None:
    table.register(HOME, COA2, "r20a", 60, False)
    result = table.register(HOME, HOME, "", 0, False)
    assert result.now_home and table.for_home(HOME) == [] and HOME in table.at_home


def test_the_journal_keeps_standby(table: BindingTable) -> None:
    at_home(table)
    binding = warm(table).binding
    doc = {k: v for k, v in binding.as_dict().items() if k != "registered_at"}
    assert binding_fields(doc)["standby"] is True
    del doc["standby"]  # a journal written before standby bindings: served
    assert binding_fields(doc)["standby"] is False
    with pytest.raises(ValueError):
        binding_fields(dict(doc, standby="yes"))


# --- the registration client -----------------------------------------------------------


def test_a_dark_instance_at_home_neither_deregisters_nor_announces_until_it_goes_live() -> None:
    w = World()

    async def main() -> None:
        c = w.client()
        c.dark = True
        await c.start()
        w.advertise(HA, T0, T0 + 10, flags=HOME_AGENT, ifindex=1)
        await until(w.clock, T0 + 3)
        assert c.at_home and w.net.to(HA) == [] and w.announced == []
        await c.go_live()
        [dereg] = w.net.to(HA)  # every binding deregistered directly, then announced
        assert w.announced == [(1, HOME)]
        await until(w.clock, T0 + 5)
        await c.stop(deregister=False)
        assert w.net.to(HA) == [dereg]  # nothing more: its loop finds it home
        rrq = dereg.request
        assert (rrq.lifetime, rrq.care_of_address, rrq.flags & RequestFlags.S) == (0, HOME, 0)

    run_virtual(w.clock, main)
    assert HOME in w.hoa.bindings.at_home
    assert not w.c.dark and w.c.at_home


def test_leave_home_activates_the_targets_standby_binding_at_the_real_hoa() -> None:
    w = World()

    async def main() -> None:
        c = w.client()
        await c.start()
        w.advertise(HA, T0, T0 + 10, flags=HOME_AGENT, ifindex=1)
        await until(w.clock, T0 + 2)
        assert c.at_home and HOME in w.hoa.bindings.at_home
        # A warm instance elsewhere registers with S through an FOA: standby.
        w.hoa.bindings.register(HOME, COA1, "r18b", 60, True)
        assert HOME not in w.hoa.bindings.served()
        attempt = await c.leave_home()
        assert attempt.code == 0, attempt
        await until(w.clock, T0 + 6)  # its loop must not claim the home link back
        await c.stop(deregister=False)

    run_virtual(w.clock, main)
    leave = w.net.to(HA)[-1].request
    assert (leave.lifetime, leave.care_of_address) == (0, HOME)
    assert leave.flags & RequestFlags.S
    assert ext_types(leave) == [ExtType.MN_NAI, ExtType.MOBILE_HOME_AUTH]
    assert len(w.net.to(HA)) == 2  # the first claim at start, then the leave-home only
    [served] = w.hoa.bindings.served()[HOME]
    assert served.care_of_address == COA1 and not served.standby
    assert FOA1 not in [s.dest for s in w.net.sent]
