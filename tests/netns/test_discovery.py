"""Agent discovery on the wire (issue 3, line 6): advertisements, solicitations, movement."""

from __future__ import annotations

import subprocess

import pytest

from topologies.moatnet import MoatNetwork
from topologies.patent import PatentTopo

SLOW = 5.0  # an advertisement interval far longer than any answer to a solicitation


@pytest.fixture(scope="module")
def net():
    with MoatNetwork(PatentTopo(), advertise_interval=SLOW) as m:
        yield m


def tshark_fields(pcap, dfilter: str, *fields: str) -> list[list[str]]:
    argv = ["tshark", "-r", str(pcap), "-Y", dfilter, "-T", "fields"]
    for f in fields:
        argv += ["-e", f]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True)
    return [line.split("\t") for line in out.stdout.splitlines()]


def test_solicitation_is_answered_at_once(net: MoatNetwork) -> None:
    answer = net.probe("co12", "solicit", "co12-eth0", "--timeout", "3")
    assert answer["agent"] in ("10.12.0.1", "10.12.0.2")
    assert answer["ttl"] == 1
    # With 5 s between periodic advertisements, an answer inside 3 s came from the solicitation.
    assert answer["delay"] < 3


def test_advertisements_follow_rfc5944_on_the_lan(net: MoatNetwork) -> None:
    with net.capture("s12", "adv", bpf="icmp") as pcap:
        net.probe("co12", "solicit", "co12-eth0")
    rows = tshark_fields(pcap, "icmp.type == 9", "ip.src", "ip.dst", "ip.ttl", "icmp.mip.f",
                         "icmp.mip.h", "icmp.mip.g", "icmp.mip.coa")
    assert rows, "no advertisement on foreign LAN 12"
    for src, dst, ttl, f, h, g, coa in rows:
        assert dst == "224.0.0.1" and ttl == "1"
        assert f in ("1", "True") and h in ("0", "False") and g in ("1", "True")
        assert coa == src  # the FOA offers its own LAN address as care-of address


def test_object_detects_movement_when_its_agent_goes_silent(net: MoatNetwork) -> None:
    try:
        net.start_object("counter", "r18b")
        first = net.wait_for(lambda: net.agent("r22b").call("bindings"), timeout=15)
        assert first[0]["care_of_address"] == "10.12.0.1"  # lowest address first: r18a
        net.agent("r18a").call("advertising", enabled=False)
        moved = net.wait_for(
            lambda: [b for b in net.agent("r22b").call("bindings") if b["care_of_address"] == "10.12.0.2"],
            timeout=4 * SLOW)
        assert moved[0]["care_of_name"] == "counter.r18b"
    finally:
        net.agent("r18a").call("advertising", enabled=True)
        net.agent("r18b").call("object_stop", name="counter", deregister=True)


SPOOF = """
from scapy.all import Ether, IP, Raw, sendp
from packets import AdvFlags, AgentAdvertisement
for n, (src, ttl) in enumerate([("10.12.0.77", 2), ("10.14.0.77", 1), ("10.12.0.78", 1)]):
    adv = AgentAdvertisement(1 + n, 120, AdvFlags.F | AdvFlags.G, [src], [(src, 0)], 9000)
    sendp(Ether(dst="01:00:5e:00:00:01") / IP(src=src, dst="224.0.0.1", ttl=ttl, proto=1)
          / Raw(adv.encode()), iface="co12-eth0", verbose=False)
"""


def test_advertisements_need_ttl_1_and_an_on_link_source(net: MoatNetwork) -> None:
    """Issue 12: a forwarded (TTL 2) or off-link advertisement is dropped and counted; an
    on-link one with TTL 1 from the same host is heard (so the check is what drops them)."""
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    before = net.agent("r18b").call("status")["advertisements_refused"]
    out = net.net["co12"].cmd(f"cd {repo} && {sys.executable} -c '{SPOOF}' 2>&1")
    heard = net.wait_for(lambda: [a for a in net.agent("r18b").call("agents")
                                  if a["address"] == "10.12.0.78"], timeout=5)
    assert heard, out
    addresses = {a["address"] for a in net.agent("r18b").call("agents")}
    assert not addresses & {"10.12.0.77", "10.14.0.77"}
    after = net.agent("r18b").call("status")["advertisements_refused"]
    assert after["ttl"] == before["ttl"] + 1 and after["off-link"] == before["off-link"] + 1
