"""agent.mobility.revocation: the HOA tells the old FOA at once that a binding went (issue 18).

Two FOAs and one HOA on fake clocks, wired through real bytes: whom the HOA notifies, what
the FOA accepts and removes (journalled), what it refuses, and that retries are bounded.
"""

from __future__ import annotations

import pytest

from agent.core.config import Credential, ForeignConfig, HomeConfig, HomeObject
from agent.mobility.bindings import Visitor
from agent.mobility.foreign import ForeignAgent
from agent.mobility.home import HomeAgent
from agent.mobility.journal import binding_fields, visitor_fields
from agent.mobility.revocation import FIRST_RETRY, GIVE_UP_AFTER, MAX_TRIES, RevocationRefused
from packets import (
    ExtType,
    MalformedMessage,
    NaiExtension,
    RegistrationReply,
    RegistrationRequest,
    RequestFlags,
    append_auth,
    unix_to_ntp,
)
from packets.mobileip import (
    RegistrationRevocation,
    RevocationAck,
    decode_mobileip,
    decode_registration,
)
from fakeclock import FakeClock

HA = "10.0.1.1"
HOME = "10.0.1.10"
NAI = "cam@home.moat"
MH = (0x1001, b"mh cam")
MF = (0x2002, b"mobile-foreign key")
FH1, FH2 = (0x3003, b"foreign-home key 1"), (0x3004, b"foreign-home key 2")
COA1, COA2 = "10.0.2.1", "10.0.3.1"
OBJ1, OBJ2 = "10.0.2.50", "10.0.3.50"
WALL0 = 1_700_000_000.0


class Recorder:
    """A table observer that keeps what it is told (the journal's place)."""

    def __init__(self) -> None:
        self.removed: list[Visitor] = []

    def visitor_set(self, visitor: Visitor) -> None:
        pass

    def visitor_removed(self, visitor: Visitor) -> None:
        self.removed.append(visitor)


class World:
    def __init__(self) -> None:
        self.clock = FakeClock(100.0)
        self.wall = FakeClock(WALL0)
        self.foas = {
            COA1: self._foa("foa1", COA1, FH1),
            COA2: self._foa("foa2", COA2, FH2),
        }
        self.journal = {coa: Recorder() for coa in self.foas}
        for coa, foa in self.foas.items():
            foa.visitors.observer = self.journal[coa]  # type: ignore[assignment]
        self.hoa = HomeAgent(HomeConfig(objects=[HomeObject(HOME, NAI, Credential(*MH))],
                                        trusted_foas=[Credential(*FH1), Credential(*FH2)]),
                             HA, clock=self.clock, wall_clock=self.wall)
        self._n = 0

    def _foa(self, name: str, coa: str, fh: tuple[int, bytes]) -> ForeignAgent:
        return ForeignAgent(ForeignConfig(trusted_objects=[Credential(*MF)],
                                          foreign_home=Credential(*fh)),
                            name, {coa}, clock=self.clock)

    def request(self, coa: str, lifetime: int = 60, flags: RequestFlags = RequestFlags.G
                ) -> RegistrationRequest:
        self._n += 1
        rrq = RegistrationRequest(HOME, HA, coa, unix_to_ntp(self.wall.now) + self._n, lifetime,
                                  flags, [NaiExtension(NAI)])
        data = append_auth(rrq.encode(), ExtType.MOBILE_HOME_AUTH, *MH)
        return RegistrationRequest.decode(append_auth(data, ExtType.MOBILE_FOREIGN_AUTH, *MF))

    def register(self, coa: str, lifetime: int = 60, flags: RequestFlags = RequestFlags.G):
        """Through the FOA at ``coa``; returns the HOA's decision (its notices)."""
        foa = self.foas[coa]
        relay = foa.handle_request(self.request(coa, lifetime, flags),
                                   OBJ1 if coa == COA1 else OBJ2, 40000)
        assert relay.to_home_agent is not None, relay
        decision = self.hoa.handle(RegistrationRequest.decode(relay.to_home_agent))
        assert foa.handle_reply(RegistrationReply.decode(decision.reply), HA) is not None
        return decision

    def deregister_direct(self):
        self._n += 1
        rrq = RegistrationRequest(HOME, HA, HOME, unix_to_ntp(self.wall.now) + self._n, 0,
                                  RequestFlags(0), [NaiExtension(NAI)])
        data = append_auth(rrq.encode(), ExtType.MOBILE_HOME_AUTH, *MH)
        return self.hoa.handle(RegistrationRequest.decode(data))

    def deliver(self, data: bytes, source: str = HA, coa: str = COA1):
        """A revocation into the FOA at ``coa``: its acknowledgement and the visitor removed."""
        msg = decode_mobileip(data)
        assert isinstance(msg, RegistrationRevocation)
        return self.foas[coa].handle_revocation(msg, source)


