"""The egress guard: a ClientApp that tries to send more than the contract allows is
stopped, the drop is in the site's signed audit log, and an honest reply passes as is."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from medfed.client.client_app import GUARD, app
from medfed.client.config import SITE_TOML
from medfed.client.egress import ERROR_CODE_BLOCKED, chain
from medfed.model import wire
from medfed.privacy.audit import verify_audit_log
from medfed.privacy.receipts import UpdateReceipt
from medfed.privacy.secagg_protocol import masked_sha256
from medfed.privacy.signing import SigningKey
from tests.sitekit import (
    global_arrays,
    make_study,
    node_context,
    site_config,
    site_public_key,
    table_of,
    write_sites,
)

pytestmark = pytest.mark.usefixtures("server_identity")
STUDY = make_study(rounds=2, sites=1, target_epsilon=2.0, local_steps=2)


@pytest.fixture
def site_toml(tmp_path: Path) -> Path:
    write_sites(tmp_path, STUDY, n_sites=1, seed=5)
    return tmp_path / "hospital-1" / SITE_TOML


def _context(site_toml: Path) -> Context:
    return node_context(3, {"site-config": str(site_toml)})


RUN, ROUND, STUDY_SHA256 = "run-7", 2, "cd" * 32


def _instruction(message_type: str = MessageType.TRAIN, **config: Any) -> Message:
    content = RecordDict(
        {
            wire.ARRAYS: wire.arrays_to_record(global_arrays()),
            wire.CONFIG: ConfigRecord(
                {
                    wire.RUN_ID: RUN,
                    wire.STUDY_SHA256: STUDY_SHA256,
                    wire.ROUND: ROUND,
                    wire.MODEL_SHA256: wire.arrays_sha256(global_arrays()),
                    **config,
                }
            ),
        }
    )
    message = Message(content, dst_node_id=3, message_type=message_type, group_id="1")
    message.metadata.__dict__["_message_id"] = message.object_id
    return message


def _receipt(site_toml: Path, update_sha256: str) -> str:
    """The site's own signed receipt for an update with this digest (what its worker makes)."""
    receipt = UpdateReceipt(
        RUN, STUDY_SHA256, ROUND, wire.arrays_sha256(global_arrays()), update_sha256, "hospital-1"
    )
    return receipt.sign(SigningKey.load(site_config(site_toml).signing_key_path))


def _honest(site_toml: Path, patients: int = 60) -> dict[str, Any]:
    arrays = {name: a + np.float32(0.01) for name, a in global_arrays().items()}
    signature = _receipt(site_toml, wire.arrays_sha256(arrays))
    return {
        wire.ARRAYS: arrays,
        wire.METRICS: {wire.NUM_EXAMPLES: patients, wire.LOCAL_LOSS: 0.5, wire.EPSILON: 0.3,
                       wire.EVAL_EXAMPLES: 30, wire.EVAL_AUROC: 0.7},
        wire.SITE: {wire.SITE_ID: "hospital-1", wire.RECEIPT_SIGNATURE: signature},
    }  # fmt: skip


def _app_sending(records: dict[str, Any]) -> Callable[[Message, Context], Message]:
    """A ClientApp (as a coordinator might ship one) that replies with `records`."""

    def handler(message: Message, context: Context) -> Message:
        content = RecordDict()
        for name, value in records.items():
            if name in (wire.ARRAYS, "raw"):
                content[name] = ArrayRecord({k: _array(v) for k, v in value.items()})
            elif name == wire.METRICS:
                content[name] = MetricRecord(value)
            else:
                content[name] = ConfigRecord(value)
        return Message(content, reply_to=message)

    return handler


def _array(value: np.ndarray) -> Any:
    from flwr.app import Array

    return Array.from_numpy_ndarray(value)


def _guarded(site_toml: Path, records: dict[str, Any], kind: str = MessageType.TRAIN) -> Message:
    return chain(_app_sending(records), [GUARD])(_instruction(kind), _context(site_toml))


