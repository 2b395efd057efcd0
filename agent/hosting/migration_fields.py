"""Field checks for MIGRATE and STATE_TRANSFER bodies (issue 12), kept apart from the
migration role so the rule for each field is in one place and unit-testable.

:func:`check_migrate` and :func:`check_state_transfer` raise
:class:`agent.core.fields.FieldError` for the first field that fails, before the target
starts, stops or restores anything: the action (start, commit, cancel), the move's epoch
and deadline (agent.hosting.handover), the object's name, NAI, home agent and home address (on
the home agent's network, none of this router's), its code entry, resources, the VM
description's name and objects, and the flags; a pre-copy commit's final state (a merge
patch with the digest of what it gives, or the whole checkpoint) and a start's
``precopy`` (its state a pre-copy: a warm start of a directly placed object only). The VM description itself is checked in full
again by the VM manager (:meth:`agent.vm.manager.VmManager.provision`) before any fetch.
"""

from __future__ import annotations

import re
from typing import Any, Iterable

from agent.core import fields
from agent.hosting.handover import MAX_DEADLINE, MIN_DEADLINE

ACTIONS = ("start", "commit", "cancel")
#: A directly placed object's sandbox: CPUs, MiB, processes (the manifest's bounds).
MAX_CPU = 1024.0
#: A checkpoint's SHA-256, hex (agent.hosting.merge_patch.digest).
DIGEST_RE = re.compile(r"[0-9a-f]{64}")
#: Members of a checkpoint (and of a merge patch of one) at its top level.
MAX_CHECKPOINT_MEMBERS = 64


def check_migrate(body: Any, own: Iterable[str] = ()) -> dict[str, Any]:
    """A MIGRATE body, every field the target uses checked; ``own``: this router's
    addresses (an object's home address is never one of them). Returns the body."""
    body = dict(fields.mapping(body, "MIGRATE", max_items=16))
    action = fields.one_of(body.get("action"), "MIGRATE.action", ACTIONS)
    if action in ("commit", "cancel"):
        fields.name(body.get("name"), "MIGRATE.name")
        if action == "commit" or body.get("epoch") is not None:  # a cancel may name none
            fields.token(body.get("epoch"), "MIGRATE.epoch")
        if action == "commit":
            check_final_state(body)
        return body
    fields.token(body.get("epoch"), "MIGRATE.epoch")
    if body.get("deadline") is not None:
        fields.number(body["deadline"], "MIGRATE.deadline", ge=MIN_DEADLINE, le=MAX_DEADLINE)
    config = fields.object_config(body.get("config"), "MIGRATE.config", own=own)
    warm = fields.flag(body.get("warm", False), "MIGRATE.warm")
    if fields.flag(body.get("commit", False), "MIGRATE.commit") and (warm or body.get("state") is None):
        raise fields.FieldError("MIGRATE.commit", True, "needs the state and no warm start")
    if fields.flag(body.get("precopy", False), "MIGRATE.precopy"):
        if not warm or body.get("vm") or body.get("commit"):
            raise fields.FieldError("MIGRATE.precopy", True, "needs a warm start of a directly "
                                    "placed object, without commit")
        fields.mapping(body.get("state"), "MIGRATE.state", max_items=MAX_CHECKPOINT_MEMBERS)
    vm = body.get("vm")
    if vm:
        vm = fields.mapping(vm, "MIGRATE.vm", max_items=32)
        fields.name(vm.get("vm"), "MIGRATE.vm.vm")
        objects = fields.names(vm.get("objects"), "MIGRATE.vm.objects", max_items=1)
        mobile = fields.mapping(vm.get("mobile"), "MIGRATE.vm.mobile", max_items=1)
        if len(objects) != 1 or list(mobile) != objects:
            raise fields.FieldError("MIGRATE.vm", sorted(mobile),
                                    "must run exactly the one mobile object it moves")
        moved = fields.object_config(mobile[objects[0]], "MIGRATE.vm.mobile", own=own)
        if moved.name != config.name or moved.home_address != config.home_address:
            raise fields.FieldError("MIGRATE.vm.mobile", moved.name,
                                    "is not the object the MIGRATE moves")
    else:
        fields.spec(body.get("spec"), "MIGRATE.spec")
        resources = body.get("resources")
        if resources is not None:
            check_resources(resources, "MIGRATE.resources")
    return body


def check_resources(doc: Any, field: str) -> dict[str, Any]:
    """A directly placed object's sandbox resources: ``cpu`` (0, 1024], ``memory_mb``
    [1, 1 MiB], ``pids`` [1, 65536], nothing else."""
    doc = dict(fields.mapping(doc, field, max_items=3))
    unknown = set(doc) - {"cpu", "memory_mb", "pids"}
    if unknown:
        raise fields.FieldError(field, sorted(unknown), "are unknown fields")
    if "cpu" in doc:
        fields.number(doc["cpu"], f"{field}.cpu", gt=0, le=MAX_CPU)
    if "memory_mb" in doc:
        fields.integer(doc["memory_mb"], f"{field}.memory_mb", 1, 1 << 20)
    if "pids" in doc:
        fields.integer(doc["pids"], f"{field}.pids", 1, 1 << 16)
    return doc


def check_final_state(body: dict[str, Any]) -> None:
    """A pre-copy commit's final state, in ``state`` (sealed like every checkpoint): the
    whole checkpoint (a JSON object), or with ``delta: true`` ``{"patch", "digest"}``: a
    merge patch against the pre-copied checkpoint and the SHA-256 (hex) of the checkpoint it
    gives, which the target checks before it restores anything. Neither: a stop-copy
    commit (its state came before)."""
    delta = fields.flag(body.get("delta", False), "MIGRATE.delta")
    state = body.get("state")
    if state is None:
        if delta:
            raise fields.FieldError("MIGRATE.state", None, "is missing (the delta)")
        return
    if not delta:
        fields.mapping(state, "MIGRATE.state", max_items=MAX_CHECKPOINT_MEMBERS)
        return
    state = fields.mapping(state, "MIGRATE.state", max_items=2)
    if set(state) != {"patch", "digest"}:
        raise fields.FieldError("MIGRATE.state", sorted(state), "must be a patch and its digest")
    fields.mapping(state["patch"], "MIGRATE.state.patch", max_items=MAX_CHECKPOINT_MEMBERS)
    digest = state["digest"]
    if not isinstance(digest, str) or not DIGEST_RE.fullmatch(digest):
        raise fields.FieldError("MIGRATE.state.digest", digest, "is not a SHA-256 in hex")


def check_state_transfer(body: Any) -> dict[str, Any]:
    """A STATE_TRANSFER body: the object's name, the move's epoch and a state (the object's
    own checkpoint, which only it interprets)."""
    body = dict(fields.mapping(body, "STATE_TRANSFER", max_items=6))
    fields.name(body.get("name"), "STATE_TRANSFER.name")
    fields.token(body.get("epoch"), "STATE_TRANSFER.epoch")
    if "state" not in body:
        raise fields.FieldError("STATE_TRANSFER.state", None, "is missing")
    return body
