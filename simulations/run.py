"""Run a named scenario as a real ``flwr`` simulation and report where its results are.

    python -m simulations.run default
    python -m simulations.run strict-privacy --set num-server-rounds=5 --set target-epsilon=2
    python -m simulations.run default --data /my/sites   # your own site folders
    python -m simulations.run --list

A scenario (``simulations/scenarios/NAME.toml``) names phantom hospitals to generate, an
optional ``[pretrain]`` backbone (steps of masked image modelling on unlabeled phantoms), and run
config values; ``--set key=value`` overrides any run-config key. The runner generates the
hospitals (cached by preset and seed) unless ``--data DIR`` (or ``--set data-root=DIR``)
points at your own sites (one sub-folder with a dataset.json per site), starts its own local
SuperLink, runs ``flwr run`` with one simulated SuperNode per hospital, prints progress per
round, checks that the run really completed, and prints the run folder and the privacy report.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import tomllib
from collections.abc import Sequence
from math import inf
from pathlib import Path
from typing import Any

from core.config import ConfigError, RunConfig, format_sections
from core.data.phantoms import PHANTOM_VERSION, generate_hospitals
from core.federation.sites import list_sites
from core.pretrain import MIMSettings, demo_backbone
from simulations.flower_cli import RunFailed, flwr_run, local_superlink

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = Path(__file__).resolve().parent / "scenarios"
ROUND_LINE = re.compile(r"\[ROUND (\d+)/(\d+)\]")
SITE_LINE = re.compile(r"(round \d+ site \S+: .+)$")  # server.app.site_progress


def load_scenario(name_or_path: str) -> dict[str, Any]:
    path = Path(name_or_path)
    if not path.suffix:
        path = SCENARIOS / f"{name_or_path}.toml"
    if not path.is_file():
        known = sorted(p.stem for p in SCENARIOS.glob("*.toml"))
        raise SystemExit(f"no scenario {name_or_path!r}; known scenarios: {known}")
    with path.open("rb") as handle:
        scenario = tomllib.load(handle)
    if "base" in scenario:  # another scenario's tables, these keys on top
        base = load_scenario(scenario.pop("base"))
        for key, value in scenario.items():
            base[key] = base.get(key, {}) | value if isinstance(value, dict) else value
        scenario = base
    scenario["name"] = path.stem
    return scenario


def parse_set(items: list[str]) -> dict[str, Any]:
    """``key=value`` pairs; values parsed as TOML scalars (so 3, 0.5, true and "x" work)."""
    values: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        try:
            values[key.strip()] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            values[key.strip()] = raw  # a bare string
    return values


def prepare_data(scenario: dict[str, Any], cache: Path) -> Path:
    """Generate the scenario's phantom hospitals once; reuse them on later runs."""
    spec = dict(scenario.get("phantoms", {"preset": "default", "seed": 0}))
    tag = "-".join(f"{k}{v}" for k, v in sorted(spec.items())) + f"-v{PHANTOM_VERSION}"
    root = cache / tag
    marker = root / ".complete"
    if not marker.is_file():
        started = time.perf_counter()
        preset = spec.pop("preset", "default")
        seed = spec.pop("seed", 0)
        options = {k.replace("-", "_"): v for k, v in spec.items()}
        generate_hospitals(root, preset, seed=seed, overwrite=True, **options)
        marker.write_text(json.dumps(scenario.get("phantoms", {})))
        print(f"generated phantom hospitals in {root} ({time.perf_counter() - started:.1f} s)")
    return root


def resolve_data_root(scenario: dict[str, Any], overrides: dict[str, Any], cache: Path) -> Path:
    """The sites to run on: the user's own folder when ``data-root`` is given (one sub-folder
    per site with a dataset.json; checked here), else the scenario's phantom hospitals.

    Raises ConfigError naming the folder when it holds no site.
    """
    given = str(overrides.get("data-root", ""))
    if not given:
        return prepare_data(scenario, cache)
    root = Path(given).expanduser().resolve()
    list_sites(RunConfig.from_flat({"data-root": str(root), "sites": overrides.get("sites", "")}))
    return root


