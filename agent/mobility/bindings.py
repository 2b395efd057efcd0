"""Mobility bindings at the home object agent (patent Fig. 8) and the FOA's visitor list (Fig. 9).

Pure data structures with an injectable clock, so expiry and the simultaneous-binding rules are
unit-tested without a network. The daemon calls :meth:`BindingTable.expire` on a timer and
reacts to the bindings it returns (stop proxy ARP, remove tunnels). Both tables keep a heap
of expiry times, so a timer tick costs O(expired + log n) rather than a scan of every entry;
the binding table also keeps its count, its GRE keys and the addresses it serves up to date
with each change, and says which served addresses changed (:meth:`BindingTable.take_changed`),
so a registration's bookkeeping does not grow with the number of bindings (issue 15).

Every change is also told to the table's :class:`TableObserver` (the role's journal,
:mod:`agent.mobility.journal`), so that both tables survive a restart of the agent; what
the journal brings back goes in through ``restore``, which tells nobody (issue 13).
"""

from __future__ import annotations

import heapq
import ipaddress
import itertools
import secrets
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from types import MappingProxyType
from typing import Callable, Iterator, Mapping, Protocol

Clock = Callable[[], float]


class TableObserver(Protocol):
    """Told of every change to a :class:`BindingTable` or :class:`VisitorList`, after it is
    made and before the caller answers anyone (the journal writes it durably here)."""

    def binding_set(self, binding: "Binding") -> None: ...
    def binding_removed(self, binding: "Binding") -> None: ...
    def identification(self, home_address: str, identification: int) -> None: ...
    def visitor_set(self, visitor: "Visitor") -> None: ...
    def visitor_removed(self, visitor: "Visitor") -> None: ...


@dataclass
class Binding:
    """One mobility binding: where an away object can be reached now."""

    home_address: str
    care_of_address: str
    care_of_name: str
    gre_key: int
    lifetime: int
    registered_at: float
    nai: str = ""
    identification: int = 0
    reverse_tunnel: bool = False
    #: The part of its service the registering instance is (object-part NVSE): "primary",
    #: "duplicate" or "secondary"; duplicates are the patent's duplicate bindings (108/110).
    part: str = "primary"
    #: The mobile network prefix registered with it ("" none): sent to the same care-of
    #: address (NEMO, RFC 5177).
    network_prefix: str = ""
    #: The SPI of the Foreign-Home authenticator the FOA relayed it under (0: none known):
    #: what the HOA signs its revocation for that FOA with when the binding goes (§4.1).
    foa_spi: int = 0
    #: A warm instance's binding made while the object still serves at home (a
    #: make-before-break move from home): kept, but not served (no proxy ARP, no tunnel)
    #: until the instance at home says it leaves (:meth:`BindingTable.register`'s
    #: leave-home), so the home link reaches the object at home until the switch.
    standby: bool = False

    @property
    def expires_at(self) -> float:
        return self.registered_at + self.lifetime

    def remaining(self, now: float) -> float:
        return max(0.0, self.expires_at - now)

    def as_dict(self, now: float | None = None) -> dict:
        d = asdict(self)
        if now is not None:
            d["remaining"] = round(self.remaining(now), 3)
        return d


class TooManyBindings(Exception):
    """Adding a binding would exceed the per-object cap (reply code 135)."""


@dataclass
class UpdateResult:
    """What a registration changed: the binding now in force (None after deregistration)
    and the bindings it replaced or removed."""

    binding: Binding | None
    removed: list[Binding] = field(default_factory=list)
    first_away: bool = False  # the object had no binding before: start proxy ARP
    now_home: bool = False  # the object has no binding left: stop proxy ARP
    #: Standby bindings a leave-home made served (the home link is the HOA's from now).
    activated: list[Binding] = field(default_factory=list)


