"""Run one agent.mobility.tunnel in the current network namespace, driven over stdin/stdout.

Started by tests/netns/test_tunnel_netns.py as ``ip netns exec NS python tunnel_harness.py --local A``.
It prints ``{"ready": true, "backend": ...}`` once the tunnel is up, then answers one JSON
line per command line:

    {"op": "set_peers", "dst": "10.97.0.100", "peers": [["10.99.0.2", 42]]}
    {"op": "accept" | "forget", "remote": "10.99.0.1", "key": 42}
    {"op": "set_reverse", "src": "10.97.0.100", "peer": ["10.99.0.1", 42] | null}
    {"op": "send_gre", "remote": "10.99.0.2", "hex": "..."}   raw bytes on the GRE socket
    {"op": "stats"}
    {"op": "quit"}

Every answer is ``{"ok": true, "stats": {...}}`` or ``{"ok": false, "error": "..."}``, sent
once the kernel has the command's routes and rules (the tunnel queues them on the netlink
worker; ``tunnel.settle()`` waits for them), so a test may look at them right away.
EOF on stdin or SIGTERM closes the tunnel (removing what it made) and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from agent.mobility.tunnel import make_tunnel  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--local", required=True)
    parser.add_argument("--name", default="moat0")
    parser.add_argument("--backend", default="userspace")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("pyroute2").setLevel(logging.WARNING)
    return asyncio.run(serve(args))


async def serve(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    tunnel = make_tunnel(args.backend, loop=loop, local=args.local, name=args.name)
    tunnel.start()
    done = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    out = sys.stdout

    def reply(obj: dict) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    def handle(cmd: dict) -> None:
        op = cmd["op"]
        if op == "set_peers":
            tunnel.set_peers(cmd["dst"], [tuple(p) for p in cmd["peers"]])
        elif op == "accept":
            tunnel.accept(cmd["remote"], cmd["key"])
        elif op == "forget":
            tunnel.forget(cmd["remote"], cmd["key"])
        elif op == "set_reverse":
            tunnel.set_reverse(cmd["src"], tuple(cmd["peer"]) if cmd.get("peer") else None)
        elif op == "send_gre":
            tunnel.sock.sendto(bytes.fromhex(cmd["hex"]), (cmd["remote"], 0))
        elif op == "quit":
            done.set()
        elif op != "stats":
            raise ValueError(f"unknown op {op!r}")

    buf = b""
    lines: asyncio.Queue[bytes] = asyncio.Queue()

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
        await tunnel.aclose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
