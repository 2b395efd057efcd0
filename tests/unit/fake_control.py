"""A stand-in agent's control socket: answers ``ping`` and ``status`` in the RPC's JSON
lines (one connection at a time), as an agent that is up. Used by the supervisor's tests."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path
from typing import Any

STATUS = {"name": "r1", "roles": ["home"], "pid": 4242, "uptime": 1.0, "bindings": 0}


class FakeControl(threading.Thread):
    """Listens on ``path``; ``close()`` stops it."""

    def __init__(self, path: Path, status: dict[str, Any] | None = None) -> None:
        super().__init__(daemon=True)
        self.status = dict(STATUS if status is None else status)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(8)

    def run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                try:
                    req = json.loads(conn.recv(65536))
                except ValueError:
                    continue
                if req.get("cmd") not in ("ping", "status"):
                    answer = {"id": req.get("id"), "ok": False, "error": "unknown command"}
                else:
                    answer = {"id": req.get("id"), "ok": True,
                              "result": "pong" if req["cmd"] == "ping" else self.status}
                conn.sendall(json.dumps(answer).encode() + b"\n")

    def close(self) -> None:
        self.sock.close()
