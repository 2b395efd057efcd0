"""The DNS server's files and the DNS client of the probes (no root, no network)."""

from __future__ import annotations

import struct

import pytest

from topologies.dns import dnsmasq_config_text, host_records, parse_a_answer, query
from topologies.errors import DaemonError


def test_host_records_name_each_object_short_and_qualified() -> None:
    lines = host_records({"counter": "10.16.0.100", "r22b": "10.16.0.2"}, "home.moat")
    assert lines == ["host-record=counter.home.moat,counter,10.16.0.100",
                     "host-record=r22b.home.moat,r22b,10.16.0.2"]
    for bad in ({"a b": "10.0.0.1"}, {"a.b": "10.0.0.1"}, {"a,b": "10.0.0.1"}, {"x": "not-an-address"},
                {"x": "10.1"}, {"x\nserver=8.8.8.8": "10.0.0.1"}):
        with pytest.raises((DaemonError, OSError)):
            host_records(bad, "home.moat")
    with pytest.raises(DaemonError):
        host_records({"x": "10.0.0.1"}, "home.moat\nserver=8.8.8.8")


def test_dnsmasq_answers_only_from_the_run_and_forwards_nothing() -> None:
    text = dnsmasq_config_text("10.16.0.23", "home.moat", {"counter": "10.16.0.100"})
    lines = set(text.splitlines())
    assert {"no-resolv", "no-hosts", "bind-interfaces", "listen-address=10.16.0.23",
            "host-record=counter.home.moat,counter,10.16.0.100", "local=/home.moat/",
            "pid-file="} <= lines
    assert not any(line.startswith(("server=", "addn-hosts=")) for line in lines)


def answer(name: str, addresses: list[str], rcode: int = 0) -> bytes:
    """A response as a server builds it: the question again, then A records pointing back
    at it (name compression)."""
    q = query(name)[12:]
    head = struct.pack("!HHHHHH", 0x4d4f, 0x8180 | rcode, 1, len(addresses), 0, 0)
    records = b"".join(struct.pack("!HHHIH", 0xC00C, 1, 1, 60, 4) + bytes(int(x) for x in a.split("."))
                       for a in addresses)
    return head + q + records


def test_query_is_an_a_question_with_recursion_desired() -> None:
    q = query("counter.home.moat", txid=7)
    assert q[:4] == b"\x00\x07\x01\x00" and q[12:] == b"\x07counter\x04home\x04moat\x00\x00\x01\x00\x01"


def test_answers_are_parsed_and_bad_ones_refused() -> None:
    assert parse_a_answer(answer("counter.home.moat", ["10.16.0.100"])) == (0, ["10.16.0.100"])
    assert parse_a_answer(answer("nothing.home.moat", [], rcode=3)) == (3, [])
    with pytest.raises(ValueError):
        parse_a_answer(query("counter.home.moat"))  # a question, not a response
    with pytest.raises(ValueError):
        parse_a_answer(b"\x00\x01\x80")
    with pytest.raises(ValueError):
        parse_a_answer(answer("counter.home.moat", ["10.16.0.100"])[:20])
    full = answer("counter.home.moat", ["10.16.0.100"])
    for cut in range(len(full) - 13, len(full)):  # inside the answer record
        with pytest.raises(ValueError):
            parse_a_answer(full[:cut])
