"""The attack suite's pure parts: rows, summary schema, table, catalog, topology option."""

from __future__ import annotations

import json

import pytest

from experiments.attacks.catalog import CLASSES, ORDER, SHORT, by_name
from experiments.attacks.report import Row, SummaryError, build_summary, check_summary, table
from topologies.errors import TopologyParamError
from topologies.patent import ATTACKER_HOST, PatentTopo


def _row(name: str, refused: bool = True, same: bool = True, alive: bool = True) -> Row:
    return Row(by_name(name), "r22b", "2 RRQs", "codes [133]", refused, same, alive, 1000, 1100,
               {"changes": []})


def test_row_holds_only_when_refused_unchanged_and_alive() -> None:
    assert _row("registration_replay").holds
    assert not _row("registration_replay", refused=False).holds
    assert not _row("registration_replay", same=False).holds
    assert not _row("registration_replay", alive=False).holds


def test_a_row_that_fails_names_the_defence_it_lacks() -> None:
    held, failed = _row("fuzz").as_dict(), _row("fuzz", refused=False).as_dict()
    assert held["defence"] is None
    assert failed["defence"] == by_name("fuzz").defence and failed["holds"] is False


def test_summary_holds_only_if_every_row_does_and_survives_json() -> None:
    rows = [_row("registration_replay"), _row("binding_hijack", same=False)]
    summary = build_summary("run-1", rows, {"idle_rss_kib": {"r22b": 1000}}, "full",
                            "2026-12-02T00:00:00+00:00", 12.34)
    assert summary["holds"] is False
    assert summary["held"] == ["registration_replay"] and summary["failed"] == ["binding_hijack"]
    check_summary(json.loads(json.dumps(summary)))
    all_held = build_summary("run-1", [_row("fuzz")], {}, "short", "now", 1.0)
    assert all_held["holds"] is True


def test_an_empty_suite_does_not_hold() -> None:
    assert build_summary("run-1", [], {}, "full", "now", 0.0)["holds"] is False


@pytest.mark.parametrize("damage", [
    lambda s: s.pop("rows"),
    lambda s: s["rows"][0].pop("rss_after_kib"),
    lambda s: s["rows"][0].update(holds=True),  # disagrees with refused = False
    lambda s: s.update(holds=True),
    lambda s: s.update(rows=[]),
])
def test_check_summary_refuses_a_damaged_summary(damage) -> None:
    summary = build_summary("run-1", [_row("fuzz", refused=False)], {}, "full", "now", 1.0)
    damage(summary)
    with pytest.raises(SummaryError):
        check_summary(summary)


def test_table_has_a_line_per_row_and_marks_failures() -> None:
    rows = [_row("registration_replay").as_dict(), _row("fuzz", alive=False).as_dict()]
    text = table(rows).splitlines()
    assert len(text) == 2 + len(rows)
    assert text[2].startswith("registration_replay") and " yes " in text[2]
    assert text[3].startswith("fuzz") and " NO " in text[3]
    assert "1.1" in text[2]  # 1100 KiB after, in MiB


def test_catalog_order_covers_every_class_once() -> None:
    names = [c.name for c in CLASSES]
    assert sorted(ORDER) == sorted(names) and len(set(names)) == len(names)
    assert set(SHORT) <= set(ORDER)
    assert ORDER[-1] == "wire_secrets"  # after every capture is complete
    for required in ("registration_replay", "forged_authenticators", "binding_hijack",
                     "foa_impersonation", "advertisement_spoofing", "forged_in_band",
                     "flood_tcp_4340", "flood_udp_434", "flood_icmp_9", "flood_udp_4340",
                     "flood_service_4341", "at_most_once_poisoning", "wire_secrets", "fuzz"):
        assert required in names
    with pytest.raises(KeyError):
        by_name("nosuch")


def test_patent_topology_attacker_is_off_by_default_and_on_net_12_when_asked() -> None:
    assert ATTACKER_HOST not in PatentTopo().hosts()
    topo = PatentTopo(attacker="True")
    assert ATTACKER_HOST in topo.hosts() and ATTACKER_HOST in topo.networks[12].hosts
    assert str(topo.addresses(ATTACKER_HOST)[0]) == "10.12.0.66/24"
    assert topo.nodeInfo(ATTACKER_HOST)["role"] == "attacker"
    assert topo.gateway(ATTACKER_HOST) == "10.12.0.1"
    with pytest.raises(TopologyParamError):
        PatentTopo(attacker="perhaps")
