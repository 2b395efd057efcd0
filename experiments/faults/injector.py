"""How ``moat run faults`` makes each fault in a running network, from the outside: kill -9 of
an agent's process, a Mininet link down and up, a move with the target's migration role told
to refuse a step (``inject_fault``), a move whose source or target agent is killed the moment
the source logs a step, the remote site cut (iptables in its namespace) while a VM's upgrade
waits between its probe and its fetch (the VM role's ``upgrade_hold``). Nothing here edits an
agent: it acts as an operator (or a crash) would.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.core.errors import AgentError
from agent.core.wait import WaitTimeout, wait_until
from topologies.errors import TopologyError
from topologies.run import ENV_RUN_ID

log = logging.getLogger(__name__)

#: How long an agent gets to answer ``ping`` after it was killed before the driver repairs it.
RECOVER_TIMEOUT = 10.0
#: How long a process may take to die after its connections closed.
DEATH_GRACE = 2.0
#: A move's own bound (topologies.client.MIGRATE_TIMEOUT) plus a margin.
MOVE_TIMEOUT = 75.0


class InjectionError(AgentError):
    """A fault could not be made as asked (its victim unknown, its event never seen)."""


def agent_status(client: Any, router: str, timeout: float = 1.0) -> dict[str, Any] | None:
    """``status`` of ``router``'s agent, or None when it does not answer."""
    try:
        status = client.call(router, "status", timeout=timeout)
    except (AgentError, OSError, TopologyError):
        return None
    return status if isinstance(status, dict) else None


def supervisor_restarts(run_dir: Path, router: str) -> int | None:
    """The restarts ``router``'s supervisor counted (its status file, agent.supervisor), or
    None when the router's agent runs unsupervised."""
    from agent.supervisor import read_status, status_path

    doc = read_status(status_path(run_dir, router))
    return doc["restarts"] if doc and isinstance(doc.get("restarts"), int) else None


def restarts_of(status: dict[str, Any] | None) -> int | None:
    """The restart count an agent's ``status`` reports (wherever it puts it), or None."""
    if not status:
        return None
    for holder in (status, status.get("supervisor"), status.get("supervision")):
        if isinstance(holder, dict) and isinstance(holder.get("restarts"), int):
            return holder["restarts"]
    return None


def kill_agent(client: Any, router: str) -> int:
    """kill -9 of ``router``'s agent process (the pid its ``status`` reports); the pid."""
    status = agent_status(client, router)
    if status is None or not isinstance(status.get("pid"), int):
        raise InjectionError(f"{router}'s agent does not answer: nothing to kill")
    os.kill(status["pid"], signal.SIGKILL)
    log.info("killed %s's agent (pid %d)", router, status["pid"])
    return status["pid"]


def wait_agent_back(client: Any, router: str, old_pid: int, timeout: float = RECOVER_TIMEOUT) -> dict | None:
    """The status of ``router``'s agent once a process other than ``old_pid`` answers, or None
    when none does within ``timeout``."""
    def back() -> dict | None:
        status = agent_status(client, router, timeout=0.5)
        return status if status and status.get("pid") != old_pid else None

    try:
        return wait_until(back, timeout, interval=0.05, what=f"{router}'s agent back")
    except WaitTimeout:
        return None


def repair_agent(moat: Any, router: str, timeout: float = 20.0) -> str:
    """Start ``router``'s agent again by hand (what nothing in the run did): stop whatever is
    left of its daemon, start the same argv, wait for ``ping``. The repair's description, or
    InjectionError when even that fails."""
    node = moat.net[router]
    node.stop_daemon(timeout=2.0)
    argv = node.daemon_command()
    node.start_daemon(argv, log_path=node.params.get("daemon_log"),
                      env={ENV_RUN_ID: moat.run.run_id}, cwd=node.params.get("daemon_cwd"))
    if agent_status(moat.client, router) is None:
        try:
            wait_until(lambda: agent_status(moat.client, router, timeout=0.5), timeout,
                       interval=0.1, what=f"{router}'s agent started by hand")
        except WaitTimeout:
            raise InjectionError(f"{router}'s agent did not come back even when started by hand") from None
    return f"{router}'s agent started again by the driver"


def instances(client: Any, name: str) -> tuple[list[str], list[str]]:
    """(routers listing object ``name``, routers whose agent did not answer)."""
    where, dead = [], []
    for router in client.routers():
        try:
            objects = client.call(router, "objects", timeout=2.0)
        except (AgentError, OSError, TopologyError):
            dead.append(router)
            continue
        if any(o.get("name") == name for o in objects):
            where.append(router)
    return where, dead


def agent_log(client: Any, router: str, lines: int = 30) -> list[str]:
    """The last ``lines`` of ``router``'s agent log (empty when it does not answer)."""
    try:
        return list(client.call(router, "log", lines=lines, timeout=3.0))
    except (AgentError, OSError, TopologyError, TypeError):
        return []


def object_count(client: Any, router: str, name: str) -> int | None:
    """The counter's own count on ``router`` (None if it does not answer)."""
    try:
        stats = client.call(router, "object_stats", name=name, timeout=3.0)
        return int(stats["state"]["count"])
    except (AgentError, OSError, TopologyError, KeyError, TypeError, ValueError):
        return None


