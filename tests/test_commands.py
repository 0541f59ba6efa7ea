"""What every command shares: exact flags with suggestions, ``--version`` without torch, progress bars only on a
terminal, ``--quiet``, and ``tta_eval.py``'s start-up and end summaries."""

from __future__ import annotations

import importlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from herbarium import __version__, cli
from herbarium.arguments import ArgumentParser
from herbarium.evaluation import cli as eval_cli
from herbarium.predict import expand_images
from herbarium.terminal import show_progress
from herbarium.train_cli import build_parser, parse_train_args

REPO = Path(__file__).resolve().parents[1]


def _python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO, env=env)


# ------------------------------------------------------------------ --version
@pytest.mark.parametrize(("script", "prog"), [("train.py", "train.py"), ("tta_eval.py", "tta_eval.py")])
def test_scripts_print_their_version_without_importing_torch(script, prog):
    done = _python("import runpy, sys\n"
                   f"sys.argv = [{script!r}, '--version']\n"
                   "try:\n"
                   f"    runpy.run_path({script!r}, run_name='__main__')\n"
                   "except SystemExit as stop:\n"
                   "    print('exit', stop.code, 'torch' in sys.modules)\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"{prog} (herbarium {__version__})", "exit 0 False"]


def test_herbarium_commands_print_their_version_without_importing_torch():
    done = _python("import sys\nfrom herbarium.cli import main\n"
                   "for argv in (['--version'], ['train', '--version'], ['predict', 'RUN', '--version']):\n"
                   "    try:\n"
                   "        main(argv)\n"
                   "    except SystemExit:\n"
                   "        pass\n"
                   "print('torch' in sys.modules)\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"herbarium {__version__}", f"herbarium train (herbarium {__version__})",
                                        f"herbarium predict (herbarium {__version__})", "False"]


def test_every_parser_has_version_and_no_prefix_matching(capsys):
    for parser in (build_parser(), eval_cli.build_parser()):
        assert parser.allow_abbrev is False
        with pytest.raises(SystemExit) as stop:
            parser.parse_args(["--version"])
        assert stop.value.code == 0
    assert capsys.readouterr().out.splitlines() == [f"train.py (herbarium {__version__})",
                                                    f"tta_eval.py (herbarium {__version__})"]


def test_every_command_module_builds_its_parser_with_the_shared_class():
    for module_name, _ in cli.COMMANDS.values():
        source = Path(importlib.import_module(module_name).__file__).read_text()
        assert "argparse.ArgumentParser(" not in source, module_name


# ------------------------------------------------------------ typos and prefixes
@pytest.mark.parametrize(("argv", "expected"), [
    (["--batchsize", "8"], "unrecognized arguments: --batchsize 8; --batchsize: did you mean --batch-size?"),
    (["--epoch", "3"], "unrecognized arguments: --epoch 3; --epoch: did you mean --epochs?"),  # no prefix matching
])
def test_a_misspelt_flag_is_one_line_with_a_suggestion(argv, expected, capsys):
    with pytest.raises(SystemExit) as stop:
        parse_train_args(build_parser(), ["DATA", *argv])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f"error: train.py: {expected} (see train.py --help)"]


def test_the_shared_parser_suggests_for_values_given_with_equals(capsys):
    parser = ArgumentParser(prog="x")
    parser.add_argument("--views")
    with pytest.raises(SystemExit):
        parser.parse_args(["--veiws=4"])
    assert "--veiws: did you mean --views?" in capsys.readouterr().err


def test_a_misspelt_command_gets_a_suggestion(capsys):
    assert cli.main(["predcit", "RUN"]) == 2
    assert "unknown command 'predcit'; did you mean 'herbarium predict'?" in capsys.readouterr().err


# ---------------------------------------------------------------- progress bars
class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bars_only_on_a_terminal_and_not_quiet():
    assert show_progress(False, _Terminal()) is True
    assert show_progress(True, _Terminal()) is False
    assert show_progress(False, io.StringIO()) is False  # a log file or a pipe


def test_predict_skips_hidden_files_and_folders(tmp_path):
    for name in ("a/1.jpg", "a/.ipynb_checkpoints/1-checkpoint.jpg", "a/.hidden.jpg", "a/b/2.png", "a/.git/x.jpg"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert expand_images([str(tmp_path / "a")]) == [tmp_path / "a/1.jpg", tmp_path / "a/b/2.png"]


# ----------------------------------------------------------------- tta_eval.py
def test_tta_eval_prints_start_up_and_end_summaries_and_labels_its_bars(tiny_run, tmp_path, capsys, monkeypatch):
    data, run_dir = tiny_run
    monkeypatch.setattr("herbarium.evaluation.runner.show_progress", lambda quiet=False: not quiet)  # as on a terminal
    argv = [str(run_dir), "--data", str(data), "--split", "test", "--views", "plain,flip", "--workers", "0",
            "--device", "cpu", "--batch-size", "8", "--out", str(tmp_path / "eval")]
    assert eval_cli.main(argv) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "evaluate: model" in out and f"{run_dir / 'checkpoints' / 'last.pt'}: resnet10t" in out
    assert f"data: {data}, split 'test'" in out and "labelled: metrics and report" in out
    assert "views: 2 (plain,flip), logits averaged" in out
    assert "submission.csv: tta_consistent unless the run's validation split clearly prefers another variant" in out
    assert f"submission: {tmp_path / 'eval' / 'submission.csv'} (variant " in out
    assert "* " in out  # the headline variant is marked among the scores
    assert "evaluate test" in captured.err and "headline variant on" in captured.err  # two bars, each named

    assert eval_cli.main([*argv, "--quiet"]) == 0
    quiet = capsys.readouterr()
    assert "evaluate test" not in quiet.err and "evaluate: model" in quiet.out and "submission: " in quiet.out
