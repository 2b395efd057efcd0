"""Registration benchmark: round-trip time through an FOA, HOA throughput, agents' CPU/memory.

    sudo python -m experiments.bench_registration [--rounds 200] [--duration 5] [--window 32]
                                                  [--adv-interval 1.0] [--idle 2] [--json]
    sudo moat bench registration [same options]

It starts the patent's topology (:class:`topologies.patent.PatentTopo` through
:class:`topologies.moatnet.MoatNetwork`, one agent daemon per router; HOA ``r22b``, every
router of nets 12 and 14 an FOA) with two objects, ``counter`` and ``loadgen``, and runs three
phases in that one network:

1. **idle** (``--idle`` s, default 2): ``counter``'s registration client runs on ``r18b``,
   registered through the FOA ``r18a`` (10.12.0.1, its ``preferred_agent``); the agents only
   advertise and keep time. This is the CPU baseline.
2. **rtt**: the control command ``register`` is sent to ``r18b``'s agent ``--rounds`` times,
   one after the other. Each makes the client send a Registration Request to ``r18a``, which
   checks Mobile-Foreign auth and relays it (care-of-name NVSE, Foreign-Home auth) over the
   backbone to the HOA ``r22b``, which checks both authenticators and the replay window,
   renews the binding and replies; ``r18a`` checks and relays the reply. The client measures
   the round trip itself (``time.monotonic()`` from sending the request to receiving the
   relayed reply): the ``rtt`` of the attempt the command returns. The control-socket call
   around it is timed too (``call``), as an aside.
3. **load**: ``python -m nodetools.probes regload`` inside ``r22a`` (the home LAN's border
   router, one hop from the HOA) acts as a trusted FOA (``r20a``'s Foreign-Home key) relaying
   requests of ``loadgen`` (its own Mobile-Home key, care-of address ``r20a``'s 10.14.0.1):
   valid, authenticated requests with fresh, strictly increasing NTP identifications and
   lifetime 60, from one UDP socket to 10.16.0.2:434, at most ``--window`` outstanding (a
   request unanswered after 1 s is a timeout and frees its slot), for ``--duration`` s. The
   rate is the replies that came back within that window divided by its length. A separate
   object keeps ``counter``'s binding, and its replay state, out of the load.

CPU per agent daemon (``r22b`` HOA, ``r18a`` FOA, ``r18b`` object host, itself an FOA) is
utime + stime from ``/proc/<pid>/stat`` (all threads) before and after each phase, as seconds
and as % of one core over the phase's wall time; for the load phase the generator reads it
itself at the start and end of its sending window (same PID namespace), so its own start-up is
not charged. Memory is ``VmRSS`` and ``VmHWM`` from ``/proc/<pid>/status`` at the end of each
phase. Agents log at INFO as they normally run (the HOA writes one line per registration);
``--quiet-agents`` sets WARNING.

Writes ``results/bench_registration/<run-id>/``: summary.json, rtt.csv, agents.csv.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence, TextIO

from .bench_tunnel import BenchError, cpu_use, parse_proc_stat
from .results import results_dir, write_csv, write_json
from .tables import format_table

log = logging.getLogger(__name__)

OBJECT = "counter"
LOAD_OBJECT = "loadgen"
OBJECT_ROUTER = "r18b"
FOA = "r18a"
LOAD_NODE = "r22a"
LOAD_FOA = "r20a"  # whose Foreign-Home key (and care-of address) the generator uses
DEFAULT_ROUNDS = 200
DEFAULT_DURATION = 5.0
DEFAULT_WINDOW = 32
DEFAULT_IDLE = 2.0
LOAD_LIFETIME = 60
LOAD_TIMEOUT = 1.0
MAX_DURATION = 60.0  # the generator's own hard bound (nodetools.probes.REGLOAD_MAX_DURATION)
MAX_WINDOW = 1024
MAX_REQUESTS = 1_000_000
ACCEPTED_CODES = (0, 1)
MIB = 1024 * 1024

RTT_COLUMNS = ["n", "failed", "min_ms", "mean_ms", "p50_ms", "p99_ms", "max_ms", "call_p50_ms",
               "call_p99_ms"]
LOAD_COLUMNS = ["seconds", "window", "sent", "replies", "replies_per_s", "accepted",
                "accepted_per_s", "denied", "timeouts", "late", "p50_ms", "p99_ms",
                "generator_cpu_pct"]
AGENT_COLUMNS = ["phase", "router", "role", "pid", "wall_s", "cpu_s", "cpu_pct", "rss_mib",
                 "hwm_mib"]
RTT_CSV = ["round", "rtt_ms", "call_ms", "code", "agent", "care_of_address", "error"]


# --- pure helpers (unit-tested without root) -----------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (0..100) by linear interpolation between closest ranks (as
    numpy's default): rank ``p/100 * (n - 1)`` of the sorted values."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= p <= 100 or math.isnan(p):
        raise ValueError(f"percentile {p} outside 0..100")
    ordered = sorted(values)
    rank = p / 100 * (len(ordered) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def latency_stats(seconds: Sequence[float]) -> dict[str, Any]:
    """n, min, mean, p50, p99 and max of durations in seconds, as milliseconds (None if n=0)."""
    if not seconds:
        return {"n": 0, "min_ms": None, "mean_ms": None, "p50_ms": None, "p99_ms": None,
                "max_ms": None}
    ms = [s * 1000 for s in seconds]
    return {"n": len(ms), "min_ms": round(min(ms), 3), "mean_ms": round(sum(ms) / len(ms), 3),
            "p50_ms": round(percentile(ms, 50), 3), "p99_ms": round(percentile(ms, 99), 3),
            "max_ms": round(max(ms), 3)}


def parse_proc_status(text: str) -> dict[str, float | None]:
    """VmRSS and VmHWM (resident now and its peak) in MiB from ``/proc/<pid>/status``."""
    found: dict[str, float | None] = {"rss_mib": None, "hwm_mib": None}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        field = {"VmRSS": "rss_mib", "VmHWM": "hwm_mib"}.get(key.strip())
        if field is None:
            continue
        parts = value.split()
        if len(parts) != 2 or parts[1] != "kB" or not parts[0].isdigit():
            raise BenchError(f"unexpected {key} line in /proc/<pid>/status: {line!r}")
        found[field] = round(int(parts[0]) * 1024 / MIB, 2)
    return found


def read_proc(pid: int, proc_root: Path = Path("/proc")) -> dict[str, Any]:
    """One snapshot of a process: CPU seconds (utime + stime) and VmRSS/VmHWM in MiB."""
    base = proc_root / str(pid)
    try:
        stat = (base / "stat").read_text(errors="replace")
        status = (base / "status").read_text(errors="replace")
    except OSError as exc:
        raise BenchError(f"cannot read /proc of pid {pid}: {exc}") from None
    return {"cpu_s": parse_proc_stat(stat), **parse_proc_status(status)}


def phase_rows(phase: str, wall: float, before: dict[str, dict[str, Any]],
               after: dict[str, dict[str, Any]], pids: dict[str, int],
               roles: dict[str, str]) -> list[dict[str, Any]]:
    """One row per router: CPU over the phase (seconds, % of one core) and memory at its end."""
    rows = []
    for router, pid in pids.items():
        use = cpu_use(before[router]["cpu_s"], after[router]["cpu_s"], wall)
        rows.append({"phase": phase, "router": router, "role": roles.get(router, ""), "pid": pid,
                     "wall_s": round(wall, 3), "cpu_s": use["cpu_s"], "cpu_pct": use["cpu_pct"],
                     "rss_mib": after[router].get("rss_mib"),
                     "hwm_mib": after[router].get("hwm_mib")})
    return rows


def summarize_load(result: dict[str, Any]) -> dict[str, Any]:
    """The generator's answer reduced to the figures the report shows."""
    codes = result.get("codes") or {}
    denied = {label: n for label, n in codes.items() if int(label.split()[0]) not in ACCEPTED_CODES}
    elapsed = result.get("elapsed") or 0.0
    gen_cpu = result.get("generator_cpu_s")
    return {
        "seconds": round(elapsed, 3), "window": result.get("window"), "sent": result.get("sent"),
        "replies": result.get("replies"),
        "replies_per_s": round(result.get("replies_per_s") or 0.0, 1),
        "accepted": result.get("accepted"),
        "accepted_per_s": round(result.get("accepted_per_s") or 0.0, 1),
        "denied": sum(denied.values()), "denied_by_code": denied,
        "timeouts": result.get("timeouts"),
        "late": (result.get("late_replies") or 0) + (result.get("late_timeouts") or 0),
        "bad_auth": result.get("bad_auth"), "unmatched": result.get("unmatched"),
        "icmp_errors": result.get("icmp_errors"), "request_bytes": result.get("request_bytes"),
        **{k: v for k, v in latency_stats(result.get("latencies") or []).items()
           if k in ("p50_ms", "p99_ms", "max_ms")},
        "generator_cpu_s": None if gen_cpu is None else round(gen_cpu, 3),
        "generator_cpu_pct": (round(100 * gen_cpu / elapsed, 1)
                              if gen_cpu is not None and elapsed > 0 else None),
    }


