"""The fault injector's process watch (experiments/faults/injector.py): a crash is timed by the
victim's death, which must count a zombie (killed, not yet reaped by its supervisor) as dead
and a live process as alive; and a move that ends while its victim lives is no crash."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from agent.core.wait import wait_until
from experiments.faults import injector


def test_pid_gone_sees_live_zombie_and_reaped() -> None:
    assert not injector.pid_gone(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert not injector.pid_gone(child.pid)
        os.kill(child.pid, signal.SIGKILL)
        wait_until(lambda: injector.pid_gone(child.pid), 5, interval=0.01, what="zombie")
        assert os.path.exists(f"/proc/{child.pid}")  # not reaped yet: a zombie counts as dead
    finally:
        child.kill()
        child.wait()
    assert injector.pid_gone(child.pid)


def test_wait_pid_gone_times_the_death_and_not_a_live_victim(monkeypatch) -> None:
    monkeypatch.setattr(injector, "DEATH_GRACE", 0.05)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        ended = injector.Move(ended=time.time())
        assert injector.wait_pid_gone(child.pid, 5, ended) is None  # move over, victim alive
        before = time.time()
        os.kill(child.pid, signal.SIGKILL)
        at = injector.wait_pid_gone(child.pid, 5, injector.Move())
        assert at is not None and before <= at <= time.time()
    finally:
        child.kill()
        child.wait()
