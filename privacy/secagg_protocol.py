"""Secure aggregation as messages: the signed round announcement, key advertisements,
sealed shares, and each side's state for one round.

One round, as `coordinator.secure_rounds` drives it (three round trips, two when the
round's keys were dealt ahead):

1. **keys**: the coordinator sends the signed `Announcement` (run, round, the model's
   SHA-256, the selected sites, threshold, fixed-point range, a fresh nonce). A site
   checks the coordinator's signature, makes fresh round keys and answers an
   `Advertisement` signed with its own key, carrying its consortium identity certificate.
2. **train**: the coordinator relays every advertisement. A site checks each one (the
   consortium CA issued the certificate to that site id, the signature holds, and it
   names the *same* announcement: a coordinator that sent another site a different model
   or a different round is caught here), checks the model it received against the
   announcement, trains, and answers, in one reply, `SealedShare`s of its self-mask seed
   (one per other keyed site, AES-GCM under an X25519 channel key) and its update masked
   against every keyed site, with its signed receipt over the masked bytes.
3. **reveal**: the coordinator names survivors (their masked update arrived) and dropped
   sites (keyed, no masked update), and relays to each survivor the sealed shares the
   other survivors dealt it. A site answers once per round: self-mask-seed shares of
   survivors and its own pairwise seed with each dropped site, never both for one site.
   A dropped site dealt nothing, so only the survivors can remove their masks with it:
   a survivor that then fails to reveal makes the round abort (nothing is unmasked).

Unmasking one site's update would need its self-mask seed (shares from `threshold`
holders told it survived) and its pairwise seed with every other site (from each of them,
told it dropped); an honest site gives one kind per site, so a coordinator that lies
about dropouts would need `threshold` sites colluding with it.

Keys dealt ahead: a reveal request may carry the *next* round's signed announcement
(naming no model: it is not known yet); the site answers its reveal and an advertisement
for that round, and the next round starts at step 2. Each site then signs the model it
received (`model_statement`) in step 2, and in step 3 checks every other survivor's
statement before it reveals (`SiteRound.check_models`): a coordinator that sent one site
another model cannot unmask a sum that would single that site out.

Keys are fresh per round (per announcement): revealing a dropped site's mask key
unmasks nothing of another round. Shares are held in memory only: a site that restarts
has nothing left to reveal, which can make a round abort but never leak.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import numpy.typing as npt
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from medfed.privacy.errors import SecAggAbort, SecAggError
from medfed.privacy.secagg import (
    HeldShares,
    Reveal,
    RoundKeys,
    Share,
    UnmaskRequest,
    decode_sum,
    encode,
    mask_update,
    pairwise_seeds,
    public_key_bytes,
    share,
    unmask_sum,
)
from medfed.privacy.signing import JsonValue, SigningKey, VerifyKey, canonical_json

ANNOUNCEMENT_SCHEMA = "medfed.secagg-announcement/1"
ADVERTISEMENT_SCHEMA = "medfed.secagg-advertisement/1"
MODEL_STATEMENT_SCHEMA = "medfed.secagg-model/1"
SHARE_INFO = b"medfed/secagg/v1/shares\x00"
MODULUS = 2**32
"""Masked updates travel as uint32: upload equals the float32 size of the update."""
MAX_SITES = 1000
_HEX = re.compile(r"[0-9a-f]*")

IdentityCheck = Callable[[str, str], VerifyKey]
"""(site id, identity certificate PEM) -> the site's verify key; raises `SecAggError`."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _hex(value: object, where: str, *, length: int | None = None) -> str:
    if not isinstance(value, str) or _HEX.fullmatch(value) is None:
        raise SecAggError(f"{where}: expected lowercase hex")
    if length is not None and len(value) != length:
        raise SecAggError(f"{where}: expected {length} hex digits, got {len(value)}")
    return value


def _str(value: object, where: str, *, limit: int = 256) -> str:
    if not isinstance(value, str) or not value or len(value) > limit:
        raise SecAggError(f"{where}: expected a string of 1 to {limit} characters")
    return value


