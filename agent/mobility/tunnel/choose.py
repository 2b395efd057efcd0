"""Choosing a backend: probe whether the kernel can make a GRE netdev in this namespace, and
whether the eBPF programs load here (``ebpf_probe.py``)."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from typing import Any

from agent.core import netlink as nl
from agent.mobility.tunnel.base import Tunnel, TunnelUnavailable
from agent.mobility.tunnel.ebpf import EbpfTunnel
from agent.mobility.tunnel.ebpf_probe import probe_ebpf
from agent.mobility.tunnel.kernel import KernelTunnel
from agent.mobility.tunnel.userspace import UserspaceTunnel

log = logging.getLogger(__name__)

#: Longest the probe may take (a kernel may try to load ip_gre first).
PROBE_TIMEOUT = nl.NETLINK_TIMEOUT
BACKENDS = ("auto", "kernel", "ebpf", "userspace")
#: What ``auto`` tries, in order: kernel GRE, then the eBPF programs (issue 16), then
#: userspace, which needs nothing and ends the list.
AUTO_ORDER = ("kernel", "ebpf", "userspace")
#: Environment variable that replaces AUTO_ORDER (comma list), e.g. to run a test suite with
#: ``auto`` meaning eBPF: MOAT_TUNNEL_AUTO=ebpf,userspace.
AUTO_ENV = "MOAT_TUNNEL_AUTO"


def auto_order() -> tuple[str, ...]:
    """AUTO_ORDER, or the order MOAT_TUNNEL_AUTO gives (ValueError naming a bad entry)."""
    text = os.environ.get(AUTO_ENV, "").strip()
    if not text:
        return AUTO_ORDER
    order = tuple(b.strip() for b in text.split(",") if b.strip())
    bad = [b for b in order if b not in BACKENDS or b == "auto"]
    if bad or not order:
        raise ValueError(f"{AUTO_ENV}={text!r}: each entry must be kernel, ebpf or userspace")
    return order


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


def _check(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown tunnel backend {backend!r}: {', '.join(BACKENDS)}")


def detect_backend() -> str:
    """The first backend of :func:`auto_order` that can run in this network namespace."""
    for backend in auto_order():
        reason = _probe(backend)
        if reason is None:
            return backend
        log.debug("%s tunnel backend unavailable: %s", backend, reason)
    return "userspace"


def _probe(backend: str) -> str | None:
    if backend == "kernel":
        return _probe_kernel_gre()
    if backend == "ebpf":
        return probe_ebpf()
    return None


async def _aprobe(backend: str, netlink: nl.Netlink | None) -> str | None:
    if backend == "kernel":
        return await probe_kernel_gre(netlink)
    if backend == "ebpf":
        return await asyncio.get_running_loop().run_in_executor(None, probe_ebpf)
    return None


def _unavailable(backend: str, reason: str) -> TunnelUnavailable:
    return TunnelUnavailable(f"{backend} GRE backend requested but unavailable: {reason}; "
                             "use the userspace backend (tunnel_backend: userspace or auto)")


def _build(backend: str, loop: asyncio.AbstractEventLoop, local: str, name: str,
           kwargs: dict[str, Any]) -> Tunnel:
    if backend == "kernel":
        return KernelTunnel(loop, local, name, **kwargs)
    if backend == "ebpf":
        return EbpfTunnel(loop, local, name, **kwargs)
    return UserspaceTunnel(loop, local, name, **kwargs)


def make_tunnel(backend: str = "auto", *, loop: asyncio.AbstractEventLoop, local: str,
                name: str = "moat0", **kwargs: Any) -> Tunnel:
    """A tunnel of ``backend`` ("auto", "kernel", "ebpf" or "userspace"), not started yet.

    "auto" takes the first of :data:`AUTO_ORDER` that can run here; "kernel" or "ebpf"
    where it cannot raises :class:`TunnelUnavailable` with the reason. The probes wait for
    the kernel once: from a coroutine prefer :func:`open_tunnel`.
    """
    _check(backend)
    if backend == "auto":
        chosen = detect_backend()
        log.info("tunnel backend auto-detected: %s", chosen)
        return _build(chosen, loop, local, name, kwargs)
    reason = _probe(backend)
    if reason is not None:
        raise _unavailable(backend, reason)
    return _build(backend, loop, local, name, kwargs)


async def open_tunnel(backend: str = "auto", *, local: str, name: str = "moat0",
                      **kwargs: Any) -> Tunnel:
    """:func:`make_tunnel` and :meth:`~.base.Tunnel.astart` for the running loop, never
    blocking it; raises :class:`TunnelUnavailable` / :class:`~.base.TunnelError`."""
    _check(backend)
    netlink = kwargs.get("netlink")
    if backend == "auto":
        chosen = "userspace"
        for candidate in auto_order():
            reason = await _aprobe(candidate, netlink)
            if reason is None:
                chosen = candidate
                break
            log.debug("%s tunnel backend unavailable: %s", candidate, reason)
        log.info("tunnel backend auto-detected: %s", chosen)
    else:
        reason = await _aprobe(backend, netlink)
        if reason is not None:
            raise _unavailable(backend, reason)
        chosen = backend
    tunnel = _build(chosen, asyncio.get_running_loop(), local, name, kwargs)
    await tunnel.astart()
    return tunnel
