"""Controlled exec of mobile objects: own cgroup, own uid, own PID namespace, rlimits, a
private size-limited working directory and /tmp, read-only view of the rest of the
filesystem, no inherited file descriptors.

Design: no ``preexec_fn``. The agent is an asyncio program with threads (the default
executor, the child watcher), and Python code between fork and exec in a threaded process
can deadlock; it could also not join a cgroup "before the object runs" without a race.
Instead the agent starts a tiny launcher, :mod:`agent.hosting.sandbox_exec`, as root with
``close_fds=True``, an explicit ``pass_fds``, ``start_new_session=True`` and an empty
environment (``python -I -S``: no site-packages, no PYTHON* variables). The launcher joins
the cgroup first, then forks into a new PID namespace (the object is its PID 1; the launcher
stays outside as a relay that ends the way the object ended, so the agent still reads the
object's exit status), isolates the filesystem, sets rlimits, closes stray fds, drops to the
object's uid (``setgroups``, ``setresgid``, ``setresuid``, ``no_new_privs``) and ``execve``s
the object with exactly the spec's environment. So the object's first instruction already
runs limited, accounted and unprivileged: there is no window to close, unlike
``prlimit()``/``cgroup.procs`` written by the parent after the fork. The launcher reports
failures on a close-on-exec pipe; EOF on it means the object's program is running. The cost
is one short-lived interpreter start per object start (tens of milliseconds) and the relay,
a waiting interpreter (about 4 MiB, in the object's cgroup, so counted in its memory). The
fork path (:data:`START_MODES`, :mod:`agent.hosting.forkserver`, the default) saves the
interpreter starts: the agent's fork server forks a launcher that takes the same steps (the
same functions) and runs the runtime in-process.

Isolation between objects (each holds on its own, the next one does not rely on it):

* a uid and gid of its own per object (:mod:`agent.hosting.object_uids`: from a dedicated
  range, no passwd entry), so no object may signal, trace or read another's processes or
  files: its working directory is 0700 and its ``/proc/<pid>`` files are its own;
* a PID namespace of its own with its own ``/proc``: another object's processes, and the
  router's, are not even visible (``kill`` finds no such process); when the object's main
  process exits, everything it left behind is killed with it;
* a private mount namespace in which every filesystem is read-only; its only writable space
  is one tmpfs of ``disk_bytes`` (its working directory and its private ``/tmp``). That is
  the disk quota: a write past it fails with ENOSPC and nothing is killed. tmpfs and not a
  filesystem image or project quotas because it needs neither a block device nor
  filesystem support, and the kernel removes it with the object's last process, whatever
  the agent does. Its pages are memory and count toward the object's memory limit, so the
  agent keeps the quota at most half that limit (:func:`disk_quota`): ENOSPC comes before
  the OOM killer unless the object's own memory already fills the other half.

The working directory's name is chosen by the agent (:mod:`agent.hosting.object_uids`),
never built from a provider's name; :func:`make_workdir` makes it as root, owned by the
object's uid, mode 0700 (with ``isolate_fs`` it is only the mount point of the tmpfs: the
object's files never reach the router's disk), and :func:`remove_workdir` removes it once
the object has stopped.

Outliving the agent (issue 13): with ``relay_socket`` the relay is not tied to the agent.
It holds a copy of the agent's end of the object's channel and listens on a root-only Unix
socket; a restarted agent proves the relay is the one recorded (pid and start time, its
cgroup, the object's pid it names: :meth:`ObjectSandbox.adopt`), takes the channel back
and hears the object's exit status over that connection (the relay is not its child any
more). The relay carries ``MOAT_RUN_ID``, so ``moat clean`` finds it by the run's id, and the
object dies with it.

Exit reasons (:meth:`ObjectSandbox.exit_reason`): ``"killed: oom"`` when the cgroup's OOM
kill counter rose, ``"pids limit"`` when a fork was refused by ``pids.max``, ``"killed:
signal N"``, or ``"exited"`` (the status is in :meth:`ObjectSandbox.exit_info`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import shutil
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from agent.hosting.cgroups import Cgroup, CgroupError, CgroupManager, CgroupVersion, Limits
from agent.hosting.sandbox_exec import exit_status
from agent.core.errors import AgentError

log = logging.getLogger(__name__)

MiB = 1 << 20
DISK_QUOTA = 64 * MiB  # working directory and /tmp together, at most half the memory limit
DISK_INODES = 16384
DEFAULT_RLIMITS: dict[str, tuple[int, int]] = {
    "NOFILE": (256, 256),
    "FSIZE": (256 * MiB, 256 * MiB),  # a bigger write gets SIGXFSZ
    "CORE": (0, 0),
}
LAUNCHER = Path(__file__).resolve().with_name("sandbox_exec.py")
SPAWN_TIMEOUT = 10.0
MAX_SPEC_BYTES = 60_000
#: The run id in the environment (topologies.run.ENV_RUN_ID; agent cannot import topologies).
ENV_RUN_ID = "MOAT_RUN_ID"  # fits in a pipe buffer: written before the launcher starts
#: How objects start (issue 14): "fork" from the router's fork server (a pre-imported
#: runtime, :mod:`agent.hosting.forkserver`) or "exec" through a new launcher interpreter
#: (the baseline). The environment variable sets the default for a process and its children
#: (the agents of a run inherit it); :attr:`SandboxSpec.start` sets it for one object.
ENV_SANDBOX_START = "MOAT_SANDBOX_START"
START_MODES = ("fork", "exec")
#: "1": every start records the time of each of its steps (:attr:`ObjectSandbox.trace`,
#: the agent's and the launcher's, one monotonic clock); ``moat bench objstart`` sets it.
ENV_START_TRACE = "MOAT_START_TRACE"
DEFAULT_START = "fork"  # every sandbox test passes both ways (tests/netns)
DEVNULL = subprocess.DEVNULL


class SandboxError(AgentError):
    """An object that could not be started in its sandbox."""


# --- the object's working directory -------------------------------------------------------


def _may_traverse(st: os.stat_result, uid: int, gid: int) -> bool:
    if uid == 0:
        return True
    if st.st_uid == uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid == gid:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def make_workdir(parent: Path, name: str, uid: int, gid: int) -> Path:
    """``parent/name``, new: made by root, owned by the object's uid, mode 0700.

    ``name`` is the agent's choice (:mod:`agent.hosting.object_uids`), never a provider's.
    ``parent`` (the run's directory for objects) must belong to root and not be writable
    by anyone else, so the object cannot rename or replace its own directory, and every
    directory above must let the object's user pass. An existing ``parent/name`` is refused:
    a directory is never handed from one object to the next.
    """
    if not name or "/" in name or name in (".", ".."):
        raise SandboxError(f"bad working directory name {name!r}")
    parent = Path(parent).resolve()
    if not parent.is_dir():
        parent.mkdir(parents=True, exist_ok=True)
        os.chmod(parent, 0o755)  # not the umask's idea of it: the objects must pass through
    pst = parent.stat()
    if (os.geteuid() == 0 and pst.st_uid != 0) or pst.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise SandboxError(f"{parent} must belong to root and be writable by root only")
    for d in (parent, *parent.parents):
        if not _may_traverse(d.stat(), uid, gid):
            raise SandboxError(f"uid {uid} cannot enter {d} (mode {oct(d.stat().st_mode & 0o7777)}); "
                               f"put the run directory somewhere it can reach")
    path = parent / name
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        raise SandboxError(f"working directory {path} exists already") from None
    # Through an fd opened with O_NOFOLLOW: never chown what a symlink points to.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise SandboxError(f"{path} is not a plain directory: {exc.strerror}") from None
    try:
        os.fchown(fd, uid, gid)
        os.fchmod(fd, 0o700)
    finally:
        os.close(fd)
    return path


def remove_workdir(path: Path) -> None:
    """Remove a stopped object's working directory and everything in it (symlinks are
    removed, never followed). Gone already is fine."""
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise SandboxError(f"cannot remove working directory {path}: {exc}") from None


def disk_quota(limits: Limits, quota: int = DISK_QUOTA) -> int:
    """The size of an object's tmpfs: ``quota``, but at most half its memory limit (tmpfs
    pages are charged to the object's memory cgroup: past the limit the OOM killer would
    answer a write that should fail with ENOSPC)."""
    if limits.memory_bytes:
        return max(MiB, min(quota, limits.memory_bytes // 2))
    return quota


def open_log(path: Path) -> int:
    """An append-only fd for an object's output, never following a symlink (the object
    may own the directory the log is in). The caller closes it after spawn()."""
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                   0o640)


def interpreter_paths(argv: Sequence[str]) -> list[str]:
    """What the object's program needs to be found once its private /tmp covers the
    router's: the virtual environment its interpreter belongs to (a checkout under /tmp, as
    CI clones one, has its ``.venv`` there), else the program itself. Code, never secrets."""
    if not argv or not os.path.isabs(argv[0]):
        return []
    venv = os.path.dirname(os.path.dirname(argv[0]))
    if os.path.exists(os.path.join(venv, "pyvenv.cfg")):
        return [venv]
    return [argv[0]]


def minimal_env(workdir: Path, private_tmp: bool = True, **extra: str) -> dict[str, str]:
    """PATH, HOME (the working directory), TMPDIR (the private /tmp, or the working directory
    where the object shares the router's /tmp: ``private_tmp`` False), a UTF-8 locale."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(workdir),
           "TMPDIR": "/tmp" if private_tmp else str(workdir), "LANG": "C.UTF-8",
           "LC_ALL": "C.UTF-8"}
    env.update(extra)
    return env


