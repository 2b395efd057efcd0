"""A VM's egress rate cap: one htb class per VM on each router interface (pyroute2).

The class is matched with u32 on what identifies the VM's traffic: its source address (a
virtual interface) or its UDP source port (a virtual service, which answers on every address).
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


@dataclass
class _Installed:
    index: int
    major: int
    ours: bool  # MOAT added the htb root
    rate: str
    keys: list[str]


@dataclass
class EgressShaper:
    """Caps per VM key; remembers what it added so it can remove exactly that."""

    caps: dict[int, list[_Installed]] = field(default_factory=dict)

    def cap(self, key: int, kbit: int, interfaces: list[str], src: str | None = None,
            sport: int | None = None) -> list[str]:
        """Cap the egress of VM ``key`` to ``kbit`` on every interface; returns the
        interfaces where the cap holds."""
        from pyroute2 import IPRoute

        if not 1 <= key <= MAX_KEY or kbit <= 0 or (src is None) == (sport is None):
            raise ValueError("a cap needs a key, a positive rate and exactly one of src / sport")
        keys = []
        if src is not None:
            keys.append(f"0x{int.from_bytes(socket.inet_aton(src), 'big'):08x}/0xffffffff+12")
        else:
            keys += [f"0x{int(sport) << 16:08x}/0xffff0000+20", "0x00110000/0x00ff0000+8"]
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
                ipr.tc("add-filter", "u32", index, parent=major << 16, prio=0x100 + key,
                       protocol=0x0800, target=classid, keys=keys)
                self.caps.setdefault(key, []).append(_Installed(index, major, ours, rate, keys))
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
                try:
                    ipr.tc("del-filter", "u32", item.index, parent=item.major << 16, prio=0x100 + key,
                           protocol=0x0800, target=classid, keys=item.keys)
                except NetlinkError as exc:
                    log.info("removing filter %d: %s", key, exc)
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
