"""The logic repository of the remote site (patent Fig. 4): service directories, pure and offline.

Per service the repository holds one directory::

    <service>/
        manifest.json     the service, its provider, and its mobile objects (name, version,
                          archive file, sha256, entry "module:Class", resources)
        policy.json       the lifecycle policy: usage (transactions or duration), how often to
                          check for new versions, whether other services may use / extend it
        service.sig       the provider's Ed25519 signature (see :func:`agent.vm.signing.signed_digest`)
        <object>-<version>.tar.gz   one code archive per object

This module works on such a directory as a whole, on top of the three that each own one
part of it: :mod:`agent.vm.manifest` (manifest and policy), :mod:`agent.vm.signing` (keys
and ``service.sig``) and :mod:`agent.vm.archive` (the archives). Here a provider packages a
service (:func:`package_service`) and publishes it into a repository
(:func:`publish_service`, which keeps immutable versions under ``.store`` and switches a
symlink atomically); a router verifies it (:func:`verify_service`: the signature over the
raw bytes first, then the archives' hashes, then every archive member, each refusal its own
error type from :mod:`agent.vm.errors`), inspects it without trusting a signer
(:func:`inspect_service`), and installs it all-or-nothing (:func:`install_service`).

Nothing here touches the network: :mod:`agent.vm.fetch` brings a service over SFTP, and the
``moat repo`` tools (:mod:`experiments.repo_cli`) create keys, package, sign and publish.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.vm.archive import _check_archives, _extract_into, build_archive
from agent.vm.errors import ManifestError, RepositoryError
from agent.vm.files import (
    _atomic_write,
    _move_into_place,
    _read_limited,
    _remove,
    _staging_dir,
)
from agent.vm.manifest import (
    MANIFEST_FILE,
    MAX_METADATA_BYTES,
    NAME_RE,
    OBJECT_FILE,
    POLICY_FILE,
    VERSION_RE,
    LifecyclePolicy,
    Manifest,
    ObjectEntry,
    Resources,
    _check_keys,
    _check_re,
    _json_object,
)
from agent.vm.signing import (
    SIGNATURE_FILE,
    Signature,
    key_id,
    load_private_key,
    sign_service,
    verify_metadata,
)

__all__ = [
    "VerifiedService",
    "verify_service",
    "inspect_service",
    "install_service",
    "package_service",
    "publish_service",
]

log = logging.getLogger(__name__)

STORE_DIR = ".store"  # where publish keeps the immutable service versions


@dataclass(frozen=True)
class VerifiedService:
    """A service directory whose signature, archives and archive members all checked out."""

    path: Path
    manifest: Manifest
    policy: LifecyclePolicy
    key_id: str

    @property
    def name(self) -> str:
        return self.manifest.service

    @property
    def version(self) -> str:
        return self.manifest.version

    def archive_path(self, obj: ObjectEntry | str) -> Path:
        entry = self.manifest.object(obj) if isinstance(obj, str) else obj
        return self.path / entry.archive

    def to_json(self) -> dict[str, Any]:
        return {"path": str(self.path), "service": self.name, "version": self.version,
                "provider": self.manifest.provider, "key_id": self.key_id,
                "objects": [o.to_json() for o in self.manifest.objects],
                "policy": self.policy.to_json()}


def verify_service(service_dir: str | os.PathLike[str], trusted_public_keys: Iterable[Any]
                   ) -> VerifiedService:
    """Verify a service directory against the trusted provider keys.

    Raises :class:`UnknownSigner`, :class:`BadSignature`, :class:`ManifestError`,
    :class:`TamperedArchive` (hash mismatch, missing archive), :class:`PathTraversal` or
    :class:`ArchiveError` (a member that could escape or cannot be read).
    """
    d = Path(service_dir)
    manifest_bytes = _read_limited(d / MANIFEST_FILE, MAX_METADATA_BYTES, "manifest")
    policy_bytes = _read_limited(d / POLICY_FILE, MAX_METADATA_BYTES, "policy")
    sig_bytes = _read_limited(d / SIGNATURE_FILE, MAX_METADATA_BYTES, "signature")
    manifest, policy, signer = verify_metadata(manifest_bytes, policy_bytes, sig_bytes,
                                               trusted_public_keys)
    _check_archives(d, manifest)
    return VerifiedService(d, manifest, policy, signer)


def inspect_service(service_dir: str | os.PathLike[str]) -> tuple[Manifest, LifecyclePolicy, str]:
    """Everything :func:`verify_service` checks except who signed: the files parse, the
    signature file names the manifest's archives, the archives match and are safe.
    Returns (manifest, policy, the key id the signature claims)."""
    d = Path(service_dir)
    manifest = Manifest.from_bytes(_read_limited(d / MANIFEST_FILE, MAX_METADATA_BYTES, "manifest"))
    policy = LifecyclePolicy.from_bytes(_read_limited(d / POLICY_FILE, MAX_METADATA_BYTES, "policy"))
    sig = Signature.from_bytes(_read_limited(d / SIGNATURE_FILE, MAX_METADATA_BYTES, "signature"))
    if tuple(o.sha256 for o in manifest.objects) != sig.archives:
        raise ManifestError("the signed archive hashes differ from the manifest's")
    _check_archives(d, manifest)
    return manifest, policy, sig.key_id


def install_service(service_dir: str | os.PathLike[str], trusted_public_keys: Iterable[Any],
                    dest: str | os.PathLike[str], replace: bool = False) -> VerifiedService:
    """Verify ``service_dir`` and install it at ``dest`` all-or-nothing.

    ``dest`` gets ``manifest.json``, ``policy.json``, ``service.sig`` and one directory
    per object (its extracted archive). Returns the :class:`VerifiedService` of the
    installed copy.
    """
    verified = verify_service(service_dir, trusted_public_keys)
    dest = Path(dest)
    staging = _staging_dir(dest)
    try:
        for name in (MANIFEST_FILE, POLICY_FILE, SIGNATURE_FILE):
            shutil.copyfile(verified.path / name, staging / name)
            os.chmod(staging / name, 0o644)
        for obj in verified.manifest.objects:
            target = staging / obj.name
            target.mkdir(mode=0o755)
            _extract_into(verified.archive_path(obj), target)
        _move_into_place(staging, dest, replace)
    except BaseException:
        _remove(staging)
        raise
    return VerifiedService(dest, verified.manifest, verified.policy, verified.key_id)


def _object_sources(src: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Each subdirectory of ``src`` holding an ``object.json`` is one object; ``src``
    itself is the only object when it holds ``object.json``."""
    candidates = [src] if (src / OBJECT_FILE).is_file() else sorted(
        p for p in src.iterdir() if p.is_dir() and (p / OBJECT_FILE).is_file())
    if not candidates:
        raise ManifestError(f"{src}: no {OBJECT_FILE} found (in it or in its subdirectories)")
    out = []
    for d in candidates:
        doc = _json_object(_read_limited(d / OBJECT_FILE, MAX_METADATA_BYTES, OBJECT_FILE),
                           str(d / OBJECT_FILE))
        _check_keys(doc, {"entry"}, {"name", "version", "resources", "consumes", "produces",
                                     "requires"},
                    str(d / OBJECT_FILE))
        out.append((d, doc))
    return out


