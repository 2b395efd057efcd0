"""A VM's egress rate cap: one htb class per VM on each router interface (pyroute2).

The class is matched with u32 on what identifies the VM's traffic: its source addresses (a
virtual interface's address, its mobile objects' home addresses) and/or its UDP and TCP
source port (a virtual service, which answers on every address); one filter each.
Where an interface already has an htb root (Mininet's TCLink puts one on shaped links), the
VM's class joins it; elsewhere MOAT adds an htb root whose default is *no* class, so traffic
that is not a VM's passes unshaped. Other root qdiscs (netem, tbf) are left alone with a
warning: the cap then does not hold on that interface.

The netlink work runs on the agent's netlink worker (:mod:`agent.core.netlink`): ``cap`` and
``uncap`` are coroutines that never block the loop, and one lock keeps two VMs' caps from
deciding about the same htb root at once.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from dataclasses import dataclass, field
from typing import Any

from agent.core import netlink as nl

log = logging.getLogger(__name__)

MOAT_MAJOR = 0x77  # the htb root MOAT adds where there is none
ROOT_PARENT = 0xFFFFFFFF
REPLACEABLE_ROOTS = {"noqueue", "pfifo_fast", "pfifo", "fq_codel", "fq", "mq"}
MAX_KEY = 0xEFF
#: Filters of one VM get priorities 0x100 + key + 0x1000 * i: at most this many.
MAX_FILTERS = 15
PROTOCOLS = {"udp": 17, "tcp": 6}


@dataclass
class _Installed:
    index: int
    major: int
    ours: bool  # MOAT added the htb root
    rate: str
    filters: list[tuple[int, list[str]]]  # (prio, u32 keys)


@dataclass
class EgressShaper:
    """Caps per VM key; remembers what it added so it can remove exactly that."""

    caps: dict[int, list[_Installed]] = field(default_factory=dict)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False, compare=False)

    @staticmethod
    def filters(key: int, src: list[str], sport: int | None) -> list[tuple[int, list[str]]]:
        """u32 filters, (prio, keys), for packets from any of ``src`` or from UDP or TCP
        source port ``sport`` (an IP header without options: the port at byte 20)."""
        keysets = [[f"0x{int.from_bytes(socket.inet_aton(a), 'big'):08x}/0xffffffff+12"] for a in src]
        if sport is not None:
            keysets += [[f"0x{int(sport) << 16:08x}/0xffff0000+20", f"0x00{proto:02x}0000/0x00ff0000+8"]
                        for proto in PROTOCOLS.values()]
        if len(keysets) > MAX_FILTERS:
            raise ValueError(f"at most {MAX_FILTERS} filters per cap, not {len(keysets)}")
        return [(0x100 + key + 0x1000 * i, keys) for i, keys in enumerate(keysets)]

    def _owns_root(self, index: int) -> bool:
        return any(i.index == index and i.ours for v in self.caps.values() for i in v)

    async def cap(self, key: int, kbit: int, interfaces: list[str], src: str | list[str] | None = None,
                  sport: int | None = None) -> list[str]:
        """Cap the egress of VM ``key`` to ``kbit`` on every interface, for packets from the
        ``src`` addresses or the UDP/TCP source port ``sport``; returns the interfaces
        where the cap holds. A kernel refusal raises :class:`~agent.core.netlink.NetlinkError`."""
        sources = [src] if isinstance(src, str) else list(src or [])
        if not 1 <= key <= MAX_KEY or kbit <= 0 or (not sources and sport is None):
            raise ValueError("a cap needs a key, a positive rate and source addresses or a port")
        filters = self.filters(key, sources, sport)
        done: list[str] = []
        async with self._lock:
            for ifname in interfaces:
                installed = await self._cap_one(key, kbit, ifname, filters)
                if installed is not None:
                    self.caps.setdefault(key, []).append(installed)
                    done.append(ifname)
        return done

    async def _cap_one(self, key: int, kbit: int, ifname: str,
                       filters: list[tuple[int, list[str]]]) -> _Installed | None:
        """The VM's class and filters on one interface (None where it cannot be capped)."""
        netlink = nl.default()
        try:
            index, qdiscs = await netlink.run(nl.op_qdiscs(ifname), f"qdiscs of {ifname}")
        except nl.NetlinkError as exc:
            if exc.code == errno.ENODEV:
                return None
            raise
        root = next(((handle, kind) for parent, handle, kind in qdiscs if parent == ROOT_PARENT), None)
        kind = root[1] if root is not None else "noqueue"
        if kind == "htb":
            major, ours = root[0] >> 16, False  # type: ignore[index] - kind htb: a root exists
        elif kind in REPLACEABLE_ROOTS:
            major, ours = MOAT_MAJOR, True
            if not self._owns_root(index):
                await netlink.run(nl.op_tc("replace", "htb", index, MOAT_MAJOR << 16, default=0),
                                  f"htb root on {ifname}")
        else:
            log.warning("%s has a %s root qdisc: VM egress cap not applied there", ifname, kind)
            return None
        classid = (major << 16) | (0x100 + key)
        rate = f"{kbit}kbit"
        await netlink.run(nl.op_tc("add-class", "htb", index, classid, parent=major << 16, rate=rate,
                                   ceil=rate), f"htb class {key} on {ifname}")
        for prio, keys in filters:
            await netlink.run(nl.op_tc("add-filter", "u32", index, parent=major << 16, prio=prio,
                                       protocol=nl.ETH_P_IP, target=classid, keys=keys),
                              f"u32 filter {key}/{prio:x} on {ifname}")
        return _Installed(index, major, ours, rate, filters)

    async def uncap(self, key: int) -> None:
        """Remove VM ``key``'s classes and filters (and MOAT's htb roots left empty)."""
        async with self._lock:
            for item in self.caps.pop(key, []):
                await self._uncap_one(key, item)

    async def _uncap_one(self, key: int, item: _Installed) -> None:
        netlink = nl.default()
        classid = (item.major << 16) | (0x100 + key)
        # pyroute2 rebuilds the messages from the same parameters as when adding.
        steps: list[tuple[str, nl.Op[Any]]] = [
            (f"removing filter {key}/{prio:x}",
             nl.op_tc("del-filter", "u32", item.index, parent=item.major << 16, prio=prio,
                      protocol=nl.ETH_P_IP, target=classid, keys=keys))
            for prio, keys in item.filters]
        steps.append((f"removing class {key}", nl.op_tc("del-class", "htb", item.index, classid,
                                                        parent=item.major << 16, rate=item.rate,
                                                        ceil=item.rate)))
        if item.ours and not self._owns_root(item.index):
            steps.append(("removing htb root", nl.op_tc("del", "htb", item.index, MOAT_MAJOR << 16)))
        for what, op in steps:
            try:
                await netlink.run(op, what)
            except nl.NetlinkError as exc:
                log.info("%s: %s", what, exc)
