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

With a :class:`~agent.vm.version_cache.VersionCache` the three metadata files are the
version probe: they name the version and its digest, and a version kept whole is taken from
the cache (checked: digest, archive hashes, signature when keys are given) instead of
downloaded; a version downloaded is kept. With a
:class:`~agent.vm.session_pool.SessionPool` the fetch runs on the router's kept session to
the site (opened, and re-opened after a failure, by :func:`open_session`: the same pinned
host key check every time) instead of a new one. ``allow_offline``: a site that cannot be
reached is not a refusal when the cache holds the version the site served last; that copy
is given instead (``FetchResult.offline``), to be verified like any other.

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
from agent.vm.version_cache import VersionCache, service_digest

__all__ = [
    "FetchResult",
    "fetch_service",
    "download_service",
    "open_session",
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
#: Files up to this size are read with plain requests: prefetching (a thread and a window of
#: pipelined reads) costs more round trips than it saves on the small metadata files.
PREFETCH_ABOVE = 32 * 1024


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
    #: The whole version came from the version cache (only the metadata was read).
    version_cached: bool = False
    #: The site could not be reached: the cache's copy of its last version was given.
    offline: bool = False
    #: How the SFTP session came: "new" (opened for this fetch), "kept", "reopened" (the
    #: pool's), or "" (none: offline).
    session: str = ""

    def __fspath__(self) -> str:
        return str(self.path)

    def to_json(self) -> dict[str, Any]:
        return {"ok": True, "path": str(self.path), "service": self.service,
                "version": self.version, "downloaded": self.downloaded,
                "bytes_downloaded": self.bytes_downloaded, "cached": self.cached,
                "verified": self.verified.to_json() if self.verified else None,
                "seconds": round(self.seconds, 4), "version_cached": self.version_cached,
                "offline": self.offline, "session": self.session}


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
        if size and size > PREFETCH_ABOVE and hasattr(src, "prefetch"):
            src.prefetch(size)  # pipelined reads: one round trip per window, not per chunk
        # A small file in one read (and the one that finds its end); a large one in chunks.
        want = size + 1 if size is not None and size <= PREFETCH_ABOVE else 1 << 16
        while True:
            chunk = src.read(want)
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
    versions: VersionCache | None = None,
) -> FetchResult:
    """Download ``service`` from ``repo_path`` on an open SFTP session into ``dest``.

    The service path is resolved once (``normalize`` follows the repository's
    ``<service>`` link to an immutable version directory), so a publish during the
    download cannot mix two versions. ``versions``: the metadata is the probe; a version
    kept whole is copied from there, one downloaded is kept.
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
        digest = kept = None
        if versions is not None:
            digest = service_digest(*((staging / n).read_bytes() for n in METADATA_FILES))
            kept = versions.get(service, manifest.version, digest, trusted)
        for obj in manifest.objects:
            local = staging / obj.archive
            hit = (kept.path / obj.archive if kept is not None
                   else cache.get(service, manifest.version, obj.sha256) if cache else None)
            if hit is not None:
                shutil.copyfile(hit, local)
                result.cached.append(obj.archive)
                continue
            _get(sftp, _remote_join(remote, obj.archive), local, MAX_ARCHIVE_BYTES, result)
            if cache is not None and sha256_file(local) == obj.sha256:
                cache.put(service, manifest.version, obj.sha256, local)
        if versions is not None and digest is not None:
            if kept is not None:
                result.version_cached = True
                versions.seen(service, manifest.version, digest)
            elif all(sha256_file(staging / o.archive) == o.sha256 for o in manifest.objects):
                # Only a version whose archives are the manifest's is kept (verification
                # refuses the others anyway).
                versions.put(service, manifest.version, digest, staging,
                             [o.archive for o in manifest.objects])
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


def copy_cached(entry: Any, dest: Path, replace: bool, result: FetchResult) -> FetchResult:
    """Give the version cache's ``entry`` (a :class:`~agent.vm.version_cache.CachedVersion`)
    as the fetched copy at ``dest``, all-or-nothing (the site was not reached)."""
    staging = _staging_dir(dest)
    try:
        for name in (*METADATA_FILES, *(o.archive for o in entry.manifest.objects)):
            shutil.copyfile(entry.path / name, staging / name)
        _move_into_place(staging, dest, replace)
    except BaseException:
        _remove(staging)
        raise
    result.version = entry.version
    result.cached = [o.archive for o in entry.manifest.objects]
    result.version_cached = result.offline = True
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


def open_session(site: Any, timeout: float = DEFAULT_TIMEOUT,
                 io_timeout: float = DEFAULT_IO_TIMEOUT) -> tuple[paramiko.Transport, Any]:
    """Open one authenticated SFTP session to ``site`` (a
    :class:`~agent.vm.session_pool.SiteKey`): the host key compared with the pinned one
    before anything else, the unprivileged account, the client key. Returns (transport,
    sftp); the caller closes both. The one way every session is opened, a kept one's first
    and every re-opened one alike."""
    if site.user == "root":
        raise AuthenticationFailed(f"refusing to log in to the remote site {site.host}:{site.port} "
                                   f"as root: its SFTP account is an unprivileged one ({SITE_USER})")
    expected = load_host_key(site.known_host_key)
    client_key = load_client_key(site.client_key)
    transport = _connect(site.host, site.port, site.user, client_key, expected, timeout)
    try:
        try:
            sftp = paramiko.SFTPClient.from_transport(transport)
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise SiteUnreachable(f"{site.host}:{site.port} did not open an SFTP session: "
                                  f"{exc}") from None
        if sftp is None:
            raise SiteUnreachable(f"{site.host}:{site.port} did not open an SFTP session")
        sftp.get_channel().settimeout(io_timeout)
        return transport, sftp
    except BaseException:
        transport.close()
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
    pool: Any = None,
    versions: VersionCache | None = None,
    allow_offline: bool = False,
) -> FetchResult:
    """Fetch ``service`` from the remote site ``host:port`` into ``dest``.

    ``known_host_key`` is the site's public host key (line, file or paramiko key).
    ``repo_path`` is the repository on the site, relative to the SFTP start directory (the
    MOAT site starts SFTP sessions in its repository, so ``"."``). ``cache_dir`` enables
    the archive cache; ``trusted_keys`` (provider public keys) enables verification.
    ``pool`` (a :class:`~agent.vm.session_pool.SessionPool`): use the router's kept session
    to the site; ``versions``: the version cache; ``allow_offline``: an unreachable site
    gives the cache's copy of the version it served last (see the module docstring).
    Blocking (run it in a worker thread).
    Raises :class:`SiteUnreachable`, :class:`HostKeyMismatch`,
    :class:`AuthenticationFailed`, :class:`ServiceNotFound`, :class:`FetchError` or any
    verification error of :mod:`agent.vm.repository`.
    """
    from agent.vm.session_pool import site_key

    _check_re(service, NAME_RE, "service name")
    if username == "root":
        raise AuthenticationFailed(f"refusing to log in to the remote site {host}:{port} as root: "
                                   f"its SFTP account is an unprivileged one ({SITE_USER})")
    started = time.monotonic()
    if isinstance(known_host_key, paramiko.PKey):
        known_host_key = f"{known_host_key.get_name()} {known_host_key.get_base64()}"
    site = site_key(host, port, username, key_path, known_host_key)
    cache = ArchiveCache(cache_dir) if cache_dir is not None else None
    trusted = list(trusted_keys) if trusted_keys is not None else None

    def use(sftp: Any) -> FetchResult:
        try:
            return download_service(sftp, service, dest, repo_path=repo_path, cache=cache,
                                    trusted_keys=trusted, replace=replace, versions=versions)
        except RepositoryError:
            raise
        except (socket.timeout, EOFError, paramiko.SSHException):
            raise  # the session's failure: the pool re-opens, else SiteUnreachable below
        except OSError as exc:  # a refused SFTP request, or a local write failure
            if pool is not None and not _alive(sftp):
                raise  # the session died under the request: the pool's to re-open
            raise FetchError(f"fetching {service} from {host}:{port} failed: {exc}") from None

    try:
        if pool is not None:
            result, how = pool.run(site, use, timeout=timeout, io_timeout=io_timeout)
        else:
            transport, sftp = open_session(site, timeout, io_timeout)
            try:
                try:
                    result, how = use(sftp), "new"
                except (socket.timeout, EOFError, paramiko.SSHException, OSError) as exc:
                    raise SiteUnreachable(f"the SFTP session with {host}:{port} failed: "
                                          f"{exc!r}") from None
            finally:
                sftp.close()
                transport.close()
    except SiteUnreachable as exc:
        entry = _last_known(versions, service, trusted) if allow_offline else None
        if entry is None:
            raise
        log.warning("%s; starting the cached %s %s, the version it served last", exc, service,
                    entry.version)
        result = copy_cached(entry, Path(dest), replace, FetchResult(Path(dest), service, ""))
        how = ""
    result.session = how
    result.seconds = time.monotonic() - started
    return result


def _alive(sftp: Any) -> bool:
    try:
        channel = sftp.get_channel()
        return channel is not None and not channel.closed and channel.get_transport().is_active()
    except Exception:  # noqa: BLE001
        return False


def _last_known(versions: VersionCache | None, service: str, trusted: Any) -> Any:
    """The cache's checked copy of the version the site served last, or None."""
    if versions is None:
        return None
    latest = versions.latest(service)
    if latest is None:
        return None
    return versions.get(service, latest[0], latest[1], trusted)


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
