"""Lease-driven distribution — ``sudo moat run leases`` (patent Fig. 12, steps 208-230):
moving all of a service (*duplicates*) and moving a part of it (*secondaries*), and placing
a duplicate near the service's traffic (*the traffic rule*: "optimize the path of the
service").

In the patent's topology the service ``pair-svc`` runs leased in a VM on r18b (foreign
network 12), its *primary* instance offering 100 % of the service on 1 CPU. It has two
objects: the counter, which runs as the mobile object ``svc`` (home address 10.16.0.100), and
a part, ``tally`` (another counter), which runs beside it at 10.16.0.224, an address of
``svc``'s mobile network prefix 10.16.0.224/30 (the HOA holds one binding, ``svc``'s, with
the prefix). The service broker (on the HOA's router r22b) grants leases on the service
(target ``pair-svc``: served by the counter at the home address) or on the part (target
``tally``: served at the part's address). Corresponding objects (COs) — the hosts' own
identities ``co12``, ``co14``, ``dns23`` and ``site24`` (both on the home network) and more
identities on the same hosts, ``co12-b``, ``co14-b`` and ``co14-c``, each with its own broker
key — arrive over time, each asking for a share of the service (and as much of its CPU), then
keep a load of leased requests running (``python -m nodetools.co_load --grant``, ``--rate``
per second: every request carries the lease's credential, to the hop's address) until they
finish, by cancelling the lease or by letting it expire (the load stops 0.8 s before).

**Duplicate cycles** (``--cycles``, target ``pair-svc``; shares, identities, hold times and
endings drawn from ``--seed``). Each one takes the service from one instance to three (the
patent's 104, 108 and 110: r18b, r20a and r18a) and back:

* **A** (net 14, 28-33 %) leases the primary alone: its requests cross the backbone to the
  home network, where the HOA tunnels them to r18b's FOA (net 14 → primary: the baseline).
* **B** and **C** (net 12, 30-33 % each) lease the primary too (its own network's instance).
* **D** (net 14, so that A and D hold 72-78 %) does not fit beside them: admission finds no
  room (step 208) and the broker asks r18b to grow the service: r18b queries every router for
  room, reserves it on r20a (the only foreign network without an instance), and starts a
  *duplicate* of the counter there from the primary's checkpoint (steps 210-222). The
  duplicate registers through its FOA with S: the HOA holds two bindings for 10.16.0.100 and
  bicasts. D's lease is on the duplicate. The duplicate also takes over A's lease (A's
  network now reaches only it: r20a delivers the home address locally), so A's later
  requests are answered on net 14 — the same CO's latency before and after the duplicate.
* **H** (a home-network CO, ``dns23`` or ``site24``) asks for a share that fits the primary
  beside B and C but not the duplicate: its lease is on the primary, and its requests reach
  r18b through the HOA's bicast.
* **E** (net 12) asks for more than the primary has left: denied ``no_capacity`` at once (a
  CO on a network with an instance reaches only that one: it is *pinned*).
* **F** (the other home-network CO) asks for more than the primary and the duplicate have
  left: the broker grows the service again, and now the only candidate is **r18a**, the FOA
  of the primary's network, in front of the primary (net 14 runs an instance; placement
  tries the CO's own network first, fewest hops). r18b starts a second duplicate there, which
  registers through r18a's FOA at its *second care-of address* 10.255.0.2: the HOA holds
  **three bindings** for 10.16.0.100 (care-of 10.12.0.1 the primary, 10.14.0.1 and
  10.255.0.2 the duplicates) and bicasts to all three; r18a, which now holds the home
  address itself, hands the primary behind it its packets as frames by GRE key. r18a's
  instance takes over B's and C's leases (net 12 now reaches it first: it sits on their
  gateway), and F's lease is on it (it then fits there, one hop nearer the home network than
  the primary). H's requests still reach the primary: bicast by the HOA, handed on by r18a
  as frames; the instance their credential names answers, the two others stay silent.
* B, C and F end, by cancel and by expiry: with the last of them the broker releases r18a's
  instance and its binding goes (3 → 2). Then A and D end, one by cancel, one by expiry, and
  r20a's goes (2 → 1); H ends on the primary meanwhile. Each duplicate's last lease ends by
  cancel in some cycles and by expiry in others (r18a's and r20a's by different ones). The
  next cycle starts from the primary alone.

**The traffic phase** (after the cycles, from the primary alone; ``--no-traffic`` leaves it
out). The primary's router samples its object's requests per source network (/24) every
second, and **the rule** (``agent/distribution/traffic.py``; README, *Traffic*): when, over
its window, at least ``min_requests`` requests reached the primary and at least ``share`` of
them came from one foreign network other than its own (they crossed the backbone and the
HOA's tunnel), it places a duplicate on that network, once per cooldown. Its defaults (200
requests in 5 s, 75 %, 30 s) stay above the cycles' loads on purpose; as the phase starts the
experiment sets r18b's rule through its ``traffic_rule`` control command to 120 requests in
3 s, 75 %, cooldown 30 s (:data:`TRAFFIC_RULE`), and restores what it held once the phase's
leases have ended.

* **U** (net 12, 10-20 %, 10 requests/s) leases the primary: its requests come from the
  primary's own network, which the rule never picks.
* **T** (net 14, 25-40 %, 60 requests/s) leases the primary too (it fits: no lease grows the
  service) and its requests cross the backbone to it. About 2 s into T's load the window
  holds 120 requests or more, over 75 % of them from net 14: r18b fires and, acting for the
  object, asks every router for room, reserves it on r20a and starts a duplicate there from
  the primary's checkpoint (the steps of a growth, but no lease asked for it: the broker is
  asked for no growth; r18b's ``room`` lists the placement, its first step naming the
  window's counts). The duplicate registers through r20a's FOA with S (two bindings at the
  HOA) and with the broker, which hands it T's lease (net 14 now reaches only it): T's
  requests are answered on its own network, no longer across the backbone. T's load runs on
  across the placement; U's stays on the primary.
* T ends (by cancel or expiry, from the seed): the broker releases the duplicate and its
  binding goes (2 → 1). U ends on the primary, and the rule is restored.

**The secondaries phase** (after the cycles, target ``tally``; no duplicate runs any more: a
part never moves to a network where its object runs, its home agent being local there):

* **P** (``dns23``, home network, 45-55 %) leases the part at home: its requests go HOA →
  r18a (GRE) → r18b.
* **Q** (net 14, 15-25 %) leases the part at home too: across the backbone and the HOA.
* **S** (net 14, 42-60 %) does not fit beside them: the broker asks r18b to grow, and r18b
  moves the *part* (step 218), make before break: a *secondary* starts warm on r20a from the
  part's checkpoint and registers through r20a's FOA with ``svc`` (10.16.0.100) as its home
  agent; r18b's nested home agent keeps its binding (``nested``) and tunnels to it; the part
  stops on r18b and its final checkpoint restores the secondary, which replays what it
  queued. The HOA's table still shows only the primary. S's lease is on the secondary.
  P's and Q's leases stay on the primary's instance, and the secondary honours them: P's
  requests now cross two tunnels (HOA → r18a, then r18b → r20a: the *nesting*), Q's are
  answered on net 14 (r20a delivers the part's address itself).
* Q ends, then S (by cancel or expiry, from the seed): the broker releases the secondary,
  which gives the part back to r18b make before break too (the part restarts warm at home,
  the secondary stops and its final checkpoint is restored there); its binding leaves r18b's
  nested table. P's load runs on through the give-back (its requests cross the nesting until
  the part is back at home, then one tunnel), into:
* **R** (net 12, 10-30 %), which then leases the part, at home again on r18b: the part's
  counts across all of its processes must form one sequence (none lost or repeated in either
  move). ``--no-return-under-load`` ends P before S instead (no request of the part in
  flight when it goes back).

Outside the traffic phase the primary router's rule has its defaults, and the default rate
(20 requests/s per CO) stays under them (200 requests in 5 s, 75 % from one foreign
network); from about 40/s A's load alone makes r18b place the duplicate before D asks
(reported as ``traffic rule placed a duplicate`` too).

What is measured, and how:

* **Exactly once**: every request of every CO's load (its log: ``seq``, send time, each reply
  with ``served_by`` and the object's ``count``) must get one reply, from the router that
  should serve it when it was sent: for a lease of the service, its instance's (the broker's
  ``leases`` tell when a lease moved); for a lease of the part on the primary's instance,
  r18b while the part is at home and the secondary's router while r18b's nested table holds
  its binding — none with 0, none with 2 (under bicast every instance gets a request from
  the home network; those the credential does not name stay silent). Two figures single out
  the third instance: per router whose new instance took over leases (r20a: A's; r18a: B's
  and C's), how many of those leases' requests sent once the broker named it it answered
  exactly once; and per number of HOA bindings, how many requests of the home CO on the
  primary (H) r18b answered exactly once (with three bound, through r18a's frames by key).
* **Counters**: per object and instance (router and the object process's id), the counts it
  returned are distinct and contiguous. The counter's primary starts at 1; a duplicate's
  (r20a's and r18a's alike: each starts from the primary's checkpoint) first count minus one
  is its checkpoint, which must lie between the primary's count when the growing request
  was sent and its count when the grant came back (for the duplicate the traffic rule
  placed: the primary's count when the rule fired and when the duplicate served). The
  part's processes, in time order (at home, secondary, at home again), continue one
  sequence: each one's first count is one more than the last count of the one before (its
  state moved whole), and the part's final count on r18b (``object_stats``) is its last
  count served.
* **Grant latency**: ``request_ms``, from sending the LEASE_REQUEST to the grant decoded, by
  the CO's own process (``time.perf_counter`` inside the CO host; HMAC, TCP 4340 and the
  broker included). Ordinary grants against growing ones (duplicate, part move): the ratio is
  the cost of growing as the CO sees it.
* **Growth** (duplicates and part moves alike): ``growth_ms``, the broker's own time from
  SERVICE_GROW sent to the new instance back (its ``growth`` command: query, reserve,
  checkpoint, fetch and verify from the remote site, start, registration through the FOA;
  for a part also the stop on r18b and the restore), with the primary router's steps;
  ``first_answer_ms``: from the growing request sent to the new instance's first reply at
  that CO (this includes starting the load generator, about 0.3 s of Python);
  ``first_served_ms``: to the new instance's first reply at any CO (for a part: P's and Q's
  requests, queued by the warm secondary, come first).
* **Release**: from the new instance's last lease ending (the cancel's answer at the CO; for
  an expiry, the broker's expiry time, from the ``remaining`` of its ``leases`` command) to
  the first sample without its binding (for a duplicate its own at the HOA, told apart by
  care-of address: the one that appeared when the broker first listed it, and how many
  bindings the HOA then held; r18b's nested table for a secondary): an upper bound, sampled
  every 0.25 s; for a secondary also when the primary's instance listed the part again.
* **Bindings**: the HOA's number of bindings for 10.16.0.100 over the run (each change once:
  ``1 -> 2 -> 3 -> 2 -> 1`` per cycle, ``1 -> 2 -> 1`` in the traffic phase), its maximum (3)
  and every care-of address it bound.
* **The traffic rule**: the thresholds set and restored (the ``traffic_rule`` command's
  answers); per placement (r18b's ``room`` ``placements``) the window's counts when it fired
  (its first step) and their share from the placement's network; when it fired: the
  placement's record time (r18b's wall clock, taken once the duplicate serves) less its
  steps' time to ``duplicate serves`` (r18b's own clock, from the rule firing: query,
  reserve, checkpoint, start, registration through the FOA); from T's first request sent
  to the rule firing; from the rule firing to the duplicate serving (its steps), to its
  first reply at T's CO (``co_load``'s receive time: every namespace shares the host's
  clock), to its binding at the HOA and T's lease on it (samples); T's median round trip
  before (served by r18b) and after (served by r20a, sent 0.5 s after the lease moved); the
  growths the broker made meanwhile (0: no lease asked); T's and U's requests answered
  once; the release, as for any duplicate.
* **Latency**: each reply's round trip at the CO (``co_load``'s send and receive times),
  grouped by the CO's network, the instance that served it and the phase when it was sent
  (for the service: how many bindings the HOA held; for the part: at home, *moving* — from the
  secondary's registration, less one sampling period, to its restore, by the primary
  router's steps: requests then queue in the warm secondary — or away); and per lease that
  moved (A to the duplicate on r20a; B and C to r18a's; T to the duplicate the traffic rule
  placed on r20a; P and Q to the secondary) its median before and after: net 14 → primary
  (backbone, home network, GRE to net 12) against net 14 → duplicate; net 12 → primary
  (through r18a) against net 12 → r18a; home → part on r18b (one tunnel) against home →
  secondary (two); net 14 → part on r18b against net 14 → secondary (its own network). Also
  home → primary with three bound (frames by key through r18a) against fewer, and home →
  r18a's instance (F).
* **Samples**, every 0.25 s in a thread: the broker's ``services`` (share used per instance,
  its objects) and ``leases`` (each one's instance and remaining time), the HOA's
  ``bindings`` and r18b's ``nested`` bindings.
* **Captures**: GRE packets whose inner destination is the part's address, by outer source
  and destination (tshark): HOA → r18a on the home LAN, then 10.16.0.100 → r20a on net 12.

Writes ``results/leases/<run-id>/``: summary.json, events.csv (the printed event table),
leases.csv (one row per lease), requests.csv (per request: CO, seq, object, instance,
answers, RTT), samples.csv (share per instance and bindings, every 0.25 s), shares.png,
bindings.png, latency.png and captures/ (home LAN, foreign LANs 12 and 14; the broker's and
the routers' messages decode with packets/wireshark/moat.lua).
"""

from __future__ import annotations

import argparse
import ast
import bisect
import contextlib
import dataclasses
import heapq
import ipaddress
import json
import logging
import random
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from .co_driver import HostDriver
from .results import copy_captures, count_events, results_dir, write_csv, write_json
from .tables import format_table

log = logging.getLogger(__name__)

