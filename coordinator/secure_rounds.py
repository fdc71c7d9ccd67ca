"""A training round under secure aggregation: the coordinator learns only the sum.

Three exchanges with the planned sites (`privacy.secagg_protocol` describes the
messages): keys, train (sealed shares and the masked update come back, signed), reveal
(what removes the masks from the sum only). A later round of the same plan skips keys:
its fresh keys came back with the round before's reveal (`Ahead`), so it costs one
exchange more than a plain round. Each reply is validated like a plain one: sender,
schema, example count, signature. A site that fails a step is listed with its reason and
the round goes on without it; the sum is exact while at least `threshold` sites sent
their masked update, and the round fails without unmasking anything when fewer did.

The sum is of each site's update weighted by patients / weight cap (see
`weighted_delta`); the patient counts and trained groups are sent in the clear, so each
parameter group is averaged over the sites that trained it, as in plain rounds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from medfed.coordinator.errors import RoundFailedError
from medfed.coordinator.messages import exchange
from medfed.coordinator.scheduler import RoundPlan
from medfed.coordinator.study import StudySettings
from medfed.coordinator.validate import (
    ReceiptCheck,
    Rejection,
    Sender,
    SiteUpdate,
    payload_bytes,
    validate_train_reply,
)
from medfed.model import wire
from medfed.model.wire import parameter_group
from medfed.privacy.errors import PrivacyError, SecAggAbort
from medfed.privacy.secagg import Reveal
from medfed.privacy.secagg_protocol import (
    Advertisement,
    Announcement,
    SealedShare,
    SignedAnnouncement,
    dumps,
    loads,
    masked_sha256,
    reveal_from_json,
    unmask_weighted_sum,
)
from medfed.privacy.signing import SigningKey, VerifyKey

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]
Masked = npt.NDArray[np.uint32]


@dataclass
class SecureOutcome:
    """What a secure round gives the round loop."""

    updates: list[SiteUpdate]
    """The survivors' replies (their arrays empty: only the sum is known)."""
    rejected: dict[str, str] = field(default_factory=dict)
    averaged: Arrays = field(default_factory=dict)
    """Each array averaged over the survivors that trained its group (global if none)."""
    trained_by: dict[str, list[str]] = field(default_factory=dict)
    announcement_sha256: str = ""
    digests: dict[str, str] = field(default_factory=dict)
    """Each survivor's masked update's SHA-256 (what its receipt signs)."""
    ahead: Ahead | None = None
    """The next round's announcement and the keys the survivors dealt for it."""
    exchanges: int = 0
    """Message exchanges the round took (2 with keys dealt ahead, else 3)."""
    statuses: dict[int, Message] = field(default_factory=dict)
    """The next round's statuses, answered with this round's reveal (by node)."""


@dataclass(frozen=True)
class Revealed:
    """A reveal step's answers: the reveals, the next round's advertisements (by site, as
    JSON) and the next round's statuses (status replies, by node), where asked."""

    reveals: list[Reveal]
    adverts: dict[str, object]
    statuses: dict[int, Message]


@dataclass(frozen=True)
class Ahead:
    """A round's announcement signed during the round before it (naming no model: that
    is not known yet) and the advertisements of fresh keys its sites answered with their
    reveal. Used when the round's plan turns out the same; else the round is announced
    anew."""

    announcement: Announcement
    signed_text: str
    adverts: dict[str, object]
    """Each site's advertisement as it came (JSON), checked when the round uses it."""

    def fits(self, fresh: Announcement) -> bool:
        """It announced what `fresh` would, but for the model and the nonce."""
        a = self.announcement
        return (a.run_id, a.study_sha256, a.round, a.sites, a.threshold, a.clip) == (
            fresh.run_id, fresh.study_sha256, fresh.round, fresh.sites, fresh.threshold,
            fresh.clip,
        ) and a.weight_cap == fresh.weight_cap  # fmt: skip


def secure_threshold(study: StudySettings, n_sites: int) -> int:
    """The study's threshold, or more than half the planned sites (and at least the
    study's minimum, and 2): a server that lies about dropouts then cannot get both
    kinds of share for one site."""
    if not study.secagg_threshold:
        return max(2, study.min_sites, n_sites // 2 + 1)
    if 2 * study.secagg_threshold <= n_sites:
        log.warning(
            "secagg-threshold %d of %d sites: a coordinator that lies about dropouts could"
            " unmask one site's update; use more than half the sites",
            study.secagg_threshold,
            n_sites,
        )
    return study.secagg_threshold


def site_text(reply: Message) -> str:
    """A secure-aggregation reply's JSON (its SITE record's payload)."""
    return wire.get_value(reply.content, wire.SITE, wire.SECAGG, str)


@dataclass
class _Step:
    """Replies of one step, by site, with the reason each failed one was set aside."""

    replies: dict[str, Message] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)


