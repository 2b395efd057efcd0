"""agent.mobility.home.HomeAgent: the RFC 5944 checks of the home object agent, with fake clocks.

Requests are built the way they arrive on the wire: the object's part (fixed part, MN-NAI,
Mobile-Home auth), then what the FOA appends (care-of-name NVSE, Foreign-Home auth), and are
decoded with RegistrationRequest.decode so authenticators are checked over received bytes.
"""

from __future__ import annotations

import pytest

from agent.core.config import Credential, HomeConfig, HomeObject
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
from packets.extensions import encode_extension
from fakeclock import FakeClock

HOME = "10.0.1.10"
HOME2 = "10.0.1.11"
HA = "10.0.1.1"
COA1 = "10.0.2.1"
COA2 = "10.0.3.1"
COA3 = "10.0.4.1"
NAI = "cam@home.moat"

MH_SPI, MH_KEY = 0x1001, b"mobile-home key of cam"
MH2_SPI, MH2_KEY = 0x1002, b"mobile-home key of cam2"
FH_SPI, FH_KEY = 0x3003, b"foreign-home key of foa1"
UNTRUSTED_FH_SPI, UNTRUSTED_FH_KEY = 0x3999, b"a stranger's key"

WALL0 = 1_700_000_000.0


class Env:
    """A home agent on fake clocks and a source of fresh identifications."""

    def __init__(self, max_bindings: int = 2, max_lifetime: int = 300) -> None:
        self.clock = FakeClock(500.0)
        self.wall = FakeClock(WALL0)
        self.cfg = HomeConfig(
            objects=[
                HomeObject(HOME, NAI, Credential(MH_SPI, MH_KEY)),
                HomeObject(HOME2, "cam2@home.moat", Credential(MH2_SPI, MH2_KEY)),
            ],
            trusted_foas=[Credential(FH_SPI, FH_KEY)],
            max_bindings=max_bindings,
            max_lifetime=max_lifetime,
            replay_window=7.0,
        )
        self.ha = HomeAgent(self.cfg, HA, clock=self.clock, wall_clock=self.wall)
        self._n = 0

    def ident(self) -> int:
        """Now on the wall clock, strictly increasing between calls."""
        self._n += 1
        return unix_to_ntp(self.wall.now) + self._n


def object_part(ident: int, *, home: str = HOME, coa: str = COA1, lifetime: int = 60,
                flags: RequestFlags = RequestFlags.G, nai: str = NAI,
                mh: tuple[int, bytes] = (MH_SPI, MH_KEY)) -> bytes:
    rrq = RegistrationRequest(home, HA, coa, ident, lifetime, flags, [NaiExtension(nai)])
    return append_auth(rrq.encode(), ExtType.MOBILE_HOME_AUTH, mh[0], mh[1])


def via_foa(data: bytes, care_of_name: str = "cam.foa1",
            fh: tuple[int, bytes] = (FH_SPI, FH_KEY)) -> RegistrationRequest:
    data += encode_extension(CareOfName(care_of_name))
    data = append_auth(data, ExtType.FOREIGN_HOME_AUTH, fh[0], fh[1])
    return RegistrationRequest.decode(data)


def request(env: Env, **kw) -> RegistrationRequest:
    name = kw.pop("care_of_name", "cam.foa1")
    fh = kw.pop("fh", (FH_SPI, FH_KEY))
    return via_foa(object_part(kw.pop("ident", None) or env.ident(), **kw), name, fh)


@pytest.fixture
def env() -> Env:
    return Env()


# --- acceptance ----------------------------------------------------------------------------


