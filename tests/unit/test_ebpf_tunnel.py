"""The eBPF backend without root: map layouts, and what the tunnel asks of the kernel.

The loader (compile, bpftool, tc hooks, the veth) and the pinned maps are fakes that write
into the same log as the fake IPRoute's routes and rules, so the tests see the order in
which map entries, routes and rules reach the kernel through the real netlink worker.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from collections.abc import Iterator
from typing import Any

import pytest

import agent.mobility.tunnel.choose as choose_mod
import agent.mobility.tunnel.ebpf_loader as loader_mod
from agent.core.netlink import Netlink
from agent.mobility.tunnel import EbpfTunnel, TunnelError, TunnelUnavailable, make_tunnel
from agent.mobility.tunnel.ebpf_maps import (ACCEPT_DELIVER, ACCEPT_RESTRICTED, MAX_PEERS,
                                             encode_accept_value, encode_config,
                                             encode_peers,
                                             possible_cpus, sum_stats)
from agent.mobility.tunnel.base import STAT_KEYS
from test_tunnel import FakeIPRoute

HOA, FOA, FOA2 = "10.99.0.1", "10.99.0.2", "10.99.1.2"
OBJ = "10.97.0.100"


def ip(text: str) -> bytes:
    return socket.inet_aton(text)


# --- layouts --------------------------------------------------------------------------------


def test_peers_layout_matches_struct_peers() -> None:
    raw = encode_peers([(FOA, 42), (FOA2, 0xFFFFFFFF)])
    assert len(raw) == 4 + 8 * MAX_PEERS
    (count,) = struct.unpack_from("=I", raw)
    assert count == 2
    assert raw[4:8] == ip(FOA) and struct.unpack_from("=I", raw, 8)[0] == 42
    assert raw[12:16] == ip(FOA2) and struct.unpack_from("=I", raw, 16)[0] == 0xFFFFFFFF
    assert raw[20:] == b"\0" * (8 * (MAX_PEERS - 2))


@pytest.mark.parametrize("n", [0, MAX_PEERS + 1])
def test_peers_outside_one_to_max_are_refused(n: int) -> None:
    with pytest.raises(ValueError, match="bicasts"):
        encode_peers([(FOA, k) for k in range(n)])


def test_accept_value_flags_and_delivery() -> None:
    plain = encode_accept_value(False)
    assert struct.unpack_from("=II", plain) == (0, 0) and len(plain) == 20
    restricted = encode_accept_value(True, (7, "02:00:00:00:00:01", "02:00:00:00:00:02"))
    flags, ifindex = struct.unpack_from("=II", restricted)
    assert flags == ACCEPT_RESTRICTED | ACCEPT_DELIVER and ifindex == 7
    assert restricted[8:14] == bytes.fromhex("020000000001")
    assert restricted[14:20] == bytes.fromhex("020000000002")
    with pytest.raises(ValueError, match="MAC"):
        encode_accept_value(False, (7, "02:00", "02:00:00:00:00:02"))


def test_config_layout() -> None:
    raw = encode_config(HOA, 9, "aa:bb:cc:dd:ee:ff")
    assert raw[:4] == ip(HOA) and struct.unpack_from("=I", raw, 4)[0] == 9
    assert raw[8:14] == bytes.fromhex("aabbccddeeff") and len(raw) == 16


def test_stats_sum_over_cpus(tmp_path) -> None:
    per_cpu = [struct.pack("=QQ", i, 10 * i) for i in range(len(STAT_KEYS))]
    stats = sum_stats(per_cpu)
    assert stats == {k: 11 * i for i, k in enumerate(STAT_KEYS)}
    possible = tmp_path / "possible"
    possible.write_text("0,2-3\n")
    assert possible_cpus(str(possible)) == 4


# --- fakes ----------------------------------------------------------------------------------


class FakeMaps:
    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.data: dict[str, dict[bytes, bytes]] = {}
        self.closed = False
        self.refuse: set[str] = set()

    def update(self, name: str, key: bytes, value: bytes) -> None:
        if name in self.refuse:
            raise TunnelError(f"{name} refused")
        self.data.setdefault(name, {})[key] = value
        self.log.append(f"map update {name} {key.hex()}")

    def delete(self, name: str, key: bytes) -> None:
        self.data.get(name, {}).pop(key, None)
        self.log.append(f"map delete {name} {key.hex()}")

    def apply(self, ops: list[Any]) -> None:
        for op in ops:
            if op.value is None:
                self.delete(op.map, op.key)
            else:
                self.update(op.map, op.key, op.value)

    def stats(self) -> dict[str, int]:
        return {k: (5 if k == "encapsulated" else 0) for k in STAT_KEYS}

    def close(self) -> None:
        self.closed = True


class FakeLoader:
    """What the kernel would do for the loader, recorded in the IPRoute's log."""

    def __init__(self, ipr: FakeIPRoute) -> None:
        self.ipr = ipr
        self.maps_obj = FakeMaps(ipr.calls)
        self.loaded: list[str] = []
        self.unloaded: list[str] = []
        self.fail_load: Exception | None = None

    def load(self, pin_dir: str) -> None:
        if self.fail_load is not None:
            raise self.fail_load
        self.loaded.append(pin_dir)

    def maps(self, pin_dir: str) -> FakeMaps:
        return self.maps_obj

    def program(self, pin_dir: str, name: str) -> int:
        return os.open(os.devnull, os.O_RDONLY)

    def make_device(self, ipr: Any, name: str, peer: str, mtu: int) -> tuple[int, str]:
        self.ipr.calls.append(f"device {name} peer {peer} mtu {mtu}")
        return self.ipr.index[name], "02:00:00:00:00:aa"

    def wire_interfaces(self, ipr: Any, skip: set[str]) -> dict[str, int]:
        return {n: i for n, i in self.ipr.index.items() if n not in skip and n.startswith("eth")}

    def attach(self, ipr: Any, index: int, fd: int, name: str, ingress: bool) -> None:
        self.ipr.calls.append(f"attach {name} {'ingress' if ingress else 'egress'} {self.ipr._name(index)}")

    def detach(self, ipr: Any, index: int, ingress: bool) -> None:
        self.ipr.calls.append(f"detach {'ingress' if ingress else 'egress'} {self.ipr._name(index)}")

    def delete_device(self, ipr: Any, name: str) -> None:
        self.ipr.calls.append(f"delete device {name}")

    def interface(self, ipr: Any, ifname: str) -> tuple[int, str]:
        return self.ipr.index[ifname], "02:00:00:00:00:ee"

    def unload(self, pin_dir: str) -> None:
        self.unloaded.append(pin_dir)


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    lp = asyncio.new_event_loop()
    yield lp
    lp.close()


