"""The pure parts of ``moat run leases`` (experiments/leases.py), without root: the plan from
the seed, the exactly-once and counter checks, lease moves (adoption), expiry and release
times from the samples, the event table, the summary and the report, the plots.

The network run itself is ``sudo moat run leases`` (it needs namespaces)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from experiments import leases as lx

T0 = 1000.0
P = "r18b/cnt@aaaa1111"
D = "r20a/cnt-d1@bbbb2222"


# --- the plan ---------------------------------------------------------------------------------


def test_plan_is_a_function_of_the_seed() -> None:
    assert lx.plan_cycles(3, 7) == lx.plan_cycles(3, 7)
    assert lx.plan_cycles(3, 7) != lx.plan_cycles(3, 8)


@pytest.mark.parametrize("seed", range(25))
def test_plan_shares_make_the_outcome_certain(seed: int) -> None:
    steps = lx.plan_cycles(4, seed)
    assert len(steps) == 4 * 5
    for cycle in range(1, 5):
        by = {s.role: s for s in steps if s.cycle == cycle}
        a, b, c, d, e = (by[r].share for r in "ABCDE")
        assert a + b + c <= 100 - 1  # A, B and C fit the primary together
        assert a + b + c + d > 100 + 1  # D does not: the growth
        assert a + d <= 100 - 1  # A (taken over) and D fit one duplicate
        assert e > 100 - b - c + 1  # E asks more than the primary has left after A moved
        assert [by[r].expect for r in "ABCDE"] == ["adopted", "primary", "primary", "grows",
                                                   "denied"]
        assert {by[r].net for r in "AD"} == {"14"} and {by[r].net for r in "BCE"} == {"12"}
        assert by["A"].co != by["D"].co and by["B"].co != by["C"].co
        for s in by.values():
            assert s.cpu == pytest.approx(s.share / 100 * lx.VM_CPU, abs=1e-3)
            assert s.duration == (s.hold if s.end == "expire" else lx.CANCEL_DURATION_S)
            assert s.hold > lx.LOAD_MARGIN_S
        assert sorted(by[r].end for r in "BC") == ["cancel", "expire"]
        assert sorted(by[r].end for r in "AD") == ["cancel", "expire"]
        assert by["E"].at > by["D"].at + 2  # after the growth
    # Cycles do not overlap: the next one starts after every lease of this one has ended
    # (D's grant comes about 1.3 s late: the growth).
    for cycle in range(1, 4):
        ends = [s.at + s.hold + (1.5 if s.role == "D" else 0) for s in steps
                if s.cycle == cycle and s.role != "E"]
        nxt = min(s.at for s in steps if s.cycle == cycle + 1)
        assert nxt > max(ends)


@pytest.mark.parametrize("seed", range(10))
def test_the_duplicates_last_lease_ends_by_cancel_and_by_expiry_in_turn(seed: int) -> None:
    steps = lx.plan_cycles(4, seed)
    lasts = []
    for cycle in range(1, 5):
        a, d = (next(s for s in steps if s.cycle == cycle and s.role == r) for r in "AD")
        # D's grant is late by the growth (about 1.3 s): A must still end clearly apart.
        a_end, d_end = a.at + a.hold, d.at + 1.3 + d.hold
        assert abs(a_end - d_end) > 1.0
        lasts.append((a if a_end > d_end else d).end)
    assert lasts[0::2] == [lasts[0]] * 2 and lasts[1::2] == [lasts[1]] * 2
    assert {lasts[0], lasts[1]} == {"cancel", "expire"}


def test_plan_bounds() -> None:
    with pytest.raises(ValueError):
        lx.plan_cycles(0, 1)
    with pytest.raises(ValueError):
        lx.plan_cycles(lx.MAX_CYCLES + 1, 1)


# --- a synthetic run ------------------------------------------------------------------------------


def make_samples() -> list[dict[str, Any]]:
    """Every 0.25 s over 12 s: the primary always; the duplicate listed and bound in
    [5, 10); lease 1 (A) on the primary, moved to the duplicate at 5.0, cancelled at 8.0;
    lease 2 (B) on the primary until it expires at 9.0; lease 4 (D) on the duplicate from
    5.0 until it expires at 9.8."""
    samples = []
    for k in range(49):
        t = k * 0.25
        services = [{"service": lx.SERVICE, "instances": [
            {"instance_id": P, "router": "r18b", "part": "primary", "used_share": 60.0,
             "share": 100.0, "leases": 2}]}]
        bindings = [{"care_of_address": "10.12.0.1", "part": "primary", "gre_key": 1}]
        leases = []
        dup = 5.0 <= t < 10.0
        if dup:
            services[0]["instances"].append({"instance_id": D, "router": "r20a",
                                             "part": "duplicate", "used_share": 65.0,
                                             "share": 100.0, "leases": 2})
            bindings.append({"care_of_address": "10.14.0.1", "part": "duplicate",
                             "gre_key": 2})
        if 0.5 <= t < 8.0:
            leases.append({"lease_id": "L1", "instance": D if t >= 5.0 else P,
                           "remaining": 60.0 - t})
        if 1.0 <= t < 9.0:
            leases.append({"lease_id": "L2", "instance": P, "remaining": 9.0 - t})
        if 5.0 <= t < 9.75:
            leases.append({"lease_id": "L4", "instance": D, "remaining": 9.8 - t})
        samples.append(lx.sample_from(t, services, bindings, leases))
    return samples


def lease(n: int, role: str, co: str, net: str, iid: str | None, t: float, granted: float,
          request_ms: float, **more: Any) -> dict[str, Any]:
    row = {"n": n, "cycle": 1, "role": role, "co": co, "host": f"co{net}", "net": net,
           "share": 30.0, "cpu": 0.3, "hold": 6.0, "end": "expire", "duration": 6.0,
           "expect": {"A": "adopted", "B": "primary", "D": "grows", "E": "denied"}[role],
           "t_s": t, "request_ms": request_ms, "granted_at_s": granted,
           "outcome": "granted" if iid else "denied", "reason": None if iid else "no_capacity",
           "detail": None if iid else "the instance of 'count-svc' on the CO's own network "
                                      "is full, and the CO reaches no other",
           "instance_id": iid, "router": lx.router_of(iid), "lease_id": f"L{n}" if iid else None,
           "part": None}
    row.update(more)
    return row


def make_out() -> tuple[dict[str, Any], dict[Path, list[dict]], list[dict]]:
    """What execute() gathers, the load logs and the broker's growth history."""
    leases = [lease(1, "A", "co14-c", "14", P, 0.4, 0.41, 8.0, end="cancel",
                    ended="cancelled", ended_s=8.0),
              lease(2, "B", "co12", "12", P, 0.9, 0.91, 6.0),
              lease(4, "D", "co14", "14", D, 3.7, 5.0, 1300.0),
              lease(5, "E", "co12-b", "12", None, 6.5, 6.51, 7.0)]
    # Requests in serving order; each instance counts its own (the duplicate from the
    # primary's checkpoint, taken at 4.5 s).
    plan = [(1, t / 10) for t in range(10, 76, 5)] + [(2, t / 10) for t in range(12, 81, 4)] \
        + [(4, t / 10) for t in range(52, 90, 3)]
    plan.sort(key=lambda x: x[1])
    counts = {"r18b": 0, "r20a": None}
    logs: dict[Path, list[dict]] = {Path(f"/load-{n}"): [] for n in (1, 2, 4)}
    checkpoint_taken = False
    for seq, (n, t) in enumerate(plan, 1):
        if t >= 4.5 and not checkpoint_taken:
            counts["r20a"], checkpoint_taken = counts["r18b"], True
        router = "r20a" if n == 4 or (n == 1 and t >= 5.0) else "r18b"
        counts[router] += 1
        process = "d1" if router == "r20a" else "p1"
        logs[Path(f"/load-{n}")].append({
            "seq": seq, "sent": T0 + t, "replies": [{
                "at": T0 + t + (0.0015 if router == "r18b" and n == 1 else 0.0009),
                "served_by": router, "instance": process, "ok": True,
                "result": {"count": counts[router]}}]})
    out = {"t0": T0, "leases": leases, "samples": make_samples(), "sample_failures": 0,
           "settled": True,
           "loads": [{"n": n, "out": Path(f"/load-{n}")} for n in (1, 2, 4)]}
    growth = [{"at": T0 + 3.71, "service": lx.SERVICE, "from": P, "share": 30.0, "cpu": 0.3,
               "instance": D, "router": "r20a", "tried": [], "steps": [["x", 1.0]],
               "ms": 1290.0}]
    return out, logs, growth


