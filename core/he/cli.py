"""``fedmedvit he provision --out DIR`` and ``fedmedvit he show FILE`` (also ``python -m
core.he.ckks``): make a consortium's contexts, or print what a context file holds."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from core.he.context import context_from_bytes
from core.he.errors import CkksError
from core.he.keys import CONTEXT_INFO_FILE, provision
from core.he.params import CkksParams


def _parse_bit_sizes(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated ints such as 60 or 60,40,60, got {text!r}"
        ) from exc


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m core.he.ckks provision --out DIR`` and ``python -m core.he.ckks show FILE``."""
    defaults = CkksParams()
    parser = argparse.ArgumentParser(prog="python -m core.he.ckks", description=main.__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    prov = commands.add_parser("provision", help="make the site secret and server public contexts")
    prov.add_argument("--out", required=True, help="directory for the context files")
    prov.add_argument("--poly-modulus-degree", type=int, default=defaults.poly_modulus_degree)
    prov.add_argument(
        "--coeff-mod-bit-sizes",
        type=_parse_bit_sizes,
        default=defaults.coeff_mod_bit_sizes,
        help="comma-separated prime sizes (default: %(default)s)",
    )
    prov.add_argument("--scale-bits", type=int, default=defaults.scale_bits)
    prov.add_argument("--max-sites", type=int, default=defaults.max_sites)
    prov.add_argument("--overwrite", action="store_true", help="replace an existing context")
    show = commands.add_parser("show", help="print a context file's parameters and fingerprint")
    show.add_argument("file")
    args = parser.parse_args(argv)
    try:
        if args.command == "provision":
            params = CkksParams(
                poly_modulus_degree=args.poly_modulus_degree,
                coeff_mod_bit_sizes=args.coeff_mod_bit_sizes,
                scale_bits=args.scale_bits,
                max_sites=args.max_sites,
            )
            secret_path, public_path = provision(args.out, params, overwrite=args.overwrite)
            print(f"site secret context:   {secret_path} (mode 600; give to every site only)")
            print(f"server public context: {public_path}")
            print(f"summary:               {Path(args.out) / CONTEXT_INFO_FILE}")
        else:
            ctx = context_from_bytes(Path(args.file).read_bytes())
            summary = {
                "kind": "secret" if ctx.has_secret_key() else "public",
                "params": ctx.params.to_dict(),
                "context_id": ctx.context_id,
                "public_context_sha256": ctx.fingerprint,
                "max_abs_per_site": ctx.max_abs_per_site,
            }
            print(json.dumps(summary, indent=2))
    except (CkksError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
