"""The broker role in the daemon: CO- and router-authenticated messages, coded refusals,
revocations pushed to the instance's router, and the advertiser's bounds. No root: the daemon
runs on ``lo`` with only the broker roles, and the peer calls are faked."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from agent.broker import role as role_mod
from agent.broker.advertiser import ANSWERS_PER_SOURCE, MAX_SOLICIT, BrokerAdvertiserRole
from agent.broker.errors import LeaseDenied, UnknownLease
from agent.broker.role import BrokerRole
from agent.core.config import AgentConfig, BrokerConfig, Interface
from agent.core.daemon import AgentDaemon
from agent.core.msgauth import sign_hmac
from agent.core.peer import refusal
from packets import ControlMessage, ControlType

ROUTER_KEY = bytes(range(32))
CO_KEY = bytes(range(32, 64))


@pytest.fixture(autouse=True)
def no_network(monkeypatch) -> list:
    """Revocations go to a fake peer: unit tests send nothing anywhere."""
    sent: list = []

    async def fake_peer(address: str, ctype: ControlType, body: dict, **kw: Any) -> dict:
        sent.append((address, ctype, body))
        return {"ok": True}

    monkeypatch.setattr(role_mod, "peer_call", fake_peer)
    return sent


def daemon(**broker: Any) -> AgentDaemon:
    cfg = AgentConfig(name="r22b", run_dir="/nonexistent", roles=[],
                      interfaces=[Interface("lo", "127.0.0.1", 8)], router_key=ROUTER_KEY.hex(),
                      broker=BrokerConfig(address="10.16.0.2", serve=True, co_keys={"co14": CO_KEY},
                                          lease_default_s=30, lease_max_s=60,
                                          network_hops={"10.14.0.0/24": {"r22a": 3, "r22c": 1}},
                                          **broker))
    return AgentDaemon(cfg, roles=[BrokerRole])


def instance(service: str, router: str, consumes: str = "", produces: str = "",
             share: float = 100, cpu: float = 1.0) -> dict:
    return {"service": service, "instance_id": f"{router}/{service}", "address": f"10.16.0.{len(router)}",
            "port": 4341, "router": router, "share": share, "cpu": cpu, "objects": [service],
            "consumes": consumes, "produces": produces}


#: Where COs send broker messages (the broker's address), and the broker router's own address
#: (where routers send theirs): what each is signed for.
BROKER = "10.16.0.2"
ROUTER = "127.0.0.1"


def call(d: AgentDaemon, ctype: ControlType, body: dict, key: bytes = CO_KEY, key_id: str = "co14",
         txid: int = 1, to: str = BROKER) -> dict:
    signed = sign_hmac(ctype, txid, body, key, key_id=key_id, to=to)
    return asyncio.run(d.on_peer_message(ControlMessage(ctype, txid, signed)))


def register(d: AgentDaemon, doc: dict, txid: int) -> dict:
    return call(d, ControlType.SERVICE_REGISTER, {"instance": doc}, ROUTER_KEY, "routers", txid,
                to=ROUTER)


def test_request_renew_cancel_through_the_daemon() -> None:
    d = daemon()
    register(d, instance("counter", "r22c", share=50), 100)
    grant = call(d, ControlType.LEASE_REQUEST,
                 {"request": {"target": "counter", "share": 20, "cpu": 0.2, "duration": 500}}, txid=2)
    (hop,) = grant["grant"]["hops"]
    assert hop["granted_s"] == 60  # clipped to the maximum, never longer than asked
    assert hop["address"] == "10.16.0.4" and hop["credential"]
    renewed = call(d, ControlType.LEASE_RENEW, {"lease_id": hop["lease_id"], "duration": 10}, txid=3)
    assert renewed["hop"]["granted_s"] == 10
    services = d.require(BrokerRole).cmd_services()
    assert services[0]["instances"][0]["used_share"] == 20
    assert call(d, ControlType.LEASE_CANCEL, {"lease_id": hop["lease_id"]}, txid=4)["ok"]
    assert d.require(BrokerRole).cmd_services()[0]["instances"][0]["used_share"] == 0
    with pytest.raises(UnknownLease):
        call(d, ControlType.LEASE_RENEW, {"lease_id": hop["lease_id"]}, txid=5)


def test_a_lease_is_bound_to_the_co_that_asked() -> None:
    d = daemon()
    d.config.broker.co_keys["co12"] = bytes(32)  # type: ignore[union-attr]
    d.require(BrokerRole).co_auth.keys["co12"] = bytes(32)
    register(d, instance("counter", "r22c"), 100)
    hop = call(d, ControlType.LEASE_REQUEST,
               {"request": {"target": "counter", "share": 10, "cpu": 0.1}}, txid=2)["grant"]["hops"][0]
    with pytest.raises(UnknownLease):  # co12 may not cancel co14's lease
        call(d, ControlType.LEASE_CANCEL, {"lease_id": hop["lease_id"]}, bytes(32), "co12", txid=3)


@pytest.mark.parametrize("key,key_id", [(bytes(32), "co14"), (CO_KEY, "co99"), (ROUTER_KEY, "routers")])
def test_lease_messages_need_the_cos_own_key(key: bytes, key_id: str) -> None:
    d = daemon()
    register(d, instance("counter", "r22c"), 100)
    with pytest.raises(LeaseDenied) as err:
        call(d, ControlType.LEASE_REQUEST, {"request": {"target": "counter", "share": 1, "cpu": 0.1}},
             key, key_id, txid=2)
    assert err.value.reason == "bad_credentials"
    assert refusal(err.value)["reason"] == "bad_credentials"
    assert d.require(BrokerRole).broker.leases() == []


def test_only_routers_register_services() -> None:
    d = daemon()
    with pytest.raises(Exception, match="SERVICE_REGISTER refused"):
        call(d, ControlType.SERVICE_REGISTER, {"instance": instance("counter", "r22c")}, txid=9)
    assert d.require(BrokerRole).cmd_services() == []


def test_a_co_message_for_another_receiver_is_refused() -> None:
    """Issue 12: a CO's message names the broker it is sent to (its address)."""
    d = daemon()
    register(d, instance("counter", "r22c"), 100)
    with pytest.raises(LeaseDenied, match="not for this receiver"):
        call(d, ControlType.LEASE_REQUEST, {"request": {"target": "counter", "share": 1, "cpu": 0.1}},
             txid=2, to="10.16.0.9")
    with pytest.raises(Exception, match="not for this receiver"):  # a router's too
        call(d, ControlType.SERVICE_REGISTER, {"instance": instance("text", "r22c")}, ROUTER_KEY,
             "routers", 101, to="10.20.0.1")
    assert d.require(BrokerRole).broker.leases() == []


