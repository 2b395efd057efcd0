"""The upgrade hold (agent.vm.upgrade_hold): a fault injection point between an upgrade's
version probe and its fetch, off unless armed, one upgrade per arming, bounded by a deadline;
and, through it, the remote site cut at exactly that instant: the old version serves on with
its state, the error is recorded, and the next check (the site back) upgrades with the state.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from agent.core.errors import ControlError
from agent.vm import fetch as fetch_mod
from agent.vm.errors import SiteUnreachable
from agent.vm.upgrade_hold import MAX_HOLD_S, UpgradeHold
from test_vm_manager import Env
from test_vm_upgrade import CountingProcess, env  # noqa: F401 - the fixture



def test_an_unarmed_hold_does_not_wait() -> None:
    hold = UpgradeHold()
    asyncio.run(asyncio.wait_for(hold.wait("v1", "2.0"), 0.5))
    assert hold.status() == {"armed": False, "deadline_s": 0.0, "paused": None, "last": None}


def test_an_armed_hold_waits_for_its_release_once() -> None:
    hold = UpgradeHold(clock=lambda: 100.0)

    async def scenario() -> list[Any]:
        hold.arm(30)
        waiting = asyncio.create_task(hold.wait("v1", "2.0"))
        await asyncio.sleep(0)  # the upgrade reaches the hold
        seen = [hold.status()["paused"], waiting.done()]
        hold.release()
        await asyncio.wait_for(waiting, 1)
        # Disarmed by the first upgrade it held: the next one does not wait.
        await asyncio.wait_for(hold.wait("v1", "3.0"), 0.5)
        return seen

    paused, done = asyncio.run(scenario())
    assert paused == {"vm": "v1", "to": "2.0", "since": 100.0} and not done
    status = hold.status()
    assert not status["armed"] and status["paused"] is None
    assert status["last"] == {"vm": "v1", "to": "2.0", "since": 100.0, "ended": "released", "at": 100.0}


def test_a_forgotten_hold_ends_at_its_deadline() -> None:
    hold = UpgradeHold()
    hold.arm(0.05)
    asyncio.run(asyncio.wait_for(hold.wait("v1", "2.0"), 2))
    assert hold.status()["last"]["ended"] == "deadline" and not hold.armed


def test_disarm_releases_a_waiting_upgrade() -> None:
    hold = UpgradeHold()

    async def scenario() -> None:
        hold.arm(60)
        waiting = asyncio.create_task(hold.wait("v1", "2.0"))
        await asyncio.sleep(0)
        hold.disarm()
        await asyncio.wait_for(waiting, 1)

    asyncio.run(scenario())
    assert hold.status()["last"]["ended"] == "released"


@pytest.mark.parametrize("deadline", [0, -1, MAX_HOLD_S + 1, float("nan"), float("inf"), "5", True, None])
def test_a_bad_deadline_is_refused_and_arms_nothing(deadline: Any) -> None:
    hold = UpgradeHold()
    with pytest.raises(ControlError, match="deadline_s"):
        hold.arm(deadline)
    assert not hold.armed


def test_the_site_cut_while_the_upgrade_is_held_leaves_the_old_version_serving(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811 - the fixture
    """The probe found 2.0 (the site was up); the site is cut while the upgrade is held, so
    the fetch fails: nothing stopped, the state is the same, the error is recorded. The site
    back, the next check upgrades from that same state."""
    manager = env.manager
    vm = manager.vms["v1"]
    vm.policy["update_check_interval_s"] = 10
    vm.last_update_check = env.clock.now - 60
    site = {"up": True}
    fetch = env._fetch

    def reachable(*args: Any, **kw: Any) -> Any:
        if not site["up"]:
            env.fetches.append("unreachable")
            raise SiteUnreachable("timed out connecting to 10.0.9.9:22")
        return fetch(*args, **kw)

    monkeypatch.setattr(fetch_mod, "fetch_service", reachable)
    before = set(vm.objects.values())

    async def cut_during_the_hold() -> list[dict[str, Any]]:
        manager.upgrade_hold.arm(30)
        check = asyncio.create_task(manager.check_updates())
        while manager.upgrade_hold.status()["paused"] is None:
            assert not check.done(), "the upgrade never reached the hold"
            await asyncio.sleep(0.001)
        site["up"] = False
        manager.upgrade_hold.release()
        return await asyncio.wait_for(check, 5)

    [outcome] = asyncio.run(cut_during_the_hold())
    assert not outcome["ok"] and not outcome["rolled_back"] and "SiteUnreachable" in outcome["error"]
    assert any(s.startswith("update check found counter-svc 2.0 (runs 1.0)") for s, _ in vm.steps)
    assert set(vm.objects.values()) == before and not any(p.stopped for p in before)
    assert vm.version == "1.0" and CountingProcess.counts == {"counter": 5, "logger": 2}
    assert manager.errors[-1]["step"] == "upgrade: fetch"
    assert "SiteUnreachable" in manager.errors[-1]["reason"]

    site["up"] = True
    CountingProcess.counts["counter"] += 3  # served while the site was away
    env.clock.now += 11  # the next check is due
    [again] = asyncio.run(manager.check_updates())
    assert again["ok"] and vm.version == "2.0", again
    assert CountingProcess.counts == {"counter": 8, "logger": 2}


def test_a_vm_removed_while_its_upgrade_is_held_is_not_upgraded(env: Env) -> None:  # noqa: F811
    manager = env.manager
    vm = manager.vms["v1"]
    vm.policy["update_check_interval_s"] = 10
    vm.last_update_check = env.clock.now - 60

    async def remove_during_the_hold() -> list[dict[str, Any]]:
        manager.upgrade_hold.arm(30)
        check = asyncio.create_task(manager.check_updates())
        while manager.upgrade_hold.status()["paused"] is None:
            await asyncio.sleep(0.001)
        await manager.remove("v1")
        manager.upgrade_hold.release()
        return await asyncio.wait_for(check, 5)

    assert asyncio.run(remove_during_the_hold()) == []
    assert "v1" not in manager.vms and env.leftovers("versions") == []


def test_the_vm_roles_command_arms_releases_and_refuses_a_bad_action(env: Env) -> None:  # noqa: F811
    from types import SimpleNamespace

    from agent.vm.role import VmRole

    role = VmRole(SimpleNamespace(config=SimpleNamespace(name="r2", vm=None)))
    with pytest.raises(ControlError, match="runs no virtual machines"):
        role.cmd_upgrade_hold("arm")
    role.manager = env.manager
    assert role.cmd_upgrade_hold()["armed"] is False
    assert role.cmd_upgrade_hold("arm", deadline_s=5)["armed"] is True
    with pytest.raises(ControlError, match="action must be one of"):
        role.cmd_upgrade_hold("pause")
    with pytest.raises(ControlError, match="deadline_s"):
        role.cmd_upgrade_hold("arm", deadline_s=-3)
    assert role.cmd_upgrade_hold("status") == {"armed": True, "deadline_s": 5.0, "paused": None,
                                               "last": None}
    assert role.cmd_upgrade_hold("disarm")["armed"] is False
