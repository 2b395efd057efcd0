"""Mininet node classes for MOAT: routers that forward and route, hosts with a gateway.

Everything a node needs arrives as node params from the topology (which stays pure data),
so ``mn --custom`` and :func:`topologies.net.build_net` build identical networks:

* :class:`MoatRouter` — turns on IPv4 forwarding in its namespace, turns off reverse-path
  filtering (see :meth:`MoatRouter.config` for why), installs the static routes the
  topology computed (``routes=[(prefix, via), ...]``) and optionally runs a daemon.
* :class:`MoatHost` — installs its default route (``gateway=``) and any extra routes.

The daemon hook (:class:`ManagedDaemonMixin`) is generic on purpose: the agent daemon is
started by giving a router ``daemon_argv`` (a node param, or a class attribute of a
subclass, or by overriding :meth:`ManagedDaemonMixin.daemon_command`). The process runs
inside the node's namespaces, in a session of its own, with stdout and stderr appended to
``daemon_log``. Stopping the node stops the daemon first — SIGTERM to its process group,
a bounded wait, then SIGKILL — and reaps it, so a stopped net leaves no orphans. A
router's daemon runs under :mod:`agent.supervisor` (:func:`supervised_argv`), which restarts
it when it dies and stays in the same process group, so the same stop ends both.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import stat
import subprocess
import tempfile
import weakref
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, ClassVar

import topologies._mininet  # noqa: F401  - first: repairs logging (see module)
from mininet.node import Host, Node

from topologies.errors import DaemonError, RouteInstallError

__all__ = ["ManagedDaemonMixin", "MoatRouter", "MoatHost", "install_routes", "processes_in_netns_of",
           "supervised_argv"]

log = logging.getLogger(__name__)

# Nodes whose daemon may still be running; stopped at interpreter exit as a last resort
# for scripts that forget ``net.stop()`` (a ``finally`` is still the right way).
_live: "weakref.WeakSet[ManagedDaemonMixin]" = weakref.WeakSet()


@atexit.register
def _stop_leftover_daemons() -> None:
    for node in list(_live):
        try:
            node.stop_daemon()
        except Exception:  # noqa: BLE001 - best effort at exit, never mask the real error
            log.exception("could not stop the daemon of %s at exit", node)


def processes_in_netns_of(pid: int, proc: Path = Path("/proc")) -> list[int]:
    """Every process (but ``pid``) in the network namespace ``pid`` is in: what a node
    leaves behind that its daemon's process-group kill does not reach (a daemon's children
    in sessions of their own, such as sshd's per-connection processes). Scoped by the
    namespace's identity, never by a name."""
    try:
        mine = os.readlink(proc / str(pid) / "ns" / "net")
    except OSError:
        return []
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == pid:
            continue
        try:
            if os.readlink(entry / "ns" / "net") == mine:
                found.append(int(entry.name))
        except OSError:
            continue  # gone meanwhile, or not ours to read
    return sorted(found)


#: Longest command line sent to a node's shell at once: Mininet talks to it over a pty, whose
#: line discipline cuts a line at 4095 characters.
MAX_SHELL_LINE = 3000


def route_batch_commands(routes: Iterable[Sequence[str]], limit: int = MAX_SHELL_LINE) -> list[str]:
    """Shell commands installing every ``(prefix, via)`` route with ``ip -batch``, each at
    most ``limit`` characters. Pure, for unit tests. A few round trips to the node's shell
    instead of one per route: a scale router has a route per network, and Mininet's ``cmd``
    costs a few milliseconds each, ten times that while a hundred agents start (issue 15)."""
    tail = " | ip -batch - 2>&1"
    head = "printf '%s\\n'"
    commands: list[str] = []
    current = head
    for prefix, via in routes:
        for part in (str(prefix), str(via)):
            if not part or any(c not in "0123456789abcdefABCDEF.:/" for c in part):
                raise RouteInstallError(f"not an address or prefix: {part!r}")
        item = f" 'route replace {prefix} via {via}'"
        if current != head and len(current) + len(item) + len(tail) > limit:
            commands.append(current + tail)
            current = head
        current += item
    if current != head:
        commands.append(current + tail)
    return commands


