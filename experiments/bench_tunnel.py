"""GRE tunnel benchmark: throughput, added latency and CPU of the HOA → FOA tunnel, as root.

    sudo python -m experiments.bench_tunnel [--seconds 5] [--pings 100] [--udp-rate 1G]
                                            [--udp-length 1400] [--udp-window 4M]
                                            [--affinity CLIENT,SERVER] [--repeats 3]
                                            [--backends userspace,kernel,ebpf] [--backbone-bw MBIT]
                                            [--json]
    sudo moat bench tunnel [same options]

For each tunnel backend it can run (userspace always; kernel only where
``agent.mobility.tunnel.detect_backend()`` says "kernel" in a fresh network namespace; ebpf where
``probe_ebpf()`` loads its programs in a throwaway one), it starts the
patent's topology with that backend, places the object ``counter`` on ``r18b`` (its home
address 10.16.0.100 then lives on r18b's loopback) registered through the FOA ``r18a``, waits
until the HOA ``r22b`` has the binding, and measures, in that same network, two paths from the
corresponding host ``co14`` (net 14) to the same host ``r18b``:

* tunnel: to 10.16.0.100, co14 → r20a → r22a → home LAN → HOA r22b (proxy ARP) → GRE over
  r22a → FOA r18a (decapsulation) → r18b. Replies go straight back (triangular routing).
* direct: to 10.12.0.2 (r18b's LAN address), co14 → r20a → r22a → r18a → r18b.

Per path, ``--repeats`` times each, tunnel and direct back to back: TCP and UDP throughput
with iperf3 (a one-off server inside r18b bound to the destination, the client in co14,
``-J`` output parsed; UDP with 4 MiB socket buffers: with the default 208 KiB the
receiver's socket overflowed at 1 Gbit/s on the direct path too (3-5 % of the datagrams),
which the run shows per test as ``rcvbuf_errors``; ``--affinity`` pins the two ends),
round-trip time with
``ping -c N -i 0.01 -q``, and the CPU time (utime + stime from /proc/<pid>/stat) the HOA and FOA
agent daemons used during each test, as seconds and as % of one core over the test's wall
time. The direct path's CPU figures are the baseline (the daemons idle). The userspace TUN's
MTU is 1472 (1500 - 20 - 8): a DF ping of 1472 and of 1473 bytes shows it, and the TCP test
reports the path MTU the sender ended with (iperf3's ``pmtu``), so a PMTU black hole shows up
as a failed or stalled TCP test rather than being hidden.

Backbone links are unshaped by default (``--backbone-bw`` sets an htb rate in Mbit/s), so the
tunnel itself is the bottleneck. Writes ``results/bench_tunnel/<run-id>/summary.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, TextIO

from topologies.run import stop_child

from .results import results_dir, write_json
from .tables import format_table

log = logging.getLogger(__name__)

OBJECT = "counter"
OBJECT_ROUTER = "r18b"
CO_HOST = "co14"
FOA = "r18a"
DIRECT_DST = "10.12.0.2"  # r18b's LAN address
DEFAULT_SECONDS = 5.0
DEFAULT_PINGS = 100
DEFAULT_UDP_RATE = "1G"
UDP_LEN = 1400
#: Each test runs this many times on each path, tunnel and direct alternately (the order
#: swaps every repetition), and the figures are medians: one run on a shared 2-core VM
#: swings by tens of percent.
DEFAULT_REPEATS = 3
#: iperf3 -w: both ends' socket buffers for UDP. With the default (212,992 bytes of
#: rmem_default) the receiving server's socket overflows at 1 Gbit/s whenever its core is
#: taken for a few hundred microseconds (RcvbufErrors in r18b, the direct path too).
DEFAULT_UDP_WINDOW = "4M"
#: CLIENT,SERVER cores for iperf3 (taskset -c; an empty part: not pinned). Not pinned by
#: default: with 4 MiB UDP buffers neither path lost a datagram pinned or not (3 runs each,
#: 2026-12-02), and pinned TCP measured both paths lower (the routers' forwarding then runs
#: in the sender's softirq on its one core: 12 Gbit/s direct against 19-26 unpinned).
DEFAULT_AFFINITY = ""
PING_INTERVAL = 0.01
IPERF_PORT = 5201
TUN_MTU_EXPECTED = 1500 - 20 - 8
GRE_PROTO = 47
TUN_DEVICE = "moat0"  # the userspace backend's TUN device (agent.mobility.tunnel)
NOT_AVAILABLE = "kernel: not available here (no GRE in this kernel)"
EBPF_NOT_AVAILABLE = "ebpf: not available here"
BACKENDS = ("userspace", "kernel", "ebpf")

RESULT_COLUMNS = ["backend", "path", "test", "dst", "mbps_sent", "mbps_received", "retransmits",
                  "lost_percent", "jitter_ms", "pmtu", "rtt_min_ms", "rtt_avg_ms", "rtt_max_ms",
                  "rtt_mdev_ms", "ping_loss_percent"]
COST_COLUMNS = ["backend", "path", "test", "wall_s", "hoa_cpu_s", "hoa_cpu_pct", "foa_cpu_s",
                "foa_cpu_pct", "tun_packets", "tun_tx_dropped", "foa_gre_socket_drops", "error"]
RESULT_COLUMNS.insert(3, "rep")
COST_COLUMNS.insert(3, "rep")
#: Where a UDP datagram was dropped, per test: the receiver's (r18b's) socket buffer, and
#: the kernel's per-CPU input backlog (netdev_max_backlog, machine-wide).
DROP_COLUMNS = ["backend", "path", "test", "rep", "mbps_sent", "lost_packets", "rcvbuf_errors",
                "backlog_drops", "cores_busy_pct"]
TEST_COLUMNS = RESULT_COLUMNS + COST_COLUMNS[4:] + DROP_COLUMNS[6:]
COMPARE_COLUMNS = ["backend", "repeats", "tcp_tunnel_mbps", "tcp_direct_mbps", "tcp_ratio",
                   "udp_tunnel_mbps", "udp_direct_mbps", "udp_ratio", "udp_tunnel_lost_pct",
                   "udp_direct_lost_pct", "added_latency_ms", "tcp_hoa_cpu_pct",
                   "tcp_foa_cpu_pct", "udp_hoa_cpu_pct", "udp_foa_cpu_pct", "idle_hoa_cpu_pct",
                   "idle_foa_cpu_pct", "tunnel_mtu_ok"]


class BenchError(Exception):
    """A measurement that could not be made, with the reason."""


# --- pure parsers (unit-tested without root) -----------------------------------------------


def parse_iperf3(data: str | dict[str, Any]) -> dict[str, Any]:
    """The figures of one ``iperf3 -c ... -J`` run: Mbit/s sent and received; TCP
    retransmits and the sender's last path MTU; UDP loss and jitter (receiver side).

    Raises :class:`BenchError` with iperf3's own message when the run failed.
    """
    if isinstance(data, str):
        try:
            data = json.loads(data)
        except json.JSONDecodeError as exc:
            raise BenchError(f"iperf3 printed no JSON: {data[:200]!r}") from exc
    if not isinstance(data, dict):
        raise BenchError("iperf3 JSON is not an object")
    if data.get("error"):
        raise BenchError(f"iperf3: {data['error']}")
    start, end = data.get("start") or {}, data.get("end") or {}
    protocol = ((start.get("test_start") or {}).get("protocol") or "").upper()
    if not end:
        raise BenchError("iperf3 JSON has no end section (the test did not finish)")
    out: dict[str, Any] = {"protocol": protocol or None,
                           "version": start.get("version"),
                           "seconds": (start.get("test_start") or {}).get("duration")}
    if protocol == "UDP":
        # iperf3 >= 3.11 has sum_sent / sum_received; older ones only "sum" (loss and
        # jitter as the server reported them, bytes as the client sent them).
        sent = end.get("sum_sent") or end.get("sum") or {}
        received = end.get("sum_received") or end.get("sum") or {}
        out.update(
            bps_sent=sent.get("bits_per_second"),
            bps_received=received.get("bits_per_second"),
            packets=received.get("packets", sent.get("packets")),
            lost_packets=received.get("lost_packets"),
            lost_percent=received.get("lost_percent"),
            jitter_ms=received.get("jitter_ms"),
            target_bps=start.get("target_bitrate"),
            block_bytes=(start.get("test_start") or {}).get("blksize"),
        )
    else:
        sent = end.get("sum_sent") or {}
        received = end.get("sum_received") or {}
        pmtus = [s.get("pmtu") for i in data.get("intervals") or [] for s in i.get("streams") or []
                 if s.get("pmtu")]
        out.update(
            bps_sent=sent.get("bits_per_second"),
            bps_received=received.get("bits_per_second"),
            bytes_received=received.get("bytes"),
            retransmits=sent.get("retransmits"),
            mss_default=start.get("tcp_mss_default"),
            pmtu=pmtus[-1] if pmtus else None,
            pmtu_min=min(pmtus) if pmtus else None,
        )
    for key in ("bps_sent", "bps_received"):
        if out.get(key) is None:
            raise BenchError(f"iperf3 JSON has no {key.replace('bps_', '')} rate")
    out["mbps_sent"] = out["bps_sent"] / 1e6
    out["mbps_received"] = out["bps_received"] / 1e6
    return out


_PING_COUNTS = re.compile(r"(\d+) packets transmitted, (\d+) (?:packets )?received"
                          r"(?:, \+(\d+) errors)?(?:, \+\d+ duplicates)?, ([\d.]+)% packet loss")
_PING_RTT = re.compile(r"(?:rtt|round-trip) min/avg/max(?:/mdev|/stddev)? = "
                       r"([\d.]+)/([\d.]+)/([\d.]+)(?:/([\d.]+))? ms")


def parse_ping(text: str) -> dict[str, Any]:
    """The summary of ``ping -q``: transmitted, received, loss %, rtt min/avg/max/mdev (ms).

    The rtt figures are None when no reply came back (ping prints no rtt line then).
    """
    counts = _PING_COUNTS.search(text)
    if counts is None:
        raise BenchError(f"no ping statistics in: {text.strip()[-200:]!r}")
    out: dict[str, Any] = {
        "transmitted": int(counts.group(1)), "received": int(counts.group(2)),
        "errors": int(counts.group(3) or 0), "loss_percent": float(counts.group(4)),
        "rtt_min_ms": None, "rtt_avg_ms": None, "rtt_max_ms": None, "rtt_mdev_ms": None,
    }
    rtt = _PING_RTT.search(text)
    if rtt is not None:
        mn, avg, mx, mdev = rtt.groups()
        out.update(rtt_min_ms=float(mn), rtt_avg_ms=float(avg), rtt_max_ms=float(mx),
                   rtt_mdev_ms=None if mdev is None else float(mdev))
    return out


def parse_proc_stat(text: str, clk_tck: int | None = None) -> float:
    """CPU seconds (utime + stime, all threads) from the text of ``/proc/<pid>/stat``.

    The command name (field 2) is in parentheses and may hold spaces or parentheses, so
    fields are counted from the last ``)``: utime and stime are fields 14 and 15.
    """
    clk_tck = clk_tck or os.sysconf("SC_CLK_TCK")
    _comm, sep, rest = text.rpartition(")")
    fields = rest.split()
    if not sep or len(fields) < 13:
        raise BenchError(f"not a /proc/<pid>/stat line: {text[:80]!r}")
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15, counted from 3
    return (utime + stime) / clk_tck


def cpu_use(before: float, after: float, wall: float) -> dict[str, float]:
    """CPU seconds between two snapshots and their share of one core over ``wall`` seconds."""
    seconds = max(0.0, after - before)
    return {"cpu_s": round(seconds, 3), "cpu_pct": round(100.0 * seconds / wall, 1) if wall > 0 else 0.0}


def parse_proc_net_raw(text: str, protocol: int = GRE_PROTO) -> dict[str, int]:
    """Raw sockets of one IP protocol in ``/proc/net/raw`` (read inside a namespace): how many
    there are and the datagrams they dropped (receive buffer full), summed.

    For raw sockets the local "port" is the protocol number; ``drops`` is the last column.
    """
    sockets = drops = 0
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 13 or ":" not in fields[1]:
            continue
        try:
            proto = int(fields[1].rsplit(":", 1)[1], 16)
            dropped = int(fields[-1])
        except ValueError:
            continue
        if proto == protocol:
            sockets += 1
            drops += dropped
    return {"sockets": sockets, "drops": drops}


def parse_link_stats(text: str) -> dict[str, int] | None:
    """Packet and drop counters of one device from ``ip -j -s link show dev DEV``."""
    try:
        links = json.loads(text)
        stats = links[0].get("stats64") or links[0]["stats"]
        rx, tx = stats["rx"], stats["tx"]
    except (ValueError, LookupError, TypeError, AttributeError):
        return None
    return {"rx_packets": rx["packets"], "rx_dropped": rx["dropped"],
            "tx_packets": tx["packets"], "tx_dropped": tx["dropped"]}


def counter_deltas(before: dict[str, Any], after: dict[str, Any]) -> dict[str, int | None]:
    """Tunnel counters over one test: packets the HOA's kernel routed into the TUN device,
    those it dropped there (queue full: the daemon did not read fast enough), and GRE
    datagrams the FOA's raw socket dropped (receive buffer full)."""
    def delta(side: str, key: str, sub: str) -> int | None:
        a, b = (before.get(side) or {}).get(key), (after.get(side) or {}).get(key)
        if not a or not b:
            return None
        return b[sub] - a[sub]

    return {"tun_packets": delta("hoa", "tun", "tx_packets"),
            "tun_tx_dropped": delta("hoa", "tun", "tx_dropped"),
            "foa_gre_socket_drops": delta("foa", "raw", "drops")}


