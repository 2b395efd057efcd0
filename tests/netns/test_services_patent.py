"""The patent's example services as signed mobile objects, each through the whole path
(issue 5, line 10): packaged and signed, published to site24, provisioned on a router,
fetched, verified, run sandboxed, and used over the network — text→HTML→RTF on two routers
and text→WORD→RTF on two others, as the patent's dynamic service path."""

from __future__ import annotations

import base64
import html.parser
import io
import json
import random
import string
from pathlib import Path

import pytest

from agent.vm.repository import package_service, publish_service
from topologies.moatnet import MoatNetwork
from topologies.patent import PatentTopo

SERVICES = Path(__file__).resolve().parents[2] / "services"
TEXT = "Mobile objects {move}\\between routers.\n\nCafé, 漢字 and braces } too."

pytest.importorskip("docx", reason="python-docx is installed by make setup")
striprtf = pytest.importorskip("striprtf.striprtf", reason="striprtf is a test extra (make setup)")

PLACES = {"text2html": ("r22a", 5101), "html2rtf": ("r22c", 5102),
          "text2word": ("r18a", 5103), "word2rtf": ("r20a", 5104)}


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("services")
    with MoatNetwork(PatentTopo()) as m:
        for name, (router, port) in PLACES.items():
            signed = package_service(SERVICES / name, name, "1.0", "acme", m.provider_key, tmp / name)
            publish_service(signed.path, m.net[m.site].repo_root)
            answer = m.provision(router, vm=name, kind="service", service=name, port=port,
                                 resources={"cpu": 1.0, "memory_mb": 512, "pids": 64})
            assert answer["ok"], answer
        yield m


def call(m: MoatNetwork, service: str, body: dict, tmp: Path, *options: str) -> dict:
    router, port = PLACES[service]
    req = tmp / f"{service}.json"
    req.write_text(json.dumps(body))
    reply = m.probe("co14", "service", str(m.topo.addresses(router)[0].ip), str(port), f"@{req}",
                    *options)
    assert reply.get("ok"), reply
    assert reply["served_by"] == router
    return reply["result"]


def random_text(chars: int, seed: int) -> str:
    """Words of random letters and digits, 80 to a paragraph: text that deflate cannot shrink
    much, so the .docx (a zip) grows with it."""
    rng = random.Random(seed)
    alphabet = string.ascii_letters + string.digits
    words: list[str] = []
    while sum(map(len, words)) + len(words) < chars:
        words.append("".join(rng.choices(alphabet, k=rng.randint(3, 12))))
    return "\n\n".join(" ".join(words[i:i + 80]) for i in range(0, len(words), 80))


def paragraphs_of(docx_b64: str) -> list[str]:
    import docx

    return [p.text for p in docx.Document(io.BytesIO(base64.b64decode(docx_b64))).paragraphs]


def test_text_to_html_to_rtf(net: MoatNetwork, tmp_path: Path) -> None:
    page = call(net, "text2html", {"text": TEXT, "title": "patent"}, tmp_path)["html"]
    parser = html.parser.HTMLParser()
    parser.feed(page)
    parser.close()
    assert "Café" in page and "漢字" in page
    rtf = call(net, "html2rtf", {"html": page}, tmp_path)["rtf"]
    assert rtf.startswith("{\\rtf1")
    text = striprtf.rtf_to_text(rtf)
    assert "Café" in text and "漢字" in text and "between routers" in text


def test_text_to_word_to_rtf(net: MoatNetwork, tmp_path: Path) -> None:
    import base64

    import docx

    word = call(net, "text2word", {"text": TEXT, "title": "patent"}, tmp_path)["docx_b64"]
    document = docx.Document(io.BytesIO(base64.b64decode(word)))
    assert any("漢字" in p.text for p in document.paragraphs)
    rtf = call(net, "word2rtf", {"docx_b64": word}, tmp_path)["rtf"]
    assert rtf.startswith("{\\rtf1")
    assert "Café" in striprtf.rtf_to_text(rtf)
    for name, (router, _port) in PLACES.items():
        vm = [v for v in net.agent(router).call("vm") if v["name"] == name][0]
        assert all(o["usage"]["memory_bytes"] for o in vm["objects"].values())


def test_a_docx_too_large_for_udp_comes_back_over_tcp(net: MoatNetwork, tmp_path: Path) -> None:
    """The request fits in a datagram, its reply (a ~74 KB .docx, ~99 KB of base64) does not:
    UDP answers "too_large", and the same client and seq over TCP get the whole document."""
    from packets import ControlMessage, ControlType

    router, port = PLACES["text2word"]
    address = str(net.topo.addresses(router)[0].ip)
    body = {"client": "co14-big", "seq": 1, "text": random_text(50_000, 1), "title": "udp"}
    request = ControlMessage(ControlType.SERVICE_REQUEST, 1, body).encode()
    assert len(request) < 65_000
    raw = net.probe("co14", "udp", address, str(port), request.hex(), "--timeout", "10")
    assert raw["reply"] is not None, "no answer over UDP"
    notice = ControlMessage.decode(bytes.fromhex(raw["reply"])).body
    assert notice["ok"] is False and notice["too_large"] > 65_000, notice
    assert (notice["client"], notice["seq"], notice["served_by"]) == ("co14-big", 1, router)
    # The probe asks over UDP (too_large again, answered from memory), then over TCP.
    result = call(net, "text2word", body, tmp_path, "--timeout", "20")
    assert len(base64.b64decode(result["docx_b64"])) > 65_000
    assert paragraphs_of(result["docx_b64"]) == ["udp", *body["text"].split("\n\n")]


def test_text_to_word_of_a_docx_over_100_kb(net: MoatNetwork, tmp_path: Path) -> None:
    """A request too large for a datagram too (160 KB of text): straight over TCP."""
    text = random_text(160_000, 2)
    result = call(net, "text2word", {"text": text, "title": "big"}, tmp_path, "--tcp",
                  "--timeout", "30")
    document = base64.b64decode(result["docx_b64"])
    assert len(document) > 100_000
    assert paragraphs_of(result["docx_b64"]) == ["big", *text.split("\n\n")]
