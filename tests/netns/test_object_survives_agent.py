"""An object process outlives a crash of its router's agent (issue 13, item 3).

The counter runs on r18b (net 12, registered through the FOA r18a with the HOA r22b) while
co14 sends it a steady stream of requests. ``kill -9`` of r18b's agent does not touch the
object: its relay (root, outside the object's namespaces) holds the agent's end of the
object's channel, the object keeps its sockets on the home address and serves on through
the outage. The supervisor brings the agent back; it reads its registry, proves the relay
is the one it started (pid and start time, cgroup, the object's pid) and takes the object
over: ``objects`` lists it with the same pid, ``object_state`` answers, and the counter's
value is the number of requests co14 saw answered — nothing lost, nothing counted twice.
Both ways an object can start (issue 14): forked by the agent's fork server, which dies with
the agent (the object must not), and exec'd through a launcher.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from agent.core.errors import ControlError
from agent.core.wait import wait_until
from agent.hosting.sandbox import ENV_SANDBOX_START, START_MODES, proc_start_time
from experiments.handoff import load_generator, read_requests, state_survived
from topologies.moatnet import MoatNetwork
from topologies.patent import PatentTopo
from topologies.run import processes_of_run

ROUTER = "r18b"


@pytest.fixture(scope="module", params=START_MODES)
def start(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def net(start: str):
    with pytest.MonkeyPatch.context() as env:
        env.setenv(ENV_SANDBOX_START, start)  # the agents inherit it
        with MoatNetwork(PatentTopo(), advertise_interval=0.5) as m:
            m.place_object("counter", ROUTER)
            m.wait_for(lambda: m.agent("r22b").call("bindings"), timeout=15)
            yield m


def forked(pid: int) -> bool:
    """The object runs in a process its agent's fork server forked (its command line is the
    server's), not an exec'd runtime."""
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return b"agent.hosting.forkserver" in f.read()


def agent_pid(m: MoatNetwork) -> int | None:
    try:
        return m.client.call(ROUTER, "status", timeout=1)["pid"]
    except ControlError:
        return None


def hosted(m: MoatNetwork) -> dict:
    rows = [o for o in m.agent(ROUTER).call("objects") if o["name"] == "counter"]
    assert len(rows) == 1, rows
    return rows[0]


def test_the_object_serves_through_a_crash_of_its_agent_and_is_taken_over_exactly(
        net: MoatNetwork, start: str, tmp_path) -> None:
    before = hosted(net)
    object_pid = before["pid"]
    assert object_pid and os.path.exists(f"/proc/{object_pid}")
    assert forked(object_pid) == (start == "fork")
    served_before = net.agent(ROUTER).call("object_stats", name="counter")["state"]["count"]
    assert served_before == 0
    out = tmp_path / "requests.jsonl"
    with load_generator(net, rate=100, duration=8.0, out=out) as load:
        # The stream is flowing before the crash.
        wait_until(lambda: net.agent(ROUTER).call("object_stats", name="counter")["state"]["count"] >= 50,
                   10, what="the counter serving co14")
        old = agent_pid(net)
        assert old is not None
        os.kill(old, signal.SIGKILL)
        killed_at = time.time()
        new = wait_until(lambda: (p := agent_pid(net)) not in (None, old) and p, 20, interval=0.01,
                         what=f"{ROUTER}'s agent answering again")
        back_at = time.time()
        assert os.path.exists(f"/proc/{object_pid}"), "the object outlived its agent"
        assert new != old
        load.wait(timeout=30)
    after = hosted(net)
    assert after["pid"] == object_pid, "taken over, not restarted"
    status = net.agent(ROUTER).call("status")
    assert status["recovered_objects"]["adopted"] == ["counter"], status["recovered_objects"]
    assert status["recovered_objects"]["restarted"] == [] and status["recovered_objects"]["lost"] == []
    state = net.agent(ROUTER).call("object_state", name="counter")
    requests = read_requests(out)
    answered_in_outage = [q for q in requests
                          if q["replies"] and killed_at <= q["sent"] and
                          min(r["at"] for r in q["replies"]) < back_at]
    assert answered_in_outage, "requests were answered while the agent was down"
    survived = state_survived(requests)
    lost = [q["seq"] for q in requests if not q["replies"]]
    print(f"agent down {back_at - killed_at:.3f} s; {len(answered_in_outage)} requests answered "
          f"meanwhile; {len(requests)} sent, {survived['answered']} answered, lost {lost}")
    assert survived["exact"], survived
    assert state["object"]["count"] == survived["answered"], "counted once each, none lost"
    # Its registration client is back too: a renewal goes through.
    assert net.agent(ROUTER).call("register", name="counter")["code"] == 0
    again = net.requests("co14", "counter", 20)["answered"]
    assert again > 0
    assert net.agent(ROUTER).call("object_stats", name="counter")["state"]["count"] == \
        survived["answered"] + again


def test_an_object_whose_processes_died_with_no_agent_restarts_from_its_checkpoint(
        net: MoatNetwork, start: str) -> None:
    """The fallback: kill -9 of the agent and of the object's relay (the object dies with
    it). The restarted agent finds the relay gone and starts the object again from the last
    checkpoint in its registry (written every few seconds), with its uid, address and
    registration; nothing of the dead one is left."""
    count = net.agent(ROUTER).call("object_stats", name="counter")["state"]["count"]
    hosted_dir = net.run.dir / f"{ROUTER}-hosted"

    # A periodic checkpoint holds the count (no request is in flight: the last test's ended).
    def checkpointed() -> bool:
        doc = json.loads((hosted_dir / "objects.json").read_text())
        cp = doc["objects"]["counter"].get("checkpoint")
        return bool(cp) and cp["object"]["count"] == count

    wait_until(checkpointed, 15, what="a checkpoint of the current count in the registry")
    old_object = hosted(net)["pid"]
    record = json.loads((hosted_dir / "objects.json").read_text())["objects"]["counter"]["process"]
    relay = record["relay"]["relay_pid"]
    assert relay in processes_of_run(net.run.run_id), "moat clean finds the relay by run id"
    old = agent_pid(net)
    os.kill(old, signal.SIGKILL)
    os.kill(relay, signal.SIGKILL)
    wait_until(lambda: (p := agent_pid(net)) not in (None, old) and p, 20, interval=0.01,
               what=f"{ROUTER}'s agent answering again")
    status = net.agent(ROUTER).call("status")
    assert status["recovered_objects"]["restarted"] == ["counter"], status["recovered_objects"]
    now = hosted(net)
    assert now["pid"] != old_object and forked(now["pid"]) == (start == "fork")
    # Dead with its relay (PR_SET_PDEATHSIG); a zombie until whoever adopted it reaps it.
    wait_until(lambda: proc_start_time(old_object) is None, 5, what="the old object gone")
    assert net.agent(ROUTER).call("object_stats", name="counter")["state"]["count"] == count
    assert net.requests("co14", "counter", 10)["answered"] > 0
