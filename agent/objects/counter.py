"""The counter object: counts the requests it served, across every move.

A migration that loses or repeats state shows up at once in its replies, which is why the
handoff experiment uses it.
"""

from __future__ import annotations

from agent.sdk import JSON, MobileObject, RequestError


class Counter(MobileObject):
    """``{"op": "incr"}`` adds one and returns the count; ``{"op": "get"}`` only reads it."""

    def __init__(self) -> None:
        self.count = 0

    def handle(self, request: dict[str, JSON]) -> dict[str, JSON]:
        op = request.get("op", "incr")
        if op == "incr":
            self.count += 1
        elif op != "get":
            raise RequestError(f"unknown op {op!r}")
        return {"count": self.count}

    def get_state(self) -> JSON:
        return {"count": self.count}

    def set_state(self, state: JSON) -> None:
        self.count = int(state["count"])
