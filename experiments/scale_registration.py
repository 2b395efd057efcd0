"""Register many objects at once through their foreign networks' FOAs (issue 15, item 2).

    from experiments.scale_registration import register_many, swarm_object_names
    moat = MoatNetwork(ScaleTopo(n_foreign=4, routers_per_net=1),
                       objects=swarm_object_names(1000))
    with moat:
        result = register_many(moat, 1000)          # every foreign network, round robin
        print(result.seconds, result.hoa_bindings)

The objects are lightweight (:mod:`experiments.regswarm`): registration clients with their
own keys and sockets, run in this process, each socket opened in its foreign network's
corresponding-object host (``co<N>``) so that its packets leave from there
(:mod:`topologies.netns_sockets`); real FOAs relay them to the real HOA, authenticated as
every registration is. A run must have been started with the objects (the HOA and the FOAs
learn their keys from their configurations): :func:`swarm_object_names` names them, and
:func:`register_many` uses only objects so named, so it never registers an object a router
hosts (``counter``).

The time :func:`register_many` gives is from its call (the network up) until the last
acceptance reached its object, all on this process's monotonic clock: opening the sockets,
hearing each FOA, and every registration's round trip, with retransmissions.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from agent.core.config import ObjectConfig
from topologies.client import OBJECTS_FILE
from topologies.errors import TopologyError
from topologies.netns_sockets import in_netns

from .regswarm import Outcome, SwarmNetwork, run_swarm, summary

log = logging.getLogger(__name__)

__all__ = ["SWARM_PREFIX", "swarm_object_names", "register_many", "RegisterManyResult",
           "ScaleRegistrationError", "DEFAULT_LIFETIME", "DEFAULT_WINDOW"]

#: Names of swarm objects start with this (``m0000`` ...); no other object's do.
SWARM_PREFIX = "m"
#: Registration lifetime asked for; each object asks no more than its FOA advertises (the
#: agents' maximum, 300 s by default): no binding runs out while a benchmark measures.
DEFAULT_LIFETIME = 300
#: Registrations outstanding at once, in all: enough to keep the HOA busy, few enough that
#: its receive queue never overflows (a lost request costs its object a 1 s retransmission).
DEFAULT_WINDOW = 32
#: How long a network's FOA may take to answer a solicitation.
HEAR_TIMEOUT = 5.0
#: File descriptors kept free beside the swarm's sockets.
FD_SPARE = 256


class ScaleRegistrationError(TopologyError):
    """register_many cannot run: too few swarm objects, no such foreign network, no host."""


def swarm_object_names(count: int) -> list[str]:
    """The names of ``count`` swarm objects (``m0000``, ``m0001``, ...), for
    ``MoatNetwork(objects=...)``; their home addresses come from the address plan in order."""
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= 9999:
        raise ScaleRegistrationError(f"swarm object count must be an int in 0..9999, got {count!r}")
    return [f"{SWARM_PREFIX}{i:04d}" for i in range(count)]


@dataclass
class RegisterManyResult:
    """What :func:`register_many` measured."""

    count: int
    #: Seconds from the call until every object was registered (None: not all were).
    seconds: float | None
    registered: int
    #: Bindings the HOA reported holding afterwards (None: not asked or no answer).
    hoa_bindings: int | None
    #: Foreign network number -> (host the objects sent from, its FOAs' addresses, objects).
    networks: dict[int, tuple[str, str, int]]
    summary: dict[str, Any] = field(default_factory=dict)
    outcomes: list[Outcome] = field(default_factory=list, repr=False)

    @property
    def complete(self) -> bool:
        return self.registered == self.count and self.seconds is not None


def _raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed + FD_SPARE
    if soft != resource.RLIM_INFINITY and soft < want:
        if hard != resource.RLIM_INFINITY and hard < want:
            raise ScaleRegistrationError(f"{needed} sockets need a file limit of {want}, the "
                                         f"hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def _pick(net: Any, number: int) -> tuple[str, list[tuple[str, str]]]:
    """A foreign network's corresponding-object host, and its FOAs (router, address),
    border router first."""
    topo = net.topo
    spec = topo.networks.get(number)
    if spec is None or spec.kind != "foreign":
        foreign = sorted(n for n, s in topo.networks.items() if s.kind == "foreign")
        raise ScaleRegistrationError(f"{number!r} is not a foreign network of the run "
                                     f"(foreign networks: {foreign})")
    hosts = [h for h in spec.hosts if topo.nodeInfo(h).get("role") == "co"]
    foas = sorted((r for r in spec.routers if r in net.foreign_agents),
                  key=lambda r: (r != spec.border, r))
    if not hosts or not foas:
        raise ScaleRegistrationError(f"network {number} needs a corresponding-object host and "
                                     f"an FOA (hosts {spec.hosts}, FOAs {foas})")
    return hosts[0], [(r, str(topo.addresses(r)[0].ip)) for r in foas]


def _capacity(net: Any, router: str) -> int:
    """Visitors the FOA on ``router`` takes at most (it refuses more with 66)."""
    foreign = net.agent_config(router).foreign
    return int(foreign.max_visitors) if foreign is not None else 0


def _open(count: int, ifname: str) -> tuple[list[socket.socket], socket.socket]:
    """Run inside the host's namespace: ``count`` UDP sockets on ephemeral ports, and a raw
    ICMP socket that sends solicitations out of ``ifname`` with TTL 1."""
    udp: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.append(s)
            s.setblocking(False)
            s.bind(("0.0.0.0", 0))
        icmp = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        ifindex = socket.if_nametoindex(ifname)  # this namespace's index
        icmp.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
        icmp.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF,
                        struct.pack("=4s4si", b"\0" * 4, b"\0" * 4, ifindex))
        icmp.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())
        icmp.setblocking(False)
    except BaseException:
        for s in udp:
            s.close()
        raise
    return udp, icmp


def register_many(net: Any, count: int, foreign_networks: Sequence[int] | None = None, *,
                  names: Sequence[str] | None = None, lifetime: int = DEFAULT_LIFETIME,
                  window: int = DEFAULT_WINDOW, hear_timeout: float = HEAR_TIMEOUT,
                  ask_hoa: bool = True) -> RegisterManyResult:
    """Register ``count`` swarm objects of the running network ``net`` (a started
    :class:`topologies.moatnet.MoatNetwork`) through the FOAs of ``foreign_networks`` (network
    numbers; default every foreign network), dealt out round robin; returns the time until
    all were registered, with the details. ``names`` picks the objects (default: the first
    ``count`` swarm objects of the run). Objects stay registered for ``lifetime`` s (no
    renewals); registering an object again moves its binding, as a moving object's would.

    Raises :class:`ScaleRegistrationError` on input that cannot run (checked before any
    packet is sent); registrations that fail are in the result, not raised."""
    start = time.monotonic()
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ScaleRegistrationError(f"count must be a positive int, got {count!r}")
    if not 1 <= lifetime <= 0xFFFF:
        raise ScaleRegistrationError(f"lifetime must be in 1..65535, got {lifetime}")
    path = net.run.dir / OBJECTS_FILE
    try:
        configs_json: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ScaleRegistrationError(f"cannot read the run's objects from {path}: {exc}") from None
    swarm = [n for n in configs_json if n.startswith(SWARM_PREFIX) and n[1:].isdigit()]
    if names is None:
        chosen = swarm[:count]
    else:
        chosen = list(names)[:count]
        unknown = sorted(set(chosen) - set(swarm))
        if unknown:
            raise ScaleRegistrationError(f"not swarm objects of the run: {unknown[:5]}")
    if len(chosen) < count or len(set(chosen)) != len(chosen):
        raise ScaleRegistrationError(
            f"the run has {len(swarm)} swarm objects ({len(chosen)} chosen, distinct: "
            f"{len(set(chosen))}), {count} asked: start it with "
            f"objects=swarm_object_names({count})")
    if foreign_networks is None:
        foreign_networks = sorted(n for n, s in net.topo.networks.items() if s.kind == "foreign")
    numbers = list(dict.fromkeys(foreign_networks))
    if not numbers:
        raise ScaleRegistrationError("no foreign network to register through")
    places = {n: _pick(net, n) for n in numbers}
    # Every FOA of every network, the networks interleaved: objects go round robin over them.
    slots: list[tuple[int, str, str]] = []
    for k in range(max(len(foas) for _, foas in places.values())):
        slots += [(n, *places[n][1][k]) for n in numbers if k < len(places[n][1])]
    room = sum(_capacity(net, router) for _, router, _ in slots)
    if count > room:
        raise ScaleRegistrationError(
            f"{count} objects do not fit the {len(slots)} FOA(s) of networks {numbers}: "
            f"they take {room} visitors in all (max_visitors each); use more foreign networks")
    _raise_fd_limit(count + 2 * len(slots))

    share: dict[tuple[int, str, str], list[ObjectConfig]] = {slot: [] for slot in slots}
    for i, name in enumerate(chosen):
        slot = slots[i % len(slots)]
        cfg = ObjectConfig.from_json(configs_json[name])
        cfg.lifetime = lifetime
        cfg.preferred_agent = slot[2]
        share[slot].append(cfg)
    pids = net.client.run.state.node_pids
    swarm_nets: list[SwarmNetwork] = []
    try:
        for slot, configs in share.items():
            if not configs:
                continue
            number, router, foa = slot
            host = places[number][0]
            ifname = net.topo.interfaces(host)[0].name
            udp, icmp = in_netns(pids[host], lambda c=len(configs), i=ifname: _open(c, i))
            swarm_nets.append(SwarmNetwork(f"net{number}/{router}", foa, configs, udp, icmp))
        outcomes = asyncio.run(run_swarm(swarm_nets, window, hear_timeout))
    finally:
        for sn in swarm_nets:
            for s in sn.sockets:
                s.close()
            sn.icmp.close()
    facts = summary(outcomes, start)
    hoa_bindings = None
    if ask_hoa:
        try:
            hoa_bindings = net.agent(net.hoa).call("status").get("bindings")
        except Exception as exc:  # noqa: BLE001 - a figure, not the measurement
            log.warning("HOA status after the swarm failed: %s", exc)
    per_net = {n: (places[n][0], ", ".join(f for _, f in places[n][1]),
                   sum(len(c) for slot, c in share.items() if slot[0] == n)) for n in numbers}
    result = RegisterManyResult(count, facts["seconds"], facts["registered"], hoa_bindings,
                                per_net, facts, outcomes)
    log.info("register_many: %d/%d registered in %s s through %d network(s); HOA holds %s",
             result.registered, count, result.seconds, len(numbers), hoa_bindings)
    return result
