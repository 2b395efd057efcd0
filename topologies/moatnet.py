"""A running MOAT network: Mininet, one agent daemon per router, a run directory.

:class:`MoatNetwork` turns a pure-data :class:`topologies.base.MoatTopo` into a running
testbed: it creates the run (id, directory, ``run.json``), generates the run's credentials
(:class:`Keyring`), writes each router's agent configuration, asks every
:class:`topologies.nodes.MoatRouter` to run ``python -m agent`` inside its namespace, and
waits until every agent answers on its control socket. Everything the run starts inherits
``MOAT_RUN_ID`` so :func:`topologies.run.clean_run` can find it after a crash.

Roles, by default: the topology's ``hoa`` router is the home object agent; every router of
a foreign network is a foreign object agent (so a refused object has another FOA to try);
every other router runs a role-less daemon that can host objects.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from agent.core.config import (
    AgentConfig,
    Credential,
    ForeignConfig,
    HomeConfig,
    HomeObject,
    Interface,
    ObjectConfig,
)
from agent.core.control import ControlClient
from agent.core.errors import ControlError
from topologies.addressing import mo_home_addresses
from topologies.base import MoatTopo
from topologies.errors import TopologyError
from topologies.net import build_net, root_namespace_names
from topologies.run import ENV_RUN_ID, Run, clean_run, stop_child

log = logging.getLogger(__name__)

HOME_DOMAIN = "home.moat"
COUNTER_SPEC = "agent.objects.counter:Counter"
AGENT_START_TIMEOUT = 30.0


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

    def add_object(self, name: str) -> None:
        n = len(self.mobile_home)
        self.mobile_home[name] = _new_credential(256 + n)
        self.mobile_foreign[name] = _new_credential(1000 + n)

    def add_foa(self, router: str) -> None:
        self.foreign_home[router] = _new_credential(2000 + len(self.foreign_home))


@dataclass
class MobileObject:
    """A mobile object of the run: name, home address, NAI."""

    name: str
    home_address: str

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
    ) -> None:
        if topo.hoa is None:
            raise TopologyError("the topology names no home object agent router (hoa)")
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
        self.objects = {n: MobileObject(n, str(next(homes))) for n in (objects or ["counter"])}
        self.keyring = Keyring()
        for name in self.objects:
            self.keyring.add_object(name)
        for router in self.foreign_agents:
            self.keyring.add_foa(router)
        self.net: Any = None
        self.site: str | None = None
        #: The DNS server's address (dnsmasq on dns23), once prepared.
        self.dns: str | None = None
        self.provider_key: Path | None = None
        self.provider_public_key: Path | None = None

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
                objects=[HomeObject(o.home_address, o.nai, self.keyring.mobile_home[o.name])
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
                           run_id=self.run.run_id, router_key=self.keyring.router_key)

    def vm_baseline(self, router: str) -> dict[str, Any] | None:
        """Every router's VM baseline: the run's provider key is authorized, services come
        from the topology's remote site, storage is private to the router."""
        if self.site is None:
            return None
        storage = self.run.dir / "vm" / router
        return {
            "authorized_keys": [str(self.provider_public_key)],
            "storage": str(storage),
            "site": {"address": str(self.topo.addresses(self.site)[0].ip),
                     "known_host_key": str(self.run.dir / self.site / "ssh_host_ed25519_key.pub"),
                     "client_key": str(self.run.dir / "vm_ed25519")},
        }

    def object_config(self, name: str, **overrides: Any) -> ObjectConfig:
        """The registration client configuration of object ``name`` (with its credentials)."""
        obj = self.objects[name]
        cfg = ObjectConfig(obj.name, obj.home_address, str(self.topo.addresses(self.hoa)[0].ip),
                           obj.nai, self.keyring.mobile_home[name], self.keyring.mobile_foreign[name])
        for key, value in overrides.items():
            setattr(cfg, key, value)
        return cfg

    def _prepare_nodes(self) -> None:
        """Write agent configs and give each router its daemon argv (before Mininet builds)."""
        for router in self.topo.router_names():
            cfg = self.agent_config(router)
            path = self.run.dir / f"{router}.json"
            cfg.write(path)
            os.chmod(path, 0o600)  # holds keys
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
        for site in sites:
            site_dir = self.run.dir / site
            site_dir.mkdir(parents=True, exist_ok=True)
            (site_dir / "authorized_keys").write_text(public + "\n")
            self.topo.nodeInfo(site)["run_dir"] = str(site_dir)
        self.site = sites[0]

    def _prepare_dns(self) -> None:
        """The DNS server's names: every mobile object (its home address), router and
        server of the topology (its first address), in the run's domain."""
        servers = [n for n in self.topo.hosts() if self.topo.nodeInfo(n).get("role") == "dns"]
        names = {o.name: o.home_address for o in self.objects.values()}
        for node in [*self.topo.router_names(), *self.topo.hosts()]:
            names.setdefault(node, str(self.topo.addresses(node)[0].ip))
        for server in servers:
            info = self.topo.nodeInfo(server)
            info["run_dir"] = str(self.run.dir / server)
            info["names"] = names
            info["domain"] = HOME_DOMAIN
        self.dns = str(self.topo.addresses(servers[0])[0].ip) if servers else None

    # --- lifecycle -----------------------------------------------------------------------

    def start(self, timeout: float = AGENT_START_TIMEOUT) -> "MoatNetwork":
        """Build and start the network and wait until every agent answers."""
        self.run.create()
        self.run.state.topo = type(self.topo).__name__
        self.run.state.params = {"advertise_interval": self.advertise_interval,
                                 "objects": {n: o.home_address for n, o in self.objects.items()}}
        # Record root-namespace names before creating them: a SIGKILL mid-build still
        # leaves clean_run a complete list.
        self.run.state.bridges = list(self.topo.switches())
        self.run.state.root_links = [n for n in root_namespace_names(self.topo)
                                     if n not in self.run.state.bridges]
        self._prepare_site()
        self._prepare_dns()
        self._prepare_nodes()
        self.run.state.params["site"] = self.site
        self.run.save()
        previous = os.environ.get(ENV_RUN_ID)
        os.environ[ENV_RUN_ID] = self.run.run_id  # inherited by node shells and daemons
        try:
            self.net = build_net(self.topo)
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

    def wait_agents(self, timeout: float) -> None:
        """Block until every router's agent answers ``ping``, or raise TopologyError."""
        deadline = time.monotonic() + timeout
        pending = set(self.run.state.agents)
        while pending:
            for router in sorted(pending):
                node = self.net[router]
                if node.daemon is not None and node.daemon.poll() is not None:
                    raise TopologyError(f"agent on {router} exited with {node.daemon.returncode}; "
                                        f"see {self.run.dir / (router + '.out')}")
                try:
                    ControlClient(self.run.state.agents[router], timeout=1).call("ping")
                    pending.discard(router)
                except ControlError:
                    pass
            if pending and time.monotonic() > deadline:
                raise TopologyError(f"agents did not come up within {timeout}s: {sorted(pending)}")
            if pending:
                time.sleep(0.05)

    def stop(self) -> None:
        """Stop the network and remove everything the run made (idempotent)."""
        if self.net is not None:
            try:
                self.net.stop()
            except Exception:  # noqa: BLE001 - still clean up below
                log.exception("net.stop() failed; cleaning the run by id")
            self.net = None
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
        return ControlClient(self.run.state.agents[router], timeout=timeout)

    def start_object(self, name: str, router: str, **overrides: Any) -> dict:
        """Run object ``name``'s registration client on ``router``."""
        cfg = self.object_config(name, **overrides)
        return self.agent(router).call("object_start", config=cfg.to_json())

    def where(self, name: str) -> str | None:
        """The router that hosts object ``name`` now (its code or its client)."""
        for router in self.topo.router_names():
            if any(o["name"] == name for o in self.agent(router).call("objects")):
                return router
        return None

    def place_object(self, name: str, router: str, spec: str = COUNTER_SPEC,
                     resources: dict[str, Any] | None = None, **overrides: Any) -> dict:
        """Run object ``name``'s code on ``router`` (on its home address, under controlled
        exec with ``resources``: cpu, memory_mb, pids) and register it."""
        cfg = self.object_config(name, **overrides)
        return self.agent(router).call("object_start", config=cfg.to_json(), spec=spec,
                                       resources=resources)

    def migrate(self, name: str, router: str, mode: str = "make-before-break") -> dict:
        """Move running object ``name`` to ``router`` with its state; returns the source
        agent's report (``ok``, ``error``, timed ``steps``). A failed move leaves the object
        serving where it was."""
        source = self.where(name)
        if source is None:
            raise TopologyError(f"object {name} runs nowhere")
        target = str(self.topo.addresses(router)[0].ip)
        return self.agent(source, timeout=60).call("migrate", name=name, target=target, mode=mode,
                                                    target_name=router)

    def provision(self, router: str, timeout: float = 120.0, mobile: Any = None,
                  **body: Any) -> dict:
        """Send a PROVISION message from the remote site to ``router`` (in band, TCP 4340)
        and return the answer (``ok``, and the VM or the error). ``mobile`` maps objects of
        the service to mobile objects of this network (``{"counter": "svc1"}``): they serve
        on that object's home address and register with its credentials (a value that is not
        a name is sent as it is)."""
        import json

        if isinstance(mobile, dict):
            body["mobile"] = {obj: self.object_config(name).to_json() if isinstance(name, str) else name
                              for obj, name in mobile.items()}
        elif mobile is not None:
            body["mobile"] = mobile  # sent as given (a test of the router's checks)
        if self.site is None:
            raise TopologyError("this topology has no remote site to provision from")
        target = str(self.topo.addresses(router)[0].ip)
        path = self.run.write_private("provision", json.dumps(body))
        try:
            return self.probe(self.site, "control", target, "provision", f"@{path}",
                              "--sign-key", str(self.provider_key), "--timeout", str(timeout),
                              timeout=timeout + 30)
        finally:
            path.unlink(missing_ok=True)

    def requests(self, host: str, name: str, count: int = 20, rate: float = 50.0,
                 client: str | None = None, port: int | None = None) -> dict:
        """Send ``count`` service requests from ``host`` to object ``name``'s home address
        (``python -m nodetools.co_load`` inside the host); return its summary (sent,
        answered). Each call is a new client unless ``client`` is given: objects remember
        clients' sequence numbers."""
        import json

        self._clients = getattr(self, "_clients", 0) + 1
        out = self.run.dir / f"requests-{self._clients}.jsonl"
        argv = [sys.executable, "-m", "nodetools.co_load", "--dst", self.objects[name].home_address,
                "--rate", str(rate), "--duration", str(count / rate), "--out", str(out),
                "--client", client or f"{host}-{self._clients}"]
        if port is not None:
            argv += ["--port", str(port)]
        proc = self.net[host].popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        stdout, stderr = proc.communicate(timeout=60 + count / rate)
        if proc.returncode != 0:
            raise TopologyError(f"requests from {host} failed: {stderr.decode()[-500:]}")
        return json.loads(stdout.decode().strip().splitlines()[-1])

    def resolve(self, host: str, name: str) -> dict:
        """Ask the run's DNS server, from inside ``host``, for ``name``'s address:
        ``{"rcode": 0, "addresses": [...]}`` (rcode 3: no such name)."""
        if self.dns is None:
            raise TopologyError("this topology has no DNS server")
        return self.probe(host, "resolve", name, self.dns)

    def probe(self, node: str, *args: str, timeout: float = 60.0) -> Any:
        """Run ``python -m nodetools.probes ARGS`` inside ``node``; return its JSON answer."""
        import json
        import shlex

        argv = [sys.executable, "-m", "nodetools.probes", *args]
        proc = self.net[node].popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise TopologyError(f"probe {shlex.join(args)} on {node} timed out") from None
        if proc.returncode != 0:
            raise TopologyError(f"probe {shlex.join(args)} on {node} failed: {err.decode()[-500:]}")
        return json.loads(out.decode().strip().splitlines()[-1])

    def wait_for(self, predicate: Any, timeout: float = 10.0, interval: float = 0.05) -> Any:
        """Poll ``predicate()`` until it returns a truthy value (the agents have no
        push channel to the caller); raise TimeoutError with the last value otherwise."""
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(interval)
        raise TimeoutError(f"condition not met within {timeout}s (last value {value!r})")

    @contextlib.contextmanager
    def capture(self, interface: str, name: str, node: str | None = None,
                bpf: str = "") -> Iterator[Path]:
        """Capture on ``interface`` (of ``node``, or a bridge in the root namespace) into
        ``captures/<name>.pcap`` while the block runs."""
        path = self.run.dir / "captures" / f"{name}.pcap"
        argv = ["tcpdump", "-i", interface, "--immediate-mode", "-U", "-w", str(path), "-s", "0"]
        if bpf:
            argv.append(bpf)
        if node is not None:
            proc = self.net[node].popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        else:
            proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_for_marker(proc, proc.stderr, b"listening on")
            yield path
        finally:
            stop_child(proc)


def wait_for_marker(proc: subprocess.Popen, stream: Any, marker: bytes, timeout: float = 5.0) -> bytes:
    """Read a child's ``stream`` until ``marker`` appears (a tool saying it is ready: tcpdump's
    "listening on", iperf3's "Server listening"); raise TopologyError with what it printed if
    it exits or stays silent for ``timeout`` seconds. Returns what was read."""
    import select

    deadline = time.monotonic() + timeout
    buf = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([stream], [], [], 0.1)
        if ready:
            chunk = os.read(stream.fileno(), 4096)
            if not chunk:
                break
            buf += chunk
            if marker in buf:
                return buf
        if proc.poll() is not None:
            break
    raise TopologyError(f"{marker.decode()!r} never came: {buf.decode(errors='replace').strip()[-300:]}")
