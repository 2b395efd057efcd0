"""MOAT's IPv4 address plan, as constants and small pure helpers.

Every topology in this package takes its addresses from here, so that an address seen in
a capture tells where it lives without looking anything up:

* **LANs.** Network number ``N`` of the patent (12, 14) is the LAN ``10.N.0.0/24``;
  the scale topology's foreign network ``i`` (1-based) is network number ``100 + i``, i.e.
  ``10.(100+i).0.0/24``. Second octets 0 and 255 are never LANs (255 is the backbone).
  The **home network 16 is the larger** ``10.16.0.0/21`` (:data:`HOME_PREFIX_LEN`), so that
  it has room for :data:`MAX_OBJECTS` (1,878) mobile objects' home addresses; its nodes keep
  their ``10.16.0.x`` addresses, only their prefix is ``/21`` (issue 15).
* **Host part of a LAN address** (the same blocks on every LAN, in its first ``/24``):

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

* **More home addresses.** After ``10.16.0.100``–``.199`` come ``10.16.k.1``–``10.16.k.254``
  for ``k`` = 1..7 (the rest of the home ``/21``; ``.0`` and ``.255`` of each ``/24`` are left
  out, as some tools take them for network and broadcast addresses): 100 + 7 × 254 = 1,878
  home addresses in all, in the order :func:`mo_home_addresses` gives them. No node is ever
  configured in ``10.16.1.0``–``10.16.7.255``. They are on the home link like the first
  hundred, so everything that serves a home address works unchanged: the HOA's proxy ARP
  answers for them on the home LAN (every home-LAN node has the ``/21`` on-link), the
  routes every other router has to the home network are to the ``/21`` (computed from the
  LAN's subnet), and the agents' home prefix checks (``agent.core.fields.HOME_PREFIX_LEN``,
  ``agent.hosting.objects.check_home_address``: a home address is in the ``/21`` around its
  home agent) take them; ``tests/unit/test_address_plan.py`` holds all of these to the plan.
* **Backbone.** Border routers are joined by point-to-point links, each a ``/30`` taken
  in order from ``10.255.0.0/16``: link ``k`` is ``10.255.0.0 + 4k``; its first usable
  address (``.4k+1``) goes to the link's first router, the second (``.4k+2``) to the other.

Why these choices: ``/24`` LANs with the patent's reference numerals in the second octet
read well in Wireshark; fixed per-role blocks keep the home-address range free of node
addresses, so proxy ARP for a home address never collides with a real interface; a wider
home LAN rather than home subnets routed to the HOA keeps RFC 5944's model (a home address
is on the home link, the HOA proxies for it) for every object, the first hundred as the
thousandth; ``/30`` backbones are the textbook point-to-point size and leave 16384 of them.
"""

from __future__ import annotations

import ipaddress
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

from topologies.errors import AddressPlanError

__all__ = [
    "HOME_NETWORK",
    "HOME_PREFIX_LEN",
    "LAN_PREFIX_LEN",
    "MAX_OBJECTS",
    "PATENT_FOREIGN_NETWORKS",
    "SCALE_NETWORK_BASE",
    "MAX_SCALE_FOREIGN",
    "ROUTER_OCTETS",
    "HOST_OCTETS",
    "MO_HOME_OCTETS",
    "EXTRA_HOME_BLOCKS",
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
    "home_address",
    "mobile_network_prefixes",
    "check_ifname",
]

#: The home network of every mobile object (patent network 16).
HOME_NETWORK: int = 16
#: Prefix length of every LAN but the home network.
LAN_PREFIX_LEN: int = 24
#: Prefix length of the home network: ``10.16.0.0/21``, room for :data:`MAX_OBJECTS` home
#: addresses. The agents' home prefix checks use the same length
#: (``agent.core.fields.HOME_PREFIX_LEN``; a unit test holds the two equal).
HOME_PREFIX_LEN: int = 21
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
#: The further ``/24`` blocks of the home network holding home addresses (third octet
#: 1..7 of ``10.16.0.0/21``), each ``.1``–``.254``; no node is configured in them.
EXTRA_HOME_BLOCKS: range = range(1, 8)
#: Host octets of home addresses in an extra block.
EXTRA_HOME_OCTETS: range = range(1, 255)
#: How many mobile objects the plan has home addresses for (1,878).
MAX_OBJECTS: int = len(MO_HOME_OCTETS) + len(EXTRA_HOME_BLOCKS) * len(EXTRA_HOME_OCTETS)
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
    """The subnet of LAN number ``network``: ``10.<network>.0.0/24``, and the home
    network's ``10.16.0.0/21``."""
    if isinstance(network, bool) or not isinstance(network, int) or not 1 <= network <= 254:
        raise AddressPlanError(f"network number must be an int in 1..254, got {network!r}")
    length = HOME_PREFIX_LEN if network == HOME_NETWORK else LAN_PREFIX_LEN
    return IPv4Network(f"10.{network}.0.0/{length}")


def lan_address(network: int, octet: int) -> IPv4Interface:
    """Address ``10.<network>.0.<octet>`` with its LAN's prefix, as an interface."""
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
    """All reserved mobile-object home addresses on ``network``, in the order objects get
    them: ``10.16.0.100``–``.199``, then ``10.16.k.1``–``.254`` for ``k`` = 1..7
    (:data:`MAX_OBJECTS` in all); a network with a ``/24`` has only the first hundred."""
    subnet = lan_subnet(network)
    base = int(subnet.network_address)
    out = [ipaddress.IPv4Address(base + o) for o in MO_HOME_OCTETS]
    for block in EXTRA_HOME_BLOCKS:
        if base + 256 * block > int(subnet.broadcast_address):
            break
        out += [ipaddress.IPv4Address(base + 256 * block + o) for o in EXTRA_HOME_OCTETS]
    return out


def home_address(index: int, network: int = HOME_NETWORK) -> IPv4Address:
    """The ``index``-th (0-based) home address of :func:`mo_home_addresses`, without
    building the list; :class:`AddressPlanError` beyond the plan."""
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise AddressPlanError(f"home address index must be an int >= 0, got {index!r}")
    subnet = lan_subnet(network)
    base = int(subnet.network_address)
    if index < len(MO_HOME_OCTETS):
        return ipaddress.IPv4Address(base + MO_HOME_OCTETS[index])
    block, octet = divmod(index - len(MO_HOME_OCTETS), len(EXTRA_HOME_OCTETS))
    if block >= len(EXTRA_HOME_BLOCKS) or \
            base + 256 * EXTRA_HOME_BLOCKS[block] > int(subnet.broadcast_address):
        raise AddressPlanError(f"home address index {index} is beyond the plan's "
                               f"{len(mo_home_addresses(network))} home addresses on {subnet}")
    return ipaddress.IPv4Address(base + 256 * EXTRA_HOME_BLOCKS[block] + EXTRA_HOME_OCTETS[octet])


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
