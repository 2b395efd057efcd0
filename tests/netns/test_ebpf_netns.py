"""The eBPF GRE backend on real namespaces, veths and packets (issue 16).

The topology of test_tunnel_netns.py (client C, home side H, foreign sides F and F2), every
tunnel the ``ebpf`` backend driven by ebpf_harness.py: encapsulation with the binding's key,
decapsulation only from an accepted (remote, key) and only for a visitor's destinations,
bicast, map updates when the peers change, the reverse tunnel, and what close leaves.
Skipped where the programs cannot load (the reason is the probe's).
"""

from __future__ import annotations

import selectors
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.core.wait import wait_until
from scapy.layers.inet import GRE, ICMP, IP

import test_tunnel_netns as base
from test_tunnel_netns import F2_LOCAL, F_LOCAL, H_LOCAL, OBJ, Net, capture, delta, gre_packets, \
    nsx, wait_stats

HARNESS = Path(__file__).with_name("ebpf_harness.py")


def _ebpf_reason() -> str | None:
    from agent.mobility.tunnel import probe_ebpf

    return probe_ebpf()


class EbpfHarness(base.Harness):
    """base.Harness running ebpf_harness.py (restrict, its own raw GRE socket)."""

    def __init__(self, ns: str, local: str, backend: str = "ebpf", name: str = "moat0") -> None:
        self.ns = ns
        self.log = tempfile.NamedTemporaryFile(prefix=f"{ns}-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, base.PY, str(HARNESS), "--local", local, "--backend",
             backend, "--name", name],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, bufsize=1)
        self.sel = selectors.DefaultSelector()
        assert self.proc.stdout is not None
        self.sel.register(self.proc.stdout, selectors.EVENT_READ)
        ready = self._read(timeout=60)
        assert ready.get("ready"), ready
        self.backend = ready["backend"]


def start(net: Net, backend: str = "ebpf") -> None:
    for attr, ns, local in (("H", net.h, H_LOCAL), ("F", net.f, F_LOCAL), ("F2", net.f2, F2_LOCAL)):
        h = EbpfHarness(ns, local, backend)
        net.harnesses.append(h)
        setattr(net, attr, h)
    net.F.call("accept", remote=H_LOCAL, key=42)
    net.F2.call("accept", remote=H_LOCAL, key=43)


@pytest.fixture(scope="module")
def net() -> Iterator[Net]:
    reason = _ebpf_reason()
    if reason is not None:
        pytest.skip(f"eBPF backend unavailable here: {reason}")
    with base.topology(backend=None) as n:
        start(n)
        assert n.H.backend == "ebpf" and n.F.backend == "ebpf"
        yield n


@pytest.fixture(autouse=True)
def _reset(net: Net) -> Iterator[None]:
    """Each test starts and ends with H tunnelling nothing and F accepting (H, 42) only."""
    net.H.set_peers(OBJ, [])
    yield
    net.H.set_peers(OBJ, [])
    net.F.call("restrict", remote=H_LOCAL, key=42, destinations=None)
    net.F.call("set_reverse", src=OBJ, peer=None)
    net.F.call("accept", remote=H_LOCAL, key=42)


def gre_bytes(key: int | None, inner_dst: str = OBJ, proto: int = 0x0800) -> str:
    inner = bytes(IP(src="10.98.0.2", dst=inner_dst) / ICMP(id=9, seq=1) / b"probe")
    gre = GRE(proto=proto, key_present=key is not None, key=key) if key is not None else GRE(proto=proto)
    return bytes(gre / inner).hex()


def test_encapsulates_with_the_binding_key_and_decapsulates(net: Net, tmp_path: Path) -> None:
    net.H.set_peers(OBJ, [(F_LOCAL, 42)])
    h0, f0 = net.H.stats(), net.F.stats()
    with capture(net.f, "fh", tmp_path) as pcap:
        ping = net.ping(count=3)
    assert ping.returncode == 0, ping.stdout + ping.stderr
    h = delta(wait_stats(net.H, lambda s: s["encapsulated"] - h0["encapsulated"] >= 3), h0)
    f = delta(wait_stats(net.F, lambda s: s["decapsulated"] - f0["decapsulated"] >= 3), f0)
    assert h["encapsulated"] >= 3 and h["copies_sent"] == h["encapsulated"]
    assert f["decapsulated"] >= 3 and f["dropped_unknown_peer"] == 0
    packets = gre_packets(pcap)
    assert len(packets) >= 3
    for p in packets:
        assert (p[IP].src, p[IP].dst, p[GRE].key, p[GRE].proto) == (H_LOCAL, F_LOCAL, 42, 0x0800)
        assert p[GRE].payload[IP].dst == OBJ and ICMP in p[GRE].payload


