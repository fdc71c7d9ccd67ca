"""The privacy officer's view of a site: budgets spent, approvals, and signed-record checks.

`budget_summary` is what `medfed budget show` prints; `render_report` writes the HTML
report of `medfed budget report`, with an inline SVG plot and no outside resources.
"""

from __future__ import annotations

import datetime as dt
import html
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from medfed.client.config import SiteConfig
from medfed.client.records import check_site_records
from medfed.privacy.accountant import AccountantKind, epsilon_of
from medfed.privacy.audit import AuditLog, verify_audit_log
from medfed.privacy.errors import AuditLogError
from medfed.privacy.ledger import PrivacyLedger, RecordedSpend
from medfed.privacy.policy import PastSpend, counted
from medfed.privacy.population import RELATION_TEXT, is_legacy_dataset
from medfed.privacy.signing import SigningKey, VerifyKey
from medfed.svg import line_chart


def split_study(label: str) -> tuple[str, str]:
    """The (name, digest) of a study as the ledger labels it (`name@sha256`)."""
    name, _, digest = label.rpartition("@")
    return (name, digest) if name else (label, "")


@dataclass
class StudySpend:
    """One study's spend on one dataset."""

    study: str
    study_sha256: str
    epsilon: float
    approved_epsilon: float | None
    runs: dict[str, int] = field(default_factory=dict)


@dataclass
class DatasetBudget:
    """One privacy unit's budget (its patients', across every data version and
    contract): spent in the policy's window and over its lifetime, caps, and per study.

    `dataset` is the unit's name, or a data fingerprint for spends of an older medfed
    (which count against every unit of the site)."""

    dataset: str
    epsilon_spent: float
    epsilon_cap: float
    window: str
    studies: list[StudySpend]
    lifetime_spent: float = 0.0
    lifetime_cap: float = math.inf
    patients_covered: int = 0
    relation: str = RELATION_TEXT
    legacy: bool = False
    no_guarantee: list[str] = field(default_factory=list)

    @property
    def remaining(self) -> float:
        return max(
            0.0,
            min(self.epsilon_cap - self.epsilon_spent, self.lifetime_cap - self.lifetime_spent),
        )

    @property
    def exceeded(self) -> bool:
        return self.epsilon_spent > self.epsilon_cap or self.lifetime_spent > self.lifetime_cap

    @property
    def carries_over(self) -> str:
        """What the budget belongs to, in one sentence for the officer."""
        if self.legacy:
            return (
                "spends an older medfed keyed on a data fingerprint: counted against every"
                " privacy unit of this site"
            )
        return (
            f"the patients of privacy unit {self.dataset} ({self.patients_covered} ever"
            " covered): one budget across data versions, corrections and study contracts"
        )


@dataclass
class BudgetSummary:
    """What `medfed budget show` reports."""

    site_id: str
    delta: float
    datasets: list[DatasetBudget]
    ledger_rows: int
    ledger_problems: list[str]
    approvals: list[dict[str, object]]
    invalid_approvals: list[str]
    audit_entries: int = 0
    audit_problem: str | None = None
    refusals: list[dict[str, object]] = field(default_factory=list)
    records_problems: list[str] = field(default_factory=list)
    """Signs of deleted records: signed heads not extended, or a spend in only one of
    ledger and audit log (`client.records.check_site_records`)."""

    @property
    def verified(self) -> bool:
        """True when every ledger row and audit entry verifies and nothing was cut."""
        return not self.ledger_problems and self.audit_problem is None and not self.records_problems

    def to_json(self) -> dict[str, object]:
        return {
            "records_verified": not self.records_problems,
            "records_problems": self.records_problems,
            "audit_entries": self.audit_entries,
            "audit_verified": self.audit_problem is None,
            "audit_problem": self.audit_problem,
            "refusals": self.refusals,
            "site_id": self.site_id,
            "delta": self.delta,
            "ledger_rows": self.ledger_rows,
            "ledger_verified": not self.ledger_problems,
            "ledger_problems": self.ledger_problems,
            "approvals": self.approvals,
            "invalid_approvals": self.invalid_approvals,
            "datasets": [
                {
                    "dataset": budget.dataset,
                    "epsilon_spent": budget.epsilon_spent,
                    "epsilon_cap": budget.epsilon_cap,
                    "epsilon_remaining": budget.remaining,
                    "window": budget.window,
                    "exceeded": budget.exceeded,
                    "privacy_unit": None if budget.legacy else budget.dataset,
                    "legacy_fingerprint": budget.legacy,
                    "carries_over": budget.carries_over,
                    "patients_covered": budget.patients_covered,
                    "neighbouring_relation": budget.relation,
                    "epsilon_lifetime": budget.lifetime_spent,
                    "epsilon_lifetime_cap": budget.lifetime_cap,
                    "guarantee": "none" if budget.no_guarantee else "(epsilon, delta)-DP",
                    "no_guarantee": budget.no_guarantee,
                    "studies": [
                        {
                            "study": spend.study,
                            "study_sha256": spend.study_sha256,
                            "epsilon": spend.epsilon,
                            "approved_epsilon": spend.approved_epsilon,
                            "rounds_by_run": spend.runs,
                        }
                        for spend in budget.studies
                    ],
                }
                for budget in self.datasets
            ],
        }


