"""Red-team row "messages": the lead reads site ids and reason categories, never
`node-<id>: its status is unknown` or a refused approval shown as an empty budget."""

from __future__ import annotations

import json
from pathlib import Path

from medfed.coordinator.rounds import registered_sites
from medfed.coordinator.scheduler import SchedulePolicy, SiteStatus, plan_round
from medfed.coordinator.site_status import unknown_status

POLICY = SchedulePolicy(min_sites=1, deadline_s=60, local_steps=5, sample_rate=0.1)


def test_a_site_that_never_answered_is_named_by_its_registration(tmp_path: Path) -> None:
    registered = tmp_path / "registered-nodes.json"
    registered.write_text(json.dumps({"hospital-2": "8812", "hospital-1": "17"}))
    known = registered_sites(str(registered))
    assert unknown_status(8812, known, "no answer").site_id == "hospital-2"
    assert unknown_status(99, known, "no answer").site_id == "node-99"  # not registered here
    assert registered_sites("") == {}


def _status(site: str, **changes: object) -> SiteStatus:
    values: dict[str, object] = {
        "node_id": hash(site) % 1000,
        "site_id": site,
        "throughput_sps": 100.0,
        "patients": 200,
        "budget_left": 0.0,
    }
    values.update(changes)
    return SiteStatus(**values)  # type: ignore[arg-type]


def test_the_reason_category_the_site_gave_is_what_the_lead_reads() -> None:
    plan = plan_round(
        [
            _status("not-approved-site", preflight="not-approved"),
            _status("spent-site", preflight="no-budget", budget_left=0.4),
            _status("tampered-site", preflight="records-unverified", budget_left=3.0),
            _status("good-site", budget_left=3.0),
        ],
        POLICY,
        now=0.0,
    )
    assert plan.refused == {
        "not-approved-site": "the study is not approved at the site",
        "spent-site": "out of privacy budget for this round (epsilon left 0.4)",
        "tampered-site": "its privacy records do not verify (its officer must review them)",
    }
    assert [p.site_id for p in plan.planned] == ["good-site"]


def test_a_secure_round_plans_no_site_of_unknown_status() -> None:
    secure = SchedulePolicy(min_sites=1, deadline_s=60, local_steps=5, sample_rate=0.1, secure=True)
    statuses = [SiteStatus(5, "silent-site", known=False), _status("good", budget_left=3.0)]
    plan = plan_round(statuses, secure, now=0.0)
    assert [p.site_id for p in plan.planned] == ["good"]
    assert "pre-flight" in plan.refused["silent-site"]
    assert [p.site_id for p in plan_round(statuses, POLICY, now=0.0).planned] == [
        "good",
        "silent-site",
    ]
