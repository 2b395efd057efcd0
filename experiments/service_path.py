"""The service broker experiment — ``sudo moat run service-path`` (patent Fig. 12).

In the patent's topology, with the broker on the HOA's router r22b, the four converter
services run leased, each in a VM with a limited capacity (a ``share`` of the service and
the VM's CPU): text2html on r22a, html2rtf on r22b, text2word and word2rtf on r22c. Several
corresponding objects (co12 and co14, and a second CO identity on each host, ``co12-b`` and
``co14-b``, each with its own key) ask the broker for ``text -> rtf`` with different
constraints (share %, CPU, duration) over time, in cycles of five:

1. a big request (30-40 % share): the broker's cheapest path, text → HTML → RTF (from either
   network the HTML hops are fewer router hops away), is granted;
2. another big one: the HTML path cannot fit it any more, so its hops are hidden and the
   broker grants text → WORD → RTF;
3. a third big one: neither path fits: denied ``no_capacity``;
4. the first CO cancels its lease (step 230): its share and CPU come back, and a big request
   gets the HTML path again;
5. a small request (5-10 %) fits beside it on the HTML path.

The other leases expire (their durations are 2-4 s) before the next cycle starts. Each
granted request runs its path on a real text document, hop after hop, with the hops'
credentials; the output is real RTF. Constraints and which CO asks are drawn from ``--seed``.

Measured by the CO's own process (``time.perf_counter`` inside the CO host): ``request_ms``
from sending the LEASE_REQUEST to the grant decoded (HMAC, TCP 4340 and the broker's path
search included), ``rtf_ms`` from the grant to the RTF document back from the last hop. The
broker's ``services`` command is sampled every 0.25 s for the share used per instance, and
its ``leases`` command tells when a lease expired.

Writes ``results/service-path/<run-id>/``: summary.json, requests.csv, services.csv (the
samples), documents/ (each RTF produced), paths.png, shares.png and captures/ (home LAN and
foreign LAN 14, where the broker's messages decode with packets/wireshark/moat.lua).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import random
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .co_driver import HostDriver
from .results import copy_captures, results_dir, write_csv, write_json
from .tables import format_table

log = logging.getLogger(__name__)

EXPERIMENT = "service-path"
TARGET = "text -> rtf"
SERVICES_DIR = Path(__file__).resolve().parent.parent / "services"
#: The converters: router, port. Capacity of each VM: :data:`VM_SHARE` %, :data:`VM_CPU` cores.
CONVERTERS = {"text2html": ("r22a", 5101), "html2rtf": ("r22b", 5102),
              "text2word": ("r22c", 5103), "word2rtf": ("r22c", 5104)}
VM_SHARE = 50.0
VM_CPU = 0.5
HTML_PATH = "text2html -> html2rtf"
WORD_PATH = "text2word -> word2rtf"
#: The CO identities and the host each acts from (each has its own key in co_keys.json).
COS = {"co12": "co12", "co14": "co14", "co12-b": "co12", "co14-b": "co14"}
EXTRA_COS = ("co12-b", "co14-b")
#: Seconds between the requests of a cycle, and after a cycle's last lease has expired.
GAP_S = 0.8
CYCLE_MARGIN_S = 0.7
SAMPLE_S = 0.25
#: Bounds on the whole run (whatever --requests asks).
MAX_REQUESTS = 200
DRIVER_TIMEOUT = 30.0
SETTLE_TIMEOUT = 20.0
DOCUMENT = ("MOAT service path\n\nA corresponding object asks the broker for text -> rtf; "
            "the broker picks the path {HTML or WORD} that can take the lease.\n"
            "Caf\u00e9, braces } and backslashes \\ survive the trip.\n")
REQUEST_COLUMNS = ["n", "t_s", "co", "share", "cpu", "duration", "outcome", "reason", "path",
                   "instances",
                   "granted_s", "request_ms", "rtf_ms", "rtf_bytes", "ended", "ended_s"]
SAMPLE_COLUMNS = ["t_s", "instance", "service", "used_share", "share", "used_cpu", "cpu", "leases"]


class ExperimentError(RuntimeError):
    """The experiment could not run (a service not provisioned, a CO driver gone silent)."""


# --- the plan (pure) ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One request of the plan: when (s from the start), who, what constraints; ``cancel_at``
    (s from the start) when its CO cancels the lease after using it."""

    n: int
    at: float
    co: str
    share: float
    cpu: float
    duration: float
    kind: str
    cancel_at: float | None = None


