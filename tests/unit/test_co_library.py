"""The CO library (nodetools.co) against the real broker role on loopback: signed in-band
exchanges, typed refusals with the broker's reason, grants run as paths through services that
check the credentials, the renewal loop, and discovery's parsing. No root; nothing leaves
loopback (solicitations are never sent here)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from agent.broker import role as role_mod
from agent.broker.broker import Grant
from agent.broker.credentials import Verifier
from agent.broker.errors import CredentialError
from agent.broker.role import BrokerRole
from agent.core.config import AgentConfig, BrokerConfig, Interface
from agent.core.daemon import AgentDaemon
from agent.core.msgauth import sign_hmac
from agent.core.peer import PeerServer
from nodetools import co
from packets import ControlMessage, ControlType

ROUTER_KEY = bytes(range(32))
CO_KEY = bytes(range(32, 64))


class Loop:
    """An event loop in a thread of its own, for servers the synchronous client talks to."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class Broker:
    """The broker role of a daemon (no other role) behind a real PeerServer on 127.0.0.1."""

    def __init__(self, loop: Loop, lease_max_s: float = 60.0) -> None:
        cfg = AgentConfig(name="r22b", run_dir="/nonexistent", roles=[],
                          interfaces=[Interface("lo", "127.0.0.1", 8)],
                          router_key=ROUTER_KEY.hex(),
                          broker=BrokerConfig(address="127.0.0.1", serve=True,
                                              co_keys={"co14": CO_KEY},
                                              lease_default_s=min(30.0, lease_max_s),
                                              lease_max_s=lease_max_s))
        self.daemon = AgentDaemon(cfg, roles=[BrokerRole])
        self.role: BrokerRole = self.daemon.require(BrokerRole)
        self.server = PeerServer(self.daemon.on_peer_message, port=0, host="127.0.0.1")
        loop.run(self.server.start())
        self.port = self.server.port

    def register(self, service: str, port: int, consumes: str = "", produces: str = "") -> None:
        body = sign_hmac(ControlType.SERVICE_REGISTER, 1, {"instance": {
            "service": service, "instance_id": f"vm-{service}", "address": "127.0.0.1",
            "port": port, "router": "r22a", "consumes": consumes, "produces": produces,
            "objects": [service]}}, ROUTER_KEY, to="127.0.0.1")
        answer = asyncio.run(self.daemon.on_peer_message(
            ControlMessage(ControlType.SERVICE_REGISTER, 1, body)))
        assert answer["ok"], answer

    def client(self, key: bytes = CO_KEY, co_id: str = "co14") -> co.BrokerClient:
        return co.BrokerClient("127.0.0.1", co_id, key, port=self.port, timeout=5.0,
                               co_address="10.14.0.30")


class FakeService:
    """A leased object on UDP 127.0.0.1: checks each credential as the runner does (the
    broker's own verifier and revocation list) and converts with ``convert``."""

    def __init__(self, broker: Broker, service: str, field_in: str,
                 convert: Callable[[str], dict]) -> None:
        self.verifier = Verifier({service: broker.role.broker.service_key(service)},
                                 broker.role.broker.revocations)
        self.service, self.field_in, self.convert = service, field_in, convert
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.bodies: list[dict] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                data, addr = self.sock.recvfrom(65535)
            except socket.timeout:
                continue
            msg = ControlMessage.decode(data)
            self.bodies.append(msg.body)
            try:
                self.verifier.verify(msg.body.get("credential"), self.service)
                reply = {"ok": True, "result": self.convert(msg.body[self.field_in])}
            except CredentialError as exc:
                reply = {"ok": False, "error": f"credential refused: {exc.reason}",
                         "credential_error": exc.reason}
            reply.update(client=msg.body["client"], seq=msg.body["seq"])
            self.sock.sendto(ControlMessage(ControlType.SERVICE_REPLY, msg.txid, reply).encode(), addr)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


@pytest.fixture(autouse=True)
def no_revocation_sends(monkeypatch) -> None:
    """The broker's LEASE_REVOKE pushes go nowhere (the fake services share its list)."""
    async def fake_peer(*args: Any, **kw: Any) -> dict:
        return {"ok": True}

    monkeypatch.setattr(role_mod, "peer_call", fake_peer)


@pytest.fixture
def loop() -> Iterator[Loop]:
    lp = Loop()
    yield lp
    lp.close()


