"""agent.mobility.client.RegistrationClient as a state machine: registration, renewal, fallback,
movement, return home and deregistration, on virtual time and with no socket.

The client runs its real loop (``start``/``_run``/``_step``) on an event loop whose clock is
the same :class:`FakeClock` the client reads: when nothing is ready, the loop jumps the clock
to its next timer instead of waiting, so a 45 s lifetime, the retransmission back-off and
advertisements every second take milliseconds, and timings are exact. The client's UDP socket
is an injected transport (:class:`Network`) that records every datagram with the virtual
time it left and hands it to the agent at its destination: real ``ForeignAgent`` and
``HomeAgent`` role logic (which check the object's authenticators as on the wire), or an
agent that misbehaves on purpose (silent, denying, forging, answering another
Identification).
"""

from __future__ import annotations

import asyncio
import selectors
from dataclasses import dataclass
from typing import Awaitable, Callable, TypeVar

import pytest

from agent.core.config import Credential, ForeignConfig, HomeConfig, HomeObject, ObjectConfig
from agent.mobility import client as client_mod
from agent.mobility.client import RegistrationClient
from agent.mobility.foreign import ForeignAgent
from agent.mobility.home import HomeAgent
from packets import (
    AdvFlags,
    AgentAdvertisement,
    AuthExtension,
    ExtType,
    NaiExtension,
    ObjectPart,
    RegistrationReply,
    RegistrationRequest,
    ReplyCode,
    append_auth,
    verify_auth,
)
from packets.codes import MIP_PORT
from fakeclock import FakeClock

HOME, HA = "10.0.1.10", "10.0.1.1"
FOA1, FOA2 = "10.0.2.1", "10.0.3.1"  # FOA1 has the lower address: the client's first choice
COA1, COA2 = "10.0.2.254", "10.0.3.254"  # advertised care-of addresses, not the FOAs' own
MH = Credential(0x1001, b"mobile-home key")
MF = Credential(0x2002, b"mobile-foreign key")
FH = Credential(0x3003, b"foreign-home key")
STRANGER = Credential(0x2999, b"some other object's key")
INTERVAL = 1.0  # advertisement interval
REQUESTED = 45  # the object's configured lifetime
T0 = 1000.0

FOREIGN = AdvFlags.F | AdvFlags.G
HOME_AGENT = AdvFlags.H | AdvFlags.G

T = TypeVar("T")


# --- virtual time ------------------------------------------------------------------------------


#: Virtual time one turn of the event loop costs. Without it a timer computed as "now plus
#: a remainder" that rounds to now (0.25 - 0.2 < 0.05 in floating point) would fire forever
#: at the same instant; with a real clock time always moves on.
TICK = 1e-6
#: Tolerance of timing assertions: many loop turns of TICK.
SLACK = 1e-3


