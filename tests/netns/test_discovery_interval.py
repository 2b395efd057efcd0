"""The advertisement interval is a parameter (issue 3, line 6). Its own module: MOAT's
bridge names are fixed, so this network cannot run beside another test module's."""

from __future__ import annotations

import statistics
import subprocess
import time

from topologies.moatnet import MoatNetwork
from topologies.patent import PatentTopo

WINDOW = 2.0  # seconds of advertisements to measure the spacing over


def test_interval_is_configurable() -> None:
    with MoatNetwork(PatentTopo(), advertise_interval=0.2) as fast:
        with fast.capture("s14", "fast", bpf="icmp") as pcap:
            time.sleep(WINDOW)  # a measurement window, not a synchronisation
    out = subprocess.run(["tshark", "-r", str(pcap), "-Y", "icmp.type == 9 && ip.src == 10.14.0.1",
                          "-T", "fields", "-e", "frame.time_relative"],
                         capture_output=True, text=True, timeout=60, check=True)
    times = [float(t) for t in out.stdout.split()]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert len(gaps) >= 5
    assert 0.1 < statistics.median(gaps) < 0.5  # around 0.2 s, far from the 1 s default
