"""MOAT's wire formats as Scapy layers, so ``sniff()`` and ``rdpcap()`` dissect them.

The codecs in :mod:`packets.mobileip`, :mod:`packets.extensions`, :mod:`packets.advert` and
:mod:`packets.control` are the reference; these layers read and write the same bytes (the unit
tests check both directions) and exist for captures, experiments and ad-hoc crafting. Agents use
the codecs, which are strict; Scapy layers are lenient by design (a capture of garbage still
dissects to *something*).

Importing this module changes Scapy's global dissection tables. What it does, and why:

* **UDP 434 (Registration Request / Reply).** Scapy's stock :mod:`scapy.layers.mobileip` binds
  UDP port 434 to its own ``MobileIP`` (RFC 3344, fixed part only, no extensions). Two bindings
  on the same port cannot both win, and Scapy picks the first match, so this module first
  imports the stock module (so that a later import cannot re-bind it: Python runs a module
  once), then removes the stock *dissection* bindings with ``split_bottom_up(UDP, MobileIP,
  ...)`` and binds :class:`MoatMobileIP`, a dispatcher that looks at the first byte and returns
  :class:`MoatRRQ` (type 1), :class:`MoatRRP` (type 3), or the stock ``MobileIP`` for any other
  type (e.g. RFC 3519 tunnel data, type 4), so nothing the stock layer dissected is lost.
  Only the bottom-up half of ``split_layers`` is undone: the stock top-down binding only sets
  UDP ports when *building* ``UDP()/MobileIP()``, never affects dissection, and keeping it
  means the stock classes stay fully usable explicitly (``MobileIP(raw)``,
  ``UDP()/MobileIP(type=1)/MobileIPRRQ(...)``).
* **ICMP type 9 (Agent Advertisement).** Scapy's ``ICMP`` reads the 4 bytes after the checksum
  as ``unused`` for type 9 (num addrs, entry size, lifetime) and its ``guess_payload_class``
  returns ``None`` for type 9 without consulting the binding table, so a plain
  ``bind_layers(ICMP, X, type=9)`` only works for building. This module therefore wraps
  ``ICMP.guess_payload_class``: when the stock method has no answer it falls back to the
  generic, binding-driven ``Packet.guess_payload_class`` (for types nobody bound that is
  ``Raw``, exactly as before). :class:`MoatAgentAdvertisement` takes the router count from
  ``underlayer.unused >> 24``; build one with :func:`advertisement_packet`, which sets
  ``unused`` for you. Solicitations are plain ``ICMP(type=10)``.
* **UDP/TCP 4340 and 4341 (control and service).** Both carry the same MOAT control framing
  (docs/architecture.md §2.2), dissected as :class:`MoatControl`. On TCP one segment need not hold exactly one
  message: bytes past the declared body length become ``Padding``, and ``tcp_reassemble``
  lets ``sniff(session=TCPSession)`` re-frame a stream.
* **GRE.** Scapy's own ``GRE`` already reads and writes the RFC 2890 key; nothing is defined.

Field names follow Scapy's stock Mobile IP layer where one exists (``homeaddr``, ``haaddr``,
``coaddr``, ``id``), so code written against the stock layer reads ours unchanged.
"""

from __future__ import annotations

import json
import logging
import struct
from typing import Any, Optional, Union

import scapy.layers.mobileip as _stock_mobileip  # noqa: F401  (imported first, see docstring)
from scapy.fields import (
    ByteEnumField,
    ByteField,
    FieldLenField,
    FieldListField,
    FlagsField,
    IntEnumField,
    IntField,
    IPField,
    LongField,
    PacketListField,
    ShortEnumField,
    ShortField,
    SignedIntField,
    StrFixedLenField,
    StrLenField,
    XStrLenField,
)
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.mobileip import MobileIP
from scapy.packet import (
    Packet,
    bind_bottom_up,
    bind_layers,
    bind_top_down,
    split_bottom_up,
)

