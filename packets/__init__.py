"""MOAT wire formats: codecs and Scapy layers, no sockets and no threads.

Modules, each named for what it holds:

* :mod:`packets.codes` — ports, message/extension types, RFC 5944 reply codes.
* :mod:`packets.errors` — :class:`MalformedMessage`, the one error every decoder raises.
* :mod:`packets.mobileip` — Registration Request/Reply (UDP 434).
* :mod:`packets.extensions` — MN-NAI, NVSE (care-of-name, object part), authentication.
* :mod:`packets.auth` — HMAC-SHA-256 authenticators over the RFC 5944 §3.5 bytes.
* :mod:`packets.ident` — NTP Identification and the replay check.
* :mod:`packets.advert` — Agent Advertisement / Solicitation (ICMP 9 / 10).
* :mod:`packets.control` — MOAT control header + JSON body.
* :mod:`packets.gre` — GRE with key (RFC 2784/2890).
* :mod:`packets.scapy_layers` — the same formats as Scapy layers for sniff()/rdpcap().

``packets`` imports nothing else of MOAT.
"""

from .advert import AdvFlags, AgentAdvertisement, AgentSolicitation, decode_discovery
from .auth import append_auth, bytes_before, verify_auth
from .codes import (
    CONTROL_PORT,
    MIP_PORT,
    MOAT_VENDOR_ID,
    SERVICE_PORT,
    ControlType,
    ExtType,
    NvseType,
    PartRole,
    ReplyCode,
)
from .control import ControlMessage
from .errors import MalformedMessage
from .extensions import (
    AuthExtension,
    CareOfName,
    GreKey,
    MobileNetwork,
    NaiExtension,
    ObjectPart,
    UnknownExtension,
    VendorExtension,
)
from .gre import GreHeader, decode_gre
from .ident import new_identification, ntp_to_unix, replay_ok, unix_to_ntp
from .mobileip import (
    RegistrationReply,
    RegistrationRequest,
    RequestFlags,
    decode_registration,
)

__all__ = [
    "AdvFlags", "AgentAdvertisement", "AgentSolicitation", "AuthExtension", "CareOfName",
    "CONTROL_PORT", "ControlMessage", "ControlType", "ExtType", "GreHeader", "GreKey", "MIP_PORT", "MobileNetwork",
    "MOAT_VENDOR_ID", "MalformedMessage", "NaiExtension", "NvseType", "ObjectPart", "PartRole",
    "RegistrationReply", "RegistrationRequest", "ReplyCode", "RequestFlags", "SERVICE_PORT",
    "UnknownExtension", "VendorExtension", "append_auth", "bytes_before", "decode_discovery",
    "decode_gre", "decode_registration", "new_identification", "ntp_to_unix", "replay_ok",
    "unix_to_ntp", "verify_auth",
]
