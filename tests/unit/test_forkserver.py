"""The fork server's parts that need no cgroup and no object uid: which argv runs in-process,
where the forked child puts the agent's fds, how the agent reads a forked launcher's status,
and a server that answers a malformed request with an error and serves on."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from agent.hosting import forkserver
from agent.hosting.forkserver import ForkedProcess, ForkServer, ForkServerError, in_process
from agent.hosting.sandbox import launcher_env
from experiments.bench_objstart import percentile, summarise

REPO = Path(__file__).resolve().parents[2]
RUNNER = [sys.executable, "-m", "agent.hosting.runner", "--spec", "x:Y"]


def test_only_the_runtime_under_this_interpreter_runs_in_process(tmp_path: Path) -> None:
    env = {"PYTHONPATH": str(REPO)}
    assert in_process(RUNNER, env, {str(REPO)})
    assert not in_process(["/usr/bin/python3", *RUNNER[1:]], env, {str(REPO)})
    assert not in_process([sys.executable, "-m", "agent.hosting.other"], env, {str(REPO)})
    assert not in_process([sys.executable, "-c", "pass"], env, {str(REPO)})


def test_service_code_that_shadows_a_loaded_module_is_not_run_in_process(tmp_path: Path) -> None:
    """``packets`` (a package the runtime imported) in the service's own code directory: its
    interpreter would import that one, so it must be exec'd; an unrelated module is fine."""
    import packets

    assert "packets" in sys.modules and packets  # loaded here, as in the fork server

    own = {str(REPO)}
    service = tmp_path / "svc"
    service.mkdir()
    (service / "my_service.py").write_text("")
    env = {"PYTHONPATH": f"{service}:{REPO}"}
    assert in_process(RUNNER, env, own)
    (service / "packets").mkdir()
    assert not in_process(RUNNER, env, own)
    (service / "packets").rmdir()
    (service / "packets.py").write_text("")
    assert not in_process(RUNNER, env, own)


PLACE = """
import json, os, sys
from agent.hosting.forkserver import _place_fds
fds = {name: os.open("/dev/null", os.O_RDONLY) for name in
       ("stdin", "stdout", "stderr", "status", "report", "agent")}
a, b = os.pipe()   # the object's channel, to be at fd 20 (its argv says so)
fds["pass"] = [b]
out = os.dup(1)
placed = _place_fds(fds, [20])
os.write(20, b"through the passed fd")
seen = {}
for name in os.listdir("/proc/self/fd"):
    try:
        seen[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    except OSError:
        pass
info = {"placed": placed, "read": os.read(a, 100).decode(), "high": min(placed.values()),
        "inheritable": [os.get_inheritable(fd) for fd in (0, 1, 2)],
        "own_cloexec": [os.get_inheritable(fd) for fd in placed.values()]}
os.write(out, json.dumps(info).encode())
"""


def test_the_child_puts_stdio_and_passed_fds_where_the_exec_path_would() -> None:
    proc = subprocess.run([sys.executable, "-c", PLACE], capture_output=True, cwd=REPO,
                          timeout=30, check=True)
    info = json.loads(proc.stdout)
    assert info["read"] == "through the passed fd"
    assert info["high"] > 20  # the launch's own fds sit above every fd the object is given
    assert sorted(info["placed"]) == ["agent", "report", "status"]
    assert info["inheritable"] == [True, True, True] and not any(info["own_cloexec"])


def _exited_child() -> tuple[int, int]:
    proc = subprocess.Popen(["true"])
    pidfd = os.pidfd_open(proc.pid)
    proc.wait()
    return proc.pid, pidfd


