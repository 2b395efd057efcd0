"""Scapy layers (packets.scapy_layers) against the reference codecs, in both directions.

The codecs define the wire formats; the Scapy layers exist so captures dissect. These tests
hold the two to the same bytes: codec bytes dissect to the same field values, Scapy-built
packets encode to bytes the codec decodes identically, and Scapy's stock Mobile IP layers
still interoperate with ours. No root, no network.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import packets.scapy_layers as sl
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
    decode_gre,
    decode_registration,
    verify_auth,
)
from packets.codes import CONTROL_PORT, MIP_PORT, MOAT_VENDOR_ID, SERVICE_PORT
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror
from scapy.layers.l2 import GRE, Ether
from scapy.layers.mobileip import MobileIP, MobileIPRRP, MobileIPRRQ, MobileIPTunnelData
from scapy.packet import Padding, Raw
from scapy.utils import rdpcap, wrpcap

MH_KEY = b"mobile-home-key-0123456789abcdef"
MF_KEY = b"mobile-foreign-key-0123456789abc"
MH_SPI = 0x1000
MF_SPI = 0x1001
IDENT = 0xE1234567_80000000


def sample_request() -> RegistrationRequest:
    return RegistrationRequest(
        home_address="10.1.0.5",
        home_agent="10.1.0.1",
        care_of_address="10.2.0.1",
        identification=IDENT,
        lifetime=300,
        flags=RequestFlags.S | RequestFlags.G | RequestFlags.T,
        extensions=[
            NaiExtension("printer-7@home.moat.example"),
            CareOfName("guest-42.lab2"),
            ObjectPart(PartRole.SECONDARY, part_id=3, parent="text2rtf@home.moat.example"),
        ],
    )


def signed_request_bytes() -> bytes:
    """Our RRQ with NAI, care-of-name, object part, then Mobile-Home and Mobile-Foreign auth."""
    raw = append_auth(sample_request().encode(), ExtType.MOBILE_HOME_AUTH, MH_SPI, MH_KEY)
    return append_auth(raw, ExtType.MOBILE_FOREIGN_AUTH, MF_SPI, MF_KEY)


def sample_reply() -> RegistrationReply:
    return RegistrationReply(
        code=ReplyCode.HA_IDENTIFICATION_MISMATCH,
        home_address="10.1.0.5",
        home_agent="10.1.0.1",
        identification=IDENT + 1,
        lifetime=0,
    )


def sample_advertisement() -> AgentAdvertisement:
    return AgentAdvertisement(
        sequence=17,
        registration_lifetime=600,
        flags=AdvFlags.R | AdvFlags.F | AdvFlags.G,
        care_of_addresses=["10.2.0.1", "10.2.0.2"],
        router_addresses=[("10.2.0.1", 0), ("10.2.0.254", -5)],
        lifetime=1800,
        prefix_lengths=[24, 24],
        unknown_extensions=[(200, b"opaque")],
    )


def assert_extensions_match(scapy_exts: list, codec_exts: list) -> None:
    """Each Scapy extension carries the same values as the codec's extension at that index."""
    assert len(scapy_exts) == len(codec_exts)
    for got, want in zip(scapy_exts, codec_exts):
        assert got.type == int(want.ext_type)
        if isinstance(want, NaiExtension):
            assert isinstance(got, sl.MoatExtNAI)
            assert got.nai == want.nai.encode()
        elif isinstance(want, CareOfName):
            assert isinstance(got, sl.MoatNvseCareOfName)
            assert (got.vendor_id, got.nvse_type) == (MOAT_VENDOR_ID, 1)
            assert got.care_of_name == want.name.encode()
        elif isinstance(want, ObjectPart):
            assert isinstance(got, sl.MoatNvseObjectPart)
            assert (got.vendor_id, got.nvse_type) == (MOAT_VENDOR_ID, 2)
            assert got.role == int(want.role)
            assert got.part_id == want.part_id
            assert got.parent_name == want.parent.encode()
        elif isinstance(want, AuthExtension):
            assert isinstance(got, sl.MoatExtAuth)
            assert got.spi == want.spi
            assert got.authenticator == want.authenticator
        elif isinstance(want, VendorExtension):
            assert isinstance(got, sl.MoatNvse)
            assert (got.vendor_id, got.nvse_type, got.value) == (
                want.vendor_id, want.nvse_type, want.value,
            )
        elif isinstance(want, UnknownExtension):
            assert isinstance(got, sl.MoatExtGeneric)
            assert got.data == want.data
        else:  # pragma: no cover - a new codec extension needs a case here
            raise AssertionError(f"no comparison for {want!r}")


