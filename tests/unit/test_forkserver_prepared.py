"""Prepared launchers (agent.hosting.forkserver.PreparedLauncher, issue 14) without cgroups,
uids or namespaces: which specs one may start, how the agent reads that one is ready, how its
relay waits for the start's message (and ends itself on anything else), and that closing one
ends its process. The real ones are in tests/netns/test_forkserver_isolation.py."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from agent.core.wait import wait_until
from agent.hosting.forkserver import ForkServerError, PreparedLauncher, _await_ready, fits

REPO = Path(__file__).resolve().parents[2]
SLOT = {"cgroup_procs": ["/cg/cpu/x/cgroup.procs"], "isolate_pids": True, "isolate_fs": True}


def test_a_prepared_launcher_starts_only_specs_of_its_cgroup_with_both_isolations() -> None:
    spec = {"cgroup_procs": ["/cg/cpu/x/cgroup.procs"], "isolate_pids": True, "isolate_fs": True}
    assert fits(SLOT, spec)
    assert not fits(SLOT, dict(spec, cgroup_procs=["/cg/cpu/y/cgroup.procs"]))
    assert not fits(SLOT, dict(spec, isolate_fs=False))
    assert not fits(SLOT, dict(spec, isolate_pids=False))


def status_pipe(*lines: bytes) -> int:
    r, w = os.pipe()
    os.write(w, b"".join(lines))
    os.close(w)
    return r


def test_ready_needs_the_relays_pid_and_pid_1s_ready() -> None:
    r = status_pipe(b'{"pid": 4321}\n', b'{"ready": true}\n')
    try:
        assert _await_ready(r, 5) == 4321
    finally:
        os.close(r)
    for lines, match in (((b'{"pid": 4321}\n',), "before it was ready"),
                         ((b'{"ready": true}\n',), "before it was ready"),
                         ((b'{"pid": 1}\n', b'{"stage": "mount namespace", "error": "EPERM"}\n'),
                          "mount namespace")):
        r = status_pipe(*lines)
        try:
            with pytest.raises(ForkServerError, match=match):
                _await_ready(r, 5)
        finally:
            os.close(r)


def test_ready_times_out_on_a_launcher_that_never_answers() -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(ForkServerError, match="not ready within"):
            _await_ready(r, 0.1)
    finally:
        os.close(r)
        os.close(w)


RELAY = """
import json, os, sys
from agent.hosting.sandbox_exec import await_start
child, sock, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
listen, keep, watch = await_start(child, sock, None)
names = {}
for key, fd in (("listen", listen), ("keep", keep)):
    names[key] = os.read(fd, 100).decode() if fd is not None else None
os.write(out, json.dumps(names).encode())
"""


def relay_waiting(tmp_path) -> tuple[subprocess.Popen, socket.socket, subprocess.Popen, int]:
    """A process in :func:`await_start` for a child (a sleep) and its start socket."""
    child = subprocess.Popen(["sleep", "30"])
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    out_r, out_w = os.pipe()
    relay = subprocess.Popen([sys.executable, "-c", RELAY, str(child.pid), str(theirs.fileno()),
                              str(out_w)], pass_fds=(theirs.fileno(), out_w),
                             cwd=REPO)
    theirs.close()
    os.close(out_w)
    return relay, mine, child, out_r


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="needs pidfd_open")
def test_the_relay_takes_its_fds_from_the_start_message(tmp_path) -> None:
    relay, sock, child, out = relay_waiting(tmp_path)
    try:
        a_r, a_w = os.pipe()
        b_r, b_w = os.pipe()
        os.write(a_w, b"listen")
        os.write(b_w, b"keep")
        socket.send_fds(sock, [json.dumps({"outlive": True, "fds": 2}).encode()], [a_r, b_r])
        assert relay.wait(30) == 0
        assert json.loads(os.read(out, 1000)) == {"listen": "listen", "keep": "keep"}
    finally:
        child.kill()
        child.wait()
        os.close(out)
        sock.close()


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="needs pidfd_open")
@pytest.mark.parametrize("message", [b"not json", b'{"outlive": "yes", "fds": 0}',
                                     b'{"outlive": true, "fds": 0}', b'{"outlive": false, "fds": 2}',
                                     None], ids=["garbage", "bad-flag", "outlive-no-fds",
                                                 "fds-missing", "closed"])
def test_the_relay_ends_itself_on_anything_but_its_start_message(tmp_path, message) -> None:
    """Garbage, a message whose fds do not match, or the socket closed (the slot let go):
    the relay kills itself (and the child waiting in its namespace dies with it)."""
    relay, sock, child, out = relay_waiting(tmp_path)
    try:
        if message is None:
            sock.close()
        else:
            sock.send(message)
        assert relay.wait(30) == -signal.SIGKILL
    finally:
        child.kill()
        child.wait()
        os.close(out)
        sock.close()


def launcher_of(proc: subprocess.Popen) -> tuple[PreparedLauncher, int, socket.socket]:
    """A prepared launcher for ``proc``, with the ends it does not keep: the report pipe's
    write end and PID 1's end of the object socket."""
    pidfd = os.pidfd_open(proc.pid)
    report_r, report_w = os.pipe()
    relay, _ = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    obj, obj_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    return PreparedLauncher(proc.pid, pidfd, report_r, relay, obj, SLOT), report_w, obj_theirs


def test_closing_a_prepared_launcher_ends_its_process() -> None:
    proc = subprocess.Popen(["sleep", "30"])
    launcher, report_w, obj_theirs = launcher_of(proc)
    try:
        assert launcher.alive()
        obj_theirs.close()  # PID 1 gone: its socket reads end of stream
        assert not launcher.alive()
        launcher.close()
        launcher.close()  # idempotent
        assert proc.wait(10) == -signal.SIGKILL
        assert launcher.pidfd is None and launcher.report is None
    finally:
        os.close(report_w)
        proc.kill()
        proc.wait()


def test_a_launcher_whose_process_exited_is_not_alive() -> None:
    proc = subprocess.Popen(["true"])
    launcher, report_w, _obj_theirs = launcher_of(proc)
    try:
        proc.wait(10)
        wait_until(lambda: not launcher.alive(), 5, what="the launcher seen gone")
    finally:
        launcher.close()
        os.close(report_w)


def test_a_starts_trace_is_read_from_the_status_pipe_and_split_into_steps() -> None:
    """The launcher's stamps come as one status line among the others (``_read_report``
    ignores it); the benchmark orders every stamp in time and charges each step the time
    since the stamp before."""
    from agent.hosting.sandbox import _read_report, read_trace
    from experiments.bench_objstart import step_times

    report = (b'{"pid": 77}\n{"trace": [["received", 10.001], ["user", 10.004], "bad", '
              b'["x"], [1, 2]]}\nnot json\n{"trace": [["in process", 10.005]]}\n')
    assert _read_report(report)[0] == 77
    stamps = read_trace(report)
    assert stamps == [("received", 10.001), ("user", 10.004), ("in process", 10.005)]
    trace = [("begin", 10.0), ("started", 10.006), *stamps]  # the agent's, out of order
    steps = step_times(trace)
    assert steps == pytest.approx({"step:received": 1.0, "step:user": 3.0,
                                   "step:in process": 1.0, "step:started": 1.0})
