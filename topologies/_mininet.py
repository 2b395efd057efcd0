"""Import Mininet's logging once and undo its process-wide side effect.

``mininet.log`` calls ``logging.setLoggerClass(MininetLogger)`` at import time, so every
logger created *afterwards* — ``logging.getLogger(__name__)`` in any module, ours or not —
becomes a ``MininetLogger`` with its own stderr handler that drops newlines and its own
level (``output``), which hides INFO/DEBUG records from whatever the application
configured and duplicates the rest. Mininet itself only uses the ``mininet`` logger it
has already created by then, so restoring the standard class right after the import is
safe. Every module of this package that imports Mininet imports this module first.
"""

from __future__ import annotations

import logging

import mininet.log  # noqa: F401  - imported for its side effect, undone below

if logging.getLoggerClass() is not logging.Logger:
    logging.setLoggerClass(logging.Logger)
