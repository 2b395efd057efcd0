"""JSON merge patches (RFC 7386) of checkpoints, and a digest that says two are the same.

A pre-copy move (:mod:`agent.hosting.migration`) sends the object's checkpoint while it still
serves, and at the switch only what changed since: :func:`diff` of the final checkpoint
against the pre-copied one. RFC 7386 cannot say "set this member to null" (null deletes), so
:func:`diff` checks its own patch and returns None when applying it would not give exactly
the final checkpoint; the caller then sends the whole checkpoint. The target applies the
patch (:func:`apply`) and compares :func:`digest` of the result with the source's digest of
the final checkpoint: a patch applied to another base than the source's is refused, never
served.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

#: Nesting a patch may have (a checkpoint is JSON the object made: this bounds recursion).
MAX_DEPTH = 64


class PatchError(ValueError):
    """A patch that cannot be applied (too deep)."""


def canonical(doc: Any) -> bytes:
    """One encoding per JSON value (sorted keys, no spaces, strict): what :func:`digest` hashes."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def digest(doc: Any) -> str:
    """SHA-256 of the canonical encoding, hex."""
    return hashlib.sha256(canonical(doc)).hexdigest()


def _diff(base: Any, final: Any) -> Any:
    if not isinstance(base, dict) or not isinstance(final, dict):
        return final
    patch: dict[str, Any] = {}
    for key in base:
        if key not in final:
            patch[key] = None
    for key, value in final.items():
        if key not in base:
            patch[key] = value
        elif base[key] != value or type(base[key]) is not type(value):
            patch[key] = _diff(base[key], value)
    return patch


def diff(base: dict[str, Any], final: dict[str, Any]) -> dict[str, Any] | None:
    """The merge patch that turns ``base`` into ``final``, or None when RFC 7386 cannot say it
    (a member set to null, a changed object value with nulls inside): send ``final`` whole."""
    patch = _diff(base, final)
    if not isinstance(patch, dict):
        return None
    try:
        if canonical(apply(base, patch)) != canonical(final):
            return None
    except (PatchError, TypeError, ValueError, RecursionError):
        return None
    return patch


def apply(base: Any, patch: Any, depth: int = 0) -> Any:
    """RFC 7386 MergePatch(base, patch); neither argument is changed."""
    if depth > MAX_DEPTH:
        raise PatchError(f"merge patch nested deeper than {MAX_DEPTH}")
    if not isinstance(patch, dict):
        return patch
    out = dict(base) if isinstance(base, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = apply(out.get(key), value, depth + 1)
    return out
