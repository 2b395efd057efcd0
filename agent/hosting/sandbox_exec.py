"""The controlled-exec launcher: the first and only code that runs between the agent's fork
and the object's program. Started (as root) by :func:`agent.hosting.sandbox.spawn` as::

    python -I -S agent/sandbox_exec.py SPEC_FD STATUS_FD

It reads a JSON spec from SPEC_FD and then, in this order:

1. joins the object's cgroup (its own pid into every ``cgroup.procs``), so everything after,
   the object included, is limited and accounted from its first instruction;
2. optionally moves into a private mount namespace in which every filesystem is read-only
   except the object's working directory (``isolate_fs``);
3. sets the rlimits (as root, so hard limits may be raised as well as lowered);
4. closes every fd except 0, 1, 2 and the ones to pass (``close_fds`` did it already; this is
   a second, independent sweep);
5. drops privileges for good: ``setgroups(extra)``, ``setresgid``, ``setresuid``, and checks
   that it cannot get them back; then ``PR_SET_NO_NEW_PRIVS`` (no setuid binary can raise
   them again) and ``PR_SET_PDEATHSIG`` (the object dies with its agent);
6. sets the umask, changes into the working directory (as the object's user, which proves
   the user can reach it) and ``execve``s the object with exactly the spec's environment.

STATUS_FD is close-on-exec: on success the agent reads EOF; on any failure the launcher
writes ``{"stage", "error", "errno"}`` there and exits 127 without running the object.

Only the standard library is used, and ``-I -S`` keeps the environment and site-packages
out of the launcher, so nothing the object's user controls runs as root.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import sys

CLONE_NEWNS = 0x00020000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND = 0x20, 0x400, 0x800, 0x1000
MS_REC, MS_SLAVE, MS_RELATIME, MS_STRICTATIME = 0x4000, 0x80000, 0x200000, 0x1000000
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38

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


def mount(source: str | None, target: str, flags: int) -> None:
    _check(libc().mount(source.encode() if source else None, target.encode(), None, flags, None),
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


def isolate_fs(writable: list[str]) -> None:
    """A private mount namespace: everything read-only except ``writable`` (and /proc, /sys,
    /dev, /dev/pts). New mounts and unmounts of the agent's namespace still propagate in."""
    _check(libc().unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    mount(None, "/", MS_REC | MS_SLAVE)
    for w in writable:
        mount(w, w, MS_BIND | MS_REC)
    for target, options in mountinfo():
        if any(_under(target, w) for w in writable) or "ro" in options:
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
            # other user can reach either. Anything else leaves a writable fs: fail closed.
            if exc.errno not in (2, 13):
                raise


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


def launch(spec: dict, status_fd: int) -> None:
    stage = "cgroup"
    try:
        pid = str(os.getpid())
        for procs in spec.get("cgroup_procs", []):
            with open(procs, "w") as f:
                f.write(pid)
        if spec.get("isolate_fs"):
            stage = "isolate_fs"
            isolate_fs([os.path.realpath(w) for w in spec.get("writable", [])])
        stage = "rlimits"
        for name, (soft, hard) in spec.get("rlimits", {}).items():
            resource.setrlimit(getattr(resource, "RLIMIT_" + name), (soft, hard))
        stage = "fds"
        keep = {0, 1, 2, status_fd, *spec.get("pass_fds", [])}
        close_other_fds(keep)
        for fd in spec.get("pass_fds", []):
            os.set_inheritable(fd, True)
        stage = "user"
        os.umask(spec.get("umask", 0o077))
        drop_privileges(spec["uid"], spec["gid"], spec.get("groups", []))
        stage = "prctl"
        if spec.get("no_new_privs", True):
            _check(libc().prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS")
        if spec.get("parent_pid"):
            _check(libc().prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0), "PR_SET_PDEATHSIG")
            if os.getppid() != spec["parent_pid"]:
                raise OSError(3, "the agent exited during the launch")
        stage = "chdir"
        os.chdir(spec["cwd"])
        stage = "exec"
        env = spec.get("env", {})
        argv = spec["argv"]
        os.execve(which(argv[0], env.get("PATH", os.defpath)), argv, env)
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the agent
        raise LaunchError(stage, exc) from exc


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
        launch(spec, status_fd)
    except LaunchError as exc:
        report = {"stage": exc.stage, "error": str(exc), "errno": exc.errno}
    except Exception as exc:  # noqa: BLE001
        report = {"stage": "spec", "error": repr(exc), "errno": getattr(exc, "errno", None)}
    try:
        os.write(status_fd, json.dumps(report).encode())
    except OSError:
        pass
    return 127


if __name__ == "__main__":
    os._exit(main(sys.argv))
