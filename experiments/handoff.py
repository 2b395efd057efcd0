"""The handoff experiment — ``sudo moat run handoff`` (and what ``sudo make demo`` runs).

In the patent's topology three corresponding objects, one on each network (co12 on foreign
network 12, co14 on foreign network 14, dns23 on the home network 16), each send their own
numbered requests at a fixed rate to the object ``counter`` at its home address 10.16.0.100,
while the object moves, running and with its state, home (r22c) → net 12 (r18b) → net 14
(r20a) → home, in make-before-break and break-before-make mode, for several rounds. Requests
reach it wherever it is through the home agent's GRE tunnel (proxy ARP on the home LAN, GRE
with the binding id as key on the backbone, decapsulation at the foreign agent).

Per handoff it measures, from the corresponding objects' logs (the table gives the lost
requests and the median reply latency of each CO beside the totals, and the timeline one
panel per CO: a foreign agent that kept a moved object as its visitor would show as the
requests of its own network's CO lost, issue 18):

* disruption: ms from the last reply served at the old place to the first reply served at
  the new place (0 when both overlap, as in make-before-break's bicast); at R requests/s a
  CO's gap between two replies is at least 1/R even when nothing waits (5 ms at 200/s);
* wait: ms the longest-waiting request of the move (sent from its start to the next move's)
  waited for its reply, the move's delay as a client sees it, without that floor;
* lost: requests sent between this move's start and the next move that never got a reply;
* registration: the new place's registration round trip (request sent to reply received,
  through the FOA and the HOA, as the object's client measured it);
* migration: the ``migrate`` call's wall time, request to report.

``--transfer both`` (the default) makes every move of the itinerary twice per round and
mode, once with the pre-copy transfer and once with the stop-copy baseline
(agent.hosting.migration), so the summary gives each figure beside the baseline measured in
the same run, and their ratio (this machine's speed varies about threefold between days).

``--topo scale,n_foreign=N,routers_per_net=M`` (N >= 2) runs the same on the scale topology
(:func:`plan_for`): the object moves home -> the first foreign network -> the last -> home,
watched by those two networks' COs and dns23.

Writes ``results/handoff/<run-id>/``: summary.json, handoffs.csv, one CSV of requests per
handoff, timeline.png, modes.png and pcaps of the home LAN, foreign LAN 12 and the backbone
link r22a-r18a.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from topologies.catalog import make_topo
from topologies.moatnet import MoatNetwork

from .results import copy_captures, count_events, results_dir, write_csv, write_json
from .tables import format_table

log = logging.getLogger(__name__)

OBJECT = "counter"
CO_HOST = "co14"
#: The corresponding objects of the handoff experiment: one on each network, by host.
CO_HOSTS = {"co12": "net 12", "co14": "net 14", "dns23": "home"}
ITINERARY = [("net 12", "r18b"), ("net 14", "r20a"), ("home", "r22c")]
HOME_ROUTER = "r22c"
MODES = {"mbb": "make-before-break", "bbm": "break-before-make"}


def handoff_columns(co_hosts: dict[str, str]) -> list[str]:
    """The handoff table's columns for these corresponding objects."""
    return ["n", "round", "mode", "transfer", "from", "to", "ok", "disruption_ms", "wait_ms",
            "lost", "sent", *(f"lost_{co}" for co in co_hosts),
            *(f"latency_ms_{co}" for co in co_hosts), "registration_ms", "migration_ms"]


HANDOFF_COLUMNS = handoff_columns(CO_HOSTS)


@dataclass(frozen=True)
class HandoffPlan:
    """Where the object moves and who watches it, on one topology."""

    #: Corresponding objects' hosts -> where they are ("net 12", "home").
    co_hosts: dict[str, str]
    #: (network, router) in order; the last is home.
    itinerary: list[tuple[str, str]]
    home_router: str
    #: (capture name, interface, node or None for the root namespace's bridges).
    captures: list[tuple[str, str, str | None]]


