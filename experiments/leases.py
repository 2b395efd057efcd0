"""Lease-driven distribution — ``sudo moat run leases`` (patent Fig. 12, steps 208-230).

In the patent's topology the counter runs leased as the mobile object ``svc`` (home address
10.16.0.100) in a VM on r18b (foreign network 12): the service ``count-svc``, whose *primary*
instance offers 100 % of the service on 1 CPU. The service broker (on the HOA's router r22b)
grants leases on it; corresponding objects (COs) on networks 12 and 14 — the hosts' own
identities ``co12`` and ``co14`` and more identities on the same hosts, ``co12-b``, ``co14-b``
and ``co14-c``, each with its own broker key — arrive over time, each asking for about a
third of the service (and as much of its CPU), then keep a load of leased requests running
(``python -m nodetools.co_load --grant``, ``--rate`` per second: every request carries the
lease's credential, to the home address) until they finish, by cancelling the lease or by
letting it expire (the load stops 0.8 s before).

Each cycle (``--cycles``; shares, identities, hold times and endings drawn from ``--seed``):

* **A** (net 14, 28-33 %) leases the primary alone: its requests cross the backbone to the
  home network, where the HOA tunnels them to r18b's FOA (net 14 → primary: the baseline).
* **B** and **C** (net 12, 30-33 % each) lease the primary too (its own network's instance).
* **D** (net 14, 30-45 %) does not fit beside them: admission finds no room (step 208) and
  the broker asks r18b to grow the service: r18b queries every router for room, reserves it
  on r20a (the only foreign network without an instance), and starts a *duplicate* there from
  the primary's checkpoint (steps 210-222). The duplicate registers through its FOA with S:
  the HOA holds two bindings for 10.16.0.100 and bicasts. D's lease is on the duplicate.
  The duplicate also takes over A's lease (A's network now reaches only it: r20a delivers
  the home address locally), so A's later requests are answered on net 14 — the same CO's
  latency before and after the duplicate.
* **E** (net 12) asks for more than the primary has left: denied ``no_capacity`` (a CO on a
  network with an instance reaches only that one, and a duplicate never shares a network).
* B and C end one by cancel and one by expiry; so do A and D, the duplicate's last lease
  ending by cancel in some cycles and by expiry in others. The broker then releases the
  duplicate: its VM stops, its binding goes, and the next cycle starts from the primary alone.

The default rate (20 requests/s per CO) stays under the primary router's traffic rule (200
requests in 5 s, 75 % from one foreign network); from about 40/s A's load alone makes r18b
place the duplicate before D asks (reported as ``traffic rule placed a duplicate``).

What is measured, and how:

* **Exactly once**: every request of every CO's load (its log: ``seq``, send time, each reply
  with ``served_by`` and the object's ``count``) must get one reply, from the router of the
  lease's instance when it was sent (the broker's ``leases`` tell when a lease moved) — none
  with 0, none with 2 (under bicast both instances get a request from the home network; the
  one the credential does not name stays silent).
* **Counters**: per instance (router and the object process's id), the counts it returned
  are distinct and contiguous; the primary's start at 1; a duplicate's first count minus one
  is its checkpoint, which must lie between the primary's count when the growing request was
  sent and its count when the grant came back.
* **Grant latency**: ``request_ms``, from sending the LEASE_REQUEST to the grant decoded, by
  the CO's own process (``time.perf_counter`` inside the CO host; HMAC, TCP 4340 and the
  broker included). Ordinary grants against growing ones: the ratio is the cost of growing
  as the CO sees it.
* **Growth**: ``growth_ms``, the broker's own time from SERVICE_GROW sent to the duplicate's
  instance back (its ``growth`` command: query, reserve, checkpoint, fetch and verify from
  the remote site, start, registration through the FOA), with the primary router's steps;
  ``first_answer_ms``: from the growing request sent to the duplicate's first reply at that
  CO (this includes starting the load generator, about 0.3 s of Python).
* **Release**: from the duplicate's last lease ending (the cancel's answer at the CO; for an
  expiry, the broker's expiry time, from the ``remaining`` of its ``leases`` command) to the
  first sample without the duplicate's binding at the HOA: an upper bound, sampled every
  0.25 s.
* **Latency**: each reply's round trip at the CO (``co_load``'s send and receive times),
  grouped by the CO's network, the instance that served it and whether a duplicate was bound
  when it was sent: net 14 → primary (backbone, home network, GRE to net 12) against net 14 →
  duplicate (its own network).
* **Samples**, every 0.25 s in a thread: the broker's ``services`` (share used per instance)
  and ``leases`` (each one's instance and remaining time), the HOA's ``bindings`` (count and
  part of each).

Writes ``results/leases/<run-id>/``: summary.json, events.csv (the printed event table),
leases.csv (one row per lease), requests.csv (per request: CO, seq, instance, answers, RTT),
samples.csv (share per instance and bindings, every 0.25 s), shares.png, bindings.png,
latency.png and captures/ (home LAN, foreign LANs 12 and 14; the broker's and the routers'
messages decode with packets/wireshark/moat.lua).
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import dataclasses
import heapq
import json
import logging
import random
import select
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from .results import copy_captures, count_events, results_dir, write_csv, write_json
from .tables import format_table

log = logging.getLogger(__name__)

EXPERIMENT = "leases"
SERVICE = "count-svc"
#: The mobile object the service's counter runs as, and where its primary runs.
OBJECT = "svc"
PRIMARY = "r18b"
VM_NAME = "cnt"
VM_CPU = 1.0
VM_MEMORY_MB = 256
#: The counter's own resources in its archive (the VM's are :data:`VM_CPU`).
OBJECT_CPU = 0.2
#: The CO identities and the host each acts from (each has its own key in co_keys.json).
COS = {"co12": "co12", "co12-b": "co12", "co14": "co14", "co14-b": "co14", "co14-c": "co14"}
EXTRA_COS = ("co12-b", "co14-b", "co14-c")
NETWORK_OF_HOST = {"co12": "12", "co14": "14"}
#: When each role of a cycle asks (s from the cycle's start), and what the plan makes of its
#: lease; see the module docstring.
AT = {"A": 0.0, "B": 2.5, "C": 3.2, "D": 4.0, "E": 6.5}
EXPECT = {"A": "adopted", "B": "primary", "C": "primary", "D": "grows", "E": "denied"}
#: Lease length asked by COs that cancel (they cancel long before it).
CANCEL_DURATION_S = 60.0
#: A CO's load stops this long before its lease ends (an expired credential is refused).
LOAD_MARGIN_S = 0.8
#: After a cycle's last nominal end: growth delays, expiry and the duplicate's release.
CYCLE_GAP_S = 2.5
SAMPLE_S = 0.25
MAX_CYCLES = 8
MAX_RATE = 200.0
DRIVER_TIMEOUT = 40.0
SETTLE_TIMEOUT = 20.0

LEASE_COLUMNS = ["n", "cycle", "role", "t_s", "co", "net", "share", "hold", "end", "expect",
                 "outcome", "reason", "router", "part", "moved_to", "moved_s", "request_ms",
                 "growth_ms", "ended", "ended_s", "sent", "once", "none", "more",
                 "rtt_ms_median"]
EVENT_COLUMNS = ["t_s", "event", "co", "instance", "detail"]
REQUEST_COLUMNS = ["n", "co", "net", "cycle", "lease_router", "lease_part", "expected", "seq",
                   "sent_s", "answers", "served_by", "instance", "ok", "count", "rtt_ms",
                   "phase"]
SAMPLE_COLUMNS = ["t_s", "instance", "router", "part", "used_share", "share", "leases",
                  "bindings", "binding_parts", "care_of"]
GROWTH_COLUMNS = ["n", "co", "router", "growth_ms", "request_ms", "ordinary_ms", "ratio",
                  "binding_s", "first_answer_ms"]
RELEASE_COLUMNS = ["instance", "leases", "last_end", "last_end_s", "binding_gone_s",
                   "release_ms", "directory_gone_s"]
INSTANCE_COLUMNS = ["served_by", "process", "part", "answers", "first", "last", "distinct",
                    "contiguous", "checkpoint", "checkpoint_ok", "consistent"]
LATENCY_COLUMNS = ["net", "instance", "phase", "answered", "rtt_ms_median", "rtt_ms_p90",
                   "rtt_ms_min"]


class ExperimentError(RuntimeError):
    """The experiment could not run (the service not provisioned, a CO driver gone silent)."""


# --- the plan (pure) ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One CO's lease in the plan: asked at ``at`` (s from the start) by ``co`` (acting from
    ``host``) for ``share`` % and ``cpu`` cores, used for ``hold`` s from its grant, then
    ended by ``end`` (``cancel`` or ``expire``). ``expect``: what the plan makes of it
    (``primary``; ``adopted``: on the primary, then taken over by the duplicate on its CO's
    network; ``grows``: the lease that does not fit; ``denied``)."""

    n: int
    cycle: int
    role: str
    at: float
    co: str
    host: str
    share: float
    cpu: float
    hold: float
    end: str
    expect: str

    @property
    def duration(self) -> float:
        """The lease length asked: its hold when it ends by expiry, else a long one."""
        return self.hold if self.end == "expire" else CANCEL_DURATION_S

    @property
    def net(self) -> str:
        return NETWORK_OF_HOST[self.host]


