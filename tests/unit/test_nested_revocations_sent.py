"""A nested home agent revokes its parts' old bindings at their FOAs (issue 18; RFC 3543
revocation, agent.mobility.revocation), as the router's HOA does.

The object's router is the home agent of its parts (agent.distribution.nested). When a part
registers through another FOA (a break-before-make move), the binding at its previous FOA
goes; that FOA must forget the part at once. Driven here with real bytes through two real
:class:`ForeignAgent` objects (r20a and r18a, both trusting the run's nested-home
credential), a fake socket, a fake tunnel, a fake monotonic clock and a fake timer loop: the
revocation leaves on the registration that made it due, is sent again on the timer with
back-off, stops at the first good acknowledgement, is refused to anything that is not one,
and is bounded.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest

from agent.core.config import Credential, ForeignConfig
from agent.core.wait import async_wait_until
from agent.distribution.nested import NestedHomeAgent, part_configs
from agent.mobility.dataplane import DataPlane
from agent.mobility.foreign import NESTED_HOME_SPI, ForeignAgent, nested_home_credential
from agent.mobility.revocation import FIRST_RETRY, MAX_TRIES
from packets import (
    ExtType,
    NaiExtension,
    ObjectPart,
    PartRole,
    RegistrationReply,
    RegistrationRequest,
    ReplyCode,
    RequestFlags,
    append_auth,
    verify_auth,
)
from packets.codes import MIP_PORT
from packets.ident import new_identification
from packets.mobileip import RegistrationRevocation, RevocationAck, RevocationFlags
from fakeclock import FakeClock
from test_nested_parts import FakeTransport, FakeTunnel, MF, ROUTER_KEY, primary_config

HOME = "10.16.0.100"  # the object's home address: its parts' home agent
TALLY = "10.16.0.224"  # the part's address
R20A, R18A = "10.14.0.1", "10.12.0.1"  # the FOAs' care-of addresses
RX = "10.13.0.1"  # a third FOA (only for the cap on simultaneous bindings)
#: Where each FOA relays from (its backbone address) and where the part runs behind it.
UPLINK = {R20A: "10.255.0.6", R18A: "10.255.0.2", RX: "10.255.0.10"}
PART_AT = {R20A: "10.14.0.1", R18A: "10.12.0.2", RX: "10.13.0.1"}
FH = {R20A: Credential(0x3003, b"foreign-home key of r20a"),
      R18A: Credential(0x3004, b"foreign-home key of r18a"),
      RX: Credential(0x3005, b"foreign-home key of rx")}


@dataclass
class FakeHandle:
    when: float
    callback: Callable[[], None]
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class FakeLoop:
    """``call_later`` on the fake clock: the agent's retry timer, fired by the test."""

    clock: FakeClock
    handles: list[FakeHandle] = field(default_factory=list)

    def call_later(self, delay: float, callback: Callable[[], None]) -> FakeHandle:
        assert delay >= 0
        handle = FakeHandle(self.clock.now + delay, callback)
        self.handles.append(handle)
        return handle

    def armed(self) -> list[FakeHandle]:
        return [h for h in self.handles if not h.cancelled]

    def run_until(self, t: float) -> None:
        """Move the clock to ``t``, firing every timer due by then, in order."""
        while True:
            due = sorted((h for h in self.armed() if h.when <= t), key=lambda h: h.when)
            if not due:
                break
            handle = due[0]
            self.clock.now = max(self.clock.now, handle.when)
            handle.cancelled = True  # fired: a TimerHandle is spent
            handle.callback()
        self.clock.now = max(self.clock.now, t)