@pytest.fixture()
def analysed() -> dict[str, Any]:
    out, logs, growth = make_out()
    return lx.analyse(out, growth, lambda path: logs[path], primary_count=None)


def test_exactly_once_with_a_lease_taken_over(analysed: dict[str, Any]) -> None:
    q = analysed["summary"]["requests"]
    assert q["sent"] == len(analysed["requests"]) > 40
    assert (q["once"], q["none"], q["more"], q["wrong_instance"], q["refused"]) == \
        (q["sent"], 0, 0, 0, 0)
    assert q["exact"] is True
    a = [r for r in analysed["requests"] if r["n"] == 1]
    assert {r["lease_router"] for r in a if r["sent_s"] < 4.9} == {"r18b"}
    assert {r["lease_router"] for r in a if r["sent_s"] > 5.6} == {"r20a"}
    # Around the move both routers may rightly answer.
    assert any(r["expected"] == "r18b,r20a" for r in a)


def test_exactly_once_counts_missing_double_wrong_and_refused() -> None:
    base = {"n": 1, "co": "co14", "net": "14", "lease_router": "r18b", "lease_part": "primary",
            "expected": "r18b", "phase": lx.ONE_BINDING, "ok": True}
    rows = [dict(base, answers=1, served_by="r18b"),
            dict(base, answers=0, served_by=None, ok=None),
            dict(base, answers=2, served_by="r18b,r20a"),
            dict(base, answers=1, served_by="r20a"),
            dict(base, answers=1, served_by="r18b", ok=False)]
    q = lx.exactly_once(rows)
    assert (q["sent"], q["once"], q["none"], q["more"]) == (5, 3, 1, 1)
    assert q["wrong_instance"] == 2 and q["refused"] == 1 and q["exact"] is False
    assert q["unanswered"] == {f"net 14 -> primary on r18b ({lx.ONE_BINDING})": 1}
    assert q["by_co"]["co14"] == {"once": 3, "none": 1, "more": 1}
    assert lx.exactly_once([])["exact"] is False


