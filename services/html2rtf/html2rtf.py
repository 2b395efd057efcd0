"""HTML to RTF: the second step of the patent's text -> HTML -> RTF path.

``{"html": str}`` -> ``{"rtf": str}``, an RTF 1.x document (``{\\rtf1\\ansi`` with a font
table) written by the :mod:`rtf` module next to this one. The HTML is read with the
standard library's :class:`html.parser.HTMLParser` (entities decoded): ``<h1>``-``<h6>``
become bold, larger headings; ``<p>``, ``<div>``, ``<li>`` (with a bullet) and the other
block elements become paragraphs; ``<b>``/``<strong>`` bold, ``<i>``/``<em>`` italic,
``<br>`` a line break. Whitespace collapses as a browser would (kept inside ``<pre>``); the
contents of ``<head>``, ``<script>``, ``<style>`` and the like are left out. Stateless but
for the number of documents converted, which travels with the object when it migrates.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

import rtf
from agent.sdk import JSON, MobileObject, RequestError

MAX_INPUT_BYTES = 1 << 20  # 1 MiB of UTF-8

HEADINGS = {f"h{n}": n for n in range(1, 7)}
BLOCKS = {
    "address", "article", "aside", "blockquote", "body", "caption", "dd", "div", "dl", "dt",
    "fieldset", "figcaption", "figure", "footer", "form", "header", "hr", "html", "li", "main",
    "nav", "ol", "p", "pre", "section", "table", "td", "th", "tr", "ul",
}
BOLD = {"b", "strong"}
ITALIC = {"i", "em"}
HIDDEN = {"head", "script", "style", "template", "title", "noscript", "iframe", "object", "svg"}
HEAD_CONTENT = {"base", "link", "meta", "noscript", "script", "style", "template", "title"}
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param",
        "source", "track", "wbr"}

_SPACE = re.compile(r"[ \t\n\r\f]+")


class _Reader(HTMLParser):
    """Turns HTML into the blocks of :func:`rtf.render`."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.blocks: list[tuple[int, list[rtf.Run]]] = []
        self.runs: list[rtf.Run] = []
        self.level = 0  # heading level of the block being read, 0 = paragraph
        self.bold = 0
        self.italic = 0
        self.pre = 0
        self.hidden: list[str] = []  # open hidden elements (their text is skipped)
        # collapsed whitespace waiting for the next word: the (bold, italic) of the text it
        # was in, so that in "a <b>b</b> c" neither space is bold
        self.space: tuple[bool, bool] | None = None

    # --- blocks ------------------------------------------------------------------------

    def _flush(self) -> None:
        if any(text.strip() for text, _, _ in self.runs):
            self.blocks.append((self.level, self.runs))
        self.runs = []
        self.space = None

    def _add(self, text: str) -> None:
        self.runs.append((text, self.bold > 0, self.italic > 0))

    # --- parser callbacks --------------------------------------------------------------

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if self.hidden == ["head"] and tag not in HEAD_CONTENT:  # ends an unclosed <head>
            self.hidden.clear()
        if self.hidden:
            if tag in HIDDEN and tag not in VOID:
                self.hidden.append(tag)
            return
        if tag in HIDDEN:
            self.hidden.append(tag)
        elif tag in HEADINGS:
            self._flush()
            self.level = HEADINGS[tag]
        elif tag in BLOCKS:
            self._flush()
            if tag == "pre":
                self.pre += 1
            elif tag == "li":
                self._add("\u2022 ")
        elif tag == "br":
            self._add("\n")
            self.space = None
        elif tag in BOLD:
            self.bold += 1
        elif tag in ITALIC:
            self.italic += 1

    def handle_startendtag(self, tag: str, attrs: list) -> None:
        self.handle_starttag(tag, attrs)
        if tag not in VOID:
            self.handle_endtag(tag)

    def handle_endtag(self, tag: str) -> None:
        if self.hidden:
            if tag in self.hidden:  # closes it and whatever was left open inside it
                del self.hidden[len(self.hidden) - 1 - self.hidden[::-1].index(tag):]
            return
        if tag in HEADINGS:
            self._flush()
            self.level = 0
        elif tag in BLOCKS:
            self._flush()
            if tag == "pre":
                self.pre = max(0, self.pre - 1)
        elif tag == "br":  # </br> is read as <br> by browsers
            self.handle_starttag(tag, [])
        elif tag in BOLD:
            self.bold = max(0, self.bold - 1)
        elif tag in ITALIC:
            self.italic = max(0, self.italic - 1)

    def handle_data(self, data: str) -> None:
        if self.hidden or not data:
            return
        if self.pre:
            self._add(data.replace("\r\n", "\n").replace("\r", "\n"))
            return
        fmt = (self.bold > 0, self.italic > 0)
        words = _SPACE.split(data)
        text = " ".join(w for w in words if w)
        if words[0] == "" and self.space is None:
            self.space = fmt
        if not text:
            return
        after_space = not self.runs or self.runs[-1][0][-1:] in (" ", "\n", "\t")
        if self.space is not None and not after_space:
            self.runs.append((" ",) + self.space)
        self._add(text)
        self.space = fmt if words[-1] == "" else None


def html_to_blocks(source: str) -> list[tuple[int, list[rtf.Run]]]:
    reader = _Reader()
    reader.feed(source)
    reader.close()
    reader._flush()
    return reader.blocks


class HtmlToRtf(MobileObject):
    """Converts an HTML document into RTF."""

    def __init__(self) -> None:
        self.converted = 0

    def handle(self, request: dict[str, JSON]) -> dict[str, JSON]:
        if not isinstance(request, dict):
            raise RequestError("the request must be a JSON object")
        source = request.get("html")
        if not isinstance(source, str):
            raise RequestError("missing 'html' (a string)")
        try:
            size = len(source.encode("utf-8"))
        except UnicodeEncodeError:
            raise RequestError("'html' is not valid Unicode (lone surrogate)") from None
        if size > MAX_INPUT_BYTES:
            raise RequestError(f"input is {size} bytes; the limit is {MAX_INPUT_BYTES}")
        result = {"rtf": rtf.render(html_to_blocks(source))}
        self.converted += 1
        return result

    def get_state(self) -> JSON:
        return {"converted": self.converted}

    def set_state(self, state: JSON) -> None:
        self.converted = int((state or {}).get("converted", 0))
