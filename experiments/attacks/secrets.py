"""Every key of a run, and a search of its captures for them (issue 12 item 1).

A key may cross the wire as raw bytes, as hex (how configurations and ObjectConfig.to_json
write it) or as base64 (how authenticators are written), so each is searched in all three.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any, Iterator

__all__ = ["run_keys", "forms", "find_keys", "scan_captures"]

_HEX = re.compile(r"^[0-9a-fA-F]{32,}$")
#: JSON fields that hold a key (Credential.to_json's "key", the router key, the COs' keys).
KEY_FIELDS = ("key", "router_key")


def _walk(doc: Any, path: str) -> Iterator[tuple[str, str]]:
    if isinstance(doc, dict):
        for k, v in doc.items():
            where = f"{path}.{k}"
            if k in KEY_FIELDS and isinstance(v, str) and _HEX.match(v):
                yield where, v
            else:
                yield from _walk(v, where)
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _walk(v, f"{path}[{i}]")


def run_keys(run_dir: Path) -> dict[str, bytes]:
    """Every key of the run (name -> raw bytes): the objects' Mobile-Home and Mobile-Foreign
    keys, the FOAs' Foreign-Home keys, the router key (agent configurations) and the
    corresponding objects' broker keys (``co_keys.json``)."""
    keys: dict[str, bytes] = {}
    for path in sorted(run_dir.glob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if path.name == "co_keys.json" and isinstance(doc, dict):
            for host, value in doc.items():
                if isinstance(value, str) and _HEX.match(value):
                    keys[f"co_keys.{host}"] = bytes.fromhex(value)
            continue
        for where, value in _walk(doc, path.stem):
            raw = bytes.fromhex(value)
            if raw not in keys.values():
                keys[where] = raw
    return keys


def forms(key: bytes) -> list[bytes]:
    """The ways ``key`` could appear in a packet: raw, hex (both cases), base64."""
    return [key, key.hex().encode(), key.hex().upper().encode(), base64.b64encode(key),
            base64.urlsafe_b64encode(key).rstrip(b"=")]


def find_keys(data: bytes, keys: dict[str, bytes]) -> list[str]:
    """The names of the keys found in ``data`` in any of their :func:`forms`."""
    return [name for name, key in keys.items() if any(f in data for f in forms(key))]


def scan_captures(capture_dir: Path, keys: dict[str, bytes]) -> dict[str, list[str]]:
    """pcap name -> the keys it carries (only pcaps that carry one); a pcap's bytes are
    searched whole, so a key split across two TCP segments is missed only if split."""
    found: dict[str, list[str]] = {}
    for pcap in sorted(capture_dir.glob("*.pcap")):
        hits = find_keys(pcap.read_bytes(), keys)
        if hits:
            found[pcap.name] = hits
    return found
