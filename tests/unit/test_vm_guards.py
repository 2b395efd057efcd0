"""Issue 12, item 12: the guards of the logic repository that no test exercised.

* manifest substitution: a correctly signed manifest of ANOTHER service, offered in place of
  the one asked for (the site's link pointing elsewhere), is refused by the download and by
  the VM manager, and nothing is installed;
* the download size limits: a metadata file or archive larger than allowed (or that grows
  past what the site's stat said) is refused, nothing is installed or cached;
* the archive limits: an archive bomb (a small archive that unpacks beyond the extracted-size
  limit, in one member or many) and an archive with too many members are refused, by the
  check before extraction and by the install, and nothing is left extracted.

Real keys, packaging, signatures, archives and extraction; SFTP is a local stand-in.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import os
import tarfile
from pathlib import Path
from typing import Any

import pytest

from agent.vm import archive as archive_mod
from agent.vm import fetch as fetch_mod
from agent.vm.archive import ArchiveCache, MAX_MEMBERS, scan_archive, safe_extract
from agent.vm.errors import ArchiveError, FetchError, RepositoryError
from agent.vm.fetch import download_service
from agent.vm.manager import ProvisionError
from agent.vm.repository import install_service, package_service, publish_service

from test_repository import COUNTER, LocalSFTP, leftovers, swap_archive, tar_gz, file_member
from test_vm_manager import SERVICE, Env

KiB, MiB = 1 << 10, 1 << 20


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    from agent.vm.signing import generate_keypair

    return generate_keypair(tmp_path / "keys")


def make_service(tmp_path: Path, keys: tuple[Path, Path], service: str, text: str = COUNTER,
                 extra: bytes = b"") -> Path:
    """A signed service directory with one object ``counter`` (``extra``: a data file)."""
    src = tmp_path / f"src-{service}"
    (src / "counter").mkdir(parents=True)
    (src / "counter" / "counter.py").write_text(text)
    (src / "counter" / "object.json").write_text('{"entry": "counter:Counter"}')
    if extra:
        (src / "counter" / "data.bin").write_bytes(extra)
    out = tmp_path / f"svc-{service}"
    package_service(src, service, "1.0", "acme", keys[0], out)
    return out


def nothing_left(dest: Path) -> None:
    assert not dest.exists()
    assert leftovers(dest.parent) == []


# --- (a) manifest substitution ---------------------------------------------------------------------


def test_a_signed_manifest_of_another_service_is_refused_by_the_download(tmp_path, keys) -> None:
    """The site's ``counter`` link points at ``billing``'s (correctly signed) directory: the
    download refuses it before any archive is read, and leaves nothing."""
    root = tmp_path / "repo"
    publish_service(make_service(tmp_path, keys, "counter"), root)
    publish_service(make_service(tmp_path, keys, "billing", COUNTER + "# billing\n"), root)
    assert download_service(LocalSFTP(root), "counter", tmp_path / "ok",
                            trusted_keys=[keys[1]]).verified.name == "counter"  # type: ignore[union-attr]
    (root / "counter").unlink()
    (root / "counter").symlink_to((root / "billing").resolve())
    sftp = LocalSFTP(root)
    dest = tmp_path / "dl" / "counter"
    for trusted in ([keys[1]], None):  # verifying or not: the name is checked either way
        with pytest.raises(RepositoryError, match="asked for service 'counter'.*'billing'"):
            download_service(sftp, "counter", dest, trusted_keys=trusted,
                             cache=ArchiveCache(tmp_path / "cache"))
        nothing_left(dest)
    assert not [n for n in sftp.opened if n.endswith(".tar.gz")]
    assert ArchiveCache(tmp_path / "cache").entries() == []


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Env:
    return Env(tmp_path, monkeypatch)


def test_a_signed_manifest_of_another_service_is_refused_by_the_vm(env: Env) -> None:
    """The fetched copy (whatever brought it) is another service signed by an authorized
    provider: refused at step ``manifest``, nothing installed or started."""
    env.publish("billing-svc")
    env.site[SERVICE] = env.site["billing-svc"]
    exc = env.refused()
    assert exc.step == "manifest" and "billing-svc" in exc.reason
    assert env.manager.vms == {} and env.journal == [] and env.leftovers("fetched") == []


def test_a_dependency_substituted_by_another_service_is_refused(env: Env,
                                                                monkeypatch) -> None:
    """A required service whose fetched manifest names another: refused at step
    ``dependencies``, the VM undone."""
    from agent.vm import provisioning

    async def needs(baseline: Any, vm: Any, now: Any = None) -> None:
        await provisioning.resolve_dependencies(baseline, vm, ("ledger-svc",),
                                                Path(env.storage / "installed" / vm.name))

    env.publish("ledger-svc")
    env.publish("billing-svc")
    env.site["ledger-svc"] = env.site["billing-svc"]
    original = provisioning.fetch_verify_install

    async def with_dependency(baseline: Any, vm: Any, now: Any = None, **warm: Any) -> None:
        await original(baseline, vm, now, **warm)
        await needs(baseline, vm)

    monkeypatch.setattr("agent.vm.manager.fetch_verify_install", with_dependency)
    exc = env.refused()
    assert exc.step == "dependencies" and "billing-svc" in exc.reason
    assert env.manager.vms == {} and env.journal == [] and env.leftovers("fetched") == []


# --- (b) the download size limits -------------------------------------------------------------------


class LyingSFTP(LocalSFTP):
    """A site whose stat understates every file (so only the running count can stop it)."""

    def stat(self, path: str) -> Any:
        real = super().stat(path)
        return type("St", (), {"st_size": 1})() if real else real


@pytest.mark.parametrize("sftp_cls, match", [(LocalSFTP, "more than the"),
                                             (LyingSFTP, "grew past")])
def test_an_archive_larger_than_the_limit_is_refused_and_nothing_installed(
        tmp_path, keys, monkeypatch, sftp_cls, match) -> None:
    root = tmp_path / "repo"
    publish_service(make_service(tmp_path, keys, "counter", extra=os.urandom(200 * KiB)), root)
    limit = 100 * KiB  # the archive holds 200 KiB of random bytes: above it
    monkeypatch.setattr(fetch_mod, "MAX_ARCHIVE_BYTES", limit)
    dest = tmp_path / "dl" / "counter"
    cache = ArchiveCache(tmp_path / "cache")
    with pytest.raises(FetchError, match=match):
        download_service(sftp_cls(root), "counter", dest, trusted_keys=[keys[1]], cache=cache)
    nothing_left(dest)
    assert cache.entries() == []
    # The same service under a limit it fits is taken (the refusal was the size's).
    monkeypatch.setattr(fetch_mod, "MAX_ARCHIVE_BYTES", 1 * MiB)
    assert download_service(sftp_cls(root), "counter", dest, trusted_keys=[keys[1]]).version == "1.0"


def test_a_metadata_file_larger_than_the_limit_costs_no_archive(tmp_path, keys,
                                                                monkeypatch) -> None:
    root = tmp_path / "repo"
    publish_service(make_service(tmp_path, keys, "counter"), root)
    monkeypatch.setattr(fetch_mod, "MAX_METADATA_BYTES", 64)  # the manifest is larger
    sftp = LocalSFTP(root)
    dest = tmp_path / "dl" / "counter"
    with pytest.raises(FetchError, match="manifest.json is .* more than the 64"):
        download_service(sftp, "counter", dest)
    nothing_left(dest)
    assert sftp.opened == []


def test_the_real_download_limits_are_what_the_archive_limits_expect() -> None:
    """The limits the download applies are the repository's (a change to one moves both)."""
    assert fetch_mod.MAX_ARCHIVE_BYTES == archive_mod.MAX_ARCHIVE_BYTES == 256 * MiB
    assert fetch_mod.MAX_METADATA_BYTES == 1 * MiB


