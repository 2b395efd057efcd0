"""The registration tour (``sudo moat run tour``): an object leaves home and comes back.

In the patent's topology (Figs. 1 and 6) the object ``counter`` (home address 10.16.0.100,
home object agent r22b) starts at home on r22c, moves to router r18b on foreign network 12,
then to r20a on foreign network 14, then home again. At each place its registration client
discovers the local agents from their advertisements and registers through a foreign object
agent (Fig. 11); the HOA's binding table, the FOA's visitor list and proxy ARP on the home
LAN follow. Everything crosses the emulated network as real packets, captured on the home
LAN, on foreign LAN 12 and on the backbone link r22a-r18a.

It prints a table per step and writes ``results/tour/<run-id>/``: summary.json, steps.csv
and the pcaps. Only the object's registration client moves here (the control plane alone);
the handoff experiment moves the running object and its traffic.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from pathlib import Path
from typing import Any

from topologies.moatnet import MoatNetwork
from topologies.patent import PatentTopo

from .results import copy_captures, count_events, results_dir, write_csv, write_json
from .tables import format_table

log = logging.getLogger(__name__)

OBJECT = "counter"
HOA = "r22b"
ITINERARY = [("home", "r22c"), ("net 12", "r18b"), ("net 14", "r20a"), ("home", "r22c")]
STEP_COLUMNS = ["step", "network", "router", "agent", "care_of_address", "care_of_name", "code",
                "rtt_ms", "settle_ms", "hoa_bindings", "proxy_arp_mac"]


def _settled(moat: MoatNetwork, router: str, at_home: bool) -> dict[str, Any] | None:
    """The object's status once its move is complete (registered away, or home and clean)."""
    obj = next(o for o in moat.agent(router).call("objects") if o["name"] == OBJECT)
    bindings = moat.agent(HOA).call("bindings")
    if at_home:
        return obj if obj["at_home"] and not bindings else None
    reg = obj["registration"]
    if reg and any(b["care_of_address"] == reg["care_of_address"] for b in bindings):
        return obj
    return None


def move(moat: MoatNetwork, step: int, network: str, router: str) -> dict[str, Any]:
    """Run the object's client on ``router`` and wait until the HOA agrees where it is."""
    previous = moat.where(OBJECT)
    if previous is not None:
        moat.agent(previous).call("object_stop", name=OBJECT, deregister=False)
    start = time.monotonic()
    moat.start_object(OBJECT, router)
    at_home = network == "home"
    obj = moat.wait_for(lambda: _settled(moat, router, at_home), timeout=20, interval=0.01)
    settle = time.monotonic() - start
    attempt = obj["attempts"][-1] if obj["attempts"] else {}
    reg = obj["registration"] or {}
    mac = moat.probe("r22a", "arp", "r22a-eth0", moat.objects[OBJECT].home_address, "--timeout", "1")["mac"]
    return {
        "step": step, "network": network, "router": router,
        "agent": reg.get("agent") or ("HOA direct" if at_home else None),
        "care_of_address": reg.get("care_of_address"), "care_of_name": reg.get("care_of_name"),
        "code": attempt.get("code"), "rtt_ms": None if attempt.get("rtt") is None else round(attempt["rtt"] * 1000, 3),
        "settle_ms": round(settle * 1000, 1), "hoa_bindings": len(moat.agent(HOA).call("bindings")),
        "proxy_arp_mac": mac,
    }


def run(adv_interval: float, out_root: Path | None) -> dict[str, Any]:
    moat = MoatNetwork(PatentTopo(), objects=[OBJECT], advertise_interval=adv_interval)
    steps: list[dict[str, Any]] = []
    with moat, contextlib.ExitStack() as captures:
        print(f"run {moat.run.run_id}: PatentTopo up, agents on {', '.join(moat.topo.router_names())}")
        print(f"  HOA {HOA} (home LAN 10.16.0.0/21), FOAs {', '.join(moat.foreign_agents)}; "
              f"object {OBJECT} home address {moat.objects[OBJECT].home_address}")
        pcaps = {
            "home_lan": captures.enter_context(moat.capture("s16", "home_lan")),
            "foreign_lan_12": captures.enter_context(moat.capture("s12", "foreign_lan_12")),
            "backbone_r22a_r18a": captures.enter_context(moat.capture("r22a-eth1", "backbone_r22a_r18a", node="r22a")),
        }
        for i, (network, router) in enumerate(ITINERARY, 1):
            row = move(moat, i, network, router)
            steps.append(row)
            print(f"  step {i}: {OBJECT} on {router} ({network}): "
                  + (f"registered via {row['agent']} as {row['care_of_name']}, RRQ->RRP {row['rtt_ms']} ms"
                     if network != "home" else "at home, bindings removed")
                  + f"; ARP for its home address answered by {row['proxy_arp_mac'] or 'nobody'}")
        hoa_mac = moat.net[HOA].intfs[0].MAC()
        captures.close()
        dest = results_dir("tour", moat.run.run_id, out_root)
        copied = copy_captures(moat.run.dir / "captures", dest)
    events = {p.stem: count_events(p) for p in copied}
    summary = {"experiment": "tour", "run_id": moat.run.run_id, "object": OBJECT,
               "advertise_interval": adv_interval, "hoa_mac": hoa_mac, "steps": steps,
               "capture_events": events}
    write_json(dest / "summary.json", summary)
    write_csv(dest / "steps.csv", steps, STEP_COLUMNS)
    return {"summary": summary, "dest": dest, "pcaps": pcaps}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moat run tour", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adv-interval", type=float, default=1.0, help="advertisement interval (s)")
    parser.add_argument("--results", type=Path, default=None, help="results root (default ./results)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    t0 = time.monotonic()
    out = run(args.adv_interval, args.results)
    summary = out["summary"]
    print()
    print(format_table(summary["steps"], STEP_COLUMNS))
    print(f"\n(HOA r22b's MAC is {summary['hoa_mac']}: while the object is away, ARP for its "
          "home address is answered by the HOA — proxy ARP)")
    print("\nwhat the captures show (tshark counts):")
    rows = [{"capture": k, **v} for k, v in summary["capture_events"].items()]
    print(format_table(rows, ["capture", "advertisements", "solicitations", "registration_requests",
                              "registration_replies", "arp_replies", "gratuitous_arp"]))
    print(f"\nresults in {out['dest']} (summary.json, steps.csv, captures/*.pcap); "
          f"done in {time.monotonic() - t0:.1f} s")
    print("open a capture: wireshark -X lua_script:packets/wireshark/moat.lua "
          f"{out['dest']}/captures/home_lan.pcap")
    return 0


if __name__ == "__main__":
    sys.exit(main())