# --------------------------------------------------------------------------------------------
# Codec bytes -> Scapy layers
# --------------------------------------------------------------------------------------------


def test_codec_request_dissects_to_same_fields() -> None:
    raw = signed_request_bytes()
    codec = RegistrationRequest.decode(raw)
    pkt = sl.MoatMobileIP(raw)
    assert isinstance(pkt, sl.MoatRRQ)
    assert pkt.type == 1
    assert int(pkt.flags) == int(codec.flags) == 0x8A
    assert pkt.flags.S and pkt.flags.G and pkt.flags.T
    assert not (pkt.flags.B or pkt.flags.D or pkt.flags.M or pkt.flags.r or pkt.flags.x)
    assert pkt.lifetime == codec.lifetime == 300
    assert pkt.homeaddr == codec.home_address
    assert pkt.haaddr == codec.home_agent
    assert pkt.coaddr == codec.care_of_address
    assert pkt.id == codec.identification == IDENT
    assert [type(e) for e in pkt.extensions] == [
        sl.MoatExtNAI, sl.MoatNvseCareOfName, sl.MoatNvseObjectPart, sl.MoatExtAuth,
        sl.MoatExtAuth,
    ]
    assert_extensions_match(pkt.extensions, codec.extensions)
    assert [e.type for e in pkt.extensions] == [131, 134, 134, 32, 33]
    assert pkt.extensions[2].sprintf("%role%") == "secondary"
    # Rebuilding the dissected packet gives back the very same bytes (lengths included).
    assert bytes(pkt) == raw


def test_codec_reply_dissects_to_same_fields() -> None:
    raw = append_auth(sample_reply().encode(), ExtType.MOBILE_HOME_AUTH, MH_SPI, MH_KEY)
    codec = RegistrationReply.decode(raw)
    pkt = sl.MoatMobileIP(raw)
    assert isinstance(pkt, sl.MoatRRP)
    assert pkt.code == 133
    assert pkt.sprintf("%code%") == "ha_identification_mismatch"
    assert (pkt.lifetime, pkt.homeaddr, pkt.haaddr, pkt.id) == (
        codec.lifetime, codec.home_address, codec.home_agent, codec.identification,
    )
    assert_extensions_match(pkt.extensions, codec.extensions)
    assert bytes(pkt) == raw


def test_foreign_vendor_and_unknown_extensions_survive() -> None:
    msg = sample_request()
    msg.extensions += [
        VendorExtension(vendor_id=5535, nvse_type=9, value=b"\x01\x02"),
        VendorExtension(vendor_id=MOAT_VENDOR_ID, nvse_type=77, value=b"future"),
        UnknownExtension(200, b"skip me"),
    ]
    raw = msg.encode()
    pkt = sl.MoatMobileIP(raw)
    assert_extensions_match(pkt.extensions, RegistrationRequest.decode(raw).extensions)
    assert bytes(pkt) == raw


@pytest.mark.parametrize("ports", [(MIP_PORT, MIP_PORT), (MIP_PORT, 40000), (40000, MIP_PORT)])
def test_udp_434_in_either_direction_dissects_to_ours(ports: tuple[int, int]) -> None:
    sport, dport = ports
    for raw, layer in ((signed_request_bytes(), sl.MoatRRQ), (sample_reply().encode(), sl.MoatRRP)):
        pkt = IP(bytes(IP() / UDP(sport=sport, dport=dport) / raw))
        assert layer in pkt
        assert MobileIP not in pkt
        assert bytes(pkt[layer]) == raw