@pytest.mark.parametrize("lines, code", [
    ([b'{"exit": 3}\n'], 3),                       # the relay's word
    ([b"garbage\n", b'{"exit": -11}\n'], -11),     # a bad line is skipped
    ([b'{"exit": true}\n'], -9),                   # not a status: as if killed unheard
    ([], -9),                                      # killed without a word
])
def test_a_forked_launchers_status_comes_from_its_report(lines: list[bytes], code: int) -> None:
    async def main() -> int:
        pid, pidfd = _exited_child()
        r, w = os.pipe()
        for line in lines:
            os.write(w, line)
        os.close(w)
        proc = ForkedProcess(pid, pidfd, r, None, None)
        await proc._open()
        return await asyncio.wait_for(proc.wait(), 10)

    assert asyncio.run(main()) == code


def test_the_server_refuses_a_malformed_request_and_serves_on() -> None:
    server = ForkServer(launcher_env())
    try:
        pid = server.ensure_started()
        with pytest.raises(ForkServerError, match="not a spawn request|bad index|pass"):
            server.spawn({"argv": ["x"]}, {"stdin": 0, "stdout": 1, "stderr": 2, "pass": [5, 6]})
        # A raw request that is not JSON at all, then the same server still answers.
        with server._lock:
            socket.send_fds(server._sock, [b"{nope"], [])
            reply = json.loads(server._sock.recv(65536))
        assert "error" in reply
        with pytest.raises(ForkServerError, match="fd status|bad index"):
            server.spawn({"argv": ["x"], "pass_fds": []}, {"stdin": 0, "stdout": 1, "stderr": 2})
        assert server.pid == pid and server.starts == 1
    finally:
        server.stop()
    assert server.pid is None


def test_the_server_ends_when_the_agent_closes_its_socket() -> None:
    server = ForkServer(launcher_env())
    server.ensure_started()
    proc = server._proc
    server.stop()
    assert proc is not None and proc.returncode == 0


def test_the_bench_summary_gives_medians_p90_and_the_ratio() -> None:
    assert percentile([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 0.9) == pytest.approx(9.1)
    rows = {"fork": [{"start_ms": v, "spawn_ms": v / 2, "answer_ms": v / 2} for v in (4, 5, 6)],
            "exec": [{"start_ms": v, "spawn_ms": v / 4, "answer_ms": 3 * v / 4} for v in (40, 50, 60)]}
    s = summarise(rows)
    assert s["fork"]["start_ms"]["median"] == 5 and s["exec"]["start_ms"]["median"] == 50
    assert s["ratio_exec_over_fork"]["start_ms"]["median"] == 10.0
    assert s["ratio_exec_over_fork"]["answer_ms"]["median"] == 15.0


def test_the_default_server_belongs_to_this_process(monkeypatch) -> None:
    # A fresh process's view: a namespace test on the same pytest worker may have started
    # the process-wide server already (the netns tests share workers with these).
    monkeypatch.setattr(forkserver, "_server", None)
    one = forkserver.default_server(launcher_env())
    assert forkserver.default_server(launcher_env()) is one and one.pid is None  # not started


def test_joining_cgroups_writes_0_to_a_v1_tasks_file_and_the_pid_to_v2_procs(tmp_path) -> None:
    """A single-threaded launcher joins a v1 hierarchy through ``tasks`` ("0": itself, with
    no wait for the global threadgroup lock's grace period); a v2 group (no ``tasks``) and
    any group named by a file other than cgroup.procs get the pid."""
    import os as _os

    from agent.hosting.sandbox_exec import join_cgroups

    v1, v2 = tmp_path / "v1", tmp_path / "v2"
    v1.mkdir(), v2.mkdir()
    for path in (v1 / "tasks", v1 / "cgroup.procs", v2 / "cgroup.procs"):
        path.write_text("")
    join_cgroups([str(v1 / "cgroup.procs"), str(v2 / "cgroup.procs")], threads=1)
    assert (v1 / "tasks").read_text() == "0" and (v1 / "cgroup.procs").read_text() == ""
    assert (v2 / "cgroup.procs").read_text() == str(_os.getpid())
    (v1 / "tasks").write_text("")
    join_cgroups([str(v1 / "cgroup.procs")], threads=2)  # "0" in tasks would move one thread
    assert (v1 / "tasks").read_text() == "" and (v1 / "cgroup.procs").read_text() == str(_os.getpid())
