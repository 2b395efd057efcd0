"""The logic repository, agent.vm.{manifest,signing,archive,repository} (no root, no network):
keys, packaging, signatures, every refusal, safe extraction that leaves nothing
half-installed, publishing, the archive cache, and the download logic of agent.vm.fetch
over a local stand-in for SFTP."""

from __future__ import annotations

import errno
import io
import json
import os
import stat
import tarfile
from pathlib import Path

import pytest

from agent.vm.archive import ArchiveCache, safe_extract
from agent.vm.errors import (
    ArchiveError,
    BadSignature,
    ManifestError,
    PathTraversal,
    RepositoryError,
    ServiceNotFound,
    TamperedArchive,
    UnknownSigner,
)
from agent.vm.fetch import FetchResult, download_service, generate_client_key, load_host_key
from agent.vm.files import sha256_file
from agent.vm.manifest import LifecyclePolicy, Manifest, ObjectEntry
from agent.vm.repository import install_service, package_service, publish_service, verify_service
from agent.vm.signing import (
    Signature,
    generate_keypair,
    key_id,
    load_private_key,
    load_public_key,
    sign_service,
    signed_digest,
)
from experiments import repo_cli

COUNTER = '''
from agent.sdk import MobileObject

class Counter(MobileObject):
    def __init__(self):
        self.count = 0

    def handle(self, request):
        self.count += 1
        return {"count": self.count}
'''


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return generate_keypair(tmp_path / "keys")


@pytest.fixture
def other_keys(tmp_path: Path) -> tuple[Path, Path]:
    return generate_keypair(tmp_path / "other", name="mallory")


