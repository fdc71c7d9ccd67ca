"""The coordinator's chain: signed by the key `medfed provision` issued, which stays out of
the run folder, and with a signed head in the checkpoint database that shows a cut tail."""

from __future__ import annotations

from pathlib import Path

import pytest

from medfed.coordinator.audit_chain import (
    AUDIT_NAME,
    KEY_NAME,
    PUBLIC_KEY_NAME,
    CoordinatorAudit,
    verify_chain,
)
from medfed.coordinator.checkpoints import CHECKPOINTS_NAME, CheckpointStore
from medfed.coordinator.errors import AuditChainError
from medfed.privacy.signing import SigningKey, VerifyKey


def _chain(run_dir: Path, signer: SigningKey) -> Path:
    audit = CoordinatorAudit.open(
        run_dir, signer=signer, store=CheckpointStore(run_dir / CHECKPOINTS_NAME)
    )
    audit.record("run.started", {"run_id": "r1"})
    audit.record("round.aggregated", {"round": 1})
    audit.record("run.finished", {"rounds": 1})
    return run_dir / AUDIT_NAME


def test_the_provisioned_key_signs_and_stays_out_of_the_run_folder(tmp_path: Path) -> None:
    pki_key = SigningKey.generate()
    chain = _chain(tmp_path / "run", pki_key)

    assert not (tmp_path / "run" / KEY_NAME).exists()
    assert VerifyKey.load(tmp_path / "run" / PUBLIC_KEY_NAME) == pki_key.public
    check = verify_chain(chain, pki_key.public, finished=True)
    assert check.ok and check.entries_checked == check.head_count == 3


def test_another_key_cannot_continue_a_run_s_chain(tmp_path: Path) -> None:
    _chain(tmp_path / "run", SigningKey.generate())
    with pytest.raises(AuditChainError, match="signed by key"):
        CoordinatorAudit.open(tmp_path / "run", signer=SigningKey.generate())


@pytest.mark.parametrize("cut", [1, 2])
def test_a_cut_tail_shows_against_the_head_even_after_new_entries(tmp_path: Path, cut: int) -> None:
    key = SigningKey.generate()
    chain = _chain(tmp_path / "run", key)
    lines = chain.read_bytes().split(b"\n")[:-1]
    chain.write_bytes(b"\n".join(lines[:-cut]) + b"\n")
    assert "its tail was cut" in str(verify_chain(chain, key.public).problem)

    # whoever cut it appends new entries: the head is not moved back over the cut
    store = CheckpointStore(tmp_path / "run" / CHECKPOINTS_NAME)
    CoordinatorAudit.open(tmp_path / "run", signer=key, store=store).record(
        "run.finished", {"rounds": 1}
    )
    problem = verify_chain(chain, key.public, finished=True).problem
    assert problem is not None and "signed head" in problem
