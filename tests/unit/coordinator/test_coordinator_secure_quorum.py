"""Issue 17: `medfed demo --simulation --sites 20` failed in round 1 with "16 sites
planned, secure aggregation needs 20". The demo's study asked for every site (min-sites
= sites), a secure round plans only sites whose status is known, and one site that
answered a status query with an error was never asked again in the run. The demo now
needs a majority, and under secure aggregation a site is asked again every round."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from flwr.app import Message

from medfed.consortium import demo_min_sites, demo_study
from medfed.coordinator.rounds import schedule_policy
from medfed.coordinator.scheduler import SiteStatus, plan_round
from medfed.coordinator.secure_rounds import secure_threshold
from medfed.coordinator.site_status import query_statuses
from tests.fakesites import FakeGrid, FakeSite, consortium, study

pytestmark = pytest.mark.usefixtures("server_identity")


def _status(node: int) -> SiteStatus:
    return SiteStatus(node, f"hospital-{node}", throughput_sps=500.0, patients=400)


def test_a_twenty_site_demo_goes_on_without_four_silent_sites() -> None:
    settings = demo_study(rounds=2, sites=20, target_epsilon=3.0, seed=7, local_steps=3)
    assert settings.secure_aggregation and settings.min_sites == 11
    statuses = [_status(node) for node in range(1, 17)] + [
        SiteStatus(node, f"hospital-{node}", known=False, unknown_reason="did not answer")
        for node in range(17, 21)
    ]
    plan = plan_round(statuses, schedule_policy(settings), now=0.0)

    assert plan.action == "train" and len(plan.planned) == 16
    assert set(plan.refused) == {f"hospital-{node}" for node in range(17, 21)}
    # the threshold the secure round then asks for: more than half of the 16, met
    assert secure_threshold(settings, len(plan.planned)) == 11


def test_the_old_demo_study_could_not_plan_that_round() -> None:
    """The same statuses with min-sites = every site: no round at all (the failure)."""
    settings = demo_study(rounds=2, sites=20, target_epsilon=3.0, seed=7)
    every_site = settings.model_copy(update={"min_sites": 20})
    statuses = [_status(node) for node in range(1, 17)] + [
        SiteStatus(node, f"hospital-{node}", known=False) for node in range(17, 21)
    ]
    assert plan_round(statuses, schedule_policy(every_site), now=0.0).action == "wait"
    assert secure_threshold(every_site, 16) == 20


@pytest.mark.parametrize(("sites", "minimum"), [(1, 1), (2, 2), (3, 2), (4, 3), (20, 11)])
def test_the_demo_needs_a_majority_of_its_sites(sites: int, minimum: int) -> None:
    assert demo_min_sites(sites) == minimum
    assert demo_study(rounds=1, sites=sites, target_epsilon=3.0, seed=1).min_sites == minimum


@dataclass
class FlakySite(FakeSite):
    """Answers its first `errors` status queries with an error, then normally."""

    errors: int = 1
    queries: int = field(default=0)

    def query(self, message: Message) -> Message:
        self.queries += 1
        if self.queries <= self.errors:
            saved, self.status = self.status, None
            try:
                return super().query(message)
            finally:
                self.status = saved
        return super().query(message)


def _flaky_consortium() -> dict[int, FakeSite]:
    sites = consortium()
    sites[9003] = FlakySite("hospital-3", 80, status={})
    return sites


def _ask_twice(secure: bool) -> tuple[list[Any], list[Any], FlakySite]:
    grid = FakeGrid(_flaky_consortium())
    settings = study(None, secure_aggregation=secure, round_timeout_s=2.0)
    known: dict[int, str] = {}
    unqueryable: set[int] = set()
    nodes = [9001, 9002, 9003]
    first = query_statuses(grid, nodes, settings, "run", 1, known, unqueryable)  # type: ignore[arg-type]
    second = query_statuses(grid, nodes, settings, "run", 2, known, unqueryable)  # type: ignore[arg-type]
    flaky = grid.sites[9003]
    assert isinstance(flaky, FlakySite)
    return first, second, flaky


def test_under_secure_aggregation_a_site_whose_query_failed_once_is_asked_again() -> None:
    first, second, flaky = _ask_twice(secure=True)
    assert not first[2].known
    assert second[2].known and second[2].site_id == "hospital-3"
    assert flaky.queries == 2


def test_without_secure_aggregation_a_site_that_answered_an_error_is_not_asked_again() -> None:
    """Unchanged: there a site of unknown status is planned anyway, and each query costs
    a ClientApp start at a site whose software may have no query function."""
    first, second, flaky = _ask_twice(secure=False)
    assert not first[2].known and not second[2].known
    assert second[2].unknown_reason == "its software answers no status query"
    assert flaky.queries == 1