def load_cpu(result: dict[str, Any], pids: dict[str, int]) -> dict[str, tuple[float, float]] | None:
    """The generator's in-window CPU readings of the agents, if it got all of them."""
    readings = result.get("pid_cpu") or {}
    out = {}
    for router, pid in pids.items():
        pair = readings.get(str(pid))
        if not pair or pair[0] is None or pair[1] is None:
            return None
        out[router] = (float(pair[0]), float(pair[1]))
    return out


# --- the machine ---------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    from .bench_packets import cpu_model

    return {"cpu": cpu_model(), "cpus": os.cpu_count(), "kernel": platform.release(),
            "python": f"{platform.python_implementation()} {platform.python_version()}",
            "clk_tck": os.sysconf("SC_CLK_TCK")}


# --- the measurement -----------------------------------------------------------------------


def _lan_address(moat: Any, router: str, peer: str | None = None) -> str:
    """``router``'s address on an access LAN (the one it shares with ``peer``, if given)."""
    addrs = moat.topo.addresses(router)
    if peer is not None:
        theirs = moat.topo.addresses(peer)
        for a in addrs:
            if any(a.network == b.network for b in theirs):
                return str(a.ip)
    iface = next(i for i in moat.agent_config(router).interfaces if i.advertise)
    return iface.address


