"""Byte-level tests of the MOAT codecs (packets/): RFC 5944 registration, extensions,
agent discovery, the control framing and GRE.

Layouts are checked against hex written by hand from the RFCs, not against the encoder, so an
encoder and decoder that agree with each other but not with the RFC would still fail here.
"""

from __future__ import annotations

import json
import struct

import pytest

from packets import (
    AdvFlags,
    AgentAdvertisement,
    AgentSolicitation,
    AuthExtension,
    CareOfName,
    ControlMessage,
    ControlType,
    ExtType,
    GreHeader,
    MalformedMessage,
    NaiExtension,
    ObjectPart,
    PartRole,
    RegistrationReply,
    RegistrationRequest,
    ReplyCode,
    RequestFlags,
    UnknownExtension,
    VendorExtension,
    append_auth,
    decode_discovery,
    decode_gre,
    decode_registration,
)
from packets._wire import internet_checksum
from packets.codes import MOAT_VENDOR_ID, is_skippable
from packets.control import HEADER, MAX_BODY, frame_length
from packets.extensions import decode_extensions, encode_extension

HOME = "10.0.0.5"
HA = "10.0.0.1"
COA = "192.0.2.1"
IDENT = 0x0102030405060708

# --- RFC 5944 §3.3: Registration Request, fixed part (24 bytes) ----------------------------
# type 1 | flags S|G = 0x88 | lifetime 180 | home 10.0.0.5 | HA 10.0.0.1 | CoA 192.0.2.1 | id
RRQ_HEX = "01 88 00b4 0a000005 0a000001 c0000201 0102030405060708"
# --- RFC 5944 §3.4: Registration Reply, fixed part (20 bytes) -------------------------------
# type 3 | code 0 | lifetime 180 | home 10.0.0.5 | HA 10.0.0.1 | id
RRP_HEX = "03 00 00b4 0a000005 0a000001 0102030405060708"

ALL_EXTENSIONS = [
    NaiExtension("obj-1@home.example"),
    CareOfName("coa-7.foreign.example"),
    ObjectPart(PartRole.PRIMARY),
    ObjectPart(PartRole.DUPLICATE, 3, "obj-1@home.example"),
    ObjectPart(PartRole.SECONDARY, 0xFFFF, "parent-\u00e9\u4e2d"),
    VendorExtension(9, 7, b"\x00\x01other vendor"),
    VendorExtension(MOAT_VENDOR_ID, 99, b"future sub-type"),
    UnknownExtension(200, b"skip me"),
    UnknownExtension(128, b""),
    AuthExtension(ExtType.MOBILE_HOME_AUTH, 256, bytes(range(32))),
    AuthExtension(ExtType.MOBILE_FOREIGN_AUTH, 0xFFFFFFFF, b"\xaa" * 32),
    AuthExtension(ExtType.FOREIGN_HOME_AUTH, 1000, b"short"),
]


def _h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


def _rrq(**kw) -> RegistrationRequest:
    fields = dict(
        home_address=HOME, home_agent=HA, care_of_address=COA, identification=IDENT,
        lifetime=180, flags=RequestFlags.S | RequestFlags.G,
    )
    fields.update(kw)
    return RegistrationRequest(**fields)


def _rrp(**kw) -> RegistrationReply:
    fields = dict(code=ReplyCode.ACCEPTED, home_address=HOME, home_agent=HA,
                  identification=IDENT, lifetime=180)
    fields.update(kw)
    return RegistrationReply(**fields)


# ============================================================================================
# Registration Request / Reply: layout
# ============================================================================================


def test_rrq_fixed_part_matches_rfc5944_layout():
    wire = _rrq().encode()
    assert len(_h(RRQ_HEX)) == 24 == RegistrationRequest.FIXED_LEN
    assert wire == _h(RRQ_HEX)
    msg = RegistrationRequest.decode(_h(RRQ_HEX))
    assert msg == _rrq()
    assert msg.flags == RequestFlags.S | RequestFlags.G
    assert msg.extensions == [] and msg.ext_offsets == []
    assert msg.raw == _h(RRQ_HEX)


def test_rrp_fixed_part_matches_rfc5944_layout():
    wire = _rrp().encode()
    assert len(_h(RRP_HEX)) == 20 == RegistrationReply.FIXED_LEN
    assert wire == _h(RRP_HEX)
    msg = RegistrationReply.decode(_h(RRP_HEX))
    assert msg == _rrp()
    assert msg.code is ReplyCode.ACCEPTED and msg.accepted


