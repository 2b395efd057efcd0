"""A router takes an object's home address onto its loopback only if it is one it may
(issue 12, item 4): on the home agent's network, not the agent's, not the router's own."""

from __future__ import annotations

import pytest

from agent.hosting.objects import check_home_address

OWN = {"10.12.0.2", "10.255.0.1"}


@pytest.mark.parametrize("home, agent", [
    ("10.16.0.100", "10.16.0.2"),    # an object of the run
    ("10.16.0.224", "10.16.0.100"),  # a part: its home agent is its object's home address
    ("10.16.7.254", "10.16.0.2"),    # the last of the plan's 1,878 home addresses (issue 15)
])
def test_home_addresses_on_the_home_agents_network_are_taken(home: str, agent: str) -> None:
    check_home_address(home, agent, OWN)


@pytest.mark.parametrize("home, agent", [
    ("10.12.0.2", "10.16.0.2"),      # this router's own address (and another network)
    ("10.99.0.100", "10.16.0.2"),    # another network
    ("10.16.0.2", "10.16.0.2"),      # the home agent itself
    ("10.16.0.0", "10.16.0.2"),      # the network address
    ("10.16.7.255", "10.16.0.2"),    # broadcast of the home /21
    ("10.16.8.1", "10.16.0.2"),      # just past the home /21
    ("127.0.0.1", "10.16.0.2"),
    ("not an address", "10.16.0.2"),
])
def test_other_addresses_are_refused(home: str, agent: str) -> None:
    with pytest.raises(ValueError):
        check_home_address(home, agent, OWN | {"10.16.0.3"})
