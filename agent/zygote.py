"""The agent zygote: every router's supervisor and agent forked from one pre-imported
process instead of a new interpreter each (issue 15, item 1).

Exec'ing ``python -m agent.supervisor -- python -m agent ...`` per router costs two
interpreter starts and the agent's imports (about 0.7 s of CPU: scapy, cryptography, the
roles) per router, and each agent then holds 63-70 MiB of its own. With 100 routers on two
cores that is 35 s of imports alone and about 7 GiB. The zygote is one root process per run
(started by :class:`topologies.moatnet.MoatNetwork`, in the root namespaces, with the run's
environment, so ``moat clean`` finds it and everything forked from it by ``MOAT_RUN_ID``),
which imports the agent once and freezes the garbage collector's view of it (``gc.freeze``:
a forked child never walks, and so never copies, those objects). On each request it forks a
child that

1. leads a session of its own (the node's daemon group, which the node stops as a whole),
2. enters the router node's network and mount namespaces (``setns`` on
   ``/proc/<node shell>/ns/{net,mnt}``, what ``mnexec -a`` does), mounts the host's cgroup
   hierarchies there if the node has none yet (:func:`mount_cgroups`: ``mount(2)`` in-process,
   where the node's shell forked ``mkdir`` and ``mount`` 26 times), then its cwd, umask,
   environment and stdio (stdout and stderr onto the node's daemon log, passed as an fd),
3. runs :func:`agent.supervisor.main` in-process with a ``spawn`` that forks the agent from
   this same memory (:func:`fork_agent`) and calls :func:`agent.__main__.main` there.

scapy's interface and route tables in the forked agent are the zygote's (root namespace's),
read at import; re-reading them would copy about 7 MiB per router. The agent never consults
them: it builds its ARP frames with every address given and sends them on raw sockets bound
to its own interfaces (:mod:`agent.mobility.arp`).

So a router's supervisor and agent are a fork and a fork, not two execs: the pages the
imports made stay shared copy-on-write between the zygote and every router's processes,
and what an agent costs is what it writes (its roles' state, the pages its reference counts
touch). A killed agent is forked again by its supervisor (whose memory is the zygote's as
imported: it never runs agent code), not exec'd.

The zygote holds no secret (each agent reads its own root-only configuration after the
fork) and is reachable only through the socketpair its starter holds (:class:`Zygote`). It
reports how each forked supervisor ended on a pipe the starter passed with the request, and
exits when its starter closes the socket; supervisors it forked run on without it.

``MOAT_AGENT_START=exec`` in the starter's environment turns it off (each router's agent is
exec'd as before: the baseline ``moat bench scale`` measures beside it).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from agent.core.as_main import run_and_exit
from agent.core.errors import AgentError

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
#: Imported once by the zygote, so every forked agent starts with them loaded: the agent,
#: and what it imports later, at its start (the tunnel backends and pyroute2, about 10 MiB
#: and 0.1 s of CPU an agent when each imports them itself).
PREIMPORT = ("agent.__main__", "agent.roles", "agent.supervisor", "agent.core.daemon")
#: ... and, when they import here, what it imports later, at its start (the tunnel backends
#: and pyroute2): a module missing or failing here is the agent's to report, not the zygote's.
PREIMPORT_OPTIONAL = ("agent.mobility.tunnel.choose", "agent.mobility.tunnel.userspace",
                      "agent.mobility.tunnel.kernel", "agent.mobility.tunnel.ebpf", "pyroute2",
                      "logging.handlers", "sqlite3", "multiprocessing", "resource", "ctypes.util")
#: ``MOAT_AGENT_START``: ``fork`` (the zygote, default) or ``exec`` (an interpreter per agent).
ENV_START = "MOAT_AGENT_START"
START_MODES = ("fork", "exec")
START_TIMEOUT = 60.0  # the zygote's own start: one interpreter and the agent's imports
REQUEST_TIMEOUT = 10.0
MAX_MESSAGE = 256 * 1024
CLONE_NEWNS, CLONE_NEWNET = 0x00020000, 0x40000000
#: Where a node's cgroup hierarchies are mounted, and the filesystems a request may mount there.
CGROUP_ROOT = "/sys/fs/cgroup"
MOUNT_TYPES = ("tmpfs", "cgroup", "cgroup2")
PR_SET_NAME = 15
#: Signals the supervisor handles: blocked across a fork so its handler never runs in a
#: child that is about to become an agent.
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _private_log(path: str | os.PathLike[str]) -> Any:
    """``path`` for appending, 0600 from its creation and never through a symbolic link: the
    zygote's output lands in the run directory, which only root may read (a traceback may
    carry what a configuration holds)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    return os.fdopen(fd, "ab")


