"""What a site does: weight, pack and encrypt its update; decrypt and check the server's sum.

A site multiplies its update by its example count in plaintext (so the scheme never multiplies
a ciphertext: no multiplicative depth, no rescaling, no relinearisation or Galois keys), packs
it (:mod:`core.he.packing`) and encrypts it with the secret key, seeded. Slot 0 of every
ciphertext encrypts the site's example count, so after summation it must decrypt to the
total the server reports: a ciphertext made with a foreign key turns the whole ciphertext into
noise of size ~q, so the check fails with overwhelming probability, and it also fails when the
server summed other sites than the count it reports.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from core.he.context import CkksContext
from core.he.envelope import (
    KIND_AGGREGATE,
    KIND_SITE_UPDATE,
    load_ciphertext,
    open_envelope,
    seal_envelope,
)
from core.he.errors import CapacityError, IntegrityError, LayoutError, SecretKeyRequiredError
from core.he.packing import CkksLayout, flatten_state, make_layout, unflatten_state
from core.he.seal import seal_save, sealapi

# Legit noise on the count slot is ~1e-8; a foreign key makes it ~1e6 or more.
CHECK_SLOT_TOLERANCE = 1e-3


@dataclass(frozen=True)
class EncryptedUpdate:
    """What a site uploads: ciphertexts, its example count and how to unpack the sum."""

    ciphertexts: list[bytes]
    num_examples: int
    layout: CkksLayout

    @property
    def nbytes(self) -> int:
        return sum(len(c) for c in self.ciphertexts)


def check_count(value: object, name: str) -> int:
    """``value`` as an int if it is a positive integer (not a bool), else ValueError."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def encrypt_update(
    state: Mapping[str, torch.Tensor], num_examples: int, secret_ctx: CkksContext
) -> EncryptedUpdate:
    """Weight by ``num_examples`` in plaintext, pack, encrypt (seeded, secret-key).

    Raises:
        SecretKeyRequiredError: ``secret_ctx`` holds no secret key.
        LayoutError: the state is empty or holds non-float tensors.
        CapacityError: ``num_examples * |w|`` could wrap the sum around the modulus.
        ValueError: ``num_examples`` is not a positive int, or the update holds NaN or inf.
    """
    num_examples = check_count(num_examples, "num_examples")
    if secret_ctx.encryptor is None:
        raise SecretKeyRequiredError(
            "encryption needs the sites' secret context (site_secret.ctx); this context holds "
            "no secret key"
        )
    layout = make_layout(state, secret_ctx)
    values = flatten_state(state, layout) * float(num_examples)
    if not np.all(np.isfinite(values)):
        bad = [k for k in layout.keys if not torch.isfinite(state[k]).all()]
        raise ValueError(f"update holds NaN or inf in {bad}: refusing to encrypt it")
    largest = max(float(np.max(np.abs(values))), float(num_examples))
    if largest > secret_ctx.max_abs_per_site:
        raise CapacityError(
            f"num_examples * |w| reaches {largest:.4g}, above the {secret_ctx.max_abs_per_site:.4g}"
            f" one site may encrypt (max_sites={secret_ctx.params.max_sites}, scale "
            f"2^{secret_ctx.params.scale_bits}); the sum could wrap around. Provision with a "
            "smaller scale_bits or max_sites, or check the update for exploding weights"
        )
    sa = sealapi()
    per_ct = layout.values_per_ciphertext
    ciphertexts = []
    for index in range(layout.num_ciphertexts):
        chunk = values[index * per_ct : (index + 1) * per_ct]
        slots = [float(num_examples), *chunk.tolist()]
        plaintext = sa.Plaintext()
        secret_ctx.encoder.encode(slots, secret_ctx.scale, plaintext)
        payload = seal_save(secret_ctx.encryptor.encrypt_symmetric(plaintext))
        ciphertexts.append(
            seal_envelope(payload, secret_ctx, KIND_SITE_UPDATE, index, layout.num_ciphertexts)
        )
    return EncryptedUpdate(ciphertexts=ciphertexts, num_examples=num_examples, layout=layout)


