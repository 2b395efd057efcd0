"""``python -m agent.supervisor --status FILE [--socket SOCK] -- ARGV...``: keep one agent running.

A router node's daemon is this small process, not the agent itself (issue 13): it starts
``ARGV`` (``python -m agent --config <run>/<router>.json``) as its child, in its own process
group (the node's daemon group, which the node stops as a whole), and starts it again
whenever it exits with anything but 0 — killed (``kill -9``), crashed, or refused to start:

* **Backoff** (:class:`Backoff`, pure, with an injected clock): the first restart comes
  after 0.2 s, then 0.4, 0.8, ... up to 5 s; a run that lasted a minute resets it. An agent
  starts in well under a second, so a killed agent answers again within about a second.
* **Crash loop**: 5 exits within 30 s. It is logged (stderr, which is the node's daemon log
  ``<run>/<router>.out``), written into the status file and shown by ``moat show status``;
  the supervisor keeps trying at the longest backoff, because what makes an agent crash in
  a testbed (a full run directory, a configuration being rewritten) is often fixed from
  outside, and a router whose agent came back by itself needs no operator. It leaves the
  crash loop after a minute of stable running.
* **Status file** (``--status``): JSON, 0600, written atomically (a temporary file renamed
  over it): state (``starting``, ``running``, ``restarting``, ``stopped``, ``failed``),
  the crash-loop flag, restarts, the last exit, the agent's pid, the last restart's
  time to answer. A write that fails (run directory full or read-only) is reported on
  stderr, rate-limited, and supervision goes on.
* **Ready**: with ``--socket``, the agent is up when it answers ``ping`` there. Before each
  start a stale socket (nobody answers) is removed; a socket someone answers on is left
  alone and no second agent starts (an agent that outlived an earlier supervisor serves it).
  An agent that exits before it ever answered the first time is not restarted: the
  supervisor exits with its status, so whoever starts the network sees a configuration
  that can never work at once, as before supervision.
* **Stop**: SIGTERM/SIGINT/SIGHUP to the supervisor ends supervision and is forwarded to the
  process group (the agent and anything it started there); after ``STOP_TIMEOUT`` s the
  group gets SIGKILL. An agent that exits with 0 was stopped on request (SIGTERM, the
  ``stop`` command): the supervisor ends too, so a stop of the node never races a restart.

It imports nothing but the standard library: the supervisor must never fail where the
agent might (a bad import, a broken dependency, a full event loop).

**Forked agents** (issue 15): how a child starts is injected (``spawn``, default
:func:`popen_child`: ``ARGV`` exec'd). A supervisor forked from the agent zygote
(:mod:`agent.zygote`) is given one that forks the agent from its own pre-imported memory
(:class:`ForkedChild`), so every start, and every restart after a kill, is a fork: the
supervisor never runs agent code itself, so what it forks is the zygote's memory as
imported, shared copy-on-write with every other router's agent.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: The backoff and crash-loop rule (see the module docstring).
INITIAL_BACKOFF = 0.2
MAX_BACKOFF = 5.0
STABLE_AFTER = 60.0
LOOP_WINDOW = 30.0
LOOP_EXITS = 5
#: Seconds a stopped agent has to exit after SIGTERM before its group gets SIGKILL.
STOP_TIMEOUT = 4.0
#: How often the supervisor asks a starting agent for ``ping``.
READY_POLL = 0.05
#: Suffix of the status file next to an agent's configuration: ``<run>/<router>.supervisor.json``.
STATUS_SUFFIX = ".supervisor.json"
#: Seconds between two reports of one failing status-file write.
WRITE_ERROR_EVERY = 60.0


class ForkedChild:
    """A child made by ``os.fork()`` without exec: what the supervisor asks of a ``Popen``
    (``pid``, ``poll()``, ``returncode``, negative for a signal as ``Popen`` gives it)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere: its status is lost
                self.returncode = 255
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode


#: How the supervisor starts its child: ``spawn(argv)`` returns something with ``pid`` and
#: ``poll()`` (a ``Popen``, a :class:`ForkedChild`), or raises OSError.
Spawn = Callable[[list[str]], Any]


def popen_child(argv: list[str]) -> subprocess.Popen[bytes]:
    """The default start: ``argv`` exec'd, stdio inherited (the node's daemon log)."""
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL)


