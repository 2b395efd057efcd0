"""The code archives of a service: reproducible packing, safety checks, safe extraction, cache.

One ``<object>-<version>.tar.gz`` per mobile object. :func:`build_archive` packs a
directory reproducibly (same sources, same sha256). Before anything is unpacked every
member is checked (:func:`scan_archive`): absolute paths, ``..``, links that could point
outside, devices and fifos are a :class:`~agent.vm.errors.PathTraversal`; a corrupt,
oversized or ambiguous archive is an :class:`~agent.vm.errors.ArchiveError`; an archive
that is missing or whose sha256 differs from the (signed) manifest is a
:class:`~agent.vm.errors.TamperedArchive` (:func:`_check_archives`). Extraction
(:func:`safe_extract`) writes into a fresh temporary directory next to the destination and
renames it into place only when everything succeeded, so a refusal leaves nothing
half-extracted. :class:`ArchiveCache` keeps archives a VM already fetched.
"""

from __future__ import annotations

import gzip
import hashlib
import hmac
import io
import logging
import os
import shutil
import stat
import tarfile
import tempfile
from pathlib import Path, PurePosixPath
from typing import Iterator

from agent.vm.errors import (
    ArchiveError,
    ManifestError,
    PathTraversal,
    RepositoryError,
    TamperedArchive,
)
from agent.vm.files import _atomic_write, _move_into_place, _remove, _staging_dir, sha256_file
from agent.vm.manifest import (
    NAME_RE,
    OBJECT_FILE,
    SHA256_RE,
    VERSION_RE,
    Manifest,
    MiB,
    _check_re,
)

__all__ = [
    "ArchiveCache",
    "scan_archive",
    "safe_extract",
]

log = logging.getLogger(__name__)

MAX_ARCHIVE_BYTES = 256 * MiB  # one compressed archive
MAX_EXTRACTED_BYTES = 512 * MiB  # everything one archive unpacks to
MAX_MEMBERS = 10_000
SKIP_NAMES = {"__pycache__", OBJECT_FILE, ".git", ".DS_Store"}


def _check_archives(d: Path, manifest: Manifest) -> None:
    for obj in manifest.objects:
        path = d / obj.archive
        try:
            st = path.lstat()
        except FileNotFoundError:
            raise TamperedArchive(f"archive {obj.archive} of object {obj.name} is missing") from None
        if not stat.S_ISREG(st.st_mode):
            raise TamperedArchive(f"archive {obj.archive} is not a regular file")
        actual = sha256_file(path)
        if not hmac.compare_digest(actual, obj.sha256):
            raise TamperedArchive(f"archive {obj.archive}: sha256 {actual} differs from the "
                                  f"manifest's {obj.sha256}")
        scan_archive(path)


def _member_parts(name: str, what: str = "member") -> tuple[str, ...]:
    """The path components of a member name or link target; refuses absolute paths and
    ``..`` anywhere (lexical checks cannot see through symlinks, so ``..`` is never safe)."""
    if not name or "\x00" in name:
        raise PathTraversal(f"archive {what} with an empty or NUL name {name!r}")
    if name.startswith("/") or name.startswith("\\"):
        raise PathTraversal(f"archive {what} {name!r} is an absolute path")
    if ".." in name.replace("\\", "/").split("/"):
        raise PathTraversal(f"archive {what} {name!r} contains '..'")
    return tuple(p for p in PurePosixPath(name).parts if p not in ("", "."))


def _check_member(member: tarfile.TarInfo) -> tuple[str, ...]:
    parts = _member_parts(member.name)
    if member.isdev() or member.isfifo() or not (member.isfile() or member.isdir()
                                                 or member.issym() or member.islnk()):
        kind = ("character device" if member.ischr() else "block device" if member.isblk()
                else "fifo" if member.isfifo() else f"type {member.type!r}")
        raise PathTraversal(f"archive member {member.name!r} is a {kind}")
    if member.issym():
        # Relative targets without '..' resolve below the link's own directory, which
        # is inside the destination; that holds for chains of such links too.
        _member_parts(member.linkname, f"symlink {member.name!r} target")
    if member.islnk():
        if not _member_parts(member.linkname, f"hardlink {member.name!r} target"):
            raise PathTraversal(f"hardlink {member.name!r} points at the archive root")
    if not parts and not member.isdir():
        raise PathTraversal(f"archive member {member.name!r} names the destination itself")
    return parts