def _formats(docs: list[dict[str, Any]]) -> tuple[str, str]:
    """The formats the service converts (``consumes``/``produces`` of its objects' object.json,
    for the service broker's paths): one pair for the whole service, or none."""
    pairs = {(str(d.get("consumes", "")), str(d.get("produces", ""))) for d in docs
             if "consumes" in d or "produces" in d}
    if len(pairs) > 1:
        raise ManifestError(f"the objects declare different conversions {sorted(pairs)}: a "
                            "service converts one format into one other")
    return pairs.pop() if pairs else ("", "")


def _requires(docs: list[dict[str, Any]]) -> tuple[str, ...]:
    """The services the objects say they need (``requires`` of their object.json): the
    union, sorted, for the manifest."""
    out: set[str] = set()
    for doc in docs:
        names = doc.get("requires", [])
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ManifestError("requires must be a list of service names")
        out.update(names)
    return tuple(sorted(out))


def package_service(
    src_dir: str | os.PathLike[str],
    service: str,
    version: str,
    provider: str,
    private_key: Ed25519PrivateKey | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    policy: LifecyclePolicy | Mapping[str, Any] | str | os.PathLike[str] | None = None,
) -> VerifiedService:
    """Build a signed service directory ``out_dir`` (which must not exist) from sources.

    ``src_dir`` holds one subdirectory per object (or is itself the only object), each with
    an ``object.json``: ``{"entry": "module:Class", "name": ..., "version": ...,
    "resources": {"cpu": 0.2, "memory_mb": 64, "pids": 16}}`` — name defaults to the
    directory name, version to the service version. Archives are reproducible, so
    packaging the same sources twice gives the same hashes. ``policy``: a
    :class:`LifecyclePolicy`, its JSON fields, a ``policy.json`` path, or ``None`` for the
    default. The result is verified against the signing key before it is moved into place.
    """
    src = Path(src_dir)
    out = Path(out_dir)
    if out.exists():
        raise RepositoryError(f"{out} already exists")
    key = private_key if isinstance(private_key, Ed25519PrivateKey) else load_private_key(private_key)
    if policy is None:
        pol = LifecyclePolicy()
    elif isinstance(policy, LifecyclePolicy):
        pol = policy
    elif isinstance(policy, Mapping):
        pol = LifecyclePolicy.from_json(policy)
    else:
        pol = LifecyclePolicy.load(policy)
    _check_re(service, NAME_RE, "service name")
    _check_re(version, VERSION_RE, "service version")
    staging = _staging_dir(out)
    try:
        objects = []
        docs = []
        for obj_dir, doc in _object_sources(src):
            docs.append(doc)
            name = doc.get("name", obj_dir.name)
            obj_version = doc.get("version", version)
            _check_re(name, NAME_RE, "object name")
            _check_re(obj_version, VERSION_RE, f"object {name} version")
            archive = f"{name}-{obj_version}.tar.gz"
            digest = build_archive(obj_dir, staging / archive)
            objects.append(ObjectEntry(name, obj_version, archive, digest, doc["entry"],
                                       Resources.from_json(doc.get("resources", {}))))
        consumes, produces = _formats(docs)
        manifest = Manifest(service, version, provider, tuple(objects), consumes=consumes,
                            produces=produces, requires=_requires(docs))
        _atomic_write(staging / MANIFEST_FILE, manifest.to_bytes())
        _atomic_write(staging / POLICY_FILE, pol.to_bytes())
        sign_service(staging, key)
        verify_service(staging, [key.public_key()])
        _move_into_place(staging, out, replace=False)
    except BaseException:
        _remove(staging)
        raise
    return VerifiedService(out, manifest, pol, key_id(key.public_key()))


