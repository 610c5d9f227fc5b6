"""``fedmedvit``: the project's one command; each subcommand runs one module's ``main(argv)``.

    fedmedvit simulate default --set num-server-rounds=5     (simulations.run)
    fedmedvit phantoms --out DIR                              (core.data.phantoms)
    fedmedvit pretrain --out backbone.safetensors             (core.pretrain)
    fedmedvit import --format pumit --in X.ckpt --out Y       (core.model.convert)
    fedmedvit he provision --out DIR                          (core.he.cli)
    fedmedvit report RUN_DIR                                  (core.privacy.report)
    fedmedvit decrypt RUN_DIR --secret-context FILE           (client.decrypt)
    fedmedvit explain RUN_DIR --site-dir DIR --out DIR        (client.explain)
    fedmedvit pki ca --out DIR / fedmedvit deploy-local ...   (deploy.pki / deploy.local, from
    fedmedvit containers all                                   a source checkout; deploy.containers)

Each module stays runnable as ``python -m MODULE`` too. Modules are imported only when their
subcommand runs, so ``fedmedvit --help`` starts in well under a second.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

COMMANDS: dict[str, tuple[str, str]] = {
    "simulate": ("simulations.run", "run a simulation scenario (many hospitals on this machine)"),
    "phantoms": ("core.data.phantoms", "write phantom hospitals to disk"),
    "pretrain": ("core.pretrain", "masked-image-modelling pretraining of a backbone"),
    "import": ("core.model.convert", "import a timm or PUMIT checkpoint as a backbone"),
    "he": ("core.he.cli", "provision or inspect CKKS contexts (provision | show)"),
    "report": ("core.privacy.report", "re-render a run folder's privacy report"),
    "decrypt": ("client.decrypt", "a site decrypts the final adapters of an encrypted run"),
    "explain": ("client.explain", "overlays of where the model looks, per case, at a site"),
    "pki": ("deploy.pki", "certificates and SuperNode keys for a deployment"),
    "deploy-local": ("deploy.local", "the deployment as local processes (TLS, node auth)"),
    "containers": ("deploy.containers", "build the images and run the deployment in containers"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: fedmedvit COMMAND [ARGS...]   (fedmedvit COMMAND --help for its options)", ""]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch ``argv[0]`` to its module's ``main``; returns that exit code (2 on bad usage)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"fedmedvit: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    sys.argv[0] = f"fedmedvit {command}"  # the usage line of parsers that take their prog from it
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
