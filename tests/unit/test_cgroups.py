"""agent.hosting.cgroups against fake cgroup trees (no root): detection, nesting under the agent's
own cgroup, the files written, v2 subtree delegation, OOM/pids counters, usage parsing,
run-id naming and cleanup.

A small fake kernel stands behind the tree: mkdir fills in a cgroup's interface files (those
of the controllers its parent hands down), writes to cgroup.procs move a pid, writes to
cgroup.subtree_control obey the v2 rules (the controller must be available, no internal
processes), cgroup.kill and kill() empty cgroup.procs, rmdir refuses a populated cgroup.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from pathlib import Path

import pytest

from agent.hosting.cgroups import (
    CgroupError,
    CgroupManager,
    CgroupV1,
    CgroupV2,
    CgroupVersion,
    Limits,
    clean_run,
    detect,
    find_run_cgroups,
    parse_proc_cgroup,
    remove_tree,
)
from agent.hosting.cgroups import kernel as cgroupfs  # what the fake kernel replaces

MiB = 1 << 20

V1_FILES = {
    "cpu": {"cpu.cfs_period_us": "100000\n", "cpu.cfs_quota_us": "-1\n", "cpu.shares": "1024\n"},
    "cpuacct": {"cpuacct.usage": "0\n"},
    "memory": {"memory.limit_in_bytes": "9223372036854771712\n", "memory.usage_in_bytes": "0\n",
               "memory.max_usage_in_bytes": "0\n", "memory.failcnt": "0\n",
               "memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 0\n"},
    "pids": {"pids.max": "max\n", "pids.current": "0\n", "pids.events": "max 0\n"},
}
V2_FILES = {
    "cpu": {"cpu.max": "max 100000\n", "cpu.weight": "100\n"},
    "memory": {"memory.max": "max\n", "memory.current": "0\n", "memory.peak": "0\n",
               "memory.swap.max": "max\n", "memory.oom.group": "0\n",
               "memory.events": "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n"},
    "pids": {"pids.max": "max\n", "pids.current": "0\n", "pids.events": "max 0\n"},
}


class FakeKernel:
    def __init__(self, root: Path, version: str) -> None:
        self.root = root
        self.version = version
        self.writes: list[tuple[Path, str]] = []
        self.killed: list[int] = []

    # tree building

    def v2_root(self, controllers: str = "cpuset cpu io memory pids") -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        for name, text in {"cgroup.controllers": controllers + "\n", "cgroup.subtree_control": "",
                           "cgroup.procs": "1\n", "cpu.stat": "usage_usec 0\n"}.items():
            (self.root / name).write_text(text)
        return self.root

    def v1_hierarchy(self, name: str) -> Path:
        d = self.root / name
        d.mkdir(parents=True)
        (d / "cgroup.procs").write_text("1\n")
        for c in name.split(","):
            for f, text in V1_FILES[c].items():
                if not f.startswith(("pids.", "cpu.cfs_quota")):  # root has no pids.max
                    (d / f).write_text(text)
        return d

    def make(self, path: Path, procs: str = "") -> Path:
        """mkdir -p with interface files, as the kernel would."""
        missing = []
        p = path
        while not p.exists():
            missing.append(p)
            p = p.parent
        for d in reversed(missing):
            self.mkdir(d)
        if procs:
            (path / "cgroup.procs").write_text(procs)
        return path

    def _hierarchy(self, path: Path) -> Path:
        if self.version == "v2":
            return self.root
        return self.root / path.relative_to(self.root).parts[0]

    # the patched primitives

    def mkdir(self, path: Path) -> None:
        os.mkdir(path)
        (path / "cgroup.procs").write_text("")
        if self.version == "v2":
            parent_ctrls = (path.parent / "cgroup.subtree_control").read_text().split()
            files = {"cgroup.type": "domain\n", "cgroup.controllers": " ".join(parent_ctrls) + "\n",
                     "cgroup.subtree_control": "", "cgroup.kill": "", "cgroup.events": "populated 0\n",
                     "cpu.stat": "usage_usec 0\nuser_usec 0\nsystem_usec 0\n"}
            for c in parent_ctrls:
                files.update(V2_FILES.get(c, {}))
        else:
            files = {"tasks": ""}
            for c in self._hierarchy(path).name.split(","):
                files.update(V1_FILES[c])
        for name, text in files.items():
            (path / name).write_text(text)

    def rmdir(self, path: Path) -> None:
        if not path.is_dir():
            raise FileNotFoundError(errno.ENOENT, "no such cgroup", str(path))
        if any(p.is_dir() for p in path.iterdir()):
            raise OSError(errno.EBUSY, "cgroup has children", str(path))
        if (path / "cgroup.procs").read_text().split():
            raise OSError(errno.EBUSY, "cgroup is populated", str(path))
        shutil.rmtree(path)

    def write(self, path: Path, value: str) -> None:
        self.writes.append((path, value))
        if not path.exists():
            raise PermissionError(errno.EACCES, "cgroupfs: no such interface file", str(path))
        cg = path.parent
        if path.name == "cgroup.procs":
            pid = value.strip()
            if self.version == "v2" and (cg / "cgroup.type").exists() \
                    and (cg / "cgroup.subtree_control").read_text().split():
                raise OSError(errno.EBUSY, "no internal processes", str(path))
            for other in self._hierarchy(cg).rglob("cgroup.procs"):
                pids = other.read_text().split()
                if pid in pids:
                    pids.remove(pid)
                    other.write_text("".join(p + "\n" for p in pids))
            path.write_text(path.read_text() + pid + "\n")
        elif path.name == "cgroup.subtree_control":
            have = set(path.read_text().split())
            for token in value.split():
                c = token[1:]
                if c not in (cg / "cgroup.controllers").read_text().split():
                    raise OSError(errno.ENOENT, f"{c} not available", str(path))
                if (cg / "cgroup.type").exists() and (cg / "cgroup.procs").read_text().split():
                    raise OSError(errno.EBUSY, "no internal processes", str(path))
                have = have | {c} if token[0] == "+" else have - {c}
            path.write_text(" ".join(sorted(have)) + "\n")
            for child in (p for p in cg.iterdir() if p.is_dir()):  # what the children now get
                (child / "cgroup.controllers").write_text(" ".join(sorted(have)) + "\n")
                for c in have:
                    for f, text in V2_FILES.get(c, {}).items():
                        if not (child / f).exists():
                            (child / f).write_text(text)
        elif path.name == "cgroup.kill":
            self.killed += [int(p) for p in (cg / "cgroup.procs").read_text().split()]
            (cg / "cgroup.procs").write_text("")
        else:
            path.write_text(value)

    def kill(self, pid: int, sig: int) -> None:
        self.killed.append(pid)
        for f in self.root.rglob("cgroup.procs"):
            pids = f.read_text().split()
            if str(pid) in pids:
                pids.remove(str(pid))
                f.write_text("".join(p + "\n" for p in pids))


def _install(monkeypatch: pytest.MonkeyPatch, kernel: FakeKernel) -> FakeKernel:
    monkeypatch.setattr(cgroupfs, "_mkdir", kernel.mkdir)
    monkeypatch.setattr(cgroupfs, "_rmdir", kernel.rmdir)
    monkeypatch.setattr(cgroupfs, "_write", kernel.write)
    monkeypatch.setattr(cgroupfs, "_kill", kernel.kill)
    return kernel


def proc_file(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "proc-self-cgroup"
    p.write_text(text)
    return p


@pytest.fixture
def v2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeKernel:
    k = _install(monkeypatch, FakeKernel(tmp_path / "cgroup", "v2"))
    k.v2_root()
    (k.root / "cgroup.subtree_control").write_text("cpu memory pids\n")
    k.make(k.root / "some")
    k.write(k.root / "some" / "cgroup.subtree_control", "+cpu +memory +pids")
    k.make(k.root / "some" / "agent", procs="100\n200\n")
    k.writes.clear()
    return k


HYBRID_PROC = """9:name=systemd:/
8:pids:/x
4:memory:/x
2:cpuacct:/x
1:cpu:/x
0::/
"""


@pytest.fixture
def v1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeKernel:
    k = _install(monkeypatch, FakeKernel(tmp_path / "cgroup", "v1"))
    k.root.mkdir()
    for name in ("cpu", "cpuacct", "memory", "pids"):
        k.v1_hierarchy(name)
        k.make(k.root / name / "x", procs="100\n")
    (k.root / "systemd").mkdir()  # a named hierarchy: not ours to use
    (k.root / "systemd" / "cgroup.procs").write_text("1\n")
    unified = k.root / "unified"  # hybrid: cgroup2 mounted without controllers
    unified.mkdir()
    (unified / "cgroup.controllers").write_text("\n")
    (unified / "cgroup.procs").write_text("1\n")
    k.writes.clear()
    return k


# --- detection ---------------------------------------------------------------------------


def test_detect_v2(v2: FakeKernel, tmp_path: Path) -> None:
    assert detect(v2.root, proc_file(tmp_path, "0::/some/agent\n")) is CgroupVersion.V2


def test_detect_hybrid_with_v1_controllers_is_v1(v1: FakeKernel, tmp_path: Path) -> None:
    assert detect(v1.root, proc_file(tmp_path, HYBRID_PROC)) is CgroupVersion.V1


def test_detect_hybrid_whose_unified_part_has_the_controllers_is_v2(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    (root / "unified").mkdir(parents=True)
    (root / "unified" / "cgroup.controllers").write_text("cpu memory pids\n")
    (root / "unified" / "cgroup.procs").write_text("")
    (root / "systemd").mkdir()
    (root / "systemd" / "cgroup.procs").write_text("")
    proc = proc_file(tmp_path, "1:name=systemd:/\n0::/\n")
    assert detect(root, proc) is CgroupVersion.V2


def test_detect_none(tmp_path: Path) -> None:
    (tmp_path / "cgroup").mkdir()
    assert detect(tmp_path / "cgroup", proc_file(tmp_path, "0::/\n")) is CgroupVersion.NONE
    assert detect(tmp_path / "nothing", tmp_path / "no-proc-file") is CgroupVersion.NONE


def test_parse_proc_cgroup_and_out_of_namespace_paths(v2: FakeKernel, tmp_path: Path) -> None:
    lines = parse_proc_cgroup("2:cpu,cpuacct:/a/b\n0::/c\n")
    assert lines[0].hierarchy == 2 and lines[0].controllers == ("cpu", "cpuacct")
    assert lines[0].path == "/a/b" and lines[1].controllers == ()
    with pytest.raises(CgroupError, match="bad"):
        parse_proc_cgroup("garbage\n")
    m = CgroupManager("r1", root=v2.root, proc_self_cgroup=proc_file(tmp_path, "0::/../../elsewhere\n"))
    with pytest.raises(CgroupError, match="outside the cgroup namespace"):
        m.agent_cgroup()


# --- v2 ------------------------------------------------------------------------------------


def test_v2_object_nested_under_the_agents_cgroup_with_limits(v2: FakeKernel, tmp_path: Path) -> None:
    m = CgroupManager("r1", root=v2.root, proc_self_cgroup=proc_file(tmp_path, "0::/some/agent\n"))
    assert m.version is CgroupVersion.V2
    cg = m.create("counter", Limits(cpu_quota=0.5, memory_bytes=64 * MiB, pids_max=32))
    agent = v2.root / "some" / "agent"
    assert isinstance(cg, CgroupV2)
    assert cg.path == agent / "moat-r1-objects" / "moat-r1-counter"
    assert (cg.path / "cpu.max").read_text() == "50000 100000"
    assert (cg.path / "memory.max").read_text() == str(64 * MiB)
    assert (cg.path / "memory.swap.max").read_text() == "0"
    assert (cg.path / "memory.oom.group").read_text() == "1"
    assert (cg.path / "pids.max").read_text() == "32"
    # no internal processes: the agent's cgroup was emptied into its leaf before delegation
    assert (agent / "cgroup.procs").read_text().split() == []
    assert sorted((agent / "moat-r1-agent" / "cgroup.procs").read_text().split()) == ["100", "200"]
    assert (agent / "cgroup.subtree_control").read_text().split() == ["cpu", "memory", "pids"]
    assert (agent / "moat-r1-objects" / "cgroup.subtree_control").read_text().split() == \
        ["cpu", "memory", "pids"]
    # the order matters: pids moved out before +controller was written
    written = [(p.relative_to(agent), v) for p, v in v2.writes]
    first_enable = next(i for i, (p, _) in enumerate(written) if p.name == "cgroup.subtree_control")
    assert all(p.name == "cgroup.procs" for p, _ in written[:first_enable])
    cg.add_process(4242)
    assert cg.procs() == [4242]


def test_v2_second_object_and_second_agent_reuse_the_layout(v2: FakeKernel, tmp_path: Path) -> None:
    m = CgroupManager("r1", root=v2.root, proc_self_cgroup=proc_file(tmp_path, "0::/some/agent\n"))
    m.create("a")
    # another agent of the same node, started later, finds itself in the agent leaf
    m2 = CgroupManager("r1", root=v2.root,
                       proc_self_cgroup=proc_file(tmp_path, "0::/some/agent/moat-r1-agent\n"))
    assert m2.agent_cgroup().dirs == [v2.root / "some" / "agent"]
    b = m2.create("b")
    assert b.dirs == [v2.root / "some" / "agent" / "moat-r1-objects" / "moat-r1-b"]
    with pytest.raises(CgroupError, match="exists"):
        m2.create("a")
    assert not (v2.root / "some" / "agent" / "moat-r1-agent" / "moat-r1-agent").exists()


def test_v2_root_cgroup_keeps_its_processes(v2: FakeKernel, tmp_path: Path) -> None:
    (v2.root / "cgroup.subtree_control").write_text("")
    m = CgroupManager(None, root=v2.root, proc_self_cgroup=proc_file(tmp_path, "0::/\n"))
    cg = m.create("obj", Limits(pids_max=5))
    assert cg.dirs == [v2.root / "moat-objects" / "moat-obj"]
    assert (v2.root / "cgroup.procs").read_text().split() == ["1"]
    assert not (v2.root / "moat-agent").exists()


def test_v2_enables_controllers_the_ancestors_did_not_delegate(v2: FakeKernel, tmp_path: Path) -> None:
    # like a systemd login session: memory and pids delegated, cpu not
    v2.make(v2.root / "user.slice")
    v2.write(v2.root / "user.slice" / "cgroup.subtree_control", "+memory +pids")
    v2.make(v2.root / "user.slice" / "session.scope", procs="300\n")
    assert "cpu" not in (v2.root / "user.slice" / "session.scope" / "cgroup.controllers").read_text()
    proc = proc_file(tmp_path, "0::/user.slice/session.scope\n")
    strict = CgroupManager("r1", root=v2.root, proc_self_cgroup=proc, enable_ancestors=False)
    with pytest.raises(CgroupError, match="'cpu'"):
        strict.create("o", Limits(cpu_quota=0.5))
    assert not (v2.root / "user.slice" / "session.scope" / "moat-r1-objects" / "moat-r1-o").exists()
    m = CgroupManager("r2", root=v2.root, proc_self_cgroup=proc)
    cg = m.create("o", Limits(cpu_quota=0.25))
    assert (cg.dirs[0] / "cpu.max").read_text() == "25000 100000"
    assert "cpu" in (v2.root / "user.slice" / "cgroup.subtree_control").read_text().split()


def test_v2_missing_controller_degrades_with_a_warning_when_unlimited(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    k = _install(monkeypatch, FakeKernel(tmp_path / "cgroup", "v2"))
    k.v2_root(controllers="cpu memory")  # a kernel without the pids controller
    k.make(k.root / "agent", procs="100\n")
    m = CgroupManager("r1", root=k.root, proc_self_cgroup=proc_file(tmp_path, "0::/agent\n"))
    with caplog.at_level(logging.WARNING, logger="agent.hosting.cgroups"):
        cg = m.create("o", Limits(cpu_quota=0.5, memory_bytes=8 * MiB))
    assert any("pids" in r.getMessage() for r in caplog.records)
    assert cg.usage()["pids"] is None
    with pytest.raises(CgroupError, match="'pids'"):
        m.create("p", Limits(pids_max=10))


def test_v2_counters_and_usage(v2: FakeKernel, tmp_path: Path) -> None:
    m = CgroupManager("r1", root=v2.root, proc_self_cgroup=proc_file(tmp_path, "0::/some/agent\n"))
    cg = m.create("o", Limits(memory_bytes=64 * MiB))
    assert cg.oom_kills() == 0 and not cg.oom_killed() and cg.pids_limit_hits() == 0
    d = cg.dirs[0]
    (d / "memory.events").write_text("low 0\nhigh 0\nmax 17\noom 1\noom_kill 1\noom_group_kill 1\n")
    (d / "pids.events").write_text("max 3\n")
    (d / "cpu.stat").write_text("usage_usec 1500000\nuser_usec 1000000\nsystem_usec 500000\n")
    (d / "memory.current").write_text("1234\n")
    (d / "memory.peak").write_text("5678\n")
    (d / "pids.current").write_text("2\n")
    assert cg.oom_kills() == 1 and cg.oom_killed() and cg.memory_limit_hits() == 17
    assert cg.pids_limit_hits() == 3
    assert cg.usage() == {"cpu_seconds": 1.5, "memory_bytes": 1234, "memory_peak_bytes": 5678,
                          "pids": 2}
    (d / "memory.peak").unlink()  # kernels before 5.19
    assert cg.usage()["memory_peak_bytes"] is None


def test_v2_remove_kills_only_its_own_processes(v2: FakeKernel, tmp_path: Path) -> None:
    m = CgroupManager("r1", root=v2.root, proc_self_cgroup=proc_file(tmp_path, "0::/some/agent\n"))
    a, b = m.create("a"), m.create("b")
    a.add_process(501)
    a.add_process(502)
    b.add_process(601)
    a.remove()
    assert sorted(v2.killed) == [501, 502] and not a.exists()
    assert any(p.name == "cgroup.kill" for p, _ in v2.writes)  # the one-shot kill was used
    assert b.procs() == [601]
    (b.dirs[0] / "cgroup.kill").unlink()  # a kernel before 5.14: kill pid by pid
    b.remove()
    assert 601 in v2.killed and not b.exists()


# --- v1 ------------------------------------------------------------------------------------


def test_v1_object_nested_in_every_hierarchy_with_limits(v1: FakeKernel, tmp_path: Path) -> None:
    m = CgroupManager("r1", root=v1.root, proc_self_cgroup=proc_file(tmp_path, HYBRID_PROC))
    assert m.version is CgroupVersion.V1
    cg = m.create("counter", Limits(cpu_quota=0.5, memory_bytes=64 * MiB, pids_max=32))
    assert isinstance(cg, CgroupV1)
    leaf = Path("x") / "moat-r1-objects" / "moat-r1-counter"
    assert cg.paths == {c: v1.root / c / leaf for c in ("pids", "memory", "cpuacct", "cpu")}
    assert (v1.root / "cpu" / leaf / "cpu.cfs_period_us").read_text() == "100000"
    assert (v1.root / "cpu" / leaf / "cpu.cfs_quota_us").read_text() == "50000"
    assert (v1.root / "memory" / leaf / "memory.limit_in_bytes").read_text() == str(64 * MiB)
    assert (v1.root / "pids" / leaf / "pids.max").read_text() == "32"
    assert not (v1.root / "systemd" / "x").exists() and not (v1.root / "unified" / "x").exists()
    cg.add_process(777)
    for c in ("cpu", "cpuacct", "memory", "pids"):
        assert (v1.root / c / leaf / "cgroup.procs").read_text().split() == ["777"]
    # v1 has no internal-process rule: the agent stays where it is
    assert (v1.root / "cpu" / "x" / "cgroup.procs").read_text().split() == ["100"]


def test_v1_co_mounted_cpu_cpuacct(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    k = _install(monkeypatch, FakeKernel(tmp_path / "cgroup", "v1"))
    k.root.mkdir()
    k.v1_hierarchy("cpu,cpuacct")
    os.symlink("cpu,cpuacct", k.root / "cpu")
    os.symlink("cpu,cpuacct", k.root / "cpuacct")
    k.v1_hierarchy("memory")
    proc = proc_file(tmp_path, "3:cpu,cpuacct:/\n2:memory:/\n")
    m = CgroupManager("r1", root=k.root, proc_self_cgroup=proc)
    cg = m.create("o", Limits(cpu_quota=1.5))
    d = k.root / "cpu,cpuacct" / "moat-r1-objects" / "moat-r1-o"
    assert cg.paths["cpu"] == cg.paths["cpuacct"] == d
    assert len(cg.dirs) == 2
    assert (d / "cpu.cfs_quota_us").read_text() == "150000"
    (d / "cpuacct.usage").write_text("2500000000\n")
    assert cg.usage()["cpu_seconds"] == 2.5
    with pytest.raises(CgroupError, match="'pids'"):
        m.create("p", Limits(pids_max=4))
    cg.remove()
    assert not d.exists()


def test_v1_counters_and_usage(v1: FakeKernel, tmp_path: Path) -> None:
    m = CgroupManager("r1", root=v1.root, proc_self_cgroup=proc_file(tmp_path, HYBRID_PROC))
    cg = m.create("o", Limits(memory_bytes=64 * MiB, pids_max=8))
    assert cg.oom_kills() == 0 and not cg.oom_killed()
    mem, pids = cg.paths["memory"], cg.paths["pids"]
    (mem / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    (mem / "memory.failcnt").write_text("40\n")
    (mem / "memory.usage_in_bytes").write_text("1000\n")
    (mem / "memory.max_usage_in_bytes").write_text("67108864\n")
    (pids / "pids.events").write_text("max 5\n")
    (pids / "pids.current").write_text("8\n")
    (cg.paths["cpuacct"] / "cpuacct.usage").write_text("750000000\n")
    assert cg.oom_kills() == 2 and cg.oom_killed() and cg.memory_limit_hits() == 40
    assert cg.pids_limit_hits() == 5
    assert cg.usage() == {"cpu_seconds": 0.75, "memory_bytes": 1000,
                          "memory_peak_bytes": 64 * MiB, "pids": 8}
    # kernels before 4.13 have no oom_kill line: unknown, not zero
    (mem / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\n")
    assert cg.oom_kills() is None


def test_v1_missing_pids_hierarchy(v1: FakeKernel, tmp_path: Path,
                                   caplog: pytest.LogCaptureFixture) -> None:
    proc = proc_file(tmp_path, "4:memory:/x\n2:cpuacct:/x\n1:cpu:/x\n0::/\n")
    m = CgroupManager("r1", root=v1.root, proc_self_cgroup=proc)
    with pytest.raises(CgroupError, match="'pids'"):
        m.create("a", Limits(pids_max=10))
    with caplog.at_level(logging.WARNING, logger="agent.hosting.cgroups"):
        cg = m.create("b", Limits(cpu_quota=0.5))
    assert "pids" not in cg.paths and any("pids" in r.getMessage() for r in caplog.records)


# --- names, finding and cleaning a run -------------------------------------------------------


def test_names_carry_the_run_id_and_bad_names_are_refused(v2: FakeKernel, tmp_path: Path) -> None:
    m = CgroupManager("r1", root=v2.root, proc_self_cgroup=proc_file(tmp_path, "0::/some/agent\n"))
    for bad in ("../etc", "a/b", "", "x" * 200, "sp ace"):
        with pytest.raises(CgroupError, match="bad cgroup name"):
            m.create(bad)
    with pytest.raises(CgroupError, match="bad cgroup name"):
        CgroupManager("../r", root=v2.root)
    owned = CgroupManager("r1", root=v2.root, owner="r18b",
                          proc_self_cgroup=proc_file(tmp_path, "0::/some/agent\n"))
    assert owned.create("o").dirs[0].parent.name == "moat-r1-r18b-objects"


def test_limits_are_validated() -> None:
    with pytest.raises(CgroupError):
        Limits(cpu_quota=0.001)
    with pytest.raises(CgroupError):
        Limits(memory_bytes=-1)
    with pytest.raises(CgroupError):
        Limits(pids_max=0)
    assert Limits(cpu_quota=0.2).cpu_quota_us() == 20000
    assert Limits().is_empty()


def test_find_and_clean_a_v2_run(v2: FakeKernel, tmp_path: Path) -> None:
    proc = proc_file(tmp_path, "0::/some/agent\n")
    r1 = CgroupManager("r1", root=v2.root, proc_self_cgroup=proc)
    a, b = r1.create("a"), r1.create("b")
    a.add_process(900)
    r2 = CgroupManager("r2", root=v2.root, proc_self_cgroup=proc)
    c = r2.create("c")
    agent = v2.root / "some" / "agent"
    found = find_run_cgroups("r1", v2.root)
    assert set(found) == {a.dirs[0], b.dirs[0], agent / "moat-r1-objects", agent / "moat-r1-agent"}
    assert found.index(a.dirs[0]) < found.index(agent / "moat-r1-objects")  # leaves first
    assert c.dirs[0] not in found
    removed, kept = clean_run("r1", v2.root)
    assert kept == [agent / "moat-r1-agent"]  # the agent leaf holds the user's processes
    assert 900 in v2.killed and 100 not in v2.killed and 200 not in v2.killed
    assert not (agent / "moat-r1-objects").exists() and c.exists()
    assert set(removed) == {a.dirs[0], b.dirs[0], agent / "moat-r1-objects"}
    with pytest.raises(CgroupError):
        find_run_cgroups("", v2.root)


def test_find_and_clean_a_v1_run(v1: FakeKernel, tmp_path: Path) -> None:
    m = CgroupManager("r1", root=v1.root, proc_self_cgroup=proc_file(tmp_path, HYBRID_PROC))
    cg = m.create("a", Limits(pids_max=4))
    cg.add_process(901)
    found = find_run_cgroups("r1", v1.root)
    assert len(found) == 8  # objects node + leaf in each of the 4 hierarchies
    assert all(len(found[i].parts) >= len(found[i + 1].parts) for i in range(len(found) - 1))
    assert remove_tree(v1.root / "pids" / "x" / "moat-r1-objects") == []
    assert 901 in v1.killed
    removed, kept = clean_run("r1", v1.root)
    assert kept == [] and find_run_cgroups("r1", v1.root) == []
    assert (v1.root / "memory" / "x").is_dir()  # the agent's own cgroup is never touched


def test_manager_remove_objects(v2: FakeKernel, tmp_path: Path) -> None:
    m = CgroupManager("r1", root=v2.root, proc_self_cgroup=proc_file(tmp_path, "0::/some/agent\n"))
    m.create("a").add_process(5)
    assert m.remove_objects() == []
    assert not (v2.root / "some" / "agent" / "moat-r1-objects").exists()


def test_no_cgroups_at_all(tmp_path: Path) -> None:
    (tmp_path / "cgroup").mkdir()
    m = CgroupManager("r1", root=tmp_path / "cgroup", proc_self_cgroup=proc_file(tmp_path, "0::/\n"))
    assert m.version is CgroupVersion.NONE
    with pytest.raises(CgroupError, match="no usable cgroup"):
        m.create("a")


def test_agent_leaf_names_are_reserved(v2: FakeKernel, tmp_path: Path) -> None:
    m = CgroupManager("r1", root=v2.root, proc_self_cgroup=proc_file(tmp_path, "0::/some/agent\n"))
    with pytest.raises(CgroupError, match="reserved"):
        m.create("agent")


def test_moat_clean_removes_a_runs_cgroups_by_name(tmp_path, monkeypatch) -> None:
    """topologies.run.clean_run (what `moat clean` calls) also removes the run's cgroups."""
    import agent.hosting.cgroups as cg
    from topologies import run as runmod

    calls = []
    monkeypatch.setattr(cg, "clean_run", lambda run_id, *a, **k: (calls.append(run_id), ([tmp_path / f"moat-{run_id}-objects"], []))[1])
    monkeypatch.setattr(runmod, "processes_of_run", lambda run_id: [])
    removed = runmod.clean_run("r1", tmp_path)
    assert calls == ["r1"]
    assert any(line.startswith("cgroup ") and "moat-r1-objects" in line for line in removed)
