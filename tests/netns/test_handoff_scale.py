"""The handoff experiment on the scale topology (issue 15, item 5), short: the object moves
home -> the first foreign network -> the last -> home, with its state, every move made, each
of the three corresponding objects hearing it after every move."""

from __future__ import annotations

from experiments.handoff import build_parser, run


def test_short_handoff_between_distant_foreign_networks(tmp_path) -> None:
    args = build_parser().parse_args(["--topo", "scale,n_foreign=4,routers_per_net=2", "--rate", "50",
                                      "--rounds", "1", "--dwell", "1.0", "--mode", "mbb",
                                      "--transfer", "precopy", "--adv-interval", "0.5",
                                      "--results", str(tmp_path)])
    summary = run(args)["summary"]
    rows = summary["handoffs"]
    assert summary["itinerary"] == ["r101b", "r104b", "r22c"]
    assert [r["to"] for r in rows] == ["r101b", "r104b", "r22c"] and all(r["ok"] for r in rows), rows
    # Registered through each foreign network's FOA (its border router's LAN address).
    assert [r["care_of"] for r in rows[:2]] == ["10.101.0.1", "10.104.0.1"], rows
    mbb = summary["modes"]["make-before-break"]
    assert set(mbb["by_co"]) == {"co101", "co104", "dns23"}, mbb["by_co"]
    for row in rows:
        for co in ("co101", "co104", "dns23"):
            assert row[f"sent_{co}"] > 0 and row[f"disruption_ms_{co}"] is not None, (co, row)
    state = summary["state"]
    assert state["exact"] and state["object_count"] == state["final_count"], state
    assert summary["capture_events"]["foreign_lan_101"]["registration_requests"] > 0
