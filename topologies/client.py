"""The one client of a running MOAT network, built from its run directory.

Both the ``moat`` command (a separate process that finds the network through
``/tmp/moat/<run-id>/run.json``) and :class:`topologies.moatnet.MoatNetwork` (the process that
built it) act on a running network through :class:`RunClient`: agent control calls, finding
which router runs an object, object configurations, target addresses, starting and
migrating objects, provisioning from the remote site, and tools run inside nodes. Keeping it
in one place means the command line and the experiments cannot drift apart.

Everything it needs is in the run directory, written by :class:`MoatNetwork` before the
network is built:

* ``run.json``: the agents' control sockets (``agents``), node pids (``node_pids``) and
  ``params``: ``objects`` (name -> home address), ``addresses`` (node -> its first
  address), ``site`` and ``dns`` (the remote site's node name and the DNS server's address);
* ``objects.json`` (root only): each object's registration client configuration, with its
  credentials;
* ``provider/provider.key``: the run's service provider key.

Every name the caller gives is checked against the run before anything is sent, and a wrong
one raises :class:`topologies.errors.UnknownName` listing the names that exist.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable

from agent.core.config import ObjectConfig
from agent.core.control import ControlClient
from topologies.errors import ProbeError, TopologyError, UnknownName
from topologies.run import Run, live_runs, run_root

__all__ = ["RunClient", "NoRun", "OBJECTS_FILE", "PROBES", "CO_LOAD"]

log = logging.getLogger(__name__)

#: The objects' client configurations in the run directory (holds credentials: mode 0600).
OBJECTS_FILE = "objects.json"
#: The tools run inside nodes (see :mod:`nodetools`).
PROBES = "nodetools.probes"
CO_LOAD = "nodetools.co_load"
CONTROL_TIMEOUT = 10.0
MIGRATE_TIMEOUT = 60.0
PROVISION_TIMEOUT = 120.0


class NoRun(TopologyError):
    """No such run, or no network is up."""


def write_objects(run: Run, configs: Iterable[ObjectConfig]) -> Path:
    """Record the objects' client configurations in the run directory, readable by root only
    (they carry the objects' credentials)."""
    path = run.dir / OBJECTS_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump({c.name: c.to_json() for c in configs}, fh, indent=2)
    return path


class RunClient:
    """Act on the running network of ``run``: checked names, agent calls, objects, VMs."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self._clients = 0  # load generators started, for distinct client names

    @classmethod
    def open(cls, run_id: str | None = None, root: Path | None = None) -> "RunClient":
        """The client of run ``run_id``, or of the newest live run when none is named."""
        if run_id:
            try:
                return cls(Run.load(run_id, root))
            except (OSError, ValueError, TypeError):
                raise NoRun(f"no run {run_id} under {root or run_root()}") from None
        runs = live_runs(root)
        if not runs:
            raise NoRun("no MOAT network is up (start one with: sudo moat up)")
        return cls(runs[0])

    # --- names -----------------------------------------------------------------------------

    @property
    def run_id(self) -> str:
        return self.run.run_id

    @property
    def params(self) -> dict[str, Any]:
        return self.run.state.params

    def routers(self) -> list[str]:
        """The routers of the run (each runs an agent)."""
        return sorted(self.run.state.agents)

    def objects(self) -> list[str]:
        """The mobile objects of the run."""
        return sorted(self.params.get("objects") or {})

    def nodes(self) -> list[str]:
        """Every node with a namespace (routers and hosts)."""
        return sorted(self.run.state.node_pids)

    def _check(self, kind: str, name: str, known: Iterable[str]) -> str:
        known = list(known)
        if name not in known:
            raise UnknownName(kind, name, known, f"run {self.run_id}")
        return name

    def check_router(self, name: str) -> str:
        return self._check("router", name, self.routers())

    def check_object(self, name: str) -> str:
        return self._check("object", name, self.objects())

    def check_node(self, name: str) -> str:
        return self._check("node", name, self.nodes())

    def check_vm(self, router: str, vm: str) -> str:
        """``vm`` is a VM on ``router`` now (asks the router's agent)."""
        known = [v["name"] for v in self.call(router, "vm")]
        if vm not in known:
            raise UnknownName("VM", vm, known, f"router {router}")
        return vm

    # --- agents ----------------------------------------------------------------------------

    def agent(self, router: str, timeout: float = CONTROL_TIMEOUT) -> ControlClient:
        """The control socket client of ``router``'s agent."""
        return ControlClient(self.run.state.agents[self.check_router(router)], timeout=timeout)

    def call(self, router: str, cmd: str, timeout: float = CONTROL_TIMEOUT, **args: Any) -> Any:
        """One control call to ``router``'s agent (ControlError on a refusal)."""
        return self.agent(router, timeout).call(cmd, **args)

    # --- facts of the run ------------------------------------------------------------------

    def address(self, node: str) -> str:
        """``node``'s first address: where in-band messages to it go."""
        addresses = self.params.get("addresses") or {}
        return addresses[self._check("node", node, addresses)]

    def object_config(self, name: str, **overrides: Any) -> ObjectConfig:
        """Object ``name``'s registration client configuration, with its credentials."""
        self.check_object(name)
        path = self.run.dir / OBJECTS_FILE
        try:
            data = json.loads(path.read_text())[name]
        except (OSError, ValueError, KeyError) as exc:
            raise TopologyError(f"cannot read object {name}'s configuration from {path}: {exc}") from None
        cfg = ObjectConfig.from_json(data)
        for key, value in overrides.items():
            if not hasattr(cfg, key):
                raise TopologyError(f"an object configuration has no field {key!r}")
            setattr(cfg, key, value)
        return cfg

    def where(self, name: str) -> str | None:
        """The router that hosts object ``name`` now (its code or its client), or None."""
        for router in self.routers():
            if any(o["name"] == name for o in self.call(router, "objects")):
                return router
        return None

    # --- objects ---------------------------------------------------------------------------

    def start_object(self, name: str, router: str, spec: str | None = None,
                     resources: dict[str, Any] | None = None, **overrides: Any) -> dict:
        """Run object ``name``'s registration client on ``router``; with ``spec``
        (``module:Class``) also its code on its home address, under controlled exec with
        ``resources`` (cpu, memory_mb, pids)."""
        self.check_router(router)
        cfg = self.object_config(name, **overrides).to_json()
        args: dict[str, Any] = {"config": cfg}
        if spec is not None:
            args.update(spec=spec, resources=resources)
        return self.call(router, "object_start", **args)

    def migrate(self, name: str, router: str, mode: str = "make-before-break") -> dict:
        """Move running object ``name`` to ``router`` with its state; the source agent's
        report (``ok``, ``error``, timed ``steps``, and ``source``). A failed move leaves the
        object serving where it was."""
        self.check_object(name)
        target = self.address(self.check_router(router))
        source = self.where(name)
        if source is None:
            raise TopologyError(f"object {name} runs nowhere in run {self.run_id}")
        report = self.call(source, "migrate", timeout=MIGRATE_TIMEOUT, name=name, target=target,
                           mode=mode, target_name=router)
        return dict(report, source=source)

    # --- the remote site -------------------------------------------------------------------

    def site(self) -> str:
        """The remote site's node, which PROVISION messages come from."""
        site = self.params.get("site")
        if not site or site not in self.run.state.node_pids:
            raise TopologyError(f"run {self.run_id} has no remote site to provision from")
        return site

    def provision(self, router: str, body: dict[str, Any], mobile: Any = None,
                  key: str | Path | None = None, timeout: float = PROVISION_TIMEOUT) -> dict:
        """Send a PROVISION message from the remote site to ``router`` (in band, TCP 4340),
        signed with ``key`` (default: the run's provider key); return the answer (``ok``,
        and the VM or the error). ``mobile`` maps objects of the service to mobile objects
        of the run (``{"counter": "svc1"}``): they serve on that object's home address and
        register with its credentials (a value that is not a name is sent as it is: a test
        of the router's own checks)."""
        target = self.address(self.check_router(router))
        body = dict(body)
        if isinstance(mobile, dict):
            body["mobile"] = {obj: self.object_config(name).to_json() if isinstance(name, str) else name
                              for obj, name in mobile.items()}
        elif mobile is not None:
            body["mobile"] = mobile
        site = self.site()
        key = key or self.run.dir / "provider" / "provider.key"
        path = self.run.write_private("provision", json.dumps(body))
        try:
            return self.probe(site, "control", target, "provision", f"@{path}", "--sign-key",
                              str(key), "--timeout", str(timeout), timeout=timeout + 30)
        finally:
            path.unlink(missing_ok=True)

    def remove_vm(self, router: str, vm: str) -> Any:
        """Remove VM ``vm`` from ``router`` (its objects stop, its address goes)."""
        self.check_router(router)
        return self.call(router, "vm_remove", timeout=60, name=self.check_vm(router, vm))

    # --- tools inside nodes ----------------------------------------------------------------

    def popen(self, node: str, argv: list[str], **kwargs: Any) -> subprocess.Popen:
        """Start ``argv`` inside ``node``'s namespaces (what Mininet's ``node.popen`` does:
        ``mnexec -da PID``), from any process that can read the run's state."""
        pid = self.run.state.node_pids[self.check_node(node)]
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        return subprocess.Popen(["mnexec", "-da", str(pid), *argv], **kwargs)

    def tool(self, node: str, module: str, *args: str, timeout: float = 60.0) -> Any:
        """Run ``python -m MODULE ARGS`` inside ``node``; return the JSON of its last line."""
        what = f"{module} {shlex.join(args)} on {node}"
        proc = self.popen(node, [sys.executable, "-m", module, *args])
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise ProbeError(f"{what} timed out after {timeout:g}s") from None
        if proc.returncode != 0:
            raise ProbeError(f"{what} failed: {err.decode(errors='replace').strip()[-500:]}")
        try:
            return json.loads(out.decode().strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise ProbeError(f"{what} printed no JSON: {out.decode(errors='replace')[-300:]}") from None

    def probe(self, node: str, *args: str, timeout: float = 60.0) -> Any:
        """Run ``python -m nodetools.probes ARGS`` inside ``node``; return its JSON answer."""
        return self.tool(node, PROBES, *args, timeout=timeout)

    def requests(self, host: str, name: str, count: int = 20, rate: float = 50.0,
                 client: str | None = None, port: int | None = None) -> dict:
        """Send ``count`` service requests from ``host`` to object ``name``'s home address
        (``python -m nodetools.co_load`` inside the host); return its summary (sent,
        answered). Each call is a new client unless ``client`` is given: objects remember
        clients' sequence numbers."""
        home = self.params["objects"][self.check_object(name)]
        return self.requests_at(host, home, count, rate, client=client, port=port)

    def requests_at(self, host: str, address: str, count: int = 20, rate: float = 50.0,
                    client: str | None = None, port: int | None = None) -> dict:
        """:meth:`requests` to an address rather than an object's home address: a VM's
        virtual interface or service address, which belongs to no object of the run."""
        self.check_node(host)
        home = address
        self._clients += 1
        out = self.run.dir / f"requests-{self._clients}.jsonl"
        args = ["--dst", home, "--rate", str(rate), "--duration", str(count / rate),
                "--out", str(out), "--client", client or f"{host}-{self._clients}"]
        if port is not None:
            args += ["--port", str(port)]
        return self.tool(host, CO_LOAD, *args, timeout=60 + count / rate)

    def resolve(self, host: str, name: str) -> dict:
        """Ask the run's DNS server, from inside ``host``, for ``name``'s address:
        ``{"rcode": 0, "addresses": [...]}`` (rcode 3: no such name)."""
        dns = self.params.get("dns")
        if not dns:
            raise TopologyError(f"run {self.run_id} has no DNS server")
        return self.probe(host, "resolve", name, dns)
