"""The one command: every subcommand reaches its module's own argument parser."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from simulations.cli import COMMANDS, main


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_subcommand_reaches_its_parser(command, capsys):
    with pytest.raises(SystemExit) as stop:
        main([command, "--help"])
    assert stop.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_unknown_command_is_refused_with_the_list(capsys):
    assert main(["simulte"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'simulte'" in err and "simulate" in err


def test_installed_console_script():
    """``pip install`` puts the console script beside the interpreter."""
    script = Path(sys.executable).parent / "fedmedvit"
    assert script.is_file(), "reinstall the package (pip install -e .) to create the script"
    out = subprocess.run([script, "--help"], capture_output=True, text=True, check=True)
    assert "simulate" in out.stdout and "decrypt" in out.stdout
