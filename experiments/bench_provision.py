"""Provisioning benchmark — ``sudo moat bench provision`` (a script, not a test).

In the patent's topology the remote site (site24) provisions a VM on r22a to run the signed
counter service, ``--rounds`` times cold (archive cache emptied) and as many times cached,
and prints, per phase, the median and worst of:

* fetch: PROVISION received → service fetched over SFTP (manifest, policy, signature,
  archives unless cached);
* verify: → resources checked, signature and archives verified, installed (all-or-nothing);
* start: → the object runs in its sandbox and answers its runtime;
* total: the site sending PROVISION → the first request from co14 (net 14) answered.

Phases come from the VM's own step timestamps (wall clock of one machine); the total is
measured by the caller. It also prints the per-object memory cost of controlled exec: the
object's resident size (VmRSS) and its cgroup's memory use, against the same object started
without a sandbox on the same router.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from topologies.run import stop_child

from .results import results_dir, write_json
from .tables import format_table

log = logging.getLogger(__name__)

ROUTER = "r22a"
ADDRESS = "10.16.0.201"
REPO = Path(__file__).resolve().parent.parent


def vm_phases(steps: list[list]) -> dict[str, float]:
    """Durations (ms) of fetch / verify / start from a VM's ``steps`` [(what, time), ...]."""
    at = {what.split(" ")[0]: t for what, t in steps}
    t_conf, t_fetch = at["configured"], at["fetched"]
    t_ver = next(t for what, t in steps if what.startswith("verified"))
    t_init = at["initialised"]
    return {"fetch_ms": (t_fetch - t_conf) * 1000, "verify_ms": (t_ver - t_fetch) * 1000,
            "start_ms": (t_init - t_ver) * 1000}


def summarise(rows: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    keys = [k for k in rows[0] if k.endswith("_ms")] if rows else []
    return {k: {"median": round(statistics.median(r[k] for r in rows), 2),
                "worst": round(max(r[k] for r in rows), 2)} for k in keys}


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def run(args: argparse.Namespace) -> dict[str, Any]:
    from topologies.moatnet import MoatNetwork

    from .counter_service import publish_counter
    from topologies.patent import PatentTopo

    tmp = Path(tempfile.mkdtemp(prefix="moat-bench-provision-"))
    results: dict[str, Any] = {"cold": [], "cached": []}
    try:
        with MoatNetwork(PatentTopo(), objects=["counter", "svc"]) as m:
            publish_counter(m, "counter-svc", workdir=tmp)
            m.objects["svc"].home_address = ADDRESS
            storage = m.run.dir / "vm" / ROUTER
            body = dict(vm="bench", kind="interface", interface=f"{ROUTER}-eth0", address=ADDRESS,
                        service="counter-svc", resources={"cpu": 0.5, "memory_mb": 256, "pids": 64})
            for kind in ("cold", "cached"):
                for _ in range(args.rounds):
                    if kind == "cold":
                        shutil.rmtree(storage / "cache", ignore_errors=True)
                    t0 = time.time()
                    answer = m.provision(ROUTER, **body)
                    if not answer.get("ok"):
                        raise RuntimeError(f"provisioning failed: {answer}")
                    served = m.requests("co14", "svc", count=1, rate=100)
                    total = (time.time() - t0) * 1000
                    row = vm_phases(answer["vm"]["steps"])
                    row["total_to_first_reply_ms"] = total if served["answered"] else float("nan")
                    results[kind].append(row)
                    vm = m.agent(ROUTER).call("vm")[0]
                    obj = vm["objects"]["counter"]
                    sandboxed = {"rss_kib": rss_kib(obj["pid"]),
                                 "cgroup_memory_kib": (obj["usage"].get("memory_bytes") or 0) // 1024}
                    m.agent(ROUTER).call("vm_remove", name="bench")
            unsandboxed = {"rss_kib": plain_runner_rss(m, "r22c")}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    from .bench_packets import cpu_model

    return {"benchmark": "provision", "rounds": args.rounds, "router": ROUTER,
            "machine": f"{cpu_model()} x{__import__('os').cpu_count()}, Python {platform.python_version()}",
            "cold": summarise(results["cold"]), "cached": summarise(results["cached"]),
            "raw": results, "memory": {"sandboxed": sandboxed, "unsandboxed": unsandboxed}}


def plain_runner_rss(m: Any, router: str) -> int | None:
    """VmRSS (KiB) of the counter's runtime started *without* controlled exec in ``router``:
    the baseline that shows what the sandbox adds (every object MOAT runs is sandboxed)."""
    import socket

    from topologies.moatnet import COUNTER_SPEC

    parent, child = socket.socketpair()
    argv = [sys.executable, "-m", "agent.hosting.runner", "--spec", COUNTER_SPEC, "--name", "plain",
            "--address", "127.0.0.1", "--port", "4399", "--router", router,
            "--control-fd", str(child.fileno())]
    proc = m.net[router].popen(argv, pass_fds=(child.fileno(),), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    child.close()
    try:
        parent.settimeout(30)
        with parent.makefile("rwb") as ctl:
            ctl.write(b'{"cmd": "stats"}\n')
            ctl.flush()
            if not json.loads(ctl.readline()).get("ok"):
                raise RuntimeError("the plain runner did not start")
            rss = rss_kib(proc.pid)
            ctl.write(b'{"cmd": "stop"}\n')
            ctl.flush()
            ctl.readline()
    finally:
        parent.close()
        stop_child(proc, timeout=10, terminate=False)  # it exits on "stop" or on EOF
    return rss


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moat bench provision", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--results", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    summary = run(args)
    from topologies.run import new_run_id

    write_json(results_dir("bench_provision", new_run_id(), args.results) / "summary.json", summary)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"provisioning a signed counter service on {ROUTER} from site24, {args.rounds} rounds "
          f"each ({summary['machine']}); phases from the VM's step timestamps, total from the "
          "caller: PROVISION sent -> first request from co14 answered")
    rows = [{"cache": kind, "phase": phase, **stats} for kind in ("cold", "cached")
            for phase, stats in summary[kind].items()]
    print(format_table(rows, ["cache", "phase", "median", "worst"]))
    mem = summary["memory"]
    print(f"\nper-object memory: sandboxed VmRSS {mem['sandboxed']['rss_kib']} KiB "
          f"(its cgroup counts {mem['sandboxed']['cgroup_memory_kib']} KiB, page cache included); "
          f"the same object without a sandbox: VmRSS {mem['unsandboxed']['rss_kib']} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