def _open_tar(archive: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(archive, mode="r:gz")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ArchiveError(f"{archive.name}: not a readable tar.gz archive: {exc}") from None


def _members(tar: tarfile.TarFile, archive: Path) -> Iterator[tuple[tarfile.TarInfo, tuple[str, ...]]]:
    count = total = 0
    seen: set[tuple[str, ...]] = set()
    try:
        for member in tar:
            count += 1
            if count > MAX_MEMBERS:
                raise ArchiveError(f"{archive.name}: more than {MAX_MEMBERS} members")
            parts = _check_member(member)
            if member.isfile():
                total += member.size
                if total > MAX_EXTRACTED_BYTES:
                    raise ArchiveError(f"{archive.name}: unpacks to more than "
                                       f"{MAX_EXTRACTED_BYTES} bytes")
            if parts in seen and not member.isdir():
                raise ArchiveError(f"{archive.name}: duplicate member {member.name!r}")
            seen.add(parts)
            yield member, parts
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
        raise ArchiveError(f"{archive.name}: corrupt archive: {exc}") from None


def scan_archive(archive: str | os.PathLike[str]) -> list[str]:
    """Check every member of a tar.gz without extracting; return the member names."""
    path = Path(archive)
    with _open_tar(path) as tar:
        return [m.name for m, _ in _members(tar, path)]


def _extract_into(archive: Path, root: Path) -> None:
    """Extract ``archive`` into the existing empty directory ``root``.

    Modes are normalised (0644, or 0755 for directories and executables; no setuid, no
    sticky bits), owners are not restored, and files are created with O_EXCL|O_NOFOLLOW.
    """
    try:
        _extract_members(archive, str(root))
    except RepositoryError:
        raise
    except OSError as exc:  # e.g. a member under a dangling (inside) symlink
        raise ArchiveError(f"{archive.name}: cannot extract: {exc}") from None


def _extract_members(archive: Path, dir_fd_root: str) -> None:
    with _open_tar(archive) as tar:
        for member, parts in _members(tar, archive):
            if not parts:
                continue
            target = Path(dir_fd_root, *parts)
            parent = target.parent
            parent.mkdir(parents=True, exist_ok=True, mode=0o755)
            if member.isdir():
                if target.is_symlink() or (target.exists() and not target.is_dir()):
                    raise ArchiveError(f"{archive.name}: {member.name!r} is a directory and a file")
                target.mkdir(exist_ok=True, mode=0o755)
            elif member.issym():
                os.symlink(member.linkname, target)
            elif member.islnk():
                source = Path(dir_fd_root, *_member_parts(member.linkname))
                try:
                    os.link(source, target, follow_symlinks=False)
                except OSError as exc:
                    raise ArchiveError(f"{archive.name}: hardlink {member.name!r}: {exc}") from None
            else:
                mode = 0o755 if member.mode & 0o111 else 0o644
                src = tar.extractfile(member)
                if src is None:
                    raise ArchiveError(f"{archive.name}: cannot read {member.name!r}")
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
                with os.fdopen(fd, "wb") as out, src:
                    shutil.copyfileobj(src, out)
                os.chmod(target, mode)


def safe_extract(archive: str | os.PathLike[str], dest: str | os.PathLike[str],
                 replace: bool = False) -> Path:
    """Extract a tar.gz into ``dest`` (which must not exist unless ``replace``).

    Everything is checked first (:class:`PathTraversal` for absolute paths, ``..``, links
    that could point outside, devices and fifos; :class:`ArchiveError` for corrupt or
    oversized archives); then members go into a fresh temporary directory beside ``dest``
    that is renamed into place at the end. On any error ``dest`` is untouched (absent, or
    the previous contents) and the temporary directory is gone.
    """
    archive, dest = Path(archive), Path(dest)
    scan_archive(archive)
    staging = _staging_dir(dest)
    try:
        _extract_into(archive, staging)
        _move_into_place(staging, dest, replace)
    except BaseException:
        _remove(staging)
        raise
    return dest


def _tar_filter_sources(obj_dir: Path) -> list[Path]:
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(obj_dir, followlinks=False):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_NAMES)
        for d in list(dirnames):
            if (here / d).is_symlink():
                raise ManifestError(f"{here / d}: symlinks are not packaged")
            files.append(here / d)
        for name in sorted(filenames):
            if name in SKIP_NAMES or name.endswith((".pyc", ".pyo")):
                continue
            p = here / name
            if p.is_symlink() or not p.is_file():
                raise ManifestError(f"{p}: only regular files are packaged")
            files.append(p)
    return sorted(files, key=lambda p: p.relative_to(obj_dir).as_posix())


