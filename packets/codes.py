"""Numbers of the wire protocol: ports, message and extension types, reply codes.

Everything here is a number some RFC or IANA registry fixed, or a number MOAT chose; the
choice is written next to each so that captures can be read against this file.
"""

from __future__ import annotations

import enum

#: UDP port of Mobile IPv4 registration (RFC 5944 §3).
MIP_PORT = 434
#: MOAT control protocol (broker, provisioning, VM negotiation) on UDP and TCP.
CONTROL_PORT = 4340
#: Object service requests (corresponding object -> mobile object) on UDP and TCP.
SERVICE_PORT = 4341
#: IANA Private Enterprise Number reserved for documentation (RFC 5612); MOAT's NVSE vendor.
MOAT_VENDOR_ID = 32473
#: IP protocol number of GRE.
GRE_PROTO = 47


class MessageType(enum.IntEnum):
    """First byte of a Mobile IPv4 message on UDP 434."""

    REGISTRATION_REQUEST = 1
    REGISTRATION_REPLY = 3


class IcmpType(enum.IntEnum):
    """ICMP types used for agent discovery (RFC 1256 / RFC 5944 §2)."""

    ROUTER_ADVERTISEMENT = 9
    ROUTER_SOLICITATION = 10


class ExtType(enum.IntEnum):
    """Extension types. Types 0-127 are non-skippable, 128-255 skippable (RFC 5944 §1.9)."""

    PAD = 0  # advertisements only, one byte, no length
    MOBILITY_AGENT_ADV = 16
    PREFIX_LENGTHS = 19
    MOBILE_HOME_AUTH = 32
    MOBILE_FOREIGN_AUTH = 33
    FOREIGN_HOME_AUTH = 34
    MN_NAI = 131  # RFC 2794
    NVSE = 134  # RFC 3115 Normal Vendor/Organization Specific Extension


AUTH_EXT_TYPES = frozenset(
    {ExtType.MOBILE_HOME_AUTH, ExtType.MOBILE_FOREIGN_AUTH, ExtType.FOREIGN_HOME_AUTH}
)


def is_skippable(ext_type: int) -> bool:
    """RFC 5944 §1.9: a receiver may skip an unknown extension only if its type is >= 128."""
    return ext_type >= 128


class NvseType(enum.IntEnum):
    """MOAT's Vendor-NVSE-Type values under Vendor-ID 32473."""

    CARE_OF_NAME = 1  # UTF-8 name given by the FOA, unique on the foreign network
    OBJECT_PART = 2  # role, part id, parent object name
    GRE_KEY = 3  # 4-byte GRE key of the binding, told by the HOA in an accepted reply
    #: The object's mobile network prefix (4-byte address, 1-byte length), after NEMO for
    #: Mobile IPv4 (RFC 5177): the addresses of its secondary objects, which the HOA sends
    #: to the object's care-of address and the object, as their home agent, on to them.
    MOBILE_NETWORK = 4


class PartRole(enum.IntEnum):
    """What a registering object is, relative to the service it belongs to (patent Fig. 6)."""

    PRIMARY = 0  # the mobile object itself (104/106)
    DUPLICATE = 1  # a full copy (108/110)
    SECONDARY = 2  # a part of the service (112/114)


class ReplyCode(enum.IntEnum):
    """Registration Reply codes, numbered as in RFC 5944 §3.4."""

    ACCEPTED = 0
    ACCEPTED_NO_SIMULTANEOUS = 1
    # denied by the foreign agent
    FA_REASON_UNSPECIFIED = 64
    FA_ADMIN_PROHIBITED = 65
    FA_INSUFFICIENT_RESOURCES = 66
    FA_MN_FAILED_AUTH = 67
    FA_HA_FAILED_AUTH = 68
    FA_LIFETIME_TOO_LONG = 69
    FA_POORLY_FORMED_REQUEST = 70
    FA_POORLY_FORMED_REPLY = 71
    FA_ENCAPSULATION_UNAVAILABLE = 72
    FA_RESERVED_UNAVAILABLE = 73
    FA_REVERSE_TUNNEL_UNAVAILABLE = 74
    FA_REVERSE_TUNNEL_T_BIT_NOT_SET = 75
    FA_MN_TOO_DISTANT = 76
    FA_INVALID_COA = 77
    FA_REGISTRATION_TIMEOUT = 78
    FA_DELIVERY_STYLE_UNSUPPORTED = 79
    FA_HOME_NETWORK_UNREACHABLE = 80
    FA_HA_HOST_UNREACHABLE = 81
    FA_HA_PORT_UNREACHABLE = 82
    FA_HA_UNREACHABLE = 88
    # denied by the home agent
    HA_REASON_UNSPECIFIED = 128
    HA_ADMIN_PROHIBITED = 129
    HA_INSUFFICIENT_RESOURCES = 130
    HA_MN_FAILED_AUTH = 131
    HA_FA_FAILED_AUTH = 132
    HA_IDENTIFICATION_MISMATCH = 133
    HA_POORLY_FORMED_REQUEST = 134
    HA_TOO_MANY_SIMULTANEOUS_BINDINGS = 135
    HA_UNKNOWN_HA_ADDRESS = 136
    #: RFC 5177: the object may not register this mobile network prefix.
    HA_PREFIX_NOT_AUTHORIZED = 142

    @property
    def accepted(self) -> bool:
        """True for the two codes that grant a registration."""
        return self in (ReplyCode.ACCEPTED, ReplyCode.ACCEPTED_NO_SIMULTANEOUS)

    @property
    def by_foreign_agent(self) -> bool:
        """True for denials issued by a foreign agent (64-127)."""
        return 64 <= self < 128


class ControlType(enum.IntEnum):
    """Message types of the MOAT control protocol (header + JSON body)."""

    ERROR = 0
    PROVISION = 1
    PROVISION_REPLY = 2
    LEASE_REQUEST = 3
    LEASE_GRANT = 4
    LEASE_RENEW = 5
    LEASE_CANCEL = 6
    SERVICE_REQUEST = 7
    SERVICE_REPLY = 8
    MIGRATE = 9
    STATE_TRANSFER = 10
    #: Between routers (Fig. 12, steps 210-214): a capacity query, a reservation, its
    #: release, and the start of a duplicate under a reservation; answered with VM_OFFER.
    VM_NEGOTIATE = 11
    VM_OFFER = 12
    #: The service broker on a LAN (periodic, TTL 1 to 224.0.0.1, or the answer to a
    #: solicitation) and a corresponding object asking for it (Fig. 12, step 200).
    BROKER_ADVERT = 13
    BROKER_SOLICIT = 14
    #: A VM's service instance joins or leaves the broker's directory (Fig. 10, 160/162).
    SERVICE_REGISTER = 15
    SERVICE_DEREGISTER = 16
    #: The broker tells an instance's router that a lease ended before its expiry.
    LEASE_REVOKE = 17
    #: A corresponding object asks the broker which services it knows.
    SERVICE_LIST = 18
    #: The broker asks the router of a service's primary instance to grow the service by a
    #: lease it cannot meet (Fig. 12, steps 210-222): find room, negotiate, move all or part.
    SERVICE_GROW = 19
    #: The broker tells an instance's router that a duplicate holds no lease any more:
    #: stop it, free its resources, delete its binding (Fig. 12, step 230).
    INSTANCE_RELEASE = 20
