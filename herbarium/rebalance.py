"""Classifier re-balancing after training (Kang et al. 2020): ``herbarium rebalance RUN --method crt|lws --out NEW_RUN``.

"Decoupling representation and classifier for long-tailed recognition"
found that a trunk trained with plain instance sampling learns features as
good as any re-balanced training, and that the long tail's harm sits in the
classifier: its weights for frequent classes grow large. Re-balancing the
classifier alone, after training, recovers most of what the tail lost:

* ``crt`` (classifier re-training): every head is re-initialised and
  trained again on the frozen trunk's features, with class-balanced sampling.
* ``lws`` (learnable weight scaling): every head is kept; one scale per
  class is learned, with class-balanced sampling, and folded into the
  head's weights and bias (``w_c <- f_c w_c``, ``b_c <- f_c b_c``), so each
  class's weight vector keeps its direction and only its norm changes.

Both use plain cross-entropy, SGD with momentum and a cosine schedule.
Sampling is per rank: a draw picks a class of that rank uniformly, then
one of its images (:func:`herbarium.data.samplers.sample_weights`), since a
sample balanced over species is not balanced over genera.

The training split is embedded once by the frozen trunk (the run's
evaluated weights: its moving average with ``--ema-decay``) and the features
are cached: with ``--views K`` (default 4) K views per image, K - 1 training
augmentations and the plain view, each draw taking one of an image's views
at random (the paper augments on the fly; a few cached views stand in for
that); with ``--views plain`` the evaluation transform alone. The
features are written batch by batch into one table allocated up front, on
the device in float32 when it fits, else in float16, else on the host in
float16 (:func:`herbarium.retrieval.gallery_placement`): Herbarium 2021,
2.26M images of 2048 features, is 9.3 GB in float16 on the host per view
(37 GB with the default 4 views).
Each step gathers one batch of rows from it, so an epoch is one pass over
the table in batches, with no Python loop over images or classes.

The result is a new, complete run folder: the run's config, taxonomy and
normalisation, ``checkpoints/best.pt`` with the re-balanced heads (the
trunk's weights bit for bit), and ``rebalance.json``, the record of what
was done. ``tta_eval.py``, ``herbarium predict``, ``herbarium export`` and
``herbarium.load`` read it as any run. It holds no optimizer state, so it
is not resumed. Only linear heads are re-balanced: a cosine (ArcFace) head's
logits are scaled cosines whose norm is fixed by design.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from tqdm import tqdm

from herbarium.arguments import ArgumentParser
from herbarium.atomic import staged_folder, write_atomic
from herbarium.checkpoint import save_checkpoint
from herbarium.config import TrainConfig
from herbarium.data.readers import DatasetSplit, read_split
from herbarium.data.samplers import SAMPLERS, EpochSampler, sample_weights
from herbarium.data.seeding import seeded
from herbarium.data.splits import read_train_val
from herbarium.errors import UsageError, command
from herbarium.evaluation.runner import LoadedModel, build_view_loader, load_run
from herbarium.evaluation.settings import EvaluationSettings
from herbarium.evaluation.tta import parse_views
from herbarium.models.heads import LinearHead
from herbarium.optim.schedules import warmup_cosine
from herbarium.options import add_options, option, values_from_namespace
from herbarium.retrieval import gallery_placement
from herbarium.run_dir import RunDir
from herbarium.run_guard import write_marker
from herbarium.runtime import PRECISIONS, autocast, autocast_dtype, resolve_device
from herbarium.taxonomy import Taxonomy
from herbarium.terminal import show_progress

METHODS = ("crt", "lws")
MOMENTUM = 0.9


@dataclass
class RebalanceSettings:
    """How the heads are re-balanced; each field is one option of ``herbarium rebalance``."""

    method: str = option("crt", "crt: re-train each head from scratch on the frozen features; lws: keep each head and "
                                "learn one scale per class", choices=METHODS)
    epochs: int = option(10, "epochs over the cached features, as in the paper", minimum=1)
    lr: float = option(0.2, "SGD learning rate, momentum 0.9, cosine to 0 (the paper: 0.2 at batch 512)", minimum=0)
    batch_size: int = option(512, "feature rows per step", minimum=1)
    weight_decay: float = option(5e-4, "weight decay of the re-trained heads (crt); lws scales are not decayed",
                                 minimum=0)
    sampler: str = option("balanced", "draws per rank: balanced (a class uniformly, then one of its images), sqrt "
                                      "(classes in proportion to sqrt(count)) or none (every image alike: the "
                                      "instance-balanced control)", choices=SAMPLERS)
    views: tuple[str, ...] = option(parse_views("4"), "views cached per image, as tta_eval.py --views takes them: K "
                                                     "(K-1 training augmentations and the plain view) or plain (the "
                                                     "evaluation transform alone: K times less memory and embedding time)",
                                    parse=parse_views, default_text="4, which beat plain on every seed (BENCHMARKS.md)")
    seed: int = option(0, "seed of the new heads, the draws and the augmented views")
    embed_batch_size: int | None = option(None, "images per batch of the embedding pass",
                                          default_text="128 on a CUDA device, 32 otherwise")
    workers: int | None = option(None, "decoding processes", default_text="all cores")
    device: str = option("auto", "cpu, cuda, cuda:N or auto")
    precision: str = option("auto", "autocast precision of the embedding pass", choices=PRECISIONS,
                            default_text="auto: bf16 on CUDA")
    quiet: bool = option(False, "no progress bars")

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {list(METHODS)}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; choose one of {list(SAMPLERS)}")
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ValueError(f"epochs and batch size must be >= 1 and lr > 0, got {self.epochs}, {self.batch_size}, {self.lr}")


@dataclass
class FeatureTable:
    """The frozen trunk's features of a split: ``features`` [N, V, D] (V views per image), ``labels`` [N, ranks] on the host."""

    features: torch.Tensor
    labels: torch.Tensor
    placement: str  # where the features are kept and why

    def rank_labels(self, taxonomy: Taxonomy, rank: str) -> torch.Tensor:
        return self.labels[:, taxonomy.rank_index(rank)]


