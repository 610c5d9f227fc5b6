"""``benchmarks.start_cost``: a fresh process handles a real train and a real evaluate message
through the ClientApp (all mods, DP on, a NIfTI phantom site) and loads only what they use."""

from __future__ import annotations

from pathlib import Path

from benchmarks.start_cost import importtime, prepare, run_child, table

ROOT = Path(__file__).resolve().parents[2]
NOT_NEEDED = {"tenseal", "core.he", "monai", "matplotlib", "sklearn"}
READERS = {"nibabel", "pydicom"}  # nibabel imports pydicom itself when it is installed


def test_a_plaintext_round_loads_only_the_libraries_it_uses(tmp_path):
    inputs = prepare(tmp_path)
    train = run_child(ROOT, "train", inputs)
    assert train["status"] == "trained"
    state = tmp_path / "state"
    evaluate = run_child(ROOT, "evaluate", inputs, state)
    warm = run_child(ROOT, "evaluate", inputs, state)  # a later round: items from the cache
    for result in (train, evaluate, warm):
        assert not NOT_NEEDED & set(result["loaded"]), result["loaded"]
        assert {"torch", "peft", "opacus"} <= set(result["loaded"])  # the model, DP
        assert 0 < result["import_s"] < result["process_s"] <= result["wall_s"]
        assert result["handle_s"] < result["process_s"]
    for result in (train, evaluate):  # a NIfTI site read without its cache
        assert set(result["loaded"]) >= READERS
    assert not READERS & set(warm["loaded"]), warm["loaded"]
    imports = importtime(ROOT)
    assert 0 < imports["client_app_s"] < imports["wall_s"]
    assert "torch" in imports["top_packages_s"]
    entry = {
        "import_s": {"min": 1.0, "median": 1.0, "n": 1},
        "build_cold_s": {"min": 0.1, "median": 0.1, "n": 1},
        "build_warm_s": {"min": 0.1, "median": 0.1, "n": 1},
        **{
            kind: {
                "process_s": {"min": r["process_s"], "median": r["process_s"], "n": 1},
                "handle_s": {"min": r["handle_s"], "median": r["handle_s"], "n": 1},
                "loaded": r["loaded"],
            }
            for kind, r in (("train", train), ("evaluate", evaluate), ("evaluate-warm", warm))
        },
    }
    assert "evaluate message" in table({"current": entry})
