"""Building and loading the eBPF GRE programs (``bpf/moat_gre.c``).

The object is compiled from the repository's source on first use (``clang -target bpf``)
into a cache named by the hash of the source and the compiler's version, so an edited source
is rebuilt and nothing binary is committed. :class:`Loader` loads it with ``bpftool prog
loadall``, pinning programs and maps under a run-scoped bpffs directory
(``/sys/fs/bpf/moat/<run id>/<local>-<pid>``), and removes those pins again. Every failure
is a :class:`~.base.TunnelUnavailable` whose reason says what is missing.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from agent.mobility.tunnel.base import TunnelError, TunnelUnavailable
from agent.mobility.tunnel.ebpf_maps import MAP_NAMES, BpfMaps, open_program

log = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parents[3] / "bpf" / "moat_gre.c"
#: Where compiled objects are kept (MOAT_BPF_CACHE overrides).
CACHE = Path(os.environ.get("MOAT_BPF_CACHE") or Path.home() / ".cache" / "moat" / "bpf")
BPFFS = "/sys/fs/bpf"
PIN_ROOT = f"{BPFFS}/moat"
PROGRAMS = ("moat_encap", "moat_decap")
TOOL_TIMEOUT = 60.0


def find_tool(name: str) -> str | None:
    """``name`` on PATH, or in the sbin directories a daemon's PATH may lack (bpftool)."""
    return shutil.which(name) or shutil.which(name, path="/usr/local/sbin:/usr/sbin:/sbin")


def _run(argv: list[str], what: str, timeout: float = TOOL_TIMEOUT) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as exc:
        raise TunnelUnavailable(f"{what}: {exc}") from exc
    if proc.returncode != 0:
        detail = "\n".join(line for line in (proc.stderr or proc.stdout).strip().splitlines()
                           if "strict mode" not in line and "--legacy" not in line)
        raise TunnelUnavailable(f"{what} failed: {detail[-600:]}")
    return proc.stdout


def compiler_version(clang: str) -> str:
    return _run([clang, "--version"], "clang --version").splitlines()[0]


