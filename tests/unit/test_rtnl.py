"""The hand-built rtnetlink requests (agent.core.rtnl): read back with pyroute2's own
parsers, each field as pyroute2 would have sent it for the same change; acknowledgements
read by sequence number; garbage refused. The kernel's view: tests/netns/test_rtnl_netns.py."""

from __future__ import annotations

import errno
import socket
import struct

import pytest
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from agent.core import rtnl
from agent.core.rtnl import RtnlError, address_request, parse_ack, route_request


def decoded(cls: type, data: bytes) -> dict:
    msg = cls(data)
    msg.decode()
    return {"header": dict(msg["header"]), **{f[0]: msg[f[0]] for f in msg.fields},
            "attrs": dict(msg["attrs"])}


def test_a_route_replace_is_what_pyroute2_sends() -> None:
    got = decoded(rtmsg, route_request("replace", "10.16.0.100", 32, oif=7, table=4348, seq=9))
    assert got["header"]["type"] == rtnl.RTM_NEWROUTE and got["header"]["sequence_number"] == 9
    assert got["header"]["flags"] == (rtnl.NLM_F_REQUEST | rtnl.NLM_F_ACK | rtnl.NLM_F_REPLACE
                                      | rtnl.NLM_F_CREATE)
    assert (got["family"], got["dst_len"], got["table"], got["proto"], got["scope"], got["type"]) == \
        (socket.AF_INET, 32, 0, rtnl.RTPROT_STATIC, 0, rtnl.RTN_UNICAST)  # table > 255: attribute
    assert got["attrs"] == {"RTA_TABLE": 4348, "RTA_DST": "10.16.0.100", "RTA_OIF": 7}


def test_a_route_through_a_gateway_in_the_main_table_and_a_default_route() -> None:
    got = decoded(rtmsg, route_request("replace", "10.97.0.0", 24, gateway="10.0.1.2"))
    assert (got["table"], got["dst_len"]) == (254, 24)
    assert got["attrs"] == {"RTA_TABLE": 254, "RTA_DST": "10.97.0.0", "RTA_GATEWAY": "10.0.1.2"}
    default = decoded(rtmsg, route_request("replace", "0.0.0.0", 0, oif=3, table=4347))
    assert default["dst_len"] == 0 and "RTA_DST" not in default["attrs"]


def test_a_deletion_matches_any_protocol_scope_and_type_and_a_local_route_is_host_scoped() -> None:
    gone = decoded(rtmsg, route_request("del", "10.16.0.100", 32, oif=7, table=4348))
    assert gone["header"]["type"] == rtnl.RTM_DELROUTE
    assert gone["header"]["flags"] == rtnl.NLM_F_REQUEST | rtnl.NLM_F_ACK
    assert (gone["proto"], gone["scope"], gone["type"]) == (0, rtnl.RT_SCOPE_NOWHERE, 0)
    local = decoded(rtmsg, route_request("replace", "10.16.0.100", 32, oif=1, table=4346, local=True))
    assert (local["type"], local["scope"]) == (rtnl.RTN_LOCAL, rtnl.RT_SCOPE_HOST)


def test_an_address_on_lo() -> None:
    got = decoded(ifaddrmsg, address_request("add", 1, "10.16.0.100", 32, seq=3))
    assert got["header"]["type"] == rtnl.RTM_NEWADDR
    assert got["header"]["flags"] & rtnl.NLM_F_EXCL  # already there: EEXIST (tolerated above)
    assert (got["family"], got["prefixlen"], got["index"]) == (socket.AF_INET, 32, 1)
    assert got["attrs"] == {"IFA_LOCAL": "10.16.0.100", "IFA_ADDRESS": "10.16.0.100"}
    assert decoded(ifaddrmsg, address_request("del", 1, "10.16.0.100", 32))["header"]["type"] == \
        rtnl.RTM_DELADDR


@pytest.mark.parametrize("call", [
    lambda: route_request("add", "10.0.0.0", 8),
    lambda: route_request("replace", "10.0.0.0", 33),
    lambda: address_request("replace", 1, "10.0.0.1", 32),
    lambda: address_request("add", 1, "10.0.0.1", -1),
    lambda: route_request("replace", "not-an-address", 32),
])
def test_what_it_cannot_say_is_refused_before_sending(call) -> None:
    with pytest.raises((ValueError, OSError)):
        call()


def ack(seq: int, code: int) -> bytes:
    return rtnl.NLMSGHDR.pack(36, rtnl.NLMSG_ERROR, 0, seq, 0) + struct.pack("=i", -code) + b"\0" * 16


def test_acknowledgements_are_read_by_sequence_number() -> None:
    other = rtnl.NLMSGHDR.pack(20, 16, 0, 4, 0) + b"\0" * 4  # a message for no one
    assert parse_ack(other + ack(5, 0), 5) == 0
    assert parse_ack(ack(5, errno.EEXIST), 5) == errno.EEXIST
    assert parse_ack(ack(4, 0), 5) is None and parse_ack(b"", 5) is None


def test_a_malformed_answer_is_an_error_not_a_loop() -> None:
    with pytest.raises(RtnlError) as info:
        parse_ack(rtnl.NLMSGHDR.pack(4, rtnl.NLMSG_ERROR, 0, 5, 0), 5)  # shorter than a header
    assert info.value.code == errno.EPROTO
    with pytest.raises(RtnlError):
        parse_ack(rtnl.NLMSGHDR.pack(400, rtnl.NLMSG_ERROR, 0, 5, 0), 5)  # longer than the data
    with pytest.raises(RtnlError):
        parse_ack(rtnl.NLMSGHDR.pack(16, rtnl.NLMSG_ERROR, 0, 5, 0), 5)  # an ack without its errno
