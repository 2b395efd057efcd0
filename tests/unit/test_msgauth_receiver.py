"""Router messages are for their receiver: signed for its address, their secrets sealed for its
key, refused by any other router, and never accepted twice (issue 12, items 1 and 3).

The peer transport runs on loopback; the roles are the real MigrationRole and
DistributionRole with fakes behind them."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

import pytest

from agent.core.config import AgentConfig, BrokerConfig, Interface, PeerRouter
from agent.core.errors import ControlError
from agent.core.msgauth import ReplayCache, sign_hmac
from agent.core.peer import PeerError, PeerRefused, PeerServer, RouterKeyAuth, peer_call
from agent.core.sealing import SEALED, generate_keypair, seal_body
from agent.distribution.role import DistributionRole
from agent.hosting.migration import MigrationRole
from agent.vm.manager import VmBaseline
from agent.vm.role import VmRole
from packets import ControlMessage, ControlType

KEY = bytes(range(32))
HERE = "127.0.0.1"
CONFIG = {"name": "counter", "home_address": "10.16.0.100", "home_agent": "10.16.0.2",
          "nai": "counter@home.moat", "mobile_home": {"spi": 256, "key": "a1" * 32},
          "mobile_foreign": {"spi": 1000, "key": "b2" * 32}}


def exchange(auth: RouterKeyAuth, body: dict, ctype: ControlType = ControlType.MIGRATE,
             **kw: Any) -> tuple[dict, list[bytes], list[dict]]:
    """One peer_call to a PeerServer on loopback whose handler authenticates with ``auth``;
    returns the answer, the raw frames the server received and the bodies it accepted."""
    raw: list[bytes] = []
    accepted: list[dict] = []

    async def handler(msg: ControlMessage) -> dict:
        raw.append(msg.encode())
        accepted.append(auth(msg))
        return {"ok": True}

    async def main() -> dict:
        server = PeerServer(handler, port=0, host=HERE)
        await server.start()
        try:
            return await peer_call(HERE, ctype, body, port=server.port, timeout=5, **kw)
        finally:
            await server.stop()

    return asyncio.run(main()), raw, accepted


def test_a_migrate_start_crosses_the_wire_sealed_and_arrives_whole() -> None:
    private, public = generate_keypair()
    auth = RouterKeyAuth(KEY, {HERE}, private)
    body = {"action": "start", "spec": "agent.objects.counter:Counter", "warm": True,
            "config": CONFIG, "state": {"count": 3}}
    answer, raw, accepted = exchange(auth, body, key=KEY, seal_keys={HERE: public}, txid=4)
    assert answer == {"ok": True}
    assert accepted == [body]  # the handler sees the whole body, secrets opened
    frame = raw[0]
    for secret in (b"a1" * 32, b"b2" * 32, KEY.hex().encode(), private.hex().encode()):
        assert secret not in frame
    assert b'"action":"start"' in frame.replace(b" ", b"") and SEALED.encode() in frame


def test_without_the_receivers_public_key_nothing_is_sent() -> None:
    auth = RouterKeyAuth(KEY, {HERE}, generate_keypair()[0])
    with pytest.raises(PeerError, match="not sent"):
        exchange(auth, {"action": "start", "config": CONFIG}, key=KEY, seal_keys={})


def test_a_receiver_refuses_secrets_in_clear_and_those_it_cannot_open() -> None:
    private, public = generate_keypair()
    clear = sign_hmac(ControlType.MIGRATE, 0, {"action": "start", "config": CONFIG}, KEY, to=HERE)
    with pytest.raises(ControlError, match="must be sealed"):  # signed, but in clear (sent
        # by hand: peer_call never sends it, see below)
        RouterKeyAuth(KEY, {HERE}, private)(ControlMessage(ControlType.MIGRATE, 0, clear))
    other, _ = generate_keypair()
    with pytest.raises(PeerRefused, match="does not open"):  # sealed for another router
        exchange(RouterKeyAuth(KEY, {HERE}, other), {"action": "start", "config": CONFIG},
                 key=KEY, seal_keys={HERE: public})
    with pytest.raises(PeerRefused, match="no sealing key"):  # a router without its key
        exchange(RouterKeyAuth(KEY, {HERE}, None), {"action": "start", "config": CONFIG},
                 key=KEY, seal_keys={HERE: public})


def test_a_router_without_addresses_or_key_fails_closed() -> None:
    body = sign_hmac(ControlType.MIGRATE, 0, {"action": "cancel", "name": "x"}, KEY, to=HERE)
    for auth in (RouterKeyAuth(KEY, set()), RouterKeyAuth(None, {HERE}), RouterKeyAuth(b"", {HERE})):
        with pytest.raises(ControlError):
            auth(ControlMessage(ControlType.MIGRATE, 0, body))


# --- the roles ----------------------------------------------------------------------------------


def agent_config(name: str, address: str, seal: bytes | None = None, **kw: Any) -> AgentConfig:
    return AgentConfig(name=name, run_dir="/nonexistent", roles=[],
                       interfaces=[Interface("eth0", address, 24)], router_key=KEY.hex(),
                       seal_key=seal.hex() if seal else None, **kw)


def test_a_migrate_signed_for_one_router_is_refused_by_another() -> None:
    """Issue 12: one signed MIGRATE was accepted by a third router."""
    r20a = MigrationRole(SimpleNamespace(config=agent_config("r20a", "10.14.0.1")))
    r18a = MigrationRole(SimpleNamespace(config=agent_config("r18a", "10.12.0.1")))
    body = {"action": "cancel", "name": "counter"}
    msg = ControlMessage(ControlType.MIGRATE, 1, sign_hmac(ControlType.MIGRATE, 1, body, KEY,
                                                           to="10.14.0.1"))
    with pytest.raises(ControlError, match="not for this receiver"):
        r18a.in_band()[ControlType.MIGRATE].authenticate(msg)
    assert r20a.in_band()[ControlType.MIGRATE].authenticate(msg) == body


def test_the_routers_of_a_config_seal_for_each_other() -> None:
    """What MoatNetwork writes: each router's private key, every router's public key."""
    (p1, k1), (p2, k2) = generate_keypair(), generate_keypair()
    peers = {"r18a": PeerRouter(["10.12.0.1", "10.22.0.1"], k1), "r20a": PeerRouter(["10.14.0.1"], k2)}
    source = agent_config("r18a", "10.12.0.1", p1, peers=peers)
    target = AgentConfig.from_json(agent_config("r20a", "10.14.0.1", p2, peers=peers).to_json())
    assert source.seal_keys() == {"10.12.0.1": k1, "10.22.0.1": k1, "10.14.0.1": k2}
    body = {"action": "start", "config": CONFIG}
    auth = RouterKeyAuth.of(target)
    assert auth.seal_key == p2 and auth.receivers == {"10.14.0.1"}

    # what peer_call does for r18a sending to 10.14.0.1, and what r20a accepts
    sealed = seal_body(body, source.seal_keys()["10.14.0.1"], ctype=ControlType.MIGRATE, txid=2,
                       to="10.14.0.1")
    msg = ControlMessage.decode(ControlMessage(ControlType.MIGRATE, 2, sign_hmac(
        ControlType.MIGRATE, 2, sealed, KEY, to="10.14.0.1")).encode())
    assert auth(msg) == body


class Manager:
    """The VM manager as the distribution role's cancel sees it."""

    def __init__(self) -> None:
        self.baseline = VmBaseline(authorized_keys=[], storage="/nonexistent")
        self.vms: dict[str, Any] = {}
        self.removed: list[str] = []

    def place(self, name: str) -> None:
        self.vms[name] = SimpleNamespace(name=name, part="duplicate", mobile={})

    async def remove(self, name: str) -> None:
        self.removed.append(name)
        self.vms.pop(name, None)