@pytest.mark.parametrize(
    "flag, byte",
    [("S", 0x80), ("B", 0x40), ("D", 0x20), ("M", 0x10), ("G", 0x08), ("r", 0x04),
     ("T", 0x02), ("x", 0x01)],
)
def test_rrq_flag_bits_in_rfc_order(flag, byte):
    wire = _rrq(flags=RequestFlags[flag]).encode()
    assert wire[1] == byte


def test_extension_layouts_match_hand_written_hex():
    # MN-NAI, RFC 2794: 131 | length | NAI
    assert encode_extension(NaiExtension("o@h")) == _h("83 03") + b"o@h"
    # NVSE, RFC 3115: 134 | length | reserved(2) | vendor 32473 = 0x7ed9 | nvse type | value
    assert encode_extension(CareOfName("n1")) == _h("86 0a 0000 00007ed9 0001") + b"n1"
    # OBJECT_PART value: role | reserved | part id(2) | parent
    assert encode_extension(ObjectPart(PartRole.SECONDARY, 0x0102, "p")) == _h(
        "86 0d 0000 00007ed9 0002 02 00 0102"
    ) + b"p"
    assert encode_extension(VendorExtension(0x01020304, 0x0506, b"\xff")) == _h(
        "86 09 0000 01020304 0506 ff"
    )
    # Authentication, RFC 5944 §3.5: type | length = 4 + auth len | SPI | authenticator
    assert encode_extension(AuthExtension(ExtType.MOBILE_HOME_AUTH, 0x100, b"\x11" * 4)) == _h(
        "20 08 00000100 11111111"
    )
    assert encode_extension(UnknownExtension(0xC8, b"ab")) == _h("c8 02") + b"ab"


def test_rrq_with_extensions_hand_written():
    wire = _h(RRQ_HEX) + _h("83 03") + b"o@h" + _h("86 0a 0000 00007ed9 0001") + b"n1"
    msg = RegistrationRequest.decode(wire)
    assert msg.extensions == [NaiExtension("o@h"), CareOfName("n1")]
    assert msg.ext_offsets == [24, 29]
    assert msg.encode() == wire


# ============================================================================================
# Round trips
# ============================================================================================


@pytest.mark.parametrize("ext", ALL_EXTENSIONS, ids=lambda e: type(e).__name__)
def test_rrq_round_trip_each_extension(ext):
    msg = _rrq(extensions=[ext])
    wire = msg.encode()
    back = RegistrationRequest.decode(wire)
    assert back == msg
    assert back.extensions == [ext]
    assert back.encode() == wire
    assert decode_registration(wire) == msg


@pytest.mark.parametrize("ext", ALL_EXTENSIONS, ids=lambda e: type(e).__name__)
def test_rrp_round_trip_each_extension(ext):
    msg = _rrp(code=ReplyCode.HA_IDENTIFICATION_MISMATCH, extensions=[ext])
    wire = msg.encode()
    back = RegistrationReply.decode(wire)
    assert back == msg
    assert back.encode() == wire
    assert decode_registration(wire) == msg


def test_rrq_round_trip_all_extensions_keeps_order_and_offsets():
    msg = _rrq(extensions=list(ALL_EXTENSIONS), lifetime=0, flags=RequestFlags(0xFF))
    wire = msg.encode()
    back = RegistrationRequest.decode(wire)
    assert back == msg
    assert back.extensions == ALL_EXTENSIONS
    pos = 24
    for ext, off in zip(ALL_EXTENSIONS, back.ext_offsets):
        assert off == pos
        pos += len(encode_extension(ext))
    assert pos == len(wire)
    assert back.find(ObjectPart) == ALL_EXTENSIONS[2:5]
    assert back.find(AuthExtension) == ALL_EXTENSIONS[-3:]


def test_rrp_unassigned_code_survives_as_int():
    wire = _rrp(code=200).encode()
    back = RegistrationReply.decode(wire)
    assert back.code == 200 and not isinstance(back.code, ReplyCode)
    assert not back.accepted
    assert back.encode() == wire


def test_moat_nvse_with_unknown_subtype_is_vendor_extension():
    wire = _rrq().encode() + _h("86 09 0000 00007ed9 0063 aa")
    (ext,) = RegistrationRequest.decode(wire).extensions
    assert ext == VendorExtension(MOAT_VENDOR_ID, 99, b"\xaa")


def test_nvse_reserved_field_is_ignored_on_decode():
    wire = _rrq().encode() + _h("86 0a ffff 00007ed9 0001") + b"n1"
    assert RegistrationRequest.decode(wire).extensions == [CareOfName("n1")]


