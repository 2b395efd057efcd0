"""Run-scoped root-namespace names (issue 15): a run's bridges and ports carry its tag, the
tag is held by one run at a time, and cleaning a run removes only interfaces of its own."""

from __future__ import annotations

import itertools
import os
import threading
from pathlib import Path

import pytest

from topologies.addressing import MAX_IFNAME
from topologies.naming import NamingError, bridge_name, choose_tag, is_tag, port_name, tag_in_use
from topologies.net import root_namespace_names, scope_topology
from topologies.patent import PatentTopo
from topologies.run import TAGS_DIR, Run, RunState, clean_all, run_links
from topologies.scale import ScaleTopo


def _hex_source(*values: str):
    it = iter(values)
    return lambda n: next(it)


def test_names_carry_the_tag_and_fit_ifnamsiz() -> None:
    assert bridge_name("m3f9c", "s16") == "m3f9c-s16"
    assert port_name("m3f9c-s16", 3) == "m3f9c-s16-3"
    longest = port_name(bridge_name("mffff", "s254"), 999)
    assert len(longest) <= MAX_IFNAME
    with pytest.raises(NamingError):
        port_name(bridge_name("mffff", "s254"), 12345)
    for bad in ("", "s16", "M3F9C", "m3f9", "m3f9c0", "mzzzz"):
        with pytest.raises(NamingError):
            bridge_name(bad, "s16")
    with pytest.raises(NamingError):
        bridge_name("m3f9c", "s-16")


def test_a_tag_an_interface_carries_is_never_chosen() -> None:
    existing = ["eth0", "m0001-s16", "m0002"]
    assert tag_in_use("m0001", existing) and tag_in_use("m0002", existing)
    assert not tag_in_use("m0003", existing)
    tag = choose_tag(existing, token_hex=_hex_source("0001", "0002", "0003"))
    assert tag == "m0003"


def test_a_tag_another_run_holds_is_skipped_and_exhaustion_is_an_error() -> None:
    held = {"m00aa"}
    tag = choose_tag([], taken=lambda t: t in held, token_hex=_hex_source("00aa", "00bb"))
    assert tag == "m00bb"
    with pytest.raises(NamingError, match="no free run tag"):
        choose_tag([], taken=lambda t: True, attempts=3)


def test_scoping_names_every_root_namespace_interface_and_nothing_inside_nodes() -> None:
    topo = PatentTopo()
    names = scope_topology(topo, "m1234")
    assert names == root_namespace_names(topo)
    assert {topo.nodeInfo(s)["bridge"] for s in topo.switches()} == {"m1234-s12", "m1234-s14",
                                                                     "m1234-s16"}
    assert all(n.startswith("m1234-") and len(n) <= MAX_IFNAME for n in names)
    # One port per LAN member, and the node-side names stay the topology's.
    members = sum(len(net.routers) + len(net.hosts) for net in topo.networks.values())
    assert len(names) == len(topo.switches()) + members
    assert topo.interfaces("r18a")[0].name == "r18a-eth0"
    # Scoping again with another tag renames from the topology's own names.
    again = scope_topology(topo, "m5678")
    assert [n.replace("m5678", "m1234") for n in again] == names


def test_a_large_topology_still_fits() -> None:
    topo = ScaleTopo(n_foreign=33, routers_per_net=3)
    names = scope_topology(topo, "mabcd")
    assert len(names) == len(set(names)) and max(map(len, names)) <= MAX_IFNAME


