"""The hand-packed gratuitous ARP is the frame Scapy builds, and bad input is refused."""

from __future__ import annotations

import time

import pytest
from scapy.layers.l2 import ARP, Ether

from agent.mobility.arp import gratuitous_arp
from agent.mobility.arpframe import ArpFrameError, gratuitous_arp_frame, mac_bytes


@pytest.mark.parametrize("mac, address", [("02:00:00:00:00:01", "10.16.0.100"),
                                          ("fe:dc:ba:98:76:54", "10.16.7.254"),
                                          ("0:1:2:3:4:5", "0.0.0.1")])
def test_the_frame_is_scapys_byte_for_byte(mac: str, address: str) -> None:
    scapy = bytes(Ether(src=mac, dst="ff:ff:ff:ff:ff:ff") / ARP(
        op=1, hwsrc=mac, psrc=address, hwdst="00:00:00:00:00:00", pdst=address))
    assert gratuitous_arp_frame(mac, address) == scapy
    assert gratuitous_arp("unused", address, mac) == scapy
    parsed = Ether(gratuitous_arp_frame(mac, address))
    assert parsed[ARP].psrc == parsed[ARP].pdst == address and parsed[ARP].op == 1


@pytest.mark.parametrize("mac, address", [("02:00:00:00:00", "10.16.0.1"),
                                          ("02:00:00:00:00:0g", "10.16.0.1"),
                                          ("02:00:00:00:00:100", "10.16.0.1"),
                                          ("02:00:00:00:00:01", "10.16.0.256"),
                                          ("02:00:00:00:00:01", "::1"),
                                          (None, "10.16.0.1")])
def test_bad_addresses_are_refused(mac, address) -> None:
    with pytest.raises(ArpFrameError):
        gratuitous_arp_frame(mac, address)


def test_a_thousand_frames_take_well_under_a_second() -> None:
    assert mac_bytes("aa:bb:cc:dd:ee:ff") == bytes.fromhex("aabbccddeeff")
    start = time.process_time()
    for i in range(1000):
        gratuitous_arp_frame("02:00:00:00:00:01", f"10.16.{i // 250}.{i % 250 + 1}")
    assert time.process_time() - start < 0.3  # Scapy: about 0.6 s for as many


def test_a_gratuitous_reply_names_the_announcer_as_target_too() -> None:
    """A forwarding router updates an entry it is resolving from a gratuitous reply only."""
    from scapy.layers.l2 import ARP, Ether

    from agent.mobility.arpframe import ARP_REPLY, ArpFrameError, gratuitous_arp_frame

    pkt = Ether(gratuitous_arp_frame("02:00:00:00:00:0c", "10.16.0.100", ARP_REPLY))
    assert pkt.dst == "ff:ff:ff:ff:ff:ff" and pkt[ARP].op == 2
    assert pkt[ARP].psrc == pkt[ARP].pdst == "10.16.0.100"
    assert pkt[ARP].hwsrc == pkt[ARP].hwdst == "02:00:00:00:00:0c"
    import pytest
    with pytest.raises(ArpFrameError):
        gratuitous_arp_frame("02:00:00:00:00:0c", "10.16.0.100", 3)
