"""Mininet links that shape with ``tc`` and degrade gracefully where netem is missing.

Bandwidth limits use htb, which every kernel MOAT runs on has. Delay, jitter, loss and
queue limits need the ``sch_netem`` qdisc, which some kernels (the development and CI
machines among them) lack. Mininet's own ``TCIntf`` then prints a tc error and leaves the
link half-configured. :class:`MoatIntf` instead checks once whether netem works and, if it
does not, drops those parameters with a logged warning, keeping the bandwidth limit — an
experiment still runs and its log says exactly what was not emulated.

How availability is detected (:func:`netem_available`): by *trying* it. A throwaway network
namespace is made (``unshare --net``, falling back to ``mnexec -n``) and
``tc qdisc add dev lo root netem delay 1ms`` is run inside it; the namespace vanishes with
the command, so nothing is left behind. Trying beats looking: ``modinfo``/``/sys/module``
miss a built-in netem and cannot tell whether the module would auto-load, and a real
``tc`` call also triggers that auto-load. The answer is cached for the process. The
environment variable ``MOAT_NETEM`` overrides it: ``0`` forces the degraded mode (to test
it on a kernel that has netem), ``1`` skips the probe and trusts the kernel.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import subprocess
from typing import Any

import topologies._mininet  # noqa: F401  - first: repairs logging (see module)
from mininet.link import TCIntf, TCLink

__all__ = ["NETEM_PARAMS", "netem_available", "MoatIntf", "MoatLink"]

log = logging.getLogger(__name__)

#: TCIntf.config parameters that are implemented with netem.
NETEM_PARAMS: tuple[str, ...] = ("delay", "jitter", "loss", "max_queue_size")

_PROBE = ["tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"]
_NAMESPACE_RUNNERS: tuple[list[str], ...] = (["unshare", "--net", "--"], ["mnexec", "-n"])


@functools.cache
def netem_available() -> bool:
    """Whether this kernel can run the netem qdisc (probed once, see module docstring)."""
    forced = os.environ.get("MOAT_NETEM", "").strip().lower()
    if forced in ("0", "no", "false", "off"):
        log.info("netem disabled by MOAT_NETEM=%s", forced)
        return False
    if forced in ("1", "yes", "true", "on"):
        log.info("netem assumed available (MOAT_NETEM=%s)", forced)
        return True
    if shutil.which("tc") is None:
        log.warning("tc (iproute2) not found: netem treated as unavailable")
        return False
    for runner in _NAMESPACE_RUNNERS:
        if shutil.which(runner[0]) is None:
            continue
        try:
            res = subprocess.run(
                runner + _PROBE, capture_output=True, text=True, timeout=15, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.debug("netem probe with %s failed to run: %s", runner[0], exc)
            continue
        if res.returncode == 0:
            log.debug("netem probe with %s: available", runner[0])
            return True
        detail = (res.stderr or res.stdout).strip()
        log.debug("netem probe with %s: rc=%s %s", runner[0], res.returncode, detail)
        if "qdisc kind is unknown" in detail or "netem" in detail.lower():
            return False  # tc itself ran and refused netem: a definite answer
    log.info("netem probe inconclusive (not root?): treating netem as unavailable")
    return False


_warned: set[tuple[tuple[str, Any], ...]] = set()


class MoatIntf(TCIntf):
    """A ``TCIntf`` that drops netem parameters, with a warning, where netem is missing.

    It also gives the htb class an explicit ``quantum``: with htb's default ``r2q`` the
    quantum of any rate above ~16 Mbit/s exceeds 200000 bytes and ``tc`` prints a kernel
    warning that Mininet reports as "*** Error", although shaping works.
    """

    def bwCmds(self, bw: float | None = None, **kwargs: Any) -> tuple[list[str], str]:  # noqa: N802
        """Mininet's htb commands, plus a quantum within the kernel's quiet range."""
        cmds, parent = super().bwCmds(bw=bw, **kwargs)
        if bw:
            quantum = int(min(200_000, max(1_514, bw * 1e6 / 8 / 10)))
            cmds = [
                f"{c} quantum {quantum}" if "classid 5:1 htb" in c else c for c in cmds
            ]
        return cmds, parent

    def config(self, **params: Any) -> Any:  # type: ignore[override]
        """Configure as ``TCIntf`` does, minus delay/jitter/loss/queue when netem is absent."""
        wanted = {k: params[k] for k in NETEM_PARAMS if params.get(k) is not None}
        if wanted and not netem_available():
            for key in wanted:
                params.pop(key)
            signature = tuple(sorted((k, str(v)) for k, v in wanted.items()))
            level = logging.DEBUG if signature in _warned else logging.WARNING
            _warned.add(signature)
            log.log(
                level,
                "netem is not available in this kernel: link %s will NOT emulate %s "
                "(bandwidth limits still apply)",
                self.name,
                ", ".join(f"{k}={v}" for k, v in wanted.items()),
            )
            self.dropped_netem = wanted
        else:
            self.dropped_netem = {}
        return super().config(**params)


class MoatLink(TCLink):
    """A ``TCLink`` whose two ends are :class:`MoatIntf`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("cls1", MoatIntf)
        kwargs.setdefault("cls2", MoatIntf)
        super().__init__(*args, **kwargs)
