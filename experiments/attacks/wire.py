"""The messages the attacks send: taken from the run's captures or crafted.

Crafted messages use the codecs of :mod:`packets` (the same bytes the agents parse); captured
ones come out of the run's pcaps with Scapy, TCP streams put back in order so a message that
spans segments (a STATE_TRANSFER) comes out whole.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
from pathlib import Path
from typing import Any, Callable

from agent.core import msgauth
from packets import (
    AdvFlags,
    AgentAdvertisement,
    ControlMessage,
    ControlType,
    ExtType,
    MalformedMessage,
    NaiExtension,
    RegistrationRequest,
    RequestFlags,
    append_auth,
    new_identification,
)
from packets.control import frame_length

__all__ = ["udp_payloads", "control_messages", "forged_request", "advertisement", "sign_for",
           "is_auth_refusal", "AUTH_REFUSAL"]

log = logging.getLogger(__name__)

#: The words of a refusal by authentication (MessageAuthError and what wraps it), as opposed
#: to a refusal by the handler after the message was accepted as authentic.
AUTH_REFUSAL = re.compile(
    r"authenticat|signature|signer|replay|nonce|receiver|addressed to|not for this|router key|"
    r"not authorized|outside the .* window|bad_credentials|unknown corresponding object|"
    r"credential", re.I)


def is_auth_refusal(answer: dict[str, Any] | None) -> bool:
    """``answer`` (a decoded control answer) refused the message for its authenticator."""
    if not isinstance(answer, dict) or answer.get("ok") is not False:
        return False
    text = " ".join(str(answer.get(k) or "") for k in ("error", "reason", "kind"))
    return bool(AUTH_REFUSAL.search(text))


def udp_payloads(pcap: Path, port: int) -> list[tuple[str, str, bytes, int]]:
    """(source, destination, payload, source port) of every UDP datagram to ``port``."""
    from scapy.layers.inet import IP, UDP
    from scapy.utils import PcapReader

    out = []
    with PcapReader(str(pcap)) as reader:
        for pkt in reader:
            if IP in pkt and UDP in pkt and pkt[UDP].dport == port:
                out.append((pkt[IP].src, pkt[IP].dst, bytes(pkt[UDP].payload), int(pkt[UDP].sport)))
    return out


def control_messages(pcap: Path, port: int = 4340) -> list[tuple[str, str, bytes]]:
    """(source, destination, message bytes) of every MOAT control message sent TO ``port``
    over TCP in ``pcap``, each stream reassembled by sequence number."""
    from scapy.layers.inet import IP, TCP
    from scapy.utils import PcapReader

    streams: dict[tuple, dict[int, bytes]] = {}
    with PcapReader(str(pcap)) as reader:
        for pkt in reader:
            if IP in pkt and TCP in pkt and pkt[TCP].dport == port and len(pkt[TCP].payload):
                key = (pkt[IP].src, pkt[IP].dst, pkt[TCP].sport)
                streams.setdefault(key, {})[pkt[TCP].seq] = bytes(pkt[TCP].payload)
    out = []
    for (src, dst, _sport), segments in streams.items():
        data, expect = b"", None
        for seq in sorted(segments):
            if expect is not None and seq != expect:
                if seq < expect:
                    continue  # retransmission
                break  # a gap: the rest cannot be framed
            data += segments[seq]
            expect = seq + len(segments[seq])
        while data:
            try:
                n = frame_length(data)
            except MalformedMessage:
                break
            if len(data) < n:
                break
            out.append((src, dst, data[:n]))
            data = data[n:]
    return out


def forged_request(home: str, home_agent: str, care_of: str, nai: str, mh_spi: int,
                   mf_spi: int | None = None, key: bytes | None = None,
                   fh_spi: int | None = None, lifetime: int = 60) -> bytes:
    """A registration request for ``home`` with authenticators under a key the attacker
    guessed (``key``, random by default): Mobile-Home under ``mh_spi``, then Mobile-Foreign
    under ``mf_spi`` (for an FOA) or Foreign-Home under ``fh_spi`` (as if relayed); lifetime
    0 with ``care_of == home`` is a deregistration, which goes to the HOA directly."""
    key = key or os.urandom(32)
    rrq = RegistrationRequest(home, home_agent, care_of, new_identification(), lifetime,
                              RequestFlags.G, [NaiExtension(nai)])
    data = append_auth(rrq.encode(), ExtType.MOBILE_HOME_AUTH, mh_spi, key)
    if mf_spi is not None:
        data = append_auth(data, ExtType.MOBILE_FOREIGN_AUTH, mf_spi, key)
    if fh_spi is not None:
        data = append_auth(data, ExtType.FOREIGN_HOME_AUTH, fh_spi, key)
    return data


def advertisement(address: str, sequence: int = 1) -> bytes:
    """An agent advertisement (ICMP 9 body) offering ``address`` as FOA care-of address."""
    return AgentAdvertisement(sequence, 600, AdvFlags.F | AdvFlags.G | AdvFlags.R,
                              [address], [(address, 0)], prefix_lengths=[24]).encode()


_RECEIVER_PARAMS = ("receiver", "to", "audience", "recipient", "peer")


def sign_for(sign: Callable[..., dict[str, Any]], ctype: ControlType, txid: int,
             body: dict[str, Any], key: Any, receiver: str, **kwargs: Any) -> dict[str, Any]:
    """``body`` signed by ``sign`` (msgauth.sign_hmac / sign_ed25519) for ``receiver`` if the
    signer takes a receiver (issue 12 item 3), else as the signer signs today."""
    params = inspect.signature(sign).parameters
    for name in _RECEIVER_PARAMS:
        if name in params:
            kwargs[name] = receiver
            break
    return sign(int(ctype), txid, body, key, **kwargs)


def control(ctype: ControlType, body: dict[str, Any], txid: int = 7) -> bytes:
    return ControlMessage(ctype, txid, body).encode()


def hmac_signed(ctype: ControlType, body: dict[str, Any], key: bytes, receiver: str,
                key_id: str = "routers", txid: int = 7) -> bytes:
    """A control message signed with HMAC under ``key`` for ``receiver``."""
    return control(ctype, sign_for(msgauth.sign_hmac, ctype, txid, body, key, receiver,
                                   key_id=key_id), txid)


def ed25519_signed(ctype: ControlType, body: dict[str, Any], key: Any, key_id: str,
                   receiver: str, txid: int = 7) -> bytes:
    return control(ctype, sign_for(msgauth.sign_ed25519, ctype, txid, body, key, receiver,
                                   key_id=key_id), txid)
