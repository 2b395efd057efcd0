"""Controlled exec on this machine's real cgroups (root): CPU quota, OOM kill, pids limit,
a uid per object, its own PID namespace, a private size-limited working directory and /tmp,
no inherited fds, two objects that cannot reach each other, and the object runtime itself
started through the sandbox. Every test runs both ways an object can start (issue 14): forked
by the router's fork server and exec'd through a new launcher.

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
from agent.hosting.object_uids import default_pool
from agent.hosting.sandbox import (
    ENV_SANDBOX_START,
    START_MODES,
    ObjectSandbox,
    SandboxError,
    SandboxSpec,
    disk_quota,
    make_workdir,
    minimal_env,
)

MiB = 1 << 20
PY = [sys.executable, "-I", "-S", "-c"]
REPO = Path(__file__).resolve().parents[2]
DENIED = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT)


@pytest.fixture(autouse=True, params=START_MODES)
def start(request, monkeypatch) -> str:
    """Each test forked from the fork server and exec'd through the launcher."""
    monkeypatch.setenv(ENV_SANDBOX_START, request.param)
    return request.param


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
def users():
    """Object identities from the agent's own uid pool, given back afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    claimed = []

    def claim() -> tuple[int, int]:
        claimed.append(default_pool().claim())
        return claimed[-1].uid, claimed[-1].gid

    try:
        yield claim
    finally:
        for ident in claimed:
            default_pool().release(ident)


@pytest.fixture(scope="module")
def user(users) -> tuple[int, int]:
    return users()


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
    async def main() -> tuple[str, dict, list[int], list[int], list]:
        sb = ObjectSandbox("forks", spec_for(run_dir, user, "forks", Limits(pids_max=32)), manager)
        try:
            proc = await sb.start([*PY, FORK_BOMB], stdout=asyncio.subprocess.PIPE)
            # (not communicate(): the sleeping children hold the pipe open)
            out = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
            running = sb.cgroup.procs()  # the bomb's children (some killed already), the relay
            await sb.wait(30)
            leftovers = sb.cgroup.procs()
            dirs = sb.cgroup.dirs
        finally:
            await sb.close()
        return out, sb.exit_info(), running, leftovers, dirs

    out, info, running, leftovers, dirs = asyncio.run(main())
    forked, err = out.split()
    print(f"forked {forked} children, then errno {err}; {info}")
    assert int(err) == errno.EAGAIN and 0 < int(forked) < 32
    assert info["reason"] == "pids limit" and info["pids_limit_hits"] >= 1
    assert info["returncode"] == 0
    # The bomb was PID 1 of its namespace: when it exited, the kernel killed its children.
    assert leftovers == []
    assert not any(d.exists() for d in dirs)  # procs empty, rmdir succeeded
    assert not any(_alive(p) for p in running)


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


def test_object_runs_unprivileged_and_writes_only_its_own_space(manager, user, run_dir) -> None:
    """Its own uid, umask, rlimits and environment; it writes its working directory and its
    private /tmp, which the router never sees, and nothing else."""
    tag = secrets.token_hex(4)
    targets = [str(run_dir / f"escape-{tag}"), str(run_dir / "objects" / f"escape-{tag}"),
               f"/dev/shm/moat-sandbox-test-{tag}", f"/var/tmp/moat-sandbox-test-{tag}"]
    private = f"/tmp/moat-sandbox-test-{tag}"
    spec = spec_for(run_dir, user, "who")

    async def main() -> dict:
        async with ObjectSandbox("who", spec, manager) as sb:
            proc = await sb.start([*PY, WHO, json.dumps(targets + [private])],
                                  stdout=asyncio.subprocess.PIPE)
            out, _ = await asyncio.wait_for(proc.communicate(), 30)
            assert await sb.wait() == 0
            return json.loads(out)

    try:
        res = asyncio.run(main())
    finally:
        for t in targets + [private]:
            Path(t).unlink(missing_ok=True)
    uid, gid = user
    print(res["outside"])
    assert res["uid"] == res["euid"] == uid != 0 and res["gid"] == gid and res["groups"] == []
    assert res["cwd"] == str(spec.workdir) and res["env"] == minimal_env(spec.workdir)
    assert res["env"]["TMPDIR"] == "/tmp"
    assert res["umask"] == 0o077 and res["nofile"] == [256, 256] and res["core"] == [0, 0]
    assert res["inside"] == 0 and res["outside"].pop(private) == 0
    assert not Path(private).exists(), "the object's /tmp is the router's"
    for target, err in res["outside"].items():
        assert err in DENIED, f"{target}: {os.strerror(err) if err else 'written!'}"
        assert not Path(target).exists()
    # The working directory the router sees is only the mount point of the object's tmpfs.
    assert list(spec.workdir.iterdir()) == []
    st = spec.workdir.stat()
    assert st.st_uid == uid and st.st_mode & 0o777 == 0o700


def test_without_fs_isolation_user_permissions_still_deny_the_run_dir(manager, user, run_dir) -> None:
    tag = secrets.token_hex(4)
    targets = [str(run_dir / f"escape-{tag}"), str(run_dir / "objects" / f"escape-{tag}")]
    spec = spec_for(run_dir, user, "plain", isolate_fs=False, isolate_pids=False)

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
    socketpair, serves as the object's uid, and the VM reads its CPU and memory."""
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
            await async_wait_until(lambda: len(sb.cgroup.procs()) >= 9, 10, interval=0.02,
                                   what="8 processes and the relay in the object's cgroup")
            procs, usage, dirs = sb.cgroup.procs(), sb.usage(), sb.cgroup.dirs
        return procs, usage, dirs, sb.exit_info()

    try:
        procs, usage, dirs, info = asyncio.run(main())
    finally:
        clean_run(run_id + "u", unified)
    assert len(procs) == 9 and usage["cpu_seconds"] > 0  # the 8 and the launcher's relay
    assert info["reason"] == "killed: signal 9" and not any(d.exists() for d in dirs)
    assert find_run_cgroups(run_id + "u", unified) == []