def link(moat: Any, a: str, b: str, hold_s: float) -> dict[str, Any]:
    """The link a-b down (both ends, Mininet's configLinkStatus) for ``hold_s``, then up."""
    down = time.time()  # the fault starts with the first interface going down
    moat.net.configLinkStatus(a, b, "down")
    try:
        time.sleep(hold_s)  # the fault's length, not a wait for anything
    finally:
        moat.net.configLinkStatus(a, b, "up")
    return {"down_at": down, "up_at": time.time()}


def missing_routes(moat: Any, router: str) -> list[str]:
    """The static routes the topology gave ``router`` (its ``routes`` node param) that its
    routing table no longer has (a link that went down takes its routes with it)."""
    node = moat.net[router]
    missing = []
    for prefix, via in node.params.get("routes") or []:
        if not node.cmd(f"ip route show {prefix}").strip():
            missing.append(f"{prefix} via {via}")
    return missing


def restore_routes(moat: Any, router: str) -> None:
    """Install ``router``'s static routes again (what nothing in a run does by itself)."""
    from topologies.nodes import install_routes

    node = moat.net[router]
    install_routes(node, node.params.get("routes") or [])


def supported_points(client: Any, router: str) -> tuple[str, ...]:
    """The fault points ``router``'s migration role accepts (from its refusal of an unknown
    one, which names them): what F3 has landed so far."""
    try:
        client.call(router, "inject_fault", point="?", count=0)
    except AgentError as exc:
        text = str(exc)
        if "one of" in text:
            return tuple(p.strip(" '\"()") for p in text.split("one of", 1)[1].split(",") if p.strip(" '\"()"))
    return ()


def disarm(client: Any, router: str, points: list[str]) -> None:
    """Leave no fault armed on ``router`` (a point that did not fire would hit the next move)."""
    for point in points:
        try:
            client.call(router, "inject_fault", point=point, count=0, timeout=2.0)
        except (AgentError, OSError, TopologyError):
            pass  # a dead or restarted agent holds no armed point