@pytest.fixture
def world() -> World:
    return World()


# --- the HOA decides whom to notify ------------------------------------------------------


def test_a_registration_elsewhere_revokes_the_old_foa_and_it_forgets_the_visitor(world: World) -> None:
    world.register(COA1)
    old = world.foas[COA1].visitors.get(HOME, COA1)
    assert old is not None and old.identification > 0
    decision = world.register(COA2)  # break-before-make: the new binding replaces the old
    assert [n.to for n in decision.notices] == [COA1]
    sent = world.hoa.revoker.due()
    assert sent == decision.notices and sent[0].tries == 1
    rev = decode_mobileip(sent[0].data)
    assert (rev.home_address, rev.home_agent, rev.care_of_address, rev.registration_id) == \
        (HOME, HA, COA1, old.identification)

    ack, gone = world.deliver(sent[0].data)
    assert gone is old and world.foas[COA1].visitors.get(HOME) is None
    assert world.journal[COA1].removed == [old], "the removal is journalled"
    assert world.foas[COA2].visitors.get(HOME, COA2) is not None, "the new FOA keeps its own"

    world.clock.advance(0.003)
    notice = world.hoa.revoker.on_ack(RevocationAck.decode(ack), COA1)
    assert notice.to == COA1 and world.hoa.revoker.pending == {}
    assert world.hoa.revoker.status()["ack_delays_ms"] == [3.0]
    world.clock.advance(10)
    assert world.hoa.revoker.due() == [], "acknowledged: no retry"


def test_simultaneous_binding_and_renewal_revoke_nothing(world: World) -> None:
    world.register(COA1)
    assert world.register(COA1).notices == [], "a renewal at the same care-of address"
    assert world.register(COA2, flags=RequestFlags.G | RequestFlags.S).notices == [], \
        "make-before-break's second binding (S) removes none"


def test_deregistration_through_the_old_foa_needs_no_revocation(world: World) -> None:
    world.register(COA1)
    world.register(COA2, flags=RequestFlags.G | RequestFlags.S)
    decision = world.register(COA1, lifetime=0)  # the source deregisters its own binding
    assert [b.care_of_address for b in decision.update.removed] == [COA1]
    assert decision.notices == [], "that FOA drops its visitor when it relays the acceptance"
    assert world.foas[COA1].visitors.get(HOME) is None


def test_going_home_revokes_every_foa(world: World) -> None:
    world.register(COA1)
    world.register(COA2, flags=RequestFlags.G | RequestFlags.S)
    decision = world.deregister_direct()
    assert sorted(n.to for n in decision.notices) == [COA1, COA2]
    for notice in world.hoa.revoker.due():
        ack, gone = world.deliver(notice.data, coa=notice.to)
        assert gone is not None
        world.hoa.revoker.on_ack(RevocationAck.decode(ack), notice.to)
    assert all(len(f.visitors) == 0 for f in world.foas.values())
    assert world.hoa.revoker.pending == {}


def test_a_binding_whose_foa_key_is_unknown_is_left_to_expire(world: World) -> None:
    world.register(COA1)
    world.hoa.bindings.for_home(HOME)[0].foa_spi = 0x9999  # not a trusted FOA's SPI
    assert world.register(COA2).notices == []
    assert world.hoa.revoker.stats["no_credential"] == 1


