"""The deployment in containers: build the coordinator and hospital images, run the study.

    python -m deploy.containers all --out runs/containers      # what `make containers` runs
    python -m deploy.containers base                           # the Debian base, without a registry
    python -m deploy.containers build [--base IMAGE]           # both images, from the repository
    python -m deploy.containers scan                           # no key or secret in any layer
    python -m deploy.containers run --out DIR [--he]           # one study in containers

``run`` is :func:`deploy.local.run_deployment` with a :class:`PodmanLauncher`: every
component (app registry, SuperLink, Fleet-only proxy, ServerApp; per hospital its SuperNode
and ClientApp) runs in its own container, as a non-root user, on a read-only root file system
with a tmpfs for ``/tmp``, all capabilities dropped, and exactly the files it declares
mounted (:class:`deploy.processes.Mount`; at the same path as on the host, so the commands
are those of the local run). While the containers are up, :func:`check_isolation` looks into
each hospital's containers: only its own mounts, no other site's data, state or key, no write
to the root file system. Every container is removed at the end, also on failure or SIGTERM.

Podman here: the ``runc`` runtime, explicit ulimits, host networking (the components talk
over loopback, TLS from the SuperNodes to the proxy and the SuperLink, as in the local run).
Run as root (rootful Podman): files a container reads are handed to the images' user
(uid 49999), as ``chown -R 49999`` does in a real deployment.

Over 500 lines: build context, layer scan, launcher and isolation check are the four steps of
one command and share the image names and the hardened ``podman run`` flags defined here.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from deploy.local import ROOT, DeploymentResult, run_deployment
from deploy.processes import COORDINATOR, HOSPITAL, DeploymentError, Mount, Processes
from simulations.flower_cli import BIN, RunFailed

DOCKERFILE = "deploy/app.Dockerfile"
IGNORE_FILE = ROOT / "deploy" / "app.Dockerfile.dockerignore"
LOCAL_BASE = "localhost/debian-py:bookworm"  # made by `base`: no registry is reachable here
DEBIAN_PACKAGES = "python3,python3-venv,ca-certificates"
RUNTIME = os.environ.get("FEDMEDVIT_CONTAINER_RUNTIME", "runc")
# crun fails here on cgroups and rlimits; runc needs explicit limits.
ULIMITS = ("--ulimit", "nofile=20000:20000", "--ulimit", "nproc=4096:4096")
APP_UID = 49999  # the images' user `app`
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
# Environment a component's container gets from the local run's (the image sets the rest:
# FLWR_HOME on the tmpfs, no update check, no installs at run time).
CONTAINER_ENV = ("OMP_NUM_THREADS", "FLWR_SUPERGRID_API_URL")
# Names and contents that must never be in an image layer.
SECRET_NAME = re.compile(
    r"(^|/)(ca\.key|server\.key|node\.key|[^/]*\.superexec|superexec|[^/]*\.ctx|"
    r"id_(rsa|ecdsa|ed25519)|privacy-ledger\.json|superlink\.db|trusted-entities\.yaml)$"
)
PRIVATE_KEY = re.compile(rb"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----")
# Third-party packages ship test keys of their own (none are ours); reported, not failed.
PACKAGES = re.compile(r"^opt/venv/lib/python3\.\d+/site-packages/")


def version() -> str:
    with (ROOT / "pyproject.toml").open("rb") as handle:
        return str(tomllib.load(handle)["project"]["version"])


IMAGES = {
    COORDINATOR: f"localhost/fedmedvit-coordinator:{version()}",
    HOSPITAL: f"localhost/fedmedvit-hospital:{version()}",
}


def podman(*args: str) -> list[str]:
    return ["podman", "--runtime", RUNTIME, *args]


def podman_out(*args: str, timeout: float = 120) -> str:
    done = subprocess.run(
        podman(*args), capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        raise DeploymentError(f"podman {' '.join(args)}: {done.stderr.strip()[-2000:]}")
    return done.stdout


def podman_missing() -> str | None:
    """Why containers cannot run here, or None."""
    if shutil.which("podman") is None:
        return "podman is not installed (apt-get install -y podman runc debootstrap)"
    if os.geteuid() != 0:
        return "rootful podman needed: run as root (files are handed to uid 49999)"
    return None


def image_exists(name: str) -> bool:
    return subprocess.run(podman("image", "exists", name), check=False).returncode == 0


# --- images ----------------------------------------------------------------------------------


def make_base(name: str = LOCAL_BASE, work: Path | None = None) -> float:
    """A Debian bookworm image with Python 3.11 and venv, from Debian's packages
    (debootstrap) rather than a registry; returns the seconds it took."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="debian-py-", dir=work) as tmp:
        root = Path(tmp) / "root"
        subprocess.run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={DEBIAN_PACKAGES}",
                "bookworm",
                str(root),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for entry in (root / cache).glob("*"):
                if entry.is_file():
                    entry.unlink()
        archive = Path(tmp) / "base.tar"
        subprocess.run(["tar", "-C", str(root), "-cf", str(archive), "."], check=True)
        podman_out("import", str(archive), name, timeout=600)
    return time.perf_counter() - started