def _officer(config: SiteConfig) -> VerifyKey:
    return VerifyKey.load(config.officer_public_key_path)


def budget_summary(config: SiteConfig, *, now: dt.datetime | None = None) -> BudgetSummary:
    """Every dataset's spend against the cap, per study and run, and the records' checks."""
    now = now or dt.datetime.now(dt.UTC)
    policy = config.privacy
    ledger = PrivacyLedger(config.ledger_path)
    records = ledger.records()
    verification = ledger.verify(SigningKey.load(config.signing_key_path).public)
    officer = _officer(config)
    valid = ledger.approvals_verified(officer)
    approved = {approval.study_sha256: approval.epsilon for approval in valid}
    covered = ledger.population.units()
    names = sorted({*covered, *(r.dataset for r in records)})
    datasets = [
        _unit_budget(ledger, name, covered.get(name, 0), config, approved, now) for name in names
    ]
    audit_entries, audit_problem, refusals = _audit(config)
    records_problems = check_site_records(config, SigningKey.load(config.signing_key_path).public)
    return BudgetSummary(
        records_problems=records_problems,
        audit_entries=audit_entries,
        audit_problem=audit_problem,
        refusals=refusals,
        site_id=config.site.id,
        delta=policy.max_delta,
        datasets=datasets,
        ledger_rows=verification.rows_checked,
        ledger_problems=[f"row {seq}: {reason}" for seq, reason in verification.bad],
        approvals=[
            {
                "study": a.study,
                "study_sha256": a.study_sha256,
                "epsilon": a.epsilon,
                "delta": a.delta,
                "approved_at": a.approved_at,
            }
            for a in valid
        ],
        invalid_approvals=[
            f"approval {seq}: {reason}" for seq, reason in ledger.invalid_approvals(officer)
        ],
    )


def _unit_budget(
    ledger: PrivacyLedger,
    name: str,
    patients: int,
    config: SiteConfig,
    approved: dict[str, float],
    now: dt.datetime,
) -> DatasetBudget:
    """One unit's budget: every spend on its patients (see `PrivacyLedger.unit_records`)."""
    policy = config.privacy
    legacy = is_legacy_dataset(name)
    rows = ledger.records(name) if legacy else ledger.unit_records(name)
    past = [PastSpend(r.study, r.event, r.recorded_at) for r in rows]

    def epsilon(events: list[RecordedSpend] | list[PastSpend]) -> float:
        return epsilon_of(
            [r.event for r in events], delta=policy.max_delta, accountant=policy.accountant
        )

    studies: list[StudySpend] = []
    for label in sorted({r.study for r in rows}):
        study, digest = split_study(label)
        mine = [r for r in rows if r.study == label]
        runs: dict[str, int] = defaultdict(int)
        for r in mine:
            runs[r.run_id] += 1
        studies.append(StudySpend(study, digest, epsilon(mine), approved.get(digest), dict(runs)))
    notes = [] if legacy else ledger.population.notes(name)
    return DatasetBudget(
        dataset=name,
        epsilon_spent=epsilon(counted(past, policy.cap_window, now)),
        epsilon_cap=policy.epsilon_cap,
        window=policy.cap_window,
        studies=studies,
        lifetime_spent=epsilon(past),
        lifetime_cap=policy.lifetime_cap,
        patients_covered=patients,
        relation=RELATION_TEXT,
        legacy=legacy,
        no_guarantee=[f"run {run} round {round_}: {note}" for _, run, round_, note in notes],
    )


def _audit(config: SiteConfig) -> tuple[int, str | None, list[dict[str, object]]]:
    """The site's audit log: entries checked, the first problem, and the refused rounds."""
    path = config.audit_path
    if not path.exists():
        return 0, None, []
    public = SigningKey.load(config.signing_key_path).public
    verification = verify_audit_log(path, public)
    problem = None
    if verification.first_bad is not None:
        line, reason = verification.first_bad
        problem = f"{path}: line {line}: {reason}"
    refusals: list[dict[str, object]] = []
    try:
        entries = AuditLog(path, None).entries()
    except AuditLogError:
        entries = []
    for entry in entries:
        if entry.event == "round refused":
            refusals.append({"time": entry.time, **dict(entry.details)})
    return verification.entries_checked, problem, refusals


