"""A corresponding object under load: ``python -m nodetools.co_load`` (run inside a host).

Sends numbered service requests to an object's home address at a fixed rate for a bounded
time, records every reply (which router and instance served it, the object's answer, the
round trip), and writes one JSON line per request. The handoff experiment reads these to
measure disruption and loss at each move. Bounded in count and time; stops early on SIGTERM
(and still writes what it has).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from pathlib import Path

from packets import ControlMessage, ControlType, MalformedMessage
from packets.codes import SERVICE_PORT

MAX_DURATION = 600.0
MAX_RATE = 5000.0
MAX_COUNT = 1_000_000


class Load(asyncio.DatagramProtocol):
    def __init__(self, client: str) -> None:
        self.client = client
        self.sent: dict[int, float] = {}
        self.replies: dict[int, list[dict]] = {}
        self.malformed = 0
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        now = time.time()
        try:
            msg = ControlMessage.decode(data)
            seq = int(msg.body["seq"])
        except (MalformedMessage, KeyError, TypeError, ValueError):
            self.malformed += 1
            return
        body = msg.body
        self.replies.setdefault(seq, []).append({
            "at": now, "served_by": body.get("served_by"), "instance": body.get("instance"),
            "result": body.get("result"), "ok": body.get("ok"),
        })


async def run(dst: str, port: int, rate: float, duration: float, client: str, op: str,
              credential: str | None = None, count: int | None = None) -> Load:
    """Send requests at ``rate`` for ``duration`` seconds, or exactly ``count`` of them
    (paced at ``rate``) when it is given: a loaded machine oversleeps a pause, and a loop
    that stops on the clock then sends fewer than the caller counted on."""
    loop = asyncio.get_running_loop()
    transport, load = await loop.create_datagram_endpoint(lambda: Load(client), remote_addr=(dst, port))
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    period = 1.0 / rate
    start = time.monotonic()
    seq = 0
    while not stop.is_set() and (seq < count if count is not None
                                 else time.monotonic() - start < duration):
        seq += 1
        load.sent[seq] = time.time()
        body = {"client": client, "seq": seq, "op": op}
        if credential is not None:
            body["credential"] = credential
        transport.sendto(ControlMessage(ControlType.SERVICE_REQUEST, seq & 0xFFFFFFFF, body).encode())
        delay = start + seq * period - time.monotonic()
        if delay > 0:
            try:
                await asyncio.wait_for(stop.wait(), delay)
            except asyncio.TimeoutError:
                pass
    await asyncio.sleep(0.5)  # late replies still count
    transport.close()
    return load


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nodetools.co_load")
    parser.add_argument("--dst", help="the object's address (default: the grant's)")
    parser.add_argument("--port", type=int, help=f"default: the grant's, else {SERVICE_PORT}")
    parser.add_argument("--grant", type=Path,
                        help="a grant kept by `moat lease request` (run directory): requests "
                             "carry its first hop's credential and go to its address")
    parser.add_argument("--rate", type=float, default=200.0, help="requests per second")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds")
    parser.add_argument("--count", type=int,
                        help=f"send exactly this many requests (1 to {MAX_COUNT}), paced at "
                             "--rate, instead of sending for --duration")
    parser.add_argument("--client", default="co")
    parser.add_argument("--op", default="incr")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--ready", type=Path, help="touch this file once sending starts")
    args = parser.parse_args(argv)
    if not 0 < args.rate <= MAX_RATE or not 0 < args.duration <= MAX_DURATION:
        parser.error(f"rate must be in (0, {MAX_RATE}] and duration in (0, {MAX_DURATION}]")
    if args.count is not None and not 0 < args.count <= MAX_COUNT:
        parser.error(f"count must be in [1, {MAX_COUNT}]")
    credential = None
    dst, port = args.dst, args.port
    if args.grant is not None:
        try:
            hop = json.loads(args.grant.read_text())["grant"]["hops"][0]
            credential = str(hop["credential"])
            dst, port = dst or str(hop["address"]), port or int(hop["port"])
        except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
            parser.error(f"cannot read a grant from {args.grant}: {exc!r}")
    if not dst:
        parser.error("--dst or --grant is required")
    if args.ready:
        args.ready.touch()
    load = asyncio.run(run(dst, port or SERVICE_PORT, args.rate, args.duration, args.client,
                           args.op, credential, args.count))
    with args.out.open("w") as f:
        for seq, sent in sorted(load.sent.items()):
            f.write(json.dumps({"seq": seq, "sent": sent, "replies": load.replies.get(seq, [])}) + "\n")
    print(json.dumps({"sent": len(load.sent), "answered": len(load.replies), "malformed": load.malformed}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
