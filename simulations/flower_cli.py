"""Driving the ``flwr`` CLI from Python: an owned local SuperLink and a checked ``flwr run``.

``flwr run`` exits 0 even when the run failed, and with a local connection it starts a
background SuperLink nobody stops. Here we start the SuperLink ourselves (free ports, our own
FLWR_HOME) and check the run's final status with ``flwr list``. Every process we start runs in
its own process group and carries a tag in its environment that its descendants inherit
(``flwr-simulation``, Ray's raylet and workers, which leave the group); on exit, Ctrl-C,
failure or timeout, :func:`stop_process_group` stops the group and every tagged process.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil

from core.config import RunConfig

BIN = Path(sys.executable).parent
# Environment variable naming the runner that started a process; inherited by descendants.
PROCESS_TAG = "FEDMEDVIT_RUNNER_TAG"


class RunFailed(RuntimeError):
    """A Flower run did not reach ``finished:completed``."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string


def overrides_string(values: Mapping[str, Any]) -> str:
    return " ".join(f"{key}={toml_value(value)}" for key, value in values.items())


@dataclass
class LocalSuperLink:
    home: Path
    env: dict[str, str]
    process: subprocess.Popen[bytes]
    log_file: Path


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextmanager
def local_superlink(workdir: Path | None = None) -> Iterator[LocalSuperLink]:
    """A simulation-mode SuperLink on free loopback ports. On exit, Ctrl-C or SIGTERM (turned
    into KeyboardInterrupt while the context is open) it is stopped with every process the
    run started (:func:`stop_process_group`)."""
    home = Path(tempfile.mkdtemp(prefix="flwr-home-", dir=workdir))
    http_port, control_port = free_port(), free_port()
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n'
    )
    env = os.environ | {
        PROCESS_TAG: new_tag(),
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port),
        "FLWR_LOCAL_CONTROL_API_PORT": str(control_port),
        "RAY_DEDUP_LOGS": "0",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    previous_sigterm = None
    if threading.current_thread() is threading.main_thread():  # a supervisor's kill: clean up
        previous_sigterm = signal.signal(signal.SIGTERM, _interrupt)
    log_file = home / "superlink.log"
    command = [
        str(BIN / "flower-superlink"),
        "--insecure",
        "--simulation",
        "--isolation",
        "subprocess",
        "--control-api-address",
        f"127.0.0.1:{control_port}",
        "--host",
        "127.0.0.1",
        "--port",
        str(http_port),
        "--log-file",
        str(log_file),
    ]
    with open(home / "superlink.out", "wb") as out:
        process = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RunFailed(f"flower-superlink exited early; see {home / 'superlink.out'}")
            try:
                if httpx.get(f"http://127.0.0.1:{http_port}/health", timeout=0.5).is_success:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RunFailed("flower-superlink did not become healthy within 60 s")
            time.sleep(0.3)
        yield LocalSuperLink(home, env, process, log_file)
    finally:
        stop_process_group(process, tag=env[PROCESS_TAG])
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)


