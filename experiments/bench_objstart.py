"""Object start benchmark — ``sudo python -m experiments.bench_objstart`` (a script, not a test).

Starts the counter object ``--rounds`` times each way in one run, alternating, exactly as an
agent does (:class:`agent.hosting.runtime.ObjectProcess`: a uid and working directory of its
own, its cgroup with limits, the sandbox, then its first ``stats`` answered over the
socketpair), and stops it again:

* fork: forked by this process's fork server (a pre-imported runtime, issue 14);
* exec: a new launcher interpreter that execs ``python -m agent.hosting.runner`` (baseline).

Per way it prints the median and 90th percentile of the whole start and of its two parts,
*spawn* (``ObjectSandbox.start``: cgroup made, launcher or fork until the program runs) and
*answer* (the runtime's first answer: its imports, for exec), and the ratio exec / fork.
This machine's speed varies threefold between days, so figures are only ever shown beside
the baseline measured in the same run. The fork server's own start (once per agent) is
reported apart and is not in the fork figures. Each start, either way, begins once the
agent's prepared sandbox slots are ready (:mod:`agent.hosting.sandbox_pool`, refilled in the
background after each start: a router at rest); ``MOAT_SANDBOX_POOL=0`` measures without,
``MOAT_SANDBOX_PREFORK=0`` with slots but without their prepared launchers (each forked start
then forks its launcher from the server). Each way has its own objects directory and pool,
as an agent's way is fixed by its environment. Every start records when each of its steps
ended (``MOAT_START_TRACE``), and the median time of each step is printed below the table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .results import results_dir, write_json
from .tables import format_table

MiB = 1 << 20
MODES = ("fork", "exec")
SPEC = "agent.objects.counter:Counter"


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1), linear between the closest ranks."""
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarise(samples: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    """median and p90 (ms) per way and part, and exec / fork of each."""
    out: dict[str, Any] = {}
    for mode, rows in samples.items():
        out[mode] = {part: {"median": round(statistics.median(r[part] for r in rows), 2),
                            "p90": round(percentile([r[part] for r in rows], 0.9), 2)}
                     for part in ("start_ms", "spawn_ms", "answer_ms")}
    for mode, rows in samples.items():
        steps = list(dict.fromkeys(k for r in rows for k in r if k.startswith("step:")))
        out.setdefault(mode, {})["steps"] = {
            k[5:]: round(statistics.median(r.get(k, 0.0) for r in rows), 2) for k in steps}
    if all(m in out for m in MODES):
        out["ratio_exec_over_fork"] = {
            part: {stat: round(out["exec"][part][stat] / out["fork"][part][stat], 1)
                   for stat in ("median", "p90")}
            for part in ("start_ms", "spawn_ms", "answer_ms")}
    return out


async def one_start(mode: str, objects_dir: Path, cgroups: Any, limits: Any) -> dict[str, float]:
    from agent.hosting import sandbox_pool
    from agent.hosting.runtime import ObjectProcess
    from agent.hosting.sandbox import ENV_SANDBOX_START, ENV_START_TRACE, ObjectSandbox

    os.environ[ENV_SANDBOX_START] = mode
    os.environ[ENV_START_TRACE] = "1"
    pool = sandbox_pool.pool_for(objects_dir, cgroups)
    if pool is not None:  # a router at rest: its slots are ready (refilled after each start)
        await asyncio.to_thread(pool.wait_full, 10.0)
    process = ObjectProcess("counter", SPEC, "127.0.0.1", 0, "bench", objects_dir=objects_dir,
                            cgroups=cgroups, limits=limits)
    marks: dict[str, float] = {}
    original = ObjectSandbox.start

    async def timed_start(self: Any, argv: Any, **stdio: Any) -> Any:
        try:
            return await original(self, argv, **stdio)
        finally:
            marks["spawned"] = time.perf_counter()

    ObjectSandbox.start = timed_start  # type: ignore[method-assign]
    try:
        t0 = time.perf_counter()
        await process.start()
        t1 = time.perf_counter()
        trace = list(process.sandbox.trace or [])
    finally:
        ObjectSandbox.start = original  # type: ignore[method-assign]
        await process.stop()
    return {"start_ms": (t1 - t0) * 1000, "spawn_ms": (marks["spawned"] - t0) * 1000,
            "answer_ms": (t1 - marks["spawned"]) * 1000, **step_times(trace)}


def step_times(trace: list[tuple[str, float]]) -> dict[str, float]:
    """``step:<stage>`` (ms): from the stamp before (in time) to that stage's own, for each
    stage of one start's trace (:attr:`agent.hosting.sandbox.ObjectSandbox.trace`: the
    agent's, the fork server's and the launcher's stamps on one monotonic clock)."""
    out: dict[str, float] = {}
    trace = sorted(trace, key=lambda stamp: stamp[1])  # processes interleave
    for (_, before), (stage, at) in zip(trace, trace[1:]):
        out[f"step:{stage}"] = out.get(f"step:{stage}", 0.0) + (at - before) * 1000
    return out


async def run(rounds: int) -> dict[str, Any]:
    from agent.hosting.cgroups import CgroupManager, CgroupVersion, Limits, clean_run, detect
    from agent.hosting import sandbox_pool
    from agent.hosting.forkserver import default_server
    from agent.hosting.sandbox import launcher_env

    run_id = f"bos{os.getpid()}"
    cgroups = CgroupManager(run_id) if detect() is not CgroupVersion.NONE else None
    limits = Limits(cpu_quota=0.5, memory_bytes=128 * MiB, pids_max=64) if cgroups else Limits()
    tmp = Path(tempfile.mkdtemp(prefix="moat-bench-objstart-"))
    os.chmod(tmp, 0o755)
    samples: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    try:
        t0 = time.perf_counter()
        server = default_server(launcher_env())
        await asyncio.to_thread(server.ensure_started)
        server_ms = (time.perf_counter() - t0) * 1000
        for mode in MODES:  # one unmeasured start each: page cache, first imports
            await one_start(mode, tmp / f"objects-{mode}", cgroups, limits)
        for i in range(rounds):
            order = MODES if i % 2 == 0 else MODES[::-1]
            for mode in order:
                samples[mode].append(await one_start(mode, tmp / f"objects-{mode}", cgroups,
                                                     limits))
        server.stop()
    finally:
        sandbox_pool.close_all()
        if cgroups is not None:
            cgroups.remove_objects()
            clean_run(run_id)
        shutil.rmtree(tmp, ignore_errors=True)
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    return {"rounds": rounds, "machine": f"{platform.node()} {os.cpu_count()} cpu, "
                                         f"load {' '.join(load)}",
            "fork_server_start_ms": round(server_ms, 1), "cgroups": cgroups is not None,
            "sandbox_pool": sandbox_pool.pool_size(),
            "prepared_launchers": sandbox_pool.prefork(),
            "summary": summarise(samples), "samples": samples}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moat bench objstart", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--results", type=Path, default=None)
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("moat bench objstart needs root (cgroups, object uids)", file=sys.stderr)
        return 2
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    logging.basicConfig(level=logging.WARNING)
    result = asyncio.run(run(args.rounds))
    from topologies.run import new_run_id

    write_json(results_dir("bench_objstart", new_run_id(), args.results) / "summary.json", result)
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))
        return 0
    s = result["summary"]
    print(f"object start, {args.rounds} rounds each way, alternating, one run "
          f"({result['machine']}); start = ObjectProcess.start: cgroup, sandbox, first answer; "
          f"prepared sandbox slots: {result['sandbox_pool']} (MOAT_SANDBOX_POOL), with a "
          f"prepared launcher each on the fork path: "
          f"{'yes' if result['prepared_launchers'] else 'no'} (MOAT_SANDBOX_PREFORK)")
    rows = []
    for part in ("start_ms", "spawn_ms", "answer_ms"):
        rows.append({"part": part[:-3], "fork median": s["fork"][part]["median"],
                     "fork p90": s["fork"][part]["p90"], "exec median": s["exec"][part]["median"],
                     "exec p90": s["exec"][part]["p90"],
                     "exec/fork (median)": f"{s['ratio_exec_over_fork'][part]['median']}x",
                     "exec/fork (p90)": f"{s['ratio_exec_over_fork'][part]['p90']}x"})
    print(format_table(rows))
    print("\nwhere a start's time goes (median ms of each step, from the stamp before; "
          "MOAT_START_TRACE)")
    steps = list(dict.fromkeys([*s["fork"]["steps"], *s["exec"]["steps"]]))
    print(format_table([{"step": k, "fork": s["fork"]["steps"].get(k, "-"),
                         "exec": s["exec"]["steps"].get(k, "-")} for k in steps]))
    print(f"\nthe fork server's own start (once per agent, not above): "
          f"{result['fork_server_start_ms']} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
