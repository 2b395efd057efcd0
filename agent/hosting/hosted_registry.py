"""The agent's registry of the objects it hosts, so that a restarted agent takes them over.

An object process outlives a crash of its router's agent (its relay holds the channel,
:mod:`agent.hosting.sandbox`). What the next agent of the router needs to find it again is
written here, one JSON file per router in a root-only directory of the run
(``<run>/<router>-hosted/objects.json``, 0600): per object its configuration (home address,
registration credentials, the service key of a leased object: hence root-only), whether it
registers, its VM, its resources, how its process was started and the identity of its relay
(pid and start time, cgroup, socket), and its last checkpoint.

Every write is atomic (a new 0600 file, fsync, rename: :func:`agent.core.runfiles.write_private`),
so a reader sees the old registry or the new one, never half of either. A registry that
cannot be read (torn by a crash of the disk, edited by hand) is logged and ignored: the agent
starts with no object rather than with wrong ones, the file is kept aside for a person to
read, and :attr:`HostedRegistry.load_error` says why (for ``status``).

The VM role keeps its record of VMs the same way, in the same directory (another file and
top-level key: :mod:`agent.vm.vm_record`).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from pathlib import Path
from typing import Any

from agent.core.errors import AgentError
from agent.core.runfiles import RunDirError, write_private

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


class HostedRegistry:
    """The objects of one router's agent, by name, kept on disk as they change.

        registry = HostedRegistry(run_dir / "r18b-hosted")
        registry.load()                     # what the last agent left ({} if nothing usable)
        registry.put("counter", {...})      # written at once
        registry.remove("counter")
    """

    def __init__(self, directory: Path, file: str = REGISTRY_FILE, key: str = "objects",
                 what: str = "hosted-object registry") -> None:
        self.directory = Path(directory)
        self.path = self.directory / file
        #: The document's key for the entries, and what log lines call the file.
        self.key, self.what = key, what
        self.entries: dict[str, dict[str, Any]] = {}
        #: Why the last :meth:`load` found nothing usable in a file that was there (None: it
        #: read the file, or there was none).
        self.load_error: str | None = None

    def load(self) -> dict[str, dict[str, Any]]:
        """The entries on disk, taken as this registry's; {} when there are none or the file
        is unusable (then kept aside as ``<file>.bad-<random>``, logged, and
        :attr:`load_error` set)."""
        self.entries = {}
        self.load_error = None
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            self.load_error = f"{self.what} {self.path} unreadable: {exc}"
            log.error("%s", self.load_error)
            return {}
        try:
            doc = json.loads(raw)
            if not isinstance(doc, dict) or doc.get("version") != VERSION \
                    or not isinstance(doc.get(self.key), dict) \
                    or not all(isinstance(k, str) and isinstance(v, dict)
                               for k, v in doc[self.key].items()):
                raise ValueError(f"not a {self.what} of this version")
        except (ValueError, UnicodeDecodeError) as exc:
            aside = self.path.with_name(f"{self.path.name}.bad-{secrets.token_hex(3)}")
            self.load_error = f"{self.what} {self.path} is not usable ({exc}): ignored, kept as {aside.name}"
            log.error("%s", self.load_error)
            try:
                os.replace(self.path, aside)
            except OSError:
                pass
            return {}
        self.entries = dict(doc[self.key])
        return dict(self.entries)

    def put(self, name: str, entry: dict[str, Any]) -> None:
        self.entries[name] = entry
        self.save()

    def update(self, name: str, durable: bool = True, **fields: Any) -> None:
        """Change fields of an entry there is (none: nothing happens). ``durable=False``
        writes it atomically without the fsync, for a caller on a move's switch: what it
        guards against then is an agent's crash, which keeps the page cache."""
        if name in self.entries:
            self.entries[name] = dict(self.entries[name], **fields)
            self.save(sync=durable)

    def remove(self, name: str) -> None:
        if self.entries.pop(name, None) is not None:
            self.save()

    def save(self, sync: bool = True) -> None:
        """Write every entry; RegistryError (logged by the caller) when the disk refuses:
        the objects keep running, only a restarted agent would not find them."""
        try:
            data = json.dumps({"version": VERSION, self.key: self.entries},
                              allow_nan=False).encode()
        except (TypeError, ValueError) as exc:
            raise RegistryError(f"{self.what}: an entry is not JSON: {exc}") from None
        try:
            private_dir(self.directory)
            write_private(self.path, data, sync=sync)
        except (OSError, RegistryError, RunDirError) as exc:
            raise RegistryError(f"{self.what} {self.path} not written: {exc}") from None
