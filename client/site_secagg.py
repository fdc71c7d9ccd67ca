"""The site's half of secure aggregation: keys, shares, the masked update, the reveal.

`SiteSecAgg` lives in the site worker beside the trainers and keeps one
`privacy.secagg_protocol.SiteRound` per (run, round), in memory only: a worker that
restarts has nothing left to reveal for rounds it began, so a round may abort but no
update is ever unmasked. The update itself never leaves unmasked: the train step answers
sealed shares and the update masked, with a signed receipt over the masked bytes (the
coordinator checks that, as it checks plain updates).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from cryptography import x509

from medfed.client.config import SiteConfig
from medfed.client.errors import RequestError, SiteRefusal
from medfed.client.protocol import SecAggReply, SecAggRequest, TrainReply, TrainRequest
from medfed.model import wire
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
        announcement; answer sealed shares and the update masked, with the receipt over the
        masked bytes (and, in a round announced ahead, the signed model statement)."""
        signer, _, identity = self._credentials()
        signed, adverts = _relay(request.secagg)
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
            state.check_peers(adverts, identity)
            update = weighted_delta(
                trained.arrays,
                request.arrays,
                patients=trained.num_examples,
                weight_cap=announced.weight_cap,
            )
            masked = self._deal_masked(state, update, signer)
        return TrainReply(
            site_id=trained.site_id,
            arrays={wire.MASKED: masked.vector},
            local_loss=trained.local_loss,
            epsilon=trained.epsilon,
            noise_multiplier=trained.noise_multiplier,
            incoming=trained.incoming,
            receipt_signature=masked.receipt_signature,
            trained_groups=trained.trained_groups,
            dataset_sha256=trained.dataset_sha256,
            secagg=masked.shares,
            model_statement=statement,
        )

    def share_vector(
        self, run_id: str, round_number: int, relay: str, vector: np.ndarray, *, study_sha256: str,
        model_sha256: str,
    ) -> MaskedVector:  # fmt: skip
        """Step 2 of a query's secure exchange: check every site's keys and what this site
        was asked (the query's digest and the step's, as the announcement names them);
        `vector`'s sealed shares and the vector masked, with its receipt."""
        signer, _, identity = self._credentials()
        signed, adverts = _relay(relay)
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
            state.check_peers(adverts, identity)
            return self._deal_masked(state, vector.astype(np.float64), signer)

    def _deal_masked(
        self, state: SiteRound, vector: npt.NDArray[np.float64], signer: SigningKey
    ) -> MaskedVector:
        announced = state.announcement
        clipped = int(np.count_nonzero(np.abs(vector) > announced.clip))
        if clipped:
            log.warning(
                "run %s round %d: %d values beyond the secure-aggregation range %g are clipped",
                announced.run_id, announced.round, clipped, announced.clip,
            )  # fmt: skip
        sealed, masked = state.deal_and_mask(vector)
        receipt = UpdateReceipt(
            run_id=announced.run_id,
            study_sha256=announced.study_sha256,
            round=announced.round,
            model_sha256=announced.model_sha256 or state.trained_model,
            update_sha256=masked_sha256(masked),
            site_id=self._site_id,
        )
        shares = dumps([item.to_json() for item in sealed])
        return MaskedVector(shares, masked, receipt.sign(signer))

    def reveal(self, request: SecAggRequest) -> SecAggReply:
        """Step 3: open the shares the other survivors dealt, check their model statements
        (a round announced ahead), answer what unmasks the sum only; once per round. With
        `next` (the next round's signed announcement, dealt ahead), also that round's fresh
        keys: the next round then needs no keys exchange of its own."""
        raw = loads(request.payload, "secagg reveal")
        keys = {"survivors", "dropped", "shares"}
        if not isinstance(raw, dict) or not keys <= set(raw) <= keys | {"statements", "next"}:
            raise RequestError("secagg reveal: expected survivors, dropped and shares")
        survivors, dropped, shares = raw["survivors"], raw["dropped"], raw["shares"]
        for value in (survivors, dropped):
            if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
                raise RequestError("secagg reveal: survivors and dropped must be site-id lists")
        if not isinstance(shares, list):
            raise RequestError("secagg reveal: shares must be a list")
        statements = raw.get("statements", {})
        if not isinstance(statements, dict) or not all(
            isinstance(v, str) for v in statements.values()
        ):
            raise RequestError("secagg reveal: statements must map site ids to signatures")
        upcoming = raw.get("next")
        if upcoming is not None and not isinstance(upcoming, str):
            raise RequestError("secagg reveal: next must be a signed announcement")
        if (
            upcoming is not None
            and SignedAnnouncement.from_text(upcoming).announcement.model_sha256
        ):
            raise SecAggError("an announcement dealt ahead cannot name the model yet")
        with self._lock:
            state = self._round(request.run_id, request.round)
            reveal = state.reveal(
                survivors, dropped, [SealedShare.from_json(item) for item in shares], statements
            )
        answer = reveal_to_json(reveal)
        if upcoming is not None:
            answer["advertisement"] = self._announced(upcoming, request.run_id, request.round + 1)
        return SecAggReply(self._site_id, dumps(answer))


@dataclass(frozen=True)
class MaskedVector:
    """What leaves for a secure round's (or query's) step 2: sealed shares (JSON), the
    masked vector and the site's receipt signature over its bytes."""

    shares: str
    vector: npt.NDArray[np.uint32]
    receipt_signature: str


def _relay(text: str) -> tuple[SignedAnnouncement, list[Advertisement]]:
    """The announcement and advertisements the coordinator relays with step 2."""
    raw = loads(text, "secagg")
    if not isinstance(raw, dict) or set(raw) != {"announcement", "adverts"}:
        raise RequestError("secagg: expected announcement and adverts")
    adverts = raw["adverts"]
    if not isinstance(adverts, list):
        raise RequestError("secagg.adverts: expected a list")
    return (
        SignedAnnouncement.from_text(str(raw["announcement"])),
        [Advertisement.from_json(a) for a in adverts],
    )


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