def compile_object(source: Path = SOURCE, cache: Path = CACHE) -> Path:
    """The compiled object of ``source``, built now if the cache has none for this source
    and compiler (atomically: agents starting together may build it at the same time)."""
    clang = find_tool("clang")
    if clang is None:
        raise TunnelUnavailable("the eBPF backend needs clang (scripts/bootstrap.sh installs it)")
    try:
        text = source.read_bytes()
    except OSError as exc:
        raise TunnelUnavailable(f"eBPF source {source}: {exc}") from exc
    digest = hashlib.sha256(text + compiler_version(clang).encode()).hexdigest()[:16]
    target = cache / f"moat_gre-{digest}.o"
    if target.exists():
        return target
    try:
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache, suffix=".o.tmp")
        os.close(fd)
    except OSError as exc:
        raise TunnelUnavailable(f"eBPF cache {cache}: {exc}") from exc
    arch_include = f"/usr/include/{platform.machine()}-linux-gnu"
    try:
        _run([clang, "-O2", "-g", "-Wall", "-target", "bpf", f"-I{arch_include}", "-c",
              str(source), "-o", tmp], f"compiling {source.name}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("eBPF GRE programs compiled: %s", target)
    return target


BPF_FS_MAGIC = 0xCAFE4A11


def is_bpffs(path: str) -> bool:
    """Whether bpffs is what ``path`` shows now (statfs): /proc/mounts also lists mounts a
    later one hides, such as the host's bpffs under a Mininet node's fresh sysfs."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(256)  # struct statfs; f_type is its first word
    if libc.statfs(path.encode(), buf) != 0:
        return False
    return int.from_bytes(buf.raw[:ctypes.sizeof(ctypes.c_long)], sys.byteorder) == BPF_FS_MAGIC


def ensure_bpffs(root: str = BPFFS) -> None:
    """Mount bpffs at ``root`` unless one is there (pins need it)."""
    if is_bpffs(root):
        return
    _run([find_tool("mount") or "mount", "-t", "bpf", "bpf", root], f"mounting bpffs on {root}")
    if not is_bpffs(root):
        raise TunnelUnavailable(f"{root} is not bpffs after mounting it")


def pin_dir_for(local: str, run_id: str | None = None, pid: int | None = None) -> str:
    """The run-scoped pin directory of one tunnel (bpffs refuses names with dots)."""
    run = run_id or os.environ.get("MOAT_RUN_ID") or "norun"

    def safe(text: str) -> str:
        return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)

    return f"{PIN_ROOT}/{safe(run)}/{safe(local)}-{pid or os.getpid()}"


def remove_pins(pin_dir: str) -> None:
    """Unpin everything under ``pin_dir`` (programs and maps unload with their last user)."""
    for sub in ("progs", "maps"):
        path = os.path.join(pin_dir, sub)
        try:
            names = os.listdir(path)
        except OSError:
            continue
        for name in names:
            try:
                os.unlink(os.path.join(path, name))
            except OSError as exc:
                log.warning("cannot unpin %s/%s: %s", path, name, exc)
        try:
            os.rmdir(path)
        except OSError:
            pass
    try:
        os.rmdir(pin_dir)
    except OSError:
        pass


def remove_stale_pins(pin_dir: str) -> None:
    """Pins a killed agent with the same local address left in this run (its pid is gone)."""
    parent, own = os.path.split(pin_dir)
    prefix = own.rsplit("-", 1)[0] + "-"
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        pid = name[len(prefix):]
        if name != own and name.startswith(prefix) and pid.isdigit() \
                and not os.path.exists(f"/proc/{pid}"):
            log.info("removing stale eBPF pins %s/%s", parent, name)
            remove_pins(os.path.join(parent, name))


class Loader:
    """Compiles, loads and pins the programs; opens the maps and programs of the pins."""

    def __init__(self, source: Path = SOURCE, cache: Path = CACHE) -> None:
        self.source, self.cache = source, cache

    def load(self, pin_dir: str) -> None:
        bpftool = find_tool("bpftool")
        if bpftool is None:
            raise TunnelUnavailable("the eBPF backend needs bpftool (scripts/bootstrap.sh "
                                    "installs it)")
        obj = compile_object(self.source, self.cache)
        ensure_bpffs()
        remove_stale_pins(pin_dir)
        remove_pins(pin_dir)
        try:
            os.makedirs(pin_dir, exist_ok=True)
        except OSError as exc:
            raise TunnelUnavailable(f"cannot make {pin_dir}: {exc}") from exc
        try:
            _run([bpftool, "prog", "loadall", str(obj), f"{pin_dir}/progs", "type", "classifier",
                  "pinmaps", f"{pin_dir}/maps"], "loading the eBPF GRE programs (bpftool)")
        except TunnelUnavailable:
            remove_pins(pin_dir)
            raise

    def maps(self, pin_dir: str) -> BpfMaps:
        return BpfMaps(f"{pin_dir}/maps", MAP_NAMES)

    def program(self, pin_dir: str, name: str) -> int:
        return open_program(f"{pin_dir}/progs/{name}")

    def unload(self, pin_dir: str) -> None:
        remove_pins(pin_dir)

    # the kernel side, on the netlink worker (module functions below; tests fake them)

    def make_device(self, ipr: Any, name: str, peer: str, mtu: int) -> tuple[int, str]:
        return make_device(ipr, name, peer, mtu)

    def wire_interfaces(self, ipr: Any, skip: set[str]) -> dict[str, int]:
        return wire_interfaces(ipr, skip)

    def attach(self, ipr: Any, index: int, fd: int, name: str, ingress: bool) -> None:
        attach(ipr, index, fd, name, ingress)

    def detach(self, ipr: Any, index: int, ingress: bool) -> None:
        detach(ipr, index, ingress)

    def delete_device(self, ipr: Any, name: str) -> None:
        for index in ipr.link_lookup(ifname=name):
            ipr.link("del", index=index)

    def interface(self, ipr: Any, ifname: str) -> tuple[int, str]:
        """(ifindex, MAC) of an interface: where frames for an on-link router leave."""
        found = ipr.link_lookup(ifname=ifname)
        if not found:
            raise TunnelError(f"no interface {ifname}")
        return found[0], ipr.get_links(found[0])[0].get_attr("IFLA_ADDRESS")


# --- devices and tc hooks (run on the agent's netlink worker, with its IPRoute) --------------

IFF_UP = 0x1
IFF_NOARP = 0x80
ARPHRD_ETHER = 1
#: tc parents of a clsact qdisc's hooks, and the filter priority the programs use.
CLSACT_INGRESS = 0xFFFFFFF2
CLSACT_EGRESS = 0xFFFFFFF3
FILTER_PRIO = 4346
ETH_P_ALL = 0x0003


def _code(exc: BaseException) -> int | None:
    code = getattr(exc, "code", None)
    return code if isinstance(code, int) else None


def make_device(ipr: Any, name: str, peer: str, mtu: int) -> tuple[int, str]:
    """The tunnel device: a veth ``name`` (no ARP, ``mtu``, up) whose other end ``peer`` only
    gives it a carrier. One left by a killed agent is replaced. Its (ifindex, MAC)."""
    for old in ipr.link_lookup(ifname=name):
        ipr.link("del", index=old)
    ipr.link("add", ifname=name, kind="veth", peer={"ifname": peer})
    index = ipr.link_lookup(ifname=name)[0]
    peer_index = ipr.link_lookup(ifname=peer)[0]
    ipr.link("set", index=peer_index, state="up")
    ipr.link("set", index=index, flags=IFF_NOARP | IFF_UP, change=IFF_NOARP | IFF_UP, mtu=mtu)
    mac = ipr.get_links(index)[0].get_attr("IFLA_ADDRESS")
    return index, mac


def wire_interfaces(ipr: Any, skip: set[str]) -> dict[str, int]:
    """Ethernet interfaces (name -> index) GRE can arrive on: all but ``skip``."""
    out = {}
    for link in ipr.get_links():
        name = link.get_attr("IFLA_IFNAME")
        if name in skip or link.get("ifi_type") != ARPHRD_ETHER:
            continue
        out[name] = link["index"]
    return out


def attach(ipr: Any, index: int, fd: int, name: str, ingress: bool) -> None:
    """Program ``fd`` as a direct-action filter on the clsact hook of ``index``, replacing
    the one a killed agent left there."""
    detach(ipr, index, ingress)
    try:
        ipr.tc("add", "clsact", index)
    except Exception as exc:  # noqa: BLE001 - pyroute2's NetlinkError
        if _code(exc) != errno.EEXIST:
            raise
    ipr.tc("add-filter", "bpf", index, parent=CLSACT_INGRESS if ingress else CLSACT_EGRESS,
           prio=FILTER_PRIO, handle=1, fd=fd, name=name, direct_action=True, protocol=ETH_P_ALL)


def detach(ipr: Any, index: int, ingress: bool) -> None:
    """Remove the filter :func:`attach` added (the clsact qdisc stays: others may use it)."""
    try:
        ipr.tc("del-filter", "bpf", index, parent=CLSACT_INGRESS if ingress else CLSACT_EGRESS,
               prio=FILTER_PRIO, handle=1, protocol=ETH_P_ALL)
    except Exception as exc:  # noqa: BLE001
        if _code(exc) not in (errno.ENOENT, errno.ENODEV, errno.EINVAL):
            raise