class BindingTable:
    """Bindings by home address; several per object only when registered with ``S``."""

    def __init__(self, max_bindings: int = 4, clock: Clock = time.monotonic) -> None:
        if max_bindings < 1:
            raise ValueError("max_bindings must be >= 1")
        self.max_bindings = max_bindings
        self._clock = clock
        self._by_home: dict[str, list[Binding]] = {}
        #: Kept with every change (:meth:`_store`), so that a registration's bookkeeping
        #: costs O(1) however many bindings there are (issue 15): their number, the GRE
        #: keys in use, and what :meth:`served` answers.
        self._count = 0
        self._keys: Counter[int] = Counter()
        self._served: dict[str, tuple[Binding, ...]] = {}
        #: Served addresses changed since :meth:`take_changed` last looked.
        self._changed: set[str] = set()
        #: Last Identification accepted per home address, for the replay check.
        self.last_identification: dict[str, int] = {}
        #: Home addresses whose object said it is at home (a direct deregistration) and has
        #: not registered away since: a warm primary's ``S`` binding made now is a standby
        #: one. Not journalled: after a restart such a binding is served at once (the
        #: behaviour before standby bindings), which costs a move's disruption, not its state.
        self.at_home: set[str] = set()
        self._expiry = ExpiryHeap()
        #: Told of every change (None: nobody).
        self.observer: TableObserver | None = None

    def __iter__(self) -> Iterator[Binding]:
        for bindings in self._by_home.values():
            yield from bindings

    def __len__(self) -> int:
        return self._count

    def for_home(self, home_address: str) -> list[Binding]:
        """Live bindings of one object (a copy)."""
        return list(self._by_home.get(home_address, ()))

    def register(
        self,
        home_address: str,
        care_of_address: str,
        care_of_name: str,
        lifetime: int,
        simultaneous: bool,
        nai: str = "",
        identification: int = 0,
        reverse_tunnel: bool = False,
        part: str = "primary",
        network_prefix: str = "",
        foa_spi: int = 0,
    ) -> UpdateResult:
        """Apply an accepted registration (RFC 5944 §3.6.1.2 semantics).

        Lifetime 0 removes the binding for this care-of address (or all bindings if the
        care-of address is the home address: the object is at home). Without ``S`` a new
        binding replaces all others; with ``S`` it is added beside them, up to
        ``max_bindings``. With ``S``, lifetime 0 and the home address as care-of address the
        instance at home leaves (:meth:`_leave_home`), and a primary's ``S`` binding made
        while the object is at home waits for that as a *standby* binding (not served): a
        make-before-break move from home keeps the home link on the serving instance until
        its switch.
        """
        now = self._clock()
        current = self._by_home.get(home_address, [])
        was_away = bool(self._served.get(home_address))
        if lifetime == 0:
            if care_of_address == home_address and simultaneous:
                return self._leave_home(home_address, current)
            if care_of_address == home_address:
                removed, kept = current, []
                self.at_home.add(home_address)
            else:
                removed = [b for b in current if b.care_of_address == care_of_address]
                kept = [b for b in current if b.care_of_address != care_of_address]
            self._store(home_address, kept)
            self._removed(removed)
            return UpdateResult(None, removed, False, was_away and not self._served.get(home_address))
        same = [b for b in current if b.care_of_address == care_of_address]
        others = [b for b in current if b.care_of_address != care_of_address]
        if simultaneous:
            if not same and len(others) >= self.max_bindings:
                raise TooManyBindings(home_address)
            removed, kept = [], others
        else:
            removed, kept = others, []
            self.at_home.discard(home_address)  # registered away: it serves there alone
        # A warm primary while the object serves at home waits for its leave-home; a
        # renewal keeps what its binding was.
        standby = simultaneous and part == "primary" and (
            same[0].standby if same else home_address in self.at_home)
        key = same[0].gre_key if same else self._new_key()
        binding = Binding(
            home_address, care_of_address, care_of_name, key, lifetime, now, nai,
            identification, reverse_tunnel, part, network_prefix, foa_spi, standby,
        )
        self._store(home_address, kept + [binding])
        self._push(binding)
        self._removed(removed)
        if self.observer is not None:
            self.observer.binding_set(binding)
        return UpdateResult(binding, removed, not was_away and not standby, False)

    def _leave_home(self, home_address: str, current: list[Binding]) -> UpdateResult:
        """The instance at home leaves (lifetime 0, ``S``, care-of address the home
        address: it deregisters its home "location" only): every standby binding of the
        object is served from now on, and the others stay as they are."""
        self.at_home.discard(home_address)
        activated = [b for b in current if b.standby]
        for b in activated:
            b.standby = False
        self._store(home_address, current)
        if self.observer is not None:
            for b in activated:
                self.observer.binding_set(b)
        return UpdateResult(None, [], bool(activated), False, activated)

    def restore(self, binding: Binding) -> None:
        """Put back a binding the journal kept over a restart (its GRE key unchanged, so the
        FOA's tunnel still matches), replacing one at the same care-of address. Tells no
        observer: the journal holds it already."""
        current = [b for b in self._by_home.get(binding.home_address, [])
                   if b.care_of_address != binding.care_of_address]
        self._store(binding.home_address, current + [binding])
        self._push(binding)

    def note_identification(self, home_address: str, identification: int) -> None:
        """The Identification of an accepted request, for the replay check of the next."""
        self.last_identification[home_address] = identification
        if self.observer is not None:
            self.observer.identification(home_address, identification)

    def _push(self, binding: Binding) -> None:
        self._expiry.push(binding.expires_at, binding)
        if len(self._expiry) > 4 * len(self) + 64:  # renewals leave stale entries behind
            self._expiry.rebuild((b.expires_at, b) for b in self)

    def _removed(self, bindings: list[Binding]) -> None:
        if self.observer is not None:
            for b in bindings:
                self.observer.binding_removed(b)

    def _new_key(self) -> int:
        """A GRE key no live binding has, drawn at random (1 to 2**32-1): a key an attacker
        cannot guess cannot be forged into the FOA's tunnel (issue 12)."""
        while True:
            key = secrets.randbelow(0xFFFFFFFF) + 1
            if key not in self._keys:
                return key

    def expire(self) -> list[Binding]:
        """Remove and return every binding whose lifetime has run out (in expiry order)."""
        gone: list[Binding] = []
        for binding in self._expiry.due(self._clock()):
            current = self._by_home.get(binding.home_address, [])
            if any(b is binding for b in current):  # not renewed or removed since
                gone.append(binding)
                self._store(binding.home_address, [b for b in current if b is not binding])
        self._removed(gone)
        return gone

    @property
    def examined(self) -> int:
        """Heap entries looked at by :meth:`expire` so far (what a tick costs)."""
        return self._expiry.examined

    def away(self) -> set[str]:
        """Home addresses that have at least one binding."""
        return set(self._by_home)

    def served(self) -> Mapping[str, tuple[Binding, ...]]:
        """Every address the HOA answers for on the home link and tunnels, with the bindings
        it goes to: each away object's home address, and the addresses of the mobile network
        prefixes registered with its bindings (NEMO: its secondaries'). A read-only view,
        kept up to date with every change (O(1) to ask, not a walk over every binding)."""
        return MappingProxyType(self._served)

    def take_changed(self) -> set[str]:
        """The served addresses (:meth:`served`) whose bindings changed since the last call,
        added, renewed elsewhere or gone: what a data plane that follows the table has to
        look at again, rather than every address (issue 15)."""
        changed, self._changed = self._changed, set()
        return changed

    def note_changed(self, addresses: Iterator[str] | list[str]) -> None:
        """Have :meth:`take_changed` give ``addresses`` again (a data plane that could not
        finish with them)."""
        self._changed.update(addresses)

    @staticmethod
    def _addresses(binding: Binding) -> list[str]:
        """The served addresses a binding contributes beyond its home address."""
        if not binding.network_prefix:
            return []
        return [str(a) for a in ipaddress.IPv4Network(binding.network_prefix)]

    def _unserve(self, address: str, binding: Binding) -> None:
        rest = tuple(b for b in self._served.get(address, ()) if b is not binding)
        if rest:
            self._served[address] = rest
        else:
            self._served.pop(address, None)
        self._changed.add(address)

    def snapshot(self) -> list[dict]:
        now = self._clock()
        return [b.as_dict(now) for b in self]

    def _store(self, home_address: str, bindings: list[Binding]) -> None:
        """The one place ``_by_home`` changes: the count, the keys in use and the served
        view follow, in time proportional to this object's bindings only."""
        old = self._by_home.get(home_address, [])
        for b in old:
            self._keys[b.gre_key] -= 1
            if not self._keys[b.gre_key]:
                del self._keys[b.gre_key]
            for address in self._addresses(b):
                self._unserve(address, b)
        for b in bindings:
            self._keys[b.gre_key] += 1
            if b.standby:  # not served: no proxy ARP, no tunnel (yet)
                continue
            for address in self._addresses(b):
                self._served[address] = self._served.get(address, ()) + (b,)
                self._changed.add(address)
        self._count += len(bindings) - len(old)
        serving = tuple(b for b in bindings if not b.standby)
        if bindings:
            self._by_home[home_address] = bindings
        else:
            self._by_home.pop(home_address, None)
        if serving:
            self._served[home_address] = serving
        else:
            self._served.pop(home_address, None)
        self._changed.add(home_address)