def _cpu(share: float) -> float:
    return round(share / 100.0 * VM_CPU, 3)


def plan_cycles(cycles: int, seed: int) -> list[Step]:
    """``cycles`` cycles of the module docstring's roles A-E, each starting once the previous
    one's leases have all ended, with shares, identities, hold times and endings drawn from
    ``seed``. The shares make the plan's outcome certain: A, B and C fit the primary
    together, D does not fit beside them (the growth), A and D fit one instance, and E asks
    more than the primary has left."""
    if not 1 <= cycles <= MAX_CYCLES:
        raise ValueError(f"--cycles must be in [1, {MAX_CYCLES}], not {cycles}")
    rng = random.Random(seed)
    offset = rng.randint(0, 1)
    net12 = [c for c, h in COS.items() if h == "co12"]
    net14 = [c for c, h in COS.items() if h == "co14"]
    steps: list[Step] = []
    start = 0.0
    for cycle in range(1, cycles + 1):
        c12, c14 = net12[:], net14[:]
        rng.shuffle(c12)
        rng.shuffle(c14)
        who = {"A": c14[0], "B": c12[0], "C": c12[1], "D": c14[1], "E": c12[rng.randint(0, 1)]}
        share = {"A": round(rng.uniform(28, 33), 1), "B": round(rng.uniform(30, 33), 1),
                 "C": round(rng.uniform(30, 33), 1), "D": round(rng.uniform(30, 45), 1)}
        share["E"] = round(100.0 - share["B"] - share["C"] + rng.uniform(5, 10), 1)
        end: dict[str, float] = {}
        way: dict[str, str] = {}
        ways = ["cancel", "expire"]
        rng.shuffle(ways)
        for role, w in zip(("B", "C"), ways):
            end[role], way[role] = round(rng.uniform(9.0, 11.0), 2), w
        # The duplicate's last lease ends by cancel and by expiry in alternate cycles.
        last_way = ("cancel", "expire")[(cycle + offset) % 2]
        first_role, last_role = rng.sample(["A", "D"], 2)
        end[first_role] = round(rng.uniform(8.0, 9.0), 2)
        way[first_role] = "expire" if last_way == "cancel" else "cancel"
        end[last_role], way[last_role] = round(rng.uniform(11.5, 12.5), 2), last_way
        end["E"], way["E"] = AT["E"] + 2.0, "cancel"  # denied: never held
        for role in sorted(who):
            at = round(start + AT[role], 2)
            steps.append(Step(len(steps) + 1, cycle, role, at, who[role], COS[who[role]],
                              share[role], _cpu(share[role]), round(end[role] - AT[role], 2),
                              way[role], EXPECT[role]))
        start = round(start + max(end.values()) + CYCLE_GAP_S, 2)
    return steps


# --- analysis (pure) ------------------------------------------------------------------------


def router_of(instance_id: str | None) -> str | None:
    """The router of a broker instance id (``r20a/cnt-d9ba9@37f8b2cd``)."""
    return instance_id.split("/", 1)[0] if instance_id else None


def median(values: Iterable[float]) -> float | None:
    values = [v for v in values if isinstance(v, (int, float))]
    return round(statistics.median(values), 3) if values else None


def percentile(values: Iterable[float], q: float) -> float | None:
    values = sorted(v for v in values if isinstance(v, (int, float)))
    if not values:
        return None
    return round(values[min(len(values) - 1, int(q * len(values)))], 3)


def sample_from(t: float, services: list[dict[str, Any]], bindings: list[dict[str, Any]],
                leases: list[dict[str, Any]]) -> dict[str, Any]:
    """One sample from the broker's ``services`` and ``leases`` and the HOA's ``bindings``."""
    return {"t_s": round(t, 3),
            "instances": [{"instance_id": i["instance_id"], "router": i.get("router"),
                           "part": i.get("part", "primary"), "used_share": i.get("used_share"),
                           "share": i.get("share"), "leases": i.get("leases")}
                          for s in services if s.get("service") == SERVICE
                          for i in s["instances"]],
            "bindings": [{"care_of_address": b.get("care_of_address"), "part": b.get("part"),
                          "gre_key": b.get("gre_key")} for b in bindings],
            "leases": {row["lease_id"]: {"remaining": row.get("remaining"),
                                         "instance": row.get("instance")} for row in leases}}