# --- spawning ----------------------------------------------------------------------------


@dataclass
class SandboxSpec:
    """How one object runs. ``rlimits`` maps resource names without ``RLIMIT_`` (NOFILE,
    FSIZE, CORE, AS, ...) to (soft, hard); ``env`` None means :func:`minimal_env`.
    ``uid``/``gid`` are the object's own (never 0); ``disk_bytes`` None means
    :func:`disk_quota` of ``limits``; ``expose``: paths under /tmp the object must still read
    once its private /tmp covers the router's (its code; PYTHONPATH entries are added)."""

    workdir: Path
    uid: int
    gid: int
    limits: Limits = field(default_factory=Limits)
    rlimits: dict[str, tuple[int, int]] = field(default_factory=lambda: dict(DEFAULT_RLIMITS))
    env: dict[str, str] | None = None
    pass_fds: tuple[int, ...] = ()
    umask: int = 0o077
    extra_groups: tuple[int, ...] = ()
    isolate_fs: bool = True  # everything read-only but its tmpfs (private mount namespace)
    isolate_pids: bool = True  # its own PID namespace and /proc
    disk_bytes: int | None = None
    disk_inodes: int = DISK_INODES
    expose: tuple[str, ...] = ()
    no_new_privs: bool = True
    die_with_agent: bool = True
    #: A root-only Unix socket path: the relay outlives the agent and listens there for the
    #: next one (:func:`attach_relay`), holding ``keep_fd`` (the agent's end of the object's
    #: channel) so the object never reads end of stream; needs ``isolate_pids``.
    relay_socket: Path | None = None
    keep_fd: int | None = None
    #: "fork" or "exec" (:data:`START_MODES`); None: :func:`start_mode`'s default.
    start: str | None = None
    #: The prepared launcher of the sandbox slot this start took
    #: (:func:`agent.hosting.sandbox_pool.take_launcher`): the fork path hands the object to
    #: it when it fits the spec; :func:`spawn` closes it otherwise. Used once.
    prepared: Any = None

    def launch_spec(self, argv: Sequence[str], cgroup: Cgroup | None) -> dict[str, Any]:
        for name in self.rlimits:
            if not hasattr(resource, "RLIMIT_" + name):
                raise SandboxError(f"unknown rlimit {name}")
        if self.uid <= 0 or self.gid <= 0:
            raise SandboxError(f"an object never runs as uid {self.uid} / gid {self.gid}")
        env = self.env if self.env is not None else minimal_env(self.workdir, self.isolate_fs)
        expose = [*self.expose, *(p for p in env.get("PYTHONPATH", "").split(":") if p),
                  *interpreter_paths(argv)]
        return {
            "argv": list(argv),
            "env": env,
            "cwd": str(self.workdir),
            "uid": self.uid, "gid": self.gid, "groups": list(self.extra_groups),
            "umask": self.umask,
            "cgroup_procs": [str(p) for p in cgroup.procs_files()] if cgroup else [],
            "rlimits": {k: list(v) for k, v in self.rlimits.items()},
            "pass_fds": list(self.pass_fds),
            "isolate_fs": self.isolate_fs, "isolate_pids": self.isolate_pids,
            "disk_bytes": self.disk_bytes if self.disk_bytes is not None else disk_quota(self.limits),
            "disk_inodes": self.disk_inodes, "expose": expose,
            "no_new_privs": self.no_new_privs,
            "parent_pid": os.getpid() if self.die_with_agent and self.relay_socket is None else 0,
        }