@pytest.fixture
def ipr() -> FakeIPRoute:
    return FakeIPRoute("moat0", "eth0", "eth1")


@pytest.fixture
def netlink(ipr: FakeIPRoute) -> Iterator[Netlink]:
    worker = Netlink(lambda: ipr, timeout=5)
    yield worker
    worker.close()


@pytest.fixture
def fake_loader(ipr: FakeIPRoute) -> FakeLoader:
    return FakeLoader(ipr)


@pytest.fixture
def tunnel(loop, netlink, fake_loader, ipr, monkeypatch) -> Iterator[EbpfTunnel]:
    monkeypatch.setattr("agent.mobility.tunnel.ebpf.write_sysctl", lambda path, value: True)
    monkeypatch.setattr("agent.mobility.tunnel.base.write_sysctl", lambda path, value: True)
    t = EbpfTunnel(loop, HOA, netlink=netlink, loader=fake_loader, pin_dir="/pins/x")
    t.start()
    yield t
    t.close()
    loop.run_until_complete(t.settle())


def settled(loop: asyncio.AbstractEventLoop, t: EbpfTunnel) -> None:
    loop.run_until_complete(t.settle())


def since(calls: list[str], mark: int) -> list[str]:
    return calls[mark:]


# --- the tunnel -----------------------------------------------------------------------------


