"""TCP clients of a running object: where a request that came over TCP is answered.

Objects serve UDP and TCP on one address and port (:mod:`agent.hosting.runner`); a reply too
big for a datagram is fetched again over TCP. This module holds what a TCP connection needs
beyond the shared request path: its queued-request count, and the bound on replies a client
leaves unread.
"""

from __future__ import annotations

import asyncio
import logging

from packets.control import MAX_BODY

log = logging.getLogger(__name__)

#: Reply bytes a TCP client may leave unread before its connection is dropped: replies are
#: remembered for duplicates, so a client that keeps asking and never reads would otherwise
#: grow the object's memory without bound.
STREAM_BACKLOG_LIMIT = 2 * MAX_BODY


class StreamPeer:
    """Where a request that came over TCP is answered: the connection it came on.

    A UDP request is answered at its source address, a plain ``(host, port)`` tuple, which is
    also what a checkpoint carries for requests still pending. A connection cannot move with
    the object, so requests queued from one stay out of the checkpoint: when this instance
    stops, the connection closes, and the client asks again (same client and sequence number,
    which the next instance's filter serves once).
    """

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.label = str(writer.get_extra_info("peername"))
        #: Requests of this connection in the warm-up queue, not answered yet.
        self.pending = 0
        self._settled = asyncio.Event()
        self._settled.set()

    def queued(self) -> None:
        self.pending += 1
        self._settled.clear()

    def dequeued(self) -> None:
        self.pending -= 1
        if self.pending <= 0:
            self.pending = 0
            self._settled.set()

    async def settled(self) -> None:
        """Until none of this connection's requests waits in the queue any more."""
        await self._settled.wait()

    def send(self, data: bytes) -> None:
        """Queue one encoded reply on the connection (a closed one drops it: the reply stays
        remembered for a client that asks again)."""
        if self.writer.is_closing():
            return
        backlog = self.writer.transport.get_write_buffer_size()
        if backlog > STREAM_BACKLOG_LIMIT:
            log.info("TCP client %s leaves %d reply bytes unread: dropping the connection",
                     self.label, backlog)
            self.writer.transport.abort()
            return
        self.writer.write(data)

    def __repr__(self) -> str:
        return f"StreamPeer({self.label})"
