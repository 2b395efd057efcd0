"""Objects that misbehave on purpose, for the robustness tests and attacks on a live run
(issue 12): what the router does with an object whose state cannot move. Placed like any
object (``spec="agent.objects.misbehaving:NaNCounter"``)."""

from __future__ import annotations

from agent.objects.counter import Counter
from agent.sdk import JSON


class NaNCounter(Counter):
    """Counts like the counter; from its third request on its state holds a NaN (a float
    computation gone wrong), which JSON cannot carry: its checkpoint is refused."""

    def get_state(self) -> JSON:
        state = dict(super().get_state())
        if self.count >= 3:
            state["ratio"] = float("nan")
        return state


class Hoarder(Counter):
    """Counts like the counter and keeps 100 KB more state with every request: after eight
    its checkpoint is too large for a move to carry."""

    PIECE = 100_000

    def __init__(self) -> None:
        super().__init__()
        self.hoard: list[str] = []

    def handle(self, request: dict[str, JSON]) -> dict[str, JSON]:
        reply = super().handle(request)
        self.hoard.append(f"{self.count:08d}" * (self.PIECE // 8))
        return reply

    def get_state(self) -> JSON:
        return {"count": self.count, "hoard": list(self.hoard)}

    def set_state(self, state: JSON) -> None:
        super().set_state(state)
        self.hoard = [str(piece) for piece in state.get("hoard", [])]
