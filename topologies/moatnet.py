"""A running MOAT network: Mininet, one agent daemon per router, a run directory.

:class:`MoatNetwork` turns a pure-data :class:`topologies.base.MoatTopo` into a running
testbed: it creates the run (id, directory, ``run.json``), generates the run's credentials
(:class:`Keyring`), writes each router's agent configuration, asks every
:class:`topologies.nodes.MoatRouter` to run ``python -m agent`` inside its namespace (forked
from the run's agent zygote, :mod:`agent.zygote`, unless ``MOAT_AGENT_START=exec``), and
waits until every agent answers on its control socket, for a time that grows with the
network (:mod:`topologies.start_budget`). Everything the run starts inherits
``MOAT_RUN_ID`` so :func:`topologies.run.clean_run` can find it after a crash.

Acting on the running network (agent calls, objects, migration, provisioning, tools inside
nodes) goes through :class:`topologies.client.RunClient`, the same client the ``moat``
command uses; the methods here that do so are thin conveniences for experiments and tests.

Roles, by default: the topology's ``hoa`` router is the home object agent; every router of
a foreign network is a foreign object agent (so a refused object has another FOA to try);
every other router runs a role-less daemon that can host objects. The service broker (Fig.
12) runs on the HOA's router unless ``broker`` names another router (or None: no broker);
every router advertises it and registers its VMs' services with it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import select
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from agent.core.config import (
    AgentConfig,
    BrokerConfig,
    Credential,
    ForeignConfig,
    HomeConfig,
    HomeObject,
    Interface,
    ObjectConfig,
    PeerRouter,
    StaticRoute,
)
from agent.core.control import ControlClient
from agent.core.errors import ControlError
from agent.core.wait import WaitTimeout, wait_until
from agent.zygote import Zygote, start_mode
from topologies.addressing import mo_home_addresses, mobile_network_prefixes
from topologies.base import MoatTopo
from topologies.client import RunClient, write_co_keys, write_objects
from topologies.errors import TopologyError
from topologies.net import build_net, scope_for_run
from topologies.netfilter import open_bridges
from topologies.run import ENV_RUN_ID, Run, clean_run, private_umask, stop_child
from topologies.start_budget import agents_timeout

log = logging.getLogger(__name__)

HOME_DOMAIN = "home.moat"
COUNTER_SPEC = "agent.objects.counter:Counter"
#: ``MoatNetwork(broker=AT_HOA)`` (the default): the broker runs on the topology's HOA router.
AT_HOA = "@hoa"


def _new_credential(spi: int) -> Credential:
    return Credential(spi, secrets.token_bytes(32))


@dataclass
class Keyring:
    """The run's security associations (patent credentials 126, 130, 144, 154).

    SPIs are allocated from 256 upwards: 256+ objects' Mobile-Home, 1000+ objects'
    Mobile-Foreign, 2000+ FOAs' Foreign-Home.
    """

    mobile_home: dict[str, Credential] = field(default_factory=dict)  # object -> MH
    mobile_foreign: dict[str, Credential] = field(default_factory=dict)  # object -> MF
    foreign_home: dict[str, Credential] = field(default_factory=dict)  # FOA router -> FH
    #: Routers' shared key for in-band MIGRATE / STATE_TRANSFER (agent.core.msgauth).
    router_key: str = field(default_factory=lambda: secrets.token_hex(32))
    #: Corresponding objects' keys (host -> key): their LEASE_* messages carry an HMAC under it.
    co_keys: dict[str, bytes] = field(default_factory=dict)
    #: Routers' static X25519 key pairs (router -> (private, public)): secrets in in-band
    #: messages are sealed for the receiving router's public key (agent.core.sealing).
    seal_keys: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)

    def add_object(self, name: str) -> None:
        n = len(self.mobile_home)
        self.mobile_home[name] = _new_credential(256 + n)
        self.mobile_foreign[name] = _new_credential(1000 + n)

    def add_foa(self, router: str) -> None:
        self.foreign_home[router] = _new_credential(2000 + len(self.foreign_home))

    def add_co(self, host: str) -> None:
        """A fresh key for a host that may act as a corresponding object with the broker."""
        self.co_keys[host] = secrets.token_bytes(32)

    def add_router(self, router: str) -> None:
        """A fresh X25519 key pair for a router: its private key goes into its own (root-only)
        configuration only, its public key to every sender."""
        from agent.core.sealing import generate_keypair

        self.seal_keys[router] = generate_keypair()

    def all_secrets(self) -> dict[str, bytes]:
        """Every secret key of the run, named ("mobile_home/counter": key): what must never
        appear on the wire in clear (tests search captures for them)."""
        out = {"router_key": bytes.fromhex(self.router_key)}
        for kind in ("mobile_home", "mobile_foreign", "foreign_home"):
            out.update({f"{kind}/{n}": c.key for n, c in getattr(self, kind).items()})
        out.update({f"co_keys/{h}": k for h, k in self.co_keys.items()})
        out.update({f"seal_key/{r}": private for r, (private, _) in self.seal_keys.items()})
        return out


@dataclass
class MobileObject:
    """A mobile object of the run: name, home address, NAI."""

    name: str
    home_address: str
    #: Its mobile network prefix (its secondaries' addresses); "" beyond the seventh object.
    network_prefix: str = ""

    @property
    def nai(self) -> str:
        return f"{self.name}@{HOME_DOMAIN}"


class MoatNetwork:
    """Start, query and stop a MOAT testbed; a context manager that always cleans up."""

    def __init__(
        self,
        topo: MoatTopo,
        objects: list[str] | None = None,
        advertise_interval: float = 1.0,
        run: Run | None = None,
        log_level: str = "INFO",
        foreign_agents: list[str] | None = None,
        trusted_foas: list[str] | None = None,
        tunnel_backend: str = "auto",
        broker: str | None = AT_HOA,
        broker_advertise_interval: float = 1.0,
    ) -> None:
        if topo.hoa is None:
            raise TopologyError("the topology names no home object agent router (hoa)")
        if broker == AT_HOA:
            broker = topo.hoa
        if broker is not None and broker not in topo.router_names():
            raise TopologyError(f"broker {broker!r} is not a router of {type(topo).__name__} "
                                f"(routers: {', '.join(topo.router_names())})")
        #: The router that runs the service broker (None: this run has none).
        self.broker: str | None = broker
        self.broker_advertise_interval = broker_advertise_interval
        self.topo = topo
        self.run = run or Run()
        self.advertise_interval = advertise_interval
        self.log_level = log_level
        self.tunnel_backend = tunnel_backend
        self.hoa: str = topo.hoa
        if foreign_agents is None:
            foreign_agents = [r for spec in topo.networks.values() if spec.kind == "foreign"
                              for r in spec.routers]
        self.foreign_agents = foreign_agents
        #: FOAs whose Foreign-Home credential the HOA trusts (default: all of them).
        self.trusted_foas = list(foreign_agents if trusted_foas is None else trusted_foas)
        homes = iter(mo_home_addresses())
        prefixes = iter(mobile_network_prefixes())
        self.objects = {n: MobileObject(n, str(next(homes)), str(next(prefixes, "")))
                        for n in (objects or ["counter"])}
        self.keyring = Keyring()
        for name in self.objects:
            self.keyring.add_object(name)
        for router in self.foreign_agents:
            self.keyring.add_foa(router)
        for router in topo.router_names():
            self.keyring.add_router(router)
        if broker is not None:
            for host in topo.end_host_names():
                if topo.nodeInfo(host).get("role") != "attacker":  # an attacker holds no key
                    self.keyring.add_co(host)
        self.net: Any = None
        #: The run's agent zygote (agent.zygote), while the network runs; None with
        #: MOAT_AGENT_START=exec.
        self.zygote: Zygote | None = None
        self._network_hops: dict | None = None
        self.site: str | None = None
        #: The DNS server's address (dnsmasq on dns23), once prepared.
        self.dns: str | None = None
        self.provider_key: Path | None = None
        self.provider_public_key: Path | None = None
        #: How everything below acts on the running network (the ``moat`` command's too).
        self.client = RunClient(self.run)

    # --- configuration -------------------------------------------------------------------

    def roles(self, router: str) -> list[str]:
        roles = []
        if router == self.hoa:
            roles.append("home")
        if router in self.foreign_agents:
            roles.append("foreign")
        return roles

    def agent_config(self, router: str) -> AgentConfig:
        ifaces = [Interface(i.name, str(i.address.ip), i.address.network.prefixlen,
                            advertise=self.topo.isSwitch(i.peer))
                  for i in self.topo.interfaces(router)]
        roles = self.roles(router)
        home = foreign = None
        if "home" in roles:
            home = HomeConfig(
                objects=[HomeObject(o.home_address, o.nai, self.keyring.mobile_home[o.name],
                                    o.network_prefix)
                         for o in self.objects.values()],
                trusted_foas=[self.keyring.foreign_home[r] for r in self.trusted_foas],
                home_interface=ifaces[0].name,
            )
        if "foreign" in roles:
            foreign = ForeignConfig(
                trusted_objects=list(self.keyring.mobile_foreign.values()),
                foreign_home=self.keyring.foreign_home[router],
            )
        return AgentConfig(router, str(self.run.dir), roles, ifaces, self.advertise_interval,
                           home=home, foreign=foreign, log_level=self.log_level,
                           tunnel_backend=self.tunnel_backend, vm=self.vm_baseline(router),
                           run_id=self.run.run_id, router_key=self.keyring.router_key,
                           broker=self.broker_config(router),
                           seal_key=self.keyring.seal_keys[router][0].hex(), peers=self.peers(),
                           # The routes its node installs (topologies.nodes), kept by the agent.
                           static_routes=[StaticRoute(r.prefix, r.via)
                                          for r in self.topo.routes(router)])

    def peers(self) -> dict[str, PeerRouter]:
        """Every router's addresses and public sealing key (what a sender seals secrets for)."""
        return {r: PeerRouter([str(a.ip) for a in self.topo.addresses(r)],
                              self.keyring.seal_keys[r][1])
                for r in self.topo.router_names()}

    def _write_peers(self, directory: Path) -> Path:
        """The routers' public sealing keys as ``directory/peers.json`` (nothing secret in
        it), for a sender outside the routers: the provider's site seals PROVISION with it."""
        from nodetools.probes import PEERS_FILE

        path = directory / PEERS_FILE
        doc = {r: {"addresses": p.addresses, "seal_key": p.seal_key.hex()}
               for r, p in self.peers().items()}
        path.write_text(json.dumps(doc, indent=2))
        return path

    def broker_address(self) -> str | None:
        """Where the broker answers: its router's first (LAN) address; None without one."""
        return None if self.broker is None else str(self.topo.addresses(self.broker)[0].ip)

    def broker_config(self, router: str) -> BrokerConfig | None:
        """``router``'s view of the broker. Every router learns its address (it advertises it
        and registers its VMs there); only the broker's own router gets what serving needs:
        the COs' keys and the network distances (no other router checks a CO's message, so
        no other router holds a CO's key)."""
        address = self.broker_address()
        if address is None:
            return None
        cfg = BrokerConfig(address, advertise_interval=self.broker_advertise_interval)
        # Every router: a primary looks for room for its duplicates among the run's routers,
        # nearest to the CO first.
        if self._network_hops is None:  # the topology's, the same for every router: once
            self._network_hops = self.topo.network_hops()  # (25 ms at 102 routers)
        cfg.network_hops = dict(self._network_hops)
        cfg.routers = {r: str(self.topo.addresses(r)[0].ip) for r in self.topo.router_names()}
        if router == self.broker:
            cfg.serve = True
            cfg.co_keys = dict(self.keyring.co_keys)
        return cfg

    def vm_baseline(self, router: str) -> dict[str, Any] | None:
        """Every router's VM baseline: the run's provider key is authorized, services come
        from the topology's remote site, storage is private to the router."""
        if self.site is None:
            return None
        # In the run's sandbox directory: the VM's objects must reach their code and working
        # directories, and the run directory is root's alone (topologies.run).
        storage = self.run.sandbox_dir / "vm" / router
        return {
            "authorized_keys": [str(self.provider_public_key)],
            "storage": str(storage),
            "site": {"address": str(self.topo.addresses(self.site)[0].ip),
                     "known_host_key": str(self.run.dir / self.site / "ssh_host_ed25519_key.pub"),
                     "client_key": str(self.run.dir / "vm_ed25519")},
        }

    def _object_configs(self) -> list[ObjectConfig]:
        """Every object's registration client configuration, from the keyring: written to
        the run directory, where :class:`RunClient` (and so ``moat``) reads them."""
        home_agent = str(self.topo.addresses(self.hoa)[0].ip)
        return [ObjectConfig(o.name, o.home_address, home_agent, o.nai,
                             self.keyring.mobile_home[o.name], self.keyring.mobile_foreign[o.name],
                             network_prefix=o.network_prefix)
                for o in self.objects.values()]

    def object_config(self, name: str, **overrides: Any) -> ObjectConfig:
        """The registration client configuration of object ``name`` (with its credentials)."""
        return self.client.object_config(name, **overrides)

    def _prepare_nodes(self) -> None:
        """Write agent configs and give each router its daemon argv (before Mininet builds)."""
        for router in self.topo.router_names():
            cfg = self.agent_config(router)
            path = self.run.dir / f"{router}.json"
            cfg.write(path)  # root-only from creation: it holds keys
            info = self.topo.nodeInfo(router)
            info["daemon_argv"] = [sys.executable, "-m", "agent", "--config", str(path)]
            info["daemon_log"] = str(self.run.dir / f"{router}.out")
            info["daemon_cwd"] = str(Path(__file__).resolve().parent.parent)
            self.run.state.agents[router] = str(cfg.socket_path)

    def _prepare_site(self) -> None:
        """The remote site's directory and the routers' SFTP client key, authorized there.

        Routers fetch services with ``<run>/vm_ed25519`` and pin the site's host key,
        ``<run>/<site>/ssh_host_ed25519_key.pub`` once the site has started."""
        sites = [n for n in self.topo.hosts() if self.topo.nodeInfo(n).get("role") == "site"]
        if not sites:
            return
        from agent.vm.fetch import generate_client_key

        from agent.vm.signing import generate_keypair

        key = self.run.dir / "vm_ed25519"
        public = generate_client_key(key, f"moat-vm@{self.run.run_id}")
        # The run's service provider: routers' baselines authorize it; experiments sign with it.
        self.provider_key, self.provider_public_key = generate_keypair(self.run.dir / "provider", "provider")
        # The provider seals its PROVISIONs' secrets for each router (nodetools.probes).
        self._write_peers(self.provider_key.parent)
        for site in sites:
            site_dir = self.run.dir / site
            site_dir.mkdir(parents=True, exist_ok=True)
            (site_dir / "authorized_keys").write_text(public + "\n")
            self._write_peers(site_dir)
            self.topo.nodeInfo(site)["run_dir"] = str(site_dir)
        self.site = sites[0]

    def _node_addresses(self) -> dict[str, str]:
        """Every router's and host's first address: where in-band messages to it go."""
        return {node: str(self.topo.addresses(node)[0].ip)
                for node in [*self.topo.router_names(), *self.topo.hosts()]}

    def _prepare_dns(self) -> None:
        """The DNS server's names: every mobile object (its home address), router and
        server of the topology (its first address), in the run's domain."""
        servers = [n for n in self.topo.hosts() if self.topo.nodeInfo(n).get("role") == "dns"]
        names = {o.name: o.home_address for o in self.objects.values()}
        for node, address in self._node_addresses().items():
            names.setdefault(node, address)
        for server in servers:
            info = self.topo.nodeInfo(server)
            info["run_dir"] = str(self.run.dir / server)
            info["names"] = names
            info["domain"] = HOME_DOMAIN
        self.dns = str(self.topo.addresses(servers[0])[0].ip) if servers else None

    # --- lifecycle -----------------------------------------------------------------------

    def start(self, timeout: float | None = None) -> "MoatNetwork":
        """Build and start the network and wait until every agent answers (``timeout``:
        by default :func:`topologies.start_budget.agents_timeout` of its size)."""
        if timeout is None:
            timeout = agents_timeout(len(self.topo.router_names()))
        self.run.create()
        self.run.state.topo = type(self.topo).__name__
        self.run.state.params = {"advertise_interval": self.advertise_interval,
                                 "objects": {n: o.home_address for n, o in self.objects.items()}}
        # Root-namespace names carry the run's tag (topologies.naming), are refused if one
        # exists (another run's is never taken over, nor removed), and are recorded before
        # they are created: a SIGKILL mid-build still leaves clean_run a complete list.
        try:
            self.run.state.bridges, self.run.state.root_links = scope_for_run(self.topo, self.run)
        except BaseException:
            self.stop()
            raise
        with private_umask():  # keys, public ones too, and configurations: root's alone
            self._prepare_site()
            self._prepare_dns()
            self._prepare_nodes()
            write_objects(self.run, self._object_configs())
            write_co_keys(self.run, self.keyring.co_keys)
        self.run.state.params.update(site=self.site, dns=self.dns, hoa=self.hoa,
                                     addresses=self._node_addresses(), broker=self.broker,
                                     broker_address=self.broker_address(),
                                     co_hosts=sorted(self.keyring.co_keys))
        self.run.save()
        previous = os.environ.get(ENV_RUN_ID)
        os.environ[ENV_RUN_ID] = self.run.run_id  # inherited by node shells and daemons
        try:
            if start_mode() == "fork":
                # Imports while Mininet builds; each router's agent is forked from it.
                self.zygote = Zygote(dict(os.environ), log_path=self.run.dir / "zygote.out")
                self.zygote.start()
            # Before any bridge exists: bridged traffic must not meet a DROP policy.
            open_bridges(self.run.state.bridges, self.run.run_id, self._record_forward_rules)
            for router in self.topo.router_names():
                self.topo.nodeInfo(router)["daemon_zygote"] = self.zygote
            self.net = build_net(self.topo, tag=self.run.state.tag)
            self.net.start()
            self.run.state.node_pids = {n.name: n.pid for n in self.net.hosts}
            self.run.save()
            self.wait_agents(timeout)
            self.run.state.status = "up"
            self.run.save()
        except BaseException:
            self.stop()
            raise
        finally:
            if previous is None:
                os.environ.pop(ENV_RUN_ID, None)
            else:
                os.environ[ENV_RUN_ID] = previous
        log.info("run %s up in %s", self.run.run_id, self.run.dir)
        return self

    def _record_forward_rules(self, rules: list[dict]) -> None:
        """Save the FORWARD rules about to be added in ``run.json`` (clean_run removes them)."""
        self.run.state.forward_rules = rules
        self.run.save()

    def wait_agents(self, timeout: float) -> None:
        """Block until every router's agent answers ``ping`` and its supervisor has seen it
        answer too (its status file says ``running``: until then a crash would count as a
        start that never worked and not be restarted), or raise TopologyError (at once when
        an agent exits: waiting longer would not bring it back)."""
        pending = set(self.run.state.agents)

        def all_up() -> bool:
            for router in sorted(pending):
                node = self.net[router]
                if node.daemon is not None and node.daemon.poll() is not None:
                    raise TopologyError(f"agent on {router} exited with {node.daemon.returncode}; "
                                        f"see {self.run.dir / (router + '.out')}")
                try:
                    self.client.call(router, "ping", timeout=1)
                except ControlError:
                    continue
                supervisor = self.client.supervision(router)  # None: not supervised
                if supervisor is None or supervisor.get("state") == "running":
                    pending.discard(router)
            return not pending

        try:
            wait_until(all_up, timeout, interval=0.05, what="agents answering ping")
        except WaitTimeout:
            raise TopologyError(f"agents did not come up within {timeout}s: {sorted(pending)}") from None

    def stop(self) -> None:
        """Stop the network and remove everything the run made (idempotent)."""
        if self.net is not None:
            try:
                self.net.stop()
            except Exception:  # noqa: BLE001 - still clean up below
                log.exception("net.stop() failed; cleaning the run by id")
            self.net = None
        if self.zygote is not None:
            self.zygote.stop()  # after the routers: it reports how their supervisors ended
            self.zygote = None
        self.run.state.status = "down"
        if self.run.dir.exists():
            self.run.save()
        clean_run(self.run.run_id, self.run.dir.parent, keep_dir=True)

    def __enter__(self) -> "MoatNetwork":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # --- use -----------------------------------------------------------------------------

    def agent(self, router: str, timeout: float = 10.0) -> ControlClient:
        """The control socket client of ``router``'s agent."""
        return self.client.agent(router, timeout)

    def start_object(self, name: str, router: str, **overrides: Any) -> dict:
        """Run object ``name``'s registration client on ``router``."""
        return self.client.start_object(name, router, **overrides)

    def where(self, name: str) -> str | None:
        """The router that hosts object ``name`` now (its code or its client)."""
        return self.client.where(name)

    def place_object(self, name: str, router: str, spec: str = COUNTER_SPEC,
                     resources: dict[str, Any] | None = None, **overrides: Any) -> dict:
        """Run object ``name``'s code on ``router`` (on its home address, under controlled
        exec with ``resources``: cpu, memory_mb, pids) and register it."""
        return self.client.start_object(name, router, spec=spec, resources=resources, **overrides)

    def migrate(self, name: str, router: str, mode: str = "make-before-break") -> dict:
        """Move running object ``name`` to ``router`` with its state (see
        :meth:`RunClient.migrate`)."""
        return self.client.migrate(name, router, mode)

    def provision(self, router: str, timeout: float = 120.0, mobile: Any = None,
                  **body: Any) -> dict:
        """Send a PROVISION message with ``body`` from the remote site to ``router`` (see
        :meth:`RunClient.provision`)."""
        return self.client.provision(router, body, mobile=mobile, timeout=timeout)

    def requests(self, host: str, name: str, count: int = 20, rate: float = 50.0,
                 client: str | None = None, port: int | None = None) -> dict:
        """Send ``count`` service requests from ``host`` to object ``name`` (see
        :meth:`RunClient.requests`)."""
        return self.client.requests(host, name, count, rate, client=client, port=port)

    def requests_at(self, host: str, address: str, count: int = 20, rate: float = 50.0,
                    client: str | None = None, port: int | None = None) -> dict:
        """Send service requests from ``host`` to ``address`` (a VM's service address)."""
        return self.client.requests_at(host, address, count, rate, client=client, port=port)

    def resolve(self, host: str, name: str) -> dict:
        """Ask the run's DNS server, from inside ``host``, for ``name``'s address."""
        return self.client.resolve(host, name)

    def probe(self, node: str, *args: str, timeout: float = 60.0) -> Any:
        """Run ``python -m nodetools.probes ARGS`` inside ``node``; return its JSON answer."""
        return self.client.probe(node, *args, timeout=timeout)

    def wait_for(self, predicate: Any, timeout: float = 10.0, interval: float = 0.05) -> Any:
        """Poll ``predicate()`` until it returns a truthy value (the agents have no push
        channel to the caller); :class:`agent.core.wait.WaitTimeout` (a TimeoutError) with
        the last value otherwise."""
        return wait_until(predicate, timeout, interval=interval, what="condition")

    def bridge(self, switch: str) -> str:
        """The kernel name of the topology's switch ``switch`` in this run (``s16`` ->
        ``m3f9c-s16``, :mod:`topologies.naming`)."""
        return self.topo.nodeInfo(switch).get("bridge", switch)

    @contextlib.contextmanager
    def capture(self, interface: str, name: str, node: str | None = None,
                bpf: str = "") -> Iterator[Path]:
        """Capture on ``interface`` (of ``node``, or a bridge in the root namespace: the
        topology's switch name, ``s16``, means this run's bridge) into
        ``captures/<name>.pcap`` while the block runs."""
        if node is None and interface in self.topo.switches():
            interface = self.bridge(interface)
        path = self.run.dir / "captures" / f"{name}.pcap"
        # Root-only from creation: Debian's tcpdump would switch to its own user before it
        # creates the file (owned by tcpdump, 0644); ``-Z root`` keeps root, umask 077 makes
        # the file 0600 as it is created.
        argv = ["tcpdump", "-Z", "root", "-i", interface, "--immediate-mode", "-U", "-w", str(path),
                "-s", "0"]
        if bpf:
            argv.append(bpf)
        if node is not None:
            proc = self.net[node].popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                        umask=0o077)
        else:
            proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    umask=0o077)
        try:
            wait_for_marker(proc, proc.stderr, b"listening on")
            yield path
        finally:
            stop_child(proc)


def wait_for_marker(proc: subprocess.Popen, stream: Any, marker: bytes, timeout: float = 5.0) -> bytes:
    """Read a child's ``stream`` until ``marker`` appears (a tool saying it is ready: tcpdump's
    "listening on", iperf3's "Server listening"); raise TopologyError with what it printed if
    it exits or stays silent for ``timeout`` seconds. Returns what was read."""
    buf = bytearray()
    closed = False

    def seen() -> bool:
        nonlocal closed
        if select.select([stream], [], [], 0.1)[0]:
            chunk = os.read(stream.fileno(), 4096)
            closed = not chunk
            buf.extend(chunk)
        if marker in buf:
            return True
        if closed or proc.poll() is not None:
            raise TopologyError(f"{marker.decode()!r} never came: "
                                f"{bytes(buf).decode(errors='replace').strip()[-300:]}")
        return False

    try:
        wait_until(seen, timeout, interval=0.0, what=repr(marker.decode()))
    except WaitTimeout:
        raise TopologyError(f"{marker.decode()!r} never came: "
                            f"{bytes(buf).decode(errors='replace').strip()[-300:]}") from None
    return bytes(buf)
