"""The wire is the same whichever backend tunnels (issue 16, point 3).

One exchange (three pings of a fixed payload from C to the object, H tunnelling to F with
key 42) is captured on F's link once per backend, each in a fresh topology of
test_tunnel_netns.py, and what tshark decodes is compared field by field: the outer
addresses, GRE's flags, key and protocol, the inner addresses and length, and the ICMP
type, sequence and payload. (The ICMP identifier, ping's timestamp and IP ids are the pinging process's and
the kernel's, not the tunnel's, and are left out.) The kernel backend joins where the kernel
has GRE; userspace and eBPF are compared wherever eBPF loads.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

import test_tunnel_netns as base
from test_ebpf_netns import EbpfHarness
from test_tunnel_netns import F_LOCAL, H_LOCAL, OBJ, capture, nsx

FIELDS = ["ip.src", "ip.dst", "ip.proto", "ip.ttl", "ip.flags.df", "gre.flags_and_version", "gre.key", "gre.proto",
          "ip.len", "icmp.type", "icmp.seq", "data.data"]
PAYLOAD = "6d6f6174"  # "moat", repeated by ping -p


def decode(pcap: Path) -> list[dict[str, str]]:
    proc = subprocess.run(["tshark", "-r", str(pcap), "-T", "fields", "-E", "separator=|",
                           "-E", "occurrence=a", "-E", "aggregator=,",
                           *sum((["-e", f] for f in FIELDS), [])],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    rows = [dict(zip(FIELDS, line.split("|"))) for line in proc.stdout.splitlines() if line]
    for row in rows:
        # outer then inner length: only the inner one is the packet's own
        row["ip.len"] = row["ip.len"].split(",")[-1]
        # ping's own 8-byte timestamp leads the payload
        row["data.data"] = row["data.data"][16:]
    return rows


def exchange(backend: str, tmp: Path) -> list[dict[str, str]]:
    with base.topology(backend=None) as net:
        h = EbpfHarness(net.h, H_LOCAL, backend)
        f = EbpfHarness(net.f, F_LOCAL, backend)
        net.harnesses += [h, f]
        assert (h.backend, f.backend) == (backend, backend)
        f.call("accept", remote=H_LOCAL, key=42)
        h.set_peers(OBJ, [(F_LOCAL, 42)])
        assert net.ping(count=1).returncode == 0  # ARP and routes warm: the same start for all
        with capture(net.f, "fh", tmp) as pcap:
            ping = nsx(net.c, "ping", "-n", "-c", "3", "-i", "0.2", "-W", "2", "-s", "64",
                       "-p", PAYLOAD, OBJ, check=False, timeout=30)
        assert ping.returncode == 0, ping.stdout + ping.stderr
        return decode(pcap)


def test_userspace_ebpf_and_kernel_put_the_same_packets_on_the_wire(tmp_path: Path) -> None:
    if shutil.which("tshark") is None:
        pytest.skip("tshark not installed (scripts/bootstrap.sh installs it)")
    from agent.mobility.tunnel import _probe_kernel_gre, probe_ebpf

    reason = probe_ebpf()
    if reason is not None:
        pytest.skip(f"eBPF backend unavailable here: {reason}")
    backends = ["userspace", "ebpf"] + (["kernel"] if _probe_kernel_gre() is None else [])
    seen = {}
    for backend in backends:
        d = tmp_path / backend
        d.mkdir()
        seen[backend] = exchange(backend, d)
    reference = seen["userspace"]
    assert len(reference) == 3, reference
    for row, seq in zip(reference, (1, 2, 3)):
        assert row["ip.src"] == f"{H_LOCAL},10.98.0.2" and row["ip.dst"] == f"{F_LOCAL},{OBJ}"
        assert row["gre.key"] == "0x0000002a" and row["gre.proto"] == "0x0800"
        assert row["icmp.seq"] == str(seq) and PAYLOAD in row["data.data"]
    for backend, rows in seen.items():
        assert rows == reference, f"{backend} differs from userspace:\n{rows}\n{reference}"
