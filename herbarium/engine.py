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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
from torchvision.utils import make_grid
from tqdm import tqdm

from herbarium import run_guard, run_summary, summary_csv, tensorboard_hparams
from herbarium.build import build_loaders, build_run_loss, build_run_model, optimizer_phases, resolve_normalization
from herbarium.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from herbarium.cli import prog
from herbarium.config import NAN_POLICIES, TrainConfig
from herbarium.data.gpu import loader_workers
from herbarium.data.images import BadImageError
from herbarium.data.mixing import RankMixup
from herbarium.data.sample_table import class_counts
from herbarium.data.splits import read_train_val
from herbarium.distributed import (
    DistributedContext, all_gather_objects, all_reduce_sum, cleanup, init_distributed, is_collective_failure, timeout_text,
)
from herbarium.elastic import batches_done, continue_on
from herbarium.errors import DistributedError, HerbariumError, Interrupted, UsageError
from herbarium.evaluation.metrics import macro_f1
from herbarium.losses.factory import SOFT_TARGET_LOSSES
from herbarium.noisy.o2u import O2UReweighter, per_sample_cross_entropy
from herbarium.optim import PhasedOptimizer, parse_schedule
from herbarium.optim.param_groups import parameter_groups
from herbarium.run_dir import RunDir, check_checkpoint_classes
from herbarium.runtime import autocast, autocast_dtype, make_deterministic, resolve_device
from herbarium.terminal import show_progress


class NonFiniteLossError(HerbariumError, FloatingPointError):
    """The training loss became NaN or infinite."""


# ------------------------------------------------------------------ metrics
def classification_metrics(targets: np.ndarray, predictions: np.ndarray, levels: tuple[str, ...]) -> dict[str, dict[str, float | None]]:
    """Per-rank top-1 and macro-F1 of the labelled images (None for a rank without any), as the evaluator computes them."""
    metrics = {}
    for column, rank in enumerate(levels):
        labelled = targets[:, column] >= 0
        y_true, y_pred = targets[labelled, column], predictions[labelled, column]
        metrics[rank] = {"top1": float((y_true == y_pred).mean()) if len(y_true) else None,
                         "macro_f1": macro_f1(y_true, y_pred)}
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
        metrics[rank]["loss"] = float(all_losses[labelled, column].mean()) if labelled.any() else None
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
        if policy not in NAN_POLICIES:
            raise ValueError(f"unknown NaN policy {policy!r}; choose one of {list(NAN_POLICIES)}")
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
                 sample_weight: torch.Tensor | None = None, per_sample_rank: str | None = None,
                 mixup: RankMixup | None = None) -> StepResult:
    """The training loss of a batch. The targets go into the model too (margin heads need them).

    ``sample_weight`` [B] weights each sample's loss; with ``per_sample_rank``
    the result also carries that rank's detached per-sample cross-entropy.
    With ``mixup`` the images are mixed and the loss gets each rank's mixed
    probability targets.
    """
    images = batch["image"].to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    targets = batch["targets"].to(device, non_blocking=True)  # [B, len(levels)]
    targets_by_rank = {rank: targets[:, i] for i, rank in enumerate(levels)}
    loss_targets = targets_by_rank
    if mixup is not None:
        images, loss_targets = mixup(images, targets)
    with autocast(device, dtype):
        logits = model(images, targets_by_rank)
    logits = {rank: value.float() for rank, value in logits.items()}
    total, terms = loss_fn(logits, loss_targets, sample_weight=sample_weight)
    per_sample = None
    if per_sample_rank is not None:
        per_sample = per_sample_cross_entropy(logits[per_sample_rank], targets_by_rank[per_sample_rank])
    return StepResult(total, terms, torch.isfinite(total.detach()), per_sample)


