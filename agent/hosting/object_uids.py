"""A uid and gid of its own for every object, and the name of its working directory.

Objects must not share a uid: processes of one uid may signal, trace and read each other
(``/proc/<pid>/environ``, ``/proc/<pid>/root``) and write each other's files. So each object
runs as a uid (and the gid of the same number) taken from a dedicated range, by default
620000-629999 (``MOAT_OBJECT_UIDS=FIRST-LAST`` in the agent's environment changes it). No
passwd or group entry is made or needed; a uid that has one, that falls in a range of
``/etc/subuid`` or ``/etc/subgid`` (rootless containers), or that some process runs as
already is skipped, so an object never shares a uid with a user, a container or anything
else, and never runs as 0.

Unique on the machine, not only on the router: the routers of a Mininet run are agents on
one kernel. The claims live in a root-only directory (``/run/moat-object-uids``), one file
per uid naming the agent process that holds it (pid and start time), taken under an
``flock``; a claim whose agent has gone is stale and reused (its objects died with it: the
sandbox ties them to the agent). The lowest free uid is taken, so the numbers are easy to
follow in a log; the working directory's name is ``o<uid>-<random>``: chosen here, never
from a name a provider chose, and never the name of an earlier object's directory.
"""

from __future__ import annotations

import errno
import fcntl
import grp
import json
import logging
import os
import pwd
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from agent.core.errors import AgentError

log = logging.getLogger(__name__)

UID_FIRST, UID_LAST = 620000, 629999
REGISTRY = Path("/run/moat-object-uids")
ENV_RANGE = "MOAT_OBJECT_UIDS"
SUBID_FILES = (Path("/etc/subuid"), Path("/etc/subgid"))


class ObjectUidError(AgentError):
    """No uid could be given to an object (range exhausted, bad range, registry unusable)."""


@dataclass(frozen=True)
class ObjectIdentity:
    """Who an object runs as, and the agent-chosen name of its directory, log and cgroup."""

    uid: int
    gid: int
    name: str

    def describe(self) -> dict[str, int | str]:
        return {"uid": self.uid, "gid": self.gid, "sandbox": self.name}


def system_id_taken(uid: int) -> bool:
    """A user or group of this number exists (passwd/group, NSS included)."""
    for lookup in (pwd.getpwuid, grp.getgrgid):
        try:
            lookup(uid)
            return True
        except KeyError:
            pass
    return False


def subid_ranges(files: Iterable[Path] = SUBID_FILES) -> list[range]:
    """The ranges of ``/etc/subuid`` and ``/etc/subgid`` (``name:start:count`` lines)."""
    out = []
    for path in files:
        try:
            lines = Path(path).read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            parts = line.strip().split(":")
            if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
                out.append(range(int(parts[1]), int(parts[1]) + int(parts[2])))
    return out


