"""`medfed report`: the page of a run folder that the real round loop wrote (over fake
sites), parsed back: its plots hold the run's points, its timeline the sites' fates,
its model card the model the sites were last sent; a tampered chain fails it."""

from __future__ import annotations

import json
import re
import sqlite3
from html.parser import HTMLParser
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medfed.cli import app
from medfed.coordinator.results import RunResults, write_results
from medfed.model.network import arrays_sha256
from tests.fakesites import FakeGrid, consortium, run, study

pytestmark = pytest.mark.usefixtures("server_identity")


class Page(HTMLParser):
    """The page's SVG charts (title, polyline point counts) and timeline cells."""

    def __init__(self) -> None:
        super().__init__()
        self.charts: list[dict[str, object]] = []
        self.cells: list[tuple[str, str]] = []
        self.scripts = 0
        self.external: list[str] = []
        self._cell_class: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        named = dict(attrs)
        if tag == "script":
            self.scripts += 1
        for key in ("src", "href"):
            if named.get(key):
                self.external.append(str(named[key]))
        if tag == "svg":
            self.charts.append({"title": named.get("aria-label"), "lines": []})
        if tag == "polyline":
            points = str(named.get("points", "")).split()
            self.charts[-1]["lines"].append(len(points))  # type: ignore[attr-defined]
        if tag == "td" and named.get("class"):
            self._cell_class = named["class"]

    def handle_data(self, data: str) -> None:
        if self._cell_class is not None:
            self.cells.append((self._cell_class, data))
            self._cell_class = None


def run_folder(tmp_path: Path) -> tuple[Path, FakeGrid]:
    # Every site answers its status query, so each is planned under its own name.
    grid = FakeGrid(consortium(**{"9001": {"status": {}}}))
    settings = study(tmp_path, num_server_rounds=3, strategy="fedavg")

    def report(results: RunResults) -> None:
        write_results(tmp_path / "results.json", results)

    run(grid, settings, report=report)
    return tmp_path, grid


def test_the_report_plots_every_round_and_site_and_carries_the_lineage(tmp_path: Path) -> None:
    folder, grid = run_folder(tmp_path / "run")
    out = tmp_path / "report.html"

    result = CliRunner().invoke(app, ["report", str(folder), "--out", str(out), "--json"])

    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["audit_verified"] is True and document["rounds_completed"] == 3
    html = out.read_text(encoding="utf-8")
    page = Page()
    page.feed(html)
    assert page.scripts == 0 and page.external == []  # self-contained
    charts = {str(chart["title"]): chart["lines"] for chart in page.charts}
    # The initial model plus three rounds; a line per site for per-site metrics.
    assert charts["Loss per round"] == [4, 3]
    assert charts["Held-out AUROC per round, over all sites and per site"] == [4, 3, 3, 3]
    assert charts["Epsilon spent per site (delta 1e-05)"] == [3, 3, 3]
    assert sorted(page.cells) == sorted(
        [("trained", "trained (6)")] * 9
    )  # every site, every round, with the steps the scheduler gave it
    # The model card names the model the sites were last sent, and the audit check.
    assert arrays_sha256(grid.final_model()) in html
    assert re.search(r"\d+ entries verified", html)


def test_a_tampered_audit_chain_fails_the_report(tmp_path: Path) -> None:
    folder, _ = run_folder(tmp_path / "run")
    chain = folder / "audit.jsonl"
    lines = chain.read_bytes().split(b"\n")
    chain.write_bytes(b"\n".join([lines[0], *lines[2:]]))

    result = CliRunner().invoke(app, ["report", str(folder), "--out", str(tmp_path / "r.html")])

    assert result.exit_code == 1
    assert "audit chain: FAILS at entry 2" in result.stderr
    assert "FAILS at entry 2" in (tmp_path / "r.html").read_text(encoding="utf-8")


def test_a_folder_without_results_is_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["report", str(tmp_path), "--out", str(tmp_path / "r.html")])

    assert result.exit_code == 1
    assert "results.json: missing" in result.stderr
    assert "Traceback" not in result.output


def test_a_chain_whose_tail_was_cut_fails_the_report_and_audit_verify(tmp_path: Path) -> None:
    """Red-team row "truncation": `run.finished` removed leaves a valid, shorter chain; the
    signed head kept in the checkpoint database shows the cut."""
    folder, _ = run_folder(tmp_path / "run")
    chain = folder / "audit.jsonl"
    lines = chain.read_bytes().split(b"\n")[:-1]
    assert json.loads(lines[-1])["event"] == "run.finished"
    chain.write_bytes(b"\n".join(lines[:-1]) + b"\n")
    key = folder / "coordinator-signing.pub"

    report = CliRunner().invoke(app, ["report", str(folder), "--out", str(tmp_path / "r.html")])
    verify = CliRunner().invoke(app, ["audit", "verify", str(chain), "--key", str(key)])

    assert report.exit_code == 1
    assert "its tail was cut" in report.stderr
    assert verify.exit_code == 1 and "its tail was cut" in verify.stderr


def test_without_its_head_a_finished_run_must_end_its_chain(tmp_path: Path) -> None:
    folder, _ = run_folder(tmp_path / "run")
    chain = folder / "audit.jsonl"
    lines = chain.read_bytes().split(b"\n")[:-1]
    chain.write_bytes(b"\n".join(lines[:-1]) + b"\n")
    with sqlite3.connect(folder / "checkpoints.db") as db:
        db.execute("DELETE FROM audit_head")

    report = CliRunner().invoke(app, ["report", str(folder), "--out", str(tmp_path / "r.html")])

    assert report.exit_code == 1
    assert "does not end with run.finished" in report.stderr


def test_a_run_without_secure_aggregation_says_so_in_its_chain(tmp_path: Path) -> None:
    folder, _ = run_folder(tmp_path / "run")
    events = [
        json.loads(line)["event"] for line in (folder / "audit.jsonl").read_text().splitlines()
    ]
    assert events.count("secure_aggregation.off") == 1
    assert events.index("secure_aggregation.off") < events.index("round.planned")
