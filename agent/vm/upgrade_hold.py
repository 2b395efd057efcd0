"""A fault injection point of upgrades: hold the next upgrade between its probe and its fetch.

An upgrade first probes the remote site for the service's version (which must reach the site)
and then fetches, verifies and installs it (which must reach it again). A fault that strikes
*between* the two — the site going away once the VM decided to upgrade — cannot be timed from
outside: the fetch follows the probe within milliseconds. Armed (the VM role's
``upgrade_hold`` command), the next upgrade whose probe found a new version waits here until
it is released or its deadline passes, and says so (``paused``); a test or ``moat run faults``
cuts the site in that pause and releases it. Off unless armed, one upgrade per arming, and
never longer than the deadline: a forgotten hold delays one upgrade, it never stops them.
While an upgrade waits, the VM role's lifecycle timer waits with it (retirements and other
VMs' update checks come after), which is why the deadline is bounded (:data:`MAX_HOLD_S`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any, Callable

from agent.core.errors import ControlError

log = logging.getLogger(__name__)

__all__ = ["MAX_HOLD_S", "UpgradeHold"]

#: The longest an armed hold may keep an upgrade waiting, seconds.
MAX_HOLD_S = 300.0


class UpgradeHold:
    """One-shot pause of the next upgrade after its probe (see the module docstring)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self.armed = False
        self.deadline_s = 0.0
        #: The upgrade waiting now: {"vm", "to", "since"}; None when none waits.
        self.paused: dict[str, Any] | None = None
        #: The last upgrade that was held: how its pause ended ("released" | "deadline").
        self.last: dict[str, Any] | None = None
        self._release: asyncio.Event | None = None

    def arm(self, deadline_s: float) -> None:
        """Hold the next upgrade after its probe, at most ``deadline_s`` seconds."""
        if isinstance(deadline_s, bool) or not isinstance(deadline_s, (int, float)) \
                or not math.isfinite(deadline_s) or not 0 < deadline_s <= MAX_HOLD_S:
            raise ControlError(f"deadline_s must be a number in (0, {MAX_HOLD_S:g}], not {deadline_s!r}")
        self.armed, self.deadline_s = True, float(deadline_s)

    def disarm(self) -> None:
        """No further upgrade is held (one that waits now is released too)."""
        self.armed = False
        self.release()

    def release(self) -> None:
        """The upgrade that waits (if any) goes on to its fetch now."""
        if self._release is not None:
            self._release.set()

    def status(self) -> dict[str, Any]:
        return {"armed": self.armed, "deadline_s": self.deadline_s,
                "paused": dict(self.paused) if self.paused else None,
                "last": dict(self.last) if self.last else None}

    async def wait(self, vm: str, version: str) -> None:
        """Called by an upgrade once its probe found ``version``: returns at once unless
        armed; else disarms (one upgrade per arming) and waits for :meth:`release` or the
        deadline."""
        if not self.armed:
            return
        self.armed = False
        self._release = asyncio.Event()
        self.paused = {"vm": vm, "to": version, "since": self._clock()}
        log.warning("upgrade of VM %s to %s held after its probe (at most %.1f s)", vm, version,
                    self.deadline_s)
        ended = "cancelled"  # the agent stopping while it waits
        try:
            await asyncio.wait_for(self._release.wait(), self.deadline_s)
            ended = "released"
        except asyncio.TimeoutError:
            ended = "deadline"
            log.warning("upgrade of VM %s to %s: hold deadline passed, going on", vm, version)
        finally:
            self.last = dict(self.paused, ended=ended, at=self._clock())
            self.paused, self._release = None, None
