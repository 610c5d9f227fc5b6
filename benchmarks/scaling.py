"""Time per round and peak memory of the real Flower simulation at 10, 30, 100 and 300 sites.

``python -m benchmarks.scaling [--sites 10,30,100,300] [--quick] [--out PATH] [--workdir DIR]``

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
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results" / "scaling.json"
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


class TreeSampler(threading.Thread):
    """Samples the memory of a process tree every ``interval`` seconds until :meth:`stop`.

    The tree: ``root`` and its descendants, plus every process whose environment has
    ``TAG=tag`` (scanned every ``scan_every`` samples, since reading every process's
    environment costs more than reading a few processes' memory). Memory: the sum of RSS
    (``memory_info``) and of PSS (``memory_full_info``, Linux ``smaps_rollup``) over the
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
            for proc in psutil.process_iter(["pid"]):
                if proc.pid in self.known or proc.pid == os.getpid():
                    continue
                with suppress(psutil.Error):
                    if proc.environ().get(TAG) == self.tag:
                        found.append(proc)
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
) -> dict[str, Any]:
    """One point: the scenario at ``sites`` sites in a fresh process tree, sampled."""
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
    load_before = os.getloadavg()
    with log_path.open("wb") as log:
        begin = time.perf_counter()
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=os.environ | {TAG: token},
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
        wall = time.perf_counter() - begin
        memory = sampler.stop()
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
    if child_json.is_file():
        point |= json.loads(child_json.read_text())
    metrics_path = run_dir / "metrics.json"
    if metrics_path.is_file():
        entry = json.loads(metrics_path.read_text())["rounds"][0]
        seconds = entry.get("seconds", {})
        point |= {
            "round_s": seconds.get("round"),
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
    }
    args.child_json.write_text(json.dumps(facts))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", default=",".join(map(str, FULL_SITES)), help="e.g. 10,30")
    parser.add_argument("--quick", action="store_true", help=f"sites {QUICK_SITES} (a test)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--workdir", type=Path, help="run folders and logs (default: a temp dir)")
    parser.add_argument("--data-cache", type=Path, default=ROOT / "phantom_data")
    parser.add_argument("--interval", type=float, default=0.2, help="memory sampling (s)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-json", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        return child(args)
    sites = list(QUICK_SITES) if args.quick else [int(s) for s in args.sites.split(",") if s]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="scaling-"))
    workdir.mkdir(parents=True, exist_ok=True)
    points = []
    for n in sites:
        print(f"{n} sites ...", flush=True)
        point = measure(n, workdir, args.data_cache, overrides=args.set, interval=args.interval)
        points.append(point)
        print(
            f"  {n} sites: round {point.get('round_s')} s, wall {point['wall_s']:.1f} s, "
            f"peak PSS {point['peak_pss_mib']:.0f} MiB, RSS sum {point['peak_rss_mib']:.0f} MiB, "
            f"processes {point['processes']}",
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
        "spread": {
            "backend": "Flower simulation engine, Ray backend, one machine",
            "client-resources-num-cpus": 1,
            "actors": "floor(Ray CPUs / client-resources-num-cpus): each ClientApp message runs "
            "in one of these Ray worker processes, nodes take turns",
            "ray_cpus": os.cpu_count(),
        },
        "points": points,
        "fit": fit,
        "targets": targets(points, fit),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    print(table(points, fit))
    print(f"wrote {args.out}; run folders and logs in {workdir}")
    return 0 if all(p["completed"] for p in points) else 1


if __name__ == "__main__":
    raise SystemExit(main())
