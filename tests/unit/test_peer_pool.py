"""Kept connections on TCP 4340 (issue 14): a client reuses one connection per peer, each
message still authenticated and replay-checked on its own; a message goes again only when it
provably was not read (or the caller says it is idempotent); both ends stay bounded."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest

from agent.core import peer as peer_mod
from agent.core.errors import ControlError
from agent.core.msgauth import sign_hmac
from agent.core.peer import (PeerError, PeerNotSent, PeerPool, PeerRefused, PeerServer,
                             RouterKeyAuth, goodbye, peer_call, read_message)
from agent.core.sealing import generate_keypair
from agent.core.wait import async_wait_until
from packets import ControlMessage, ControlType
from tests.unit.fakeclock import FakeClock

HERE = "127.0.0.1"
MIGRATE = ControlType.MIGRATE
KEY = os.urandom(32)


class Target:
    """A PeerServer on loopback whose handler authenticates like a router's and records
    what it accepted; ``gate`` (when set) holds every handler until it is set."""

    def __init__(self) -> None:
        self.private, self.public = generate_keypair()
        self.auth = RouterKeyAuth(KEY, [HERE], self.private)
        self.accepted: list[dict[str, Any]] = []
        self.running = 0
        self.most = 0
        self.gate: asyncio.Event | None = None
        self.server = PeerServer(self.handle, port=0, host=HERE)

    async def handle(self, msg: ControlMessage) -> dict[str, Any]:
        body = self.auth(msg)
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            if self.gate is not None:
                await self.gate.wait()
        finally:
            self.running -= 1
        self.accepted.append(body)
        return {"ok": True, "n": len(self.accepted)}

    async def call(self, body: dict[str, Any], pool: PeerPool, **kw: Any) -> dict[str, Any]:
        return await peer_call(HERE, MIGRATE, body, key=KEY, port=self.server.port, timeout=5,
                               seal_keys={HERE: self.public}, pool=pool, **kw)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_one_connection_carries_many_messages_each_authenticated_and_sealed() -> None:
    async def main() -> None:
        target, pool = Target(), PeerPool()
        await target.server.start()
        try:
            for i in range(3):  # state is sealed: opened by the target every time
                assert (await target.call({"action": "commit", "name": "c", "state": {"n": i}},
                                          pool))["n"] == i + 1
            assert (pool.opened, pool.reused) == (1, 2)
            assert target.server.connections == 1
            assert [b["state"]["n"] for b in target.accepted] == [0, 1, 2]
            # a message signed with another key on the same kept connection is refused
            with pytest.raises(PeerRefused, match="bad authenticator"):
                await peer_call(HERE, MIGRATE, {"action": "cancel", "name": "c"},
                                key=os.urandom(32), port=target.server.port, timeout=5, pool=pool)
            assert (pool.opened, pool.reused) == (1, 3) and len(target.accepted) == 3
            # the old path: a connection of its own, closed after the exchange
            await target.call({"action": "cancel", "name": "c"}, pool, reuse=False)
            assert (pool.opened, pool.reused) == (1, 3) and len(target.accepted) == 4
        finally:
            pool.close()
            await target.server.stop()

    run(main())


def test_a_replayed_message_on_a_kept_connection_is_refused() -> None:
    async def main() -> None:
        target = Target()
        await target.server.start()
        try:
            signed = sign_hmac(MIGRATE, 9, {"action": "cancel", "name": "c"}, KEY, to=HERE)
            frame = ControlMessage(MIGRATE, 9, signed).encode()
            reader, writer = await asyncio.open_connection(HERE, target.server.port)
            answers = []
            for _ in range(2):
                writer.write(frame)
                answers.append((await asyncio.wait_for(read_message(reader), 5)).body)
            writer.close()
            assert answers[0] == {"ok": True, "n": 1}
            assert answers[1]["ok"] is False and "replay" in answers[1]["error"]
            assert len(target.accepted) == 1
        finally:
            await target.server.stop()

    run(main())


def test_a_connection_the_server_closed_idle_is_replaced_before_anything_is_sent(monkeypatch) -> None:
    monkeypatch.setattr(peer_mod, "IDLE_TIMEOUT", 0.05)

    async def main() -> None:
        target, pool = Target(), PeerPool()
        await target.server.start()
        try:
            await target.call({"action": "cancel", "name": "c"}, pool)
            await async_wait_until(lambda: target.server.idle_closed == 1, 5,
                                   what="the server closed the idle connection")
            await async_wait_until(lambda: target.server.connections == 0, 5,
                                   what="the idle connection gone")
            assert target.server.malformed == 0  # idle is not malformed
            assert (await target.call({"action": "cancel", "name": "c"}, pool))["n"] == 2
            assert (pool.opened, pool.reused) == (2, 0)
        finally:
            pool.close()
            await target.server.stop()

    run(main())


def test_the_client_closes_idle_connections_and_bounds_what_it_keeps() -> None:
    async def main() -> None:
        clock = FakeClock(100.0)
        target, pool = Target(), PeerPool(per_peer=1, idle=10.0, clock=clock)
        await target.server.start()
        try:
            await target.call({"action": "cancel", "name": "c"}, pool)
            assert pool.idle_count() == 1
            clock.advance(10.0)
            await target.call({"action": "cancel", "name": "c"}, pool)  # too old: a new one
            assert (pool.opened, pool.reused) == (2, 0)
            clock.advance(10.0)
            assert pool.expire() == 1 and pool.idle_count() == 0
            await async_wait_until(lambda: target.server.connections == 0, 5,
                                   what="the expired connection closed at the server")
            # two at once: two connections; one is kept (per_peer=1), the other closed
            target.gate = asyncio.Event()
            calls = [asyncio.create_task(target.call({"action": "cancel", "name": "c"}, pool))
                     for _ in range(2)]
            await async_wait_until(lambda: target.running == 2, 5, what="both handlers running")
            target.gate.set()
            await asyncio.gather(*calls)
            assert pool.idle_count() == 1
            await async_wait_until(lambda: target.server.connections == 1, 5,
                                   what="the second connection closed")
        finally:
            pool.close()
            await target.server.stop()

    run(main())


def test_a_client_opens_at_most_max_open_connections_to_a_peer_at_once() -> None:
    async def main() -> None:
        target, pool = Target(), PeerPool(max_open=2)
        target.gate = asyncio.Event()
        await target.server.start()
        try:
            calls = [asyncio.create_task(target.call({"action": "cancel", "name": "c"}, pool))
                     for _ in range(5)]
            await async_wait_until(lambda: target.running == 2, 5, what="two handlers running")
            assert pool.lent((HERE, target.server.port)) == 2 and target.server.connections == 2
            target.gate.set()
            await asyncio.gather(*calls)
            assert target.most == 2 and len(target.accepted) == 5 and pool.opened == 2
            assert pool.lent((HERE, target.server.port)) == 0
        finally:
            pool.close()
            await target.server.stop()

    run(main())


def test_a_server_at_its_bound_closes_an_idle_kept_connection_with_a_goodbye() -> None:
    async def main() -> None:
        target = Target()
        target.server.max_per_peer = 2
        await target.server.start()
        pools = [PeerPool(), PeerPool()]
        try:
            for pool in pools:  # two kept connections, idle between messages
                await target.call({"action": "cancel", "name": "c"}, pool)
            assert target.server.connections == 2
            third = PeerPool()
            await target.call({"action": "cancel", "name": "c"}, third)  # room is made
            assert target.server.evicted == 1 and target.server.refused == 0
            # the evicted one's client finds it closed and opens another (nothing lost)
            answers = [await target.call({"action": "cancel", "name": "c"}, pool) for pool in pools]
            assert all(a["ok"] for a in answers) and len(target.accepted) == 5
            # busy connections are not evicted: a new one is refused at once
            target.gate = asyncio.Event()
            busy = [asyncio.create_task(target.call({"action": "cancel", "name": "c"}, p))
                    for p in (pools[0], third)]
            await async_wait_until(lambda: target.running == 2, 5, what="two handlers running")
            refused = target.server.refused
            with pytest.raises(PeerError):
                await target.call({"action": "cancel", "name": "c"}, PeerPool())
            assert target.server.refused == refused + 1
            target.gate.set()
            await asyncio.gather(*busy)
            for pool in [*pools, third]:
                pool.close()
        finally:
            await target.server.stop()

    run(main())


class Flaky:
    """A raw TCP 4340 stand-in: answers the first message of each connection; on a
    connection's second message it does ``second`` ('goodbye': answers a goodbye without
    acting; 'drop': acts on it, then closes without an answer)."""

    def __init__(self, second: str) -> None:
        self.second = second
        self.acted: list[str] = []
        self.port = 0
        self.server: asyncio.AbstractServer | None = None

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            n = 0
            while True:
                msg = await read_message(reader)
                n += 1
                if n == 2 and self.second == "goodbye":
                    writer.write(goodbye("room").encode())
                    await writer.drain()
                    return
                self.acted.append(msg.body["auth"]["nonce"])
                if n == 2 and self.second == "drop":
                    return
                writer.write(ControlMessage(msg.type, msg.txid, {"ok": True}).encode())
                await writer.drain()
        except asyncio.IncompleteReadError:
            return
        finally:
            writer.close()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self.serve, HERE, 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def call(self, pool: PeerPool, **kw: Any) -> dict[str, Any]:
        return await peer_call(HERE, MIGRATE, {"action": "commit", "name": "c"}, key=KEY,
                               port=self.port, timeout=5, pool=pool, **kw)


@pytest.mark.parametrize("idempotent", [False, True])
def test_a_goodbye_instead_of_the_answer_sends_the_message_again(idempotent: bool) -> None:
    async def main() -> None:
        flaky, pool = Flaky("goodbye"), PeerPool()
        await flaky.start()
        try:
            await flaky.call(pool)
            assert await flaky.call(pool, idempotent=idempotent) == {"ok": True}
            assert len(flaky.acted) == 2 and len(set(flaky.acted)) == 2  # re-signed
            assert pool.opened == 2
        finally:
            pool.close()
            flaky.server.close()

    run(main())


def test_a_message_that_may_have_been_acted_on_goes_again_only_when_idempotent() -> None:
    async def main() -> None:
        flaky, pool = Flaky("drop"), PeerPool()
        await flaky.start()
        try:
            await flaky.call(pool)
            with pytest.raises(PeerError, match="no valid answer") as err:
                await flaky.call(pool)  # a start, say: the target may have acted
            assert not isinstance(err.value, PeerNotSent)
            assert len(flaky.acted) == 2
            await flaky.call(pool)  # a new connection (the broken one was not kept)
            assert await flaky.call(pool, idempotent=True) == {"ok": True}
            assert len(flaky.acted) == 5 and len(set(flaky.acted)) == 5  # once more, re-signed
        finally:
            pool.close()
            flaky.server.close()

    run(main())


def test_an_answer_to_another_transaction_is_refused_and_its_connection_dropped() -> None:
    async def main() -> None:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            msg = await read_message(reader)
            writer.write(ControlMessage(msg.type, msg.txid + 1, {"ok": True}).encode())
            await writer.drain()

        server = await asyncio.start_server(serve, HERE, 0)
        pool = PeerPool()
        try:
            with pytest.raises(PeerError, match="transaction 6, not 5"):
                await peer_call(HERE, MIGRATE, {}, txid=5, port=server.sockets[0].getsockname()[1],
                                timeout=5, pool=pool)
            assert pool.idle_count() == 0
        finally:
            server.close()

    run(main())


def test_a_stopped_server_reads_no_more_messages_from_kept_connections() -> None:
    async def main() -> None:
        target, pool = Target(), PeerPool()
        await target.server.start()
        await target.call({"action": "cancel", "name": "c"}, pool)
        await target.server.stop()
        with pytest.raises(PeerNotSent):  # the kept one is closed, a new one is refused
            await target.call({"action": "cancel", "name": "c"}, pool)
        assert len(target.accepted) == 1

    run(main())


def test_the_loops_pool_closes_its_connections_when_the_loop_ends() -> None:
    seen: dict[str, Any] = {}

    async def main() -> None:
        target = Target()
        await target.server.start()
        await target.call({"action": "cancel", "name": "c"}, peer_mod.loop_pool())
        seen["pool"] = peer_mod.loop_pool()
        seen["conn"] = seen["pool"]._idle[(HERE, target.server.port)][0]

    run(main())
    assert seen["pool"].idle_count() == 0 and seen["conn"].writer.is_closing()


def test_pool_bounds_are_checked() -> None:
    with pytest.raises(ValueError):
        PeerPool(idle=0)
    with pytest.raises(ValueError):
        PeerPool(max_open=0)
    with pytest.raises(ControlError):  # an unauthenticated message is refused by the check
        RouterKeyAuth(KEY, [HERE])(ControlMessage(MIGRATE, 1, {}))


def test_the_environment_can_select_the_old_path(monkeypatch) -> None:
    async def main() -> tuple[int, int]:
        target, pool = Target(), PeerPool()
        await target.server.start()
        try:
            for _ in range(2):
                await target.call({"action": "cancel", "name": "c"}, pool)
            return pool.opened, pool.idle_count()
        finally:
            pool.close()
            await target.server.stop()

    monkeypatch.setenv(peer_mod.REUSE_ENV, "0")
    assert run(main()) == (0, 0)  # two connections of their own, none kept
    monkeypatch.setenv(peer_mod.REUSE_ENV, "1")
    assert run(main()) == (1, 1)