def _int(value: object, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise SecAggError(f"{where}: expected an integer")
    return value


def _object(value: object, where: str, keys: set[str]) -> dict[str, Any]:
    if not isinstance(value, dict) or set(value) != keys:
        raise SecAggError(f"{where}: expected an object with exactly {sorted(keys)}")
    return value


def loads(text: str, where: str) -> Any:
    """JSON text from the other side, with a clear error."""
    if len(text) > 64 * 1024 * 1024:
        raise SecAggError(f"{where}: over 64 MiB")
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise SecAggError(f"{where}: not JSON ({exc})") from exc


def masked_sha256(masked: npt.NDArray[np.uint32]) -> str:
    """What a site signs of its masked update: the SHA-256 of its little-endian uint32 bytes."""
    return sha256_hex(np.ascontiguousarray(masked, dtype="<u4").tobytes())


def dumps(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


# ---------------------------------------------------------------- announcement


@dataclass(frozen=True)
class Announcement:
    """What the coordinator commits to for one round's secure aggregation, signed."""

    run_id: str
    study_sha256: str
    round: int
    model_sha256: str
    """The model every site trains from; "" in an announcement dealt ahead, during the
    round before (the model is not known yet): each site then signs the model it received
    (`model_statement`) and checks every other site's statement before it masks."""
    sites: tuple[str, ...]
    threshold: int
    clip: float
    """Per coordinate, the largest |weight * (update - model)| a site encodes."""
    weight_cap: int
    """Sites weigh their update by patients / weight_cap (at most 1)."""
    modulus: int = MODULUS
    nonce: str = field(default_factory=lambda: secrets.token_hex(16))

    def __post_init__(self) -> None:
        if not 2 <= self.threshold <= len(self.sites) <= MAX_SITES:
            raise SecAggError(
                f"announcement: need 2 <= threshold ({self.threshold}) <= sites"
                f" ({len(self.sites)}) <= {MAX_SITES}"
            )
        if len(set(self.sites)) != len(self.sites) or list(self.sites) != sorted(self.sites):
            raise SecAggError("announcement: sites must be sorted and distinct")
        if not (np.isfinite(self.clip) and self.clip > 0) or self.weight_cap < 1:
            raise SecAggError("announcement: clip must be positive and weight_cap at least 1")
        if self.modulus != MODULUS:
            raise SecAggError(f"announcement: modulus must be 2**32, got {self.modulus}")

    def to_json(self) -> dict[str, JsonValue]:
        return {**asdict(self), "sites": list(self.sites), "schema": ANNOUNCEMENT_SCHEMA}

    def payload(self) -> bytes:
        return canonical_json(self.to_json())

    def sha256(self) -> str:
        return sha256_hex(self.payload())

    @classmethod
    def from_json(cls, value: object) -> Announcement:
        keys = {f for f in cls.__dataclass_fields__} | {"schema"}
        raw = _object(value, "announcement", keys)
        if raw["schema"] != ANNOUNCEMENT_SCHEMA:
            raise SecAggError(f"announcement: unknown schema {raw['schema']!r}")
        sites = raw["sites"]
        if not isinstance(sites, list):
            raise SecAggError("announcement.sites: expected a list")
        clip = raw["clip"]
        if not isinstance(clip, int | float) or isinstance(clip, bool):
            raise SecAggError("announcement.clip: expected a number")
        return cls(
            run_id=_str(raw["run_id"], "announcement.run_id"),
            study_sha256=_hex(raw["study_sha256"], "announcement.study_sha256", length=64),
            round=_int(raw["round"], "announcement.round"),
            model_sha256=_model_hex(raw["model_sha256"]),
            sites=tuple(_str(site, "announcement.sites[]") for site in sites),
            threshold=_int(raw["threshold"], "announcement.threshold"),
            clip=float(clip),
            weight_cap=_int(raw["weight_cap"], "announcement.weight_cap"),
            modulus=_int(raw["modulus"], "announcement.modulus"),
            nonce=_hex(raw["nonce"], "announcement.nonce", length=32),
        )


def _model_hex(value: object) -> str:
    if value == "":
        return ""
    return _hex(value, "announcement.model_sha256", length=64)


def model_statement(announcement_sha256: str, site_id: str, model_sha256: str) -> bytes:
    """What a site signs of the model it trained from in a round announced ahead (the
    announcement could not name it); the other sites check it before they mask."""
    return canonical_json(
        {
            "schema": MODEL_STATEMENT_SCHEMA,
            "announcement_sha256": announcement_sha256,
            "site_id": site_id,
            "model_sha256": model_sha256,
        }
    )


@dataclass(frozen=True)
class SignedAnnouncement:
    announcement: Announcement
    signature: str  # hex Ed25519 by the coordinator's key

    @classmethod
    def sign(cls, announcement: Announcement, key: SigningKey) -> SignedAnnouncement:
        return cls(announcement, key.sign(announcement.payload()).hex())

    def verify(self, key: VerifyKey) -> None:
        """Raise `SecAggError` unless `key` signed this announcement."""
        try:
            ok = key.verify(self.announcement.payload(), bytes.fromhex(self.signature))
        except ValueError:
            ok = False
        if not ok:
            raise SecAggError(
                f"round {self.announcement.round}'s announcement is not signed by the"
                " coordinator's key"
            )

    def to_text(self) -> str:
        return dumps({"announcement": self.announcement.to_json(), "signature": self.signature})

    @classmethod
    def from_text(cls, text: str) -> SignedAnnouncement:
        raw = _object(
            loads(text, "announcement"), "signed announcement", {"announcement", "signature"}
        )
        return cls(
            Announcement.from_json(raw["announcement"]),
            _hex(raw["signature"], "announcement.signature", length=128),
        )


# ---------------------------------------------------------------- advertisement


@dataclass(frozen=True)
class Advertisement:
    """A site's public keys for one announced round, signed with its identity key."""

    announcement_sha256: str
    site_id: str
    mask_public: str  # hex X25519
    channel_public: str  # hex X25519
    certificate: str  # PEM: the consortium CA binds site_id to the signing key
    signature: str = ""

    def payload(self) -> bytes:
        fields = asdict(self)
        del fields["signature"], fields["certificate"]
        return canonical_json({"schema": ADVERTISEMENT_SCHEMA, **fields})

    def signed(self, key: SigningKey) -> Advertisement:
        return replace(self, signature=key.sign(self.payload()).hex())

    def verify(self, key: VerifyKey) -> bool:
        try:
            return key.verify(self.payload(), bytes.fromhex(self.signature))
        except ValueError:
            return False

    def to_json(self) -> dict[str, JsonValue]:
        return dict(asdict(self))

    @classmethod
    def from_json(cls, value: object) -> Advertisement:
        raw = _object(value, "advertisement", set(cls.__dataclass_fields__))
        return cls(
            announcement_sha256=_hex(raw["announcement_sha256"], "advertisement", length=64),
            site_id=_str(raw["site_id"], "advertisement.site_id"),
            mask_public=_hex(raw["mask_public"], "advertisement.mask_public", length=64),
            channel_public=_hex(raw["channel_public"], "advertisement.channel_public", length=64),
            certificate=_str(raw["certificate"], "advertisement.certificate", limit=8192),
            signature=_hex(raw["signature"], "advertisement.signature", length=128),
        )


# ---------------------------------------------------------------- sealed shares


@dataclass(frozen=True)
class SealedShare:
    """`owner`'s shares for `holder`, AES-GCM under their X25519 channel key."""

    owner: str
    holder: str
    nonce: str
    ciphertext: str

    def to_json(self) -> dict[str, JsonValue]:
        return dict(asdict(self))

    @classmethod
    def from_json(cls, value: object) -> SealedShare:
        raw = _object(value, "sealed share", set(cls.__dataclass_fields__))
        return cls(
            owner=_str(raw["owner"], "share.owner"),
            holder=_str(raw["holder"], "share.holder"),
            nonce=_hex(raw["nonce"], "share.nonce", length=24),
            ciphertext=_hex(raw["ciphertext"], "share.ciphertext"),
        )


def _channel_key(mine: X25519PrivateKey, theirs_hex: str, announcement_sha256: str) -> AESGCM:
    try:
        secret = mine.exchange(X25519PublicKey.from_public_bytes(bytes.fromhex(theirs_hex)))
    except ValueError as exc:
        raise SecAggError(f"channel key agreement failed: {exc}") from exc
    info = SHARE_INFO + announcement_sha256.encode()
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)
    return AESGCM(key)


def _associated(owner: str, holder: str, announcement_sha256: str) -> bytes:
    return canonical_json({"owner": owner, "holder": holder, "round": announcement_sha256})


def share_to_json(item: Share) -> list[JsonValue]:
    return [item.x, format(item.y, "x"), item.threshold, item.secret_length]


def share_from_json(value: object, where: str) -> Share:
    if not isinstance(value, list) or len(value) != 4:
        raise SecAggError(f"{where}: expected [x, y, threshold, length]")
    y = _hex(value[1], f"{where}.y")
    if not y or len(y) > 140:
        raise SecAggError(f"{where}.y: out of range")
    return Share(
        _int(value[0], f"{where}.x"),
        int(y, 16),
        _int(value[2], f"{where}.threshold"),
        _int(value[3], f"{where}.length"),
    )


def seal(
    held: HeldShares, channel: X25519PrivateKey, holder_public: str, announcement_sha256: str
) -> SealedShare:
    """`held` (its self-mask-seed share) sealed for its holder."""
    plain = canonical_json({"seed": share_to_json(held.self_mask_seed)})
    nonce = secrets.token_bytes(12)
    cipher = _channel_key(channel, holder_public, announcement_sha256).encrypt(
        nonce, plain, _associated(held.owner, held.holder, announcement_sha256)
    )
    return SealedShare(held.owner, held.holder, nonce.hex(), cipher.hex())


def open_sealed(
    sealed: SealedShare, channel: X25519PrivateKey, owner_public: str, announcement_sha256: str
) -> HeldShares:
    try:
        plain = _channel_key(channel, owner_public, announcement_sha256).decrypt(
            bytes.fromhex(sealed.nonce),
            bytes.fromhex(sealed.ciphertext),
            _associated(sealed.owner, sealed.holder, announcement_sha256),
        )
    except (InvalidTag, ValueError) as exc:
        raise SecAggError(f"the share from {sealed.owner!r} does not open: tampered") from exc
    raw = _object(loads(plain.decode(), "share"), "share", {"seed"})
    return HeldShares(sealed.owner, sealed.holder, share_from_json(raw["seed"], "share.seed"))


def reveal_to_json(reveal: Reveal) -> dict[str, JsonValue]:
    return {
        "holder": reveal.holder,
        "seeds": {o: share_to_json(s) for o, s in sorted(reveal.self_mask_seed_shares.items())},
        "pairwise": {o: seed.hex() for o, seed in sorted(reveal.pairwise_seeds.items())},
    }


def reveal_from_json(value: object) -> Reveal:
    raw = _object(value, "reveal", {"holder", "seeds", "pairwise"})
    seeds, pairwise = raw["seeds"], raw["pairwise"]
    if not isinstance(seeds, dict) or not isinstance(pairwise, dict):
        raise SecAggError("reveal: seeds and pairwise must be objects")
    return Reveal(
        _str(raw["holder"], "reveal.holder"),
        {
            _str(o, "reveal.seeds"): share_from_json(s, f"reveal.seeds.{o}")
            for o, s in seeds.items()
        },
        {},
        {
            _str(o, "reveal.pairwise"): bytes.fromhex(_hex(v, f"reveal.pairwise.{o}", length=64))
            for o, v in pairwise.items()
        },
    )


# ---------------------------------------------------------------- site side


def weighted_delta(
    trained: Mapping[str, np.ndarray],
    received: Mapping[str, np.ndarray],
    *,
    patients: int,
    weight_cap: int,
) -> npt.NDArray[np.float64]:
    """(patients / weight_cap) * (trained - received), flattened in sorted-name order."""
    if sorted(trained) != sorted(received):
        raise SecAggError("the update's arrays are not the model's")
    weight = min(patients, weight_cap) / weight_cap
    parts = [
        (trained[name].astype(np.float64) - received[name].astype(np.float64)).reshape(-1)
        for name in sorted(received)
    ]
    return np.concatenate(parts) * weight if parts else np.zeros(0)


class SiteRound:
    """One site's state for one announced round (in memory only, by design)."""

    def __init__(
        self, signed: SignedAnnouncement, site_id: str, signer: SigningKey, certificate: str
    ) -> None:
        self.announcement = signed.announcement
        self.digest = self.announcement.sha256()
        if site_id not in self.announcement.sites:
            raise SecAggError(f"site {site_id!r} is not among the round's announced sites")
        self.site_id = site_id
        self._keys = RoundKeys.generate(site_id)
        self._channel = X25519PrivateKey.generate()
        self.advertisement = Advertisement(
            self.digest,
            site_id,
            self._keys.public_key.hex(),
            public_key_bytes(self._channel).hex(),
            certificate,
        ).signed(signer)
        self._peers: dict[str, Advertisement] = {}
        self._peer_keys: dict[str, VerifyKey] = {}
        self.trained_model = ""
        """The model this site trained from, when the announcement names none."""
        self._held: dict[str, HeldShares] = {}
        self._seeds: dict[str, bytes] = {}
        self._shared: tuple[str, ...] = ()
        self._revealed: tuple[UnmaskRequest, Reveal] | None = None
        self._dealt: (
            tuple[npt.NDArray[np.float64], tuple[SealedShare, ...], npt.NDArray[np.uint32]] | None
        ) = None

    def check_peers(self, adverts: Sequence[Advertisement], identity: IdentityCheck) -> None:
        """Verify every advertisement: issued identity, signature, the same announcement."""
        peers: dict[str, Advertisement] = {}
        for advert in adverts:
            if advert.announcement_sha256 != self.digest:
                raise SecAggError(
                    f"site {advert.site_id!r} was shown a different announcement for round"
                    f" {self.announcement.round} than this site: the coordinator is not"
                    " sending every site the same round"
                )
            if advert.site_id not in self.announcement.sites or advert.site_id in peers:
                raise SecAggError(f"advertisement of {advert.site_id!r}: not announced or repeated")
            key = identity(advert.site_id, advert.certificate)
            if not advert.verify(key):
                raise SecAggError(f"advertisement of {advert.site_id!r}: bad signature")
            peers[advert.site_id] = advert
            self._peer_keys[advert.site_id] = key
        if peers.get(self.site_id) != self.advertisement:
            raise SecAggError("this site's own advertisement is missing or altered")
        if len(peers) < self.announcement.threshold:
            raise SecAggAbort(f"{len(peers)} sites keyed, {self.announcement.threshold} needed")
        self._peers = peers

    def state_model(self, model_sha256: str, signer: SigningKey) -> str:
        """Check the model this site received against the announcement, or (an announcement
        dealt ahead names none) keep it and sign it: the hex signature of `model_statement`."""
        if self.announcement.model_sha256:
            if model_sha256 != self.announcement.model_sha256:
                raise SecAggError(
                    "the model or study this site received is not the one announced to all"
                    " sites: refusing an inconsistent round"
                )
            return ""
        self.trained_model = model_sha256
        return signer.sign(model_statement(self.digest, self.site_id, model_sha256)).hex()

    def check_models(self, statements: Mapping[str, str], survivors: Sequence[str]) -> None:
        """In a round announced ahead: every other survivor signed that it trained from the
        model this site did. A coordinator that sent one hospital another model (to single
        out its update in the sum) is caught here, before anything is revealed."""
        if self.announcement.model_sha256:
            return
        if not self.trained_model:
            raise SecAggError("this site has not stated its model yet")
        for site in survivors:
            if site == self.site_id:
                continue
            signature = statements.get(site, "")
            try:
                ok = self._peer_keys[site].verify(
                    model_statement(self.digest, site, self.trained_model),
                    bytes.fromhex(signature),
                )
            except (KeyError, ValueError):
                ok = False
            if not ok:
                raise SecAggError(
                    f"site {site!r} did not state that it trained from the model this site"
                    " received: the coordinator is not sending every site the same model;"
                    " refusing to reveal"
                )

    def deal_and_mask(
        self, update: npt.NDArray[np.float64]
    ) -> tuple[list[SealedShare], npt.NDArray[np.uint32]]:
        """Encode the weighted update, seal a share of this round's self-mask seed for each
        other keyed site, and mask the update against every keyed site. Once per round:
        the same update again (a train instruction delivered twice) gets the same answer;
        another one is refused (its masked form would give the difference away)."""
        if not self._peers:
            raise SecAggError("peers are not checked yet")
        if self._dealt is not None:
            if not np.array_equal(self._dealt[0], update):
                raise SecAggError("this round's update was masked already")
            return list(self._dealt[1]), self._dealt[2].copy()
        a = self.announcement
        holders = sorted(self._peers)
        encoded = encode(update, clip=a.clip, max_sites=len(a.sites), modulus=a.modulus)
        dealt = share(self._keys.self_mask_seed, threshold=a.threshold, n=len(holders))
        sealed = []
        for holder, item in zip(holders, dealt, strict=True):
            held = HeldShares(self.site_id, holder, item)
            if holder == self.site_id:
                self._held[self.site_id] = held
            else:
                sealed.append(
                    seal(held, self._channel, self._peers[holder].channel_public, self.digest)
                )
        publics = {site: bytes.fromhex(self._peers[site].mask_public) for site in holders}
        self._seeds = pairwise_seeds(self._keys, publics, run_id=self.digest)
        masked = mask_update(
            encoded,
            site_id=self.site_id,
            self_mask_seed=self._keys.self_mask_seed,
            pairwise_seeds=self._seeds,
            round_number=a.round,
            modulus=a.modulus,
        )
        self._shared = tuple(holders)
        self._dealt = (np.array(update, copy=True), tuple(sealed), masked.astype(np.uint32))
        return sealed, self._dealt[2].copy()

    def reveal(
        self,
        survivors: Sequence[str],
        dropped: Sequence[str],
        sealed: Sequence[SealedShare],
        statements: Mapping[str, str] | None = None,
    ) -> Reveal:
        """Open the shares the other survivors dealt this site, check their model statements
        (a round announced ahead), and answer, once: self-mask-seed shares of survivors, this
        site's pairwise seeds with dropped sites. The same request again gets the same answer."""
        request = UnmaskRequest(frozenset(survivors), frozenset(dropped))
        if self._revealed is not None:
            if self._revealed[0] != request:
                raise SecAggError("this round was unmasked already with other survivors")
            return self._revealed[1]
        if not self._shared:
            raise SecAggError("no update was masked this round")
        if request.survivors | request.dropped != set(self._shared):
            raise SecAggError("survivors and dropped sites must be exactly the keyed sites")
        if self.site_id not in request.survivors:
            raise SecAggError("this site's masked update was sent: it is a survivor")
        if len(request.survivors) < self.announcement.threshold:
            raise SecAggAbort(
                f"{len(request.survivors)} survivors, {self.announcement.threshold} needed"
            )
        owners = {item.owner for item in sealed}
        if len(owners) != len(sealed) or owners != request.survivors - {self.site_id}:
            raise SecAggError("exactly one share is needed from each other survivor")
        held = dict(self._held)
        for item in sealed:
            if item.holder != self.site_id:
                raise SecAggError(f"a share for {item.holder!r} was sent to {self.site_id!r}")
            held[item.owner] = open_sealed(
                item, self._channel, self._peers[item.owner].channel_public, self.digest
            )
        self.check_models(statements or {}, sorted(request.survivors))
        answer = Reveal(
            self.site_id,
            {site: held[site].self_mask_seed for site in sorted(request.survivors)},
            {},
            {site: self._seeds[site] for site in sorted(request.dropped)},
        )
        self._revealed = (request, answer)
        return answer


# ---------------------------------------------------------------- coordinator side


def unmask_weighted_sum(
    announcement: Announcement,
    adverts: Mapping[str, Advertisement],
    masked: Mapping[str, npt.NDArray[np.uint32]],
    reveals: Sequence[Reveal],
) -> npt.NDArray[np.float64]:
    """Sum of the survivors' weighted updates (see `weighted_delta`), decoded to float64.

    `adverts` are the sites that shared (U2); survivors are the keys of `masked`.
    """
    a = announcement
    total = unmask_sum(
        {site: vector.astype(np.uint64) for site, vector in masked.items()},
        public_keys={site: bytes.fromhex(ad.mask_public) for site, ad in adverts.items()},
        reveals=reveals,
        threshold=a.threshold,
        run_id=a.sha256(),
        round_number=a.round,
        modulus=a.modulus,
    )
    return decode_sum(
        total, clip=a.clip, max_sites=len(a.sites), modulus=a.modulus, n_summands=len(masked)
    )
