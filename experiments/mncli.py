"""Mininet's CLI with MOAT commands: ``moat cli``.

Everything Mininet's CLI does (``r18a ping r22b``, ``xterm``, ``dump``...) plus commands that
talk to the agents' control sockets. A ``cmd.Cmd`` subclass, as Mininet's own CLI is.
"""

from __future__ import annotations

import json
from typing import Any

from mininet.cli import CLI

from agent.core.errors import ControlError
from topologies.errors import TopologyError
from topologies.moatnet import MoatNetwork

from .tables import format_table

BINDING_COLUMNS = ["home_address", "care_of_address", "care_of_name", "gre_key", "lifetime", "remaining"]
VISITOR_COLUMNS = ["home_address", "home_agent", "local_address", "care_of_name", "lifetime", "remaining"]


class MoatCLI(CLI):
    """Mininet CLI + ``bindings``, ``visitors``, ``agents``, ``objects``, ``move``,
    ``migrate``, ``vm``, ``resolve``."""

    prompt = "moat> "

    def __init__(self, moat: MoatNetwork, **kw: Any) -> None:
        self.moat = moat
        super().__init__(moat.net, **kw)

    def _call(self, router: str, cmd: str, **args: Any) -> Any:
        try:
            return self.moat.agent(router).call(cmd, **args)
        except (ControlError, TopologyError) as exc:
            self.stdout.write(f"*** {router}: {exc}\n")
            return None

    def do_bindings(self, line: str) -> None:
        """bindings: the home object agent's mobility bindings."""
        rows = self._call(self.moat.hoa, "bindings")
        if rows is not None:
            self.stdout.write(format_table(rows, BINDING_COLUMNS) + "\n")

    def do_visitors(self, line: str) -> None:
        """visitors [router]: visitor lists of the foreign object agents."""
        routers = line.split() or self.moat.foreign_agents
        rows = []
        for r in routers:
            rows += [dict(v, router=r) for v in self._call(r, "visitors") or []]
        self.stdout.write(format_table(rows, ["router", *VISITOR_COLUMNS]) + "\n")

    def do_agents(self, line: str) -> None:
        """agents ROUTER: the agents ROUTER hears advertising."""
        router = line.strip() or self.moat.hoa
        rows = self._call(router, "agents") or []
        self.stdout.write(format_table(rows, ["address", "interface", "flags", "sequence", "care_of_addresses", "age"]) + "\n")

    def do_objects(self, line: str) -> None:
        """objects: where each object's registration client runs and its registration."""
        for router in self.moat.topo.router_names():
            for obj in self._call(router, "objects") or []:
                self.stdout.write(f"{router}: {json.dumps(obj['registration'])} at_home={obj['at_home']}\n")

    def do_move(self, line: str) -> None:
        """move OBJECT ROUTER: stop OBJECT's client where it runs, start it on ROUTER."""
        try:
            name, target = line.split()
        except ValueError:
            self.stdout.write("usage: move OBJECT ROUTER\n")
            return
        for router in self.moat.topo.router_names():
            if any(o["name"] == name for o in self._call(router, "objects") or []):
                self._call(router, "object_stop", name=name, deregister=False)
        try:
            status = self.moat.start_object(name, target)
        except (ControlError, TopologyError) as exc:
            self.stdout.write(f"*** {exc}\n")
            return
        self.stdout.write(f"{name} now runs on {target}: {status['home_address']}\n")

    def do_migrate(self, line: str) -> None:
        """migrate OBJECT ROUTER [mbb|bbm]: move the running object, with its state."""
        parts = line.split()
        modes = {"mbb": "make-before-break", "bbm": "break-before-make"}
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in modes):
            self.stdout.write("usage: migrate OBJECT ROUTER [mbb|bbm]\n")
            return
        try:
            report = self.moat.migrate(parts[0], parts[1], modes[parts[2] if len(parts) == 3 else "mbb"])
        except (ControlError, TopologyError) as exc:
            self.stdout.write(f"*** {exc}\n")
            return
        t0 = report["steps"][0][1] if report["steps"] else 0
        for what, at in report["steps"]:
            self.stdout.write(f"  +{(at - t0) * 1000:8.1f} ms  {what}\n")
        self.stdout.write(("moved" if report["ok"] else f"NOT moved ({report['error']})") + "\n")

    def do_vm(self, line: str) -> None:
        """vm [ROUTER]: the provisioned VMs, their objects and what each uses."""
        rows = []
        for router in line.split() or self.moat.topo.router_names():
            for vm in self._call(router, "vm") or []:
                for obj, info in (vm["objects"] or {"-": {}}).items():
                    usage = (info or {}).get("usage") or {}
                    rows.append({"router": router, "vm": vm["name"], "service": vm["service"],
                                 "version": vm["version"], "object": obj, "pid": (info or {}).get("pid"),
                                 "mobile": (info or {}).get("mobile"), "cpu_seconds": usage.get("cpu_seconds")})
        self.stdout.write(format_table(rows, ["router", "vm", "service", "version", "object", "pid",
                                              "mobile", "cpu_seconds"]) + "\n")

    def do_resolve(self, line: str) -> None:
        """resolve HOST NAME: ask the run's DNS server (dns23) from HOST."""
        try:
            host, name = line.split()
            got = self.moat.resolve(host, name)
        except ValueError:
            self.stdout.write("usage: resolve HOST NAME   (e.g. resolve co14 counter.home.moat)\n")
            return
        except TopologyError as exc:
            self.stdout.write(f"*** {exc}\n")
            return
        self.stdout.write(f"{name}: {' '.join(got['addresses']) or 'no address'} (rcode {got['rcode']})\n")