def _snapshot(pids: dict[str, int]) -> dict[str, dict[str, Any]]:
    return {router: read_proc(pid) for router, pid in pids.items()}


def _registered_via(moat: Any, address: str) -> dict[str, Any] | None:
    for obj in moat.agent(OBJECT_ROUTER).call("objects"):
        reg = obj.get("registration") if obj["name"] == OBJECT else None
        if reg and reg["agent"] == address:
            return reg
    return None


def _load_spec(moat: Any, load_foa: str) -> dict[str, Any]:
    obj = moat.objects[LOAD_OBJECT]
    return {
        "home_address": obj.home_address,
        "home_agent": str(moat.topo.addresses(moat.hoa)[0].ip),
        "care_of_address": _lan_address(moat, load_foa),
        "care_of_name": f"{LOAD_OBJECT}.{load_foa}",
        "nai": obj.nai,
        "lifetime": LOAD_LIFETIME,
        "mobile_home": moat.keyring.mobile_home[LOAD_OBJECT].to_json(),
        "foreign_home": moat.keyring.foreign_home[load_foa].to_json(),
    }


def _pick_load_foa(moat: Any) -> str:
    if LOAD_FOA in moat.trusted_foas:
        return LOAD_FOA
    others = [r for r in moat.trusted_foas if r != FOA]
    if not others and not moat.trusted_foas:
        raise BenchError("the HOA trusts no FOA: the load generator has no Foreign-Home key")
    return (others or moat.trusted_foas)[0]


