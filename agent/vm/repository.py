"""The logic repository of the remote site (patent Fig. 4): signed services, pure and offline.

Per service the repository holds one directory::

    <service>/
        manifest.json     the service, its provider, and its mobile objects (name, version,
                          archive file, sha256, entry "module:Class", resources)
        policy.json       the lifecycle policy: usage (transactions or duration), how often to
                          check for new versions, whether other services may use / extend it
        service.sig       the provider's Ed25519 signature (see :func:`signed_digest`)
        <object>-<version>.tar.gz   one code archive per object

The signature covers a canonical digest of the manifest bytes, each archive's sha256 in
manifest order, and the policy bytes, so a change to any of them is caught. Verification
(:func:`verify_service`) checks the signature over the raw bytes *before* it parses the
manifest, then the archives' hashes, then every archive member; each refusal is its own
error type (:class:`UnknownSigner`, :class:`BadSignature`, :class:`TamperedArchive`,
:class:`PathTraversal`, :class:`ManifestError`). Extraction (:func:`safe_extract`,
:func:`install_service`) writes into a fresh temporary directory next to the destination
and renames it into place only when everything succeeded, so a refusal leaves nothing
half-installed.

Keys are OpenSSH-format Ed25519 keys (``ssh-ed25519 AAAA... provider``), so
``ssh-keygen -l -f provider.pub`` shows the same fingerprint MOAT reports as ``key_id``.

Nothing here touches the network: :mod:`agent.vm.fetch` brings a service over SFTP, and the
``moat repo`` tools (:mod:`experiments.repo_cli`) create keys, package, sign and publish.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import hmac
import io
import json
import logging
import math
import os
import re
import secrets
import shutil
import stat
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Iterator, Mapping

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from agent.core.errors import AgentError

__all__ = [
    "RepositoryError",
    "ManifestError",
    "UnknownSigner",
    "BadSignature",
    "TamperedArchive",
    "PathTraversal",
    "ArchiveError",
    "FetchError",
    "SiteUnreachable",
    "HostKeyMismatch",
    "AuthenticationFailed",
    "ServiceNotFound",
    "Resources",
    "ObjectEntry",
    "Manifest",
    "LifecyclePolicy",
    "Signature",
    "VerifiedService",
    "ArchiveCache",
    "MANIFEST_FILE",
    "POLICY_FILE",
    "SIGNATURE_FILE",
    "generate_keypair",
    "load_private_key",
    "load_public_key",
    "key_id",
    "signed_digest",
    "sign_service",
    "verify_metadata",
    "verify_service",
    "inspect_service",
    "scan_archive",
    "safe_extract",
    "install_service",
    "package_service",
    "publish_service",
    "sha256_file",
]

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
POLICY_FILE = "policy.json"
SIGNATURE_FILE = "service.sig"
OBJECT_FILE = "object.json"  # per-object metadata in a package source directory
STORE_DIR = ".store"  # where publish keeps the immutable service versions

FORMAT = 1
DIGEST_DOMAIN = b"moat-service-signature-v1\x00"
MiB = 1 << 20
MAX_METADATA_BYTES = 1 * MiB  # manifest, policy, signature: each
MAX_ARCHIVE_BYTES = 256 * MiB  # one compressed archive
MAX_EXTRACTED_BYTES = 512 * MiB  # everything one archive unpacks to
MAX_MEMBERS = 10_000

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
VERSION_RE = re.compile(r"^[0-9A-Za-z][0-9A-Za-z.+_-]{0,31}$")
ARCHIVE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}\.tar\.gz$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
ENTRY_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")
KEY_ID_RE = re.compile(r"^SHA256:[A-Za-z0-9+/]{43}$")
SKIP_NAMES = {"__pycache__", OBJECT_FILE, ".git", ".DS_Store"}


# --- errors ------------------------------------------------------------------------------


class RepositoryError(AgentError):
    """Base class of everything this module (and :mod:`agent.vm.fetch`) refuses."""


class ManifestError(RepositoryError):
    """A manifest, policy or signature file that is missing, malformed or inconsistent."""


class UnknownSigner(RepositoryError):
    """The service is signed by a key that is not among the trusted provider keys."""


class BadSignature(RepositoryError):
    """The signature does not match the manifest, archive hashes and policy."""


class TamperedArchive(RepositoryError):
    """An archive is missing or its sha256 differs from the (signed) manifest."""


class PathTraversal(RepositoryError):
    """An archive member would land outside the destination, or is a device/fifo."""


class ArchiveError(RepositoryError):
    """An archive that cannot be read or is too large (corrupt gzip, duplicate member)."""


class FetchError(RepositoryError):
    """Fetching a service from the remote site failed (see the subclasses)."""


class SiteUnreachable(FetchError):
    """The remote site did not answer: refused, unreachable, or timed out."""


class HostKeyMismatch(FetchError):
    """The remote site's SSH host key is not the one we were told to expect."""


