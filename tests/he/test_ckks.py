"""CKKS aggregation with real SEAL ciphertexts: equals plaintext FedAvg, packs exactly."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.he import ckks

REL_TOL = 1e-6


@pytest.fixture(scope="module")
def secret_ctx() -> ckks.CkksContext:
    return ckks.new_secret_context()


@pytest.fixture(scope="module")
def public_ctx(secret_ctx: ckks.CkksContext) -> ckks.CkksContext:
    return secret_ctx.public_context()


def random_state(
    seed: int, dtype: torch.dtype = torch.float64, magnitude: float = 1.0
) -> dict[str, torch.Tensor]:
    """A small adapter-like update: LoRA B matrices for q and v plus a head (2 ciphertexts)."""
    g = torch.Generator().manual_seed(seed)
    state = {
        f"blocks.{i}.attn.{proj}.lora_B": (torch.rand(32, 8, generator=g) * 2 - 1) * magnitude
        for i in range(4)
        for proj in ("q", "v")
    }
    state["head.weight"] = (torch.rand(3, 32, generator=g) * 2 - 1) * magnitude
    state["head.bias"] = (torch.rand(3, generator=g) * 2 - 1) * magnitude
    return {k: v.to(dtype) for k, v in state.items()}


def fedavg(states: list[dict[str, torch.Tensor]], counts: list[int]) -> dict[str, torch.Tensor]:
    total = sum(counts)
    return {
        k: sum(s[k].double() * c for s, c in zip(states, counts, strict=True)) / total
        for k in states[0]
    }


def max_relative_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    err = max((got[k].double() - want[k]).abs().max().item() for k in want)
    scale = max(want[k].abs().max().item() for k in want)
    return err / scale


# ---- parameters --------------------------------------------------------------------------


def test_default_params_are_128_bit_secure_and_need_no_key_switching() -> None:
    params = ckks.CkksParams()
    assert params.poly_modulus_degree == 4096
    assert params.coeff_mod_bit_sizes == (60,)
    assert sum(params.coeff_mod_bit_sizes) <= ckks.SEAL_MAX_MODULUS_BITS_128[4096]
    assert params.values_per_ciphertext == params.slot_count - 1 == 2047


def test_default_capacity_holds_100_sites_of_1e4_examples(secret_ctx: ckks.CkksContext) -> None:
    assert secret_ctx.max_abs_sum >= 1e6 * 2  # 2x headroom over 100 sites * 1e4 * |w| <= 1
    assert secret_ctx.max_abs_per_site >= 1e4


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"poly_modulus_degree": 2048, "coeff_mod_bit_sizes": (60,)}, "security bound"),
        ({"poly_modulus_degree": 3000}, "poly_modulus_degree"),
        ({"coeff_mod_bit_sizes": (61,)}, r"\[20, 60\]"),
        ({"coeff_mod_bit_sizes": ()}, "non-empty"),
        ({"scale_bits": 58}, "scale_bits"),
        ({"max_sites": 0}, "max_sites"),
    ],
)
def test_params_reject_insecure_or_useless_choices(kwargs: dict, match: str) -> None:
    with pytest.raises(ckks.CkksParamsError, match=match):
        ckks.CkksParams(**kwargs)


def test_params_round_trip_through_dict() -> None:
    params = ckks.CkksParams(poly_modulus_degree=8192, coeff_mod_bit_sizes=(60, 40), scale_bits=30)
    assert ckks.CkksParams.from_dict(json.loads(json.dumps(params.to_dict()))) == params
    assert params.data_bit_sizes == (60,)


# ---- packing ---------------------------------------------------------------------------------


def test_flatten_unflatten_preserves_keys_shapes_dtypes_and_values(
    secret_ctx: ckks.CkksContext,
) -> None:
    g = torch.Generator().manual_seed(1)
    state = {
        "z.scalar": torch.tensor(3.5, dtype=torch.float64),
        "b.half": torch.randn(5, 3, generator=g).half(),
        "a.bf16": torch.randn(7, generator=g).bfloat16(),
        "m.float": torch.randn(2, 3, 4, generator=g),
        "empty": torch.zeros(0, 4),
    }
    layout = ckks.make_layout(state, secret_ctx)
    assert list(layout.keys) == sorted(state)
    flat = ckks.flatten_state(state, layout)
    assert flat.dtype == np.float64 and flat.size == layout.total_values == 1 + 15 + 7 + 24
    back = ckks.unflatten_state(flat, layout)
    assert list(back) == sorted(state)
    for key, tensor in state.items():
        assert back[key].dtype == tensor.dtype
        assert back[key].shape == tensor.shape
        assert torch.equal(back[key], tensor)


@pytest.mark.parametrize("total", [1, 2046, 2047, 2048, 4094, 4095, 10_000])
def test_ciphertext_count_is_ceil_of_total_over_values_per_ciphertext(
    total: int, secret_ctx: ckks.CkksContext
) -> None:
    layout = ckks.make_layout({"w": torch.zeros(total)}, secret_ctx)
    # One slot of each ciphertext carries the integrity count.
    assert layout.num_ciphertexts == math.ceil(total / (secret_ctx.slot_count - 1))


def test_encrypted_ciphertext_count_matches_layout(secret_ctx: ckks.CkksContext) -> None:
    update = ckks.encrypt_update({"w": torch.ones(4095)}, 3, secret_ctx)
    assert len(update.ciphertexts) == update.layout.num_ciphertexts == 3


def test_layout_json_round_trip_uses_plain_json_types(secret_ctx: ckks.CkksContext) -> None:
    layout = ckks.make_layout(random_state(0), secret_ctx)
    text = layout.to_json()
    data = json.loads(text)
    assert set(data) == {
        "format",
        "keys",
        "shapes",
        "dtypes",
        "total_values",
        "values_per_ciphertext",
        "num_ciphertexts",
        "context_fingerprint",
    }
    assert data["context_fingerprint"] == secret_ctx.fingerprint
    assert ckks.CkksLayout.from_json(text) == layout
    data["total_values"] += 1
    with pytest.raises(ckks.LayoutError, match="total_values"):
        ckks.CkksLayout.from_dict(data)
    with pytest.raises(ckks.LayoutError, match="format"):
        ckks.CkksLayout.from_dict({**data, "format": "other"})


def test_state_that_does_not_match_layout_is_refused(secret_ctx: ckks.CkksContext) -> None:
    state = random_state(0)
    layout = ckks.make_layout(state, secret_ctx)
    with pytest.raises(ckks.LayoutError, match="missing"):
        ckks.flatten_state({k: v for k, v in state.items() if k != "head.bias"}, layout)
    with pytest.raises(ckks.LayoutError, match="layout says"):
        ckks.flatten_state({**state, "head.bias": torch.zeros(4, dtype=torch.float64)}, layout)
    with pytest.raises(ckks.LayoutError, match="values"):
        ckks.unflatten_state(np.zeros(layout.total_values + 1), layout)


@pytest.mark.parametrize(
    ("state", "error", "match"),
    [
        ({}, ckks.LayoutError, "empty"),
        ({"w": torch.ones(3, dtype=torch.int64)}, ckks.LayoutError, "floating-point"),
        ({"w": torch.tensor([1.0, float("nan")])}, ValueError, "NaN"),
    ],
)
def test_unencryptable_updates_are_refused(
    state: dict, error: type[Exception], match: str, secret_ctx: ckks.CkksContext
) -> None:
    with pytest.raises(error, match=match):
        ckks.encrypt_update(state, 1, secret_ctx)


@pytest.mark.parametrize("count", [0, -3, True, 2.5])
def test_num_examples_must_be_a_positive_int(count: object, secret_ctx: ckks.CkksContext) -> None:
    with pytest.raises(ValueError, match="num_examples"):
        ckks.encrypt_update({"w": torch.ones(2)}, count, secret_ctx)  # type: ignore[arg-type]


# ---- aggregation equals plaintext FedAvg ------------------------------------------------------


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    data=st.data(),
    num_sites=st.integers(min_value=2, max_value=10),
    magnitude_exp=st.floats(min_value=-2.0, max_value=0.0),
)
def test_he_aggregation_equals_plaintext_fedavg_with_dropouts(
    data: st.DataObject,
    num_sites: int,
    magnitude_exp: float,
    secret_ctx: ckks.CkksContext,
    public_ctx: ckks.CkksContext,
) -> None:
    counts = data.draw(st.lists(st.integers(1, 10_000), min_size=num_sites, max_size=num_sites))
    responded = data.draw(
        st.lists(st.booleans(), min_size=num_sites, max_size=num_sites).filter(any)
    )
    seed = data.draw(st.integers(0, 2**31 - 1))
    states = [random_state(seed + i, magnitude=10.0**magnitude_exp) for i in range(num_sites)]
    updates = [ckks.encrypt_update(s, c, secret_ctx) for s, c in zip(states, counts, strict=True)]

    kept = [i for i in range(num_sites) if responded[i]]
    summed = ckks.sum_encrypted([updates[i].ciphertexts for i in kept], public_ctx)
    total = sum(counts[i] for i in kept)
    got = ckks.decrypt_average(summed, total, updates[kept[0]].layout, secret_ctx)

    want = fedavg([states[i] for i in kept], [counts[i] for i in kept])
    assert max_relative_error(got, want) < REL_TOL


def test_aggregate_of_float32_updates_returns_float32_close_to_fedavg(
    secret_ctx: ckks.CkksContext, public_ctx: ckks.CkksContext
) -> None:
    states = [random_state(i, dtype=torch.float32) for i in range(3)]
    counts = [120, 45, 900]
    updates = {
        f"site-{i}": ckks.encrypt_update(s, c, secret_ctx)
        for i, (s, c) in enumerate(zip(states, counts, strict=True))
    }
    agg = ckks.aggregate_encrypted(updates, public_ctx)
    assert agg.included == ("site-0", "site-1", "site-2") and not agg.rejected
    assert agg.total_examples == sum(counts)
    got = ckks.decrypt_average(agg.ciphertexts, agg.total_examples, agg.layout, secret_ctx)
    assert all(t.dtype == torch.float32 for t in got.values())
    assert max_relative_error(got, fedavg(states, counts)) < REL_TOL


def test_worst_case_magnitudes_for_100_sites_stay_exact_and_do_not_wrap(
    secret_ctx: ckks.CkksContext, public_ctx: ckks.CkksContext
) -> None:
    """100 sites with 1e4 examples each and |w| = 1: the largest sum the defaults promise."""
    w = torch.linspace(-1.0, 1.0, 300, dtype=torch.float64)
    update = ckks.encrypt_update({"w": w}, 10_000, secret_ctx)
    summed = ckks.sum_encrypted([update.ciphertexts] * 100, public_ctx)
    got = ckks.decrypt_average(summed, 1_000_000, update.layout, secret_ctx)
    assert (got["w"] - w).abs().max().item() < REL_TOL


def test_uploaded_ciphertexts_are_at_most_5x_the_fp32_bytes(secret_ctx: ckks.CkksContext) -> None:
    state = {"w": torch.randn(20 * 2047)}
    update = ckks.encrypt_update(state, 7, secret_ctx)
    assert update.nbytes / (4 * state["w"].numel()) < 4.2


def test_public_context_holds_no_secret_key_and_cannot_decrypt_or_encrypt(
    secret_ctx: ckks.CkksContext, public_ctx: ckks.CkksContext
) -> None:
    assert secret_ctx.has_secret_key() and not public_ctx.has_secret_key()
    assert public_ctx.fingerprint == secret_ctx.fingerprint
    update = ckks.encrypt_update(random_state(3), 10, secret_ctx)
    summed = ckks.sum_encrypted([update.ciphertexts], public_ctx)
    with pytest.raises(ckks.SecretKeyRequiredError, match="no secret key"):
        ckks.decrypt_average(summed, 10, update.layout, public_ctx)
    with pytest.raises(ckks.SecretKeyRequiredError):
        ckks.encrypt_update(random_state(3), 10, public_ctx)
    with pytest.raises(ckks.SecretKeyRequiredError):
        public_ctx.serialize_secret()
    assert b"FMVCKKS1" not in public_ctx.serialize_public()


def test_importing_any_core_he_module_loads_neither_tenseal_nor_flower() -> None:
    """All of them in one interpreter: if any imported tenseal eagerly, it would be loaded."""
    here = Path(__file__).resolve().parents[2]
    modules = sorted(f"core.he.{p.stem}" for p in (here / "core" / "he").glob("[!_]*.py"))
    assert "core.he.ckks" in modules and "core.he.seal" in modules
    code = (
        f"import sys, {', '.join(modules)}; "
        "assert 'tenseal' not in sys.modules, 'tenseal imported eagerly'; "
        "assert not any(m == 'flwr' or m.startswith('flwr.') for m in sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=here)
