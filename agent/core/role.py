"""What a role is: the one interface through which the daemon runs every piece of an agent.

A router's agent is a set of roles (discovery, the object agent, hosting, migration, the VM
manager; the broker next), composed by :class:`agent.core.daemon.AgentDaemon`. A role brings
its own state, sockets and timers, the control commands it adds and the in-band message types
it handles, each with the check that authenticates it. The daemon only owns the loop, the
control socket, the TCP 4340 peer socket and the dispatch tables built from the roles, so a new
role is one new module and one line in :data:`agent.roles.ROLES`. See
docs/architecture.md.

Like CORE's service plug-ins and IPMininet's daemon objects, a role has a fixed life cycle:
``wanted`` (does this router's configuration ask for it) → ``__init__`` (no I/O) → ``start``
(sockets, tasks) → ``stop`` (undo everything ``start`` did, never raise).
"""

from __future__ import annotations

import asyncio
import inspect
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, ClassVar, Optional, Protocol, TypeVar, Union

from packets import ControlMessage, ControlType

from agent.core.config import AgentConfig

#: A control command: keyword arguments from the request, result JSON-serialisable.
Command = Callable[..., Any]
#: Checks an in-band message for its sender and returns its body without the authenticator;
#: raises :class:`agent.core.errors.ControlError` to refuse it.
Authenticator = Callable[[ControlMessage], dict]
#: Serves an authenticated in-band message (its body) and returns the answer body.
InBandHandler = Callable[[ControlMessage, dict], Awaitable[dict]]


@dataclass(frozen=True)
class InBand:
    """One in-band message type a role serves on TCP 4340, and who may send it."""

    handler: InBandHandler
    authenticate: Authenticator
    #: The type of the answer on the wire (LEASE_REQUEST is answered by a LEASE_GRANT);
    #: None: the request's own type.
    answer: Optional[ControlType] = None


@dataclass(frozen=True)
class Periodic:
    """A timer of a role: ``job`` (sync or async) every ``period`` seconds, failures logged."""

    name: str
    period: Union[float, Callable[[], float]]
    job: Callable[[], Any]

    def interval(self) -> float:
        return float(self.period() if callable(self.period) else self.period)


R = TypeVar("R", bound="Role")


class AgentContext(Protocol):
    """What a role may use of the daemon that runs it (:class:`agent.core.daemon.AgentDaemon`
    is the one implementation; unit tests pass small fakes)."""

    config: AgentConfig
    loop: Optional[asyncio.AbstractEventLoop]
    #: Interface name -> index, and back.
    ifindex: dict[str, int]
    iface_by_index: dict[int, str]

    def role(self, cls: type[R]) -> Optional[R]:
        """This router's instance of role ``cls``, or None."""

    def require(self, cls: type[R]) -> R:
        """Like :meth:`role`; raises ControlError when the router does not run ``cls``."""


class Role:
    """Base class of every role. Subclasses override what they need; the defaults do nothing.

    Control commands are the role's methods named ``cmd_<command>`` (the convention of
    :class:`cmd.Cmd`'s ``do_*``): :meth:`commands` collects them, so adding a command is
    writing one method.
    """

    #: The role's name in logs, ``moat show status`` and errors.
    name: ClassVar[str] = "role"

    def __init__(self, agent: AgentContext) -> None:
        self.agent = agent
        self.config: AgentConfig = agent.config

    @classmethod
    def wanted(cls, config: AgentConfig) -> bool:
        """Whether a router with ``config`` runs this role (default: every router)."""
        return True

    async def start(self) -> None:
        """Open sockets and set up state; called in :data:`ROLES` order."""

    async def stop(self) -> None:
        """Undo :meth:`start`; called in reverse order at shutdown; must not raise."""

    def housekeeping(self) -> None:
        """Expire what is due; called every :data:`HOUSEKEEPING_PERIOD` seconds."""

    def periodic(self) -> list[Periodic]:
        """Timers of this role besides housekeeping (advertisements, lifecycle checks)."""
        return []

    def commands(self) -> dict[str, Command]:
        """The control commands this role adds: ``cmd_<name>`` methods by name."""
        return {name[4:]: getattr(self, name) for name, _ in
                inspect.getmembers(type(self), inspect.isfunction) if name.startswith("cmd_")}

    def in_band(self) -> dict[ControlType, InBand]:
        """The in-band (TCP 4340) message types this role serves, with their authentication."""
        return {}

    def status(self) -> dict[str, Any]:
        """This role's part of the ``status`` command."""
        return {}

    @property
    def malformed(self) -> int:
        """Messages this role dropped as malformed (summed into ``status``)."""
        return 0
