"""Typed run configuration: the one source of defaults, help texts and command-line options.

The command line is parsed once into a :class:`TrainConfig`; the resolved
config is saved as ``config.json`` in the run directory, and evaluation
rebuilds the model from it. Each setting is one field declared with
:func:`herbarium.options.option`: its default and its help live here and
nowhere else, and ``train.py``'s options are generated from them.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from herbarium.atomic import write_atomic
from herbarium.config_json import from_json, to_json
from herbarium.data.augment import PRESETS, describe_presets
from herbarium.data.gpu import AUTO_DEVICE_BELOW_CORES, DECODES
from herbarium.data.samplers import SAMPLERS
from herbarium.errors import ConfigError
from herbarium.losses import CLASS_WEIGHTS, LOSSES
from herbarium.models.config import ModelConfig
from herbarium.noisy.o2u import O2U_WEIGHTINGS
from herbarium.optim.phased import phase_spec
from herbarium.options import option
from herbarium.recipes import RECIPES
from herbarium.runtime import PRECISIONS
from herbarium.taxonomy import DEFAULT_RANKS

NAN_POLICIES = ("stop", "skip")  # what a NaN/inf loss does (engine.NanGuard)


@dataclass
class DataConfig:
    data: str = ""  # the dataset folder: train.py's positional DATA (or --data)
    train_split: str = option("train", "training split")
    val_split: str | None = option(None, "validation split", default_text="none, or --holdout of train")
    holdout: float = option(
        0.0, "fraction of train held out for validation when no --val-split, stratified by the finest rank; 0: no "
             "validation, every image trains and the last epoch is the checkpoint")
    ranks: tuple[str, ...] = option(DEFAULT_RANKS, "the taxonomy's ranks, coarse to fine")
    stats: str | None = option(None, "stats JSON from collect-stats",
                               default_text="DATA/<train-split>/stats.json if present, else ImageNet mean/std")
    size: int = option(224, "input side in pixels", minimum=1)
    batch_size: int = option(64, "images per step per process", minimum=1)
    workers: int | None = option(None, "loader worker processes per training process (validation's end after each "
                                       "validation)", default_text="the cores divided among the processes torchrun "
                                       "started on the machine; at most 4 with --decode gpu", minimum=0)
    sampler: str = option("none", "class rebalancing of the draws", choices=SAMPLERS)
    augment: str = option("crop_flip", f"augmentation preset. {describe_presets(' ')}", choices=sorted(PRESETS))
    decode: str = option(
        "auto", "where JPEGs are decoded and augmented: cpu (PIL in the workers), gpu (nvJPEG and batched augmentation "
                "on the device, the workers only read bytes) or auto: gpu only on a CUDA device that decodes JPEGs with "
                f"fewer than {AUTO_DEVICE_BELOW_CORES} cores per GPU, else cpu (measured faster with 16 cores; see README)",
        choices=DECODES)
    mixup: float = option(0.0, "mixup alpha (timm's Mixup, the same pairs and mix for every rank's targets); 0: off")
    cutmix: float = option(0.0, "CutMix alpha; 0: off. With --mixup too, each batch uses one of the two")
    skip_bad_images: bool = option(False, "skip and count unreadable images instead of stopping")
    subset: str | None = option(None, "CSV with an image_id column (e.g. clean-labels' kept.csv): train on these "
                                      "training images only", default_text="all")
    holdout_ids: str | None = option(None, "CSV with an image_id column: these training images are the validation split",
                                     default_text="a random --holdout")


@dataclass
class LossConfig:
    levels: tuple[str, ...] = option(("species", "genus", "family"), "ranks that get a head")
    level_weights: dict[str, float] = option(
        help="loss weight per rank, e.g. species=1.5,genus=1; --level-weights is the old name",
        flag="--rank-weights", aliases=("--level-weights",), default_factory=dict, default_text="1 per rank")
    loss: str = option("logit_adjusted", f"{', '.join(LOSSES)}; one for all ranks or rank=name,...")  # checked by loss_by_rank
    class_weights: str = option("none", "class weights of the loss", choices=CLASS_WEIGHTS)
    gamma: float = option(2.0, "focal loss gamma")
    beta: float = option(0.999, "effective-number beta")
    tau: float = option(1.0, "logit adjustment strength")
    smoothing: float = option(0.1, "target mass spread over all classes by --loss label_smoothing (no other loss smooths)")
    sce_alpha: float = option(0.1, "weight of the cross-entropy term of the symmetric cross-entropy loss (sce)")
    sce_beta: float = option(1.0, "weight of the reverse cross-entropy term of the symmetric cross-entropy loss (sce)")

    def loss_by_rank(self) -> dict[str, str]:
        if "=" not in self.loss:
            return {rank: self.loss for rank in self.levels}
        named = dict(part.split("=", 1) for part in self.loss.split(","))
        unknown = set(named) - set(self.levels)
        if unknown:
            raise ValueError(f"--loss names rank(s) {sorted(unknown)} that are not in --levels {list(self.levels)}")
        missing = [rank for rank in self.levels if rank not in named]
        if missing:
            raise ValueError(f"--loss gives no loss for rank(s) {missing}")
        return named

    def weight_of(self, rank: str) -> float:
        return float(self.level_weights.get(rank, 1.0))


@dataclass
class OptimConfig:
    optim: str = option("adamw:0", "optimizer phases name[@lr]:start_epoch, e.g. adam:0,sgd:10,adam:20",
                        parse=phase_spec)
    schedule: str = option("cosine:warmup=1", "LR schedule: step:N[:gamma], cosine[:warmup=N], sgdr:N[:mult=M], constant")
    weight_decay: float | None = option(None, "weight decay for every phase",
                                        default_text="each optimizer's own: adamw 0.05, adam 0, sgd 1e-4")
    plateau_patience: int | None = option(None, "switch to the next optimizer phase after this many epochs without gain",
                                          default_text="off")
    accum_steps: int = option(1, "gradient accumulation steps", minimum=1)
    clip_grad: float | None = option(None, "clip the gradient norm", default_text="off")
    trunk_lr_scale: float = option(1.0, "the trunk's learning rate as a fraction of the heads' (e.g. 0.1: the pretrained "
                                        "features move ten times slower than the new heads)")
    layer_decay: float | None = option(
        None, "layer-wise learning-rate decay (timm's --layer-decay): the trunk's last layer at the heads' rate, each "
              "earlier layer this factor slower (e.g. 0.85); composes with --trunk-lr-scale", default_text="off",
        minimum=0.01, maximum=1.0)
    ema_decay: float | None = option(
        None, "keep an exponential moving average of the weights (timm's ModelEmaV3, with its warm-up, so short runs "
              "average over a short horizon); validation, checkpoints' evaluation and exports use it", default_text="off")


@dataclass
class O2UConfig:
    """Loss-based sample reweighting over SGDR cycles (see :mod:`herbarium.noisy.o2u`); options ``--o2u-*``."""

    enabled: bool = option(False, "weight each sample by its normalised loss over the previous SGDR cycle",
                           flag="--o2u", dest="o2u")
    weighting: str = option("exp", "exp: exp(-max(loss, 0)/T); rank: 1 - loss percentile", choices=O2U_WEIGHTINGS)
    temperature: float = option(1.0, "T of the exp weighting, in nats of normalised loss per e-fold of weight")
    floor: float = option(0.1, "smallest sample weight")
    warmup_cycles: int = option(1, "SGDR cycles trained unweighted before the first weights apply")


@dataclass
class TrainConfig:
    out: str = option("runs/default", "run directory")
    recipe: str = option(
        "default", "a named set of defaults; flags given still win: default (chosen on validation data) or herbarium2020 "
                   "(Adam 3e-4 halved every 5 epochs, class-weighted focal loss, rank weights 1.5/1/1, dropout 0.5, "
                   "10% hold-out)", choices=RECIPES)
    epochs: int = option(20, "epochs", minimum=1)
    seed: int = option(0, "random seed")
    device: str = option("auto", "cpu, cuda, cuda:N or auto")
    precision: str = option("auto", "autocast precision", choices=PRECISIONS, default_text="auto: bf16 on CUDA, fp32 on CPU")
    channels_last: bool = option(True, "keep NCHW memory format", negate="--no-channels-last", default_text="channels_last")
    compile: bool = option(False, "torch.compile the model: minutes of compilation up front, paid back on long runs")
    log_every: int = option(20, "optimizer steps between logged values", minimum=1)
    checkpoint_every: int = option(0, "optimizer steps between mid-epoch checkpoints; 0: at epoch ends only",
                                  minimum=0)
    nan_policy: str = option(
        "stop", "on a NaN/inf loss: stop naming the step, or skip the step (the model is left exactly as it was) and "
                "count it", choices=NAN_POLICIES)
    nan_skip_limit: float = option(
        0.05, "with --nan-policy skip, stop with an error when more than this fraction of an epoch's steps in a row "
              "were skipped, at least 1", minimum=0, maximum=1)
    dist_timeout: float | None = option(
        None, "seconds a process of a multi-GPU run waits for the others before failing; a process that dies is "
              "noticed at once", default_text="torch's 30 min")
    stop_after_epoch: int | None = option(None, "end the process after this epoch, resumable later", default_text="off",
                                          minimum=1)
    early_stop: int | None = option(
        None, "stop when the finest rank's validation macro-F1 has not improved for this many epochs (patience); "
              "best.pt keeps the best epoch. Needs validation", default_text="off")
    deterministic: bool = option(
        False, "deterministic algorithms only (torch.use_deterministic_algorithms, cuDNN without autotuning): "
               "repeatable GPU runs, somewhat slower; an op with no deterministic version stops the run naming it. "
               "Seeded CPU runs are repeatable without it")
    snapshots: bool = option(False, "save checkpoints/snapshot_<k>.pt at the end of SGDR cycle k")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    o2u: O2UConfig = field(default_factory=O2UConfig)
    # Options changed when the run was resumed, oldest first:
    # {"option": "--epochs", "from": 10, "to": 20, "epoch": E, "step": S} (the run's position when the change took effect).
    changes: list[dict[str, Any]] = field(default_factory=list)
    # The command line, versions and machine the run started with (herbarium.provenance); a record, not a setting.
    environment: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return to_json(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        """The config saved as ``data``; missing keys take defaults, unknown ones raise :class:`ConfigError`."""
        top = {key: value for key, value in data.items() if key not in SECTIONS}
        parts = {name: from_json(section, data.get(name, {}), name) for name, section in SECTIONS.items()}
        return from_json(cls, {**top, **parts})

    def save(self, path: str | Path) -> None:
        write_atomic(path, json.dumps(self.to_dict(), indent=2))  # whole or absent: a resume reads it

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except ConfigError as error:
            raise ConfigError(f"{path}: {error}") from None


SECTIONS: dict[str, type] = {"data": DataConfig, "model": ModelConfig, "loss": LossConfig, "optim": OptimConfig,
                             "o2u": O2UConfig}  # TrainConfig's nested settings, by field name