def _tagged(tag: str) -> list[psutil.Process]:
    """Live processes of this user whose environment carries ``PROCESS_TAG=tag``."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        if proc.pid == os.getpid():
            continue
        with suppress(psutil.Error):
            if proc.environ().get(PROCESS_TAG) == tag:
                found.append(proc)
    return found


def new_tag() -> str:
    """A fresh value for ``PROCESS_TAG``: one per process tree this module starts."""
    return f"{os.getpid()}-{secrets.token_hex(6)}"


def stop_process_group(
    process: subprocess.Popen[Any], grace: float = 10.0, *, tag: str | None = None
) -> None:
    """Stop ``process`` and everything it spawned: SIGTERM to its process group, to its
    descendants and, given the ``PROCESS_TAG`` value it was started with, to every process
    carrying it (those that started a new session or outlived their parent); SIGKILL whatever
    is left after ``grace`` seconds. Safe to call when the process already exited."""
    family: dict[int, psutil.Process] = {}
    with suppress(psutil.Error):
        root = psutil.Process(process.pid)
        family = {p.pid: p for p in [root, *root.children(recursive=True)]}
    family |= {p.pid: p for p in (_tagged(tag) if tag else [])}
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGTERM)
    for proc in family.values():
        with suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(list(family.values()), timeout=grace)
    late = _tagged(tag) if tag else []
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    for proc in [*alive, *late]:
        with suppress(psutil.Error):
            proc.kill()
    with suppress(subprocess.TimeoutExpired):
        process.wait(timeout=grace)


# --- runs against a named connection in $FLWR_HOME/config.toml (simulation or deployment) ---


def list_runs(env: Mapping[str, str], connection: str) -> list[dict[str, Any]]:
    """``flwr list CONNECTION --format json``: every run the SuperLink knows, oldest first."""
    out = subprocess.run(
        [str(BIN / "flwr"), "list", connection, "--format", "json"],
        env=dict(env),
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    try:
        runs = json.loads(out.stdout).get("runs", [])
    except json.JSONDecodeError as err:
        raise RunFailed(f"flwr list {connection} gave no JSON: {out.stdout}{out.stderr}") from err
    return sorted(runs, key=lambda r: int(r["run-id"]))


def list_supernodes(env: Mapping[str, str], connection: str) -> list[dict[str, Any]]:
    """``flwr supernode list CONNECTION --format json``: registered nodes and their status."""
    out = subprocess.run(
        [str(BIN / "flwr"), "supernode", "list", connection, "--format", "json"],
        env=dict(env),
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    try:
        return list(json.loads(out.stdout).get("nodes", []))
    except json.JSONDecodeError as err:
        raise RunFailed(f"flwr supernode list gave no JSON: {out.stdout}{out.stderr}") from err


def flwr_run(
    env: Mapping[str, str],
    app_dir: Path | str,
    connection: str,
    *,
    run_config: Mapping[str, Any],
    federation_config: Mapping[str, Any] | None = None,
    on_line: Callable[[str], None] = lambda line: None,
    timeout: float = 3600,
) -> int:
    """``flwr run APP CONNECTION --stream`` against an already running SuperLink; returns the
    run id once ``flwr list`` says ``finished:completed``. Bounded even if the stream stalls.
    ``app_dir``: the app's folder, or a release the SuperLink fetches from its app registry
    (``@publisher/name==x.y.z``).

    With ``federation_config`` (simulation), ``num-supernodes`` is checked against the run
    config's ``min-*-nodes`` first.

    Raises:
        ConfigError: a setting that cannot work with this federation.
        RunFailed: the run did not complete within ``timeout`` seconds.
    """
    import queue
    import re

    if federation_config and "num-supernodes" in federation_config:
        cfg = RunConfig.from_flat(run_config)
        cfg.check_federation(int(federation_config["num-supernodes"]))
    tag = new_tag()
    command = [
        str(BIN / "flwr"),
        "run",
        str(app_dir),
        connection,
        "--run-config",
        overrides_string(run_config),
        "--stream",
    ]
    if federation_config:  # simulation: number of SuperNodes, their resources
        command += ["--federation-config", overrides_string(federation_config)]
    process = subprocess.Popen(
        command,
        env=dict(env) | {PROCESS_TAG: tag},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    tail: list[str] = []
    run_id: int | None = None
    try:
        while True:
            try:
                line = lines.get(timeout=max(0.1, min(5.0, deadline - time.monotonic())))
            except queue.Empty:
                line = ""
            if line is None:
                break
            if line:
                tail = [*tail[-39:], line]
                on_line(line)
                if run_id is None and (found := re.search(r"started run (\d+)", line)):
                    run_id = int(found[1])
            if time.monotonic() > deadline:
                raise RunFailed(f"flwr run did not finish within {timeout:.0f} s")
        with suppress(subprocess.TimeoutExpired):  # the run's status below is what counts
            process.wait(timeout=30)
    finally:
        stop_process_group(process, tag=tag)
    if run_id is None:
        raise RunFailed("flwr run started no run; last output:\n" + "\n".join(tail))
    status = {int(r["run-id"]): r["status"] for r in list_runs(env, connection)}.get(run_id)
    if status != "finished:completed":
        raise RunFailed(f"run {run_id} ended as {status}; last output:\n" + "\n".join(tail))
    return run_id