# --- (c) archive bombs and member counts -------------------------------------------------------------


def bomb(path: Path, sizes: list[int]) -> Path:
    """A tar.gz of zero-filled members of ``sizes`` (it compresses about 1000:1)."""
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w") as tar:
        for n, size in enumerate(sizes):
            info = tarfile.TarInfo(f"zeros-{n}.bin")
            info.size = size
            tar.addfile(info, io.BytesIO(bytes(size)))
    path.write_bytes(buf.getvalue())
    return path


@pytest.mark.parametrize("sizes", [[3 * MiB], [MiB] * 3], ids=["one member", "many members"])
def test_an_archive_bomb_is_refused_and_nothing_is_extracted(tmp_path, monkeypatch,
                                                             sizes) -> None:
    monkeypatch.setattr(archive_mod, "MAX_EXTRACTED_BYTES", 2 * MiB)
    archive = bomb(tmp_path / "bomb.tar.gz", sizes)
    assert archive.stat().st_size < 64 * KiB  # small on the wire, 3 MiB unpacked
    with pytest.raises(ArchiveError, match="unpacks to more than"):
        scan_archive(archive)
    dest = tmp_path / "out" / "counter"
    dest.parent.mkdir()
    with pytest.raises(ArchiveError, match="unpacks to more than"):
        safe_extract(archive, dest)
    nothing_left(dest)
    assert list(dest.parent.iterdir()) == []
    # Under the limit, the same kind of archive extracts.
    safe_extract(bomb(tmp_path / "fine.tar.gz", [MiB]), dest)
    assert (dest / "zeros-0.bin").stat().st_size == MiB