class AuthenticationFailed(FetchError):
    """The remote site refused our client key."""


class ServiceNotFound(FetchError):
    """The repository has no such service."""


# --- small helpers -------------------------------------------------------------------------


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_limited(path: Path, limit: int, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        raise ManifestError(f"{what} missing: {path}") from None
    except OSError as exc:
        raise ManifestError(f"cannot read {what} {path}: {exc}") from exc
    if len(data) > limit:
        raise ManifestError(f"{what} {path} is larger than {limit} bytes")
    return data


def _json_object(data: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ManifestError(f"{what} must be a JSON object")
    return value


def _canonical(value: Mapping[str, Any]) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _check_keys(data: Mapping[str, Any], required: set[str], optional: set[str], what: str) -> None:
    missing = required - data.keys()
    if missing:
        raise ManifestError(f"{what}: missing {sorted(missing)}")
    unknown = data.keys() - required - optional
    if unknown:
        raise ManifestError(f"{what}: unknown fields {sorted(unknown)}")


def _check_re(value: Any, regex: re.Pattern[str], what: str) -> str:
    if not isinstance(value, str) or not regex.match(value):
        raise ManifestError(f"{what} {value!r} is invalid (must match {regex.pattern})")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# --- data model --------------------------------------------------------------------------


@dataclass(frozen=True)
class Resources:
    """What one object needs (the patent's "resource dependencies").

    ``cpu`` in CPUs (0.5 = half of one CPU, as :class:`agent.hosting.cgroups.Limits`), ``memory_mb``
    in MiB, ``pids`` processes and threads.
    """

    cpu: float = 0.1
    memory_mb: int = 64
    pids: int = 16

    def __post_init__(self) -> None:
        if not _is_number(self.cpu) or not 0.01 <= self.cpu <= 1024:
            raise ManifestError(f"resources.cpu {self.cpu!r} must be a number of CPUs in [0.01, 1024]")
        if not _is_int(self.memory_mb) or not 1 <= self.memory_mb <= 1 << 20:
            raise ManifestError(f"resources.memory_mb {self.memory_mb!r} must be an int in [1, 1048576]")
        if not _is_int(self.pids) or not 1 <= self.pids <= 1 << 16:
            raise ManifestError(f"resources.pids {self.pids!r} must be an int in [1, 65536]")

    @classmethod
    def from_json(cls, data: Any) -> "Resources":
        if not isinstance(data, dict):
            raise ManifestError("resources must be an object")
        _check_keys(data, set(), {"cpu", "memory_mb", "pids"}, "resources")
        return cls(**data)

    def to_json(self) -> dict[str, Any]:
        return {"cpu": self.cpu, "memory_mb": self.memory_mb, "pids": self.pids}

    def limits_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :class:`agent.hosting.cgroups.Limits`."""
        return {"cpu_quota": float(self.cpu), "memory_bytes": self.memory_mb * MiB,
                "pids_max": self.pids}


@dataclass(frozen=True)
class ObjectEntry:
    """One mobile object of a service."""

    name: str
    version: str
    archive: str
    sha256: str
    entry: str
    resources: Resources = field(default_factory=Resources)

    def __post_init__(self) -> None:
        _check_re(self.name, NAME_RE, "object name")
        _check_re(self.version, VERSION_RE, f"object {self.name} version")
        _check_re(self.archive, ARCHIVE_RE, f"object {self.name} archive")
        _check_re(self.sha256, SHA256_RE, f"object {self.name} sha256")
        _check_re(self.entry, ENTRY_RE, f"object {self.name} entry")

    @classmethod
    def from_json(cls, data: Any) -> "ObjectEntry":
        if not isinstance(data, dict):
            raise ManifestError("each object must be a JSON object")
        _check_keys(data, {"name", "version", "archive", "sha256", "entry"}, {"resources"}, "object")
        res = Resources.from_json(data.get("resources", {}))
        return cls(data["name"], data["version"], data["archive"], data["sha256"], data["entry"], res)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "archive": self.archive,
                "sha256": self.sha256, "entry": self.entry, "resources": self.resources.to_json()}


@dataclass(frozen=True)
class Manifest:
    """A service's manifest: what to fetch and what it needs to run."""

    service: str
    version: str
    provider: str
    objects: tuple[ObjectEntry, ...]

    def __post_init__(self) -> None:
        _check_re(self.service, NAME_RE, "service name")
        _check_re(self.version, VERSION_RE, "service version")
        if not isinstance(self.provider, str) or not 0 < len(self.provider) <= 128 \
                or not self.provider.isprintable():
            raise ManifestError(f"provider {self.provider!r} must be 1-128 printable characters")
        if not self.objects:
            raise ManifestError(f"service {self.service} lists no objects")
        for attr in ("name", "archive"):
            values = [getattr(o, attr) for o in self.objects]
            dups = sorted({v for v in values if values.count(v) > 1})
            if dups:
                raise ManifestError(f"service {self.service}: duplicate object {attr}s {dups}")

    @classmethod
    def from_bytes(cls, data: bytes) -> "Manifest":
        doc = _json_object(data, MANIFEST_FILE)
        _check_keys(doc, {"format", "service", "version", "provider", "objects"}, set(), MANIFEST_FILE)
        if doc["format"] != FORMAT:
            raise ManifestError(f"{MANIFEST_FILE}: unsupported format {doc['format']!r}")
        if not isinstance(doc["objects"], list):
            raise ManifestError(f"{MANIFEST_FILE}: objects must be a list")
        objects = tuple(ObjectEntry.from_json(o) for o in doc["objects"])
        return cls(doc["service"], doc["version"], doc["provider"], objects)

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "service": self.service, "version": self.version,
                "provider": self.provider, "objects": [o.to_json() for o in self.objects]}

    def to_bytes(self) -> bytes:
        return _canonical(self.to_json())

    def total_resources(self) -> Resources:
        """What the whole service needs (the sum over its objects)."""
        return Resources(
            cpu=round(sum(o.resources.cpu for o in self.objects), 6),
            memory_mb=sum(o.resources.memory_mb for o in self.objects),
            pids=sum(o.resources.pids for o in self.objects),
        )

    def object(self, name: str) -> ObjectEntry:
        for obj in self.objects:
            if obj.name == name:
                return obj
        raise KeyError(name)


@dataclass(frozen=True)
class LifecyclePolicy:
    """The patent's lifecycle policy: usage criteria, version checks, extension authorization.

    Usage is transaction based (``max_transactions``: the service may serve that many
    requests), time based (``max_duration_s``), or — with both ``None`` — unlimited for as
    long as the service stays on the router; not both. ``update_check_interval_s``: how
    often a VM asks the remote site for a newer version (``None``: never). ``shareable``:
    other services may use this one; ``extensible``: other services may extend/revise it.
    """

    max_transactions: int | None = None
    max_duration_s: float | None = None
    update_check_interval_s: float | None = 300.0
    shareable: bool = False
    extensible: bool = False

    def __post_init__(self) -> None:
        if self.max_transactions is not None and (
                not _is_int(self.max_transactions) or self.max_transactions < 1):
            raise ManifestError(f"max_transactions {self.max_transactions!r} must be an int >= 1")
        if self.max_duration_s is not None and (
                not _is_number(self.max_duration_s) or self.max_duration_s <= 0):
            raise ManifestError(f"max_duration_s {self.max_duration_s!r} must be a number > 0")
        if self.max_transactions is not None and self.max_duration_s is not None:
            raise ManifestError("a policy limits usage by transactions or by duration, not both")
        if self.update_check_interval_s is not None and (
                not _is_number(self.update_check_interval_s) or self.update_check_interval_s <= 0):
            raise ManifestError(
                f"update_check_interval_s {self.update_check_interval_s!r} must be a number > 0")
        for attr in ("shareable", "extensible"):
            if not isinstance(getattr(self, attr), bool):
                raise ManifestError(f"{attr} must be true or false")

    @property
    def usage(self) -> str:
        """``"transactions"``, ``"duration"`` or ``"unlimited"``."""
        if self.max_transactions is not None:
            return "transactions"
        if self.max_duration_s is not None:
            return "duration"
        return "unlimited"

    @classmethod
    def from_json(cls, doc: Mapping[str, Any], what: str = POLICY_FILE) -> "LifecyclePolicy":
        fields = {"max_transactions", "max_duration_s", "update_check_interval_s", "shareable",
                  "extensible"}
        _check_keys(doc, set(), fields | {"format"}, what)
        if doc.get("format", FORMAT) != FORMAT:
            raise ManifestError(f"{what}: unsupported format {doc['format']!r}")
        return cls(**{k: v for k, v in doc.items() if k in fields})

    @classmethod
    def from_bytes(cls, data: bytes) -> "LifecyclePolicy":
        return cls.from_json(_json_object(data, POLICY_FILE))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "LifecyclePolicy":
        return cls.from_bytes(_read_limited(Path(path), MAX_METADATA_BYTES, "policy"))

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "max_transactions": self.max_transactions,
                "max_duration_s": self.max_duration_s,
                "update_check_interval_s": self.update_check_interval_s,
                "shareable": self.shareable, "extensible": self.extensible}

    def to_bytes(self) -> bytes:
        return _canonical(self.to_json())