EXPERIMENT = "leases"
SERVICE = "pair-svc"
#: The service's part (its second object): it runs beside the counter on an address of the
#: counter's mobile network prefix, and moves as a secondary.
PART = "tally"
#: The mobile object the service's counter runs as, and where its primary runs.
OBJECT = "svc"
PRIMARY = "r18b"
VM_NAME = "pair"
VM_CPU = 1.0
VM_MEMORY_MB = 256
#: Each object's own resources in its archive (the VM's are :data:`VM_CPU`).
OBJECT_CPU = 0.2
#: The CO identities and the host each acts from (each has its own key in co_keys.json; every
#: end host of the run has one, ``dns23`` and ``site24`` on the home network too).
COS = {"co12": "co12", "co12-b": "co12", "co14": "co14", "co14-b": "co14", "co14-c": "co14",
       "dns23": "dns23", "site24": "site24"}
EXTRA_COS = ("co12-b", "co14-b", "co14-c")
#: The network of each CO host (16: the home network).
NETWORK_OF_HOST = {"co12": "12", "co14": "14", "dns23": "16", "site24": "16"}
#: The router in front of the primary: its network's FOA, where a second instance on the
#: primary's network runs (at the FOA's second care-of address), the third of the service.
GATEWAY = "r18a"
#: When each role of a duplicate cycle asks (s from the cycle's start), and what the plan
#: makes of its lease; see the module docstring.
AT = {"A": 0.0, "B": 2.5, "C": 3.2, "D": 4.0, "H": 5.8, "E": 6.5, "F": 7.0}
EXPECT = {"A": "adopted", "B": "adopted", "C": "adopted", "D": "grows", "H": "primary",
          "E": "denied", "F": "grows"}
#: The roles whose request grows the service (a duplicate on r20a; a third instance on r18a).
GROWING = ("D", "F")
#: The traffic phase (between the cycles and the secondaries): when U (net 12, the primary's
#: own network) and T (net 14) ask, s from the phase's start, and what the plan makes of them.
TRAFFIC_AT = {"U": 0.0, "T": 0.5}
TRAFFIC_EXPECT = {"U": "primary", "T": "placed"}
#: The traffic rule on the primary's router during the phase (its ``traffic_rule`` command;
#: what it held before is restored after): T's load alone crosses it in about 2 s.
TRAFFIC_RULE = {"window_s": 3.0, "min_requests": 120, "share": 0.75, "cooldown_s": 30.0}
#: T's and U's loads (requests/s): T's crosses the rule, U's stays on its own network.
TRAFFIC_RATE = 60.0
TRAFFIC_LOW_RATE = 10.0
#: Where the rule places the duplicate: T's network and its router.
TRAFFIC_NETWORK = "10.14.0.0/24"
TRAFFIC_ROUTER = "r20a"
#: When the rule is restored: this long after the phase's last lease ended (nominally).
TRAFFIC_RESTORE_S = 0.5
#: The same for the secondaries phase (R's time depends on S's end).
PART_AT = {"P": 0.0, "Q": 0.7, "S": 2.8}
PART_EXPECT = {"P": "nested", "Q": "nested", "S": "moves", "R": "home"}
#: In the plan: how late a growing lease's grant comes (measured: about 1.1-1.4 s).
GROWTH_DELAY_S = 1.5
#: R asks this long after S's planned end (the secondary released, its part back on r18b).
RETURN_WAIT_S = 3.0
R_HOLD_S = 2.0
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

LEASE_COLUMNS = ["n", "cycle", "role", "t_s", "co", "net", "target", "share", "rate", "hold",
                 "end", "expect", "outcome", "reason", "router", "part", "moved_to", "moved_s",
                 "request_ms", "growth_ms", "ended", "ended_s", "sent", "once", "none", "more",
                 "rtt_ms_median"]
PLACEMENT_COLUMNS = ["network", "router", "window", "window_share", "trigger_s", "placed_s",
                     "checkpoint_ms", "placement_ms"]
EVENT_COLUMNS = ["t_s", "event", "co", "instance", "detail"]
REQUEST_COLUMNS = ["n", "co", "net", "cycle", "object", "lease_router", "lease_part",
                   "expected", "seq", "sent_s", "answers", "served_by", "instance", "ok",
                   "count", "rtt_ms", "phase"]
SAMPLE_COLUMNS = ["t_s", "instance", "router", "part", "objects", "used_share", "share",
                  "leases", "bindings", "binding_parts", "care_of", "nested", "nested_care_of"]
GROWTH_COLUMNS = ["n", "co", "kind", "router", "care_of", "growth_ms", "request_ms", "ordinary_ms",
                  "ratio", "binding_s", "first_answer_ms", "first_served_ms", "others_rtt_ms_max"]
RELEASE_COLUMNS = ["kind", "instance", "care_of", "leases", "last_end", "last_end_s",
                   "binding_gone_s", "release_ms", "bindings_after", "directory_gone_s",
                   "part_back_s"]
INSTANCE_COLUMNS = ["object", "served_by", "process", "part", "answers", "first", "last",
                    "distinct", "contiguous", "checkpoint", "checkpoint_ok", "consistent"]
LATENCY_COLUMNS = ["net", "instance", "phase", "answered", "rtt_ms_median", "rtt_ms_p90",
                   "rtt_ms_min"]
MOVE_COLUMNS = ["cycle", "role", "co", "net", "object", "before", "before_ms", "after", "after_ms",
                "path_after"]


class ExperimentError(RuntimeError):
    """The experiment could not run (the service not provisioned, a CO driver gone silent)."""