class _VirtualSelector(selectors.DefaultSelector):  # type: ignore[misc, valid-type]
    """Polls the real descriptors (only the loop's self-pipe here) without blocking; where
    the loop would block until its next timer, moves the fake clock there instead."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__()
        self.clock = clock

    def select(self, timeout: float | None = None) -> list:
        ready = super().select(0)
        if ready or timeout == 0:
            self.clock.advance(TICK)
            return ready
        if timeout is None:
            raise RuntimeError("deadlock: nothing scheduled and nothing to wait for")
        self.clock.advance(timeout)
        return []


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop whose ``time()`` is the fake clock, advanced only by idle waits."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(_VirtualSelector(clock))
        self._fake = clock

    def time(self) -> float:
        return self._fake.now


def run_virtual(clock: FakeClock, main: Callable[[], Awaitable[T]]) -> T:
    """Run ``main`` on virtual time; then cancel what is left (advertisers, the client)."""
    loop = VirtualTimeLoop(clock)
    try:
        return loop.run_until_complete(main())
    finally:
        left = asyncio.all_tasks(loop)
        for task in left:
            task.cancel()
        if left:
            loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
        loop.close()


# --- the network around the client -------------------------------------------------------------


Agent = Callable[[bytes], list[bytes]]


@dataclass
class Sent:
    at: float
    dest: str
    port: int
    data: bytes

    @property
    def request(self) -> RegistrationRequest:
        return RegistrationRequest.decode(self.data)


class Network:
    """The client's transport: records what it sends; the agent at the destination (if any)
    answers on the next loop turn, as a datagram would arrive."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.sent: list[Sent] = []
        self.agents: dict[str, Agent] = {}
        self.client: RegistrationClient | None = None
        self.closed = False

    def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        self.sent.append(Sent(self.clock.now, addr[0], addr[1], bytes(data)))
        agent = self.agents.get(addr[0])
        if agent is None:
            return  # nobody there: silence
        assert self.client is not None
        loop = asyncio.get_running_loop()
        for reply in agent(bytes(data)):
            loop.call_soon(self.client._on_reply, reply, (addr[0], MIP_PORT))

    def close(self) -> None:
        self.closed = True

    def to(self, dest: str) -> list[Sent]:
        return [s for s in self.sent if s.dest == dest]


def foa_relay(foa: ForeignAgent, hoa: HomeAgent) -> Agent:
    """A working FOA in front of the HOA: the real relay rules both ways."""

    def answer(data: bytes) -> list[bytes]:
        relay = foa.handle_request(RegistrationRequest.decode(data), "10.0.9.50", 40000)
        if relay.to_object is not None:
            return [relay.to_object]
        assert relay.to_home_agent is not None
        decision = hoa.handle(RegistrationRequest.decode(relay.to_home_agent))
        out = foa.handle_reply(RegistrationReply.decode(decision.reply), hoa.address)
        return [] if out is None else [out[1]]

    return answer


def hoa_direct(hoa: HomeAgent) -> Agent:
    return lambda data: [hoa.handle(RegistrationRequest.decode(data)).reply]


def forged_acceptance(key: bytes = b"not the mobile-home key", ident_offset: int = 0) -> Agent:
    """An agent that accepts everything with a reply the HOA did not sign (wrong key), or
    one signed correctly but for another Identification."""

    def answer(data: bytes) -> list[bytes]:
        rrq = RegistrationRequest.decode(data)
        rrp = RegistrationReply(ReplyCode.ACCEPTED, HOME, HA, rrq.identification + ident_offset,
                                rrq.lifetime).encode()
        return [append_auth(rrp, ExtType.MOBILE_HOME_AUTH, MH.spi, key)]

    return answer