@dataclass(frozen=True)
class Signature:
    """``service.sig``: who signed, the archive hashes signed, and the signature."""

    key_id: str
    archives: tuple[str, ...]
    signature: bytes
    algorithm: str = "ed25519"

    @classmethod
    def from_bytes(cls, data: bytes) -> "Signature":
        doc = _json_object(data, SIGNATURE_FILE)
        _check_keys(doc, {"format", "algorithm", "key_id", "archives", "signature"}, set(),
                    SIGNATURE_FILE)
        if doc["format"] != FORMAT or doc["algorithm"] != "ed25519":
            raise ManifestError(f"{SIGNATURE_FILE}: unsupported format/algorithm "
                                f"{doc['format']!r}/{doc['algorithm']!r}")
        _check_re(doc["key_id"], KEY_ID_RE, f"{SIGNATURE_FILE} key_id")
        if not isinstance(doc["archives"], list):
            raise ManifestError(f"{SIGNATURE_FILE}: archives must be a list")
        archives = tuple(_check_re(a, SHA256_RE, f"{SIGNATURE_FILE} archive hash")
                         for a in doc["archives"])
        try:
            sig = base64.b64decode(doc["signature"], validate=True)
        except (ValueError, TypeError):
            raise ManifestError(f"{SIGNATURE_FILE}: signature is not base64") from None
        if len(sig) != 64:
            raise ManifestError(f"{SIGNATURE_FILE}: an Ed25519 signature has 64 bytes, got {len(sig)}")
        return cls(doc["key_id"], archives, sig)

    def to_bytes(self) -> bytes:
        return _canonical({"format": FORMAT, "algorithm": self.algorithm, "key_id": self.key_id,
                           "archives": list(self.archives),
                           "signature": base64.b64encode(self.signature).decode("ascii")})


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