@pytest.fixture
def path(loop: Loop) -> Iterator[Broker]:
    """A broker with text2html and html2rtf converters registered."""
    broker = Broker(loop)
    services = [FakeService(broker, "text2html", "text", lambda t: {"html": f"<p>{t}</p>"}),
                FakeService(broker, "html2rtf", "html", lambda h: {"rtf": "{\\rtf1 " + h + "}"})]
    broker.register("text2html", services[0].port, "text", "html")
    broker.register("html2rtf", services[1].port, "html", "rtf")
    broker.services = services  # type: ignore[attr-defined]
    yield broker
    for s in services:
        s.close()


def test_request_runs_the_path_and_cancel_revokes(path: Broker) -> None:
    client = path.client()
    grant = client.request("text -> rtf", 10, 0.1, 20)
    assert isinstance(grant, Grant) and [h.service for h in grant.hops] == ["text2html", "html2rtf"]
    assert all(h.granted_s == 20 for h in grant.hops)
    assert len(path.role.broker.leases()) == 2
    assert client.run_path(grant, {"text": "hi"}) == {"rtf": "{\\rtf1 <p>hi</p>}"}
    sent = path.services[0].bodies[-1]  # type: ignore[attr-defined]
    assert sent["credential"] == grant.hops[0].credential and sent["client"] == client.client
    first = grant.hops[0]
    assert client.cancel(first.lease_id) == first.lease_id
    with pytest.raises(co.ServiceRefused) as refused:
        client.run_path(grant, {"text": "again"})
    assert refused.value.reason == "revoked" and refused.value.hop == first
    assert [row["lease_id"] for row in path.role.broker.leases()] == [grant.hops[1].lease_id]


def test_every_message_is_signed_with_the_cos_key_and_a_fresh_txid(path: Broker, monkeypatch) -> None:
    seen: list[tuple[int, dict]] = []
    real = co.peer_call

    async def spy(address: str, ctype: ControlType, body: dict, **kw: Any) -> dict:
        seen.append((kw["txid"], body))
        return await real(address, ctype, body, **kw)

    monkeypatch.setattr(co, "peer_call", spy)
    client = path.client()
    client.list_services()
    client.list_services()
    assert seen[0][0] != seen[1][0]
    assert all(b["auth"]["key_id"] == "co14" and b["auth"]["alg"] == "hmac-sha256" for _, b in seen)


def test_refusals_are_typed_with_the_brokers_reason(path: Broker) -> None:
    with pytest.raises(co.BrokerRefused) as unknown:
        path.client().request("nosuch", 10, 0.1)
    assert unknown.value.reason == "unknown_service"
    with pytest.raises(co.BrokerRefused) as wrong_key:
        path.client(key=bytes(32)).request("text2html", 10, 0.1)
    assert wrong_key.value.reason == "bad_credentials"
    with pytest.raises(co.BrokerRefused) as stranger:
        path.client(co_id="co12").list_services()
    assert stranger.value.reason == "bad_credentials"
    with pytest.raises(co.BrokerRefused) as lease:
        path.client().renew("no-such-lease", 10)
    assert lease.value.reason == "unknown_lease"
    assert isinstance(lease.value.as_broker_error(), co.UnknownLease)
    with pytest.raises(co.BrokerRefused) as share:
        path.client().request("text2html", 500, 0.1)
    assert share.value.reason == "bad_request"
    assert path.role.broker.leases() == []


def test_an_unreachable_broker_is_its_own_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    client = co.BrokerClient("127.0.0.1", "co14", CO_KEY, port=port, timeout=1.0,
                             co_address="127.0.0.1")
    with pytest.raises(co.BrokerUnreachable):
        client.list_services()


def test_renew_gives_a_new_credential(path: Broker) -> None:
    client = path.client()
    grant = client.request("text2html", 10, 0.1, 5)
    hop = client.renew(grant.hops[0].lease_id, 20)
    assert hop.lease_id == grant.hops[0].lease_id and hop.granted_s == 20
    assert hop.credential != grant.hops[0].credential


