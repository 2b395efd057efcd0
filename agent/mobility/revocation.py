"""Binding revocation: the HOA tells the old FOA at once that a binding went (issue 18).

Without it, an object that moved on (or went home) stayed a visitor of the FOA it left, with
that FOA's route for its home address to the router it left, until the registration's
lifetime ran out: hosts on that foreign network could not reach the object meanwhile. The
HOA is the one party that sees every binding go, whichever way the object moved (a
make-before-break source deregistering, a break-before-make target's registration replacing
the binding, a direct deregistration from home), so it is the HOA that notifies, after
RFC 3543 (Registration Revocation, UDP 434, Foreign-Home authenticated, acknowledged).

Pure logic with injected clocks: :class:`Revoker` (the HOA's side) decides whom to notify,
builds the signed notices and keeps them until acknowledged or :data:`MAX_TRIES` sends;
:class:`RevocationCheck` (the FOA's side) validates a notice and the acknowledgement it
answers with. The object agent role (:mod:`agent.mobility.agent_role`) does the I/O.

A revocation names the registration it revokes (its Identification): the FOA removes the
visitor only if its entry comes from that registration or an earlier one, so a revocation
that crosses the object's new registration through the same FOA, or a replay of an old
one, removes nothing. Revocation ids increase per HOA; the FOA refuses one below the last it
accepted from that HOA (a replay) and acknowledges a repeat of the last one again (the HOA's
retry after a lost acknowledgement) without doing anything twice.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

from packets import ExtType, append_auth, verify_auth
from packets.auth import find_auth
from packets.mobileip import (
    RegistrationRequest,
    RegistrationRevocation,
    RevocationAck,
    RevocationFlags,
)

from agent.core.config import Credential
from agent.core.errors import AgentError
from agent.mobility.bindings import Binding

log = logging.getLogger(__name__)

#: Sends of one revocation at most (the first and its retries, the last 6.2 s after the
#: first: an FOA whose agent restarts meanwhile still gets it, its visitor restored from its
#: journal); then the visitor is left to expire at the FOA as before.
MAX_TRIES = 6
#: Seconds before the first retry; doubled after each.
FIRST_RETRY = 0.2
#: Revocations awaiting an acknowledgement at most (the oldest is given up beyond).
MAX_PENDING = 1024
#: A revocation not acknowledged this many seconds after the binding went is given up even
#: if nobody called :meth:`Revoker.due` (an agent whose socket closed meanwhile).
GIVE_UP_AFTER = 30.0
#: HOAs an FOA remembers the last revocation id of (the least recently heard is forgotten).
MAX_HOAS = 256


class RevocationRefused(AgentError):
    """A revocation or acknowledgement that must change nothing; ``reason`` says why."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class Notice:
    """One revocation on its way to an FOA, until acknowledged or given up."""

    revocation: RegistrationRevocation
    data: bytes
    credential: Credential
    #: Where it goes (the revoked binding's care-of address, UDP 434).
    to: str
    tries: int = 0
    next_at: float = 0.0
    #: When the binding went (the first send): for the acknowledgement's delay.
    created: float = 0.0


def revoked_bindings(rrq: RegistrationRequest, removed: Iterable[Binding]) -> list[Binding]:
    """Which removed bindings' FOAs must be told: all but the one an object deregisters
    through itself (lifetime 0 relayed by that very FOA, which drops its visitor when it
    relays the HOA's acceptance)."""
    direct = rrq.care_of_address == rrq.home_address
    return [b for b in removed
            if direct or not (rrq.lifetime == 0 and b.care_of_address == rrq.care_of_address)]