from .advert import AgentAdvertisement, AgentSolicitation
from .codes import (
    CONTROL_PORT,
    MIP_PORT,
    MOAT_VENDOR_ID,
    SERVICE_PORT,
    ControlType,
    ExtType,
    IcmpType,
    MessageType,
    NvseType,
    PartRole,
    ReplyCode,
)
from .control import HEADER as _CONTROL_HEADER
from .control import MAGIC as _CONTROL_MAGIC
from .control import VERSION as _CONTROL_VERSION
from .control import ControlMessage, frame_length
from .errors import MalformedMessage
from .mobileip import RegistrationReply, RegistrationRequest, decode_registration

log = logging.getLogger(__name__)

__all__ = [
    "ADV_FLAG_NAMES", "MoatAdvExtGeneric", "MoatAdvExtension", "MoatAdvPad",
    "MoatAgentAdvertisement", "MoatControl", "MoatExtAuth", "MoatExtGeneric", "MoatExtNAI",
    "MoatExtension", "MoatMobileIP", "MoatMobilityAgentAdv", "MoatNvse", "MoatNvseCareOfName",
    "MoatNvseGreKey", "MoatNvseObjectPart", "MoatPrefixLengths", "MoatRRP", "MoatRRQ", "MoatRouterAddress",
    "RRQ_FLAG_NAMES", "advertisement_packet", "icmp_ra_unused", "solicitation_packet",
    "to_codec", "to_scapy",
]


def _enum_names(enum_cls: Any) -> dict[int, str]:
    """``{value: lower-case name}`` for a ByteEnumField, from the one enum in packets.codes."""
    return {int(member): member.name.lower() for member in enum_cls}


#: Request flags ``S B D M G r T x`` (MSB first) as Scapy wants them: LSB first.
RRQ_FLAG_NAMES = "xTrGMDBS"
#: Mobility-agent advertisement flags ``R B H F M G r T U X I`` + 5 reserved bits, LSB first.
#: A list (not a string) because the five reserved bits need distinct names; set flags
#: with ints or ``"F+G"``.
ADV_FLAG_NAMES = [
    "res0", "res1", "res2", "res3", "res4", "I", "X", "U", "T", "r", "G", "M", "F", "H", "B", "R",
]

_AUTH_NAMES = {
    int(ExtType.MOBILE_HOME_AUTH): "mobile-home",
    int(ExtType.MOBILE_FOREIGN_AUTH): "mobile-foreign",
    int(ExtType.FOREIGN_HOME_AUTH): "foreign-home",
}
_EXT_NAMES = _enum_names(ExtType)
_NVSE_HEAD_LEN = 8  # reserved(2) vendor-id(4) nvse-type(2), inside the extension body
_PART_HEAD_LEN = 4  # role(1) reserved(1) part-id(2)


def _body_len(pkt: Packet, header: int) -> int:
    """Bytes of a variable tail, never negative even if a capture carries a bad length."""
    return max(0, (pkt.length or 0) - header)


# --------------------------------------------------------------------------------------------
# Registration extensions
# --------------------------------------------------------------------------------------------


class _MoatExtBase(Packet):
    """Common behaviour of one type-length-value extension inside a PacketListField."""

    def extract_padding(self, s: bytes) -> tuple[bytes, bytes]:
        # The length field bounded every field; what follows is the next extension.
        return b"", s


class MoatExtNAI(_MoatExtBase):
    """MN-NAI (131, RFC 2794): MOAT puts ``object-name@home-domain`` here."""

    name = "MOAT MN-NAI extension"
    fields_desc = [
        ByteEnumField("type", int(ExtType.MN_NAI), _EXT_NAMES),
        FieldLenField("length", None, length_of="nai", fmt="B"),
        StrLenField("nai", b"", length_from=lambda pkt: pkt.length),
    ]


class MoatNvse(_MoatExtBase):
    """NVSE (134, RFC 3115) of another vendor, or of MOAT with a sub-type we do not know."""

    name = "MOAT NVSE (generic)"
    fields_desc = [
        ByteEnumField("type", int(ExtType.NVSE), _EXT_NAMES),
        FieldLenField(
            "length", None, length_of="value", fmt="B",
            adjust=lambda pkt, x: x + _NVSE_HEAD_LEN,
        ),
        ShortField("reserved", 0),
        IntEnumField("vendor_id", MOAT_VENDOR_ID, {MOAT_VENDOR_ID: "MOAT"}),
        ShortEnumField("nvse_type", 0, _enum_names(NvseType)),
        XStrLenField("value", b"", length_from=lambda pkt: _body_len(pkt, _NVSE_HEAD_LEN)),
    ]


