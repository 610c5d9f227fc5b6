"""The real deployment: container files checked against the real Flower CLI, and the same
deployment run as local processes (TLS, registered SuperNodes, separate app processes).

The compose file and Dockerfile are checked statically here (tests/deploy/test_containers.py
builds and runs them with Podman): every flag they pass must exist in the installed
``flower-superlink``/``flower-supernode``/``flower-superexec``/``flwr`` (flags come and go
between Flower releases), the images must install our flwr version, each hospital's mounts
must match the paths its node config and the run config name, only the Fleet-only proxy may
be published beyond the coordinator's loopback, SuperNodes must verify app signatures,
containers must be hardened and dependencies locked
with hashes. Then real processes: the Fleet-only proxy in front of a real SuperLink refuses
an outsider's Control API calls; a signed release goes through the app registry and Flower's
own verification code; and (slow) ``deploy.local`` runs the whole deployment on loopback,
with one SuperNode whose key was never registered and an outsider who tries to register a
node and to get its own app executed in the hospitals.

Over 500 lines: every deployment artefact checked against the shared fixtures defined here.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import ssl
import subprocess
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

import httpx
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key

from core.config import RunConfig
from deploy import local
from deploy import processes as procs
from deploy.containers import dockerfile_entrypoints
from deploy.outsider import attempt, write_probe_app
from deploy.pki import make_ca, make_node_key, make_server_cert
from simulations import flower_cli
from simulations.flower_cli import BIN

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DEPLOY_DIR = "/srv/deploy"  # stands in for ${DEPLOY_DIR} when the compose file is read
HOSPITALS = ("hospital-1", "hospital-2", "hospital-3")
APP_UID = "49999"  # the images' user `app`
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?error}``, as compose reads them."""

    def replace(match: re.Match[str]) -> str:
        name, op, arg = match[1], match[2], match[3]
        if env.get(name):
            return env[name]
        if op == ":-":
            return arg or ""
        raise AssertionError(f"${{{name}}} is required: {arg}")

    return re.sub(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", replace, text)


@pytest.fixture(scope="module")
def compose() -> dict:
    text = interpolate((DEPLOY / "compose.yaml").read_text(), {"DEPLOY_DIR": DEPLOY_DIR})
    return yaml.safe_load(text)


@pytest.fixture(scope="module")
def run_config() -> dict:
    with (DEPLOY / "run-config.toml").open("rb") as handle:
        return tomllib.load(handle)


@pytest.fixture(scope="module")
def pyproject() -> dict:
    with (ROOT / "pyproject.toml").open("rb") as handle:
        return tomllib.load(handle)


@functools.cache
def cli_options(*command: str) -> frozenset[str]:
    """Every ``--option`` the installed CLI's ``--help`` lists."""
    env = os.environ | {"COLUMNS": "200", "NO_COLOR": "1", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    out = subprocess.run(
        [str(BIN / command[0]), *command[1:], "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    options = frozenset(OPTION.findall(out.stdout))
    assert "--help" in options, f"{command} --help printed no options:\n{out.stdout}{out.stderr}"
    return options


def flags(arguments: list[str]) -> list[str]:
    return [arg.split("=", 1)[0] for arg in arguments if arg.startswith("--")]


def option_values(arguments: list[str]) -> dict[str, str]:
    """``--flag=value`` and ``--flag value`` forms; bare flags map to ''."""
    values: dict[str, str] = {}
    for i, arg in enumerate(arguments):
        if not arg.startswith("--"):
            continue
        if "=" in arg:
            key, value = arg.split("=", 1)
        else:
            following = arguments[i + 1] if i + 1 < len(arguments) else ""
            key, value = arg, "" if following.startswith("--") else following
        values[key] = value
    return values


def mounts(service: dict) -> dict[str, tuple[str, bool]]:
    """Container path -> (host path, read-only) for a service's short-syntax volumes."""
    result = {}
    for volume in service.get("volumes", []):
        parts = volume.split(":")
        assert len(parts) in (2, 3), volume
        result[parts[1]] = (parts[0], len(parts) == 3 and parts[2] == "ro")
    return result


def mounted_at(service: dict, path: str) -> tuple[str, bool] | None:
    """The mount that provides container ``path`` (the path itself or a parent folder)."""
    target = PurePosixPath(path)
    for container, (host, read_only) in mounts(service).items():
        if target == PurePosixPath(container) or PurePosixPath(container) in target.parents:
            return host, read_only
    return None


def entrypoint(service: dict) -> tuple[str, ...]:
    """The CLI a service runs, with its subcommand (``python -m deploy.release serve``)."""
    assert service["build"]["dockerfile"] == "deploy/app.Dockerfile"
    words = list(service.get("entrypoint") or dockerfile_entrypoints()[service["build"]["target"]])
    if words[0] != "python":
        return (words[0],)
    assert words[:2] == ["python", "-m"], words  # our modules, copied into the image
    subcommand = [w for w in service["command"][:1] if not w.startswith("-")]
    return (*words, *subcommand)


def _installed(name: str) -> str:
    from importlib.metadata import version

    return version(name)


# --- static checks of the container files -------------------------------------------------


def test_images_install_the_flwr_version_in_use(compose, pyproject):
    version = _installed("flwr")
    assert f"flwr[simulation]=={version}" in pyproject["project"]["dependencies"]
    assert locked()["flwr"][0] == version
    dockerfile = (DEPLOY / "app.Dockerfile").read_text()
    # The package requires Python 3.11: so does the default base image.
    assert pyproject["project"]["requires-python"] == ">=3.11,<3.12"
    assert "ARG BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm\n" in dockerfile
    assert "FROM ${BASE_IMAGE} AS runtime\n" in dockerfile
    assert dockerfile_entrypoints() == {
        "coordinator": ["flower-superlink"],
        "hospital": ["flower-supernode"],
    }
    for service in compose["services"].values():
        target = service["build"]["target"]
        assert service["image"] == f"fedmedvit-{target}:{pyproject['project']['version']}"


def locked() -> dict[str, tuple[str, list[str]]]:
    """deploy/requirements.lock: name -> (version, hashes)."""
    entries: dict[str, tuple[str, list[str]]] = {}
    text = (DEPLOY / "requirements.lock").read_text().replace("\\\n", " ")
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = re.match(r"^([A-Za-z0-9._-]+)==(\S+)((?:\s+--hash=sha256:[0-9a-f]{64})*)\s*$", line)
        assert match, f"requirements.lock: not a pinned, hashed requirement: {line[:100]}"
        entries[match[1].lower()] = (match[2], re.findall(r"sha256:([0-9a-f]{64})", match[3]))
    return entries


def test_app_image_installs_every_dependency_from_the_hashed_lock(pyproject):
    dockerfile = (DEPLOY / "app.Dockerfile").read_text()
    install = re.search(r"pip install (.*)", dockerfile.replace("\\\n", " "))
    assert install is not None
    words = install[1].split()
    assert {"--require-hashes", "--no-deps", "--only-binary=:all:"} <= set(words)
    assert words[words.index("-r") + 1] == "/opt/requirements.lock"
    assert "COPY deploy/requirements.lock /opt/requirements.lock\n" in dockerfile
    assert dockerfile.count("pip install") == 1, "nothing may be installed outside the lock"
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in dockerfile

    lock = locked()
    assert all(hashes for _, hashes in lock.values())
    assert "ray" not in lock  # the [simulation] extra stays out of the image
    # Every pin of pyproject.toml is in requirements.in and the lock at the same version
    # (torch as its CPU build).
    wanted = (DEPLOY / "requirements.in").read_text().split()
    for dependency in pyproject["project"]["dependencies"]:
        name, _, version = re.sub(r"\[.*\]", "", dependency).partition("==")
        if not version:
            continue
        version = f"{version}+cpu" if name == "torch" else version
        assert f"{name}=={version}" in wanted, f"requirements.in: {name}=={version}"
        assert lock[name.lower()][0] == version, f"requirements.lock: {name} is not {version}"
    # Everything COPY'd must survive the Dockerfile's ignore file, and nothing else is sent.
    ignore = [
        line.strip()
        for line in (DEPLOY / "app.Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ignore[0] == "*"  # exclude everything, then allow back what the image needs
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copied = re.findall(r"^COPY (.+) \S+$", dockerfile, flags=re.M)
    assert {name for line in copied for name in line.split()} == allowed


def test_every_flag_in_the_compose_file_exists_in_the_installed_cli(compose, help_pages):
    for name, service in compose["services"].items():
        command = service["command"]
        unknown = set(flags(command)) - cli_options(*entrypoint(service))
        assert not unknown, f"{name}: {entrypoint(service)} has no {sorted(unknown)}"


def test_every_flag_in_the_local_deployment_exists_in_the_installed_cli(tmp_path, help_pages):
    site = local.Site(
        name="h",
        data_dir=tmp_path,
        state_dir=tmp_path,
        private_key=tmp_path / "k",
        public_key=tmp_path / "k.pub",
        runtime_port=9094,
        superexec_secret=tmp_path / "s",
    )
    commands = [
        local.superlink_command(8000, tmp_path, tmp_path / "db", tmp_path / "s"),
        local.supernode_command(site, "127.0.0.1:8000", tmp_path / "ca.pem", tmp_path / "t"),
        local.superexec_command("127.0.0.1:8000", tmp_path / "s", tmp_path / "ca.pem"),
        local.superexec_command("127.0.0.1:9094", tmp_path / "s", None),
    ]
    for command in commands:
        unknown = set(flags(command[1:])) - cli_options(Path(command[0]).name)
        assert not unknown, f"{command[0]} has no {sorted(unknown)}"
    assert "--trusted-entities" in commands[1]
    assert set(flags(["--name"])) <= cli_options("flwr", "supernode", "register")
    ours = {
        ("python", "-m", "deploy.release", "serve"): local.registry_command(tmp_path, 9180),
        ("python", "-m", "deploy.fleet_proxy"): local.proxy_command("h:1", "h:2", tmp_path),
    }
    for cli, command in ours.items():
        unknown = set(flags(command)) - cli_options(*cli)
        assert not unknown, f"{cli} has no {sorted(unknown)}"


def readme_commands() -> list[tuple[tuple[str, ...], list[str]]]:
    """(CLI command, words) for every ``flwr``/``python -m`` line in the README's bash blocks."""
    readme = (DEPLOY / "README.md").read_text()
    found = []
    for block in re.findall(r"```bash\n(.*?)```", readme, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line.split(" #")[0])
            if words[:1] == ["flwr"]:
                found.append((tuple(words[: 3 if words[1] == "supernode" else 2]), words))
            elif words[:2] == ["python", "-m"]:
                has_subcommand = len(words) > 3 and not words[3].startswith("-")
                found.append((tuple(words[: 4 if has_subcommand else 3]), words))
    return found


@pytest.fixture(scope="module")
def help_pages(compose):
    """Read every ``--help`` these tests need in parallel (each CLI start costs seconds)."""
    commands = {entrypoint(service) for service in compose["services"].values()}
    commands |= {("flower-superlink",), ("flower-supernode",), ("flower-superexec",)}
    commands |= {("flwr", "supernode", "register")} | {c for c, _ in readme_commands()}
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        list(pool.map(lambda command: cli_options(*command), sorted(commands)))


def test_flwr_commands_in_the_readme_use_real_flags(help_pages):
    commands = readme_commands()
    for command, words in commands:
        unknown = set(flags(words)) - cli_options(*command)
        assert not unknown, f"README: {' '.join(command)} has no {sorted(unknown)}"
    assert len(commands) >= 8


def test_coordinator_runs_tls_with_supernode_auth(compose, run_config):
    superlink = compose["services"]["superlink"]
    options = option_values(superlink["command"])
    assert "--insecure" not in options and "--enable-supernode-auth" in options
    assert options["--isolation"] == "process"
    for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile"):
        mount = mounted_at(superlink, options[flag])
        assert mount is not None and mount[1], f"superlink {flag} is not mounted read-only"
    assert mounted_at(superlink, options["--superexec-auth-secret-file"]) is not None
    database = mounted_at(superlink, options["--database"])
    assert database == (f"{DEPLOY_DIR}/coordinator/state", False)  # persisted, writable

    serverapp = compose["services"]["serverapp"]
    options = option_values(serverapp["command"])
    assert "--insecure" not in options
    assert (
        options["--runtime-api-address"]
        == f"superlink:{option_values(superlink['command'])['--port']}"
    )
    assert mounted_at(serverapp, options["--root-certificates"])[1]
    public = mounted_at(serverapp, run_config["he-public-context"])
    assert public is not None and public[1] and public[0].endswith("server_public.ctx")
    out_dir = mounted_at(serverapp, run_config["out-dir"])
    assert out_dir is not None and not out_dir[1]
    # The coordinator never holds the sites' secret key or their data.
    for service in (superlink, serverapp):
        assert not any(
            "secret.ctx" in host or "/data" in host for host, _ in mounts(service).values()
        )
    assert serverapp["networks"] == ["coordinator"]


@pytest.mark.parametrize("hospital", HOSPITALS)
def test_each_hospital_mounts_its_own_folders_where_its_node_config_points(
    compose, run_config, hospital
):
    supernode = compose["services"][f"{hospital}-supernode"]
    clientapp = compose["services"][f"{hospital}-clientapp"]
    own = f"{DEPLOY_DIR}/{hospital}/"
    node = option_values(supernode["command"])
    assert "--insecure" not in node and node["--isolation"] == "process"
    assert node["--superlink"] == "fleet-proxy:8000"  # never the SuperLink itself
    trust = mounted_at(supernode, node["--trusted-entities"])
    assert trust == (f"{own}trust/trusted-entities.yaml", True), "its own list, read-only"
    key = mounted_at(supernode, node["--auth-supernode-private-key"])
    assert key is not None and key[1] and key[0].startswith(own)
    ca = mounted_at(supernode, node["--root-certificates"])
    assert ca is not None and ca[1] and ca[0] == f"{own}certificates/ca.pem"

    from flwr.common.config import parse_config_args  # Flower's own --node-config parser

    node_config = parse_config_args([node["--node-config"]])
    assert node_config["site-name"] == hospital
    data = mounted_at(clientapp, node_config["data-dir"])
    state = mounted_at(clientapp, node_config["state-dir"])
    secret = mounted_at(clientapp, node_config["he-secret-context"])
    assert data == (f"{own}data", True), "data: this hospital's folder, read-only"
    assert state == (f"{own}state", False), "state (privacy ledger): own folder, writable"
    assert secret == (f"{own}he/site_secret.ctx", True), "HE secret context: own copy, read-only"
    # The run config goes to every node (and the coordinator): it names no site's secret.
    assert node_config["he-secret-context"] not in run_config.values()
    assert not [k for k in run_config if "secret" in k]
    assert all(host.startswith(own) for host, _ in mounts(clientapp).values())
    assert all(host.startswith(own) for host, _ in mounts(supernode).values())

    # The ClientApp talks only to its own SuperNode, over the hospital's private network.
    app = option_values(clientapp["command"])
    assert app["--runtime-api-address"] == f"{hospital}-supernode:{node['--port']}"
    assert node["--superexec-auth-secret-file"] == app["--superexec-auth-secret-file"]
    assert clientapp["networks"] == [hospital]
    assert set(supernode["networks"]) == {"fleet", hospital}
    others = {name for name, s in compose["services"].items() if hospital in s["networks"]}
    assert others == {f"{hospital}-supernode", f"{hospital}-clientapp"}


def test_every_container_path_in_a_command_is_mounted(compose):
    for name, service in compose["services"].items():
        for value in option_values(service["command"]).values():
            if value.startswith("/app/"):
                assert mounted_at(service, value) is not None, f"{name}: {value} not mounted"


def published(service: dict) -> list[tuple[str, str, str]]:
    """(host address, host port, container port) for a service's short-syntax ports."""
    result = []
    for entry in service.get("ports", []):
        parts = str(entry).split(":")
        assert len(parts) in (2, 3), f"give ports as [ADDRESS:]HOST:CONTAINER: {entry}"
        result.append(("0.0.0.0", *parts) if len(parts) == 2 else tuple(parts))
    return result


def test_only_the_fleet_api_is_reachable_from_the_hospitals(compose):
    """The Control API (register nodes, start runs; no login in flwr 1.41 or 1.42) shares the
    SuperLink's port: that port is published on the coordinator's loopback only, and the
    hospitals' network reaches the coordinator through the Fleet-only proxy."""
    services = compose["services"]
    superlink, proxy = services["superlink"], services["fleet-proxy"]
    open_ports = {
        (name, host_port)
        for name, service in services.items()
        for address, host_port, _ in published(service)
        if address != "127.0.0.1"
    }
    assert open_ports == {("fleet-proxy", "8000")}
    assert all(address == "127.0.0.1" for address, _, _ in published(superlink))
    assert "fleet" not in superlink["networks"]
    on_fleet = {name for name, service in services.items() if "fleet" in service["networks"]}
    assert on_fleet == {"fleet-proxy"} | {f"{h}-supernode" for h in HOSPITALS}

    link = option_values(superlink["command"])
    forward = option_values(proxy["command"])
    assert proxy["entrypoint"] == ["python", "-m", "deploy.fleet_proxy"]
    assert forward["--upstream"] == f"superlink:{link['--port']}"
    listen_port = forward["--listen"].rsplit(":", 1)[1]
    assert published(proxy) == [("0.0.0.0", "8000", listen_port)]
    for flag in ("--ca", "--certfile", "--keyfile"):
        assert mounted_at(proxy, forward[flag])[1], f"fleet-proxy {flag} not read-only"
    for hospital in HOSPITALS:
        node = option_values(services[f"{hospital}-supernode"]["command"])
        assert node["--superlink"] == f"fleet-proxy:{listen_port}"


def test_supernodes_run_only_apps_signed_by_the_consortium(compose):
    services = compose["services"]
    for hospital in HOSPITALS:
        node = option_values(services[f"{hospital}-supernode"]["command"])
        assert node["--trusted-entities"].startswith("/app/"), hospital
    # The SuperLink takes signed releases from the coordinator's own registry, which only
    # the coordinator's network reaches.
    registry = services["app-registry"]
    assert registry["entrypoint"] == ["python", "-m", "deploy.release"]
    serve = option_values(registry["command"])
    assert registry["command"][0] == "serve" and registry["networks"] == ["coordinator"]
    assert mounted_at(registry, serve["--releases"])[1], "releases: read-only"
    assert "ports" not in registry
    url = services["superlink"]["environment"]["FLWR_SUPERGRID_API_URL"]
    assert url == f"http://app-registry:{serve['--port']}"


def test_every_container_is_hardened(compose):
    dockerfile = (DEPLOY / "app.Dockerfile").read_text()
    users = re.findall(r"^USER (\S+)$", dockerfile, flags=re.M)
    assert users and users[-1] not in ("root", "0"), "the app image must end as a non-root USER"
    for name, service in compose["services"].items():
        assert str(service.get("user", "")).split(":")[0] == APP_UID, f"{name}: user"
        assert service.get("read_only") is True, f"{name}: read-only root filesystem"
        assert service.get("init") is True, f"{name}: an init process as PID 1"
        assert service.get("cap_drop") == ["ALL"], f"{name}: cap_drop [ALL]"
        assert "no-new-privileges:true" in service.get("security_opt", []), name
        assert "/tmp" in service.get("tmpfs", []), f"{name}: writable /tmp (tmpfs)"
        assert service["environment"]["FLWR_HOME"].startswith("/tmp/"), name
        assert not service.get("privileged"), name
        assert "network_mode" not in service, name
        writable = [c for c, (_, ro) in mounts(service).items() if not ro]
        assert all(c in ("/app/state", "/app/runs") for c in writable), f"{name}: {writable}"


def test_deployment_run_config_is_valid(run_config, pyproject):
    assert set(run_config) <= set(pyproject["tool"]["flwr"]["app"]["config"])
    cfg = RunConfig.from_flat(run_config)
    assert cfg.he and cfg.dp and cfg.min_available_nodes == len(HOSPITALS)


# --- certificates and node keys -------------------------------------------------------------


def test_server_certificate_and_node_keys_are_what_flower_reads(tmp_path):
    make_ca(tmp_path / "ca")
    files = make_server_cert(tmp_path / "ca", tmp_path / "certs", ["superlink", "10.0.0.5"])
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    ca = x509.load_pem_x509_certificate(files.ca.read_bytes())
    cert.verify_directly_issued_by(ca)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "superlink"} <= set(names.get_values_for_type(x509.DNSName))
    ips = {str(ip) for ip in names.get_values_for_type(x509.IPAddress)}
    assert ips == {"127.0.0.1", "10.0.0.5"}
    for private in (files.key, tmp_path / "ca" / "ca.key"):
        assert private.stat().st_mode & 0o777 == 0o600

    from flwr.cli.supernode.register import try_load_public_key  # imports typer: warns

    public = make_node_key(tmp_path / "keys" / "node.key")
    assert try_load_public_key(public)  # exactly what `flwr supernode register` runs
    key = load_ssh_private_key((tmp_path / "keys" / "node.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert (tmp_path / "keys" / "node.key").stat().st_mode & 0o777 == 0o600


# --- signed releases and the Fleet-only proxy, real processes -------------------------------


def test_a_signed_release_passes_flowers_own_verification_and_nothing_else_does(tmp_path):
    """Sign a release, serve it from the registry (real HTTP), fetch it the way the SuperLink
    does, and verify it with the SuperNode's own code and a trusted-entities file: the
    consortium's signature passes; an outsider's signature, an altered FAB and an unsigned
    FAB do not."""
    import threading
    from http.server import ThreadingHTTPServer

    from flwr.supercore.fab import Fab
    from flwr.supercore.utils import request_download_link
    from flwr.superlink.servicer.control.control_handlers import _format_verification
    from flwr.supernode.cli.flower_supernode import _try_obtain_trusted_entities
    from flwr.supernode.start_client_internal import _verify_fab

    from deploy import release

    app = write_probe_app(tmp_path / "app", tmp_path / "loot")
    key, public = release.keygen(tmp_path / "keys" / "consortium")
    stranger, _ = release.keygen(tmp_path / "keys" / "stranger")
    signed = release.sign(app, key, tmp_path / "releases")
    assert signed.spec == "@outsider/probe==1.0.0"
    make_node_key(tmp_path / "keys" / "ecdsa")  # a node key is not a release key
    with pytest.raises(release.ReleaseError, match="Ed25519"):
        release.sign(app, tmp_path / "keys" / "ecdsa", tmp_path / "other")
    with pytest.raises(release.ReleaseError, match="keygen"):
        release.sign(app, tmp_path / "keys" / "missing", tmp_path / "other")
    with pytest.raises(release.ReleaseError, match="overwrite"):
        release.keygen(key)
    trusted = release.trusted_entities([public], tmp_path / "trusted.yaml")
    entities = _try_obtain_trusted_entities(trusted)  # Flower's own reader
    assert entities is not None

    server = ThreadingHTTPServer(("127.0.0.1", 0), release.make_handler(tmp_path / "releases"))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}{release.FETCH_ROUTE}"
        fab_url, verifications, _ = request_download_link(
            "@outsider/probe", "1.0.0", url, "fab_url"
        )
        content = httpx.get(fab_url).content
        with pytest.raises(ValueError, match="not found"):
            request_download_link("@outsider/probe", "9.9.9", url, "fab_url")
        with pytest.raises(ValueError, match="not found"):
            request_download_link("@outsider/../probe", "1.0.0", url, "fab_url")
    finally:
        server.shutdown()
        server.server_close()
    assert verifications is not None
    fab = Fab(signed.sha256, content, _format_verification(verifications))
    assert _verify_fab(fab, entities)
    assert not _verify_fab(Fab(fab.hash_str, content + b" ", fab.verifications), entities)

    # Signed by a stranger only: not verified. (Unsigned apps, `flwr run DIR`, carry no
    # verification at all; the slow deployment test shows every SuperNode refusing one.)
    foreign = release.sign(app, stranger, tmp_path / "foreign")
    meta = json.loads((foreign.fab.with_suffix(".json")).read_text())
    assert not _verify_fab(
        Fab(fab.hash_str, content, _format_verification(meta["verifications"])), entities
    )

    # A released version is immutable: changed code needs a new version.
    (app / "probe.py").write_text("# altered after release\n")
    with pytest.raises(release.ReleaseError, match="bump the version"):
        release.sign(app, key, tmp_path / "releases")


@pytest.fixture
def guarded_superlink(tmp_path):
    """A real SuperLink (TLS, node auth) on a port only the coordinator uses, and the
    Fleet-only proxy the hospitals dial."""
    certs = tmp_path / "certs"
    make_ca(tmp_path / "ca")
    files = make_server_cert(tmp_path / "ca", certs, ["localhost", "127.0.0.1"])
    control, fleet = f"127.0.0.1:{flower_cli.free_port()}", f"127.0.0.1:{flower_cli.free_port()}"
    secret = procs.write_secret(tmp_path / "secret")
    with procs.running(tmp_path / "logs") as processes:
        processes.start(
            "superlink",
            local.superlink_command(int(control.split(":")[1]), certs, tmp_path / "db", secret),
            procs.base_env(tmp_path / "homes" / "superlink"),
        )
        processes.start(
            "fleet-proxy",
            local.proxy_command(fleet, control, certs),
            procs.base_env(tmp_path / "homes" / "proxy"),
        )
        procs.wait_healthy("superlink", f"https://{control}/health", processes, files.ca)
        procs.wait_healthy("fleet-proxy", f"https://{fleet}/proxy-health", processes, files.ca)
        yield control, fleet, files.ca


def test_the_fleet_address_refuses_an_outsiders_registration_and_run(guarded_superlink, tmp_path):
    """The attack of the issue, against real processes: with only ca.pem, `flwr supernode
    register` and `flwr run` at the address the hospitals dial. Before the proxy, that
    address was the SuperLink's and both succeeded."""
    control, fleet, ca = guarded_superlink
    outsider = procs.write_cli_config(tmp_path / "outsider", fleet, ca)
    coordinator = procs.write_cli_config(tmp_path / "coordinator", control, ca)
    public = make_node_key(tmp_path / "keys" / "outsider")
    app = write_probe_app(tmp_path / "app", tmp_path / "loot")
    with ThreadPoolExecutor(max_workers=2) as pool:
        register, run = pool.map(
            lambda args: attempt(outsider, *args),
            [
                ("supernode", "register", str(public), procs.CONNECTION),
                ("run", str(app), procs.CONNECTION),
            ],
        )
    assert register.exit_code != 0 and "registered" not in register.output, register.output
    assert run.exit_code != 0 and "Successfully started run" not in run.output, run.output
    # Nothing reached the SuperLink: no node, no run (asked on the coordinator's side).
    assert flower_cli.list_supernodes(coordinator, procs.CONNECTION) == []
    assert flower_cli.list_runs(coordinator, procs.CONNECTION) == []

    # Route by route: Control, Runtime and docs are not served at the Fleet address; Fleet
    # routes reach the SuperLink (which answers with its own node-auth refusal).
    verify = ssl.create_default_context(cafile=str(ca))
    with httpx.Client(base_url=f"https://{fleet}", verify=verify, timeout=30) as client:
        for path in ("/v1/control/start-run", "/v1/control/register-node", "/v1/runtime/get-run"):
            assert client.post(path, content=b"").status_code == 404, path
        assert client.get("/docs").status_code == 404
        assert client.get("/v1/fleet/pull-messages").status_code == 404  # POST only
        forwarded = client.post("/v1/fleet/pull-messages", content=b"")
        assert forwarded.status_code not in (404, 502, 503), forwarded.text
    with httpx.Client(base_url=f"https://{control}", verify=verify, timeout=30) as client:
        assert client.post("/v1/control/list-runs", content=b"").status_code != 404


# --- the deployment, for real, on loopback ---------------------------------------------------


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """Three phantom hospitals, two rounds, DP on, plus one SuperNode nobody registered and,
    after the run, the outsider (several minutes on 2 cores: the tests using it are slow)."""
    out = tmp_path_factory.mktemp("deploy")
    try:
        return local.run_deployment(out, sites=3, rounds=2, intruder=True, quiet=True, timeout=600)
    except (procs.DeploymentError, flower_cli.RunFailed) as err:
        logs = "\n".join(
            f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-15:])
            for p in sorted((out / "logs").glob("*.log"))
        )
        pytest.fail(f"local deployment failed: {err}\n{logs}")


@pytest.mark.slow
def test_local_tls_deployment_with_registered_nodes_completes(deployment):
    logs = deployment.out / "logs"
    assert deployment.run_id > 0  # flwr list said finished:completed
    assert "Uvicorn running on https://127.0.0.1:" in (logs / "superlink.log").read_text()
    superlink_log = (logs / "superlink.log").read_text()
    for name, node_id in deployment.node_ids.items():
        assert f"Activated node_id={node_id}" in superlink_log, f"{name} never authenticated"
    # The hospitals reached the SuperLink through the Fleet-only proxy, and ran the signed
    # release (a SuperNode with --trusted-entities refuses anything else).
    assert deployment.fleet_address != deployment.control_address
    assert "POST /v1/fleet/pull-messages" in (logs / "fleet-proxy.log").read_text()
    assert deployment.release is not None and deployment.release.spec.startswith("@fedmedvit/")

    metrics = json.loads((deployment.run_dir / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    for entry in metrics["rounds"]:
        assert entry["status"] == {name: "trained" for name in deployment.node_ids}
    privacy = json.loads((deployment.run_dir / "privacy.json").read_text())
    assert set(privacy["sites"]) == set(deployment.node_ids)
    for name in deployment.node_ids:  # the ledger went to the node config's state-dir
        ledger = deployment.out / "state" / name / "privacy-ledger.json"
        assert ledger.is_file()
        spent = [r["epsilon"] for r in privacy["sites"][name]["rounds"]]
        assert len(spent) == 2 and 0 < spent[0] < spent[1] <= 8.0 + 1e-9


@pytest.mark.slow
def test_a_supernode_with_an_unregistered_key_is_refused(deployment):
    intruder = deployment.intruder
    assert intruder is not None
    assert intruder.exit_code not in (None, 0), intruder.log[-2000:]
    assert "Failed to activate SuperNode" in intruder.log
    assert intruder.superlink_refusals, "the SuperLink logged no refusal"
    assert not intruder.listed and intruder.refused
    metrics = json.loads((deployment.run_dir / "metrics.json").read_text())
    for entry in metrics["rounds"]:
        assert set(entry["status"]) == set(deployment.node_ids)  # the run went on without it


@pytest.mark.slow
def test_an_outsider_with_ca_pem_can_neither_register_nor_run_code_in_a_hospital(deployment):
    """Fault 1 of issue 13: before the fix, both `flwr` commands succeeded at the address the
    hospitals dial and the outsider's ClientApp ran in every hospital (it writes one file
    per node into its loot folder)."""
    outsider = deployment.outsider
    assert outsider is not None
    assert outsider.register.exit_code != 0, outsider.register.output
    assert outsider.run.exit_code != 0, outsider.run.output
    assert not outsider.listed, "the outsider's node key got registered"
    # Second door, as if the Control API had been reached: the unsigned app and the app
    # signed by the outsider's own key were started, and every hospital refused both.
    assert outsider.unsigned_run > 0 and outsider.foreign_run > 0
    for name, lines in outsider.refusals.items():
        assert any("App verification is not supported" in line for line in lines), name
        assert any("FAB verification failed" in line for line in lines), name
    assert not outsider.loot, f"the outsider's code ran in a hospital: {outsider.loot}"
    assert not (deployment.out / "outsider" / "loot").exists()
    assert outsider.refused


@pytest.mark.slow
def test_every_process_the_deployment_started_is_gone(deployment):
    # registry, superlink, fleet proxy, serverapp, 3 x (supernode, clientapp), intruder
    started = 1 + 1 + 1 + 1 + 3 * 2 + 1
    assert len(deployment.processes) >= started
    alive = [pid for pid, at in deployment.processes.items() if procs.is_running(pid, at)]
    assert not alive, f"still running: {alive}"


@pytest.mark.slow
def test_local_deployment_with_encrypted_aggregation(tmp_path):
    result = local.run_deployment(tmp_path, sites=3, rounds=2, he=True, quiet=True, timeout=900)
    config = json.loads((result.run_dir / "config.json").read_text())
    assert config["he"] is True
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert all(set(e["status"].values()) == {"trained"} for e in metrics["rounds"])
    assert not (result.run_dir / "adapters").exists()  # only the sites can decrypt
