"""Wireshark (tshark) reads MOAT's RFC 5944 messages natively, with the values we encoded.

The README promises that mobility messages follow RFC 5944 byte for byte, so Wireshark dissects
them natively. This checks it against an independent implementation: our codec's bytes go into
a pcap, tshark's own dissectors (packet-mip.c, packet-icmp.c) read them, and the field values
must be the ones we put in. No root; skipped if tshark is not installed.

Field names are tshark 4.0's (``tshark -G fields``): ``mip.type``, ``mip.s``/``mip.g``/``mip.t``,
``mip.life``, ``mip.homeaddr``, ``mip.haaddr``, ``mip.coa``, ``mip.ident`` (shown as an
absolute UTC time, being NTP), ``mip.code``, ``mip.nai``, ``mip.ext.type``,
``mip.ext.nvse.vendor_id``/``vendor_type``/``vendor_value``, ``mip.auth.spi``,
``mip.auth.auth``; ``icmp.type``, ``icmp.mip.seq``, ``icmp.mip.life``, ``icmp.mip.f``,
``icmp.mip.g``, ``icmp.mip.h``, ``icmp.mip.coa``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import pytest

import packets.scapy_layers as sl
from packets import (
    AdvFlags,
    AgentAdvertisement,
    CareOfName,
    ExtType,
    NaiExtension,
    ObjectPart,
    PartRole,
    RegistrationReply,
    RegistrationRequest,
    ReplyCode,
    RequestFlags,
    append_auth,
)
from packets.codes import MIP_PORT, MOAT_VENDOR_ID
from packets.ident import ntp_to_unix, unix_to_ntp
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.utils import wrpcap

TSHARK = shutil.which("tshark")
pytestmark = pytest.mark.skipif(
    TSHARK is None, reason="tshark not on PATH (apt-get install tshark)"
)

TIMEOUT = 60
# 2024-03-15 12:34:56.5 UTC: a half second, exactly representable in NTP and in nanoseconds.
IDENT = unix_to_ntp(datetime(2024, 3, 15, 12, 34, 56, tzinfo=timezone.utc).timestamp() + 0.5)
MH_SPI, MF_SPI = 0x1000, 0x1001
MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]


def wireshark_time(ntp: int) -> str:
    """How tshark 4.0 prints an FT_ABSOLUTE_TIME (UTC) field: 'Mar 15, 2024 12:34:56.5... UTC'.

    Spelled out rather than strftime'd so neither the locale nor the host zone matters.
    """
    seconds = ntp_to_unix(ntp)
    whole = int(seconds)
    nanos = round((seconds - whole) * 1e9)
    t = datetime.fromtimestamp(whole, tz=timezone.utc)
    return (
        f"{MONTHS[t.month - 1]} {t.day:2d}, {t.year} "
        f"{t.hour:02d}:{t.minute:02d}:{t.second:02d}.{nanos:09d} UTC"
    )


def request_bytes() -> bytes:
    msg = RegistrationRequest(
        home_address="10.1.0.5",
        home_agent="10.1.0.1",
        care_of_address="10.2.0.1",
        identification=IDENT,
        lifetime=300,
        flags=RequestFlags.S | RequestFlags.G | RequestFlags.T,
        extensions=[
            NaiExtension("printer-7@home.moat.example"),
            CareOfName("guest-42.lab2"),
            ObjectPart(PartRole.SECONDARY, 3, "text2rtf@home.moat.example"),
        ],
    )
    raw = append_auth(msg.encode(), ExtType.MOBILE_HOME_AUTH, MH_SPI, b"h" * 32)
    return append_auth(raw, ExtType.MOBILE_FOREIGN_AUTH, MF_SPI, b"f" * 32)


def reply_bytes() -> bytes:
    return RegistrationReply(
        ReplyCode.HA_IDENTIFICATION_MISMATCH, "10.1.0.5", "10.1.0.1", IDENT + 1, 0
    ).encode()


ADV = AgentAdvertisement(
    sequence=17,
    registration_lifetime=600,
    flags=AdvFlags.F | AdvFlags.G,
    care_of_addresses=["10.2.0.1"],
)


@pytest.fixture(scope="module")
def capture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Frames 1-5: RRQ, RRP 133, advertisement, solicitation, RRQ built with Scapy layers."""
    path = tmp_path_factory.mktemp("tshark") / "moat.pcap"
    scapy_built = sl.MoatRRQ(
        flags="BD", lifetime=60, homeaddr="10.1.0.6", haaddr="10.1.0.1",
        coaddr="10.3.0.1", id=IDENT + 2,
        extensions=[sl.MoatExtNAI(nai="lamp@home.moat.example")],
    )
    wrpcap(str(path), [
        Ether() / IP(src="10.2.0.9", dst="10.2.0.1") / UDP(sport=MIP_PORT, dport=MIP_PORT)
        / request_bytes(),
        Ether() / IP(src="10.1.0.1", dst="10.2.0.1") / UDP(sport=MIP_PORT, dport=40000)
        / reply_bytes(),
        Ether() / sl.advertisement_packet(ADV, src="10.2.0.1"),
        Ether() / sl.solicitation_packet(src="10.2.0.9"),
        Ether() / IP(src="10.3.0.9", dst="10.3.0.1") / UDP() / scapy_built,
    ])
    return path


