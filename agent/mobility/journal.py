"""Durable mobility bindings and visitor lists: a journal in the run directory (issue 13).

An HOA that restarts must not forget where its away objects are (RFC 5944 leaves binding
recovery to the implementation; a forgotten binding stops their traffic until their next
renewal), and an FOA must not forget its visitors and their GRE keys. So the object agent
role keeps one journal per router, ``<run>/<router>.bindings.journal``, root-only (0600 from
creation, in the 0700 run directory), and restores both tables from it when it starts.

Format: one line per change, ``<crc32 of the JSON, 8 hex digits> <JSON>\\n``. Records:

* ``h`` (the first line of every file): the format version and the machine's boot id;
* ``b`` a binding set (added or renewed), ``-b`` removed, by (home address, care-of address);
* ``v`` a visitor set, ``-v`` removed, by (home address, care-of address);
* ``i`` the last Identification accepted for a home address (the HOA's replay check must
  not start from nothing: a request recorded before the restart must stay a replay).

Records hold no keys: a binding or a visitor is addresses, names, a GRE key (a routing
label, not a secret: it is on the wire in every tunnelled packet), a lifetime and an expiry.

Time: the tables run on the monotonic clock, which means nothing to another boot of the
machine. Each ``b``/``v`` record carries its absolute expiry twice, ``exp_mono`` (the
monotonic clock) and ``exp_wall`` (Unix time), and the file's header the boot id it was
written under. On restore, a journal of this very boot uses ``exp_mono`` (CLOCK_MONOTONIC is
system-wide and never jumps, so an agent restarted by its supervisor gets exactly what was
left); a journal of another boot uses ``exp_wall``. The remaining lifetime never exceeds the
granted one (a wall clock set back cannot lengthen it). Entries already expired are dropped.

Integrity: a line whose checksum does not match, that is not terminated (a crash in the
middle of a write: a torn last line), longer than :data:`MAX_LINE`, or whose fields fail
their checks (:mod:`agent.core.fields`) is skipped and counted; the rest is restored. A
journal not owned by this user, or writable by group or others, is not trusted at all.

Durability (fsync policy): each record is written with one ``write(2)`` on an ``O_APPEND``
descriptor and made durable with ``fdatasync(2)`` before the table change is answered (the
HOA's reply, the FOA's relayed reply); bindings change rarely (a registration or a renewal
at two thirds of a lifetime), and fdatasync of an appended line costs about 0.1 ms on the
testbed's ext4 (measured; a full fsync, 2.5 ms, is kept for compaction). Compaction writes
a snapshot of the live entries to a temporary file (0600), fsyncs it, renames it over the
journal and fsyncs the directory, so a crash leaves the old journal or the new, never half.
It runs at start and whenever the journal holds more than ``max(min_records, factor × live
entries)`` records: the file stays bounded under any flood of renewals.

Failures: a write that fails (disk full, read-only run directory) is logged, rate-limited,
and counted; the agent keeps serving from its tables, the journal keeps the live entries in
memory and rewrites the whole snapshot on its next try (at most every
:data:`RETRY_INTERVAL` seconds), so nothing is lost once the disk takes writes again.
"""

from __future__ import annotations

import json
import logging
import os
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from agent.core import fields
from agent.core.errors import AgentError
from agent.mobility.bindings import Binding, Visitor
from agent.mobility.ratelog import RateLimitedLog

log = logging.getLogger(__name__)

Clock = Callable[[], float]

VERSION = 1
#: A line longer than this is not one this module wrote.
MAX_LINE = 4096
#: Compaction never runs for fewer records than this...
MIN_RECORDS = 256
#: ... nor while the journal holds at most this many records per live entry.
COMPACT_FACTOR = 4
#: A journal whose writes failed is rewritten at most this often (seconds).
RETRY_INTERVAL = 1.0
#: Failures are logged at most once per this many seconds per kind.
ERROR_LOG_INTERVAL = 10.0
#: Lifetimes fit RFC 5944's 16 bits.
MAX_LIFETIME = 0xFFFF
BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"


class JournalError(AgentError):
    """A journal line that cannot be restored (bad checksum, torn, a field that fails)."""


def journal_path(run_dir: str | os.PathLike[str], router: str) -> Path:
    """Where router ``router`` keeps its journal."""
    return Path(run_dir) / f"{router}.bindings.journal"


