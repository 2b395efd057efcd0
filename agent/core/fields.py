"""Strict checks for every name, address, port and number that arrives in a message.

A field from the wire is untrusted: a VM name becomes directories the router removes as
root, a home address goes on its loopback, a port is bound, a number sizes a cgroup. Each
handler of an in-band message (PROVISION, VM_NEGOTIATE, SERVICE_GROW, INSTANCE_RELEASE,
LEASE_*, SERVICE_(DE)REGISTER, LEASE_REVOKE, MIGRATE, STATE_TRANSFER) checks its fields with
these functions *before* it uses any of them, so a bad value is refused with a clear
:class:`FieldError` (which field, what value, which rule) and touches nothing (issue 12).

Every function returns the value in its canonical form (``"10.0.0.1"``, ``"10.0.1.224/30"``,
an ``int``) or raises; ``True`` is not a number, ``NaN`` is not a number, ``"010.0.0.1"`` is
not an address, and patterns are matched against the whole string (a trailing newline does
not pass).
"""

from __future__ import annotations

import ipaddress
import math
import re
from typing import Any, Iterable, Mapping, Sequence

from agent.core.errors import AgentError

__all__ = [
    "FieldError", "NAME_RE", "ID_RE", "TOKEN_RE", "NAI_RE", "SPEC_RE", "name", "identifier",
    "token", "nai", "spec", "text", "flag", "one_of", "integer", "number", "port", "address",
    "home_address", "prefix", "names", "mapping", "object_config",
]

#: Service, object and VM names: they name directories, cgroups and archives.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
#: Instance ids and router names as the broker knows them ("r18b/cnt-d1@3fa2").
ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/+-]{0,127}")
#: Opaque tokens: lease ids, reservation ids (hex from secrets.token_hex, or a caller's).
TOKEN_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
#: A network access identifier (RFC 7542's shape, ASCII only): user[@realm].
NAI_RE = re.compile(r"[A-Za-z0-9._+-]{1,128}(@[A-Za-z0-9][A-Za-z0-9.-]{0,126})?")
#: An object's code entry point, module:Class (as the manifest's ``entry``).
SPEC_RE = re.compile(r"[A-Za-z_]\w{0,63}(\.[A-Za-z_]\w{0,63}){0,7}:[A-Za-z_]\w{0,63}",
                     re.ASCII)