# --- the FOA validates ---------------------------------------------------------------------


def revocation(world: World, **kw) -> RegistrationRevocation:
    visitor = world.foas[COA1].visitors.get(HOME, COA1)
    fields = dict(home_address=HOME, home_agent=HA, care_of_address=COA1, revocation_id=int(WALL0),
                  registration_id=visitor.identification if visitor else 1)
    fields.update(kw)
    return RegistrationRevocation(**fields)


def signed(rev: RegistrationRevocation, cred: tuple[int, bytes] = FH1) -> bytes:
    return append_auth(rev.encode(), ExtType.FOREIGN_HOME_AUTH, *cred)


@pytest.mark.parametrize("case, data, source", [
    ("forged key", lambda w: signed(revocation(w), (FH1[0], b"guessed")), HA),
    ("another FOA's key", lambda w: signed(revocation(w), FH2), HA),
    ("unsigned", lambda w: revocation(w).encode(), HA),
    ("not from the HOA it names", lambda w: signed(revocation(w)), "10.0.2.66"),
    ("not our care-of address", lambda w: signed(revocation(w, care_of_address=COA2)), HA),
    ("zero registration id", lambda w: signed(revocation(w, registration_id=0)), HA),
])
def test_bad_revocations_are_refused_and_change_nothing(world: World, case, data, source) -> None:
    world.register(COA1)
    with pytest.raises(RevocationRefused):
        world.deliver(data(world), source)
    assert world.foas[COA1].visitors.get(HOME, COA1) is not None, case
    assert world.journal[COA1].removed == []
    assert world.foas[COA1].stats["refused_revocations"] == 1
    assert world.foas[COA1].revocations.last_ids == {}, "nothing is kept for a refused one"


def test_replays_are_refused_and_repeats_acknowledged_once_more(world: World) -> None:
    world.register(COA1)
    first = signed(revocation(world, revocation_id=int(WALL0) + 5))
    ack, gone = world.deliver(first)
    assert gone is not None
    world.register(COA1)  # the object comes back through this FOA
    ack2, gone2 = world.deliver(first)  # the HOA's retry after a lost acknowledgement
    assert ack2 == ack and gone2 is None, "acknowledged again, the new visitor kept"
    with pytest.raises(RevocationRefused, match="replayed"):
        world.deliver(signed(revocation(world, revocation_id=int(WALL0) + 4,
                                        registration_id=2**63)))
    assert world.foas[COA1].visitors.get(HOME, COA1) is not None


def test_a_revocation_of_an_older_registration_keeps_the_newer_visitor(world: World) -> None:
    world.register(COA1)
    older = world.foas[COA1].visitors.get(HOME, COA1).identification
    world.register(COA1)  # renewed: the entry now comes from a later registration
    ack, gone = world.deliver(signed(revocation(world, registration_id=older)))
    assert gone is None and world.foas[COA1].visitors.get(HOME, COA1) is not None
    assert RevocationAck.decode(ack).revocation_id == int(WALL0), "still acknowledged"


def test_the_foa_remembers_a_bounded_number_of_hoas(world: World, monkeypatch) -> None:
    from agent.mobility import revocation as mod

    monkeypatch.setattr(mod, "MAX_HOAS", 3)
    check = world.foas[COA1].revocations
    for i in range(10):
        check.last_ids[f"10.9.0.{i}"] = i
    world.register(COA1)
    world.deliver(signed(revocation(world)))
    assert len(check.last_ids) == 3 and HA in check.last_ids


# --- retries are bounded; acknowledgements are checked -----------------------------------


def test_retries_back_off_and_stop_after_max_tries(world: World) -> None:
    world.register(COA1)
    world.register(COA2)
    revoker = world.hoa.revoker
    sends = []
    for _ in range(200):
        for notice in revoker.due():
            sends.append(world.clock.now)
        nxt = revoker.next_due()
        if nxt is None:
            break
        world.clock.now = nxt
    assert len(sends) == MAX_TRIES
    gaps = [round(b - a, 6) for a, b in zip(sends, sends[1:])]
    assert gaps == [FIRST_RETRY * 2 ** i for i in range(MAX_TRIES - 1)]
    assert revoker.pending == {} and revoker.stats["given_up"] == 1
    assert revoker.stats["sent"] == 1 and revoker.stats["retried"] == MAX_TRIES - 1


