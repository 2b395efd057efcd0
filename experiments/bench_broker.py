"""Service broker benchmark — ``sudo moat bench broker`` (a script, not a test).

In the patent's topology (broker on r22b) text2html (r22a) and html2rtf (r22b) run leased
with 100 % share and 1 CPU each. One corresponding object, ``co14`` on net 14, runs a loop
inside its host (one Python process, one asyncio loop, one message outstanding at a time,
``time.perf_counter``):

* **requests/s**: for ``--seconds``, LEASE_REQUEST for ``text2html`` (1 %, 0.01 CPU, 30 s),
  then LEASE_CANCEL of what it got, back to back; the figure is requests granted per second
  of that window (each also cancelled, so the exchanges are twice that). Every message is
  signed with the CO's HMAC key, a fresh TCP connection to 4340, checked and answered by the
  broker's agent;
* **renewals/s**: for ``--seconds``, LEASE_RENEW of one lease (30 s), back to back;
* **request → RTF**: ``--runs`` times, LEASE_REQUEST for ``text -> rtf`` (a two-hop path)
  and the path run on a short text: from sending the request to the RTF back from the second
  hop (median and p95). One untimed run first warms the objects.

Baselines, measured in the same run: for the rates, the same operations on the pure
:class:`agent.broker.broker.Broker` facade in this process (the same two instances
registered; no signing, no network, no agent); for the latency, the same two service calls
made directly with the credentials already in hand (the grant of the same run, before it is
cancelled). Ratios are broker / baseline.

Writes ``results/bench_broker/<run-id>/summary.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from .results import results_dir, write_json
from .tables import format_table

log = logging.getLogger(__name__)

CO = "co14"
SERVICE = "text2html"
TARGET = "text -> rtf"
PATH_SERVICES = ("text2html", "html2rtf")
DEFAULT_SECONDS = 3.0
DEFAULT_RUNS = 20
MAX_SECONDS = 60.0
MAX_RUNS = 1000
MAX_OPS = 1_000_000
#: What each lease asks: small, so capacity never runs out.
SHARE, CPU, DURATION = 1.0, 0.01, 30.0
DOCUMENT = "Broker benchmark\n\nOne paragraph of text, {braces} and caf\u00e9.\n"
FIGURE_COLUMNS = ["figure", "broker", "baseline", "ratio", "unit", "baseline_is"]


class BenchError(RuntimeError):
    """The benchmark could not run (the CO loop failed, a service was not provisioned)."""


# --- pure helpers (unit-tested) ----------------------------------------------------------------


def percentile(values: list[float], p: float) -> float:
    """Linear-interpolation percentile (numpy's default), as the registration bench does."""
    from .bench_registration import percentile as pct

    return pct(values, p)


def rate(count: int, seconds: float) -> float:
    """Operations per second, 0 for an empty window."""
    return count / seconds if seconds > 0 else 0.0


def ratio(value: float | None, baseline: float | None) -> float | None:
    """value / baseline, None when either is missing or the baseline is 0."""
    if value is None or not baseline:
        return None
    return value / baseline


def latency(ms: list[float]) -> dict[str, float | None]:
    """Median and p95 of durations in milliseconds."""
    if not ms:
        return {"n": 0, "p50_ms": None, "p95_ms": None}
    return {"n": len(ms), "p50_ms": round(percentile(ms, 50), 3),
            "p95_ms": round(percentile(ms, 95), 3)}


def figure_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The printed figures, each beside its baseline and the ratio."""
    net, local = summary["network"], summary["in_process"]
    path, direct = net["path"], net["direct"]

    def row(figure: str, value: float | None, base: float | None, unit: str,
            what: str) -> dict[str, Any]:
        r = ratio(value, base)
        return {"figure": figure, "broker": None if value is None else round(value, 3),
                "baseline": None if base is None else round(base, 3),
                "ratio": None if r is None else round(r, 4), "unit": unit, "baseline_is": what}

    return [
        row("lease requests (+cancel)", net["requests_per_s"], local["requests_per_s"], "1/s",
            "Broker facade in-process"),
        row("lease renewals", net["renewals_per_s"], local["renewals_per_s"], "1/s",
            "Broker facade in-process"),
        row("request -> RTF, median", path["p50_ms"], direct["p50_ms"], "ms",
            "2 direct service calls"),
        row("request -> RTF, p95", path["p95_ms"], direct["p95_ms"], "ms",
            "2 direct service calls"),
    ]


def check_args(args: argparse.Namespace) -> argparse.Namespace:
    """Bounds on every loop, whatever the command line asks."""
    if not 0 < args.seconds <= MAX_SECONDS:
        raise ValueError(f"--seconds must be in (0, {MAX_SECONDS:g}]")
    if not 1 <= args.runs <= MAX_RUNS:
        raise ValueError(f"--runs must be in [1, {MAX_RUNS}]")
    return args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moat bench broker", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=DEFAULT_SECONDS,
                        help=f"length of each rate window (default {DEFAULT_SECONDS:g})")
    parser.add_argument("--runs", type=int, default=DEFAULT_RUNS,
                        help=f"timed request -> RTF runs (default {DEFAULT_RUNS})")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--results", type=Path, default=None, help="results root (default ./results)")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return check_args(args)
    except ValueError as exc:
        parser.error(str(exc))
        raise  # unreachable: error() exits


# --- loops shared by both sides ------------------------------------------------------------------


def timed_loop(seconds: float, op: Callable[[], Any]) -> tuple[int, float]:
    """Call ``op`` back to back for ``seconds`` (at most :data:`MAX_OPS` times): (count, s)."""
    start = time.perf_counter()
    end = start + seconds
    count = 0
    while count < MAX_OPS and time.perf_counter() < end:
        op()
        count += 1
    return count, time.perf_counter() - start


async def atimed_loop(seconds: float, op: Callable[[], Any]) -> tuple[int, float]:
    """:func:`timed_loop` for a coroutine function."""
    start = time.perf_counter()
    end = start + seconds
    count = 0
    while count < MAX_OPS and time.perf_counter() < end:
        await op()
        count += 1
    return count, time.perf_counter() - start


# --- inside the CO host ----------------------------------------------------------------------------


def node_bench() -> None:
    """Inside ``co14``: the three measurements against the broker; one JSON line out. The
    configuration (broker, CO id, key file) comes on stdin."""
    from nodetools.co import BrokerClient, document_for, load_key

    config = json.loads(sys.stdin.readline())
    client = BrokerClient(config["broker"], config["co"],
                          load_key(Path(config["keys"]), config["co"]))
    print(json.dumps(asyncio.run(_node(client, config, document_for("text", DOCUMENT.encode())))))


async def _node(client: Any, config: dict[str, Any], document: dict[str, Any]) -> dict[str, Any]:
    seconds = float(config["seconds"])

    async def request_cancel() -> None:
        grant = await client.arequest(SERVICE, SHARE, CPU, DURATION)
        await client.acancel(grant.hops[0].lease_id)

    requests, req_s = await atimed_loop(seconds, request_cancel)
    lease = (await client.arequest(SERVICE, SHARE, CPU, DURATION)).hops[0].lease_id

    async def renew() -> None:
        await client.arenew(lease, DURATION)

    renewals, ren_s = await atimed_loop(seconds, renew)
    await client.acancel(lease)
    path_ms, direct_ms, hops = [], [], []
    for run in range(int(config["runs"]) + 1):
        t0 = time.perf_counter()
        grant = await client.arequest(TARGET, SHARE, CPU, DURATION)
        client.run_path(grant, document)
        t1 = time.perf_counter()
        client.run_path(grant, document)  # the credentials already in hand
        t2 = time.perf_counter()
        for hop in grant.hops:
            await client.acancel(hop.lease_id)
        if run:  # the first run warms the objects
            path_ms.append((t1 - t0) * 1000)
            direct_ms.append((t2 - t1) * 1000)
            hops = [h.service for h in grant.hops]
    return {"requests": requests, "requests_s": req_s, "renewals": renewals,
            "renewals_s": ren_s, "path_ms": path_ms, "direct_ms": direct_ms, "hops": hops}


# --- in this process: the baseline ---------------------------------------------------------------


def in_process(seconds: float, instances: list[dict[str, Any]]) -> dict[str, Any]:
    """The same request+cancel and renew loops on the pure Broker facade, with the same
    instances registered (no signing, no network)."""
    from agent.broker.broker import Broker
    from agent.broker.directory import Instance

    broker = Broker()
    for doc in instances:
        broker.register_from({k: v for k, v in doc.items()
                              if k in Instance.__dataclass_fields__ or k == "lifecycle"})

    def request_cancel() -> None:
        grant = broker.request(CO, SERVICE, SHARE, CPU, DURATION)
        broker.cancel(grant.hops[0].lease_id, CO)

    requests, req_s = timed_loop(seconds, request_cancel)
    lease = broker.request(CO, SERVICE, SHARE, CPU, DURATION).hops[0].lease_id
    renewals, ren_s = timed_loop(seconds, lambda: broker.renew(lease, CO, DURATION))
    return {"requests": requests, "requests_s": req_s, "requests_per_s": rate(requests, req_s),
            "renewals": renewals, "renewals_s": ren_s, "renewals_per_s": rate(renewals, ren_s)}


# --- the network ---------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    import shutil
    import tempfile

    from topologies.moatnet import MoatNetwork
    from topologies.patent import PatentTopo

    from .bench_packets import cpu_model
    from .service_path import provision_converters, publish_converters

    workdir = Path(tempfile.mkdtemp(prefix="moat-bench-broker-"))
    try:
        with MoatNetwork(PatentTopo()) as moat:
            publish_converters(moat, workdir)
            provision_converters(moat, share=100.0, cpu=1.0, names=PATH_SERVICES)
            instances = [i for s in moat.client.services() for i in s["instances"]]
            proc = moat.client.popen(CO, [sys.executable, "-c",
                                          "from experiments.bench_broker import node_bench; node_bench()"],
                                     stdin=subprocess.PIPE)
            config = {"broker": moat.client.params["broker_address"], "co": CO,
                      "keys": str(moat.run.dir / "co_keys.json"), "seconds": args.seconds,
                      "runs": args.runs}
            timeout = 2 * args.seconds + args.runs * 5 + 60
            try:
                out, err = proc.communicate((json.dumps(config) + "\n").encode(), timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                raise BenchError(f"the CO loop in {CO} took over {timeout:g}s") from None
            if proc.returncode != 0:
                raise BenchError(f"the CO loop failed: {err.decode(errors='replace')[-800:]}")
            node = json.loads(out.decode().strip().splitlines()[-1])
            run_id = moat.run.run_id
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    local = in_process(args.seconds, instances)
    network = {"requests": node["requests"], "requests_s": node["requests_s"],
               "requests_per_s": rate(node["requests"], node["requests_s"]),
               "renewals": node["renewals"], "renewals_s": node["renewals_s"],
               "renewals_per_s": rate(node["renewals"], node["renewals_s"]),
               "hops": node["hops"], "path": latency(node["path_ms"]),
               "direct": latency(node["direct_ms"]), "path_ms": node["path_ms"],
               "direct_ms": node["direct_ms"]}
    return {"benchmark": "broker", "run_id": run_id, "seconds": args.seconds, "runs": args.runs,
            "co": CO, "machine": f"{cpu_model()} x{os.cpu_count()}, Python {platform.python_version()}",
            "network": network, "in_process": local}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    t0 = time.monotonic()
    summary = run(args)
    dest = results_dir("bench_broker", summary["run_id"], args.results)
    write_json(dest / "summary.json", summary)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    net = summary["network"]
    print(f"service broker on r22b, CO {CO} on net 14 ({summary['machine']}); one message "
          f"outstanding, time.perf_counter in the CO's process")
    print(f"rates: {args.seconds:g} s windows ({net['requests']} request+cancel pairs, "
          f"{net['renewals']} renewals); latency: {net['path']['n']} runs of '{TARGET}' "
          f"({' -> '.join(net['hops'])}), LEASE_REQUEST sent -> RTF back from the 2nd hop")
    print(format_table(figure_rows(summary), FIGURE_COLUMNS))
    print(f"results in {dest}; done in {time.monotonic() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
