"""`medfed bench scale`'s pure parts: the growth exponent against numpy.polyfit, site
counts from the command line, each round's share of the process samples and of the bytes
in a traffic file, the roles of a federation's processes, and the command's arguments.
No federation runs here."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

import medfed.bench.scale
from medfed.bench.scale import (
    RunFigures,
    Sampler,
    ScaleOptions,
    order_of,
    role_of,
    run_scale_bench,
    steady,
    table_lines,
)
from medfed.bench.scale_fit import (
    Sample,
    growth_exponent,
    parse_site_counts,
    per_round,
    ratio,
    round_ends,
    serverapp_threads,
    site_bytes_per_round,
)
from medfed.cli import app
from medfed.coordinator.traffic import ExchangeTraffic, read_traffic


@given(
    st.lists(
        st.tuples(
            st.integers(min_value=1, max_value=10_000),
            st.floats(min_value=1e-6, max_value=1e6, allow_nan=False),
        ),
        min_size=2,
        max_size=12,
        unique_by=lambda point: point[0],
    )
)
def test_the_exponent_is_numpy_polyfit_slope_in_log_log(points: list[tuple[int, float]]) -> None:
    sites = [float(n) for n, _ in points]
    values = [v for _, v in points]
    slope = float(np.polyfit(np.log(sites), np.log(values), 1)[0])
    exponent = growth_exponent(sites, values)
    assert exponent is not None
    assert exponent == pytest.approx(slope, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("power", [0.0, 1.0, 1.5, 2.0])
def test_a_power_law_gives_its_power(power: float) -> None:
    sites = [10.0, 50.0, 100.0, 200.0]
    assert growth_exponent(sites, [3.0 * n**power for n in sites]) == pytest.approx(power)


def test_no_exponent_without_two_usable_site_counts() -> None:
    assert growth_exponent([10.0], [1.0]) is None
    assert growth_exponent([10.0, 10.0], [1.0, 2.0]) is None
    assert growth_exponent([10.0, 50.0], [1.0, 0.0]) is None  # log 0: left out
    assert growth_exponent([10.0, 50.0, 100.0], [1.0, math.nan, 4.0]) == pytest.approx(
        math.log(4) / math.log(10)
    )


def test_site_counts_parse_sorted_and_bounded() -> None:
    assert parse_site_counts("200, 10,50,10", most=256, option="--sites") == (10, 50, 200)
    assert parse_site_counts("", most=16, option="--real") == ()
    for bad in ("0", "3,x", "2.5", "-4", "300"):
        with pytest.raises(ValueError, match="--sites: expected whole numbers from 1 to 256"):
            parse_site_counts(bad, most=256, option="--sites")


def _sample(at: float, serverapp: float, rss: int) -> Sample:
    return Sample(at, {"serverapp": serverapp, "sites": 2 * serverapp}, {"serverapp": rss})


def test_rounds_are_cut_where_the_results_said_they_completed() -> None:
    reports = [(1.0, 0), (4.0, 1), (9.0, 3)]  # round 2's own report was missed
    assert round_ends(reports, 3) == [4.0, 9.0, 9.0]
    assert round_ends([(1.0, 0), (4.0, 1)], 3) == [4.0]  # the run stopped in round 2
    samples = [_sample(2.0, 0.5, 100), _sample(4.0, 0.25, 300), _sample(6.0, 1.0, 200)]
    first, second = per_round(samples, 1.0, [4.0, 8.0])
    assert (first.round, first.seconds, first.cpu_s, first.peak_rss_bytes) == (
        1, 3.0, {"serverapp": 0.75, "sites": 1.5}, {"serverapp": 300},
    )  # fmt: skip
    assert (second.cpu_s, second.peak_rss_bytes) == (
        {"serverapp": 1.0, "sites": 2.0},
        {"serverapp": 200},
    )


def test_ratio_needs_both_figures() -> None:
    assert ratio(3.0, 2.0) == 1.5
    assert ratio(None, 2.0) is None and ratio(1.0, 0.0) is None


@pytest.mark.parametrize(
    ("argv", "role"),
    [
        (["/venv/bin/python3", "/venv/bin/flower-superlink", "--simulation"], "superlink"),
        (["/venv/bin/python3", "/venv/bin/flower-superexec", "--parent-pid", "1"], "superexec"),
        (["/venv/bin/python3", "/venv/bin/flwr-simulation", "--token", "t"], "serverapp"),
        (["/venv/bin/python3", "/venv/bin/flwr-serverapp", "--token", "t"], "serverapp"),
        (["ray::ClientAppActor.run"], "sites"),
        (["ray::DashboardAgent"], "runtime"),
        (["/venv/lib/python3.11/site-packages/ray/core/src/ray/gcs/gcs_server"], "runtime"),
        ([], "runtime"),
    ],
)
def test_each_process_has_its_role(argv: list[str], role: str) -> None:
    assert role_of(argv) == role


def test_the_serverapp_thread_is_told_from_the_simulated_fleet() -> None:
    threads = [
        (100, "flwr-simulation"),  # main: starts Ray and the fleet
        (104, "flwr-simulation"),  # Flower's heartbeat sender
        (106, "flwr-simulation"),  # the ServerApp
        (130, "gcs_client_io_s"),  # Ray's first named thread
        (131, "event_engine"),
        (160, "flwr-simulation"),  # the fleet's message queues and workers
        (162, "flwr-simulation"),
    ]
    assert serverapp_threads(100, threads) == {104, 106}
    assert serverapp_threads(100, [t for t in threads if t[0] < 130]) == {104, 106}
    assert serverapp_threads(100, [(100, "flwr-simulation")]) == set()


def test_the_sampler_reads_cpu_and_memory_of_a_tree() -> None:
    with Sampler({"superlink": os.getpid()}, interval_s=0.05) as sampler:
        spent, deadline = time.process_time() + 0.3, time.monotonic() + 30
        while (time.process_time() < spent or len(sampler.samples) < 3) and (
            time.monotonic() < deadline
        ):
            sum(range(10_000))
    assert len(sampler.samples) >= 3
    assert sum(s.cpu_s.get("runtime", 0.0) for s in sampler.samples) > 0.05
    assert all(s.rss_bytes["runtime"] > 2**20 for s in sampler.samples)


FAKE_SIMULATION = """
import threading, time

