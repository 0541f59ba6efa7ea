#!/usr/bin/env python
"""Train a shared trunk with one head per taxonomic rank.

    python train.py DATA --levels species,genus,family --out runs/demo
    torchrun --nproc-per-node 8 train.py DATA ...      # several GPUs
"""
import sys

from herbarium.arguments import exit_if_version

if __name__ == "__main__":
    exit_if_version("train.py", sys.argv[1:])
    from herbarium.train_cli import main  # after --version: the trainer loads torch, which takes seconds

    raise SystemExit(main())
