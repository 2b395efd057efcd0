"""``moat``: start, inspect, stop and clean MOAT networks, and run experiments.

    sudo moat up [--topo patent] [--objects counter] [--adv-interval 1] [--broker ROUTER|none]
    sudo moat show bindings|visitors|agents|objects|status|log|vm|errors|retired [ROUTER] [--json]
    sudo moat show services|leases [--json]          (the service broker's tables)
    sudo moat service list [--from HOST] [--json]
    sudo moat service request GOAL --from HOST [--share P] [--cpu C] [--duration D|any]
    sudo moat service call GOAL|LEASE --from HOST FILE [--out FILE]
    sudo moat lease renew LEASE [--duration D|any]
    sudo moat lease cancel LEASE
    sudo moat object start|stop|register|deregister OBJECT ROUTER [--run-code]
    sudo moat migrate OBJECT ROUTER [--mode make-before-break|break-before-make] [--transfer precopy|stop-copy]
    sudo moat provision ROUTER --vm NAME --service SVC [--kind interface --interface IF --address A]
                        [--mobile OBJECT=NAME] [--objects A,B] [--policy JSON]
    sudo moat vm remove ROUTER VM
    sudo moat down
    sudo moat cli [--topo patent]          (a network in the foreground with Mininet's CLI)
    sudo moat clean [--run ID]
    sudo moat run handoff|tour|service-path|leases|attacks|faults
    sudo moat bench packets|registration|tunnel|provision|broker|objstart|scale|peer
    moat repo keygen|package|publish|verify|show ...

``--run ID`` picks a network when several are up; by default the newest live one. Every
command acts through :class:`topologies.client.RunClient`, which checks each router, object
and VM name against the run before acting and says which names exist.

The service broker (Fig. 12) runs on the HOA's router unless ``--broker`` says otherwise.
``moat service`` acts as a corresponding object from inside a host (``--from co14``), through
the CO library (:mod:`nodetools.co`): the host's own key signs what it sends the broker, and
the grants it obtains are kept in the run directory so ``moat lease`` and ``moat service
call`` can name their leases.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from agent.core.errors import AgentError, ControlError
from agent.core.wait import WaitTimeout, wait_until
from topologies.client import RunClient
from topologies.errors import TopologyError, UnknownName
from topologies.run import ENV_RUN_ID, Run, clean_all, clean_run, pid_alive

from .tables import format_table

log = logging.getLogger(__name__)

DOWN_TIMEOUT = 30.0

COLUMNS = {
    "bindings": ["router", "home_address", "care_of_address", "care_of_name", "part", "gre_key", "lifetime",
                 "remaining"],
    "visitors": ["router", "home_address", "home_agent", "local_address", "care_of_name", "lifetime", "remaining"],
    "agents": ["router", "address", "interface", "flags", "sequence", "care_of_addresses", "age"],
    "objects": ["router", "name", "home_address", "vm", "pid", "cpu_seconds", "memory_mb_used", "at_home",
                "agent", "care_of_address", "care_of_name", "remaining"],
    "status": ["router", "state", "roles", "pid", "uptime", "restarts", "last_exit", "bindings", "visitors",
               "objects", "malformed"],
    "vm": ["router", "name", "kind", "service", "version", "address", "port", "cpu", "memory_mb",
           "pids", "object", "object_pid", "cpu_seconds", "memory_mb_used", "memory_mb_peak"],
    "errors": ["router", "at", "vm", "service", "step", "reason"],
    "retired": ["router", "at", "vm", "service", "reason"],
    "services": ["service", "instance_id", "part", "router", "network", "address", "port", "consumes",
                 "produces", "share", "used_share", "cpu", "used_cpu", "leases", "remaining_s"],
    "leases": ["lease_id", "holder", "service", "instance", "co_network", "share", "cpu", "granted_s",
               "remaining"],
    "growth": ["at", "service", "from", "share", "cpu", "router", "instance", "ms", "error"],
    "nested": ["router", "vm", "home_address", "care_of_address", "care_of_name", "part", "gre_key",
               "remaining"],
    "room": ["router", "capacity_cpu", "free_cpu", "capacity_memory_mb", "free_memory_mb", "reservations",
             "placements"],
    "grant": ["service", "instance", "address", "port", "lease_id", "granted_s"],
}
#: ``moat up --broker none``: a run without a service broker.
NO_BROKER = "none"


class CliError(Exception):
    """A command that cannot be done, with the reason for the user."""


def _require_root() -> None:
    if os.geteuid() != 0:
        raise CliError("this command needs root (network namespaces): run it with sudo")


def pick_run(run_id: str | None) -> RunClient:
    """The client of run ``run_id``, or of the newest live run (NoRun otherwise)."""
    return RunClient.open(run_id)


# --- up / down ---------------------------------------------------------------------------


def broker_router(topo: str, broker: str | None) -> str | None:
    """``--broker``: a router of ``topo`` (checked before anything starts), ``none``, or by
    default the topology's HOA router."""
    from topologies.catalog import make_topo

    spec = make_topo(topo)
    if broker is None:
        return spec.hoa
    if broker == NO_BROKER:
        return None
    if broker not in spec.router_names():
        raise UnknownName("router", broker, spec.router_names(), f"topology {topo}")
    return broker