def test_bicast_sends_one_copy_per_binding(net: Net, tmp_path: Path) -> None:
    net.H.set_peers(OBJ, [(F_LOCAL, 42), (F2_LOCAL, 43)])
    h0 = net.H.stats()
    with capture(net.f, "fh", tmp_path) as to_f, capture(net.f2, "f2h", tmp_path) as to_f2:
        ping = net.ping(count=3)
    assert ping.returncode == 0, ping.stdout + ping.stderr
    h = delta(wait_stats(net.H, lambda s: s["copies_sent"] - h0["copies_sent"] >= 6), h0)
    assert h["copies_sent"] == 2 * h["encapsulated"] >= 6
    keys_f = {p[GRE].key for p in gre_packets(to_f)}
    keys_f2 = {p[GRE].key for p in gre_packets(to_f2)}
    assert keys_f == {42} and keys_f2 == {43}
    seqs = lambda pcap: sorted(p[GRE].payload[ICMP].seq for p in gre_packets(pcap))  # noqa: E731
    assert seqs(to_f) == seqs(to_f2)  # the same packets, once to each


def test_map_follows_the_peers(net: Net, tmp_path: Path) -> None:
    """A binding moving from F to F2 moves the copies; no peers: no route, nothing sent."""
    net.H.set_peers(OBJ, [(F_LOCAL, 42)])
    assert OBJ in nsx(net.h, "ip", "route", "show", "table", "4348").stdout
    assert net.ping(count=1).returncode == 0
    net.H.set_peers(OBJ, [(F2_LOCAL, 43)])
    with capture(net.f, "fh", tmp_path) as to_f, capture(net.f2, "f2h", tmp_path) as to_f2:
        assert net.ping(count=2).returncode == 0
    assert gre_packets(to_f) == [] and {p[GRE].key for p in gre_packets(to_f2)} == {43}
    net.H.set_peers(OBJ, [])
    assert OBJ not in nsx(net.h, "ip", "route", "show", "table", "all").stdout
    h0 = net.H.stats()
    with capture(net.f2, "f2h", tmp_path) as none:
        assert net.ping(count=1, wait=1).returncode != 0
    assert gre_packets(none) == [] and net.H.stats()["copies_sent"] == h0["copies_sent"]


def test_wrong_key_unknown_hoa_and_malformed_dropped(net: Net) -> None:
    f0 = net.F.stats()
    net.H.call("send_gre", remote=F_LOCAL, hex=gre_bytes(99))        # key not accepted
    net.H.call("send_gre", remote=F_LOCAL, hex=gre_bytes(None))      # no key at all
    net.F2.call("send_gre", remote=F_LOCAL, hex=gre_bytes(42))       # right key, unknown HOA
    net.H.call("send_gre", remote=F_LOCAL, hex=gre_bytes(42, proto=0x86DD))  # not IPv4 inside
    f = delta(wait_stats(net.F, lambda s: s["dropped_unknown_peer"] - f0["dropped_unknown_peer"] >= 3
                         and s["dropped_malformed"] > f0["dropped_malformed"]), f0)
    assert f["dropped_unknown_peer"] == 3 and f["dropped_malformed"] == 1
    assert f["decapsulated"] == 0


def test_only_the_visitors_destinations_are_decapsulated(net: Net) -> None:
    net.F.call("restrict", remote=H_LOCAL, key=42, destinations=[OBJ])
    f0 = net.F.stats()
    net.H.call("send_gre", remote=F_LOCAL, hex=gre_bytes(42, inner_dst="10.97.0.200"))
    net.H.call("send_gre", remote=F_LOCAL, hex=gre_bytes(42, inner_dst=OBJ))
    f = delta(wait_stats(net.F, lambda s: s["dropped_not_visitor"] > f0["dropped_not_visitor"]
                         and s["decapsulated"] > f0["decapsulated"]), f0)
    assert f["dropped_not_visitor"] == 1 and f["decapsulated"] == 1
    net.F.call("restrict", remote=H_LOCAL, key=42, destinations=None)
    f0 = net.F.stats()
    net.H.call("send_gre", remote=F_LOCAL, hex=gre_bytes(42, inner_dst="10.97.0.200"))
    f = delta(wait_stats(net.F, lambda s: s["decapsulated"] > f0["decapsulated"]), f0)
    assert f["decapsulated"] == 1 and f["dropped_not_visitor"] == 0


