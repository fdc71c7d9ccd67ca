"""The ClientApp's train/evaluate handlers: finding site.toml, decoding, replies, and
refusals with code 4001 (refused) or 4002 (out of budget)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

import medfed.client.trainer as trainer_module
from medfed.client.client_app import (
    ERROR_CODE_OUT_OF_BUDGET,
    ERROR_CODE_REFUSED,
    evaluate,
    site_config_path,
    train,
)
from medfed.client.config import SITE_TOML
from medfed.client.errors import DATA_REASON, SETUP_REASON, RequestError
from medfed.consortium import DemoSite, approve
from medfed.model import wire
from medfed.model.contract import DEMO_CONTRACT as CONTRACT
from medfed.model.network import arrays_sha256, build_model, state_arrays
from tests.sitekit import (
    POLICY,
    make_study,
    node_context,
    officer_of,
    rewrite_policy,
    spend_rows,
    table_of,
    table_path,
    unit_of,
    write_sites,
)

pytestmark = pytest.mark.usefixtures("server_identity")

NODE = 12
STUDY = make_study(rounds=2, sites=2, target_epsilon=2.0, local_steps=3)


@pytest.fixture
def sites(tmp_path: Path) -> tuple[DemoSite, ...]:
    return write_sites(tmp_path, STUDY, n_sites=2, seed=4)


@pytest.fixture
def root(sites: tuple[DemoSite, ...], tmp_path: Path) -> Path:
    return tmp_path


def context(node_config: dict[str, Any], run_config: dict[str, Any] | None = None) -> Context:
    return node_context(NODE, node_config, run_config)


def site_context(root: Path, site: str = "hospital-1") -> Context:
    return context({"site-config": str(root / site / SITE_TOML)})


def instruction(
    message_type: str = MessageType.TRAIN,
    *,
    config: dict[str, Any] | None = None,
    drop: str | None = None,
) -> Message:
    arrays = state_arrays(build_model("tiny", contract=CONTRACT, seed=7))
    values: dict[str, Any] = {
        wire.RUN_ID: "run-9",
        wire.STUDY: STUDY.name,
        wire.STUDY_SHA256: STUDY.sha256(),
        wire.ROUND: 1,
        wire.PLANNED_ROUNDS: STUDY.num_rounds,
        wire.MODEL_SHA256: arrays_sha256(arrays),
        wire.PRESET: "tiny",
        wire.CONTRACT: CONTRACT.canonical_json(),
        wire.CONTRACT_SHA256: CONTRACT.sha256(),
        wire.LOCAL_STEPS: STUDY.local_steps,
        wire.LEARNING_RATE: STUDY.learning_rate,
        wire.TARGET_EPSILON: STUDY.target_epsilon,
        wire.MAX_GRAD_NORM: STUDY.max_grad_norm,
        wire.SAMPLE_RATE: STUDY.sample_rate,
        wire.DELTA: STUDY.delta,
        **(config or {}),
    }
    values.pop(drop or "", None)
    content = RecordDict(
        {wire.ARRAYS: wire.arrays_to_record(arrays), wire.CONFIG: ConfigRecord(values)}
    )
    message = Message(content, dst_node_id=NODE, message_type=message_type, group_id="1")
    message.metadata.__dict__["_message_id"] = message.object_id  # as Flower's link state does
    return message


def refusal_reason(reply: Message, code: int = ERROR_CODE_REFUSED) -> str:
    assert reply.has_error(), reply
    assert reply.error.code == code, reply.error
    assert reply.error.reason is not None
    return reply.error.reason


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if any training step starts."""

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("a training step ran although the round should have been refused")

    monkeypatch.setattr(trainer_module, "train_steps", forbidden)


def test_a_train_reply_answers_the_instruction(root: Path) -> None:
    ins = instruction()
    site_toml = root / "hospital-1" / SITE_TOML
    table = table_of(site_toml)

    reply = train(ins, site_context(root))

    assert not reply.has_error(), reply
    assert reply.metadata.reply_to_message_id == ins.metadata.message_id
    assert reply.metadata.src_node_id == NODE
    assert reply.metadata.message_type == MessageType.TRAIN
    content = reply.content
    assert wire.get_value(content, wire.SITE, wire.SITE_ID, str) == "hospital-1"
    # Counts leave noised: the patient count (std 10) and the released held-out count
    # (std 20 x sqrt 3; 0 when the noised count is below the minimum cohort).
    sent_count = wire.get_value(content, wire.METRICS, wire.NUM_EXAMPLES, int)
    assert abs(sent_count - len(table.train_labels)) < 60
    held_out = wire.get_value(content, wire.METRICS, wire.EVAL_EXAMPLES, int)
    assert held_out == 0 or abs(held_out - len(table.eval_labels)) < 6 * 20 * 1.74
    assert wire.get_value(content, wire.METRICS, wire.EPSILON, float) > 0
    sent = wire.record_to_arrays(ins.content)
    received = wire.record_to_arrays(content)
    assert received.keys() == sent.keys()
    assert all(received[name].dtype == np.float32 for name in received)
    # The noise the site chose travels in the reply, and is the one its ledger holds.
    (row,) = spend_rows(site_toml)
    noise = wire.get_value(content, wire.METRICS, wire.NOISE_MULTIPLIER, float)
    assert noise == row.event.noise_multiplier
    assert noise >= POLICY.min_noise_multiplier
    assert (row.study, row.run_id, row.round) == (f"{STUDY.name}@{STUDY.sha256()}", "run-9", 1)


