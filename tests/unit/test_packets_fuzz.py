"""Property-based fuzzing of every MOAT decoder (README.md, "Wire protocol": every decoder is
strict: bad input raises one error type with a reason, never anything else).

Each decoder gets (a) random byte strings and (b) mutations of valid encoded messages (byte
flips, truncation, insertion, deletion, length-byte edits; advertisements get their checksum
recomputed after mutating so the mutation reaches the parser). Whatever is thrown at it, a
decoder returns a value or raises MalformedMessage. Anything that decodes re-encodes to bytes
that decode to an equal message: decode(encode(decode(x))) == decode(x).

(c) Valid messages must decode: for every codec, messages built by the encoder from random
fields within range decode, through every decoder that takes them, to an object equal to
the one encoded (issue 12: without this, a decoder that refused everything would pass (a)
and (b); ``test_a_decoder_that_refuses_everything_fails_the_valid_properties`` shows it does
not).

Examples per test are fixed and derandomized so CI runs the same cases every time. The unit
suite runs about FUZZ_TOTAL examples over this file (a few seconds); ``MOAT_FUZZ_EXAMPLES``
sets another total (``MOAT_FUZZ_EXAMPLES=100000`` for a long run), shared out in the same
proportions (see TOTAL_EXAMPLES and its test).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import struct

import pytest

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
    RequestFlags,
    UnknownExtension,
    VendorExtension,
    MobileNetwork,
    GreKey,
    append_auth,
    decode_discovery,
    decode_gre,
    decode_registration,
)
from packets._wire import internet_checksum
from packets.codes import MOAT_VENDOR_ID
from packets.control import HEADER, frame_length

#: Examples over this file by default: a few seconds of the unit suite.
DEFAULT_TOTAL = 1200
FUZZ_TOTAL = int(os.environ.get("MOAT_FUZZ_EXAMPLES", DEFAULT_TOTAL))
#: Each test's share of the total (parts of SHARES_SUM).
SHARES = {"random": 20, "prefixed": 20, "registration": 20, "advert": 20, "solicit": 3,
          "control": 20, "gre": 20, "valid_registration": 10, "valid_advert": 6,
          "valid_control": 6, "valid_gre": 6}
SHARES_SUM = sum(SHARES.values())


def share(part: str) -> int:
    """This test's examples: its share of FUZZ_TOTAL, at least 10."""
    return max(10, -(-FUZZ_TOTAL * SHARES[part] // SHARES_SUM))


N_RANDOM = share("random")
N_PREFIXED = share("prefixed")
N_REGISTRATION = share("registration")
N_ADVERT = share("advert")
N_SOLICIT = share("solicit")
N_CONTROL = share("control")
N_GRE = share("gre")
N_VALID_REGISTRATION = share("valid_registration")
N_VALID_ADVERT = share("valid_advert")
N_VALID_CONTROL = share("valid_control")
N_VALID_GRE = share("valid_gre")
TOTAL_EXAMPLES = (
    N_RANDOM + N_PREFIXED + N_REGISTRATION + N_ADVERT + N_SOLICIT + N_CONTROL + N_GRE
    + N_VALID_REGISTRATION + N_VALID_ADVERT + N_VALID_CONTROL + N_VALID_GRE
)


def fuzz_settings(n: int):
    return settings(
        max_examples=n,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# --------------------------------------------------------------------------------------------
# Decoders and the round-trip property
# --------------------------------------------------------------------------------------------


def _redecode_registration(msg):
    return type(msg).decode(msg.encode())


def _redecode_discovery(msg):
    return type(msg).decode(msg.encode())


def _redecode_gre(result):
    hdr, payload = result
    return decode_gre(hdr.encode(payload))


DECODERS = {
    # name: (decoder, re-decode of what it returned or None when there is nothing to encode)
    "decode_registration": (decode_registration, _redecode_registration),
    "RegistrationRequest.decode": (RegistrationRequest.decode, _redecode_registration),
    "RegistrationReply.decode": (RegistrationReply.decode, _redecode_registration),
    "AgentAdvertisement.decode": (AgentAdvertisement.decode, _redecode_discovery),
    "AgentAdvertisement.decode(no checksum)": (
        lambda d: AgentAdvertisement.decode(d, verify_checksum=False), _redecode_discovery,
    ),
    "decode_discovery": (decode_discovery, _redecode_discovery),
    "decode_discovery(no checksum)": (
        lambda d: decode_discovery(d, verify_checksum=False), _redecode_discovery,
    ),
    "AgentSolicitation.decode": (AgentSolicitation.decode, _redecode_discovery),
    "ControlMessage.decode": (ControlMessage.decode, lambda m: ControlMessage.decode(m.encode())),
    "frame_length": (frame_length, None),
    "decode_gre": (decode_gre, _redecode_gre),
    "decode_gre(no checksum)": (lambda d: decode_gre(d, verify_checksum=False), _redecode_gre),
}


def check(name: str, data: bytes) -> bool:
    """Run one decoder: a value or MalformedMessage, never anything else; then round trip.

    Returns True when the input decoded.
    """
    decode, redecode = DECODERS[name]
    try:
        value = decode(data)
    except MalformedMessage as exc:
        assert isinstance(exc.reason, str) and exc.reason
        return False
    # any other exception propagates and fails the test with the input hypothesis found
    if redecode is not None:
        again = redecode(value)
        assert again == value, (name, data)
    else:
        assert isinstance(value, int) and value >= HEADER.size
    return True


def check_all(data: bytes) -> None:
    for name in DECODERS:
        check(name, data)


# --------------------------------------------------------------------------------------------
# (a) random byte strings
# --------------------------------------------------------------------------------------------

# First bytes each decoder dispatches on, so random tails get past the first check.
PREFIXES = [
    b"\x01", b"\x03", b"\x01\x88", b"\x03\x00",
    b"\x09\x00", b"\x09\x10", b"\x09\x00\x00\x00\x00\x02", b"\x0a\x00",
    b"MO\x01", b"MO\x01\x01",
    b"\x00\x00\x08\x00", b"\x20\x00", b"\x10\x00", b"\x80\x00", b"\xb0\x00",
]


@fuzz_settings(N_RANDOM)
@given(st.binary(max_size=300))
def test_random_bytes_every_decoder(data):
    check_all(data)


@fuzz_settings(N_PREFIXED)
@given(st.sampled_from(PREFIXES), st.binary(max_size=200))
def test_random_bytes_with_valid_first_bytes_every_decoder(prefix, tail):
    check_all(prefix + tail)
    # advertisements and solicitations: also with a valid checksum so the parser runs
    data = prefix + tail
    if len(data) >= 4 and data[0] in (9, 10):
        check_all(_fix_icmp_checksum(data))


# --------------------------------------------------------------------------------------------
# (b) mutations of valid messages
# --------------------------------------------------------------------------------------------


def mutate(draw, data: bytes, length_offsets: list[int], min_ops: int = 1) -> bytes:
    """Apply ``min_ops``-4 random mutations; ``length_offsets`` are where length fields live."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(min_ops, 4))):
        op = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete", "length"]))
        if op == "flip" and buf:
            i = draw(st.integers(0, len(buf) - 1))
            buf[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and buf:
            i = draw(st.integers(0, len(buf) - 1))
            buf[i] = draw(st.integers(0, 255))
        elif op == "truncate":
            del buf[draw(st.integers(0, len(buf))):]
        elif op == "insert":
            i = draw(st.integers(0, len(buf)))
            buf[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and buf:
            i = draw(st.integers(0, len(buf) - 1))
            del buf[i : i + draw(st.integers(1, 8))]
        elif op == "length":
            valid = [o for o in length_offsets if o < len(buf)]
            if valid:
                i = draw(st.sampled_from(valid))
                buf[i] = draw(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 255, (buf[i] + 1) & 0xFF,
                                               (buf[i] - 1) & 0xFF]))
    return bytes(buf)


def _fix_icmp_checksum(data: bytes) -> bytes:
    if len(data) < 4:
        return data
    buf = bytearray(data)
    buf[2:4] = b"\x00\x00"
    struct.pack_into("!H", buf, 2, internet_checksum(bytes(buf)))
    return bytes(buf)


# --- registrations ---------------------------------------------------------------------------

ipv4 = st.builds(
    lambda n: ".".join(str(b) for b in n.to_bytes(4, "big")), st.integers(0, 2**32 - 1)
)
name_text = st.text(min_size=1, max_size=40)
extension = st.one_of(
    st.builds(NaiExtension, name_text),
    st.builds(CareOfName, name_text),
    st.builds(ObjectPart, st.sampled_from(list(PartRole)), st.integers(0, 0xFFFF),
              st.text(max_size=40)),
    st.builds(VendorExtension, st.integers(0, 2**32 - 1).filter(lambda v: v != MOAT_VENDOR_ID),
              st.integers(0, 0xFFFF), st.binary(max_size=40)),
    st.builds(GreKey, st.integers(0, 2**32 - 1)),
    st.builds(VendorExtension, st.just(MOAT_VENDOR_ID), st.integers(5, 0xFFFF),
              st.binary(max_size=40)),
    st.builds(lambda n, length: MobileNetwork(
                  str(ipaddress.IPv4Network((n, length), strict=False).network_address), length),
              st.integers(0, 2**32 - 1), st.integers(24, 32)),
    st.builds(UnknownExtension,
              st.integers(128, 255).filter(lambda t: t not in (ExtType.MN_NAI, ExtType.NVSE)),
              st.binary(max_size=40)),
    st.builds(AuthExtension,
              st.sampled_from([ExtType.MOBILE_HOME_AUTH, ExtType.MOBILE_FOREIGN_AUTH,
                               ExtType.FOREIGN_HOME_AUTH]),
              st.integers(0, 2**32 - 1), st.binary(max_size=40)),
)
requests = st.builds(
    RegistrationRequest, ipv4, ipv4, ipv4, st.integers(0, 2**64 - 1), st.integers(0, 0xFFFF),
    st.builds(RequestFlags, st.integers(0, 255)), st.lists(extension, max_size=5),
)
replies = st.builds(
    RegistrationReply, st.integers(0, 255), ipv4, ipv4, st.integers(0, 2**64 - 1),
    st.integers(0, 0xFFFF), st.lists(extension, max_size=5),
)


def _ext_length_offsets(data: bytes, start: int) -> list[int]:
    offsets, pos = [], start
    while pos + 1 < len(data):
        offsets.append(pos + 1)
        pos += 2 + data[pos + 1]
    return offsets


@st.composite
def mutated_registrations(draw):
    msg = draw(st.one_of(requests, replies))
    wire = msg.encode()
    if draw(st.booleans()):  # real authenticators, as agents send them
        wire = append_auth(wire, ExtType.MOBILE_HOME_AUTH, draw(st.integers(256, 2**32 - 1)),
                           b"k")
        if draw(st.booleans()):
            wire = append_auth(wire, ExtType.MOBILE_FOREIGN_AUTH, 300, b"f")
    # the unmutated message must round trip exactly
    assert type(msg).decode(wire).encode() == wire
    fixed = msg.FIXED_LEN
    return mutate(draw, wire, [2, 3] + _ext_length_offsets(wire, fixed))


@fuzz_settings(N_REGISTRATION)
@given(mutated_registrations())
def test_mutated_registrations(data):
    for name in ("decode_registration", "RegistrationRequest.decode",
                 "RegistrationReply.decode"):
        check(name, data)


# --- advertisements --------------------------------------------------------------------------

advertisements = st.builds(
    AgentAdvertisement,
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFF),
    st.builds(AdvFlags, st.integers(0, 0xFFFF)),
    st.lists(ipv4, max_size=8),
    st.lists(st.tuples(ipv4, st.integers(-(2**31), 2**31 - 1)), max_size=4),
    st.integers(0, 0xFFFF),
    st.sampled_from([0, 16]),
    st.one_of(st.none(), st.lists(st.integers(0, 32), max_size=4)),
    st.lists(st.tuples(st.integers(128, 255), st.binary(max_size=20)), max_size=3),
)


@st.composite
def mutated_advertisements(draw):
    adv = draw(advertisements)
    wire = adv.encode()
    assert AgentAdvertisement.decode(wire) == adv
    ext_start = 8 + 8 * len(adv.router_addresses)
    wire = mutate(draw, wire, [4, 5] + _ext_length_offsets(wire, ext_start))
    if draw(st.integers(0, 9)):  # mostly: recompute so the mutation reaches the parser
        wire = _fix_icmp_checksum(wire)
    return wire


@fuzz_settings(N_ADVERT)
@given(mutated_advertisements())
def test_mutated_advertisements(data):
    for name in ("AgentAdvertisement.decode", "AgentAdvertisement.decode(no checksum)",
                 "decode_discovery", "decode_discovery(no checksum)"):
        check(name, data)


@fuzz_settings(N_SOLICIT)
@given(st.data())
def test_mutated_solicitations(data):
    wire = mutate(data.draw, AgentSolicitation().encode(), [])
    if data.draw(st.booleans()):
        wire = _fix_icmp_checksum(wire)
    for name in ("AgentSolicitation.decode", "decode_discovery",
                 "decode_discovery(no checksum)"):
        check(name, wire)


# --- control ---------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12,
)
controls = st.builds(
    ControlMessage, st.sampled_from(list(ControlType)), st.integers(0, 2**32 - 1),
    st.dictionaries(st.text(max_size=10), json_values, max_size=5),
)


@st.composite
def mutated_controls(draw):
    msg = draw(controls)
    wire = msg.encode()
    assert ControlMessage.decode(wire) == msg
    # length field edits: rewrite the 4-byte body length now and then
    if draw(st.integers(0, 4)) == 0:
        buf = bytearray(wire)
        struct.pack_into("!I", buf, 8, draw(st.sampled_from(
            [0, len(wire) - 12 + 1, len(wire) - 12 - 1, 2**20, 2**20 + 1, 2**32 - 1])))
        wire = bytes(buf)
    # JSON-level edits that stay well framed
    if draw(st.integers(0, 4)) == 0:
        body = draw(st.sampled_from([
            b'{"a":NaN}', b'{"a":[-Infinity]}', b'{"a":1e999}', b'{"a":-1E400}', b"1e999",
            b"[1,2]", b'{"a":', b'{"a":1}x', b"\xff\xfe",
            b'{"\\ud800":1}', b'{"a":' + b"[" * 5000 + b"]" * 5000 + b"}", b'{"a":1,"a":2}',
            b'{"a":' + b"9" * 5000 + b"}", b" {} ", b"\xef\xbb\xbf{}",
        ]))
        wire = HEADER.pack(b"MO", 1, int(msg.type), msg.txid, len(body)) + body
    # min_ops=0: the well-framed JSON edits above must reach the JSON parser unbroken
    return mutate(draw, wire, [8, 9, 10, 11], min_ops=0)


@fuzz_settings(N_CONTROL)
@given(mutated_controls())
def test_mutated_control(data):
    check("ControlMessage.decode", data)
    check("frame_length", data)


# --- GRE -------------------------------------------------------------------------------------

gre_headers = st.builds(
    GreHeader, st.integers(0, 0xFFFF), st.one_of(st.none(), st.integers(0, 2**32 - 1)),
    st.one_of(st.none(), st.integers(0, 2**32 - 1)), st.booleans(),
)


@fuzz_settings(N_GRE)
@given(gre_headers, st.binary(max_size=60), st.data())
def test_mutated_gre(hdr, payload, data):
    wire = hdr.encode(payload)
    assert decode_gre(wire) == (hdr, payload)
    wire = mutate(data.draw, wire, [0, 1])
    check("decode_gre", wire)
    check("decode_gre(no checksum)", wire)


# --------------------------------------------------------------------------------------------


def test_suite_runs_the_examples_asked_for():
    """The tests together run at least FUZZ_TOTAL examples (MOAT_FUZZ_EXAMPLES or the
    default), every test some."""
    assert TOTAL_EXAMPLES >= FUZZ_TOTAL >= 1
    assert min(N_RANDOM, N_SOLICIT, N_VALID_GRE) >= 10


# --------------------------------------------------------------------------------------------
# (c) valid messages decode, to what was encoded
# --------------------------------------------------------------------------------------------


def expect_decodes(name: str, data: bytes, expected) -> None:
    """Decoder ``name`` must take ``data`` (a valid message) and return ``expected``."""
    decode, _redecode = DECODERS[name]
    try:
        value = decode(data)
    except MalformedMessage as exc:
        raise AssertionError(f"{name} refused a valid message: {exc.reason}") from None
    assert value == expected, (name, value, expected)


@fuzz_settings(N_VALID_REGISTRATION)
@given(st.one_of(requests, replies), st.sampled_from([None, "home", "home+foreign"]),
       st.integers(256, 2**32 - 1))
def test_valid_registrations_decode_to_what_was_encoded(msg, auth, spi):
    name = "RegistrationRequest.decode" if isinstance(msg, RegistrationRequest) \
        else "RegistrationReply.decode"
    wire = msg.encode()
    added = []
    if auth is not None:  # real authenticators, as agents send them: the last extensions
        wire = append_auth(wire, ExtType.MOBILE_HOME_AUTH, spi, b"k")
        added.append(AuthExtension(ExtType.MOBILE_HOME_AUTH, spi, wire[-32:]))
        if auth == "home+foreign":
            wire = append_auth(wire, ExtType.MOBILE_FOREIGN_AUTH, 300, b"f")
            added.append(AuthExtension(ExtType.MOBILE_FOREIGN_AUTH, 300, wire[-32:]))
    expected = dataclasses.replace(msg, extensions=[*msg.extensions, *added])
    expect_decodes(name, wire, expected)
    expect_decodes("decode_registration", wire, expected)


@fuzz_settings(N_VALID_ADVERT)
@given(advertisements)
def test_valid_advertisements_decode_to_what_was_encoded(adv):
    wire = adv.encode()
    for name in ("AgentAdvertisement.decode", "AgentAdvertisement.decode(no checksum)",
                 "decode_discovery", "decode_discovery(no checksum)"):
        expect_decodes(name, wire, adv)


def test_a_solicitation_decodes():
    wire = AgentSolicitation().encode()
    for name in ("AgentSolicitation.decode", "decode_discovery",
                 "decode_discovery(no checksum)"):
        decode, _ = DECODERS[name]
        assert isinstance(decode(wire), AgentSolicitation), name


@fuzz_settings(N_VALID_CONTROL)
@given(st.lists(controls, min_size=1, max_size=3))
def test_valid_control_messages_decode_to_what_was_encoded(msgs):
    stream = b""
    for msg in msgs:
        wire = msg.encode()
        expect_decodes("ControlMessage.decode", wire, msg)
        expect_decodes("frame_length", wire, len(wire))
        stream += wire
    # Back to back on TCP: frame_length splits the stream into the same messages.
    got, pos = [], 0
    while pos < len(stream):
        end = pos + frame_length(stream[pos:])
        got.append(ControlMessage.decode(stream[pos:end]))
        pos = end
    assert got == msgs


@fuzz_settings(N_VALID_GRE)
@given(gre_headers, st.binary(max_size=1500))
def test_valid_gre_packets_decode_to_what_was_encoded(hdr, payload):
    wire = hdr.encode(payload)
    expect_decodes("decode_gre", wire, (hdr, payload))
    expect_decodes("decode_gre(no checksum)", wire, (hdr, payload))


def test_a_decoder_that_refuses_everything_fails_the_valid_properties(monkeypatch):
    """The point of (c): a decoder that refuses all input passes the mutation tests (it
    only ever raises MalformedMessage), and fails the valid-input ones."""
    def refuse(data, *a, **kw):
        raise MalformedMessage("refused")

    msg = ControlMessage(ControlType.PROVISION, 7, {"vm": "v1"})
    for name in DECODERS:
        monkeypatch.setitem(DECODERS, name, (refuse, None))
    assert check("ControlMessage.decode", msg.encode()) is False  # (a)/(b) would pass it
    with pytest.raises(AssertionError, match="refused a valid message"):
        expect_decodes("ControlMessage.decode", msg.encode(), msg)
    with pytest.raises(AssertionError):
        test_valid_gre_packets_decode_to_what_was_encoded()
