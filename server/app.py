"""The coordinator's Flower ServerApp: adapter-only federated averaging with per-round outputs.

Builds the initial adapters from the shared backbone, runs the rounds (resuming from the run
folder's last checkpoint when ``resume`` is set), and writes metrics, checkpoints, the privacy
report and the final adapters into ``out-dir``.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TypedDict

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from torch import Tensor

from core.config import RunConfig
from core.federation.protocol import LOCAL_HEAD
from core.federation.rounds import initial_adapters, recorded_before_config_fingerprints
from core.federation.sites import list_sites
from core.privacy.report import INITIAL_HEAD
from server.run_files import RunFolder
from server.strategy import AdapterFedAvg, RoundLog

app = ServerApp()
log = logging.getLogger(f"flwr.{__name__}")  # under Flower's logger: its handler prints INFO
# Fault injection for crash-recovery tests: the process exits right after this round's checkpoint.
FAULT_EXIT_AFTER_ROUND = "FEDMEDVIT_FAULT_EXIT_AFTER_ROUND"


def resolve_out_dir(cfg: RunConfig) -> Path:
    if cfg.out_dir:
        return Path(cfg.out_dir)
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


def run_rounds(
    strategy: AdapterFedAvg,
    grid: Grid,
    folder: RunFolder,
    *,
    arrays: ArrayRecord,
    first_round: int,
    num_rounds: int,
    timeout: float,
) -> ArrayRecord:
    """Flower's ``Strategy.start`` loop, plus a checkpoint after every round, a first round
    other than 1 (resume), and the round's wall time in metrics.json (``RoundLog.seconds``)."""
    for server_round in range(first_round, num_rounds + 1):
        log.info("[ROUND %d/%d]", server_round, num_rounds)
        started = time.perf_counter()
        replies = grid.send_and_receive(
            strategy.configure_train(server_round, arrays, ConfigRecord(), grid), timeout=timeout
        )
        aggregated, _ = strategy.aggregate_train(server_round, replies)
        if aggregated is not None:
            arrays = aggregated
        trained = time.perf_counter()
        arrays, metrics = evaluate_and_settle(strategy, grid, server_round, arrays, timeout)
        evaluated = time.perf_counter()
        seconds = strategy.round_log(server_round).seconds
        seconds |= {
            "train": trained - started,
            "evaluate": evaluated - trained,
            "round": evaluated - started,
        }
        folder.save_round(server_round, arrays.to_torch_state_dict(), strategy)
        log.info("round %d evaluation: %s", server_round, dict(metrics or {}))
        for line in site_progress(strategy.round_log(server_round)):
            log.info("%s", line)
        if os.environ.get(FAULT_EXIT_AFTER_ROUND) == str(server_round):
            log.error("fault injection: the ServerApp process dies after round %d", server_round)
            os._exit(70)
    return arrays


def site_progress(record: RoundLog) -> list[str]:
    """One line per site: the AUC and the rates at the site's own calibrated threshold that
    its evaluate reply reported (core.federation.rounds.evaluate_round), the site's epsilon
    so far, and its status when it did not train. A site that evaluated with the initial
    global head (head-sharing "local", no head of its own yet) is marked so: those numbers
    are not its model's."""
    lines = []
    for site in sorted(record.sites.keys() | record.status.keys()):
        values = record.sites.get(site, {})
        parts = [f"round {record.round} site {site}:"]
        if values.get(LOCAL_HEAD) == 0.0:
            parts.append(f"[{INITIAL_HEAD}]")
        for key, label, spec in (
            ("auc", "AUC", ".3f"),
            ("balanced-accuracy", "balanced accuracy", ".3f"),
            ("sensitivity", "sensitivity", ".3f"),
            ("specificity", "specificity", ".3f"),
            ("epsilon", "epsilon", ".2f"),
        ):
            value = values.get(key)
            if value is not None:
                parts.append(f"{label} {value:{spec}}")
        status = record.status.get(site)
        if status and status != "trained":
            parts.append(f"({status})")
        lines.append(" ".join(parts))
    return lines