def status_path(run_dir: str | os.PathLike[str], router: str) -> Path:
    """Where the supervisor of ``router``'s agent writes its status."""
    return Path(run_dir) / f"{router}{STATUS_SUFFIX}"


@dataclass(frozen=True)
class RestartPolicy:
    """How soon to restart and what counts as a crash loop."""

    initial: float = INITIAL_BACKOFF
    maximum: float = MAX_BACKOFF
    stable_after: float = STABLE_AFTER
    loop_window: float = LOOP_WINDOW
    loop_exits: int = LOOP_EXITS

    def __post_init__(self) -> None:
        if not (0 < self.initial <= self.maximum) or self.stable_after <= 0 or self.loop_window <= 0 \
                or self.loop_exits < 1:
            raise ValueError(f"bad restart policy {self}")


@dataclass
class Backoff:
    """The restart decision, pure: :meth:`started` when the agent starts, :meth:`exited`
    (the delay before the next start) when it exits, :meth:`tick` while it runs."""

    policy: RestartPolicy = field(default_factory=RestartPolicy)
    clock: Callable[[], float] = time.monotonic
    delay: float = 0.0
    restarts: int = 0
    crash_loop: bool = False
    started_at: float | None = None
    exits: deque = field(default_factory=deque)

    def __post_init__(self) -> None:
        self.delay = self.policy.initial

    def started(self) -> None:
        self.started_at = self.clock()

    def tick(self) -> bool:
        """While the agent runs: after a stable run the backoff and the crash loop are
        forgotten. True when that just happened."""
        if self.started_at is None or self.clock() - self.started_at < self.policy.stable_after:
            return False
        changed = self.crash_loop or self.delay != self.policy.initial or bool(self.exits)
        self.delay, self.crash_loop = self.policy.initial, False
        self.exits.clear()
        return changed

    def exited(self) -> float:
        """The agent exited (not on request): the seconds to wait before starting it again."""
        self.tick()
        now = self.clock()
        self.started_at = None
        self.exits.append(now)
        while self.exits and self.exits[0] <= now - self.policy.loop_window:
            self.exits.popleft()
        if len(self.exits) >= self.policy.loop_exits:
            self.crash_loop = True
        wait = self.delay
        self.delay = min(self.delay * 2, self.policy.maximum)
        self.restarts += 1
        return wait


def describe_exit(status: int) -> dict[str, Any]:
    """A ``Popen.returncode`` as the status file shows it."""
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = f"signal {-status}"
        return {"returncode": status, "signal": name, "text": f"killed by {name}"}
    return {"returncode": status, "signal": None, "text": f"exit status {status}"}


def write_status(path: Path, doc: dict[str, Any]) -> None:
    """``doc`` as JSON at ``path``, 0600 from creation, atomically (rename over)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # 0600, O_EXCL
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def read_status(path: Path) -> dict[str, Any] | None:
    """The status file, or None when there is none or it cannot be read."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def ping(path: str, timeout: float = 0.5) -> bool:
    """Does an agent answer ``ping`` on control socket ``path``? (the RPC's JSON lines,
    written here so the supervisor imports none of the agent)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            s.sendall(b'{"id": 1, "cmd": "ping", "args": {}}\n')
            buf = b""
            while not buf.endswith(b"\n") and len(buf) < 4096:
                chunk = s.recv(4096)
                if not chunk:
                    return False
                buf += chunk
    except OSError:
        return False
    try:
        answer = json.loads(buf)
    except ValueError:
        return False
    return isinstance(answer, dict) and answer.get("ok") is True and answer.get("result") == "pong"


def clear_stale_socket(path: str) -> str:
    """Before a start: ``"absent"``, ``"removed"`` (a socket nobody answers on), ``"live"``
    (an agent answers there: leave it) or ``"foreign"`` (not a socket: left for the agent to
    refuse, never deleted here)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "absent"
    import stat as _stat

    if not _stat.S_ISSOCK(st.st_mode):
        return "foreign"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        try:
            s.connect(path)
            return "live"
        except (ConnectionRefusedError, FileNotFoundError):
            pass
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                return "live"  # cannot tell (a full backlog): never remove what may serve
    try:
        os.unlink(path)
    except FileNotFoundError:
        return "absent"
    return "removed"


