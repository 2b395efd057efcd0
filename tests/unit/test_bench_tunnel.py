"""experiments.bench_tunnel's pure parsers (no root): iperf3 JSON, ping summaries, /proc.

The iperf3 samples were recorded with iperf 3.12 on loopback (``iperf3 -c 127.0.0.1 -t 1 -J``,
TCP and ``-u -b 50M -l 1400``) and trimmed to the keys the parser reads; the error sample is
iperf3's whole answer when nothing listens.
"""

from __future__ import annotations

import copy
import json

import pytest

from experiments import bench_tunnel as bt

TCP_JSON = """
{"start": {"version": "iperf 3.12", "tcp_mss_default": 22016, "target_bitrate": 0,
           "test_start": {"protocol": "TCP", "duration": 1, "blksize": 131072}},
 "intervals": [{"streams": [{"bytes": 4030464000, "bits_per_second": 32242712655.974083,
                             "retransmits": 25, "pmtu": 65535}]}],
 "end": {"sum_sent": {"seconds": 1.000031, "bytes": 4030464000,
                      "bits_per_second": 32242712475.91325, "retransmits": 25},
         "sum_received": {"seconds": 1.000055, "bytes": 4018143232,
                          "bits_per_second": 32143377970.21164}}}
"""

UDP_JSON = """
{"start": {"version": "iperf 3.12", "target_bitrate": 50000000,
           "test_start": {"protocol": "UDP", "duration": 1, "blksize": 1400}},
 "intervals": [{"streams": [{"bytes": 6245400, "bits_per_second": 49958006.84018557, "packets": 4461}]}],
 "end": {"sum": {"seconds": 1.000164, "bytes": 6245400, "bits_per_second": 49958004.36754577,
                 "jitter_ms": 0.0044549455004184065, "lost_packets": 0, "packets": 4461, "lost_percent": 0},
         "sum_sent": {"seconds": 1.000104, "bytes": 6245400, "bits_per_second": 49958004.36754577,
                      "jitter_ms": 0, "lost_packets": 0, "packets": 4461, "lost_percent": 0},
         "sum_received": {"seconds": 1.000164, "bytes": 6245400, "bits_per_second": 49955007.37878988,
                          "jitter_ms": 0.0044549455004184065, "lost_packets": 0, "packets": 4461,
                          "lost_percent": 0}}}
"""

ERROR_JSON = """
{
	"start":	{
		"connected":	[],
		"version":	"iperf 3.12",
		"system_info":	"Linux vm 6.18.44-fc-v657 #1 SMP PREEMPT_DYNAMIC @0 x86_64"
	},
	"intervals":	[],
	"end":	{
	},
	"error":	"unable to connect to server: Connection refused"
}
"""

PING_OK = """PING 10.16.0.100 (10.16.0.100) 56(84) bytes of data.

--- 10.16.0.100 ping statistics ---
100 packets transmitted, 100 received, 0% packet loss, time 1583ms
rtt min/avg/max/mdev = 0.160/0.318/0.460/0.072 ms
"""

PING_LOSSY = """PING 10.16.0.100 (10.16.0.100) 56(84) bytes of data.

--- 10.16.0.100 ping statistics ---
5 packets transmitted, 3 received, +2 errors, 40% packet loss, time 44ms
rtt min/avg/max/mdev = 0.011/0.015/0.024/0.004 ms, pipe 2
"""

PING_NONE = """PING 10.16.0.100 (10.16.0.100) 70000(70028) bytes of data.

--- 10.16.0.100 ping statistics ---
2 packets transmitted, 0 received, 100% packet loss, time 205ms

"""

PING_BUSYBOX = """--- 10.0.0.1 ping statistics ---
3 packets transmitted, 3 packets received, 0% packet loss
round-trip min/avg/max = 0.051/0.070/0.093 ms
"""