def install_routes(node: Node, routes: Iterable[Sequence[str]]) -> None:
    """Install ``(prefix, via)`` routes in ``node``'s namespace, raising on any refusal.

    ``ip route replace`` rather than ``add`` keeps a second configuration idempotent; many
    at a time with ``ip -batch`` (:func:`route_batch_commands`), which stops at the first
    refusal and says which line.
    """
    for command in route_batch_commands(routes):
        out = node.cmd(command).strip()
        if out:
            raise RouteInstallError(f"{node.name}: ip route replace: {out}")


def _sysctl(node: Node, key: str, value: object) -> None:
    """Set one sysctl inside ``node``'s network namespace, raising on failure."""
    _sysctls(node, [(key, value)])


def _sysctls(node: Node, settings: Iterable[tuple[str, object]]) -> None:
    """Set sysctls inside ``node``'s network namespace in one ``sysctl`` call (one round
    trip to its shell), in order, raising on any failure."""
    pairs = [f"{key}={value}" for key, value in settings]
    while pairs:
        batch: list[str] = []
        while pairs and len(" ".join(batch + pairs[:1])) < MAX_SHELL_LINE - 40:
            batch.append(pairs.pop(0))
        if not batch:
            raise RouteInstallError(f"{node.name}: sysctl {pairs[0][:80]}...: too long")
        out = node.cmd("sysctl -q -w " + " ".join(batch) + " 2>&1").strip()
        if out:
            raise RouteInstallError(f"{node.name}: sysctl {' '.join(batch)}: {out}")