class MoatNvseCareOfName(_MoatExtBase):
    """NVSE, MOAT sub-type 1: the care-of-name the FOA gave the object (UTF-8)."""

    name = "MOAT NVSE care-of-name"
    fields_desc = [
        ByteEnumField("type", int(ExtType.NVSE), _EXT_NAMES),
        FieldLenField(
            "length", None, length_of="care_of_name", fmt="B",
            adjust=lambda pkt, x: x + _NVSE_HEAD_LEN,
        ),
        ShortField("reserved", 0),
        IntEnumField("vendor_id", MOAT_VENDOR_ID, {MOAT_VENDOR_ID: "MOAT"}),
        ShortEnumField("nvse_type", int(NvseType.CARE_OF_NAME), _enum_names(NvseType)),
        StrLenField(
            "care_of_name", b"", length_from=lambda pkt: _body_len(pkt, _NVSE_HEAD_LEN)
        ),
    ]


class MoatNvseObjectPart(_MoatExtBase):
    """NVSE, MOAT sub-type 2: role (primary/duplicate/secondary), part id and parent object.

    The parent's field is ``parent_name``, not ``parent``: Scapy's ``Packet.parent`` already
    points at the packet holding this one in its PacketListField, and a field of that name
    would be shadowed by it.
    """

    name = "MOAT NVSE object part"
    fields_desc = [
        ByteEnumField("type", int(ExtType.NVSE), _EXT_NAMES),
        FieldLenField(
            "length", None, length_of="parent_name", fmt="B",
            adjust=lambda pkt, x: x + _NVSE_HEAD_LEN + _PART_HEAD_LEN,
        ),
        ShortField("reserved", 0),
        IntEnumField("vendor_id", MOAT_VENDOR_ID, {MOAT_VENDOR_ID: "MOAT"}),
        ShortEnumField("nvse_type", int(NvseType.OBJECT_PART), _enum_names(NvseType)),
        ByteEnumField("role", int(PartRole.PRIMARY), _enum_names(PartRole)),
        ByteField("part_reserved", 0),
        ShortField("part_id", 0),
        StrLenField(
            "parent_name", b"",
            length_from=lambda pkt: _body_len(pkt, _NVSE_HEAD_LEN + _PART_HEAD_LEN),
        ),
    ]


class MoatNvseGreKey(_MoatExtBase):
    """NVSE, MOAT sub-type 3: the binding's GRE key, from the HOA in an accepted reply."""

    name = "MOAT NVSE GRE key"
    fields_desc = [
        ByteEnumField("type", int(ExtType.NVSE), _EXT_NAMES),
        ByteField("length", _NVSE_HEAD_LEN + 4),
        ShortField("reserved", 0),
        IntEnumField("vendor_id", MOAT_VENDOR_ID, {MOAT_VENDOR_ID: "MOAT"}),
        ShortEnumField("nvse_type", int(NvseType.GRE_KEY), _enum_names(NvseType)),
        IntField("key", 0),
    ]


class MoatExtAuth(_MoatExtBase):
    """Authentication extension 32/33/34 (RFC 5944 §3.5): SPI and authenticator.

    Scapy does not sign: compute the authenticator with :func:`packets.auth.append_auth` on
    the bytes before it, because it covers exactly those received bytes.
    """

    name = "MOAT authentication extension"
    fields_desc = [
        ByteEnumField("type", int(ExtType.MOBILE_HOME_AUTH), _AUTH_NAMES),
        FieldLenField(
            "length", None, length_of="authenticator", fmt="B", adjust=lambda pkt, x: x + 4
        ),
        IntField("spi", 256),
        XStrLenField("authenticator", b"", length_from=lambda pkt: _body_len(pkt, 4)),
    ]


class MoatExtGeneric(_MoatExtBase):
    """Any other extension: type, length, opaque data (kept byte for byte)."""

    name = "MOAT extension (generic)"
    fields_desc = [
        ByteEnumField("type", 128, _EXT_NAMES),
        FieldLenField("length", None, length_of="data", fmt="B"),
        XStrLenField("data", b"", length_from=lambda pkt: pkt.length),
    ]


