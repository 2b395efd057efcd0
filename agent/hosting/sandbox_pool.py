"""Prepared sandbox slots: what every object start needs but no object chooses, made ahead.

Before an object's first instruction the agent claims a uid of its own
(:mod:`agent.hosting.object_uids`: a scan of every process's uids under a machine-wide lock,
3-5 ms here), makes its private working directory (root's ``mkdir``, ``fchown``, ``fchmod``)
and its leaf cgroup in every hierarchy. None of it depends on the object, so a small pool of
*slots* holds them ready: a slot is one claimed identity (uid, gid, the agent-chosen name),
its working directory (made, owned by that uid, 0700, empty) and its cgroup (made under the
run's objects node in every hierarchy, named by the identity, no limits and no process yet).

Starting from a slot changes nothing of the confinement: the object still gets its own uid
(claimed for this agent as any other), its own new directory and cgroup (named as on the
path: ``moat-<run>-o<uid>-<random>``), its limits written into the cgroup before any code of
the object runs (:meth:`agent.hosting.cgroups.CgroupManager.configure`), and every namespace,
rlimit and fd step exactly as before. What :func:`claim` returns is what
``default_pool().claim()`` and ``make_workdir`` would have made; the slot's cgroup is kept by
the cgroup manager under the identity's name
(:meth:`~agent.hosting.cgroups.CgroupManager.prepare`) and taken by the object's sandbox,
whose ``create`` of that name writes its limits into it.

On the fork path (issue 14) a slot also holds a *prepared launcher*
(:class:`agent.hosting.forkserver.PreparedLauncher`, ``MOAT_SANDBOX_PREFORK``, default on):
forked ahead by the agent's fork server, it has taken the launcher's steps that depend on
nothing but the slot's cgroup (joined it, forked into a new PID namespace with its relay
outside, made its mount namespace and every filesystem read-only) and waits; the start that
takes the slot hands it the object's spec and fds (:func:`take_launcher`, the start's
``SandboxSpec.prepared``) for the rest of the same steps. It is in the cgroup before the
object's limits are written, and runs none of the object's code before they are.

The rules that keep slots apart:

* a slot is handed out once: :meth:`SlotPool.take` removes it from the pool, and its cgroup
  can be taken once (a second ``create`` of that name finds none kept and is refused by
  ``mkdir``), its launcher too (:meth:`SlotPool.take_launcher`); nothing is ever put back: an
  object's stop removes its directory, cgroup and uid claim as it always did, and the pool
  makes new ones; a slot whose launcher died meanwhile is discarded at the take, not used;
* a failed start releases what it took: the runtime removes the directory and gives the uid
  back as for an unpooled start, the sandbox removes the cgroup it took; a cgroup taken with
  its slot but never by a sandbox (the start failed in between) is removed at the next refill
  once its uid claim is gone (:meth:`SlotPool.sweep`);
* bounded: at most ``size`` idle slots per pool (``MOAT_SANDBOX_POOL``, default
  :data:`DEFAULT_SIZE`, at most :data:`MAX_SIZE`; 0 turns pooling off), one pool per objects
  directory and cgroup manager;
* refilled in the background, :data:`REFILL_DELAY` after the last take (a thread: the
  work is blocking file-system calls), so the preparation does not compete with the start
  that just took a slot; an empty pool is no error: the start prepares its own on the path;
* cleaned up: :meth:`SlotPool.close` (the agent's exit, ``atexit``; :func:`close_all`)
  ends every idle slot's launcher (and each one handed out that no start took), removes its
  cgroup (which waits until the launcher has gone) and directory and gives its uid back; a
  launcher whose start failed before its sandbox took it is ended at the next refill
  (:meth:`SlotPool.sweep`) once the runtime gave its uid back; after a crash the
  uid claims are stale with their agent, and ``moat clean`` removes the run's cgroups (by
  the run's own prefix only) and its directory.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from agent.core.errors import AgentError
from agent.hosting.cgroups import Cgroup, CgroupError, CgroupManager, CgroupVersion

log = logging.getLogger(__name__)

ENV_POOL = "MOAT_SANDBOX_POOL"
#: "0": slots hold no prepared launcher (each start forks its own from the fork server).
ENV_PREFORK = "MOAT_SANDBOX_PREFORK"
DEFAULT_SIZE = 2
MAX_SIZE = 16
#: Seconds after the last take before the pool is refilled: a move starts its object and
#: then waits for its first answer; preparing the next slot meanwhile would take the CPU
#: (two cores here) and the interpreter's lock from exactly that start.
REFILL_DELAY = 0.2


class SandboxPoolError(AgentError):
    """A slot misused (handed out twice) or a bad pool size."""


@dataclass
class Slot:
    """One prepared sandbox: the identity (:class:`~agent.hosting.object_uids.ObjectIdentity`),
    its working directory and its cgroup (None without usable cgroups). ``taken`` once it
    was handed out: never again."""

    identity: Any
    workdir: Path
    cgroup: Cgroup | None
    taken: bool = False
    #: Its prepared launcher (:class:`~agent.hosting.forkserver.PreparedLauncher`: forked
    #: ahead into its cgroup and namespaces), or None.
    launcher: Any = None


def pool_size(text: str | None = None) -> int:
    """The pool size ``MOAT_SANDBOX_POOL`` asks for (``text`` overrides it): 0 to
    :data:`MAX_SIZE`; unset means :data:`DEFAULT_SIZE`. SandboxPoolError otherwise."""
    text = os.environ.get(ENV_POOL) if text is None else text
    if text is None or text == "":
        return DEFAULT_SIZE
    if not text.strip().isdigit() or int(text) > MAX_SIZE:
        raise SandboxPoolError(f"{ENV_POOL} must be 0 to {MAX_SIZE}, not {text!r}")
    return int(text)


def _uses_cgroups(manager: CgroupManager | None) -> bool:
    return manager is not None and manager.version is not CgroupVersion.NONE


class SlotPool:
    """Up to ``size`` prepared slots for objects of ``objects_dir`` under ``manager``.

    ``uids`` claims and releases identities (the agent's
    :func:`~agent.hosting.object_uids.default_pool`, so the runtime's release of an object's
    uid is the same whether it came from a slot or not); ``make_dir``/``remove_dir`` make and
    remove a working directory (:func:`~agent.hosting.sandbox.make_workdir`,
    :func:`~agent.hosting.sandbox.remove_workdir`)."""

    def __init__(self, objects_dir: Path, manager: CgroupManager | None, size: int, *,
                 uids: Any, make_dir: Callable[..., Path], remove_dir: Callable[[Path], None],
                 refill_delay: float = REFILL_DELAY,
                 make_launcher: Callable[[Slot], Any] | None = None) -> None:
        if not 0 <= size <= MAX_SIZE:
            raise SandboxPoolError(f"pool size {size} is not 0 to {MAX_SIZE}")
        self.objects_dir = Path(objects_dir)
        self.manager = manager
        self.size = size
        self.uids = uids
        self.make_dir = make_dir
        self.remove_dir = remove_dir
        self.refill_delay = refill_delay
        #: Makes a slot's prepared launcher (None: the slot has none), or raises.
        self.make_launcher = make_launcher
        self.owner = os.getpid()
        self._idle: deque[Slot] = deque()
        #: name -> identity of a slot taken whose cgroup may not be taken yet
        self._handed: dict[str, Any] = {}
        #: working directory -> (name, launcher) of a slot taken whose start has not taken
        #: its launcher yet (:meth:`take_launcher`)
        self._launchers: dict[str, tuple[str, Any]] = {}
        self._lock = threading.Lock()
        self._fill_lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._full = threading.Event()
        self._closed = False
        self._due: float | None = None  # monotonic time of the next refill
        self._thread: threading.Thread | None = None
        self.prepared = 0  # slots made, for the tests and the benchmark

    # --- taking -------------------------------------------------------------------------

    def take(self) -> Slot | None:
        """An idle slot, now the caller's alone (None when there is none ready: the caller
        prepares its own). Schedules a refill."""
        stale: list[Slot] = []
        with self._lock:
            while True:
                slot = self._idle.popleft() if self._idle and not self._closed else None
                if slot is None:
                    break
                if slot.taken:
                    raise SandboxPoolError(f"slot {slot.identity.name} was handed out already")
                slot.taken = True
                if self._intact(slot):
                    if slot.cgroup is not None:
                        self._handed[slot.identity.name] = slot.identity
                    if slot.launcher is not None:
                        self._launchers[str(slot.workdir)] = (slot.identity.name, slot.launcher)
                    break
                stale.append(slot)  # removed under it (a VM's storage, its cgroups): not used
            self._schedule()
        for old in stale:
            log.warning("sandbox pool: slot %s was removed meanwhile: discarded", old.identity.name)
            self._discard(old)
        return slot

    @staticmethod
    def _intact(slot: Slot) -> bool:
        """The slot's directory and cgroup are still there (a few stats), and its prepared
        launcher, if it has one, still waits (a slot whose launcher died is not used)."""
        try:
            if not slot.workdir.is_dir() or slot.workdir.is_symlink():
                return False
        except OSError:
            return False
        if slot.launcher is not None and not slot.launcher.alive():
            return False
        return slot.cgroup is None or all(d.is_dir() for d in slot.cgroup.dirs)

    def take_launcher(self, workdir: Path) -> Any:
        """The prepared launcher of the slot taken with ``workdir``, now the caller's (the
        start's: it uses or closes it); None when it had none or it was taken already."""
        with self._lock:
            entry = self._launchers.pop(str(workdir), None)
        return entry[1] if entry is not None else None

    # --- preparing ----------------------------------------------------------------------

    def prepare(self) -> Slot:
        """One new slot (not yet in the pool); everything undone on a failure. The objects
        directory must exist (the first start made it): a pool never makes one again once
        it was removed (a run's or a VM's storage gone)."""
        if not self.objects_dir.is_dir():
            raise SandboxPoolError(f"{self.objects_dir} is not there (yet)")
        ident = self.uids.claim()
        workdir: Path | None = None
        cgroup = None
        try:
            workdir = self.make_dir(self.objects_dir, ident.name, ident.uid, ident.gid)
            cgroup = self.manager.prepare(ident.name) if _uses_cgroups(self.manager) else None
        except BaseException:
            self._undo(ident, workdir, cgroup)
            raise
        slot = Slot(ident, workdir, cgroup)
        if self.make_launcher is not None:
            try:
                slot.launcher = self.make_launcher(slot)
            except (AgentError, OSError) as exc:  # the slot serves without one
                log.warning("sandbox pool %s: no prepared launcher: %s", self.objects_dir, exc)
            except BaseException:
                self._discard(slot)
                raise
        return slot

    def fill(self) -> int:
        """Prepare slots until ``size`` are idle; how many were made. A failure is logged
        and ends this fill (the next take schedules another)."""
        made = 0
        with self._fill_lock:
            self.sweep()
            while True:
                with self._lock:
                    if self._closed or len(self._idle) >= self.size:
                        self._full.set()
                        return made
                try:
                    slot = self.prepare()
                except SandboxPoolError as exc:
                    log.debug("sandbox pool: %s", exc)
                    return made
                except (AgentError, OSError) as exc:
                    log.warning("sandbox pool %s: cannot prepare a slot: %s", self.objects_dir, exc)
                    return made
                with self._lock:
                    if self._closed:
                        self._discard(slot)
                        return made
                    self._idle.append(slot)
                    self.prepared += 1
                made += 1

    def sweep(self) -> list[str]:
        """Remove the cgroups of slots taken whose start failed before a sandbox took the
        cgroup (their uid claim is gone: the runtime released it). Returns their names."""
        claims = getattr(self.uids, "claims", None)
        if claims is None:
            return []
        untaken = self.manager.prepared() if self.manager is not None else set()
        with self._lock:
            for name in set(self._handed) - untaken:  # its sandbox took it: nothing to do
                del self._handed[name]
            handed = dict(self._handed)
            launchers = dict(self._launchers)
        if not handed and not launchers:
            return []
        held = claims()
        gone = [name for name, ident in handed.items()
                if held.get(ident.uid, {}).get("name") != name]
        held_names = {claim.get("name") for claim in held.values()}
        for workdir, (name, launcher) in launchers.items():
            if name not in held_names:  # its start failed before its sandbox started
                with self._lock:
                    self._launchers.pop(workdir, None)
                launcher.close()
        for name in gone:
            with self._lock:
                self._handed.pop(name, None)
            self._unprepare(name)
        return gone

    def _schedule(self) -> None:
        """(under the lock) A refill :attr:`refill_delay` from now, by the pool's thread."""
        if self._closed or self.size == 0 or len(self._idle) >= self.size:
            return
        self._full.clear()
        self._due = _now() + self.refill_delay
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._refiller, daemon=True,
                                            name=f"sandbox-pool {self.objects_dir.name}")
            self._thread.start()
        self._wake.notify_all()

    def _refiller(self) -> None:
        while True:
            with self._lock:
                while not self._closed and (self._due is None or _now() < self._due):
                    self._wake.wait(None if self._due is None else max(0.0, self._due - _now()))
                if self._closed:
                    return
                self._due = None
            self.fill()

    def wait_full(self, timeout: float) -> bool:
        """Until ``size`` slots are idle (a refill scheduled now if one is due)."""
        with self._lock:
            if len(self._idle) < self.size and not self._closed:
                self._schedule()
                self._due = _now()
                self._wake.notify_all()
        return self._full.wait(timeout)

    def idle(self) -> int:
        with self._lock:
            return len(self._idle)

    # --- cleaning -----------------------------------------------------------------------

    def close(self) -> None:
        """Stop refilling; remove every idle slot (cgroup, directory, uid claim) and every
        cgroup handed out but never taken. Idempotent."""
        with self._lock:
            self._closed = True
            self._wake.notify_all()
            idle, self._idle = list(self._idle), deque()
            handed, self._handed = dict(self._handed), {}
            launchers, self._launchers = dict(self._launchers), {}
        for _name, launcher in launchers.values():
            launcher.close()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(10)
        with self._fill_lock:  # a fill that was under way has put its slot back or discarded it
            with self._lock:
                idle += list(self._idle)
                self._idle.clear()
        for slot in idle:
            self._discard(slot)
        for name in handed:
            self._unprepare(name)
        self._full.set()

    def _discard(self, slot: Slot) -> None:
        if slot.launcher is not None:
            slot.launcher.close()  # (the cgroup's removal below waits until it has gone)
        self._undo(slot.identity, slot.workdir, slot.cgroup)

    def _undo(self, ident: Any, workdir: Path | None, cgroup: Cgroup | None) -> None:
        if cgroup is not None:
            self._unprepare(ident.name)
            self._remove_cgroup(cgroup)
        if workdir is not None:
            try:
                self.remove_dir(workdir)
            except (AgentError, OSError) as exc:
                log.warning("sandbox pool: %s", exc)
        try:
            self.uids.release(ident)
        except (AgentError, OSError) as exc:
            log.warning("sandbox pool: uid %d not released: %s", ident.uid, exc)

    def _unprepare(self, name: str) -> None:
        """Remove the cgroup kept for ``name`` unless an object's sandbox took it."""
        cg = self.manager.unprepare(name) if self.manager is not None else None
        if cg is not None:
            self._remove_cgroup(cg)

    @staticmethod
    def _remove_cgroup(cgroup: Cgroup) -> None:
        try:
            cgroup.remove()
        except CgroupError as exc:
            log.warning("sandbox pool: %s", exc)


