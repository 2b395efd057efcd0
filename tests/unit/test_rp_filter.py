"""agent.mobility.tunnel.base.RpFilter on a fake /proc/sys/net/ipv4/conf (issue 12, item 9).

The kernel applies max(conf/all, conf/<if>). A strict or loose ``all`` is moved onto every
interface so that each keeps the filtering it had, ``all`` becomes 0 and only the tunnel
device is off; closing the tunnel puts every value back.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.mobility.tunnel.base import RpFilter


def tree(tmp_path: Path, values: dict[str, str]) -> Path:
    for name, value in values.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "rp_filter").write_text(value + "\n")
    return tmp_path


def read(conf: Path) -> dict[str, str]:
    return {p.name: (p / "rp_filter").read_text().strip() for p in sorted(conf.iterdir())}


def effective(values: dict[str, str]) -> dict[str, int]:
    return {k: max(int(values["all"]), int(v)) for k, v in values.items() if k != "all"}


@pytest.mark.parametrize("all_value", ["1", "2"])
def test_only_the_tunnel_device_is_relaxed_and_everything_comes_back(
        tmp_path: Path, all_value: str) -> None:
    before = {"all": all_value, "default": "0", "lo": "0", "eth0": "1", "eth1": "2",
              "tun0": "0"}
    conf = tree(tmp_path, before)
    rp = RpFilter(str(conf))
    rp.relax_device("tun0")
    rp.relax_all()
    after = read(conf)
    assert after["all"] == "0" and after["tun0"] == "0"
    wanted = effective(before)
    wanted["tun0"] = 0
    assert effective(after) == wanted  # every other interface filters as before
    rp.restore()
    assert read(conf) == dict(before, tun0="0")


def test_all_off_changes_nothing(tmp_path: Path) -> None:
    before = {"all": "0", "default": "2", "eth0": "1", "tun0": "1"}
    conf = tree(tmp_path, before)
    rp = RpFilter(str(conf))
    rp.relax_all()
    assert read(conf) == before
    rp.restore()
    assert read(conf) == before


def test_a_device_made_after_relax_all_is_off(tmp_path: Path) -> None:
    """The kernel backend makes a device per peer later; ``default`` kept ``all``'s value
    for any other new interface."""
    conf = tree(tmp_path, {"all": "1", "default": "0", "eth0": "0"})
    rp = RpFilter(str(conf))
    rp.relax_all()
    default = read(conf)["default"]
    (conf / "gre1").mkdir()
    (conf / "gre1" / "rp_filter").write_text(default)
    RpFilter.device("gre1", str(conf))
    assert read(conf) == {"all": "0", "default": "1", "eth0": "1", "gre1": "0"}
