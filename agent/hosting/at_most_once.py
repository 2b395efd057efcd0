"""The object's at-most-once memory: per client, which sequence numbers it has served and the
last reply, bounded, and not poisoned by one spoofed request (issue 12).

Service requests are not authenticated (a leased object checks credentials before this
filter, an open one cannot), so anybody who can send a datagram can name any client and any
sequence number. The old rule ("serve only seq above the client's last") let one spoofed
request with a huge seq silence that client for good, and the poisoned entry travelled in
the checkpoint. The rule here:

* Per client the memory keeps the last :data:`SERVED_MEMORY` sequence numbers it served
  (``served``), and a ``floor``: every seq at or below it counts as served. A seq is dropped
  as stale only if it is at or below the floor or in ``served``; any other seq is new. A
  spoofed seq far ahead therefore does not hide the real client's next requests: they are
  neither below the floor nor served. The floor rises only by the smallest served seq falling
  out of ``served``, so it never passes a seq that was not served unless more than
  ``SERVED_MEMORY`` higher ones were served first: a client reordered that much, or that
  many spoofed requests. So one spoofed request (up to ``SERVED_MEMORY - 1`` of them) cannot
  make the object drop the client's requests; a spoofer sending more can, down to the
  lowest seq it used, as it could use the service as that client anyway. A leased service
  checks credentials before this filter, so there only credentialed requests reach it.
* A seq more than :data:`SEQ_AHEAD` beyond the highest one a known client used is refused
  with an error reply and not remembered: no client skips 65,536 requests, and numbers stay
  small. A client the memory does not know (new, or evicted) may start anywhere.
* The memory holds at most :data:`MAX_CLIENTS` clients and :data:`MAX_BYTES` bytes (client
  ids, seqs and replies as JSON), evicting the least recently served client first, so
  100,000 fake client ids cost a bounded amount and the checkpoint still fits a migration.
  A reply bigger than :data:`REPLY_LIMIT` is remembered as a short error saying so: its
  duplicate is told, and the request is never run twice.

An evicted client loses only the memory of its last requests: a late duplicate of one of
them would be served again. That is the price of the bound; it takes
:data:`MAX_CLIENTS` other clients served in between.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

log = logging.getLogger(__name__)

#: Sequence numbers remembered one by one per client (the reordering a client may show).
SERVED_MEMORY = 16
#: How far beyond a known client's highest seq a request may jump.
SEQ_AHEAD = 1 << 16
#: Clients remembered at once.
MAX_CLIENTS = 1024
#: Bytes the whole memory may hold (JSON of ids, seqs and replies): with the object's own
#: state it must fit a move's checkpoint (agent.hosting.migration.MAX_CHECKPOINT_BYTES).
MAX_BYTES = 320 << 10
#: A reply bigger than this is remembered as an error saying it was too large to keep.
REPLY_LIMIT = 256 << 10
#: Longest client id accepted on the wire.
MAX_CLIENT_LEN = 128
#: Largest sequence number accepted on the wire.
MAX_SEQ = (1 << 63) - 1
#: Bytes of one client's JSON besides its id, seqs and reply (keys, brackets, quotes).
_ENTRY_OVERHEAD = 48


class Verdict(Enum):
    """What to do with a request, by its client and seq."""

    NEW = "new"  # serve it
    DUPLICATE = "duplicate"  # the last one served: answer the remembered reply
    STALE = "stale"  # served already (or older than what is remembered): drop
    AHEAD = "ahead"  # too far beyond the client's last: refuse, remember nothing


def encoded_size(value: Any) -> int:
    """Bytes of ``value`` as strict JSON; ValueError/TypeError if it is not JSON (NaN, a set)."""
    return len(json.dumps(value, separators=(",", ":"), allow_nan=False))


@dataclass
class ClientMemory:
    """One client's memory (see the module docstring)."""

    floor: int
    served: list[int] = field(default_factory=list)  # sorted, all above floor
    last: int = -1  # the seq whose reply is kept
    reply: dict[str, Any] | None = None
    reply_size: int = 0  # bytes of the reply as JSON
    size: int = 0  # bytes counted for it (see measure)

    def measure(self, client: str) -> int:
        """Its bytes in a checkpoint (JSON), kept in ``size``."""
        seqs = sum(len(str(s)) + 1 for s in self.served) + len(str(self.floor)) + len(str(self.last))
        self.size = len(client) + _ENTRY_OVERHEAD + seqs + self.reply_size
        return self.size

    @property
    def top(self) -> int:
        return self.served[-1] if self.served else self.floor

    def as_json(self) -> dict[str, Any]:
        return {"floor": self.floor, "served": list(self.served), "last": self.last,
                "reply": self.reply}


