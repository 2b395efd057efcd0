"""``moat run faults``: the network, the load, each fault in turn, the results.

Builds the patent's topology, places the object ``counter`` away from home on r18b (its FOA
r18a, its HOA r22b) and has the corresponding object co14 (net 14) send it 200 requests/s
through the HOA's tunnel for the whole run: one load process per fault window, back to back,
each with its own client id (the object's at-most-once memory keys on client and seq).

Each fault of :mod:`.catalog` in turn: check the object serves (its count rises), a second of
baseline, the fault, then a settling period after the fault ends (a killed agent back, a
link up, a move over); the window's requests give the row (:mod:`.timeline`). A fault that
did not recover by itself is repaired by the driver (the agent started again by hand, the
object placed again with a fresh state: a new epoch of the counter), and the row says so:
a repaired row does not hold. Writes ``results/faults/<run-id>/`` (summary.json, rows.csv,
timeline.png, the CO logs) and exits 1 unless every fault recovered with the state exact.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.core.errors import AgentError
from agent.core.wait import WaitTimeout, wait_until
from topologies.errors import TopologyError
from topologies.moatnet import MoatNetwork
from topologies.patent import PatentTopo

from ..results import results_dir, write_csv, write_json
from . import injector as inj
from .catalog import ORDER, SHORT, Fault, by_name
from .report import ROW_COLUMNS, build_summary, make_row, not_run_row, plot, table
from .timeline import Request, analyse_window, final_check, parse_requests, state_check

log = logging.getLogger(__name__)

OBJECT, HOSTING, OTHER, CO_HOST = "counter", "r18b", "r20a", "co14"
#: The upgrade row's VM: only a provisioned VM upgrades, so for that row the counter runs as
#: the mobile object of VM_NAME (service VM_SERVICE from the remote site) on HOSTING, on the
#: same home address (the load is unchanged), from a fresh count.
VM_NAME, VM_SERVICE, VM_VERSIONS = "counter-vm", "counter-svc", ("1.0", "2.0")
LINK = ("r22a", "r18a")
#: Seconds the routers get to put a flapped link's static routes back before one is called missing.
ROUTES_BACK_S = 3.0
#: The FOA an object hosted on a router registers through (r20a is its own net's FOA).
FOA_OF = {"r18b": "r18a", "r18a": "r18a", "r20a": "r20a"}
LOAD_MAX_S = 590.0


class FaultRunError(inj.InjectionError):
    """The run cannot go on (the object serves nowhere, even after a repair)."""


@dataclass
class Window:
    """One fault's load window: its client id, its log, its requests once read."""

    index: int
    client: str
    path: Path
    proc: subprocess.Popen | None = None
    requests: list[Request] = field(default_factory=list)


