"""``herbarium`` command: one subcommand per job, each delegating to its module's ``main``."""

from __future__ import annotations

import importlib
import sys
from typing import Sequence

from herbarium import __version__
from herbarium.arguments import did_you_mean, exit_if_version

# subcommand -> (module with main(argv), one-line description)
COMMANDS: dict[str, tuple[str, str]] = {
    "make-demo-data": ("herbarium.demo", "write the synthetic demo dataset (Herbarium 2020 layout)"),
    "collect-stats": ("herbarium.stats", "exact mean/std and class counts of a split"),
    "train": ("herbarium.train_cli", "train a trunk with one head per rank"),
    "evaluate": ("herbarium.evaluation.cli", "TTA evaluation, report and submission"),
    "swa": ("herbarium.swa", "average a run's checkpoints (SWA), BatchNorm statistics recomputed"),
    "rebalance": ("herbarium.rebalance", "re-balance a run's heads for its long tail (cRT or LWS) into a new run"),
    "kfold": ("herbarium.kfold", "k-fold training stratified by species, with out-of-fold predictions"),
    "clean-labels": ("herbarium.noisy.cleaning", "cross-prediction label cleaning: flagged.csv and a balanced kept.csv"),
    "inject-label-noise": ("herbarium.noisy.inject", "copy a dataset with a fraction of its training labels flipped"),
    "prepare": ("herbarium.prepare", "copy a dataset with images shrunk to --max-side, for a faster CPU input path"),
    "lr-find": ("herbarium.lr_find", "LR range test: loss against an exponentially raised learning rate"),
    "predict": ("herbarium.predict", "predict image files, folders or globs with a trained run into a CSV"),
    "export": ("herbarium.export", "export a run's model: weights-only safetensors, TorchScript or ONNX"),
}

# The program name of the command running now ("herbarium train"), for its --help and errors.
_running: str | None = None


def prog(default: str) -> str:
    """``herbarium COMMAND`` when the command was started through ``herbarium``, else ``default`` (``train.py``)."""
    return _running or default


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: herbarium COMMAND [ARGS...]", "       herbarium --version", "", "commands:"]
    lines += [f"  {name:<{width}}  {description}" for name, (_, description) in COMMANDS.items()]
    lines += ["", "Run 'herbarium COMMAND --help' for a command's options."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"herbarium {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        hint = did_you_mean(command, COMMANDS).replace("; did you mean ", "; did you mean 'herbarium ").replace("?", "'?")
        print(f"error: herbarium: unknown command {command!r}{hint}; choose one of {list(COMMANDS)}", file=sys.stderr)
        return 2
    exit_if_version(f"herbarium {command}", rest)  # before importing the command, which loads torch
    global _running
    module = importlib.import_module(COMMANDS[command][0])
    _running = f"herbarium {command}"
    try:
        return module.main(rest) or 0
    finally:
        _running = None


if __name__ == "__main__":
    raise SystemExit(main())
