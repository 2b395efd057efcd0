"""Fetch a service from the remote site's logic repository over SFTP (paramiko).

The VM connects to the remote site's ``sshd`` with its own client key and checks the site's
host key against the one it was given — strictly: an unknown or different key is a
:class:`HostKeyMismatch` and nothing is downloaded; there is no "trust on first use". The
host key algorithm is pinned to the expected key's type, so a site that also has other host
keys cannot make us compare the wrong one.

Downloads go into a temporary directory next to ``dest``; the metadata (manifest, policy,
signature) is always fetched, archives only when the :class:`ArchiveCache` has no copy of
that (service, version, sha256). With ``trusted_keys`` the signature is checked right after
the metadata arrives (an unknown signer or bad signature costs no archive download) and the
whole service again before it is renamed to ``dest``; any refusal removes the temporary
directory, so ``dest`` is either the complete service or untouched.

Every network wait is bounded (``timeout`` for connecting, the SSH banner, key exchange and
authentication; ``io_timeout`` for each SFTP request), and connection failures are
:class:`SiteUnreachable`.

``python -m agent.vm.fetch --host H --user U --key K --host-key PUB --service S --dest D``
runs one fetch (e.g. inside a Mininet node) and prints a JSON report on stdout; exit status
0 on success, 2 on a refusal (the JSON names the error type).
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Protocol

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.vm.archive import MAX_ARCHIVE_BYTES, ArchiveCache
from agent.vm.errors import (
    AuthenticationFailed,
    FetchError,
    HostKeyMismatch,
    RepositoryError,
    ServiceNotFound,
    SiteUnreachable,
)
from agent.vm.files import _move_into_place, _remove, _staging_dir, sha256_file
from agent.vm.machine import SITE_USER
from agent.vm.manifest import (
    MANIFEST_FILE,
    MAX_METADATA_BYTES,
    NAME_RE,
    POLICY_FILE,
    Manifest,
    _check_re,
)
from agent.vm.repository import VerifiedService, verify_service
from agent.vm.signing import SIGNATURE_FILE, verify_metadata

__all__ = [
    "FetchResult",
    "fetch_service",
    "download_service",
    "load_host_key",
    "load_client_key",
    "generate_client_key",
    "FetchError",
    "SiteUnreachable",
    "HostKeyMismatch",
    "AuthenticationFailed",
    "ServiceNotFound",
    "DEFAULT_TIMEOUT",
    "DEFAULT_IO_TIMEOUT",
]

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 5.0
DEFAULT_IO_TIMEOUT = 10.0
METADATA_FILES = (MANIFEST_FILE, POLICY_FILE, SIGNATURE_FILE)


@dataclass
class FetchResult:
    """What a fetch did. ``os.PathLike``: ``Path(result)`` is the fetched service."""

    path: Path
    service: str
    version: str
    downloaded: list[str] = field(default_factory=list)  # files read over SFTP, in order
    bytes_downloaded: int = 0
    cached: list[str] = field(default_factory=list)  # archives taken from the cache
    verified: VerifiedService | None = None
    seconds: float = 0.0

    def __fspath__(self) -> str:
        return str(self.path)

    def to_json(self) -> dict[str, Any]:
        return {"ok": True, "path": str(self.path), "service": self.service,
                "version": self.version, "downloaded": self.downloaded,
                "bytes_downloaded": self.bytes_downloaded, "cached": self.cached,
                "verified": self.verified.to_json() if self.verified else None,
                "seconds": round(self.seconds, 4)}


# --- keys --------------------------------------------------------------------------------


def load_host_key(source: paramiko.PKey | str | os.PathLike[str]) -> paramiko.PKey:
    """The expected host key: a paramiko key, an OpenSSH public key line
    (``ssh-ed25519 AAAA... comment``), or a file holding one (e.g. the site's
    ``ssh_host_ed25519_key.pub``)."""
    if isinstance(source, paramiko.PKey):
        return source
    text = str(source)
    if not text.lstrip().startswith(("ssh-", "ecdsa-")):
        try:
            text = Path(source).read_text()
        except OSError as exc:
            raise FetchError(f"cannot read the site's host key {source}: {exc}") from None
    line = next((ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")), "")
    try:
        entry = paramiko.hostkeys.HostKeyEntry.from_line(f"site {line.strip()}")
    except (paramiko.SSHException, ValueError, TypeError) as exc:
        raise FetchError(f"not an SSH public key: {exc}") from None
    if entry is None or entry.key is None:
        raise FetchError(f"not an SSH public key: {line[:60]!r}")
    return entry.key


def load_client_key(path: str | os.PathLike[str]) -> paramiko.PKey:
    """The VM's private key (OpenSSH or PEM; Ed25519, ECDSA or RSA; unencrypted)."""
    try:
        if hasattr(paramiko.PKey, "from_path"):
            return paramiko.PKey.from_path(str(path))
        for cls in (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey):
            try:
                return cls.from_private_key_file(str(path))
            except paramiko.SSHException:
                continue
        raise paramiko.SSHException("unsupported key type")
    except (OSError, paramiko.SSHException, ValueError) as exc:
        raise FetchError(f"cannot load the client key {path}: {exc}") from None