def tshark_env(home: Path) -> dict[str, str]:
    """A private HOME (no user preferences or plugins) and UTC, so output is reproducible."""
    env = dict(os.environ)
    env.update(HOME=str(home), TZ="UTC", LC_ALL="C.UTF-8")
    env.pop("WIRESHARK_CONFIG_DIR", None)
    return env


def tshark_fields(pcap: Path, fields: list[str], tmp_path: Path) -> list[dict[str, str]]:
    """One dict per frame, field -> value as tshark prints it (all occurrences, comma-joined)."""
    cmd = [TSHARK, "-n", "-r", str(pcap), "-T", "fields", "-E", "separator=\t",
           "-E", "occurrence=a", "-E", "aggregator=,"]
    for field in fields:
        cmd += ["-e", field]
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=TIMEOUT, env=tshark_env(tmp_path),
        check=False,
    )
    assert done.returncode == 0, done.stderr
    rows = []
    for line in done.stdout.splitlines():
        values = line.split("\t")
        values += [""] * (len(fields) - len(values))
        rows.append(dict(zip(fields, values)))
    return rows


def test_registration_request_fields(capture: Path, tmp_path: Path) -> None:
    fields = [
        "mip.type", "mip.flags", "mip.s", "mip.b", "mip.d", "mip.m", "mip.g", "mip.t",
        "mip.life", "mip.homeaddr", "mip.haaddr", "mip.coa", "mip.ident", "mip.nai",
        "mip.ext.type", "mip.ext.nvse.vendor_id", "mip.ext.nvse.vendor_type",
        "mip.ext.nvse.vendor_value", "mip.auth.spi", "mip.auth.auth",
    ]
    row = tshark_fields(capture, fields, tmp_path)[0]
    assert row["mip.type"] == "1"
    assert int(row["mip.flags"], 0) == 0x8A
    assert (row["mip.s"], row["mip.g"], row["mip.t"]) == ("1", "1", "1")
    assert (row["mip.b"], row["mip.d"], row["mip.m"]) == ("0", "0", "0")
    assert row["mip.life"] == "300"
    assert row["mip.homeaddr"] == "10.1.0.5"
    assert row["mip.haaddr"] == "10.1.0.1"
    assert row["mip.coa"] == "10.2.0.1"
    assert row["mip.ident"] == wireshark_time(IDENT) == "Mar 15, 2024 12:34:56.500000000 UTC"
    assert row["mip.nai"] == "printer-7@home.moat.example"
    assert row["mip.ext.type"].split(",") == ["131", "134", "134", "32", "33"]
    assert row["mip.ext.nvse.vendor_id"].split(",") == [str(MOAT_VENDOR_ID)] * 2
    assert row["mip.ext.nvse.vendor_type"].split(",") == ["1", "2"]
    care_of_name, part = row["mip.ext.nvse.vendor_value"].split(",")
    assert bytes.fromhex(care_of_name) == b"guest-42.lab2"
    assert bytes.fromhex(part) == b"\x02\x00\x00\x03text2rtf@home.moat.example"
    assert [int(s, 0) for s in row["mip.auth.spi"].split(",")] == [MH_SPI, MF_SPI]
    raw = request_bytes()
    assert row["mip.auth.auth"].split(",") == [raw[-70:-38].hex(), raw[-32:].hex()]


