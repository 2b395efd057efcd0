"""The mobile object's side of discovery and registration (patent Fig. 11, RFC 5944 §3.6).

For now an object is a registration client run by the router that hosts it. It learns agents
from advertisements (or solicits them), registers through a foreign object agent with its
Mobile-Home and Mobile-Foreign credentials, renews before the lifetime runs out, notices
movement when the advertising agent changes, tries another FOA when one refuses or does not
answer, and deregisters directly with its HOA when it hears it at home.
"""

from __future__ import annotations

import ipaddress

import asyncio
import logging
import socket
import time
from dataclasses import dataclass
from typing import Callable

from packets import (
    AdvFlags,
    AgentAdvertisement,
    CareOfName,
    ExtType,
    MalformedMessage,
    NaiExtension,
    MobileNetwork,
    ObjectPart,
    PartRole,
    RegistrationReply,
    RegistrationRequest,
    ReplyCode,
    RequestFlags,
    append_auth,
    new_identification,
    verify_auth,
)
from packets.codes import MIP_PORT

from agent.core.config import ObjectConfig
from agent.mobility.heard import HeardTable

log = logging.getLogger(__name__)

#: The reply codes that accept a registration.
ACCEPTED_CODES = (ReplyCode.ACCEPTED, ReplyCode.ACCEPTED_NO_SIMULTANEOUS)
RETRANSMIT_TIMEOUT = 1.0
#: How long to keep listening for more agents before the first registration.
COLLECT_WINDOW = 0.05
RETRIES = 3
#: Agents an object remembers at most (the ones heard longest ago are forgotten first):
#: advertisements are unauthenticated, so a flood of spoofed ones must take bounded memory.
MAX_AGENTS = 64


@dataclass
class AgentSeen:
    """An agent heard on a link."""

    address: str
    advertisement: AgentAdvertisement
    ifindex: int
    heard_at: float

    @property
    def is_foreign(self) -> bool:
        return bool(self.advertisement.flags & AdvFlags.F) and not self.advertisement.flags & AdvFlags.B

    def as_dict(self, now: float) -> dict:
        a = self.advertisement
        return {
            "address": self.address, "ifindex": self.ifindex, "age": round(now - self.heard_at, 3),
            "flags": "".join(f.name or "" for f in AdvFlags if f in a.flags), "sequence": a.sequence, "care_of_addresses": a.care_of_addresses,
            "registration_lifetime": a.registration_lifetime,
        }


@dataclass
class Attempt:
    """One registration exchange, kept for `moat show` and the benchmarks."""

    agent: str
    care_of_address: str
    code: int | None
    rtt: float | None
    at: float
    lifetime: int
    care_of_name: str = ""
    error: str = ""

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class _ReplyProtocol(asyncio.DatagramProtocol):
    def __init__(self, client: "RegistrationClient") -> None:
        self.client = client

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self.client._on_reply(data, addr)


@dataclass
class Registration:
    """The registration in force."""

    agent: str
    care_of_address: str
    care_of_name: str
    lifetime: int
    registered_at: float
    #: The sequence number of the agent's newest advertisement heard (RFC 5944 §2.4.1):
    #: one lower than this, below 256, means the agent restarted.
    sequence: int = 0


