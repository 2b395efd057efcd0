"""The object fork server (issue 14, item 1) on this machine's real cgroups (root).

A forked object runs the runtime in the process the fork server forked (no exec), so these
tests check what that could change and the exec path cannot: it cannot read the fork server's
memory nor trace or signal it, holds exactly the fds an exec'd object holds (none of the
server's), no capability, and outlives the fork server; the server comes back after it died;
an object whose code would shadow a module the server imported is exec'd instead.
The probe is an object class the runtime loads from a code directory (as a VM's service),
which looks at its own process in ``__init__`` and answers with it as its state.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
from pathlib import Path

import pytest

from agent.core.wait import async_wait_until
from agent.hosting import forkserver
from agent.hosting.cgroups import CgroupManager, CgroupVersion, clean_run, detect
from agent.hosting.object_uids import default_pool
from agent.hosting.sandbox import (ObjectSandbox, SandboxSpec, launcher_env, make_workdir,
                                   minimal_env, proc_start_time)

REPO = Path(__file__).resolve().parents[2]

PROBE = '''
import ctypes, errno, os, sys
from agent.sdk import MobileObject

libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]


def attempt(fn):
    try:
        fn()
        return 0
    except OSError as exc:
        return exc.errno


def ptrace_attach(pid):
    if libc.ptrace(16, pid, None, None) != 0:  # PTRACE_ATTACH
        raise OSError(ctypes.get_errno(), "ptrace")
    libc.ptrace(17, pid, None, None)  # PTRACE_DETACH (never reached: it must fail)


def read_mem(pid):
    with open(f"/proc/{pid}/mem", "rb") as f:
        f.read(1)


import re


class Probe(MobileObject):
    def __init__(self):
        server = int(os.environ["PROBE_SERVER"])
        status = dict(line.split(":\\t", 1) for line in open("/proc/self/status").read().splitlines()
                      if ":\\t" in line)
        fds = {}
        for name in os.listdir("/proc/self/fd"):
            try:
                fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
            except OSError:
                pass  # the directory listdir read
        self.state = {
            "forked": b"agent.hosting.forkserver" in open("/proc/self/cmdline", "rb").read(),
            "uid": os.getuid(),
            "mem": attempt(lambda: read_mem(server)),
            "ptrace": attempt(lambda: ptrace_attach(server)),
            "signal": attempt(lambda: os.kill(server, 0)),
            "server fds": attempt(lambda: os.listdir(f"/proc/{server}/fd")),
            "fds": sorted([fd, re.sub(r"\\d+", "N", target)] for fd, target in fds.items()),
            "inodes": sorted(int(m) for t in fds.values() for m in re.findall(r"\\[(\\d+)\\]", t)),
            "CapEff": int(status["CapEff"], 16), "CapPrm": int(status["CapPrm"], 16),
            "NoNewPrivs": int(status["NoNewPrivs"]),
            "dumpable": libc.prctl(3, 0, 0, 0, 0),  # PR_GET_DUMPABLE
        }

    def handle(self, request):
        return {}

    def get_state(self):
        return self.state

    def set_state(self, state):
        pass
'''


@pytest.fixture(scope="module")
def manager():
    if os.geteuid() != 0:
        pytest.skip("needs root")
    if detect() is CgroupVersion.NONE:
        pytest.skip("no usable cgroup controllers here")
    run_id = f"tf{os.getpid()}"
    m = CgroupManager(run_id)
    try:
        yield m
    finally:
        m.remove_objects()
        clean_run(run_id)


@pytest.fixture(scope="module")
def server():
    """A fork server of this test's own (the module's default one is left alone)."""
    s = forkserver.ForkServer(launcher_env())
    s.ensure_started()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def run_dir():
    d = Path(tempfile.mkdtemp(prefix="moat-forkserver-"))
    os.chmod(d, 0o755)
    code = d / "code"
    code.mkdir(mode=0o755)
    (code / "forkprobe.py").write_text(PROBE)
    (code / "forkprobe.py").chmod(0o644)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


async def start_probe(server: forkserver.ForkServer, manager, run_dir: Path, mode: str,
                      isolated: bool = True, relay: bool = False, code: str = "code"
                      ) -> tuple[ObjectSandbox, socket.socket, object]:
    """The runtime with the probe object, started ``mode`` (with ``server`` for fork;
    "prepared": forked, from a launcher ``server`` prepared ahead in its cgroup, as a sandbox
    slot holds one)."""
    server_pid = await asyncio.to_thread(server.ensure_started)  # (again, if it died)
    ident = default_pool().claim()
    workdir = make_workdir(run_dir / "objects", ident.name, ident.uid, ident.gid)
    prepared = None
    if mode == "prepared":
        cgroup = manager.prepare(ident.name)
        prepared = await asyncio.to_thread(forkserver.prepare_launcher, server,
                                           [str(p) for p in cgroup.procs_files()])
    parent, child = socket.socketpair()
    spec = SandboxSpec(workdir, ident.uid, ident.gid, pass_fds=(child.fileno(),),
                       start="fork" if prepared is not None else mode, prepared=prepared,
                       env=minimal_env(workdir, isolated, PYTHONPATH=f"{run_dir / code}:{REPO}",
                                       PROBE_SERVER=str(server_pid)),
                       isolate_fs=isolated, isolate_pids=isolated)
    if relay:
        relays = run_dir / "relays"
        relays.mkdir(mode=0o700, exist_ok=True)
        spec.relay_socket = relays / f"{ident.name}.sock"
        spec.keep_fd = parent.fileno()
    sb = ObjectSandbox(ident.name, spec, manager)
    argv = [sys.executable, "-m", "agent.hosting.runner", "--spec", "forkprobe:Probe",
            "--name", "probe", "--address", "127.0.0.1", "--port", "0",
            "--control-fd", str(child.fileno())]
    forkserver._server, saved = server, forkserver._server  # spawn asks the default server
    try:
        await sb.start(argv)
    finally:
        forkserver._server = saved
        child.close()
    if prepared is not None and isolated:  # it did start from the prepared launcher
        assert sb.proc.pid == prepared.pid and sb.pid == prepared.object_pid
    return sb, parent, ident


async def call(sock: socket.socket, cmd: str) -> dict:
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, json.dumps({"cmd": cmd}).encode() + b"\n")
    data = b""
    while not data.endswith(b"\n"):
        chunk = await asyncio.wait_for(loop.sock_recv(sock, 1 << 20), 30)
        assert chunk, "the object closed its channel"
        data += chunk
    answer = json.loads(data)
    assert answer["ok"], answer
    return answer["result"]


async def stop(sb: ObjectSandbox, sock: socket.socket, ident) -> None:
    try:
        await sb.release_channel()
        sock.close()
        await sb.wait(30)
    finally:
        await sb.close()
        default_pool().release(ident)


def probe(server, manager, run_dir, mode: str, isolated: bool, code: str = "code") -> dict:
    async def main() -> dict:
        sock = None
        sb, sock, ident = await start_probe(server, manager, run_dir, mode, isolated, code=code)
        sock.setblocking(False)
        try:
            return (await call(sock, "stats"))["state"]
        finally:
            await stop(sb, sock, ident)

    return asyncio.run(main())


def server_inodes(pid: int) -> set[int]:
    out = set()
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.update(int(m) for m in re.findall(r"\[(\d+)\]", os.readlink(f"/proc/{pid}/fd/{name}")))
        except OSError:
            pass
    return out


@pytest.mark.parametrize("isolated", [True, False], ids=["namespaces", "uids-only"])
def test_a_forked_object_cannot_reach_the_fork_servers_memory_or_fds(
        server, manager, run_dir, isolated) -> None:
    """The same runtime forked and exec'd: the forked one really ran in the server's child;
    neither can read the server's memory, trace it, signal it or list its fds (isolated: it
    is not even there; uids only: refused); both hold the same fds, none of the server's
    (its socket to the agent, its pidfds); neither has a capability left."""
    forked = probe(server, manager, run_dir, "fork", isolated)
    execd = probe(server, manager, run_dir, "exec", isolated)
    # From a prepared launcher (a sandbox slot's): with uids only it does not fit (it was
    # prepared with both isolations), so it is ended and the server forks one as above.
    prepared = probe(server, manager, run_dir, "prepared", isolated)
    theirs = server_inodes(server.pid)
    print(json.dumps({"fork": forked, "exec": execd, "prepared": prepared}))
    assert forked["forked"] is True and execd["forked"] is False and prepared["forked"] is True
    for res in (forked, execd, prepared):
        if isolated:  # its own PID namespace and /proc: the server has no pid there
            assert (res["mem"], res["ptrace"], res["signal"], res["server fds"]) == \
                (errno.ENOENT, errno.ESRCH, errno.ESRCH, errno.ENOENT), res
        else:  # visible, not reachable: another uid, and root's
            assert (res["mem"], res["ptrace"], res["signal"], res["server fds"]) == \
                (errno.EACCES, errno.EPERM, errno.EPERM, errno.EACCES), res
        assert res["CapEff"] == 0 and res["CapPrm"] == 0 and res["NoNewPrivs"] == 1
        assert res["dumpable"] == 1  # its /proc files are its own uid's, as after an exec
        assert not set(res["inodes"]) & theirs, "an fd shared with the fork server"
        assert not any("pidfd" in target for _, target in res["fds"])
    assert forked["fds"] == execd["fds"] == prepared["fds"]


def test_an_object_outlives_the_fork_server_which_comes_back(server, manager, run_dir) -> None:
    """SIGKILL to the fork server: objects it forked (one with a relay that outlives the
    agent, one tied to the agent) serve on; the next start forks from a new server."""
    async def main() -> tuple[list[dict], int, int]:
        started = [await start_probe(server, manager, run_dir, mode, relay=relay)
                   for mode in ("fork", "prepared") for relay in (True, False)]
        try:
            for _, sock, _ in started:
                sock.setblocking(False)
            old = server.pid
            os.kill(old, signal.SIGKILL)
            await async_wait_until(lambda: proc_start_time(old) is None, 5,
                                   what="the fork server gone")
            answers = [await call(sock, "stats") for _, sock, _ in started]
            alive = [sb.proc.returncode for sb, _, _ in started]
            assert alive == [None] * 4
            again = await start_probe(server, manager, run_dir, "fork")
            again[1].setblocking(False)
            answers.append(await call(again[1], "stats"))
            started.append(again)
            return answers, old, server.pid
        finally:
            for sb, sock, ident in started:
                await stop(sb, sock, ident)

    starts = server.starts
    answers, old, new = asyncio.run(main())
    assert all(a["state"]["forked"] for a in answers)
    assert new is not None and new != old and server.starts == starts + 1


def test_code_that_would_shadow_a_preimported_module_is_execd(server, manager, run_dir) -> None:
    """A service's code directory with a top-level ``packets`` (the server imported ours):
    its interpreter would load that one, so the object is exec'd, not run in-process."""
    shadow = run_dir / "shadow"
    shadow.mkdir(mode=0o755)
    shutil.copy(run_dir / "code" / "forkprobe.py", shadow / "forkprobe.py")
    (shadow / "packets.py").write_text("raise ImportError('the service shadows packets')\n")
    for f in shadow.iterdir():
        f.chmod(0o644)
    plain = probe(server, manager, run_dir, "fork", True)
    assert plain["forked"] is True
    with pytest.raises(Exception, match="closed its channel|exited|Connection"):
        # exec'd, its interpreter imports the service's packets first, as it would without
        # a fork server (and fails here, which is how we know which one it got)
        probe(server, manager, run_dir, "fork", True, code="shadow")