def test_one_cos_flood_does_not_evict_another_cos_replay_memory() -> None:
    """Each CO has its own replay cache: one CO's messages never push another's out."""
    d = daemon()
    auth = d.require(BrokerRole).co_auth
    auth.keys["co12"] = bytes(range(32))
    msg = ControlMessage(ControlType.SERVICE_LIST, 5, sign_hmac(
        ControlType.SERVICE_LIST, 5, {}, CO_KEY, key_id="co14", to=BROKER))
    auth(msg)
    for txid in range(10, 10 + 50):
        auth(ControlMessage(ControlType.SERVICE_LIST, txid, sign_hmac(
            ControlType.SERVICE_LIST, txid, {}, bytes(range(32)), key_id="co12", to=BROKER)))
    assert len(auth.caches["co14"]) == 1 and len(auth.caches["co12"]) == 50
    with pytest.raises(LeaseDenied, match="replayed"):
        auth(msg)


def test_a_replayed_request_is_refused_and_grants_nothing() -> None:
    d = daemon()
    register(d, instance("counter", "r22c"), 100)
    body = sign_hmac(ControlType.LEASE_REQUEST, 2,
                     {"request": {"target": "counter", "share": 10, "cpu": 0.1}}, CO_KEY, key_id="co14",
                     to=BROKER)
    msg = ControlMessage(ControlType.LEASE_REQUEST, 2, body)
    asyncio.run(d.on_peer_message(msg))
    with pytest.raises(LeaseDenied):
        asyncio.run(d.on_peer_message(msg))
    assert len(d.require(BrokerRole).broker.leases()) == 1


def test_path_prefers_fewer_hops_from_the_cos_network() -> None:
    d = daemon()
    for router in ("r22a", "r22c"):
        register(d, instance(f"text2html-{router}", router, "text", "html"), 100 + len(router))
    register(d, instance("html2rtf", "r22c", "html", "rtf"), 110)
    grant = call(d, ControlType.LEASE_REQUEST,
                 {"request": {"target": "text -> rtf", "share": 10, "cpu": 0.1}, "co_address": "10.14.0.9"},
                 txid=2)["grant"]
    assert [h["instance"] for h in grant["hops"]] == ["r22c/text2html-r22c", "r22c/html2rtf"]


def test_cancel_pushes_the_revocation_to_the_instances_router(no_network: list) -> None:
    sent = no_network
    d = daemon()

    async def main() -> None:
        d.loop = asyncio.get_running_loop()
        await d.on_peer_message(ControlMessage(ControlType.SERVICE_REGISTER, 100, sign_hmac(
            ControlType.SERVICE_REGISTER, 100, {"instance": instance("counter", "r22c")}, ROUTER_KEY,
            to=ROUTER)))
        body = {"request": {"target": "counter", "share": 10, "cpu": 0.1}}
        grant = await d.on_peer_message(ControlMessage(ControlType.LEASE_REQUEST, 2, sign_hmac(
            ControlType.LEASE_REQUEST, 2, body, CO_KEY, key_id="co14", to=BROKER)))
        lease_id = grant["grant"]["hops"][0]["lease_id"]
        await d.on_peer_message(ControlMessage(ControlType.LEASE_CANCEL, 3, sign_hmac(
            ControlType.LEASE_CANCEL, 3, {"lease_id": lease_id}, CO_KEY, key_id="co14", to=BROKER)))
        # Delivered before the CO hears "cancelled": its next call is refused, not served.
        assert sent and sent[0][0] == "10.16.0.4" and sent[0][1] == ControlType.LEASE_REVOKE
        assert sent[0][2]["revoked"][0]["lease_id"] == lease_id

    asyncio.run(main())


