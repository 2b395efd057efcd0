"""The example services of services/ (no root, no network): the patent's two paths from text to
RTF, text -> HTML -> RTF and text -> WORD -> RTF, their refusals and state, and that each
service directory packages, verifies and installs as a signed MOAT service."""

from __future__ import annotations

import ast
import base64
import importlib
import io
import json
import sys
import zipfile
from html.parser import HTMLParser
from pathlib import Path
from types import ModuleType

import pytest

docx = pytest.importorskip("docx", reason="python-docx is needed by text2word/word2rtf")
striprtf = pytest.importorskip("striprtf.striprtf", reason="pip install striprtf (test extra)")

from agent.vm.repository import (  # noqa: E402
    install_service,
    package_service,
    verify_service,
)
from agent.vm.signing import generate_keypair  # noqa: E402
from agent.sdk import MobileObject, RequestError  # noqa: E402

SERVICES = Path(__file__).resolve().parents[2] / "services"
NAMES = {"text2html": "TextToHtml", "text2word": "TextToWord", "html2rtf": "HtmlToRtf",
         "word2rtf": "WordToRtf"}
MiB = 1 << 20

TITLE = "Report {draft} é"
SAMPLE = (
    "Café crème {braces} and C:\\path\\to\\file\n"
    "漢字 on the second line & <b>not a tag</b>\n"
    "\n"
    "   \n"
    "Second paragraph: \\rtf1 {\\b x} \"quoted\" 'single' 😀 end.\n"
)
# What a reader sees: the title, then each paragraph, its inner line break kept.
EXPECTED_LINES = [
    TITLE,
    "Café crème {braces} and C:\\path\\to\\file",
    "漢字 on the second line & <b>not a tag</b>",
    "Second paragraph: \\rtf1 {\\b x} \"quoted\" 'single' 😀 end.",
]
EXPECTED_PARAGRAPHS = [EXPECTED_LINES[1] + "\n" + EXPECTED_LINES[2], EXPECTED_LINES[3]]


# --- helpers ------------------------------------------------------------------------------


def load_module(directory: Path, module: str) -> ModuleType:
    """Import ``module`` from an object directory the way the runner would (the directory on
    sys.path), without leaving it there; ``rtf`` is re-imported for each directory."""
    for name in (module, "rtf"):
        sys.modules.pop(name, None)
    sys.path.insert(0, str(directory))
    try:
        return importlib.import_module(module)
    finally:
        sys.path.remove(str(directory))
        sys.modules.pop("rtf", None)
        sys.modules.pop(module, None)


def new(name: str, directory: Path | None = None) -> MobileObject:
    module = load_module(directory or SERVICES / name, name)
    obj = getattr(module, NAMES[name])()
    assert isinstance(obj, MobileObject)
    return obj


def rtf_text(rtf: str) -> str:
    """striprtf's plain text, with the UTF-16 surrogate pairs it returns joined again."""
    text = striprtf.rtf_to_text(rtf)
    return text.encode("utf-16", "surrogatepass").decode("utf-16")


def assert_valid_rtf(rtf: str) -> None:
    assert rtf.startswith("{\\rtf1\\ansi"), rtf[:40]
    assert "{\\fonttbl{\\f0" in rtf
    assert all(ord(c) < 128 for c in rtf), "RTF must be 7-bit: non-ASCII goes as \\uN?"
    depth, i, closed_at = 0, 0, None
    while i < len(rtf):
        c = rtf[i]
        if c == "\\":
            i += 2  # \{ \} \\ are text; any other control word starts with its 2nd char
            continue
        if c == "{":
            assert closed_at is None, "text after the document group"
            depth += 1
        elif c == "}":
            depth -= 1
            assert depth >= 0, f"unbalanced '}}' at {i}"
            if depth == 0:
                closed_at = i
        i += 1
    assert depth == 0, "unclosed group"
    assert rtf[closed_at + 1:].strip() == ""


