"""validate_train_reply / validate_eval_reply over real Flower reply messages: a training
reply carries the noise multiplier the site chose, as well as its epsilon."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from flwr.app import (
    Array,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from medfed.coordinator.validate import (
    MAX_EXAMPLES,
    ModelCheck,
    Rejection,
    Sender,
    SiteEval,
    SiteUpdate,
    payload_bytes,
    size_limit_bytes,
    validate_eval_reply,
    validate_train_reply,
)
from medfed.model import wire

pytestmark = pytest.mark.usefixtures("server_identity")

NODE = 5
REFERENCE = {
    "encoders.clinical.project.weight": np.zeros((4, 3), dtype=np.float32),
    "encoders.clinical.project.bias": np.zeros(4, dtype=np.float32),
    "heads.readmission.bias": np.zeros(1, dtype=np.float32),
}
GOOD_METRICS: dict[str, int | float] = {
    wire.NUM_EXAMPLES: 227,
    wire.LOCAL_LOSS: 0.61,
    wire.MODEL_TRAIN_LOSS: 0.58,
    wire.EPSILON: 2.9,
    wire.NOISE_MULTIPLIER: 1.07,
    wire.EVAL_EXAMPLES: 56,
    wire.EVAL_AUROC: 0.7,
    wire.EVAL_LOSS: 0.65,
    wire.EVAL_ACCURACY: 0.6,
}


def instruction(message_type: str = MessageType.TRAIN) -> Message:
    """An instruction as the SuperLink delivers it: Flower's link state sets its id."""
    message = Message(RecordDict(), dst_node_id=NODE, message_type=message_type)
    message.metadata.__dict__["_message_id"] = message.object_id
    return message


def reply_to(content: RecordDict | Error, message_type: str = MessageType.TRAIN) -> Message:
    return Message(content, reply_to=instruction(message_type))


def site_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(a.shape).astype(np.float32) for name, a in REFERENCE.items()}


def train_content(
    arrays: dict[str, np.ndarray] | None = None,
    *,
    metrics: dict[str, Any] | None = None,
    drop: tuple[str, ...] = (),
    site_id: str | None = "hospital-2",
) -> RecordDict:
    values = {**GOOD_METRICS, **(metrics or {})}
    records: dict[str, Any] = {
        wire.ARRAYS: wire.arrays_to_record(site_arrays() if arrays is None else arrays),
        wire.METRICS: MetricRecord({k: v for k, v in values.items() if k not in drop}),
    }
    if site_id is not None:
        records[wire.SITE] = ConfigRecord({wire.SITE_ID: site_id})
    return RecordDict({k: v for k, v in records.items() if k not in drop})


def rejection_reason(content: RecordDict) -> str:
    result = validate_train_reply(reply_to(content), REFERENCE)
    assert isinstance(result, Rejection), result
    assert result.node_id == NODE
    return result.reason


def test_a_reply_carries_the_instruction_nodes_as_flower_sets_them() -> None:
    ins = instruction()
    reply = Message(train_content(), reply_to=ins)
    assert ins.metadata.message_id != ""
    assert reply.metadata.reply_to_message_id == ins.metadata.message_id
    assert reply.metadata.src_node_id == NODE


def test_a_good_reply_becomes_a_site_update() -> None:
    sent = site_arrays(3)

    update = validate_train_reply(reply_to(train_content(sent)), REFERENCE)

    assert isinstance(update, SiteUpdate)
    assert (update.node_id, update.site_id) == (NODE, "hospital-2")
    assert update.arrays.keys() == REFERENCE.keys()
    for name, array in sent.items():
        np.testing.assert_array_equal(update.arrays[name], array)
        assert update.arrays[name].dtype == np.float32
    assert update.num_examples == 227
    assert update.local_loss == pytest.approx(0.61)
    assert update.epsilon == pytest.approx(2.9)
    assert update.noise_multiplier == pytest.approx(1.07)
    check = update.check
    assert (check.num_examples, check.train_loss) == (227, pytest.approx(0.58))
    assert (check.eval_examples, check.eval_auroc, check.eval_loss) == (
        56,
        pytest.approx(0.7),
        pytest.approx(0.65),
    )


def test_undefined_metrics_are_accepted_as_nan() -> None:
    content = train_content(
        metrics={
            wire.EVAL_AUROC: float("nan"),
            wire.LOCAL_LOSS: float("nan"),
            wire.EVAL_EXAMPLES: 0,
        }
    )
    update = validate_train_reply(reply_to(content), REFERENCE)
    assert isinstance(update, SiteUpdate)
    assert np.isnan(update.check.eval_auroc)
    assert np.isnan(update.local_loss)


