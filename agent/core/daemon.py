"""The agent daemon: one asyncio process per router, roles switched on by configuration.

It owns the sockets (raw ICMP for discovery, UDP 434 for registration, AF_PACKET for proxy
ARP, a Unix control socket) and feeds what arrives to the pure role logic in
:mod:`agent.mobility.home`, :mod:`agent.mobility.foreign` and :mod:`agent.mobility.client`. Every handler catches and
logs its own failures: a malformed packet or a bug in one message must never stop the daemon.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packets import (
    ControlMessage,
    ControlType,
    AdvFlags,
    AgentAdvertisement,
    AgentSolicitation,
    MalformedMessage,
    RegistrationReply,
    RegistrationRequest,
    decode_registration,
)
from packets.auth import find_auth
from packets.codes import MIP_PORT, SERVICE_PORT, ExtType

from agent.mobility.arp import ProxyArp, announce
from agent.core.config import AgentConfig, ObjectConfig
from agent.core.control import ControlServer
from agent.mobility.discovery import ALL_ROUTERS, ALL_SYSTEMS, DiscoverySocket, Heard
from agent.core.errors import AgentError, ControlError
from agent.mobility.foreign import ForeignAgent
from agent.mobility.home import HomeAgent
from agent.mobility.client import RegistrationClient
from agent.core.msgauth import MessageAuthError, ReplayCache, strip, verify_hmac
from agent.hosting.migration import MODES, REGISTER_TIMEOUT, MigrationFailed, MigrationReport, PeerServer, peer_call
from agent.hosting.cgroups import CgroupManager, Limits
from agent.hosting.runtime import ObjectProcess, ObjectProcessError

log = logging.getLogger(__name__)


def flag_letters(flags: AdvFlags) -> str:
    """'RFGT' rather than an integer, as the RFC and Wireshark write them."""
    return "".join(f.name or "" for f in AdvFlags if f in flags)

@dataclass
class HostedObject:
    """An object this router hosts: its registration client and/or its running process."""

    name: str
    home_address: str
    client: RegistrationClient | None = None
    process: ObjectProcess | None = None
    #: (VM, manifest object) when a provisioned VM runs the object's code; None when it
    #: was placed directly (an experiment's ``object_start``).
    vm: tuple[str, str] | None = None
    #: The sandbox resources of a directly placed object (they travel when it migrates).
    resources: dict[str, Any] | None = None

    def status(self) -> dict:
        status = self.client.status() if self.client else {
            "name": self.name, "home_address": self.home_address, "at_home": None,
            "registration": None, "agents": [], "attempts": [], "bad_replies": 0}
        status["pid"] = self.process.pid if self.process else None
        status["vm"] = list(self.vm) if self.vm else None
        status["usage"] = self.process.usage() if self.process else None
        return status


class _Move:
    """What a migration needs to know about the object it moves, taken before it stops."""

    def __init__(self, hosted: HostedObject, config: dict[str, Any]) -> None:
        assert hosted.process is not None
        self.hosted = hosted
        self.config = config
        self.spec = hosted.process.spec
        self.resources = hosted.resources
        self.vm = hosted.vm


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


HOUSEKEEPING_PERIOD = 0.25
LIFECYCLE_PERIOD = 0.5
FAULT_POINTS = ("migrate_start", "state_transfer")
PENDING_TIMEOUT = 5.0


class _MipProtocol(asyncio.DatagramProtocol):
    def __init__(self, daemon: "AgentDaemon") -> None:
        self.daemon = daemon

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        try:
            self.daemon.on_registration(data, addr)
        except Exception:  # noqa: BLE001 - one bad message must not stop the agent
            log.exception("registration handler failed on a message from %s", addr[0])

    def error_received(self, exc: Exception) -> None:
        log.info("UDP 434 error: %s", exc)


class AgentDaemon:
    """Sockets, timers and control commands around the role logic."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.started_at = time.time()
        self.ifindex = {i.name: socket.if_nametoindex(i.name) for i in config.interfaces}
        self.iface_by_index = {v: k for k, v in self.ifindex.items()}
        self.advertising = {i.name: i.advertise for i in config.interfaces}
        #: Set by the `advertising` command: the agent falls silent (it left the link).
        self.paused = False
        #: Failure injection for experiments and tests: point -> how many times to refuse.
        self.faults: dict[str, int] = {}
        self.heard: dict[str, dict[str, Any]] = {}
        self.objects: dict[str, HostedObject] = {}
        self.malformed = 0
        self.sequence = 0
        self.home: HomeAgent | None = None
        self.foreign: ForeignAgent | None = None
        self.proxy_arp: ProxyArp | None = None
        self._mip: asyncio.DatagramTransport | None = None
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self.tunnel: Any = None
        self.vm: Any = None
        #: One cgroup manager for every object this router runs (VM or placed directly).
        self.cgroups = CgroupManager(config.run_id, owner=config.name)
        #: MIGRATE / STATE_TRANSFER are signed and checked under this key (agent.core.msgauth).
        self.router_key = bytes.fromhex(config.router_key) if config.router_key else None
        self._peer_replays = ReplayCache()
        #: What the data plane currently has installed, to reconcile against the tables.
        self._home_peers: dict[str, list[tuple[str, int]]] = {}
        self._foreign_paths: dict[str, tuple[str, int, str | None, bool]] = {}

    # --- set-up and tear-down ------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.config
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        self.discovery = DiscoverySocket(loop, self.on_discovery)
        for idx in self.ifindex.values():
            self.discovery.join(ALL_ROUTERS, idx)
        if "home" in cfg.roles:
            assert cfg.home is not None
            home_if = cfg.home.home_interface or cfg.interfaces[0].name
            address = next(i.address for i in cfg.interfaces if i.name == home_if)
            self.home = HomeAgent(cfg.home, address)
            self.proxy_arp = ProxyArp(loop, home_if)
        if "foreign" in cfg.roles:
            assert cfg.foreign is not None
            self.foreign = ForeignAgent(cfg.foreign, cfg.name, cfg.addresses)
        if self.home is not None or self.foreign is not None:
            from agent.mobility.tunnel import make_tunnel

            local = self.home.address if self.home is not None else cfg.interfaces[0].address
            self.tunnel = make_tunnel(cfg.tunnel_backend, loop=loop, local=local)
            self.tunnel.start()
            log.info("GRE tunnel backend: %s", self.tunnel.backend)
        self._mip, _ = await loop.create_datagram_endpoint(
            lambda: _MipProtocol(self), local_addr=("0.0.0.0", MIP_PORT), reuse_port=False
        )
        if cfg.vm is not None:
            from agent.vm.manager import VmBaseline, VmManager

            self.vm = VmManager(VmBaseline.from_json(cfg.vm), cfg.name, cfg.run_id,
                                {i.name: i.address for i in cfg.interfaces},
                                cgroups=self.cgroups, host=self)
        self.control = ControlServer(cfg.socket_path, self.handle_command)
        await self.control.start()
        self.peers = PeerServer(self.on_peer_message)
        await self.peers.start()
        self._tasks = [
            asyncio.create_task(self._advertise_loop(), name="advertise"),
            asyncio.create_task(self._housekeeping_loop(), name="housekeeping"),
        ]
        if self.vm is not None:
            self._tasks.append(asyncio.create_task(self._lifecycle_loop(), name="lifecycle"))
        log.info("agent %s up: roles=%s interfaces=%s pid=%d", cfg.name, cfg.roles,
                 [f"{i.name}={i.address}" for i in cfg.interfaces], os.getpid())
        await self._stop.wait()
        await self.shutdown()

    async def shutdown(self) -> None:
        log.info("agent %s stopping", self.config.name)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for name in list(self.objects):
            await self.cmd_object_stop(name, deregister=False)
        if self.vm is not None:
            await self.vm.close()
        await self.control.stop()
        await self.peers.stop()
        if self._mip:
            self._mip.close()
        self.discovery.close()
        if self.proxy_arp:
            self.proxy_arp.close()
        if self.tunnel is not None:
            for home in list(self._foreign_paths):
                self._set_local_route(home, None)
            self.tunnel.close()

    def stop(self) -> None:
        self._stop.set()

    # --- discovery -----------------------------------------------------------------------

    @property
    def is_agent(self) -> bool:
        return self.home is not None or self.foreign is not None

    def advertisement_for(self, ifname: str) -> AgentAdvertisement:
        iface = next(i for i in self.config.interfaces if i.name == ifname)
        flags = AdvFlags.G
        lifetimes = []
        coas: list[str] = []
        if self.home is not None and ifname == self.proxy_arp.ifname:  # type: ignore[union-attr]
            flags |= AdvFlags.H
            lifetimes.append(self.home.config.max_lifetime)
        if self.foreign is not None:
            flags |= AdvFlags.F | AdvFlags.R | AdvFlags.T
            coas = [iface.address]
            lifetimes.append(self.foreign.config.max_lifetime)
        self.sequence = self.sequence + 1 if self.sequence < 0xFFFF else 256
        return AgentAdvertisement(
            self.sequence, min(lifetimes) if lifetimes else 0, flags, coas,
            [(iface.address, 0)], self.config.advertisement_lifetime,
            prefix_lengths=[iface.prefix],
        )

    def advertise(self, ifname: str, dest: str = ALL_SYSTEMS) -> None:
        if self.home is None and self.foreign is None:
            return
        if not self.advertising[ifname] or self.paused:
            return
        if self.foreign is None and ifname != self.proxy_arp.ifname:  # type: ignore[union-attr]
            return  # a pure HOA advertises on its home link only
        self.discovery.send(self.advertisement_for(ifname).encode(), dest, self.ifindex[ifname])

    async def _advertise_loop(self) -> None:
        while True:
            for ifname in self.ifindex:
                self.advertise(ifname)
            await asyncio.sleep(self.config.advertise_interval)

    def on_discovery(self, heard: Heard) -> None:
        if isinstance(heard.message, AgentSolicitation):
            ifname = self.iface_by_index.get(heard.ifindex)
            if ifname is not None and self.is_agent:
                self.advertise(ifname)  # RFC 5944 §2.4: answer at once
            return
        adv = heard.message
        self.heard[heard.source] = {
            "address": heard.source, "interface": self.iface_by_index.get(heard.ifindex, "?"),
            "sequence": adv.sequence, "flags": flag_letters(adv.flags),
            "care_of_addresses": adv.care_of_addresses, "ttl": heard.ttl,
            "heard_at": time.time(),
        }
        for hosted in self.objects.values():
            if hosted.client is not None:
                hosted.client.on_advertisement(adv, heard.source, heard.ifindex)

    def solicit(self) -> None:
        payload = AgentSolicitation().encode()
        for idx in self.ifindex.values():
            self.discovery.send(payload, ALL_ROUTERS, idx)

    # --- registration --------------------------------------------------------------------

    def on_registration(self, data: bytes, addr: tuple) -> None:
        try:
            msg = decode_registration(data)
        except MalformedMessage as exc:
            self.malformed += 1
            log.info("malformed registration message from %s:%d: %s", addr[0], addr[1], exc)
            return
        if isinstance(msg, RegistrationRequest):
            self._on_request(msg, addr)
        else:
            self._on_reply(msg, addr)

    def _send(self, data: bytes, addr: tuple) -> None:
        assert self._mip is not None
        self._mip.sendto(data, addr)

    def _on_request(self, rrq: RegistrationRequest, addr: tuple) -> None:
        from_object = find_auth(rrq, ExtType.MOBILE_FOREIGN_AUTH) is not None
        if self.foreign is not None and from_object and rrq.care_of_address in self.config.addresses:
            relay = self.foreign.handle_request(rrq, addr[0], addr[1])
            if relay.to_object is not None:
                log.info("FOA: denied %s from %s: %s", rrq.home_address, addr[0], relay.code.name)
                self._send(relay.to_object, addr)
            if relay.to_home_agent is not None:
                log.info("FOA: relaying registration of %s to HOA %s", rrq.home_address, rrq.home_agent)
                self._send(relay.to_home_agent, (rrq.home_agent, MIP_PORT))
            return
        if self.home is not None and rrq.home_agent in self.config.addresses:
            decision = self.home.handle(rrq)
            self._send(decision.reply, addr)
            log.info("HOA: %s for %s via %s (coa %s, lifetime %d)", decision.code.name,
                     rrq.home_address, addr[0], rrq.care_of_address, rrq.lifetime)
            # Tunnel first, then claim the address on the home LAN: traffic the gratuitous
            # ARP attracts must find the tunnel already there.
            self.sync_home_dataplane()
            update = decision.update
            if update is not None and self.proxy_arp is not None:
                if update.first_away:
                    self.proxy_arp.start(rrq.home_address)
                if update.now_home:
                    self.proxy_arp.stop(rrq.home_address)
            return
        log.info("request for %s from %s is for no role of this agent; dropped",
                 rrq.home_address, addr[0])

    def _on_reply(self, rrp: RegistrationReply, addr: tuple) -> None:
        if self.foreign is None:
            log.info("reply from %s but this agent is no FOA; dropped", addr[0])
            return
        out = self.foreign.handle_reply(rrp)
        if out is None:
            log.info("unexpected or unauthenticated reply from %s for %s; dropped", addr[0], rrp.home_address)
            return
        pending, data = out
        log.info("FOA: reply %s for %s relayed to %s", rrp.code, rrp.home_address, pending.object_address)
        self.sync_foreign_dataplane()  # before the object learns it may use the path
        self._send(data, (pending.object_address, pending.object_port))

    # --- timers --------------------------------------------------------------------------

    async def _housekeeping_loop(self) -> None:
        while True:
            await asyncio.sleep(HOUSEKEEPING_PERIOD)
            try:
                self.housekeeping()
            except Exception:  # noqa: BLE001
                log.exception("housekeeping failed")

    async def _lifecycle_loop(self) -> None:
        """Retire VMs whose lifecycle policy is used up; upgrade those with a new version."""
        while True:
            await asyncio.sleep(LIFECYCLE_PERIOD)
            try:
                await self.vm.enforce()
                await self.vm.check_updates()
            except Exception:  # noqa: BLE001
                log.exception("lifecycle enforcement failed")

    def housekeeping(self) -> None:
        if self.home is not None:
            for b in self.home.bindings.expire():
                log.info("HOA: binding %s -> %s expired", b.home_address, b.care_of_address)
            if self.proxy_arp is not None:
                for address in self.proxy_arp.addresses - self.home.bindings.away():
                    self.proxy_arp.stop(address)
        if self.foreign is not None:
            for v in self.foreign.visitors.expire():
                log.info("FOA: visitor %s expired", v.home_address)
            self.foreign.expire_pending(PENDING_TIMEOUT)
        self.sync_home_dataplane()
        self.sync_foreign_dataplane()

    # --- data plane (agent.mobility.tunnel) -------------------------------------------------------

    def sync_home_dataplane(self) -> None:
        """HOA: tunnel each away object's home address to every live binding (bicast)."""
        if self.home is None or self.tunnel is None:
            return
        wanted: dict[str, list[tuple[str, int]]] = {}
        for b in self.home.bindings:
            wanted.setdefault(b.home_address, []).append((b.care_of_address, b.gre_key))
        for home in set(self._home_peers) | set(wanted):
            peers = sorted(wanted.get(home, []))
            if self._home_peers.get(home) != peers:
                self.tunnel.set_peers(home, peers)
                reverse = [b for b in self.home.bindings.for_home(home) if b.reverse_tunnel]
                for b in reverse:  # T: the FOA tunnels the object's replies back to us
                    self.tunnel.accept(b.care_of_address, b.gre_key)
                log.info("HOA data plane: %s -> %s", home, peers or "home (no tunnel)")
                if peers:
                    self._home_peers[home] = peers
                else:
                    self._home_peers.pop(home, None)

    def sync_foreign_dataplane(self) -> None:
        """FOA: accept each visitor's tunnel and route its home address to its router."""
        if self.foreign is None or self.tunnel is None:
            return
        wanted = {}
        for v in self.foreign.visitors.snapshot_objects():
            if v.gre_key is None:
                continue
            via = None if v.local_address in self.config.addresses else v.local_address
            wanted[v.home_address] = (v.home_agent, v.gre_key, via, v.reverse_tunnel)
        for home in set(self._foreign_paths) | set(wanted):
            old, new = self._foreign_paths.get(home), wanted.get(home)
            if old == new:
                continue
            if old is not None:
                self.tunnel.forget(old[0], old[1])
                if old[3]:
                    self.tunnel.set_reverse(home, None)
                self._set_local_route(home, None)
            if new is not None:
                self.tunnel.accept(new[0], new[1])
                self._set_local_route(home, new[2])
                if new[3]:
                    self.tunnel.set_reverse(home, (new[0], new[1]))
                self._foreign_paths[home] = new
                log.info("FOA data plane: GRE key %d from %s delivers %s via %s", new[1], new[0],
                         home, new[2] or "this router")
            else:
                self._foreign_paths.pop(home, None)

    def _set_local_route(self, home: str, via: str | None) -> None:
        """Route a visitor's home address to the LAN router that runs it (or drop it)."""
        if via is None:
            subprocess.run(["ip", "route", "del", f"{home}/32"], capture_output=True, timeout=10)
            return
        proc = subprocess.run(["ip", "route", "replace", f"{home}/32", "via", via],
                              capture_output=True, text=True, timeout=10)
        if proc.returncode != 0:
            log.warning("route %s via %s: %s", home, via, proc.stderr.strip())

    # --- control commands ----------------------------------------------------------------

    async def handle_command(self, cmd: str, args: dict[str, Any]) -> Any:
        handler = getattr(self, f"cmd_{cmd}", None)
        if handler is None:
            raise ControlError(f"unknown command {cmd!r}")
        result = handler(**args)
        if asyncio.iscoroutine(result):
            result = await result
        return result

    def cmd_ping(self) -> str:
        return "pong"

    def cmd_status(self) -> dict:
        return {
            "name": self.config.name, "roles": self.config.roles, "pid": os.getpid(),
            "uptime": round(time.time() - self.started_at, 3),
            "interfaces": [i.__dict__ for i in self.config.interfaces],
            "bindings": len(self.home.bindings) if self.home else None,
            "visitors": len(self.foreign.visitors) if self.foreign else None,
            "objects": sorted(self.objects),
            "malformed": self.malformed + self.discovery.malformed,
            "home_stats": {k: v for k, v in self.home.stats.items() if v} if self.home else None,
            "foreign_stats": self.foreign.stats if self.foreign else None,
            "proxy_arp": sorted(self.proxy_arp.addresses) if self.proxy_arp else None,
            "proxy_arp_answered": self.proxy_arp.answered if self.proxy_arp else None,
        }

    def cmd_bindings(self) -> list[dict]:
        return self.home.bindings.snapshot() if self.home else []

    def cmd_visitors(self) -> list[dict]:
        return self.foreign.visitors.snapshot() if self.foreign else []

    def cmd_agents(self) -> list[dict]:
        now = time.time()
        return [dict(h, age=round(now - h["heard_at"], 3)) for h in self.heard.values()]

    def cmd_objects(self) -> list[dict]:
        return [h.status() for h in self.objects.values()]

    def cmd_log(self, lines: int = 50) -> list[str]:
        try:
            text = self.config.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return []
        return text[-int(lines):]

    async def cmd_object_start(self, config: dict, spec: str | None = None, warm: bool = False,
                               state: Any = None, register: bool = True,
                               resources: dict[str, Any] | None = None) -> dict:
        """Host an object: run its code (``spec``, module:Class) on its home address under
        controlled exec (``resources``: cpu, memory_mb, pids; the agent's defaults when
        absent) and/or its registration client. ``warm``: queue requests until
        ``object_restore``; ``state``: continue from that checkpoint."""
        obj = ObjectConfig.from_json(config)
        process = None
        if spec is not None:
            res = {**self.config.object_resources, **(resources or {})}
            try:
                limits = Limits(cpu_quota=float(res["cpu"]), memory_bytes=int(res["memory_mb"]) << 20,
                                pids_max=int(res["pids"]))
            except (KeyError, TypeError, ValueError, AgentError) as exc:
                raise ControlError(f"bad resources {res}: {exc}") from None
            process = ObjectProcess(obj.name, spec, obj.home_address, SERVICE_PORT, self.config.name,
                                    objects_dir=Path(self.config.run_dir) / "objects",
                                    cgroups=self.cgroups, limits=limits,
                                    label=f"{self.config.name}-{obj.name}")
        hosted = await self.host_object(obj, process, warm=warm, state=state, register=register)
        if spec is not None:
            self.objects[obj.name].resources = res
        return hosted

    async def host_object(self, obj: ObjectConfig, process: ObjectProcess | None, *, warm: bool = False,
                          state: Any = None, register: bool = True,
                          vm: tuple[str, str] | None = None) -> dict:
        """Start ``process`` (if any) and then serve its home address here and run its
        registration client. Used for placed objects and by the VM for its mobile objects."""
        if obj.name in self.objects:
            raise ControlError(f"object {obj.name} already runs here")
        hosted = HostedObject(obj.name, obj.home_address, vm=vm)
        self.objects[obj.name] = hosted
        try:
            if process is not None:
                hosted.process = process
                # Warm until the address is there: a reply (to a request handed over in a
                # checkpoint, say) cannot leave from an address this router does not have.
                await process.start(warm=True, state=state)
                # Only now: an address without a bound socket answers port-unreachable, and
                # this router may be on the path of the object's clients (net 14's border).
                self._home_address(obj.home_address, add=True)
                if not warm:
                    await process.call("serve")
            if register:
                hosted.client = RegistrationClient(obj, self.solicit, self.config.advertise_interval,
                                                   announce=self._announce_home)
                await hosted.client.start()
        except Exception:
            await self.cmd_object_stop(obj.name, deregister=False)
            raise
        return hosted.status()

    def hosted_process(self, name: str) -> ObjectProcess | None:
        hosted = self.objects.get(name)
        return hosted.process if hosted is not None else None

    def replace_process(self, name: str, process: ObjectProcess) -> None:
        """A VM upgraded the object's code: the new process serves, registration unchanged."""
        self._hosted(name).process = process

    async def cmd_object_stop(self, name: str, deregister: bool = True) -> dict:
        """Stop hosting an object; returns its status and its final state (if it ran here)."""
        hosted = self.objects.pop(name, None)
        if hosted is None:
            raise ControlError(f"no object {name!r} here")
        if hosted.client is not None:
            await hosted.client.stop(deregister=deregister)
        state = None
        if hosted.process is not None:
            # Hold first: from now on the object queues what it receives (the queue goes into
            # its checkpoint) instead of answering from an address about to disappear, which
            # the kernel would refuse: a request counted, its reply lost. Then the address:
            # packets still arriving are routed on to the object's new place instead of
            # hitting a closing socket (port unreachable).
            if hosted.process.running:
                try:
                    await hosted.process.call("hold")
                except ObjectProcessError as exc:
                    log.warning("%s", exc)
            self._home_address(hosted.home_address, add=False)
            state = await hosted.process.stop()
        return dict(hosted.status(), state=state)

    def _hosted(self, name: str) -> HostedObject:
        hosted = self.objects.get(name)
        if hosted is None:
            raise ControlError(f"no object {name!r} here")
        return hosted

    def _process(self, name: str) -> ObjectProcess:
        process = self._hosted(name).process
        if process is None:
            raise ControlError(f"object {name!r} has no running code here")
        return process

    async def cmd_object_state(self, name: str) -> Any:
        """The object's checkpoint (object state + per-client request memory)."""
        return await self._process(name).call("get_state")

    async def cmd_object_restore(self, name: str, state: Any, serve: bool = True) -> Any:
        return await self._process(name).call("set_state", state=state, serve=serve)

    async def cmd_object_stats(self, name: str) -> Any:
        return await self._process(name).call("stats")

    def _home_address(self, address: str, add: bool) -> None:
        """The object's home address on this router's loopback, so the kernel delivers it."""
        action = "add" if add else "del"
        proc = subprocess.run(["ip", "addr", action, f"{address}/32", "dev", "lo"],
                              capture_output=True, text=True, timeout=10)
        if proc.returncode != 0 and "exists" not in proc.stderr and "Cannot assign" not in proc.stderr:
            raise ControlError(f"ip addr {action} {address}: {proc.stderr.strip()}")

    def _client(self, name: str) -> RegistrationClient:
        client = self._hosted(name).client
        if client is None:
            raise ControlError(f"object {name!r} does not register from here")
        return client

    async def cmd_client_stop(self, name: str, deregister: bool = False) -> dict:
        """Stop only the object's registration client (its code keeps running): without
        renewals its binding runs out, as when an object loses touch with its agents."""
        hosted = self._hosted(name)
        if hosted.client is None:
            raise ControlError(f"object {name!r} does not register from here")
        await hosted.client.stop(deregister=deregister)
        status = hosted.status()
        hosted.client = None
        return status

    async def cmd_register(self, name: str, lifetime: int | None = None) -> dict:
        return (await self._client(name).register(lifetime)).as_dict()

    async def cmd_deregister(self, name: str) -> dict:
        return (await self._client(name).deregister()).as_dict()

    # --- migration (agent.hosting.migration) -----------------------------------------------------

    async def _wait_registered(self, name: str, timeout: float = REGISTER_TIMEOUT) -> dict:
        """Until the object's client holds an accepted registration (or is home)."""
        client = self._client(name)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = client.status()
            if status["registration"] is not None or status["at_home"]:
                return status
            await asyncio.sleep(0.01)
        last = client.history[-1].as_dict() if client.history else {}
        raise MigrationFailed(f"{name} did not register from {self.config.name} within "
                              f"{timeout:.0f}s (last attempt: {last})")

    async def on_peer_message(self, msg: ControlMessage) -> dict:
        """MIGRATE start/cancel and STATE_TRANSFER from a source router, PROVISION from the
        remote site."""
        body = self._authenticated(msg)
        point = "state_transfer" if msg.type == ControlType.STATE_TRANSFER else f"migrate_{body.get('action')}"
        if self.faults.get(point, 0) > 0:
            self.faults[point] -= 1
            raise ControlError(f"injected fault: {point} refused")
        if msg.type == ControlType.MIGRATE and body.get("action") == "start":
            name = body["config"]["name"]
            await self._start_arriving(body)
            try:
                status = await self._wait_registered(name)
            except MigrationFailed:
                await self._drop(name)
                raise
            rtts = [a["rtt"] for a in status["attempts"] if a["rtt"] is not None]
            return {"ok": True, "registration": status["registration"], "at_home": status["at_home"],
                    "registration_rtt": rtts[-1] if rtts else None}
        if msg.type == ControlType.MIGRATE and body.get("action") == "cancel":
            if body["name"] in self.objects:
                await self._drop(body["name"])
            return {"ok": True}
        if msg.type == ControlType.PROVISION:
            if self.vm is None:
                raise ControlError(f"{self.config.name} runs no virtual machines")
            return {"ok": True, "vm": await self.vm.provision(body)}
        if msg.type == ControlType.STATE_TRANSFER:
            result = await self.cmd_object_restore(body["name"], body["state"], serve=True)
            return {"ok": True, "replayed": result.get("replayed", 0)}
        raise ControlError(f"unexpected in-band message {msg.type.name}")

    def _authenticated(self, msg: ControlMessage) -> dict[str, Any]:
        """The body of an in-band message from an authorized sender (without its
        authenticator): a provider's signed PROVISION, a router's MIGRATE/STATE_TRANSFER."""
        if msg.type == ControlType.PROVISION:
            if self.vm is None:
                raise ControlError(f"{self.config.name} runs no virtual machines")
            self.vm.authorize(msg)
        elif msg.type in (ControlType.MIGRATE, ControlType.STATE_TRANSFER) and self.router_key:
            try:
                verify_hmac(msg.type, msg.txid, msg.body, self.router_key, self._peer_replays)
            except MessageAuthError as exc:
                log.warning("in-band %s refused: %s", msg.type.name, exc)
                raise ControlError(f"{msg.type.name} refused: {exc}") from None
        return strip(msg.body)

    async def _start_arriving(self, body: dict[str, Any]) -> None:
        """Start a migrating object here: in a VM of its service when it came from one (this
        router fetches and verifies the code itself, Fig. 5), else placed directly."""
        warm, state = bool(body.get("warm", False)), body.get("state")
        vm_body = body.get("vm")
        if vm_body:
            if self.vm is None:
                raise ControlError(f"{self.config.name} runs no virtual machines")
            (obj,) = vm_body["objects"]
            await self.vm.provision(vm_body, warm=warm, states={obj: state})
        else:
            await self.cmd_object_start(body["config"], spec=body["spec"], warm=warm, state=state,
                                        resources=body.get("resources"))

    async def _drop(self, name: str) -> None:
        """Undo an arrival: stop the object, deregister, and remove the VM made for it."""
        hosted = self.objects.get(name)
        if hosted is not None and hosted.vm is not None and self.vm is not None:
            await self.vm.remove(hosted.vm[0])
        if name in self.objects:
            await self.cmd_object_stop(name, deregister=True)

    async def cmd_migrate(self, name: str, target: str, mode: str = "make-before-break",
                          target_name: str = "") -> dict:
        """Move object ``name`` (running here) to the router at address ``target``."""
        if mode not in MODES:
            raise ControlError(f"mode must be one of {MODES}")
        hosted = self._hosted(name)
        if hosted.process is None or hosted.client is None:
            raise ControlError(f"object {name!r} does not run and register here")
        report = MigrationReport(name, mode, self.config.name, target_name or target)
        move = _Move(hosted, hosted.client.config.to_json())
        try:
            if mode == "make-before-break":
                await self._migrate_mbb(move, target, report)
            else:
                await self._migrate_bbm(move, target, report)
            report.ok = True
        except (MigrationFailed, ObjectProcessError, ControlError) as exc:
            report.error = str(exc)
            report.step(f"failed: {exc}; the object keeps serving on {self.config.name}")
            return report.as_dict()
        if move.vm is not None and self.vm is not None:
            await self.vm.detach(*move.vm)
        return report.as_dict()

    def _start_body(self, move: "_Move", warm: bool, state: Any = None) -> dict[str, Any]:
        config = dict(move.config, simultaneous=warm)
        body: dict[str, Any] = {"action": "start", "spec": move.spec, "warm": warm, "config": config,
                                "resources": move.resources}
        if state is not None:
            body["state"] = state
        if move.vm is not None:
            body["vm"] = self.vm.migration_body(*move.vm, config)
        return body

    async def _restart(self, move: "_Move", state: Any) -> None:
        """The move failed after the object stopped here: start it again from ``state``,
        the way it ran (in its VM, or placed directly), and register it again."""
        if move.vm is not None and self.vm is not None:
            await self.vm.restart_object(*move.vm, state)
        else:
            await self.cmd_object_start(move.config, spec=move.spec, state=state, resources=move.resources)

    async def _migrate_mbb(self, move: "_Move", target: str, report: MigrationReport) -> None:
        """Make the new place reachable first, then hand the state over at one instant.

        The target's warm instance is registered (with ``S``: the HOA bicasts) before the
        source stops, so every request from then on reaches the target, which queues it. The
        source's final checkpoint therefore covers exactly what the target must not replay,
        whichever way a request travelled (through the tunnel, or straight to a source that is
        its client's own gateway).
        """
        hosted = move.hosted
        assert hosted.process is not None and hosted.client is not None
        report.step("start warm instance at target, register with S")
        answer = await peer_call(target, ControlType.MIGRATE, self._start_body(move, warm=True),
                                 key=self.router_key)
        report.target_registration = answer.get("registration")
        report.registration_rtt_ms = _ms(answer.get("registration_rtt"))
        report.step("target registered (its instance queues requests)")
        mine = hosted.client.current
        theirs = (answer.get("registration") or {}).get("care_of_address")
        if mine is not None and mine.care_of_address != theirs:
            await hosted.client.deregister()  # lifetime 0 for this care-of address only
            report.step("source binding deregistered")
        stopped = await self.cmd_object_stop(hosted.name, deregister=False)
        state = stopped["state"]
        report.step("source stopped with its final checkpoint")
        try:
            if state is None:
                raise MigrationFailed("the source gave no checkpoint")
            await peer_call(target, ControlType.STATE_TRANSFER, {"name": hosted.name, "state": state},
                            key=self.router_key)
            report.step("target restored, replayed its queue and serves")
        except MigrationFailed:
            await self._cancel(target, hosted.name)
            if state is not None:
                report.step("transfer failed: restart at source from the checkpoint")
                await self._restart(move, state)
            raise

    async def _migrate_bbm(self, move: "_Move", target: str, report: MigrationReport) -> None:
        report.step("stop source, keep checkpoint")
        stopped = await self.cmd_object_stop(move.hosted.name, deregister=False)
        state = stopped["state"]
        if state is None:
            raise MigrationFailed("the source gave no checkpoint")
        try:
            answer = await peer_call(target, ControlType.MIGRATE, self._start_body(move, False, state),
                                     key=self.router_key)
        except MigrationFailed:
            report.step("target failed: restart at source from the checkpoint")
            await self._restart(move, state)
            raise
        report.target_registration = answer.get("registration")
        report.registration_rtt_ms = _ms(answer.get("registration_rtt"))
        report.step("target serving and registered")

    async def _cancel(self, target: str, name: str) -> None:
        try:
            await peer_call(target, ControlType.MIGRATE, {"action": "cancel", "name": name},
                            key=self.router_key)
        except MigrationFailed as exc:
            log.warning("could not cancel %s at %s: %s", name, target, exc)

    def _announce_home(self, ifindex: int, address: str) -> None:
        """Gratuitous ARP for an object back home (RFC 5944 §4.6), from its router."""
        ifname = self.iface_by_index.get(ifindex)
        if ifname is not None:
            try:
                announce(ifname, address)
            except OSError as exc:
                log.warning("gratuitous ARP for %s on %s failed: %s", address, ifname, exc)

    def cmd_announce(self, address: str, interface: str) -> str:
        announce(interface, address)
        return "ok"

    def cmd_advertising(self, enabled: bool) -> bool:
        """Switch advertisements and solicitation answers off/on (an agent leaving a link)."""
        self.paused = not enabled
        return enabled

    def cmd_vm(self) -> list[dict]:
        """The provisioned VMs, their objects and what each uses (cgroup measurements)."""
        return [vm.describe() for vm in self.vm.vms.values()] if self.vm else []

    def cmd_retired(self) -> list[dict]:
        """VMs removed because their lifecycle policy was used up."""
        return list(self.vm.retired) if self.vm else []

    def cmd_errors(self) -> list[dict]:
        """Refused provisionings (Fig. 5 steps 92-94), newest last."""
        return list(self.vm.errors) if self.vm else []

    async def cmd_vm_remove(self, name: str) -> Any:
        if self.vm is None or name not in self.vm.vms:
            raise ControlError(f"no VM {name!r} here")
        return await self.vm.remove(name)

    def cmd_inject_fault(self, point: str, count: int = 1) -> dict:
        """Refuse the next ``count`` in-band ``migrate_start`` or ``state_transfer`` messages
        (failure injection: what a migration does when the target breaks half-way)."""
        if point not in FAULT_POINTS:
            raise ControlError(f"fault point must be one of {FAULT_POINTS}")
        self.faults[point] = int(count)
        return dict(self.faults)

    def cmd_stop(self) -> str:
        self._stop.set()
        return "stopping"
