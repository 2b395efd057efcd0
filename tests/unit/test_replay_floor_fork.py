"""A forked agent's replay floor is its own start, not its parent's import (issue 13's
"replay survives a restart", with agents forked from a pre-imported zygote, issue 15)."""

from __future__ import annotations

import os
import struct
import time

from agent.core import msgauth


def test_a_forked_child_starts_its_replay_floor_when_it_is_forked() -> None:
    imported_at = msgauth.STARTED_AT
    time.sleep(0.02)  # a clock step between the import and the fork, not a synchronisation
    before_fork = time.time()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its floor and a new cache's, then leave at once
        try:
            os.write(write, struct.pack("!dd", msgauth.STARTED_AT, msgauth.ReplayCache().floor))
        finally:
            os._exit(0)
    os.close(write)
    try:
        started, floor = struct.unpack("!dd", os.read(read, 16))
    finally:
        os.close(read)
        os.waitpid(pid, 0)
    assert started >= before_fork > imported_at
    assert floor == started
    assert msgauth.STARTED_AT == imported_at  # the parent's own floor is unchanged