def generate_client_key(path: str | os.PathLike[str], comment: str = "moat-vm") -> str:
    """Write a new Ed25519 client key (OpenSSH format, 0600) and ``<path>.pub``; return
    the public key line to put in the site's ``authorized_keys``."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                             serialization.NoEncryption())
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(priv)
    line = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                         serialization.PublicFormat.OpenSSH).decode()
    line = f"{line} {comment}"
    Path(f"{p}.pub").write_text(line + "\n")
    return line


def _fingerprint(key: paramiko.PKey) -> str:
    """``ssh-ed25519 SHA256:...`` as ``ssh-keygen -l`` shows it."""
    import base64
    import hashlib

    digest = base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")
    return f"{key.get_name()} SHA256:{digest}"


def _key_types(expected: paramiko.PKey) -> list[str]:
    name = expected.get_name()
    if name == "ssh-rsa":
        return ["rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"]
    return [name]


# --- the download, over any SFTP-like client -----------------------------------------------


class SFTPLike(Protocol):
    """The part of ``paramiko.SFTPClient`` the download uses (a local fake in unit tests)."""

    def normalize(self, path: str) -> str: ...

    def stat(self, path: str) -> Any: ...

    def open(self, filename: str, mode: str = "r", bufsize: int = -1) -> Any: ...


def _remote_join(base: str, name: str) -> str:
    return str(PurePosixPath(base) / name)


def _get(sftp: SFTPLike, remote: str, local: Path, limit: int, result: FetchResult) -> None:
    """Copy one remote file, refusing files larger than ``limit``."""
    try:
        size = sftp.stat(remote).st_size
    except FileNotFoundError:
        raise ServiceNotFound(f"{remote} does not exist on the remote site") from None
    except OSError as exc:
        if getattr(exc, "errno", None) == errno.ENOENT:
            raise ServiceNotFound(f"{remote} does not exist on the remote site") from None
        raise
    if size is not None and size > limit:
        raise FetchError(f"{remote} is {size} bytes, more than the {limit} allowed")
    n = 0
    with sftp.open(remote, "rb") as src, open(local, "xb") as dst:
        if size and hasattr(src, "prefetch"):
            src.prefetch(size)  # pipelined reads: one round trip per window, not per chunk
        while True:
            chunk = src.read(1 << 16)
            if not chunk:
                break
            n += len(chunk)
            if n > limit:
                raise FetchError(f"{remote} grew past the {limit} bytes allowed")
            dst.write(chunk)
    result.downloaded.append(PurePosixPath(remote).name)
    result.bytes_downloaded += n


def download_service(
    sftp: SFTPLike,
    service: str,
    dest: str | os.PathLike[str],
    *,
    repo_path: str = ".",
    cache: ArchiveCache | None = None,
    trusted_keys: Iterable[Any] | None = None,
    replace: bool = False,
) -> FetchResult:
    """Download ``service`` from ``repo_path`` on an open SFTP session into ``dest``.

    The service path is resolved once (``normalize`` follows the repository's
    ``<service>`` link to an immutable version directory), so a publish during the
    download cannot mix two versions.
    """
    _check_re(service, NAME_RE, "service name")
    started = time.monotonic()
    dest = Path(dest)
    try:
        remote = sftp.normalize(_remote_join(repo_path, service))
    except FileNotFoundError:
        raise ServiceNotFound(f"the repository has no service {service!r}") from None
    except OSError as exc:
        if getattr(exc, "errno", None) == errno.ENOENT:
            raise ServiceNotFound(f"the repository has no service {service!r}") from None
        raise
    result = FetchResult(dest, service, "")
    trusted = list(trusted_keys) if trusted_keys is not None else None
    staging = _staging_dir(dest)
    try:
        for name in METADATA_FILES:
            _get(sftp, _remote_join(remote, name), staging / name, MAX_METADATA_BYTES, result)
        manifest_bytes = (staging / MANIFEST_FILE).read_bytes()
        if trusted is not None:
            # Fail fast: no archive is downloaded for an unknown signer or a bad signature.
            manifest, _, _ = verify_metadata(manifest_bytes, (staging / POLICY_FILE).read_bytes(),
                                             (staging / SIGNATURE_FILE).read_bytes(), trusted)
        else:
            manifest = Manifest.from_bytes(manifest_bytes)
        if manifest.service != service:
            raise RepositoryError(f"asked for service {service!r}, the manifest is for "
                                  f"{manifest.service!r}")
        result.version = manifest.version
        for obj in manifest.objects:
            local = staging / obj.archive
            hit = cache.get(service, manifest.version, obj.sha256) if cache else None
            if hit is not None:
                shutil.copyfile(hit, local)
                result.cached.append(obj.archive)
                continue
            _get(sftp, _remote_join(remote, obj.archive), local, MAX_ARCHIVE_BYTES, result)
            if cache is not None and sha256_file(local) == obj.sha256:
                cache.put(service, manifest.version, obj.sha256, local)
        if trusted is not None:
            result.verified = verify_service(staging, trusted)
        _move_into_place(staging, dest, replace)
    except BaseException:
        _remove(staging)
        raise
    if result.verified is not None:
        v = result.verified
        result.verified = VerifiedService(dest, v.manifest, v.policy, v.key_id)
    result.seconds = time.monotonic() - started
    return result


# --- the connection ------------------------------------------------------------------------


def _connect(host: str, port: int, username: str, client_key: paramiko.PKey,
             expected: paramiko.PKey, timeout: float) -> paramiko.Transport:
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:  # refused, unreachable, timed out
        raise SiteUnreachable(f"cannot connect to the remote site {host}:{port}: {exc}") from None
    transport = None
    try:
        transport = paramiko.Transport(sock)
        transport.banner_timeout = timeout
        transport.handshake_timeout = timeout
        transport.auth_timeout = timeout
        transport.get_security_options().key_types = _key_types(expected)
        try:
            transport.start_client(timeout=timeout)
        except paramiko.SSHException as exc:
            if "host key" in str(exc).lower():
                raise HostKeyMismatch(f"{host}:{port} offers no {expected.get_name()} host key: "
                                      f"{exc}") from None
            raise SiteUnreachable(f"SSH handshake with {host}:{port} failed: {exc}") from None
        except (EOFError, OSError) as exc:
            raise SiteUnreachable(f"SSH handshake with {host}:{port} failed: {exc!r}") from None
        key = transport.get_remote_server_key()
        if key.get_name() != expected.get_name() or key.asbytes() != expected.asbytes():
            raise HostKeyMismatch(f"{host}:{port} presented host key {_fingerprint(key)}, "
                                  f"expected {_fingerprint(expected)}; refusing to talk to it")
        try:
            transport.auth_publickey(username, client_key)
        except paramiko.AuthenticationException as exc:
            raise AuthenticationFailed(f"{host}:{port} refused the client key for {username}: "
                                       f"{exc}") from None
        except paramiko.SSHException as exc:
            raise SiteUnreachable(f"authentication with {host}:{port} failed: {exc}") from None
        return transport
    except BaseException:
        if transport is not None:
            transport.close()
        else:
            sock.close()
        raise


def fetch_service(
    host: str,
    port: int,
    username: str,
    key_path: str | os.PathLike[str],
    known_host_key: paramiko.PKey | str | os.PathLike[str],
    service: str,
    dest: str | os.PathLike[str],
    *,
    repo_path: str = ".",
    cache_dir: str | os.PathLike[str] | None = None,
    trusted_keys: Iterable[Any] | None = None,
    replace: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
    io_timeout: float = DEFAULT_IO_TIMEOUT,
) -> FetchResult:
    """Fetch ``service`` from the remote site ``host:port`` into ``dest``.

    ``known_host_key`` is the site's public host key (line, file or paramiko key).
    ``repo_path`` is the repository on the site, relative to the SFTP start directory (the
    MOAT site starts SFTP sessions in its repository, so ``"."``). ``cache_dir`` enables
    the archive cache; ``trusted_keys`` (provider public keys) enables verification.
    Raises :class:`SiteUnreachable`, :class:`HostKeyMismatch`,
    :class:`AuthenticationFailed`, :class:`ServiceNotFound`, :class:`FetchError` or any
    verification error of :mod:`agent.vm.repository`.
    """
    if username == "root":
        raise AuthenticationFailed(f"refusing to log in to the remote site {host}:{port} as root: "
                                   f"its SFTP account is an unprivileged one ({SITE_USER})")
    expected = load_host_key(known_host_key)
    client_key = load_client_key(key_path)
    cache = ArchiveCache(cache_dir) if cache_dir is not None else None
    transport = _connect(host, port, username, client_key, expected, timeout)
    try:
        try:
            sftp = paramiko.SFTPClient.from_transport(transport)
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise SiteUnreachable(f"{host}:{port} did not open an SFTP session: {exc}") from None
        if sftp is None:
            raise SiteUnreachable(f"{host}:{port} did not open an SFTP session")
        sftp.get_channel().settimeout(io_timeout)
        try:
            return download_service(sftp, service, dest, repo_path=repo_path, cache=cache,
                                    trusted_keys=trusted_keys, replace=replace)
        except (socket.timeout, EOFError, paramiko.SSHException) as exc:
            raise SiteUnreachable(f"the SFTP session with {host}:{port} failed: {exc!r}") from None
        except RepositoryError:
            raise
        except OSError as exc:  # a refused SFTP request, or a local write failure
            raise FetchError(f"fetching {service} from {host}:{port} failed: {exc}") from None
        finally:
            sftp.close()
    finally:
        transport.close()


# --- command line --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent.vm.fetch",
                                     description="Fetch one service from a MOAT remote site.")
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, default=22)
    parser.add_argument("--user", default=SITE_USER,
                        help=f"the site's SFTP account (default {SITE_USER}, never root)")
    parser.add_argument("--key", required=True, help="the VM's private key")
    parser.add_argument("--host-key", required=True,
                        help="the site's public host key (file or 'ssh-ed25519 AAAA...')")
    parser.add_argument("--service", required=True)
    parser.add_argument("--dest", required=True, type=Path)
    parser.add_argument("--repo-path", default=".")
    parser.add_argument("--cache", type=Path, help="archive cache directory")
    parser.add_argument("--trusted", nargs="*", default=None, help="provider public keys")
    parser.add_argument("--replace", action="store_true")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT)
    parser.add_argument("--io-timeout", type=float, default=DEFAULT_IO_TIMEOUT)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = fetch_service(args.host, args.port, args.user, args.key, args.host_key,
                               args.service, args.dest, repo_path=args.repo_path,
                               cache_dir=args.cache, trusted_keys=args.trusted,
                               replace=args.replace, timeout=args.timeout,
                               io_timeout=args.io_timeout)
    except RepositoryError as exc:
        print(json.dumps({"ok": False, "error": type(exc).__name__, "message": str(exc)}))
        return 2
    print(json.dumps(result.to_json()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