def _collect(replies: Sequence[Message], nodes: Mapping[int, str], step: str) -> _Step:
    out = _Step()
    for reply in replies:
        site = nodes.get(reply.metadata.src_node_id)
        if site is None:
            continue
        if reply.has_error():
            out.rejected[site] = f"{step}: site replied with an error: {reply.error.reason}"
            continue
        try:
            named = wire.get_value(reply.content, wire.SITE, wire.SITE_ID, str)
        except wire.WireError as exc:
            out.rejected[site] = f"{step}: {exc}"
            continue
        if named != site:
            out.rejected[site] = f"{step}: the reply names {named!r}, its node answered as {site!r}"
            continue
        out.replies[site] = reply
    for site in set(nodes.values()) - set(out.replies) - set(out.rejected):
        out.rejected[site] = f"{step}: no reply in time (dropped)"
    return out


@dataclass
class SecureRound:
    """One secure round's fixed facts and what it has set aside so far (a training round,
    or one exchange of a query: `coordinator.secure_ask`)."""

    grid: Grid
    study: StudySettings
    announcement: Announcement
    signed_text: str
    by_site: dict[str, int]
    receipts: ReceiptCheck | None
    rejected: dict[str, str]
    model_sha256: str = ""
    """The model (or query step) sent; the announcement names it unless it was dealt ahead."""
    statements: dict[str, str] = field(default_factory=dict)
    """In a round announced ahead: each site's signed statement of the model it trained from."""

    @property
    def round_number(self) -> int:
        return self.announcement.round

    def need(self, count: int, what: str) -> None:
        """Abort, unmasking nothing, when fewer than the threshold got through a step."""
        threshold = self.announcement.threshold
        if count < threshold:
            reasons = "; ".join(f"{site}: {why}" for site, why in sorted(self.rejected.items()))
            raise RoundFailedError(
                f"round {self.round_number}: secure aggregation aborted, {count} sites {what},"
                f" {threshold} needed; nothing was unmasked" + (f" ({reasons})" if reasons else "")
            )

    def exchange(
        self, step: str, contents: Mapping[str, RecordDict], message_type: str, timeout_s: float
    ) -> dict[str, Message]:
        """Send each site its content; the replies that came, by site (the rest set aside)."""
        group = str(self.round_number) if step == "train" else f"{self.round_number}.{step}"
        nodes = {self.by_site[site]: site for site in contents}
        started = time.perf_counter()
        replies = exchange(
            self.grid,
            {self.by_site[site]: content for site, content in contents.items()},
            message_type=message_type,
            group=group,
            timeout_s=timeout_s,
            names=nodes,
        )
        log.info(
            "secure round %s: %d replies of %d in %.3f s",
            group, len(replies), len(contents), time.perf_counter() - started,
        )  # fmt: skip
        collected = _collect(replies, nodes, step)
        self.rejected.update(collected.rejected)
        return collected.replies

    def step_content(self, payload: str) -> RecordDict:
        """A key, mask or reveal message: run, round, the announced study and model (the
        site's egress guard checks a masked update's receipt against them) and the
        step's JSON."""
        config = ConfigRecord(
            {
                wire.RUN_ID: self.announcement.run_id,
                wire.ROUND: self.round_number,
                wire.STUDY_SHA256: self.announcement.study_sha256,
                wire.MODEL_SHA256: self.model_sha256 or self.announcement.model_sha256,
                wire.SECAGG: payload,
            }
        )
        return RecordDict({wire.CONFIG: config})

    def keys(self) -> dict[str, Advertisement]:
        """Step 1: the signed announcement out, each site's signed advertisement back."""
        replies = self.exchange(
            "keys",
            {site: self.step_content(self.signed_text) for site in self.by_site},
            wire.SECAGG_KEYS,
            self.study.round_timeout_s,
        )
        adverts: dict[str, Advertisement] = {}
        for site, reply in replies.items():
            try:
                adverts[site] = self._advert(site, loads(site_text(reply), "advertisement"))
            except (PrivacyError, wire.WireError) as exc:
                self.rejected[site] = f"keys: {exc}"
        self.need(len(adverts), "sent keys")
        return adverts

    def keys_dealt_ahead(self, ahead: Ahead) -> dict[str, Advertisement]:
        """Step 1 done during the round before: the advertisements the sites answered
        with their reveal, checked as `keys` checks them."""
        adverts: dict[str, Advertisement] = {}
        for site in self.by_site:
            if site not in ahead.adverts:
                self.rejected[site] = "keys: dealt none with the round before's reveal"
                continue
            try:
                adverts[site] = self._advert(site, ahead.adverts[site])
            except PrivacyError as exc:
                self.rejected[site] = f"keys: {exc}"
        self.need(len(adverts), "sent keys")
        return adverts

    def _advert(self, site: str, raw: object) -> Advertisement:
        advert = Advertisement.from_json(raw)
        if advert.site_id != site or advert.announcement_sha256 != self.announcement.sha256():
            raise PrivacyError("the advertisement names another site or round")
        keys = None if self.receipts is None else self.receipts.site_keys
        if keys is not None and (site not in keys or not advert.verify(keys[site])):
            raise PrivacyError("the advertisement is not signed by the site's registered key")
        return advert

    def train(
        self,
        adverts: Mapping[str, Advertisement],
        contents: Mapping[int, RecordDict],
        global_arrays: Mapping[str, np.ndarray],
        senders: Mapping[int, Sender],
    ) -> tuple[dict[str, SiteUpdate], dict[str, list[SealedShare]], dict[str, Masked]]:
        """Step 2: every advertisement relayed with the train instruction; each site's
        metrics, sealed shares and masked update (signed) back."""
        relay = dumps(
            {
                "announcement": self.signed_text,
                "adverts": [adverts[s].to_json() for s in sorted(adverts)],
            }
        )
        train_contents = {}
        for site in sorted(adverts):
            content = contents[self.by_site[site]]
            config = {**dict(content.config_records[wire.CONFIG]), wire.SECAGG: relay}
            train_contents[site] = RecordDict(
                {**dict(content.array_records), wire.CONFIG: ConfigRecord(config)}
            )
        replies = self.exchange("train", train_contents, "train", self.study.round_deadline_s)
        size = sum(int(array.size) for array in global_arrays.values())
        updates: dict[str, SiteUpdate] = {}
        shares: dict[str, list[SealedShare]] = {}
        masked: dict[str, Masked] = {}
        for site, reply in replies.items():
            result = validate_train_reply(
                reply, global_arrays, sender=senders[self.by_site[site]], secure=True
            )
            if isinstance(result, Rejection):
                self.rejected[site] = f"train: {result.reason}"
                continue
            try:
                vector = self.masked_vector(site, reply, size)
                shares[site] = sealed_shares(reply, site, set(adverts) - {site})
                if not self.announcement.model_sha256:
                    self.statements[site] = wire.get_value(
                        reply.content, wire.SITE, wire.MODEL_STATEMENT, str
                    )
            except (PrivacyError, wire.WireError) as exc:
                self.rejected[site] = f"train: {exc}"
                shares.pop(site, None)
                continue
            masked[site] = vector
            updates[site] = result
        self.need(len(updates), "sent a masked update")
        return updates, shares, masked

    def masked_vector(self, site: str, reply: Message, size: int) -> Masked:
        """The site's masked vector, checked: one uint32 array of `size`, its receipt."""
        if payload_bytes(reply.content) > size * 4 + 1024:
            raise PrivacyError(f"oversized masked update (over {size * 4} bytes)")
        record = reply.content.array_records.get(wire.ARRAYS)
        if record is None or list(record) != [wire.MASKED]:
            raise PrivacyError("the reply carries no masked update")
        vector = record[wire.MASKED].numpy()
        if vector.dtype != np.uint32 or vector.shape != (size,):
            raise PrivacyError(
                f"masked update is {vector.dtype} {vector.shape}, expected uint32 ({size},)"
            )
        if self.receipts is not None:
            signature = wire.get_value(reply.content, wire.SITE, wire.RECEIPT_SIGNATURE, str)
            problem = self.receipts.digest_problem(site, masked_sha256(vector), signature)
            if problem is not None:
                raise PrivacyError(problem)
        return vector

    def reveal(
        self,
        keyed: Sequence[str],
        shares: Mapping[str, list[SealedShare]],
        survivors: Sequence[str],
        upcoming: str = "",
        next_status: ConfigRecord | None = None,
    ) -> Revealed:
        """Step 3: survivors and dropped (keyed, no masked update) sites named; each
        survivor gets the shares the other survivors dealt it (and, in a round announced
        ahead, every survivor's model statement); its reveal back. With `upcoming` (the
        next round's signed announcement), each survivor's advertisement of fresh keys
        for it too (by site, as JSON); with `next_status` (the next round's status query),
        each survivor's status, as a status reply (by node)."""
        dropped = sorted(set(keyed) - set(survivors))
        statements = (
            {}
            if self.announcement.model_sha256
            else {"statements": {s: self.statements[s] for s in survivors}}
        )
        contents = {}
        for site in survivors:
            request: dict[str, object] = {
                "survivors": list(survivors),
                "dropped": dropped,
                "shares": [
                    item.to_json()
                    for owner in survivors
                    if owner != site
                    for item in shares[owner]
                    if item.holder == site
                ],
                **statements,
            }
            if upcoming:
                request["next"] = upcoming
            contents[site] = self.step_content(dumps(request))
            if next_status is not None:
                contents[site][wire.NEXT_STATUS] = next_status
        replies = self.exchange("reveal", contents, wire.SECAGG_REVEAL, self.study.round_timeout_s)
        reveals: list[Reveal] = []
        adverts: dict[str, object] = {}
        statuses: dict[int, Message] = {}
        for site, reply in replies.items():
            if next_status is not None and wire.METRICS in reply.content.metric_records:
                statuses[self.by_site[site]] = reply
            try:
                raw = loads(site_text(reply), "reveal")
                if isinstance(raw, dict) and upcoming and "advertisement" in raw:
                    adverts[site] = raw.pop("advertisement")
                reveal = reveal_from_json(raw)
                if reveal.holder != site:
                    raise PrivacyError("the reveal names another holder")
            except (PrivacyError, wire.WireError) as exc:
                log.warning("round %d: reveal of %s set aside: %s", self.round_number, site, exc)
                adverts.pop(site, None)
                continue
            reveals.append(reveal)
        return Revealed(reveals, adverts, statuses)