def test_keep_renews_before_expiry_and_reports_a_lost_lease(loop: Loop) -> None:
    broker = Broker(loop, lease_max_s=1.0)
    svc = FakeService(broker, "counter", "op", lambda op: {"op": op})
    broker.register("counter", svc.port)
    try:
        client = broker.client()
        grant = client.request("counter", 10, 0.1, 1)
        renewed: list = []
        report = asyncio.run(client.akeep(grant, 2.0, 1, on_renewed=renewed.append))
        assert report["ok"] and len(report["renewals"]) >= 2 and renewed
        assert broker.role.broker.leases()  # still alive after 2 s of 1 s grants
        other = client.request("counter", 10, 0.1, 1)
        client.cancel(other.hops[0].lease_id)  # behind the renewal loop's back
        report = asyncio.run(client.akeep(other, 2.0, 1))
        assert not report["ok"] and report["failures"][0]["reason"] == "unknown_lease"
    finally:
        svc.close()


def advert(**body: Any) -> bytes:
    doc = {"broker": "10.16.0.2", "port": 4340, "router": "r20a", "sequence": 7, "interval": 1.0}
    doc.update(body)
    return ControlMessage(ControlType.BROKER_ADVERT, 7, doc).encode()


def test_adverts_are_checked_before_they_are_believed() -> None:
    assert co.parse_advert(advert()) == {"broker": "10.16.0.2", "port": 4340, "router": "r20a",
                                         "sequence": 7, "interval": 1.0}
    for bad in (advert(broker="not-an-address"), advert(port=0), advert(interval=-1),
                advert(router="a b"), advert(sequence=True), b"garbage", advert() + b"x",
                ControlMessage(ControlType.BROKER_SOLICIT, 1, {}).encode(),
                advert(router="r" * 3000)):
        assert co.parse_advert(bad) is None, bad[:40]


def test_discovery_takes_the_first_valid_advert_and_is_bounded(monkeypatch) -> None:
    """On a free port of loopback (UDP 4340 of this namespace may hear a running network)."""
    monkeypatch.setattr(co, "ipv4_interfaces", lambda: [])  # join and solicit nowhere
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def send_later() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for data in (b"junk", advert(sequence=9)):
                s.sendto(data, ("127.0.0.1", port))

    timer = threading.Timer(0.3, send_later)
    timer.start()
    try:
        found = co.discover_broker(3.0, mode="listen", port=port)
    finally:
        timer.join()
    assert found.broker == "10.16.0.2" and found.sequence == 9 and found.how == "solicited"
    assert found.sender == "127.0.0.1" and 0.2 < found.delay < 3.0
    with pytest.raises(co.BrokerNotFound):
        co.discover_broker(0.3, mode="listen", port=port)


def test_documents_map_formats_to_the_services_fields() -> None:
    assert co.document_for("text", "café".encode()) == {"text": "café"}
    assert co.document_for("word", b"PK\x03") == {"docx_b64": "UEsD"}
    assert co.output_of("rtf", {"rtf": "{\\rtf1}"}) == b"{\\rtf1}"
    assert co.output_of("word", {"docx_b64": "UEsD"}) == b"PK\x03"
    with pytest.raises(co.CoError, match="no 'rtf'"):
        co.output_of("rtf", {"html": "x"})


def test_the_command_prints_one_json_line_with_the_reason(path: Broker, tmp_path: Path,
                                                         capsys, monkeypatch) -> None:
    keys = tmp_path / "co_keys.json"
    keys.write_text(json.dumps({"co14": CO_KEY.hex()}))

    def run(*argv: str) -> dict:
        assert co.main(list(argv)) == 0
        lines = capsys.readouterr().out.splitlines()
        assert len(lines) == 1
        return json.loads(lines[0])

    original = co.BrokerClient.__init__

    def on_port(self, address, co_id, key, **kw):  # type: ignore[no-untyped-def]
        original(self, address, co_id, key, port=path.port, co_address="10.14.0.30")

    monkeypatch.setattr(co.BrokerClient, "__init__", on_port)
    common = ["--co", "co14", "--keys", str(keys), "--broker", "127.0.0.1"]
    refused = run("request", "nosuch", *common)
    assert refused["ok"] is False and refused["reason"] == "unknown_service"
    granted = run("request", "text -> rtf", *common, "--duration", "20")
    assert granted["ok"] and len(granted["grant"]["hops"]) == 2
    grant_file = tmp_path / "grant.json"
    grant_file.write_text(json.dumps(granted))
    doc = tmp_path / "doc.txt"
    doc.write_text("hello")
    out = tmp_path / "doc.rtf"
    called = run("call", *common, str(grant_file), str(doc), "--output", str(out))
    assert called["ok"] and called["hops"] == ["text2html", "html2rtf"]
    assert out.read_text() == "{\\rtf1 <p>hello</p>}" == called["text"]
    assert run("list", *common)["services"][0]["service"] == "html2rtf"
    assert run("cancel", *common, granted["grant"]["hops"][0]["lease_id"])["ok"]
    revoked = run("call", *common, str(grant_file), str(doc))
    assert revoked["ok"] is False and revoked["reason"] == "revoked"
    nokey = run("list", "--co", "co12", "--keys", str(keys), "--broker", "127.0.0.1")
    assert nokey["ok"] is False and "no key for co12" in nokey["error"]


