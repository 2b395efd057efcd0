"""WORD to RTF: the second step of the patent's text -> WORD -> RTF path.

``{"docx_b64": str}`` -> ``{"rtf": str}``. The base64 .docx is opened with python-docx and
written as RTF 1.x by the :mod:`rtf` module next to this one (the same writer as html2rtf):
"Heading N" / "Title" paragraphs become bold, larger headings, the others paragraphs with
their bold and italic runs (hyperlink text included), line breaks and tabs kept; the
paragraphs of tables follow in document order. Refused with a RequestError: a missing or
invalid base64 string, more than 1 MiB of .docx, anything that is not a .docx, or a zip
that would unpack to more than 16 MiB (4 MiB outside word/media/, which is about 1 MiB of
ordinary text). Stateless but for the number of documents converted, which travels with the
object when it migrates.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import zipfile

import docx
from docx.enum.style import WD_STYLE_TYPE
from docx.table import Table
from docx.text.paragraph import Paragraph

import rtf
from agent.sdk import JSON, MobileObject, RequestError

MAX_INPUT_BYTES = 1 << 20  # 1 MiB of .docx
# Zip-bomb guards. Everything but word/media/ may be XML that lxml parses, at ~30 bytes of
# memory per byte for dense markup: 4 MiB of it stays within the object's 192 MiB.
MAX_UNPACKED_BYTES = 16 << 20  # all members
MAX_XML_BYTES = 4 << 20  # all members outside word/media/
MAX_MEMBERS = 2000

_HEADING = re.compile(r"^Heading ([1-9])$")


def decode_docx(value: JSON) -> bytes:
    """The .docx bytes of a request's ``docx_b64``, or a RequestError."""
    if not isinstance(value, str):
        raise RequestError("missing 'docx_b64' (a base64 string)")
    if len(value) > MAX_INPUT_BYTES * 3 // 2:  # before decoding (base64: 4/3, + line breaks)
        raise RequestError(f"input is larger than {MAX_INPUT_BYTES} bytes")
    try:
        data = base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        raise RequestError("'docx_b64' is not valid base64") from None
    if len(data) > MAX_INPUT_BYTES:
        raise RequestError(f"input is {len(data)} bytes; the limit is {MAX_INPUT_BYTES}")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError):
        raise RequestError("not a .docx (not a zip archive)") from None
    xml = sum(m.file_size for m in members if not m.filename.startswith("word/media/"))
    if len(members) > MAX_MEMBERS or sum(m.file_size for m in members) > MAX_UNPACKED_BYTES \
            or xml > MAX_XML_BYTES:
        raise RequestError("the .docx unpacks to too much")
    return data


class _Reader:
    """Reads paragraphs, looking each style up once (python-docx scans the whole style list
    on every ``.style``, which made a 1 MiB document take seconds)."""

    def __init__(self, document) -> None:
        self.part = document.part
        self.levels: dict[str | None, int] = {}
        self.char_flags: dict[str | None, tuple[bool, bool]] = {}

    def level(self, paragraph: Paragraph) -> int:
        style_id = paragraph._p.style
        if style_id not in self.levels:
            try:
                style = self.part.get_style(style_id, WD_STYLE_TYPE.PARAGRAPH)
                name = style.name or ""
            except (KeyError, ValueError, AttributeError):
                name = ""
            match = _HEADING.match(name)
            self.levels[style_id] = 1 if name == "Title" else \
                min(int(match.group(1)), 6) if match else 0
        return self.levels[style_id]

    def _style_flags(self, style_id: str | None) -> tuple[bool, bool]:
        if style_id not in self.char_flags:  # a character style such as "Strong"
            try:
                font = self.part.get_style(style_id, WD_STYLE_TYPE.CHARACTER).font
                flags = (font.bold is True, font.italic is True)
            except (KeyError, ValueError, AttributeError):
                flags = (False, False)
            self.char_flags[style_id] = flags
        return self.char_flags[style_id]

    def runs(self, paragraph: Paragraph) -> list[rtf.Run]:
        runs: list[rtf.Run] = []
        for item in paragraph.iter_inner_content():
            for run in getattr(item, "runs", None) or [item]:  # a hyperlink holds runs
                bold, italic = run.bold, run.italic
                if bold is None or italic is None:
                    style_bold, style_italic = self._style_flags(run._r.style)
                    bold = style_bold if bold is None else bold
                    italic = style_italic if italic is None else italic
                runs.append((run.text, bold is True, italic is True))
        return runs


def _paragraphs(container) -> list[Paragraph]:
    out: list[Paragraph] = []
    for item in container.iter_inner_content():
        if isinstance(item, Table):
            seen = set()
            for row in item.rows:
                for cell in row.cells:
                    if id(cell._tc) in seen:  # a merged cell repeats
                        continue
                    seen.add(id(cell._tc))
                    out.extend(_paragraphs(cell))
        else:
            out.append(item)
    return out


def docx_to_blocks(data: bytes) -> list[tuple[int, list[rtf.Run]]]:
    try:
        document = docx.Document(io.BytesIO(data))
        reader = _Reader(document)
        return [(reader.level(p), reader.runs(p)) for p in _paragraphs(document)]
    except RequestError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever python-docx/lxml refuse is bad input
        raise RequestError(f"not a .docx: {exc}") from None


class WordToRtf(MobileObject):
    """Converts a base64 .docx document into RTF."""

    def __init__(self) -> None:
        self.converted = 0

    def handle(self, request: dict[str, JSON]) -> dict[str, JSON]:
        if not isinstance(request, dict):
            raise RequestError("the request must be a JSON object")
        data = decode_docx(request.get("docx_b64"))
        result = {"rtf": rtf.render(docx_to_blocks(data))}
        self.converted += 1
        return result

    def get_state(self) -> JSON:
        return {"converted": self.converted}

    def set_state(self, state: JSON) -> None:
        self.converted = int((state or {}).get("converted", 0))