class MoatExtension(Packet):
    """Dispatcher: ``MoatExtension(raw)`` returns the layer for the extension ``raw`` starts.

    Only a dispatcher; Scapy calls ``dispatch_hook`` only on the class that defines it, so the
    concrete extension classes are not re-dispatched when instantiated explicitly.
    """

    name = "MOAT extension"

    @classmethod
    def dispatch_hook(cls, _pkt: Optional[bytes] = None, *args: Any, **kargs: Any) -> type:
        if not _pkt:
            return MoatExtGeneric
        ext_type = _pkt[0]
        if ext_type == ExtType.MN_NAI:
            return MoatExtNAI
        if ext_type in _AUTH_NAMES:
            return MoatExtAuth
        if ext_type == ExtType.NVSE:
            if len(_pkt) < 2 + _NVSE_HEAD_LEN or _pkt[1] < _NVSE_HEAD_LEN:
                return MoatExtGeneric  # too short to be an NVSE; show the bytes as they are
            vendor, nvse_type = struct.unpack_from("!IH", _pkt, 4)
            if vendor == MOAT_VENDOR_ID:
                if nvse_type == NvseType.CARE_OF_NAME:
                    return MoatNvseCareOfName
                if nvse_type == NvseType.OBJECT_PART and _pkt[1] >= _NVSE_HEAD_LEN + _PART_HEAD_LEN:
                    return MoatNvseObjectPart
                if nvse_type == NvseType.GRE_KEY and _pkt[1] == _NVSE_HEAD_LEN + 4:
                    return MoatNvseGreKey
            return MoatNvse
        return MoatExtGeneric


# --------------------------------------------------------------------------------------------
# Registration Request / Reply (UDP 434)
# --------------------------------------------------------------------------------------------


class MoatRRQ(Packet):
    """Registration Request (RFC 5944 §3.3) with its extensions, in wire order."""

    name = "MOAT Registration Request"
    fields_desc = [
        ByteEnumField("type", int(MessageType.REGISTRATION_REQUEST), {1: "RRQ", 3: "RRP"}),
        FlagsField("flags", 0, 8, RRQ_FLAG_NAMES),
        ShortField("lifetime", 180),
        IPField("homeaddr", "0.0.0.0"),
        IPField("haaddr", "0.0.0.0"),
        IPField("coaddr", "0.0.0.0"),
        LongField("id", 0),
        PacketListField("extensions", [], MoatExtension),
    ]

    def mysummary(self) -> str:
        return self.sprintf("MOAT RRQ %homeaddr% via %coaddr% -> %haaddr% life %lifetime%")


class MoatRRP(Packet):
    """Registration Reply (RFC 5944 §3.4) with its extensions, in wire order."""

    name = "MOAT Registration Reply"
    fields_desc = [
        ByteEnumField("type", int(MessageType.REGISTRATION_REPLY), {1: "RRQ", 3: "RRP"}),
        ByteEnumField("code", 0, _enum_names(ReplyCode)),
        ShortField("lifetime", 180),
        IPField("homeaddr", "0.0.0.0"),
        IPField("haaddr", "0.0.0.0"),
        LongField("id", 0),
        PacketListField("extensions", [], MoatExtension),
    ]

    def mysummary(self) -> str:
        return self.sprintf("MOAT RRP %code% for %homeaddr% life %lifetime%")


class MoatMobileIP(Packet):
    """Dispatcher bound to UDP 434: type 1 -> :class:`MoatRRQ`, 3 -> :class:`MoatRRP`.

    Any other type goes to Scapy's stock ``MobileIP`` (which knows RFC 3519 tunnel data), so
    taking over port 434 loses nothing the stock layer could show.
    """

    name = "MOAT Mobile IP"

    @classmethod
    def dispatch_hook(cls, _pkt: Optional[bytes] = None, *args: Any, **kargs: Any) -> type:
        if not _pkt or _pkt[0] == MessageType.REGISTRATION_REQUEST:
            return MoatRRQ
        if _pkt[0] == MessageType.REGISTRATION_REPLY:
            return MoatRRP
        return MobileIP


