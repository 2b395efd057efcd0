"""Router-to-router control call benchmark — ``moat bench peer`` (a script, not a test).

What a make-before-break move's switch waits for, apart from the object: one MIGRATE
``commit`` (a merge patch of ``--body-bytes``, sealed and signed for the target) and its
answer, between two processes on loopback. The server process runs a real
:class:`agent.core.peer.PeerServer` whose handler does what a target's does before it acts:
:class:`agent.core.peer.RouterKeyAuth` (HMAC for its address, replay cache, open the sealed
state), then answers ``committed`` with the time it spent (``handle_us``).

Measured in the same run, alternating in blocks of ``--block`` calls so that the machine's
speed drifts alike for all (``time.perf_counter``, one call outstanding):

* **old**: the path before issue 14: a new TCP connection per call, closed after it, and
  sealing keys made per message on both ends (the sender's ephemeral key, the receiver's
  parsed private key: the caches are emptied before each call);
* **new connection**: a new connection per call, keys kept;
* **kept keys made per message**: a kept connection, keys made per message;
* **new**: a kept connection (:class:`agent.core.peer.PeerPool`) and kept keys: today's path.

And the parts, in the client process (medians): TCP connect (open and close), seal (keys
made per message, and kept), sign, encode and decode of the frame; the server's
``handle_us`` (authenticate and open); and the transport's floor: an unsigned message on a
kept connection, which the server refuses at once (framing, two loopback crossings, two
event loops). Ratios are old / new.

    moat bench peer [--calls 400] [--block 50] [--body-bytes 1500] [--json]

Writes ``results/bench_peer/<run-id>/summary.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

from packets import ControlMessage, ControlType

from .results import results_dir, write_json
from .tables import format_table

ADDRESS = "127.0.0.1"
DEFAULT_CALLS = 400
DEFAULT_BLOCK = 50
DEFAULT_BODY = 1500
MAX_CALLS = 100_000
MAX_BODY_BYTES = 500_000
PATHS = ("old", "new connection", "kept connection, keys per message", "new")


class BenchError(RuntimeError):
    """The benchmark could not run (the server process did not start or answer)."""


# --- pure helpers (unit-tested) -------------------------------------------------------------


def commit_body(size: int) -> dict[str, Any]:
    """A MIGRATE commit as a pre-copy switch sends it, whose JSON is about ``size`` bytes: a
    merge patch of the counter's state and the final checkpoint's digest."""
    body: dict[str, Any] = {"action": "commit", "name": "counter", "epoch": "0123456789abcdef",
                            "delta": True,
                            "state": {"patch": {"count": 12345, "log": []}, "digest": "ab" * 32}}
    entry = "r" * 30
    while len(json.dumps(body, separators=(",", ":"))) + len(entry) + 3 <= size:
        body["state"]["patch"]["log"].append(entry)
    return body


def stats(values_s: list[float]) -> dict[str, Any]:
    """Median and 95th percentile, in microseconds."""
    if not values_s:
        return {"n": 0, "p50_us": None, "p95_us": None}
    us = sorted(v * 1e6 for v in values_s)
    p95 = us[min(len(us) - 1, int(round(0.95 * (len(us) - 1))))]
    return {"n": len(us), "p50_us": round(statistics.median(us), 1), "p95_us": round(p95, 1)}


def ratio(old: float | None, new: float | None) -> float | None:
    return round(old / new, 2) if old and new else None


def timed(fn: Callable[[], Any], n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="moat bench peer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=DEFAULT_CALLS, help="calls per path")
    p.add_argument("--block", type=int, default=DEFAULT_BLOCK, help="calls per path in a row")
    p.add_argument("--body-bytes", type=int, default=DEFAULT_BODY)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not 1 <= args.calls <= MAX_CALLS:
        p.error(f"--calls must be 1..{MAX_CALLS}")
    if not 1 <= args.block <= args.calls:
        p.error("--block must be 1..--calls")
    if not 200 <= args.body_bytes <= MAX_BODY_BYTES:
        p.error(f"--body-bytes must be 200..{MAX_BODY_BYTES}")
    return args


def _forget_keys() -> None:
    """Empty the sealing caches: the next seal and open make their keys as before issue 14."""
    from agent.core import sealing

    sealing._SENDING.clear()
    sealing._OPENING.clear()
    sealing._parsed_private.cache_clear()


# --- the server process ---------------------------------------------------------------------


async def _serve(conf: dict[str, Any]) -> None:
    from agent.core.peer import PeerServer, RouterKeyAuth

    auth = RouterKeyAuth(bytes.fromhex(conf["key"]), [ADDRESS], bytes.fromhex(conf["seal"]))

    async def handler(msg: ControlMessage) -> dict[str, Any]:
        start = time.perf_counter()
        if msg.body.get("cold"):
            _forget_keys()
        auth(msg)
        return {"ok": True, "phase": "committed", "replayed": 0,
                "handle_us": round((time.perf_counter() - start) * 1e6, 1)}

    server = PeerServer(handler, port=0, host=ADDRESS)
    await server.start()
    print(json.dumps({"port": server.port}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the parent goes
    await server.stop()


def _server_main() -> int:
    logging.basicConfig(level=logging.ERROR)  # the floor's refusals are expected
    conf = json.loads(sys.stdin.readline())
    asyncio.run(_serve(conf))
    return 0


# --- the client -----------------------------------------------------------------------------


async def _measure(port: int, key: bytes, seal_pub: bytes, args: argparse.Namespace) -> dict[str, Any]:
    from agent.core.msgauth import sign_hmac
    from agent.core.peer import PeerPool, PeerRefused, peer_call
    from agent.core.sealing import seal_body

    body = commit_body(args.body_bytes)
    seal_keys = {ADDRESS: seal_pub}
    pool = PeerPool()
    rtt: dict[str, list[float]] = {p: [] for p in PATHS}
    handle: dict[str, list[float]] = {p: [] for p in PATHS}
    txid = 0

    async def call(path: str) -> None:
        nonlocal txid
        txid += 1
        cold = path in ("old", "kept connection, keys per message")
        if cold:
            _forget_keys()
        start = time.perf_counter()
        answer = await peer_call(ADDRESS, ControlType.MIGRATE, dict(body, cold=cold), txid=txid,
                                 key=key, port=port, seal_keys=seal_keys, timeout=10,
                                 reuse=path not in ("old", "new connection"), pool=pool)
        rtt[path].append(time.perf_counter() - start)
        handle[path].append(float(answer["handle_us"]) / 1e6)

    for path in PATHS:  # warm each path once (imports, first connection)
        await call(path)
        rtt[path].clear()
        handle[path].clear()
    done = 0
    while done < args.calls:
        n = min(args.block, args.calls - done)
        for path in PATHS:
            for _ in range(n):
                await call(path)
        done += n

    floor: list[float] = []
    for i in range(args.calls):
        start = time.perf_counter()
        try:
            await peer_call(ADDRESS, ControlType.MIGRATE, {"action": "cancel"}, txid=i + 1,
                            port=port, timeout=10, pool=pool)
        except PeerRefused:
            pass
        floor.append(time.perf_counter() - start)

    connects: list[float] = []
    for _ in range(min(args.calls, 200)):
        start = time.perf_counter()
        _reader, writer = await asyncio.open_connection(ADDRESS, port)
        writer.close()
        connects.append(time.perf_counter() - start)
    pool.close()

    n = min(args.calls, 500)
    kept_seal = timed(lambda: seal_body(body, seal_pub, ctype=ControlType.MIGRATE, txid=1, to=ADDRESS), n)
    cold_seal = timed(lambda: (_forget_keys(), seal_body(body, seal_pub, ctype=ControlType.MIGRATE,
                                                         txid=1, to=ADDRESS)), n)
    sealed = seal_body(body, seal_pub, ctype=ControlType.MIGRATE, txid=1, to=ADDRESS)
    sign = timed(lambda: sign_hmac(ControlType.MIGRATE, 1, sealed, key, to=ADDRESS), n)
    signed = sign_hmac(ControlType.MIGRATE, 1, sealed, key, to=ADDRESS)
    encode = timed(lambda: ControlMessage(ControlType.MIGRATE, 1, signed).encode(), n)
    frame = ControlMessage(ControlType.MIGRATE, 1, signed).encode()
    decode = timed(lambda: ControlMessage.decode(frame), n)
    return {"rtt": rtt, "handle": handle, "floor": floor, "connect": connects,
            "seal_cold": cold_seal, "seal_kept": kept_seal, "sign": sign, "encode": encode,
            "decode": decode, "frame_bytes": len(frame), "pool_opened": pool.opened,
            "pool_reused": pool.reused}


def summarize(raw: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    for path in PATHS:
        s, h = stats(raw["rtt"][path]), stats(raw["handle"][path])
        rows.append({"path": path, "calls": s["n"], "p50_us": s["p50_us"], "p95_us": s["p95_us"],
                     "server_handle_p50_us": h["p50_us"]})
    old, new = rows[0]["p50_us"], rows[-1]["p50_us"]
    parts = [
        {"part": "TCP connect (open, close)", **stats(raw["connect"])},
        {"part": "seal, keys per message (old)", **stats(raw["seal_cold"])},
        {"part": "seal, keys kept (new)", **stats(raw["seal_kept"])},
        {"part": "server: authenticate + open, keys per message (old)", **stats(raw["handle"]["old"])},
        {"part": "server: authenticate + open, keys kept (new)", **stats(raw["handle"]["new"])},
        {"part": "sign (HMAC)", **stats(raw["sign"])},
        {"part": "encode frame (JSON)", **stats(raw["encode"])},
        {"part": "decode frame (JSON)", **stats(raw["decode"])},
        {"part": "transport floor (unsigned, refused, kept connection)", **stats(raw["floor"])},
    ]
    return {"paths": rows, "parts": parts,
            "ratio_old_over_new_p50": ratio(old, new),
            "ratio_old_over_new_p95": ratio(rows[0]["p95_us"], rows[-1]["p95_us"]),
            "frame_bytes": raw["frame_bytes"], "body_bytes": args.body_bytes,
            "pool": {"opened": raw["pool_opened"], "reused": raw["pool_reused"]},
            "calls": args.calls, "block": args.block, "host": platform.node(),
            "python": platform.python_version(), "cpus": os.cpu_count(),
            "how": "two processes on loopback, one call outstanding, paths alternating in "
                   "blocks; medians and p95 in microseconds"}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from agent.core.sealing import generate_keypair

    key = os.urandom(32)
    seal_private, seal_public = generate_keypair()
    proc = subprocess.Popen([sys.executable, "-m", "experiments.bench_peer", "--serve"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps({"key": key.hex(), "seal": seal_private.hex()}) + "\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        try:
            port = int(json.loads(line)["port"])
        except (ValueError, KeyError, TypeError):
            raise BenchError(f"the server process did not start (said {line!r})") from None
        raw = asyncio.run(_measure(port, key, seal_public, args))
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return summarize(raw, args)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve:
        return _server_main()
    summary = run(args)
    out = results_dir("bench_peer", time.strftime("%Y%m%d-%H%M%S"))
    write_json(out / "summary.json", summary)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"MIGRATE commit round trip, {summary['frame_bytes']} bytes on the wire "
          f"({summary['body_bytes']} of body), {summary['calls']} calls per path:")
    print(format_table(summary["paths"], ["path", "calls", "p50_us", "p95_us", "server_handle_p50_us"]))
    print(f"old / new: {summary['ratio_old_over_new_p50']}x at the median, "
          f"{summary['ratio_old_over_new_p95']}x at p95")
    print()
    print(format_table(summary["parts"], ["part", "n", "p50_us", "p95_us"]))
    print(f"\nwritten to {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
