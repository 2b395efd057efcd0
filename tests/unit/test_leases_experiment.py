"""The pure parts of ``moat run leases`` (experiments/leases.py), without root: the plan from
the seed (duplicate cycles up to three instances, and the secondaries phase), the
exactly-once and counter checks, lease moves (adoption by a duplicate, by the third instance
on the FOA in front of the primary; a part's leases served by its secondary through the
nesting), the HOA's bindings over time and each duplicate's own by care-of address, expiry
and release times from the samples, the event table, the summary and the report, the
captures' GRE counts, the plots.

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


def nominal_end(step: lx.Step) -> float:
    """When a lease of the plan ends: its hold counts from its grant, which a growth makes
    about GROWTH_DELAY_S late."""
    return step.at + step.hold + (lx.GROWTH_DELAY_S if step.expect == "grows" else 0.0)


@pytest.mark.parametrize("seed", range(25))
def test_plan_shares_make_the_outcome_certain(seed: int) -> None:
    steps = lx.plan_cycles(4, seed)
    assert len(steps) == 4 * 7
    for cycle in range(1, 5):
        by = {s.role: s for s in steps if s.cycle == cycle}
        a, b, c, d, e, f, h = (by[r].share for r in "ABCDEFH")
        assert a + b + c <= 100 - 1  # A, B and C fit the primary together
        assert a + b + c + d > 100 + 1  # D does not: the duplicate on r20a
        assert a + d <= 100 - 1  # A (taken over) and D fit one duplicate
        assert h <= 100 - b - c - 1  # H fits the primary beside B and C (A moved) ...
        assert h > 100 - a - d + 1  # ... and not the duplicate: it is on the primary
        assert e > 100 - b - c + 1  # E asks more than the primary has left after A moved
        # F fits neither the primary beside B, C and H nor the duplicate: the third instance.
        assert f > 100 - b - c - h + 1 and f > 100 - a - d + 1
        # r18a's instance takes over B and C; F then fits it (and the primary, which is one
        # hop further from the home network: r18a wins).
        assert f <= 100 - b - c - 1 and f <= 100 - h
        assert [by[r].expect for r in "ABCDHEF"] == ["adopted", "adopted", "adopted", "grows",
                                                     "primary", "denied", "grows"]
        assert {by[r].net for r in "AD"} == {"14"} and {by[r].net for r in "BCE"} == {"12"}
        assert by["H"].net == by["F"].net == "16" and {by["H"].co, by["F"].co} == \
            {"dns23", "site24"}
        assert by["A"].co != by["D"].co and by["B"].co != by["C"].co
        for s in by.values():
            assert s.cpu == pytest.approx(s.share / 100 * lx.VM_CPU, abs=1e-3)
            assert s.duration == (s.hold if s.end == "expire" else lx.CANCEL_DURATION_S)
            assert s.hold > lx.LOAD_MARGIN_S + 0.9  # every load sends a second or more
        assert [s.role for s in steps if s.cycle == cycle] == list("ABCDHEF")  # time order
        grown = by["D"].at + lx.GROWTH_DELAY_S
        assert by["H"].at >= grown and by["E"].at >= grown and by["F"].at > by["H"].at
        third = by["F"].at + lx.GROWTH_DELAY_S
        # A and D hold the duplicate until long after F's growth: F never fits it.
        assert min(nominal_end(by[r]) for r in "AD") > third + 1.0
        # B, C, F and H are served for a while with three instances.
        assert min(nominal_end(by[r]) for r in "BCFH") > third + 1.5
        # r18a's instance loses its last lease well before r20a's: 3 -> 2 -> 1.
        assert max(nominal_end(by[r]) for r in "BCF") + 1.0 < \
            max(nominal_end(by[r]) for r in "AD")
        assert sorted(by[r].end for r in "AD") == ["cancel", "expire"]
        assert {by[r].end for r in "BCF"} == {"cancel", "expire"}
    # Cycles do not overlap: the next one starts after every lease of this one has ended.
    for cycle in range(1, 4):
        ends = [nominal_end(s) for s in steps if s.cycle == cycle and s.role != "E"]
        nxt = min(s.at for s in steps if s.cycle == cycle + 1)
        assert nxt > max(ends) + 2.0


def test_the_third_instance_is_nearer_the_home_network_than_the_primary() -> None:
    """Why F's lease lands on r18a's instance: the broker ranks the instances that fit by
    routing hops from the CO's network, and r18a is the primary's gateway."""
    from topologies.patent import PatentTopo

    hops = PatentTopo().network_hops()["10.16.0.0/21"]
    assert hops[lx.GATEWAY] < hops[lx.PRIMARY]


@pytest.mark.parametrize("seed", range(10))
def test_the_duplicates_last_leases_end_by_cancel_and_by_expiry_in_turn(seed: int) -> None:
    steps = lx.plan_cycles(4, seed)
    lasts = []
    for cycle in range(1, 5):
        by = {s.role: s for s in steps if s.cycle == cycle}
        a, d = (nominal_end(by[r]) for r in "AD")
        # D's grant is late by the growth (about 1 s): A must still end clearly apart.
        assert abs(a - d) > 2.0
        last20 = max("AD", key=lambda r: nominal_end(by[r]))
        last18 = max("BCF", key=lambda r: nominal_end(by[r]))
        assert nominal_end(by[last18]) > max(nominal_end(by[r]) for r in "BCF"
                                             if r != last18) + 0.6
        assert by[last20].end != by[last18].end  # one release by cancel, one by expiry
        lasts.append(by[last20].end)
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
           "expect": {"A": "adopted", "B": "primary", "D": "grows", "E": "denied"}.get(role),
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
    assert s["releases"] == {"total": 1, "by": {"duplicate expired": 1}}
    assert r["kind"] == "duplicate" and r.get("part_back_s") is None
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
    assert "growths (duplicates and part moves):" in text and "releases:" in text
    assert "round trips at the COs:" in text and "before and after its lease moved" in text
    rows = {r["what"]: r["value"] for r in lx.summary_rows(analysed["summary"])}
    assert rows["unanswered"] == 0 and rows["growths (duplicates placed)"] == 1
    assert rows["part moves (secondaries placed)"] == 0
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
    # When they were sent, to set beside the event table (growths, releases).
    sent = [round(r["sent"] - T0, 2) for r in logs[Path("/load-1")][-3:]]
    assert f"(sent at {', '.join(f'{t:.2f}' for t in sent)} s)" in text
    key, = full["summary"]["requests"]["unanswered_at"]
    assert full["summary"]["requests"]["unanswered_at"][key] == pytest.approx(sent)


def test_sample_rows_one_per_instance_with_bindings() -> None:
    samples = make_samples()
    rows = lx.sample_rows(samples)
    at6 = [r for r in rows if r["t_s"] == 6.0]
    assert {r["instance"] for r in at6} == {P, D}
    assert all(r["bindings"] == 2 and r["binding_parts"] == "primary,duplicate" for r in at6)
    assert set(lx.SAMPLE_COLUMNS) <= set(at6[0])


def test_phase_from_the_latest_sample() -> None:
    bound = lx.hoa_bound(make_samples())
    assert lx.phase_at(bound, -1.0) == lx.ONE_BINDING
    assert lx.phase_at(bound, 4.99) == lx.ONE_BINDING
    assert lx.phase_at(bound, 5.1) == lx.TWO_BINDINGS
    assert lx.phase_at(bound, 10.1) == lx.ONE_BINDING
    assert lx.phase_at([(0.0, 1), (1.0, 3), (2.0, 2)], 1.5) == lx.THREE_BINDINGS
    assert lx.binding_counts(make_samples()) == [1, 2, 1]


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
    assert (args.cycles, args.rate, args.seed, args.topo, args.parts, args.traffic,
            args.return_under_load) == (3, 20.0, 1, "patent", True, True, True)
    assert lx.build_parser().parse_args(["--no-parts"]).parts is False
    assert lx.build_parser().parse_args(["--no-traffic"]).traffic is False
    assert lx.build_parser().parse_args(["--no-return-under-load"]).return_under_load is False
    plan = [dataclasses.asdict(s) for s in lx.plan(args.cycles, args.seed, args.parts,
                                                   args.return_under_load, args.traffic)]
    assert len(plan) == 3 * 7 + 2 + 4
    # The defaults stay well inside the run's time budget (setup and analysis add ~25 s):
    # under 2 minutes in all.
    assert lx.plan_end(lx.plan(args.cycles, args.seed)) < 90


# --- the secondaries phase -----------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(25))
def test_parts_plan_makes_the_outcome_certain(seed: int) -> None:
    steps = lx.plan(3, seed)
    cycles = [s for s in steps if s.target == lx.SERVICE and s.role not in lx.TRAFFIC_AT]
    before = [s for s in steps if s.target == lx.SERVICE]  # the cycles and the traffic phase
    parts = [s for s in steps if s.target == lx.PART]
    assert cycles == lx.plan_cycles(3, seed)  # the duplicate cycles as before
    assert [s.n for s in steps] == list(range(1, len(steps) + 1))
    by = {s.role: s for s in parts}
    assert sorted(by) == ["P", "Q", "R", "S"] and {s.cycle for s in parts} == {5}
    assert [by[r].expect for r in "PQSR"] == ["nested", "nested", "moves", "home"]
    p, q, s, r = (by[x] for x in "PQSR")
    assert p.co == "dns23" and p.net == "16"  # the home network: it will cross the nesting
    assert q.net == s.net == "14" and q.co != s.co and r.net == "12"
    assert p.share + q.share <= 100 - 1  # P and Q fit the part at home together
    assert p.share + q.share + s.share > 100 + 1  # S does not: the part moves
    assert s.share <= 100 - 1 and r.share <= 100 - 1  # S fits a fresh secondary
    assert sorted([p.end, q.end]) == ["cancel", "expire"] and r.end == "cancel"
    # The phase starts once every lease of the cycles and the traffic phase has ended (a
    # duplicate is released within 0.3 s), and the part moves long after: a part never
    # moves to a network where its object runs (r20a's duplicate must be gone).
    assert min(x.at for x in parts) >= lx.plan_end(before) + 1.0 - 1e-9
    assert s.at > lx.plan_end(before) + 3.0
    # Q ends before S; P's load runs on across the give-back (the default), into R's lease;
    # R asks well after S ended (the secondary released, the part back).
    s_end = s.at + lx.GROWTH_DELAY_S + s.hold
    assert q.at + q.hold < s_end - 1.0
    assert r.at > s_end + 2.5
    assert r.at + 0.5 < p.at + p.hold < r.at + r.hold
    quiet = {x.role: x for x in lx.plan(3, seed, across_return=False) if x.target == lx.PART}
    assert quiet["P"].at + quiet["P"].hold < s_end - 1.0  # without it P ends before S
    for x in parts:
        assert x.cpu == pytest.approx(x.share / 100 * lx.VM_CPU, abs=1e-3) and x.hold > 1.0


def test_the_parts_phase_can_be_left_out() -> None:
    assert lx.plan(2, 5, parts=False, traffic=False) == lx.plan_cycles(2, 5)
    only_traffic = lx.plan(2, 5, parts=False)
    assert only_traffic[:-2] == lx.plan_cycles(2, 5)
    assert [s.role for s in only_traffic[-2:]] == ["U", "T"]
    # Without the traffic phase the secondaries phase starts where it would have.
    parts = [s for s in lx.plan(2, 5, traffic=False) if s.target == lx.PART]
    assert parts[0].at == lx._plan_cycles(2, 5)[1] and parts[0].cycle == 3


@pytest.mark.parametrize("seed", range(10))
def test_the_home_load_may_run_across_the_give_back(seed: int) -> None:
    quiet = {s.role: s for s in lx.plan(1, seed, across_return=False) if s.target == lx.PART}
    loud = {s.role: s for s in lx.plan(1, seed) if s.target == lx.PART}
    assert {r: s for r, s in loud.items() if r != "P"} == \
        {r: s for r, s in quiet.items() if r != "P"}
    p, s, r = loud["P"], loud["S"], loud["R"]
    assert p.at + p.hold > s.at + lx.GROWTH_DELAY_S + s.hold + 2.5  # across the give-back
    assert r.at + 0.5 < p.at + p.hold < r.at + r.hold  # and into R's lease
    assert p.share + r.share <= 100 - 1  # both at home on the primary
    assert lx.plan(1, seed) == lx.plan(1, seed, across_return=True)  # the default


SEC = "r20a/pair-s1@cccc3333"
PRIM = "r18b/pair@aaaa1111"


def make_part_samples() -> list[dict[str, Any]]:
    """Every 0.25 s over 12.5 s: the primary (with the part, except in [4, 9.5)); the
    secondary listed in [3.75, 8.75), its nested binding at r18b in [3.75, 9.5); leases L11
    (P, home) on the primary until cancelled at 7.0, L12 (Q, net 14) on the primary until
    it expires at 7.5, L13 (S) on the secondary until cancelled at 8.5, L14 (R) on the
    primary in [11, 12)."""
    samples = []
    for k in range(51):
        t = k * 0.25
        home = not 4.0 <= t < 9.5
        services = [{"service": lx.SERVICE, "instances": [
            {"instance_id": PRIM, "router": "r18b", "part": "primary", "used_share": 70.0,
             "share": 100.0, "leases": 2, "objects": ["svc", "tally"] if home else ["svc"],
             "network": "10.12.0.0/24"}]}]
        if 3.75 <= t < 8.75:
            services[0]["instances"].append(
                {"instance_id": SEC, "router": "r20a", "part": "secondary", "used_share": 45.0,
                 "share": 100.0, "leases": 1, "objects": ["tally"], "network": "10.14.0.0/24"})
        bindings = [{"care_of_address": "10.12.0.1", "part": "primary", "gre_key": 1,
                     "network_prefix": "10.16.0.224/30"}]
        nested = {"pair": [{"home_address": "10.16.0.224", "care_of_address": "10.14.0.1",
                            "part": "secondary"}] if 3.75 <= t < 9.5 else []}
        leases = []
        if 0.25 <= t < 7.0:
            leases.append({"lease_id": "L11", "instance": PRIM, "remaining": 60 - t,
                           "target": "tally"})
        if 0.75 <= t < 7.5:
            leases.append({"lease_id": "L12", "instance": PRIM, "remaining": 7.5 - t,
                           "target": "tally"})
        if 3.75 <= t < 8.5:
            leases.append({"lease_id": "L13", "instance": SEC, "remaining": 60 - t,
                           "target": "tally"})
        if 11.0 <= t < 12.0:
            leases.append({"lease_id": "L14", "instance": PRIM, "remaining": 60 - t,
                           "target": "tally"})
        samples.append(lx.sample_from(t, services, bindings, leases, nested))
    return samples


#: (n, role, co, net, send times, RTT ms at home / away)
PART_LOADS = [(11, "P", "dns23", "16", [x / 10 for x in range(3, 66, 2)], 1.3, 1.7),
              (12, "Q", "co14", "14", [x / 10 for x in range(8, 70, 2)], 1.28, 0.8),
              (13, "S", "co14-b", "14", [x / 10 for x in range(40, 78, 2)], None, 0.75),
              (14, "R", "co12", "12", [x / 10 for x in range(111, 120, 2)], 0.8, None)]
#: The part stops on r18b at 3.8 s (the growth's step); the secondary serves from 3.85 s
#: (what it queued first); the part is back on r18b (a new process) from 9.3 s.
STOP, SERVES, BACK = 3.8, 3.85, 9.3


def make_part_out(give_back_stale: int = 0) -> tuple[dict[str, Any], dict[Path, list[dict]],
                                                    list[dict]]:
    """The secondaries phase as execute() gathers it: one counter (the part) across its
    processes; ``give_back_stale``: the part comes back that many counts behind."""
    leases = [lease(11, "P", "dns23", "16", PRIM, 0.2, 0.21, 4.0, end="cancel",
                    ended="cancelled", ended_s=7.0),
              lease(12, "Q", "co14", "14", PRIM, 0.7, 0.71, 3.5),
              lease(13, "S", "co14-b", "14", SEC, 2.0, 3.85, 1850.0, end="cancel",
                    ended="cancelled", ended_s=8.5),
              lease(14, "R", "co12", "12", PRIM, 11.0, 11.01, 3.0, end="cancel",
                    ended="cancelled", ended_s=12.0)]
    for row, expect in zip(leases, ("nested", "nested", "moves", "home")):
        row.update(target=lx.PART, expect=expect, cycle=4, address="10.16.0.224")
    sends = sorted((t, n, home, away) for n, _, _, _, ts, home, away in PART_LOADS for t in ts)
    logs: dict[Path, list[dict]] = {Path(f"/load-{n}"): [] for n, *_ in PART_LOADS}
    count = last_away = 0
    for seq, (t, n, home, away) in enumerate(sends, 1):
        if t < STOP or t >= BACK:
            router, process, rtt = "r18b", "t1" if t < STOP else "t2", home
            if t >= BACK and count == last_away:
                count -= give_back_stale
        else:
            router, process = "r20a", "s1"
            rtt = (SERVES - t) * 1000 + away if t < SERVES else away
        count += 1
        if router == "r20a":
            last_away = count
        logs[Path(f"/load-{n}")].append({
            "seq": seq, "sent": T0 + t, "replies": [{
                "at": T0 + t + rtt / 1000, "served_by": router, "instance": process,
                "ok": True, "result": {"count": count}}]})
    out = {"t0": T0, "leases": leases, "samples": make_part_samples(), "sample_failures": 0,
           "settled": True, "loads": [{"n": n, "out": Path(f"/load-{n}")} for n, *_ in PART_LOADS]}
    growth = [{"at": T0 + 2.0, "service": lx.SERVICE, "from": PRIM, "share": 45.0, "cpu": 0.45,
               "instance": SEC, "router": "r20a", "tried": [],
               "steps": [["asked 6 routers for room for part tally, 6 answered", 5.0],
                         ["secondary tally registered on r20a with the nested home agent",
                          1700.0],
                         ["tally stopped here with its final checkpoint (its address is now "
                          "tunnelled)", 1800.0],
                         ["secondary tally restored its state and serves", 1840.0]],
               "ms": 1845.0}]
    return out, logs, growth


@pytest.fixture()
def parts_run() -> dict[str, Any]:
    out, logs, growth = make_part_out()
    return lx.analyse(out, growth, lambda path: logs[path], part_count=None)


def test_the_parts_requests_exactly_once_across_the_nesting(parts_run: dict[str, Any]) -> None:
    q = parts_run["summary"]["requests"]
    assert q["sent"] == sum(len(ts) for *_, ts, _, _ in PART_LOADS)
    assert (q["once"], q["none"], q["more"], q["wrong_instance"], q["refused"]) == \
        (q["sent"], 0, 0, 0, 0)
    assert q["exact"] is True and q["by_object"] == {"tally": {"once": q["sent"]}}
    p = [r for r in parts_run["requests"] if r["n"] == 11]
    # P's lease stays on the primary's instance; the secondary serves it while away.
    assert {r["lease_router"] for r in p if r["sent_s"] < 3.2} == {"r18b"}
    assert {r["lease_router"] for r in p if 4.3 < r["sent_s"] < 6.9} == {"r20a"}
    assert {r["lease_part"] for r in p} == {"part", "secondary"}
    assert any(r["expected"] == "r18b,r20a" for r in p)
    # Moving: from the secondary's registration (less a sampling period) to its restore, by
    # the growth's steps; then away (the restore and the samples' nested binding).
    assert {r["phase"] for r in p if r["sent_s"] < 3.45} == {lx.PART_HOME}
    assert {r["phase"] for r in p if 3.45 <= r["sent_s"] <= 3.84} == {lx.PART_MOVING}
    assert {r["phase"] for r in p if r["sent_s"] > 3.84} == {lx.PART_AWAY}


def test_a_reply_from_the_secondary_while_the_part_is_home_is_wrong() -> None:
    out, logs, growth = make_part_out()
    record = next(r for r in logs[Path("/load-14")])  # R, long after the part came back
    record["replies"][0]["served_by"] = "r20a"
    full = lx.analyse(out, growth, lambda path: logs[path])
    assert full["summary"]["requests"]["wrong_instance"] == 1
    assert full["summary"]["requests"]["exact"] is False


def test_part_leases_moves_and_paths(parts_run: dict[str, Any]) -> None:
    by = {l["role"]: l for l in parts_run["leases"]}
    assert by["P"]["part"] == "primary" and by["P"]["moved_to"] == "r20a"
    assert by["P"]["moved_s"] == 3.75 and by["P"]["moved_instance"] == SEC
    assert by["P"]["moved_path"] == "nested: HOA -> r18b -> r20a"
    assert by["Q"]["moved_path"] == "its own network"
    # The broker's table keeps P and Q on the primary (no adoption for a secondary).
    assert by["P"]["final_instance"] == PRIM and by["Q"]["final_instance"] == PRIM
    assert by["S"]["part"] == "secondary" and by["S"]["grew"] and by["S"]["growth_ms"] == 1845.0
    assert not by["R"].get("moved_to") and by["R"]["part"] == "primary"
    assert by["Q"]["ended"] == "expired" and by["Q"]["ended_s"] == pytest.approx(7.5)
    assert all(lx.as_planned(l) for l in parts_run["leases"])
    ls = parts_run["summary"]["leases"]
    assert (ls["parts_moved"], ls["grew"], ls["nested"], ls["moved"]) == (1, 0, 2, 0)
    assert ls["on"] == {"primary": 3, "secondary": 1} and ls["of"] == {"tally": 4}


def test_part_move_release_and_give_back_figures(parts_run: dict[str, Any]) -> None:
    (g,) = parts_run["growths"]
    assert g["kind"] == "secondary" and g["n"] == 13 and g["growth_ms"] == 1845.0
    assert g["binding_s"] == pytest.approx(3.75 - 2.0)  # the nested binding, not the HOA's
    assert g["first_answer_ms"] == pytest.approx((4.0 + 0.00075 - 2.0) * 1000, abs=0.5)
    # P's and Q's requests queued by the warm secondary are answered first.
    assert g["first_served_ms"] == pytest.approx((SERVES - 2.0) * 1000, abs=1.5)
    assert g["others_rtt_ms_max"] >= 40  # sent at 3.8 s, answered at 3.85 s
    (r,) = parts_run["releases"]
    assert r["kind"] == "secondary" and r["instance"] == SEC and r["leases"] == 1
    assert r["last_end"] == "cancelled" and r["last_end_s"] == 8.5
    assert r["binding_gone_s"] == 9.5 and r["release_ms"] == pytest.approx(1000.0)
    assert r["directory_gone_s"] == 8.75 and r["part_back_s"] == 9.5
    s = parts_run["summary"]
    assert s["part_move_ms_median"] == 1845.0 and s["growth_ms_median"] is None
    assert s["part_release_ms_max"] == pytest.approx(1000.0) and s["release_ms_max"] is None
    assert s["part_back_ms_max"] == pytest.approx(1000.0)
    assert s["releases"]["by"] == {"secondary cancelled": 1}
    assert s["grant_ms"]["moving_median"] == 1850.0 and s["grant_ms"]["growing_median"] is None
    assert s["max_nested"] == 1 and s["max_bindings"] == 1


def test_the_parts_counts_are_one_sequence(parts_run: dict[str, Any]) -> None:
    rows = parts_run["instances"]
    assert [(i["served_by"], i["process"], i["part"]) for i in rows] == \
        [("r18b", "t1", "part"), ("r20a", "s1", "secondary"), ("r18b", "t2", "part")]
    assert all(i["object"] == "tally" and i["checkpoint_ok"] and i["consistent"] for i in rows)
    assert rows[1]["checkpoint"] == rows[0]["last"] and rows[2]["checkpoint"] == rows[1]["last"]
    pc = parts_run["summary"]["part_counts"]
    assert pc["one_sequence"] is True and pc["answers"] == rows[2]["last"]


def test_a_stale_give_back_and_a_wrong_final_count_are_caught() -> None:
    out, logs, growth = make_part_out(give_back_stale=3)
    full = lx.analyse(out, growth, lambda path: logs[path])
    back = full["instances"][-1]
    assert back["checkpoint"] == full["instances"][1]["last"] - 3 and not back["checkpoint_ok"]
    assert full["summary"]["part_counts"]["one_sequence"] is False
    assert full["summary"]["counters_consistent"] is False
    out, logs, growth = make_part_out()
    last = max(r["replies"][0]["result"]["count"] for r in logs[Path("/load-14")])
    assert lx.analyse(out, growth, lambda path: logs[path],
                      part_count=last)["summary"]["counters_consistent"] is True
    out, logs, growth = make_part_out()
    full = lx.analyse(out, growth, lambda path: logs[path], part_count=last - 1)
    assert full["instances"][-1]["object_count"] == last - 1
    assert full["summary"]["counters_consistent"] is False


def test_part_latency_before_and_after(parts_run: dict[str, Any]) -> None:
    lat = {(r["net"], r["instance"], r["phase"]): r for r in parts_run["summary"]["latency"]}
    assert lat[("16", "part (r18b)", lx.PART_HOME)]["rtt_ms_median"] == pytest.approx(1.3)
    assert lat[("16", "secondary (r20a)", lx.PART_AWAY)]["rtt_ms_median"] == pytest.approx(1.7)
    rtt = parts_run["summary"]["rtt_ms"]
    assert rtt["home_to_part"] == pytest.approx(1.3) and rtt["net12_to_part"] == pytest.approx(0.8)
    assert rtt["net14_to_part"] == pytest.approx(1.28)
    assert rtt["net14_to_secondary"] == pytest.approx(0.8, abs=0.06)  # Q's and S's
    moves = {m["role"]: m for m in parts_run["summary"]["moves"]}
    assert set(moves) == {"P", "Q"}
    assert (moves["P"]["before_ms"], moves["P"]["after_ms"]) == (pytest.approx(1.3),
                                                                 pytest.approx(1.7))
    assert (moves["Q"]["before_ms"], moves["Q"]["after_ms"]) == (pytest.approx(1.28),
                                                                 pytest.approx(0.8))
    assert moves["P"]["before"] == "part (r18b)" and moves["P"]["after"] == "secondary (r20a)"
    assert moves["P"]["path_after"].startswith("nested")


def test_adoption_latency_before_and_after(analysed: dict[str, Any]) -> None:
    (m,) = analysed["summary"]["moves"]
    assert m["role"] == "A" and m["object"] == "svc" and m["path_after"] == "HOA -> r20a"
    assert (m["before_ms"], m["after_ms"]) == (pytest.approx(1.5), pytest.approx(0.9))


def test_part_events(parts_run: dict[str, Any]) -> None:
    events = parts_run["events"]
    names = [e["event"] for e in events]
    for expected in ("lease P (tally) -> primary", "lease S (tally) -> secondary", "part move",
                     "nested binding at r18b", "lease P served by the secondary",
                     "lease Q served by the secondary", "primary no longer lists tally",
                     "first answer from the secondary", "lease S cancelled",
                     "nested binding gone", "primary lists tally again",
                     "instance left the directory"):
        assert expected in names, expected
    assert "binding at the HOA" in names and "binding gone" not in names  # HOA: one binding
    move = next(e for e in events if e["event"] == "part move")
    assert "tally moved to r20a (secondary)" in move["detail"]
    served = next(e for e in events if e["event"] == "lease P served by the secondary")
    assert "nested: HOA -> r18b -> r20a" in served["detail"]
    back = next(e for e in events if e["event"] == "primary lists tally again")
    assert back["t_s"] == 9.5
    assert names.count("first answer from the part") == 2  # at home, and at home again


def test_part_report_and_sample_rows(parts_run: dict[str, Any]) -> None:
    text = lx.format_report(parts_run["events"], parts_run)
    assert "every request answered exactly once by its lease's instance: True" in text
    rows = {r["what"]: r["value"] for r in lx.summary_rows(parts_run["summary"])}
    assert rows["part moves (secondaries placed)"] == 1
    assert rows["leases of the part served by the secondary (nested)"] == 2
    assert rows["part's counts one sequence across its moves"].startswith("True")
    at5 = [r for r in lx.sample_rows(make_part_samples()) if r["t_s"] == 5.0]
    assert {r["instance"] for r in at5} == {PRIM, SEC}
    assert all(r["nested"] == 1 and r["nested_care_of"] == "10.16.0.224@10.14.0.1" for r in at5)
    assert {r["objects"] for r in at5} == {"svc", "tally"}
    assert lx.part_address(parts_run["leases"]) == "10.16.0.224"


def test_part_history_and_stops() -> None:
    samples = make_part_samples()
    where = dict(lx.part_history(samples))
    assert where[3.5] is None and where[3.75] == SEC and where[9.0] == SEC  # listed or not
    assert where[9.5] is None
    _, _, growth = make_part_out()
    windows = lx.part_windows(growth, T0)
    assert windows == [(pytest.approx(2.0 + 1.7 - lx.SAMPLE_S), pytest.approx(3.84))]
    away = lx.part_away(samples)
    assert lx.part_phase(away, 3.6) == lx.PART_HOME  # the binding shows from the 3.75 sample
    assert lx.part_phase(away, 3.8) == lx.PART_AWAY and lx.part_phase(away, 9.6) == lx.PART_HOME
    assert lx.part_phase(away, 3.6, windows) == lx.PART_MOVING
    away = lx.part_away(samples, [(3.5, 3.6)])  # a move ending between two samples
    assert lx.part_phase(away, 3.59) == lx.PART_HOME and lx.part_phase(away, 3.61) == lx.PART_AWAY
    assert lx.part_windows([dict(growth[0], instance=None)], T0) == []  # a failed move
    assert lx.net_label("10.14.0.0/24") == "14" and lx.net_label("") == "?"


def test_gre_pairs_count_tunnelled_requests_to_the_part() -> None:
    lines = ["10.16.0.2,10.16.0.23\t10.12.0.1,10.16.0.224",
             "10.16.0.2,10.14.0.7\t10.12.0.1,10.16.0.224",
             "10.16.0.100,10.16.0.23\t10.14.0.1,10.16.0.224",
             "10.16.0.2,10.16.0.23\t10.12.0.1,10.16.0.100",  # to the object, not the part
             "10.16.0.224\t10.16.0.23",  # a reply, not tunnelled
             "garbage"]
    assert lx.gre_pairs(lines, "10.16.0.224") == {"10.16.0.100->10.14.0.1": 1,
                                                  "10.16.0.2->10.12.0.1": 2}


def test_part_plots(parts_run: dict[str, Any], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    paths = lx.plot_all(parts_run["requests"], parts_run, make_part_samples(), tmp_path)
    assert [p.name for p in paths] == ["shares.png", "bindings.png", "latency.png"]
    assert all(p.stat().st_size > 10_000 for p in paths)


# --- three instances: the third on the FOA in front of the primary ------------------------------

G = "r18a/pair-d2@dddd4444"
GATEWAY_CARE_OF = "10.255.0.2"  # r18a's second care-of address (its backbone address)


def make_three_samples() -> list[dict[str, Any]]:
    """Every 0.25 s over 14 s: the primary always (care-of 10.12.0.1); the duplicate on r20a
    (care-of 10.14.0.1) listed and bound in [5, 12); the third instance on r18a (care-of
    10.255.0.2) listed and bound in [8, 10.5). Leases: L1 (A, net 14) on the primary, taken
    over by r20a's at 5.0, cancelled at 9.0; L2 (B, net 12) on the primary, taken over by
    r18a's at 8.0, cancelled at 10.0; L4 (D) on r20a's from 5.0 until it expires at 11.9;
    L6 (F, home) on r18a's from 8.0 until it expires at 10.3; L7 (H, home) on the primary
    in [6, 12)."""
    samples = []
    for k in range(57):
        t = k * 0.25
        services = [{"service": lx.SERVICE, "instances": [
            {"instance_id": P, "router": "r18b", "part": "primary", "used_share": 60.0,
             "share": 100.0, "leases": 2, "objects": ["svc", "tally"],
             "network": "10.12.0.0/24"}]}]
        bindings = [{"care_of_address": "10.12.0.1", "part": "primary", "gre_key": 1}]
        if 5.0 <= t < 12.0:
            services[0]["instances"].append({"instance_id": D, "router": "r20a",
                                             "part": "duplicate", "used_share": 75.0,
                                             "share": 100.0, "leases": 2, "objects": ["svc"],
                                             "network": "10.14.0.0/24"})
            bindings.append({"care_of_address": "10.14.0.1", "part": "duplicate",
                             "gre_key": 2})
        if 8.0 <= t < 10.5:
            services[0]["instances"].append({"instance_id": G, "router": "r18a",
                                             "part": "duplicate", "used_share": 64.0,
                                             "share": 100.0, "leases": 2, "objects": ["svc"],
                                             "network": "10.12.0.0/24"})
            bindings.append({"care_of_address": GATEWAY_CARE_OF, "part": "duplicate",
                             "gre_key": 3})
        leases = []
        if 0.5 <= t < 9.0:
            leases.append({"lease_id": "L1", "instance": D if t >= 5.0 else P,
                           "remaining": 60.0 - t})
        if 1.0 <= t < 10.0:
            leases.append({"lease_id": "L2", "instance": G if t >= 8.0 else P,
                           "remaining": 60.0 - t})
        if 5.0 <= t < 11.75:
            leases.append({"lease_id": "L4", "instance": D, "remaining": 11.9 - t})
        if 8.0 <= t < 10.25:
            leases.append({"lease_id": "L6", "instance": G, "remaining": 10.3 - t})
        if 6.0 <= t < 12.0:
            leases.append({"lease_id": "L7", "instance": P, "remaining": 60.0 - t})
        samples.append(lx.sample_from(t, services, bindings, leases))
    return samples


#: (n, send times, RTT ms per router that serves it)
THREE_LOADS = {1: [x / 10 for x in range(10, 86, 5)],
               2: [x / 10 for x in range(12, 97, 4)],
               4: [x / 10 for x in range(52, 112, 3)],
               6: [x / 10 for x in range(82, 98, 2)],
               7: [x / 10 for x in range(62, 112, 4)]}


def three_router(n: int, t: float) -> str:
    """Who answers lease ``n``'s request sent at ``t``."""
    if n == 4 or (n == 1 and t >= 5.0):
        return "r20a"
    if n == 6 or (n == 2 and t >= 8.0):
        return "r18a"
    return "r18b"