# --- the advertiser ------------------------------------------------------------------------

def advertiser() -> BrokerAdvertiserRole:
    cfg = AgentConfig(name="r18a", run_dir="/nonexistent", roles=[],
                      interfaces=[Interface("lo", "127.0.0.1", 8)],
                      broker=BrokerConfig(address="10.16.0.2"))
    return AgentDaemon(cfg, roles=[BrokerAdvertiserRole]).require(BrokerAdvertiserRole)


def test_advertisement_names_the_broker() -> None:
    adv = ControlMessage.decode(advertiser().advertisement())
    assert adv.type == ControlType.BROKER_ADVERT
    assert adv.body["broker"] == "10.16.0.2" and adv.body["router"] == "r18a"


def test_solicitation_answers_are_bounded_per_source() -> None:
    role = advertiser()
    assert all(role._allow("10.14.0.9", now=5.0) for _ in range(ANSWERS_PER_SOURCE))
    assert not role._allow("10.14.0.9", now=5.5)
    assert role._allow("10.14.0.8", now=5.5)  # another source is not starved
    assert role._allow("10.14.0.9", now=6.1)  # a new second


def test_oversized_and_malformed_datagrams_are_counted_not_answered() -> None:
    role = advertiser()
    role.on_datagram(b"x" * (MAX_SOLICIT + 1), ("10.14.0.9", 4340))
    role.on_datagram(b"MO\x01\x0e", ("10.14.0.9", 4340))
    assert role.malformed == 2 and role.answered == 0


def test_measured_round_trips_outrank_routing_hops() -> None:
    """By hops from net 14, r22c's text2html is nearer; the CO measured r22a's as faster."""
    d = daemon()
    for router in ("r22a", "r22c"):
        register(d, instance(f"text2html-{router}", router, "text", "html"), 100 + len(router))
    register(d, instance("html2rtf", "r22c", "html", "rtf"), 110)
    ask = {"request": {"target": "text -> rtf", "share": 10, "cpu": 0.1}, "co_address": "10.14.0.9"}
    by_hops = call(d, ControlType.LEASE_REQUEST, ask, txid=2)["grant"]
    assert by_hops["hops"][0]["instance"] == "r22c/text2html-r22c"
    measured = {"r22a/text2html-r22a": 0.2, "r22c/text2html-r22c": 4.0, "r22c/html2rtf": 0.3}
    by_rtt = call(d, ControlType.LEASE_REQUEST, dict(ask, costs=measured), txid=3)["grant"]
    assert by_rtt["hops"][0]["instance"] == "r22a/text2html-r22a"
    assert d.require(BrokerRole)._measured == {}  # one request's measurements only


@pytest.mark.parametrize("costs", [["r22a"], {"r22a/x": -1}, {"r22a/x": 1e9},
                                   {"r22a/x": True}, {"bad name!": 1.0},
                                   {f"i{n}": 1.0 for n in range(300)}])
def test_malformed_costs_are_refused_and_grant_nothing(costs: Any) -> None:
    from agent.broker.errors import BadRequest

    d = daemon()
    register(d, instance("counter", "r22c"), 100)
    with pytest.raises(BadRequest):
        call(d, ControlType.LEASE_REQUEST,
             {"request": {"target": "counter", "share": 1, "cpu": 0.1}, "costs": costs}, txid=2)
    assert d.require(BrokerRole).broker.leases() == []


def test_accepted_answers_are_signed_for_the_co_that_asked() -> None:
    from agent.core.msgauth import ReplayCache, verify_hmac

    d = daemon()
    register(d, instance("counter", "r22c"), 100)
    answer = call(d, ControlType.LEASE_REQUEST,
                  {"request": {"target": "counter", "share": 1, "cpu": 0.1}}, txid=7)
    assert answer["auth"]["key_id"] == "broker"
    verify_hmac(ControlType.LEASE_GRANT, 7, answer, CO_KEY, ReplayCache(), to={"co14"})
    from agent.core.msgauth import MessageAuthError
    with pytest.raises(MessageAuthError):  # not valid for another CO's key
        verify_hmac(ControlType.LEASE_GRANT, 7, answer, bytes(32), ReplayCache(), to={"co14"})
    with pytest.raises(MessageAuthError, match="not for this receiver"):  # nor for another CO
        verify_hmac(ControlType.LEASE_GRANT, 7, answer, CO_KEY, ReplayCache(), to={"co12"})
