"""The DNS server 23 (dnsmasq on dns23): object names resolve to their home addresses from
any host of the network, other names of the domain do not, nothing is forwarded out, and
the server stops with the network."""

from __future__ import annotations

import subprocess

from topologies.moatnet import MoatNetwork
from topologies.patent import PatentTopo
from topologies.run import processes_of_run


def test_object_names_resolve_from_a_foreign_network_and_the_server_stops_with_it() -> None:
    with MoatNetwork(PatentTopo(), objects=["counter", "svc1"]) as net:
        for name, obj in net.objects.items():
            got = net.resolve("co14", f"{name}.home.moat")
            assert got == {"rcode": 0, "addresses": [obj.home_address]}, got
        assert net.resolve("co12", "r22b.home.moat")["addresses"] == [str(net.topo.addresses("r22b")[0].ip)]
        assert net.resolve("co12", "nobody.home.moat")["rcode"] == 3  # NXDOMAIN
        assert net.resolve("co12", "example.org")["addresses"] == []  # answered, never forwarded
        log = (net.run.dir / "dns23" / "dnsmasq.log").read_text()
        assert "query[A] counter.home.moat from 10.14.0." in log
        pid = net.net["dns23"].daemon_pid
        assert pid is not None
        run_id = net.run.run_id
    assert subprocess.run(["kill", "-0", str(pid)], capture_output=True).returncode != 0
    assert processes_of_run(run_id) == []