class World:
    def __init__(self) -> None:
        self.clock = FakeClock(500.0)
        self.loop = FakeLoop(self.clock)
        self.primary = primary_config()
        self.parts = part_configs(self.primary, ["tally", "gauge"])
        self.agent = NestedHomeAgent(self.primary, self.parts, ROUTER_KEY, "mnh9",
                                     clock=self.clock)
        self.transport = FakeTransport()
        self.agent._transport = self.transport  # what start() would open
        self.agent._loop = self.loop  # type: ignore[assignment]
        self.agent.dataplane = DataPlane(FakeTunnel(), set())
        nested = nested_home_credential(ROUTER_KEY)
        self.foas = {coa: ForeignAgent(ForeignConfig(trusted_objects=[MF], foreign_home=FH[coa]),
                                       name, {coa}, clock=self.clock, nested_home=nested)
                     for coa, name in ((R20A, "r20a"), (R18A, "r18a"), (RX, "rx"))}
        self._ident: int | None = None
        self.identifications: list[int] = []

    def register(self, coa: str, lifetime: int = 60, part: str = "tally",
                 flags: RequestFlags = RequestFlags.G,
                 code: ReplyCode = ReplyCode.ACCEPTED) -> RegistrationReply:
        """The part registers through the FOA at ``coa``; the FOA relays, the nested home
        agent decides, the FOA takes the reply."""
        cfg = self.parts[part]
        self._ident = new_identification(last=self._ident)
        self.identifications.append(self._ident)
        rrq = RegistrationRequest(cfg.home_address, HOME, coa, self._ident, lifetime,
                                  flags, [NaiExtension(cfg.nai),
                                                   ObjectPart(PartRole.SECONDARY, cfg.part_id, "")])
        data = append_auth(rrq.encode(), ExtType.MOBILE_HOME_AUTH, cfg.mobile_home.spi,
                           cfg.mobile_home.key)
        data = append_auth(data, ExtType.MOBILE_FOREIGN_AUTH, MF.spi, MF.key)
        foa = self.foas[coa]
        relay = foa.handle_request(RegistrationRequest.decode(data), PART_AT[coa], 40000)
        assert relay.to_home_agent is not None, relay
        before = len(self.transport.sent)
        self.agent.on_datagram(relay.to_home_agent, (UPLINK[coa], MIP_PORT))
        reply, to = self.transport.sent[before]
        assert to == (UPLINK[coa], MIP_PORT)
        rrp = RegistrationReply.decode(reply)
        assert rrp.code == code, rrp
        if lifetime and code == ReplyCode.ACCEPTED:
            assert foa.handle_reply(rrp, HOME) is not None, foa.stats
        else:
            foa.handle_reply(rrp, HOME)
        return rrp

    def revocations(self) -> list[tuple[RegistrationRevocation, bytes, tuple]]:
        """Every revocation the agent sent, in order: decoded, raw, and where to."""
        return [(RegistrationRevocation.decode(d), d, to) for d, to in self.transport.sent
                if d[0] == 7]

    def visitors(self, coa: str) -> list[str]:
        return [v.home_address for v in self.foas[coa].visitors.snapshot_objects()]

    def deliver(self, data: bytes, coa: str) -> bytes:
        """The revocation into the FOA at ``coa`` (from the object's home address, the
        socket's): its signed acknowledgement."""
        ack, _gone = self.foas[coa].handle_revocation(RegistrationRevocation.decode(data), HOME)
        return ack

    def ack_in(self, data: bytes, source: str) -> None:
        self.agent.on_datagram(data, (source, MIP_PORT))


@pytest.fixture
def world() -> World:
    return World()


def moved(world: World) -> tuple[RegistrationRevocation, bytes]:
    """tally at r20a, then at r18a (break-before-make): the one revocation it made."""
    world.register(R20A)
    assert world.visitors(R20A) == [TALLY] and world.revocations() == []
    assert world.loop.armed() == [], "nothing pending: no timer"
    world.register(R18A)
    ((rev, data, to),) = world.revocations()
    return rev, data


