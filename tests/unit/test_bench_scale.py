"""moat bench scale's pure parts: sizes to topologies, its options, its plots."""

from __future__ import annotations

import argparse
import os

import pytest

from experiments.bench_scale import FIGURES, _ints, cpu_seconds, n_foreign_for, plot


def test_sizes_round_up_to_whole_networks() -> None:
    assert [n_foreign_for(r) for r in (1, 10, 50, 100)] == [1, 3, 16, 33]
    assert all(3 + 3 * n_foreign_for(r) >= r for r in range(1, 120))
    with pytest.raises(ValueError):
        n_foreign_for(0)


def test_lists_of_sizes_are_checked() -> None:
    assert _ints("10,50,100") == [10, 50, 100]
    for bad in ("", "10,x", "0", "-5"):
        with pytest.raises(argparse.ArgumentTypeError):
            _ints(bad)


def test_cpu_seconds_of_this_process_and_of_none() -> None:
    assert cpu_seconds(os.getpid()) is not None
    assert cpu_seconds(2 ** 22 + 4321) is None


def test_one_plot_per_figure_even_with_a_column_missing(tmp_path) -> None:
    rows = [{"mode": m, "routers": r, "objects": 100, "up_s": r / 5, "register_s": None,
             "pss_mib": 20.0 * r, "rss_mib": 80.0 * r, "hoa_cpu_s": 0.5, "down_s": 1.0}
            for m in ("fork", "exec") for r in (12, 51)]
    paths = plot(rows, tmp_path)
    assert sorted(p.name for p in paths) == sorted(f"{k}.png" for k in FIGURES)
    assert all(p.stat().st_size > 1000 for p in paths)
