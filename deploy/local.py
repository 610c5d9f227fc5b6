"""The real deployment (TLS, authenticated SuperNodes, separate app processes) on loopback.

    python -m deploy.local --sites 3 --rounds 2 --out runs/deploy-demo
    python -m deploy.local --sites 3 --rounds 2 --out runs/deploy-he --he

Runs the same commands as ``deploy/compose.yaml``, as local processes instead of containers:
a CA and a SuperLink certificate; one ECDSA key pair per hospital, registered with
``flwr supernode register``; the app signed as a release (``deploy.release``) with the
consortium's Ed25519 key and served by the coordinator's app registry; ``flower-superlink``
with TLS and ``--enable-supernode-auth`` on an internal port, reachable from the hospitals
only through the Fleet-only proxy (``deploy.fleet_proxy``); one SuperExec for the
ServerApp; per hospital a ``flower-supernode`` (its key, the CA, its ``--node-config``,
``--trusted-entities`` with the consortium's key) and a SuperExec for its ClientApp; then
``flwr run @fedmedvit/fedmedvit==VERSION`` over TLS, checked with ``flwr list``.

Then an outsider who holds only ``ca.pem`` tries both doors (:func:`outsider_checks`):
registering its own node key and starting its own app through the address the hospitals
dial; and, as if the Control API had been reached anyway, its unsigned app and an app signed
with its own key, run through the coordinator's Control API. Every process started here is
stopped by its PID (process group) on exit.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from deploy.pki import make_ca, make_node_key, make_server_cert
from deploy.release import Release, keygen, sign, trusted_entities
from simulations.flower_cli import (
    BIN,
    RunFailed,
    flwr_run,
    free_port,
    list_runs,
    list_supernodes,
    overrides_string,
    stop_process_group,
)

ROOT = Path(__file__).resolve().parent.parent
APP_PACKAGES = ("core", "client", "server")  # what the ServerApp and ClientApp import
CONNECTION = "deploy"
# What the SuperLink logs when a SuperNode offers a key nobody registered (flwr 1.41).
REFUSAL_MARK = "No SuperNode found with the given public key"
# What a SuperNode started with --trusted-entities logs when it refuses an app: unsigned
# (no signatures at all) or signed by no key it trusts (flwr 1.41, supernode).
FAB_REFUSAL = re.compile(r"The FAB could not be verified|FAB verification failed")
# Worth echoing from the ServerApp log stream: each round's phases and any failure.
PROGRESS_LINE = re.compile(r"^\d\d/\d\d/\d{4} \S+:INFO:configure_|ERROR|Traceback")
ANSI_CODE = re.compile(r"\x1b\[[0-9;]*m")
# Small enough for a few minutes on 2 cores; every key is a run-config key.
DEMO_RUN_CONFIG: dict[str, Any] = {
    "model-size": "micro",
    "in-plane-size": 32,
    "batch-size": 8,
    "learning-rate": 0.003,
    "dp": True,
    "target-epsilon": 8.0,
    "round-timeout": 600.0,
}


class DeploymentError(RuntimeError):
    """A deployment process failed to start, or a check on it failed."""


@dataclass
class Processes:
    """Processes this module started, each in its own session so it can be stopped by PID
    together with whatever it spawned (SuperExecs start ServerApp/ClientApp processes)."""

    log_dir: Path
    started: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)
    tracked: dict[int, int] = field(default_factory=dict)  # PID -> start time, incl. children

    def start(
        self, name: str, command: list[str], env: Mapping[str, str]
    ) -> subprocess.Popen[bytes]:
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
def running(log_dir: Path) -> Iterator[Processes]:
    processes = Processes(log_dir)
    try:
        yield processes
    finally:
        processes.stop_all()


@dataclass(frozen=True)
class Site:
    name: str
    data_dir: Path
    state_dir: Path
    private_key: Path
    public_key: Path
    runtime_port: int
    superexec_secret: Path


@dataclass
class DeploymentResult:
    out: Path
    run_id: int
    run_dir: Path
    node_ids: dict[str, int]
    wall_seconds: float
    fleet_address: str = ""  # what the hospitals dial: the Fleet-only proxy
    control_address: str = ""  # the SuperLink itself: the coordinator's side only
    release: Release | None = None
    intruder: IntruderOutcome | None = None
    outsider: OutsiderOutcome | None = None
    processes: dict[int, int] = field(default_factory=dict)  # PID -> start time; all stopped


@dataclass
class IntruderOutcome:
    """What happened to the SuperNode whose key was never registered."""

    exit_code: int | None  # None: still running when the run ended
    log: str
    superlink_refusals: list[str]
    listed: bool  # did its node ever appear in `flwr supernode list`?

    @property
    def refused(self) -> bool:
        return self.exit_code not in (None, 0) and bool(self.superlink_refusals) and not self.listed


@dataclass
class Attempt:
    """One ``flwr`` command the outsider ran: its exit code and output."""

    command: str
    exit_code: int
    output: str

    @property
    def gist(self) -> str:
        """The CLI's error box (or its last line) as one line."""
        boxed = [line.strip("│ ") for line in self.output.splitlines() if line.startswith("│")]
        lines = boxed or self.output.strip().splitlines()[-1:]
        return " ".join(" ".join(lines).split())