def test_a_noise_multiplier_sent_by_the_coordinator_is_ignored(root: Path) -> None:
    # The site calibrates its own noise; an instruction cannot lower it.
    reply = train(instruction(config={wire.NOISE_MULTIPLIER: 0.01}), site_context(root))

    assert not reply.has_error(), reply
    (row,) = spend_rows(root / "hospital-1" / SITE_TOML)
    noise = wire.get_value(reply.content, wire.METRICS, wire.NOISE_MULTIPLIER, float)
    assert noise == row.event.noise_multiplier >= POLICY.min_noise_multiplier


def test_an_evaluate_reply_counts_the_held_out_patients(root: Path) -> None:
    table = table_of(root / "hospital-2" / SITE_TOML)

    reply = evaluate(instruction(MessageType.EVALUATE), site_context(root, "hospital-2"))

    assert not reply.has_error(), reply
    assert wire.get_value(reply.content, wire.SITE, wire.SITE_ID, str) == "hospital-2"
    examples = wire.get_value(reply.content, wire.METRICS, wire.EVAL_EXAMPLES, int)
    assert examples == 0 or abs(examples - len(table.eval_labels)) < 6 * 20 * 1.74
    stats = reply.content.metric_records[wire.METRICS][wire.EVAL_STATS]
    assert isinstance(stats, list) and len(stats) > 0  # the noised release itself
    assert wire.ARRAYS not in reply.content.array_records


@pytest.mark.parametrize(
    ("drop", "config", "reason"),
    [
        (wire.RUN_ID, None, "record 'config' has no key 'run-id'"),
        (wire.MODEL_SHA256, None, "record 'config' has no key 'model-sha256'"),
        (wire.STUDY, None, "record 'config' has no key 'study'"),
        (wire.STUDY_SHA256, None, "record 'config' has no key 'study-sha256'"),
        (wire.PLANNED_ROUNDS, None, "record 'config' has no key 'planned-rounds'"),
        (wire.TARGET_EPSILON, None, "record 'config' has no key 'target-epsilon'"),
        (None, {wire.ROUND: "one"}, "config.round: expected int, got str"),
        (None, {wire.PRESET: "huge"}, "config.preset: unknown preset 'huge'"),
        (None, {wire.LEARNING_RATE: float("nan")}, "config.learning-rate: nan is not finite"),
        (None, {wire.TARGET_EPSILON: float("inf")}, "config.target-epsilon: inf is not finite"),
        (None, {wire.SAMPLE_RATE: 0.0}, "sample_rate must be in (0, 1]"),
        (None, {wire.MAX_GRAD_NORM: 50.0}, "clipping norm 50 exceeds the site's maximum 10"),
        (None, {wire.DELTA: 5e-5}, "delta 5e-05 exceeds the site's maximum 1e-05"),
        (None, {wire.ROUND: 3}, "round 3 is beyond the 2 rounds planned"),
        (None, {wire.MODEL_SHA256: "0" * 64}, "does not match its announced digest"),
        (
            None,
            {wire.STUDY_SHA256: "f" * 64},
            f"study '{STUDY.name}' has no valid approval from this site's privacy officer",
        ),
    ],
)
def test_a_bad_train_instruction_is_refused_with_the_site_named(
    root: Path, drop: str | None, config: dict[str, Any] | None, reason: str
) -> None:
    reply = train(instruction(config=config, drop=drop), site_context(root))

    text = refusal_reason(reply)
    assert text.startswith("hospital-1: ")
    assert reason in text
    assert spend_rows(root / "hospital-1" / SITE_TOML) == []


def test_a_round_beyond_the_approval_is_refused_out_of_budget_before_any_step(
    sites: tuple[DemoSite, ...], root: Path, no_training: None
) -> None:
    # The officer's newest approval of the study is far below what the round would spend.
    approve(sites[0].site_toml, STUDY, epsilon=0.01, officer_key=officer_of(sites[0]))

    text = refusal_reason(train(instruction(), site_context(root)), ERROR_CODE_OUT_OF_BUDGET)

    assert text.startswith("hospital-1: out of budget: ")
    assert spend_rows(sites[0].site_toml) == []


