"""Evaluate runs or checkpoints: TTA, ensembles, decoding, metrics, report and submission.

Models are rebuilt from the config saved with their run and loaded with
``weights_only=True``. Each batch is decoded once; every model sees all of
its views in one forward pass; only predictions and top-5 indices are kept,
so memory stays flat at 65k species.
"""

from __future__ import annotations

import datetime
import platform
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from herbarium.atomic import staged_folder
from herbarium.checkpoint import load_checkpoint
from herbarium.config import TrainConfig
from herbarium.data.dataset import ImageDataset
from herbarium.data.gpu import BytesDataset, GpuViewLoader, loader_workers, select_decode
from herbarium.data.images import BadImageError
from herbarium.data.readers import DatasetSplit, read_split
from herbarium.data.splits import read_train_val
from herbarium.errors import UsageError
from herbarium.evaluation.combine import (
    average_views, class_weighted_ensemble, class_weights_from_accuracy, ensemble, per_class_accuracy,
)
from herbarium.evaluation.decoding import PathDecoder, hybrid_decoding, independent_predictions
from herbarium.evaluation.metrics import evaluate_predictions, macro_f1, macro_f1_interval, paired_bootstrap
from herbarium.evaluation.posthoc import (
    AUTO, TAU_GRID, TauChoice, adjust_logits, choose_tau, fixed_tau, no_validation_tau, tau_offsets, training_counts,
)
from herbarium.evaluation.report import write_report
from herbarium.evaluation.settings import FALLBACK_PRIMARY, EvaluationSettings
from herbarium.evaluation.submission import top_k_probabilities, write_predictions, write_submission
from herbarium.evaluation.summary import startup_lines
from herbarium.evaluation.tta import (
    InputProfile, MultiViewDataset, collate_views, plain_view_index, view_decode_side, view_transform,
)
from herbarium.retrieval import (
    Gallery, embed, gallery_placement, mix_log_probs, normalised_view_mean, retrieval_log_probs,
)
from herbarium.run_dir import check_checkpoint_classes, locate_checkpoint, model_from_checkpoint
from herbarium.runtime import autocast, autocast_dtype, default_workers, resolve_device
from herbarium.taxonomy import Taxonomy
from herbarium.terminal import show_progress

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
    epoch: int | None = None  # epochs trained when the checkpoint was written


def load_run(path: str | Path, device: torch.device) -> LoadedModel:
    """A run's (or checkpoint's) model, rebuilt from its saved config with its weights loaded safely, in eval mode."""
    checkpoint_path, run = locate_checkpoint(path)
    state = load_checkpoint(checkpoint_path, map_location="cpu")
    taxonomy = run.read_taxonomy()
    check_checkpoint_classes(state, checkpoint_path, run, taxonomy)
    model, config = model_from_checkpoint(state)
    model.to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    normalization = run.read_normalization()
    profile = InputProfile(config.data.size, tuple(normalization["mean"]), tuple(normalization["std"]), config.data.augment)
    return LoadedModel(model, config, taxonomy, profile, normalization.get("train_counts", {}), checkpoint_path,
                       state.get("run", {}).get("epoch"))


def with_training_counts(loaded: LoadedModel) -> LoadedModel:
    """``loaded`` with its training counts at every rank with a head, counted again where the run did not record them."""
    counts = training_counts(loaded.train_counts, loaded.config, loaded.taxonomy, loaded.model.ranks, loaded.source)
    return replace(loaded, train_counts=counts)


def describe_model(loaded: LoadedModel) -> str:
    """One line for the report: trunk, size, heads, the checkpoint's epoch and the recipe."""
    cfg = loaded.config
    epoch = f"epoch {loaded.epoch} of {cfg.epochs}" if loaded.epoch is not None else f"{cfg.epochs} epochs planned"
    start = "pretrained" if cfg.model.pretrained else (f"weights {cfg.model.weights}" if cfg.model.weights else "from scratch")
    return (f"{cfg.model.trunk} ({start}), {cfg.data.size} px, heads {', '.join(loaded.model.ranks)}; "
            f"checkpoint {loaded.source.name} at {epoch}; loss {cfg.loss.loss}, class weights {cfg.loss.class_weights}, "
            f"optim {cfg.optim.optim}, schedule {cfg.optim.schedule}, augment {cfg.data.augment}, sampler {cfg.data.sampler}")


MISTAKES_SHOWN = 12
MOST_PREDICTED_SHOWN = 20
CONFIDENCE_BINS = 20


def unlabelled_summary(outputs: dict[str, Any], variant: str, taxonomy: Taxonomy) -> dict[str, Any]:
    """For a split without labels: how the predictions spread over the finest classes and how confident they are."""
    finest = taxonomy.finest
    predicted = outputs["predictions"][variant][finest]
    confidence = outputs["top_probabilities"][variant][finest][:, 0]
    counts = np.bincount(predicted, minlength=taxonomy.num_classes(finest))
    order = np.argsort(-counts, kind="stable")[:MOST_PREDICTED_SHOWN]
    histogram, edges = np.histogram(confidence, bins=CONFIDENCE_BINS, range=(0.0, 1.0))
    return {
        "variant": variant, "rank": finest, "images": int(len(predicted)),
        "classes_predicted": int((counts > 0).sum()), "classes": int(len(counts)),
        "most_predicted": [{"name": taxonomy.names[finest][i], "images": int(counts[i])} for i in order if counts[i] > 0],
        "median_confidence": float(np.median(confidence)) if len(confidence) else None,
        "confidence_histogram": {"edges": edges.tolist(), "counts": histogram.tolist()},
    }


