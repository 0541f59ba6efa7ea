#!/usr/bin/env python
"""Evaluate runs or checkpoints with 4-view test-time augmentation and write a report.

    python tta_eval.py runs/demo --data DATA --split test
"""
import sys

from herbarium.arguments import exit_if_version

if __name__ == "__main__":
    exit_if_version("tta_eval.py", sys.argv[1:])
    from herbarium.evaluation.cli import main  # after --version: evaluation loads torch, which takes seconds

    raise SystemExit(main())
