"""The hand-over store's writes (issue 14): atomic always, fsynced only when durable (the
``committing`` record is written while the object is held), and a restarted agent reads
what the one before it wrote."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

from agent.hosting.handover import HandoverStore, SourceRecord

TARGET = "10.14.0.1"


def record(phase: str = "committing", n: int = 1) -> SourceRecord:
    return SourceRecord("counter", "e1", TARGET, "make-before-break", phase, {"count": n},
                        {"name": "counter"}, held=True)


@pytest.fixture
def fsyncs(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd))[1])
    return calls


def test_writes_are_not_fsynced_unless_durable(tmp_path: Path, fsyncs: list[int]) -> None:
    store = HandoverStore(tmp_path, "r22c")
    store.save(record())
    store.save_arrivals([{"name": "counter", "epoch": "e1", "phase": "committed"}])
    assert fsyncs == []
    durable = HandoverStore(tmp_path, "r14a", durable=True)
    durable.save(record())
    durable.save_arrivals([{"name": "counter", "epoch": "e1", "phase": "committed"}])
    assert len(fsyncs) == 2


@pytest.mark.parametrize("durable", [False, True])
def test_a_restarted_agent_reads_the_newest_whole_record(tmp_path: Path, durable: bool) -> None:
    store = HandoverStore(tmp_path, "r22c", durable=durable)
    store.save(record("stopped", 1))
    store.save(record("committing", 2))  # replaces the first, atomically
    [again] = HandoverStore(tmp_path, "r22c").records()  # the next agent's store
    assert (again.phase, again.state, again.held) == ("committing", {"count": 2}, True)
    mine = tmp_path / "handover" / "r22c"
    assert [p.name for p in mine.iterdir()] == ["counter.json"]  # no temporary file left
    assert stat.S_IMODE((mine / "counter.json").stat().st_mode) == 0o600


def test_a_store_whose_directory_was_removed_makes_it_again(tmp_path: Path) -> None:
    store = HandoverStore(tmp_path, "r22c")
    store.save(record())
    shutil.rmtree(tmp_path / "handover")
    store.save(record("committing", 3))
    assert [r.state for r in store.records()] == [{"count": 3}]
    assert stat.S_IMODE((tmp_path / "handover" / "r22c").stat().st_mode) == 0o700
