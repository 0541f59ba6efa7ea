"""k-fold training stratified by species, with out-of-fold predictions.

``herbarium kfold DATA --folds 5 --out RUN [train options]`` splits the
training split into k folds with scikit-learn's ``StratifiedKFold`` on the
category (species) ids, then trains ``RUN/fold_<k>`` on the other folds with
fold k as its validation split (``DataConfig.holdout_ids``), and finally
predicts every fold with the model that did not see it:
``RUN/oof_predictions.csv``. The fold models ensemble with
``tta_eval.py RUN/fold_0 RUN/fold_1 ...`` (add ``--class-weighted-ensemble``
for per-class weights from each fold's own validation accuracy).

Classes with fewer images than folds cannot be stratified: whichever fold
held one of their images out would train without (almost) any example of
them. Their images are kept in the training part of *every* fold, marked
fold -1 in ``folds.csv``, and get no out-of-fold prediction. (scikit-learn
would split them anyway, with a warning.)

A fold whose ``last.pt`` has reached the configured epochs is not trained
again, and an interrupted fold is resumed, so an interrupted k-fold run
continues where it stopped when the same command is run again.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import StratifiedKFold

from herbarium.arguments import ArgumentParser
from herbarium.checkpoint import load_checkpoint
from herbarium.config import TrainConfig
from herbarium.data.readers import DatasetSplit, read_split
from herbarium.engine import train
from herbarium.errors import command
from herbarium.evaluation.runner import EvaluationSettings, build_view_loader, load_run, model_outputs
from herbarium.evaluation.tta import parse_views
from herbarium.run_dir import RunDir
from herbarium.runtime import autocast_dtype, resolve_device
from herbarium.train_cli import add_train_arguments, config_from_args, parse_train_args

UNFOLDED = -1


def fold_assignments(labels: Sequence[Any], folds: int, seed: int = 0) -> np.ndarray:
    """The fold of each sample [N] (0..folds-1), stratified by label; -1 for classes with fewer than ``folds`` samples.

    The assignment is a pure function of ``(labels, folds, seed)``.
    """
    if folds < 2:
        raise ValueError(f"k-fold needs at least 2 folds, got {folds}")
    if any(label is None for label in labels):
        raise ValueError("k-fold needs a label for every training image; some have none")
    keys = np.asarray([str(label) for label in labels])
    counts = pd.Series(keys).value_counts()
    foldable = np.flatnonzero(counts.reindex(keys).to_numpy() >= folds)
    if len(foldable) == 0:
        raise ValueError(f"no class has {folds} images or more; use fewer folds (largest class: {counts.max()} images)")
    assignment = np.full(len(keys), UNFOLDED, dtype=np.int64)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for fold, (_, held) in enumerate(splitter.split(np.zeros(len(foldable)), keys[foldable])):
        assignment[foldable[held]] = fold
    return assignment


def write_ids(path: Path, image_ids: Sequence[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"image_id": list(image_ids)}).to_csv(path, index=False)
    return path


def fold_config(cfg: TrainConfig, run_dir: Path, fold: int, held_ids: Sequence[Any]) -> TrainConfig:
    """The config of fold ``fold``: its own run folder, with its held-out images as the validation split."""
    fold_dir = run_dir / f"fold_{fold}"
    ids_file = write_ids(fold_dir / "holdout_ids.csv", held_ids)
    return dataclasses.replace(cfg, out=str(fold_dir), data=dataclasses.replace(cfg.data, holdout_ids=str(ids_file)))


def train_fold(cfg: TrainConfig, overwrite: bool = False) -> None:
    """Train one fold; skip it when its last checkpoint is complete, resume it when it is not."""
    last = RunDir(cfg.out).last
    if last.is_file() and not overwrite:
        if load_checkpoint(last)["run"]["epoch"] >= cfg.epochs:
            print(f"{cfg.out}: already trained for {cfg.epochs} epochs, kept")
            return
        train(cfg, resume=cfg.out)
        return
    train(cfg, overwrite=overwrite)


def check_kfold_config(cfg: TrainConfig, taxonomy_finest: str) -> None:
    if cfg.data.val_split or cfg.data.holdout_ids:
        raise ValueError("each fold is validated on its held-out fold; drop --val-split / --holdout-ids")
    if cfg.data.subset:
        raise ValueError("k-fold splits the whole training split; --subset does not apply")
    if taxonomy_finest not in cfg.loss.levels:
        raise ValueError(f"out-of-fold predictions need a head at the finest rank {taxonomy_finest!r}; add it to --levels")


def out_of_fold_predictions(run_dir: Path, split: DatasetSplit, assignment: np.ndarray, views: Sequence[str] = ("plain", "flip"),
                            device: str = "auto", batch_size: int = 64, workers: int | None = None) -> pd.DataFrame:
    """Predict each fold's held-out images with that fold's model (its run folder's checkpoint, last.pt), at the finest rank.

    Columns: image_id, fold, label and predicted (category ids), probability
    (of the predicted class), label_probability, label_name, predicted_name.
    """
    torch_device = resolve_device(device)
    settings = EvaluationSettings(views=tuple(views), batch_size=batch_size, workers=workers, device=device)
    taxonomy = split.taxonomy
    finest = taxonomy.finest
    column = taxonomy.ranks.index(finest)
    frames = []
    for fold in sorted(set(assignment.tolist()) - {UNFOLDED}):
        loaded = load_run(run_dir / f"fold_{fold}", torch_device)
        held = dataclasses.replace(split, samples=[s for s, f in zip(split.samples, assignment) if f == fold])
        loader = build_view_loader(held, taxonomy, [loaded], settings, torch_device)
        dtype = autocast_dtype(settings.precision, torch_device)
        rows: dict[str, list] = {"index": [], "label": [], "predicted": [], "probability": [], "label_probability": []}
        with torch.inference_mode():
            for batch in loader:
                if "views" not in batch:
                    continue
                tta, _, _ = model_outputs(loaded, batch["views"][0], settings.average, None, torch_device, dtype)
                probabilities = tta[finest].exp().cpu()  # [B, C]
                labels = batch["targets"][:, column]  # [B]
                top_probability, predicted = probabilities.max(dim=1)
                rows["index"] += batch["index"].tolist()
                rows["label"] += labels.tolist()
                rows["predicted"] += predicted.tolist()
                rows["probability"] += top_probability.tolist()
                rows["label_probability"] += probabilities.gather(1, labels.clamp_min(0)[:, None]).squeeze(1).tolist()
        frame = pd.DataFrame(rows)
        frame.insert(0, "image_id", [held.samples[i].image_id for i in frame.pop("index")])
        frame.insert(1, "fold", fold)
        frames.append(frame)
    table = pd.concat(frames, ignore_index=True)
    names = taxonomy.names[finest]
    table["label_name"] = [names[i] for i in table["label"]]
    table["predicted_name"] = [names[i] for i in table["predicted"]]
    table["label"] = [taxonomy.category_ids[i] for i in table["label"]]
    table["predicted"] = [taxonomy.category_ids[i] for i in table["predicted"]]
    return table


def run_kfold(cfg: TrainConfig, folds: int, overwrite: bool = False, oof_views: Sequence[str] = ("plain", "flip")) -> pd.DataFrame:
    """Train every fold of ``cfg`` under ``cfg.out`` and return (and write) the out-of-fold predictions."""
    run_dir = Path(cfg.out)
    split = read_split(cfg.data.data, cfg.data.train_split, cfg.data.ranks)
    check_kfold_config(cfg, split.taxonomy.finest)
    assignment = fold_assignments(split.category_ids(), folds, cfg.seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    image_ids = [sample.image_id for sample in split.samples]
    pd.DataFrame({"image_id": image_ids, "category_id": split.category_ids(), "fold": assignment}).to_csv(run_dir / "folds.csv", index=False)
    for fold in range(folds):
        held_ids = [image_id for image_id, f in zip(image_ids, assignment) if f == fold]
        train_fold(fold_config(cfg, run_dir, fold, held_ids), overwrite)
    table = out_of_fold_predictions(run_dir, split, assignment, oof_views, cfg.device, cfg.data.batch_size, cfg.data.workers)
    table.to_csv(run_dir / "oof_predictions.csv", index=False)
    return table


def add_kfold_arguments(parser: argparse.ArgumentParser, default_folds: int) -> argparse.ArgumentParser:
    group = parser.add_argument_group("folds")
    group.add_argument("--folds", type=int, default=default_folds, help=f"number of folds, stratified by species (default: {default_folds})")
    group.add_argument("--oof-views", default="plain,flip", help="TTA views of the out-of-fold predictions (default: plain,flip)")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="herbarium kfold", description="Train k fold models (RUN/fold_<k>) stratified by species "
                                     "and write out-of-fold predictions (RUN/oof_predictions.csv).")
    return add_kfold_arguments(add_train_arguments(parser), default_folds=5)


@command
def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parse_train_args(parser, argv)
    if args.resume or args.resume_if_exists:
        parser.error("run the same kfold command again to continue it; --resume and --resume-if-exists are for single runs")
    table = run_kfold(config_from_args(args), args.folds, args.overwrite, parse_views(args.oof_views))
    accuracy = float((table["label"].astype(str) == table["predicted"].astype(str)).mean())
    print(f"wrote {Path(args.out) / 'oof_predictions.csv'}: {len(table)} out-of-fold predictions, top-1 {accuracy:.3f}")
    return 0
