"""Warm provisioning's kept SFTP session (agent.vm.session_pool) and version cache
(agent.vm.version_cache), against a real SSH/SFTP server in-process (tests/unit/sftp_site.py):
one session serves many fetches, a killed one is re-opened transparently, a re-opened one is
held to the pinned host key, the pool is bounded and closes; a cached version is fetched
without its archives, a tampered one is refused and fetched again, the cache is bounded, and
an unreachable site gives the cached version only when asked to."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from agent.vm.errors import HostKeyMismatch, SiteUnreachable
from agent.vm.fetch import FetchResult, fetch_service, open_session
from agent.vm.repository import package_service, verify_service
from agent.vm.session_pool import SessionPool
from agent.vm.signing import generate_keypair
from agent.vm.version_cache import VersionCache
from sftp_site import FakeSite

SERVICE = "echo-svc"
METADATA = ["manifest.json", "policy.json", "service.sig"]


class Repo:
    """A site directory with signed versions of SERVICE, and the provider key."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.root = tmp / "repo"
        self.root.mkdir()
        self.priv, self.pub = generate_keypair(tmp / "provider", "acme")

    def publish(self, version: str) -> None:
        src = self.tmp / f"src-{version}" / "echo"
        src.mkdir(parents=True)
        (src / "echo.py").write_text(f"VERSION = {version!r}\n")
        (src / "object.json").write_text(json.dumps({"entry": "echo:Echo"}))
        out = self.tmp / f"out-{version}"
        package_service(src.parent, SERVICE, version, "acme", self.priv, out)
        shutil.rmtree(self.root / SERVICE, ignore_errors=True)
        shutil.copytree(out, self.root / SERVICE)


@pytest.fixture
def repo(tmp_path: Path) -> Repo:
    r = Repo(tmp_path)
    r.publish("1.0")
    return r


@pytest.fixture
def site(tmp_path: Path, repo: Repo) -> Any:
    s = FakeSite(repo.root, tmp_path / "site-keys")
    yield s
    s.stop()


def fetch(site: FakeSite, dest: Path, **kw: Any) -> FetchResult:
    return fetch_service("127.0.0.1", site.port, "moat-site", site.client_key, site.host_key_pub,
                         SERVICE, dest, replace=True, timeout=5, io_timeout=5, **kw)


# --- the session pool -------------------------------------------------------------------------


def test_one_kept_session_serves_every_fetch(site: FakeSite, tmp_path: Path) -> None:
    """Protects the point of the pool: the second and third fetch log in no more."""
    pool = SessionPool(open_session)
    try:
        got = [fetch(site, tmp_path / f"d{i}", pool=pool) for i in range(3)]
        assert [r.session for r in got] == ["new", "kept", "kept"]
        assert site.logins == 1 and pool.opened == 1 and pool.reused == 2
        for r in got:
            assert (r.path / "echo-1.0.tar.gz").exists()
    finally:
        pool.close()


def test_without_a_pool_every_fetch_opens_a_session(site: FakeSite, tmp_path: Path) -> None:
    """The old path stays what it was (the benchmark's baseline)."""
    assert [fetch(site, tmp_path / f"d{i}").session for i in range(2)] == ["new", "new"]
    assert site.logins == 2


def test_a_killed_session_is_reopened_transparently(site: FakeSite, tmp_path: Path) -> None:
    """The site restarts (every session dropped): the next fetch succeeds on a new
    session, without the caller seeing the failure."""
    pool = SessionPool(open_session)
    try:
        fetch(site, tmp_path / "a", pool=pool)
        site.restart()
        result = fetch(site, tmp_path / "b", pool=pool)
        assert result.session == "reopened" and (result.path / "manifest.json").exists()
        assert site.logins == 2 and pool.reopened == 1
    finally:
        pool.close()


def test_a_session_dying_mid_use_is_reopened_once(site: FakeSite, tmp_path: Path) -> None:
    """The session looks alive to the pool but the use fails with it (the site's end went
    away unnoticed): the use is tried again on a fresh session."""
    pool = SessionPool(open_session)
    calls: list[str] = []
    try:
        fetch(site, tmp_path / "a", pool=pool)

        def use(sftp: Any) -> str:
            calls.append("try")
            if len(calls) == 1:
                sftp.get_channel().get_transport().close()  # dies under the request
                sftp.stat("echo-svc/manifest.json")
            return sftp.normalize(".")

        key = next(iter(pool._sessions))
        assert pool.run(key, use, timeout=5, io_timeout=5) == ("/", "reopened")
        assert calls == ["try", "try"] and site.logins == 2
    finally:
        pool.close()