def sample_rows(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The samples as CSV rows: one per instance per sample, with that sample's bindings."""
    rows = []
    for s in samples:
        binds = s["bindings"]
        common = {"t_s": s["t_s"], "bindings": len(binds),
                  "binding_parts": ",".join(str(b["part"]) for b in binds),
                  "care_of": ",".join(str(b["care_of_address"]) for b in binds)}
        for i in s["instances"] or [{}]:
            rows.append(dict(common, instance=i.get("instance_id"), router=i.get("router"),
                             part=i.get("part"), used_share=i.get("used_share"),
                             share=i.get("share"), leases=i.get("leases")))
    return rows


def duplicate_bound(samples: list[dict[str, Any]]) -> list[tuple[float, bool]]:
    """(time, a duplicate's binding present) per sample, in time order."""
    return [(s["t_s"], any(b["part"] == "duplicate" for b in s["bindings"])) for s in samples]


#: What the HOA held when a request was sent (the latest sample before it).
ONE_BINDING, TWO_BINDINGS = "primary bound", "duplicate bound too"


def phase_at(bound: list[tuple[float, bool]], t: float) -> str:
    """:data:`TWO_BINDINGS` if the latest sample at or before ``t`` saw a duplicate's
    binding at the HOA, else :data:`ONE_BINDING`."""
    i = bisect.bisect_right([x for x, _ in bound], t) - 1
    return TWO_BINDINGS if i >= 0 and bound[i][1] else ONE_BINDING


def lease_history(samples: list[dict[str, Any]]) -> dict[str, list[tuple[float, str]]]:
    """Per lease, (time, instance id) of every sample that listed it: the broker moves a
    lease to a new instance on its CO's network (adoption)."""
    out: dict[str, list[tuple[float, str]]] = defaultdict(list)
    for s in samples:
        for lid, info in s["leases"].items():
            out[lid].append((s["t_s"], info["instance"]))
    return out


def instance_at(history: list[tuple[float, str]], t: float, granted: str) -> str:
    """The lease's instance at ``t``: the last sample at or before it that listed the lease,
    else the grant's."""
    before = [iid for at, iid in history if at <= t]
    return before[-1] if before else granted


def expected_routers(history: list[tuple[float, str]], t: float, granted: str,
                     slack: float = 2 * SAMPLE_S) -> set[str]:
    """Routers that may rightly answer a request sent at ``t``: the lease's instance then,
    and any it had within ``slack`` s (a move between two samples)."""
    near = {iid for at, iid in history if abs(at - t) <= slack}
    return {str(router_of(i)) for i in near | {instance_at(history, t, granted)}}


def request_rows(lease: dict[str, Any], records: list[dict[str, Any]], t0: float,
                 bound: list[tuple[float, bool]],
                 history: list[tuple[float, str]] = ()) -> list[dict[str, Any]]:
    """Per request of one lease's load (``co_load`` records): answers, who served, RTT, and
    the lease's instance when it was sent (``history``: :func:`lease_history`)."""
    history = list(history)
    rows = []
    for r in records:
        replies = sorted(r.get("replies") or [], key=lambda x: x["at"])
        first = replies[0] if replies else {}
        result = first.get("result") if isinstance(first.get("result"), dict) else {}
        sent = r["sent"] - t0
        now = router_of(instance_at(history, sent, lease["instance_id"]))
        rows.append({"n": lease["n"], "co": lease["co"], "net": lease["net"],
                     "cycle": lease["cycle"], "lease_router": now,
                     "lease_part": "primary" if now == PRIMARY else "duplicate",
                     "expected": ",".join(sorted(expected_routers(history, sent,
                                                                  lease["instance_id"]))),
                     "seq": r["seq"], "sent_s": round(sent, 4),
                     "answers": len(replies),
                     "served_by": ",".join(str(x.get("served_by")) for x in replies) or None,
                     "instance": ",".join(str(x.get("instance")) for x in replies) or None,
                     "ok": all(x.get("ok") is True for x in replies) if replies else None,
                     "count": result.get("count"),
                     "rtt_ms": round((first["at"] - r["sent"]) * 1000, 3) if replies else None,
                     "first_at_s": round(first["at"] - t0, 4) if replies else None,
                     "phase": phase_at(bound, sent)})
    return rows


def exactly_once(requests: list[dict[str, Any]]) -> dict[str, Any]:
    """Replies per request: once, none, more; answered by another instance than the lease's;
    refused (an error reply); the unanswered ones by (CO network, lease's instance, phase)."""
    out = {"sent": len(requests), "once": 0, "none": 0, "more": 0, "wrong_instance": 0,
           "refused": 0}
    unanswered: Counter[str] = Counter()
    by_co: dict[str, Counter[str]] = defaultdict(Counter)
    for q in requests:
        n = q["answers"]
        key = "once" if n == 1 else "none" if n == 0 else "more"
        out[key] += 1
        by_co[q["co"]][key] += 1
        if n == 0:
            unanswered[f"net {q['net']} -> {q['lease_part']} on {q['lease_router']} "
                       f"({q['phase']})"] += 1
        allowed = set(str(q.get("expected") or q["lease_router"]).split(","))
        if n and any(s not in allowed for s in str(q["served_by"]).split(",")):
            out["wrong_instance"] += 1
        if n and q["ok"] is False:
            out["refused"] += 1
    out["exact"] = bool(requests) and out["once"] == out["sent"] and not out["wrong_instance"] \
        and not out["refused"]
    out["unanswered"] = dict(sorted(unanswered.items()))
    out["by_co"] = {co: dict(c) for co, c in sorted(by_co.items())}
    return out


def ended_times(leases: list[dict[str, Any]], samples: list[dict[str, Any]]) -> None:
    """Fill ``ended``/``ended_s`` of granted leases not cancelled: expired at the broker's
    expiry time (the last sample that saw it plus its ``remaining``), if it was seen gone."""
    for lease in leases:
        if lease["outcome"] != "granted" or lease.get("ended") == "cancelled":
            continue
        seen = [(s["t_s"], s["leases"][lease["lease_id"]]["remaining"]) for s in samples
                if lease["lease_id"] in s["leases"]]
        if not seen:
            continue
        last_t, remaining = seen[-1]
        if any(s["t_s"] > last_t for s in samples):
            lease["ended"] = "expired"
            lease["ended_s"] = round(last_t + (remaining or 0.0), 3)


def parts_of(samples: list[dict[str, Any]]) -> dict[str, str]:
    """Instance id -> part, as the broker's directory listed them."""
    return {i["instance_id"]: i["part"] for s in samples for i in s["instances"]}


def growth_rows(leases: list[dict[str, Any]], growth: list[dict[str, Any]],
                requests: list[dict[str, Any]], samples: list[dict[str, Any]],
                t0: float) -> list[dict[str, Any]]:
    """Per growth the broker made: its time, the growing lease's request_ms against the
    median of ordinary grants, when the HOA showed the duplicate's binding and when the CO
    had its first answer from the duplicate (s and ms from the growing request sent)."""
    ordinary = median(l["request_ms"] for l in leases
                      if l["outcome"] == "granted" and not l.get("grew"))
    bound = duplicate_bound(samples)
    rows = []
    for g in growth:
        lease = next((l for l in leases if l.get("instance_id") == g.get("instance")
                      and l.get("grew")), None)
        row: dict[str, Any] = {"n": lease["n"] if lease else None,
                               "co": lease["co"] if lease else None,
                               "router": g.get("router"), "growth_ms": g.get("ms"),
                               "error": g.get("error"), "at_s": round(g["at"] - t0, 3),
                               "steps": g.get("steps", []), "ordinary_ms": ordinary}
        if lease is not None:
            row.update(request_ms=lease["request_ms"], start_s=lease["t_s"],
                       end_s=lease["granted_at_s"])
            if ordinary:
                row["ratio"] = round(lease["request_ms"] / ordinary, 1)
            seen = next((t for t, dup in bound if dup and t >= lease["t_s"]), None)
            row["binding_s"] = None if seen is None else round(seen - lease["t_s"], 3)
            firsts = [q["first_at_s"] for q in requests
                      if q["n"] == lease["n"] and q["first_at_s"] is not None]
            if firsts:
                row["first_answer_ms"] = round((min(firsts) - lease["t_s"]) * 1000, 1)
        rows.append(row)
    return rows


def release_rows(leases: list[dict[str, Any]], samples: list[dict[str, Any]]) -> list[dict]:
    """Per duplicate: how its last lease ended, and when its binding left the HOA and the
    instance left the broker's directory (first sample without), ms after that end."""
    parts = parts_of(samples)
    rows = []
    for iid, part in parts.items():
        if part != "duplicate":
            continue
        mine = [l for l in leases if l["outcome"] == "granted"
                and (l.get("final_instance") or l.get("instance_id")) == iid]
        ended = [l for l in mine if l.get("ended_s") is not None]
        row: dict[str, Any] = {"instance": iid, "leases": len(mine)}
        if ended and len(ended) == len(mine):
            last = max(ended, key=lambda l: l["ended_s"])
            end = last["ended_s"]
            row.update(last_end=last["ended"], last_end_s=end)
            present = [s["t_s"] for s in samples
                       if any(i["instance_id"] == iid for i in s["instances"])]
            after = [s for s in samples if s["t_s"] >= end]
            gone = next((s["t_s"] for s in after
                         if not any(b["part"] == "duplicate" for b in s["bindings"])), None)
            left = next((s["t_s"] for s in samples if present and s["t_s"] > present[-1]),
                        None)
            row.update(binding_gone_s=gone, directory_gone_s=left,
                       release_ms=None if gone is None else round((gone - end) * 1000, 1))
        rows.append(row)
    return rows


def instance_rows(requests: list[dict[str, Any]], growths: list[dict[str, Any]],
                  primary: str = PRIMARY) -> list[dict[str, Any]]:
    """Per instance that answered (router and object process): the counts it returned are
    distinct and contiguous; the primary's start at 1; a duplicate starts from a checkpoint
    between the primary's count when its growing request was sent and when it was granted.
    ``growths`` need ``start_s`` and ``end_s`` (the growing request's send and grant)."""
    groups: dict[tuple[str, str], list[tuple[float, int]]] = defaultdict(list)
    for q in requests:
        if q["answers"] == 1 and q["ok"] and isinstance(q["count"], int):
            groups[(q["served_by"], q["instance"])].append((q["first_at_s"], q["count"]))
    prim = sorted(v for (by, _), vs in groups.items() if by == primary for v in vs)
    rows = []
    for (by, process), answers in sorted(groups.items(), key=lambda kv: min(kv[1])[0]):
        counts = [c for _, c in answers]
        first_t = min(t for t, _ in answers)
        row: dict[str, Any] = {"served_by": by, "process": process,
                               "part": "primary" if by == primary else "duplicate",
                               "answers": len(counts), "first": min(counts),
                               "last": max(counts), "first_s": first_t,
                               "distinct": len(set(counts)) == len(counts),
                               "contiguous": max(counts) - min(counts) + 1 == len(counts)}
        if by == primary:
            row["checkpoint"] = 0
            row["checkpoint_ok"] = min(counts) == 1
        else:
            g = max((g for g in growths if g.get("start_s") is not None
                     and g["start_s"] <= first_t), key=lambda g: g["start_s"], default=None)
            checkpoint = min(counts) - 1
            row["checkpoint"] = checkpoint
            if g is None:
                row["checkpoint_ok"] = None
            else:
                lo = max((c for t, c in prim if t < g["start_s"]), default=0)
                hi = max((c for t, c in prim if t <= g["end_s"]), default=0)
                row["checkpoint_ok"] = lo <= checkpoint <= hi
                row["checkpoint_bounds"] = [lo, hi]
        row["consistent"] = bool(row["distinct"] and row["contiguous"] and row["checkpoint_ok"])
        rows.append(row)
    return rows


def latency_rows(requests: list[dict[str, Any]], primary: str = PRIMARY) -> list[dict]:
    """Median, 90th percentile and minimum RTT of answered requests by the CO's network, the
    instance that served them and whether a duplicate was bound when they were sent."""
    groups: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for q in requests:
        if q["answers"] >= 1 and q["rtt_ms"] is not None:
            by = str(q["served_by"]).split(",")[0]
            part = "primary" if by == primary else "duplicate"
            groups[(q["net"], f"{part} ({by})", q["phase"])].append(q["rtt_ms"])
    return [{"net": net, "instance": inst, "phase": phase, "answered": len(v),
             "rtt_ms_median": median(v), "rtt_ms_p90": percentile(v, 0.9),
             "rtt_ms_min": min(v)}
            for (net, inst, phase), v in sorted(groups.items())]


def sample_events(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Instances entering and leaving the broker's directory and bindings appearing and
    going at the HOA, at the first sample that showed the change."""
    events = []
    prev_inst: dict[str, dict[str, Any]] = {}
    prev_bind: set[tuple[str, str]] = set()
    for s in samples:
        inst = {i["instance_id"]: i for i in s["instances"]}
        binds = {(str(b["care_of_address"]), str(b["part"])) for b in s["bindings"]}
        for iid in sorted(set(inst) - set(prev_inst)):
            events.append({"t_s": s["t_s"], "event": "instance listed by the broker",
                           "instance": iid, "detail": inst[iid]["part"]})
        for iid in sorted(set(prev_inst) - set(inst)):
            events.append({"t_s": s["t_s"], "event": "instance left the directory",
                           "instance": iid, "detail": prev_inst[iid]["part"]})
        for care_of, part in sorted(binds - prev_bind):
            events.append({"t_s": s["t_s"], "event": "binding at the HOA",
                           "detail": f"{part} via {care_of} ({len(binds)} bound)"})
        for care_of, part in sorted(prev_bind - binds):
            events.append({"t_s": s["t_s"], "event": "binding gone",
                           "detail": f"{part} via {care_of} ({len(binds)} bound)"})
        prev_inst, prev_bind = inst, binds
    return events


def lease_events(leases: list[dict[str, Any]], growth: list[dict[str, Any]]) -> list[dict]:
    """Grants, denials, cancels and expiries of the plan's leases, and the broker's growths."""
    events = []
    for l in leases:
        if l["outcome"] == "granted":
            detail = f"{l['share']:g}% for {l['hold']:g} s, {l['request_ms']:.1f} ms"
            if l.get("grew"):
                detail += f" (grew: {l.get('growth_ms')} ms)"
            events.append({"t_s": l["t_s"], "event": f"lease {l['role']} -> {l['part']}",
                           "co": l["co"], "instance": l["instance_id"], "detail": detail})
            if l.get("moved_s") is not None:
                events.append({"t_s": l["moved_s"], "event": f"lease {l['role']} moved",
                               "co": l["co"], "instance": l["final_instance"],
                               "detail": f"taken over from {l['router']} (CO's network)"})
            if l.get("ended_s") is not None:
                events.append({"t_s": l["ended_s"], "event": f"lease {l['role']} {l['ended']}",
                               "co": l["co"],
                               "instance": l.get("final_instance") or l["instance_id"],
                               "detail": f"after {l['ended_s'] - l['t_s']:.1f} s"})
        else:
            events.append({"t_s": l["t_s"], "event": f"lease {l['role']} denied", "co": l["co"],
                           "detail": f"{l['share']:g}%: {l.get('reason')}: "
                                     f"{str(l.get('detail') or '').split(',')[0][:80]}"})
    for g in growth:
        what = f"duplicate on {g.get('router')}" if g.get("instance") else f"failed: {g.get('error')}"
        events.append({"t_s": g["at_s"], "event": "growth", "instance": g.get("instance"),
                       "detail": f"{what} in {g.get('ms')} ms"})
    return events


def first_answer_events(instances: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"t_s": i["first_s"], "event": f"first answer from the {i['part']}",
             "instance": f"{i['served_by']} ({i['process']})", "detail": f"count {i['first']}"}
            for i in instances]


def event_rows(*groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """All events in time order, times rounded for the table."""
    rows = [dict(e, t_s=round(e["t_s"], 2)) for g in groups for e in g]
    return sorted(rows, key=lambda e: e["t_s"])


def as_planned(lease: dict[str, Any]) -> bool:
    """Whether the lease came out as the plan expected (``expect``)."""
    expect, granted = lease.get("expect"), lease["outcome"] == "granted"
    if expect == "denied":
        return not granted
    if not granted:
        return False
    if expect == "grows":
        return bool(lease.get("grew"))
    if expect == "adopted":
        return lease["part"] == "primary" and lease.get("moved_to") not in (None, PRIMARY)
    return lease["part"] == expect and not lease.get("moved_to")


def summarise(leases: list[dict[str, Any]], requests: list[dict[str, Any]],
              growths: list[dict[str, Any]], releases: list[dict[str, Any]],
              instances: list[dict[str, Any]], samples: list[dict[str, Any]],
              primary_count: int | None = None) -> dict[str, Any]:
    """The figures the report prints (see the module docstring for how each is measured)."""
    granted = [l for l in leases if l["outcome"] == "granted"]
    ordinary = [l["request_ms"] for l in granted if not l.get("grew")]
    growing = [l["request_ms"] for l in granted if l.get("grew")]
    ord_med, grow_med = median(ordinary), median(growing)
    lat = latency_rows(requests)

    def rtt(net: str, part: str, phase: str | None = None) -> float | None:
        values = [q["rtt_ms"] for q in requests if q["answers"] >= 1 and q["net"] == net
                  and (q["served_by"] == PRIMARY) == (part == "primary")
                  and (phase is None or q["phase"] == phase) and q["rtt_ms"] is not None]
        return median(values)

    primary_rows = [i for i in instances if i["part"] == "primary"]
    if primary_count is not None and primary_rows:
        primary_rows[0]["object_count"] = primary_count
        primary_rows[0]["consistent"] = primary_rows[0]["consistent"] and \
            primary_rows[0]["last"] <= primary_count
    return {
        "requests": exactly_once(requests),
        "leases": {"asked": len(leases), "granted": len(granted),
                   "denied": len(leases) - len(granted),
                   "on": dict(Counter(l["part"] for l in granted)),
                   "moved": sum(1 for l in granted if l.get("moved_to")),
                   "denials": dict(Counter(l.get("reason") for l in leases
                                           if l["outcome"] != "granted")),
                   "as_planned": sum(1 for l in leases if as_planned(l)),
                   "grew": sum(1 for l in granted if l.get("grew")),
                   "ended": dict(Counter(l.get("ended") or "open" for l in granted))},
        "grant_ms": {"ordinary_median": ord_med, "growing_median": grow_med,
                     "ratio": round(grow_med / ord_med, 1) if ord_med and grow_med else None},
        "growth_ms_median": median(g.get("growth_ms") for g in growths if not g.get("error")),
        "growth_failed": sum(1 for g in growths if g.get("error")),
        "first_answer_ms_median": median(g.get("first_answer_ms") for g in growths),
        "release_ms_max": max((r["release_ms"] for r in releases
                               if r.get("release_ms") is not None), default=None),
        "releases": {"total": len(releases),
                     "by": dict(Counter(r.get("last_end") or "not released" for r in releases))},
        "counters_consistent": bool(instances) and all(i["consistent"] for i in instances),
        "rtt_ms": {"net14_to_primary": rtt("14", "primary", ONE_BINDING),
                   "net14_to_duplicate": rtt("14", "duplicate"),
                   "net12_to_primary": rtt("12", "primary")},
        "max_bindings": max((len(s["bindings"]) for s in samples), default=0),
        "max_instances": max((len(s["instances"]) for s in samples), default=0),
        "latency": lat,
    }


def summary_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The headline figures as a two-column table."""
    q, ls, g = summary["requests"], summary["leases"], summary["grant_ms"]
    rtt = summary["rtt_ms"]
    rows = [("requests sent", q["sent"]), ("answered exactly once", q["once"]),
            ("unanswered", q["none"]), ("answered twice or more", q["more"]),
            ("answered by another instance", q["wrong_instance"]),
            ("refused (error reply)", q["refused"]),
            ("leases granted / denied", f"{ls['granted']} / {ls['denied']}"),
            ("leases as the plan expected", f"{ls['as_planned']} of {ls['asked']}"),
            ("leases granted on primary / duplicate", f"{ls['on'].get('primary', 0)} / "
                                                      f"{ls['on'].get('duplicate', 0)}"),
            ("leases taken over by a duplicate on the CO's network", ls["moved"]),
            ("denials", ", ".join(f"{k}: {v}" for k, v in sorted(ls["denials"].items()))
             or "none"),
            ("leases ended by cancel / expiry", f"{ls['ended'].get('cancelled', 0)} / "
                                                f"{ls['ended'].get('expired', 0)}"),
            ("growths (duplicates placed)", ls["grew"]),
            ("grant ms, ordinary (median)", g["ordinary_median"]),
            ("grant ms, growing (median)", g["growing_median"]),
            ("growing / ordinary", g["ratio"]),
            ("growth ms at the broker (median)", summary["growth_ms_median"]),
            ("growing request -> first duplicate answer ms (median)",
             summary["first_answer_ms_median"]),
            ("duplicates released (by last lease's end)",
             ", ".join(f"{k}: {v}" for k, v in sorted(summary["releases"]["by"].items()))),
            ("release: last lease end -> binding gone ms (max, sampled)",
             summary["release_ms_max"]),
            ("RTT ms net 14 -> primary (median)", rtt["net14_to_primary"]),
            ("RTT ms net 14 -> duplicate (median)", rtt["net14_to_duplicate"]),
            ("RTT ms net 12 -> primary (median)", rtt["net12_to_primary"]),
            ("bindings at the HOA (max)", summary["max_bindings"]),
            ("instances in the directory (max)", summary["max_instances"]),
            ("counters consistent per instance", summary["counters_consistent"])]
    return [{"what": w, "value": v} for w, v in rows]


def format_report(events: list[dict[str, Any]], full: dict[str, Any]) -> str:
    """What the experiment prints: the event table, growths, releases, instances, latency,
    the summary table and the verdict line."""
    s = full["summary"]
    q = s["requests"]
    parts = [format_table(events, EVENT_COLUMNS), "",
             "growths:", format_table(full["growths"], GROWTH_COLUMNS), "",
             "releases:", format_table(full["releases"], RELEASE_COLUMNS), "",
             "instances (counts they returned):",
             format_table(full["instances"], INSTANCE_COLUMNS), "",
             "round trips at the COs:", format_table(s["latency"], LATENCY_COLUMNS), "",
             format_table(summary_rows(s), ["what", "value"]), ""]
    verdict = (f"{q['sent']} leased requests: {q['once']} answered exactly once, "
               f"{q['none']} unanswered, {q['more']} answered twice or more; "
               f"every request answered exactly once by its lease's instance: {q['exact']}")
    if q["unanswered"]:
        verdict += "\nunanswered: " + "; ".join(f"{k}: {v}" for k, v in q["unanswered"].items())
    parts.append(verdict)
    return "\n".join(parts)


# --- plots (pure: files from data) -------------------------------------------------------------


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _instance_label(iid: str, part: str) -> str:
    return f"{part} {iid.split('@')[0]}"


def _mark_growths(ax: Any, growths: list[dict[str, Any]], releases: list[dict[str, Any]]) -> None:
    for g in growths:
        ax.axvline(g["at_s"], color="C3", lw=0.8, ls="--")
    for r in releases:
        if r.get("last_end_s") is not None:
            ax.axvline(r["last_end_s"], color="C2", lw=0.8, ls=":")


def plot_shares(samples: list[dict[str, Any]], growths: list[dict[str, Any]],
                releases: list[dict[str, Any]], dest: Path) -> Path:
    """Share used of each instance over time (the broker's ``services``)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(11, 4))
    lines: dict[str, list[tuple[float, float]]] = {}
    parts: dict[str, str] = {}
    for s in samples:
        for i in s["instances"]:
            lines.setdefault(i["instance_id"], []).append((s["t_s"], i["used_share"] or 0.0))
            parts[i["instance_id"]] = i["part"]
    for k, (iid, points) in enumerate(sorted(lines.items(), key=lambda kv: kv[1][0][0])):
        ax.step([t for t, _ in points], [u for _, u in points], where="post",
                lw=2 if parts[iid] == "primary" else 1.4,
                color="C0" if parts[iid] == "primary" else f"C{1 + k % 8}",
                label=_instance_label(iid, parts[iid]))
    ax.axhline(100, color="grey", ls=":", lw=0.8, label="capacity")
    _mark_growths(ax, growths, releases)
    ax.set_ylim(0, 110)
    ax.set_ylabel("share used (%)")
    ax.set_xlabel("time (s); red dashed: growth asked; green dotted: a duplicate's last lease ended")
    ax.set_title(f"Share of {SERVICE} held by leases per instance (broker's 'services', "
                 f"every {SAMPLE_S:g} s)")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    path = dest / "shares.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_bindings(samples: list[dict[str, Any]], growths: list[dict[str, Any]],
                  releases: list[dict[str, Any]], dest: Path) -> Path:
    """Bindings of the object's home address at the HOA over time, by part."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(11, 3))
    t = [s["t_s"] for s in samples]
    prim = [sum(1 for b in s["bindings"] if b["part"] != "duplicate") for s in samples]
    dup = [sum(1 for b in s["bindings"] if b["part"] == "duplicate") for s in samples]
    ax.fill_between(t, 0, prim, step="post", color="C0", alpha=0.6, label="primary")
    ax.fill_between(t, prim, [p + d for p, d in zip(prim, dup)], step="post", color="C1",
                    alpha=0.7, label="duplicate")
    _mark_growths(ax, growths, releases)
    ax.set_ylim(0, max([2.5] + [p + d + 0.5 for p, d in zip(prim, dup)]))
    ax.set_yticks(range(0, int(ax.get_ylim()[1]) + 1))
    ax.set_ylabel("bindings")
    ax.set_xlabel("time (s)")
    ax.set_title(f"Bindings of {OBJECT}'s home address at the HOA (bicast while 2)")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    path = dest / "bindings.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_latency(requests: list[dict[str, Any]], latency: list[dict[str, Any]],
                 growths: list[dict[str, Any]], releases: list[dict[str, Any]],
                 dest: Path) -> Path:
    """Each request's RTT over time by the CO's network and the instance that served it;
    unanswered ones as red crosses; medians per group below."""
    plt = _pyplot()
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(11, 6.5),
                                 gridspec_kw={"height_ratios": [2.2, 1]})
    groups: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for q in requests:
        if q["answers"] >= 1 and q["rtt_ms"] is not None:
            by = str(q["served_by"]).split(",")[0]
            part = "primary" if by == PRIMARY else "duplicate"
            groups[f"net {q['net']} -> {part} ({by})"].append((q["sent_s"], q["rtt_ms"]))
    for k, (label, points) in enumerate(sorted(groups.items())):
        ax.plot([t for t, _ in points], [r for _, r in points], ".", ms=2.5, color=f"C{k}",
                label=label)
    top = max([1.0] + [r for pts in groups.values() for _, r in pts])
    lost = [q["sent_s"] for q in requests if q["answers"] == 0]
    if lost:
        ax.plot(lost, [top * 1.08] * len(lost), "x", color="red", ms=3,
                label=f"unanswered ({len(lost)})")
    _mark_growths(ax, growths, releases)
    ax.set_yscale("log")
    ax.set_ylabel("round trip (ms)")
    ax.set_xlabel("time (s)")
    ax.set_title("Leased requests at the COs: round trip by network and serving instance")
    ax.legend(fontsize=7, loc="upper right", markerscale=3)
    labels = [f"net {r['net']} -> {r['instance']}\n{r['phase']}" for r in latency]
    bx.bar(range(len(latency)), [r["rtt_ms_median"] or 0 for r in latency], color="C0",
           label="median")
    bx.plot(range(len(latency)), [r["rtt_ms_p90"] or 0 for r in latency], "_", ms=18,
            color="C3", label="90th percentile")
    bx.set_xticks(range(len(latency)), labels, fontsize=7)
    bx.set_ylabel("RTT (ms)")
    bx.legend(fontsize=7)
    fig.tight_layout()
    path = dest / "latency.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_all(requests: list[dict[str, Any]], full: dict[str, Any], samples: list[dict],
             dest: Path) -> list[Path]:
    """Every plot, or none (with a warning) where matplotlib is missing."""
    try:
        _pyplot()
    except ImportError as exc:
        log.warning("no plots: %s", exc)
        return []
    g, r = full["growths"], full["releases"]
    return [plot_shares(samples, g, r, dest), plot_bindings(samples, g, r, dest),
            plot_latency(requests, full["summary"]["latency"], g, r, dest)]