def test_leases_parts_moves_growth_and_ends(analysed: dict[str, Any]) -> None:
    by = {l["n"]: l for l in analysed["leases"]}
    assert by[1]["part"] == "primary" and by[1]["moved_to"] == "r20a" and by[1]["moved_s"] == 5.0
    assert by[1]["final_instance"] == D
    assert by[4]["part"] == "duplicate" and by[4]["grew"] and by[4]["growth_ms"] == 1290.0
    assert not by[2].get("grew") and not by[2].get("moved_to")
    # Expiry at the broker's time: the last sample that saw it plus its remaining.
    assert by[2]["ended"] == "expired" and by[2]["ended_s"] == pytest.approx(9.0)
    assert by[4]["ended"] == "expired" and by[4]["ended_s"] == pytest.approx(9.8)
    assert all(lx.as_planned(l) for l in analysed["leases"])
    ls = analysed["summary"]["leases"]
    assert (ls["granted"], ls["denied"], ls["moved"], ls["grew"]) == (3, 1, 1, 1)
    assert ls["denials"] == {"no_capacity": 1} and ls["as_planned"] == 4


def test_growth_and_release_figures(analysed: dict[str, Any]) -> None:
    (g,) = analysed["growths"]
    assert g["n"] == 4 and g["growth_ms"] == 1290.0 and g["router"] == "r20a"
    assert g["ordinary_ms"] == 7.0 and g["ratio"] == pytest.approx(1300.0 / 7.0, abs=0.1)
    assert g["binding_s"] == pytest.approx(5.0 - 3.7)
    assert g["first_answer_ms"] == pytest.approx((5.2009 - 3.7) * 1000, abs=1)
    (r,) = analysed["releases"]
    assert r["instance"] == D and r["leases"] == 2 and r["last_end"] == "expired"
    assert r["binding_gone_s"] == 10.0 and r["release_ms"] == pytest.approx(200.0)
    assert r["directory_gone_s"] == 10.0
    s = analysed["summary"]
    assert s["release_ms_max"] == pytest.approx(200.0)
    assert s["releases"] == {"total": 1, "by": {"expired": 1}}
    assert s["growth_ms_median"] == 1290.0 and s["max_bindings"] == 2


def test_counters_per_instance(analysed: dict[str, Any]) -> None:
    prim, dup = analysed["instances"]
    assert prim["served_by"] == "r18b" and prim["first"] == 1 and prim["consistent"]
    assert dup["served_by"] == "r20a" and dup["part"] == "duplicate"
    assert dup["checkpoint"] == dup["first"] - 1 and dup["checkpoint_ok"] and dup["consistent"]
    lo, hi = dup["checkpoint_bounds"]
    assert lo <= dup["checkpoint"] <= hi
    assert analysed["summary"]["counters_consistent"] is True


def test_counters_catch_a_repeated_count_and_a_wrong_checkpoint() -> None:
    def q(t: float, by: str, count: int) -> dict[str, Any]:
        return {"answers": 1, "ok": True, "count": count, "served_by": by,
                "instance": by + "-p", "first_at_s": t}

    growths = [{"start_s": 2.0, "end_s": 3.0}]
    rows = [q(1, "r18b", 1), q(2.5, "r18b", 2), q(3.5, "r18b", 2), q(4, "r20a", 9)]
    prim, dup = lx.instance_rows(rows, growths)
    assert not prim["distinct"] and not prim["consistent"]
    assert dup["checkpoint"] == 8 and dup["checkpoint_bounds"] == [1, 2]
    assert dup["checkpoint_ok"] is False and not dup["consistent"]