def test_measure_costs_times_a_handshake_per_instance_and_skips_the_silent() -> None:
    """The CO's measured cost: a TCP handshake to each listed instance, on loopback here."""
    from nodetools.co import measure_costs

    async def main() -> dict[str, float]:
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        closed = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        dead = closed.sockets[0].getsockname()[1]
        closed.close()
        await closed.wait_closed()
        services = [{"service": "s", "instances": [
            {"instance_id": "r1/a@1", "address": "127.0.0.1", "port": port},
            {"instance_id": "r1/b@1", "address": "127.0.0.1", "port": dead},
            {"instance_id": "broken"}]}]
        try:
            return await measure_costs(services, timeout=1.0)
        finally:
            server.close()

    costs = asyncio.run(main())
    assert list(costs) == ["r1/a@1"] and 0 < costs["r1/a@1"] < 1000


def test_a_grant_signed_for_another_co_is_refused() -> None:
    """The broker's answer names the CO it is for: one signed for co12 (same key here) is
    not an answer to co14."""
    hop = {"service": "s", "instance": "r1/s@1", "address": "127.0.0.1", "port": 4341,
           "credential": "x.y", "lease_id": "L", "granted_s": 60.0, "expires_at": 1.0}
    fake = {"ok": True, "grant": {"target": "s", "group": "g", "hops": [hop]}}

    async def for_another(msg: ControlMessage) -> dict:
        assert msg.body["auth"]["to"] == "127.0.0.1"  # the CO signs for the broker's address
        return sign_hmac(ControlType.LEASE_GRANT, msg.txid, fake, CO_KEY, key_id="broker",
                         to="co12")

    async def main() -> None:
        server = PeerServer(for_another, port=0, host="127.0.0.1")
        await server.start()
        try:
            client = co.BrokerClient("127.0.0.1", "co14", CO_KEY, port=server.port, timeout=2,
                                     co_address="127.0.0.1")
            await client.arequest("s", 10, 0.1)
        finally:
            await server.stop()

    with pytest.raises(co.BrokerUnreachable, match="not for this receiver"):
        asyncio.run(main())


@pytest.mark.parametrize("signer", [None, bytes(32), CO_KEY])
def test_a_grant_not_signed_by_the_broker_for_this_co_is_refused(signer: bytes | None) -> None:
    """A host advertising itself as the broker cannot hand a CO a grant: accepted answers
    must carry the broker's HMAC under this CO's key, over LEASE_GRANT and our txid."""
    hop = {"service": "s", "instance": "r1/s@1", "address": "127.0.0.1", "port": 4341,
           "credential": "x.y", "lease_id": "L", "granted_s": 60.0, "expires_at": 1.0}
    fake = {"ok": True, "grant": {"target": "s", "group": "g", "hops": [hop]}}

    async def impostor(msg: ControlMessage) -> dict:
        if signer is None:
            return fake
        # signer CO_KEY: the right key, but over the request's own type, not LEASE_GRANT
        return sign_hmac(msg.type if signer == CO_KEY else ControlType.LEASE_GRANT,
                         msg.txid, fake, signer, key_id="broker", to="co14")

    async def main() -> None:
        server = PeerServer(impostor, port=0, host="127.0.0.1")
        await server.start()
        try:
            client = co.BrokerClient("127.0.0.1", "co14", CO_KEY, port=server.port, timeout=2,
                                     co_address="127.0.0.1")
            await client.arequest("s", 10, 0.1)
        finally:
            await server.stop()

    with pytest.raises(co.BrokerUnreachable, match="not from the broker"):
        asyncio.run(main())