# --- keys --------------------------------------------------------------------------------


def key_id(public_key: Ed25519PublicKey) -> str:
    """``SHA256:<base64>`` of the key's SSH wire form, as ``ssh-keygen -l`` prints it."""
    line = public_key.public_bytes(serialization.Encoding.OpenSSH,
                                   serialization.PublicFormat.OpenSSH)
    blob = base64.b64decode(line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def generate_keypair(directory: str | os.PathLike[str], name: str = "provider") -> tuple[Path, Path]:
    """Write ``<name>.key`` (OpenSSH private key, mode 0600) and ``<name>.pub`` into
    ``directory``; never overwrites. Returns (private, public) paths."""
    _check_re(name, NAME_RE, "key name")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    priv_path, pub_path = d / f"{name}.key", d / f"{name}.pub"
    for p in (priv_path, pub_path):
        if p.exists():
            raise RepositoryError(f"{p} already exists; refusing to overwrite a key")
    key = Ed25519PrivateKey.generate()
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                        serialization.PublicFormat.OpenSSH)
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(priv)
    pub_path.write_bytes(pub + f" {name}\n".encode())
    return priv_path, pub_path


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """An Ed25519 private key from an OpenSSH or PEM (PKCS#8) file."""
    data = Path(path).read_bytes()
    try:
        if b"OPENSSH PRIVATE KEY" in data:
            key = serialization.load_ssh_private_key(data, password=None)
        else:
            key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise RepositoryError(f"{path}: not an unencrypted private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise RepositoryError(f"{path}: not an Ed25519 key")
    return key


def load_public_key(source: Ed25519PublicKey | str | bytes | os.PathLike[str]) -> Ed25519PublicKey:
    """An Ed25519 public key from a key object, an ``ssh-ed25519 AAAA...`` line, or a file."""
    if isinstance(source, Ed25519PublicKey):
        return source
    if isinstance(source, str) and source.lstrip().startswith("ssh-"):
        data = source.encode()
    elif isinstance(source, bytes):
        data = source
    else:
        try:
            data = Path(source).read_bytes()
        except OSError as exc:
            raise RepositoryError(f"cannot read public key {source}: {exc}") from None
    try:
        if data.lstrip().startswith(b"ssh-"):
            key = serialization.load_ssh_public_key(b" ".join(data.split()[:2]))
        else:
            key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, IndexError, AttributeError) as exc:
        raise RepositoryError(f"not a public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise RepositoryError("not an Ed25519 public key")
    return key


# --- signing and verification ------------------------------------------------------------


def signed_digest(manifest: bytes, archive_hashes: Iterable[str], policy: bytes) -> bytes:
    """The 32 bytes a provider signs: sha256 over a domain tag, the length-prefixed manifest
    bytes, the count and raw sha256 of every archive in manifest order, and the
    length-prefixed policy bytes. Length prefixes keep the encoding unambiguous."""
    hashes = list(archive_hashes)
    h = hashlib.sha256(DIGEST_DOMAIN)
    h.update(len(manifest).to_bytes(8, "big"))
    h.update(manifest)
    h.update(len(hashes).to_bytes(4, "big"))
    for a in hashes:
        h.update(bytes.fromhex(a))
    h.update(len(policy).to_bytes(8, "big"))
    h.update(policy)
    return h.digest()


def sign_service(service_dir: str | os.PathLike[str], private_key: Ed25519PrivateKey) -> Path:
    """(Re)write ``service.sig`` for the manifest and policy in ``service_dir``.

    The archive hashes signed are the ones the manifest declares (they are checked
    against the files by verification, and :func:`package_service` computed them)."""
    d = Path(service_dir)
    manifest_bytes = _read_limited(d / MANIFEST_FILE, MAX_METADATA_BYTES, "manifest")
    policy_bytes = _read_limited(d / POLICY_FILE, MAX_METADATA_BYTES, "policy")
    manifest = Manifest.from_bytes(manifest_bytes)
    LifecyclePolicy.from_bytes(policy_bytes)
    hashes = tuple(o.sha256 for o in manifest.objects)
    sig = private_key.sign(signed_digest(manifest_bytes, hashes, policy_bytes))
    out = d / SIGNATURE_FILE
    _atomic_write(out, Signature(key_id(private_key.public_key()), hashes, sig).to_bytes())
    return out


def _trusted_map(trusted: Iterable[Any]) -> dict[str, Ed25519PublicKey]:
    keys = {}
    for item in trusted:
        key = load_public_key(item)
        keys[key_id(key)] = key
    return keys


def verify_metadata(
    manifest_bytes: bytes, policy_bytes: bytes, signature_bytes: bytes, trusted: Iterable[Any]
) -> tuple[Manifest, LifecyclePolicy, str]:
    """Check the signature over raw manifest/policy bytes, then parse them.

    Order matters: the signer and the signature are checked before the manifest is parsed,
    so a tampered manifest is a :class:`BadSignature`, whatever it now contains.
    Returns (manifest, policy, signer key id).
    """
    sig = Signature.from_bytes(signature_bytes)
    keys = _trusted_map(trusted)
    key = keys.get(sig.key_id)
    if key is None:
        raise UnknownSigner(f"signed by {sig.key_id}, which is not a trusted provider key "
                            f"(trusted: {', '.join(sorted(keys)) or 'none'})")
    try:
        key.verify(sig.signature, signed_digest(manifest_bytes, sig.archives, policy_bytes))
    except InvalidSignature:
        raise BadSignature(f"the signature by {sig.key_id} does not match the manifest, "
                           "archive hashes and policy") from None
    manifest = Manifest.from_bytes(manifest_bytes)
    policy = LifecyclePolicy.from_bytes(policy_bytes)
    declared = tuple(o.sha256 for o in manifest.objects)
    if declared != sig.archives:
        raise ManifestError("the signed archive hashes differ from the manifest's")
    return manifest, policy, sig.key_id


def _check_archives(d: Path, manifest: Manifest) -> None:
    for obj in manifest.objects:
        path = d / obj.archive
        try:
            st = path.lstat()
        except FileNotFoundError:
            raise TamperedArchive(f"archive {obj.archive} of object {obj.name} is missing") from None
        if not stat.S_ISREG(st.st_mode):
            raise TamperedArchive(f"archive {obj.archive} is not a regular file")
        actual = sha256_file(path)
        if not hmac.compare_digest(actual, obj.sha256):
            raise TamperedArchive(f"archive {obj.archive}: sha256 {actual} differs from the "
                                  f"manifest's {obj.sha256}")
        scan_archive(path)


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


# --- archives ----------------------------------------------------------------------------


def _member_parts(name: str, what: str = "member") -> tuple[str, ...]:
    """The path components of a member name or link target; refuses absolute paths and
    ``..`` anywhere (lexical checks cannot see through symlinks, so ``..`` is never safe)."""
    if not name or "\x00" in name:
        raise PathTraversal(f"archive {what} with an empty or NUL name {name!r}")
    if name.startswith("/") or name.startswith("\\"):
        raise PathTraversal(f"archive {what} {name!r} is an absolute path")
    if ".." in name.replace("\\", "/").split("/"):
        raise PathTraversal(f"archive {what} {name!r} contains '..'")
    return tuple(p for p in PurePosixPath(name).parts if p not in ("", "."))


def _check_member(member: tarfile.TarInfo) -> tuple[str, ...]:
    parts = _member_parts(member.name)
    if member.isdev() or member.isfifo() or not (member.isfile() or member.isdir()
                                                 or member.issym() or member.islnk()):
        kind = ("character device" if member.ischr() else "block device" if member.isblk()
                else "fifo" if member.isfifo() else f"type {member.type!r}")
        raise PathTraversal(f"archive member {member.name!r} is a {kind}")
    if member.issym():
        # Relative targets without '..' resolve below the link's own directory, which
        # is inside the destination; that holds for chains of such links too.
        _member_parts(member.linkname, f"symlink {member.name!r} target")
    if member.islnk():
        if not _member_parts(member.linkname, f"hardlink {member.name!r} target"):
            raise PathTraversal(f"hardlink {member.name!r} points at the archive root")
    if not parts and not member.isdir():
        raise PathTraversal(f"archive member {member.name!r} names the destination itself")
    return parts


def _open_tar(archive: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(archive, mode="r:gz")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ArchiveError(f"{archive.name}: not a readable tar.gz archive: {exc}") from None


def _members(tar: tarfile.TarFile, archive: Path) -> Iterator[tuple[tarfile.TarInfo, tuple[str, ...]]]:
    count = total = 0
    seen: set[tuple[str, ...]] = set()
    try:
        for member in tar:
            count += 1
            if count > MAX_MEMBERS:
                raise ArchiveError(f"{archive.name}: more than {MAX_MEMBERS} members")
            parts = _check_member(member)
            if member.isfile():
                total += member.size
                if total > MAX_EXTRACTED_BYTES:
                    raise ArchiveError(f"{archive.name}: unpacks to more than "
                                       f"{MAX_EXTRACTED_BYTES} bytes")
            if parts in seen and not member.isdir():
                raise ArchiveError(f"{archive.name}: duplicate member {member.name!r}")
            seen.add(parts)
            yield member, parts
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
        raise ArchiveError(f"{archive.name}: corrupt archive: {exc}") from None


def scan_archive(archive: str | os.PathLike[str]) -> list[str]:
    """Check every member of a tar.gz without extracting; return the member names."""
    path = Path(archive)
    with _open_tar(path) as tar:
        return [m.name for m, _ in _members(tar, path)]


def _extract_into(archive: Path, root: Path) -> None:
    """Extract ``archive`` into the existing empty directory ``root``.

    Modes are normalised (0644, or 0755 for directories and executables; no setuid, no
    sticky bits), owners are not restored, and files are created with O_EXCL|O_NOFOLLOW.
    """
    try:
        _extract_members(archive, str(root))
    except RepositoryError:
        raise
    except OSError as exc:  # e.g. a member under a dangling (inside) symlink
        raise ArchiveError(f"{archive.name}: cannot extract: {exc}") from None


def _extract_members(archive: Path, dir_fd_root: str) -> None:
    with _open_tar(archive) as tar:
        for member, parts in _members(tar, archive):
            if not parts:
                continue
            target = Path(dir_fd_root, *parts)
            parent = target.parent
            parent.mkdir(parents=True, exist_ok=True, mode=0o755)
            if member.isdir():
                if target.is_symlink() or (target.exists() and not target.is_dir()):
                    raise ArchiveError(f"{archive.name}: {member.name!r} is a directory and a file")
                target.mkdir(exist_ok=True, mode=0o755)
            elif member.issym():
                os.symlink(member.linkname, target)
            elif member.islnk():
                source = Path(dir_fd_root, *_member_parts(member.linkname))
                try:
                    os.link(source, target, follow_symlinks=False)
                except OSError as exc:
                    raise ArchiveError(f"{archive.name}: hardlink {member.name!r}: {exc}") from None
            else:
                mode = 0o755 if member.mode & 0o111 else 0o644
                src = tar.extractfile(member)
                if src is None:
                    raise ArchiveError(f"{archive.name}: cannot read {member.name!r}")
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
                with os.fdopen(fd, "wb") as out, src:
                    shutil.copyfileobj(src, out)
                os.chmod(target, mode)


def _staging_dir(dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))


def _move_into_place(staging: Path, dest: Path, replace: bool) -> None:
    """Rename a complete ``staging`` directory to ``dest``; with ``replace`` an existing
    ``dest`` is swapped out (rename aside, rename in, remove the old one)."""
    os.chmod(staging, 0o755)
    if not (dest.exists() or dest.is_symlink()):
        os.rename(staging, dest)
        return
    if not replace:
        raise RepositoryError(f"{dest} already exists")
    old = dest.with_name(f".{dest.name}.old-{secrets.token_hex(4)}")
    os.rename(dest, old)
    try:
        os.rename(staging, dest)
    except BaseException:
        os.rename(old, dest)
        raise
    _remove(old)


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)


