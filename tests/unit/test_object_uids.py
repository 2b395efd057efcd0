"""agent.hosting.object_uids: a uid per object, unique while claimed, never a user's, a
subordinate range's or a running process's, stale claims of gone agents reused."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.hosting.object_uids import (
    ObjectUidError,
    UidPool,
    parse_range,
    process_uids,
    subid_ranges,
    system_id_taken,
)


def pool(tmp_path: Path, first: int = 700000, last: int = 700009, **kw) -> UidPool:
    kw.setdefault("taken", lambda uid: False)
    kw.setdefault("reserved", lambda: [])
    kw.setdefault("in_use", lambda: set())
    return UidPool(first, last, registry=tmp_path / "reg", **kw)


def test_claims_are_unique_lowest_first_and_released(tmp_path: Path) -> None:
    p = pool(tmp_path)
    a, b = p.claim(), p.claim()
    assert (a.uid, b.uid) == (700000, 700001) and a.gid == a.uid and b.gid == b.uid
    assert a.name.startswith("o700000-") and a.name != b.name
    assert set(p.claims()) == {700000, 700001}
    p.release(a)
    assert set(p.claims()) == {700001}
    c = p.claim()
    assert c.uid == 700000 and c.name != a.name  # the uid again, never the old directory name
    assert (tmp_path / "reg").stat().st_mode & 0o777 == 0o700


def test_a_second_agent_on_the_machine_never_gets_a_held_uid(tmp_path: Path) -> None:
    mine = pool(tmp_path)
    held = {mine.claim().uid for _ in range(3)}
    # Another agent process (alive: this test's parent) shares the registry.
    other = pool(tmp_path, owner_pid=os.getppid())
    theirs = other.claim()
    assert theirs.uid not in held and theirs.uid == 700003
    other.release(mine.claim())  # not its claim: left alone
    assert len(mine.claims()) == 5


def test_users_subordinate_ranges_and_running_uids_are_skipped(tmp_path: Path) -> None:
    p = pool(tmp_path, taken=lambda uid: uid == 700000, reserved=lambda: [range(700001, 700003)],
             in_use=lambda: {700003})
    assert p.claim().uid == 700004


def test_exhausted_range_is_a_clear_error(tmp_path: Path) -> None:
    p = pool(tmp_path, last=700001)
    p.claim(), p.claim()
    with pytest.raises(ObjectUidError, match="no free object uid in 700000-700001"):
        p.claim()


def test_claims_of_an_agent_that_has_gone_are_reused(tmp_path: Path) -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(gone.stdout)
    reg = tmp_path / "reg"
    reg.mkdir(mode=0o700)
    (reg / "700000").write_text(f'{{"pid": {dead_pid}, "start": 1, "name": "o700000-x"}}')
    (reg / "700001").write_text("garbage")
    p = pool(tmp_path)
    assert p.claims() == {}
    assert p.claim().uid == 700000


def test_a_registry_others_can_write_is_refused(tmp_path: Path) -> None:
    reg = tmp_path / "reg"
    reg.mkdir()
    reg.chmod(0o777)
    with pytest.raises(ObjectUidError, match="mode 0700"):
        pool(tmp_path).claim()


def test_range_from_the_environment() -> None:
    assert parse_range("650000-650099") == (650000, 650099)
    for bad in ("0-10", "650000", "x-y", "650100-650000", "100-200"):
        with pytest.raises(ObjectUidError):
            parse_range(bad)


def test_system_lookups_on_this_machine(tmp_path: Path) -> None:
    assert system_id_taken(0) and not system_id_taken(2 ** 31 - 3)
    assert os.getuid() in process_uids()
    sub = tmp_path / "subuid"
    sub.write_text("alice:100000:65536\n# comment\nbad line\n")
    assert subid_ranges([sub, tmp_path / "missing"]) == [range(100000, 165536)]
