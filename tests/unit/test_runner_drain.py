"""A held object's final checkpoint has every request the kernel delivered to it (issue 18:
make-before-break loses nothing). The object's loop reads one datagram per turn, so a request
delivered just before the router took the home address away may still sit in the socket when
the final checkpoint is asked for; it must be read then, not lost with the process.

Real UDP on loopback: the socket buffer is the kernel's, as in a run."""

from __future__ import annotations

import asyncio
import socket

from agent.hosting.runner import ObjectServer, control_commands, start_service
from agent.objects.counter import Counter
from packets import ControlMessage, ControlType


def request(seq: int, client: str = "co12") -> bytes:
    body = {"client": client, "seq": seq, "op": "incr"}
    return ControlMessage(ControlType.SERVICE_REQUEST, seq, body).encode()


async def _held_checkpoint(command: str, sent: int) -> tuple[dict, ObjectServer]:
    server = ObjectServer(Counter(), "counter", "r18b", warm=False)
    transport, tcp = await start_service(server, "127.0.0.1", 0)
    port = transport.get_extra_info("sockname")[1]
    commands = control_commands(server, asyncio.Event())
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        commands["hold"]({})
        for seq in range(1, sent + 1):        # delivered, but the loop has not run since
            client.sendto(request(seq), ("127.0.0.1", port))
        state = commands[command]({})
    finally:
        client.close()
        transport.close()
        if tcp is not None:
            tcp.close()
    return state, server


def test_the_final_checkpoint_of_a_held_object_has_what_its_socket_still_held() -> None:
    state, server = asyncio.run(_held_checkpoint("get_state", 3))
    assert [entry[1]["seq"] for entry in state["pending"]] == [1, 2, 3]
    assert server.stats["queued"] == 3 and server.stats["served"] == 0


def test_a_stop_checkpoints_what_its_socket_still_held() -> None:
    state, _ = asyncio.run(_held_checkpoint("stop", 2))
    assert [entry[1]["seq"] for entry in state["pending"]] == [1, 2]


def test_a_serving_object_is_not_drained_by_a_checkpoint() -> None:
    """Only a held (or warm) object reads ahead: a pre-copy of a serving one leaves its
    requests to its loop, which answers them."""
    async def scenario() -> tuple[dict, int]:
        server = ObjectServer(Counter(), "counter", "r18b", warm=False)
        transport, tcp = await start_service(server, "127.0.0.1", 0)
        port = transport.get_extra_info("sockname")[1]
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        client.sendto(request(1), ("127.0.0.1", port))
        state = control_commands(server, asyncio.Event())["get_state"]({})
        drained = server.drain()
        client.close()
        transport.close()
        if tcp is not None:
            tcp.close()
        return state, drained

    state, drained = asyncio.run(scenario())
    assert state["pending"] == [] and drained == 0
