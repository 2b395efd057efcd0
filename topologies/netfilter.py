"""Let a run's bridged traffic through the machine's FORWARD chain — only the run's.

Why: with ``br_netfilter`` loaded and ``net.bridge.bridge-nf-call-iptables = 1``, every
frame a Linux bridge forwards between its ports goes through iptables' FORWARD chain, with
the bridge as both in- and out-interface. Container engines (Docker, and so CI runners)
set that chain's policy to DROP, so the LANs of a MOAT network silently carry nothing:
hosts on one network cannot reach their own router. Mininet only warns ("Linux bridge may
not work"), three times, and goes on.

What MOAT does instead, at the start of every run (:meth:`MoatNetwork.start`, so ``moat up``,
``moat cli`` and experiments): read ``/proc/sys/net/bridge/bridge-nf-call-iptables`` (absent:
no br_netfilter, nothing to do) and the FORWARD policy (``iptables -S FORWARD``, and
``iptables-legacy`` too when legacy tables are loaded next to nf_tables ones: both are
evaluated). If bridged IPv4 traffic would meet a DROP policy, it inserts, per bridge of the
run, ``-I FORWARD -i <bridge> -o <bridge> -m comment --comment moat-run:<run-id> -j ACCEPT``
— it matches bridged traffic of that bridge only (MOAT's routers route inside their own
namespaces, never in this one) — after recording the rules in ``run.json``, so
:func:`topologies.run.clean_run` (``moat down``, ``moat clean``, a crashed run) deletes
exactly those rules, and by their run-id comment any it finds. The policy itself is never
changed. If the rules cannot be added, the run stops with :class:`BridgeFilterError`,
which says what to change. Whatever it did is one log line.
"""

from __future__ import annotations

import logging
import shlex
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from topologies.errors import TopologyError

log = logging.getLogger(__name__)

__all__ = [
    "BridgeFilterError",
    "ForwardState",
    "Plan",
    "TAG_PREFIX",
    "check",
    "open_bridges",
    "plan",
    "remove_run_rules",
    "run_tag",
]

PROC_BRIDGE = Path("/proc/sys/net/bridge")
NF_CALL = "bridge-nf-call-iptables"
#: Legacy iptables tables loaded in this namespace (absent: none, or no ip_tables module).
LEGACY_TABLES = Path("/proc/net/ip_tables_names")
#: Every rule of a run carries ``--comment moat-run:<run-id>``.
TAG_PREFIX = "moat-run:"
IPTABLES_TIMEOUT = 15.0
#: How long an iptables call waits for the xtables lock (another tool changing rules).
LOCK_WAIT = "5"

#: Runs a command and returns its result; tests pass a fake machine.
Runner = Callable[[Sequence[str]], subprocess.CompletedProcess]

FIX = ("to run MOAT here, either let bridged traffic skip iptables "
       "(sysctl -w net.bridge.bridge-nf-call-iptables=0) or accept forwarded traffic "
       "(iptables -P FORWARD ACCEPT)")


class BridgeFilterError(TopologyError):
    """The machine's firewall would drop the run's bridged traffic and MOAT could not make
    an exception for it; the message says what to change."""


def run_tag(run_id: str) -> str:
    """The comment on every FORWARD rule of run ``run_id``."""
    return TAG_PREFIX + run_id


def system_runner(argv: Sequence[str]) -> subprocess.CompletedProcess:
    """Run ``argv`` without stdin, capturing text output, with a timeout."""
    return subprocess.run(list(argv), stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=IPTABLES_TIMEOUT, check=False)


@dataclass(frozen=True)
class ForwardState:
    """One iptables variant's FORWARD chain as read: ``policy`` ("ACCEPT", "DROP"), or None
    with ``error`` saying why it could not be read (``missing``: the tool is not installed)."""

    tool: str
    policy: str | None
    error: str = ""
    missing: bool = False


@dataclass
class Plan:
    """What to do for a run. ``action`` is ``nothing``, ``accept`` (insert ``rules``) or
    ``refuse``; ``message`` is the one line that says so."""

    action: str
    message: str
    rules: list[dict] = field(default_factory=list)  # {"tool": ..., "rule": [...]}


# --- reading the machine -------------------------------------------------------------------


def read_nf_call(proc_bridge: Path = PROC_BRIDGE) -> bool | None:
    """``bridge-nf-call-iptables``: True/False, or None when br_netfilter is not loaded."""
    try:
        return (proc_bridge / NF_CALL).read_text().strip() == "1"
    except FileNotFoundError:
        return None