def _seq(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not -1 <= value <= MAX_SEQ:
        raise ValueError(f"{what} must be an integer in [-1, {MAX_SEQ}], not {value!r}")
    return value


def parse_entry(client: Any, raw: Any) -> ClientMemory:
    """One client's memory from a checkpoint; ValueError for anything malformed. The form
    before issue 12, ``[seq, reply]``, still loads (everything up to seq served)."""
    if not isinstance(client, str) or not 0 < len(client) <= MAX_CLIENT_LEN:
        raise ValueError(f"checkpoint: client id {client!r:.80} is not a string of 1 to "
                         f"{MAX_CLIENT_LEN} characters")
    if isinstance(raw, list) and len(raw) == 2:
        seq = _seq(raw[0], f"checkpoint: seq of {client}")
        raw = {"floor": seq, "served": [], "last": seq, "reply": raw[1]}
    if not isinstance(raw, dict):
        raise ValueError(f"checkpoint: memory of client {client} is not an object")
    served = raw.get("served")
    if not isinstance(served, list) or len(served) > SERVED_MEMORY:
        raise ValueError(f"checkpoint: served of {client} is not a list of at most "
                         f"{SERVED_MEMORY} seqs")
    entry = ClientMemory(_seq(raw.get("floor"), f"checkpoint: floor of {client}"),
                         sorted({_seq(s, f"checkpoint: served seq of {client}") for s in served}),
                         _seq(raw.get("last"), f"checkpoint: last seq of {client}"))
    if any(s <= entry.floor for s in entry.served):
        raise ValueError(f"checkpoint: served seqs of {client} must be above its floor")
    reply = raw.get("reply")
    if reply is not None and not isinstance(reply, dict):
        raise ValueError(f"checkpoint: reply remembered for {client} is not an object")
    entry.reply = reply
    try:
        entry.reply_size = encoded_size(reply) if reply else 0
    except (TypeError, ValueError, RecursionError) as exc:
        raise ValueError(f"checkpoint: reply remembered for {client} is not JSON: {exc}") from None
    entry.measure(client)
    return entry


class RequestMemory:
    """Per-client memory of served requests, least recently served first."""

    def __init__(self, max_clients: int = MAX_CLIENTS, max_bytes: int = MAX_BYTES,
                 reply_limit: int = REPLY_LIMIT) -> None:
        self.max_clients = max_clients
        self.max_bytes = max_bytes
        self.reply_limit = reply_limit
        self.clients: OrderedDict[str, ClientMemory] = OrderedDict()
        self.nbytes = 0
        #: Clients forgotten to stay within the bounds.
        self.evicted = 0

    def __len__(self) -> int:
        return len(self.clients)

    def __contains__(self, client: str) -> bool:
        return client in self.clients

    def get(self, client: str) -> ClientMemory | None:
        return self.clients.get(client)

    def check(self, client: str, seq: int) -> tuple[Verdict, dict[str, Any] | None]:
        """The verdict on ``(client, seq)``, with the remembered reply for a duplicate."""
        entry = self.clients.get(client)
        if entry is None:
            return Verdict.NEW, None
        if seq == entry.last and entry.reply is not None:
            return Verdict.DUPLICATE, entry.reply
        if seq <= entry.floor or seq in entry.served or seq == entry.last:
            return Verdict.STALE, None
        if seq > entry.top + SEQ_AHEAD:
            return Verdict.AHEAD, None
        return Verdict.NEW, None

    def remember(self, client: str, seq: int, body: dict[str, Any], size: int) -> dict[str, Any]:
        """Record that ``seq`` was served with reply ``body`` (``size`` bytes of JSON);
        returns the reply as remembered (a short error when it was too large to keep)."""
        if size > self.reply_limit:
            body = {"ok": False, "client": client, "seq": seq,
                    "error": f"the reply to this request ({size} bytes) was too large to "
                             "remember: it was sent once and is not run again"}
            size = encoded_size(body)
        entry = self.clients.get(client)
        if entry is None:
            entry = self.clients[client] = ClientMemory(floor=-1)
        else:
            self.nbytes -= entry.size
            self.clients.move_to_end(client)
        if seq not in entry.served:
            entry.served.append(seq)
            entry.served.sort()
        while len(entry.served) > SERVED_MEMORY:
            entry.floor = max(entry.floor, entry.served.pop(0))
        entry.last, entry.reply, entry.reply_size = seq, body, size
        self.nbytes += entry.measure(client)
        self._bound(keep=client)
        return body

    def _bound(self, keep: str | None = None) -> None:
        while len(self.clients) > self.max_clients or self.nbytes > self.max_bytes:
            oldest = next(iter(self.clients))
            if oldest == keep:
                if len(self.clients) == 1:
                    return
                self.clients.move_to_end(keep)
                continue
            self.nbytes -= self.clients.pop(oldest).size
            self.evicted += 1

    def to_json(self) -> dict[str, dict[str, Any]]:
        """The memory for a checkpoint, least recently served first."""
        return {client: entry.as_json() for client, entry in self.clients.items()}

    def merge(self, data: Any) -> None:
        """Add a checkpoint's memory (validated whole first: ValueError changes nothing).
        A client known to both keeps everything either served."""
        if not isinstance(data, dict):
            raise ValueError("checkpoint: seen is not an object")
        incoming = [(client, parse_entry(client, raw)) for client, raw in data.items()]
        for client, theirs in incoming:
            mine = self.clients.pop(client, None)
            if mine is not None:
                self.nbytes -= mine.size
                theirs = _combined(mine, theirs)
            self.clients[client] = theirs
            self.nbytes += theirs.measure(client)
        self._bound()


def _combined(a: ClientMemory, b: ClientMemory) -> ClientMemory:
    """What either memory counts as served; the later last reply."""
    floor = max(a.floor, b.floor)
    served = sorted(s for s in set(a.served) | set(b.served) if s > floor)
    while len(served) > SERVED_MEMORY:
        floor = served.pop(0)
    latest = a if a.last >= b.last else b
    return ClientMemory(floor, served, latest.last, latest.reply, latest.reply_size)
