"""Argument checks of the egress shaper (the netlink side is tested in tests/netns/test_vm.py)."""

import pytest

from agent.shaping import EgressShaper


@pytest.mark.parametrize("kw", [
    dict(key=0, kbit=100, interfaces=[], src="10.0.0.1"),
    dict(key=1, kbit=0, interfaces=[], src="10.0.0.1"),
    dict(key=1, kbit=100, interfaces=[]),
    dict(key=1, kbit=100, interfaces=[], src="10.0.0.1", sport=5000),
])
def test_cap_refuses_bad_arguments(kw) -> None:
    with pytest.raises(ValueError):
        EgressShaper().cap(**kw)
