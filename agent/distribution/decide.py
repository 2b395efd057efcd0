"""Move all of a service or a part of it (patent Fig. 12, step 216): the documented rule.

A lease asks for a *target*: a service name or the name of one of its objects (step 204).
The rule: when the target names one object of a service that has more than one, that part
is what does not fit, so that part moves (secondary objects, step 218); otherwise the whole
service is duplicated (step 222).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Move:
    """``all``: duplicate the service; ``part``: move object ``part`` as a secondary."""

    kind: str
    part: str = ""

    @property
    def whole(self) -> bool:
        return self.kind == "all"


def all_or_part(target: str, service: str, objects: list[str]) -> Move:
    """Step 216 by the rule above."""
    if target != service and target in objects and len(objects) > 1:
        return Move("part", target)
    return Move("all")