class World:
    """One object's registration client, its HOA and two FOAs, on one fake clock."""

    def __init__(self, *, hoa_max_lifetime: int = 300, distrusted_by: tuple[str, ...] = ()) -> None:
        """``distrusted_by``: FOAs that do not know the object's Mobile-Foreign key (they
        deny with 67, as the real FOA does)."""
        self.clock = FakeClock(T0)
        self.hoa = HomeAgent(HomeConfig([HomeObject(HOME, "cam@home.moat", MH)], [FH],
                                        max_lifetime=hoa_max_lifetime), HA, clock=self.clock)
        self.foa1 = ForeignAgent(ForeignConfig([STRANGER if FOA1 in distrusted_by else MF], FH),
                                 "foa1", {COA1}, clock=self.clock)
        self.foa2 = ForeignAgent(ForeignConfig([STRANGER if FOA2 in distrusted_by else MF], FH),
                                 "foa2", {COA2}, clock=self.clock)
        self.net = Network(self.clock)
        self.net.agents = {FOA1: foa_relay(self.foa1, self.hoa), FOA2: foa_relay(self.foa2, self.hoa),
                           HA: hoa_direct(self.hoa)}
        self.solicited = 0
        self.announced: list[tuple[int, str]] = []
        self.last_heard: dict[str, float] = {}
        self.first_heard: dict[str, float] = {}
        self._seq: dict[str, int] = {}

    def client(self) -> RegistrationClient:
        """Create it inside the running loop (it owns an asyncio.Event)."""
        cfg = ObjectConfig("cam", HOME, HA, "cam@home.moat", MH, MF, lifetime=REQUESTED)
        c = RegistrationClient(cfg, self._solicit, INTERVAL,
                               announce=lambda ifindex, address: self.announced.append((ifindex, address)),
                               clock=self.clock, transport=self.net)  # type: ignore[arg-type]
        self.net.client = c
        self.c = c
        return c

    def _solicit(self) -> None:
        self.solicited += 1

    def hear(self, address: str, flags: AdvFlags = FOREIGN, ifindex: int = 2) -> None:
        self._seq[address] = self._seq.get(address, 0) + 1
        coas = {FOA1: [COA1], FOA2: [COA2]}.get(address, [])
        self.c.on_advertisement(AgentAdvertisement(self._seq[address], 300, flags, coas), address, ifindex)
        self.last_heard[address] = self.clock.now
        self.first_heard.setdefault(address, self.clock.now)

    def advertise(self, address: str, start: float, stop: float, flags: AdvFlags = FOREIGN,
                  ifindex: int = 2) -> asyncio.Task:
        """Advertisements every INTERVAL from virtual time ``start`` until before ``stop``."""

        async def loop() -> None:
            await asyncio.sleep(max(0.0, start - self.clock.now))
            while self.clock.now < stop:
                self.hear(address, flags, ifindex)
                await asyncio.sleep(INTERVAL)

        return asyncio.get_running_loop().create_task(loop())

    def keep_hearing(self, *addresses: str, duration: float = 60.0) -> None:
        """Hear each agent now, and from then on every INTERVAL (they stay fresh)."""
        for address in addresses:
            self.hear(address)
            self.advertise(address, self.clock.now + INTERVAL, self.clock.now + duration)


async def until(clock: FakeClock, t: float) -> None:
    """Let every task run up to virtual time ``t``."""
    await asyncio.sleep(t - clock.now)


def ext_types(rrq: RegistrationRequest) -> list[int]:
    return [int(e.ext_type) for e in rrq.extensions]


# --- registration ------------------------------------------------------------------------------


def test_registers_through_the_advertised_foa_with_its_extensions_and_authenticators() -> None:
    """Protects the request itself: sent to the FOA that advertised, port 434, for the
    advertised care-of address, with MN-NAI, object part, Mobile-Home then Mobile-Foreign
    (valid under the object's keys), and the granted registration is recorded."""
    w = World()

    async def main() -> None:
        c = w.client()
        w.hear(FOA1)
        attempt = await c.register()
        [sent] = w.net.sent
        assert (sent.dest, sent.port) == (FOA1, MIP_PORT)
        rrq = sent.request
        assert (rrq.home_address, rrq.home_agent, rrq.care_of_address) == (HOME, HA, COA1)
        assert rrq.lifetime == REQUESTED
        assert ext_types(rrq) == [ExtType.MN_NAI, ExtType.NVSE, ExtType.MOBILE_HOME_AUTH,
                                  ExtType.MOBILE_FOREIGN_AUTH]
        assert rrq.find(NaiExtension) == [NaiExtension("cam@home.moat")]
        assert len(rrq.find(ObjectPart)) == 1
        mh, mf = [e for e in rrq.extensions if isinstance(e, AuthExtension)]
        assert (mh.spi, mf.spi) == (MH.spi, MF.spi)
        assert verify_auth(rrq, ExtType.MOBILE_HOME_AUTH, {MH.spi: MH.key})
        assert verify_auth(rrq, ExtType.MOBILE_FOREIGN_AUTH, {MF.spi: MF.key})

        assert attempt.code == ReplyCode.ACCEPTED and attempt.agent == FOA1
        assert c.current is not None
        assert (c.current.agent, c.current.care_of_address, c.current.care_of_name) == (FOA1, COA1, "cam.foa1")
        assert c.current.lifetime == REQUESTED and c.current.registered_at == sent.at
        [binding] = w.hoa.bindings.for_home(HOME)
        assert (binding.care_of_address, binding.care_of_name) == (COA1, "cam.foa1")
        assert c.bad_replies == 0

    run_virtual(w.clock, main)