def test_two_runs_starting_at_once_never_share_a_tag(tmp_path: Path) -> None:
    """The tag is held by an atomic symlink: runs racing for the same random tags get
    different ones."""
    runs = [Run(f"0101000000-{i:04x}", root=tmp_path).create() for i in range(8)]
    tags: dict[str, str] = {}
    barrier = threading.Barrier(len(runs))

    def reserve(run: Run) -> None:
        barrier.wait()
        tags[run.run_id] = run.reserve_tag(interfaces=[])

    with pytest.MonkeyPatch.context() as mp:
        # Every run draws from the same short list of tags, in the same order.
        import topologies.naming as naming

        local = threading.local()
        order = [f"{i:04x}" for i in range(16)]

        def same_sequence(n: int) -> str:
            if not hasattr(local, "it"):
                local.it = iter(order)
            return next(local.it)

        mp.setattr(naming.secrets, "token_hex", same_sequence)
        threads = [threading.Thread(target=reserve, args=(r,)) for r in runs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(set(tags.values())) == len(runs) and all(is_tag(t) for t in tags.values())
    for run in runs:
        assert os.readlink(tmp_path / TAGS_DIR / tags[run.run_id]) == run.run_id
        assert Run.load(run.run_id, tmp_path).state.tag == tags[run.run_id]


def _state(tag: str, links: list[str], bridges: list[str]) -> RunState:
    return RunState("r1", tag=tag, root_links=links, bridges=bridges)


def test_a_run_removes_its_recorded_and_tagged_interfaces_only() -> None:
    state = _state("m0001", ["m0001-s16-1", "m0001-s16-2"], ["m0001-s16"])
    existing = ["eth0", "m0001-s16", "m0001-s16-1", "m0001-s12-4", "m0002-s16", "m0002-s16-1", "s16"]
    remove, refused = run_links("r1", state, ["m0001"], existing, others=set())
    # Recorded and existing, plus an unrecorded one of its tag (a crash between the record
    # and a later build); never another tag's, never a plain name.
    assert sorted(remove) == ["m0001-s12-4", "m0001-s16", "m0001-s16-1"]
    assert refused == []


def test_a_recorded_name_without_the_runs_tag_or_another_runs_is_refused() -> None:
    state = _state("m0001", ["s16-eth1"], ["m0001-s16", "m0002-s16"])
    remove, refused = run_links("r1", state, ["m0001"], ["s16-eth1", "m0001-s16", "m0002-s16"],
                                others={"m0002-s16"})
    assert remove == ["m0001-s16"] and sorted(refused) == ["m0002-s16", "s16-eth1"]
    # A run from before tags: its recorded names, unless another run recorded them too.
    legacy = _state("", ["s16-eth1"], ["s16"])
    remove, refused = run_links("r1", legacy, [], ["s16", "s16-eth1"], others={"s16"})
    assert remove == ["s16-eth1"] and refused == ["s16"]


def test_clean_of_one_run_releases_its_tag_and_keeps_the_others(tmp_path: Path,
                                                                  monkeypatch) -> None:
    import agent.hosting.cgroups as cg
    import topologies.run as runmod

    # Nothing of the machine: no process, cgroup, interface or rule is looked at.
    monkeypatch.setattr(runmod, "processes_of_run", lambda run_id: [])
    monkeypatch.setattr(runmod, "_run_ids_by_pid", lambda: {})
    monkeypatch.setattr(runmod, "_run_ids_by_cmdline", lambda: {})
    monkeypatch.setattr(cg, "clean_run", lambda run_id, *a, **k: ([], []))
    monkeypatch.setattr(runmod, "_interfaces", lambda: [])
    monkeypatch.setattr(runmod, "remove_run_rules", lambda *a, **k: [])
    monkeypatch.setattr(runmod, "UP_LOG_DIR", tmp_path)
    (tmp_path / "moat-up-0101000000-000b.log").write_text("the holder's output")
    (tmp_path / "moat-up-0101000000-000a.log").write_text("the holder's output")
    a = Run("0101000000-000a", root=tmp_path).create()
    b = Run("0101000000-000b", root=tmp_path).create()
    tag_a, tag_b = a.reserve_tag(interfaces=[]), b.reserve_tag(interfaces=[])
    removed = runmod.clean_run(b.run_id, tmp_path)
    assert f"tag {tag_b}" in removed
    assert not (tmp_path / "moat-up-0101000000-000b.log").exists()
    assert (tmp_path / "moat-up-0101000000-000a.log").exists()
    assert not (tmp_path / TAGS_DIR / tag_b).is_symlink() and not b.dir.exists()
    assert os.readlink(tmp_path / TAGS_DIR / tag_a) == a.run_id and a.dir.exists()
    # A stopped run keeps its directory, and so its tag (its names stay its own).
    kept = runmod.clean_run(a.run_id, tmp_path, keep_dir=True)
    assert not any(line.startswith("tag") for line in kept)
    # clean_all takes "tags" for no run, and finds a run by its tag alone.
    (tmp_path / TAGS_DIR / "m0c0c").symlink_to("0101000000-0c0c")
    assert set(clean_all(tmp_path)) == {a.run_id, "0101000000-0c0c"}
    assert list((tmp_path / TAGS_DIR).iterdir()) == []


@pytest.mark.parametrize("bad", [TAGS_DIR, "sandbox"])
def test_the_run_roots_own_directories_are_no_run_id(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError):
        Run(bad, root=tmp_path)


def test_tags_are_spread_over_the_space() -> None:
    tags = {choose_tag([]) for _ in itertools.repeat(None, 200)}
    assert len(tags) > 190 and all(is_tag(t) for t in tags)


def test_a_runs_bpf_pins_go_and_no_other_runs(tmp_path: Path) -> None:
    from topologies.run import remove_bpf_pins

    for run in ("r1", "r2"):
        pins = tmp_path / run / "10_12_0_1-42" / "maps"
        pins.mkdir(parents=True)
        (pins / "bindings").write_text("")
    assert remove_bpf_pins("r1", tmp_path) == [f"bpf pins {tmp_path / 'r1'}"]
    assert not (tmp_path / "r1").exists()
    assert (tmp_path / "r2" / "10_12_0_1-42" / "maps" / "bindings").exists()
    assert remove_bpf_pins("r1", tmp_path) == [] and remove_bpf_pins("..", tmp_path) == []
