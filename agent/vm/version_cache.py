"""Signed service versions a router already fetched, kept whole, so the next start fetches
no archive (and can start while the remote site is unreachable).

An entry is keyed by (service, version, digest), where the digest is the sha256 over the
three signed metadata files exactly as the site served them (:func:`service_digest`:
manifest, with every archive's sha256, policy and ``service.sig``, each length-prefixed): the
version probe reads those three small files over the kept SFTP session and computes the key,
so a re-signed, re-policied or re-built version is another entry, never a stale one.

An entry is a complete service directory (the metadata and every archive) under
``<root>/<service>/<version>/<digest>/``, written all-or-nothing (staging directory and
rename). :meth:`VersionCache.get` trusts nothing it reads back: the metadata must hash to
the key's digest, every archive to the manifest's sha256 and, given provider keys, the
signature must verify; an entry that fails any check is removed (the caller fetches the
version again). Whatever the cache gives, the provisioning still verifies the copy it
installs (signature and hashes, :func:`agent.vm.repository.install_service`): a cached
version is verified before each start, never trusted because it is cached.

``<root>/<service>/latest.json`` says which key the site served last (and when it first
did): with the
site unreachable, the VM manager may start that version (the choice is the manager's; an
upgrade never does). Each service keeps at most ``max_versions`` entries; the least recently
used go first.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from agent.vm.errors import ManifestError, RepositoryError
from agent.vm.files import _atomic_write, _move_into_place, _read_limited, _remove, _staging_dir, sha256_file
from agent.vm.manifest import (
    MANIFEST_FILE,
    MAX_METADATA_BYTES,
    NAME_RE,
    POLICY_FILE,
    SHA256_RE,
    VERSION_RE,
    Manifest,
    _check_re,
)
from agent.vm.signing import SIGNATURE_FILE, verify_metadata

__all__ = ["VersionCache", "CachedVersion", "service_digest", "DEFAULT_MAX_VERSIONS"]

log = logging.getLogger(__name__)

DEFAULT_MAX_VERSIONS = 3
LATEST_FILE = "latest.json"
METADATA_FILES = (MANIFEST_FILE, POLICY_FILE, SIGNATURE_FILE)


def service_digest(manifest: bytes, policy: bytes, signature: bytes) -> str:
    """The hex sha256 naming one signed version: the three metadata files, length-prefixed
    (unambiguous), with a domain tag."""
    h = hashlib.sha256(b"moat-version-cache-v1\x00")
    for part in (manifest, policy, signature):
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest()


@dataclass(frozen=True)
class CachedVersion:
    """A cache entry that passed :meth:`VersionCache.get`'s checks."""

    path: Path
    service: str
    version: str
    digest: str
    manifest: Manifest


