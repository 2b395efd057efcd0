"""agent.mobility.tunnel on real namespaces: GRE on the wire between a home and foreign agents.

    C (client)            H (home agent side)                 F  (foreign side)
    ch 10.98.0.2/24 ---- hc 10.98.0.1/24
                          hf  10.99.0.1/24  ---------------- fh  10.99.0.2/24   lo 10.97.0.100/32
                          hf2 10.99.1.1/24  ---------------- f2h 10.99.1.2/24   lo 10.97.0.100/32  (F2)

H runs a tunnel (local 10.99.0.1) routing the "object" 10.97.0.100 to F (key 42) and, for
bicast, F2 (key 43); F and F2 run tunnels accepting (10.99.0.1, 42) and (10.99.0.1, 43). Each
tunnel is tests/netns/tunnel_harness.py run inside its namespace. Replies go back by normal
routing (triangular) unless a test sets up reverse tunnelling.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import selectors
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.core.wait import WaitTimeout, wait_until
REPO = Path(__file__).resolve().parents[2]
HARNESS = Path(__file__).with_name("tunnel_harness.py")
PY = sys.executable
OBJ = "10.97.0.100"
H_LOCAL, F_LOCAL, F2_LOCAL = "10.99.0.1", "10.99.0.2", "10.99.1.2"
NO_KERNEL_GRE = "kernel has no GRE (ip link add type gre failed)"


def sh(*argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} -> {proc.returncode}: {proc.stderr.strip()}")
    return proc


def nsx(ns: str, *argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return sh("ip", "netns", "exec", ns, *argv, check=check, timeout=timeout)


class Harness:
    """One tunnel in one namespace, driven over the harness's stdin/stdout."""

    def __init__(self, ns: str, local: str, backend: str = "userspace", name: str = "moat0") -> None:
        self.ns = ns
        self.log = tempfile.NamedTemporaryFile(prefix=f"{ns}-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, PY, str(HARNESS), "--local", local, "--backend", backend,
             "--name", name],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, bufsize=1,
        )
        self.sel = selectors.DefaultSelector()
        assert self.proc.stdout is not None
        self.sel.register(self.proc.stdout, selectors.EVENT_READ)
        ready = self._read(timeout=30)
        assert ready.get("ready"), ready
        self.backend = ready["backend"]

    def _read(self, timeout: float) -> dict:
        assert self.proc.stdout is not None
        if not self.sel.select(timeout):
            raise AssertionError(f"tunnel in {self.ns} silent for {timeout}s:\n{self.stderr()}")
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"tunnel in {self.ns} exited ({self.proc.poll()}):\n{self.stderr()}")
        return json.loads(line)

    def stderr(self) -> str:
        return Path(self.log.name).read_text(errors="replace")[-4000:]

    def call(self, op: str, **kwargs: object) -> dict[str, int]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **kwargs}) + "\n")
        self.proc.stdin.flush()
        answer = self._read(timeout=30)
        assert answer["ok"], f"{op} in {self.ns}: {answer.get('error')}\n{self.stderr()}"
        return answer["stats"]

    def stats(self) -> dict[str, int]:
        return self.call("stats")

    def set_peers(self, dst: str, peers: list[tuple[str, int]]) -> None:
        self.call("set_peers", dst=dst, peers=[list(p) for p in peers])

    def close(self) -> int | None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.close()  # EOF: the harness closes the tunnel and exits
                self.proc.wait(timeout=15)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.sel.close()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)
        return self.proc.returncode


