"""The lead's runs: submit a study to the consortium's SuperLink, follow, resume, stop.

`medfed coordinator start` runs the SuperLink and writes the `flwr` connection
`medfed-consortium` under the consortium's run directory. Each run gets a folder
`<run_dir>/runs/<run name>/` that holds its app bundle, `run.json` (what was submitted,
and every Flower run id it ran under), and what the ServerApp writes there:
`results.json`, `checkpoints.db`, the signed `audit.jsonl` and the coordinator's public
key. Resuming submits the same study again with `resume = true`: the ServerApp
continues from the last checkpoint under the run's first id, so sites see the same
(run, round) and spend nothing twice.

Every submission is signed with the consortium's app-signing key (the PKI folder's
`ca/app-signing.key`): the signature of the exact bundle `flwr run` sends travels as
the run-config override `app-signature`, and sites run only bundles a key they trust
signed (`client.bundle_check`).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from medfed.analysis.query import AskQuery
from medfed.app_bundle import build_app_dir, signature_run_config
from medfed.common import read_toml, write_atomic
from medfed.coordinator.consortium import ConsortiumConfig
from medfed.coordinator.results import RunResults, read_results
from medfed.coordinator.study import StudySettings
from medfed.errors import MedfedError
from medfed.flower import CONSORTIUM_CONNECTION as CONNECTION
from medfed.flower import FLWR_HOME_NAME, FlwrCommandError, check_flwr, require_supported_flwr
from medfed.lifecycle import REGISTERED_NAME
from medfed.privacy.errors import PrivacyError
from medfed.privacy.signing import SigningKey
from medfed.provision import APP_SIGNING_KEY_ID, PkiLayout
from medfed.run_report import RESULTS_NAME

RUNS_DIR = "runs"
RUN_FILE = "run.json"
SITE_KEYS_DIR = "site-keys"
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class RunError(MedfedError):
    """A run cannot be found, submitted, resumed or stopped; the message says why."""


@dataclass
class RunRecord:
    """`run.json`: what the lead submitted, and the Flower runs it ran as."""

    name: str
    study: str
    study_sha256: str
    submitted: str
    flower_run_ids: list[str] = field(default_factory=list)
    stopped: bool = False
    pki: str = ""
    """The PKI folder whose app-signing key signed the bundle (resume signs with it too)."""
    secure_aggregation: bool = True
    """Whether the study aggregates securely; off is shown on every status."""
    kind: str = "round"
    """`round` (a training run) or `ask` (a query: `medfed ask`, not a round to list)."""

    def save(self, folder: Path) -> None:
        write_atomic(folder / RUN_FILE, json.dumps(asdict(self), indent=1).encode("utf-8"))

    @classmethod
    def load(cls, folder: Path) -> RunRecord:
        try:
            return cls(**json.loads((folder / RUN_FILE).read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError) as exc:
            raise RunError(f"{folder / RUN_FILE}: not a run record ({exc})") from exc


@dataclass(frozen=True)
class RunView:
    """A run as `status` and `list` show it."""

    folder: Path
    record: RunRecord
    results: RunResults | None

    @property
    def status(self) -> str:
        """The ServerApp's last word, or `stopped` if the lead stopped it before its end."""
        if self.results is not None and self.results.status in ("completed", "failed"):
            return self.results.status
        if self.record.stopped:
            return "stopped"
        return "submitted" if self.results is None else self.results.status

    def to_json(self) -> dict[str, object]:
        results = self.results
        return {
            "run": self.record.name,
            "folder": str(self.folder),
            "study": self.record.study,
            "flower_run_ids": self.record.flower_run_ids,
            "stopped": self.record.stopped,
            "secure_aggregation": self.record.secure_aggregation,
            "status": self.status,
            "rounds_completed": 0 if results is None else results.rounds_completed,
            "num_rounds": None if results is None else results.num_rounds,
            "waiting_until": None if results is None else results.waiting_until,
            "error": None if results is None else results.error,
            "results": None if results is None else results.to_json(),
        }


def runs_root(config: ConsortiumConfig) -> Path:
    """Where the consortium's runs live, as an absolute path: the ServerApp writes there
    from another working directory."""
    return config.run_dir.resolve() / RUNS_DIR


def run_folder(config: ConsortiumConfig, name: str) -> Path:
    """The folder of run `name`; a name that is not a run is an error naming it."""
    if not _RUN_NAME.fullmatch(name):
        raise RunError(f"{name!r} is not a run name")
    folder = runs_root(config) / name
    if not (folder / RUN_FILE).is_file():
        raise RunError(f"no run {name!r} in {runs_root(config)} (see `medfed round list`)")
    return folder


def view(folder: Path) -> RunView:
    return RunView(folder, RunRecord.load(folder), read_results(folder / RESULTS_NAME))


def list_runs(config: ConsortiumConfig) -> list[RunView]:
    """Every run of the consortium, oldest first."""
    root = runs_root(config)
    if not root.is_dir():
        return []
    folders = [path for path in root.iterdir() if (path / RUN_FILE).is_file()]
    views = [v for v in (view(folder) for folder in folders) if v.record.kind == "round"]
    return sorted(views, key=lambda v: (v.record.submitted, v.record.name))


