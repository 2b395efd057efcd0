"""All-or-nothing file operations shared by the repository modules and the fetcher.

Packaging, signing, installing, publishing and fetching all follow one rule: nothing
half-written is ever visible. Files are written to a temporary name and renamed
(:func:`_atomic_write`); directories are assembled in a fresh staging directory beside the
destination (:func:`_staging_dir`) and renamed into place only when complete
(:func:`_move_into_place`), and a failure removes the staging directory (:func:`_remove`).
Metadata files are read with a size limit (:func:`_read_limited`) so a hostile repository
cannot make us read without end. The helpers keep their leading underscore: they are
internal to :mod:`agent.vm`, not an API for other packages.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import tempfile
from pathlib import Path

from agent.vm.errors import ManifestError, RepositoryError

__all__ = ["sha256_file"]


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_limited(path: Path, limit: int, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        raise ManifestError(f"{what} missing: {path}") from None
    except OSError as exc:
        raise ManifestError(f"cannot read {what} {path}: {exc}") from exc
    if len(data) > limit:
        raise ManifestError(f"{what} {path} is larger than {limit} bytes")
    return data


def _atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _staging_dir(dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))


def _move_into_place(staging: Path, dest: Path, replace: bool) -> None:
    """Rename a complete ``staging`` directory to ``dest``; with ``replace`` an existing
    ``dest`` is swapped out (rename aside, rename in, remove the old one)."""
    os.chmod(staging, 0o755)
    if not (dest.exists() or dest.is_symlink()):
        os.rename(staging, dest)
        return
    if not replace:
        raise RepositoryError(f"{dest} already exists")
    old = dest.with_name(f".{dest.name}.old-{secrets.token_hex(4)}")
    os.rename(dest, old)
    try:
        os.rename(staging, dest)
    except BaseException:
        os.rename(old, dest)
        raise
    _remove(old)


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)
