"""packets/wireshark/moat.lua: MOAT's NVSE sub-types and control framing in tshark.

The Lua dissector is loaded with ``-X lua_script:`` into a tshark with a private HOME, fed a
pcap built from our codecs, and must show the values we encoded: the care-of-name and object
part NVSEs (through packet-mip.c's ``mip.nvse_ext`` table) and the control header with its JSON
body (through Wireshark's ``json`` dissector: ``json.key``, ``json.value.string``,
``json.value.number``, ``json.member_with_value``). The Lua tables are also checked against
packets/codes.py, which stays the reference, without needing tshark.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path

import pytest

from packets import (
    CareOfName,
    ControlMessage,
    ControlType,
    NaiExtension,
    ObjectPart,
    PartRole,
    RegistrationRequest,
)
from packets.codes import CONTROL_PORT, MIP_PORT, MOAT_VENDOR_ID, SERVICE_PORT, NvseType
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.utils import wrpcap

LUA = Path(__file__).resolve().parents[2] / "packets" / "wireshark" / "moat.lua"
TSHARK = shutil.which("tshark")
TIMEOUT = 60


@lru_cache(maxsize=1)
def _lua_skip_reason() -> str | None:
    if TSHARK is None:
        return "tshark not on PATH (apt-get install tshark)"
    try:
        version = subprocess.run(
            [TSHARK, "-v"], capture_output=True, text=True, timeout=TIMEOUT, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"tshark -v failed: {exc}"
    if "without Lua" in version or "with Lua" not in version:
        return "this tshark is built without Lua: cannot load packets/wireshark/moat.lua"
    return None


needs_lua = pytest.mark.skipif(_lua_skip_reason() is not None, reason=str(_lua_skip_reason()))

BODY = {"service": "text2rtf", "portion": 50}


def _control(mtype: ControlType, txid: int, body: dict) -> bytes:
    return ControlMessage(mtype, txid, body).encode()


@pytest.fixture(scope="module")
def capture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Frames:

    1 RRQ with NAI, care-of-name and object-part NVSEs (UDP 434)
    2 control SERVICE_REQUEST txid 7 on UDP 4340
    3 control SERVICE_REPLY txid 8 on UDP 4341 (service port, reply direction: sport)
    4 two control messages in one TCP segment to 4340
    5-6 one control message cut across two TCP segments to 4341
    7 UDP 4340 payload that is not MOAT (bad magic): must not be claimed
    """
    path = tmp_path_factory.mktemp("lua") / "moat.pcap"
    rrq = RegistrationRequest(
        "10.1.0.5", "10.1.0.1", "10.2.0.1", 1, 300,
        extensions=[
            NaiExtension("printer-7@home.moat.example"),
            CareOfName("guest-42.lab2"),
            ObjectPart(PartRole.DUPLICATE, 513, "text2rtf@home.moat.example"),
        ],
    ).encode()
    split = _control(ControlType.STATE_TRANSFER, 11, {"state": "x" * 40, "seq": 2})
    two = _control(ControlType.LEASE_REQUEST, 9, {"cpu": 1}) + _control(
        ControlType.LEASE_GRANT, 10, {"lease": 30}
    )
    a, b = "10.0.0.1", "10.0.0.2"
    wrpcap(str(path), [
        Ether() / IP(src=a, dst=b) / UDP(sport=MIP_PORT, dport=MIP_PORT) / rrq,
        Ether() / IP(src=a, dst=b) / UDP(sport=40000, dport=CONTROL_PORT)
        / _control(ControlType.SERVICE_REQUEST, 7, BODY),
        Ether() / IP(src=b, dst=a) / UDP(sport=SERVICE_PORT, dport=40001)
        / _control(ControlType.SERVICE_REPLY, 8, {"result": "ok"}),
        Ether() / IP(src=a, dst=b) / TCP(sport=40002, dport=CONTROL_PORT, flags="PA", seq=1000)
        / two,
        Ether() / IP(src=a, dst=b) / TCP(sport=40003, dport=SERVICE_PORT, flags="PA", seq=5000)
        / split[:20],
        Ether() / IP(src=a, dst=b) / TCP(sport=40003, dport=SERVICE_PORT, flags="PA", seq=5020)
        / split[20:],
        Ether() / IP(src=a, dst=b) / UDP(sport=40004, dport=CONTROL_PORT) / b"GET / HTTP/1.0\r\n",
    ])
    return path


