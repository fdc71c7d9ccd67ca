"""Calibration runs as the site trains: its accelerator, precision and grad-sample mode."""

from __future__ import annotations

from pathlib import Path

import pytest

from medfed.client.throughput import ThroughputCache, TrainingSetup, calibrate
from medfed.model.contract import DEMO_CONTRACT
from medfed.model.devices import BACKENDS
from medfed.model.errors import DeviceUnavailableError
from medfed.model.network import model_identity


def test_the_setup_key_names_every_choice() -> None:
    assert TrainingSetup().key() == "cpu/fp32/bk"
    setup = TrainingSetup("cuda", "bf16", "ghost", physical_batch_size=64)
    assert setup.key() == "cuda/bf16/ghost/pb64"


@pytest.mark.skipif(BACKENDS["cuda"].is_available(), reason="a CUDA device is present")
def test_an_unavailable_accelerator_is_never_measured_on_the_cpu(tmp_path: Path) -> None:
    with pytest.raises(DeviceUnavailableError, match="cuda"):
        ThroughputCache(tmp_path).get("tiny", DEMO_CONTRACT, TrainingSetup(accelerator="cuda"))
    assert not (tmp_path / "throughput.json").exists()


def test_each_setup_is_measured_and_cached_apart(tmp_path: Path) -> None:
    cache = ThroughputCache(tmp_path)
    bf16 = TrainingSetup(precision="bf16", physical_batch_size=16)
    assert cache.cached("tiny", DEMO_CONTRACT, bf16) is None
    measured = cache.get("tiny", DEMO_CONTRACT, bf16)
    assert measured > 0
    assert cache.cached("tiny", DEMO_CONTRACT, bf16) == measured
    assert cache.cached("tiny", DEMO_CONTRACT, TrainingSetup()) is None
    identity = model_identity("tiny", DEMO_CONTRACT)
    assert (tmp_path / "throughput.json").read_text().count(f"{identity}@cpu/bf16/bk/pb16") == 1


def test_calibration_runs_an_opacus_mode_too() -> None:
    assert calibrate("tiny", DEMO_CONTRACT, TrainingSetup(grad_sample_mode="hooks")) > 0