# /proc/<pid>/stat of `cat` (fields 14/15 = utime/stime set to 250/150 ticks).
PROC_STAT = ("23221 (cat) R 23212 23212 19596 0 -1 4194304 100 0 0 0 250 150 0 0 20 0 1 0 355735 "
             "3133440 390 18446744073709551615 94786498834432 94786498854313 140732061366608 0 0 0 0 "
             "0 0 0 0 0 17 0 0 0 0 0 0")

# Recorded in a fresh namespace holding one raw GRE (proto 47) and one raw ICMP socket.
PROC_NET_RAW = """  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  45: 00000000:002F 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 256372 2 0000000015894ea7 17
 198: 00000000:0001 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 256373 2 00000000e74c7a8d 5
"""

LINK_JSON = ('[{"ifindex":1,"ifname":"lo","flags":["LOOPBACK","UP","LOWER_UP"],"mtu":65536,'
             '"stats64":{"rx":{"bytes":168,"packets":2,"errors":0,"dropped":0,"over_errors":0,"multicast":0},'
             '"tx":{"bytes":168,"packets":2,"errors":0,"dropped":1,"carrier_errors":0,"collisions":0}}}]')


# --- iperf3 ----------------------------------------------------------------------------------


def test_iperf3_tcp() -> None:
    r = bt.parse_iperf3(TCP_JSON)
    assert r["protocol"] == "TCP" and r["version"] == "iperf 3.12"
    assert r["mbps_sent"] == pytest.approx(32242.712, rel=1e-6)
    assert r["mbps_received"] == pytest.approx(32143.378, rel=1e-6)
    assert r["retransmits"] == 25 and r["bytes_received"] == 4018143232
    assert r["pmtu"] == 65535 and r["pmtu_min"] == 65535 and r["mss_default"] == 22016


def test_iperf3_tcp_pmtu_is_the_last_interval() -> None:
    data = json.loads(TCP_JSON)
    data["intervals"] = [{"streams": [{"pmtu": 1500}]}, {"streams": [{"pmtu": 1472}]}]
    r = bt.parse_iperf3(data)
    assert r["pmtu"] == 1472 and r["pmtu_min"] == 1472
    del data["intervals"]
    assert bt.parse_iperf3(data)["pmtu"] is None


def test_iperf3_udp_uses_receiver_side_for_loss_and_jitter() -> None:
    r = bt.parse_iperf3(UDP_JSON)
    assert r["protocol"] == "UDP"
    assert r["mbps_sent"] == pytest.approx(49.958004, rel=1e-6)
    assert r["mbps_received"] == pytest.approx(49.955007, rel=1e-6)
    assert r["lost_percent"] == 0 and r["lost_packets"] == 0 and r["packets"] == 4461
    assert r["jitter_ms"] == pytest.approx(0.004455, rel=1e-3)
    assert r["target_bps"] == 50_000_000 and r["block_bytes"] == 1400


def test_iperf3_udp_older_versions_only_have_sum() -> None:
    data = json.loads(UDP_JSON)
    data["end"] = {"sum": dict(data["end"]["sum"], lost_packets=446, lost_percent=10.0)}
    r = bt.parse_iperf3(data)
    assert r["lost_percent"] == 10.0 and r["lost_packets"] == 446
    assert r["mbps_sent"] == r["mbps_received"] == pytest.approx(49.958004, rel=1e-6)


def test_iperf3_error_is_reported_with_its_message() -> None:
    with pytest.raises(bt.BenchError, match="Connection refused"):
        bt.parse_iperf3(ERROR_JSON)


@pytest.mark.parametrize("text", ["", "iperf3: error - unable to connect", "[1, 2]"])
def test_iperf3_not_json(text: str) -> None:
    with pytest.raises(bt.BenchError):
        bt.parse_iperf3(text)


def test_iperf3_unfinished_run() -> None:
    data = json.loads(TCP_JSON)
    data["end"] = {}
    with pytest.raises(bt.BenchError, match="no end"):
        bt.parse_iperf3(data)
    data = json.loads(TCP_JSON)
    del data["end"]["sum_received"]
    with pytest.raises(bt.BenchError, match="received"):
        bt.parse_iperf3(data)