class ZygoteError(AgentError):
    """The zygote could not be started, refused a request or did not answer."""


def start_mode(env: dict[str, str] | None = None) -> str:
    """How routers' agents start (``MOAT_AGENT_START``); ZygoteError for anything else."""
    mode = (env if env is not None else os.environ).get(ENV_START, "fork") or "fork"
    if mode not in START_MODES:
        raise ZygoteError(f"{ENV_START}={mode!r}: must be one of {', '.join(START_MODES)}")
    return mode


# --- in the zygote and its children ----------------------------------------------------------

_libc: Any = None


def _c() -> Any:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
        _libc.prctl.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_ulong,
                                ctypes.c_ulong]
    return _libc


def setns(fd: int, nstype: int) -> None:
    """``setns(2)`` (``os.setns`` is Python 3.12's)."""
    if _c().setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def set_name(name: str) -> None:
    """The process's ``comm`` (what ``ps`` and ``top`` show): a forked process keeps the
    zygote's command line, so its name says what it is (``sup-r22b``, ``agent-r22b``)."""
    _c().prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)


def enter_node(netns_pid: int) -> None:
    """Join the network and mount namespaces of process ``netns_pid`` (a Mininet node's
    shell), as ``mnexec -a`` does. Single-threaded callers only (a mount namespace refuses
    a process that shares its filesystem state)."""
    net = os.open(f"/proc/{netns_pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        mnt = os.open(f"/proc/{netns_pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        try:
            setns(net, CLONE_NEWNET)
            setns(mnt, CLONE_NEWNS)
        finally:
            os.close(mnt)
    finally:
        os.close(net)


def is_agent_argv(argv: list[str]) -> bool:
    """``<this python> -m agent ...``: an agent this process can run in-process."""
    return len(argv) >= 3 and argv[1:3] == ["-m", "agent"] \
        and os.path.normpath(argv[0]) == os.path.normpath(sys.executable)


def fork_agent(argv: list[str]) -> Any:
    """The supervisor's ``spawn`` in a forked supervisor: the agent forked from this
    process's memory and run by :func:`agent.__main__.main`; any other argv is exec'd."""
    from agent import supervisor

    if not is_agent_argv(argv):
        return supervisor.popen_child(argv)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    pid = os.fork()
    if pid == 0:
        def agent_main() -> int | None:
            signal.set_wakeup_fd(-1)
            for sig in (*_STOP_SIGNALS, signal.SIGCHLD):
                signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
            node = os.environ.get("MOAT_NODE", "")
            set_name(f"agent-{node}" if node else "agent")
            sys.argv = ["python -m agent", *argv[3:]]
            return sys.modules["agent.__main__"].main(argv[3:])

        run_and_exit(agent_main)
    signal.pthread_sigmask(signal.SIG_SETMASK, old)
    return supervisor.ForkedChild(pid)


def check_request(req: Any) -> dict[str, Any]:
    """A spawn request, validated (ValueError says what is wrong). Pure, for unit tests.

    ``argv`` must be ``<this python> -m agent.supervisor ...`` (the only program the zygote
    runs in-process); ``netns_pid`` a positive pid; ``env`` strings to strings; ``cwd`` an
    absolute path or None; ``umask`` 0..0o777; ``node`` a short name."""
    if not isinstance(req, dict):
        raise ValueError("request must be an object")
    argv = req.get("argv")
    if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv) or len(argv) < 4 \
            or argv[1:3] != ["-m", "agent.supervisor"] \
            or os.path.normpath(argv[0]) != os.path.normpath(sys.executable):
        raise ValueError(f"argv must be {sys.executable} -m agent.supervisor ..., got {argv!r}")
    pid = req.get("netns_pid")
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        raise ValueError(f"netns_pid must be a positive int, got {pid!r}")
    env = req.get("env")
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) and k
                                            and "=" not in k for k, v in env.items()):
        raise ValueError("env must map names to strings")
    cwd = req.get("cwd")
    if cwd is not None and (not isinstance(cwd, str) or not cwd.startswith("/")):
        raise ValueError(f"cwd must be an absolute path or null, got {cwd!r}")
    umask = req.get("umask")
    if isinstance(umask, bool) or not isinstance(umask, int) or not 0 <= umask <= 0o777:
        raise ValueError(f"umask must be an int in 0..0o777, got {umask!r}")
    node = req.get("node")
    if not isinstance(node, str) or not 0 < len(node) <= 32 or not node.isprintable():
        raise ValueError(f"node must be a short name, got {node!r}")
    mounts = req.get("mounts") or []
    if not isinstance(mounts, list):
        raise ValueError("mounts must be a list")
    for m in mounts:
        if not isinstance(m, list) or len(m) != 4 or not all(isinstance(x, str) and "\0" not in x for x in m) \
                or m[0] not in MOUNT_TYPES or not (m[2] == CGROUP_ROOT or m[2].startswith(CGROUP_ROOT + "/")) \
                or ".." in m[2].split("/"):
            raise ValueError(f"mounts: each is [tmpfs|cgroup|cgroup2, source, target under "
                             f"{CGROUP_ROOT}, data], got {m!r}")
    return {"argv": argv, "netns_pid": pid, "env": env, "cwd": cwd, "umask": umask, "node": node,
            "mounts": mounts}


