"""A VM's egress rate cap: one htb class per VM on each router interface (pyroute2).

The class is matched with u32 on what identifies the VM's traffic: its source addresses (a
virtual interface's address, its mobile objects' home addresses) and/or its UDP and TCP
source port (a virtual service, which answers on every address); one filter each.
Where an interface already has an htb root (Mininet's TCLink puts one on shaped links), the
VM's class joins it; elsewhere MOAT adds an htb root whose default is *no* class, so traffic
that is not a VM's passes unshaped. Other root qdiscs (netem, tbf) are left alone with a
warning: the cap then does not hold on that interface.

pyroute2's IPRoute must not be created inside a running asyncio loop, so callers run these
functions in a worker thread (``loop.run_in_executor``).
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass, field

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

    def cap(self, key: int, kbit: int, interfaces: list[str], src: str | list[str] | None = None,
            sport: int | None = None) -> list[str]:
        """Cap the egress of VM ``key`` to ``kbit`` on every interface, for packets from the
        ``src`` addresses or the UDP/TCP source port ``sport``; returns the interfaces
        where the cap holds."""
        from pyroute2 import IPRoute

        sources = [src] if isinstance(src, str) else list(src or [])
        if not 1 <= key <= MAX_KEY or kbit <= 0 or (not sources and sport is None):
            raise ValueError("a cap needs a key, a positive rate and source addresses or a port")
        filters = self.filters(key, sources, sport)
        done: list[str] = []
        with IPRoute() as ipr:
            for ifname in interfaces:
                found = ipr.link_lookup(ifname=ifname)
                if not found:
                    continue
                index = found[0]
                root = next((q for q in ipr.get_qdiscs(index) if q["parent"] == ROOT_PARENT), None)
                kind = root.get_attr("TCA_KIND") if root is not None else "noqueue"
                if kind == "htb":
                    major, ours = root["handle"] >> 16, False
                elif kind in REPLACEABLE_ROOTS:
                    major, ours = MOAT_MAJOR, True
                    if not any(i.index == index and i.ours for v in self.caps.values() for i in v):
                        ipr.tc("replace", "htb", index, MOAT_MAJOR << 16, default=0)
                else:
                    log.warning("%s has a %s root qdisc: VM egress cap not applied there", ifname, kind)
                    continue
                classid = (major << 16) | (0x100 + key)
                rate = f"{kbit}kbit"
                ipr.tc("add-class", "htb", index, classid, parent=major << 16, rate=rate, ceil=rate)
                for prio, keys in filters:
                    ipr.tc("add-filter", "u32", index, parent=major << 16, prio=prio,
                           protocol=0x0800, target=classid, keys=keys)
                self.caps.setdefault(key, []).append(_Installed(index, major, ours, rate, filters))
                done.append(ifname)
        return done

    def uncap(self, key: int) -> None:
        """Remove VM ``key``'s classes and filters (and MOAT's htb roots left empty)."""
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        installed = self.caps.pop(key, [])
        with IPRoute() as ipr:
            for item in installed:
                classid = (item.major << 16) | (0x100 + key)
                # pyroute2 rebuilds the messages from the same parameters as when adding.
                for prio, keys in item.filters:
                    try:
                        ipr.tc("del-filter", "u32", item.index, parent=item.major << 16, prio=prio,
                               protocol=0x0800, target=classid, keys=keys)
                    except NetlinkError as exc:
                        log.info("removing filter %d/%x: %s", key, prio, exc)
                try:
                    ipr.tc("del-class", "htb", item.index, classid, parent=item.major << 16,
                           rate=item.rate, ceil=item.rate)
                except NetlinkError as exc:
                    log.info("removing class %d: %s", key, exc)
                still = any(i.index == item.index and i.ours for v in self.caps.values() for i in v)
                if item.ours and not still:
                    try:
                        ipr.tc("del", "htb", item.index, MOAT_MAJOR << 16)
                    except NetlinkError as exc:
                        log.info("removing htb root: %s", exc)
