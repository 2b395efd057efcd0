"""Choosing a backend: probe whether the kernel can make a GRE netdev in this namespace."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from typing import Any

from agent.core import netlink as nl
from agent.mobility.tunnel.base import TunnelUnavailable
from agent.mobility.tunnel.kernel import KernelTunnel
from agent.mobility.tunnel.userspace import UserspaceTunnel

log = logging.getLogger(__name__)

#: Longest the probe may take (a kernel may try to load ip_gre first).
PROBE_TIMEOUT = nl.NETLINK_TIMEOUT


def _probe_op(probe: str) -> nl.Op[str | None]:
    """An operation: None if a GRE netdev ``probe`` can be made (and is deleted again)."""

    def run(ipr: Any) -> str | None:
        try:
            nl.op_gre_add(probe, "127.0.0.1", "127.0.0.2", replace=False, up=False)(ipr)
        except Exception as exc:  # noqa: BLE001 - NetlinkError and friends
            code = nl.error_code(exc)
            if code == errno.EEXIST:
                return None  # the kind exists; the name or endpoints were taken
            hint = " (no ip_gre module)" if code in (errno.EOPNOTSUPP, errno.ENOENT, errno.EINVAL) else ""
            return f"the kernel cannot create a GRE device here: {exc}{hint}"
        try:
            nl.op_link_del(probe)(ipr)
        except Exception as exc:  # noqa: BLE001
            log.warning("could not delete GRE probe device %s: %s", probe, exc)
        return None

    return run


def _probe_name() -> str:
    return f"moatgp{os.getpid() % 10_000_000}"[:15]


def _probe_kernel_gre(netlink: nl.Netlink | None = None) -> str | None:
    """None if a GRE netdev can be created (and was deleted again) here, else the reason.

    Waits for the netlink worker (at most :data:`PROBE_TIMEOUT`): call it at start-up, or
    use :func:`probe_kernel_gre` from a coroutine.
    """
    try:
        return (netlink or nl.default()).call(_probe_op(_probe_name()), "probe kernel GRE",
                                              PROBE_TIMEOUT)
    except nl.NetlinkError as exc:
        return f"netlink unavailable: {exc}"


async def probe_kernel_gre(netlink: nl.Netlink | None = None) -> str | None:
    """:func:`_probe_kernel_gre` without blocking the loop."""
    try:
        return await (netlink or nl.default()).run(_probe_op(_probe_name()), "probe kernel GRE",
                                                   PROBE_TIMEOUT)
    except nl.NetlinkError as exc:
        return f"netlink unavailable: {exc}"


def detect_backend() -> str:
    """``"kernel"`` if a GRE netdev can be made in this network namespace, else ``"userspace"``."""
    reason = _probe_kernel_gre()
    if reason is not None:
        log.debug("kernel GRE unavailable: %s", reason)
        return "userspace"
    return "kernel"


def _resolve(backend: str, reason: str | None) -> str:
    """The backend to build, given the probe's answer (None: kernel GRE works)."""
    if backend == "auto":
        chosen = "userspace" if reason is not None else "kernel"
        log.info("tunnel backend auto-detected: %s", chosen)
        return chosen
    if backend == "kernel" and reason is not None:
        raise TunnelUnavailable(f"kernel GRE backend requested but unavailable: {reason}; "
                                "use the userspace backend (tunnel_backend: userspace or auto)")
    if backend not in ("kernel", "userspace"):
        raise ValueError(f"unknown tunnel backend {backend!r}: auto, kernel or userspace")
    return backend


def _build(backend: str, loop: asyncio.AbstractEventLoop, local: str, name: str,
           kwargs: dict[str, Any]) -> UserspaceTunnel | KernelTunnel:
    if backend == "kernel":
        return KernelTunnel(loop, local, name, **kwargs)
    return UserspaceTunnel(loop, local, name, **kwargs)


def make_tunnel(backend: str = "auto", *, loop: asyncio.AbstractEventLoop, local: str,
                name: str = "moat0", **kwargs: Any) -> UserspaceTunnel | KernelTunnel:
    """A tunnel of ``backend`` ("auto", "kernel" or "userspace"), not started yet.

    "auto" takes the kernel backend where the kernel can make GRE devices, else userspace;
    "kernel" where it cannot raises :class:`TunnelUnavailable` with the reason. The probe
    waits for the kernel once: from a coroutine prefer :func:`open_tunnel`.
    """
    if backend not in ("auto", "kernel", "userspace"):
        raise ValueError(f"unknown tunnel backend {backend!r}: auto, kernel or userspace")
    reason = _probe_kernel_gre() if backend != "userspace" else None
    return _build(_resolve(backend, reason), loop, local, name, kwargs)


async def open_tunnel(backend: str = "auto", *, local: str, name: str = "moat0",
                      **kwargs: Any) -> UserspaceTunnel | KernelTunnel:
    """:func:`make_tunnel` and :meth:`~.base.Tunnel.astart` for the running loop, never
    blocking it; raises :class:`TunnelUnavailable` / :class:`~.base.TunnelError`."""
    if backend not in ("auto", "kernel", "userspace"):
        raise ValueError(f"unknown tunnel backend {backend!r}: auto, kernel or userspace")
    reason = await probe_kernel_gre(kwargs.get("netlink")) if backend != "userspace" else None
    tunnel = _build(_resolve(backend, reason), asyncio.get_running_loop(), local, name, kwargs)
    await tunnel.astart()
    return tunnel