def test_registration_reply_fields(capture: Path, tmp_path: Path) -> None:
    fields = ["mip.type", "mip.code", "mip.life", "mip.homeaddr", "mip.haaddr", "mip.ident"]
    row = tshark_fields(capture, fields, tmp_path)[1]
    assert row == {
        "mip.type": "3",
        "mip.code": "133",
        "mip.life": "0",
        "mip.homeaddr": "10.1.0.5",
        "mip.haaddr": "10.1.0.1",
        "mip.ident": wireshark_time(IDENT + 1),
    }


def test_advertisement_and_solicitation_fields(capture: Path, tmp_path: Path) -> None:
    fields = [
        "ip.ttl", "ip.dst", "icmp.type", "icmp.checksum.status", "icmp.mip.type",
        "icmp.mip.seq", "icmp.mip.life", "icmp.mip.flags", "icmp.mip.r", "icmp.mip.h",
        "icmp.mip.f", "icmp.mip.g", "icmp.mip.coa",
    ]
    rows = tshark_fields(capture, fields, tmp_path)
    adv, sol = rows[2], rows[3]
    assert (adv["ip.ttl"], adv["ip.dst"], adv["icmp.type"]) == ("1", "224.0.0.1", "9")
    assert adv["icmp.checksum.status"] == "1"  # good
    assert adv["icmp.mip.type"] == "16"
    assert (adv["icmp.mip.seq"], adv["icmp.mip.life"]) == ("17", "600")
    assert int(adv["icmp.mip.flags"], 0) == int(AdvFlags.F | AdvFlags.G)
    assert (adv["icmp.mip.f"], adv["icmp.mip.g"]) == ("1", "1")
    assert (adv["icmp.mip.r"], adv["icmp.mip.h"]) == ("0", "0")
    assert adv["icmp.mip.coa"] == "10.2.0.1"
    assert (sol["ip.ttl"], sol["icmp.type"], sol["icmp.checksum.status"]) == ("1", "10", "1")


def test_scapy_built_request_reads_in_wireshark(capture: Path, tmp_path: Path) -> None:
    fields = ["mip.type", "mip.b", "mip.d", "mip.s", "mip.life", "mip.coa", "mip.nai"]
    row = tshark_fields(capture, fields, tmp_path)[4]
    assert row == {
        "mip.type": "1", "mip.b": "1", "mip.d": "1", "mip.s": "0", "mip.life": "60",
        "mip.coa": "10.3.0.1", "mip.nai": "lamp@home.moat.example",
    }


def test_no_frame_is_malformed(capture: Path, tmp_path: Path) -> None:
    rows = tshark_fields(capture, ["frame.protocols", "_ws.malformed", "_ws.expert"], tmp_path)
    assert len(rows) == 5
    assert [r["frame.protocols"].split(":")[-1] for r in rows] == [
        "mip", "mip", "icmp", "icmp", "mip",
    ]
    assert all(r["_ws.malformed"] == "" and r["_ws.expert"] == "" for r in rows), rows
