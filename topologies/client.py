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
* ``provider/provider.key``: the run's service provider key;
* ``co_keys.json`` (root only): the corresponding objects' broker keys (host -> hex key),
  which the CO library (:mod:`nodetools.co`) reads inside a host, so no key is ever on a
  command line; ``params`` name the ``broker`` router, its ``broker_address`` and the
  ``co_hosts``;
* ``grants/<group>.json`` (root only, written here): the grants ``moat service request``
  obtained, with the host that holds them, so later commands can name a lease.

Every name the caller gives is checked against the run before anything is sent, and a wrong
one raises :class:`topologies.errors.UnknownName` listing the names that exist.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable

from agent.core.config import ObjectConfig
from agent.core.control import ControlClient
from topologies.errors import ProbeError, TopologyError, UnknownName
from topologies.run import Run, live_runs, run_root

__all__ = ["RunClient", "NoRun", "NoBroker", "BrokerRefusal", "OBJECTS_FILE", "CO_KEYS_FILE",
           "PROBES", "CO_LOAD", "CO_TOOL"]

log = logging.getLogger(__name__)

#: The objects' client configurations in the run directory (holds credentials: mode 0600).
OBJECTS_FILE = "objects.json"
#: The tools run inside nodes (see :mod:`nodetools`).
PROBES = "nodetools.probes"
CO_LOAD = "nodetools.co_load"
CO_TOOL = "nodetools.co"
#: The corresponding objects' broker keys in the run directory (mode 0600).
CO_KEYS_FILE = "co_keys.json"
#: Grants obtained through this client, one file per grant (mode 0600: they hold credentials).
GRANTS_DIR = "grants"
#: A grant's group id as the broker makes them (token_urlsafe): safe as a file name.
_GROUP_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
#: One exchange with the broker through the CO library, discovery included (seconds).
CO_TIMEOUT = 50.0
CONTROL_TIMEOUT = 10.0
MIGRATE_TIMEOUT = 60.0
PROVISION_TIMEOUT = 120.0


class NoRun(TopologyError):
    """No such run, or no network is up."""


class NoBroker(TopologyError):
    """The run has no service broker (started with ``--broker none``)."""


class BrokerRefusal(TopologyError):
    """The broker, or a leased service, refused what a CO asked: ``reason`` is the code it
    gave (``unknown_service``, ``no_capacity``, ``unknown_lease``, ``revoked``, ...)."""

    def __init__(self, answer: dict[str, Any]) -> None:
        self.answer = answer
        self.reason = str(answer.get("reason") or "refused")
        self.detail = str(answer.get("detail") or "")
        super().__init__(str(answer.get("error") or self.reason))