def test_accepted_registration_creates_binding_and_signed_reply(env: Env) -> None:
    rrq = request(env, lifetime=60, care_of_name="cam.foa1")
    d = env.ha.handle(rrq)
    assert d.code == ReplyCode.ACCEPTED
    assert d.update is not None and d.update.first_away

    [b] = env.ha.bindings.for_home(HOME)
    assert (b.care_of_address, b.care_of_name, b.lifetime) == (COA1, "cam.foa1", 60)
    assert b.nai == NAI
    assert b.identification == rrq.identification
    assert b.registered_at == env.clock.now

    rrp = RegistrationReply.decode(d.reply)
    assert rrp.code == ReplyCode.ACCEPTED
    assert (rrp.home_address, rrp.home_agent, rrp.identification) == (HOME, HA, rrq.identification)
    assert rrp.lifetime == 60
    assert rrp.find(GreKey) == [GreKey(b.gre_key)]
    assert verify_auth(rrp, ExtType.MOBILE_HOME_AUTH, {MH_SPI: MH_KEY})
    assert verify_auth(rrp, ExtType.FOREIGN_HOME_AUTH, {FH_SPI: FH_KEY})
    # not under someone else's key
    assert not verify_auth(rrp, ExtType.MOBILE_HOME_AUTH, {MH_SPI: MH2_KEY})
    assert not verify_auth(rrp, ExtType.FOREIGN_HOME_AUTH, {FH_SPI: UNTRUSTED_FH_KEY})
    # RFC 5944 order: Mobile-Home before Foreign-Home
    assert find_auth(rrp, ExtType.MOBILE_HOME_AUTH)[0] < find_auth(rrp, ExtType.FOREIGN_HOME_AUTH)[0]
    assert env.ha.stats["ACCEPTED"] == 1
    assert env.ha.bindings.last_identification[HOME] == rrq.identification


def test_lifetime_is_clamped_to_max_lifetime() -> None:
    env = Env(max_lifetime=100)
    d = env.ha.handle(request(env, lifetime=5000))
    assert d.code == ReplyCode.ACCEPTED
    assert env.ha.bindings.for_home(HOME)[0].lifetime == 100
    assert RegistrationReply.decode(d.reply).lifetime == 100


def test_care_of_name_is_the_last_care_of_name_nvse(env: Env) -> None:
    # an object may not choose its own care-of-name: the FOA's (appended last) wins
    data = RegistrationRequest(HOME, HA, COA1, env.ident(), 60, RequestFlags.G,
                               [NaiExtension(NAI), CareOfName("chosen-by-object")]).encode()
    data = append_auth(data, ExtType.MOBILE_HOME_AUTH, MH_SPI, MH_KEY)
    assert env.ha.handle(via_foa(data, "cam.foa1")).code == ReplyCode.ACCEPTED
    assert env.ha.bindings.for_home(HOME)[0].care_of_name == "cam.foa1"


def test_reverse_tunnel_flag_is_recorded(env: Env) -> None:
    env.ha.handle(request(env, flags=RequestFlags.G | RequestFlags.T))
    assert env.ha.bindings.for_home(HOME)[0].reverse_tunnel


def test_moving_replaces_binding_and_reports_removed(env: Env) -> None:
    first = env.ha.handle(request(env, coa=COA1)).update.binding
    d = env.ha.handle(request(env, coa=COA2, care_of_name="cam.foa2"))
    assert d.code == ReplyCode.ACCEPTED
    assert d.update.removed == [first]
    [b] = env.ha.bindings.for_home(HOME)
    assert (b.care_of_address, b.care_of_name) == (COA2, "cam.foa2")
    assert b.gre_key != first.gre_key


def test_renewal_keeps_gre_key(env: Env) -> None:
    k1 = env.ha.handle(request(env)).update.binding.gre_key
    env.clock.advance(30)
    env.wall.advance(30)
    d = env.ha.handle(request(env))
    assert d.code == ReplyCode.ACCEPTED
    assert RegistrationReply.decode(d.reply).find(GreKey) == [GreKey(k1)]


# --- denials -------------------------------------------------------------------------------


def assert_denied(env: Env, rrq: RegistrationRequest, code: ReplyCode) -> RegistrationReply:
    before = env.ha.bindings.snapshot()
    last = dict(env.ha.bindings.last_identification)
    d = env.ha.handle(rrq)
    assert d.code == code
    assert d.update is None
    assert env.ha.bindings.snapshot() == before
    assert env.ha.bindings.last_identification == last
    rrp = RegistrationReply.decode(d.reply)
    assert rrp.code == code
    assert rrp.lifetime == 0
    assert rrp.find(GreKey) == []
    assert rrp.identification == rrq.identification
    assert env.ha.stats[code.name] >= 1
    return rrp