@pytest.fixture
def src(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    (root / "counter" / "pkg").mkdir(parents=True)
    (root / "counter" / "counter.py").write_text(COUNTER)
    (root / "counter" / "pkg" / "__init__.py").write_text("X = 1\n")
    (root / "counter" / "object.json").write_text(json.dumps(
        {"entry": "counter:Counter", "resources": {"cpu": 0.25, "memory_mb": 32, "pids": 8}}))
    (root / "logger").mkdir()
    (root / "logger" / "logger.py").write_text("class Logger: pass\n")
    (root / "logger" / "object.json").write_text(json.dumps(
        {"entry": "logger:Logger", "version": "0.3"}))
    return root


@pytest.fixture
def service(tmp_path: Path, src: Path, keys: tuple[Path, Path]) -> Path:
    policy = {"max_transactions": 100, "update_check_interval_s": 30, "shareable": True}
    package_service(src, "counter", "1.0", "acme", keys[0], tmp_path / "svc", policy=policy)
    return tmp_path / "svc"


def tar_gz(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    path.write_bytes(buf.getvalue())
    return path


def file_member(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def link_member(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info, None


def device_member(name: str) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = tarfile.CHRTYPE
    info.devmajor, info.devminor = 1, 3
    return info, None


def swap_archive(service: Path, key: Path, members: list) -> None:
    """Replace the first object's archive with ``members`` and re-sign everything: the
    signature and hash are then valid, only the content is hostile."""
    manifest = Manifest.from_bytes((service / "manifest.json").read_bytes())
    first = manifest.objects[0]
    tar_gz(service / first.archive, members)
    new = ObjectEntry(first.name, first.version, first.archive,
                      sha256_file(service / first.archive), first.entry, first.resources)
    manifest = Manifest(manifest.service, manifest.version, manifest.provider,
                        (new,) + manifest.objects[1:])
    (service / "manifest.json").write_bytes(manifest.to_bytes())
    sign_service(service, load_private_key(key))


def leftovers(parent: Path) -> list[str]:
    if not parent.exists():
        return []
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name)


# --- keys -------------------------------------------------------------------------------


def test_keygen_writes_openssh_keys_and_never_overwrites(tmp_path: Path) -> None:
    priv, pub = generate_keypair(tmp_path / "k")
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert pub.read_text().startswith("ssh-ed25519 ")
    kid = key_id(load_public_key(pub))
    assert key_id(load_private_key(priv).public_key()) == kid
    assert key_id(load_public_key(pub.read_text())) == kid
    with pytest.raises(RepositoryError, match="refusing to overwrite"):
        generate_keypair(tmp_path / "k")


# --- round trip ---------------------------------------------------------------------------


def test_package_verify_install_round_trip(tmp_path: Path, service: Path, keys) -> None:
    verified = verify_service(service, [keys[1]])
    m = verified.manifest
    assert (m.service, m.version, m.provider) == ("counter", "1.0", "acme")
    assert [(o.name, o.version, o.entry) for o in m.objects] == [
        ("counter", "1.0", "counter:Counter"), ("logger", "0.3", "logger:Logger")]
    assert m.object("counter").resources.limits_kwargs() == {
        "cpu_quota": 0.25, "memory_bytes": 32 << 20, "pids_max": 8}
    assert m.total_resources().pids == 8 + 16
    assert verified.policy == LifecyclePolicy(max_transactions=100, update_check_interval_s=30,
                                              shareable=True)
    assert verified.policy.usage == "transactions"
    assert verified.key_id == key_id(load_public_key(keys[1]))

    dest = tmp_path / "installed" / "counter" / "1.0"
    installed = install_service(service, [keys[1]], dest)
    assert installed.path == dest
    assert (dest / "counter" / "counter.py").read_text() == COUNTER
    assert (dest / "counter" / "pkg" / "__init__.py").read_text() == "X = 1\n"
    assert not (dest / "counter" / "object.json").exists()
    assert (dest / "logger" / "logger.py").exists()
    assert (dest / "manifest.json").read_bytes() == (service / "manifest.json").read_bytes()
    assert leftovers(dest.parent) == []


def test_packaging_is_reproducible(tmp_path: Path, src: Path, keys) -> None:
    a = package_service(src, "svc", "2", "acme", keys[0], tmp_path / "a")
    b = package_service(src, "svc", "2", "acme", keys[0], tmp_path / "b")
    assert [o.sha256 for o in a.manifest.objects] == [o.sha256 for o in b.manifest.objects]
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (tmp_path / "b" / "manifest.json").read_bytes()


def test_package_refuses_existing_output_and_missing_objects(tmp_path: Path, src, keys) -> None:
    (tmp_path / "out").mkdir()
    with pytest.raises(RepositoryError, match="already exists"):
        package_service(src, "svc", "1", "acme", keys[0], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match="object.json"):
        package_service(tmp_path / "empty", "svc", "1", "acme", keys[0], tmp_path / "o2")
    assert not (tmp_path / "o2").exists()
    assert leftovers(tmp_path) == []


# --- refusals -----------------------------------------------------------------------------


def test_unknown_signer(service: Path, other_keys) -> None:
    with pytest.raises(UnknownSigner, match="not a trusted provider key"):
        verify_service(service, [other_keys[1]])
    with pytest.raises(UnknownSigner):
        verify_service(service, [])


def test_signed_by_an_untrusted_key_even_if_consistent(tmp_path, src, other_keys, keys) -> None:
    package_service(src, "svc", "1", "mallory", other_keys[0], tmp_path / "evil")
    with pytest.raises(UnknownSigner):
        verify_service(tmp_path / "evil", [keys[1]])


@pytest.mark.parametrize("victim", ["manifest.json", "policy.json"])
def test_bad_signature_after_flipping_a_byte(service: Path, keys, victim: str) -> None:
    data = bytearray((service / victim).read_bytes())
    i = data.index(b"acme") if victim == "manifest.json" else data.index(b"100")
    data[i] ^= 0x01  # "acme" -> "`cme", 100 -> 000: still plausible JSON
    (service / victim).write_bytes(bytes(data))
    with pytest.raises(BadSignature):
        verify_service(service, [keys[1]])


def test_bad_signature_when_manifest_is_garbage(service: Path, keys) -> None:
    (service / "manifest.json").write_bytes(b"\xff not json")
    with pytest.raises(BadSignature):  # checked before the manifest is parsed
        verify_service(service, [keys[1]])


def test_signature_file_swapped_for_another_services(tmp_path, service, src, keys) -> None:
    package_service(src, "other", "9", "acme", keys[0], tmp_path / "other")
    (service / "service.sig").write_bytes((tmp_path / "other" / "service.sig").read_bytes())
    with pytest.raises(BadSignature):
        verify_service(service, [keys[1]])


def test_tampered_archive(service: Path, keys, tmp_path: Path) -> None:
    archive = service / "counter-1.0.tar.gz"
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0xFF
    archive.write_bytes(bytes(data))
    with pytest.raises(TamperedArchive, match="sha256"):
        verify_service(service, [keys[1]])
    dest = tmp_path / "dest"
    with pytest.raises(TamperedArchive):
        install_service(service, [keys[1]], dest)
    assert not dest.exists() and leftovers(tmp_path) == []


def test_missing_archive(service: Path, keys) -> None:
    (service / "logger-0.3.tar.gz").unlink()
    with pytest.raises(TamperedArchive, match="missing"):
        verify_service(service, [keys[1]])


@pytest.mark.parametrize(
    "members, match",
    [
        ([file_member("ok.py"), file_member("../evil")], r"'\.\.'"),
        ([file_member("sub/../../evil")], r"'\.\.'"),
        ([file_member("/etc/evil")], "absolute"),
        ([link_member("escape", "/etc")], "absolute"),
        ([link_member("escape", "../../outside")], r"'\.\.'"),
        ([link_member("self", "."), link_member("up", "self/..")], r"'\.\."),
        ([link_member("hard", "../../etc/passwd", tarfile.LNKTYPE)], r"'\.\.'"),
        ([link_member("hard", "/etc/passwd", tarfile.LNKTYPE)], "absolute"),
        ([device_member("null")], "character device"),
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "symlink-abs", "symlink-dotdot",
         "symlink-chain", "hardlink-dotdot", "hardlink-abs", "device"],
)
def test_path_traversal_is_refused_everywhere(tmp_path, service, keys, members, match) -> None:
    swap_archive(service, keys[0], members)
    with pytest.raises(PathTraversal, match=match):
        verify_service(service, [keys[1]])
    dest = tmp_path / "install" / "counter"
    with pytest.raises(PathTraversal):
        install_service(service, [keys[1]], dest)
    assert not dest.exists()
    assert leftovers(dest.parent) == []
    out = tmp_path / "extract"
    with pytest.raises(PathTraversal):
        safe_extract(service / "counter-1.0.tar.gz", out)
    assert not out.exists() and leftovers(tmp_path) == []
    assert not (tmp_path / "evil").exists() and not (tmp_path.parent / "evil").exists()


def test_safe_extract_keeps_inside_links_and_normalises_modes(tmp_path: Path) -> None:
    setuid = tarfile.TarInfo("tool")
    setuid.mode = 0o4755
    archive = tar_gz(tmp_path / "a.tar.gz", [
        file_member("dir/file.py", b"print(1)"),
        link_member("alias.py", "dir/file.py"),
        link_member("hard.py", "dir/file.py", tarfile.LNKTYPE),
        (setuid, b"#!/bin/sh\n"),
    ])
    out = safe_extract(archive, tmp_path / "out")
    assert (out / "alias.py").read_text() == "print(1)"
    assert os.readlink(out / "alias.py") == "dir/file.py"
    assert (out / "hard.py").read_text() == "print(1)"
    assert stat.S_IMODE((out / "tool").stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "dir" / "file.py").stat().st_mode) == 0o644


def test_safe_extract_refuses_an_existing_destination_and_duplicates(tmp_path: Path) -> None:
    archive = tar_gz(tmp_path / "a.tar.gz", [file_member("x"), file_member("x")])
    with pytest.raises(ArchiveError, match="duplicate"):
        safe_extract(archive, tmp_path / "dup")
    assert not (tmp_path / "dup").exists()
    good = tar_gz(tmp_path / "b.tar.gz", [file_member("y", b"new")])
    (tmp_path / "there").mkdir()
    (tmp_path / "there" / "old").write_text("old")
    with pytest.raises(RepositoryError, match="already exists"):
        safe_extract(good, tmp_path / "there")
    assert (tmp_path / "there" / "old").exists()
    safe_extract(good, tmp_path / "there", replace=True)
    assert sorted(os.listdir(tmp_path / "there")) == ["y"]
    assert leftovers(tmp_path) == []


def test_failure_midway_through_extraction_leaves_nothing(tmp_path: Path) -> None:
    archive = tar_gz(tmp_path / "a.tar.gz", [
        file_member("first.py"), link_member("d", "missing"), file_member("d/x")])
    with pytest.raises(ArchiveError, match="cannot extract"):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_corrupt_archive_is_an_archive_error(tmp_path: Path) -> None:
    (tmp_path / "bad.tar.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(ArchiveError):
        safe_extract(tmp_path / "bad.tar.gz", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_manifest_errors(service: Path, keys) -> None:
    doc = json.loads((service / "manifest.json").read_text())
    doc["objects"][0]["entry"] = "not an entry"
    (service / "manifest.json").write_text(json.dumps(doc))
    sign_service_raw(service, keys[0])
    with pytest.raises(ManifestError, match="entry"):
        verify_service(service, [keys[1]])
    with pytest.raises(ManifestError, match="not both"):
        LifecyclePolicy(max_transactions=1, max_duration_s=5)
    with pytest.raises(ManifestError, match="unknown fields"):
        LifecyclePolicy.from_json({"forever": True})
    with pytest.raises(ManifestError):
        ObjectEntry("x", "1", "../x.tar.gz", "0" * 64, "m:C")
    (service / "service.sig").unlink()
    with pytest.raises(ManifestError, match="missing"):
        verify_service(service, [keys[1]])


def sign_service_raw(service: Path, key: Path) -> None:
    """Sign whatever bytes are there (sign_service itself refuses an invalid manifest)."""
    manifest = (service / "manifest.json").read_bytes()
    policy = (service / "policy.json").read_bytes()
    hashes = [o["sha256"] for o in json.loads(manifest)["objects"]]
    priv = load_private_key(key)
    sig = Signature(key_id(priv.public_key()), tuple(hashes),
                    priv.sign(signed_digest(manifest, hashes, policy)))
    (service / "service.sig").write_bytes(sig.to_bytes())


def test_policy_variants_round_trip() -> None:
    for policy in (LifecyclePolicy(), LifecyclePolicy(max_duration_s=3600.0, extensible=True),
                   LifecyclePolicy(max_transactions=1, update_check_interval_s=None)):
        assert LifecyclePolicy.from_bytes(policy.to_bytes()) == policy
    assert LifecyclePolicy().usage == "unlimited"
    assert LifecyclePolicy(max_duration_s=1).usage == "duration"


# --- publishing -------------------------------------------------------------------------


def test_publish_switches_atomically_and_keeps_old_versions(tmp_path, service, src, keys) -> None:
    root = tmp_path / "repo"
    link = publish_service(service, root, trusted_public_keys=[keys[1]])
    assert link.is_symlink() and not os.path.isabs(os.readlink(link))
    first = link.resolve()
    assert verify_service(link, [keys[1]]).version == "1.0"
    package_service(src, "counter", "1.1", "acme", keys[0], tmp_path / "svc11")
    publish_service(tmp_path / "svc11", root)
    assert verify_service(link, [keys[1]]).version == "1.1"
    assert first.is_dir() and verify_service(first, [keys[1]]).version == "1.0"
    assert [p.name for p in root.iterdir() if p.name.startswith(".counter")] == []


def test_publish_refuses_what_would_not_verify(tmp_path, service, keys, other_keys) -> None:
    with pytest.raises(UnknownSigner):
        publish_service(service, tmp_path / "repo", trusted_public_keys=[other_keys[1]])
    (service / "counter-1.0.tar.gz").write_bytes(b"junk")
    with pytest.raises(TamperedArchive):
        publish_service(service, tmp_path / "repo")
    assert not (tmp_path / "repo" / "counter").exists()


# --- the archive cache --------------------------------------------------------------------


def test_archive_cache(tmp_path: Path, service: Path) -> None:
    cache = ArchiveCache(tmp_path / "cache")
    archive = service / "counter-1.0.tar.gz"
    digest = sha256_file(archive)
    assert cache.get("counter", "1.0", digest) is None
    stored = cache.put("counter", "1.0", digest, archive)
    assert cache.get("counter", "1.0", digest) == stored
    assert cache.get("counter", "1.1", digest) is None  # keyed by version too
    assert cache.entries() == [("counter", "1.0", digest)]
    with pytest.raises(TamperedArchive):
        cache.put("counter", "1.0", "0" * 64, archive)
    stored.write_bytes(b"damaged")
    assert cache.get("counter", "1.0", digest) is None and not stored.exists()
    with pytest.raises(ManifestError):
        cache.path_for("../x", "1", digest)


# --- download logic over a local stand-in for SFTP ----------------------------------------


class LocalSFTP:
    """The calls download_service makes on paramiko's SFTPClient, served from a directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.opened: list[str] = []

    def _path(self, path: str) -> Path:
        return Path(path) if path.startswith("/") else self.root / path

    def normalize(self, path: str) -> str:
        p = self._path(path)
        if not p.exists():
            raise FileNotFoundError(errno.ENOENT, "No such file", path)
        return str(p.resolve())

    def stat(self, path: str) -> os.stat_result:
        return os.stat(self._path(path))

    def open(self, filename: str, mode: str = "r", bufsize: int = -1):
        self.opened.append(Path(filename).name)
        return open(self._path(filename), "rb")


def test_download_uses_the_cache_for_the_same_version(tmp_path, service, keys) -> None:
    root = tmp_path / "repo"
    publish_service(service, root)
    sftp = LocalSFTP(root)
    cache = ArchiveCache(tmp_path / "cache")
    first = download_service(sftp, "counter", tmp_path / "a", cache=cache, trusted_keys=[keys[1]])
    assert isinstance(first, FetchResult) and Path(first) == tmp_path / "a"
    assert first.version == "1.0"
    assert sorted(first.downloaded) == sorted(["manifest.json", "policy.json", "service.sig",
                                               "counter-1.0.tar.gz", "logger-0.3.tar.gz"])
    assert first.cached == [] and first.bytes_downloaded > 0
    assert first.verified is not None and first.verified.path == tmp_path / "a"

    second = download_service(sftp, "counter", tmp_path / "b", cache=cache, trusted_keys=[keys[1]])
    assert not [n for n in second.downloaded if n.endswith(".tar.gz")]  # archives: nothing
    assert second.downloaded == ["manifest.json", "policy.json", "service.sig"]
    assert sorted(second.cached) == ["counter-1.0.tar.gz", "logger-0.3.tar.gz"]
    assert verify_service(tmp_path / "b", [keys[1]]).version == "1.0"


def test_download_refusals_leave_nothing(tmp_path, service, keys, other_keys) -> None:
    root = tmp_path / "repo"
    publish_service(service, root)
    sftp = LocalSFTP(root)
    dest = tmp_path / "dl" / "counter"
    with pytest.raises(UnknownSigner):
        download_service(sftp, "counter", dest, trusted_keys=[other_keys[1]])
    assert not [n for n in sftp.opened if n.endswith(".tar.gz")]  # failed before archives
    assert not dest.exists() and leftovers(dest.parent) == []
    with pytest.raises(ServiceNotFound):
        download_service(sftp, "nosuch", dest)
    target = (root / "counter").resolve() / "counter-1.0.tar.gz"
    target.write_bytes(b"x" + target.read_bytes()[1:])
    with pytest.raises(TamperedArchive):
        download_service(sftp, "counter", dest, trusted_keys=[keys[1]],
                         cache=ArchiveCache(tmp_path / "cache"))
    assert not dest.exists() and leftovers(dest.parent) == []
    assert ArchiveCache(tmp_path / "cache").entries() == [
        ("counter", "1.0", Manifest.from_bytes(
            (root / "counter" / "manifest.json").read_bytes()).object("logger").sha256)]


# --- small helpers of agent.vm.fetch and the CLI -----------------------------------------------


def test_client_key_and_host_key_loading(tmp_path: Path) -> None:
    line = generate_client_key(tmp_path / "id_vm")
    assert line.startswith("ssh-ed25519 ") and line.endswith(" moat-vm")
    key = load_host_key(line)
    assert key.get_name() == "ssh-ed25519"
    assert load_host_key(tmp_path / "id_vm.pub").asbytes() == key.asbytes()
    from agent.vm.fetch import load_client_key

    assert load_client_key(tmp_path / "id_vm").asbytes() == key.asbytes()


def test_repo_cli(tmp_path: Path, src: Path, capsys) -> None:
    keys = tmp_path / "k"
    assert repo_cli.main(["keygen", str(keys)]) == 0
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"max_duration_s": 60, "extensible": True}))
    out = tmp_path / "svc"
    assert repo_cli.main(["package", str(src), "--service", "svc", "--version", "3",
                          "--provider", "acme", "--key", str(keys / "provider.key"),
                          "--out", str(out), "--policy", str(policy)]) == 0
    assert repo_cli.main(["verify", str(out), "--trusted", str(keys / "provider.pub")]) == 0
    capsys.readouterr()
    assert repo_cli.main(["verify", str(out), "--trusted", str(keys / "provider.pub"),
                          "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["policy"]["max_duration_s"] == 60
    assert repo_cli.main(["publish", str(out), str(tmp_path / "repo")]) == 0
    assert (tmp_path / "repo" / "svc" / "manifest.json").exists()
    generate_keypair(tmp_path / "o", "other")
    assert repo_cli.main(["verify", str(out), "--trusted", str(tmp_path / "o" / "other.pub")]) == 2
    assert "UnknownSigner" in capsys.readouterr().err
    assert repo_cli.main(["keygen", str(keys)]) == 1  # refuses to overwrite


def test_sshd_config_is_key_only_and_its_account_is_not_root() -> None:
    from topologies.errors import DaemonError
    from topologies.site import sshd_config_text

    text = sshd_config_text(address="10.16.0.24", port=22, host_key=Path("/r/hk"),
                            authorized_keys=Path("/r/ak"), pid_file=Path("/r/pid"),
                            repo_dir=Path("/r/repo"), user="moat-site")
    lines = set(text.splitlines())
    for expected in ("PasswordAuthentication no", "KbdInteractiveAuthentication no",
                     "PubkeyAuthentication yes", "UsePAM no", "ListenAddress 10.16.0.24",
                     "PermitRootLogin no", "AllowUsers moat-site", "StrictModes yes",
                     "HostKey /r/hk", "AuthorizedKeysFile /r/ak", "PidFile /r/pid",
                     "ChrootDirectory /r/repo",
                     "ForceCommand internal-sftp -R -d / -l INFO"):
        assert expected in lines, expected
    assert "Include" not in text
    with pytest.raises(DaemonError):
        sshd_config_text(address=None, port=22, host_key=Path("/r/hk"), authorized_keys=Path("/r/ak"),
                         pid_file=Path("/r/pid"), repo_dir=Path("/r/repo"), user="root")


def _declare(obj_dir: Path, **formats: str) -> None:
    doc = json.loads((obj_dir / "object.json").read_text())
    (obj_dir / "object.json").write_text(json.dumps({**doc, **formats}))


def test_a_converters_formats_go_from_object_json_into_the_signed_manifest(tmp_path, src, keys) -> None:
    """The broker chains services by these formats (text -> html -> rtf)."""
    _declare(src / "counter", consumes="text", produces="html")
    signed = package_service(src, "conv", "1.0", "acme", keys[0], tmp_path / "svc")
    assert (signed.manifest.consumes, signed.manifest.produces) == ("text", "html")
    installed = install_service(tmp_path / "svc", [load_public_key(keys[1])], tmp_path / "inst")
    assert installed.manifest.produces == "html"


def test_objects_declaring_different_conversions_are_refused(tmp_path, src, keys) -> None:
    _declare(src / "counter", consumes="text", produces="html")
    _declare(src / "logger", consumes="text", produces="word")
    with pytest.raises(ManifestError, match="different conversions"):
        package_service(src, "conv", "1.0", "acme", keys[0], tmp_path / "svc")
    assert not (tmp_path / "svc").exists()


# --- dependencies (Fig. 12, step 214; issue 11) ---------------------------------------------


def test_the_services_an_object_requires_go_into_the_signed_manifest(tmp_path: Path, src: Path,
                                                                     keys) -> None:
    doc = json.loads((src / "logger" / "object.json").read_text())
    (src / "logger" / "object.json").write_text(json.dumps(dict(doc, requires=["text2html"])))
    doc = json.loads((src / "counter" / "object.json").read_text())
    (src / "counter" / "object.json").write_text(json.dumps(dict(doc, requires=["word2rtf",
                                                                                "text2html"])))
    package_service(src, "counter", "1.0", "acme", keys[0], tmp_path / "svc")
    manifest = verify_service(tmp_path / "svc", [keys[1]]).manifest
    assert manifest.requires == ("text2html", "word2rtf")  # the union, sorted
    assert Manifest.from_bytes(manifest.to_bytes()) == manifest


def test_a_manifest_without_requirements_keeps_its_bytes(service: Path) -> None:
    raw = (service / "manifest.json").read_bytes()
    assert b"requires" not in raw
    assert Manifest.from_bytes(raw).to_bytes() == raw


@pytest.mark.parametrize("requires, match", [
    ("text2html", "list of service names"),
    (["../x"], "required service"),
    (["counter"], "requires itself"),
    ([f"s{i}" for i in range(17)], "at most 16"),
])
def test_bad_requirements_are_refused(service: Path, requires, match: str) -> None:
    doc = json.loads((service / "manifest.json").read_bytes())
    doc["requires"] = requires
    with pytest.raises(ManifestError, match=match):
        Manifest.from_bytes(json.dumps(doc).encode())
