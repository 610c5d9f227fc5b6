"""Which site a node is, and where it keeps its own files: the secret HE context is found from
the node (node config, else the state folder), never from the shared run config."""

import pytest

from core.config import ConfigError, RunConfig
from core.federation.sites import resolve_site
from core.he.keys import SECRET_CONTEXT_FILE


def test_a_supernode_names_its_secret_context_in_its_node_config(tmp_path):
    mounted = tmp_path / "he" / "site_secret.ctx"  # e.g. a read-only mount beside the state
    mounted.parent.mkdir()
    mounted.write_bytes(b"k")
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / SECRET_CONTEXT_FILE).write_bytes(b"other")
    node = {
        "data-dir": str(tmp_path / "data"),
        "state-dir": str(tmp_path / "state"),
        "he-secret-context": str(mounted),
    }
    assert resolve_site(RunConfig(), node).secret_context() == mounted  # the node config wins


def test_without_the_key_the_site_looks_in_its_state_folder(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / SECRET_CONTEXT_FILE).write_bytes(b"k")
    node = {"data-dir": str(tmp_path / "data"), "state-dir": str(state)}
    assert resolve_site(RunConfig(), node).secret_context() == state / SECRET_CONTEXT_FILE


def test_a_simulated_site_finds_it_in_state_root_under_its_name(tmp_path):
    (tmp_path / "data" / "site-a").mkdir(parents=True)
    (tmp_path / "data" / "site-a" / "dataset.json").write_text("{}")
    copy = tmp_path / "state" / "site-a" / SECRET_CONTEXT_FILE
    copy.parent.mkdir(parents=True)
    copy.write_bytes(b"k")
    cfg = RunConfig.from_flat(
        {"data-root": str(tmp_path / "data"), "state-root": str(tmp_path / "state")}
    )
    site = resolve_site(cfg, {"partition-id": 0, "num-partitions": 1})
    assert site.name == "site-a" and site.secret_context() == copy


@pytest.mark.parametrize("state", [True, False], ids=["empty-state-folder", "no-state-folder"])
def test_a_site_without_a_secret_context_is_told_both_places(tmp_path, state):
    node = {"data-dir": str(tmp_path / "data")} | (
        {"state-dir": str(tmp_path / "state")} if state else {}
    )
    with pytest.raises(ConfigError) as caught:
        resolve_site(RunConfig(), node).secret_context()
    message = str(caught.value)
    assert "node config 'he-secret-context=PATH'" in message
    assert f"{SECRET_CONTEXT_FILE} the coordinator provisioned" in message
    assert "state folder" in message
