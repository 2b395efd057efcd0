"""The remote site 24 of the patent: a Mininet host running its own OpenSSH ``sshd``.

:class:`RemoteSite` serves the logic repository (database 26 / logic 28,
:mod:`agent.vm.repository`) over SFTP. Everything it uses is its own and lives in a per-run
directory: a freshly generated Ed25519 host key, an ``sshd_config`` that includes nothing
from ``/etc/ssh``, an ``authorized_keys`` file, the pid file and the log. Only public-key
authentication is accepted (no password, no keyboard-interactive, no PAM); sessions are
forced into a read-only ``internal-sftp`` with no shell, no TTY and no forwarding.
Publishing is local (``moat repo publish``), never over SFTP.

The one account allowed in is the unprivileged system user ``moat-site``
(:data:`agent.vm.machine.SITE_USER`; made here if missing, and by scripts/bootstrap.sh),
never root (``PermitRootLogin no``, ``AllowUsers``). Its sessions are chrooted into the
repository (``ChrootDirectory``), which it can read and not write (root's files, a
read-only mount, ``internal-sftp -R``). sshd demands that the chroot's path be root's and
writable by root only all the way up, and reads ``authorized_keys`` as the user with
``StrictModes yes``; the run directory is under ``/tmp`` and root-only (0700), so neither
path would do. The site therefore bind-mounts, in its own mount namespace only (Mininet
gives each host one; made a slave of the machine's so nothing propagates out), the
repository (read-only) on ``SFTP_ROOT/repo`` and the ``authorized_keys`` file (0640,
group ``moat-site``) on ``SFTP_ROOT/authorized_keys`` (:data:`SFTP_ROOT` is
``/run/moat/site``). The rest of the site's directory (host key, configuration, log, pid
file) stays 0600 in a 0700 directory.

``sshd -D -e`` runs through the :class:`topologies.nodes.ManagedDaemonMixin` hook inside the
node's namespace, so it stops (SIGTERM, bounded wait, SIGKILL) and is reaped with the node.
The node waits until sshd logs that it listens, and fails the build with sshd's own words
when the configuration is refused (``sshd -t`` runs first).

Node params (all optional):

* ``run_dir`` — where the key, config, log and pid file go (default: ``<run>/<node>`` when
  ``MOAT_RUN_ID`` is set, else a fresh ``/tmp/moat/<node>-site-*`` removed with the node);
* ``repo_dir`` — the repository root served over SFTP (default ``<run_dir>/repo``);
* ``authorized_keys`` — the client keys file sshd reads (default ``<run_dir>/authorized_keys``,
  created empty; :meth:`RemoteSite.authorize` appends a key at any time, sshd rereads it on
  every login);
* ``ssh_user`` — the one account allowed in (default ``moat-site``; ``root`` is refused);
  ``ssh_port`` (default 22).

Experiments read :attr:`RemoteSite.host_public_key_path` (give it to the VMs as the known
host key), :attr:`RemoteSite.repo_root` and :attr:`RemoteSite.address`.
"""

from __future__ import annotations

import logging
import os
import signal
import pwd
import re
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import topologies._mininet  # noqa: F401  - first: repairs logging (see module)

from agent.vm.machine import SITE_USER
from topologies.errors import DaemonError
from topologies.nodes import ServerHost, processes_in_netns_of
from topologies.run import write_private_file

__all__ = ["RemoteSite", "SSHD", "PRIVSEP_DIR", "SFTP_ROOT", "SITE_USER", "sshd_config_text",
           "ensure_site_user"]

log = logging.getLogger(__name__)

SSHD = "/usr/sbin/sshd"
SSH_KEYGEN = "ssh-keygen"
PRIVSEP_DIR = Path("/run/sshd")  # sshd's privilege-separation chroot; must exist
READY_TIMEOUT = 10.0
HOST_KEY_NAME = "ssh_host_ed25519_key"
#: Where, in the site's own mount namespace, its repository and ``authorized_keys`` appear
#: to sshd (a root-owned path outside ``/tmp``; see the module docstring).
SFTP_ROOT = Path("/run/moat/site")