def read_forward(tool: str, runner: Runner = system_runner) -> ForwardState:
    """The FORWARD policy as ``tool -S FORWARD`` shows it."""
    try:
        proc = runner([tool, "-w", LOCK_WAIT, "-S", "FORWARD"])
    except FileNotFoundError:
        return ForwardState(tool, None, f"{tool} is not installed", missing=True)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return ForwardState(tool, None, f"{tool} -S FORWARD failed: {exc}")
    if proc.returncode != 0:
        return ForwardState(tool, None, f"{tool} -S FORWARD failed: "
                                        f"{(proc.stderr or proc.stdout).strip()[-300:]}")
    for line in proc.stdout.splitlines():
        parts = line.split()
        if parts[:2] == ["-P", "FORWARD"] and len(parts) >= 3:
            return ForwardState(tool, parts[2])
    return ForwardState(tool, None, f"{tool} -S FORWARD printed no policy")


def iptables_tools(runner: Runner = system_runner, legacy_tables: Path = LEGACY_TABLES) -> list[str]:
    """The variants whose FORWARD chain traffic goes through: ``iptables``, plus
    ``iptables-legacy`` when ``iptables`` is the nf_tables one and legacy filter tables are
    loaded as well (the kernel evaluates both; a DROP in either drops). Never loads a
    legacy table that is not there already."""
    tools = ["iptables"]
    try:
        legacy_loaded = "filter" in legacy_tables.read_text().split()
    except OSError:
        legacy_loaded = False
    if legacy_loaded:
        try:
            version = runner(["iptables", "-V"]).stdout
        except (OSError, subprocess.TimeoutExpired):
            version = ""
        if "nf_tables" in version:
            tools.append("iptables-legacy")
    return tools


# --- deciding ------------------------------------------------------------------------------


def rule_spec(bridge: str, run_id: str) -> list[str]:
    """The FORWARD rule (after ``-I FORWARD``) that accepts what ``bridge`` bridges."""
    return ["-i", bridge, "-o", bridge, "-m", "comment", "--comment", run_tag(run_id),
            "-j", "ACCEPT"]


def plan(nf_call: bool | None, states: Sequence[ForwardState], bridges: Sequence[str],
         run_id: str) -> Plan:
    """Decide, from what was read, what run ``run_id`` with ``bridges`` must do (pure)."""
    names = " ".join(bridges)
    if nf_call is None:
        return Plan("nothing", "br_netfilter not loaded: bridged traffic does not go through "
                               "iptables")
    if not nf_call:
        return Plan("nothing", "net.bridge.bridge-nf-call-iptables = 0: bridged traffic does "
                               "not go through iptables")
    head = "net.bridge.bridge-nf-call-iptables = 1"
    dropping = [s for s in states if s.policy is not None and s.policy != "ACCEPT"]
    unread = [s for s in states if s.policy is None and not s.missing]
    if unread and not dropping:
        return Plan("refuse", f"{head} and the FORWARD policy cannot be read "
                              f"({'; '.join(s.error for s in unread)}): bridged traffic may "
                              f"be dropped; {FIX}")
    if not dropping:
        if all(s.missing for s in states):
            return Plan("nothing", f"{head}, iptables is not installed: no iptables rules to "
                                   f"drop bridged traffic (run `make setup` to install it)")
        return Plan("nothing", f"{head}, FORWARD policy ACCEPT: bridges {names} forward")
    rules = [{"tool": s.tool, "rule": rule_spec(b, run_id)} for s in dropping for b in bridges]
    policies = ", ".join(f"{s.tool} {s.policy}" for s in dropping)
    return Plan("accept", f"{head} and FORWARD policy {policies}: accepting the bridged "
                          f"traffic of {names} with FORWARD rules tagged {run_tag(run_id)} "
                          f"(removed at down/clean; the policy is left as it is)", rules)


def check(bridges: Sequence[str], run_id: str, *, proc_bridge: Path = PROC_BRIDGE,
          runner: Runner = system_runner, legacy_tables: Path = LEGACY_TABLES) -> Plan:
    """Read the machine and decide (adds nothing)."""
    nf_call = read_nf_call(proc_bridge)
    if not nf_call:
        return plan(nf_call, [], bridges, run_id)
    states = [read_forward(t, runner) for t in iptables_tools(runner, legacy_tables)]
    return plan(nf_call, states, bridges, run_id)