# --- the CO driver (runs inside a CO host) -------------------------------------------------------


def co_driver() -> None:
    """Inside a CO host: JSON lines on stdin (``request``, ``cancel``, ``quit``), one JSON
    answer per line on stdout, each timed by this process. Keys come from the run's key file
    (never a command line)."""
    from nodetools.co import BrokerClient, load_key

    config = json.loads(sys.stdin.readline())
    clients = {co: BrokerClient(config["broker"], co, load_key(Path(config["keys"]), co))
               for co in config["cos"]}
    for line in sys.stdin:
        op = json.loads(line)
        if op["op"] == "quit":
            break
        print(json.dumps(_driver_op(clients[op["co"]], op)), flush=True)


def _driver_op(client: Any, op: dict[str, Any]) -> dict[str, Any]:
    """One operation of :func:`co_driver`: ``ms`` by ``time.perf_counter``, ``sent_at`` and
    ``done_at`` by the wall clock (to match the load generators' logs)."""
    from nodetools.co import CoError

    sent_at, t0 = time.time(), time.perf_counter()
    try:
        if op["op"] == "cancel":
            out: dict[str, Any] = {"ok": True, "lease_id": client.cancel(op["lease_id"])}
        else:
            grant = client.request(SERVICE, op["share"], op["cpu"], op["duration"])
            out = {"ok": True, "grant": grant.as_dict()}
    except CoError as exc:
        out = exc.as_dict()
    ms = round((time.perf_counter() - t0) * 1000, 3)
    return dict(out, ms=ms, sent_at=sent_at, done_at=time.time())