def useradd_command(name: str) -> list[str]:
    """A system user with no home, no shell and no password (``*``: none can match, and,
    unlike ``!``, sshd without PAM does not take it for a locked account)."""
    return ["useradd", "--system", "--user-group", "--no-create-home", "--home-dir",
            "/nonexistent", "--shell", "/usr/sbin/nologin", "--password", "*", name]


def _shadow_password(name: str) -> str | None:
    try:
        for line in Path("/etc/shadow").read_text().splitlines():
            fields = line.split(":")
            if fields[0] == name and len(fields) > 1:
                return fields[1]
    except OSError:
        pass
    return None


def ensure_site_user(name: str = SITE_USER) -> tuple[int, int]:
    """(uid, gid) of the site's SFTP account, made with useradd if missing (idempotent).
    Refuses root and an account sshd would not let in (a locked password field)."""
    if name == "root":
        raise DaemonError("the remote site's SFTP account must not be root")
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        if shutil.which("useradd") is None:
            raise DaemonError(f"user {name} does not exist and useradd is not installed") from None
        done = subprocess.run(useradd_command(name), capture_output=True, text=True,
                              timeout=30, stdin=subprocess.DEVNULL)
        if done.returncode not in (0, 9):  # 9: made meanwhile by another run
            raise DaemonError(f"useradd {name} failed: {done.stderr.strip() or done.returncode}")
        log.info("created system user %s", name)
        pw = pwd.getpwnam(name)
    if pw.pw_uid == 0 or pw.pw_gid == 0:
        raise DaemonError(f"the remote site's SFTP account {name} has uid/gid 0")
    password = _shadow_password(name)
    if password is not None and password.startswith("!"):
        raise DaemonError(f"user {name} is locked ({password[:1]!r} in /etc/shadow) and sshd "
                          f"without PAM would refuse it: run usermod -p '*' {name}")
    return pw.pw_uid, pw.pw_gid


