"""Every refusal of the logic repository and of fetching from it, one typed error each.

They live in one module so that a caller (the VM manager, ``moat repo``, a test) finds the
whole family in one place and can catch :class:`RepositoryError` for all of them, whether
it was raised by :mod:`agent.vm.manifest`, :mod:`agent.vm.signing`, :mod:`agent.vm.archive`,
:mod:`agent.vm.repository` or :mod:`agent.vm.fetch`.
"""

from __future__ import annotations

from agent.core.errors import AgentError

__all__ = [
    "RepositoryError",
    "ManifestError",
    "UnknownSigner",
    "BadSignature",
    "TamperedArchive",
    "PathTraversal",
    "ArchiveError",
    "FetchError",
    "SiteUnreachable",
    "HostKeyMismatch",
    "AuthenticationFailed",
    "ServiceNotFound",
]


class RepositoryError(AgentError):
    """Base class of everything the repository modules (and :mod:`agent.vm.fetch`) refuse."""


class ManifestError(RepositoryError):
    """A manifest, policy or signature file that is missing, malformed or inconsistent."""


class UnknownSigner(RepositoryError):
    """The service is signed by a key that is not among the trusted provider keys."""


class BadSignature(RepositoryError):
    """The signature does not match the manifest, archive hashes and policy."""


class TamperedArchive(RepositoryError):
    """An archive is missing or its sha256 differs from the (signed) manifest."""


class PathTraversal(RepositoryError):
    """An archive member would land outside the destination, or is a device/fifo."""


class ArchiveError(RepositoryError):
    """An archive that cannot be read or is too large (corrupt gzip, duplicate member)."""


class FetchError(RepositoryError):
    """Fetching a service from the remote site failed (see the subclasses)."""


class SiteUnreachable(FetchError):
    """The remote site did not answer: refused, unreachable, or timed out."""


class HostKeyMismatch(FetchError):
    """The remote site's SSH host key is not the one we were told to expect."""


class AuthenticationFailed(FetchError):
    """The remote site refused our client key."""


class ServiceNotFound(FetchError):
    """The repository has no such service."""


class ProvisionError(AgentError):
    """A provisioning refused at one step of Fig. 5; nothing of it stays installed."""

    def __init__(self, step: str, reason: str) -> None:
        self.step = step
        self.reason = reason
        super().__init__(f"{step}: {reason}")
