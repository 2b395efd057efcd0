"""What a nested home agent keeps in the run directory, so that it outlives a crash of its
router's agent (issue 13): an object's router is its parts' home agent
(:mod:`agent.distribution.nested`), and a secondary whose binding is forgotten gets no
packet until its next renewal.

Two files per nested home, both root-only (0600) in the 0700 run directory:

* ``<run>/<router>.nested-<object>.journal``: the parts' bindings, the very format of the
  router's own journal (:mod:`agent.mobility.journal`: a CRC per line, fdatasync before the
  reply, compaction, expiry on both clocks with the boot id). One journal per nested home
  rather than a tagged section of the router's: the router's journal restores one HOA table
  and one FOA table and compacts them together, while a nested home comes and goes with its
  object; a file of its own is restored by the same code unchanged and removed with one
  unlink when the object stops or leaves.
* ``<run>/<router>.nested-<object>.json``: what the nested home needs to start again without
  its VM (which dies with the agent): the object's name, home address and VM, and each part's
  address, NAI and Mobile-Home credential (the journal holds no keys; the parts' keys are
  derived from the object's, which is not written). Written atomically before the nested home
  opens UDP 434, so a journal always has its description beside it.

A description that is not this user's regular file, or that group or others can read or
write, is not trusted; one whose fields fail their checks is skipped. Either is logged and
left in place (nothing is deleted on a guess).
"""

from __future__ import annotations

import json
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.core import fields
from agent.core.config import Credential, HomeObject, ObjectConfig
from agent.core.errors import AgentError
from agent.core.runfiles import RunDirError, write_private
from agent.vm.parts import MAX_PARTS

log = logging.getLogger(__name__)

VERSION = 1
#: A description larger than this is not one this module wrote.
MAX_SPEC_BYTES = 64 * 1024


class NestedSpecError(AgentError):
    """A nested home's description that cannot be used (untrusted, not JSON, a bad field)."""


def journal_path(run_dir: str | os.PathLike[str], router: str, obj: str) -> Path:
    """Where router ``router`` journals the bindings of object ``obj``'s parts."""
    return Path(run_dir) / f"{router}.nested-{fields.name(obj, 'object')}.journal"


def spec_path(run_dir: str | os.PathLike[str], router: str, obj: str) -> Path:
    """Where router ``router`` keeps the description of object ``obj``'s nested home."""
    return Path(run_dir) / f"{router}.nested-{fields.name(obj, 'object')}.json"


@dataclass(frozen=True)
class NestedSpec:
    """A nested home agent's description: whose it is and the parts it decides for."""

    #: The VM that runs the object here (the nested home goes when it is removed).
    vm: str
    #: The object's name and home address (UDP 434 and the tunnel's outer source).
    object: str
    home_address: str
    #: Part name -> its address, NAI and Mobile-Home credential.
    parts: dict[str, HomeObject]

    @classmethod
    def of(cls, vm: str, primary: ObjectConfig, parts: dict[str, ObjectConfig]) -> "NestedSpec":
        return cls(vm, primary.name, primary.home_address,
                   {name: HomeObject(c.home_address, c.nai, c.mobile_home)
                    for name, c in parts.items()})

    def to_json(self) -> dict[str, Any]:
        return {"version": VERSION, "vm": self.vm, "object": self.object,
                "home_address": self.home_address,
                "parts": {name: {"home_address": o.home_address, "nai": o.nai,
                                 "mobile_home": o.mobile_home.to_json()}
                          for name, o in self.parts.items()}}

    @classmethod
    def from_json(cls, doc: Any) -> "NestedSpec":
        """The description in ``doc``, every field checked (:class:`NestedSpecError`)."""
        try:
            doc = fields.mapping(doc, "nested")
            fields.integer(doc.get("version"), "version", VERSION, VERSION)
            parts_doc = fields.mapping(doc.get("parts"), "parts", MAX_PARTS)
            parts = {}
            for name, part in parts_doc.items():
                name = fields.name(name, "parts")
                part = fields.mapping(part, f"parts.{name}")
                mh = fields.mapping(part.get("mobile_home"), f"parts.{name}.mobile_home")
                key = mh.get("key")
                if not isinstance(key, str) or not 32 <= len(key) <= 128:
                    raise fields.FieldError(f"parts.{name}.mobile_home.key: 16 to 64 bytes "
                                            "in hex")
                parts[name] = HomeObject(
                    fields.address(part.get("home_address"), f"parts.{name}.home_address"),
                    fields.nai(part.get("nai"), f"parts.{name}.nai"),
                    Credential(fields.integer(mh.get("spi"), f"parts.{name}.mobile_home.spi",
                                              256, 0xFFFFFFFF), bytes.fromhex(key)))
            return cls(fields.name(doc.get("vm"), "vm"), fields.name(doc.get("object"), "object"),
                       fields.address(doc.get("home_address"), "home_address"), parts)
        except (fields.FieldError, ValueError) as exc:
            raise NestedSpecError(f"nested home description: {exc}") from None


def save_spec(run_dir: str | os.PathLike[str], router: str, spec: NestedSpec) -> Path:
    """Write ``spec`` durably (0600, atomic, fsynced with its directory); :class:`RunDirError`
    when the run directory refuses it."""
    path = spec_path(run_dir, router, spec.object)
    write_private(path, json.dumps(spec.to_json(), sort_keys=True), sync=True)
    try:
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise RunDirError(path.parent, exc) from None
    return path


def read_spec(path: Path) -> NestedSpec:
    """The description at ``path`` if it is trusted and whole (:class:`NestedSpecError`)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise NestedSpecError(f"cannot read {path}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise NestedSpecError(f"{path} is not a regular file of uid {os.geteuid()} "
                                  f"readable by it alone (mode {st.st_mode & 0o7777:o}, "
                                  f"uid {st.st_uid})")
        data = f.read(MAX_SPEC_BYTES + 1)
    if len(data) > MAX_SPEC_BYTES:
        raise NestedSpecError(f"{path} is larger than {MAX_SPEC_BYTES} bytes")
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise NestedSpecError(f"{path}: not JSON: {exc}") from None
    spec = NestedSpec.from_json(doc)
    if path.name != spec_path(path.parent, _router_of(path.name), spec.object).name:
        raise NestedSpecError(f"{path} describes the nested home of {spec.object!r}")
    return spec


def _router_of(filename: str) -> str:
    return filename.split(".nested-", 1)[0]


def load_specs(run_dir: str | os.PathLike[str], router: str) -> list[NestedSpec]:
    """The nested homes router ``router`` kept when its agent stopped or died, by object
    name; unusable descriptions are logged and left in place."""
    out = []
    for path in sorted(Path(run_dir).glob(f"{router}.nested-*.json")):
        if _router_of(path.name) != router:
            continue  # another router whose name starts like this one's
        try:
            out.append(read_spec(path))
        except NestedSpecError as exc:
            log.error("nested home not restored: %s", exc)
    return out


def discard(run_dir: str | os.PathLike[str], router: str, obj: str) -> None:
    """Remove object ``obj``'s nested home files (its object stopped or left: nothing of it is
    to come back). A failure is logged: a stale journal only restores bindings that expire."""
    for path in (journal_path(run_dir, router, obj), spec_path(run_dir, router, obj)):
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            log.error("cannot remove %s: %s", path, exc.strerror or exc)