def dockerfile_entrypoints() -> dict[str, list[str]]:
    """Each build target of the Dockerfile -> its ENTRYPOINT (what compose services run
    unless they set ``entrypoint:``)."""
    found, stage = {}, ""
    for line in (ROOT / DOCKERFILE).read_text().splitlines():
        if match := re.match(r"FROM \S+ AS (\w+)$", line):
            stage = match[1]
        elif line.startswith("ENTRYPOINT "):
            found[stage] = json.loads(line.split(" ", 1)[1])
    return found


def context_entries() -> list[str]:
    """What the images are built from: the allow-list of the Dockerfile's ignore file."""
    lines = [line.strip() for line in IGNORE_FILE.read_text().splitlines()]
    return [line[1:].rstrip("/") for line in lines if line.startswith("!")]


def stage_context(target: Path) -> Path:
    """A build context holding only the allow-listed files (and the Dockerfile): nothing
    else of the checkout (runs, keys, data, the virtualenv) can reach a layer."""
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for entry in [*context_entries(), DOCKERFILE]:
        source, dest = ROOT / entry, target / entry
        dest.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, dest, ignore=skip)
        else:
            shutil.copy2(source, dest)
    return target


def local_wheel_dirs() -> list[Path]:
    """Folders the host's pip takes wheels from (``find-links``): the CPU torch wheel lies
    there, which the build must use instead of the registry's CUDA build."""
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    values = [*re.findall(r"find-links='([^']*)'", listed), os.environ.get("PIP_FIND_LINKS", "")]
    dirs = {Path(p) for value in values for p in value.split() if Path(p).is_dir()}
    return sorted(dirs)


def build_command(role: str, base: str, context: Path, wheels: Sequence[Path]) -> list[str]:
    args = [
        "build",
        "--network",
        "host",
        *ULIMITS,
        "-f",
        str(context / DOCKERFILE),
        "--target",
        role,
        "--build-arg",
        f"BASE_IMAGE={base}",
        "-t",
        IMAGES[role],
    ]
    if wheels:  # torch from the local wheel folder; the CPU index is not needed
        args += ["--build-arg", "TORCH_INDEX_URL=", "--build-arg", f"PIP_FIND_LINKS={wheels[0]}"]
        args += [f for d in wheels for f in ("-v", f"{d}:{d}:ro")]
    if HOST_CA_BUNDLE.is_file():  # pip trusts what the host trusts (a TLS proxy, say)
        args += ["-v", f"{HOST_CA_BUNDLE}:{HOST_CA_BUNDLE}:ro"]
    return podman(*args, str(context))


def build(base: str, logs: Path, quiet: bool = False) -> dict[str, float]:
    """Build both images; returns the seconds each build took (the second reuses the
    first's layers)."""
    if base == LOCAL_BASE and not image_exists(base):
        seconds = make_base(base)
        if not quiet:
            print(f"base image {base} made with debootstrap in {seconds:.0f} s", flush=True)
    logs.mkdir(parents=True, exist_ok=True)
    wheels = local_wheel_dirs()
    took = {}
    with tempfile.TemporaryDirectory(prefix="fedmedvit-context-") as tmp:
        context = stage_context(Path(tmp))
        for role in (COORDINATOR, HOSPITAL):
            started = time.perf_counter()
            with open(logs / f"build-{role}.log", "wb") as log:
                done = subprocess.run(
                    build_command(role, base, context, wheels),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    check=False,
                )
            if done.returncode != 0:
                raise DeploymentError(f"building {IMAGES[role]} failed; see {log.name}")
            took[role] = time.perf_counter() - started
            if not quiet:
                print(f"built {IMAGES[role]} in {took[role]:.0f} s", flush=True)
    return took


def image_sizes() -> dict[str, int]:
    """Bytes of each image (both include the shared base and dependency layers)."""
    return {
        role: int(podman_out("image", "inspect", "--format", "{{.Size}}", image).strip())
        for role, image in IMAGES.items()
    }


# --- no secrets in any layer -----------------------------------------------------------------


