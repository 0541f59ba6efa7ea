"""Typed run configuration: the one source of defaults.

The command line is parsed once into a :class:`TrainConfig`; the resolved
config is saved as ``config.json`` in the run directory, and evaluation
rebuilds the model from it. Every default lives here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from herbarium.models.config import ModelConfig
from herbarium.taxonomy import DEFAULT_RANKS


@dataclass
class DataConfig:
    data: str = ""
    train_split: str = "train"
    val_split: str | None = None  # None: hold out `holdout` of train, stratified by the finest rank
    holdout: float = 0.0  # 0 with no val_split: no validation, every image trains and the last epoch is the checkpoint
    ranks: tuple[str, ...] = DEFAULT_RANKS  # the taxonomy's ranks, coarse to fine
    stats: str | None = None  # None: DATA/<train_split>/stats.json if present, else ImageNet values
    size: int = 224
    batch_size: int = 64
    workers: int | None = None  # None: all cores
    sampler: str = "none"
    augment: str = "crop_flip"
    decode: str = "auto"  # where JPEGs are decoded: auto (gpu.select_decode's rule), cpu (PIL workers) or gpu (nvJPEG)
    skip_bad_images: bool = False
    subset: str | None = None  # CSV with an image_id column: train on these images of the train split only
    holdout_ids: str | None = None  # CSV with an image_id column: these train images are the validation split


@dataclass
class LossConfig:
    levels: tuple[str, ...] = ("species", "genus", "family")  # ranks that get a head
    level_weights: dict[str, float] = field(default_factory=dict)  # unnamed ranks: 1.0
    loss: str = "logit_adjusted"  # one name for every rank, or "species=focal,genus=ce,..."
    class_weights: str = "none"
    gamma: float = 2.0
    beta: float = 0.999
    tau: float = 1.0
    smoothing: float = 0.1

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
    optim: str = "adamw:0"  # phases "name[@lr]:start_epoch", e.g. adam:0,sgd:10,adam:20
    schedule: str = "cosine:warmup=1"  # step:N[:gamma], cosine[:warmup=N], sgdr:N[:mult=M], constant
    weight_decay: float | None = None  # None: each optimizer's own default (adamw 0.05, adam 0, sgd 1e-4, ...)
    plateau_patience: int | None = None  # switch to the next phase after this many epochs without gain
    accum_steps: int = 1
    clip_grad: float | None = None


@dataclass
class O2UConfig:
    """Loss-based sample reweighting over SGDR cycles (see :mod:`herbarium.noisy.o2u`)."""

    enabled: bool = False
    weighting: str = "exp"  # exp: exp(-max(loss, 0) / temperature); rank: 1 - loss percentile
    temperature: float = 1.0  # nats of normalised loss per e-fold of weight (exp)
    floor: float = 0.1  # smallest weight a sample gets
    warmup_cycles: int = 1  # cycles trained unweighted before the first weights apply


@dataclass
class TrainConfig:
    out: str = "runs/default"
    recipe: str = "default"  # the named set of defaults the run started from (herbarium.recipes)
    epochs: int = 20
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    channels_last: bool = True
    compile: bool = False
    log_every: int = 20
    checkpoint_every: int = 0  # optimizer steps between mid-epoch checkpoints; 0: at epoch ends only
    nan_policy: str = "stop"  # stop | skip
    nan_skip_limit: float = 0.05  # skip policy: stop when more than this fraction of an epoch's steps in a row were skipped
    dist_timeout: float | None = None  # seconds a DDP process waits for the others; None: torch's default (30 min)
    stop_after_epoch: int | None = None  # end the process after this epoch (a resumable pause)
    snapshots: bool = False  # save checkpoints/snapshot_<k>.pt at the end of each SGDR cycle
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    o2u: O2UConfig = field(default_factory=O2UConfig)
    # Options changed when the run was resumed, oldest first:
    # {"option": "--epochs", "from": 10, "to": 20, "epoch": E, "step": S} (the run's position when the change took effect).
    changes: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        sections = {"data": DataConfig, "model": ModelConfig, "loss": LossConfig, "optim": OptimConfig, "o2u": O2UConfig}
        top = {k: v for k, v in data.items() if k not in sections}
        parts = {name: _build(section, data.get(name, {})) for name, section in sections.items()}
        return cls(**_known(cls, top), **parts)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))


def _known(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """Keep only fields the dataclass has (configs from newer versions load too) and restore tuples."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    kept = {}
    for key, value in values.items():
        if key in names:
            is_tuple = "tuple" in str(names[key].type)
            kept[key] = tuple(value) if is_tuple and isinstance(value, list) else value
    return kept


def _build(cls: type, values: dict[str, Any]) -> Any:
    return cls(**_known(cls, values))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