def test_a_round_beyond_the_datasets_cap_is_refused_out_of_budget(
    sites: tuple[DemoSite, ...], root: Path, no_training: None
) -> None:
    rewrite_policy(sites[0].site_toml, epsilon_cap=0.5)

    text = refusal_reason(train(instruction(), site_context(root)), ERROR_CODE_OUT_OF_BUDGET)

    assert text.startswith("hospital-1: out of budget: the dataset would reach epsilon ")
    assert text.endswith("above the site's cap 0.5")
    assert spend_rows(sites[0].site_toml) == []


def test_a_bad_evaluate_instruction_is_refused(root: Path) -> None:
    reply = evaluate(instruction(MessageType.EVALUATE, drop=wire.CONTRACT), site_context(root))
    assert refusal_reason(reply) == "hospital-1: record 'config' has no key 'contract'"


def test_a_resent_round_gets_the_same_reply_and_spends_once(root: Path) -> None:
    first = train(instruction(), site_context(root))
    assert not first.has_error()

    again = train(instruction(), site_context(root))

    assert not again.has_error()
    sent, resent = wire.record_to_arrays(first.content), wire.record_to_arrays(again.content)
    assert {n: a.tobytes() for n, a in resent.items()} == {n: a.tobytes() for n, a in sent.items()}
    assert len(spend_rows(root / "hospital-1" / SITE_TOML)) == 1


