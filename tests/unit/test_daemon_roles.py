"""The daemon composes roles: dispatch tables, in-band authentication, the peer transport.

No root and no namespaces: the daemon is built from fake roles (its constructor reads only
interface indexes, so the tests use ``lo``), and the peer transport runs on loopback on an
ephemeral port.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from agent.core.config import AgentConfig, Interface
from agent.core.daemon import AgentDaemon
from agent.core.errors import AgentError, ControlError
from agent.core.msgauth import ReplayCache, sign_hmac
from agent.core.peer import PeerError, PeerRefused, PeerServer, RouterKeyAuth, peer_call
from agent.core.role import InBand, Periodic, Role
from packets import ControlMessage, ControlType

KEY = bytes(range(32))
ME = "127.0.0.1"  # the receiver's address, which router messages to it are signed for


def config() -> AgentConfig:
    return AgentConfig(name="r1", run_dir="/nonexistent", roles=[],
                       interfaces=[Interface(name="lo", address="127.0.0.1", prefix=8)])


class Echo(Role):
    name = "echo"

    def __init__(self, agent: Any) -> None:
        super().__init__(agent)
        self.served: list[dict] = []
        self.ticks = 0

    def cmd_echo(self, text: str) -> str:
        return text

    async def cmd_later(self, text: str) -> str:
        await asyncio.sleep(0)
        return text.upper()

    def housekeeping(self) -> None:
        self.ticks += 1

    def in_band(self) -> dict[ControlType, InBand]:
        return {ControlType.MIGRATE: InBand(self.on_migrate, RouterKeyAuth(KEY, {ME}))}

    async def on_migrate(self, msg: ControlMessage, body: dict) -> dict:
        self.served.append(body)
        return {"ok": True, "seen": body.get("n")}

    def status(self) -> dict[str, Any]:
        return {"echoes": len(self.served)}


class Clash(Role):
    name = "clash"

    def cmd_echo(self) -> str:
        return "mine"


class NotHere(Role):
    name = "not-here"

    @classmethod
    def wanted(cls, config: AgentConfig) -> bool:
        return False

    def cmd_ghost(self) -> str:
        return "boo"


def test_commands_come_from_the_roles_cmd_methods() -> None:
    daemon = AgentDaemon(config(), roles=[Echo, NotHere])
    assert asyncio.run(daemon.handle_command("echo", {"text": "hi"})) == "hi"
    assert asyncio.run(daemon.handle_command("later", {"text": "hi"})) == "HI"
    assert asyncio.run(daemon.handle_command("ping", {})) == "pong"
    with pytest.raises(ControlError, match="unknown command 'ghost'"):
        asyncio.run(daemon.handle_command("ghost", {}))  # its role is not wanted here
    assert daemon.role(NotHere) is None
    assert isinstance(daemon.require(Echo), Echo)
    with pytest.raises(ControlError, match="no not-here role"):
        daemon.require(NotHere)


def test_two_roles_serving_one_command_is_refused_at_start() -> None:
    with pytest.raises(AgentError, match="'echo' of role clash is already served by echo"):
        AgentDaemon(config(), roles=[Echo, Clash])


def test_status_merges_the_roles_parts() -> None:
    daemon = AgentDaemon(config(), roles=[Echo])
    status = asyncio.run(daemon.handle_command("status", {}))
    assert status["name"] == "r1" and status["echoes"] == 0 and status["malformed"] == 0


def test_housekeeping_reaches_every_role_even_after_one_fails() -> None:
    class Broken(Role):
        name = "broken"

        def housekeeping(self) -> None:
            raise RuntimeError("bug")

    daemon = AgentDaemon(config(), roles=[Broken, Echo])
    daemon.housekeeping()
    assert daemon.require(Echo).ticks == 1


def test_in_band_message_is_authenticated_before_its_handler_runs() -> None:
    daemon = AgentDaemon(config(), roles=[Echo])
    echo = daemon.require(Echo)
    signed = sign_hmac(ControlType.MIGRATE, 7, {"n": 1}, KEY, to=ME)
    answer = asyncio.run(daemon.on_peer_message(ControlMessage(ControlType.MIGRATE, 7, signed)))
    assert answer == {"ok": True, "seen": 1}
    assert echo.served == [{"n": 1}]  # the authenticator is stripped
    forged = sign_hmac(ControlType.MIGRATE, 8, {"n": 2}, b"\x00" * 32, to=ME)
    with pytest.raises(ControlError, match="MIGRATE refused"):
        asyncio.run(daemon.on_peer_message(ControlMessage(ControlType.MIGRATE, 8, forged)))
    with pytest.raises(ControlError, match="MIGRATE refused"):  # a replay of the first
        asyncio.run(daemon.on_peer_message(ControlMessage(ControlType.MIGRATE, 7, signed)))
    with pytest.raises(ControlError, match="MIGRATE refused"):  # no authenticator at all
        asyncio.run(daemon.on_peer_message(ControlMessage(ControlType.MIGRATE, 9, {"n": 3})))
    other = sign_hmac(ControlType.MIGRATE, 10, {"n": 4}, KEY, to="10.20.0.1")
    with pytest.raises(ControlError, match="not for this receiver"):  # for another router
        asyncio.run(daemon.on_peer_message(ControlMessage(ControlType.MIGRATE, 10, other)))
    assert echo.served == [{"n": 1}]


def test_in_band_type_no_role_serves_is_refused() -> None:
    daemon = AgentDaemon(config(), roles=[Echo])
    with pytest.raises(ControlError, match="unexpected in-band message PROVISION"):
        asyncio.run(daemon.on_peer_message(ControlMessage(ControlType.PROVISION, 1, {})))


def test_router_key_auth_checks_type_and_txid() -> None:
    auth = RouterKeyAuth(KEY, {ME}, cache=ReplayCache())
    body = sign_hmac(ControlType.MIGRATE, 1, {"a": 1}, KEY, to=ME)
    with pytest.raises(ControlError):  # same body, another type
        auth(ControlMessage(ControlType.STATE_TRANSFER, 1, body))
    with pytest.raises(ControlError):  # same body, another transaction id
        auth(ControlMessage(ControlType.MIGRATE, 2, body))
    assert auth(ControlMessage(ControlType.MIGRATE, 1, body)) == {"a": 1}


def test_router_key_auth_without_a_key_fails_closed() -> None:
    """Issue 12: a router without the run's key refuses every router message, signed or not."""
    auth = RouterKeyAuth(None, {ME}, cache=ReplayCache())
    for body in ({"a": 1}, sign_hmac(ControlType.MIGRATE, 1, {"a": 1}, KEY, to=ME)):
        with pytest.raises(ControlError, match="no router key"):
            auth(ControlMessage(ControlType.MIGRATE, 1, body))


