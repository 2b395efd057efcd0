"""A mobile object as the home agent of its secondary objects (patent: "mobile object 104 acts
as a home object agent for secondary mobile objects 112"; wire design after NEMO for Mobile
IPv4, RFC 5177).

The object registers its *mobile network prefix* with its HOA together with its home address
(the mobile-network NVSE): the HOA keeps one binding, the object's, and sends packets for the
prefix where it sends the object's. The object's parts answer on addresses of that prefix.
While a part runs beside the object, its address is on the same router's loopback and the
kernel delivers it there. When the part moves (a *secondary* on another router's VM), it
registers through that network's FOA with the object as its home agent — home agent address
= the object's home address, UDP 434 — and this module, on the object's router:

* decides on the registration with the same RFC 5944 rules as the HOA
  (:class:`agent.mobility.home.HomeAgent`: the part's Mobile-Home key, replay check), except
  that no Foreign-Home key is required of the FOA (RFC 5944 makes FA-HA authentication
  optional; the MH key, which only the object's router and the part's router hold, is
  checked); its replies carry a Foreign-Home authenticator under the run's nested-home
  credential (derived from the router key), which every FOA accepts;
* keeps the secondaries' bindings and tunnels their packets to their care-of addresses in GRE
  with the binding's key, with the object's home address as the outer source, through its own
  userspace tunnel (``mnh<k>``): a packet for a secondary crosses two tunnels, HOA → the
  object's FOA, then the object's router → the secondary's FOA, which the captures show.

The bindings are durable (issue 13): with a journal (:mod:`agent.distribution.nested_store`,
the format of :mod:`agent.mobility.journal`) every accepted registration, renewal,
deregistration and expiry is on disk before the reply is sent, and :meth:`start` restores
the bindings that the last agent of this router held, with their remaining lifetimes, their
GRE keys and the last Identification of each part, and rebuilds the ``mnh<k>`` tunnel and
its host routes from them before UDP 434 opens: a secondary's packets flow again at once,
without the part registering again.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Any, Callable

from packets import MalformedMessage, RegistrationRequest
from packets.codes import MIP_PORT
from packets.mobileip import RevocationAck, decode_mobileip

from agent.core.config import HomeConfig, ObjectConfig
from agent.distribution.nested_store import NestedSpec
from agent.mobility.dataplane import DataPlane
from agent.mobility.foreign import nested_home_credential
from agent.mobility.home import HomeAgent
from agent.mobility.journal import Journal, Restored
from agent.mobility.revocation import RevocationRefused
from agent.vm.parts import MAX_PARTS, PART_SPI_BASE, part_configs, part_credential

__all__ = ["MAX_PARTS", "PART_SPI_BASE", "NestedHomeAgent", "part_configs", "part_credential"]

log = logging.getLogger(__name__)

IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)
#: Bindings of one part at once: a make-before-break move of a secondary registers the
#: target with ``S`` beside the source's binding (one was refused 135, so a part could only
#: move break-before-make); a third is refused.
MAX_PART_BINDINGS = 2


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, owner: "NestedHomeAgent") -> None:
        self.owner = owner

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        try:
            self.owner.on_datagram(data, addr)
        except Exception:  # noqa: BLE001 - one bad message must not stop the agent
            log.exception("nested home agent: a message from %s failed", addr[0])


class NestedHomeAgent:
    """UDP 434 on the object's home address, the parts' bindings, and a tunnel to them."""

    def __init__(self, primary: ObjectConfig, parts: dict[str, ObjectConfig],
                 router_key: bytes, tunnel_name: str, *, vm: str = "",
                 journal: Journal | None = None, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self._setup(NestedSpec.of(vm, primary, parts), router_key, tunnel_name, journal,
                    clock, wall_clock)

    @classmethod
    def from_spec(cls, spec: NestedSpec, router_key: bytes, tunnel_name: str, *,
                  journal: Journal | None = None, clock: Callable[[], float] = time.monotonic,
                  wall_clock: Callable[[], float] = time.time) -> "NestedHomeAgent":
        """The nested home agent a description kept in the run directory asks for (its VM,
        and the object with it, may be gone: the parts still run elsewhere)."""
        agent = cls.__new__(cls)
        agent._setup(spec, router_key, tunnel_name, journal, clock, wall_clock)
        return agent

    def _setup(self, spec: NestedSpec, router_key: bytes, tunnel_name: str,
               journal: Journal | None, clock: Callable[[], float],
               wall_clock: Callable[[], float]) -> None:
        self.spec = spec
        #: The object's name and home address (its parts' home agent address).
        self.name = spec.object
        self.address = spec.home_address
        # Two bindings per part at most: its own, and during a make-before-break move the
        # target's registered with S beside it (bicast) until the source deregisters.
        config = HomeConfig(objects=list(spec.parts.values()), max_bindings=MAX_PART_BINDINGS)
        self.home = HomeAgent(config, spec.home_address, clock, wall_clock)
        self.home.require_foreign_auth = False
        self.home.reply_credential = nested_home_credential(router_key)
        self.tunnel_name = tunnel_name
        self.dataplane: DataPlane | None = None
        self._transport: asyncio.DatagramTransport | None = None
        self.malformed = 0
        #: Where the bindings are written before each reply (None: kept in memory only).
        self.journal = journal
        #: What :meth:`restore` brought back (None until it ran).
        self.restored: Restored | None = None
        #: The loop the revocations' retry timer runs on (set by :meth:`start`).
        self._loop: asyncio.AbstractEventLoop | None = None
        #: The retry timer: armed for the revoker's next due time while any revocation is
        #: unacknowledged, never a task that sleeps (nothing here blocks the loop).
        self._revocation_timer: asyncio.TimerHandle | None = None

    def restore(self) -> Restored:
        """Load the bindings the journal kept (only the parts this object has; each with
        what is left of its lifetime and its GRE key; expired ones stay out), write the
        journal's first snapshot and keep it up to date from now on."""
        assert self.journal is not None
        restored = self.journal.load()
        for b in restored.bindings:
            if b.home_address in self.home.objects:
                self.home.bindings.restore(b)
            else:
                log.warning("nested journal %s: binding of %s dropped: not a part of %s",
                            self.journal.path, b.home_address, self.name)
        for home, ident in restored.identifications.items():
            if home in self.home.objects:
                self.home.bindings.last_identification[home] = ident
        self.journal.start(self.home.bindings, (), self.home.bindings.last_identification)
        self.home.bindings.observer = self.journal
        self.restored = restored
        if restored.bindings or restored.expired_bindings:
            log.info("nested journal %s: restored %d binding(s) of %s's parts (%d expired, "
                     "%d torn, %d corrupt line(s) skipped)", self.journal.path,
                     len(self.home.bindings), self.name, len(restored.expired_bindings),
                     restored.torn, restored.corrupt)
        return restored

    async def start(self) -> None:
        """The journal's bindings first (if not restored yet), then the tunnel and its host
        routes for them, then UDP 434: no reply is sent before the data plane is back."""
        from agent.mobility.tunnel import open_tunnel

        if self.journal is not None and self.restored is None:
            self.restore()
        self._loop = asyncio.get_running_loop()
        tunnel = await open_tunnel("userspace", local=self.address, name=self.tunnel_name)
        self.dataplane = DataPlane(tunnel, set())
        try:
            if len(self.home.bindings):  # restored: the tunnel to each part again
                self.sync()
                await self.dataplane.settle()
            self._transport = await self._listen()
        except BaseException:
            await self.dataplane.close()
            self.dataplane = None
            raise
        log.info("nested home agent of %s on %s:%d for %s (%d binding(s))", self.name,
                 self.address, MIP_PORT, sorted(self.spec.parts), len(self.home.bindings))

    async def _listen(self) -> asyncio.DatagramTransport:
        """UDP 434 on the object's home address (free-bound: the address may not be on this
        router's loopback while its VM restarts)."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
            sock.bind((self.address, MIP_PORT))
        except OSError:
            sock.close()
            raise
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: _Protocol(self), sock=sock)
        return transport

    def on_datagram(self, data: bytes, addr: tuple) -> None:
        try:
            msg = decode_mobileip(data)
        except MalformedMessage as exc:
            self.malformed += 1  # counted, logged at debug: a flood writes no log
            log.debug("nested home agent: malformed message from %s: %s", addr[0], exc)
            return
        if isinstance(msg, RevocationAck):
            self.on_revocation_ack(msg, addr)
            return
        if not isinstance(msg, RegistrationRequest) or msg.home_agent != self.address:
            self.malformed += 1
            return
        decision = self.home.handle(msg)  # journalled (fdatasync) before the reply below
        assert self._transport is not None
        self._transport.sendto(decision.reply, addr)
        # Accepted registrations are few (one per part and lifetime); refusals, which anyone
        # can provoke before authentication, go to debug (the HOA's counters keep them).
        log.log(logging.INFO if decision.update is not None else logging.DEBUG,
                "nested home agent of %s: %s for %s via %s (coa %s)", self.name,
                decision.code.name, msg.home_address, addr[0], msg.care_of_address)
        if decision.update is not None:
            self.sync()
        if decision.notices:  # the FOAs of the bindings it removed forget them now
            self.send_revocations()

    # --- revocation (issue 18; agent.mobility.revocation) ---------------------------------

    def send_revocations(self) -> int:
        """Send the revocations due now (first sends and retries, each counted as a try by
        the revoker), then arm the timer for the next; how many went. Nothing is sent
        without a socket (not started, or closed): the revoker gives those up in time."""
        sent = 0
        if self._transport is not None:
            for notice in self.home.revoker.due():
                log.info("nested home agent of %s: revoking %s at FOA %s (registration %#x, "
                         "try %d)", self.name, notice.revocation.home_address, notice.to,
                         notice.revocation.registration_id, notice.tries)
                # From the object's home address (the socket is bound there): the address
                # the revocation names as its home agent, which the FOA checks.
                self._transport.sendto(notice.data, (notice.to, MIP_PORT))
                sent += 1
        self._arm_revocation_timer()
        return sent

    def _arm_revocation_timer(self) -> None:
        """One timer, at the revoker's next due time, while anything is pending."""
        if self._revocation_timer is not None:
            self._revocation_timer.cancel()
            self._revocation_timer = None
        at = self.home.revoker.next_due()
        if at is None or self._transport is None or self._loop is None:
            return
        delay = max(0.0, at - self.home.revoker.clock())
        self._revocation_timer = self._loop.call_later(delay, self._on_revocation_timer)

    def _on_revocation_timer(self) -> None:
        self._revocation_timer = None
        try:
            self.send_revocations()
        except Exception:  # noqa: BLE001 - a failed send must not stop the retries
            log.exception("nested home agent of %s: sending revocations failed", self.name)
            self._arm_revocation_timer()

    def on_revocation_ack(self, ack: RevocationAck, addr: tuple) -> None:
        """An FOA's acknowledgement: the revoker checks every field against the pending
        revocation it answers (its id and home address, the source it went to, no flag, one
        extension: the Foreign-Home authenticator under the same credential) before
        anything changes; a refused one changes nothing and the retries go on."""
        try:
            notice = self.home.revoker.on_ack(ack, addr[0])
        except RevocationRefused as exc:
            # Anyone can send one: the revoker counts it (bad_acks), logged at debug only.
            log.debug("nested home agent of %s: revocation acknowledgement from %s "
                      "refused: %s", self.name, addr[0], exc)
            return
        log.info("nested home agent of %s: FOA %s acknowledged the revocation of %s "
                 "(%.1f ms)", self.name, notice.to, notice.revocation.home_address,
                 (self.home.revoker.clock() - notice.created) * 1000)
        self._arm_revocation_timer()

    def sync(self) -> None:
        """The tunnel follows the bindings (a host route per away part into ``mnh<k>``)."""
        if self.dataplane is not None:
            self.dataplane.sync_home(self.home)

    def housekeeping(self) -> None:
        for gone in self.home.bindings.expire():
            log.info("nested home agent: binding of %s expired", gone.home_address)
        self.sync()
        if self.journal is not None:
            self.journal.retry()
        if self.home.revoker.pending and self._revocation_timer is None:
            self.send_revocations()  # a timer lost to a failure: the retries go on

    def bindings(self) -> list[dict[str, Any]]:
        return self.home.bindings.snapshot()

    def status(self) -> dict[str, Any] | None:
        """The journal's status (None: not journalled)."""
        return self.journal.status() if self.journal is not None else None

    def revocations(self) -> dict[str, Any]:
        """The revoker's counters (sent, retried, acknowledged, given up, bad acks, pending,
        the last acknowledgement delays), as the HOA's ``status`` gives its own."""
        return self.home.revoker.status()

    async def close(self) -> None:
        """Stop serving; the journal is kept (the next start of this router's agent
        restores from it unless the object's files are discarded)."""
        if self._revocation_timer is not None:
            self._revocation_timer.cancel()  # unacknowledged ones: their visitors expire
            self._revocation_timer = None
        if self.journal is not None:
            self.journal.close()
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        if self.dataplane is not None:
            await self.dataplane.close()
            self.dataplane = None