# ----------------------------------------------------------------- features
def embed_split(loaded: LoadedModel, split: DatasetSplit, settings: RebalanceSettings, device: torch.device,
                skip_bad_images: bool) -> FeatureTable:
    """Every view's trunk features [N, V, D] of ``split``'s images and their targets at every rank, in one table."""
    model, views = loaded.model, len(settings.views)
    placement = gallery_placement(len(split) * views, model.num_features, device)
    tqdm.write(f"rebalance: features of {split.name} kept on {placement.device} in "
               f"{str(placement.dtype).removeprefix('torch.')}: {placement.reason}")
    features = torch.empty(len(split), views, model.num_features, dtype=placement.dtype, device=placement.device)
    labels = torch.empty(len(split), len(loaded.taxonomy.ranks), dtype=torch.long)
    loader = build_view_loader(split, loaded.taxonomy, [loaded], EvaluationSettings(
        views=settings.views, batch_size=settings.embed_batch_size, workers=settings.workers, seed=settings.seed,
        device=settings.device, precision=settings.precision, skip_bad_images=skip_bad_images), device)
    dtype, rows = autocast_dtype(settings.precision, device), 0
    with torch.inference_mode():
        for batch in tqdm(loader, desc=f"embed {split.name}", unit="batch", leave=False, dynamic_ncols=True,
                          disable=not show_progress(settings.quiet)):
            if "views" not in batch:
                continue
            images = batch["views"][0].to(device, non_blocking=True)  # [B, V, 3, H, W]
            with autocast(device, dtype):
                batch_features = model.forward_features(images.flatten(0, 1))  # [B*V, D]
            features[rows : rows + len(images)] = batch_features.view(len(images), views, -1).to(features)
            labels[rows : rows + len(images)] = batch["targets"]
            rows += len(images)
    return FeatureTable(features[:rows], labels[:rows], placement.reason)


# ----------------------------------------------------------------- training
def epoch_batches(labels: torch.Tensor, sampler: str, seed: int, epoch: int, batch_size: int) -> list[torch.Tensor]:
    """One epoch of draws (as many as there are labelled rows) of the labelled rows of ``labels`` [N], in batches.

    The draws are :class:`~herbarium.data.samplers.EpochSampler`'s for
    ``sample_weights(labels, sampler)``, a pure function of ``(seed, epoch)``.
    """
    rows = torch.nonzero(labels >= 0).squeeze(1)
    if not len(rows):
        return []
    draws = EpochSampler(len(rows), sample_weights(labels[rows], sampler), seed=seed)
    draws.set_epoch(epoch)
    return list(rows[draws.epoch_order()].split(batch_size))


