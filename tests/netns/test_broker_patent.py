"""The service broker from a corresponding object's side, on real namespaces and packets
(issue 10, items 1, 3, 6, 7, 9): PatentTopo with the default broker on r22b; co14 on net 14
finds it by advertisement or, with advertisements slowed down, by solicitation; bad LEASE_*
messages are refused with the broker's reason and change nothing; the broker's UDP and TCP
4340 survive fuzzing; the four converter services run leased on the home and border routers,
``text -> rtf`` is leased, run on a file, renewed and cancelled through the ``moat`` command,
and a cancelled lease's credential is refused ``revoked``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from agent.core.msgauth import sign_hmac
from agent.core.wait import wait_until
from agent.vm.repository import package_service, publish_service
from agent.vm.signing import load_private_key
from packets import ControlType
from topologies.client import CO_KEYS_FILE, BrokerRefusal
from topologies.moatnet import MoatNetwork
from topologies.patent import PatentTopo

SERVICES = Path(__file__).resolve().parents[2] / "services"
MOAT = [sys.executable, "-m", "experiments.cli"]
BROKER = "10.16.0.2"  # r22b
#: The converters, leased, on the home routers and net 14's border (formats for the paths).
CONVERTERS = {"text2html": ("r22a", 5101, "text", "html"), "html2rtf": ("r22c", 5102, "html", "rtf"),
              "text2word": ("r18a", 5103, "text", "word"), "word2rtf": ("r20a", 5104, "word", "rtf")}
TEXT = "Mobile objects {move}\\between routers.\n\nCafé and braces } too."


def package_converter(m: MoatNetwork, tmp: Path, name: str, consumes: str, produces: str) -> Path:
    """The service signed with the run's provider key; its object.json declares the formats
    it converts, which packaging puts in the signed manifest."""
    signed = package_service(SERVICES / name, name, "1.0", "acme", load_private_key(m.provider_key),
                             tmp / name)
    assert (signed.manifest.consumes, signed.manifest.produces) == (consumes, produces)
    return signed.path


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    with MoatNetwork(PatentTopo()) as m:
        yield m


@pytest.fixture(scope="module")
def converters(net: MoatNetwork, tmp_path_factory) -> MoatNetwork:
    """The four converters provisioned leased; registered with the broker by their routers."""
    pytest.importorskip("docx", reason="python-docx is installed by make setup")
    tmp = tmp_path_factory.mktemp("converters")
    for name, (router, port, consumes, produces) in CONVERTERS.items():
        publish_service(package_converter(net, tmp, name, consumes, produces),
                        net.net[net.site].repo_root)
        answer = net.provision(router, vm=name, kind="service", service=name, port=port,
                               leased=True, resources={"cpu": 1.0, "memory_mb": 512, "pids": 64})
        assert answer["ok"], answer
    wait_until(lambda: len(net.client.services()) == len(CONVERTERS), 15,
               what="four services registered with the broker")
    return net


def moat(net: MoatNetwork, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*MOAT, *args, "--run", net.run.run_id], capture_output=True,
                          text=True, timeout=timeout)


def co_key(net: MoatNetwork, host: str) -> bytes:
    return bytes.fromhex(json.loads((net.run.dir / CO_KEYS_FILE).read_text())[host])


def send_signed(net: MoatNetwork, tmp: Path, ctype: ControlType, body: dict, key: bytes,
                key_id: str = "co14", times: int = 1) -> list[dict]:
    """``body`` signed and sent from co14 ``times`` times, byte for byte the same: the
    broker's answers (with their reason codes)."""
    path = tmp / f"{ctype.name}-{key_id}.json"
    path.write_text(json.dumps(sign_hmac(ctype, 7, body, key, key_id=key_id, to=BROKER)))
    return [net.client.tool("co14", "nodetools.co", "send", BROKER, ctype.name, str(path),
                            "--txid", "7") for _ in range(times)]


def tables(net: MoatNetwork) -> tuple:
    return (json.dumps(net.client.services(), sort_keys=True, default=str).count("instance_id"),
            [row["lease_id"] for row in net.client.leases()])


# --- finding the broker (step 200) ------------------------------------------------------------