class Revoker:
    """The HOA's revocations: built, signed, retried with back-off, matched to their
    acknowledgements."""

    def __init__(self, address: str, foa_keys: Mapping[int, bytes],
                 fallback: Callable[[], Credential | None] = lambda: None,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.address = address
        self._foa_keys = foa_keys
        #: The credential used when a binding's FOA SPI is unknown here (a nested home
        #: agent's router-key credential, which every FOA of the run accepts).
        self._fallback = fallback
        self.clock = clock
        self.wall_clock = wall_clock
        self.pending: OrderedDict[int, Notice] = OrderedDict()
        self._last_id = 0
        self.stats = {"sent": 0, "retried": 0, "acknowledged": 0, "given_up": 0,
                      "no_credential": 0, "bad_acks": 0}
        #: Seconds from the first send to the acknowledgement, the last few (for status).
        self.ack_delays: list[float] = []

    def _next_id(self) -> int:
        """Increasing over this HOA's life and across its restarts: the wall-clock second,
        or one above the last when several go out within a second."""
        self._last_id = max(self._last_id + 1, int(self.wall_clock())) & 0xFFFFFFFF
        return self._last_id

    def credential_for(self, binding: Binding) -> Credential | None:
        key = self._foa_keys.get(binding.foa_spi) if binding.foa_spi else None
        if key is not None:
            return Credential(binding.foa_spi, key)
        return self._fallback()

    def revoke(self, home_agent: str, bindings: Iterable[Binding]) -> list[Notice]:
        """Notices for the FOAs of ``bindings`` (gone from the table), due now."""
        out = []
        for b in bindings:
            cred = self.credential_for(b)
            if cred is None:
                self.stats["no_credential"] += 1
                log.info("HOA: no Foreign-Home key for the FOA of %s at %s; its visitor "
                         "expires on its own", b.home_address, b.care_of_address)
                continue
            rev = RegistrationRevocation(b.home_address, home_agent, b.care_of_address,
                                         self._next_id(), b.identification, RevocationFlags.A)
            data = append_auth(rev.encode(), ExtType.FOREIGN_HOME_AUTH, cred.spi, cred.key)
            now = self.clock()
            for rid in [r for r, n in self.pending.items() if n.created < now - GIVE_UP_AFTER]:
                del self.pending[rid]
                self.stats["given_up"] += 1
            notice = Notice(rev, data, cred, b.care_of_address, 0, now, now)
            self.pending[rev.revocation_id] = notice
            while len(self.pending) > MAX_PENDING:
                _, old = self.pending.popitem(last=False)
                self.stats["given_up"] += 1
                log.info("HOA: revocation of %s at %s given up (too many pending)",
                         old.revocation.home_address, old.to)
            out.append(notice)
        return out

    def due(self) -> list[Notice]:
        """The notices to send now (first sends and retries), each counted as one try;
        those sent :data:`MAX_TRIES` times and still unacknowledged are given up."""
        now = self.clock()
        out = []
        for rid, notice in list(self.pending.items()):
            if notice.next_at > now:
                continue
            if notice.tries >= MAX_TRIES:
                del self.pending[rid]
                self.stats["given_up"] += 1
                log.info("HOA: revocation of %s at %s unacknowledged after %d tries",
                         notice.revocation.home_address, notice.to, notice.tries)
                continue
            self.stats["retried" if notice.tries else "sent"] += 1
            notice.next_at = now + FIRST_RETRY * 2 ** notice.tries
            notice.tries += 1
            out.append(notice)
        return out

    def next_due(self) -> float | None:
        """When :meth:`due` has something next (None: nothing pending)."""
        return min((n.next_at for n in self.pending.values()), default=None)

    def on_ack(self, ack: RevocationAck, source: str) -> Notice:
        """The FOA's acknowledgement: it must answer a pending revocation, come from the
        address that revocation went to, carry no flag (MOAT never sets I) and one extension,
        Foreign-Home under the same credential.
        Raises :class:`RevocationRefused` otherwise (nothing changes)."""
        notice = self.pending.get(ack.revocation_id)
        if notice is None or notice.revocation.home_address != ack.home_address:
            self.stats["bad_acks"] += 1
            raise RevocationRefused("unknown", f"answers no pending revocation "
                                               f"({ack.home_address} #{ack.revocation_id})")
        if source != notice.to:
            self.stats["bad_acks"] += 1
            raise RevocationRefused("wrong-source", f"from {source}, sent to {notice.to}")
        if int(ack.flags) != 0:  # no I (the object is never told) nor reserved bits
            self.stats["bad_acks"] += 1
            raise RevocationRefused("fields", f"flags {int(ack.flags):#06x} in an "
                                              "acknowledgement of a revocation without I")
        if len(ack.extensions) != 1:  # its authenticator, and nothing unprotected after it
            self.stats["bad_acks"] += 1
            raise RevocationRefused("fields", f"{len(ack.extensions)} extensions, not the "
                                              "Foreign-Home authenticator alone")
        if not verify_auth(ack, ExtType.FOREIGN_HOME_AUTH,
                           {notice.credential.spi: notice.credential.key}):
            self.stats["bad_acks"] += 1
            raise RevocationRefused("auth", "Foreign-Home authenticator missing or wrong")
        del self.pending[ack.revocation_id]
        self.stats["acknowledged"] += 1
        self.ack_delays = (self.ack_delays + [self.clock() - notice.created])[-16:]
        return notice

    def status(self) -> dict:
        return {**self.stats, "pending": len(self.pending),
                "ack_delays_ms": [round(d * 1000, 2) for d in self.ack_delays]}


class RevocationCheck:
    """The FOA's side: whether a revocation is to be acted on, and its acknowledgement.

    Work before authentication is bounded: the fixed-size checks (the care-of address is
    ours, the sender is the HOA it names) and one HMAC; nothing is stored for a message that
    fails them."""

    def __init__(self, care_of_addresses: set[str], keys: Mapping[int, bytes]) -> None:
        self.care_of_addresses = care_of_addresses
        self._keys = keys
        #: HOA address -> the last revocation id accepted from it.
        self.last_ids: OrderedDict[str, int] = OrderedDict()

    def check(self, rev: RegistrationRevocation, source: str) -> tuple[bool, Credential]:
        """Validate ``rev`` from ``source``: (act on it?, the credential to sign the
        acknowledgement with). False: a repeat of the last accepted one (acknowledge again,
        change nothing). Raises :class:`RevocationRefused` for anything to drop unanswered."""
        if rev.care_of_address not in self.care_of_addresses:
            raise RevocationRefused("not-ours", f"care-of address {rev.care_of_address}")
        if source != rev.home_agent:
            raise RevocationRefused("wrong-source",
                                    f"from {source}, names home agent {rev.home_agent}")
        if rev.registration_id == 0 or rev.revocation_id == 0:
            raise RevocationRefused("fields", "zero revocation id or registration identification")
        if not verify_auth(rev, ExtType.FOREIGN_HOME_AUTH, self._keys):
            raise RevocationRefused("auth", "Foreign-Home authenticator missing or wrong")
        found = find_auth(rev, ExtType.FOREIGN_HOME_AUTH)
        assert found is not None
        spi = found[1].spi
        cred = Credential(spi, self._keys[spi])
        last = self.last_ids.get(rev.home_agent)
        if last is not None and rev.revocation_id < last:
            raise RevocationRefused("replayed", f"revocation id {rev.revocation_id} < {last}")
        self.last_ids[rev.home_agent] = rev.revocation_id
        self.last_ids.move_to_end(rev.home_agent)
        while len(self.last_ids) > MAX_HOAS:
            self.last_ids.popitem(last=False)
        return last != rev.revocation_id, cred

    @staticmethod
    def ack(rev: RegistrationRevocation, cred: Credential) -> bytes:
        """The signed acknowledgement of ``rev`` (RFC 3543 §3.2)."""
        return append_auth(RevocationAck(rev.home_address, rev.revocation_id).encode(),
                           ExtType.FOREIGN_HOME_AUTH, cred.spi, cred.key)
