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
``flwr run @fedmedvit/fedmedvit==VERSION`` over TLS, checked with ``flwr list``. Each
component declares the files it needs (``Mount``); ``deploy.containers`` passes a launcher
that runs each one in its own container with exactly those files mounted.

Then an outsider who holds only ``ca.pem`` tries both doors (``deploy.outsider``):
registering its own node key and starting its own app through the address the hospitals
dial; and, as if the Control API had been reached anyway, its unsigned app and an app signed
with its own key, run through the coordinator's Control API. Every process started here is
stopped by its PID (process group) on exit.

Over 500 lines: the deployment is one ordered script (PKI, release, coordinator, hospitals,
study, checks) whose steps share the run's paths and processes; process handling and the
outsider's attempts already live in ``deploy.processes`` and ``deploy.outsider``.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploy.outsider import ANSI_CODE, OutsiderOutcome, outsider_checks
from deploy.pki import CA_CERT, make_ca, make_node_key, make_server_cert
from deploy.processes import (
    CONNECTION,
    HOSPITAL,
    DeploymentError,
    Launcher,
    Mount,
    Processes,
    base_env,
    running,
    wait_healthy,
    write_cli_config,
    write_secret,
)
from deploy.release import Release, keygen, sign, trusted_entities
from simulations.flower_cli import (
    BIN,
    RunFailed,
    flwr_run,
    free_port,
    list_supernodes,
    overrides_string,
)

ROOT = Path(__file__).resolve().parent.parent
APP_PACKAGES = ("core", "client", "server")  # what the ServerApp and ClientApp import
# What the SuperLink logs when a SuperNode offers a key nobody registered (flwr 1.41 and 1.42).
REFUSAL_MARK = "No SuperNode found with the given public key"
# Worth echoing from the ServerApp log stream: each round's phases and any failure.
PROGRESS_LINE = re.compile(r"^\d\d/\d\d/\d{4} \S+:INFO:configure_|ERROR|Traceback")
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
    # Seconds until the coordinator's services answered, and until every hospital connected.
    startup: dict[str, float] = field(default_factory=dict)


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


def supernode_command(
    site: Site, superlink: str, ca: Path, trusted: Path, he_secret: Path | None = None
) -> list[str]:
    """A hospital's SuperNode: dials ``superlink`` (the Fleet-only proxy) over TLS, signs in
    with its registered key, and runs only apps signed by a key in ``trusted``. Its node
    config names the hospital's own files, the secret HE context among them (HE runs): the
    run config, which the coordinator sends to every node, names none of them."""
    node_config = {
        "site-name": site.name,
        "data-dir": str(site.data_dir),
        "state-dir": str(site.state_dir),
    }
    if he_secret is not None:
        node_config["he-secret-context"] = str(he_secret)
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


@dataclass(frozen=True)
class Coordinator:
    """The coordinator's side: its addresses and the files its components use."""

    control: str  # the SuperLink (Control, Fleet and Runtime API): coordinator only
    fleet: str  # the Fleet-only proxy: what the hospitals dial
    registry_port: int
    certs: Path  # ca.pem, server.pem, server.key
    database: Path  # the SuperLink's, in a folder of its own
    secret: Path  # shared by the SuperLink and the ServerApp's SuperExec
    releases: Path  # signed app releases, served by the registry
    run_dir: Path  # the ServerApp's out-dir
    he_public: Path | None = None  # the public HE context (HE runs)


def start_coordinator(processes: Processes, c: Coordinator, homes: Path) -> None:
    """The app registry, the SuperLink and the Fleet-only proxy, each with only its files."""
    processes.start(
        "registry",
        registry_command(c.releases, c.registry_port),
        base_env(homes / "registry"),
        mounts=[Mount(c.releases)],
    )
    processes.start(
        "superlink",
        superlink_command(int(c.control.rsplit(":", 1)[1]), c.certs, c.database, c.secret),
        base_env(homes / "superlink")
        | {"FLWR_SUPERGRID_API_URL": f"http://127.0.0.1:{c.registry_port}"},
        mounts=[Mount(c.certs), Mount(c.secret), Mount(c.database.parent, True)],
    )
    processes.start(
        "fleet-proxy",
        proxy_command(c.fleet, c.control, c.certs),
        base_env(homes / "fleet-proxy"),
        mounts=[Mount(c.certs)],
    )


def start_serverapp(processes: Processes, c: Coordinator, homes: Path, app_threads: int) -> None:
    """The ServerApp's SuperExec: the CA, its secret, the run folder and the public context."""
    ca = c.certs / CA_CERT
    he = [Mount(c.he_public)] if c.he_public is not None else []
    processes.start(
        "serverapp",
        superexec_command(c.control, c.secret, ca),
        base_env(homes / "serverapp", app_threads=app_threads),
        mounts=[Mount(ca), Mount(c.secret), Mount(c.run_dir, True), *he],
    )


