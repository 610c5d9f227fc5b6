"""The per-site containers: kept in step with the compose file and the docs (fast), and built
and run for real with Podman (slow, skipped where Podman is absent).

The container run (``deploy.containers``) starts the very components of the local run
(``deploy.local``), each wrapped in ``podman run``. The fast tests start those components
with a recorder instead of processes and compare each with its compose service: same image,
same entry point, same flags, as many mounts and writable mounts. The slow tests build both
images, scan every layer for secrets, and run the study (3 hospitals, 2 rounds, DP; then
with HE), looking inside each hospital's containers while they run.
"""

from __future__ import annotations

import io
import json
import re
import shlex
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from deploy import containers, local
from deploy.processes import HOSPITAL, Mount, Processes

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCS = (DEPLOY / "README.md", ROOT / "README.md")
# Local component -> compose service (hospital components: supernode-NAME, clientapp-NAME).
COMPOSE_NAME = {n: n for n in ("superlink", "fleet-proxy", "serverapp")} | {
    "registry": "app-registry"
}
# Flags only the one-machine run passes: SuperNodes give up after 5 retries instead of waiting
# for the coordinator forever (compose restarts them), and nothing is published (no `ports`).
LOCAL_ONLY_FLAGS = {"--max-retries"}


@dataclass
class Started:
    command: list[str]
    env: dict[str, str]
    role: str
    mounts: list[Mount]


class Recorder(Processes):
    """Records what would be started instead of starting it."""

    def __init__(self, log_dir: Path) -> None:
        super().__init__(log_dir)
        self.seen: dict[str, Started] = {}

    def start(  # type: ignore[override]
        self,
        name: str,
        command: list[str],
        env: Mapping[str, str],
        *,
        role: str = "coordinator",
        mounts: Sequence[Mount] = (),
    ) -> None:
        self.seen[name] = Started(list(command), dict(env), role, list(mounts))


@pytest.fixture(scope="module")
def compose() -> dict:
    text = re.sub(r"\$\{DEPLOY_DIR:\?[^}]*\}", "/srv/deploy", (DEPLOY / "compose.yaml").read_text())
    return yaml.safe_load(re.sub(r"\$\{(\w+):-([^}]*)\}", r"\2", text))


@pytest.fixture
def components(tmp_path) -> dict[str, Started]:
    """Every component of an HE run, as deploy.local starts it (for hospital-1)."""
    recorder = Recorder(tmp_path / "logs")
    coordinator = local.Coordinator(
        control="127.0.0.1:9093",
        fleet="127.0.0.1:8000",
        registry_port=9180,
        certs=tmp_path / "certs",
        database=tmp_path / "superlink" / "superlink.db",
        secret=tmp_path / "secrets" / "coordinator.superexec",
        releases=tmp_path / "releases",
        run_dir=tmp_path / "run",
        he_public=tmp_path / "he" / "server_public.ctx",
    )
    local.start_coordinator(recorder, coordinator, tmp_path / "homes")
    local.start_serverapp(recorder, coordinator, tmp_path / "homes", 1)
    site = local.Site(
        name="hospital-1",
        data_dir=tmp_path / "data" / "hospital-1",
        state_dir=tmp_path / "state" / "hospital-1",
        private_key=tmp_path / "keys" / "hospital-1",
        public_key=tmp_path / "keys" / "hospital-1.pub",
        runtime_port=9094,
        superexec_secret=tmp_path / "secrets" / "hospital-1.superexec",
    )
    he_secret = tmp_path / "he" / "site_secret.ctx"
    ca, trusted = tmp_path / "ca.pem", tmp_path / "t"
    local.start_hospital(recorder, site, coordinator.fleet, ca, trusted, tmp_path, 1, he_secret)
    return recorder.seen


def compose_service(compose: dict, component: str) -> dict:
    kind, _, site = component.partition("-")
    if kind in ("supernode", "clientapp") and site:
        return compose["services"][f"{site}-{kind}"]
    return compose["services"][COMPOSE_NAME[component]]


def flags(words: Sequence[str]) -> set[str]:
    return {w.split("=", 1)[0] for w in words if w.startswith("--")}


