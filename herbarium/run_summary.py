"""What training prints at its start and end: the run at a glance, the best epoch and the next command.

Pure functions of a :class:`~herbarium.engine.Trainer`'s parts and the run
folder, so the engine only calls them.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from herbarium.cli import prog
from herbarium.config import TrainConfig
from herbarium.models import pretrained_source
from herbarium.run_dir import RunDir

# A trunk this large trained from random initialisation wants far more images than this.
LARGE_TRUNK_PARAMETERS = 10_000_000
SMALL_DATASET_IMAGES = 100_000


def parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def millions(count: int) -> str:
    return f"{count / 1e6:.1f}M"


def starting_weights(cfg: TrainConfig) -> str:
    model = cfg.model
    if model.weights:
        return f"weights from {model.weights}"
    if model.pretrained:
        return ("pretrained: ImageNet weights from a pip package" if pretrained_source(model.trunk) == "packaged"
                else "pretrained: timm's ImageNet weights")
    return "random initialisation"


def scratch_warning(cfg: TrainConfig, trunk_parameters: int, train_images: int) -> str | None:
    """A warning when a large trunk starts from random weights on a small training set, else None."""
    if cfg.model.pretrained or cfg.model.weights:
        return None
    if trunk_parameters < LARGE_TRUNK_PARAMETERS or train_images >= SMALL_DATASET_IMAGES:
        return None
    return (f"training {cfg.model.trunk} ({millions(trunk_parameters)} parameters) from random initialisation on "
            f"{train_images:,} images: expect it to overfit and learn slowly; the ImageNet weights (drop --no-pretrained), "
            f"--weights FILE or a smaller trunk (--trunk resnet18, efficientnet_lite0) usually do much better")


def validation_note(cfg: TrainConfig, train_name: str, val_images: int, finest: str) -> str:
    data = cfg.data
    if data.val_split:
        return f"split {data.val_split!r}, {val_images:,} images"
    if data.holdout_ids:
        return f"{val_images:,} images of {train_name!r} listed in {data.holdout_ids} (held out of training)"
    if data.holdout <= 0:
        return (f"none: every image of {train_name!r} trains and the last epoch is the checkpoint "
                "(--val-split SPLIT or --holdout 0.1 to validate)")
    return f"{val_images:,} images: a {data.holdout:.0%} hold-out of {train_name!r}, stratified by {finest}"


def startup_lines(cfg: TrainConfig, *, layout: str, train_images: int, val_images: int, taxonomy, levels: Sequence[str],
                  model: nn.Module, normalization, device, dtype, world_size: int, decode: str, workers: int | None,
                  resumed_epoch: int = 0) -> list[str]:
    """The start-up summary, one aspect per line."""
    data, loss, optim = cfg.data, cfg.loss, cfg.optim
    finest = max(levels, key=taxonomy.rank_index)
    trunk = getattr(model, "trunk", model)
    total, trunk_count = parameters(model), parameters(trunk)
    classes = ", ".join(f"{rank} {taxonomy.num_classes(rank):,}" for rank in taxonomy.ranks)
    heads = ", ".join(f"{rank}×{loss.weight_of(rank):g}" for rank in levels)
    source = normalization.source if normalization.source != "imagenet" else "ImageNet values (no stats file; run collect-stats)"
    mean = ", ".join(f"{v:.3f}" for v in normalization.mean)
    std = ", ".join(f"{v:.3f}" for v in normalization.std)
    batch = f"{data.batch_size}" + (f" × {world_size} processes" if world_size > 1 else "") + \
            (f" × {optim.accum_steps} accumulated" if optim.accum_steps > 1 else "")
    precision = {None: "fp32"}.get(dtype, str(dtype).replace("torch.", "").replace("bfloat16", "bf16").replace("float16", "fp16"))
    lines = [
        f"herbarium train -> {cfg.out}" + (f" (resuming after epoch {resumed_epoch})" if resumed_epoch else ""),
        f"  data       {data.data} ({layout}); train {data.train_split!r}: {train_images:,} images"
        + (f" (subset {data.subset})" if data.subset else ""),
        f"  validation {validation_note(cfg, data.train_split, val_images, finest)}",
        f"  classes    {classes}; heads (loss weight): {heads}",
        f"  trunk      {cfg.model.trunk}: {millions(trunk_count)} parameters ({millions(total)} with the heads), "
        f"{starting_weights(cfg)}",
        f"  input      {data.size} px, augment {data.augment}, sampler {data.sampler}; normalisation from {source} "
        f"(mean {mean}; std {std})",
        f"  recipe     {cfg.epochs} epochs, batch {batch}; loss {loss.loss} (class weights {loss.class_weights}); "
        f"optim {optim.optim}, schedule {optim.schedule}",
        f"  device     {device} ({precision}{', compiled' if cfg.compile else ''}); input path {decode}"
        f" ({workers_text(workers, world_size)})",
    ]
    return lines


def workers_text(workers: int | None, world_size: int) -> str:
    """``12 workers per process``: what each process runs, not the machine's total."""
    if workers is None:
        return "all cores"
    return f"{workers} {'worker' if workers == 1 else 'workers'}" + (" per process" if world_size > 1 else "")


def read_log(run: RunDir) -> list[dict[str, Any]]:
    if not run.log_file.is_file():
        return []
    return [json.loads(line) for line in run.log_file.read_text().splitlines() if line.strip()]


def best_record(records: Sequence[dict[str, Any]], finest: str) -> dict[str, Any] | None:
    """The epoch ``best.pt`` holds: the first with the highest validation macro-F1 at the finest rank."""
    best, score = None, float("-inf")
    for record in records:
        value = (record.get("val") or {}).get(finest, {}).get("macro_f1")
        if value is not None and value > score:
            best, score = record, value
    return best


def command_name() -> str:
    """``herbarium train`` or ``python train.py``, as this run was started."""
    name = prog("")
    return name if name else f"python {Path(sys.argv[0]).name if sys.argv and sys.argv[0].endswith('.py') else 'train.py'}"


def end_lines(cfg: TrainConfig, run: RunDir, finest: str, seconds: float, finished: bool) -> list[str]:
    """The end-of-run summary: best epoch and its metrics, the files, the next command."""
    records = read_log(run)
    last = records[-1]["epoch"] if records else 0
    minutes, secs = divmod(int(round(seconds)), 60)
    lines = [f"{'done' if finished else 'paused'}: epoch {last}/{cfg.epochs} in {minutes}m{secs:02d}s"]
    best = best_record(records, finest)
    if best is not None:
        scores = "; ".join(f"{rank} macro-F1 {format_score(m['macro_f1'])}, top-1 {format_score(m['top1'])}" for rank, m in best["val"].items())
        lines.append(f"  best epoch {best['epoch']}: {scores}")
    kept = f"{run.checkpoint('best')} (epoch {best['epoch']}), " if best else ""
    lines.append(f"  files      {kept}{run.last} (epoch {last}), "
                 f"{run.log_file}; TensorBoard: tensorboard --logdir {shlex.quote(str(run.tensorboard))}")
    run_arg, data = shlex.quote(str(run)), shlex.quote(str(cfg.data.data))
    if finished:
        lines.append(f"  next       python tta_eval.py {run_arg} --data {data} --split test"
                     f"   (then: herbarium predict {run_arg} IMAGES... --out predictions.csv)")
    else:
        lines.append(f"  next       {command_name()} --resume {run_arg}   (continues from epoch {last})")
    return lines


def format_score(value: float | None) -> str:
    """A metric with three decimals; ``-`` where there was nothing to score."""
    return "-" if value is None else f"{value:.3f}"
