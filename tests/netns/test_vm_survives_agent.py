"""A provisioned VM's objects outlive a crash of their router's agent (issue 13, item 3).

r18b runs VM ``vc``: the signed counter service from the remote site, its object mobile as
``counter`` (registered through the FOA r18a with the HOA r22b), its egress capped by an htb
class. co14 sends the counter a steady stream of requests; ``kill -9`` of r18b's agent does
not touch the object (its relay holds the channel). The supervisor brings the agent back; it
reads the VM record (``<run>/r18b-hosted/vms.json``), rebuilds its VM table and takes the
object over: same pid, the counter's value the number of requests co14 saw answered, the
cap still there and still the VM's (removing the VM removes it), the registration renewed.
When the object's processes died too while no agent watched, it restarts from the record's
last checkpoint. Removing the VM removes its record.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from agent.core.errors import ControlError
from agent.core.wait import wait_until
from agent.hosting.sandbox import proc_start_time
from experiments.handoff import load_generator, read_requests, state_survived
from topologies.moatnet import MoatNetwork
from topologies.patent import PatentTopo
from vm_services import publish

ROUTER = "r18b"
HOA = "r22b"
VM = "vc"
CAP = "rate 2Mbit"


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory):
    with MoatNetwork(PatentTopo(), objects=["counter"], advertise_interval=0.5) as m:
        publish(m, tmp_path_factory.mktemp("svc"), "counter-svc", m.provider_key)
        answer = m.provision(ROUTER, vm=VM, kind="service", service="counter-svc",
                             mobile={"counter": "counter"},
                             resources={"cpu": 0.5, "memory_mb": 256, "pids": 64, "egress_kbit": 2000})
        assert answer["ok"], answer
        m.wait_for(lambda: binding(m), timeout=15)
        yield m


def binding(m: MoatNetwork) -> list[dict]:
    home = m.objects["counter"].home_address
    return [b for b in m.agent(HOA).call("bindings") if b["home_address"] == home]


def agent_pid(m: MoatNetwork) -> int | None:
    try:
        return m.client.call(ROUTER, "status", timeout=1)["pid"]
    except ControlError:
        return None


def restarted_agent(m: MoatNetwork, old: int) -> dict:
    """The new agent's status once it answers and has taken the VM record over."""
    def ready() -> dict | None:
        try:
            status = m.client.call(ROUTER, "status", timeout=1)
        except ControlError:
            return None
        return status if status["pid"] != old and status.get("recovered_vms") is not None else None

    return wait_until(ready, 20, interval=0.01, what=f"{ROUTER}'s agent back with its VMs")


def vm_object_pid(m: MoatNetwork) -> int:
    vms = {v["name"]: v for v in m.agent(ROUTER).call("vm")}
    assert VM in vms, vms
    hosted = [o for o in m.agent(ROUTER).call("objects") if o["name"] == "counter"]
    assert len(hosted) == 1 and hosted[0]["vm"] == [VM, "counter"], hosted
    assert vms[VM]["objects"]["counter"]["pid"] == hosted[0]["pid"]
    return hosted[0]["pid"]


def count(m: MoatNetwork) -> int:
    return m.agent(ROUTER).call("object_stats", name="counter")["state"]["count"]


def record(m: MoatNetwork) -> dict:
    return json.loads((m.run.dir / f"{ROUTER}-hosted" / "vms.json").read_text())["vms"]


def capped(m: MoatNetwork) -> bool:
    return CAP in m.net[ROUTER].cmd(f"tc class show dev {ROUTER}-eth0")