def test_every_component_runs_in_containers_as_its_compose_service_does(compose, components):
    assert len(components) == 6  # registry, superlink, proxy, serverapp; supernode, clientapp
    entrypoints = containers.dockerfile_entrypoints()
    for name, started in components.items():
        service = compose_service(compose, name)
        entry, args = containers.in_image(started.command)
        # The same image...
        assert service["build"]["target"] == started.role, name
        assert f"localhost/{service['image']}" == containers.IMAGES[started.role], name
        # ... the same program (python -m MODULE for ours) ...
        program = service.get("entrypoint") or entrypoints[started.role]
        assert [entry, *args][: len(program)] == program, name
        # ... the same flags ...
        theirs = flags(service["command"])
        ours = flags(args) - LOCAL_ONLY_FLAGS
        assert ours == theirs, f"{name}: only local {ours - theirs}, only compose {theirs - ours}"
        # ... and as many mounts, as many of them writable.
        volumes = service.get("volumes", [])
        writable = [v for v in volumes if not v.endswith(":ro")]
        assert len(started.mounts) == len(volumes), name
        assert len([m for m in started.mounts if m.writable]) == len(writable), name


def test_hospital_containers_get_only_their_own_files(components, tmp_path):
    supernode, clientapp = components["supernode-hospital-1"], components["clientapp-hospital-1"]
    assert supernode.role == clientapp.role == HOSPITAL
    assert all(m.path != tmp_path / "data" / "hospital-1" for m in supernode.mounts)
    own = ("hospital-1", "ca.pem", "site_secret.ctx", "/t")
    for started in (supernode, clientapp):
        assert all(any(o in str(m.path) for o in own) for m in started.mounts), started.mounts
    assert [m.path.name for m in clientapp.mounts if m.writable] == ["hospital-1"]  # state


