"""Evaluate runs or checkpoints: TTA, ensembles, decoding, metrics, report and submission.

Models are rebuilt from the config saved with their run and loaded with
``weights_only=True``. Each batch is decoded once; every model sees all of
its views in one forward pass; only predictions and top-5 indices are kept,
so memory stays flat at 65k species.
"""

from __future__ import annotations

import datetime
import json
import platform
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from herbarium.checkpoint import load_checkpoint
from herbarium.config import TrainConfig
from herbarium.data.dataset import ImageDataset
from herbarium.data.readers import DatasetSplit, read_split
from herbarium.data.transforms import resize_size
from herbarium.engine import autocast, autocast_dtype, resolve_device
from herbarium.evaluation.combine import average_views, ensemble
from herbarium.evaluation.decoding import PathDecoder, independent_predictions, taxonomy_disagreement
from herbarium.evaluation.metrics import evaluate_predictions
from herbarium.evaluation.report import write_report
from herbarium.evaluation.submission import top_k_probabilities, write_predictions, write_submission
from herbarium.evaluation.tta import DEFAULT_VIEWS, InputProfile, MultiViewDataset, collate_views, plain_view_index
from herbarium.models import build_model
from herbarium.stats import default_workers
from herbarium.taxonomy import Taxonomy

TOP_K = 5


@dataclass
class LoadedModel:
    """A trained model with what is needed to feed it."""

    model: nn.Module
    config: TrainConfig
    taxonomy: Taxonomy
    profile: InputProfile
    train_counts: dict[str, list[int]]
    source: Path


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """(checkpoint file, run directory) for a run directory or a checkpoint path."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / "checkpoints" / name).is_file():
                return path / "checkpoints" / name, path
        raise FileNotFoundError(f"{path}: no checkpoints/best.pt or checkpoints/last.pt")
    return path, path.parent.parent


def load_run(path: str | Path, device: torch.device) -> LoadedModel:
    """Rebuild a run's model from its saved config and load its weights safely."""
    checkpoint_path, run_dir = resolve_checkpoint(path)
    state = load_checkpoint(checkpoint_path, map_location="cpu")
    config = TrainConfig.from_dict(state["config"])
    taxonomy = Taxonomy.from_dict(json.loads((run_dir / "taxonomy.json").read_text()))
    stats = json.loads((run_dir / "stats.json").read_text())
    model_config = replace(config.model, pretrained=False, weights=None)  # the checkpoint holds every weight
    model = build_model(model_config, {rank: int(n) for rank, n in state["classes"].items()})
    model.load_state_dict(state["model"])
    model.to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    profile = InputProfile(config.data.size, tuple(stats["mean"]), tuple(stats["std"]), config.data.augment)
    return LoadedModel(model, config, taxonomy, profile, stats.get("train_counts", {}), checkpoint_path)


def check_same_taxonomy(models: Sequence[LoadedModel]) -> Taxonomy:
    first = models[0]
    for other in models[1:]:
        if other.taxonomy.to_dict() != first.taxonomy.to_dict():
            raise ValueError(f"{other.source} was trained on another taxonomy than {first.source}; an ensemble needs the same classes")
    return first.taxonomy


@dataclass
class EvaluationSettings:
    views: tuple[str, ...] = DEFAULT_VIEWS
    average: str = "logits"
    model_weights: tuple[float, ...] | None = None
    rank_weights: dict[str, float] = field(default_factory=dict)
    batch_size: int = 32
    workers: int | None = None
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    shot_thresholds: tuple[int, int] | None = None  # None: (20, 100), scaled down for small training sets
    primary: str = "tta_consistent"
    skip_bad_images: bool = False


