"""Bridged traffic under a DROP FORWARD policy, for real (issue 17), and a quiet start-up.

With ``net.bridge.bridge-nf-call-iptables = 1`` and ``iptables -P FORWARD DROP`` (what a
container engine leaves), a MOAT network must still carry traffic between hosts on different
networks, through rules tagged with its run id that are gone after it stops, the policy left
exactly as it was. The machine's settings are restored at the end whatever happens. Run under
``flock /tmp/moat-netns.lock`` like every netns test: this one changes the machine's firewall.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from topologies.moatnet import MoatNetwork
from topologies.netfilter import NF_CALL, PROC_BRIDGE, TAG_PREFIX, run_tag
from topologies.patent import PatentTopo

MOAT = [sys.executable, "-m", "experiments.cli"]


def _sh(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL)


def forward_listing() -> list[str]:
    proc = _sh("iptables", "-w", "5", "-S", "FORWARD")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def policy() -> str:
    return next(line.split()[2] for line in forward_listing() if line.startswith("-P FORWARD"))


@dataclass
class Saved:
    """What the machine had before the test changed it."""

    nf_call: str
    policy: str
    loaded_br_netfilter: bool


@pytest.fixture
def forward_drop() -> Iterator[Saved]:
    """bridge-nf-call-iptables = 1 and FORWARD policy DROP for the test, then exactly what was
    there before (rules the test may have left tagged ``moat-run:`` removed)."""
    if shutil.which("iptables") is None:
        pytest.skip("iptables not installed (run make setup)")
    loaded = False
    if not (PROC_BRIDGE / NF_CALL).exists():
        if shutil.which("modprobe") is None or _sh("modprobe", "br_netfilter").returncode != 0:
            pytest.skip("br_netfilter is not loaded and cannot be loaded here (modprobe "
                        "br_netfilter failed): bridged traffic never meets iptables")
        loaded = True
    saved = Saved((PROC_BRIDGE / NF_CALL).read_text().strip(), policy(), loaded)
    before = [line for line in forward_listing() if not line.startswith("-P")]
    try:
        (PROC_BRIDGE / NF_CALL).write_text("1\n")
        assert _sh("iptables", "-w", "5", "-P", "FORWARD", "DROP").returncode == 0
        yield saved
    finally:
        for line in forward_listing():  # bounded: one pass over what is listed
            if line.startswith("-A FORWARD") and TAG_PREFIX in line and line not in before:
                _sh("iptables", "-w", "5", "-D", "FORWARD", *line.split()[2:])
        _sh("iptables", "-w", "5", "-P", "FORWARD", saved.policy)
        (PROC_BRIDGE / NF_CALL).write_text(saved.nf_call + "\n")
        if loaded:
            _sh("modprobe", "-r", "br_netfilter")
    assert policy() == saved.policy
    assert (PROC_BRIDGE / NF_CALL).read_text().strip() == saved.nf_call or loaded
    assert [line for line in forward_listing() if not line.startswith("-P")] == before


def _ping(m: MoatNetwork, host: str, address: str) -> bool:
    return " 0% packet loss" in m.net[host].cmd(f"ping -c2 -W2 -i0.3 {address}")


def test_bridged_traffic_passes_a_drop_policy_with_run_scoped_rules(
        forward_drop: Saved, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="topologies.netfilter")
    with MoatNetwork(PatentTopo()) as m:
        bridges = sorted(m.bridge(s) for s in ("s12", "s14", "s16"))  # named for the run
        run_id = m.run.run_id
        tag = run_tag(run_id)
        # Recorded in run.json, one per bridge, each carrying the run id.
        recorded = m.run.state.forward_rules
        assert sorted(r["rule"][1] for r in recorded if r["tool"] == "iptables") == bridges
        tagged = [line for line in forward_listing() if tag in line]
        assert len(tagged) == 3 and all(f"-i {b} -o {b}" in " ".join(tagged) for b in bridges)
        assert policy() == "DROP"
        # Hosts on different networks: co14 -> s14 -> r20a -> r18a -> s12 -> co12.
        assert _ping(m, "co14", "10.12.0.30")
        assert _ping(m, "co12", "10.16.0.23")  # dns23 on the home network, through s16
        # The DROP policy does bite: without s12's rule, co12 is cut off from its router.
        s12 = next(r["rule"] for r in recorded if r["rule"][1] == m.bridge("s12"))
        assert _sh("iptables", "-w", "5", "-D", "FORWARD", *s12).returncode == 0
        try:
            assert not _ping(m, "co12", "10.12.0.1")
        finally:
            assert _sh("iptables", "-w", "5", "-I", "FORWARD", *s12).returncode == 0
        assert _ping(m, "co12", "10.12.0.1")
    assert [line for line in forward_listing() if tag in line] == []
    assert policy() == "DROP"  # never touched: the fixture restores the machine's own
    lines = [r for r in caplog.records if r.name == "topologies.netfilter"]
    assert len(lines) == 1 and tag in lines[0].getMessage() and "DROP" in lines[0].getMessage()
    out, err = capfd.readouterr()
    assert "Linux bridge may not work" not in out + err


def test_moat_clean_removes_a_killed_runs_rules(forward_drop: Saved) -> None:
    """A run that died without stopping: `moat clean --run ID` deletes its rules by run id."""
    m = MoatNetwork(PatentTopo())
    m.start()
    run_id = m.run.run_id
    try:
        assert len([line for line in forward_listing() if run_tag(run_id) in line]) == 3
        m.net.stop()  # the network goes, the run's firewall rules stay (as after a kill)
        m.net = None
        assert len([line for line in forward_listing() if run_tag(run_id) in line]) == 3
        proc = subprocess.run([*MOAT, "clean", "--run", run_id], capture_output=True, text=True,
                              timeout=120, stdin=subprocess.DEVNULL)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.count("FORWARD rule") == 3
        assert [line for line in forward_listing() if run_tag(run_id) in line] == []
    finally:
        m.stop()


def test_cli_help_prints_its_text_once() -> None:
    """`help` in `moat cli`: Mininet's help once, no `Level 25` copy; no bridge warnings."""
    before = set(os.listdir("/sys/class/net"))  # this module runs alone (tests/conftest.py)
    proc = subprocess.run([*MOAT, "cli"], input="help\nexit\n", capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout + proc.stderr
    assert "Level 25" not in text
    assert text.count("Documented commands (type help <topic>):") == 1
    assert text.count("You may also send a command to a node using:") == 1
    assert text.count("The interpreter automatically substitutes IP addresses") == 1
    assert "Linux bridge may not work" not in text
    lines = [line for line in text.splitlines() if len(line.strip()) > 20
             and set(line.strip()) - set("=-")]
    repeated = {line for line in lines if lines.count(line) > 1}
    assert not repeated, repeated
    assert set(os.listdir("/sys/class/net")) <= before  # the network's bridges went with it
