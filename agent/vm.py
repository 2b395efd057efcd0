"""The router's virtual machine (patent Figs. 2-5): provisioning, fetch, verify, run.

A router boots with a baseline (authorized provider keys, a baseline lifecycle policy,
default resources, how to reach the remote site). A PROVISION message — MOAT control protocol,
in band on TCP 4340, normally sent by the remote site — configures one VM and names the
service it is to run. :meth:`VmManager.provision` then follows Fig. 5 step by step:

1. configure the VM: a **virtual interface** (the service answers on one address added to
   one interface, step 66) or a **virtual service** (it answers on every address of the
   router, so losing one interface does not lose it); credentials may only *restrict* the
   baseline (68), the lifecycle policy may restrict or enhance it (70), resources are set (72);
2. fetch the service's manifest and code from the remote site (74-76);
3. resources sufficient for every object of the manifest? (78)
4. credentials: the service's signer is one of the VM's authorized providers? (80-82)
5. lifecycle policy (84), versions (86: the cache keeps archives by hash), load (88: an
   all-or-nothing install), initialise (90: each object in its sandbox — own cgroup with the
   manifest's limits, unprivileged user, private directory).

A refusal at any step is recorded (``moat show errors``), answered to the sender (92-94) and
leaves nothing behind: no address, no files, no process.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from packets.codes import SERVICE_PORT

from .errors import AgentError
from .shaping import EgressShaper

log = logging.getLogger(__name__)

KINDS = ("interface", "service")
RUN_TIMEOUT = 10.0


class ProvisionError(AgentError):
    """A provisioning refused at one step of Fig. 5; nothing of it stays installed."""

    def __init__(self, step: str, reason: str) -> None:
        self.step = step
        self.reason = reason
        super().__init__(f"{step}: {reason}")


@dataclass
class SiteAccess:
    """How this router reaches the remote site's repository (SFTP)."""

    address: str
    known_host_key: str  # path of the site's public host key
    client_key: str  # path of this router's private key
    user: str = "root"
    port: int = 22


@dataclass
class VmBaseline:
    """The default configuration a router boots with (Fig. 5, step 60)."""

    authorized_keys: list[str]  # provider public key files
    storage: str  # where services are cached and installed
    site: SiteAccess | None = None
    cpu: float = 1.0
    memory_mb: int = 512
    pids: int = 128
    policy: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "VmBaseline":
        site = SiteAccess(**data["site"]) if data.get("site") else None
        return cls(**{**data, "site": site})


@dataclass
class VirtualMachine:
    """One provisioned VM and the service it runs."""

    name: str
    kind: str
    service: str
    address: str  # "0.0.0.0" for a virtual service
    interface: str | None
    port: int
    cpu: float
    memory_mb: int
    pids: int
    egress_kbit: int | None
    authorized: list[str]
    policy: dict[str, Any]
    version: str = ""
    installed: str = ""
    objects: dict[str, Any] = field(default_factory=dict)  # name -> ObjectSandbox
    steps: list[tuple[str, float]] = field(default_factory=list)
    running_since: float | None = None
    shaper_key: int | None = None
    last_update_check: float = 0.0

    def describe(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "objects"}
        d["objects"] = {}
        for name, sb in self.objects.items():
            d["objects"][name] = {"pid": sb.pid, "usage": sb.usage(), "exit": sb.exit_info()}
        return d


