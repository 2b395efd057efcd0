"""What a router's VMs have room for, and the reservations it promised (Fig. 12, 210-212).

Pure data on an injected clock. A router offers its *room*: its VM capacity (the baseline's
``capacity_cpu`` and ``capacity_memory_mb``) minus what its running VMs take and what it has
reserved for VMs about to arrive. A reservation is a promise with a deadline: the duplicate
that was negotiated must start before it runs out, or the room is offered again, so a
negotiator that dies half-way holds nothing for long.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from agent.broker import wire
from agent.core import fields
from agent.broker.errors import BadRequest

Clock = Callable[[], float]
#: How long a reservation holds without the duplicate it was made for, seconds.
RESERVATION_TTL_S = 30.0
#: Reservations one router keeps at once (more are refused: room is finite anyway).
MAX_RESERVATIONS = 64
#: Tolerance of CPU sums.
EPS = 1e-9


class NoRoom(Exception):
    """A reservation this router cannot make (the negotiator tries the next candidate)."""


@dataclass(frozen=True)
class Room:
    """CPU (cores) and memory (MiB)."""

    cpu: float
    memory_mb: int

    def covers(self, other: "Room") -> bool:
        return self.cpu + EPS >= other.cpu and self.memory_mb >= other.memory_mb

    def minus(self, other: "Room") -> "Room":
        return Room(max(0.0, self.cpu - other.cpu), max(0, self.memory_mb - other.memory_mb))

    @classmethod
    def total(cls, rooms: Iterable["Room"]) -> "Room":
        rooms = list(rooms)
        return cls(sum(r.cpu for r in rooms), sum(r.memory_mb for r in rooms))


@dataclass
class Reservation:
    reservation_id: str
    service: str
    room: Room
    until: float


class Reservations:
    """Room promised to VMs about to arrive, by reservation id, each with a deadline."""

    def __init__(self, clock: Clock = time.monotonic, ttl_s: float = RESERVATION_TTL_S) -> None:
        self._clock = clock
        self.ttl_s = ttl_s
        self._held: dict[str, Reservation] = {}

    def __len__(self) -> int:
        return len(self._held)

    def get(self, reservation_id: str) -> Reservation | None:
        self.expire()
        return self._held.get(reservation_id)

    def held(self) -> Room:
        self.expire()
        return Room.total(r.room for r in self._held.values())

    def reserve(self, reservation_id: str, service: str, room: Room, free: Room,
                ttl_s: float | None = None) -> Reservation:
        """Promise ``room`` out of ``free`` (what the VMs leave) for ``ttl_s`` (default: the
        table's), or :class:`NoRoom`. Asking again with the same id renews the promise."""
        self.expire()
        old = self._held.pop(reservation_id, None)
        available = free.minus(self.held())
        if not available.covers(room) or len(self._held) >= MAX_RESERVATIONS:
            if old is not None:
                self._held[reservation_id] = old
            raise NoRoom(f"{room.cpu:g} CPU and {room.memory_mb} MiB asked, "
                         f"{available.cpu:g} CPU and {available.memory_mb} MiB free")
        held = Reservation(reservation_id, service, room,
                           self._clock() + (self.ttl_s if ttl_s is None else ttl_s))
        self._held[reservation_id] = held
        return held

    def release(self, reservation_id: str) -> Reservation | None:
        """Give the room back (the duplicate started, and now counts as a VM, or failed)."""
        return self._held.pop(reservation_id, None)

    def expire(self) -> list[Reservation]:
        now = self._clock()
        gone = [r for r in self._held.values() if r.until <= now]
        for r in gone:
            del self._held[r.reservation_id]
        return gone

    def snapshot(self) -> list[dict[str, Any]]:
        now = self._clock()
        return [{"reservation": r.reservation_id, "service": r.service, "cpu": r.room.cpu,
                 "memory_mb": r.room.memory_mb, "remaining_s": round(r.until - now, 3)}
                for r in self._held.values()]


@dataclass(frozen=True)
class Offer:
    """A router's answer to a capacity query (VM_OFFER), every field checked."""

    router: str
    address: str
    network: str
    free: Room
    #: Mobile objects (by name) this router runs now: a router runs one instance of one.
    objects: tuple[str, ...] = ()
    #: Whether the router is on the home network (duplicates go to foreign networks).
    home: bool = False
    #: Home addresses registered through this router as their FOA (objects behind it).
    visiting: tuple[str, ...] = ()
    #: Whether its FOA can deliver by GRE key to a router behind it (as frames) while it
    #: answers on the same home address itself: its tunnel is the userspace one.
    frames: bool = False

    @classmethod
    def from_dict(cls, doc: Any) -> "Offer":
        what = "offer"
        doc = wire.as_mapping(doc, what)
        wire.only_keys(doc, {"ok", "router", "address", "network", "free_cpu", "free_memory_mb",
                             "objects", "home", "auth", "visiting", "frames"}, what)
        home, frames = doc.get("home", False), doc.get("frames", False)
        if not isinstance(home, bool) or not isinstance(frames, bool):
            raise BadRequest("offer.home and offer.frames must be true or false")
        visiting = doc.get("visiting", [])
        if not isinstance(visiting, list) or len(visiting) > 1024:
            raise BadRequest("offer.visiting must be a list of at most 1024 addresses")
        for address in visiting:
            wire.field(fields.address, address, "offer.visiting[]")
        # Where this router's reserve and start go next, and the network it serves: a
        # unicast IPv4 address and an IPv4 prefix (agent.core.fields), nothing else.
        return cls(router=wire.name(doc, "router", what),
                   address=wire.address(doc, "address", what),
                   network=wire.field(fields.prefix, doc.get("network"), "offer.network"),
                   free=Room(wire.number(doc, "free_cpu", what, ge=0, le=1024),
                             int(wire.integer(doc, "free_memory_mb", what, lo=0, hi=1 << 30))),
                   objects=tuple(wire.names(doc, "objects", what, default=())),
                   home=home, visiting=tuple(str(a) for a in visiting), frames=frames)

    def as_dict(self) -> dict[str, Any]:
        return {"router": self.router, "address": self.address, "network": self.network,
                "free_cpu": round(self.free.cpu, 6), "free_memory_mb": self.free.memory_mb,
                "objects": list(self.objects), "home": self.home,
                "visiting": list(self.visiting), "frames": self.frames}


def placeable(offers: Iterable[Offer], obj: str, need: Room, home_address: str = "") -> list[Offer]:
    """Where a duplicate of mobile object ``obj`` (home address ``home_address``) may go
    (step 210): a router on a foreign network with ``need`` free that does not run ``obj``,

    * on a network where no instance of ``obj`` runs yet, or
    * on the foreign agent of a network where one instance runs *behind* it (registered
      through it), when that FOA can deliver to it by GRE key (``frames``): the patent's
      104 and 108 on one network, at the FOA's first and second care-of addresses.

    Never at home: every instance answers on the object's home address, and there the HOA's
    proxy ARP and a router holding that address would both answer for it. Never two behind
    one FOA, nor beside an instance on an FOA's own router: the FOA tells instances apart by
    GRE key only for the one behind it, and its own router takes the rest."""
    offers = list(offers)
    running: dict[str, list[Offer]] = {}
    for o in offers:
        if obj in o.objects:
            running.setdefault(o.network, []).append(o)
    out = []
    for o in offers:
        if o.home or obj in o.objects or not o.free.covers(need):
            continue
        there = running.get(o.network, [])
        if not there or (len(there) == 1 and o.frames and home_address
                         and home_address in o.visiting):
            out.append(o)
    return out


def rank(offers: Iterable[Offer], co_hops: dict[str, int], traffic: dict[str, int]) -> list[Offer]:
    """The order in which candidates are tried (the README's placement rule):

    1. fewest hops from the corresponding object's network to the router (``co_hops``,
       router -> hops; unknown: last);
    2. then the most requests the object received from the router's network through the home
       network (``traffic``, network -> count): moving there takes that traffic off the
       home network and the backbone;
    3. then the most free CPU, then the name (a stable order)."""
    unknown = 1 << 16
    return sorted(offers, key=lambda o: (co_hops.get(o.router, unknown),
                                         -traffic.get(o.network, 0), -o.free.cpu, o.router))