# -------------------------------------------------------------------- train
@dataclass(frozen=True)
class AccumulationWindows:
    """How an epoch's batches group into optimizer updates under ``--accum-steps``.

    Windows of ``accum_steps`` batches from the start of the epoch; when the
    batch count is not a multiple, the last window is shorter and still makes
    an update. No gradient crosses an epoch end, so the checkpoint written
    there holds none, and a resumed run takes the same updates as one that
    never stopped.
    """

    batches: int  # batches per epoch on this process
    accum_steps: int

    @property
    def steps(self) -> int:
        """Optimizer updates per epoch."""
        return max(1, math.ceil(self.batches / self.accum_steps))

    def closes(self, position: int) -> bool:
        """Whether the batch at ``position`` (0-based in the epoch) is the last of its window."""
        return (position + 1) % self.accum_steps == 0 or position + 1 >= self.batches

    def size(self, position: int) -> int:
        """Batches in the window of the batch at ``position``."""
        start = position - position % self.accum_steps
        return max(1, min(self.accum_steps, self.batches - start))


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
    world_size: int | None = None  # processes that wrote the checkpoint (None: an older checkpoint)
    samples_done: int = 0  # images of `epoch` already trained, all processes: the position any world size resumes from
    epochs_without_gain: int = 0  # epochs since the best validation score (--early-stop)

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
        self.saved = load_checkpoint(self._checkpoint_path(resume), map_location=self.device) if resume else None
        if self.saved is not None:  # on another number of processes, each takes its share of the run's global batch
            cfg = self.cfg = continue_on(cfg, self.saved["run"], self.context.world_size)
        self.run = RunDir(cfg.out)
        self.levels = tuple(cfg.loss.levels)
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        if cfg.deterministic:
            make_deterministic()

        self.train_split, self.val_split = read_train_val(cfg)
        self.taxonomy = self.train_split.taxonomy
        self.taxonomy_fingerprint = self.taxonomy.fingerprint()  # in every checkpoint: which classes its heads mean
        for rank in self.levels:
            self.taxonomy.check_rank(rank)
        self.finest_level = max(self.levels, key=self.taxonomy.rank_index)  # best.pt is chosen on its macro-F1
        self.validating = self.val_split is not None  # no --val-split and --holdout 0: no validation, no best.pt
        if not self.validating and cfg.early_stop:
            raise UsageError("--early-stop stops on the validation macro-F1 and needs a validation split: "
                             "pass --val-split SPLIT or --holdout 0.1")
        if not self.validating and cfg.optim.plateau_patience:
            raise UsageError("--plateau-patience switches phases on the validation macro-F1 and needs a validation split: "
                             "pass --val-split SPLIT or --holdout 0.1")
        if resume:
            self._check_same_taxonomy()
        self.normalization = resolve_normalization(cfg)
        self.loaders = build_loaders(cfg, self.train_split, self.val_split, self.normalization, self.context, self.device)
        self.model = self._build_model()
        self.loss_fn = build_run_loss(self.cfg, self.train_split).to(self.device)
        self.windows = AccumulationWindows(len(self.loaders.train), cfg.optim.accum_steps)
        steps_per_epoch = self.windows.steps
        self.optimizer = PhasedOptimizer(
            parameter_groups(self.model, cfg.optim.trunk_lr_scale, cfg.optim.layer_decay),
            optimizer_phases(cfg.optim),
            parse_schedule(cfg.optim.schedule), steps_per_epoch, cfg.epochs, cfg.optim.plateau_patience,
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self._check_cycle_features()
        self.o2u = self._build_o2u()
        self.mixup = self._build_mixup()
        self.ema = self._build_ema()
        self.state = RunState()
        self.nan_guard = NanGuard(cfg.nan_policy, math.floor(cfg.nan_skip_limit * steps_per_epoch))
        self.skipped_train_images = 0  # unreadable images skipped in the last epoch: training split
        self.skipped_val_images: int | None = None  # and validation split
        self.new_changes: list[dict[str, Any]] = []  # option changes this resume applies, for the next log.jsonl line
        self._buffers_before: list[torch.Tensor] | None = None  # --nan-policy skip: the model's buffers at the window start
        self._window_finite = True  # --nan-policy skip: every batch of the accumulation window so far was finite
        self._window_flags: list[torch.Tensor] = []  # --nan-policy stop: the window's finiteness, on the device
        if resume:
            self._resume(self._checkpoint_path(resume))
        self.train_model = self._wrap_model()
        self.writer: SummaryWriter | None = None
        self.lock: IO[str] | None = None  # the run folder's lock, held by the main process (see run_guard)

    # ------------------------------------------------------------- building
    def _build_model(self) -> nn.Module:
        cfg = self.cfg
        if self.resuming:  # the checkpoint holds every weight: fetch no starting weights (no download, no file needed)
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrained=False, weights=None))
        return build_run_model(cfg, self.taxonomy, self.device)

    def _build_mixup(self) -> RankMixup | None:
        data = self.cfg.data
        if data.mixup <= 0 and data.cutmix <= 0:
            return None
        if any(getattr(head, "uses_targets", False) for head in self.model.heads.values()):
            raise UsageError("--mixup/--cutmix mix the labels, which margin heads (arcface) cannot take: "
                             "use --head linear or drop --mixup/--cutmix")
        refused = sorted({name for name in self.cfg.loss.loss_by_rank().values() if name not in SOFT_TARGET_LOSSES})
        if refused:
            raise UsageError(f"--mixup/--cutmix need losses that take mixed targets ({', '.join(SOFT_TARGET_LOSSES)}); "
                             f"--loss has {', '.join(refused)}")
        return RankMixup({rank: self.taxonomy.num_classes(rank) for rank in self.levels}, data.mixup, data.cutmix)

    def _build_ema(self) -> ModelEmaV3 | None:
        """The weights' moving average, started from the current weights (after a resume, from the checkpoint's)."""
        if self.cfg.optim.ema_decay is None:
            return None
        return ModelEmaV3(self.model, decay=self.cfg.optim.ema_decay, use_warmup=True)

    @property
    def evaluated_model(self) -> nn.Module:
        """What validation scores and checkpoints are evaluated with: the moving average when there is one."""
        return self.ema.module if self.ema is not None else self.train_model

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

    # ----------------------------------------------------------- checkpoints
    def checkpoint_state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "run": {**self.state.to_dict(), "world_size": self.context.world_size,
                    "samples_done": self.state.batches_done * self.cfg.data.batch_size * self.context.world_size},
            "rng": rng_state(),
            "config": self.cfg.to_dict(),
            "levels": list(self.levels),
            "classes": {rank: self.taxonomy.num_classes(rank) for rank in self.levels},
            "taxonomy_fingerprint": self.taxonomy_fingerprint,
            **({"o2u": self.o2u.state_dict()} if self.o2u is not None else {}),
            **({"ema": self.ema.module.state_dict()} if self.ema is not None else {}),
        }

    def save(self, name: str) -> None:
        if self.context.is_main:
            save_checkpoint(self.checkpoint_state(), self.run.checkpoint(name))

    @staticmethod
    def _checkpoint_path(resume: str | Path) -> Path:
        path = Path(resume)
        return RunDir(path).last if path.is_dir() else path

    def _resume(self, path: Path) -> None:
        state, self.saved = self.saved, None  # read in __init__; not kept beyond this
        check_checkpoint_classes(state, path, self.run, self.taxonomy)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:  # a run that turns --ema-decay on when resumed starts its average here
            self.ema = self._build_ema()
            if "ema" in state:
                self.ema.module.load_state_dict(state["ema"])
        self.state = RunState(**state["run"])
        if self.state.epoch > self.cfg.epochs:  # else it would end at once, "done: epoch 4/2"
            raise UsageError(f"--epochs {self.cfg.epochs}: the run in {self.run} has already trained {self.state.epoch} "
                             f"epochs; give --epochs {self.state.epoch + 1} or more to continue it")
        saved_world = self.state.world_size or self.context.world_size
        if saved_world != self.context.world_size:
            self.state.batches_done = batches_done(self.state.samples_done, self.cfg.data.batch_size, self.context.world_size)
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
            moved = f"; written by {saved_world} processes, continuing on {self.context.world_size}" \
                if saved_world != self.context.world_size else ""
            tqdm.write(f"resuming {self.run} from {path} at {where} (step {self.state.global_step}{moved})")
            for change in self.new_changes:
                tqdm.write(f"  {change['option']}: {change['from']!r} -> {change['to']!r} (recorded in config.json)")

    def _check_same_taxonomy(self) -> None:
        """A resumed run must read the classes it was trained on (the data folder may have moved or changed)."""
        saved = self.run.taxonomy_file
        if saved.is_file() and json.loads(saved.read_text()) != json.loads(json.dumps(self.taxonomy.to_dict())):
            raise UsageError(f"{self.cfg.data.data}: its classes differ from those the run in {self.run} was trained on "
                             f"({saved}); resume with the data it was trained on")

    def write_run_files(self) -> None:
        """The run's own files before its first epoch; a new run refuses a folder that holds one unless told to replace it."""
        if not self.context.is_main:
            return
        self.lock = run_guard.claim(self.run, resuming=self.resuming, overwrite=self.overwrite)  # held until exit
        counts = {rank: class_counts(self.train_split.samples, self.taxonomy, rank) for rank in self.taxonomy.ranks}
        self.run.write_files(self.cfg, self.taxonomy, self.normalization, counts)

    # ----------------------------------------------------------------- loop
    def fit(self) -> dict[str, Any]:
        """Train from the current state to ``cfg.epochs``; returns the last epoch's record."""
        self.write_run_files()
        self.writer = SummaryWriter(self.run.tensorboard) if self.context.is_main else None
        if self.writer and not self.resuming:
            self.writer.add_text("config", "```json\n" + json.dumps(self.cfg.to_dict(), indent=2) + "\n```", 0)
            self.writer.add_custom_scalars({"loss": {"train and validation": ["Multiline", ["loss/train", "loss/val"]]}})
        self.announce()
        record: dict[str, Any] = {}
        started = time.perf_counter()
        try:
            pause = self.cfg.stop_after_epoch
            while self.state.epoch < self.cfg.epochs and (pause is None or self.state.epoch < pause) and not self.stops_early():
                record = self.run_epoch()
            self._log_hparams()
        except KeyboardInterrupt as interrupt:
            raise self._interrupted() from interrupt
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
            if self.lock is not None:
                self.lock.close()  # the run is over: another process may take the folder (the OS would on exit)
        if self.context.is_main:
            for line in run_summary.end_lines(self.cfg, self.run, self.finest_level, time.perf_counter() - started,
                                              finished=self.state.epoch >= self.cfg.epochs):
                tqdm.write(line)
        self.print_skips()
        return record

    def _interrupted(self) -> Interrupted:
        """Ctrl-C: where the run stopped and how to continue it from its last checkpoint."""
        where = f"interrupted at epoch {self.state.epoch + 1} step {self.state.global_step}"
        if not self.run.last.is_file():
            return Interrupted(f"{where}, before the first checkpoint; start again with: {prog('python train.py')} ... --overwrite")
        return Interrupted(f"{where}; resume with: {prog('python train.py')} --resume {self.run}")

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
            tqdm.write(f"warning: {warning}")

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

    def stops_early(self) -> bool:
        """``--early-stop N``: N epochs in a row without a better validation score end the run (said once)."""
        patience = self.cfg.early_stop
        if not patience or self.state.epochs_without_gain < patience:
            return False
        if self.context.is_main:
            tqdm.write(f"early stop after epoch {self.state.epoch}: no better {self.finest_level} macro-F1 for {patience} "
                       f"epoch(s) (--early-stop {patience}); best.pt holds the best epoch")
        return True

    def run_epoch(self) -> dict[str, Any]:
        epoch = self.state.epoch
        self.optimizer.start_epoch(epoch)
        train_record = self.train_one_epoch(epoch)
        metrics, improved = {}, False
        if self.validating:
            metrics, self.skipped_val_images = validate(self.evaluated_model, self.loaders.val, self.levels, self.device, self.dtype,
                                                        self.context)
            score = metrics[self.finest_level]["macro_f1"]
            score = -math.inf if score is None else score  # no labelled image at the finest rank: nothing to choose on
            self.optimizer.report_metric(score)
            improved = score > self.state.best_metric
            if improved:
                self.state.best_metric = score
            self.state.epochs_without_gain = 0 if improved else self.state.epochs_without_gain + 1
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
                        disable=not show_progress(self.quiet) or not self.context.is_main, leave=False, dynamic_ncols=True)
        self._postfix, shown = {}, None
        skipped_images = torch.zeros((), device=self.device)  # this process's, since the epoch (re)started
        skipped_before = self.state.skipped_train_images  # all processes', before a resume
        resumed_at = self.state.batches_done  # > 0: resumed mid-epoch, the batches before are not in this loss
        open_window: StepResult | None = None  # the last batch's result while its accumulation window is open
        for batch in progress:
            skipped_images += batch["skipped"]
            position = self.state.batches_done
            accumulating = not self.windows.closes(position)
            if "image" not in batch:  # every image of the batch was unreadable (--skip-bad-images)
                self.state.batches_done += 1
                if not accumulating:
                    if open_window is not None:
                        self._optimizer_step(open_window)
                    open_window = None
                continue
            if self.writer is not None and self.state.global_step == 0 and batches == 0:
                self._log_augmented_images(batch["image"])
            result = self._micro_step(model, batch, accumulating, self.windows.size(position))
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
            open_window = result if accumulating else None
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
            **({"loss_from_batch": resumed_at + 1} if resumed_at else {}),
        }

    def _micro_step(self, model: nn.Module, batch: dict[str, Any], accumulating: bool, window_size: int) -> StepResult:
        """Forward and backward of one batch; gradients accumulate until :meth:`_optimizer_step`.

        The loss is divided by the number of batches in the accumulation
        window, so that every update follows the mean gradient of its window,
        the shorter last window of an epoch included.

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
                                  per_sample_rank=self.finest_level if o2u is not None else None, mixup=self.mixup)
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
            self.scaler.scale(result.total / window_size).backward()
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
        if self.ema is not None:
            self.ema.update(self.model, step=self.state.global_step)
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
        """TensorBoard's HPARAMS tab: the settings, leading ones first, against the training loss and best scores."""
        if self.writer is None:
            return
        records = run_summary.read_log(self.run)
        scores = tensorboard_hparams.metrics(records, run_summary.best_record(records, self.finest_level))
        if scores:
            self.writer.add_hparams(tensorboard_hparams.hparams(self.cfg), scores, run_name=".")

    def _log_losses(self, record: dict[str, Any], step: int) -> None:
        """``loss/train`` and ``loss/val`` (and per rank) at each epoch's end, side by side in one section, overlaid
        in one chart under CUSTOM SCALARS. ``loss/val`` is the rank-weighted validation cross-entropy, as the
        training loss weighs its ranks."""
        self.writer.add_scalar("loss/train", record["loss"], step)
        for rank, value in record["loss_terms"].items():
            self.writer.add_scalar(f"loss/train_{rank}", value, step)
        val = {rank: scores["loss"] for rank, scores in record["val"].items()
               if rank in self.levels and scores.get("loss") is not None}
        if val:
            self.writer.add_scalar("loss/val", sum(self.cfg.loss.weight_of(rank) * value for rank, value in val.items()), step)
        for rank, value in val.items():
            self.writer.add_scalar(f"loss/val_{rank}", value, step)

    def _log_augmented_images(self, images: torch.Tensor, count: int = 32) -> None:
        """TensorBoard: the run's first training images as the model sees them (augmented), once."""
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
        self.o2u.table(self.train_split.samples).to_csv(self.run.o2u_weights, index=False)

    def log_epoch(self, record: dict[str, Any]) -> None:
        if not self.context.is_main:
            return
        epoch, step = record["epoch"], self.state.global_step  # the training curves' axis: optimizer steps
        for rank, values in record["val"].items():
            for name, value in values.items():
                if value is not None:
                    self.writer.add_scalar(f"val/{rank}_{name}", value, step)
        self.writer.add_scalar("epoch/train_loss", record["loss"], step)  # the epoch's mean, beside the per-step values
        self._log_losses(record, step)
        for rank, value in record["loss_terms"].items():
            self.writer.add_scalar(f"epoch/train_loss_{rank}", value, step)
        self.writer.add_scalar("epoch/epoch", epoch, step)
        self.writer.add_scalar("epoch/images_per_s", record["images_per_s"], step)
        with open(self.run.log_file, "a") as log:
            log.write(json.dumps(record) + "\n")
        summary_csv.append(self.run.summary_file, record)
        scores = "  ".join(f"{rank} F1 {run_summary.format_score(v['macro_f1'])} top1 {run_summary.format_score(v['top1'])}" for rank, v in record["val"].items()) \
            or "none (no validation split)"
        partial = f" (from batch {record['loss_from_batch']}, resumed)" if "loss_from_batch" in record else ""
        tqdm.write(f"epoch {epoch}/{self.cfg.epochs}  loss {record['loss']:.4f}{partial}  {record['optimizer']} lr {record['lr']:.2e}  "
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
