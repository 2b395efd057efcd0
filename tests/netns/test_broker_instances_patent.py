"""The router side of the service broker in the patent's topology (issue 10, items 2 and 4),
with real namespaces and real packets: a leased text2html VM on r22a registers with the
broker on r22b (its capacity: the PROVISION's share, the VM's CPU), refuses requests without
a valid credential (Fig. 10, 164), serves one with the credential of a real lease that co14
gets from the broker (Fig. 12), refuses it ``revoked`` within a second of the cancel, and
leaves the broker's directory when the VM is removed."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agent.core.config import AgentConfig, BrokerConfig
from agent.vm.repository import package_service, publish_service
from topologies.moatnet import MoatNetwork
from topologies.patent import PatentTopo

REPO = Path(__file__).resolve().parents[2]
SERVICES = REPO / "services"
BROKER, ROUTER, CO = "r22b", "r22a", "co14"
VM, PORT = "leased-html", 5111
CO_KEY = secrets.token_bytes(32)
#: Instance ids are "<router>/<vm>@<epoch>": a VM provisioned again is another instance.
INSTANCE = f"{ROUTER}/{VM}@"

#: The corresponding object's side, run inside co14: LEASE_* messages signed with its own key
#: (read from stdin, never the command line), and service requests until one is refused.
CO_SCRIPT = r"""
import asyncio, json, socket, sys, time
from agent.core.msgauth import sign_hmac
from agent.core.peer import PeerRefused, peer_call
from packets import ControlMessage, ControlType

args = json.loads(sys.stdin.read())

async def broker(ctype, body, txid):
    ctype = ControlType[ctype]
    signed = sign_hmac(ctype, txid, body, bytes.fromhex(args["key"]), key_id=args["co"],
                       to=args["broker"])
    try:
        return await peer_call(args["broker"], ctype, signed, txid=txid, timeout=5)
    except PeerRefused as exc:
        return dict(exc.answer, ok=False)

def request(seq, credential):
    body = {"client": "co14-lease", "seq": seq, "text": "leased", "credential": credential}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        s.sendto(ControlMessage(ControlType.SERVICE_REQUEST, seq, body).encode(),
                 (args["service"], args["port"]))
        return ControlMessage.decode(s.recv(65535)).body

out = {}
if args["op"] == "lease":
    out = asyncio.run(broker("LEASE_REQUEST", {"request": args["request"]}, 11))
elif args["op"] == "cancel_then_request":
    seq = args["seq"]
    out["cancel"] = asyncio.run(broker("LEASE_CANCEL", {"lease_id": args["lease_id"]}, 12))
    cancelled = time.monotonic()
    while time.monotonic() - cancelled < 3.0:
        seq += 1
        reply = request(seq, args["credential"])
        if not reply.get("ok"):
            out.update(reply=reply, after_s=time.monotonic() - cancelled, requests=seq - args["seq"])
            break
print(json.dumps(out))
"""


class BrokerNetwork(MoatNetwork):
    """MoatNetwork with the run's broker on r22b, written into every router's configuration
    (until ``moat up --broker`` does it: the topology side is another change)."""

    def agent_config(self, router: str) -> AgentConfig:
        cfg = super().agent_config(router)
        cfg.broker = BrokerConfig(address=str(self.topo.addresses(BROKER)[0].ip),
                                  serve=router == BROKER, co_keys={CO: CO_KEY},
                                  lease_default_s=30, lease_max_s=120)
        return cfg


def co(m: MoatNetwork, **args: Any) -> dict:
    """Run :data:`CO_SCRIPT` inside co14 with ``args``; its JSON answer."""
    args = dict(args, key=CO_KEY.hex(), co=CO, broker=str(m.topo.addresses(BROKER)[0].ip),
                service=router_address(m), port=PORT)
    proc = m.client.popen(CO, [sys.executable, "-c", CO_SCRIPT], stdin=subprocess.PIPE, cwd=REPO)
    out, err = proc.communicate(json.dumps(args).encode(), timeout=30)
    assert proc.returncode == 0, err.decode()[-800:]
    return json.loads(out.decode().strip().splitlines()[-1])


def router_address(m: MoatNetwork) -> str:
    return str(m.topo.addresses(ROUTER)[0].ip)


def call(m: MoatNetwork, tmp: Path, **body: Any) -> dict:
    """One service request from co14 (the probe), with whatever ``body`` says."""
    req = tmp / f"req-{secrets.token_hex(4)}.json"
    req.write_text(json.dumps({"text": "hello", **body}))
    return m.probe(CO, "service", router_address(m), str(PORT), f"@{req}")


def instance(m: MoatNetwork, prefix: str) -> tuple[str, dict] | None:
    """The broker's entry of the one instance whose id starts with ``prefix``, if listed."""
    found = [(iid, e) for iid, e in listed(m).items() if iid.startswith(prefix)]
    assert len(found) <= 1, found
    return found[0] if found else None


