"""Red-team row "round bound to fail": sites whose own pre-flight refuses this round are
not planned into a secure round, so nobody trains (and spends) for a round that aborts.
Real ClientApp handlers and ledgers of demo sites, in-process, over a fake Grid."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from flwr.app import MessageType

from medfed.client import client_app
from medfed.coordinator.rounds import Clock, run_study
from medfed.model import wire
from medfed.model.contract import DEMO_CONTRACT as CONTRACT
from tests.integration.test_integration_rounds import (
    HANDLERS,
    RUN_ID,
    FakeGrid,
    Reports,
    consortium,
    run,
    study,
)
from tests.sitekit import rewrite_policy

pytestmark = [pytest.mark.usefixtures("server_identity", "status_queries"), pytest.mark.slow]


@pytest.fixture
def status_queries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(HANDLERS, MessageType.QUERY, client_app.query)  # type: ignore[arg-type]


class Waited(Exception):
    """The round loop chose to wait for sites instead of training."""


def _no_budget(site_toml: Path) -> None:
    """A dataset cap far below what the study asks: some epsilon is left, so a status
    of 'budget left' alone would plan the site, but the round's noise cannot fit."""
    rewrite_policy(site_toml, epsilon_cap=0.05)


def test_a_site_whose_pre_flight_fails_is_not_planned_and_spends_nothing(
    tmp_path: Path,
) -> None:
    settings = study(secure_aggregation=True, num_server_rounds=1, min_sites=2)
    sites = consortium(tmp_path, settings)
    _no_budget(sites.site_toml("hospital-3"))
    results = run(FakeGrid(sites.contexts()), settings)

    assert results.status == "completed"
    record = results.per_round[0]
    assert sorted(record.participants) == ["hospital-1", "hospital-2"]
    assert sites.ledger("hospital-3").records() == []
    # hospital-1 trained once (its round's spend); its other rows are the releases of its
    # noised patient count, the round's metrics and an evaluation's.
    trained = [r for r in sites.ledger("hospital-1").records() if r.run_id == RUN_ID]
    assert [r.round for r in trained] == [1]
    assert record.refused["hospital-3"].startswith("out of privacy budget for this round")


def test_too_few_sites_pass_pre_flight_so_the_round_waits_and_nobody_trains(
    tmp_path: Path,
) -> None:
    settings = study(secure_aggregation=True, num_server_rounds=1, min_sites=2)
    sites = consortium(tmp_path, settings)
    for site in ("hospital-2", "hospital-3"):
        _no_budget(sites.site_toml(site))
    grid = FakeGrid(sites.contexts())

    def sleep(seconds: float) -> None:
        raise Waited

    with pytest.raises(Waited):
        run_study(
            grid,  # type: ignore[arg-type]
            settings,
            CONTRACT,
            run_id=RUN_ID,
            report=Reports(),
            connect_timeout_s=5.0,
            clock=Clock(now=time.time, sleep=sleep),
        )
    assert not [d for d in grid.deliveries if d.message_type == MessageType.TRAIN]
    assert not [d for d in grid.deliveries if d.message_type == wire.SECAGG_KEYS]
    # hospital-1 answered its status with its noised patient count (charged); nobody
    # spent anything on training.
    (count,) = sites.ledger("hospital-1").records()
    assert count.study == "medfed:patient-count"
    for site in ("hospital-2", "hospital-3"):
        assert sites.ledger(site).records() == []
