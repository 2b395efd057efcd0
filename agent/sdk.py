"""The SDK a mobile object is written against: all an object program imports from MOAT.

An object is a class with three methods. The runtime (:mod:`agent.hosting.runner`) calls ``handle``
once per request, in order, never concurrently; ``get_state``/``set_state`` move the object
with its state when it migrates. State and requests are JSON values, so an object can move
between routers (and versions) without sharing code objects.

    from agent.sdk import MobileObject

    class Counter(MobileObject):
        def __init__(self):
            self.count = 0
        def handle(self, request):
            self.count += 1
            return {"count": self.count}
        def get_state(self):
            return {"count": self.count}
        def set_state(self, state):
            self.count = int(state["count"])
"""

from __future__ import annotations

from typing import Any

JSON = Any


class MobileObject:
    """Base class of mobile objects. Subclasses override the three methods."""

    def handle(self, request: dict[str, JSON]) -> dict[str, JSON]:
        """Serve one request; return the reply body. Exceptions become error replies."""
        raise NotImplementedError

    def get_state(self) -> JSON:
        """Everything needed to continue elsewhere, as a JSON value."""
        return None

    def set_state(self, state: JSON) -> None:
        """Continue from a state produced by ``get_state`` (possibly on another router)."""


class RequestError(Exception):
    """Raised by ``handle`` for a request it refuses; the message goes back to the client."""
