"""Comparing two answers to a question (`medfed ask --compare`)."""

from __future__ import annotations

import math

from medfed.asks import compare_evidence


def _record(count: float, coef: float, digest: str) -> dict[str, object]:
    return {
        "query_sha256": "q" * 64,
        "sites": [
            {"site": "a", "dataset_sha256": "1" * 64},
            {"site": "b", "dataset_sha256": digest},
        ],
        "answers": [
            {"index": 0, "kind": "count", "count": count, "noise_std": 3.0},
            {"index": 1, "kind": "odds-ratio", "value": 2.0, "std_error": 0.1},
            {"index": 2, "kind": "cox", "coefficients": [
                {"term": "age", "coef": coef, "std_error": 0.01},
                {"term": "sex", "coef": 0.5, "std_error": None},  # not estimable: left out
            ]},
        ],
    }  # fmt: skip


def test_answers_within_their_noise_are_consistent_and_changed_data_is_named() -> None:
    result = compare_evidence(_record(100.0, 0.02, "2" * 64), _record(104.0, 0.025, "3" * 64))
    assert result["same_query"] is True and result["data_changed_at"] == ["b"]
    by_name = {row["estimate"]: row for row in result["differences"]}
    assert set(by_name) == {"count", "log_odds_ratio", "coef:age"}
    assert math.isclose(by_name["count"]["z"], 4.0 / math.hypot(3.0, 3.0))
    assert math.isclose(by_name["coef:age"]["z"], 0.005 / math.hypot(0.01, 0.01))
    assert by_name["log_odds_ratio"]["z"] == 0.0
    assert result["consistent"] is True


def test_a_difference_beyond_three_standard_errors_is_flagged() -> None:
    result = compare_evidence(_record(100.0, 0.02, "2" * 64), _record(100.0, 0.08, "2" * 64))
    assert result["data_changed_at"] == [] and result["consistent"] is False