def test_other_mobile_ip_types_still_reach_stock_layer() -> None:
    """Type 4 (RFC 3519 tunnel data) is not MOAT's: the dispatcher hands it to the stock."""
    inner = bytes(IP(src="10.1.0.5", dst="10.9.9.9") / UDP())
    pkt = IP(bytes(IP() / UDP(sport=MIP_PORT, dport=MIP_PORT) / b"\x04\x04\x00\x00" / inner))
    assert MobileIP in pkt and MobileIPTunnelData in pkt
    assert pkt[MobileIPTunnelData][IP].dst == "10.9.9.9"


# --------------------------------------------------------------------------------------------
# Scapy-built packets -> codec
# --------------------------------------------------------------------------------------------


def scapy_request(**overrides: object) -> sl.MoatRRQ:
    fields: dict[str, object] = dict(
        flags="SGT",
        lifetime=300,
        homeaddr="10.1.0.5",
        haaddr="10.1.0.1",
        coaddr="10.2.0.1",
        id=IDENT,
        extensions=[
            sl.MoatExtNAI(nai="printer-7@home.moat.example"),
            sl.MoatNvseCareOfName(care_of_name="guest-42.lab2"),
            sl.MoatNvseObjectPart(
                role="secondary", part_id=3, parent_name="text2rtf@home.moat.example"
            ),
        ],
    )
    fields.update(overrides)
    return sl.MoatRRQ(**fields)


def test_scapy_request_encodes_to_codec_bytes() -> None:
    pkt = scapy_request()
    assert bytes(pkt) == sample_request().encode()
    assert RegistrationRequest.decode(bytes(pkt)) == sample_request()


def test_scapy_request_with_auth_decodes_and_verifies() -> None:
    """Authenticators computed over Scapy-built bytes verify in the codec (lengths are right)."""
    unsigned = bytes(scapy_request())
    mh = append_auth(unsigned, ExtType.MOBILE_HOME_AUTH, MH_SPI, MH_KEY)[len(unsigned) + 6 :]
    pkt = scapy_request()
    pkt.extensions = pkt.extensions + [sl.MoatExtAuth(type=32, spi=MH_SPI, authenticator=mh)]
    decoded = RegistrationRequest.decode(bytes(pkt))
    assert decoded.extensions[:3] == sample_request().extensions
    assert decoded.extensions[3] == AuthExtension(ExtType.MOBILE_HOME_AUTH, MH_SPI, mh)
    assert verify_auth(decoded, ExtType.MOBILE_HOME_AUTH, {MH_SPI: MH_KEY})
    assert bytes(pkt) == append_auth(unsigned, ExtType.MOBILE_HOME_AUTH, MH_SPI, MH_KEY)


def test_scapy_reply_encodes_to_codec_bytes() -> None:
    pkt = sl.MoatRRP(
        code="ha_identification_mismatch", lifetime=0, homeaddr="10.1.0.5", haaddr="10.1.0.1",
        id=IDENT + 1,
    )
    assert bytes(pkt) == sample_reply().encode()
    assert RegistrationReply.decode(bytes(pkt)) == sample_reply()


@pytest.mark.parametrize("flag", list(RequestFlags))
def test_flag_names_are_msb_first(flag: RequestFlags) -> None:
    """Scapy lists FlagsField names LSB first; each RFC letter must land on its RFC bit."""
    pkt = sl.MoatRRQ(flags=flag.name)
    assert bytes(pkt)[1] == int(flag)
    assert RegistrationRequest.decode(bytes(pkt)).flags == flag


def test_udp_top_down_binding_sets_port_434() -> None:
    pkt = UDP(bytes(UDP() / scapy_request()))
    assert (pkt.sport, pkt.dport) == (MIP_PORT, MIP_PORT)
    assert sl.MoatRRQ in pkt


