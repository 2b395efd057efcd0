"""The controlled-exec launcher: the first and only code that runs between the agent's fork
and the object's program. Started (as root) by :func:`agent.hosting.sandbox.spawn` as::

    python -I -S agent/hosting/sandbox_exec.py SPEC_FD STATUS_FD

It reads a JSON spec from SPEC_FD and then, in this order:

1. ties itself to the agent (``PR_SET_PDEATHSIG``: it dies with the agent) unless it is to
   outlive it (a ``relay`` in the spec), and joins the object's cgroup (its own pid into
   every ``cgroup.procs``), so everything after, the object included, is limited and
   accounted from its first instruction;
2. with ``isolate_pids``: ``unshare(CLONE_NEWPID)`` and a fork. The parent stays outside as
   a *relay*: it reports the child's pid (as the agent sees it) on STATUS_FD, closes every
   other fd, waits for the child and ends the way the child ended (the same exit code, or
   killed by the same signal), so the agent reads the object's own status. With a
   ``relay`` ({"listen", "keep"}: a listening root-only Unix socket and the agent's end of
   the object's channel) it outlives the agent: it keeps ``keep`` open, so the object never
   reads end of stream when the agent dies, hands it (SCM_RIGHTS) to each agent that
   connects as root, and tells the one connected how the object ended. The child is PID
   1 of a new PID namespace: it sees and can signal only its own processes, and when it
   exits the kernel kills everything it left behind. It dies with the relay
   (``PR_SET_PDEATHSIG``), so SIGKILL to the relay or to the cgroup ends the namespace;
3. moves into a private mount namespace (propagation from the agent's still flows in) with a
   fresh ``/proc`` of its PID namespace (only its own processes) and, with ``isolate_fs``,
   every filesystem remounted read-only, then one size-limited tmpfs (``disk_bytes``) that
   holds both the working directory (its subdirectory ``work``, bound onto the working
   directory's path) and a private ``/tmp`` (its subdirectory ``tmp``, bound onto /tmp).
   That tmpfs is the object's quota: a write past it fails with ENOSPC, nothing is killed;
   it lives only in this mount namespace and is gone with the object's last process.
   Paths the object must still read under the covered /tmp (``expose``: its code) are bound
   back read-only at their own paths;
4. sets the rlimits (as root, so hard limits may be raised as well as lowered);
5. closes every fd except 0, 1, 2 and the ones to pass (``close_fds`` did it already; this is
   a second, independent sweep);
6. drops privileges for good: ``setgroups(extra)``, ``setresgid``, ``setresuid`` (the object's
   own uid and gid), and checks that it cannot get them back; then ``PR_SET_NO_NEW_PRIVS`` (no
   setuid binary can raise them again) and ``PR_SET_PDEATHSIG`` again (a credential change
   clears it), checking that its parent is still there;
7. sets the umask, changes into the working directory (as the object's user, which proves
   the user can reach it) and ``execve``s the object with exactly the spec's environment.

STATUS_FD is close-on-exec: it carries JSON lines, ``{"pid": N}`` from the relay and, on any
failure, ``{"stage", "error", "errno"}``, after which the launcher exits 127 without running
the object; end of file with no error means the object's program is running.

Only the standard library is used, and ``-I -S`` keeps the environment and site-packages
out of the launcher, so nothing the object's user controls runs as root.

The same steps serve the fork path (:mod:`agent.hosting.forkserver`): a forked child of the
router's fork server calls :func:`launch` with a :class:`PidfdTie` (it is the fork server's
child, not the agent's, so it watches the agent through a pidfd instead of
``PR_SET_PDEATHSIG``), a ``report`` fd on which the relay writes how the object ended (the
agent is not its parent) and its own last step instead of ``execve``. A *prepared* launcher
(a sandbox slot's, forked ahead) takes steps 1 to 3 up to the read-only view
(:func:`enter`) before its object is known and the rest (:func:`confine`) once the agent sends
the object's spec: :func:`launch` is those two, back to back.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import select
import signal
import socket
import struct
import sys
import time
TYPE_CHECKING = False
if TYPE_CHECKING:  # not imported at run time: the launcher starts lean
    from typing import Any, Callable

CLONE_NEWNS, CLONE_NEWPID = 0x00020000, 0x20000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND = 0x20, 0x400, 0x800, 0x1000
MS_REC, MS_SLAVE, MS_RELATIME, MS_STRICTATIME = 0x4000, 0x80000, 0x200000, 0x1000000
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS = 1, 4, 38
PRIVATE_TMP = "/tmp"

_MOUNT_FLAGS = {"ro": MS_RDONLY, "nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC,
                "noatime": MS_NOATIME, "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME,
                "strictatime": MS_STRICTATIME}
# Left writable in the object's mount namespace: kernel interfaces, whose files carry their
# own permissions (the object is not root), and the device nodes (/dev/null, ptys).
_KEEP_RW = ("/proc", "/sys", "/dev", "/dev/pts")


class LaunchError(Exception):
    def __init__(self, stage: str, exc: BaseException | str) -> None:
        super().__init__(str(exc))
        self.stage = stage
        self.errno = getattr(exc, "errno", None)


_libc = None


def libc() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                                ctypes.c_ulong, ctypes.c_void_p]
        _libc.unshare.argtypes = [ctypes.c_int]
        _libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                                ctypes.c_ulong]
    return _libc


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(source: str | None, target: str, flags: int, fstype: str | None = None,
          data: str | None = None) -> None:
    _check(libc().mount(source.encode() if source else None, target.encode(),
                        fstype.encode() if fstype else None, flags,
                        ctypes.c_char_p(data.encode()) if data else None),
           f"mount {target}")


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and len(field[i + 1:i + 4]) == 3 and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mountinfo() -> list[tuple[str, set[str]]]:
    """(mount point, per-mount options) of every mount this process sees."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            out.append((_unescape(fields[4]), set(fields[5].split(","))))
    return out


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def private_mounts(new_proc: bool) -> None:
    """A mount namespace of its own (mounts and unmounts of the agent's still propagate in),
    with a /proc of this process's PID namespace when ``new_proc``."""
    _check(libc().unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    mount(None, "/", MS_REC | MS_SLAVE)
    if new_proc:
        mount("proc", "/proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "proc")


def read_only_all() -> None:
    """Every filesystem read-only, except /proc, /sys, /dev and /dev/pts."""
    for target, options in mountinfo():
        if "ro" in options:
            continue
        if target in _KEEP_RW or _under(target, "/proc") or _under(target, "/sys") \
                or _under(target, "/dev/pts"):
            continue
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        for opt in options:
            flags |= _MOUNT_FLAGS.get(opt, 0)
        try:
            mount(None, target, flags)
        except OSError as exc:
            # ENOENT: gone meanwhile; EACCES: a FUSE mount without allow_other, which no
            # other user can reach either; EINVAL: a mount point covered by another mount
            # (only the top one is reachable). Anything else leaves a writable fs: fail closed.
            if exc.errno not in (2, 13, 22):
                raise


def _bind_fd(fd: int, target: str) -> None:
    mount(f"/proc/self/fd/{fd}", target, MS_BIND | MS_REC)


def _mkdirs(path: str) -> None:
    """``path`` and its missing parents, root's, 0755 (the object may pass, not write)."""
    if not os.path.isdir(path):
        _mkdirs(os.path.dirname(path))
        os.mkdir(path, 0o755)
        os.chmod(path, 0o755)


def private_space(workdir: str, size: int, inodes: int, uid: int, gid: int,
                  expose: list[str]) -> None:
    """The object's only writable space: one tmpfs of ``size`` bytes whose ``work`` is bound
    onto ``workdir`` (owned by uid:gid, 0700) and whose ``tmp`` is bound onto /tmp (1777).
    Paths in ``expose`` that lie under /tmp stay readable at their own paths (read-only)."""
    keep = []
    for given in expose:
        # At the path as given and as resolved (a symlink on the way need not exist in the
        # new /tmp, and one from elsewhere may lead under it).
        for path in dict.fromkeys((os.path.normpath(given), os.path.realpath(given))):
            if _under(path, PRIVATE_TMP) and path != PRIVATE_TMP and os.path.exists(path):
                keep.append((path, os.open(path, os.O_PATH | os.O_CLOEXEC)))
    # Mounted on the working directory's (empty, root-made) directory for as long as it
    # takes to make its two parts and hold them by fd; then both are bound where they belong.
    mount("tmpfs", workdir, MS_NOSUID | MS_NODEV, "tmpfs",
          f"size={size},nr_inodes={inodes},mode=0755,uid=0,gid=0")
    work, tmp = os.path.join(workdir, "work"), os.path.join(workdir, "tmp")
    os.mkdir(work, 0o700)
    os.chown(work, uid, gid)
    os.chmod(work, 0o700)
    os.mkdir(tmp, 0o700)
    os.chmod(tmp, 0o1777)
    work_fd = os.open(work, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    tmp_fd = os.open(tmp, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    _bind_fd(tmp_fd, PRIVATE_TMP)
    _mkdirs(workdir)  # under /tmp it is in the new one now, else it is the staging mount
    _bind_fd(work_fd, workdir)
    for path, fd in keep:
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            _mkdirs(path)
        else:
            _mkdirs(os.path.dirname(path))
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))
        _bind_fd(fd, path)
        mount(None, path, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    for fd in (work_fd, tmp_fd, *(fd for _, fd in keep)):
        os.close(fd)


def close_other_fds(keep: set[int]) -> None:
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


def drop_privileges(uid: int, gid: int, groups: list[int]) -> None:
    os.setgroups(groups)
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid) \
            or sorted(os.getgroups()) != sorted(set(groups)):
        raise OSError(1, f"credentials did not change to {uid}:{gid}")
    if uid != 0:
        try:
            os.setuid(0)
        except PermissionError:
            pass
        else:
            raise OSError(1, "could regain root after dropping privileges")


def which(name: str, path: str) -> str:
    if "/" in name:
        return name
    for d in path.split(os.pathsep):
        cand = os.path.join(d or ".", name)
        if os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    raise FileNotFoundError(2, f"{name} not found in PATH {path!r}")


def _die_with_parent() -> None:
    _check(libc().prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "PR_SET_PDEATHSIG")


class ParentTie:
    """How a launcher that is the agent's own child dies with it (the exec path):
    ``PR_SET_PDEATHSIG``, and its parent checked to be the agent after each arming (the
    agent may have gone just before). ``parent_pid`` 0: it outlives the agent."""

    def __init__(self, parent_pid: int) -> None:
        self.parent_pid = parent_pid
        #: An fd the relay watches (readable: the agent has gone); none here, the relay
        #: itself dies with the agent through PR_SET_PDEATHSIG.
        self.watch: int | None = None

    def arm(self) -> None:
        if self.parent_pid:
            _die_with_parent()
            self.check()

    def check(self) -> None:
        if self.parent_pid and os.getppid() != self.parent_pid:
            raise OSError(3, "the agent exited during the launch")

    def rearm_object(self) -> None:
        """After the credential change (which clears PR_SET_PDEATHSIG), for an object that
        has no relay: it dies with its parent again."""
        self.arm()


class PidfdTie:
    """How a launcher forked by the fork server dies with the agent (the fork path): its
    parent is the fork server, so it watches the agent's pidfd (``agent_fd``, readable once
    the agent has exited). The relay keeps watching it (:func:`relay`) and ends, the object
    with it. An object without a relay cannot watch: it dies with its parent, the fork
    server, which ends with the agent. ``agent_fd`` None: it outlives the agent."""

    def __init__(self, agent_fd: int | None, server_pid: int) -> None:
        self.watch = agent_fd
        self.server_pid = server_pid

    def arm(self) -> None:
        self.check()

    def check(self) -> None:
        if self.watch is not None and select.select([self.watch], [], [], 0)[0]:
            raise OSError(3, "the agent exited during the launch")

    def rearm_object(self) -> None:
        # (the pidfd is closed by now: the object keeps no fd it was not given)
        if self.watch is not None:
            _die_with_parent()
            if os.getppid() != self.server_pid:
                raise OSError(3, "the fork server exited during the launch")


def relay(child: int, listen: int | None = None, keep: int | None = None,
          watch: int | None = None, report: int | None = None) -> None:
    """The relay's life after the fork: wait for the namespace's init and end as it ended.

    With ``listen`` (a listening Unix socket the agent made, root-only) and ``keep`` (the
    agent's end of the object's channel), the relay outlives the agent: it holds ``keep``
    open, so the object never reads end of stream when the agent dies, and hands it to the
    next agent that connects as root (:func:`serve_agents`). With ``watch`` (the agent's
    pidfd, fork path) it kills itself, and so the object, once the agent has gone. With
    ``report`` it writes ``{"exit": code}`` there before it ends (fork path: the agent is
    not its parent and cannot wait for it)."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # ending by SIGSEGV dumps nothing
    if listen is not None:
        conn = serve_agents(child, listen, keep)
    else:
        conn = None
        if watch is not None:
            _watch_agent(child, watch)
    while True:
        try:
            _, status = os.waitpid(child, 0)
            break
        except ChildProcessError:
            os._exit(127)
        except InterruptedError:
            continue
    code = os.waitstatus_to_exitcode(status)
    line = json.dumps({"exit": code}).encode() + b"\n"
    if conn is not None:
        try:  # the agent attached now reads the object's status here (it is not our parent)
            conn.sendall(line)
        except OSError:
            pass
    if report is not None:
        try:
            os.write(report, line)
        except OSError:
            pass
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {sig})
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)  # a signal whose default is to be ignored
    os._exit(code if os.WIFEXITED(status) else 127)


def exit_status(line: bytes) -> int | None:
    """The object's status from one line a relay or the fork server wrote (``{"exit":
    code}``, :func:`relay`); None for any other line (a partial one, another message)."""
    try:
        info = json.loads(line)
    except ValueError:
        return None
    value = info.get("exit") if isinstance(info, dict) else None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return None


def _watch_agent(child: int, watch: int) -> None:
    """Until the object (``child``) exits; if the agent (pidfd ``watch``) goes first, the
    relay kills itself (the object dies with it: PR_SET_PDEATHSIG)."""
    pidfd = os.pidfd_open(child)
    while True:
        try:
            ready = select.select([pidfd, watch], [], [])[0]
        except InterruptedError:
            continue
        if pidfd in ready:
            os.close(pidfd)
            return
        if watch in ready:
            os.kill(os.getpid(), signal.SIGKILL)


def _peer_uid(conn: socket.socket) -> int:
    _pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                          struct.calcsize("3i")))
    return uid


def serve_agents(child: int, listen: int, keep: int | None) -> socket.socket | None:
    """Until the object (``child``) exits: answer each agent that connects on ``listen``
    (root only, others are closed at once) with ``{"pid": child}`` and, while the relay still
    holds it, the channel's end ``keep`` (SCM_RIGHTS). The newest agent's connection is kept
    (returned: it is told how the object ended); on it, ``release`` makes the relay close
    ``keep``, so the object reads end of stream once that agent closes its own end."""
    lsock = socket.socket(fileno=listen)
    lsock.setblocking(True)
    pidfd = os.pidfd_open(child)
    conn: socket.socket | None = None
    while True:
        watch = [pidfd, lsock] + ([conn] if conn is not None else [])
        try:
            ready = select.select(watch, [], [])[0]
        except InterruptedError:
            continue
        if pidfd in ready:
            lsock.close()
            return conn
        # What the agent attached said first (a release), then a new agent.
        if conn is not None and conn in ready:
            try:
                data = conn.recv(4096)
            except OSError:
                data = b""
            if not data:
                conn.close()
                conn = None
            elif b"release" in data and keep is not None:
                os.close(keep)
                keep = None
        if lsock in ready:
            try:
                new, _ = lsock.accept()
            except OSError:
                continue
            try:
                if _peer_uid(new) != 0:
                    raise PermissionError("not root")
                hello = json.dumps({"pid": child, "relay": os.getpid(),
                                    "channel": keep is not None}).encode() + b"\n"
                if keep is not None:
                    socket.send_fds(new, [hello], [keep])
                else:
                    new.sendall(hello)
            except OSError:
                new.close()
                continue
            if conn is not None:
                conn.close()
            conn = new


def fork_into_pid_namespace(status_fd: int, relay_fds: dict | None = None,
                            watch: int | None = None, report: int | None = None,
                            start: int | None = None) -> int:
    """unshare(CLONE_NEWPID) and fork: returns (in the child, PID 1 of the new namespace) the
    read end of a pipe whose end of file means the relay has gone. The parent never returns;
    with ``relay_fds`` ({"listen", "keep"}) it serves agents (:func:`serve_agents`);
    ``watch`` and ``report``: see :func:`relay`. ``start`` (a prepared launcher's, fork
    path): a socket on which the relay first waits for its object's start
    (:func:`await_start`), which brings ``relay_fds`` and says whether it outlives the agent."""
    relay_fds = relay_fds or {}
    listen, keep = relay_fds.get("listen"), relay_fds.get("keep")
    _check(libc().unshare(CLONE_NEWPID), "unshare(CLONE_NEWPID)")
    alive_r, alive_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(alive_w)
        if start is not None:
            os.close(start)  # the relay's alone
        return alive_r
    try:
        os.close(alive_r)
        os.write(status_fd, json.dumps({"pid": pid}).encode() + b"\n")
        null = os.open("/dev/null", os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        # The object's socket and log, STATUS_FD too; an agent's listening socket and its
        # end of the channel stay when the relay outlives the agent.
        close_other_fds({0, 1, 2, alive_w,
                         *(fd for fd in (listen, keep, watch, report, start) if fd is not None)})
        if start is not None:
            listen, keep, watch = await_start(pid, start, watch)
    finally:
        relay(pid, listen, keep, watch, report)
    raise AssertionError("unreachable")


def await_start(child: int, start: int, watch: int | None
                ) -> tuple[int | None, int | None, int | None]:
    """A prepared launcher's relay (fork path) until its object starts: one message on
    ``start`` (``{"outlive": bool}`` with the relay socket's listening fd and the agent's
    end of the channel, when the object has them) gives :func:`relay` its ``listen``,
    ``keep`` and ``watch`` (None once the object outlives the agent). The object's process
    ending first goes straight to :func:`relay` (which reports it); the agent gone (``watch``
    readable), the socket closed (the slot let go) or anything but that message: the relay
    kills itself, and the waiting child dies with it."""
    sock = socket.socket(fileno=start)
    pidfd = os.pidfd_open(child)
    try:
        while True:
            try:
                ready = select.select([sock, pidfd, *([watch] if watch is not None else [])],
                                      [], [])[0]
            except InterruptedError:
                continue
            if pidfd in ready:
                return None, None, watch
            if watch is not None and watch in ready:
                break
            if sock in ready:
                data, fds, _flags, _addr = socket.recv_fds(sock, 4096, 2)
                msg = json.loads(data) if data else None
                if not isinstance(msg, dict) or not isinstance(msg.get("outlive"), bool) \
                        or len(fds) != int(msg.get("fds", -1)) or len(fds) > 2 \
                        or (msg["outlive"] and not fds):
                    break
                listen, keep = (fds + [None, None])[:2]
                if msg["outlive"] and watch is not None:
                    os.close(watch)
                    watch = None
                return listen, keep, watch
    except (OSError, ValueError):
        pass
    finally:
        os.close(pidfd)
        sock.close()
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("unreachable")


def join_cgroups(procs_files: list[str], threads: int | None = None) -> None:
    """Move this process into each cgroup (its ``cgroup.procs``). In a v1 hierarchy, a
    process of one thread writes "0" to ``tasks`` instead: the kernel then moves the caller
    alone without taking the global threadgroup lock for writing, whose RCU grace period
    made each start wait (8 ms median here, 16 ms at worst, against 1 ms); for one thread
    that is the same move."""
    single = (len(os.listdir("/proc/self/task")) if threads is None else threads) == 1
    for procs in procs_files:
        tasks = os.path.join(os.path.dirname(procs), "tasks")
        if single and os.path.basename(procs) == "cgroup.procs" and os.path.isfile(tasks):
            target, value = tasks, "0"
        else:
            target, value = procs, str(os.getpid())
        with open(target, "w") as f:
            f.write(value)


def exec_program(spec: dict) -> None:
    """The exec path's last step: the object's program, with exactly the spec's environment."""
    env = spec.get("env", {})
    argv = spec["argv"]
    os.execve(which(argv[0], env.get("PATH", os.defpath)), argv, env)


