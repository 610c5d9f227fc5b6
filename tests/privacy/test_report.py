"""Privacy-budget report: files, exact numbers in the tables, the CLI and its errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from core.privacy.ledger import PrivacyLedger
from core.privacy.plan import DPPlan, DPSettings, epsilon_of_history
from core.privacy.report import (
    METRICS_FILE,
    PLOT_FILE,
    PRIVACY_FILE,
    REPORT_FILE,
    ReportInputError,
    choose_metric,
    format_epsilon,
    load_privacy,
    parse_metrics,
    render_report,
    write_metrics_json,
    write_privacy_json,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NOISE, RATE, STEPS = 1.2, 0.1, 10


@pytest.fixture(scope="module")
def ledgers() -> dict[str, PrivacyLedger]:
    """Site A runs out of budget in round 3; site B, with a looser budget, trains throughout."""
    eps_two_rounds = epsilon_of_history([(NOISE, RATE, 2 * STEPS)], "rdp", 1e-5)
    tight = DPSettings(target_epsilon=eps_two_rounds + 0.05, target_delta=1e-5, max_grad_norm=1.0)
    site_a = PrivacyLedger(
        tight, dataset_size=500, plan=DPPlan(NOISE, RATE, STEPS, planned_rounds=2)
    )
    site_b = PrivacyLedger(
        DPSettings(target_epsilon=8.0, target_delta=1e-6, max_grad_norm=0.5), dataset_size=2000
    )
    for server_round in (1, 2, 3):
        decision = site_a.check_budget(NOISE, RATE, STEPS)
        if decision.allowed:
            site_a.record_round(server_round, NOISE, RATE, STEPS)
        else:
            site_a.record_refusal(server_round, decision.reason)
        site_b.record_round(server_round, 0.9, 0.05, 20)
    return {"site-a": site_a, "site|b": site_b}


def _metrics() -> dict:
    return {
        "rounds": [
            {
                "round": server_round,
                "train": {"loss": 1.0 / server_round},
                "evaluate": {"accuracy": 0.5 + 0.1 * server_round, "auc": 0.6, "loss": None},
                "sites": {
                    "site-a": {"accuracy": 0.5 + 0.05 * server_round, "auc": 0.55},
                    "site|b": {"accuracy": 0.6, "auc": 0.65, "epsilon": 1.0},
                },
            }
            for server_round in (1, 2, 3)
        ]
    }


@pytest.fixture
def run_dir(tmp_path, ledgers) -> Path:
    write_privacy_json(tmp_path, ledgers)
    write_metrics_json(tmp_path, _metrics())
    return tmp_path


def test_report_tables_carry_the_exact_epsilons(run_dir, ledgers):
    report = render_report(run_dir)
    assert report == run_dir / REPORT_FILE
    text = report.read_text(encoding="utf-8")
    site_a = ledgers["site-a"]
    first, second, refused = site_a.records
    target = format_epsilon(site_a.settings.target_epsilon)
    trained = "1.2000 | 0.1 | 10 | trained"
    assert f"| 1 | {format_epsilon(first.epsilon)} | {target} | 1.0e-05 | {trained} |" in text
    assert f"| 2 | {format_epsilon(second.epsilon)} | {target} | 1.0e-05 | {trained} |" in text
    assert (
        f"| 3 | {format_epsilon(second.epsilon)} | {target} | 1.0e-05 | — | — | 0 | refused |"
        in text
    )
    assert refused.refused and f"- Round 3: {refused.reason}" in text
    for record in ledgers["site|b"].records:
        assert (
            f"| {record.server_round} | {format_epsilon(record.epsilon)} | 8.000 | 1.0e-06 |"
            in text
        )
    assert "## Site site\\|b" in text  # a pipe in a site name cannot break the table
    assert "Epsilon is cumulative" in text and "Who decides: each site" in text
    assert "**Not covered:**" in text
    assert "| Round | AUC | Accuracy (arg-max) | Loss |" in text
    assert "| 3 | 0.6000 | 0.8000 | — |" in text  # global AUC, accuracy, loss per round


def test_report_shows_each_sites_policy_replays_and_what_left_it(tmp_path):
    """Policy and release list as a site stated them, and a served and a refused replay."""
    from core.config import RunConfig
    from core.federation.policy import SitePolicy, release_manifest

    ledger = PrivacyLedger(
        DPSettings(target_epsilon=8.0, target_delta=1e-5, max_grad_norm=1.0), dataset_size=500
    )
    ledger.record_round(1, NOISE, RATE, STEPS, global_digest="a" * 64)
    ledger.record_replay(1, "a" * 64, "re-sent after a crash")
    ledger.record_refusal(1, ledger.check_round(1, "b" * 64).reason, replay=True)
    policy = SitePolicy(require_dp=True, max_epsilon=8.0, source="policy.toml")
    cfg = RunConfig.from_flat({"he": True, "he-public-context": "p"})
    stated = {"site-a": {"policy": policy.to_dict(), "released": release_manifest(cfg, policy)}}
    write_privacy_json(tmp_path, {"site-a": ledger}, disclosures=stated)
    write_metrics_json(tmp_path, {"rounds": [{"round": 1}]})
    text = render_report(tmp_path).read_text(encoding="utf-8")
    assert "| 1 | " in text and "| replay served (no new cost) |" in text
    assert "| replay refused |" in text and "- Round 1: replay refused: round 1" in text
    assert "Site policy (source: policy.toml):" in text and "| Require DP | yes |" in text
    assert "| Maximum epsilon | 8.0 |" in text
    assert (
        "| adapter update | train | yes | CKKS ciphertexts, DP-SGD; the site's personal head "
        "stays at the site" in text
    )
    assert "| metric num-examples | evaluate | NO |" in text
    assert "metric auc" not in text  # HE default: evaluation metrics stay at the site
    summary = next(line for line in text.splitlines() if line.startswith("| site-a |"))
    assert "| 1 | 1 |" in summary  # one round trained, one refused (the replay)
    site = load_privacy(tmp_path / PRIVACY_FILE)[0]
    assert site.policy["source"] == "policy.toml" and len(site.replays) == 2


def test_plot_is_a_png_image(run_dir):
    from PIL import Image

    render_report(run_dir, metric="auc")
    plot = run_dir / PLOT_FILE
    assert plot.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(plot) as image:
        assert image.format == "PNG"
        assert image.width > 0 and image.height > 0


def test_privacy_json_holds_per_site_settings_and_reloads(run_dir, ledgers):
    data = json.loads((run_dir / PRIVACY_FILE).read_text())
    site_a = data["sites"]["site-a"]
    assert site_a["settings"]["accountant"] == "rdp"
    assert site_a["dataset_size"] == 500
    assert site_a["epsilon_spent"] == ledgers["site-a"].records[-1].epsilon
    assert site_a["total_steps"] == 20
    assert [r["refused"] for r in site_a["rounds"]] == [False, False, True]
    budgets = {site.name: site for site in load_privacy(run_dir / PRIVACY_FILE)}
    assert budgets["site-a"].rounds == ledgers["site-a"].records
    assert budgets["site|b"].settings == ledgers["site|b"].settings


def test_cli_renders_and_prints_the_report_path(run_dir):
    result = subprocess.run(
        [sys.executable, "-m", "core.privacy.report", str(run_dir)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(run_dir / REPORT_FILE)
    assert (run_dir / PLOT_FILE).stat().st_size > 0


def test_cli_names_the_malformed_file(run_dir):
    (run_dir / METRICS_FILE).write_text('{"rounds": [')
    result = subprocess.run(
        [sys.executable, "-m", "core.privacy.report", str(run_dir)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert f"{run_dir / METRICS_FILE}: not valid JSON" in result.stderr


def test_missing_file_and_missing_field_are_named(run_dir):
    (run_dir / METRICS_FILE).unlink()
    with pytest.raises(ReportInputError, match=r"metrics\.json: file not found"):
        render_report(run_dir)

    data = json.loads((run_dir / PRIVACY_FILE).read_text())
    del data["sites"]["site-a"]["settings"]["target_delta"]
    (run_dir / PRIVACY_FILE).write_text(json.dumps(data))
    with pytest.raises(ReportInputError) as excinfo:
        load_privacy(run_dir / PRIVACY_FILE)
    message = str(excinfo.value)
    assert str(run_dir / PRIVACY_FILE) in message
    assert "sites.site-a.settings.target_delta: missing field" in message


@pytest.mark.parametrize(
    ("document", "fragment"),
    [
        ({}, "metrics.json: rounds: missing field"),
        ({"rounds": {}}, "metrics.json: rounds: expected a list"),
        ({"rounds": [{"round": 0}]}, "rounds[0].round: expected an integer >= 1, got 0"),
        (
            {"rounds": [{"round": 1, "evaluate": {"accuracy": [0.8]}}]},
            "rounds[0].evaluate.accuracy: expected a number, null or a string label, got [0.8]",
        ),
        (
            {"rounds": [{"round": 1, "sites": {"a": {"auc": True}}}]},
            "rounds[0].sites.a.auc: expected a number, null or a string label, got True",
        ),
        ({"rounds": [{"round": 1, "sites": []}]}, "rounds[0].sites: expected an object, got []"),
    ],
)
def test_metrics_schema_errors_name_the_field(document, fragment):
    with pytest.raises(ReportInputError) as excinfo:
        parse_metrics(document)
    assert fragment in str(excinfo.value)


def test_write_metrics_json_refuses_a_bad_document(tmp_path):
    with pytest.raises(ReportInputError, match="rounds"):
        write_metrics_json(tmp_path, {"round": []})
    assert not (tmp_path / METRICS_FILE).exists()


def test_metrics_labels_events_and_nan_are_accepted(tmp_path):
    """What a server naturally logs: site status strings, events, NaN for "no sites"."""
    document = {
        "rounds": [
            {
                "round": 1,
                "evaluate": {"accuracy": math.nan, "auc": 0.7},
                "sites": {"a": {"status": "refused", "epsilon": 1.5}},
                "events": [{"site": "a", "kind": "refused", "reason": "budget"}],
            }
        ]
    }
    path = write_metrics_json(tmp_path, document)
    assert json.loads(path.read_text())["rounds"][0]["evaluate"]["accuracy"] is None
    (row,) = parse_metrics(json.loads(path.read_text()))
    assert row.evaluate == {"accuracy": None, "auc": 0.7}
    assert row.sites == {"a": {"epsilon": 1.5}}


def test_metric_panel_prefers_auc_then_balanced_then_plain_accuracy():
    only_auc = parse_metrics({"rounds": [{"round": 1, "sites": {"a": {"auc": 0.7}}}]})
    assert choose_metric(only_auc) == "auc"
    no_auc = {"accuracy": 0.7, "balanced-accuracy": 0.6}
    assert choose_metric(parse_metrics({"rounds": [{"round": 1, "evaluate": no_auc}]})) == (
        "balanced-accuracy"
    )
    only_accuracy = parse_metrics({"rounds": [{"round": 1, "evaluate": {"accuracy": 0.7}}]})
    assert choose_metric(only_accuracy) == "accuracy"
    assert choose_metric(parse_metrics(_metrics())) == "auc"


def test_report_names_the_run_and_labels_threshold_metrics(tmp_path, ledgers):
    """A DPO holding report.md alone can tell which run and backbone it is about, and which
    rates are at the site's own threshold and which are the shared head's arg-max."""
    write_privacy_json(tmp_path, ledgers)
    metrics = _metrics()
    for entry in metrics["rounds"]:
        entry["evaluate"]["balanced-accuracy"] = 0.7
    fingerprint = "ab" * 32
    run = {"run": "runs/x", "backbone_fingerprint": fingerprint, "num_server_rounds": 3}
    write_metrics_json(tmp_path, metrics | {"run": run})
    text = (render_report(tmp_path)).read_text()
    assert f"| Backbone fingerprint (SHA-256) | {fingerprint} |" in text
    assert "| Rounds planned | 3 |" in text
    assert "Balanced accuracy (site threshold)" in text and "Accuracy (arg-max)" in text
    with pytest.raises(ReportInputError, match="run: expected an object"):
        write_metrics_json(tmp_path, metrics | {"run": {"run": ["not", "a", "string"]}})


def test_a_site_that_refused_without_a_ledger_is_listed(tmp_path, ledgers):
    """A site whose policy refused every round sends no ledger; the DPO still sees it, with
    the reason it gave, and site-supplied text cannot break the table."""
    write_privacy_json(tmp_path, ledgers)
    metrics = _metrics()
    for entry in metrics["rounds"]:
        entry["status"] = {"site-a": "trained", "site|b": "trained", "site-c": "refused"}
        entry["events"] = [
            {"site": "site-c", "kind": "refused", "reason": "policy: he | required"},
        ]
    write_metrics_json(tmp_path, metrics)
    text = render_report(tmp_path).read_text()
    assert "## Sites without a privacy ledger" in text
    for server_round in (1, 2, 3):
        row = f"| {server_round} | site-c | refused | refused: policy: he \\| required |"
        assert row in text
    assert "| 1 | site-a |" not in text  # sites with a ledger have their own section
    with pytest.raises(ReportInputError, match="status: expected an object of strings"):
        write_metrics_json(tmp_path, {"rounds": [{"round": 1, "status": {"x": 1}}]})


@pytest.mark.parametrize(
    ("values", "line"),
    [
        (
            {},
            "Classifier heads: **shared + local**. Each site's trained shared read-out left the "
            "site with its adapter update and was averaged over the sites (under DP, covered "
            "like the adapters); each site also trained and kept a personal read-out",
        ),
        (
            {"head-sharing": "local"},
            "Classifier heads: **local**. Each site trained and kept its own head; it never left",
        ),
        ({"head-sharing": "shared"}, "Classifier heads: **shared**. Each site's trained head left"),
        ({"task": "segmentation"}, "Decoders: **local**. Each site trained and kept its own"),
        (
            {"task": "segmentation", "head-sharing": "shared"},
            "Decoders: **shared**. Each site's trained decoder and segmentation head left",
        ),
    ],
)
def test_the_summary_says_whether_the_heads_left_the_sites(tmp_path, ledgers, values, line):
    """The run folder as the server writes it: one line under the summary, from the run's
    config as it ran (a segmentation model's head is its decoder and segmentation head)."""
    from core.config import RunConfig
    from server.run_files import RunFolder
    from server.strategy import AdapterFedAvg

    folder = RunFolder(tmp_path)
    folder.write_config(RunConfig.from_flat(values))
    strategy = AdapterFedAvg(backbone_fingerprint="ab" * 32, reference={})
    strategy.ledgers = {name: ledger.to_dict() for name, ledger in ledgers.items()}
    folder.write_reports(strategy)
    text = (tmp_path / REPORT_FILE).read_text()
    summary = text.split("## Summary", 1)[1].split("| Site |", 1)[0]
    assert line in summary
    assert "head_sharing" not in text  # the line, not a raw run-table row
