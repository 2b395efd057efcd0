"""The eBPF GRE backend: tc programs encapsulate and decapsulate in the kernel (issue 16).

For kernels without ``ip_gre`` that run tc eBPF (``bpf/moat_gre.c``): GRE at kernel speed,
with no packet ever copied to the agent. The tunnel device is a veth ``moat0`` (no ARP, MTU
1472 like the other backends' devices; its other end ``moat0p`` only gives it a carrier):

* HOA: :meth:`set_peers` writes the home address's peers into ``moat_peers`` and routes it
  into ``moat0``; the egress program adds an outer IPv4 + keyed GRE header and sends one
  copy per peer (bicast) to the interface and next hop the FIB gives for each remote.
* FOA: :meth:`accept` / :meth:`restrict` / :meth:`set_delivery` fill ``moat_accepted`` and
  ``moat_allowed``; the ingress program on every Ethernet interface decapsulates GRE to
  ``local`` only from an accepted ``(remote, key)`` and only for the destinations it may
  carry, and hands the inner packet to ``moat0``'s ingress (the kernel routes it as received
  on the tunnel) or, for a delivery, as a frame to the on-link router.
* Reverse tunnelling: :meth:`set_reverse` writes ``moat_reverse`` and adds the same source
  rule as the userspace backend (its table's default route is ``moat0``).

Every map change is queued on the agent's netlink worker with the route and rule changes, in
order (a home address's map entry is written before its route goes to ``moat0``, and deleted
only after the route is gone, so no packet meets the device without a peer), so no method
waits for the kernel. ``stats`` reads the programs' per-CPU counters. Programs and maps are
pinned under a run-scoped bpffs path (:mod:`.ebpf_loader`) and removed by :meth:`close`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import logging
import os
import socket
from typing import Any

from agent.core import netlink as nl
from agent.mobility.tunnel.base import (REVERSE_PRIORITY, REVERSE_TABLE, RpFilter, Tunnel,
                                        TunnelError, check_address, check_peer, dedupe,
                                        write_sysctl)
from agent.mobility.tunnel.ebpf_loader import Loader, pin_dir_for
from agent.mobility.tunnel.ebpf_maps import (MAX_PEERS, BpfError, BpfMaps, MapOp,
                                             encode_accept_key, encode_accept_value,
                                             encode_allowed_key, encode_config,
                                             encode_peer, encode_peers, encode_u32)

log = logging.getLogger(__name__)

#: Like the userspace TUN and a kernel GRE device on a 1500-byte link: 1500 - 20 - 8.
TUN_MTU = 1500 - 20 - 8
ALLOWED = b"\x01"
#: The home addresses' routes into the tunnel live in a table of their own, looked up before
#: main (an address whose last binding went loses its route there first, then its peers).
PEERS_TABLE = 4348
PEERS_PRIORITY = 4346


def peer_device_name(name: str) -> str:
    """The unused other end of the tunnel veth: ``name`` + ``p`` (15 characters at most)."""
    return (name if len(name) < 15 else name[:14]) + "p"


class EbpfTunnel(Tunnel):
    """tc eBPF GRE; see the module docstring."""

    backend = "ebpf"

    def __init__(self, loop: asyncio.AbstractEventLoop, local: str, name: str = "moat0", *,
                 netlink: nl.Netlink | None = None, table: int = REVERSE_TABLE,
                 priority: int = REVERSE_PRIORITY, loader: Loader | None = None,
                 pin_dir: str | None = None) -> None:
        super().__init__(loop, local, name, netlink=netlink)
        self.table, self.priority = table, priority
        self.loader = loader or Loader()
        self.pin_dir = pin_dir or pin_dir_for(self.local)
        self.peer_name = peer_device_name(name)
        #: (remote, key) -> the inner destinations it may carry (an FOA's visitor).
        self.destinations: dict[tuple[str, int], frozenset[str]] = {}
        #: (remote, key) -> (interface, MAC): delivered as frames to that neighbour.
        self.deliveries: dict[tuple[str, int], tuple[str, str]] = {}
        #: The pinned maps, once the netlink worker has loaded the programs.
        self.maps: BpfMaps | None = None
        #: The device's ifindex once made: its routes name it without a lookup.
        self.index: int | None = None
        #: Interfaces (name -> index) whose ingress runs the decapsulation program.
        self.wire: dict[str, int] = {}
        self._rules: set[str] = set()
        #: Inner destinations whose route into the device was asked for (and not refused).
        self._routed: set[str] = set()
        self._reverse_route = False
        self._started = False
        self._closed = False

    # --- life cycle ------------------------------------------------------------------------

    def _begin(self) -> concurrent.futures.Future[Any] | None:
        """Load the programs, make the device and attach them, all on the netlink worker."""
        self._started, self._closed = True, False
        return self._apply(self._setup, f"cannot set up the eBPF GRE tunnel {self.name}")

    def _setup(self, ipr: Any) -> None:
        """Runs on the netlink worker: compile (cached), load, pin, device, hooks."""
        self.loader.load(self.pin_dir)
        maps = self.loader.maps(self.pin_dir)
        try:
            index, mac = self.loader.make_device(ipr, self.name, self.peer_name, TUN_MTU)
            self.index = index
            self._rp.relax_device(self.name)
            RpFilter.device(self.peer_name)  # no IPv6 chatter on the unused end either
            # The program's FIB lookups are made as if forwarding from the device, which the
            # kernel answers only where the device forwards (a host, not a router, too).
            write_sysctl(f"/proc/sys/net/ipv4/conf/{self.name}/forwarding", "1")
            self._rp.relax_all()
            maps.update("moat_config", encode_u32(0), encode_config(self.local, index, mac))
            self._peers_rule(ipr, "add")
            encap = self.loader.program(self.pin_dir, "moat_encap")
            decap = self.loader.program(self.pin_dir, "moat_decap")
            try:
                self.loader.attach(ipr, index, encap, "moat_encap", ingress=False)
                skip = {"lo", self.name, self.peer_name}
                for ifname, ifindex in self.loader.wire_interfaces(ipr, skip).items():
                    self.loader.attach(ipr, ifindex, decap, "moat_decap", ingress=True)
                    self.wire[ifname] = ifindex
            finally:
                os.close(encap)
                os.close(decap)
        except BaseException:
            maps.close()
            raise
        self.maps = maps
        log.info("eBPF GRE tunnel %s up (local %s; decapsulating on %s; pins %s)", self.name,
                 self.local, ", ".join(sorted(self.wire)) or "no interface", self.pin_dir)

    def _peers_rule(self, ipr: Any, command: str) -> None:
        """``from all lookup PEERS_TABLE``: the tunnel's home address routes, before main."""
        try:
            ipr.rule(command, table=PEERS_TABLE, priority=PEERS_PRIORITY, src="0.0.0.0", src_len=0)
        except Exception as exc:  # noqa: BLE001 - pyroute2's NetlinkError
            if nl.error_code(exc) not in (errno.EEXIST, errno.ENOENT):
                raise

    def _teardown(self, ipr: Any) -> None:
        """Runs on the netlink worker: hooks off, device and pins gone."""
        errors = []
        try:
            self._peers_rule(ipr, "del")
        except Exception as exc:  # noqa: BLE001
            errors.append(f"rule: {exc}")
        for ifname, ifindex in sorted(self.wire.items()):
            try:
                self.loader.detach(ipr, ifindex, ingress=True)
            except Exception as exc:  # noqa: BLE001 - go on removing the rest
                errors.append(f"{ifname}: {exc}")
        self.wire.clear()
        try:
            self.loader.delete_device(ipr, self.name)
        except Exception as exc:  # noqa: BLE001
            errors.append(f"{self.name}: {exc}")
        if self.maps is not None:
            self.maps.close()
            self.maps = None
        self.loader.unload(self.pin_dir)
        if errors:
            raise TunnelError("; ".join(errors))

    def close(self) -> None:
        """Remove routes, rules, hooks, the device and the pins; safe to call twice."""
        if self._closed or not self._started:
            return
        self._closed = True
        try:  # what it did, as the userspace tunnel logs it (the maps go with the teardown)
            counts = self.stats
        except Exception as exc:  # noqa: BLE001 - closing goes on
            counts = {"unreadable": str(exc)}  # type: ignore[dict-item]
        self._unroute_reverse()
        for dst in list(self.peers):
            self._apply(self._peer_route("del", dst),
                        f"remove route {dst}/32")
        self.peers.clear()
        self._routed.clear()
        self.reverse.clear()
        self.accepted.clear()
        self.destinations.clear()
        self.deliveries.clear()
        self._apply(self._teardown, f"remove the eBPF GRE tunnel {self.name}")
        self._rp.restore()
        log.info("eBPF GRE tunnel %s closed: %s", self.name, counts)

    @property
    def stats(self) -> dict[str, int]:
        out = dict(self._counters)
        maps = self.maps
        if maps is not None:
            try:
                for key, value in maps.stats().items():
                    out[key] += value
            except (BpfError, OSError) as exc:
                self._limit("stats", logging.INFO, "eBPF counters unreadable: %s", exc)
        return out

    # --- map changes, queued -----------------------------------------------------------------

    def _write(self, ops: list[MapOp], what: str) -> None:
        """Queue map changes on the netlink worker, after everything queued before."""

        def run(_ipr: Any) -> None:
            if self.maps is None:
                raise TunnelError("the eBPF maps are not open (the tunnel did not start)")
            self.maps.apply(ops)

        self._apply(run, what)

    # --- HOA: peers and bicast ---------------------------------------------------------------

    def set_peers(self, inner_dst: str, peers: list[tuple[str, int]]) -> None:
        inner_dst = check_address(inner_dst, "inner destination")
        wanted = dedupe(peers)
        if len(wanted) > MAX_PEERS:
            log.warning("%s has %d bindings: the eBPF backend bicasts to the first %d",
                        inner_dst, len(wanted), MAX_PEERS)
            wanted = wanted[:MAX_PEERS]
        key = socket.inet_aton(inner_dst)
        if wanted:
            self.peers[inner_dst] = wanted
            self._write([MapOp("moat_peers", key, encode_peers(wanted))], f"peers of {inner_dst}")
            if inner_dst not in self._routed:
                # Only when it is not there yet: a change of peers (a bicast's second
                # binding, or its end) is the map entry alone, the switch of a
                # make-before-break move; each route costs the worker about a millisecond.
                self._routed.add(inner_dst)
                self._apply(self._peer_route("replace", inner_dst),
                            f"route {inner_dst}/32 dev {self.name} table {PEERS_TABLE}",
                            on_error=lambda: self._routed.discard(inner_dst))
        elif self.peers.pop(inner_dst, None) is not None:
            self._routed.discard(inner_dst)
            # The last binding went (the object came home): the route into the device goes
            # first, so that what comes next takes the main table in the kernel (its
            # neighbour resolution queues it while the object's new router announces
            # itself); what reached the device before still goes to the old care-of address,
            # whose FOA keeps the visitor until the HOA's answer, sent once this is settled.
            # (Rerouted from the device's egress to a neighbour being resolved, as the
            # program once did, such a packet kept the device's own MACs and was lost.) Then
            # the entry goes.
            self._apply(self._peer_route("del", inner_dst),
                        f"remove route {inner_dst}/32")
            self._write([MapOp("moat_peers", key, None)], f"forget peers of {inner_dst}")

    def _peer_route(self, command: str, inner_dst: str) -> nl.Op[None]:
        """``inner_dst/32 dev <device> table PEERS_TABLE``, by the device's index once known
        (a name costs the worker a lookup, as long as the change itself)."""
        if self.index is None:
            return nl.op_route(command, f"{inner_dst}/32", ifname=self.name, table=PEERS_TABLE)
        return nl.op_route(command, f"{inner_dst}/32", ifindex=self.index, table=PEERS_TABLE)

    # --- FOA: accept, restrict, deliver ------------------------------------------------------

    def _sync_accept(self, peer: tuple[str, int]) -> None:
        """Write ``peer``'s entry in ``moat_accepted`` as the tables have it now."""
        restricted = peer in self.destinations
        via = self.deliveries.get(peer)
        key = encode_accept_key(*peer)

        def run(ipr: Any) -> None:
            if self.maps is None:
                raise TunnelError("the eBPF maps are not open (the tunnel did not start)")
            delivery = None
            if via is not None:
                ifindex, own_mac = self.loader.interface(ipr, via[0])
                delivery = (ifindex, via[1], own_mac)
            self.maps.update("moat_accepted", key, encode_accept_value(restricted, delivery))

        self._apply(run, f"accept GRE from {peer[0]} key {peer[1]}")

    def accept(self, remote: str, key: int) -> None:
        peer = check_peer((remote, key))
        self.accepted.add(peer)
        self._sync_accept(peer)

    def forget(self, remote: str, key: int) -> None:
        peer = check_peer((remote, key))
        self.accepted.discard(peer)
        ops = [MapOp("moat_accepted", encode_accept_key(*peer), None)]
        for dst in sorted(self.destinations.pop(peer, frozenset())):
            ops.append(MapOp("moat_allowed", encode_allowed_key(*peer, dst), None))
        self._write(ops, f"forget GRE from {remote} key {key}")

    def restrict(self, remote: str, key: int, destinations: frozenset[str] | None) -> None:
        peer = check_peer((remote, key))
        old = self.destinations.get(peer, frozenset())
        new = frozenset(check_address(d, "destination") for d in destinations) \
            if destinations is not None else None
        if new is None:
            self.destinations.pop(peer, None)
        else:
            self.destinations[peer] = new
            # the allowed destinations first, then the flag that makes them the only ones
            self._write([MapOp("moat_allowed", encode_allowed_key(*peer, d), ALLOWED)
                         for d in sorted(new - old)], f"destinations of {remote} key {key}")
        if peer in self.accepted:
            self._sync_accept(peer)
        gone = old - (new or frozenset())
        if gone:
            self._write([MapOp("moat_allowed", encode_allowed_key(*peer, d), None)
                         for d in sorted(gone)], f"destinations of {remote} key {key}")

    def set_delivery(self, remote: str, key: int, via: tuple[str, str] | None) -> None:
        peer = check_peer((remote, key))
        if via is None:
            self.deliveries.pop(peer, None)
        else:
            ifname, mac = via
            if not ifname or len(bytes.fromhex(mac.replace(":", ""))) != 6:
                raise ValueError(f"delivery {via!r} is not (interface, MAC)")
            self.deliveries[peer] = (ifname, mac)
        if peer in self.accepted:
            self._sync_accept(peer)

    # --- reverse tunnelling ------------------------------------------------------------------

    def set_reverse(self, inner_src: str, peer: tuple[str, int] | None) -> None:
        inner_src = check_address(inner_src, "inner source")
        key = socket.inet_aton(inner_src)
        if peer is None:
            if self.reverse.pop(inner_src, None) is None:
                return
            self._del_rule(inner_src)  # first: nothing more of it enters the table
            self._write([MapOp("moat_reverse", key, None)], f"forget reverse of {inner_src}")
            self._unroute_reverse(inner_src)
            return
        new = check_peer(peer)
        self.reverse[inner_src] = new
        self._write([MapOp("moat_reverse", key, encode_peer(*new))], f"reverse of {inner_src}")
        self._route_reverse(inner_src)
