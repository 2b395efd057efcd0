"""Warm provisioning in the patent's topology (issue 14, item 3): r22a keeps its SFTP session
to site24 and the versions it fetched. A second provisioning of the same version logs in to
site24's sshd no more (sshd's own log) and reads no archive (only the three metadata files,
the version probe: the bytes its step reports, the router's counters); with site24's sshd
killed and started again, the router's session is re-opened (host key pinned) and used; with
sshd down, a new VM starts the cached version the site served last."""

from __future__ import annotations

import re
from pathlib import Path

from agent.core.wait import wait_until
from site_control import kill_sshd, start_sshd
from topologies.moatnet import MoatNetwork
from topologies.patent import PatentTopo
from vm_services import publish

ROUTER = "r22a"
ADDRESS = "10.16.0.201"
BODY = dict(vm="warm", kind="interface", interface=f"{ROUTER}-eth0", address=ADDRESS,
            service="counter-svc", resources={"cpu": 0.5, "memory_mb": 256, "pids": 64})


def read_bytes(fetched: str) -> int:
    """The bytes a provisioning read from the site, as its ``fetched`` step says."""
    return int(re.search(r"\((\d+) bytes", fetched).group(1))


def provision(m: MoatNetwork) -> tuple[dict, str]:
    answer = m.provision(ROUTER, **BODY)
    assert answer["ok"], answer
    fetched = next(w for w, _ in answer["vm"]["steps"] if w.startswith("fetched"))
    got = m.requests_at("co14", ADDRESS, count=5)
    assert got["answered"] == got["sent"] == 5, got
    m.agent(ROUTER).call("vm_remove", name="warm")
    return answer, fetched


def test_second_provisioning_reuses_the_session_and_the_cached_version(tmp_path: Path) -> None:
    with MoatNetwork(PatentTopo()) as m:
        publish(m, tmp_path, "counter-svc", m.provider_key)
        site = m.net[m.site]
        log = Path(site.daemon_log_path)

        def logins() -> int:
            return log.read_text().count("Accepted publickey for moat-site")

        repo = site.repo_root / "counter-svc"
        metadata = sum((repo / n).stat().st_size for n in ("manifest.json", "policy.json",
                                                            "service.sig"))

        _, first = provision(m)
        assert "new session" in first and "version cached" not in first, first
        assert read_bytes(first) > metadata  # the archive too
        after_first = m.agent(ROUTER).call("vm_warm")
        wait_until(lambda: logins() == 1, 5, what="sshd logging the first session")

        _, second = provision(m)
        assert "kept session" in second and "version cached" in second, second
        assert read_bytes(second) == metadata  # the probe only: no archive fetched
        counters = m.agent(ROUTER).call("vm_warm")
        assert counters["sessions"]["opened"] == after_first["sessions"]["opened"] == 1
        assert counters["versions"]["hits"] == after_first["versions"]["hits"] + 1
        assert logins() == 1  # no new SSH session at the site

        # site24's sshd killed (its sessions with it) and started again, same host key: the
        # router's kept session is re-opened, pinned, and used.
        kill_sshd(site)
        start_sshd(site)
        _, back = provision(m)
        assert "reopened session" in back and "version cached" in back, back
        counters = m.agent(ROUTER).call("vm_warm")
        assert counters["sessions"]["opened"] == 2 and counters["sessions"]["reopened"] == 1
        assert logins() == 2 and read_bytes(back) == metadata

        # The site down: a new VM starts the cached version the site served last.
        kill_sshd(site)
        _, offline = provision(m)
        assert "site unreachable" in offline and read_bytes(offline) == 0, offline

        # Back again: a session is opened anew (the dead one was dropped) and kept.
        start_sshd(site)
        _, again = provision(m)
        assert "new session" in again and "version cached" in again, again
        assert logins() == 3