# ============================================================================================
# Registration: strict decoding
# ============================================================================================


def test_unknown_non_skippable_extension_is_malformed():
    assert not is_skippable(40) and is_skippable(128)
    wire = _rrq().encode() + _h("28 02 0000")
    with pytest.raises(MalformedMessage, match="non-skippable") as info:
        RegistrationRequest.decode(wire)
    assert info.value.offset == 24
    with pytest.raises(MalformedMessage, match="non-skippable"):
        RegistrationReply.decode(_rrp().encode() + _h("28 00"))


@pytest.mark.parametrize("ext_type", [16, 19, 0, 127])
def test_advertisement_only_or_reserved_types_are_non_skippable_in_registration(ext_type):
    with pytest.raises(MalformedMessage, match="non-skippable"):
        decode_registration(_rrq().encode() + bytes((ext_type, 0)))


@pytest.mark.parametrize(
    "tail, reason",
    [
        (_h("83"), "truncated extension header"),
        (_h("83 05") + b"abcd", "runs past"),
        (_h("86 ff") + b"x", "runs past"),
        (_h("20 03 000001"), "too short"),
        (_h("86 07 0000 00007ed9 00"), "NVSE too short"),
        (_h("86 0b 0000 00007ed9 0002 00 00 00"), "object-part NVSE too short"),
        (_h("86 0c 0000 00007ed9 0002 07 00 0000"), "role"),
        (_h("86 08 0000 00007ed9 0001"), "empty care-of-name"),
        (_h("86 09 0000 00007ed9 0001 ff"), "invalid UTF-8"),
        (_h("83 00"), "empty MN-NAI"),
        (_h("83 02 c3 28"), "invalid UTF-8"),
    ],
)
def test_bad_extensions_are_malformed(tail, reason):
    with pytest.raises(MalformedMessage, match=reason):
        RegistrationRequest.decode(_rrq(extensions=[NaiExtension("a@b")]).encode() + tail)


def test_short_messages_are_malformed():
    with pytest.raises(MalformedMessage, match="< 24"):
        RegistrationRequest.decode(_h(RRQ_HEX)[:23])
    with pytest.raises(MalformedMessage, match="< 20"):
        RegistrationReply.decode(_h(RRP_HEX)[:19])
    with pytest.raises(MalformedMessage, match="empty"):
        decode_registration(b"")


def test_wrong_type_byte_is_malformed():
    with pytest.raises(MalformedMessage, match="not a registration request"):
        RegistrationRequest.decode(_h("03") + _h(RRQ_HEX)[1:])
    with pytest.raises(MalformedMessage, match="not a registration reply"):
        RegistrationReply.decode(_h("01") + _h(RRP_HEX)[1:])
    with pytest.raises(MalformedMessage, match="unknown Mobile IP message type 2"):
        decode_registration(_h("02") + _h(RRQ_HEX)[1:])


def test_decode_registration_dispatches_on_first_byte():
    assert isinstance(decode_registration(_h(RRQ_HEX)), RegistrationRequest)
    assert isinstance(decode_registration(_h(RRP_HEX)), RegistrationReply)
    assert isinstance(decode_registration(bytearray(_h(RRP_HEX))), RegistrationReply)


@pytest.mark.parametrize("field", ["home_address", "home_agent", "care_of_address"])
@pytest.mark.parametrize("bad", ["10.0.0", "10.0.0.256", "::1", "", "1.2.3.4\x00", "\ud800", 5])
def test_encode_bad_address_is_malformed(field, bad):
    with pytest.raises(MalformedMessage, match="not an IPv4 address"):
        _rrq(**{field: bad}).encode()


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"lifetime": 65536}, "lifetime"),
        ({"lifetime": -1}, "lifetime"),
        ({"identification": 1 << 64}, "identification"),
        ({"flags": 256}, "flags"),
    ],
)
def test_encode_overflowing_fields_is_malformed(kw, match):
    with pytest.raises(MalformedMessage, match=match):
        _rrq(**kw).encode()


def test_encode_reply_overflow_and_bad_address_are_malformed():
    with pytest.raises(MalformedMessage, match="lifetime"):
        _rrp(lifetime=1 << 16).encode()
    with pytest.raises(MalformedMessage, match="code"):
        _rrp(code=256).encode()
    with pytest.raises(MalformedMessage, match="home agent"):
        _rrp(home_agent="nope").encode()