@settings(max_examples=60, deadline=None)
@given(
    flags=st.integers(0, 255),
    lifetime=st.integers(0, 0xFFFF),
    ident=st.integers(0, 2**64 - 1),
    addrs=st.lists(st.integers(0, 2**32 - 1), min_size=3, max_size=3),
    nai=st.text(min_size=1, max_size=60).filter(lambda s: len(s.encode()) <= 255),
    coname=st.text(min_size=1, max_size=60),
    part_id=st.integers(0, 0xFFFF),
    role=st.sampled_from(list(PartRole)),
)
def test_roundtrip_property(
    flags: int, lifetime: int, ident: int, addrs: list[int], nai: str, coname: str,
    part_id: int, role: PartRole,
) -> None:
    dotted = [".".join(str(b) for b in struct.pack("!I", a)) for a in addrs]
    msg = RegistrationRequest(
        dotted[0], dotted[1], dotted[2], ident, lifetime, RequestFlags(flags),
        [NaiExtension(nai), CareOfName(coname), ObjectPart(role, part_id, "p")],
    )
    raw = msg.encode()
    pkt = sl.MoatMobileIP(raw)
    assert int(pkt.flags) == flags
    assert (pkt.homeaddr, pkt.haaddr, pkt.coaddr, pkt.id, pkt.lifetime) == (
        dotted[0], dotted[1], dotted[2], ident, lifetime,
    )
    assert_extensions_match(pkt.extensions, msg.extensions)
    rebuilt = sl.MoatRRQ(
        flags=flags, lifetime=lifetime, homeaddr=dotted[0], haaddr=dotted[1],
        coaddr=dotted[2], id=ident,
        extensions=[
            sl.MoatExtNAI(nai=nai),
            sl.MoatNvseCareOfName(care_of_name=coname),
            sl.MoatNvseObjectPart(role=int(role), part_id=part_id, parent_name="p"),
        ],
    )
    assert bytes(rebuilt) == raw


@settings(max_examples=200, deadline=None)
@given(tail=st.binary(max_size=80))
def test_garbage_extensions_never_crash_dissection(tail: bytes) -> None:
    """Scapy layers are lenient (captures of anything must dissect); the codec stays strict."""
    raw = sample_request().encode()[:24] + tail
    pkt = sl.MoatMobileIP(raw)
    assert isinstance(pkt, sl.MoatRRQ)
    try:
        sl.to_codec(pkt)
    except MalformedMessage:
        pass


# --------------------------------------------------------------------------------------------
# Interop with Scapy's stock Mobile IP layers
# --------------------------------------------------------------------------------------------


def test_stock_layers_parse_fixed_part_of_our_request() -> None:
    raw = signed_request_bytes()
    stock = MobileIP(raw)
    assert stock.type == 1
    rrq = stock[MobileIPRRQ]
    assert rrq.flags == 0x8A
    assert rrq.lifetime == 300
    assert (rrq.homeaddr, rrq.haaddr, rrq.coaddr) == ("10.1.0.5", "10.1.0.1", "10.2.0.1")
    assert rrq.id == IDENT
    assert bytes(rrq.payload) == raw[24:]  # the extensions, which the stock layer leaves raw


def test_stock_layers_parse_fixed_part_of_our_reply() -> None:
    stock = MobileIP(sample_reply().encode())
    assert stock.type == 3
    rrp = stock[MobileIPRRP]
    assert (rrp.code, rrp.lifetime, rrp.homeaddr, rrp.haaddr, rrp.id) == (
        133, 0, "10.1.0.5", "10.1.0.1", IDENT + 1,
    )


def test_codec_reads_request_built_with_stock_layers() -> None:
    stock = MobileIP(type=1) / MobileIPRRQ(
        flags=0x8A, lifetime=300, homeaddr="10.1.0.5", haaddr="10.1.0.1", coaddr="10.2.0.1",
        id=IDENT,
    )
    decoded = RegistrationRequest.decode(bytes(stock))
    assert decoded.flags == RequestFlags.S | RequestFlags.G | RequestFlags.T
    assert (decoded.lifetime, decoded.home_address, decoded.home_agent) == (
        300, "10.1.0.5", "10.1.0.1",
    )
    assert (decoded.care_of_address, decoded.identification) == ("10.2.0.1", IDENT)
    assert decoded.extensions == []
    # ... and the same bytes on UDP 434 now dissect as ours.
    ours = UDP(bytes(UDP() / stock))
    assert (ours.sport, ours.dport) == (MIP_PORT, MIP_PORT)  # stock top-down binding kept
    assert sl.MoatRRQ in ours and ours[sl.MoatRRQ].coaddr == "10.2.0.1"


