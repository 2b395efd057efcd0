"""agent.mobility.foreign.ForeignAgent: relay rules of the foreign object agent, wired to a HomeAgent.

An object's request (MN-NAI, Mobile-Home auth, Mobile-Foreign auth) goes into the FOA; the
relayed bytes go into a real HomeAgent; its reply goes back through the FOA; the object's
reply is checked with the object's keys. Clocks are fake.
"""

from __future__ import annotations

import pytest

from agent.core.config import Credential, ForeignConfig, HomeConfig, HomeObject
from agent.mobility.foreign import ForeignAgent, Relay
from agent.mobility.home import HomeAgent
from packets import (
    CareOfName,
    ExtType,
    GreKey,
    NaiExtension,
    RegistrationReply,
    RegistrationRequest,
    ReplyCode,
    RequestFlags,
    append_auth,
    unix_to_ntp,
    verify_auth,
)
from packets.auth import find_auth
from fakeclock import FakeClock

HA = "10.0.1.1"
HOME = "10.0.1.10"
HOME2 = "10.0.1.11"
HOME3 = "10.0.1.12"
COA = "10.0.2.1"  # the FOA's own address on the foreign LAN
NOT_OURS = "10.0.9.1"
OBJ_ADDR, OBJ_PORT = "10.0.2.50", 40123

MH = {HOME: (0x1001, b"mh cam"), HOME2: (0x1002, b"mh cam other"), HOME3: (0x1003, b"mh three")}
NAIS = {HOME: "cam@home.moat", HOME2: "cam@elsewhere.moat", HOME3: "mic@home.moat"}
MF_SPI, MF_KEY = 0x2002, b"mobile-foreign key"
FH_SPI, FH_KEY = 0x3003, b"foreign-home key"
WALL0 = 1_700_000_000.0


class World:
    """One FOA "foa1" and one HOA that serves three objects, on shared fake clocks."""

    def __init__(self, *, max_visitors: int = 8, max_lifetime: int = 300,
                 hoa_trusts_foa: bool = True) -> None:
        self.clock = FakeClock(100.0)
        self.wall = FakeClock(WALL0)
        self.foa = ForeignAgent(
            ForeignConfig(
                trusted_objects=[Credential(MF_SPI, MF_KEY)],
                foreign_home=Credential(FH_SPI, FH_KEY),
                max_visitors=max_visitors,
                max_lifetime=max_lifetime,
            ),
            "foa1",
            {COA, "10.0.2.254"},
            clock=self.clock,
        )
        self.hoa = HomeAgent(
            HomeConfig(
                objects=[HomeObject(h, NAIS[h], Credential(*MH[h])) for h in MH],
                trusted_foas=[Credential(FH_SPI, FH_KEY)] if hoa_trusts_foa else [],
                max_lifetime=1000,
            ),
            HA,
            clock=self.clock,
            wall_clock=self.wall,
        )
        self._n = 0

    def ident(self) -> int:
        self._n += 1
        return unix_to_ntp(self.wall.now) + self._n

    def object_request(self, home: str = HOME, *, ident: int | None = None, lifetime: int = 60,
                       coa: str = COA, mf: tuple[int, bytes] = (MF_SPI, MF_KEY),
                       flags: RequestFlags = RequestFlags.G) -> RegistrationRequest:
        rrq = RegistrationRequest(home, HA, coa, ident or self.ident(), lifetime, flags,
                                  [NaiExtension(NAIS[home])])
        data = append_auth(rrq.encode(), ExtType.MOBILE_HOME_AUTH, *MH[home])
        data = append_auth(data, ExtType.MOBILE_FOREIGN_AUTH, *mf)
        return RegistrationRequest.decode(data)

    def hoa_reply(self, relayed: bytes) -> RegistrationReply:
        return RegistrationReply.decode(self.hoa.handle(RegistrationRequest.decode(relayed)).reply)

    def register(self, home: str = HOME, **kw) -> RegistrationReply:
        """The whole exchange; returns the object's reply."""
        relay = self.foa.handle_request(self.object_request(home, **kw), OBJ_ADDR, OBJ_PORT)
        assert relay.to_home_agent is not None, relay
        out = self.foa.handle_reply(self.hoa_reply(relay.to_home_agent), HA)
        assert out is not None
        return RegistrationReply.decode(out[1])


@pytest.fixture
def world() -> World:
    return World()


# --- requests ------------------------------------------------------------------------------