def _now() -> float:
    import time

    return time.monotonic()


# --- the agent's pools ------------------------------------------------------------------------

#: At most this many pools per process (an agent has one, each VM of a router one more);
#: the least recently used is closed for a new one, so idle slots stay bounded in all.
MAX_POOLS = 4
_pools: dict[tuple[str, int], SlotPool] = {}  # in order of use, the last used last
_pools_lock = threading.Lock()
_atexit = False


def pool_for(objects_dir: Path, manager: CgroupManager | None) -> SlotPool | None:
    """This process's pool for ``objects_dir`` and ``manager`` (made, and filled in the
    background, at the first call); None when pooling is off (``MOAT_SANDBOX_POOL=0``)."""
    global _atexit
    size = pool_size()
    if size == 0:
        return None
    key = (str(Path(objects_dir).resolve()), id(manager))
    evicted: list[SlotPool] = []
    with _pools_lock:
        pool = _pools.pop(key, None)
        if pool is not None and (pool.owner != os.getpid() or pool.manager is not manager):
            evicted.append(pool)  # a forked child's copy, or a manager gone and its id reused
            pool = None
        if pool is None:
            from agent.hosting.object_uids import default_pool
            from agent.hosting.sandbox import make_workdir, remove_workdir

            from agent.hosting.sandbox import start_mode

            # Prepared launchers for the fork path only (as the process starts objects when
            # its pool is made: an agent's way is fixed by its environment).
            forking = prefork() and start_mode() == "fork"
            pool = SlotPool(objects_dir, manager, size, uids=default_pool(),
                            make_dir=make_workdir, remove_dir=remove_workdir,
                            make_launcher=_prepared_launcher if forking else None)
            while len(_pools) >= MAX_POOLS:
                evicted.append(_pools.pop(next(iter(_pools))))
            if not _atexit:
                atexit.register(close_all)
                _atexit = True
        _pools[key] = pool
    for old in evicted:
        if old.owner == os.getpid():
            old.close()
    return pool


