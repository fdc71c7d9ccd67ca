"""The query file (`medfed ask`): parsing, digests, checks against the contract, layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medfed.analysis.answers import NewtonState, piece_noise_var, pieces
from medfed.analysis.layout import step_layout, step_width
from medfed.analysis.query import (
    AskQuery,
    ContractNames,
    QueryError,
    check_against,
    parse_query,
    query_from,
)
from medfed.analysis.survival import logrank_from_counts
from medfed.asks import AskError, load_query_file

QUERIES = Path(__file__).resolve().parents[3] / "examples" / "consortium" / "queries"
NAMES = ContractNames(
    numeric={"age": (18.0, 100.0), "ecog": (0.0, 4.0), "female": (0.0, 1.0)},
    coded=["diagnoses"],
    survival={"survival": ("time_days", "died")},
    binary_targets=["died"],
)


def _lung() -> AskQuery:
    return load_query_file(QUERIES / "lung-ecog.toml")


def test_the_example_queries_parse_and_their_digest_is_their_canonical_text() -> None:
    for path in sorted(QUERIES.glob("*.toml")):
        query = load_query_file(path)
        again = query_from(query.canonical_json(), where="round trip")
        assert again == query and again.sha256() == query.sha256()
    lung = _lung()
    assert lung.releases() == 5 + 2 * 3 and lung.iterations == 3


def test_a_changed_epsilon_is_another_query() -> None:
    document = json.loads(_lung().canonical_json())
    assert query_from({**document, "epsilon": 2.0}, where="t").sha256() != _lung().sha256()


@pytest.mark.parametrize(
    ("change", "where"),
    [
        ({"epsilon": 0}, "query.epsilon"),
        ({"epsilon": 1000}, "query.epsilon"),
        ({"name": "no spaces allowed"}, "query.name"),
        ({"analyses": []}, "query.analyses"),
        ({"surprise": 1}, "query.surprise"),
        ({"analyses": [{"kind": "mode"}]}, "query.analyses.0"),
        ({"analyses": [{"kind": "mean"}]}, "query.analyses.0.mean.feature"),
        ({"cohort": [{"feature": "age"}]}, "query.cohort.0"),
        ({"cohort": [{"feature": "age", "min": 5, "max": 1}]}, "query.cohort.0"),
    ],
)
def test_a_bad_query_names_the_key_at_fault(change: dict[str, object], where: str) -> None:
    document = {**json.loads(_lung().canonical_json()), **change}
    with pytest.raises(QueryError, match=rf"^f\.toml: {where}"):
        parse_query({"query": document}, where="f.toml")


def test_a_file_without_a_query_table_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "q.toml"
    path.write_text("[study]\nx = 1\n")
    with pytest.raises(AskError, match=r"q\.toml: no \[query\] table"):
        load_query_file(path)
    path.write_text("[query\n")
    with pytest.raises(AskError, match=r"q\.toml"):
        load_query_file(path)


@pytest.mark.parametrize(
    ("analysis", "match"),
    [
        ({"kind": "mean", "feature": "weight"}, "'weight' is not a numeric feature"),
        ({"kind": "cox", "task": "death", "covariates": ["age"]}, "'death' is not a survival"),
        (
            {
                "kind": "logistic",
                "outcome": {"feature": "diagnoses", "any-of": ["C34"]},
                "covariates": ["bmi"],
            },
            "'bmi' is not a numeric",
        ),
        ({"kind": "mean", "feature": "age", "bounds": {"age": [10.0, 90.0]}}, "not inside"),
        (
            {
                "kind": "odds-ratio",
                "exposure": {"feature": "age", "min": 70.0},
                "outcome": {"feature": "stage", "any-of": ["IV"]},
            },
            "'stage' is not a coded",
        ),
    ],
)
def test_a_query_naming_what_the_contract_lacks_is_refused(
    analysis: dict[str, object], match: str
) -> None:
    query = query_from(
        {"name": "q", "study": "lung", "epsilon": 1.0, "analyses": [analysis]}, where="t"
    )
    with pytest.raises(QueryError, match=match):
        check_against(query, NAMES)


def test_every_step_layout_tiles_the_vector_and_every_piece_has_a_sensitivity() -> None:
    query = _lung()
    check_against(query, NAMES)
    for step in range(query.iterations):
        slots = step_layout(query, step)
        assert [s.start for s in slots] == [0, *(s.stop for s in slots[:-1])]
        assert slots[-1].stop == step_width(query, step)
        for slot in slots:
            analysis = query.analyses[slot.index]
            lengths = [length for length, _ in pieces(analysis)]
            assert sum(lengths) == slot.stop - slot.start
            assert all(s > 0 for _, s in pieces(analysis))
    assert [s.index for s in step_layout(query, 1)] == [5]  # only the Cox fit goes on


def test_the_summed_noise_variance_adds_every_site() -> None:
    analysis = _lung().analyses[0]
    assert piece_noise_var(analysis, [2.0, 3.0]) == (13.0,)


def test_noise_widens_the_logrank_test_and_none_leaves_it_exact() -> None:
    rng = np.random.default_rng(3)
    events = rng.integers(0, 6, size=(2, 12)).astype(float)
    censored = rng.integers(0, 4, size=(2, 12)).astype(float)
    events[0] += 2  # group 0 dies more
    exact = logrank_from_counts(events, censored)
    noisy = logrank_from_counts(events, censored, noise_var=25.0)
    assert noisy.statistic < exact.statistic and noisy.p_value > exact.p_value
    assert logrank_from_counts(events, censored, noise_var=0.0).statistic == exact.statistic


@settings(max_examples=40, deadline=None)
@given(st.floats(min_value=1e-3, max_value=1e6))
def test_a_newton_fit_drowned_in_hessian_noise_claims_no_interval(hessian_noise: float) -> None:
    query = _lung()
    cox = query.analyses[5]
    assert cox.kind == "cox"
    state = NewtonState.start(cox)  # type: ignore[arg-type]
    information = np.array([[30.0, 2.0, 1.0], [2.0, 20.0, 0.5], [1.0, 0.5, 10.0]])
    upper = (-information)[np.triu_indices(3)]
    state.update(np.concatenate([[1.0, -2.0, 0.5], upper]), (1.0, hessian_noise), sites=3)
    answer = state.answer(NAMES)
    swamped = bool(float(np.linalg.eigvalsh(information).min()) <= 2 * np.sqrt(hessian_noise * 3))
    assert answer["estimable"] is (not swamped)
    for row in answer["coefficients"]:  # type: ignore[attr-defined]
        assert (row["ci_low"] is None) is swamped
        if not swamped:
            assert row["ci_low"] <= row["coef"] <= row["ci_high"]