def test_first_registration_after_start_goes_through_the_lowest_fresh_foa() -> None:
    """Protects the loop's first step: after start() it solicits, waits for advertisements,
    and registers once through the first candidate (not once per agent heard)."""
    w = World()

    async def main() -> None:
        c = w.client()
        await c.start()
        assert w.solicited >= 1
        w.advertise(FOA2, T0 + 0.2, T0 + 5)
        w.advertise(FOA1, T0 + 0.21, T0 + 5)
        await until(w.clock, T0 + 5)
        await c.stop(deregister=False)
        assert [s.dest for s in w.net.sent] == [FOA1]
        assert c.current is not None and c.current.agent == FOA1

    run_virtual(w.clock, main)


# --- renewal -----------------------------------------------------------------------------------


def test_renews_at_two_thirds_of_the_granted_lifetime() -> None:
    """Protects renewal: with 45 s requested and 30 s granted by the HOA, the client sends
    nothing until 2/3 x 30 = 20 s after registering, then renews within one check
    (INTERVAL/2), and again 20 s after that; the binding never lapses at the HOA."""
    granted = 30
    w = World(hoa_max_lifetime=granted)

    async def main() -> None:
        c = w.client()
        await c.start()
        w.advertise(FOA1, T0, T0 + 50)
        await until(w.clock, T0 + 49)
        await c.stop(deregister=False)

    run_virtual(w.clock, main)
    times = [s.at for s in w.net.to(FOA1)]
    assert [s.request.lifetime for s in w.net.sent] == [REQUESTED] * len(times)
    assert len(times) == 3, times  # register, renew, renew
    renew_after = granted * 2 / 3
    for before, after in zip(times, times[1:]):
        assert renew_after <= after - before <= renew_after + INTERVAL / 2 + SLACK
    assert w.c.current is not None and w.c.current.lifetime == granted
    assert w.c.current.registered_at == times[-1]
    assert w.hoa.bindings.for_home(HOME), "the binding lapsed at the HOA"


# --- another FOA when one refuses or is silent -----------------------------------------------


def test_falls_back_to_the_next_foa_when_one_denies() -> None:
    """Protects Fig. 11's fallback on refusal: FOA1 does not trust the object's
    Mobile-Foreign key and denies (67, once, no retransmission); the client registers through
    FOA2 in the same call."""
    w = World(distrusted_by=(FOA1,))

    async def main() -> None:
        c = w.client()
        w.hear(FOA1)
        w.hear(FOA2)
        attempt = await c.register()
        assert [s.dest for s in w.net.sent] == [FOA1, FOA2]
        assert [a.code for a in c.history] == [ReplyCode.FA_MN_FAILED_AUTH, ReplyCode.ACCEPTED]
        assert attempt.agent == FOA2 and attempt.code == ReplyCode.ACCEPTED
        assert c.current is not None and (c.current.agent, c.current.care_of_address) == (FOA2, COA2)
        assert w.net.sent[1].request.care_of_address == COA2
        assert [b.care_of_address for b in w.hoa.bindings.for_home(HOME)] == [COA2]

    run_virtual(w.clock, main)