def _audit_events(site_toml: Path) -> list[dict[str, Any]]:
    config = site_config(site_toml)
    assert verify_audit_log(config.audit_path, site_public_key(site_toml)).first_bad is None
    lines = config.audit_path.read_text().splitlines()
    return [json.loads(line) for line in lines if json.loads(line)["event"] == "egress blocked"]


def test_an_honest_reply_passes_unchanged(site_toml: Path) -> None:
    records = _honest(site_toml)
    reply = _guarded(site_toml, records)
    assert not reply.has_error()
    assert dict(reply.content.metric_records[wire.METRICS]) == records[wire.METRICS]
    sent = wire.record_to_arrays(reply.content)
    assert all(np.array_equal(sent[n], a) for n, a in records[wire.ARRAYS].items())
    assert not site_config(site_toml).audit_path.exists() or _audit_events(site_toml) == []


def test_a_raw_data_array_an_extra_metric_and_a_stray_key_are_dropped(site_toml: Path) -> None:
    table = table_of(site_toml)
    records = _honest(site_toml)
    records["raw"] = {"features": table.train_features}
    records[wire.METRICS] = {**records[wire.METRICS], "mean-age": 61.5, "ages": [61.0, 70.0]}
    records[wire.SITE] = {**records[wire.SITE], "note": "patient 17 is ..."}
    reply = _guarded(site_toml, records)
    assert not reply.has_error()
    assert set(reply.content) == {wire.ARRAYS, wire.METRICS, wire.SITE}
    assert "mean-age" not in reply.content.metric_records[wire.METRICS]
    assert "ages" not in reply.content.metric_records[wire.METRICS]
    assert dict(reply.content.config_records[wire.SITE]) == {
        wire.SITE_ID: "hospital-1",
        wire.RECEIPT_SIGNATURE: records[wire.SITE][wire.RECEIPT_SIGNATURE],
    }
    (event,) = _audit_events(site_toml)
    dropped = event["details"]["dropped"]
    assert "record 'raw'" in dropped and "metrics.mean-age" in dropped and "site.note" in dropped


def test_trained_groups_the_dataset_digest_and_survival_metrics_may_leave(
    site_toml: Path,
) -> None:
    records = _honest(site_toml)
    records[wire.METRICS] = {**records[wire.METRICS], wire.EVAL_C_INDEX: 0.61, wire.EVAL_RMSE: 1.2}
    site = {wire.TRAINED_GROUPS: "encoders.clinical,fusion,heads.survival",
            wire.DATASET_SHA256: "ab" * 32}  # fmt: skip
    records[wire.SITE] = {**records[wire.SITE], **site}
    reply = _guarded(site_toml, records)
    assert dict(reply.content.metric_records[wire.METRICS]) == records[wire.METRICS]
    assert dict(reply.content.config_records[wire.SITE]) == records[wire.SITE]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        (wire.TRAINED_GROUPS, "encoders.clinical, patient 17 died"),
        (wire.TRAINED_GROUPS, "fusion," * 100 + "fusion"),
        (wire.DATASET_SHA256, "patient 17 is 61 years old"),
        (wire.DATASET_SHA256, "AB" * 32),
    ],
    ids=["free-text-groups", "long-groups", "free-text-digest", "upper-case-digest"],
)
def test_free_text_in_the_lineage_keys_does_not_leave(
    site_toml: Path, key: str, value: str
) -> None:
    records = _honest(site_toml)
    records[wire.SITE] = {**records[wire.SITE], key: value}
    reply = _guarded(site_toml, records)
    assert key not in reply.content.config_records[wire.SITE]


@pytest.mark.parametrize(
    "tamper",
    [
        lambda arrays: {**arrays, "data": np.zeros((5, 4), np.float32)},  # an extra array
        lambda arrays: {n: a.astype(np.float64) for n, a in arrays.items()},  # float64
        lambda arrays: {
            n: np.concatenate([a.ravel(), [1.0]]).astype(np.float32)  # reshaped
            for n, a in arrays.items()
        },
        lambda arrays: dict(list(arrays.items())[1:]),  # one array missing
    ],
    ids=["extra-array", "float64", "wrong-shape", "missing"],
)
def test_an_update_beyond_the_contract_is_blocked_whole(
    site_toml: Path, tamper: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
) -> None:
    records = _honest(site_toml)
    records[wire.ARRAYS] = tamper(records[wire.ARRAYS])
    reply = _guarded(site_toml, records)
    assert reply.has_error() and reply.error.code == ERROR_CODE_BLOCKED
    (event,) = _audit_events(site_toml)
    assert event["details"]["blocked_whole"] is True


