"""Provisioning benchmark — ``sudo moat bench provision`` (a script, not a test).

In the patent's topology the remote site (site24) provisions a VM on r22a to run the signed
counter service and a corresponding object on co14 (net 14) asks it for service; each round
measures **PROVISION → first answer**: from the moment site24 sends the PROVISION (a sender
started and imported beforehand, :mod:`experiments.provision_timer`) to the first reply to
arrive at co14 (which sends a request every millisecond from before the PROVISION,
:mod:`nodetools.co_load`), on the machine's one clock. The harness's own process starts
are outside the measure.

Two paths, measured in the same run, alternately, round by round (this machine's speed
varies threefold between days, so only a ratio measured side by side means anything):

* **warm** (the default): the router's kept SFTP session to the site and its version cache
  (agent.vm.session_pool, agent.vm.version_cache); ``--no-session-pool`` / ``--no-cache``
  leave either out of it;
* **old**: a new SSH session and a full fetch per provisioning (``vm_warm`` turns both off;
  the archive cache stays, as before).

and two kinds of round: **cold** (both caches emptied: every archive fetched) and **cached**
(the version is in the cache). One warm-up provisioning first (the agent's first
provisioning pays its lazy imports and opens the session a running router already has).
Per phase the median and worst of each path and their ratio (old / warm) are printed:

* fetch: PROVISION configured → service fetched (the version probe only, when cached);
* verify: → resources checked, signature and archives verified, installed (all-or-nothing);
* start: → the objects run in their sandboxes and answer their runtime (the address added);
* total: PROVISION sent → first answer at co14;

and where the warm path's total goes (the router's own moments, ``vm_warm``'s timings). It
also prints the per-object memory cost of controlled exec: the object's resident size
(VmRSS) and its cgroup's memory use, against the same object started without a sandbox.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import signal
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
CO = "co14"
REPO = Path(__file__).resolve().parent.parent
PATHS = ("old", "warm")
KINDS = ("cold", "cached")
PHASES = ("fetch_ms", "verify_ms", "start_ms", "total_ms")
#: The router's moments of a provisioning, in order (agent.vm.manager's timings and steps).
MOMENTS = ("sent", "received", "configured", "fetched", "verified", "recorded", "interface up",
           "objects starting", "objects started", "initialised", "listeners told", "answered",
           "first answer")
REQUEST_RATE = 1000.0  # co14's requests per second while it waits for the first answer
GRACE_S = 0.2  # co14 goes on asking this long after the PROVISION's answer


def vm_phases(steps: list[list]) -> dict[str, float]:
    """Durations (ms) of fetch / verify / start from a VM's ``steps`` [(what, time), ...]."""
    at = {what.split(" ")[0]: t for what, t in steps}
    t_conf, t_fetch = at["configured"], at["fetched"]
    t_ver = next(t for what, t in steps if what.startswith("verified"))
    t_init = at["initialised"]
    return {"fetch_ms": (t_fetch - t_conf) * 1000, "verify_ms": (t_ver - t_fetch) * 1000,
            "start_ms": (t_init - t_ver) * 1000}


def moments(steps: list[list], timings: dict[str, float], sent: float, answered: float,
            first: float) -> dict[str, float]:
    """Wall time of each of :data:`MOMENTS` that is known (the VM's steps, the manager's
    timings, the sender's and co14's clocks)."""
    at: dict[str, float] = {"sent": sent, "answered": answered, "first answer": first}
    for what, t in steps:
        word = what.split(" ")[0]
        if word in ("configured", "fetched", "initialised"):
            at[word] = t
        elif word == "verified":
            at["verified"] = t
    at.update({k: v for k, v in timings.items() if k in MOMENTS})
    return {k: at[k] for k in MOMENTS if k in at}


def segments(at: dict[str, float]) -> dict[str, float]:
    """ms from each known moment to the next: ``"received → configured": 0.4``."""
    known = [k for k in MOMENTS if k in at]
    return {f"{a} → {b}": (at[b] - at[a]) * 1000 for a, b in zip(known, known[1:])}


