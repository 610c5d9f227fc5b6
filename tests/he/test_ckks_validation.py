"""Bad ciphertexts are rejected by name (site, index, why) and the others still aggregate."""

from __future__ import annotations

import pytest
import torch
from test_ckks import fedavg, max_relative_error, random_state

from core.he import ckks, envelope, seal

COUNTS = [30, 500, 7]


@pytest.fixture(scope="module")
def secret_ctx() -> ckks.CkksContext:
    return ckks.new_secret_context()


@pytest.fixture(scope="module")
def public_ctx(secret_ctx: ckks.CkksContext) -> ckks.CkksContext:
    return secret_ctx.public_context()


@pytest.fixture(scope="module")
def states() -> list[dict[str, torch.Tensor]]:
    return [random_state(100 + i) for i in range(len(COUNTS))]


@pytest.fixture(scope="module")
def updates(states, secret_ctx) -> list[ckks.EncryptedUpdate]:
    return [ckks.encrypt_update(s, c, secret_ctx) for s, c in zip(states, COUNTS, strict=True)]


def replace_ciphertext(
    update: ckks.EncryptedUpdate, index: int, blob: bytes
) -> ckks.EncryptedUpdate:
    ciphertexts = list(update.ciphertexts)
    ciphertexts[index] = blob
    return ckks.EncryptedUpdate(ciphertexts, update.num_examples, update.layout)


def flip_byte(blob: bytes, position: int) -> bytes:
    data = bytearray(blob)
    data[position] ^= 0x40
    return bytes(data)


def payload_of(blob: bytes) -> bytes:
    return blob[envelope.HEADER.size : -envelope.DIGEST_SIZE]


def relabel(blob: bytes, ctx: ckks.CkksContext, index: int, count: int) -> bytes:
    """What a malicious site could do: rewrap a foreign ciphertext in a valid envelope."""
    return envelope.seal_envelope(payload_of(blob), ctx, envelope.KIND_SITE_UPDATE, index, count)


def assert_others_still_aggregate(
    bad: ckks.EncryptedUpdate, updates, states, secret_ctx, public_ctx, match: str
) -> None:
    batch = {"good-0": updates[0], "bad": bad, "good-2": updates[2]}
    agg = ckks.aggregate_encrypted(batch, public_ctx)
    assert agg.included == ("good-0", "good-2")
    assert set(agg.rejected) == {"bad"}
    assert "'bad'" in agg.rejected["bad"]
    assert match in agg.rejected["bad"]
    got = ckks.decrypt_average(agg.ciphertexts, agg.total_examples, agg.layout, secret_ctx)
    want = fedavg([states[0], states[2]], [COUNTS[0], COUNTS[2]])
    assert max_relative_error(got, want) < 1e-6


