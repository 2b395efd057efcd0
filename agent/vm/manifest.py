"""The service manifest and lifecycle policy: what a service is, and their validation.

A service directory holds ``manifest.json`` (the service, its provider, and its mobile
objects: name, version, archive file, sha256, entry ``"module:Class"``, resources; for a
converter also the formats it ``consumes`` and ``produces``, which the service broker chains
into dynamic service paths, Fig. 12 step 202) and
``policy.json`` (the patent's lifecycle policy). This module is their data model
(:class:`Manifest`, :class:`ObjectEntry`, :class:`Resources`, :class:`LifecyclePolicy`),
their canonical JSON form, and every field check: a value that does not fit is a
:class:`~agent.vm.errors.ManifestError` at construction time, so an object of these classes
is always valid. The name and hash patterns here are also what the other repository
modules and :mod:`agent.vm.fetch` check names against.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from agent.vm.errors import ManifestError
from agent.vm.files import _read_limited

__all__ = [
    "Resources",
    "ObjectEntry",
    "Manifest",
    "LifecyclePolicy",
    "MANIFEST_FILE",
    "POLICY_FILE",
]

MANIFEST_FILE = "manifest.json"
POLICY_FILE = "policy.json"
OBJECT_FILE = "object.json"  # per-object metadata in a package source directory

FORMAT = 1
MiB = 1 << 20
MAX_METADATA_BYTES = 1 * MiB  # manifest, policy, signature: each

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
VERSION_RE = re.compile(r"^[0-9A-Za-z][0-9A-Za-z.+_-]{0,31}$")
ARCHIVE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}\.tar\.gz$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
ENTRY_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")


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
    if not isinstance(value, str) or not regex.fullmatch(value):
        raise ManifestError(f"{what} {value!r} is invalid (must match {regex.pattern})")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


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
    #: The formats a converter takes and gives ("text" -> "html"); both empty otherwise.
    consumes: str = ""
    produces: str = ""
    #: Other services this one needs (the patent's dependencies, Fig. 12 step 214): a VM
    #: fetches and verifies each from the remote site too, or refuses the service.
    requires: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_re(self.service, NAME_RE, "service name")
        if not isinstance(self.requires, tuple) or len(self.requires) > 16:
            raise ManifestError(f"service {self.service}: requires is a list of at most 16 "
                                "services")
        for other in self.requires:
            _check_re(other, NAME_RE, "required service")
        if self.service in self.requires:
            raise ManifestError(f"service {self.service} requires itself")
        _check_re(self.version, VERSION_RE, "service version")
        for attr in ("consumes", "produces"):
            value = getattr(self, attr)
            if value != "":
                _check_re(value, NAME_RE, f"{attr} format")
        if bool(self.consumes) != bool(self.produces):
            raise ManifestError(f"service {self.service}: a converter declares both consumes "
                                "and produces, or neither")
        if self.consumes and self.consumes == self.produces:
            raise ManifestError(f"service {self.service} consumes and produces "
                                f"{self.consumes!r}: not a conversion")
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
        _check_keys(doc, {"format", "service", "version", "provider", "objects"},
                    {"consumes", "produces", "requires"}, MANIFEST_FILE)
        if doc["format"] != FORMAT:
            raise ManifestError(f"{MANIFEST_FILE}: unsupported format {doc['format']!r}")
        if not isinstance(doc["objects"], list):
            raise ManifestError(f"{MANIFEST_FILE}: objects must be a list")
        objects = tuple(ObjectEntry.from_json(o) for o in doc["objects"])
        requires = doc.get("requires", [])
        if not isinstance(requires, list):
            raise ManifestError(f"{MANIFEST_FILE}: requires must be a list of service names")
        return cls(doc["service"], doc["version"], doc["provider"], objects,
                   doc.get("consumes", ""), doc.get("produces", ""), tuple(requires))

    def to_json(self) -> dict[str, Any]:
        doc = {"format": FORMAT, "service": self.service, "version": self.version,
               "provider": self.provider, "objects": [o.to_json() for o in self.objects]}
        if self.consumes:  # absent otherwise: a manifest without formats keeps its bytes
            doc.update(consumes=self.consumes, produces=self.produces)
        if self.requires:
            doc["requires"] = list(self.requires)
        return doc

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