def listed(m: MoatNetwork) -> dict[str, dict]:
    """The broker's directory (``moat show services``): instance id -> instance."""
    return {i["instance_id"]: i for s in m.agent(BROKER).call("services") for i in s["instances"]}


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("leased")
    with BrokerNetwork(PatentTopo()) as m:
        signed = package_service(SERVICES / "text2html", "text2html", "1.0", "acme",
                                 m.provider_key, tmp / "text2html")
        publish_service(signed.path, m.net[m.site].repo_root)
        yield m


def test_a_leased_service_from_registration_to_revocation(net: BrokerNetwork, tmp_path: Path) -> None:
    answer = net.provision(ROUTER, vm=VM, kind="service", service="text2html", port=PORT,
                           leased=True, share=40, policy={"max_duration_s": 600},
                           resources={"cpu": 0.5, "memory_mb": 256, "pids": 64})
    assert answer["ok"], answer

    # registered with the broker, with its capacity (Fig. 12 directory, step 208)
    iid, entry = net.wait_for(lambda: instance(net, INSTANCE), timeout=10)
    assert (entry["service"], entry["address"], entry["port"], entry["router"]) == \
        ("text2html", router_address(net), PORT, ROUTER)
    assert (entry["share"], entry["cpu"]) == (40.0, 0.5)
    assert entry["objects"] == ["text2html"] and entry["lifecycle"]["max_duration_s"] == 600
    assert net.agent(ROUTER).call("instances")["registered"] == {iid: "text2html"}

    # no credential, a forged one: refused with the reason, the object untouched
    missing = call(net, tmp_path)
    assert missing["ok"] is False and missing["credential_error"] == "missing", missing
    forged = call(net, tmp_path, credential="eyJ2IjoxfQ.AAAA")
    assert forged["credential_error"] == "forged", forged

    # a real lease from the broker, asked by co14 with its own key
    grant = co(net, op="lease", request={"target": "text2html", "share": 10, "cpu": 0.1,
                                         "duration": 60})
    assert grant["ok"], grant
    (hop,) = grant["grant"]["hops"]
    assert (hop["instance"], hop["address"], hop["port"]) == (iid, router_address(net), PORT)
    served = call(net, tmp_path, credential=hop["credential"], client="co14-lease", seq=1)
    assert served["ok"] is True, served
    assert served["served_by"] == ROUTER and "<html" in served["result"]["html"].lower()
    usage = listed(net)[iid]
    assert usage["leases"] == 1 and usage["used_share"] == 10

    # cancelled: the broker pushes the revocation, the object refuses within a second
    out = co(net, op="cancel_then_request", lease_id=hop["lease_id"],
             credential=hop["credential"], seq=1)
    assert out["cancel"]["ok"], out
    assert out["reply"]["credential_error"] == "revoked", out
    assert out["after_s"] < 1.0, out

    # removed: the broker no longer lists it
    net.agent(ROUTER).call("vm_remove", name=VM)
    net.wait_for(lambda: iid not in listed(net), timeout=5)
    assert net.agent(ROUTER).call("instances")["registered"] == {}


def test_an_open_service_serves_without_credentials_and_is_listed(net: BrokerNetwork,
                                                                   tmp_path: Path) -> None:
    """Without ``leased`` nothing changes for the service's clients; it is still in the
    directory (the broker leases it; the object just does not check)."""
    answer = net.provision("r22c", vm="open-html", kind="service", service="text2html",
                           port=PORT, resources={"cpu": 0.5, "memory_mb": 256, "pids": 64})
    assert answer["ok"], answer
    iid, entry = net.wait_for(lambda: instance(net, "r22c/open-html@"), timeout=10)
    assert (entry["share"], entry["cpu"]) == (100.0, 0.5)
    address = str(net.topo.addresses("r22c")[0].ip)
    req = tmp_path / "open.json"
    req.write_text(json.dumps({"text": "hello"}))
    assert net.probe(CO, "service", address, str(PORT), f"@{req}")["ok"] is True
    net.agent("r22c").call("vm_remove", name="open-html")
    net.wait_for(lambda: iid not in listed(net), timeout=5)
