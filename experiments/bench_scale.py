"""Scale benchmark — ``sudo moat bench scale`` (a script, not a test; issue 15, item 4).

For each size of the scale topology (``--sizes``, in routers: 10, 50 and 100 by default,
rounded up to the home network's 3 routers plus ``n_foreign`` networks of 3: 12, 51, 102) and each object
count (``--objects``: 100 and 1,000), one network is started and stopped, and a row says:

* ``up_s``: ``MoatNetwork.start()`` until every agent answers (and its supervisor saw it);
* ``register_s``: until every object is registered through the foreign networks' FOAs
  (:func:`experiments.scale_registration.register_many`; empty when that is not there);
* ``rss_mib``, ``pss_mib``: the agents' memory with their supervisors and the zygote, from
  ``/proc/<pid>/smaps_rollup`` (PSS divides shared pages among their sharers: their sum is
  what the agents take together);
* ``hoa_cpu_s``: the HOA agent's CPU seconds (user + system) from its start to the end of
  the registrations;
* ``down_s``: ``MoatNetwork.stop()`` (the nodes, the zygote, then the run's cleaning);
* ``note``: why a figure is missing (more objects than the size's FOAs take: each FOA takes
  64 visitors, so 1,000 objects need 16 FOAs, i.e. ``n_foreign >= 6`` with 3 routers a
  network).

``--baseline-max`` (default 50 routers): sizes up to it run a second time with
``MOAT_AGENT_START=exec`` (an interpreter per agent, the start before issue 15) in the same
invocation, as the baseline beside the forked start.

Writes ``results/bench_scale/<id>/scale.csv``, ``summary.json`` and one plot per figure
against the number of routers (``<figure>.png``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from agent.zygote import ENV_START, memory_kib
from experiments.results import results_dir, write_csv, write_json
from topologies.run import new_run_id

log = logging.getLogger(__name__)

COLUMNS = ["mode", "routers", "objects", "up_s", "register_s", "registered", "rss_mib",
           "pss_mib", "hoa_cpu_s", "down_s", "note"]
FIGURES = {"up_s": "time to up (s)", "register_s": "time until every object is registered (s)",
           "pss_mib": "agents' PSS (MiB)", "rss_mib": "agents' RSS (MiB)",
           "hoa_cpu_s": "HOA CPU (s)", "down_s": "time to down and clean (s)"}
HOME_ROUTERS = 3
ROUTERS_PER_NET = 3


def n_foreign_for(routers: int) -> int:
    """The smallest ``n_foreign`` whose scale topology has at least ``routers`` routers (3
    per network and the home network's 3): 10 -> 3 (12 routers), 50 -> 16 (51), 100 -> 33
    (102, the issue's ``scale,n_foreign=33,routers_per_net=3``); at least 1."""
    if routers < 1:
        raise ValueError(f"routers must be positive, got {routers}")
    return max(1, -(-(routers - HOME_ROUTERS) // ROUTERS_PER_NET))


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of ``pid`` (None when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def agents_memory(net: Any) -> tuple[float, float]:
    """RSS and PSS (MiB) of every router's agent and supervisor and the run's zygote."""
    pids: list[int] = []
    for router in net.topo.router_names():
        supervisor = net.net[router].daemon_pid
        if supervisor:
            pids.append(supervisor)
        try:
            pids.append(int(net.client.call(router, "status", timeout=5)["pid"]))
        except Exception as exc:  # noqa: BLE001 - a row with what could be read
            log.warning("%s: no agent pid: %s", router, exc)
    if net.zygote is not None and net.zygote.pid:
        pids.append(net.zygote.pid)
    rss = pss = 0
    for pid in set(pids):
        mem = memory_kib(pid)
        if mem:
            rss, pss = rss + mem["rss"], pss + mem["pss"]
    return round(rss / 1024, 1), round(pss / 1024, 1)


def one(routers: int, objects: int, mode: str) -> dict[str, Any]:
    """Start, measure and stop one network; its row."""
    from topologies.moatnet import MoatNetwork
    from topologies.scale import ScaleTopo

    try:
        from experiments.scale_registration import (ScaleRegistrationError, register_many,
                                                    swarm_object_names)
    except ImportError:
        register_many = swarm_object_names = None  # type: ignore[assignment]
        ScaleRegistrationError = RuntimeError  # type: ignore[assignment,misc]
    topo = ScaleTopo(n_foreign=n_foreign_for(routers), routers_per_net=ROUTERS_PER_NET)
    names = swarm_object_names(objects) if swarm_object_names else ["counter"]
    previous = os.environ.get(ENV_START)
    os.environ[ENV_START] = mode
    row: dict[str, Any] = {"mode": mode, "routers": len(topo.router_names()), "objects": objects}
    net = MoatNetwork(topo, objects=names)
    try:
        started = time.monotonic()
        net.start()
        row["up_s"] = round(time.monotonic() - started, 2)
        row["rss_mib"], row["pss_mib"] = agents_memory(net)
        hoa_pid = int(net.client.call(net.hoa, "status", timeout=5)["pid"])
        if register_many is not None:
            try:
                result = register_many(net, objects)
            except ScaleRegistrationError as exc:  # e.g. more objects than the FOAs take
                row["note"] = str(exc)
            else:
                row["register_s"] = None if result.seconds is None else round(result.seconds, 2)
                row["registered"] = result.registered
        row["hoa_cpu_s"] = cpu_seconds(hoa_pid)
    finally:
        stopping = time.monotonic()
        net.stop()
        row["down_s"] = round(time.monotonic() - stopping, 2)
        if previous is None:
            os.environ.pop(ENV_START, None)
        else:
            os.environ[ENV_START] = previous
    log.info("%s", row)
    print(", ".join(f"{k} {row.get(k)}" for k in COLUMNS), flush=True)
    return row


def plot(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """One plot per figure against the number of routers, a line per (start, objects)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    series = sorted({(r["mode"], r["objects"]) for r in rows})
    for key, label in FIGURES.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        drawn = False
        for mode, objects in series:
            points = sorted((r["routers"], r[key]) for r in rows
                            if (r["mode"], r["objects"]) == (mode, objects) and r.get(key) is not None
                            and r.get("up_s") is not None)
            if points:
                ax.plot(*zip(*points), marker="o", label=f"{mode}, {objects} objects")
                drawn = True
        ax.set_xlabel("routers")
        ax.set_ylabel(label)
        ax.set_title(f"moat bench scale: {label}")
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend()
        else:
            ax.text(0.5, 0.5, "not measured", ha="center", transform=ax.transAxes)
        path = out / f"{key}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"positive integers expected: {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moat bench scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=_ints, default=[10, 50, 100], help="routers (default 10,50,100)")
    parser.add_argument("--objects", type=_ints, default=[100, 1000], help="objects (default 100,1000)")
    parser.add_argument("--baseline-max", type=int, default=50,
                        help="sizes up to this many routers also run exec'd (default 50; 0: none)")
    parser.add_argument("--results", type=Path, default=None, help="results root (default ./results)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    rows: list[dict[str, Any]] = []
    out = results_dir("bench_scale", new_run_id(), args.results)
    for routers in args.sizes:
        for objects in args.objects:
            modes = ["fork", "exec"] if routers <= args.baseline_max else ["fork"]
            for mode in modes:
                try:
                    rows.append(one(routers, objects, mode))
                except Exception as exc:  # noqa: BLE001 - one size that cannot start: said, the rest goes on
                    log.error("%s routers, %s objects, %s: %s", routers, objects, mode, exc)
                    rows.append({"mode": mode, "routers": routers, "objects": objects,
                                 "note": f"{type(exc).__name__}: {exc}"})
                write_csv(out / "scale.csv", rows, COLUMNS)  # what is measured so far
    write_csv(out / "scale.csv", rows, COLUMNS)
    write_json(out / "summary.json", {"rows": rows, "cores": os.cpu_count(), "python": sys.version})
    plot(rows, out)
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