def safe_extract(archive: str | os.PathLike[str], dest: str | os.PathLike[str],
                 replace: bool = False) -> Path:
    """Extract a tar.gz into ``dest`` (which must not exist unless ``replace``).

    Everything is checked first (:class:`PathTraversal` for absolute paths, ``..``, links
    that could point outside, devices and fifos; :class:`ArchiveError` for corrupt or
    oversized archives); then members go into a fresh temporary directory beside ``dest``
    that is renamed into place at the end. On any error ``dest`` is untouched (absent, or
    the previous contents) and the temporary directory is gone.
    """
    archive, dest = Path(archive), Path(dest)
    scan_archive(archive)
    staging = _staging_dir(dest)
    try:
        _extract_into(archive, staging)
        _move_into_place(staging, dest, replace)
    except BaseException:
        _remove(staging)
        raise
    return dest


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


# --- packaging and publishing --------------------------------------------------------------


def _tar_filter_sources(obj_dir: Path) -> list[Path]:
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(obj_dir, followlinks=False):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_NAMES)
        for d in list(dirnames):
            if (here / d).is_symlink():
                raise ManifestError(f"{here / d}: symlinks are not packaged")
            files.append(here / d)
        for name in sorted(filenames):
            if name in SKIP_NAMES or name.endswith((".pyc", ".pyo")):
                continue
            p = here / name
            if p.is_symlink() or not p.is_file():
                raise ManifestError(f"{p}: only regular files are packaged")
            files.append(p)
    return sorted(files, key=lambda p: p.relative_to(obj_dir).as_posix())