@dataclass
class Visitor:
    """An object registered through this FOA (patent Fig. 9)."""

    home_address: str
    home_agent: str
    local_address: str
    local_port: int
    local_name: str
    care_of_name: str
    lifetime: int
    registered_at: float
    gre_key: int | None = None
    care_of_address: str = ""
    reverse_tunnel: bool = False
    #: Its mobile network prefix (NEMO): routed to the same router as its home address.
    network_prefix: str = ""
    #: The interface its registration came in on ("" unknown): with ``local_address``, the
    #: place the visitor is bound to while it is registered.
    local_interface: str = ""
    #: The Identification of the registration that made or last renewed it: an HOA's
    #: revocation removes it only if it revokes this registration or a later one.
    identification: int = 0

    @property
    def expires_at(self) -> float:
        return self.registered_at + self.lifetime

    def as_dict(self, now: float) -> dict:
        d = asdict(self)
        d["remaining"] = round(max(0.0, self.expires_at - now), 3)
        return d


class ExpiryHeap:
    """Entries by expiry time; :meth:`due` pops those due and looks at nothing else.

    Entries are not removed when their item is renewed or deleted: the owner checks that a
    popped item is still live, and rebuilds the heap when stale entries pile up."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, object]] = []
        self._seq = itertools.count()
        #: Entries popped and looked at, for tests and the benchmarks.
        self.examined = 0

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, at: float, item: object) -> None:
        heapq.heappush(self._heap, (at, next(self._seq), item))

    def due(self, now: float) -> list:
        """Pop every item whose time is ``now`` or earlier."""
        out = []
        while self._heap and self._heap[0][0] <= now:
            out.append(heapq.heappop(self._heap)[2])
            self.examined += 1
        return out

    def rebuild(self, entries: Iterator[tuple[float, object]]) -> None:
        self._heap = [(at, next(self._seq), item) for at, item in entries]
        heapq.heapify(self._heap)


class VisitorList:
    """The FOA's visitors by home address and care-of address, with expiry.

    An object has one visitor entry per care-of address this FOA issued it: two instances of
    one object (a duplicate on this router beside the primary behind it, patent 104/108)
    register through one FOA with different care-of addresses (patent: "a second
    care-of-address and a second care-of-name")."""

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._visitors: dict[tuple[str, str], Visitor] = {}
        self._expiry = ExpiryHeap()
        #: Told of every change (None: nobody).
        self.observer: TableObserver | None = None

    def __len__(self) -> int:
        return len(self._visitors)

    def get(self, home_address: str, care_of_address: str | None = None) -> Visitor | None:
        """The visitor of ``home_address`` at ``care_of_address`` (None: any of its)."""
        if care_of_address is not None:
            return self._visitors.get((home_address, care_of_address))
        return next((v for (h, _), v in self._visitors.items() if h == home_address), None)

    def of(self, home_address: str) -> list[Visitor]:
        return [v for (h, _), v in self._visitors.items() if h == home_address]

    def add(self, visitor: Visitor) -> None:
        self.restore(visitor)
        if self.observer is not None:
            self.observer.visitor_set(visitor)

    def restore(self, visitor: Visitor) -> None:
        """:meth:`add` without telling the observer (a visitor the journal brought back)."""
        self._visitors[(visitor.home_address, visitor.care_of_address)] = visitor
        self._expiry.push(visitor.expires_at, visitor)
        if len(self._expiry) > 4 * len(self._visitors) + 64:
            self._expiry.rebuild((v.expires_at, v) for v in self._visitors.values())

    def remove(self, home_address: str, care_of_address: str | None = None) -> Visitor | None:
        """Forget the visitor at ``care_of_address`` (None: every visitor of the object);
        returns one removed."""
        keys = [k for k in self._visitors if k[0] == home_address
                and (care_of_address is None or k[1] == care_of_address)]
        gone = [self._visitors.pop(k) for k in keys]
        self._removed(gone)
        return gone[0] if gone else None

    def _removed(self, visitors: list[Visitor]) -> None:
        if self.observer is not None:
            for v in visitors:
                self.observer.visitor_removed(v)

    def expire(self) -> list[Visitor]:
        """Remove and return every visitor whose lifetime has run out (O(expired + log n))."""
        gone: list[Visitor] = []
        for visitor in self._expiry.due(self._clock()):
            key = (visitor.home_address, visitor.care_of_address)
            if self._visitors.get(key) is visitor:  # not renewed or removed since
                gone.append(self._visitors.pop(key))
        self._removed(gone)
        return gone

    @property
    def examined(self) -> int:
        """Heap entries looked at by :meth:`expire` so far (what a tick costs)."""
        return self._expiry.examined

    def snapshot(self) -> list[dict]:
        now = self._clock()
        return [v.as_dict(now) for v in self._visitors.values()]

    def snapshot_objects(self) -> list[Visitor]:
        return list(self._visitors.values())