class Driver:
    """The main process's end of one host's :func:`co_driver` (a child inside the host)."""

    def __init__(self, client: Any, host: str, cos: list[str]) -> None:
        self.host = host
        self.proc = client.popen(host, [sys.executable, "-c",
                                        "from experiments.leases import co_driver; co_driver()"],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE)
        self._send({"broker": client.params["broker_address"], "cos": cos,
                    "keys": str(client.run.dir / "co_keys.json")})

    def _send(self, doc: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(doc) + "\n").encode())
        self.proc.stdin.flush()

    def ask(self, op: dict[str, Any], timeout: float = DRIVER_TIMEOUT) -> dict[str, Any]:
        """Send one operation and read its answer (bounded by ``timeout``)."""
        self._send(op)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else b""
        if not line:
            err = self.proc.stderr.read1(4000) if self.proc.poll() is not None and self.proc.stderr else b""
            raise ExperimentError(f"the CO driver in {self.host} did not answer {op['op']}: "
                                  f"{err.decode(errors='replace')[-500:]}")
        return json.loads(line)

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._send({"op": "quit"})
        try:
            self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()


# --- the network side ----------------------------------------------------------------------------


class Sampler(threading.Thread):
    """Every :data:`SAMPLE_S`: the broker's ``services`` and ``leases`` and the HOA's
    ``bindings``, against the run's wall clock (``t0``)."""

    def __init__(self, client: Any, hoa: str, t0: float) -> None:
        super().__init__(name="leases-sampler", daemon=True)
        self.client = client
        self.hoa = hoa
        self.t0 = t0
        self.samples: list[dict[str, Any]] = []
        self.failed = 0
        self._halt = threading.Event()

    def sample(self) -> dict[str, Any] | None:
        from agent.core.errors import ControlError

        t = time.time() - self.t0
        try:
            s = sample_from(t, self.client.services(), self.client.call(self.hoa, "bindings"),
                            self.client.leases())
        except (ControlError, OSError) as exc:
            self.failed += 1
            log.debug("sample at %.2f s failed: %s", t, exc)
            return None
        self.samples.append(s)
        return s

    def run(self) -> None:
        start = time.monotonic()
        k = 0
        while not self._halt.is_set():
            self.sample()
            k += 1
            self._halt.wait(max(0.0, start + k * SAMPLE_S - time.monotonic()))

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)

    def latest(self) -> dict[str, Any] | None:
        return self.samples[-1] if self.samples else None