@pytest.mark.parametrize(
    ("where", "match"),
    [
        (lambda n: envelope.HEADER.size + n // 2, "digest mismatch"),  # inside the SEAL payload
        (lambda n: n - 1, "digest mismatch"),  # inside the digest
        (lambda n: 10, "digest mismatch"),  # inside the context fingerprint
        (lambda n: 0, "bad magic"),
    ],
)
def test_flipped_bytes_are_rejected_naming_site_and_index(
    where, match, updates, states, secret_ctx, public_ctx
) -> None:
    blob = updates[1].ciphertexts[1]
    bad = replace_ciphertext(updates[1], 1, flip_byte(blob, where(len(blob))))
    with pytest.raises(ckks.CiphertextError, match=match) as info:
        ckks.sum_encrypted(
            [u.ciphertexts for u in (updates[0], bad)], public_ctx, site_ids=["a", "b"]
        )
    assert info.value.site == "b" and info.value.index == 1
    assert "site 'b', ciphertext 1" in str(info.value)
    assert_others_still_aggregate(bad, updates, states, secret_ctx, public_ctx, match)


@pytest.mark.parametrize("keep", [0, 50, -1])
def test_truncated_ciphertexts_are_rejected(keep, updates, states, secret_ctx, public_ctx) -> None:
    blob = updates[1].ciphertexts[0]
    bad = replace_ciphertext(updates[1], 0, blob[:keep])
    with pytest.raises(ckks.CiphertextError, match="truncated") as info:
        ckks.sum_encrypted([bad.ciphertexts], public_ctx)
    assert info.value.index == 0
    assert_others_still_aggregate(bad, updates, states, secret_ctx, public_ctx, "truncated")


def test_ciphertext_from_another_context_with_same_params_is_rejected_by_fingerprint(
    updates, states, secret_ctx, public_ctx
) -> None:
    other = ckks.new_secret_context(secret_ctx.params)
    assert other.params == secret_ctx.params and other.fingerprint != secret_ctx.fingerprint
    foreign = ckks.encrypt_update(states[1], COUNTS[1], other)
    # Its layout names the other context too; give it ours so only the ciphertexts differ.
    bad = ckks.EncryptedUpdate(foreign.ciphertexts, foreign.num_examples, updates[1].layout)
    with pytest.raises(ckks.CiphertextError, match="provisioned with another context"):
        ckks.sum_encrypted([bad.ciphertexts], public_ctx)
    assert_others_still_aggregate(bad, updates, states, secret_ctx, public_ctx, "another context")


def test_ciphertext_for_other_params_is_rejected_by_seal_even_with_a_forged_envelope(
    updates, states, secret_ctx, public_ctx
) -> None:
    other = ckks.new_secret_context(ckks.CkksParams(poly_modulus_degree=8192))
    foreign = ckks.encrypt_update({"w": torch.ones(5000)}, 3, other)
    blob = relabel(foreign.ciphertexts[0], secret_ctx, 0, updates[1].layout.num_ciphertexts)
    bad = replace_ciphertext(updates[1], 0, blob)
    with pytest.raises(ckks.CiphertextError, match="SEAL rejects") as info:
        ckks.sum_encrypted([bad.ciphertexts], public_ctx)
    assert info.value.index == 0
    assert_others_still_aggregate(bad, updates, states, secret_ctx, public_ctx, "SEAL rejects")


def test_ciphertext_with_other_scale_is_rejected(updates, states, secret_ctx, public_ctx) -> None:
    """Same ring, prime and key but another scale: a buggy or forged site."""
    sa = seal.sealapi()
    plaintext = sa.Plaintext()
    secret_ctx.encoder.encode([1.0] * 10, float(2**30), plaintext)
    payload = seal.seal_save(secret_ctx.encryptor.encrypt_symmetric(plaintext))
    count = updates[1].layout.num_ciphertexts
    blob = envelope.seal_envelope(payload, secret_ctx, envelope.KIND_SITE_UPDATE, 0, count)
    bad = replace_ciphertext(updates[1], 0, blob)
    with pytest.raises(ckks.CiphertextError, match="scale"):
        ckks.sum_encrypted([bad.ciphertexts], public_ctx)
    assert_others_still_aggregate(bad, updates, states, secret_ctx, public_ctx, "scale")


def test_foreign_key_under_identical_params_passes_the_server_but_fails_the_count_check(
    updates, states, secret_ctx, public_ctx
) -> None:
    """Indistinguishable to the server by design; the sites' count slot catches it."""
    other = ckks.new_secret_context(secret_ctx.params)
    foreign = ckks.encrypt_update(states[1], COUNTS[1], other)
    count = len(foreign.ciphertexts)
    forged = [relabel(b, secret_ctx, i, count) for i, b in enumerate(foreign.ciphertexts)]
    summed = ckks.sum_encrypted([updates[0].ciphertexts, forged], public_ctx)
    with pytest.raises(ckks.IntegrityError, match="another key"):
        ckks.decrypt_average(summed, COUNTS[0] + COUNTS[1], updates[0].layout, secret_ctx)


def test_server_misreporting_the_total_is_caught_by_the_count_slot(
    updates, secret_ctx, public_ctx
) -> None:
    summed = ckks.sum_encrypted([u.ciphertexts for u in updates[:2]], public_ctx)
    with pytest.raises(ckks.IntegrityError, match="total_examples=500"):
        # The server dropped site 0's count but kept its ciphertexts (or the reverse).
        ckks.decrypt_average(summed, 500, updates[0].layout, secret_ctx)
    ckks.decrypt_average(summed, COUNTS[0] + COUNTS[1], updates[0].layout, secret_ctx)


def test_missing_or_reordered_ciphertexts_are_rejected(
    updates, states, secret_ctx, public_ctx
) -> None:
    short = ckks.EncryptedUpdate(updates[1].ciphertexts[:-1], COUNTS[1], updates[1].layout)
    with pytest.raises(ckks.CiphertextError, match="sent 1 ciphertexts, expected 2"):
        ckks.sum_encrypted([updates[0].ciphertexts, short.ciphertexts], public_ctx)
    assert_others_still_aggregate(short, updates, states, secret_ctx, public_ctx, "expected 2")

    swapped = ckks.EncryptedUpdate(updates[1].ciphertexts[::-1], COUNTS[1], updates[1].layout)
    with pytest.raises(ckks.CiphertextError, match="reordered"):
        ckks.sum_encrypted([swapped.ciphertexts], public_ctx)
    assert_others_still_aggregate(swapped, updates, states, secret_ctx, public_ctx, "reordered")


def test_site_with_another_layout_is_dropped(updates, states, secret_ctx, public_ctx) -> None:
    other_state = {**states[1], "extra": torch.zeros(3, dtype=torch.float64)}
    odd = ckks.encrypt_update(other_state, COUNTS[1], secret_ctx)
    assert_others_still_aggregate(odd, updates, states, secret_ctx, public_ctx, "layout differs")


def test_aggregate_is_not_accepted_as_a_site_update(updates, public_ctx) -> None:
    summed = ckks.sum_encrypted([updates[0].ciphertexts], public_ctx)
    with pytest.raises(ckks.CiphertextError, match="is an aggregate, expected a site update"):
        ckks.sum_encrypted([summed], public_ctx)


def test_decrypt_checks_ciphertext_count_and_context(updates, secret_ctx, public_ctx) -> None:
    summed = ckks.sum_encrypted([updates[0].ciphertexts], public_ctx)
    with pytest.raises(ckks.LayoutError, match="got 1 ciphertexts"):
        ckks.decrypt_average(summed[:1], COUNTS[0], updates[0].layout, secret_ctx)
    other = ckks.new_secret_context()
    with pytest.raises(ckks.LayoutError, match="provisioned differently"):
        ckks.decrypt_average(summed, COUNTS[0], updates[0].layout, other)


def test_oversized_payload_is_rejected_before_hashing(updates, public_ctx) -> None:
    payload = b"\0" * (public_ctx.max_payload_bytes + 1)
    blob = envelope.seal_envelope(payload, public_ctx, envelope.KIND_SITE_UPDATE, 0, 2)
    with pytest.raises(ckks.CiphertextError, match="exceeds"):
        ckks.sum_encrypted([[blob, updates[0].ciphertexts[1]]], public_ctx)


def test_every_site_rejected_raises(updates, public_ctx) -> None:
    bad = replace_ciphertext(updates[0], 0, b"garbage")
    with pytest.raises(ckks.AggregationError, match="every update was rejected"):
        ckks.aggregate_encrypted([bad], public_ctx)


def test_values_that_could_wrap_around_are_refused(secret_ctx: ckks.CkksContext) -> None:
    limit = secret_ctx.max_abs_per_site
    ckks.encrypt_update({"w": torch.tensor([limit / 2])}, 1, secret_ctx)
    with pytest.raises(ckks.CapacityError, match="wrap around"):
        ckks.encrypt_update({"w": torch.tensor([0.5])}, int(limit * 3), secret_ctx)


def test_more_sites_than_provisioned_are_refused() -> None:
    ctx = ckks.new_secret_context(ckks.CkksParams(max_sites=2))
    update = ckks.encrypt_update({"w": torch.ones(3)}, 1, ctx)
    with pytest.raises(ckks.CapacityError, match="max_sites=2"):
        ckks.sum_encrypted([update.ciphertexts] * 3, ctx.public_context())