def test_relayed_request_keeps_mh_adds_care_of_name_and_fh(world: World) -> None:
    rrq = world.object_request(HOME)
    relay = world.foa.handle_request(rrq, OBJ_ADDR, OBJ_PORT)
    assert isinstance(relay, Relay)
    assert relay.code == ReplyCode.ACCEPTED
    assert relay.to_object is None and relay.to_home_agent is not None

    fwd = RegistrationRequest.decode(relay.to_home_agent)
    assert (fwd.home_address, fwd.home_agent, fwd.care_of_address) == (HOME, HA, COA)
    assert (fwd.identification, fwd.lifetime, fwd.flags) == (rrq.identification, 60, RequestFlags.G)
    assert fwd.find(NaiExtension) == [NaiExtension(NAIS[HOME])]
    # the object's Mobile-Home authenticator is carried over byte for byte and still verifies
    assert verify_auth(fwd, ExtType.MOBILE_HOME_AUTH, dict([MH[HOME]]))
    assert find_auth(fwd, ExtType.MOBILE_FOREIGN_AUTH) is None
    assert fwd.find(CareOfName) == [CareOfName("cam.foa1")]
    assert verify_auth(fwd, ExtType.FOREIGN_HOME_AUTH, {FH_SPI: FH_KEY})
    # order on the wire: MH auth, then care-of-name, then FH auth (FH covers the name)
    kinds = [getattr(e, "ext_type", None) for e in fwd.extensions]
    assert kinds[-1] == ExtType.FOREIGN_HOME_AUTH
    assert kinds.index(ExtType.MOBILE_HOME_AUTH) < kinds.index(ExtType.NVSE)
    # everything up to the MF auth is unchanged
    cut = rrq.ext_offsets[find_auth(rrq, ExtType.MOBILE_FOREIGN_AUTH)[0]]
    assert relay.to_home_agent[:cut] == rrq.raw[:cut]

    assert (HOME, rrq.identification) in world.foa.pending
    p = world.foa.pending[(HOME, rrq.identification)]
    assert (p.object_address, p.object_port, p.care_of_name, p.mf_spi) == (OBJ_ADDR, OBJ_PORT, "cam.foa1", MF_SPI)
    assert world.foa.stats["relayed"] == 1
    assert len(world.foa.visitors) == 0  # not a visitor until the HOA accepts


def test_care_of_name_without_nai_uses_home_address(world: World) -> None:
    rrq = RegistrationRequest(HOME, HA, COA, world.ident(), 60, RequestFlags.G, [])
    data = append_auth(rrq.encode(), ExtType.MOBILE_HOME_AUTH, *MH[HOME])
    data = append_auth(data, ExtType.MOBILE_FOREIGN_AUTH, MF_SPI, MF_KEY)
    relay = world.foa.handle_request(RegistrationRequest.decode(data), OBJ_ADDR, OBJ_PORT)
    assert RegistrationRequest.decode(relay.to_home_agent).find(CareOfName) == [CareOfName(f"{HOME}.foa1")]


def assert_denied(world: World, rrq: RegistrationRequest, code: ReplyCode) -> RegistrationReply:
    before = dict(world.foa.stats)
    relay = world.foa.handle_request(rrq, OBJ_ADDR, OBJ_PORT)
    assert relay.code == code
    assert relay.to_home_agent is None and relay.to_object is not None
    rrp = RegistrationReply.decode(relay.to_object)
    assert rrp.code == code
    assert (rrp.home_address, rrp.home_agent, rrp.identification) == (rrq.home_address, HA, rrq.identification)
    assert rrp.lifetime == 0
    assert world.foa.pending == {}
    assert world.foa.stats["denied"] == before["denied"] + 1
    assert world.foa.stats["relayed"] == before["relayed"]
    return rrp


def test_untrusted_mobile_foreign_key_is_67(world: World) -> None:
    assert_denied(world, world.object_request(mf=(0x2999, b"stranger")), ReplyCode.FA_MN_FAILED_AUTH)


def test_trusted_mf_spi_with_wrong_key_is_67(world: World) -> None:
    assert_denied(world, world.object_request(mf=(MF_SPI, b"wrong")), ReplyCode.FA_MN_FAILED_AUTH)


def test_missing_mobile_foreign_auth_is_67(world: World) -> None:
    rrq = RegistrationRequest(HOME, HA, COA, world.ident(), 60, RequestFlags.G, [NaiExtension(NAIS[HOME])])
    data = append_auth(rrq.encode(), ExtType.MOBILE_HOME_AUTH, *MH[HOME])
    assert_denied(world, RegistrationRequest.decode(data), ReplyCode.FA_MN_FAILED_AUTH)