def up_timeout_for(topo: str) -> float:
    """How long ``moat up`` waits for ``topo``: grows with its size
    (:func:`topologies.start_budget.up_timeout`), no fixed minute."""
    from topologies.catalog import make_topo
    from topologies.start_budget import up_timeout

    spec = make_topo(topo)
    routers = len(spec.router_names())
    return up_timeout(routers, len(spec.hosts()) + len(spec.switches()) - routers)


def cmd_up(args: argparse.Namespace) -> int:
    _require_root()
    broker = broker_router(args.topo, args.broker)
    up_timeout = up_timeout_for(args.topo)
    run = Run()
    env = dict(os.environ, **{ENV_RUN_ID: run.run_id})
    out = open(f"/tmp/moat-up-{run.run_id}.log", "wb")  # noqa: SIM115 - handed to the child
    holder = subprocess.Popen(
        [sys.executable, "-m", "experiments.holder", "--run-id", run.run_id, "--topo", args.topo,
         "--objects", args.objects, "--adv-interval", str(args.adv_interval),
         "--broker", broker or NO_BROKER],
        stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
        start_new_session=True,
    )

    def is_up() -> bool:
        if holder.poll() is not None:
            raise CliError(f"the network failed to start; see /tmp/moat-up-{run.run_id}.log")
        try:
            return Run.load(run.run_id).state.status == "up"
        except (OSError, ValueError, TypeError):
            return False  # run.json not written yet, or being replaced

    try:
        wait_until(is_up, up_timeout, interval=0.1, what="the network up")
    except WaitTimeout:
        holder.terminate()
        raise CliError(f"the network did not come up within {up_timeout:.0f}s") from None
    os.replace(f"/tmp/moat-up-{run.run_id}.log", run.dir / "holder.log")
    print(run.run_id)
    print(f"run directory {run.dir}; stop it with: sudo moat down", file=sys.stderr)
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    _require_root()
    run = pick_run(args.run).run
    pid = run.state.owner_pid
    if pid_alive(pid):
        os.kill(pid, signal.SIGTERM)
        try:
            wait_until(lambda: not pid_alive(pid), DOWN_TIMEOUT, interval=0.1, what="the holder gone")
        except WaitTimeout:
            log.warning("run %s: holder %d still alive after %.0fs; cleaning by run id",
                        run.run_id, pid, DOWN_TIMEOUT)
    clean_run(run.run_id, keep_dir=True)  # whatever the holder could not stop
    print(f"run {run.run_id} is down (logs in {run.dir})")
    return 0


def cmd_clean(args: argparse.Namespace) -> int:
    _require_root()
    results = {args.run: clean_run(args.run)} if args.run else clean_all()
    for run_id, removed in results.items():
        print(f"{run_id}: " + ("; ".join(removed) if removed else "nothing left"))
    if not results:
        print("nothing to clean")
    return 0