def test_encode_oversized_or_overflowing_extension_is_malformed():
    with pytest.raises(MalformedMessage, match="> 255"):
        _rrq(extensions=[NaiExtension("x" * 256)]).encode()
    with pytest.raises(MalformedMessage, match="part_id"):
        _rrq(extensions=[ObjectPart(PartRole.PRIMARY, 1 << 16)]).encode()
    with pytest.raises(MalformedMessage, match="spi"):
        _rrq(extensions=[AuthExtension(ExtType.MOBILE_HOME_AUTH, 1 << 32, b"")]).encode()
    with pytest.raises(MalformedMessage, match="vendor_id"):
        _rrq(extensions=[VendorExtension(-1, 0)]).encode()
    # 255 is the largest body that fits the length byte
    assert RegistrationRequest.decode(_rrq(extensions=[NaiExtension("x" * 255)]).encode())


# ============================================================================================
# Reply codes (RFC 5944 §3.4)
# ============================================================================================


def test_reply_code_numbers_are_rfc5944():
    numbers = {int(c) for c in ReplyCode}
    assert numbers == {0, 1, *range(64, 83), 88, *range(128, 137), 142}  # 142: RFC 5177
    assert ReplyCode.HA_PREFIX_NOT_AUTHORIZED == 142
    assert ReplyCode.FA_REASON_UNSPECIFIED == 64
    assert ReplyCode.FA_MN_FAILED_AUTH == 67
    assert ReplyCode.FA_LIFETIME_TOO_LONG == 69
    assert ReplyCode.FA_POORLY_FORMED_REQUEST == 70
    assert ReplyCode.FA_ENCAPSULATION_UNAVAILABLE == 72
    assert ReplyCode.FA_INVALID_COA == 77
    assert ReplyCode.FA_REGISTRATION_TIMEOUT == 78
    assert ReplyCode.FA_HOME_NETWORK_UNREACHABLE == 80
    assert ReplyCode.FA_HA_PORT_UNREACHABLE == 82
    assert ReplyCode.FA_HA_UNREACHABLE == 88
    assert ReplyCode.HA_REASON_UNSPECIFIED == 128
    assert ReplyCode.HA_MN_FAILED_AUTH == 131
    assert ReplyCode.HA_FA_FAILED_AUTH == 132
    assert ReplyCode.HA_IDENTIFICATION_MISMATCH == 133
    assert ReplyCode.HA_POORLY_FORMED_REQUEST == 134
    assert ReplyCode.HA_TOO_MANY_SIMULTANEOUS_BINDINGS == 135
    assert ReplyCode.HA_UNKNOWN_HA_ADDRESS == 136


@pytest.mark.parametrize("code", list(ReplyCode), ids=lambda c: c.name)
def test_reply_code_accepted_and_by_foreign_agent(code):
    assert code.accepted == (int(code) in (0, 1))
    assert code.by_foreign_agent == (64 <= int(code) <= 88)
    assert not (code.accepted and code.by_foreign_agent)
    reply = RegistrationReply.decode(_rrp(code=code).encode())
    assert reply.code is code
    assert reply.accepted == code.accepted


# ============================================================================================
# Agent advertisement / solicitation (RFC 5944 §2, RFC 1256)
# ============================================================================================


def _adv(**kw) -> AgentAdvertisement:
    fields = dict(
        sequence=7, registration_lifetime=300, flags=AdvFlags.F | AdvFlags.G | AdvFlags.R,
        care_of_addresses=[COA, "192.0.2.2"], router_addresses=[("192.0.2.254", -5)],
        lifetime=1800, code=0,
    )
    fields.update(kw)
    return AgentAdvertisement(**fields)


def _with_checksum(data: bytes) -> bytes:
    msg = bytearray(data)
    msg[2:4] = b"\x00\x00"
    struct.pack_into("!H", msg, 2, internet_checksum(bytes(msg)))
    return bytes(msg)


# type 9 | code 0 | checksum | 1 address | entry size 2 | lifetime 1800
# router 192.0.2.254 preference -5
# ext 16 | length 10 | sequence 7 | reg lifetime 300 | R F G = 0x9400 | CoA 192.0.2.1
ADV_HEX = (
    "09 00 0000 01 02 0708"
    " c00002fe fffffffb"
    " 10 0a 0007 012c 9400 c0000201"
)


def test_advertisement_layout_hand_written():
    expected = _with_checksum(_h(ADV_HEX))
    adv = _adv(care_of_addresses=[COA])
    assert adv.encode() == expected
    assert internet_checksum(expected) == 0
    assert AgentAdvertisement.decode(expected) == adv


