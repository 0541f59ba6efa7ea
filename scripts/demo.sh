#!/usr/bin/env bash
# The whole job on the built-in demo data: set up, make data, collect stats,
# train species/genus/family heads, evaluate with 4-view TTA and write a report,
# predict on the test images as plain files and export the model.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh
herbarium make-demo-data demo_data --overwrite
collect-stats demo_data --size 64
python train.py demo_data --levels species,genus,family --trunk resnet10t --no-pretrained --size 64 \
    --epochs 15 --batch-size 32 --optim adam@2e-3:0 --schedule cosine --out runs/demo --overwrite
python tta_eval.py runs/demo --data demo_data --split test
herbarium predict runs/demo demo_data/test/images --out runs/demo/predictions_test_images.csv --quiet
herbarium export runs/demo --format safetensors,torchscript
echo "Open runs/demo/eval/test/report.html for the report; TensorBoard: tensorboard --logdir runs/demo/tb"
echo "Predictions on the test images as plain files: runs/demo/predictions_test_images.csv; exported model: runs/demo/export/"