# --- show / object -----------------------------------------------------------------------


def _flatten_object(router: str, obj: dict[str, Any]) -> dict[str, Any]:
    reg = obj.get("registration") or {}
    usage = obj.get("usage") or {}
    return {"router": router, "name": obj["name"], "home_address": obj["home_address"],
            "vm": "/".join(obj["vm"]) if obj.get("vm") else None, "pid": obj.get("pid"),
            "cpu_seconds": usage.get("cpu_seconds"),
            "memory_mb_used": None if usage.get("memory_bytes") is None else round(usage["memory_bytes"] / (1 << 20), 1),
            "at_home": obj["at_home"], **{k: reg.get(k) for k in ("agent", "care_of_address", "care_of_name", "remaining")}}


def _per_object(vm: dict[str, Any]) -> list[dict[str, Any]]:
    objs = vm.get("objects") or {"-": None}
    return [dict(vm, object=name, _obj=info) for name, info in objs.items()]


def _flatten_vm(router: str, vm: dict[str, Any]) -> dict[str, Any]:
    info = vm.pop("_obj") or {}
    usage = info.get("usage") or {}
    mib = 1 << 20
    return dict(vm, router=router, object_pid=info.get("pid"),
                cpu_seconds=usage.get("cpu_seconds"),
                memory_mb_used=None if usage.get("memory_bytes") is None else round(usage["memory_bytes"] / mib, 1),
                memory_mb_peak=None if usage.get("memory_peak_bytes") is None else round(usage["memory_peak_bytes"] / mib, 1))


def _log_lines(client: RunClient, router: str, lines: int) -> list[str]:
    """The last ``lines`` of ``router``'s agent log: from the agent, or, when it does not
    answer (down, restarting), from its log file and its supervisor's output."""
    try:
        return client.call(router, "log", lines=lines)
    except ControlError:
        state = client.agent_state(router)
        if state["state"] == "up":
            raise
    out = [f"(agent {state['state']}, restarts {state['restarts']}, last exit: {state['last_exit'] or '-'})"]
    for name in (f"{router}.log", f"{router}.out"):
        try:
            text = (client.run.dir / name).read_text(errors="replace").splitlines()
        except OSError:
            continue
        out += [f"-- {name}", *text[-int(lines):]]
    return out


def collect(client: RunClient, what: str, routers: list[str],
            lines: int = 30) -> list[dict[str, Any]] | dict[str, list[str]]:
    """Rows of table ``what`` from ``routers``' agents (``log``: lines per router)."""
    if what == "log":
        return {r: _log_lines(client, r, lines) for r in routers}
    rows: list[dict[str, Any]] = []
    for router in routers:
        try:
            result = client.call(router, what)
        except ControlError:
            state = client.agent_state(router)
            if state["state"] == "up":
                raise  # the agent answers: this is a refusal, not a dead agent
            if what == "status":
                rows.append(state)
            else:  # the other agents' rows still show
                print(f"moat: {router}: agent {state['state']} (restarts {state['restarts']}, "
                      f"last exit: {state['last_exit'] or '-'}); its rows are missing", file=sys.stderr)
            continue
        if what == "status":
            sup = client.supervision(router) or {}
            last = sup.get("last_exit") if isinstance(sup.get("last_exit"), dict) else {}
            rows.append(dict(result, router=router, roles=",".join(result["roles"]) or "-",
                             state="up (crash-loop)" if sup.get("crash_loop") else "up",
                             restarts=sup.get("restarts", 0), last_exit=last.get("text")))
        elif what == "objects":
            rows += [_flatten_object(router, o) for o in result]
        elif what == "vm":
            rows += [_flatten_vm(router, vm) for vm in result for vm in _per_object(vm)]
        elif what == "nested":
            rows += [dict(b, router=router, vm=vm) for vm, bindings in (result or {}).items()
                     for b in bindings]
        elif what == "room":
            if result is not None:
                rows.append(dict(result, router=router, reservations=len(result["reservations"]),
                                 placements=len(result["placements"])))
        elif what in ("errors", "retired"):
            rows += [dict(e, router=router, at=time.strftime("%H:%M:%S", time.localtime(e["at"])))
                     for e in result]
        else:
            rows += [dict(r, router=router) for r in result]
    return rows


