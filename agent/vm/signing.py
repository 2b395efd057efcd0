"""Provider keys, key ids and service signatures (Ed25519).

Keys are OpenSSH-format Ed25519 keys (``ssh-ed25519 AAAA... provider``), so
``ssh-keygen -l -f provider.pub`` shows the same fingerprint MOAT reports as :func:`key_id`.

``service.sig`` (:class:`Signature`) is the provider's signature over a canonical digest
(:func:`signed_digest`) of the manifest bytes, each archive's sha256 in manifest order, and
the policy bytes, so a change to any of them is caught. :func:`verify_metadata` checks the
signer and the signature over the raw bytes *before* it parses the manifest, so a tampered
manifest is a :class:`~agent.vm.errors.BadSignature` whatever it now contains; an untrusted
signer is an :class:`~agent.vm.errors.UnknownSigner`. Checking the archives themselves is
:mod:`agent.vm.archive`'s job, and :func:`agent.vm.repository.verify_service` does both.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from agent.vm.errors import BadSignature, ManifestError, RepositoryError, UnknownSigner
from agent.vm.files import _atomic_write, _read_limited
from agent.vm.manifest import (
    FORMAT,
    MANIFEST_FILE,
    MAX_METADATA_BYTES,
    NAME_RE,
    POLICY_FILE,
    SHA256_RE,
    LifecyclePolicy,
    Manifest,
    _canonical,
    _check_keys,
    _check_re,
    _json_object,
)

__all__ = [
    "Signature",
    "SIGNATURE_FILE",
    "generate_keypair",
    "load_private_key",
    "load_public_key",
    "key_id",
    "signed_digest",
    "sign_service",
    "verify_metadata",
]

SIGNATURE_FILE = "service.sig"
DIGEST_DOMAIN = b"moat-service-signature-v1\x00"
KEY_ID_RE = re.compile(r"^SHA256:[A-Za-z0-9+/]{43}$")


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