def measure_rtt(moat: Any, rounds: int, say: Callable[[str], None]) -> list[dict[str, Any]]:
    """``rounds`` registrations of the object, one after the other, each as the client timed it."""
    client = moat.agent(OBJECT_ROUTER, timeout=30)
    samples = []
    for i in range(rounds):
        t0 = time.monotonic()
        attempt = client.call("register", name=OBJECT)
        call = time.monotonic() - t0
        samples.append({"round": i + 1, "rtt": attempt.get("rtt"), "call": call,
                        "code": attempt.get("code"), "agent": attempt.get("agent"),
                        "care_of_address": attempt.get("care_of_address"),
                        "error": attempt.get("error") or ""})
        if (i + 1) % max(1, rounds // 4) == 0:
            say(f"  rtt: {i + 1}/{rounds}")
    return samples


def rtt_summary(samples: list[dict[str, Any]], foa_address: str) -> dict[str, Any]:
    ok = [s for s in samples if s["code"] in ACCEPTED_CODES and s["rtt"] is not None
          and s["agent"] == foa_address]
    calls = latency_stats([s["call"] for s in ok])
    return {**latency_stats([s["rtt"] for s in ok]), "rounds": len(samples),
            "failed": len(samples) - len(ok),
            "other_agent": sum(1 for s in samples if s["code"] in ACCEPTED_CODES
                               and s["agent"] != foa_address),
            "call_p50_ms": calls["p50_ms"], "call_p99_ms": calls["p99_ms"]}


def run(args: argparse.Namespace, say: Callable[[str], None], out: dict[str, Any]) -> None:
    """Start the network, run the three phases and fill ``out`` as they finish (so a failure
    half-way still leaves what was measured)."""
    from topologies.moatnet import MoatNetwork
    from topologies.patent import PatentTopo

    moat = MoatNetwork(PatentTopo(), objects=[OBJECT, LOAD_OBJECT],
                       advertise_interval=args.adv_interval,
                       log_level="WARNING" if args.quiet_agents else "INFO")
    out["run_id"] = moat.run.run_id
    rows: list[dict[str, Any]] = []
    out["agents_usage"] = rows
    with moat:
        say(f"run {moat.run.run_id} up ({moat.run.dir})")
        routers = [moat.hoa, FOA, OBJECT_ROUTER]
        pids = {r: int(moat.agent(r).call("status")["pid"]) for r in routers}
        roles = {r: "+".join(moat.roles(r)) or "-" for r in routers}
        roles[OBJECT_ROUTER] += f" (client of {OBJECT})"
        out["agents"] = {r: {"pid": pids[r], "roles": moat.roles(r)} for r in routers}
        foa_address = _lan_address(moat, FOA, OBJECT_ROUTER)
        moat.start_object(OBJECT, OBJECT_ROUTER, preferred_agent=foa_address)
        reg = moat.wait_for(lambda: _registered_via(moat, foa_address), timeout=30, interval=0.05)
        say(f"{OBJECT} on {OBJECT_ROUTER} registered via {FOA} ({foa_address}), care-of-name "
            f"{reg['care_of_name']}")
        out["registration"] = reg

        say(f"idle {args.idle:g} s")
        before, t0 = _snapshot(pids), time.monotonic()
        time.sleep(args.idle)
        wall, after = time.monotonic() - t0, _snapshot(pids)
        rows += phase_rows("idle", wall, before, after, pids, roles)

        say(f"rtt: {args.rounds} registrations via {FOA}")
        before, t0 = _snapshot(pids), time.monotonic()
        samples = measure_rtt(moat, args.rounds, say)
        wall, after = time.monotonic() - t0, _snapshot(pids)
        rows += phase_rows("rtt", wall, before, after, pids, roles)
        out["rtt"] = rtt_summary(samples, foa_address)
        out["rtt_samples"] = samples

        load_foa = _pick_load_foa(moat)
        spec = _load_spec(moat, load_foa)
        spec_path = moat.run.dir / "regload.json"
        spec_path.write_text(json.dumps(spec))
        os.chmod(spec_path, 0o600)  # holds keys
        say(f"load: {LOAD_NODE} -> HOA {spec['home_agent']}:434 as FOA {load_foa}, "
            f"window {args.window}, {args.duration:g} s")
        stats_before = moat.agent(moat.hoa).call("status")["home_stats"] or {}
        before, t0 = _snapshot(pids), time.monotonic()
        argv = ["regload", str(spec_path), "--duration", str(args.duration), "--window",
                str(args.window), "--timeout", str(LOAD_TIMEOUT), "--max-requests",
                str(args.max_requests)]
        for pid in pids.values():
            argv += ["--pid", str(pid)]
        result = moat.probe(LOAD_NODE, *argv, timeout=args.duration + 60)
        wall, after = time.monotonic() - t0, _snapshot(pids)
        stats_after = moat.agent(moat.hoa).call("status")["home_stats"] or {}
        inside = load_cpu(result, pids)
        if inside is not None:
            before = {r: dict(before[r], cpu_s=inside[r][0]) for r in pids}
            after = {r: dict(after[r], cpu_s=inside[r][1]) for r in pids}
            wall = result["elapsed"]
        rows += phase_rows("load", wall, before, after, pids, roles)
        load = summarize_load(result)
        load.update(foa_identity=load_foa, care_of_address=spec["care_of_address"],
                    object=LOAD_OBJECT, home_address=spec["home_address"],
                    hoa=spec["home_agent"], generator_node=LOAD_NODE,
                    cpu_window="generator's sending window" if inside is not None
                    else "probe start to end (generator could not read /proc)",
                    hoa_stats_delta={k: stats_after.get(k, 0) - stats_before.get(k, 0)
                                     for k in set(stats_after) | set(stats_before)
                                     if stats_after.get(k, 0) != stats_before.get(k, 0)})
        out["load"] = load
        out["hoa_bindings"] = moat.agent(moat.hoa).call("bindings")


def method(args: argparse.Namespace, env: dict[str, Any]) -> dict[str, Any]:
    return {
        "topology": "PatentTopo via MoatNetwork (backbone htb 100 Mbit/s, LANs unshaped, no "
                    "netem); HOA r22b 10.16.0.2; FOAs r18a, r18b, r20a",
        "rtt": f"{args.rounds} x control command `register` to r18b's agent (client of {OBJECT}, "
               f"preferred FOA {FOA}), back to back; rtt = client's time.monotonic() from sending "
               "the RRQ to receiving the relayed RRP (r18b -> r18a -> r22a -> r22b and back)",
        "load": f"python -m nodetools.probes regload in {LOAD_NODE}: trusted-FOA relayed RRQs "
                f"(NAI, object-part NVSE, Mobile-Home auth, care-of-name NVSE, Foreign-Home auth; "
                f"HMAC-SHA-256) for {LOAD_OBJECT}, fresh increasing NTP identification, lifetime "
                f"{LOAD_LIFETIME}, one UDP socket to the HOA:434, window {args.window} outstanding, "
                f"{args.duration:g} s, reply timeout {LOAD_TIMEOUT:g} s; rate = replies within the "
                "window / its length",
        "cpu_memory": "utime+stime from /proc/<pid>/stat of each agent daemon before/after each "
                      "phase (% of one core over the phase's wall time; load phase read by the "
                      "generator at its window's edges); VmRSS/VmHWM from /proc/<pid>/status at "
                      "the phase's end",
        "rounds": args.rounds, "duration_s": args.duration, "window": args.window,
        "idle_s": args.idle, "advertise_interval_s": args.adv_interval,
        "agent_log_level": "WARNING" if args.quiet_agents else "INFO",
        **env,
    }


def print_report(summary: dict[str, Any], out: TextIO) -> None:
    m = summary["method"]
    w = out.write
    w(f"MOAT registration benchmark (run {summary.get('run_id')})\n")
    for key in ("topology", "rtt", "load", "cpu_memory"):
        w(f"  {key:<11} {m[key]}\n")
    w(f"  {'settings':<11} rounds {m['rounds']}, duration {m['duration_s']:g} s, window "
      f"{m['window']}, idle {m['idle_s']:g} s, advertisement interval "
      f"{m['advertise_interval_s']:g} s, agents log at {m['agent_log_level']}\n")
    w(f"  {'machine':<11} {m['cpu']} x{m['cpus']}; kernel {m['kernel']}; {m['python']}; "
      f"CLK_TCK {m['clk_tck']}\n")
    if summary.get("rtt"):
        w(f"\nRegistration round trip through FOA {FOA} (ms)\n")
        w(format_table([summary["rtt"]], RTT_COLUMNS) + "\n")
    if summary.get("load"):
        load = summary["load"]
        w(f"\nHOA registrations with authentication ({load['generator_node']} as FOA "
          f"{load['foa_identity']} -> {load['hoa']}:434)\n")
        w(format_table([load], LOAD_COLUMNS) + "\n")
        denied = ", ".join(f"{k}: {v}" for k, v in sorted(load["denied_by_code"].items())) or "none"
        w(f"  denied by code: {denied}; bad auth {load['bad_auth']}, unmatched "
          f"{load['unmatched']}, ICMP errors {load['icmp_errors']}; HOA counted "
          f"{load['hoa_stats_delta']}\n")
    if summary.get("agents_usage"):
        w("\nAgent daemons: CPU per phase and memory at its end\n")
        w(format_table(summary["agents_usage"], AGENT_COLUMNS) + "\n")
        short = sorted({r["phase"] for r in summary["agents_usage"] if r["wall_s"] < 1.0})
        if short:
            w(f"  note: CPU time is counted in ticks of 1/{m['clk_tck']} s; the {', '.join(short)} "
              f"phase lasted under 1 s, so its cpu_pct is rough (more --rounds make it finer)\n")
    if summary.get("error"):
        w(f"\nFAILED: {summary['error']}\n")
    w(f"\nresults in {summary['dest']}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moat bench registration", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS,
                        help=f"registrations timed through the FOA (default {DEFAULT_ROUNDS})")
    parser.add_argument("--duration", type=float, default=DEFAULT_DURATION,
                        help=f"seconds of HOA load (default {DEFAULT_DURATION:g}, at most "
                             f"{MAX_DURATION:g})")
    parser.add_argument("--window", type=int, default=DEFAULT_WINDOW,
                        help=f"outstanding requests of the load generator (default {DEFAULT_WINDOW})")
    parser.add_argument("--max-requests", type=int, default=200_000,
                        help="the load generator stops after this many requests (default 200000)")
    parser.add_argument("--adv-interval", type=float, default=1.0,
                        help="agent advertisement interval in seconds (default 1)")
    parser.add_argument("--idle", type=float, default=DEFAULT_IDLE,
                        help=f"seconds of the idle baseline (default {DEFAULT_IDLE:g})")
    parser.add_argument("--quiet-agents", action="store_true", help="agents log at WARNING")
    parser.add_argument("--results", type=Path, default=None, help="results root (default ./results)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    return parser


def check_args(args: argparse.Namespace) -> str | None:
    """Why the arguments cannot be run, or None."""
    if args.rounds < 1:
        return "--rounds must be >= 1"
    if not 0 < args.duration <= MAX_DURATION:
        return f"--duration must be in (0, {MAX_DURATION:g}]"
    if not 1 <= args.window <= MAX_WINDOW:
        return f"--window must be in 1..{MAX_WINDOW}"
    if not 1 <= args.max_requests <= MAX_REQUESTS:
        return f"--max-requests must be in 1..{MAX_REQUESTS}"
    if args.adv_interval <= 0:
        return "--adv-interval must be > 0"
    if args.idle <= 0:
        return "--idle must be > 0"
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    problem = check_args(args)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("bench registration needs root (network namespaces): run it with sudo",
              file=sys.stderr)
        return 1
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    summary: dict[str, Any] = {"experiment": "bench_registration",
                               "method": method(args, environment())}
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
    dest = results_dir("bench_registration", summary["run_id"], args.results)
    summary["dest"] = str(dest)
    samples = summary.pop("rtt_samples", [])
    write_csv(dest / "rtt.csv", [dict(s, rtt_ms=None if s["rtt"] is None else round(s["rtt"] * 1000, 3),
                                      call_ms=round(s["call"] * 1000, 3)) for s in samples], RTT_CSV)
    write_csv(dest / "agents.csv", summary.get("agents_usage", []), AGENT_COLUMNS)
    write_json(dest / "summary.json", summary)
    if args.json:
        json.dump(summary, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        print_report(summary, sys.stdout)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