def most_confident_mistakes(outputs: dict[str, Any], variant: str, taxonomy: Taxonomy, files: Sequence[str],
                            image_ids: Sequence[Any], count: int = MISTAKES_SHOWN) -> list[dict[str, Any]]:
    """The labelled images the variant got wrong at the finest rank with the highest confidence, most confident first."""
    finest = taxonomy.finest
    column = taxonomy.rank_index(finest)
    targets = outputs["targets"]
    predicted = outputs["predictions"][variant]
    if finest not in predicted:
        return []
    confidence = outputs["top_probabilities"][variant][finest][:, 0]
    wrong = np.flatnonzero((targets[:, column] >= 0) & (predicted[finest] != targets[:, column]))
    order = wrong[np.argsort(-confidence[wrong], kind="stable")][:count]
    ranks = [rank for rank in taxonomy.ranks if rank in predicted]
    return [{
        "image_id": image_ids[i], "path": files[i], "probability": float(confidence[i]),
        "true": " / ".join(taxonomy.names[rank][int(targets[i, taxonomy.rank_index(rank)])] for rank in ranks),
        "predicted": " / ".join(taxonomy.names[rank][int(predicted[rank][i])] for rank in ranks),
    } for i in order]


def check_same_taxonomy(models: Sequence[LoadedModel]) -> Taxonomy:
    first = models[0]
    for other in models[1:]:
        if other.taxonomy.to_dict() != first.taxonomy.to_dict():
            raise ValueError(f"{other.source} was trained on another taxonomy than {first.source}; an ensemble needs the same classes")
    return first.taxonomy


@dataclass
class PrimaryChoice:
    """The variant written to submission.csv and headlined in the report, and why."""

    variant: str
    reason: str
    validation_macro_f1: dict[str, float] = field(default_factory=dict)  # variant -> finest-rank macro-F1


def choose_tau_and_primary(models: Sequence[LoadedModel], data: str | Path, taxonomy: Taxonomy,
                           settings: EvaluationSettings, device: torch.device, galleries: Sequence[Gallery] | None = None,
                           class_weights: Sequence[dict[str, torch.Tensor]] | None = None) -> tuple[TauChoice, PrimaryChoice]:
    """The post-hoc tau and the headline variant: as given, else measured on the run's validation split in one pass.

    The headline variant is ``--primary`` when given; else ``FALLBACK_PRIMARY``
    unless the validation split shows a better variant. Which variant wins
    depends on the data (consistent decoding helps where the coarse heads are
    much stronger than the fine one, and hurts where they are not), so it is
    measured on images the run did not train on. A validation split of a
    long tail is small, though, and variants differ there by less than which
    images it holds: another variant replaces the default only when it beats
    it on the finest rank's macro-F1 with the whole 95% paired bootstrap
    interval above zero (see :func:`primary_from_validation`).

    With ``--posthoc-tau auto`` the split's logits are computed once and
    scored at every tau of ``TAU_GRID``; the tau is the best one for the
    headline variant as given (``--primary``, else ``FALLBACK_PRIMARY``), and
    the headline variant is then chosen among the variants at that tau. A
    run without a validation split gets the default variant and tau 0.
    """
    auto = settings.posthoc_tau == AUTO
    given = PrimaryChoice(settings.primary, "chosen with --primary") if settings.primary else None
    if given and not auto:
        return fixed_tau(settings.posthoc_tau), given
    split = validation_split(models[0], data, "val", taxonomy)
    if split is None or not split.labelled:
        return (no_validation_tau() if auto else fixed_tau(settings.posthoc_tau),
                given or PrimaryChoice(FALLBACK_PRIMARY, "the run has no labelled validation split to choose on: the default"))
    loader = build_view_loader(split, taxonomy, models, settings, device)
    outputs = predict_taus(models, loader, taxonomy, settings, device, TAU_GRID if auto else (settings.posthoc_tau,),
                           galleries, class_weights, desc=f"{'tau and ' if auto else ''}headline variant on {split.name}")
    where = f"the run's validation split {split.name} ({len(split)} images)"
    if auto:
        variant = settings.primary or FALLBACK_PRIMARY
        tau = choose_tau(finest_macro_f1_by_tau(outputs, taxonomy, variant), variant, taxonomy.finest, where)
    else:
        tau = fixed_tau(settings.posthoc_tau)
    return tau, given or primary_from_validation(outputs[tau.tau], taxonomy, where)


def finest_macro_f1_by_tau(outputs: dict[float, dict[str, Any]], taxonomy: Taxonomy, variant: str) -> dict[float, float]:
    """The finest-rank macro-F1 of ``variant`` on the labelled images, per tau of ``outputs`` (from :func:`predict_taus`)."""
    scores = {}
    for tau, at_tau in outputs.items():
        truth, predictions = finest_labelled(at_tau, taxonomy)
        if variant not in predictions:
            raise ValueError(f"--primary {variant}: not a variant of this evaluation; it has {list(predictions)}")
        scores[tau] = float(macro_f1(truth, predictions[variant]) or 0.0)
    return scores


