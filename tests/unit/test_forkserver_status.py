"""The one reader of a relay's or the fork server's status line (sandbox_exec.exit_status),
used by both the forked object's handle and an adopted relay's link; and the fork server's
warm-up, which leaves in the server what a forked runner would otherwise import itself."""

from __future__ import annotations

import subprocess
import sys

import pytest

from agent.hosting.sandbox_exec import exit_status


@pytest.mark.parametrize("line, code", [
    (b'{"exit": 0}\n', 0), (b'{"exit": -9}\n', -9), (b'{"exit": 3}', 3),
    (b'{"exit": true}\n', None), (b'{"exit": "1"}\n', None), (b'{"exit": 1.0}\n', None),
    (b'{"pid": 5}\n', None), (b'[0]\n', None), (b'{"exi', None), (b'\xff\xfe\n', None),
    (b'', None), (b'null\n', None)])
def test_exit_status_reads_only_an_integer_exit(line: bytes, code: int | None) -> None:
    assert exit_status(line) == code


def test_the_warm_up_imports_what_a_forked_runner_would_import() -> None:
    """argparse's help formatter imports shutil (and bz2, lzma) at a runner's first
    add_argument: after the server's warm-up, a runner-like parse imports nothing new."""
    code = ("import sys, argparse\n"
            "from agent.hosting import forkserver\n"
            "forkserver._warm()\n"
            "before = set(sys.modules)\n"
            "p = argparse.ArgumentParser(prog='x')\n"
            "p.add_argument('--spec', required=True)\n"
            "p.add_argument('--port', type=int, required=True)\n"
            "p.add_argument('--warm', action='store_true')\n"
            "p.parse_args(['--spec', 's', '--port', '1'])\n"
            "import asyncio\n"
            "asyncio.run(asyncio.sleep(0))\n"
            "print(sorted(set(sys.modules) - before))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         check=True).stdout
    assert out.strip() == "[]"
    bare = subprocess.run([sys.executable, "-c", code.replace("forkserver._warm()\n", "")],
                          capture_output=True, text=True, timeout=60, check=True).stdout
    assert "shutil" in bare  # what the warm-up saves each forked object