# --- ping ------------------------------------------------------------------------------------


def test_ping_summary() -> None:
    r = bt.parse_ping(PING_OK)
    assert (r["transmitted"], r["received"], r["errors"], r["loss_percent"]) == (100, 100, 0, 0.0)
    assert (r["rtt_min_ms"], r["rtt_avg_ms"], r["rtt_max_ms"], r["rtt_mdev_ms"]) == (0.160, 0.318, 0.460, 0.072)


def test_ping_with_errors_and_pipe() -> None:
    r = bt.parse_ping(PING_LOSSY)
    assert (r["transmitted"], r["received"], r["errors"], r["loss_percent"]) == (5, 3, 2, 40.0)
    assert r["rtt_avg_ms"] == 0.015 and r["rtt_mdev_ms"] == 0.004


def test_ping_no_reply_has_no_rtt() -> None:
    r = bt.parse_ping(PING_NONE)
    assert r["received"] == 0 and r["loss_percent"] == 100.0
    assert r["rtt_avg_ms"] is None and r["rtt_min_ms"] is None


def test_ping_busybox_format() -> None:
    r = bt.parse_ping(PING_BUSYBOX)
    assert r["received"] == 3 and r["rtt_avg_ms"] == 0.070 and r["rtt_mdev_ms"] is None


def test_ping_garbage() -> None:
    with pytest.raises(bt.BenchError):
        bt.parse_ping("connect: Network is unreachable\n")


# --- /proc -----------------------------------------------------------------------------------


def test_proc_stat_utime_plus_stime() -> None:
    assert bt.parse_proc_stat(PROC_STAT, clk_tck=100) == pytest.approx(4.0)
    assert bt.parse_proc_stat(PROC_STAT, clk_tck=1000) == pytest.approx(0.4)


def test_proc_stat_command_with_spaces_and_parentheses() -> None:
    tricky = PROC_STAT.replace("(cat)", "(python -m (agent))")
    assert bt.parse_proc_stat(tricky, clk_tck=100) == pytest.approx(4.0)


def test_proc_stat_of_this_process() -> None:
    with open("/proc/self/stat") as fh:
        assert bt.parse_proc_stat(fh.read()) >= 0.0


def test_proc_stat_garbage() -> None:
    with pytest.raises(bt.BenchError):
        bt.parse_proc_stat("not a stat line")


def test_cpu_use() -> None:
    assert bt.cpu_use(1.0, 2.5, 3.0) == {"cpu_s": 1.5, "cpu_pct": 50.0}
    assert bt.cpu_use(2.0, 2.0, 0.0) == {"cpu_s": 0.0, "cpu_pct": 0.0}


def test_proc_net_raw_counts_gre_sockets_and_drops() -> None:
    assert bt.parse_proc_net_raw(PROC_NET_RAW) == {"sockets": 1, "drops": 17}
    assert bt.parse_proc_net_raw(PROC_NET_RAW, protocol=1) == {"sockets": 1, "drops": 5}
    assert bt.parse_proc_net_raw(PROC_NET_RAW.splitlines()[0]) == {"sockets": 0, "drops": 0}


def test_link_stats_and_deltas() -> None:
    stats = bt.parse_link_stats(LINK_JSON)
    assert stats == {"rx_packets": 2, "rx_dropped": 0, "tx_packets": 2, "tx_dropped": 1}
    assert bt.parse_link_stats('Device "moat0" does not exist.') is None
    assert bt.parse_link_stats("[]") is None
    later = dict(stats, tx_packets=102, tx_dropped=4)
    before = {"hoa": {"tun": stats, "raw": None}, "foa": {"tun": None, "raw": {"sockets": 1, "drops": 17}}}
    after = copy.deepcopy(before)
    after["hoa"]["tun"] = later
    after["foa"]["raw"]["drops"] = 40
    assert bt.counter_deltas(before, after) == {"tun_packets": 100, "tun_tx_dropped": 3,
                                                "foa_gre_socket_drops": 23}
    assert bt.counter_deltas({}, {}) == {"tun_packets": None, "tun_tx_dropped": None,
                                         "foa_gre_socket_drops": None}