@pytest.mark.parametrize(
    "flag, value",
    [("R", 0x8000), ("B", 0x4000), ("H", 0x2000), ("F", 0x1000), ("M", 0x0800),
     ("G", 0x0400), ("r", 0x0200), ("T", 0x0100), ("U", 0x0080), ("X", 0x0040),
     ("I", 0x0020)],
)
def test_advertisement_flag_bits_in_rfc_order(flag, value):
    wire = _adv(flags=AdvFlags[flag], router_addresses=[]).encode()
    assert struct.unpack_from("!H", wire, 8 + 6)[0] == value


@pytest.mark.parametrize(
    "adv",
    [
        _adv(),
        _adv(code=16, router_addresses=[], care_of_addresses=[]),
        _adv(prefix_lengths=[24]),
        _adv(prefix_lengths=[]),
        _adv(unknown_extensions=[(200, b"abc"), (128, b"")]),
        _adv(router_addresses=[("10.0.0.1", 0), ("10.0.0.2", (1 << 31) - 1),
                               ("10.0.0.3", -(1 << 31))], flags=AdvFlags(0xFFFF)),
        _adv(sequence=0xFFFF, registration_lifetime=0xFFFF, lifetime=0,
             care_of_addresses=[f"10.0.{i}.1" for i in range(62)]),
    ],
)
def test_advertisement_round_trip(adv):
    wire = adv.encode()
    assert internet_checksum(wire) == 0
    back = AgentAdvertisement.decode(wire)
    assert back == adv
    assert back.encode() == wire
    assert decode_discovery(wire) == adv


def test_advertisement_checksum_is_verified():
    wire = bytearray(_adv().encode())
    wire[-1] ^= 0x01
    with pytest.raises(MalformedMessage, match="checksum"):
        AgentAdvertisement.decode(bytes(wire))
    with pytest.raises(MalformedMessage, match="checksum"):
        decode_discovery(bytes(wire))
    # the caller may opt out (e.g. the kernel already checked it)
    adv = AgentAdvertisement.decode(bytes(wire), verify_checksum=False)
    assert adv.care_of_addresses[-1] == "192.0.2.3"
    for i in range(len(wire)):
        flipped = bytearray(_adv().encode())
        flipped[i] ^= 0x40
        with pytest.raises(MalformedMessage):
            AgentAdvertisement.decode(bytes(flipped))


def test_advertisement_codec_has_no_ip_header_ttl_is_the_senders():
    # The codec produces the ICMP message only: it starts with the ICMP type, and nothing in
    # it is an IP header (no TTL to set or check here; the sender sets TTL 1).
    wire = _adv().encode()
    assert wire[0] == 9
    assert not hasattr(_adv(), "ttl")
    assert AgentAdvertisement.decode(wire) == _adv()


@pytest.mark.parametrize("code, ok", [(0, True), (16, True), (1, False), (8, False), (255, False)])
def test_advertisement_code_must_be_0_or_16(code, ok):
    wire = _with_checksum(_h(ADV_HEX)[:1] + bytes((code,)) + _h(ADV_HEX)[2:])
    if ok:
        assert AgentAdvertisement.decode(wire).code == code
    else:
        with pytest.raises(MalformedMessage, match="neither 0 nor 16"):
            AgentAdvertisement.decode(wire)


@pytest.mark.parametrize("size", [0, 1, 3, 4])
def test_advertisement_bad_entry_size(size):
    wire = bytearray(_h(ADV_HEX))
    wire[5] = size
    with pytest.raises(MalformedMessage, match="entry size"):
        AgentAdvertisement.decode(_with_checksum(bytes(wire)))


def test_advertisement_without_mobility_extension_is_malformed():
    plain_router_adv = _with_checksum(_h("09 00 0000 01 02 0708 c00002fe 00000000"))
    with pytest.raises(MalformedMessage, match="without a mobility agent extension"):
        AgentAdvertisement.decode(plain_router_adv)
    only_unknown = _with_checksum(_h("09 00 0000 00 02 0708 c8 01 00"))
    with pytest.raises(MalformedMessage, match="without a mobility agent extension"):
        AgentAdvertisement.decode(only_unknown)


def test_advertisement_pad_bytes_are_skipped():
    base = _h(ADV_HEX)
    padded = _with_checksum(base[:16] + b"\x00\x00\x00" + base[16:] + b"\x00" + _h("13 01 18")
                            + b"\x00")
    adv = AgentAdvertisement.decode(padded)
    assert adv == _adv(care_of_addresses=[COA], prefix_lengths=[24])