def test_falls_back_to_the_next_foa_when_one_is_silent() -> None:
    """Protects fallback on silence and the back-off: RETRIES sends to the silent FOA, the
    retransmission timeout doubling from RETRANSMIT_TIMEOUT, then the next FOA."""
    w = World()
    del w.net.agents[FOA1]

    async def main() -> None:
        c = w.client()
        w.keep_hearing(FOA1, FOA2)
        start = w.clock.now
        await c.register()
        silent = w.net.to(FOA1)
        assert len(silent) == client_mod.RETRIES
        assert len({s.request.identification for s in silent}) == 1  # retransmissions
        expected, t, timeout = [], start, client_mod.RETRANSMIT_TIMEOUT
        for _ in range(client_mod.RETRIES):
            expected.append(t)
            t += timeout
            timeout *= 2
        assert [s.at for s in silent] == pytest.approx(expected, abs=SLACK)
        [via2] = w.net.to(FOA2)
        assert via2.at == pytest.approx(t, abs=SLACK)  # right after the last timeout
        assert c.history[0].code is None and "no reply" in c.history[0].error
        assert c.current is not None and c.current.agent == FOA2

    run_virtual(w.clock, main)


def test_when_every_foa_refuses_nothing_is_registered() -> None:
    """Protects the end of the fallback: each FOA tried once, the last refusal returned, no
    registration claimed."""
    w = World(distrusted_by=(FOA1, FOA2))

    async def main() -> None:
        c = w.client()
        w.hear(FOA1)
        w.hear(FOA2)
        attempt = await c.register()
        assert [s.dest for s in w.net.sent] == [FOA1, FOA2]
        assert attempt.code == ReplyCode.FA_MN_FAILED_AUTH and attempt.agent == FOA2
        assert c.current is None

    run_virtual(w.clock, main)


# --- replies that must not count ---------------------------------------------------------------


def test_acceptance_with_a_bad_mobile_home_authenticator_is_ignored_and_counted() -> None:
    """Protects the Mobile-Home check on acceptances: FOA1 answers every try with an
    acceptance the HOA did not sign; each is counted and ignored, FOA1 is treated as silent
    and the client registers through FOA2 (the real HOA) instead."""
    w = World()
    w.net.agents[FOA1] = forged_acceptance()

    async def main() -> None:
        c = w.client()
        w.keep_hearing(FOA1, FOA2)
        await c.register()
        assert len(w.net.to(FOA1)) == client_mod.RETRIES
        assert c.bad_replies == client_mod.RETRIES
        assert c.history[0].code is None
        assert c.current is not None and c.current.agent == FOA2

    run_virtual(w.clock, main)


def test_acceptance_for_another_identification_is_ignored() -> None:
    """Protects matching replies to requests: a correctly signed acceptance that answers
    another Identification does not complete the exchange (FOA1 stays unanswered and the
    client moves on to FOA2)."""
    w = World()
    w.net.agents[FOA1] = forged_acceptance(key=MH.key, ident_offset=1)

    async def main() -> None:
        c = w.client()
        w.keep_hearing(FOA1, FOA2)
        await c.register()
        assert len(w.net.to(FOA1)) == client_mod.RETRIES
        assert c.history[0].code is None
        assert c.current is not None and c.current.agent == FOA2

    run_virtual(w.clock, main)


def test_a_lone_forging_agent_registers_nothing() -> None:
    """Protects against a forged acceptance being taken when no other agent is there."""
    w = World()
    w.net.agents[FOA1] = forged_acceptance()

    async def main() -> None:
        c = w.client()
        w.hear(FOA1)
        attempt = await c.register()
        assert attempt.code is None and c.current is None
        assert c.bad_replies == client_mod.RETRIES

    run_virtual(w.clock, main)


# --- movement and return home ----------------------------------------------------------------