def open_private_log(path: Path) -> IO[bytes]:
    """``path`` opened for appending, made 0600 if new (the mode is given to ``open(2)``, so
    there is no moment it is readable by others) and never through a symbolic link. A
    daemon's output may carry what its configuration holds (keys in an error message)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    return os.fdopen(fd, "ab")


class ManagedDaemonMixin:
    """Start one long-running process inside a Mininet node and stop it with the node.

    Mix in before the Mininet node class (``class X(ManagedDaemonMixin, Node)``).
    """

    #: Default argv for every node of the class (``None``: no daemon).
    daemon_argv: ClassVar[Sequence[str] | None] = None
    #: Seconds to wait after SIGTERM before SIGKILL.
    daemon_stop_timeout: ClassVar[float] = 5.0
    #: The daemon's umask (``None``: the caller's). Server daemons that write into the run
    #: directory (sshd's pid file) get 077, so what they create is root-only from creation.
    daemon_umask: ClassVar[int | None] = None

    name: str
    params: dict[str, Any]
    popen: Any

    def daemon_command(self) -> list[str] | None:
        """The argv to run: the ``daemon_argv`` node param, else the class attribute.

        Override to derive the command from the node (its name, its config file).
        """
        argv = self.params.get("daemon_argv")
        if argv is None:
            argv = type(self).daemon_argv
        return [str(a) for a in argv] if argv else None

    def default_daemon_log(self) -> Path:
        """Where the daemon's output goes when no ``daemon_log`` param is given.

        A subdirectory, because ``mn -c`` deletes ``/tmp/*.log``.
        """
        return Path(tempfile.gettempdir()) / "moat" / f"{self.name}-daemon.log"

    @property
    def daemon(self) -> subprocess.Popen[bytes] | None:
        """The daemon's ``Popen`` (running or not), or ``None`` if never started."""
        return getattr(self, "_daemon", None)

    @property
    def daemon_pid(self) -> int | None:
        """PID of the running daemon, or ``None``."""
        proc = self.daemon
        return proc.pid if proc is not None and proc.poll() is None else None

    def start_daemon(
        self,
        argv: Sequence[str],
        log_path: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Run ``argv`` in this node's namespaces and return its ``Popen``.

        ``Node.popen`` runs ``mnexec -d -a <pid> argv``: mnexec calls ``setsid`` and then
        execs argv, so the returned pid *is* the daemon and leads its own process group
        (we must not pass ``start_new_session``: mnexec would then fork and the pid we hold
        would be a parent that already exited).
        """
        if self.daemon_pid is not None:
            raise DaemonError(f"{self.name}: daemon already running (pid {self.daemon_pid})")
        if not argv:
            raise DaemonError(f"{self.name}: empty daemon argv")
        path = Path(log_path) if log_path else self.default_daemon_log()
        path.parent.mkdir(parents=True, exist_ok=True)
        logf = open_private_log(path)
        full_env = dict(os.environ)
        full_env.update(env or {})
        extra: dict[str, Any] = {}
        if self.daemon_umask is not None:
            extra["umask"] = self.daemon_umask
        try:
            proc = self._launch([str(a) for a in argv], logf, full_env, cwd, extra)
        except OSError as exc:
            logf.close()
            raise DaemonError(f"{self.name}: cannot start {list(argv)}: {exc}") from exc
        self._daemon = proc
        self._daemon_log = logf
        self.daemon_log_path = path
        _live.add(self)
        log.info("%s: started daemon pid %d: %s (log %s)", self.name, proc.pid, list(argv), path)
        return proc

    def _launch(self, argv: list[str], logf: IO[bytes], env: dict[str, str],
                cwd: str | os.PathLike[str] | None, extra: dict[str, Any]) -> Any:
        """Run ``argv`` in the node (``mnexec -d -a``); a ``Popen``-like handle."""
        return self.popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                          env=env, cwd=None if cwd is None else str(cwd), **extra)

    def stop_daemon(self, timeout: float | None = None) -> int | None:
        """Stop and reap the daemon and anything left in its process group.

        Returns its exit status (``None`` if there was none). Safe to call repeatedly.
        """
        proc = self.daemon
        if proc is None:
            return None
        wait = self.daemon_stop_timeout if timeout is None else timeout
        if proc.poll() is None:
            self._signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                log.warning(
                    "%s: daemon pid %d ignored SIGTERM for %.1fs, sending SIGKILL",
                    self.name, proc.pid, wait,
                )
                self._signal_group(proc.pid, signal.SIGKILL)
                proc.wait()
        # The leader is reaped; its children (if any) still carry its pgid, which the
        # kernel does not hand out again while they live, so this cannot hit strangers.
        self._signal_group(proc.pid, signal.SIGKILL)
        logf = getattr(self, "_daemon_log", None)
        if logf is not None:
            logf.close()
            self._daemon_log = None
        _live.discard(self)
        log.info("%s: daemon pid %d exited with %s", self.name, proc.pid, proc.returncode)
        return proc.returncode

    @staticmethod
    def _signal_group(pgid: int, sig: signal.Signals) -> None:
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            pass

    def _maybe_start_daemon(self, daemon_log: Any, daemon_env: Any, daemon_cwd: Any) -> None:
        argv = self.daemon_command()
        if argv:
            self.start_daemon(argv, log_path=daemon_log, env=daemon_env, cwd=daemon_cwd)

    def terminate(self) -> None:
        """Stop the daemon before Mininet kills the node's shell and namespace."""
        try:
            self.stop_daemon()
        finally:
            super().terminate()  # type: ignore[misc]


#: Reverse-path filtering on a router (net.ipv4.conf.<name>.rp_filter; the kernel applies
#: max(all, <interface>)): ``all`` 0 so each interface's own value counts, loose (2) on every
#: interface and for interfaces made later (``default``), off on ``lo``. The agent turns it off
#: on its tunnel devices only (agent/mobility/tunnel/base.py RpFilter).
RP_FILTER_ALL, RP_FILTER_INTERFACE, RP_FILTER_LO = 0, 2, 0


def supervised_argv(argv: Sequence[str], node: str, log_path: Path) -> list[str]:
    """``argv`` run under :mod:`agent.supervisor`, which restarts it when it dies (issue 13).

    An agent's argv (``... -m agent --config FILE``) gets the status file and the control
    socket of its configuration (``<run>/<router>.supervisor.json``, ``<run>/<router>.sock``),
    where :class:`topologies.client.RunClient` finds them; any other daemon gets a status
    file beside its log."""
    import sys

    argv = [str(a) for a in argv]
    status = log_path.parent / f"{node}.supervisor.json"
    extra: list[str] = []
    if "--config" in argv[:-1] and "agent" in argv:
        from agent.core.config import AgentConfig
        from agent.supervisor import status_path

        config = AgentConfig.load(Path(argv[argv.index("--config") + 1]))
        status = status_path(config.run_dir, config.name)
        extra = ["--socket", str(config.socket_path)]
    return [sys.executable, "-m", "agent.supervisor", "--status", str(status), *extra, "--", *argv]


class MoatRouter(ManagedDaemonMixin, Node):
    """A router: forwarding on, loose rp_filter, computed static routes, optional daemon.

    Node params (besides Mininet's ``ip``/``mac``): ``routes`` — list of ``(prefix, via)``;
    ``daemon_argv``, ``daemon_log``, ``daemon_env``, ``daemon_cwd`` — see
    :class:`ManagedDaemonMixin`; ``send_redirects`` (default False). Other params
    (``network``, ``role``, ``border``) are metadata for experiments and are ignored here.

    A router's daemon (its agent) runs under :mod:`agent.supervisor` (``daemon_supervised``,
    on by default): the node's daemon pid is the supervisor's, the agent is its child in the
    same process group, so stopping the node (SIGTERM to the group, then SIGKILL) stops both
    and a killed or crashed agent is started again within about a second.
    """

    #: Run the daemon under :mod:`agent.supervisor` (restarts it with backoff).
    daemon_supervised: ClassVar[bool] = True
    #: The run's agent zygote (``daemon_zygote`` node param, :class:`agent.zygote.Zygote`):
    #: when set, the supervised agent is forked from it into this node instead of exec'd.
    zygote: Any = None

    def _launch(self, argv: list[str], logf: IO[bytes], env: dict[str, str],
                cwd: str | os.PathLike[str] | None, extra: dict[str, Any]) -> Any:
        """Fork the supervised agent from the run's zygote (issue 15), else exec it."""
        if self.zygote is None or "agent.supervisor" not in argv[1:3]:
            return super()._launch(argv, logf, env, cwd, extra)
        from agent.zygote import ZygoteError, current_umask

        try:
            return self.zygote.spawn(self.name, self.pid, argv, logf.fileno(), env,
                                     None if cwd is None else str(cwd),
                                     extra.get("umask", current_umask()),
                                     mounts=host_cgroup_mounts())
        except ZygoteError as exc:  # gone or refusing: this router's agent is exec'd instead
            log.warning("%s: %s; starting its agent by exec", self.name, exc)
            restore_cgroup_mounts(self)  # what the zygote's child would have mounted
            return super()._launch(argv, logf, env, cwd, extra)

    def start_daemon(
        self,
        argv: Sequence[str],
        log_path: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """:meth:`ManagedDaemonMixin.start_daemon` of ``argv`` under the supervisor."""
        if self.daemon_supervised and argv and "agent.supervisor" not in [str(a) for a in argv]:
            path = Path(log_path) if log_path else self.default_daemon_log()
            argv = supervised_argv(argv, self.name, path)
        return super().start_daemon(argv, log_path=log_path, env=env, cwd=cwd)

    def config(  # type: ignore[override]
        self,
        routes: Iterable[Sequence[str]] | None = None,
        daemon_argv: Sequence[str] | None = None,
        daemon_log: str | os.PathLike[str] | None = None,
        daemon_env: Mapping[str, str] | None = None,
        daemon_cwd: str | os.PathLike[str] | None = None,
        send_redirects: bool = False,
        daemon_zygote: Any = None,
        **params: Any,
    ) -> dict[str, Any]:
        """Configure addresses (Mininet), then forwarding, filtering, routes and daemon.

        rp_filter is loose (2) on every interface and on ``default`` (interfaces made later),
        ``all`` is 0 so that the per-interface values count, and ``lo`` is 0. Strict (1)
        cannot be used on a router's LAN or backbone interfaces: mobile objects make routing
        asymmetric on purpose (a foreign router forwards replies whose source is a *home*
        address, triangular routing, so they arrive on interfaces the reverse route does
        not point at). Loose still drops a packet whose source no route reaches (routers
        have no default route), such as a spoofed outside address on a backbone link. The
        agent turns filtering off on its tunnel devices alone, where decapsulated packets
        come in. ICMP redirects are off by default so that traffic keeps the paths the
        topology computed (and the captures show them).

        accept_local is on for the same reason: while an object moves, its home address is
        on this router (the new place) and a reply the old place sent from it a moment
        earlier may still pass through here on its way to the client; without it the
        kernel drops that reply as a martian (a source address it owns).
        """
        result = super().config(**params)
        settings: list[tuple[str, object]] = [("net.ipv4.ip_forward", 1)]
        names = ["all", "default"] + [i.name for i in self.intfList() if i.name != "lo"]
        for name in names:
            settings.append((f"net.ipv4.conf.{name}.rp_filter", RP_FILTER_INTERFACE))
            settings.append((f"net.ipv4.conf.{name}.accept_local", 1))
        settings.append(("net.ipv4.conf.all.rp_filter", RP_FILTER_ALL))
        settings.append(("net.ipv4.conf.lo.rp_filter", RP_FILTER_LO))
        if not send_redirects:
            settings += [(f"net.ipv4.conf.{name}.send_redirects", 0) for name in names]
        _sysctls(self, settings)  # in this order, in one call
        install_routes(self, routes or ())
        self.zygote = daemon_zygote
        if self.zygote is None or not self.daemon_command():
            restore_cgroup_mounts(self)
        # else the zygote's child mounts them, in-process, before the agent (_launch): some
        # 26 forks of the node's shell less per router (about 5 s of 102 routers' build).
        self._maybe_start_daemon(daemon_log, daemon_env, daemon_cwd)
        return result


CGROUP_ROOT = "/sys/fs/cgroup"
_GENERIC_MOUNT_OPTIONS = {"rw", "ro", "nosuid", "nodev", "noexec", "relatime", "noatime",
                          "nsdelegate", "memory_recursiveprot", "seclabel"}


def cgroup_mounts(mounts_text: str, root: str = CGROUP_ROOT) -> list[tuple[str, str, str, str]]:
    """``(fstype, source, target, data)`` of each mount that makes, in a node, the cgroup
    filesystems the host has under ``root`` (from the host's ``/proc/self/mounts``), in the
    order to mount them. Pure, for unit tests.

    ``mnexec -n`` gives each node a private mount namespace and a fresh sysfs on ``/sys`` (so
    ``/sys/class/net`` shows the node's interfaces); that sysfs hides the host's cgroup
    mounts, and the routers' VMs need them to confine objects. Mounting a cgroup hierarchy
    again with the same options attaches the *same* hierarchy, so limits set from inside the
    node are the host's limits.
    """
    mounts: list[tuple[str, str, str, str]] = []
    for line in mounts_text.splitlines():
        parts = line.split()
        if len(parts) < 4:
            continue
        source, target, fstype, options = parts[:4]
        if not (target == root or target.startswith(root + "/")):
            continue
        if fstype == "tmpfs" and target == root:
            mounts.insert(0, ("tmpfs", "tmpfs", target, "mode=755"))
        elif fstype == "cgroup":
            opts = ",".join(o for o in options.split(",") if o not in _GENERIC_MOUNT_OPTIONS)
            mounts.append(("cgroup", source, target, opts))
        elif fstype == "cgroup2":
            mounts.append(("cgroup2", source, target, ""))
    return mounts


def cgroup_mount_commands(mounts_text: str, root: str = CGROUP_ROOT) -> list[str]:
    """:func:`cgroup_mounts` as shell commands (what a node's shell runs). Pure."""
    cmds: list[str] = []
    for fstype, source, target, data in cgroup_mounts(mounts_text, root):
        if fstype == "tmpfs":
            cmds.append(f"mount -t tmpfs -o {data} tmpfs {target}")
        elif fstype == "cgroup":
            cmds.append(f"mkdir -p {target} && mount -t cgroup -o {data} {source} {target}")
        else:
            cmds.append(f"mkdir -p {target} && mount -t cgroup2 {source} {target}")
    return cmds


def host_cgroup_mounts() -> list[tuple[str, str, str, str]]:
    """:func:`cgroup_mounts` of this process's mount namespace (none if unreadable)."""
    try:
        return cgroup_mounts(Path("/proc/self/mounts").read_text())
    except OSError:
        return []


def restore_cgroup_mounts(node: Node) -> None:
    """Make the host's cgroups visible in ``node`` (see :func:`cgroup_mount_commands`)."""
    if node.cmd(f"ls {CGROUP_ROOT} 2>/dev/null").strip():
        return  # visible already (no private sysfs here)
    try:
        mounts = Path("/proc/self/mounts").read_text()
    except OSError:
        return
    cmds = cgroup_mount_commands(mounts)
    if not cmds:
        return
    # One round trip: each mount in turn, stopping at the first that fails (as one by one).
    out = node.cmd(" && ".join(f"{{ {cmd} ; }} 2>&1" for cmd in cmds)).strip()
    if out:
        log.warning("%s: mounting the host's cgroups: %s (objects on this router run without "
                    "cgroup limits)", node.name, out)


class MoatHost(ManagedDaemonMixin, Host):
    """A host: Mininet's host plus a default route and optional extra routes.

    Node params: ``gateway`` — next hop of the default route; ``routes`` — extra
    ``(prefix, via)`` routes (used only when a single gateway cannot serve the host);
    the daemon params of :class:`ManagedDaemonMixin` (e.g. a DNS or SSH server).
    """

    def config(  # type: ignore[override]
        self,
        gateway: str | None = None,
        routes: Iterable[Sequence[str]] | None = None,
        daemon_argv: Sequence[str] | None = None,
        daemon_log: str | os.PathLike[str] | None = None,
        daemon_env: Mapping[str, str] | None = None,
        daemon_cwd: str | os.PathLike[str] | None = None,
        **params: Any,
    ) -> dict[str, Any]:
        """Configure addresses (Mininet), then the default route, routes and daemon."""
        result = super().config(**params)
        if gateway:
            out = self.cmd(f"ip route replace default via {gateway}").strip()
            if out:
                raise RouteInstallError(f"{self.name}: default via {gateway}: {out}")
        install_routes(self, routes or ())
        self._maybe_start_daemon(daemon_log, daemon_env, daemon_cwd)
        return result


class ServerHost(MoatHost):
    """A host that runs one server daemon (the remote site's sshd, the DNS server's dnsmasq)
    with its files in a directory of the run: ``<run>/<node>`` under ``MOAT_RUN_ID``, else
    one of its own (plain ``mn --custom``), removed with the node. The directory is root-only
    (0700) and the daemon runs with umask 077: what either writes there is root's alone."""

    daemon_umask: ClassVar[int | None] = 0o077

    def setup_run_dir(self, run_dir: str | os.PathLike[str] | None, kind: str) -> Path:
        """Set and make :attr:`run_dir` (an explicit one, the run's, or a fresh one), 0700:
        made so by ``mkdir``, or narrowed to it if it existed wider (never widened)."""
        from topologies.run import ENV_RUN_ID, run_root

        self._made_run_dir = False
        if run_dir is not None:
            self.run_dir = Path(run_dir)
        elif os.environ.get(ENV_RUN_ID):
            self.run_dir = run_root() / os.environ[ENV_RUN_ID] / self.name
        else:
            base = Path(tempfile.gettempdir()) / "moat"
            base.mkdir(parents=True, exist_ok=True)
            self.run_dir = Path(tempfile.mkdtemp(prefix=f"{self.name}-{kind}-", dir=base))
            self._made_run_dir = True
        self.run_dir.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(self.run_dir, 0o700)
        except FileExistsError:
            pass
        self.run_dir = self.run_dir.resolve()
        st = os.lstat(self.run_dir)
        if st.st_mode & 0o077:
            os.chmod(self.run_dir, stat.S_IMODE(st.st_mode) & 0o700)
        return self.run_dir

    def wait_for_log(self, marker: str, what: str, timeout: float) -> None:
        """Until the daemon's log says ``marker`` (it is ready); raise :class:`DaemonError`
        with the daemon's own words if it exits first or stays silent for ``timeout`` s."""
        from agent.core.wait import WaitTimeout, wait_until

        log_path = Path(getattr(self, "daemon_log_path", self.default_daemon_log()))
        text = ""

        def ready() -> bool:
            nonlocal text
            text = log_path.read_text(errors="replace") if log_path.exists() else ""
            if marker in text:
                return True
            proc = self.daemon
            if proc is None or proc.poll() is not None:
                code = None if proc is None else proc.returncode
                raise DaemonError(f"{self.name}: {what} exited ({code}): {text.strip()[-800:]}")
            return False

        try:
            wait_until(ready, timeout, interval=0.02, what=f"{self.name}: {what} ready")
        except WaitTimeout:
            raise DaemonError(f"{self.name}: {what} not ready after {timeout}s: {text.strip()[-800:]}") from None

    def terminate(self) -> None:
        try:
            super().terminate()
        finally:
            if getattr(self, "_made_run_dir", False):
                import shutil

                shutil.rmtree(self.run_dir, ignore_errors=True)
