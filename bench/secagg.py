"""Secure aggregation's cost beside a plain float32 sum, in-process.

For each (sites, parameters): one round of `privacy.secagg.run_round` (key agreement,
Shamir dealing, fixed-point encoding, masking at every site, share reveal and unmasking
at the coordinator, decoding), timed whole and with one site's own masking timed apart;
beside it, the plain float32 sum of the same updates. Bytes per site are what one site
uploads: its update as Flower's `Array` (npy) bytes, and with SecAgg its masked vector
packed to the smallest unsigned dtype that holds the modulus, plus its public key and the
Shamir shares it deals. Prints figures; never passes or fails on them.

In a deployment the sites mask in parallel, so a round's added time is about one site's
masking plus the coordinator's unmasking (`critical_path_s`), not the serial total.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
from flwr.app import Array

from privacy import secagg
from privacy.errors import SecAggAbort

MODULUS = 2**32
"""Z_m with m = 2**32: masked values fit uint32, so the upload is the float32 size; with
10 sites and clip 1 the fixed-point step is 2 * 10 / 2**32 (about 5e-9), far below float32's
own rounding of an update."""
CLIP = 1.0
SHARE_BYTES = 2 * 66 + 16
"""One Shamir share on the wire: x and y (a 521-bit field element) and its header."""


@dataclass(frozen=True)
class Options:
    """What to measure: every (sites, parameters) pair, `repeats` times each."""

    sites: Sequence[int]
    params: Sequence[int]
    repeats: int = 1
    seed: int = 0


def _median(values: Sequence[float]) -> float:
    return float(np.median(np.asarray(values)))


def _upload_bytes(vector: np.ndarray) -> int:
    return len(Array.from_numpy_ndarray(vector).data)


def packed(masked: secagg.Vector, modulus: int) -> np.ndarray:
    """The masked vector in the smallest unsigned dtype that holds every element of Z_m."""
    for dtype in (np.uint16, np.uint32):
        if modulus - 1 <= np.iinfo(dtype).max:
            return masked.astype(dtype)
    return masked


def _one_site_masking_s(update: np.ndarray, n_sites: int, run_id: str) -> tuple[float, int]:
    """Seconds one site spends encoding and masking (pairwise seeds with every other site),
    and the bytes of its packed masked vector."""
    names = [f"site-{i:02d}" for i in range(n_sites)]
    keys = {name: secagg.RoundKeys.generate(name) for name in names}
    public = {name: k.public_key for name, k in keys.items()}
    start = time.perf_counter()
    seeds = secagg.pairwise_seeds(keys[names[0]], public, run_id=run_id)
    masked = secagg.mask_update(
        secagg.encode(update, clip=CLIP, max_sites=n_sites, modulus=MODULUS),
        site_id=names[0],
        self_mask_seed=keys[names[0]].self_mask_seed,
        pairwise_seeds=seeds,
        round_number=1,
        modulus=MODULUS,
    )
    elapsed = time.perf_counter() - start
    return elapsed, _upload_bytes(packed(masked, MODULUS))


def measure(n_sites: int, n_params: int, *, repeats: int, seed: int) -> dict[str, object]:
    """One row of the benchmark: times and bytes with and without SecAgg."""
    rng = np.random.default_rng(seed)
    updates = {
        f"site-{i:02d}": rng.uniform(-0.1, 0.1, n_params).astype(np.float32) for i in range(n_sites)
    }
    plain_s, secagg_s, site_s = [], [], []
    threshold = n_sites // 2 + 1
    error = 0.0
    masked_bytes = 0
    for _ in range(repeats):
        start = time.perf_counter()
        plain = np.sum(np.stack(list(updates.values())), axis=0, dtype=np.float32)
        plain_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        total = secagg.run_round(
            updates, drop_after_masking=frozenset(), threshold=threshold, clip=CLIP,
            modulus=MODULUS, run_id="bench", round_number=1,
        )  # fmt: skip
        secagg_s.append(time.perf_counter() - start)
        if isinstance(total, SecAggAbort):
            raise RuntimeError(f"unexpected abort: {total}")
        error = max(error, float(np.max(np.abs(total - plain.astype(np.float64)))))
        elapsed, masked_bytes = _one_site_masking_s(updates["site-00"], n_sites, "bench")
        site_s.append(elapsed)
    plain_bytes = _upload_bytes(updates["site-00"])
    secagg_upload = masked_bytes + 32 + 2 * n_sites * SHARE_BYTES
    server_s = max(_median(secagg_s) - n_sites * _median(site_s), 0.0)
    return {
        "sites": n_sites,
        "params": n_params,
        "threshold": threshold,
        "plain_sum_s": round(_median(plain_s), 5),
        "secagg_round_serial_s": round(_median(secagg_s), 4),
        "secagg_one_site_masking_s": round(_median(site_s), 4),
        "secagg_coordinator_s_estimate": round(server_s, 4),
        "critical_path_s": round(_median(site_s) + server_s, 4),
        "upload_bytes_plain": plain_bytes,
        "upload_bytes_secagg_masked_vector": masked_bytes,
        "upload_bytes_secagg_total": secagg_upload,
        "upload_ratio_secagg_to_float32": round(secagg_upload / plain_bytes, 4),
        "max_abs_error_vs_plain_sum": error,
    }


def run_benchmark(options: Options) -> dict[str, object]:
    """Every (sites, params) row, and the machine it ran on."""
    rows = [
        measure(n, p, repeats=options.repeats, seed=options.seed)
        for p in options.params
        for n in options.sites
    ]
    return {
        "benchmark": "secagg",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "modulus": MODULUS,
        "clip": CLIP,
        "rows": rows,
    }
