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
