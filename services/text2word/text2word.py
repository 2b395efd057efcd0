"""Text to WORD: the first step of the patent's text -> WORD -> RTF path.

``{"text": str, "title"?: str}`` -> ``{"docx_b64": str}``: a real Office Open XML document
built with python-docx (the title as a "Heading 1" paragraph and as the document's title
property, then one paragraph per block of text separated by blank lines, the line breaks
inside a block kept as line breaks), base64-encoded so that it fits in a JSON reply.
Paragraph splitting is the same as text2html's, so both paths carry the same text; control
characters other than tab and newline, and U+FFFE/U+FFFF, are dropped (XML does not allow
them). Stateless but for the number of documents converted, which travels with the object
when it migrates.

Mind the size: python-docx's template alone makes a ~36 KB .docx (~49 KB of base64).
"""

from __future__ import annotations

import base64
import io
import re

import docx

from agent.sdk import JSON, MobileObject, RequestError

MAX_INPUT_BYTES = 1 << 20  # 1 MiB of UTF-8, text and title together

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\ufffe\uffff]")  # not allowed in XML
_BLANK_LINE = re.compile(r"\n[ \t]*(?:\n[ \t]*)+")


def _text_field(request: dict, key: str, required: bool) -> str | None:
    if key not in request or request[key] is None:
        if required:
            raise RequestError(f"missing {key!r} (a string)")
        return None
    value = request[key]
    if not isinstance(value, str):
        raise RequestError(f"{key!r} must be a string, not {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(f"{key!r} is not valid Unicode (lone surrogate)") from None
    return value


def _check_size(*values: str | None) -> None:
    size = sum(len(v.encode("utf-8")) for v in values if v)
    if size > MAX_INPUT_BYTES:
        raise RequestError(f"input is {size} bytes; the limit is {MAX_INPUT_BYTES}")


def paragraphs(text: str) -> list[list[str]]:
    """Split ``text`` on blank lines: a list of paragraphs, each a list of lines (trailing
    whitespace and control characters removed, empty paragraphs left out)."""
    text = _CONTROL.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    out = []
    for chunk in _BLANK_LINE.split(text):
        lines = [line.rstrip() for line in chunk.split("\n")]
        while lines and not lines[0].strip():
            lines.pop(0)
        while lines and not lines[-1].strip():
            lines.pop()
        if lines:
            out.append(lines)
    return out


def clean_title(title: str | None) -> str:
    """A title on one line, without control characters; '' when there is none."""
    return " ".join(_CONTROL.sub("", title).split()) if title else ""


def to_docx(text: str, title: str = "") -> bytes:
    document = docx.Document()
    if title:
        document.core_properties.title = title
        document.add_heading(title, level=1)
    for lines in paragraphs(text):
        # python-docx turns "\n" into <w:br/> and "\t" into <w:tab/>
        document.add_paragraph().add_run("\n".join(lines))
    buf = io.BytesIO()
    document.save(buf)
    return buf.getvalue()


class TextToWord(MobileObject):
    """Converts plain text into a .docx document."""

    def __init__(self) -> None:
        self.converted = 0

    def handle(self, request: dict[str, JSON]) -> dict[str, JSON]:
        if not isinstance(request, dict):
            raise RequestError("the request must be a JSON object")
        text = _text_field(request, "text", required=True)
        title = _text_field(request, "title", required=False)
        _check_size(text, title)
        data = to_docx(text, clean_title(title))
        result = {"docx_b64": base64.b64encode(data).decode("ascii")}
        self.converted += 1
        return result

    def get_state(self) -> JSON:
        return {"converted": self.converted}

    def set_state(self, state: JSON) -> None:
        self.converted = int((state or {}).get("converted", 0))
