"""The process's default netlink worker over a fake kernel (an object with IPRoute's methods
that a test needs), for unit tests of code that changes the kernel through
:mod:`agent.core.netlink`."""

from __future__ import annotations

import contextlib
from typing import Iterator, TypeVar

from agent.core import netlink
from agent.core.netlink import Netlink

K = TypeVar("K")


@contextlib.contextmanager
def default_worker_over(fake: K) -> Iterator[K]:
    """While inside, ``netlink.default()`` runs every operation on ``fake``."""
    worker = Netlink(lambda: fake, timeout=5)
    old = netlink.use(worker)
    try:
        yield fake
    finally:
        netlink.use(old)
        worker.close()