def fit(logits_of: Callable[[torch.Tensor], torch.Tensor], parameters: Sequence[torch.Tensor], table: torch.Tensor,
        labels: torch.Tensor, settings: RebalanceSettings, weight_decay: float, device: torch.device) -> list[float]:
    """Minimise the cross-entropy of ``logits_of(features)`` over ``parameters``; returns each epoch's mean loss.

    ``table`` [N, V, D]: each drawn row takes one of its V views at random.
    """
    optimizer = torch.optim.SGD(parameters, lr=settings.lr, momentum=MOMENTUM, weight_decay=weight_decay)
    total_steps = settings.epochs * max(1, math.ceil(int((labels >= 0).sum()) / settings.batch_size))
    schedule = LambdaLR(optimizer, lambda step: warmup_cosine(step, total_steps))
    views = torch.Generator().manual_seed(settings.seed)
    dtype = parameters[0].dtype
    losses = []
    for epoch in range(settings.epochs):
        summed, drawn = torch.zeros((), device=device), 0
        for rows in epoch_batches(labels, settings.sampler, settings.seed, epoch, settings.batch_size):
            view = torch.randint(table.shape[1], (len(rows),), generator=views)
            features = table[rows.to(table.device), view.to(table.device)].to(device, dtype, non_blocking=True)  # [B, D]
            loss = F.cross_entropy(logits_of(features), labels[rows].to(device, non_blocking=True))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            summed += loss.detach() * len(rows)
            drawn += len(rows)
        losses.append(float(summed) / max(drawn, 1))
    return losses


def retrain_head(head: LinearHead, table: torch.Tensor, labels: torch.Tensor, settings: RebalanceSettings,
                 device: torch.device) -> list[float]:
    """cRT: the head's linear layer re-initialised, then trained on the cached features (the head's own dropout applies).

    The new weights are drawn on the host, from the CPU generator the caller
    seeds, so that they are the same whatever the device.
    """
    head.fc.load_state_dict(nn.Linear(head.fc.in_features, head.fc.out_features).state_dict())
    head.train()
    return fit(head, list(head.parameters()), table, labels, settings, settings.weight_decay, device)


def scale_head(head: LinearHead, table: torch.Tensor, labels: torch.Tensor, settings: RebalanceSettings,
               device: torch.device) -> list[float]:
    """LWS: one scale per class learned over the frozen head, then folded into its weight rows and biases."""
    head.eval().requires_grad_(False)
    scales = torch.ones(head.num_classes, device=device, dtype=head.fc.weight.dtype, requires_grad=True)  # [C]
    losses = fit(lambda features: head(features) * scales, [scales], table, labels, settings, 0.0, device)
    with torch.no_grad():
        head.fc.weight.mul_(scales[:, None])
        head.fc.bias.mul_(scales)
    head.requires_grad_(True)
    return losses


METHOD_STEPS: dict[str, Callable[..., list[float]]] = {"crt": retrain_head, "lws": scale_head}


# ----------------------------------------------------------------- the run
def check_heads(loaded: LoadedModel) -> None:
    """Refuse a model with any head that is not linear, or with tree logits (one line naming why)."""
    if len(loaded.model.tree):
        raise UsageError(f"{loaded.source}: the model adds each parent's logits to its children's (--tree-logits), "
                         "and rebalance re-trains each head on its own")
    for rank, head in loaded.model.heads.items():
        if not isinstance(head, LinearHead):
            raise UsageError(f"{loaded.source}: the {rank} head is {loaded.config.model.head_of(rank)}, and rebalance "
                             "re-trains linear heads only (a cosine head's norm is fixed by design)")


def check_new_folder(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"--out {out}: exists and is not an empty folder; rebalance writes a new run folder")


def rebalance_split(config: TrainConfig, taxonomy: Taxonomy, split: str | None) -> DatasetSplit:
    """The images to re-balance on: the run's own training images (``split`` None), or a labelled split of its data."""
    if split is not None:
        named = read_split(config.data.data, split, config.data.ranks, taxonomy=taxonomy)
        if not named.labelled:
            raise UsageError(f"--split {split}: some of its images have no label; rebalance needs a labelled split")
        return named
    train, _ = read_train_val(config)
    if train.taxonomy.fingerprint() != taxonomy.fingerprint():
        raise UsageError(f"--data {config.data.data}: its classes are not those the run was trained on "
                         "(its taxonomy.json); give the run's own dataset")
    return train


