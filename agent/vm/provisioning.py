"""Fig. 5, steps 86-94: fetch a VM's service from the remote site, check it, install it.

One function, :func:`fetch_verify_install`, that the VM manager calls for a new VM and for an
upgrade. Every check happens on the fetched copy before anything is installed; the copy is
removed whatever the outcome (a refusal leaves no file behind), and every refusal is a
:class:`agent.vm.errors.ProvisionError` naming its step. Reading, hashing and unpacking run in
worker threads, off the agent's event loop.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from agent.vm.errors import ProvisionError


async def fetch_verify_install(baseline: Any, vm: Any, now: Callable[[], float] = time.time,
                               dest: Path | None = None, *, pool: Any = None,
                               versions: Any = None, allow_offline: bool = False) -> None:
    """Fetch ``vm.service`` into a scratch copy, check its manifest and resources, verify and
    install it into the VM's directory; sets ``vm.version``, ``vm.installed``, ``vm.policy``.
    ``now`` dates the steps (the manager's clock); ``dest``: install there instead of the
    VM's directory (an upgrade installs beside the version that runs, so it can roll back).

    Warm provisioning (issue 14): ``pool`` is the router's
    :class:`~agent.vm.session_pool.SessionPool` (the fetch runs on its kept session to the
    site), ``versions`` its :class:`~agent.vm.version_cache.VersionCache` (a version kept
    whole is not downloaded again: only its metadata, the probe, is read), and
    ``allow_offline`` lets a site that cannot be reached give the cache's copy of the version
    it served last. Whatever brought the copy, it is checked and verified here (signature,
    hashes, every archive member) before it is installed."""
    from agent.vm.errors import RepositoryError
    from agent.vm.repository import inspect_service, install_service
    from agent.vm.signing import load_public_key

    site = baseline.site
    if site is None:
        raise ProvisionError("fetch", "this router knows no remote site")
    storage = Path(baseline.storage)
    fetched = storage / "fetched" / f"{vm.name}-{vm.service}"
    try:
        try:
            result = await asyncio.to_thread(
                _fetch, site, vm.service, fetched, storage, pool, versions, allow_offline)
        except RepositoryError as exc:
            raise ProvisionError("fetch", f"{type(exc).__name__}: {exc}") from None
        vm.steps.append((f"fetched ({_how(result)})", now()))
        try:
            # Reads, hashes and checks the archive: off the loop.
            manifest, _policy, _kid = await asyncio.to_thread(inspect_service, fetched)
        except RepositoryError as exc:
            raise ProvisionError("manifest", f"{type(exc).__name__}: {exc}") from None
        _check_service(manifest.service, vm.service, "manifest")
        _check_part(vm, manifest)
        vm.steps.append(("resources sufficient", now()))
        dest = dest if dest is not None else storage / "installed" / vm.name
        try:
            keys = [load_public_key(Path(k)) for k in vm.authorized]
            verified = await asyncio.to_thread(install_service, fetched, keys, dest, replace=True)
        except RepositoryError as exc:
            raise ProvisionError("credentials", f"{type(exc).__name__}: {exc}") from None
    finally:
        await asyncio.to_thread(shutil.rmtree, fetched, ignore_errors=True)
    vm.version, vm.installed = verified.manifest.version, str(dest)
    vm.policy = {**verified.policy.to_json(), **vm.policy}  # the VM's terms override the provider's
    vm.steps.append((f"verified and installed {vm.service} {vm.version} (signer {verified.key_id})",
                     now()))
    if verified.manifest.requires:
        await resolve_dependencies(baseline, vm, verified.manifest.requires, dest, now,
                                   pool=pool, versions=versions, allow_offline=allow_offline)


def _fetch(site: Any, service: str, fetched: Path, storage: Path, pool: Any, versions: Any,
           allow_offline: bool) -> Any:
    """One fetch into a clean scratch copy (blocking: run in a worker thread)."""
    from agent.vm import fetch as fetch_mod

    shutil.rmtree(fetched, ignore_errors=True)
    warm: dict[str, Any] = {}
    if pool is not None:
        warm["pool"] = pool
    if versions is not None:
        warm.update(versions=versions, allow_offline=allow_offline)
    return fetch_mod.fetch_service(
        site.address, site.port, site.user, site.client_key, site.known_host_key, service,
        fetched, cache_dir=storage / "cache", replace=True, **warm)


def _how(result: Any) -> str:
    """What a fetch did, for the VM's steps: bytes read, archives not read, the session."""
    parts = [f"{getattr(result, 'bytes_downloaded', 0)} bytes", f"{len(result.cached)} cached"]
    if getattr(result, "offline", False):
        parts.append("site unreachable: the cached version it served last")
    elif getattr(result, "version_cached", False):
        parts.append("version cached")
    session = getattr(result, "session", "")
    if session:
        parts.append(f"{session} session")
    return ", ".join(parts)


async def resolve_dependencies(baseline: Any, vm: Any, services: tuple[str, ...], dest: Path,
                               now: Callable[[], float] = time.time, *, pool: Any = None,
                               versions: Any = None, allow_offline: bool = False) -> None:
    """Fig. 12 step 214: every service the manifest requires is fetched from the remote site
    and verified against the VM's authorized providers, and installed beside the service
    (``<installed>/requires/<service>``, removed with the VM); any that cannot be is a
    refusal at step ``dependencies``."""
    from agent.vm.errors import RepositoryError
    from agent.vm.files import _read_limited
    from agent.vm.manifest import MANIFEST_FILE, MAX_METADATA_BYTES, Manifest
    from agent.vm.repository import install_service
    from agent.vm.signing import load_public_key

    site, storage = baseline.site, Path(baseline.storage)
    keys = [load_public_key(Path(k)) for k in vm.authorized]
    for service in services:
        fetched = storage / "fetched" / f"{vm.name}-requires-{service}"
        try:
            await asyncio.to_thread(_fetch, site, service, fetched, storage, pool, versions,
                                    allow_offline)
            claimed = Manifest.from_bytes(await asyncio.to_thread(
                _read_limited, fetched / MANIFEST_FILE, MAX_METADATA_BYTES, "manifest"))
            _check_service(claimed.service, service, "dependencies")
            verified = await asyncio.to_thread(install_service, fetched, keys,
                                               dest / "requires" / service, replace=True)
        except (RepositoryError, OSError) as exc:
            raise ProvisionError("dependencies", f"{vm.service} requires {service}: "
                                 f"{type(exc).__name__}: {exc}") from None
        finally:
            await asyncio.to_thread(shutil.rmtree, fetched, ignore_errors=True)
        vm.steps.append((f"dependency {service} {verified.manifest.version} fetched and "
                         f"verified (signer {verified.key_id})", now()))


def _check_service(got: str, asked: str, step: str) -> None:
    """The fetched manifest is the one asked for: a correctly signed manifest of another
    service (the site's link pointing elsewhere, a cache mix-up) is refused, not installed
    under this service's name. :func:`agent.vm.fetch.download_service` checks it too; this
    holds whatever brought the copy."""
    if got != asked:
        raise ProvisionError(step, f"asked for service {asked!r}, the fetched manifest is for "
                             f"{got!r}")


def _check_part(vm: Any, manifest: Any) -> None:
    """The objects asked for exist, and the part to run fits the VM's resources (step 90)."""
    unknown = (set(vm.only) | set(vm.mobile)) - {o.name for o in manifest.objects}
    if unknown:
        raise ProvisionError("manifest", f"service {vm.service} has no object(s) {sorted(unknown)}")
    part = [o for o in manifest.objects if not vm.only or o.name in vm.only]
    need_cpu = sum(o.resources.cpu for o in part)
    need_mem = sum(o.resources.memory_mb for o in part)
    need_pids = sum(o.resources.pids for o in part)
    if need_cpu > vm.cpu or need_mem > vm.memory_mb or need_pids > vm.pids:
        raise ProvisionError("resources", f"the service needs cpu {need_cpu}, {need_mem} MiB, "
                             f"{need_pids} pids; the VM has cpu {vm.cpu}, {vm.memory_mb} MiB, "
                             f"{vm.pids} pids")
