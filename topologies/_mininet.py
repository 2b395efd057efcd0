"""Import Mininet's logging once and undo its process-wide side effects.

``mininet.log`` calls ``logging.setLoggerClass(MininetLogger)`` at import time, so every
logger created *afterwards* — ``logging.getLogger(__name__)`` in any module, ours or not —
becomes a ``MininetLogger`` with its own stderr handler that drops newlines and its own
level (``output``), which hides INFO/DEBUG records from whatever the application
configured and duplicates the rest. Mininet itself only uses the ``mininet`` logger it
has already created by then, so restoring the standard class right after the import is
safe. Every module of this package that imports Mininet imports this module first.

Three more repairs, because each made a line appear twice or read badly:

* Mininet's ``lg`` writes through its own handler *and* propagates to the root logger, so
  once an application calls ``logging.basicConfig`` (``moat`` does) every Mininet line is
  printed a second time — ``help`` in ``moat cli`` printed its text twice. ``lg`` keeps its
  own handler (it is what prints the CLI's output, without added newlines) and stops
  propagating.
* Mininet's level 25 (``output``) is not registered with :mod:`logging`, so a record of it
  that does reach a formatter reads ``Level 25``; it is registered as ``OUTPUT``.
* ``LinuxBridge.setup`` warns once per ``net.bridge.bridge-nf-call-*tables = 1`` that the
  bridge "may not work". Whether it works depends on the FORWARD chain, which
  :mod:`topologies.netfilter` checks and fixes for the run's bridges and reports in one line
  of its own, so those three warnings are dropped here.
"""

from __future__ import annotations

import logging

import mininet.log

if logging.getLoggerClass() is not logging.Logger:
    logging.setLoggerClass(logging.Logger)

#: The start of the warnings ``mininet.nodelib.LinuxBridge.setup`` prints.
BRIDGE_WARNING = "Warning: Linux bridge may not work with"


class DropBridgeWarnings(logging.Filter):
    """Drops Mininet's bridge-netfilter warnings (MOAT reports that state itself)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(BRIDGE_WARNING)


def _repair(lg: logging.Logger) -> None:
    """Make Mininet's logger print each line once (idempotent: safe on re-import)."""
    lg.propagate = False
    if logging.getLevelName(mininet.log.OUTPUT) != "OUTPUT":
        logging.addLevelName(mininet.log.OUTPUT, "OUTPUT")
    if not any(isinstance(f, DropBridgeWarnings) for f in lg.filters):
        lg.addFilter(DropBridgeWarnings())


_repair(mininet.log.lg)