def parse_route_mtu(text: str) -> int | None:
    """The cached path MTU in ``ip route get`` output (``... mtu 1472``), if any."""
    match = re.search(r"\bmtu (?:lock )?(\d+)", text)
    return int(match.group(1)) if match else None


def parse_snmp_udp(text: str) -> dict[str, int]:
    """The ``Udp:`` counters of ``/proc/net/snmp`` (per network namespace) by name."""
    lines = [line.split() for line in text.splitlines() if line.startswith("Udp:")]
    if len(lines) < 2 or len(lines[0]) != len(lines[1]):
        raise BenchError(f"no Udp counters in /proc/net/snmp: {text[:80]!r}")
    try:
        return {name: int(value) for name, value in zip(lines[0][1:], lines[1][1:])}
    except ValueError:
        raise BenchError(f"Udp counters are not numbers: {lines[1]!r}") from None


def parse_softnet_drops(text: str) -> int:
    """Packets dropped because a CPU's input backlog was full (``/proc/net/softnet_stat``'s
    second column, hexadecimal, summed over the CPUs)."""
    total = 0
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 2:
            continue
        try:
            total += int(fields[1], 16)
        except ValueError:
            raise BenchError(f"not a softnet_stat line: {line[:80]!r}") from None
    return total


def parse_cpu_times(text: str) -> dict[str, tuple[int, int]]:
    """Per core, from ``/proc/stat``: (busy, total) clock ticks, busy being everything but
    idle and iowait (user, system, irq, softirq, steal...)."""
    out: dict[str, tuple[int, int]] = {}
    for line in text.splitlines():
        fields = line.split()
        if not fields or not re.fullmatch(r"cpu\d+", fields[0]):
            continue
        try:
            ticks = [int(f) for f in fields[1:9]]
        except ValueError:
            raise BenchError(f"not a /proc/stat cpu line: {line[:80]!r}") from None
        if len(ticks) < 5:
            raise BenchError(f"not a /proc/stat cpu line: {line[:80]!r}")
        total = sum(ticks)
        out[fields[0]] = (total - ticks[3] - ticks[4], total)
    return out