class StrictHTML(HTMLParser):
    """html.parser that records what a lenient parser forgives: a missing doctype, end tags
    that do not match, elements left open; and the text of each element."""

    VOID = {"br", "meta", "link", "img", "hr", "input"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.errors: list[str] = []
        self.doctype = None
        self.stack: list[str] = []
        self.seen: list[tuple[str, dict]] = []
        self.text: dict[str, list[str]] = {}
        self.current: list[str] | None = None

    def handle_decl(self, decl: str) -> None:
        self.doctype = decl

    def handle_starttag(self, tag, attrs):
        self.seen.append((tag, dict(attrs)))
        if tag == "br":
            if self.current is not None:
                self.current.append("\n")
            return
        if tag in self.VOID:
            return
        self.stack.append(tag)
        if tag in ("title", "h1", "p"):
            self.current = []
            self.text.setdefault(tag, []).append("")

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> does not close {self.stack[-1:]}")
            return
        self.stack.pop()
        if tag in ("title", "h1", "p") and self.current is not None:
            self.text[tag][-1] = "".join(self.current)
            self.current = None

    def handle_data(self, data):
        if self.current is not None:
            if self.current and self.current[-1] == "\n":  # the source's newline after <br>
                data = data.removeprefix("\n")
            self.current.append(data)

    def close(self):
        super().close()
        if self.stack:
            self.errors.append(f"left open: {self.stack}")


def convert_via_html(text: str, title: str | None = TITLE) -> tuple[str, str]:
    request = {"text": text} if title is None else {"text": text, "title": title}
    html = new("text2html").handle(request)["html"]
    return html, new("html2rtf").handle({"html": html})["rtf"]


def convert_via_word(text: str, title: str | None = TITLE) -> tuple[str, str]:
    request = {"text": text} if title is None else {"text": text, "title": title}
    b64 = new("text2word").handle(request)["docx_b64"]
    return b64, new("word2rtf").handle({"docx_b64": b64})["rtf"]


def docx_b64(document) -> str:
    buf = io.BytesIO()
    document.save(buf)
    return base64.b64encode(buf.getvalue()).decode()


# --- text -> HTML -------------------------------------------------------------------------


def test_text_to_html_is_a_complete_escaped_html5_document():
    html, _ = convert_via_html(SAMPLE)
    parser = StrictHTML()
    parser.feed(html)
    parser.close()
    assert parser.errors == []
    assert parser.doctype.lower() == "doctype html"
    assert [t for t, _ in parser.seen[:3]] == ["html", "head", "meta"]
    assert parser.seen[2][1] == {"charset": "utf-8"}
    assert parser.text["title"] == [TITLE]
    assert parser.text["h1"] == [TITLE]
    assert parser.text["p"] == EXPECTED_PARAGRAPHS
    # escaped: the markup in the text is text, not tags
    assert "&lt;b&gt;not a tag&lt;/b&gt;" in html and "<b>" not in html
    assert "&amp;" in html and "&quot;quoted&quot; &#x27;single&#x27;" in html
    assert "漢字" in html and "😀" in html  # UTF-8, not entities


def test_text_to_html_without_title_and_control_characters():
    html = new("text2html").handle({"text": "a\x00b\x07\r\nc\r\n\r\nd"})["html"]
    assert "<title>Untitled</title>" in html and "<h1>" not in html
    assert "<p>ab<br>\nc</p>" in html and "<p>d</p>" in html
    assert "\x00" not in html and "\x07" not in html
    empty = new("text2html").handle({"text": ""})["html"]
    assert "<p>" not in empty and empty.rstrip().endswith("</html>")


# --- text -> WORD -------------------------------------------------------------------------


def test_text_to_word_is_a_real_docx():
    b64, _ = convert_via_word(SAMPLE)
    data = base64.b64decode(b64, validate=True)
    assert zipfile.is_zipfile(io.BytesIO(data))
    document = docx.Document(io.BytesIO(data))
    paragraphs = document.paragraphs
    assert paragraphs[0].text == TITLE
    assert paragraphs[0].style.name == "Heading 1"
    assert [p.text for p in paragraphs[1:]] == EXPECTED_PARAGRAPHS
    assert document.core_properties.title == TITLE


# --- HTML -> RTF and WORD -> RTF ----------------------------------------------------------


@pytest.mark.parametrize("path", [convert_via_html, convert_via_word], ids=["html", "word"])
def test_each_path_gives_valid_rtf_with_the_original_text(path):
    _, rtf = path(SAMPLE)
    assert_valid_rtf(rtf)
    text = rtf_text(rtf)
    assert text.split("\n") == EXPECTED_LINES + [""]
    for word in SAMPLE.split():
        assert word in text
    for needle in ("é", "漢字", "{braces}", "C:\\path\\to\\file", "{\\b x}", "😀"):
        assert needle in text
    # non-ASCII as signed 16-bit \uN? (漢 = 28450, 😀 = the pair D83D DE00)
    assert "\\u233?" in rtf and "\\u28450?\\u23383?" in rtf and "\\u-10179?\\u-8704?" in rtf
    assert "\\{braces\\}" in rtf and "C:\\\\path" in rtf
    assert "\\b\\fs36 " in rtf  # the title: a bold, larger heading


def test_both_paths_give_the_same_rtf():
    _, via_html = convert_via_html(SAMPLE)
    _, via_word = convert_via_word(SAMPLE)
    assert rtf_text(via_html) == rtf_text(via_word)
    assert via_html == via_word  # same document model, same writer


def test_html_to_rtf_formatting():
    html = """<!doctype html><html><head><title>hidden title</title>
      <style>p { color: red }</style><script>var s = "{hidden}";</script></head>
      <body>
        <h2>Sub   heading</h2>
        <p>Plain <b>bold</b> and <strong>strong</strong>,
           <i>italic</i> <em>em</em> &amp; &eacute;&#x6F22;<br>next   line</p>
        <div>a <b>b<i>bi</i></b></div>
        <ul><li> one </li><li>two</li></ul>
        <pre>x  {y}
  z</pre>
        <p>unclosed <b>bold
      </body></html>"""
    rtf = new("html2rtf").handle({"html": html})["rtf"]
    assert_valid_rtf(rtf)
    assert "hidden" not in rtf and "color" not in rtf
    assert "{\\pard\\keepn\\sb240\\sa120\\b\\fs32 Sub heading\\par}" in rtf
    assert "Plain {\\b bold} and {\\b strong}, {\\i italic} {\\i em} & " in rtf
    assert "{\\b b}{\\b\\i bi}" in rtf
    text = rtf_text(rtf)
    assert text.split("\n") == [
        "Sub heading",
        "Plain bold and strong, italic em & é漢",
        "next line",
        "a bbi",
        "\u2022 one",
        "\u2022 two",
        "x  {y}",
        "  z",
        "unclosed bold",
        "",
    ]
    # a <head> left open ends where body content starts, as in a browser
    loose = new("html2rtf").handle({"html": "<head><title>t</title><p>x {y}"})["rtf"]
    assert rtf_text(loose) == "x {y}\n"


def test_word_to_rtf_reads_headings_runs_and_tables():
    document = docx.Document()
    document.add_heading("Big title", level=0)
    document.add_heading("Section", level=2)
    p = document.add_paragraph("plain ")
    p.add_run("bold").bold = True
    p.add_run(" ")
    p.add_run("italic").italic = True
    p.add_run(" tab\there ")
    p.add_run("strong", style="Strong")  # bold by its character style
    p.add_run(" not", style="Strong").bold = False  # direct formatting wins
    table = document.add_table(rows=1, cols=2)
    table.cell(0, 0).text = "cell {1}"
    table.cell(0, 1).text = "cell é"
    document.add_paragraph("")  # empty paragraphs are left out
    rtf = new("word2rtf").handle({"docx_b64": docx_b64(document)})["rtf"]
    assert_valid_rtf(rtf)
    assert "\\b\\fs36 Big title\\par}" in rtf and "\\b\\fs32 Section\\par}" in rtf
    assert "plain {\\b bold} {\\i italic} tab\\tab here {\\b strong} not\\par}" in rtf
    assert rtf_text(rtf).split("\n") == [
        "Big title", "Section", "plain bold italic tab\there strong not", "cell {1}", "cell é", ""]


def test_the_rtf_writer_is_shared_and_escapes_signed_16_bit():
    a, b = SERVICES / "html2rtf" / "rtf.py", SERVICES / "word2rtf" / "rtf.py"
    assert a.read_bytes() == b.read_bytes(), "keep the two copies of rtf.py identical"
    rtf = load_module(SERVICES / "html2rtf", "rtf")
    assert rtf.escape("\\{}") == "\\\\\\{\\}"
    assert rtf.escape("é\u7fff\u8000\ufb01") == "\\u233?\\u32767?\\u-32768?\\u-1279?"
    assert rtf.escape("a\nb\tc\x01") == "a\\line b\\tab c"
    assert rtf.escape("\U0001F600") == "\\u-10179?\\u-8704?"
    assert rtf.render([]).startswith("{\\rtf1\\ansi") and "\\par" not in rtf.render([(0, [])])


# --- refusals and state -------------------------------------------------------------------


def _zip(members: dict[str, bytes]) -> str:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return base64.b64encode(buf.getvalue()).decode()


BAD = {
    "text2html": [{}, {"text": None}, {"text": 5}, {"text": "x", "title": 3},
                  {"text": "x" * (MiB + 1)}, {"text": "x" * MiB, "title": "t"},
                  {"text": "lone \ud800 surrogate"}],
    "text2word": [{}, {"text": ["x"]}, {"text": "x", "title": {}}, {"text": "é" * (MiB // 2 + 1)},
                  {"text": "\udfff"}],
    "html2rtf": [{}, {"html": None}, {"html": 7},
                 {"html": "<p>" + "x" * MiB + "</p>"}],
    "word2rtf": [
        {},
        {"docx_b64": 12},
        {"docx_b64": "this is not base64!"},
        {"docx_b64": "QUJD="},  # bad padding
        {"docx_b64": base64.b64encode(b"plain text, not a zip").decode()},
        {"docx_b64": _zip({"hello.txt": b"not a docx"})},
        {"docx_b64": _zip({"[Content_Types].xml": b"<broken", "word/document.xml": b"<"})},
        {"docx_b64": base64.b64encode(b"PK" + bytes(MiB)).decode()},  # > 1 MiB
        {"docx_b64": _zip({"word/document.xml": bytes(4 * MiB + 1)})},  # too much XML
        {"docx_b64": _zip({"word/media/a.png": bytes(17 * MiB)})},  # too much altogether
    ],
}


@pytest.mark.parametrize("name,request_", [(n, r) for n, rs in BAD.items() for r in rs],
                         ids=[f"{n}-{i}" for n, rs in BAD.items() for i in range(len(rs))])
def test_bad_input_is_a_request_error(name, request_):
    obj = new(name)
    with pytest.raises(RequestError):
        obj.handle(request_)
    assert obj.get_state() == {"converted": 0}  # a refusal is not a conversion


def test_an_xlsx_is_not_a_docx():
    xlsx = _zip({"[Content_Types].xml": b'<?xml version="1.0"?><Types xmlns="http://schemas.'
                 b'openxmlformats.org/package/2006/content-types"/>'})
    with pytest.raises(RequestError, match="not a .docx"):
        new("word2rtf").handle({"docx_b64": xlsx})


def test_inputs_at_the_limit_are_accepted():
    assert new("text2html").handle({"text": "x" * MiB})["html"].count("x") >= MiB
    assert "\\rtf1" in new("html2rtf").handle({"html": "y" * MiB})["rtf"]
    # what text2word makes of 1 MiB of short paragraphs, word2rtf still takes
    text = ("lorem ipsum {dolor} sit amet \u00e9 " * 2 + "\n\n") * (MiB // 70)
    assert len(text.encode()) <= MiB
    _, rtf = convert_via_word(text, title=None)
    assert rtf.count("\\par}") == MiB // 70


def _request(name: str) -> dict:
    if name in ("text2html", "text2word"):
        return {"text": SAMPLE, "title": TITLE}
    if name == "html2rtf":
        return {"html": convert_via_html(SAMPLE)[0]}
    return {"docx_b64": convert_via_word(SAMPLE)[0]}


@pytest.mark.parametrize("name", NAMES)
def test_state_counts_conversions_and_survives_a_move(name):
    request = _request(name)
    first = new(name)
    assert first.get_state() == {"converted": 0}
    first.handle(request)
    first.handle(request)
    state = json.loads(json.dumps(first.get_state()))  # what migration carries
    assert state == {"converted": 2}
    second = new(name)
    second.set_state(state)
    reply = second.handle(request)
    assert json.loads(json.dumps(reply)) == reply  # replies are JSON values
    assert second.get_state() == {"converted": 3}


# --- the service directories --------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_objects_import_only_the_sdk_and_their_dependencies(name):
    allowed = set(sys.stdlib_module_names) | {"agent.sdk", "docx", "rtf"}
    directory = SERVICES / name
    for source in directory.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{source}: relative import"
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                assert module in allowed or (top in allowed and top != "agent"), \
                    f"{source.name} imports {module}"
                if top == "rtf":
                    assert (directory / "rtf.py").is_file()


@pytest.mark.parametrize("name", NAMES)
def test_each_service_packages_verifies_installs_and_runs(name, tmp_path):
    private, public = generate_keypair(tmp_path / "keys")
    doc = json.loads((SERVICES / name / "object.json").read_text())
    assert doc["entry"] == f"{name}:{NAMES[name]}" and doc["name"] == name
    built = package_service(SERVICES / name, name, "1.0.0", "MOAT example services", private,
                            tmp_path / "out" / name)
    verified = verify_service(built.path, [public])
    (obj,) = verified.manifest.objects
    assert (obj.name, obj.entry) == (name, doc["entry"])
    assert obj.resources.to_json() == doc["resources"]
    # reproducible archives: packaging again gives the same hash
    again = package_service(SERVICES / name, name, "1.0.0", "MOAT example services", private,
                            tmp_path / "again" / name)
    assert again.manifest.objects[0].sha256 == obj.sha256
    # the archive alone is enough to run the object
    installed = install_service(built.path, [public], tmp_path / "installed" / name)
    members = sorted(p.name for p in (installed.path / name).iterdir())
    assert "object.json" not in members and "__pycache__" not in members
    assert f"{name}.py" in members and ("rtf.py" in members) == name.endswith("2rtf")
    module, _, cls = obj.entry.partition(":")
    instance = getattr(load_module(installed.path / name, module), cls)()
    reply = instance.handle(_request(name))
    assert set(reply) == {{"text2html": "html", "text2word": "docx_b64"}.get(name, "rtf")}
