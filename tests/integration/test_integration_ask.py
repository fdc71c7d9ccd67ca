"""A query over the four lung example sites in-process: the real ClientApp handler behind
the egress guard, the real site service (ledger, approvals, audit) and the coordinator's
program over an in-memory grid."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from uuid import uuid4

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict

from medfed.analysis.query import AskQuery, query_from
from medfed.asks import load_query_file
from medfed.client import client_app
from medfed.client.config import SITE_TOML, load_site_config
from medfed.client.egress import filter_reply
from medfed.consortium import approve, write_example_consortium
from medfed.coordinator.ask import AskResults, AskSetup, run_ask, site_keys_in
from medfed.coordinator.audit_chain import (
    AUDIT_NAME,
    PUBLIC_KEY_NAME,
    CoordinatorAudit,
    verify_chain,
)
from medfed.coordinator.errors import RoundFailedError
from medfed.model import wire
from medfed.privacy.ledger import PrivacyLedger
from medfed.privacy.signing import SigningKey, VerifyKey
from tests.sitekit import node_context

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("server_identity")]

QUERIES = Path(__file__).resolve().parents[2] / "examples" / "consortium" / "queries"
QUERY = QUERIES / "lung-ecog.toml"


COORDINATOR = SigningKey.generate()
"""The coordinator's key: it signs secure exchanges' announcements, which sites pin."""
HANDLERS: Mapping[str, Callable[[Message, Context], Message]] = {
    wire.ASK: client_app.ask,
    "query": client_app.query,
    wire.SECAGG_KEYS: client_app.secagg_keys,
    wire.SECAGG_REVEAL: client_app.secagg_reveal,
}


@dataclass
class AskGrid:
    """Each pushed query message goes through the egress guard to the site's handler."""

    contexts: Mapping[int, Context]
    tamper: Callable[[Message], Message] | None = None
    silent: Mapping[str, frozenset[int]] = field(default_factory=dict)
    """Per message type, the nodes whose replies to it never arrive (dropped sites)."""
    replies: list[Message] = field(default_factory=list)
    _pending: dict[str, Message] = field(default_factory=dict)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid4())
            context = self.contexts[message.metadata.dst_node_id]
            handler = HANDLERS[message.metadata.message_type]
            reply = client_app.GUARD(message, context, handler)
            if self.tamper is not None:  # in transit, after the site's guard
                reply = self.tamper(reply)
            reply.metadata.__dict__["_src_node_id"] = message.metadata.dst_node_id
            self.replies.append(reply)
            node = message.metadata.dst_node_id
            if node not in self.silent.get(message.metadata.message_type, frozenset()):
                self._pending[message.metadata.message_id] = reply
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._pending.pop(i) for i in list(message_ids) if i in self._pending]