@dataclass
class OutsiderOutcome:
    """What an outsider holding only ``ca.pem`` achieved.

    ``register`` and ``run``: ``flwr supernode register`` and ``flwr run`` against the
    address the hospitals dial. ``unsigned_run`` and ``foreign_run``: run ids of the
    outsider's app started through the coordinator's own Control API (as if that door had
    been reached), unsigned and signed with the outsider's key. ``refusals``: per hospital,
    the SuperNode log lines refusing an app. ``loot``: files the outsider's ClientApp wrote
    (it writes one per node it runs on). ``listed``: node ids the SuperLink knows beyond the
    registered hospitals."""

    register: Attempt
    run: Attempt
    unsigned_run: int
    foreign_run: int
    refusals: dict[str, list[str]]
    loot: list[str]
    listed: list[int]

    @property
    def refused(self) -> bool:
        """Both doors held: nothing registered, nothing started through the Fleet address,
        every hospital refused both apps, and the outsider's code ran nowhere."""
        return (
            self.register.exit_code != 0
            and self.run.exit_code != 0
            and all(len(lines) >= 2 for lines in self.refusals.values())
            and not self.loot
            and not self.listed
        )


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


def superlink_command(port: int, certs: Path, database: Path, secret: Path) -> list[str]:
    return [
        str(BIN / "flower-superlink"),
        "--ssl-ca-certfile",
        str(certs / "ca.pem"),
        "--ssl-certfile",
        str(certs / "server.pem"),
        "--ssl-keyfile",
        str(certs / "server.key"),
        "--enable-supernode-auth",
        "--isolation",
        "process",
        "--superexec-auth-secret-file",
        str(secret),
        "--disable-runtime-dependency-installation",
        "--database",
        str(database),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]


def supernode_command(site: Site, superlink: str, ca: Path, trusted: Path) -> list[str]:
    """A hospital's SuperNode: dials ``superlink`` (the Fleet-only proxy) over TLS, signs in
    with its registered key, and runs only apps signed by a key in ``trusted``."""
    node_config = {
        "site-name": site.name,
        "data-dir": str(site.data_dir),
        "state-dir": str(site.state_dir),
    }
    return [
        str(BIN / "flower-supernode"),
        "--superlink",
        superlink,
        "--root-certificates",
        str(ca),
        "--auth-supernode-private-key",
        str(site.private_key),
        "--trusted-entities",
        str(trusted),
        "--isolation",
        "process",
        "--superexec-auth-secret-file",
        str(site.superexec_secret),
        "--host",
        "127.0.0.1",
        "--port",
        str(site.runtime_port),
        "--max-retries",
        "5",
        "--node-config",
        overrides_string(node_config),
    ]