def test_codec_reads_reply_built_with_stock_layers() -> None:
    stock = MobileIP(type=3) / MobileIPRRP(
        code=133, lifetime=0, homeaddr="10.1.0.5", haaddr="10.1.0.1", id=IDENT + 1
    )
    assert RegistrationReply.decode(bytes(stock)) == sample_reply()


def test_stock_dissection_bindings_removed_ours_present() -> None:
    bound = [cls for _fval, cls in UDP.payload_guess]
    assert MobileIP not in bound
    assert sl.MoatMobileIP in bound


# --------------------------------------------------------------------------------------------
# Agent advertisement / solicitation
# --------------------------------------------------------------------------------------------


def test_advertisement_from_codec_dissects() -> None:
    adv = sample_advertisement()
    pkt = IP(bytes(sl.advertisement_packet(adv, src="10.2.0.1")))
    assert pkt.ttl == 1 and pkt.dst == "224.0.0.1"
    assert pkt[ICMP].type == 9
    assert pkt[ICMP].unused == sl.icmp_ra_unused(2, 1800)
    body = pkt[sl.MoatAgentAdvertisement]
    assert [(r.addr, r.preference) for r in body.routers] == adv.router_addresses
    mobility, prefixes, unknown = body.extensions
    assert isinstance(mobility, sl.MoatMobilityAgentAdv)
    assert (mobility.seq, mobility.reg_lifetime) == (17, 600)
    assert int(mobility.flags) == int(adv.flags)
    assert mobility.flags.R and mobility.flags.F and mobility.flags.G and not mobility.flags.H
    assert mobility.coas == adv.care_of_addresses
    assert isinstance(prefixes, sl.MoatPrefixLengths) and prefixes.prefix_lengths == [24, 24]
    assert isinstance(unknown, sl.MoatAdvExtGeneric)
    assert (unknown.type, unknown.data) == (200, b"opaque")
    assert sl.to_codec(pkt) == adv


@pytest.mark.parametrize("flag", list(AdvFlags))
def test_adv_flag_names_are_msb_first(flag: AdvFlags) -> None:
    ext = sl.MoatMobilityAgentAdv(flags=flag.name)
    assert struct.unpack_from("!H", bytes(ext), 6)[0] == int(flag)


def test_scapy_built_advertisement_decodes_in_codec() -> None:
    pkt = IP(ttl=1, dst="224.0.0.1") / ICMP(
        type=9, code=16, unused=sl.icmp_ra_unused(1, 900)
    ) / sl.MoatAgentAdvertisement(
        routers=[sl.MoatRouterAddress(addr="10.2.0.1", preference=7)],
        extensions=[
            sl.MoatMobilityAgentAdv(seq=3, reg_lifetime=120, flags="F+G+T", coas=["10.2.0.1"]),
            sl.MoatAdvPad(),
            sl.MoatPrefixLengths(prefix_lengths=[24]),
        ],
    )
    decoded = AgentAdvertisement.decode(bytes(pkt[ICMP]))  # checksum verified
    assert decoded == AgentAdvertisement(
        sequence=3, registration_lifetime=120, flags=AdvFlags.F | AdvFlags.G | AdvFlags.T,
        care_of_addresses=["10.2.0.1"], router_addresses=[("10.2.0.1", 7)], lifetime=900,
        code=16, prefix_lengths=[24],
    )
    # and Scapy reads its own build back, pad included
    again = IP(bytes(pkt))[sl.MoatAgentAdvertisement]
    assert [type(e) for e in again.extensions] == [
        sl.MoatMobilityAgentAdv, sl.MoatAdvPad, sl.MoatPrefixLengths,
    ]