def three_rtt(n: int, t: float, router: str) -> float:
    if n == 7:
        return 1.6 if 8.0 <= t < 10.5 else 1.2  # frames by key through r18a while 3 bound
    return {("r18b", 1): 1.5, ("r18b", 2): 0.7, ("r18a", 2): 0.5, ("r18a", 6): 1.1}.get(
        (router, n), 0.9)


def make_three_out() -> tuple[dict[str, Any], dict[Path, list[dict]], list[dict]]:
    leases = [lease(1, "A", "co14-c", "14", P, 0.4, 0.41, 8.0, end="cancel",
                    ended="cancelled", ended_s=9.0),
              lease(2, "B", "co12", "12", P, 0.9, 0.91, 6.0, end="cancel", ended="cancelled",
                    ended_s=10.0, expect="adopted"),
              lease(4, "D", "co14", "14", D, 3.7, 5.0, 1300.0),
              lease(5, "E", "co12-b", "12", None, 6.5, 6.51, 7.0),
              lease(7, "H", "dns23", "16", P, 5.8, 5.81, 5.0, expect="primary"),
              lease(6, "F", "site24", "16", G, 7.0, 8.0, 1000.0, expect="grows")]
    sends = sorted((t, n) for n, ts in THREE_LOADS.items() for t in ts)
    counts: dict[str, int] = {"r18b": 0}
    logs: dict[Path, list[dict]] = {Path(f"/load-{n}"): [] for n in THREE_LOADS}
    for seq, (t, n) in enumerate(sends, 1):
        for router, taken in (("r20a", 4.5), ("r18a", 7.5)):  # checkpoints of the primary
            if t >= taken and router not in counts:
                counts[router] = counts["r18b"]
        router = three_router(n, t)
        counts[router] += 1
        logs[Path(f"/load-{n}")].append({
            "seq": seq, "sent": T0 + t, "replies": [{
                "at": T0 + t + three_rtt(n, t, router) / 1000, "served_by": router,
                "instance": f"{router}-p", "ok": True, "result": {"count": counts[router]}}]})
    out = {"t0": T0, "leases": leases, "samples": make_three_samples(), "sample_failures": 0,
           "settled": True, "loads": [{"n": n, "out": Path(f"/load-{n}")} for n in THREE_LOADS]}
    growth = [{"at": T0 + 3.71, "service": lx.SERVICE, "from": P, "share": 30.0, "cpu": 0.3,
               "instance": D, "router": "r20a", "tried": [], "steps": [["x", 1.0]],
               "ms": 1290.0},
              {"at": T0 + 7.01, "service": lx.SERVICE, "from": P, "share": 33.0, "cpu": 0.33,
               "instance": G, "router": "r18a", "tried": [], "steps": [["x", 1.0]],
               "ms": 990.0}]
    return out, logs, growth


