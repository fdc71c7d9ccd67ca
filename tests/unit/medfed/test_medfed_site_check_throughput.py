"""`medfed site check --preset`: the scheduler's throughput figure, measured as the site trains."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from medfed.cli import app
from tests.unit.medfed.test_medfed_site_check import SITE_TOML, STUDY_TOML

runner = CliRunner()


def _site(tmp_path: Path, training: str) -> Path:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "site.key").write_text("k")
    (tmp_path / "keys" / "officer.pub").write_text("k")
    (tmp_path / "site.toml").write_text(SITE_TOML + training)
    (tmp_path / "study.toml").write_text(STUDY_TOML)
    rows = [f"p{i},{40 + i},{90 + i},{i % 2}" for i in range(30)]
    (tmp_path / "clinic.csv").write_text("mrn,age,glu,readmit\n" + "\n".join(rows) + "\n")
    return tmp_path


def _check(site: Path, *extra: str) -> tuple[int, str]:
    arguments = ["site", "check", str(site / "site.toml"), "--study", str(site / "study.toml")]
    result = runner.invoke(app, [*arguments, *extra])
    return result.exit_code, result.output


def test_the_figure_is_measured_with_the_sites_training_setup(tmp_path: Path) -> None:
    site = _site(tmp_path, '\n[training]\nprecision = "bf16"\n')
    code, output = _check(site, "--preset", "tiny", "--json")
    assert code == 0, output
    figure = json.loads(output)["throughput"]
    assert figure["preset"] == "tiny" and figure["setup"] == "cpu/bf16/bk"
    assert figure["samples_per_s"] > 0
    cache = json.loads((site / "state" / "throughput.json").read_text())
    (key,) = cache  # the figure is cached under the model and the site's setup
    assert key.endswith("@cpu/bf16/bk") and round(cache[key], 3) == figure["samples_per_s"]


def test_without_a_preset_nothing_is_measured(tmp_path: Path) -> None:
    code, output = _check(_site(tmp_path, ""), "--json")
    assert code == 0 and json.loads(output)["throughput"] is None


def test_a_bad_preset_or_training_key_is_one_line(tmp_path: Path) -> None:
    site = _site(tmp_path, '\n[training]\ngrad_sample_mode = "hooks"\nphysical_batch_size = 8\n')
    code, output = _check(site)
    assert code == 1 and "physical_batch_size needs grad_sample_mode" in output
    assert "Traceback" not in output
    code, output = _check(site, "--preset", "huge")
    assert code == 2 and "unknown preset 'huge'" in output