def test_advertisement_prefix_lengths():
    base = _h(ADV_HEX)
    wire = _with_checksum(base + _h("13 01 18"))
    assert AgentAdvertisement.decode(wire).prefix_lengths == [24]
    assert AgentAdvertisement.decode(_with_checksum(base)).prefix_lengths is None
    with pytest.raises(MalformedMessage, match="prefix length > 32"):
        AgentAdvertisement.decode(_with_checksum(base + _h("13 01 21")))
    with pytest.raises(MalformedMessage, match="before the mobility"):
        before = base[:16] + _h("13 01 18") + base[16:]
        AgentAdvertisement.decode(_with_checksum(before))
    with pytest.raises(MalformedMessage, match="prefix length"):
        _adv(prefix_lengths=[256]).encode()


@pytest.mark.parametrize(
    "tail, reason",
    [
        (_h("13"), "truncated extension header"),
        (_h("13 05 18"), "runs past"),
        (_h("28 00"), "non-skippable"),
        (_h("10 06 0000 0000 0000"), "two mobility agent extensions"),
    ],
)
def test_advertisement_bad_extensions(tail, reason):
    with pytest.raises(MalformedMessage, match=reason):
        AgentAdvertisement.decode(_with_checksum(_h(ADV_HEX) + tail))


@pytest.mark.parametrize("length", [0, 5, 7, 9, 11])
def test_advertisement_bad_mobility_extension_length(length):
    body = bytes(length)
    wire = _with_checksum(_h("09 00 0000 00 02 0708 10") + bytes((length,)) + body)
    with pytest.raises(MalformedMessage, match="mobility agent extension length"):
        AgentAdvertisement.decode(wire)


def test_advertisement_router_addresses_must_fit():
    wire = bytearray(_h(ADV_HEX))
    wire[4] = 5
    with pytest.raises(MalformedMessage, match="do not fit"):
        AgentAdvertisement.decode(_with_checksum(bytes(wire)))


def test_advertisement_short_or_wrong_type():
    with pytest.raises(MalformedMessage, match="< 8"):
        AgentAdvertisement.decode(_h(ADV_HEX)[:7])
    with pytest.raises(MalformedMessage, match="not an advertisement"):
        AgentAdvertisement.decode(_with_checksum(_h("0a") + _h(ADV_HEX)[1:]))
    with pytest.raises(MalformedMessage, match="not agent discovery"):
        decode_discovery(_with_checksum(_h("08") + _h(ADV_HEX)[1:]))
    with pytest.raises(MalformedMessage, match="empty"):
        decode_discovery(b"")


def test_advertisement_encode_rejects_bad_values():
    with pytest.raises(MalformedMessage, match="care-of address"):
        _adv(care_of_addresses=["300.1.1.1"]).encode()
    with pytest.raises(MalformedMessage, match="sequence"):
        _adv(sequence=1 << 16).encode()
    with pytest.raises(MalformedMessage, match="preference"):
        _adv(router_addresses=[("10.0.0.1", 1 << 31)]).encode()
    with pytest.raises(MalformedMessage, match="too many care-of"):
        _adv(care_of_addresses=[COA] * 63).encode()


def test_solicitation_round_trip_and_layout():
    wire = AgentSolicitation().encode()
    assert wire == _with_checksum(_h("0a 00 0000 00000000"))
    assert wire == _h("0a 00 f5ff 00000000")
    assert AgentSolicitation.decode(wire) == AgentSolicitation()
    assert isinstance(decode_discovery(wire), AgentSolicitation)


def test_solicitation_strict():
    with pytest.raises(MalformedMessage, match="< 8"):
        AgentSolicitation.decode(_h("0a 00 f5ff"))
    with pytest.raises(MalformedMessage, match="not a solicitation"):
        AgentSolicitation.decode(_with_checksum(_h("0a 01 0000 00000000")))
    with pytest.raises(MalformedMessage, match="not a solicitation"):
        AgentSolicitation.decode(_with_checksum(_h("09 00 0000 00000000")))
    with pytest.raises(MalformedMessage, match="checksum"):
        AgentSolicitation.decode(_h("0a 00 f5fe 00000000"))
    assert AgentSolicitation.decode(_h("0a 00 f5fe 00000000"), verify_checksum=False)


# ============================================================================================
# Control protocol
# ============================================================================================