@pytest.fixture()
def three() -> dict[str, Any]:
    out, logs, growth = make_three_out()
    return lx.analyse(out, growth, lambda path: logs[path])


def test_three_bindings_at_the_hoa_and_how_they_go(three: dict[str, Any]) -> None:
    s = three["summary"]
    assert s["max_bindings"] == 3 and s["binding_counts"] == [1, 2, 3, 2, 1]
    assert s["care_of_bound"] == ["10.12.0.1 (primary)", "10.14.0.1 (duplicate)",
                                  "10.255.0.2 (duplicate)"]
    assert s["third_instances"] == 1 and s["max_instances"] == 3
    rel = {r["instance"]: r for r in three["releases"]}
    # r18a's: its last lease F expired at 10.3; its binding (and only its) left at 10.5.
    assert rel[G]["care_of"] == GATEWAY_CARE_OF and rel[G]["last_end"] == "expired"
    assert rel[G]["last_end_s"] == pytest.approx(10.3)
    assert rel[G]["binding_gone_s"] == 10.5 and rel[G]["bindings_after"] == 2
    assert rel[G]["release_ms"] == pytest.approx(200.0)
    # r20a's: D expired at 11.9, its binding left at 12.0; the HOA is back to one.
    assert rel[D]["care_of"] == "10.14.0.1" and rel[D]["bindings_after"] == 1
    assert rel[D]["release_ms"] == pytest.approx(100.0)
    rows = {r["what"]: r["value"] for r in lx.summary_rows(s)}
    assert rows["HOA bindings (max)"] == 3
    assert rows["HOA bindings over time"] == "1 -> 2 -> 3 -> 2 -> 1"
    assert rows["  of them third instances, on r18a in front of the primary"] == 1
    events = three["events"]
    came = next(e for e in events if e["event"] == "binding at the HOA"
                and GATEWAY_CARE_OF in e["detail"])
    assert came["t_s"] == 8.0 and "(3 bound)" in came["detail"]
    went = next(e for e in events if e["event"] == "binding gone"
                and GATEWAY_CARE_OF in e["detail"])
    assert went["t_s"] == 10.5 and "(2 bound)" in went["detail"]


