"""MOAT's IPv4 address plan, as constants and small pure helpers.

Every topology in this package takes its addresses from here, so that an address seen in
a capture tells where it lives without looking anything up:

* **LANs.** Network number ``N`` of the patent (12, 14, 16) is the LAN ``10.N.0.0/24``;
  the scale topology's foreign network ``i`` (1-based) is network number ``100 + i``, i.e.
  ``10.(100+i).0.0/24``. Second octets 0 and 255 are never LANs (255 is the backbone).
* **Host part of a LAN address** (the same blocks on every LAN):

  ======== ======================================================================
  ``.1``   the network's *border router* (the one with backbone links); it is the
           default gateway of the LAN's hosts
  .2–.19   the other routers, in name order (``r22b`` = .2, ``r22c`` = .3, ...)
  .20–.99  hosts: ``dns23`` = .23 and ``site24`` = .24 on the home network, the
           corresponding-object host ``co<N>`` = .30 on each foreign network
  .100–.199 **mobile-object home addresses** (reserved on the home network 16; no
           node is ever configured with one — the agent's VMs claim them)
  .200–.223 reserved for addresses the agents create at run time (virtual interfaces
           of Fig. 5 step 66, co-located care-of addresses)
  .224–.251 **mobile network prefixes**: a ``/30`` per mobile object (the first seven),
           the addresses of its secondary objects (NEMO, RFC 5177)
  ======== ======================================================================

* **Backbone.** Border routers are joined by point-to-point links, each a ``/30`` taken
  in order from ``10.255.0.0/16``: link ``k`` is ``10.255.0.0 + 4k``; its first usable
  address (``.4k+1``) goes to the link's first router, the second (``.4k+2``) to the other.

Why these choices: ``/24`` LANs with the patent's reference numerals in the second octet
read well in Wireshark; fixed per-role blocks keep the home-address range free of node
addresses, so proxy ARP for a home address never collides with a real interface; ``/30``
backbones are the textbook point-to-point size and leave 16384 of them.
"""

from __future__ import annotations

import ipaddress
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

from topologies.errors import AddressPlanError

__all__ = [
    "HOME_NETWORK",
    "PATENT_FOREIGN_NETWORKS",
    "SCALE_NETWORK_BASE",
    "MAX_SCALE_FOREIGN",
    "ROUTER_OCTETS",
    "HOST_OCTETS",
    "MO_HOME_OCTETS",
    "AGENT_OCTETS",
    "BORDER_OCTET",
    "DNS_OCTET",
    "SITE_OCTET",
    "CO_OCTET",
    "BACKBONE_SUPERNET",
    "MAX_IFNAME",
    "lan_subnet",
    "lan_address",
    "backbone_subnet",
    "backbone_pair",
    "mo_home_addresses",
    "mobile_network_prefixes",
    "check_ifname",
]

#: The home network of every mobile object (patent network 16).
HOME_NETWORK: int = 16
#: The patent's foreign networks (Fig. 1: networks 12 and 14).
PATENT_FOREIGN_NETWORKS: tuple[int, ...] = (12, 14)
#: Scale topology: foreign network ``i`` (1-based) has network number ``SCALE_NETWORK_BASE + i``.
SCALE_NETWORK_BASE: int = 100
#: Largest number of scale foreign networks (network numbers 101..200).
MAX_SCALE_FOREIGN: int = 100

#: Host octets of routers on every LAN; ``.1`` is the border router.
ROUTER_OCTETS: range = range(1, 20)
#: Host octets of ordinary hosts (servers, corresponding objects).
HOST_OCTETS: range = range(20, 100)
#: Host octets of mobile-object home addresses (home network only).
MO_HOME_OCTETS: range = range(100, 200)
#: Host octets the agents may claim at run time (virtual interfaces, care-of addresses).
AGENT_OCTETS: range = range(200, 255)
#: Mobile network prefixes (NEMO, RFC 5177): ``/30`` blocks ``.224``–``.251`` of the home LAN,
#: one per mobile object for the first seven objects of a run; the addresses its secondary
#: objects answer on (the HOA sends them to the object, the object on to them).
MOBILE_NETWORK_OCTETS: range = range(224, 252, 4)
MOBILE_NETWORK_LENGTH = 30

BORDER_OCTET: int = 1
DNS_OCTET: int = 23
SITE_OCTET: int = 24
CO_OCTET: int = 30

#: Where backbone ``/30`` links come from.
BACKBONE_SUPERNET: IPv4Network = IPv4Network("10.255.0.0/16")

#: Linux ``IFNAMSIZ`` minus the terminating NUL.
MAX_IFNAME: int = 15


def lan_subnet(network: int) -> IPv4Network:
    """The ``/24`` of LAN number ``network`` (``10.<network>.0.0/24``)."""
    if isinstance(network, bool) or not isinstance(network, int) or not 1 <= network <= 254:
        raise AddressPlanError(f"network number must be an int in 1..254, got {network!r}")
    return IPv4Network(f"10.{network}.0.0/24")


def lan_address(network: int, octet: int) -> IPv4Interface:
    """Address ``10.<network>.0.<octet>/24`` as an interface (address plus prefix)."""
    if isinstance(octet, bool) or not isinstance(octet, int) or not 1 <= octet <= 254:
        raise AddressPlanError(f"host octet must be an int in 1..254, got {octet!r}")
    subnet = lan_subnet(network)
    return IPv4Interface(f"{subnet.network_address + octet}/{subnet.prefixlen}")


def backbone_subnet(index: int) -> IPv4Network:
    """The ``index``-th backbone ``/30`` (0-based) out of :data:`BACKBONE_SUPERNET`."""
    count = BACKBONE_SUPERNET.num_addresses // 4
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
        raise AddressPlanError(f"backbone link index must be in 0..{count - 1}, got {index!r}")
    return IPv4Network(f"{BACKBONE_SUPERNET.network_address + 4 * index}/30")


def backbone_pair(index: int) -> tuple[IPv4Interface, IPv4Interface]:
    """The two usable addresses of backbone link ``index``: (first router, second router)."""
    net = backbone_subnet(index)
    first = IPv4Interface(f"{net.network_address + 1}/30")
    second = IPv4Interface(f"{net.network_address + 2}/30")
    return first, second


def mo_home_addresses(network: int = HOME_NETWORK) -> list[IPv4Address]:
    """All reserved mobile-object home addresses on ``network`` (``.100``–``.199``)."""
    base = lan_subnet(network).network_address
    return [ipaddress.IPv4Address(int(base) + o) for o in MO_HOME_OCTETS]


def mobile_network_prefixes(network: int = HOME_NETWORK) -> list[IPv4Network]:
    """The mobile network prefixes on the home network ``network`` (``.224/30``–``.248/30``)."""
    base = int(lan_subnet(network).network_address)
    return [IPv4Network((base + o, MOBILE_NETWORK_LENGTH)) for o in MOBILE_NETWORK_OCTETS]


def check_ifname(name: str) -> str:
    """Return ``name`` if Linux accepts it as an interface name, else raise.

    Mininet would otherwise fail deep inside ``ip link add`` with a terse RTNETLINK error.
    """
    if not name or len(name) > MAX_IFNAME or any(c in name for c in "/: \t\n"):
        raise AddressPlanError(
            f"interface name {name!r} is invalid: at most {MAX_IFNAME} characters, "
            "no '/', ':' or whitespace"
        )
    return name
