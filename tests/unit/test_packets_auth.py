"""Authentication extensions (RFC 5944 §3.5) with HMAC-SHA-256.

The expected authenticators are computed here, independently of packets.auth, over bytes this
file assembles by hand: the fixed part, the earlier extensions in their entirety, and this
extension's type, length and SPI — not the authenticator itself, not later extensions.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

import pytest

import packets.auth
from packets import (
    AuthExtension,
    CareOfName,
    ExtType,
    MalformedMessage,
    RegistrationReply,
    RegistrationRequest,
    append_auth,
    bytes_before,
    decode_registration,
    verify_auth,
)
from packets.auth import AUTHENTICATOR_LEN, MIN_SPI, find_auth
from packets.extensions import encode_extension

MH_SPI, MF_SPI, FH_SPI = 0x1001, 0x2002, 0x3003
MH_KEY = b"mobile-home shared secret"
MF_KEY = b"mobile-foreign key"
FH_KEY = b"foreign-home key"
KEYS = {MH_SPI: MH_KEY, MF_SPI: MF_KEY, FH_SPI: FH_KEY}

# RFC 5944 §3.3 fixed part: type 1, flags S|G, lifetime 180, home, HA, CoA, identification
FIXED = bytes.fromhex("01 88 00b4 0a000005 0a000001 c0000201 e8f1a2b300000001".replace(" ", ""))
# MN-NAI (131) "obj@home", then an NVSE care-of-name (134, vendor 32473, sub-type 1) "c1"
NAI = bytes([131, 8]) + b"obj@home"
NVSE = bytes([134, 10]) + bytes.fromhex("0000 00007ed9 0001".replace(" ", "")) + b"c1"
EARLIER = NAI + NVSE


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def _tls(ext_type: int, spi: int) -> bytes:
    """Type, length (4 + 32) and SPI of an HMAC-SHA-256 authentication extension, by hand."""
    return bytes([ext_type, 36]) + spi.to_bytes(4, "big")


def _mn_request() -> bytes:
    """What a mobile object sends: fixed, NAI, NVSE, MH auth, MF auth."""
    with_mh = append_auth(FIXED + EARLIER, ExtType.MOBILE_HOME_AUTH, MH_SPI, MH_KEY)
    return append_auth(with_mh, ExtType.MOBILE_FOREIGN_AUTH, MF_SPI, MF_KEY)


def test_authenticator_is_hmac_sha256_over_rfc5944_protected_bytes():
    wire = append_auth(FIXED + EARLIER, ExtType.MOBILE_HOME_AUTH, MH_SPI, MH_KEY)
    protected = FIXED + EARLIER + bytes([32, 36]) + struct.pack("!I", MH_SPI)
    expected = hmac.new(MH_KEY, protected, hashlib.sha256).digest()
    assert wire == protected + expected
    assert len(wire) == len(FIXED) + len(EARLIER) + 2 + 4 + AUTHENTICATOR_LEN


def test_second_authenticator_covers_first_in_its_entirety():
    wire = _mn_request()
    mh_ext = _tls(32, MH_SPI) + _hmac(MH_KEY, FIXED + EARLIER + _tls(32, MH_SPI))
    mf_tls = _tls(33, MF_SPI)
    mf_auth = _hmac(MF_KEY, FIXED + EARLIER + mh_ext + mf_tls)
    assert wire == FIXED + EARLIER + mh_ext + mf_tls + mf_auth


def test_authenticator_excludes_itself_and_later_extensions():
    wire = _mn_request()
    msg = RegistrationRequest.decode(wire)
    _, mh = find_auth(msg, ExtType.MOBILE_HOME_AUTH)
    start = msg.ext_offsets[2]
    assert start == len(FIXED) + len(EARLIER)
    # not over the authenticator itself, nor over the MF extension that follows
    assert mh.authenticator != _hmac(MH_KEY, wire[: start + 6 + AUTHENTICATOR_LEN])
    assert mh.authenticator != _hmac(MH_KEY, wire)
    assert mh.authenticator == _hmac(MH_KEY, wire[: start + 6])


def test_verify_auth_right_key():
    msg = RegistrationRequest.decode(_mn_request())
    assert verify_auth(msg, ExtType.MOBILE_HOME_AUTH, KEYS)
    assert verify_auth(msg, ExtType.MOBILE_FOREIGN_AUTH, KEYS)
    # key lookup may be a callable too
    assert verify_auth(msg, ExtType.MOBILE_HOME_AUTH, KEYS.get)


def test_verify_auth_wrong_key_unknown_spi_missing_extension():
    msg = RegistrationRequest.decode(_mn_request())
    assert not verify_auth(msg, ExtType.MOBILE_HOME_AUTH, {MH_SPI: b"wrong key"})
    assert not verify_auth(msg, ExtType.MOBILE_HOME_AUTH, {MH_SPI: MF_KEY})
    assert not verify_auth(msg, ExtType.MOBILE_HOME_AUTH, {MH_SPI + 1: MH_KEY})
    assert not verify_auth(msg, ExtType.MOBILE_HOME_AUTH, lambda spi: None)
    assert not verify_auth(msg, ExtType.MOBILE_HOME_AUTH, {})
    assert not verify_auth(msg, ExtType.FOREIGN_HOME_AUTH, KEYS)


@pytest.mark.parametrize("spi", [0, 1, 255])
def test_verify_auth_refuses_reserved_spi_even_with_a_key(spi):
    # built by hand, since append_auth refuses to produce it
    wire = FIXED + EARLIER + _tls(32, spi)
    wire += _hmac(MH_KEY, wire)
    msg = RegistrationRequest.decode(wire)
    assert msg.find(AuthExtension)[0].spi == spi
    assert not verify_auth(msg, ExtType.MOBILE_HOME_AUTH, {spi: MH_KEY})
    # the same bytes under SPI 256 verify, so it is the SPI that is refused
    wire256 = FIXED + EARLIER + _tls(32, MIN_SPI)
    wire256 += _hmac(MH_KEY, wire256)
    assert verify_auth(RegistrationRequest.decode(wire256), ExtType.MOBILE_HOME_AUTH,
                       {MIN_SPI: MH_KEY})


def test_verify_auth_refuses_truncated_authenticator():
    wire = FIXED + EARLIER + bytes([32, 20]) + struct.pack("!I", MH_SPI)
    wire += _hmac(MH_KEY, wire)[:16]
    msg = RegistrationRequest.decode(wire)
    assert not verify_auth(msg, ExtType.MOBILE_HOME_AUTH, KEYS)


def test_verify_auth_needs_a_decoded_message():
    local = RegistrationRequest("10.0.0.5", "10.0.0.1", "192.0.2.1", 1)
    with pytest.raises(ValueError, match="decoded"):
        verify_auth(local, ExtType.MOBILE_HOME_AUTH, KEYS)


def test_any_tampered_byte_in_protected_range_breaks_mh():
    wire = _mn_request()
    end_mh = len(FIXED) + len(EARLIER) + 6 + AUTHENTICATOR_LEN  # through the authenticator
    assert verify_auth(RegistrationRequest.decode(wire), ExtType.MOBILE_HOME_AUTH, KEYS)
    for i in range(end_mh):
        for mask in (0x01, 0x80):
            bad = bytearray(wire)
            bad[i] ^= mask
            try:
                msg = decode_registration(bytes(bad))
            except MalformedMessage:
                continue  # rejected before auth is even looked at: also fine
            assert not verify_auth(msg, ExtType.MOBILE_HOME_AUTH, KEYS), (i, mask)


def test_byte_changed_after_mh_breaks_mf_but_not_mh():
    wire = _mn_request()
    mf_start = len(FIXED) + len(EARLIER) + 6 + AUTHENTICATOR_LEN
    for i in range(mf_start, len(wire)):
        bad = bytearray(wire)
        bad[i] ^= 0x01
        try:
            msg = RegistrationRequest.decode(bytes(bad))
        except MalformedMessage:
            continue
        assert verify_auth(msg, ExtType.MOBILE_HOME_AUTH, KEYS), i
        assert not verify_auth(msg, ExtType.MOBILE_FOREIGN_AUTH, KEYS), i
    # a byte inside the MF authenticator always decodes: check that case explicitly
    bad = bytearray(wire)
    bad[-1] ^= 0xFF
    msg = RegistrationRequest.decode(bytes(bad))
    assert verify_auth(msg, ExtType.MOBILE_HOME_AUTH, KEYS)
    assert not verify_auth(msg, ExtType.MOBILE_FOREIGN_AUTH, KEYS)


def test_foreign_agent_relay_keeps_mh_and_adds_fh():
    received = RegistrationRequest.decode(_mn_request())
    assert verify_auth(received, ExtType.MOBILE_FOREIGN_AUTH, KEYS)
    cut = bytes_before(received, ExtType.MOBILE_FOREIGN_AUTH)
    assert cut == _mn_request()[: len(FIXED) + len(EARLIER) + 6 + AUTHENTICATOR_LEN]
    relayed = append_auth(
        cut + encode_extension(CareOfName("coa-9.foreign")), ExtType.FOREIGN_HOME_AUTH, FH_SPI,
        FH_KEY,
    )
    msg = RegistrationRequest.decode(relayed)
    assert [type(e).__name__ for e in msg.extensions] == [
        "NaiExtension", "CareOfName", "AuthExtension", "CareOfName", "AuthExtension",
    ]
    assert verify_auth(msg, ExtType.MOBILE_HOME_AUTH, KEYS)
    assert verify_auth(msg, ExtType.FOREIGN_HOME_AUTH, KEYS)
    assert not verify_auth(msg, ExtType.MOBILE_FOREIGN_AUTH, KEYS)  # removed by the FA
    # independently: FH covers everything before it, MH authenticator included
    fh_start = msg.ext_offsets[-1]
    assert msg.extensions[-1].authenticator == _hmac(FH_KEY, relayed[: fh_start + 6])
    # and the home agent's view of the MH-protected bytes is unchanged by the relay
    assert relayed[: len(FIXED) + len(EARLIER)] == FIXED + EARLIER


def test_bytes_before_missing_extension_is_malformed():
    msg = RegistrationRequest.decode(append_auth(FIXED, ExtType.MOBILE_HOME_AUTH, MH_SPI, MH_KEY))
    with pytest.raises(MalformedMessage, match="33"):
        bytes_before(msg, ExtType.MOBILE_FOREIGN_AUTH)


def test_reply_authentication():
    reply = RegistrationReply(0, "10.0.0.5", "10.0.0.1", 7, 180).encode()
    wire = append_auth(reply, ExtType.MOBILE_HOME_AUTH, MH_SPI, MH_KEY)
    assert wire[len(reply) + 6:] == _hmac(MH_KEY, reply + _tls(32, MH_SPI))
    msg = RegistrationReply.decode(wire)
    assert verify_auth(msg, ExtType.MOBILE_HOME_AUTH, KEYS)
    assert not verify_auth(msg, ExtType.MOBILE_HOME_AUTH, {MH_SPI: MF_KEY})


@pytest.mark.parametrize("spi", [-1, 0, 255, 1 << 32])
def test_append_auth_refuses_reserved_or_out_of_range_spi(spi):
    with pytest.raises(ValueError, match="SPI"):
        append_auth(FIXED, ExtType.MOBILE_HOME_AUTH, spi, MH_KEY)


@pytest.mark.parametrize("ext_type", [ExtType.MN_NAI, ExtType.NVSE, 31, 35, 0])
def test_append_auth_refuses_non_auth_types(ext_type):
    with pytest.raises(ValueError, match="not an authentication extension"):
        append_auth(FIXED, ext_type, MH_SPI, MH_KEY)


def test_append_auth_accepts_all_three_auth_types_and_boundary_spis():
    for ext_type in (32, 33, 34):
        for spi in (MIN_SPI, 0xFFFFFFFF):
            wire = append_auth(FIXED, ext_type, spi, b"k")
            assert wire[24] == ext_type
            assert verify_auth(RegistrationRequest.decode(wire), ExtType(ext_type), {spi: b"k"})


def test_verify_auth_compares_in_constant_time(monkeypatch):
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(packets.auth.hmac, "compare_digest", spy)
    msg = RegistrationRequest.decode(_mn_request())
    assert verify_auth(msg, ExtType.MOBILE_HOME_AUTH, KEYS)
    assert not verify_auth(msg, ExtType.MOBILE_HOME_AUTH, {MH_SPI: b"wrong"})
    assert len(calls) == 2
    expected = _hmac(MH_KEY, FIXED + EARLIER + _tls(32, MH_SPI))
    assert calls[0] == (expected, expected)  # (computed, received)
    assert calls[1][1] == msg.extensions[2].authenticator
    assert calls[1][0] == _hmac(b"wrong", FIXED + EARLIER + _tls(32, MH_SPI))


def test_verify_auth_result_is_what_compare_digest_says(monkeypatch):
    # if verify_auth compared with == instead, forcing compare_digest would not change it
    msg = RegistrationRequest.decode(_mn_request())
    monkeypatch.setattr(packets.auth.hmac, "compare_digest", lambda a, b: False)
    assert not verify_auth(msg, ExtType.MOBILE_HOME_AUTH, KEYS)
    monkeypatch.setattr(packets.auth.hmac, "compare_digest", lambda a, b: True)
    assert verify_auth(msg, ExtType.MOBILE_HOME_AUTH, {MH_SPI: b"wrong"})