def tracing() -> bool:
    """Whether starts record their steps' times (:data:`ENV_START_TRACE`)."""
    return os.environ.get(ENV_START_TRACE) == "1"


def start_mode(spec: SandboxSpec | None = None) -> str:
    """How ``spec``'s object starts: its own ``start``, else ``$MOAT_SANDBOX_START``, else
    :data:`DEFAULT_START`. SandboxError for anything but :data:`START_MODES`."""
    mode = (spec.start if spec is not None else None) or os.environ.get(ENV_SANDBOX_START) \
        or DEFAULT_START
    if mode not in START_MODES:
        raise SandboxError(f"sandbox start {mode!r} is not one of {', '.join(START_MODES)}")
    return mode


async def spawn(argv: Sequence[str], spec: SandboxSpec, cgroup: Cgroup | None = None, *,
                stdin: Any = DEVNULL, stdout: Any = DEVNULL, stderr: Any = DEVNULL,
                trace: list[tuple[str, float]] | None = None
                ) -> tuple[asyncio.subprocess.Process, int]:
    """Start ``argv`` under ``spec`` in ``cgroup``; returns once the object's program runs:
    the launcher's process (the relay, whose exit status is the object's) and the object's
    pid as the agent sees it (the relay's own with ``isolate_pids`` off).

    stdin/stdout/stderr take what :func:`asyncio.create_subprocess_exec` takes (DEVNULL by
    default; an fd from :func:`open_log` for a log file; PIPE). ``trace``: a list that gets
    ``(stage, monotonic seconds)`` of each step, the agent's and the launcher's (the
    benchmark's breakdown, :data:`ENV_START_TRACE`)."""
    if not argv:
        raise SandboxError("empty argv")
    if os.geteuid() != 0:
        raise SandboxError("controlled exec needs root (to join cgroups and change user)")
    mode = start_mode(spec)
    launch = spec.launch_spec(argv, cgroup)
    # The start's slot's prepared launcher (issue 14), if it has one: the fork path uses it
    # when it fits, anything else closes it.
    prepared, spec.prepared = spec.prepared, None
    if prepared is not None and mode != "fork":
        prepared.close()
        prepared = None
    if trace is not None:
        launch["trace"] = []
        trace.append(("spawn", time.monotonic()))
    relay_fds: tuple[int, ...] = ()
    listener = None
    if spec.relay_socket is not None:
        if not spec.isolate_pids:
            raise SandboxError("an object outlives its agent only through a relay (isolate_pids)")
        listener = listen_relay_socket(spec.relay_socket)
        relay_fds = (listener.fileno(),) + ((spec.keep_fd,) if spec.keep_fd is not None else ())
        launch["relay"] = {"listen": listener.fileno(), "keep": spec.keep_fd}
    try:
        payload = json.dumps(launch).encode()
        if len(payload) > MAX_SPEC_BYTES:
            raise SandboxError(f"sandbox spec too large ({len(payload)} bytes)")
        if mode == "fork":
            from agent.hosting.forkserver import ForkServerError, start_forked

            try:
                proc, status_r = await start_forked(launch, spec.pass_fds, launch.get("relay"),
                                                    stdin, stdout, stderr, env=launcher_env(),
                                                    launcher=prepared)
                prepared = None
            except ForkServerError as exc:
                raise SandboxError(f"cannot fork {argv[0]} in its sandbox: {exc}") from exc
        else:
            proc, status_r = await _exec_launcher(payload, spec, relay_fds, stdin=stdin,
                                                  stdout=stdout, stderr=stderr)
        if trace is not None:
            trace.append(("launched", time.monotonic()))
        return await _started(argv, spec, proc, status_r, trace)
    finally:
        if prepared is not None:  # (a failure before it was handed on)
            prepared.close()
        if listener is not None:
            listener.close()  # the relay holds it now


