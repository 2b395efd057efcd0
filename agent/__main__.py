"""``python -m agent --config FILE``: run one agent daemon in the current network namespace."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from agent.core.config import AgentConfig
from agent.core.daemon import AgentDaemon
from agent.core.errors import ConfigError
from agent.roles import ROLES


def setup_logging(config: AgentConfig) -> None:
    """Log to the run directory (one file per agent) and to stderr."""
    fmt = logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s")
    root = logging.getLogger()
    root.setLevel(config.log_level)
    Path(config.run_dir).mkdir(parents=True, exist_ok=True)
    for handler in (logging.FileHandler(config.log_path), logging.StreamHandler(sys.stderr)):
        handler.setFormatter(fmt)
        root.addHandler(handler)
    logging.getLogger("scapy").setLevel(logging.ERROR)


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