# --------------------------------------------------------------------------------------------
# Agent advertisement (ICMP 9)
# --------------------------------------------------------------------------------------------


class MoatRouterAddress(Packet):
    """One RFC 1256 router address entry: address and signed preference."""

    name = "Router address"
    fields_desc = [IPField("addr", "0.0.0.0"), SignedIntField("preference", 0)]

    def extract_padding(self, s: bytes) -> tuple[bytes, bytes]:
        return b"", s


class MoatAdvPad(_MoatExtBase):
    """One-byte Pad extension (type 0, no length), advertisements only."""

    name = "Pad"
    fields_desc = [ByteEnumField("type", int(ExtType.PAD), _EXT_NAMES)]


class MoatMobilityAgentAdv(_MoatExtBase):
    """Mobility Agent Advertisement Extension (16, RFC 5944 §2.1.1)."""

    name = "Mobility Agent Advertisement Extension"
    fields_desc = [
        ByteEnumField("type", int(ExtType.MOBILITY_AGENT_ADV), _EXT_NAMES),
        FieldLenField(
            "length", None, count_of="coas", fmt="B", adjust=lambda pkt, x: 6 + 4 * x
        ),
        ShortField("seq", 0),
        ShortField("reg_lifetime", 0),
        FlagsField("flags", 0, 16, ADV_FLAG_NAMES),
        FieldListField(
            "coas", [], IPField("coa", "0.0.0.0"), length_from=lambda pkt: _body_len(pkt, 6)
        ),
    ]


class MoatPrefixLengths(_MoatExtBase):
    """Prefix-Lengths Extension (19, RFC 5944 §2.1.2): one byte per router address."""

    name = "Prefix-Lengths Extension"
    fields_desc = [
        ByteEnumField("type", int(ExtType.PREFIX_LENGTHS), _EXT_NAMES),
        FieldLenField("length", None, count_of="prefix_lengths", fmt="B"),
        FieldListField(
            "prefix_lengths", [], ByteField("prefix_length", 0),
            length_from=lambda pkt: pkt.length,
        ),
    ]


class MoatAdvExtGeneric(_MoatExtBase):
    """Any other advertisement extension: type, length, opaque data."""

    name = "Advertisement extension (generic)"
    fields_desc = [
        ByteEnumField("type", 128, _EXT_NAMES),
        FieldLenField("length", None, length_of="data", fmt="B"),
        XStrLenField("data", b"", length_from=lambda pkt: pkt.length),
    ]


class MoatAdvExtension(Packet):
    """Dispatcher for advertisement extensions (pad, 16, 19, anything else)."""

    name = "Advertisement extension"

    @classmethod
    def dispatch_hook(cls, _pkt: Optional[bytes] = None, *args: Any, **kargs: Any) -> type:
        if not _pkt:
            return MoatAdvExtGeneric
        return {
            ExtType.PAD: MoatAdvPad,
            ExtType.MOBILITY_AGENT_ADV: MoatMobilityAgentAdv,
            ExtType.PREFIX_LENGTHS: MoatPrefixLengths,
        }.get(_pkt[0], MoatAdvExtGeneric)


def _router_count(pkt: Packet) -> int:
    """Number of router entries: the top byte of ICMP's ``unused`` (0 without an ICMP)."""
    under = pkt.underlayer
    if isinstance(under, ICMP) and under.type == IcmpType.ROUTER_ADVERTISEMENT:
        return int(under.unused or 0) >> 24
    return 0


class MoatAgentAdvertisement(Packet):
    """What follows ICMP's first 8 bytes in an advertisement: routers, then extensions.

    Scapy's ``ICMP`` keeps num-addrs / entry-size / lifetime in ``unused``; see
    :func:`icmp_ra_unused`.
    """

    name = "MOAT Agent Advertisement"
    fields_desc = [
        PacketListField("routers", [], MoatRouterAddress, count_from=_router_count),
        PacketListField("extensions", [], MoatAdvExtension),
    ]

    def mysummary(self) -> str:
        for ext in self.extensions:
            if isinstance(ext, MoatMobilityAgentAdv):
                return ext.sprintf("MOAT agent adv seq %seq% flags %flags% coa %coas%")
        return "MOAT agent adv"