def test_lifetime_above_max_is_69() -> None:
    world = World(max_lifetime=120)
    assert_denied(world, world.object_request(lifetime=121), ReplyCode.FA_LIFETIME_TOO_LONG)
    assert world.foa.handle_request(world.object_request(lifetime=120), OBJ_ADDR, OBJ_PORT).to_home_agent


def test_care_of_address_not_ours_is_77(world: World) -> None:
    assert_denied(world, world.object_request(coa=NOT_OURS), ReplyCode.FA_INVALID_COA)


def test_any_of_our_addresses_is_a_valid_care_of(world: World) -> None:
    relay = world.foa.handle_request(world.object_request(coa="10.0.2.254"), OBJ_ADDR, OBJ_PORT)
    assert relay.to_home_agent is not None


def test_visitors_full_is_66_but_a_visitor_may_renew() -> None:
    world = World(max_visitors=1)
    assert world.register(HOME).code == ReplyCode.ACCEPTED
    assert len(world.foa.visitors) == 1
    assert_denied(world, world.object_request(HOME3), ReplyCode.FA_INSUFFICIENT_RESOURCES)
    # the one visitor renewing is not a new visitor
    assert world.register(HOME).code == ReplyCode.ACCEPTED


# --- replies ---------------------------------------------------------------------------------


def test_accepted_reply_reaches_object_signed_and_makes_a_visitor(world: World) -> None:
    rrq = world.object_request(HOME, lifetime=90, flags=RequestFlags.G | RequestFlags.T)
    relay = world.foa.handle_request(rrq, OBJ_ADDR, OBJ_PORT)
    hoa_rrp = world.hoa_reply(relay.to_home_agent)
    assert hoa_rrp.code == ReplyCode.ACCEPTED
    world.clock.advance(0.25)

    result = world.foa.handle_reply(hoa_rrp, HA)
    assert result is not None
    pending, out = result
    assert pending.object_address == OBJ_ADDR and pending.object_port == OBJ_PORT

    rrp = RegistrationReply.decode(out)
    assert rrp.code == ReplyCode.ACCEPTED
    assert (rrp.home_address, rrp.identification, rrp.lifetime) == (HOME, rrq.identification, 90)
    assert verify_auth(rrp, ExtType.MOBILE_FOREIGN_AUTH, {MF_SPI: MF_KEY})
    assert not verify_auth(rrp, ExtType.MOBILE_FOREIGN_AUTH, {MF_SPI: b"other"})
    assert verify_auth(rrp, ExtType.MOBILE_HOME_AUTH, dict([MH[HOME]]))  # the HOA's, untouched
    assert find_auth(rrp, ExtType.FOREIGN_HOME_AUTH) is None  # cut: the object has no FH key
    assert rrp.find(CareOfName) == [CareOfName("cam.foa1")]
    assert find_auth(rrp, ExtType.MOBILE_FOREIGN_AUTH)[0] == len(rrp.extensions) - 1

    binding = world.hoa.bindings.for_home(HOME)[0]
    v = world.foa.visitors.get(HOME)
    assert v is not None
    assert (v.local_address, v.local_port) == (OBJ_ADDR, OBJ_PORT)
    assert (v.home_agent, v.care_of_name, v.care_of_address) == (HA, "cam.foa1", COA)
    assert v.local_name == NAIS[HOME]
    assert v.lifetime == 90 and v.registered_at == world.clock.now
    assert v.gre_key == binding.gre_key == rrp.find(GreKey)[0].key
    assert v.reverse_tunnel
    assert world.foa.pending == {}
    assert world.foa.stats["replies"] == 1 and world.foa.stats["bad_replies"] == 0


def test_visitor_gets_the_lifetime_the_hoa_granted() -> None:
    world = World(max_lifetime=300)
    world.hoa.config.max_lifetime = 40
    rrp = world.register(HOME, lifetime=200)
    assert rrp.lifetime == 40
    assert world.foa.visitors.get(HOME).lifetime == 40
    world.clock.advance(40)
    assert [v.home_address for v in world.foa.visitors.expire()] == [HOME]


