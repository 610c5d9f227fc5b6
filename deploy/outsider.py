"""The outsider: holds only ``ca.pem``, its own node key and its own app, and tries both doors.

:func:`outsider_checks` registers a node key and starts an app through the address the
hospitals dial (the Fleet-only proxy must refuse both), then, as if the Control API had been
reached anyway, starts its unsigned app and an app signed with its own key through the
coordinator's Control API: every SuperNode must refuse both and the app, which writes one file
per hospital it runs in, must write none.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from deploy.pki import make_node_key
from deploy.processes import CONNECTION, DeploymentError, Processes, write_cli_config
from deploy.release import keygen, sign
from simulations.flower_cli import BIN, list_runs, list_supernodes

# What a SuperNode started with --trusted-entities logs when it refuses an app: unsigned
# (no signatures at all) or signed by no key it trusts (flwr 1.41 and 1.42, supernode).
FAB_REFUSAL = re.compile(r"The FAB could not be verified|FAB verification failed")
ANSI_CODE = re.compile(r"\x1b\[[0-9;]*m")


@dataclass
class Attempt:
    """One ``flwr`` command the outsider ran: its exit code and output."""

    command: str
    exit_code: int
    output: str

    @property
    def gist(self) -> str:
        """The CLI's error box (or its last line) as one line."""
        boxed = [line.strip("│ ") for line in self.output.splitlines() if line.startswith("│")]
        lines = boxed or self.output.strip().splitlines()[-1:]
        return " ".join(" ".join(lines).split())


@dataclass
class OutsiderOutcome:
    """What an outsider holding only ``ca.pem`` achieved.

    ``register`` and ``run``: ``flwr supernode register`` and ``flwr run`` against the
    address the hospitals dial. ``unsigned_run`` and ``foreign_run``: run ids of the
    outsider's app started through the coordinator's own Control API (as if that door had
    been reached), unsigned and signed with the outsider's key. ``refusals``: per hospital,
    the SuperNode log lines refusing an app. ``loot``: files the outsider's ClientApp wrote
    (it writes one per node it runs on). ``listed``: node ids the SuperLink knows beyond the
    registered hospitals."""

    register: Attempt
    run: Attempt
    unsigned_run: int
    foreign_run: int
    refusals: dict[str, list[str]]
    loot: list[str]
    listed: list[int]

    @property
    def refused(self) -> bool:
        """Both doors held: nothing registered, nothing started through the Fleet address,
        every hospital refused both apps, and the outsider's code ran nowhere."""
        return (
            self.register.exit_code != 0
            and self.run.exit_code != 0
            and all(len(lines) >= 2 for lines in self.refusals.values())
            and not self.loot
            and not self.listed
        )


# --- the outsider: only ca.pem, its own key, its own app -------------------------------------

PROBE_PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "probe"
version = "1.0.0"

[tool.flwr.app]
publisher = "outsider"

[tool.flwr.app.components]
serverapp = "probe:server"
clientapp = "probe:client"

[tool.flwr.app.config]
loot-dir = "{loot}"
"""
PROBE_CODE = """\
import json
import os
from pathlib import Path

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

server = ServerApp()
client = ClientApp()


@server.main()
def main(grid, context):
    nodes = list(grid.get_node_ids())
    ask = [
        Message(RecordDict({"probe": ConfigRecord({"x": 1})}), dst_node_id=n, message_type="train")
        for n in nodes
    ]
    for reply in grid.send_and_receive(ask, timeout=90):
        print("probe reply from", reply.metadata.src_node_id, reply.has_error())


@client.train()
def steal(msg, context):
    loot = Path(context.run_config["loot-dir"])
    loot.mkdir(parents=True, exist_ok=True)
    seen = {k: str(v) for k, v in context.node_config.items()}
    data = context.node_config.get("data-dir", "")
    seen["files"] = sorted(os.listdir(data)) if data and os.path.isdir(data) else []
    (loot / f"node-{context.node_id}.json").write_text(json.dumps(seen))
    return Message(RecordDict(), reply_to=msg)
