"""Tests for herbarium/cli.py: the ``herbarium`` command and its dispatch."""

from __future__ import annotations

import importlib
import importlib.util
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from herbarium import cli

BIN = Path(sys.executable).parent


def _run(*args: str) -> subprocess.CompletedProcess:
    script = BIN / "herbarium"
    if not script.is_file():
        pytest.skip("the herbarium console script is not installed in this environment")
    return subprocess.run([str(script), *args], capture_output=True, text=True, timeout=120)


def test_help_lists_every_command():
    done = _run("--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: herbarium COMMAND")
    for name, (_, description) in cli.COMMANDS.items():
        assert f"  {name}" in done.stdout and description in done.stdout
    assert set(cli.COMMANDS) >= {"make-demo-data", "collect-stats", "train", "evaluate"}


def test_unknown_command_exits_2_with_the_valid_names():
    done = _run("trian")
    assert done.returncode == 2
    assert done.stderr.strip() == (f"error: herbarium: unknown command 'trian'; did you mean 'herbarium train'?; "
                                   f"choose one of {list(cli.COMMANDS)}")
    assert done.stdout == ""


def test_collect_stats_help():
    done = _run("collect-stats", "--help")
    assert done.returncode == 0, done.stderr
    for option in ("--split", "--size", "--out", "--ranks", "--workers", "--skip-bad-images"):
        assert option in done.stdout
    assert "(default: 224)" in done.stdout


def test_no_arguments_prints_usage(capsys):
    assert cli.main([]) == 0
    assert cli.main(["-h"]) == 0
    out = capsys.readouterr().out
    assert out.count("usage: herbarium COMMAND") == 2


def test_dispatch_passes_the_remaining_arguments_and_exit_code(monkeypatch):
    seen = []
    monkeypatch.setattr("herbarium.stats.main", lambda argv: seen.append(argv))
    assert cli.main(["collect-stats", "DATA", "--size", "32"]) == 0
    assert seen == [["DATA", "--size", "32"]]
    monkeypatch.setattr("herbarium.stats.main", lambda argv: 3)
    assert cli.main(["collect-stats"]) == 3


def test_python_dash_m(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["herbarium", "--help"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("herbarium", run_name="__main__")
    assert exit_.value.code == 0
    assert "collect-stats" in capsys.readouterr().out


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_every_command_module_has_a_main(command):
    module_name = cli.COMMANDS[command][0]
    if importlib.util.find_spec(module_name) is None:
        pytest.skip(f"{module_name} (for 'herbarium {command}') does not exist yet")
    assert callable(importlib.import_module(module_name).main)