class Net:
    """The namespaces above, addressed and routed; ``close`` deletes them."""

    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        self.h, self.f, self.f2, self.c = (f"moattun-{tag}-{r}" for r in ("h", "f", "f2", "c"))
        self.namespaces: list[str] = []
        self.harnesses: list[Harness] = []

    def build(self) -> None:
        for ns in (self.h, self.f, self.f2, self.c):
            sh("ip", "netns", "add", ns)
            self.namespaces.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "link", "add", "ch", "netns", self.c, "type", "veth", "peer", "name", "hc", "netns", self.h)
        sh("ip", "link", "add", "hf", "netns", self.h, "type", "veth", "peer", "name", "fh", "netns", self.f)
        sh("ip", "link", "add", "hf2", "netns", self.h, "type", "veth", "peer", "name", "f2h", "netns", self.f2)
        for ns, dev, addr in ((self.c, "ch", "10.98.0.2/24"), (self.h, "hc", "10.98.0.1/24"),
                              (self.h, "hf", "10.99.0.1/24"), (self.f, "fh", "10.99.0.2/24"),
                              (self.h, "hf2", "10.99.1.1/24"), (self.f2, "f2h", "10.99.1.2/24")):
            sh("ip", "-n", ns, "addr", "add", addr, "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", self.c, "route", "add", "default", "via", "10.98.0.1")
        nsx(self.h, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        for ns, gw in ((self.f, "10.99.0.1"), (self.f2, "10.99.1.1")):
            sh("ip", "-n", ns, "addr", "add", f"{OBJ}/32", "dev", "lo")
            sh("ip", "-n", ns, "route", "add", "10.98.0.0/24", "via", gw)
        sh("ip", "-n", self.f2, "route", "add", "10.99.0.0/24", "via", "10.99.1.1")

    def start_tunnels(self, backend: str = "userspace") -> None:
        self.H = self.harness(self.h, H_LOCAL, backend)
        self.F = self.harness(self.f, F_LOCAL, backend)
        self.F2 = self.harness(self.f2, F2_LOCAL, backend)
        self.F.call("accept", remote=H_LOCAL, key=42)
        self.F2.call("accept", remote=H_LOCAL, key=43)

    def harness(self, ns: str, local: str, backend: str = "userspace", name: str = "moat0") -> Harness:
        h = Harness(ns, local, backend, name)
        self.harnesses.append(h)
        return h

    def ping(self, count: int = 3, wait: float = 2) -> subprocess.CompletedProcess[str]:
        return nsx(self.c, "ping", "-n", "-c", str(count), "-i", "0.2", "-W", str(wait), OBJ,
                   check=False, timeout=count * (wait + 1) + 10)

    def close(self) -> None:
        for h in self.harnesses:
            h.close()
        for ns in self.namespaces:
            sh("ip", "netns", "del", ns, check=False)


@contextlib.contextmanager
def topology(backend: str | None = "userspace") -> Iterator[Net]:
    net = Net()
    try:
        net.build()
        if backend is not None:
            net.start_tunnels(backend)
        yield net
    finally:
        net.close()


@pytest.fixture(scope="module")
def net() -> Iterator[Net]:
    with topology() as n:
        yield n


@pytest.fixture(autouse=True)
def _no_peers(request: pytest.FixtureRequest) -> Iterator[None]:
    """Each test starts and ends with H tunnelling nothing."""
    if "net" not in request.fixturenames:
        yield
        return
    n: Net = request.getfixturevalue("net")
    n.H.set_peers(OBJ, [])
    yield
    n.H.set_peers(OBJ, [])


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after}


def wait_stats(h: Harness, cond: Callable[[dict[str, int]], bool], timeout: float = 5) -> dict[str, int]:
    """Stats once ``cond`` holds (packets may still be in flight when ping returns)."""
    stats: dict[str, int] = {}

    def holds() -> bool:
        nonlocal stats
        stats = h.stats()
        return cond(stats)

    try:
        wait_until(holds, timeout, interval=0.1, what="tunnel stats condition")
    except WaitTimeout:
        pass  # the caller asserts on the stats, which says more than a time-out
    return stats