@dataclass
class LayerScan:
    image: str
    layers: int = 0
    files: int = 0
    secrets: list[str] = field(default_factory=list)  # our kind of secret: must be empty
    package_keys: list[str] = field(default_factory=list)  # test keys shipped by packages
    history: list[str] = field(default_factory=list)  # the build steps, as recorded

    @property
    def clean(self) -> bool:
        return not self.secrets and not any(
            PRIVATE_KEY.search(step.encode()) for step in self.history
        )


def _scan_layer(layer: IO[bytes], scan: LayerScan) -> None:
    with tarfile.open(fileobj=layer, mode="r|*") as files:
        for member in files:
            if not member.isfile():
                continue
            scan.files += 1
            name = member.name.removeprefix("./")
            body = files.extractfile(member)
            head = body.read(1 << 20) if body is not None and member.size < 1 << 22 else b""
            if SECRET_NAME.search(name) or PRIVATE_KEY.search(head):
                (scan.package_keys if PACKAGES.match(name) else scan.secrets).append(name)


def scan_layers(image: str) -> LayerScan:
    """Every file of every layer of ``image`` (``podman save``, read as a stream), looking for
    keys, certificates' private halves, SuperExec secrets, HE contexts, ledgers, databases;
    and the recorded build steps (``podman history``)."""
    scan = LayerScan(image)
    scan.history = podman_out(
        "history", "--no-trunc", "--format", "{{.CreatedBy}}", image
    ).splitlines()
    saver = subprocess.Popen(
        podman("save", "--format", "docker-archive", image), stdout=subprocess.PIPE
    )
    assert saver.stdout is not None
    try:
        with tarfile.open(fileobj=saver.stdout, mode="r|") as archive:
            for member in archive:
                if member.isfile() and member.name.endswith(".tar"):
                    layer = archive.extractfile(member)
                    if layer is not None:
                        scan.layers += 1
                        _scan_layer(layer, scan)
    finally:
        saver.stdout.close()
        if saver.wait(timeout=600) != 0:
            raise DeploymentError(f"podman save {image} failed")
    return scan


# --- running components in containers --------------------------------------------------------


def in_image(command: Sequence[str]) -> tuple[str, list[str]]:
    """The local command as the image runs it: (entry point, arguments). Flower's CLIs are
    on the image's PATH; our scripts (``deploy/*.py``) run as modules from ``/app``."""
    program = Path(command[0])
    if command[0] == sys.executable and len(command) > 1 and command[1].endswith(".py"):
        module = Path(command[1]).resolve().relative_to(ROOT).with_suffix("")
        return "python", ["-m", ".".join(module.parts), *command[2:]]
    if program.parent == BIN:
        return program.name, list(command[1:])
    raise DeploymentError(f"no entry point in the images for {command[0]}")


def hand_to_app_user(path: Path) -> None:
    """What ``chown -R 49999`` does in a real deployment: the containers' user owns the
    files mounted for it (keys stay mode 600)."""
    for entry in [path, *(path.rglob("*") if path.is_dir() else [])]:
        os.chown(entry, APP_UID, APP_UID, follow_symlinks=False)


@dataclass
class Container:
    name: str
    role: str
    mounts: list[Mount]
    started: float


@dataclass
class PodmanLauncher:
    """Runs each component with ``podman run`` in the foreground (its log is the local run's
    log file; SIGTERM reaches the container), hardened, given only its own mounts."""

    tag: str = field(default_factory=lambda: f"{os.getpid()}-{int(time.time())}")
    images: Mapping[str, str] = field(default_factory=lambda: dict(IMAGES))
    containers: dict[str, Container] = field(default_factory=dict)  # component -> container

    def container_name(self, component: str) -> str:
        return f"fedmedvit-{self.tag}-{component}"

    def wrap(
        self,
        name: str,
        role: str,
        command: list[str],
        env: Mapping[str, str],
        mounts: Sequence[Mount],
    ) -> list[str]:
        entry, args = in_image(command)
        container = self.container_name(name)
        volumes = []
        for mount in mounts:
            path = mount.path.resolve()
            if not path.exists():
                raise DeploymentError(f"{name}: {path} does not exist, cannot mount it")
            if os.geteuid() == 0:  # rootful Podman (podman_missing() insists on it)
                hand_to_app_user(path)
            volumes += ["-v", f"{path}:{path}:{'rw' if mount.writable else 'ro'}"]
        environment = [f"--env={key}={env[key]}" for key in CONTAINER_ENV if key in env]
        self.containers[name] = Container(container, role, list(mounts), time.perf_counter())
        return podman(
            "run",
            "--rm",
            "--init",  # PID 1 forwards SIGTERM and reaps the SuperExecs' app processes
            "--name",
            container,
            "--label",
            f"io.fedmedvit.run={self.tag}",
            "--network",
            "host",
            "--user",
            f"{APP_UID}:{APP_UID}",
            "--read-only",
            "--tmpfs",
            "/tmp:rw,mode=1777",
            "--cap-drop",
            "ALL",
            "--security-opt",
            "no-new-privileges",
            *ULIMITS,
            *environment,
            *volumes,
            "--entrypoint",
            entry,
            self.images[role],
            *args,
        )

    def stop(self) -> None:
        names = [c.name for c in self.containers.values()]
        if names:
            subprocess.run(
                podman("rm", "--force", "--ignore", "--time", "10", *names),
                capture_output=True,
                check=False,
                timeout=300,
            )

    def leftovers(self) -> list[str]:
        """Containers of this launcher that still exist (must be none after a run)."""
        listed = podman_out(
            "ps",
            "--all",
            "--filter",
            f"label=io.fedmedvit.run={self.tag}",
            "--format",
            "{{.Names}}",
        )
        return listed.split()


