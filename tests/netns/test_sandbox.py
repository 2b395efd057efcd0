"""Controlled exec on this machine's real cgroups (root): CPU quota, OOM kill, pids limit,
unprivileged user, private writable directory, no inherited fds, and the object runtime
itself started through the sandbox.

Behaviour checks with generous bounds, not benchmarks: an unlimited busy loop would use
~1.0 CPU-second per second, a limited one must stay near its quota.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import secrets
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

import pytest

from agent.core.wait import async_wait_until, wait_until
from agent.hosting.cgroups import (
    DEFAULT_ROOT,
    CgroupError,
    CgroupManager,
    CgroupVersion,
    Limits,
    clean_run,
    detect,
    find_run_cgroups,
    is_agent_leaf,
)
from agent.hosting.sandbox import (
    ObjectSandbox,
    SandboxError,
    SandboxSpec,
    ensure_object_user,
    make_workdir,
    minimal_env,
)

MiB = 1 << 20
PY = [sys.executable, "-I", "-S", "-c"]
REPO = Path(__file__).resolve().parents[2]
DENIED = (errno.EACCES, errno.EPERM, errno.EROFS)


@pytest.fixture(scope="module")
def run_id() -> str:
    return f"t{os.getpid()}{secrets.token_hex(2)}"


@pytest.fixture(scope="module")
def manager(run_id: str):
    """A real CgroupManager for this module's run id; skips where the controllers are missing;
    afterwards nothing of the run may be left (but a v2 agent leaf holding pytest itself)."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    version = detect()
    if version is CgroupVersion.NONE:
        pytest.skip("no usable cgroup controllers here (neither v1 nor v2)")
    m = CgroupManager(run_id)
    try:
        probe = m.create("probe", Limits(cpu_quota=0.5, memory_bytes=64 * MiB, pids_max=32))
        missing = {"cpu", "memory", "pids"} - probe.controllers()
        probe.remove()
    except CgroupError as exc:
        clean_run(run_id)
        pytest.skip(f"cgroup {version.value}: cannot make a limited object cgroup: {exc}")
    if missing:
        clean_run(run_id)
        pytest.skip(f"cgroup {version.value}: controllers {sorted(missing)} are not available")
    try:
        yield m
    finally:
        m.remove_objects()
        clean_run(run_id)
        left = [p for p in find_run_cgroups(run_id) if not is_agent_leaf(p.name)]
        assert left == [], f"cgroups left behind: {left}"


@pytest.fixture(scope="module")
def user() -> tuple[int, int]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    return ensure_object_user()


@pytest.fixture
def run_dir():
    d = Path(tempfile.mkdtemp(prefix="moat-sandbox-run-"))
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def spec_for(run_dir: Path, user: tuple[int, int], name: str, limits: Limits = Limits(),
             **kw) -> SandboxSpec:
    uid, gid = user
    return SandboxSpec(make_workdir(run_dir / "objects", name, uid, gid), uid, gid, limits, **kw)