def provision_primary(moat: Any) -> dict[str, Any]:
    """Publish the counter as ``count-svc`` and provision it leased on r18b as the mobile
    object ``svc`` (the primary); wait until the broker lists it."""
    from .counter_service import publish_counter

    publish_counter(moat, SERVICE, cpu=OBJECT_CPU)
    answer = moat.provision(PRIMARY, vm=VM_NAME, kind="service", service=SERVICE,
                            mobile={"counter": OBJECT}, leased=True,
                            resources={"cpu": VM_CPU, "memory_mb": VM_MEMORY_MB, "pids": 64})
    if not answer.get("ok"):
        raise ExperimentError(f"provisioning {SERVICE} on {PRIMARY} failed: {answer.get('error')}")
    moat.wait_for(lambda: any(s["service"] == SERVICE for s in moat.client.services()), 20, 0.1)
    return answer


def lease_row(step: Step, answer: dict[str, Any], t0: float) -> dict[str, Any]:
    """A lease of the plan from its CO driver's answer (times from ``t0``, wall clock)."""
    row: dict[str, Any] = {"n": step.n, "cycle": step.cycle, "role": step.role, "co": step.co,
                           "host": step.host, "net": step.net, "share": step.share,
                           "cpu": step.cpu, "hold": step.hold, "end": step.end,
                           "duration": step.duration, "expect": step.expect,
                           "t_s": round(answer["sent_at"] - t0, 3),
                           "request_ms": answer.get("ms"),
                           "granted_at_s": round(answer["done_at"] - t0, 3)}
    if not answer.get("ok"):
        return dict(row, outcome="denied", reason=answer.get("reason"),
                    detail=answer.get("detail") or answer.get("error"), router=None,
                    part=None, instance_id=None, lease_id=None)
    hop = answer["grant"]["hops"][0]
    return dict(row, outcome="granted", reason=None, instance_id=hop["instance"],
                router=router_of(hop["instance"]), lease_id=hop["lease_id"],
                granted_s=hop["granted_s"], part=None)


