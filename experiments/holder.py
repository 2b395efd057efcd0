"""The background process behind ``moat up``: holds one MOAT network until told to stop.

Started by :mod:`experiments.cli` in a session of its own with ``MOAT_RUN_ID`` in its start
environment, so ``moat clean`` can find and stop it like every other process of the run.
SIGTERM (``moat down``) stops the network in order.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from topologies.catalog import make_topo
from topologies.moatnet import MoatNetwork
from topologies.run import Run

log = logging.getLogger(__name__)


def broker_option(broker: str | None) -> dict:
    """MoatNetwork's ``broker`` argument for ``--broker`` (absent: its default, the HOA)."""
    if broker is None:
        return {}
    return {"broker": None if broker == "none" else broker}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.holder")
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--topo", default="patent")
    parser.add_argument("--objects", default="counter")
    parser.add_argument("--adv-interval", type=float, default=1.0)
    parser.add_argument("--broker", help="the router of the service broker; 'none': no broker "
                                         "(default: the topology's HOA router)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: done.set())
    network = MoatNetwork(make_topo(args.topo), objects=args.objects.split(","),
                          advertise_interval=args.adv_interval, run=Run(args.run_id),
                          **broker_option(args.broker))
    try:
        network.start()
        log.info("run %s is up; waiting for SIGTERM", args.run_id)
        done.wait()
    finally:
        network.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