def test_an_unreleased_training_loss_is_undefined_and_an_infinite_one_rejected() -> None:
    # A site releases no training loss it cannot bound per patient (a Cox loss): NaN.
    update = validate_train_reply(
        reply_to(train_content(metrics={wire.MODEL_TRAIN_LOSS: float("nan")})), REFERENCE
    )
    assert isinstance(update, SiteUpdate) and math.isnan(update.check.train_loss)
    content = train_content(metrics={wire.MODEL_TRAIN_LOSS: float("inf")})
    assert "model-train-loss" in rejection_reason(content)


def _with(name: str, array: np.ndarray) -> dict[str, np.ndarray]:
    return {**site_arrays(), name: array}


BAD_ARRAYS = [
    pytest.param(
        _with("heads.readmission.bias", np.zeros(1, dtype=np.float64)),
        "array heads.readmission.bias: dtype float64, expected float32",
        id="float64",
    ),
    pytest.param(
        _with("encoders.clinical.project.weight", np.zeros((3, 4), dtype=np.float32)),
        "array encoders.clinical.project.weight: shape (3, 4), expected (4, 3)",
        id="wrong-shape",
    ),
    pytest.param(
        _with("encoders.clinical.project.bias", np.array([0, np.nan, 0, 0], dtype=np.float32)),
        "array encoders.clinical.project.bias: contains NaN or Inf",
        id="nan",
    ),
    pytest.param(
        _with("heads.readmission.bias", np.array([np.inf], dtype=np.float32)),
        "array heads.readmission.bias: contains NaN or Inf",
        id="inf",
    ),
    pytest.param(
        {**site_arrays(), "heads.extra": np.zeros(2, dtype=np.float32)},
        "unexpected ['heads.extra']",
        id="extra-array",
    ),
    pytest.param(
        {k: v for k, v in site_arrays().items() if k != "heads.readmission.bias"},
        "missing ['heads.readmission.bias']",
        id="missing-array",
    ),
]


@pytest.mark.parametrize(("arrays", "reason"), BAD_ARRAYS)
def test_malformed_arrays_are_rejected(arrays: dict[str, np.ndarray], reason: str) -> None:
    assert reason in rejection_reason(train_content(arrays))


def test_a_missing_array_record_is_rejected() -> None:
    reason = rejection_reason(train_content(drop=(wire.ARRAYS,)))
    assert "no array record 'arrays'" in reason


def test_an_array_that_is_not_numpy_is_rejected() -> None:
    content = train_content()
    record = content.array_records[wire.ARRAYS]
    good = record["heads.readmission.bias"]
    record["heads.readmission.bias"] = Array(
        dtype="float32", shape=(1,), stype="torch.raw", data=good.data
    )
    reason = rejection_reason(content)
    assert reason.startswith("array 'heads.readmission.bias' is not a")
    assert "numpy array" in reason


@pytest.mark.parametrize(
    "key",
    [
        wire.NUM_EXAMPLES,
        wire.EPSILON,
        wire.NOISE_MULTIPLIER,
        wire.LOCAL_LOSS,
        wire.MODEL_TRAIN_LOSS,
        wire.EVAL_EXAMPLES,
        wire.EVAL_AUROC,
    ],
)
def test_a_missing_metric_is_named(key: str) -> None:
    assert f"has no key {key!r}" in rejection_reason(train_content(drop=(key,)))


def test_a_missing_metrics_record_is_rejected() -> None:
    assert "no record 'metrics'" in rejection_reason(train_content(drop=(wire.METRICS,)))


def test_a_reply_without_site_id_is_rejected() -> None:
    result = validate_train_reply(reply_to(train_content(site_id=None)), REFERENCE)
    assert isinstance(result, Rejection)
    assert result.site_id is None
    assert "site.site-id" in result.reason