def test_untrusted_foa_is_132_and_table_unchanged(env: Env) -> None:
    env.ha.handle(request(env, coa=COA1))
    rrp = assert_denied(env, request(env, coa=COA2, fh=(UNTRUSTED_FH_SPI, UNTRUSTED_FH_KEY)),
                        ReplyCode.HA_FA_FAILED_AUTH)
    # the HOA has no key for that SPI, so it cannot sign Foreign-Home
    assert find_auth(rrp, ExtType.FOREIGN_HOME_AUTH) is None
    # but the object can still check it came from its HOA
    assert verify_auth(rrp, ExtType.MOBILE_HOME_AUTH, {MH_SPI: MH_KEY})
    assert [b.care_of_address for b in env.ha.bindings.for_home(HOME)] == [COA1]


def test_trusted_spi_with_wrong_key_is_132(env: Env) -> None:
    assert_denied(env, request(env, fh=(FH_SPI, UNTRUSTED_FH_KEY)), ReplyCode.HA_FA_FAILED_AUTH)


def test_unknown_home_address_is_136(env: Env) -> None:
    rrp = assert_denied(env, request(env, home="10.0.1.99"), ReplyCode.HA_UNKNOWN_HA_ADDRESS)
    assert find_auth(rrp, ExtType.MOBILE_HOME_AUTH) is None  # no key to sign with
    assert len(env.ha.bindings) == 0


def test_wrong_mobile_home_key_is_131(env: Env) -> None:
    assert_denied(env, request(env, mh=(MH_SPI, b"not the key")), ReplyCode.HA_MN_FAILED_AUTH)


def test_other_objects_key_is_131(env: Env) -> None:
    # cam2's valid credential does not authenticate cam
    assert_denied(env, request(env, mh=(MH2_SPI, MH2_KEY)), ReplyCode.HA_MN_FAILED_AUTH)


def test_replay_of_same_identification_is_133(env: Env) -> None:
    ident = env.ident()
    assert env.ha.handle(request(env, ident=ident, coa=COA1)).code == ReplyCode.ACCEPTED
    assert_denied(env, request(env, ident=ident, coa=COA2), ReplyCode.HA_IDENTIFICATION_MISMATCH)
    assert [b.care_of_address for b in env.ha.bindings.for_home(HOME)] == [COA1]


def test_older_identification_is_133(env: Env) -> None:
    older = env.ident()
    newer = env.ident()
    assert env.ha.handle(request(env, ident=newer, coa=COA1)).code == ReplyCode.ACCEPTED
    assert_denied(env, request(env, ident=older, coa=COA2), ReplyCode.HA_IDENTIFICATION_MISMATCH)


def test_replay_state_is_per_object(env: Env) -> None:
    ident = env.ident()
    assert env.ha.handle(request(env, ident=ident)).code == ReplyCode.ACCEPTED
    d = env.ha.handle(request(env, ident=ident, home=HOME2, nai="cam2@home.moat",
                              mh=(MH2_SPI, MH2_KEY)))
    assert d.code == ReplyCode.ACCEPTED


def test_denied_request_does_not_advance_replay_state(env: Env) -> None:
    ident = env.ident()
    assert_denied(env, request(env, ident=ident, mh=(MH_SPI, b"bad")), ReplyCode.HA_MN_FAILED_AUTH)
    # the same identification, now correctly signed, is still fresh
    assert env.ha.handle(request(env, ident=ident)).code == ReplyCode.ACCEPTED


@pytest.mark.parametrize("offset", [-8.0, 8.0, -3600.0])
def test_identification_outside_window_is_133(env: Env, offset: float) -> None:
    ident = unix_to_ntp(env.wall.now + offset)
    assert_denied(env, request(env, ident=ident), ReplyCode.HA_IDENTIFICATION_MISMATCH)


def test_identification_inside_window_is_accepted(env: Env) -> None:
    assert env.ha.handle(request(env, ident=unix_to_ntp(env.wall.now - 6.5))).code == ReplyCode.ACCEPTED


def test_clock_skew_follows_the_wall_clock(env: Env) -> None:
    ident = env.ident()
    env.wall.advance(60)  # the request sat somewhere for a minute
    assert_denied(env, request(env, ident=ident), ReplyCode.HA_IDENTIFICATION_MISMATCH)


# --- simultaneous bindings -------------------------------------------------------------------