def test_the_vm_object_serves_through_a_crash_of_its_agent_and_is_taken_over_exactly(
        net: MoatNetwork, tmp_path) -> None:
    object_pid = vm_object_pid(net)
    assert capped(net)
    assert list(record(net)) == [VM] and record(net)[VM]["objects"]["counter"]["process"]
    out = tmp_path / "requests.jsonl"
    with load_generator(net, rate=100, duration=8.0, out=out) as load:
        wait_until(lambda: count(net) >= 50, 10, what="the counter serving co14")
        old = agent_pid(net)
        assert old is not None
        os.kill(old, signal.SIGKILL)
        killed_at = time.time()
        status = restarted_agent(net, old)
        back_at = time.time()
        assert os.path.exists(f"/proc/{object_pid}"), "the object outlived its agent"
        load.wait(timeout=30)
    assert status["recovered_vms"] == {"adopted": [f"{VM}/counter"], "restarted": [], "lost": [],
                                       "removed": []}, status["recovered_vms"]
    assert status["vm_record_error"] is None
    assert vm_object_pid(net) == object_pid, "taken over, not restarted"
    vm = net.agent(ROUTER).call("vm")[0]
    assert any(s == "taken over by a restarted agent" for s, _ in vm["steps"])
    requests = read_requests(out)
    answered_in_outage = [q for q in requests if q["replies"] and killed_at <= q["sent"]
                          and min(r["at"] for r in q["replies"]) < back_at]
    assert answered_in_outage, "requests were answered while the agent was down"
    survived = state_survived(requests)
    print(f"agent down {back_at - killed_at:.3f} s; {len(answered_in_outage)} requests answered "
          f"meanwhile; {len(requests)} sent, {survived['answered']} answered")
    assert survived["exact"], survived
    state = net.agent(ROUTER).call("object_state", name="counter")
    assert state["object"]["count"] == survived["answered"], "counted once each, none lost"
    # Its egress cap is still there; its registration client is back (a renewal goes through).
    assert capped(net)
    assert net.agent(ROUTER).call("register", name="counter")["code"] == 0
    assert binding(net)[0]["care_of_address"].startswith("10.12."), binding(net)
    again = net.requests("co14", "counter", 20)["answered"]
    assert again > 0 and count(net) == survived["answered"] + again


def test_a_vm_object_whose_processes_died_with_no_agent_restarts_from_its_checkpoint(
        net: MoatNetwork) -> None:
    """kill -9 of the agent and of the object's relay (the object dies with it): the new
    agent finds the relay gone and starts the VM's object again from the record's last
    checkpoint (written every few seconds), hosted and registered as before."""
    served = count(net)
    wait_until(lambda: (record(net)[VM]["objects"]["counter"].get("checkpoint") or {})
               .get("object", {}).get("count") == served, 15,
               what="a checkpoint of the current count in the VM record")
    old_object = vm_object_pid(net)
    relay = record(net)[VM]["objects"]["counter"]["process"]["relay"]["relay_pid"]
    old = agent_pid(net)
    os.kill(old, signal.SIGKILL)
    os.kill(relay, signal.SIGKILL)
    status = restarted_agent(net, old)
    assert status["recovered_vms"] == {"adopted": [], "restarted": [f"{VM}/counter"], "lost": [],
                                       "removed": []}, status["recovered_vms"]
    now = vm_object_pid(net)
    assert now != old_object
    wait_until(lambda: proc_start_time(old_object) is None, 5, what="the old object gone")
    assert count(net) == served, "restarted with the checkpoint's state"
    assert record(net)[VM]["objects"]["counter"]["process"]["relay"]["object_pid"] == now
    assert net.requests("co14", "counter", 10)["answered"] > 0
    assert count(net) > served


def test_removing_the_vm_removes_its_record_its_cap_and_its_binding(net: MoatNetwork) -> None:
    pid = vm_object_pid(net)
    net.agent(ROUTER).call("vm_remove", name=VM)
    assert record(net) == {}
    assert not capped(net), "the cap the first agent added is removed by the third"
    net.wait_for(lambda: not binding(net), timeout=10)
    wait_until(lambda: proc_start_time(pid) is None, 5, what="the object gone")
    assert net.agent(ROUTER).call("vm") == []