def mount_cgroups(mounts: list[list[str]]) -> str | None:
    """In a node's mount namespace: make the host's cgroup hierarchies visible there (what
    :func:`topologies.nodes.restore_cgroup_mounts` does through the node's shell), unless they
    are already. In-process ``mount(2)`` calls, no fork. Stops at the first failure and says
    it (objects on this router then run without cgroup limits), None when all went."""
    try:
        if os.listdir(CGROUP_ROOT):
            return None
    except OSError:
        pass
    from agent.hosting.sandbox_exec import mount

    for fstype, source, target, data in mounts:
        try:
            os.makedirs(target, exist_ok=True)
            mount(source, target, 0, fstype, data or None)
        except OSError as exc:
            return f"mount -t {fstype} {source} {target}: {exc.strerror or exc}"
    return None


class Server:
    """The zygote's loop: requests on its socket, and its children's ends."""

    def __init__(self, control: socket.socket) -> None:
        self.control = control
        #: child pid -> (its pidfd, the report fd the zygote writes its exit status on)
        self.children: dict[int, tuple[int, int]] = {}

    def serve(self) -> int:
        while True:
            fds = [self.control.fileno(), *(pidfd for pidfd, _ in self.children.values())]
            ready, _, _ = select.select(fds, [], [])
            for fd in ready:
                if fd == self.control.fileno():
                    if not self._request():
                        return 0
                else:
                    self._reap(fd)

    def _reap(self, pidfd: int) -> None:
        pid = next((p for p, (fd, _) in self.children.items() if fd == pidfd), None)
        if pid is None:
            return
        _, report = self.children.pop(pid)
        try:
            _, status = os.waitpid(pid, 0)
            code: int | None = os.waitstatus_to_exitcode(status)
        except ChildProcessError:
            code = None
        if code is not None:
            try:
                os.write(report, json.dumps({"exit": code}).encode() + b"\n")
            except OSError:
                pass
        os.close(report)
        os.close(pidfd)

    def _request(self) -> bool:
        """One spawn request: False at end of stream (the starter closed or died)."""
        try:
            data, fds, _flags, _addr = socket.recv_fds(self.control, MAX_MESSAGE, 2)
        except OSError as exc:
            log.error("zygote: reading a request: %s", exc)
            return False
        if not data:
            for fd in fds:
                os.close(fd)
            return False
        reply_fds: list[int] = []
        try:
            if len(fds) != 2:
                raise ValueError(f"a request passes 2 fds (log, report), got {len(fds)}")
            reply, reply_fds = self._spawn(check_request(json.loads(data)), fds[0], fds[1])
        except (ValueError, TypeError, OSError) as exc:
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            for fd in fds:
                os.close(fd)
        try:
            socket.send_fds(self.control, [json.dumps(reply).encode()], reply_fds)
        except OSError as exc:
            log.error("zygote: answering: %s", exc)
            return False
        finally:
            for fd in reply_fds:
                os.close(fd)
        return True

    def _spawn(self, req: dict[str, Any], log_fd: int, report_fd: int) -> tuple[dict[str, Any], list[int]]:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        pid = os.fork()
        if pid == 0:
            code = 127
            try:
                code = self._child(req, log_fd, report_fd)
            except BaseException:  # noqa: BLE001 - said on the node's log, then exit
                import traceback

                traceback.print_exc()
            finally:
                os._exit(code & 0xFF)
        pidfd = os.pidfd_open(pid)
        self.children[pid] = (pidfd, os.dup(report_fd))
        return {"pid": pid}, [os.pidfd_open(pid)]

    def _child(self, req: dict[str, Any], log_fd: int, report_fd: int) -> int:
        """The forked supervisor: the node's session, namespaces, stdio, environment; then
        the supervisor in-process. Never returns into the zygote's loop."""
        os.setsid()
        self.control.close()
        for pidfd, report in self.children.values():
            os.close(pidfd)
            os.close(report)
        enter_node(req["netns_pid"])
        mounted = mount_cgroups(req["mounts"])
        os.chdir(req["cwd"] or "/")
        os.umask(req["umask"])
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        for fd in (null, log_fd, report_fd):
            os.close(fd)
        os.environ.clear()
        os.environ.update(req["env"], MOAT_NODE=req["node"])
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        set_name(f"sup-{req['node']}")
        if mounted is not None:
            print(f"zygote: {req['node']}: mounting the host's cgroups: {mounted} (objects on "
                  "this router run without cgroup limits)", file=sys.stderr, flush=True)
        from agent import supervisor

        return supervisor.main(req["argv"][3:], spawn=fork_agent)