def listen_relay_socket(path: Path) -> socket.socket:
    """A listening Unix socket at ``path`` (replacing a stale one), mode 0600, for a relay.
    Its directory must be root's and private: only root may connect (the relay also checks
    the peer's uid)."""
    path = Path(path)
    if len(os.fsencode(path)) >= 108:
        raise SandboxError(f"relay socket path too long: {path}")
    st = path.parent.stat()
    if st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise SandboxError(f"{path.parent} must be private (0700, uid {os.geteuid()})")
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(4)
    except OSError as exc:
        sock.close()
        raise SandboxError(f"relay socket {path}: {exc}") from None
    return sock


async def _exec_launcher(payload: bytes, spec: SandboxSpec, relay_fds: tuple[int, ...], *,
                         stdin: Any, stdout: Any, stderr: Any) -> tuple[Any, int]:
    """The exec path: a new launcher interpreter, the spec on a pipe. Returns the launcher's
    process and the read end of its status pipe."""
    spec_r, spec_w = os.pipe()
    status_r, status_w = os.pipe()
    try:
        os.write(spec_w, payload)
    finally:
        os.close(spec_w)
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-I", "-S", str(LAUNCHER), str(spec_r), str(status_w),
            stdin=stdin, stdout=stdout, stderr=stderr, close_fds=True,
            pass_fds=(spec_r, status_w, *spec.pass_fds, *relay_fds), start_new_session=True,
            cwd="/", env=launcher_env(),
        )
    except OSError as exc:
        os.close(status_r)
        raise SandboxError(f"cannot start the sandbox launcher: {exc}") from exc
    finally:
        os.close(spec_r)
        os.close(status_w)
    return proc, status_r