def run_tshark(pcap: Path, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.update(HOME=str(home), TZ="UTC", LC_ALL="C.UTF-8")
    env.pop("WIRESHARK_CONFIG_DIR", None)
    done = subprocess.run(
        [TSHARK, "-n", "-X", f"lua_script:{LUA}", "-r", str(pcap), *args],
        capture_output=True, text=True, timeout=TIMEOUT, env=env, check=False,
    )
    assert done.returncode == 0, done.stderr
    # A Lua load error does not fail tshark; it is printed ("tshark: Lua: ..."). Fail on it.
    assert "Lua:" not in done.stderr and "lua_script" not in done.stderr, done.stderr
    return done


def fields(pcap: Path, home: Path, names: list[str]) -> list[dict[str, str]]:
    """One dict per frame. A Lua runtime error in the dissector does not reach stderr: it
    becomes an expert item in the tree, so every call also reads the expert messages."""
    expert = "_ws.expert.message"
    args = ["-T", "fields", "-E", "separator=\t", "-E", "occurrence=a", "-E", "aggregator=|"]
    for name in [*names, expert]:
        args += ["-e", name]
    rows = []
    for line in run_tshark(pcap, home, *args).stdout.splitlines():
        values = line.split("\t")
        values += [""] * (len(names) + 1 - len(values))
        row = dict(zip([*names, expert], values))
        assert "Lua Error" not in row.pop(expert), line
        rows.append({k: v.replace("|", ",") for k, v in row.items()})
    return rows


@needs_lua
def test_nvse_subtypes(capture: Path, tmp_path: Path) -> None:
    names = [
        "mip.nai", "mip.ext.nvse.vendor_id", "moat.nvse.type", "moat.nvse.care_of_name",
        "moat.nvse.part.role", "moat.nvse.part.part_id", "moat.nvse.part.parent",
    ]
    row = fields(capture, tmp_path, names)[0]
    assert row["mip.nai"] == "printer-7@home.moat.example"
    assert row["mip.ext.nvse.vendor_id"] == f"{MOAT_VENDOR_ID},{MOAT_VENDOR_ID}"
    assert row["moat.nvse.type"] == "1,2"
    assert row["moat.nvse.care_of_name"] == "guest-42.lab2"
    assert row["moat.nvse.part.role"] == str(int(PartRole.DUPLICATE))
    assert row["moat.nvse.part.part_id"] == "513"
    assert row["moat.nvse.part.parent"] == "text2rtf@home.moat.example"


@needs_lua
def test_control_on_udp_with_json_body(capture: Path, tmp_path: Path) -> None:
    names = [
        "moat.magic", "moat.version", "moat.type", "moat.txid", "moat.length", "json.key",
        "json.value.string", "json.value.number", "json.member_with_value",
    ]
    rows = fields(capture, tmp_path, names)
    request, reply = rows[1], rows[2]
    assert request == {
        "moat.magic": "MO",
        "moat.version": "1",
        "moat.type": str(int(ControlType.SERVICE_REQUEST)),
        "moat.txid": "7",
        "moat.length": str(len(b'{"service":"text2rtf","portion":50}')),
        "json.key": "service,portion",
        "json.value.string": "text2rtf",
        "json.value.number": "50",
        "json.member_with_value": "service:text2rtf,portion:50",
    }
    assert (reply["moat.type"], reply["moat.txid"], reply["json.member_with_value"]) == (
        str(int(ControlType.SERVICE_REPLY)), "8", "result:ok",
    )


@needs_lua
def test_control_type_is_shown_by_name(capture: Path, tmp_path: Path) -> None:
    out = run_tshark(capture, tmp_path, "-V", "-Y", "moat.txid == 7").stdout
    assert "Type: service_request (7)" in out
    assert "Member: service" in out  # the JSON tree under the MOAT tree
    summary = run_tshark(capture, tmp_path).stdout.splitlines()
    assert "MOAT" in summary[1] and "service_request txid=7" in summary[1]


@needs_lua
def test_control_on_tcp_is_framed(capture: Path, tmp_path: Path) -> None:
    rows = fields(capture, tmp_path, ["moat.type", "moat.txid", "json.key", "json.value.string"])
    two = rows[3]
    assert two["moat.txid"] == "9,10"
    assert two["moat.type"] == f"{int(ControlType.LEASE_REQUEST)},{int(ControlType.LEASE_GRANT)}"
    assert two["json.key"] == "cpu,lease"
    first_half, second_half = rows[4], rows[5]
    assert first_half["moat.txid"] == ""  # incomplete: tshark waits for the next segment
    assert second_half["moat.txid"] == "11"
    assert second_half["json.key"] == "state,seq"
    assert second_half["json.value.string"] == "x" * 40


@needs_lua
def test_non_moat_payload_on_our_port_is_not_claimed(capture: Path, tmp_path: Path) -> None:
    rows = fields(capture, tmp_path, ["frame.protocols", "moat.magic"])
    assert rows[6]["moat.magic"] == ""
    assert rows[6]["frame.protocols"].endswith(":udp:data")


@needs_lua
def test_well_formed_capture_raises_no_expert_info(capture: Path, tmp_path: Path) -> None:
    """No Lua error, no malformed packet, no MOAT expert item anywhere in the capture."""
    rows = fields(capture, tmp_path, ["_ws.malformed", "_ws.expert"])
    assert all(r == {"_ws.malformed": "", "_ws.expert": ""} for r in rows), rows


BIG_REPLY = {"ok": True, "result": {"docx_b64": "QUJD" * 40_000}, "client": "co", "seq": 3}
MSS = 1448


@pytest.fixture(scope="module")
def big_capture(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """A service reply too large for UDP, as the object sends it over TCP 4341: about 160 KB
    cut into MSS-sized segments, followed back to back by a second, small reply that starts
    inside the big one's last segment. Returns the pcap and its number of frames."""
    path = tmp_path_factory.mktemp("lua_big") / "big.pcap"
    stream = _control(ControlType.SERVICE_REPLY, 21, BIG_REPLY) + _control(
        ControlType.SERVICE_REPLY, 22, {"ok": True, "seq": 4})
    assert len(stream) % MSS != 0, "the second reply must share a segment with the first"
    a, b = "10.0.0.1", "10.0.0.2"
    frames = [
        Ether() / IP(src=b, dst=a)
        / TCP(sport=SERVICE_PORT, dport=40005, flags="PA", seq=9000 + off, ack=1)
        / stream[off:off + MSS]
        for off in range(0, len(stream), MSS)
    ]
    wrpcap(str(path), frames)
    return path, len(frames)


@needs_lua
def test_a_tcp_reply_over_many_segments_is_reassembled(big_capture: tuple[Path, int],
                                                       tmp_path: Path) -> None:
    pcap, count = big_capture
    assert count > 100
    rows = fields(pcap, tmp_path, ["moat.txid", "moat.length", "json.key", "_ws.malformed"])
    assert len(rows) == count
    assert all(r["moat.txid"] == "" for r in rows[:-1]), "nothing shown before the end arrives"
    last = rows[-1]
    body_len = len(_control(ControlType.SERVICE_REPLY, 21, BIG_REPLY)) - 12
    assert last["moat.txid"] == "21,22" and last["moat.length"].split(",")[0] == str(body_len)
    assert "docx_b64" in last["json.key"].split(",") and last["_ws.malformed"] == ""


# --- Lua tables vs packets/codes.py (no tshark needed) -------------------------------------


def _lua_table(name: str) -> dict[int, str]:
    text = LUA.read_text()
    match = re.search(rf"local {name} = \{{(.*?)\n\}}", text, re.S)
    assert match, f"table {name} not found in {LUA}"
    return {int(k): v for k, v in re.findall(r'\[(\d+)\]\s*=\s*"([^"]+)"', match.group(1))}


def _lua_number(name: str) -> int:
    match = re.search(rf"local {name} = (\d+)", LUA.read_text())
    assert match, f"{name} not found in {LUA}"
    return int(match.group(1))


def test_lua_tables_match_codes() -> None:
    assert _lua_table("control_types") == {int(m): m.name.lower() for m in ControlType}
    assert _lua_table("part_roles") == {int(m): m.name.lower() for m in PartRole}
    assert _lua_table("nvse_types") == {int(m): m.name.lower() for m in NvseType}
    assert _lua_number("MOAT_VENDOR_ID") == MOAT_VENDOR_ID
    assert _lua_number("CONTROL_PORT") == CONTROL_PORT
    assert _lua_number("SERVICE_PORT") == SERVICE_PORT
