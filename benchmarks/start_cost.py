"""What a ClientApp process pays before it trains: imports, model construction, one message.

``python -m benchmarks.start_cost [--repeats 3] [--baseline DIR] [--out PATH]``

In a deployment Flower starts a new ClientApp process for every message, so whatever the
process imports and builds is paid once per site per message (a train and an evaluate message
per round). Each measurement below runs in a fresh ``python`` process (working directory: the
source tree measured, so its packages shadow the installed ones; ``OMP_NUM_THREADS=1`` and
``torch.set_num_threads(1)``), on a phantom site of the ``many`` preset (NIfTI CT), micro ViT
from the seeded backbone, DP on (the ``many-sites`` scenario's run config), round 1:

* ``import``: ``python -X importtime -c "import client.app"``; the total (``client.app``'s
  cumulative import time, seconds) and the self time summed per top-level package;
* ``build``: ``import client.app``, then ``core.federation.rounds.build_lora_model`` once
  (cold: the first model of the process, as every deployment message builds it) and again
  (warm), seconds;
* ``train`` and ``evaluate``: ``import client.app``, then the real ClientApp (``client.app.app``,
  all its mods) handles one Flower message of that type for a site with an empty state folder
  (its first message: the preprocessing cache is filled), seconds from process start to the
  reply (``process_s``), the import part (``import_s``) and the handler part (``handle_s``);
  and which heavy libraries the process had loaded by then (``loaded``);
* ``evaluate-warm``: the same evaluate message again in a new process, on the state folder the
  previous one left (a later round: items come from the site's preprocessing cache).

With ``--baseline DIR`` (another source tree, e.g. ``mkdir /tmp/base && git archive main |
tar -x -C /tmp/base``) every measurement also runs against DIR, interleaved with the current
tree repetition by repetition so that background load hits both alike; minima and medians over
``--repeats``. Writes ``benchmarks/results/start_cost.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results" / "start_cost.json"
# Libraries that cost a second or more to import, or that only some paths need.
HEAVY = (
    "torch",
    "peft",
    "transformers",
    "opacus",
    "scipy",
    "monai",
    "pydicom",
    "nibabel",
    "tenseal",
    "matplotlib",
    "sklearn",
    "core.he",
)

# Runs in the measured tree (cwd); argv: kind, run-config JSON, adapters file, fingerprint.
CHILD = r"""
import json, sys, time
started = time.perf_counter()
import client.app
imported = time.perf_counter()
import torch
torch.set_num_threads(1)
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from safetensors.torch import load_file
from core.config import RunConfig
from core.federation.rounds import build_lora_model

kind, run_config, adapters_path, fingerprint = sys.argv[1:5]
run_config = json.loads(run_config)
out = {"import_s": imported - started}
if kind == "build":
    cfg = RunConfig.from_flat(run_config)
    t = time.perf_counter(); build_lora_model(cfg); out["build_cold_s"] = time.perf_counter() - t
    t = time.perf_counter(); build_lora_model(cfg); out["build_warm_s"] = time.perf_counter() - t
else:
    from flwr.supercore.task_identity import TaskIdentity  # what a SuperNode sets

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    message = Message(
        RecordDict({
            "arrays": ArrayRecord(load_file(adapters_path)),
            "config": ConfigRecord({"server-round": 1, "backbone-fingerprint": fingerprint}),
        }),
        dst_node_id=1,
        message_type=kind,
    )
    context = Context(1, 1, {"partition-id": 0, "num-partitions": 2}, RecordDict(), run_config)
    t = time.perf_counter()
    reply = client.app.app(message, context)
    out["handle_s"] = time.perf_counter() - t
    out["error"] = reply.error.reason if reply.has_error() else ""
    out["status"] = "" if reply.has_error() else str(reply.content["site"].get("status", "ok"))
