"""agent.mobility.mipsocket on loopback: every datagram comes with its arrival interface
and destination address, and a reply can be sent from a chosen local address."""

from __future__ import annotations

import asyncio
import socket

from agent.mobility.mipsocket import MipSocket, parse_pktinfo


def test_datagrams_carry_interface_and_destination_and_replies_their_source() -> None:
    async def main() -> tuple[list, tuple]:
        loop = asyncio.get_running_loop()
        got: list = []
        arrived = asyncio.Event()

        def handler(data: bytes, addr: tuple, ifindex: int, dest: str) -> None:
            got.append((data, ifindex, dest))
            mip.sendto(b"answer", addr, dest)
            arrived.set()

        mip = MipSocket(loop, handler, port=0)
        port = mip.sock.getsockname()[1]
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        client.bind(("127.0.0.1", 0))
        client.setblocking(False)
        try:
            client.sendto(b"request", ("127.0.0.2", port))
            await asyncio.wait_for(arrived.wait(), 5)
            data, sender = await asyncio.wait_for(loop.sock_recvfrom(client, 100), 5)
        finally:
            client.close()
            mip.close()
        assert data == b"answer"
        return got, sender

    got, sender = asyncio.run(main())
    assert got == [(b"request", socket.if_nametoindex("lo"), "127.0.0.2")]
    assert sender[0] == "127.0.0.2"  # from the address the request was sent to


def test_no_pktinfo_is_unknown() -> None:
    assert parse_pktinfo([]) == (0, "")