def test_reply_for_unknown_request_is_dropped(world: World) -> None:
    rrq = world.object_request(HOME)
    relay = world.foa.handle_request(rrq, OBJ_ADDR, OBJ_PORT)
    rrp = world.hoa_reply(relay.to_home_agent)
    other = RegistrationReply.decode(
        append_auth(RegistrationReply(0, HOME, HA, rrq.identification + 1, 60).encode(),
                    ExtType.FOREIGN_HOME_AUTH, FH_SPI, FH_KEY))
    assert world.foa.handle_reply(other, HA) is None
    assert world.foa.stats["bad_replies"] == 1
    assert (HOME, rrq.identification) in world.foa.pending  # the real one is still awaited
    assert world.foa.handle_reply(rrp, HA) is not None
    # a second copy of the same reply has nothing pending any more
    assert world.foa.handle_reply(rrp, HA) is None


def test_acceptance_with_bad_foreign_home_auth_is_dropped(world: World) -> None:
    rrq = world.object_request(HOME)
    world.foa.handle_request(rrq, OBJ_ADDR, OBJ_PORT)
    forged = RegistrationReply(0, HOME, HA, rrq.identification, 60, [GreKey(7)]).encode()
    forged = append_auth(forged, ExtType.MOBILE_HOME_AUTH, *MH[HOME])
    forged = append_auth(forged, ExtType.FOREIGN_HOME_AUTH, FH_SPI, b"not the FH key")
    assert world.foa.handle_reply(RegistrationReply.decode(forged), HA) is None
    assert world.foa.stats["bad_replies"] == 1
    assert world.foa.visitors.get(HOME) is None
    assert (HOME, rrq.identification) in world.foa.pending


def test_acceptance_without_foreign_home_auth_is_dropped(world: World) -> None:
    rrq = world.object_request(HOME)
    world.foa.handle_request(rrq, OBJ_ADDR, OBJ_PORT)
    bare = append_auth(RegistrationReply(0, HOME, HA, rrq.identification, 60).encode(),
                       ExtType.MOBILE_HOME_AUTH, *MH[HOME])
    assert world.foa.handle_reply(RegistrationReply.decode(bare), HA) is None
    assert world.foa.stats["bad_replies"] == 1
    assert len(world.foa.visitors) == 0


def test_denial_from_hoa_that_does_not_trust_us_is_relayed() -> None:
    world = World(hoa_trusts_foa=False)
    rrq = world.object_request(HOME)
    relay = world.foa.handle_request(rrq, OBJ_ADDR, OBJ_PORT)
    hoa_rrp = world.hoa_reply(relay.to_home_agent)
    assert hoa_rrp.code == ReplyCode.HA_FA_FAILED_AUTH
    assert find_auth(hoa_rrp, ExtType.FOREIGN_HOME_AUTH) is None

    result = world.foa.handle_reply(hoa_rrp, HA)
    assert result is not None
    rrp = RegistrationReply.decode(result[1])
    assert rrp.code == ReplyCode.HA_FA_FAILED_AUTH
    assert verify_auth(rrp, ExtType.MOBILE_FOREIGN_AUTH, {MF_SPI: MF_KEY})
    assert verify_auth(rrp, ExtType.MOBILE_HOME_AUTH, dict([MH[HOME]]))
    assert rrp.find(CareOfName) == []  # nothing granted, no name
    assert len(world.foa.visitors) == 0
    assert world.foa.pending == {}


def test_signed_denial_from_hoa_is_relayed_without_fh(world: World) -> None:
    # the HOA trusts us but the object's MH key is wrong: 131, signed FH
    rrq = RegistrationRequest(HOME, HA, COA, world.ident(), 60, RequestFlags.G, [NaiExtension(NAIS[HOME])])
    data = append_auth(rrq.encode(), ExtType.MOBILE_HOME_AUTH, MH[HOME][0], b"bad mh")
    data = append_auth(data, ExtType.MOBILE_FOREIGN_AUTH, MF_SPI, MF_KEY)
    relay = world.foa.handle_request(RegistrationRequest.decode(data), OBJ_ADDR, OBJ_PORT)
    _, out = world.foa.handle_reply(world.hoa_reply(relay.to_home_agent), HA)
    rrp = RegistrationReply.decode(out)
    assert rrp.code == ReplyCode.HA_MN_FAILED_AUTH
    assert find_auth(rrp, ExtType.FOREIGN_HOME_AUTH) is None
    assert verify_auth(rrp, ExtType.MOBILE_FOREIGN_AUTH, {MF_SPI: MF_KEY})