def test_start_loads_makes_the_device_and_hooks_every_wire_interface(tunnel, fake_loader, ipr) -> None:
    assert fake_loader.loaded == ["/pins/x"]
    assert ipr.calls[:5] == ["device moat0 peer moat0p mtu 1472",
                             f"map update moat_config {'00000000'}",
                             "rule add from 0.0.0.0/0 lookup 4348 priority 4346",
                             "attach moat_encap egress moat0",
                             "attach moat_decap ingress eth0"]
    assert "attach moat_decap ingress eth1" in ipr.calls
    config = fake_loader.maps_obj.data["moat_config"][b"\0\0\0\0"]
    assert config == encode_config(HOA, ipr.index["moat0"], "02:00:00:00:00:aa")
    assert tunnel.wire == {"eth0": ipr.index["eth0"], "eth1": ipr.index["eth1"]}
    assert tunnel.stats["encapsulated"] == 5  # read from the programs' counters


def test_peers_written_before_the_route_and_deleted_after_it(tunnel, loop, ipr, fake_loader) -> None:
    mark = len(ipr.calls)
    tunnel.set_peers(OBJ, [(FOA, 42), (FOA2, 43), (FOA, 42)])
    settled(loop, tunnel)
    key = ip(OBJ).hex()
    assert since(ipr.calls, mark) == [f"map update moat_peers {key}",
                                      f"route replace {OBJ}/32 dev moat0 table 4348"]
    assert fake_loader.maps_obj.data["moat_peers"][ip(OBJ)] == encode_peers([(FOA, 42), (FOA2, 43)])
    mark = len(ipr.calls)
    tunnel.set_peers(OBJ, [(FOA2, 43)])  # a binding went: the copies follow
    settled(loop, tunnel)
    assert fake_loader.maps_obj.data["moat_peers"][ip(OBJ)] == encode_peers([(FOA2, 43)])
    # the map entry alone (a make-before-break switch): the route into the device is there
    assert since(ipr.calls, mark) == [f"map update moat_peers {key}"]
    mark = len(ipr.calls)
    tunnel.set_peers(OBJ, [])
    settled(loop, tunnel)
    # the route into the device first (the kernel's main table and neighbour resolution
    # from then on), the peers after it (what reached the device meanwhile still goes)
    assert since(ipr.calls, mark) == [f"route del {OBJ}/32 dev moat0 table 4348",
                                      f"map delete moat_peers {key}"]
    assert ip(OBJ) not in fake_loader.maps_obj.data["moat_peers"] and OBJ not in tunnel.peers


def test_a_refused_route_into_the_device_is_asked_again_with_the_next_change(
        tunnel, loop, ipr) -> None:
    ipr.fail.add("route replace")
    tunnel.set_peers(OBJ, [(FOA, 42)])
    with pytest.raises(TunnelError):
        settled(loop, tunnel)
    ipr.fail.clear()
    mark = len(ipr.calls)
    tunnel.set_peers(OBJ, [(FOA2, 43)])
    settled(loop, tunnel)
    assert since(ipr.calls, mark) == [f"map update moat_peers {ip(OBJ).hex()}",
                                      f"route replace {OBJ}/32 dev moat0 table 4348"]


def test_more_bindings_than_slots_bicast_to_the_first(tunnel, loop, fake_loader) -> None:
    peers = [(f"10.99.{i}.2", i) for i in range(MAX_PEERS + 2)]
    tunnel.set_peers(OBJ, peers)
    settled(loop, tunnel)
    assert fake_loader.maps_obj.data["moat_peers"][ip(OBJ)] == encode_peers(peers[:MAX_PEERS])


