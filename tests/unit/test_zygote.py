"""The agent zygote (issue 15, item 1): requests are validated, memory is read from
smaps_rollup, and a supervisor forked from the zygote forks its agent and reports how it
ended, through the same chain a router uses (in this process's own namespaces)."""

from __future__ import annotations

import os
import sys

import pytest

from agent import supervisor
from agent.zygote import (ForkedDaemon, Zygote, ZygoteError, check_request, current_umask,
                          is_agent_argv, memory_kib, parse_smaps_rollup, start_mode)


def _request(**over):
    req = {"argv": [sys.executable, "-m", "agent.supervisor", "--status", "/x", "--", "true"],
           "netns_pid": 1, "env": {"PATH": "/bin"}, "cwd": "/", "umask": 0o022, "node": "r1a"}
    req.update(over)
    return req


def test_a_valid_request_passes() -> None:
    assert check_request(_request())["node"] == "r1a"
    mounts = [["tmpfs", "tmpfs", "/sys/fs/cgroup", "mode=755"],
              ["cgroup", "cgroup", "/sys/fs/cgroup/cpu,cpuacct", "cpu,cpuacct"]]
    assert check_request(_request(mounts=mounts))["mounts"] == mounts


def test_the_hosts_cgroup_mounts_as_data_and_as_commands() -> None:
    from topologies.nodes import cgroup_mount_commands, cgroup_mounts

    text = ("cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,nosuid,nodev,noexec,relatime,cpu,cpuacct 0 0\n"
            "tmpfs /sys/fs/cgroup tmpfs ro,nosuid,nodev,noexec,mode=755 0 0\n"
            "proc /proc proc rw 0 0\n")
    assert cgroup_mounts(text) == [("tmpfs", "tmpfs", "/sys/fs/cgroup", "mode=755"),
                                   ("cgroup", "cgroup", "/sys/fs/cgroup/cpu,cpuacct", "cpu,cpuacct")]
    assert cgroup_mount_commands(text)[1] == \
        "mkdir -p /sys/fs/cgroup/cpu,cpuacct && mount -t cgroup -o cpu,cpuacct cgroup /sys/fs/cgroup/cpu,cpuacct"


@pytest.mark.parametrize("bad", [
    {"mounts": [["ext4", "/dev/sda1", "/sys/fs/cgroup/x", ""]]},
    {"mounts": [["cgroup", "cgroup", "/etc", "cpu"]]},
    {"mounts": [["cgroup", "cgroup", "/sys/fs/cgroup/../../etc", "cpu"]]},
    {"mounts": [["cgroup", "cgroup", "/sys/fs/cgroup/cpu"]]}, {"mounts": "cgroup"},
    {"argv": ["/bin/sh", "-c", "id", "x"]},
    {"argv": [sys.executable, "-m", "agent", "--config", "x"]},
    {"netns_pid": 0}, {"netns_pid": True}, {"netns_pid": "1"},
    {"env": {"A=B": "x"}}, {"env": {"A": 1}}, {"env": []},
    {"cwd": "relative"}, {"umask": 0o1000}, {"umask": None},
    {"node": ""}, {"node": "x" * 40}, {"node": "a\nb"},
])
def test_bad_requests_are_refused_with_a_reason(bad) -> None:
    with pytest.raises(ValueError):
        check_request(_request(**bad))
    with pytest.raises(ValueError):
        check_request(["not", "a", "dict"])


def test_start_mode_reads_the_environment() -> None:
    assert start_mode({}) == "fork"
    assert start_mode({"MOAT_AGENT_START": "exec"}) == "exec"
    with pytest.raises(ZygoteError, match="fork, exec"):
        start_mode({"MOAT_AGENT_START": "spawn"})


def test_only_this_pythons_agent_runs_in_process() -> None:
    assert is_agent_argv([sys.executable, "-m", "agent", "--config", "c.json"])
    assert not is_agent_argv(["/usr/bin/python3.9", "-m", "agent", "--config", "c.json"])
    assert not is_agent_argv([sys.executable, "-m", "agent.supervisor"])


def test_smaps_rollup_parsing_and_reading() -> None:
    text = "00400000-7ffd ---p 00000000 00:00 0  [rollup]\nRss:  82372 kB\nPss:  15884 kB\n"
    assert parse_smaps_rollup(text) == {"rss": 82372, "pss": 15884}
    with pytest.raises(ValueError):
        parse_smaps_rollup("Rss: 1 kB\n")
    mine = memory_kib(os.getpid())
    assert mine is not None and 0 < mine["pss"] <= mine["rss"]
    assert memory_kib(2 ** 22 + 12345) is None


def test_current_umask_is_read_without_changing_it() -> None:
    old = os.umask(0o027)
    try:
        assert current_umask() == 0o027
        assert current_umask() == 0o027
    finally:
        os.umask(old)


