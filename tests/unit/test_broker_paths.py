"""agent.broker.paths: dynamic service paths (patent Fig. 12, step 202) — the patent's text to
RTF example, choosing by cost and switching paths when a hop lacks capacity."""

from __future__ import annotations

import pytest

from agent.broker.admission import Admission
from agent.broker.broker import Broker
from agent.broker.directory import Instance, ServiceDirectory
from agent.broker.goals import Goal
from agent.broker.errors import BadRequest, LeaseDenied
from agent.broker.paths import cost_function, plan
from fakeclock import FakeClock

TEXT_TO_RTF = Goal("text", "rtf")


def converter(service: str, consumes: str, produces: str, router: str, n: int,
              share: float = 100.0, cpu: float = 1.0, processing_cost: float = 1.0) -> Instance:
    return Instance(service, f"{service}@{router}", f"10.0.{n}.10", 4000, router, share, cpu,
                    consumes=consumes, produces=produces, processing_cost=processing_cost)


PATENT = [converter("text2html", "text", "html", "r1", 1),
          converter("html2rtf", "html", "rtf", "r2", 2),
          converter("text2word", "text", "word", "r3", 3),
          converter("word2rtf", "word", "rtf", "r4", 4)]


def services(hops: list[Instance]) -> list[str]:
    return [h.service for h in hops]


@pytest.mark.parametrize("costs, expected", [
    ({"r1": 1, "r2": 1, "r3": 5, "r4": 5}, ["text2html", "html2rtf"]),
    ({"r1": 5, "r2": 5, "r3": 1, "r4": 1}, ["text2word", "word2rtf"]),
])
def test_the_cheaper_path_is_chosen(costs, expected) -> None:
    assert services(plan(TEXT_TO_RTF, PATENT, lambda i: True, costs)) == expected


@pytest.mark.parametrize("full, expected", [
    ("html2rtf", ["text2word", "word2rtf"]),
    ("word2rtf", ["text2html", "html2rtf"]),
])
def test_a_hop_that_cannot_fit_switches_the_path(full, expected) -> None:
    fits = lambda i: i.service != full  # noqa: E731
    assert services(plan(TEXT_TO_RTF, PATENT, fits)) == expected


def test_no_feasible_path_is_no_capacity_naming_the_full_hops() -> None:
    with pytest.raises(LeaseDenied) as err:
        plan(TEXT_TO_RTF, PATENT, lambda i: i.service not in ("html2rtf", "text2word"))
    assert err.value.reason == "no_capacity"
    assert "html2rtf@r2" in err.value.detail and "text2word@r3" in err.value.detail


@pytest.mark.parametrize("goal", [Goal("text", "pdf"), Goal("pdf", "rtf"), Goal("rtf", "text")])
def test_no_chain_of_services_is_unknown_service(goal) -> None:
    with pytest.raises(LeaseDenied) as err:
        plan(goal, PATENT, lambda i: True)
    assert err.value.reason == "unknown_service"
    assert f"{goal.source} into {goal.sink}" in err.value.detail


def test_of_two_instances_of_a_hop_the_cheaper_one_that_fits_is_used() -> None:
    near = converter("html2rtf", "html", "rtf", "r5", 5)
    instances = PATENT + [near]
    costs = {"r2": 10, "r5": 1, "r3": 50}
    hops = plan(TEXT_TO_RTF, instances, lambda i: True, costs)
    assert [h.instance_id for h in hops] == ["text2html@r1", "html2rtf@r5"]
    hops = plan(TEXT_TO_RTF, instances, lambda i: i is not near, costs)
    assert [h.instance_id for h in hops] == ["text2html@r1", "html2rtf@r2"]


def test_a_single_converter_meets_a_goal_in_one_hop_when_cheaper() -> None:
    direct = converter("text2rtf", "text", "rtf", "r6", 6, processing_cost=1.5)
    assert services(plan(TEXT_TO_RTF, PATENT + [direct], lambda i: True)) == ["text2rtf"]


def test_costs_must_be_finite_and_non_negative() -> None:
    with pytest.raises(ValueError):
        plan(TEXT_TO_RTF, PATENT, lambda i: True, {"r1": -5})
    with pytest.raises(ValueError):
        plan(TEXT_TO_RTF, PATENT, lambda i: True, lambda i: float("nan"))


def test_cost_lookup_by_instance_then_router_then_address() -> None:
    i = PATENT[0]
    assert cost_function({"text2html@r1": 1, "r1": 2})(i) == 1
    assert cost_function({"r1": 2, "10.0.1.10": 3})(i) == 2
    assert cost_function({"10.0.1.10": 3})(i) == 3
    assert cost_function({}, unknown=7)(i) == 7


@pytest.mark.parametrize("text", ["text", "text -> text", "-> rtf", "a -> b -> c", "a b -> c"])
def test_bad_goals(text) -> None:
    with pytest.raises(BadRequest):
        Goal.parse(text)


def test_goal_parse() -> None:
    assert Goal.parse("text->rtf") == Goal.parse(" text  ->  rtf ") == TEXT_TO_RTF


def test_with_admission_the_second_co_gets_the_other_path_and_the_first_after_release() -> None:
    clock = FakeClock(0.0)
    broker = Broker(clock=clock, wall_clock=FakeClock(1.7e9),
                    network_cost=lambda net, i: {"r1": 1, "r2": 1}.get(i.router, 3))
    for instance in PATENT:
        broker.register_instance(instance)
    first = broker.request("co1", "text -> rtf", 60, 0.5)
    second = broker.request("co2", "text -> rtf", 60, 0.5)
    assert [h.service for h in first.hops] == ["text2html", "html2rtf"]
    assert [h.service for h in second.hops] == ["text2word", "word2rtf"]
    with pytest.raises(LeaseDenied) as err:
        broker.request("co3", "text -> rtf", 60, 0.5)
    assert err.value.reason == "no_capacity"
    broker.cancel(first.hops[1].lease_id, "co1")  # frees html2rtf only
    broker.cancel(first.hops[0].lease_id, "co1")
    third = broker.request("co3", "text -> rtf", 60, 0.5)
    assert [h.service for h in third.hops] == ["text2html", "html2rtf"]


def test_plan_uses_admission_fits_on_cpu_as_well_as_share() -> None:
    directory = ServiceDirectory()
    for instance in PATENT:
        directory.register(instance)
    admission = Admission(directory, clock=FakeClock(0.0))
    admission.hold("x", PATENT[0], 10.0, 0.9)  # text2html: share free, CPU not
    hops = plan(TEXT_TO_RTF, directory, lambda i: admission.fits(i, 10.0, 0.5))
    assert services(hops) == ["text2word", "word2rtf"]