def test_the_old_foa_is_revoked_on_the_registration_that_replaced_its_binding(
        world: World) -> None:
    rev, data = moved(world)
    # To the old care-of address, UDP 434, naming the part, its home agent (the object's
    # home address, the socket's), the old care-of address and the revoked registration.
    assert world.transport.sent[-1][1] == (R20A, MIP_PORT)
    assert (rev.home_address, rev.home_agent, rev.care_of_address, rev.registration_id,
            rev.flags) == (TALLY, HOME, R20A, world.identifications[0], RevocationFlags.A)
    # Signed Foreign-Home under the run's nested-home credential, which r20a accepted the
    # binding under; no other key makes it.
    nested = nested_home_credential(ROUTER_KEY)
    assert verify_auth(rev, ExtType.FOREIGN_HOME_AUTH, {NESTED_HOME_SPI: nested.key})
    assert not verify_auth(rev, ExtType.FOREIGN_HOME_AUTH, {FH[R20A].spi: FH[R20A].key})
    assert not verify_auth(rev, ExtType.FOREIGN_HOME_AUTH,
                           {NESTED_HOME_SPI: nested_home_credential(bytes(32)).key})
    # The reply to r18a left first, then the revocation (the new binding is in place).
    kinds = [d[0] for d, _ in world.transport.sent]
    assert kinds == [3, 3, 7], kinds
    # r20a acts on it: the visitor goes, the acknowledgement is signed the same way.
    assert world.visitors(R20A) == [TALLY]
    ack = world.deliver(data, R20A)
    assert world.visitors(R20A) == [] and world.visitors(R18A) == [TALLY]
    assert world.foas[R20A].stats["revoked_visitors"] == 1
    # The acknowledgement ends it: nothing pending, no timer, nothing more is sent.
    world.ack_in(ack, R20A)
    status = world.agent.revocations()
    assert (status["sent"], status["acknowledged"], status["pending"], status["retried"]) == \
        (1, 1, 0, 0), status
    assert world.loop.armed() == []
    sent = len(world.transport.sent)
    world.loop.run_until(world.clock.now + 60)
    assert len(world.transport.sent) == sent


def test_an_unacknowledged_revocation_is_sent_again_with_back_off_then_stops_on_the_ack(
        world: World) -> None:
    t0 = world.clock.now
    _rev, data = moved(world)
    (timer,) = world.loop.armed()
    assert timer.when == pytest.approx(t0 + FIRST_RETRY)
    # Lost twice: sent again at +0.2 and +0.6 s (0.2, then 0.4 after), the same bytes.
    world.loop.run_until(t0 + FIRST_RETRY - 0.01)
    assert len(world.revocations()) == 1
    world.loop.run_until(t0 + FIRST_RETRY)
    world.loop.run_until(t0 + 3 * FIRST_RETRY)
    sends = world.revocations()
    assert [(d, to) for _r, d, to in sends] == [(data, (R20A, MIP_PORT))] * 3
    (timer,) = world.loop.armed()
    assert timer.when == pytest.approx(t0 + 7 * FIRST_RETRY)
    # The FOA answers the third; the acknowledgement stops the retries.
    world.ack_in(world.deliver(data, R20A), R20A)
    assert world.loop.armed() == []
    world.loop.run_until(t0 + 60)
    assert len(world.revocations()) == 3
    status = world.agent.revocations()
    assert (status["sent"], status["retried"], status["acknowledged"], status["given_up"]) == \
        (1, 2, 1, 0), status
    assert status["ack_delays_ms"] == [pytest.approx(3 * FIRST_RETRY * 1000)]


def test_retries_are_bounded_and_then_the_visitor_is_left_to_expire(world: World) -> None:
    t0 = world.clock.now
    moved(world)
    world.loop.run_until(t0 + 120)
    sends = world.revocations()
    assert len(sends) == MAX_TRIES
    # Each after the last, twice as long (0.2, 0.4, ... s).
    assert world.loop.armed() == []
    status = world.agent.revocations()
    assert (status["sent"], status["retried"], status["given_up"], status["pending"]) == \
        (1, MAX_TRIES - 1, 1, 0), status
    assert world.visitors(R20A) == [TALLY]  # never reached: it expires there as before


