"""A forked child ends as ``python -m`` would (agent.core.as_main): its status, SystemExit's
message, a traceback for anything else, its output flushed, nothing of the parent's run."""

from __future__ import annotations

import os
import sys

import pytest

from agent.core.as_main import run_and_exit


def _in_child(main) -> tuple[int, bytes]:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        # pytest replaced sys.stdout and sys.stderr: the child's are the pipe, buffered.
        sys.stdout = sys.stderr = open(write, "w", buffering=65536)  # noqa: SIM115
        run_and_exit(main)
    os.close(write)
    out = b""
    while chunk := os.read(read, 65536):
        out += chunk
    os.close(read)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), out


def _boom() -> int:
    raise RuntimeError("boom")


def _message() -> int:
    raise SystemExit("bad argument")


def _printed() -> int:
    print("half a line", end="")  # flushed by the exit, not lost with the process
    return 3


@pytest.mark.parametrize("main, code, output", [
    (lambda: 0, 0, b""),
    (lambda: None, 0, b""),
    (lambda: 258, 2, b""),            # a status is a byte, as exit(2) makes it
    (_printed, 3, b"half a line"),
    (_message, 1, b"bad argument\n"),
    (lambda: (_ for _ in ()).throw(SystemExit(7)), 7, b""),
], ids=["zero", "none", "wraps", "flushed", "message", "exit-code"])
def test_a_child_ends_with_its_status_and_output(main, code: int, output: bytes) -> None:
    assert _in_child(main) == (code, output)


def test_an_exception_prints_its_traceback_and_ends_with_status_1() -> None:
    code, out = _in_child(_boom)
    assert code == 1 and b"Traceback" in out and b"RuntimeError: boom" in out
