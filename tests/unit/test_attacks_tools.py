"""The attacker's pure tools and the suite's wire helpers: mutation, destinations, answers,
captured-message extraction, the secrets search."""

from __future__ import annotations

import base64
import json
import random
from pathlib import Path

import pytest

from experiments.attacks import secrets as run_secrets
from experiments.attacks import wire
from nodetools.attacker import (
    AttackerError,
    check_destination,
    describe_answer,
    mutate,
    with_client,
)
from packets import ControlMessage, ControlType, RegistrationRequest, decode_registration


def _valid() -> bytes:
    return wire.forged_request("10.16.0.100", "10.16.0.2", "10.12.0.1", "c@home.moat", 256, mf_spi=1000)


def test_mutate_is_reproducible_and_changes_messages() -> None:
    seed = _valid()
    a = [mutate(seed, random.Random(5)) for _ in range(1)]
    b = [mutate(seed, random.Random(5)) for _ in range(1)]
    assert a == b
    rng = random.Random(12)
    out = [mutate(seed, rng) for _ in range(500)]
    assert sum(m != seed for m in out) > 450
    assert len({len(m) for m in out}) > 10  # truncations and extensions, not only flips
    assert mutate(b"", random.Random(1))  # an empty seed still gives bytes


def test_forged_request_decodes_and_carries_the_spis_asked_for() -> None:
    msg = decode_registration(_valid())
    assert isinstance(msg, RegistrationRequest)
    assert msg.home_address == "10.16.0.100" and msg.care_of_address == "10.12.0.1"
    assert [e.spi for e in msg.extensions if hasattr(e, "spi")] == [256, 1000]
    dereg = decode_registration(wire.forged_request("10.16.0.100", "10.16.0.2", "10.16.0.100",
                                                    "c@home.moat", 256, lifetime=0))
    assert dereg.lifetime == 0


def test_destinations_outside_the_testbed_are_refused() -> None:
    assert check_destination("10.16.0.2") == "10.16.0.2"
    assert check_destination("224.0.0.1") == "224.0.0.1"
    for bad in ("8.8.8.8", "192.168.1.1", "not-an-address", "224.0.1.1"):
        with pytest.raises(AttackerError):
            check_destination(bad)


def test_answers_are_described_by_port() -> None:
    from packets import RegistrationReply

    reply = RegistrationReply(133, "10.16.0.100", "10.16.0.2", 42).encode()
    assert describe_answer(434, reply)["code"] == 133
    assert describe_answer(434, b"\x09")["kind"] == "malformed"
    ctl = ControlMessage(ControlType.MIGRATE, 1, {"ok": False, "error": "MIGRATE refused: bad"}).encode()
    assert describe_answer(4340, ctl)["error"] == "MIGRATE refused: bad"


def test_with_client_rewrites_only_client_and_seq() -> None:
    tpl = ControlMessage(ControlType.SERVICE_REQUEST, 3, {"client": "a", "seq": 1, "op": "get"}).encode()
    msg = ControlMessage.decode(with_client(tpl, "b", 1 << 40))
    assert msg.body == {"client": "b", "seq": 1 << 40, "op": "get"} and msg.txid == 3


@pytest.mark.parametrize("answer,auth", [
    ({"ok": False, "error": "MIGRATE refused: replayed message (its nonce was seen)"}, True),
    ({"ok": False, "error": "signed for '10.14.0.1', not for this receiver (10.12.0.2)"}, True),
    ({"ok": False, "reason": "bad_credentials", "error": "x"}, True),
    ({"ok": False, "error": "no object counter here"}, False),  # accepted, then refused by the handler
    ({"ok": True}, False),
    (None, False),
])
def test_an_authentication_refusal_is_told_from_a_handler_refusal(answer, auth) -> None:
    assert wire.is_auth_refusal(answer) is auth


def test_sign_for_names_the_receiver_when_the_signer_takes_one() -> None:
    seen = {}

    def signer(ctype, txid, body, key, key_id="routers", now=None, *, to):
        seen["to"] = to
        return dict(body, auth={"to": to})

    out = wire.sign_for(signer, ControlType.MIGRATE, 1, {"a": 1}, b"k", "10.14.0.1")
    assert seen["to"] == "10.14.0.1" and out["auth"]["to"] == "10.14.0.1"


def test_control_messages_come_out_of_a_pcap_reassembled(tmp_path: Path) -> None:
    from scapy.layers.inet import IP, TCP, UDP
    from scapy.layers.l2 import Ether
    from scapy.utils import wrpcap

    big = ControlMessage(ControlType.STATE_TRANSFER, 9, {"state": "x" * 3000}).encode()
    small = ControlMessage(ControlType.MIGRATE, 8, {"action": "start"}).encode()
    stream = small + big
    segs = [stream[i:i + 1000] for i in range(0, len(stream), 1000)]
    pkts, seq = [], 1000
    for seg in segs:
        pkts.append(Ether() / IP(src="10.12.0.2", dst="10.16.0.3") / TCP(sport=5555, dport=4340, seq=seq) / seg)
        seq += len(seg)
    pkts.insert(2, pkts[1].copy())  # a retransmission
    rrq = _valid()
    pkts.append(Ether() / IP(src="10.12.0.2", dst="10.12.0.1") / UDP(sport=434, dport=434) / rrq)
    path = tmp_path / "x.pcap"
    wrpcap(str(path), pkts)
    msgs = wire.control_messages(path)
    assert [m for _s, _d, m in msgs] == [small, big]
    assert wire.udp_payloads(path, 434) == [("10.12.0.2", "10.12.0.1", rrq, 434)]


def test_run_keys_and_the_capture_scan(tmp_path: Path) -> None:
    mh, router, co = b"\x01" * 32, b"\x02" * 32, b"\x03" * 32
    (tmp_path / "objects.json").write_text(json.dumps(
        {"counter": {"mobile_home": {"spi": 256, "key": mh.hex()}}}))
    (tmp_path / "r22b.json").write_text(json.dumps({"router_key": router.hex(), "name": "r22b"}))
    (tmp_path / "co_keys.json").write_text(json.dumps({"co12": co.hex()}))
    keys = run_secrets.run_keys(tmp_path)
    assert sorted(keys.values()) == sorted([mh, router, co])
    cap = tmp_path / "captures"
    cap.mkdir()
    (cap / "clean.pcap").write_bytes(b"\x00" * 100)
    (cap / "hex.pcap").write_bytes(b"..." + mh.hex().encode() + b"...")
    (cap / "b64.pcap").write_bytes(b"..." + base64.b64encode(co) + b"...")
    found = run_secrets.scan_captures(cap, keys)
    assert set(found) == {"hex.pcap", "b64.pcap"}
    assert found["hex.pcap"] == ["objects.counter.mobile_home.key"]
    assert found["b64.pcap"] == ["co_keys.co12"]
