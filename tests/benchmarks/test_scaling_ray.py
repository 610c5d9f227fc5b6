"""``benchmarks.scaling --ray-cluster``: the simulation runs on a Ray head started for it.

The fast tests start and stop a real one-CPU head (``ray start --head``, ~10-20 s here) and
check what the cluster check concludes from made-up GCS tables. The slow test runs 2 sites x 1
round through the benchmark's own head and checks, from the JSON and from the processes left
on the machine, that Flower's Ray backend joined that head instead of starting its own Ray,
and that the head is gone afterwards, whatever happened.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path

import psutil
import pytest

from benchmarks.scaling import (
    RAY_ADDRESS,
    cluster_facts,
    environ_has,
    process_kind,
    ray_head,
    ray_head_command,
    stop_ray_head,
    tagged_processes,
    used_cluster,
)

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_ADDRESS_FILE = Path("/tmp/ray/ray_current_cluster")  # what a bare ray.init() reads
MARK = "FEDMEDVIT_TEST_RAY_MARK"  # inherited by everything the slow test starts


def _marked(mark: str) -> list[tuple[str, list[str]]]:
    """(kind, command line) of the live processes carrying ``MARK=mark``."""
    found = []
    for proc in tagged_processes(mark, name=MARK):
        with suppress(psutil.Error):
            found.append((process_kind(proc.cmdline(), proc.name()), proc.cmdline()))
    return found


def _address_file_state() -> str | None:
    return DEFAULT_ADDRESS_FILE.read_text() if DEFAULT_ADDRESS_FILE.is_file() else None


def test_head_command_uses_its_own_temp_dir_and_no_fixed_port(tmp_path):
    command = ray_head_command(3, tmp_path)
    assert command[1:3] == ["start", "--head"] and "--num-cpus=3" in command
    assert f"--temp-dir={tmp_path}" in command  # else ray.init() elsewhere joins this head
    ports = {a.split("=")[0]: int(a.split("=")[1]) for a in command if "port=" in a}
    assert set(ports) == {
        "--port",
        "--dashboard-port",
        "--dashboard-agent-listen-port",
        "--ray-client-server-port",
    }
    assert not {6379, 8265, 52365, 10001} & set(ports.values())  # Ray's fixed defaults


def test_environ_has_reads_the_raw_block():
    tag = secrets.token_hex(4)
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(30)"],
        env=os.environ | {"FEDMEDVIT_SCALING_TAG": tag},
        stdout=subprocess.PIPE,
    )
    try:
        # After exec, not between fork and exec (the parent's environment then: a CI flake).
        assert child.stdout is not None and child.stdout.readline() == b"up\n"
        assert environ_has(child.pid, "FEDMEDVIT_SCALING_TAG", tag)
        assert not environ_has(child.pid, "FEDMEDVIT_SCALING_TAG", tag[:-1])  # whole value
        assert [p.pid for p in tagged_processes(tag)] == [child.pid]
    finally:
        child.kill()
        child.wait()
    assert not environ_has(child.pid, "FEDMEDVIT_SCALING_TAG", tag)  # gone: no error


def _facts(driver_pid: int, actors: dict[str, dict[str, int]], finished: bool = True):
    job = {"job_id": "01000000", "driver_pid": driver_pid, "finished": finished}
    return {"jobs": [job | {"actors": actors}]}


def test_used_cluster_needs_our_driver_its_actors_and_no_gcs_of_our_own():
    actors = {"ClientAppActor": {"10.0.0.1": 1, "10.0.0.2": 1}}
    seen = {"flwr-simulation": [42], "ray-gcs": [7]}
    verdict = used_cluster(_facts(42, actors), seen, head_pids=[7])
    assert verdict["used"] and verdict["client_app_actors_per_node"] == actors["ClientAppActor"]
    # Another process's job (the driver is not this run's flwr-simulation).
    assert not used_cluster(_facts(43, actors), seen, head_pids=[7])["used"]
    # The driver joined but ran no ClientApp on the cluster.
    assert not used_cluster(_facts(42, {}), seen, head_pids=[7])["used"]
    # The run still going or killed: the job never finished.
    assert not used_cluster(_facts(42, actors, finished=False), seen, head_pids=[7])["used"]
    # A GCS in the run's tree that is not the head's: an in-process Ray beside the driver.
    own = used_cluster(_facts(42, actors), {**seen, "ray-gcs": [7, 99]}, head_pids=[7])
    assert not own["used"] and own["own_gcs_pids"] == [99]


def test_ray_client_server_has_a_kind():
    command = ["/v/bin/python3", "-m", "ray.util.client.server", "--address=1.2.3.4:5"]
    assert process_kind(command, "python3") == "ray-client-server"


def test_a_started_head_is_a_cluster_and_is_stopped_even_when_the_block_fails(tmp_path):
    before = _address_file_state()
    tag = secrets.token_hex(8)
    head_pids: list[int] = []
    temp_dir = None
    try:
        with (
            pytest.raises(RuntimeError, match="the block failed"),
            ray_head(1, tag, tmp_path / "head.log") as head,
        ):
            temp_dir = head.temp_dir
            head_pids = list(head.pids)
            assert {"ray-gcs", "ray-raylet"} <= set(head.pids.values())
            assert (head.temp_dir / "ray_current_cluster").read_text().strip() == head.address
            facts = cluster_facts(head.address, since=0)
            assert facts["alive_nodes"] == 1 and facts["cpus"] == 1.0
            assert facts["jobs"] == []  # reading the GCS added no job
            raise RuntimeError("the block failed")
        assert head.stop_s > 0 and set(head_pids) <= set(head.stopped)
        assert not [pid for pid in head_pids if psutil.pid_exists(pid)]
        assert not tagged_processes(tag)
        assert temp_dir is not None and not temp_dir.exists()
        assert _address_file_state() == before  # the machine's default cluster untouched
    finally:
        stop_ray_head(tag)  # whatever an assertion above left


def test_a_head_that_cannot_start_says_where_its_output_is(tmp_path, monkeypatch):
    from benchmarks import scaling

    monkeypatch.setattr(
        scaling, "ray_head_command", lambda n, d: [str(scaling.RAY), "start", "--bogus-flag"]
    )
    with (
        pytest.raises(
            scaling.RayClusterError,
            match=r"without a cluster address; its output is in .*head\.log",
        ),
        ray_head(1, secrets.token_hex(8), tmp_path / "head.log"),
    ):
        pass


@pytest.mark.slow
def test_two_sites_one_round_run_on_the_benchmarks_own_ray_head(tmp_path):
    before = _address_file_state()
    mark = secrets.token_hex(8)
    out = tmp_path / "scaling-ray.json"
    command = [sys.executable, "-m", "benchmarks.scaling", "--sites", "2", "--ray-cluster"]
    command += ["--ray-cpus", "2", "--out", str(out), "--workdir", str(tmp_path / "work")]
    command += ["--data-cache", str(tmp_path / "phantoms")]
    env = os.environ | {MARK: mark, "OMP_NUM_THREADS": "1"}
    env.pop(RAY_ADDRESS, None)
    try:
        result = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False
        )
        assert _marked(mark) == []
    finally:  # by PID, and only what this test started: never `ray stop`
        stop_ray_head(mark, name=MARK)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert "existing" not in doc["spread"]["backend"] and doc["spread"]["ray_cpus"] == 2
    (p,) = doc["points"]
    assert p["completed"] and p["trained"] == 2 and p["statuses"] == ["trained"]
    assert 0 < p["round_s"] < p["run_s"] < p["wall_s"] and p["rounds_s"] == [p["round_s"]]
    cluster = p["ray_cluster"]
    assert p["used_cluster"] and cluster["used"]
    # The run was pointed at the head, and its driver is a job of that head.
    assert p["ray_address_env"] == cluster["address"]
    job = cluster["driver_job"]
    assert "flwr-simulation" in job["entrypoint"] and job["finished"]
    assert job["driver_pid"] in cluster["drivers_seen"]
    # The ClientApps ran in the head's actors (1 CPU each, 2 CPUs), on its one node.
    assert cluster["alive_nodes"] == 1 and cluster["cpus"] == 2.0
    assert 1 <= sum(cluster["client_app_actors_per_node"].values()) <= 2
    assert cluster["own_gcs_pids"] == [] and p["processes"]["ray-gcs"] == 1
    assert p["processes"]["ray-raylet"] == 1  # the head's: none started beside the driver
    # The head's processes counted in the memory peak, then stopped with the run's.
    assert cluster["head_processes_stopped"] >= 2 and p["leftover_processes"] == []
    assert p["peak_rss_mib"] >= p["peak_pss_mib"] > 500
    assert _address_file_state() == before


@pytest.mark.parametrize(
    "signals",
    [
        (signal.SIGTERM,),
        pytest.param((signal.SIGHUP,), marks=pytest.mark.slow),  # the terminal closed
        # a second signal while the head stops (SIGTERM: a background job ignores SIGINT)
        pytest.param((signal.SIGTERM, signal.SIGTERM), marks=pytest.mark.slow),
    ],
)
def test_a_terminated_benchmark_stops_its_head_and_its_run(tmp_path, signals):
    """SIGTERM (a CI timeout, a supervisor), SIGHUP, or a second signal while the head stops,
    once the run is under way: nothing may be left (the last two left 5-6 of the head's
    processes and its temp dir before)."""
    mark = secrets.token_hex(8)
    command = [sys.executable, "-m", "benchmarks.scaling", "--sites", "2", "--ray-cluster"]
    command += ["--ray-cpus", "1", "--out", str(tmp_path / "out.json")]
    command += ["--workdir", str(tmp_path / "work"), "--data-cache", str(tmp_path / "phantoms")]
    env = os.environ | {MARK: mark, "OMP_NUM_THREADS": "1"}
    with (tmp_path / "bench.log").open("wb") as log:
        bench = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 180
        while not any("--child" in line for _, line in _marked(mark)):
            assert bench.poll() is None and time.monotonic() < deadline, "the run never started"
            time.sleep(0.5)
        procs = _marked(mark)
        assert {"ray-gcs", "ray-raylet"} <= {kind for kind, _ in procs}
        temp_dirs = {
            d for _, line in procs for d in re.findall(r"/tmp/rayh-[^/ =]+", " ".join(line))
        }
        assert len(temp_dirs) == 1  # the head is up in its own temp dir, the run started
        for signum in signals:
            bench.send_signal(signum)
            time.sleep(1.0)
        assert bench.wait(timeout=120) != 0
        assert _marked(mark) == []
        assert not any(Path(d).exists() for d in temp_dirs)
    finally:
        bench.kill()
        bench.wait()
        stop_ray_head(mark, name=MARK)