def test_s_registrations_make_two_bindings(env: Env) -> None:
    S = RequestFlags.G | RequestFlags.S
    d1 = env.ha.handle(request(env, coa=COA1, flags=S, care_of_name="cam.foa1"))
    d2 = env.ha.handle(request(env, coa=COA2, flags=S, care_of_name="cam.foa2"))
    assert d1.code == d2.code == ReplyCode.ACCEPTED
    assert d2.update.removed == []
    got = {b.care_of_address: b for b in env.ha.bindings.for_home(HOME)}
    assert set(got) == {COA1, COA2}
    assert got[COA2].care_of_name == "cam.foa2"
    k1 = RegistrationReply.decode(d1.reply).find(GreKey)[0].key
    k2 = RegistrationReply.decode(d2.reply).find(GreKey)[0].key
    assert {k1, k2} == {got[COA1].gre_key, got[COA2].gre_key}
    assert k1 != k2


def test_s_beyond_cap_is_135(env: Env) -> None:
    S = RequestFlags.G | RequestFlags.S
    env.ha.handle(request(env, coa=COA1, flags=S))
    env.ha.handle(request(env, coa=COA2, flags=S))
    assert env.ha.config.max_bindings == 2
    assert_denied(env, request(env, coa=COA3, flags=S), ReplyCode.HA_TOO_MANY_SIMULTANEOUS_BINDINGS)
    assert len(env.ha.bindings.for_home(HOME)) == 2


def test_135_does_not_consume_the_identification(env: Env) -> None:
    S = RequestFlags.G | RequestFlags.S
    env.ha.handle(request(env, coa=COA1, flags=S))
    env.ha.handle(request(env, coa=COA2, flags=S))
    ident = env.ident()
    assert env.ha.handle(request(env, ident=ident, coa=COA3, flags=S)).code == 135
    # the object falls back to a plain registration with the same Identification
    assert env.ha.handle(request(env, ident=ident, coa=COA3)).code == ReplyCode.ACCEPTED
    assert [b.care_of_address for b in env.ha.bindings.for_home(HOME)] == [COA3]


# --- deregistration --------------------------------------------------------------------------


def test_direct_deregistration_from_home_removes_all(env: Env) -> None:
    S = RequestFlags.G | RequestFlags.S
    env.ha.handle(request(env, coa=COA1, flags=S))
    env.ha.handle(request(env, coa=COA2, flags=S))
    env.ha.handle(request(env, coa=COA1, home=HOME2, nai="cam2@home.moat", mh=(MH2_SPI, MH2_KEY)))
    # straight from the object, no FOA: no care-of-name, no Foreign-Home auth
    rrq = RegistrationRequest.decode(object_part(env.ident(), coa=HOME, lifetime=0, flags=RequestFlags(0)))
    d = env.ha.handle(rrq)
    assert d.code == ReplyCode.ACCEPTED
    assert {b.care_of_address for b in d.update.removed} == {COA1, COA2}
    assert d.update.now_home and d.update.binding is None
    assert env.ha.bindings.for_home(HOME) == []
    assert env.ha.bindings.away() == {HOME2}
    rrp = RegistrationReply.decode(d.reply)
    assert rrp.lifetime == 0 and rrp.find(GreKey) == []
    assert verify_auth(rrp, ExtType.MOBILE_HOME_AUTH, {MH_SPI: MH_KEY})
    assert find_auth(rrp, ExtType.FOREIGN_HOME_AUTH) is None


def test_direct_deregistration_still_needs_mobile_home_auth(env: Env) -> None:
    env.ha.handle(request(env))
    rrq = RegistrationRequest.decode(
        object_part(env.ident(), coa=HOME, lifetime=0, flags=RequestFlags(0), mh=(MH_SPI, b"forged")))
    assert_denied(env, rrq, ReplyCode.HA_MN_FAILED_AUTH)


def test_direct_deregistration_is_replay_checked(env: Env) -> None:
    env.ha.handle(request(env))
    data = object_part(env.ident(), coa=HOME, lifetime=0, flags=RequestFlags(0))
    assert env.ha.handle(RegistrationRequest.decode(data)).code == ReplyCode.ACCEPTED
    env.ha.handle(request(env))  # away again
    assert_denied(env, RegistrationRequest.decode(data), ReplyCode.HA_IDENTIFICATION_MISMATCH)
    assert len(env.ha.bindings.for_home(HOME)) == 1


