"""Where the federated model looks, case by case, at this site (nothing leaves the site).

    fedmedvit explain RUN_DIR --site-dir DIR --out DIR [--split test] [--method occlusion]
        [--adapters DIR] [--state-dir DIR | --shared-head-only] [--limit N]

Loads the run's final global adapters (``RUN_DIR/adapters``; in an encrypted run, decrypt them
first with ``fedmedvit decrypt``) onto the federation's backbone (refused unless it has the
fingerprint the run recorded: ``core.federation.runs``), with the site's own head from its state
folder when the run kept heads at the sites (head-sharing "local", or "shared+local"'s personal
read-out; ``--state-dir``, default ``RUN_DIR/state/<site folder name>`` as a simulation writes
it; refused when it was trained for another run: ``core.federation.local_head``; a site without
a personal read-out, e.g. one that did not train in the run, asks for the shared head alone
with ``--shared-head-only``), explains every case of the site's split
(``core.explain``), and writes one PNG overlay per case and ``index.html``: which adapters and
head file were loaded, then score, label and overlay per case, sorted by score (highest first).
"""

from __future__ import annotations

import argparse
import html
import sys
from pathlib import Path
from typing import Any

from torch import nn
from tqdm import tqdm

from core.adapters.lora import (
    AdapterStateError,
    adapter_state,
    load_adapter_folder,
    load_adapter_state,
)
from core.config import ConfigError, RunConfig
from core.data import DatasetError
from core.explain.overlay import render_overlay
from core.explain.relevance import DEFAULT_METHOD, METHODS, explain
from core.federation.local_head import (
    LocalHead,
    head_provenance,
    local_part_name,
    with_local_head,
)
from core.federation.rounds import open_split
from core.federation.runs import build_run_model
from core.federation.sites import LOCAL_HEAD_FILES
from core.io import write_text_atomic
from core.model.checkpoint import BackboneError

INDEX = "index.html"


def class_label(label: Any, names: tuple[str, ...] | None) -> str:
    """A label (class index, multi-hot tensor or None) in the site's class names when it has
    them: ``1`` -> ``"lesion"``; without names the index itself."""
    if label is None:
        return "the predicted class"
    value = label.tolist() if hasattr(label, "tolist") else label
    if isinstance(value, list):  # multi-label: the classes present
        present = [i for i, flag in enumerate(value) if flag]
        return ", ".join(names[i] if names else str(i) for i in present) or "none"
    return names[int(value)] if names and 0 <= int(value) < len(names) else str(value)


def load_site_head(
    model: nn.Module,
    cfg: RunConfig,
    state_dir: Path,
    backbone_fingerprint: str,
    site_dir: Path,
    *,
    shared_head_only: bool = False,
) -> Path | None:
    """Put the site's own head (``state_dir/local-head.safetensors``) on ``model`` (built on
    the backbone with ``backbone_fingerprint``; trained on the site at ``site_dir``) when the
    run kept heads at the sites; returns that file, None when the model is the adapters alone:
    the run shared its head, or ``shared_head_only`` (under "shared+local": the shared head
    without a personal read-out, what a site that did not train in the run has).

    Raises:
        FileNotFoundError: the run kept heads at the sites and the file is not there.
        ConfigError: ``shared_head_only`` for a run that kept each site's whole head ("local"):
            the adapters' head was never trained.
        LocalHeadError: the file was trained for another run (or predates provenance).
    """
    if not cfg.keeps_local_head:
        return None
    if shared_head_only:
        if not cfg.has_personal_head:
            raise ConfigError(
                f"--shared-head-only: this run kept each site's {local_part_name(cfg)} at the "
                f"site (head-sharing = {cfg.head_sharing}), so the adapters' head was never "
                "trained; point --state-dir at the site's state folder instead"
            )
        return None
    head = LocalHead.read(state_dir, cfg.task)
    if head is None:
        also = (
            "; a site without one (it did not train in this run) passes --shared-head-only to "
            "explain with the run's shared head alone"
            if cfg.has_personal_head
            else ""
        )
        raise FileNotFoundError(
            f"{state_dir / LOCAL_HEAD_FILES[cfg.task]} not found: this run kept each site's "
            f"{local_part_name(cfg)} at the site (head-sharing = {cfg.head_sharing}); point "
            f"--state-dir at the site's state folder (default RUN_DIR/state/<site folder "
            f"name>){also}"
        )
    current = head_provenance(cfg, model, backbone_fingerprint, site_dir)
    load_adapter_state(model, with_local_head(cfg, adapter_state(model), head, current))
    return state_dir / LOCAL_HEAD_FILES[cfg.task]


