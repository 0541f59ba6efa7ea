#!/usr/bin/env python
"""Evaluate runs or checkpoints with 4-view test-time augmentation and write a report.

    python tta_eval.py runs/demo --data DATA --split test
"""
from herbarium.evaluation.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
