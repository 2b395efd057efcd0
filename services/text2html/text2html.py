"""Text to HTML: the first step of the patent's text -> HTML -> RTF path.

``{"text": str, "title"?: str}`` -> ``{"html": str}``, a complete HTML5 document (UTF-8
``<meta charset>``, ``<title>``, the title again as ``<h1>``). Paragraphs are separated by
blank lines; the line breaks inside a paragraph become ``<br>``. Every piece of text is
escaped with :func:`html.escape`; control characters other than tab and newline, and the
non-characters U+FFFE/U+FFFF, are dropped (HTML does not allow them). Stateless but for the number of documents converted, which
travels with the object when it migrates.
"""

from __future__ import annotations

import html
import re

from agent.sdk import JSON, MobileObject, RequestError

MAX_INPUT_BYTES = 1 << 20  # 1 MiB of UTF-8, text and title together
DEFAULT_TITLE = "Untitled"

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\ufffe\uffff]")  # not allowed in HTML or XML
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


class TextToHtml(MobileObject):
    """Converts plain text into an HTML5 document."""

    def __init__(self) -> None:
        self.converted = 0

    def handle(self, request: dict[str, JSON]) -> dict[str, JSON]:
        if not isinstance(request, dict):
            raise RequestError("the request must be a JSON object")
        text = _text_field(request, "text", required=True)
        title = _text_field(request, "title", required=False)
        _check_size(text, title)
        result = {"html": to_html(text, clean_title(title))}
        self.converted += 1
        return result

    def get_state(self) -> JSON:
        return {"converted": self.converted}

    def set_state(self, state: JSON) -> None:
        self.converted = int((state or {}).get("converted", 0))


def to_html(text: str, title: str = "") -> str:
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        "<html>",
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title or DEFAULT_TITLE)}</title>",
        "</head>",
        "<body>",
    ]
    if title:
        parts.append(f"<h1>{esc(title)}</h1>")
    for lines in paragraphs(text):
        parts.append("<p>" + "<br>\n".join(esc(line) for line in lines) + "</p>")
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts)