def core_busy(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> str:
    """Each core's busy share between two snapshots, "cpu0 97/cpu1 45" (percent)."""
    shares = []
    for cpu in sorted(after, key=lambda c: int(c[3:])):
        if cpu not in before:
            continue
        busy = after[cpu][0] - before[cpu][0]
        total = after[cpu][1] - before[cpu][1]
        shares.append(f"{cpu} {round(100 * busy / total) if total > 0 else 0}")
    return "/".join(shares)


def median(values: list[Any]) -> float | None:
    """The median of the values that are numbers (None when there are none)."""
    numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return round(statistics.median(numbers), 3) if numbers else None


def compare(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Tunnel versus direct for one backend, from its test rows: the median of each path's
    figures over the repetitions (``rep``), and ratios and differences as the median of
    each repetition's pair (tunnel and direct measured back to back), so a slow moment of
    the machine weighs on both sides of the pair it falls into."""
    def pick(path: str, test: str) -> dict[int, dict[str, Any]]:
        return {int(r.get("rep") or 0): r for r in rows
                if r["path"] == path and r["test"] == test and not r.get("error")}

    def med(path: str, test: str, key: str) -> float | None:
        return median([r.get(key) for r in pick(path, test).values()])

    def paired(test: str, key: str, how: Callable[[float, float], float]) -> float | None:
        tunnel, direct = pick("tunnel", test), pick("direct", test)
        values = [how(tunnel[n][key], direct[n][key]) for n in sorted(set(tunnel) & set(direct))
                  if tunnel[n].get(key) is not None and direct[n].get(key)]
        return median(values)

    def ratio(test: str) -> float | None:
        return paired(test, "mbps_received", lambda t, d: t / d)

    idle = {role: median([r.get(f"{role}_cpu_pct") for test in ("tcp", "udp")
                          for r in pick("direct", test).values()]) for role in ("hoa", "foa")}
    return {
        "repeats": len(set(pick("tunnel", "tcp")) & set(pick("direct", "tcp"))),
        "tcp_tunnel_mbps": med("tunnel", "tcp", "mbps_received"),
        "tcp_direct_mbps": med("direct", "tcp", "mbps_received"),
        "tcp_ratio": ratio("tcp"),
        "udp_tunnel_mbps": med("tunnel", "udp", "mbps_received"),
        "udp_direct_mbps": med("direct", "udp", "mbps_received"),
        "udp_ratio": ratio("udp"),
        "udp_tunnel_lost_pct": med("tunnel", "udp", "lost_percent"),
        "udp_direct_lost_pct": med("direct", "udp", "lost_percent"),
        "udp_hoa_cpu_pct": med("tunnel", "udp", "hoa_cpu_pct"),
        "udp_foa_cpu_pct": med("tunnel", "udp", "foa_cpu_pct"),
        "added_latency_ms": paired("ping", "rtt_avg_ms", lambda t, d: t - d),
        "tcp_hoa_cpu_pct": med("tunnel", "tcp", "hoa_cpu_pct"),
        "tcp_foa_cpu_pct": med("tunnel", "tcp", "foa_cpu_pct"),
        "idle_hoa_cpu_pct": idle["hoa"], "idle_foa_cpu_pct": idle["foa"],
    }


def parse_affinity(text: str) -> tuple[str | None, str | None]:
    """``CLIENT,SERVER`` core numbers (either may be empty) -> the two, None where unpinned."""
    parts = (text or "").split(",")
    if len(parts) > 2 or not all(re.fullmatch(r"\d*", p.strip()) for p in parts):
        raise BenchError(f"affinity {text!r} is not CLIENT,SERVER core numbers (e.g. 0,1 or ,1)")
    client, server = (parts + [""])[:2]
    return client.strip() or None, server.strip() or None


def pinned(argv: list[str], cpu: str | None) -> list[str]:
    """``argv`` run on core ``cpu`` (taskset -c), or as it is when None."""
    return ["taskset", "-c", cpu, *argv] if cpu is not None else argv


def iperf_client_argv(dst: str, port: int, args: argparse.Namespace, udp: bool) -> list[str]:
    """The iperf3 client's command line for one test (the server takes -w from it)."""
    argv = ["iperf3", "-c", dst, "-p", str(port), "-t", f"{args.seconds:g}", "-J",
            "--connect-timeout", "5000"]
    if udp:
        argv += ["-u", "-b", args.udp_rate, "-l", str(args.udp_length)]
        if args.udp_window:
            argv += ["-w", args.udp_window]
    return argv


# --- the machine and its tools -------------------------------------------------------------


def _first_line(argv: list[str]) -> str | None:
    if shutil.which(argv[0]) is None:
        return None
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    text = (proc.stdout or proc.stderr).strip()
    return text.splitlines()[0] if text else None


def _loadavg() -> str | None:
    """The 1, 5 and 15 minute load averages as ``uptime`` prints them (None if unreadable)."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return None


def environment() -> dict[str, Any]:
    from .bench_packets import cpu_model

    try:
        from mininet.net import VERSION as mininet_version
    except ImportError:
        mininet_version = None
    return {
        "cpu": cpu_model(), "cpus": os.cpu_count(), "kernel": platform.release(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "iperf3": _first_line(["iperf3", "--version"]), "ping": _first_line(["ping", "-V"]),
        "mininet": mininet_version,
    }


def kernel_backend() -> tuple[bool, str | None]:
    """Whether ``detect_backend()`` picks the kernel backend in a fresh network namespace
    (``unshare --net``, so no probe device ever appears in this one); the reason if not."""
    code = ("import json; from agent.mobility.tunnel import detect_backend, _probe_kernel_gre\n"
            "b = detect_backend()\n"
            "print(json.dumps({'backend': b, 'reason': None if b == 'kernel' else _probe_kernel_gre()}))")
    root = Path(__file__).resolve().parent.parent
    try:
        proc = subprocess.run(["unshare", "--net", sys.executable, "-c", code], cwd=root,
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        return False, f"could not probe in a fresh namespace: {exc}"
    if proc.returncode != 0:
        return False, f"probe failed: {proc.stderr.strip()[-300:]}"
    try:
        answer = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return False, f"probe printed {proc.stdout.strip()[-200:]!r}"
    return answer["backend"] == "kernel", answer.get("reason")


def ebpf_backend() -> tuple[bool, str | None]:
    """Whether the eBPF backend's programs compile, load and attach here (in a throwaway
    network namespace); the reason if not."""
    from agent.mobility.tunnel import probe_ebpf

    reason = probe_ebpf()
    return reason is None, reason


# --- measuring inside a running network ----------------------------------------------------


def _stop(proc: subprocess.Popen) -> None:
    stop_child(proc)


class TunnelBench:
    """Measurements in one running MoatNetwork (object placed, binding up)."""

    def __init__(self, moat: Any, args: argparse.Namespace, backend: str) -> None:
        self.moat = moat
        self.args = args
        self.backend = backend
        self.hoa = moat.hoa
        self.tunnel_dst = moat.objects[OBJECT].home_address
        self.pids = {role: moat.agent(router).call("status")["pid"]
                     for role, router in (("hoa", self.hoa), ("foa", FOA))}
        self.port = IPERF_PORT

    def run_in(self, node: str, argv: list[str], timeout: float) -> subprocess.CompletedProcess:
        proc = self.moat.net[node].popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            raise BenchError(f"{' '.join(argv)} on {node} timed out after {timeout:.0f}s") from None
        return subprocess.CompletedProcess(argv, proc.returncode, out.decode(errors="replace"),
                                           err.decode(errors="replace"))

    def cpu_seconds(self) -> dict[str, float]:
        return {role: parse_proc_stat(Path(f"/proc/{pid}/stat").read_text())
                for role, pid in self.pids.items()}

    def counters(self) -> dict[str, Any]:
        """The HOA's TUN device counters and the FOA's raw GRE socket drops (None where the
        backend has no such device, e.g. kernel GRE)."""
        out: dict[str, Any] = {}
        for role, router in (("hoa", self.hoa), ("foa", FOA)):
            link = self.run_in(router, ["ip", "-j", "-s", "link", "show", "dev", TUN_DEVICE], timeout=10)
            raw = self.run_in(router, ["cat", "/proc/net/raw"], timeout=10)
            out[role] = {"tun": parse_link_stats(link.stdout) if link.returncode == 0 else None,
                         "raw": parse_proc_net_raw(raw.stdout) if raw.returncode == 0 else None}
        return out

    def drops(self) -> dict[str, int]:
        """The receiver's UDP socket-buffer overflows (r18b's namespace) and the machine's
        input-backlog drops, now."""
        snmp = self.run_in(OBJECT_ROUTER, ["cat", "/proc/net/snmp"], timeout=10)
        return {"rcvbuf_errors": parse_snmp_udp(snmp.stdout).get("RcvbufErrors", 0),
                "backlog_drops": parse_softnet_drops(Path("/proc/net/softnet_stat").read_text())}

    def measured(self, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Run one test and add the daemons' CPU use over its wall time, the tunnel's drop
        counters and where UDP datagrams were dropped."""
        counters_before = self.counters()
        drops_before = self.drops()
        cores_before = parse_cpu_times(Path("/proc/stat").read_text())
        before, t0 = self.cpu_seconds(), time.monotonic()
        error = None
        try:
            row = fn()
        except BenchError as exc:
            row, error = {}, str(exc)
        wall = time.monotonic() - t0
        after = self.cpu_seconds()
        row["cores_busy_pct"] = core_busy(cores_before, parse_cpu_times(Path("/proc/stat").read_text()))
        row["wall_s"] = round(wall, 3)
        for role in self.pids:
            use = cpu_use(before[role], after[role], wall)
            row[f"{role}_cpu_s"], row[f"{role}_cpu_pct"] = use["cpu_s"], use["cpu_pct"]
        drops_after = self.drops()
        row.update({k: drops_after[k] - drops_before[k] for k in drops_after})
        row.update(counter_deltas(counters_before, self.counters()))
        row["error"] = error
        return row

    def ping(self, dst: str) -> dict[str, Any]:
        n = self.args.pings
        proc = self.run_in(CO_HOST, ["ping", "-c", str(n), "-i", str(PING_INTERVAL), "-W", "2", "-q", dst],
                           timeout=30 + n * (PING_INTERVAL + 0.05))
        stats = parse_ping(proc.stdout)
        return {"transmitted": stats["transmitted"], "received": stats["received"],
                "ping_loss_percent": stats["loss_percent"],
                **{k: stats[k] for k in ("rtt_min_ms", "rtt_avg_ms", "rtt_max_ms", "rtt_mdev_ms")}}

    def iperf(self, dst: str, udp: bool) -> dict[str, Any]:
        from topologies.errors import TopologyError
        from topologies.moatnet import wait_for_marker

        self.port += 1
        port = str(self.port)
        client_cpu, server_cpu = parse_affinity(self.args.affinity)
        server = self.moat.net[OBJECT_ROUTER].popen(
            pinned(["iperf3", "-s", "-1", "-B", dst, "-p", port, "--forceflush"], server_cpu),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            try:
                wait_for_marker(server, server.stdout, b"Server listening", timeout=10)
            except TopologyError as exc:
                raise BenchError(f"server did not start: {exc}") from None
            argv = pinned(iperf_client_argv(dst, self.port, self.args, udp), client_cpu)
            proc = self.run_in(CO_HOST, argv, timeout=self.args.seconds + 60)
            result = parse_iperf3(proc.stdout)
        finally:
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            _stop(server)
        keep = ["mbps_sent", "mbps_received"]
        keep += ["lost_percent", "jitter_ms", "packets", "lost_packets"] if udp else \
            ["retransmits", "pmtu", "pmtu_min", "mss_default"]
        return {k: result.get(k) for k in keep}

    def route_mtu(self, dst: str) -> int | None:
        return parse_route_mtu(self.run_in(CO_HOST, ["ip", "-o", "route", "get", dst], timeout=10).stdout)

    def df_ping(self, dst: str, total: int) -> dict[str, Any]:
        """One don't-fragment ping of ``total`` bytes of IP packet (two tries: the first may
        only teach co14 the path MTU)."""
        payload = str(total - 28)
        runs = []
        for _ in range(2):
            proc = self.run_in(CO_HOST, ["ping", "-c", "1", "-W", "2", "-M", "do", "-s", payload, dst],
                               timeout=15)
            runs.append(proc)
            if proc.returncode == 0:
                break
        last = runs[-1]
        text = (last.stdout + last.stderr).strip()
        hint = re.search(r"mtu ?= ?(\d+)", text)
        return {"bytes": total, "ok": last.returncode == 0,
                "reported_mtu": int(hint.group(1)) if hint else None}

    def mtu_check(self) -> dict[str, Any]:
        fits = self.df_ping(self.tunnel_dst, TUN_MTU_EXPECTED)
        too_big = self.df_ping(self.tunnel_dst, TUN_MTU_EXPECTED + 1)
        direct = self.df_ping(DIRECT_DST, 1500)
        return {"tun_mtu_expected": TUN_MTU_EXPECTED, "df_fits": fits, "df_too_big": too_big,
                "direct_df_1500": direct, "co14_route_mtu": self.route_mtu(self.tunnel_dst),
                "ok": fits["ok"] and not too_big["ok"]}

    def run(self, say: Callable[[str], None]) -> dict[str, Any]:
        paths = [("tunnel", self.tunnel_dst), ("direct", DIRECT_DST)]
        tests: list[tuple[str, Callable[[str], dict[str, Any]]]] = [
            ("ping", self.ping),
            ("tcp", lambda dst: self.iperf(dst, udp=False)),
            ("udp", lambda dst: self.iperf(dst, udp=True)),
        ]
        tests = [(name, fn) for name, fn in tests if name in self.args.tests]
        say(f"  {self.backend}: MTU check (DF pings through the tunnel)")
        mtu = self.mtu_check()
        rows = []
        for test, fn in tests:
            for rep in range(self.args.repeats):
                # tunnel then direct, then direct then tunnel: neither path always goes first
                for path, dst in (paths if rep % 2 == 0 else paths[::-1]):
                    say(f"  {self.backend}: {test} {path} -> {dst} ({rep + 1}/{self.args.repeats})")
                    row = {"backend": self.backend, "path": path, "test": test, "dst": dst,
                           "rep": rep + 1}
                    row.update(self.measured(lambda fn=fn, dst=dst: fn(dst)))
                    if row["error"]:
                        say(f"    FAILED: {row['error']}")
                    rows.append(row)
        mtu["co14_route_mtu_after_tcp"] = self.route_mtu(self.tunnel_dst)
        tcp_tunnel = [r for r in rows if r["path"] == "tunnel" and r["test"] == "tcp"]
        mtu["tcp_over_tunnel_ok"] = bool(tcp_tunnel) and all(
            not r["error"] and (r.get("mbps_received") or 0) > 0 for r in tcp_tunnel)
        mtu["tcp_pmtu"] = tcp_tunnel[-1].get("pmtu") if tcp_tunnel else None
        return {"tests": rows, "mtu": mtu, "comparison": dict(compare(rows), tunnel_mtu_ok=mtu["ok"])}


def _binding_via_foa(moat: Any) -> list[dict[str, Any]]:
    return [b for b in moat.agent(moat.hoa).call("bindings")
            if b["home_address"] == moat.objects[OBJECT].home_address
            and b.get("care_of_name") == f"{OBJECT}.{FOA}"]


def _tunnel_backend_logged(moat: Any, router: str) -> str | None:
    """The backend the agent logged at start ("not logged" when its log level hides INFO,
    --quiet-agents: the agent's status does not say)."""
    for line in reversed(moat.agent(router).call("log", lines=500)):
        match = re.search(r"GRE tunnel backend: (\w+)", line)
        if match:
            return match.group(1)
    return "not logged" if moat.log_level != "INFO" else None


def run_backend(backend: str, args: argparse.Namespace, say: Callable[[str], None]) -> dict[str, Any]:
    from topologies.moatnet import MoatNetwork
    from topologies.patent import PatentTopo

    moat = MoatNetwork(PatentTopo(backbone_bw=args.backbone_bw), objects=[OBJECT],
                       tunnel_backend=backend, log_level="WARNING" if args.quiet_agents else "INFO")
    with moat:
        say(f"{backend}: run {moat.run.run_id} up; placing {OBJECT} on {OBJECT_ROUTER}")
        foa_address = next(str(a.ip) for a in moat.topo.addresses(FOA)
                           if any(a.network == b.network for b in moat.topo.addresses(OBJECT_ROUTER)))
        # A new object's client registers with the agents its router has heard (no
        # solicitation first): placed before r18b heard r18a's advertisement, it registers
        # through r18b's own FOA and no packet of the test would cross the tunnel to r18a.
        moat.wait_for(lambda: any(h.get("address") == foa_address
                                  for h in moat.agent(OBJECT_ROUTER).call("agents")),
                      timeout=30, interval=0.1)
        moat.place_object(OBJECT, OBJECT_ROUTER, preferred_agent=foa_address)
        binding = moat.wait_for(lambda: _binding_via_foa(moat), timeout=30, interval=0.1)[0]
        home = moat.objects[OBJECT].home_address

        def reachable() -> bool:
            proc = moat.net[CO_HOST].popen(["ping", "-c", "1", "-W", "1", home],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            return proc.wait(timeout=10) == 0

        moat.wait_for(reachable, timeout=20, interval=0.2)
        active = {r: _tunnel_backend_logged(moat, r) for r in (moat.hoa, FOA)}
        say(f"{backend}: binding {home} -> {binding['care_of_address']} key {binding['gre_key']}; "
            f"tunnel backends in use {active}")
        bench = TunnelBench(moat, args, backend)
        result = bench.run(say)
        result.update(run_id=moat.run.run_id, binding={k: binding.get(k) for k in
                                                       ("home_address", "care_of_address", "care_of_name", "gre_key")},
                      daemons={"hoa": {"router": moat.hoa, "pid": bench.pids["hoa"]},
                               "foa": {"router": FOA, "pid": bench.pids["foa"]}},
                      backend_in_use=active)
    return result


def shaping(bw: float | None) -> str:
    backbone = "unshaped" if bw is None else f"htb {bw:g} Mbit/s (TCLink)"
    return f"backbone links {backbone}; LAN links unshaped; no netem delay or loss"


def method(args: argparse.Namespace, env: dict[str, Any]) -> dict[str, Any]:
    return {
        "topology": "PatentTopo (co14 on net 14 -> r18b on net 12; HOA r22b, FOA r18a)",
        "tunnel_path": "co14 -> 10.16.0.100 (object home address on r18b's loopback): r20a, r22a, "
                       "home LAN, HOA r22b (proxy ARP), GRE via r22a, FOA r18a, r18b; replies direct",
        "direct_path": f"co14 -> {DIRECT_DST} (r18b's LAN address): r20a, r22a, r18a, r18b",
        "link_shaping": shaping(args.backbone_bw),
        "tcp": " ".join(iperf_client_argv("DST", IPERF_PORT, args, udp=False))
               + " (one stream; server iperf3 -s -1 -B DST in r18b)",
        "udp": " ".join(iperf_client_argv("DST", IPERF_PORT, args, udp=True)),
        "pinning": "client (co14) on core {}, server (r18b) on core {} (taskset -c)".format(
            *(c if c is not None else "any" for c in parse_affinity(args.affinity))),
        "repeats": f"{args.repeats} of each test on each path, tunnel and direct back to back "
                   "(order swapped every repetition); figures are medians, ratios the median "
                   "of each repetition's tunnel/direct",
        "latency": f"ping -c {args.pings} -i {PING_INTERVAL} -q from co14; added latency = "
                   "tunnel avg - direct avg",
        "cpu_use": "utime+stime of the HOA and FOA agent daemons from /proc/<pid>/stat before and after "
               "each test (all threads); % of one core over the test's wall time; the direct path "
               "is the baseline",
        "drops": f"per test: tun_packets/tun_tx_dropped = tx packets/drops of the HOA's "
                 f"{TUN_DEVICE} (kernel -> daemon), foa_gre_socket_drops = drops of the FOA's raw "
                 "GRE socket (/proc/net/raw)",
        "mtu": f"DF pings of {TUN_MTU_EXPECTED} and {TUN_MTU_EXPECTED + 1} bytes to the home address; "
               "TCP's last path MTU from iperf3's per-interval pmtu",
        "udp_drops": "per test: rcvbuf_errors = Udp RcvbufErrors in r18b (the receiver's "
                     "socket full), backlog_drops = /proc/net/softnet_stat drops (a CPU's "
                     "input backlog full, machine-wide), cores_busy_pct = each core's "
                     "non-idle share (/proc/stat, the whole machine: other jobs included)",
        "seconds": args.seconds, "pings": args.pings, "udp_rate": args.udp_rate,
        "udp_length": args.udp_length, "udp_window": args.udp_window,
        "affinity": args.affinity, "repeats_n": args.repeats,
        "load_before": _loadavg(), **env,
    }


def print_report(summary: dict[str, Any], out: TextIO) -> None:
    m = summary["method"]
    w = out.write
    w("MOAT GRE tunnel benchmark\n")
    for key in ("topology", "tunnel_path", "direct_path", "link_shaping", "tcp", "udp", "pinning",
                "repeats",
                "latency", "cpu_use", "drops", "udp_drops", "mtu", "load_before"):
        if key in m:
            w(f"  {key:<12} {m[key]}\n")
    w(f"  {'tools':<12} {m['iperf3']}; {m['ping']}; mininet {m['mininet']}; {m['python']}\n")
    w(f"  {'machine':<12} {m['cpu']} x{m['cpus']}; kernel {m['kernel']}\n")
    for backend, info in summary["backends"].items():
        if not info.get("available", True):
            w(f"  {NOT_AVAILABLE if backend == 'kernel' else backend + ': not available here'}"
              f"{' — ' + info['reason'] if info.get('reason') else ''}\n")
    rows = [r for info in summary["backends"].values() for r in info.get("tests", [])]
    if rows:
        for columns in (RESULT_COLUMNS, COST_COLUMNS, DROP_COLUMNS):
            shown = [c for c in columns if c in ("backend", "path", "test") or any(r.get(c) is not None for r in rows)]
            if columns is DROP_COLUMNS:
                shown_rows = [r for r in rows if r["test"] == "udp"]
                w("\n" + format_table(shown_rows, shown) + "\n")
                continue
            w("\n" + format_table(rows, shown) + "\n")
        comps = [dict(info["comparison"], backend=b) for b, info in summary["backends"].items()
                 if info.get("comparison")]
        w("\nmedians (ratios: median of each repetition's tunnel/direct; idle_*: the agents "
          "during the direct path's tests)\n")
        w(format_table(comps, COMPARE_COLUMNS) + "\n")
    for backend, info in summary["backends"].items():
        mtu = info.get("mtu")
        if not mtu:
            continue
        w(f"\n{backend} MTU: DF {mtu['df_fits']['bytes']} B through the tunnel "
          f"{'passes' if mtu['df_fits']['ok'] else 'FAILS'}, DF {mtu['df_too_big']['bytes']} B "
          f"{'is refused' if not mtu['df_too_big']['ok'] else 'PASSES (unexpected)'}"
          f"{' (mtu=' + str(mtu['df_too_big']['reported_mtu']) + ')' if mtu['df_too_big']['reported_mtu'] else ''}; "
          f"co14 route mtu {mtu['co14_route_mtu_after_tcp']}; TCP over the tunnel "
          f"{'works' if mtu['tcp_over_tunnel_ok'] else 'DOES NOT WORK'} (sender pmtu {mtu['tcp_pmtu']})\n")
    w(f"\nload average before {m.get('load_before')}, after {summary.get('load_after')}; "
      f"results in {summary['dest']}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moat bench tunnel", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=DEFAULT_SECONDS,
                        help=f"iperf3 test duration (default {DEFAULT_SECONDS:g})")
    parser.add_argument("--pings", type=int, default=DEFAULT_PINGS,
                        help=f"pings per path (default {DEFAULT_PINGS})")
    parser.add_argument("--udp-rate", default=DEFAULT_UDP_RATE,
                        help=f"iperf3 UDP target rate (default {DEFAULT_UDP_RATE})")
    parser.add_argument("--udp-length", type=int, default=UDP_LEN,
                        help=f"iperf3 UDP datagram payload (-l, default {UDP_LEN})")
    parser.add_argument("--udp-window", default=DEFAULT_UDP_WINDOW,
                        help=f"iperf3 -w for UDP, both ends' socket buffers (default "
                             f"{DEFAULT_UDP_WINDOW}; '' for the system default)")
    parser.add_argument("--affinity", default=DEFAULT_AFFINITY,
                        help=f"CLIENT,SERVER cores for iperf3 (taskset -c; default "
                             f"{DEFAULT_AFFINITY}; an empty part leaves that end unpinned)")
    parser.add_argument("--tests", default="ping,tcp,udp",
                        help="comma list of ping,tcp,udp (default all)")
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS,
                        help=f"runs of each test on each path; medians (default {DEFAULT_REPEATS})")
    parser.add_argument("--backends", default=None,
                        help="comma list of userspace,kernel,ebpf (default: every one available)")
    parser.add_argument("--backbone-bw", type=float, default=None,
                        help="htb rate of the backbone links in Mbit/s (default: unshaped)")
    parser.add_argument("--quiet-agents", action="store_true", help="agents log at WARNING")
    parser.add_argument("--results", type=Path, default=None, help="results root (default ./results)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.seconds <= 0 or args.pings < 1 or args.repeats < 1 or not 0 < args.udp_length <= 65507:
        print("--seconds must be > 0, --pings and --repeats >= 1, --udp-length 1..65507",
              file=sys.stderr)
        return 2
    try:
        parse_affinity(args.affinity)
    except BenchError as exc:
        print(f"--affinity: {exc}", file=sys.stderr)
        return 2
    args.tests = [t.strip() for t in args.tests.split(",") if t.strip()]
    if not args.tests or set(args.tests) - {"ping", "tcp", "udp"}:
        print("--tests must list some of ping, tcp, udp", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("bench tunnel needs root (network namespaces): run it with sudo", file=sys.stderr)
        return 1
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    out = sys.stdout

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    wanted = (list(BACKENDS) if args.backends is None
              else [b.strip() for b in args.backends.split(",") if b.strip()])
    unknown = [b for b in wanted if b not in BACKENDS]
    if unknown:
        print(f"unknown backends {unknown}: {', '.join(BACKENDS)}", file=sys.stderr)
        return 2
    kernel_ok, reason = kernel_backend() if "kernel" in wanted else (False, None)
    ebpf_ok, ebpf_reason = ebpf_backend() if "ebpf" in wanted else (False, None)
    env = environment()
    summary: dict[str, Any] = {"experiment": "bench_tunnel", "method": method(args, env), "backends": {}}
    failed = False
    for backend in wanted:
        if backend == "kernel" and not kernel_ok:
            say(f"{NOT_AVAILABLE}: {reason}")
            summary["backends"]["kernel"] = {"available": False, "reason": reason}
            continue
        if backend == "ebpf" and not ebpf_ok:
            say(f"{EBPF_NOT_AVAILABLE}: {ebpf_reason}")
            summary["backends"]["ebpf"] = {"available": False, "reason": ebpf_reason}
            continue
        try:
            summary["backends"][backend] = dict(run_backend(backend, args, say), available=True)
        except Exception as exc:  # noqa: BLE001 - report and go on with the next backend
            log.exception("%s backend failed", backend)
            summary["backends"][backend] = {"available": True, "error": f"{type(exc).__name__}: {exc}"}
            failed = True
    runs = [info["run_id"] for info in summary["backends"].values() if info.get("run_id")]
    from topologies.run import new_run_id

    summary["run_id"] = runs[0] if runs else new_run_id()
    dest = results_dir("bench_tunnel", summary["run_id"], args.results)
    summary["dest"] = str(dest)
    summary["load_after"] = _loadavg()
    write_json(dest / "summary.json", summary)
    if args.json:
        json.dump(summary, out, indent=2, default=str)
        out.write("\n")
    else:
        print_report(summary, out)
        for backend, info in summary["backends"].items():
            if info.get("error"):
                out.write(f"{backend}: FAILED: {info['error']}\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
