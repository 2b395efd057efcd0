"""The HOA's home link holds more of what waits for an address to resolve
(agent.mobility.agent_role.hold_while_resolving), on a fake /proc/sys tree."""

from __future__ import annotations

import logging
from pathlib import Path

from agent.mobility.agent_role import UNRESOLVED_QUEUE_BYTES, hold_while_resolving


def knob(root: Path, value: str) -> Path:
    path = root / "eth0" / "unres_qlen_bytes"
    path.parent.mkdir(parents=True)
    path.write_text(value)
    return path


def test_the_kernels_default_is_raised(tmp_path: Path) -> None:
    path = knob(tmp_path, "212992\n")
    hold_while_resolving("eth0", root=str(tmp_path))
    assert int(path.read_text()) == UNRESOLVED_QUEUE_BYTES


def test_a_larger_setting_is_kept(tmp_path: Path) -> None:
    path = knob(tmp_path, str(UNRESOLVED_QUEUE_BYTES * 2))
    hold_while_resolving("eth0", root=str(tmp_path))
    assert int(path.read_text()) == UNRESOLVED_QUEUE_BYTES * 2


def test_a_missing_knob_is_logged_not_fatal(tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        hold_while_resolving("eth9", root=str(tmp_path))
    assert "stays as it is" in caplog.text