def test_registration_without_foreign_home_auth_is_132(env: Env) -> None:
    rrq = RegistrationRequest.decode(object_part(env.ident(), coa=COA1, lifetime=60))
    assert_denied(env, rrq, ReplyCode.HA_FA_FAILED_AUTH)


def test_deregistration_of_a_care_of_address_without_fh_is_132(env: Env) -> None:
    env.ha.handle(request(env, coa=COA1))
    # lifetime 0 but care-of != home address: only an FOA may relay this
    rrq = RegistrationRequest.decode(object_part(env.ident(), coa=COA1, lifetime=0))
    assert_denied(env, rrq, ReplyCode.HA_FA_FAILED_AUTH)


def test_deregistration_through_foa_removes_that_binding(env: Env) -> None:
    S = RequestFlags.G | RequestFlags.S
    env.ha.handle(request(env, coa=COA1, flags=S))
    env.ha.handle(request(env, coa=COA2, flags=S))
    d = env.ha.handle(request(env, coa=COA1, flags=S, lifetime=0))
    assert d.code == ReplyCode.ACCEPTED
    assert [b.care_of_address for b in d.update.removed] == [COA1]
    assert [b.care_of_address for b in env.ha.bindings.for_home(HOME)] == [COA2]
    rrp = RegistrationReply.decode(d.reply)
    assert rrp.lifetime == 0
    assert verify_auth(rrp, ExtType.FOREIGN_HOME_AUTH, {FH_SPI: FH_KEY})


def test_add_object_at_runtime(env: Env) -> None:
    home3 = "10.0.1.12"
    key = b"late object"
    assert env.ha.handle(request(env, home=home3, mh=(0x1003, key))).code == 136
    env.ha.add_object(HomeObject(home3, "late@home.moat", Credential(0x1003, key)))
    assert env.ha.handle(request(env, home=home3, mh=(0x1003, key))).code == ReplyCode.ACCEPTED


# --- mobile network prefixes (NEMO, RFC 5177; issue 11) --------------------------------------


def with_prefix(ident: int, prefix: tuple[str, int], home: str = HOME,
                mh: tuple[int, bytes] = (MH_SPI, MH_KEY)) -> RegistrationRequest:
    from packets import MobileNetwork

    rrq = RegistrationRequest(home, HA, COA1, ident, 60, RequestFlags.G,
                              [NaiExtension(NAI), MobileNetwork(*prefix)])
    return via_foa(append_auth(rrq.encode(), ExtType.MOBILE_HOME_AUTH, mh[0], mh[1]))


def prefix_env() -> Env:
    env = Env()
    env.cfg.objects[0].network_prefix = "10.0.1.224/30"
    env.ha = HomeAgent(env.cfg, HA, clock=env.clock, wall_clock=env.wall)
    return env


def test_an_object_registers_its_own_mobile_network_and_the_hoa_serves_it() -> None:
    env = prefix_env()
    decision = env.ha.handle(with_prefix(env.ident(), ("10.0.1.224", 30)))
    assert decision.code == ReplyCode.ACCEPTED
    assert decision.update.binding.network_prefix == "10.0.1.224/30"
    served = env.ha.bindings.served()
    assert sorted(served) == ["10.0.1.10", "10.0.1.224", "10.0.1.225", "10.0.1.226",
                              "10.0.1.227"]
    assert {b.care_of_address for bs in served.values() for b in bs} == {COA1}
    assert len(env.ha.bindings) == 1  # one binding: the secondaries are the object's business


@pytest.mark.parametrize("prefix, object_prefix", [
    (("10.0.1.228", 30), "10.0.1.224/30"),  # another object's prefix
    (("10.0.1.224", 29), "10.0.1.224/30"),  # wider than its own
    (("10.0.1.224", 30), ""),               # it has none
])
def test_a_prefix_that_is_not_the_objects_own_is_refused_142(prefix, object_prefix: str) -> None:
    env = Env()
    env.cfg.objects[0].network_prefix = object_prefix
    env.ha = HomeAgent(env.cfg, HA, clock=env.clock, wall_clock=env.wall)
    decision = env.ha.handle(with_prefix(env.ident(), prefix))
    assert decision.code == ReplyCode.HA_PREFIX_NOT_AUTHORIZED
    assert len(env.ha.bindings) == 0 and env.ha.bindings.served() == {}