def first_answer(rows: list[dict[str, Any]]) -> float | None:
    """The arrival time of the first reply in co_load's JSON lines, or None."""
    times = [r["replies"][0]["at"] for r in rows if r.get("replies")]
    return min(times) if times else None


def summarise(rows: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    keys = [k for k in rows[0] if k.endswith("_ms")] if rows else []
    return {k: {"median": round(statistics.median(r[k] for r in rows), 2),
                "worst": round(max(r[k] for r in rows), 2)} for k in keys}


def side_by_side(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (kind, phase): each path's median and worst, and old / warm."""
    rows = []
    for kind in KINDS:
        for phase in PHASES:
            old = summary["old"][kind].get(phase)
            warm = summary["warm"][kind].get(phase)
            if old is None or warm is None:
                continue
            ratio = old["median"] / warm["median"] if warm["median"] > 0 else float("nan")
            rows.append({"kind": kind, "phase": phase, "old median": old["median"],
                         "warm median": warm["median"], "old/warm": round(ratio, 2),
                         "old worst": old["worst"], "warm worst": warm["worst"]})
    return rows


def _one(m: Any, body_file: Path, storage: Path, kind: str, n: int) -> dict[str, Any]:
    """One provisioning, measured (see the module docstring); the VM is removed after."""
    client = m.client
    if kind == "cold":
        shutil.rmtree(storage / "cache", ignore_errors=True)
        shutil.rmtree(storage / "service-cache", ignore_errors=True)
    out, ready = m.run.dir / f"bench-co-{n}.jsonl", m.run.dir / f"bench-co-{n}.ready"
    co = client.popen(CO, [sys.executable, "-m", "nodetools.co_load", "--dst", ADDRESS,
                           "--rate", str(REQUEST_RATE), "--duration", "20", "--out", str(out),
                           "--ready", str(ready), "--client", f"bench-{n}"],
                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    sender = client.popen(client.site(), [
        sys.executable, "-m", "experiments.provision_timer", client.address(ROUTER),
        str(body_file), "--sign-key", str(m.run.dir / "provider" / "provider.key"),
        "--peers", str(m.run.dir / "provider" / "peers.json")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        from agent.core.wait import wait_until

        wait_until(ready.exists, 30, interval=0.01, what="co14 sending")
        if sender.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the PROVISION sender did not start: {sender.stderr.read()[-500:]}")
        sender.stdin.write("go\n")
        sender.stdin.flush()
        report = json.loads(sender.stdout.readline())
        if not report["answer"].get("ok"):
            raise RuntimeError(f"provisioning failed: {report['answer']}")
        # The object listens before the PROVISION is answered: co14 keeps asking a little
        # longer (should a route or neighbour still be on its way), then stops on SIGTERM and
        # still counts replies for half a second.
        time.sleep(GRACE_S)
        co.send_signal(signal.SIGTERM)
        co.communicate(timeout=30)
    finally:
        for proc in (sender, co):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    first = first_answer(rows)
    vm = report["answer"]["vm"]
    warm = m.agent(ROUTER).call("vm_warm")
    at = moments(vm["steps"], warm["timings"].get("bench", {}), report["sent"],
                 report["answered"], first if first is not None else float("nan"))
    row = vm_phases(vm["steps"])
    row["total_ms"] = (first - report["sent"]) * 1000 if first is not None else float("nan")
    row["segments"] = segments(at)
    row["fetched"] = next(w for w, _ in vm["steps"] if w.startswith("fetched"))
    obj = m.agent(ROUTER).call("vm")[0]["objects"]["counter"]
    row["memory"] = {"rss_kib": rss_kib(obj["pid"]),
                     "cgroup_memory_kib": (obj["usage"].get("memory_bytes") or 0) // 1024}
    m.agent(ROUTER).call("vm_remove", name="bench")
    return row


def run(args: argparse.Namespace) -> dict[str, Any]:
    from topologies.moatnet import MoatNetwork

    from .counter_service import publish_counter
    from topologies.patent import PatentTopo

    tmp = Path(tempfile.mkdtemp(prefix="moat-bench-provision-"))
    results: dict[str, dict[str, list[dict[str, Any]]]] = {p: {k: [] for k in KINDS} for p in PATHS}
    new_path = {"keep_sessions": not args.no_session_pool, "cache_versions": not args.no_cache}
    old_path = {"keep_sessions": False, "cache_versions": False}
    try:
        with MoatNetwork(PatentTopo(), objects=["counter"]) as m:
            publish_counter(m, "counter-svc", workdir=tmp)
            storage = m.run.dir / "vm" / ROUTER
            body = dict(vm="bench", kind="interface", interface=f"{ROUTER}-eth0", address=ADDRESS,
                        service="counter-svc", resources={"cpu": 0.5, "memory_mb": 256, "pids": 64})
            body_file = m.run.write_private("bench_provision", json.dumps(body))
            agent = m.agent(ROUTER)
            agent.call("vm_warm", **new_path)
            _one(m, body_file, storage, "cold", 0)  # warm-up: lazy imports, the first session
            n = 0
            for _ in range(args.rounds):
                for kind in KINDS:
                    for path in PATHS:
                        agent.call("vm_warm", **(new_path if path == "warm" else old_path))
                        n += 1
                        results[path][kind].append(_one(m, body_file, storage, kind, n))
            counters = agent.call("vm_warm")
            counters.pop("timings", None)
            unsandboxed = {"rss_kib": plain_runner_rss(m, "r22c")}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    from .bench_packets import cpu_model

    summary = {path: {kind: summarise(results[path][kind]) for kind in KINDS} for path in PATHS}
    warm_segments = {}
    for kind in KINDS:
        rows = [r["segments"] for r in results["warm"][kind]]
        warm_segments[kind] = {k: round(statistics.median(r[k] for r in rows if k in r), 2)
                               for k in rows[0]} if rows else {}
    return {"benchmark": "provision", "rounds": args.rounds, "router": ROUTER,
            "machine": f"{cpu_model()} x{os.cpu_count()}, Python {platform.python_version()}",
            "warm_path": new_path, **summary, "side_by_side": side_by_side(summary),
            "warm_segments": warm_segments, "counters": counters, "raw": results,
            "memory": {"sandboxed": results["warm"]["cached"][-1]["memory"],
                       "unsandboxed": unsandboxed}}


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


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
    parser.add_argument("--no-session-pool", action="store_true",
                        help="the warm path without the kept SFTP session")
    parser.add_argument("--no-cache", action="store_true",
                        help="the warm path without the version cache")
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
          f"of each path and kind, alternately ({summary['machine']}); warm path "
          f"{summary['warm_path']}, old path: a new session and a full fetch each time. "
          "Phases from the VM's step timestamps; total: PROVISION sent by site24 -> first "
          "answer at co14")
    print(format_table(summary["side_by_side"], ["kind", "phase", "old median", "warm median",
                                                 "old/warm", "old worst", "warm worst"]))
    for kind in KINDS:
        print(f"\nwhere the warm path's {kind} total goes (medians, ms):")
        print(format_table([{"segment": k, "ms": v} for k, v in summary["warm_segments"][kind].items()],
                           ["segment", "ms"]))
    c = summary["counters"]
    print(f"\nSFTP sessions {c['sessions']}; version cache {c['versions']}")
    mem = summary["memory"]
    print(f"\nper-object memory: sandboxed VmRSS {mem['sandboxed']['rss_kib']} KiB "
          f"(its cgroup counts {mem['sandboxed']['cgroup_memory_kib']} KiB, page cache included); "
          f"the same object without a sandbox: VmRSS {mem['unsandboxed']['rss_kib']} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
