"""`medfed bench dp`: its memory probe against a known allocation, its figures, its CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from medfed.bench.dp import (
    DpBenchConfig,
    _reset_peak_rss,
    _status_bytes,
    assumed_peak,
    measure_variant,
    parse_arguments,
)
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


@pytest.mark.parametrize("variant", ["plain", "bk", "hooks"])
def test_a_variant_reports_its_steps_and_memory(variant: str) -> None:
    config = DpBenchConfig(preset="tiny", batch=4, steps=2, warmup_steps=1, modes=("hooks",))
    figures = measure_variant(config, variant)  # type: ignore[arg-type]
    assert len(figures.step_s) == 2
    assert figures.step_s_median > 0 and figures.cpu_s_median > 0
    assert figures.peak_bytes >= 0
    assert figures.parameters > 10_000
    # The bench contract's patients read 1 fusion token + 8 numeric + 2 codes + 32 genes
    # + 48 SMILES + 64 residue positions each.
    assert figures.tokens_per_step == 4 * (1 + 8 + 2 + 32 + 48 + 64)
    assert (figures.model_flops_per_step > 0) == (variant == "plain")


def test_the_counted_flops_are_at_least_six_per_weight_and_token() -> None:
    config = DpBenchConfig(preset="tiny", batch=4, steps=1, warmup_steps=0, modes=("bk",))
    figures = measure_variant(config, "plain")
    # Every token passes every fusion block's matmuls: 2 FLOPs per weight forward, 4 back.
    hidden, blocks = 32, 2
    block_weights = blocks * (4 * hidden * hidden + 2 * 2 * hidden * hidden)
    assert figures.model_flops_per_step >= 6 * block_weights * figures.tokens_per_step


def test_the_peak_is_stated_and_only_assumed_where_known() -> None:
    cpu = DpBenchConfig()
    assert assumed_peak(cpu, "cpu")[0] is None
    gpu = DpBenchConfig(device="cuda", precision="bf16")
    peak, source = assumed_peak(gpu, "NVIDIA H200")
    assert peak == 989e12 and "H200" in source
    assert assumed_peak(gpu, "Some New Accelerator")[0] is None
    given = DpBenchConfig(device="cuda", peak_tflops=500.0)
    assert assumed_peak(given, "NVIDIA H200")[0] == 500e12


def test_the_module_parses_its_options_and_help_runs_nothing() -> None:
    config = parse_arguments(["--preset", "base", "--precision", "bf16", "--mode", "bk"])
    assert (config.preset, config.precision, config.modes) == ("base", "bf16", ("bk",))
    done = subprocess.run(
        [sys.executable, "-m", "medfed.bench.dp", "--help"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0 and "--precision" in done.stdout
    assert "repeat" not in done.stderr  # no benchmark started


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--preset", "huge"], "unknown preset 'huge'"),
        (["--mode", "vmap"], "unknown grad-sample mode 'vmap'"),
        (["--device", "npu"], "unknown device 'npu'"),
        (["--precision", "fp8"], "unknown precision 'fp8'"),
        (["--mode", "hooks", "--physical-batch", "4"], "--physical-batch runs with --mode bk"),
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
         "--mode", "bk", "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    plain, hooks = report["plain"], report["dp"]["bk"]
    assert hooks["time_ratio"] == pytest.approx(
        hooks["step_s_median"] / plain["step_s_median"], abs=1e-3
    )
    if plain["peak_bytes_median"] > 0:
        assert hooks["memory_ratio"] == pytest.approx(
            hooks["peak_bytes_median"] / plain["peak_bytes_median"], abs=1e-3
        )
    assert "VmHWM" in report["memory_method"]
    assert report["model"]["parameters"] > 10_000
    assert report["model"]["model_flops_per_step"] > 0 and report["peak_flops_per_s"] is None
    assert hooks["tokens_per_s"] > 0 and hooks["fraction_of_peak"] is None
