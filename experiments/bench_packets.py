"""Micro-benchmark of the registration codec: how many messages per second one core handles.

    python -m experiments.bench_packets [--iterations N] [--repeats R] [--json]

The message is the Registration Request a mobile object sends through a foreign agent: fixed
part, MN-NAI, two NVSEs (care-of-name and object part) and HMAC-SHA-256 authenticators. Four
operations are timed:

* ``encode``          RegistrationRequest.encode() of that request (MH authenticator included
                      as a ready-made extension, no HMAC computed);
* ``decode``          RegistrationRequest.decode() of the signed bytes (MH + MF);
* ``encode+hmac``     encode the unsigned request, then append_auth() twice (MH, then MF);
* ``decode+verify``   decode the signed bytes, then verify_auth() for MH and for MF.

Each operation runs ``iterations`` times in a loop timed with time.perf_counter(); that is
repeated ``repeats`` times and the best and the median rate are reported. Rates are per
message, single-threaded, in this Python process; they measure the codec, not the network.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from typing import Callable, TextIO

from packets import (
    CareOfName,
    ExtType,
    NaiExtension,
    ObjectPart,
    PartRole,
    RegistrationRequest,
    RequestFlags,
    append_auth,
    verify_auth,
)
from packets.extensions import AuthExtension

DEFAULT_ITERATIONS = 20_000
DEFAULT_REPEATS = 5
MH_SPI, MF_SPI = 0x1000, 0x2000
KEYS = {MH_SPI: b"k" * 32, MF_SPI: b"f" * 32}


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo, or what platform knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware", "cpu model"):
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _request() -> RegistrationRequest:
    return RegistrationRequest(
        home_address="10.0.0.5",
        home_agent="10.0.0.1",
        care_of_address="192.0.2.1",
        identification=0xE8F1A2B300000001,
        lifetime=180,
        flags=RequestFlags.S | RequestFlags.G,
        extensions=[
            NaiExtension("object-42@home.example"),
            CareOfName("coa-7.foreign.example"),
            ObjectPart(PartRole.SECONDARY, 3, "service-9@home.example"),
        ],
    )


def operations() -> tuple[dict[str, Callable[[], object]], int]:
    """The timed operations, and the size in bytes of the signed request."""
    unsigned = _request()
    unsigned_wire = unsigned.encode()
    with_mh = append_auth(unsigned_wire, ExtType.MOBILE_HOME_AUTH, MH_SPI, KEYS[MH_SPI])
    signed = append_auth(with_mh, ExtType.MOBILE_FOREIGN_AUTH, MF_SPI, KEYS[MF_SPI])
    mh = RegistrationRequest.decode(with_mh).extensions[-1]
    assert isinstance(mh, AuthExtension)
    to_encode = _request()
    to_encode.extensions.append(mh)
    assert to_encode.encode() == with_mh

    def encode() -> bytes:
        return to_encode.encode()

    def decode() -> RegistrationRequest:
        return RegistrationRequest.decode(signed)

    def encode_hmac() -> bytes:
        wire = unsigned.encode()
        wire = append_auth(wire, ExtType.MOBILE_HOME_AUTH, MH_SPI, KEYS[MH_SPI])
        return append_auth(wire, ExtType.MOBILE_FOREIGN_AUTH, MF_SPI, KEYS[MF_SPI])

    def decode_verify() -> bool:
        msg = RegistrationRequest.decode(signed)
        ok = verify_auth(msg, ExtType.MOBILE_HOME_AUTH, KEYS)
        return verify_auth(msg, ExtType.MOBILE_FOREIGN_AUTH, KEYS) and ok

    assert encode_hmac() == signed and decode_verify()
    ops = {
        "encode": encode,
        "decode": decode,
        "encode+hmac": encode_hmac,
        "decode+verify": decode_verify,
    }
    return ops, len(signed)


def time_rate(fn: Callable[[], object], iterations: int) -> float:
    """Messages per second for one timed loop of ``iterations`` calls."""
    start = time.perf_counter()
    for _ in range(iterations):
        fn()
    elapsed = time.perf_counter() - start
    return iterations / max(elapsed, 1e-9)


def run(iterations: int = DEFAULT_ITERATIONS, repeats: int = DEFAULT_REPEATS) -> dict:
    """Run the benchmark and return everything it measured, ready for JSON."""
    if iterations < 1 or repeats < 1:
        raise ValueError("iterations and repeats must be >= 1")
    ops, size = operations()
    results = []
    for name, fn in ops.items():
        fn()  # warm up
        rates = [time_rate(fn, iterations) for _ in range(repeats)]
        results.append(
            {
                "operation": name,
                "best_per_s": max(rates),
                "median_per_s": statistics.median(rates),
                "best_us_per_msg": 1e6 / max(rates),
                "rates_per_s": rates,
            }
        )
    return {
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "cpu": cpu_model(),
        "iterations": iterations,
        "repeats": repeats,
        "message_bytes": size,
        "message": "RRQ + MN-NAI + NVSE care-of-name + NVSE object-part + MH/MF HMAC-SHA-256",
        "method": (
            f"time.perf_counter() around a loop of {iterations} calls, repeated {repeats} "
            "times; best and median rate; one thread, one process"
        ),
        "results": results,
    }


def format_table(report: dict) -> str:
    lines = [
        "MOAT packet codec benchmark",
        f"  message : {report['message']} ({report['message_bytes']} bytes)",
        f"  python  : {report['python']}",
        f"  cpu     : {report['cpu']}",
        f"  method  : {report['method']}",
        "",
        f"  {'operation':<15} {'best msg/s':>12} {'median msg/s':>13} {'best us/msg':>12}",
    ]
    for r in report["results"]:
        lines.append(
            f"  {r['operation']:<15} {r['best_per_s']:>12,.0f} {r['median_per_s']:>13,.0f}"
            f" {r['best_us_per_msg']:>12.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None, out: TextIO | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench_packets",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=DEFAULT_ITERATIONS,
                        help=f"calls per timed loop (default {DEFAULT_ITERATIONS})")
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS,
                        help=f"timed loops per operation (default {DEFAULT_REPEATS})")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    if args.iterations < 1 or args.repeats < 1:
        parser.error("--iterations and --repeats must be >= 1")
    out = sys.stdout if out is None else out
    report = run(args.iterations, args.repeats)
    if args.json:
        json.dump(report, out, indent=2)
        out.write("\n")
    else:
        out.write(format_table(report) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
