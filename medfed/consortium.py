"""The demo's consortium on disk: per hospital its data, keys, `site.toml` and the privacy
officer's signed approval of the demo study.

In a real consortium each hospital's operator and officer do these steps themselves
(`medfed budget approve` is the officer's); the demo plays every part in one folder.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from medfed.client.config import (
    SITE_TOML,
    SiteConfig,
    SiteSection,
    identity_lines,
    render_site_toml,
)
from medfed.coordinator.study import StudySettings
from medfed.model.contract import DEMO_CONTRACT
from medfed.privacy.approvals import Approval, sign_approval
from medfed.privacy.ledger import PrivacyLedger
from medfed.privacy.policy import PrivacyPolicy
from medfed.privacy.signing import SigningKey, VerifyKey
from medfed.sites.synthetic import site_ids, write_synthetic_consortium

DEMO_POLICY = PrivacyPolicy(
    epsilon_cap=10.0,
    cap_window="lifetime",
    max_delta=1e-5,
    min_noise_multiplier=0.5,
    max_grad_norm=10.0,
    min_cohort_k=20,
    require_approval=True,
)
"""Each demo hospital's policy: a lifetime cap of 10 per dataset, approvals required."""


@dataclass(frozen=True)
class DemoSite:
    """Where one demo hospital's files are."""

    site_id: str
    site_toml: Path
    officer_key: Path


def demo_min_sites(sites: int) -> int:
    """The fewest sites a demo round goes on with: a majority (secure aggregation's own
    threshold), all of them when there are two or fewer. A demo of many simulated sites
    then does not stall, or fail, because one site's status is not known in time."""
    return sites if sites <= 2 else sites // 2 + 1


def demo_study(
    *, rounds: int, sites: int, target_epsilon: float, seed: int, local_steps: int = 30
) -> StudySettings:
    """The demo's study: 30-day readmission on eight clinical features, DP-SGD at every
    site; every site is asked each round, and a round needs a majority of them."""
    return StudySettings.model_validate(
        {
            "study-name": "readmission-demo",
            "num-server-rounds": rounds,
            "local-steps": local_steps,
            "learning-rate": 0.08,
            "target-epsilon": target_epsilon,
            "max-grad-norm": 5.0,
            "delta": 1e-5,
            "sample-rate": 0.05,
            "min-sites": demo_min_sites(sites),
            "round-timeout-s": 600.0,
            "seed": seed,
        }
    )


class Approvable(Protocol):
    """What an officer approves: a study or a query, by name, digest and delta."""

    @property
    def name(self) -> str: ...

    @property
    def delta(self) -> float: ...

    def sha256(self) -> str: ...


def approve(
    site_toml: Path, study: Approvable, *, epsilon: float, officer_key: SigningKey
) -> Approval:
    """Record the officer's signed approval of `study` (or a query) at the site, up to
    `epsilon`."""
    from medfed.client.config import load_site_config

    config = load_site_config(site_toml)
    approval = Approval(
        site_id=config.site.id,
        study=study.name,
        study_sha256=study.sha256(),
        epsilon=epsilon,
        delta=study.delta,
        approved_at=dt.datetime.now(dt.UTC).isoformat(),
        officer_key_id=officer_key.public.key_id,
    )
    PrivacyLedger(config.ledger_path).add_approval(sign_approval(approval, officer_key))
    return approval


IDENTITY_CA_DIR = "consortium-ca"


class DemoIdentities:
    """A consortium CA made for demo and example sites, issuing their identity
    certificates (what `medfed provision` does for a real consortium)."""

    def __init__(self, folder: Path) -> None:
        from cryptography.hazmat.primitives import serialization

        from medfed.common import write_atomic
        from medfed.privacy.pki import create_ca

        # The CA's key stays in memory: nothing needs it once the certificates are issued.
        self._ca_key, self._ca_cert = create_ca("medfed demo consortium CA", valid_days=30)
        self.ca_pem = self._ca_cert.public_bytes(serialization.Encoding.PEM)
        write_atomic(folder / "ca.pem", self.ca_pem)

    def issue(
        self, keys: Path, site_id: str, public: VerifyKey, coordinator: VerifyKey | None
    ) -> dict[str, Path]:
        """Write the site's certificate, the CA and the coordinator's key into `keys`;
        the `[site]` entries of `site.toml` that name them (relative to the site folder)."""
        from medfed.common import write_atomic
        from medfed.privacy.identity import IDENTITY_CERT_NAME, issue_identity_certificate

        pem = issue_identity_certificate(
            self._ca_key, self._ca_cert, site_id, public, valid_days=30
        )
        write_atomic(keys / IDENTITY_CERT_NAME, pem)
        write_atomic(keys / "consortium-ca.pem", self.ca_pem)
        entries = {
            "identity_certificate": Path("keys") / IDENTITY_CERT_NAME,
            "consortium_ca": Path("keys") / "consortium-ca.pem",
        }
        if coordinator is not None:
            coordinator.save(keys / "coordinator.pub")
            entries["coordinator_public_key"] = Path("keys") / "coordinator.pub"
        return entries


