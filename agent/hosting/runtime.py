"""The router's side of an object process: start it under controlled exec, talk to it over
a socketpair, stop it.

Every object — one placed on a router by an experiment, one a provisioned VM runs, one that
arrives by migration — runs the same way: ``python -m agent.hosting.runner`` started by
:mod:`agent.hosting.sandbox` in its own cgroup (CPU quota, memory, pids) as a uid of its own, in
its own PID namespace, with a private size-limited working directory and /tmp, and nothing
inherited but its end of the socketpair.
So a migrated object is held to the same limits at its new router as at its old one, and
``moat show objects`` / ``moat show vm`` can report what each one uses.

State never travels on the command line (argv is limited and visible to every user): a
process that must continue from a checkpoint starts *warm* and receives it over the
socketpair (``set_state``), which also carries checkpoints back (``get_state``/``stop``).

The socketpair speaks :mod:`agent.core.rpc` (requests and answers matched by id, lines up to
:data:`~agent.core.rpc.CHECKPOINT_LINE_LIMIT`), so an answer that arrives after its call timed
out is discarded instead of being taken for the next call's answer.

An object started with a ``relay_dir`` outlives its agent (issue 13): its relay keeps the
channel, :meth:`ObjectProcess.record` is what the agent's registry keeps of it, and
:meth:`ObjectProcess.adopt` is how the next agent takes it over, resuming the channel from a
clean line (:meth:`agent.core.rpc.RpcClient.resume`).

A *leased* object (patent Fig. 10, 164) starts with ``--leased`` and refuses every request
until :meth:`ObjectProcess.start` has handed it its :class:`ServiceCredentials` over the same
socketpair (the key never appears on a command line or the network); a new process of the
same object (an upgrade, a restart, a migration's target) is given them again by its start.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.core import rpc
from agent.core.errors import AgentError
from agent.hosting.cgroups import CgroupManager, CgroupVersion, Limits

log = logging.getLogger(__name__)

CALL_TIMEOUT = 5.0
STOP_TIMEOUT = 5.0
#: The repository root (agent/hosting/runtime.py is two levels below it): on the object's
#: PYTHONPATH, so it imports agent.sdk and packets wherever the checkout is.
REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class ServiceCredentials:
    """What a leased object checks credentials with: its service, its instance id (as
    registered with the broker) and the service key derived from the run's router key."""

    service: str
    instance: str
    key: bytes = b""
    #: primary, duplicate or secondary: a duplicate leaves refusals to the primary.
    part: str = "primary"
    #: The router's LAN prefixes: COs there reach only this instance.
    networks: tuple[str, ...] = ()
    #: Other instance ids whose credentials this one honours (a secondary: its primary's).
    aliases: tuple[str, ...] = ()

    def __repr__(self) -> str:  # never the key in a log line
        return f"ServiceCredentials({self.service!r}, {self.instance!r})"


class ObjectProcessError(AgentError):
    """An object process that failed to start, answer or stop; a failed call's
    :class:`~agent.core.rpc.RpcError` (refusal, time-out, garbled answer, closed channel) is
    its ``__cause__``."""