class HandoffPlanError(ValueError):
    """The topology cannot host this experiment (with the reason)."""


def plan_for(topo: Any) -> HandoffPlan:
    """The patent's plan (module constants) on its topology; on another, such as the scale
    topology (issue 15, item 5), the object goes home (r22c) -> the first foreign network's
    last router -> the last foreign network's last router -> home: two distant foreign
    networks (two backbone hops apart through the home border, as far as the star allows),
    watched by each one's CO and the home network's dns23."""
    foreign = sorted(n for n, spec in topo.networks.items() if spec.kind == "foreign")
    homes = [n for n, spec in topo.networks.items() if spec.kind == "home"]
    nodes = set(topo.router_names()) | set(topo.hosts())
    if {r for _, r in ITINERARY} | set(CO_HOSTS) <= nodes:  # the patent's networks
        return HandoffPlan(dict(CO_HOSTS), list(ITINERARY), HOME_ROUTER,
                           [("home_lan", "s16", None), ("foreign_lan_12", "s12", None),
                            ("backbone_r22a_r18a", "r22a-eth1", "r22a")])
    if len(foreign) < 2 or not homes:
        raise HandoffPlanError(f"the handoff needs two foreign networks and a home one; "
                               f"{type(topo).__name__} has foreign networks {foreign}")
    first, last = topo.networks[foreign[0]], topo.networks[foreign[-1]]
    home = topo.networks[homes[0]]
    co_first, co_last = (f"co{spec.number}" for spec in (first, last))
    for node in (co_first, co_last, "dns23", HOME_ROUTER):
        if node not in nodes:
            raise HandoffPlanError(f"no node {node} in {type(topo).__name__}")
    border = home.border or HOME_ROUTER
    link = next((i.name for i in topo.interfaces(border) if i.peer == first.routers[0]), None)
    captures = [("home_lan", home.switch, None), (f"foreign_lan_{first.number}", first.switch, None)]
    if link is not None:
        captures.append((f"backbone_{border}_{first.routers[0]}", link, border))
    return HandoffPlan({co_first: f"net {first.number}", co_last: f"net {last.number}", "dns23": "home"},
                       [(f"net {first.number}", first.routers[-1]), (f"net {last.number}", last.routers[-1]),
                        ("home", HOME_ROUTER)],
                       HOME_ROUTER, captures)
TRANSFERS = {"precopy": ["precopy"], "stop-copy": ["stop-copy"], "both": ["precopy", "stop-copy"]}
#: The baseline every figure is compared with (the old path).
BASELINE = "stop-copy"
#: The figures compared with the baseline (as new / baseline).
COMPARED = ("disruption_ms_median", "disruption_ms_worst", "wait_ms_median", "wait_ms_worst",
            "migration_ms_median")


@contextlib.contextmanager
def load_generator(moat: MoatNetwork, rate: float, duration: float, out: Path):
    """co14 sends requests for ``duration`` s (bounded) while the block runs."""
    with load_generators(moat, rate, duration, {CO_HOST: out}) as procs:
        yield procs[0]


