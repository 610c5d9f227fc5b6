"""``benchmarks.scaling``: real simulations in their own process trees, measured and fitted.

The quick mode runs the many-sites scenario at 2 and 3 sites through the real driver (Flower,
Ray, DP); the test checks the JSON's fields against what a run must show (every site trained,
the round inside the run inside the wall time, the Ray processes seen, nothing left running)
and recomputes the fits from the points with numpy, independently of ``fit_line``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks.scaling import fit_line, process_kind

ROOT = Path(__file__).resolve().parents[2]


def test_fit_line_matches_numpy_least_squares():
    xs = [10.0, 30.0, 100.0, 300.0]
    ys = [40.0, 95.0, 260.0, 790.0]
    fit = fit_line(xs, ys)
    slope, intercept = np.polyfit(xs, ys, 1)
    assert fit["slope"] == pytest.approx(slope) and fit["intercept"] == pytest.approx(intercept)
    assert fit["r2"] == pytest.approx(np.corrcoef(xs, ys)[0, 1] ** 2)
    assert fit_line([1.0, 2.0, 3.0], [2.0, 4.0, 6.0])["r2"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="two distinct x"):
        fit_line([5.0, 5.0], [1.0, 2.0])


def test_process_kinds_of_a_simulation_tree():
    ray = "/v/lib/python3.11/site-packages/ray"
    assert process_kind(["ray::ClientAppActor.run"], "ray::ClientAppActor") == "ray-actor"
    assert process_kind(["ray::IDLE"], "ray::IDLE") == "ray-worker"
    assert process_kind(["ray::DashboardAgent"], "x") == "ray-dashboard-agent"
    assert process_kind([], "ray::ClientAppA") == "ray-actor"  # only the 15-byte name left
    assert process_kind([], "python3") == "exiting"
    tracker = ["/v/bin/python", "-c", "from multiprocessing.resource_tracker import main;main(8)"]
    assert process_kind(tracker, "python") == "multiprocessing"
    # A worker before it renames itself: its options name the raylet, it is not one.
    worker = ["/v/bin/python3", f"{ray}/_private/workers/default_worker.py", "--raylet-name=x"]
    assert process_kind(worker, "python3") == "ray-worker"
    assert process_kind([f"{ray}/core/src/ray/raylet/raylet", "--x"], "raylet") == "ray-raylet"
    assert process_kind(["/v/bin/python3", "/v/bin/flwr-simulation", "--a"], "x") == (
        "flwr-simulation"
    )
    assert process_kind(["/v/bin/python", "-m", "benchmarks.scaling", "--child", "2"], "p") == (
        "runner"
    )
    assert process_kind(["/v/bin/python3", "/v/bin/flwr", "run", ".", "local"], "x") == "flwr-cli"


def test_quick_mode_measures_two_real_simulations_and_fits_their_points(tmp_path):
    out = tmp_path / "scaling.json"
    command = [sys.executable, "-m", "benchmarks.scaling", "--quick", "--out", str(out)]
    command += ["--workdir", str(tmp_path / "work"), "--data-cache", str(tmp_path / "phantoms")]
    result = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=1200, check=False
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    doc = json.loads(out.read_text())
    points = doc["points"]
    assert [p["sites"] for p in points] == [2, 3]
    for p in points:
        assert p["completed"] and p["exit_code"] == 0
        assert p["trained"] == p["sites"] and p["statuses"] == ["trained"]
        assert p["overrides"]["num-server-rounds"] == 1
        assert p["federation"] == {"num-supernodes": p["sites"], "client-resources-num-cpus": 1}
        assert 0 < p["train_s"] < p["round_s"] < p["run_s"] < p["wall_s"]
        assert p["round_s"] == pytest.approx(p["train_s"] + p["evaluate_s"])
        # The whole tree was seen: the runner, Flower's processes and Ray's.
        for kind in ("runner", "superlink", "flwr-cli", "flwr-simulation", "ray-raylet"):
            assert p["processes"].get(kind, 0) >= 1, (kind, p["processes"])
        # Flower's Ray actors ran the ClientApps: at most one per CPU (1 CPU per client).
        assert 1 <= p["ray_actors"] == p["processes"]["ray-actor"] <= doc["machine"]["cpus"]
        assert not {"python", "python3"} & set(p["processes"])  # every process has a kind
        assert p["peak_rss_mib"] >= p["peak_pss_mib"] > 500  # torch alone is hundreds of MiB
        parts = p["peak_breakdown"].values()
        assert sum(v["pss_mib"] for v in parts) == pytest.approx(p["peak_pss_mib"])
        assert p["samples"] >= 10 and p["leftover_processes"] == []
    xs = [p["sites"] for p in points]
    for key in ("round_s", "peak_pss_mib"):
        slope, intercept = np.polyfit(xs, [p[key] for p in points], 1)
        assert doc["fit"][key]["slope"] == pytest.approx(slope)
        assert doc["fit"][key]["intercept"] == pytest.approx(intercept)
    assert "| 3 |" in result.stdout and "fit round time" in result.stdout
    assert doc["spread"]["client-resources-num-cpus"] == 1
