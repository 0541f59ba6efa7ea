#!/usr/bin/env bash
# The whole accuracy comparison of BENCHMARKS.md in one command: grocery-store-128, lite0 pretrained,
# 128 px, 30 epochs, batch 64 for every arm, seeds 0,1,2 (SEEDS=0 for one), every arm, on train_lt and
# train (validated on val) and on train_lt with no validation split; OUT/<split>/seeds.md holds mean ± sd.
# About 40 minutes on one H200 by the per-arm times measured there (train_lt: stock 0.5 min, herbarium about
# 1-1.4 min per seed); SEEDS=0 takes a third. On a CPU pass a smaller proxy budget, e.g.
#   bash bench/accuracy_suite.sh DATA OUT --size 64 --epochs 10 --device cpu
# Usage: bash bench/accuracy_suite.sh DATA [OUT] [bench/accuracy.py options...]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DATA=${1:?usage: bash bench/accuracy_suite.sh DATA [OUT] [options...]}
OUT=${2:-bench/results/accuracy_suite}
shift $(( $# >= 2 ? 2 : 1 ))
set -- --seeds "${SEEDS:-0,1,2}" "$@"
python bench/accuracy.py --data "$DATA" --train-split train_lt --val-split val --out "$OUT/train_lt" "$@"
python bench/accuracy.py --data "$DATA" --train-split train --val-split val --out "$OUT/train" "$@"
python bench/accuracy.py --data "$DATA" --train-split train_lt --val-split none --out "$OUT/train_lt_noval" \
    --only stock_la,herbarium "$@"