class RegistrationClient:
    """Registration state machine of one object."""

    def __init__(
        self,
        config: ObjectConfig,
        solicit: Callable[[], None],
        advertise_interval: float = 1.0,
        announce: Callable[[int, str], None] = lambda ifindex, address: None,
        clock: Callable[[], float] = time.monotonic,
        transport: asyncio.DatagramTransport | None = None,
    ) -> None:
        """``clock`` and ``transport`` are seams for tests: by default the monotonic clock,
        and a UDP socket on an ephemeral port opened by :meth:`start`. An injected
        ``transport`` needs ``sendto(data, (address, port))`` and ``close()``; replies are
        handed to :meth:`_on_reply`."""
        self.config = config
        self._solicit = solicit
        self._announce = announce
        self.interval = advertise_interval
        self.clock = clock
        #: Agents heard, by address, each until its advertisement's lifetime runs out.
        #: Its current agent and its HOA are never evicted by newer ones.
        self.agents: HeardTable[AgentSeen] = HeardTable(MAX_AGENTS, clock, keep=self._keep)
        self.current: Registration | None = None
        self.at_home = False
        #: A warm instance (make-before-break) on the home link: it neither deregisters
        #: the object's bindings nor claims the home address until :meth:`go_live`, so the
        #: instance that serves elsewhere keeps its traffic until the switch.
        self.dark = False
        #: Set whenever a registration is accepted or the object is found at home: what a
        #: move's target waits on (cleared by whoever waits).
        self.settled = asyncio.Event()
        self.history: list[Attempt] = []
        self.bad_replies = 0
        self._last_ident: int | None = None
        self._waiting: dict[int, asyncio.Future] = {}
        #: Identification -> the address the request went to: the only one whose reply counts.
        self._asked: dict[int, str] = {}
        self._transport: asyncio.DatagramTransport | None = transport
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._stopping = False
        self._next_wait = advertise_interval / 2
        #: The current agent restarted: register again without waiting to hear others.
        self._reregister = False

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        if self._transport is None:
            loop = asyncio.get_running_loop()
            self._transport, _ = await loop.create_datagram_endpoint(
                lambda: _ReplyProtocol(self), local_addr=("0.0.0.0", 0)
            )
        self._task = asyncio.create_task(self._run(), name=f"object-{self.config.name}")
        self._solicit()

    async def stop(self, deregister: bool = True) -> None:
        self._stopping = True
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        if deregister and self.current is not None:
            try:
                await self.deregister()
            except Exception as exc:  # noqa: BLE001
                log.warning("%s: deregistration on stop failed: %s", self.config.name, exc)
        if self._transport:
            self._transport.close()

    def _keep(self, source: str) -> bool:
        """Whether the agents table must keep ``source`` when full: a flood of spoofed
        advertisements must not push out the agent this object is registered through (it
        would look gone, and the object would register anew, perhaps via a spoofed one)."""
        if self.current is not None and self.current.agent == source:
            return True
        return self.config is not None and source == self.config.home_agent

    # --- input from the daemon -----------------------------------------------------------

    def seed(self, source: str, adv: AgentAdvertisement, ifindex: int, heard_at: float) -> None:
        """An agent its router heard before this client started (heard at ``heard_at`` on
        this client's clock): known as if heard then; a newer one it hears replaces it."""
        self.agents.put(source, AgentSeen(source, adv, ifindex, heard_at), adv.lifetime)

    def on_advertisement(self, adv: AgentAdvertisement, source: str, ifindex: int) -> None:
        self.agents.put(source, AgentSeen(source, adv, ifindex, self.clock()), adv.lifetime)
        cur = self.current
        if cur is not None and cur.agent == source:
            # RFC 5944 §2.4.1: an agent's sequence numbers start again at 0 when it restarts
            # (after 0xffff they go on at 256): a lower one below 256 means it restarted and
            # may have lost our registration. Register again at once (no collect window).
            # Kept with the registration, not the agents table: an agent down for longer
            # than its advertisement lifetime is forgotten there, and still restarted.
            if adv.sequence < cur.sequence and adv.sequence < 256:
                log.info("%s: agent %s restarted (sequence %d after %d); registering again",
                         self.config.name, source, adv.sequence, cur.sequence)
                self.current = None
                self._reregister = True
            else:
                cur.sequence = adv.sequence
        self._wake.set()

    # --- decisions -----------------------------------------------------------------------

    def _fresh(self, seen: AgentSeen) -> bool:
        return self.clock() - seen.heard_at <= 3 * self.interval

    def _home_agent_heard(self) -> bool:
        seen = self.agents.get(self.config.home_agent)
        return bool(seen and self._fresh(seen) and seen.advertisement.flags & AdvFlags.H)

    def candidates(self, exclude: set[str] = frozenset()) -> list[AgentSeen]:
        """Fresh foreign agents in a stable order: the preferred one, then lowest address.

        RFC 5944 leaves the choice open. A fixed order makes runs repeatable (in MOAT's
        address plan the border router, .1, is tried first, as the patent's FOA 18a) and
        the next one is the fallback when the first refuses.
        """
        fresh = [s for s in self.agents.values()
                 if s.is_foreign and self._fresh(s) and s.address not in exclude
                 and s.address != self.config.home_agent]
        preferred = self.config.preferred_agent
        return sorted(fresh, key=lambda s: (s.address != preferred, socket.inet_aton(s.address)))

    async def _run(self) -> None:
        while not self._stopping:
            try:
                await self._step()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001
                log.exception("%s: registration step failed", self.config.name)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self._next_wait)
            except asyncio.TimeoutError:
                pass

    async def _step(self) -> None:
        now = self.clock()
        self._next_wait = self.interval / 2
        if self._home_agent_heard():
            if not self.at_home and self.dark:
                log.info("%s: at home, warm (the serving instance keeps the home link until "
                         "the switch)", self.config.name)
                self.at_home = True
                self.settled.set()
            elif not self.at_home:
                # Back home, or started at home: drop every binding the HOA may still hold
                # (a new instance cannot know), then claim the home address on the link.
                log.info("%s: at home", self.config.name)
                await self.claim_home()
            return
        self.at_home = False
        cur = self.current
        if cur is not None:
            seen = self.agents.get(cur.agent)
            moved = seen is None or not self._fresh(seen)
            renew = now >= cur.registered_at + cur.lifetime * 2 / 3
            if moved and self.candidates():
                log.info("%s: agent %s gone; movement detected", self.config.name, cur.agent)
                self.current = None
            elif not renew:
                return
        options = self.candidates()
        if not options:
            self._solicit()
            return
        if self.current is None and not self._reregister:
            # Several agents answer a solicitation at once; give them COLLECT_WINDOW to be
            # heard so the choice (lowest address) does not depend on who was fastest.
            first_heard = min(s.heard_at for s in options)
            if now - first_heard < COLLECT_WINDOW:
                self._next_wait = COLLECT_WINDOW - (now - first_heard)
                return
        self._reregister = False
        await self.register()

    # --- registration --------------------------------------------------------------------

    def build_request(self, agent: AgentSeen, lifetime: int | None = None) -> bytes:
        cfg = self.config
        coa = agent.advertisement.care_of_addresses[0] if agent.advertisement.care_of_addresses else agent.address
        if cfg.care_of_address:
            coa = cfg.care_of_address
        flags = RequestFlags.G
        if cfg.simultaneous:
            flags |= RequestFlags.S
        if cfg.reverse_tunnel:
            flags |= RequestFlags.T
        self._last_ident = new_identification(last=self._last_ident)
        exts: list = [NaiExtension(cfg.nai), ObjectPart(PartRole[cfg.part.upper()], cfg.part_id, "")]
        if cfg.network_prefix:  # NEMO: the HOA sends this prefix here too (our secondaries)
            network = ipaddress.IPv4Network(cfg.network_prefix)
            exts.append(MobileNetwork(str(network.network_address), network.prefixlen))
        rrq = RegistrationRequest(
            cfg.home_address, cfg.home_agent, coa, self._last_ident,
            cfg.lifetime if lifetime is None else lifetime, flags, exts,
        )
        data = append_auth(rrq.encode(), ExtType.MOBILE_HOME_AUTH, cfg.mobile_home.spi, cfg.mobile_home.key)
        return append_auth(data, ExtType.MOBILE_FOREIGN_AUTH, cfg.mobile_foreign.spi, cfg.mobile_foreign.key)

    async def register(self, lifetime: int | None = None) -> Attempt:
        """Register through the best FOA; on refusal or silence, try the next (Fig. 11)."""
        tried: set[str] = set()
        last: Attempt | None = None
        while True:
            options = self.candidates(exclude=tried)
            if not options:
                break
            agent = options[0]
            tried.add(agent.address)
            last = await self._exchange(agent, self.build_request(agent, lifetime), agent.address)
            if last.code in ACCEPTED_CODES:
                if last.lifetime > 0:
                    seen = self.agents.get(agent.address) or agent  # its newest advertisement
                    self.current = Registration(agent.address, last.care_of_address, last.care_of_name,
                                                last.lifetime, last.at,
                                                seen.advertisement.sequence)
                    self.settled.set()
                return last
            log.info("%s: registration via %s failed (%s); trying another FOA",
                     self.config.name, agent.address, last.error or last.code)
        if last is None:
            last = Attempt("", "", None, None, self.clock(), 0, error="no foreign agent heard")
            self.history.append(last)
        return last

    async def claim_home(self) -> Attempt:
        """Deregister every binding directly, then announce the home address on the link."""
        attempt = await self.deregister(direct=True)
        if attempt.code in ACCEPTED_CODES:
            self.at_home = True
            self.settled.set()
            seen = self.agents.get(self.config.home_agent)
            if seen is not None:  # not forgotten while we deregistered
                self._announce(seen.ifindex, self.config.home_address)
        return attempt

    async def go_live(self) -> None:
        """A warm instance takes over (its move's switch): at home it claims the home link
        now (every binding deregistered directly, then the address announced: in
        break-before-make the held source's binding is still there, and what the HOA
        tunnelled to it would come back late); away, its binding is served already."""
        if not self.dark:
            return
        self.dark = False
        if self.at_home:
            await self.claim_home()

    async def leave_home(self) -> Attempt:
        """The instance at home leaves (a make-before-break move from home): lifetime 0
        with ``S`` and the home address as care-of address, directly to the HOA, which
        serves the object's standby bindings from now on (and keeps every binding)."""
        cfg = self.config
        self.dark = True  # its own loop must not claim the home link back meanwhile
        self._last_ident = new_identification(last=self._last_ident)
        rrq = RegistrationRequest(cfg.home_address, cfg.home_agent, cfg.home_address,
                                  self._last_ident, 0, RequestFlags.S, [NaiExtension(cfg.nai)])
        data = append_auth(rrq.encode(), ExtType.MOBILE_HOME_AUTH, cfg.mobile_home.spi,
                           cfg.mobile_home.key)
        attempt = await self._exchange(None, data, cfg.home_agent)
        if attempt.code not in ACCEPTED_CODES:
            self.dark = False  # it stays: claim_home (the move's undo) takes the link back
        return attempt

    async def deregister(self, direct: bool = False) -> Attempt:
        """Lifetime 0: through the current FOA, or ``direct``ly to the HOA (from home, or
        when no FOA is known), which removes every binding of the object."""
        cfg = self.config
        if direct or self.at_home or self.current is None or self.current.agent not in self.agents:
            self._last_ident = new_identification(last=self._last_ident)
            rrq = RegistrationRequest(cfg.home_address, cfg.home_agent, cfg.home_address,
                                      self._last_ident, 0, RequestFlags(0), [NaiExtension(cfg.nai)])
            data = append_auth(rrq.encode(), ExtType.MOBILE_HOME_AUTH, cfg.mobile_home.spi, cfg.mobile_home.key)
            attempt = await self._exchange(None, data, cfg.home_agent)
        else:
            agent = self.agents[self.current.agent]
            attempt = await self._exchange(agent, self.build_request(agent, 0), agent.address)
        if attempt.code in ACCEPTED_CODES:
            self.current = None
        return attempt

    async def _exchange(self, agent: AgentSeen | None, data: bytes, dest: str) -> Attempt:
        assert self._transport is not None
        ident = int.from_bytes(data[16:24], "big")
        coa = RegistrationRequest.decode(data).care_of_address
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()
        self._waiting[ident] = fut
        self._asked[ident] = dest
        start = self.clock()
        timeout = RETRANSMIT_TIMEOUT
        attempt = Attempt(dest, coa, None, None, start, 0)
        try:
            for _ in range(RETRIES):
                self._transport.sendto(data, (dest, MIP_PORT))
                try:
                    rrp: RegistrationReply = await asyncio.wait_for(asyncio.shield(fut), timeout)
                except asyncio.TimeoutError:
                    timeout *= 2
                    continue
                attempt.rtt = self.clock() - start
                attempt.code = int(rrp.code)
                attempt.lifetime = rrp.lifetime
                names = rrp.find(CareOfName)
                attempt.care_of_name = names[-1].name if names else ""
                break
            else:
                attempt.error = f"no reply from {dest} after {RETRIES} tries"
        finally:
            self._waiting.pop(ident, None)
            self._asked.pop(ident, None)
        self.history.append(attempt)
        del self.history[:-100]
        return attempt

    def _on_reply(self, data: bytes, addr: tuple) -> None:
        try:
            rrp = RegistrationReply.decode(data)
        except MalformedMessage as exc:
            self.bad_replies += 1
            log.info("%s: malformed reply from %s: %s", self.config.name, addr[0], exc)
            return
        fut = self._waiting.get(rrp.identification)
        if fut is None or fut.done():
            return
        if addr[0] != self._asked.get(rrp.identification):
            # Only the agent asked answers (the FOA relays from the address it was sent to,
            # the HOA answers from its own): a denial from anyone else must not end the try.
            self.bad_replies += 1
            return
        cred = self.config.mobile_home
        # Only an acceptance must prove it comes from the HOA. A denial grants nothing, and
        # its sender may have no key to sign it with (an FOA; an HOA that does not know this
        # home address, 136), so denials are taken as they come and marked unauthenticated.
        authenticated = verify_auth(rrp, ExtType.MOBILE_HOME_AUTH, {cred.spi: cred.key})
        if rrp.code in ACCEPTED_CODES and not authenticated:
            self.bad_replies += 1
            log.warning("%s: acceptance from %s fails Mobile-Home auth; ignored", self.config.name, addr[0])
            return
        fut.set_result(rrp)

    def status(self) -> dict:
        now = self.clock()
        cur = self.current
        return {
            "name": self.config.name,
            "home_address": self.config.home_address,
            "at_home": self.at_home,
            "registration": None if cur is None else {
                "agent": cur.agent, "care_of_address": cur.care_of_address,
                "care_of_name": cur.care_of_name, "lifetime": cur.lifetime,
                "remaining": round(max(0.0, cur.registered_at + cur.lifetime - now), 3),
            },
            "agents": [s.as_dict(now) for s in self.agents.values()],
            "attempts": [a.as_dict() for a in self.history[-10:]],
            "bad_replies": self.bad_replies,
        }