def test_the_third_growth_and_its_takeover(three: dict[str, Any]) -> None:
    g = next(r for r in three["growths"] if r["router"] == "r18a")
    assert g["n"] == 6 and g["co"] == "site24" and g["care_of"] == GATEWAY_CARE_OF
    assert g["binding_s"] == pytest.approx(1.0)  # 8.0, from F's request at 7.0
    assert g["first_served_ms"] == pytest.approx((8.0005 - 7.0) * 1000, abs=1)  # B's, first
    assert next(r for r in three["growths"] if r["router"] == "r20a")["care_of"] == "10.14.0.1"
    by = {l["role"]: l for l in three["leases"]}
    assert by["B"]["moved_to"] == "r18a" and by["B"]["moved_s"] == 8.0
    assert by["B"]["moved_path"] == "its own network" and by["B"]["final_instance"] == G
    assert by["F"]["grew"] and by["F"]["part"] == "duplicate"
    assert by["H"]["part"] == "primary" and not by["H"].get("moved_to")
    assert all(lx.as_planned(l) for l in three["leases"])
    s = three["summary"]
    assert s["leases"]["moved"] == 2 and s["leases"]["grew"] == 2
    assert s["growth_ms_by_router"] == {"r18a": 990.0, "r20a": 1290.0}
    b_after = [t for t in THREE_LOADS[2] if t >= 8.0]
    assert s["takeover"]["r18a"] == {"leases": 1, "sent": len(b_after),
                                     "once_by_it": len(b_after)}
    assert s["takeover"]["r20a"]["leases"] == 1
    assert s["takeover"]["r20a"]["once_by_it"] == s["takeover"]["r20a"]["sent"] > 0
    q = s["requests"]
    assert q["exact"] is True and q["none"] == q["more"] == q["wrong_instance"] == 0
    # Each duplicate starts from the primary's checkpoint, r18a's too.
    rows = {i["served_by"]: i for i in three["instances"]}
    assert set(rows) == {"r18b", "r20a", "r18a"}
    assert all(i["checkpoint_ok"] and i["consistent"] for i in rows.values())
    assert rows["r18a"]["checkpoint"] > rows["r20a"]["checkpoint"]
    moves = {m["role"]: m for m in s["moves"]}
    assert moves["B"]["before"] == "primary (r18b)" and moves["B"]["after"] == "duplicate (r18a)"
    assert (moves["B"]["before_ms"], moves["B"]["after_ms"]) == (pytest.approx(0.7),
                                                                 pytest.approx(0.5))


