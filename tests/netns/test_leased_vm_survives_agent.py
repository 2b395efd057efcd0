"""A leased VM through a crash of its router's agent (issue 13, item 3, with issue 10's broker).

r22a runs the leased text2html VM, registered with the broker on r22b; co14 holds a lease and
its credential is honoured. ``kill -9`` of r22a's agent: the restarted agent takes the VM's
object over from its record (same pid, still holding its service key, so the lease's
credential is still honoured), and its broker registration learns the VM again (it tells the
broker anew, and removing the VM afterwards takes it out of the broker's directory: the new
agent knows what to deregister).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

import test_broker_instances_patent as broker_net
from agent.core.errors import ControlError
from agent.core.wait import wait_until
from agent.hosting.sandbox import proc_start_time
from agent.vm.repository import package_service, publish_service
from topologies.patent import PatentTopo

ROUTER, VM, PORT = broker_net.ROUTER, broker_net.VM, broker_net.PORT


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("leased")
    with broker_net.BrokerNetwork(PatentTopo()) as m:
        signed = package_service(broker_net.SERVICES / "text2html", "text2html", "1.0", "acme",
                                 m.provider_key, tmp / "text2html")
        publish_service(signed.path, m.net[m.site].repo_root)
        yield m


def object_pid(m: broker_net.MoatNetwork) -> int:
    (vm,) = [v for v in m.agent(ROUTER).call("vm") if v["name"] == VM]
    return vm["objects"]["text2html"]["pid"]


def test_a_leased_vm_outlives_its_agent_with_its_lease_and_its_broker_entry(
        net: broker_net.BrokerNetwork, tmp_path: Path) -> None:
    answer = net.provision(ROUTER, vm=VM, kind="service", service="text2html", port=PORT,
                           leased=True, share=40, policy={"max_duration_s": 600},
                           resources={"cpu": 0.5, "memory_mb": 256, "pids": 64})
    assert answer["ok"], answer
    iid, _ = net.wait_for(lambda: broker_net.instance(net, broker_net.INSTANCE), timeout=10)
    grant = broker_net.co(net, op="lease", request={"target": "text2html", "share": 10,
                                                    "cpu": 0.1, "duration": 60})
    assert grant["ok"], grant
    (hop,) = grant["grant"]["hops"]
    credential = hop["credential"]
    assert broker_net.call(net, tmp_path, credential=credential, client="co14-lease", seq=1)["ok"]
    pid = object_pid(net)

    old = net.agent(ROUTER).call("status")["pid"]
    os.kill(old, signal.SIGKILL)

    def back() -> dict | None:
        try:
            status = net.client.call(ROUTER, "status", timeout=1)
        except ControlError:
            return None
        return status if status["pid"] != old and status.get("recovered_vms") is not None else None

    status = wait_until(back, 20, interval=0.02, what=f"{ROUTER}'s agent back with its VMs")
    assert status["recovered_vms"]["adopted"] == [f"{VM}/text2html"], status["recovered_vms"]
    assert object_pid(net) == pid, "taken over, not restarted"
    # The new agent told the broker about the VM again (same instance id: same epoch).
    net.wait_for(lambda: net.agent(ROUTER).call("instances")["registered"] == {iid: "text2html"},
                 timeout=10)
    assert iid in broker_net.listed(net)
    # The lease's credential is still honoured; a forged one still refused.
    served = broker_net.call(net, tmp_path, credential=credential, client="co14-lease", seq=2)
    assert served["ok"] is True, served
    forged = broker_net.call(net, tmp_path, credential="eyJ2IjoxfQ.AAAA")
    assert forged["credential_error"] == "forged", forged

    net.agent(ROUTER).call("vm_remove", name=VM)
    net.wait_for(lambda: iid not in broker_net.listed(net), timeout=5)
    wait_until(lambda: proc_start_time(pid) is None, 5, what="the object gone")
