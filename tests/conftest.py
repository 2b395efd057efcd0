"""Test-suite wide behaviour.

tests/unit   no root, fast; run anywhere.
tests/netns  root, real network namespaces and Mininet. Every test collected from there is
             marked ``netns`` automatically and skipped, with the reason, where it cannot run:
             not root, or Mininet's ``mnexec`` helper missing. A test elsewhere that carries
             ``@pytest.mark.netns`` gets the same treatment.

Select or deselect them with ``-m netns`` / ``-m "not netns"``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

NETNS_DIR = (Path(__file__).resolve().parent / "netns")

SKIP_NOT_ROOT = "needs root: tests/netns create real network namespaces (run: sudo make test)"
SKIP_NO_MNEXEC = "Mininet's mnexec not found: run sudo make setup"


def pytest_configure(config: pytest.Config) -> None:
    # pyproject.toml registers the marker; register it here too when pytest runs without it
    # (another rootdir / -c), so --strict-markers never trips over it.
    if not any(line.split(":", 1)[0].strip() == "netns" for line in config.getini("markers")):
        config.addinivalue_line(
            "markers", "netns: needs root and real network namespaces (tests/netns); skipped otherwise"
        )


def _in_netns_dir(path: Path) -> bool:
    try:
        path.resolve().relative_to(NETNS_DIR)
    except ValueError:
        return False
    return True


def _netns_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return SKIP_NOT_ROOT
    if shutil.which("mnexec") is None:
        return SKIP_NO_MNEXEC
    return None


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own, which reads xdist_group
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _netns_skip_reason()
    for item in items:
        if _in_netns_dir(Path(str(item.path))):
            item.add_marker(pytest.mark.netns)
            # One Mininet network at a time on a machine (bridge names are not scoped to the
            # run yet): under pytest-xdist (`make test`: -n 2 --dist loadgroup) every netns
            # test goes to one worker, in order, while the unit tests share the other.
            item.add_marker(pytest.mark.xdist_group("netns"))
        if reason is not None and item.get_closest_marker("netns") is not None:
            item.add_marker(pytest.mark.skip(reason=reason))