def explain_site(
    run_dir: Path,
    site_dir: Path,
    out: Path,
    *,
    split: str = "test",
    method: str = DEFAULT_METHOD,
    adapters: Path | None = None,
    state_dir: Path | None = None,
    shared_head_only: bool = False,
    limit: int | None = None,
) -> Path:
    """Write overlays and ``index.html`` for a site's split into ``out``; returns the index.

    Raises ConfigError for a run folder without a valid ``config.json``, BackboneError for a
    backbone other than the run's, AdapterStateError for missing or mismatched adapters,
    FileNotFoundError for a run that kept heads at the sites when the site's head is not
    found, LocalHeadError for a head of another run, DatasetError for unreadable site data;
    ``shared_head_only``: see :func:`load_site_head`."""
    cfg, model, digest = build_run_model(run_dir)
    adapters = adapters or run_dir / "adapters"
    load_adapter_folder(model, adapters)
    dataset = open_split(cfg, site_dir, split)  # first: a wrong --site-dir is named as such
    state = state_dir or run_dir / "state" / site_dir.name
    head_file = load_site_head(
        model, cfg, state, digest, site_dir, shared_head_only=shared_head_only
    )
    names = dataset.info.class_names
    count = len(dataset) if limit is None else min(limit, len(dataset))
    rows = []
    for index in tqdm(range(count), desc=f"explaining {split}", unit="case", file=sys.stderr):
        item = dataset[index]
        result = explain(model, item["image"], item["spacing"], method=method)
        label_text = class_label(item.get("label"), names)
        explained = class_label(result.target, names)
        name = f"case-{index:05d}.png"
        render_overlay(
            item["image"],
            result.image_map,
            out / name,
            spacing=item["spacing"].tolist(),
            title=f"case {index}: P({explained}) {result.score:.3f}, label {label_text}",
        )
        rows.append((result.score, index, label_text, name))
    explained = class_label(1 if cfg.num_classes <= 2 else None, names)
    rows.sort(key=lambda row: (-row[0], row[1]))
    shared = "the run's shared head (in the adapters)"
    if head_file is None:
        head_text = shared
        if cfg.has_personal_head:
            head_text += " alone, without a personal read-out (<code>--shared-head-only</code>)"
    elif cfg.has_personal_head:
        head_text = (
            f"{shared} plus the site's personal read-out <code>{html.escape(str(head_file))}</code>"
        )
    else:
        head_text = f"<code>{html.escape(str(head_file))}</code> (the site's own)"
    lines = [
        "<!doctype html><meta charset='utf-8'>",
        f"<title>Explanations: {html.escape(split)} split, {html.escape(method)}</title>",
        f"<h1>{html.escape(split)} split: {count} cases, method {html.escape(method)}</h1>",
        f"<p>Model: adapters <code>{html.escape(str(adapters))}</code>, head {head_text}, "
        f"backbone <code>{digest[:12]}</code>.</p>",
        f"<p>Score: the model's probability of <b>{html.escape(explained)}</b>; each overlay "
        "shows where that score comes from (colour bar: relevance, 1 = the case's maximum). "
        "Sorted by score.</p>",
        "<table><tr><th>rank</th><th>case</th><th>score</th><th>label</th><th>overlay</th></tr>",
    ]
    for rank, (score, index, label_text, name) in enumerate(rows, start=1):
        lines.append(
            f"<tr><td>{rank}</td><td>{index}</td><td>{score:.3f}</td>"
            f"<td>{html.escape(label_text)}</td><td><img src='{name}' loading='lazy'></td></tr>"
        )
    lines.append("</table>")
    return write_text_atomic(out / INDEX, "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedmedvit explain", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--site-dir", type=Path, required=True, help="folder with dataset.json")
    parser.add_argument("--out", type=Path, required=True, help="folder for overlays + index")
    parser.add_argument("--split", default="test")
    parser.add_argument("--method", default=DEFAULT_METHOD, choices=METHODS)
    parser.add_argument("--adapters", type=Path, help="default RUN_DIR/adapters")
    head = parser.add_mutually_exclusive_group()
    head.add_argument(
        "--state-dir",
        type=Path,
        help="the site's state folder (its own head when the run kept heads at the sites); "
        "default RUN_DIR/state/<site folder name>",
    )
    head.add_argument(
        "--shared-head-only",
        action="store_true",
        help='head-sharing "shared+local": explain with the shared head alone, for a site '
        "without a personal read-out (one that did not train in the run)",
    )
    parser.add_argument("--limit", type=int, help="explain only the first N cases")
    args = parser.parse_args(argv)
    try:
        index = explain_site(
            args.run_dir,
            args.site_dir,
            args.out,
            split=args.split,
            method=args.method,
            adapters=args.adapters,
            state_dir=args.state_dir,
            shared_head_only=args.shared_head_only,
            limit=args.limit,
        )
    except (FileNotFoundError, ConfigError, BackboneError, DatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except AdapterStateError as err:
        print(
            f"error: the run's adapters do not load ({err}); an encrypted run's adapters are "
            "decrypted at the site first: fedmedvit decrypt RUN_DIR --secret-context FILE",
            file=sys.stderr,
        )
        return 2
    print(index)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