def test_the_home_co_on_the_primary_while_three_are_bound(three: dict[str, Any]) -> None:
    s = three["summary"]
    h = s["home_on_primary"]
    three_bound = [t for t in THREE_LOADS[7] if 8.0 <= t < 10.5]
    assert h[lx.THREE_BINDINGS] == {"sent": len(three_bound),
                                    "once_by_primary": len(three_bound)}
    assert h[lx.TWO_BINDINGS]["sent"] == len(THREE_LOADS[7]) - len(three_bound)
    rtt = s["rtt_ms"]
    assert rtt["home_to_primary_three_bound"] == pytest.approx(1.6)
    assert rtt["home_to_primary_fewer_bound"] == pytest.approx(1.2)
    assert rtt["net12_to_gateway"] == pytest.approx(0.5)
    assert rtt["home_to_gateway"] == pytest.approx(1.1)
    assert rtt["net14_to_duplicate"] == pytest.approx(0.9)
    lat = {(r["net"], r["instance"], r["phase"]) for r in s["latency"]}
    assert ("16", "primary (r18b)", lx.THREE_BINDINGS) in lat
    assert ("12", "duplicate (r18a)", lx.THREE_BINDINGS) in lat
    rows = {r["what"]: r["value"] for r in lx.summary_rows(s)}
    assert f"{lx.THREE_BINDINGS}: {len(three_bound)} / {len(three_bound)}" in \
        rows["home COs on the primary: answered once by r18b / sent, by HOA bindings"]


