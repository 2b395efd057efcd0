"""Registration Identification: NTP timestamps and the replay check (RFC 5944 §5.7).

Every test passes the clock explicitly: nothing here sleeps or reads the wall clock.
"""

from __future__ import annotations

import pytest

from packets import new_identification, ntp_to_unix, replay_ok, unix_to_ntp
from packets.ident import DEFAULT_REPLAY_WINDOW, NTP_UNIX_OFFSET

NOW = 1_700_000_000.25  # a fixed "home agent clock", Unix seconds


def test_ntp_epoch_offset():
    assert NTP_UNIX_OFFSET == 2_208_988_800
    assert unix_to_ntp(0) == 2_208_988_800 << 32
    assert unix_to_ntp(0) >> 32 == 2_208_988_800
    assert unix_to_ntp(0.5) == (2_208_988_800 << 32) | 0x8000_0000
    assert ntp_to_unix(2_208_988_800 << 32) == 0.0


@pytest.mark.parametrize(
    "t", [0.0, 1.0, 0.123456, NOW, 1_234_567_890.999999, 2_085_978_495.5, 1e9 + 1e-6]
)
def test_unix_ntp_round_trip_below_a_microsecond(t):
    ntp = unix_to_ntp(t)
    assert 0 <= ntp < 1 << 64
    assert abs(ntp_to_unix(ntp) - t) < 1e-6


def test_unix_to_ntp_is_monotonic_at_microsecond_steps():
    values = [unix_to_ntp(NOW + i * 1e-6) for i in range(100)]
    assert values == sorted(values)
    assert len(set(values)) == len(values)


def test_new_identification_uses_the_clock():
    assert new_identification(clock=NOW) == unix_to_ntp(NOW)
    assert new_identification(clock=NOW, last=unix_to_ntp(NOW - 1)) == unix_to_ntp(NOW)


@pytest.mark.parametrize("delta", [0, 1, 1 << 32, 10 << 32])
def test_new_identification_strictly_above_last(delta):
    last = unix_to_ntp(NOW) + delta  # same tick, or a clock that went backwards
    ident = new_identification(clock=NOW, last=last)
    assert ident > last
    assert ident == last + 1


def test_new_identification_sequence_in_one_tick_is_strictly_increasing():
    ident = None
    seen = []
    for _ in range(5):
        ident = new_identification(clock=NOW, last=ident)
        seen.append(ident)
    assert seen == sorted(set(seen))


def test_replay_ok_inside_window_and_newer():
    last = unix_to_ntp(NOW - 1)
    assert replay_ok(unix_to_ntp(NOW), NOW, last)
    assert replay_ok(unix_to_ntp(NOW + 1), NOW, last)
    assert replay_ok(last + 1, NOW, last)


def test_replay_ok_equal_to_last_is_refused():
    ident = unix_to_ntp(NOW)
    assert not replay_ok(ident, NOW, ident)


def test_replay_ok_older_than_last_is_refused():
    last = unix_to_ntp(NOW)
    assert not replay_ok(last - 1, NOW, last)
    assert not replay_ok(unix_to_ntp(NOW - 2), NOW, last)


@pytest.mark.parametrize("offset", [DEFAULT_REPLAY_WINDOW + 0.01, 60.0, 86400.0])
def test_replay_ok_outside_window_either_side_is_refused(offset):
    assert not replay_ok(unix_to_ntp(NOW + offset), NOW, None)
    assert not replay_ok(unix_to_ntp(NOW - offset), NOW, None)
    # even if newer than the last accepted one
    assert not replay_ok(unix_to_ntp(NOW + offset), NOW, unix_to_ntp(NOW - 100))


def test_replay_ok_window_edges_and_custom_window():
    assert replay_ok(unix_to_ntp(NOW + 6.9), NOW, None)
    assert replay_ok(unix_to_ntp(NOW - 6.9), NOW, None)
    assert not replay_ok(unix_to_ntp(NOW + 2), NOW, None, window=1.0)
    assert replay_ok(unix_to_ntp(NOW + 2), NOW, None, window=3.0)


def test_replay_ok_first_registration():
    assert replay_ok(unix_to_ntp(NOW), NOW, None)
    assert replay_ok(unix_to_ntp(NOW - 3), NOW, None)
    assert not replay_ok(unix_to_ntp(NOW - 30), NOW, None)


def test_replay_ok_accepts_what_new_identification_makes():
    last = None
    for step in range(10):
        now = NOW + step * 0.001
        ident = new_identification(clock=now, last=last)
        assert replay_ok(ident, now, last)
        last = ident
        assert not replay_ok(ident, now, last)  # the replay of the same request
