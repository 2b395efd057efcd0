"""tunnel_harness.py's protocol for any backend, plus what the eBPF tests need.

Started as ``ip netns exec NS python ebpf_harness.py --local A --backend B``; prints
``{"ready": true, "backend": ...}`` and answers one JSON line per command, after
``tunnel.settle()`` (so the kernel and the maps have the change):

    {"op": "set_peers", "dst": D, "peers": [[R, K], ...]}
    {"op": "accept" | "forget", "remote": R, "key": K}
    {"op": "restrict", "remote": R, "key": K, "destinations": [D, ...] | null}
    {"op": "set_reverse", "src": S, "peer": [R, K] | null}
    {"op": "set_delivery", "remote": R, "key": K, "via": [IFNAME, MAC] | null}
    {"op": "send_gre", "remote": R, "hex": "..."}   GRE bytes on a raw socket of its own
    {"op": "stats"} | {"op": "quit"}

EOF on stdin or SIGTERM closes the tunnel and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from agent.mobility.tunnel import make_tunnel  # noqa: E402


async def serve(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    tunnel = make_tunnel(args.backend, loop=loop, local=args.local, name=args.name)
    tunnel.start()
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, 47)
    done = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)

    def reply(obj: dict) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    def handle(cmd: dict) -> None:
        op = cmd["op"]
        if op == "set_peers":
            tunnel.set_peers(cmd["dst"], [tuple(p) for p in cmd["peers"]])
        elif op == "accept":
            tunnel.accept(cmd["remote"], cmd["key"])
        elif op == "forget":
            tunnel.forget(cmd["remote"], cmd["key"])
        elif op == "restrict":
            dests = cmd.get("destinations")
            tunnel.restrict(cmd["remote"], cmd["key"], frozenset(dests) if dests is not None else None)
        elif op == "set_delivery":
            via = cmd.get("via")
            tunnel.set_delivery(cmd["remote"], cmd["key"], tuple(via) if via else None)
        elif op == "set_reverse":
            tunnel.set_reverse(cmd["src"], tuple(cmd["peer"]) if cmd.get("peer") else None)
        elif op == "send_gre":
            raw.sendto(bytes.fromhex(cmd["hex"]), (cmd["remote"], 0))
        elif op == "quit":
            done.set()
        elif op != "stats":
            raise ValueError(f"unknown op {op!r}")

    lines: asyncio.Queue[bytes] = asyncio.Queue()
    buf = b""

    async def answer() -> None:
        while True:
            line = await lines.get()
            try:
                handle(json.loads(line))
                await tunnel.settle()
                reply({"ok": True, "stats": tunnel.stats})
            except Exception as exc:  # noqa: BLE001 - report to the test
                reply({"ok": False, "error": f"{type(exc).__name__}: {exc}"})

    def on_stdin() -> None:
        nonlocal buf
        chunk = os.read(sys.stdin.fileno(), 65536)
        if not chunk:
            done.set()
            return
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if line.strip():
                lines.put_nowait(line)

    os.set_blocking(sys.stdin.fileno(), False)
    loop.add_reader(sys.stdin.fileno(), on_stdin)
    answering = asyncio.create_task(answer())
    reply({"ready": True, "backend": tunnel.backend})
    try:
        await done.wait()
    finally:
        loop.remove_reader(sys.stdin.fileno())
        answering.cancel()
        raw.close()
        await tunnel.aclose()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--local", required=True)
    parser.add_argument("--name", default="moat0")
    parser.add_argument("--backend", default="ebpf")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("pyroute2").setLevel(logging.WARNING)
    return asyncio.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())
