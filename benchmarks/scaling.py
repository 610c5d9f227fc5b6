"""Time per round and peak memory of the real Flower simulation at 10, 30, 100 and 300 sites.

``python -m benchmarks.scaling [--sites 10,30,100,300] [--quick] [--out PATH] [--workdir DIR]
[--ray-cluster [--ray-cpus N] | --ray-address HOST:PORT]``

Each point is one run of the project's simulation driver (``simulations.run.run_scenario``,
what ``python -m simulations.run many-sites`` does) on the ``many-sites`` scenario with its
phantom preset ``many`` resized to N sites: micro ViT, DP-SGD on (target epsilon 8), batch 8,
evaluation on 20 % of the sites, and **one** round (``--set num-server-rounds=1``). Each run is
its own process tree (``python -m benchmarks.scaling --child N``, a new session): the runner,
its SuperLink, SuperExec, the ``flwr-simulation`` process (ServerApp and Flower's Ray backend)
and Ray's raylet, GCS and worker processes. The phantom sites are generated before the timed
run (cached in ``--data-cache``, like the runner does).

Measured per point:

* ``wall_s``: seconds from starting the child to its exit (Python start-up, imports, SuperLink,
  Ray start, the round, reports, shut-down);
* ``run_s``: seconds ``run_scenario`` took inside the child (everything but the child's own
  interpreter start and imports);
* ``round_s``, ``train_s``, ``evaluate_s``: the round's wall time as the ServerApp recorded it
  in the run folder's ``metrics.json`` (``RoundLog.seconds``: from sending the train messages to
  the last evaluate reply aggregated);
* ``peak_rss_mib`` and ``peak_pss_mib``: the peak over time of the **sum** over every live
  process of the tree of its resident set size (RSS, counts pages shared between processes, such
  as torch's libraries in each Ray worker, once per process: an upper bound) and of its
  proportional set size (PSS, shared pages split between the processes sharing them: what the
  tree adds to the machine's memory use). Sampled every ``--interval`` seconds (0.2) with
  psutil (PSS from ``/proc/PID/smaps_rollup``); the tree is the child's descendants plus every
  process carrying the run's tag in its environment (found every ~2 s; Ray's processes may
  leave the session). ``peak_breakdown`` splits the PSS peak by kind of process;
* ``processes``: the most processes of each kind alive at once, e.g. ``ray-actor`` (Flower's
  ``ClientAppActor``: the Ray backend makes ``floor(Ray CPUs / client-resources-num-cpus)`` of
  them and every simulated node's messages run, one at a time, in one of them; ``ray_actors``)
  and ``ray-worker`` (Ray's idle workers, two started in advance).

Then least-squares lines of ``round_s`` and of each peak against the number of sites: slope
(seconds, or MiB, per site), intercept and R^2. Writes ``benchmarks/results/scaling.json`` and
prints a table. The issue's targets (#18): 300 sites <= 6 GB peak, 100 sites <= 3 GB, time per
round linear in the number of sites.

On a Ray cluster: ``--ray-cluster [--ray-cpus N]`` starts a Ray head for each point (``ray
start --head`` from the venv, its own temp dir and free ports; stopped by PID afterwards,
also on failure, Ctrl-C and SIGTERM) and ``--ray-address HOST:PORT`` uses an existing cluster,
e.g. a head and worker machines (README, "Spreading a simulation over several machines"). The
run gets ``RAY_ADDRESS``: Flower 1.42's Ray backend calls ``ray.init()`` with no address (its
``init_args`` come from ``--federation-config`` and hold only CPUs, GPUs and logging), so Ray
joins the cluster RAY_ADDRESS names instead of starting one. After the run the cluster's GCS
says whether it did (``ray_cluster`` and ``used_cluster`` in each point, :func:`used_cluster`):
a finished job whose driver is the run's ``flwr-simulation`` process, Flower's
``ClientAppActor`` actors of that job and the node each ran on, and no GCS in the run's own
tree. Writes ``benchmarks/results/scaling-ray-cluster.json``; exits 1 if a point did not
complete or did not use the cluster.

Over 500 lines: the process-tree sampler, the per-point child runs and the Ray head's start,
check and stop serve one command; split apart, each piece would need the others' state.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results" / "scaling.json"
RESULTS_RAY = Path(__file__).parent / "results" / "scaling-ray-cluster.json"
RAY = Path(sys.executable).parent / "ray"  # the venv's Ray CLI: same Ray as flwr-simulation's
# ray.init() without an address connects to the cluster this variable names (Ray 2.55,
# ray._private.services.get_ray_address_from_environment); Flower's Ray backend calls
# ray.init() without one, and every process of a run inherits the variable.
RAY_ADDRESS = "RAY_ADDRESS"
SCENARIO = "many-sites"
FULL_SITES = (10, 30, 100, 300)
QUICK_SITES = (2, 3)
# Every process of a measured run carries this variable (value: the run's token) in its
# environment; descendants inherit it, so processes that left the child's session are found.
TAG = "FEDMEDVIT_SCALING_TAG"
MIB = 2**20
GB = 1e9
TARGETS_GB = {100: 3.0, 300: 6.0}  # issue 18: peak memory of the whole process tree


def scenario_for(sites: int) -> dict[str, Any]:
    """The ``many-sites`` scenario with its phantom preset resized to ``sites`` sites."""
    from simulations.run import load_scenario

    scenario = load_scenario(SCENARIO)
    scenario["phantoms"] = dict(scenario["phantoms"]) | {"n-sites": sites}
    return scenario


def process_kind(cmdline: Sequence[str], name: str) -> str:
    """A short label for a process of the simulation tree, from its command line."""
    text = " ".join(cmdline)
    if not cmdline and not name.startswith("ray::"):
        return "exiting"  # no command line left: a process on its way out
    # The name is the command line's first 15 bytes when the command line cannot be read.
    first = cmdline[0] if cmdline else name
    if first.startswith("ray::"):  # Ray processes rename themselves after what they run
        what = first[5:].split(".")[0]
        if what.startswith("ClientApp"):  # Flower's actor: runs the simulated nodes' messages
            return "ray-actor"
        renamed = {"IDLE": "ray-worker", "DashboardAgent": "ray-dashboard-agent"}
        return renamed.get(what, "ray-runtime-env-agent" if "RuntimeEnv" in what else "ray-other")
    program = Path(first).name
    if program in ("raylet", "gcs_server"):
        return "ray-" + program.replace("_server", "")
    # Python programs: the script is the first argument that names a file, not an option.
    script = next((a for a in cmdline[1:] if not a.startswith("-")), "")
    for needle, kind in (
        ("benchmarks.scaling", "runner"),
        ("flower-superlink", "superlink"),
        ("flower-superexec", "superexec"),
        ("flwr-simulation", "flwr-simulation"),
        ("flwr-serverapp", "serverapp"),
        ("default_worker.py", "ray-worker"),
        ("setup_worker.py", "ray-worker"),
        ("dashboard/agent.py", "ray-dashboard-agent"),
        ("dashboard/dashboard.py", "ray-dashboard"),
        ("ray.util.client.server", "ray-client-server"),
        ("autoscaler/_private/monitor.py", "ray-monitor"),
        ("log_monitor.py", "ray-log-monitor"),
        ("runtime_env/agent", "ray-runtime-env-agent"),
    ):
        if needle in script or (needle == "benchmarks.scaling" and needle in text):
            return kind
    if Path(script).name == "flwr" or program == "flwr":  # the CLI: `flwr run ... --stream`
        return "flwr-cli"
    if "multiprocessing" in text:  # a resource tracker, fork server or pool worker
        return "multiprocessing"
    return program or name or "other"


def environ_has(pid: int, name: str, value: str) -> bool:
    """Whether ``/proc/PID/environ`` holds ``name=value``, read as raw bytes.

    Not ``psutil.Process.environ()``: Ray's agents rename themselves (``ray::DashboardAgent``,
    ``ray::RuntimeEnvAgent``) over the start of that block, leaving NUL bytes, and psutil stops
    at the first empty entry: it reports no variables at all for them (seen with Ray 2.55; an
    actor's block, ``ray::ClientAppActor``, stayed readable).
    """
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return f"\0{name}={value}\0".encode() in b"\0" + raw + b"\0"


def tagged_processes(
    tag: str, *, name: str = TAG, skip: Sequence[int] | dict[int, Any] = ()
) -> list[psutil.Process]:
    """This user's live processes whose environment carries ``name=tag`` (not this one).

    A process whose block was overwritten before ``name`` (see :func:`environ_has`) is missed:
    callers add the descendants of what is found (a Ray head's raylet and its workers)."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        if proc.pid in skip or proc.pid == os.getpid():
            continue
        if environ_has(proc.pid, name, tag):
            found.append(proc)
    return found


@dataclass
class TreeMemory:
    """What :class:`TreeSampler` found: peaks of the summed RSS and PSS, in bytes."""

    peak_rss: int = 0
    peak_pss: int = 0
    peak_pss_at_s: float = 0.0
    breakdown: dict[str, dict[str, float]] = field(default_factory=dict)  # at the PSS peak
    processes: dict[str, int] = field(default_factory=dict)  # most alive at once, per kind
    samples: int = 0
    mean_period_s: float = 0.0
    pids: dict[str, list[int]] = field(default_factory=dict)  # every process seen, per kind


class TreeSampler(threading.Thread):
    """Samples the memory of a process tree every ``interval`` seconds until :meth:`stop`.

    The tree: ``root`` and its descendants, plus every process whose environment has
    ``TAG=tag`` and their descendants (scanned every ``scan_every`` samples, since reading
    every process's environment costs more than reading a few processes' memory). Memory: the
    sum of RSS (``memory_info``) and of PSS (``memory_full_info``, Linux ``smaps_rollup``) over the
    processes alive at the sample; a process that exits mid-sample is skipped.
    """

    def __init__(self, root: int, tag: str, interval: float = 0.2, scan_every: int = 10) -> None:
        super().__init__(daemon=True)
        self.root, self.tag, self.interval, self.scan_every = root, tag, interval, scan_every
        self.known: dict[int, psutil.Process] = {}
        self.result = TreeMemory()
        self._halt = threading.Event()
        self._t0 = time.perf_counter()

    def stop(self) -> TreeMemory:
        self._halt.set()
        self.join(timeout=30)
        return self.result

    def _discover(self, scan: bool) -> None:
        found: list[psutil.Process] = []
        with suppress(psutil.Error):
            root = psutil.Process(self.root)
            found = [root, *root.children(recursive=True)]
        if scan:
            for proc in tagged_processes(self.tag, skip=self.known):
                found.append(proc)
                with suppress(psutil.Error):  # a Ray head's workers and agents
                    found.extend(proc.children(recursive=True))
        for proc in found:
            if proc.pid not in self.known:
                self.known[proc.pid] = proc

    def _kind(self, proc: psutil.Process) -> str:
        """Looked up at every sample: a Ray worker renames itself when it becomes an actor."""
        return process_kind(proc.cmdline(), proc.name())

    def sample(self, scan: bool = False) -> None:
        self._discover(scan)
        rss = pss = 0
        by_kind: dict[str, dict[str, float]] = {}
        for pid, proc in list(self.known.items()):
            try:
                if not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE:
                    raise psutil.NoSuchProcess(pid)
                kind = self._kind(proc)
                full = proc.memory_full_info()
            except psutil.Error:
                self.known.pop(pid, None)
                continue
            rss += full.rss
            pss += full.pss
            seen = self.result.pids.setdefault(kind, [])
            if pid not in seen:
                seen.append(pid)
            entry = by_kind.setdefault(kind, {"count": 0, "rss_mib": 0.0, "pss_mib": 0.0})
            entry["count"] += 1
            entry["rss_mib"] += full.rss / MIB
            entry["pss_mib"] += full.pss / MIB
        result = self.result
        result.samples += 1
        result.peak_rss = max(result.peak_rss, rss)
        if pss > result.peak_pss:
            result.peak_pss = pss
            result.peak_pss_at_s = time.perf_counter() - self._t0
            result.breakdown = {
                k: {"count": v["count"], "rss_mib": v["rss_mib"], "pss_mib": v["pss_mib"]}
                for k, v in sorted(by_kind.items())
            }
        for kind, entry in by_kind.items():
            result.processes[kind] = max(result.processes.get(kind, 0), int(entry["count"]))

    def run(self) -> None:
        tick = 0
        while not self._halt.is_set():
            self.sample(scan=tick % self.scan_every == 0)
            tick += 1
            self._halt.wait(self.interval)
        self.sample(scan=False)
        elapsed = time.perf_counter() - self._t0
        self.result.mean_period_s = elapsed / max(1, self.result.samples)


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> dict[str, float]:
    """Least-squares line ``y = slope * x + intercept`` and its R^2 (1 - SS_res / SS_tot).

    Needs two distinct x; with two points R^2 is 1 by construction.
    """
    n = len(xs)
    if n != len(ys) or n < 2 or len(set(xs)) < 2:
        raise ValueError(f"a line needs two distinct x, got x={list(xs)}, y={list(ys)}")
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mean_x) ** 2 for x in xs)
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True))
    slope = sxy / sxx
    intercept = mean_y - slope * mean_x
    ss_res = sum((y - (slope * x + intercept)) ** 2 for x, y in zip(xs, ys, strict=True))
    ss_tot = sum((y - mean_y) ** 2 for y in ys)
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return {"slope": slope, "intercept": intercept, "r2": r2, "points": n}