def superexec_command(runtime_address: str, secret: Path, ca: Path | None) -> list[str]:
    """A SuperExec for ServerApps (``ca`` given: the SuperLink's TLS port) or for one
    hospital's ClientApps (its SuperNode's runtime API, loopback inside the hospital)."""
    tls = ["--root-certificates", str(ca)] if ca is not None else ["--insecure"]
    return [
        str(BIN / "flower-superexec"),
        "--runtime-api-address",
        runtime_address,
        *tls,
        "--superexec-auth-secret-file",
        str(secret),
    ]


def registry_command(releases: Path, port: int) -> list[str]:
    """The coordinator's app registry (``deploy/release.py serve``, standard library only)."""
    return [
        sys.executable,
        str(ROOT / "deploy" / "release.py"),
        "serve",
        "--releases",
        str(releases),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]


def proxy_command(listen: str, upstream: str, certs: Path) -> list[str]:
    """The Fleet-only proxy (``deploy/fleet_proxy.py``) in front of the SuperLink."""
    return [
        sys.executable,
        str(ROOT / "deploy" / "fleet_proxy.py"),
        "--listen",
        listen,
        "--upstream",
        upstream,
        "--ca",
        str(certs / "ca.pem"),
        "--certfile",
        str(certs / "server.pem"),
        "--keyfile",
        str(certs / "server.key"),
    ]


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