def test_control_layout_and_round_trip():
    msg = ControlMessage(ControlType.LEASE_REQUEST, 0x01020304, {"a": [1, 2.5, None, True, "é"]})
    wire = msg.encode()
    body = b'{"a":[1,2.5,null,true,"\\u00e9"]}'
    assert wire == b"MO" + _h("01 03 01020304") + struct.pack("!I", len(body)) + body
    assert ControlMessage.decode(wire) == msg
    assert frame_length(wire) == len(wire) == HEADER.size + len(body)
    assert frame_length(wire[: HEADER.size]) == len(wire)


@pytest.mark.parametrize("ctype", list(ControlType), ids=lambda t: t.name)
def test_control_round_trip_every_type(ctype):
    msg = ControlMessage(ctype, 0xFFFFFFFF, {"nested": {"k": [{}]}, "n": -3})
    assert ControlMessage.decode(msg.encode()) == msg


def _control(body: bytes, magic=b"MO", version=1, mtype=1, length=None) -> bytes:
    n = len(body) if length is None else length
    return HEADER.pack(magic, version, mtype, 42, n) + body


@pytest.mark.parametrize(
    "wire, reason",
    [
        (_control(b"{}", magic=b"MX"), "magic"),
        (_control(b"{}", version=2), "version"),
        (_control(b"{}", version=0), "version"),
        (_control(b"{}", mtype=200), "unknown control message type"),
        (_control(b"[]"), "not a JSON object"),
        (_control(b'"x"'), "not a JSON object"),
        (_control(b"null"), "not a JSON object"),
        (_control(b'{"x": NaN}'), "NaN"),
        (_control(b'{"x": Infinity}'), "Infinity"),
        (_control(b'{"x": -Infinity}'), "Infinity"),
        (_control(b'{"x": 1e400}'), "finite"),
        (_control(b'{"x": '), "not JSON"),
        (_control(b'{"x": "\xff"}'), "not JSON"),
        (_control(b""), "not JSON"),
        (_control(b"{}", length=3), "header says"),
        (_control(b"{}", length=1), "header says"),
        (_control(b"{}") + b" ", "header says"),
        (_control(b"{}")[:11], "needs 12 bytes"),
        (_control(b"[" * 100_000 + b"]" * 100_000), "not JSON"),
    ],
)
def test_control_strict_decoding(wire, reason):
    with pytest.raises(MalformedMessage, match=reason):
        ControlMessage.decode(wire)


def test_control_body_over_max_is_refused_by_frame_length():
    head = HEADER.pack(b"MO", 1, 1, 1, MAX_BODY + 1)
    with pytest.raises(MalformedMessage, match="> 1048576"):
        frame_length(head)
    with pytest.raises(MalformedMessage, match="> 1048576"):
        ControlMessage.decode(head)
    assert frame_length(HEADER.pack(b"MO", 1, 1, 1, MAX_BODY)) == HEADER.size + MAX_BODY
    with pytest.raises(MalformedMessage, match="control body"):
        ControlMessage(ControlType.ERROR, 1, {"x": "a" * MAX_BODY}).encode()


def test_control_encode_rejects_bad_values():
    with pytest.raises(MalformedMessage, match="txid"):
        ControlMessage(ControlType.ERROR, 1 << 32).encode()
    with pytest.raises(ValueError):
        ControlMessage(ControlType.ERROR, 1, {"x": float("nan")}).encode()


def test_control_body_is_compact_json():
    wire = ControlMessage(ControlType.PROVISION, 7, {"a": 1, "b": "x"}).encode()
    assert json.loads(wire[HEADER.size:]) == {"a": 1, "b": "x"}
    assert b" " not in wire[HEADER.size:]


# ============================================================================================
# GRE (RFC 2784 / RFC 2890)
# ============================================================================================

PAYLOAD = b"\x45\x00\x00\x14" + bytes(16)


@pytest.mark.parametrize(
    "hdr, head_hex",
    [
        (GreHeader(), "0000 0800"),
        (GreHeader(key=0x01020304), "2000 0800 01020304"),
        (GreHeader(sequence=9), "1000 0800 00000009"),
        (GreHeader(key=1, sequence=2), "3000 0800 00000001 00000002"),
        (GreHeader(protocol=0x86DD, key=0xFFFFFFFF), "2000 86dd ffffffff"),
    ],
)
def test_gre_layout_and_round_trip(hdr, head_hex):
    wire = hdr.encode(PAYLOAD)
    assert wire == _h(head_hex) + PAYLOAD
    assert hdr.length == len(_h(head_hex))
    assert decode_gre(wire) == (hdr, PAYLOAD)


