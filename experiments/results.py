"""Where experiments write: ``results/<experiment>/<run-id>/`` with summary.json and CSVs."""

from __future__ import annotations

import csv
import json
import os
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any, Iterable

RESULTS_ROOT = Path("results")


def results_dir(experiment: str, run_id: str, root: Path | None = None) -> Path:
    path = (root or RESULTS_ROOT) / experiment / run_id
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def write_csv(path: Path, rows: Iterable[dict[str, Any]], columns: list[str]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(row)


def copy_captures(capture_dir: Path, dest: Path) -> list[Path]:
    """Copy a run's pcaps into ``dest/captures``, root-only like the originals: the
    directory is made 0700 and each copy 0600 by the system calls that create them (a
    capture may hold whatever crossed the wire), never widened and narrowed after."""
    out = dest / "captures"
    try:
        os.mkdir(out, 0o700)
    except FileExistsError:
        if stat.S_IMODE(os.lstat(out).st_mode) & 0o077:
            os.chmod(out, 0o700)
    copied = []
    for pcap in sorted(capture_dir.glob("*.pcap")):
        target = out / pcap.name
        target.unlink(missing_ok=True)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as dst, open(pcap, "rb") as src:
            shutil.copyfileobj(src, dst)
        st = pcap.stat()
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
        copied.append(target)
    return copied


#: Display filters that count the protocol events a MOAT capture should show.
CAPTURE_EVENTS = {
    "advertisements": "icmp.type == 9",
    "solicitations": "icmp.type == 10",
    "registration_requests": "mip.type == 1",
    "registration_replies": "mip.type == 3",
    "arp_replies": "arp.opcode == 2",
    "gratuitous_arp": "arp.isgratuitous == 1",
    "gre": "gre",
}


def count_events(pcap: Path, timeout: float = 60.0) -> dict[str, int]:
    """Count each of :data:`CAPTURE_EVENTS` in ``pcap`` with tshark (one pass per filter)."""
    counts = {}
    for name, dfilter in CAPTURE_EVENTS.items():
        proc = subprocess.run(["tshark", "-r", str(pcap), "-Y", dfilter, "-T", "fields", "-e", "frame.number"],
                              capture_output=True, text=True, timeout=timeout)
        counts[name] = len(proc.stdout.split()) if proc.returncode == 0 else -1
    return counts