def test_slow_advertisements_leave_solicitation_to_find_the_broker() -> None:
    """A network of its own (advertisements every 60 s), so this test comes first in the
    module: the module's network (``net``) is made lazily by the next test, and only one
    Mininet network runs at a time (the bridge names are fixed)."""
    with MoatNetwork(PatentTopo(), broker_advertise_interval=60.0) as m:
        for router in m.topo.router_names():
            assert m.client.call(router, "status")["broker"]["address"] == BROKER
        # Let the start-up advertisements pass, so only the periodic (60 s) ones remain.
        first = m.client.tool("co14", "nodetools.co", "discover", "--mode", "listen",
                              "--timeout", "0.5")
        if first["ok"]:  # the start-up burst was still under way: the next is a minute off
            first = m.client.tool("co14", "nodetools.co", "discover", "--mode", "listen",
                                  "--timeout", "2")
        assert first["ok"] is False and first["reason"] == "no_broker", first
        found = m.client.tool("co14", "nodetools.co", "discover", "--mode", "solicit",
                              "--timeout", "2")
        assert found["ok"] and found["broker"] == BROKER and found["how"] == "solicited"
        assert found["delay"] < 1.0 and found["sender"] == "10.14.0.1"


def test_co14_hears_the_broker_advertised_by_its_router(net: MoatNetwork) -> None:
    found = net.client.tool("co14", "nodetools.co", "discover", "--mode", "listen",
                            "--timeout", "5")
    assert found["ok"] and found["broker"] == BROKER and found["port"] == 4340
    assert found["how"] == "advertisement" and found["sender"] == "10.14.0.1"  # r20a, TTL 1
    assert found["router"] == "r20a"


# --- refusals change nothing --------------------------------------------------------------------


def test_bad_lease_requests_are_refused_with_the_reason_and_change_nothing(
        net: MoatNetwork, tmp_path: Path) -> None:
    before = tables(net)
    assert before[1] == []
    key = co_key(net, "co14")
    request = {"request": {"target": "text2html", "share": 10, "cpu": 0.1, "duration": 10},
               "co_address": "10.14.0.30"}
    malformed = send_signed(net, tmp_path, ControlType.LEASE_REQUEST,
                            {"request": {"target": 5, "share": "all"}}, key)[0]
    assert malformed["ok"] is False and malformed["reason"] == "bad_request", malformed
    first, replayed = send_signed(net, tmp_path, ControlType.LEASE_REQUEST,
                                  dict(request, request=dict(request["request"], target="nosuch")),
                                  key, times=2)
    assert first["reason"] == "unknown_service", first
    assert replayed["reason"] == "bad_credentials" and "replayed" in replayed["detail"], replayed
    wrong = send_signed(net, tmp_path, ControlType.LEASE_REQUEST, request, co_key(net, "co12"))[0]
    assert wrong["reason"] == "bad_credentials", wrong
    stranger = send_signed(net, tmp_path, ControlType.LEASE_REQUEST, request, key, key_id="co99")[0]
    assert stranger["reason"] == "bad_credentials", stranger
    unsigned = tmp_path / "unsigned.json"
    unsigned.write_text(json.dumps(request))
    answer = net.client.tool("co14", "nodetools.co", "send", BROKER, "lease_request", str(unsigned))
    assert answer["reason"] == "bad_credentials", answer
    with pytest.raises(BrokerRefusal) as unknown:
        net.client.lease_request("co14", "nosuch", 10, 0.1)
    assert unknown.value.reason == "unknown_service"
    assert tables(net) == before