def test_route_mtu() -> None:
    assert bt.parse_route_mtu("10.16.0.100 via 10.14.0.1 dev co14-eth0 src 10.14.0.30 uid 0 \\    "
                              "cache expires 598sec mtu 1472") == 1472
    assert bt.parse_route_mtu("local 127.0.0.1 dev lo src 127.0.0.1 uid 0 \\    cache <local>") is None


def test_compare_tunnel_versus_direct() -> None:
    rows = [
        {"path": "tunnel", "test": "ping", "rtt_avg_ms": 0.318},
        {"path": "direct", "test": "ping", "rtt_avg_ms": 0.068},
        {"path": "tunnel", "test": "tcp", "mbps_received": 475.0, "hoa_cpu_pct": 55.0, "foa_cpu_pct": 66.8},
        {"path": "direct", "test": "tcp", "mbps_received": 9500.0},
        {"path": "tunnel", "test": "udp", "mbps_received": 199.0, "lost_percent": 0.5},
    ]
    c = bt.compare(rows)
    assert c["added_latency_ms"] == 0.25 and c["tcp_ratio"] == 0.05
    assert c["tcp_hoa_cpu_pct"] == 55.0 and c["udp_tunnel_lost_pct"] == 0.5
    assert c["udp_direct_mbps"] is None
    assert bt.compare([])["added_latency_ms"] is None


def test_parser_defaults() -> None:
    args = bt.build_parser().parse_args([])
    assert args.seconds == 5 and args.pings == 100 and args.backbone_bw is None
    assert args.backends is None and args.udp_rate == "1G" and not args.json
    assert bt.shaping(None).startswith("backbone links unshaped")
    assert "htb 100 Mbit/s" in bt.shaping(100.0)


def test_compare_takes_medians_and_pairs_each_repetition() -> None:
    """Three repetitions: the ratio is the median of each pair's tunnel/direct (0.5, 0.8,
    0.9 -> 0.8), not the ratio of the medians (80/100); an errored row counts for nothing."""
    rows = []
    for rep, (tunnel, direct, lost_t, lost_d, hoa_t, hoa_d) in enumerate(
            [(50.0, 100.0, 0.0, 0.0, 1.0, 0.5), (80.0, 100.0, 0.2, 0.1, 2.0, 0.7),
             (90.0, 100.0, 0.1, 0.0, 9.0, 0.6)], start=1):
        rows += [{"path": "tunnel", "test": "tcp", "rep": rep, "mbps_received": tunnel, "hoa_cpu_pct": hoa_t},
                 {"path": "direct", "test": "tcp", "rep": rep, "mbps_received": direct, "hoa_cpu_pct": hoa_d},
                 {"path": "tunnel", "test": "udp", "rep": rep, "mbps_received": 900.0, "lost_percent": lost_t},
                 {"path": "direct", "test": "udp", "rep": rep, "mbps_received": 1000.0, "lost_percent": lost_d}]
    rows.append({"path": "tunnel", "test": "tcp", "rep": 4, "mbps_received": 1.0, "error": "iperf3: boom"})
    rows.append({"path": "direct", "test": "tcp", "rep": 4, "mbps_received": 100.0})
    c = bt.compare(rows)
    assert c["tcp_ratio"] == 0.8 and c["tcp_tunnel_mbps"] == 80.0 and c["tcp_direct_mbps"] == 100.0
    assert c["repeats"] == 3 and c["udp_ratio"] == 0.9
    assert c["udp_tunnel_lost_pct"] == 0.1 and c["udp_direct_lost_pct"] == 0.0
    assert c["tcp_hoa_cpu_pct"] == 2.0 and c["idle_hoa_cpu_pct"] == 0.6


def test_median_ignores_what_is_no_number() -> None:
    assert bt.median([3, None, 1, 2.0, True]) == 2.0
    assert bt.median([None]) is None and bt.median([]) is None


