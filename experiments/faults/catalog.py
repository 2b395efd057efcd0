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

#: The source's log lines at each step of a move (MigrationReport.step), by short step name.
MBB_STEPS = {"warm_start": "start warm instance at target, register with S",
             "target_registered": "target registered (its instance queues requests)",
             "source_stopped": "source stopped with its final checkpoint"}
BBM_STEPS = {"source_stopping": "stop source, keep checkpoint"}


class UnknownFault(ValueError):
    """A fault name that is not in the catalog."""


@dataclass(frozen=True)
class Fault:
    """One fault: ``kind`` says how the injector makes it, the rest parametrises it.

    kinds: ``kill`` (kill -9 of the agent of ``victim``: hoa, foa or router, the object's
    hosting router), ``link`` (a backbone link down ``hold_s`` seconds, then up),
    ``migration_kill`` (a move in ``mode``; kill -9 of ``victim``: source or target, when the
    source logs ``marker``), ``inject`` (a move in ``mode`` with the target's migration role
    refusing ``point``, its ``inject_fault`` command), ``upgrade`` (the remote site
    unreachable while a VM upgrades).
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


def _migration_kills() -> list[Fault]:
    out = []
    for mode, steps, short in ((MBB, MBB_STEPS, "mbb"), (BBM, BBM_STEPS, "bbm")):
        for step, marker in steps.items():
            for victim in ("source", "target"):
                out.append(Fault(
                    f"{short}_{step}_kill_{victim}", "migration_kill",
                    f"a {mode} move r18b<->r20a; kill -9 of the {victim}'s agent when the source "
                    f"logs '{marker}'",
                    "crash-safe migration (issue 13 item 4, F3) and agent supervision (F1)",
                    victim=victim, mode=mode, marker=marker))
    return out


FAULTS: tuple[Fault, ...] = (
    Fault("link_r22a_r18a", "link", "the backbone link r22a-r18a down for 2 s, then up",
          "routes back when a link comes back: the kernel flushes a link's static routes when "
          "it goes down and nothing in a run installs them again (no routing daemon; the "
          "router node could re-install its topology routes on link up)", hold_s=2.0),
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
    *_migration_kills(),
    Fault("kill_foa", "kill", "kill -9 of the FOA's agent (r18a, the object's foreign agent)",
          "agent supervision (F1), durable FOA visitors and re-registration on a restarted "
          "agent's advertisement sequence (F2)", victim="foa"),
    Fault("kill_router", "kill", "kill -9 of the agent of the router hosting the object (r18b)",
          "agent supervision (F1) and objects outliving their agent's crash (F4)", victim="router"),
    Fault("kill_hoa", "kill", "kill -9 of the HOA's agent (r22b)",
          "agent supervision (F1) and durable HOA bindings, data plane rebuilt (F2)", victim="hoa"),
    Fault("upgrade_site_down", "upgrade",
          "the remote site unreachable while the counter's VM upgrades",
          "upgrade rollback to the previous version with its state (issue 13 item 5, F3)",
          not_runnable="the counter runs placed, not as a provisioned VM's mobile object, and this "
                       "experiment has no step yet that publishes a new version and cuts the site "
                       "mid-upgrade"),
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
