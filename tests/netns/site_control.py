"""The run's remote site going down and coming back, for netns tests: its own sshd (the
node's daemon) killed with every session it forked, as in a crash, and started again.

Stopping only the daemon (``stop_daemon``) is not a site going down: OpenSSH's session
processes run in sessions of their own and keep serving the clients they have (a router's
kept SFTP session among them).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from agent.core.wait import wait_until


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (read from /proc before anything is killed)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def kill_sshd(site: Any) -> None:
    """SIGKILL the run's own sshd (the node's daemon) and every session it forked: the site
    goes away as in a crash, the routers' kept sessions with it."""
    pid = site.sshd_pid
    assert pid is not None
    for p in descendants(pid):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    site.stop_daemon()  # reaps it
    assert site.sshd_pid is None


def start_sshd(site: Any) -> None:
    """Start the site's sshd again (same configuration and host key) and wait until it listens."""
    log = Path(site.daemon_log_path)
    before = log.read_text().count("Server listening on")
    site.start_daemon(site.daemon_command(), log)
    wait_until(lambda: log.read_text().count("Server listening on") > before, 10,
               what="site24's sshd listening again")