def test_solicitation_is_plain_icmp_10() -> None:
    pkt = IP(bytes(sl.solicitation_packet(src="10.2.0.5")))
    assert pkt.ttl == 1 and pkt[ICMP].type == 10
    assert sl.MoatAgentAdvertisement not in pkt
    assert isinstance(sl.to_codec(pkt), AgentSolicitation)


def test_icmp_fallback_leaves_other_types_alone() -> None:
    echo = IP(bytes(IP() / ICMP() / b"ping"))
    assert isinstance(echo[ICMP].payload, Raw) and echo[Raw].load == b"ping"
    unreachable = IP(bytes(IP() / ICMP(type=3, code=3) / IP(dst="10.0.0.9") / UDP()))
    assert IPerror in unreachable


# --------------------------------------------------------------------------------------------
# Control framing
# --------------------------------------------------------------------------------------------

BODY = {"service": "text2rtf", "portion": 50}


def test_control_codec_to_scapy_and_back() -> None:
    msg = ControlMessage(ControlType.SERVICE_REQUEST, 0xDEADBEEF, BODY)
    pkt = sl.MoatControl(msg.encode())
    assert pkt.magic == b"MO" and pkt.version == 1
    assert pkt.type == 7 and pkt.sprintf("%type%") == "service_request"
    assert pkt.txid == 0xDEADBEEF
    assert pkt.length == len(pkt.body) == len(json.dumps(BODY, separators=(",", ":")))
    assert pkt.json() == BODY
    built = sl.MoatControl(type="service_request", txid=0xDEADBEEF, body=BODY)
    assert bytes(built) == msg.encode()
    assert ControlMessage.decode(bytes(built)) == msg
    assert sl.to_codec(IP() / UDP() / built) == msg


@pytest.mark.parametrize("l4", [UDP, TCP])
@pytest.mark.parametrize("port", [CONTROL_PORT, SERVICE_PORT])
@pytest.mark.parametrize("side", ["sport", "dport"])
def test_control_bound_on_both_ports_and_transports(l4: type, port: int, side: str) -> None:
    ports = {"sport": 50000, "dport": 50001, side: port}
    raw = ControlMessage(ControlType.LEASE_GRANT, 9, {"lease": 30}).encode()
    pkt = IP(bytes(IP() / l4(**ports) / raw))
    assert sl.MoatControl in pkt and pkt[sl.MoatControl].txid == 9


def test_control_on_tcp_segment_with_two_messages() -> None:
    first = ControlMessage(ControlType.LEASE_REQUEST, 1, {"cpu": 1}).encode()
    second = ControlMessage(ControlType.LEASE_GRANT, 1, {"lease": 30}).encode()
    pkt = IP(bytes(IP() / TCP(sport=50000, dport=CONTROL_PORT) / (first + second)))
    ctl = pkt[sl.MoatControl]
    assert (ctl.type, ctl.length, ctl.json()) == (3, len(first) - 12, {"cpu": 1})
    assert pkt[Padding].load == second  # the next frame; TCPSession re-frames it


def test_tcp_reassemble_waits_for_a_whole_message() -> None:
    raw = ControlMessage(ControlType.MIGRATE, 5, {"to": "lab2"}).encode()
    meta: dict = {}
    assert sl.MoatControl.tcp_reassemble(raw[:5], meta, {}) is None
    assert sl.MoatControl.tcp_reassemble(raw[:-1], meta, {}) is None
    assert meta["tcp_min_len"] == len(raw)
    done = sl.MoatControl.tcp_reassemble(raw, meta, {})
    assert done is not None and done.txid == 5


# --------------------------------------------------------------------------------------------
# GRE (Scapy's own layer)
# --------------------------------------------------------------------------------------------