def register_nodes(env: Mapping[str, str], public_keys: Mapping[str, Path]) -> dict[str, int]:
    """``flwr supernode register KEY.pub deploy --name NAME`` for each hospital (concurrently:
    each CLI start costs seconds); returns the node id the SuperLink gave each name."""
    commands = {
        name: [str(BIN / "flwr"), "supernode", "register", str(key), CONNECTION, "--name", name]
        for name, key in public_keys.items()
    }
    running_cli = {
        name: subprocess.Popen(
            command, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for name, command in commands.items()
    }
    node_ids = {}
    for name, process in running_cli.items():
        try:
            output, _ = process.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
        match = re.search(r"SuperNode (\d+) registered", output)
        if process.returncode != 0 or not match:
            raise DeploymentError(f"registering {public_keys[name]} failed:\n{output}")
        node_ids[name] = int(match[1])
    return node_ids


def wait_nodes_connected(processes: Processes, node_ids: Mapping[str, int], timeout: float) -> None:
    """Wait until each SuperNode process logs the node id its key was registered under: the
    SuperLink accepted it (reading logs costs nothing; each ``flwr`` CLI call costs a second)."""
    deadline = time.monotonic() + timeout
    waiting = dict(node_ids)
    while waiting and time.monotonic() < deadline:
        processes.check_alive(list(waiting))
        waiting = {
            name: node_id
            for name, node_id in waiting.items()
            if f"SuperNode ID: {node_id}" not in processes.log(name)
        }
        time.sleep(0.5)
    if waiting:
        raise DeploymentError(f"SuperNodes {sorted(waiting)} did not connect in {timeout:.0f} s")


def stage_app(target: Path) -> Path:
    """The Flower app as shipped to the SuperLink: pyproject.toml and the packages the
    ServerApp and ClientApp import, nothing else (no data, keys or caches can slip into the
    FAB, and ``flwr run`` does not walk the virtualenv)."""
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    shutil.copy2(ROOT / "pyproject.toml", target / "pyproject.toml")
    for package in APP_PACKAGES:
        shutil.copytree(
            ROOT / package, target / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
    return target


def prepare_sites(out: Path, count: int, seed: int) -> list[Site]:
    """Phantom hospitals, one node key pair and one SuperExec secret per hospital."""
    from core.data.phantoms import generate_hospitals

    data_root = out / "data"
    if not (data_root / "hospitals.json").is_file():
        generate_hospitals(data_root, "many", seed=seed, n_sites=count, overwrite=True)
    sites = []
    for dataset in sorted(data_root.glob("*/dataset.json")):
        name = dataset.parent.name
        key = out / "keys" / name
        sites.append(
            Site(
                name=name,
                data_dir=dataset.parent.resolve(),
                state_dir=(out / "state" / name).resolve(),
                private_key=key,
                public_key=make_node_key(key),
                runtime_port=free_port(),
                superexec_secret=write_secret(out / "secrets" / f"{name}.superexec"),
            )
        )
    if len(sites) != count:
        raise DeploymentError(f"{data_root} holds {len(sites)} sites, expected {count}")
    return sites


def start_hospital(
    processes: Processes,
    site: Site,
    superlink: str,
    ca: Path,
    trusted: Path,
    homes: Path,
    app_threads: int,
) -> None:
    processes.start(
        f"supernode-{site.name}",
        supernode_command(site, superlink, ca, trusted),
        base_env(homes / f"supernode-{site.name}"),
    )
    processes.start(
        f"clientapp-{site.name}",
        superexec_command(f"127.0.0.1:{site.runtime_port}", site.superexec_secret, None),
        base_env(homes / f"clientapp-{site.name}", app_threads=app_threads),
    )


def start_intruder(
    processes: Processes, out: Path, superlink: str, ca: Path, trusted: Path, data_dir: Path
) -> str:
    """A SuperNode whose key was never registered: the SuperLink must refuse it."""
    key = out / "keys" / "intruder"
    make_node_key(key)
    site = Site(
        name="intruder",
        data_dir=data_dir,
        state_dir=(out / "state" / "intruder").resolve(),
        private_key=key,
        public_key=key.with_name("intruder.pub"),
        runtime_port=free_port(),
        superexec_secret=write_secret(out / "secrets" / "intruder.superexec"),
    )
    name = f"supernode-{site.name}"
    command = supernode_command(site, superlink, ca, trusted)
    processes.start(name, command, base_env(out / "homes" / name))
    return name


def observe_intruder(
    processes: Processes, name: str, env: Mapping[str, str], registered: set[int]
) -> IntruderOutcome:
    """Wait (bounded) for the unregistered SuperNode to give up, then ask the SuperLink which
    nodes it knows: the intruder must have been refused and must not be among them."""
    process = dict(processes.started)[name]
    with suppress(subprocess.TimeoutExpired):
        process.wait(timeout=120)
    listed = {int(n["node-id"]) for n in list_supernodes(env, CONNECTION)}
    return IntruderOutcome(
        exit_code=process.poll(),
        log=processes.log(name),
        superlink_refusals=[
            line for line in processes.log("superlink").splitlines() if REFUSAL_MARK in line
        ],
        listed=bool(listed - registered),
    )


# --- the outsider: only ca.pem, its own key, its own app -------------------------------------

PROBE_PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "probe"
version = "1.0.0"

[tool.flwr.app]
publisher = "outsider"

[tool.flwr.app.components]
serverapp = "probe:server"
clientapp = "probe:client"

[tool.flwr.app.config]
loot-dir = "{loot}"
"""
PROBE_CODE = """\
import json
import os
from pathlib import Path

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

server = ServerApp()
client = ClientApp()


@server.main()
def main(grid, context):
    nodes = list(grid.get_node_ids())
    ask = [
        Message(RecordDict({"probe": ConfigRecord({"x": 1})}), dst_node_id=n, message_type="train")
        for n in nodes
    ]
    for reply in grid.send_and_receive(ask, timeout=90):
        print("probe reply from", reply.metadata.src_node_id, reply.has_error())


@client.train()
def steal(msg, context):
    loot = Path(context.run_config["loot-dir"])
    loot.mkdir(parents=True, exist_ok=True)
    seen = {k: str(v) for k, v in context.node_config.items()}
    data = context.node_config.get("data-dir", "")
    seen["files"] = sorted(os.listdir(data)) if data and os.path.isdir(data) else []
    (loot / f"node-{context.node_id}.json").write_text(json.dumps(seen))
    return Message(RecordDict(), reply_to=msg)
"""


def write_probe_app(target: Path, loot: Path) -> Path:
    """The outsider's app: its ClientApp writes what it can see in a hospital (node config,
    the names of the data files) to ``loot``, so any execution leaves evidence."""
    target.mkdir(parents=True, exist_ok=True)
    (target / "pyproject.toml").write_text(PROBE_PYPROJECT.format(loot=loot))
    (target / "probe.py").write_text(PROBE_CODE)
    return target


def attempt(env: Mapping[str, str], *args: str, timeout: float = 120) -> Attempt:
    """Run ``flwr ARGS`` and keep its exit code and output (a hang counts as failure)."""
    command = [str(BIN / "flwr"), *args]
    try:
        done = subprocess.run(
            command, env=dict(env), capture_output=True, text=True, timeout=timeout, check=False
        )
        code, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as err:
        code, output = -1, f"timed out after {timeout:.0f} s: {err.output or ''}"
    return Attempt(" ".join(["flwr", *args]), code, ANSI_CODE.sub("", output))


def started_run_id(output: str) -> int:
    match = re.search(r"Successfully started run (\d+)", output)
    if not match:
        raise DeploymentError(f"the outsider's run did not start:\n{output[-2000:]}")
    return int(match[1])


def wait_run_finished(env: Mapping[str, str], run_id: int, timeout: float = 240) -> None:
    """Poll ``flwr list`` until ``run_id`` has finished (any outcome)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = {int(r["run-id"]): r["status"] for r in list_runs(env, CONNECTION)}
        if status.get(run_id, "").startswith("finished"):
            return
        time.sleep(2)
    raise DeploymentError(f"the outsider's run {run_id} did not finish in {timeout:.0f} s")


def outsider_checks(
    out: Path,
    fleet_address: str,
    ca: Path,
    coordinator_env: Mapping[str, str],
    releases: Path,
    processes: Processes,
    node_ids: Mapping[str, int],
) -> OutsiderOutcome:
    """An outsider holding only ``ca.pem`` (plus its own node key and signing key) tries:

    1. ``flwr supernode register`` with its own key and ``flwr run`` of its own app,
       against ``fleet_address`` (the address the hospitals dial): the proxy must refuse.
    2. As if it had reached the Control API anyway: its unsigned app via ``flwr run DIR``,
       and the same app signed with its own key and served by the coordinator's registry
       (as if it had also planted a release there): every SuperNode must refuse both, and
       the app's ClientApp must leave no file in ``loot``.
    """
    home = out / "outsider"
    loot = home / "loot"
    env = write_cli_config(home / "flwr-home", fleet_address, ca)
    public = make_node_key(home / "node.key")
    app = write_probe_app(home / "app", loot)
    register = attempt(env, "supernode", "register", str(public), CONNECTION)
    run = attempt(env, "run", str(app), CONNECTION)
    (home / "attempts.log").write_text(
        "".join(f"$ {a.command}\nexit {a.exit_code}\n{a.output}\n" for a in (register, run))
    )

    unsigned = started_run_id(attempt(coordinator_env, "run", str(app), CONNECTION).output)
    wait_run_finished(coordinator_env, unsigned)
    signing_key = home / "release.key"
    if not signing_key.exists():
        keygen(signing_key)
    planted = sign(app, signing_key, releases)
    foreign_run = attempt(coordinator_env, "run", planted.spec, CONNECTION)
    foreign = started_run_id(foreign_run.output)
    wait_run_finished(coordinator_env, foreign)

    listed = {int(n["node-id"]) for n in list_supernodes(coordinator_env, CONNECTION)}
    return OutsiderOutcome(
        register=register,
        run=run,
        unsigned_run=unsigned,
        foreign_run=foreign,
        refusals={
            name: [
                line.strip()
                for line in processes.log(f"supernode-{name}").splitlines()
                if FAB_REFUSAL.search(line)
            ]
            for name in node_ids
        },
        loot=sorted(p.name for p in loot.glob("*")) if loot.is_dir() else [],
        listed=sorted(listed - set(node_ids.values())),
    )


def release_app(out: Path) -> tuple[Release, Path, Path]:
    """The consortium's release step: a signing key (made once), the app staged and signed
    into ``out/releases``, and the ``--trusted-entities`` file the hospitals install.
    Returns (release, releases folder, trusted-entities file)."""
    key = out / "release-keys" / "consortium"
    if not key.exists():
        keygen(key)
    releases = out / "releases"
    release = sign(stage_app(out / "app"), key, releases)
    trusted = trusted_entities([key.with_name(key.name + ".pub")], out / "trusted-entities.yaml")
    return release, releases, trusted


def run_deployment(
    out: Path,
    *,
    sites: int = 3,
    rounds: int = 2,
    he: bool = False,
    seed: int = 0,
    run_config: Mapping[str, Any] | None = None,
    intruder: bool = False,
    outsider: bool = True,
    app_threads: int = 1,
    timeout: float = 900,
    quiet: bool = False,
) -> DeploymentResult:
    """Set up certificates, keys, data and the signed release under ``out``, start every
    process, run, check, let the outsider try (``outsider``), stop.

    Raises:
        DeploymentError: a process failed to start or a check failed.
        RunFailed: the run did not finish as completed.
    """
    started = time.perf_counter()
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    def say(message: str) -> None:
        if not quiet:
            print(f"{time.perf_counter() - started:5.0f} s  {message}", flush=True)

    control = f"127.0.0.1:{free_port()}"  # the SuperLink: the coordinator's side only
    fleet = f"127.0.0.1:{free_port()}"  # the proxy: what the hospitals dial
    registry_port = free_port()
    certs = out / "certs"
    make_ca(out / "ca")
    files = make_server_cert(out / "ca", certs, ["localhost", "127.0.0.1"])
    hospitals = prepare_sites(out, sites, seed)
    values: dict[str, Any] = dict(DEMO_RUN_CONFIG) | {
        "num-server-rounds": rounds,
        "seed": seed,
        "min-train-nodes": sites,
        "min-available-nodes": sites,
        "out-dir": str(out / "run"),
    }
    if he:
        from core.he.ckks import provision

        secret, public = provision(out / "he", overwrite=True)
        values |= {"he": True, "he-secret-context": str(secret), "he-public-context": str(public)}
    values |= dict(run_config or {})
    from core.config import RunConfig

    RunConfig.from_flat(values)  # fail before any process starts
    release, releases, trusted = release_app(out)
    cli_env = write_cli_config(out / "homes" / "cli", control, files.ca)
    homes = out / "homes"
    result = DeploymentResult(
        out=out,
        run_id=-1,
        run_dir=out / "run",
        node_ids={},
        wall_seconds=0,
        fleet_address=fleet,
        control_address=control,
        release=release,
    )
    with running(out / "logs") as processes:
        processes.start(
            "registry", registry_command(releases, registry_port), base_env(homes / "registry")
        )
        coordinator_secret = write_secret(out / "secrets" / "coordinator.superexec")
        processes.start(
            "superlink",
            superlink_command(
                int(control.rsplit(":", 1)[1]), certs, out / "superlink.db", coordinator_secret
            ),
            base_env(homes / "superlink")
            | {"FLWR_SUPERGRID_API_URL": f"http://127.0.0.1:{registry_port}"},
        )
        processes.start(
            "fleet-proxy", proxy_command(fleet, control, certs), base_env(homes / "fleet-proxy")
        )
        wait_healthy("registry", f"http://127.0.0.1:{registry_port}/health", processes)
        wait_healthy("superlink", f"https://{control}/health", processes, files.ca)
        wait_healthy("fleet-proxy", f"https://{fleet}/proxy-health", processes, files.ca)
        processes.start(
            "serverapp",
            superexec_command(control, coordinator_secret, files.ca),
            base_env(homes / "serverapp", app_threads=app_threads),
        )
        result.node_ids = register_nodes(cli_env, {s.name: s.public_key for s in hospitals})
        say(
            f"SuperLink on {control} (TLS, node auth), Fleet-only proxy on {fleet}; "
            f"registered {result.node_ids}; release {release.spec} signed by {release.signers}"
        )
        for site in hospitals:
            start_hospital(processes, site, fleet, files.ca, trusted, homes, app_threads)
        intruder_name = ""
        if intruder:
            intruder_name = start_intruder(
                processes, out, fleet, files.ca, trusted, hospitals[0].data_dir
            )
        wait_nodes_connected(
            processes, {f"supernode-{name}": i for name, i in result.node_ids.items()}, timeout=120
        )
        intruder_check = None
        if intruder:  # observed while the run goes on, so it costs no wall time
            watcher = ThreadPoolExecutor(max_workers=1)
            intruder_check = watcher.submit(
                observe_intruder, processes, intruder_name, cli_env, set(result.node_ids.values())
            )
            watcher.shutdown(wait=False)
        say(f"{sites} hospitals online; flwr run {release.spec} {CONNECTION} --stream")
        with open(out / "logs" / "flwr-run.log", "w") as stream_log:

            def progress(line: str) -> None:
                stream_log.write(line + "\n")
                plain = ANSI_CODE.sub("", line)
                if not quiet and PROGRESS_LINE.search(plain):
                    print(f"  {time.perf_counter() - started:5.0f} s  {plain}", flush=True)

            result.run_id = flwr_run(
                cli_env,
                release.spec,
                CONNECTION,
                run_config=values,
                on_line=progress,
                timeout=timeout,
            )
        if intruder_check is not None:
            result.intruder = intruder_check.result(timeout=180)
        if outsider:
            say("the outsider tries both doors")
            result.outsider = outsider_checks(
                out, fleet, files.ca, cli_env, releases, processes, result.node_ids
            )
    result.processes = dict(processes.tracked)
    result.wall_seconds = time.perf_counter() - started
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, help="work folder (default runs/deploy-<time>)")
    parser.add_argument("--he", action="store_true", help="encrypted aggregation (CKKS)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=900, help="seconds for the run")
    parser.add_argument(
        "--intruder", action="store_true", help="also start an unregistered SuperNode"
    )
    parser.add_argument(
        "--no-outsider", action="store_true", help="skip the outsider's attempts after the run"
    )
    args = parser.parse_args(argv)
    out = args.out or ROOT / "runs" / f"deploy-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        result = run_deployment(
            out,
            sites=args.sites,
            rounds=args.rounds,
            he=args.he,
            seed=args.seed,
            intruder=args.intruder,
            outsider=not args.no_outsider,
            timeout=args.timeout,
        )
    except (DeploymentError, RunFailed) as err:
        print(f"FAILED: {err}\nlogs: {out / 'logs'}", file=sys.stderr)
        return 1
    print(
        f"run {result.run_id} completed in {result.wall_seconds:.0f} s; run folder {result.run_dir}"
    )
    if result.intruder is not None:
        print(f"unregistered SuperNode refused: {result.intruder.refused}")
        for line in result.intruder.superlink_refusals:
            print(f"  superlink: {line.strip()[:160]}")
    if (outsider := result.outsider) is not None:
        print(f"outsider holding only ca.pem, at the Fleet address {result.fleet_address}:")
        for tried in (outsider.register, outsider.run):
            print(f"  {tried.command.split(' /')[0]}: exit {tried.exit_code}; {tried.gist[:150]}")
        print("through the coordinator's Control API (as if reached anyway):")
        for name, lines in outsider.refusals.items():
            print(f"  {name}: refused {len(lines)} app(s); {(lines or [''])[-1][-90:]}")
        print(f"  files written by the outsider's ClientApp: {outsider.loot or 'none'}")
        print(f"  nodes registered beyond the hospitals: {outsider.listed or 'none'}")
        print(f"outsider refused at both doors: {outsider.refused}")
        if not outsider.refused:
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