def build_archive(obj_dir: str | os.PathLike[str], out: str | os.PathLike[str]) -> str:
    """Pack ``obj_dir``'s contents (archive root = the directory) into a reproducible
    tar.gz — sorted, owner 0, mtime 0, normalised modes — and return its sha256."""
    obj_dir, out = Path(obj_dir), Path(out)
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for path in _tar_filter_sources(obj_dir):
                rel = path.relative_to(obj_dir).as_posix()
                info = tarfile.TarInfo(rel)
                info.mtime = 0
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                if path.is_dir():
                    info.type = tarfile.DIRTYPE
                    info.mode = 0o755
                    tar.addfile(info)
                else:
                    info.size = path.stat().st_size
                    info.mode = 0o755 if os.access(path, os.X_OK) else 0o644
                    with open(path, "rb") as f:
                        tar.addfile(info, f)
    data = buf.getvalue()
    _atomic_write(out, data)
    return hashlib.sha256(data).hexdigest()


class ArchiveCache:
    """Archives a VM already fetched, keyed by (service, version, sha256).

    A hit is re-hashed before use, so a damaged cache entry is dropped, never trusted.
    Entries are written with a temporary file and ``rename``.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def path_for(self, service: str, version: str, sha256: str) -> Path:
        _check_re(service, NAME_RE, "service name")
        _check_re(version, VERSION_RE, "version")
        _check_re(sha256, SHA256_RE, "sha256")
        return self.root / service / version / f"{sha256}.tar.gz"

    def get(self, service: str, version: str, sha256: str) -> Path | None:
        path = self.path_for(service, version, sha256)
        try:
            if not stat.S_ISREG(path.lstat().st_mode):
                return None
        except FileNotFoundError:
            return None
        if not hmac.compare_digest(sha256_file(path), sha256):
            log.warning("cache entry %s is damaged; dropping it", path)
            path.unlink(missing_ok=True)
            return None
        return path

    def put(self, service: str, version: str, sha256: str, source: str | os.PathLike[str]) -> Path:
        """Store a copy of ``source``, which must hash to ``sha256``."""
        actual = sha256_file(source)
        if not hmac.compare_digest(actual, sha256):
            raise TamperedArchive(f"refusing to cache {source}: sha256 {actual} is not {sha256}")
        path = self.path_for(service, version, sha256)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".put-", dir=path.parent)
        os.close(fd)
        try:
            shutil.copyfile(source, tmp)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    def entries(self) -> list[tuple[str, str, str]]:
        """Every (service, version, sha256) in the cache."""
        out = []
        if not self.root.is_dir():
            return out
        for p in sorted(self.root.glob("*/*/*.tar.gz")):
            out.append((p.parent.parent.name, p.parent.name, p.name[: -len(".tar.gz")]))
        return out
