"""Pure parts of the provisioning benchmark."""

from experiments.bench_provision import summarise, vm_phases


def test_phases_from_vm_steps() -> None:
    steps = [["configured", 10.0], ["fetched (1439 bytes, 0 cached)", 10.15],
             ["resources sufficient", 10.151], ["verified and installed x 1.0 (signer k)", 10.153],
             ["initialised", 10.35]]
    got = vm_phases(steps)
    assert round(got["fetch_ms"]) == 150 and round(got["verify_ms"]) == 3 and round(got["start_ms"]) == 197


def test_summarise_median_and_worst() -> None:
    rows = [{"fetch_ms": 1.0}, {"fetch_ms": 3.0}, {"fetch_ms": 2.0}]
    assert summarise(rows) == {"fetch_ms": {"median": 2.0, "worst": 3.0}}


def test_first_answer_is_the_earliest_reply() -> None:
    from experiments.bench_provision import first_answer

    rows = [{"seq": 1, "replies": []}, {"seq": 2, "replies": [{"at": 5.2}]},
            {"seq": 3, "replies": [{"at": 5.1}, {"at": 5.3}]}]
    assert first_answer(rows) == 5.1
    assert first_answer([{"seq": 1, "replies": []}]) is None


def test_segments_follow_the_moments_in_order() -> None:
    """The router's moments, the sender's and co14's, in provisioning order, whatever order
    they were found in; a moment not known is skipped, not invented."""
    from experiments.bench_provision import moments, segments

    steps = [["configured", 10.002], ["fetched (9 bytes, 1 cached, kept session)", 10.010],
             ["resources sufficient", 10.011], ["verified and installed x 1.0", 10.014],
             ["initialised", 10.100]]
    timings = {"initialised": 10.100, "received": 10.001, "objects started": 10.090}
    at = moments(steps, timings, sent=10.0, answered=10.103, first=10.105)
    got = segments(at)
    assert list(got) == ["sent → received", "received → configured", "configured → fetched",
                         "fetched → verified", "verified → objects started",
                         "objects started → initialised", "initialised → answered",
                         "answered → first answer"]
    assert round(got["verified → objects started"]) == 76
    assert round(sum(got.values())) == 105


def test_side_by_side_gives_old_over_warm() -> None:
    from experiments.bench_provision import side_by_side

    stats = {"median": 100.0, "worst": 150.0}
    summary = {"old": {"cold": {"total_ms": stats}, "cached": {"total_ms": stats}},
               "warm": {"cold": {"total_ms": {"median": 40.0, "worst": 50.0}},
                        "cached": {"total_ms": {"median": 25.0, "worst": 30.0}}}}
    rows = side_by_side(summary)
    assert [(r["kind"], r["old/warm"]) for r in rows] == [("cold", 2.5), ("cached", 4.0)]