def test_container_command_is_hardened_and_mounts_only_what_was_declared(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("x")
    state = tmp_path / "state"
    state.mkdir()
    launcher = containers.PodmanLauncher(tag="t")
    command = launcher.wrap(
        "clientapp-h",
        HOSPITAL,
        local.superexec_command("127.0.0.1:9094", secret, None),
        {"OMP_NUM_THREADS": "1", "SECRET_TOKEN": "never", "PATH": "/x"},
        [Mount(secret), Mount(state, writable=True)],
    )
    text = " ".join(command)
    for option in (
        "--read-only",
        "--init",
        "--user 49999:49999",
        "--cap-drop ALL",
        "--security-opt no-new-privileges",
        "--tmpfs /tmp",
        "--ulimit nofile=20000:20000",
        "--rm",
        f"--entrypoint flower-superexec {containers.IMAGES[HOSPITAL]} --runtime-api-address",
    ):
        assert option in text, option
    volumes = [command[i + 1] for i, word in enumerate(command) if word == "-v"]
    assert volumes == [f"{secret}:{secret}:ro", f"{state}:{state}:rw"]
    assert [w for w in command if w.startswith("--env=")] == ["--env=OMP_NUM_THREADS=1"]
    assert launcher.containers["clientapp-h"].name == "fedmedvit-t-clientapp-h"


def test_our_scripts_run_as_modules_copied_into_the_images(tmp_path):
    registry = containers.in_image(local.registry_command(tmp_path, 9180))
    proxy = containers.in_image(local.proxy_command("h:1", "h:2", tmp_path))
    assert registry[0] == proxy[0] == "python"
    assert registry[1][:3] == ["-m", "deploy.release", "serve"]
    assert proxy[1][:2] == ["-m", "deploy.fleet_proxy"]
    dockerfile = (DEPLOY / "app.Dockerfile").read_text()
    assert "deploy/fleet_proxy.py deploy/release.py ./deploy/" in dockerfile
    with pytest.raises(local.DeploymentError):
        containers.in_image(["/usr/bin/env", "true"])


def test_build_context_holds_only_the_allow_list(tmp_path):
    context = containers.stage_context(tmp_path / "context")
    top = {p.relative_to(context).as_posix() for p in context.rglob("*") if p.is_file()}
    assert "deploy/app.Dockerfile" in top and "deploy/requirements.lock" in top
    assert not [p for p in top if "__pycache__" in p or p.endswith(".pyc")]
    allowed = [*containers.context_entries(), containers.DOCKERFILE]
    assert all(any(p == a or p.startswith(a + "/") for a in allowed) for p in top)
    assert not [p for p in top if re.search(r"\.(key|pem|ctx|db)$|runs/|\.venv", p)]


def test_layer_scan_finds_keys_and_secrets_but_not_package_test_keys():
    def layer(files: dict[str, bytes]) -> io.BytesIO:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for name, body in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(body)
                tar.addfile(info, io.BytesIO(body))
        buffer.seek(0)
        return buffer

    key = b"-----BEGIN EC PRIVATE KEY-----\nabc\n-----END EC PRIVATE KEY-----\n"
    scan = containers.LayerScan("image")
    containers._scan_layer(
        layer(
            {
                "app/core/__init__.py": b"",
                "app/anything.txt": key,
                "app/keys/node.key": b"x",
                "tmp/site_secret.ctx": b"x",
                "srv/hospital.superexec": b"x",
                "opt/venv/lib/python3.11/site-packages/pkg/tests/test.key": key,
            }
        ),
        scan,
    )
    assert sorted(scan.secrets) == [
        "app/anything.txt",
        "app/keys/node.key",
        "srv/hospital.superexec",
        "tmp/site_secret.ctx",
    ]
    assert scan.package_keys == ["opt/venv/lib/python3.11/site-packages/pkg/tests/test.key"]
    assert not scan.clean and scan.files == 6


def doc_commands() -> list[list[str]]:
    """Every command line in the bash blocks of deploy/README.md and README.md."""
    found = []
    for doc in DOCS:
        for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                if line.strip() and not line.lstrip().startswith("#"):
                    found.append(shlex.split(line.split(" #")[0]))
    return found


def test_documented_container_commands_match_the_makefile_the_script_and_the_images():
    commands = doc_commands()
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^containers:.*\n((?:\t.*\n)+)", makefile, flags=re.M)
    assert recipe is not None, "make containers: no such target"
    assert "-m deploy.containers all" in recipe[1]
    assert ["make", "containers"] in commands
    parser = containers.make_parser()
    scripted = [c[3:] for c in commands if c[:3] == ["python", "-m", "deploy.containers"]]
    assert {c[0] for c in scripted} >= {"all", "base", "build", "scan", "run"}
    for args in scripted:
        parser.parse_args(args)  # exits (fails the test) on an unknown step or flag
    builds = [c for c in commands if c[0] in ("podman", "docker") and "build" in c]
    assert builds, "the docs show no image build"
    targets = set(containers.dockerfile_entrypoints())
    for words in builds:
        target, tag = words[words.index("--target") + 1], words[words.index("-t") + 1]
        assert target in targets and f"localhost/{tag}" == containers.IMAGES[target], words
        assert words[words.index("-f") + 1] == containers.DOCKERFILE


# --- for real, with Podman (slow) ------------------------------------------------------------

needs_podman = pytest.mark.skipif(
    containers.podman_missing() is not None,
    reason=f"no container run here: {containers.podman_missing()}",
)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    containers.build(containers.LOCAL_BASE, tmp_path_factory.mktemp("build"), quiet=True)
    return containers.IMAGES


@pytest.mark.slow
@needs_podman
def test_no_layer_of_either_image_holds_a_key_or_secret(images):
    for image in images.values():
        scan = containers.scan_layers(image)
        assert scan.layers >= 3 and scan.files > 1000
        assert scan.clean, f"{image}: {scan.secrets}"


def check_study(study: containers.StudyOutcome) -> None:
    assert study.result.run_id > 0  # flwr list said finished:completed
    assert study.rounds == [1, 2]
    assert all(set(s.values()) == {"trained"} for s in study.status)
    assert len(study.epsilon) == 3 and all(0 < e <= 8.0 + 1e-9 for e in study.epsilon.values())
    assert study.report.is_file() and (study.report.parent / "privacy.json").is_file()
    # Six hospital containers (a SuperNode and a ClientApp each) looked into while running.
    assert len(study.isolation) == 6
    for seen in study.isolation:
        assert seen.uid == 49999 and seen.binds == seen.declared, seen
        assert seen.foreign_tried >= 11 and not seen.foreign_readable, seen
        assert not seen.root_writable and seen.tmp_writable, seen
    assert not study.leftovers and study.ok


@pytest.mark.slow
@needs_podman
def test_study_in_containers_with_dp(images, tmp_path):
    check_study(containers.run_study(tmp_path, he=False, quiet=True))


@pytest.mark.slow
@needs_podman
def test_study_in_containers_with_he(images, tmp_path):
    study = containers.run_study(tmp_path, he=True, quiet=True)
    check_study(study)
    assert json.loads((study.result.run_dir / "config.json").read_text())["he"] is True