@contextlib.contextmanager
def load_generators(moat: MoatNetwork, rate: float, duration: float, outs: dict[str, Path]):
    """Each host of ``outs`` sends its own requests (``rate`` per second each, its log to
    its path) for ``duration`` s (bounded) while the block runs."""
    procs = []
    try:
        for host, out in outs.items():
            ready = moat.run.dir / f"co-{host}.ready"
            proc = moat.net[host].popen(
                [sys.executable, "-m", "nodetools.co_load", "--dst",
                 moat.objects[OBJECT].home_address, "--rate", str(rate), "--duration",
                 str(duration), "--client", host, "--out", str(out), "--ready", str(ready)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            procs.append(proc)
            moat.wait_for(lambda: ready.exists() or proc.poll() is not None, timeout=10,
                          interval=0.01)
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()  # the generator writes its log on SIGTERM too
        for proc in procs:
            proc.communicate(timeout=30)


def read_requests(path: Path, co: str = "") -> list[dict[str, Any]]:
    """One CO's log; each request marked with ``co`` when given (several COs' logs merge)."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    if co:
        for q in rows:
            q["co"] = co
    return rows


def analyse(requests: list[dict[str, Any]], moves: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Disruption and loss per move, from the corresponding objects' logs (wall clock).

    ``lost`` and ``sent`` are totals over every CO, ``disruption_ms`` the worst CO's (None
    if some CO never heard the new place); ``lost_<co>``, ``sent_<co>``, ``disruption_ms_<co>``
    and ``latency_ms_<co>`` (median reply latency in the move's window) are each CO's."""
    cos = sorted({q.get("co", "") for q in requests})
    rows = []
    for i, move in enumerate(moves):
        start, end = move["started"], (moves[i + 1]["started"] if i + 1 < len(moves) else float("inf"))
        row = dict(move, lost=0, sent=0, disruption_ms=0.0, wait_ms=None)
        for co in cos:
            mine = [q for q in requests if q.get("co", "") == co]
            one = _one_co(mine, move, start, end)
            row["lost"] += one["lost"]
            row["sent"] += one["sent"]
            if one["wait_ms"] is not None:
                row["wait_ms"] = max(row["wait_ms"] or 0.0, one["wait_ms"])
            if one["disruption_ms"] is None or row["disruption_ms"] is None:
                row["disruption_ms"] = None
            else:
                row["disruption_ms"] = max(row["disruption_ms"], one["disruption_ms"])
            if co:
                row.update({f"{k}_{co}": v for k, v in one.items()})
        rows.append(row)
    return rows


def _one_co(requests: list[dict[str, Any]], move: dict[str, Any], start: float, end: float
            ) -> dict[str, Any]:
    replies = sorted((r["at"], r["served_by"]) for q in requests for r in q["replies"])
    window = [q for q in requests if start <= q["sent"] < end]
    old_replies = [t for t, by in replies if by == move["from"] and start - 1 <= t < end]
    new_replies = [t for t, by in replies if by == move["to"] and start <= t < end]
    last_old = max(old_replies, default=None)
    first_new = min(new_replies, default=None)
    disruption = None
    if last_old is not None and first_new is not None:
        disruption = round(max(0.0, first_new - last_old) * 1000, 2)
    latencies = [(min(r["at"] for r in q["replies"]) - q["sent"]) * 1000
                 for q in window if q["replies"]]
    return {"lost": sum(1 for q in window if not q["replies"]), "sent": len(window),
            "disruption_ms": disruption,
            "wait_ms": round(max(latencies), 2) if latencies else None,
            "latency_ms": round(statistics.median(latencies), 2) if latencies else None}


def state_survived(requests: list[dict[str, Any]],
                   moves: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The counter counted every served request exactly once, across every move (and
    across COs: each CO's requests in its own order, every count given once).

    With ``moves``, a request answered after a later one of its CO is attributed to the
    move in whose window (its start to the next move's) it was sent: in break-before-make
    a request in flight during the break (queued while its address resolved, or sent to
    the held source and back) can arrive after a newer one took the new path; the count
    is still exact. ``exact`` then asks the order only outside break-before-make windows
    (``out_of_order`` gives how many per mode)."""
    counts: dict[tuple[str, int], set] = {}
    sent: dict[tuple[str, int], float] = {}
    for q in requests:
        for r in q["replies"]:
            if r.get("ok"):
                counts.setdefault((q.get("co", ""), q["seq"]), set()).add(r["result"]["count"])
                sent[(q.get("co", ""), q["seq"])] = q["sent"]
    consistent = all(len(c) == 1 for c in counts.values())  # bicast copies agree
    ordered = [(key, next(iter(c))) for key, c in sorted(counts.items())]
    late = [a for (a, ca), (b, cb) in zip(ordered, ordered[1:]) if a[0] == b[0] and cb <= ca]
    monotonic = not late
    out_of_order: dict[str, int] = {}
    for key in late:
        mode = _mode_at(sent[key], moves or [])
        out_of_order[mode] = out_of_order.get(mode, 0) + 1
    in_order = not late if moves is None else \
        all(mode == MODES["bbm"] for mode in out_of_order)
    values = sorted(v for _, v in ordered)
    final = values[-1] if values else 0
    once = values == list(range(1, len(values) + 1))
    return {"answered": len(counts), "final_count": final,
            "consistent": consistent, "monotonic": monotonic, "out_of_order": out_of_order,
            "exact": bool(values) and once and in_order and consistent}


def _mode_at(at: float, moves: list[dict[str, Any]]) -> str:
    """The mode of the move whose window holds ``at`` ("none" before the first)."""
    mode = "none"
    for move in sorted(moves, key=lambda m: m["started"]):
        if move["started"] > at:
            break
        mode = move["mode"]
    return mode


def plot(requests: list[dict[str, Any]], moves: list[dict[str, Any]], rows: list[dict[str, Any]],
         dest: Path, co_hosts: dict[str, str] | None = None) -> list[Path]:
    co_hosts = CO_HOSTS if co_hosts is None else co_hosts
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = min((q["sent"] for q in requests), default=0.0)
    cos = sorted({q.get("co", "") for q in requests}) or [""]
    fig, axs = plt.subplots(len(cos), 1, figsize=(12, 1.2 + 3.3 * len(cos)), sharex=True,
                            squeeze=False)
    colours: dict[str, str] = {}
    for n, (ax, co) in enumerate(zip(axs[:, 0], cos)):  # one panel per CO: its own requests
        mine = [q for q in requests if q.get("co", "") == co]
        for q in mine:
            if q["replies"]:
                first = min(q["replies"], key=lambda r: r["at"])
                by = first["served_by"]
                colours.setdefault(by, f"C{len(colours)}")
                ax.plot(q["sent"] - t0, (first["at"] - q["sent"]) * 1000, ".", ms=2,
                        color=colours[by])
        lost = [q["sent"] - t0 for q in mine if not q["replies"]]
        top = max([1.0] + [(min(r["at"] for r in q["replies"]) - q["sent"]) * 1000
                           for q in mine if q["replies"]])
        if lost:
            ax.plot(lost, [top * 1.1] * len(lost), "x", color="red", ms=4, label="lost")
        for m in moves:
            ax.axvline(m["started"] - t0, color="grey", lw=0.8, ls="--")
            if n == 0:
                short = ("MBB" if m["mode"] == "make-before-break" else "BBM") + \
                    ("/pre" if m.get("transfer") == "precopy" else "")
                ax.text(m["started"] - t0, top * 1.2, f"{short}→{m['to']}", rotation=90,
                        fontsize=7, va="bottom")
        where = co_hosts.get(co, "")
        ax.set_ylabel(f"{co} ({where})\nreply latency (ms)" if co else "reply latency (ms)",
                      fontsize=8)
        if lost and n:
            ax.legend(loc="upper right", fontsize=7)
    for by, c in colours.items():
        axs[0, 0].plot([], [], ".", color=c, label=f"served by {by}")
    axs[0, 0].legend(loc="upper right", fontsize=7)
    axs[-1, 0].set_xlabel("time (s)")
    axs[0, 0].set_title("Handoff timeline: reply latency seen by each corresponding object", pad=48)
    fig.tight_layout()
    timeline = dest / "timeline.png"
    fig.savefig(timeline, dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    groups = sorted({(r["mode"], r.get("asked", "")) for r in rows})
    names = [f"{m}\n{t}" if t else m for m, t in groups]
    for ax, metric, label in ((axes[0], "disruption_ms", "disruption (ms)"), (axes[1], "lost", "requests lost")):
        mine = [[r[metric] or 0 for r in rows if (r["mode"], r.get("asked", "")) == g] for g in groups]
        med = [statistics.median(v) for v in mine]
        worst = [max(v) for v in mine]
        x = range(len(groups))
        ax.bar([i - 0.2 for i in x], med, 0.4, label="median")
        ax.bar([i + 0.2 for i in x], worst, 0.4, label="worst")
        ax.set_xticks(list(x), names, fontsize=7)
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    width = 0.8 / max(1, len(co_hosts))  # each CO's own losses, summed over the group's moves
    for k, co in enumerate(co_hosts):
        total = [sum(r.get(f"lost_{co}") or 0 for r in rows
                     if (r["mode"], r.get("asked", "")) == g) for g in groups]
        axes[2].bar([i - 0.4 + width * (k + 0.5) for i in range(len(groups))], total, width,
                    label=f"{co} ({co_hosts[co]})")
    axes[2].set_xticks(list(range(len(groups))), names, fontsize=7)
    axes[2].set_ylabel("requests lost, per CO (total)")
    axes[2].legend(fontsize=8)
    fig.suptitle("make-before-break vs break-before-make")
    fig.tight_layout()
    compare = dest / "modes.png"
    fig.savefig(compare, dpi=120)
    plt.close(fig)
    return [timeline, compare]


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm import tqdm

    modes = list(MODES.values()) if args.mode == "both" else [MODES[args.mode]]
    transfers = TRANSFERS[args.transfer]
    topo = make_topo(args.topo)
    plan = plan_for(topo)
    n_moves = args.rounds * len(modes) * len(transfers) * len(plan.itinerary)
    duration = 3 + n_moves * (args.dwell + 1.5)
    moat = MoatNetwork(topo, objects=[OBJECT], advertise_interval=args.adv_interval,
                       tunnel_backend=args.backend)
    moves: list[dict[str, Any]] = []
    with moat, contextlib.ExitStack() as stack:
        print(f"run {moat.run.run_id}: {n_moves} handoffs ({', '.join(modes)}; "
              f"{' and '.join(transfers)}; {args.rounds} rounds), {args.rate:g} requests/s from each of "
              f"{', '.join(plan.co_hosts)}; itinerary {' -> '.join(r for _, r in plan.itinerary)}")
        for name, intf, node in plan.captures:
            stack.enter_context(moat.capture(intf, name, node=node))
        if args.from_site:
            # The patent's way: the remote site provisions a VM on the home router whose
            # (signed) counter is the mobile object; every move provisions its VM at the
            # target, which fetches and verifies the code from the site itself.
            from .counter_service import publish_counter

            publish_counter(moat, "counter-svc")
            answer = moat.provision(plan.home_router, vm="counter", kind="service", service="counter-svc",
                                    mobile={"counter": OBJECT})
            if not answer.get("ok"):
                raise RuntimeError(f"provisioning the counter failed: {answer.get('error')}")
        else:
            moat.place_object(OBJECT, plan.home_router)
        moat.wait_for(lambda: moat.agent(plan.home_router).call("objects")[0]["at_home"], timeout=15,
                      interval=0.01)
        logs = {co: moat.run.dir / f"co-{co}.jsonl" for co in plan.co_hosts}
        with load_generators(moat, args.rate, duration, logs):
            time.sleep(args.dwell)  # steady state before the first move
            bar = tqdm(total=n_moves, desc="handoffs", unit="move", file=sys.stderr)
            here = plan.home_router
            for rnd in range(1, args.rounds + 1):
                for mode, transfer in ((m, t) for m in modes for t in transfers):
                    for _network, router in plan.itinerary:
                        started = time.time()
                        report = moat.client.migrate(OBJECT, router, mode, transfer=transfer)
                        finished = time.time()
                        reg = report.get("target_registration") or {}
                        # What the agent used (a VM's object and break-before-make: stop-copy).
                        moves.append({"n": len(moves) + 1, "round": rnd, "mode": mode,
                                      "asked": transfer, "transfer": report.get("transfer", transfer),
                                      "from": here,
                                      "to": router, "ok": report["ok"], "error": report["error"],
                                      "started": started, "finished": finished,
                                      "migration_ms": round((finished - started) * 1000, 1),
                                      "registration_ms": report.get("registration_rtt_ms"),
                                      "steps": report["steps"], "care_of": reg.get("care_of_address")})
                        if report["ok"]:
                            here = router
                        bar.update(1)
                        time.sleep(args.dwell)
            bar.close()
        final = moat.agent(here).call("object_stats", name=OBJECT)
        stack.close()
        dest = results_dir("handoff", moat.run.run_id, args.results)
        copy_captures(moat.run.dir / "captures", dest)
        requests = sorted((q for co, path in logs.items() for q in read_requests(path, co)),
                          key=lambda q: q["sent"])
    rows = analyse(requests, moves)
    survived = state_survived(requests, moves)
    survived["object_count"] = final["state"]["count"]
    pngs = plot(requests, moves, rows, dest, plan.co_hosts)
    write_csv(dest / "handoffs.csv", rows, handoff_columns(plan.co_hosts))
    for row in rows:
        window = [q for q in requests if row["started"] - 0.5 <= q["sent"] < row["started"] + args.dwell]
        write_csv(dest / f"handoff_{row['n']:02d}.csv",
                  [{"co": q["co"], "seq": q["seq"], "sent": q["sent"],
                    "replies": len(q["replies"]),
                    "first_reply": min((r["at"] for r in q["replies"]), default=None),
                    "served_by": ",".join(sorted({r["served_by"] for r in q["replies"]}))} for q in window],
                  ["co", "seq", "sent", "replies", "first_reply", "served_by"])
    # "modes": the moves made with the first transfer asked (pre-copy by default);
    # "baseline": those made with stop-copy in the same run; "ratio": the first over the second.
    per_mode = {mode: figures([r for r in rows if r["mode"] == mode and r["asked"] == transfers[0]],
                              plan.co_hosts)
                for mode in modes}
    baseline = {mode: figures([r for r in rows if r["mode"] == mode and r["asked"] == BASELINE],
                              plan.co_hosts)
                for mode in modes} if transfers[0] != BASELINE and BASELINE in transfers else {}
    ratio = {mode: {k: _ratio(per_mode[mode][k], baseline[mode][k]) for k in COMPARED}
             for mode in baseline}
    summary = {"experiment": "handoff", "run_id": moat.run.run_id, "rate": args.rate,
               "rounds": args.rounds, "adv_interval": args.adv_interval, "backend": args.backend,
               "from_site": args.from_site,
               "topology": args.topo, "co_hosts": plan.co_hosts,
               "itinerary": [r for _, r in plan.itinerary],
               "requests": len(requests), "transfers": transfers,
               "modes": per_mode, "baseline": baseline, "ratio": ratio,
               "state": survived, "handoffs": rows,
               "capture_events": {p.stem: count_events(p) for p in sorted((dest / "captures").glob("*.pcap"))},
               "plots": [p.name for p in pngs]}
    write_json(dest / "summary.json", summary)
    return {"summary": summary, "dest": dest}


def figures(mine: list[dict[str, Any]], co_hosts: dict[str, str] | None = None) -> dict[str, Any]:
    """One group of moves' figures: disruption, loss, the migrate call's time."""
    co_hosts = CO_HOSTS if co_hosts is None else co_hosts
    d = [r["disruption_ms"] for r in mine if r["disruption_ms"] is not None]
    w = [r["wait_ms"] for r in mine if r.get("wait_ms") is not None]
    m = [r["migration_ms"] for r in mine if r["ok"]]
    return {
        "handoffs": len(mine), "failed": sum(1 for r in mine if not r["ok"]),
        "disruption_ms_median": statistics.median(d) if d else None,
        "disruption_ms_worst": max(d) if d else None,
        "wait_ms_median": statistics.median(w) if w else None,
        "wait_ms_worst": max(w) if w else None,
        "lost_median": statistics.median([r["lost"] for r in mine]) if mine else None,
        "lost_worst": max([r["lost"] for r in mine]) if mine else None,
        "lost_total": sum(r["lost"] for r in mine),
        "migration_ms_median": statistics.median(m) if m else None,
        # Each corresponding object's own figures (its network's view of the moves).
        "by_co": {co: {
            "lost_total": sum(r.get(f"lost_{co}") or 0 for r in mine),
            "sent": sum(r.get(f"sent_{co}") or 0 for r in mine),
            "latency_ms_median": _median([r.get(f"latency_ms_{co}") for r in mine]),
            "disruption_ms_worst": max((r[f"disruption_ms_{co}"] for r in mine
                                        if r.get(f"disruption_ms_{co}") is not None),
                                       default=None),
            "wait_ms_median": _median([r.get(f"wait_ms_{co}") for r in mine]),
            "wait_ms_worst": max((r[f"wait_ms_{co}"] for r in mine
                                  if r.get(f"wait_ms_{co}") is not None), default=None),
        } for co in co_hosts},
    }


def _median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return round(statistics.median(known), 2) if known else None


def _ratio(new: float | None, old: float | None) -> float | None:
    """new / old, rounded; None when either is missing or the baseline is 0."""
    if new is None or old is None or old <= 0:
        return None
    return round(new / old, 3)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moat run handoff", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=200.0, help="requests per second (default 200)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the itinerary per mode")
    parser.add_argument("--adv-interval", type=float, default=1.0, help="agent advertisement interval (s)")
    parser.add_argument("--mode", choices=["both", "mbb", "bbm"], default="both")
    parser.add_argument("--transfer", choices=sorted(TRANSFERS), default="both",
                        help="how the state goes over: precopy, stop-copy (the old path), or both "
                             "(default: each move made both ways, the figures with their ratio)")
    parser.add_argument("--backend", choices=["auto", "userspace", "kernel", "ebpf"],
                        default="auto", help="GRE backend (auto: see agent.mobility.tunnel.AUTO_ORDER)")
    parser.add_argument("--topo", default="patent",
                        help="patent[,backbone_bw=...,...] or scale,n_foreign=N,routers_per_net=M "
                             "(N >= 2: the object moves between the first and the last foreign network)")
    parser.add_argument("--dwell", type=float, default=1.5, help="seconds between moves")
    parser.add_argument("--results", type=Path, default=None, help="results root (default ./results)")
    parser.add_argument("--from-site", action="store_true",
                        help="provision the counter from the remote site as a VM's mobile object "
                             "(each move fetches and verifies it at the target) instead of placing it")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    t0 = time.monotonic()
    out = run(args)
    summary = out["summary"]
    print()
    co_hosts = summary.get("co_hosts", CO_HOSTS)
    print(format_table(summary["handoffs"], handoff_columns(co_hosts)))
    print()
    groups = [{"mode": m, "transfer": summary["transfers"][0], **v} for m, v in summary["modes"].items()]
    groups += [{"mode": m, "transfer": BASELINE, **v} for m, v in summary["baseline"].items()]
    groups += [{"mode": m, "transfer": "ratio", **v} for m, v in summary["ratio"].items()]
    print(format_table(groups, ["mode", "transfer", "handoffs", "failed", *COMPARED,
                                "lost_median", "lost_worst", "lost_total"]))
    per_co = [{"mode": m, "co": f"{co} ({co_hosts.get(co, '')})", **f}
              for m, v in summary["modes"].items() for co, f in v["by_co"].items()]
    print()
    print(format_table(per_co, ["mode", "co", "sent", "lost_total", "latency_ms_median",
                                "disruption_ms_worst", "wait_ms_median", "wait_ms_worst"]))
    st = summary["state"]
    print(f"\ncounter state: {st['answered']} requests answered, final count {st['final_count']} "
          f"(object says {st['object_count']}); every request counted exactly once: {st['exact']}"
          + (f"; answered after a newer one of its CO, by mode: {st['out_of_order']}"
             if st.get("out_of_order") else ""))
    print(f"results in {out['dest']} ({', '.join(summary['plots'])}, summary.json, handoffs.csv, captures/)")
    print(f"done in {time.monotonic() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