def test_periodic_job_runs_at_once_and_survives_a_failure() -> None:
    calls: list[int] = []

    def job() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("first run fails")

    async def main() -> None:
        task = asyncio.create_task(AgentDaemon._every(Periodic("job", 0.001, job)))
        for _ in range(200):
            if len(calls) >= 3:
                break
            await asyncio.sleep(0.001)
        task.cancel()

    asyncio.run(main())
    assert len(calls) >= 3


# --- the peer transport on loopback --------------------------------------------------------

async def _exchange(handler: Any, body: dict, **kw: Any) -> dict:
    server = PeerServer(handler, port=0, host="127.0.0.1")
    await server.start()
    try:
        return await peer_call("127.0.0.1", ControlType.MIGRATE, body, port=server.port, timeout=5, **kw)
    finally:
        await server.stop()


def test_peer_call_returns_an_ok_answer() -> None:
    async def handler(msg: ControlMessage) -> dict:
        return {"ok": True, "echo": msg.body["x"], "txid": msg.txid}

    assert asyncio.run(_exchange(handler, {"x": 5}, txid=3)) == {"ok": True, "echo": 5, "txid": 3}


@pytest.mark.parametrize("answer", [{"ok": False, "error": "no room"}, {"error": "no ok field"},
                                    {"ok": "yes"}])
def test_peer_call_raises_on_an_answer_that_is_not_ok(answer: dict) -> None:
    async def handler(msg: ControlMessage) -> dict:
        return answer

    with pytest.raises(PeerRefused) as err:
        asyncio.run(_exchange(handler, {}))
    assert err.value.reason == str(answer.get("error", "?"))