@pytest.mark.parametrize(
    "forge",
    [
        lambda site_toml, arrays: "ab" * 64,  # a made-up signature
        lambda site_toml, arrays: _receipt(site_toml, "00" * 32),  # the site's, for other arrays
        lambda site_toml, arrays: SigningKey.generate().sign(b"x").hex(),  # another key's
    ],
    ids=["made-up", "other-update", "other-key"],
)
def test_arrays_the_sites_worker_did_not_sign_do_not_leave(
    site_toml: Path, forge: Callable[[Path, dict[str, np.ndarray]], str]
) -> None:
    # An app (approved, or medfed's own led astray) that fills the model's very shapes
    # with data of its own cannot sign for them: the key is the worker's alone.
    table = table_of(site_toml)
    records = _honest(site_toml)
    arrays = records[wire.ARRAYS]
    first = sorted(arrays)[0]
    leaked = np.resize(table.train_features.astype(np.float32), arrays[first].shape)
    records[wire.ARRAYS] = {**arrays, first: leaked}
    records[wire.SITE] = {**records[wire.SITE], wire.RECEIPT_SIGNATURE: forge(site_toml, arrays)}
    reply = _guarded(site_toml, records)
    assert reply.has_error() and reply.error.code == ERROR_CODE_BLOCKED
    assert "not one the site's worker trained and signed" in str(reply.error.reason)
    (event,) = _audit_events(site_toml)
    assert event["details"]["blocked_whole"] is True


def _secure_train_reply(site_toml: Path, arrays: dict[str, np.ndarray], signature: str) -> Message:
    records = {
        wire.ARRAYS: arrays,
        wire.METRICS: {wire.NUM_EXAMPLES: 60},
        wire.SITE: {wire.SITE_ID: "hospital-1", wire.SECAGG: "[]",
                    wire.RECEIPT_SIGNATURE: signature},
    }  # fmt: skip
    instruction = _instruction(MessageType.TRAIN, **{wire.SECAGG: "{}"})
    return chain(_app_sending(records), [GUARD])(instruction, _context(site_toml))


def test_a_masked_update_leaves_only_with_the_sites_receipt_for_its_round(
    site_toml: Path,
) -> None:
    masked = np.arange(12, dtype=np.uint32)
    signature = _receipt(site_toml, masked_sha256(masked))
    assert not _secure_train_reply(site_toml, {wire.MASKED: masked}, signature).has_error()
    # Raw values in place of the masked update, with the real update's receipt: blocked.
    forged = _secure_train_reply(site_toml, {wire.MASKED: masked + np.uint32(1)}, signature)
    assert forged.error.code == ERROR_CODE_BLOCKED
    # The update unmasked (float32, its own receipt even): blocked; and none at all too.
    plain = np.linspace(-1, 1, 12, dtype=np.float32)
    unmasked = _secure_train_reply(site_toml, {wire.MASKED: plain}, signature)
    assert unmasked.error.code == ERROR_CODE_BLOCKED
    assert _secure_train_reply(site_toml, {}, signature).error.code == ERROR_CODE_BLOCKED


def test_metrics_over_fewer_than_k_patients_do_not_leave(site_toml: Path) -> None:
    k = site_config(site_toml).privacy.min_cohort_k
    records = _honest(site_toml, patients=k - 1)
    assert _guarded(site_toml, records).error.code == ERROR_CODE_BLOCKED
    evaluation = {wire.METRICS: {wire.NUM_EXAMPLES: 60, wire.EVAL_EXAMPLES: k - 1,
                                 wire.EVAL_AUROC: 0.9, wire.EVAL_LOSS: float("nan")}}  # fmt: skip
    reply = _guarded(site_toml, evaluation, MessageType.EVALUATE)
    metrics = dict(reply.content.metric_records[wire.METRICS])
    assert wire.EVAL_AUROC not in metrics  # computed over too few
    assert np.isnan(metrics[wire.EVAL_LOSS])  # withheld already: says nothing