#: Addresses no object, router or VM may be given: this network, loopback, link-local,
#: multicast, reserved and the limited broadcast.
_NOT_UNICAST = [ipaddress.IPv4Network(n) for n in
                ("0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "240.0.0.0/4")]
#: MOAT's home LAN around a home agent: the home addresses it serves are on its /21
#: (topologies.addressing.HOME_PREFIX_LEN: room for 1,878 objects, issue 15).
HOME_PREFIX_LEN = 21
#: A mobile network prefix holds at most this many addresses (agent.vm.parts.MAX_PARTS).
MIN_MOBILE_PREFIX_LEN = 28


class FieldError(AgentError, ValueError):
    """A field of a message that fails its rule; ``field`` names it, ``rule`` says why."""

    def __init__(self, field: str, value: Any, rule: str) -> None:
        self.field = field
        self.rule = rule
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        super().__init__(f"{field} {shown} {rule}")


def _pattern(value: Any, field: str, regex: re.Pattern[str], what: str) -> str:
    if not isinstance(value, str) or not regex.fullmatch(value):
        raise FieldError(field, value, f"is not {what} (must match ^{regex.pattern}$)")
    return value


def name(value: Any, field: str) -> str:
    """A service, object or VM name (:data:`NAME_RE`): never a path, never empty."""
    return _pattern(value, field, NAME_RE, "a valid name")


def identifier(value: Any, field: str) -> str:
    """An instance id or router name (:data:`ID_RE`)."""
    return _pattern(value, field, ID_RE, "a valid identifier")


def token(value: Any, field: str) -> str:
    """A lease or reservation id (:data:`TOKEN_RE`)."""
    return _pattern(value, field, TOKEN_RE, "a valid id")


def nai(value: Any, field: str) -> str:
    """A network access identifier, ``object@home.moat``."""
    return _pattern(value, field, NAI_RE, "a valid NAI")


def spec(value: Any, field: str) -> str:
    """An object's code entry, ``module.sub:Class``."""
    return _pattern(value, field, SPEC_RE, "a module:Class entry")


def text(value: Any, field: str, max_len: int = 256) -> str:
    """A printable string of at most ``max_len`` characters."""
    if not isinstance(value, str) or len(value) > max_len or not value.isprintable():
        raise FieldError(field, value, f"must be a printable string of at most {max_len} "
                                       "characters")
    return value


def flag(value: Any, field: str) -> bool:
    """A JSON boolean (the string ``"false"`` is not one)."""
    if not isinstance(value, bool):
        raise FieldError(field, value, "must be true or false")
    return value


def one_of(value: Any, field: str, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise FieldError(field, value, f"must be one of {tuple(choices)}")
    return value


def integer(value: Any, field: str, lo: int, hi: int) -> int:
    """An integer in [lo, hi] (not a bool, not a float)."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise FieldError(field, value, f"must be an integer in [{lo}, {hi}]")
    return value


def number(value: Any, field: str, *, gt: float | None = None, ge: float | None = None,
           le: float | None = None) -> float:
    """A finite number in range, as a float (not a bool, not NaN or an infinity)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value):
        raise FieldError(field, value, "must be a finite number")
    for bound, ok, word in ((gt, lambda b: value > b, ">"), (ge, lambda b: value >= b, ">="),
                            (le, lambda b: value <= b, "<=")):
        if bound is not None and not ok(bound):
            raise FieldError(field, value, f"must be {word} {bound:g}")
    return float(value)


def port(value: Any, field: str) -> int:
    """A TCP/UDP port, 1-65535."""
    return integer(value, field, 1, 65535)


def _networks(within: Iterable[Any]) -> list[ipaddress.IPv4Network]:
    return [n if isinstance(n, ipaddress.IPv4Network) else ipaddress.IPv4Network(str(n),
                                                                                 strict=False)
            for n in within]


def address(value: Any, field: str, *, within: Iterable[Any] | None = None,
            exclude: Iterable[str] = (), loopback: bool = False) -> str:
    """A unicast IPv4 address in dotted-quad form (no IPv6, no leading zeros, not 0/8,
    loopback, link-local, multicast, reserved or broadcast); with ``within``, a host address
    of one of those networks (not its network or broadcast address); never one of
    ``exclude``. ``loopback``: 127/8 is taken too (a run whose routers are on loopback)."""
    try:
        ip = ipaddress.IPv4Address(value) if isinstance(value, str) else None
    except ValueError:
        ip = None
    if ip is None or str(ip) != value:
        raise FieldError(field, value, "is not an IPv4 address")
    if loopback and ip.is_loopback:
        pass
    elif any(ip in net for net in _NOT_UNICAST) or ip == ipaddress.IPv4Address("255.255.255.255"):
        raise FieldError(field, value, "is not a unicast address")
    if within is not None:
        nets = _networks(within)
        if not any(ip in n and (n.prefixlen >= 31 or ip not in (n.network_address,
                                                                 n.broadcast_address))
                   for n in nets):
            raise FieldError(field, value, f"is not a host address of {[str(n) for n in nets]}")
    if value in set(exclude):
        raise FieldError(field, value, "is an address this router may not take")
    return value


def home_network(home_agent: str) -> ipaddress.IPv4Network:
    """The home LAN of the home agent at ``home_agent`` (MOAT's home network is a /21)."""
    return ipaddress.IPv4Network(f"{home_agent}/{HOME_PREFIX_LEN}", strict=False)


def home_address(value: Any, home_agent: Any, field: str, *, own: Iterable[str] = ()) -> str:
    """An object's home address: a host address of its home agent's network (the /21 of
    ``home_agent``, itself checked), not the home agent's own, not one of ``own`` (the
    router's addresses): the rule :func:`agent.hosting.objects.check_home_address` applies
    before the address goes on a loopback, here applied when the message arrives."""
    agent = address(home_agent, f"{field} home agent")
    return address(value, field, within=[home_network(agent)], exclude=[agent, *own])


def prefix(value: Any, field: str, *, within: Iterable[Any] | None = None,
           min_len: int = 0, max_len: int = 32) -> str:
    """An IPv4 prefix ``a.b.c.d/n`` with no host bits set, ``min_len <= n <= max_len``;
    with ``within``, inside one of those networks."""
    try:
        net = ipaddress.IPv4Network(value) if isinstance(value, str) and "/" in value else None
    except ValueError:
        net = None
    if net is None or str(net) != value:
        raise FieldError(field, value, "is not an IPv4 prefix a.b.c.d/n without host bits")
    if not min_len <= net.prefixlen <= max_len:
        raise FieldError(field, value, f"must have a length in [{min_len}, {max_len}]")
    if any(net.overlaps(n) for n in _NOT_UNICAST):
        raise FieldError(field, value, "is not a unicast prefix")
    if within is not None:
        nets = _networks(within)
        if not any(net.subnet_of(n) for n in nets):
            raise FieldError(field, value, f"is not inside {[str(n) for n in nets]}")
    return value


def names(value: Any, field: str, max_items: int = 64) -> list[str]:
    """A list of at most ``max_items`` names (:func:`name`), without duplicates."""
    if not isinstance(value, list) or len(value) > max_items:
        raise FieldError(field, value, f"must be a list of at most {max_items} names")
    out = [name(v, f"{field}[]") for v in value]
    if len(set(out)) != len(out):
        raise FieldError(field, value, "names an item twice")
    return out


def mapping(value: Any, field: str, max_items: int = 64) -> Mapping[str, Any]:
    """A JSON object of at most ``max_items`` members."""
    if not isinstance(value, Mapping) or len(value) > max_items:
        raise FieldError(field, value, f"must be a JSON object of at most {max_items} members")
    return value


def object_config(doc: Any, field: str, *, own: Iterable[str] = ()) -> Any:
    """A mobile object's registration configuration from a message (PROVISION's
    ``mobile``, VM_NEGOTIATE ``start``, MIGRATE ``start``), every field checked: its name,
    NAI, home agent, a home address on the home agent's network (:func:`home_address`), a
    lifetime that fits RFC 5944's 16 bits, the optional FOA and care-of addresses, a mobile
    network prefix on the home network (at most 16 addresses, holding neither the home
    address nor the home agent), then its credentials, part and flags
    (:meth:`agent.core.config.ObjectConfig.from_json`). Returns the ObjectConfig."""
    from agent.core.config import ObjectConfig
    from agent.core.errors import ConfigError

    doc = mapping(doc, field)
    name(doc.get("name"), f"{field}.name")
    nai(doc.get("nai"), f"{field}.nai")
    home = home_address(doc.get("home_address"), doc.get("home_agent"), f"{field}.home_address",
                        own=own)
    agent = str(doc.get("home_agent"))
    integer(doc.get("lifetime", 60), f"{field}.lifetime", 1, 0xFFFF)
    if doc.get("preferred_agent") is not None:
        address(doc.get("preferred_agent"), f"{field}.preferred_agent")
    if doc.get("care_of_address", "") != "":
        address(doc.get("care_of_address"), f"{field}.care_of_address")
    net = doc.get("network_prefix", "")
    if net != "":
        prefix(net, f"{field}.network_prefix", within=[home_network(agent)],
               min_len=MIN_MOBILE_PREFIX_LEN)
        mobile_net = ipaddress.IPv4Network(net)
        if ipaddress.IPv4Address(home) in mobile_net or ipaddress.IPv4Address(agent) in mobile_net:
            raise FieldError(f"{field}.network_prefix", net,
                             "must hold neither the home address nor the home agent")
    try:
        return ObjectConfig.from_json(dict(doc))
    except ConfigError as exc:
        raise FieldError(field, "(credentials, part or flags)", f"is refused: {exc}") from None
