"""The site's half of secure aggregation: keys, shares, the masked update, the reveal.

`SiteSecAgg` lives in the site worker beside the trainers and keeps one
`privacy.secagg_protocol.SiteRound` per (run, round), in memory only: a worker that
restarts has nothing left to reveal for rounds it began, so a round may abort but no
update is ever unmasked. The update itself never leaves unmasked: the train step keeps
it here and answers sealed shares; the mask step sends it masked, with a signed receipt
over the masked bytes (the coordinator checks that, as it checks plain updates).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cryptography import x509

from medfed.client.config import SiteConfig
from medfed.client.errors import RequestError, SiteRefusal
from medfed.client.protocol import SecAggReply, SecAggRequest, TrainReply, TrainRequest
from medfed.privacy.errors import PrivacyError, SecAggError
from medfed.privacy.identity import identity_check
from medfed.privacy.receipts import UpdateReceipt
from medfed.privacy.secagg_protocol import (
    Advertisement,
    IdentityCheck,
    SealedShare,
    SignedAnnouncement,
    SiteRound,
    dumps,
    loads,
    masked_sha256,
    reveal_to_json,
    weighted_delta,
)
from medfed.privacy.signing import JsonValue, SigningKey, VerifyKey

log = logging.getLogger(__name__)

KEEP_ROUNDS = 4
"""Rounds whose secure-aggregation state is kept (the current one and a few late ones)."""


class SiteSecAgg:
    """This site's secure-aggregation rounds."""

    def __init__(self, config: SiteConfig) -> None:
        self._config = config
        self._site_id = config.site.id
        self._rounds: OrderedDict[tuple[str, int], SiteRound] = OrderedDict()
        self._lock = threading.Lock()
        self._signer: SigningKey | None = None
        self._identity: IdentityCheck | None = None
        self._certificate: str | None = None
        self._coordinator: VerifyKey | None = None
        self._warned = False

    def _credentials(self) -> tuple[SigningKey, str, IdentityCheck]:
        """The site's signing key, its identity certificate and the CA check (read once)."""
        if self._signer is None or self._identity is None or self._certificate is None:
            identity = load_identity(self._config)
            self._signer, self._certificate, self._identity = (
                identity.signer,
                identity.pem,
                identity.check,
            )
            key = self._config.optional_path(self._config.site.coordinator_public_key)
            self._coordinator = None if key is None else VerifyKey.load(key)
        return self._signer, self._certificate, self._identity

    def _check_announcement(self, signed: SignedAnnouncement) -> None:
        if self._coordinator is not None:
            signed.verify(self._coordinator)
        elif not self._warned:
            self._warned = True
            log.warning(
                "%s: no [site] coordinator_public_key: round announcements are not"
                " signature-checked (other sites still cross-check them)",
                self._config.source,
            )

    def keys(self, request: SecAggRequest) -> SecAggReply:
        """Step 1: check the signed announcement, make fresh keys, answer the advertisement."""
        advert = self._announced(request.payload, request.run_id, request.round)
        return SecAggReply(self._site_id, dumps(advert))

    def _announced(self, text: str, run_id: str, round_number: int) -> dict[str, JsonValue]:
        """Check a signed announcement of (run, round), make its fresh keys; the signed
        advertisement (JSON)."""
        signer, certificate, _ = self._credentials()
        signed = SignedAnnouncement.from_text(text)
        announced = signed.announcement
        if (announced.run_id, announced.round) != (run_id, round_number):
            raise SecAggError("the announcement names another run or round than the message")
        self._check_announcement(signed)
        with self._lock:
            key = (run_id, round_number)
            if key in self._rounds and self._rounds[key].digest != announced.sha256():
                log.info(
                    "run %s round %d: announced again (its sites changed, or the coordinator"
                    " restarted the round); the earlier announcement's keys are discarded",
                    *key,
                )
            state = SiteRound(signed, self._site_id, signer, certificate)
            self._rounds[key] = state
            self._rounds.move_to_end(key)
            while len(self._rounds) > KEEP_ROUNDS:
                self._rounds.popitem(last=False)
        return state.advertisement.to_json()

    def _round(self, run_id: str, round_number: int) -> SiteRound:
        state = self._rounds.get((run_id, round_number))
        if state is None:
            raise SiteRefusal(
                f"run {run_id} round {round_number}: no secure-aggregation keys here"
                " (not announced to this site, the worker restarted since, or the ClientApp"
                " runs per message without the site worker: start the site with"
                " `medfed site start`)"
            )
        return state

    def share(self, request: TrainRequest, trained: TrainReply) -> TrainReply:
        """Step 2, after training: check every site's keys and the model against the
        announcement, keep the update, answer sealed shares and no arrays."""
        signer, _, identity = self._credentials()
        raw = loads(request.secagg, "secagg")
        if not isinstance(raw, dict) or set(raw) != {"announcement", "adverts"}:
            raise RequestError("secagg: expected announcement and adverts")
        signed = SignedAnnouncement.from_text(str(raw["announcement"]))
        adverts = raw["adverts"]
        if not isinstance(adverts, list):
            raise RequestError("secagg.adverts: expected a list")
        with self._lock:
            state = self._round(request.run_id, request.round)
            if signed.announcement != state.announcement:
                raise SecAggError("the train message names another announcement than the keys")
            announced = state.announcement
            if announced.study_sha256 != request.study_sha256:
                raise SecAggError(
                    "the model or study this site received is not the one announced to all"
                    " sites: refusing an inconsistent round"
                )
            statement = state.state_model(request.model_sha256, signer)
            state.check_peers([Advertisement.from_json(a) for a in adverts], identity)
            update = weighted_delta(
                trained.arrays,
                request.arrays,
                patients=trained.num_examples,
                weight_cap=announced.weight_cap,
            )
            clipped = int(np.count_nonzero(np.abs(update) > announced.clip))
            if clipped:
                log.warning(
                    "run %s round %d: %d update values beyond the secure-aggregation range"
                    " %g are clipped",
                    request.run_id,
                    request.round,
                    clipped,
                    announced.clip,
                )
            sealed = state.deal(update)
        shares = dumps([item.to_json() for item in sealed])
        return TrainReply(
            site_id=trained.site_id,
            arrays={},
            local_loss=trained.local_loss,
            epsilon=trained.epsilon,
            noise_multiplier=trained.noise_multiplier,
            incoming=trained.incoming,
            receipt_signature=statement,  # not an update receipt: the model statement, if any
            trained_groups=trained.trained_groups,
            dataset_sha256=trained.dataset_sha256,
            secagg=shares,
        )

    def share_vector(
        self, run_id: str, round_number: int, relay: str, vector: np.ndarray, *, study_sha256: str,
        model_sha256: str,
    ) -> str:  # fmt: skip
        """Step 2 of a query's secure exchange: check every site's keys and what this site
        was asked (the query's digest and the step's, as the announcement names them),
        keep `vector` and answer its sealed shares (JSON)."""
        _, _, identity = self._credentials()
        raw = loads(relay, "secagg")
        if not isinstance(raw, dict) or set(raw) != {"announcement", "adverts"}:
            raise RequestError("secagg: expected announcement and adverts")
        signed = SignedAnnouncement.from_text(str(raw["announcement"]))
        adverts = raw["adverts"]
        if not isinstance(adverts, list):
            raise RequestError("secagg.adverts: expected a list")
        with self._lock:
            state = self._round(run_id, round_number)
            if signed.announcement != state.announcement:
                raise SecAggError("the query message names another announcement than the keys")
            announced = state.announcement
            if (announced.model_sha256, announced.study_sha256) != (model_sha256, study_sha256):
                raise SecAggError(
                    "the query or step this site received is not the one announced to all"
                    " sites: refusing an inconsistent exchange"
                )
            state.check_peers([Advertisement.from_json(a) for a in adverts], identity)
            clipped = int(np.count_nonzero(np.abs(vector) > announced.clip))
            if clipped:
                log.warning("run %s step %d: %d values beyond the range %g are clipped",
                            run_id, round_number, clipped, announced.clip)  # fmt: skip
            sealed = state.deal(vector.astype(np.float64))
        return dumps([item.to_json() for item in sealed])

    def mask(self, request: SecAggRequest, *, study_sha256: str) -> SecAggReply:
        """Step 3: open the shares held for others; answer the masked update, signed."""
        signer, _, _ = self._credentials()
        raw = loads(request.payload, "secagg mask")
        if not isinstance(raw, dict) or not {"shared", "shares"} <= set(raw) <= {
            "shared", "shares", "statements",
        }:  # fmt: skip
            raise RequestError("secagg mask: expected shared, shares and statements")
        shared, shares = raw["shared"], raw["shares"]
        statements = raw.get("statements", {})
        if not isinstance(shared, list) or not all(isinstance(s, str) for s in shared):
            raise RequestError("secagg mask: shared must be a list of site ids")
        if not isinstance(shares, list):
            raise RequestError("secagg mask: shares must be a list")
        if not isinstance(statements, dict) or not all(
            isinstance(v, str) for v in statements.values()
        ):
            raise RequestError("secagg mask: statements must map site ids to signatures")
        with self._lock:
            state = self._round(request.run_id, request.round)
            state.check_models(statements, shared)
            masked = state.mask(shared, [SealedShare.from_json(item) for item in shares])
        receipt = UpdateReceipt(
            run_id=request.run_id,
            study_sha256=study_sha256,
            round=request.round,
            model_sha256=state.announcement.model_sha256 or state.trained_model,
            update_sha256=masked_sha256(masked),
            site_id=self._site_id,
        )
        return SecAggReply(self._site_id, "{}", masked, receipt.sign(signer))

    def reveal(self, request: SecAggRequest) -> SecAggReply:
        """Step 4: shares for the unmasking of the sum; once per round. With `next` (the
        signed announcement of the next round, dealt ahead), also that round's fresh keys:
        the next round then needs no keys exchange of its own."""
        raw = loads(request.payload, "secagg reveal")
        if not isinstance(raw, dict) or not {"survivors", "dropped"} <= set(raw) <= {
            "survivors", "dropped", "next",
        }:  # fmt: skip
            raise RequestError("secagg reveal: expected survivors, dropped and next")
        survivors, dropped = raw["survivors"], raw["dropped"]
        for value in (survivors, dropped):
            if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
                raise RequestError("secagg reveal: survivors and dropped must be site-id lists")
        upcoming = raw.get("next")
        if upcoming is not None and not isinstance(upcoming, str):
            raise RequestError("secagg reveal: next must be a signed announcement")
        with self._lock:
            state = self._round(request.run_id, request.round)
            reveal = state.reveal(survivors, dropped)
        answer = reveal_to_json(reveal)
        if upcoming is not None:
            if SignedAnnouncement.from_text(upcoming).announcement.model_sha256:
                raise SecAggError("an announcement dealt ahead cannot name the model yet")
            answer["advertisement"] = self._announced(upcoming, request.run_id, request.round + 1)
        return SecAggReply(self._site_id, dumps(answer))

    def study_of(self, run_id: str, round_number: int) -> str:
        """The study SHA-256 announced for (run, round)."""
        with self._lock:
            return self._round(run_id, round_number).announcement.study_sha256