def test_accept_restrict_forget(tunnel, loop, fake_loader) -> None:
    data = fake_loader.maps_obj.data
    akey = ip(HOA) + struct.pack("=I", 42)
    tunnel.accept(HOA, 42)
    settled(loop, tunnel)
    assert data["moat_accepted"][akey] == encode_accept_value(False)
    tunnel.restrict(HOA, 42, frozenset({OBJ, "10.97.1.0"}))
    settled(loop, tunnel)
    assert data["moat_accepted"][akey] == encode_accept_value(True)
    assert set(data["moat_allowed"]) == {akey + ip(OBJ), akey + ip("10.97.1.0")}
    tunnel.restrict(HOA, 42, frozenset({OBJ}))
    settled(loop, tunnel)
    assert set(data["moat_allowed"]) == {akey + ip(OBJ)}
    tunnel.forget(HOA, 42)
    settled(loop, tunnel)
    assert data["moat_accepted"] == {} and data["moat_allowed"] == {}
    assert (HOA, 42) not in tunnel.accepted and (HOA, 42) not in tunnel.destinations


def test_restrict_adds_destinations_before_the_flag(tunnel, loop, ipr) -> None:
    tunnel.accept(HOA, 42)
    settled(loop, tunnel)
    mark = len(ipr.calls)
    tunnel.restrict(HOA, 42, frozenset({OBJ}))
    settled(loop, tunnel)
    assert [c.split()[2] for c in since(ipr.calls, mark)] == ["moat_allowed", "moat_accepted"]


def test_delivery_as_frames_sets_interface_and_macs(tunnel, loop, fake_loader, ipr) -> None:
    tunnel.accept(HOA, 42)
    tunnel.set_delivery(HOA, 42, ("eth1", "02:00:00:00:00:11"))
    settled(loop, tunnel)
    akey = ip(HOA) + struct.pack("=I", 42)
    assert fake_loader.maps_obj.data["moat_accepted"][akey] == encode_accept_value(
        False, (ipr.index["eth1"], "02:00:00:00:00:11", "02:00:00:00:00:ee"))
    tunnel.set_delivery(HOA, 42, None)
    settled(loop, tunnel)
    assert fake_loader.maps_obj.data["moat_accepted"][akey] == encode_accept_value(False)
    with pytest.raises(ValueError):
        tunnel.set_delivery(HOA, 42, ("eth1", "zz"))


def test_reverse_tunnel_map_rule_and_table(tunnel, loop, ipr, fake_loader) -> None:
    mark = len(ipr.calls)
    tunnel.set_reverse(OBJ, (HOA, 42))
    settled(loop, tunnel)
    assert since(ipr.calls, mark) == [
        f"map update moat_reverse {ip(OBJ).hex()}", "route replace 0.0.0.0/0 dev moat0 table 4347",
        f"rule add from {OBJ}/32 lookup 4347 priority 4347"]
    assert fake_loader.maps_obj.data["moat_reverse"][ip(OBJ)] == ip(HOA) + struct.pack("=I", 42)
    mark = len(ipr.calls)
    tunnel.set_reverse(OBJ, None)
    settled(loop, tunnel)
    assert since(ipr.calls, mark) == [f"rule del from {OBJ}/32 lookup 4347 priority 4347",
                                      f"map delete moat_reverse {ip(OBJ).hex()}",
                                      "route del 0.0.0.0/0 dev moat0 table 4347"]


def test_close_unhooks_deletes_device_and_unpins(loop, netlink, fake_loader, ipr, monkeypatch) -> None:
    monkeypatch.setattr("agent.mobility.tunnel.ebpf.write_sysctl", lambda path, value: True)
    t = EbpfTunnel(loop, HOA, netlink=netlink, loader=fake_loader, pin_dir="/pins/y")
    t.start()
    t.set_peers(OBJ, [(FOA, 42)])
    t.close()
    settled(loop, t)
    assert ipr.calls[-5:] == [f"route del {OBJ}/32 dev moat0 table 4348",
                              "rule del from 0.0.0.0/0 lookup 4348 priority 4346",
                              "detach ingress eth0", "detach ingress eth1", "delete device moat0"]
    assert fake_loader.unloaded == ["/pins/y"] and fake_loader.maps_obj.closed
    t.close()  # twice is fine
    settled(loop, t)


def test_a_refused_map_change_is_reported_by_settle(tunnel, loop, fake_loader) -> None:
    fake_loader.maps_obj.refuse.add("moat_peers")
    tunnel.set_peers(OBJ, [(FOA, 42)])
    with pytest.raises(TunnelError, match="moat_peers refused"):
        settled(loop, tunnel)


