"""Reverse tunnelling (RFC 3024, the T flag; issue 4, line 2). Its own module: one MOAT
network runs at a time."""

from __future__ import annotations

import subprocess

from topologies.moatnet import MoatNetwork
from topologies.patent import PatentTopo


def serve_some(m: MoatNetwork, n: int = 20) -> dict:
    return m.requests("co14", "counter", n)


def test_reverse_tunnel_carries_replies_to_the_home_agent() -> None:
    with MoatNetwork(PatentTopo(), advertise_interval=0.5) as m:
        m.place_object("counter", "r18b", reverse_tunnel=True)
        m.wait_for(lambda: m.agent("r22b").call("bindings"), timeout=15)
        with m.capture("r22a-eth1", "reverse", node="r22a", bpf="proto 47") as pcap:
            assert serve_some(m)["answered"] > 0
        out = subprocess.run(["tshark", "-r", str(pcap), "-T", "fields", "-e", "ip.src", "-e", "ip.dst",
                              "-e", "gre.key"], capture_output=True, text=True, timeout=60, check=True)
        rows = [line.split("\t") for line in out.stdout.splitlines()]
        assert any(r[0] == "10.12.0.1,10.16.0.100" and r[1] == "10.16.0.2,10.14.0.30" for r in rows), \
            "replies from the home address travel in GRE from the FOA to the HOA"
