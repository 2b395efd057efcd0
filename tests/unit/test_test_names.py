"""Every test module has a basename of its own.

pytest imports test modules by basename (rootdir-relative packages are not used here), so a
unit test and a namespace test of one name stop the whole run at collection: CI caught it
twice. This check fails first, with the clashing paths, in a second.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_test_module_basenames_are_unique() -> None:
    seen: dict[str, list[str]] = defaultdict(list)
    for path in TESTS.rglob("test_*.py"):
        seen[path.name].append(str(path.relative_to(TESTS)))
    assert {name: paths for name, paths in seen.items() if len(paths) > 1} == {}
