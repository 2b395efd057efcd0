"""The home object agent (patent Fig. 8, Fig. 11 right-hand side).

Pure decision logic: given a decoded Registration Request relayed by a foreign agent, decide
the reply code, update the binding table and build the signed reply. The daemon does the I/O
(sockets, proxy ARP) around it, so every RFC check is unit-tested without a network.

Checks, in order (each failure leaves the binding table untouched):

1. Foreign-Home authentication under a trusted FOA credential, else 132 (except an object
   deregistering directly from home: lifetime 0, care-of address = home address);
2. the home address is one this agent serves, else 136;
3. Mobile-Home authentication under that object's key, else 131;
4. the Identification passes the replay check, else 133;
5. a mobile network prefix (NEMO) only if it is the object's own, else 142;
6. ``S`` registrations beyond the cap, else 135.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from packets import (
    ExtType,
    RegistrationReply,
    RegistrationRequest,
    ReplyCode,
    RequestFlags,
    append_auth,
    replay_ok,
    verify_auth,
)
from packets.extensions import CareOfName, GreKey, MobileNetwork, NaiExtension, ObjectPart

from agent.mobility.bindings import BindingTable, TooManyBindings, UpdateResult
from agent.mobility.revocation import Notice, Revoker, revoked_bindings
from agent.core.config import Credential, HomeConfig, HomeObject

log = logging.getLogger(__name__)


@dataclass
class HomeDecision:
    """Outcome of one request: the code, the reply bytes, and what changed."""

    code: ReplyCode
    reply: bytes
    update: UpdateResult | None = None
    #: Revocations for the FOAs of the bindings this request removed (issue 18), due now.
    notices: list[Notice] = field(default_factory=list)


class HomeAgent:
    """Binding table plus the registration rules of a home object agent."""

    def __init__(
        self,
        config: HomeConfig,
        agent_address: str,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.address = agent_address
        self.wall_clock = wall_clock
        self.bindings = BindingTable(config.max_bindings, clock)
        self.objects: dict[str, HomeObject] = {o.home_address: o for o in config.objects}
        self._foa_keys = {c.spi: c.key for c in config.trusted_foas}
        self.stats = {code.name: 0 for code in ReplyCode}
        #: Whether a relayed request must carry a Foreign-Home authenticator under a trusted
        #: FOA key (the HOA: yes; an object as its secondaries' home agent: no, RFC 5944
        #: makes it optional, and the Mobile-Home key is still checked).
        self.require_foreign_auth = True
        #: What replies are signed with (Foreign-Home) when the request's FOA key is not
        #: known here: a nested home agent's router-key credential.
        self.reply_credential: Credential | None = None
        #: Tells the FOA of every binding a registration removes (RFC 3543-style revocation).
        self.revoker = Revoker(agent_address, self._foa_keys, lambda: self.reply_credential,
                               clock, wall_clock)

    def add_object(self, obj: HomeObject) -> None:
        self.objects[obj.home_address] = obj

    def handle(self, rrq: RegistrationRequest, foa_credential: Credential | None = None) -> HomeDecision:
        """Decide on a decoded request; ``foa_credential`` signs the reply for the FOA.

        When the request came through an FOA, the reply carries a Foreign-Home authenticator
        under the SPI the FOA used, so the FOA can check it came from this HOA.
        """
        code, update = self._decide(rrq)
        self.stats[code.name] += 1
        granted = 0
        exts: list = []
        if update is not None and update.binding is not None:
            granted = update.binding.lifetime
            exts.append(GreKey(update.binding.gre_key))  # the FOA accepts this key only
        reply = RegistrationReply(
            code, rrq.home_address, self.address, rrq.identification, granted, exts
        ).encode()
        obj = self.objects.get(rrq.home_address)
        if obj is not None:
            reply = append_auth(reply, ExtType.MOBILE_HOME_AUTH, obj.mobile_home.spi, obj.mobile_home.key)
        fh = self._fh_credential(rrq)
        if fh is not None:
            reply = append_auth(reply, ExtType.FOREIGN_HOME_AUTH, fh.spi, fh.key)
        notices = []
        if update is not None and update.removed:
            notices = self.revoker.revoke(self.address, revoked_bindings(rrq, update.removed))
        return HomeDecision(code, reply, update, notices)

    def _fh_credential(self, rrq: RegistrationRequest) -> Credential | None:
        for ext in rrq.extensions:
            if getattr(ext, "ext_type", None) == ExtType.FOREIGN_HOME_AUTH:
                key = self._foa_keys.get(ext.spi)  # type: ignore[union-attr]
                if key is not None:
                    return Credential(ext.spi, key)  # type: ignore[union-attr]
        return self.reply_credential

    def _decide(self, rrq: RegistrationRequest) -> tuple[ReplyCode, UpdateResult | None]:
        # An object back home deregisters directly (RFC 5944 §3.6.1.2): no FOA, no FH auth.
        direct = rrq.lifetime == 0 and rrq.care_of_address == rrq.home_address
        if not direct and self.require_foreign_auth \
                and not verify_auth(rrq, ExtType.FOREIGN_HOME_AUTH, self._foa_keys):
            return ReplyCode.HA_FA_FAILED_AUTH, None
        obj = self.objects.get(rrq.home_address)
        if obj is None:
            return ReplyCode.HA_UNKNOWN_HA_ADDRESS, None
        if not verify_auth(rrq, ExtType.MOBILE_HOME_AUTH, {obj.mobile_home.spi: obj.mobile_home.key}):
            return ReplyCode.HA_MN_FAILED_AUTH, None
        last = self.bindings.last_identification.get(rrq.home_address)
        if not replay_ok(rrq.identification, self.wall_clock(), last, self.config.replay_window):
            return ReplyCode.HA_IDENTIFICATION_MISMATCH, None
        names = rrq.find(CareOfName)
        nais = rrq.find(NaiExtension)
        parts = rrq.find(ObjectPart)
        networks = rrq.find(MobileNetwork)
        prefix = str(networks[0].network) if networks else ""
        if prefix and prefix != obj.network_prefix:
            return ReplyCode.HA_PREFIX_NOT_AUTHORIZED, None
        lifetime = min(rrq.lifetime, self.config.max_lifetime)
        fh = next((e for e in rrq.extensions
                   if getattr(e, "ext_type", None) == ExtType.FOREIGN_HOME_AUTH), None)
        foa_spi = fh.spi if fh is not None and fh.spi in self._foa_keys else 0  # type: ignore[union-attr]
        try:
            update = self.bindings.register(
                rrq.home_address,
                rrq.care_of_address,
                names[-1].name if names else "",
                lifetime,
                bool(rrq.flags & RequestFlags.S),
                nais[0].nai if nais else obj.nai,
                rrq.identification,
                bool(rrq.flags & RequestFlags.T),
                parts[0].role.name.lower() if parts else "primary",
                prefix,
                foa_spi,
            )
        except TooManyBindings:
            return ReplyCode.HA_TOO_MANY_SIMULTANEOUS_BINDINGS, None
        self.bindings.note_identification(rrq.home_address, rrq.identification)
        return ReplyCode.ACCEPTED, update