def prepare_backbone(
    scenario: dict[str, Any],
    values: dict[str, Any],
    cache: Path,
    own_sites: Sequence[Path] = (),
) -> None:
    """A scenario with a ``[pretrain]`` table starts from the demo backbone: the model size
    pretrained (once, then cached) on the unlabeled phantom archive, or, with ``own_sites``
    (the user's site folders), on their training images, labels ignored. An explicit
    ``backbone`` key wins. The ServerApp announces the file's fingerprint and every site
    checks it."""
    spec = scenario.get("pretrain")
    if not spec or values.get("backbone"):
        return
    known = {"steps", "seed", "visible-weight"}
    unknown = set(spec) - known
    if unknown:
        raise SystemExit(
            f"scenario {scenario['name']}: unknown [pretrain] keys {sorted(unknown)}; "
            f"the table takes {sorted(known)}"
        )
    weight = spec.get("visible-weight", MIMSettings.visible_weight)
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0 <= weight < inf:
        raise SystemExit(
            f"scenario {scenario['name']}: [pretrain] visible-weight must be a finite number >= 0 "
            f"(0: SimMIM, masked tokens only), got {weight!r}"
        )
    size = str(values.get("model-size", RunConfig.model_size))
    path, digest = demo_backbone(
        cache,
        size=size,
        steps=int(spec.get("steps", 1000)),
        seed=int(spec.get("seed", 0)),
        data=own_sites,
        visible_weight=float(weight),
    )
    values["backbone"] = str(path.resolve())
    print(f"backbone {path} (fingerprint {digest[:12]}...)")


def provision_keys(folder: Path, state_root: Path, sites: Sequence[str]) -> Path:
    """Simulation only: make the CKKS contexts beside the run and hand each simulated site its
    copy of the secret one, where the ClientApp looks for it (``site_secret.ctx`` in the
    site's state folder, ``state-root/<site>``), as the coordinator of a real deployment hands
    it out of band. The run folder keeps only the public context, like a coordinator.
    Returns the public context's path (run config ``he-public-context``)."""
    from core.he.ckks import SECRET_CONTEXT_FILE, provision
    from core.io import write_bytes_atomic

    secret, public = provision(folder, overwrite=True)
    for site in sites:
        copy = state_root / site / SECRET_CONTEXT_FILE
        copy.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(copy, secret.read_bytes(), mode=0o600)
    secret.unlink()
    return public.resolve()


def check_site_keys(state_root: Path, sites: Sequence[str]) -> None:
    """With a ``he-public-context`` of the user's, each site's secret context must already be
    in its state folder (the runner provisions only when none is given).

    Raises:
        ConfigError: naming the sites without one and both ways out.
    """
    from core.he.ckks import SECRET_CONTEXT_FILE

    missing = [s for s in sites if not (state_root / s / SECRET_CONTEXT_FILE).is_file()]
    if missing:
        raise ConfigError(
            f"run config 'he-public-context' is given, but sites {missing} have no "
            f"{SECRET_CONTEXT_FILE} in {state_root}/<site>/: copy the matching secret context "
            "there (mode 600), or leave he-public-context unset to have the runner provision "
            "new contexts"
        )


def run_scenario(
    scenario: dict[str, Any],
    *,
    overrides: dict[str, Any],
    out_dir: Path,
    data_cache: Path,
    quiet: bool = False,
) -> Path:
    # Keys and types first: a typo in --set must not wait for data generation and pretraining.
    # Values and cross-field rules too (e.g. target-epsilon > 0); the CKKS contexts the runner
    # provisions itself below count as given.
    early = dict(scenario.get("run-config", {})) | overrides
    if early.get("he") and not early.get("he-public-context"):
        early |= {"he-public-context": "provisioned"}
    RunConfig.from_flat(early)
    data_root = resolve_data_root(scenario, overrides, data_cache)
    values = dict(scenario.get("run-config", {})) | overrides
    values |= {"data-root": str(data_root.resolve()), "out-dir": str(out_dir.resolve())}
    # Each simulated site keeps its ledger and last release in the run folder by default, so a
    # resumed run (resume=true, same out-dir) finds them; in deployment it is the site's disk.
    if not values.get("state-root"):
        values["state-root"] = str((out_dir / "state").resolve())
    chosen = {k: values[k] for k in ("data-root", "sites") if k in values}
    sites = list_sites(RunConfig.from_flat(chosen))
    if values.get("he"):  # before pretraining: a missing site key must not wait for it
        state_root = Path(values["state-root"])
        if values.get("he-public-context"):
            check_site_keys(state_root, sites)
        else:
            public = provision_keys(out_dir / "he-keys", state_root, sites)
            values["he-public-context"] = str(public)
    own_sites: list[Path] = []
    if overrides.get("data-root"):  # the user's hospitals: pretrain on their unlabeled images
        own_sites = [data_root / name for name in sites]
    prepare_backbone(scenario, values, data_cache, own_sites)
    cfg = RunConfig.from_flat(values)  # fail here, before any process starts
    values.setdefault("min-available-nodes", min(len(sites), cfg.min_available_nodes))
    federation = {"num-supernodes": len(sites), "client-resources-num-cpus": 1}
    about = (
        f"your sites in {data_root}"
        if overrides.get("data-root")
        else scenario.get("description", "")
    )
    print(f"scenario {scenario['name']}: {about}")
    print(f"{len(sites)} sites, {cfg.num_server_rounds} rounds, out-dir {out_dir}")
    if os.environ.get("RAY_ADDRESS"):  # inherited by flwr-simulation, whose ray.init() joins it
        print(
            f"Ray cluster RAY_ADDRESS={os.environ['RAY_ADDRESS']}: every node needs data-root, "
            "backbone and state-root at these paths (README: Spreading a simulation over several "
            "machines)"
        )
    started = time.perf_counter()
    shown: set[str] = set()  # the log stream can carry a line twice (two handlers)

    def progress(line: str) -> None:
        if quiet:
            return
        match = ROUND_LINE.search(line)
        if match and match[0] not in shown:
            shown.add(match[0])
            elapsed = time.perf_counter() - started
            print(f"  round {match[1]}/{match[2]} started at {elapsed:.0f} s", flush=True)
        elif (site := SITE_LINE.search(line)) and site[1] not in shown:
            shown.add(site[1])
            print(f"    {site[1]}", flush=True)
        elif "ERROR" in line or "Traceback" in line or "refused" in line or "rejected" in line:
            print(f"  {line}", flush=True)

    with local_superlink() as link:
        try:
            run_id = flwr_run(
                link.env,
                ROOT,
                "local",
                run_config=values,
                federation_config=federation,
                on_line=progress,
            )
        except RunFailed:
            print(f"superlink log: {link.log_file}", file=sys.stderr)
            raise
    elapsed = time.perf_counter() - started
    summary = summarize(out_dir)
    print(f"run {run_id} completed in {elapsed:.0f} s")
    print(summary)
    return out_dir