class PredictionStore:
    """Per variant and rank: predicted class [N], top-k classes and their probabilities [N, k].

    Probabilities are the softmax of the variant's scores (for consistent
    decoding, of the best path score through each class).
    """

    def __init__(self) -> None:
        self.predictions: dict[str, dict[str, list[torch.Tensor]]] = {}
        self.top: dict[str, dict[str, list[torch.Tensor]]] = {}
        self.top_probabilities: dict[str, dict[str, list[torch.Tensor]]] = {}

    def add(self, variant: str, predictions: dict[str, torch.Tensor], scores: dict[str, torch.Tensor]) -> None:
        for rank, predicted in predictions.items():
            self.predictions.setdefault(variant, {}).setdefault(rank, []).append(predicted.cpu())
        for rank, rank_scores in scores.items():
            probabilities, indices = top_k_probabilities(rank_scores, min(TOP_K, rank_scores.shape[1]))
            self.top.setdefault(variant, {}).setdefault(rank, []).append(indices.cpu())
            self.top_probabilities.setdefault(variant, {}).setdefault(rank, []).append(probabilities.cpu())

    def finish(self) -> dict[str, dict[str, dict[str, np.ndarray]]]:
        cat = lambda table: {v: {r: torch.cat(parts).numpy() for r, parts in ranks.items()} for v, ranks in table.items()}
        return {"predictions": cat(self.predictions), "top": cat(self.top), "top_probabilities": cat(self.top_probabilities)}


def model_scores(loaded: LoadedModel, views: torch.Tensor, average: str, plain: int | None, device: torch.device,
                 dtype: torch.dtype | None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """(TTA-averaged log-probs, plain-view log-probs) per rank for one batch of views [B, V, 3, H, W]."""
    batch, num_views = views.shape[:2]
    images = views.flatten(0, 1).to(device, non_blocking=True)  # [B*V, 3, H, W]
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    with autocast(device, dtype):
        logits = loaded.model(images)
    per_view = {rank: value.float().view(batch, num_views, -1).transpose(0, 1) for rank, value in logits.items()}  # [V, B, C]
    tta = {rank: average_views(value, average) for rank, value in per_view.items()}
    single = None if plain is None else {rank: torch.log_softmax(value[plain], dim=1) for rank, value in per_view.items()}
    return tta, single


def build_view_loader(split: DatasetSplit, taxonomy: Taxonomy, models: Sequence[LoadedModel], settings: EvaluationSettings,
                      pin_memory: bool) -> DataLoader:
    profiles = list(dict.fromkeys(m.profile for m in models))
    largest = max(resize_size(p.size) for p in profiles)
    images = ImageDataset(split, taxonomy.ranks, transform=lambda image: image, decode_min_side=largest,
                          skip_bad_images=settings.skip_bad_images)
    dataset = MultiViewDataset(images, settings.views, profiles, settings.seed)
    workers = default_workers() if settings.workers is None else settings.workers
    return DataLoader(dataset, batch_size=settings.batch_size, num_workers=workers, collate_fn=collate_views,
                      pin_memory=pin_memory, persistent_workers=False, prefetch_factor=4 if workers else None)


def predict(models: Sequence[LoadedModel], loader: DataLoader, taxonomy: Taxonomy, settings: EvaluationSettings,
            device: torch.device) -> dict[str, Any]:
    """Run every model over every view; keep each variant's predictions and top-k."""
    dtype = autocast_dtype(settings.precision, device)
    profiles = list(dict.fromkeys(m.profile for m in models))
    plain = plain_view_index(settings.views)
    decoder = PathDecoder(taxonomy, settings.rank_weights or None)
    store, indices, targets, skipped = PredictionStore(), [], [], 0
    disagreement = {"tta_heads": [], "single_view_heads": []}
    started, images_done = time.perf_counter(), 0
    with torch.inference_mode():
        for batch in tqdm(loader, desc="evaluate", unit="batch", leave=False, dynamic_ncols=True):
            skipped += batch["skipped"]
            if "views" not in batch:
                continue
            tta_parts, single_parts = [], []
            for loaded in models:
                tta, single = model_scores(loaded, batch["views"][profiles.index(loaded.profile)], settings.average, plain, device, dtype)
                tta_parts.append(tta)
                single_parts.append(single)
            variants = {"tta": ensemble(tta_parts, settings.model_weights, settings.average)}
            if plain is not None and len(settings.views) > 1:
                variants["single_view"] = ensemble(single_parts, settings.model_weights, settings.average)
            for name, scores in variants.items():
                heads = independent_predictions(scores)
                store.add(f"{name}_heads", heads, scores)
                store.add(f"{name}_consistent", decoder.predictions(scores), decoder.rank_scores(scores))
                disagreement[f"{name}_heads"].append(float(taxonomy_disagreement(heads, taxonomy)) * len(batch["index"]))
            indices.append(batch["index"])
            targets.append(batch["targets"])
            images_done += len(batch["index"])
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return {
        "index": torch.cat(indices).numpy(), "targets": torch.cat(targets).numpy(), **store.finish(), "skipped": skipped,
        "disagreement": {k: sum(v) / max(images_done, 1) for k, v in disagreement.items() if v},
        "images_per_s": images_done / seconds if seconds > 0 else None, "seconds": seconds,
    }


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {default_workers()} cores, {torch.get_num_threads()} threads)"