class RayClusterError(RuntimeError):
    """The Ray head for ``--ray-cluster`` did not start (or there is no Ray CLI)."""


@dataclass
class RayHead:
    """A one-machine Ray cluster this benchmark started with ``ray start --head``."""

    address: str  # the GCS's host:port: what RAY_ADDRESS and `ray start --address` take
    temp_dir: Path
    num_cpus: int
    tag: str  # TAG value in the environment of its processes
    pids: dict[int, str]  # its processes right after the start, with their kinds
    start_s: float
    log: Path
    stop_s: float = 0.0  # set when the block exits
    stopped: list[int] = field(default_factory=list)  # PIDs stopped then


_ENDING = (signal.SIGTERM, signal.SIGHUP)  # turned into KeyboardInterrupt while a head runs


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def ray_head_command(num_cpus: int, temp_dir: Path) -> list[str]:
    """``ray start --head`` on free ports, usage statistics off, no dashboard UI.

    Every port Ray would otherwise take at a fixed number (GCS 6379, client server 10001,
    dashboard 8265, dashboard agent 52365) is a free one, so the head starts beside other Ray
    instances on the machine (other jobs' simulations). ``--temp-dir`` is not optional:
    ``ray start`` writes the new cluster's address to ``<temp dir>/ray_current_cluster``, and
    with the default ``/tmp/ray`` every later ``ray.init()`` on the machine without
    RAY_ADDRESS (any other simulation) would silently join this cluster.

    No ``--node-ip-address 127.0.0.1``: Ray replaces a loopback address with the machine's
    routable one (``ray._private.services.resolve_ip_for_localhost``), so the head is on the
    network whatever is asked; the README says what that means.
    """
    from simulations.flower_cli import free_port

    return [
        str(RAY),
        "start",
        "--head",
        f"--num-cpus={num_cpus}",
        f"--port={free_port()}",
        f"--temp-dir={temp_dir}",
        "--include-dashboard=false",
        f"--dashboard-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--ray-client-server-port={free_port()}",
        "--disable-usage-stats",
    ]


