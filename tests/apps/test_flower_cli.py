"""The runner stops every process it started (issue 13, fault 5), and refuses a federation
setting that cannot work before any process starts."""

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from core.config import ConfigError
from simulations.flower_cli import PROCESS_TAG, flwr_run, new_tag, stop_process_group

ROOT = Path(__file__).resolve().parents[2]
SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]


def spawn(code: str, tag: str) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, "-c", code],
        env=os.environ | {PROCESS_TAG: tag},
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert process.stdout is not None
    assert process.stdout.readline().strip().isdigit()
    return process


def marked(name: str, value: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and proc.environ().get(name) == value:
                found.append(proc)
        except psutil.Error:
            continue
    return found


@pytest.mark.parametrize("parent_exits", [False, True], ids=["parent-alive", "orphan"])
def test_descendants_that_left_the_process_group_are_stopped(parent_exits):
    """Like Ray's workers: a grandchild in its own session, possibly orphaned."""
    tag = new_tag()
    code = (
        f"import subprocess, time; p = subprocess.Popen({SLEEPER!r}, start_new_session=True); "
        f"print(p.pid, flush=True); {'' if parent_exits else 'time.sleep(600)'}"
    )
    process = spawn(code, tag)
    if parent_exits:
        process.wait(timeout=30)
    assert len(marked(PROCESS_TAG, tag)) == (1 if parent_exits else 2)
    stop_process_group(process, grace=5.0, tag=tag)
    deadline = time.monotonic() + 10
    while marked(PROCESS_TAG, tag) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert marked(PROCESS_TAG, tag) == []


def test_min_nodes_above_the_simulated_sites_fail_before_flwr_starts(tmp_path):
    with pytest.raises(ConfigError, match=r"'min-train-nodes' = 5 .*has 2 site"):
        flwr_run(
            dict(os.environ),
            ROOT,
            "local",
            run_config={"min-train-nodes": 5},
            federation_config={"num-supernodes": 2},
        )


SCENARIO = """
description = "two tiny sites, many rounds: to be interrupted"
[phantoms]
preset = "many"
n-sites = 2
seed = 3
[run-config]
num-server-rounds = 50
model-size = "micro"
in-plane-size = 32
batch-size = 8
min-train-nodes = 2
"""


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_ctrl_c_stops_superlink_simulation_and_ray(tmp_path):
    """A real run interrupted in round 1: no process it started survives the runner."""
    scenario = tmp_path / "interrupted.toml"
    scenario.write_text(SCENARIO)
    mark = uuid.uuid4().hex
    output = tmp_path / "runner.log"
    with output.open("w") as sink:
        runner = subprocess.Popen(
            [
                *(sys.executable, "-m", "simulations.run", str(scenario)),
                *("--out", str(tmp_path / "run"), "--data-cache", str(tmp_path / "cache")),
            ],
            cwd=ROOT,
            env=os.environ | {"FEDMEDVIT_TEST_MARK": mark, "PYTHONUNBUFFERED": "1"},
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # A shell's background job ignores SIGINT, and Python keeps an ignored SIGINT.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    first_round = tmp_path / "run" / "checkpoints" / "round-001.safetensors"
    deadline = time.monotonic() + 600
    while not first_round.is_file():
        if runner.poll() is not None or time.monotonic() > deadline:
            runner.kill()
            pytest.fail("the run never finished round 1:\n" + output.read_text()[-3000:])
        time.sleep(0.5)
    names = {p.name() for p in marked("FEDMEDVIT_TEST_MARK", mark)}
    assert {"flower-superlink", "flwr-simulation"} <= names or "raylet" in names, names
    os.killpg(runner.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    try:
        runner.wait(timeout=120)
    except subprocess.TimeoutExpired:
        runner.kill()
        pytest.fail("the runner ignored Ctrl-C:\n" + output.read_text()[-3000:])
    deadline = time.monotonic() + 20
    while (left := marked("FEDMEDVIT_TEST_MARK", mark)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert [(p.pid, p.name()) for p in left] == []
