"""The upgrade row of ``moat run faults`` without a network: its story line, which losses
the cut site caused and which the upgrade's swap, and the injector's refusals."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from experiments.faults import injector as inj
from experiments.faults.driver import _upgrade_losses, _upgrade_summary
from experiments.faults.timeline import Request

AT = 1000.0


def req(seq: int, sent: float, answered: bool) -> Request:
    return Request("c", seq, AT + sent, AT + sent + 0.01 if answered else None, (seq,) if answered else ())


def made(**kw: Any) -> dict[str, Any]:
    return {"victim": "site24", "vm": "counter-vm", "from": "1.0", "to": "2.0", "at": AT,
            "refused_at": AT + 5.0, "error": {"step": "upgrade: fetch", "reason": "SiteUnreachable"},
            "version_after_refusal": "1.0", "site_back_at": AT + 5.1, "upgraded_at": AT + 6.8,
            "version_after": "2.0", "ended": AT + 6.8, **kw}


def test_losses_are_split_at_the_sites_return() -> None:
    requests = [req(1, -2.0, False), req(2, -0.5, False), req(3, 2.0, False), req(4, 3.0, True),
                req(5, 5.9, False), req(6, 6.5, False), req(7, 7.0, True)]
    # Seq 1 is older than the row's lead (a second before the fault): not the fault's.
    assert _upgrade_losses(requests, made()) == (
        "lost while the site was cut and the upgrade refused: 2; after, during the upgrade's "
        "swap: 2 (sent +5.90..+6.50s)")


def test_the_story_says_what_did_not_happen() -> None:
    line = _upgrade_summary(made(refused_at=None, upgraded_at=None, version_after="1.0"))
    assert "NOT refused" in line and "NOT upgraded once the site was back (runs 1.0)" in line
    line = _upgrade_summary(made())
    assert "refused at +5.0s (upgrade: fetch: SiteUnreachable), still 1.0" in line
    assert "upgraded 1.0 -> 2.0 at +6.8s (runs 2.0)" in line


class FakeClient:
    def __init__(self, vms: list[dict[str, Any]]) -> None:
        self.vms = vms
        self.calls: list[tuple[str, str]] = []

    def call(self, router: str, cmd: str, timeout: float = 0, **args: Any) -> Any:
        self.calls.append((router, cmd))
        return self.vms if cmd == "vm" else {}


@pytest.mark.parametrize("vms, why", [([], "runs no VM counter-vm"),
                                      ([{"name": "counter-vm", "version": "2.0"}], "already runs 2.0")])
def test_the_injector_refuses_an_upgrade_it_cannot_make_and_touches_nothing(vms: list, why: str) -> None:
    client = FakeClient(vms)
    moat = SimpleNamespace(client=client, site="site24")
    published = []
    with pytest.raises(inj.InjectionError, match=why):
        inj.upgrade_site_down(moat, "r18b", "counter-vm", lambda: published.append(1), "2.0")
    assert published == [] and [c for _, c in client.calls] == ["vm"]