def distribution(manager: Manager) -> DistributionRole:
    cfg = agent_config("r20a", "10.14.0.1", broker=BrokerConfig(address="10.16.0.2"), vm={})
    agent = SimpleNamespace(config=cfg, loop=None,
                            role=lambda cls: SimpleNamespace(manager=manager) if cls is VmRole else None)
    return DistributionRole(agent)


def deliver(role: DistributionRole, msg: ControlMessage) -> dict:
    entry = role.in_band()[ControlType.VM_NEGOTIATE]
    return asyncio.run(entry.handler(msg, entry.authenticate(msg)))


def test_a_replayed_cancel_is_refused_and_drops_nothing() -> None:
    """Issue 12: a replayed cancel stopped and dropped an object. The duplicate placed again
    under the same name survives the replay, after a flood of other messages too."""
    manager = Manager()
    manager.place("cnt-d1")
    role = distribution(manager)
    body = {"action": "cancel", "vm": "cnt-d1"}
    cancel = ControlMessage(ControlType.VM_NEGOTIATE, 9, sign_hmac(
        ControlType.VM_NEGOTIATE, 9, body, KEY, to="10.14.0.1"))
    assert deliver(role, cancel) == {"ok": True} and manager.removed == ["cnt-d1"]
    manager.place("cnt-d1")  # the duplicate is back
    with pytest.raises(ControlError, match="replayed"):
        deliver(role, cancel)
    for txid in range(role.auth.cache.size + 10):  # a flood of other valid messages
        query = {"action": "query", "home_address": "10.16.0.100"}
        role.auth(ControlMessage(ControlType.VM_NEGOTIATE, txid, sign_hmac(
            ControlType.VM_NEGOTIATE, txid, query, KEY, to="10.14.0.1")))
    with pytest.raises(ControlError, match="not after"):
        deliver(role, cancel)
    restarted = distribution(manager)  # the same router after a restart
    restarted.auth.cache = ReplayCache(floor=time.time())  # started now (see test_msgauth)
    with pytest.raises(ControlError, match="not after"):
        deliver(restarted, cancel)
    assert manager.removed == ["cnt-d1"] and "cnt-d1" in manager.vms


def test_a_secret_is_not_sent_in_clear_even_without_a_router_key() -> None:
    """peer_call without a key sends a prepared body as it is, but never one with a secret
    field in clear: the receiver would refuse it, but the key would have crossed the wire."""
    auth = RouterKeyAuth(KEY, {HERE}, generate_keypair()[0])
    with pytest.raises(PeerError, match="would cross the wire in clear"):
        exchange(auth, {"action": "start", "config": CONFIG})
    with pytest.raises(PeerError, match="would cross the wire in clear"):
        exchange(auth, {"vm": "m1", "mobile": {"counter": CONFIG}}, ControlType.PROVISION)