def evaluate_and_settle(
    strategy: AdapterFedAvg, grid: Grid, server_round: int, arrays: ArrayRecord, timeout: float
) -> tuple[ArrayRecord, MetricRecord | None]:
    """Evaluate the new global; while the sites find it unusable (HE: an upload they name
    as bad, or a sum that does not decrypt), take the strategy's revision and evaluate again.
    Each revision drops an upload or restores the previous global, so this ends."""
    while True:
        replies = grid.send_and_receive(
            strategy.configure_evaluate(server_round, arrays, ConfigRecord(), grid),
            timeout=timeout,
        )
        metrics = strategy.aggregate_evaluate(server_round, replies)
        revised = strategy.revise(server_round)
        if revised is None:
            return arrays, metrics
        arrays = revised


class _StrategyArgs(TypedDict):
    """What both strategies are built with (the rest of it Flower FedAvg's own arguments)."""

    backbone_fingerprint: str
    reference: dict[str, Tensor]
    fraction_train: float
    fraction_evaluate: float
    min_train_nodes: int
    min_evaluate_nodes: int
    min_available_nodes: int
    max_examples: int


def build_strategy(cfg: RunConfig, adapters: dict[str, Tensor], fingerprint: str) -> AdapterFedAvg:
    common = _StrategyArgs(
        backbone_fingerprint=fingerprint,
        reference=adapters,
        fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
        min_train_nodes=cfg.min_train_nodes,
        min_evaluate_nodes=cfg.min_train_nodes,
        min_available_nodes=cfg.min_available_nodes,
        max_examples=cfg.max_examples_per_site,
    )
    if not cfg.he:
        return AdapterFedAvg(**common)
    from core.he.ckks import load_public_context
    from server.he_strategy import EncryptedAdapterFedAvg

    log.info(
        "HE mode: the server holds only the public CKKS context and never sees an update or the "
        "global adapters in the clear; central evaluation of plaintext weights is impossible"
    )
    return EncryptedAdapterFedAvg(
        public_context=load_public_context(cfg.he_public_context), **common
    )


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = RunConfig.from_flat(context.run_config)
    if cfg.data_root and Path(cfg.data_root).is_dir():  # simulation: the sites are known here
        cfg.check_federation(len(list_sites(cfg)))
    folder = RunFolder(resolve_out_dir(cfg))
    adapters, fingerprint = initial_adapters(cfg)
    strategy = build_strategy(cfg, adapters, fingerprint)
    first_round = 1
    if cfg.resume and (latest := folder.load_latest()) is not None:
        done, saved, state = latest
        recorded = state["backbone_fingerprint"]
        if recorded != fingerprint and not recorded_before_config_fingerprints(cfg, recorded):
            raise RuntimeError(
                f"cannot resume {folder.root}: it was run with backbone "
                f"{state['backbone_fingerprint'][:12]}..., this config gives {fingerprint[:12]}..."
            )
        problem = folder.resume_problem(cfg, saved, adapters)
        if problem:
            raise RuntimeError(problem)
        adapters = saved
        folder.restore_strategy(strategy, state)
        first_round = done + 1
        log.info("resuming %s after round %d", folder.root, done)
    folder.write_config(cfg)  # after the resume checks, which read the folder's record
    final = run_rounds(
        strategy,
        grid,
        folder,
        arrays=ArrayRecord(adapters),
        first_round=first_round,
        num_rounds=cfg.num_server_rounds,
        timeout=cfg.round_timeout,
    )
    folder.write_reports(strategy)
    if cfg.he:
        log.info(
            "run folder: %s; the final global adapters are encrypted (checkpoints/); only the "
            "sites can decrypt them (python -m client.decrypt RUN_DIR --secret-context FILE)",
            folder.root,
        )
        return
    path = folder.save_final_adapters(cfg, final.to_torch_state_dict())
    log.info("run folder: %s (final adapters in %s)", folder.root, path)
