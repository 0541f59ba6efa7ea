#!/usr/bin/env python
"""The stock baseline: the plain timm + torchvision script a competent user writes in an afternoon.

    python bench/stock.py --data DATA --train-split train_lt --loss la --out bench/results/stock_la

It shares nothing with herbarium's training code: its own dataset, loop,
optimizer and schedule, on purpose, so that a weak library default can never
weaken it. Only the metadata reader (which images, which labels) and the
scoring functions come from herbarium, so both sides read and score the same
images the same way. The recipe, fixed:

* ``tf_efficientnet_lite0`` with the packaged ImageNet weights, its classifier
  reset to the finest rank; inputs normalised with the weights' own mean/std.
* train: ``RandomResizedCrop(size, scale=(0.25, 1))`` + horizontal flip;
  eval: ``Resize(int(size * 1.14))`` + ``CenterCrop(size)``, one view.
* AdamW (lr 1e-3, weight decay 0.05), batch 64 with drop_last (as timm's
  train.py; herbarium's trainer drops the short last batch too), a linear
  warm-up over the first 5% of steps then a cosine to 0, bf16 autocast on
  CUDA. The batch size is a budget setting: a comparison gives every arm the
  same one, so every arm takes the same number of optimizer steps.
* every image of the training split, the last epoch scored (no selection).
* ``ce``: cross-entropy; ``la``: logit-adjusted cross-entropy (+ tau * log
  prior in training only, tau 1, Menon et al. 2021).

Coarser ranks are scored by mapping the finest prediction up the taxonomy.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from herbarium.data.readers import DatasetSplit, read_split
from herbarium.evaluation.metrics import macro_f1
from herbarium.models.pretrained import load_efficientnet_lite_imagenet
from herbarium.taxonomy import DEFAULT_RANKS, Taxonomy

STOCK_LOSSES = ("ce", "la")
WEIGHTS_MEAN = WEIGHTS_STD = (0.5, 0.5, 0.5)  # what the packaged EfficientNet-Lite weights were trained with


@dataclass(frozen=True)
class StockRecipe:
    """Every setting of the stock script (the one source of its defaults)."""

    size: int = 128
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    crop_scale: tuple[float, float] = (0.25, 1.0)
    eval_resize: float = 1.14
    tau: float = 1.0
    loss: str = "ce"
    seed: int = 0
    workers: int = 2


class FolderSplit(Dataset):
    """(image, finest-rank class) pairs of one split, decoded with PIL."""

    def __init__(self, split: DatasetSplit, transform: T.Compose) -> None:
        finest = split.taxonomy.finest
        self.paths = [split.path(sample) for sample in split.samples]
        self.labels = [split.taxonomy.targets(sample.category_id, [finest])[finest] for sample in split.samples]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        with Image.open(self.paths[index]) as image:
            return self.transform(image.convert("RGB")), self.labels[index]


def train_transform(recipe: StockRecipe) -> T.Compose:
    return T.Compose([T.RandomResizedCrop(recipe.size, scale=recipe.crop_scale), T.RandomHorizontalFlip(),
                      T.ToTensor(), T.Normalize(WEIGHTS_MEAN, WEIGHTS_STD)])


def eval_transform(recipe: StockRecipe) -> T.Compose:
    return T.Compose([T.Resize(int(recipe.size * recipe.eval_resize)), T.CenterCrop(recipe.size),
                      T.ToTensor(), T.Normalize(WEIGHTS_MEAN, WEIGHTS_STD)])


def build_model(num_classes: int) -> nn.Module:
    """``tf_efficientnet_lite0`` with the packaged ImageNet weights and a fresh classifier."""
    model = load_efficientnet_lite_imagenet(0)
    model.reset_classifier(num_classes)
    return model


def warmup_cosine_lr(step: int, total_steps: int, warmup_steps: int) -> float:
    """LR factor: linear warm-up to 1 over ``warmup_steps``, then a cosine to 0 at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def log_prior(labels: Sequence[int], num_classes: int) -> torch.Tensor:
    """log of the training class frequencies [C] (a class with no image counts as one)."""
    counts = np.bincount(np.asarray(labels), minlength=num_classes).clip(min=1).astype(np.float64)
    return torch.from_numpy(np.log(counts / counts.sum())).float()