def _start_time(pid: int, proc: Path) -> int | None:
    try:
        stat = (proc / str(pid) / "stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22: start time in clock ticks


def process_uids(proc: Path = Path("/proc")) -> set[int]:
    """Every real, effective, saved and filesystem uid and gid some process runs as now."""
    out: set[int] = set()
    for entry in os.scandir(proc):
        if not entry.name.isdigit():
            continue
        try:
            text = (Path(entry.path) / "status").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith(("Uid:", "Gid:")):
                out.update(int(x) for x in line.split()[1:])
    return out


def parse_range(text: str) -> tuple[int, int]:
    """``FIRST-LAST`` (both included, 1000 < FIRST <= LAST < 2^31)."""
    first, sep, last = text.partition("-")
    if not sep or not first.strip().isdigit() or not last.strip().isdigit():
        raise ObjectUidError(f"{ENV_RANGE} must be FIRST-LAST, not {text!r}")
    lo, hi = int(first), int(last)
    if not 1000 < lo <= hi < 2 ** 31:
        raise ObjectUidError(f"{ENV_RANGE}={text!r}: need 1000 < FIRST <= LAST < 2^31")
    return lo, hi


class UidPool:
    """Claims and releases object uids, unique on this machine while the claim holds.

        ident = pool.claim()       # ObjectIdentity(uid, gid, name), logged
        ...                        # the object runs as ident.uid in .../ident.name
        pool.release(ident)        # once it has stopped and its processes are gone
    """

    def __init__(self, first: int = UID_FIRST, last: int = UID_LAST, *,
                 registry: Path = REGISTRY, proc: Path = Path("/proc"),
                 taken: Callable[[int], bool] = system_id_taken,
                 reserved: Callable[[], list[range]] = subid_ranges,
                 in_use: Callable[[], set[int]] | None = None,
                 owner_pid: int | None = None) -> None:
        if not 0 < first <= last:
            raise ObjectUidError(f"bad uid range {first}-{last}")
        self.first, self.last = first, last
        self.registry = Path(registry)
        self.proc = Path(proc)
        self.taken = taken
        self.reserved = reserved
        self.in_use = in_use if in_use is not None else (lambda: process_uids(self.proc))
        self.owner_pid = owner_pid if owner_pid is not None else os.getpid()

    @classmethod
    def from_env(cls, **kw) -> UidPool:
        text = os.environ.get(ENV_RANGE)
        first, last = parse_range(text) if text else (UID_FIRST, UID_LAST)
        return cls(first, last, **kw)

    def _open_registry(self) -> int:
        try:
            self.registry.mkdir(mode=0o700, parents=True, exist_ok=True)
            st = self.registry.lstat()
            if not self.registry.is_dir() or self.registry.is_symlink() or \
                    st.st_uid != os.geteuid() or st.st_mode & 0o077:
                raise ObjectUidError(f"{self.registry} must be a directory of uid "
                                     f"{os.geteuid()}, mode 0700")
            return os.open(self.registry / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
                           | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            raise ObjectUidError(f"uid registry {self.registry}: {exc}") from None

    def _alive(self, claim: dict) -> bool:
        pid, start = claim.get("pid"), claim.get("start")
        return isinstance(pid, int) and pid > 0 and start is not None \
            and _start_time(pid, self.proc) == start

    def claims(self) -> dict[int, dict]:
        """The claims held now (stale ones, of agents that have gone, left out)."""
        out = {}
        for entry in self.registry.iterdir() if self.registry.is_dir() else ():
            if not entry.name.isdigit():
                continue
            try:
                claim = json.loads(entry.read_text())
            except (OSError, ValueError):
                claim = {}
            if isinstance(claim, dict) and self._alive(claim):
                out[int(entry.name)] = claim
        return out

    def claim(self) -> ObjectIdentity:
        """The lowest free uid of the range, claimed for this agent process."""
        lock = self._open_registry()
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            held = self.claims()
            reserved = self.reserved()
            running = self.in_use()
            for uid in range(self.first, self.last + 1):
                if uid in held or uid in running or any(uid in r for r in reserved) \
                        or self.taken(uid):
                    continue
                ident = ObjectIdentity(uid, uid, f"o{uid}-{secrets.token_hex(4)}")
                self._write_claim(ident)
                log.info("object uid %d claimed (%s)", uid, ident.name)
                return ident
            raise ObjectUidError(f"no free object uid in {self.first}-{self.last} "
                                 f"({len(held)} held by running agents)")
        finally:
            os.close(lock)  # releases the flock

    def _write_claim(self, ident: ObjectIdentity) -> None:
        path = self.registry / str(ident.uid)
        body = json.dumps({"pid": self.owner_pid, "start": _start_time(self.owner_pid, self.proc),
                           "name": ident.name}).encode()
        try:
            path.unlink()  # a stale claim (checked under the lock)
        except FileNotFoundError:
            pass
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            os.write(fd, body)
        finally:
            os.close(fd)

    def release(self, ident: ObjectIdentity) -> None:
        """Give the uid back (only this agent's claim of it, for that object)."""
        lock = self._open_registry()
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            path = self.registry / str(ident.uid)
            try:
                claim = json.loads(path.read_text())
            except FileNotFoundError:
                return
            except (OSError, ValueError):
                claim = {}
            if isinstance(claim, dict) and claim.get("name") == ident.name \
                    and claim.get("pid") == self.owner_pid:
                try:
                    path.unlink()
                except OSError as exc:
                    if exc.errno != errno.ENOENT:
                        raise
                log.info("object uid %d released (%s)", ident.uid, ident.name)
        finally:
            os.close(lock)


_default: UidPool | None = None


def default_pool() -> UidPool:
    """The agent's pool (range from ``MOAT_OBJECT_UIDS``, registry ``/run/moat-object-uids``)."""
    global _default
    if _default is None or _default.owner_pid != os.getpid():
        _default = UidPool.from_env()
    return _default