def test_a_home_request_answered_by_two_instances_or_a_late_reply_are_caught() -> None:
    out, logs, growth = make_three_out()
    h = next(r for r in logs[Path("/load-7")] if r["sent"] - T0 >= 9.0)
    h["replies"].append(dict(h["replies"][0], served_by="r18a"))  # r18a answered it too
    b = next(r for r in logs[Path("/load-2")] if r["sent"] - T0 >= 9.0)
    b["replies"][0]["served_by"] = "r18b"  # the primary, a second after the takeover
    full = lx.analyse(out, growth, lambda path: logs[path])
    q = full["summary"]["requests"]
    assert q["more"] == 1 and q["wrong_instance"] == 2 and q["exact"] is False
    assert full["summary"]["home_on_primary"][lx.THREE_BINDINGS]["once_by_primary"] == \
        full["summary"]["home_on_primary"][lx.THREE_BINDINGS]["sent"] - 1
    t = full["summary"]["takeover"]["r18a"]
    assert t["once_by_it"] == t["sent"] - 1


def test_instance_bindings_tell_duplicates_apart_by_care_of_and_time() -> None:
    def sample(t: float, dups: list[tuple[str, str]]) -> dict[str, Any]:
        services = [{"service": lx.SERVICE, "instances": [
            {"instance_id": iid, "router": iid.split("/")[0], "part": "duplicate"}
            for iid, _ in dups]}]
        bindings = [{"care_of_address": "10.12.0.1", "part": "primary"}] + \
            [{"care_of_address": c, "part": "duplicate"} for _, c in dups]
        return lx.sample_from(t, services, bindings, [])

    d1, d2, g = "r20a/a@1", "r20a/b@2", "r18a/c@3"
    samples = [sample(0.0, []), sample(0.25, [(d1, "10.14.0.1")]),
               sample(0.5, [(d1, "10.14.0.1"), (g, GATEWAY_CARE_OF)]),
               sample(0.75, [(g, GATEWAY_CARE_OF)]), sample(1.0, []),
               sample(1.25, [(d2, "10.14.0.1")]), sample(1.5, [])]
    bound = lx.instance_bindings(samples)
    assert (bound[d1]["care_of"], bound[d1]["start"], bound[d1]["end"]) == \
        ("10.14.0.1", 0.25, 0.75)
    assert (bound[g]["care_of"], bound[g]["start"], bound[g]["end"]) == \
        (GATEWAY_CARE_OF, 0.5, 1.0)
    assert (bound[d2]["care_of"], bound[d2]["start"], bound[d2]["end"]) == \
        ("10.14.0.1", 1.25, 1.5)
    assert lx.binding_counts(samples) == [1, 2, 3, 2, 1, 2, 1]


