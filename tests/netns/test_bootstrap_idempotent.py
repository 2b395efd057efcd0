"""scripts/bootstrap.sh is idempotent: run twice, the second run does no install work.

Root only (tests/conftest.py skips it otherwise): it runs the real script on this machine, in
this checkout. The first run may install packages or reinstall the project (e.g. after
pyproject.toml changed); the second must only check.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _bootstrap(timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    start = time.monotonic()
    proc = subprocess.run(
        ["bash", "scripts/bootstrap.sh"], cwd=REPO, env=env, stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=timeout,
    )
    return proc, time.monotonic() - start


def test_second_run_does_no_install_work():
    first, _ = _bootstrap(timeout=1800)
    assert first.returncode == 0, f"first run failed:\n{first.stdout}\n{first.stderr}"

    second, seconds = _bootstrap(timeout=600)
    output = second.stdout + second.stderr
    assert second.returncode == 0, f"second run failed:\n{output}"

    work = [
        line for line in output.splitlines()
        if "installing" in line or line.startswith("bootstrap: creating")
    ]
    assert not work, f"second run did install work:\n{output}"
    assert "bootstrap: ok" in second.stdout, output
    # Only a sanity bound (a run that only checks takes about a second); not a speed target.
    assert seconds < 60, f"second run took {seconds:.1f} s, as if it did work:\n{output}"