def _write_private_json(path: Path, doc: Any) -> Path:
    """``doc`` as JSON at ``path``, readable by root only (it carries credentials)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(doc, fh, indent=2)
    return path


def write_objects(run: Run, configs: Iterable[ObjectConfig]) -> Path:
    """Record the objects' client configurations in the run directory, readable by root only
    (they carry the objects' credentials)."""
    return _write_private_json(run.dir / OBJECTS_FILE, {c.name: c.to_json() for c in configs})


def write_co_keys(run: Run, keys: dict[str, bytes]) -> Path:
    """Record the corresponding objects' broker keys (host -> hex), readable by root only:
    the CO library reads its own from here inside the host."""
    return _write_private_json(run.dir / CO_KEYS_FILE, {h: k.hex() for h, k in keys.items()})


def _stopped(pid: int) -> bool:
    """Is process ``pid`` stopped (SIGSTOP, a debugger)? It restarts nothing then."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[:1] in (["T"], ["t"])


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

    def supervision(self, router: str) -> dict[str, Any] | None:
        """What ``router``'s supervisor last wrote (:mod:`agent.supervisor`), or None."""
        from agent.supervisor import read_status, status_path

        return read_status(status_path(self.run.dir, self.check_router(router)))

    def agent_state(self, router: str, timeout: float = 2.0) -> dict[str, Any]:
        """Is ``router``'s agent up? ``state``: ``up`` (it answers ``ping``), ``restarting``
        (its supervisor restarts it), ``crash-loop`` (it keeps dying; the supervisor still
        restarts it every few seconds) or ``down`` (no answer and nobody restarting it);
        with the supervisor's ``restarts`` and ``last_exit``. Never raises for a dead agent."""
        from agent.core.errors import ControlError
        from topologies.run import pid_alive

        sup = self.supervision(router) or {}
        try:
            self.call(router, "ping", timeout=timeout)
            state = "up"
        except ControlError:
            pid = sup.get("supervisor_pid")
            supervised = sup.get("state") in ("starting", "running", "restarting") and \
                isinstance(pid, int) and pid_alive(pid) and not _stopped(pid)
            if not supervised:
                state = "down"
            else:
                state = "crash-loop" if sup.get("crash_loop") else "restarting"
        last = sup.get("last_exit") if isinstance(sup.get("last_exit"), dict) else {}
        return {"router": router, "state": state, "restarts": sup.get("restarts", 0),
                "crash_loop": bool(sup.get("crash_loop")), "last_exit": last.get("text"),
                "last_exit_at": last.get("at"), "supervisor": sup.get("state"),
                "back_in_s": sup.get("last_back_in_s")}

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

    def migrate(self, name: str, router: str, mode: str = "make-before-break",
                transfer: str | None = None) -> dict:
        """Move running object ``name`` to ``router`` with its state; the source agent's
        report (``ok``, ``error``, timed ``steps``, and ``source``). A failed move leaves the
        object serving where it was. ``transfer``: ``precopy`` or ``stop-copy`` (None: the
        agent's default, pre-copy; agent.hosting.migration)."""
        self.check_object(name)
        target = self.address(self.check_router(router))
        source = self.where(name)
        if source is None:
            raise TopologyError(f"object {name} runs nowhere in run {self.run_id}")
        extra = {} if transfer is None else {"transfer": transfer}
        report = self.call(source, "migrate", timeout=MIGRATE_TIMEOUT, name=name, target=target,
                           mode=mode, target_name=router, **extra)
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
            # The routers' sealing keys are the run's, whichever provider key signs.
            return self.probe(site, "control", target, "provision", f"@{path}", "--sign-key",
                              str(key), "--peers", str(self.run.dir / "provider" / "peers.json"),
                              "--timeout", str(timeout), timeout=timeout + 30)
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
                "--count", str(count), "--out", str(out), "--client", client or f"{host}-{self._clients}"]
        if port is not None:
            args += ["--port", str(port)]
        return self.tool(host, CO_LOAD, *args, timeout=60 + count / rate)

    def leased_requests(self, ref: str, count: int = 20, rate: float = 50.0,
                        op: str = "incr") -> dict:
        """Send ``count`` requests with the credential of kept lease (or grant) ``ref``, from
        the CO that holds it, to its instance's address; return the summary with, per
        request, how many answers came and who served them (``replies``: [[seq, [served_by,
        ...]], ...]): under bicast each must come once, from the lease's instance."""
        record = self.find_grant(ref)
        host = record["host"]
        self._clients += 1
        out = self.run.dir / f"requests-{self._clients}.jsonl"
        summary = self.tool(host, CO_LOAD, "--grant", str(self._grant_path(record["grant"]["group"])),
                            "--rate", str(rate), "--duration", str(count / rate),
                            "--count", str(count), "--op", op,
                            "--out", str(out), "--client", f"{host}-{self._clients}",
                            timeout=60 + count / rate)
        rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
        summary["replies"] = [[r["seq"], [x.get("served_by") for x in r["replies"]]] for r in rows]
        summary["rtt_ms"] = [round((r["replies"][0]["at"] - r["sent"]) * 1000, 3)
                             for r in rows if r["replies"]]
        summary["results"] = [r["replies"][0].get("result") for r in rows if r["replies"]]
        return summary

    def resolve(self, host: str, name: str) -> dict:
        """Ask the run's DNS server, from inside ``host``, for ``name``'s address:
        ``{"rcode": 0, "addresses": [...]}`` (rcode 3: no such name)."""
        dns = self.params.get("dns")
        if not dns:
            raise TopologyError(f"run {self.run_id} has no DNS server")
        return self.probe(host, "resolve", name, dns)

    # --- the service broker (Fig. 12) ------------------------------------------------------

    def broker(self) -> str:
        """The router that runs the run's service broker."""
        router = self.params.get("broker")
        if not router:
            raise NoBroker(f"run {self.run_id} has no service broker (started with --broker none)")
        return str(router)

    def co_hosts(self) -> list[str]:
        """The hosts that hold a broker key, so may act as corresponding objects."""
        return sorted(self.params.get("co_hosts") or [])

    def check_co(self, host: str) -> str:
        return self._check("corresponding object host", host, self.co_hosts())

    def co(self, host: str, command: str, *args: str, timeout: float = CO_TIMEOUT) -> dict:
        """Run ``python -m nodetools.co COMMAND`` as corresponding object ``host`` (its key
        from the run's key file, the broker's address from the run); its answer, or
        :class:`BrokerRefusal` with the reason the broker or the service gave."""
        self.broker()
        self.check_co(host)
        answer = self.tool(host, CO_TOOL, command, "--co", host, "--keys",
                           str(self.run.dir / CO_KEYS_FILE), "--broker",
                           str(self.params["broker_address"]), *args, timeout=timeout)
        if not isinstance(answer, dict) or answer.get("ok") is not True:
            raise BrokerRefusal(answer if isinstance(answer, dict) else {"error": repr(answer)})
        return answer

    def services(self, host: str | None = None) -> list[dict]:
        """The broker's directory: asked in band by CO ``host`` (SERVICE_LIST), or, with no
        host, from the broker router's ``services`` command."""
        if host is None:
            return self.call(self.broker(), "services")
        return self.co(host, "list")["services"]

    def leases(self) -> list[dict]:
        """The broker's live leases (its router's ``leases`` command)."""
        return self.call(self.broker(), "leases")

    def lease_request(self, host: str, target: str, share: float, cpu: float,
                      duration: float | str = "any", measure: bool = False) -> dict:
        """CO ``host`` leases ``target`` (a service, or a goal ``"text -> rtf"``); the grant,
        also kept in the run directory for :meth:`lease_renew`, :meth:`lease_cancel` and
        :meth:`service_call`. ``measure``: the CO measures its round trip to each instance
        and the broker ranks paths by those instead of routing hops."""
        answer = self.co(host, "request", target, "--share", str(share), "--cpu", str(cpu),
                         "--duration", str(duration), *(["--measure"] if measure else []))
        grant = answer["grant"]
        self._save_grant(host, grant)
        return grant

    def grants(self) -> dict[str, dict]:
        """The grants kept in the run directory: group id -> {"host", "grant"}."""
        out: dict[str, dict] = {}
        folder = self.run.dir / GRANTS_DIR
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            try:
                record = json.loads(path.read_text())
                out[record["grant"]["group"]] = record
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("skipping unreadable grant %s: %s", path, exc)
        return out

    def find_grant(self, ref: str) -> dict:
        """The kept grant with lease (or group) id ``ref``; UnknownName lists the leases."""
        known: list[str] = []
        for group, record in self.grants().items():
            leases = [h["lease_id"] for h in record["grant"]["hops"]]
            if ref == group or ref in leases:
                return record
            known += leases
        raise UnknownName("lease", ref, known, f"run {self.run_id}")

    def lease_renew(self, lease_id: str, duration: float | str = "any") -> dict:
        """Renew one kept lease as the CO that holds it; its hop with the new credential."""
        record = self.find_grant(lease_id)
        hop = self.co(record["host"], "renew", "--duration", str(duration), "--", lease_id)["hop"]
        grant = record["grant"]
        grant["hops"] = [hop if h["lease_id"] == lease_id else h for h in grant["hops"]]
        self._save_grant(record["host"], grant)
        return hop

    def lease_cancel(self, lease_id: str) -> str:
        """Cancel one kept lease (the broker frees it and revokes its credential); the grant
        forgets it, and goes when no lease is left."""
        record = self.find_grant(lease_id)
        self.co(record["host"], "cancel", "--", lease_id)
        grant = record["grant"]
        grant["hops"] = [h for h in grant["hops"] if h["lease_id"] != lease_id]
        if grant["hops"]:
            self._save_grant(record["host"], grant)
        else:
            self._grant_path(grant["group"]).unlink(missing_ok=True)
        return lease_id

    def service_call(self, host: str, ref: str, document: Path, output: Path | None = None,
                     share: float = 10.0, cpu: float = 0.1) -> dict:
        """Run a path on ``document`` as CO ``host``: ``ref`` is a kept lease or grant (used
        as it is) or a target, which is leased for this one call and cancelled after it."""
        self.check_co(host)
        try:
            record = self.find_grant(ref)
            leased_here = False
        except UnknownName as exc:
            services = self._service_names()
            if "->" not in ref and ref not in services:
                raise UnknownName("lease or service", ref, [*exc.known, *services],
                                  f"run {self.run_id}") from None
            record = {"host": host, "grant": self.lease_request(host, ref, share, cpu)}
            leased_here = True
        if record["host"] != host:
            raise TopologyError(f"lease {ref} is held by {record['host']}, not {host}")
        args = [str(self._grant_path(record["grant"]["group"])), str(document.resolve())]
        if output is not None:
            args += ["--output", str(output.resolve())]
        try:
            return self.co(host, "call", *args, timeout=CO_TIMEOUT * len(record["grant"]["hops"]))
        finally:
            if leased_here:
                for hop in list(record["grant"]["hops"]):
                    self.lease_cancel(hop["lease_id"])

    def _service_names(self) -> list[str]:
        """The names the broker knows services by: theirs and their objects'."""
        names = set()
        for service in self.services():
            names.add(service["service"])
            for instance in service["instances"]:
                names.update(instance.get("objects", []))
        return sorted(names)

    def _grant_path(self, group: str) -> Path:
        if not _GROUP_RE.fullmatch(group):
            raise TopologyError(f"grant group {group!r} cannot name a file")
        return self.run.dir / GRANTS_DIR / f"{group}.json"

    def _save_grant(self, host: str, grant: dict) -> Path:
        path = self._grant_path(str(grant.get("group")))
        path.parent.mkdir(mode=0o700, exist_ok=True)
        return _write_private_json(path, {"host": host, "grant": grant})

    # --- leased load in the background (the leases experiment) -----------------------------

    def keep_grant(self, host: str, grant: dict) -> Path:
        """Keep ``grant`` like :meth:`lease_request` keeps its own, for a grant a CO acting
        from ``host`` obtained through its own broker client (an experiment's second CO
        identity on a host): later calls name its leases (:meth:`leased_load`,
        :meth:`leased_requests`)."""
        self.check_node(host)
        return self._save_grant(host, grant)

    def leased_load(self, ref: str, rate: float, duration: float, client: str | None = None,
                    op: str = "incr") -> tuple[subprocess.Popen, Path]:
        """Start ``python -m nodetools.co_load`` in the background, inside the host that holds
        kept lease (or grant) ``ref``, with its credential, at ``rate`` requests/s for
        ``duration`` s; the process and the file its per-request log is written to when it
        ends (:meth:`read_load` reads it). ``client`` names it for the objects' at-most-once
        filter (default: a new name)."""
        record = self.find_grant(ref)
        host = record["host"]
        self._clients += 1
        out = self.run.dir / f"load-{self._clients}.jsonl"
        argv = [sys.executable, "-m", CO_LOAD,
                "--grant", str(self._grant_path(record["grant"]["group"])),
                "--rate", str(rate), "--duration", str(duration), "--op", op,
                "--out", str(out), "--client", client or f"{host}-{self._clients}"]
        return self.popen(host, argv, stdin=subprocess.DEVNULL), out

    @staticmethod
    def read_load(path: Path) -> list[dict]:
        """A load generator's log: per request ``seq``, ``sent`` (wall clock) and ``replies``
        (each ``at``, ``served_by``, ``instance``, ``result``, ``ok``); empty if none."""
        try:
            text = Path(path).read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]
