"""The agent's cgroup manager: find the agent's own cgroup, nest one leaf per object under it.

Layout (``P`` = ``moat-<run_id>-``, or ``moat-`` without a run id)::

    v1, in every controller hierarchy (cpu, cpuacct, memory, pids) at the agent's own path:
        <agent cgroup>/P objects/P<name>

    v2, in the unified hierarchy:
        <agent cgroup>/P agent          every process that was in <agent cgroup> (see below)
        <agent cgroup>/P objects        controllers enabled in its cgroup.subtree_control
        <agent cgroup>/P objects/P<name>    one leaf per object: cpu.max, memory.max, pids.max

cgroup v2 "no internal processes" rule: a non-root cgroup may not hold processes and hand
controllers to its children (``+cpu`` into its ``cgroup.subtree_control``) at the same time.
The agent's own cgroup normally holds processes: the agent, and on a Mininet node also the
experiment script, the node shells and the other routers' agents (Mininet nodes share the
cgroup of the script that made them). So before enabling controllers there, every process
of that cgroup is moved into the leaf ``P agent`` (as BenchExec does with its
``benchexec_process_`` child). Processes keep every limit and all accounting of the agent's
cgroup, since the leaf is its child. A second agent that later reads ``/proc/self/cgroup``
and finds itself in such a leaf treats the leaf's parent as its own cgroup, so the layout
never nests deeper run after run. The true root cgroup is exempt from the rule and is used
as is. ``moat clean`` never kills the processes of an agent leaf (they are the user's shell
and experiment); it removes the leaf only once it is empty.

On v2 a controller missing from the agent's ``cgroup.controllers`` (systemd enables ``memory``
and ``pids`` for a login session but usually not ``cpu``) is enabled, when
``enable_ancestors`` is set, down the chain of ancestors from the root, with a warning.
The alternative is to start the experiment in a delegated scope
(``systemd-run --scope -p Delegate=yes ...``).
"""

from __future__ import annotations

import errno
import logging
import threading
from pathlib import Path

from agent.hosting.cgroups.base import (
    DEFAULT_ROOT,
    PROC_SELF_CGROUP,
    V2_CONTROLLERS,
    CgroupError,
    CgroupVersion,
    Limits,
    check_name,
    is_agent_leaf,
    run_prefix,
)
from agent.hosting.cgroups.cgroup import Cgroup
from agent.hosting.cgroups.cleanup import remove_tree
from agent.hosting.cgroups.detect import _own_dir, _read_proc, _v1_hierarchies, _v2_mount, detect
from agent.hosting.cgroups.kernel import read_optional
from agent.hosting.cgroups.v1 import CgroupV1
from agent.hosting.cgroups.v2 import CgroupV2

__all__ = ["CgroupManager"]

log = logging.getLogger(__name__)