# --- acting --------------------------------------------------------------------------------


def _iptables(runner: Runner, tool: str, op: str, rule: Sequence[str]) -> subprocess.CompletedProcess:
    return runner([tool, "-w", LOCK_WAIT, op, "FORWARD", *rule])


def open_bridges(bridges: Sequence[str], run_id: str, record: Callable[[list[dict]], None], *,
                 proc_bridge: Path = PROC_BRIDGE, runner: Runner = system_runner,
                 legacy_tables: Path = LEGACY_TABLES) -> Plan:
    """Check, and if bridged traffic would be dropped, let ``bridges`` forward.

    ``record(rules)`` is called with every rule *before* any is added (the run saves them in
    ``run.json``, so a crash mid-way still leaves ``moat clean`` the full list). Raises
    :class:`BridgeFilterError` when the traffic would be dropped and the rules cannot be
    added; rules added before the failure are removed again first. Logs one line.
    """
    decision = check(bridges, run_id, proc_bridge=proc_bridge, runner=runner,
                     legacy_tables=legacy_tables)
    if decision.action == "refuse":
        raise BridgeFilterError(decision.message)
    if decision.action == "nothing":
        log.info("%s", decision.message)
        return decision
    record(decision.rules)
    for rule in decision.rules:
        try:
            proc = _iptables(runner, rule["tool"], "-I", rule["rule"])
            failure = "" if proc.returncode == 0 else (proc.stderr or proc.stdout).strip()
        except (OSError, subprocess.TimeoutExpired) as exc:
            failure = str(exc)
        if failure:
            remove_run_rules(run_id, decision.rules, runner=runner)
            raise BridgeFilterError(
                f"{decision.message.split(':', 1)[0]}, and adding "
                f"`{rule['tool']} -I FORWARD {shlex.join(rule['rule'])}` failed: "
                f"{failure[-300:]}; {FIX}")
    log.warning("%s", decision.message)
    return decision


def _tagged_rules(tool: str, tag: str, runner: Runner) -> list[list[str]]:
    """FORWARD rules of ``tool`` whose comment is exactly ``tag``, as ``-D`` specs."""
    try:
        proc = runner([tool, "-w", LOCK_WAIT, "-S", "FORWARD"])
    except (OSError, subprocess.TimeoutExpired):
        return []
    if proc.returncode != 0:
        return []
    found = []
    for line in proc.stdout.splitlines():
        try:
            parts = shlex.split(line)
        except ValueError:
            continue
        if parts[:2] != ["-A", "FORWARD"]:
            continue
        comments = [parts[i + 1] for i, p in enumerate(parts[:-1]) if p == "--comment"]
        if tag in comments:
            found.append(parts[2:])
    return found


def remove_run_rules(run_id: str, recorded: Sequence[dict], *, runner: Runner = system_runner,
                     tools: Sequence[str] | None = None) -> list[str]:
    """Delete run ``run_id``'s FORWARD rules: those ``recorded`` in its ``run.json`` and any
    other carrying its tag (a run whose ``run.json`` is gone). Touches no other rule and
    never the policy. Safe to repeat; returns what it removed."""
    tag = run_tag(run_id)
    removed: list[str] = []
    by_tool: dict[str, list[list[str]]] = {}
    for rule in recorded:
        if rule.get("tool") and tag in rule.get("rule", []):
            by_tool.setdefault(rule["tool"], []).append(list(rule["rule"]))
    scan = list(tools) if tools is not None else (
        iptables_tools(runner) if shutil.which("iptables") else [])
    for tool in dict.fromkeys([*by_tool, *scan]):
        # What the chain holds now, plus what was recorded but not found (already gone: the
        # delete then fails harmlessly). Bounded: one delete per rule listed.
        specs = _tagged_rules(tool, tag, runner)
        for spec in [*specs, *(r for r in by_tool.get(tool, []) if r not in specs)]:
            try:
                proc = _iptables(runner, tool, "-D", spec)
            except (OSError, subprocess.TimeoutExpired) as exc:
                log.warning("run %s: could not remove %s rule %s: %s", run_id, tool, spec, exc)
                continue
            if proc.returncode == 0:
                removed.append(f"{tool} FORWARD rule {shlex.join(spec)}")
    return removed