def test_a_forked_child_reports_its_status() -> None:
    pid = os.fork()
    if pid == 0:
        os._exit(3)
    child = supervisor.ForkedChild(pid)
    import time
    deadline = time.monotonic() + 5
    while child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert child.returncode == 3


@pytest.mark.skipif(os.geteuid() != 0, reason="setns needs root")
def test_a_supervisor_forked_from_the_zygote_forks_its_agent_and_reports(tmp_path) -> None:
    """The whole chain, in this process's namespaces: the zygote forks a supervisor, which
    forks the agent; the agent refuses a configuration that is not there (exit 2) before it
    ever answered, so the supervisor ends with 2, and the zygote says so."""
    zygote = Zygote(dict(os.environ, MOAT_RUN_ID="unit-zygote"), log_path=tmp_path / "zygote.out")
    zygote.start()
    log_path = tmp_path / "r1a.out"
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        argv = supervisor_argv(tmp_path)
        daemon = zygote.spawn("r1a", os.getpid(), argv, fd, dict(os.environ), str(tmp_path), 0o077)
    finally:
        os.close(fd)
    try:
        assert isinstance(daemon, ForkedDaemon) and daemon.pid != zygote.pid
        assert daemon.wait(timeout=30) == 2
    finally:
        zygote.stop()
    text = log_path.read_text()
    assert "agent: " in text and "before it ever answered" in text, text
    status = supervisor.read_status(tmp_path / "r1a.supervisor.json")
    assert status is not None and status["state"] == "failed"
    assert status["last_exit"]["returncode"] == 2
    assert zygote.import_s is not None and zygote.import_s > 0


def supervisor_argv(run: "os.PathLike[str]") -> list[str]:
    return [sys.executable, "-m", "agent.supervisor", "--status", f"{run}/r1a.supervisor.json",
            "--socket", f"{run}/r1a.sock", "--", sys.executable, "-m", "agent", "--config",
            f"{run}/missing.json"]


@pytest.mark.skipif(os.geteuid() != 0, reason="setns needs root")
def test_the_zygote_refuses_a_bad_request_and_serves_the_next(tmp_path) -> None:
    zygote = Zygote(dict(os.environ), log_path=tmp_path / "zygote.out")
    zygote.start()
    fd = os.open(os.devnull, os.O_WRONLY)
    try:
        with pytest.raises(ZygoteError, match="argv must be"):
            zygote.spawn("r1a", os.getpid(), ["/bin/sh", "-c", "true", "x"], fd, {}, None, 0o022)
        daemon = zygote.spawn("r1a", os.getpid(), supervisor_argv(tmp_path), fd, dict(os.environ),
                              None, 0o022)
        assert daemon.wait(timeout=30) == 2
    finally:
        os.close(fd)
        zygote.stop()


def test_a_router_whose_zygote_is_gone_execs_its_agent(monkeypatch) -> None:
    """MoatRouter forks its supervised agent from the zygote; when the zygote cannot (gone,
    refusing), the agent is exec'd as before, not lost."""
    from topologies.nodes import ManagedDaemonMixin, MoatRouter

    calls = []

    class _Gone:
        def spawn(self, *args, **kw):
            calls.append("spawn")
            raise ZygoteError("the agent zygote did not answer")

    monkeypatch.setattr(ManagedDaemonMixin, "_launch",
                        lambda self, argv, logf, env, cwd, extra: calls.append("exec") or "popen")
    # The zygote's child would have mounted the node's cgroups: the shell does it instead.
    monkeypatch.setattr("topologies.nodes.restore_cgroup_mounts", lambda node: calls.append("mounts"))
    router = object.__new__(MoatRouter)
    router.name, router.pid, router.zygote = "r1a", 1, _Gone()
    argv = [sys.executable, "-m", "agent.supervisor", "--status", "s", "--", "x"]
    with open(os.devnull, "wb") as logf:
        assert router._launch(argv, logf, {}, None, {}) == "popen"
        assert calls == ["spawn", "mounts", "exec"]
        calls.clear()
        assert router._launch(["sleep", "1"], logf, {}, None, {}) == "popen"  # not an agent
        assert calls == ["exec"]


def test_the_zygote_log_is_private_from_its_creation_and_not_followed(tmp_path) -> None:
    """Its output lands in the run directory, which objects' users must not read (a
    traceback may carry configuration); a planted link is not followed."""
    from agent.zygote import _private_log

    old = os.umask(0)
    try:
        with _private_log(tmp_path / "zygote.out") as out:
            out.write(b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "zygote.out").stat().st_mode & 0o777 == 0o600
    (tmp_path / "elsewhere").write_bytes(b"")
    (tmp_path / "link.out").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OSError):
        _private_log(tmp_path / "link.out")