def sealed_shares(reply: Message, site: str, holders: set[str]) -> list[SealedShare]:
    """The sealed shares a site dealt: exactly one, its own, for each other keyed site."""
    raw = loads(site_text(reply), "shares")
    if not isinstance(raw, list):
        raise PrivacyError("shares: expected a list")
    sealed = [SealedShare.from_json(item) for item in raw]
    if any(item.owner != site for item in sealed) or sorted(
        item.holder for item in sealed
    ) != sorted(holders):
        raise PrivacyError("shares: one sealed share for each other keyed site is needed")
    return sealed


def run_secure_round(
    grid: Grid,
    study: StudySettings,
    *,
    run_id: str,
    round_number: int,
    global_arrays: Mapping[str, np.ndarray],
    model_sha256: str,
    plan: RoundPlan,
    senders: Mapping[int, Sender],
    contents: Mapping[int, RecordDict],
    signer: SigningKey,
    site_keys: Mapping[str, VerifyKey] | None,
    unknown_reasons: Mapping[int, str] | None = None,
    ahead: Ahead | None = None,
    deal_ahead: bool = False,
    next_status: ConfigRecord | None = None,
) -> SecureOutcome:
    """Play one secure round with the planned sites; raise `RoundFailedError` when fewer
    than the threshold get through (nothing is unmasked then). `unknown_reasons` says,
    per planned node of unknown status, why (named in the failure).

    With `ahead` (keys the sites dealt during the round before) that fits this round's
    plan, the round skips its keys exchange. With `deal_ahead`, the reveal also announces
    the next round to this round's survivors and brings their fresh keys for it back; with
    `next_status` (the next round's status query), their statuses too."""
    nodes = {p.node_id: senders[p.node_id].site_id for p in plan.planned if p.node_id in senders}
    why = {
        p.node_id: (unknown_reasons or {}).get(p.node_id, f"{p.site_id}: status unknown")
        for p in plan.planned
        if p.node_id not in senders
    }
    if len(nodes) < 2:
        known = ", ".join(sorted(nodes.values())) or "none"
        raise RoundFailedError(
            f"round {round_number}: secure aggregation needs at least 2 sites of known"
            f" identity; known: {known}; not known: " + ("; ".join(why.values()) or "none")
        )
    threshold = secure_threshold(study, len(nodes))
    if threshold > len(nodes):
        raise RoundFailedError(
            f"round {round_number}: {len(nodes)} sites planned, secure aggregation needs"
            f" {threshold}"
        )
    try:
        announcement = Announcement(
            run_id=run_id,
            study_sha256=study.sha256(),
            round=round_number,
            model_sha256=model_sha256,
            sites=tuple(sorted(nodes.values())),
            threshold=threshold,
            clip=study.secagg_clip,
            weight_cap=max(1, max(senders[n].patients for n in nodes)),
        )
    except PrivacyError as exc:
        raise RoundFailedError(f"round {round_number}: {exc}") from exc
    # Keys dealt ahead serve when the plan is the one announced and every site dealt some;
    # else (a site changed, a reveal's keys were lost) the round is announced anew.
    dealt = (
        ahead is not None
        and ahead.fits(announcement)
        and set(ahead.adverts) >= set(ahead.announcement.sites)
    )
    if ahead is not None and not dealt:
        log.info("round %d: not as announced ahead (sites, weights or keys); announced anew",
                 round_number)  # fmt: skip
    if ahead is not None and dealt:
        announcement, signed_text = ahead.announcement, ahead.signed_text
    else:
        signed_text = SignedAnnouncement.sign(announcement, signer).to_text()
    secure = SecureRound(
        grid,
        study,
        announcement,
        signed_text,
        {site: node for node, site in nodes.items()},
        None
        if site_keys is None
        else ReceiptCheck(run_id, announcement.study_sha256, round_number, model_sha256, site_keys),
        {
            p.site_id: "its status is unknown (" + why[p.node_id] + "): a secure round needs"
            " each site's identity first"
            for p in plan.planned
            if p.node_id not in senders
        },
        model_sha256,
    )
    adverts = secure.keys_dealt_ahead(ahead) if ahead is not None and dealt else secure.keys()
    updates, shares, masked = secure.train(adverts, contents, global_arrays, senders)
    survivors = sorted(masked)
    upcoming = _next_announcement(announcement, survivors, study, signer) if deal_ahead else None
    revealed = secure.reveal(
        sorted(adverts), shares, survivors, "" if upcoming is None else upcoming[1], next_status
    )
    reveals = revealed.reveals
    try:
        total = unmask_weighted_sum(announcement, adverts, masked, reveals)
    except SecAggAbort as exc:
        reasons = "; ".join(f"{site}: {why}" for site, why in sorted(secure.rejected.items()))
        raise RoundFailedError(
            f"round {round_number}: secure aggregation aborted ({exc}); nothing was unmasked"
            + (f" ({reasons})" if reasons else "")
        ) from exc
    except PrivacyError as exc:
        raise RoundFailedError(f"round {round_number}: secure aggregation failed: {exc}") from exc
    survived = [updates[site] for site in survivors]
    averaged, trained_by = _average(global_arrays, total, survived, announcement.weight_cap)
    rejected = {site: reason[:400] for site, reason in secure.rejected.items()}
    digests = {site: masked_sha256(masked[site]) for site in survivors}
    return SecureOutcome(
        survived, rejected, averaged, trained_by, announcement.sha256(), digests,
        None if upcoming is None else Ahead(upcoming[0], upcoming[1], revealed.adverts),
        2 if dealt else 3,
        revealed.statuses,
    )  # fmt: skip


