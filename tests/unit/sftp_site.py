"""A remote site in-process for unit tests: a real paramiko SSH server with an SFTP subsystem
on 127.0.0.1, serving one directory read-only to one account and one client key.

Real SSH (key exchange, host key, public-key authentication, SFTP) without root or a
namespace, so the session pool and the version cache are tested against the protocol they
use. It counts authenticated sessions (:attr:`FakeSite.logins`) and files opened
(:attr:`FakeSite.opened`), can drop every session (:meth:`FakeSite.kill_sessions`, as a site
restart does), stop listening, and listen again on the same port with the same or another
host key (:meth:`FakeSite.restart`).
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from typing import Any

import paramiko

from agent.vm.fetch import generate_client_key
from agent.vm.machine import SITE_USER


class _Handle(paramiko.SFTPHandle):
    def stat(self) -> Any:
        return paramiko.SFTPAttributes.from_stat(os.fstat(self.readfile.fileno()))


class _Sftp(paramiko.SFTPServerInterface):
    """Read-only SFTP over the site's directory (symlinks resolved inside it)."""

    def __init__(self, server: Any, *args: Any, site: "FakeSite", **kw: Any) -> None:
        super().__init__(server, *args, **kw)
        self.site = site

    def _real(self, path: str) -> str:
        root = os.path.realpath(self.site.root)
        real = os.path.realpath(os.path.join(root, os.path.normpath("/" + path).lstrip("/")))
        if real != root and not real.startswith(root + os.sep):
            raise PermissionError(path)
        return real

    def canonicalize(self, path: str) -> str:
        if self.site.stall.is_set():
            self.site.stall.clear()
            self.site.stalled.wait(10)  # this one request goes unanswered for a while
        rel = os.path.relpath(self._real(path), os.path.realpath(self.site.root))
        return "/" if rel == "." else "/" + rel

    def stat(self, path: str) -> Any:
        try:
            return paramiko.SFTPAttributes.from_stat(os.stat(self._real(path)))
        except OSError as exc:
            return paramiko.SFTPServer.convert_errno(exc.errno)

    lstat = stat

    def open(self, path: str, flags: int, attr: Any) -> Any:
        if flags & (os.O_WRONLY | os.O_RDWR):
            return paramiko.sftp.SFTP_PERMISSION_DENIED
        try:
            f = open(self._real(path), "rb")
        except OSError as exc:
            return paramiko.SFTPServer.convert_errno(exc.errno)
        self.site.opened.append(os.path.basename(path))
        handle = _Handle(flags)
        handle.readfile = f
        handle.filename = path
        return handle


class _Server(paramiko.ServerInterface):
    def __init__(self, site: "FakeSite") -> None:
        self.site = site

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        if username == SITE_USER and key.asbytes() == self.site.client_public.asbytes():
            self.site.logins += 1
            return paramiko.AUTH_SUCCESSFUL
        return paramiko.AUTH_FAILED

    def check_channel_request(self, kind: str, chanid: int) -> int:
        if kind == "session":
            return paramiko.OPEN_SUCCEEDED
        return paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED


class FakeSite:
    """See the module docstring. ``root``: the directory served; keys made in ``keys``."""

    def __init__(self, root: Path, keys: Path) -> None:
        self.root = root
        self.keys = keys
        keys.mkdir(parents=True, exist_ok=True)
        generate_client_key(keys / "client")
        self.client_key = keys / "client"
        self.client_public = paramiko.Ed25519Key.from_private_key_file(str(self.client_key))
        self.host_key_pub = self._new_host_key("host")
        self.logins = 0
        self.opened: list[str] = []
        self.transports: list[paramiko.Transport] = []
        #: Set: the next path request is not answered until ``stalled`` is set (a site gone
        #: silent without closing anything).
        self.stall = threading.Event()
        self.stalled = threading.Event()
        self.port = 0
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self.start()

    def _new_host_key(self, name: str) -> Path:
        generate_client_key(self.keys / name, comment=name)
        self._host_key = paramiko.Ed25519Key.from_private_key_file(str(self.keys / name))
        return self.keys / f"{name}.pub"

    def start(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(8)
        self.port = sock.getsockname()[1]
        self._sock = sock
        threading.Thread(target=self._accept, args=(sock,), daemon=True).start()

    def _accept(self, sock: socket.socket) -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            transport = paramiko.Transport(conn)
            transport.add_server_key(self._host_key)
            transport.set_subsystem_handler("sftp", paramiko.SFTPServer, _Sftp, site=self)
            with self._lock:
                self.transports.append(transport)
            try:
                transport.start_server(server=_Server(self))
            except (paramiko.SSHException, EOFError, OSError):
                transport.close()

    def kill_sessions(self) -> None:
        """Drop every open session (the site's sshd and its children killed)."""
        with self._lock:
            transports, self.transports = self.transports, []
        for t in transports:
            t.close()

    def stop(self) -> None:
        """Stop listening and drop every session."""
        self.stalled.set()
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
            except OSError:
                pass
            self._sock.close()
            self._sock = None
        self.kill_sessions()

    def restart(self, new_host_key: bool = False) -> None:
        """Stop, then listen again on the same port (with a host key of its own if asked)."""
        self.stop()
        if new_host_key:
            self._new_host_key("other-host")
        self.start()

    def open_sessions(self) -> int:
        with self._lock:
            return sum(1 for t in self.transports if t.is_active())
