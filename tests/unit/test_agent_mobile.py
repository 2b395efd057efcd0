"""agent.mobility.client.RegistrationClient, the parts that need no socket: which foreign agents are
candidates (fake clock), the requests it builds, and how it judges replies."""

from __future__ import annotations

import asyncio

import pytest

from agent.core.config import Credential, ForeignConfig, HomeConfig, HomeObject, ObjectConfig
from agent.mobility.foreign import ForeignAgent
from agent.mobility.home import HomeAgent
from agent.mobility.client import RegistrationClient
from packets import (
    AdvFlags,
    AgentAdvertisement,
    ExtType,
    NaiExtension,
    ObjectPart,
    PartRole,
    RegistrationReply,
    RegistrationRequest,
    ReplyCode,
    RequestFlags,
    append_auth,
    ntp_to_unix,
    verify_auth,
)
from packets.auth import find_auth
from fakeclock import FakeClock

HOME, HA = "10.0.1.10", "10.0.1.1"
MH = Credential(0x1001, b"mobile-home key")
MF = Credential(0x2002, b"mobile-foreign key")
FH = Credential(0x3003, b"foreign-home key")
INTERVAL = 1.0

FA = AdvFlags.F | AdvFlags.G


def object_config(**kw) -> ObjectConfig:
    base = dict(name="cam", home_address=HOME, home_agent=HA, nai="cam@home.moat",
                mobile_home=MH, mobile_foreign=MF, lifetime=45)
    base.update(kw)
    return ObjectConfig(**base)


def adv(flags: AdvFlags = FA, coas: list[str] | None = None, seq: int = 1) -> AgentAdvertisement:
    return AgentAdvertisement(seq, 300, flags, list(coas or []))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(50.0)


def client(clock: FakeClock, **kw) -> RegistrationClient:
    solicited: list[int] = []
    c = RegistrationClient(object_config(**kw), solicit=lambda: solicited.append(1),
                           advertise_interval=INTERVAL, clock=clock)
    c.solicited = solicited  # type: ignore[attr-defined]
    return c


def addresses(c: RegistrationClient, **kw) -> list[str]:
    return [s.address for s in c.candidates(**kw)]


# --- candidates ------------------------------------------------------------------------------


def test_no_agents_no_candidates(clock: FakeClock) -> None:
    assert client(clock).candidates() == []


def test_only_fresh_foreign_not_busy_not_home_agent(clock: FakeClock) -> None:
    c = client(clock)
    c.on_advertisement(adv(FA), "10.0.2.1", 2)
    c.on_advertisement(adv(AdvFlags.H | AdvFlags.G), "10.0.3.1", 2)  # a home agent only
    c.on_advertisement(adv(FA | AdvFlags.B), "10.0.4.1", 2)  # busy
    c.on_advertisement(adv(FA | AdvFlags.H), HA, 2)  # our own HOA, even if it also says F
    assert addresses(c) == ["10.0.2.1"]


def test_stale_agents_are_excluded(clock: FakeClock) -> None:
    c = client(clock)
    c.on_advertisement(adv(), "10.0.2.1", 2)
    clock.advance(1.0)
    c.on_advertisement(adv(), "10.0.3.1", 3)
    clock.advance(2.0)  # 10.0.2.1 heard exactly 3 intervals ago: still fresh
    assert addresses(c) == ["10.0.2.1", "10.0.3.1"]
    clock.advance(0.01)  # now older than 3 x interval
    assert addresses(c) == ["10.0.3.1"]
    c.on_advertisement(adv(seq=2), "10.0.2.1", 2)  # heard again: back
    assert addresses(c) == ["10.0.2.1", "10.0.3.1"]
    clock.advance(3.5)
    assert addresses(c) == []


def test_staleness_scales_with_interval(clock: FakeClock) -> None:
    c = RegistrationClient(object_config(), solicit=lambda: None, advertise_interval=0.2, clock=clock)
    c.on_advertisement(adv(), "10.0.2.1", 2)
    clock.advance(0.59)
    assert addresses(c) == ["10.0.2.1"]
    clock.advance(0.02)
    assert addresses(c) == []


def test_order_is_lowest_address_numerically(clock: FakeClock) -> None:
    # the code documents "the preferred one, then lowest address" (not most-recent first):
    # repeatable runs, and the next one is the fallback when the first refuses.
    c = client(clock)
    for addr in ("10.0.2.10", "10.0.2.9", "10.0.2.100", "9.255.0.1"):
        c.on_advertisement(adv(), addr, 2)
        clock.advance(0.1)
    assert addresses(c) == ["9.255.0.1", "10.0.2.9", "10.0.2.10", "10.0.2.100"]
    # hearing one again does not reorder
    c.on_advertisement(adv(seq=2), "10.0.2.100", 2)
    assert addresses(c)[0] == "9.255.0.1"