def plan_requests(count: int, seed: int) -> list[Step]:
    """``count`` requests in cycles of five (big, big, big, cancel + big, small; see the
    module's docstring), constraints drawn from ``seed``. A cycle starts once every lease of
    the previous one has expired (its durations are known), so each cycle starts empty."""
    if not 1 <= count <= MAX_REQUESTS:
        raise ValueError(f"--requests must be in [1, {MAX_REQUESTS}], not {count}")
    rng = random.Random(seed)
    steps: list[Step] = []
    start = 0.0
    while len(steps) < count:
        cos = list(COS)
        rng.shuffle(cos)
        ends = []
        for i in range(5):
            if len(steps) == count:
                break
            small = i == 4
            share = round(rng.uniform(5, 10) if small else rng.uniform(30, 40), 1)
            cpu = round(rng.uniform(0.05, 0.1) if small else rng.uniform(0.12, 0.25), 2)
            cancels = i == 0
            duration = float(rng.randint(20, 30) if cancels else rng.randint(2, 4))
            at = round(start + i * GAP_S + (0.3 if i >= 3 else 0.0), 2)
            cancel_at = round(start + 2.5 * GAP_S + 0.2, 2) if cancels else None
            kind = "small" if small else "big"
            steps.append(Step(len(steps) + 1, at, cos[i % len(cos)], share, cpu, duration,
                              kind, cancel_at))
            ends.append(cancel_at if cancels else at + duration)
        start = max(ends) + CYCLE_MARGIN_S
    return steps


# --- table and summary (pure) ------------------------------------------------------------------


def path_of(hops: Sequence[str]) -> str:
    """The path as the hop services joined by arrows (``text2html -> html2rtf``)."""
    return " -> ".join(hops)


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Paths chosen, denials by reason and median latencies of the request rows."""
    granted = [r for r in rows if r["outcome"] == "granted"]
    denied = [r for r in rows if r["outcome"] != "granted"]

    def median(key: str) -> float | None:
        values = [r[key] for r in granted if isinstance(r.get(key), (int, float))]
        return round(statistics.median(values), 3) if values else None

    return {"requests": len(rows), "granted": len(granted), "denied": len(denied),
            "paths": dict(Counter(r["path"] for r in granted)),
            "denials": dict(Counter(r["reason"] for r in denied)),
            "request_ms_median": median("request_ms"), "rtf_ms_median": median("rtf_ms"),
            "ended": dict(Counter(r["ended"] for r in granted if r.get("ended"))),
            "rtf_ok": all(r.get("rtf_ok") for r in granted)}


def summary_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The summary as table rows: one per path chosen and per denial reason."""
    rows = [{"what": f"path {p}", "count": c} for p, c in sorted(summary["paths"].items())]
    rows += [{"what": f"denied {r}", "count": c} for r, c in sorted(summary["denials"].items())]
    rows += [{"what": f"lease {e}", "count": c} for e, c in sorted(summary["ended"].items())]
    return rows


