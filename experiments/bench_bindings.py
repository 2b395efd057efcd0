"""HOA cost with 100 against 1,000 bindings (issue 15, item 2).

    sudo python -m experiments.bench_bindings [--sizes 100,1000] [--idle 10] [--networks 8]
                                              [--json]

Starts the scale topology (``--networks`` foreign networks of 2 routers, each router an FOA;
HOA ``r22b``) with as many swarm objects as the largest size, then for each size in turn
registers objects until the HOA holds that many bindings (:func:`experiments.scale_registration.register_many`:
lightweight objects, real FOAs and HOA, authenticated) and measures the HOA agent's CPU:

* **per registration**: utime + stime of the HOA's process (``/proc/<pid>/stat``, all
  threads) over the registrations of that step, divided by their number;
* **idle**: over ``--idle`` s with the bindings held and nothing registering or expiring
  (lifetime 300 s): what housekeeping (expiry ticks every 0.25 s, journal, advertisements,
  the other roles' timers) costs, as % of one core.

If housekeeping and a registration's work do not grow with the number of bindings, the
figures for 1,000 are those for 100 (within the tick granularity of CPU time: 1/CLK_TCK s;
a longer ``--idle`` makes the idle figure finer). Memory is the HOA's VmRSS at each step.

Writes ``results/bench_bindings/<run-id>/``: summary.json and steps.csv.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Any, Callable, TextIO

from .bench_registration import environment, read_proc
from .results import results_dir, write_csv, write_json
from .tables import format_table

log = logging.getLogger(__name__)

COLUMNS = ["bindings", "registered", "register_s", "hoa_cpu_per_registration_ms",
           "idle_s", "hoa_idle_cpu_pct", "hoa_rss_mib"]
DEFAULT_SIZES = (100, 1000)
MAX_SIZE = 1878  # the address plan's home addresses (topologies.addressing.MAX_OBJECTS)


def parse_sizes(text: str) -> list[int]:
    """``"100,1000"`` -> [100, 1000]: increasing, each in 1..MAX_SIZE."""
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--sizes must be comma-separated integers, got {text!r}") from None
    if not sizes or sizes != sorted(set(sizes)) or sizes[0] < 1 or sizes[-1] > MAX_SIZE:
        raise ValueError(f"--sizes must be increasing, in 1..{MAX_SIZE}, got {text!r}")
    return sizes


def step_row(bindings: int, registered: int, seconds: float | None, cpu_reg: float,
             idle_wall: float, cpu_idle: float, rss: float | None, added: int) -> dict[str, Any]:
    """One size's figures (CPU in seconds over the step's registrations and its idle time)."""
    return {"bindings": bindings, "registered": registered,
            "register_s": None if seconds is None else round(seconds, 3),
            "hoa_cpu_per_registration_ms": round(1000 * cpu_reg / added, 3) if added else None,
            "idle_s": round(idle_wall, 2),
            "hoa_idle_cpu_pct": round(100 * cpu_idle / idle_wall, 2) if idle_wall > 0 else None,
            "hoa_rss_mib": rss}


def run(args: argparse.Namespace, say: Callable[[str], None], out: dict[str, Any]) -> None:
    from topologies.moatnet import MoatNetwork
    from topologies.scale import ScaleTopo

    from .scale_registration import register_many, swarm_object_names

    sizes = parse_sizes(args.sizes)
    names = swarm_object_names(sizes[-1])
    moat = MoatNetwork(ScaleTopo(n_foreign=args.networks, routers_per_net=2), objects=names,
                       log_level="WARNING")
    out["run_id"] = moat.run.run_id
    rows: list[dict[str, Any]] = []
    out["steps"] = rows
    with moat:
        pid = int(moat.agent(moat.hoa).call("status")["pid"])
        say(f"run {moat.run.run_id} up; HOA {moat.hoa} pid {pid}")
        before = read_proc(pid)
        t0 = time.monotonic()
        time.sleep(args.idle)
        wall, after = time.monotonic() - t0, read_proc(pid)
        rows.append(step_row(0, 0, None, 0.0, wall, after["cpu_s"] - before["cpu_s"],
                             after["rss_mib"], 0))
        held = 0
        for size in sizes:
            batch = names[held:size]
            before = read_proc(pid)
            result = register_many(moat, len(batch), names=batch)
            after = read_proc(pid)
            if not result.complete:
                raise RuntimeError(f"only {result.registered} of {len(batch)} registered: "
                                   f"{result.summary['failed'][:3]}")
            cpu_reg = after["cpu_s"] - before["cpu_s"]
            held = size
            say(f"{size} bindings: {len(batch)} registered in {result.seconds} s; idle "
                f"{args.idle:g} s")
            before, t0 = read_proc(pid), time.monotonic()
            time.sleep(args.idle)
            wall, after = time.monotonic() - t0, read_proc(pid)
            rows.append(step_row(result.hoa_bindings or 0, len(batch), result.seconds, cpu_reg,
                                 wall, after["cpu_s"] - before["cpu_s"], after["rss_mib"],
                                 len(batch)))


def print_report(summary: dict[str, Any], out: TextIO) -> None:
    m = summary["method"]
    out.write(f"HOA cost by bindings held (run {summary.get('run_id')})\n")
    out.write(f"  {m['how']}\n  machine: {m['cpu']} x{m['cpus']}; {m['python']}; CLK_TCK "
              f"{m['clk_tck']}\n\n")
    if summary.get("steps"):
        out.write(format_table(summary["steps"], COLUMNS) + "\n")
    if summary.get("error"):
        out.write(f"\nFAILED: {summary['error']}\n")
    out.write(f"\nresults in {summary['dest']}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench_bindings",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)),
                        help="bindings the HOA holds at each step (default 100,1000)")
    parser.add_argument("--idle", type=float, default=10.0,
                        help="seconds of idle measurement per step (default 10)")
    parser.add_argument("--networks", type=int, default=8,
                        help="foreign networks of 2 FOAs each (64 visitors per FOA; default 8)")
    parser.add_argument("--results", default=None, help="results root (default ./results)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        sizes = parse_sizes(args.sizes)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    if not 0 < args.idle <= 600 or not 1 <= args.networks <= 100:
        print("--idle must be in (0, 600], --networks in 1..100", file=sys.stderr)
        return 2
    if sizes[-1] > 2 * 64 * args.networks:
        print(f"{sizes[-1]} objects need at least {-(-sizes[-1] // 128)} networks "
              f"(2 FOAs of 64 visitors each)", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("bench_bindings needs root (network namespaces): run it with sudo", file=sys.stderr)
        return 1
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    env = environment()
    summary: dict[str, Any] = {"experiment": "bench_bindings", "method": {
        "how": f"scale topology, {args.networks} foreign networks x 2 FOAs; bindings made by "
               f"register_many (lightweight objects, real FOAs/HOA, authenticated); HOA CPU = "
               f"utime+stime of its agent from /proc/<pid>/stat over each step's registrations "
               f"and over {args.idle:g} s idle after it", "sizes": sizes, "idle_s": args.idle,
        **env}}
    failed = False
    try:
        run(args, say, summary)
    except Exception as exc:  # noqa: BLE001 - report it with whatever was measured
        log.debug("benchmark failed", exc_info=True)
        summary["error"] = f"{type(exc).__name__}: {exc}"
        failed = True
    if not summary.get("run_id"):
        from topologies.run import new_run_id

        summary["run_id"] = new_run_id()
    from pathlib import Path

    dest = results_dir("bench_bindings", summary["run_id"],
                       Path(args.results) if args.results else None)
    summary["dest"] = str(dest)
    write_csv(dest / "steps.csv", summary.get("steps", []), COLUMNS)
    write_json(dest / "summary.json", summary)
    if args.json:
        json.dump(summary, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        print_report(summary, sys.stdout)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
