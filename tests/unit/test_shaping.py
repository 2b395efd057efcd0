"""Argument checks of the egress shaper (the netlink side is tested in tests/netns/test_vm.py)."""

import pytest

from agent.vm.shaping import EgressShaper


@pytest.mark.parametrize("kw", [
    dict(key=0, kbit=100, interfaces=[], src="10.0.0.1"),
    dict(key=1, kbit=0, interfaces=[], src="10.0.0.1"),
    dict(key=1, kbit=100, interfaces=[]),
    dict(key=1, kbit=100, interfaces=[], src=[f"10.0.0.{i}" for i in range(16)]),
])
def test_cap_refuses_bad_arguments(kw) -> None:
    with pytest.raises(ValueError):
        EgressShaper().cap(**kw)


def test_a_port_is_matched_for_udp_and_tcp_and_addresses_each_get_a_filter() -> None:
    filters = EgressShaper.filters(5, ["10.16.0.100", "10.12.0.201"], 4341)
    prios = [p for p, _ in filters]
    assert len(set(prios)) == 4 and all(p & 0xFFF == 0x105 for p in prios)
    assert filters[0][1] == ["0x0a100064/0xffffffff+12"]
    protos = sorted(keys[1] for _, keys in filters[2:])
    assert protos == ["0x00060000/0x00ff0000+8", "0x00110000/0x00ff0000+8"]
    assert all(keys[0] == "0x10f50000/0xffff0000+20" for _, keys in filters[2:])