def test_a_query_reply_may_not_carry_arrays_or_training_metrics(site_toml: Path) -> None:
    records = {
        wire.ARRAYS: global_arrays(),
        wire.METRICS: {wire.IN_WINDOW: 1, wire.LOCAL_LOSS: 0.2},
    }
    reply = _guarded(site_toml, records, MessageType.QUERY)
    assert set(reply.content) == {wire.METRICS}
    assert dict(reply.content.metric_records[wire.METRICS]) == {wire.IN_WINDOW: 1}


def test_a_status_reply_keeps_its_pre_flight_category_and_drops_any_text(
    site_toml: Path,
) -> None:
    # The coordinator plans a secure round only with sites whose pre-flight passed: the
    # category must reach it through the guard (it was dropped, so real sites' refusals
    # showed only once they had been planned); free text in its place does not leave.
    for category in ("", "no-budget", "outside-window"):
        records = {wire.SITE: {wire.SITE_ID: "hospital-1", wire.PREFLIGHT: category}}
        reply = _guarded(site_toml, records, MessageType.QUERY)
        assert dict(reply.content.config_records[wire.SITE])[wire.PREFLIGHT] == category
    records = {wire.SITE: {wire.SITE_ID: "hospital-1", wire.PREFLIGHT: "patient p1 is 77"}}
    reply = _guarded(site_toml, records, MessageType.QUERY)
    assert wire.PREFLIGHT not in dict(reply.content.config_records[wire.SITE])


def test_the_shipped_client_app_runs_behind_the_guard(site_toml: Path) -> None:
    assert GUARD in app._mods  # Flower keeps mods private


def test_a_reveal_leaves_with_the_next_round_s_keys_of_this_site_only(site_toml: Path) -> None:
    """Round r+1's keys travel with round r's reveal: public keys of this site, nothing more."""
    instruction = _instruction(f"{MessageType.TRAIN}.secagg_reveal", **{wire.SECAGG: "{}"})

    def reveal(payload: dict[str, Any]) -> Message:
        records = {wire.SITE: {wire.SITE_ID: "hospital-1", wire.SECAGG: json.dumps(payload)}}
        return chain(_app_sending(records), [GUARD])(instruction, _context(site_toml))

    shares = {"holder": "hospital-1", "seeds": {}, "pairwise": {}}
    assert not reveal(shares).has_error()
    assert not reveal({**shares, "advertisement": {"site_id": "hospital-1"}}).has_error()
    assert reveal({**shares, "advertisement": {"site_id": "hospital-2"}}).has_error()
    assert reveal({**shares, "rows": [[63, 1, 0.5]]}).has_error()


def test_a_reveal_carries_the_next_round_s_status_only_when_asked_for_it(
    site_toml: Path,
) -> None:
    """The next round's status (window, patients, budget) may leave with a reveal that
    asked for it, as a status query's answer would; no other metric ever does."""
    status = {wire.IN_WINDOW: 1, wire.PATIENTS: 60, wire.BUDGET_LEFT: 2.5}
    records = {
        wire.METRICS: {**status, wire.LOCAL_LOSS: 0.25},
        wire.SITE: {wire.SITE_ID: "hospital-1", wire.SECAGG: json.dumps(
            {"holder": "hospital-1", "seeds": {}, "pairwise": {}}
        )},
    }  # fmt: skip
    asked = _instruction(f"{MessageType.TRAIN}.secagg_reveal", **{wire.SECAGG: "{}"})
    asked.content[wire.NEXT_STATUS] = ConfigRecord({wire.RUN_ID: RUN})
    reply = chain(_app_sending(records), [GUARD])(asked, _context(site_toml))
    assert dict(reply.content.metric_records[wire.METRICS]) == status
    unasked = _instruction(f"{MessageType.TRAIN}.secagg_reveal", **{wire.SECAGG: "{}"})
    reply = chain(_app_sending(records), [GUARD])(unasked, _context(site_toml))
    assert not dict(reply.content.metric_records.get(wire.METRICS, {}))
