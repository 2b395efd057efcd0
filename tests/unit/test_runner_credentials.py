"""A leased object checks every request's service credential (patent Fig. 10, 164): the
runner's check on an ObjectServer with a fake object (no network, no root), and the control
commands that configure it (``credentials``, ``revoke``)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from agent.broker.credentials import Claims, derive_service_key, issue
from agent.hosting.runner import ObjectServer, control_commands
from agent.sdk import MobileObject
from packets import ControlMessage, ControlType

ROUTER_KEY = bytes(range(32))
SERVICE, INSTANCE = "text2html", "r22a/vm1"
KEY = derive_service_key(ROUTER_KEY, SERVICE)
ADDR = ("10.14.0.30", 5000)


class Echo(MobileObject):
    """Counts the requests it handles and shows what it was given."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(dict(request))
        return {"n": len(self.calls)}

    def get_state(self) -> Any:
        return {"n": len(self.calls)}

    def set_state(self, state: Any) -> None:
        pass


class FakeTransport:
    def __init__(self) -> None:
        self.sent: list[dict] = []

    def sendto(self, data: bytes, addr: tuple) -> None:
        self.sent.append(ControlMessage.decode(data).body)


def token(lease: str = "lease-1", service: str = SERVICE, instance: str = INSTANCE,
          expires_in: float = 60.0, key: bytes = KEY) -> str:
    return issue(Claims(lease, service, instance, time.time() + expires_in, "co14"), key)


def leased_server(configure: bool = True) -> tuple[ObjectServer, FakeTransport, dict]:
    server = ObjectServer(Echo(), "text2html", "r22a", warm=False, leased=True)
    transport = FakeTransport()
    server.connection_made(transport)  # type: ignore[arg-type]
    commands = control_commands(server, asyncio.Event())
    if configure:
        commands["credentials"]({"service": SERVICE, "instance": INSTANCE, "key": KEY.hex()})
    return server, transport, commands


def send(server: ObjectServer, transport: FakeTransport, seq: int, credential: Any = None,
         client: str = "co14") -> dict:
    body: dict[str, Any] = {"client": client, "seq": seq, "text": "x"}
    if credential is not None:
        body["credential"] = credential
    server.datagram_received(ControlMessage(ControlType.SERVICE_REQUEST, seq, body).encode(), ADDR)
    return transport.sent[-1]


def test_a_valid_credential_is_served_and_the_object_never_sees_it() -> None:
    server, transport, _ = leased_server()
    reply = send(server, transport, 1, token())
    assert reply["ok"] is True and reply["result"] == {"n": 1}
    assert "credential" not in server.obj.calls[0]
    assert "credential" not in server.seen.get("co14").reply


@pytest.mark.parametrize("credential, reason", [
    (None, "missing"),
    ("", "missing"),
    ("not-a-token", "forged"),
    (token(key=bytes(32)), "forged"),                       # MAC under another key
    (token(service="html2rtf", key=derive_service_key(ROUTER_KEY, "html2rtf")), "forged"),
    (token()[:-2] + "AA", "forged"),                        # tampered MAC
    (token(expires_in=-1.0), "expired"),
    (token(service="html2rtf"), "wrong_service"),           # authentic, another service
    (12345, "forged"),
], ids=["none", "empty", "not-a-token", "other-key", "other-service-key", "tampered-mac",
        "expired", "other-service", "number"])  # fixed ids: tokens hold the time they were made
def test_refusals_carry_the_reason_and_are_not_remembered(credential: Any, reason: str) -> None:
    server, transport, commands = leased_server()
    reply = send(server, transport, 1, credential)
    assert reply["ok"] is False and reply["credential_error"] == reason
    assert reply["error"] == f"credential refused: {reason}"
    assert (reply["client"], reply["seq"], reply["served_by"]) == ("co14", 1, "r22a")
    assert server.obj.calls == [] and "co14" not in server.seen
    assert server.stats["refused"] == 1 and server.stats["served"] == 0
    stats = commands["stats"]({})
    assert stats["leased"] is True and stats["credentials"]["refused"] == {reason: 1}
    assert "key" not in stats["credentials"]
    # the same request again, now with a credential: served once (nothing was remembered)
    again = send(server, transport, 1, token())
    assert again["ok"] is True and again["result"] == {"n": 1}