def execute(moat: Any, steps: list[Step], rate: float, progress: Any) -> dict[str, Any]:
    """Run the plan: each lease at its time from its CO's host, its load started at once,
    its cancel (if it cancels) ``hold`` s after its grant; sample throughout; then wait
    (bounded) until every lease has ended and the duplicate's binding is gone."""
    from agent.core.wait import WaitTimeout, wait_until

    client = moat.client
    drivers: dict[str, Driver] = {}
    leases: list[dict[str, Any]] = []
    loads: list[dict[str, Any]] = []
    by_n = {s.n: s for s in steps}
    rows_by_n: dict[int, dict[str, Any]] = {}
    t0 = time.time()
    sampler = Sampler(client, moat.hoa, t0)
    settled = False
    try:
        for host in sorted(set(COS.values())):
            drivers[host] = Driver(client, host, [co for co, h in COS.items() if h == host])
        sampler.start()
        queue = [(s.at, 0, s.n, "request") for s in steps]
        heapq.heapify(queue)
        while queue:
            at, _, n, kind = heapq.heappop(queue)
            time.sleep(max(0.0, t0 + at - time.time()))
            step = by_n[n]
            driver = drivers[step.host]
            if kind == "cancel":
                row = rows_by_n[n]
                answer = driver.ask({"op": "cancel", "co": step.co, "lease_id": row["lease_id"]})
                row.update(ended="cancelled" if answer.get("ok") else "cancel refused",
                           ended_s=round(answer["done_at"] - t0, 3), cancel_ms=answer.get("ms"))
                continue
            answer = driver.ask({"op": "request", "co": step.co, "share": step.share,
                                 "cpu": step.cpu, "duration": step.duration})
            row = lease_row(step, answer, t0)
            leases.append(row)
            rows_by_n[n] = row
            if row["outcome"] == "granted":
                client.keep_grant(step.host, answer["grant"])
                proc, out = client.leased_load(row["lease_id"], rate,
                                               max(0.5, step.hold - LOAD_MARGIN_S),
                                               client=f"{step.co}-{step.n}")
                loads.append({"n": n, "proc": proc, "out": out})
                if step.end == "cancel":
                    heapq.heappush(queue, (row["granted_at_s"] + step.hold, 1, n, "cancel"))
            progress.update(1)

        def quiet() -> bool:
            s = sampler.latest()
            return s is not None and s["t_s"] > max(l["granted_at_s"] for l in leases) \
                and not s["leases"] and len(s["bindings"]) == 1 and len(s["instances"]) == 1

        try:
            wait_until(quiet, SETTLE_TIMEOUT, interval=SAMPLE_S, what="every lease ended")
            settled = True
        except WaitTimeout:
            log.warning("leases or the duplicate still there %.0f s after the plan",
                        SETTLE_TIMEOUT)
        time.sleep(2 * SAMPLE_S)  # a last sample or two of the quiet state
    finally:
        sampler.stop()
        for driver in drivers.values():
            driver.close()
        for load in loads:
            try:
                _, err = load["proc"].communicate(timeout=20)
            except subprocess.TimeoutExpired:
                load["proc"].terminate()  # it writes its log on SIGTERM too
                _, err = load["proc"].communicate(timeout=10)
            if load["proc"].returncode:
                log.warning("load of lease %d failed: %s", load["n"],
                            err.decode(errors="replace")[-300:])
    return {"t0": t0, "leases": leases, "loads": loads, "samples": sampler.samples,
            "sample_failures": sampler.failed, "settled": settled}


