"""The signed train replies a site sent, kept so that a re-sent instruction gets the very
same reply again, spending nothing.

A coordinator restarted mid-round re-sends the train instruction of a (run, round) that
a site may already have trained. Training it again would spend privacy twice, and
refusing it loses the site's update for that round; resending the stored reply (the
same arrays, receipt signature and metrics) does neither. Only the identical
instruction is answered so: the same run, round and model SHA-256. A different model
for the same run and round finds no stored reply here, and the trainer refuses it.

Layout: `<directory>/<sha256(run_id)[:32]>/round-<n>.npz` (the arrays, `np.savez`,
read back with `allow_pickle=False`) and `round-<n>.json` (everything else, and the
.npz's SHA-256). Both are written to a temporary file and renamed, the .json last: a
reply is stored only once its .json is there. Only the last `keep_runs` runs are kept.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from medfed.client.protocol import HeldOut, ModelCheck, TrainReply, TrainRequest
from medfed.common import write_atomic

log = logging.getLogger(__name__)

FORMAT = 2
"""The stored layout's version; a file of another version is ignored, never guessed at."""

DEFAULT_KEEP_RUNS = 8
"""Runs whose replies are kept: a resumed run is the latest or one of the few before."""


def _hex(value: float) -> str:
    """A float exactly, NaN and infinities included (JSON has no NaN)."""
    return float(value).hex()


def instruction_sha256(request: TrainRequest) -> str:
    """A digest of everything in `request` but its arrays (which `model_sha256` names)."""
    fields = {
        name: _hex(value) if isinstance(value, float) else value
        for name, value in vars(request).items()
        if name not in ("arrays", "secagg")  # secagg: fresh keys each attempt, same update
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _arrays_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, *arrays.values())  # stored as arr_0, arr_1, ... in this order
    return buffer.getvalue()


class ReplyCache:
    """Train replies by (run, round), for the identical instruction only."""

    def __init__(self, directory: Path, *, keep_runs: int = DEFAULT_KEEP_RUNS) -> None:
        if keep_runs < 1:
            raise ValueError(f"keep_runs must be at least 1, got {keep_runs}")
        self._directory = directory
        self._keep_runs = keep_runs

    def _paths(self, run_id: str, round_number: int) -> tuple[Path, Path]:
        run_dir = self._directory / hashlib.sha256(run_id.encode()).hexdigest()[:32]
        return run_dir / f"round-{round_number}.npz", run_dir / f"round-{round_number}.json"

    def put(self, request: TrainRequest, reply: TrainReply) -> None:
        """Store `reply` to `request` (call it before the reply leaves the site)."""
        npz_path, json_path = self._paths(request.run_id, request.round)
        npz_path.parent.mkdir(parents=True, exist_ok=True)
        data = _arrays_bytes(reply.arrays)
        held_out = reply.incoming.held_out
        document = {
            "format": FORMAT,
            "run_id": request.run_id,
            "round": request.round,
            "model_sha256": request.model_sha256,
            "instruction_sha256": instruction_sha256(request),
            "arrays_npz_sha256": hashlib.sha256(data).hexdigest(),
            "names": list(reply.arrays),
            "site_id": reply.site_id,
            "local_loss": _hex(reply.local_loss),
            "epsilon": _hex(reply.epsilon),
            "noise_multiplier": _hex(reply.noise_multiplier),
            "receipt_signature": reply.receipt_signature,
            "trained_groups": reply.trained_groups,
            "dataset_sha256": reply.dataset_sha256,
            "train_examples": reply.incoming.train_examples,
            "train_loss": _hex(reply.incoming.train_loss),
            "held_out": {
                "examples": held_out.examples,
                "loss": _hex(held_out.loss),
                "auroc": _hex(held_out.auroc),
                "accuracy": _hex(held_out.accuracy),
                "c_index": _hex(held_out.c_index),
                "rmse": _hex(held_out.rmse),
            },
        }
        write_atomic(npz_path, data)
        write_atomic(json_path, json.dumps(document, sort_keys=True).encode())
        self._prune(keep=npz_path.parent)

    def get(self, request: TrainRequest) -> TrainReply | None:
        """The reply stored for this very instruction (same run, round, model and
        settings), or None: none stored, another instruction, or a stored reply that does
        not read back whole (logged; the trainer then decides, as if nothing were stored)."""
        npz_path, json_path = self._paths(request.run_id, request.round)
        if not json_path.exists():
            return None
        try:
            document = json.loads(json_path.read_bytes())
            if (
                document.get("format") != FORMAT
                or document.get("run_id") != request.run_id
                or document.get("round") != request.round
            ):
                raise ValueError("it names another format, run or round")
            if document.get("instruction_sha256") != instruction_sha256(request):
                log.warning(
                    "run %s round %d was answered for another instruction (model %.12s,"
                    " now %.12s)", request.run_id, request.round,
                    document.get("model_sha256"), request.model_sha256,
                )  # fmt: skip
                return None
            return self._reply(document, npz_path.read_bytes())
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("stored reply %s is unreadable, ignored: %s", json_path, exc)
            return None

    @staticmethod
    def _reply(document: dict[str, Any], data: bytes) -> TrainReply:
        if hashlib.sha256(data).hexdigest() != document["arrays_npz_sha256"]:
            raise ValueError("its arrays file does not match its SHA-256")
        names = [str(name) for name in document["names"]]
        with np.load(io.BytesIO(data), allow_pickle=False) as stored:
            if sorted(stored.files) != sorted(f"arr_{index}" for index in range(len(names))):
                raise ValueError("its arrays file holds other arrays than it names")
            arrays = {name: stored[f"arr_{index}"] for index, name in enumerate(names)}
        held_out = document["held_out"]
        return TrainReply(
            site_id=str(document["site_id"]),
            arrays=arrays,
            local_loss=float.fromhex(document["local_loss"]),
            epsilon=float.fromhex(document["epsilon"]),
            noise_multiplier=float.fromhex(document["noise_multiplier"]),
            receipt_signature=str(document["receipt_signature"]),
            incoming=ModelCheck(
                train_examples=int(document["train_examples"]),
                train_loss=float.fromhex(document["train_loss"]),
                held_out=HeldOut(
                    examples=int(held_out["examples"]),
                    loss=float.fromhex(held_out["loss"]),
                    auroc=float.fromhex(held_out["auroc"]),
                    accuracy=float.fromhex(held_out["accuracy"]),
                    c_index=float.fromhex(held_out["c_index"]),
                    rmse=float.fromhex(held_out["rmse"]),
                ),
            ),
            trained_groups=str(document["trained_groups"]),
            dataset_sha256=str(document["dataset_sha256"]),
        )

    def _prune(self, *, keep: Path) -> None:
        """Remove all but the `keep_runs` most recently written runs (`keep` stays)."""
        runs = [path for path in self._directory.iterdir() if path.is_dir() and path != keep]
        runs.sort(key=lambda path: path.stat().st_mtime, reverse=True)
        for stale in runs[self._keep_runs - 1 :]:
            shutil.rmtree(stale, ignore_errors=True)