# --- the plan (pure) ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One CO's lease in the plan: asked at ``at`` (s from the start) by ``co`` (acting from
    ``host``) for ``share`` % and ``cpu`` cores of ``target`` (the service or its part), used
    for ``hold`` s from its grant, then ended by ``end`` (``cancel`` or ``expire``).
    ``expect``: what the plan makes of it (``primary``; ``adopted``: on the primary, then
    taken over by the duplicate on its CO's network; ``grows``: the lease that does not fit,
    on a new duplicate; ``denied``; ``nested``: the part on the primary, then served by the
    secondary; ``moves``: the part's lease that does not fit, on the new secondary;
    ``home``: the part at home on the primary; ``placed``: on the primary, then taken over
    by the duplicate the traffic rule placed on its CO's network). ``rate``: its load's
    requests per second (None: the run's ``--rate``)."""

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
    target: str = SERVICE
    rate: float | None = None

    @property
    def duration(self) -> float:
        """The lease length asked: its hold when it ends by expiry, else a long one."""
        return self.hold if self.end == "expire" else CANCEL_DURATION_S

    @property
    def net(self) -> str:
        return NETWORK_OF_HOST[self.host]


def _cpu(share: float) -> float:
    return round(share / 100.0 * VM_CPU, 3)


def _identities(host: str) -> list[str]:
    return [c for c, h in COS.items() if h == host]


def plan_cycles(cycles: int, seed: int) -> list[Step]:
    """``cycles`` duplicate cycles of the module docstring's roles A-F and H, each starting
    once the previous one's leases have all ended, with shares, identities, hold times and
    endings drawn from ``seed``. The shares make the plan's outcome certain: A, B and C fit
    the primary together, D does not fit beside them (the duplicate on r20a), A and D fit one
    instance; H fits the primary beside B and C but not the duplicate beside A and D; E asks
    more than the primary has left; F fits neither the primary beside B, C and H nor the
    duplicate (the third instance, on r18a), but fits r18a's instance beside B and C (the
    leases it takes over), which is nearer the home network than the primary."""
    return _plan_cycles(cycles, seed)[0]


def _plan_cycles(cycles: int, seed: int) -> tuple[list[Step], float]:
    """:func:`plan_cycles` and when the next phase may start."""
    if not 1 <= cycles <= MAX_CYCLES:
        raise ValueError(f"--cycles must be in [1, {MAX_CYCLES}], not {cycles}")
    rng = random.Random(seed)
    offset = rng.randint(0, 1)
    net12, net14 = _identities("co12"), _identities("co14")
    home = _identities("dns23") + _identities("site24")
    steps: list[Step] = []
    start = 0.0
    for cycle in range(1, cycles + 1):
        c12, c14, c16 = net12[:], net14[:], home[:]
        rng.shuffle(c12)
        rng.shuffle(c14)
        rng.shuffle(c16)
        who = {"A": c14[0], "B": c12[0], "C": c12[1], "D": c14[1], "E": c12[rng.randint(0, 1)],
               "H": c16[0], "F": c16[1]}
        share = {"A": round(rng.uniform(28, 33), 1), "B": round(rng.uniform(30, 33), 1),
                 "C": round(rng.uniform(30, 33), 1)}
        # A and D leave the duplicate 22-28 % free: H and F do not fit there.
        share["D"] = round(rng.uniform(72, 78) - share["A"], 1)
        primary_free = 100.0 - share["B"] - share["C"]  # once A moved: 34-40 %
        duplicate_free = 100.0 - share["A"] - share["D"]
        share["H"] = round(rng.uniform(duplicate_free + 1.5, primary_free - 1.0), 1)
        share["E"] = round(primary_free + rng.uniform(5, 10), 1)
        share["F"] = round(rng.uniform(max(duplicate_free, primary_free - share["H"]) + 1.5,
                                       primary_free - 1.0), 1)
        # When each lease ends (s from the cycle's start; a growing lease's grant comes about
        # GROWTH_DELAY_S late, its hold is counted from there). The duplicate on r20a keeps
        # A and D until F's growth is long done (F must not fit it); r18a's instance loses
        # its last lease well before r20a's: the HOA's table shrinks 3 -> 2 -> 1. The last
        # lease of each ends by cancel and by expiry in alternate cycles.
        end: dict[str, float] = {}
        way: dict[str, str] = {}
        last20 = ("cancel", "expire")[(cycle + offset) % 2]
        last18 = "expire" if last20 == "cancel" else "cancel"
        first_role, last_role = rng.sample(["A", "D"], 2)
        end[first_role] = round(rng.uniform(10.0, 10.6), 2)
        way[first_role] = "expire" if last20 == "cancel" else "cancel"
        end[last_role], way[last_role] = round(rng.uniform(13.6, 14.0), 2), last20
        *early, last = rng.sample(["B", "C", "F"], 3)
        ways = ["cancel", "expire"]
        rng.shuffle(ways)
        for role, w in zip(early, ways):
            end[role], way[role] = round(rng.uniform(10.6, 11.2), 2), w
        end[last], way[last] = round(rng.uniform(11.9, 12.3), 2), last18
        end["H"], way["H"] = round(rng.uniform(10.6, 11.6), 2), rng.choice(["cancel", "expire"])
        end["E"], way["E"] = AT["E"] + 2.0, "cancel"  # denied: never held
        for role in sorted(who, key=AT.__getitem__):
            at = round(start + AT[role], 2)
            hold = end[role] - AT[role] - (GROWTH_DELAY_S if role in GROWING else 0.0)
            steps.append(Step(len(steps) + 1, cycle, role, at, who[role], COS[who[role]],
                              share[role], _cpu(share[role]), round(hold, 2),
                              way[role], EXPECT[role]))
        start = round(start + max(end.values()) + CYCLE_GAP_S, 2)
    return steps, start


def plan_parts(start: float, cycle: int, first_n: int, seed: int,
               across_return: bool = True) -> list[Step]:
    """The secondaries phase of the module docstring (roles P, Q, S, R on the part), from
    ``start`` s, numbered from ``first_n``, drawn from ``seed``. The shares make the outcome
    certain: P and Q fit the part at home together, S does not fit beside them (the part
    moves) but fits a fresh secondary, P and R fit the part at home together; Q ends before
    S, R asks once the part is back. ``across_return`` (the default): P's load runs on across
    the give-back, to the middle of R's lease; without it P ends before S too."""
    rng = random.Random(f"parts-{seed}")
    q, s = rng.sample(_identities("co14"), 2)
    r = rng.choice(_identities("co12"))
    share = {"P": round(rng.uniform(45, 55), 1), "Q": round(rng.uniform(15, 25), 1),
             "S": round(rng.uniform(42, 60), 1), "R": round(rng.uniform(10, 30), 1)}
    ways = ["cancel", "expire"]
    rng.shuffle(ways)
    end = {"P": round(rng.uniform(7.0, 8.0), 2), "Q": round(rng.uniform(7.0, 8.0), 2),
           "S": round(rng.uniform(9.5, 10.5), 2)}
    way = {"P": ways[0], "Q": ways[1], "S": rng.choice(["cancel", "expire"]), "R": "cancel"}
    at = dict(PART_AT, R=round(end["S"] + GROWTH_DELAY_S + RETURN_WAIT_S, 2))
    end["R"] = at["R"] + R_HOLD_S
    if across_return:
        end["P"] = round(at["R"] + R_HOLD_S / 2, 2)
    who = {"P": "dns23", "Q": q, "S": s, "R": r}
    return [Step(first_n + k, cycle, role, round(start + at[role], 2), who[role],
                 COS[who[role]], share[role], _cpu(share[role]), round(end[role] - at[role], 2),
                 way[role], PART_EXPECT[role], PART)
            for k, role in enumerate("PQSR")]


def plan_traffic(start: float, cycle: int, first_n: int, seed: int) -> tuple[list[Step], float]:
    """The traffic phase of the module docstring (roles U and T on the service), from
    ``start`` s, numbered from ``first_n``, drawn from ``seed``; and when the next phase may
    start. U (net 12, :data:`TRAFFIC_LOW_RATE`) and T (net 14, :data:`TRAFFIC_RATE`) fit the
    primary together with room to spare (no lease grows the service); T's load alone crosses
    :data:`TRAFFIC_RULE` within its window, U's never could (its network is the primary's
    own); T ends first (its duplicate is released), U a little after."""
    rng = random.Random(f"traffic-{seed}")
    t = rng.choice(_identities("co14"))
    u = rng.choice(_identities("co12"))
    share = {"T": round(rng.uniform(25, 40), 1), "U": round(rng.uniform(10, 20), 1)}
    end = {"T": round(rng.uniform(10.0, 10.6), 2), "U": round(rng.uniform(11.0, 11.5), 2)}
    way = {"T": rng.choice(["cancel", "expire"]), "U": rng.choice(["cancel", "expire"])}
    who = {"T": t, "U": u}
    rate = {"T": TRAFFIC_RATE, "U": TRAFFIC_LOW_RATE}
    steps = [Step(first_n + k, cycle, role, round(start + TRAFFIC_AT[role], 2), who[role],
                  COS[who[role]], share[role], _cpu(share[role]),
                  round(end[role] - TRAFFIC_AT[role], 2), way[role], TRAFFIC_EXPECT[role],
                  rate=rate[role])
             for k, role in enumerate(sorted(TRAFFIC_AT, key=TRAFFIC_AT.__getitem__))]
    return steps, round(start + max(end.values()) + CYCLE_GAP_S, 2)


def plan(cycles: int, seed: int, parts: bool = True, across_return: bool = True,
         traffic: bool = True) -> list[Step]:
    """The whole run: the duplicate cycles, then (``traffic``) the traffic phase, then
    (``parts``) the secondaries phase."""
    steps, start = _plan_cycles(cycles, seed)
    cycle = cycles + 1
    if traffic:
        more, start = plan_traffic(start, cycle, len(steps) + 1, seed)
        steps += more
        cycle += 1
    if parts:
        steps += plan_parts(start, cycle, len(steps) + 1, seed, across_return)
    return steps


def traffic_schedule(steps: Sequence[Step]) -> list[tuple[float, str]]:
    """When the traffic rule is set to :data:`TRAFFIC_RULE` on the primary's router (as the
    traffic phase starts) and restored (once its leases have ended, nominally): ``[(at,
    "rule"), (at, "restore")]``, or none without a traffic phase."""
    phase = [s for s in steps if s.role in TRAFFIC_AT]
    if not phase:
        return []
    return [(min(s.at for s in phase), "rule"),
            (round(max(s.at + s.hold for s in phase) + TRAFFIC_RESTORE_S, 2), "restore")]


def plan_end(steps: Sequence[Step]) -> float:
    """When the plan's last lease ends (nominally, growth delays included)."""
    return max(s.at + s.hold + (GROWTH_DELAY_S if s.expect in ("grows", "moves") else 0.0)
               for s in steps if s.expect != "denied")


# --- analysis (pure) ------------------------------------------------------------------------


def router_of(instance_id: str | None) -> str | None:
    """The router of a broker instance id (``r20a/pair-d9ba9@37f8b2cd``)."""
    return instance_id.split("/", 1)[0] if instance_id else None


def object_of(target: str | None) -> str:
    """The object a lease's requests reach: the part for a lease of the part, else the
    service's mobile object (the counter)."""
    return PART if target == PART else OBJECT


def part_label(router: str | None, obj: str = OBJECT, primary: str = PRIMARY) -> str:
    """What serves ``obj`` on ``router``: the counter's ``primary`` or a ``duplicate``; the
    ``part`` at home beside the primary or a ``secondary``."""
    if obj == PART:
        return "part" if router == primary else "secondary"
    return "primary" if router == primary else "duplicate"


def median(values: Iterable[float]) -> float | None:
    values = [v for v in values if isinstance(v, (int, float))]
    return round(statistics.median(values), 3) if values else None


def percentile(values: Iterable[float], q: float) -> float | None:
    values = sorted(v for v in values if isinstance(v, (int, float)))
    if not values:
        return None
    return round(values[min(len(values) - 1, int(q * len(values)))], 3)


def sample_from(t: float, services: list[dict[str, Any]], bindings: list[dict[str, Any]],
                leases: list[dict[str, Any]],
                nested: dict[str, list[dict[str, Any]]] | None = None) -> dict[str, Any]:
    """One sample from the broker's ``services`` and ``leases``, the HOA's ``bindings`` and
    the primary router's ``nested`` bindings (per VM: its secondaries)."""
    return {"t_s": round(t, 3),
            "instances": [{"instance_id": i["instance_id"], "router": i.get("router"),
                           "part": i.get("part", "primary"), "used_share": i.get("used_share"),
                           "share": i.get("share"), "leases": i.get("leases"),
                           "objects": list(i.get("objects") or []),
                           "network": i.get("network") or ""}
                          for s in services if s.get("service") == SERVICE
                          for i in s["instances"]],
            "bindings": [{"care_of_address": b.get("care_of_address"), "part": b.get("part"),
                          "gre_key": b.get("gre_key"),
                          "network_prefix": b.get("network_prefix") or ""} for b in bindings],
            "leases": {row["lease_id"]: {"remaining": row.get("remaining"),
                                         "instance": row.get("instance"),
                                         "target": row.get("target")} for row in leases},
            "nested": [{"vm": vm, "home_address": b.get("home_address"),
                        "care_of_address": b.get("care_of_address"), "part": b.get("part")}
                       for vm, rows in sorted((nested or {}).items()) for b in rows]}


def sample_rows(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The samples as CSV rows: one per instance per sample, with that sample's bindings at
    the HOA and in the primary's nested table."""
    rows = []
    for s in samples:
        binds, nested = s["bindings"], s.get("nested", [])
        common = {"t_s": s["t_s"], "bindings": len(binds),
                  "binding_parts": ",".join(str(b["part"]) for b in binds),
                  "care_of": ",".join(str(b["care_of_address"]) for b in binds),
                  "nested": len(nested),
                  "nested_care_of": ",".join(f"{b['home_address']}@{b['care_of_address']}"
                                             for b in nested)}
        for i in s["instances"] or [{}]:
            rows.append(dict(common, instance=i.get("instance_id"), router=i.get("router"),
                             part=i.get("part"), objects="+".join(i.get("objects") or []),
                             used_share=i.get("used_share"), share=i.get("share"),
                             leases=i.get("leases")))
    return rows


def hoa_bound(samples: list[dict[str, Any]]) -> list[tuple[float, int]]:
    """(time, how many bindings the HOA held for the object's home address) per sample, in
    time order."""
    return [(s["t_s"], len(s["bindings"])) for s in samples]


def binding_counts(samples: list[dict[str, Any]]) -> list[int]:
    """The HOA's number of bindings over the run, each change once (``[1, 2, 3, 2, 1]``)."""
    out: list[int] = []
    for _, n in hoa_bound(samples):
        if not out or out[-1] != n:
            out.append(n)
    return out


def binding_episodes(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each stretch of samples in which the HOA held one binding (by care-of address and
    part): its care-of address, part, the first sample that showed it (``start``) and the
    first that no longer did (``end``, None if it lasted to the end), in order of start."""
    open_: dict[tuple[str, str], dict[str, Any]] = {}
    out: list[dict[str, Any]] = []
    for s in samples:
        now = {(str(b["care_of_address"]), str(b["part"])) for b in s["bindings"]}
        for key in sorted(set(open_) - now):
            open_.pop(key)["end"] = s["t_s"]
        for key in sorted(now - set(open_)):
            episode = {"care_of": key[0], "part": key[1], "start": s["t_s"], "end": None}
            open_[key] = episode
            out.append(episode)
    return out


def instance_bindings(samples: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per duplicate the broker listed: its binding at the HOA (:func:`binding_episodes`),
    the duplicate's binding that appeared nearest to the instance's first listing (a
    duplicate registers with the HOA through its FOA, then with the broker)."""
    first: dict[str, float] = {}
    for s in samples:
        for i in s["instances"]:
            if i["part"] == "duplicate":
                first.setdefault(i["instance_id"], s["t_s"])
    episodes = [e for e in binding_episodes(samples) if e["part"] == "duplicate"]
    out: dict[str, dict[str, Any]] = {}
    for iid, t in sorted(first.items(), key=lambda kv: kv[1]):
        free = [e for e in episodes if all(e is not x for x in out.values())
                and (e["end"] is None or e["end"] > t)]
        if free:
            out[iid] = min(free, key=lambda e: abs(e["start"] - t))
    return out


def part_away(samples: list[dict[str, Any]],
              windows: Iterable[tuple[float, float]] = ()) -> list[tuple[float, bool]]:
    """(time, a secondary's binding present in the primary's nested table) per sample, and
    (time, True) at the end of each part move (``windows``: :func:`part_windows`; the
    secondary serves from then, maybe between two samples), in time order."""
    flags = [(s["t_s"], bool(s.get("nested"))) for s in samples] + \
        [(end, True) for _, end in windows]
    return sorted(flags, key=lambda f: f[0])


def part_windows(growth: Iterable[dict[str, Any]], t0: float) -> list[tuple[float, float]]:
    """Per part move (s from ``t0``): from its secondary's registration, as the primary's
    router reported it in its steps less one sampling period (the report comes after the
    secondary's FOA delivers the part's address to it, so requests from that network already
    queue there), to the secondary restored from the part's final checkpoint (it serves):
    the broker's growth record's start plus the steps' times."""
    out = []
    for g in growth:
        steps = [(str(s[0]), float(s[1])) for s in g.get("steps") or [] if len(s) == 2]
        registered = next((ms for what, ms in steps if "registered" in what
                           and what.startswith("secondary")), None)
        restored = next((ms for what, ms in steps if "restored" in what), None)
        if g.get("instance") and registered is not None and restored is not None:
            start = g["at"] - t0
            out.append((round(start + registered / 1000.0 - SAMPLE_S, 3),
                        round(start + restored / 1000.0, 3)))
    return out


#: What the HOA held when a request of the service was sent (the latest sample before it).
ONE_BINDING, TWO_BINDINGS, THREE_BINDINGS = ("primary bound", "duplicate bound too",
                                             "two duplicates bound too")
#: Where the part was when a request of the part was sent (r18b's nested table and the part
#: moves' steps).
PART_HOME, PART_MOVING, PART_AWAY = "part at home", "part moving", "part away"


def _latest(flags: Sequence[tuple[float, Any]], t: float, default: Any = False) -> Any:
    i = bisect.bisect_right([x for x, _ in flags], t) - 1
    return flags[i][1] if i >= 0 else default


def phase_at(bound: list[tuple[float, int]], t: float) -> str:
    """What the latest sample at or before ``t`` saw at the HOA (``bound``:
    :func:`hoa_bound`): :data:`THREE_BINDINGS`, :data:`TWO_BINDINGS` or
    :data:`ONE_BINDING`."""
    n = _latest(bound, t, 1)
    return THREE_BINDINGS if n >= 3 else TWO_BINDINGS if n == 2 else ONE_BINDING


def part_phase(away: list[tuple[float, bool]], t: float,
               windows: Iterable[tuple[float, float]] = ()) -> str:
    """:data:`PART_MOVING` within a part move's window (:func:`part_windows`); else
    :data:`PART_AWAY` if the latest sample at or before ``t`` saw a secondary's binding in
    the primary's nested table (or a move ended), else :data:`PART_HOME`."""
    if any(a <= t <= b for a, b in windows):
        return PART_MOVING
    return PART_AWAY if _latest(away, t) else PART_HOME


def _in_network(address: Any, network: str) -> bool:
    try:
        return ipaddress.ip_address(str(address)) in ipaddress.ip_network(network, strict=False)
    except ValueError:
        return False


def net_label(network: str) -> str:
    """``10.14.0.0/24`` -> ``14`` (how the experiment names networks)."""
    try:
        return str(ipaddress.ip_network(network, strict=False).network_address).split(".")[1]
    except (ValueError, IndexError):
        return "?"


def part_history(samples: list[dict[str, Any]]) -> list[tuple[float, str | None]]:
    """Per sample: the secondary serving the part — the instance (listed by the broker as a
    secondary, at any time) whose network holds the care-of address of the nested binding,
    the latest one listed by then — or None while the part is at home."""
    secondaries: dict[str, tuple[float, str]] = {}
    for s in samples:
        for i in s["instances"]:
            if i["part"] == "secondary" and i["instance_id"] not in secondaries:
                secondaries[i["instance_id"]] = (s["t_s"], i.get("network") or "")
    out: list[tuple[float, str | None]] = []
    for s in samples:
        where: str | None = None
        for b in s.get("nested", []):
            found = sorted((t, iid) for iid, (t, net) in secondaries.items()
                           if _in_network(b["care_of_address"], net))
            before = [x for x in found if x[0] <= s["t_s"] + 2.0]
            where = (before[-1] if before else found[0])[1] if found else "?/secondary"
        out.append((s["t_s"], where))
    return out


def lease_history(samples: list[dict[str, Any]]) -> dict[str, list[tuple[float, str]]]:
    """Per lease, (time, instance id) of every sample that listed it: the broker moves a
    lease to a new instance on its CO's network (adoption)."""
    out: dict[str, list[tuple[float, str]]] = defaultdict(list)
    for s in samples:
        for lid, info in s["leases"].items():
            out[lid].append((s["t_s"], info["instance"]))
    return out


def served_history(lease: dict[str, Any], history: list[tuple[float, str]],
                   parts: list[tuple[float, str | None]]) -> list[tuple[float, str]]:
    """(time, the instance that serves ``lease``): its broker instance's (``history``), but
    for a lease of the part on the primary's instance, the secondary while r18b's nested
    table holds its binding (``parts``: :func:`part_history`) — the secondary honours the
    part's credentials issued before it moved."""
    if lease.get("target") != PART or lease.get("part") != "primary":
        return list(history)
    end = lease.get("ended_s")
    return [(t, where or lease["instance_id"]) for t, where in parts
            if t >= lease["t_s"] - SAMPLE_S and (end is None or t <= end + SAMPLE_S)]


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
                 history: Sequence[tuple[float, str]] = (),
                 away: Sequence[tuple[float, bool]] = (),
                 windows: Sequence[tuple[float, float]] = ()) -> list[dict[str, Any]]:
    """Per request of one lease's load (``co_load`` records): answers, who served, RTT, and
    who should serve it when it was sent (``history``: :func:`served_history`); its phase:
    what the HOA held (``bound``) for the service, where the part was (``away``,
    ``windows``) for the part."""
    history, away = list(history), list(away)
    obj = object_of(lease.get("target"))
    rows = []
    for r in records:
        replies = sorted(r.get("replies") or [], key=lambda x: x["at"])
        first = replies[0] if replies else {}
        result = first.get("result") if isinstance(first.get("result"), dict) else {}
        sent = r["sent"] - t0
        now = router_of(instance_at(history, sent, lease["instance_id"]))
        rows.append({"n": lease["n"], "co": lease["co"], "net": lease["net"],
                     "cycle": lease["cycle"], "object": obj, "lease_router": now,
                     "lease_part": part_label(now, obj),
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
                     "phase": part_phase(away, sent, windows) if obj == PART
                     else phase_at(bound, sent)})
    return rows


def exactly_once(requests: list[dict[str, Any]]) -> dict[str, Any]:
    """Replies per request: once, none, more; answered by another instance than the one that
    should; refused (an error reply); the unanswered ones by (CO network, instance, phase)."""
    out = {"sent": len(requests), "once": 0, "none": 0, "more": 0, "wrong_instance": 0,
           "refused": 0}
    unanswered: Counter[str] = Counter()
    unanswered_at: dict[str, list[float]] = defaultdict(list)
    by_co: dict[str, Counter[str]] = defaultdict(Counter)
    by_object: dict[str, Counter[str]] = defaultdict(Counter)
    for q in requests:
        n = q["answers"]
        key = "once" if n == 1 else "none" if n == 0 else "more"
        out[key] += 1
        by_co[q["co"]][key] += 1
        by_object[q.get("object", OBJECT)][key] += 1
        if n == 0:
            key = f"net {q['net']} -> {q['lease_part']} on {q['lease_router']} ({q['phase']})"
            unanswered[key] += 1
            if "sent_s" in q:
                unanswered_at[key].append(q["sent_s"])
        allowed = set(str(q.get("expected") or q["lease_router"]).split(","))
        if n and any(s not in allowed for s in str(q["served_by"]).split(",")):
            out["wrong_instance"] += 1
        if n and q["ok"] is False:
            out["refused"] += 1
    out["exact"] = bool(requests) and out["once"] == out["sent"] and not out["wrong_instance"] \
        and not out["refused"]
    out["unanswered"] = dict(sorted(unanswered.items()))
    out["unanswered_at"] = {k: sorted(v) for k, v in sorted(unanswered_at.items())}
    out["by_co"] = {co: dict(c) for co, c in sorted(by_co.items())}
    out["by_object"] = {o: dict(c) for o, c in sorted(by_object.items())}
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


def _growth_kind(g: dict[str, Any], parts: dict[str, str]) -> str:
    """``duplicate`` or ``secondary``: from the directory, else from the router's steps."""
    kind = parts.get(g.get("instance") or "")
    if kind in ("duplicate", "secondary"):
        return kind
    steps = " ".join(str(s[0]) for s in g.get("steps") or [] if s)
    return "secondary" if "for part" in steps or "secondary" in str(g.get("error")) \
        else "duplicate"


def growth_rows(leases: list[dict[str, Any]], growth: list[dict[str, Any]],
                requests: list[dict[str, Any]], samples: list[dict[str, Any]],
                t0: float) -> list[dict[str, Any]]:
    """Per growth the broker made (a duplicate or a part moved): its time, the growing
    lease's request_ms against the median of ordinary grants, when the new binding showed
    (the duplicate's own at the HOA, by care-of address: :func:`instance_bindings`; in
    r18b's nested table for a secondary), when the growing CO had its first
    answer from the new instance, and when any CO had (s and ms from the growing request
    sent); the largest round trip of the other leases' requests of the object sent while it
    grew (a part's requests queue in the warm secondary)."""
    parts = parts_of(samples)
    ordinary = median(l["request_ms"] for l in leases
                      if l["outcome"] == "granted" and not l.get("grew"))
    nested = part_away(samples)
    bound = instance_bindings(samples)
    rows = []
    for g in growth:
        kind = _growth_kind(g, parts)
        obj = PART if kind == "secondary" else OBJECT
        lease = next((l for l in leases if l.get("instance_id") == g.get("instance")
                      and l.get("grew")), None)
        row: dict[str, Any] = {"n": lease["n"] if lease else None,
                               "co": lease["co"] if lease else None, "kind": kind,
                               "router": g.get("router"), "growth_ms": g.get("ms"),
                               "error": g.get("error"), "at_s": round(g["at"] - t0, 3),
                               "steps": g.get("steps", []), "ordinary_ms": ordinary}
        if lease is not None:
            start = lease["t_s"]
            row.update(request_ms=lease["request_ms"], start_s=start,
                       end_s=lease["granted_at_s"])
            if ordinary:
                row["ratio"] = round(lease["request_ms"] / ordinary, 1)
            if kind == "secondary":
                seen = next((t for t, on in nested if on and t >= start), None)
            else:
                episode = bound.get(str(g.get("instance")))
                seen = episode["start"] if episode else None
                row["care_of"] = episode["care_of"] if episode else None
            row["binding_s"] = None if seen is None else round(seen - start, 3)
            firsts = [q["first_at_s"] for q in requests
                      if q["n"] == lease["n"] and q["first_at_s"] is not None]
            if firsts:
                row["first_answer_ms"] = round((min(firsts) - start) * 1000, 1)
            served = [q["first_at_s"] for q in requests
                      if q.get("object", OBJECT) == obj and q["first_at_s"] is not None
                      and q["first_at_s"] >= start
                      and str(q["served_by"]).split(",")[0] == g.get("router")]
            if served:
                row["first_served_ms"] = round((min(served) - start) * 1000, 1)
            others = [q["rtt_ms"] for q in requests
                      if q["n"] != lease["n"] and q.get("object", OBJECT) == obj
                      and q["rtt_ms"] is not None
                      and start <= q["sent_s"] <= lease["granted_at_s"] + 0.5]
            row["others_rtt_ms_max"] = max(others, default=None)
        rows.append(row)
    return rows


def release_rows(leases: list[dict[str, Any]], samples: list[dict[str, Any]]) -> list[dict]:
    """Per duplicate or secondary: how its last lease ended, and when its binding left (its
    own at the HOA, by care-of address, and how many the HOA then held; r18b's nested table
    for a secondary), when the instance left the broker's directory and, for a secondary,
    when the primary listed the part again (first sample after; ms after that end)."""
    parts = parts_of(samples)
    bound = instance_bindings(samples)
    rows = []
    for iid, part in parts.items():
        if part not in ("duplicate", "secondary"):
            continue
        mine = [l for l in leases if l["outcome"] == "granted"
                and (l.get("final_instance") or l.get("instance_id")) == iid]
        ended = [l for l in mine if l.get("ended_s") is not None]
        row: dict[str, Any] = {"kind": part, "instance": iid, "leases": len(mine)}
        episode = bound.get(iid)
        if part == "duplicate":
            row["care_of"] = episode["care_of"] if episode else None
        if ended and len(ended) == len(mine):
            last = max(ended, key=lambda l: l["ended_s"])
            end = last["ended_s"]
            row.update(last_end=last["ended"], last_end_s=end)
            present = [s["t_s"] for s in samples
                       if any(i["instance_id"] == iid for i in s["instances"])]
            after = [s for s in samples if s["t_s"] >= end]
            if part == "duplicate":
                gone = episode["end"] if episode else None
                row["bindings_after"] = next((len(s["bindings"]) for s in samples
                                              if s["t_s"] == gone), None)
            else:
                gone = next((s["t_s"] for s in after if not s.get("nested")), None)
                row["part_back_s"] = next(
                    (s["t_s"] for s in after if any(i["part"] == "primary"
                                                    and PART in i.get("objects", [])
                                                    for i in s["instances"])), None)
            left = next((s["t_s"] for s in samples if present and s["t_s"] > present[-1]),
                        None)
            row.update(binding_gone_s=gone, directory_gone_s=left,
                       release_ms=None if gone is None else round((gone - end) * 1000, 1))
        rows.append(row)
    return rows


def instance_rows(requests: list[dict[str, Any]], growths: list[dict[str, Any]],
                  primary: str = PRIMARY) -> list[dict[str, Any]]:
    """Per object and instance that answered (router and object process): the counts it
    returned are distinct and contiguous. The counter: the primary's start at 1; a duplicate
    starts from a checkpoint between the primary's count when its growing request was sent
    and when it was granted (``growths`` need ``start_s`` and ``end_s``). The part: its
    processes in time order continue one sequence (each one's checkpoint, its first count
    minus one, is the last count of the one before; the first one's is 0)."""
    groups: dict[tuple[str, str, str], list[tuple[float, int]]] = defaultdict(list)
    for q in requests:
        if q["answers"] == 1 and q["ok"] and isinstance(q["count"], int):
            groups[(q.get("object", OBJECT), q["served_by"], q["instance"])].append(
                (q["first_at_s"], q["count"]))
    prim = sorted(v for (obj, by, _), vs in groups.items()
                  if obj == OBJECT and by == primary for v in vs)
    dup_growths = [g for g in growths if g.get("kind", "duplicate") == "duplicate"
                   and g.get("start_s") is not None]
    rows = []
    part_last = 0
    for (obj, by, process), answers in sorted(groups.items(), key=lambda kv: min(kv[1])[0]):
        counts = [c for _, c in answers]
        first_t = min(t for t, _ in answers)
        row: dict[str, Any] = {"object": obj, "served_by": by, "process": process,
                               "part": part_label(by, obj, primary),
                               "answers": len(counts), "first": min(counts),
                               "last": max(counts), "first_s": first_t,
                               "distinct": len(set(counts)) == len(counts),
                               "contiguous": max(counts) - min(counts) + 1 == len(counts)}
        if obj == PART:
            row["checkpoint"] = min(counts) - 1
            row["checkpoint_ok"] = row["checkpoint"] == part_last
            row["checkpoint_bounds"] = [part_last, part_last]
            part_last = max(counts)
        elif by == primary:
            row["checkpoint"] = 0
            row["checkpoint_ok"] = min(counts) == 1
        else:
            g = max((g for g in dup_growths if g["start_s"] <= first_t),
                    key=lambda g: g["start_s"], default=None)
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
    instance that served them (primary, duplicate, part at home, secondary) and the phase
    (what was bound when they were sent)."""
    groups: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for q in requests:
        if q["answers"] >= 1 and q["rtt_ms"] is not None:
            by = str(q["served_by"]).split(",")[0]
            label = part_label(by, q.get("object", OBJECT), primary)
            groups[(q["net"], f"{label} ({by})", q["phase"])].append(q["rtt_ms"])
    return [{"net": net, "instance": inst, "phase": phase, "answered": len(v),
             "rtt_ms_median": median(v), "rtt_ms_p90": percentile(v, 0.9),
             "rtt_ms_min": min(v)}
            for (net, inst, phase), v in sorted(groups.items())]


def move_rows(leases: list[dict[str, Any]], requests: list[dict[str, Any]],
              networks: dict[str, str] | None = None, settle: float = 0.5) -> list[dict]:
    """The latency a CO sees before and after its lease moved (A to the duplicate; P and Q to
    the secondary): the median RTT of its requests served by its first router, sent before
    the move, and of those served by the new one, sent ``settle`` s after it (not the
    queued ones). ``networks``: instance id -> its network (the path after)."""
    networks = networks or {}
    rows = []
    for l in leases:
        if l["outcome"] != "granted" or l.get("moved_s") is None:
            continue
        mine = [q for q in requests if q["n"] == l["n"] and q["rtt_ms"] is not None
                and q["answers"] == 1]
        before = [q["rtt_ms"] for q in mine
                  if q["served_by"] == l["router"] and q["sent_s"] < l["moved_s"]]
        after = [q["rtt_ms"] for q in mine
                 if q["served_by"] == l["moved_to"] and q["sent_s"] > l["moved_s"] + settle]
        obj = object_of(l.get("target"))
        rows.append({"cycle": l["cycle"], "role": l["role"], "co": l["co"], "net": l["net"],
                     "object": obj,
                     "before": f"{part_label(l['router'], obj)} ({l['router']})",
                     "before_ms": median(before),
                     "after": f"{part_label(l['moved_to'], obj)} ({l['moved_to']})",
                     "after_ms": median(after),
                     "path_after": l.get("moved_path") or moved_path(l, networks),
                     "before_n": len(before), "after_n": len(after)})
    return rows


def moved_path(lease: dict[str, Any], networks: dict[str, str]) -> str:
    """How a moved lease's requests reach its new instance: on the CO's own network (its FOA
    delivers there), or through the nesting (HOA -> the primary's router -> the secondary),
    or through the HOA."""
    if net_label(networks.get(lease.get("moved_instance") or "", "")) == lease["net"]:
        return "its own network"
    if lease.get("target") == PART:
        return f"nested: HOA -> {lease['router']} -> {lease['moved_to']}"
    return f"HOA -> {lease['moved_to']}"


def sample_events(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Instances entering and leaving the broker's directory, the part leaving and coming
    back to the primary's objects, bindings appearing and going at the HOA and in the
    primary's nested table, at the first sample that showed the change."""
    events = []
    prev_inst: dict[str, dict[str, Any]] = {}
    prev_bind: set[tuple[str, str]] = set()
    prev_nested: set[tuple[str, str]] = set()
    prev_home: bool | None = None
    for s in samples:
        inst = {i["instance_id"]: i for i in s["instances"]}
        binds = {(str(b["care_of_address"]), str(b["part"])) for b in s["bindings"]}
        nested = {(str(b["home_address"]), str(b["care_of_address"]))
                  for b in s.get("nested", [])}
        home = any(i["part"] == "primary" and PART in i.get("objects", [])
                   for i in s["instances"])
        for iid in sorted(set(inst) - set(prev_inst)):
            events.append({"t_s": s["t_s"], "event": "instance listed by the broker",
                           "instance": iid, "detail": inst[iid]["part"]})
        for iid in sorted(set(prev_inst) - set(inst)):
            events.append({"t_s": s["t_s"], "event": "instance left the directory",
                           "instance": iid, "detail": prev_inst[iid]["part"]})
        if prev_home is not None and home != prev_home and any(
                i["part"] == "primary" for i in s["instances"]):
            events.append({"t_s": s["t_s"], "event": f"primary lists {PART} again" if home
                           else f"primary no longer lists {PART}",
                           "instance": next(i["instance_id"] for i in s["instances"]
                                            if i["part"] == "primary"),
                           "detail": "part at home" if home else "part moved"})
        for care_of, part in sorted(binds - prev_bind):
            events.append({"t_s": s["t_s"], "event": "binding at the HOA",
                           "detail": f"{part} via {care_of} ({len(binds)} bound)"})
        for care_of, part in sorted(prev_bind - binds):
            events.append({"t_s": s["t_s"], "event": "binding gone",
                           "detail": f"{part} via {care_of} ({len(binds)} bound)"})
        for address, care_of in sorted(nested - prev_nested):
            events.append({"t_s": s["t_s"], "event": f"nested binding at {PRIMARY}",
                           "detail": f"{address} via {care_of} (HOA: {len(binds)} bound)"})
        for address, care_of in sorted(prev_nested - nested):
            events.append({"t_s": s["t_s"], "event": "nested binding gone",
                           "detail": f"{address} via {care_of}"})
        prev_inst, prev_bind, prev_nested = inst, binds, nested
        if any(i["part"] == "primary" for i in s["instances"]):
            prev_home = home
    return events


def lease_events(leases: list[dict[str, Any]], growth: list[dict[str, Any]]) -> list[dict]:
    """Grants, denials, moves, cancels and expiries of the plan's leases, and the broker's
    growths (duplicates and part moves)."""
    events = []
    for l in leases:
        what = "" if l.get("target", SERVICE) == SERVICE else f" ({l['target']})"
        if l["outcome"] == "granted":
            detail = f"{l['share']:g}% for {l['hold']:g} s, {l['request_ms']:.1f} ms"
            if l.get("grew"):
                detail += f" (grew: {l.get('growth_ms')} ms)"
            events.append({"t_s": l["t_s"], "event": f"lease {l['role']}{what} -> {l['part']}",
                           "co": l["co"], "instance": l["instance_id"], "detail": detail})
            if l.get("moved_s") is not None:
                if l.get("target") == PART:
                    detail = (f"its credential for {l['router']} honoured; "
                              f"{l.get('moved_path') or ''}")
                    name = f"lease {l['role']} served by the secondary"
                else:
                    detail = f"taken over from {l['router']} (CO's network)"
                    name = f"lease {l['role']} moved"
                events.append({"t_s": l["moved_s"], "event": name, "co": l["co"],
                               "instance": l.get("moved_instance") or l["final_instance"],
                               "detail": detail})
            if l.get("ended_s") is not None:
                events.append({"t_s": l["ended_s"], "event": f"lease {l['role']} {l['ended']}",
                               "co": l["co"],
                               "instance": l.get("final_instance") or l["instance_id"],
                               "detail": f"after {l['ended_s'] - l['t_s']:.1f} s"})
        else:
            events.append({"t_s": l["t_s"], "event": f"lease {l['role']}{what} denied",
                           "co": l["co"],
                           "detail": f"{l['share']:g}%: {l.get('reason')}: "
                                     f"{str(l.get('detail') or '').split(',')[0][:80]}"})
    for g in growth:
        kind = g.get("kind", "duplicate")
        if not g.get("instance"):
            what = f"failed: {g.get('error')}"
        elif kind == "secondary":
            what = f"{PART} moved to {g.get('router')} (secondary)"
        else:
            what = f"duplicate on {g.get('router')}"
        events.append({"t_s": g["at_s"], "event": "part move" if kind == "secondary"
                       else "growth", "instance": g.get("instance"),
                       "detail": f"{what} in {g.get('ms')} ms"})
    return events


def first_answer_events(instances: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"t_s": i["first_s"], "event": f"first answer from the {i['part']}",
             "instance": f"{i['served_by']} ({i['process']})",
             "detail": f"{i.get('object', OBJECT)} count {i['first']}"}
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
        return bool(lease.get("grew")) and lease["part"] == "duplicate"
    if expect == "moves":
        return bool(lease.get("grew")) and lease["part"] == "secondary"
    if expect in ("adopted", "nested"):
        return lease["part"] == "primary" and lease.get("moved_to") not in (None, PRIMARY)
    if expect == "home":
        return lease["part"] == "primary" and not lease.get("moved_to")
    if expect == "placed":
        return lease["part"] == "primary" and not lease.get("grew") \
            and lease.get("moved_to") == TRAFFIC_ROUTER
    return lease["part"] == expect and not lease.get("moved_to")


def gre_pairs(lines: Iterable[str], address: str) -> dict[str, int]:
    """GRE packets whose inner destination is ``address``, by outer source -> destination,
    from tshark's ``-e ip.src -e ip.dst`` fields (one line per packet: outer and inner
    addresses comma-separated)."""
    out: Counter[str] = Counter()
    for line in lines:
        fields = line.rstrip("\n").split("\t")
        if len(fields) != 2:
            continue
        srcs, dsts = fields[0].split(","), fields[1].split(",")
        if len(srcs) >= 2 and len(dsts) >= 2 and dsts[-1] == address:
            out[f"{srcs[0]}->{dsts[0]}"] += 1
    return dict(sorted(out.items()))


def takeover(leases: list[dict[str, Any]],
             requests: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per router whose new instance took over leases of the service (the CO's network now
    reaches it): how many leases, how many of their requests were sent once it held them
    (the broker's ``leases`` named it; :func:`instance_at`) and how many of those it
    answered exactly once."""
    out: dict[str, dict[str, int]] = {}
    moved = {l["n"]: l["moved_to"] for l in leases if l["outcome"] == "granted"
             and l.get("moved_to") and l.get("target", SERVICE) != PART}
    for n, router in moved.items():
        row = out.setdefault(router, {"leases": 0, "sent": 0, "once_by_it": 0})
        row["leases"] += 1
        mine = [q for q in requests if q["n"] == n and q["lease_router"] == router]
        row["sent"] += len(mine)
        row["once_by_it"] += sum(1 for q in mine if q["answers"] == 1
                                 and q["served_by"] == router)
    return dict(sorted(out.items()))


def home_on_primary(requests: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Requests of the service from home-network COs whose lease is on the primary, by what
    the HOA held when they were sent (it bicasts to every instance; with three bound, the
    FOA in front of the primary hands them on as frames by GRE key): sent, and answered
    exactly once by the primary."""
    out: dict[str, dict[str, int]] = {}
    for q in requests:
        if q["net"] != NETWORK_OF_HOST["dns23"] or q.get("object", OBJECT) != OBJECT \
                or q["lease_router"] != PRIMARY:
            continue
        row = out.setdefault(q["phase"], {"sent": 0, "once_by_primary": 0})
        row["sent"] += 1
        row["once_by_primary"] += int(q["answers"] == 1 and q["served_by"] == PRIMARY)
    return dict(sorted(out.items()))


# --- the traffic rule (pure) ----------------------------------------------------------------------


def window_of(steps: Iterable[Sequence[Any]]) -> dict[str, int]:
    """The rule's window when it fired, per source network, from the placement's first step
    (``most requests come from NET through the home network: {NET: count, ...}``, written by
    the primary's router); empty if no step says it."""
    for step in steps:
        what = str(step[0]) if step else ""
        if what.startswith("most requests come from") and "{" in what:
            try:
                counts = ast.literal_eval(what[what.index("{"):])
            except (ValueError, SyntaxError):
                return {}
            if isinstance(counts, dict):
                return {str(k): int(v) for k, v in counts.items() if isinstance(v, int)}
    return {}


def placement_rows(placements: Iterable[dict[str, Any]], t0: float) -> list[dict[str, Any]]:
    """Per duplicate the traffic rule placed (the primary router's ``room`` ``placements``):
    its network and router, the window's counts when the rule fired, its total and the
    share of the placement's network; when the placement was recorded (``placed_s``, s from
    ``t0``: the router's wall clock, once the duplicate serves) and how long it took on the
    router's own clock (``placement_ms``: its steps are ms from the rule firing to
    ``duplicate serves on ROUTER``, the registration through its FOA), hence when the rule
    fired (``trigger_s``)."""
    rows = []
    for p in placements:
        steps = [(str(x[0]), float(x[1])) for x in p.get("steps") or [] if len(x) == 2]
        serves = next((ms for what, ms in steps if what.startswith("duplicate serves")),
                      steps[-1][1] if steps else 0.0)
        window = window_of(steps)
        total = sum(window.values())
        network = str(p.get("network"))
        placed = p["at"] - t0
        checkpoint = next((ms for what, ms in steps if "checkpoint" in what), None)
        rows.append({"network": network, "router": p.get("router"), "object": p.get("object"),
                     "window": window, "window_total": total,
                     "window_share": round(window.get(network, 0) / total, 3) if total else None,
                     "trigger_s": round(placed - serves / 1000.0, 3), "placed_s": round(placed, 3),
                     "placement_ms": serves, "checkpoint_ms": checkpoint, "steps": steps})
    return rows


def _window_text(row: dict[str, Any]) -> str:
    counts = ", ".join(f"{net} {n}" for net, n in sorted(row["window"].items(),
                                                          key=lambda kv: -kv[1]))
    share = row.get("window_share")
    return f"{counts} ({share * 100:.0f} % from {row['network']})" if share is not None \
        else counts or "?"


def traffic_summary(placed: list[dict[str, Any]], leases: list[dict[str, Any]],
                    requests: list[dict[str, Any]], moves: list[dict[str, Any]],
                    releases: list[dict[str, Any]], samples: list[dict[str, Any]],
                    growth_history: list[dict[str, Any]],
                    actions: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """The traffic phase's figures (see the module docstring): the rule set, the placement
    it made (:func:`placement_rows`: the first one made once T's load ran), its window, the
    times from T's load to the rule firing, to the duplicate serving and to its first answer
    at T's CO; the HOA's new binding and the lease's move by the samples; T's round trip
    before and after (:func:`move_rows`); growths the broker was asked for meanwhile (a
    lease that did not fit; none expected); T's and U's requests answered once; the
    release. Empty without a traffic phase and without placements."""
    phase = [l for l in leases if l.get("role") in TRAFFIC_AT]
    if not phase and not placed:
        return {}
    rule = next((a for a in actions if a["what"] == "rule"), None)
    restore = next((a for a in actions if a["what"] == "restore"), None)
    out: dict[str, Any] = {
        "rule": {k: v for k, v in (rule or {}).get("result", {}).items() if k != "before"},
        "rule_before": (rule or {}).get("result", {}).get("before"),
        "rule_set_s": rule["t_s"] if rule else None,
        "rule_restored_s": restore["t_s"] if restore else None,
        "rule_restored": (restore or {}).get("result"),
        "placements": len(placed)}
    t = next((l for l in phase if l["role"] == "T" and l["outcome"] == "granted"), None)
    start = min((l["t_s"] for l in phase), default=None)
    mine = [q for q in requests if t is not None and q["n"] == t["n"]]
    first_sent = min((q["sent_s"] for q in mine), default=None)
    row = next((p for p in placed if first_sent is None or p["trigger_s"] >= first_sent),
               placed[0] if placed else None)
    if t is not None:
        ends = [l.get("ended_s") for l in phase if l.get("ended_s") is not None]
        end = max(ends, default=None)
        out.update(co=t["co"], share=t["share"], rate=t.get("rate"), net=t["net"],
                   sent=len(mine), once=sum(1 for q in mine if q["answers"] == 1),
                   phase_s=[start, end],
                   growths_asked=sum(1 for g in growth_history if start is not None
                                     and start <= g["at_s"] <= (end or float("inf"))))
        move = next((m for m in moves if m["role"] == "T" and m["cycle"] == t["cycle"]), {})
        out.update(rtt_before_ms=move.get("before_ms"), rtt_after_ms=move.get("after_ms"),
                   before=move.get("before"), after=move.get("after"),
                   path_after=move.get("path_after"), before_n=move.get("before_n"),
                   after_n=move.get("after_n"), lease_moved_s=t.get("moved_s"),
                   moved_to=t.get("moved_to"))
        others = [q for q in requests if any(l["n"] == q["n"] and l["role"] != "T"
                                             for l in phase)]
        out["others"] = {"sent": len(others),
                         "once": sum(1 for q in others if q["answers"] == 1),
                         "served_by": sorted({str(q["served_by"]) for q in others
                                              if q["answers"] >= 1})}
        final = t.get("final_instance")
        release = next((r for r in releases if r["instance"] == final), None)
        if release is not None and final != t["instance_id"]:
            out.update(instance=final, last_end=release.get("last_end"),
                       release_ms=release.get("release_ms"),
                       binding_gone_s=release.get("binding_gone_s"))
        episode = instance_bindings(samples).get(str(final))
        out["binding_s"] = episode["start"] if episode else None
        out["binding_care_of"] = episode["care_of"] if episode else None
    if row is not None:
        out.update(network=row["network"], router=row["router"], window=row["window"],
                   window_total=row["window_total"], window_share=row["window_share"],
                   trigger_s=row["trigger_s"], placed_s=row["placed_s"],
                   placement_ms=row["placement_ms"])
        trig = row["trigger_s"]

        def since(x: float | None) -> float | None:
            return None if x is None else round((x - trig) * 1000, 1)

        if first_sent is not None:
            out["load_to_trigger_ms"] = round((trig - first_sent) * 1000, 1)
            firsts = [q["first_at_s"] for q in mine if q["first_at_s"] is not None
                      and str(q["served_by"]).split(",")[0] == row["router"]]
            out["first_answer_s"] = min(firsts, default=None)
            out["trigger_to_first_answer_ms"] = since(out["first_answer_s"])
            out["trigger_to_binding_ms"] = since(out.get("binding_s"))
            out["trigger_to_lease_moved_ms"] = since(out.get("lease_moved_s"))
    return out


def traffic_events(placed: list[dict[str, Any]],
                   actions: Sequence[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """The rule set and restored on the primary's router, and per placement: the rule firing
    (with its window) and the duplicate serving."""
    events = []
    for a in actions:
        result = a.get("result") or {}
        rule = ", ".join(f"{k} {result[k]:g}" for k in ("window_s", "min_requests", "share",
                                                         "cooldown_s")
                         if isinstance(result.get(k), (int, float)))
        name = {"rule": f"traffic rule set on {PRIMARY}",
                "restore": f"traffic rule restored on {PRIMARY}"}.get(a["what"], a["what"])
        events.append({"t_s": a["t_s"], "event": name,
                       "detail": rule or f"failed: {result.get('error')}"})
    for p in placed:
        events.append({"t_s": p["trigger_s"], "event": "traffic rule fired",
                       "instance": PRIMARY, "detail": f"window: {_window_text(p)}"})
        events.append({"t_s": p["placed_s"], "event": "traffic rule placed a duplicate",
                       "instance": p["router"],
                       "detail": f"on {p['network']} in {p['placement_ms']:.0f} ms, "
                                 "no lease asked for it"})
    return events


def summarise(leases: list[dict[str, Any]], requests: list[dict[str, Any]],
              growths: list[dict[str, Any]], releases: list[dict[str, Any]],
              instances: list[dict[str, Any]], samples: list[dict[str, Any]],
              primary_count: int | None = None, part_count: int | None = None,
              moves: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The figures the report prints (see the module docstring for how each is measured)."""
    granted = [l for l in leases if l["outcome"] == "granted"]
    ordinary = [l["request_ms"] for l in granted if not l.get("grew")]
    growing = [l["request_ms"] for l in granted if l.get("grew") and l["part"] != "secondary"]
    moving = [l["request_ms"] for l in granted if l.get("grew") and l["part"] == "secondary"]
    ord_med, grow_med, move_med = median(ordinary), median(growing), median(moving)
    lat = latency_rows(requests)
    dups = [g for g in growths if g.get("kind", "duplicate") == "duplicate"]
    secs = [g for g in growths if g.get("kind") == "secondary"]

    def rtt(net: str, label: str, phase: str | None = None,
            router: str | None = None) -> float | None:
        values = [q["rtt_ms"] for q in requests if q["answers"] >= 1 and q["net"] == net
                  and part_label(str(q["served_by"]).split(",")[0],
                                 q.get("object", OBJECT)) == label
                  and (router is None or str(q["served_by"]).split(",")[0] == router)
                  and (phase is None or q["phase"] == phase) and q["rtt_ms"] is not None]
        return median(values)

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 1) if a and b else None

    counter_rows = [i for i in instances if i.get("object", OBJECT) == OBJECT]
    primary_rows = [i for i in counter_rows if i["part"] == "primary"]
    if primary_count is not None and primary_rows:
        primary_rows[0]["object_count"] = primary_count
        primary_rows[0]["consistent"] = primary_rows[0]["consistent"] and \
            primary_rows[0]["last"] <= primary_count
    part_rows = [i for i in instances if i.get("object") == PART]
    if part_count is not None and part_rows:
        part_rows[-1]["object_count"] = part_count
        part_rows[-1]["consistent"] = part_rows[-1]["consistent"] and \
            part_rows[-1]["last"] == part_count
    part_counts = sorted(q["count"] for q in requests if q.get("object") == PART
                         and q["answers"] == 1 and q["ok"] and isinstance(q["count"], int))
    return {
        "requests": exactly_once(requests),
        "leases": {"asked": len(leases), "granted": len(granted),
                   "denied": len(leases) - len(granted),
                   "on": dict(Counter(l["part"] for l in granted)),
                   "of": dict(Counter(l.get("target", SERVICE) for l in granted)),
                   "moved": sum(1 for l in granted if l.get("moved_to")
                                and l.get("target") != PART),
                   "nested": sum(1 for l in granted if l.get("moved_to")
                                 and l.get("target") == PART),
                   "denials": dict(Counter(l.get("reason") for l in leases
                                           if l["outcome"] != "granted")),
                   "as_planned": sum(1 for l in leases if as_planned(l)),
                   "grew": sum(1 for l in granted if l.get("grew") and l["part"] != "secondary"),
                   "parts_moved": sum(1 for l in granted
                                      if l.get("grew") and l["part"] == "secondary"),
                   "ended": dict(Counter(l.get("ended") or "open" for l in granted))},
        "grant_ms": {"ordinary_median": ord_med, "growing_median": grow_med,
                     "ratio": ratio(grow_med, ord_med), "moving_median": move_med,
                     "moving_ratio": ratio(move_med, ord_med)},
        "growth_ms_median": median(g.get("growth_ms") for g in dups if not g.get("error")),
        "part_move_ms_median": median(g.get("growth_ms") for g in secs if not g.get("error")),
        "growth_failed": sum(1 for g in growths if g.get("error")),
        "first_answer_ms_median": median(g.get("first_answer_ms") for g in dups),
        "first_served_ms_median": median(g.get("first_served_ms") for g in dups),
        "part_first_answer_ms_median": median(g.get("first_answer_ms") for g in secs),
        "part_first_served_ms_median": median(g.get("first_served_ms") for g in secs),
        "part_move_others_rtt_ms_max": max((g["others_rtt_ms_max"] for g in secs
                                            if g.get("others_rtt_ms_max") is not None),
                                           default=None),
        "release_ms_max": max((r["release_ms"] for r in releases
                               if r.get("release_ms") is not None
                               and r.get("kind", "duplicate") == "duplicate"), default=None),
        "part_release_ms_max": max((r["release_ms"] for r in releases
                                    if r.get("release_ms") is not None
                                    and r.get("kind") == "secondary"), default=None),
        "part_back_ms_max": max((round((r["part_back_s"] - r["last_end_s"]) * 1000, 1)
                                 for r in releases if r.get("part_back_s") is not None
                                 and r.get("last_end_s") is not None), default=None),
        "releases": {"total": len(releases),
                     "by": dict(Counter(f"{r.get('kind', 'duplicate')} "
                                        f"{r.get('last_end') or 'not released'}"
                                        for r in releases))},
        "counters_consistent": bool(instances) and all(i["consistent"] for i in instances),
        "part_counts": {"answers": len(part_counts),
                        "one_sequence": part_counts == list(range(1, len(part_counts) + 1)),
                        "final": part_count},
        "rtt_ms": {"net14_to_primary": rtt("14", "primary", ONE_BINDING),
                   "net14_to_duplicate": rtt("14", "duplicate"),
                   "net12_to_primary": rtt("12", "primary"),
                   "home_to_part": rtt("16", "part"),
                   "home_to_secondary": rtt("16", "secondary"),
                   "net14_to_part": rtt("14", "part"),
                   "net14_to_secondary": rtt("14", "secondary"),
                   "net12_to_part": rtt("12", "part"),
                   "net12_to_gateway": rtt("12", "duplicate", router=GATEWAY),
                   "home_to_gateway": rtt("16", "duplicate", router=GATEWAY),
                   "home_to_primary_three_bound": rtt("16", "primary", THREE_BINDINGS),
                   "home_to_primary_fewer_bound": median(
                       q["rtt_ms"] for q in requests if q["answers"] >= 1 and q["net"] == "16"
                       and q.get("object", OBJECT) == OBJECT and q["served_by"] == PRIMARY
                       and q["phase"] != THREE_BINDINGS and q["rtt_ms"] is not None)},
        "max_bindings": max((len(s["bindings"]) for s in samples), default=0),
        "binding_counts": binding_counts(samples),
        "care_of_bound": sorted({f"{b['care_of_address']} ({b['part']})" for s in samples
                                 for b in s["bindings"]}),
        "growth_ms_by_router": {r: median(g.get("growth_ms") for g in dups
                                          if g.get("router") == r and not g.get("error"))
                                for r in sorted({str(g.get("router")) for g in dups
                                                 if g.get("router")})},
        "third_instances": sum(1 for g in dups if g.get("router") == GATEWAY
                               and not g.get("error")),
        "takeover": takeover(leases, requests),
        "home_on_primary": home_on_primary(requests),
        "max_nested": max((len(s.get("nested", [])) for s in samples), default=0),
        "max_instances": max((len(s["instances"]) for s in samples), default=0),
        "latency": lat,
        "moves": moves or [],
    }


def summary_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The headline figures as a two-column table."""
    q, ls, g = summary["requests"], summary["leases"], summary["grant_ms"]
    rtt = summary["rtt_ms"]
    by_obj = q.get("by_object", {})
    pc = summary.get("part_counts", {})
    rows = [("requests sent", q["sent"]),
            ("  of the counter / of the part", " / ".join(
                str(sum(by_obj.get(o, {}).values())) for o in (OBJECT, PART))),
            ("answered exactly once", q["once"]),
            ("unanswered", q["none"]), ("answered twice or more", q["more"]),
            ("answered by another instance", q["wrong_instance"]),
            ("refused (error reply)", q["refused"]),
            ("leases granted / denied", f"{ls['granted']} / {ls['denied']}"),
            ("leases as the plan expected", f"{ls['as_planned']} of {ls['asked']}"),
            ("leases granted on primary / duplicate / secondary",
             " / ".join(str(ls["on"].get(p, 0)) for p in ("primary", "duplicate",
                                                          "secondary"))),
            ("leases taken over by a duplicate on the CO's network", ls["moved"]),
            ("  by router: leases, their requests answered once by it / sent after", ", ".join(
                f"{r}: {v['leases']}, {v['once_by_it']} / {v['sent']}"
                for r, v in summary.get("takeover", {}).items()) or None),
            ("home COs on the primary: answered once by r18b / sent, by HOA bindings", ", ".join(
                f"{phase}: {v['once_by_primary']} / {v['sent']}"
                for phase, v in summary.get("home_on_primary", {}).items()) or None),
            ("leases of the part served by the secondary (nested)", ls.get("nested", 0)),
            ("denials", ", ".join(f"{k}: {v}" for k, v in sorted(ls["denials"].items()))
             or "none"),
            ("leases ended by cancel / expiry", f"{ls['ended'].get('cancelled', 0)} / "
                                                f"{ls['ended'].get('expired', 0)}"),
            ("growths (duplicates placed)", ls["grew"]),
            (f"  of them third instances, on {GATEWAY} in front of the primary",
             summary.get("third_instances", 0)),
            ("part moves (secondaries placed)", ls.get("parts_moved", 0)),
            ("grant ms, ordinary (median)", g["ordinary_median"]),
            ("grant ms, growing a duplicate (median)", g["growing_median"]),
            ("growing / ordinary", g["ratio"]),
            ("grant ms, moving the part (median)", g.get("moving_median")),
            ("moving / ordinary", g.get("moving_ratio")),
            ("growth ms at the broker, duplicate (median)", summary["growth_ms_median"]),
            ("  by router (median)", ", ".join(
                f"{r}: {v}" for r, v in summary.get("growth_ms_by_router", {}).items())),
            ("growth ms at the broker, part move (median)", summary.get("part_move_ms_median")),
            ("lease that did not fit -> duplicate's first answer to that CO ms (median)",
             summary["first_answer_ms_median"]),
            ("lease that did not fit -> duplicate's first answer to any CO ms (median)",
             summary.get("first_served_ms_median")),
            ("lease that did not fit -> secondary's first answer to that CO ms (median)",
             summary.get("part_first_answer_ms_median")),
            ("lease that did not fit -> secondary's first answer to any CO ms (median)",
             summary.get("part_first_served_ms_median")),
            ("largest RTT ms of the part's other COs while it moved",
             summary.get("part_move_others_rtt_ms_max")),
            ("released (kind, last lease's end)",
             ", ".join(f"{k}: {v}" for k, v in sorted(summary["releases"]["by"].items()))),
            ("release: last lease end -> duplicate's binding gone ms (max, sampled)",
             summary["release_ms_max"]),
            ("release: last lease end -> nested binding gone ms (max, sampled)",
             summary.get("part_release_ms_max")),
            ("release: last lease end -> primary lists the part again ms (max, sampled)",
             summary.get("part_back_ms_max")),
            ("RTT ms net 14 -> primary (median)", rtt["net14_to_primary"]),
            ("RTT ms net 14 -> duplicate (median)", rtt["net14_to_duplicate"]),
            ("RTT ms net 12 -> primary (median)", rtt["net12_to_primary"]),
            ("RTT ms home -> part on r18b (median)", rtt.get("home_to_part")),
            ("RTT ms home -> secondary, nested (median)", rtt.get("home_to_secondary")),
            ("RTT ms net 14 -> part on r18b (median)", rtt.get("net14_to_part")),
            ("RTT ms net 14 -> secondary (median)", rtt.get("net14_to_secondary")),
            ("RTT ms net 12 -> part on r18b (median)", rtt.get("net12_to_part")),
            ("RTT ms net 12 -> duplicate on r18a (median)", rtt.get("net12_to_gateway")),
            ("RTT ms home -> duplicate on r18a (median)", rtt.get("home_to_gateway")),
            ("RTT ms home -> primary, 3 bound: frames by key via r18a (median)",
             rtt.get("home_to_primary_three_bound")),
            ("RTT ms home -> primary, 1-2 bound (median)", rtt.get("home_to_primary_fewer_bound")),
            ("HOA bindings (max)", summary["max_bindings"]),
            ("HOA bindings over time", " -> ".join(str(n) for n in
                                                   summary.get("binding_counts", []))),
            ("care-of addresses bound at the HOA", ", ".join(summary.get("care_of_bound", []))),
            (f"nested bindings at {PRIMARY} (max)", summary.get("max_nested", 0)),
            ("instances in the directory (max)", summary["max_instances"]),
            ("part's counts one sequence across its moves",
             f"{pc.get('one_sequence')} ({pc.get('answers')} answers, final "
             f"{pc.get('final')})" if pc.get("answers") else None),
            ("counters consistent per instance", summary["counters_consistent"])]
    rows += traffic_rows(summary.get("traffic") or {})
    return [{"what": w, "value": v} for w, v in rows]


def traffic_rows(t: dict[str, Any]) -> list[tuple[str, Any]]:
    """The traffic phase's lines of the summary table (none without it)."""
    if not t:
        return []
    rule = t.get("rule") or {}

    def pair(a: Any, b: Any) -> str:
        return f"{a} / {b}"

    window = ", ".join(f"{n} {c}" for n, c in sorted((t.get("window") or {}).items(),
                                                      key=lambda kv: -kv[1]))
    share = t.get("window_share")
    return [
        (f"traffic rule on {PRIMARY} in the phase: window s, min requests, share, cooldown s",
         ", ".join(f"{rule[k]:g}" for k in ("window_s", "min_requests", "share", "cooldown_s")
                   if isinstance(rule.get(k), (int, float))) or None),
        ("  restored after the phase to", ", ".join(
            f"{t['rule_restored'][k]:g}" for k in ("window_s", "min_requests", "share",
                                                    "cooldown_s")
            if isinstance(t["rule_restored"].get(k), (int, float)))
         if isinstance(t.get("rule_restored"), dict) else None),
        ("  duplicates it placed / growths a lease asked for meanwhile",
         pair(f"{t.get('placements', 0)}" + (f" (on {t['router']})" if t.get("router") else ""),
              t.get("growths_asked"))),
        ("  window when it fired: requests by source network",
         f"{window} ({share * 100:.0f} % from {t.get('network')}, "
         f"{t.get('window_total')} in all)" if share is not None else None),
        (f"  T ({t.get('co')}, net {t.get('net')}, {t.get('rate')}/s): its first request -> "
         "rule fired ms", t.get("load_to_trigger_ms")),
        ("  rule fired -> duplicate serving ms (the primary router's steps)",
         t.get("placement_ms")),
        ("  rule fired -> duplicate's first answer at T's CO ms",
         t.get("trigger_to_first_answer_ms")),
        ("  rule fired -> its binding at the HOA / T's lease on it ms (sampled)",
         pair(t.get("trigger_to_binding_ms"), t.get("trigger_to_lease_moved_ms"))),
        ("  T's RTT ms before (net 14 -> primary) / after (-> duplicate, its own network)",
         pair(t.get("rtt_before_ms"), t.get("rtt_after_ms"))),
        ("  T's requests answered once / sent", pair(t.get("once"), t.get("sent"))),
        ("  U's (net 12) answered once / sent, by", f"{(t.get('others') or {}).get('once')} / "
         f"{(t.get('others') or {}).get('sent')}, "
         f"{','.join((t.get('others') or {}).get('served_by') or [])}"),
        ("  T's lease ended -> duplicate's binding gone ms (sampled)",
         f"{t.get('release_ms')} ({t.get('last_end')})" if t.get("last_end") else None),
    ]


def format_report(events: list[dict[str, Any]], full: dict[str, Any]) -> str:
    """What the experiment prints: the event table, growths, releases, instances, latency,
    the moves, the summary table and the verdict line."""
    s = full["summary"]
    q = s["requests"]
    parts = [format_table(events, EVENT_COLUMNS), "",
             "growths (duplicates and part moves):",
             format_table(full["growths"], GROWTH_COLUMNS), "",
             "releases:", format_table(full["releases"], RELEASE_COLUMNS), "",
             "instances (counts they returned):",
             format_table(full["instances"], INSTANCE_COLUMNS), "",
             "round trips at the COs:", format_table(s["latency"], LATENCY_COLUMNS), "",
             "a CO's round trip before and after its lease moved (median ms):",
             format_table(s.get("moves", []), MOVE_COLUMNS), ""]
    placed = full.get("placements") or full.get("traffic_placements")
    if placed:
        parts += ["duplicates placed by the traffic rule (window: requests by source network "
                  "when it fired; s from the start, ms from the rule firing, on the primary "
                  "router's clock):",
                  format_table([dict(p, window=_window_text(p)) for p in placed],
                               PLACEMENT_COLUMNS), ""]
    parts += [format_table(summary_rows(s), ["what", "value"]), ""]
    verdict = (f"{q['sent']} leased requests: {q['once']} answered exactly once, "
               f"{q['none']} unanswered, {q['more']} answered twice or more; "
               f"every request answered exactly once by its lease's instance: {q['exact']}")
    if q["unanswered"]:
        at = q.get("unanswered_at", {})

        def when(key: str) -> str:
            times = at.get(key) or []
            more = f", ... ({len(times) - 12} more)" if len(times) > 12 else ""
            return f" (sent at {', '.join(f'{t:.2f}' for t in times[:12])}{more} s)" \
                if times else ""

        verdict += "\nunanswered: " + "; ".join(f"{k}: {v}{when(k)}"
                                                for k, v in q["unanswered"].items())
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
        color = "C4" if g.get("kind") == "secondary" else "C9" if g.get("kind") == "traffic" \
            else "C3" if g.get("router") == GATEWAY else "C1"
        ax.axvline(g["at_s"], color=color, lw=0.8, ls="--")
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
    ax.set_xlabel(f"time (s); dashed: growth asked (orange: duplicate, red: duplicate on "
                  f"{GATEWAY}, purple: part move, cyan: traffic rule fired); green dotted: "
                  "a duplicate's or secondary's last lease ended")
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
    """Bindings over time: the HOA's for the object's home address, by part and care-of
    address (the primary; a duplicate on net 14; a duplicate at the second care-of address
    of the FOA in front of the primary), and the primary router's nested table (the part's
    secondary)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(11, 3.6))
    t = [s["t_s"] for s in samples]
    routers = {r.get("care_of"): r["instance"].split("/")[0] for r in releases
               if r.get("care_of")}
    routers.update({g.get("care_of"): g.get("router") for g in growths if g.get("care_of")})
    layers = [(f"HOA: primary ({OBJECT}, with its prefix)", "C0",
               lambda s: sum(1 for b in s["bindings"] if b["part"] != "duplicate"))]
    care_ofs = sorted({str(b["care_of_address"]) for s in samples for b in s["bindings"]
                       if b["part"] == "duplicate"})
    for k, care_of in enumerate(care_ofs):
        where = f" on {routers[care_of]}" if routers.get(care_of) else ""
        color = "C3" if routers.get(care_of) == GATEWAY else ("C1", "C5", "C8")[k % 3]
        layers.append((f"HOA: duplicate{where} via {care_of}", color,
                       lambda s, c=care_of: sum(1 for b in s["bindings"]
                                                if b["part"] == "duplicate"
                                                and str(b["care_of_address"]) == c)))
    layers.append((f"nested at {PRIMARY}: secondary ({PART})", "C4",
                   lambda s: len(s.get("nested", []))))
    bottom = [0] * len(samples)
    for label, color, count in layers:
        top = [b + count(s) for b, s in zip(bottom, samples)]
        nested = label.startswith("nested")
        ax.fill_between(t, bottom, top, step="post", color=color, alpha=0.6 if nested else 0.7,
                        hatch="//" if nested else None, label=label)
        bottom = top
    _mark_growths(ax, growths, releases)
    ax.set_ylim(0, max([3.5] + [x + 0.5 for x in bottom]))
    ax.set_yticks(range(0, int(ax.get_ylim()[1]) + 1))
    ax.set_ylabel("bindings")
    ax.set_xlabel("time (s)")
    ax.set_title(f"Bindings: the HOA's for {OBJECT}'s home address (bicast while 2 or 3) and "
                 f"{OBJECT}'s own (nested) table on {PRIMARY}")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    path = dest / "bindings.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _net_name(net: str) -> str:
    return "home" if net == NETWORK_OF_HOST["dns23"] else f"net {net}"


def plot_latency(requests: list[dict[str, Any]], latency: list[dict[str, Any]],
                 growths: list[dict[str, Any]], releases: list[dict[str, Any]],
                 dest: Path, moves: Sequence[dict[str, Any]] = ()) -> Path:
    """Each request's RTT over time by the CO's network and the instance that served it;
    unanswered ones as red crosses; below, the median (and 90th percentile) per group, and
    per lease that moved its median before and after the move."""
    plt = _pyplot()
    moves = list(moves)
    # The lower panels grow with their rows (a label per latency group, two lines per move).
    lower = max(3.4, 0.15 * len(latency), 0.42 * len(moves))
    fig = plt.figure(figsize=(12, 5.6 + lower))
    grid = fig.add_gridspec(2, 2, height_ratios=[5.0, lower], width_ratios=[1.5, 1])
    ax = fig.add_subplot(grid[0, :])
    bx = fig.add_subplot(grid[1, 0])
    cx = fig.add_subplot(grid[1, 1])
    groups: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for q in requests:
        if q["answers"] >= 1 and q["rtt_ms"] is not None:
            by = str(q["served_by"]).split(",")[0]
            part = part_label(by, q.get("object", OBJECT))
            groups[f"{_net_name(q['net'])} -> {part} ({by})"].append((q["sent_s"], q["rtt_ms"]))
    for k, (label, points) in enumerate(sorted(groups.items())):
        ax.plot([t for t, _ in points], [r for _, r in points], ".", ms=2.5, color=f"C{k % 10}",
                label=label)
    top = max([1.0] + [r for pts in groups.values() for _, r in pts])
    lost = [q["sent_s"] for q in requests if q["answers"] == 0]
    if lost:
        ax.plot(lost, [top * 1.08] * len(lost), "x", color="red", ms=3,
                label=f"unanswered ({len(lost)})")
    _mark_growths(ax, growths, releases)
    ax.set_yscale("log")
    ax.set_ylabel("round trip (ms)")
    ax.set_xlabel(f"time (s); dashed: growth asked (orange: duplicate, red: duplicate on "
                  f"{GATEWAY}, purple: part move, cyan: traffic rule fired)")
    ax.set_title("Leased requests at the COs: round trip by network and serving instance")
    ax.legend(fontsize=7, loc="upper right", markerscale=3, ncol=2)
    labels = [f"{_net_name(r['net'])} -> {r['instance']}, {r['phase']} (n={r['answered']})"
              for r in latency]
    y = range(len(latency))
    bx.barh(y, [r["rtt_ms_median"] or 0 for r in latency], color="C0", label="median")
    bx.plot([r["rtt_ms_p90"] or 0 for r in latency], y, "|", ms=9, color="C3",
            label="90th percentile")
    bx.set_yticks(list(y), labels, fontsize=6.5)
    bx.invert_yaxis()
    bx.set_xscale("log")
    bx.set_xlabel("RTT (ms), log")
    bx.set_title("per network, instance and phase", fontsize=9)
    bx.legend(fontsize=7, loc="lower right")
    y = range(len(moves))
    cx.barh([k - 0.2 for k in y], [m.get("before_ms") or 0 for m in moves], height=0.4,
            color="C7", label="before the move")
    cx.barh([k + 0.2 for k in y], [m.get("after_ms") or 0 for m in moves], height=0.4,
            color="C2", label="after")
    cx.set_yticks(list(y), [f"{m['role']}{m.get('cycle', '')} {m['co']} "
                            f"({_net_name(m['net'])}, {m['object']}): {m['path_after']}\n"
                            f"{m['before']} -> {m['after']}"
                            for m in moves], fontsize=6.5)
    cx.invert_yaxis()
    cx.set_xlabel("median RTT (ms)")
    cx.set_title("a CO's latency before and after its lease moved", fontsize=9)
    cx.legend(fontsize=7, loc="lower right")
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
    g = g + [{"at_s": p["trigger_s"], "kind": "traffic", "router": p["router"]}
             for p in full.get("placements", [])]
    return [plot_shares(samples, g, r, dest), plot_bindings(samples, g, r, dest),
            plot_latency(requests, full["summary"]["latency"], g, r, dest,
                         full["summary"].get("moves", []))]


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
            grant = client.request(op.get("target", SERVICE), op["share"], op["cpu"],
                                   op["duration"])
            out = {"ok": True, "grant": grant.as_dict()}
    except CoError as exc:
        out = exc.as_dict()
    ms = round((time.perf_counter() - t0) * 1000, 3)
    return dict(out, ms=ms, sent_at=sent_at, done_at=time.time())


class Driver(HostDriver):
    """The main process's end of one host's :func:`co_driver` (a child inside the host)."""

    def __init__(self, client: Any, host: str, cos: list[str]) -> None:
        super().__init__(client, host, cos, "experiments.leases", {}, ExperimentError,
                         DRIVER_TIMEOUT)


# --- the network side ----------------------------------------------------------------------------


class Sampler(threading.Thread):
    """Every :data:`SAMPLE_S`: the broker's ``services`` and ``leases``, the HOA's
    ``bindings`` and the primary router's ``nested`` bindings, against the run's wall clock
    (``t0``)."""

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
                            self.client.leases(), self.client.call(PRIMARY, "nested"))
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
    """Publish the counter and its part as ``pair-svc`` and provision it leased on r18b, the
    counter as the mobile object ``svc`` (the primary; the part beside it on svc's mobile
    network prefix); wait until the broker lists it."""
    from .counter_service import publish_pair

    publish_pair(moat, SERVICE, parts=(PART,))
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
                           "host": step.host, "net": step.net, "target": step.target,
                           "share": step.share,
                           "cpu": step.cpu, "hold": step.hold, "end": step.end,
                           "rate": step.rate,
                           "duration": step.duration, "expect": step.expect,
                           "t_s": round(answer["sent_at"] - t0, 3),
                           "request_ms": answer.get("ms"),
                           "granted_at_s": round(answer["done_at"] - t0, 3)}
    if not answer.get("ok"):
        return dict(row, outcome="denied", reason=answer.get("reason"),
                    detail=answer.get("detail") or answer.get("error"), router=None,
                    part=None, instance_id=None, lease_id=None, address=None)
    hop = answer["grant"]["hops"][0]
    return dict(row, outcome="granted", reason=None, instance_id=hop["instance"],
                router=router_of(hop["instance"]), lease_id=hop["lease_id"],
                granted_s=hop["granted_s"], part=None, address=hop.get("address"))


class RuleActions:
    """The traffic phase's actions on the primary's router (:func:`traffic_schedule`):
    ``rule`` keeps the rule it holds and sets :data:`TRAFFIC_RULE`; ``restore`` puts back
    what it held. Each returns the rule as the router then holds it."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.saved: dict[str, Any] = {}

    def __call__(self, what: str) -> dict[str, Any]:
        if what == "rule":
            self.saved = dict(self.client.call(PRIMARY, "traffic_rule"))
            return dict(self.client.call(PRIMARY, "traffic_rule", **TRAFFIC_RULE),
                        before=self.saved)
        if what == "restore" and self.saved:
            return dict(self.client.call(PRIMARY, "traffic_rule", **self.saved))
        raise ValueError(f"no action {what!r}")


def execute(moat: Any, steps: list[Step], rate: float, progress: Any,
            actions: Sequence[tuple[float, str]] = (), act: Any = None) -> dict[str, Any]:
    """Run the plan: each lease at its time from its CO's host, its load started at once
    (at its step's rate, else ``rate``), its cancel (if it cancels) ``hold`` s after its
    grant; each of ``actions`` (``(at, what)``: :func:`traffic_schedule`) at its time, by
    ``act(what)`` (default :class:`RuleActions`); sample throughout; then wait (bounded)
    until every lease has ended, the duplicate's binding is gone and no part is away."""
    from agent.core.wait import WaitTimeout, wait_until

    client = moat.client
    act = act or RuleActions(client)
    drivers: dict[str, Driver] = {}
    leases: list[dict[str, Any]] = []
    loads: list[dict[str, Any]] = []
    done: list[dict[str, Any]] = []
    by_n = {s.n: s for s in steps}
    rows_by_n: dict[int, dict[str, Any]] = {}
    t0 = time.time()
    sampler = Sampler(client, moat.hoa, t0)
    settled = False
    try:
        for host in sorted(set(COS.values())):
            drivers[host] = Driver(client, host, [co for co, h in COS.items() if h == host])
        sampler.start()
        queue = [(s.at, 0, s.n, "request") for s in steps] + \
            [(at, -1, -k, what) for k, (at, what) in enumerate(actions, 1)]
        heapq.heapify(queue)
        while queue:
            at, _, n, kind = heapq.heappop(queue)
            time.sleep(max(0.0, t0 + at - time.time()))
            if n < 0:  # an action on the primary's router
                sent = time.time()
                try:
                    result: Any = act(kind)
                except Exception as exc:  # noqa: BLE001 - a figure missing, not the run
                    log.warning("%s on %s failed: %s", kind, PRIMARY, exc)
                    result = {"error": str(exc)}
                done.append({"t_s": round(sent - t0, 3), "what": kind, "result": result})
                continue
            step = by_n[n]
            driver = drivers[step.host]
            if kind == "cancel":
                row = rows_by_n[n]
                answer = driver.ask({"op": "cancel", "co": step.co, "lease_id": row["lease_id"]})
                row.update(ended="cancelled" if answer.get("ok") else "cancel refused",
                           ended_s=round(answer["done_at"] - t0, 3), cancel_ms=answer.get("ms"))
                continue
            answer = driver.ask({"op": "request", "co": step.co, "target": step.target,
                                 "share": step.share, "cpu": step.cpu,
                                 "duration": step.duration})
            row = lease_row(step, answer, t0)
            leases.append(row)
            rows_by_n[n] = row
            if row["outcome"] == "granted":
                client.keep_grant(step.host, answer["grant"])
                proc, out = client.leased_load(row["lease_id"], step.rate or rate,
                                               max(0.5, step.hold - LOAD_MARGIN_S),
                                               client=f"{step.co}-{step.n}")
                loads.append({"n": n, "proc": proc, "out": out})
                if step.end == "cancel":
                    heapq.heappush(queue, (row["granted_at_s"] + step.hold, 1, n, "cancel"))
            progress.update(1)

        def quiet() -> bool:
            s = sampler.latest()
            return s is not None and s["t_s"] > max(l["granted_at_s"] for l in leases) \
                and not s["leases"] and len(s["bindings"]) == 1 \
                and len(s["instances"]) == 1 and not s.get("nested")

        try:
            wait_until(quiet, SETTLE_TIMEOUT, interval=SAMPLE_S, what="every lease ended")
            settled = True
        except WaitTimeout:
            log.warning("leases, a duplicate or a secondary still there %.0f s after the plan",
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
            "sample_failures": sampler.failed, "settled": settled, "actions": done}


def analyse(out: dict[str, Any], growth: list[dict[str, Any]], read_load: Any,
            primary_count: int | None = None,
            placements: Sequence[dict[str, Any]] = (),
            part_count: int | None = None) -> dict[str, Any]:
    """Every figure of the run from what :func:`execute` gathered, the broker's ``growth``
    history, the load logs (``read_load(path)``), the counter's and the part's final counts
    on the primary's router and the duplicates its router placed by the traffic rule."""
    t0, leases, samples = out["t0"], out["leases"], out["samples"]
    parts = parts_of(samples)
    grown = {g.get("instance"): g for g in growth if g.get("instance")}
    for l in leases:
        if l["outcome"] == "granted":
            l["part"] = parts.get(l["instance_id"]) or ("primary" if l["router"] == PRIMARY
                                                        else "duplicate")
            # The lease that made the duplicate or secondary: the first one granted on it.
            g = grown.get(l["instance_id"])
            l["grew"] = g is not None and l is next(
                x for x in leases if x.get("instance_id") == l["instance_id"])
            l["growth_ms"] = g.get("ms") if l["grew"] and g else None
    ended_times(leases, samples)
    windows = part_windows(growth, t0)
    bound, away = hoa_bound(samples), part_away(samples, windows)
    where_part = part_history(samples)
    history = lease_history(samples)
    networks = {i["instance_id"]: i.get("network") or "" for s in samples
                for i in s["instances"]}
    served: dict[int, list[tuple[float, str]]] = {}
    for l in leases:
        if l["outcome"] != "granted":
            continue
        seen = history.get(l["lease_id"], [])
        l["final_instance"] = seen[-1][1] if seen else l["instance_id"]
        served[l["n"]] = served_history(l, seen, where_part)
        moved = next(((t, iid) for t, iid in served[l["n"]] if iid != l["instance_id"]), None)
        if moved is not None:
            l["moved_s"], l["moved_instance"] = moved
            l["moved_to"] = router_of(moved[1])
            l["moved_path"] = moved_path(l, networks)
    requests: list[dict[str, Any]] = []
    by_n = {l["n"]: l for l in leases}
    for load in out["loads"]:
        lease = by_n[load["n"]]
        requests += request_rows(lease, read_load(load["out"]), t0, bound,
                                 served.get(lease["n"], []), away, windows)
    for l in leases:
        mine = [q for q in requests if q["n"] == l["n"]]
        l.update(sent=len(mine), once=sum(1 for q in mine if q["answers"] == 1),
                 none=sum(1 for q in mine if q["answers"] == 0),
                 more=sum(1 for q in mine if q["answers"] > 1),
                 rtt_ms_median=median(q["rtt_ms"] for q in mine))
    growth_history = [dict(g, at_s=round(g["at"] - t0, 3), kind=_growth_kind(g, parts))
                      for g in growth]
    growths = growth_rows(leases, growth, requests, samples, t0)
    releases = release_rows(leases, samples)
    placed = placement_rows(placements, t0)
    # A duplicate the traffic rule placed starts from the checkpoint its router took between
    # the rule firing and the duplicate serving.
    instances = instance_rows(requests, growths + [
        {"kind": "duplicate", "start_s": p["trigger_s"], "end_s": p["placed_s"]}
        for p in placed])
    moves = move_rows(leases, requests, networks)
    summary = summarise(leases, requests, growths, releases, instances, samples, primary_count,
                        part_count, moves)
    summary["traffic"] = traffic_summary(placed, leases, requests, moves, releases, samples,
                                         growth_history, out.get("actions", []))
    events = event_rows(lease_events(leases, growth_history), sample_events(samples),
                        first_answer_events(instances),
                        traffic_events(placed, out.get("actions", [])))
    return {"leases": leases, "requests": requests, "growths": growths, "releases": releases,
            "instances": instances, "summary": summary, "events": events,
            "placements": placed}


def part_address(leases: Iterable[dict[str, Any]]) -> str | None:
    """The part's address, as the broker's grants for it gave it."""
    return next((l["address"] for l in leases if l.get("target") == PART and l.get("address")),
                None)


def nested_gre(pcap: Path, address: str, timeout: float = 60.0) -> dict[str, int]:
    """:func:`gre_pairs` of a capture (tshark)."""
    proc = subprocess.run(["tshark", "-r", str(pcap), "-Y", f"gre && ip.dst == {address}",
                           "-T", "fields", "-e", "ip.src", "-e", "ip.dst"],
                          capture_output=True, text=True, timeout=timeout)
    return gre_pairs(proc.stdout.splitlines(), address) if proc.returncode == 0 else {}


def message_counts(pcaps: Iterable[Path], address: str | None = None) -> dict[str, dict]:
    """Per capture: MOAT control messages by type (moat.lua), the protocol events and the
    GRE packets carrying requests to the part's ``address`` (by outer addresses)."""
    import shutil

    from .service_path import broker_message_counts

    if shutil.which("tshark") is None:
        return {}
    return {p.stem: {"moat": broker_message_counts(p), "events": count_events(p),
                     "gre_to_part": nested_gre(p, address) if address else {}}
            for p in pcaps}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm import tqdm

    from topologies.catalog import make_topo
    from topologies.moatnet import MoatNetwork

    steps = plan(args.cycles, args.seed, args.parts, args.return_under_load, args.traffic)
    topo = make_topo(args.topo)
    moat = MoatNetwork(topo, objects=[OBJECT])
    for co in EXTRA_COS:  # more CO identities, each with its own key, on the same hosts
        moat.keyring.add_co(co)
    with moat, contextlib.ExitStack() as stack:
        print(f"run {moat.run.run_id}: {len(steps)} leases of {SERVICE} and its part {PART} "
              f"in {args.cycles} duplicate cycle(s)"
              f"{', a traffic phase' if args.traffic else ''}"
              f"{' and a secondaries phase' if args.parts else ''} from {', '.join(COS)}, "
              f"{args.rate:g} requests/s each (primary on {PRIMARY}, broker on {moat.broker}, "
              f"seed {args.seed}; the plan lasts {plan_end(steps):.0f} s)")
        for name, bridge in (("home_lan", "s16"), ("foreign_lan_12", "s12"),
                             ("foreign_lan_14", "s14")):
            stack.enter_context(moat.capture(bridge, name))
        provision_primary(moat)
        bar = tqdm(total=len(steps), desc="leases", unit="lease", file=sys.stderr)
        out = execute(moat, steps, args.rate, bar, traffic_schedule(steps))
        bar.close()
        growth = moat.client.call(moat.broker, "growth")
        try:  # duplicates the traffic rule placed (in the traffic phase only, by default)
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
        part_count = None
        if any(s.target == PART for s in steps):
            try:
                stats = moat.client.call(PRIMARY, "object_stats", name=PART)
                part_count = int(stats["state"]["count"])
            except Exception as exc:  # noqa: BLE001 - a figure missing, not the run
                log.warning("no final count of the part on the primary: %s", exc)
        stack.close()
        dest = results_dir(EXPERIMENT, moat.run.run_id, args.out)
        copy_captures(moat.run.dir / "captures", dest)
        full = analyse(out, growth, moat.client.read_load, primary_count, placements,
                       part_count)
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
           "service": SERVICE, "object": OBJECT, "part": PART, "primary": PRIMARY,
           "part_address": part_address(full["leases"]),
           "vm": {"cpu": VM_CPU, "memory_mb": VM_MEMORY_MB},
           "plan": [dict(dataclasses.asdict(s), duration=s.duration) for s in steps],
           "summary": summary, "growths": full["growths"], "releases": full["releases"],
           "moves": summary["moves"],
           "instances": full["instances"], "leases": full["leases"],
           "traffic_placements": full["placements"],
           "traffic_actions": out.get("actions", []),
           "captures": message_counts(sorted((dest / "captures").glob("*.pcap")),
                                      part_address(full["leases"])),
           "plots": [p.name for p in pngs]}
    write_json(dest / "summary.json", doc)
    return {"summary": doc, "events": full["events"], "dest": dest}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moat run leases", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=3,
                        help=f"duplicate cycles of arrivals, growths to three instances and "
                             f"releases (default 3, at most {MAX_CYCLES}; about 16 s each)")
    parser.add_argument("--parts", action=argparse.BooleanOptionalAction, default=True,
                        help="after the cycles, the secondaries phase: the part moves, "
                             "is served through the nesting and comes back (default: on; "
                             "about 19 s)")
    parser.add_argument("--traffic", action=argparse.BooleanOptionalAction, default=True,
                        help="after the cycles, the traffic phase: the traffic rule on "
                             f"{PRIMARY} set to {TRAFFIC_RULE['min_requests']} requests in "
                             f"{TRAFFIC_RULE['window_s']:g} s, {TRAFFIC_RULE['share']:.0%} from "
                             f"one foreign network, places a duplicate near a net-14 CO's "
                             f"load of {TRAFFIC_RATE:g}/s (default: on; about 14 s)")
    parser.add_argument("--return-under-load", action=argparse.BooleanOptionalAction,
                        default=True,
                        help="P's load (home network, through the nesting) runs on while the "
                             "secondary gives its part back, into R's lease (default: on; "
                             "--no-return-under-load: P and Q end before S)")
    parser.add_argument("--rate", type=float, default=20.0,
                        help=f"leased requests per second of each CO of the cycles and the "
                             f"secondaries phase (default 20, at most {MAX_RATE:g}; from about "
                             f"40 the default traffic rule places the duplicate before the "
                             f"lease that does not fit)")
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
        gre = {k: v.get("gre_to_part") for k, v in caps.items() if v.get("gre_to_part")}
        if gre:
            print("GRE to the part's address in the captures (outer source -> destination): "
                  + "; ".join(f"{k}: " + ", ".join(f"{p} {n}" for p, n in v.items())
                              for k, v in gre.items()))
    print(f"results in {out['dest']} ({', '.join(out['summary']['plots'])}, summary.json, "
          "events.csv, leases.csv, requests.csv, samples.csv, captures/)")
    print(f"done in {time.monotonic() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
