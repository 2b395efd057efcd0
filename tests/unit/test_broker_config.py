"""What MoatNetwork writes for the service broker (issue 10, item 1), read back as the agents
read it: no root, no Mininet network (the configuration is written before anything runs)."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from agent.core.config import AgentConfig
from topologies.client import CO_KEYS_FILE, write_co_keys
from topologies.errors import RoutingError, TopologyError
from topologies.moatnet import MoatNetwork
from topologies.patent import PatentTopo
from topologies.routing import router_hops
from topologies.run import Run

ROUTERS = ["r18a", "r18b", "r20a", "r22a", "r22b", "r22c"]
HOSTS = ["co12", "co14", "dns23", "site24"]


def network(tmp_path: Path, **kwargs) -> MoatNetwork:
    return MoatNetwork(PatentTopo(), run=Run("0101000000-cafe", root=tmp_path), **kwargs)


def written(tmp_path: Path, **kwargs) -> tuple[MoatNetwork, dict[str, AgentConfig]]:
    """Write every router's configuration as ``start`` does, and load each back."""
    m = network(tmp_path, **kwargs)
    m.run.create()
    m._prepare_nodes()
    return m, {r: AgentConfig.load(m.run.dir / f"{r}.json") for r in ROUTERS}


def test_the_broker_runs_on_the_hoa_by_default_and_every_router_knows_where(tmp_path) -> None:
    m, configs = written(tmp_path)
    assert m.broker == "r22b"
    for router, cfg in configs.items():
        assert cfg.broker is not None, router
        assert cfg.broker.address == "10.16.0.2"  # r22b's first (LAN) address
        assert cfg.broker.serve is (router == "r22b")
        assert cfg.broker.advertise_interval == 1.0
    serving = configs["r22b"].broker
    assert serving.lease_default_s == 60.0 and serving.lease_max_s == 300.0


def test_co_keys_are_fresh_per_host_and_only_on_the_broker_router(tmp_path) -> None:
    m, configs = written(tmp_path)
    keys = configs["r22b"].broker.co_keys
    assert sorted(keys) == HOSTS
    assert all(len(k) == 32 for k in keys.values())
    assert len(set(keys.values())) == len(keys)  # one key per host, not one shared
    for router in ROUTERS:
        if router != "r22b":
            assert configs[router].broker.co_keys == {}, router
        # Not secret, and every primary needs them to place its duplicates (issue 11).
        assert configs[router].broker.network_hops == configs["r22b"].broker.network_hops
        assert configs[router].broker.routers["r22b"] == "10.16.0.2"
        assert sorted(configs[router].broker.routers) == sorted(ROUTERS)
    other, _ = written(tmp_path / "second")
    assert set(other.keyring.co_keys.values()).isdisjoint(keys.values())  # fresh per run


def test_network_hops_follow_the_routes(tmp_path) -> None:
    _, configs = written(tmp_path)
    hops = configs["r22b"].broker.network_hops
    assert set(hops) == {"10.12.0.0/24", "10.14.0.0/24", "10.16.0.0/21"}
    assert hops["10.14.0.0/24"] == {"r20a": 0, "r22a": 1, "r22b": 2, "r22c": 2, "r18a": 2,
                                    "r18b": 3}
    assert hops["10.16.0.0/21"]["r22b"] == 0 and hops["10.16.0.0/21"]["r18b"] == 2
    assert hops["10.12.0.0/24"]["r18b"] == 0 and hops["10.12.0.0/24"]["r20a"] == 2


def test_the_triangle_shortens_the_foreign_networks_distance(tmp_path) -> None:
    topo = PatentTopo(triangle=True)
    assert topo.network_hops()["10.14.0.0/24"]["r18a"] == 1
    assert PatentTopo().network_hops()["10.14.0.0/24"]["r18a"] == 2


def test_router_hops_refuses_a_subnet_no_node_is_on() -> None:
    with pytest.raises(RoutingError, match="no node"):
        router_hops({"r1": ["10.0.0.1/24"]}, ["r1"], ["10.9.0.0/24"])


def test_the_broker_can_be_elsewhere_or_nowhere(tmp_path) -> None:
    _, configs = written(tmp_path / "a", broker="r22a", broker_advertise_interval=30.0)
    assert {r for r, c in configs.items() if c.broker.serve} == {"r22a"}
    assert all(c.broker.address == "10.16.0.1" for c in configs.values())
    assert all(c.broker.advertise_interval == 30.0 for c in configs.values())
    assert configs["r22a"].broker.co_keys and not configs["r22b"].broker.co_keys
    m, configs = written(tmp_path / "b", broker=None)
    assert all(c.broker is None for c in configs.values())
    assert m.keyring.co_keys == {}


def test_an_unknown_broker_router_is_refused_with_the_routers(tmp_path) -> None:
    with pytest.raises(TopologyError, match="r99x.*routers: r22a, r22b, r22c, r18a"):
        network(tmp_path, broker="r99x")


def test_keys_stay_off_command_lines_and_in_root_only_files(tmp_path) -> None:
    m, configs = written(tmp_path)
    for router in ROUTERS:
        path = m.run.dir / f"{router}.json"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        argv = " ".join(m.topo.nodeInfo(router)["daemon_argv"])
        assert all(k.hex() not in argv for k in m.keyring.co_keys.values())
    keys_file = write_co_keys(m.run, m.keyring.co_keys)
    assert keys_file == m.run.dir / CO_KEYS_FILE
    assert stat.S_IMODE(keys_file.stat().st_mode) == 0o600
    on_disk = json.loads(keys_file.read_text())
    assert {h: bytes.fromhex(k) for h, k in on_disk.items()} == configs["r22b"].broker.co_keys