# --- what a hospital's container can see -----------------------------------------------------

PROBE = """
import json, os, sys
ask = json.loads(sys.argv[1])
binds = sorted(
    line.split()[4] for line in open("/proc/self/mountinfo")
    if line.split()[4].startswith(ask["root"])
)
def readable(path):
    try:
        if os.path.isdir(path):
            os.listdir(path)
        else:
            open(path, "rb").close()
        return True
    except OSError:
        return False
def writable(path):
    try:
        open(path, "w").close()
        return True
    except OSError:
        return False
print(json.dumps({
    "uid": os.getuid(),
    "binds": binds,
    "foreign_readable": sorted(p for p in ask["foreign"] if readable(p)),
    "root_writable": sorted(p for p in ("/app/probe", "/opt/venv/probe", "/probe") if writable(p)),
    "tmp_writable": writable("/tmp/probe"),
}))
"""


@dataclass
class Isolation:
    """What one container saw: its bind mounts below the deployment folder, which of the
    other sites' and the coordinator's files it could read, and where it could write."""

    component: str
    container: str
    uid: int
    binds: list[str]
    declared: list[str]
    foreign_tried: int
    foreign_readable: list[str]
    root_writable: list[str]
    tmp_writable: bool

    @property
    def ok(self) -> bool:
        return (
            self.uid != 0
            and self.binds == self.declared
            and not self.foreign_readable
            and not self.root_writable
            and self.tmp_writable
        )


def check_isolation(
    launcher: PodmanLauncher, result: DeploymentResult, processes: Processes
) -> list[Isolation]:
    """Exec into every hospital container: it must see exactly its declared mounts and none
    of the other sites' data, state, keys and secrets, nor the coordinator's keys."""
    out = result.out
    own: dict[str, list[Path]] = {}
    for site in result.node_ids:
        own[site] = [
            out / "data" / site,
            out / "state" / site,
            out / "keys" / site,
            out / "secrets" / f"{site}.superexec",
        ]
    coordinator = [out / "ca" / "ca.key", out / "certs" / "server.key", out / "superlink"]
    seen = []
    for component, container in launcher.containers.items():
        site = component.split("-", 1)[1] if container.role == HOSPITAL else ""
        if site not in own:
            continue
        foreign = [str(p) for other, paths in own.items() if other != site for p in paths]
        foreign += [str(p) for p in coordinator]
        ask = json.dumps({"root": str(out), "foreign": foreign})
        answer = json.loads(
            podman_out("exec", container.name, "python", "-c", PROBE, ask, timeout=60)
        )
        seen.append(
            Isolation(
                component=component,
                container=container.name,
                uid=answer["uid"],
                binds=answer["binds"],
                declared=sorted(str(m.path.resolve()) for m in container.mounts),
                foreign_tried=len(foreign),
                foreign_readable=answer["foreign_readable"],
                root_writable=answer["root_writable"],
                tmp_writable=answer["tmp_writable"],
            )
        )
    return seen


# --- the study -------------------------------------------------------------------------------


@dataclass
class StudyOutcome:
    name: str
    result: DeploymentResult
    isolation: list[Isolation]
    rounds: list[int]
    status: list[dict[str, str]]
    epsilon: dict[str, float]  # each site's cumulative epsilon after the last round
    delta: dict[str, float]
    report: Path
    leftovers: list[str]

    @property
    def ok(self) -> bool:
        return (
            self.result.run_id > 0
            and bool(self.isolation)
            and all(i.ok for i in self.isolation)
            and all(set(s.values()) == {"trained"} for s in self.status)
            and self.report.is_file()
            and not self.leftovers
        )