def test_gre_checksum_valid_and_corrupted():
    hdr = GreHeader(key=7, sequence=1, checksum=True)
    wire = hdr.encode(PAYLOAD + b"\x01")  # odd length: checksum pads
    assert wire[:2] == _h("b000")
    assert wire[6:8] == b"\x00\x00"  # reserved1
    assert internet_checksum(wire) == 0
    assert decode_gre(wire) == (hdr, PAYLOAD + b"\x01")
    assert hdr.length == 16
    bad = bytearray(wire)
    bad[-1] ^= 0xFF
    with pytest.raises(MalformedMessage, match="checksum"):
        decode_gre(bytes(bad))
    assert decode_gre(bytes(bad), verify_checksum=False)[0] == hdr
    bad = bytearray(wire)
    bad[4] ^= 0x01
    with pytest.raises(MalformedMessage, match="checksum"):
        decode_gre(bytes(bad))


@pytest.mark.parametrize("version", range(1, 8))
def test_gre_version_not_zero_rejected(version):
    wire = struct.pack("!HH", version, 0x0800) + PAYLOAD
    with pytest.raises(MalformedMessage, match="version"):
        decode_gre(wire)


@pytest.mark.parametrize("bit", [0x4000, 0x0800, 0x0400, 0x0100, 0x0080, 0x0008])
def test_gre_reserved_bits_rejected(bit):
    wire = struct.pack("!HH", bit, 0x0800) + PAYLOAD
    with pytest.raises(MalformedMessage, match="reserved"):
        decode_gre(wire)


def test_gre_short_packets():
    with pytest.raises(MalformedMessage, match="< 4"):
        decode_gre(b"\x00\x00\x08")
    with pytest.raises(MalformedMessage, match="needs 12 bytes"):
        decode_gre(_h("3000 0800 00000001 0000"))
    assert decode_gre(_h("0000 0800")) == (GreHeader(), b"")


def test_gre_encode_rejects_overflow():
    with pytest.raises(MalformedMessage, match="key"):
        GreHeader(key=1 << 32).encode(b"")
    with pytest.raises(MalformedMessage, match="sequence"):
        GreHeader(sequence=-1).encode(b"")
    with pytest.raises(MalformedMessage, match="protocol"):
        GreHeader(protocol=1 << 16).encode(b"")


def test_gre_payload_is_opaque_and_key_carries_binding_id():
    # a registration inside a GRE payload is just bytes to the GRE codec
    inner = append_auth(_rrq().encode(), ExtType.MOBILE_HOME_AUTH, 256, b"k")
    hdr, payload = decode_gre(GreHeader(key=12345).encode(inner))
    assert hdr.key == 12345 and payload == inner


def test_gre_key_nvse_layout_and_strictness() -> None:
    from packets import GreKey

    raw = encode_extension(GreKey(0x01020304))
    # type 134, length 12, reserved 0, vendor 32473, nvse type 3, key
    assert raw == bytes([134, 12, 0, 0]) + MOAT_VENDOR_ID.to_bytes(4, "big") + b"\x00\x03\x01\x02\x03\x04"
    assert decode_extensions(raw, 0)[0] == [GreKey(0x01020304)]
    with pytest.raises(MalformedMessage, match="GRE-key"):
        decode_extensions(bytes([134, 10, 0, 0]) + MOAT_VENDOR_ID.to_bytes(4, "big") + b"\x00\x03\x01\x02", 0)


# --- the mobile-network NVSE (NEMO, RFC 5177; issue 11) ------------------------------------


def test_mobile_network_nvse_round_trip_and_checks():
    from packets import MobileNetwork, NaiExtension
    from packets.extensions import decode_extensions, encode_extension

    ext = MobileNetwork("10.16.0.224", 30)
    raw = encode_extension(NaiExtension("svc@home")) + encode_extension(ext)
    decoded, _ = decode_extensions(raw, 0)
    assert decoded[1] == ext and str(decoded[1].network) == "10.16.0.224/30"
    with pytest.raises(MalformedMessage):
        MobileNetwork("10.16.0.225", 30)  # host bits set
    with pytest.raises(MalformedMessage):
        MobileNetwork("10.16.0.0", 16)  # wider than MOAT allows
    bad = bytearray(encode_extension(ext))
    bad[1] -= 1  # one byte short
    with pytest.raises(MalformedMessage):
        decode_extensions(bytes(bad[:-1]), 0)