# --- a PID namespace per object -----------------------------------------------------------

ALONE = """
import json, os, signal, sys, time
child = os.fork()
if child == 0:
    time.sleep(120)
    os._exit(0)
seen = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
try:
    os.kill(int(sys.argv[1]), 0)
    agent = 0
except OSError as e:
    agent = e.errno
print(json.dumps({"pid": os.getpid(), "child": child, "proc": seen, "agent": agent}), flush=True)
how = sys.argv[2]
if how == "exit":
    sys.exit(3)
if how == "crash":
    import ctypes
    ctypes.string_at(0)  # SIGSEGV (a signal it sent itself would be ignored: it is an init)
time.sleep(120)
"""


@pytest.mark.parametrize("how, rc, reason", [("exit", 3, "exited"),
                                             ("crash", -11, "killed: signal 11")])
def test_object_is_pid_1_of_its_own_namespace_and_its_status_reaches_the_agent(
        manager, user, run_dir, how, rc, reason) -> None:
    """It sees only its own processes, not the router's; the agent reads its exit status
    through the relay; what it left behind dies with it."""
    async def main() -> tuple[dict, int, dict, list[int], int]:
        async with ObjectSandbox("ns", spec_for(run_dir, user, f"ns-{how}"), manager) as sb:
            proc = await sb.start([*PY, ALONE, str(os.getpid()), how],
                                  stdout=asyncio.subprocess.PIPE)
            seen = json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))
            outer = sb.pid
            procs = sb.cgroup.procs()
            status = await sb.wait(30)
            left = sb.cgroup.procs()
            return seen, status, sb.exit_info(), procs, outer, left, proc.pid

    seen, status, info, procs, outer, left, relay = asyncio.run(main())
    assert seen["pid"] == 1 and seen["proc"] == [1, seen["child"]]
    assert seen["agent"] == errno.ESRCH  # the agent (this test) is not there to signal
    assert outer != relay and {outer, relay} <= set(procs) and len(procs) == 3
    assert status == rc and info["reason"] == reason
    assert left == [] and not any(_alive(p) for p in procs)


