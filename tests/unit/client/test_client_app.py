"""The ClientApp's train/evaluate handlers: decoding, replies, and refusals with code 4001."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from client.client_app import ERROR_CODE_REFUSED, evaluate, site_location, train
from client.errors import RequestError
from model import wire
from model.contract import DEMO_CONTRACT as CONTRACT
from model.network import arrays_sha256, build_model, state_arrays
from sites.synthetic import TABLE_NAME, write_synthetic_consortium
from sites.tabular import read_site_table

pytestmark = pytest.mark.usefixtures("server_identity")

NODE = 12


@pytest.fixture
def root(tmp_path: Path) -> Path:
    write_synthetic_consortium(tmp_path, CONTRACT, n_sites=2, seed=4)
    return tmp_path


def context(node_config: dict[str, Any], run_config: dict[str, Any] | None = None) -> Context:
    return Context(
        run_id=1,
        node_id=NODE,
        node_config=node_config,
        state=RecordDict(),
        run_config=run_config or {},
    )


def site_context(root: Path, site: str = "hospital-1") -> Context:
    return context({"site-id": site, "site-dir": str(root / site)})


def instruction(
    message_type: str = MessageType.TRAIN,
    *,
    config: dict[str, Any] | None = None,
    drop: str | None = None,
) -> Message:
    arrays = state_arrays(build_model("tiny", n_features=len(CONTRACT.features), seed=7))
    values: dict[str, Any] = {
        wire.RUN_ID: "run-9",
        wire.ROUND: 1,
        wire.MODEL_SHA256: arrays_sha256(arrays),
        wire.PRESET: "tiny",
        wire.N_FEATURES: len(CONTRACT.features),
        wire.LOCAL_STEPS: 3,
        wire.LEARNING_RATE: 0.1,
        wire.NOISE_MULTIPLIER: 1.0,
        wire.MAX_GRAD_NORM: 1.0,
        wire.SAMPLE_RATE: 0.1,
        wire.DELTA: 1e-5,
        **(config or {}),
    }
    values.pop(drop or "", None)
    content = RecordDict(
        {wire.ARRAYS: wire.arrays_to_record(arrays), wire.CONFIG: ConfigRecord(values)}
    )
    message = Message(content, dst_node_id=NODE, message_type=message_type, group_id="1")
    message.metadata.__dict__["_message_id"] = message.object_id  # as Flower's link state does
    return message


def refusal_reason(reply: Message) -> str:
    assert reply.has_error(), reply
    assert reply.error.code == ERROR_CODE_REFUSED
    assert reply.error.reason is not None
    return reply.error.reason


def test_a_train_reply_answers_the_instruction(root: Path) -> None:
    ins = instruction()
    table = read_site_table(root / "hospital-1" / TABLE_NAME, CONTRACT)

    reply = train(ins, site_context(root))

    assert not reply.has_error(), reply
    assert reply.metadata.reply_to_message_id == ins.metadata.message_id
    assert reply.metadata.src_node_id == NODE
    assert reply.metadata.message_type == MessageType.TRAIN
    content = reply.content
    assert wire.get_value(content, wire.SITE, wire.SITE_ID, str) == "hospital-1"
    assert wire.get_value(content, wire.METRICS, wire.NUM_EXAMPLES, int) == len(table.train_labels)
    assert wire.get_value(content, wire.METRICS, wire.EVAL_EXAMPLES, int) == len(table.eval_labels)
    assert wire.get_value(content, wire.METRICS, wire.EPSILON, float) > 0
    sent = wire.record_to_arrays(ins.content)
    received = wire.record_to_arrays(content)
    assert received.keys() == sent.keys()
    assert all(received[name].dtype == np.float32 for name in received)


def test_an_evaluate_reply_counts_the_held_out_patients(root: Path) -> None:
    table = read_site_table(root / "hospital-2" / TABLE_NAME, CONTRACT)

    reply = evaluate(instruction(MessageType.EVALUATE), site_context(root, "hospital-2"))

    assert not reply.has_error(), reply
    assert wire.get_value(reply.content, wire.SITE, wire.SITE_ID, str) == "hospital-2"
    examples = wire.get_value(reply.content, wire.METRICS, wire.EVAL_EXAMPLES, int)
    assert examples == len(table.eval_labels)
    assert wire.ARRAYS not in reply.content.array_records


@pytest.mark.parametrize(
    ("drop", "config", "reason"),
    [
        (wire.RUN_ID, None, "record 'config' has no key 'run-id'"),
        (wire.MODEL_SHA256, None, "record 'config' has no key 'model-sha256'"),
        (None, {wire.ROUND: "one"}, "config.round: expected int, got str"),
        (None, {wire.PRESET: "huge"}, "config.preset: unknown preset 'huge'"),
        (None, {wire.LEARNING_RATE: float("nan")}, "config.learning-rate: nan is not finite"),
        (None, {wire.NOISE_MULTIPLIER: 0.0}, "noise_multiplier must be positive"),
        (None, {wire.MODEL_SHA256: "0" * 64}, "does not match its announced digest"),
    ],
)
def test_a_bad_train_instruction_is_refused_with_the_site_named(
    root: Path, drop: str | None, config: dict[str, Any] | None, reason: str
) -> None:
    reply = train(instruction(config=config, drop=drop), site_context(root))

    text = refusal_reason(reply)
    assert text.startswith("hospital-1: ")
    assert reason in text


def test_a_bad_evaluate_instruction_is_refused(root: Path) -> None:
    reply = evaluate(instruction(MessageType.EVALUATE, drop=wire.N_FEATURES), site_context(root))
    assert refusal_reason(reply) == "hospital-1: record 'config' has no key 'n-features'"


def test_a_replayed_round_is_refused(root: Path) -> None:
    ins = instruction()
    assert not train(ins, site_context(root)).has_error()

    text = refusal_reason(train(instruction(), site_context(root)))

    assert text.startswith("hospital-1: run run-9 round 1 was already trained here")


def test_a_broken_table_is_refused_with_file_row_and_column(root: Path) -> None:
    path = root / "hospital-1" / TABLE_NAME
    lines = path.read_text(encoding="utf-8").splitlines()
    cells = lines[3].split(",")
    cells[-1] = "maybe"
    lines[3] = ",".join(cells)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    text = refusal_reason(train(instruction(), site_context(root)))

    assert text == f"hospital-1: {path}, row 4, column readmitted_30d: 'maybe' is not 0 or 1"


def test_a_supernode_that_does_not_name_its_site_is_refused() -> None:
    text = refusal_reason(train(instruction(), context({})))
    assert text.startswith("unidentified site: this SuperNode does not say which site it is")


def test_the_site_comes_from_the_node_config() -> None:
    assert site_location(context({"site-id": "h-x", "site-dir": "/data/x"})) == (
        "h-x",
        Path("/data/x"),
    )


def test_in_a_simulation_the_partition_names_the_site(root: Path) -> None:
    ctx = context({"partition-id": 1}, {"sites-root": str(root)})
    assert site_location(ctx) == ("hospital-2", root / "hospital-2")


def test_without_node_config_or_sites_root_there_is_no_site() -> None:
    with pytest.raises(RequestError):
        site_location(context({"partition-id": 0}))


def test_a_site_too_small_for_dp_sgd_is_refused(tmp_path: Path) -> None:
    site_dir = tmp_path / "hospital-1"
    site_dir.mkdir()
    header = ",".join([CONTRACT.patient_id, *CONTRACT.feature_names, CONTRACT.outcome])
    (site_dir / TABLE_NAME).write_text(
        f"{header}\nonly-one,62,27,132,78,6.2,90,13.5,40,1\n", encoding="utf-8"
    )

    text = refusal_reason(train(instruction(), site_context(tmp_path)))

    assert text.startswith("hospital-1: DP-SGD needs at least 2 patients")
