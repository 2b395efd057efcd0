"""agent.mobility.journal: the HOA's bindings and the FOA's visitors survive an agent restart
(issue 13), on fake clocks: remaining lifetimes, expired entries dropped, torn and corrupt
lines skipped, compaction keeps the state and bounds the file, failed writes keep serving."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import pytest

from agent.mobility import journal as journal_mod
from agent.mobility.bindings import BindingTable, Visitor, VisitorList
from agent.mobility.journal import Journal, JournalError, decode_line, encode_line, journal_path
from fakeclock import FakeClock

HOME, HOME2 = "10.16.0.100", "10.16.0.101"
COA, COA2 = "10.12.0.1", "10.14.0.1"
BOOT = "boot-one"


class Clocks:
    """The monotonic clock the tables run on and the wall clock, moved together."""

    def __init__(self) -> None:
        self.mono = FakeClock(1000.0)
        self.wall = FakeClock(1_800_000_000.0)

    def advance(self, seconds: float) -> None:
        self.mono.advance(seconds)
        self.wall.advance(seconds)


@pytest.fixture
def clocks() -> Clocks:
    return Clocks()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return journal_path(tmp_path, "r22b")


def open_journal(path: Path, clocks: Clocks, boot: str = BOOT, **kw) -> Journal:
    return Journal(path, clock=clocks.mono, wall_clock=clocks.wall, boot_id=boot, **kw)


class Agent:
    """What the object agent role does with a journal: restore the tables, start it, and
    let the tables tell it every change (ObjectAgentRole.restore, without the sockets)."""

    def __init__(self, path: Path, clocks: Clocks, boot: str = BOOT, **kw) -> None:
        self.bindings = BindingTable(4, clocks.mono)
        self.visitors = VisitorList(clocks.mono)
        self.journal = open_journal(path, clocks, boot, **kw)
        self.restored = self.journal.load()
        for b in self.restored.bindings:
            self.bindings.restore(b)
        for v in self.restored.visitors:
            self.visitors.restore(v)
        self.bindings.last_identification.update(self.restored.identifications)
        self.journal.start(self.bindings, self.visitors.snapshot_objects(),
                           self.bindings.last_identification)
        self.bindings.observer = self.journal
        self.visitors.observer = self.journal

    def register(self, home: str = HOME, coa: str = COA, lifetime: int = 300,
                 ident: int = 1, s: bool = False) -> None:
        self.bindings.register(home, coa, f"counter.{coa}", lifetime, s, "counter@home.moat",
                               ident, reverse_tunnel=True, network_prefix="10.16.0.224/30")
        self.bindings.note_identification(home, ident)

    def visit(self, clocks: Clocks, home: str = HOME, coa: str = COA, lifetime: int = 120,
              key: int | None = 0xDEADBEEF) -> Visitor:
        v = Visitor(home, "10.16.0.2", "10.12.0.2", 40000, "counter@home.moat",
                    f"counter.r18a", lifetime, clocks.mono(), key, coa, False, "", "r18a-eth0")
        self.visitors.add(v)
        return v

    def state(self) -> tuple:
        """What must come back: every field, and the remaining lifetimes."""
        now = self.bindings._clock()
        return (sorted((b.home_address, b.care_of_address, b.gre_key, b.lifetime, b.nai,
                        b.identification, b.reverse_tunnel, b.part, b.network_prefix,
                        b.care_of_name, round(b.remaining(now), 6)) for b in self.bindings),
                sorted((v.home_address, v.care_of_address, v.gre_key, v.local_address,
                        v.local_port, v.local_interface, v.care_of_name, v.lifetime,
                        round(v.expires_at - now, 6)) for v in self.visitors.snapshot_objects()),
                dict(self.bindings.last_identification))


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


# --- the format --------------------------------------------------------------------------


def test_a_line_round_trips_and_any_change_is_caught() -> None:
    record = {"t": "i", "home_address": HOME, "identification": 7}
    line = encode_line(record)
    assert decode_line(line) == record
    flipped = line.replace(b'"identification":7', b'"identification":8')
    with pytest.raises(JournalError, match="checksum"):
        decode_line(flipped)
    with pytest.raises(JournalError, match="torn"):
        decode_line(line[:-5])


def test_the_journal_is_root_only_from_creation(path: Path, clocks: Clocks) -> None:
    old = os.umask(0)  # even a careless umask gives no one else access
    try:
        agent = Agent(path, clocks)
        agent.register()
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not list(path.parent.glob(".*.tmp")), "the compaction's temporary file is gone"


def test_no_record_holds_a_key(path: Path, clocks: Clocks) -> None:
    agent = Agent(path, clocks)
    agent.register()
    agent.visit(clocks)
    text = path.read_text()
    for word in ("key\":\"", "mobile_home", "spi", "secret"):
        assert word not in text
    assert all(set(json.loads(l.split(b" ", 1)[1])) <= {
        "t", "version", "boot", "written", "home_address", "care_of_address", "care_of_name",
        "gre_key", "lifetime", "nai", "identification", "reverse_tunnel", "part",
        "network_prefix", "exp_mono", "exp_wall", "home_agent", "local_address", "local_port",
        "local_name", "local_interface", "standby"} for l in lines(path))


# --- restore -----------------------------------------------------------------------------


def test_restart_restores_bindings_and_visitors_with_their_remaining_lifetimes(
        path: Path, clocks: Clocks) -> None:
    first = Agent(path, clocks)
    first.register(HOME, COA, 300, ident=11)
    first.register(HOME2, COA2, 200, ident=12)
    first.visit(clocks, HOME, COA, 120)
    clocks.advance(100)
    before = first.state()
    # The process dies (nothing closed, nothing flushed beyond what each record did).
    second = Agent(path, clocks)
    assert second.state() == before
    remaining = {b.home_address: b.remaining(clocks.mono()) for b in second.bindings}
    assert remaining == {HOME: pytest.approx(200), HOME2: pytest.approx(100)}
    assert second.restored.same_boot
    # The restored entries expire when the originals would have: the visitor 20 s on.
    clocks.advance(19.5)
    assert second.bindings.expire() == [] and second.visitors.expire() == []
    clocks.advance(1)
    assert [v.home_address for v in second.visitors.expire()] == [HOME]
    clocks.advance(80)
    assert [b.home_address for b in second.bindings.expire()] == [HOME2]


def test_a_restored_binding_keeps_its_gre_key_and_a_renewal_keeps_it_too(
        path: Path, clocks: Clocks) -> None:
    first = Agent(path, clocks)
    first.register()
    key = first.bindings.for_home(HOME)[0].gre_key
    second = Agent(path, clocks)
    assert second.bindings.for_home(HOME)[0].gre_key == key
    second.register(ident=2)  # the object's next renewal at the same care-of address
    assert second.bindings.for_home(HOME)[0].gre_key == key


def test_entries_whose_lifetime_passed_while_down_are_dropped(path: Path, clocks: Clocks) -> None:
    first = Agent(path, clocks)
    first.register(HOME, COA, 60)
    first.register(HOME2, COA2, 300)
    first.visit(clocks, HOME, COA, 30)
    clocks.advance(61)
    second = Agent(path, clocks)
    assert [b.home_address for b in second.bindings] == [HOME2]
    assert len(second.visitors) == 0
    assert [b.home_address for b in second.restored.expired_bindings] == [HOME]
    assert [v.home_address for v in second.restored.expired_visitors] == [HOME]
    # And they are gone from the file: a third start does not see them at all.
    third = Agent(path, clocks)
    assert third.restored.expired_bindings == [] and third.restored.expired_visitors == []


def test_another_boot_uses_the_wall_clock(path: Path, clocks: Clocks) -> None:
    first = Agent(path, clocks)
    first.register(HOME, COA, 300)
    # The machine rebooted: the monotonic clock starts again near zero, the wall goes on.
    clocks.mono.now = 5.0
    clocks.wall.advance(40)
    second = Agent(path, clocks, boot="boot-two")
    assert not second.restored.same_boot
    assert second.bindings.for_home(HOME)[0].remaining(clocks.mono()) == pytest.approx(260)


def test_a_wall_clock_set_back_cannot_lengthen_a_lifetime(path: Path, clocks: Clocks) -> None:
    first = Agent(path, clocks)
    first.register(HOME, COA, 300)
    clocks.wall.advance(-10_000)
    second = Agent(path, clocks, boot="boot-two")
    assert second.bindings.for_home(HOME)[0].remaining(clocks.mono()) == pytest.approx(300)


def test_removals_and_deregistrations_are_restored_as_removed(path: Path, clocks: Clocks) -> None:
    first = Agent(path, clocks)
    first.register(HOME, COA, 300, ident=5)
    first.register(HOME2, COA2, 300, ident=6)
    first.bindings.register(HOME, HOME, "", 0, False, "", 9)  # back home: deregistered
    first.bindings.note_identification(HOME, 9)
    first.visit(clocks, HOME, COA)
    first.visitors.remove(HOME, COA)
    second = Agent(path, clocks)
    assert [b.home_address for b in second.bindings] == [HOME2]
    assert len(second.visitors) == 0
    # The replay check goes on from the last Identification accepted, not from nothing.
    assert second.bindings.last_identification == {HOME: 9, HOME2: 6}


def test_expiry_at_the_hoa_is_journalled(path: Path, clocks: Clocks) -> None:
    first = Agent(path, clocks)
    first.register(HOME, COA, 60)
    clocks.advance(61)
    assert first.bindings.expire()
    clocks.mono.now -= 61  # even if the clocks said otherwise at the next start,
    clocks.wall.now -= 61
    assert len(Agent(path, clocks).bindings) == 0  # the removal is in the journal


# --- damage ------------------------------------------------------------------------------


def test_a_torn_last_line_is_ignored_and_the_rest_restored(path: Path, clocks: Clocks) -> None:
    first = Agent(path, clocks)
    first.register(HOME, COA, 300, ident=1)
    before = first.state()
    first.register(HOME2, COA2, 300, ident=2)
    data = path.read_bytes()
    path.write_bytes(data[:-7])  # the crash cut the last write short
    second = Agent(path, clocks)
    assert second.restored.torn == 1 and second.restored.corrupt == 0
    assert second.state() == before
    # The restart rewrote the journal without the torn line: appends start on a clean line.
    second.register(HOME2, COA2, 300, ident=3)
    third = Agent(path, clocks)
    assert third.restored.torn == 0 and {b.home_address for b in third.bindings} == {HOME, HOME2}


def test_a_corrupt_line_in_the_middle_is_skipped_and_counted(path: Path, clocks: Clocks) -> None:
    first = Agent(path, clocks)
    first.register(HOME, COA, 300, ident=1)
    first.register(HOME2, COA2, 300, ident=2)
    rows = lines(path)
    assert json.loads(rows[-2].split(b" ", 1)[1])["home_address"] == HOME
    rows[-2] = rows[-2].replace(b"counter", b"c0unter")  # a bit flipped on the disk
    path.write_bytes(b"".join(rows))
    second = Agent(path, clocks)
    assert (second.restored.torn, second.restored.corrupt) == (0, 1)
    assert [b.home_address for b in second.bindings] == [HOME2]


def test_a_record_with_a_bad_field_is_refused_even_with_a_good_checksum(
        path: Path, clocks: Clocks) -> None:
    first = Agent(path, clocks)
    first.register(HOME, COA, 300)
    rows = lines(path)
    record = json.loads(rows[-1].split(b" ", 1)[1])
    for bad in ({"gre_key": 0}, {"gre_key": 2**32}, {"home_address": "10.16.0.300"},
                {"lifetime": True}, {"exp_mono": float("nan")}, {"part": "boss"},
                {"network_prefix": "10.16.0.225/30"}):
        path.write_bytes(b"".join(rows[:-1]) + encode_line({**record, **bad}) + rows[0])
        again = open_journal(path, clocks).load()
        assert again.bindings == [] and again.corrupt == 1, bad


def test_a_journal_others_can_write_is_not_trusted(path: Path, clocks: Clocks) -> None:
    Agent(path, clocks).register()
    os.chmod(path, 0o622)
    assert open_journal(path, clocks).load().bindings == []


def test_an_unknown_file_or_none_at_all_restores_nothing(path: Path, clocks: Clocks) -> None:
    assert len(Agent(path, clocks).bindings) == 0  # no journal yet
    path.write_bytes(b"\x00garbage\nnot a journal\n")
    restored = open_journal(path, clocks).load()
    assert restored.bindings == [] and restored.corrupt + restored.torn == 2


# --- compaction and bounds ---------------------------------------------------------------


def test_compaction_keeps_the_same_state(path: Path, clocks: Clocks) -> None:
    agent = Agent(path, clocks, min_records=8, factor=2)
    for i in range(30):
        agent.register(HOME, COA, 300, ident=100 + i)
        agent.register(HOME2, COA2 if i % 2 else "10.14.0.2", 300, ident=200 + i)
        agent.visit(clocks, HOME, COA)
        clocks.advance(1)
    assert agent.journal.stats["compactions"] > 1
    before = agent.state()
    assert Agent(path, clocks).state() == before


def test_many_renewals_keep_the_file_bounded(path: Path, clocks: Clocks) -> None:
    agent = Agent(path, clocks, min_records=64, factor=4)
    sizes = []
    for i in range(2000):
        agent.register(HOME, COA, 300, ident=i + 1)
        agent.visit(clocks, HOME, COA)
        clocks.advance(0.01)
        sizes.append(len(lines(path)) if i % 250 == 0 else 0)
    assert max(sizes) <= 64 and len(lines(path)) <= 64
    assert agent.journal.stats["writes"] > 2000  # every renewal was written, then compacted
    assert Agent(path, clocks).state() == agent.state()


def test_many_objects_bound_the_file_by_the_live_entries(path: Path, clocks: Clocks) -> None:
    agent = Agent(path, clocks, min_records=16, factor=4)
    homes = [f"10.16.0.{n}" for n in range(100, 140)]
    for rnd in range(20):
        for n, home in enumerate(homes):
            agent.register(home, COA, 300, ident=rnd * 100 + n + 1)
    live = len(homes) * 2  # a binding and an Identification each
    assert len(lines(path)) <= 4 * live + 1
    assert len(Agent(path, clocks).bindings) == len(homes)


# --- failures ----------------------------------------------------------------------------


def test_a_full_disk_logs_once_keeps_serving_and_heals(path: Path, clocks: Clocks,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    agent = Agent(path, clocks)
    agent.register(HOME, COA, 300, ident=1)
    good = agent.journal._fd
    full = os.open("/dev/full", os.O_WRONLY)
    agent.journal._fd = full  # the disk is full: every write fails with ENOSPC
    os.close(good)
    with caplog.at_level(logging.ERROR, logger=journal_mod.__name__):
        for i in range(20):
            agent.register(HOME2, COA2, 300, ident=10 + i)  # the agent goes on serving
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "No space left" in errors[0].getMessage()
    assert agent.journal.stats["errors"] >= 1 and not agent.journal.status()["ok"]
    assert len(agent.bindings) == 2
    # The disk takes writes again: the next try rewrites everything the tables hold.
    clocks.advance(journal_mod.RETRY_INTERVAL)
    agent.journal.retry()
    assert agent.journal.status()["ok"]
    assert Agent(path, clocks).state() == agent.state()


def test_a_run_directory_that_cannot_be_written_keeps_serving(tmp_path: Path, clocks: Clocks,
                                                             caplog: pytest.LogCaptureFixture
                                                             ) -> None:
    path = tmp_path / "gone" / "r22b.bindings.journal"  # as good as read-only: ENOENT
    with caplog.at_level(logging.ERROR, logger=journal_mod.__name__):
        agent = Agent(path, clocks)
        for i in range(5):
            agent.register(HOME, COA, 300, ident=i + 1)
            clocks.advance(journal_mod.RETRY_INTERVAL / 3)
    assert len(agent.bindings) == 1
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "journal" in errors[0].getMessage()
    path.parent.mkdir()
    clocks.advance(journal_mod.RETRY_INTERVAL)
    agent.journal.retry()
    assert Agent(path, clocks).state() == agent.state()