def summarize(out_dir: Path) -> str:
    metrics = json.loads((out_dir / "metrics.json").read_text())
    lines = ["round     auc  bal-acc  accuracy   loss   sites"]
    for entry in metrics["rounds"]:
        ev = entry.get("evaluate", {})
        status = entry.get("status", {})
        trained = sum(1 for s in status.values() if s == "trained")
        lines.append(
            f"{entry['round']:>5}  {_fmt(ev.get('auc'))}  {_fmt(ev.get('balanced-accuracy'))}   "
            f"{_fmt(ev.get('accuracy'))}  {_fmt(ev.get('loss'))}  {trained}/{len(status)} trained"
        )
    report = out_dir / "report.md"
    if report.is_file():
        lines.append(f"privacy report: {report}")
    lines.append(f"run folder: {out_dir}")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return f"{value:6.3f}" if isinstance(value, int | float) else "   n/a"


def run_folder(scenario: dict[str, Any], out: Path | None, overrides: dict[str, Any]) -> Path:
    """The run folder: ``--out``, else ``--set out-dir=...`` (taken out of ``overrides``: the
    runner writes the resolved folder into the run config itself), else
    ``runs/<scenario>-<time>``. Raises ConfigError when both name different folders."""
    given = overrides.pop("out-dir", None)
    chosen = Path(str(given)).expanduser() if given not in (None, "") else None
    if chosen is not None and out is not None and chosen.resolve() != out.resolve():
        raise ConfigError(
            f"--out {out} and --set out-dir={given} name different run folders; give one"
        )
    if out is None:
        out = chosen
    return out or ROOT / "runs" / f"{scenario['name']}-{time.strftime('%Y%m%d-%H%M%S')}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="run-config keys for --set, by section, with their defaults:\n" + format_sections(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("scenario", nargs="?", default="default")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a run-config key (listed below), e.g. --set lora-rank=16",
    )
    parser.add_argument("--out", type=Path, help="run folder (default runs/<scenario>-<time>)")
    parser.add_argument(
        "--data",
        type=Path,
        help="your own sites (one folder per site with a dataset.json) instead of phantoms; "
        "the same as --set data-root=DIR",
    )
    parser.add_argument("--data-cache", type=Path, default=ROOT / "phantom_data")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    args = parser.parse_args(argv)
    if args.list:
        for path in sorted(SCENARIOS.glob("*.toml")):
            print(f"{path.stem:16} {load_scenario(path.stem).get('description', '')}")
        return 0
    scenario = load_scenario(args.scenario)
    overrides = parse_set(args.set)
    if args.data is not None:
        overrides["data-root"] = str(args.data)
    try:
        out = run_folder(scenario, args.out, overrides)
        run_scenario(scenario, overrides=overrides, out_dir=out, data_cache=args.data_cache)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RunFailed as err:
        print(f"FAILED: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