out["process_s"] = time.perf_counter() - started
heavy = sys.argv[5].split(",")
out["loaded"] = sorted(h for h in heavy if h in sys.modules)
print("RESULT " + json.dumps(out))
"""


def child_env() -> dict[str, str]:
    return os.environ | {"OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}


def run_child(
    src: Path, kind: str, inputs: dict[str, Any], state: Path | None = None
) -> dict[str, Any]:
    """One fresh process in ``src``; its RESULT line plus the wall time seen from here.

    ``kind``: ``build``, ``train``, ``evaluate``. ``state``: the sites' state root (their
    ledgers and preprocessing caches); a new empty one when None (a site's first message).
    """
    state = state or Path(tempfile.mkdtemp(prefix="start-cost-state-"))
    run_config = inputs["run_config"] | {"state-root": str(state)}
    command = [
        sys.executable,
        "-c",
        CHILD,
        kind,
        json.dumps(run_config),
        inputs["adapters"],
        inputs["fingerprint"],
        ",".join(HEAVY),
    ]
    began = time.perf_counter()
    done = subprocess.run(
        command, cwd=src, env=child_env(), capture_output=True, text=True, timeout=900
    )
    wall = time.perf_counter() - began
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{kind} in {src} failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(lines[-1][len("RESULT ") :])
    if result.get("error"):
        raise RuntimeError(f"{kind} in {src}: the ClientApp replied with {result['error']}")
    result["wall_s"] = wall
    return result


def importtime(src: Path) -> dict[str, Any]:
    """``python -X importtime -c "import client.app"`` in ``src``: total and per package."""
    began = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import client.app"],
        cwd=src,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    wall = time.perf_counter() - began
    per_package: Counter[str] = Counter()
    total = 0
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, cumulative_us, name = line[len("import time:") :].split("|")
        name = name.strip()
        package = name.split(".")[0]
        if package in ("core", "client", "server"):
            package = ".".join(name.split(".")[:2])
        per_package[package] += int(self_us)
        if name == "client.app":
            total = int(cumulative_us)
    return {
        "client_app_s": total / 1e6,
        "wall_s": wall,
        "top_packages_s": {k: v / 1e6 for k, v in per_package.most_common(12)},
    }


def prepare(workdir: Path) -> dict[str, Any]:
    """Two phantom sites of the ``many`` preset and the round-1 global adapters."""
    from safetensors.torch import save_file

    from core.config import RunConfig
    from core.data.phantoms import generate_hospitals
    from core.federation.rounds import initial_adapters
    from simulations.run import load_scenario

    data = workdir / "sites"
    if not (data / ".complete").is_file():
        generate_hospitals(data, "many", seed=0, n_sites=2, alpha=0.5, overwrite=True)
        (data / ".complete").write_text("")
    run_config = dict(load_scenario("many-sites")["run-config"]) | {
        "num-server-rounds": 1,
        "data-root": str(data),
        "min-available-nodes": 2,
    }
    adapters, fingerprint = initial_adapters(RunConfig.from_flat(run_config))
    path = workdir / "adapters.safetensors"
    save_file({k: v.contiguous() for k, v in adapters.items()}, str(path))
    return {"run_config": run_config, "adapters": str(path), "fingerprint": fingerprint}


def summary(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "n": len(values)}


def measure(trees: dict[str, Path], inputs: dict[str, Any], repeats: int) -> dict[str, Any]:
    raw: dict[str, dict[str, list[dict[str, Any]]]] = {label: {} for label in trees}
    for _ in range(repeats):
        for label, src in trees.items():  # interleaved: load hits both alike
            raw[label].setdefault("import", []).append(importtime(src))
        for kind in ("build", "train", "evaluate"):
            for label, src in trees.items():
                state = Path(tempfile.mkdtemp(prefix="start-cost-state-"))
                raw[label].setdefault(kind, []).append(run_child(src, kind, inputs, state))
                if kind == "evaluate":  # a later round: the same site, its cache now warm
                    warm = run_child(src, kind, inputs, state)
                    raw[label].setdefault("evaluate-warm", []).append(warm)
    out: dict[str, Any] = {}
    for label, kinds in raw.items():
        entry: dict[str, Any] = {"raw": kinds}
        entry["import_s"] = summary([r["client_app_s"] for r in kinds["import"]])
        entry["build_cold_s"] = summary([r["build_cold_s"] for r in kinds["build"]])
        entry["build_warm_s"] = summary([r["build_warm_s"] for r in kinds["build"]])
        for kind in ("train", "evaluate", "evaluate-warm"):
            entry[kind] = {
                key: summary([r[key] for r in kinds[kind]])
                for key in ("import_s", "handle_s", "process_s", "wall_s")
            }
            entry[kind]["loaded"] = kinds[kind][-1]["loaded"]
        entry["build_loaded"] = kinds["build"][-1]["loaded"]
        out[label] = entry
    return out


def table(results: dict[str, Any]) -> str:
    labels = list(results)
    lines = [
        "| seconds (median of repeats; min in brackets) | " + " | ".join(labels) + " |",
        "|---|" + "---:|" * len(labels),
    ]

    def cell(s: dict[str, float]) -> str:
        return f"{s['median']:.2f} ({s['min']:.2f})"

    rows = [
        ("`import client.app` (-X importtime)", lambda e: cell(e["import_s"])),
        ("model build, first in process", lambda e: cell(e["build_cold_s"])),
        ("model build, again", lambda e: cell(e["build_warm_s"])),
        ("train message: process start to reply", lambda e: cell(e["train"]["process_s"])),
        ("  of which the handler", lambda e: cell(e["train"]["handle_s"])),
        ("evaluate message: process start to reply", lambda e: cell(e["evaluate"]["process_s"])),
        ("  of which the handler", lambda e: cell(e["evaluate"]["handle_s"])),
        (
            "evaluate message, preprocessing cache warm (a later round)",
            lambda e: cell(e["evaluate-warm"]["process_s"]),
        ),
        ("  of which the handler", lambda e: cell(e["evaluate-warm"]["handle_s"])),
        ("heavy libraries loaded after train", lambda e: ", ".join(e["train"]["loaded"])),
        ("... after evaluate", lambda e: ", ".join(e["evaluate"]["loaded"])),
        ("... after evaluate, cache warm", lambda e: ", ".join(e["evaluate-warm"]["loaded"])),
    ]
    for name, get in rows:
        lines.append(f"| {name} | " + " | ".join(get(results[label]) for label in labels) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline", type=Path, help="another source tree to compare with")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--workdir", type=Path, help="phantom sites and adapters (default: temp)")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="start-cost-"))
    workdir.mkdir(parents=True, exist_ok=True)
    inputs = prepare(workdir)
    trees = {"current": ROOT}
    if args.baseline is not None:
        trees = {"baseline": args.baseline.resolve(), "current": ROOT}
    load_before = os.getloadavg()
    results = measure(trees, inputs, args.repeats)
    document = {
        "benchmark": "start_cost",
        "command": " ".join(["python -m benchmarks.start_cost", *(argv or sys.argv[1:])]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "trees": {label: str(path) for label, path in trees.items()},
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "cpus": os.cpu_count(),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    print(table(results))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