class Supervisor:
    """Runs and restarts one agent; see the module docstring."""

    def __init__(self, argv: Sequence[str], status: Path, socket_path: str | None = None,
                 policy: RestartPolicy | None = None, stop_timeout: float = STOP_TIMEOUT,
                 spawn: Spawn | None = None) -> None:
        self.argv = list(argv)
        self.spawn: Spawn = spawn or popen_child
        self.status_file = status
        self.socket_path = socket_path
        self.backoff = Backoff(policy or RestartPolicy())
        self.stop_timeout = stop_timeout
        self.child: Any = None  # a Popen or a ForkedChild
        self.state = "starting"
        self.ready = socket_path is None
        self.ever_ready = False
        self.last_exit: dict[str, Any] | None = None
        self.next_start = 0.0
        self.exited_at: float | None = None
        self.back_in: float | None = None
        self.stopping = False
        self.note: str | None = None
        self._write_failed_at: float | None = None
        self._write_errors = 0

    # --- reporting ---------------------------------------------------------------------

    def say(self, text: str) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} agent.supervisor[{os.getpid()}] {text}\n"
        try:
            os.write(2, line.encode(errors="replace"))
        except OSError:
            pass  # stderr is the daemon log in the run directory: it may be full too

    def save(self) -> None:
        doc = {"state": self.state, "crash_loop": self.backoff.crash_loop,
               "restarts": self.backoff.restarts, "last_exit": self.last_exit,
               "supervisor_pid": os.getpid(),
               "agent_pid": self.child.pid if self.child is not None and self.child.poll() is None else None,
               "backoff_s": round(self.backoff.delay, 3), "last_back_in_s": self.back_in,
               "note": self.note, "updated": time.time()}
        try:
            write_status(self.status_file, doc)
        except OSError as exc:
            self._write_errors += 1
            now = time.monotonic()
            if self._write_failed_at is None or now - self._write_failed_at >= WRITE_ERROR_EVERY:
                self._write_failed_at = now
                self.say(f"cannot write status file {self.status_file}: {exc.strerror or exc} "
                         f"({self._write_errors} failed writes so far; supervision goes on)")
            return
        if self._write_failed_at is not None:
            self.say(f"status file {self.status_file} written again after {self._write_errors} failures")
            self._write_failed_at, self._write_errors = None, 0

    # --- the child ---------------------------------------------------------------------

    def start(self) -> None:
        if self.socket_path is not None:
            found = clear_stale_socket(self.socket_path)
            if found == "removed":
                self.say(f"removed stale control socket {self.socket_path}")
            elif found == "live":
                self.note = f"another agent answers on {self.socket_path}: no second one started"
                self.say(self.note)
                self.next_start = time.monotonic() + self.backoff.policy.maximum
                self.state = "restarting"
                self.save()
                return
        try:
            # stdin/stdout/stderr are inherited: the agent writes into the node's daemon log.
            self.child = self.spawn(self.argv)
        except OSError as exc:
            self.say(f"cannot start {self.argv}: {exc}")
            self.child = None
            self._exited({"returncode": None, "signal": None, "text": f"cannot start: {exc}"})
            return
        self.note = None
        self.backoff.started()
        self.ready = self.socket_path is None
        self.state = "running" if self.ready else "starting"
        self.say(f"started agent pid {self.child.pid}")
        if self.ready:
            self._became_ready()
        self.save()

    def _became_ready(self) -> None:
        self.ever_ready = True
        self.state = "running"
        if self.exited_at is not None:
            self.back_in = round(time.monotonic() - self.exited_at, 3)
            self.say(f"agent pid {self.child.pid if self.child else '?'} answers again "
                     f"{self.back_in:.3f} s after it exited (restart {self.backoff.restarts})")
            self.exited_at = None

    def _exited(self, how: dict[str, Any]) -> None:
        self.last_exit = dict(how, at=time.time())
        self.child = None
        self.exited_at = time.monotonic() if self.exited_at is None else self.exited_at
        was_loop = self.backoff.crash_loop
        wait = self.backoff.exited()
        self.next_start = time.monotonic() + wait
        self.state = "restarting"
        self.say(f"agent {how['text']}; restart {self.backoff.restarts} in {wait:.1f} s")
        if self.backoff.crash_loop and not was_loop:
            self.say(f"CRASH LOOP: the agent exited {len(self.backoff.exits)} times within "
                     f"{self.backoff.policy.loop_window:.0f} s; still restarting every "
                     f"{self.backoff.policy.maximum:.0f} s (see the lines above for why it exits)")
        self.save()

    def reap(self) -> int | None:
        """The child's status if it exited (and it is reaped), else None."""
        if self.child is None:
            return None
        return self.child.poll()

    # --- signals -----------------------------------------------------------------------

    def _on_stop_signal(self, signum: int, _frame: Any) -> None:
        if not self.stopping:
            self.stopping = True
            self.stop_deadline = time.monotonic() + self.stop_timeout
            self._forward(signal.SIGTERM)

    def _forward(self, sig: signal.Signals) -> None:
        """``sig`` to the agent's process group (this supervisor's own: the agent stays in
        the node's daemon group), the supervisor excepted from its effect by its handler."""
        try:
            os.killpg(os.getpgrp(), sig)
        except ProcessLookupError:
            pass

    # --- the loop ----------------------------------------------------------------------

    def run(self) -> int:
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes the select below
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_stop_signal)
        self.say(f"supervising {self.argv}")
        self.start()
        while True:
            status = self.reap()
            if status is not None:
                how = describe_exit(status)
                if self.stopping or status == 0:
                    self.child = None
                    self.last_exit = dict(how, at=time.time())
                    self.state = "stopped"
                    self.say(f"agent {how['text']}; supervision ends")
                    self.save()
                    return 0  # stopped as asked (SIGTERM here, or the agent's own stop)
                if not self.ever_ready and self.socket_path is not None:
                    self.child = None
                    self.last_exit = dict(how, at=time.time())
                    self.state = "failed"
                    self.say(f"agent {how['text']} before it ever answered: not restarting "
                             "(a configuration that cannot start is reported, not retried)")
                    self.save()
                    return status if status > 0 else 128 - status
                self._exited(how)
            if self.stopping:
                if self.child is None:
                    self.state = "stopped"
                    self.save()
                    return 0
                if time.monotonic() >= self.stop_deadline:
                    self.say(f"agent pid {self.child.pid} still running {self.stop_timeout:.0f} s "
                             "after SIGTERM: SIGKILL to its group")
                    self._forward(signal.SIGKILL)  # this supervisor too
            elif self.child is None and time.monotonic() >= self.next_start:
                self.start()
                continue
            if self.child is not None and not self.ready and self.socket_path is not None:
                if ping(self.socket_path):
                    self.ready = True
                    self._became_ready()
                    self.save()
            if self.child is not None and self.backoff.tick():
                self.say("agent stable for a minute: backoff and crash loop reset")
                self.save()
            select.select([wake_r], [], [], self._timeout())
            try:
                while os.read(wake_r, 512):
                    pass
            except BlockingIOError:
                pass

    def _timeout(self) -> float:
        if self.stopping:
            return 0.1
        if self.child is None:
            return max(0.0, self.next_start - time.monotonic())
        if not self.ready:
            return READY_POLL
        return 5.0


