"""Per-object cgroups, cgroup v1 and v2, written directly (no cgroup-tools).

BenchExec's cgroup code is the model: find the version, find our own cgroup in
``/proc/self/cgroup``, nest everything MOAT makes under it, write the interface files
ourselves, and read OOM kills from the kernel's own counters. Import everything from here;
the modules say where each part lives:

    base       constants, :class:`CgroupError`, :class:`CgroupVersion`, :class:`Limits`, names
    kernel     the only code that touches cgroupfs or signals processes (the tests patch it)
    detect     /proc/self/cgroup, the v1 hierarchies and v2 mount, :func:`detect`
    cgroup     :class:`Cgroup`, what one cgroup offers whatever the version
    v1, v2     :class:`CgroupV1`, :class:`CgroupV2`
    manager    :class:`CgroupManager`: the layout under the agent's cgroup, v2 delegation
    cleanup    :func:`find_run_cgroups`, :func:`remove_tree`, :func:`clean_run` (``moat clean``)
"""

from __future__ import annotations

from agent.hosting.cgroups.base import (
    CPU_PERIOD_US,
    DEFAULT_ROOT,
    KILL_TIMEOUT,
    MIN_CPU_QUOTA_US,
    PROC_SELF_CGROUP,
    V1_CONTROLLERS,
    V2_CONTROLLERS,
    CgroupError,
    CgroupVersion,
    Limits,
    check_name,
    is_agent_leaf,
    run_prefix,
)
from agent.hosting.cgroups.cgroup import Cgroup
from agent.hosting.cgroups.cleanup import clean_run, find_run_cgroups, remove_tree
from agent.hosting.cgroups.detect import ProcCgroup, detect, parse_proc_cgroup
from agent.hosting.cgroups.kernel import (
    kill_procs,
    parse_keyed,
    read_file,
    read_optional,
    rmdir_retry,
    write_file,
)
from agent.hosting.cgroups.manager import CgroupManager
from agent.hosting.cgroups.v1 import CgroupV1
from agent.hosting.cgroups.v2 import CgroupV2

__all__ = [
    "CPU_PERIOD_US",
    "DEFAULT_ROOT",
    "KILL_TIMEOUT",
    "MIN_CPU_QUOTA_US",
    "PROC_SELF_CGROUP",
    "V1_CONTROLLERS",
    "V2_CONTROLLERS",
    "Cgroup",
    "CgroupError",
    "CgroupManager",
    "CgroupV1",
    "CgroupV2",
    "CgroupVersion",
    "Limits",
    "ProcCgroup",
    "check_name",
    "clean_run",
    "detect",
    "find_run_cgroups",
    "is_agent_leaf",
    "kill_procs",
    "parse_keyed",
    "parse_proc_cgroup",
    "read_file",
    "read_optional",
    "remove_tree",
    "rmdir_retry",
    "run_prefix",
    "write_file",
]
