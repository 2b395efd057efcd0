"""The agent's registry of the objects it hosts, so that a restarted agent takes them over.

An object process outlives a crash of its router's agent (its relay holds the channel,
:mod:`agent.hosting.sandbox`). What the next agent of the router needs to find it again is
written here, one JSON file per router in a root-only directory of the run
(``<run>/<router>-hosted/objects.json``, 0600): per object its configuration (home address,
registration credentials, the service key of a leased object: hence root-only), whether it
registers, its VM, its resources, how its process was started and the identity of its relay
(pid and start time, cgroup, socket), and its last checkpoint.

Every write is atomic (a new 0600 file, fsync, rename), so a reader sees the old registry or
the new one, never half of either. A registry that cannot be read (torn by a crash of the
disk, edited by hand) is logged and ignored: the agent starts with no object rather than
with wrong ones, and the file is kept aside for a person to read.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from pathlib import Path
from typing import Any

from agent.core.errors import AgentError

log = logging.getLogger(__name__)

REGISTRY_FILE = "objects.json"
VERSION = 1


class RegistryError(AgentError):
    """The registry could not be written (the run directory is full or read-only)."""


def private_dir(path: Path) -> Path:
    """``path`` as a directory only its owner (root) may enter: made 0700, or an existing
    one checked to be a real directory of ours that nobody else can enter."""
    path = Path(path)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        st = os.lstat(path)
        if not os.path.isdir(path) or os.path.islink(path) or st.st_uid != os.geteuid() \
                or st.st_mode & 0o077:
            raise RegistryError(f"{path} is not a private directory of uid {os.geteuid()}") from None
    return path


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """``path`` replaced by ``data`` at once, with ``mode`` from its creation."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        if os.fstat(fd).st_mode & 0o777 != mode:
            os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        raise


class HostedRegistry:
    """The objects of one router's agent, by name, kept on disk as they change.

        registry = HostedRegistry(run_dir / "r18b-hosted")
        registry.load()                     # what the last agent left ({} if nothing usable)
        registry.put("counter", {...})      # written at once
        registry.remove("counter")
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.path = self.directory / REGISTRY_FILE
        self.entries: dict[str, dict[str, Any]] = {}

    def load(self) -> dict[str, dict[str, Any]]:
        """The entries on disk, taken as this registry's; {} when there are none or the file
        is unusable (then kept aside as ``objects.json.bad-<random>`` and logged)."""
        self.entries = {}
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            log.error("hosted-object registry %s unreadable: %s", self.path, exc)
            return {}
        try:
            doc = json.loads(raw)
            if not isinstance(doc, dict) or doc.get("version") != VERSION \
                    or not isinstance(doc.get("objects"), dict) \
                    or not all(isinstance(k, str) and isinstance(v, dict)
                               for k, v in doc["objects"].items()):
                raise ValueError("not a registry of this version")
        except (ValueError, UnicodeDecodeError) as exc:
            aside = self.path.with_name(f"{REGISTRY_FILE}.bad-{secrets.token_hex(3)}")
            log.error("hosted-object registry %s is not usable (%s): ignored, kept as %s",
                      self.path, exc, aside.name)
            try:
                os.replace(self.path, aside)
            except OSError:
                pass
            return {}
        self.entries = dict(doc["objects"])
        return dict(self.entries)

    def put(self, name: str, entry: dict[str, Any]) -> None:
        self.entries[name] = entry
        self.save()

    def update(self, name: str, **fields: Any) -> None:
        """Change fields of an entry there is (none: nothing happens)."""
        if name in self.entries:
            self.entries[name] = dict(self.entries[name], **fields)
            self.save()

    def remove(self, name: str) -> None:
        if self.entries.pop(name, None) is not None:
            self.save()

    def save(self) -> None:
        """Write every entry; RegistryError (logged by the caller) when the disk refuses:
        the objects keep running, only a restarted agent would not find them."""
        try:
            data = json.dumps({"version": VERSION, "objects": self.entries},
                              allow_nan=False).encode()
        except (TypeError, ValueError) as exc:
            raise RegistryError(f"hosted-object registry: an entry is not JSON: {exc}") from None
        try:
            private_dir(self.directory)
            write_atomic(self.path, data)
        except (OSError, RegistryError) as exc:
            raise RegistryError(f"hosted-object registry {self.path} not written: {exc}") from None