def service_rows(services: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per instance of the broker's directory."""
    return [dict(inst, remaining_s=(inst.get("lifecycle") or {}).get("remaining_s"))
            for service in services for inst in service["instances"]]


def cmd_show(args: argparse.Namespace) -> int:
    client = pick_run(args.run)
    if args.what in ("services", "leases", "growth"):
        data: Any = {"services": client.services, "leases": client.leases,
                     "growth": lambda: client.call(client.broker(), "growth")}[args.what]()
        if args.json:
            print(json.dumps(data, indent=2, default=str))
        else:
            rows = service_rows(data) if args.what == "services" else data
            if args.what == "growth":
                rows = [dict(r, at=time.strftime("%H:%M:%S", time.localtime(r["at"]))) for r in rows]
            print(format_table(rows, COLUMNS[args.what]))
        return 0
    routers = [client.check_router(args.router)] if args.router else client.routers()
    data = collect(client, args.what, routers, args.lines)
    if args.json:
        print(json.dumps(data, indent=2, default=str))
    elif isinstance(data, dict):
        for router, lines in data.items():
            print(f"== {router}")
            print("\n".join(lines))
    else:
        print(format_table(data, COLUMNS[args.what]))
    return 0


def cmd_object(args: argparse.Namespace) -> int:
    client = pick_run(args.run)
    router = client.check_router(args.router)
    name = client.check_object(args.object)
    if args.action == "start":
        result = client.start_object(name, router, spec=args.spec if args.run_code else None,
                                     simultaneous=args.simultaneous)
    elif args.action == "stop":
        result = client.call(router, "object_stop", name=name, deregister=not args.no_deregister)
    else:
        result = client.call(router, args.action, name=name)
    print(json.dumps(result, indent=2, default=str))
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    report = pick_run(args.run).migrate(args.object, args.router, args.mode, transfer=args.transfer)
    source = report["source"]
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        t0 = report["steps"][0][1] if report["steps"] else 0
        for what, at in report["steps"]:
            print(f"  +{(at - t0) * 1000:8.1f} ms  {what}")
        print(("moved" if report["ok"] else "NOT moved") + f": {args.object} {source} -> {args.router}"
              + ("" if report["ok"] else f" ({report['error']})"))
    return 0 if report["ok"] else 1


def cmd_provision(args: argparse.Namespace) -> int:
    """A PROVISION message from the remote site to a router, in band (TCP 4340)."""
    _require_root()
    client = pick_run(args.run)
    client.check_router(args.router)
    body: dict[str, Any] = {"vm": args.vm, "kind": args.kind, "service": args.service,
                            "resources": {"cpu": args.cpu, "memory_mb": args.memory, "pids": args.pids}}
    if args.egress_kbit:
        body["resources"]["egress_kbit"] = args.egress_kbit
    if args.policy:
        try:
            body["policy"] = json.loads(args.policy)
        except ValueError as exc:
            raise CliError(f"--policy is not JSON: {exc}") from None
    mobile: dict[str, str] = {}
    for item in args.mobile:
        obj, sep, name = item.partition("=")
        if not sep or not obj or not name:
            raise CliError(f"--mobile takes OBJECT=NAME, not {item!r}")
        mobile[obj] = client.check_object(name)
    if args.objects:
        body["objects"] = [o for o in args.objects.split(",") if o]
    if args.kind == "interface":
        body.update(interface=args.interface, address=args.address)
    if args.port:
        body["port"] = args.port
    if args.leased:
        body["leased"] = True
    if args.share is not None:
        body["share"] = args.share
    answer = client.provision(args.router, body, mobile=mobile or None, key=args.key)
    if args.json:
        print(json.dumps(answer, indent=2, default=str))
    elif answer.get("ok"):
        vm = answer["vm"]
        t0 = vm["steps"][0][1]
        for what, at in vm["steps"]:
            print(f"  +{(at - t0) * 1000:8.1f} ms  {what}")
        print(f"{args.vm} on {args.router} runs {vm['service']} {vm['version']} at {vm['address']}:{vm['port']}")
    else:
        print(f"refused: {answer.get('error')}")
    return 0 if answer.get("ok") else 1


def cmd_vm(args: argparse.Namespace) -> int:
    """``moat vm remove ROUTER VM``: stop a VM's objects and remove it."""
    client = pick_run(args.run)
    result = client.remove_vm(args.router, args.vm)
    print(json.dumps(result, indent=2, default=str) if args.json else f"{args.vm} removed from {args.router}")
    return 0


# --- the service broker, as a corresponding object --------------------------------------


def _print_grant(grant: dict[str, Any]) -> None:
    hops = grant["hops"]
    print(format_table(hops, COLUMNS["grant"]))
    print(f"granted {grant['target']!r}: {len(hops)} hop(s), group {grant['group']}, "
          f"good for {min(h['granted_s'] for h in hops):g} s")


def cmd_service(args: argparse.Namespace) -> int:
    """``moat service list|request|call``: the broker's side a CO sees."""
    client = pick_run(args.run)
    if args.action == "list":
        services = client.services(args.host)
        print(json.dumps(services, indent=2) if args.json
              else format_table(service_rows(services), COLUMNS["services"]))
        return 0
    if args.host is None:
        raise CliError(f"moat service {args.action} needs --from HOST "
                       f"(hosts: {', '.join(client.co_hosts()) or 'none'})")
    if args.action == "request":
        grant = client.lease_request(args.host, args.target, args.share, args.cpu, args.duration,
                                     measure=args.measure)
        if args.json:
            print(json.dumps(grant, indent=2))
        else:
            _print_grant(grant)
        return 0
    if args.file is None:
        raise CliError("moat service call needs the FILE to run the path on")
    out = Path(args.out) if args.out else None
    result = client.service_call(args.host, args.target, Path(args.file), out,
                                 args.share, args.cpu)
    if args.json:
        print(json.dumps(result, indent=2))
    elif "text" in result and out is None:
        sys.stdout.write(result["text"])
    elif "result" in result:
        print(json.dumps(result["result"], indent=2))
    print(" -> ".join(result["hops"]) + (f": {result.get('bytes')} bytes of {result['format']}"
                                        if "format" in result else "")
          + (f" written to {out}" if out else ""), file=sys.stderr)
    return 0


def cmd_lease(args: argparse.Namespace) -> int:
    """``moat lease renew|cancel LEASE``, as the CO that holds it."""
    client = pick_run(args.run)
    if args.action == "renew":
        hop = client.lease_renew(args.lease, args.duration)
        print(json.dumps(hop, indent=2) if args.json
              else f"lease {hop['lease_id']} renewed: {hop['granted_s']:g} s")
    else:
        client.lease_cancel(args.lease)
        print(f"lease {args.lease} cancelled")
    return 0


# --- foreground CLI, experiments, benchmarks ---------------------------------------------


def cmd_cli(args: argparse.Namespace) -> int:
    _require_root()
    from topologies.moatnet import MoatNetwork

    from .mncli import MoatCLI
    from topologies.catalog import make_topo

    with MoatNetwork(make_topo(args.topo), objects=args.objects.split(","),
                     advertise_interval=args.adv_interval,
                     broker=broker_router(args.topo, args.broker)) as moat:
        print(f"run {moat.run.run_id}; MOAT commands: bindings visitors agents objects move "
              "migrate vm resolve; "
              "Mininet's: help")
        MoatCLI(moat)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    _require_root()
    if args.experiment == "tour":
        from .tour import main as tour_main

        return tour_main(args.rest)
    if args.experiment == "handoff":
        from .handoff import main as handoff_main

        return handoff_main(args.rest)
    if args.experiment == "service-path":
        from .service_path import main as service_path_main

        return service_path_main(args.rest)
    if args.experiment == "leases":
        from .leases import main as leases_main

        return leases_main(args.rest)
    if args.experiment == "attacks":
        from .attacks.driver import main as attacks_main

        return attacks_main(args.rest)
    if args.experiment == "faults":
        from .faults.driver import main as faults_main

        return faults_main(args.rest)
    raise CliError(f"unknown experiment {args.experiment!r}")


def cmd_bench(args: argparse.Namespace) -> int:
    if args.which == "packets":
        from .bench_packets import main as bench_main

        return bench_main(args.rest) or 0
    if args.which == "peer":  # loopback, no root
        from .bench_peer import main as bench_main

        return bench_main(args.rest) or 0
    _require_root()
    if args.which == "provision":
        from .bench_provision import main as bench_main

        return bench_main(args.rest) or 0
    if args.which == "tunnel":
        from .bench_tunnel import main as bench_main

        return bench_main(args.rest) or 0
    if args.which == "broker":
        from .bench_broker import main as bench_main

        return bench_main(args.rest) or 0
    if args.which == "objstart":
        from .bench_objstart import main as bench_main

        return bench_main(args.rest) or 0
    if args.which == "scale":
        from .bench_scale import main as bench_main

        return bench_main(args.rest) or 0
    from .bench_registration import main as bench_main

    return bench_main(args.rest) or 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moat", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    def add_topo(p: argparse.ArgumentParser) -> None:
        p.add_argument("--topo", default="patent", help="patent | scale[,n_foreign=N,routers_per_net=M]")
        p.add_argument("--objects", default="counter", help="comma-separated object names")
        p.add_argument("--adv-interval", type=float, default=1.0, help="advertisement interval (s)")
        p.add_argument("--broker", help="the router that runs the service broker "
                                        "(default: the HOA's router; 'none': no broker)")

    p = sub.add_parser("up", help="start a network in the background and print its run id")
    add_topo(p)
    p.set_defaults(func=cmd_up)
    p = sub.add_parser("down", help="stop a network started with up")
    p.add_argument("--run")
    p.set_defaults(func=cmd_down)
    p = sub.add_parser("clean", help="remove everything MOAT runs made (every run, running "
                                     "ones too), or one run's with --run")
    p.add_argument("--run", help="remove only this run's processes, cgroups, interfaces "
                                 "(those named with its tag), firewall rules and directories; "
                                 "other runs are left as they are")
    p.set_defaults(func=cmd_clean)
    p = sub.add_parser("show", help="tables from the agents of a running network")
    p.add_argument("what", choices=["bindings", "visitors", "agents", "objects", "status", "log", "vm", "errors",
                                    "retired", "services", "leases", "growth", "room",
                                    "nested"])
    p.add_argument("router", nargs="?")
    p.add_argument("--run")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.add_argument("--lines", type=int, default=30, help="log lines per router")
    p.set_defaults(func=cmd_show)
    p = sub.add_parser("object", help="run or stop an object's registration client on a router")
    p.add_argument("action", choices=["start", "stop", "register", "deregister"])
    p.add_argument("object")
    p.add_argument("router")
    p.add_argument("--run")
    p.add_argument("--simultaneous", action="store_true", help="register with S (keep other bindings)")
    p.add_argument("--no-deregister", action="store_true", help="stop without deregistering")
    p.add_argument("--run-code", action="store_true", help="also run the object's code on its home address")
    p.add_argument("--spec", default="agent.objects.counter:Counter", help="module:Class of the object")
    p.set_defaults(func=cmd_object)
    p = sub.add_parser("migrate", help="move a running object to another router with its state")
    p.add_argument("object")
    p.add_argument("router")
    p.add_argument("--mode", choices=["make-before-break", "break-before-make"], default="make-before-break")
    p.add_argument("--transfer", choices=["precopy", "stop-copy"], default=None,
                   help="how make-before-break hands the state over (default: the agent's, "
                        "precopy; stop-copy is the old path)")
    p.add_argument("--run")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_migrate)
    p = sub.add_parser("provision", help="configure a VM on a router to run a service from the remote site")
    p.add_argument("router")
    p.add_argument("--vm", required=True, help="a name for the VM")
    p.add_argument("--service", required=True, help="the service's name in the site's repository")
    p.add_argument("--kind", choices=["interface", "service"], default="service",
                   help="virtual interface (one address on one interface) or virtual service (all addresses)")
    p.add_argument("--interface", help="for a virtual interface: the router's interface")
    p.add_argument("--address", help="for a virtual interface: the address to add")
    p.add_argument("--port", type=int, help="the service's port, UDP and TCP (default 4341)")
    p.add_argument("--cpu", type=float, default=0.5, help="CPUs (0.5 = half of one)")
    p.add_argument("--memory", type=int, default=256, help="MiB")
    p.add_argument("--pids", type=int, default=64)
    p.add_argument("--egress-kbit", type=int, help="cap the VM's egress (tc htb), kbit/s")
    p.add_argument("--policy", help='lifecycle policy terms as JSON, e.g. \'{"max_transactions": 100}\'')
    p.add_argument("--mobile", action="append", default=[], metavar="OBJECT=NAME",
                   help="run the service's OBJECT as mobile object NAME of this run (its home "
                        "address and credentials): it registers with its home agent and can migrate")
    p.add_argument("--objects", help="only these objects of the service (comma-separated)")
    p.add_argument("--leased", action="store_true",
                   help="its objects serve only requests with a service credential from the broker")
    p.add_argument("--share", type=float,
                   help="the percent of the service this VM offers the broker (default 100)")
    p.add_argument("--key", help="the provider's private key that signs the PROVISION "
                                 "(default: the run's provider key)")
    p.add_argument("--run")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_provision)
    p = sub.add_parser("vm", help="act on a router's VMs")
    p.add_argument("action", choices=["remove"])
    p.add_argument("router")
    p.add_argument("vm")
    p.add_argument("--run")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_vm)
    p = sub.add_parser("service", help="the service broker as a corresponding object sees it")
    p.add_argument("action", choices=["list", "request", "call"])
    p.add_argument("target", nargs="?", help="request: a service or a goal ('text -> rtf'); "
                                             "call: that, or a lease of an earlier request")
    p.add_argument("file", nargs="?", help="call: the document to run the path on")
    p.add_argument("--from", dest="host", help="the host acting as corresponding object (co14)")
    p.add_argument("--share", type=float, default=10.0, help="percent of the service")
    p.add_argument("--cpu", type=float, default=0.1, help="cores")
    p.add_argument("--duration", default="any", help='seconds, or "any" (the broker\'s default)')
    p.add_argument("--measure", action="store_true",
                   help="request: the CO measures its round trip to each instance, and the "
                        "broker ranks paths by it instead of routing hops")
    p.add_argument("--out", help="call: write the resulting document here")
    p.add_argument("--run")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_service)
    p = sub.add_parser("lease", help="renew or cancel a lease of an earlier service request")
    p.add_argument("action", choices=["renew", "cancel"])
    p.add_argument("lease")
    p.add_argument("--duration", default="any", help='renew: seconds, or "any"')
    p.add_argument("--run")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_lease)
    p = sub.add_parser("cli", help="a network in the foreground with Mininet's CLI + MOAT commands")
    add_topo(p)
    p.set_defaults(func=cmd_cli)
    p = sub.add_parser("run", help="run an experiment")
    p.add_argument("experiment", choices=["handoff", "tour", "service-path", "leases", "attacks", "faults"])
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_run)
    sub.add_parser("repo", help="service provider tools: keygen, package, publish, verify, show")
    p = sub.add_parser("bench", help="run a benchmark")
    p.add_argument("which", choices=["packets", "registration", "tunnel", "provision", "broker", "objstart",
                                     "scale", "peer"])
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["repo"]:  # its own parser, so `moat repo --help` is the repo tools' help
        from .repo_cli import main as repo_main

        return repo_main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (CliError, AgentError, TopologyError, ControlError) as exc:
        print(f"moat: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