@pytest.fixture(scope="module")
def lung_sites(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    root = tmp_path_factory.mktemp("lung")
    study, sites = write_example_consortium(
        root / "sites", "lung", site_keys_dir=root / "keys", coordinator_key=COORDINATOR.public
    )
    return root, (study, sites)


def _named(name: str) -> AskQuery:
    """The example query under another name: another digest, approved apart (the officer's
    approval of a query covers its epsilon once, over all its runs); sites that do not
    answer are waited for 3 s."""
    document = json.loads(load_query_file(QUERY).canonical_json())
    return query_from({**document, "name": name, "timeout-s": 3.0}, where="test")


def _contexts(root: Path) -> dict[int, Context]:
    tomls = sorted((root / "sites").glob(f"*/{SITE_TOML}"))
    return {i + 1: node_context(i + 1, {"site-config": str(path)}) for i, path in enumerate(tomls)}


def _approve_all(root: Path, query: AskQuery) -> None:
    for path in sorted((root / "sites").glob(f"*/{SITE_TOML}")):
        officer = SigningKey.load(path.parent / "officer" / "officer.key")
        approve(path, query, epsilon=query.epsilon, officer_key=officer)


def _run(root: Path, query: AskQuery, run_dir: Path, grid: AskGrid) -> AskResults:
    study, _ = load_study(root)
    run_dir.mkdir(parents=True)
    audit = CoordinatorAudit.open(run_dir)
    setup = AskSetup(study, site_keys_in(str(root / "keys")), COORDINATOR)  # type: ignore[arg-type]
    return run_ask(grid, query, setup, run_id=run_dir.name, report=lambda r: None,
                   audit=audit, wait_s=5)  # fmt: skip


def load_study(root: Path) -> tuple[object, None]:
    from medfed.asks import study_for

    query = load_query_file(QUERY)
    return study_for(query, QUERY, None), None


def test_an_approved_query_is_answered_charged_and_chained(
    lung_sites: tuple[Path, object], tmp_path: Path
) -> None:
    root, _ = lung_sites
    query = load_query_file(QUERY)
    _approve_all(root, query)
    grid = AskGrid(_contexts(root))
    results = _run(root, query, tmp_path / "run-1", grid)
    assert results.status == "completed"
    answered = {s["site"] for s in results.sites}
    assert len(answered) >= 2 and all(s["signature_checked"] for s in results.sites)
    for site in results.sites:  # each names the officer's approval it answered under
        approval = site["approval"]
        assert isinstance(approval, dict) and approval["epsilon"] == 1.0
        assert len(str(approval["officer_key_id"])) == 16
    kinds = [a["kind"] for a in results.answers]
    assert kinds == ["count", "mean", "histogram", "odds-ratio", "kaplan-meier", "cox"]
    # Every answering site charged the whole query once, under the query's digest.
    for path in sorted((root / "sites").glob(f"*/{SITE_TOML}")):
        config = load_site_config(path)
        if config.site.id not in answered:
            continue
        spends = [r for r in PrivacyLedger(config.ledger_path).records() if r.run_id == "ask:run-1"]
        assert len(spends) == 1 and spends[0].study.endswith(query.sha256())
        assert spends[0].event.steps == query.releases()
    # The officer's report lists the query beside any study, with its approval.
    from medfed.budget import budget_summary

    config = load_site_config(sorted((root / "sites").glob(f"*/{SITE_TOML}"))[-1])
    summary = budget_summary(config)
    spends = [s for d in summary.datasets for s in d.studies if s.study == "ask:lung-ecog"]
    assert spends and spends[0].study_sha256 == query.sha256()
    assert 0 < spends[0].epsilon <= 1.0 + 1e-9 and spends[0].approved_epsilon == 1.0
    assert summary.ledger_problems == [] and summary.audit_problem is None
    check = verify_chain(tmp_path / "run-1" / AUDIT_NAME,
                         VerifyKey.load(tmp_path / "run-1" / PUBLIC_KEY_NAME))  # fmt: skip
    assert check.problem is None


def test_an_unapproved_query_is_refused_by_every_site(
    lung_sites: tuple[Path, object], tmp_path: Path
) -> None:
    root, _ = lung_sites
    query = _named("unapproved")
    grid = AskGrid(_contexts(root))
    with pytest.raises(RoundFailedError, match="0 site"):
        _run(root, query, tmp_path / "run-2", grid)
    reasons = [r.error.reason for r in grid.replies if r.has_error()]
    assert reasons and all("not approved query unapproved" in reason for reason in reasons)


def test_the_same_step_is_not_answered_twice(
    lung_sites: tuple[Path, object], tmp_path: Path
) -> None:
    root, _ = lung_sites
    query = _named("twice")
    _approve_all(root, query)
    contexts = _contexts(root)
    grid = AskGrid(contexts)
    _run(root, query, tmp_path / "run-3", grid)
    first = next(r for r in grid.replies if not r.has_error())
    again = client_app.ask(_instruction(query, "run-3", step=0), contexts[1])
    assert again.has_error() and "answered here already" in again.error.reason
    del first


def _instruction(query: AskQuery, run_id: str, *, step: int, betas: str = "{}") -> Message:
    from medfed.asks import study_for
    from medfed.coordinator.ask import _content

    study = study_for(query, QUERY, None)
    content = _content(query, study.contract, run_id, step, json.loads(betas))
    return Message(content=content, dst_node_id=1, message_type=wire.ASK)


def test_coefficients_outside_the_l1_bound_are_refused(lung_sites: tuple[Path, object]) -> None:
    root, _ = lung_sites
    query = _named("bound")
    _approve_all(root, query)
    contexts = _contexts(root)
    client_app.ask(_instruction(query, "run-4", step=0), contexts[1])
    reply = client_app.ask(_instruction(query, "run-4", step=1, betas='{"5": [3.0, 1.0, 0.0]}'),
                           contexts[1])  # fmt: skip
    assert reply.has_error() and "L1 bound" in reply.error.reason


def test_the_guard_lets_out_only_the_vector_the_site_signed(
    lung_sites: tuple[Path, object],
) -> None:
    root, _ = lung_sites
    query = _named("guard")
    _approve_all(root, query)
    contexts = _contexts(root)
    instruction = _instruction(query, "run-5", step=0)
    instruction.metadata.__dict__["_message_id"] = str(uuid4())
    reply = client_app.ask(instruction, contexts[1])
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    rules = client_app._rules(contexts[1])
    passed, dropped = filter_reply(instruction, reply, rules)
    assert not passed.has_error() and dropped == []
    values = reply.content.array_records[wire.ARRAYS][wire.RELEASED].numpy().copy()
    values[0] += 1.0  # a number the site's worker did not sign
    forged = RecordDict({**dict(reply.content.items()),
                         wire.ARRAYS: ArrayRecord({wire.RELEASED: Array(values)})})  # fmt: skip
    blocked, _ = filter_reply(instruction, Message(forged, reply_to=instruction), rules)
    assert blocked.has_error() and "not one the site's worker computed" in blocked.error.reason
    unnoised = np.zeros_like(values)
    raw = RecordDict({**dict(reply.content.items()),
                      wire.ARRAYS: ArrayRecord({wire.RELEASED: Array(unnoised[:-1])})})  # fmt: skip
    blocked, _ = filter_reply(instruction, Message(raw, reply_to=instruction), rules)
    assert blocked.has_error() and "values" in blocked.error.reason


def test_the_secure_sum_is_the_plain_sum_of_what_the_sites_computed(
    lung_sites: tuple[Path, object], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under secure aggregation (the default) the coordinator's sum equals the sum of the
    noised vectors the sites kept, within the fixed-point grid, and it never saw one."""
    import medfed.client.ask as site_ask
    import medfed.coordinator.ask as coordinator_ask

    root, _ = lung_sites
    query = _named("secure")
    assert query.secure_aggregation
    _approve_all(root, query)
    kept: dict[int, list[np.ndarray]] = {}
    sums: dict[int, np.ndarray] = {}
    real_noised, real_combine = site_ask.noised, coordinator_ask._combine

    def noised(*args: object, **kwargs: object) -> np.ndarray:
        vector = real_noised(*args, **kwargs)  # type: ignore[arg-type]
        kept.setdefault(len(sums), []).append(vector)
        return vector

    def combine(query_: AskQuery, names: object, step: int, outcome: object, *rest: object) -> None:
        sums[step] = outcome.total.copy()  # type: ignore[attr-defined]
        real_combine(query_, names, step, outcome, *rest)  # type: ignore[arg-type]

    monkeypatch.setattr(site_ask, "noised", noised)
    monkeypatch.setattr(coordinator_ask, "_combine", combine)
    grid = AskGrid(_contexts(root))
    results = _run(root, query, tmp_path / "run-6", grid)
    assert results.status == "completed" and all(step["secure"] for step in results.steps)
    clear = [
        r for r in grid.replies
        if not r.has_error() and wire.RELEASED in r.content.array_records.get(wire.ARRAYS, {})
    ]  # fmt: skip
    assert clear == [], "a site's vector left in the clear"
    from medfed.analysis.answers import sensitivities
    from medfed.coordinator.secure_ask import ASK_CLIP

    for step, total in sums.items():
        plain = np.sum(kept[step], axis=0)
        sites = len(kept[step])
        level = (2**31 - 1) // sites  # the fixed-point grid of `privacy.secagg`
        bound = sites * 0.5 * ASK_CLIP / level * sensitivities(query, step)  # rounding only
        assert np.all(np.abs(total - plain) <= bound), step
        assert not np.allclose(total, 0.0)


def test_a_plain_query_says_so_and_still_answers(
    lung_sites: tuple[Path, object], tmp_path: Path
) -> None:
    root, _ = lung_sites
    document = json.loads(load_query_file(QUERY).canonical_json())
    query = query_from({**document, "name": "plain", "secure-aggregation": False}, where="t")
    _approve_all(root, query)
    results = _run(root, query, tmp_path / "run-7", AskGrid(_contexts(root)))
    assert results.status == "completed" and results.secure_aggregation is False
    assert not any(step["secure"] for step in results.steps)


@pytest.mark.parametrize("dropped", [1, 2])
def test_sites_whose_masked_answer_is_lost_leave_the_sum_exact_or_abort_it(
    lung_sites: tuple[Path, object], tmp_path: Path, dropped: int
) -> None:
    """Four sites, threshold three: one site's masked answer lost still leaves the sum of
    the survivors; two lost abort the exchange, and no reveal is asked for."""
    root, _ = lung_sites
    query = _named(f"dropout-{dropped}")
    _approve_all(root, query)
    contexts = _contexts(root)
    grid = AskGrid(contexts, silent={wire.ASK: frozenset(list(contexts)[:dropped])})
    if dropped == 1:
        results = _run(root, query, tmp_path / "run-8", grid)
        assert results.status == "completed" and len(results.sites) == 3
        assert any("ask: no reply in time" in r["reason"] for r in results.refused)
    else:
        with pytest.raises(RoundFailedError, match=r"aborted|needed"):
            _run(root, query, tmp_path / "run-9", grid)
        types = [r.metadata.message_type for r in grid.replies]
        assert wire.SECAGG_REVEAL not in types


def test_an_answer_altered_in_transit_is_set_aside_by_its_signature(
    lung_sites: tuple[Path, object], tmp_path: Path
) -> None:
    """Plain mode: a vector changed after it left the site no longer carries the site's
    signature; the coordinator lists that site as refused and answers from the rest."""
    root, _ = lung_sites
    document = json.loads(load_query_file(QUERY).canonical_json())
    query = query_from({**document, "name": "tampered", "secure-aggregation": False,
                        "timeout-s": 3.0}, where="t")  # fmt: skip
    _approve_all(root, query)
    victim = sorted(p.parent.name for p in (root / "sites").glob(f"*/{SITE_TOML}"))[-1]

    def tamper(reply: Message) -> Message:
        if reply.has_error() or wire.ARRAYS not in reply.content.array_records:
            return reply
        site = reply.content.config_records[wire.SITE][wire.SITE_ID]
        if site != victim:
            return reply
        values = reply.content.array_records[wire.ARRAYS][wire.RELEASED].numpy() + 1.0
        reply.content = RecordDict(
            {
                **dict(reply.content.items()),
                wire.ARRAYS: ArrayRecord({wire.RELEASED: Array(values)}),
            }
        )
        return reply

    grid = AskGrid(_contexts(root), tamper=tamper)
    results = _run(root, query, tmp_path / "run-10", grid)
    assert results.status == "completed"
    assert victim not in {s["site"] for s in results.sites}
    assert any(
        r["site"] == victim and "signature is not the site's" in r["reason"]
        for r in results.refused
    ), results.refused
