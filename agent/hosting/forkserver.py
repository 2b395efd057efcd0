"""The object fork server: objects forked from a pre-imported runtime instead of a new
interpreter per start (issue 14, item 1).

Starting ``python -m agent.hosting.runner`` through the controlled-exec launcher costs two
interpreter starts and the runner's imports per object (90 ms on a fast day here, 700 ms on
a slow one). A fork server is one root process per agent, started by it (lazily, at the
first forked start; again if it died), which has imported the runner and what it imports
once. On each request it forks a child that does exactly what the launcher does — the same
functions of :mod:`agent.hosting.sandbox_exec`: the object's cgroup in every hierarchy, the
PID namespace with its relay, the mount namespace and its tmpfs, rlimits, closing every fd
but the given ones, ``setgroups``/``setresgid``/``setresuid``, ``no_new_privs`` — and then,
for the object runtime (``<this python> -m agent.hosting.runner ...``), calls the runner's
``main`` in-process instead of ``execve``. Any other program is exec'd after the same steps.

Why the confinement stays equal:

* the child is the fork server's, which the agent started with an empty environment but
  ``PATH``, the run's id and this checkout on ``PYTHONPATH``, from ``/``, and which holds no
  secret: no key reaches it (credentials go over the object's socketpair after the start);
  requests carry what the launcher's spec pipe carries (argv, environment, paths);
* fds: the agent hands the object's stdio, its passed fds and the launch's own pipes over
  the server's socket (SCM_RIGHTS); the child puts them at the numbers the exec path would
  and both sweeps of :func:`~agent.hosting.sandbox_exec.close_other_fds` remove everything
  else (the server's socket, the agent's pidfd);
* after the credential change the object is made dumpable again (an ``execve`` would do
  that), so its ``/proc`` files are its own uid's, as on the exec path; no capability
  survives ``setresuid`` from root to a non-zero uid;
* the fork server is not reachable from an object: it is root, in the router's PID
  namespace (not in the object's), non-dumpable, and its socket is a socketpair only the
  agent holds.

Lifetime: the server watches its socket and exits when the agent closes it or dies. The
forked launcher is the server's child, not the agent's, so it watches the agent through a
pidfd (:class:`~agent.hosting.sandbox_exec.PidfdTie`) and the relay writes how the object
ended on a pipe the agent reads (:class:`ForkedProcess`). A relay that outlives the agent
(``relay_socket``) is tied to neither: the object survives the agent and the fork server.

The agent's side (:class:`ForkServer`, :func:`start_forked`) is synchronous under a lock,
run in a thread: it works from any event loop (tests run several).
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
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
from pathlib import Path
from typing import Any

from agent.core.as_main import run_and_exit
from agent.core.errors import AgentError
from agent.hosting import sandbox_exec

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
RUNNER = "agent.hosting.runner"
#: Imported once by the server, so a forked object starts with them loaded.
PREIMPORT = (RUNNER, "agent.objects.counter", "agent.objects.misbehaving")
START_TIMEOUT = 30.0  # the server's own start: one interpreter and the imports
REQUEST_TIMEOUT = 5.0
MAX_MESSAGE = 128 * 1024
MAX_PASS_FDS = 8
STDIO = ("stdin", "stdout", "stderr")


class ForkServerError(AgentError):
    """The fork server could not be started or did not answer."""


# --- the server (python -m agent.hosting.forkserver) ---------------------------------------


def _preimport() -> None:
    for name in PREIMPORT:
        importlib.import_module(name)
    _warm()


def _warm() -> None:
    """Pay once, here, what every forked object would otherwise pay in its first
    milliseconds: the runner parses its arguments (argparse's help formatter imports
    ``shutil``, which imports bz2, lzma and zlib, and compiles its regular expressions: about
    5 ms in each child) and starts an event loop (its lazy imports). Nothing of it stays
    open: the loop is closed again, the parser dropped."""
    parser = argparse.ArgumentParser(prog="warm")
    parser.add_argument("--name", required=True, help="a string")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--flag", action="store_true")
    parser.parse_args(["--name", "x", "--port", "1", "--flag"])
    asyncio.run(asyncio.sleep(0))


def _place_fds(fds: dict[str, Any], pass_targets: list[int]) -> dict[str, Any]:
    """In the forked child: stdio onto 0, 1, 2 and each passed fd onto the number the agent
    gave it (the object's argv names it: ``--control-fd N``), as the exec path's
    ``pass_fds`` does; the launch's own fds (status, report, the relay's, the agent's pidfd)
    above all of them, close-on-exec. Returns where those are now."""
    targets: dict[int, int] = {0: fds["stdin"], 1: fds["stdout"], 2: fds["stderr"]}
    for number, fd in zip(pass_targets, fds["pass"]):
        targets[number] = fd
    high = max(targets) + 1
    own = {k: fd for k, fd in fds.items() if k not in STDIO and k != "pass" and fd is not None}
    moved = {fd: fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, high)
             for fd in {*targets.values(), *own.values()}}
    for number, fd in targets.items():
        os.dup2(moved[fd], number, inheritable=number < 3)
    placed = {k: moved[fd] for k, fd in own.items()}
    for fd in set(moved.values()) - set(placed.values()):
        os.close(fd)
    return placed


def _python_path(env: dict[str, str]) -> list[str]:
    return [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]


class Server:
    """The server's state: its socket to the agent, the agent's pidfd, its children."""

    def __init__(self, control: socket.socket, agent_fd: int) -> None:
        self.control = control
        self.control_fd = control.fileno()
        self.agent_fd = agent_fd
        #: child pid -> (its pidfd, the report fd the server answers on, or None)
        self.children: dict[int, tuple[int, int | None]] = {}
        own = os.environ.get("PYTHONPATH", "")
        self.own_path = {os.path.realpath(p) for p in own.split(os.pathsep) if p}
        #: sys.path without what the server's PYTHONPATH put there: an object's own
        #: PYTHONPATH goes in front of this, as its interpreter would put it.
        self.base_path = [p for p in sys.path if os.path.realpath(p) not in self.own_path]

    def serve(self) -> int:
        poller = select.poll()
        poller.register(self.control, select.POLLIN)
        while True:
            for fd, _ev in poller.poll():
                if fd == self.control.fileno():
                    if not self._request():
                        return 0
                else:
                    self._reap(fd, poller)
            for pid, (pidfd, _) in self.children.items():
                poller.register(pidfd, select.POLLIN)  # idempotent (modifies if known)

    def _reap(self, pidfd: int, poller: select.poll) -> None:
        pid = next((p for p, (fd, _) in self.children.items() if fd == pidfd), None)
        poller.unregister(pidfd)
        if pid is None:
            return
        _, report = self.children.pop(pid)
        try:
            _, status = os.waitpid(pid, 0)
            code = os.waitstatus_to_exitcode(status)
        except ChildProcessError:
            code = None
        if report is not None:
            if code is not None:
                try:
                    os.write(report, json.dumps({"exit": code}).encode() + b"\n")
                except OSError:
                    pass
            os.close(report)
        os.close(pidfd)

    def _request(self) -> bool:
        """One spawn request: False at end of stream (the agent closed or died)."""
        try:
            data, fds, _flags, _addr = socket.recv_fds(self.control, MAX_MESSAGE, 3 + 4 + MAX_PASS_FDS)
        except OSError as exc:
            log.error("fork server: reading a request: %s", exc)
            return False
        if not data:
            for fd in fds:
                os.close(fd)
            return False
        try:
            reply, reply_fds = self._spawn(data, fds)
        except (ValueError, TypeError, KeyError, OSError) as exc:
            reply, reply_fds = {"error": f"{type(exc).__name__}: {exc}"}, []
        finally:
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
        try:
            socket.send_fds(self.control, [json.dumps(reply).encode()], reply_fds)
        except OSError as exc:
            log.error("fork server: answering: %s", exc)
            return False
        finally:
            for fd in reply_fds:
                os.close(fd)
        return True

    def _spawn(self, data: bytes, fds: list[int]) -> tuple[dict[str, Any], list[int]]:
        req = json.loads(data)
        if not isinstance(req, dict) or not isinstance(req.get("spec"), dict) \
                or not isinstance(req.get("fds"), dict):
            raise ValueError("not a spawn request")
        spec, where = req["spec"], req["fds"]

        def fd_at(key: str, optional: bool = False) -> int | None:
            i = where.get(key)
            if i is None and optional:
                return None
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(fds):
                raise ValueError(f"fd {key}: bad index {i!r}")
            return fds[i]

        passed = where.get("pass", [])
        targets = spec.get("pass_fds", [])
        if not isinstance(passed, list) or not isinstance(targets, list) \
                or len(passed) != len(targets) or len(passed) > MAX_PASS_FDS \
                or not all(isinstance(t, int) and not isinstance(t, bool) and 2 < t < 65536
                           for t in targets):
            raise ValueError("passed fds do not match the spec's pass_fds")
        mine = {k: fd_at(k) for k in (*STDIO, "status", "report")}
        mine["pass"] = [fds[i] for i in passed if isinstance(i, int) and 0 <= i < len(fds)]
        if len(mine["pass"]) != len(targets):
            raise ValueError("bad passed fd index")
        relay = spec.get("relay")
        if relay is not None:
            if not isinstance(relay, dict):
                raise ValueError("relay must be an object")
            mine["listen"] = fd_at("listen")
            mine["keep"] = fd_at("keep", optional=True)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 127
            try:
                code = self._child(spec, mine, targets)
            finally:
                os._exit(code)
        # The server tells the agent how its child ended, too: the object's status without a
        # relay (it is the object), the relay's (the same) or -9 when it was killed unheard.
        self.children[pid] = (os.pidfd_open(pid), os.dup(mine["report"]))
        return {"pid": pid}, [os.pidfd_open(pid)]

    def _child(self, spec: dict[str, Any], fds: dict[str, Any], targets: list[int]) -> int:
        """The forked launcher (root, the server's child): the launcher's steps, then the
        object. Never returns into the server's loop (the caller ``_exit``s)."""
        try:
            os.setsid()  # as the exec path's start_new_session: the relay leads a group
            # The server's own fds first (a target number may be one of them), then the
            # agent's: at the numbers the exec path gives them.
            self.control.detach()
            os.close(self.control_fd)
            for pidfd, report in self.children.values():
                os.close(pidfd)
                if report is not None:
                    os.close(report)
            placed = _place_fds(dict(fds, agent=self.agent_fd), targets)
        except OSError as exc:
            os.write(fds["status"], json.dumps({"stage": "fds", "error": str(exc),
                                                "errno": exc.errno}).encode() + b"\n")
            return 127
        if placed.get("listen") is not None:
            spec["relay"] = {"listen": placed["listen"], "keep": placed.get("keep")}
        status = placed["status"]
        isolated = bool(spec.get("isolate_pids"))
        if not isolated:
            os.close(placed["report"])  # the server answers for an object without a relay
        tie = sandbox_exec.PidfdTie(placed["agent"] if spec.get("parent_pid") else None,
                                    os.getppid())
        return sandbox_exec.launch_and_report(
            spec, status, tie=tie, report=placed["report"] if isolated else None,
            run=lambda s: self._run_object(s, status))

    def _run_object(self, spec: dict[str, Any], status: int) -> None:
        """The last step, confined already (its uid, cwd, namespaces): the runtime in
        this process when the argv asks for it with this interpreter and nothing on its
        PYTHONPATH shadows a module loaded here; else the program is exec'd."""
        argv, env = spec["argv"], spec.get("env", {})
        if not in_process(argv, env, self.own_path):
            sandbox_exec.exec_program(spec)
            return
        os.environ.clear()
        os.environ.update(env)
        sys.path[:] = [os.getcwd(), *_python_path(env), *self.base_path]
        importlib.invalidate_caches()
        runner = sys.modules[RUNNER]
        sys.argv = [runner.__file__ or RUNNER, *argv[3:]]
        sandbox_exec._check(sandbox_exec.libc().prctl(sandbox_exec.PR_SET_DUMPABLE, 1, 0, 0, 0),
                            "PR_SET_DUMPABLE")
        os.close(status)  # end of file: the object runs (what close-on-exec says on exec)
        run_and_exit(lambda: runner.main(argv[3:]))


def in_process(argv: list[str], env: dict[str, str], own_path: set[str]) -> bool:
    """Whether ``argv`` is the object runtime under this very interpreter, and none of the
    object's own PYTHONPATH entries (a VM's service code) holds a top-level module or package
    already imported here (the object would get ours, where its interpreter gets its own)."""
    if len(argv) < 3 or argv[1:3] != ["-m", RUNNER]:
        return False
    if os.path.normpath(argv[0]) != os.path.normpath(sys.executable):
        return False
    loaded = {name.partition(".")[0] for name in sys.modules}
    for entry in _python_path(env):
        if os.path.realpath(entry) in own_path:
            continue
        try:
            names = os.listdir(entry)
        except OSError:
            continue
        for name in names:
            top = name[:-3] if name.endswith(".py") else name.partition(".")[0]
            if top in loaded:
                return False
    return True


def serve_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent.hosting.forkserver")
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--agent-fd", type=int, required=True)
    args = parser.parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s fork server %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.propagate = False  # the root logger stays bare: a forked runner configures it
    sandbox_exec._check(sandbox_exec.libc().prctl(sandbox_exec.PR_SET_DUMPABLE, 0, 0, 0, 0),
                        "PR_SET_DUMPABLE")
    control = socket.socket(fileno=args.control_fd)
    os.set_inheritable(args.agent_fd, False)
    _preimport()
    gc.collect()
    gc.freeze()  # forked children never scan (and so never copy) the server's objects
    control.sendall(json.dumps({"ready": os.getpid()}).encode())
    return Server(control, args.agent_fd).serve()


# --- the agent's side ---------------------------------------------------------------------


def server_env(base: dict[str, str]) -> dict[str, str]:
    """The server's whole environment (and so what ``/proc/<pid>/environ`` shows for its
    children): ``base``, the launcher's (PATH, the run's id, by which ``moat clean`` finds a
    relay: :func:`agent.hosting.sandbox.launcher_env`), and this checkout on PYTHONPATH."""
    return dict(base, PYTHONPATH=str(REPO))


class ForkServer:
    """The agent's handle on its fork server: started at the first request, started again
    when it has died. Requests are serialised (each is one fork and one answer)."""

    def __init__(self, env: dict[str, str], python: str = sys.executable) -> None:
        self.env = server_env(env)
        self.python = python
        self.starts = 0
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._sock: socket.socket | None = None
        self._owner = os.getpid()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def ensure_started(self) -> int:
        with self._lock:
            return self._ensure()

    def _ensure(self) -> int:
        if self._proc is not None and self._proc.poll() is None and self._sock is not None:
            return self._proc.pid
        if self._proc is not None:
            log.warning("fork server (pid %d) exited with %s: starting another",
                        self._proc.pid, self._proc.returncode)
        self._close()
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        agent_fd = os.pidfd_open(os.getpid())
        flags = ["-s"] + (["-P"] if sys.version_info >= (3, 11) else [])
        try:
            self._proc = subprocess.Popen(
                [self.python, *flags, "-m", "agent.hosting.forkserver",
                 "--control-fd", str(theirs.fileno()), "--agent-fd", str(agent_fd)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, close_fds=True,
                pass_fds=(theirs.fileno(), agent_fd), start_new_session=True, cwd="/",
                env=self.env)
        except OSError as exc:
            mine.close()
            raise ForkServerError(f"cannot start the fork server: {exc}") from exc
        finally:
            theirs.close()
            os.close(agent_fd)
        self._sock = mine
        try:
            mine.settimeout(START_TIMEOUT)
            hello = json.loads(mine.recv(4096) or b"null")
            if not isinstance(hello, dict) or hello.get("ready") != self._proc.pid:
                raise ValueError(f"said {hello!r}")
        except (OSError, ValueError) as exc:
            self._close()
            raise ForkServerError(f"the fork server did not start: {exc}") from None
        self.starts += 1
        log.info("fork server started (pid %d)", self._proc.pid)
        return self._proc.pid

    def _close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._proc = None

    def stop(self) -> None:
        """End the server (closing its socket ends it); objects it forked run on."""
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
            if self._proc is not None:
                try:
                    self._proc.wait(5)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
            self._proc = None

    def spawn(self, spec: dict[str, Any], fds: dict[str, Any]) -> tuple[int, int]:
        """Fork a launcher for ``spec`` with ``fds`` (name -> fd; "pass": a list): its pid
        and a pidfd for it. ForkServerError if the server cannot take the request."""
        order: list[int] = []
        where: dict[str, Any] = {}
        for key, fd in fds.items():
            if key == "pass":
                where["pass"] = [len(order) + i for i in range(len(fd))]
                order.extend(fd)
            elif fd is not None:
                where[key] = len(order)
                order.append(fd)
        payload = json.dumps({"spec": spec, "fds": where}).encode()
        if len(payload) > MAX_MESSAGE:
            raise ForkServerError(f"spawn request too large ({len(payload)} bytes)")
        with self._lock:
            for attempt in (1, 2):
                self._ensure()
                assert self._sock is not None
                try:
                    self._sock.settimeout(REQUEST_TIMEOUT)
                    socket.send_fds(self._sock, [payload], order)
                    break
                except OSError as exc:  # gone before it read the request: start another
                    if attempt == 2:
                        raise ForkServerError(f"fork server: {exc}") from None
                    self._close()
            try:
                data, got, _flags, _addr = socket.recv_fds(self._sock, 65536, 1)
            except OSError as exc:
                self._close()
                raise ForkServerError(f"fork server did not answer: {exc}") from None
        try:
            reply = json.loads(data) if data else {"error": "the fork server has gone"}
            pid = reply.get("pid") if isinstance(reply, dict) else None
            if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0 or len(got) != 1:
                raise ForkServerError(f"fork server: {reply.get('error', reply) if isinstance(reply, dict) else reply}")
        except (ValueError, ForkServerError):
            for fd in got:
                os.close(fd)
            raise
        return pid, got[0]


_server: ForkServer | None = None
_server_lock = threading.Lock()


def default_server(env: dict[str, str]) -> ForkServer:
    """This agent's fork server (one per process), started with ``env`` (see
    :func:`server_env`) when there is none yet."""
    global _server
    with _server_lock:
        if _server is None or _server._owner != os.getpid():
            _server = ForkServer(env)
        return _server


class ForkedProcess:
    """What the agent holds of a forked launcher, in the shape of
    :class:`asyncio.subprocess.Process` as :class:`~agent.hosting.sandbox.ObjectSandbox` and
    its callers use it: ``pid``, ``returncode``, ``wait``, ``kill``, ``communicate`` and
    ``stdout``/``stderr`` readers. The launcher is not the agent's child: its status comes
    on the report pipe (the relay writes it, and the server once it reaped the launcher); a
    report that ends without one (the relay killed, the server gone) counts as SIGKILL (-9). Signals go through a
    pidfd, so a pid reused after the server reaped it is never hit."""

    def __init__(self, pid: int, pidfd: int, report: int, stdout: int | None,
                 stderr: int | None) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self.stdin = None
        self.stdout: asyncio.StreamReader | None = None
        self.stderr: asyncio.StreamReader | None = None
        self._pidfd: int | None = pidfd
        self._fds = {"report": report, "stdout": stdout, "stderr": stderr}
        self._transports: dict[str, asyncio.BaseTransport] = {}
        self._done = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        readers = {}
        for key, fd in self._fds.items():
            if fd is None:
                continue
            reader = asyncio.StreamReader(limit=2 ** 20)
            transport, _ = await loop.connect_read_pipe(
                lambda r=reader: asyncio.StreamReaderProtocol(r), os.fdopen(fd, "rb", 0))
            self._transports[key] = transport
            readers[key] = reader
        self.stdout, self.stderr = readers.get("stdout"), readers.get("stderr")
        self._task = loop.create_task(self._watch(readers["report"]))

    async def _watch(self, report: asyncio.StreamReader) -> None:
        code = None
        try:
            while True:
                line = await report.readline()
                if not line:
                    break
                code = sandbox_exec.exit_status(line)
                if code is not None:
                    break  # the relay's word, or the server's (the same status)
            # Until it has really gone (as waitpid would): a relay that wrote its status
            # still leaves the cgroup; one killed without a word counts as SIGKILL.
            await self._gone(5.0)
        finally:
            self.returncode = -9 if code is None else code
            self._close_pidfd()
            self._transports["report"].close()
            self._done.set()

    async def _gone(self, timeout: float) -> None:
        if self._pidfd is None:
            return
        loop = asyncio.get_running_loop()
        ready = loop.create_future()
        loop.add_reader(self._pidfd, lambda: ready.done() or ready.set_result(None))
        try:
            await asyncio.wait_for(ready, timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            loop.remove_reader(self._pidfd)

    def _close_pidfd(self) -> None:
        fd, self._pidfd = self._pidfd, None
        if fd is not None:
            os.close(fd)

    def send_signal(self, sig: int) -> None:
        if self._pidfd is None or self.returncode is not None:
            return
        try:
            signal.pidfd_send_signal(self._pidfd, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """SIGKILL the launcher (the relay): the object dies with it, its namespace too."""
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    async def wait(self) -> int:
        await self._done.wait()
        assert self.returncode is not None
        return self.returncode

    async def communicate(self, input: bytes | None = None) -> tuple[bytes | None, bytes | None]:
        if input is not None:
            raise ValueError("a forked object has no stdin pipe")

        async def read(r: asyncio.StreamReader | None) -> bytes | None:
            return await r.read() if r is not None else None

        out, err = await asyncio.gather(read(self.stdout), read(self.stderr))
        await self.wait()
        return out, err

    def close(self) -> None:
        for t in self._transports.values():
            t.close()
        self._close_pidfd()


def _stdio_fd(value: Any, std: int, stdout_fd: int | None, opened: list[int]
              ) -> tuple[int, int | None]:
    """(fd for the child, read end the agent keeps) for one of stdin/stdout/stderr given as
    asyncio.create_subprocess_exec takes it."""
    if value is None:
        return std, None
    if value == subprocess.DEVNULL:
        fd = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        opened.append(fd)
        return fd, None
    if value == subprocess.STDOUT and std == 2 and stdout_fd is not None:
        return stdout_fd, None
    if value == subprocess.PIPE and std != 0:
        r, w = os.pipe()
        opened.append(w)
        return w, r
    if isinstance(value, int) and value >= 0:
        return value, None
    if hasattr(value, "fileno"):
        return value.fileno(), None
    raise ForkServerError(f"unsupported stdio for a forked object: {value!r}")


async def start_forked(spec: dict[str, Any], pass_fds: tuple[int, ...], relay: dict[str, Any] | None,
                       stdin: Any, stdout: Any, stderr: Any, *, env: dict[str, str],
                       server: ForkServer | None = None) -> tuple[ForkedProcess, int]:
    """Ask the fork server for a launcher of ``spec``: the process handle and the read end
    of its status pipe (the same lines as the exec path's STATUS_FD: the object's pid, or
    the first failure; end of file once the object runs). ``env``: the fork server's, if
    it has to be started."""
    server = server or default_server(env)
    opened: list[int] = []
    keep: list[int] = []
    status_r, status_w = os.pipe()
    report_r, report_w = os.pipe()
    opened += [status_w, report_w]
    keep += [status_r, report_r]
    try:
        in_fd, _ = _stdio_fd(stdin, 0, None, opened)
        out_fd, out_r = _stdio_fd(stdout, 1, None, opened)
        err_fd, err_r = _stdio_fd(stderr, 2, out_fd, opened)
        keep += [fd for fd in (out_r, err_r) if fd is not None]
        fds: dict[str, Any] = {"stdin": in_fd, "stdout": out_fd, "stderr": err_fd,
                               "status": status_w, "report": report_w, "pass": list(pass_fds)}
        if relay is not None:
            fds["listen"], fds["keep"] = relay["listen"], relay.get("keep")
        pid, pidfd = await asyncio.to_thread(server.spawn, spec, fds)
    except BaseException:
        for fd in keep:
            os.close(fd)
        raise
    finally:
        for fd in opened:
            os.close(fd)
    proc = ForkedProcess(pid, pidfd, report_r, out_r, err_r)
    await proc._open()
    return proc, status_r


if __name__ == "__main__":
    sys.exit(serve_main())