# --- the HTML report -----------------------------------------------------------------------

TOTAL = "dataset total (all studies)"


def _epsilon_series(
    rows: list[RecordedSpend], delta: float, accountant: AccountantKind
) -> list[tuple[dt.datetime, float]]:
    """Cumulative epsilon after each recorded spend."""
    return [
        (
            rows[index].recorded_at,
            epsilon_of(
                [row.event for row in rows[: index + 1]], delta=delta, accountant=accountant
            ),
        )
        for index in range(len(rows))
    ]


def _svg_plot(series: dict[str, list[tuple[dt.datetime, float]]], cap: float) -> str:
    """A line plot of cumulative epsilon over time, one line per series, with the cap."""
    times = [t for points in series.values() for t, _ in points]
    if not times:
        return "<p>No spend recorded yet.</p>"
    t0 = min(times)

    def seconds(t: dt.datetime) -> float:
        return (t - t0).total_seconds()

    def when(x: float) -> str:
        return (t0 + dt.timedelta(seconds=x)).isoformat(timespec="seconds")

    points = {name: [(seconds(t), e) for t, e in values] for name, values in sorted(series.items())}
    return line_chart(
        "cumulative epsilon over time",
        points,
        x_label="time (UTC)",
        y_label="epsilon",
        width=720,
        height=320 + 14 * len(points),
        x_format=when,
        y_from_zero=True,
        reference=(f"cap {cap:g}", cap),
        wide={TOTAL},
    )


def _approved(epsilon: float | None) -> str:
    return "" if epsilon is None else f"{epsilon:g}"


