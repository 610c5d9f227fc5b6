"""Processes of a deployment: started in their own sessions, logged to files, stopped by PID.

:class:`Processes` starts each component of a deployment (SuperLink, proxy, SuperNodes,
SuperExecs) as a local process, or, given a :class:`Launcher`, wraps its command so that it
runs in a container instead (``deploy.containers``). Each component declares the files it
needs (:class:`Mount`): a local process ignores them, a container gets exactly those and
nothing else. Also the environment and CLI configuration every component starts with.
"""

from __future__ import annotations

import os
import secrets
import signal
import ssl
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import httpx

from simulations.flower_cli import BIN, stop_process_group

CONNECTION = "deploy"


class DeploymentError(RuntimeError):
    """A deployment process failed to start, or a check on it failed."""


@dataclass(frozen=True)
class Mount:
    """A host file or folder a component needs (read-only unless ``writable``)."""

    path: Path
    writable: bool = False


# Which image runs a component in a container: the coordinator's or a hospital's.
COORDINATOR = "coordinator"
HOSPITAL = "hospital"


class Launcher(Protocol):
    """Runs components somewhere else than as local processes (``deploy.containers``)."""

    def wrap(
        self,
        name: str,
        role: str,
        command: list[str],
        env: Mapping[str, str],
        mounts: Sequence[Mount],
    ) -> list[str]:
        """The local command that runs ``command`` there (in the foreground, logging to
        stdout, stopped by SIGTERM), given exactly ``mounts``."""
        ...

    def stop(self) -> None:
        """Remove whatever :meth:`wrap` started that is still there."""
        ...


@dataclass
class Processes:
    """Processes this module started, each in its own session so it can be stopped by PID
    together with whatever it spawned (SuperExecs start ServerApp/ClientApp processes).
    With a ``launcher``, each component runs in a container through it."""

    log_dir: Path
    launcher: Launcher | None = None
    started: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)
    tracked: dict[int, int] = field(default_factory=dict)  # PID -> start time, incl. children

    def start(
        self,
        name: str,
        command: list[str],
        env: Mapping[str, str],
        *,
        role: str = COORDINATOR,
        mounts: Sequence[Mount] = (),
    ) -> subprocess.Popen[bytes]:
        """Start one component; ``role`` and ``mounts`` matter only with a launcher."""
        if self.launcher is not None:
            command = self.launcher.wrap(name, role, command, env, mounts)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"{name}.log", "wb") as log:
            process = subprocess.Popen(
                command,
                env=dict(env),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.started.append((name, process))
        if (stat := _proc_stat(process.pid)) is not None:
            self.tracked[process.pid] = stat[1]
        return process

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def check_alive(self, names: list[str]) -> None:
        for name, process in self.started:
            if name in names and process.poll() is not None:
                tail = "\n".join(self.log(name).splitlines()[-30:])
                raise DeploymentError(f"{name} exited with code {process.returncode}:\n{tail}")

    def stop_all(self, grace: float = 15.0) -> None:
        """SIGTERM every process group at once (SuperNodes deactivate in parallel), then
        wait; whatever is still alive after ``grace`` seconds is killed by PID, including
        any descendant that left its group (collected before the first signal)."""
        descendants = _descendants({process.pid for _, process in self.started})
        for _, process in reversed(self.started):
            if process.poll() is None:
                with suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for _, process in reversed(self.started):
            with suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            stop_process_group(process, grace=1.0)
        for pid, started_at in descendants.items():
            if is_running(pid, started_at):
                with suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        self.tracked |= descendants
        if self.launcher is not None:
            self.launcher.stop()


def _proc_stat(pid: int | str) -> tuple[int, int] | None:
    """(parent pid, start time) of a live process, from /proc; None if it is gone, a zombie
    (dead, waiting to be reaped) or this is not Linux."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        if fields[0] == "Z":
            return None
        return int(fields[1]), int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def is_running(pid: int, started_at: int) -> bool:
    """Is this very process (not a later one that reused its PID) still alive?"""
    stat = _proc_stat(pid)
    return stat is not None and stat[1] == started_at


def _descendants(roots: set[int]) -> dict[int, int]:
    """Live descendants of ``roots``: PID -> start time (to never signal a reused PID)."""
    children: dict[int, list[tuple[int, int]]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        if (stat := _proc_stat(entry.name)) is not None:
            children.setdefault(stat[0], []).append((int(entry.name), stat[1]))
    found: dict[int, int] = {}
    todo = list(roots)
    while todo:
        for child, started in children.get(todo.pop(), []):
            if child not in found:
                found[child] = started
                todo.append(child)
    return found


@contextmanager
def running(log_dir: Path, launcher: Launcher | None = None) -> Iterator[Processes]:
    processes = Processes(log_dir, launcher)
    try:
        yield processes
    finally:
        processes.stop_all()


def base_env(home: Path, *, app_threads: int | None = None) -> dict[str, str]:
    """Environment for one component: its own FLWR_HOME, no update checks, no pip at run time.
    ``app_threads`` caps torch threads for a SuperExec's apps: on one small machine several
    hospitals share the cores, and oversubscribed threads make every round slower."""
    home.mkdir(parents=True, exist_ok=True)
    threads = {"OMP_NUM_THREADS": str(app_threads)} if app_threads else {}
    return (
        os.environ
        | threads
        | {
            "FLWR_HOME": str(home),
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONUNBUFFERED": "1",
        }
    )


def write_cli_config(home: Path, address: str, ca: Path) -> dict[str, str]:
    """A FLWR_HOME whose default connection reaches the SuperLink over TLS, trusting our CA."""
    env = base_env(home)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "{address}"\n'
        f'root-certificates = "{ca.resolve()}"\n'
    )
    return env


def write_secret(path: Path) -> Path:
    """A shared secret that lets a SuperExec talk to its SuperLink/SuperNode (process mode)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, secrets.token_hex(32).encode())
    finally:
        os.close(fd)
    return path


def wait_healthy(
    name: str, url: str, processes: Processes, ca: Path | None = None, timeout: float = 60
) -> None:
    """Poll ``url`` (HTTPS trusting ``ca`` when given) until it answers 2xx."""
    verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=str(ca)) if ca else False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        processes.check_alive([name])
        try:
            if httpx.get(url, verify=verify, timeout=1).is_success:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise DeploymentError(f"{name} was not healthy at {url} within {timeout:.0f} s")
