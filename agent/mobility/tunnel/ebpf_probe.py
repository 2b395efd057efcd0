"""Can the eBPF backend run here? Compile, load and attach its programs in a throwaway
network namespace, and say why not.

:func:`probe_ebpf` runs this module as ``unshare --net python -m ...`` (so no device of the
probe ever appears in the agent's namespace); the child compiles the object (into the
cache the tunnel then uses), loads it with bpftool under a scratch pin directory, makes a
veth pair, attaches the encapsulation program to one end's egress and the decapsulation
program to the other's ingress, and removes it all. A success is remembered in the cache
(per object, kernel and user), so later agents do not pay for it again.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
from pathlib import Path

from agent.mobility.tunnel.base import TunnelUnavailable

log = logging.getLogger(__name__)

PROBE_TIMEOUT = 60.0
ROOT = Path(__file__).resolve().parents[3]


def _marker(obj: Path) -> Path:
    return obj.with_suffix(f".probed-{platform.release()}-{os.geteuid()}")


def _probe_here() -> None:
    """In a fresh namespace: load and attach both programs once; TunnelUnavailable if not."""
    from pyroute2 import IPRoute

    from agent.mobility.tunnel.ebpf_loader import Loader, attach, make_device

    loader = Loader()
    pin_dir = f"/sys/fs/bpf/moat/probe/{os.getpid()}"
    loader.load(pin_dir)
    try:
        with IPRoute() as ipr:
            index, _mac = make_device(ipr, "moatbp0", "moatbp1", 1472)
            other = ipr.link_lookup(ifname="moatbp1")[0]
            for name, where, ingress in (("moat_encap", index, False), ("moat_decap", other, True)):
                fd = loader.program(pin_dir, name)
                try:
                    attach(ipr, where, fd, name, ingress)
                except Exception as exc:  # noqa: BLE001 - the reason is the answer
                    raise TunnelUnavailable(f"tc cannot attach {name}: {exc}") from exc
                finally:
                    os.close(fd)
            maps = loader.maps(pin_dir)
            maps.close()
            ipr.link("del", index=index)
    finally:
        loader.unload(pin_dir)


def probe_ebpf(timeout: float = PROBE_TIMEOUT) -> str | None:
    """None if the eBPF backend can run here, else the reason (blocks: call at start-up, or
    in a thread from a coroutine)."""
    from agent.mobility.tunnel.ebpf_loader import compile_object

    try:
        obj = compile_object()
    except TunnelUnavailable as exc:
        return exc.reason
    from agent.mobility.tunnel.ebpf_loader import find_tool

    if find_tool("bpftool") is None:
        return "the eBPF backend needs bpftool (scripts/bootstrap.sh installs it)"
    if _marker(obj).exists():
        return None
    try:
        proc = subprocess.run(["unshare", "--net", sys.executable, "-m", __name__], cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"cannot probe eBPF in a throwaway namespace: {exc}"
    try:
        answer = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return f"eBPF probe failed: {(proc.stderr or proc.stdout).strip()[-400:]}"
    if answer.get("reason"):
        return str(answer["reason"])
    try:
        _marker(obj).touch()
    except OSError as exc:
        log.debug("cannot remember the eBPF probe: %s", exc)
    return None


def main() -> int:
    try:
        _probe_here()
    except TunnelUnavailable as exc:
        print(json.dumps({"reason": exc.reason}))
        return 0
    except Exception as exc:  # noqa: BLE001 - anything else is a reason too
        print(json.dumps({"reason": f"{type(exc).__name__}: {exc}"}))
        return 0
    print(json.dumps({"reason": None}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