def stop_ray_head(tag: str, grace: float = 15.0, *, name: str = TAG) -> list[int]:
    """Stop every process of the head started with ``name=tag`` in its environment (``TAG``
    unless told) and their descendants, by PID. Returns the PIDs that were stopped.

    The raylet first (SIGTERM, up to ``grace`` seconds): it takes its workers and agents with
    it in about a second, as in ``ray stop``'s order; stopped together with the GCS, it waits
    about 12 s for it. Then SIGTERM to the rest for 5 s, then SIGKILL (Ray's autoscaler
    monitor ignores SIGTERM here). Not ``ray stop`` itself: it stops every Ray process of the
    user on the machine by name, other jobs' simulations included. The descendants are
    collected before anything is stopped: a worker or agent whose raylet died is re-parented
    to init, and one whose environment was overwritten (:func:`environ_has`) is then lost."""
    family: dict[int, psutil.Process] = {}
    for proc in tagged_processes(tag, name=name):
        family[proc.pid] = proc
        with suppress(psutil.Error):
            family |= {child.pid: child for child in proc.children(recursive=True)}
    kinds: dict[int, str] = {}
    for pid, proc in family.items():
        with suppress(psutil.Error):
            kinds[pid] = process_kind(proc.cmdline(), proc.name())
    raylets = [proc for pid, proc in family.items() if kinds.get(pid) == "ray-raylet"]
    rest = [proc for pid, proc in family.items() if kinds.get(pid) != "ray-raylet"]
    for stage, wait in ((raylets, grace), (rest, 5.0)):
        for proc in stage:
            with suppress(psutil.Error):
                proc.terminate()
        psutil.wait_procs(stage, timeout=wait)
    alive = [proc for proc in family.values() if proc.is_running()]
    for proc in [*alive, *tagged_processes(tag, name=name)]:
        with suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)
    return sorted(family)


