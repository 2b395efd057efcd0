"""Typed errors of the agent daemon."""

from __future__ import annotations


class AgentError(Exception):
    """Base class of agent errors."""


class ConfigError(AgentError):
    """An agent configuration that cannot be used (missing field, bad key, bad address)."""


class RegistrationFailed(AgentError):
    """A registration client could not register through any foreign agent."""

    def __init__(self, reason: str, code: int | None = None) -> None:
        self.code = code
        super().__init__(reason if code is None else f"{reason} (code {code})")


class ControlError(AgentError):
    """A control-socket request that cannot be served (unknown command, bad arguments)."""
