"""Backbone checkpoints: safetensors round trip, fingerprint stability and mismatch detection."""

import dataclasses
import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from core.model.checkpoint import (
    BackboneError,
    backbone_state,
    fingerprint,
    load_backbone,
    save_backbone,
)
from core.model.sizes import MODEL_SIZES
from core.model.vit import create_vit


@pytest.mark.parametrize(
    "overrides",
    [{}, {"mlp": "swiglu", "mlp_norm": True, "rope_style": "pumit", "norm_eps": 1e-5}],
    ids=["vit", "pumit-style"],
)
def test_round_trip_preserves_outputs_and_fingerprint(tmp_path, overrides):
    torch.manual_seed(0)
    model = create_vit("micro", num_classes=2, **overrides).eval()
    digest = save_backbone(model, tmp_path / "b.safetensors")
    loaded, loaded_digest = load_backbone(tmp_path / "b.safetensors", num_classes=2)
    assert loaded.config == model.config
    assert loaded_digest == digest == fingerprint(backbone_state(model), model.config)
    loaded.head.load_state_dict(model.head.state_dict())
    x = torch.randn(1, 1, 1, 32, 32)
    torch.testing.assert_close(loaded.eval()(x, (1e4, 1, 1)), model(x, (1e4, 1, 1)))


def test_fingerprint_is_order_independent_and_content_sensitive():
    config = MODEL_SIZES["micro"]
    state = {"a": torch.ones(2), "b": torch.zeros(3)}

    def digest(tensors):
        return fingerprint(tensors, config)

    assert digest(state) == digest(dict(reversed(list(state.items()))))
    assert digest(state) != digest({"a": torch.ones(2), "b": torch.zeros(3) + 1e-7})
    assert digest(state) != digest({"a": torch.ones(2).double(), "b": torch.zeros(3)})
    assert digest(state) != digest({"a": torch.ones(1, 2), "b": torch.zeros(3)})


@pytest.mark.parametrize(
    "change", [{"num_heads": 6}, {"rope": False}, {"norm_eps": 1e-5}, {"rope_base": 10.0}]
)
def test_same_tensors_under_another_architecture_are_another_backbone(tmp_path, change):
    """The same tensors compute another function under another config (heads, RoPE, epsilon),
    so the federation must not take them for its backbone."""
    torch.manual_seed(0)
    model = create_vit("micro")
    path = tmp_path / "b.safetensors"
    digest = save_backbone(model, path)
    other = dataclasses.replace(model.config, **change)
    assert fingerprint(backbone_state(model), other) != digest
    # A file whose config was edited but kept its recorded fingerprint is caught as corrupt...
    tensors = load_file(str(path))
    edited = {"format": "fedmedvit-backbone-v2", "fingerprint": digest}
    save_file(tensors, str(path), metadata=edited | {"config": json.dumps(other.to_dict())})
    with pytest.raises(BackboneError, match="is corrupt"):
        load_backbone(path)
    # ... and one written consistently under the other config is not the federation's.
    rewritten = {"format": "fedmedvit-backbone-v2", "fingerprint": fingerprint(tensors, other)}
    save_file(tensors, str(path), metadata=rewritten | {"config": json.dumps(other.to_dict())})
    with pytest.raises(BackboneError, match="federation uses"):
        load_backbone(path, expected_fingerprint=digest)


def test_first_format_files_are_read_with_the_current_fingerprint(tmp_path):
    """A v1 file recorded sha256 over the tensors alone; it still loads, is checked against
    that digest, and is the same backbone as the current format's file of the same model."""
    torch.manual_seed(0)
    model = create_vit("micro")
    digest = save_backbone(model, tmp_path / "v2.safetensors")
    tensors = load_file(str(tmp_path / "v2.safetensors"))
    tensors_only = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].contiguous()
        tensors_only.update(key.encode())
        tensors_only.update(str(tensor.dtype).encode())
        tensors_only.update(str(tuple(tensor.shape)).encode())
        tensors_only.update(tensor.view(torch.uint8).numpy().tobytes())
    v1 = {"format": "fedmedvit-backbone-v1", "fingerprint": tensors_only.hexdigest()}
    v1["config"] = json.dumps(model.config.to_dict())
    save_file(tensors, str(tmp_path / "v1.safetensors"), metadata=v1)
    _, loaded_digest = load_backbone(tmp_path / "v1.safetensors", expected_fingerprint=digest)
    assert loaded_digest == digest
    key = sorted(tensors)[-1]
    tensors[key] = tensors[key] + 1.0
    save_file(tensors, str(tmp_path / "v1.safetensors"), metadata=v1)
    with pytest.raises(BackboneError, match="is corrupt"):
        load_backbone(tmp_path / "v1.safetensors")


def test_head_does_not_change_the_fingerprint():
    torch.manual_seed(0)
    two = create_vit("micro", num_classes=2)
    torch.manual_seed(0)
    five = create_vit("micro", num_classes=5)
    assert fingerprint(backbone_state(two), two.config) == fingerprint(
        backbone_state(five), five.config
    )


def test_mismatch_and_corruption_are_refused(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "b.safetensors"
    save_backbone(create_vit("micro"), path)
    with pytest.raises(BackboneError, match="federation uses"):
        load_backbone(path, expected_fingerprint="0" * 64)
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0xFF  # flip bits in the last tensor
    path.write_bytes(bytes(raw))
    with pytest.raises(BackboneError, match="corrupt"):
        load_backbone(path)
    with pytest.raises(BackboneError, match="does not exist"):
        load_backbone(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneError, match="not a readable"):
        load_backbone(tmp_path / "junk.safetensors")
