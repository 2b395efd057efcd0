"""The faults of ``moat run faults`` (issue 13 item 8): what each does and what recovers it.

Pure data. The driver runs them in :data:`ORDER` (``--short``: :data:`SHORT`); a fault that
does not recover is reported with ``mechanism``, the part of issue 13 that should recover it.
Migration faults are timed by an event, never a sleep: ``marker`` is the line the migrating
source's agent logs when the move reaches that step (agent/hosting/migration.py
``MigrationReport.step``), and the victim's agent is killed the moment the line appears.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Fault", "FAULTS", "ORDER", "SHORT", "by_name", "UnknownFault"]

MBB, BBM = "make-before-break", "break-before-make"

#: The migration role's crash points (agent/hosting/migration.py CRASH_POINTS, issue 13 F3)
#: measured per mode, each with the source's step log line (``MigrationReport.step``) at which
#: a kill -9 from outside makes the same crash when the role does not offer the point yet
#: ("": no step line marks it; the row is then not run).
CRASHES = {
    MBB: {"source_after_start": "target registered (its instance queues requests)",
          "source_after_stop": "source stopped with its final checkpoint",
          "source_after_transfer": "target restored",
          "source_after_commit": "target committed: it serves",
          "target_after_start": "",
          "target_after_restore": ""},
    # Break-before-make with pre-copy (the default transfer) sends the commit with its start:
    # there is no commit step of its own, and source_after_start is the crash after it.
    BBM: {"source_after_stop": "stop source, keep checkpoint",
          "source_after_start": "target registered with the checkpoint",
          "target_after_start": ""},
}


class UnknownFault(ValueError):
    """A fault name that is not in the catalog."""


@dataclass(frozen=True)
class Fault:
    """One fault: ``kind`` says how the injector makes it, the rest parametrises it.

    kinds: ``kill`` (kill -9 of the agent of ``victim``: hoa, foa or router, the object's
    hosting router), ``link`` (a backbone link down ``hold_s`` seconds, then up),
    ``migration_crash`` (a move in ``mode`` whose ``victim``, source or target, dies at crash
    point ``point`` of its migration role, or, where the role lacks it, is killed -9 when the
    source logs ``marker``), ``inject`` (a move in ``mode`` with the target's migration role
    refusing or cutting ``point``, ``+``-joined when several, its ``inject_fault`` command),
    ``upgrade`` (the remote site
    unreachable while a VM upgrades: cut while the VM role holds the upgrade between its
    version probe and its fetch, its ``upgrade_hold`` command).
    """

    name: str
    kind: str
    description: str
    mechanism: str
    victim: str = ""
    mode: str = ""
    marker: str = ""
    point: str = ""
    hold_s: float = 0.0
    #: Why the fault cannot be run by this experiment yet ("" when it can).
    not_runnable: str = ""


def _migration_crashes() -> list[Fault]:
    out = []
    for mode, points in CRASHES.items():
        short = "mbb" if mode == MBB else "bbm"
        for point, marker in points.items():
            victim = point.split("_", 1)[0]
            out.append(Fault(
                f"{short}_{point}", "migration_crash",
                f"a {mode} move r18b<->r20a; the {victim}'s agent dies (SIGKILL) {point.split('_', 1)[1].replace('_', ' ')} "
                f"(its crash point {point}; else kill -9 when the source logs '{marker or '-'}')",
                "crash-safe migration (issue 13 item 4, F3) and agent supervision (F1)",
                victim=victim, mode=mode, marker=marker, point=point))
    return out


FAULTS: tuple[Fault, ...] = (
    Fault("link_r22a_r18a", "link", "the backbone link r22a-r18a down for 2 s, then up",
          "routes back when a link comes back: the kernel flushes a link's static routes when "
          "it goes down; each end's static-routes role installs its topology routes again as "
          "the link comes up with carrier (a netlink announcement; a look every second as "
          "fallback)", hold_s=2.0),
    Fault("cut_transfer_mbb", "inject",
          "a make-before-break move r18b<->r20a whose STATE_TRANSFER the target refuses "
          "(inject_fault state_transfer)",
          "crash-safe migration: cancel the warm target, restart at the source (F3)",
          mode=MBB, point="state_transfer"),
    Fault("cut_start_bbm", "inject",
          "a break-before-make move r18b<->r20a whose MIGRATE start the target refuses "
          "(inject_fault migrate_start)",
          "crash-safe migration: restart at the source from the checkpoint (F3)",
          mode=BBM, point="migrate_start"),
    Fault("transfer_cut_mbb", "inject",
          "a make-before-break move whose target restores the state but its answer is lost "
          "(inject_fault transfer_cut)",
          "crash-safe migration: exactly one instance with the latest state (F3)",
          mode=MBB, point="transfer_cut"),
    Fault("commit_cut_mbb", "inject",
          "a make-before-break move whose commit the target takes but its answer is lost "
          "(inject_fault commit_cut)",
          "crash-safe migration: the source learns the outcome, one instance serves (F3)",
          mode=MBB, point="commit_cut"),
    Fault("cancel_lost_mbb", "inject",
          "a make-before-break move whose STATE_TRANSFER the target refuses and whose cancel is "
          "lost too (inject_fault state_transfer + cancel_lost)",
          "crash-safe migration: the warm target drops itself, the source serves (F3)",
          mode=MBB, point="state_transfer+cancel_lost"),
    *_migration_crashes(),
    Fault("kill_foa", "kill", "kill -9 of the FOA's agent (r18a, the object's foreign agent)",
          "agent supervision (F1), durable FOA visitors and re-registration on a restarted "
          "agent's advertisement sequence (F2)", victim="foa"),
    Fault("kill_router", "kill", "kill -9 of the agent of the router hosting the object (r18b)",
          "agent supervision (F1) and objects outliving their agent's crash (F4)", victim="router"),
    Fault("kill_hoa", "kill", "kill -9 of the HOA's agent (r22b)",
          "agent supervision (F1) and durable HOA bindings, data plane rebuilt (F2)", victim="hoa"),
    Fault("upgrade_site_down", "upgrade",
          "the remote site unreachable while the counter's VM upgrades: the counter runs as the "
          "mobile object of a VM on r18b (service counter-svc 1.0, a fresh count); 2.0 is "
          "published, site24 cut (iptables DROP of SFTP) while the upgrade is held after its "
          "probe (upgrade_hold), the fetch fails, the site comes back, the next check upgrades",
          "upgrade rollback to the previous version with its state (issue 13 item 5, F3)"),
)

ORDER: tuple[str, ...] = tuple(f.name for f in FAULTS)
#: Faults that recover today come first, the agent kills last: a kill that is not recovered
#: is repaired by the driver (agent restarted, object placed again) before the next fault.
#: The netns test's variant: a link flap, a cut transfer and an agent kill (under 3 min).
SHORT: tuple[str, ...] = ("link_r22a_r18a", "cut_transfer_mbb", "kill_foa")


def by_name(name: str) -> Fault:
    for fault in FAULTS:
        if fault.name == name:
            return fault
    raise UnknownFault(f"unknown fault {name!r}; known: {', '.join(ORDER)}")