@contextlib.contextmanager
def capture(ns: str, dev: str, tmp: Path) -> Iterator[Path]:
    """tcpdump of the GRE on ``dev`` in ``ns`` while the block runs; yields the pcap path."""
    if shutil.which("tcpdump") is None:
        pytest.skip("tcpdump not installed (scripts/bootstrap.sh installs it)")
    pcap = tmp / f"{ns}-{dev}.pcap"
    proc = subprocess.Popen(["ip", "netns", "exec", ns, "tcpdump", "-i", dev, "-n", "-U", "--immediate-mode", "-w",
                             str(pcap), "ip", "proto", "47"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        sel = selectors.DefaultSelector()
        assert proc.stderr is not None
        sel.register(proc.stderr, selectors.EVENT_READ)

        def listening() -> bool:
            if not sel.select(0.1):
                return False
            line = proc.stderr.readline()
            return "listening on" in line or not line

        try:
            wait_until(listening, 10, interval=0.0, what="tcpdump listening")
        finally:
            sel.close()
        yield pcap
        time.sleep(0.3)
    finally:
        proc.terminate()
        proc.wait(timeout=10)




def gre_packets(pcap: Path) -> list:
    from scapy.all import GRE, IP, rdpcap

    return [p for p in rdpcap(str(pcap)) if IP in p and GRE in p]


def checksum_ok(data: bytes) -> bool:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total == 0xFFFF


# --- userspace backend (what CI runs) -------------------------------------------------------


def test_ping_through_tunnel_gre_key_on_the_wire(net: Net, tmp_path: Path) -> None:
    from scapy.all import GRE, ICMP, IP

    net.H.set_peers(OBJ, [(F_LOCAL, 42)])
    assert f"{OBJ} dev moat0" in sh("ip", "-n", net.h, "route", "show", f"{OBJ}/32").stdout
    h0, f0 = net.H.stats(), net.F.stats()
    with capture(net.h, "hf", tmp_path) as pcap:
        ping = net.ping(3)
    assert ping.returncode == 0, ping.stdout + ping.stderr
    assert " 0% packet loss" in ping.stdout, ping.stdout
    dh = delta(wait_stats(net.H, lambda s: s["copies_sent"] - h0["copies_sent"] >= 3), h0)
    df = delta(wait_stats(net.F, lambda s: s["decapsulated"] - f0["decapsulated"] >= 3), f0)
    assert dh["encapsulated"] == 3 and dh["copies_sent"] == 3, dh
    assert df["decapsulated"] == 3 and df["dropped_unknown_peer"] == 0, df

    packets = gre_packets(pcap)
    assert len(packets) == 3, [p.summary() for p in packets]
    for p in packets:
        outer, gre = p[IP], p[GRE]
        assert (outer.src, outer.dst, outer.proto) == (H_LOCAL, F_LOCAL, 47)
        assert gre.key_present == 1 and gre.key == 42 and gre.proto == 0x0800
        inner = gre.payload
        assert isinstance(inner, IP) and inner.src == "10.98.0.2" and inner.dst == OBJ
        assert inner[ICMP].type == 8
        raw = bytes(inner)
        assert checksum_ok(raw[: (raw[0] & 0x0F) * 4]), "inner IPv4 header checksum"
        assert checksum_ok(raw[(raw[0] & 0x0F) * 4: inner.len]), "inner ICMP checksum"



def test_tshark_reads_key_and_inner_destination(net: Net, tmp_path: Path) -> None:
    if shutil.which("tshark") is None:
        pytest.skip("tshark not installed (scripts/bootstrap.sh installs it)")
    net.H.set_peers(OBJ, [(F_LOCAL, 42)])
    with capture(net.h, "hf", tmp_path) as pcap:
        assert net.ping(2).returncode == 0
        time.sleep(0.3)
        out = sh("tshark", "-n", "-r", str(pcap), "-Y", "gre", "-T", "fields",
                 "-e", "gre.key", "-e", "ip.dst", "-e", "icmp.type").stdout
    rows = [line.split("\t") for line in out.splitlines() if line.strip()]
    assert len(rows) == 2, out
    for key, dsts, icmp_type in rows:
        assert int(key, 0) == 42
        assert dsts.split(",") == [F_LOCAL, OBJ]
        assert icmp_type == "8"


def test_bicast_sends_one_copy_per_binding(net: Net, tmp_path: Path) -> None:
    from scapy.all import GRE, IP

    net.H.set_peers(OBJ, [(F_LOCAL, 42), (F2_LOCAL, 43)])
    h0, f0, g0 = net.H.stats(), net.F.stats(), net.F2.stats()
    with capture(net.h, "hf", tmp_path) as pcap_f, capture(net.h, "hf2", tmp_path) as pcap_f2:
        ping = net.ping(3)
    assert ping.returncode == 0, ping.stdout + ping.stderr
    assert "DUP!" in ping.stdout, "both foreign sides answer: duplicate replies expected"
    dh = delta(wait_stats(net.H, lambda s: s["copies_sent"] - h0["copies_sent"] >= 6), h0)
    df = delta(wait_stats(net.F, lambda s: s["decapsulated"] - f0["decapsulated"] >= 3), f0)
    dg = delta(wait_stats(net.F2, lambda s: s["decapsulated"] - g0["decapsulated"] >= 3), g0)
    assert dh["encapsulated"] == 3 and dh["copies_sent"] == 6, dh
    assert df["decapsulated"] == 3, df
    assert dg["decapsulated"] == 3, dg
    to_f, to_f2 = gre_packets(pcap_f), gre_packets(pcap_f2)
    assert [(p[IP].dst, p[GRE].key) for p in to_f] == [(F_LOCAL, 42)] * 3
    assert [(p[IP].dst, p[GRE].key) for p in to_f2] == [(F2_LOCAL, 43)] * 3
    # the same inner packets went both ways
    assert [bytes(p[GRE].payload) for p in to_f] == [bytes(p[GRE].payload) for p in to_f2]


def test_no_peers_removes_route_and_sends_nothing(net: Net, tmp_path: Path) -> None:
    net.H.set_peers(OBJ, [(F_LOCAL, 42)])
    assert net.ping(1).returncode == 0
    net.H.set_peers(OBJ, [])
    assert sh("ip", "-n", net.h, "route", "show", f"{OBJ}/32").stdout.strip() == ""
    h0, f0 = net.H.stats(), net.F.stats()
    with capture(net.h, "hf", tmp_path) as pcap:
        ping = net.ping(2, wait=1)
    assert ping.returncode != 0
    time.sleep(0.3)
    dh, df = delta(net.H.stats(), h0), delta(net.F.stats(), f0)
    assert dh["copies_sent"] == 0 and dh["encapsulated"] == 0, dh
    assert df["decapsulated"] == 0, df
    assert gre_packets(pcap) == []


def test_unknown_key_and_malformed_gre_dropped_at_foreign_side(net: Net) -> None:
    from packets.gre import GreHeader

    net.H.set_peers(OBJ, [(F_LOCAL, 99)])  # F accepts key 42 only
    f0 = net.F.stats()
    assert net.ping(2, wait=1).returncode != 0
    df = delta(wait_stats(net.F, lambda s: s["dropped_unknown_peer"] - f0["dropped_unknown_peer"] >= 2), f0)
    assert df["dropped_unknown_peer"] == 2 and df["decapsulated"] == 0, df

    inner = bytes.fromhex("4500001c000100004001" "0000" "0a620002" "0a610064" "0800f7ff00000000")
    bad = [
        b"\x00\x01",                                        # truncated GRE
        b"\x00\x01\x08\x00" + inner,                        # version 1
        b"\x20\x00\x08\x00\x00\x00",                        # K set, key cut short
        GreHeader(0x86DD, key=42).encode(inner),            # not IPv4 inside
        GreHeader(key=42).encode(inner[:10]),               # inner IPv4 cut short
        bytearray(GreHeader(key=42, checksum=True).encode(inner)),  # bad checksum (below)
    ]
    bad[-1][4] ^= 0xFF
    f0 = net.F.stats()
    for payload in bad:
        net.H.call("send_gre", remote=F_LOCAL, hex=bytes(payload).hex())
    df = delta(wait_stats(net.F, lambda s: s["dropped_malformed"] - f0["dropped_malformed"] >= len(bad)), f0)
    assert df["dropped_malformed"] == len(bad) and df["decapsulated"] == 0, df
    # A keyless GRE packet is not from an accepted binding either.
    f0 = net.F.stats()
    net.H.call("send_gre", remote=F_LOCAL, hex=GreHeader().encode(inner).hex())
    df = delta(wait_stats(net.F, lambda s: s["dropped_unknown_peer"] > f0["dropped_unknown_peer"]), f0)
    assert df["dropped_unknown_peer"] == 1, df

    # F's tunnel is alive and well: the right key goes through again.
    net.H.set_peers(OBJ, [(F_LOCAL, 42)])
    assert net.ping(1).returncode == 0


def test_forget_stops_decapsulation(net: Net) -> None:
    net.H.set_peers(OBJ, [(F_LOCAL, 42)])
    net.F.call("forget", remote=H_LOCAL, key=42)
    try:
        f0 = net.F.stats()
        assert net.ping(1, wait=1).returncode != 0
        df = delta(wait_stats(net.F, lambda s: s["dropped_unknown_peer"] > f0["dropped_unknown_peer"]), f0)
        assert df["dropped_unknown_peer"] == 1 and df["decapsulated"] == 0, df
    finally:
        net.F.call("accept", remote=H_LOCAL, key=42)
    assert net.ping(1).returncode == 0


def test_reverse_tunnel_carries_replies_home(net: Net, tmp_path: Path) -> None:
    net.H.set_peers(OBJ, [(F_LOCAL, 42)])
    net.H.call("accept", remote=F_LOCAL, key=42)
    net.F.call("set_reverse", src=OBJ, peer=[H_LOCAL, 42])
    try:
        assert f"from {OBJ} lookup 4347" in sh("ip", "-n", net.f, "rule").stdout
        assert "default dev moat0" in sh("ip", "-n", net.f, "route", "show", "table", "4347").stdout
        h0, f0 = net.H.stats(), net.F.stats()
        with capture(net.f, "fh", tmp_path) as pcap:
            ping = net.ping(3)
        assert ping.returncode == 0, ping.stdout + ping.stderr
        df = delta(wait_stats(net.F, lambda s: s["copies_sent"] - f0["copies_sent"] >= 3), f0)
        dh = delta(wait_stats(net.H, lambda s: s["decapsulated"] - h0["decapsulated"] >= 3), h0)
        assert df["copies_sent"] == 3 and df["decapsulated"] == 3, df
        assert dh["decapsulated"] == 3, dh
        from scapy.all import GRE, IP

        back = [p for p in gre_packets(pcap) if p[IP].src == F_LOCAL]
        assert [(p[IP].dst, p[GRE].key, p[GRE].payload.src) for p in back] == [(H_LOCAL, 42, OBJ)] * 3
    finally:
        net.F.call("set_reverse", src=OBJ, peer=None)
        net.H.call("forget", remote=F_LOCAL, key=42)
    assert f"from {OBJ}" not in sh("ip", "-n", net.f, "rule").stdout
    assert sh("ip", "-n", net.f, "route", "show", "table", "4347", check=False).stdout.strip() == ""


def test_close_removes_device_routes_and_rules(net: Net) -> None:
    t = net.harness(net.c, "10.98.0.2", name="moatx0")
    t.set_peers("10.96.0.1", [("10.98.0.1", 7)])
    t.call("set_reverse", src="10.96.0.2", peer=["10.98.0.1", 7])
    assert "10.96.0.1 dev moatx0" in sh("ip", "-n", net.c, "route").stdout
    assert "from 10.96.0.2 lookup 4347" in sh("ip", "-n", net.c, "rule").stdout
    assert t.close() == 0
    assert sh("ip", "-n", net.c, "link", "show", "moatx0", check=False).returncode != 0
    assert "10.96.0.1" not in sh("ip", "-n", net.c, "route").stdout
    assert "4347" not in sh("ip", "-n", net.c, "rule").stdout


# --- backend choice and the kernel backend ---------------------------------------------------


def _detect_in(ns: str) -> str:
    code = f"import sys; sys.path.insert(0, {str(REPO)!r}); from agent.mobility.tunnel import detect_backend; print(detect_backend())"
    return nsx(ns, PY, "-c", code).stdout.strip()


def test_forced_kernel_backend_unavailable_is_a_typed_error() -> None:
    with topology(backend=None) as n:
        if _detect_in(n.h) == "kernel":
            pytest.skip("this kernel has GRE: nothing to refuse")
        code = (f"import sys, asyncio; sys.path.insert(0, {str(REPO)!r})\n"
                "from agent.mobility.tunnel import make_tunnel, probe_ebpf, TunnelUnavailable\n"
                "from agent.mobility.tunnel.choose import auto_order\n"
                "print('order:', ','.join(auto_order()))\n"
                "try:\n"
                "    make_tunnel('kernel', loop=asyncio.new_event_loop(), local='10.99.0.1')\n"
                "except TunnelUnavailable as exc:\n"
                "    print('unavailable:', exc)\n"
                "print('ebpf probe:', probe_ebpf())\n"
                "print(make_tunnel('auto', loop=asyncio.new_event_loop(), local='10.99.0.1').backend)\n")
        out = nsx(n.h, PY, "-c", code).stdout
        assert "unavailable: kernel GRE backend requested but unavailable" in out, out
        # auto: kernel GRE (not here), else eBPF where it is in auto's order and its programs
        # load here, else userspace
        lines = out.splitlines()
        order = next(line for line in lines if line.startswith("order: ")).removeprefix("order: ")
        reason = next(line for line in lines if line.startswith("ebpf probe: ")).removeprefix("ebpf probe: ")
        expected = "ebpf" if "ebpf" in order.split(",") and reason == "None" else "userspace"
        assert out.strip().endswith(expected), f"order {order}, eBPF probe said {reason!r}: {out}"
        # the probe left nothing behind
        assert sh("ip", "-n", n.h, "-br", "link").stdout.count("moatgp") == 0


def test_kernel_backend_ping_and_bicast(tmp_path: Path) -> None:
    with topology(backend=None) as n:
        if _detect_in(n.h) != "kernel":
            pytest.skip(NO_KERNEL_GRE)
        n.start_tunnels("kernel")
        assert n.H.backend == "kernel"
        n.H.set_peers(OBJ, [(F_LOCAL, 42)])
        assert n.ping(3).returncode == 0
        n.H.set_peers(OBJ, [(F_LOCAL, 42), (F2_LOCAL, 43)])
        f0, g0 = n.F.stats(), n.F2.stats()
        with capture(n.h, "hf2", tmp_path) as pcap:
            ping = n.ping(3)
        assert ping.returncode == 0 and "DUP!" in ping.stdout, ping.stdout
        assert delta(n.F.stats(), f0)["decapsulated"] >= 3
        assert delta(n.F2.stats(), g0)["decapsulated"] >= 3
        from scapy.all import GRE

        assert {p[GRE].key for p in gre_packets(pcap)} == {43}
        n.H.set_peers(OBJ, [])
        assert n.ping(1, wait=1).returncode != 0