def _copy_site_keys(layout: PkiLayout, config: ConsortiumConfig, dest: Path) -> int:
    """Each member site's public signing key as `<site>.pub` in `dest`; how many."""
    dest.mkdir(parents=True, exist_ok=True)
    copied = 0
    for site in config.sites:
        public = layout.site_dir(site.id) / "site-signing.pub"
        if public.is_file():
            shutil.copyfile(public, dest / f"{site.id}.pub")
            copied += 1
    return copied


def _run_config(
    study: StudySettings, folder: Path, *, resume: bool, pki: PkiLayout | None = None
) -> dict[str, object]:
    config: dict[str, object] = {
        **study.to_run_config(),
        "results-path": str(folder / RESULTS_NAME),
        "run-dir": str(folder),
        "resume": resume,
    }
    if pki is not None and pki.coordinator_key.is_file():  # signs round announcements
        config["coordinator-key"] = str(pki.coordinator_key.resolve())
    if (folder / SITE_KEYS_DIR).is_dir():
        config["site-keys-dir"] = str(folder / SITE_KEYS_DIR)
    registered = folder.parent.parent / REGISTERED_NAME  # the consortium's run_dir
    if registered.is_file():  # node ids by site, so the lead reads site ids
        config["site-nodes"] = str(registered)
    return config


def _flwr(flwr: str, config: ConsortiumConfig, args: list[str], what: str) -> str:
    env = {**os.environ, "FLWR_HOME": str(config.run_dir.resolve() / FLWR_HOME_NAME)}
    try:
        return check_flwr(flwr, args, env=env, what=what)
    except FlwrCommandError as exc:
        raise RunError(str(exc)) from exc


def app_signing_key(pki: PkiLayout) -> SigningKey:
    """The consortium's app-signing key, or a `RunError` that names why it cannot be read."""
    try:
        return SigningKey.load(pki.app_signing_key)
    except PrivacyError as exc:
        raise RunError(
            f"cannot sign the app bundle with the consortium's app-signing key: {exc}"
        ) from exc


def _submit(flwr: str, config: ConsortiumConfig, app_dir: Path, key: SigningKey | None) -> str:
    """Submit `app_dir` as a run, its bundle signed with `key` (unsigned: None); its id."""
    signature = (
        []
        if key is None
        else ["--run-config", signature_run_config(app_dir, key, key_id=APP_SIGNING_KEY_ID)]
    )
    output = _flwr(flwr, config, ["run", str(app_dir), CONNECTION, *signature, "--format", "json"],
                   "submitting the run")  # fmt: skip
    try:
        return str(json.loads(output)["run-id"])
    except (ValueError, KeyError, TypeError) as exc:
        raise RunError(f"flwr run answered something unexpected: {output.strip()[:200]}") from exc


def _new_run_folder(
    config: ConsortiumConfig, name: str, pki: PkiLayout | None
) -> tuple[Path, SigningKey | None]:
    """A new run folder (with the sites' public keys when a PKI is given) and the key that
    signs its bundle; refused without the SuperLink's flwr connection."""
    require_supported_flwr()  # the bundle's ServerApp and ClientApp use medfed's Flower door
    if not (config.run_dir / FLWR_HOME_NAME / "config.toml").is_file():
        raise RunError(
            f"no flwr connection in {config.run_dir / FLWR_HOME_NAME}: start the SuperLink"
            " with `medfed coordinator start` first"
        )
    key = None if pki is None else app_signing_key(pki)
    folder = runs_root(config) / name
    if folder.exists():
        raise RunError(f"{folder} exists already; wait a second and start again")
    folder.mkdir(parents=True)
    if pki is not None:
        _copy_site_keys(pki, config, folder / SITE_KEYS_DIR)
    return folder, key


def start_run(
    config: ConsortiumConfig,
    study: StudySettings,
    *,
    flwr: str,
    pki: PkiLayout | None = None,
    now: dt.datetime | None = None,
) -> RunView:
    """Make the run's folder and app bundle and submit it to the consortium's SuperLink."""
    moment = now or dt.datetime.now(dt.UTC)
    name = f"{study.name}-{moment.strftime('%Y%m%dT%H%M%S')}"
    folder, key = _new_run_folder(config, name, pki)
    record = RunRecord(name, study.name, study.sha256(), moment.isoformat())
    record.secure_aggregation = study.secure_aggregation
    record.pki = "" if pki is None else str(pki.root.resolve())
    record.save(folder)
    app_dir = build_app_dir(folder / "app", _run_config(study, folder, resume=False, pki=pki))
    record.flower_run_ids.append(_submit(flwr, config, app_dir, key))
    record.save(folder)
    return view(folder)


