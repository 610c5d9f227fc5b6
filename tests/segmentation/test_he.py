"""A segmentation update (LoRA B + decoder + head) goes through CKKS like a classifier's: the
encrypted sum decrypts to the plaintext FedAvg and loads strictly into the model."""

import torch

from core.adapters.lora import adapter_state, add_lora, load_adapter_state
from core.adapters.settings import LoraSettings
from core.he import ckks
from core.model.segmentation import SEGMENTATION_TRAINABLE, create_segmenter
from core.model.vit import create_vit


def test_encrypted_segmentation_updates_average_like_plaintext():
    torch.manual_seed(0)
    model = add_lora(
        create_segmenter(create_vit("micro", depth=2), 2, features=4),
        LoraSettings(rank=2),
        trainable=SEGMENTATION_TRAINABLE,
    )
    reference = adapter_state(model)
    g = torch.Generator().manual_seed(1)
    states = [
        {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in reference.items()}
        for _ in range(2)
    ]
    counts = [120, 40]
    secret = ckks.new_secret_context()
    public = secret.public_context()
    updates = [ckks.encrypt_update(s, c, secret) for s, c in zip(states, counts, strict=True)]
    summed = ckks.sum_encrypted([u.ciphertexts for u in updates], public)
    got = ckks.decrypt_average(summed, sum(counts), updates[0].layout, secret)
    for key in reference:
        want = (states[0][key] * 120 + states[1][key] * 40) / 160
        torch.testing.assert_close(got[key], want, rtol=1e-5, atol=1e-6)
    load_adapter_state(model, got)  # exact keys and shapes: decoder and head included