def primary_from_validation(outputs: dict[str, Any], taxonomy: Taxonomy, where: str) -> PrimaryChoice:
    """The headline variant given every variant's predictions on a validation split (see :func:`choose_tau_and_primary`)."""
    variants = score_variants(outputs, taxonomy, {}, None)
    scores = {name: float(ranks[taxonomy.finest]["macro_f1"] or 0.0) for name, ranks in variants.items()}
    best = max(scores, key=scores.get)
    if best == FALLBACK_PRIMARY or FALLBACK_PRIMARY not in scores:
        return PrimaryChoice(best, f"best {taxonomy.finest} macro-F1 ({scores[best]:.3f}) on {where}", scores)
    margin = variant_margin(outputs, taxonomy, best, FALLBACK_PRIMARY)
    interval = f"{margin['delta']:+.3f}, 95% interval [{margin['low']:+.3f}, {margin['high']:+.3f}]"
    if margin["low"] > 0:
        return PrimaryChoice(best, f"best {taxonomy.finest} macro-F1 ({scores[best]:.3f}) on {where}, above "
                                   f"{FALLBACK_PRIMARY} by {interval}", scores)
    return PrimaryChoice(FALLBACK_PRIMARY, f"the default: on {where} the best variant, {best}, was not clearly better "
                                           f"({interval} {taxonomy.finest} macro-F1)", scores)


def variant_margin(outputs: dict[str, Any], taxonomy: Taxonomy, ours: str, theirs: str) -> dict[str, float]:
    """Finest-rank macro-F1 of variant ``ours`` minus ``theirs`` on the labelled images, with its bootstrap interval."""
    truth, predictions = finest_labelled(outputs, taxonomy)
    return paired_bootstrap(truth, predictions[ours], predictions[theirs])


def finest_labelled(outputs: dict[str, Any], taxonomy: Taxonomy) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The labelled images' finest-rank targets, and each variant's finest-rank predictions for them."""
    truth = outputs["targets"][:, taxonomy.rank_index(taxonomy.finest)]
    labelled = (outputs["targets"] >= 0).all(axis=1)
    return truth[labelled], {name: ranks[taxonomy.finest][labelled] for name, ranks in outputs["predictions"].items()}


def headline_figures(outputs: dict[str, Any], taxonomy: Taxonomy, primary: str,
                     scores: dict[str, float | None]) -> dict[str, Any]:
    """The headline's finest-rank macro-F1 with its 95% bootstrap interval; and, when another variant scores
    higher on this split, its paired margin, so the report can say whether the split tells them apart.

    ``scores`` holds every variant's finest-rank macro-F1 (from :func:`score_variants`).
    """
    truth, predictions = finest_labelled(outputs, taxonomy)
    headline = {"variant": primary, "rank": taxonomy.finest, **macro_f1_interval(truth, predictions[primary])}
    better = {name: score for name, score in scores.items()
              if name != primary and score is not None and score > headline["macro_f1"]}
    if better:
        best = max(better, key=better.get)
        headline["best_other"] = {"variant": best, **paired_bootstrap(truth, predictions[best], predictions[primary])}
    return headline


class PredictionStore:
    """Per variant and rank: predicted class [N], top-k classes and their probabilities [N, k]; and each image's index and targets.

    Probabilities are the softmax of the variant's scores (for consistent
    decoding, of the best path score through each class).

    Rows are written into preallocated host chunks of ``chunk_rows`` images
    (pinned, and copied without waiting, from a CUDA device), not kept as
    small per-batch tensors: thousands of those, each born between two
    batches' large score matrices, fragment the C heap so that a CPU
    evaluation's resident memory grew by tens of MB per batch. Call
    :meth:`next_batch` after each batch's writes.
    """

    def __init__(self, pinned: bool = False, chunk_rows: int = 16_384) -> None:
        self.pinned = pinned
        self.chunk_rows = chunk_rows
        self.rows = 0  # images written before the current batch
        self.chunks: dict[tuple[str, ...], list[torch.Tensor]] = {}  # (table, variant, rank) -> [chunk_rows, ...] chunks

    def add(self, variant: str, predictions: dict[str, torch.Tensor], scores: dict[str, torch.Tensor],
            log_probs: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """One batch of a variant: predictions ``{rank: [B]}`` and scores ``{rank: [B, C]}`` (``log_probs``: normalised).

        Returns the top-k kept, ``{rank: (probabilities [B, k], classes [B, k])}``,
        for a variant that shares them (:meth:`add_top`).
        """
        top = {rank: top_k_probabilities(value, min(TOP_K, value.shape[1]), log_probs) for rank, value in scores.items()}
        self.add_top(variant, predictions, top)
        return top

    def add_top(self, variant: str, predictions: dict[str, torch.Tensor],
                top: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """One batch of a variant whose top-k ``{rank: (probabilities, classes)}`` are taken already."""
        for rank, predicted in predictions.items():
            self.write(("predictions", variant, rank), predicted)
        for rank, (probabilities, indices) in top.items():
            self.write(("top", variant, rank), indices)
            self.write(("top_probabilities", variant, rank), probabilities)

    def write(self, key: tuple[str, ...], values: torch.Tensor) -> None:
        """Rows [B, ...] of the current batch under ``key``."""
        chunks = self.chunks.setdefault(key, [])
        done = 0
        while done < len(values):
            row = self.rows + done
            chunk, within = divmod(row, self.chunk_rows)
            while len(chunks) <= chunk:
                chunks.append(torch.empty((self.chunk_rows, *values.shape[1:]), dtype=values.dtype, pin_memory=self.pinned))
            count = min(len(values) - done, self.chunk_rows - within)
            chunks[chunk][within : within + count].copy_(values[done : done + count], non_blocking=self.pinned)
            done += count

    def next_batch(self, images: int) -> None:
        self.rows += images

    def column(self, *key: str) -> np.ndarray:
        """Every row written under ``key``, as one array (call after the device has finished)."""
        return torch.cat(self.chunks.pop(key))[: self.rows].numpy()

    def finish(self) -> dict[str, dict[str, dict[str, np.ndarray]]]:
        tables: dict[str, dict[str, dict[str, np.ndarray]]] = {"predictions": {}, "top": {}, "top_probabilities": {}}
        for table, variant, rank in [key for key in self.chunks if key[0] in tables]:
            tables[table].setdefault(variant, {})[rank] = self.column(table, variant, rank)
        return tables


def view_logits(loaded: LoadedModel, views: torch.Tensor, device: torch.device,
                dtype: torch.dtype | None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(float32 logits of every view {rank: [V, B, C]}, unit embeddings [B, D]) for one batch of views [B, V, 3, H, W].

    The embedding is the mean of the views' unit features, renormalised (see
    :mod:`herbarium.retrieval`).
    """
    batch, num_views = views.shape[:2]
    images = views.flatten(0, 1).to(device, non_blocking=True)  # [B*V, 3, H, W]
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    with autocast(device, dtype):
        features = loaded.model.forward_features(images)  # [B*V, D]
        logits = loaded.model.forward_head(features)
    per_view = {rank: value.float().view(batch, num_views, -1).transpose(0, 1) for rank, value in logits.items()}  # [V, B, C]
    return per_view, normalised_view_mean(features.view(batch, num_views, -1))


