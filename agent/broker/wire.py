"""Field checks for what arrives from the wire: every ``from_dict`` of the broker uses these.

A message from a corresponding object is untrusted input, so each field is checked for type
and range before an object is built (``True`` is not a number, ``NaN`` and infinities are
not durations); any failure is :class:`~agent.broker.errors.BadRequest`.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping

from agent.broker.errors import BadRequest
from agent.core import fields
from agent.core.fields import FieldError

#: Service, instance, object, format and holder names: printable, no spaces, bounded.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@/+-]{0,127}$")
MAX_STR = 4096
_MISSING: Any = object()


def as_mapping(doc: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(doc, Mapping):
        raise BadRequest(f"{what} must be a JSON object, not {type(doc).__name__}")
    return doc


def only_keys(doc: Mapping[str, Any], allowed: set[str], what: str) -> None:
    unknown = set(doc) - allowed
    if unknown:
        raise BadRequest(f"{what}: unknown fields {sorted(map(str, unknown))}")


def _get(doc: Mapping[str, Any], key: str, default: Any, what: str) -> Any:
    if key in doc:
        return doc[key]
    if default is _MISSING:
        raise BadRequest(f"{what}: missing field {key!r}")
    return default


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_number(value: Any, what: str, *, gt: float | None = None, ge: float | None = None,
                 le: float | None = None) -> float:
    """``value`` as a float, or BadRequest if it is not a finite number in range."""
    if not is_number(value):
        raise BadRequest(f"{what} {value!r} must be a finite number")
    if gt is not None and not value > gt:
        raise BadRequest(f"{what} {value!r} must be > {gt}")
    if ge is not None and not value >= ge:
        raise BadRequest(f"{what} {value!r} must be >= {ge}")
    if le is not None and not value <= le:
        raise BadRequest(f"{what} {value!r} must be <= {le}")
    return float(value)


def number(doc: Mapping[str, Any], key: str, what: str, *, default: Any = _MISSING,
           gt: float | None = None, ge: float | None = None, le: float | None = None) -> Any:
    value = _get(doc, key, default, what)
    if value is default and default is not _MISSING:
        return value
    return check_number(value, f"{what}.{key}", gt=gt, ge=ge, le=le)


def integer(doc: Mapping[str, Any], key: str, what: str, *, lo: int, hi: int,
            default: Any = _MISSING) -> int:
    value = _get(doc, key, default, what)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise BadRequest(f"{what}.{key} {value!r} must be an integer in [{lo}, {hi}]")
    return value


def check_name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise BadRequest(f"{what} {value!r} is not a valid name (must match {NAME_RE.pattern})")
    return value


def name(doc: Mapping[str, Any], key: str, what: str, *, default: Any = _MISSING) -> Any:
    value = _get(doc, key, default, what)
    if value is default and default is not _MISSING:
        return value
    return check_name(value, f"{what}.{key}")


def text(doc: Mapping[str, Any], key: str, what: str, *, default: Any = _MISSING,
         max_len: int = MAX_STR) -> str:
    value = _get(doc, key, default, what)
    if not isinstance(value, str) or len(value) > max_len:
        raise BadRequest(f"{what}.{key} must be a string of at most {max_len} characters")
    return value


def names(doc: Mapping[str, Any], key: str, what: str, *, max_items: int = 64,
          default: Any = _MISSING) -> tuple[str, ...]:
    value = _get(doc, key, default, what)
    if not isinstance(value, (list, tuple)) or len(value) > max_items:
        raise BadRequest(f"{what}.{key} must be a list of at most {max_items} names")
    return tuple(check_name(v, f"{what}.{key}[]") for v in value)


def field(check: Any, *args: Any, **kw: Any) -> Any:
    """Run one of :mod:`agent.core.fields`' checks; its refusal as :class:`BadRequest`, so a
    corresponding object or router gets the broker's ``bad_request`` reason."""
    try:
        return check(*args, **kw)
    except FieldError as exc:
        raise BadRequest(str(exc)) from None


def address(doc: Mapping[str, Any], key: str, what: str, *, default: Any = _MISSING,
            within: Any = None) -> Any:
    """A unicast IPv4 address (:func:`agent.core.fields.address`); ``default`` when absent
    (or equal to it)."""
    value = _get(doc, key, default, what)
    if default is not _MISSING and value == default:
        return value
    return field(fields.address, value, f"{what}.{key}", within=within)
