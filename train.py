#!/usr/bin/env python
"""Train a shared trunk with one head per taxonomic rank.

    python train.py DATA --levels species,genus,family --out runs/demo
    torchrun --nproc-per-node 8 train.py DATA ...      # several GPUs
"""
from herbarium.train_cli import main

if __name__ == "__main__":
    raise SystemExit(main())