def test_notices_nobody_sends_are_given_up_all_the_same(world: World) -> None:
    """A nested home agent computes revocations but sends none: they must not pile up."""
    world.register(COA1)
    world.register(COA2)
    assert len(world.hoa.revoker.pending) == 1
    world.clock.advance(GIVE_UP_AFTER + 1)
    world.register(COA1)
    assert [n.to for n in world.hoa.revoker.pending.values()] == [COA2]
    assert world.hoa.revoker.stats["given_up"] == 1


@pytest.mark.parametrize("case", ["wrong source", "forged", "unknown id", "other object"])
def test_bad_acknowledgements_are_refused_and_retries_go_on(world: World, case: str) -> None:
    world.register(COA1)
    world.register(COA2)
    (notice,) = world.hoa.revoker.due()
    rid = notice.revocation.revocation_id
    ack = {"wrong source": (RevocationAck(HOME, rid), FH1, COA2),
           "forged": (RevocationAck(HOME, rid), (FH1[0], b"guessed"), COA1),
           "unknown id": (RevocationAck(HOME, rid + 1), FH1, COA1),
           "other object": (RevocationAck("10.0.1.99", rid), FH1, COA1)}[case]
    data = append_auth(ack[0].encode(), ExtType.FOREIGN_HOME_AUTH, *ack[1])
    with pytest.raises(RevocationRefused):
        world.hoa.revoker.on_ack(RevocationAck.decode(data), ack[2])
    assert rid in world.hoa.revoker.pending
    world.clock.advance(FIRST_RETRY)
    assert world.hoa.revoker.due() == [notice] and notice.tries == 2


def test_revocation_ids_increase_within_a_second(world: World) -> None:
    world.register(COA1)
    world.register(COA2)
    world.register(COA1)
    ids = [n.revocation.revocation_id for n in world.hoa.revoker.pending.values()]
    assert len(ids) == 2 and ids[1] == ids[0] + 1 and ids[0] == int(WALL0)


# --- wire format and journal -----------------------------------------------------------


def test_codec_is_strict() -> None:
    rev = RegistrationRevocation(HOME, HA, COA1, 7, 2**64 - 1)
    assert len(rev.encode()) == 30 and decode_mobileip(rev.encode()) == rev
    ack = RevocationAck(HOME, 7)
    assert len(ack.encode()) == 14 and decode_mobileip(ack.encode()) == ack
    for bad in (rev.encode()[:29], ack.encode()[:13], b"\x07", bytes([9]) + bytes(29)):
        with pytest.raises(MalformedMessage):
            decode_mobileip(bad)
    with pytest.raises(MalformedMessage):
        decode_registration(rev.encode())  # the tools that know requests and replies only
    with pytest.raises(MalformedMessage):
        RevocationAck.decode(rev.encode())


def test_journal_records_without_the_new_fields_still_load() -> None:
    visitor = {"home_address": HOME, "home_agent": HA, "local_address": OBJ1, "local_port": 1,
               "local_name": NAI, "care_of_name": "cam.foa1", "lifetime": 60, "gre_key": 5,
               "care_of_address": COA1, "reverse_tunnel": False, "network_prefix": "",
               "local_interface": "eth0"}
    assert visitor_fields(visitor)["identification"] == 0
    binding = {"home_address": HOME, "care_of_address": COA1, "care_of_name": "c", "gre_key": 5,
               "lifetime": 60, "nai": NAI, "identification": 9, "reverse_tunnel": False,
               "part": "primary", "network_prefix": ""}
    assert binding_fields(binding)["foa_spi"] == 0
    assert binding_fields({**binding, "foa_spi": FH1[0]})["foa_spi"] == FH1[0]
