"""HE packing benchmark: ciphertext size, time and error of encrypted FedAvg.

Compares TenSEAL's default packing (N = 8192, [60, 40, 40, 60], scale 2^40, public-key
encryption, one CKKSVector per update) with the parameters chosen in ``core.he.params`` and a few
alternatives, for updates of the tiny and base adapter sizes, and checks the precision at both
ends of the promised range (100 sites at the largest magnitudes, 2 sites at the smallest).

Run: ``python -m benchmarks.he_packing`` (writes ``benchmarks/results/he_packing.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.he import ckks

RESULTS = Path(__file__).resolve().parent / "results" / "he_packing.json"


@dataclass(frozen=True)
class UpdateSize:
    """An adapter update: FFA LoRA B matrices (out x r) for q and v in every block, plus a head."""

    name: str
    layers: int
    dim: int
    rank: int = 8
    classes: int = 2

    def state(self, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        state = {}
        for layer in range(self.layers):
            for proj in ("q", "v"):
                b = rng.normal(0.0, 0.01, size=(self.dim, self.rank))
                state[f"blocks.{layer}.attn.{proj}.lora_B"] = torch.from_numpy(b).float()
        bound = 1.0 / np.sqrt(self.dim)
        head = rng.uniform(-bound, bound, size=(self.classes, self.dim))
        state["head.weight"] = torch.from_numpy(head).float()
        return state

    @property
    def num_values(self) -> int:
        return self.layers * 2 * self.dim * self.rank + self.classes * self.dim


SIZES = [UpdateSize("tiny", layers=12, dim=192), UpdateSize("base", layers=12, dim=768)]

CANDIDATES = {
    "chosen: N=4096 [60] 2^38 seeded": ckks.CkksParams(),
    "N=8192 [60] 2^38 seeded": ckks.CkksParams(poly_modulus_degree=8192),
    "N=2048 [54] 2^32 seeded": ckks.CkksParams(
        poly_modulus_degree=2048, coeff_mod_bit_sizes=(54,), scale_bits=32
    ),
    "N=4096 [50] 2^28 seeded": ckks.CkksParams(coeff_mod_bit_sizes=(50,), scale_bits=28),
}
TIMINGS = ("encrypt_s_per_site", "aggregate_s", "decrypt_s")
BASELINE = "TenSEAL default: N=8192 [60,40,40,60] 2^40 public-key"


def fedavg(states: list[dict[str, torch.Tensor]], counts: list[int]) -> dict[str, np.ndarray]:
    total = sum(counts)
    return {
        k: sum(s[k].double().numpy() * c for s, c in zip(states, counts, strict=True)) / total
        for k in states[0]
    }


def relative_error(got: dict[str, Any], want: dict[str, np.ndarray]) -> float:
    err = max(float(np.max(np.abs(np.asarray(got[k], dtype=np.float64) - want[k]))) for k in want)
    return err / max(float(np.max(np.abs(v))) for v in want.values())


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


@contextmanager
def quiet_stdout() -> Iterator[None]:
    """TenSEAL prints a warning from C++ for every vector longer than one ciphertext."""
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def run_chosen(
    params: ckks.CkksParams, states: list[dict[str, torch.Tensor]], counts: list[int]
) -> dict[str, Any]:
    """The ``core.he.ckks`` path end to end, with real files' worth of bytes."""
    secret = ckks.new_secret_context(params)
    public = ckks.context_from_bytes(secret.serialize_public())
    encrypt_times, updates = [], []
    for state, count in zip(states, counts, strict=True):
        update, seconds = timed(lambda s=state, c=count: ckks.encrypt_update(s, c, secret))
        updates.append(update)
        encrypt_times.append(seconds)
    agg, aggregate_s = timed(lambda: ckks.aggregate_encrypted(updates, public))
    # Decrypt the exact bytes the server produced, on the site.
    avg32, decrypt_s = timed(
        lambda: ckks.decrypt_average(agg.ciphertexts, agg.total_examples, agg.layout, secret)
    )
    # Error of CKKS itself, before the cast back to float32 adds its own rounding.
    f64_layout = ckks.CkksLayout(
        keys=agg.layout.keys,
        shapes=agg.layout.shapes,
        dtypes=tuple("float64" for _ in agg.layout.keys),
        values_per_ciphertext=agg.layout.values_per_ciphertext,
        context_fingerprint=agg.layout.context_fingerprint,
    )
    avg64 = ckks.decrypt_average(agg.ciphertexts, agg.total_examples, f64_layout, secret)
    want = fedavg(states, counts)
    fp32_bytes = 4 * agg.layout.total_values
    return {
        "ciphertexts_per_update": len(updates[0].ciphertexts),
        "upload_bytes": updates[0].nbytes,
        "upload_expansion": updates[0].nbytes / fp32_bytes,
        "download_bytes": sum(len(c) for c in agg.ciphertexts),
        "download_expansion": sum(len(c) for c in agg.ciphertexts) / fp32_bytes,
        "encrypt_s_per_site": float(np.mean(encrypt_times)),
        "aggregate_s": aggregate_s,
        "decrypt_s": decrypt_s,
        "max_rel_error": relative_error({k: v.numpy() for k, v in avg64.items()}, want),
        "max_rel_error_float32_output": relative_error(
            {k: v.double().numpy() for k, v in avg32.items()}, want
        ),
        "secret_context_bytes": len(secret.serialize_secret()),
        "public_context_bytes": len(secret.serialize_public()),
    }


