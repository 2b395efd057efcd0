"""The hand-built rtnetlink path (agent.core.rtnl) against the kernel, in a namespace of
this test's own: every route and address the agents make through it is, as ``ip -d`` shows
it, exactly what pyroute2 made for the same call; deletions remove them; an address or route
already there (or already gone) is tolerated as before; a refusal carries the kernel's errno."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

#: Runs inside the namespace: the same changes through a real worker (the hand-built path)
#: and through pyroute2 alone (a worker whose IPRoute has no moat_rtnl), each read back.
SCRIPT = r'''
import asyncio, json, subprocess, sys
from agent.core import netlink as nl

def show():
    routes = subprocess.run(["ip", "-d", "-4", "route", "show", "table", "all"],
                            capture_output=True, text=True, check=True).stdout
    addrs = subprocess.run(["ip", "-4", "addr", "show", "dev", "lo"],
                           capture_output=True, text=True, check=True).stdout
    return sorted(l.strip() for l in routes.splitlines() if "proto kernel" not in l), \
        sorted(l.split()[1] for l in addrs.splitlines() if l.strip().startswith("inet "))

def plain():
    from pyroute2 import IPRoute
    return IPRoute()

MAKE = [nl.op_route("replace", "10.16.0.1/32", ifname="d0", table=4348),
        nl.op_route("replace", "10.16.0.2/32", via="10.1.0.2", table=4347),
        nl.op_route("replace", "10.97.0.0/24", via="10.1.0.2"),
        nl.op_route("replace", "10.16.0.1/32", ifname="d0", table=4348),
        nl.op_local_route("replace", "10.16.0.100", 4346),
        nl.op_address("add", "10.16.0.100", 32, "lo"),
        nl.op_address("add", "10.16.0.100", 32, "lo")]
UNDO = [nl.op_route("del", "10.16.0.1/32", ifname="d0", table=4348),
        nl.op_route("del", "10.16.0.2/32", via="10.1.0.2", table=4347),
        nl.op_route("del", "10.97.0.0/24", via="10.1.0.2"),
        nl.op_route("del", "10.97.0.0/24", via="10.1.0.2"),
        nl.op_local_route("del", "10.16.0.100", 4346),
        nl.op_address("del", "10.16.0.100", 32, "lo"),
        nl.op_address("del", "10.16.0.100", 32, "lo")]

async def run(worker, ops):
    for op in ops:
        await worker.run(op, "change")

out = {}
for name, factory in (("fast", nl._open_iproute), ("pyroute2", plain)):
    worker = nl.Netlink(factory)
    asyncio.run(run(worker, MAKE))
    out[name] = show()
    asyncio.run(run(worker, UNDO))
    out[name + "_after"] = show()
    errors = []
    for op in (nl.op_route("replace", "10.16.0.9/32", via="10.99.0.1", table=4348),
               nl.op_route("replace", "10.16.0.9/32", ifname="nodev", table=4348)):
        try:
            asyncio.run(run(worker, [op]))
        except nl.NetlinkError as exc:
            errors.append(nl.error_code(exc))
    out[name + "_errors"] = errors
    out[name + "_rtnl"] = nl._rtnl(worker.submit(lambda ipr: ipr, "ipr").result()) is not None
    worker.close()
print(json.dumps(out))
'''


@pytest.fixture
def namespace():
    name = f"moat-rtnl-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for cmd in (["ip", "link", "set", "lo", "up"],
                    ["ip", "link", "add", "d0", "type", "veth", "peer", "name", "d1"],
                    ["ip", "link", "set", "d0", "up"],
                    ["ip", "addr", "add", "10.1.0.1/24", "dev", "d0"]):
            subprocess.run(["ip", "netns", "exec", name, *cmd], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_the_hand_built_path_makes_what_pyroute2_makes(namespace: str) -> None:
    done = subprocess.run(["ip", "netns", "exec", namespace, sys.executable, "-c", SCRIPT],
                          capture_output=True, text=True, timeout=60, cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["fast_rtnl"] and not out["pyroute2_rtnl"]  # each path was the one meant
    routes, addresses = out["fast"]
    assert routes == out["pyroute2"][0] and addresses == out["pyroute2"][1]
    assert any(line.startswith("local 10.16.0.100 dev lo table 4346") for line in routes), routes
    assert any("10.16.0.1 dev d0 table 4348" in line for line in routes), routes
    assert "10.16.0.100/32" in addresses
    assert out["fast_after"] == out["pyroute2_after"]
    assert not [line for line in out["fast_after"][0] if "10.16." in line or "10.97." in line]
    assert "10.16.0.100/32" not in out["fast_after"][1]
    assert out["fast_errors"] == out["pyroute2_errors"] == [errno.ENETUNREACH, errno.ENODEV]
