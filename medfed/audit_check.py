"""What `medfed audit verify` checks: an audit log entry by entry, and what shows a cut tail.

For a site's log (the key given as its site.toml) the ledger and the log are
cross-checked and both compared with the signed heads in the site's state folder
(`client.records`); for a coordinator's chain, with the signed head kept in the run's
checkpoint database, and a run whose results say it ended must end with
`run.finished` or `run.failed` (`coordinator.audit_chain.verify_chain`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from medfed.client.config import load_site_config
from medfed.client.records import check_site_records
from medfed.coordinator.audit_chain import verify_chain
from medfed.coordinator.checkpoints import CHECKPOINTS_NAME
from medfed.coordinator.results import read_results
from medfed.privacy.audit import verify_audit_log
from medfed.privacy.signing import SigningKey, VerifyKey
from medfed.run_report import RESULTS_NAME


@dataclass(frozen=True)
class AuditCheck:
    """`first_bad`: (line, reason) of the first bad entry; `problems`: signs of deletion."""

    path: Path
    entries_checked: int
    last_hash: str
    first_bad: tuple[int, str] | None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.first_bad is None and not self.problems


def check_audit(path: Path, key: Path) -> AuditCheck:
    """Check the log at `path` with `key` (a public key file, or a site.toml)."""
    if key.suffix == ".toml":
        config = load_site_config(key)
        public = SigningKey.load(config.signing_key_path).public
        verification = verify_audit_log(path, public)
        problems: list[str] = []
        if path.resolve() == config.audit_path.resolve():
            problems = check_site_records(config, public)
        return AuditCheck(
            path,
            verification.entries_checked,
            verification.last_hash,
            verification.first_bad,
            problems,
        )
    public = VerifyKey.load(key)
    if not (path.parent / CHECKPOINTS_NAME).exists():
        verification = verify_audit_log(path, public)
        return AuditCheck(
            path, verification.entries_checked, verification.last_hash, verification.first_bad
        )
    results = read_results(path.parent / RESULTS_NAME)
    finished = results is not None and results.status in ("completed", "failed")
    chain = verify_chain(path, public, finished=finished)
    verification = verify_audit_log(path, public)
    return AuditCheck(
        path,
        chain.entries_checked,
        chain.last_hash,
        verification.first_bad,
        [] if chain.problem is None or verification.first_bad else [chain.problem],
    )