def test_scapy_gre_with_key_roundtrips_and_codec_reads_it() -> None:
    inner = IP(src="10.1.0.5", dst="10.9.9.9") / UDP(sport=1, dport=2) / b"payload"
    outer = IP(src="10.1.0.1", dst="10.2.0.1") / GRE(key_present=1, key=0x00C0FFEE) / inner
    again = IP(bytes(outer))
    assert again[GRE].key_present == 1 and again[GRE].key == 0x00C0FFEE
    assert again[GRE].proto == 0x0800
    assert again[GRE][IP].dst == "10.9.9.9"
    header, payload = decode_gre(bytes(outer[GRE]))
    assert header == GreHeader(protocol=0x0800, key=0x00C0FFEE)
    assert payload == bytes(inner)


def test_scapy_gre_checksum_and_sequence_verify_in_codec() -> None:
    inner = IP(dst="10.9.9.9") / UDP()
    gre = GRE(chksum_present=1, key_present=1, key=7, seqnum_present=1, sequence_number=99)
    header, payload = decode_gre(bytes(gre / inner))  # checksum verified by the codec
    assert header == GreHeader(protocol=0x0800, key=7, sequence=99, checksum=True)
    assert payload == bytes(inner)


def test_codec_gre_reads_in_scapy() -> None:
    inner = bytes(IP(dst="10.9.9.9") / UDP())
    parsed = GRE(GreHeader(key=42, sequence=3, checksum=True).encode(inner))
    assert (parsed.key_present, parsed.key, parsed.seqnum_present, parsed.sequence_number) == (
        1, 42, 1, 3,
    )
    assert parsed.chksum_present == 1
    assert parsed[IP].dst == "10.9.9.9"


# --------------------------------------------------------------------------------------------
# pcap round trip: the bindings work for rdpcap()/sniff()
# --------------------------------------------------------------------------------------------


def test_rdpcap_dissects_to_moat_layers(tmp_path: Path) -> None:
    path = tmp_path / "moat.pcap"
    request = signed_request_bytes()
    control = ControlMessage(ControlType.SERVICE_REQUEST, 7, BODY).encode()
    wrpcap(str(path), [
        Ether() / IP(src="10.2.0.9", dst="10.2.0.1") / UDP(sport=MIP_PORT, dport=MIP_PORT)
        / request,
        Ether() / IP() / UDP(sport=MIP_PORT, dport=40000) / sample_reply().encode(),
        Ether() / sl.advertisement_packet(sample_advertisement(), src="10.2.0.1"),
        Ether() / sl.solicitation_packet(src="10.2.0.9"),
        Ether() / IP() / UDP(sport=40000, dport=CONTROL_PORT) / control,
    ])
    rrq, rrp, adv, sol, ctl = rdpcap(str(path))
    assert isinstance(rrq[UDP].payload, sl.MoatRRQ)
    assert_extensions_match(rrq[sl.MoatRRQ].extensions, decode_registration(request).extensions)
    assert decode_registration(bytes(rrq[UDP].payload)) == decode_registration(request)
    assert rrp[sl.MoatRRP].code == 133
    assert adv[sl.MoatAgentAdvertisement].extensions[0].coas == ["10.2.0.1", "10.2.0.2"]
    assert sl.to_codec(adv) == sample_advertisement()
    assert sol[ICMP].type == 10
    assert ctl[sl.MoatControl].json() == BODY


def test_to_codec_rejects_packets_without_moat_layers() -> None:
    with pytest.raises(MalformedMessage):
        sl.to_codec(IP() / UDP(sport=53, dport=53) / b"dns")
    with pytest.raises(TypeError):
        sl.to_scapy(object())  # type: ignore[arg-type]


def test_gre_key_nvse_dissects_with_its_own_layer() -> None:
    from packets import GreKey, RegistrationReply
    from packets.scapy_layers import MoatMobileIP, MoatNvseGreKey

    raw = RegistrationReply(0, "10.16.0.100", "10.16.0.2", 7, 60, [GreKey(42)]).encode()
    pkt = MoatMobileIP(raw)
    ext = pkt.getlayer(MoatNvseGreKey)
    assert ext is not None and ext.key == 42
    assert bytes(pkt) == raw
