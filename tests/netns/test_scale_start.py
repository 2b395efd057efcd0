"""18 routers start forked from the run's agent zygote (issue 15, item 1): every agent answers,
each router's supervisor and agent are forks (not execs) of the zygote inside the router's own
namespaces, their memory is mostly shared (PSS measured and printed), a killed agent is forked
again by its supervisor, and the network stops leaving none of them."""

from __future__ import annotations

import os
import signal
import time

from agent.core.errors import ControlError
from agent.core.wait import wait_until
from agent.zygote import memory_kib
from topologies.moatnet import MoatNetwork
from topologies.run import pid_alive, processes_of_run
from topologies.scale import ScaleTopo


def _parent(pid: int) -> int:
    return int(open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()[1])


def _cgroup_mounts(pid: int) -> set[tuple[str, str]]:
    """(mount point, fs type) of the cgroup filesystems ``pid`` sees."""
    found = set()
    for line in open(f"/proc/{pid}/mountinfo"):
        fields = line.split()
        fstype = fields[fields.index("-") + 1]
        if fstype in ("cgroup", "cgroup2") and fields[4].startswith("/sys/fs/cgroup"):
            found.add((fields[4], fstype))
    return found


def _comm(pid: int) -> str:
    return open(f"/proc/{pid}/comm").read().strip()


def test_eighteen_routers_forked_from_the_zygote() -> None:
    topo = ScaleTopo(n_foreign=5, routers_per_net=3)
    routers = topo.router_names()
    assert len(routers) == 18
    started = time.monotonic()
    with MoatNetwork(topo) as m:
        took = time.monotonic() - started
        zygote = m.zygote.pid
        assert zygote is not None
        agents = {r: m.client.call(r, "status", timeout=2)["pid"] for r in routers}
        pss = rss = 0
        for router, pid in agents.items():
            supervisor = m.net[router].daemon_pid
            assert _parent(pid) == supervisor and _parent(supervisor) == zygote
            assert _comm(pid) == f"agent-{router}" and _comm(supervisor) == f"sup-{router}"
            # In the router's namespaces (its node shell's), not the zygote's.
            shell = m.net[router].pid
            for ns in ("net", "mnt"):
                assert os.readlink(f"/proc/{pid}/ns/{ns}") == os.readlink(f"/proc/{shell}/ns/{ns}")
                assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/{zygote}/ns/{ns}")
            # The host's cgroup hierarchies mounted in its node (by the zygote's child).
            assert _cgroup_mounts(pid) == _cgroup_mounts(os.getpid()), router
            for p in (pid, supervisor):
                mem = memory_kib(p)
                pss, rss = pss + mem["pss"], rss + mem["rss"]
        zmem = memory_kib(zygote)
        pss += zmem["pss"]
        print(f"18 routers up in {took:.1f} s; zygote, supervisors and agents: "
              f"PSS {pss / 1024:.0f} MiB, RSS {rss / 1024:.0f} MiB")
        # Shared, not copied: the PSS of all is well under half their RSS (how long the start
        # took and the memory per router are `moat bench scale`'s figures, printed above).
        assert pss < rss / 2

        victim = "r103b"
        old = agents[victim]
        os.kill(old, signal.SIGKILL)

        def back() -> int | None:
            try:
                pid = m.client.call(victim, "status", timeout=1)["pid"]
            except ControlError:
                return None
            return pid if pid != old else None

        new = wait_until(back, 20, what=f"{victim}'s agent forked again")
        assert _parent(new) == m.net[victim].daemon_pid and _comm(new) == f"agent-{victim}"
        everyone = [zygote, *agents.values(), new, *(m.net[r].daemon_pid for r in routers)]
    assert not any(pid_alive(p) for p in everyone)
    assert processes_of_run(m.run.run_id) == []