def format_report(rows: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    """What the experiment prints: the request rows, then the summary."""
    return "\n".join([
        format_table(rows, REQUEST_COLUMNS), "",
        format_table(summary_rows(summary), ["what", "count"]), "",
        f"{summary['requests']} requests: {summary['granted']} granted, {summary['denied']} "
        f"denied; median request -> grant {summary['request_ms_median']} ms, "
        f"grant -> RTF {summary['rtf_ms_median']} ms; every output is RTF: {summary['rtf_ok']}"])


def sample_rows(t: float, services: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One sample of the broker's ``services`` as rows (one per instance) at time ``t``."""
    return [{"t_s": round(t, 3), "instance": i["instance_id"], "service": s["service"],
             "used_share": i.get("used_share"), "share": i.get("share"),
             "used_cpu": i.get("used_cpu"), "cpu": i.get("cpu"), "leases": i.get("leases")}
            for s in services for i in s["instances"]]


# --- plots (pure: files from data) --------------------------------------------------------------


def plot_paths(rows: list[dict[str, Any]], dest: Path) -> Path:
    """Each request at its time, on the line of the path it got (or of its denial)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [HTML_PATH, WORD_PATH]
    lines += sorted({r["path"] for r in rows if r["outcome"] == "granted"} - set(lines))
    lines += sorted({f"denied {r['reason']}" for r in rows if r["outcome"] != "granted"})
    fig, ax = plt.subplots(figsize=(10, 3.6))
    for r in rows:
        label = r["path"] if r["outcome"] == "granted" else f"denied {r['reason']}"
        y = lines.index(label)
        colour = "C3" if r["outcome"] != "granted" else f"C{y}"
        ax.plot(r["t_s"], y, "x" if r["outcome"] != "granted" else "o", color=colour, ms=7)
        ax.annotate(f"{r['co']} {r['share']:g}%", (r["t_s"], y), textcoords="offset points",
                    xytext=(0, 7), fontsize=6, ha="center", rotation=30)
    ax.set_yticks(range(len(lines)), lines)
    ax.set_ylim(-0.6, len(lines) - 0.2)
    ax.set_xlabel("time (s)")
    ax.set_title(f"Paths the broker chose for '{TARGET}' over time")
    fig.tight_layout()
    path = dest / "paths.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_shares(samples: list[dict[str, Any]], rows: list[dict[str, Any]], dest: Path) -> Path:
    """Share used of each instance over time (from the broker's ``services``), requests marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [HTML_PATH.split(" -> "), WORD_PATH.split(" -> ")]
    fig, axes = plt.subplots(2, 1, figsize=(10, 5.5), sharex=True)
    by_instance: dict[tuple[str, str], list[tuple[float, float]]] = {}
    capacity = 0.0
    for s in samples:
        by_instance.setdefault((s["service"], s["instance"]), []).append(
            (s["t_s"], s["used_share"] or 0.0))
        capacity = max(capacity, s.get("share") or 0.0)
    for (service, instance), points in sorted(by_instance.items()):
        panel = next((i for i, p in enumerate(panels) if service in p), 0)
        hop = panels[panel].index(service) if service in panels[panel] else 0
        axes[panel].step([t for t, _ in points], [u for _, u in points], where="post",
                         ls="-" if hop == 0 else "--", lw=2 if hop == 0 else 1.2,
                         label=f"{service} ({instance})")
    for ax, services in zip(axes, panels):
        if capacity:
            ax.axhline(capacity, color="grey", ls=":", lw=0.8, label="capacity")
        for r in rows:
            ax.axvline(r["t_s"], color="C3" if r["outcome"] != "granted" else "lightgrey",
                       lw=0.6, ls=":")
        ax.set_ylabel("share used (%)")
        ax.set_title(" -> ".join(services), fontsize=9)
        ax.legend(fontsize=7, loc="upper right")
    axes[-1].set_xlabel("time (s); dotted lines: requests (red: denied)")
    fig.suptitle("Share held by leases per service instance (broker's 'services', every 0.25 s)")
    fig.tight_layout()
    path = dest / "shares.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --- the CO driver (runs inside a CO host) -------------------------------------------------------


def co_driver() -> None:
    """Inside a CO host: JSON lines on stdin (``request``, ``cancel``, ``quit``), one JSON
    answer per line on stdout. Keys come from the run's key file (never a command line)."""
    from nodetools.co import BrokerClient, CoError, document_for, load_key, output_of

    config = json.loads(sys.stdin.readline())
    clients = {co: BrokerClient(config["broker"], co, load_key(Path(config["keys"]), co))
               for co in config["cos"]}
    document = document_for("text", config["document"].encode())
    for line in sys.stdin:
        op = json.loads(line)
        if op["op"] == "quit":
            break
        client = clients[op["co"]]
        try:
            out = _driver_op(client, op, document, output_of)
        except CoError as exc:
            out = exc.as_dict()
        print(json.dumps(out), flush=True)


def _driver_op(client: Any, op: dict[str, Any], document: dict[str, Any],
               output_of: Any) -> dict[str, Any]:
    """One operation of :func:`co_driver`, timed with ``time.perf_counter``."""
    if op["op"] == "cancel":
        return {"ok": True, "lease_id": client.cancel(op["lease_id"])}
    t0 = time.perf_counter()
    try:
        grant = client.request(TARGET, op["share"], op["cpu"], op["duration"])
    finally:
        t1 = time.perf_counter()
    result = client.run_path(grant, document)
    t2 = time.perf_counter()
    rtf = output_of(grant.hops[-1].produces, result).decode("utf-8")
    return {"ok": True, "grant": grant.as_dict(), "request_ms": round((t1 - t0) * 1000, 3),
            "rtf_ms": round((t2 - t1) * 1000, 3), "rtf": rtf}


class Driver(HostDriver):
    """The main process's end of one host's :func:`co_driver` (a child inside the host)."""

    def __init__(self, client: Any, host: str, cos: list[str]) -> None:
        super().__init__(client, host, cos, "experiments.service_path", {"document": DOCUMENT}, ExperimentError,
                         DRIVER_TIMEOUT)


# --- the network side ----------------------------------------------------------------------------


def publish_converters(moat: Any, workdir: Path) -> None:
    """Package the four converters signed with the run's provider key and publish them to
    the run's remote site (each object.json declares what it consumes and produces)."""
    from agent.vm.repository import package_service, publish_service

    for name in CONVERTERS:
        signed = package_service(SERVICES_DIR / name, name, "1.0", "acme", moat.provider_key,
                                 workdir / name)
        publish_service(signed.path, moat.net[moat.site].repo_root)


def provision_converters(moat: Any, share: float = VM_SHARE, cpu: float = VM_CPU,
                         names: Sequence[str] = tuple(CONVERTERS)) -> None:
    """Provision each converter leased on its router with ``share`` % and ``cpu`` cores,
    and wait until the broker lists them all (their routers register them)."""
    from agent.core.wait import wait_until

    for name in names:
        router, port = CONVERTERS[name]
        answer = moat.provision(router, vm=name, kind="service", service=name, port=port,
                                leased=True, share=share,
                                resources={"cpu": cpu, "memory_mb": 256, "pids": 64})
        if not answer.get("ok"):
            raise ExperimentError(f"provisioning {name} on {router} failed: {answer.get('error')}")
    wait_until(lambda: {s["service"] for s in moat.client.services()} >= set(names), 20,
               interval=0.1, what="the converters registered with the broker")


class Recorder:
    """Samples the broker's ``services`` and ``leases`` commands against the run's clock."""

    def __init__(self, client: Any, t0: float) -> None:
        self.client = client
        self.t0 = t0
        self.samples: list[dict[str, Any]] = []
        self.live: set[str] = set()
        #: lease id -> seconds (from t0) when it was first seen gone.
        self.gone: dict[str, float] = {}

    def now(self) -> float:
        return time.monotonic() - self.t0

    def sample(self) -> None:
        t = self.now()
        self.samples += sample_rows(t, self.client.services())
        live = {row["lease_id"] for row in self.client.leases()}
        for lease in self.live - live:
            self.gone.setdefault(lease, round(t, 3))
        self.live = live

    def until(self, t: float) -> None:
        """Sample every :data:`SAMPLE_S` until ``t`` s after the start (pacing the plan)."""
        while t - self.now() > 0:
            self.sample()
            time.sleep(min(SAMPLE_S, max(0.0, t - self.now())))


def request_row(step: Step, t: float, answer: dict[str, Any]) -> dict[str, Any]:
    """The printed row of one request from its CO driver's answer."""
    row: dict[str, Any] = {"n": step.n, "t_s": round(t, 3), "co": step.co, "share": step.share,
                           "cpu": step.cpu, "duration": step.duration, "kind": step.kind}
    if not answer.get("ok"):
        return dict(row, outcome="denied", reason=answer.get("reason"), path=None,
                    instances=None, detail=answer.get("detail") or answer.get("error"))
    hops = answer["grant"]["hops"]
    rtf = answer["rtf"]
    return dict(row, outcome="granted", reason=None, path=path_of([h["service"] for h in hops]),
                instances=",".join(h["instance"] for h in hops),
                granted_s=min(h["granted_s"] for h in hops), request_ms=answer["request_ms"],
                rtf_ms=answer["rtf_ms"], rtf_bytes=len(rtf.encode()),
                rtf_ok=rtf.startswith("{\\rtf1") and rtf.rstrip().endswith("}"),
                leases=[h["lease_id"] for h in hops], rtf=rtf)


def execute(moat: Any, steps: list[Step], progress: Any) -> tuple[list[dict], list[dict]]:
    """Run the plan: each request at its time from its CO's host, each cancel at its time;
    then wait (bounded) until every lease has ended. The rows and the broker samples."""
    from agent.core.wait import wait_until

    drivers = {host: Driver(moat.client, host, [co for co, h in COS.items() if h == host])
               for host in sorted(set(COS.values()))}
    rows: list[dict[str, Any]] = []
    try:
        rec = Recorder(moat.client, time.monotonic())
        rec.sample()
        events = sorted([(s.at, 0, s) for s in steps]
                        + [(s.cancel_at, 1, s) for s in steps if s.cancel_at is not None],
                        key=lambda e: (e[0], e[1]))
        by_n: dict[int, dict[str, Any]] = {}
        for at, is_cancel, step in events:
            rec.until(at)
            driver = drivers[COS[step.co]]
            if is_cancel:
                row = by_n.get(step.n)
                if row and row["outcome"] == "granted":
                    for lease in row["leases"]:
                        driver.ask({"op": "cancel", "co": step.co, "lease_id": lease})
                    row.update(ended="cancelled", ended_s=round(rec.now(), 3))
                continue
            t = rec.now()
            answer = driver.ask({"op": "request", "co": step.co, "share": step.share,
                                 "cpu": step.cpu, "duration": step.duration})
            by_n[step.n] = request_row(step, t, answer)
            rows.append(by_n[step.n])
            rec.sample()
            progress.update(1)

        def settled() -> bool:
            rec.sample()
            return not rec.live

        wait_until(settled, SETTLE_TIMEOUT, interval=SAMPLE_S, what="every lease ended")
    finally:
        for driver in drivers.values():
            driver.close()
    for row in rows:
        if row["outcome"] == "granted" and not row.get("ended"):
            ends = [rec.gone.get(lease) for lease in row["leases"]]
            row.update(ended="expired", ended_s=max((e for e in ends if e is not None),
                                                    default=None))
    return rows, rec.samples


def broker_message_counts(pcap: Path, timeout: float = 60.0) -> dict[str, int]:
    """MOAT control messages by type name in ``pcap``, decoded by the Lua dissector (empty
    when tshark is missing)."""
    import shutil

    lua = Path(__file__).resolve().parent.parent / "packets" / "wireshark" / "moat.lua"
    if shutil.which("tshark") is None:
        return {}
    proc = subprocess.run(["tshark", "-X", f"lua_script:{lua}", "-r", str(pcap), "-Y", "moat",
                           "-T", "fields", "-e", "moat.type"], capture_output=True, text=True,
                          timeout=timeout)
    return type_names(proc.stdout.split())


def type_names(fields: Sequence[str]) -> dict[str, int]:
    """Counts by control type name of tshark's ``moat.type`` fields (``3`` or ``3,6``)."""
    from packets import ControlType

    names: Counter[str] = Counter()
    for line in fields:
        for value in line.split(","):
            try:
                names[ControlType(int(value)).name.lower()] += 1
            except ValueError:
                names[value] += 1
    return dict(sorted(names.items()))


def run(args: argparse.Namespace) -> dict[str, Any]:
    import shutil
    import tempfile

    from tqdm import tqdm

    from topologies.moatnet import MoatNetwork
    from topologies.patent import PatentTopo

    steps = plan_requests(args.requests, args.seed)
    moat = MoatNetwork(PatentTopo())
    for co in EXTRA_COS:  # more CO identities, each with its own key, on the same hosts
        moat.keyring.add_co(co)
    workdir = Path(tempfile.mkdtemp(prefix="moat-service-path-"))
    try:
        with moat, contextlib.ExitStack() as stack:
            print(f"run {moat.run.run_id}: {len(steps)} requests for '{TARGET}' from "
                  f"{', '.join(COS)} (broker on {moat.broker}, seed {args.seed})")
            for name, bridge in (("home_lan", "s16"), ("foreign_lan_14", "s14")):
                stack.enter_context(moat.capture(bridge, name))
            publish_converters(moat, workdir)
            provision_converters(moat)
            bar = tqdm(total=len(steps), desc="requests", unit="req", file=sys.stderr)
            rows, samples = execute(moat, steps, bar)
            bar.close()
            stack.close()
            dest = results_dir(EXPERIMENT, moat.run.run_id, args.out)
            copy_captures(moat.run.dir / "captures", dest)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    docs = dest / "documents"
    docs.mkdir(exist_ok=True)
    for row in rows:
        if row.get("rtf"):
            (docs / f"request_{row['n']:02d}.rtf").write_text(row.pop("rtf"))
    summary = summarise(rows)
    pngs = [plot_paths(rows, dest), plot_shares(samples, rows, dest)]
    write_csv(dest / "requests.csv", rows, REQUEST_COLUMNS + ["kind"])
    write_csv(dest / "services.csv", samples, SAMPLE_COLUMNS)
    full = {"experiment": EXPERIMENT, "run_id": moat.run.run_id, "seed": args.seed,
            "target": TARGET, "capacity": {"share": VM_SHARE, "cpu": VM_CPU},
            "converters": {k: {"router": r, "port": p} for k, (r, p) in CONVERTERS.items()},
            **summary, "rows": rows,
            "broker_messages": {p.stem: broker_message_counts(p)
                                for p in sorted((dest / "captures").glob("*.pcap"))},
            "plots": [p.name for p in pngs]}
    write_json(dest / "summary.json", full)
    return {"summary": full, "rows": rows, "dest": dest}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moat run service-path", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=15,
                        help=f"requests in all (cycles of five; default 15, at most {MAX_REQUESTS})")
    parser.add_argument("--seed", type=int, default=1, help="seed of the constraints and COs")
    parser.add_argument("--out", type=Path, default=None, help="results root (default ./results)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 1 <= args.requests <= MAX_REQUESTS:
        build_parser().error(f"--requests must be in [1, {MAX_REQUESTS}]")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    t0 = time.monotonic()
    out = run(args)
    print()
    print(format_report(out["rows"], out["summary"]))
    print("broker messages decoded by moat.lua: "
          + "; ".join(f"{k}: {v}" for k, v in out["summary"]["broker_messages"].items()))
    print(f"results in {out['dest']} ({', '.join(out['summary']['plots'])}, summary.json, "
          "requests.csv, services.csv, documents/, captures/)")
    print(f"done in {time.monotonic() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