def icmp_ra_unused(num_addrs: int, lifetime: int, entry_size: int = 2) -> int:
    """Value of Scapy's ``ICMP.unused`` for a router advertisement."""
    return ((num_addrs & 0xFF) << 24) | ((entry_size & 0xFF) << 16) | (lifetime & 0xFFFF)


def advertisement_packet(
    adv: AgentAdvertisement, dst: str = "224.0.0.1", src: Optional[str] = None
) -> Packet:
    """``IP(ttl=1)/ICMP/MoatAgentAdvertisement`` carrying exactly ``adv.encode()``.

    Built by parsing the codec's bytes, so the codec stays the one definition of the format;
    TTL 1 and the all-systems group are what RFC 5944 §2.3.1 requires of an agent.
    """
    ip = IP(ttl=1, dst=dst) if src is None else IP(ttl=1, dst=dst, src=src)
    return ip / ICMP(adv.encode())


def solicitation_packet(dst: str = "224.0.0.2", src: Optional[str] = None) -> Packet:
    """``IP(ttl=1)/ICMP(type=10)``: an Agent Solicitation (RFC 5944 §2.2)."""
    ip = IP(ttl=1, dst=dst) if src is None else IP(ttl=1, dst=dst, src=src)
    return ip / ICMP(AgentSolicitation().encode())


# --------------------------------------------------------------------------------------------
# MOAT control framing (UDP/TCP 4340, 4341)
# --------------------------------------------------------------------------------------------


class _JsonBodyField(StrLenField):
    """The JSON body: bytes on the wire; a dict or list given to it is serialised exactly as
    :meth:`packets.control.ControlMessage.encode` does, so both produce the same bytes."""

    def any2i(self, pkt: Optional[Packet], x: Any) -> Any:
        if isinstance(x, (dict, list)):
            x = json.dumps(x, separators=(",", ":"), allow_nan=False).encode()
        return super().any2i(pkt, x)


class MoatControl(Packet):
    """MOAT control header (magic "MO", version, type, txid, length) and its JSON body."""

    name = "MOAT Control"
    fields_desc = [
        StrFixedLenField("magic", _CONTROL_MAGIC, 2),
        ByteField("version", _CONTROL_VERSION),
        ByteEnumField("type", int(ControlType.ERROR), _enum_names(ControlType)),
        IntField("txid", 0),
        FieldLenField("length", None, length_of="body", fmt="!I"),
        _JsonBodyField("body", b"{}", length_from=lambda pkt: pkt.length),
    ]

    def extract_padding(self, s: bytes) -> tuple[bytes, bytes]:
        # The header's length bounds the body; on a stream the rest is the next message.
        return b"", s

    def json(self) -> Any:
        """The body parsed as JSON (raises ValueError if it is not)."""
        return json.loads(bytes(self.body).decode("utf-8"))

    def mysummary(self) -> str:
        return self.sprintf("MOAT %type% txid %txid%")

    @classmethod
    def tcp_reassemble(
        cls, data: bytes, metadata: dict[str, Any], session: dict[str, Any]
    ) -> Optional[Packet]:
        """Hook for ``sniff(session=TCPSession)``: return a message once it is complete."""
        if len(data) < _CONTROL_HEADER.size:
            metadata["tcp_min_len"] = _CONTROL_HEADER.size
            return None
        try:
            total = frame_length(data)
        except MalformedMessage as exc:
            log.debug("not a MOAT control stream (%s); dissecting as is", exc)
            return cls(data)
        if len(data) < total:
            metadata["tcp_min_len"] = total
            return None
        return cls(data)


# --------------------------------------------------------------------------------------------
# Codec <-> Scapy
# --------------------------------------------------------------------------------------------

Codec = Union[RegistrationRequest, RegistrationReply, ControlMessage]