def test_a_broken_table_is_refused_naming_file_row_and_column_only_at_the_site(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The red team's case: a value and the site's path went into the coordinator's
    # results and audit chain. The site's log names file, row, column and value; the
    # reply says only that the data does not meet the contract.
    path = table_path(root / "hospital-1" / SITE_TOML)
    lines = path.read_text(encoding="utf-8").splitlines()
    cells = lines[3].split(",")
    cells[-1] = "maybe"
    lines[3] = ",".join(cells)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    with caplog.at_level("WARNING"):
        text = refusal_reason(train(instruction(), site_context(root)))

    assert text == f"hospital-1: {DATA_REASON}"
    assert "maybe" not in text and str(root) not in text
    assert f"{path}, row 4, column readmitted_30d: 'maybe' is not a number" in caplog.text


def test_a_supernode_that_does_not_name_its_site_is_refused() -> None:
    text = refusal_reason(train(instruction(), context({})))
    assert text.startswith("unidentified site: this SuperNode does not say which site it is")


def test_a_missing_site_toml_is_refused_naming_its_path_only_at_the_site(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "nowhere" / SITE_TOML

    with caplog.at_level("WARNING"):
        text = refusal_reason(train(instruction(), context({"site-config": str(path)})))

    assert text == f"unidentified site: {SETUP_REASON}"
    assert f"{path}: cannot be read" in caplog.text


def test_a_bad_site_toml_is_refused_naming_file_and_key_only_at_the_site(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    site_toml = root / "hospital-1" / SITE_TOML
    text = site_toml.read_text(encoding="utf-8")
    site_toml.write_text(text.replace("epsilon_cap = 10.0", "epsilon_cap = -1.0"), encoding="utf-8")

    with caplog.at_level("WARNING"):
        reason = refusal_reason(train(instruction(), site_context(root)))

    assert reason == f"unidentified site: {SETUP_REASON}"
    assert f"{site_toml}: key privacy.epsilon_cap: " in caplog.text


def test_the_site_comes_from_the_node_config() -> None:
    ctx = context({"site-config": "/data/x/site.toml"})
    assert site_config_path(ctx) == Path("/data/x/site.toml")


def test_the_node_config_wins_over_a_simulation_partition(root: Path) -> None:
    ctx = context(
        {"site-config": "/data/x/site.toml", "partition-id": 0}, {"sites-root": str(root)}
    )
    assert site_config_path(ctx) == Path("/data/x/site.toml")


def test_in_a_simulation_the_partition_names_the_site(root: Path) -> None:
    ctx = context({"partition-id": 1}, {"sites-root": str(root)})
    assert site_config_path(ctx) == root / "hospital-2" / SITE_TOML


@pytest.mark.parametrize(
    ("node_config", "run_config", "site"),
    [
        ({"site-config": "ROOT/hospital-2/site.toml"}, {}, "hospital-2"),
        ({"partition-id": 0}, {"sites-root": "ROOT"}, "hospital-1"),
        ({"partition-id": 1}, {"sites-root": "ROOT"}, "hospital-2"),
    ],
    ids=["node-config", "partition-0", "partition-1"],
)
def test_both_ways_of_naming_the_site_reach_its_data_and_ledger(
    root: Path, node_config: dict[str, Any], run_config: dict[str, Any], site: str
) -> None:
    def rooted(values: dict[str, Any]) -> dict[str, Any]:
        return {
            key: value.replace("ROOT", str(root)) if isinstance(value, str) else value
            for key, value in values.items()
        }

    reply = train(instruction(), context(rooted(node_config), rooted(run_config)))

    assert not reply.has_error(), reply
    assert wire.get_value(reply.content, wire.SITE, wire.SITE_ID, str) == site
    table = table_of(root / site / SITE_TOML)
    sent_count = wire.get_value(reply.content, wire.METRICS, wire.NUM_EXAMPLES, int)
    assert abs(sent_count - len(table.train_labels)) < 60  # noised
    (row,) = spend_rows(root / site / SITE_TOML)
    assert row.dataset == unit_of(root / site / SITE_TOML)
    other = "hospital-1" if site == "hospital-2" else "hospital-2"
    assert spend_rows(root / other / SITE_TOML) == []


def test_without_node_config_or_sites_root_there_is_no_site() -> None:
    with pytest.raises(RequestError):
        site_config_path(context({"partition-id": 0}))


def _one_patient_table(site_toml: Path) -> None:
    header = ",".join([CONTRACT.patient_id, *CONTRACT.feature_names, CONTRACT.tasks[0].target])
    table_path(site_toml).write_text(
        f"{header}\nonly-one,62,27,132,78,6.2,90,13.5,40,1\n", encoding="utf-8"
    )


def test_a_site_below_its_minimum_cohort_is_refused(root: Path, no_training: None) -> None:
    site_toml = root / "hospital-1" / SITE_TOML
    _one_patient_table(site_toml)
    rewrite_policy(site_toml, count_noise_std=1.0)  # 1 + noise stays far below k

    text = refusal_reason(train(instruction(), site_context(root)))

    assert text.startswith("hospital-1: the dataset has about ")
    assert text.endswith(
        f" patients (noised), fewer than the site's minimum cohort {POLICY.min_cohort_k}"
    )
    assert spend_rows(site_toml) == []


def test_a_site_too_small_for_dp_sgd_is_refused(root: Path) -> None:
    # A policy that allows a cohort of one still cannot run DP-SGD on one patient.
    site_toml = root / "hospital-1" / SITE_TOML
    _one_patient_table(site_toml)
    rewrite_policy(site_toml, min_cohort_k=1)

    text = refusal_reason(train(instruction(), site_context(root)))

    assert text.startswith("hospital-1: DP-SGD needs at least 2 patients")
    assert spend_rows(site_toml) == []


def test_a_query_reports_the_site_status_in_process(root: Path) -> None:
    from medfed.client.client_app import query

    config = {
        wire.STUDY: STUDY.name,
        wire.STUDY_SHA256: STUDY.sha256(),
        wire.CONTRACT: CONTRACT.canonical_json(),
        wire.CONTRACT_SHA256: CONTRACT.sha256(),
    }
    message = Message(
        RecordDict({wire.CONFIG: ConfigRecord(config)}),
        dst_node_id=NODE,
        message_type=MessageType.QUERY,
        group_id="q",
    )
    message.metadata.__dict__["_message_id"] = message.object_id
    reply = query(message, site_context(root))
    assert not reply.has_error(), reply
    metrics = reply.content.metric_records[wire.METRICS]
    assert metrics[wire.IN_WINDOW] == 1 and metrics[wire.NEXT_WINDOW_START] == 0.0
    exact = len(table_of(root / "hospital-1" / SITE_TOML).train_labels)
    assert abs(int(metrics[wire.PATIENTS]) - exact) < 60  # noised (std 10), never exact
    assert metrics[wire.BUDGET_LEFT] == pytest.approx(STUDY.target_epsilon)
    assert wire.THROUGHPUT not in metrics  # the query named no model
    site = reply.content.config_records[wire.SITE]
    assert site[wire.SITE_ID] == "hospital-1" and site[wire.ACCELERATOR] == "cpu"


def test_outside_its_window_the_site_refuses_with_its_own_code(root: Path) -> None:
    import datetime as dt

    from medfed.client.client_app import ERROR_CODE_OUTSIDE_WINDOW
    from medfed.client.windows import WEEKDAYS

    site_toml = root / "hospital-1" / SITE_TOML
    other_day = WEEKDAYS[(dt.datetime.now(dt.UTC).weekday() + 3) % 7]  # not today, nor soon
    window = f'\n[[windows]]\ndays = ["{other_day}"]\nstart = "10:00"\nend = "11:00"\n'
    site_toml.write_text(site_toml.read_text() + window + 'timezone = "UTC"\n')
    reply = train(instruction(), site_context(root))
    reason = refusal_reason(reply, ERROR_CODE_OUTSIDE_WINDOW)
    assert "outside the site's training windows" in reason and "next" in reason
    assert spend_rows(site_toml) == []
