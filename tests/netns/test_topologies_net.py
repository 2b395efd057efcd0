"""Root tests: the topologies build real Mininet networks that route end to end.

tests/conftest.py marks everything here ``netns`` and skips it where it cannot run.
Every network is stopped in a ``finally`` (via ``running_net``); no process is ever killed
by name — the daemon test checks its own pid.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest

from agent.core.wait import wait_until
from topologies import links
from topologies.base import MoatTopo
from topologies.net import build_net, running_net
from topologies.nodes import MoatRouter
from topologies.patent import PatentTopo
from topologies.scale import ScaleTopo


def ping_matrix(net, topo: MoatTopo) -> list[str]:
    """Ping every address of every other node from every node; return the failures.

    One shell loop per source keeps it fast; ``-W 2`` bounds a lost reply, and the
    first echo of each pair also covers ARP resolution (ping queues until it resolves).
    """
    failures: list[str] = []
    everything = topo.all_addresses()
    for src in everything:
        targets = [
            str(a.ip) for node, addrs in everything.items() if node != src for a in addrs
        ]
        script = (
            f"for a in {' '.join(targets)}; do "
            "if ping -n -q -c 1 -W 2 $a >/dev/null 2>&1; then echo OK $a; "
            "else echo FAIL $a; fi; done"
        )
        out = net[src].cmd(script)
        ok = {line.split()[1] for line in out.splitlines() if line.startswith("OK ")}
        failures += [f"{src}->{t}" for t in targets if t not in ok]
    return failures


def _alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (PID 1 of a container may not reap)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_patent_net_all_pairs_reachable() -> None:
    topo = PatentTopo()
    with running_net(topo) as net:
        assert net.pingAll(timeout=2) == 0  # Mininet's own check (LAN addresses)
        failures = ping_matrix(net, topo)
        assert failures == [], f"unreachable: {failures}"


def test_patent_net_router_configuration() -> None:
    topo = PatentTopo(triangle=True)
    with running_net(topo) as net:
        for name in topo.router_names():
            node = net[name]
            assert isinstance(node, MoatRouter)
            assert node.cmd("cat /proc/sys/net/ipv4/ip_forward").strip() == "1"
            # Loose on every interface and for later ones, all 0 (so each interface's own
            # value counts: the kernel applies max(all, <if>)), off on lo.
            rp = {key: node.cmd(f"cat /proc/sys/net/ipv4/conf/{key}/rp_filter").strip()
                  for key in ["all", "default", "lo"] + [i.name for i in node.intfList()
                                                        if i.name != "lo"]}
            assert rp.pop("all") == "0" and rp.pop("lo") == "0", (name, rp)
            assert set(rp.values()) == {"2"}, (name, rp)
            table = node.cmd("ip -4 route show").splitlines()
            for route in topo.routes(name):
                assert any(
                    line.startswith(f"{route.prefix} via {route.via} ") for line in table
                ), (name, route, table)
            # Mininet's node.IP() is the LAN address
            assert node.IP() == str(topo.addresses(name)[0].ip)
        for name in topo.end_host_names():
            out = net[name].cmd("ip -4 route show default")
            assert out.startswith(f"default via {topo.gateway(name)} "), (name, out)
        # the host's own forwarding stays off: only routers route
        assert net["co12"].cmd("cat /proc/sys/net/ipv4/ip_forward").strip() == "0"
        assert ping_matrix(net, topo) == []


def test_backbone_bandwidth_installs_htb() -> None:
    topo = PatentTopo(backbone_bw=20)
    with running_net(topo) as net:
        for link in topo.backbone:
            for end in link.ends:
                out = net[end.node].cmd(f"tc qdisc show dev {end.name}")
                assert "qdisc htb 5:" in out, (end.name, out)
                cls = net[end.node].cmd(f"tc class show dev {end.name}")
                assert "rate 20Mbit" in cls, (end.name, cls)
        lan = net["r22b"].cmd("tc qdisc show dev r22b-eth0")
        assert "htb" not in lan  # LAN links stay unshaped by default


def test_delay_and_loss_degrade_without_netem(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(links, "_warned", set())
    available = links.netem_available()
    topo = PatentTopo(backbone_bw=50, backbone_delay="5ms", backbone_loss=1)
    with caplog.at_level(logging.WARNING, logger="topologies.links"):
        with running_net(topo) as net:
            intf = net["r22a"].intf("r22a-eth1")
            qdiscs = net["r22a"].cmd("tc qdisc show dev r22a-eth1")
            assert "qdisc htb 5:" in qdiscs  # bandwidth survives either way
            if available:
                assert intf.dropped_netem == {} and "netem" in qdiscs
            else:
                assert intf.dropped_netem == {"delay": "5ms", "loss": 1.0}
                assert "netem" not in qdiscs
            assert net.pingAll(timeout=2) == 0 or available  # 1% loss may drop a ping
    if not available:
        assert any("netem is not available" in r.getMessage() for r in caplog.records)


def test_scale_net_reachable() -> None:
    topo = ScaleTopo(n_foreign=3, routers_per_net=2)
    with running_net(topo) as net:
        assert len(net.hosts) == 3 + 6 + 2 + 3
        assert net.pingAll(timeout=2) == 0
        failures = ping_matrix(net, topo)
        assert failures == [], f"unreachable: {failures}"


class _DaemonTopo(PatentTopo):
    """PatentTopo whose HOA router runs a stand-in daemon (the agent does not exist yet)."""

    def build(self, argv: list[str], log: str, **kw) -> None:  # type: ignore[override]
        super().build(**kw)
        self.nodeInfo("r22b").update(daemon_argv=argv, daemon_log=log)


def test_router_daemon_started_in_namespace_and_reaped(tmp_path: Path) -> None:
    log_path = tmp_path / "r22b.log"
    argv = ["sh", "-c", "echo daemon-up; ip -4 -o addr show dev r22b-eth0; exec sleep 1000"]
    net = build_net(_DaemonTopo(argv, str(log_path)))
    pid = None
    try:
        net.start()
        router = net["r22b"]
        pid = router.daemon_pid
        assert pid is not None and _alive(pid)
        # it runs in the router's network namespace, not the test's
        ns = os.readlink(f"/proc/{pid}/ns/net")
        assert ns == os.readlink(f"/proc/{router.pid}/ns/net")
        assert ns != os.readlink("/proc/self/ns/net")
        # ... in a session of its own (so it survives the shell's SIGHUP until we stop it)
        assert os.getsid(pid) == pid
        wait_until(lambda: "10.16.0.2/21" in log_path.read_text(), 10, what="the daemon's log naming its address")
        text = log_path.read_text()
        assert "daemon-up" in text and "10.16.0.2/21" in text
        # other routers got no daemon
        assert net["r22a"].daemon is None
    finally:
        net.stop()
    assert pid is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert net["r22b"].daemon.returncode is not None


def test_stubborn_daemon_is_killed_with_its_children(tmp_path: Path) -> None:
    """A daemon that ignores SIGTERM gets SIGKILL after the timeout, children included."""
    child_file = tmp_path / "child.pid"
    argv = [
        "sh", "-c",
        f"trap '' TERM; sleep 1000 & echo $! > {child_file}; wait; sleep 1000",
    ]
    net = build_net(_DaemonTopo(argv, str(tmp_path / "d.log")))
    try:
        net.start()
        router = net["r22b"]
        pid = router.daemon_pid
        assert pid is not None
        wait_until(child_file.exists, 10, what="the daemon's child's pid file")
        child = int(child_file.read_text().strip())
        assert _alive(child)
        start = time.monotonic()
        status = router.stop_daemon(timeout=0.5)
        assert time.monotonic() - start < 5
        assert status == -9  # SIGKILL, after SIGTERM was ignored
        assert not _alive(pid)
        wait_until(lambda: not _alive(child), 5, what=f"child {child} gone with its daemon")
        assert router.stop_daemon() == -9  # idempotent
    finally:
        net.stop()


def test_build_refuses_names_that_exist_and_two_builds_run_side_by_side() -> None:
    """Each build's root-namespace names carry a tag of its own, so a second build runs
    beside the first; a build whose names exist (here: handed the first one's tag) is
    refused, naming them, before anything is built, and removes nothing of the first."""
    from topologies.errors import TopologyError
    from topologies.net import root_namespace_conflicts, root_namespace_names

    topo = PatentTopo()
    with running_net(topo) as net:
        bridge = topo.nodeInfo("s16")["bridge"]
        tag = bridge.split("-")[0]
        assert bridge in root_namespace_conflicts(topo)
        with running_net(PatentTopo()) as beside:
            assert beside.pingAll(timeout=2) == 0
            assert net.pingAll(timeout=2) == 0
        with pytest.raises(TopologyError, match=bridge):
            build_net(PatentTopo(), tag=tag)
        assert net.pingAll(timeout=2) == 0  # the running net was not disturbed
        assert all(Path(f"/sys/class/net/{n}").exists() for n in root_namespace_names(topo))
    assert root_namespace_conflicts(topo) == []


SPOOF = ("import socket, sys; from scapy.all import IP, ICMP; "
         "s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW); "
         "s.sendto(bytes(IP(src=sys.argv[1], dst=sys.argv[2]) / ICMP()), (sys.argv[2], 0))")


def rp_filter_drops(node) -> int:
    """The node's count of packets dropped by reverse-path filtering (IPReversePathFilter)."""
    lines = [line.split() for line in node.cmd("cat /proc/net/netstat").splitlines()]
    for names, values in zip(lines, lines[1:]):
        if names and names[0] == "TcpExt:" and values[0] == "TcpExt:" \
                and "IPReversePathFilter" in names:
            return int(values[names.index("IPReversePathFilter")])
    raise AssertionError("no IPReversePathFilter counter")


def test_a_spoofed_source_on_a_backbone_link_is_dropped_by_rp_filter() -> None:
    """Issue 12: r22a sends r18a (over their backbone link) one echo request from an address
    no route reaches, and one from its own backbone address: the first is dropped by r18a's
    reverse-path filter, the second is not."""
    import sys

    topo = PatentTopo()
    repo = Path(__file__).resolve().parents[2]
    with running_net(topo) as net:
        sender, target = net["r22a"], net["r18a"]
        # r22a's address on the link: r18a's next hop towards the home network
        own = next(r.via for r in topo.routes("r18a") if r.prefix.startswith("10.16."))
        send = f"cd {repo} && {sys.executable} -c '{SPOOF}'"
        before = rp_filter_drops(target)
        for n, source in enumerate(["198.51.100.9", own, "198.51.100.9"]):
            out = sender.cmd(f"{send} {source} 10.12.0.1 2>&1")
            assert not out.strip(), out
            if source != own:  # packets on one link arrive in order: the count is exact
                wait_until(lambda: rp_filter_drops(target) >= before + 1 + n // 2, 5,
                           what="r18a's rp_filter to drop the spoofed packet")
        assert rp_filter_drops(target) == before + 2  # the packet from r22a's own address passed
