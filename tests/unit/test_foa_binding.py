"""Issue 12, item 5: the FOA keeps a visitor where it first registered, and only the HOA a
request was relayed to can answer it.

Real FOA and HOA logic (the World of test_agent_foreign) on fake clocks: a request replayed
from another host or interface is refused with 65 and changes nothing; a reply, acceptance or
denial, from any address but the HOA's is dropped and leaves the relay pending.
"""

from __future__ import annotations

import pytest

from packets import ExtType, RegistrationReply, ReplyCode, append_auth
from test_agent_foreign import COA, HA, HOME, MH, OBJ_ADDR, OBJ_PORT, World

ELSEWHERE = "10.0.2.66"  # another host on the foreign LAN
THIRD = "10.0.9.9"  # neither the object, nor the FOA, nor the HOA


@pytest.fixture
def world() -> World:
    return World()


def registered(world: World, interface: str = "eth1") -> None:
    relay = world.foa.handle_request(world.object_request(HOME), OBJ_ADDR, OBJ_PORT, interface)
    assert relay.to_home_agent is not None
    assert world.foa.handle_reply(world.hoa_reply(relay.to_home_agent), HA) is not None
    visitor = world.foa.visitors.get(HOME, COA)
    assert (visitor.local_address, visitor.local_interface) == (OBJ_ADDR, interface)


def test_a_replay_from_another_host_is_refused_with_65_and_moves_nothing(world: World) -> None:
    registered(world)
    before = world.foa.visitors.snapshot()
    replay = world.object_request(HOME)  # authentic bytes, as an eavesdropper replays them
    relay = world.foa.handle_request(replay, ELSEWHERE, OBJ_PORT, "eth1")
    assert relay.to_home_agent is None and relay.to_object is not None
    assert RegistrationReply.decode(relay.to_object).code == ReplyCode.FA_ADMIN_PROHIBITED == 65
    assert world.foa.visitors.snapshot() == before
    assert (HOME, replay.identification) not in world.foa.pending
    assert world.foa.stats["bound_elsewhere"] == 1


def test_a_request_from_the_same_address_on_another_interface_is_refused(world: World) -> None:
    registered(world, "eth1")
    relay = world.foa.handle_request(world.object_request(HOME), OBJ_ADDR, OBJ_PORT, "eth0")
    assert relay.code == ReplyCode.FA_ADMIN_PROHIBITED
    assert world.foa.visitors.get(HOME, COA).local_interface == "eth1"


def test_a_request_while_the_first_relay_is_pending_cannot_take_it_over(world: World) -> None:
    first = world.object_request(HOME)
    world.foa.handle_request(first, OBJ_ADDR, OBJ_PORT, "eth1")
    relay = world.foa.handle_request(world.object_request(HOME), ELSEWHERE, OBJ_PORT, "eth1")
    assert relay.code == ReplyCode.FA_ADMIN_PROHIBITED
    assert [p.object_address for p in world.foa.pending.values()] == [OBJ_ADDR]


def test_renewal_and_deregistration_from_the_same_place_still_work(world: World) -> None:
    registered(world)
    world.clock.advance(30)
    relay = world.foa.handle_request(world.object_request(HOME), OBJ_ADDR, OBJ_PORT + 1, "eth1")
    assert relay.to_home_agent is not None  # a restarted client (new port) on the same host
    out = world.foa.handle_reply(world.hoa_reply(relay.to_home_agent), HA)
    assert out is not None and world.foa.visitors.get(HOME, COA).registered_at == world.clock.now
    relay = world.foa.handle_request(world.object_request(HOME, lifetime=0), OBJ_ADDR, OBJ_PORT,
                                     "eth1")
    assert world.foa.handle_reply(world.hoa_reply(relay.to_home_agent), HA) is not None
    assert world.foa.visitors.get(HOME, COA) is None


def test_once_the_binding_is_gone_another_place_may_register(world: World) -> None:
    registered(world)
    world.clock.advance(61)
    assert world.foa.visitors.expire()
    relay = world.foa.handle_request(world.object_request(HOME), ELSEWHERE, OBJ_PORT, "eth1")
    assert relay.to_home_agent is not None


def test_the_other_care_of_address_is_another_visitor(world: World) -> None:
    """Two instances of one object at two care-of addresses (a duplicate on the FOA's router
    itself, patent 104/108) are two visitors, each bound to its own place."""
    registered(world)
    relay = world.foa.handle_request(world.object_request(HOME, coa="10.0.2.254"), "10.0.2.254",
                                     OBJ_PORT, "lo")
    assert relay.to_home_agent is not None


def test_a_denial_from_a_third_address_leaves_the_relay_for_the_hoas_acceptance(
        world: World) -> None:
    rrq = world.object_request(HOME)
    relay = world.foa.handle_request(rrq, OBJ_ADDR, OBJ_PORT, "eth1")
    denial = append_auth(RegistrationReply(ReplyCode.HA_ADMIN_PROHIBITED, HOME, HA,
                                           rrq.identification, 0).encode(),
                         ExtType.MOBILE_HOME_AUTH, 0x999, b"anything")
    assert world.foa.handle_reply(RegistrationReply.decode(denial), THIRD) is None
    assert world.foa.stats["wrong_source_replies"] == 1
    assert (HOME, rrq.identification) in world.foa.pending
    result = world.foa.handle_reply(world.hoa_reply(relay.to_home_agent), HA)
    assert result is not None
    pending, out = result
    assert (pending.object_address, pending.object_port) == (OBJ_ADDR, OBJ_PORT)
    assert RegistrationReply.decode(out).code == ReplyCode.ACCEPTED
    assert world.foa.visitors.get(HOME, COA) is not None


def test_even_a_genuine_acceptance_counts_only_from_the_hoa_it_was_relayed_to(
        world: World) -> None:
    rrq = world.object_request(HOME)
    relay = world.foa.handle_request(rrq, OBJ_ADDR, OBJ_PORT, "eth1")
    acceptance = world.hoa_reply(relay.to_home_agent)
    assert world.foa.handle_reply(acceptance, THIRD) is None
    assert world.foa.visitors.get(HOME, COA) is None
    assert world.foa.handle_reply(acceptance, HA) is not None
    assert MH[HOME]  # the object's keys were never needed by the third address