@pytest.mark.parametrize(
    ("metrics", "reason"),
    [
        ({wire.NUM_EXAMPLES: 0}, "metrics.num-examples: 0 is out of range"),
        ({wire.NUM_EXAMPLES: -4}, "metrics.num-examples: -4 is out of range"),
        ({wire.NUM_EXAMPLES: MAX_EXAMPLES + 1}, f"{MAX_EXAMPLES + 1} is out of range"),
        ({wire.NUM_EXAMPLES: 2.5}, "metrics.num-examples: expected int, got float"),
        ({wire.EPSILON: -0.1}, "metrics.epsilon: -0.1 is negative"),
        ({wire.EPSILON: float("nan")}, "metrics.epsilon: nan is not finite"),
        ({wire.EPSILON: float("inf")}, "metrics.epsilon: inf is not finite"),
        ({wire.NOISE_MULTIPLIER: 0.0}, "metrics.noise-multiplier: 0.0 is not positive"),
        ({wire.NOISE_MULTIPLIER: -1.2}, "metrics.noise-multiplier: -1.2 is not positive"),
        ({wire.NOISE_MULTIPLIER: float("nan")}, "metrics.noise-multiplier: nan is not finite"),
        ({wire.NOISE_MULTIPLIER: float("inf")}, "metrics.noise-multiplier: inf is not finite"),
        ({wire.EVAL_EXAMPLES: -1}, "metrics.eval-examples: -1 is out of range"),
        ({wire.EVAL_AUROC: 1.5}, "metrics.eval-auroc: 1.5 is not in [0, 1]"),
        ({wire.EVAL_AUROC: -0.2}, "metrics.eval-auroc: -0.2 is not in [0, 1]"),
    ],
)
def test_bad_metric_values_are_rejected(metrics: dict[str, Any], reason: str) -> None:
    assert reason in rejection_reason(train_content(metrics=metrics))


def test_the_largest_site_is_still_accepted() -> None:
    content = train_content(metrics={wire.NUM_EXAMPLES: MAX_EXAMPLES})
    assert isinstance(validate_train_reply(reply_to(content), REFERENCE), SiteUpdate)


def test_a_bool_example_count_is_rejected() -> None:
    # MetricRecord refuses bools, but a site may send its metrics as a ConfigRecord.
    content = train_content()
    content[wire.METRICS] = ConfigRecord({**GOOD_METRICS, wire.NUM_EXAMPLES: True})
    assert "metrics.num-examples: expected int, got bool" in rejection_reason(content)


def test_an_error_reply_is_rejected_with_the_sites_reason() -> None:
    error = Error(code=4001, reason="hospital-3: the model received does not match")

    result = validate_train_reply(reply_to(error), REFERENCE)

    assert isinstance(result, Rejection)
    assert (result.node_id, result.site_id) == (NODE, None)
    assert (
        result.reason == "site replied with an error: hospital-3: the model received does not match"
    )


# --- evaluation replies -------------------------------------------------------------------


def eval_content(
    metrics: dict[str, Any] | None = None, *, drop: tuple[str, ...] = ()
) -> RecordDict:
    values = {
        wire.NUM_EXAMPLES: 230,
        wire.MODEL_TRAIN_LOSS: 0.55,
        wire.EVAL_EXAMPLES: 56,
        wire.EVAL_AUROC: 0.71,
        wire.EVAL_LOSS: 0.6,
        wire.EVAL_ACCURACY: 0.64,
        **(metrics or {}),
    }
    return RecordDict(
        {
            wire.METRICS: MetricRecord({k: v for k, v in values.items() if k not in drop}),
            wire.SITE: ConfigRecord({wire.SITE_ID: "hospital-1"}),
        }
    )


def test_a_good_eval_reply_becomes_a_site_eval() -> None:
    result = validate_eval_reply(reply_to(eval_content(), MessageType.EVALUATE))
    assert result == SiteEval(
        NODE,
        "hospital-1",
        ModelCheck(230, pytest.approx(0.55), 56, pytest.approx(0.71), pytest.approx(0.6)),
    )


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (eval_content(drop=(wire.EVAL_EXAMPLES,)), "has no key 'eval-examples'"),
        (eval_content(drop=(wire.EVAL_LOSS,)), "has no key 'eval-loss'"),
        (eval_content(drop=(wire.MODEL_TRAIN_LOSS,)), "has no key 'model-train-loss'"),
        (eval_content({wire.NUM_EXAMPLES: 0}), "num-examples: 0 is out of range"),
        (eval_content({wire.EVAL_EXAMPLES: MAX_EXAMPLES + 1}), "out of range"),
        (eval_content({wire.EVAL_AUROC: 2.0}), "metrics.eval-auroc: 2.0 is not in [0, 1]"),
    ],
)
def test_bad_eval_replies_are_rejected(content: RecordDict, reason: str) -> None:
    result = validate_eval_reply(reply_to(content, MessageType.EVALUATE))
    assert isinstance(result, Rejection)
    assert reason in result.reason