def render_report(
    config: SiteConfig, *, now: dt.datetime | None = None
) -> tuple[str, BudgetSummary]:
    """The officer's HTML report and the summary it shows."""
    summary = budget_summary(config, now=now)
    policy = config.privacy
    ledger = PrivacyLedger(config.ledger_path)
    records = ledger.records()
    e = html.escape
    sections: list[str] = []
    verified = (
        f'<p class="ok">All {summary.ledger_rows} ledger rows carry valid signatures of this'
        " site's key.</p>"
        if not summary.ledger_problems
        else '<p class="bad">Ledger verification FAILED:</p><ul>'
        + "".join(f"<li>{e(problem)}</li>" for problem in summary.ledger_problems)
        + "</ul>"
    )
    audit = (
        f'<p class="ok">All {summary.audit_entries} audit-log entries verify (signatures and'
        " hash chain).</p>"
        if summary.audit_problem is None
        else f'<p class="bad">Audit log verification FAILED: {e(summary.audit_problem)}</p>'
    )
    sections.append(f"<h2>Signed records</h2>{verified}{audit}")
    if summary.refusals:
        refused = "".join(
            f"<tr><td>{e(str(r.get('time', '')))}</td><td>{e(str(r.get('study', '')))}</td>"
            f"<td>{e(str(r.get('run_id', '')))}</td><td>{e(str(r.get('round', '')))}</td>"
            f"<td>{e(str(r.get('reason', '')))}</td></tr>"
            for r in summary.refusals
        )
        sections.append(
            "<h2>Rounds refused before training</h2><table><tr><th>time</th><th>study</th>"
            f"<th>run</th><th>round</th><th>reason</th></tr>{refused}</table>"
        )
    for budget in summary.datasets:
        rows = (
            [r for r in records if r.dataset == budget.dataset]
            if budget.legacy
            else ledger.unit_records(budget.dataset)
        )
        series = {
            f"{split_study(label)[0]} ({split_study(label)[1][:8]})": _epsilon_series(
                [r for r in rows if r.study == label], policy.max_delta, policy.accountant
            )
            for label in sorted({r.study for r in rows})
        }
        series[TOTAL] = _epsilon_series(rows, policy.max_delta, policy.accountant)
        study_rows = "".join(
            f"<tr><td>{e(s.study)}</td><td><code>{e(s.study_sha256[:16])}</code></td>"
            f"<td>{s.epsilon:.3f}</td><td>{_approved(s.approved_epsilon)}</td>"
            f"<td>{e(', '.join(f'{run}: {n} rounds' for run, n in s.runs.items()))}</td></tr>"
            for s in budget.studies
        )
        state = '<span class="bad">EXCEEDED</span>' if budget.exceeded else "within cap"
        no_guarantee = "".join(
            f'<p class="bad">NO GUARANTEE: {e(note)}</p>' for note in budget.no_guarantee
        )
        sections.append(
            f"<h2>Privacy unit <code>{e(budget.dataset[:16])}</code></h2>"
            f"<p>{e(budget.carries_over)}; epsilon for neighbouring datasets that"
            f" {e(budget.relation)}.</p>{no_guarantee}"
            f"<p>epsilon spent {budget.epsilon_spent:.3f} of cap {budget.epsilon_cap:g}"
            f" ({e(budget.window)}); lifetime {budget.lifetime_spent:.3f} of"
            f" {budget.lifetime_cap:g} (never resets); remaining {budget.remaining:.3f} at"
            f" delta {summary.delta:g}: {state}</p>"
            f"{_svg_plot(series, budget.epsilon_cap)}"
            "<table><tr><th>study</th><th>digest</th><th>epsilon</th><th>approved</th>"
            f"<th>runs</th></tr>{study_rows}</table>"
        )
    approvals = "".join(
        f"<tr><td>{e(str(a['study']))}</td><td><code>{e(str(a['study_sha256'])[:16])}</code></td>"
        f"<td>{a['epsilon']}</td><td>{a['delta']}</td><td>{e(str(a['approved_at']))}</td></tr>"
        for a in summary.approvals
    )
    invalid = "".join(f"<li>{e(reason)}</li>" for reason in summary.invalid_approvals)
    sections.append(
        "<h2>Approvals (signatures verified with the officer's key)</h2>"
        "<table><tr><th>study</th><th>digest</th><th>epsilon</th><th>delta</th><th>approved at</th>"
        f"</tr>{approvals}</table>"
        + (
            f'<p class="bad">Approvals whose signature does not verify:</p><ul>{invalid}</ul>'
            if invalid
            else ""
        )
    )
    generated = (now or dt.datetime.now(dt.UTC)).isoformat(timespec="seconds")
    required = "required" if policy.require_approval else "not required"
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>Privacy budget report: {e(config.site.id)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 60em; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #bbb; padding: 0.3em 0.6em; text-align: left; }}
.ok {{ color: #060; }} .bad {{ color: #b00; font-weight: bold; }}
</style></head><body>
<h1>Privacy budget report: {e(config.site.name or config.site.id)}</h1>
<p>Site <code>{e(config.site.id)}</code>. Generated {e(generated)}. Policy: cap
{policy.epsilon_cap:g} per dataset ({e(policy.cap_window)}), max delta {policy.max_delta:g},
minimum noise {policy.min_noise_multiplier:g}, maximum clipping norm {policy.max_grad_norm:g},
minimum cohort {policy.min_cohort_k}, approvals {required},
accountant {e(policy.accountant)}.</p>
{"".join(sections)}
</body></html>
"""
    return page, summary


def write_report(config: SiteConfig, out: Path) -> BudgetSummary:
    """Write the HTML report to `out` (atomically) and return its summary."""
    from medfed.common import write_atomic

    page, summary = render_report(config)
    write_atomic(out, page.encode("utf-8"))
    return summary


def approve_study(
    site_toml: Path, study_toml: Path, *, epsilon: float, officer_key: Path
) -> dict[str, object]:
    """`medfed budget approve`: check the officer's key and the request against the site's
    policy, then record the signed approval. Returns what was approved."""
    from medfed.asks import load_query_file
    from medfed.client.config import load_site_config
    from medfed.common import read_toml
    from medfed.consortium import approve
    from medfed.coordinator.study import load_study_file
    from medfed.errors import MedfedError

    config = load_site_config(site_toml)
    is_query = "query" in read_toml(study_toml, MedfedError)
    study = load_query_file(study_toml) if is_query else load_study_file(study_toml)
    key = SigningKey.load(officer_key)
    expected = _officer(config)
    if key.public.key_id != expected.key_id:
        raise MedfedError(
            f"{officer_key}: this is not the officer key that {site_toml} names"
            f" ({config.officer_public_key_path}, key {expected.key_id})"
        )
    if not (math.isfinite(epsilon) and 0 < epsilon <= config.privacy.epsilon_cap):
        raise MedfedError(
            f"--epsilon {epsilon:g} must be positive and at most the site's cap"
            f" {config.privacy.epsilon_cap:g}"
        )
    if study.delta > config.privacy.max_delta:
        raise MedfedError(
            f"{study_toml}: delta {study.delta:g} exceeds the site's maximum"
            f" {config.privacy.max_delta:g}"
        )
    approval = approve(site_toml, study, epsilon=epsilon, officer_key=key)
    return {
        "site_id": approval.site_id,
        "study": approval.study,
        "study_sha256": approval.study_sha256,
        "epsilon": approval.epsilon,
        "delta": approval.delta,
        "approved_at": approval.approved_at,
        "officer_key_id": approval.officer_key_id,
    }