def test_the_retries_are_timed_by_the_clock(world: World) -> None:
    """The sends' times, from the timer, are 0, 0.2, 0.6, 1.4, 3.0, 6.2 s after the move."""
    t0 = world.clock.now
    moved(world)
    times = [0.0]
    while world.loop.armed():
        (timer,) = world.loop.armed()
        before = len(world.revocations())
        world.loop.run_until(timer.when)
        if len(world.revocations()) > before:
            times.append(round(world.clock.now - t0, 6))
    expected, gap = [0.0], FIRST_RETRY
    for _ in range(MAX_TRIES - 1):
        expected.append(round(expected[-1] + gap, 6))
        gap *= 2
    assert times == expected


def _bad_acks(world: World, ack: bytes) -> dict[str, tuple[bytes, str]]:
    good = RevocationAck.decode(ack)
    nested = nested_home_credential(ROUTER_KEY)

    def signed(a: RevocationAck, cred: Credential = nested) -> bytes:
        return append_auth(a.encode(), ExtType.FOREIGN_HOME_AUTH, cred.spi, cred.key)

    return {
        "another source": (ack, R18A),
        "an unknown revocation id": (signed(RevocationAck(TALLY, good.revocation_id + 1)), R20A),
        "another home address": (signed(RevocationAck("10.16.0.225", good.revocation_id)), R20A),
        "the I flag": (signed(RevocationAck(TALLY, good.revocation_id, RevocationFlags.I)), R20A),
        "a reserved flag bit": (signed(RevocationAck(TALLY, good.revocation_id,
                                                     RevocationFlags(0x0001))), R20A),
        "another key": (signed(RevocationAck(TALLY, good.revocation_id),
                               Credential(NESTED_HOME_SPI, b"a guess")), R20A),
        "r20a's own HOA key": (signed(RevocationAck(TALLY, good.revocation_id), FH[R20A]), R20A),
        "an extension after the authenticator": (signed(good), R20A),
        "no authenticator": (RevocationAck(TALLY, good.revocation_id).encode(), R20A),
    }


@pytest.mark.parametrize("case", ["another source", "an unknown revocation id",
                                  "another home address", "the I flag", "a reserved flag bit",
                                  "another key", "r20a's own HOA key",
                                  "an extension after the authenticator", "no authenticator"])
def test_anything_but_the_foas_own_acknowledgement_changes_nothing(world: World,
                                                                   case: str) -> None:
    t0 = world.clock.now
    _rev, data = moved(world)
    ack = world.deliver(data, R20A)
    bad, source = _bad_acks(world, ack)[case]
    world.ack_in(bad, source)
    status = world.agent.revocations()
    assert (status["bad_acks"], status["acknowledged"], status["pending"]) == (1, 0, 1), status
    assert world.agent.malformed == 0  # well-formed: refused by the revoker, not the decoder
    # The retries go on, and the real acknowledgement still ends them.
    world.loop.run_until(t0 + FIRST_RETRY)
    assert len(world.revocations()) == 2
    world.ack_in(ack, R20A)
    assert world.agent.revocations()["acknowledged"] == 1 and world.loop.armed() == []


def test_a_truncated_acknowledgement_is_malformed_and_changes_nothing(world: World) -> None:
    _rev, data = moved(world)
    ack = world.deliver(data, R20A)
    world.ack_in(ack[:13], R20A)
    assert world.agent.malformed == 1
    assert world.agent.revocations()["pending"] == 1 and len(world.loop.armed()) == 1


def test_a_revocation_sent_to_the_nested_home_agent_is_not_taken(world: World) -> None:
    """It is the home agent, not an FOA: a revocation that reaches it is dropped, counted."""
    _rev, data = moved(world)
    world.ack_in(data, R20A)
    assert world.agent.malformed == 1 and world.agent.revocations()["pending"] == 1