def _next_announcement(
    current: Announcement, survivors: Sequence[str], study: StudySettings, signer: SigningKey
) -> tuple[Announcement, str] | None:
    """The next round announced to this round's survivors (no model yet), signed; None
    when they are too few for a secure round."""
    threshold = secure_threshold(study, len(survivors))
    if len(survivors) < 2 or threshold > len(survivors):
        return None
    upcoming = Announcement(
        run_id=current.run_id,
        study_sha256=current.study_sha256,
        round=current.round + 1,
        model_sha256="",
        sites=tuple(sorted(survivors)),
        threshold=threshold,
        clip=current.clip,
        weight_cap=current.weight_cap,
    )
    return upcoming, SignedAnnouncement.sign(upcoming, signer).to_text()


def _average(
    global_arrays: Mapping[str, np.ndarray],
    total: np.ndarray,
    survivors: Sequence[SiteUpdate],
    weight_cap: int,
) -> tuple[Arrays, dict[str, list[str]]]:
    """global + sum / (sum of weights of the sites that trained the group), per group."""
    averaged: Arrays = {}
    trained_by: dict[str, list[str]] = {}
    offset = 0
    for name in sorted(global_arrays):
        reference = global_arrays[name]
        part = total[offset : offset + reference.size].reshape(reference.shape)
        offset += reference.size
        group = parameter_group(name)
        takers = [u for u in survivors if group in u.trained_groups and u.num_examples > 0]
        trained_by[group] = sorted(u.site_id for u in takers)
        weight = sum(min(u.num_examples, weight_cap) / weight_cap for u in takers)
        if weight <= 0:
            averaged[name] = np.array(reference, copy=True)
            continue
        averaged[name] = (reference.astype(np.float64) + part / weight).astype(reference.dtype)
    return averaged, trained_by