class CgroupManager:
    """The agent's view: finds its own cgroup, makes one leaf cgroup per object under it.

    ``create(name, limits)`` is all the VM needs; the first call prepares the layout
    described in the module docstring (idempotent, safe for several agents of one node).
    """

    def __init__(self, run_id: str | None = None, *, root: Path = DEFAULT_ROOT,
                 proc_self_cgroup: Path = PROC_SELF_CGROUP, version: CgroupVersion | None = None,
                 owner: str | None = None, enable_ancestors: bool = True) -> None:
        self.root = Path(root)
        self.proc_self_cgroup = Path(proc_self_cgroup)
        self.run_id = run_id
        self.prefix = run_prefix(run_id)
        self.version = version or detect(self.root, self.proc_self_cgroup)
        self.objects_name = self.prefix + (f"{check_name(owner)}-objects" if owner else "objects")
        self.agent_leaf_name = self.prefix + "agent"
        self.enable_ancestors = enable_ancestors
        self._objects: Cgroup | None = None
        self._warned: set[str] = set()
        #: name -> a leaf made ahead (:meth:`prepare`), until its object's :meth:`create`
        self._prepared: dict[str, Cgroup] = {}
        self._lock = threading.Lock()  # prepare runs in a sandbox pool's thread

    # the agent's own cgroup

    def agent_cgroup(self) -> Cgroup:
        """A handle on the agent's own cgroup (not made by MOAT; never removed)."""
        lines = _read_proc(self.proc_self_cgroup)
        if self.version is CgroupVersion.V1:
            paths = {c: _own_dir(mount, path)
                     for c, (mount, path) in _v1_hierarchies(self.root, lines).items()}
            if not paths:
                raise CgroupError("no cgroup v1 hierarchy of cpu, cpuacct, memory or pids found")
            return CgroupV1("agent", paths)
        if self.version is CgroupVersion.V2:
            unified = [line for line in lines if line.hierarchy == 0]
            if not unified:
                raise CgroupError(f"no cgroup v2 line (0::/path) in {self.proc_self_cgroup}")
            path = _own_dir(_v2_mount(self.root), unified[0].path)
            if is_agent_leaf(path.name):
                path = path.parent  # an earlier agent moved us into its leaf: use its parent
            return CgroupV2("agent", path)
        raise CgroupError("no usable cgroup controllers on this machine (neither v1 nor v2)")

    # layout

    def objects_cgroup(self) -> Cgroup:
        """The intermediate node ``<agent>/moat-<run>-objects``, made on first use."""
        if self._objects is None:
            agent = self.agent_cgroup()
            if isinstance(agent, CgroupV2):
                self._objects = self._prepare_v2(agent)
            else:
                self._objects = CgroupV1.create(agent, self.objects_name, exist_ok=True)
        return self._objects

    def _prepare_v2(self, agent: CgroupV2) -> CgroupV2:
        wanted = set(V2_CONTROLLERS)
        missing = wanted - agent.controllers()
        if missing and self.enable_ancestors:
            self._enable_in_ancestors(agent, missing)
        usable = wanted & agent.controllers()
        todo = sorted(usable - agent.subtree_control())
        for attempt in range(5):
            if not todo:
                break
            if not agent.is_root():
                self._vacate(agent)
            try:
                for c in todo:
                    agent.enable(c)
                todo = []
            except CgroupError as exc:
                if exc.errno != errno.EBUSY or attempt == 4:
                    raise
                todo = sorted(usable - agent.subtree_control())  # a process slipped in: again
        objects = CgroupV2.create(agent, self.objects_name, exist_ok=True)
        for c in sorted(usable):
            objects.enable(c)
        return objects

    def _vacate(self, agent: CgroupV2) -> None:
        """Move every process of the agent's cgroup into its leaf ``moat-<run>-agent``."""
        if not agent.procs():
            return
        leaf = CgroupV2.create(agent, self.agent_leaf_name, exist_ok=True)
        moved: set[int] = set()
        for _ in range(10):
            pids = agent.procs()
            if not pids or set(pids) <= moved:
                break
            for pid in pids:
                try:
                    leaf.add_process(pid)
                    moved.add(pid)
                except CgroupError as exc:
                    if exc.errno != errno.ESRCH:
                        raise
        log.info("cgroup v2: moved %d process(es) of %s into %s (no internal processes rule)",
                 len(moved), agent.path, leaf.path)

    def _enable_in_ancestors(self, agent: CgroupV2, missing: set[str]) -> None:
        top = _v2_mount(self.root)
        available = set((read_optional(top / "cgroup.controllers") or "").split())
        chain: list[Path] = []
        p = agent.path
        while p != top and top in p.parents:
            p = p.parent
            chain.append(p)
        chain.reverse()  # from the root down to the agent's parent
        for c in sorted(missing & available):
            try:
                for node in chain:
                    CgroupV2(node.name, node).enable(c)
            except CgroupError as exc:
                log.warning("cgroup v2: cannot enable %s down to %s: %s", c, agent.path, exc)
                continue
            log.warning("cgroup v2: enabled controller %s in the ancestors of %s (it was not "
                        "delegated; a delegated scope avoids this)", c, agent.path)

    # objects

    def create(self, name: str, limits: Limits | None = None) -> Cgroup:
        """The leaf cgroup ``moat-<run>-<name>`` of one object, limits written: the one
        :meth:`prepare` made ahead under that name (handed out once), else a new one."""
        with self._lock:
            prepared = self._prepared.pop(name, None)
        return self.configure(prepared if prepared is not None else self._make(name), limits)

    def prepare(self, name: str) -> Cgroup:
        """The leaf cgroup ``moat-<run>-<name>``, new, in every hierarchy, no limits and no
        process yet, kept for the object of that name: its :meth:`create` takes it and
        writes its limits (:mod:`agent.hosting.sandbox_pool`'s slots). An existing one is
        refused."""
        cg = self._make(name)
        with self._lock:
            self._prepared[name] = cg
        return cg

    def unprepare(self, name: str) -> Cgroup | None:
        """The cgroup :meth:`prepare` made for ``name`` if no :meth:`create` took it yet,
        no longer kept (the caller removes it); None once taken."""
        with self._lock:
            return self._prepared.pop(name, None)

    def prepared(self) -> set[str]:
        """The names whose :meth:`prepare`'d cgroup no :meth:`create` has taken yet."""
        with self._lock:
            return set(self._prepared)

    def _make(self, name: str) -> Cgroup:
        leaf_name = self.prefix + check_name(name)
        if is_agent_leaf(leaf_name):
            raise CgroupError(f"object name {name!r} is reserved (agent leaves are named so)")
        parent = self.objects_cgroup()
        return type(parent).create(parent, leaf_name)

    def configure(self, cg: Cgroup, limits: Limits | None = None) -> Cgroup:
        """Check the controllers ``limits`` need and write them into ``cg`` (made by
        :meth:`prepare`, no process in it yet); on any failure ``cg`` is removed."""
        limits = limits or Limits()
        try:
            self._check_controllers(cg, limits)
            cg.set_limits(limits)
        except BaseException:
            try:
                cg.remove()
            except CgroupError as exc:
                log.warning("%s", exc)
            raise
        return cg

    def _check_controllers(self, cg: Cgroup, limits: Limits) -> None:
        have = cg.controllers()
        if isinstance(cg, CgroupV2):
            have = have | {"cpuacct"}  # cpu.stat is always there on v2
        needs = {"cpu": limits.cpu_quota, "memory": limits.memory_bytes, "pids": limits.pids_max,
                 "cpuacct": None}
        for controller, value in needs.items():
            if controller in have:
                continue
            if value is not None:
                raise CgroupError(f"cgroup {self.version.value} controller {controller!r} is "
                                  f"not available here, but the object has a {controller} limit")
            if controller not in self._warned:
                self._warned.add(controller)
                lost = "limits" if (controller == "cpu" and isinstance(cg, CgroupV2)) \
                    else "limits or measurements"  # v2 has cpu.stat without the controller
                log.warning("cgroup %s controller %s not available: objects run without %s %s",
                            self.version.value, controller, controller, lost)

    def remove_objects(self) -> list[Path]:
        """Remove this agent's objects node and every leaf under it; returns what remains."""
        with self._lock:
            self._prepared.clear()
        if self._objects is None:
            return []
        kept: list[Path] = []
        for d in self._objects.dirs:
            kept += remove_tree(d)
        self._objects = None
        return kept