async def _started(argv: Sequence[str], spec: SandboxSpec, proc: Any, status_r: int,
                   trace: list[tuple[str, float]] | None = None) -> tuple[Any, int]:
    """Either path: read the launcher's status pipe to its end (the object's program runs)
    or to its first failure."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader),
                                                os.fdopen(status_r, "rb", 0))
    try:
        report = await asyncio.wait_for(reader.read(), SPAWN_TIMEOUT)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise SandboxError(f"sandbox launcher for {argv[0]} hung for {SPAWN_TIMEOUT}s") from None
    finally:
        transport.close()
    if trace is not None:
        trace.extend(read_trace(report))
        trace.append(("started", time.monotonic()))
    object_pid, error = _read_report(report)
    if error is not None or (spec.isolate_pids and object_pid is None):
        await proc.wait()
        error = error or {"stage": "pid namespace", "error": "the launcher named no process"}
        raise SandboxError(f"cannot start {argv[0]} in its sandbox ({error.get('stage')}): "
                           f"{error.get('error')}")
    return proc, object_pid if object_pid is not None else proc.pid


def existing_cgroup(manager: CgroupManager | None, name: str) -> Cgroup | None:
    """A handle on object cgroup ``name`` if it exists already (never makes one)."""
    if manager is None or manager.version is CgroupVersion.NONE:
        return None
    parent = manager.objects_cgroup()
    if not name.startswith(manager.prefix) or not all((d / name).is_dir() for d in parent.dirs):
        return None
    return type(parent).create(parent, name, exist_ok=True)


def launcher_env() -> dict[str, str]:
    """The launcher's (and so the relay's) whole environment: PATH, and the run's id, by
    which ``moat clean`` finds a relay that outlived its agent (the object dies with it)."""
    env = {"PATH": "/usr/bin:/bin"}
    if os.environ.get(ENV_RUN_ID):
        env[ENV_RUN_ID] = os.environ[ENV_RUN_ID]
    return env


def _read_report(report: bytes) -> tuple[int | None, dict[str, Any] | None]:
    """The launcher's status lines: the object's pid ({"pid"}) and the first failure."""
    pid, error = None, None
    for line in report.splitlines():
        try:
            info = json.loads(line)
        except ValueError:
            info = None
        if not isinstance(info, dict):
            error = error or {"stage": "?", "error": line.decode(errors="replace")}
        elif set(info) == {"pid"} and isinstance(info["pid"], int) and info["pid"] > 0:
            pid = info["pid"]
        elif set(info) == {"trace"}:
            continue  # read_trace's
        else:
            error = error or info
    return pid, error


def read_trace(report: bytes) -> list[tuple[str, float]]:
    """The launcher's stamps (its ``{"trace": [[stage, seconds], ...]}`` line), in order;
    anything malformed is left out (they only ever explain a figure)."""
    out: list[tuple[str, float]] = []
    for line in report.splitlines():
        try:
            info = json.loads(line)
        except ValueError:
            continue
        stamps = info.get("trace") if isinstance(info, dict) else None
        if not isinstance(stamps, list):
            continue
        for item in stamps:
            if isinstance(item, list) and len(item) == 2 and isinstance(item[0], str) \
                    and isinstance(item[1], (int, float)) and not isinstance(item[1], bool):
                out.append((item[0][:40], float(item[1])))
    return out


# --- a relay that outlives its agent -------------------------------------------------------

RELAY_TIMEOUT = 5.0


def proc_start_time(pid: int, proc: Path = Path("/proc")) -> int | None:
    """The start time (clock ticks since boot) of live process ``pid``; None when it is gone
    or a zombie. A pid and its start time name one process: a pid reused later differs."""
    try:
        stat_text = (proc / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = stat_text.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


class RelayLink:
    """The agent's connection to an object's relay (:func:`attach_relay`): it hears how the
    object ended (the relay is not the agent's child any more) and may ``release`` it."""

    def __init__(self, sock: socket.socket, relay_pid: int) -> None:
        self.sock = sock
        self.relay_pid = relay_pid
        self.returncode: int | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task | None = None
        self.done = asyncio.Event()

    async def watch(self) -> None:
        self._reader, self._writer = await asyncio.open_unix_connection(sock=self.sock)
        self._task = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        assert self._reader is not None
        try:
            while self.returncode is None:
                line = await self._reader.readline()
                if not line:
                    break
                self.returncode = exit_status(line)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            if self.returncode is None:
                # The relay went without a word: killed (SIGKILL to it or to the cgroup).
                await wait_until_gone(self.relay_pid)
                self.returncode = -9
            self.done.set()

    async def release(self) -> None:
        """The relay closes its copy of the agent's end of the channel."""
        if self._writer is not None and not self._writer.is_closing():
            try:
                self._writer.write(b"release\n")
                await self._writer.drain()
            except (OSError, RuntimeError):
                pass

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._writer is not None:
            self._writer.close()
        else:
            self.sock.close()


async def wait_until_gone(pid: int, timeout: float = 2.0) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while proc_start_time(pid) is not None:
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def _connect_relay(path: Path, timeout: float) -> tuple[socket.socket, dict[str, Any], int | None]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(str(path))
        data, fds, _flags, _addr = socket.recv_fds(sock, 4096, 1)
        hello = json.loads(data) if data.endswith(b"\n") else None
        if not isinstance(hello, dict) or not isinstance(hello.get("pid"), int):
            for fd in fds:
                os.close(fd)
            raise SandboxError(f"relay at {path} said {data[:80]!r}")
        sock.settimeout(None)
        return sock, hello, (fds[0] if fds else None)
    except (OSError, ValueError) as exc:
        sock.close()
        raise SandboxError(f"cannot reach the relay at {path}: {exc}") from None
    except BaseException:
        sock.close()
        raise


async def attach_relay(path: Path, relay_pid: int, object_pid: int,
                       timeout: float = RELAY_TIMEOUT) -> tuple[RelayLink, socket.socket | None]:
    """Connect to the relay of a running object (one that outlived the agent that started
    it): a :class:`RelayLink` and the agent's end of the object's channel (None if the relay
    released it). SandboxError if the relay is not the one recorded (``relay_pid``,
    ``object_pid``) or does not answer."""
    sock, hello, fd = await asyncio.to_thread(_connect_relay, Path(path), timeout)
    channel = socket.socket(fileno=fd) if fd is not None else None
    if hello.get("pid") != object_pid or hello.get("relay") != relay_pid:
        sock.close()
        if channel is not None:
            channel.close()
        raise SandboxError(f"relay at {path} runs pid {hello.get('pid')} (relay "
                           f"{hello.get('relay')}), not {object_pid} (relay {relay_pid})")
    link = RelayLink(sock, relay_pid)
    await link.watch()
    return link, channel


class AdoptedRelay:
    """What :class:`ObjectSandbox` needs of a relay that is not the agent's child: its pid,
    the object's status once it ended (told by the relay over the :class:`RelayLink`)."""

    def __init__(self, pid: int, link: RelayLink) -> None:
        self.pid = pid
        self.link = link

    @property
    def returncode(self) -> int | None:
        return self.link.returncode

    async def wait(self) -> int:
        await self.link.done.wait()
        assert self.link.returncode is not None
        return self.link.returncode


# --- one object ---------------------------------------------------------------------------


class ObjectSandbox:
    """One object: its cgroup, its process, its measurements and how it ended.

        sandbox = ObjectSandbox("counter", spec, manager)
        proc = await sandbox.start(argv, stdout=log_fd, stderr=log_fd)
        ... sandbox.usage() ...
        await sandbox.wait(); sandbox.exit_reason()
        await sandbox.close()          # always (kills leftovers, removes the cgroup)
    """

    def __init__(self, name: str, spec: SandboxSpec, manager: CgroupManager | None) -> None:
        self.name = name
        self.spec = spec
        self.manager = manager
        self.cgroup: Cgroup | None = None
        self.proc: asyncio.subprocess.Process | None = None
        self._object_pid: int | None = None
        self._base: dict[str, int] = {}
        self._final: dict[str, Any] | None = None
        self._closed = False
        #: ``(stage, monotonic seconds)`` of this start's steps when asked for (a list, set
        #: by the caller or by :data:`ENV_START_TRACE`); None: not recorded.
        self.trace: list[tuple[str, float]] | None = [] if tracing() else None
        #: How it started: "exec", "fork" (a launcher the fork server forked for it) or
        #: "prepared" (its sandbox slot's prepared launcher); None until it has.
        self.started_by: str | None = None

    async def __aenter__(self) -> ObjectSandbox:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def pid(self) -> int | None:
        """The object's main process as the agent sees it (PID 1 of its namespace inside)."""
        return self._object_pid

    def relay_record(self) -> dict[str, Any]:
        """What identifies this object's processes for a later agent: the relay's pid and
        start time, the object's pid, the cgroup's name and the relay's socket."""
        relay = self.proc.pid if self.proc is not None else None
        return {"relay_pid": relay, "relay_start": proc_start_time(relay) if relay else None,
                "object_pid": self._object_pid,
                "cgroup": self.cgroup.name if self.cgroup is not None else None,
                "socket": str(self.spec.relay_socket) if self.spec.relay_socket else None}

    @classmethod
    async def adopt(cls, name: str, spec: SandboxSpec, manager: CgroupManager | None,
                    record: dict[str, Any]) -> tuple[ObjectSandbox, socket.socket | None]:
        """The sandbox of an object an earlier agent started (``record``: its
        :meth:`relay_record`), once it is proven the same: the relay runs with the recorded
        start time, sits in the object's cgroup and names the recorded object. Returns it
        with the agent's end of the object's channel. SandboxError otherwise (nothing kept)."""
        relay, start, obj = record.get("relay_pid"), record.get("relay_start"), record.get("object_pid")
        path = record.get("socket")
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (relay, start, obj)) \
                or not isinstance(path, str):
            raise SandboxError(f"object {name}: no relay recorded")
        if proc_start_time(relay) != start:
            raise SandboxError(f"object {name}: its relay (pid {relay}) has gone")
        sandbox = cls(name, spec, manager)
        cg_name = record.get("cgroup")
        if cg_name is not None:
            sandbox.cgroup = existing_cgroup(manager, str(cg_name))
            if sandbox.cgroup is None or relay not in sandbox.cgroup.procs():
                raise SandboxError(f"object {name}: relay {relay} is not in cgroup {cg_name}")
        link, channel = await attach_relay(Path(path), relay, obj)
        sandbox.proc = AdoptedRelay(relay, link)  # type: ignore[assignment]
        sandbox._object_pid = obj
        return sandbox, channel

    async def release_channel(self) -> None:
        """Tell the relay (if any) to let go of the agent's end of the channel, so closing
        ours is an end of stream the object reads (it stops)."""
        if self.spec.relay_socket is None or self.proc is None or self.proc.returncode is not None:
            return
        if isinstance(self.proc, AdoptedRelay):
            await self.proc.link.release()
            return
        try:
            sock, _hello, fd = await asyncio.to_thread(_connect_relay, self.spec.relay_socket, 1.0)
        except SandboxError as exc:
            log.debug("object %s: %s", self.name, exc)
            return
        if fd is not None:
            os.close(fd)
        try:
            await asyncio.to_thread(sock.sendall, b"release\n")
        except OSError:
            pass
        finally:
            sock.close()

    def _counters(self) -> dict[str, int | None]:
        cg = self.cgroup
        if cg is None or not cg.exists():
            return {"oom_kills": None, "memory_limit_hits": None, "pids_limit_hits": None}
        return {"oom_kills": cg.oom_kills(), "memory_limit_hits": cg.memory_limit_hits(),
                "pids_limit_hits": cg.pids_limit_hits()}

    async def start(self, argv: Sequence[str], **stdio: Any) -> asyncio.subprocess.Process:
        if self.proc is not None:
            raise SandboxError(f"object {self.name} already started")
        if self.trace is not None:
            self.trace.append(("sandbox", time.monotonic()))
        try:
            if self.manager is not None and self.manager.version is not CgroupVersion.NONE:
                # (a prepared slot's, made empty ahead under this name: sandbox_pool, issue 14;
                # its prepared launcher may wait in it already: it runs nothing of the
                # object's before these limits are written)
                self.cgroup = self.manager.create(self.name, self.spec.limits)
            elif not self.spec.limits.is_empty():
                raise SandboxError(f"object {self.name} has limits but there are no usable cgroups")
            else:
                log.warning("object %s runs without a cgroup (no limits, no measurements)",
                            self.name)
            self._base = {k: v or 0 for k, v in self._counters().items()}
            prepared = self.spec.prepared
            self.proc, self._object_pid = await spawn(argv, self.spec, self.cgroup,
                                                      trace=self.trace, **stdio)
            self.started_by = ("prepared" if prepared is not None
                               and self.proc.pid == prepared.pid else start_mode(self.spec))
        except BaseException:
            prepared, self.spec.prepared = self.spec.prepared, None
            if prepared is not None:  # (spawn was not reached)
                prepared.close()
            await self.close()
            raise
        return self.proc

    def usage(self) -> dict[str, float | int | None]:
        """CPU seconds, memory now and at peak, and processes: live, or the last reading."""
        if self._final is not None and (self.cgroup is None or not self.cgroup.exists()):
            return dict(self._final["usage"])
        if self.cgroup is None:
            return {"cpu_seconds": None, "memory_bytes": None, "memory_peak_bytes": None,
                    "pids": None}
        return self.cgroup.usage()

    async def wait(self, timeout: float | None = None) -> int:
        """The object's exit status, once its main process has exited."""
        if self.proc is None:
            raise SandboxError(f"object {self.name} was not started")
        rc = await asyncio.wait_for(self._exited(), timeout)
        self._snapshot(rc)
        return rc

    async def _exited(self) -> int:
        # Process.wait() of Python < 3.12 also waits for the stdio pipes to close, which
        # never happens while a child the object left behind holds them: watch returncode.
        assert self.proc is not None
        waiter = asyncio.ensure_future(self.proc.wait())
        try:
            while self.proc.returncode is None and not waiter.done():
                await asyncio.wait({waiter}, timeout=0.02)
        finally:
            if not waiter.done():
                waiter.cancel()
        assert self.proc.returncode is not None
        return self.proc.returncode

    def _snapshot(self, rc: int) -> None:
        if self._final is not None:
            return
        self._final = {"returncode": rc, "usage": self.usage(), **self._counters()}

    def exit_info(self) -> dict[str, Any] | None:
        """None while running; else returncode, usage, the counters and the reason."""
        if self._final is None:
            return None
        return dict(self._final, reason=self.exit_reason())

    def exit_reason(self) -> str | None:
        f = self._final
        if f is None:
            return None
        rc = f["returncode"]
        oom, hits, pids = f["oom_kills"], f["memory_limit_hits"], f["pids_limit_hits"]
        if oom is not None and oom > self._base.get("oom_kills", 0):
            return "killed: oom"
        if oom is None and rc == -9 and (hits or 0) > self._base.get("memory_limit_hits", 0):
            return "killed: oom"  # a kernel without the oom_kill counter (v1, < 4.13)
        if (pids or 0) > self._base.get("pids_limit_hits", 0):
            return "pids limit"
        if rc < 0:
            return f"killed: signal {-rc}"
        return "exited"

    async def kill(self) -> None:
        """SIGKILL the object and every process it made."""
        if self.cgroup is not None and self.cgroup.exists():
            await asyncio.to_thread(self.cgroup.kill_all)
        elif self.proc is not None and self.proc.returncode is None:
            # The relay: the agent's unreaped child, so its pid cannot have been reused (an
            # adopted one is alive with its recorded start time while its link is open); the
            # object dies with it (PR_SET_PDEATHSIG), and its namespace with the object.
            adopted = isinstance(self.proc, AdoptedRelay)
            from agent.hosting.forkserver import ForkedProcess

            if isinstance(self.proc, ForkedProcess):
                self.proc.kill()  # a forked launcher is not our child: through its pidfd
            elif not adopted or proc_start_time(self.proc.pid) is not None:
                try:
                    os.killpg(self.proc.pid, 9)
                except ProcessLookupError:
                    pass
        if self.proc is not None:
            self._snapshot(await self._exited())

    async def close(self) -> None:
        """Kill whatever is left, read the last figures, remove the cgroup. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.proc is not None:
                if self.proc.returncode is None:
                    await self.kill()
                else:
                    self._snapshot(await self._exited())
        finally:
            if isinstance(self.proc, AdoptedRelay):
                await self.proc.link.close()
            if self.spec.relay_socket is not None:
                try:
                    Path(self.spec.relay_socket).unlink()
                except OSError:
                    pass
            if self.cgroup is not None:
                try:
                    await asyncio.to_thread(self.cgroup.remove)
                except CgroupError as exc:
                    log.warning("object %s: %s", self.name, exc)
                    raise