HANG = """
import os, signal, time
for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(s, signal.SIG_IGN)
os.setsid() if os.fork() == 0 else None   # a child in a session of its own
print("ready", flush=True)
time.sleep(300)
"""


@pytest.mark.parametrize("with_cgroup", [True, False])
def test_kill_ends_a_hung_object_and_its_whole_namespace(manager, user, run_dir,
                                                         with_cgroup) -> None:
    """With its cgroup (cgroup kill) and without one (SIGKILL to the relay, the object dies
    with it, its namespace with the object), even a child in its own session goes."""
    async def main() -> tuple[dict, list[int]]:
        sb = ObjectSandbox("hang", spec_for(run_dir, user, f"hang-{with_cgroup}"),
                           manager if with_cgroup else None)
        try:
            proc = await sb.start([*PY, HANG], stdout=asyncio.subprocess.PIPE)
            assert (await asyncio.wait_for(proc.stdout.readline(), 30)).strip() == b"ready"
            mine = [int(p) for p in os.listdir("/proc")
                    if p.isdigit() and _uid(int(p)) == user[0] and _alive(int(p))]
            await sb.kill()
        finally:
            await sb.close()
        return sb.exit_info(), mine

    info, mine = asyncio.run(main())
    assert len(mine) == 2 and info["returncode"] == -9 and info["reason"] == "killed: signal 9"
    wait_until(lambda: not any(_alive(p) for p in mine), 5, what="the object's processes gone")


