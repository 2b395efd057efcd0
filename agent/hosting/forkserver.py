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

Prepared launchers (:class:`PreparedLauncher`, a sandbox slot's: :mod:`agent.hosting.
sandbox_pool`): the server can also fork a launcher ahead, for a slot's cgroup, which takes
the steps that depend on nothing else (:func:`~agent.hosting.sandbox_exec.enter`), warms up
what the runner touches first, and waits for its object on a socket; the start then costs two
messages and the remaining steps (:func:`~agent.hosting.sandbox_exec.confine`), the same as
an unprepared start's. ``MOAT_START_TRACE=1`` has each start record when each step ended (the
agent's, the server's and the launcher's, one monotonic clock): ``moat bench objstart``.

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
import io
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
from typing import Any, Callable

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
    milliseconds, the runner's start up to serving: its argument parser built (argparse's
    help formatter imports ``shutil``, which imports bz2, lzma and zlib, and compiles its
    regular expressions: about 5 ms in each child) and used, a log line formatted, an event
    loop with the object's UDP and TCP service on an ephemeral loopback port, started and
    closed again (their lazy imports). Run in the server before it forks (imports, caches),
    and again in each prepared launcher while it waits for its object: the pages this
    touches are then copied before the object's start instead of during it (copy-on-write
    faults were most of the runner's start). Nothing of it stays open."""
    runner = importlib.import_module(RUNNER)
    runner.arg_parser().parse_args(["--spec", "agent.objects.counter:Counter", "--name", "w",
                                    "--address", "127.0.0.1", "--port", "0",
                                    "--control-fd", "0", "--warm"])
    handler = logging.StreamHandler(io.StringIO())
    handler.setFormatter(logging.Formatter(runner.LOG_FORMAT))
    handler.handle(logging.LogRecord("warm", logging.INFO, __file__, 0, "warm %s", ("up",), None))
    handler.close()

    async def serve_once() -> None:
        server = runner.ObjectServer(runner.load_object("agent.objects.counter:Counter"),
                                     "warm", "", False)
        try:
            transport, tcp = await runner.start_service(server, "127.0.0.1", 0)
        except OSError:
            return  # (no loopback here: the warm-up is only ever an optimisation)
        transport.close()
        if tcp is not None:
            tcp.close()
            await tcp.wait_closed()

    asyncio.run(serve_once())


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
        self._loaded: tuple[int, frozenset[str]] = (-1, frozenset())

    def loaded(self) -> frozenset[str]:
        """:func:`loaded_tops`, computed again only when a module was imported since (a
        forked start pays for it once in the server, not each time: 0.4 ms here)."""
        if self._loaded[0] != len(sys.modules):
            self._loaded = (len(sys.modules), loaded_tops())
        return self._loaded[1]

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
        received = time.monotonic()
        try:
            reply, reply_fds = self._spawn(data, fds, received)
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

    def _spawn(self, data: bytes, fds: list[int], received: float = 0.0
               ) -> tuple[dict[str, Any], list[int]]:
        req = json.loads(data)
        if isinstance(req, dict) and isinstance(req.get("prepare"), dict) \
                and isinstance(req.get("fds"), dict):
            return self._prepare(req["prepare"], req["fds"], fds)
        if not isinstance(req, dict) or not isinstance(req.get("spec"), dict) \
                or not isinstance(req.get("fds"), dict):
            raise ValueError("not a spawn request")
        spec, where = req["spec"], req["fds"]
        if isinstance(spec.get("trace"), list):
            spec["trace"] = [["server", received]]

        def fd_at(key: str, optional: bool = False) -> int | None:
            return _fd_at(where, fds, key, optional)

        targets = spec.get("pass_fds", [])
        mine = {k: fd_at(k) for k in (*STDIO, "status", "report")}
        mine["pass"] = _passed(where, fds, targets)
        relay = spec.get("relay")
        if relay is not None:
            if not isinstance(relay, dict):
                raise ValueError("relay must be an object")
            mine["listen"] = fd_at("listen")
            mine["keep"] = fd_at("keep", optional=True)
        return self._fork(mine["report"], lambda: self._child(spec, mine, targets))

    def _fork(self, report: int, child: Callable[[], int]) -> tuple[dict[str, Any], list[int]]:
        """Fork a child that runs ``child()`` and ends with its code; the server watches it
        and writes how it ended on (a copy of) ``report``. The reply: its pid and pidfd."""
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 127
            try:
                code = child()
            finally:
                os._exit(code)
        # The server tells the agent how its child ended, too: the object's status without a
        # relay (it is the object), the relay's (the same) or -9 when it was killed unheard.
        self.children[pid] = (os.pidfd_open(pid), os.dup(report))
        return {"pid": pid}, [os.pidfd_open(pid)]

    def _leave_server(self) -> None:
        """In a forked child: its own session, none of the server's fds (its socket, its
        other children's pidfds and report fds)."""
        os.setsid()  # as the exec path's start_new_session: the relay leads a group
        self.control.detach()
        os.close(self.control_fd)
        for pidfd, report in self.children.values():
            os.close(pidfd)
            if report is not None:
                os.close(report)

    def _prepare(self, slot: dict[str, Any], where: dict[str, Any], fds: list[int]
                 ) -> tuple[dict[str, Any], list[int]]:
        """A prepared launcher for a sandbox slot (:class:`PreparedLauncher`): forked now,
        it takes the steps that depend on nothing but the slot's cgroup (:func:`~agent.
        hosting.sandbox_exec.enter`) and waits for its object."""
        cgroups = slot.get("cgroup_procs")
        if not isinstance(cgroups, list) or not all(isinstance(p, str) for p in cgroups):
            raise ValueError("prepare: cgroup_procs must be a list of paths")
        slot = {"cgroup_procs": cgroups, "isolate_pids": True, "isolate_fs": True}
        mine = {k: _fd_at(where, fds, k) for k in ("status", "report", "relay", "object")}
        return self._fork(mine["report"], lambda: self._prepared_child(slot, mine))

    def _prepared_child(self, slot: dict[str, Any], fds: dict[str, int]) -> int:
        """The prepared launcher (root, the server's child): :func:`~agent.hosting.
        sandbox_exec.enter` for ``slot``, whose relay then waits on the ``relay`` socket
        and whose child (the namespace's PID 1) warms up and waits on the ``object`` socket
        (:meth:`_await_object`). Never returns into the server's loop."""
        try:
            self._leave_server()
            null = os.open(os.devnull, os.O_RDWR)
            placed = _place_fds({**fds, "stdin": null, "stdout": null, "stderr": null,
                                 "pass": [], "agent": self.agent_fd}, [])
            for fd in (null, *fds.values()):  # all moved above 2 by now
                os.close(fd)
        except OSError as exc:
            os.write(fds["status"], json.dumps({"stage": "fds", "error": str(exc),
                                                "errno": exc.errno}).encode() + b"\n")
            return 127
        status = placed["status"]
        try:
            alive = sandbox_exec.enter(slot, status, report=placed["report"],
                                       tie=sandbox_exec.PidfdTie(placed["agent"], os.getppid()),
                                       start=placed["relay"])
            assert alive is not None  # (the relay never returns)
            for key in ("report", "agent"):  # the relay's: this child needs neither
                os.close(placed[key])
            sandbox_exec._die_with_parent()  # with the relay (until its uid changes: again)
            if select.select([alive], [], [], 0)[0]:
                raise OSError(3, "the relay exited")
        except Exception as exc:  # noqa: BLE001 - to the agent
            return sandbox_exec.report_failure(status, exc)
        _warm()  # the pages a runner touches first, copied now and not at its start
        importlib.invalidate_caches()  # (its own pages too: the object's start calls it)
        self.loaded()
        try:
            os.write(status, b'{"ready": true}\n')
            os.close(status)
        except OSError:
            return 127
        return self._await_object(slot, placed["object"], alive)

    def _await_object(self, slot: dict[str, Any], sock_fd: int, alive: int) -> int:
        """Until the agent sends this slot's object (its spec and fds: :meth:`PreparedLauncher.
        start`), then the rest of the launcher's steps (:func:`~agent.hosting.sandbox_exec.
        confine`) and the object, as :meth:`_child` does. The relay gone or the socket
        closed first (the slot let go): the child ends."""
        sock = socket.socket(fileno=sock_fd)
        while True:
            try:
                ready = select.select([sock, alive], [], [])[0]
            except InterruptedError:
                continue
            if alive in ready:
                return 0
            break
        try:
            data, fds, _flags, _addr = socket.recv_fds(sock, MAX_MESSAGE, 4 + MAX_PASS_FDS)
        except OSError:
            return 127
        received = time.monotonic()
        sock.close()
        if not data:
            return 0
        status = None
        try:
            req = json.loads(data)
            if not isinstance(req, dict) or not isinstance(req.get("spec"), dict) \
                    or not isinstance(req.get("fds"), dict):
                raise ValueError("not a start message")
            spec, where = req["spec"], req["fds"]
            status = _fd_at(where, fds, "status")
            if not fits(slot, spec):
                raise ValueError("the spec does not fit this prepared launcher")
            object_pid = req.get("object_pid")
            if isinstance(object_pid, bool) or not isinstance(object_pid, int) or object_pid <= 0:
                raise ValueError(f"bad object_pid {object_pid!r}")
            if isinstance(spec.get("trace"), list):
                spec["trace"] = [["received", received]]
            targets = spec.get("pass_fds", [])
            mine = {k: _fd_at(where, fds, k) for k in STDIO}
            mine["pass"] = _passed(where, fds, targets)
            placed = _place_fds(dict(mine, status=status, alive=alive), targets)
            status = placed["status"]
            # The line the exec path's relay writes: the object's pid (as the agent sees it,
            # known since the relay forked), and proof that this child has its fds.
            os.write(status, json.dumps({"pid": object_pid}).encode() + b"\n")
            sandbox_exec.confine(spec, status, alive=placed["alive"],
                                 trace=sandbox_exec.start_trace(spec))
        except Exception as exc:  # noqa: BLE001 - to the agent, if it gave a status pipe
            return sandbox_exec.report_failure(status, exc) if status is not None else 127
        try:
            self._run_object(spec, status)
        except Exception as exc:  # noqa: BLE001
            return sandbox_exec.report_failure(status, sandbox_exec.LaunchError("exec", exc))
        return 127

    def _child(self, spec: dict[str, Any], fds: dict[str, Any], targets: list[int]) -> int:
        """The forked launcher (root, the server's child): the launcher's steps, then the
        object. Never returns into the server's loop (the caller ``_exit``s)."""
        sandbox_exec.mark(sandbox_exec.start_trace(spec), "forked")
        try:
            # The server's own fds first (a target number may be one of them), then the
            # agent's: at the numbers the exec path gives them.
            self._leave_server()
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
        if not in_process(argv, env, self.own_path, self.loaded()):
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
        if sandbox_exec.start_trace(spec) is not None:
            os.write(status, json.dumps({"trace": [["in process", time.monotonic()]]}).encode()
                     + b"\n")
        os.close(status)  # end of file: the object runs (what close-on-exec says on exec)
        run_and_exit(lambda: runner.main(argv[3:]))


def _fd_at(where: dict[str, Any], fds: list[int], key: str, optional: bool = False) -> Any:
    """The fd a request names by its index among the fds that came with it."""
    i = where.get(key)
    if i is None and optional:
        return None
    if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(fds):
        raise ValueError(f"fd {key}: bad index {i!r}")
    return fds[i]


def _passed(where: dict[str, Any], fds: list[int], targets: Any) -> list[int]:
    """The passed fds a request names, one per number of the spec's ``pass_fds``."""
    passed = where.get("pass", [])
    if not isinstance(passed, list) or not isinstance(targets, list) \
            or len(passed) != len(targets) or len(passed) > MAX_PASS_FDS \
            or not all(isinstance(t, int) and not isinstance(t, bool) and 2 < t < 65536
                       for t in targets):
        raise ValueError("passed fds do not match the spec's pass_fds")
    out = [fds[i] for i in passed
           if isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(fds)]
    if len(out) != len(targets):
        raise ValueError("bad passed fd index")
    return out


def fits(slot: dict[str, Any], spec: dict[str, Any]) -> bool:
    """Whether a launcher prepared for ``slot`` (its cgroup, with a PID and a mount namespace
    and everything read-only) can start ``spec``'s object: the same cgroup, both
    isolations asked for. Anything else starts as if there were no prepared launcher."""
    return (bool(spec.get("isolate_pids")) and bool(spec.get("isolate_fs"))
            and spec.get("cgroup_procs", []) == slot.get("cgroup_procs"))


def loaded_tops() -> frozenset[str]:
    """The top-level names of every module imported in this process."""
    return frozenset(name.partition(".")[0] for name in list(sys.modules))


def in_process(argv: list[str], env: dict[str, str], own_path: set[str],
               loaded: frozenset[str] | None = None) -> bool:
    """Whether ``argv`` is the object runtime under this very interpreter, and none of the
    object's own PYTHONPATH entries (a VM's service code) holds a top-level module or package
    already imported here (the object would get ours, where its interpreter gets its own).
    ``loaded``: :func:`loaded_tops` if the caller has it at hand."""
    if len(argv) < 3 or argv[1:3] != ["-m", RUNNER]:
        return False
    if os.path.normpath(argv[0]) != os.path.normpath(sys.executable):
        return False
    if loaded is None:
        loaded = loaded_tops()
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
    server = Server(control, args.agent_fd)
    server.loaded()
    gc.collect()
    gc.freeze()  # forked children never scan (and so never copy) the server's objects
    control.sendall(json.dumps({"ready": os.getpid()}).encode())
    return server.serve()


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
        return self._ask({"spec": spec}, fds)

    def prepare(self, slot: dict[str, Any], fds: dict[str, Any]) -> tuple[int, int]:
        """Fork a prepared launcher for ``slot`` (``{"cgroup_procs"}``) with ``fds``
        (status, report, relay, object): its pid and a pidfd. See :class:`PreparedLauncher`."""
        return self._ask({"prepare": slot}, fds)

    def _ask(self, request: dict[str, Any], fds: dict[str, Any]) -> tuple[int, int]:
        payload, order = _message(request, fds)
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


def _message(body: dict[str, Any], fds: dict[str, Any]) -> tuple[bytes, list[int]]:
    """``body`` with ``"fds"``: each fd's index among those sent (``"pass"``: a list), and
    the fds in that order. ForkServerError when it would not fit one message."""
    order: list[int] = []
    where: dict[str, Any] = {}
    for key, fd in fds.items():
        if key == "pass":
            where["pass"] = [len(order) + i for i in range(len(fd))]
            order.extend(fd)
        elif fd is not None:
            where[key] = len(order)
            order.append(fd)
    payload = json.dumps(dict(body, fds=where)).encode()
    if len(payload) > MAX_MESSAGE:
        raise ForkServerError(f"request too large ({len(payload)} bytes)")
    return payload, order


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


def _launch_fds(stdin: Any, stdout: Any, stderr: Any, pass_fds: tuple[int, ...],
                relay: dict[str, Any] | None, opened: list[int], keep: list[int]
                ) -> tuple[dict[str, Any], int | None, int | None]:
    """The fds one forked start hands over (stdio, its passed fds, the relay's), with the
    agent's read ends of stdout/stderr pipes; what the caller closes after the hand-over
    goes into ``opened``, what it closes if the start fails into ``keep``."""
    in_fd, _ = _stdio_fd(stdin, 0, None, opened)
    out_fd, out_r = _stdio_fd(stdout, 1, None, opened)
    err_fd, err_r = _stdio_fd(stderr, 2, out_fd, opened)
    keep += [fd for fd in (out_r, err_r) if fd is not None]
    fds: dict[str, Any] = {"stdin": in_fd, "stdout": out_fd, "stderr": err_fd,
                           "pass": list(pass_fds)}
    if relay is not None:
        fds["listen"], fds["keep"] = relay["listen"], relay.get("keep")
    return fds, out_r, err_r


async def start_forked(spec: dict[str, Any], pass_fds: tuple[int, ...], relay: dict[str, Any] | None,
                       stdin: Any, stdout: Any, stderr: Any, *, env: dict[str, str],
                       server: ForkServer | None = None,
                       launcher: PreparedLauncher | None = None) -> tuple[ForkedProcess, int]:
    """Ask the fork server for a launcher of ``spec``: the process handle and the read end
    of its status pipe (the same lines as the exec path's STATUS_FD: the object's pid, or
    the first failure; end of file once the object runs). ``env``: the fork server's, if
    it has to be started. ``launcher``: the start's sandbox slot's prepared launcher, used
    instead when it fits ``spec`` and is alive (else closed, and the server forks one)."""
    if launcher is not None:
        if launcher.fits(spec) and launcher.alive():
            try:
                return await launcher.start(spec, pass_fds, relay, stdin, stdout, stderr)
            except ForkServerError as exc:
                log.warning("prepared launcher %d: %s: forking another", launcher.pid, exc)
        launcher.close()
    server = server or default_server(env)
    opened: list[int] = []
    keep: list[int] = []
    status_r, status_w = os.pipe()
    report_r, report_w = os.pipe()
    opened += [status_w, report_w]
    keep += [status_r, report_r]
    try:
        fds, out_r, err_r = _launch_fds(stdin, stdout, stderr, pass_fds, relay, opened, keep)
        fds.update(status=status_w, report=report_w)
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


# --- prepared launchers (a sandbox slot's, issue 14) ---------------------------------------

PREPARE_TIMEOUT = 10.0


class PreparedLauncher:
    """A launcher forked ahead for one sandbox slot (:mod:`agent.hosting.sandbox_pool`), so
    that an object's start pays none of what does not depend on the object.

    The fork server's child took :func:`~agent.hosting.sandbox_exec.enter`'s steps for the
    slot's cgroup: it is tied to the agent (pidfd), in the slot's cgroup (empty of limits
    until the object's sandbox writes them: before the object's first instruction), forked
    into a new PID namespace, whose PID 1 has its own mount namespace, ``/proc`` and every
    filesystem read-only, and has warmed up what a runner touches first. The relay waits on
    ``relay`` for its part of the start (the relay socket's fds, whether it outlives the
    agent), PID 1 on ``object`` for the object's spec and fds; then PID 1 takes the rest of
    the very steps an unprepared start takes (:func:`~agent.hosting.sandbox_exec.confine`:
    its tmpfs, rlimits, fds, uid, no_new_privs, working directory) and runs the object.

    Closing it (the slot discarded, the pool closed, a start that did not use it) closes
    both sockets, on which the relay kills itself and PID 1 dies with it, and sends SIGKILL
    through the pidfd; the server reaps it, and removing the cgroup waits until it has gone.
    """

    def __init__(self, pid: int, pidfd: int, report: int, relay: socket.socket,
                 obj: socket.socket, slot: dict[str, Any]) -> None:
        self.pid = pid
        self.pidfd: int | None = pidfd
        self.report: int | None = report
        self.relay = relay
        self.object = obj
        self.slot = slot
        self.object_pid: int | None = None  # PID 1 of its namespace, as the agent sees it
        self.used = False

    def fits(self, spec: dict[str, Any]) -> bool:
        return not self.used and fits(self.slot, spec)

    def alive(self) -> bool:
        """Both processes still wait: the relay has not exited and PID 1's socket is open."""
        if self.used or self.pidfd is None:
            return False
        gone = select.select([self.pidfd, self.object], [], [], 0)[0]
        return not gone  # (its socket is readable only at end of stream: PID 1 has gone)

    async def start(self, spec: dict[str, Any], pass_fds: tuple[int, ...],
                    relay: dict[str, Any] | None, stdin: Any, stdout: Any, stderr: Any
                    ) -> tuple[ForkedProcess, int]:
        """Hand the object over: the relay's part, then PID 1's (spec, stdio, passed fds,
        the status pipe). Two messages on local sockets, no thread, no fork. The process
        handle and the status pipe's read end, as :func:`start_forked`'s."""
        if self.used or self.pidfd is None or self.report is None:
            raise ForkServerError("prepared launcher used or closed already")
        opened: list[int] = []
        keep: list[int] = []
        status_r, status_w = os.pipe()
        opened.append(status_w)
        keep.append(status_r)
        try:
            fds, out_r, err_r = _launch_fds(stdin, stdout, stderr, pass_fds, relay, opened, keep)
            fds["status"] = status_w
            relay_fds = [fd for fd in (fds.pop("listen", None), fds.pop("keep", None))
                         if fd is not None]
            body = {"spec": spec, "object_pid": self.object_pid}
            payload, order = _message(body, fds)
            self.used = True
            try:
                socket.send_fds(self.relay, [json.dumps({
                    "outlive": not spec.get("parent_pid"), "fds": len(relay_fds)}).encode()],
                    relay_fds)
                socket.send_fds(self.object, [payload], order)
            except OSError as exc:
                raise ForkServerError(f"prepared launcher: {exc}") from None
        except BaseException:
            for fd in keep:
                os.close(fd)
            self.close()
            raise
        finally:
            for fd in opened:
                os.close(fd)
        pidfd, report = self.pidfd, self.report
        self.pidfd = self.report = None  # the process handle's now
        self.relay.close()
        self.object.close()
        proc = ForkedProcess(self.pid, pidfd, report, out_r, err_r)
        await proc._open()
        return proc, status_r

    def close(self) -> None:
        """End it (unless an object took it: then it is that object's relay). Idempotent."""
        self.relay.close()
        self.object.close()
        if self.pidfd is not None:
            try:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.close(self.pidfd)
            self.pidfd = None
        if self.report is not None:
            os.close(self.report)
            self.report = None


def prepare_launcher(server: ForkServer, cgroup_procs: list[str],
                     timeout: float = PREPARE_TIMEOUT) -> PreparedLauncher:
    """A :class:`PreparedLauncher` for a slot whose cgroup has ``cgroup_procs``, once it
    waits (its relay named PID 1, PID 1 said it is ready). Blocking (a thread's: the pool's
    refill). ForkServerError (nothing left behind) if it cannot be made."""
    slot = {"cgroup_procs": [str(p) for p in cgroup_procs], "isolate_pids": True,
            "isolate_fs": True}
    status_r, status_w = os.pipe()
    report_r, report_w = os.pipe()
    relay, relay_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    obj, obj_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for sock in (relay, obj):
        sock.settimeout(1.0)  # two small messages into empty buffers: never waits
    try:
        pid, pidfd = server.prepare(slot, {"status": status_w, "report": report_w,
                                           "relay": relay_theirs.fileno(),
                                           "object": obj_theirs.fileno()})
    except BaseException:
        for fd in (status_r, report_r):
            os.close(fd)
        relay.close()
        obj.close()
        raise
    finally:
        for fd in (status_w, report_w):
            os.close(fd)
        relay_theirs.close()
        obj_theirs.close()
    launcher = PreparedLauncher(pid, pidfd, report_r, relay, obj, slot)
    try:
        launcher.object_pid = _await_ready(status_r, timeout)
    except BaseException:
        launcher.close()
        raise
    finally:
        os.close(status_r)
    return launcher


def _await_ready(status: int, timeout: float) -> int:
    """Read a prepared launcher's status pipe to its end: the object-to-be's pid (the relay's
    line) and PID 1's ``ready``; ForkServerError for a failure, a time-out or no ready."""
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([status], [], [], left)[0]:
            raise ForkServerError(f"prepared launcher not ready within {timeout}s")
        chunk = os.read(status, 4096)
        if not chunk:
            break
        data += chunk
    pid, ready = None, False
    for line in data.splitlines():
        try:
            info = json.loads(line)
        except ValueError:
            info = None
        if isinstance(info, dict) and set(info) == {"pid"} and isinstance(info["pid"], int) \
                and not isinstance(info["pid"], bool) and info["pid"] > 0:
            pid = info["pid"]
        elif info == {"ready": True}:
            ready = True
        else:
            raise ForkServerError(f"prepared launcher failed: {line[:200]!r}")
    if pid is None or not ready:
        raise ForkServerError("prepared launcher ended before it was ready")
    return pid


if __name__ == "__main__":
    sys.exit(serve_main())