def test_a_signed_archive_bomb_is_refused_at_install_and_nothing_installed(
        tmp_path, keys, monkeypatch) -> None:
    """Signed by a trusted provider, its hash in the manifest: still refused, by size."""
    service = make_service(tmp_path, keys, "counter")
    swap_archive(service, keys[0], [file_member("counter.py", b"x"),
                                    (tarfile.TarInfo("zeros.bin"), bytes(3 * MiB))])
    monkeypatch.setattr(archive_mod, "MAX_EXTRACTED_BYTES", 2 * MiB)
    dest = tmp_path / "installed" / "v1"
    with pytest.raises(ArchiveError, match="unpacks to more than"):
        install_service(service, [keys[1]], dest)
    nothing_left(dest)


def test_an_archive_with_too_many_members_is_refused_and_nothing_is_extracted(
        tmp_path, monkeypatch) -> None:
    """At the limit it extracts; one member more is refused, before and during extraction,
    and nothing is left."""
    monkeypatch.setattr(archive_mod, "MAX_MEMBERS", 50)
    members = [file_member(f"f{n}", b"") for n in range(50)]
    dest = tmp_path / "out" / "counter"
    dest.parent.mkdir()
    safe_extract(tar_gz(tmp_path / "ok.tar.gz", members), tmp_path / "ok")
    assert len(list((tmp_path / "ok").iterdir())) == 50
    many = tar_gz(tmp_path / "many.tar.gz", members + [file_member("one-more", b"")])
    for refuse in (scan_archive, lambda a: safe_extract(a, dest)):
        with pytest.raises(ArchiveError, match="more than 50 members"):
            refuse(many)
    nothing_left(dest)
    assert list(dest.parent.iterdir()) == []
    # The extraction itself counts too (were the scan skipped): it stops at the 51st.
    (tmp_path / "raw").mkdir()
    with pytest.raises(ArchiveError, match="more than 50 members"):
        archive_mod._extract_into(many, tmp_path / "raw")
    assert len(list((tmp_path / "raw").iterdir())) == 50


def test_the_real_member_limit_refuses_a_small_archive_of_many_empty_files(tmp_path) -> None:
    many = tar_gz(tmp_path / "many.tar.gz",
                  [file_member(f"f{n}", b"") for n in range(MAX_MEMBERS + 1)])
    assert many.stat().st_size < 1 * MiB
    with pytest.raises(ArchiveError, match=f"more than {MAX_MEMBERS} members"):
        scan_archive(many)


def test_a_signed_archive_with_too_many_members_is_refused_at_install(
        tmp_path, keys, monkeypatch) -> None:
    service = make_service(tmp_path, keys, "counter")
    swap_archive(service, keys[0], [file_member(f"f{n}", b"") for n in range(20)])
    monkeypatch.setattr(archive_mod, "MAX_MEMBERS", 10)
    dest = tmp_path / "installed" / "v1"
    with pytest.raises(ArchiveError, match="more than 10 members"):
        install_service(service, [keys[1]], dest)
    nothing_left(dest)


def test_a_bomb_in_a_provisioned_service_is_refused_and_the_vm_undone(env: Env,
                                                                      monkeypatch) -> None:
    """Through the VM manager: refused at step ``manifest`` (the archives are checked when
    the fetched copy is inspected), nothing installed, no object started."""
    monkeypatch.setattr(archive_mod, "MAX_EXTRACTED_BYTES", 2 * MiB)
    swap_archive(env.site[SERVICE], env.acme[0],
                 [file_member("counter.py", b"x"), (tarfile.TarInfo("z.bin"), bytes(3 * MiB))])
    exc = env.refused()
    assert exc.step == "manifest" and "unpacks to more than" in exc.reason
    assert env.manager.vms == {} and env.journal == [] and env.leftovers("fetched") == []
    assert asyncio.run(env.manager.close()) is None
