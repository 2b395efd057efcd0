"""``python -m agent --config FILE``: run one agent daemon in the current network namespace."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from agent.core.config import AgentConfig
from agent.core.daemon import AgentDaemon
from agent.core.errors import ConfigError
from agent.core.loghandlers import GuardedFileHandler, GuardedStreamHandler
from agent.core.runfiles import RunDirError
from agent.roles import ROLES


def setup_logging(config: AgentConfig) -> None:
    """Log to the run directory (one file per agent, root's only: it names objects, routers
    and errors that may quote what they carry) and to stderr (the node's daemon log, which
    the supervisor keeps). Both are guarded (:mod:`agent.core.loghandlers`): a full or
    read-only run directory is reported once, in words, on the other channel, and the agent
    serves on; a log file that cannot be made leaves stderr alone, with the reason said."""
    fmt = logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s")
    root = logging.getLogger()
    root.setLevel(config.log_level)
    notice = logging.getLogger("agent.log")
    stderr = GuardedStreamHandler(sys.stderr, report=lambda text: notice.error("%s", text.rstrip()))
    handlers: list[logging.Handler] = [stderr]
    try:
        Path(config.run_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
        open_log(config.log_path)
        handlers.insert(0, GuardedFileHandler(config.log_path))
    except OSError as exc:
        print(f"agent {config.name}: no log file: {RunDirError(config.log_path, exc)}; "
              "logging to stderr only", file=sys.stderr)
    for handler in handlers:
        handler.setFormatter(fmt)
        root.addHandler(handler)
    logging.getLogger("scapy").setLevel(logging.ERROR)


def open_log(path: Path) -> None:
    """Make the agent's log file 0600 from creation (the mode given to ``open(2)``, never a
    ``chmod`` after). A file already there (an agent restarted in its run) is narrowed to
    0600 if wider."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        if os.fstat(fd).st_mode & 0o077:
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent", description=__doc__)
    parser.add_argument("--config", required=True, type=Path, help="agent JSON configuration")
    args = parser.parse_args(argv)
    try:
        config = AgentConfig.load(args.config)
    except ConfigError as exc:
        print(f"agent: {exc}", file=sys.stderr)
        return 2
    setup_logging(config)
    asyncio.run(AgentDaemon(config, ROLES).run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