def publish_service(service_dir: str | os.PathLike[str], repo_root: str | os.PathLike[str],
                    trusted_public_keys: Iterable[Any] | None = None) -> Path:
    """Copy a signed service into a repository so that readers switch atomically.

    The files go to ``<repo>/.store/<service>/<version>-<n>/`` (never modified later), and
    ``<repo>/<service>`` becomes a relative symlink to it, replaced with one ``rename``: a
    fetcher that resolved the old link keeps reading a complete old version. The service is
    checked first (:func:`inspect_service`; with ``trusted_public_keys`` also
    :func:`verify_service`). Returns ``<repo>/<service>``.
    """
    src = Path(service_dir)
    if trusted_public_keys is not None:
        verify_service(src, trusted_public_keys)
    manifest, _, _ = inspect_service(src)
    root = Path(repo_root)
    root.mkdir(parents=True, exist_ok=True)
    link = root / manifest.service
    if link.exists() and not link.is_symlink():
        raise RepositoryError(f"{link} exists and is not a link made by publish; remove it first")
    store = root / STORE_DIR / manifest.service
    store.mkdir(parents=True, exist_ok=True, mode=0o755)
    os.chmod(root / STORE_DIR, 0o755)
    n = 1
    while (store / f"{manifest.version}-{n}").exists():
        n += 1
    final = store / f"{manifest.version}-{n}"
    staging = Path(tempfile.mkdtemp(prefix=".publish-", dir=store))
    tmp_link = root / f".{manifest.service}.link-{secrets.token_hex(4)}"
    try:
        names = [MANIFEST_FILE, POLICY_FILE, SIGNATURE_FILE] + [o.archive for o in manifest.objects]
        for name in names:
            shutil.copyfile(src / name, staging / name)
            os.chmod(staging / name, 0o644)
        _move_into_place(staging, final, replace=False)
        os.symlink(os.path.relpath(final, root), tmp_link)
        os.replace(tmp_link, link)
    except BaseException:
        _remove(staging)
        tmp_link.unlink(missing_ok=True)
        raise
    log.info("published %s %s at %s", manifest.service, manifest.version, final)
    return link