def test_a_deregistration_through_the_old_foa_needs_no_revocation(world: World) -> None:
    """The part given back: it deregisters through its FOA, which drops its visitor when
    it relays the acceptance."""
    world.register(R20A)
    world.register(R20A, lifetime=0)
    assert world.revocations() == [] and world.loop.armed() == []
    assert world.visitors(R20A) == [] and world.agent.bindings() == []


def test_a_renewal_through_the_same_foa_revokes_nothing(world: World) -> None:
    world.register(R20A)
    world.register(R20A)
    assert world.revocations() == [] and world.visitors(R20A) == [TALLY]


def test_make_before_break_binds_the_target_beside_and_the_source_deregisters_through_its_foa(
        world: World) -> None:
    """A part's make-before-break move: the target registers with S beside the source's
    binding (bicast; a third is refused 135), then the source deregisters through the FOA it
    leaves, which drops its visitor itself: no revocation is needed or sent."""
    world.register(R20A)
    world.register(R18A, flags=RequestFlags.G | RequestFlags.S)
    assert sorted(b["care_of_address"] for b in world.agent.bindings()) == [R18A, R20A]
    peers = world.agent.dataplane.tunnel.peers[TALLY]  # type: ignore[union-attr]
    assert sorted(coa for coa, _key in peers) == [R18A, R20A]
    world.register(RX, flags=RequestFlags.G | RequestFlags.S,
                   code=ReplyCode.HA_TOO_MANY_SIMULTANEOUS_BINDINGS)
    world.register(R20A, lifetime=0)
    assert [b["care_of_address"] for b in world.agent.bindings()] == [R18A]
    assert world.visitors(R20A) == [] and world.visitors(R18A) == [TALLY]
    assert world.revocations() == [] and world.loop.armed() == []


def test_moving_twice_revokes_each_previous_foa_once(world: World) -> None:
    """r20a → r18a → r20a: r20a then r18a forget the part; the second revocation's id is
    above the first's (r20a's floor), and r20a acts on it after its visitor came back."""
    _rev, data = moved(world)
    world.ack_in(world.deliver(data, R20A), R20A)
    world.register(R20A)
    sends = world.revocations()
    assert [(r.care_of_address, r.registration_id) for r, _d, _to in sends] == \
        [(R20A, world.identifications[0]), (R18A, world.identifications[1])]
    assert sends[1][0].revocation_id > sends[0][0].revocation_id
    world.ack_in(world.deliver(sends[1][1], R18A), R18A)
    assert world.visitors(R18A) == [] and world.visitors(R20A) == [TALLY]
    status = world.agent.revocations()
    assert (status["sent"], status["acknowledged"], status["pending"]) == (2, 2, 0), status
    assert world.loop.armed() == []


def test_close_stops_the_retries(world: World) -> None:
    moved(world)
    (timer,) = world.loop.armed()
    asyncio.run(world.agent.close())
    assert timer.cancelled and world.loop.armed() == []


def test_on_a_real_loop_the_timer_sends_again_without_blocking(world: World) -> None:
    """The same wiring on asyncio's loop (real time): the retry goes out from the timer
    while the loop is free, and the acknowledgement cancels the next one."""
    agent, transport = world.agent, world.transport

    async def scenario() -> tuple[int, Any]:
        agent._loop = asyncio.get_running_loop()
        agent.home.revoker.clock = world.clock  # the revoker keeps the fake clock ...
        world.register(R20A)
        world.register(R18A)
        world.clock.advance(FIRST_RETRY)  # ... so its retry is due at once on the loop
        await async_wait_until(lambda: len(world.revocations()) == 2, 5, interval=0.005,
                               what="the retry from the timer")
        rev_data = world.revocations()[-1][1]
        world.ack_in(world.deliver(rev_data, R20A), R20A)
        return len(transport.sent), agent._revocation_timer

    sent, timer = asyncio.run(scenario())
    assert timer is None and len(world.revocations()) == 2 and sent == 4