def start_trace(spec: dict) -> list | None:
    """The stamps of this start when the agent asked for them (``spec["trace"]``: a list,
    maybe holding the fork server's first ones; :envvar:`MOAT_START_TRACE`), else None.
    Each is ``[stage, CLOCK_MONOTONIC seconds]`` (one clock for every process here), sent
    on the status pipe as ``{"trace": [...]}`` just before the object's program runs."""
    trace = spec.get("trace")
    if not trace and not isinstance(trace, list):
        return None
    return trace if isinstance(trace, list) else []


def mark(trace: list | None, stage: str) -> None:
    if trace is not None:
        trace.append([stage, time.monotonic()])


def enter(spec: dict, status_fd: int, *, tie: ParentTie | PidfdTie,
          report: int | None = None, trace: list | None = None,
          start: int | None = None) -> int | None:
    """Steps 1 to 3 of the module's docstring, all that does not depend on the object but its
    cgroup: tied to the agent, in the cgroup, the PID namespace (the relay stays outside:
    this returns in the namespace's PID 1 only, the read end of the relay's alive pipe, or
    None without ``isolate_pids``), the mount namespace and, with ``isolate_fs``, every
    filesystem read-only. ``start``: see :func:`fork_into_pid_namespace`. LaunchError."""
    stage = "prctl"
    try:
        tie.arm()
        stage = "cgroup"
        join_cgroups(spec.get("cgroup_procs", []))
        mark(trace, "cgroup")
        alive = None
        if spec.get("isolate_pids"):
            stage = "pid namespace"
            alive = fork_into_pid_namespace(status_fd, spec.get("relay"), tie.watch, report,
                                            start)
            mark(trace, "pid namespace")
        if spec.get("isolate_fs") or spec.get("isolate_pids"):
            stage = "mount namespace"
            private_mounts(new_proc=bool(spec.get("isolate_pids")))
            mark(trace, "mount namespace")
        if spec.get("isolate_fs"):
            stage = "isolate_fs"
            read_only_all()
            mark(trace, "read-only")
        return alive
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the agent
        raise LaunchError(stage, exc) from exc