def spin(cpu_seconds):
    while time.thread_time() < cpu_seconds:
        pass

renamed = threading.Event()

def named():
    with open(f"/proc/self/task/{threading.get_native_id()}/comm", "w") as comm:
        comm.write("gcs_client_io_s")
    renamed.set()
    time.sleep(30)

server = threading.Thread(target=spin, args=(0.5,))
server.start()
ray = threading.Thread(target=named, daemon=True)
ray.start()
renamed.wait()
fleet = threading.Thread(target=spin, args=(0.5,))
fleet.start()
server.join()
fleet.join()
"""


def test_the_sampler_splits_a_simulation_into_serverapp_and_fleet(tmp_path: Path) -> None:
    script = tmp_path / "flwr-simulation"
    script.write_text(FAKE_SIMULATION)
    process = subprocess.Popen([sys.executable, str(script)])
    try:
        with Sampler({"superlink": process.pid}, interval_s=0.1) as sampler:
            process.wait(timeout=30)
    finally:
        process.kill()
    used = {
        role: sum(sample.cpu_s.get(role, 0.0) for sample in sampler.samples)
        for role in ("serverapp", "simulated_fleet")
    }
    assert used["serverapp"] > 0.2 and used["simulated_fleet"] > 0.2, used


def _figures(
    sites: int, mode: str, round_s: list[float], cpu: list[float], sent: list[int] | None = None
) -> RunFigures:
    """Figures of a run; a site sends `sent[k]` bytes in round k + 1 and receives twice that."""
    figures = RunFigures(sites, mode, simulation=True)  # type: ignore[arg-type]
    figures.rounds = [
        {
            "round": k + 1, "round_s": s, "coordinator_cpu_s": c,
            "coordinator_cpu_s_per_site": c / sites, "coordinator_peak_mib": 400.0 + sites,
            "cpu_s": {}, "peak_mib": {"sites": 10.0 * sites},
            "bytes_per_site": None if sent is None else {"sent": sent[k], "received": 2 * sent[k]},
        }
        for k, (s, c) in enumerate(zip(round_s, cpu, strict=True))
    ]  # fmt: skip
    return figures


def test_bytes_per_site_are_summed_by_round_from_a_traffic_file(tmp_path: Path) -> None:
    """A secure run of 4 sites, one of which dropped in round 2's mask step: every
    exchange of a round counts (its status query too), divided by all 4 sites; the final
    evaluation and a line the run was killed while writing are left out."""
    path = tmp_path / "traffic.jsonl"
    exchanges = [
        ExchangeTraffic("status-1", "query", 4, 4, to_sites_bytes=400, from_sites_bytes=800),
        ExchangeTraffic("1.keys", "secagg.keys", 4, 4, 4000, 1200),
        ExchangeTraffic("1", "train", 4, 4, 40_000, 44_000),
        ExchangeTraffic("1.mask", "secagg.mask", 4, 4, 8000, 40_000),
        ExchangeTraffic("1.reveal", "secagg.reveal", 4, 4, 2000, 6000),
        ExchangeTraffic("status-2", "query", 4, 4, 400, 800),
        ExchangeTraffic("2.keys", "secagg.keys", 4, 4, 4000, 1200),
        ExchangeTraffic("2", "train", 4, 4, 40_000, 44_000),
        ExchangeTraffic("2.mask", "secagg.mask", 4, 3, 8000, 30_000),
        ExchangeTraffic("2.reveal", "secagg.reveal", 3, 3, 1500, 4501),
        ExchangeTraffic("final", "evaluate", 4, 4, 40_000, 2000),
    ]
    torn = ExchangeTraffic("3", "train", 4, 4, 1, 1).to_json()[:25]
    path.write_text("".join(f"{e.to_json()}\n" for e in exchanges) + torn, encoding="utf-8")

    traffic = read_traffic(path)
    assert traffic == exchanges
    assert site_bytes_per_round(traffic, sites=4) == {
        1: {"sent": (800 + 1200 + 44_000 + 40_000 + 6000) // 4,
            "received": (400 + 4000 + 40_000 + 8000 + 2000) // 4},
        2: {"sent": round((800 + 1200 + 44_000 + 30_000 + 4501) / 4),
            "received": round((400 + 4000 + 40_000 + 8000 + 1500) / 4)},
    }  # fmt: skip
    assert site_bytes_per_round([], sites=4) == {}


def test_steady_figures_leave_out_the_first_round() -> None:
    summary = steady(_figures(10, "plain", [9.0, 2.0, 4.0], [1.0, 0.2, 0.4], [900, 200, 400]))
    assert summary is not None
    assert (summary["round_s"], summary["coordinator_cpu_s"], summary["rounds"]) == (
        3.0,
        0.3,
        [2, 3],
    )
    assert summary["bytes_per_site_per_round"] == {"sent": 300, "received": 600}
    one = steady(_figures(10, "plain", [9.0], [1.0]))
    assert one is not None and one["rounds"] == [1]
    assert one["bytes_per_site_per_round"] is None  # no traffic file
    failed = _figures(10, "plain", [9.0], [1.0])
    failed.ok = False
    assert steady(failed) is None


def test_the_bench_fits_each_mode_and_stops_where_a_run_failed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[int, str, bool]] = []

    def fake_measure(
        sites: int, mode: str, *, simulation: bool, options: ScaleOptions
    ) -> RunFigures:
        calls.append((sites, mode, simulation))
        factor = 2.0 if mode == "secure" else 1.0
        figures = _figures(
            sites, mode, [1.0, factor * 0.01 * sites], [1.0, factor * 1e-4 * sites**2],
            [1000, round(1000 * (1.0 if mode == "plain" else 1.5 + 0.01 * sites))],
        )  # fmt: skip
        if sites == 200 and mode == "secure":
            figures.ok, figures.failure = False, "DemoFailedError: the run did not finish"
        return figures

    monkeypatch.setattr(medfed.bench.scale, "measure_run", fake_measure)
    document = run_scale_bench(ScaleOptions(sites=(10, 100, 200, 256), real=(3,)))

    assert [c for c in calls if c[2]] == [
        (10, "plain", True), (10, "secure", True), (100, "secure", True), (100, "plain", True),
        (200, "plain", True), (200, "secure", True),
    ]  # fmt: skip
    assert document["stopped"]["simulation"] == {
        "sites": 200, "mode": "secure", "why": "DemoFailedError: the run did not finish",
        "skipped": [256],
    }  # fmt: skip
    simulation = document["growth_exponents"]["simulation"]
    assert simulation["plain"]["coordinator_cpu_s"] == pytest.approx(2.0)
    assert simulation["plain"]["round_s"] == pytest.approx(1.0)
    assert simulation["secure"]["coordinator_cpu_s"] == pytest.approx(2.0)  # 10 and 100 only
    assert [pair["sites"] for pair in simulation["plain"]["between"]] == [[10, 100], [100, 200]]
    assert simulation["plain"]["between"][1]["coordinator_cpu_s"] == pytest.approx(2.0)
    assert document["simulation"][0]["secure_to_plain"]["round_s"] == 2.0
    assert document["simulation"][1]["secure"]["steady"]["bytes_per_site_per_round"] == {
        "sent": 2500, "received": 5000,
    }  # fmt: skip
    assert document["simulation"][1]["secure_to_plain"]["bytes_per_site_sent"] == 2.5
    assert document["simulation"][1]["secure_to_plain"]["bytes_per_site_received"] == 2.5
    assert document["simulation"][2]["secure_to_plain"]["bytes_per_site_sent"] is None  # failed
    assert document["stopped"]["real"] is None
    json.dumps(document)  # one JSON document
    lines = table_lines(document)
    assert any("growth exponent, simulation plain: coordinator CPU 2.00" in line for line in lines)
    assert any(line.startswith("  100  simu") and "1.0+2.0 / 2.5+5.0" in line for line in lines)
    assert any(line.startswith("simulation stopped at 200 sites (secure)") for line in lines)


def test_the_order_alternates() -> None:
    assert [order_of(i) for i in range(3)] == [
        ("plain", "secure"), ("secure", "plain"), ("plain", "secure"),
    ]  # fmt: skip


def test_the_command_checks_its_arguments_and_prints_json(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[ScaleOptions] = []

    def fake_bench(options: ScaleOptions, progress: Any = None) -> dict[str, Any]:
        seen.append(options)
        return {"benchmark": "scale"}

    monkeypatch.setattr(medfed.bench.scale, "run_scale_bench", fake_bench)
    monkeypatch.setattr(medfed.bench.scale, "interrupt_on_sigterm", lambda: None)
    runner = CliRunner()
    done = runner.invoke(app, ["bench", "scale", "--sites", "50,10", "--real", "", "--json"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout) == {"benchmark": "scale"}
    assert seen == [ScaleOptions(sites=(10, 50), real=(), rounds=2, local_steps=3)]

    for argv, message in (
        (["--sites", "0"], "--sites: expected whole numbers from 1 to 256"),
        (["--real", "17"], "--real: expected whole numbers from 1 to 16"),
        (["--sites", "", "--real", ""], "nothing to measure"),
    ):
        failed = runner.invoke(app, ["bench", "scale", *argv])
        assert failed.exit_code == 2 and message in failed.output
    assert len(seen) == 1