def _sshd_path() -> str:
    found = shutil.which("sshd", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if found:
        return os.path.abspath(found)  # sshd re-execs itself and needs an absolute path
    return SSHD


def _openssh_version(sshd: str) -> tuple[int, int]:
    """(major, minor) of the installed OpenSSH, or (0, 0) when it cannot be told."""
    try:
        out = subprocess.run([sshd, "-V"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return (0, 0)
    m = re.search(r"OpenSSH_(\d+)\.(\d+)", out.stdout + out.stderr)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def _check_path(path: Path, what: str) -> Path:
    text = str(path)
    if any(c.isspace() for c in text) or '"' in text or "%" in text:
        raise DaemonError(f"{what} {text!r}: sshd_config paths must not contain spaces, "
                          "quotes or '%'")
    return path


def sshd_config_text(
    *,
    address: str | None,
    port: int,
    host_key: Path,
    authorized_keys: Path,
    pid_file: Path,
    repo_dir: Path,
    user: str,
    openssh: tuple[int, int] = (0, 0),
) -> str:
    """The whole ``sshd_config`` of a remote site (pure; unit-testable). ``authorized_keys``
    and ``repo_dir`` are the paths sshd sees (under :data:`SFTP_ROOT` in the site's mount
    namespace); ``repo_dir`` is the chroot, so SFTP sessions start at its ``/``."""
    if user == "root":
        raise DaemonError("the remote site's SFTP account must not be root")
    sftp = "internal-sftp -R -d / -l INFO"
    lines = [
        "# MOAT remote site: written by topologies/site.py for this run only.",
        f"Port {port}",
        f"ListenAddress {address}" if address else "ListenAddress 0.0.0.0",
        f"HostKey {host_key}",
        f"PidFile {pid_file}",
        f"AuthorizedKeysFile {authorized_keys}",
        "AuthenticationMethods publickey",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "PermitEmptyPasswords no",
        "KbdInteractiveAuthentication no",
        "HostbasedAuthentication no",
        "UsePAM no",
        "PermitRootLogin no",
        f"AllowUsers {user}",
        "StrictModes yes",
        "UseDNS no",
        "LoginGraceTime 15",
        "MaxAuthTries 3",
        "MaxStartups 20:50:100",
        "AllowTcpForwarding no",
        "AllowStreamLocalForwarding no",
        "AllowAgentForwarding no",
        "X11Forwarding no",
        "PermitTunnel no",
        "PermitTTY no",
        "PermitUserEnvironment no",
        "PrintMotd no",
        "LogLevel VERBOSE",
        # A router's kept SFTP session (agent/vm/session_pool.py) whose router vanished
        # (its namespace gone, no FIN ever sent) ends after 30 s instead of never.
        "ClientAliveInterval 10",
        "ClientAliveCountMax 3",
        f"ChrootDirectory {repo_dir}",
        f"Subsystem sftp {sftp}",
        f"ForceCommand {sftp}",
    ]
    if openssh >= (9, 8):
        # Newer sshd penalises sources with failed logins; tests refuse logins on purpose.
        lines.append("PerSourcePenalties no")
    return "\n".join(lines) + "\n"


class RemoteSite(ServerHost):
    """A Mininet host that runs ``sshd`` and serves the logic repository over SFTP."""

    def terminate(self) -> None:
        """Stop sshd, then what it leaves: each connection's processes run in a session of
        their own, so the daemon's group kill misses them, and a router's kept session
        would hold them (and this namespace) long after the run. Only processes in this
        node's network namespace are killed (its shell goes with Mininet's terminate)."""
        try:
            self.stop_daemon()
            for pid in processes_in_netns_of(self.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        finally:
            super().terminate()

    def config(  # type: ignore[override]
        self,
        run_dir: str | os.PathLike[str] | None = None,
        repo_dir: str | os.PathLike[str] | None = None,
        authorized_keys: str | os.PathLike[str] | None = None,
        ssh_user: str = SITE_USER,
        ssh_port: int = 22,
        **params: Any,
    ) -> dict[str, Any]:
        """Write the key, config and repository, then configure the host (which starts
        sshd through the daemon hook), then wait until sshd listens."""
        self._prepare(run_dir, repo_dir, authorized_keys, ssh_user, int(ssh_port), params.get("ip"))
        params.setdefault("daemon_log", str(self.run_dir / "sshd.log"))
        result = super().config(**params)
        if self.params.get("daemon_argv") is None:
            self._wait_ready()
        return result

    # --- preparation --------------------------------------------------------------------

    def _prepare(self, run_dir: Any, repo_dir: Any, authorized_keys: Any, user: str,
                 port: int, ip: str | None) -> None:
        self.ssh_uid, self.ssh_gid = ensure_site_user(user)
        self.setup_run_dir(run_dir, "site")
        _check_path(self.run_dir, "run_dir")
        self.repo_root = _check_path(
            Path(repo_dir).resolve() if repo_dir else self.run_dir / "repo", "repo_dir")
        self.repo_root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.repo_root, 0o755)  # root's; the account reads it through the chroot
        self.authorized_keys_path = _check_path(
            Path(authorized_keys).resolve() if authorized_keys else self.run_dir / "authorized_keys",
            "authorized_keys")
        # Made again (atomically) root's and readable by the SFTP account's group only, so
        # sshd, reading it as that user with StrictModes, accepts it and nobody else reads it.
        existing = self.authorized_keys_path.read_text() if self.authorized_keys_path.exists() else ""
        write_private_file(self.authorized_keys_path, existing, mode=0o640, group=self.ssh_gid)
        self.ssh_user = user
        self.ssh_port = port
        self.address = ip.split("/")[0] if ip else None
        self.host_key_path = self.run_dir / HOST_KEY_NAME
        self.host_public_key_path = self.run_dir / f"{HOST_KEY_NAME}.pub"
        self.sshd_config_path = self.run_dir / "sshd_config"
        self.pid_file = self.run_dir / "sshd.pid"
        self._generate_host_key()
        PRIVSEP_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
        self._mount_sftp_root()
        self._sshd = _sshd_path()
        text = sshd_config_text(
            address=self.address, port=port, host_key=self.host_key_path,
            authorized_keys=SFTP_ROOT / "authorized_keys", pid_file=self.pid_file,
            repo_dir=SFTP_ROOT / "repo", user=user, openssh=_openssh_version(self._sshd))
        write_private_file(self.sshd_config_path, text)
        self._test_config()

    def _mount_sftp_root(self) -> None:
        """In this host's own mount namespace: the repository (read-only) on
        ``SFTP_ROOT/repo`` and ``authorized_keys`` (read-only) on
        ``SFTP_ROOT/authorized_keys``; the machine's namespace sees only the empty mount
        points (root's, 0755 / 0644)."""
        own = self.cmd("readlink /proc/self/ns/mnt").strip()
        if not own or own == os.readlink("/proc/self/ns/mnt"):
            raise DaemonError(f"{self.name}: has no mount namespace of its own; the remote site "
                              "needs one to chroot its SFTP account")
        for d in (SFTP_ROOT.parent, SFTP_ROOT, SFTP_ROOT / "repo"):
            d.mkdir(mode=0o755, exist_ok=True)
            st = os.lstat(d)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
                raise DaemonError(f"{d} must be a directory of root's that only root can write")
        keys = SFTP_ROOT / "authorized_keys"
        if not keys.exists():
            os.close(os.open(keys, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644))
        cmds = [
            "mount --make-rslave /",  # this host's mounts never propagate to the machine's
            f"mount --bind {self.repo_root} {SFTP_ROOT / 'repo'}",
            f"mount -o remount,bind,ro {SFTP_ROOT / 'repo'}",
            f"mount --bind {self.authorized_keys_path} {keys}",
            f"mount -o remount,bind,ro {keys}",
        ]
        for cmd in cmds:
            out = self.cmd(f"{cmd} 2>&1; echo rc=$?").strip()
            if not out.endswith("rc=0"):
                raise DaemonError(f"{self.name}: {cmd}: {out}")

    def _generate_host_key(self) -> None:
        if self.host_key_path.exists() and self.host_public_key_path.exists():
            return  # configured twice in one run: keep the key clients already know
        for p in (self.host_key_path, self.host_public_key_path):
            p.unlink(missing_ok=True)
        argv = [SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", f"{self.name}@moat",
                "-f", str(self.host_key_path)]
        try:  # umask 077: the key and its .pub are root's alone from creation
            out = subprocess.run(argv, capture_output=True, text=True, timeout=30,
                                 stdin=subprocess.DEVNULL, umask=0o077)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise DaemonError(f"{self.name}: cannot run ssh-keygen: {exc}") from exc
        if out.returncode != 0:
            raise DaemonError(f"{self.name}: ssh-keygen failed: {out.stderr.strip()}")

    def _test_config(self) -> None:
        if not os.access(self._sshd, os.X_OK):
            raise DaemonError(f"{self.name}: {self._sshd} not found: install openssh-server "
                              "(scripts/bootstrap.sh does)")
        out = subprocess.run([self._sshd, "-t", "-f", str(self.sshd_config_path)],
                             capture_output=True, text=True, timeout=30,
                             stdin=subprocess.DEVNULL)
        if out.returncode != 0:
            raise DaemonError(f"{self.name}: sshd refuses {self.sshd_config_path}: "
                              f"{(out.stderr or out.stdout).strip()}")

    # --- daemon -------------------------------------------------------------------------

    def daemon_command(self) -> list[str] | None:
        explicit = self.params.get("daemon_argv")
        if explicit is not None:
            return [str(a) for a in explicit]
        return [self._sshd, "-D", "-e", "-f", str(self.sshd_config_path)]

    def _wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Until sshd logs "Server listening on"; raise with its log if it exits first."""
        self.wait_for_log("Server listening on", "sshd", timeout)

    @property
    def sshd_pid(self) -> int | None:
        """PID of the running sshd (the daemon), or ``None``."""
        return self.daemon_pid

    # --- use ----------------------------------------------------------------------------

    def host_public_key(self) -> str:
        """The site's host key line (``ssh-ed25519 AAAA... site24@moat``)."""
        return self.host_public_key_path.read_text().strip()

    def authorize(self, public_key_line: str) -> None:
        """Let a client key in (appends to ``authorized_keys``; effective at once)."""
        line = public_key_line.strip()
        if "\n" in line or not line.startswith(("ssh-", "ecdsa-")):
            raise DaemonError(f"{self.name}: not an OpenSSH public key line: {line[:40]!r}")
        fd = os.open(self.authorized_keys_path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
        with os.fdopen(fd, "a") as f:  # the file _prepare made (0640): same inode, still mounted
            f.write(line + "\n")

    def repo_path(self, service: str = "") -> Path:
        return self.repo_root / service if service else self.repo_root