def test_a_handler_exception_is_answered_as_a_refusal() -> None:
    async def handler(msg: ControlMessage) -> dict:
        raise ControlError("object busy")

    with pytest.raises(PeerRefused, match="object busy"):
        asyncio.run(_exchange(handler, {}))


def test_tcp_4340_serves_a_bounded_number_of_connections(monkeypatch) -> None:
    """Issue 12: connections that send nothing (or half a message) cannot pile up: beyond
    the limit new ones are closed at once, and a silent one is closed at the read deadline;
    then a real exchange is served again."""
    from agent.core import peer as peer_mod

    monkeypatch.setattr(peer_mod, "READ_DEADLINE", 0.3)

    async def handler(msg: ControlMessage) -> dict:
        return {"ok": True}

    async def main() -> None:
        server = PeerServer(handler, port=0, host="127.0.0.1")
        server.max_connections = 2
        await server.start()
        try:
            idle = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(2)]
            reader, _ = await asyncio.open_connection("127.0.0.1", server.port)
            assert await asyncio.wait_for(reader.read(), 2) == b""  # closed at once
            assert server.refused == 1
            for r, _ in idle:  # the silent ones go at the read deadline
                assert await asyncio.wait_for(r.read(), 2) == b""
            for _, w in idle:
                w.close()
            answer = await peer_call("127.0.0.1", ControlType.MIGRATE, {}, port=server.port,
                                     timeout=5)
            assert answer == {"ok": True}
            from agent.core.wait import async_wait_until

            # the client keeps its connection for the next message (issue 14) until its
            # pool closes it; then the server's side goes too
            assert server.connections == 1
            peer_mod.loop_pool().close()
            await async_wait_until(lambda: server.connections == 0, 2, interval=0.01,
                                   what="the served connection closed")
        finally:
            await server.stop()

    asyncio.run(main())


def test_peer_call_to_nobody_is_a_peer_error() -> None:
    async def main() -> None:
        server = PeerServer(lambda m: None, port=0, host="127.0.0.1")  # type: ignore[arg-type]
        await server.start()
        port = server.port
        await server.stop()
        await peer_call("127.0.0.1", ControlType.MIGRATE, {}, port=port, timeout=2)

    with pytest.raises(PeerError, match="unreachable"):
        asyncio.run(main())


def test_a_garbled_answer_is_a_peer_error() -> None:
    async def main() -> None:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read(100)
            writer.write(b"HTTP/1.0 200 OK\r\n\r\n")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            await peer_call("127.0.0.1", ControlType.MIGRATE, {}, port=port, timeout=2)
        finally:
            server.close()

    with pytest.raises(PeerError, match="no valid answer"):
        asyncio.run(main())


def test_an_in_band_answer_takes_the_type_its_role_names() -> None:
    class Lessor(Role):
        name = "lessor"

        def in_band(self) -> dict[ControlType, InBand]:
            async def grant(msg: ControlMessage, body: dict) -> dict:
                return {"ok": True}
            return {ControlType.LEASE_REQUEST: InBand(grant, lambda m: m.body,
                                                       answer=ControlType.LEASE_GRANT),
                    ControlType.SERVICE_LIST: InBand(grant, lambda m: m.body)}

    daemon = AgentDaemon(config(), roles=[Lessor])
    assert daemon.answer_type(ControlType.LEASE_REQUEST) == ControlType.LEASE_GRANT
    assert daemon.answer_type(ControlType.SERVICE_LIST) == ControlType.SERVICE_LIST
    assert daemon.answer_type(ControlType.MIGRATE) == ControlType.MIGRATE

    async def main() -> ControlMessage:
        from agent.core.peer import read_message

        server = PeerServer(daemon.on_peer_message, port=0, host="127.0.0.1",
                            answer_type=daemon.answer_type)
        await server.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(ControlMessage(ControlType.LEASE_REQUEST, 5, {}).encode())
            await writer.drain()
            answer = await asyncio.wait_for(read_message(reader), 5)
            writer.close()
            return answer
        finally:
            await server.stop()

    answer = asyncio.run(main())
    assert (answer.type, answer.txid, answer.body) == (ControlType.LEASE_GRANT, 5, {"ok": True})