class ObjectProcess:
    """One running object, child of the agent daemon, in its sandbox.

    ``label`` only names it in log lines. Its uid, and the name of its cgroup, working
    directory and log (``objects_dir/<name>`` and ``objects_dir/<name>.log``), are the
    agent's choice (:mod:`agent.hosting.object_uids`), never built from a name a provider
    chose; :meth:`sandbox_info` shows them. The working directory is removed and the uid given
    back once the object has stopped (its final checkpoint comes over the socketpair, not
    from a file). ``code_dir`` is put on the object's ``PYTHONPATH`` before this repository
    (a VM's installed service code).
    """

    def __init__(self, name: str, spec: str, address: str, port: int, router: str, *,
                 objects_dir: Path, cgroups: CgroupManager | None, limits: Limits,
                 label: str | None = None, code_dir: str | None = None,
                 extensible: bool = True, credentials: ServiceCredentials | None = None,
                 relay_dir: Path | None = None) -> None:
        self.name, self.spec, self.address, self.port, self.router = name, spec, address, port, router
        self.objects_dir = Path(objects_dir)
        self.cgroups = cgroups
        self.limits = limits
        self.label = label or name
        self.code_dir = code_dir
        self.extensible = extensible
        #: Set: the object serves only requests with a valid credential for this service.
        self.credentials = credentials
        #: A private directory for the relay's socket: the process outlives the agent and a
        #: later agent re-attaches (:meth:`adopt`); None: it dies with the agent.
        self.relay_dir = Path(relay_dir) if relay_dir is not None else None
        self.sandbox: Any = None  # agent.hosting.sandbox.ObjectSandbox once started
        self.identity: Any = None  # agent.hosting.object_uids.ObjectIdentity while it holds one
        self.workdir: Path | None = None
        self._channel: rpc.RpcClient | None = None
        self._lock = asyncio.Lock()

    @property
    def pid(self) -> int | None:
        return self.sandbox.pid if self.sandbox is not None else None

    @property
    def running(self) -> bool:
        proc = self.sandbox.proc if self.sandbox is not None else None
        return proc is not None and proc.returncode is None

    def usage(self) -> dict[str, Any]:
        """CPU seconds, memory (now and peak) and processes, from the object's cgroup."""
        if self.sandbox is None:
            return {"cpu_seconds": None, "memory_bytes": None, "memory_peak_bytes": None, "pids": None}
        return self.sandbox.usage()

    def exit_info(self) -> dict[str, Any] | None:
        return self.sandbox.exit_info() if self.sandbox is not None else None

    def sandbox_info(self) -> dict[str, Any] | None:
        """The uid and gid it runs as and its sandbox's name (working directory, log, cgroup)."""
        return self.identity.describe() if self.identity is not None else None

    def _effective_limits(self) -> Limits:
        """The limits, or none with a warning where the machine has no usable cgroups (a
        container without them): the object still runs unprivileged and isolated."""
        if self.cgroups is not None and self.cgroups.version is not CgroupVersion.NONE:
            return self.limits
        if not self.limits.is_empty():
            log.warning("no usable cgroups: object %s runs WITHOUT its CPU/memory/pids limits "
                        "(and without measurements)", self.name)
        return Limits()

    async def start(self, warm: bool = False, state: Any = None) -> None:
        """Start the object; with ``state`` it continues from that checkpoint (and serves
        at once unless ``warm``: then it queues requests until :meth:`call` ``serve``)."""
        from agent.hosting import sandbox_pool
        from agent.hosting.sandbox import ObjectSandbox, SandboxSpec, minimal_env, open_log

        if self.sandbox is not None:
            raise ObjectProcessError(f"object {self.name} was already started")
        begun = time.monotonic()
        try:
            # A prepared slot's uid and directory when one is ready (issue 14), else made now.
            ident, workdir = sandbox_pool.claim(self.objects_dir, self.cgroups)
            self.identity, self.workdir = ident, workdir
        except AgentError as exc:
            self._release()
            raise ObjectProcessError(f"cannot start object {self.name}: {exc}") from None
        log.info("object %s (%s) runs as uid %d in %s", self.name, self.label, ident.uid, workdir)
        # Resolved: the object's view of the filesystem holds no symlink it was not shown.
        pythonpath = f"{Path(self.code_dir).resolve()}:{REPO}" if self.code_dir else str(REPO)
        parent, child = socket.socketpair()
        spec = SandboxSpec(workdir, ident.uid, ident.gid, self._effective_limits(),
                           env=minimal_env(workdir, PYTHONPATH=pythonpath), pass_fds=(child.fileno(),),
                           prepared=sandbox_pool.take_launcher(workdir))
        if self.relay_dir is not None:
            from agent.hosting.hosted_registry import private_dir

            try:
                private_dir(self.relay_dir)
            except (AgentError, OSError) as exc:
                parent.close()
                child.close()
                if spec.prepared is not None:
                    spec.prepared.close()
                self._release()
                raise ObjectProcessError(f"cannot start object {self.name}: {exc}") from None
            spec.relay_socket = self.relay_dir / f"{ident.name}.sock"
            spec.keep_fd = parent.fileno()
        self.sandbox = ObjectSandbox(ident.name, spec, self.cgroups)
        if self.sandbox.trace is not None:
            self.sandbox.trace.append(("begin", begun))
        argv = [sys.executable, "-m", "agent.hosting.runner", "--spec", self.spec, "--name", self.name,
                "--address", self.address, "--port", str(self.port), "--router", self.router,
                "--control-fd", str(child.fileno())]
        if warm or state is not None:
            argv.append("--warm")
        if not self.extensible:
            argv.append("--not-extensible")
        if self.credentials is not None:
            argv.append("--leased")  # fails closed until the key arrives below
        log_fd = open_log(self.objects_dir / f"{ident.name}.log")
        try:
            await self.sandbox.start(argv, stdout=log_fd, stderr=log_fd)
        except AgentError as exc:
            parent.close()
            self._release()
            raise ObjectProcessError(f"cannot start object {self.name}: {exc}") from None
        finally:
            child.close()
            os.close(log_fd)
        await self._open_channel(parent)
        try:
            await self.call("stats")  # answers once it serves (or queues): the start is complete
            if self.sandbox.trace is not None:
                self.sandbox.trace.append(("answered", time.monotonic()))
            if self.credentials is not None:
                await self.call("credentials", service=self.credentials.service,
                                instance=self.credentials.instance, key=self.credentials.key.hex(),
                                part=self.credentials.part,
                                networks=list(self.credentials.networks),
                                aliases=list(self.credentials.aliases))
            if state is not None:
                await self.call("set_state", state=state, serve=not warm)
        except ObjectProcessError:
            await self.stop()
            raise
        log.info("object %s started (pid %s, warm=%s, cgroup=%s, %s)", self.name, self.pid, warm,
                 self.sandbox.cgroup.name if self.sandbox.cgroup else None,
                 getattr(self.sandbox, "started_by", None))

    # --- outliving the agent ------------------------------------------------------------

    def record(self) -> dict[str, Any]:
        """What a later agent needs to take this running object over (:meth:`adopt`): how it
        was started, who it runs as, and its relay's identity. Holds the service key: kept
        only in the agent's root-only registry."""
        if self.sandbox is None or self.identity is None:
            raise ObjectProcessError(f"object {self.name} is not running")
        creds = self.credentials
        return {
            "name": self.name, "spec": self.spec, "address": self.address, "port": self.port,
            "router": self.router, "label": self.label, "code_dir": self.code_dir,
            "extensible": self.extensible,
            "limits": {"cpu_quota": self.limits.cpu_quota, "memory_bytes": self.limits.memory_bytes,
                       "pids_max": self.limits.pids_max},
            "credentials": None if creds is None else {
                "service": creds.service, "instance": creds.instance, "key": creds.key.hex(),
                "part": creds.part, "networks": list(creds.networks), "aliases": list(creds.aliases)},
            "identity": {"uid": self.identity.uid, "gid": self.identity.gid, "name": self.identity.name},
            "workdir": str(self.workdir) if self.workdir is not None else None,
            "relay": self.sandbox.relay_record(),
        }

    @classmethod
    def from_record(cls, record: dict[str, Any], *, objects_dir: Path,
                    cgroups: CgroupManager | None, relay_dir: Path | None) -> ObjectProcess:
        """A process object (not started) configured as ``record`` says; ValueError for a
        record that is not one :meth:`record` wrote."""
        try:
            creds = record.get("credentials")
            credentials = None if creds is None else ServiceCredentials(
                str(creds["service"]), str(creds["instance"]), bytes.fromhex(creds["key"]),
                str(creds.get("part", "primary")), tuple(map(str, creds.get("networks", []))),
                tuple(map(str, creds.get("aliases", []))))
            limits = Limits(**record["limits"])
            code_dir = record.get("code_dir")
            port = record["port"]
            if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 0xFFFF:
                raise ValueError(f"bad port {port!r}")
            return cls(str(record["name"]), str(record["spec"]), str(record["address"]), port,
                       str(record["router"]), objects_dir=objects_dir, cgroups=cgroups,
                       limits=limits, label=str(record.get("label") or record["name"]),
                       code_dir=None if code_dir is None else str(code_dir),
                       extensible=bool(record.get("extensible", True)),
                       credentials=credentials, relay_dir=relay_dir)
        except (KeyError, TypeError, ValueError, AgentError) as exc:
            raise ValueError(f"bad object record: {exc!r}") from None

    @classmethod
    async def adopt(cls, record: dict[str, Any], *, objects_dir: Path,
                    cgroups: CgroupManager | None, relay_dir: Path | None) -> ObjectProcess:
        """Take over the running object an earlier agent of this router started (its
        :meth:`record`): proven to be the same processes (relay pid and start time, cgroup,
        the object's pid as the relay names it), then its channel is resumed from a clean
        line. ObjectProcessError if it cannot be (gone, not the same, not answering): nothing
        of it is kept then, and the caller decides (restart from a checkpoint, or let go)."""
        from agent.hosting.object_uids import ObjectIdentity
        from agent.hosting.sandbox import ObjectSandbox, SandboxSpec, SandboxError

        process = cls.from_record(record, objects_dir=objects_dir, cgroups=cgroups,
                                  relay_dir=relay_dir)
        try:
            ident = record["identity"]
            identity = ObjectIdentity(int(ident["uid"]), int(ident["gid"]), str(ident["name"]))
            workdir = Path(record["workdir"])
            relay = dict(record["relay"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ObjectProcessError(f"object {process.name}: bad record: {exc!r}") from None
        spec = SandboxSpec(workdir, identity.uid, identity.gid, process._effective_limits())
        if relay.get("socket"):
            spec.relay_socket = Path(relay["socket"])
        try:
            sandbox, channel = await ObjectSandbox.adopt(identity.name, spec, cgroups, relay)
        except (SandboxError, OSError) as exc:
            raise ObjectProcessError(f"object {process.name} cannot be taken over: {exc}") from None
        process.sandbox, process.identity, process.workdir = sandbox, identity, workdir
        if channel is None:
            await sandbox.close()
            raise ObjectProcessError(f"object {process.name}: its relay has let its channel go")
        try:
            process._channel = await rpc.RpcClient.resume(
                channel, name=f"object {process.name}", limit=rpc.CHECKPOINT_LINE_LIMIT,
                timeout=CALL_TIMEOUT)
        except rpc.RpcError as exc:
            channel.close()
            await process.stop(kill=True)
            raise ObjectProcessError(f"object {process.name} does not answer: {exc}") from None
        log.info("object %s taken over (pid %s, relay %s, uid %d)", process.name, process.pid,
                 relay.get("relay_pid"), identity.uid)
        return process

    async def revoke(self, revoked: list[dict[str, Any]], timeout: float = CALL_TIMEOUT) -> int:
        """Tell a leased object the leases cancelled early (``{"lease_id", "until"}``, wall
        clock): their credentials are refused from now on. Returns how many it holds."""
        answer = await self.call("revoke", timeout=timeout, revoked=revoked)
        return int(answer["revocations"])

    async def _open_channel(self, sock: socket.socket) -> None:
        """Talk to the object over ``sock``, the agent's end of its socketpair."""
        self._channel = await rpc.RpcClient.over_socket(sock, name=f"object {self.name}",
                                                        limit=rpc.CHECKPOINT_LINE_LIMIT)

    async def call(self, cmd: str, timeout: float | None = None, **args: Any) -> Any:
        """The object's answer to ``cmd`` (within ``timeout``, :data:`CALL_TIMEOUT` by
        default); ObjectProcessError (caused by the RpcError) if it refuses, does not answer
        in time, answers garbage or has gone."""
        timeout = CALL_TIMEOUT if timeout is None else timeout
        if self._channel is None:
            raise ObjectProcessError(f"object {self.name} is not running")
        async with self._lock:  # one command at a time, as the object serves them
            try:
                return await self._channel.call(cmd, args, timeout=timeout)
            except rpc.RpcError as exc:
                raise self._call_error(cmd, exc) from exc

    def _call_error(self, cmd: str, exc: rpc.RpcError) -> ObjectProcessError:
        if isinstance(exc, rpc.RpcRemoteError):
            return ObjectProcessError(f"object {self.name} refused {cmd}: {exc.error}")
        if isinstance(exc, rpc.RpcClosed):
            info = self.exit_info()
            return ObjectProcessError(f"object {self.name} exited (while asked {cmd})"
                                      + (f": {info['reason']}" if info else f": {exc}"))
        return ObjectProcessError(f"object {self.name} did not answer {cmd}: {exc}")

    async def stop(self, kill: bool = False) -> Any:
        """Stop the object and return its final state (None if it could not give one);
        kill what is left of it and remove its cgroup. Safe to repeat. ``kill``: it
        misbehaves (does not answer, answers garbage): kill it at once, asking nothing."""
        if self.sandbox is None:
            return None
        state = None
        if self.running and self._channel is not None and not kill:
            try:
                state = await self.call("stop", timeout=STOP_TIMEOUT)
            except ObjectProcessError as exc:
                log.warning("%s", exc)
            # Closed before waiting: an object that never got the stop (garbled or hung
            # channel) reads end of stream, which stops it too; one that does not is killed.
            # (Its relay first lets go of its own copy of our end: it keeps one so that the
            # object outlives the agent.)
            release = getattr(self.sandbox, "release_channel", None)  # test doubles: none
            if release is not None:
                await release()
            await self._close_channel()
            try:
                await self.sandbox.wait(STOP_TIMEOUT)
            except asyncio.TimeoutError:
                log.warning("object %s did not exit within %.0fs: killed", self.name, STOP_TIMEOUT)
        await self._close_channel()
        try:
            await self.sandbox.close()
        finally:
            self._release()
        return state

    def _release(self) -> None:
        """Once its processes are gone: remove its working directory, give its uid back."""
        from agent.hosting.object_uids import default_pool
        from agent.hosting.sandbox import remove_workdir

        workdir, self.workdir = self.workdir, None
        ident, self.identity = self.identity, None
        try:
            if workdir is not None:
                remove_workdir(workdir)
        except AgentError as exc:
            log.warning("object %s: %s", self.name, exc)
        finally:
            if ident is not None:
                try:
                    default_pool().release(ident)
                except (AgentError, OSError) as exc:
                    log.warning("object %s: uid %d not released: %s", self.name, ident.uid, exc)

    async def _close_channel(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            await channel.close()
