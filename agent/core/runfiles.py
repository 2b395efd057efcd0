"""Writing a file of the run directory, and the one error for when that cannot be done.

The run directory (``/tmp/moat/<run-id>``) holds what an agent writes while it runs: its log,
its control socket, its journal (issue 13). A full disk or a read-only remount must not
crash the agent (it has bindings to serve) nor be lost in a bare ``OSError``:
:func:`write_private` raises :class:`RunDirError`, which says in words what is wrong, and the
caller logs it and serves on (the daemon's timers rate-limit a failure that repeats).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from agent.core.errors import AgentError

#: What each errno means for a run directory, in the words a log line uses.
REASONS = {
    errno.ENOSPC: "the run directory is full",
    errno.EDQUOT: "the run directory's quota is used up",
    errno.EROFS: "the run directory is read-only",
    errno.EACCES: "the run directory refuses the write (permissions)",
    errno.EPERM: "the run directory refuses the write (permissions)",
    errno.ENOENT: "the run directory is gone",
}


class RunDirError(AgentError):
    """A file of the run directory could not be written (full, read-only, gone)."""

    def __init__(self, path: Path | str, exc: OSError) -> None:
        self.path = Path(path)
        self.errno = exc.errno
        self.reason = REASONS.get(exc.errno or 0, exc.strerror or str(exc))
        super().__init__(f"cannot write {self.path}: {self.reason} ({exc.strerror or exc})")


def _write_all(fd: int, data: bytes) -> None:
    """``data`` to ``fd`` in full (``os.write`` may write less)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_private(path: Path | str, data: str | bytes, mode: int = 0o600, sync: bool = False) -> None:
    """``data`` at ``path``, ``mode`` from creation, atomically (a temporary file in the same
    directory renamed over it): readers see the old file or the new one, never half of one.
    Raises :class:`RunDirError` and leaves no temporary file behind."""
    path = Path(path)
    raw = data.encode() if isinstance(data, str) else bytes(data)
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as exc:
        raise RunDirError(path, exc) from None
    try:
        try:
            _write_all(fd, raw)
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise RunDirError(path, exc) from None


__all__ = ["RunDirError", "write_private", "REASONS"]