def claim(objects_dir: Path, manager: CgroupManager | None) -> tuple[Any, Path]:
    """An object's identity and its new working directory: a prepared slot's when one is
    ready, else made now (``default_pool().claim()`` and ``make_workdir``, as before). The
    slot's cgroup waits, kept by ``manager``, for the object's sandbox to create it."""
    pool = pool_for(objects_dir, manager)
    slot = pool.take() if pool is not None else None
    if slot is not None:
        return slot.identity, slot.workdir
    from agent.hosting.object_uids import default_pool
    from agent.hosting.sandbox import make_workdir

    ident = default_pool().claim()
    try:
        return ident, make_workdir(Path(objects_dir), ident.name, ident.uid, ident.gid)
    except BaseException:
        default_pool().release(ident)
        raise


def prefork(text: str | None = None) -> bool:
    """Whether slots get a prepared launcher (``MOAT_SANDBOX_PREFORK``, ``text`` overrides
    it): "1" (the default) or "0". SandboxPoolError otherwise."""
    text = os.environ.get(ENV_PREFORK) if text is None else text
    if text is None or text == "":
        return True
    if text.strip() not in ("0", "1"):
        raise SandboxPoolError(f"{ENV_PREFORK} must be 0 or 1, not {text!r}")
    return text.strip() == "1"


def _prepared_launcher(slot: Slot) -> Any:
    """A slot's launcher, forked ahead by this agent's fork server (started here if it has
    not been)."""
    from agent.hosting.forkserver import default_server, prepare_launcher
    from agent.hosting.sandbox import launcher_env

    procs = [str(p) for p in slot.cgroup.procs_files()] if slot.cgroup is not None else []
    return prepare_launcher(default_server(launcher_env()), procs)


def take_launcher(workdir: Path) -> Any:
    """The prepared launcher of the slot that was taken with ``workdir`` (None when it had
    none): the start's now, which uses it or closes it."""
    with _pools_lock:
        pools = list(_pools.values())
    for pool in pools:
        launcher = pool.take_launcher(workdir)
        if launcher is not None:
            return launcher
    return None


def close_all() -> None:
    """Close every pool of this process (the agent's stop, and at exit)."""
    with _pools_lock:
        pools = [p for p in _pools.values() if p.owner == os.getpid()]
        _pools.clear()
    for pool in pools:
        pool.close()