def test_an_integer_eval_loss_is_taken_as_a_float() -> None:
    result = validate_eval_reply(reply_to(eval_content({wire.EVAL_LOSS: 1}), MessageType.EVALUATE))
    assert isinstance(result, SiteEval)
    assert type(result.check.eval_loss) is float


def test_an_eval_error_reply_is_rejected_with_the_sites_reason() -> None:
    error = Error(code=4001, reason="hospital-1: table unreadable")
    result = validate_eval_reply(reply_to(error, MessageType.EVALUATE))
    assert isinstance(result, Rejection)
    assert result.reason.endswith("hospital-1: table unreadable")


def test_the_size_limit_is_the_float32_model_with_ten_percent_and_64_kib_to_spare() -> None:
    float32_bytes = (4 * 3 + 4 + 1) * 4
    assert size_limit_bytes(REFERENCE) == int(float32_bytes * 1.1) + 65536


def test_an_oversized_reply_is_rejected_before_its_arrays_are_decoded() -> None:
    content = train_content()
    # Bytes that are no .npy at all: decoding them would fail with another reason.
    content.array_records[wire.ARRAYS]["heads.readmission.bias"] = Array(
        dtype="float32", shape=(70_000,), stype="numpy.ndarray", data=b"\xff" * 280_000
    )
    result = validate_train_reply(
        reply_to(content), REFERENCE, max_bytes=size_limit_bytes(REFERENCE)
    )
    assert isinstance(result, Rejection)
    assert result.reason.startswith("oversized update: its arrays hold")
    assert payload_bytes(content) > 280_000


def test_a_reply_within_the_size_limit_is_taken() -> None:
    content = train_content()
    assert payload_bytes(content) <= size_limit_bytes(REFERENCE)
    update = validate_train_reply(
        reply_to(content), REFERENCE, max_bytes=size_limit_bytes(REFERENCE)
    )
    assert isinstance(update, SiteUpdate)


def test_a_reply_naming_another_site_than_its_node_is_listed_under_its_nodes_name() -> None:
    result = validate_train_reply(
        reply_to(train_content(site_id="hospital-1")),
        REFERENCE,
        sender=Sender("hospital-2", 500),
    )
    assert isinstance(result, Rejection)
    assert result.site_id == "hospital-2"
    assert "names site 'hospital-1'" in result.reason


@pytest.mark.parametrize(("patients", "taken"), [(227, True), (226, False), (0, True)])
def test_the_example_count_is_bounded_by_the_patients_the_site_reported(
    patients: int, taken: bool
) -> None:
    # 0 patients: the status said nothing usable, so only MAX_EXAMPLES bounds the count.
    result = validate_train_reply(
        reply_to(train_content()), REFERENCE, sender=Sender("hospital-2", patients)
    )
    assert isinstance(result, SiteUpdate) is taken
    if not taken:
        assert isinstance(result, Rejection)
        assert "227 is more than the 226 patients" in result.reason


# --- the sites' noised sufficient statistics (issue 14) ------------------------------------


def test_the_noised_statistics_are_read_and_pooled_into_one_auroc() -> None:
    from sklearn.metrics import roc_auc_score

    from medfed.coordinator.rounds import _scores
    from medfed.privacy import release
    from medfed.privacy.release import PatientStats

    rng = np.random.default_rng(4)
    truth = rng.integers(0, 2, 300)
    scores = np.clip(rng.normal(0.35 + 0.3 * truth, 0.2), 0.0, 0.999)
    halves = (slice(0, 120), slice(120, None))
    vectors = [
        release.statistics_rows(
            PatientStats(loss=np.full(50, 0.5)),
            PatientStats(loss=np.zeros(len(truth[h])), score=scores[h], truth=truth[h]),
        ).sum(axis=0)
        for h in halves
    ]
    checks = []
    for vector in vectors:
        content = eval_content({wire.EVAL_STATS: [float(v) for v in vector]})
        result = validate_eval_reply(reply_to(content, MessageType.EVALUATE))
        assert isinstance(result, SiteEval), result
        checks.append(result.check)
    loss, auroc = _scores(checks, "auroc")
    # Without noise the pooled figures are those of one site holding every patient.
    assert auroc == pytest.approx(roc_auc_score(truth, np.floor(scores * release.BINS)))
    assert loss == pytest.approx(0.5)


def test_malformed_statistics_are_rejected() -> None:
    content = eval_content({wire.EVAL_STATS: [1.0, 2.0]})
    result = validate_eval_reply(reply_to(content, MessageType.EVALUATE))
    assert isinstance(result, Rejection)
    assert "eval-stats" in result.reason
