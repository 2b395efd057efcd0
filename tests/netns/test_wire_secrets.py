"""No secret of a run crosses the wire in clear, and a router message is for one receiver,
once (issue 12, items 1 and 3).

One PatentTopo run captures every router's interfaces and every LAN bridge while the counter
object migrates both ways and the remote site provisions a mobile object that then migrates
in its VM (MIGRATE, STATE_TRANSFER, PROVISION with ``mobile``); then every capture is
searched for every key of the run (Mobile-Home, Mobile-Foreign, Foreign-Home, the router key,
the COs' keys, the routers' X25519 private keys), raw, in hex and in base64 at any alignment.
Then a signed router message is replayed to its receiver, sent to another router, and replayed again
after its receiver's agent restarted.
"""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
from pathlib import Path

import pytest

from agent.core.msgauth import sign_hmac
from packets import ControlType
from topologies.moatnet import MoatNetwork
from topologies.patent import PatentTopo
from topologies.run import ENV_RUN_ID
from vm_services import publish

HOA = "r22b"


def encodings(key: bytes) -> list[bytes]:
    """Every form a key could take on the wire: raw, hex (both cases) and base64 (standard
    and URL-safe) wherever it starts in the encoded data (three alignments)."""
    forms = [key, key.hex().encode(), key.hex().upper().encode()]
    for shift in range(3):
        forms.append(base64.b64encode(key[shift:])[:28])
        forms.append(base64.urlsafe_b64encode(key[shift:])[:28])
    return forms


def find_secrets(paths: list[Path], secrets: dict[str, bytes]) -> list[tuple[str, str]]:
    """(capture, secret name) for every secret found in any of its forms."""
    found = []
    for path in paths:
        data = path.read_bytes()
        for name, key in secrets.items():
            if any(form in data for form in encodings(key)):
                found.append((path.name, name))
    return found


def binding_of(m: MoatNetwork, name: str) -> list[dict]:
    home = m.objects[name].home_address
    return [b for b in m.agent(HOA).call("bindings") if b["home_address"] == home]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory):
    with MoatNetwork(PatentTopo(), objects=["counter", "svc1"], advertise_interval=0.5) as m:
        publish(m, tmp_path_factory.mktemp("svc"), "counter-svc", m.provider_key)
        with contextlib.ExitStack() as stack:
            for router in m.topo.router_names():
                stack.enter_context(m.capture("any", f"router-{router}", node=router))
            for bridge in m.topo.switches():
                stack.enter_context(m.capture(bridge, f"bridge-{bridge}"))
            m.place_object("counter", "r18b")
            m.wait_for(lambda: binding_of(m, "counter"), timeout=15)
            assert m.requests("co14", "counter", 5)["answered"] == 5
            moves = [m.migrate("counter", "r20a", "make-before-break"),
                     m.migrate("counter", "r18b", "break-before-make")]
            assert all(r["ok"] for r in moves), [r.get("error") for r in moves]
            provisioned = m.provision("r18a", vm="m1", kind="service", service="counter-svc",
                                      mobile={"counter": "svc1"})
            assert provisioned["ok"], provisioned
            m.wait_for(lambda: binding_of(m, "svc1"), timeout=15)
            moved = m.migrate("svc1", "r20a", "make-before-break")  # in its VM, with its keys
            assert moved["ok"], moved.get("error")
            assert m.requests("co14", "svc1", 5)["answered"] == 5
        yield m


def test_no_key_of_the_run_is_in_any_capture(run: MoatNetwork) -> None:
    pcaps = sorted((run.run.dir / "captures").glob("*.pcap"))
    assert len(pcaps) == len(run.topo.router_names()) + len(run.topo.switches())
    everything = b"".join(p.read_bytes() for p in pcaps)
    # Not vacuous: the moves and the PROVISION were captured, their public fields readable.
    for seen in (b'"action": "start"', b'"name": "counter"', b'"sealed"', b'"vm": "m1"'):
        assert seen.replace(b" ", b"") in everything.replace(b" ", b""), seen
    secrets = run.keyring.all_secrets()
    assert {"router_key", "mobile_home/counter", "mobile_foreign/svc1", "seal_key/r20a",
            "co_keys/co14"} <= set(secrets)
    assert find_secrets(pcaps, secrets) == []


def test_the_search_finds_a_key_planted_in_a_capture(run: MoatNetwork, tmp_path: Path) -> None:
    """The search above would see a key sent in clear, in any of its forms."""
    pcap = max((run.run.dir / "captures").glob("router-*.pcap"), key=lambda p: p.stat().st_size)
    key = run.keyring.mobile_home["counter"].key
    for i, form in enumerate([key.hex().encode(), base64.b64encode(b"x" + key),
                              json.dumps({"key": key.hex()}).encode(), key]):
        planted = tmp_path / f"planted-{i}.pcap"
        shutil.copy(pcap, planted)
        data = bytearray(planted.read_bytes())
        middle = len(data) // 2
        data[middle:middle + len(form)] = form
        planted.write_bytes(bytes(data))
        assert ("planted-%d.pcap" % i, "mobile_home/counter") in \
            find_secrets([planted], run.keyring.all_secrets())


def test_a_router_message_is_for_one_receiver_once_even_across_a_restart(
        run: MoatNetwork, tmp_path: Path) -> None:
    """A MIGRATE signed for r20a: accepted once, refused when replayed, refused by r18a, and
    refused by r20a again after its agent restarted (its memory is gone, its floor is not)."""
    r20a = run.client.address("r20a")
    body = sign_hmac(ControlType.MIGRATE, 0, {"action": "cancel", "name": "nothing-here"},
                     bytes.fromhex(run.keyring.router_key), to=r20a)
    path = tmp_path / "cancel.json"
    path.write_text(json.dumps(body))

    def send(router: str) -> dict:
        return run.probe("co12", "control", run.client.address(router), "migrate", f"@{path}")

    assert send("r20a")["ok"]
    replayed = send("r20a")
    assert not replayed["ok"] and "replayed" in replayed["error"], replayed
    elsewhere = send("r18a")
    assert not elsewhere["ok"] and "not for this receiver" in elsewhere["error"], elsewhere

    node, info = run.net["r20a"], run.topo.nodeInfo("r20a")
    node.stop_daemon()
    node.start_daemon(info["daemon_argv"], log_path=info["daemon_log"], cwd=info["daemon_cwd"],
                      env={ENV_RUN_ID: run.run.run_id})
    run.wait_agents(30)
    after = send("r20a")
    assert not after["ok"] and "not after" in after["error"], after
