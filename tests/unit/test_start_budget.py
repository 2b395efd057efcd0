"""A network's start budget grows with its size (issue 15), and a node's routes and sysctls
go to its shell in a few lines each, never one cut by the pty's 4095-character limit."""

from __future__ import annotations

import pytest

from topologies.errors import RouteInstallError
from topologies.nodes import MAX_SHELL_LINE, _sysctls, route_batch_commands
from topologies.start_budget import agents_timeout, up_timeout


def test_the_budget_grows_with_the_network() -> None:
    assert agents_timeout(100) > agents_timeout(10) > agents_timeout(0) > 0
    assert up_timeout(102, 68) > 60.0  # what a fixed minute refused (issue 15)
    assert up_timeout(6, 8) < up_timeout(102, 68)
    with pytest.raises(ValueError):
        agents_timeout(-1)
    with pytest.raises(ValueError):
        up_timeout(1, -1)


def test_routes_are_batched_in_lines_the_shell_takes_whole() -> None:
    routes = [(f"10.{i}.0.0/24", "10.255.0.1") for i in range(1, 201)]
    commands = route_batch_commands(routes)
    assert len(commands) > 1 and all(len(c) <= MAX_SHELL_LINE for c in commands)
    joined = " ".join(commands)
    assert all(f"'route replace {p} via {v}'" in joined for p, v in routes)
    assert all(c.endswith("| ip -batch - 2>&1") for c in commands)
    assert route_batch_commands([]) == []


@pytest.mark.parametrize("bad", [("10.1.0.0/24; reboot", "10.0.0.1"), ("10.1.0.0/24", "x'y"),
                                 ("", "10.0.0.1")])
def test_a_route_that_is_no_address_is_refused(bad) -> None:
    with pytest.raises(RouteInstallError):
        route_batch_commands([bad])


class _Shell:
    name = "r1a"

    def __init__(self, answer: str = "") -> None:
        self.lines: list[str] = []
        self.answer = answer

    def cmd(self, line: str) -> str:
        self.lines.append(line)
        return self.answer


def test_sysctls_go_in_order_in_few_lines_and_a_refusal_raises() -> None:
    shell = _Shell()
    settings = [(f"net.ipv4.conf.eth{i}.rp_filter", 2) for i in range(200)]
    _sysctls(shell, settings)
    assert 1 < len(shell.lines) < 20 and all(len(line) <= MAX_SHELL_LINE for line in shell.lines)
    sent = " ".join(shell.lines).split()
    assert [s for s in sent if s.startswith("net.")] == [f"{k}={v}" for k, v in settings]
    with pytest.raises(RouteInstallError, match="unknown key"):
        _sysctls(_Shell("sysctl: cannot stat /proc/sys/net/x: unknown key"), [("net.x", 1)])
