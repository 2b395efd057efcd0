"""The remote site 24 of the patent: a Mininet host running its own OpenSSH ``sshd``.

:class:`RemoteSite` serves the logic repository (database 26 / logic 28,
:mod:`agent.vm.repository`) over SFTP. Everything it uses is its own and lives in a per-run
directory: a freshly generated Ed25519 host key, an ``sshd_config`` that includes nothing
from ``/etc/ssh``, an ``authorized_keys`` file, the pid file and the log. Only public-key
authentication is accepted (no password, no keyboard-interactive, no PAM); sessions are
forced into a read-only ``internal-sftp`` that starts in the repository, with no shell, no
TTY and no forwarding. Publishing is local (``moat repo publish``), never over SFTP.

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
* ``ssh_user`` — the one account allowed in (default ``root``, key only:
  ``PermitRootLogin prohibit-password``); ``ssh_port`` (default 22);
* ``chroot`` — also ``ChrootDirectory`` the repository (sshd demands that every component
  of its path be root-owned and not group/world-writable, so not under ``/tmp``).

Experiments read :attr:`RemoteSite.host_public_key_path` (give it to the VMs as the known
host key), :attr:`RemoteSite.repo_root` and :attr:`RemoteSite.address`.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import topologies._mininet  # noqa: F401  - first: repairs logging (see module)

from topologies.errors import DaemonError
from topologies.nodes import ServerHost

__all__ = ["RemoteSite", "SSHD", "PRIVSEP_DIR", "sshd_config_text"]

log = logging.getLogger(__name__)

SSHD = "/usr/sbin/sshd"
SSH_KEYGEN = "ssh-keygen"
PRIVSEP_DIR = Path("/run/sshd")  # sshd's privilege-separation chroot; must exist
READY_TIMEOUT = 10.0
HOST_KEY_NAME = "ssh_host_ed25519_key"


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
    chroot: bool = False,
    openssh: tuple[int, int] = (0, 0),
) -> str:
    """The whole ``sshd_config`` of a remote site (pure; unit-testable)."""
    start_dir = "/" if chroot else str(repo_dir)
    sftp = f"internal-sftp -R -d {start_dir} -l INFO"
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
        "PermitRootLogin prohibit-password" if user == "root" else "PermitRootLogin no",
        f"AllowUsers {user}",
        "StrictModes no",  # the run dir lives under /tmp; sshd would reject its modes
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
        f"Subsystem sftp {sftp}",
        f"ForceCommand {sftp}",
    ]
    if openssh >= (9, 8):
        # Newer sshd penalises sources with failed logins; tests refuse logins on purpose.
        lines.append("PerSourcePenalties no")
    if chroot:
        lines.append(f"ChrootDirectory {repo_dir}")
    return "\n".join(lines) + "\n"


class RemoteSite(ServerHost):
    """A Mininet host that runs ``sshd`` and serves the logic repository over SFTP."""

    def config(  # type: ignore[override]
        self,
        run_dir: str | os.PathLike[str] | None = None,
        repo_dir: str | os.PathLike[str] | None = None,
        authorized_keys: str | os.PathLike[str] | None = None,
        ssh_user: str = "root",
        ssh_port: int = 22,
        chroot: bool = False,
        **params: Any,
    ) -> dict[str, Any]:
        """Write the key, config and repository, then configure the host (which starts
        sshd through the daemon hook), then wait until sshd listens."""
        self._prepare(run_dir, repo_dir, authorized_keys, ssh_user, int(ssh_port), chroot,
                      params.get("ip"))
        params.setdefault("daemon_log", str(self.run_dir / "sshd.log"))
        result = super().config(**params)
        if self.params.get("daemon_argv") is None:
            self._wait_ready()
        return result

    # --- preparation --------------------------------------------------------------------

    def _prepare(self, run_dir: Any, repo_dir: Any, authorized_keys: Any, user: str,
                 port: int, chroot: bool, ip: str | None) -> None:
        self.setup_run_dir(run_dir, "site")
        _check_path(self.run_dir, "run_dir")
        self.repo_root = _check_path(
            Path(repo_dir).resolve() if repo_dir else self.run_dir / "repo", "repo_dir")
        self.repo_root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.repo_root, 0o755)
        self.authorized_keys_path = _check_path(
            Path(authorized_keys).resolve() if authorized_keys else self.run_dir / "authorized_keys",
            "authorized_keys")
        if not self.authorized_keys_path.exists():
            self.authorized_keys_path.touch(mode=0o644)
        self.ssh_user = user
        self.ssh_port = port
        self.address = ip.split("/")[0] if ip else None
        self.host_key_path = self.run_dir / HOST_KEY_NAME
        self.host_public_key_path = self.run_dir / f"{HOST_KEY_NAME}.pub"
        self.sshd_config_path = self.run_dir / "sshd_config"
        self.pid_file = self.run_dir / "sshd.pid"
        if chroot:
            self._check_chroot(self.repo_root)
        self._generate_host_key()
        PRIVSEP_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
        self._sshd = _sshd_path()
        text = sshd_config_text(
            address=self.address, port=port, host_key=self.host_key_path,
            authorized_keys=self.authorized_keys_path, pid_file=self.pid_file,
            repo_dir=self.repo_root, user=user, chroot=chroot,
            openssh=_openssh_version(self._sshd))
        self.sshd_config_path.write_text(text)
        os.chmod(self.sshd_config_path, 0o644)
        self._test_config()

    def _generate_host_key(self) -> None:
        if self.host_key_path.exists() and self.host_public_key_path.exists():
            return  # configured twice in one run: keep the key clients already know
        for p in (self.host_key_path, self.host_public_key_path):
            p.unlink(missing_ok=True)
        argv = [SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", f"{self.name}@moat",
                "-f", str(self.host_key_path)]
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=30,
                                 stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise DaemonError(f"{self.name}: cannot run ssh-keygen: {exc}") from exc
        if out.returncode != 0:
            raise DaemonError(f"{self.name}: ssh-keygen failed: {out.stderr.strip()}")
        os.chmod(self.host_key_path, 0o600)

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

    @staticmethod
    def _check_chroot(path: Path) -> None:
        for p in [path, *path.parents]:
            st = p.stat()
            if st.st_uid != 0 or st.st_mode & 0o022:
                raise DaemonError(
                    f"chroot: sshd refuses {path} because {p} is not root-owned or is group/"
                    "world-writable; put the repository under e.g. /srv/moat, or chroot=False")

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
        with open(self.authorized_keys_path, "a") as f:
            f.write(line + "\n")

    def repo_path(self, service: str = "") -> Path:
        return self.repo_root / service if service else self.repo_root
