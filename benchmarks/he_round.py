"""Round wall time with CKKS encrypted aggregation vs plaintext, side by side.

    python -m benchmarks.he_round [--sizes tiny,base] [--sites 10]

One round at one site = local DP-SGD training (one epoch of a phantom X-ray site, 64 x 64) plus
the aggregation work that site's update causes. Plaintext: the server's weighted average of
``--sites`` updates. HE: the site encrypts its update, the server sums ``--sites``
ciphertext sets with the public context, the site decrypts the sum. Upload bytes are reported
for both. Writes ``benchmarks/results/he_round.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.federated import weighted_average
from core.config import RunConfig
from core.data.phantoms import PHANTOM_VERSION, generate_hospitals
from core.federation.rounds import initial_adapters, train_round
from core.he.ckks import (
    aggregate_encrypted,
    decrypt_average,
    encrypt_update,
    load_public_context,
    load_secret_context,
    provision,
)

RESULTS = Path(__file__).parent / "results" / "he_round.json"


def timed(fn: Any, repeats: int) -> tuple[float, Any]:
    times, value = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), value


def measure(size: str, data: Path, keys: tuple[Path, Path], sites: int) -> dict[str, Any]:
    cfg = RunConfig.from_flat(
        {"data-root": str(data), "model-size": size, "num-server-rounds": 1, "batch-size": 8}
    )
    site = data / "site-c-xr-8bit"
    adapters, fingerprint = initial_adapters(cfg)

    def local_round() -> dict[str, torch.Tensor]:
        outcome = train_round(
            cfg,
            site_dir=site,
            global_adapters=adapters,
            server_round=1,
            expected_fingerprint=fingerprint,
            ledger_state=None,
            dp_seed=0,  # a benchmark: reproducible, no adversary
        )
        assert outcome.adapters is not None
        return outcome.adapters

    train_s, update = timed(local_round, 1)
    updates = [({k: v + 0.001 * i for k, v in update.items()}, 50 + i) for i in range(sites)]
    average_s, _ = timed(lambda: weighted_average(updates), 3)

    secret, public = load_secret_context(keys[0]), load_public_context(keys[1])
    encrypt_s, encrypted = timed(lambda: encrypt_update(update, 50, secret), 3)
    uploads = {f"site-{i}": encrypt_update(u, n, secret) for i, (u, n) in enumerate(updates)}
    sum_s, aggregate = timed(lambda: aggregate_encrypted(uploads, public), 3)
    decrypt_s, decrypted = timed(
        lambda: decrypt_average(
            aggregate.ciphertexts, aggregate.total_examples, aggregate.layout, secret
        ),
        3,
    )
    expected = weighted_average(updates)
    error = max(float((decrypted[k].double() - expected[k].double()).abs().max()) for k in expected)
    plain_bytes = sum(t.numel() * 4 for t in update.values())
    plaintext_round = train_s + average_s
    he_round = train_s + encrypt_s + sum_s + decrypt_s
    return {
        "size": size,
        "values": sum(t.numel() for t in update.values()),
        "train_s": train_s,
        "plain_average_s": average_s,
        "encrypt_s": encrypt_s,
        "sum_s": sum_s,
        "decrypt_s": decrypt_s,
        "plaintext_round_s": plaintext_round,
        "he_round_s": he_round,
        "he_over_plaintext": he_round / plaintext_round,
        "upload_plain_bytes": plain_bytes,
        "upload_he_bytes": encrypted.nbytes,
        "expansion": encrypted.nbytes / plain_bytes,
        "max_abs_error": error,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="tiny,base")
    parser.add_argument("--sites", type=int, default=10)
    parser.add_argument(
        "--data",
        type=Path,
        default=Path(f"phantom_data/benchmark-default-seed0-v{PHANTOM_VERSION}"),
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    if not (args.data / "hospitals.json").is_file():
        generate_hospitals(args.data, "default", seed=0, overwrite=True)
    with tempfile.TemporaryDirectory() as keys_dir:
        keys = provision(Path(keys_dir) / "keys")
        rows = [measure(s, args.data.resolve(), keys, args.sites) for s in args.sizes.split(",")]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"sites": args.sites, "rows": rows}, indent=1))
    print("size   values   train s  +avg s   +enc s  +sum s  +dec s  HE/plain  upload x  error")
    for r in rows:
        print(
            f"{r['size']:6} {r['values']:7d}  {r['train_s']:7.2f}  {r['plain_average_s']:6.3f}  "
            f"{r['encrypt_s']:6.3f}  {r['sum_s']:6.3f}  {r['decrypt_s']:6.3f}  "
            f"{r['he_over_plaintext']:7.3f}  {r['expansion']:7.2f}  {r['max_abs_error']:.1e}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