def test_three_instance_plots(three: dict[str, Any], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    paths = lx.plot_all(three["requests"], three, make_three_samples(), tmp_path)
    assert [p.name for p in paths] == ["shares.png", "bindings.png", "latency.png"]
    assert all(p.stat().st_size > 10_000 for p in paths)


# --- the traffic phase: the rule places a duplicate near a CO's load -----------------------------


@pytest.mark.parametrize("seed", range(25))
def test_traffic_plan_makes_the_outcome_certain(seed: int) -> None:
    steps = lx.plan(3, seed)
    phase = [s for s in steps if s.role in lx.TRAFFIC_AT]
    cycles = [s for s in steps if s.target == lx.SERVICE and s.role not in lx.TRAFFIC_AT]
    parts = [s for s in steps if s.target == lx.PART]
    assert [s.role for s in phase] == ["U", "T"] and {s.cycle for s in phase} == {4}
    u, t = phase
    assert (u.net, t.net) == ("12", "14") and (u.expect, t.expect) == ("primary", "placed")
    assert (u.rate, t.rate) == (lx.TRAFFIC_LOW_RATE, lx.TRAFFIC_RATE)
    assert u.target == t.target == lx.SERVICE
    # Both fit the primary with room to spare: no lease grows the service.
    assert u.share + t.share <= 100 - 30
    rule = lx.TRAFFIC_RULE
    # T's load alone fills the window past min_requests, and T's share of what reaches the
    # primary is over the rule's share; U's network is the primary's own (never picked).
    assert t.rate * rule["window_s"] >= 1.3 * rule["min_requests"]
    assert t.rate / (t.rate + u.rate) >= rule["share"] + 0.05
    # T's load runs long enough for the rule to fire (its window filled, sampled every
    # second), the duplicate to start (about 0.7 s) and several seconds after.
    fire = t.at + 0.5 + rule["min_requests"] / t.rate + 1.0
    assert t.at + t.hold - lx.LOAD_MARGIN_S > fire + 1.5 + 3.0
    assert t.at + t.hold < u.at + u.hold  # T ends first: its duplicate goes, U stays on
    # The phase starts from the primary alone (the cycles' last duplicate released) and the
    # secondaries' after it (the rule's duplicate released: a part never moves beside it).
    assert min(s.at for s in phase) >= lx.plan_end(cycles) + 2.0 - 1e-9
    assert min(s.at for s in parts) >= lx.plan_end(phase) + 2.0 - 1e-9
    (rule_at, what), (restore_at, undo) = lx.traffic_schedule(steps)
    assert (what, undo) == ("rule", "restore")
    assert rule_at == u.at <= t.at and restore_at > max(s.at + s.hold for s in phase)
    assert restore_at < min(s.at for s in parts)
    assert lx.traffic_schedule(lx.plan(3, seed, traffic=False)) == []


def test_window_of_reads_the_placements_first_step() -> None:
    steps = [["most requests come from 10.14.0.0/24 through the home network: "
              "{'10.14.0.0/24': 129, '10.12.0.0/24': 27}", 4.4], ["reserved ...", 5.2]]
    assert lx.window_of(steps) == {"10.14.0.0/24": 129, "10.12.0.0/24": 27}
    assert lx.window_of([["most requests come from x: {not a dict", 1.0]]) == {}
    assert lx.window_of([["reserved 1 CPU", 1.0], []]) == {}


TD = "r20a/pair-d9@eeee5555"
#: The rule fires at 3.0 s, the duplicate serves from 3.7 (r20a's FOA delivers net 14's
#: requests to it), r18b records the placement at 3.75, the broker lists it at 4.0.
T_FIRE, T_SERVES, T_PLACED, T_LISTED = 3.0, 3.7, 3.75, 4.0
PLACEMENT = {"at": T0 + T_PLACED, "object": "svc", "network": lx.TRAFFIC_NETWORK, "router": "r20a",
             "steps": [["most requests come from 10.14.0.0/24 through the home network: "
                        "{'10.14.0.0/24': 130, '10.12.0.0/24': 27}", 4.4],
                       ["reserved 1 CPU, 256 MiB on r20a", 5.2],
                       ["took the primary's checkpoint (it serves on)", 5.8],
                       ["duplicate serves on r20a, registered with S", 750.0]]}
DEFAULT_RULE = {"window_s": 5.0, "min_requests": 200, "share": 0.75, "cooldown_s": 30.0,
                "enabled": True}
ACTIONS = [{"t_s": 0.25, "what": "rule",
            "result": dict(lx.TRAFFIC_RULE, enabled=True, before=DEFAULT_RULE)},
           {"t_s": 11.5, "what": "restore", "result": DEFAULT_RULE}]


def make_traffic_samples() -> list[dict[str, Any]]:
    """Every 0.25 s over 12 s: the primary always; the rule's duplicate on r20a listed and
    bound (care-of 10.14.0.1) in [4, 9). L21 (U, net 12) on the primary until it expires at
    11.0; L22 (T, net 14) on the primary from 0.5, taken over by the duplicate at 4.0,
    cancelled at 8.9."""
    samples = []
    for k in range(49):
        t = k * 0.25
        services = [{"service": lx.SERVICE, "instances": [
            {"instance_id": P, "router": "r18b", "part": "primary", "used_share": 55.0,
             "share": 100.0, "leases": 2, "objects": ["svc", "tally"],
             "network": "10.12.0.0/24"}]}]
        bindings = [{"care_of_address": "10.12.0.1", "part": "primary", "gre_key": 1}]
        if T_LISTED <= t < 9.0:
            services[0]["instances"].append({"instance_id": TD, "router": "r20a",
                                             "part": "duplicate", "used_share": 38.0,
                                             "share": 100.0, "leases": 1, "objects": ["svc"],
                                             "network": "10.14.0.0/24"})
            bindings.append({"care_of_address": "10.14.0.1", "part": "duplicate",
                             "gre_key": 2})
        leases = []
        if 0.25 <= t < 11.0:
            leases.append({"lease_id": "L21", "instance": P, "remaining": 11.0 - t})
        if 0.5 <= t < 8.9:
            leases.append({"lease_id": "L22", "instance": TD if t >= T_LISTED else P,
                           "remaining": 60.0 - t})
        samples.append(lx.sample_from(t, services, bindings, leases))
    return samples


def make_traffic_out(placements: bool = True, shift: int = 0) -> tuple[
        dict[str, Any], dict[Path, list[dict]], list[dict]]:
    """The traffic phase as execute() gathers it, the load logs and r18b's placements (the
    broker's growth history is empty: no lease asked); ``shift``: the duplicate's counts off
    its checkpoint by that much."""
    leases = [lease(21, "U", "co12-b", "12", P, 0.25, 0.26, 2.5, expect="primary", rate=10.0),
              lease(22, "T", "co14-c", "14", P, 0.5, 0.51, 2.6, expect="placed", rate=60.0,
                    end="cancel", ended="cancelled", ended_s=8.9)]
    for row in leases:
        row["cycle"] = 4
    sends = sorted([(x / 10, 21) for x in range(3, 106)] + [(x / 20, 22) for x in range(16, 161)])
    counts: dict[str, int] = {"r18b": 0}
    logs: dict[Path, list[dict]] = {Path("/load-21"): [], Path("/load-22"): []}
    for seq, (t, n) in enumerate(sends, 1):
        if t >= T_FIRE + 0.0058 and "r20a" not in counts:  # the checkpoint (r18b's steps)
            counts["r20a"] = counts["r18b"] + shift
        router = "r20a" if n == 22 and t >= T_SERVES else "r18b"
        counts[router] += 1
        rtt = 0.7 if n == 21 else 1.0 if router == "r18b" else 0.6
        logs[Path(f"/load-{n}")].append({
            "seq": seq, "sent": T0 + t, "replies": [{
                "at": T0 + t + rtt / 1000, "served_by": router, "instance": f"{router}-p",
                "ok": True, "result": {"count": counts[router]}}]})
    out = {"t0": T0, "leases": leases, "samples": make_traffic_samples(), "sample_failures": 0,
           "settled": True, "actions": ACTIONS,
           "loads": [{"n": n, "out": Path(f"/load-{n}")} for n in (21, 22)]}
    return out, logs, [PLACEMENT] if placements else []


@pytest.fixture()
def traffic() -> dict[str, Any]:
    out, logs, placements = make_traffic_out()
    return lx.analyse(out, [], lambda path: logs[path], placements=placements)


def test_placement_rows_time_the_rule_from_the_routers_steps() -> None:
    (p,) = lx.placement_rows([PLACEMENT], T0)
    assert p["window"] == {"10.14.0.0/24": 130, "10.12.0.0/24": 27}
    assert p["window_total"] == 157 and p["window_share"] == pytest.approx(130 / 157, abs=1e-3)
    assert p["placed_s"] == pytest.approx(T_PLACED) and p["placement_ms"] == 750.0
    assert p["trigger_s"] == pytest.approx(T_FIRE) and p["checkpoint_ms"] == 5.8
    # Without a "duplicate serves" step, the last step's time.
    (q,) = lx.placement_rows([dict(PLACEMENT, steps=PLACEMENT["steps"][:3])], T0)
    assert q["trigger_s"] == pytest.approx(T_PLACED - 0.0058, abs=1e-3)


def test_the_rules_duplicate_takes_over_t_exactly_once(traffic: dict[str, Any]) -> None:
    q = traffic["summary"]["requests"]
    assert q["exact"] is True and q["sent"] == 103 + 145
    by = {l["role"]: l for l in traffic["leases"]}
    assert by["T"]["moved_to"] == "r20a" and by["T"]["moved_s"] == T_LISTED
    assert by["T"]["final_instance"] == TD and not by["T"]["grew"]
    assert not by["U"].get("moved_to") and by["U"]["ended"] == "expired"
    assert all(lx.as_planned(l) for l in traffic["leases"])
    assert traffic["summary"]["leases"]["grew"] == 0 and traffic["growths"] == []
    # T's requests answered by r20a before the broker listed it (its FOA delivered them
    # there first) are within the move's slack: not another instance's.
    early = [r for r in traffic["requests"] if r["n"] == 22 and T_SERVES <= r["sent_s"] < T_LISTED]
    assert early and all(r["served_by"] == "r20a" and "r20a" in r["expected"] for r in early)


def test_the_traffic_figures(traffic: dict[str, Any]) -> None:
    t = traffic["summary"]["traffic"]
    assert t["rule"] == dict(lx.TRAFFIC_RULE, enabled=True)
    assert t["rule_before"] == t["rule_restored"] == DEFAULT_RULE
    assert (t["rule_set_s"], t["rule_restored_s"]) == (0.25, 11.5)
    assert t["placements"] == 1 and t["router"] == "r20a" and t["network"] == lx.TRAFFIC_NETWORK
    assert t["window"] == {"10.14.0.0/24": 130, "10.12.0.0/24": 27} and t["window_total"] == 157
    assert t["trigger_s"] == pytest.approx(T_FIRE) and t["placement_ms"] == 750.0
    assert t["load_to_trigger_ms"] == pytest.approx((T_FIRE - 0.8) * 1000)
    assert t["trigger_to_first_answer_ms"] == pytest.approx((T_SERVES + 0.0006 - T_FIRE) * 1000,
                                                            abs=0.2)
    assert t["trigger_to_binding_ms"] == t["trigger_to_lease_moved_ms"] == \
        pytest.approx((T_LISTED - T_FIRE) * 1000)
    assert (t["rtt_before_ms"], t["rtt_after_ms"]) == (pytest.approx(1.0), pytest.approx(0.6))
    assert t["before"] == "primary (r18b)" and t["after"] == "duplicate (r20a)"
    assert t["path_after"] == "its own network" and t["growths_asked"] == 0
    assert (t["sent"], t["once"]) == (145, 145) and t["co"] == "co14-c" and t["rate"] == 60.0
    assert t["others"] == {"sent": 103, "once": 103, "served_by": ["r18b"]}
    assert t["instance"] == TD and t["last_end"] == "cancelled"
    assert t["release_ms"] == pytest.approx(100.0) and t["binding_care_of"] == "10.14.0.1"
    rows = {r["what"]: r["value"] for r in lx.summary_rows(traffic["summary"])}
    assert rows["traffic rule on r18b in the phase: window s, min requests, share, cooldown s"] \
        == "3, 120, 0.75, 30"
    assert rows["  restored after the phase to"] == "5, 200, 0.75, 30"
    assert rows["  duplicates it placed / growths a lease asked for meanwhile"] == "1 (on r20a) / 0"
    assert rows["  window when it fired: requests by source network"].startswith(
        "10.14.0.0/24 130, 10.12.0.0/24 27 (83 % from 10.14.0.0/24")
    assert rows["  T's RTT ms before (net 14 -> primary) / after (-> duplicate, its own network)"] \
        == "1.0 / 0.6"
    assert rows["  T's requests answered once / sent"] == "145 / 145"
    assert rows["HOA bindings over time"] == "1 -> 2 -> 1"


def test_traffic_events(traffic: dict[str, Any]) -> None:
    events = traffic["events"]
    assert [e["t_s"] for e in events] == sorted(e["t_s"] for e in events)
    by = {e["event"]: e for e in events}
    assert by["traffic rule set on r18b"]["t_s"] == 0.25
    assert "min_requests 120" in by["traffic rule set on r18b"]["detail"]
    assert by["traffic rule fired"]["t_s"] == T_FIRE
    assert by["traffic rule fired"]["detail"] == \
        "window: 10.14.0.0/24 130, 10.12.0.0/24 27 (83 % from 10.14.0.0/24)"
    placed = by["traffic rule placed a duplicate"]
    assert placed["t_s"] == T_PLACED and placed["instance"] == "r20a"
    assert "no lease asked" in placed["detail"] and "750 ms" in placed["detail"]
    assert by["lease T moved"]["t_s"] == T_LISTED and by["lease T moved"]["instance"] == TD
    assert by["binding at the HOA"]["t_s"] == T_LISTED
    assert by["binding gone"]["t_s"] == 9.0
    assert by["traffic rule restored on r18b"]["t_s"] == 11.5
    assert "growth" not in by  # the broker grew nothing
    names = [e["event"] for e in events]
    assert names.index("traffic rule fired") < names.index("first answer from the duplicate") \
        < names.index("traffic rule placed a duplicate") < names.index("lease T moved")


def test_the_rules_duplicate_starts_from_the_checkpoint_taken_after_it_fired(
        traffic: dict[str, Any]) -> None:
    rows = {i["served_by"]: i for i in traffic["instances"]}
    dup = rows["r20a"]
    lo, hi = dup["checkpoint_bounds"]
    assert lo <= dup["checkpoint"] <= hi and dup["checkpoint_ok"] and dup["consistent"]
    assert traffic["summary"]["counters_consistent"] is True
    out, logs, placements = make_traffic_out(shift=40)  # counts not from that checkpoint
    full = lx.analyse(out, [], lambda path: logs[path], placements=placements)
    bad = next(i for i in full["instances"] if i["served_by"] == "r20a")
    assert bad["checkpoint_ok"] is False and full["summary"]["counters_consistent"] is False


def test_a_rule_that_never_fired_is_reported() -> None:
    out, logs, _ = make_traffic_out()
    full = lx.analyse(out, [], lambda path: logs[path], placements=[])
    t = full["summary"]["traffic"]
    assert t["placements"] == 0 and "trigger_s" not in t
    by = {l["role"]: l for l in full["leases"]}
    # T was expected to move to the rule's duplicate on r20a, and nowhere else.
    assert lx.as_planned(dict(by["T"], moved_to=None)) is False
    assert lx.as_planned(dict(by["T"], moved_to="r18a")) is False
    assert lx.as_planned(dict(by["T"], grew=True)) is False
    rows = {r["what"]: r["value"] for r in lx.summary_rows(full["summary"])}
    assert rows["  duplicates it placed / growths a lease asked for meanwhile"] == "0 / 0"
    assert rows["  window when it fired: requests by source network"] is None
    assert "duplicates placed by the traffic rule" not in lx.format_report(full["events"], full)


def test_no_traffic_phase_no_traffic_figures(analysed: dict[str, Any]) -> None:
    assert analysed["summary"]["traffic"] == {} and analysed["placements"] == []
    assert not any(r["what"].startswith("traffic rule") for r in
                   lx.summary_rows(analysed["summary"]))


def test_traffic_report(traffic: dict[str, Any]) -> None:
    text = lx.format_report(traffic["events"], traffic)
    assert "duplicates placed by the traffic rule" in text
    assert "10.14.0.0/24 130, 10.12.0.0/24 27 (83 % from 10.14.0.0/24)" in text
    assert "every request answered exactly once by its lease's instance: True" in text
    # The report from summary.json's document (its placements under traffic_placements).
    doc = {k: traffic[k] for k in ("growths", "releases", "instances", "summary")}
    doc["traffic_placements"] = traffic["placements"]
    assert "duplicates placed by the traffic rule" in lx.format_report(traffic["events"], doc)


def test_rule_actions_set_and_restore_the_rule_on_the_primary() -> None:
    class Client:
        def __init__(self) -> None:
            self.rule = dict(DEFAULT_RULE)
            self.calls: list[tuple[str, str, dict]] = []

        def call(self, router: str, cmd: str, **args: Any) -> dict[str, Any]:
            self.calls.append((router, cmd, args))
            self.rule.update(args)
            return dict(self.rule)

    client = Client()
    act = lx.RuleActions(client)
    set_ = act("rule")
    assert set_["before"] == DEFAULT_RULE and set_["min_requests"] == 120
    assert client.calls[1] == ("r18b", "traffic_rule", lx.TRAFFIC_RULE)
    assert act("restore") == DEFAULT_RULE and client.rule == DEFAULT_RULE
    with pytest.raises(ValueError):
        act("nothing")


def test_traffic_plots(traffic: dict[str, Any], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    paths = lx.plot_all(traffic["requests"], traffic, make_traffic_samples(), tmp_path)
    assert [p.name for p in paths] == ["shares.png", "bindings.png", "latency.png"]
    assert all(p.stat().st_size > 10_000 for p in paths)