def test_a_revoked_lease_is_refused_and_other_leases_still_served() -> None:
    server, transport, commands = leased_server()
    assert send(server, transport, 1, token("lease-1"))["ok"] is True
    held = commands["revoke"]({"revoked": [{"lease_id": "lease-1", "until": time.time() + 60}]})
    assert held == {"revocations": 1}
    assert send(server, transport, 2, token("lease-1"))["credential_error"] == "revoked"
    assert send(server, transport, 3, token("lease-2"))["ok"] is True
    # a duplicate of an answered request is not answered to a revoked credential either
    assert send(server, transport, 1, token("lease-1"))["credential_error"] == "revoked"


def test_a_leased_object_refuses_everything_until_configured() -> None:
    server, transport, commands = leased_server(configure=False)
    assert send(server, transport, 1, token())["credential_error"] == "forged"
    assert send(server, transport, 2)["credential_error"] == "missing"
    commands["credentials"]({"service": SERVICE, "instance": INSTANCE, "key": KEY.hex()})
    assert send(server, transport, 3, token())["ok"] is True


@pytest.mark.parametrize("args", [
    {"service": SERVICE, "instance": INSTANCE, "key": "abc"},
    {"service": SERVICE, "instance": INSTANCE, "key": "zz" * 32},
    {"service": SERVICE, "instance": INSTANCE, "key": 7},
    {"service": "no spaces", "instance": INSTANCE, "key": KEY.hex()},
    {"service": SERVICE, "key": KEY.hex()},
])
def test_malformed_credentials_commands_are_refused(args: dict) -> None:
    server, transport, commands = leased_server(configure=False)
    with pytest.raises(ValueError):
        commands["credentials"](args)
    assert send(server, transport, 1, token())["credential_error"] == "forged"


@pytest.mark.parametrize("doc", [
    {"revoked": "lease-1"},
    {"revoked": [{"lease_id": "l", "until": "soon"}]},
    {"revoked": [{"lease_id": "l", "until": 1.0, "extra": 1}]},
])
def test_malformed_revocations_are_refused(doc: dict) -> None:
    _server, _transport, commands = leased_server()
    with pytest.raises(ValueError):
        commands["revoke"](doc)


def test_an_open_object_takes_no_credentials_and_serves_as_before() -> None:
    server = ObjectServer(Echo(), "counter", "r22a", warm=False)
    transport = FakeTransport()
    server.connection_made(transport)  # type: ignore[arg-type]
    commands = control_commands(server, asyncio.Event())
    with pytest.raises(ValueError):
        commands["credentials"]({"service": SERVICE, "instance": INSTANCE, "key": KEY.hex()})
    with pytest.raises(ValueError):
        commands["revoke"]({"revoked": []})
    assert send(server, transport, 1)["ok"] is True
    assert commands["stats"]({})["leased"] is False


def test_revocations_travel_with_the_checkpoint() -> None:
    """An upgrade or a move starts a new process: a cancelled lease stays cancelled there."""
    old, _t, commands = leased_server()
    commands["revoke"]({"revoked": [{"lease_id": "lease-1", "until": time.time() + 60}]})
    state = old.checkpoint()
    new, transport, _ = leased_server()
    new.restore(state)
    assert send(new, transport, 1, token("lease-1"))["credential_error"] == "revoked"
    assert send(new, transport, 2, token("lease-2"))["ok"] is True
    # an open object's checkpoint has no revocations: its format is unchanged
    assert "revocations" not in ObjectServer(Echo(), "c", "r", warm=False).checkpoint()


def test_queued_requests_are_checked_when_replayed() -> None:
    server = ObjectServer(Echo(), "text2html", "r22a", warm=True, leased=True)
    transport = FakeTransport()
    server.connection_made(transport)  # type: ignore[arg-type]
    commands = control_commands(server, asyncio.Event())
    for seq, credential in ((1, token()), (2, None)):
        body = {"client": "co14", "seq": seq, "text": "x"}
        if credential:
            body["credential"] = credential
        server.datagram_received(ControlMessage(ControlType.SERVICE_REQUEST, seq, body).encode(), ADDR)
    assert transport.sent == []
    commands["credentials"]({"service": SERVICE, "instance": INSTANCE, "key": KEY.hex()})
    server.serve()
    assert [b["ok"] for b in transport.sent] == [True, False]
    assert transport.sent[1]["credential_error"] == "missing"


# --- duplicates: exactly one answer when the HOA bicasts (issue 11, item 4) ----------------