def training_loss(logits: torch.Tensor, labels: torch.Tensor, adjustment: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy, on ``logits + adjustment`` for the logit-adjusted variant."""
    return F.cross_entropy(logits if adjustment is None else logits + adjustment, labels)


def fit(model: nn.Module, loader: DataLoader, recipe: StockRecipe, adjustment: torch.Tensor | None,
        device: torch.device) -> int:
    """Train ``model`` in place; returns the number of optimizer steps taken."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    total_steps = recipe.epochs * len(loader)
    warmup_steps = max(1, round(recipe.warmup_fraction * total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine_lr(step, total_steps, warmup_steps))
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    for epoch in range(recipe.epochs):
        model.train()
        started, losses = time.perf_counter(), []
        for images, labels in loader:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with amp:
                logits = model(images)
            loss = training_loss(logits.float(), labels, adjustment)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.detach())
        print(f"epoch {epoch + 1}/{recipe.epochs} loss {float(torch.stack(losses).mean()):.4f} "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
    return total_steps


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """(finest-rank predictions [N], top-5 classes [N, 5]) in the loader's order."""
    model.eval()
    predictions, top = [], []
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    for images, _ in loader:
        with amp:
            logits = model(images.to(device)).float()
        top.append(logits.topk(min(5, logits.shape[1]), dim=1).indices.cpu())
        predictions.append(logits.argmax(dim=1).cpu())
    return torch.cat(predictions).numpy(), torch.cat(top).numpy()


def predictions_by_rank(finest_predictions: np.ndarray, taxonomy: Taxonomy) -> dict[str, np.ndarray]:
    """The finest prediction and its ancestors at every coarser rank."""
    finest = taxonomy.finest
    return {rank: taxonomy.ancestor_map(finest, rank).numpy()[finest_predictions] for rank in taxonomy.ranks}


def run_stock(data: str, train_split: str, test_split: str, recipe: StockRecipe, ranks: Sequence[str] = DEFAULT_RANKS,
              device: str = "auto") -> dict[str, object]:
    """Train the stock recipe on ``train_split`` and predict ``test_split``.

    Returns the taxonomy, the test split, predictions per rank, the finest
    rank's top-5 and the training counts per rank (for the shot groups).
    """
    torch.manual_seed(recipe.seed)
    np.random.seed(recipe.seed)
    target = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    train = read_split(data, train_split, ranks)
    test = read_split(data, test_split, ranks, taxonomy=train.taxonomy)
    taxonomy = train.taxonomy
    train_images = FolderSplit(train, train_transform(recipe))
    loader = DataLoader(train_images, batch_size=recipe.batch_size, shuffle=True, drop_last=len(train_images) > recipe.batch_size,
                        num_workers=recipe.workers, pin_memory=target.type == "cuda", persistent_workers=recipe.workers > 0)
    model = build_model(taxonomy.num_classes(taxonomy.finest)).to(target)
    adjustment = (recipe.tau * log_prior(train_images.labels, taxonomy.num_classes(taxonomy.finest))).to(target) \
        if recipe.loss == "la" else None
    started = time.perf_counter()
    optimizer_steps = fit(model, loader, recipe, adjustment, target)
    train_seconds = time.perf_counter() - started
    test_loader = DataLoader(FolderSplit(test, eval_transform(recipe)), batch_size=256, num_workers=recipe.workers)
    started = time.perf_counter()
    finest_predictions, finest_top = predict(model, test_loader, target)
    return {
        "taxonomy": taxonomy, "test": test, "predictions": predictions_by_rank(finest_predictions, taxonomy),
        "top": {taxonomy.finest: finest_top},
        "train_counts": {rank: taxonomy.counts(train.category_ids(), rank) for rank in taxonomy.ranks},
        "seconds": {"train": train_seconds, "evaluate": time.perf_counter() - started},
        "optimizer_steps": optimizer_steps,
    }


def build_parser() -> argparse.ArgumentParser:
    R = StockRecipe()
    parser = argparse.ArgumentParser(prog="bench/stock.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="dataset folder with a training and a labelled test split")
    parser.add_argument("--train-split", default="train", help="training split (default: train)")
    parser.add_argument("--test-split", default="test", help="scored split (default: test)")
    parser.add_argument("--loss", choices=STOCK_LOSSES, default=R.loss, help=f"ce or la (default: {R.loss})")
    parser.add_argument("--size", type=int, default=R.size, help=f"input side (default: {R.size})")
    parser.add_argument("--epochs", type=int, default=R.epochs, help=f"epochs (default: {R.epochs})")
    parser.add_argument("--seed", type=int, default=R.seed, help=f"seed (default: {R.seed})")
    parser.add_argument("--batch-size", type=int, default=R.batch_size, help=f"images per step (default: {R.batch_size})")
    parser.add_argument("--workers", type=int, default=R.workers, help=f"loader processes (default: {R.workers})")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    parser.add_argument("--out", default=None, help="JSON file for the scores and the per-image predictions (default: none)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    recipe = StockRecipe(size=args.size, epochs=args.epochs, loss=args.loss, seed=args.seed, workers=args.workers,
                         batch_size=args.batch_size)
    result = run_stock(args.data, args.train_split, args.test_split, recipe, device=args.device)
    taxonomy, test = result["taxonomy"], result["test"]
    truth = {rank: np.array([taxonomy.targets(s.category_id, [rank])[rank] for s in test.samples]) for rank in taxonomy.ranks}
    scores = {rank: macro_f1(truth[rank], result["predictions"][rank]) for rank in reversed(taxonomy.ranks)}
    for rank, score in scores.items():
        print(f"{rank}: macro-F1 {score:.4f}")
    if args.out:
        ids = [str(sample.image_id) for sample in test.samples]
        Path(args.out).write_text(json.dumps({
            "macro_f1": scores, "recipe": asdict(recipe),
            "predictions": {rank: dict(zip(ids, map(int, result["predictions"][rank]))) for rank in taxonomy.ranks},
            "truth": {rank: dict(zip(ids, map(int, truth[rank]))) for rank in taxonomy.ranks},
        }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
