"""The foreign object agent (patent Fig. 9, Fig. 11 left-hand side).

Pure logic again: check an object's request, turn it into the relayed request for its HOA
(cut before Mobile-Foreign auth, add the care-of-name NVSE, sign Foreign-Home), and turn the
HOA's reply into the reply for the object (check Foreign-Home, cut it, sign Mobile-Foreign).
The daemon keeps the pending table and the sockets.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from dataclasses import dataclass
from typing import Callable

from packets import (
    CareOfName,
    ExtType,
    RegistrationReply,
    RegistrationRequest,
    ReplyCode,
    append_auth,
    bytes_before,
    verify_auth,
)
from packets.auth import find_auth
from packets import RequestFlags
from packets.extensions import GreKey, MobileNetwork, NaiExtension, encode_extension

from agent.mobility.bindings import Visitor, VisitorList
from agent.mobility.revocation import RevocationCheck, RevocationRefused
from packets.mobileip import RegistrationRevocation
from agent.core.config import Credential, ForeignConfig

#: The SPI of the nested home agents' Foreign-Home authenticator (see nested_home_credential).
NESTED_HOME_SPI = 3000


def nested_home_credential(router_key: bytes) -> Credential:
    """The credential a mobile object's router signs its nested home agent's replies with
    (NEMO: the object is the home agent of its secondaries), and every FOA of the run
    accepts: derived from the run's router key, so no new key is handed out."""
    return Credential(NESTED_HOME_SPI,
                      hmac.new(router_key, b"moat nested home agent", hashlib.sha256).digest())

log = logging.getLogger(__name__)


@dataclass
class Pending:
    """A request relayed to an HOA and not yet answered."""

    request: RegistrationRequest
    object_address: str
    object_port: int
    care_of_name: str
    mf_spi: int
    sent_at: float
    #: The interface the request arrived on ("" unknown): with ``object_address``, where the
    #: visitor is bound while the registration lives.
    interface: str = ""
    #: The HOA the request was relayed to: only a reply from this address answers it.
    relayed_to: str = ""
    #: The address the object sent its request to ("" unknown): the reply goes from there,
    #: and the object takes a reply only from the address it asked.
    local_address: str = ""


@dataclass
class Relay:
    """What to send where: ``denial`` for the object, or ``relay`` bytes for the HOA."""

    code: ReplyCode
    to_object: bytes | None = None
    to_home_agent: bytes | None = None


