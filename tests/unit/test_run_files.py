"""Files a run writes for its children (no root)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from topologies.run import Run


def test_private_files_are_new_owner_only_and_named_by_the_run(tmp_path: Path) -> None:
    run = Run("1126000000-abcd", root=tmp_path)
    run.dir.mkdir(parents=True)
    a = run.write_private("provision", '{"mobile": {"key": "secret"}}')
    b = run.write_private("provision", "{}")
    assert a != b and a.parent == b.parent == run.dir
    assert stat.S_IMODE(a.stat().st_mode) == 0o600
    assert a.read_text() == '{"mobile": {"key": "secret"}}'


@pytest.mark.parametrize("stem", ["../escape", "a/b", "", "x.json"])
def test_a_stem_cannot_name_another_place(tmp_path: Path, stem: str) -> None:
    run = Run("1126000000-abcd", root=tmp_path)
    run.dir.mkdir(parents=True)
    with pytest.raises(ValueError):
        run.write_private(stem, "{}")