def rebalance(run: str | Path, out: str | Path, settings: RebalanceSettings = RebalanceSettings(),
              data: str | Path | None = None, split: str | None = None) -> Path:
    """Re-balance every head of ``run`` (a run folder or checkpoint) and write the result as the new run ``out``.

    ``data`` points at the run's dataset where it has moved; ``split`` is a
    labelled split of it to re-balance on (default: the images the run
    trained on, its hold-out and subset applied as in training).
    """
    out = Path(out)
    check_new_folder(out)
    device = resolve_device(settings.device)
    loaded = load_run(run, device)
    check_heads(loaded)
    config = loaded.config if data is None else replace(loaded.config, data=replace(loaded.config.data, data=str(data)))
    images = rebalance_split(config, loaded.taxonomy, split)
    table = embed_split(loaded, images, settings, device, config.data.skip_bad_images)
    losses = {}
    with seeded(settings.seed):  # the re-initialised heads and their dropout
        for rank, head in loaded.model.heads.items():
            losses[rank] = METHOD_STEPS[settings.method](head, table.features, table.rank_labels(loaded.taxonomy, rank),
                                                         settings, device)
    loaded.model.eval()
    record = {"method": settings.method, "source": str(loaded.source),
              "weights": "moving average (--ema-decay)" if config.optim.ema_decay else "model",
              "split": images.name, "images": len(table.labels), "features": table.placement,
              "settings": {**asdict(settings), "views": list(settings.views)}, "loss_per_epoch": losses,
              "created": datetime.datetime.now().isoformat(timespec="seconds")}
    write_rebalanced_run(loaded, replace(config, out=str(out)), out, record)
    return out


def write_rebalanced_run(loaded: LoadedModel, config: TrainConfig, out: Path, record: dict[str, Any]) -> None:
    """The new run folder, written beside ``out`` and moved into place whole (see :func:`~herbarium.atomic.staged_folder`)."""
    state = {"model": {key: value.detach().cpu() for key, value in loaded.model.state_dict().items()},
             "config": config.to_dict(), "levels": list(loaded.model.ranks), "classes": dict(loaded.model.classes_by_rank),
             "taxonomy_fingerprint": loaded.taxonomy.fingerprint(), "rebalance": record,
             **({"run": {"epoch": loaded.epoch}} if loaded.epoch is not None else {})}
    with staged_folder(out, ()) as staging:
        target = RunDir(staging)
        write_marker(target)
        config.save(target.config_file)
        RunDir.of_checkpoint(loaded.source).copy_files_to(target)  # taxonomy and normalisation, as the run has them
        save_checkpoint(state, target.checkpoint("best"))
        write_atomic(target.rebalance_record, json.dumps(record, indent=2) + "\n")


# ----------------------------------------------------------------- command
def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="herbarium rebalance", description="Re-balance a trained run's heads for its long "
                            "tail (Kang et al. 2020: cRT or LWS on the frozen trunk's features) into a new run folder.")
    parser.add_argument("run", help="run directory (checkpoints/last.pt, else best.pt; best.pt first for an --early-stop run) or a checkpoint file")
    parser.add_argument("--out", required=True, help="the new run folder to write (absent or empty)")
    parser.add_argument("--data", default=None, help="the run's dataset folder, where it has moved (default: the run's own)")
    parser.add_argument("--split", default=None, help="a labelled split of the data to re-balance on (default: the images "
                                                      "the run trained on)")
    add_options(parser, RebalanceSettings)
    return parser


@command
def main(argv: Sequence[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    out = rebalance(args.run, args.out, values_from_namespace(RebalanceSettings, args), args.data, args.split)
    written = RunDir(out)
    losses = json.loads(written.rebalance_record.read_text())["loss_per_epoch"]
    summary = ", ".join(f"{rank} loss {values[0]:.3f} -> {values[-1]:.3f}" for rank, values in losses.items())
    print(f"wrote {out} ({summary}); evaluate it with: tta_eval.py {out} --data {written.read_config().data.data}")
    return 0