def confine(spec: dict, status_fd: int, *, alive: int | None,
            tie: ParentTie | PidfdTie | None = None, trace: list | None = None) -> None:
    """Steps 3 (the object's private space) to 7 but the exec, after :func:`enter` (now, or
    ahead in a prepared launcher): its tmpfs, rlimits, no fd but the spec's, its uid and
    gid for good, no new privileges, dying with the relay (``alive``) or with the agent
    (``tie``, no relay), its working directory. LaunchError."""
    stage = "private space"
    try:
        if spec.get("isolate_fs"):
            os.umask(0o022)
            private_space(os.path.realpath(spec["cwd"]), int(spec["disk_bytes"]),
                          int(spec["disk_inodes"]), spec["uid"], spec["gid"],
                          [os.path.abspath(p) for p in spec.get("expose", [])])
            mark(trace, "private space")
        stage = "rlimits"
        for name, (soft, hard) in spec.get("rlimits", {}).items():
            resource.setrlimit(getattr(resource, "RLIMIT_" + name), (soft, hard))
        stage = "fds"
        keep = {0, 1, 2, status_fd, *spec.get("pass_fds", [])}
        if alive is not None:
            keep.add(alive)
        close_other_fds(keep)
        for fd in spec.get("pass_fds", []):
            os.set_inheritable(fd, True)
        stage = "user"
        os.umask(spec.get("umask", 0o077))
        drop_privileges(spec["uid"], spec["gid"], spec.get("groups", []))
        stage = "prctl"
        if spec.get("no_new_privs", True):
            _check(libc().prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS")
        if alive is not None:
            _die_with_parent()  # with the relay, whose end of the pipe closes when it goes
            if select.select([alive], [], [], 0)[0]:
                raise OSError(3, "the relay exited during the launch")
            os.close(alive)
        elif tie is not None:
            tie.rearm_object()
        stage = "chdir"
        os.chdir(spec["cwd"])
        mark(trace, "user")
        if trace is not None:
            os.write(status_fd, json.dumps({"trace": trace}).encode() + b"\n")
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the agent
        raise LaunchError(stage, exc) from exc


def launch(spec: dict, status_fd: int, *, run: Callable[[dict], None] = exec_program,
           tie: ParentTie | PidfdTie | None = None, report: int | None = None) -> None:
    """Confine this process as ``spec`` says (steps 1 to 7 of the module's docstring:
    :func:`enter`, then :func:`confine`), then ``run(spec)``: :func:`exec_program` here, the
    fork server's own step on the fork path. ``tie``: how it dies with the agent
    (:class:`ParentTie` of ``spec["parent_pid"]`` by default); ``report``: where the relay
    writes how the object ended."""
    tie = tie if tie is not None else ParentTie(int(spec.get("parent_pid") or 0))
    trace = start_trace(spec)
    alive = enter(spec, status_fd, tie=tie, report=report, trace=trace)
    confine(spec, status_fd, alive=alive, tie=tie, trace=trace)
    try:
        run(spec)
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the agent
        raise LaunchError("exec", exc) from exc


def report_failure(status_fd: int, exc: BaseException) -> int:
    """Write why the launch failed to ``status_fd`` (``{"stage", "error", "errno"}``: the
    agent's :func:`agent.hosting.sandbox._read_report`); 127, the launcher's exit code."""
    if isinstance(exc, LaunchError):
        report = {"stage": exc.stage, "error": str(exc), "errno": exc.errno}
    else:
        report = {"stage": "spec", "error": repr(exc), "errno": getattr(exc, "errno", None)}
    try:
        os.write(status_fd, json.dumps(report).encode() + b"\n")
    except OSError:
        pass
    return 127


def launch_and_report(spec: dict, status_fd: int, **how: Any) -> int:
    """:func:`launch`; a failure is written to ``status_fd`` as ``{"stage", "error",
    "errno"}`` and 127 returned (the object never ran)."""
    try:
        launch(spec, status_fd, **how)
    except Exception as exc:  # noqa: BLE001
        return report_failure(status_fd, exc)
    return 127


def _read_all(fd: int) -> bytes:
    chunks = []
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def main(argv: list[str]) -> int:
    try:
        spec_fd, status_fd = int(argv[1]), int(argv[2])
    except (IndexError, ValueError):
        sys.stderr.write("usage: sandbox_exec.py SPEC_FD STATUS_FD (started by agent.hosting.sandbox)\n")
        return 2
    try:
        os.set_inheritable(status_fd, False)  # closes at exec: EOF tells the agent "started"
        spec = json.loads(_read_all(spec_fd))
        os.close(spec_fd)
    except Exception as exc:  # noqa: BLE001
        report = {"stage": "spec", "error": repr(exc), "errno": getattr(exc, "errno", None)}
        try:
            os.write(status_fd, json.dumps(report).encode() + b"\n")
        except OSError:
            pass
        return 127
    return launch_and_report(spec, status_fd)


if __name__ == "__main__":
    os._exit(main(sys.argv))
