"""A minimal RTF 1.x writer (standard library only).

This file is shared, byte for byte, by ``services/html2rtf`` and ``services/word2rtf``: each
object directory is archived on its own, so each carries its own copy. Edit both together
(tests/unit/test_services.py checks that they are identical).

A document is a list of blocks ``(level, runs)``: ``level`` 0 is a body paragraph, 1-6 a
heading (bold, larger); ``runs`` is a list of ``(text, bold, italic)``. In run text ``"\\n"``
is a line break (``\\line``) and ``"\\t"`` a tab (``\\tab``).
"""

from __future__ import annotations

from typing import Iterable, Sequence

Run = tuple[str, bool, bool]
Block = tuple[int, Sequence[Run]]

BODY_SIZE = 24  # half-points: 12 pt
HEADING_SIZES = {1: 36, 2: 32, 3: 28, 4: 26, 5: 24, 6: 24}

HEADER = ("{\\rtf1\\ansi\\ansicpg1252\\deff0\\uc1\n"
          "{\\fonttbl{\\f0\\fswiss\\fcharset0 Arial;}}\n"
          "\\viewkind4\\f0\\fs%d\n" % BODY_SIZE)


def escape(text: str) -> str:
    """RTF text for ``text``: ``\\ { }`` escaped, line breaks and tabs as control words,
    everything outside printable ASCII as ``\\uN?`` (signed 16-bit, UTF-16 code units)."""
    out: list[str] = []
    for ch in text:
        code = ord(ch)
        if ch in "\\{}":
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\line ")
        elif ch == "\t":
            out.append("\\tab ")
        elif 32 <= code < 127:
            out.append(ch)
        elif code < 32 or code == 127:
            continue  # other control characters have no RTF text form
        elif code > 0xFFFF:
            code -= 0x10000
            for unit in (0xD800 + (code >> 10), 0xDC00 + (code & 0x3FF)):
                out.append("\\u%d?" % (unit - 0x10000))
        else:
            out.append("\\u%d?" % (code if code < 0x8000 else code - 0x10000))
    return "".join(out)


def merge_runs(runs: Iterable[Run]) -> list[Run]:
    """Drop empty runs and join neighbours with the same formatting."""
    merged: list[Run] = []
    for text, bold, italic in runs:
        if not text:
            continue
        if merged and merged[-1][1:] == (bool(bold), bool(italic)):
            merged[-1] = (merged[-1][0] + text, merged[-1][1], merged[-1][2])
        else:
            merged.append((text, bool(bold), bool(italic)))
    return merged


def render(blocks: Iterable[Block]) -> str:
    """The RTF document for ``blocks``; blocks without text are left out."""
    parts = [HEADER]
    for level, runs in blocks:
        runs = merge_runs(runs)
        if not runs:
            continue
        if level:
            size = HEADING_SIZES.get(level, BODY_SIZE)
            parts.append("{\\pard\\keepn\\sb240\\sa120\\b\\fs%d " % size)
        else:
            parts.append("{\\pard\\sa120\\fs%d " % BODY_SIZE)
        for text, bold, italic in runs:
            fmt = ("\\b" if bold and not level else "") + ("\\i" if italic else "")
            if fmt:
                parts.append("{%s %s}" % (fmt, escape(text)))
            else:
                parts.append(escape(text))
        parts.append("\\par}\n")
    parts.append("}\n")
    return "".join(parts)
