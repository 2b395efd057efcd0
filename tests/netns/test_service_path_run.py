"""``moat run service-path``, short (one cycle of five requests), on real namespaces: the
broker grants both paths, denies one request ``no_capacity``, every granted path turns a
text into real RTF, the printed rows agree with summary.json and requests.csv, and the home
LAN's capture shows the broker's messages decoded by packets/wireshark/moat.lua."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from experiments import service_path as sp

LUA = Path(__file__).resolve().parents[2] / "packets" / "wireshark" / "moat.lua"


@pytest.fixture(scope="module")
def outcome(tmp_path_factory) -> dict:
    pytest.importorskip("docx", reason="python-docx is installed by make setup")
    out = tmp_path_factory.mktemp("service-path")
    capture = pytest.MonkeyPatch()
    printed: list[str] = []
    capture.setattr("builtins.print", lambda *a, **k: printed.append(" ".join(map(str, a))))
    try:
        assert sp.main(["--requests", "5", "--seed", "2", "--out", str(out)]) == 0
    finally:
        capture.undo()
    (dest,) = (out / sp.EXPERIMENT).iterdir()
    return {"dest": dest, "printed": "\n".join(printed),
            "summary": json.loads((dest / "summary.json").read_text()),
            "csv": list(csv.DictReader((dest / "requests.csv").open()))}


def printed_rows(text: str) -> list[dict[str, str]]:
    """The request table as printed: header, rule, one line per request."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["n", "t_s"])
    header = re.split(r"\s{2,}", lines[start].strip())
    rows = []
    for line in lines[start + 2:]:
        if not line.strip():
            break
        rows.append(dict(zip(header, re.split(r"\s{2,}", line.strip()))))
    return rows


def test_both_paths_granted_one_denied_no_capacity(outcome: dict) -> None:
    summary = outcome["summary"]
    assert summary["paths"].get(sp.HTML_PATH, 0) >= 1, summary["paths"]
    assert summary["paths"].get(sp.WORD_PATH, 0) >= 1, summary["paths"]
    assert summary["denials"].get("no_capacity", 0) >= 1, summary["denials"]
    assert summary["ended"].get("cancelled", 0) >= 1 and summary["ended"].get("expired", 0) >= 1


def test_every_granted_path_produced_rtf(outcome: dict) -> None:
    granted = [r for r in outcome["summary"]["rows"] if r["outcome"] == "granted"]
    docs = sorted((outcome["dest"] / "documents").glob("*.rtf"))
    assert len(docs) == len(granted) > 0
    for doc in docs:
        text = doc.read_text()
        assert text.startswith("{\\rtf1") and text.rstrip().endswith("}")
        assert "MOAT service path" in text and "Caf" in text


def test_printed_rows_agree_with_summary_and_csv(outcome: dict) -> None:
    printed = printed_rows(outcome["printed"])
    rows, table = outcome["summary"]["rows"], outcome["csv"]
    assert len(printed) == len(rows) == len(table) == 5
    for p, r, c in zip(printed, rows, table):
        assert p["n"] == str(r["n"]) == c["n"]
        assert p["co"] == r["co"] == c["co"] and p["outcome"] == r["outcome"] == c["outcome"]
        assert p["path"] == (r["path"] or "-") and c["path"] == (r["path"] or "")
        assert p["reason"] == (r["reason"] or "-")
    summary = outcome["summary"]
    assert f"{summary['granted']} granted, {summary['denied']} denied" in outcome["printed"]
    assert summary["paths"] == {path: sum(1 for r in rows if r["path"] == path)
                                for path in {r["path"] for r in rows if r["path"]}}


def test_the_captures_decode_broker_messages_with_the_lua_dissector(outcome: dict) -> None:
    tshark = shutil.which("tshark")
    if tshark is None:
        pytest.skip("tshark not on PATH (apt-get install tshark)")
    pcap = outcome["dest"] / "captures" / "home_lan.pcap"
    assert pcap.exists() and (outcome["dest"] / "captures" / "foreign_lan_14.pcap").exists()
    answers = subprocess.run([tshark, "-X", f"lua_script:{LUA}", "-r", str(pcap), "-Y",
                              "moat.type == 4 && tcp.srcport == 4340", "-V"],
                             capture_output=True, text=True, timeout=120)
    assert answers.returncode == 0, answers.stderr[-500:]
    # The broker answers a LEASE_REQUEST with a LEASE_GRANT carrying the grant (or the refusal).
    assert "Type: lease_grant (4)" in answers.stdout
    assert "Member: grant" in answers.stdout and "/grant/target:text -> rtf" in answers.stdout
    counts = outcome["summary"]["broker_messages"]["home_lan"]
    assert counts.get("lease_request", 0) >= 5 and counts.get("lease_grant", 0) >= 5
    assert counts.get("lease_cancel", 0) >= 2