def pid_gone(pid: int) -> bool:
    """``pid`` no longer runs (absent, or a zombie its parent has not reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] in ("Z", "X")


@dataclass
class Move:
    """A move in a thread: its report (or the error it ended with) and when it ended."""

    report: dict[str, Any] | None = None
    error: str = ""
    ended: float | None = None
    thread: threading.Thread | None = field(default=None, repr=False)

    def join(self, timeout: float = MOVE_TIMEOUT) -> None:
        assert self.thread is not None
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.error = self.error or f"the move did not end within {timeout:.0f}s"


def start_move(client: Any, name: str, target: str, mode: str) -> Move:
    move = Move()

    def go() -> None:
        try:
            move.report = client.migrate(name, target, mode)
        except (AgentError, OSError, TopologyError) as exc:
            move.error = f"{type(exc).__name__}: {exc}"
        move.ended = time.time()

    move.thread = threading.Thread(target=go, name=f"move-{name}", daemon=True)
    move.thread.start()
    return move


def wait_log_line(path: Path, offset: int, needle: str, timeout: float, stop: Move) -> float | None:
    """The wall-clock instant ``needle`` appears in ``path`` after byte ``offset`` (polled
    every millisecond), or None when the move ended (or ``timeout`` passed) first."""
    deadline = time.monotonic() + timeout
    with path.open("rb") as f:
        f.seek(offset)
        buf = b""
        data = needle.encode()
        while time.monotonic() < deadline:
            chunk = f.read()
            if chunk:
                buf = (buf + chunk)[-65536:]
                if data in buf:
                    return time.time()
            elif stop.ended is not None:
                return None
            else:
                time.sleep(0.001)
    return None


def wait_pid_gone(pid: int, timeout: float, stop: "Move") -> float | None:
    """The wall-clock instant ``pid`` died (polled every millisecond), or None when the move
    ended (or ``timeout`` passed) with it alive."""
    deadline = time.monotonic() + timeout
    grace = None
    while time.monotonic() < deadline:
        if pid_gone(pid):
            return time.time()
        if stop.ended is not None:
            # The move's caller sees the connection close while the dying process is still
            # exiting (its files close before it becomes a zombie): a moment more.
            grace = grace or time.monotonic() + DEATH_GRACE
            if time.monotonic() > grace:
                return None
        time.sleep(0.001)
    return None


def log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


# --- the remote site unreachable during an upgrade ------------------------------------------

#: The remote site's SFTP port (what an upgrade's probe and fetch connect to).
SITE_PORT = 22
#: How long a VM's upgrade may be held between its probe and its fetch (the hold's deadline:
#: should the driver die, the upgrade goes on by itself after this).
HOLD_DEADLINE_S = 60.0
#: How long an upgrade step may take to show: a probe (its check interval plus an SFTP
#: session), a fetch that times out on a cut site (agent.vm.fetch.DEFAULT_TIMEOUT), a swap.
UPGRADE_STEP_TIMEOUT = 30.0


def site_cut(moat: Any, cut: bool) -> None:
    """The remote site answers no SFTP connection (``cut``: an iptables DROP of TCP 22 in the
    site's namespace: a connection attempt hangs, as to a site that went away) or does again.
    Only the site's own namespace changes; a ``cut=False`` with no rule is a no-op."""
    node = moat.net[moat.site]
    rule = f"INPUT -p tcp --dport {SITE_PORT} -j DROP"
    if cut:
        out = node.cmd(f"iptables -w -I {rule} && echo CUT")
        if "CUT" not in out:
            raise InjectionError(f"cannot cut {moat.site}: iptables said {out.strip()[-300:]!r}")
        return
    while "GONE" not in node.cmd(f"iptables -w -C {rule} 2>/dev/null || echo GONE"):
        node.cmd(f"iptables -w -D {rule}")


def upgrade_hold(client: Any, router: str, action: str, deadline_s: float = HOLD_DEADLINE_S) -> dict:
    """``router``'s VM role's upgrade hold (agent.vm.upgrade_hold): arm, release, disarm, status."""
    return client.call(router, "upgrade_hold", action=action, deadline_s=deadline_s, timeout=3.0)


def vm_of(client: Any, router: str, vm: str) -> dict[str, Any] | None:
    """VM ``vm`` as ``router`` describes it (``vm`` command), or None."""
    try:
        vms = client.call(router, "vm", timeout=3.0)
    except (AgentError, OSError, TopologyError):
        return None
    return next((v for v in vms if v.get("name") == vm), None)


def wait_vm_step(client: Any, router: str, vm: str, text: str, timeout: float,
                 after: float = 0.0) -> tuple[str, float] | None:
    """The first step of VM ``vm`` on ``router`` that contains ``text``, dated after ``after``
    (its text and the router's time for it), or None when none shows within ``timeout``."""
    def seen() -> tuple[str, float] | None:
        found = vm_of(client, router, vm)
        for step, at in (found or {}).get("steps") or []:
            if text in step and at > after:
                return step, at
        return None

    try:
        return wait_until(seen, timeout, interval=0.05, what=f"{vm} on {router}: {text!r}")
    except WaitTimeout:
        return None


def upgrade_site_down(moat: Any, router: str, vm: str, publish: Any, version: str) -> dict[str, Any]:
    """The remote site unreachable during an upgrade of VM ``vm`` on ``router``, timed by the
    VM role's upgrade hold, not by a sleep: the hold armed, ``publish()`` puts ``version`` at
    the site; once the update check found it (the upgrade waits in the hold) the site is cut
    and the upgrade released, so its fetch finds the site gone; the refusal seen, the site
    comes back and the next check upgrades. What happened, with wall-clock instants:
    ``at`` (the site cut), ``ended`` (the upgrade done, or the site back if it never was)."""
    client = moat.client
    old = (vm_of(client, router, vm) or {}).get("version")
    if not old:
        raise InjectionError(f"{router} runs no VM {vm}: nothing to upgrade")
    if old == version:
        raise InjectionError(f"VM {vm} on {router} already runs {version}")
    start = time.time()
    upgrade_hold(client, router, "arm")
    out: dict[str, Any] = {"victim": moat.site, "vm": vm, "from": old, "to": version}
    cut = False
    try:
        publish()
        try:
            paused = wait_until(lambda: upgrade_hold(client, router, "status")["paused"],
                                UPGRADE_STEP_TIMEOUT, interval=0.02, what=f"{vm}'s upgrade held")
        except WaitTimeout:
            raise InjectionError(f"{router}'s update check did not find {version} within "
                                 f"{UPGRADE_STEP_TIMEOUT:.0f}s (no upgrade was held)") from None
        if paused.get("to") != version:
            raise InjectionError(f"the upgrade held is to {paused.get('to')!r}, not {version}")
        site_cut(moat, True)
        cut = True
        out["at"] = time.time()
        upgrade_hold(client, router, "release")
        refused = wait_vm_step(client, router, vm, f"upgrade to {version} refused",
                               UPGRADE_STEP_TIMEOUT, after=start)
        out["refused"] = refused[0] if refused else None
        out["refused_at"] = refused[1] if refused else None
        errors = [e for e in client.call(router, "errors", timeout=3.0) if e.get("vm") == vm]
        out["error"] = errors[-1] if errors and refused else None
        now = vm_of(client, router, vm) or {}
        out["version_after_refusal"] = now.get("version")
        site_cut(moat, False)
        cut = False
        out["site_back_at"] = time.time()
        upgraded = wait_vm_step(client, router, vm, f"upgraded {old} -> {version}",
                                UPGRADE_STEP_TIMEOUT, after=start)
        out["upgraded_at"] = upgraded[1] if upgraded else None
        out["version_after"] = (vm_of(client, router, vm) or {}).get("version")
        out["ended"] = max(out["site_back_at"], out["upgraded_at"] or 0.0)
        return out
    finally:
        if cut:
            site_cut(moat, False)
        with contextlib.suppress(AgentError, OSError, TopologyError):
            upgrade_hold(client, router, "disarm")