def run_tenseal_default(states: list[dict[str, torch.Tensor]], counts: list[int]) -> dict[str, Any]:
    """The usual TenSEAL recipe: one CKKSVector per update under a public key."""
    import tenseal as ts

    secret = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 40, 40, 60])
    secret.global_scale = 2.0**40
    public_ctx = secret.copy()
    public_ctx.make_context_public()
    public_bytes = public_ctx.serialize(save_galois_keys=False, save_relin_keys=False)
    server = ts.context_from(public_bytes)
    keys = sorted(states[0])

    def flat(state: dict[str, torch.Tensor]) -> np.ndarray:
        return np.concatenate([state[k].double().reshape(-1).numpy() for k in keys])

    encrypt_times, uploads = [], []
    for state, count in zip(states, counts, strict=True):
        blob, seconds = timed(
            lambda s=state, c=count: ts.ckks_vector(secret, (flat(s) * c).tolist()).serialize()
        )
        uploads.append(blob)
        encrypt_times.append(seconds)

    def aggregate() -> bytes:
        total = ts.ckks_vector_from(server, uploads[0])
        for blob in uploads[1:]:
            total += ts.ckks_vector_from(server, blob)
        return total.serialize()

    summed, aggregate_s = timed(aggregate)
    values, decrypt_s = timed(
        lambda: np.asarray(ts.ckks_vector_from(secret, summed).decrypt()) / sum(counts)
    )
    want = fedavg(states, counts)
    got, offset = {}, 0
    for k in keys:
        n = want[k].size
        got[k] = values[offset : offset + n].reshape(want[k].shape)
        offset += n
    fp32_bytes = 4 * values.size
    return {
        "ciphertexts_per_update": -(-values.size // 4096),
        "upload_bytes": len(uploads[0]),
        "upload_expansion": len(uploads[0]) / fp32_bytes,
        "download_bytes": len(summed),
        "download_expansion": len(summed) / fp32_bytes,
        "encrypt_s_per_site": float(np.mean(encrypt_times)),
        "aggregate_s": aggregate_s,
        "decrypt_s": decrypt_s,
        "max_rel_error": relative_error(got, want),
        "max_rel_error_float32_output": relative_error(
            {k: v.astype(np.float32).astype(np.float64) for k, v in got.items()}, want
        ),
        "secret_context_bytes": len(secret.serialize(save_secret_key=True)),
        "public_context_bytes": len(public_bytes),
    }


def precision_envelope(params: ckks.CkksParams, size: UpdateSize) -> list[dict[str, Any]]:
    """Error at both ends of the promised range: largest sums and smallest sums."""
    rng = np.random.default_rng(7)
    rows = []
    for label, sites, count, magnitude in [
        ("largest: 100 sites x 1e4 examples, |w|<=1", 100, 10_000, 1.0),
        ("smallest: 2 sites x 1 example, |w|<=0.01", 2, 1, 0.01),
    ]:
        states = [
            {
                k: torch.from_numpy(rng.uniform(-magnitude, magnitude, size=tuple(v.shape)))
                for k, v in size.state(rng).items()
            }
            for _ in range(sites)
        ]
        counts = [count] * sites
        secret = ckks.new_secret_context(params)
        updates = [ckks.encrypt_update(s, c, secret) for s, c in zip(states, counts, strict=True)]
        agg = ckks.aggregate_encrypted(updates, secret.public_context())
        got = ckks.decrypt_average(agg.ciphertexts, agg.total_examples, agg.layout, secret)
        rows.append(
            {
                "case": label,
                "size": size.name,
                "sites": sites,
                "max_rel_error": relative_error(
                    {k: v.numpy() for k, v in got.items()}, fedavg(states, counts)
                ),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=10)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--repeats", type=int, default=3, help="timings keep the fastest run")
    parser.add_argument("--skip-baseline", action="store_true", help="omit TenSEAL defaults")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    rows = []
    for size in SIZES:
        states = [size.state(rng) for _ in range(args.sites)]
        counts = [int(c) for c in rng.integers(50, 5000, size=args.sites)]
        schemes: list[tuple[str, ckks.CkksParams | None]] = list(CANDIDATES.items())
        if not args.skip_baseline:
            schemes.insert(0, (BASELINE, None))
        for name, params in schemes:
            repeats = []
            for _ in range(max(args.repeats, 1)):
                if params is None:
                    with quiet_stdout():
                        repeats.append(run_tenseal_default(states, counts))
                else:
                    repeats.append(run_chosen(params, states, counts))
            result = {**repeats[0], **{k: min(r[k] for r in repeats) for k in TIMINGS}}
            rows.append({"size": size.name, "values": size.num_values, "scheme": name, **result})

    envelope = precision_envelope(ckks.CkksParams(), SIZES[0])

    header = (
        f"{'size':5} {'scheme':52} {'up x':>6} {'down x':>6} {'enc s':>7} "
        f"{'agg s':>7} {'dec s':>7} {'rel err':>9}"
    )
    print(f"{args.sites} sites; expansion = ciphertext bytes / fp32 bytes of one update")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['size']:5} {r['scheme']:52} {r['upload_expansion']:6.2f} "
            f"{r['download_expansion']:6.2f} {r['encrypt_s_per_site']:7.3f} "
            f"{r['aggregate_s']:7.3f} {r['decrypt_s']:7.3f} {r['max_rel_error']:9.1e}"
        )
    print("\nprecision envelope of the chosen parameters")
    for e in envelope:
        print(f"  {e['case']:48} rel err {e['max_rel_error']:.1e}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "sites": args.sites,
        "timing": f"fastest of {max(args.repeats, 1)} runs",
        "sizes": {s.name: s.num_values for s in SIZES},
        "chosen_params": ckks.CkksParams().to_dict(),
        "results": rows,
        "precision_envelope": envelope,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