def score_variants(outputs: dict[str, Any], taxonomy: Taxonomy, train_counts: dict[str, list[int]],
                   thresholds: tuple[int, int] | None) -> dict[str, dict[str, Any]]:
    """Metrics of every variant on the labelled images, per rank."""
    targets = outputs["targets"]  # [N, num_ranks], all taxonomy ranks, -1 = unlabelled
    labelled = (targets >= 0).all(axis=1)
    y_true = {rank: targets[labelled, i] for i, rank in enumerate(taxonomy.ranks)}
    variants = {}
    for variant, predictions in outputs["predictions"].items():
        variants[variant] = evaluate_predictions(
            y_true, {rank: p[labelled] for rank, p in predictions.items()},
            {rank: t[labelled] for rank, t in outputs["top"][variant].items()},
            taxonomy, {rank: np.asarray(c) for rank, c in train_counts.items()} or None, thresholds,
        )
    return variants


def evaluate(checkpoints: Sequence[str | Path], data: str | Path, split: str = "test", labels: str | Path | None = None,
             out: str | Path | None = None, settings: EvaluationSettings = EvaluationSettings()) -> dict[str, Any]:
    """Evaluate one model or an ensemble on a split; write metrics, report, predictions and submission."""
    device = resolve_device(settings.device)
    models = [load_run(path, device) for path in checkpoints]
    taxonomy = check_same_taxonomy(models)
    first = models[0]
    split_data = read_split(data, split, first.config.data.ranks, taxonomy=taxonomy, labels=labels)
    loader = build_view_loader(split_data, taxonomy, models, settings, pin_memory=device.type == "cuda")
    outputs = predict(models, loader, taxonomy, settings, device)
    out_dir = Path(out) if out else resolve_checkpoint(checkpoints[0])[1] / "eval" / split
    out_dir.mkdir(parents=True, exist_ok=True)

    image_ids = [split_data.samples[i].image_id for i in outputs["index"]]
    primary = settings.primary if settings.primary in outputs["predictions"] else "tta_consistent"
    finest = taxonomy.finest
    write_submission(out_dir / "submission.csv", image_ids, outputs["predictions"][primary][finest], taxonomy)
    write_predictions(out_dir / "predictions.csv", image_ids, outputs["predictions"][primary],
                      outputs["top"][primary][finest], outputs["top_probabilities"][primary][finest], taxonomy)

    metrics: dict[str, Any] = {
        "throughput": {"images_per_s": outputs["images_per_s"], "hardware": hardware(device), "views": len(settings.views),
                       "batch_size": settings.batch_size, "models": len(models), "seconds": outputs["seconds"]},
        "taxonomy_disagreement": outputs["disagreement"],
        "skipped_bad_images": outputs["skipped"],
    }
    if (outputs["targets"] >= 0).all(axis=1).any():
        metrics["variants"] = score_variants(outputs, taxonomy, first.train_counts, settings.shot_thresholds)
        metrics["primary"] = primary
        metrics["baseline"] = "single_view_heads" if "single_view_heads" in metrics["variants"] else "tta_heads"
    context = {
        "checkpoints": [str(m.source) for m in models], "data": str(data), "split": split, "images": len(outputs["index"]),
        "tta_views": list(settings.views), "averaging": settings.average, "model_weights": settings.model_weights,
        "consistent_rank_weights": settings.rank_weights or "1 per rank",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    title = f"herbarium evaluation: {split}"
    paths = write_report(metrics, out_dir, title, context)
    return {"out_dir": out_dir, "metrics": metrics, "paths": paths}