def test_deregistration_through_foa_removes_visitor(world: World) -> None:
    assert world.register(HOME).code == ReplyCode.ACCEPTED
    assert world.foa.visitors.get(HOME) is not None
    rrp = world.register(HOME, lifetime=0)
    assert rrp.code == ReplyCode.ACCEPTED and rrp.lifetime == 0
    assert world.foa.visitors.get(HOME) is None
    assert world.hoa.bindings.for_home(HOME) == []


# --- care-of-names ---------------------------------------------------------------------------


def test_same_name_objects_get_distinct_care_of_names(world: World) -> None:
    # "cam@home.moat" and "cam@elsewhere.moat": same object name, different home addresses
    n1 = world.register(HOME).find(CareOfName)[0].name
    n2 = world.register(HOME2).find(CareOfName)[0].name
    assert n1 == "cam.foa1"
    assert n2 != n1 and n2.startswith("cam.foa1")
    assert world.foa.visitors.get(HOME2).care_of_name == n2
    assert world.hoa.bindings.for_home(HOME2)[0].care_of_name == n2


def test_same_name_objects_registering_at_once_get_distinct_care_of_names(world: World) -> None:
    # both requests relayed before either reply comes back
    r1 = world.foa.handle_request(world.object_request(HOME), OBJ_ADDR, OBJ_PORT)
    r2 = world.foa.handle_request(world.object_request(HOME2), "10.0.2.51", OBJ_PORT)
    n1 = RegistrationRequest.decode(r1.to_home_agent).find(CareOfName)[0].name
    n2 = RegistrationRequest.decode(r2.to_home_agent).find(CareOfName)[0].name
    assert n1 != n2
    world.foa.handle_reply(world.hoa_reply(r1.to_home_agent), HA)
    world.foa.handle_reply(world.hoa_reply(r2.to_home_agent), HA)
    names = {v.care_of_name for v in world.foa.visitors.snapshot_objects()}
    assert names == {n1, n2}


def test_renewal_keeps_the_care_of_name(world: World) -> None:
    n1 = world.register(HOME).find(CareOfName)[0].name
    n2 = world.register(HOME2).find(CareOfName)[0].name
    assert world.register(HOME2).find(CareOfName)[0].name == n2
    assert world.register(HOME).find(CareOfName)[0].name == n1


def test_different_names_do_not_collide(world: World) -> None:
    assert world.register(HOME).find(CareOfName)[0].name == "cam.foa1"
    assert world.register(HOME3).find(CareOfName)[0].name == "mic.foa1"


# --- pending ---------------------------------------------------------------------------------


def test_expire_pending(world: World) -> None:
    r_old = world.object_request(HOME)
    relay_old = world.foa.handle_request(r_old, OBJ_ADDR, OBJ_PORT)
    world.clock.advance(3)
    r_new = world.object_request(HOME3)
    world.foa.handle_request(r_new, OBJ_ADDR, OBJ_PORT)
    world.clock.advance(2)
    assert world.foa.expire_pending(5.0) == []  # exactly 5 s old: kept
    world.clock.advance(0.5)
    gone = world.foa.expire_pending(5.0)
    assert [p.request.identification for p in gone] == [r_old.identification]
    assert list(world.foa.pending) == [(HOME3, r_new.identification)]
    # the late reply finds nothing pending
    assert world.foa.handle_reply(world.hoa_reply(relay_old.to_home_agent), HA) is None
    assert world.foa.visitors.get(HOME) is None
    world.clock.advance(10)
    assert len(world.foa.expire_pending(5.0)) == 1
    assert world.foa.pending == {}


def test_renewal_keeps_its_care_of_name_after_the_namesake_left() -> None:
    world = World()
    world.register(HOME)  # cam@home.moat -> cam.foa1
    second = world.register(HOME2)  # cam@elsewhere.moat -> cam.foa1-2
    assert second.find(CareOfName) == [CareOfName("cam.foa1-2")]
    world.register(HOME, lifetime=0)  # the first cam leaves
    renewed = world.register(HOME2)
    assert renewed.find(CareOfName) == [CareOfName("cam.foa1-2")]


def test_pending_relays_count_toward_the_visitor_cap() -> None:
    world = World(max_visitors=1)
    first = world.foa.handle_request(world.object_request(HOME), OBJ_ADDR, OBJ_PORT)
    assert first.to_home_agent is not None  # relayed, not yet answered
    second = world.foa.handle_request(world.object_request(HOME3), OBJ_ADDR, OBJ_PORT)
    assert second.code == ReplyCode.FA_INSUFFICIENT_RESOURCES
