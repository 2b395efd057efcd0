"""The object agent role: home object agent (HOA) and/or foreign object agent (FOA).

It owns UDP 434, proxy ARP on the home link and the GRE tunnel, and feeds registration
messages to the pure role logic in :mod:`agent.mobility.home` and :mod:`agent.mobility.foreign`
(Fig. 11 of the patent; RFC 5944 §3). One role holds both because one socket serves both and
a request is the FOA's or the HOA's by its fields: from an object (Mobile-Foreign
authenticator) for one of our care-of addresses → relay as FOA; for one of our home-agent
addresses → decide as HOA. Every handler catches and logs its own failures: a malformed
packet or a bug in one message must never stop the agent.

Both tables are durable (issue 13): every change is written to the router's journal
(:mod:`agent.mobility.journal`) before it is answered, and :meth:`ObjectAgentRole.start`
restores them with their remaining lifetimes and rebuilds the data plane from them (the
same GRE keys, routes, proxy ARP) before it opens UDP 434.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from packets import (
    AdvFlags,
    MalformedMessage,
    RegistrationReply,
    RegistrationRequest,
)
from packets.auth import find_auth
from packets.codes import MIP_PORT, ExtType
from packets.mobileip import RegistrationRevocation, RevocationAck, decode_mobileip

from agent.core.role import Role
from agent.mobility.arp import ProxyArp
from agent.mobility.dataplane import DataPlane
from agent.mobility.discovery_role import DiscoveryRole
from agent.mobility.foreign import ForeignAgent, nested_home_credential
from agent.mobility.home import HomeAgent
from agent.mobility.journal import Journal, Restored, journal_path
from agent.mobility.mipsocket import MipSocket
from agent.mobility.ratelog import RateLimitedLog
from agent.mobility.revocation import RevocationRefused

log = logging.getLogger(__name__)

#: A relayed request whose reply has not come within this many seconds is forgotten.
PENDING_TIMEOUT = 5.0
#: Refused, malformed and unexpected messages on UDP 434: one log line per kind per this many
#: seconds at most (they arrive before any authentication).
REFUSAL_LOG_INTERVAL = 10.0


#: What the HOA's home link may hold for one address while it resolves it (bytes of the
#: packets' buffers, each several times its length): an object coming home is resolved
#: only when its new instance announces itself, after its old place's deregistration and
#: the switch (at 3,000 requests/s some 100-300 requests), and the kernel drops the oldest
#: beyond its 208 KiB default. 1 MiB, not more: the kernel keeps up to gc_thresh3 (1,024)
#: such queues, and what fills them comes from anyone before any authentication.
UNRESOLVED_QUEUE_BYTES = 1024 * 1024


def hold_while_resolving(ifname: str, size: int = UNRESOLVED_QUEUE_BYTES,
                         root: str = "/proc/sys/net/ipv4/neigh") -> None:
    """Let ``ifname`` queue ``size`` bytes per address being resolved (never less than the
    kernel's own setting); a failure is logged (the default then applies)."""
    path = Path(root) / ifname / "unres_qlen_bytes"
    try:
        if int(path.read_text()) < size:
            path.write_text(str(size))
    except (OSError, ValueError) as exc:
        log.warning("home link %s: its queue for addresses being resolved stays as it is: %s",
                    ifname, exc)


class ObjectAgentRole(Role):
    """Registration on UDP 434, mobility bindings and visitor lists, and their data plane."""

    name = "object-agent"

    def __init__(self, agent: Any) -> None:
        super().__init__(agent)
        cfg = self.config
        self.home: HomeAgent | None = None
        self.foreign: ForeignAgent | None = None
        self.proxy_arp: ProxyArp | None = None
        self.home_interface: str | None = None
        if "home" in cfg.roles and cfg.home is not None:
            self.home_interface = cfg.home.home_interface or cfg.interfaces[0].name
            address = next(i.address for i in cfg.interfaces if i.name == self.home_interface)
            self.home = HomeAgent(cfg.home, address)
        if "foreign" in cfg.roles and cfg.foreign is not None:
            nested = nested_home_credential(bytes.fromhex(cfg.router_key)) \
                if cfg.router_key else None
            self.foreign = ForeignAgent(cfg.foreign, cfg.name, cfg.addresses, nested_home=nested)
        self.dataplane: DataPlane | None = None
        #: The durable copy of the tables (None until start, and for a router with no agent).
        self.journal: Journal | None = None
        self._mip: MipSocket | None = None
        self._malformed = 0
        self.refusals = RateLimitedLog(log, REFUSAL_LOG_INTERVAL)
        #: The FOA's data plane must be reconciled on the next housekeeping tick: set when
        #: visitors expired or a reconciliation left something undone.
        self._foreign_dirty = False
        self._tasks: set[asyncio.Task] = set()
        #: Sends the HOA's revocations and their retries while any is unacknowledged.
        self._revoking: asyncio.Task | None = None

    @property
    def is_agent(self) -> bool:
        return self.home is not None or self.foreign is not None

    async def start(self) -> None:
        discovery = self.agent.role(DiscoveryRole)
        if discovery is not None:
            discovery.offer = self.offer
        if not self.is_agent:
            return
        loop = self.agent.loop
        if self.home is not None:
            self.proxy_arp = ProxyArp(loop, self.home_interface)
            hold_while_resolving(self.home_interface)
        from agent.mobility.tunnel import make_tunnel

        local = self.home.address if self.home is not None else self.config.interfaces[0].address
        tunnel = make_tunnel(self.config.tunnel_backend, loop=loop, local=local)
        tunnel.start()
        log.info("GRE tunnel backend: %s", tunnel.backend)
        self.dataplane = DataPlane(tunnel, self.config.addresses)
        restored = self.restore(Journal(journal_path(self.config.run_dir, self.config.name)))
        await self.rebuild_dataplane(restored)
        self._mip = MipSocket(loop, self._on_datagram)  # answers only from here on

    def restore(self, journal: Journal) -> Restored:
        """Load the tables from ``journal`` (what this router's agent held when it stopped
        or died), write the first snapshot and keep the journal up to date from now on.

        Only what this agent still serves comes back: bindings of home addresses it is the
        HOA of, visitors if it is an FOA. Expired entries stay out (``Restored`` lists
        them, for the data plane's leftovers)."""
        restored = journal.load()
        if self.home is not None:
            served = self.home.objects
            for b in restored.bindings:
                if b.home_address in served:
                    self.home.bindings.restore(b)
                else:
                    log.warning("journal: binding of %s dropped: not a home address served "
                                "here", b.home_address)
            for home, ident in restored.identifications.items():
                if home in served:
                    self.home.bindings.last_identification[home] = ident
        if self.foreign is not None:
            for v in restored.visitors[:self.foreign.config.max_visitors]:
                self.foreign.visitors.restore(v)
        journal.start(
            self.home.bindings if self.home is not None else (),
            self.foreign.visitors.snapshot_objects() if self.foreign is not None else (),
            self.home.bindings.last_identification if self.home is not None else None)
        if self.home is not None:
            self.home.bindings.observer = journal
        if self.foreign is not None:
            self.foreign.visitors.observer = journal
        self.journal = journal
        log.info("journal %s: restored %d binding(s), %d visitor(s) (%d expired, %d torn, "
                 "%d corrupt line(s) skipped)", journal.path,
                 len(self.home.bindings) if self.home else 0,
                 len(self.foreign.visitors) if self.foreign else 0,
                 len(restored.expired_bindings) + len(restored.expired_visitors),
                 restored.torn, restored.corrupt)
        return restored

    async def rebuild_dataplane(self, restored: Restored) -> None:
        """Make the data plane match the restored tables before any registration is
        answered: the HOA's tunnel peers (the journalled GRE keys) and proxy ARP, the FOA's
        accepted keys and routes; remove the routes a visitor that expired while the agent
        was down left behind."""
        if self.dataplane is None:
            return
        if self.foreign is not None:
            await self.dataplane.remove_leftovers(restored.expired_visitors, self.foreign)
        self.sync_home()
        self._sync_proxy_arp()
        if self.foreign is not None and len(self.foreign.visitors):
            await self.sync_foreign()
        await self.dataplane.settle()

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._mip is not None:
            self._mip.close()
        if self.journal is not None:  # kept: the next start restores from it
            self.journal.close()
        if self.proxy_arp is not None:
            self.proxy_arp.close()
        if self.dataplane is not None:
            await self.dataplane.close()

    def offer(self, ifname: str) -> tuple[AdvFlags, list[int], list[str]] | None:
        """What this router advertises on ``ifname`` (for :class:`DiscoveryRole`)."""
        on_home_link = self.home is not None and ifname == self.home_interface
        if self.foreign is None and not on_home_link:
            return None  # a pure HOA advertises on its home link only
        flags, lifetimes, coas = AdvFlags(0), [], []
        if on_home_link:
            flags |= AdvFlags.H
            lifetimes.append(self.home.config.max_lifetime)  # type: ignore[union-attr]
        if self.foreign is not None:
            flags |= AdvFlags.F | AdvFlags.R | AdvFlags.T
            coas = [next(i.address for i in self.config.interfaces if i.name == ifname)]
            lifetimes.append(self.foreign.config.max_lifetime)
        return flags, lifetimes, coas

    @property
    def malformed(self) -> int:
        return self._malformed

    # --- registration --------------------------------------------------------------------

    def _on_datagram(self, data: bytes, addr: tuple, ifindex: int, dest: str) -> None:
        try:
            self.on_registration(data, addr, ifindex, dest)
        except Exception:  # noqa: BLE001 - one bad message must not stop the agent
            self.refusals("handler", logging.ERROR,
                          "registration handler failed on a message from %s", addr[0],
                          exc_info=True)

    def interface_name(self, ifindex: int) -> str:
        """The name of interface ``ifindex`` ("lo" for the loopback, "" when unknown)."""
        if ifindex == 0:
            return ""
        if ifindex == 1:
            return "lo"
        return self.agent.iface_by_index.get(ifindex, f"ifindex {ifindex}")

    def on_registration(self, data: bytes, addr: tuple, ifindex: int = 0,
                        dest: str = "") -> None:
        """One UDP 434 datagram from ``addr``, heard on ``ifindex``, sent to ``dest``."""
        try:
            msg = decode_mobileip(data)
        except MalformedMessage as exc:
            self._malformed += 1
            self.refusals("malformed", logging.INFO, "malformed registration message from %s:%d: %s",
                          addr[0], addr[1], exc)
            return
        if isinstance(msg, RegistrationRequest):
            self._on_request(msg, addr, ifindex, dest)
        elif isinstance(msg, RegistrationReply):
            self._on_reply(msg, addr)
        elif isinstance(msg, RegistrationRevocation):
            self._on_revocation(msg, addr)
        else:
            self._on_revocation_ack(msg, addr)

    def _send(self, data: bytes, addr: tuple, source: str | None = None) -> None:
        assert self._mip is not None
        self._mip.sendto(data, addr, source)

    def _on_request(self, rrq: RegistrationRequest, addr: tuple, ifindex: int = 0,
                    dest: str = "") -> None:
        from_object = find_auth(rrq, ExtType.MOBILE_FOREIGN_AUTH) is not None
        if self.foreign is not None and from_object and rrq.care_of_address in self.config.addresses:
            relay = self.foreign.handle_request(rrq, addr[0], addr[1], self.interface_name(ifindex),
                                                local_address=dest)
            if relay.to_object is not None:
                self.refusals("foa-denied", logging.INFO, "FOA: denied %s from %s: %s",
                              rrq.home_address, addr[0], relay.code.name)
                self._send(relay.to_object, addr)
            if relay.to_home_agent is not None:
                log.info("FOA: relaying registration of %s to HOA %s", rrq.home_address, rrq.home_agent)
                self._send(relay.to_home_agent, (rrq.home_agent, MIP_PORT))
            return
        if self.home is not None and rrq.home_agent in self.config.addresses:
            decision = self.home.handle(rrq)
            # From the address the request was sent to (RFC 5944 §3.8.3.1): the FOA relayed
            # to that address and accepts a reply from it only.
            source = dest if dest in self.config.addresses else None
            if decision.update is not None and (decision.update.activated or (
                    decision.update.removed and self._peers_in_kernel())):
                # A path starts or ends: the reply (and a revocation) only once the tunnel
                # is so in the kernel (:meth:`_answer_settled`).
                log.info("HOA: %s for %s via %s (coa %s, lifetime %d)", decision.code.name,
                         rrq.home_address, addr[0], rrq.care_of_address, rrq.lifetime)
                self._spawn(self._answer_settled(decision, addr, source))
                return
            self._send(decision.reply, addr, source)
            if decision.update is None:
                self.refusals("hoa-denied", logging.INFO, "HOA: %s for %s via %s (coa %s)",
                              decision.code.name, rrq.home_address, addr[0],
                              rrq.care_of_address)
                return  # nothing changed: no data plane work for a refusal
            log.info("HOA: %s for %s via %s (coa %s, lifetime %d)", decision.code.name,
                     rrq.home_address, addr[0], rrq.care_of_address, rrq.lifetime)
            # Tunnel first, then claim the addresses on the home LAN: traffic the gratuitous
            # ARP attracts must find the tunnel already there.
            self.sync_home()
            self._sync_proxy_arp()
            if decision.notices:  # the FOAs of the bindings it removed forget them now
                self._send_revocations()
            return
        self.refusals("no-role", logging.INFO,
                      "request for %s from %s is for no role of this agent; dropped",
                      rrq.home_address, addr[0])

    def _on_reply(self, rrp: RegistrationReply, addr: tuple) -> None:
        if self.foreign is None:
            self.refusals("not-foa", logging.INFO, "reply from %s but this agent is no FOA; dropped",
                          addr[0])
            return
        out = self.foreign.handle_reply(rrp, addr[0])
        if out is None:
            self.refusals("bad-reply", logging.INFO,
                          "reply from %s for %s answers no relay of ours to that HOA, or fails "
                          "its authentication; dropped", addr[0], rrp.home_address)
            return
        pending, data = out
        log.info("FOA: reply %s for %s relayed to %s", rrp.code, rrp.home_address, pending.object_address)
        source = pending.local_address if pending.local_address in self.config.addresses else None
        self._spawn(self._relay_reply(data, (pending.object_address, pending.object_port), source))

    # --- revocation (issue 18; agent.mobility.revocation) ---------------------------------

    def _send_revocations(self) -> None:
        """Send the HOA's due revocations now, and keep a task for their retries."""
        assert self.home is not None
        self._send_revocations_due()
        if self.home.revoker.pending and (self._revoking is None or self._revoking.done()):
            self._revoking = self.agent.loop.create_task(self._retry_revocations())
            self._tasks.add(self._revoking)
            self._revoking.add_done_callback(self._done)

    async def _retry_revocations(self) -> None:
        assert self.home is not None
        revoker = self.home.revoker
        while (at := revoker.next_due()) is not None:
            await asyncio.sleep(max(0.0, at - revoker.clock()))
            self._send_revocations_due()

    def _send_revocations_due(self) -> None:
        assert self.home is not None
        for notice in self.home.revoker.due():
            log.info("HOA: revoking %s at FOA %s (registration %#x, try %d)",
                     notice.revocation.home_address, notice.to,
                     notice.revocation.registration_id, notice.tries)
            self._send(notice.data, (notice.to, MIP_PORT), self.home.address)

    def _on_revocation(self, rev: RegistrationRevocation, addr: tuple) -> None:
        """An HOA's revocation: the FOA checks it, forgets the visitor, takes its route away,
        then acknowledges (from the care-of address it was sent to)."""
        if self.foreign is None:
            self.refusals("not-foa-revocation", logging.INFO,
                          "revocation from %s but this agent is no FOA; dropped", addr[0])
            return
        try:
            ack, gone = self.foreign.handle_revocation(rev, addr[0])
        except RevocationRefused as exc:
            self.refusals(f"revocation-{exc.reason}", logging.INFO,
                          "FOA: revocation of %s from %s refused: %s", rev.home_address,
                          addr[0], exc)
            return
        if gone is None:
            self._send(ack, addr, rev.care_of_address)
            return
        log.info("FOA: visitor %s (via %s) revoked by its HOA %s", gone.home_address,
                 gone.local_address, addr[0])
        self._spawn(self._relay_reply(ack, addr, rev.care_of_address))  # route gone, then ack

    def _on_revocation_ack(self, ack: RevocationAck, addr: tuple) -> None:
        if self.home is None:
            self.refusals("not-hoa-ack", logging.INFO,
                          "revocation acknowledgement from %s but this agent is no HOA; "
                          "dropped", addr[0])
            return
        try:
            notice = self.home.revoker.on_ack(ack, addr[0])
        except RevocationRefused as exc:
            self.refusals(f"revocation-ack-{exc.reason}", logging.INFO,
                          "HOA: revocation acknowledgement from %s refused: %s", addr[0], exc)
            return
        log.info("HOA: FOA %s acknowledged the revocation of %s (%.1f ms)", notice.to,
                 notice.revocation.home_address, (self.home.revoker.clock() - notice.created) * 1000)

    def _peers_in_kernel(self) -> bool:
        tunnel = getattr(self.dataplane, "tunnel", None)
        return bool(getattr(tunnel, "peers_in_kernel", True))

    async def _answer_settled(self, decision: Any, to: tuple[str, int], source: str | None) -> None:
        """A registration that starts serving standby bindings (a leave-home) or, with a
        tunnel whose peers are kernel state, removes bindings (a deregistration, a
        replacement): tunnel, settled in the kernel, the home link claimed, then the reply
        and the revocations (the userspace tunnel's own table has changed at once). The instance at home holds as soon
        as it hears its leave-home accepted, and what reaches it then is routed here; the
        old FOA drops its visitor as it relays a deregistration's reply, and what the
        tunnel (an eBPF map entry still queued) sent it after that would be dropped."""
        self.sync_home()
        # Let go at once of what is no longer served: a registration that arrives while
        # this waits (the object away again at once) must find the address unclaimed and
        # announce it, not find it still claimed by a removal about to be undone.
        self._sync_proxy_arp(claim=False)
        if self.dataplane is not None:
            await self.dataplane.settle()
        self._sync_proxy_arp()
        self._send(decision.reply, to, source)
        if decision.notices:  # the FOAs of the bindings it removed forget them now
            self._send_revocations()

    async def _relay_reply(self, data: bytes, to: tuple[str, int], source: str | None = None) -> None:
        """The object's reply, from the address it sent its request to (the object takes a
        reply from that address only), once the data plane is in place."""
        await self.sync_foreign()  # before the object learns it may use the path
        self._send(data, to, source)

    def _spawn(self, coro: Any) -> None:
        task = self.agent.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("object agent task failed", exc_info=task.exception())

    # --- data plane and housekeeping -----------------------------------------------------

    def sync_home(self) -> None:
        if self.home is not None and self.dataplane is not None:
            self.dataplane.sync_home(self.home)

    def _sync_proxy_arp(self, claim: bool = True) -> None:
        """Answer ARP on the home link for every address the bindings serve (home addresses
        and registered mobile network prefixes), and for no other; with ``claim`` false,
        only stop answering for what is no longer served."""
        if self.home is None or self.proxy_arp is None:
            return
        served = set(self.home.bindings.served())
        if claim:
            for address in sorted(served - self.proxy_arp.addresses):
                self.proxy_arp.start(address)
        for address in sorted(self.proxy_arp.addresses - served):
            self.proxy_arp.stop(address)

    async def sync_foreign(self) -> None:
        if self.foreign is not None and self.dataplane is not None:
            if not await self.dataplane.sync_foreign(self.foreign):
                self._foreign_dirty = True  # something was left undone: retry next tick

    def housekeeping(self) -> None:
        """Expire bindings, visitors and relays; reconcile the data plane only when that
        changed something (or a reconciliation is to be retried).

        The tables hand out only what expired (a heap of expiry times), so a tick with
        nothing to do costs O(log n), not a scan of every binding and visitor."""
        if self.home is not None:
            gone = self.home.bindings.expire()
            for b in gone:
                log.info("HOA: binding %s -> %s expired", b.home_address, b.care_of_address)
            if gone:
                self.sync_home()
                self._sync_proxy_arp()
        if self.journal is not None:
            self.journal.retry()
        if self.foreign is not None:
            left = self.foreign.visitors.expire()
            for v in left:
                log.info("FOA: visitor %s expired", v.home_address)
            self.foreign.expire_pending(PENDING_TIMEOUT)
            if left or self._foreign_dirty:
                self._foreign_dirty = False
                self._spawn(self.sync_foreign())

    # --- control commands and status -----------------------------------------------------

    def cmd_bindings(self) -> list[dict]:
        return self.home.bindings.snapshot() if self.home else []

    def cmd_visitors(self) -> list[dict]:
        return self.foreign.visitors.snapshot() if self.foreign else []

    def status(self) -> dict[str, Any]:
        return {
            "bindings": len(self.home.bindings) if self.home else None,
            "visitors": len(self.foreign.visitors) if self.foreign else None,
            "home_stats": {k: v for k, v in self.home.stats.items() if v} if self.home else None,
            "revocations": self.home.revoker.status() if self.home else None,
            "foreign_stats": self.foreign.stats if self.foreign else None,
            "proxy_arp": sorted(self.proxy_arp.addresses) if self.proxy_arp else None,
            "proxy_arp_answered": self.proxy_arp.answered if self.proxy_arp else None,
            "journal": self.journal.status() if self.journal else None,
        }