def serve_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent.zygote")
    parser.add_argument("--control-fd", type=int, required=True)
    args = parser.parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s zygote %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.propagate = False  # the root logger stays bare: each agent configures its own
    control = socket.socket(fileno=args.control_fd)
    started = time.monotonic()
    for name in PREIMPORT:
        importlib.import_module(name)
    for name in PREIMPORT_OPTIONAL:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - each agent imports it again and says why
            log.warning("not pre-imported: %s: %s", name, exc)
    gc.collect()
    gc.freeze()  # forked children never scan (and so never copy) what the imports made
    control.sendall(json.dumps({"ready": os.getpid(),
                                "import_s": round(time.monotonic() - started, 3)}).encode())
    set_name("moat-zygote")
    return Server(control).serve()


# --- the starter's side ------------------------------------------------------------------------


class ForkedDaemon:
    """A node's daemon forked by the zygote: what :class:`topologies.nodes.ManagedDaemonMixin`
    asks of its ``Popen`` (``pid``, ``poll``, ``wait``, ``returncode``). It is the zygote's
    child, not the caller's: a pidfd says when it ended, the zygote's report says how (255
    when the zygote went first and nobody heard)."""

    def __init__(self, pid: int, pidfd: int, report: int, args: list[str]) -> None:
        self.pid, self.args = pid, args
        self.returncode: int | None = None
        self._pidfd, self._report = pidfd, report

    def _collect(self) -> int:
        code = 255
        if select.select([self._report], [], [], 2.0)[0]:
            try:
                line = os.read(self._report, 256)
                doc = json.loads(line) if line else None
                if isinstance(doc, dict) and isinstance(doc.get("exit"), int):
                    code = doc["exit"]
            except (OSError, ValueError):
                pass
        for fd in (self._pidfd, self._report):
            try:
                os.close(fd)
            except OSError:
                pass
        self.returncode = code
        return code

    def poll(self) -> int | None:
        if self.returncode is not None:
            return self.returncode
        if not select.select([self._pidfd], [], [], 0)[0]:
            return None
        return self._collect()

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is not None:
            return self.returncode
        if not select.select([self._pidfd], [], [], timeout)[0]:
            raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
        return self._collect()


