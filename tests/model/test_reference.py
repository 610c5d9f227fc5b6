"""The head-input reference: PCA whitening fit on unlabeled images, shipped in the backbone file."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from core.config import RunConfig
from core.federation.rounds import build_backbone
from core.model.checkpoint import BackboneError, load_backbone, save_backbone
from core.model.reference import ReferenceError, fit_reference, pooled_features
from core.model.sizes import ViTConfig
from core.model.vit import ClassifierHead, create_vit


def correlated(n: int, width: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(width, width)) * rng.uniform(0.01, 3.0, size=width)
    return torch.tensor(rng.normal(size=(n, width)) @ mixing + rng.normal(size=width) * 5)


def test_projected_reference_features_are_white_and_span_numpy_principal_directions():
    features = correlated(300, 12)
    reference = fit_reference(features.float(), components=5)
    assert (reference.features, reference.components) == (12, 5)
    projected = ((features.float() - reference.shift) @ reference.projection).double()
    torch.testing.assert_close(
        projected.mean(0), torch.zeros(5, dtype=torch.float64), atol=1e-4, rtol=0
    )
    covariance = projected.T @ projected / len(projected)  # population covariance
    torch.testing.assert_close(covariance, torch.eye(5, dtype=torch.float64), atol=1e-4, rtol=0)
    # Oracle: numpy's eigen-decomposition of the covariance; same directions up to sign.
    centred = features.numpy() - features.numpy().mean(0)
    values, vectors = np.linalg.eigh(centred.T @ centred / len(centred))
    top = vectors[:, ::-1][:, :5]
    ours = reference.projection.double().numpy() * np.sqrt(values[::-1][:5])
    np.testing.assert_allclose(np.abs(ours), np.abs(top), atol=2e-4)
    # The sign rule: the largest entry of each direction is positive.
    largest = np.take_along_axis(ours, np.abs(ours).argmax(0)[None], 0)
    assert (largest > 0).all()


def test_components_are_capped_by_images_and_width_and_degenerate_data_is_refused():
    assert fit_reference(correlated(8, 12).float(), components=64).components == 7
    assert fit_reference(correlated(100, 6).float(), components=64).components == 6
    with pytest.raises(ReferenceError, match="at least 2 images"):
        fit_reference(torch.randn(1, 6))
    rank_two = torch.randn(50, 2) @ torch.randn(2, 6)
    with pytest.raises(ReferenceError, match="fewer than 4 directions"):
        fit_reference(rank_two, components=4)


def test_reference_head_reads_the_whitened_components_and_sends_only_its_linear_layer():
    reference = fit_reference(correlated(60, 20).float(), components=8)
    head = ClassifierHead(20, 3, norm="reference", reference=reference)
    x = torch.randn(4, 20)
    expected = (x - reference.shift) @ reference.projection @ head.fc.weight.T + head.fc.bias
    torch.testing.assert_close(head(x), expected)
    assert sorted(head.state_dict()) == ["fc.bias", "fc.weight"]  # buffers never travel
    assert [name for name, _ in head.named_parameters()] == ["fc.weight", "fc.bias"]
    with pytest.raises(ValueError, match="needs the backbone's reference for 20"):
        ClassifierHead(20, 3, norm="reference")
    with pytest.raises(ValueError, match="found 20 features"):
        ClassifierHead(24, 3, norm="reference", reference=reference)


def test_a_personal_read_out_adds_its_scores_and_starts_at_zero():
    """head-sharing "shared+local": logits = fc(z) + personal(z) on the same whitened input z;
    at the start the personal part is zero, so the head scores as the shared one alone."""
    reference = fit_reference(correlated(60, 20).float(), components=8)
    head = ClassifierHead(20, 3, norm="reference", reference=reference, personal=True)
    plain = ClassifierHead(20, 3, norm="reference", reference=reference)
    plain.load_state_dict({k: v for k, v in head.state_dict().items() if k.startswith("fc.")})
    x = torch.randn(4, 20)
    torch.testing.assert_close(head(x), plain(x), rtol=0, atol=0)
    assert sorted(head.state_dict()) == ["fc.bias", "fc.weight", "personal.bias", "personal.weight"]
    with torch.no_grad():
        head.personal.weight.normal_()
        head.personal.bias.normal_()
    z = (x - reference.shift) @ reference.projection
    expected = z @ head.fc.weight.T + head.fc.bias + z @ head.personal.weight.T
    torch.testing.assert_close(head(x), expected + head.personal.bias)
    layer = ClassifierHead(20, 3, norm="layer", personal=True)  # other conditioning, same sum
    with torch.no_grad():
        layer.personal.weight.normal_()
    normed = torch.nn.functional.layer_norm(x, (20,))
    expected = normed @ (layer.fc.weight + layer.personal.weight).T + layer.fc.bias
    torch.testing.assert_close(layer(x), expected)


def test_backbone_file_carries_the_reference_under_its_fingerprint(tmp_path):
    torch.manual_seed(0)
    model = create_vit("micro")
    model.references = {"stats": fit_reference(torch.randn(30, 384), components=10)}
    path = tmp_path / "backbone.safetensors"
    digest = save_backbone(model, path)
    loaded, loaded_digest = load_backbone(path, num_classes=2)
    assert loaded_digest == digest
    assert torch.equal(loaded.references["stats"].projection, model.references["stats"].projection)
    # A backbone without the reference is another backbone: the fingerprint covers it.
    bare = create_vit("micro")
    bare.load_state_dict(model.state_dict())
    assert save_backbone(bare, tmp_path / "bare.safetensors") != digest
    # A tampered reference is caught like tampered weights.
    tensors = load_file(str(path))
    tensors["reference.stats.shift"][0] += 1.0
    metadata = {"format": "fedmedvit-backbone-v2", "fingerprint": digest}
    metadata["config"] = __import__("json").dumps(model.config.to_dict())
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(BackboneError, match="is corrupt"):
        load_backbone(path)


def test_run_config_auto_uses_the_reference_when_the_backbone_has_one(tmp_path):
    torch.manual_seed(0)
    model = create_vit("micro")
    batches = [(torch.randn(6, 1, 1, 32, 32), torch.tensor([[1e4, 1.0, 1.0]] * 6))] * 2
    features = pooled_features(model, batches, "stats")  # (12, 384)
    assert features.shape == (12, 384)
    model.references = {"stats": fit_reference(features + torch.randn(12, 384) * 0.1)}
    path = tmp_path / "b.safetensors"
    save_backbone(model, path)
    with_reference, _ = build_backbone(RunConfig.from_flat({"backbone": str(path)}))
    assert with_reference.config.head_norm == "reference"
    assert with_reference.head.fc.in_features == 11
    seeded, _ = build_backbone(RunConfig.from_flat({}))  # no file, no reference
    assert seeded.config.head_norm == "layer"
    assert seeded.head.fc.in_features == 384
    with pytest.raises(ValueError, match="needs the backbone's reference"):
        build_backbone(RunConfig.from_flat({"head-norm": "reference"}))


def test_checkpoints_written_before_head_norm_modes_still_load():
    old = {"embed_dim": 96, "depth": 1, "num_heads": 3, "head_norm": True}
    assert ViTConfig.from_dict(old).head_norm == "layer"
    assert ViTConfig.from_dict(old | {"head_norm": False}).head_norm == "none"
