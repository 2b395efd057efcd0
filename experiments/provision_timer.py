"""Send one PROVISION at a given moment and say when it left: ``python -m
experiments.provision_timer`` (run inside the remote site's node by ``moat bench provision``).

The benchmark measures PROVISION → first answer. Starting a Python process to send the
message (what ``RunClient.provision`` does) costs more than a warm provisioning, and that
cost is the harness's, not the router's: this tool starts and imports everything first,
prints ``ready`` (having imported what :func:`~nodetools.probes.control` imports when first
called), waits for a line on stdin, then notes the wall clock and sends the signed,
sealed PROVISION (:func:`nodetools.probes.control`), and prints one JSON line:
``{"sent": t, "answered": t, "answer": {...}}``. Every node of a run shares the machine's
clock, so ``sent`` compares with the time a corresponding object's first answer arrived.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from nodetools.probes import control

# What control() imports on its first call, imported now: their import time is the
# harness's, and it would otherwise fall between "sent" and the router receiving it.
import agent.core.msgauth  # noqa: E402,F401
import agent.core.peer  # noqa: E402,F401
import agent.core.sealing  # noqa: E402,F401
import agent.vm.signing  # noqa: E402,F401


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.provision_timer")
    parser.add_argument("dst", help="the router's address")
    parser.add_argument("body", type=Path, help="the PROVISION body (JSON file)")
    parser.add_argument("--sign-key", required=True)
    parser.add_argument("--peers", required=True)
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args(argv)
    body = json.loads(args.body.read_text())
    print("ready", flush=True)
    if not sys.stdin.readline():
        return 1  # the benchmark went away
    sent = time.time()
    answer = control(args.dst, "provision", body, args.timeout, args.sign_key, args.peers)
    print(json.dumps({"sent": sent, "answered": time.time(), "answer": answer}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