class ForeignAgent:
    """Visitor list plus the relay rules of a foreign object agent."""

    def __init__(
        self,
        config: ForeignConfig,
        name: str,
        care_of_addresses: set[str],
        clock: Callable[[], float] = time.monotonic,
        nested_home: Credential | None = None,
    ) -> None:
        assert config.foreign_home is not None
        self.config = config
        #: The run's nested home agents (mobile objects acting as home agent of their
        #: secondaries) sign their replies under this credential, derived from the router
        #: key: an acceptance must carry it or the HOA's Foreign-Home authenticator.
        self.nested_home = nested_home
        self.name = name
        self.care_of_addresses = care_of_addresses
        self.clock = clock
        self.visitors = VisitorList(clock)
        self.pending: dict[tuple[str, int], Pending] = {}
        self._object_keys = {c.spi: c.key for c in config.trusted_objects}
        self.stats = {"relayed": 0, "denied": 0, "replies": 0, "bad_replies": 0,
                      "bound_elsewhere": 0, "wrong_source_replies": 0,
                      "revocations": 0, "revoked_visitors": 0, "refused_revocations": 0}
        fh = config.foreign_home
        hoa_keys = {fh.spi: fh.key}
        if nested_home is not None:
            hoa_keys[nested_home.spi] = nested_home.key
        #: The HOAs' revocations (issue 18): checked under the same keys as their replies.
        self.revocations = RevocationCheck(care_of_addresses, hoa_keys)

    def care_of_name_for(self, rrq: RegistrationRequest) -> str:
        """``<object name>.<this FOA>``: unique on the foreign network because FOA names are.

        Two different objects with the same name get ``-2``, ``-3``... appended.
        """
        current = self.visitors.get(rrq.home_address, rrq.care_of_address)
        if current is not None:
            return current.care_of_name  # a renewal keeps its name
        nais = rrq.find(NaiExtension)
        base = (nais[0].nai.split("@", 1)[0] if nais else rrq.home_address) + f".{self.name}"
        taken = {v.care_of_name for v in self.visitors.snapshot_objects()
                 if (v.home_address, v.care_of_address) != (rrq.home_address, rrq.care_of_address)}
        # Names handed out in relays not yet answered are taken too, or two same-named objects
        # registering at once would both be given the base name.
        taken |= {p.care_of_name for p in self.pending.values()
                  if (p.request.home_address, p.request.care_of_address)
                  != (rrq.home_address, rrq.care_of_address)}
        name, n = base, 1
        while name in taken:
            n += 1
            name = f"{base}-{n}"
        return name

    def deny(self, rrq: RegistrationRequest, code: ReplyCode) -> Relay:
        self.stats["denied"] += 1
        reply = RegistrationReply(code, rrq.home_address, rrq.home_agent, rrq.identification, 0)
        return Relay(code, to_object=reply.encode())

    def bound_elsewhere(self, rrq: RegistrationRequest, src: str, interface: str) -> bool:
        """Whether the visitor (home address, care-of address) of ``rrq`` is bound to another
        place than ``src`` on ``interface``: by a live visitor entry or a relay in flight.

        A visitor is bound to the source address and interface its registration first came
        from, for as long as that registration lives; a request for it from anywhere else
        (a replay from another host) must not move its route there."""
        here = (src, interface)
        visitor = self.visitors.get(rrq.home_address, rrq.care_of_address)
        if visitor is not None and (visitor.local_address, visitor.local_interface) != here:
            return True
        return any((p.object_address, p.interface) != here for p in self.pending.values()
                   if (p.request.home_address, p.request.care_of_address)
                   == (rrq.home_address, rrq.care_of_address))

    def handle_request(self, rrq: RegistrationRequest, src: str, port: int,
                       interface: str = "", local_address: str = "") -> Relay:
        """An object's request from ``src``:``port``, heard on ``interface``: check it, then
        relay it to its HOA.

        A request for a visitor bound elsewhere (:meth:`bound_elsewhere`) is refused with 65
        (administratively prohibited, RFC 5944 §3.7.2: the FOA's policy forbids it; the
        request itself is well formed and authentic) and changes nothing."""
        if not verify_auth(rrq, ExtType.MOBILE_FOREIGN_AUTH, self._object_keys):
            return self.deny(rrq, ReplyCode.FA_MN_FAILED_AUTH)
        if self.bound_elsewhere(rrq, src, interface):
            self.stats["bound_elsewhere"] += 1
            return self.deny(rrq, ReplyCode.FA_ADMIN_PROHIBITED)
        if rrq.lifetime > self.config.max_lifetime:
            return self.deny(rrq, ReplyCode.FA_LIFETIME_TOO_LONG)
        if rrq.care_of_address not in self.care_of_addresses:
            return self.deny(rrq, ReplyCode.FA_INVALID_COA)
        pending_others = {p.request.home_address for p in self.pending.values()} - {rrq.home_address}
        if (self.visitors.get(rrq.home_address, rrq.care_of_address) is None
                and len(self.visitors) + len(pending_others) >= self.config.max_visitors):
            return self.deny(rrq, ReplyCode.FA_INSUFFICIENT_RESOURCES)
        mf = find_auth(rrq, ExtType.MOBILE_FOREIGN_AUTH)
        assert mf is not None  # verify_auth passed
        coname = self.care_of_name_for(rrq)
        fh = self.config.foreign_home
        assert fh is not None
        relayed = bytes_before(rrq, ExtType.MOBILE_FOREIGN_AUTH) + encode_extension(CareOfName(coname))
        relayed = append_auth(relayed, ExtType.FOREIGN_HOME_AUTH, fh.spi, fh.key)
        # Re-inserted at the end: the table stays in the order the relays were sent, so
        # expire_pending looks only at the ones due.
        self.pending.pop((rrq.home_address, rrq.identification), None)
        self.pending[(rrq.home_address, rrq.identification)] = Pending(
            rrq, src, port, coname, mf[1].spi, self.clock(), interface, rrq.home_agent,
            local_address,
        )
        self.stats["relayed"] += 1
        return Relay(ReplyCode.ACCEPTED, to_home_agent=relayed)

    def handle_reply(self, rrp: RegistrationReply, source: str) -> tuple[Pending, bytes] | None:
        """The HOA's reply from ``source``: check it answers a relay of ours (home address and
        Identification) and comes from the HOA that relay went to, check Foreign-Home, update
        visitors, build the object's reply.

        A reply from any other source, acceptance or denial, is dropped (counted in
        ``wrong_source_replies``) and leaves the relay pending: the real HOA's answer still
        goes through."""
        pending = self.pending.get((rrp.home_address, rrp.identification))
        if pending is None:
            self.stats["bad_replies"] += 1
            return None
        if source != pending.relayed_to:
            self.stats["wrong_source_replies"] += 1
            return None
        fh = self.config.foreign_home
        assert fh is not None
        keys = {fh.spi: fh.key}
        if self.nested_home is not None:
            keys[self.nested_home.spi] = self.nested_home.key
        fh_ok = verify_auth(rrp, ExtType.FOREIGN_HOME_AUTH, keys)
        if rrp.accepted and not fh_ok:
            # An acceptance must come from the HOA; a denial grants nothing and an HOA that
            # does not trust us cannot sign it, so denials are relayed (the object still checks
            # the Mobile-Home authenticator).
            self.stats["bad_replies"] += 1  # the caller logs it, rate-limited
            return None
        del self.pending[(rrp.home_address, rrp.identification)]
        self.stats["replies"] += 1
        rrq = pending.request
        if rrp.accepted and rrp.lifetime > 0:
            networks = rrq.find(MobileNetwork)
            keys = rrp.find(GreKey)
            self.visitors.add(Visitor(
                rrq.home_address, rrq.home_agent, pending.object_address, pending.object_port,
                (rrq.find(NaiExtension) or [NaiExtension(rrq.home_address)])[0].nai,
                pending.care_of_name, rrp.lifetime, self.clock(),
                keys[0].key if keys else None, rrq.care_of_address,
                bool(rrq.flags & RequestFlags.T),
                str(networks[0].network) if networks else "",
                pending.interface,
                rrq.identification,
            ))
        elif rrp.accepted:
            self.visitors.remove(rrq.home_address, rrq.care_of_address)
        has_fh = find_auth(rrp, ExtType.FOREIGN_HOME_AUTH) is not None
        out = bytes_before(rrp, ExtType.FOREIGN_HOME_AUTH) if has_fh else rrp.raw
        if rrp.accepted:  # the object learns its care-of-name (patent Fig. 7, 122)
            out += encode_extension(CareOfName(pending.care_of_name))
        key = self._object_keys[pending.mf_spi]
        out = append_auth(out, ExtType.MOBILE_FOREIGN_AUTH, pending.mf_spi, key)
        return pending, out

    def handle_revocation(self, rev: RegistrationRevocation, source: str
                          ) -> tuple[bytes, Visitor | None]:
        """The HOA's revocation from ``source`` (:mod:`agent.mobility.revocation`): check it,
        forget the visitor it revokes (journalled, as every removal), and return the signed
        acknowledgement with the visitor removed (None: none was, e.g. a repeat, or the
        entry is from a newer registration than the one revoked).

        Raises :class:`RevocationRefused` for a revocation to drop unanswered (counted)."""
        try:
            act, cred = self.revocations.check(rev, source)
        except RevocationRefused:
            self.stats["refused_revocations"] += 1
            raise
        self.stats["revocations"] += 1
        gone = None
        visitor = self.visitors.get(rev.home_address, rev.care_of_address)
        if act and visitor is not None and visitor.home_agent == rev.home_agent \
                and visitor.identification <= rev.registration_id:
            gone = self.visitors.remove(rev.home_address, rev.care_of_address)
            self.stats["revoked_visitors"] += 1
        return self.revocations.ack(rev, cred), gone

    def expire_pending(self, timeout: float) -> list[Pending]:
        """Forget relays the HOA never answered (the object retransmits on its own)."""
        now = self.clock()
        gone = []
        for key, pending in self.pending.items():  # oldest first (see handle_request)
            if now - pending.sent_at <= timeout:
                break
            gone.append(key)
        return [self.pending.pop(k) for k in gone]
