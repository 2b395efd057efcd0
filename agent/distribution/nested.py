"""A mobile object as the home agent of its secondary objects (patent: "mobile object 104 acts
as a home object agent for secondary mobile objects 112"; wire design after NEMO for Mobile
IPv4, RFC 5177).

The object registers its *mobile network prefix* with its HOA together with its home address
(the mobile-network NVSE): the HOA keeps one binding, the object's, and sends packets for the
prefix where it sends the object's. The object's parts answer on addresses of that prefix.
While a part runs beside the object, its address is on the same router's loopback and the
kernel delivers it there. When the part moves (a *secondary* on another router's VM), it
registers through that network's FOA with the object as its home agent — home agent address
= the object's home address, UDP 434 — and this module, on the object's router:

* decides on the registration with the same RFC 5944 rules as the HOA
  (:class:`agent.mobility.home.HomeAgent`: the part's Mobile-Home key, replay check), except
  that no Foreign-Home key is required of the FOA (RFC 5944 makes FA-HA authentication
  optional; the MH key, which only the object's router and the part's router hold, is
  checked); its replies carry a Foreign-Home authenticator under the run's nested-home
  credential (derived from the router key), which every FOA accepts;
* keeps the secondaries' bindings and tunnels their packets to their care-of addresses in GRE
  with the binding's key, with the object's home address as the outer source, through its own
  userspace tunnel (``mnh<k>``): a packet for a secondary crosses two tunnels, HOA → the
  object's FOA, then the object's router → the secondary's FOA, which the captures show.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

from packets import MalformedMessage, RegistrationRequest, decode_registration
from packets.codes import MIP_PORT

from agent.core.config import HomeConfig, HomeObject, ObjectConfig
from agent.mobility.dataplane import DataPlane
from agent.mobility.foreign import nested_home_credential
from agent.mobility.home import HomeAgent
from agent.vm.parts import MAX_PARTS, PART_SPI_BASE, part_configs, part_credential

__all__ = ["MAX_PARTS", "PART_SPI_BASE", "NestedHomeAgent", "part_configs", "part_credential"]

log = logging.getLogger(__name__)

IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)
class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, owner: "NestedHomeAgent") -> None:
        self.owner = owner

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        try:
            self.owner.on_datagram(data, addr)
        except Exception:  # noqa: BLE001 - one bad message must not stop the agent
            log.exception("nested home agent: a message from %s failed", addr[0])


class NestedHomeAgent:
    """UDP 434 on the object's home address, the parts' bindings, and a tunnel to them."""

    def __init__(self, primary: ObjectConfig, parts: dict[str, ObjectConfig],
                 router_key: bytes, tunnel_name: str) -> None:
        self.primary = primary
        self.parts = parts
        config = HomeConfig(objects=[HomeObject(c.home_address, c.nai, c.mobile_home)
                                     for c in parts.values()], max_bindings=1)
        self.home = HomeAgent(config, primary.home_address)
        self.home.require_foreign_auth = False
        self.home.reply_credential = nested_home_credential(router_key)
        self.tunnel_name = tunnel_name
        self.dataplane: DataPlane | None = None
        self._transport: asyncio.DatagramTransport | None = None
        self.malformed = 0

    async def start(self) -> None:
        from agent.mobility.tunnel import open_tunnel

        tunnel = await open_tunnel("userspace", local=self.primary.home_address,
                                   name=self.tunnel_name)
        self.dataplane = DataPlane(tunnel, set())
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
            sock.bind((self.primary.home_address, MIP_PORT))
        except OSError:
            sock.close()
            await tunnel.aclose()
            raise
        loop = asyncio.get_running_loop()
        self._transport, _ = await loop.create_datagram_endpoint(lambda: _Protocol(self),
                                                                 sock=sock)
        log.info("nested home agent of %s on %s:%d for %s", self.primary.name,
                 self.primary.home_address, MIP_PORT, sorted(self.parts))

    def on_datagram(self, data: bytes, addr: tuple) -> None:
        try:
            msg = decode_registration(data)
        except MalformedMessage as exc:
            self.malformed += 1  # counted, logged at debug: a flood writes no log
            log.debug("nested home agent: malformed message from %s: %s", addr[0], exc)
            return
        if not isinstance(msg, RegistrationRequest) or msg.home_agent != self.primary.home_address:
            self.malformed += 1
            return
        decision = self.home.handle(msg)
        assert self._transport is not None
        self._transport.sendto(decision.reply, addr)
        # Accepted registrations are few (one per part and lifetime); refusals, which anyone
        # can provoke before authentication, go to debug (the HOA's counters keep them).
        log.log(logging.INFO if decision.update is not None else logging.DEBUG,
                "nested home agent of %s: %s for %s via %s (coa %s)", self.primary.name,
                decision.code.name, msg.home_address, addr[0], msg.care_of_address)
        if decision.update is not None:
            self.sync()

    def sync(self) -> None:
        """The tunnel follows the bindings (a host route per away part into ``mnh<k>``)."""
        if self.dataplane is not None:
            self.dataplane.sync_home(self.home)

    def housekeeping(self) -> None:
        for gone in self.home.bindings.expire():
            log.info("nested home agent: binding of %s expired", gone.home_address)
        self.sync()

    def bindings(self) -> list[dict[str, Any]]:
        return self.home.bindings.snapshot()

    async def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        if self.dataplane is not None:
            await self.dataplane.close()
            self.dataplane = None