def analyse(out: dict[str, Any], growth: list[dict[str, Any]], read_load: Any,
            primary_count: int | None = None,
            placements: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """Every figure of the run from what :func:`execute` gathered, the broker's ``growth``
    history, the load logs (``read_load(path)``), the primary's final count and the
    duplicates its router placed by the traffic rule."""
    t0, leases, samples = out["t0"], out["leases"], out["samples"]
    parts = parts_of(samples)
    grown = {g.get("instance"): g for g in growth if g.get("instance")}
    for l in leases:
        if l["outcome"] == "granted":
            l["part"] = parts.get(l["instance_id"]) or ("primary" if l["router"] == PRIMARY
                                                        else "duplicate")
            # The lease that made the duplicate: the first one granted on it.
            g = grown.get(l["instance_id"])
            l["grew"] = g is not None and l is next(
                x for x in leases if x.get("instance_id") == l["instance_id"])
            l["growth_ms"] = g.get("ms") if l["grew"] and g else None
    ended_times(leases, samples)
    bound = duplicate_bound(samples)
    history = lease_history(samples)
    for l in leases:
        if l["outcome"] != "granted":
            continue
        seen = history.get(l["lease_id"], [])
        l["final_instance"] = seen[-1][1] if seen else l["instance_id"]
        moved = next((t for t, iid in seen if iid != l["instance_id"]), None)
        if moved is not None:
            l["moved_to"], l["moved_s"] = router_of(l["final_instance"]), moved
    requests: list[dict[str, Any]] = []
    by_n = {l["n"]: l for l in leases}
    for load in out["loads"]:
        lease = by_n[load["n"]]
        requests += request_rows(lease, read_load(load["out"]), t0, bound,
                                 history.get(lease["lease_id"], []))
    for l in leases:
        mine = [q for q in requests if q["n"] == l["n"]]
        l.update(sent=len(mine), once=sum(1 for q in mine if q["answers"] == 1),
                 none=sum(1 for q in mine if q["answers"] == 0),
                 more=sum(1 for q in mine if q["answers"] > 1),
                 rtt_ms_median=median(q["rtt_ms"] for q in mine))
    growth_history = [dict(g, at_s=round(g["at"] - t0, 3)) for g in growth]
    growths = growth_rows(leases, growth, requests, samples, t0)
    releases = release_rows(leases, samples)
    instances = instance_rows(requests, growths)
    summary = summarise(leases, requests, growths, releases, instances, samples, primary_count)
    traffic = [{"t_s": p["at"] - t0, "event": "traffic rule placed a duplicate",
                "instance": p.get("router"), "detail": f"requests from {p.get('network')}"}
               for p in placements]
    events = event_rows(lease_events(leases, growth_history), sample_events(samples),
                        first_answer_events(instances), traffic)
    return {"leases": leases, "requests": requests, "growths": growths, "releases": releases,
            "instances": instances, "summary": summary, "events": events}


def message_counts(pcaps: Iterable[Path]) -> dict[str, dict[str, Any]]:
    """Per capture: MOAT control messages by type (moat.lua) and the protocol events."""
    import shutil

    from .service_path import broker_message_counts

    if shutil.which("tshark") is None:
        return {}
    return {p.stem: {"moat": broker_message_counts(p), "events": count_events(p)}
            for p in pcaps}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm import tqdm

    from topologies.catalog import make_topo
    from topologies.moatnet import MoatNetwork

    steps = plan_cycles(args.cycles, args.seed)
    topo = make_topo(args.topo)
    moat = MoatNetwork(topo, objects=[OBJECT])
    for co in EXTRA_COS:  # more CO identities, each with its own key, on the same hosts
        moat.keyring.add_co(co)
    with moat, contextlib.ExitStack() as stack:
        print(f"run {moat.run.run_id}: {len(steps)} leases of {SERVICE} in {args.cycles} "
              f"cycle(s) from {', '.join(COS)}, "
              f"{args.rate:g} requests/s each (primary on {PRIMARY}, broker on {moat.broker}, "
              f"seed {args.seed})")
        for name, bridge in (("home_lan", "s16"), ("foreign_lan_12", "s12"),
                             ("foreign_lan_14", "s14")):
            stack.enter_context(moat.capture(bridge, name))
        provision_primary(moat)
        bar = tqdm(total=len(steps), desc="leases", unit="lease", file=sys.stderr)
        out = execute(moat, steps, args.rate, bar)
        bar.close()
        growth = moat.client.call(moat.broker, "growth")
        try:  # duplicates the traffic rule placed (none expected at the default rate)
            placements = moat.client.call(PRIMARY, "room").get("placements", [])
        except Exception as exc:  # noqa: BLE001 - a figure missing, not the run
            log.warning("no traffic placements from %s: %s", PRIMARY, exc)
            placements = []
        try:
            stats = moat.client.call(PRIMARY, "object_stats", name=OBJECT)
            primary_count = int(stats["state"]["count"])
        except Exception as exc:  # noqa: BLE001 - a figure missing, not the run
            log.warning("no final count from the primary: %s", exc)
            primary_count = None
        stack.close()
        dest = results_dir(EXPERIMENT, moat.run.run_id, args.out)
        copy_captures(moat.run.dir / "captures", dest)
        full = analyse(out, growth, moat.client.read_load, primary_count, placements)
    samples = out["samples"]
    summary = dict(full["summary"], settled=out["settled"],
                   sample_failures=out["sample_failures"], samples=len(samples),
                   traffic_placements=len(placements))
    full["summary"] = summary
    pngs = plot_all(full["requests"], full, samples, dest)
    write_csv(dest / "events.csv", full["events"], EVENT_COLUMNS)
    write_csv(dest / "leases.csv", full["leases"], LEASE_COLUMNS + ["instance_id", "lease_id"])
    write_csv(dest / "requests.csv", full["requests"], REQUEST_COLUMNS)
    write_csv(dest / "samples.csv", sample_rows(samples), SAMPLE_COLUMNS)
    doc = {"experiment": EXPERIMENT, "run_id": moat.run.run_id, "seed": args.seed,
           "cycles": args.cycles, "rate": args.rate, "topo": args.topo,
           "service": SERVICE, "object": OBJECT, "primary": PRIMARY,
           "vm": {"cpu": VM_CPU, "memory_mb": VM_MEMORY_MB},
           "plan": [dict(dataclasses.asdict(s), duration=s.duration) for s in steps],
           "summary": summary, "growths": full["growths"], "releases": full["releases"],
           "instances": full["instances"], "leases": full["leases"],
           "traffic_placements": [dict(p, at_s=round(p["at"] - out["t0"], 3))
                                  for p in placements],
           "captures": message_counts(sorted((dest / "captures").glob("*.pcap"))),
           "plots": [p.name for p in pngs]}
    write_json(dest / "summary.json", doc)
    return {"summary": doc, "events": full["events"], "dest": dest}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moat run leases", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=3,
                        help=f"cycles of arrivals, growth and release (default 3, at most "
                             f"{MAX_CYCLES}; about 15 s each)")
    parser.add_argument("--rate", type=float, default=20.0,
                        help=f"leased requests per second of each CO (default 20, at most "
                             f"{MAX_RATE:g}; from about 40 the traffic rule places the "
                             f"duplicate before the lease that does not fit)")
    parser.add_argument("--seed", type=int, default=1,
                        help="seed of the shares, identities, hold times and endings")
    parser.add_argument("--topo", default="patent",
                        help="patent[,backbone_bw=...,...] (the roles assume the patent's routers)")
    parser.add_argument("--out", type=Path, default=None, help="results root (default ./results)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 1 <= args.cycles <= MAX_CYCLES:
        parser.error(f"--cycles must be in [1, {MAX_CYCLES}]")
    if not 0 < args.rate <= MAX_RATE:
        parser.error(f"--rate must be in (0, {MAX_RATE:g}]")
    if args.topo.split(",")[0].strip() != "patent":
        parser.error("--topo must be the patent's topology (patent[,param=value...])")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    t0 = time.monotonic()
    out = run(args)
    print()
    print(format_report(out["events"], out["summary"]))
    caps = out["summary"]["captures"]
    if caps:
        print("control messages decoded by moat.lua: " + "; ".join(
            f"{k}: " + ", ".join(f"{t} {n}" for t, n in v["moat"].items())
            for k, v in caps.items()))
    print(f"results in {out['dest']} ({', '.join(out['summary']['plots'])}, summary.json, "
          "events.csv, leases.csv, requests.csv, samples.csv, captures/)")
    print(f"done in {time.monotonic() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
