"""The import contract: the folders' layering holds in the code (checked on the source, so a
lazy import inside a function counts too)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Package -> top-level modules it must never import (directly or lazily).
FORBIDDEN = {
    "core": ("flwr", "client", "server", "simulations", "deploy", "benchmarks", "tests"),
    "core.model": (
        "core.adapters",
        "core.data",
        "core.training",
        "core.pretrain",
        "core.privacy",
        "core.he",
        "core.federation",
        "core.config",
    ),
    "core.adapters": (
        "core.data",
        "core.training",
        "core.pretrain",
        "core.privacy",
        "core.he",
        "core.federation",
        "core.config",
    ),
    # core.data may use core.model.sac: batches are bucketed by the SAC degree of anisotropy.
    "core.data": (
        "core.model.sizes",
        "core.model.vit",
        "core.model.checkpoint",
        "core.model.convert",
        "core.adapters",
        "core.training",
        "core.pretrain",
        "core.privacy",
        "core.he",
        "core.federation",
        "core.config",
    ),
    "core.training": ("core.pretrain", "core.privacy", "core.he", "core.federation", "core.config"),
    "core.pretrain": ("core.privacy", "core.he", "core.federation", "core.config"),
    "core.privacy": (
        "core.model",
        "core.adapters",
        "core.data",
        "core.training",
        "core.pretrain",
        "core.he",
        "core.federation",
    ),
    "core.he": (
        "core.model",
        "core.adapters",
        "core.data",
        "core.training",
        "core.pretrain",
        "core.privacy",
        "core.federation",
    ),
    "core.explain": (
        "core.data",
        "core.training",
        "core.pretrain",
        "core.privacy",
        "core.he",
        "core.federation",
        "core.config",
    ),
    "client": ("server", "simulations", "deploy", "benchmarks"),
    "server": ("client", "simulations", "deploy", "benchmarks"),
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _violations() -> list[str]:
    problems = []
    for package, banned in FORBIDDEN.items():
        folder = ROOT.joinpath(*package.split("."))
        for path in sorted(folder.rglob("*.py")):
            module = _module_name(path)
            for imported in _imports(path):
                for ban in banned:
                    if imported == ban or imported.startswith(ban + "."):
                        problems.append(f"{module} imports {imported} (forbidden: {ban})")
    return problems


def test_layers_import_only_downwards():
    assert _violations() == []


def test_contract_catches_a_forbidden_import(tmp_path, monkeypatch):
    """The checker itself can fail: a flwr import planted in core.he is reported."""
    planted = ROOT / "core" / "he" / "_planted_for_test.py"
    planted.write_text("def f():\n    import flwr.app\n")
    try:
        assert any("core.he._planted_for_test imports flwr.app" in p for p in _violations())
    finally:
        planted.unlink()


@pytest.mark.parametrize(
    "package",
    ["core", "core.model", "core.privacy", "core.he", "core.federation", "core.config"],
)
def test_importing_a_package_loads_no_heavy_library(package):
    """``import core.<area>`` alone pulls in no torch, peft, opacus, flwr or tenseal (they load
    where used). ``core.config`` above all: the runner, the report and every CLI import it to
    check a run config before any work, which must not cost seconds of torch and peft."""
    code = (
        f"import sys, {package}\n"
        "heavy = ('torch', 'peft', 'opacus', 'transformers', 'flwr', 'tenseal')\n"
        "print(','.join(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == ""