def test_preferred_agent_first_when_fresh(clock: FakeClock) -> None:
    c = client(clock, preferred_agent="10.0.2.10")
    c.on_advertisement(adv(), "10.0.2.10", 2)
    clock.advance(2)
    c.on_advertisement(adv(), "10.0.2.9", 2)
    assert addresses(c) == ["10.0.2.10", "10.0.2.9"]
    clock.advance(1.5)  # the preferred one goes stale
    assert addresses(c) == ["10.0.2.9"]


def test_exclude(clock: FakeClock) -> None:
    c = client(clock)
    c.on_advertisement(adv(), "10.0.2.1", 2)
    c.on_advertisement(adv(), "10.0.3.1", 3)
    assert addresses(c, exclude={"10.0.2.1"}) == ["10.0.3.1"]
    assert addresses(c, exclude={"10.0.2.1", "10.0.3.1"}) == []


def test_agent_turning_busy_drops_out(clock: FakeClock) -> None:
    c = client(clock)
    c.on_advertisement(adv(), "10.0.2.1", 2)
    c.on_advertisement(adv(FA | AdvFlags.B, seq=2), "10.0.2.1", 2)
    assert addresses(c) == []


def test_sequence_reset_forgets_registration_through_that_agent(clock: FakeClock) -> None:
    from agent.mobility.client import Registration

    c = client(clock)
    c.on_advertisement(adv(seq=500), "10.0.2.1", 2)
    c.current = Registration("10.0.2.1", "10.0.2.1", "cam.foa1", 60, clock.now)
    c.on_advertisement(adv(seq=501), "10.0.2.1", 2)
    assert c.current is not None
    c.on_advertisement(adv(seq=3), "10.0.2.1", 2)  # the FOA rebooted
    assert c.current is None


# --- build_request ---------------------------------------------------------------------------


def decoded(c: RegistrationClient, agent_addr: str, **kw) -> RegistrationRequest:
    return RegistrationRequest.decode(c.build_request(c.agents[agent_addr], **kw))


def test_build_request_is_signed_for_home_and_foreign(clock: FakeClock) -> None:
    c = client(clock)
    c.on_advertisement(adv(coas=["10.0.2.254"]), "10.0.2.1", 2)
    rrq = decoded(c, "10.0.2.1")
    assert (rrq.home_address, rrq.home_agent, rrq.care_of_address) == (HOME, HA, "10.0.2.254")
    assert rrq.lifetime == 45
    assert rrq.flags == RequestFlags.G
    assert rrq.find(NaiExtension) == [NaiExtension("cam@home.moat")]
    assert rrq.find(ObjectPart)[0].role == PartRole.PRIMARY
    assert verify_auth(rrq, ExtType.MOBILE_HOME_AUTH, {MH.spi: MH.key})
    assert verify_auth(rrq, ExtType.MOBILE_FOREIGN_AUTH, {MF.spi: MF.key})
    assert not verify_auth(rrq, ExtType.MOBILE_HOME_AUTH, {MH.spi: MF.key})
    assert not verify_auth(rrq, ExtType.MOBILE_FOREIGN_AUTH, {MF.spi: MH.key})
    # Mobile-Home, then Mobile-Foreign last (the FOA cuts there)
    mh_i = find_auth(rrq, ExtType.MOBILE_HOME_AUTH)[0]
    mf_i = find_auth(rrq, ExtType.MOBILE_FOREIGN_AUTH)[0]
    assert mh_i < mf_i == len(rrq.extensions) - 1


def test_build_request_identification_strictly_increases(clock: FakeClock, monkeypatch) -> None:
    import time as time_mod

    c = client(clock)
    c.on_advertisement(adv(), "10.0.2.1", 2)
    a = decoded(c, "10.0.2.1").identification
    b = decoded(c, "10.0.2.1").identification
    assert b > a
    assert abs(ntp_to_unix(b) - time_mod.time()) < 5  # an NTP timestamp of now
    # even when the wall clock stands still, or steps back
    frozen = time_mod.time() - 100
    monkeypatch.setattr(time_mod, "time", lambda: frozen)
    d = decoded(c, "10.0.2.1").identification
    e = decoded(c, "10.0.2.1").identification
    assert b < d < e


