"""Backbone checkpoints: safetensors round trip, fingerprint stability and mismatch detection."""

import pytest
import torch

from core.model.checkpoint import (
    BackboneError,
    backbone_state,
    fingerprint,
    load_backbone,
    save_backbone,
)
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
    assert loaded_digest == digest == fingerprint(backbone_state(model))
    loaded.head.load_state_dict(model.head.state_dict())
    x = torch.randn(1, 1, 1, 32, 32)
    torch.testing.assert_close(loaded.eval()(x, (1e4, 1, 1)), model(x, (1e4, 1, 1)))


def test_fingerprint_is_order_independent_and_content_sensitive():
    state = {"a": torch.ones(2), "b": torch.zeros(3)}
    assert fingerprint(state) == fingerprint(dict(reversed(list(state.items()))))
    assert fingerprint(state) != fingerprint({"a": torch.ones(2), "b": torch.zeros(3) + 1e-7})
    assert fingerprint(state) != fingerprint({"a": torch.ones(2).double(), "b": torch.zeros(3)})
    assert fingerprint(state) != fingerprint({"a": torch.ones(1, 2), "b": torch.zeros(3)})


def test_head_does_not_change_the_fingerprint():
    torch.manual_seed(0)
    two = create_vit("micro", num_classes=2)
    torch.manual_seed(0)
    five = create_vit("micro", num_classes=5)
    assert fingerprint(backbone_state(two)) == fingerprint(backbone_state(five))


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
