"""Open sockets inside a node's network namespace from the process that runs the network.

A socket belongs to the network namespace it was created in, for its whole life, whichever
namespace the process is in when it later sends or reads. So one process can hold sockets
in many nodes at once: a thread joins node A's namespace (``setns(2)`` changes only the
calling thread's), creates its sockets and ends; the sockets go on sending from A. That is
what lets :mod:`experiments.scale_registration` run a thousand objects' registration
clients, each sending real packets from its foreign network's host, from one process
instead of one interpreter per network (an interpreter costs ~0.13 s of CPU to start;
33 of them, on two cores, ate most of a 10 s budget).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading
from typing import Callable, TypeVar

from topologies.errors import TopologyError

log = logging.getLogger(__name__)

__all__ = ["NetnsError", "in_netns"]

#: ``CLONE_NEWNET`` from <sched.h>.
CLONE_NEWNET = 0x40000000

T = TypeVar("T")


class NetnsError(TopologyError):
    """A node's network namespace could not be joined (no such process, not root)."""


_libc: ctypes.CDLL | None = None


def _setns(fd: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def in_netns(pid: int, opener: Callable[[], T], timeout: float = 10.0) -> T:
    """Call ``opener()`` in a thread that has joined the network namespace of process ``pid``
    (a Mininet node's shell) and return what it returned: sockets it created stay in that
    namespace. The calling thread's namespace is never touched. Raises :class:`NetnsError`
    when the namespace cannot be joined, and whatever ``opener`` raised."""
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        raise NetnsError(f"node pid must be a positive int, got {pid!r}")
    out: dict[str, object] = {}

    def run() -> None:
        try:
            fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            out["error"] = NetnsError(f"cannot open the network namespace of pid {pid}: {exc}")
            return
        try:
            _setns(fd)
        except OSError as exc:
            out["error"] = NetnsError(f"cannot join the network namespace of pid {pid}: {exc}")
            return
        finally:
            os.close(fd)
        try:
            out["value"] = opener()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller as it is
            out["error"] = exc

    thread = threading.Thread(target=run, name=f"netns-{pid}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise NetnsError(f"opening sockets in the namespace of pid {pid} took over {timeout:g} s")
    if "error" in out:
        raise out["error"]  # type: ignore[misc]
    return out["value"]  # type: ignore[return-value]
