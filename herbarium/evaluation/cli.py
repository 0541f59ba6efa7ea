"""The ``evaluate`` command line (``tta_eval.py``, ``herbarium evaluate``)."""

from __future__ import annotations

import argparse
from typing import Sequence

from herbarium.arguments import ArgumentParser
from herbarium.cli import prog
from herbarium.errors import Interrupted, command
from herbarium.evaluation.runner import evaluate
from herbarium.evaluation.settings import EvaluationSettings
from herbarium.evaluation.summary import end_lines
from herbarium.options import add_options, values_from_namespace

# The settings shown in each group of --help, by field; the test-time augmentation group shows every other one.
DATA_SETTINGS = ("batch_size", "workers", "skip_bad_images", "decode")
RETRIEVAL_SETTINGS = ("retrieval_gallery", "retrieval_mode", "retrieval_k", "retrieval_weight", "retrieval_levels",
                      "retrieval_scale")
OUTPUT_SETTINGS = ("shot_thresholds", "device", "precision", "quiet")


def build_parser() -> argparse.ArgumentParser:
    """Which runs and data to evaluate (written here), then one option per :class:`EvaluationSettings` field."""
    parser = ArgumentParser(prog=prog("tta_eval.py"), description="Test-time-augmentation evaluation of runs or checkpoints, "
                                     "with hierarchy-aware decoding, a report and a submission file.")
    parser.add_argument("runs", nargs="+", help="run directories (last.pt, else best.pt; best.pt first for an --early-stop run) or checkpoint files; several make an ensemble")
    data = parser.add_argument_group("data")
    data.add_argument("--data", required=True, help="dataset folder")
    data.add_argument("--split", default="test", help="split to evaluate (default: test)")
    data.add_argument("--labels", default=None, help="image_id,category_id CSV for a split whose metadata has no labels (default: the split's labels.csv if present)")
    add_options(data, EvaluationSettings, only=DATA_SETTINGS)
    add_options(parser.add_argument_group("test-time augmentation and ensembling"), EvaluationSettings,
                skip=(*DATA_SETTINGS, *RETRIEVAL_SETTINGS, *OUTPUT_SETTINGS))
    add_options(parser.add_argument_group("retrieval (classify by cosine similarity to a labelled gallery)"),
                EvaluationSettings, only=RETRIEVAL_SETTINGS)
    out = parser.add_argument_group("output and device")
    out.add_argument("--out", default=None, help="output folder (default: RUN/eval/SPLIT)")
    add_options(out, EvaluationSettings, only=OUTPUT_SETTINGS)
    return parser


def settings_from_args(args: argparse.Namespace) -> EvaluationSettings:
    return values_from_namespace(EvaluationSettings, args)


@command
def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ValueError as error:
        parser.error(str(error))
    try:
        result = evaluate(args.runs, args.data, args.split, args.labels, args.out, settings)
    except KeyboardInterrupt:
        raise Interrupted("interrupted; nothing was written (the output folder is as it was)") from None
    print("\n".join(end_lines(result)))
    return 0
