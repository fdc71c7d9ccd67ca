"""`medfed bench dp`: its memory probe against a known allocation, its figures, its CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from medfed.bench.dp import DpBenchConfig, _reset_peak_rss, _status_bytes, measure_variant
from medfed.cli import app

pytestmark = [
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
]


def test_the_peak_probe_sees_a_known_allocation_after_a_reset() -> None:
    _reset_peak_rss()
    baseline = _status_bytes("VmRSS")
    block = np.ones(64 * 2**20 // 8)  # 64 MiB, every page touched
    del block
    peak = _status_bytes("VmHWM") - baseline
    assert 60 * 2**20 < peak < 200 * 2**20
    _reset_peak_rss()
    assert _status_bytes("VmHWM") - _status_bytes("VmRSS") < 16 * 2**20  # the reset works


@pytest.mark.parametrize("variant", ["plain", "hooks"])
def test_a_variant_reports_its_steps_and_memory(variant: str) -> None:
    config = DpBenchConfig(preset="tiny", batch=4, steps=2, warmup_steps=1, modes=("hooks",))
    figures = measure_variant(config, variant)  # type: ignore[arg-type]
    assert len(figures.step_s) == 2
    assert figures.step_s_median > 0 and figures.cpu_s_median > 0
    assert figures.peak_bytes >= 0
    assert figures.parameters > 10_000


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--preset", "huge"], "unknown preset 'huge'"),
        (["--mode", "vmap"], "unknown grad-sample mode 'vmap'"),
        (["--device", "npu"], "unknown device 'npu'"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(arguments: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["bench", "dp", *arguments, "--json"])
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_bad_sizes_are_usage_errors() -> None:
    result = CliRunner().invoke(app, ["bench", "dp", "--steps", "0"])
    assert result.exit_code == 2


@pytest.mark.slow
def test_bench_dp_prints_one_json_document_with_the_ratios() -> None:
    result = CliRunner().invoke(
        app,
        ["bench", "dp", "--preset", "tiny", "--steps", "1", "--batch", "4", "--repeats", "1",
         "--mode", "hooks", "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    plain, hooks = report["plain"], report["dp"]["hooks"]
    assert hooks["time_ratio"] == pytest.approx(
        hooks["step_s_median"] / plain["step_s_median"], abs=1e-3
    )
    if plain["peak_bytes_median"] > 0:
        assert hooks["memory_ratio"] == pytest.approx(
            hooks["peak_bytes_median"] / plain["peak_bytes_median"], abs=1e-3
        )
    assert "VmHWM" in report["memory_method"]
    assert report["model"]["parameters"] > 10_000
