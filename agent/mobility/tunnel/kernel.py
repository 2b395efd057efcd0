"""The kernel GRE backend: GRE netdevs, one per ``(remote, key)``; bicast with tc mirred.

For kernels that have ``ip_gre``. Devices, routes, rules and mirrors are made through the
netlink queue of :class:`~.base.Tunnel`, so no call here waits for the kernel.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from agent.core import netlink as nl
from agent.mobility.tunnel.base import (REVERSE_PRIORITY, REVERSE_TABLE, RpFilter, Tunnel,
                                        check_address, check_peer, dedupe, read_sysctl)

log = logging.getLogger(__name__)

#: tc filter priority of the kernel backend's bicast mirrors.
MIRROR_PRIO = 4347


class KernelTunnel(Tunnel):
    """GRE netdevs (pyroute2), one per ``(remote, key)``; bicast copies with tc mirred.

    * ``set_peers(dst, [(r1, k1), (r2, k2), ...])``: devices for every peer, the host route
      ``dst/32 dev <first>``, and on the first device a clsact egress ``u32`` filter matching
      ``ip dst dst/32`` with one ``mirred egress mirror dev <other>`` action per other peer.
      (``u32`` rather than ``matchall``: ``cls_u32`` is the classifier kernels most often
      have — MOAT's CI kernel lacks ``cls_matchall`` and ``cls_flower`` but has it — and the
      mirror copies only its own home address even if a device were shared.)
    * ``accept(remote, key)``: the device (``ikey``) so the kernel decapsulates; a GRE packet
      with another key or source matches no device and the kernel drops it.
    * ``set_reverse(src, peer)``: a table per peer device with ``default dev <device>`` and
      the rule ``from src/32 lookup <table>``.

    ``stats`` are read from the devices' kernel counters: ``copies_sent`` / ``decapsulated``
    are their tx / rx packets; the kernel does not report unknown keys per device, so
    ``dropped_unknown_peer`` stays 0. Counters of a deleted device are gone with it.
    """

    backend = "kernel"

    def __init__(self, loop: asyncio.AbstractEventLoop, local: str, name: str = "moat0", *,
                 netlink: nl.Netlink | None = None, table: int = REVERSE_TABLE,
                 priority: int = REVERSE_PRIORITY, sysfs: str = "/sys/class/net") -> None:
        super().__init__(loop, local, name, netlink=netlink)
        self.table_base, self.priority = table, priority
        self.sysfs = sysfs
        #: (remote, key) -> device name
        self.devices: dict[tuple[str, int], str] = {}
        #: device -> table used for reverse tunnelling through it
        self._tables: dict[str, int] = {}
        #: first device -> {inner dst: [mirror devices]} as installed with tc
        self._mirrors: dict[str, dict[str, list[str]]] = {}
        self._rules: set[str] = set()
        self._started = False

    # --- life cycle ------------------------------------------------------------------------

    def _begin(self) -> None:
        """Nothing to make yet: devices come with the first peer."""
        self._rp.relax_all()
        self._started = True
        log.info("kernel GRE tunnel up (local %s)", self.local)

    def close(self) -> None:
        if not self._started:
            return
        for src in list(self.reverse):
            self.set_reverse(src, None)
        for dst in list(self.peers):
            self.set_peers(dst, [])
        for peer in list(self.accepted):
            self.forget(*peer)
        for peer in list(self.devices):
            self._drop_device(peer)
        self._rp.restore()
        self._started = False
        log.info("kernel GRE tunnel closed")

    @property
    def stats(self) -> dict[str, int]:
        out = dict(self._counters)
        primary = {self.devices[peers[0]] for peers in self.peers.values() if peers[0] in self.devices}
        primary |= {self.devices[p] for p in self.reverse.values() if p in self.devices}
        for dev in self.devices.values():
            tx = self._counter(dev, "tx_packets")
            out["copies_sent"] += tx
            if dev in primary:
                out["encapsulated"] += tx
            out["decapsulated"] += self._counter(dev, "rx_packets")
            out["dropped_malformed"] += self._counter(dev, "rx_errors")
            out["dropped_send_error"] += self._counter(dev, "tx_dropped")
        return out

    def _counter(self, dev: str, name: str) -> int:
        value = read_sysctl(f"{self.sysfs}/{dev}/statistics/{name}")
        return int(value) if value and value.isdigit() else 0

    # --- devices ---------------------------------------------------------------------------

    def _device_name(self, key: int) -> str:
        taken = set(self.devices.values())
        name = f"mg{key}"
        n = 1
        while name in taken:
            name = f"mg{key}x{n}"
            n += 1
        return name

    def _device(self, peer: tuple[str, int]) -> str:
        """The device for ``peer``, queued for creation if it is new."""
        dev = self.devices.get(peer)
        if dev is not None:
            return dev
        remote, key = peer
        dev = self._device_name(key)
        self.devices[peer] = dev
        make = nl.op_gre_add(dev, self.local, remote, key)

        def create(ipr: Any) -> None:
            make(ipr)
            RpFilter.device(dev)  # its sysctls exist only once the device does

        def undo() -> None:
            if self.devices.get(peer) == dev:
                del self.devices[peer]

        self._apply(create, f"cannot create GRE device {dev} to {remote} key {key}", on_error=undo)
        log.info("GRE device %s: %s -> %s key %d", dev, self.local, remote, key)
        return dev

    def _in_use(self, peer: tuple[str, int]) -> bool:
        return (peer in self.accepted or peer in self.reverse.values()
                or any(peer in peers for peers in self.peers.values()))

    def _release(self, peer: tuple[str, int]) -> None:
        if not self._in_use(peer):
            self._drop_device(peer)

    def _drop_device(self, peer: tuple[str, int]) -> None:
        dev = self.devices.pop(peer, None)
        if dev is None:
            return
        self._mirrors.pop(dev, None)
        table = self._tables.pop(dev, None)
        if table is not None:
            self._route("del", "0.0.0.0/0", None, table=table)
        self._apply(nl.op_link_del(dev), f"delete GRE device {dev}")

    def _route(self, op: str, dst: str, dev: str | None, table: int | None = None) -> None:
        where = f" table {table}" if table is not None else ""
        self._apply(nl.op_route(op, dst, ifname=dev, table=table), f"route {op} {dst} dev {dev}{where}")

    # --- HOA: peers and bicast -------------------------------------------------------------

    def set_peers(self, inner_dst: str, peers: list[tuple[str, int]]) -> None:
        inner_dst = check_address(inner_dst, "inner destination")
        wanted = dedupe(peers)
        old = self.peers.get(inner_dst, [])
        if wanted:
            devs = [self._device(p) for p in wanted]
            self.peers[inner_dst] = wanted
            self._route("replace", f"{inner_dst}/32", devs[0])
        else:
            self.peers.pop(inner_dst, None)
            self._route("del", f"{inner_dst}/32", None)
        self._sync_mirrors()
        for gone in old:
            if gone not in wanted:
                self._release(gone)

    def _sync_mirrors(self) -> None:
        """Make every first device's mirrors what ``peers`` needs now (clsact replaced whole)."""
        want: dict[str, dict[str, list[str]]] = {}
        for dst, peers in self.peers.items():
            devs = [self.devices[p] for p in peers if p in self.devices]
            if len(devs) > 1:
                want.setdefault(devs[0], {})[dst] = devs[1:]
        for dev in set(self._mirrors) | set(want):
            if self._mirrors.get(dev) == want.get(dev):
                continue
            self._mirrors.pop(dev, None)
            if dev in want:
                self._mirrors[dev] = want[dev]

            def undo(dev: str = dev) -> None:
                self._mirrors.pop(dev, None)
                log.warning("bicast on %s incomplete: only the first binding gets copies", dev)

            self._apply(nl.op_mirrors(dev, want.get(dev, {}), MIRROR_PRIO),
                        f"mirrors on {dev}", on_error=undo)

    # --- FOA: accept -----------------------------------------------------------------------

    def accept(self, remote: str, key: int) -> None:
        peer = check_peer((remote, key))
        self._device(peer)  # the kernel decapsulates what matches it
        self.accepted.add(peer)

    def forget(self, remote: str, key: int) -> None:
        peer = check_peer((remote, key))
        self.accepted.discard(peer)
        self._release(peer)

    # --- reverse tunnelling ----------------------------------------------------------------

    def _table_for(self, dev: str) -> int:
        table = self._tables.get(dev)
        if table is None:
            used = set(self._tables.values())
            table = self.table_base
            while table in used:
                table += 1
            self._tables[dev] = table
            self._route("replace", "0.0.0.0/0", dev, table=table)
        return table

    def _rule(self, op: str, src: str, table: int) -> None:
        on_error = (lambda: self._rules.discard(src)) if op == "add" else None
        self._apply(nl.op_rule(op, src, table, self.priority), f"rule {op} from {src} lookup {table}",
                    on_error=on_error)

    def set_reverse(self, inner_src: str, peer: tuple[str, int] | None) -> None:
        inner_src = check_address(inner_src, "inner source")
        new = check_peer(peer) if peer is not None else None
        old = self.reverse.get(inner_src)
        if old == new:
            return
        if old is not None:
            del self.reverse[inner_src]
            if inner_src in self._rules:
                self._rule("del", inner_src, self._tables.get(self.devices.get(old, ""), self.table_base))
                self._rules.discard(inner_src)
        if new is not None:
            dev = self._device(new)
            self.reverse[inner_src] = new
            self._rules.add(inner_src)
            self._rule("add", inner_src, self._table_for(dev))
        if old is not None:
            if old not in self.reverse.values():
                table = self._tables.pop(self.devices.get(old, ""), None)
                if table is not None:
                    self._route("del", "0.0.0.0/0", None, table=table)
            self._release(old)
