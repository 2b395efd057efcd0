"""What a corresponding object asks the broker for: one service, or a goal between formats.

Patent Fig. 12, step 202: a request may name a desired service ("text2html") or a desired
result that needs a combination of services ("text -> rtf", the patent's example), which the
broker meets with a dynamic service path (:mod:`agent.broker.paths`).
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.broker.errors import BadRequest
from agent.broker.wire import check_name

ARROW = "->"


@dataclass(frozen=True)
class Goal:
    """Turn data in format ``source`` into format ``sink`` (e.g. text -> rtf)."""

    source: str
    sink: str

    def __post_init__(self) -> None:
        check_name(self.source, "goal source format")
        check_name(self.sink, "goal sink format")
        if self.source == self.sink:
            raise BadRequest(f"goal {self} goes nowhere: source and sink are the same format")

    @staticmethod
    def is_goal(target: str) -> bool:
        """Whether a request target names a goal rather than a service."""
        return ARROW in target

    @classmethod
    def parse(cls, target: str) -> "Goal":
        """``"text -> rtf"`` (spaces optional) as a Goal; BadRequest otherwise."""
        if not isinstance(target, str) or target.count(ARROW) != 1:
            raise BadRequest(f"goal {target!r} must read 'source -> sink'")
        source, sink = (part.strip() for part in target.split(ARROW))
        return cls(source, sink)

    def __str__(self) -> str:
        return f"{self.source} {ARROW} {self.sink}"