NOT_SET = "[site] identity_certificate and consortium_ca are not set"
IDENTITY_REASON = (
    "the site's identity certificate cannot be used (its operator sees why with"
    " `medfed site check`): secure rounds refused"
)
"""What the coordinator reads of a certificate problem (the site's paths stay here)."""
RENEW_DAYS = 30
"""`identity_problem` asks for a new certificate this many days before it expires."""


@dataclass(frozen=True)
class SiteIdentity:
    """The site's signing key, the CA's certificate of it (PEM), and the CA's check."""

    signer: SigningKey
    pem: str
    check: IdentityCheck
    not_valid_after: dt.datetime


def load_identity(config: SiteConfig) -> SiteIdentity:
    """Read and check the site's secure-aggregation credentials: the certificate names
    this site, the consortium CA issued it, it is valid now, and it certifies the site's
    own signing key. `SiteRefusal` names what is wrong."""
    site = config.site
    cert = config.optional_path(site.identity_certificate)
    ca = config.optional_path(site.consortium_ca)
    if cert is None or ca is None:
        raise SiteRefusal(
            f"{config.source}: {NOT_SET}: secure rounds refused",
            public=f"{NOT_SET}: secure rounds refused",
        )
    try:
        pem = _read(cert).decode()
        check = identity_check(_read(ca))
        signer = SigningKey.load(config.signing_key_path)
        if check(site.id, pem) != signer.public:
            raise SiteRefusal(
                f"{cert}: certifies another key than the site's signing key",
                public=IDENTITY_REASON,
            )
        expires = x509.load_pem_x509_certificate(pem.encode()).not_valid_after_utc
    except (PrivacyError, UnicodeDecodeError, ValueError) as exc:
        raise SiteRefusal(f"{cert}: {exc}", public=IDENTITY_REASON) from exc
    return SiteIdentity(signer, pem, check, expires)


def identity_problem(config: SiteConfig) -> str | None:
    """Why this site could not take part in a secure round, or None (`load_identity`);
    a certificate within `RENEW_DAYS` of expiry is a problem too, before rounds fail."""
    try:
        identity = load_identity(config)
    except SiteRefusal as exc:
        return str(exc).removeprefix(f"{config.source}: ")
    if identity.not_valid_after - dt.datetime.now(dt.UTC) < dt.timedelta(days=RENEW_DAYS):
        return (
            f"{config.optional_path(config.site.identity_certificate)}: expires within"
            f" {RENEW_DAYS} days; ask the consortium lead for"
            f" `medfed provision --renew-identity {config.site.id}`"
        )
    return None


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SiteRefusal(
            f"{path}: cannot be read ({exc.strerror})", public=IDENTITY_REASON
        ) from exc
