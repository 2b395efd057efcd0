"""End a forked child as an interpreter ends a program.

The agent zygote and the object fork server run a module's ``main`` in a forked child
instead of exec'ing a new interpreter. The child must then end the way ``python -m`` would:
``SystemExit``'s code (a message printed to stderr, status 1), a traceback and status 1 for
anything else, logging flushed, stdout and stderr flushed, and ``os._exit`` so that nothing the
parent registered (atexit, its event loop, its threads' locks) runs in the child.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import NoReturn

__all__ = ["run_and_exit"]


def run_and_exit(main: Callable[[], int | None]) -> NoReturn:
    """Run ``main()`` and end this process with its status, as an interpreter would."""
    code = 1
    try:
        result = main()
        code = 0 if result is None else int(result)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, int) and exc.code is not None:
            print(exc.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - as an interpreter would: traceback, status 1
        import traceback

        traceback.print_exc()
    finally:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code & 0xFF)