class VersionCache:
    """Whole signed versions by (service, version, digest); see the module docstring."""

    def __init__(self, root: str | os.PathLike[str], max_versions: int = DEFAULT_MAX_VERSIONS,
                 clock: Callable[[], float] = time.time) -> None:
        if max_versions < 1:
            raise ValueError("a version cache keeps at least one version per service")
        self.root = Path(root)
        self.max_versions = max_versions
        self._clock = clock
        #: Hits, misses, entries refused by their checks (removed), entries evicted.
        self.hits = 0
        self.misses = 0
        self.refused = 0
        self.evicted = 0

    def path_for(self, service: str, version: str, digest: str) -> Path:
        _check_re(service, NAME_RE, "service name")
        _check_re(version, VERSION_RE, "version")
        _check_re(digest, SHA256_RE, "digest")
        return self.root / service / version / digest

    # --- reading ----------------------------------------------------------------------

    def get(self, service: str, version: str, digest: str,
            trusted_keys: Iterable[Any] | None = None) -> CachedVersion | None:
        """The entry, checked (metadata digest, archive hashes, and the signature when
        ``trusted_keys`` are given), or None: missing, or refused and removed."""
        path = self.path_for(service, version, digest)
        if not path.is_dir() or path.is_symlink():
            self.misses += 1
            return None
        try:
            manifest = self._check(path, service, version, digest, trusted_keys)
        except (RepositoryError, OSError) as exc:
            self.refused += 1
            log.warning("cached %s %s (%s) refused, removed: %s", service, version,
                        digest[:12], exc)
            _remove(path)
            self.misses += 1
            return None
        os.utime(path)  # last use: what eviction goes by
        self.hits += 1
        return CachedVersion(path, service, version, digest, manifest)

    @staticmethod
    def _check(path: Path, service: str, version: str, digest: str,
               trusted_keys: Iterable[Any] | None) -> Manifest:
        blobs = [_read_limited(path / name, MAX_METADATA_BYTES, name) for name in METADATA_FILES]
        if not hmac.compare_digest(service_digest(*blobs), digest):
            raise ManifestError("its metadata no longer hashes to the digest it is kept under")
        if trusted_keys is not None:
            manifest, _, _ = verify_metadata(blobs[0], blobs[1], blobs[2], trusted_keys)
        else:
            manifest = Manifest.from_bytes(blobs[0])
        if manifest.service != service or manifest.version != version:
            raise ManifestError(f"it holds {manifest.service} {manifest.version}")
        for obj in manifest.objects:
            archive = path / obj.archive
            st = archive.lstat()
            if not stat.S_ISREG(st.st_mode):
                raise ManifestError(f"{obj.archive} is not a regular file")
            actual = sha256_file(archive)
            if not hmac.compare_digest(actual, obj.sha256):
                raise ManifestError(f"{obj.archive}: sha256 {actual} is not the manifest's "
                                    f"{obj.sha256}")
        return manifest

    def latest(self, service: str) -> tuple[str, str, float] | None:
        """(version, digest, when) the site served last for ``service``, or None."""
        _check_re(service, NAME_RE, "service name")
        try:
            doc = json.loads(_read_limited(self.root / service / LATEST_FILE, 4096, LATEST_FILE))
            version, digest, at = doc["version"], doc["digest"], float(doc["at"])
            _check_re(version, VERSION_RE, "version")
            _check_re(digest, SHA256_RE, "digest")
        except (RepositoryError, ValueError, KeyError, TypeError):
            return None
        return version, digest, at

    # --- writing ----------------------------------------------------------------------

    def put(self, service: str, version: str, digest: str, source: Path,
            archives: Iterable[str]) -> Path:
        """Keep a copy of the service directory ``source`` (its metadata and ``archives``)
        under its key; the metadata must hash to ``digest``. Replaces nothing that is there
        (an entry of that key holds those very bytes) and bounds the service's entries."""
        path = self.path_for(service, version, digest)
        blobs = [_read_limited(source / name, MAX_METADATA_BYTES, name) for name in METADATA_FILES]
        if not hmac.compare_digest(service_digest(*blobs), digest):
            raise ManifestError(f"refusing to cache {service} {version}: its metadata does not "
                                f"hash to {digest}")
        if not path.is_dir():
            staging = _staging_dir(path)
            try:
                for name in (*METADATA_FILES, *archives):
                    shutil.copyfile(source / name, staging / name)
                    os.chmod(staging / name, 0o644)
                _move_into_place(staging, path, replace=False)
            except FileExistsError:
                _remove(staging)  # another fetch kept the same bytes first
            except RepositoryError:
                _remove(staging)
                if not path.is_dir():
                    raise
            except BaseException:
                _remove(staging)
                raise
        self.seen(service, version, digest)
        self._bound(service, keep=path)
        return path

    def seen(self, service: str, version: str, digest: str) -> None:
        """Record that the site serves (service, version, digest) now (written only when it
        changed: a warm provisioning pays no fsync for it)."""
        self.path_for(service, version, digest)  # checks the names
        last = self.latest(service)
        if last is not None and last[:2] == (version, digest):
            return
        _atomic_write(self.root / service / LATEST_FILE, json.dumps(
            {"version": version, "digest": digest, "at": self._clock()}).encode())

    def _bound(self, service: str, keep: Path) -> None:
        entries = sorted((p for p in (self.root / service).glob("*/*") if p.is_dir()
                          and not p.name.startswith(".")),
                         key=lambda p: p.stat().st_mtime)
        for old in entries[: max(0, len(entries) - self.max_versions)]:
            if old == keep:
                continue
            _remove(old)
            self.evicted += 1
            try:
                old.parent.rmdir()  # the version's directory, once it holds no digest
            except OSError:
                pass

    def entries(self) -> list[tuple[str, str, str]]:
        """Every (service, version, digest) kept."""
        if not self.root.is_dir():
            return []
        return sorted((p.parent.parent.name, p.parent.name, p.name)
                      for p in self.root.glob("*/*/*") if p.is_dir() and not p.name.startswith("."))

    def status(self) -> dict[str, Any]:
        return {"entries": len(self.entries()), "hits": self.hits, "misses": self.misses,
                "refused": self.refused, "evicted": self.evicted,
                "max_versions": self.max_versions}