def test_build_request_flags_and_lifetime_override(clock: FakeClock) -> None:
    c = client(clock, simultaneous=True, reverse_tunnel=True)
    c.on_advertisement(adv(), "10.0.2.1", 2)
    rrq = decoded(c, "10.0.2.1", lifetime=0)
    assert rrq.flags == RequestFlags.G | RequestFlags.S | RequestFlags.T
    assert rrq.lifetime == 0
    # no care-of address advertised: the agent's own address
    assert rrq.care_of_address == "10.0.2.1"


def test_built_request_is_accepted_through_foa_and_hoa(clock: FakeClock) -> None:
    """build_request's output, fed through the real FOA and HOA logic, registers."""
    c = client(clock)
    c.on_advertisement(adv(coas=["10.0.2.1"]), "10.0.2.1", 2)
    foa = ForeignAgent(ForeignConfig([MF], FH), "foa1", {"10.0.2.1"}, clock=clock)
    hoa = HomeAgent(HomeConfig([HomeObject(HOME, "cam@home.moat", MH)], [FH]), HA, clock=clock)
    relay = foa.handle_request(RegistrationRequest.decode(c.build_request(c.agents["10.0.2.1"])),
                               "10.0.2.50", 40000)
    assert relay.to_home_agent is not None
    decision = hoa.handle(RegistrationRequest.decode(relay.to_home_agent))
    assert decision.code == ReplyCode.ACCEPTED
    _, out = foa.handle_reply(RegistrationReply.decode(decision.reply), HA)
    rrp = RegistrationReply.decode(out)
    assert rrp.code == ReplyCode.ACCEPTED and rrp.lifetime == 45
    assert verify_auth(rrp, ExtType.MOBILE_HOME_AUTH, {MH.spi: MH.key})
    assert verify_auth(rrp, ExtType.MOBILE_FOREIGN_AUTH, {MF.spi: MF.key})
    assert hoa.bindings.for_home(HOME)[0].care_of_name == "cam.foa1"


# --- judging replies -------------------------------------------------------------------------


def test_on_reply_requires_mobile_home_auth_on_acceptance(clock: FakeClock) -> None:
    c = client(clock)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        ident = 0xE000_0000_0000_0001

        forged = RegistrationReply(0, HOME, HA, ident, 60).encode()
        forged_mh = append_auth(forged, ExtType.MOBILE_HOME_AUTH, MH.spi, b"wrong")
        good = append_auth(forged, ExtType.MOBILE_HOME_AUTH, MH.spi, MH.key)

        fut = loop.create_future()
        c._waiting[ident] = fut
        c._asked[ident] = "10.0.2.1"  # what _exchange records: the agent asked
        c._on_reply(forged, ("10.0.2.1", 434))
        c._on_reply(forged_mh, ("10.0.2.1", 434))
        c._on_reply(b"\x03\x00junk", ("10.0.2.1", 434))
        assert not fut.done()
        assert c.bad_replies == 3
        c._on_reply(good, ("10.0.2.1", 434))
        assert fut.done() and fut.result().code == ReplyCode.ACCEPTED

        # a denial needs no authenticator (an FOA has no key to sign it with)
        fut2 = loop.create_future()
        c._waiting[ident + 1] = fut2
        c._asked[ident + 1] = "10.0.2.1"
        # ... but only from the agent asked: a denial from another address is not believed
        c._on_reply(RegistrationReply(ReplyCode.FA_MN_FAILED_AUTH, HOME, HA, ident + 1).encode(),
                    ("10.0.2.66", 434))
        assert not fut2.done() and c.bad_replies == 4
        c._on_reply(RegistrationReply(ReplyCode.FA_MN_FAILED_AUTH, HOME, HA, ident + 1).encode(),
                    ("10.0.2.1", 434))
        assert fut2.result().code == ReplyCode.FA_MN_FAILED_AUTH

        # a reply nobody waits for is ignored
        c._on_reply(RegistrationReply(0, HOME, HA, ident + 2).encode(), ("10.0.2.1", 434))
        assert c.bad_replies == 4

    asyncio.run(main())


def test_status_reports_agents_with_age(clock: FakeClock) -> None:
    c = client(clock)
    c.on_advertisement(adv(coas=["10.0.2.1"]), "10.0.2.1", 2)
    clock.advance(1.25)
    st = c.status()
    assert st["registration"] is None and st["at_home"] is False
    [a] = st["agents"]
    assert a["address"] == "10.0.2.1" and a["age"] == 1.25
    assert "F" in a["flags"] and "G" in a["flags"]