def build_archive(obj_dir: str | os.PathLike[str], out: str | os.PathLike[str]) -> str:
    """Pack ``obj_dir``'s contents (archive root = the directory) into a reproducible
    tar.gz — sorted, owner 0, mtime 0, normalised modes — and return its sha256."""
    obj_dir, out = Path(obj_dir), Path(out)
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for path in _tar_filter_sources(obj_dir):
                rel = path.relative_to(obj_dir).as_posix()
                info = tarfile.TarInfo(rel)
                info.mtime = 0
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                if path.is_dir():
                    info.type = tarfile.DIRTYPE
                    info.mode = 0o755
                    tar.addfile(info)
                else:
                    info.size = path.stat().st_size
                    info.mode = 0o755 if os.access(path, os.X_OK) else 0o644
                    with open(path, "rb") as f:
                        tar.addfile(info, f)
    data = buf.getvalue()
    _atomic_write(out, data)
    return hashlib.sha256(data).hexdigest()


def _atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
        _check_keys(doc, {"entry"}, {"name", "version", "resources"}, str(d / OBJECT_FILE))
        out.append((d, doc))
    return out


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
        for obj_dir, doc in _object_sources(src):
            name = doc.get("name", obj_dir.name)
            obj_version = doc.get("version", version)
            _check_re(name, NAME_RE, "object name")
            _check_re(obj_version, VERSION_RE, f"object {name} version")
            archive = f"{name}-{obj_version}.tar.gz"
            digest = build_archive(obj_dir, staging / archive)
            objects.append(ObjectEntry(name, obj_version, archive, digest, doc["entry"],
                                       Resources.from_json(doc.get("resources", {}))))
        manifest = Manifest(service, version, provider, tuple(objects))
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