def run_study(
    out: Path, *, he: bool, sites: int = 3, rounds: int = 2, timeout: float = 1200, quiet: bool
) -> StudyOutcome:
    """One study in containers (DP always; HE if asked), its isolation checks, its results."""
    for role, image in IMAGES.items():
        if not image_exists(image):
            raise DeploymentError(
                f"image {image} ({role}) missing: python -m deploy.containers build"
            )
    launcher = PodmanLauncher()
    isolation: list[Isolation] = []

    def inspect(result: DeploymentResult, processes: Processes) -> None:
        isolation.extend(check_isolation(launcher, result, processes))

    result = run_deployment(
        out,
        sites=sites,
        rounds=rounds,
        he=he,
        outsider=False,
        timeout=timeout,
        quiet=quiet,
        launcher=launcher,
        inspect=inspect,
    )
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    privacy = json.loads((result.run_dir / "privacy.json").read_text())
    epsilon = {
        name: float(site["rounds"][-1]["epsilon"]) for name, site in privacy["sites"].items()
    }
    delta = {
        name: float(site["settings"]["target_delta"]) for name, site in privacy["sites"].items()
    }
    return StudyOutcome(
        name=f"{'HE + ' if he else ''}DP",
        result=result,
        isolation=isolation,
        rounds=[int(r["round"]) for r in metrics["rounds"]],
        status=[dict(r["status"]) for r in metrics["rounds"]],
        epsilon=epsilon,
        delta=delta,
        report=result.run_dir / "report.md",
        leftovers=launcher.leftovers(),
    )


def describe(study: StudyOutcome) -> Iterator[str]:
    result = study.result
    yield (
        f"[{study.name}] run {result.run_id} completed in {result.wall_seconds:.0f} s; "
        f"rounds {study.rounds}; coordinator up in {result.startup['coordinator']:.1f} s, "
        f"hospitals connected {result.startup['hospitals']:.1f} s after start"
    )
    for name, eps in study.epsilon.items():
        yield f"  {name}: epsilon {eps:.3f} (delta {study.delta[name]:g}); every round: trained"
    yield f"  privacy report: {study.report} (+ privacy.json, privacy.png)"
    for seen in study.isolation:
        verdict = "ok" if seen.ok else "NOT ISOLATED"
        yield (
            f"  {seen.component:>22}: uid {seen.uid}, "
            f"{len(seen.binds)} mounts (declared {len(seen.declared)}), "
            f"{len(seen.foreign_readable)}/{seen.foreign_tried} foreign paths readable, "
            f"root fs writable at {seen.root_writable or 'none'}: {verdict}"
        )
    yield f"  containers left: {study.leftovers or 'none'}"


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=["base", "build", "scan", "run", "all"])
    parser.add_argument("--base", default=LOCAL_BASE, help="base image (Python 3.11 + venv)")
    parser.add_argument("--out", type=Path, help="work folder (default runs/containers-<time>)")
    parser.add_argument("--he", action="store_true", help="run: encrypted aggregation too")
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=1200, help="seconds for each run")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    if (missing := podman_missing()) is not None:
        print(f"cannot run containers: {missing}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)  # a supervisor's kill still tears down
    out = (args.out or ROOT / "runs" / f"containers-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    ok = True
    try:
        if args.step == "base":
            print(f"{LOCAL_BASE} made in {make_base():.0f} s")
        if args.step in ("build", "all"):
            build(args.base, out / "logs")
            for role, size in image_sizes().items():
                print(f"{IMAGES[role]}: {size / 1e6:.0f} MB")
        if args.step in ("scan", "all"):
            for image in IMAGES.values():
                scan = scan_layers(image)
                ok &= scan.clean
                print(
                    f"{image}: {scan.layers} layers, {scan.files} files, {len(scan.history)} "
                    f"build steps; secrets found: {scan.secrets or 'none'}; test keys shipped "
                    f"by third-party packages: {len(scan.package_keys)}"
                )
        runs = {"run": [args.he], "all": [False, True]}.get(args.step, [])
        for he in runs:
            study = run_study(
                out / ("he" if he else "dp"),
                he=he,
                sites=args.sites,
                rounds=args.rounds,
                timeout=args.timeout,
                quiet=False,
            )
            print("\n".join(describe(study)), flush=True)
            ok &= study.ok
    except (DeploymentError, RunFailed, subprocess.CalledProcessError) as err:
        print(f"FAILED: {err}\nlogs: {out}", file=sys.stderr)
        return 1
    print(f"containers: {'all checks passed' if ok else 'A CHECK FAILED'}; work folder {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