class Zygote:
    """The starter's handle on a run's zygote: :meth:`start` (non-blocking: it imports while
    Mininet builds), :meth:`spawn` per router (waits for it to be ready the first time),
    :meth:`stop` after the routers are down."""

    def __init__(self, env: dict[str, str], cwd: str | os.PathLike[str] = REPO,
                 log_path: str | os.PathLike[str] | None = None) -> None:
        self.env, self.cwd, self.log_path = dict(env), str(cwd), log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.import_s: float | None = None
        self._sock: socket.socket | None = None
        self._ready = False
        self._lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def start(self) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        out = _private_log(self.log_path) if self.log_path else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent.zygote", "--control-fd", str(theirs.fileno())],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, close_fds=True,
                pass_fds=(theirs.fileno(),), start_new_session=True, cwd=self.cwd, env=self.env)
        except OSError as exc:
            mine.close()
            raise ZygoteError(f"cannot start the agent zygote: {exc}") from exc
        finally:
            theirs.close()
            if out is not subprocess.DEVNULL:
                out.close()
        self._sock = mine

    def _wait_ready(self) -> socket.socket:
        if self._sock is None or self.proc is None:
            raise ZygoteError("the agent zygote is not running")
        if not self._ready:
            try:
                self._sock.settimeout(START_TIMEOUT)
                hello = json.loads(self._sock.recv(4096) or b"null")
                if not isinstance(hello, dict) or hello.get("ready") != self.proc.pid:
                    raise ValueError(f"said {hello!r}")
            except (OSError, ValueError) as exc:
                raise ZygoteError(f"the agent zygote did not start: {exc}") from None
            self.import_s = hello.get("import_s")
            self._ready = True
            log.info("agent zygote ready (pid %d, imports %.2f s)", self.proc.pid, self.import_s or 0)
        return self._sock

    def spawn(self, node: str, netns_pid: int, argv: list[str], log_fd: int,
              env: dict[str, str], cwd: str | None, umask: int,
              mounts: list[tuple[str, str, str, str]] | None = None) -> ForkedDaemon:
        """Fork ``argv`` (``python -m agent.supervisor ... -- python -m agent ...``) into the
        namespaces of ``netns_pid`` with stdout and stderr on ``log_fd``, after ``mounts``
        there ((fstype, source, target, data) under /sys/fs/cgroup) unless it has them."""
        payload = json.dumps({"argv": argv, "netns_pid": netns_pid, "env": env, "cwd": cwd,
                              "umask": umask, "node": node,
                              "mounts": [list(m) for m in mounts or []]}).encode()
        if len(payload) > MAX_MESSAGE:
            raise ZygoteError(f"{node}: spawn request too large ({len(payload)} bytes)")
        report_r, report_w = os.pipe()
        try:
            with self._lock:
                sock = self._wait_ready()
                try:
                    sock.settimeout(REQUEST_TIMEOUT)
                    socket.send_fds(sock, [payload], [log_fd, report_w])
                    data, fds, _flags, _addr = socket.recv_fds(sock, 65536, 1)
                except OSError as exc:
                    raise ZygoteError(f"{node}: the agent zygote did not answer: {exc}") from None
        except BaseException:
            os.close(report_r)
            raise
        finally:
            os.close(report_w)
        try:
            reply = json.loads(data or b"null")
        except ValueError:
            reply = None
        if not isinstance(reply, dict) or "pid" not in reply or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            os.close(report_r)
            error = reply.get("error") if isinstance(reply, dict) else f"said {data!r}"
            raise ZygoteError(f"{node}: the agent zygote refused: {error}")
        return ForkedDaemon(int(reply["pid"]), fds[0], report_r, argv)

    def stop(self, timeout: float = 5.0) -> None:
        """End the zygote (closing its socket ends it); supervisors it forked run on."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self.proc is not None:
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def current_umask() -> int:
    """This process's umask, read without changing it (``/proc/self/status``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# --- memory ---------------------------------------------------------------------------------------


def memory_kib(pid: int, proc: Path = Path("/proc")) -> dict[str, int] | None:
    """``{"rss": KiB, "pss": KiB}`` of ``pid`` from ``/proc/<pid>/smaps_rollup``, or None
    when it is gone. PSS divides each shared page among the processes that map it, so the
    PSS of a set of processes adds up to the memory they really take together."""
    try:
        text = (proc / str(pid) / "smaps_rollup").read_text()
    except OSError:
        return None
    return parse_smaps_rollup(text)


def parse_smaps_rollup(text: str) -> dict[str, int]:
    """``Rss:`` and ``Pss:`` (KiB) of a ``smaps_rollup``; ValueError if either is missing."""
    found: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("Rss", "Pss"):
            found[key.lower()] = int(rest.split()[0])
    if set(found) != {"rss", "pss"}:
        raise ValueError("smaps_rollup without Rss and Pss")
    return found


if __name__ == "__main__":
    sys.exit(serve_main())