# --- archive cache -------------------------------------------------------------------------


class ArchiveCache:
    """Archives a VM already fetched, keyed by (service, version, sha256).

    A hit is re-hashed before use, so a damaged cache entry is dropped, never trusted.
    Entries are written with a temporary file and ``rename``.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def path_for(self, service: str, version: str, sha256: str) -> Path:
        _check_re(service, NAME_RE, "service name")
        _check_re(version, VERSION_RE, "version")
        _check_re(sha256, SHA256_RE, "sha256")
        return self.root / service / version / f"{sha256}.tar.gz"

    def get(self, service: str, version: str, sha256: str) -> Path | None:
        path = self.path_for(service, version, sha256)
        try:
            if not stat.S_ISREG(path.lstat().st_mode):
                return None
        except FileNotFoundError:
            return None
        if not hmac.compare_digest(sha256_file(path), sha256):
            log.warning("cache entry %s is damaged; dropping it", path)
            path.unlink(missing_ok=True)
            return None
        return path

    def put(self, service: str, version: str, sha256: str, source: str | os.PathLike[str]) -> Path:
        """Store a copy of ``source``, which must hash to ``sha256``."""
        actual = sha256_file(source)
        if not hmac.compare_digest(actual, sha256):
            raise TamperedArchive(f"refusing to cache {source}: sha256 {actual} is not {sha256}")
        path = self.path_for(service, version, sha256)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".put-", dir=path.parent)
        os.close(fd)
        try:
            shutil.copyfile(source, tmp)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    def entries(self) -> list[tuple[str, str, str]]:
        """Every (service, version, sha256) in the cache."""
        out = []
        if not self.root.is_dir():
            return out
        for p in sorted(self.root.glob("*/*/*.tar.gz")):
            out.append((p.parent.parent.name, p.parent.name, p.name[: -len(".tar.gz")]))
        return out