@contextmanager
def ray_head(num_cpus: int, tag: str, log: Path) -> Iterator[RayHead]:
    """A Ray head on this machine for the duration of the block, stopped (by PID, see
    :func:`stop_ray_head`) and its temp dir removed on exit, on failure, on Ctrl-C, SIGTERM and
    SIGHUP (turned into KeyboardInterrupt while the block runs in the main thread; further
    signals are ignored while the head stops).

    Raises:
        RayClusterError: ``ray start`` failed or wrote no address; its output is in ``log``.
    """
    if not RAY.is_file():
        raise RayClusterError(
            f"no Ray CLI at {RAY}: install the project with its simulation extra "
            "(pip install -e '.[dev]' installs flwr[simulation], which brings ray)"
        )
    # Short on purpose: Ray's Unix sockets live under it and a socket path has at most 107 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="rayh-", dir="/tmp"))
    head: RayHead | None = None
    main_thread = threading.current_thread() is threading.main_thread()
    # SIGHUP too: a closed terminal or ssh session must not leave the head running.
    previous = {s: signal.signal(s, _interrupt) for s in _ENDING} if main_thread else {}
    env = os.environ | {TAG: tag, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop(RAY_ADDRESS, None)  # a new head, not a node joining whatever RAY_ADDRESS names
    try:
        started = time.perf_counter()
        with log.open("wb") as out:
            done = subprocess.run(
                ray_head_command(num_cpus, temp_dir),
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=300,
                check=False,
            )
        start_s = time.perf_counter() - started
        address_file = temp_dir / "ray_current_cluster"
        if done.returncode != 0 or not address_file.is_file():
            raise RayClusterError(
                f"`ray start --head` exited {done.returncode} without a cluster address; its "
                f"output is in {log} (a port taken between choosing and binding it: run again)"
            )
        pids = {p.pid: process_kind(p.cmdline(), p.name()) for p in tagged_processes(tag)}
        head = RayHead(
            address=address_file.read_text().strip(),
            temp_dir=temp_dir,
            num_cpus=num_cpus,
            tag=tag,
            pids=pids,
            start_s=start_s,
            log=log,
        )
        yield head
    finally:
        # A second Ctrl-C or signal while the head stops would leave it half-stopped: ignored
        # until it is down.
        ending = (signal.SIGINT, *_ENDING) if main_thread else ()
        masked = {s: signal.signal(s, signal.SIG_IGN) for s in ending}
        try:
            stopping = time.perf_counter()
            stopped = stop_ray_head(tag)
            if head is not None:
                head.stop_s, head.stopped = time.perf_counter() - stopping, stopped
            shutil.rmtree(temp_dir, ignore_errors=True)
        finally:
            for signum, handler in (masked | previous).items():
                signal.signal(signum, handler)


def cluster_facts(address: str, since: float) -> dict[str, Any]:
    """What the cluster's GCS at ``address`` knows: its nodes, the jobs (Ray drivers) that
    started after ``since`` (epoch seconds) and, per job, where its actors ran.

    Read from the GCS directly (Ray's ``GlobalState``, what ``ray status`` uses): the state
    API (``ray list jobs``) needs the dashboard, which the head runs without, and a
    ``ray.init()`` here would add a job of its own."""
    from ray._private.state import GlobalState
    from ray._raylet import GcsClientOptions  # type: ignore[attr-defined]  # Cython, no stub

    state = GlobalState()
    state._initialize_global_state(GcsClientOptions.create(address, None, True, False))
    try:
        node_table = state.node_table()
        job_table = state.job_table()
        actor_table = state.actor_table(None)
    finally:
        state.disconnect()
    ip_of = {n["NodeID"]: n["NodeManagerAddress"] for n in node_table}
    nodes = [
        {
            "node_id": n["NodeID"],
            "ip": n["NodeManagerAddress"],
            "alive": n["Alive"],
            "cpus": n["Resources"].get("CPU", 0.0),
        }
        for n in node_table
    ]
    jobs = []
    for job in job_table:
        if job["StartTime"] < since * 1000:
            continue
        actors: dict[str, dict[str, int]] = {}
        for actor in actor_table.values():
            if actor["JobID"] == job["JobID"]:
                per_node = actors.setdefault(actor["ActorClassName"], {})
                ip = ip_of.get(actor["Address"]["NodeID"], actor["Address"]["IPAddress"])
                per_node[ip] = per_node.get(ip, 0) + 1
        jobs.append(
            {
                "job_id": job["JobID"],
                "driver_pid": job["DriverPid"],
                "driver_ip": job["DriverIPAddress"],
                "entrypoint": job.get("Entrypoint", ""),
                "finished": job["IsDead"],
                "seconds": (job["EndTime"] - job["StartTime"]) / 1000 if job["IsDead"] else None,
                "actors": actors,
            }
        )
    alive = [n for n in nodes if n["alive"]]
    return {
        "address": address,
        "nodes": nodes,
        "alive_nodes": len(alive),
        "cpus": sum(n["cpus"] for n in alive),
        "jobs": jobs,
    }


def used_cluster(
    facts: dict[str, Any], seen: dict[str, list[int]], head_pids: Sequence[int] = ()
) -> dict[str, Any]:
    """Did the run's Flower simulation really run on the cluster? Yes when the cluster's GCS
    lists a finished job whose driver is this run's ``flwr-simulation`` process (a PID the
    sampler saw in the run's tree) with Flower's ``ClientAppActor`` actors, and the run's tree
    held no GCS of its own (an in-process ``ray.init()`` starts one beside the driver)."""
    drivers = set(seen.get("flwr-simulation", []))
    ours = [j for j in facts["jobs"] if j["driver_pid"] in drivers]
    job = ours[0] if len(ours) == 1 else None
    actors = job["actors"].get("ClientAppActor", {}) if job else {}
    own_gcs = sorted(set(seen.get("ray-gcs", [])) - set(head_pids))
    verdict = bool(job and job["finished"] and actors and not own_gcs)
    return {
        "used": verdict,
        "driver_job": job,
        "client_app_actors_per_node": actors,
        "own_gcs_pids": own_gcs,
        "drivers_seen": sorted(drivers),
    }


def stop_tree(process: subprocess.Popen[bytes], known: Sequence[psutil.Process]) -> None:
    """Stop a timed-out child and every process the sampler saw in its tree."""
    from simulations.flower_cli import stop_process_group

    stop_process_group(process, grace=10.0)
    for proc in known:
        with suppress(psutil.Error):
            proc.kill()


def measure(
    sites: int,
    workdir: Path,
    data_cache: Path,
    *,
    overrides: Sequence[str] = (),
    interval: float = 0.2,
    timeout: float = 7200.0,
    ray_cpus: int | None = None,
    ray_address: str | None = None,
) -> dict[str, Any]:
    """One point: the scenario at ``sites`` sites in a fresh process tree, sampled.

    With ``ray_cpus``, a fresh Ray head with that many CPUs (:func:`ray_head`, tagged like the
    run, so its raylet and the workers running the ClientApps count in the memory peaks) is
    started before the run and stopped after it; with ``ray_address``, an existing cluster is
    used (only this machine's processes of the run are sampled). Either way the run gets
    RAY_ADDRESS and the point says whether the cluster ran it (:func:`used_cluster`)."""
    from simulations.run import prepare_data

    started = time.perf_counter()
    prepare_data(scenario_for(sites), data_cache)  # not timed: generated once, then cached
    generate_s = time.perf_counter() - started
    run_dir = workdir / f"sites-{sites}"
    shutil.rmtree(run_dir, ignore_errors=True)
    log_path = workdir / f"sites-{sites}.log"
    child_json = workdir / f"sites-{sites}.child.json"
    token = secrets.token_hex(8)
    command = [
        sys.executable,
        "-m",
        "benchmarks.scaling",
        "--child",
        str(sites),
        "--run-dir",
        str(run_dir),
        "--data-cache",
        str(data_cache),
        "--child-json",
        str(child_json),
    ]
    for item in overrides:
        command += ["--set", item]
    env = os.environ | {TAG: token}
    env.pop(RAY_ADDRESS, None)  # only the cluster asked for: the plain mode is one machine
    head_log = workdir / f"sites-{sites}.ray-head.log"
    cluster: dict[str, Any] | None = None
    head_facts: dict[str, Any] = {}
    with ray_head(ray_cpus, token, head_log) if ray_cpus else nullcontext() as head:
        address = head.address if head else ray_address
        if address:
            env[RAY_ADDRESS] = address
        load_before = os.getloadavg()
        since = time.time() - 60  # the head may be another machine: allow for clock skew
        with log_path.open("wb") as log:
            begin = time.perf_counter()
            process = subprocess.Popen(
                command,
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            sampler = TreeSampler(process.pid, token, interval=interval)
            sampler.start()
            try:
                code = process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                stop_tree(process, list(sampler.known.values()))
                code = -1
            except BaseException:  # Ctrl-C or SIGTERM: the run is in its own session
                stop_tree(process, list(sampler.known.values()))
                sampler.stop()
                raise
            wall = time.perf_counter() - begin
            memory = sampler.stop()
        if address:  # before the head stops: its GCS holds the jobs and actors
            try:
                facts = cluster_facts(address, since)
                cluster = facts | used_cluster(facts, memory.pids, list(head.pids) if head else [])
            except Exception as err:  # recorded in the point as a failed check
                cluster = {"address": address, "used": False, "error": repr(err)}
    if head:
        head_facts = {
            "mode": "local head (ray start --head)",
            "head_start_s": head.start_s,
            "head_stop_s": head.stop_s,
            "head_cpus": head.num_cpus,
            "head_log": str(head.log),
            "head_processes": sorted(set(head.pids.values())),
            "head_processes_stopped": len(head.stopped),
        }
    elif ray_address:
        head_facts = {"mode": "existing cluster (--ray-address)"}
    # After the head stopped: none of its processes (nor the run's) may be left.
    leftover = [p.pid for p in sampler.known.values() if p.is_running()]
    point: dict[str, Any] = {
        "sites": sites,
        "exit_code": code,
        "completed": code == 0,
        "wall_s": wall,
        "generate_s": generate_s,
        "peak_rss_mib": memory.peak_rss / MIB,
        "peak_pss_mib": memory.peak_pss / MIB,
        "peak_pss_at_s": memory.peak_pss_at_s,
        "peak_breakdown": memory.breakdown,
        "processes": memory.processes,
        "ray_actors": memory.processes.get("ray-actor", 0),
        "samples": memory.samples,
        "sample_period_s": memory.mean_period_s,
        "leftover_processes": leftover,
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "log": str(log_path),
        "run_dir": str(run_dir),
    }
    if cluster is not None:
        point["ray_cluster"] = head_facts | cluster
        point["used_cluster"] = bool(cluster.get("used"))
    if child_json.is_file():
        point |= json.loads(child_json.read_text())
    metrics_path = run_dir / "metrics.json"
    if metrics_path.is_file():
        rounds = json.loads(metrics_path.read_text())["rounds"]
        entry = rounds[0]
        seconds = entry.get("seconds", {})
        point |= {
            "round_s": seconds.get("round"),
            "rounds_s": [r.get("seconds", {}).get("round") for r in rounds],
            "train_s": seconds.get("train"),
            "evaluate_s": seconds.get("evaluate"),
            "trained": sum(1 for s in entry["status"].values() if s == "trained"),
            "evaluated": sum(1 for v in entry["sites"].values() if "auc" in v),
            "statuses": sorted(set(entry["status"].values())),
        }
    return point


def fits(points: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Lines through the completed points: round time, run time and both memory peaks."""
    done = [p for p in points if p.get("completed") and p.get("round_s") is not None]
    if len({p["sites"] for p in done}) < 2:
        return {}
    xs = [float(p["sites"]) for p in done]
    return {
        key: fit_line(xs, [float(p[key]) for p in done])
        for key in ("round_s", "run_s", "peak_pss_mib", "peak_rss_mib")
    }


def targets(points: Sequence[dict[str, Any]], fit: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets against the measured points (memory judged on PSS and on RSS)."""
    out: dict[str, Any] = {}
    for point in points:
        limit = TARGETS_GB.get(point["sites"])
        if limit is not None:
            out[f"peak_{point['sites']}_sites"] = {
                "limit_gb": limit,
                "pss_gb": point["peak_pss_mib"] * MIB / GB,
                "rss_gb": point["peak_rss_mib"] * MIB / GB,
                "met_pss": point["completed"] and point["peak_pss_mib"] * MIB <= limit * GB,
                "met_rss": point["completed"] and point["peak_rss_mib"] * MIB <= limit * GB,
            }
    if "round_s" in fit:
        out["round_time_linear"] = {"r2": fit["round_s"]["r2"], "met": fit["round_s"]["r2"] >= 0.95}
    return out


def table(points: Sequence[dict[str, Any]], fit: dict[str, Any]) -> str:
    lines = [
        "| sites | round (s) | train / evaluate (s) | run (s) | wall (s) | peak PSS (GiB) | "
        "peak RSS sum (GiB) | Ray actors | trained |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in points:
        if not p.get("completed"):
            lines.append(f"| {p['sites']} | failed (exit {p['exit_code']}, log {p['log']}) |")
            continue
        lines.append(
            f"| {p['sites']} | {p['round_s']:.1f} | {p['train_s']:.1f} / {p['evaluate_s']:.1f} | "
            f"{p['run_s']:.1f} | {p['wall_s']:.1f} | {p['peak_pss_mib'] / 1024:.2f} | "
            f"{p['peak_rss_mib'] / 1024:.2f} | {p['ray_actors']} | {p['trained']}/{p['sites']} |"
        )
    for key, label, unit in (
        ("round_s", "round time", "s"),
        ("peak_pss_mib", "peak PSS", "MiB"),
    ):
        if key in fit:
            f = fit[key]
            lines.append(
                f"\nfit {label}: {f['slope']:.3f} {unit}/site x sites + {f['intercept']:.1f} "
                f"{unit}, R^2 {f['r2']:.4f} ({f['points']} points)"
            )
    return "\n".join(lines)


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {
        "python": platform.python_version(),
        **{name: version(name) for name in ("flwr", "ray", "torch", "opacus", "psutil")},
    }


def child(args: argparse.Namespace) -> int:
    """One measured run, inside the fresh process tree (``--child N``)."""
    import torch

    torch.set_num_threads(1)
    from simulations.run import parse_set, run_scenario

    overrides = {"num-server-rounds": 1} | parse_set(args.set)
    started = time.perf_counter()
    run_scenario(
        scenario_for(args.child),
        overrides=overrides,
        out_dir=args.run_dir,
        data_cache=args.data_cache,
    )
    facts = {
        "run_s": time.perf_counter() - started,
        "overrides": overrides,
        # What the runner passes as --federation-config (simulations.run.run_scenario).
        "federation": {"num-supernodes": args.child, "client-resources-num-cpus": 1},
        # What Flower's Ray backend (in flwr-simulation, a descendant) connects to: unset means
        # a fresh in-process Ray instance beside the driver.
        "ray_address_env": os.environ.get(RAY_ADDRESS),
    }
    args.child_json.write_text(json.dumps(facts))
    return 0


def spread(args: argparse.Namespace, ray_cpus: int | None) -> dict[str, Any]:
    """How the runs were spread: Flower's Ray backend on this machine or on a Ray cluster."""
    facts: dict[str, Any] = {
        "client-resources-num-cpus": 1,
        "actors": "floor(Ray CPUs / client-resources-num-cpus): each ClientApp message runs "
        "in one of these Ray worker processes, nodes take turns",
    }
    if args.ray_cluster:
        return facts | {
            "backend": "Flower simulation engine, Ray backend, connected (RAY_ADDRESS) to a Ray "
            "head on this machine started by the benchmark for each point",
            "ray_cpus": ray_cpus,
        }
    if args.ray_address:
        return facts | {
            "backend": "Flower simulation engine, Ray backend, connected (RAY_ADDRESS) to an "
            "existing Ray cluster",
            "ray_address": args.ray_address,
        }
    return facts | {
        "backend": "Flower simulation engine, Ray backend, one machine",
        "ray_cpus": os.cpu_count(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", default=",".join(map(str, FULL_SITES)), help="e.g. 10,30")
    parser.add_argument("--quick", action="store_true", help=f"sites {QUICK_SITES} (a test)")
    parser.add_argument("--out", type=Path, help=f"JSON (default {RESULTS})")
    parser.add_argument("--workdir", type=Path, help="run folders and logs (default: a temp dir)")
    parser.add_argument("--data-cache", type=Path, default=ROOT / "phantom_data")
    parser.add_argument("--interval", type=float, default=0.2, help="memory sampling (s)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ray = parser.add_mutually_exclusive_group()
    ray.add_argument(
        "--ray-cluster",
        action="store_true",
        help="run each point on a Ray head this benchmark starts (ray start --head) and stops, "
        f"connected through RAY_ADDRESS, not on a fresh in-process Ray (default out {RESULTS_RAY})",
    )
    ray.add_argument(
        "--ray-address",
        metavar="HOST:PORT",
        help="run each point on an existing Ray cluster (its head's GCS address); only this "
        "machine's processes are sampled",
    )
    parser.add_argument(
        "--ray-cpus", type=int, help="CPUs of the --ray-cluster head (default: this machine's)"
    )
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-json", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        return child(args)
    sites = list(QUICK_SITES) if args.quick else [int(s) for s in args.sites.split(",") if s]
    if args.ray_cpus is not None and not args.ray_cluster:
        parser.error("--ray-cpus sizes the head --ray-cluster starts: add --ray-cluster")
    clustered = args.ray_cluster or bool(args.ray_address)
    ray_cpus = (args.ray_cpus or os.cpu_count() or 1) if args.ray_cluster else None
    if os.environ.get(RAY_ADDRESS) and not clustered:
        print(f"note: {RAY_ADDRESS} is ignored here; pass --ray-address to use that cluster")
    out = args.out or (RESULTS_RAY if clustered else RESULTS)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="scaling-"))
    workdir.mkdir(parents=True, exist_ok=True)
    points = []
    for n in sites:
        print(f"{n} sites ...", flush=True)
        try:
            point = measure(
                n,
                workdir,
                args.data_cache,
                overrides=args.set,
                interval=args.interval,
                ray_cpus=ray_cpus,
                ray_address=args.ray_address,
            )
        except RayClusterError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        points.append(point)
        print(
            f"  {n} sites: round {point.get('round_s')} s, wall {point['wall_s']:.1f} s, "
            f"peak PSS {point['peak_pss_mib']:.0f} MiB, RSS sum {point['peak_rss_mib']:.0f} MiB, "
            f"processes {point['processes']}",
            flush=True,
        )
        if clustered:
            facts = point["ray_cluster"]
            print(
                f"  Ray cluster {facts['address']}: used {point['used_cluster']}, "
                f"ClientApp actors per node {facts.get('client_app_actors_per_node')}, "
                f"{facts.get('alive_nodes')} node(s), {facts.get('cpus')} CPUs",
                flush=True,
            )
    fit = fits(points)
    document = {
        "benchmark": "scaling",
        "command": " ".join(["python -m benchmarks.scaling", *(argv or sys.argv[1:])]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "scenario": SCENARIO,
        "machine": {
            "cpus": os.cpu_count(),
            "memory_gib": psutil.virtual_memory().total / 2**30,
            "platform": platform.platform(),
        },
        "versions": versions(),
        "memory_measure": (
            "peak over time of the sum over the process tree of RSS (upper bound: shared pages "
            "counted per process) and of PSS (shared pages split), sampled with psutil"
        ),
        "spread": spread(args, ray_cpus),
        "points": points,
        "fit": fit,
        "targets": targets(points, fit),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=2) + "\n")
    print(table(points, fit))
    print(f"wrote {out}; run folders and logs in {workdir}")
    good = all(p["completed"] and (p.get("used_cluster") or not clustered) for p in points)
    return 0 if good else 1


if __name__ == "__main__":
    raise SystemExit(main())