def _uid(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Uid:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


# --- a disk quota ---------------------------------------------------------------------------

FILL = """
import errno, json, os
def fill(path):
    n = 0
    try:
        with open(path, "wb") as f:
            while n < 1024:
                f.write(b"x" * (1 << 20))
                f.flush()
                n += 1
        return n, 0
    except OSError as e:
        return n, e.errno
work = fill("fill")
tmp = fill("/tmp/fill")
os.unlink("fill")
again = fill("/tmp/again")     # the space written is free again
st = os.statvfs(".")
print(json.dumps({"work": work, "tmp": tmp, "again": again,
                  "size": st.f_blocks * st.f_frsize}), flush=True)
"""


def test_writing_past_the_quota_fails_with_enospc_and_kills_nothing(manager, users, run_dir) -> None:
    """Working directory and /tmp share one quota (a tmpfs, at most half the memory limit):
    past it a write fails with ENOSPC, the object carries on and exits normally, another
    object running meanwhile is untouched."""
    limits = Limits(memory_bytes=96 * MiB)
    quota = disk_quota(limits)
    assert quota == 48 * MiB

    async def main() -> tuple[dict, dict, int | None]:
        other = ObjectSandbox("bystander", spec_for(run_dir, users(), "bystander"), manager)
        filler = ObjectSandbox("filler", spec_for(run_dir, users(), "filler", limits), manager)
        async with other, filler:
            await other.start([*PY, "import time; time.sleep(120)"])
            out, _ = await run_code(filler, FILL)
            alive = other.proc.returncode
            return json.loads(out), filler.exit_info(), alive

    res, info, alive = asyncio.run(main())
    print(f"quota {quota >> 20} MiB: {res}; peak memory {info['usage']['memory_peak_bytes']}")
    assert res["size"] == quota
    written, err = res["work"]
    assert err == errno.ENOSPC and 40 <= written <= 48
    assert res["tmp"] == [0, errno.ENOSPC]  # the working directory filled the shared quota
    assert res["again"][1] == errno.ENOSPC and res["again"][0] >= written - 1
    assert info["reason"] == "exited" and info["returncode"] == 0 and info["oom_kills"] == 0
    assert alive is None


# --- objects cannot reach each other --------------------------------------------------------

VICTIM = """
import os, sys, time
with open("secret", "w") as f:
    f.write("b's file")
print(os.getcwd(), flush=True)
time.sleep(120)
"""

PROBE = """
import errno, json, os, signal, sys
pid, workdir = int(sys.argv[1]), sys.argv[2]
def attempt(fn):
    try:
        fn()
        return 0
    except OSError as e:
        return e.errno
def read(path):
    with open(path, "rb") as f:
        f.read()
def write(path):
    with open(path, "w") as f:
        f.write("from a")
print(json.dumps({
    "signal 0": attempt(lambda: os.kill(pid, 0)),
    "SIGKILL": attempt(lambda: os.kill(pid, signal.SIGKILL)),
    "environ": attempt(lambda: read(f"/proc/{pid}/environ")),
    "cwd": attempt(lambda: os.listdir(f"/proc/{pid}/cwd")),
    "root file": attempt(lambda: read(f"/proc/{pid}/root{workdir}/secret")),
    "list dir": attempt(lambda: os.listdir(workdir)),
    "read file": attempt(lambda: read(f"{workdir}/secret")),
    "write file": attempt(lambda: write(f"{workdir}/from-a")),
    "procs": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
}), flush=True)
"""


@pytest.mark.parametrize("isolated", [True, False], ids=["namespaces", "uids-only"])
def test_one_object_cannot_signal_or_read_another(manager, users, run_dir, isolated) -> None:
    """A (its own uid, PID and mount namespaces) tries to signal B, read B's environment
    and files and write B's working directory: all fail, B runs on. ``uids-only`` turns the
    namespaces off for both: the separate uids alone refuse it all (EPERM, EACCES)."""
    kw = {} if isolated else {"isolate_fs": False, "isolate_pids": False}
    a_spec = spec_for(run_dir, users(), f"a-{isolated}", **kw)
    b_spec = spec_for(run_dir, users(), f"b-{isolated}", **kw)
    assert a_spec.uid != b_spec.uid
    b_spec.env = minimal_env(b_spec.workdir, isolated, MOAT_TEST_SECRET="b's environment")

    async def main() -> tuple[dict, int | None, str]:
        async with ObjectSandbox("b", b_spec, manager) as b, ObjectSandbox("a", a_spec, manager) as a:
            bproc = await b.start([*PY, VICTIM], stdout=asyncio.subprocess.PIPE)
            assert (await asyncio.wait_for(bproc.stdout.readline(), 30)).strip() \
                == str(b_spec.workdir).encode()
            out, _ = await run_code(a, PROBE.replace("sys.argv[1]", str(b.pid)).replace(
                "sys.argv[2]", repr(str(b_spec.workdir))))
            return json.loads(out), b.proc.returncode, a.exit_info()["reason"]

    res, b_running, a_reason = asyncio.run(main())
    print(res)
    procs = res.pop("procs")
    assert a_reason == "exited" and b_running is None
    assert not (b_spec.workdir / "from-a").exists()
    if isolated:
        assert procs == [1]  # neither B nor any of the router's processes
        assert res["signal 0"] == res["SIGKILL"] == errno.ESRCH
        for what in ("environ", "cwd", "root file", "list dir", "read file", "write file"):
            assert res[what] == errno.ENOENT, what  # not there: B's /proc, B's /tmp
    else:
        assert os.getpid() in procs  # the router's processes are visible, not reachable
        assert res["signal 0"] == res["SIGKILL"] == errno.EPERM
        for what in ("environ", "cwd", "root file", "list dir", "read file", "write file"):
            assert res[what] == errno.EACCES, what


def test_object_processes_get_their_own_uid_and_leave_no_directory(manager, run_dir) -> None:
    """ObjectProcess end to end: two objects (one with a provider-style name that would
    climb out of the directory) run as two uids of the object range in directories named by
    the agent; once stopped, the directories are gone, the uids given back, the logs kept."""
    from agent.hosting import sandbox_pool
    from agent.hosting.object_uids import UID_FIRST, UID_LAST
    from agent.hosting.runtime import ObjectProcess

    objects = run_dir / "objects"

    def process(name: str) -> ObjectProcess:
        return ObjectProcess(name, "agent.objects.counter:Counter", "127.0.0.1", 0, "r1",
                             objects_dir=objects, cgroups=manager,
                             limits=Limits(memory_bytes=128 * MiB, pids_max=32),
                             label=f"../../{name}")

    async def main() -> tuple[list[dict], list[Path], list[int | None], list[set]]:
        procs = [process("counter"), process("../evil")]
        infos, dirs, uids, held = [], [], [], []
        try:
            for p in procs:
                await p.start()
            for p in procs:
                infos.append(p.sandbox_info())
                dirs.append(p.workdir)
                uids.append(_uid(p.pid))
            held.append(set(default_pool().claims()))
        finally:
            for p in procs:
                await p.stop()
        sandbox_pool.close_all()  # as the agent's exit: its prepared slots go too
        held.append(default_pool().claims())
        return infos, dirs, uids, held

    infos, dirs, uids, (during, after) = asyncio.run(main())
    print(infos)
    assert [i["uid"] for i in infos] == uids and len(set(uids)) == 2
    assert all(UID_FIRST <= u <= UID_LAST for u in uids) and set(uids) <= during
    # Given back: a new slot may claim the same number again, never the same identity.
    assert not any(after.get(i["uid"], {}).get("name") == i["sandbox"] for i in infos)
    for info, d in zip(infos, dirs):
        assert d.parent == objects.resolve() and d.name == info["sandbox"]
        assert d.name.startswith(f"o{info['uid']}-")
        assert not d.exists()
        assert (objects / f"{info['sandbox']}.log").is_file()
    assert sorted(p.name for p in objects.iterdir()) == sorted(f"{i['sandbox']}.log" for i in infos)
    assert not (run_dir / "evil").exists() and not (run_dir.parent / "counter").exists()


def test_code_under_the_routers_tmp_stays_readable_and_read_only(manager, user, run_dir) -> None:
    """The private /tmp covers the router's: code on PYTHONPATH under it (a VM's installed
    service, reached through a link as a run's ``vm`` link) is bound back, read-only, at the
    path given and the resolved one, even below a directory the object could not enter."""
    hidden = run_dir / "private"
    hidden.mkdir(mode=0o700)
    code = hidden / "installed" / "svc"
    code.mkdir(parents=True)
    (code / "probe_module.py").write_text("WHERE = __file__\n")
    (code / "probe_module.py").chmod(0o666)  # so only the read-only mount refuses a write
    (run_dir / "vm").symlink_to(hidden / "installed")
    given = run_dir / "vm" / "svc"
    spec = spec_for(run_dir, user, "code")
    spec.env = minimal_env(spec.workdir, PYTHONPATH=str(given))
    check = ("import json, sys, probe_module\n"
             "try:\n    open(probe_module.WHERE, 'a').close(); err = 0\n"
             "except OSError as e:\n    err = e.errno\n"
             "print(json.dumps({'where': probe_module.WHERE, 'write': err}))\n")

    async def main() -> dict:
        async with ObjectSandbox("code", spec, manager) as sb:
            proc = await sb.start([sys.executable, "-S", "-c", check],  # not -I: PYTHONPATH
                                  stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await asyncio.wait_for(proc.communicate(), 30)
            assert await sb.wait() == 0, err
            return json.loads(out)

    res = asyncio.run(main())
    assert res == {"where": str(given / "probe_module.py"), "write": errno.EROFS}
