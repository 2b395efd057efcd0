"""Test-suite wide behaviour.

tests/unit   no root, fast; run anywhere.
tests/netns  root, real network namespaces and Mininet. Every test collected from there is
             marked ``netns`` automatically and skipped, with the reason, where it cannot run:
             not root, or Mininet's ``mnexec`` helper missing. A test elsewhere that carries
             ``@pytest.mark.netns`` gets the same treatment.

Select or deselect them with ``-m netns`` / ``-m "not netns"``.

In parallel (`make test`: pytest-xdist ``-n 2 --dist loadgroup``) each netns module is one
xdist group, so a module's tests (and its module-scoped network) stay on one worker while
the other worker runs another module: every name a MOAT network makes in the root namespace
is scoped to its run (topologies.naming), so two networks run side by side. A few modules
must not share the machine (:data:`EXCLUSIVE`, each with its reason): they hold an exclusive
lock on :data:`NETNS_LOCK` while every other netns module holds it shared.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

NETNS_DIR = (Path(__file__).resolve().parent / "netns")

SKIP_NOT_ROOT = "needs root: tests/netns create real network namespaces (run: sudo make test)"
SKIP_NO_MNEXEC = "Mininet's mnexec not found: run sudo make setup"

#: Held shared by every netns module while it runs, exclusively by those in EXCLUSIVE.
NETNS_LOCK = Path(os.environ.get("MOAT_TEST_NETNS_LOCK", "/tmp/moat-netns-tests.lock"))
#: Taken briefly before NETNS_LOCK, and held by an exclusive module while it waits, so a
#: stream of shared holders cannot starve it.
NETNS_GATE = NETNS_LOCK.with_name(NETNS_LOCK.name + ".gate")

#: netns modules that run alone (no other netns module at the same time), and why.
EXCLUSIVE: dict[str, str] = {
    "test_cli.py": "`moat clean` and `moat show` without --run act on every network of the "
                   "machine (the newest live run, every run)",
    "test_netfilter_host.py": "sets the machine's FORWARD policy to DROP: a network started "
                              "before it has no rules for its bridges",
    "test_bootstrap_idempotent.py": "runs scripts/bootstrap.sh, which changes the machine",
    "test_handoff.py": "asserts loss counts and disruption times that a second network's "
                       "load on the two cores changes",
    "test_faults.py": "asserts recovery times and supervisor restarts that a second "
                      "network's load on the two cores delays",
}


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
            # One module, one worker (its module-scoped network is built once); modules
            # spread over the workers (see the module docstring).
            item.add_marker(pytest.mark.xdist_group(f"netns-{Path(str(item.path)).stem}"))
        if reason is not None and item.get_closest_marker("netns") is not None:
            item.add_marker(pytest.mark.skip(reason=reason))


def _acquire(exclusive: bool) -> int:
    """NETNS_LOCK, shared or exclusive, through the gate (writer preference)."""
    gate = os.open(NETNS_GATE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(gate, fcntl.LOCK_EX)
        lock = os.open(NETNS_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
    finally:
        os.close(gate)  # releases the gate
    return lock


@pytest.fixture(scope="module", autouse=True)
def _netns_share(request: pytest.FixtureRequest) -> Iterator[None]:
    """A netns module holds NETNS_LOCK for as long as it runs (autouse: set up before, and
    torn down after, the module's own module-scoped fixtures, its network among them)."""
    path = Path(str(request.node.path))
    if not _in_netns_dir(path) or _netns_skip_reason() is not None:
        yield
        return
    lock = _acquire(path.name in EXCLUSIVE)
    try:
        yield
    finally:
        os.close(lock)