def test_latency_groups_by_network_instance_and_bindings(analysed: dict[str, Any]) -> None:
    lat = {(r["net"], r["instance"], r["phase"]): r for r in analysed["summary"]["latency"]}
    assert lat[("14", "primary (r18b)", lx.ONE_BINDING)]["rtt_ms_median"] == pytest.approx(1.5)
    assert lat[("14", "duplicate (r20a)", lx.TWO_BINDINGS)]["rtt_ms_median"] == \
        pytest.approx(0.9)
    rtt = analysed["summary"]["rtt_ms"]
    assert rtt["net14_to_primary"] == pytest.approx(1.5)
    assert rtt["net14_to_duplicate"] == pytest.approx(0.9)
    assert rtt["net12_to_primary"] == pytest.approx(0.9)


def test_event_table_in_time_order(analysed: dict[str, Any]) -> None:
    events = analysed["events"]
    assert [e["t_s"] for e in events] == sorted(e["t_s"] for e in events)
    names = [e["event"] for e in events]
    for expected in ("lease A -> primary", "lease D -> duplicate", "growth", "lease A moved",
                     "binding at the HOA", "instance listed by the broker", "lease E denied",
                     "lease A cancelled", "lease B expired", "lease D expired", "binding gone",
                     "instance left the directory", "first answer from the duplicate"):
        assert expected in names, expected
    moved = next(e for e in events if e["event"] == "lease A moved")
    assert moved["t_s"] == 5.0 and moved["instance"] == D
    gone = next(e for e in events if e["event"] == "binding gone")
    assert gone["t_s"] == 10.0 and "duplicate via 10.14.0.1" in gone["detail"]
    cancelled = next(e for e in events if e["event"] == "lease A cancelled")
    assert cancelled["instance"] == D  # where it ended: the duplicate took it over
    denied = next(e for e in events if e["event"] == "lease E denied")
    assert "no_capacity" in denied["detail"] and "reaches no other" not in denied["detail"]


def test_report_and_summary_rows(analysed: dict[str, Any]) -> None:
    full = dict(analysed)
    text = lx.format_report(analysed["events"], full)
    assert "every request answered exactly once by its lease's instance: True" in text
    assert "growths:" in text and "releases:" in text and "round trips at the COs:" in text
    rows = {r["what"]: r["value"] for r in lx.summary_rows(analysed["summary"])}
    assert rows["unanswered"] == 0 and rows["growths (duplicates placed)"] == 1
    assert rows["leases as the plan expected"] == "4 of 4"
    assert rows["leases taken over by a duplicate on the CO's network"] == 1


def test_report_names_unanswered_requests() -> None:
    out, logs, growth = make_out()
    for record in logs[Path("/load-1")][-3:]:
        record["replies"] = []
    full = lx.analyse(out, growth, lambda path: logs[path])
    text = lx.format_report(full["events"], full)
    assert "every request answered exactly once by its lease's instance: False" in text
    assert "unanswered: net 14 -> duplicate on r20a" in text


def test_sample_rows_one_per_instance_with_bindings() -> None:
    samples = make_samples()
    rows = lx.sample_rows(samples)
    at6 = [r for r in rows if r["t_s"] == 6.0]
    assert {r["instance"] for r in at6} == {P, D}
    assert all(r["bindings"] == 2 and r["binding_parts"] == "primary,duplicate" for r in at6)
    assert set(lx.SAMPLE_COLUMNS) <= set(at6[0])


def test_phase_from_the_latest_sample() -> None:
    bound = lx.duplicate_bound(make_samples())
    assert lx.phase_at(bound, -1.0) == lx.ONE_BINDING
    assert lx.phase_at(bound, 4.99) == lx.ONE_BINDING
    assert lx.phase_at(bound, 5.1) == lx.TWO_BINDINGS
    assert lx.phase_at(bound, 10.1) == lx.ONE_BINDING


def test_plots(analysed: dict[str, Any], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out, _, _ = make_out()
    paths = lx.plot_all(analysed["requests"], analysed, out["samples"], tmp_path)
    assert [p.name for p in paths] == ["shares.png", "bindings.png", "latency.png"]
    assert all(p.stat().st_size > 10_000 for p in paths)


def test_parser_refuses_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--cycles", "0"], ["--rate", "0"], ["--topo", "scale"]):
        with pytest.raises(SystemExit):
            lx.main(argv)
    args = lx.build_parser().parse_args([])
    assert (args.cycles, args.rate, args.seed, args.topo) == (3, 20.0, 1, "patent")
    plan = [dataclasses.asdict(s) for s in lx.plan_cycles(args.cycles, args.seed)]
    assert len(plan) == 15