def test_a_reopened_session_still_pins_the_host_key(site: FakeSite, tmp_path: Path) -> None:
    """After a session was kept, the site comes back with another host key: the re-open is
    refused (HostKeyMismatch) and nothing is downloaded or kept."""
    pool = SessionPool(open_session)
    try:
        fetch(site, tmp_path / "a", pool=pool)
        logins = site.logins
        site.restart(new_host_key=True)
        with pytest.raises(HostKeyMismatch):
            fetch(site, tmp_path / "b", pool=pool)
        assert not (tmp_path / "b").exists() and site.logins == logins
        assert pool.status()["kept"] == []
    finally:
        pool.close()


def test_the_pool_is_bounded(tmp_path: Path, repo: Repo) -> None:
    """With room for one session, a fetch from a second site closes the first site's."""
    one = FakeSite(repo.root, tmp_path / "keys1")
    two = FakeSite(repo.root, tmp_path / "keys2")
    pool = SessionPool(open_session, max_sessions=1)
    try:
        fetch(one, tmp_path / "a", pool=pool)
        assert one.open_sessions() == 1
        fetch(two, tmp_path / "b", pool=pool)
        assert pool.evicted == 1 and len(pool.status()["kept"]) == 1
        from agent.core.wait import wait_until

        wait_until(lambda: one.open_sessions() == 0, 5, what="the evicted session closed")
        assert two.open_sessions() == 1
    finally:
        pool.close()
        one.stop()
        two.stop()


def test_a_closed_pool_closes_its_sessions_and_opens_none(site: FakeSite, tmp_path: Path) -> None:
    """Closed at agent stop: the site sees the session end; later fetches open nothing."""
    from agent.core.wait import wait_until

    pool = SessionPool(open_session)
    fetch(site, tmp_path / "a", pool=pool)
    pool.close()
    wait_until(lambda: site.open_sessions() == 0, 5, what="the kept session closed")
    with pytest.raises(SiteUnreachable):
        fetch(site, tmp_path / "b", pool=pool)
    assert site.logins == 1


def test_the_vm_manager_closes_its_pool_at_stop(site: FakeSite, tmp_path: Path) -> None:
    from agent.core.wait import wait_until
    from agent.vm.manager import VmBaseline, VmManager

    manager = VmManager(VmBaseline([], str(tmp_path / "storage")), "r1", None, {})
    fetch(site, tmp_path / "a", pool=manager.pool)
    asyncio.run(manager.close())
    wait_until(lambda: site.open_sessions() == 0, 5, what="the kept session closed")
    assert manager.pool.closed


# --- the version cache ------------------------------------------------------------------------


def test_a_cached_version_is_fetched_without_its_archives(site: FakeSite, repo: Repo,
                                                          tmp_path: Path) -> None:
    """Miss, then hit: the second fetch reads only the three metadata files (the probe), and
    its copy verifies as the first did."""
    versions = VersionCache(tmp_path / "vc")
    first = fetch(site, tmp_path / "a", versions=versions)
    assert not first.version_cached and "echo-1.0.tar.gz" in first.downloaded
    site.opened.clear()
    second = fetch(site, tmp_path / "b", versions=versions, trusted_keys=[repo.pub])
    assert second.version_cached and second.downloaded == METADATA
    assert site.opened == METADATA
    assert verify_service(second.path, [repo.pub]).version == "1.0"
    assert (versions.hits, versions.misses) == (1, 1)


def test_a_new_version_at_the_site_is_a_miss(site: FakeSite, repo: Repo, tmp_path: Path) -> None:
    versions = VersionCache(tmp_path / "vc")
    fetch(site, tmp_path / "a", versions=versions)
    repo.publish("2.0")
    result = fetch(site, tmp_path / "b", versions=versions)
    assert result.version == "2.0" and not result.version_cached
    assert "echo-2.0.tar.gz" in result.downloaded


def test_a_tampered_cached_archive_is_refused_and_fetched_again(site: FakeSite, repo: Repo,
                                                                tmp_path: Path) -> None:
    versions = VersionCache(tmp_path / "vc")
    fetch(site, tmp_path / "a", versions=versions)
    (entry,) = versions.entries()
    archive = versions.path_for(*entry) / "echo-1.0.tar.gz"
    archive.write_bytes(archive.read_bytes() + b"\0")
    result = fetch(site, tmp_path / "b", versions=versions)
    assert not result.version_cached and "echo-1.0.tar.gz" in result.downloaded
    assert versions.refused == 1
    assert verify_service(result.path, [repo.pub]).version == "1.0"
    assert versions.get(*entry) is not None  # kept again, whole


