"""plan_round: properties over random consortia and a fake clock (Hypothesis), and the
cases a lead relies on, checked against hand-computed step counts and ETAs."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medfed.coordinator.scheduler import (
    COMPUTE_FRACTION,
    RoundPlan,
    SchedulePolicy,
    SiteStatus,
    plan_round,
)

NOW = 1_700_000_000.0
POLICY = SchedulePolicy(min_sites=2, deadline_s=100.0, local_steps=50, sample_rate=0.1)


def site(n: int, **changes: object) -> SiteStatus:
    values: dict[str, object] = {
        "node_id": 100 + n,
        "site_id": f"hospital-{n}",
        "throughput_sps": 100.0,
        "patients": 200,
        "budget_left": 1.0,
    }
    values.update(changes)
    return SiteStatus(**values)  # type: ignore[arg-type]


@st.composite
def statuses(draw: st.DrawFn) -> list[SiteStatus]:
    n = draw(st.integers(min_value=0, max_value=9))
    result = []
    for i in range(n):
        in_window = draw(st.booleans())
        result.append(
            SiteStatus(
                node_id=i,
                site_id=f"s{i}",
                known=draw(st.sampled_from([True, True, True, False])),
                in_window=in_window,
                window_ends=draw(st.sampled_from([0.0, NOW + 5, NOW + 50, NOW + 10_000])),
                next_window_start=0.0
                if in_window
                else draw(st.sampled_from([0.0, NOW + 60, NOW + 3600, NOW + 7200])),
                throughput_sps=draw(st.sampled_from([0.0, 0.5, 3.0, 40.0, 1e3, 5e4, math.nan])),
                budget_left=draw(st.sampled_from([-0.1, 0.0, 0.01, 2.0, math.inf])),
                patients=draw(st.integers(min_value=0, max_value=100_000)),
                approved=draw(st.booleans()),
            )
        )
    return result


policies = st.builds(
    SchedulePolicy,
    min_sites=st.integers(min_value=1, max_value=5),
    deadline_s=st.sampled_from([1.0, 30.0, 600.0, 86_400.0]),
    local_steps=st.integers(min_value=1, max_value=5_000),
    sample_rate=st.sampled_from([0.001, 0.01, 0.1, 1.0]),
)


@settings(max_examples=300, deadline=None)
@given(statuses(), policies)
def test_no_site_is_planned_outside_its_window_out_of_budget_or_unapproved(
    sites: list[SiteStatus], policy: SchedulePolicy
) -> None:
    plan = plan_round(sites, policy, NOW)

    by_node = {s.node_id: s for s in sites}
    for planned in plan.planned:
        status = by_node[planned.node_id]
        if status.known:
            assert status.in_window
            assert status.window_ends == 0 or status.window_ends > NOW
            assert status.budget_left > 0
            assert status.approved
    # Every site is either planned or refused with a reason, never both.
    planned_ids = {p.site_id for p in plan.planned}
    assert planned_ids.isdisjoint(plan.refused)
    if plan.action == "train":
        assert planned_ids | set(plan.refused) == {s.site_id for s in sites}


@settings(max_examples=300, deadline=None)
@given(statuses(), policies)
def test_every_planned_site_finishes_in_time_and_weights_sum_to_one(
    sites: list[SiteStatus], policy: SchedulePolicy
) -> None:
    plan = plan_round(sites, policy, NOW)

    by_node = {s.node_id: s for s in sites}
    if plan.action == "wait":
        assert plan.planned == ()
        assert plan.eta is None or plan.eta > NOW
        return
    assert len(plan.planned) >= policy.min_sites
    assert math.isclose(sum(p.weight for p in plan.planned), 1.0, rel_tol=1e-9)
    for planned in plan.planned:
        status = by_node[planned.node_id]
        assert 1 <= planned.local_steps <= policy.local_steps
        assert planned.weight > 0
        if not status.known:
            assert planned.local_steps == policy.local_steps
            continue
        # Recomputed here: expected batch (at least one sample) over the measured rate.
        seconds = planned.local_steps * max(1.0, policy.sample_rate * status.patients)
        seconds /= status.throughput_sps
        assert seconds <= policy.deadline_s * COMPUTE_FRACTION * (1 + 1e-12)
        if status.window_ends > 0:
            assert NOW + seconds <= status.window_ends * (1 + 1e-15)


@settings(max_examples=200, deadline=None)
@given(statuses(), policies)
def test_a_wait_eta_is_a_time_when_enough_sites_are_in_window(
    sites: list[SiteStatus], policy: SchedulePolicy
) -> None:
    plan = plan_round(sites, policy, NOW)
    if plan.action != "wait" or plan.eta is None:
        return
    # At the ETA, replanning with the sites that were waiting now in their windows
    # (and the clock moved on) does not refuse them for being outside a window.
    moved = [
        SiteStatus(**{**s.__dict__, "in_window": True, "window_ends": 0.0})
        if not s.in_window and 0 < s.next_window_start <= plan.eta
        else s
        for s in sites
    ]
    later = plan_round(moved, policy, plan.eta)
    by_id = {s.site_id: s for s in moved}
    in_window = len(later.planned) + sum(
        1
        for name, reason in later.refused.items()
        if reason.startswith("its training window closes") and by_id[name].window_ends > plan.eta
    )
    assert in_window >= policy.min_sites


def test_a_faster_site_does_more_steps_and_weights_stay_patient_counts() -> None:
    # One step: 0.1 * 200 = 20 samples; deadline 100 s of which 80 s to compute.
    cpu = site(1, throughput_sps=10.0, accelerator="cpu")  # 2 s a step: 40 steps
    gpu = site(2, throughput_sps=400.0, accelerator="cuda", patients=600)  # 0.15 s: capped 50
    slow = site(3, throughput_sps=5.0, patients=200)  # 4 s a step: 20 steps

    plan = plan_round([cpu, gpu, slow], POLICY, NOW)

    assert plan.action == "train"
    steps = {p.site_id: p.local_steps for p in plan.planned}
    assert steps == {"hospital-1": 40, "hospital-2": 50, "hospital-3": 20}
    weights = {p.site_id: p.weight for p in plan.planned}
    assert weights == pytest.approx({"hospital-1": 0.2, "hospital-2": 0.6, "hospital-3": 0.2})


def test_a_window_closing_soon_shortens_the_sites_round() -> None:
    # 2 s a step at 10 samples/s; the window closes in 30 s: 15 steps, not 40.
    closing = site(1, throughput_sps=10.0, window_ends=NOW + 30)
    plan = plan_round([closing, site(2)], POLICY, NOW)

    assert {p.site_id: p.local_steps for p in plan.planned}["hospital-1"] == 15


def test_refused_sites_are_named_with_their_reason() -> None:
    sites = [
        site(1),
        site(2),
        site(3, in_window=False, next_window_start=NOW + 600),
        site(4, budget_left=0.0),
        site(5, approved=False),
        site(6, throughput_sps=0.1),  # 200 s a step: never fits a 100 s deadline
    ]

    plan = plan_round(sites, POLICY, NOW)

    assert [p.site_id for p in plan.planned] == ["hospital-1", "hospital-2"]
    assert plan.refused["hospital-3"] == "outside its training window"
    assert plan.refused["hospital-4"].startswith("out of privacy budget")
    assert plan.refused["hospital-5"] == "the study is not approved at the site"
    assert plan.refused["hospital-6"].startswith("too slow")


def test_too_few_sites_in_window_waits_until_enough_are() -> None:
    sites = [
        site(1, window_ends=NOW + 7200),
        site(2, in_window=False, next_window_start=NOW + 3600),
        site(3, in_window=False, next_window_start=NOW + 1800),
    ]

    assert plan_round(sites, POLICY, NOW).eta == NOW + 1800
    needs_three = SchedulePolicy(3, 100.0, 50, 0.1)
    assert plan_round(sites, needs_three, NOW) == RoundPlan(
        "wait",
        refused={
            "hospital-2": "outside its training window",
            "hospital-3": "outside its training window",
        },
        eta=NOW + 3600,
    )
    # Site 1's window closes before site 2's opens: three are never in at once.
    closing = [site(1, window_ends=NOW + 2000), *sites[1:]]
    assert plan_round(closing, needs_three, NOW).eta is None


def test_a_site_of_unknown_status_is_scheduled_with_the_studys_steps() -> None:
    unknown = SiteStatus(node_id=9, site_id="node-9", known=False)
    plan = plan_round([unknown, site(1, patients=300)], POLICY, NOW)

    assert plan.action == "train"
    planned = {p.site_id: p for p in plan.planned}
    assert planned["node-9"].local_steps == POLICY.local_steps
    assert planned["node-9"].expected_s is None
    # It weighs as the mean of the known sites until its reply carries its count.
    assert planned["node-9"].weight == pytest.approx(0.5)
