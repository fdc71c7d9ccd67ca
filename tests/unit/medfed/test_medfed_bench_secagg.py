"""`medfed bench secagg`: its figures come from a round whose sum matches the plain sum,
its packed upload loses nothing, and bad arguments are usage errors in one line."""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from bench.secagg import MODULUS, packed
from medfed.cli import app


def test_packing_to_uint32_keeps_every_element_of_z_m() -> None:
    rng = np.random.default_rng(1)
    masked = rng.integers(0, MODULUS, size=10_000, dtype=np.uint64)
    small = packed(masked, MODULUS)
    assert small.dtype == np.uint32
    np.testing.assert_array_equal(small.astype(np.uint64), masked)
    assert packed(masked, 2**40).dtype == np.uint64  # too wide to pack: left as it is


def test_the_benchmark_prints_one_json_document_with_both_sides() -> None:
    result = CliRunner().invoke(app, ["bench", "secagg", "--sites", "2,3", "--params", "1e3",
                                      "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert [(row["sites"], row["params"]) for row in document["rows"]] == [(2, 1000), (3, 1000)]
    for row in document["rows"]:
        # The sum SecAgg recovered is the plain float32 sum within fixed-point precision.
        assert row["max_abs_error_vs_plain_sum"] < 1e-6
        assert row["upload_bytes_secagg_masked_vector"] == row["upload_bytes_plain"]


def test_bad_counts_are_usage_errors() -> None:
    for args in (["--sites", "1"], ["--params", "many"]):
        result = CliRunner().invoke(app, ["bench", "secagg", *args])
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output