def test_movement_detected_when_the_current_agent_goes_silent() -> None:
    """Protects movement detection: the client stays with FOA1 while it advertises (FOA2
    heard too), and registers through FOA2 within one check after FOA1's last advertisement
    is older than 3 x INTERVAL (its advertised freshness) — not before."""
    w = World()

    async def main() -> None:
        c = w.client()
        await c.start()
        w.advertise(FOA1, T0, T0 + 8)
        w.advertise(FOA2, T0, T0 + 20)
        await until(w.clock, T0 + 19)
        await c.stop(deregister=False)

    run_virtual(w.clock, main)
    assert [s.dest for s in w.net.sent] == [FOA1, FOA2]
    stale_at = w.last_heard[FOA1] + 3 * INTERVAL
    moved = w.net.to(FOA2)[0].at
    assert stale_at < moved <= stale_at + INTERVAL / 2 + SLACK
    assert w.c.current is not None and w.c.current.agent == FOA2
    assert [b.care_of_address for b in w.hoa.bindings.for_home(HOME)] == [COA2]


def test_back_home_deregisters_directly_with_the_hoa() -> None:
    """Protects the return home: on hearing its HOA advertise (H), the object sends a
    deregistration straight to the HOA — lifetime 0, care-of address = home address,
    Mobile-Home only — and, once accepted, drops its registration and claims its home
    address on that link; nothing goes through the FOA."""
    w = World()

    async def main() -> None:
        c = w.client()
        await c.start()
        w.advertise(FOA1, T0, T0 + 4)
        await until(w.clock, T0 + 3)
        assert c.current is not None and w.hoa.bindings.for_home(HOME)
        w.advertise(HA, T0 + 3.3, T0 + 10, flags=HOME_AGENT, ifindex=1)
        await until(w.clock, T0 + 9)
        await c.stop(deregister=False)

    run_virtual(w.clock, main)
    assert [s.dest for s in w.net.to(FOA1)] == [FOA1]  # the registration only
    [dereg] = w.net.to(HA)
    assert dereg.at == pytest.approx(w.first_heard[HA], abs=SLACK)
    rrq = dereg.request
    assert (rrq.lifetime, rrq.care_of_address, rrq.home_agent) == (0, HOME, HA)
    assert ext_types(rrq) == [ExtType.MN_NAI, ExtType.MOBILE_HOME_AUTH]
    assert verify_auth(rrq, ExtType.MOBILE_HOME_AUTH, {MH.spi: MH.key})
    assert w.c.at_home and w.c.current is None
    assert w.announced == [(1, HOME)]
    assert w.hoa.bindings.for_home(HOME) == []


def test_deregistration_through_the_current_foa() -> None:
    """Protects deregister() while away: lifetime 0 through the FOA in use, for the same
    care-of address, with both authenticators; accepted, it removes the binding and the
    client's registration."""
    w = World()

    async def main() -> None:
        c = w.client()
        w.hear(FOA1)
        await c.register()
        assert w.hoa.bindings.for_home(HOME)
        attempt = await c.deregister()
        assert attempt.code == ReplyCode.ACCEPTED
        last = w.net.sent[-1]
        assert last.dest == FOA1
        rrq = last.request
        assert (rrq.lifetime, rrq.care_of_address) == (0, COA1)
        assert verify_auth(rrq, ExtType.MOBILE_HOME_AUTH, {MH.spi: MH.key})
        assert verify_auth(rrq, ExtType.MOBILE_FOREIGN_AUTH, {MF.spi: MF.key})
        assert c.current is None
        assert w.hoa.bindings.for_home(HOME) == []

    run_virtual(w.clock, main)


def test_stop_deregisters_and_closes_the_transport() -> None:
    """Protects stop(): a registered object deregisters on the way out (through its FOA)
    and its socket is closed; stop(deregister=False) sends nothing more."""
    w = World()

    async def main() -> None:
        c = w.client()
        w.hear(FOA1)
        await c.register()
        n = len(w.net.sent)
        await c.stop()
        assert len(w.net.sent) == n + 1 and w.net.sent[-1].request.lifetime == 0
        assert c.current is None and w.net.closed

    run_virtual(w.clock, main)