def read_boot_id(path: str = BOOT_ID_PATH) -> str:
    """This boot of the machine ("" when the kernel does not say: wall clock then)."""
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def encode_line(record: dict[str, Any]) -> bytes:
    """One journal line: the checksum, a space, the compact JSON, a newline."""
    body = json.dumps(record, separators=(",", ":"), sort_keys=True).encode()
    return b"%08x %s\n" % (zlib.crc32(body), body)


def decode_line(line: bytes) -> dict[str, Any]:
    """The record of one line (with its newline); :class:`JournalError` unless it is whole."""
    if not line.endswith(b"\n"):
        raise JournalError("torn line (no newline)")
    if len(line) > MAX_LINE:
        raise JournalError(f"line of {len(line)} bytes > {MAX_LINE}")
    crc, sep, body = line[:-1].partition(b" ")
    if not sep or len(crc) != 8:
        raise JournalError("no checksum")
    try:
        ok = int(crc, 16) == zlib.crc32(body)
    except ValueError:
        ok = False
    if not ok:
        raise JournalError("checksum mismatch")
    try:
        record = json.loads(body)
    except ValueError as exc:
        raise JournalError(f"not JSON: {exc}") from None
    if not isinstance(record, dict) or not isinstance(record.get("t"), str):
        raise JournalError("not a record")
    return record


def _address(value: Any, field_name: str) -> str:
    return fields.address(value, field_name, loopback=True)


def _key(value: Any, field_name: str) -> int:
    return fields.integer(value, field_name, 1, 0xFFFFFFFF)


def _optional_prefix(value: Any, field_name: str) -> str:
    return fields.prefix(value, field_name) if value != "" else ""


def binding_fields(doc: dict[str, Any]) -> dict[str, Any]:
    """The checked fields of a ``b`` record (everything but the times)."""
    return {
        "home_address": _address(doc.get("home_address"), "home_address"),
        "care_of_address": _address(doc.get("care_of_address"), "care_of_address"),
        "care_of_name": fields.text(doc.get("care_of_name"), "care_of_name"),
        "gre_key": _key(doc.get("gre_key"), "gre_key"),
        "lifetime": fields.integer(doc.get("lifetime"), "lifetime", 1, MAX_LIFETIME),
        "nai": fields.text(doc.get("nai"), "nai"),
        "identification": fields.integer(doc.get("identification"), "identification",
                                         0, 2**64 - 1),
        "reverse_tunnel": fields.flag(doc.get("reverse_tunnel"), "reverse_tunnel"),
        "part": fields.one_of(doc.get("part"), "part", ("primary", "duplicate", "secondary")),
        "network_prefix": _optional_prefix(doc.get("network_prefix"), "network_prefix"),
        # Absent from journals written before revocations (issue 18): none known.
        "foa_spi": fields.integer(doc.get("foa_spi", 0), "foa_spi", 0, 0xFFFFFFFF),
        # Absent from journals written before standby bindings (issue 14): served.
        "standby": fields.flag(doc.get("standby", False), "standby"),
    }


def visitor_fields(doc: dict[str, Any]) -> dict[str, Any]:
    """The checked fields of a ``v`` record (everything but the times)."""
    key = doc.get("gre_key")
    return {
        "home_address": _address(doc.get("home_address"), "home_address"),
        "home_agent": _address(doc.get("home_agent"), "home_agent"),
        "local_address": _address(doc.get("local_address"), "local_address"),
        "local_port": fields.port(doc.get("local_port"), "local_port"),
        "local_name": fields.text(doc.get("local_name"), "local_name"),
        "care_of_name": fields.text(doc.get("care_of_name"), "care_of_name"),
        "lifetime": fields.integer(doc.get("lifetime"), "lifetime", 1, MAX_LIFETIME),
        "gre_key": None if key is None else _key(key, "gre_key"),
        "care_of_address": _address(doc.get("care_of_address"), "care_of_address"),
        "reverse_tunnel": fields.flag(doc.get("reverse_tunnel"), "reverse_tunnel"),
        "network_prefix": _optional_prefix(doc.get("network_prefix"), "network_prefix"),
        "local_interface": fields.text(doc.get("local_interface"), "local_interface", 15),
        "identification": fields.integer(doc.get("identification", 0), "identification",
                                         0, 2**64 - 1),
    }


