"""The DNS server 23 of the patent: a Mininet host running ``dnsmasq`` that maps the mobile
objects' names to their home addresses (``counter.home.moat`` → 10.16.0.100), so a
corresponding object can find an object by name, as the patent's objects "obtain home
addresses through a dynamic name service (DNS) server 23 on network 16".

dnsmasq is authoritative for the run's domain only: ``no-resolv`` (it forwards nothing, so
no query leaves the emulated network), ``no-hosts`` (not the machine's ``/etc/hosts``),
names from one hosts file of the run, answered on the host's own address. A name of the
domain it does not know gets NXDOMAIN. It runs in the foreground through the node's daemon
hook (stopped and reaped with the node), logs every query to its log, and the node waits
until it answers before the build goes on.

Node params: ``run_dir`` (default ``<run>/<node>``), ``domain`` (default ``home.moat``),
``names`` — ``{name: address}`` for the hosts file (short names; the domain is appended).
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any, Mapping

import topologies._mininet  # noqa: F401  - first: repairs logging (see module)

from nodetools.dns import parse_a_answer, query  # the client side, re-exported
from topologies.errors import DaemonError
from topologies.nodes import ServerHost

__all__ = ["DnsServer", "DNSMASQ", "dnsmasq_config_text", "hosts_text", "query", "parse_a_answer"]

log = logging.getLogger(__name__)

DNSMASQ = "/usr/sbin/dnsmasq"
DEFAULT_DOMAIN = "home.moat"
READY_TIMEOUT = 10.0


def hosts_text(names: Mapping[str, str], domain: str) -> str:
    """``/etc/hosts`` lines: each short name and its fully qualified form."""
    lines = []
    for name, address in sorted(names.items()):
        socket.inet_aton(address)  # refuses what is not an IPv4 address
        if not name or any(c.isspace() for c in name) or "." in name:
            raise DaemonError(f"bad DNS name {name!r} (a short name, no dots)")
        lines.append(f"{address} {name}.{domain} {name}")
    return "\n".join(lines) + "\n"


def dnsmasq_config_text(address: str, domain: str, hosts: Path, pid_file: Path, port: int = 53) -> str:
    return "\n".join([
        "# MOAT: the run's name server (topologies/dns.py); nothing from /etc.",
        "no-resolv", "no-hosts", "no-poll", "bind-interfaces",
        f"listen-address={address}", f"port={port}",
        f"addn-hosts={hosts}", f"domain={domain}", f"local=/{domain}/", "expand-hosts",
        f"pid-file={pid_file}", "log-queries", "log-facility=-",
        "",
    ])


class DnsServer(ServerHost):
    """A Mininet host that runs dnsmasq for the run's object names."""

    def config(self, run_dir: str | os.PathLike[str] | None = None,  # type: ignore[override]
               domain: str = DEFAULT_DOMAIN, names: Mapping[str, str] | None = None,
               **params: Any) -> dict[str, Any]:
        self.setup_run_dir(run_dir, "dns")
        if not os.access(DNSMASQ, os.X_OK):
            raise DaemonError(f"{self.name}: {DNSMASQ} not found: install dnsmasq-base "
                              "(scripts/bootstrap.sh does)")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.run_dir, 0o755)  # dnsmasq reads its hosts file after dropping root
        self.domain = domain
        self.address = str(params.get("ip", "")).split("/")[0]
        self.hosts_path = self.run_dir / "hosts"
        self.hosts_path.write_text(hosts_text(dict(names or {}), domain))
        os.chmod(self.hosts_path, 0o644)
        self.config_path = self.run_dir / "dnsmasq.conf"
        self.config_path.write_text(dnsmasq_config_text(self.address, domain, self.hosts_path,
                                                        self.run_dir / "dnsmasq.pid"))
        params.setdefault("daemon_log", str(self.run_dir / "dnsmasq.log"))
        result = super().config(**params)
        self._wait_ready()
        return result

    def daemon_command(self) -> list[str] | None:
        return [DNSMASQ, "--keep-in-foreground", f"--conf-file={self.config_path}"]

    def _wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Until dnsmasq logs that it started (it has bound its socket by then)."""
        self.wait_for_log("started, version", "dnsmasq", timeout)