def decrypt_average(
    ciphertexts: Sequence[bytes], total_examples: int, layout: CkksLayout, secret_ctx: CkksContext
) -> dict[str, torch.Tensor]:
    """Decrypt the summed update, check its count slots, divide by the total and unflatten.

    Raises:
        SecretKeyRequiredError: ``secret_ctx`` holds no secret key.
        LayoutError: the layout is for another context or another number of ciphertexts.
        CiphertextError: a ciphertext is malformed, altered or out of place.
        IntegrityError: the count slots are not ``total_examples``: discard this aggregate.
        ValueError: ``total_examples`` is not a positive int.
    """
    total_examples = check_count(total_examples, "total_examples")
    if secret_ctx.decryptor is None:
        raise SecretKeyRequiredError(
            "decryption needs the sites' secret context (site_secret.ctx); the server's public "
            "context holds no secret key"
        )
    if layout.context_fingerprint != secret_ctx.fingerprint:
        raise LayoutError(
            f"layout is for context {layout.context_fingerprint[:16]}..., this site's context is "
            f"{secret_ctx.fingerprint[:16]}...: the sites were provisioned differently"
        )
    if len(ciphertexts) != layout.num_ciphertexts:
        raise LayoutError(
            f"got {len(ciphertexts)} ciphertexts, the layout packs {layout.total_values} values "
            f"into {layout.num_ciphertexts}"
        )
    sa = sealapi()
    sums = np.empty(layout.total_values, dtype=np.float64)
    per_ct = layout.values_per_ciphertext
    mismatches: list[str] = []
    for index, blob in enumerate(ciphertexts):
        payload = open_envelope(
            blob,
            secret_ctx,
            site=None,
            index=index,
            count=layout.num_ciphertexts,
            kinds=(KIND_AGGREGATE, KIND_SITE_UPDATE),
        )
        ciphertext = load_ciphertext(payload, secret_ctx, site=None, index=index)
        plaintext = sa.Plaintext()
        secret_ctx.decryptor.decrypt(ciphertext, plaintext)
        slots = np.asarray(secret_ctx.encoder.decode_double(plaintext), dtype=np.float64)
        count_slot = float(slots[0])
        if not abs(count_slot - total_examples) <= CHECK_SLOT_TOLERANCE:
            mismatches.append(f"{index}: {count_slot:.6g}")
        start = index * per_ct
        stop = min(start + per_ct, layout.total_values)
        sums[start:stop] = slots[1 : 1 + stop - start]
    if mismatches:
        raise IntegrityError(
            f"count slots of ciphertexts [{', '.join(mismatches[:5])}"
            f"{', ...' if len(mismatches) > 5 else ''}] do not decrypt to total_examples="
            f"{total_examples}: the sum includes a ciphertext made with another key or altered, "
            "or total_examples does not match the sites that were summed. Discard this aggregate"
        )
    return unflatten_state(sums / float(total_examples), layout)


def decrypt_count_slot(blob: bytes, num_ciphertexts: int, secret_ctx: CkksContext) -> float:
    """Slot 0 of a site upload's first ciphertext: the example count the site encrypted.

    ``blob`` is ciphertext 0 of ``num_ciphertexts`` (its envelope must say so).

    Raises:
        CiphertextError: ``blob`` is not such a ciphertext.
        SecretKeyRequiredError: ``secret_ctx`` holds no secret key.
    """
    if secret_ctx.decryptor is None:
        raise SecretKeyRequiredError("reading a count slot needs the sites' secret context")
    payload = open_envelope(
        blob, secret_ctx, site=None, index=0, count=num_ciphertexts, kinds=(KIND_SITE_UPDATE,)
    )
    ciphertext = load_ciphertext(payload, secret_ctx, site=None, index=0)
    plaintext = sealapi().Plaintext()
    secret_ctx.decryptor.decrypt(ciphertext, plaintext)
    return float(secret_ctx.encoder.decode_double(plaintext)[0])