@dataclass
class Run:
    moat: MoatNetwork
    args: argparse.Namespace
    epoch: int = 0
    #: Requests answered in the current epoch (the counter's life since it was last placed).
    epoch_requests: list[Request] = field(default_factory=list)
    all_requests: list[Request] = field(default_factory=list)
    windows: int = 0
    #: The VM the counter runs in (the upgrade row), or "" when it runs placed.
    vm: str = ""

    @property
    def client(self) -> Any:
        return self.moat.client

    # --- the load ------------------------------------------------------------------------

    def start_load(self) -> Window:
        self.windows += 1
        client = f"{CO_HOST}-w{self.windows}-e{self.epoch}"
        w = Window(self.windows, client, self.moat.run.dir / f"co-{self.windows:02d}.jsonl")
        ready = self.moat.run.dir / f"co-{self.windows:02d}.ready"
        w.proc = self.moat.net[CO_HOST].popen(
            [sys.executable, "-m", "nodetools.co_load", "--dst", self.moat.objects[OBJECT].home_address,
             "--rate", str(self.args.rate), "--duration", str(LOAD_MAX_S), "--client", client,
             "--out", str(w.path), "--ready", str(ready)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.moat.wait_for(lambda: ready.exists() or w.proc.poll() is not None, timeout=10, interval=0.01)
        return w

    def stop_load(self, w: Window) -> list[Request]:
        assert w.proc is not None
        if w.proc.poll() is None:
            w.proc.terminate()  # co_load writes its log on SIGTERM
        _out, err = w.proc.communicate(timeout=60)
        try:
            records = [json.loads(line) for line in w.path.read_text().splitlines()]
        except (OSError, ValueError) as exc:
            raise FaultRunError(f"the CO's log {w.path} is unreadable ({exc}): "
                                f"{err.decode(errors='replace')[-300:]}") from None
        w.requests = parse_requests(records, w.client)
        self.all_requests.extend(w.requests)
        return w.requests

    # --- the object ----------------------------------------------------------------------

    def where(self) -> tuple[list[str], list[str]]:
        return inj.instances(self.client, OBJECT)

    def serving(self, router: str, timeout: float = 5.0) -> bool:
        """The counter on ``router`` counts the load's requests (its count rises)."""
        first = inj.object_count(self.client, router, OBJECT)
        if first is None:
            return False
        try:
            wait_until(lambda: (inj.object_count(self.client, router, OBJECT) or -1) > first, timeout,
                       interval=0.05, what=f"{OBJECT} counting on {router}")
            return True
        except WaitTimeout:
            return False

    def place(self) -> None:
        """Place the counter on r18b with a fresh state (a new epoch) and wait for its binding."""
        self.moat.place_object(OBJECT, HOSTING)
        home = self.moat.objects[OBJECT].home_address
        wait_until(lambda: any(b.get("home_address") == home
                               for b in self.client.call(self.moat.hoa, "bindings", timeout=2)),
                   20, interval=0.05, what=f"{OBJECT} bound at the HOA")
        self.epoch += 1
        self.epoch_requests = []

    def bound(self) -> bool:
        home = self.moat.objects[OBJECT].home_address
        return any(b.get("home_address") == home
                   for b in self.client.call(self.moat.hoa, "bindings", timeout=2))

    def as_vm(self, here: str) -> str:
        """For the upgrade row: the placed counter stopped, and run instead as the mobile
        object of a VM on HOSTING provisioned from the remote site (service VM_SERVICE 1.0,
        an update check every second); a new epoch. Returns where it runs."""
        from experiments.counter_service import publish_counter

        self.client.call(here, "object_stop", name=OBJECT, deregister=True, timeout=10)
        wait_until(lambda: not self.bound(), 20, interval=0.05, what=f"{OBJECT}'s binding gone")
        publish_counter(self.moat, VM_SERVICE, VM_VERSIONS[0])
        answer = self.moat.provision(HOSTING, vm=VM_NAME, kind="service", service=VM_SERVICE,
                                     mobile={"counter": OBJECT}, policy={"update_check_interval_s": 1.0})
        if not answer.get("ok"):
            raise inj.InjectionError(f"{HOSTING} refused the VM for {OBJECT}: {answer.get('error') or answer}")
        self.vm = VM_NAME
        wait_until(self.bound, 20, interval=0.05, what=f"{OBJECT} of {VM_NAME} bound at the HOA")
        self.epoch += 1
        self.epoch_requests = []
        return HOSTING

    def placed_again(self) -> None:
        """After the upgrade row: the VM removed (its object deregisters), the counter placed
        on HOSTING again (a new epoch) unless a repair already did."""
        with contextlib.suppress(AgentError, TopologyError):
            self.client.call(HOSTING, "vm_remove", name=self.vm, timeout=60)
        self.vm = ""
        if not self.where()[0]:
            wait_until(lambda: not self.bound(), 20, interval=0.05, what=f"{OBJECT}'s binding gone")
            self.place()

    def repair(self, fault: Fault) -> list[str]:
        """After a fault that did not recover: the link's routes back, every agent answering,
        the counter at exactly one router. What was done, in words (empty: nothing needed)."""
        done = []
        if fault.kind == "link":
            for router in LINK:
                if inj.missing_routes(self.moat, router):
                    inj.restore_routes(self.moat, router)
                    done.append(f"{router}'s static routes installed again by the driver")
        for router in self.client.routers():
            if inj.agent_status(self.client, router) is None:
                # Its supervisor may be backing off after several crashes: give it its time.
                if inj.wait_agent_back(self.client, router, old_pid=-1) is None:
                    done.append(inj.repair_agent(self.moat, router))
        where, _dead = self.where()
        if len(where) > 1:
            # Which instance holds the latest state is what the fault put in doubt: stop
            # them all and start afresh, rather than guess.
            for router in where:
                with contextlib.suppress(AgentError, TopologyError):
                    self.client.call(router, "object_stop", name=OBJECT, deregister=True, timeout=10)
            done.append(f"instances on {where} stopped by the driver")
            where = []
        if not where:
            self.place()
            done.append(f"{OBJECT} placed again on {HOSTING} by the driver with a fresh state "
                        f"(epoch {self.epoch})")
        return done

    # --- one fault -----------------------------------------------------------------------

    def victim_router(self, fault: Fault, here: str) -> str:
        if fault.victim == "hoa":
            return self.moat.hoa
        if fault.victim == "foa":
            return FOA_OF.get(here, "")
        return here

    def inject(self, fault: Fault, here: str) -> dict[str, Any]:
        """Make ``fault`` happen; when it happened, to whom, and what followed."""
        client = self.client
        if fault.kind == "kill":
            victim = self.victim_router(fault, here)
            if not victim:
                raise inj.InjectionError(f"no {fault.victim} for an object on {here}")
            at = time.time()
            pid = inj.kill_agent(client, victim)
            return {"at": at, "victim": victim, "pid": pid, "ended": at}
        if fault.kind == "link":
            times = inj.link(self.moat, *LINK, fault.hold_s)
            # The routers' static-routes role puts them back on the link-up event: give it
            # ROUTES_BACK_S before calling a route missing.
            with contextlib.suppress(WaitTimeout):
                wait_until(lambda: not any(inj.missing_routes(self.moat, r) for r in LINK),
                           ROUTES_BACK_S, interval=0.01, what="the link's routes back")
            back = time.time()
            missing = {r: inj.missing_routes(self.moat, r) for r in LINK}
            out = {"at": times["down_at"], "victim": "-".join(LINK), "ended": times["up_at"],
                   "routes_missing_after_up": {r: m for r, m in missing.items() if m}}
            if not out["routes_missing_after_up"]:
                out["routes_back_after_up_s"] = round(back - times["up_at"], 3)
            return out
        if fault.kind == "upgrade":
            from experiments.counter_service import publish_counter

            if not self.vm:
                raise inj.InjectionError(f"{OBJECT} runs as no VM's object: nothing upgrades")
            made = inj.upgrade_site_down(self.moat, here, self.vm, lambda: publish_counter(
                self.moat, VM_SERVICE, VM_VERSIONS[1]), VM_VERSIONS[1])
            made["how"] = _upgrade_summary(made)
            return made
        target = OTHER if here != OTHER else HOSTING
        if fault.kind == "inject":
            wanted = fault.point.split("+")
            points = inj.supported_points(client, target)
            lacking = [p for p in wanted if p not in points]
            if lacking:
                raise inj.InjectionError(f"{target}'s migration role has no fault point {lacking} "
                                         f"(it offers {list(points)})")
            for point in wanted:
                client.call(target, "inject_fault", point=point, count=1)
            at = time.time()
            move = inj.start_move(client, OBJECT, target, fault.mode)
            move.join()
            inj.disarm(client, target, wanted)
            return {"at": at, "victim": target, "ended": move.ended or time.time(),
                    "move": _move_summary(move)}
        if fault.kind == "migration_crash":
            victim = here if fault.victim == "source" else target
            status = inj.agent_status(client, victim)
            if status is None or not isinstance(status.get("pid"), int):
                raise inj.InjectionError(f"{victim}'s agent did not answer before the move: nothing to kill")
            pid = status["pid"]
            if fault.point in inj.supported_points(client, victim):
                # The role's own crash point: it dies (SIGKILL) right after the step.
                client.call(victim, "inject_fault", point=fault.point, count=1)
                move = inj.start_move(client, OBJECT, target, fault.mode)
                at = inj.wait_pid_gone(pid, inj.MOVE_TIMEOUT, move)
                how = f"crash point {fault.point} on {victim}"
                if at is None:
                    move.join()
                    inj.disarm(client, victim, [fault.point])
                    raise inj.InjectionError(f"the move ended before crash point {fault.point} fired: "
                                             f"{_move_summary(move)}")
            elif fault.marker:
                # Not offered (yet): kill -9 from outside the moment the source logs the step.
                source_log = self.moat.run.dir / f"{here}.log"
                offset = inj.log_size(source_log)
                move = inj.start_move(client, OBJECT, target, fault.mode)
                needle = f"migrate {OBJECT} {here}->{target}: {fault.marker}"
                if inj.wait_log_line(source_log, offset, needle, inj.MOVE_TIMEOUT, move) is None:
                    move.join()
                    raise inj.InjectionError(f"the move ended before the source logged {fault.marker!r}: "
                                             f"{_move_summary(move)}")
                at = time.time()
                os.kill(pid, signal.SIGKILL)
                how = f"kill -9 of {victim} when the source logged '{fault.marker}' (no crash point {fault.point})"
            else:
                raise inj.InjectionError(f"{victim}'s migration role has no crash point {fault.point} "
                                         f"and no step line of the source marks that instant")
            move.join()
            return {"at": at, "victim": victim, "pid": pid, "how": how,
                    "ended": max(at, move.ended or at), "move": _move_summary(move)}
        raise inj.InjectionError(f"no injector for fault kind {fault.kind!r}")

    def run_fault(self, fault: Fault) -> dict[str, Any]:
        if fault.not_runnable:
            return not_run_row(fault, fault.not_runnable)
        if self.vm and fault.kind != "upgrade":
            self.placed_again()  # the rows but the upgrade's move and kill a placed counter
        where, dead = self.where()
        before_note = ""
        if len(where) != 1 or dead:
            # What the previous fault left (an instance gone or doubled, an agent down).
            try:
                done = self.repair(fault)
            except (AgentError, TopologyError) as exc:
                done = [f"repair failed: {exc}"]
            before_note = f"before this fault {OBJECT} was at {where or 'no router'}: {'; '.join(done)}"
            where, dead = self.where()
            if len(where) != 1 or dead:
                return not_run_row(fault, f"before the fault {OBJECT} is at {where or 'no router'} and "
                                          f"agents {dead} do not answer, even after a repair")
        here = where[0]
        if fault.kind == "upgrade" and not self.vm:
            try:
                here = self.as_vm(here)
            except (AgentError, TopologyError, WaitTimeout) as exc:
                return not_run_row(fault, f"{OBJECT} could not be run as {VM_NAME}'s object: {exc}")
        window = self.start_load()
        try:
            if not self.serving(here):
                # The previous fault left it registered nowhere useful: start it afresh.
                with contextlib.suppress(Exception):
                    self.client.call(here, "object_stop", name=OBJECT, deregister=True, timeout=10)
                try:
                    self.place()
                except (AgentError, TopologyError) as exc:
                    self.stop_load(window)
                    return not_run_row(fault, f"{OBJECT} did not serve before the fault and could "
                                              f"not be placed again on {HOSTING}: {exc}")
                here = HOSTING
                if not self.serving(here, timeout=10):
                    self.stop_load(window)
                    return not_run_row(fault, f"{OBJECT} does not count the load's requests, "
                                              f"even placed again on {HOSTING}")
                before_note = (f"{OBJECT} did not serve before this fault: placed again on {HOSTING} "
                               f"(epoch {self.epoch})")
            time.sleep(self.args.baseline)  # the window's baseline, before the fault
            restarts_before = {r: inj.supervisor_restarts(self.moat.run.dir, r)
                               for r in self.client.routers()}
            try:
                made = self.inject(fault, here)
            except inj.InjectionError as exc:
                self.stop_load(window)
                return not_run_row(fault, str(exc))
            victim = made.get("victim", "")
            back = None
            if "pid" in made and victim in self.client.routers():
                back = inj.wait_agent_back(self.client, victim, made["pid"])
            # The settling period: what happens after the fault ended is what is measured.
            time.sleep(max(0.0, made["ended"] + self.args.settle - time.time()))
        finally:
            if window.proc is not None and window.proc.poll() is None:
                self.stop_load(window)
        after_where, after_dead = self.where()
        restarts = None
        if "pid" in made and victim in self.client.routers():
            # What the supervisor counted (None: the agent runs unsupervised).
            now, was = inj.supervisor_restarts(self.moat.run.dir, victim), restarts_before.get(victim)
            restarts = now - (was or 0) if now is not None else inj.restarts_of(back)
        notes = [before_note] if before_note else []
        if "pid" in made:
            notes.append(f"{victim} pid {made['pid']} -> "
                         f"{back.get('pid') if back else 'not back within %.0fs' % inj.RECOVER_TIMEOUT}")
        if made.get("how"):
            notes.append(made["how"])
        move = made.get("move")
        if move:
            notes.append(f"move {'ok' if move['ok'] else 'failed'}: {move['error'] or move['last_step']}")
        result = analyse_window(window.requests, made["at"], tail=self.args.tail)
        if fault.kind == "upgrade":
            notes.append(_upgrade_losses(window.requests, made))
        state = state_check(self.epoch_requests, window.requests)
        self.epoch_requests.extend(window.requests)
        if made.get("routes_missing_after_up"):
            notes.append(f"routes still gone {ROUTES_BACK_S:g}s after the link came back: "
                         f"{made['routes_missing_after_up']}")
        elif "routes_back_after_up_s" in made:
            notes.append(f"routes back {made['routes_back_after_up_s']:.3f}s after link up")
        repaired: list[str] = []
        if len(after_where) != 1 or after_dead or not result.recovered:
            try:
                repaired = self.repair(fault)
            except (AgentError, TopologyError) as exc:
                repaired = [f"the driver's repair failed: {type(exc).__name__}: {exc}"]
        if repaired:
            notes.append("; ".join(repaired))
        return make_row(fault, result, state, fault_at=made["at"], victim=victim,
                        agent_restarts=restarts, instances=len(after_where),
                        repaired="; ".join(repaired), note="; ".join(notes),
                        detail={"where_after": after_where, "dead_after": after_dead,
                                "agent_back": bool(back) if "pid" in made else None,
                                "window_client": window.client, **{k: v for k, v in made.items()
                                                                    if k not in ("victim",)}})


def _upgrade_summary(made: dict[str, Any]) -> str:
    """The upgrade row's story in one line: refused while the site was cut, then upgraded."""
    at = made["at"]
    error = made.get("error") or {}
    refused = (f"refused at +{made['refused_at'] - at:.1f}s ({error.get('step')}: "
               f"{str(error.get('reason'))[:80]}), still {made.get('version_after_refusal')}"
               if made.get("refused_at") else "NOT refused while the site was cut")
    upgraded = (f"upgraded {made['from']} -> {made['to']} at +{made['upgraded_at'] - at:.1f}s "
                f"(runs {made.get('version_after')})" if made.get("upgraded_at")
                else f"NOT upgraded once the site was back (runs {made.get('version_after')})")
    return (f"{made['victim']} cut while {made['vm']}'s upgrade {made['from']} -> {made['to']} "
            f"was held after its probe: {refused}; site back at +{made['site_back_at'] - at:.1f}s, "
            f"{upgraded}")


def _upgrade_losses(requests: list[Any], made: dict[str, Any]) -> str:
    """Which of the upgrade row's losses the cut site caused and which the upgrade's swap
    (the objects stopped, the new version started) once the site was back."""
    at, back = made["at"], made.get("site_back_at") or made["ended"]
    lost = [r.sent for r in requests if not r.answered and r.sent >= at - 1.0]
    cut = [t for t in lost if t < back]
    swap = [t for t in lost if t >= back]
    span = f" (sent +{min(swap) - at:.2f}..+{max(swap) - at:.2f}s)" if swap else ""
    return (f"lost while the site was cut and the upgrade refused: {len(cut)}; "
            f"after, during the upgrade's swap: {len(swap)}{span}")


def _move_summary(move: inj.Move) -> dict[str, Any]:
    report = move.report or {}
    steps = report.get("steps") or []
    return {"ok": bool(report.get("ok")), "error": move.error or report.get("error") or "",
            "last_step": steps[-1][0] if steps else "", "steps": [s[0] for s in steps]}


def selected(args: argparse.Namespace) -> list[Fault]:
    if args.faults:
        names = [n.strip() for n in args.faults.split(",") if n.strip()]
        return [by_name(n) for n in names]
    return [by_name(n) for n in (SHORT if args.short else ORDER)]


def run(args: argparse.Namespace) -> dict[str, Any]:
    faults = selected(args)
    started = time.monotonic()
    moat = MoatNetwork(PatentTopo(), objects=[OBJECT], advertise_interval=args.adv_interval)
    rows: list[dict[str, Any]] = []
    with moat:
        r = Run(moat, args)
        print(f"run {moat.run.run_id}: {len(faults)} faults, {args.rate:g} requests/s from {CO_HOST} "
              f"to {OBJECT} on {HOSTING}", flush=True)
        try:
            r.place()
        except (AgentError, TopologyError) as exc:
            tail = "\n".join(inj.agent_log(moat.client, HOSTING))
            raise FaultRunError(f"{OBJECT} could not be placed on {HOSTING}: {exc}\n"
                                f"{HOSTING}'s agent log ends:\n{tail}") from None
        for fault in faults:
            print(f"  {fault.name} ...", flush=True)
            try:
                row = r.run_fault(fault)
            except (AgentError, TopologyError) as exc:  # an agent refused what the driver asked
                log.warning("%s: %s", fault.name, exc)
                row = not_run_row(fault, f"the driver could not go on: {type(exc).__name__}: {exc}")
            rows.append(row)
            verdict = ("holds" if row["holds"] else "not run" if row["status"] != "ran"
                       else "DOES NOT HOLD")
            print(f"    {verdict}: recovered={row['recovered']} recovery_s={row['recovery_s']} "
                  f"lost={row['lost']} exact={row['exact']} {row['note']}", flush=True)
        where, _dead = r.where()
        count = inj.object_count(moat.client, where[0], OBJECT) if len(where) == 1 else None
        final = dict(final_check(r.epoch_requests, count), epochs=r.epoch, where=where)
        dest = results_dir("faults", moat.run.run_id, args.out)
        for path in sorted(moat.run.dir.glob("co-*.jsonl")):
            (dest / path.name).write_bytes(path.read_bytes())
        machine = f"{platform.machine()} x{os.cpu_count()}, Python {platform.python_version()}"
        summary = build_summary(moat.run.run_id, rows, final,
                                variant="short" if args.short else ("custom" if args.faults else "full"),
                                rate=args.rate,
                                measured_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                                duration_s=time.monotonic() - started,
                                extra={"settle_s": args.settle, "baseline_s": args.baseline,
                                       "tail": args.tail, "machine": machine,
                                       "requests": len(r.all_requests)})
    summary["plots"] = [plot(r.all_requests, rows, dest).name]
    write_json(dest / "summary.json", summary)
    write_csv(dest / "rows.csv", rows, ROW_COLUMNS)
    summary["dir"] = str(dest)
    return summary


def print_summary(summary: dict[str, Any]) -> None:
    print(table(summary["rows"]))
    for row in summary["rows"]:
        if not row["holds"]:
            print(f"NOT RECOVERED {row['name']}: lacks {row['mechanism']}")
    fin = summary["final"]
    print(f"\ncounter at the end: {fin['object_count']} (object) for {fin['answered']} answered, "
          f"{fin['lost']} lost in its last epoch (of {fin['epochs']}); exact: {fin['exact']}")
    print(f"recovery time over {len([r for r in summary['rows'] if r['recovered']])} recovered faults: "
          f"median {summary['recovery_s_median']} s, worst {summary['recovery_s_worst']} s")
    print(f"{len(summary['recovered'])}/{len(summary['rows'])} faults recover with the state exact; "
          f"{summary['duration_s']} s; {summary.get('dir')}/summary.json")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moat run faults", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faults", help=f"comma-separated faults (default all: {', '.join(ORDER)})")
    parser.add_argument("--short", action="store_true", help=f"the test's variant: {', '.join(SHORT)}")
    parser.add_argument("--rate", type=float, default=200.0, help="requests per second (default 200)")
    parser.add_argument("--settle", type=float, default=8.0,
                        help="seconds measured after each fault ends (default 8)")
    parser.add_argument("--baseline", type=float, default=1.0, help="seconds of load before each fault")
    parser.add_argument("--tail", type=int, default=50,
                        help="answered requests in a row after the last loss to call service back")
    parser.add_argument("--adv-interval", type=float, default=1.0, help="agent advertisement interval (s)")
    parser.add_argument("--out", type=Path, default=None, help="results root (default results/)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0 < args.rate <= 2000 or args.settle <= 0 or args.baseline < 0 or args.tail < 1:
        parser.error("--rate must be in (0, 2000], --settle > 0, --baseline >= 0, --tail >= 1")
    try:
        selected(args)
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    summary = run(args)
    print_summary(summary)
    return 0 if summary["holds"] else 1


if __name__ == "__main__":
    sys.exit(main())
