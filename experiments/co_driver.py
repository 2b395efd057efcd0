"""The main process's end of a corresponding-object driver running inside a host.

An experiment that acts as several COs starts one child per host (``python -c "from <module>
import co_driver; co_driver()"`` through :meth:`topologies.client.RunClient.popen`): it reads
its setup, then one JSON operation per line, and answers each with one JSON line, timing what
it does with the host's own clock. This class is the other end: it sends the setup, asks
bounded by a timeout, and stops the child. Each experiment keeps its own ``co_driver`` (what
an operation does is the experiment's business).
"""

from __future__ import annotations

import contextlib
import json
import select
import subprocess
import sys
from typing import Any


class HostDriver:
    """One host's driver child: ``module``'s ``co_driver`` as COs ``cos``; errors as ``error``."""

    def __init__(self, client: Any, host: str, cos: list[str], module: str,
                 setup: dict[str, Any], error: type[Exception], timeout: float) -> None:
        self.host = host
        self.error = error
        self.timeout = timeout
        self.proc = client.popen(host, [sys.executable, "-c",
                                        f"from {module} import co_driver; co_driver()"],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE)
        self._send({"broker": client.params["broker_address"], "cos": cos,
                    "keys": str(client.run.dir / "co_keys.json"), **setup})

    def _send(self, doc: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(doc) + "\n").encode())
        self.proc.stdin.flush()

    def ask(self, op: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        """Send one operation and read its answer (bounded by ``timeout``)."""
        self._send(op)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [],
                                    self.timeout if timeout is None else timeout)
        line = self.proc.stdout.readline() if ready else b""
        if not line:
            err = b""
            if self.proc.poll() is not None and self.proc.stderr is not None:
                err = self.proc.stderr.read1(4000)
            raise self.error(f"the CO driver in {self.host} did not answer {op['op']}: "
                             f"{err.decode(errors='replace')[-500:]}")
        return json.loads(line)

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._send({"op": "quit"})
        try:
            self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