def test_a_cached_version_signed_by_nobody_trusted_is_refused(site: FakeSite, repo: Repo,
                                                              tmp_path: Path) -> None:
    """Given provider keys, the cache checks the signature too: a stranger's key finds no
    entry it would trust."""
    versions = VersionCache(tmp_path / "vc")
    fetch(site, tmp_path / "a", versions=versions)
    (entry,) = versions.entries()
    _, stranger = generate_keypair(tmp_path / "other", "mallory")
    assert versions.get(*entry, trusted_keys=[stranger]) is None and versions.refused == 1


def test_the_cache_keeps_at_most_max_versions(site: FakeSite, repo: Repo, tmp_path: Path) -> None:
    versions = VersionCache(tmp_path / "vc", max_versions=2)
    for i, version in enumerate(["1.0", "2.0", "3.0"]):
        if version != "1.0":
            repo.publish(version)
        fetch(site, tmp_path / f"d{i}", versions=versions)
    assert sorted(v for _, v, _ in versions.entries()) == ["2.0", "3.0"]
    assert versions.evicted == 1


def test_an_unreachable_site_gives_the_cached_version_only_when_allowed(
        site: FakeSite, repo: Repo, tmp_path: Path) -> None:
    """Site down: with allow_offline the version it served last comes from the cache (to be
    verified like any other); without, the fetch is refused as before."""
    versions = VersionCache(tmp_path / "vc")
    fetch(site, tmp_path / "a", versions=versions)
    site.stop()
    with pytest.raises(SiteUnreachable):
        fetch(site, tmp_path / "b", versions=versions)
    result = fetch(site, tmp_path / "c", versions=versions, allow_offline=True)
    assert result.offline and result.version == "1.0" and result.downloaded == []
    assert verify_service(result.path, [repo.pub]).version == "1.0"


def test_a_wrong_host_key_is_never_taken_for_offline(site: FakeSite, repo: Repo,
                                                     tmp_path: Path) -> None:
    """Only an unreachable site falls back to the cache; a site with another host key is a
    refusal, whatever is cached."""
    versions = VersionCache(tmp_path / "vc")
    fetch(site, tmp_path / "a", versions=versions)
    site.restart(new_host_key=True)
    with pytest.raises(HostKeyMismatch):
        fetch(site, tmp_path / "b", versions=versions, allow_offline=True)


def test_offline_gives_the_version_the_site_served_last(site: FakeSite, repo: Repo,
                                                        tmp_path: Path) -> None:
    """1.0, then 2.0, then 1.0 again at the site: offline, the cache gives 1.0 (the last one
    served), not the newest it holds."""
    versions = VersionCache(tmp_path / "vc")
    fetch(site, tmp_path / "a", versions=versions)
    repo.publish("2.0")
    fetch(site, tmp_path / "b", versions=versions)
    site.stop()
    assert fetch(site, tmp_path / "c", versions=versions, allow_offline=True).version == "2.0"
    site.start()
    shutil.rmtree(repo.root / SERVICE)
    shutil.copytree(repo.tmp / "out-1.0", repo.root / SERVICE)
    assert fetch(site, tmp_path / "d", versions=versions).version_cached
    site.stop()
    assert fetch(site, tmp_path / "e", versions=versions, allow_offline=True).version == "1.0"


def test_a_silent_kept_session_is_replaced_after_the_short_check(site: FakeSite,
                                                                 tmp_path: Path) -> None:
    """The site stops answering on the kept session without closing it (a firewall dropping
    its packets): the pool's check gives up after check_timeout, not the fetch's io_timeout,
    and the fetch goes on a new session."""
    import time

    pool = SessionPool(open_session, check_timeout=0.3)
    try:
        fetch(site, tmp_path / "a", pool=pool)
        site.stall.set()
        started = time.monotonic()
        result = fetch(site, tmp_path / "b", pool=pool)  # io_timeout is 5 s
        assert time.monotonic() - started < 3
        assert result.session == "reopened" and site.logins == 2 and pool.dropped == 1
    finally:
        site.stalled.set()
        pool.close()