def test_the_brokers_udp_and_tcp_4340_survive_fuzzing(net: MoatNetwork) -> None:
    pid = net.client.call("r22b", "status")["pid"]
    before = tables(net)
    tally = net.probe("co14", "ctlfuzz", BROKER, "--count", "150", "--seed", "10", timeout=300)
    assert tally["sent"] == 150 and tally["timeout"] == 0 and tally["answered"] > 0, tally
    script = (
        "import random, socket\n"
        "from nodetools.probes import mutate\n"
        "from packets import ControlMessage, ControlType\n"
        "rng = random.Random(10)\n"
        "seeds = [ControlMessage(ControlType.BROKER_SOLICIT, 1, {}).encode(),\n"
        "         ControlMessage(ControlType.BROKER_ADVERT, 2, {'broker': '10.14.0.30'}).encode()]\n"
        "with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:\n"
        "    for i in range(400):\n"
        "        s.sendto(mutate(rng, rng.choice(seeds)), ('%s', 4340))\n"
        "print(400)\n" % BROKER)
    proc = net.client.popen("co14", [sys.executable, "-c", script])
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and out.strip() == b"400", err
    status = net.client.call("r22b", "status")
    assert status["pid"] == pid
    assert tables(net) == before
    found = net.client.tool("co14", "nodetools.co", "discover", "--mode", "solicit")
    assert found["ok"] and found["broker"] == BROKER  # still answers solicitations


# --- leases through the moat command, end to end ------------------------------------------------


def test_text_to_rtf_leased_run_renewed_and_cancelled_with_moat(converters: MoatNetwork,
                                                                 tmp_path: Path) -> None:
    net = converters
    listed = moat(net, "service", "list", "--from", "co14", "--json")
    assert listed.returncode == 0, listed.stderr
    assert {s["service"] for s in json.loads(listed.stdout)} == set(CONVERTERS)

    asked = moat(net, "service", "request", "text -> rtf", "--from", "co14", "--share", "20",
                 "--cpu", "0.2", "--duration", "60", "--json")
    assert asked.returncode == 0, asked.stderr
    grant = json.loads(asked.stdout)
    assert len(grant["hops"]) == 2 and grant["hops"][-1]["produces"] == "rtf"
    leases = [h["lease_id"] for h in grant["hops"]]
    shown = json.loads(moat(net, "show", "leases", "--json").stdout)
    assert sorted(r["lease_id"] for r in shown) == sorted(leases)
    assert {r["holder"] for r in shown} == {"co14"}

    doc = tmp_path / "doc.txt"
    doc.write_text(TEXT)
    out = tmp_path / "doc.rtf"
    called = moat(net, "service", "call", leases[0], str(doc), "--from", "co14", "--out", str(out))
    assert called.returncode == 0, called.stderr
    rtf = out.read_text()
    assert rtf.startswith("{\\rtf1") and "Caf" in rtf and "braces" in rtf

    renewed = moat(net, "lease", "renew", leases[1], "--duration", "90", "--json")
    assert renewed.returncode == 0, renewed.stderr
    assert json.loads(renewed.stdout)["granted_s"] == 90

    kept = json.loads((net.run.dir / "grants" / f"{grant['group']}.json").read_text())
    old = tmp_path / "grant.json"
    old.write_text(json.dumps(kept))
    cancelled = moat(net, "lease", "cancel", leases[0])
    assert cancelled.returncode == 0, cancelled.stderr
    assert [r["lease_id"] for r in net.client.leases()] == [leases[1]]
    # The cancelled lease's credential is refused by its object (LEASE_REVOKE reached it).
    with pytest.raises(BrokerRefusal) as refused:
        net.client.co("co14", "call", str(old), str(doc))
    assert refused.value.reason == "revoked", refused.value.answer

    again = moat(net, "lease", "cancel", leases[0])
    assert again.returncode == 1 and again.stderr.startswith(f"moat: {leases[0]} is not a lease")
    assert moat(net, "lease", "cancel", leases[1]).returncode == 0
    assert net.client.leases() == []


def test_a_goal_call_leases_for_itself_and_releases_after(converters: MoatNetwork,
                                                          tmp_path: Path) -> None:
    doc = tmp_path / "doc.txt"
    doc.write_text(TEXT)
    called = moat(converters, "service", "call", "text -> rtf", str(doc), "--from", "co14")
    assert called.returncode == 0, called.stderr
    assert called.stdout.startswith("{\\rtf1") and "->" in called.stderr
    assert converters.client.leases() == []
    refused = moat(converters, "service", "request", "text -> pdf", "--from", "co14")
    assert refused.returncode == 1 and "unknown_service" in refused.stderr
    assert refused.stderr.count("\n") == 1