def test_start_that_cannot_load_is_an_error_and_leaves_nothing(loop, netlink, fake_loader) -> None:
    fake_loader.fail_load = TunnelUnavailable("no bpftool")
    t = EbpfTunnel(loop, HOA, netlink=netlink, loader=fake_loader, pin_dir="/pins/z")
    with pytest.raises(TunnelError, match="no bpftool"):
        t.start()
    loop.run_until_complete(asyncio.sleep(0.05))
    assert fake_loader.unloaded == ["/pins/z"]


def test_bad_input_is_refused_before_anything_is_queued(tunnel, ipr) -> None:
    mark = len(ipr.calls)
    with pytest.raises(ValueError):
        tunnel.set_peers("not-an-address", [(FOA, 1)])
    with pytest.raises(ValueError):
        tunnel.accept(HOA, -1)
    with pytest.raises(ValueError):
        tunnel.set_reverse(OBJ, (HOA, 1 << 32))
    assert since(ipr.calls, mark) == [] and tunnel.peers == {}


# --- choosing it ----------------------------------------------------------------------------


def test_forced_ebpf_unavailable_names_the_reason(monkeypatch, loop) -> None:
    monkeypatch.setattr(choose_mod, "probe_ebpf", lambda: "the eBPF backend needs clang")
    with pytest.raises(TunnelUnavailable, match="ebpf GRE backend requested but unavailable: "
                                                "the eBPF backend needs clang"):
        make_tunnel("ebpf", loop=loop, local=HOA)


def test_forced_ebpf_available_builds_it(monkeypatch, loop) -> None:
    monkeypatch.setattr(choose_mod, "probe_ebpf", lambda: None)
    assert isinstance(make_tunnel("ebpf", loop=loop, local=HOA), EbpfTunnel)


@pytest.mark.parametrize("ebpf_reason, expect", [(None, "ebpf"), ("no clang", "userspace")])
def test_auto_falls_back_in_order(monkeypatch, ebpf_reason, expect) -> None:
    monkeypatch.setattr(choose_mod, "AUTO_ORDER", ("kernel", "ebpf", "userspace"))
    monkeypatch.setattr(choose_mod, "_probe_kernel_gre", lambda: "no ip_gre")
    monkeypatch.setattr(choose_mod, "probe_ebpf", lambda: ebpf_reason)
    assert choose_mod.detect_backend() == expect


def test_open_tunnel_refuses_unavailable_ebpf(monkeypatch) -> None:
    monkeypatch.setattr(choose_mod, "probe_ebpf", lambda: "bpftool missing")

    async def go() -> None:
        with pytest.raises(TunnelUnavailable, match="bpftool missing"):
            await choose_mod.open_tunnel("ebpf", local=HOA)

    asyncio.run(go())


def test_no_clang_is_a_clear_reason(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(loader_mod.shutil, "which", lambda name, path=None: None)
    with pytest.raises(TunnelUnavailable, match="needs clang"):
        loader_mod.compile_object(cache=tmp_path)


def test_pin_dir_is_run_scoped_and_dotless() -> None:
    path = loader_mod.pin_dir_for("10.99.0.1", run_id="r.1", pid=77)
    assert path == "/sys/fs/bpf/moat/r_1/10_99_0_1-77"


def test_auto_order_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("MOAT_TUNNEL_AUTO", "ebpf, userspace")
    monkeypatch.setattr(choose_mod, "probe_ebpf", lambda: None)
    monkeypatch.setattr(choose_mod, "_probe_kernel_gre", lambda: None)  # not asked: not listed
    assert choose_mod.auto_order() == ("ebpf", "userspace")
    assert choose_mod.detect_backend() == "ebpf"
    monkeypatch.setenv("MOAT_TUNNEL_AUTO", "ebpf,gre")
    with pytest.raises(ValueError, match="MOAT_TUNNEL_AUTO"):
        choose_mod.auto_order()
    monkeypatch.delenv("MOAT_TUNNEL_AUTO")
    assert choose_mod.auto_order() == choose_mod.AUTO_ORDER
