"""The site worker over its Unix socket: the same answers as in-process, refusals as
refusals, an owner-only socket, a clear error when the worker is gone, and a thin
ClientApp that forwards to it without importing torch."""

from __future__ import annotations

import datetime
import json
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from medfed.client import codec
from medfed.client.codec import Frame
from medfed.client.config import SITE_TOML
from medfed.client.errors import (
    DATA_REASON,
    INTERNAL_REASON,
    SETUP_REASON,
    BudgetRefusal,
    SiteRefusal,
    WorkerUnavailable,
)
from medfed.client.protocol import QueryRequest
from medfed.client.site_api import SiteService
from medfed.client.worker_rpc import WorkerClient, dispatch, serve, worker_socket_path
from medfed.model.contract import DEMO_CONTRACT as CONTRACT
from medfed.privacy.audit import verify_audit_log
from medfed.privacy.errors import LedgerError
from medfed.sites.errors import DataError
from tests.sitekit import (
    evaluate_request,
    global_arrays,
    make_study,
    site_config,
    site_public_key,
    spend_rows,
    train_request,
    write_sites,
)

STUDY = make_study(rounds=2, sites=1, target_epsilon=2.0, local_steps=2)


@pytest.fixture
def site_toml(tmp_path: Path) -> Path:
    write_sites(tmp_path, STUDY, n_sites=1, seed=5)
    return tmp_path / "hospital-1" / SITE_TOML


@pytest.fixture
def worker(site_toml: Path) -> Iterator[WorkerClient]:
    config = site_config(site_toml)
    socket_path = worker_socket_path(config)
    server = serve(SiteService(config, CONTRACT), socket_path)
    try:
        yield WorkerClient(socket_path, timeout_s=120)
    finally:
        server.stop(None).wait()


def test_the_socket_is_owner_only(site_toml: Path, worker: WorkerClient) -> None:
    mode = worker_socket_path(site_config(site_toml)).stat().st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600


def test_a_round_over_the_socket_trains_and_records_one_spend(
    site_toml: Path, worker: WorkerClient
) -> None:
    request = train_request(STUDY, 1, run_id="run-w")
    reply = worker.train(request)
    assert reply.site_id == "hospital-1"
    assert set(reply.arrays) == set(request.arrays)
    assert all(reply.arrays[n].shape == a.shape for n, a in request.arrays.items())
    assert not all(np.array_equal(reply.arrays[n], a) for n, a in request.arrays.items())
    rows = spend_rows(site_toml)
    assert [(r.run_id, r.round) for r in rows] == [("run-w", 1)]
    # The same instruction again (a resumed coordinator) gets the same reply, spending nothing.
    again = worker.train(request)
    assert all(again.arrays[n].tobytes() == a.tobytes() for n, a in reply.arrays.items())
    assert again.receipt_signature == reply.receipt_signature
    assert len(spend_rows(site_toml)) == 1


def test_refusals_cross_the_socket_as_refusals(site_toml: Path, worker: WorkerClient) -> None:
    arrays = global_arrays()
    with pytest.raises(SiteRefusal, match="does not match its announced digest"):
        worker.train(train_request(STUDY, arrays=arrays, model_sha256="0" * 64))
    bad = dict(arrays)
    name = next(iter(bad))
    bad[name] = np.zeros((3, 3), dtype=np.float32)
    with pytest.raises(SiteRefusal):
        worker.evaluate(evaluate_request(bad))
    with pytest.raises(SiteRefusal, match="no valid approval") as unknown:
        worker.train(train_request(make_study(name="never-approved"), run_id="run-u"))
    assert not isinstance(unknown.value, BudgetRefusal)
    assert spend_rows(site_toml) == []
    # The worker is still serving after every refusal.
    assert worker.ping()


def test_a_query_reports_window_patients_and_budget(site_toml: Path, worker: WorkerClient) -> None:
    reply = worker.query(QueryRequest(study=STUDY.name, study_sha256=STUDY.sha256()))
    assert reply.in_window and reply.next_window_start == 0.0 and reply.window_ends == 0.0
    assert reply.accelerator == "cpu"
    assert reply.patients > 0
    assert reply.budget_left == pytest.approx(STUDY.target_epsilon)  # approved, nothing spent
    unknown = worker.query(QueryRequest(study="x", study_sha256="f" * 64))
    assert unknown.budget_left == 0.0  # the policy requires an approval; there is none


def test_audit_requests_land_in_the_site_log(site_toml: Path, worker: WorkerClient) -> None:
    worker.audit("egress blocked", {"dropped": ["metrics.x"]})
    config = site_config(site_toml)
    verification = verify_audit_log(config.audit_path, site_public_key(site_toml))
    assert verification.first_bad is None
    lines = config.audit_path.read_text().splitlines()
    assert json.loads(lines[-1])["event"] == "egress blocked"


def test_a_gone_worker_is_a_clear_error(tmp_path: Path) -> None:
    client = WorkerClient(tmp_path / "worker.sock", timeout_s=2)
    with pytest.raises(WorkerUnavailable, match="not running"):
        client.query(QueryRequest())
    (tmp_path / "worker.sock").write_bytes(b"")  # a stale file where the socket was
    with pytest.raises(WorkerUnavailable, match="did not answer"):
        client.query(QueryRequest())
    assert not client.ping()


