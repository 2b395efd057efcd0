"""Everything that touches the kernel: cgroupfs reads and writes, mkdir/rmdir, killing processes.

The primitives (``_read``, ``_write``, ``_mkdir``, ``_rmdir``, ``_kill``) are module
functions so that the unit tests can put a small fake kernel behind a fake tree by patching
them on this module; every other cgroup module reaches them only through the helpers here
(or as ``kernel._rmdir``), so the patch reaches them all. The helpers turn an ``OSError``
into a :class:`~agent.hosting.cgroups.base.CgroupError` that names the file, parse the
``key value`` interface files, retry an ``rmdir`` while the kernel still reaps a process,
and SIGKILL a cgroup's processes without ever signalling a reused pid.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path

from agent.hosting.cgroups.base import CgroupError

__all__ = [
    "read_file",
    "read_optional",
    "write_file",
    "parse_keyed",
    "kill_procs",
    "rmdir_retry",
]


def _read(path: Path) -> str:
    with open(path, encoding="ascii", errors="replace") as f:
        return f.read()


def _write(path: Path, value: str) -> None:
    with open(path, "w", encoding="ascii") as f:
        f.write(value)


def _mkdir(path: Path) -> None:
    os.mkdir(path)


def _rmdir(path: Path) -> None:
    os.rmdir(path)


def _kill(pid: int, sig: int) -> None:
    os.kill(pid, sig)


def _error(what: str, path: Path, exc: OSError) -> CgroupError:
    hint = ""
    if exc.errno == errno.EBUSY and path.name == "cgroup.subtree_control":
        hint = " (cgroup v2: this cgroup still holds processes)"
    return CgroupError(f"cannot {what} {path}: {exc.strerror or exc}{hint}", exc.errno)


def read_file(path: Path) -> str:
    try:
        return _read(path)
    except OSError as exc:
        raise _error("read", path, exc) from None


def read_optional(path: Path) -> str | None:
    """The file's text, or None when it does not exist (an absent controller or feature)."""
    try:
        return _read(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _error("read", path, exc) from None


def write_file(path: Path, value: str) -> None:
    try:
        _write(path, value)
    except OSError as exc:
        raise _error(f"write {value!r} to", path, exc) from None


def _int_or_none(text: str | None) -> int | None:
    if text is None:
        return None
    text = text.strip()
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        raise CgroupError(f"not a number: {text!r}") from None


def parse_keyed(text: str | None) -> dict[str, int]:
    """``key value`` lines (cpu.stat, memory.events, memory.oom_control, pids.events)."""
    out: dict[str, int] = {}
    for line in (text or "").splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                out[parts[0]] = int(parts[1])
            except ValueError:
                continue
    return out


def kill_procs(list_procs, what: str, timeout: float) -> None:
    """SIGKILL the pids ``list_procs()`` gives until it gives none.

    A pid is opened as a pidfd first and signalled only if it is still listed after the
    open, so a pid that exited and was reused by an unrelated process is never signalled.
    """
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        pids = list_procs()
        if not pids:
            return
        _signal_listed(pids, list_procs)
        if time.monotonic() > deadline:
            raise CgroupError(f"processes {pids[:8]} of {what} survive SIGKILL")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def _signal_listed(pids: list[int], list_procs) -> None:
    pidfd_open = getattr(os, "pidfd_open", None)
    send = getattr(signal, "pidfd_send_signal", None)
    if pidfd_open is None or send is None or _kill is not os.kill:
        for pid in pids:
            try:
                _kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return
    fds: dict[int, int] = {}
    try:
        for pid in pids:
            try:
                fds[pid] = pidfd_open(pid)
            except ProcessLookupError:
                continue
            except OSError:
                try:  # no pidfd support after all: plain kill
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        still = set(list_procs())
        for pid, fd in fds.items():
            if pid in still:
                try:
                    send(fd, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    finally:
        for fd in fds.values():
            os.close(fd)


def rmdir_retry(path: Path, timeout: float) -> None:
    """rmdir a cgroup directory; EBUSY (a process still exiting) is retried until timeout."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        try:
            _rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise _error("remove", path, exc) from None
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def _mkdir_checked(path: Path, exist_ok: bool) -> bool:
    """True when it made the directory."""
    try:
        _mkdir(path)
        return True
    except FileExistsError:
        if exist_ok:
            return False
        raise CgroupError(f"cgroup {path} exists already", errno.EEXIST) from None
    except OSError as exc:
        raise _error("create", path, exc) from None