async def run_code(sb: ObjectSandbox, code: str, timeout: float = 60.0) -> tuple[str, str]:
    proc = await sb.start([*PY, code], stdout=asyncio.subprocess.PIPE,
                          stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    await sb.wait()
    return out.decode(), err.decode()


BUSY = """
import time
t = time.monotonic()
while time.monotonic() - t < 2.0:
    pass
"""


def test_cpu_bound_object_is_held_near_its_quota(manager, user, run_dir) -> None:
    async def main() -> tuple[float, float]:
        async with ObjectSandbox("cpu", spec_for(run_dir, user, "cpu", Limits(cpu_quota=0.2)),
                                 manager) as sb:
            t0 = time.monotonic()
            await run_code(sb, BUSY)
            wall = time.monotonic() - t0
            assert sb.exit_reason() == "exited"
            return sb.usage()["cpu_seconds"], wall

    cpu, wall = asyncio.run(main())
    ratio = cpu / wall
    print(f"cpu_quota=0.2: {cpu:.3f} CPU-s in {wall:.3f} s wall = {ratio:.3f} CPU")
    assert 0.1 < ratio < 0.35


HOG = """
import sys
chunks = []
for i in range(200):
    chunks.append(b"x" * (1 << 20))   # written, so really resident
    if i % 16 == 0:
        print(i, flush=True)
print("survived", flush=True)
"""


def test_object_allocating_past_its_limit_is_oom_killed(manager, user, run_dir) -> None:
    async def main() -> dict:
        async with ObjectSandbox("hog", spec_for(run_dir, user, "hog",
                                                 Limits(memory_bytes=64 * MiB)), manager) as sb:
            out, _ = await run_code(sb, HOG)
            assert "survived" not in out
            return sb.exit_info()

    info = asyncio.run(main())
    print(info)
    assert info["reason"] == "killed: oom"
    assert info["returncode"] == -9 and info["oom_kills"] >= 1
    assert info["usage"]["memory_peak_bytes"] is None or \
        info["usage"]["memory_peak_bytes"] <= 64 * MiB + MiB


FORK_BOMB = """
import errno, os, sys, time
n, err = 0, None
for i in range(10000):
    try:
        pid = os.fork()
    except OSError as e:
        err = e.errno
        break
    if pid == 0:
        time.sleep(120)
        os._exit(0)
    n += 1
print(n, err, flush=True)
sys.exit(0 if err == errno.EAGAIN else 1)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_fork_bomb_is_stopped_by_the_pids_limit_and_cleaned_up(manager, user, run_dir) -> None:
    async def main() -> tuple[str, dict, list[int], list]:
        sb = ObjectSandbox("forks", spec_for(run_dir, user, "forks", Limits(pids_max=32)), manager)
        try:
            proc = await sb.start([*PY, FORK_BOMB], stdout=asyncio.subprocess.PIPE)
            # (not communicate(): the sleeping children hold the pipe open)
            out = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
            await sb.wait(30)
            leftovers = sb.cgroup.procs()  # the sleeping children outlive their parent
            dirs = sb.cgroup.dirs
        finally:
            await sb.close()
        return out, sb.exit_info(), leftovers, dirs

    out, info, leftovers, dirs = asyncio.run(main())
    forked, err = out.split()
    print(f"forked {forked} children, then errno {err}; {info}")
    assert int(err) == errno.EAGAIN and 0 < int(forked) < 32
    assert info["reason"] == "pids limit" and info["pids_limit_hits"] >= 1
    assert info["returncode"] == 0
    assert len(leftovers) == int(forked)
    assert not any(d.exists() for d in dirs)  # killed, procs empty, rmdir succeeded
    wait_until(lambda: not any(_alive(p) for p in leftovers), 5, what="the forked children gone")


WHO = """
import json, os, resource, sys
def attempt(path):
    try:
        with open(path, "w") as f:
            f.write("x")
        return 0
    except OSError as e:
        return e.errno
targets = json.loads(sys.argv[1])
print(json.dumps({
    "uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(), "groups": os.getgroups(),
    "cwd": os.getcwd(), "env": dict(os.environ), "umask": os.umask(0),
    "nofile": resource.getrlimit(resource.RLIMIT_NOFILE),
    "core": resource.getrlimit(resource.RLIMIT_CORE),
    "inside": attempt("inside.txt"),
    "outside": {t: attempt(t) for t in targets},
}))
"""


def test_object_runs_unprivileged_and_writes_only_its_directory(manager, user, run_dir) -> None:
    tag = secrets.token_hex(4)
    targets = [f"/tmp/moat-sandbox-test-{tag}", str(run_dir / f"escape-{tag}"),
               str(run_dir / "objects" / f"escape-{tag}"), f"/dev/shm/moat-sandbox-test-{tag}"]
    spec = spec_for(run_dir, user, "who")

    async def main() -> dict:
        async with ObjectSandbox("who", spec, manager) as sb:
            proc = await sb.start([*PY, WHO, json.dumps(targets)], stdout=asyncio.subprocess.PIPE)
            out, _ = await asyncio.wait_for(proc.communicate(), 30)
            assert await sb.wait() == 0
            return json.loads(out)

    try:
        res = asyncio.run(main())
    finally:
        for t in targets:
            Path(t).unlink(missing_ok=True)
    uid, gid = user
    print(res["outside"])
    assert res["uid"] == res["euid"] == uid != 0 and res["gid"] == gid and res["groups"] == []
    assert res["cwd"] == str(spec.workdir) and res["env"] == minimal_env(spec.workdir)
    assert res["umask"] == 0o077 and res["nofile"] == [256, 256] and res["core"] == [0, 0]
    assert res["inside"] == 0
    written = spec.workdir / "inside.txt"
    assert written.read_text() == "x" and written.stat().st_uid == uid
    for target, err in res["outside"].items():
        assert err in DENIED, f"{target}: {os.strerror(err) if err else 'written!'}"
        assert not Path(target).exists()
    st = spec.workdir.stat()
    assert st.st_uid == uid and st.st_mode & 0o777 == 0o700


def test_without_fs_isolation_user_permissions_still_deny_the_run_dir(manager, user, run_dir) -> None:
    tag = secrets.token_hex(4)
    targets = [str(run_dir / f"escape-{tag}"), str(run_dir / "objects" / f"escape-{tag}")]
    spec = spec_for(run_dir, user, "plain", isolate_fs=False)

    async def main() -> dict:
        async with ObjectSandbox("plain", spec, manager) as sb:
            proc = await sb.start([*PY, WHO, json.dumps(targets)], stdout=asyncio.subprocess.PIPE)
            out, _ = await asyncio.wait_for(proc.communicate(), 30)
            await sb.wait()
            return json.loads(out)

    res = asyncio.run(main())
    assert res["inside"] == 0
    assert all(err == errno.EACCES for err in res["outside"].values()), res["outside"]


FDS = """
import os, socket, sys, json
fds = []
for name in os.listdir("/proc/self/fd"):
    try:
        os.fstat(int(name))        # the directory fd listdir used is closed again by now
        fds.append(int(name))
    except OSError:
        pass
s = socket.socket(fileno=int(sys.argv[1]))
s.sendall(json.dumps(sorted(fds)).encode())
"""


def test_object_gets_only_the_fds_it_is_given(manager, user, run_dir) -> None:
    leak = os.open("/dev/null", os.O_RDONLY)
    os.set_inheritable(leak, True)  # an fd the agent forgot to mark close-on-exec
    parent, child = socket.socketpair()
    try:
        spec = spec_for(run_dir, user, "fds", pass_fds=(child.fileno(),))

        async def main() -> list[int]:
            async with ObjectSandbox("fds", spec, manager) as sb:
                await sb.start([*PY, FDS, str(child.fileno())])
                child.close()
                assert await sb.wait(30) == 0
                return json.loads(parent.recv(65536))

        fd_no = child.fileno()
        seen = asyncio.run(main())
    finally:
        os.close(leak)
        parent.close()
        child.close()
    assert seen == sorted({0, 1, 2, fd_no}), seen


def test_a_failed_start_is_reported_and_leaves_no_cgroup(manager, user, run_dir) -> None:
    sb = ObjectSandbox("nothere", spec_for(run_dir, user, "nothere"), manager)

    async def main() -> None:
        with pytest.raises(SandboxError, match=r"\(exec\)"):
            await sb.start(["/nonexistent/program"])

    asyncio.run(main())
    assert sb.cgroup is not None and not sb.cgroup.exists()


def test_the_object_runtime_runs_in_the_sandbox_and_is_measured(manager, user, run_dir) -> None:
    """agent.hosting.runner (what ObjectProcess starts) under the sandbox: answers over its
    socketpair, serves as moat-object, and the VM reads its CPU and memory."""
    parent, child = socket.socketpair()
    spec = spec_for(run_dir, user, "counter", Limits(cpu_quota=0.5, memory_bytes=128 * MiB,
                                                     pids_max=32),
                    pass_fds=(child.fileno(),))
    spec.env = minimal_env(spec.workdir, PYTHONPATH=str(REPO))
    argv = [sys.executable, "-m", "agent.hosting.runner", "--spec", "agent.objects.counter:Counter",
            "--name", "counter", "--address", "127.0.0.1", "--port", "0",
            "--control-fd", str(child.fileno())]

    async def main() -> tuple[dict, dict, dict]:
        async with ObjectSandbox("counter", spec, manager) as sb:
            await sb.start(argv)
            child.close()
            reader, writer = await asyncio.open_connection(sock=parent)

            async def call(cmd: str) -> dict:
                writer.write(json.dumps({"cmd": cmd}).encode() + b"\n")
                await writer.drain()
                return json.loads(await asyncio.wait_for(reader.readline(), 30))

            stats = await call("stats")
            usage = sb.usage()
            await call("stop")
            await sb.wait(30)
            writer.close()
            return stats, usage, sb.exit_info()

    stats, usage, info = asyncio.run(main())
    assert stats["ok"] and stats["result"]["pid"] > 0
    assert usage["cpu_seconds"] > 0 and usage["memory_bytes"] > 0 and usage["pids"] >= 1
    assert info["reason"] == "exited" and info["returncode"] == 0


def test_v2_mechanics_on_the_unified_part_of_a_hybrid_mount(run_id, user, run_dir) -> None:
    """Where cgroup v2 is mounted without controllers next to v1 (this machine), the v2
    adapter's kernel mechanics still run for real: mkdir, joining through cgroup.procs,
    cpu.stat, cgroup.kill, rmdir."""
    unified = DEFAULT_ROOT / "unified"
    if detect() is not CgroupVersion.V1 or not (unified / "cgroup.procs").is_file():
        pytest.skip("no hybrid mount with a separate cgroup2 hierarchy here")
    m = CgroupManager(run_id + "u", root=unified)
    assert m.version is CgroupVersion.V2
    code = "import os, time\nfor _ in range(3):\n    os.fork()\ntime.sleep(60)\n"

    async def main() -> tuple[list[int], dict, list, dict]:
        async with ObjectSandbox("v2", spec_for(run_dir, user, "v2"), m) as sb:
            await sb.start([*PY, code])
            await async_wait_until(lambda: len(sb.cgroup.procs()) >= 8, 10, interval=0.02,
                                   what="8 processes in the object's cgroup")
            procs, usage, dirs = sb.cgroup.procs(), sb.usage(), sb.cgroup.dirs
        return procs, usage, dirs, sb.exit_info()

    try:
        procs, usage, dirs, info = asyncio.run(main())
    finally:
        clean_run(run_id + "u", unified)
    assert len(procs) == 8 and usage["cpu_seconds"] > 0
    assert info["reason"] == "killed: signal 9" and not any(d.exists() for d in dirs)
    assert find_run_cgroups(run_id + "u", unified) == []