def to_scapy(msg: Union[Codec, AgentAdvertisement, AgentSolicitation]) -> Packet:
    """The Scapy layer for a codec object, dissected from its exact encoding.

    Registrations give :class:`MoatRRQ`/:class:`MoatRRP`, control messages
    :class:`MoatControl`, discovery messages an ``ICMP`` (add the IP header yourself, or use
    :func:`advertisement_packet`).
    """
    if isinstance(msg, (RegistrationRequest, RegistrationReply)):
        return MoatMobileIP(msg.encode())
    if isinstance(msg, ControlMessage):
        return MoatControl(msg.encode())
    if isinstance(msg, (AgentAdvertisement, AgentSolicitation)):
        return ICMP(msg.encode())
    raise TypeError(f"no Scapy layer for {type(msg).__name__}")


def to_codec(pkt: Packet) -> Union[Codec, AgentAdvertisement, AgentSolicitation]:
    """Decode the first MOAT layer in ``pkt`` with the strict codec (MalformedMessage if bad).

    The codec reads the layer's bytes, so a captured packet is judged exactly as an agent
    would judge it.
    """
    for layer in (MoatRRQ, MoatRRP):
        if layer in pkt:
            return decode_registration(bytes(pkt[layer]))
    if MoatControl in pkt:
        return ControlMessage.decode(bytes(pkt[MoatControl]))
    if ICMP in pkt and pkt[ICMP].type in (
        IcmpType.ROUTER_ADVERTISEMENT, IcmpType.ROUTER_SOLICITATION
    ):
        icmp = pkt[ICMP]
        raw = bytes(icmp)
        if icmp.type == IcmpType.ROUTER_ADVERTISEMENT:
            return AgentAdvertisement.decode(raw)
        return AgentSolicitation.decode(raw)
    raise MalformedMessage(f"no MOAT layer in {pkt.summary()}")


# --------------------------------------------------------------------------------------------
# Bindings
# --------------------------------------------------------------------------------------------


def _take_over_mip_port() -> None:
    """Remove the stock UDP->MobileIP dissection bindings and bind the MOAT dispatcher."""
    split_bottom_up(UDP, MobileIP, dport=MIP_PORT)
    split_bottom_up(UDP, MobileIP, sport=MIP_PORT)
    left = [fval for fval, cls in UDP.payload_guess if cls is MobileIP]
    if left:  # a Scapy that binds differently: say so rather than silently lose to it
        log.warning("stock MobileIP still bound on UDP with %s; MOAT layers may not win", left)
    bind_bottom_up(UDP, MoatMobileIP, dport=MIP_PORT)
    bind_bottom_up(UDP, MoatMobileIP, sport=MIP_PORT)
    # Building UDP()/MoatRRQ() (or MoatRRP) fills in port 434 on both ends, as the stock does.
    for cls in (MoatRRQ, MoatRRP):
        bind_top_down(UDP, cls, sport=MIP_PORT, dport=MIP_PORT)


def _install_icmp_fallback() -> None:
    """Make ``ICMP`` consult the binding table when its own guess has no answer.

    Idempotent across re-imports: the stock method is remembered on the wrapper, so a second
    install wraps the stock method again rather than our previous wrapper.
    """
    current = ICMP.guess_payload_class
    stock = getattr(current, "_moat_stock", current)

    def guess_payload_class(self: ICMP, payload: bytes) -> Any:
        cls = stock(self, payload)
        if cls is None:
            return Packet.guess_payload_class(self, payload)
        return cls

    guess_payload_class._moat_stock = stock  # type: ignore[attr-defined]
    ICMP.guess_payload_class = guess_payload_class  # type: ignore[method-assign]


_install_icmp_fallback()
_take_over_mip_port()
bind_layers(ICMP, MoatAgentAdvertisement, type=int(IcmpType.ROUTER_ADVERTISEMENT))
for _port in (CONTROL_PORT, SERVICE_PORT):
    for _l4 in (UDP, TCP):
        bind_bottom_up(_l4, MoatControl, dport=_port)
        bind_bottom_up(_l4, MoatControl, sport=_port)
for _l4 in (UDP, TCP):
    bind_top_down(_l4, MoatControl, sport=CONTROL_PORT, dport=CONTROL_PORT)
del _port, _l4
log.debug("MOAT Scapy layers bound: UDP %d, ICMP 9, UDP/TCP %d and %d",
          MIP_PORT, CONTROL_PORT, SERVICE_PORT)