def write_demo_consortium(
    root: Path,
    study: StudySettings,
    *,
    n_sites: int,
    seed: int,
    site_keys_dir: Path | None = None,
    coordinator_key: VerifyKey | None = None,
) -> tuple[DemoSite, ...]:
    """Write every demo hospital under `root/<site id>/` and approve `study` at each.

    With `site_keys_dir`, each site's public signing key is also written there as
    `<site id>.pub`, where the coordinator reads it to check signed updates. Each site
    gets an identity certificate from a demo consortium CA (secure aggregation), and
    with `coordinator_key` pins the coordinator's announcement key.
    """
    write_synthetic_consortium(root, DEMO_CONTRACT, n_sites=n_sites, seed=seed)
    sites: list[DemoSite] = []
    identities = DemoIdentities(root / IDENTITY_CA_DIR)
    for site_id in site_ids(n_sites):
        folder = root / site_id
        signing = SigningKey.generate()
        signing.save(folder / "keys" / "site-signing.key")
        signing.public.save(folder / "keys" / "site-signing.pub")
        identity = identities.issue(folder / "keys", site_id, signing.public, coordinator_key)
        if site_keys_dir is not None:
            signing.public.save(site_keys_dir / f"{site_id}.pub")
        officer = SigningKey.generate()
        officer_key = folder / "officer" / "officer.key"
        officer.save(officer_key)
        officer.public.save(folder / "keys" / "officer.pub")
        config = SiteConfig(
            site=SiteSection(
                id=site_id, name=f"Demo hospital {site_id[-1]}", data_dir=Path("."), **identity
            ),
            privacy=DEMO_POLICY,
        )
        site_toml = folder / SITE_TOML
        site_toml.write_text(render_site_toml(config), encoding="utf-8")
        approve(site_toml, study, epsilon=study.target_epsilon, officer_key=officer)
        sites.append(DemoSite(site_id, site_toml, officer_key))
    return tuple(sites)


EXAMPLES_ROOT = Path(__file__).resolve().parent.parent / "examples" / "consortium"
"""The example consortium from real data (`examples/consortium/README.md`)."""


def example_names(root: Path = EXAMPLES_ROOT) -> tuple[str, ...]:
    """The example studies: one `studies/<name>.toml` each, with sites `<name>-*/`."""
    return tuple(sorted(path.stem for path in (root / "studies").glob("*.toml")))


def write_example_consortium(
    root: Path,
    example: str,
    *,
    site_keys_dir: Path | None = None,
    rounds: int | None = None,
    examples: Path = EXAMPLES_ROOT,
    coordinator_key: VerifyKey | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> tuple[StudySettings, tuple[DemoSite, ...]]:
    """Copy the example study's sites (each reading its own format) under `root/<site id>/`
    with fresh signing and officer keys, approve the study at each, and return the study.

    The examples ship no keys: every copy gets its own, as `write_demo_consortium` does.
    `overrides` replaces study keys (run-config names, e.g. `target-epsilon`) before the
    approvals, which bind the study's digest (`medfed bench utility` varies them).
    """
    import shutil

    from medfed.client.config import load_site_config
    from medfed.coordinator.study import load_study_file

    if example not in example_names(examples):
        raise ValueError(f"no example study {example!r}; there are {list(example_names(examples))}")
    study = load_study_file(examples / "studies" / f"{example}.toml")
    changes = dict(overrides or {})
    if rounds is not None:
        changes["num-server-rounds"] = rounds
    if changes:  # before the approvals, which bind the study's digest
        study = StudySettings.from_run_config({**study.to_run_config(), **changes})
    sites: list[DemoSite] = []
    identities = DemoIdentities(root / IDENTITY_CA_DIR)
    for source in sorted(examples.glob(f"{example}-*")):
        if not (source / SITE_TOML).is_file():
            continue
        site_id = load_site_config(source / SITE_TOML).site.id
        folder = root / site_id
        # Example keys written by `build_consortium.py --keys` stay behind: each copy gets its own.
        shutil.copytree(source, folder, ignore=shutil.ignore_patterns("keys"))
        config = load_site_config(folder / SITE_TOML)
        config.signing_key_path.parent.mkdir(parents=True, exist_ok=True)
        signing = SigningKey.generate()
        signing.save(config.signing_key_path)
        signing.public.save(config.signing_key_path.with_suffix(".pub"))
        if site_keys_dir is not None:
            signing.public.save(site_keys_dir / f"{site_id}.pub")
        identity = identities.issue(folder / "keys", site_id, signing.public, coordinator_key)
        text = (folder / SITE_TOML).read_text(encoding="utf-8")
        lines = identity_lines(config.site.model_copy(update=identity))
        (folder / SITE_TOML).write_text(
            text.replace("[site]\n", "[site]\n" + "".join(f"{line}\n" for line in lines), 1),
            encoding="utf-8",
        )
        officer = SigningKey.generate()
        officer_key = folder / "officer" / "officer.key"
        officer.save(officer_key)
        officer.public.save(config.officer_public_key_path)
        approve(folder / SITE_TOML, study, epsilon=study.target_epsilon, officer_key=officer)
        sites.append(DemoSite(site_id, folder / SITE_TOML, officer_key))
    return study, tuple(sites)