def test_snmp_udp_counters() -> None:
    text = ("Ip: Forwarding DefaultTTL\nIp: 1 64\n"
            "Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors\n"
            "Udp: 5198 4 17 5332 15 0\n"
            "UdpLite: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors\n"
            "UdpLite: 0 0 0 0 0 0\n")
    udp = bt.parse_snmp_udp(text)
    assert udp["RcvbufErrors"] == 15 and udp["InErrors"] == 17 and udp["InDatagrams"] == 5198
    with pytest.raises(bt.BenchError, match="no Udp counters"):
        bt.parse_snmp_udp("Ip: Forwarding\nIp: 1\n")


def test_softnet_drops_sum_the_second_column_in_hex() -> None:
    text = ("023095e6 00000000 0000001c 00000000\n"
            "02471dc7 0000001a 0000001d 00000000\n")
    assert bt.parse_softnet_drops(text) == 0x1a
    with pytest.raises(bt.BenchError):
        bt.parse_softnet_drops("0001 zz 0002\n")


def test_iperf_argv_sizes_udp_buffers_and_pinning_wraps_it() -> None:
    args = bt.build_parser().parse_args([])
    assert args.repeats == 3 and args.udp_window == "4M" and args.affinity == ""
    tcp = bt.iperf_client_argv("10.12.0.2", 5202, args, udp=False)
    assert tcp[:5] == ["iperf3", "-c", "10.12.0.2", "-p", "5202"]
    assert "-u" not in tcp and "-w" not in tcp  # TCP keeps its autotuned window
    udp = bt.iperf_client_argv("10.12.0.2", 5202, args, udp=True)
    assert udp[udp.index("-w") + 1] == "4M" and udp[udp.index("-l") + 1] == "1400"
    assert udp[udp.index("-b") + 1] == "1G"
    bare = bt.build_parser().parse_args(["--udp-window", ""])
    assert "-w" not in bt.iperf_client_argv("10.12.0.2", 5202, bare, udp=True)
    assert bt.pinned(["iperf3", "-s"], "1") == ["taskset", "-c", "1", "iperf3", "-s"]
    assert bt.pinned(["iperf3", "-s"], None) == ["iperf3", "-s"]


@pytest.mark.parametrize("text, expect", [("0,1", ("0", "1")), (",1", (None, "1")),
                                          ("0", ("0", None)), ("", (None, None)),
                                          (" 1 , 0 ", ("1", "0"))])
def test_affinity(text: str, expect: tuple) -> None:
    assert bt.parse_affinity(text) == expect


@pytest.mark.parametrize("text", ["0,1,2", "a,1", "-1"])
def test_affinity_refused(text: str) -> None:
    with pytest.raises(bt.BenchError, match="not CLIENT,SERVER"):
        bt.parse_affinity(text)


def test_bad_options_are_refused_before_anything_runs(capsys) -> None:
    assert bt.main(["--repeats", "0"]) == 2
    assert bt.main(["--affinity", "x"]) == 2
    assert bt.main(["--tests", "ping,bogus"]) == 2
    assert "--tests" in capsys.readouterr().err


def test_core_busy_from_proc_stat() -> None:
    before = bt.parse_cpu_times("cpu  30 0 30 900 0 0 0 0 0 0\n"
                                "cpu0 10 0 10 400 0 0 0 0 0 0\ncpu1 20 0 20 500 0 0 0 0 0 0\n"
                                "intr 5\n")
    assert before == {"cpu0": (20, 420), "cpu1": (40, 540)}
    # cpu0: 90 of 100 ticks busy (softirq counts); cpu1: 10 of 100 (iowait is idle)
    after = bt.parse_cpu_times("cpu0 50 0 30 410 0 0 30 0 0 0\ncpu1 25 0 25 580 10 0 0 0 0 0\n")
    assert bt.core_busy(before, after) == "cpu0 90/cpu1 10"
    with pytest.raises(bt.BenchError):
        bt.parse_cpu_times("cpu0 1 2 x 4 5\n")
