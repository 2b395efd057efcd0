"""A run's directory and the files MOAT writes in it are root-only from creation (issue 12,
item 2): the mode is given to the system call that creates each one, so no umask can widen
it and no ``chmod`` after leaves a window. No root needed: the tests run as whoever runs
them, with umask 0 (the widest a caller could have), and forbid every chmod."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Iterator

import pytest

from experiments.results import copy_captures
from topologies import run as runmod
from topologies.nodes import open_private_log
from topologies.run import (
    SANDBOX_DIR,
    Run,
    RunDirError,
    ensure_run_root,
    make_private_dir,
    private_umask,
    write_private_file,
)

RUN_ID = "1202000000-abcd"


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def wide_umask() -> Iterator[None]:
    """umask 0: whatever is created without an explicit mode comes out 0666/0777."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def no_chmod(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Fail any chmod on a path (the "create wide, chmod later" pattern); fchmod on a fresh
    fd is recorded (it is allowed only to narrow a file nobody else has open yet)."""
    calls: list[tuple] = []

    def refuse(*args: object, **kw: object) -> None:
        raise AssertionError(f"chmod after creation: {args}")

    monkeypatch.setattr(os, "chmod", refuse)
    monkeypatch.setattr(Path, "chmod", refuse)
    real_fchmod = os.fchmod
    monkeypatch.setattr(os, "fchmod", lambda fd, m: (calls.append((fd, m)), real_fchmod(fd, m)))
    return calls


def test_the_run_directory_is_0700_from_mkdir_whatever_the_umask(tmp_path: Path, wide_umask: None,
                                                                 no_chmod: list) -> None:
    run = Run(RUN_ID, root=tmp_path / "moat").create()
    assert mode(run.dir) == 0o700
    assert mode(run.dir / "captures") == 0o700
    assert mode(run.dir / "run.json") == 0o600
    assert mode(tmp_path / "moat") == 0o755
    # The objects' side: reachable (0755), holds no file of the run's, linked from the run.
    assert run.sandbox_dir == tmp_path / "moat" / SANDBOX_DIR / RUN_ID
    assert mode(run.sandbox_dir) == 0o755
    for name in ("objects", "vm"):
        assert (run.dir / name).is_symlink()
        assert (run.dir / name).resolve() == run.sandbox_dir / name
        assert mode(run.sandbox_dir / name) == 0o755
    assert not [p for p in run.sandbox_dir.rglob("*") if p.is_file()]
    assert no_chmod == []  # nothing had to be narrowed: every mode came from creation


def test_run_json_is_rewritten_root_only_and_whole(tmp_path: Path, wide_umask: None,
                                                  no_chmod: list) -> None:
    run = Run(RUN_ID, root=tmp_path).create()
    before = os.stat(run.dir / "run.json").st_ino
    run.state.status = "up"
    run.save()
    assert mode(run.dir / "run.json") == 0o600
    assert os.stat(run.dir / "run.json").st_ino != before  # a new file renamed into place
    assert Run.load(RUN_ID, tmp_path).state.status == "up"
    assert sorted(p.name for p in run.dir.iterdir()) == ["captures", "objects", "run.json", "vm"]


def test_a_run_directory_is_never_reused(tmp_path: Path) -> None:
    Run(RUN_ID, root=tmp_path).create()
    with pytest.raises(FileExistsError):
        Run(RUN_ID, root=tmp_path).create()


@pytest.mark.parametrize("bad", ["sandbox", "../x", "a/b", ".hidden"])
def test_a_run_id_cannot_name_another_place(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError):
        Run(bad, root=tmp_path)


def test_a_run_root_others_can_write_or_a_link_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    with pytest.raises(RunDirError):
        Run(RUN_ID, root=shared).create()
    assert not (shared / RUN_ID).exists()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o755)
    (tmp_path / "link").symlink_to(elsewhere)
    with pytest.raises(RunDirError):
        ensure_run_root(tmp_path / "link")
    assert not list(elsewhere.iterdir())


def test_private_files_are_0600_from_open_and_replace_atomically(tmp_path: Path, wide_umask: None,
                                                                no_chmod: list,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[tuple[str, int, int]] = []
    real_open = os.open

    def spy(path, flags, mode=0o777, *a, **kw):  # type: ignore[no-untyped-def]
        opened.append((str(path), flags, mode))
        return real_open(path, flags, mode, *a, **kw)

    monkeypatch.setattr(os, "open", spy)
    target = tmp_path / "agent.json"
    target.write_text("old")  # 0666 under umask 0: replaced, not chmod-ed
    write_private_file(target, '{"key": "secret"}')
    assert target.read_text() == '{"key": "secret"}' and mode(target) == 0o600
    (path, flags, given), = opened
    assert given == 0o600 and flags & os.O_CREAT and flags & os.O_EXCL and flags & os.O_NOFOLLOW
    assert Path(path).parent == tmp_path and Path(path).name != target.name  # a temporary file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agent.json"]  # no temporary left
    assert no_chmod == []


def test_a_private_file_replaces_a_link_and_never_writes_through_it(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (tmp_path / "f").symlink_to(victim)
    write_private_file(tmp_path / "f", "new")
    assert victim.read_text() == "keep"
    assert not (tmp_path / "f").is_symlink() and (tmp_path / "f").read_text() == "new"


def test_a_shared_file_gets_its_group_and_mode_before_its_content(tmp_path: Path) -> None:
    path = write_private_file(tmp_path / "authorized_keys", "ssh-ed25519 AAAA x\n", mode=0o640,
                              group=os.getegid())
    assert mode(path) == 0o640 and os.stat(path).st_gid == os.getegid()


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "run.json"
    write_private_file(target, "old")

    class Boom:
        def __str__(self) -> str:
            raise RuntimeError("boom")

    with pytest.raises(TypeError):
        write_private_file(target, Boom())  # type: ignore[arg-type]
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]


def test_private_dirs_and_umask(tmp_path: Path, wide_umask: None) -> None:
    assert mode(make_private_dir(tmp_path / "d")) == 0o700
    make_private_dir(tmp_path / "d")  # again: fine
    (tmp_path / "wide").mkdir(mode=0o755)
    with pytest.raises(RunDirError):
        make_private_dir(tmp_path / "wide")
    with private_umask():
        (tmp_path / "k.pub").write_text("public")
        (tmp_path / "sub").mkdir()
    assert mode(tmp_path / "k.pub") == 0o600 and mode(tmp_path / "sub") == 0o700
    assert os.umask(0) == 0  # restored


def test_daemon_logs_are_0600_from_open_and_never_follow_a_link(tmp_path: Path, wide_umask: None) -> None:
    f = open_private_log(tmp_path / "sshd.log")
    f.write(b"x\n")
    f.close()
    assert mode(tmp_path / "sshd.log") == 0o600
    (tmp_path / "link.log").symlink_to(tmp_path / "victim")
    with pytest.raises(OSError):
        open_private_log(tmp_path / "link.log")
    assert not (tmp_path / "victim").exists()


def test_the_agent_log_is_0600_from_creation(tmp_path: Path, wide_umask: None) -> None:
    from agent.__main__ import open_log

    open_log(tmp_path / "r18a.log")
    assert mode(tmp_path / "r18a.log") == 0o600
    (tmp_path / "old.log").write_text("from before")  # 0666: narrowed, content kept
    open_log(tmp_path / "old.log")
    assert mode(tmp_path / "old.log") == 0o600 and (tmp_path / "old.log").read_text() == "from before"


def test_captures_copied_into_results_stay_root_only(tmp_path: Path, wide_umask: None,
                                                     no_chmod: list) -> None:
    caps = tmp_path / "run" / "captures"
    caps.mkdir(parents=True)
    (caps / "home_lan.pcap").write_bytes(b"\xd4\xc3\xb2\xa1pcap")
    dest = tmp_path / "results"
    dest.mkdir()
    copied = copy_captures(caps, dest)
    assert [p.name for p in copied] == ["home_lan.pcap"]
    assert mode(dest / "captures") == 0o700 and mode(copied[0]) == 0o600
    assert copied[0].read_bytes() == b"\xd4\xc3\xb2\xa1pcap"


def test_clean_removes_the_sandbox_directory_and_never_takes_it_for_a_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Nothing of the machine's: no process, rule or cgroup of a live run is looked at.
    monkeypatch.setattr(runmod, "processes_of_run", lambda run_id: [])
    monkeypatch.setattr(runmod, "remove_run_rules", lambda run_id, recorded, **kw: [])
    monkeypatch.setattr(runmod, "_run_ids_by_pid", lambda: {})
    monkeypatch.setattr(runmod, "_run_ids_by_cmdline", lambda: {})
    import agent.hosting.cgroups as cg

    monkeypatch.setattr(cg, "clean_run", lambda run_id, *a, **k: ([], []))
    run = Run(RUN_ID, root=tmp_path).create()
    orphan = tmp_path / SANDBOX_DIR / "1202000001-dead"  # its run directory already gone
    orphan.mkdir()
    assert [r.run_id for r in runmod.list_runs(tmp_path)] == [RUN_ID]
    cleaned = runmod.clean_all(tmp_path)
    assert sorted(cleaned) == [RUN_ID, "1202000001-dead"]
    assert not run.dir.exists() and not run.sandbox_dir.exists() and not orphan.exists()
    assert (tmp_path / SANDBOX_DIR).is_dir()  # shared by the runs; only their parts went
