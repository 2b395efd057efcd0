"""The attack classes of ``moat run attacks``: what each sends and what must refuse it.

Pure data: the driver runs them in :data:`ORDER`, the report prints ``expected`` beside what
happened and, for a class that does not hold, ``defence`` (which part of issue 12 should
have refused it).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["AttackClass", "CLASSES", "ORDER", "SHORT", "by_name"]


@dataclass(frozen=True)
class AttackClass:
    """One class of attack: its name, what it sends, the refusal expected, the defence."""

    name: str
    sends: str
    expected: str
    defence: str


CLASSES: tuple[AttackClass, ...] = (
    AttackClass("registration_replay",
                "a registration request captured on net 12, resent from att12 to the FOA and the HOA (UDP 434)",
                "denied: 133 identification mismatch (or the FOA refuses a visitor from another "
                "host); binding and visitor unchanged",
                "replay check (RFC 5944 §5.7) and FOA visitor binding (issue 12 item 5, H4)"),
    AttackClass("forged_authenticators",
                "registrations with a wrong Mobile-Home (to the HOA), Foreign-Home (to the HOA) and "
                "Mobile-Foreign (to the FOA) authenticator (UDP 434)",
                "131 / 132 / 67; no binding or visitor changes",
                "RFC 5944 authenticators"),
    AttackClass("binding_hijack",
                "a registration for the victim's home address with att12 as care-of address, "
                "under the victim's SPI and a guessed key, to the HOA and through the FOA",
                "131 (HOA) / 67 (FOA); the victim's binding unchanged",
                "Mobile-Home / Mobile-Foreign authenticators"),
    AttackClass("foa_impersonation",
                "advertisements as an FOA from att12 (ICMP 9, TTL 1, F flag); a replayed request to "
                "the FOA followed by a forged denial (129) from att12 answering the relay",
                "the forged denial is ignored (only the relayed-to HOA answers); bindings unchanged",
                "relay answered only by the relayed-to HOA (issue 12 item 5, H4)"),
    AttackClass("advertisement_spoofing",
                "agent advertisements with TTL 64 (on-link source) and with an off-link source "
                "(TTL 1) on net 12 (ICMP 9)",
                "dropped: neither appears in the routers' tables of heard agents",
                "advertisements need TTL 1 and an on-link source (issue 12 item 5, H4)"),
    AttackClass("forged_in_band",
                "PROVISION, MIGRATE, STATE_TRANSFER, VM_NEGOTIATE, SERVICE_REGISTER, LEASE_REVOKE, "
                "LEASE_REQUEST/RENEW/CANCEL unsigned, under a wrong key, and signed with the run's "
                "key for another receiver (TCP 4340)",
                "refused by authentication (ok: false, an authenticator error), nothing changed",
                "in-band authenticators naming the receiver, fail closed (issue 12 item 3, H1)"),
    AttackClass("in_band_replay",
                "MIGRATE / STATE_TRANSFER captured during a real migration and a CO's LEASE_REQUEST, "
                "resent to their receivers and to a third router (TCP 4340)",
                "refused as replayed / not for this receiver; objects and leases unchanged",
                "replay protection and receiver binding (issue 12 item 3, H1)"),
    AttackClass("flood_tcp_4340",
                "TCP 4340 connection flood, each connection a header claiming a 1 MiB body and "
                "a few bytes of it, held open",
                "connections beyond the limit refused, half-sent frames closed at the deadline; "
                "agent memory bounded; ping and a legit request answered after",
                "connection limit and read deadline on TCP 4340 (issue 12 item 8)"),
    AttackClass("flood_udp_434",
                "UDP 434 flood of mutated registration requests to the HOA",
                "refused without a log line each (log growth bounded); memory bounded; a legit "
                "registration accepted after",
                "rate-limited UDP 434 logs (issue 12 item 8, H4)"),
    AttackClass("flood_icmp_9",
                "ICMP 9 flood of advertisements from thousands of spoofed sources on net 12",
                "tables of heard agents bounded; memory bounded; ping answered after",
                "bounded discovery tables, on-link source (issue 12 items 5, 8, H4)"),
    AttackClass("flood_udp_4340",
                "UDP 4340 broker solicitations flood (to 224.0.0.2 and the routers)",
                "answers rate-limited; memory bounded; ping answered after",
                "rate-limited broker advertiser"),
    AttackClass("flood_service_4341",
                "UDP and TCP 4341 service-request flood to the object's home address",
                "the object serves a legit client after; its router's agent memory bounded",
                "object runtime limits"),
    AttackClass("at_most_once_poisoning",
                "a SERVICE_REQUEST spoofing a client's id with a huge sequence number; requests "
                "from thousands of fake client ids (UDP 4341)",
                "the real client is still answered; the at-most-once table stays bounded",
                "at-most-once bounds (issue 12 item 6, H5)"),
    AttackClass("wire_secrets",
                "nothing: every capture of the run searched for every key of the run (raw, hex, "
                "base64)",
                "no key found in any capture",
                "secrets sealed for the receiver (issue 12 item 1, H1)"),
    AttackClass("fuzz",
                "mutations of valid messages: registration requests (UDP 434), control messages "
                "(TCP/UDP 4340), service requests (UDP 4341), advertisements (ICMP 9)",
                "every agent alive and answering; bindings, visitors, objects unchanged",
                "strict codecs and field validation (issue 12 item 4, H6)"),
)

#: The order the driver runs them in: observation first, state-changing replays late, the
#: secrets scan after every capture is written, the fuzz last.
ORDER: tuple[str, ...] = (
    "registration_replay", "forged_authenticators", "binding_hijack", "foa_impersonation",
    "advertisement_spoofing", "forged_in_band", "at_most_once_poisoning", "flood_tcp_4340",
    "flood_udp_434", "flood_icmp_9", "flood_udp_4340", "flood_service_4341", "in_band_replay",
    "fuzz", "wire_secrets",
)

#: The netns test's short variant.
SHORT: tuple[str, ...] = ("registration_replay", "forged_authenticators", "binding_hijack",
                          "forged_in_band", "fuzz", "wire_secrets")


def by_name(name: str) -> AttackClass:
    """The class called ``name``; KeyError lists the known ones."""
    for cls in CLASSES:
        if cls.name == name:
            return cls
    raise KeyError(f"unknown attack class {name!r}; known: {', '.join(c.name for c in CLASSES)}")