def supernode_mounts(site: Site, ca: Path, trusted: Path) -> list[Mount]:
    """What a hospital's SuperNode reads: the CA certificate, its own node key, the release
    keys it trusts and its SuperExec secret. Never the data: its ClientApp reads that."""
    return [Mount(ca), Mount(site.private_key), Mount(trusted), Mount(site.superexec_secret)]


def clientapp_mounts(site: Site, he_secret: Path | None) -> list[Mount]:
    """What a hospital's ClientApp reads and writes: its SuperExec secret, its own data
    (read-only), its own state (the privacy ledger; writable) and the sites' secret HE
    context (HE only)."""
    mounts = [Mount(site.superexec_secret), Mount(site.data_dir), Mount(site.state_dir, True)]
    return mounts + ([Mount(he_secret)] if he_secret is not None else [])


def start_hospital(
    processes: Processes,
    site: Site,
    superlink: str,
    ca: Path,
    trusted: Path,
    homes: Path,
    app_threads: int,
    he_secret: Path | None = None,
) -> None:
    site.state_dir.mkdir(parents=True, exist_ok=True)
    processes.start(
        f"supernode-{site.name}",
        supernode_command(site, superlink, ca, trusted, he_secret),
        base_env(homes / f"supernode-{site.name}"),
        role=HOSPITAL,
        mounts=supernode_mounts(site, ca, trusted),
    )
    processes.start(
        f"clientapp-{site.name}",
        superexec_command(f"127.0.0.1:{site.runtime_port}", site.superexec_secret, None),
        base_env(homes / f"clientapp-{site.name}", app_threads=app_threads),
        role=HOSPITAL,
        mounts=clientapp_mounts(site, he_secret),
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
    processes.start(
        name,
        command,
        base_env(out / "homes" / name),
        role=HOSPITAL,
        mounts=supernode_mounts(site, ca, trusted),
    )
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
    launcher: Launcher | None = None,
    inspect: Callable[[DeploymentResult, Processes], None] | None = None,
) -> DeploymentResult:
    """Set up certificates, keys, data and the signed release under ``out``, start every
    process, run, check, let the outsider try (``outsider``), stop.

    With a ``launcher`` every component runs in a container (``deploy.containers``) that
    gets only the files it declares (:class:`Mount`). ``inspect`` is called after the run,
    while everything is still up.

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
    he_secret: Path | None = None  # every hospital's node config names it (HE runs)
    if he:
        from core.he.ckks import provision

        he_secret, public = provision(out / "he", overwrite=True)
        values |= {"he": True, "he-public-context": str(public)}
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
    database = out / "superlink" / "superlink.db"  # a folder of its own: mounted writable
    database.parent.mkdir(parents=True, exist_ok=True)
    result.run_dir.mkdir(parents=True, exist_ok=True)
    coordinator = Coordinator(
        control=control,
        fleet=fleet,
        registry_port=registry_port,
        certs=certs,
        database=database,
        secret=write_secret(out / "secrets" / "coordinator.superexec"),
        releases=releases,
        run_dir=result.run_dir,
        he_public=Path(values["he-public-context"]) if values.get("he") else None,
    )
    with running(out / "logs", launcher) as processes:
        coordinator_started = time.perf_counter()
        start_coordinator(processes, coordinator, homes)
        wait_healthy("registry", f"http://127.0.0.1:{registry_port}/health", processes)
        wait_healthy("superlink", f"https://{control}/health", processes, files.ca)
        wait_healthy("fleet-proxy", f"https://{fleet}/proxy-health", processes, files.ca)
        result.startup["coordinator"] = time.perf_counter() - coordinator_started
        start_serverapp(processes, coordinator, homes, app_threads)
        result.node_ids = register_nodes(cli_env, {s.name: s.public_key for s in hospitals})
        say(
            f"SuperLink on {control} (TLS, node auth), Fleet-only proxy on {fleet}; "
            f"registered {result.node_ids}; release {release.spec} signed by {release.signers}"
        )
        hospitals_started = time.perf_counter()
        for site in hospitals:
            start_hospital(processes, site, fleet, files.ca, trusted, homes, app_threads, he_secret)
        intruder_name = ""
        if intruder:
            intruder_name = start_intruder(
                processes, out, fleet, files.ca, trusted, hospitals[0].data_dir
            )
        wait_nodes_connected(
            processes, {f"supernode-{name}": i for name, i in result.node_ids.items()}, timeout=120
        )
        result.startup["hospitals"] = time.perf_counter() - hospitals_started
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
        if inspect is not None:
            inspect(result, processes)
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