@dataclass
class Restored:
    """What a journal brought back, and what it left out."""

    bindings: list[Binding] = field(default_factory=list)
    visitors: list[Visitor] = field(default_factory=list)
    identifications: dict[str, int] = field(default_factory=dict)
    #: Entries whose lifetime ran out while the agent was down (their leftovers in the
    #: kernel, such as an FOA's route, are removed by the data plane).
    expired_bindings: list[Binding] = field(default_factory=list)
    expired_visitors: list[Visitor] = field(default_factory=list)
    #: Lines skipped: torn (the last, cut by a crash) or corrupt (checksum, fields).
    torn: int = 0
    corrupt: int = 0
    #: Whether the expiries came from the monotonic clock (same boot) or the wall clock.
    same_boot: bool = False

    def summary(self) -> dict[str, Any]:
        return {"bindings": len(self.bindings), "visitors": len(self.visitors),
                "identifications": len(self.identifications),
                "expired": len(self.expired_bindings) + len(self.expired_visitors),
                "torn": self.torn, "corrupt": self.corrupt, "same_boot": self.same_boot}


LiveKey = tuple[str, ...]


class Journal:
    """The append-only journal of one router's bindings and visitors (see the module).

    Use: :meth:`load` (what the last run left), restore the tables from it, :meth:`start`
    with what the tables now hold (writes the first snapshot), then attach the journal as
    the tables' observer: every change is one durable record from then on."""

    def __init__(self, path: str | os.PathLike[str], *, clock: Clock = time.monotonic,
                 wall_clock: Clock = time.time, boot_id: str | None = None,
                 min_records: int = MIN_RECORDS, factor: int = COMPACT_FACTOR,
                 durable: bool = True) -> None:
        if min_records < 1 or factor < 2:
            raise ValueError("min_records must be >= 1 and factor >= 2")
        self.path = Path(path)
        self.clock = clock
        self.wall_clock = wall_clock
        self.boot_id = read_boot_id() if boot_id is None else boot_id
        self.min_records = min_records
        self.factor = factor
        #: fdatasync each record (False only for benchmarks of the cost).
        self.durable = durable
        #: The live entries, as the records a snapshot would write.
        self._live: dict[LiveKey, dict[str, Any]] = {}
        self._fd: int | None = None
        #: Records in the file now (the header included).
        self.records = 0
        #: A write failed: the next try rewrites the whole snapshot.
        self._broken = False
        self._last_try = float("-inf")
        self._errors = RateLimitedLog(log, ERROR_LOG_INTERVAL, clock)
        self.stats = {"writes": 0, "compactions": 0, "errors": 0, "sync_s": 0.0}
        self.last_error = ""
        self.restored: Restored | None = None

    # --- reading -------------------------------------------------------------------------

    def load(self) -> Restored:
        """Read the journal (none yet: nothing) and return its live, unexpired entries with
        their remaining lifetimes on this process's clock."""
        out = Restored()
        self.restored = out
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return out
        except OSError as exc:
            self._error("read", "cannot read journal %s: %s; starting with empty tables",
                        self.path, exc)
            return out
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if st.st_uid != os.geteuid() or st.st_mode & 0o022 or not _is_regular(st.st_mode):
                self._error("untrusted", "journal %s is not a regular file of uid %d writable "
                            "by it alone (mode %o, uid %d); not restored", self.path,
                            os.geteuid(), st.st_mode & 0o7777, st.st_uid)
                return out
            entries, idents = self._replay(f, out)
        now, wall = self.clock(), self.wall_clock()
        for (kind, *_), (doc, exp_mono, exp_wall) in entries.items():
            remaining = (exp_mono - now) if out.same_boot else (exp_wall - wall)
            try:
                item = self._entry(kind, doc, now, remaining)
            except fields.FieldError as exc:
                out.corrupt += 1
                log.warning("journal %s: a %s record dropped: %s", self.path, kind, exc)
                continue
            alive = remaining > 0
            if kind == "b":
                (out.bindings if alive else out.expired_bindings).append(item)  # type: ignore[arg-type]
            else:
                (out.visitors if alive else out.expired_visitors).append(item)  # type: ignore[arg-type]
        out.identifications = idents
        if out.torn or out.corrupt:
            log.warning("journal %s: %d torn and %d corrupt line(s) skipped", self.path,
                        out.torn, out.corrupt)
        return out

    def _replay(self, f: Any, out: Restored
                ) -> tuple[dict[LiveKey, tuple[dict[str, Any], float, float]], dict[str, int]]:
        """Apply every line in order: the last record of each entry wins."""
        entries: dict[LiveKey, tuple[dict[str, Any], float, float]] = {}
        idents: dict[str, int] = {}
        first = True
        failed: Exception | None = None  # the previous line's failure, judged by what follows
        while True:
            line = f.readline(MAX_LINE + 1)
            if failed is not None:
                # A bad line followed by another is corruption; the last one was torn.
                if line:
                    out.corrupt += 1
                else:
                    out.torn += 1
                log.debug("journal %s: line skipped: %s", self.path, failed)
                failed = None
            if not line:
                break
            try:
                record = decode_line(line)
                self._apply(record, entries, idents, out, first)
            except (JournalError, fields.FieldError) as exc:
                failed = exc
                while len(line) > MAX_LINE and not line.endswith(b"\n"):
                    line = f.readline(MAX_LINE + 1)  # the rest of an overlong line
            first = False
        return entries, idents

    def _apply(self, record: dict[str, Any],
               entries: dict[LiveKey, tuple[dict[str, Any], float, float]],
               idents: dict[str, int], out: Restored, first: bool) -> None:
        kind = record["t"]
        if kind == "h":
            fields.integer(record.get("version"), "version", VERSION, VERSION)
            if first:
                out.same_boot = bool(self.boot_id) and record.get("boot") == self.boot_id
            return
        if kind in ("b", "v"):
            doc = binding_fields(record) if kind == "b" else visitor_fields(record)
            exp_mono = fields.number(record.get("exp_mono"), "exp_mono")
            exp_wall = fields.number(record.get("exp_wall"), "exp_wall")
            entries[(kind, doc["home_address"], doc["care_of_address"])] = (doc, exp_mono, exp_wall)
            if kind == "b":
                _max_ident(idents, doc["home_address"], doc["identification"])
        elif kind in ("-b", "-v"):
            home = _address(record.get("home_address"), "home_address")
            coa = _address(record.get("care_of_address"), "care_of_address")
            entries.pop((kind[1], home, coa), None)
        elif kind == "i":
            home = _address(record.get("home_address"), "home_address")
            _max_ident(idents, home, fields.integer(record.get("identification"),
                                                    "identification", 0, 2**64 - 1))
        else:
            raise JournalError(f"unknown record type {kind!r}")

    @staticmethod
    def _entry(kind: str, doc: dict[str, Any], now: float, remaining: float
               ) -> Binding | Visitor:
        """The table entry of a record, registered so that ``remaining`` seconds are left
        (never more than its lifetime) on the clock that reads ``now``."""
        left = min(max(remaining, 0.0), float(doc["lifetime"]))
        registered_at = now - (doc["lifetime"] - left)
        if kind == "b":
            return Binding(registered_at=registered_at, **doc)
        return Visitor(registered_at=registered_at, **doc)

    # --- writing -------------------------------------------------------------------------

    def start(self, bindings: Iterable[Binding] = (), visitors: Iterable[Visitor] = (),
              identifications: dict[str, int] | None = None) -> None:
        """Take what the tables hold now as the live entries and write them as the journal's
        first snapshot (which also drops what :meth:`load` skipped); open it for appending."""
        self._live.clear()
        for b in bindings:
            self._live[("b", b.home_address, b.care_of_address)] = self._binding_record(b)
        for v in visitors:
            self._live[("v", v.home_address, v.care_of_address)] = self._visitor_record(v)
        for home, ident in (identifications or {}).items():
            self._live[("i", home)] = {"t": "i", "home_address": home, "identification": ident}
        self._compact()

    def close(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None

    def binding_set(self, binding: Binding) -> None:
        record = self._binding_record(binding)
        self._live[("b", binding.home_address, binding.care_of_address)] = record
        # The binding carries the Identification accepted with it: no separate "i" record.
        self._live[("i", binding.home_address)] = {
            "t": "i", "home_address": binding.home_address,
            "identification": max(binding.identification,
                                  self._ident(binding.home_address))}
        self._append(record)

    def binding_removed(self, binding: Binding) -> None:
        self._remove("b", binding.home_address, binding.care_of_address)

    def identification(self, home_address: str, identification: int) -> None:
        key = ("i", home_address)
        if self._ident(home_address) == identification:
            return  # written with its binding just now
        record = {"t": "i", "home_address": home_address, "identification": identification}
        self._live[key] = record
        self._append(record)

    def visitor_set(self, visitor: Visitor) -> None:
        record = self._visitor_record(visitor)
        self._live[("v", visitor.home_address, visitor.care_of_address)] = record
        self._append(record)

    def visitor_removed(self, visitor: Visitor) -> None:
        self._remove("v", visitor.home_address, visitor.care_of_address)

    def retry(self) -> None:
        """Rewrite the journal if an earlier write failed (the role's housekeeping calls
        this, so a journal heals once the disk takes writes again, even with no change)."""
        if self._broken and self.clock() - self._last_try >= RETRY_INTERVAL:
            self._compact()

    def _ident(self, home_address: str) -> int:
        rec = self._live.get(("i", home_address))
        return rec["identification"] if rec is not None else -1

    def _remove(self, kind: str, home: str, coa: str) -> None:
        if self._live.pop((kind, home, coa), None) is not None:
            self._append({"t": f"-{kind}", "home_address": home, "care_of_address": coa})

    def _expiries(self, expires_at: float) -> dict[str, float]:
        """The absolute expiry on both clocks (see the module docstring)."""
        return {"exp_mono": expires_at,
                "exp_wall": self.wall_clock() + (expires_at - self.clock())}

    def _binding_record(self, b: Binding) -> dict[str, Any]:
        doc = {k: getattr(b, k) for k in ("home_address", "care_of_address", "care_of_name",
                                          "gre_key", "lifetime", "nai", "identification",
                                          "reverse_tunnel", "part", "network_prefix",
                                          "standby")}
        return {"t": "b", **doc, **self._expiries(b.expires_at)}

    def _visitor_record(self, v: Visitor) -> dict[str, Any]:
        doc = {k: getattr(v, k) for k in ("home_address", "home_agent", "local_address",
                                          "local_port", "local_name", "care_of_name",
                                          "lifetime", "gre_key", "care_of_address",
                                          "reverse_tunnel", "network_prefix",
                                          "local_interface")}
        return {"t": "v", **doc, **self._expiries(v.expires_at)}

    def _append(self, record: dict[str, Any]) -> None:
        if self._broken or self._fd is None:
            self.retry()
            return
        if self.records + 1 > max(self.min_records, self.factor * len(self._live)):
            self._compact()
            return
        line = encode_line(record)
        try:
            written = os.write(self._fd, line)
            if written != len(line):
                raise OSError(f"short write ({written} of {len(line)} bytes)")
            if self.durable:
                t0 = time.perf_counter()
                os.fdatasync(self._fd)
                self.stats["sync_s"] += time.perf_counter() - t0
        except OSError as exc:
            self._failed("write", exc)
            return
        self.records += 1
        self.stats["writes"] += 1

    def _compact(self) -> None:
        """Write the live, unexpired entries as a new journal (temp file, fsync, rename,
        fsync of the directory) and append to it from now on."""
        self._last_try = self.clock()
        now = self.clock()
        for key in [k for k, r in self._live.items()
                    if r["t"] in ("b", "v") and r["exp_mono"] <= now]:
            del self._live[key]  # the table expires it on its next tick anyway
        lines = [encode_line({"t": "h", "version": VERSION, "boot": self.boot_id,
                              "written": round(self.wall_clock(), 3)})]
        lines += [encode_line(r) for r in self._live.values()]
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self.close()
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600)
            try:
                os.fchmod(fd, 0o600)
                data = b"".join(lines)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            _fsync_dir(self.path.parent)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW
                               | os.O_CLOEXEC)
        except OSError as exc:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            self._failed("compact", exc)
            return
        if self._broken:
            log.warning("journal %s written again (%d entries) after %d failure(s)",
                        self.path, len(self._live), self.stats["errors"])
        self._broken = False
        self.records = len(lines)
        self.stats["compactions"] += 1

    def _failed(self, kind: str, exc: OSError) -> None:
        self._broken = True
        self.close()
        self.stats["errors"] += 1
        self.last_error = str(exc)
        self._error(kind, "journal %s: %s failed: %s; bindings and visitors are kept in memory "
                    "and the agent serves on, but a restart now would lose the changes since "
                    "(retried every %.0f s)", self.path, kind, exc, RETRY_INTERVAL)

    def _error(self, kind: str, msg: str, *args: Any) -> None:
        self._errors(kind, logging.ERROR, msg, *args)

    def status(self) -> dict[str, Any]:
        return {"path": str(self.path), "records": self.records, "live": len(self._live),
                "ok": not self._broken and self._fd is not None,
                "writes": self.stats["writes"], "compactions": self.stats["compactions"],
                "errors": self.stats["errors"], "last_error": self.last_error,
                "sync_ms_avg": round(1000 * self.stats["sync_s"] / self.stats["writes"], 3)
                if self.stats["writes"] else None,
                "restored": self.restored.summary() if self.restored else None}


def _max_ident(idents: dict[str, int], home: str, ident: int) -> None:
    idents[home] = max(ident, idents.get(home, -1))


def _is_regular(mode: int) -> bool:
    import stat

    return stat.S_ISREG(mode)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