def test_forget_stops_decapsulation(net: Net) -> None:
    net.H.set_peers(OBJ, [(F_LOCAL, 42)])
    assert net.ping(count=1).returncode == 0
    net.F.call("forget", remote=H_LOCAL, key=42)
    f0 = net.F.stats()
    assert net.ping(count=2, wait=1).returncode != 0
    f = delta(wait_stats(net.F, lambda s: s["dropped_unknown_peer"] - f0["dropped_unknown_peer"] >= 2), f0)
    assert f["dropped_unknown_peer"] >= 2 and f["decapsulated"] == 0


def test_reverse_tunnel_carries_replies_home(net: Net, tmp_path: Path) -> None:
    net.H.set_peers(OBJ, [(F_LOCAL, 42)])
    net.H.call("accept", remote=F_LOCAL, key=42)
    net.F.call("set_reverse", src=OBJ, peer=[H_LOCAL, 42])
    try:
        h0 = net.H.stats()
        with capture(net.f, "fh", tmp_path) as pcap:
            ping = net.ping(count=3)
        assert ping.returncode == 0, (ping.stdout, str(net.H.stats()), str(net.F.stats()),
                                      nsx(net.f, "ip", "rule").stdout,
                                      nsx(net.f, "ip", "route", "show", "table", "all").stdout)
        back = [p for p in gre_packets(pcap) if p[IP].src == F_LOCAL]
        assert len(back) >= 3
        for p in back:
            assert (p[IP].dst, p[GRE].key) == (H_LOCAL, 42)
            assert p[GRE].payload[IP].src == OBJ and p[GRE].payload[ICMP].type == 0
        h = delta(wait_stats(net.H, lambda s: s["decapsulated"] - h0["decapsulated"] >= 3), h0)
        assert h["decapsulated"] >= 3
    finally:
        net.H.call("forget", remote=F_LOCAL, key=42)


def test_close_removes_device_and_hooks(net: Net) -> None:
    """(In C, which runs no tunnel: one eBPF tunnel per namespace owns the ingress hooks.)"""
    extra = EbpfHarness(net.c, "10.98.0.2", name="moatx1")
    try:
        assert nsx(net.c, "ip", "link", "show", "moatx1", check=False).returncode == 0
        assert "moat_decap" in nsx(net.c, "tc", "filter", "show", "dev", "ch", "ingress").stdout
    finally:
        assert extra.close() == 0
    assert nsx(net.c, "ip", "link", "show", "moatx1", check=False).returncode != 0
    assert nsx(net.c, "ip", "link", "show", "moatx1p", check=False).returncode != 0
    assert "moat_decap" not in nsx(net.c, "tc", "filter", "show", "dev", "ch", "ingress").stdout
    assert nsx(net.c, "ping", "-c", "1", "-W", "2", "10.98.0.1", check=False).returncode == 0


def test_delivery_as_frames_goes_to_the_neighbour_not_the_table(net: Net, tmp_path: Path) -> None:
    """set_delivery: what (H, 42) carries leaves F as a frame to the given neighbour's MAC
    (here H's own end of the link, which F would never route OBJ to) instead of F's table."""
    mac = nsx(net.h, "cat", "/sys/class/net/hf/address").stdout.strip()
    if not mac:  # ip netns exec shows the namespace's own sysfs; fall back to ip link
        mac = nsx(net.h, "ip", "-br", "link", "show", "hf").stdout.split()[2]
    net.F.call("set_delivery", remote=H_LOCAL, key=42, via=["fh", mac])
    pcap = tmp_path / "frames.pcap"
    dump = subprocess.Popen(["ip", "netns", "exec", net.h, "tcpdump", "-i", "hf", "-n", "-U", "-c", "1",
                             "-w", str(pcap), "icmp and dst host " + OBJ + " and ether dst " + mac],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert dump.stderr is not None
        wait_until(lambda: "listening on" in dump.stderr.readline(), 10, interval=0.0,
                   what="tcpdump listening")
        f0 = net.F.stats()
        net.H.call("send_gre", remote=F_LOCAL, hex=gre_bytes(42))
        dump.wait(timeout=10)
    finally:
        if dump.poll() is None:
            dump.kill()
            dump.wait()
        net.F.call("set_delivery", remote=H_LOCAL, key=42, via=None)
    from scapy.all import rdpcap

    (frame,) = rdpcap(str(pcap))
    assert frame[IP].dst == OBJ and ICMP in frame and GRE not in frame
    assert delta(net.F.stats(), f0)["decapsulated"] == 1