def start_ask(
    config: ConsortiumConfig,
    study: StudySettings,
    query: AskQuery,
    *,
    flwr: str,
    pki: PkiLayout | None = None,
    now: dt.datetime | None = None,
) -> Path:
    """Make a query run's folder (`runs/ask-<query>-<time>/`) and submit its signed bundle;
    the folder, where the ServerApp writes `answers.json` and its audit chain."""
    from medfed.asks import ask_run_config

    moment = now or dt.datetime.now(dt.UTC)
    name = f"ask-{query.name}-{moment.strftime('%Y%m%dT%H%M%S')}"
    folder, key = _new_run_folder(config, name, pki)
    record = RunRecord(name, f"ask:{query.name}", query.sha256(), moment.isoformat(), kind="ask")
    record.pki = "" if pki is None else str(pki.root.resolve())
    record.save(folder)
    plumbing = _run_config(study, folder, resume=False, pki=pki)  # keys, site keys, nodes
    plumbing.pop("results-path")  # a query writes answers.json
    run_config = {**ask_run_config(study, query, folder), **plumbing}
    app_dir = build_app_dir(folder / "app", run_config)
    record.flower_run_ids.append(_submit(flwr, config, app_dir, key))
    record.save(folder)
    return folder


def resume_run(
    config: ConsortiumConfig, name: str, *, flwr: str, pki: PkiLayout | None = None
) -> RunView:
    """Submit run `name` again (the study its bundle carries), to continue from its last
    checkpoint; signed with `pki`'s app-signing key, else with the one the run started
    with."""
    folder = run_folder(config, name)
    record = RunRecord.load(folder)
    if pki is None and record.pki:
        pki = PkiLayout(Path(record.pki))
    key = None if pki is None else app_signing_key(pki)
    study = study_of(folder)
    if study.sha256() != record.study_sha256:
        raise RunError(f"run {name} ran study {record.study} ({record.study_sha256[:12]});"
                       f" {study.name} ({study.sha256()[:12]}) is another study")  # fmt: skip
    current = read_results(folder / RESULTS_NAME)
    if current is not None and current.status == "completed":
        raise RunError(f"run {name} has completed; there is nothing to resume")
    shutil.rmtree(folder / "app", ignore_errors=True)
    app_dir = build_app_dir(folder / "app", _run_config(study, folder, resume=True, pki=pki))
    record.flower_run_ids.append(_submit(flwr, config, app_dir, key))
    record.stopped = False
    record.save(folder)
    return view(folder)


def stop_run(config: ConsortiumConfig, name: str, *, flwr: str) -> RunView:
    """Stop the Flower run that run `name` is running as (`flwr stop`)."""
    folder = run_folder(config, name)
    record = RunRecord.load(folder)
    if not record.flower_run_ids:
        raise RunError(f"run {name} was never submitted")
    _flwr(flwr, config, ["stop", record.flower_run_ids[-1], CONNECTION], f"stopping run {name}")
    record.stopped = True
    record.save(folder)
    return view(folder)


def flower_state(config: ConsortiumConfig, flower_run_id: str, *, flwr: str) -> str | None:
    """Flower's own state of a run (`flwr ls --run-id`), e.g. `running` or
    `finished:failed` with its details after a colon-space; None when Flower does not
    say (the SuperLink is unreachable, or the answer is not what flwr 1.42 prints)."""
    try:
        output = _flwr(
            flwr,
            config,
            ["ls", CONNECTION, "--run-id", flower_run_id, "--format", "json"],
            f"asking Flower for run {flower_run_id}",
        )
        (row,) = [r for r in json.loads(output)["runs"] if str(r["run-id"]) == flower_run_id]
        state, details = str(row["status"]), str(row.get("status-details") or "")
    except (RunError, ValueError, KeyError, TypeError):
        return None
    return state if details in ("", "N/A") else f"{state}: {details}"


def reconciled(document: dict[str, object], state: str | None) -> dict[str, object]:
    """A run's view (`RunView.to_json`) set right by Flower's own state: a run Flower
    reports finished while its ServerApp's last report still says it runs (the app died,
    or was stopped, before it could write its end) is failed or stopped, not running."""
    if state is None or not state.startswith("finished"):
        return document
    if document["status"] in ("completed", "failed", "stopped"):
        return {**document, "flower_state": state}
    if state.startswith("finished:stopped"):
        return {**document, "status": "stopped", "flower_state": state}
    done = f"{document['rounds_completed']} of {document['num_rounds'] or '?'} rounds"
    return {
        **document,
        "status": "failed",
        "flower_state": state,
        "error": (
            f"Flower reports the run {state}, but its last report says"
            f" {document['status']} after {done}: the ServerApp ended without writing its"
            " end (see `flwr log`)"
        ),
    }


def study_of(folder: Path) -> StudySettings:
    """The study a run folder's app bundle carries (what `resume` submits again)."""
    pyproject = folder / "app" / "pyproject.toml"
    document = read_toml(pyproject, RunError)
    try:
        values = dict(document["tool"]["flwr"]["app"]["config"])
    except (KeyError, TypeError) as exc:
        raise RunError(f"{pyproject}: no [tool.flwr.app.config] table ({exc})") from exc
    for key in ("results-path", "run-dir", "resume", "site-keys-dir", "site-nodes"):
        values.pop(key, None)
    return StudySettings.from_run_config(values)
