"""``moat run attacks``: the network, the captures, the classes in order, the results.

Builds the patent's topology with the attacker host ``att12`` on net 12, runs the object
``counter`` away from home on r18b (registered through the FOA r18a, bound at the HOA r22b),
makes the traffic a run normally has (service requests from co12, a migration r18b -> r22c
-> r18b, a CO's lease request) while capturing net 12, the home LAN and the backbone, then
runs each attack class from att12 and writes ``results/attacks/<run-id>/summary.json``
(:mod:`.report`). Exit status 1 if any class does not hold.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import logging
import platform
import sys
import time
from typing import Any

from agent.core.errors import AgentError
from topologies.client import BrokerRefusal
from topologies.errors import TopologyError
from topologies.moatnet import MoatNetwork
from topologies.patent import ATTACKER_HOST, PatentTopo

from ..results import results_dir, write_csv, write_json
from . import classes, state, wire
from .catalog import ORDER, SHORT
from .report import build_summary, table

log = logging.getLogger(__name__)

VICTIM, HOSTING, FOA, THIRD = "counter", "r18b", "r18a", "r20a"
CAPTURES = (("foreign_lan_12", "s12", None), ("home_lan", "s16", None),
            ("backbone_r22a_r18a", "r22a-eth1", "r22a"))
ROW_COLUMNS = ["name", "holds", "target", "sent", "expected", "observed", "refused",
               "state_unchanged", "alive", "rss_before_kib", "rss_after_kib", "defence"]


def _binding_at(moat: MoatNetwork, care_of: str) -> bool:
    try:
        return any(b.get("care_of_address") == care_of for b in moat.client.call(moat.hoa, "bindings"))
    except AgentError:
        return False


def normal_traffic(moat: MoatNetwork, ctx: classes.Context, migrate: bool) -> dict[str, Any]:
    """What a run does anyway, so there is something to capture and replay."""
    steps: dict[str, Any] = {}
    moat.place_object(VICTIM, HOSTING)
    moat.wait_for(lambda: any(b.get("home_address") == ctx.home
                              for b in moat.client.call(moat.hoa, "bindings")), timeout=20)
    steps["requests"] = ctx.legit_requests(10)
    if migrate:
        for router in ("r22c", HOSTING):
            report = moat.migrate(VICTIM, router)
            steps[f"migrate_{router}"] = report.get("ok")
            if router == HOSTING:
                moat.wait_for(lambda: moat.where(VICTIM) == HOSTING
                              and len(moat.client.call(moat.hoa, "bindings")) == 1, timeout=20)
    with contextlib.suppress(BrokerRefusal, TopologyError):
        moat.client.lease_request(ctx.co_host, "nosuch-service", 10, 0.1)  # refused, but on the wire
    steps["registration"] = ctx.legit_registration()
    time.sleep(1.0)
    return steps


def harvest(ctx: classes.Context) -> None:
    """The registration requests and in-band messages the captures hold so far."""
    hosting, hoa = ctx.addr(HOSTING), ctx.addr(ctx.hoa)
    rrq: list[bytes] = []
    relayed: list[bytes] = []
    ports: list[int] = []
    control: list[tuple[str, str, bytes]] = []
    for pcap in sorted(ctx.captures.glob("*.pcap")):
        try:
            if pcap.stem == "foreign_lan_12":
                mine = [(p, sport) for s, _d, p, sport in wire.udp_payloads(pcap, 434)
                        if s == hosting and p[:1] == b"\x01"]
                rrq += [p for p, _ in mine]
                ports += [sport for _, sport in mine]
            if pcap.stem.startswith("backbone"):
                relayed += [p for _s, d, p, _sp in wire.udp_payloads(pcap, 434) if d == hoa and p[:1] == b"\x01"]
            control += wire.control_messages(pcap)
        except Exception as exc:  # noqa: BLE001 - a pcap still being written may end mid-packet
            log.warning("reading %s: %s", pcap, exc)
    seen = set()
    ctx.captured["rrq"] = rrq
    ctx.captured["relayed"] = relayed
    ctx.captured["rrq_sport"] = ports[-1] if ports else 434
    ctx.captured["control"] = [c for c in control if not (c[2] in seen or seen.add(c[2]))]


def positive_control(ctx: classes.Context) -> bool:
    """The suite can see an acceptance: an authentic VM_NEGOTIATE query, signed with the run's
    key for the hosting router, sent from att12, is answered ok. Without this, a suite whose
    messages never arrived would look like one whose messages were all refused."""
    msg = wire.hmac_signed(wire.ControlType.VM_NEGOTIATE, {"action": "query", "home_address": ctx.home},
                           classes.router_key(ctx), ctx.addr(HOSTING))
    out = ctx.attack("tcp", {"dst": ctx.addr(HOSTING), "port": 4340, "payloads": [msg.hex()], "timeout": 8})
    answer = out["results"][0].get("answer") or {}
    if answer.get("ok") is not True:
        log.warning("positive control refused: %s", out["results"][0])
    return answer.get("ok") is True


def run(args: argparse.Namespace) -> dict[str, Any]:
    names = [n for n in ORDER if n in (args.classes.split(",") if args.classes else
                                       (SHORT if args.short else ORDER))]
    unknown = set(args.classes.split(",")) - set(ORDER) if args.classes else set()
    if unknown:
        raise SystemExit(f"unknown attack classes {sorted(unknown)}; known: {', '.join(ORDER)}")
    started = time.monotonic()
    moat = MoatNetwork(PatentTopo(attacker=True), objects=[VICTIM])
    with moat, contextlib.ExitStack() as stack:
        print(f"run {moat.run.run_id}: {len(names)} attack classes from {ATTACKER_HOST}", flush=True)
        capture_dir = moat.run.dir / "captures"
        for name, intf, node in CAPTURES:
            stack.enter_context(moat.capture(intf, name, node=node))
        ctx = classes.Context(moat.client, ATTACKER_HOST, moat.client.address(ATTACKER_HOST), VICTIM,
                              HOSTING, FOA, moat.hoa, THIRD, capture_dir, fuzz_count=args.fuzz,
                              flood_scale=args.flood_scale)
        steps = normal_traffic(moat, ctx, migrate="in_band_replay" in names or "wire_secrets" in names)
        harvest(ctx)
        positive = positive_control(ctx)
        baseline = {"idle_rss_kib": {r: state.agent_rss(moat.client, r) for r in moat.client.routers()},
                    "traffic": steps, "captured_rrq": len(ctx.captured["rrq"]),
                    "captured_relayed": len(ctx.captured["relayed"]),
                    "captured_control": len(ctx.captured["control"]),
                    "positive_control": positive,
                    "machine": f"{platform.machine()} x{__import__('os').cpu_count()}, "
                               f"Python {platform.python_version()}"}
        rows = []
        for name in names:
            fn, target_attr, keys, heard = classes.ATTACKS[name]
            if name == "wire_secrets":
                stack.close()  # captures complete before the scan
            print(f"  {name} ...", flush=True)
            row = classes.run_class(ctx, name, fn, getattr(ctx, target_attr), keys, heard)
            print(f"    {'holds' if row.holds else 'DOES NOT HOLD'}: {row.observed}", flush=True)
            rows.append(row)
        summary = build_summary(moat.run.run_id, rows, baseline, "short" if args.short else "full",
                                datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                                time.monotonic() - started)
    out = results_dir("attacks", summary["run_id"], args.out)
    write_json(out / "summary.json", summary)
    write_csv(out / "rows.csv", summary["rows"], ROW_COLUMNS)
    summary["dir"] = str(out)
    return summary


def print_summary(summary: dict[str, Any]) -> None:
    print(table(summary["rows"]))
    idle = summary["baseline"]["idle_rss_kib"]
    print("\nagent memory (MiB): idle baseline -> after the class, for each class's target")
    for r in summary["rows"]:
        base = idle.get(r["target"])
        if base and r["rss_after_kib"]:
            print(f"  {r['name']:24} {r['target']:5} idle {base / 1024:6.1f}  before "
                  f"{(r['rss_before_kib'] or 0) / 1024:6.1f}  after {r['rss_after_kib'] / 1024:6.1f}"
                  f"  (x{r['rss_after_kib'] / base:.2f} of idle)")
    for r in summary["rows"]:
        if not r["holds"]:
            print(f"NOT HELD {r['name']}: lacks {r['defence']}")
    print(f"{len(summary['held'])}/{len(summary['rows'])} classes hold; "
          f"{summary['duration_s']} s; {summary.get('dir')}/summary.json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moat run attacks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", help=f"comma-separated classes (default all: {', '.join(ORDER)})")
    parser.add_argument("--short", action="store_true", help="the test's short variant: a few classes")
    parser.add_argument("--fuzz", type=int, default=100_000, help="fuzzed messages (default 100000)")
    parser.add_argument("--flood-scale", type=float, default=1.0,
                        help="multiply every flood's size (1.0: 20,000 datagrams, 300 connections)")
    parser.add_argument("--out", type=lambda p: __import__("pathlib").Path(p), default=None,
                        help="results root (default results/)")
    args = parser.parse_args(argv)
    if args.fuzz < 0 or args.flood_scale <= 0:
        parser.error("--fuzz must be >= 0 and --flood-scale > 0")
    summary = run(args)
    print_summary(summary)
    return 0 if summary["holds"] else 1


if __name__ == "__main__":
    sys.exit(main())