"""


def write_probe_app(target: Path, loot: Path) -> Path:
    """The outsider's app: its ClientApp writes what it can see in a hospital (node config,
    the names of the data files) to ``loot``, so any execution leaves evidence."""
    target.mkdir(parents=True, exist_ok=True)
    (target / "pyproject.toml").write_text(PROBE_PYPROJECT.format(loot=loot))
    (target / "probe.py").write_text(PROBE_CODE)
    return target


def attempt(env: Mapping[str, str], *args: str, timeout: float = 120) -> Attempt:
    """Run ``flwr ARGS`` and keep its exit code and output (a hang counts as failure)."""
    command = [str(BIN / "flwr"), *args]
    try:
        done = subprocess.run(
            command, env=dict(env), capture_output=True, text=True, timeout=timeout, check=False
        )
        code, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as err:
        code, output = -1, f"timed out after {timeout:.0f} s: {err.output or ''}"
    return Attempt(" ".join(["flwr", *args]), code, ANSI_CODE.sub("", output))


def started_run_id(output: str) -> int:
    match = re.search(r"Successfully started run (\d+)", output)
    if not match:
        raise DeploymentError(f"the outsider's run did not start:\n{output[-2000:]}")
    return int(match[1])


def wait_run_finished(env: Mapping[str, str], run_id: int, timeout: float = 240) -> None:
    """Poll ``flwr list`` until ``run_id`` has finished (any outcome)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = {int(r["run-id"]): r["status"] for r in list_runs(env, CONNECTION)}
        if status.get(run_id, "").startswith("finished"):
            return
        time.sleep(2)
    raise DeploymentError(f"the outsider's run {run_id} did not finish in {timeout:.0f} s")


def outsider_checks(
    out: Path,
    fleet_address: str,
    ca: Path,
    coordinator_env: Mapping[str, str],
    releases: Path,
    processes: Processes,
    node_ids: Mapping[str, int],
) -> OutsiderOutcome:
    """An outsider holding only ``ca.pem`` (plus its own node key and signing key) tries:

    1. ``flwr supernode register`` with its own key and ``flwr run`` of its own app,
       against ``fleet_address`` (the address the hospitals dial): the proxy must refuse.
    2. As if it had reached the Control API anyway: its unsigned app via ``flwr run DIR``,
       and the same app signed with its own key and served by the coordinator's registry
       (as if it had also planted a release there): every SuperNode must refuse both, and
       the app's ClientApp must leave no file in ``loot``.
    """
    home = out / "outsider"
    loot = home / "loot"
    env = write_cli_config(home / "flwr-home", fleet_address, ca)
    public = make_node_key(home / "node.key")
    app = write_probe_app(home / "app", loot)
    register = attempt(env, "supernode", "register", str(public), CONNECTION)
    run = attempt(env, "run", str(app), CONNECTION)
    (home / "attempts.log").write_text(
        "".join(f"$ {a.command}\nexit {a.exit_code}\n{a.output}\n" for a in (register, run))
    )

    unsigned = started_run_id(attempt(coordinator_env, "run", str(app), CONNECTION).output)
    wait_run_finished(coordinator_env, unsigned)
    signing_key = home / "release.key"
    if not signing_key.exists():
        keygen(signing_key)
    planted = sign(app, signing_key, releases)
    foreign_run = attempt(coordinator_env, "run", planted.spec, CONNECTION)
    foreign = started_run_id(foreign_run.output)
    wait_run_finished(coordinator_env, foreign)

    listed = {int(n["node-id"]) for n in list_supernodes(coordinator_env, CONNECTION)}
    return OutsiderOutcome(
        register=register,
        run=run,
        unsigned_run=unsigned,
        foreign_run=foreign,
        refusals={
            name: [
                line.strip()
                for line in processes.log(f"supernode-{name}").splitlines()
                if FAB_REFUSAL.search(line)
            ]
            for name in node_ids
        },
        loot=sorted(p.name for p in loot.glob("*")) if loot.is_dir() else [],
        listed=sorted(listed - set(node_ids.values())),
    )