def main(argv: list[str] | None = None, spawn: Spawn | None = None) -> int:
    """The command line; ``spawn`` (a caller in-process, the zygote) says how the agent
    starts (default: exec'd)."""
    parser = argparse.ArgumentParser(prog="python -m agent.supervisor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--status", required=True, type=Path, help="status file (JSON, 0600)")
    parser.add_argument("--socket", help="the agent's control socket (ready when it answers ping)")
    parser.add_argument("--initial", type=float, default=INITIAL_BACKOFF, help="first backoff, s")
    parser.add_argument("--max", type=float, default=MAX_BACKOFF, help="longest backoff, s")
    parser.add_argument("--stable-after", type=float, default=STABLE_AFTER,
                        help="a run this long resets the backoff, s")
    parser.add_argument("--loop-exits", type=int, default=LOOP_EXITS, help="exits that make a crash loop")
    parser.add_argument("--loop-window", type=float, default=LOOP_WINDOW, help="... within this many s")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- the agent's argv")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command to supervise (give it after --)")
    try:
        policy = RestartPolicy(args.initial, args.max, args.stable_after, args.loop_window, args.loop_exits)
    except ValueError as exc:
        parser.error(str(exc))
    return Supervisor(command, args.status, args.socket, policy, spawn=spawn).run()


if __name__ == "__main__":
    sys.exit(main())
