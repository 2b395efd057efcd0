"""``AgentConfig.static_routes``: the topology's routes travel to the agent, checked on load.

Old configurations (without the field) still load, with no routes to keep; a route whose
prefix or next hop is not IPv4 is refused with a ConfigError that names it, never half-read.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable

import pytest

from agent.core.config import AgentConfig, Interface, StaticRoute
from agent.core.errors import ConfigError


def base() -> dict[str, Any]:
    cfg = AgentConfig("r22a", "/tmp/x", [], [Interface("r22a-eth0", "10.22.0.1")],
                      static_routes=[StaticRoute("10.18.0.0/24", "10.255.0.2"),
                                     StaticRoute("0.0.0.0/0", "10.255.0.6")])
    return json.loads(json.dumps(cfg.to_json()))


def test_static_routes_round_trip_through_json() -> None:
    data = base()
    assert data["static_routes"] == [{"prefix": "10.18.0.0/24", "via": "10.255.0.2"},
                                     {"prefix": "0.0.0.0/0", "via": "10.255.0.6"}]
    back = AgentConfig.from_json(data)
    assert back.static_routes == [StaticRoute("10.18.0.0/24", "10.255.0.2"),
                                  StaticRoute("0.0.0.0/0", "10.255.0.6")]


def test_an_old_config_without_the_field_has_no_routes() -> None:
    data = base()
    del data["static_routes"]
    assert AgentConfig.from_json(data).static_routes == []


def mutate(change: Callable[[list[Any]], None]) -> dict[str, Any]:
    data = base()
    change(data["static_routes"])
    return data


@pytest.mark.parametrize("change, named", [
    pytest.param(lambda r: r[0].update(prefix="10.18.0.1/24"), "10.18.0.1/24", id="host-bits"),
    pytest.param(lambda r: r[0].update(prefix="10.18.0.0"), "10.18.0.0", id="no-length"),
    pytest.param(lambda r: r[0].update(prefix="10.18.0.0/33"), "10.18.0.0/33", id="long"),
    pytest.param(lambda r: r[0].update(prefix="fd00::/64"), "fd00::/64", id="ipv6-prefix"),
    pytest.param(lambda r: r[0].update(via="fd00::1"), "fd00::1", id="ipv6-via"),
    pytest.param(lambda r: r[0].update(via="10.255.0.300"), "10.255.0.300", id="bad-via"),
    pytest.param(lambda r: r[0].update(via=7), "7", id="via-not-text"),
    pytest.param(lambda r: r[0].pop("via"), "prefix", id="no-via"),
    pytest.param(lambda r: r.append(["10.1.0.0/24", "10.255.0.2"]), "10.1.0.0/24", id="a-list"),
    pytest.param(lambda r: r.append({"prefix": "10.18.0.0/24", "via": "10.255.0.6"}),
                 "10.18.0.0/24", id="twice"),
])
def test_a_bad_route_is_refused_by_name(change: Callable[[list[Any]], None], named: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(named)):
        AgentConfig.from_json(mutate(change))


def test_not_a_list_is_refused() -> None:
    data = base()
    data["static_routes"] = None
    with pytest.raises(ConfigError):
        AgentConfig.from_json(data)


def test_a_config_built_in_code_is_checked_too() -> None:
    cfg = AgentConfig("r22a", "/tmp/x", [], [Interface("r22a-eth0", "10.22.0.1")],
                      static_routes=[StaticRoute("10.18.0.0/24", "nowhere")])
    with pytest.raises(ConfigError, match="nowhere"):
        cfg.validate()