def test_a_credential_for_a_sibling_instance_is_left_to_it_unanswered() -> None:
    server, transport, commands = leased_server()
    server.datagram_received(ControlMessage(ControlType.SERVICE_REQUEST, 1, {
        "client": "co14", "seq": 1, "credential": token(instance="r20b/vm2@ab")}).encode(), ADDR)
    assert transport.sent == [] and server.obj.calls == []
    assert server.stats["left_to_sibling"] == 1
    assert commands["stats"]({})["credentials"]["refused"] == {"wrong_instance": 1}
    assert send(server, transport, 2, token())["ok"] is True  # its own lease still served


@pytest.mark.parametrize("credential", [None, token(expires_in=-1.0), "garbage"],
                         ids=["none", "expired", "garbage"])  # fixed: a token holds its time
def test_a_duplicate_leaves_every_refusal_to_the_primary(credential: Any) -> None:
    server, transport, commands = leased_server(configure=False)
    commands["credentials"]({"service": SERVICE, "instance": INSTANCE, "key": KEY.hex(),
                             "part": "duplicate"})
    body: dict[str, Any] = {"client": "co14", "seq": 1}
    if credential is not None:
        body["credential"] = credential
    server.datagram_received(ControlMessage(ControlType.SERVICE_REQUEST, 1, body).encode(), ADDR)
    assert transport.sent == [] and server.stats["refused"] == 1
    assert send(server, transport, 2, token())["result"] == {"n": 1}  # its own lease: served


def test_a_part_other_than_primary_duplicate_or_secondary_is_refused() -> None:
    _, _, commands = leased_server(configure=False)
    with pytest.raises(ValueError, match="part"):
        commands["credentials"]({"service": SERVICE, "instance": INSTANCE, "key": KEY.hex(),
                                 "part": "boss"})


def test_an_object_counts_the_requests_it_serves_per_source_network() -> None:
    """The traffic rule's input: requests this instance serves, per /24 — not those it
    leaves to a sibling under bicast, nor refusals."""
    server, transport, commands = leased_server()
    send(server, transport, 1, token())
    server.datagram_received(ControlMessage(ControlType.SERVICE_REQUEST, 2, {
        "client": "co14", "seq": 2, "credential": token()}).encode(), ("10.12.0.30", 5000))
    server.datagram_received(ControlMessage(ControlType.SERVICE_REQUEST, 3, {
        "client": "co14", "seq": 3, "credential": token(instance="r20a/x@1")}).encode(),
        ("10.16.0.23", 5000))  # a sibling's: left unanswered, not counted
    send(server, transport, 4, "garbage")  # refused: not counted
    assert commands["stats"]({})["by_network"] == {"10.14.0.0/24": 1, "10.12.0.0/24": 1}


def test_a_sibling_credential_from_the_instances_own_network_is_served() -> None:
    """A CO on this router's network reaches only this instance: a genuine credential for a
    sibling instance of the service is honoured from there (the broker moved that lease)."""
    server, transport, commands = leased_server(configure=False)
    commands["credentials"]({"service": SERVICE, "instance": INSTANCE, "key": KEY.hex(),
                             "networks": ["10.14.0.0/24"]})
    reply = send(server, transport, 1, token(instance="r18b/vm@1"))  # from 10.14.0.30
    assert reply["ok"] is True
    server.datagram_received(ControlMessage(ControlType.SERVICE_REQUEST, 2, {
        "client": "x", "seq": 2, "credential": token(instance="r18b/vm@1")}).encode(),
        ("10.16.0.23", 5000))
    assert transport.sent[-1] is reply  # from elsewhere: the sibling's to answer


def test_a_secondary_honours_its_primarys_credentials_and_answers_refusals() -> None:
    server, transport, commands = leased_server(configure=False)
    commands["credentials"]({"service": SERVICE, "instance": INSTANCE, "key": KEY.hex(),
                             "part": "secondary", "aliases": ["r18b/pair@1"]})
    assert send(server, transport, 1, token(instance="r18b/pair@1"))["ok"] is True
    assert send(server, transport, 2, token(expires_in=-1.0))["credential_error"] == "expired"
    server.datagram_received(ControlMessage(ControlType.SERVICE_REQUEST, 3, {
        "client": "co14", "seq": 3, "credential": token(instance="r9/other@1")}).encode(),
        ("10.16.0.23", 5000))
    assert server.stats["left_to_sibling"] == 1