class VmManager:
    """The VM role of the agent: provisioned VMs, their objects, and the errors log."""

    def __init__(self, baseline: VmBaseline, router: str, run_id: str | None,
                 addresses: dict[str, str]) -> None:
        self.baseline = baseline
        self.router = router
        self.run_id = run_id
        self.addresses = addresses  # interface -> address
        self.vms: dict[str, VirtualMachine] = {}
        self.errors: list[dict[str, Any]] = []
        self.retired: list[dict[str, Any]] = []
        self._cgroups: Any = None
        self.shaper = EgressShaper()
        self._next_key = 0

    # --- Fig. 5 -------------------------------------------------------------------------

    async def provision(self, body: dict[str, Any]) -> dict[str, Any]:
        """Provision one VM from a PROVISION body; return what was done (or raise
        :class:`ProvisionError` after recording it and undoing every step)."""
        vm = None
        try:
            vm = self._configure(body)
            self.vms[vm.name] = vm
            await self._fetch_verify_install(vm)
            await self._initialise(vm)
            vm.steps.append(("initialised", time.time()))
            vm.running_since = vm.last_update_check = time.time()
            log.info("VM %s on %s runs %s %s", vm.name, self.router, vm.service, vm.version)
            return vm.describe()
        except ProvisionError as exc:
            self._record(body, exc)
            if vm is not None:
                await self.remove(vm.name)
            raise
        except Exception as exc:  # noqa: BLE001 - any other failure is a refusal too
            err = ProvisionError("internal", repr(exc))
            self._record(body, err)
            if vm is not None:
                await self.remove(vm.name)
            raise err from exc

    def _record(self, body: dict[str, Any], exc: ProvisionError) -> None:
        self.errors.append({"at": time.time(), "vm": body.get("vm"), "service": body.get("service"),
                            "step": exc.step, "reason": exc.reason})
        del self.errors[:-200]
        log.warning("provisioning of %s refused at %s: %s", body.get("vm"), exc.step, exc.reason)

    def _configure(self, body: dict[str, Any]) -> VirtualMachine:
        base = self.baseline
        try:
            name, kind, service = str(body["vm"]), str(body["kind"]), str(body["service"])
        except KeyError as exc:
            raise ProvisionError("message", f"missing field {exc}") from None
        if kind not in KINDS:
            raise ProvisionError("message", f"kind must be one of {KINDS}")
        if name in self.vms:
            raise ProvisionError("message", f"VM {name} exists on {self.router}")
        interface = body.get("interface")
        if kind == "interface":
            if interface not in self.addresses:
                raise ProvisionError("virtual interface", f"no interface {interface!r} on {self.router}")
            address = str(body.get("address") or "")
            if not address:
                raise ProvisionError("virtual interface", "a virtual interface needs an address")
        else:
            address, interface = "0.0.0.0", None
        wanted = [str(k) for k in body.get("credentials", base.authorized_keys)]
        extra = [k for k in wanted if k not in base.authorized_keys]
        if extra:
            raise ProvisionError("credentials", f"credentials may only restrict the baseline; "
                                 f"not authorized here: {extra}")
        res = body.get("resources", {})
        policy = {**base.policy, **body.get("policy", {})}  # may restrict or enhance (step 70)
        vm = VirtualMachine(name, kind, service, address, interface, int(body.get("port", SERVICE_PORT)),
                            float(res.get("cpu", base.cpu)), int(res.get("memory_mb", base.memory_mb)),
                            int(res.get("pids", base.pids)),
                            int(res["egress_kbit"]) if res.get("egress_kbit") else None, wanted, policy)
        vm.steps.append(("configured", time.time()))
        return vm

    async def _fetch_verify_install(self, vm: VirtualMachine) -> None:
        from .fetch import fetch_service
        from .repository import (RepositoryError, inspect_service, install_service,
                                 load_public_key)

        site = self.baseline.site
        if site is None:
            raise ProvisionError("fetch", "this router knows no remote site")
        storage = Path(self.baseline.storage)
        fetched = storage / "fetched" / f"{vm.name}-{vm.service}"
        shutil.rmtree(fetched, ignore_errors=True)
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(None, lambda: fetch_service(
                site.address, site.port, site.user, site.client_key, site.known_host_key,
                vm.service, fetched, cache_dir=storage / "cache", replace=True))
        except RepositoryError as exc:
            raise ProvisionError("fetch", f"{type(exc).__name__}: {exc}") from None
        vm.steps.append((f"fetched ({result.bytes_downloaded} bytes, {len(result.cached)} cached)", time.time()))
        try:
            manifest, _policy, _kid = inspect_service(fetched)
        except RepositoryError as exc:
            raise ProvisionError("manifest", f"{type(exc).__name__}: {exc}") from None
        need_cpu = sum(o.resources.cpu for o in manifest.objects)
        need_mem = sum(o.resources.memory_mb for o in manifest.objects)
        need_pids = sum(o.resources.pids for o in manifest.objects)
        if need_cpu > vm.cpu or need_mem > vm.memory_mb or need_pids > vm.pids:
            raise ProvisionError("resources", f"the service needs cpu {need_cpu}, {need_mem} MiB, "
                                 f"{need_pids} pids; the VM has cpu {vm.cpu}, {vm.memory_mb} MiB, {vm.pids} pids")
        vm.steps.append(("resources sufficient", time.time()))
        dest = storage / "installed" / vm.name
        try:
            verified = await loop.run_in_executor(None, lambda: install_service(
                fetched, [load_public_key(Path(k)) for k in vm.authorized], dest, replace=True))
        except RepositoryError as exc:
            raise ProvisionError("credentials", f"{type(exc).__name__}: {exc}") from None
        finally:
            shutil.rmtree(fetched, ignore_errors=True)
        vm.version, vm.installed = verified.manifest.version, str(dest)
        vm.policy = {**verified.policy.to_json(), **vm.policy}  # the VM's terms override the provider's
        vm.steps.append((f"verified and installed {vm.service} {vm.version} (signer {verified.key_id})", time.time()))

    async def _initialise(self, vm: VirtualMachine) -> None:
        if vm.kind == "interface":
            out = subprocess.run(["ip", "addr", "add", f"{vm.address}/32", "dev", str(vm.interface)],
                                 capture_output=True, text=True, timeout=RUN_TIMEOUT)
            if out.returncode != 0 and "exists" not in out.stderr:
                raise ProvisionError("virtual interface", out.stderr.strip())
        if vm.egress_kbit:
            self._next_key += 1
            vm.shaper_key = self._next_key
            match = {"src": vm.address} if vm.kind == "interface" else {"sport": vm.port}
            try:
                capped = await asyncio.get_running_loop().run_in_executor(None, lambda: self.shaper.cap(
                    vm.shaper_key, vm.egress_kbit, list(self.addresses), **match))
            except Exception as exc:  # noqa: BLE001 - netlink refusals are a refusal of the VM
                raise ProvisionError("resources", f"egress cap: {exc!r}") from None
            vm.steps.append((f"egress capped at {vm.egress_kbit} kbit/s on {', '.join(capped)}", time.time()))
        await self._start_objects(vm)

    async def _start_objects(self, vm: VirtualMachine, states: dict[str, Any] | None = None) -> None:
        """Start every object of the installed manifest in its sandbox (with a state, when
        it continues from an earlier version)."""
        from .cgroups import CgroupManager, Limits
        from .repository import Manifest
        from .sandbox import (ObjectSandbox, SandboxSpec, ensure_object_user, make_workdir,
                              minimal_env, open_log)

        manifest = Manifest.from_bytes((Path(vm.installed) / "manifest.json").read_bytes())
        uid, gid = ensure_object_user()
        if self._cgroups is None:
            self._cgroups = CgroupManager(self.run_id, owner=self.router)
        repo = str(Path(__file__).resolve().parent.parent)
        for obj in manifest.objects:
            parent, child = socket.socketpair()
            workdir = make_workdir(Path(self.baseline.storage) / "objects", f"{vm.name}-{obj.name}", uid, gid)
            code_dir = str(Path(vm.installed) / obj.name)
            spec = SandboxSpec(workdir, uid, gid, Limits(**obj.resources.limits_kwargs()),
                               env=minimal_env(workdir, PYTHONPATH=f"{code_dir}:{repo}"),
                               pass_fds=(child.fileno(),))
            sandbox = ObjectSandbox(f"{vm.name}-{obj.name}", spec, self._cgroups)
            log_fd = open_log(Path(self.baseline.storage) / f"{vm.name}-{obj.name}.log")
            argv = [sys.executable, "-m", "agent.runner", "--spec", obj.entry, "--name", obj.name,
                    "--address", vm.address, "--port", str(vm.port), "--router", self.router,
                    "--control-fd", str(child.fileno())]
            if vm.policy.get("extensible") is False:
                argv.append("--not-extensible")
            if states and states.get(obj.name) is not None:
                argv += ["--state", json.dumps(states[obj.name])]
            try:
                await sandbox.start(argv, stdout=log_fd, stderr=log_fd)
            except AgentError as exc:
                await sandbox.close()
                raise ProvisionError("initialise", f"{obj.name}: {exc}") from None
            finally:
                child.close()
                os.close(log_fd)
            sandbox.control = await asyncio.open_connection(sock=parent)  # type: ignore[attr-defined]
            vm.objects[obj.name] = sandbox
            await self.call(vm.name, obj.name, "stats")  # it serves: initialised

    async def enforce(self) -> list[dict[str, Any]]:
        """Remove every VM whose lifecycle policy is used up (transactions served, or time
        since it started); return what was retired and why (patent: lifecycle policy)."""
        retired = []
        now = time.time()
        for name, vm in list(self.vms.items()):
            if vm.running_since is None:
                continue  # still being provisioned
            reason = None
            limit, duration = vm.policy.get("max_transactions"), vm.policy.get("max_duration_s")
            if duration is not None and now - vm.running_since >= float(duration):
                reason = f"duration of {duration} s used up"
            elif limit is not None:
                served = 0
                for obj in vm.objects:
                    try:
                        served += int((await self.call(name, obj, "stats"))["served"])
                    except (AgentError, asyncio.TimeoutError, KeyError, ValueError):
                        continue
                if served >= int(limit):
                    reason = f"{served} of {limit} transactions used"
            if reason is not None:
                await self.remove(name)
                entry = {"at": now, "vm": name, "service": vm.service, "reason": reason}
                self.retired.append(entry)
                retired.append(entry)
                log.info("VM %s retired: %s", name, reason)
        return retired

    async def check_updates(self) -> list[dict[str, Any]]:
        """Ask the remote site for a new version of each VM's service at the interval its
        policy sets, and upgrade a running service without losing its state: the objects
        stop with their checkpoints, the new version is fetched, verified and installed, and
        the new objects start from those checkpoints. A refused upgrade restarts the old
        version from the same checkpoints (and is recorded in the errors)."""
        from .fetch import fetch_service
        from .repository import RepositoryError, inspect_service

        done = []
        for vm in list(self.vms.values()):
            interval = vm.policy.get("update_check_interval_s")
            now = time.time()
            if vm.running_since is None or interval is None or now - vm.last_update_check < float(interval):
                continue
            vm.last_update_check = now
            site = self.baseline.site
            if site is None:
                continue
            probe = Path(self.baseline.storage) / "fetched" / f"{vm.name}-check"
            loop = asyncio.get_running_loop()
            try:
                await loop.run_in_executor(None, lambda: fetch_service(
                    site.address, site.port, site.user, site.client_key, site.known_host_key,
                    vm.service, probe, cache_dir=Path(self.baseline.storage) / "cache", replace=True))
                version = inspect_service(probe)[0].version
            except RepositoryError as exc:
                log.info("update check for %s failed: %s", vm.name, exc)
                continue
            finally:
                shutil.rmtree(probe, ignore_errors=True)
            if version == vm.version:
                continue
            done.append(await self._upgrade(vm, version))
        return done

    async def _upgrade(self, vm: VirtualMachine, version: str) -> dict[str, Any]:
        old = vm.version
        states: dict[str, Any] = {}
        for name in list(vm.objects):
            try:
                states[name] = await self.call(vm.name, name, "stop")
            except (AgentError, asyncio.TimeoutError) as exc:
                log.warning("upgrade of %s: %s gave no checkpoint (%s)", vm.name, name, exc)
            sandbox = vm.objects.pop(name)
            await sandbox.wait(RUN_TIMEOUT)
            await sandbox.close()
        try:
            await self._fetch_verify_install(vm)
            outcome = {"vm": vm.name, "from": old, "to": vm.version, "ok": True}
        except ProvisionError as exc:
            self._record({"vm": vm.name, "service": vm.service}, ProvisionError(f"upgrade: {exc.step}", exc.reason))
            outcome = {"vm": vm.name, "from": old, "to": version, "ok": False, "error": str(exc)}
        await self._start_objects(vm, states)
        vm.steps.append((f"upgraded {old} -> {vm.version}" if outcome["ok"] else f"upgrade to {version} refused", time.time()))
        log.info("VM %s: %s", vm.name, outcome)
        return outcome

    async def call(self, vm_name: str, obj: str, cmd: str, **args: Any) -> Any:
        sandbox = self.vms[vm_name].objects[obj]
        reader, writer = sandbox.control
        writer.write(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), RUN_TIMEOUT)
        if not line:
            raise ProvisionError("initialise", f"object {obj} exited: {sandbox.exit_info()}")
        answer = json.loads(line)
        if not answer.get("ok"):
            raise AgentError(f"object {obj} refused {cmd}: {answer.get('error')}")
        return answer["result"]

    async def remove(self, name: str) -> dict[str, Any] | None:
        """Stop a VM's objects, remove its address, files and cgroups (safe to repeat)."""
        vm = self.vms.pop(name, None)
        if vm is None:
            return None
        for obj, sandbox in vm.objects.items():
            try:
                reader, writer = sandbox.control
                writer.write(b'{"cmd": "stop"}\n')
                await writer.drain()
                await sandbox.wait(RUN_TIMEOUT)
                writer.close()
            except Exception as exc:  # noqa: BLE001 - still close the sandbox
                log.info("stopping %s: %r", obj, exc)
            await sandbox.close()
        if vm.kind == "interface" and vm.interface:
            subprocess.run(["ip", "addr", "del", f"{vm.address}/32", "dev", vm.interface],
                           capture_output=True, timeout=RUN_TIMEOUT)
        if vm.shaper_key is not None:
            key = vm.shaper_key
            await asyncio.get_running_loop().run_in_executor(None, lambda: self.shaper.uncap(key))
        if vm.installed:
            shutil.rmtree(vm.installed, ignore_errors=True)
        return vm.describe()

    async def close(self) -> None:
        for name in list(self.vms):
            await self.remove(name)
