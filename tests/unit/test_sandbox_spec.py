"""agent.hosting.sandbox, the pure parts: what the launcher is told (never uid 0, the quota,
the paths to expose, the private /tmp), how its status lines are read, and working
directories that are never reused."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from agent.hosting.cgroups import Limits
from agent.hosting.sandbox import (
    DISK_QUOTA,
    MiB,
    SandboxError,
    SandboxSpec,
    _read_report,
    disk_quota,
    make_workdir,
    minimal_env,
    remove_workdir,
)


def test_the_quota_is_at_most_half_the_memory_limit() -> None:
    assert disk_quota(Limits()) == DISK_QUOTA
    assert disk_quota(Limits(memory_bytes=512 * MiB)) == DISK_QUOTA
    assert disk_quota(Limits(memory_bytes=96 * MiB)) == 48 * MiB
    assert disk_quota(Limits(memory_bytes=MiB)) == MiB  # never an empty filesystem


def test_launch_spec_names_the_objects_space_and_what_it_must_read(tmp_path: Path) -> None:
    spec = SandboxSpec(tmp_path / "w", 620001, 620001, Limits(memory_bytes=64 * MiB),
                       env=minimal_env(tmp_path / "w", PYTHONPATH="/tmp/code:/repo"),
                       expose=("/tmp/extra",))
    out = spec.launch_spec(["python"], None)
    assert out["disk_bytes"] == 32 * MiB and out["isolate_pids"] and out["isolate_fs"]
    assert out["expose"] == ["/tmp/extra", "/tmp/code", "/repo"]
    assert out["env"]["TMPDIR"] == "/tmp" and out["env"]["HOME"] == str(tmp_path / "w")
    assert "writable" not in out  # nothing of the router's filesystem is left writable
    shared = SandboxSpec(tmp_path / "w", 620001, 620001, isolate_fs=False, disk_bytes=MiB)
    out = shared.launch_spec(["python"], None)
    assert out["env"]["TMPDIR"] == str(tmp_path / "w") and out["disk_bytes"] == MiB


@pytest.mark.parametrize("uid, gid", [(0, 620001), (620001, 0), (-1, 5)])
def test_an_object_never_runs_as_root(tmp_path: Path, uid: int, gid: int) -> None:
    with pytest.raises(SandboxError, match="never runs as"):
        SandboxSpec(tmp_path, uid, gid).launch_spec(["python"], None)


def test_status_lines_give_the_objects_pid_and_the_first_failure() -> None:
    assert _read_report(b'{"pid": 4242}\n') == (4242, None)
    # The child may report before the relay names it: order does not matter.
    pid, err = _read_report(b'{"stage": "exec", "error": "no such file", "errno": 2}\n'
                            b'{"pid": 7}\n')
    assert pid == 7 and err["stage"] == "exec"
    assert _read_report(b"") == (None, None)
    for bad in (b'{"pid": 0}\n', b'{"pid": "1"}\n', b'{"pid": 1, "x": 2}\n', b"garbage\n",
                b"[1]\n"):
        pid, err = _read_report(bad)
        assert pid is None and err is not None, bad


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_a_working_directory_is_new_owned_by_the_object_and_removed() -> None:
    tmp_path = Path(tempfile.mkdtemp(prefix="moat-workdir-test-"))  # the object must pass
    os.chmod(tmp_path, 0o755)
    try:
        _workdir_checks(tmp_path)
    finally:
        shutil.rmtree(tmp_path)


def _workdir_checks(tmp_path: Path) -> None:
    parent = tmp_path / "objects"
    path = make_workdir(parent, "o620001-ab", 620001, 620001)
    st = path.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (620001, 620001, 0o700)
    with pytest.raises(SandboxError, match="exists already"):
        make_workdir(parent, "o620001-ab", 620001, 620001)
    for bad in ("", "..", "a/b", "."):
        with pytest.raises(SandboxError, match="bad working directory name"):
            make_workdir(parent, bad, 620001, 620001)
    (path / "sub").mkdir()
    (path / "link").symlink_to(tmp_path)  # removed, not followed
    remove_workdir(path)
    assert not path.exists() and tmp_path.exists() and parent.exists()
    remove_workdir(path)  # gone already: fine