THIN = textwrap.dedent(
    """
    import json, sys
    from flwr.app import Context, Message, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID
    from medfed.flower.testing import TaskIdentity
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = 1, SUPERLINK_NODE_ID, 1
    from medfed.client.client_app import app
    msg = Message(RecordDict(), dst_node_id=5, message_type="query", group_id="1")
    msg.metadata.__dict__["_message_id"] = msg.object_id
    ctx = Context(run_id=1, node_id=5,
                  node_config={"worker-socket": sys.argv[1], "worker-wait-s": "0"},
                  state=RecordDict(), run_config={})
    reply = app(msg, ctx)
    out = {"torch": "torch" in sys.modules, "error": reply.has_error()}
    if reply.has_error():
        out["reason"] = reply.error.reason
    else:
        out["metrics"] = dict(reply.content.metric_records["metrics"])
        out["site"] = dict(reply.content.config_records["site"])
    print(json.dumps(out))
    """
)


def _thin(socket_path: Path) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", THIN, str(socket_path)],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_the_thin_client_app_forwards_without_torch(site_toml: Path, worker: WorkerClient) -> None:
    result = _thin(worker_socket_path(site_config(site_toml)))
    assert result["torch"] is False
    assert result["error"] is False, result
    assert result["metrics"] == {
        "in-window": 1,
        "window-ends": 0.0,
        "next-window-start": 0.0,
        "patients": pytest.approx(result["metrics"]["patients"]),
    }  # type: ignore[index]
    assert result["site"] == {"site-id": "hospital-1", "accelerator": "cpu", "preflight": ""}


def test_the_thin_client_app_refuses_clearly_when_the_worker_is_gone(tmp_path: Path) -> None:
    result = _thin(tmp_path / "worker.sock")
    assert result["torch"] is False
    assert result["error"] is True
    assert "not running" in str(result["reason"])


WINDOW = """
[[windows]]
days = ["sat", "sun"]
start = "22:00"
end = "06:00"
timezone = "Europe/Berlin"
"""


def test_outside_its_window_a_site_refuses_to_train_and_says_when(site_toml: Path) -> None:
    from medfed.client.errors import OutsideWindow

    site_toml.write_text(site_toml.read_text() + WINDOW)
    config = site_config(site_toml)
    tuesday_noon = datetime.datetime(2026, 6, 2, 10, 0, tzinfo=datetime.UTC)
    service = SiteService(config, CONTRACT, clock=lambda: tuesday_noon)
    with pytest.raises(OutsideWindow, match="2026-06-06T20:00:00"):  # Saturday 22:00 CEST
        service.train(train_request(STUDY))
    assert spend_rows(site_toml) == []
    reply = service.query(QueryRequest())
    assert not reply.in_window
    assert (
        reply.next_window_start
        == datetime.datetime(2026, 6, 6, 20, tzinfo=datetime.UTC).timestamp()
    )
    sunday_night = datetime.datetime(2026, 6, 7, 23, 0, tzinfo=datetime.UTC)  # Mon 01:00 CEST
    inside = SiteService(config, CONTRACT, clock=lambda: sunday_night).query(QueryRequest())
    assert inside.in_window and inside.next_window_start == 0.0
    assert inside.window_ends == datetime.datetime(2026, 6, 8, 4, tzinfo=datetime.UTC).timestamp()


def test_throughput_is_measured_once_and_cached_per_model_and_accelerator(
    site_toml: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import medfed.client.throughput as throughput
    from medfed.model.network import model_identity

    config = site_config(site_toml)
    service = SiteService(config, CONTRACT)
    ask = QueryRequest(
        preset="tiny", contract_json=CONTRACT.canonical_json(), contract_sha256=CONTRACT.sha256()
    )
    first = service.query(ask).throughput
    assert first is not None and first > 0
    cached = json.loads((config.state_dir / throughput.CACHE_NAME).read_text())
    # Keyed by the model and how the site trains: accelerator, precision, grad-sample mode.
    assert cached == {f"{model_identity('tiny', CONTRACT)}@cpu/fp32/bk": first}

    def no_second_run(*args: object) -> float:
        raise AssertionError("calibrated again although the figure is cached")

    monkeypatch.setattr(throughput, "calibrate", no_second_run)
    assert service.query(ask).throughput == first
    assert spend_rows(site_toml) == []  # calibration touches no patient and spends nothing


class _Failing:
    """A site API whose every call fails with `error` (only `egress_rules` is asked)."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def egress_rules(self) -> None:
        raise self.error


@pytest.mark.parametrize(
    ("error", "public"),
    [
        (
            SiteRefusal(
                "row 4: patient 'hospital-3-p00001' repeats with a different age (77.77)",
                public=DATA_REASON,
            ),
            DATA_REASON,
        ),
        (DataError("/srv/site/lung.csv, row 4: 'maybe' is not a number"), DATA_REASON),
        (LedgerError("/srv/site/state/ledger.db: not a readable privacy ledger"), SETUP_REASON),
        (KeyError("hospital-3-p00001"), INTERNAL_REASON),
        (BudgetRefusal("out of budget: epsilon 9.800 above the cap 10"), None),
    ],
    ids=["data-refusal", "data-error", "ledger-path", "unexpected", "budget"],
)
def test_only_the_public_reason_crosses_the_worker_socket(
    error: Exception, public: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    # The executor (which runs the coordinator's app) never receives a data value, a
    # patient id or a site path; the worker's log keeps the whole reason.
    with caplog.at_level("WARNING"):
        reply = codec.decode_frame(dispatch(_Failing(error), codec.encode_frame(Frame("rules"))))
    reason = str(reply.fields["reason"])
    assert reason == (str(error) if public is None else public)
    if public is not None:
        assert "hospital-3" not in reason and "/srv/site" not in reason
        assert str(error).strip("'") in caplog.text