def view_scores(per_view: dict[str, torch.Tensor], average: str, plain: int | None,
                offsets: dict[str, torch.Tensor] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """(TTA-averaged log-probs, plain-view log-probs) per rank from the views' logits {rank: [V, B, C]}.

    ``offsets`` (``tau * log(prior)`` per rank, see :mod:`herbarium.evaluation.posthoc`)
    are subtracted from every view before the views are averaged.
    """
    per_view = adjust_logits(per_view, offsets)
    tta = {rank: average_views(value, average) for rank, value in per_view.items()}
    # the plain view's rows are strided in [V, B, C]: a contiguous copy first is faster than log_softmax over them
    single = None if plain is None else {rank: torch.log_softmax(value[plain].contiguous(), dim=1)
                                         for rank, value in per_view.items()}
    return tta, single


def model_outputs(loaded: LoadedModel, views: torch.Tensor, average: str, plain: int | None, device: torch.device,
                  dtype: torch.dtype | None, offsets: dict[str, torch.Tensor] | None = None,
                  ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, torch.Tensor]:
    """(TTA-averaged log-probs, plain-view log-probs, unit embeddings [B, D]) for one batch of views [B, V, 3, H, W]."""
    per_view, embeddings = view_logits(loaded, views, device, dtype)
    tta, single = view_scores(per_view, average, plain, offsets)
    return tta, single, embeddings


def model_scores(loaded: LoadedModel, views: torch.Tensor, average: str, plain: int | None, device: torch.device,
                 dtype: torch.dtype | None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """(TTA-averaged log-probs, plain-view log-probs) per rank for one batch of views [B, V, 3, H, W]."""
    tta, single, _ = model_outputs(loaded, views, average, plain, device, dtype)
    return tta, single


def build_view_loader(split: DatasetSplit, taxonomy: Taxonomy, models: Sequence[LoadedModel], settings: EvaluationSettings,
                      device: torch.device, decode: str | None = None) -> Iterable[dict[str, Any]]:
    """Batches of every view of every image for every model's input profile (see :func:`collate_views`).

    ``decode`` (default: ``settings.decode`` resolved for ``device``) picks the
    input path: PIL in the workers, or bytes from the workers decoded and
    cut into views on the device (already there). Each image is decoded once,
    no smaller than its most demanding view needs.
    """
    decode = decode or select_decode(settings.decode, device)
    profiles = list(dict.fromkeys(m.profile for m in models))
    largest = max(view_decode_side(view, p.size) for view in settings.views for p in profiles)
    workers = loader_workers(settings.workers, decode)
    if decode == "gpu":
        images = BytesDataset(split, taxonomy.ranks, skip_bad_images=settings.skip_bad_images)
        return GpuViewLoader(images, settings.batch_for(device), workers, device,
                             [[view_transform(view, p) for view in settings.views] for p in profiles],
                             [p.size for p in profiles], [p.mean for p in profiles], [p.std for p in profiles],
                             seed=settings.seed, decode_min_side=largest)
    images = ImageDataset(split, taxonomy.ranks, transform=lambda image: image, decode_min_side=largest,
                          skip_bad_images=settings.skip_bad_images)
    dataset = MultiViewDataset(images, settings.views, profiles, settings.seed)
    return DataLoader(dataset, batch_size=settings.batch_for(device), num_workers=workers, collate_fn=collate_views,
                      pin_memory=device.type == "cuda", persistent_workers=False, prefetch_factor=4 if workers else None)


class VariantRecorder:
    """Every variant of each batch's scores, decoded and kept: a :class:`PredictionStore` and the heads' disagreement."""

    def __init__(self, decoder: PathDecoder, pinned: bool) -> None:
        self.decoder = decoder
        self.store = PredictionStore(pinned=pinned)
        self.inconsistent: dict[str, torch.Tensor] = {}  # variant -> images whose heads disagree, counted on the device

    def add(self, variants: dict[str, dict[str, torch.Tensor]], batch: dict[str, Any]) -> None:
        """One batch: the log-probs ``{rank: [B, C]}`` of each score source (tta, single_view, retrieval)."""
        finest = self.decoder.taxonomy.finest
        for name, scores in variants.items():
            heads = independent_predictions(scores)
            # ensemble, view mean and mix give log-probs
            heads_top = self.store.add(f"{name}_heads", heads, scores, log_probs=True)
            path_predictions, path_scores = self.decoder.decode(scores, normalised=True)
            path_top = self.store.add(f"{name}_consistent", path_predictions, path_scores)
            # hybrid takes each rank's predictions and top-k from one of the two above: nothing to compute again
            self.store.add_top(f"{name}_hybrid", *hybrid_decoding(heads, heads_top, path_predictions, path_top, finest))
            self.inconsistent[f"{name}_heads"] = (self.inconsistent.get(f"{name}_heads", 0)
                                                  + self.decoder.inconsistent_mask(heads).sum())
        self.store.write(("index",), batch["index"])
        self.store.write(("targets",), batch["targets"])
        self.store.next_batch(len(batch["index"]))

    def finish(self) -> dict[str, Any]:
        """Each image's index and targets, every variant's tables, and the share of images whose heads disagree."""
        images = self.store.rows
        return {"index": self.store.column("index"), "targets": self.store.column("targets"), **self.store.finish(),
                "disagreement": {name: int(count) / max(images, 1) for name, count in self.inconsistent.items()}}


def model_combiner(models: int, class_weights: Sequence[dict[str, torch.Tensor]] | None,
                   settings: EvaluationSettings) -> Callable[[list[dict[str, torch.Tensor]]], dict[str, torch.Tensor]]:
    """How the models' per-rank log-probs of a batch become one set: an ensemble, class-weighted or not."""
    if models == 1:  # the ensemble of one model's log-probs is those log-probs, whatever the weights
        return lambda parts: parts[0]
    if class_weights:
        return lambda parts: class_weighted_ensemble(parts, class_weights, settings.average)
    return lambda parts: ensemble(parts, settings.model_weights, settings.average)


def predict(models: Sequence[LoadedModel], loader: Iterable[dict[str, Any]], taxonomy: Taxonomy, settings: EvaluationSettings,
            device: torch.device, galleries: Sequence[Gallery] | None = None,
            class_weights: Sequence[dict[str, torch.Tensor]] | None = None, desc: str = "evaluate") -> dict[str, Any]:
    """Run every model over every view; keep each variant's predictions and top-k.

    With ``galleries`` (one per model) a ``retrieval`` variant mixes the
    heads' TTA log-probs with retrieval log-probs; with ``class_weights``
    (one ``{rank: [C]}`` per model) models are combined class by class.
    The logits are adjusted by ``settings.posthoc_tau``, a number here
    (:func:`choose_tau_and_primary` resolves ``auto``).
    """
    if settings.posthoc_tau == AUTO:
        raise ValueError(f"posthoc tau {AUTO!r} is chosen on validation first (choose_tau_and_primary); predict needs a number")
    tau = settings.posthoc_tau
    return predict_taus(models, loader, taxonomy, settings, device, (tau,), galleries, class_weights, desc)[tau]


def predict_taus(models: Sequence[LoadedModel], loader: Iterable[dict[str, Any]], taxonomy: Taxonomy,
                 settings: EvaluationSettings, device: torch.device, taus: Sequence[float],
                 galleries: Sequence[Gallery] | None = None, class_weights: Sequence[dict[str, torch.Tensor]] | None = None,
                 desc: str = "evaluate") -> dict[float, dict[str, Any]]:
    """:func:`predict` at every post-hoc tau of ``taus``, from one pass: ``{tau: outputs}``.

    Each batch goes through the models once; its logits are then adjusted,
    averaged and decoded once per tau, so a grid of taus costs one pass of
    the models and one decoding (views, ensemble, tree, top-k) per tau.
    """
    dtype = autocast_dtype(settings.precision, device)
    profiles = list(dict.fromkeys(m.profile for m in models))
    plain = plain_view_index(settings.views)
    decoder = PathDecoder(taxonomy, settings.rank_weights or None)
    combine = model_combiner(len(models), class_weights, settings)
    offsets = {tau: [tau_offsets(m.train_counts, m.model.classes_by_rank, tau, device) for m in models] for tau in taus}
    recorders = {tau: VariantRecorder(decoder, pinned=device.type == "cuda") for tau in taus}
    skipped, started, images_done = 0, time.perf_counter(), 0
    with torch.inference_mode():
        for batch in tqdm(loader, desc=desc, unit="batch", leave=False, dynamic_ncols=True,
                          disable=not show_progress(settings.quiet)):
            skipped += batch["skipped"]
            if "views" not in batch:
                continue
            logits, embeddings = zip(*(view_logits(loaded, batch["views"][profiles.index(loaded.profile)], device, dtype)
                                       for loaded in models))
            retrieval = (retrieval_log_probs(galleries, list(embeddings), settings.retrieval_mode, settings.retrieval_k,
                                             settings.retrieval_scale) if galleries else None)
            for tau, recorder in recorders.items():
                parts = [view_scores(per_view, settings.average, plain, adjust)
                         for per_view, adjust in zip(logits, offsets[tau])]
                variants = {"tta": combine([tta for tta, _ in parts])}
                if plain is not None and len(settings.views) > 1:
                    variants["single_view"] = combine([single for _, single in parts])
                if retrieval is not None:
                    variants["retrieval"] = mix_log_probs(variants["tta"], retrieval, settings.retrieval_weight)
                recorder.add(variants, batch)
            images_done += len(batch["index"])
    if device.type == "cuda":
        torch.cuda.synchronize()
    if not images_done:
        raise BadImageError(f"no image of the split could be read ({skipped} skipped as unreadable)")
    seconds = time.perf_counter() - started
    timing = {"skipped": skipped, "images_per_s": images_done / seconds if seconds > 0 else None, "seconds": seconds}
    return {tau: {**recorder.finish(), **timing} for tau, recorder in recorders.items()}


def retrieval_ranks(models: Sequence[LoadedModel], taxonomy: Taxonomy, levels: Sequence[str] | None) -> tuple[str, ...]:
    """The ranks retrieval scores: ``levels``, or the finest rank with a head; each must have a head in some model.

    The finest rank is the default because a coarse class (a genus, a family)
    gathers several species whose images need not sit together, so its
    centroid can lie between them; the species centroids are tight.
    """
    with_heads = {rank for loaded in models for rank in loaded.model.ranks}
    wanted = tuple(levels) if levels else (max(with_heads, key=taxonomy.rank_index),)
    missing = [rank for rank in wanted if rank not in with_heads]
    if missing:
        raise ValueError(f"retrieval levels {missing} have no head in the evaluated models; ranks with heads: {sorted(with_heads)}")
    return wanted


def build_gallery(loaded: LoadedModel, split: DatasetSplit, taxonomy: Taxonomy, settings: EvaluationSettings,
                  device: torch.device, ranks: Sequence[str]) -> Gallery:
    """Unit embeddings of a labelled split (plain and flipped views averaged) and its labels at ``ranks`` (those the model has).

    The embeddings are written into one table allocated up front, on the
    device or the host and in float32 or float16 as :func:`gallery_placement`
    decides (the choice and its reason are printed); the labels stay on ``device``.
    """
    if not any(sample.category_id is not None for sample in split.samples):
        raise ValueError(f"retrieval gallery split {split.name!r} has no labels")
    dtype = autocast_dtype(settings.precision, device)
    placement = gallery_placement(len(split), loaded.model.num_features, device)
    tqdm.write(f"retrieval gallery of {split.name}: kept on {placement.device} in "
               f"{str(placement.dtype).removeprefix('torch.')}: {placement.reason}")
    embeddings = torch.empty(len(split), loaded.model.num_features, dtype=placement.dtype, device=placement.device)
    targets = torch.empty(len(split), len(taxonomy.ranks), dtype=torch.long, device=device)
    loader = build_view_loader(split, taxonomy, [loaded], replace(settings, views=("plain", "flip")), device)
    rows = 0
    with torch.inference_mode():
        for batch in tqdm(loader, desc=f"retrieval gallery {split.name}", unit="batch", leave=False, dynamic_ncols=True,
                          disable=not show_progress(settings.quiet)):
            if "views" not in batch:
                continue
            views = batch["views"][0].to(device, non_blocking=True)  # [B, 2, 3, H, W]: plain and flipped
            with autocast(device, dtype):
                embeddings[rows : rows + len(views)] = embed(loaded.model, views)
            targets[rows : rows + len(views)] = batch["targets"]
            rows += len(views)
    ranks = [rank for rank in ranks if rank in loaded.model.ranks]
    labels = {rank: targets[:rows, taxonomy.ranks.index(rank)] for rank in ranks}
    return Gallery(embeddings[:rows], labels, {rank: loaded.model.classes_by_rank[rank] for rank in ranks})


def validation_split(loaded: LoadedModel, data: str | Path, split: str, taxonomy: Taxonomy) -> DatasetSplit | None:
    """``split`` of ``data``; ``"val"`` is the run's own validation split as it was in training (None: it had none)."""
    if split != "val":
        return read_split(data, split, loaded.config.data.ranks, taxonomy=taxonomy)
    return read_train_val(loaded.config)[1]


def validation_class_weights(models: Sequence[LoadedModel], data: str | Path, taxonomy: Taxonomy,
                             settings: EvaluationSettings, device: torch.device) -> tuple[list[dict[str, torch.Tensor]], dict[str, Any]]:
    """Each model's per-class weights ``{rank: [C]}`` from its per-class accuracy on the weights split.

    Accuracy is that of the model's own TTA heads; see
    :func:`herbarium.evaluation.combine.class_weights_from_accuracy` for the scaling.
    Returns the weights and a summary (mean validation accuracy per model and rank).
    """
    # Under --posthoc-tau auto the tau is chosen on the ensemble these weights make, so each model is measured unadjusted.
    plain_settings = replace(settings, class_weighted=False, retrieval_gallery=None, model_weights=None,
                             posthoc_tau=0.0 if settings.posthoc_tau == AUTO else settings.posthoc_tau)
    accuracies: list[dict[str, np.ndarray]] = []
    for loaded in models:
        split = validation_split(loaded, data, settings.weights_split, taxonomy)
        if split is None:
            raise UsageError(f"{loaded.source}: its run was trained without validation (--holdout 0); "
                             "pass --weights-split SPLIT, a labelled split of --data")
        loader = build_view_loader(split, taxonomy, [loaded], plain_settings, device)
        outputs = predict([loaded], loader, taxonomy, plain_settings, device, desc=f"class weights on {split.name}")
        predictions = outputs["predictions"]["tta_heads"]
        accuracies.append({rank: per_class_accuracy(outputs["targets"][:, taxonomy.ranks.index(rank)], predicted,
                                                    taxonomy.num_classes(rank))
                           for rank, predicted in predictions.items()})
    weights: list[dict[str, torch.Tensor]] = [{} for _ in models]
    for rank in dict.fromkeys(rank for accuracy in accuracies for rank in accuracy):
        members = [i for i, accuracy in enumerate(accuracies) if rank in accuracy]
        rank_weights = class_weights_from_accuracy(np.stack([accuracies[i][rank] for i in members]), settings.class_weight_power)
        for row, i in enumerate(members):
            weights[i][rank] = torch.from_numpy(rank_weights[row]).float()
    summary = {str(m.source): {rank: float(np.nanmean(a)) for rank, a in accuracy.items()} for m, accuracy in zip(models, accuracies)}
    return weights, summary


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


# What an evaluation writes in its folder: replaced together, so that a folder holds one evaluation or none.
EVALUATION_OUTPUTS = ("submission.csv", "predictions.csv", "metrics.json", "report.md", "report.html", "plots")


def evaluate(checkpoints: Sequence[str | Path], data: str | Path, split: str = "test", labels: str | Path | None = None,
             out: str | Path | None = None, settings: EvaluationSettings = EvaluationSettings()) -> dict[str, Any]:
    """Evaluate one model or an ensemble on a split; write metrics, report, predictions and submission.

    Everything is written into a hidden folder beside ``out`` and moved into
    place at the end (see :func:`~herbarium.atomic.staged_folder`).
    """
    final = Path(out) if out else locate_checkpoint(checkpoints[0])[1].eval_dir(split)
    with staged_folder(final, EVALUATION_OUTPUTS) as staging:
        result = _evaluate_into(staging, final, checkpoints, data, split, labels, settings)
    result["paths"] = {key: final / path.relative_to(staging) for key, path in result["paths"].items()}
    return {**result, "out_dir": final}


def _evaluate_into(out_dir: Path, final_dir: Path, checkpoints: Sequence[str | Path], data: str | Path, split: str,
                   labels: str | Path | None, settings: EvaluationSettings) -> dict[str, Any]:
    """The evaluation, written into ``out_dir`` (the staging folder); ``final_dir`` is where it will be seen."""
    device = resolve_device(settings.device)
    models = [load_run(path, device) for path in checkpoints]
    if settings.posthoc_tau != 0:
        models = [with_training_counts(loaded) for loaded in models]
    taxonomy = check_same_taxonomy(models)
    first = models[0]
    split_data = read_split(data, split, first.config.data.ranks, taxonomy=taxonomy, labels=labels)
    decode = select_decode(settings.decode, device)
    for line in startup_lines([describe_model(m) for m in models], [str(m.source) for m in models], data, split,
                              len(split_data), split_data.labelled, settings, hardware(device), decode,
                              settings.batch_for(device), final_dir):
        tqdm.write(line)
    galleries = None
    if settings.retrieval_gallery:
        ranks = retrieval_ranks(models, taxonomy, settings.retrieval_levels)
        gallery_split = read_split(data, settings.retrieval_gallery, first.config.data.ranks, taxonomy=taxonomy)
        galleries = [build_gallery(loaded, gallery_split, taxonomy, settings, device, ranks) for loaded in models]
    class_weights, validation_accuracy = (validation_class_weights(models, data, taxonomy, settings, device)
                                          if settings.class_weighted else (None, None))
    tau, choice = choose_tau_and_primary(models, data, taxonomy, settings, device, galleries, class_weights)
    if settings.posthoc_tau == AUTO:
        tqdm.write(f"post-hoc logit adjustment: tau {tau.tau:g} ({tau.reason})")
    loader = build_view_loader(split_data, taxonomy, models, settings, device, decode)
    outputs = predict(models, loader, taxonomy, replace(settings, posthoc_tau=tau.tau), device, galleries, class_weights,
                      desc=f"evaluate {split}")
    if choice.variant not in outputs["predictions"]:
        raise ValueError(f"--primary {choice.variant}: not a variant of this evaluation; it has {list(outputs['predictions'])}")
    primary = choice.variant
    finest = taxonomy.finest
    rows = rows_for_every_image(outputs, primary, len(split_data), taxonomy, first.train_counts)
    image_ids = [split_data.samples[i].image_id for i in rows["index"]]
    write_submission(out_dir / "submission.csv", image_ids, rows["predictions"][finest], taxonomy)
    files = [str(split_data.path(split_data.samples[i])) for i in rows["index"]]
    write_predictions(out_dir / "predictions.csv", image_ids, rows["predictions"], rows["top"], rows["top_probabilities"],
                      taxonomy, paths=files, targets=split_targets(split_data, taxonomy, rows["index"]),
                      fallback=rows["fallback"])

    metrics: dict[str, Any] = {
        "throughput": {"images_per_s": outputs["images_per_s"], "hardware": hardware(device), "views": len(settings.views),
                       "batch_size": settings.batch_for(device), "models": len(models), "seconds": outputs["seconds"],
                       "input_path": decode, **({"decoder_routes": dict(loader.decoder.counts)} if decode == "gpu" else {})},
        "taxonomy_disagreement": outputs["disagreement"],
        "skipped_bad_images": outputs["skipped"],
        "primary_choice": {"variant": primary, "reason": choice.reason, "validation_macro_f1": choice.validation_macro_f1},
        **({"posthoc_tau": tau.to_dict()} if settings.posthoc_tau != 0 else {}),
        **({"fallback": {"images": rows["fallbacks"], "category_id": rows["fallback_category_id"],
                         "rule": FALLBACK_NOTE}} if rows["fallbacks"] else {}),
    }
    if (outputs["targets"] >= 0).all(axis=1).any():
        metrics["variants"] = score_variants(outputs, taxonomy, first.train_counts, settings.shot_thresholds)
        metrics["primary"] = primary
        metrics["baseline"] = "single_view_heads" if "single_view_heads" in metrics["variants"] else "tta_heads"
        metrics["mistakes"] = most_confident_mistakes(outputs, primary, taxonomy, files, image_ids)
        metrics["headline"] = headline_figures(outputs, taxonomy, primary, {
            name: ranks[finest]["macro_f1"] for name, ranks in metrics["variants"].items()})
    else:
        metrics["unlabelled_predictions"] = unlabelled_summary(outputs, primary, taxonomy)
    context = {
        "checkpoints": [str(m.source) for m in models], "models": [describe_model(m) for m in models],
        "data": str(data), "split": split, "images": len(outputs["index"]),
        "tta_views": list(settings.views), "averaging": settings.average, "model_weights": settings.model_weights,
        "consistent_rank_weights": settings.rank_weights or "1 per rank",
        **({"posthoc_logit_adjustment": f"tau {tau.tau:g} ({tau.reason})"} if settings.posthoc_tau != 0 else {}),
        **({"retrieval": f"{settings.retrieval_mode} on {settings.retrieval_gallery} for {', '.join(galleries[0].labels)} (k={settings.retrieval_k}, "
                         f"weight {settings.retrieval_weight:g}, scale {settings.retrieval_scale:g})"} if galleries else {}),
        **({"class_weighted_ensemble": f"per-class accuracy on {settings.weights_split} ** {settings.class_weight_power:g}",
            "validation_accuracy": validation_accuracy} if class_weights else {}),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    title = f"herbarium evaluation: {split}"
    paths = write_report(metrics, out_dir, title, context)
    return {"out_dir": out_dir, "metrics": metrics, "paths": paths}


FALLBACK_NOTE = "unreadable image: the most frequent training class"


def split_targets(split: DatasetSplit, taxonomy: Taxonomy, index: Sequence[int]) -> np.ndarray:
    """Class indices at every taxonomy rank of the split's images ``index`` [N, ranks]; -1 where unlabelled."""
    table = np.full((len(index), len(taxonomy.ranks)), -1, dtype=np.int64)
    for row, i in enumerate(index):
        category = split.samples[i].category_id
        if category is not None:
            table[row] = [taxonomy.targets(category)[rank] for rank in taxonomy.ranks]
    return table


def rows_for_every_image(outputs: dict[str, Any], variant: str, num_images: int, taxonomy: Taxonomy,
                         train_counts: dict[str, list[int]]) -> dict[str, Any]:
    """One row per image of the split, in split order: the model's predictions, and a fallback for skipped images.

    An image skipped as unreadable (``--skip-bad-images``) still needs a row:
    a submission missing one is rejected. It gets the most frequent class of
    the training split at the finest rank (its ancestors at the coarser
    ranks), its top-k are the most frequent training classes with their
    training frequencies as probabilities, and its ``fallback`` note says so.
    Returns ``index`` [N], ``predictions`` {rank: [N]}, ``top`` / ``top_probabilities``
    [N, k] at the finest rank, ``fallback`` [N] notes, ``fallbacks`` (their
    number) and ``fallback_category_id``.
    """
    finest = taxonomy.finest
    index = np.asarray(outputs["index"], dtype=np.int64)
    predictions = {rank: np.asarray(p) for rank, p in outputs["predictions"][variant].items()}
    top = np.asarray(outputs["top"][variant][finest])
    top_probabilities = np.asarray(outputs["top_probabilities"][variant][finest])
    missing = np.setdiff1d(np.arange(num_images), index)
    notes = [""] * len(index)
    fallback_category = None
    if len(missing):
        counts = np.asarray(train_counts.get(finest) or [0] * taxonomy.num_classes(finest), dtype=np.float64)
        order = np.argsort(-counts, kind="stable")
        fallback = int(order[0])
        fallback_category = taxonomy.category_ids[fallback]
        path = taxonomy.path_table(taxonomy.ranks)[fallback]
        for rank in predictions:
            predictions[rank] = np.concatenate([predictions[rank], np.full(len(missing), int(path[taxonomy.rank_index(rank)]))])
        k = top.shape[1] if top.ndim == 2 and top.shape[1] else min(TOP_K, len(counts))
        frequencies = counts / counts.sum() if counts.sum() > 0 else np.full(len(counts), 1 / len(counts))
        top = np.concatenate([top.reshape(-1, k), np.tile(order[:k], (len(missing), 1))])
        top_probabilities = np.concatenate([top_probabilities.reshape(-1, k),
                                            np.tile(frequencies[order[:k]], (len(missing), 1))]).astype(np.float32)
        index = np.concatenate([index, missing])
        notes += [FALLBACK_NOTE] * len(missing)
    in_split_order = np.argsort(index, kind="stable")
    return {
        "index": index[in_split_order],
        "predictions": {rank: p[in_split_order] for rank, p in predictions.items()},
        "top": top[in_split_order], "top_probabilities": top_probabilities[in_split_order],
        "fallback": [notes[i] for i in in_split_order], "fallbacks": int(len(missing)),
        "fallback_category_id": fallback_category,
    }
