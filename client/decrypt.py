"""A site decrypts the final global adapters of an encrypted run into peft format.

    python -m client.decrypt RUN_DIR --secret-context site_secret.ctx [--out DIR]

The server stored the encrypted sum (it cannot decrypt it); any site holding the consortium's
secret context turns it into adapters its own backbone can load, once that backbone is shown
to be the run's (``core.federation.runs.build_run_model``: the recorded fingerprint).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from safetensors.torch import load_file

from core.adapters.lora import load_adapter_state, save_adapters
from core.config import ConfigError
from core.federation.protocol import arrays_to_ciphertexts
from core.federation.runs import CHECKPOINTS, LATEST, build_run_model
from core.he.ckks import CkksLayout, decrypt_average, load_secret_context
from core.model.checkpoint import BackboneError


def decrypt_run(run_dir: Path, secret_context: Path, out: Path) -> Path:
    """Decrypt the run's last encrypted global into peft format in ``out``; returns ``out``.

    Raises BackboneError (before decrypting) when the backbone is not the run's."""
    _, model, _ = build_run_model(run_dir)  # config.json and latest.json read and checked
    latest = json.loads((run_dir / CHECKPOINTS / LATEST).read_text())
    state = latest.get("strategy", {})
    if state.get("global_total") is None:
        raise SystemExit(f"{run_dir} holds no encrypted global adapters (not an HE run?)")
    arrays = load_file(str(run_dir / CHECKPOINTS / latest["adapters"]))
    adapters = decrypt_average(
        arrays_to_ciphertexts({k: v.numpy() for k, v in arrays.items()}),
        int(state["global_total"]),
        CkksLayout.from_json(state["layout"]),
        load_secret_context(secret_context),
    )
    load_adapter_state(model, adapters)
    return save_adapters(model, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--secret-context", type=Path, required=True)
    parser.add_argument("--out", type=Path, help="default RUN_DIR/adapters")
    args = parser.parse_args(argv)
    try:
        path = decrypt_run(args.run_dir, args.secret_context, args.out or args.run_dir / "adapters")
    except (BackboneError, ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
