"""Ensembles from one or several runs: snapshot averaging (SWA) and class-based model weights.

* **Snapshots** (``train --snapshots`` with an SGDR schedule) save
  ``checkpoints/snapshot_<k>.pt`` at the end of cycle k, where the LR is at
  its minimum and the model at a local optimum (Huang et al. 2017, the
  Shopee and AliProducts solutions). ``tta_eval.py RUN/checkpoints/snapshot_*.pt``
  averages their predictions like any ensemble.
* **SWA** (Izmailov et al. 2018), ``herbarium swa RUN``: the *weights* of
  several checkpoints averaged into one model, which costs one model at test
  time. Averaged weights do not match the BatchNorm running statistics of
  any checkpoint, so they are recomputed on the training split with
  :func:`torch.optim.swa_utils.update_bn` (training augmentation, as the
  running statistics were collected in training).
* **Class-based weights** (the AliProducts ensemble): each model's accuracy
  on each class of a validation split, raised to a power p (the non-linear
  scaling: p > 1 favours the better model more sharply) and normalised
  across models, is that model's weight for the class
  (:func:`herbarium.evaluation.combine.class_weighted_ensemble`). A class a
  model has no validation image of gets that model's mean per-class
  accuracy; a class every model misses entirely is averaged uniformly.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torch.optim.swa_utils import update_bn
from torch.utils.data import DataLoader

from herbarium.checkpoint import load_checkpoint, save_checkpoint
from herbarium.config import TrainConfig
from herbarium.errors import command

RUN_FILES = ("config.json", "taxonomy.json", "stats.json")
BN_BATCH_SIZE = 64


# ------------------------------------------------------------ class weights
def per_class_accuracy(targets: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """Accuracy of each class [C] among labelled samples (targets >= 0); NaN for classes without samples."""
    labelled = targets >= 0
    targets, predictions = targets[labelled], predictions[labelled]
    totals = np.bincount(targets, minlength=num_classes).astype(np.float64)
    correct = np.bincount(targets[targets == predictions], minlength=num_classes).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, correct / np.maximum(totals, 1), np.nan)


def class_weights_from_accuracy(accuracy: np.ndarray, power: float = 2.0) -> np.ndarray:
    """Per-model, per-class ensemble weights [M, C] from accuracies [M, C] (NaN: no validation sample).

    ``w_mc = a_mc ** power / sum_m a_mc ** power``; NaN accuracies become the
    model's mean accuracy over its other classes; a class with zero total is
    weighted uniformly. Every column sums to one.
    """
    accuracy = np.asarray(accuracy, dtype=np.float64)
    if accuracy.ndim != 2:
        raise ValueError(f"accuracy must be [models, classes], got shape {accuracy.shape}")
    if power <= 0:
        raise ValueError(f"the class-weight power must be > 0, got {power}")
    model_means = np.nanmean(np.where(np.isnan(accuracy).all(axis=1, keepdims=True), 0.0, accuracy), axis=1, keepdims=True)
    filled = np.where(np.isnan(accuracy), model_means, accuracy)
    scaled = filled**power
    totals = scaled.sum(axis=0, keepdims=True)
    uniform = np.full_like(scaled, 1.0 / len(scaled))
    return np.where(totals > 0, scaled / np.where(totals > 0, totals, 1.0), uniform)


# ---------------------------------------------------------------------- SWA
def average_state_dicts(states: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The mean of floating-point tensors (in float64, cast back); other tensors (BN counters) from the last state."""
    if not states:
        raise ValueError("no state dicts to average")
    keys = list(states[0])
    for number, state in enumerate(states[1:], start=2):
        if list(state) != keys:
            raise ValueError(f"state {number} has other tensors than the first: {sorted(set(state) ^ set(keys))[:5]}")
    averaged = {}
    for key in keys:
        tensors = [state[key] for state in states]
        if tensors[0].is_floating_point():
            averaged[key] = (torch.stack([t.double() for t in tensors]).sum(dim=0) / len(tensors)).to(tensors[0].dtype)
        else:
            averaged[key] = tensors[-1].clone()
    return averaged


def snapshot_paths(run_dir: Path) -> list[Path]:
    """``checkpoints/snapshot_<k>.pt`` of a run, by k."""
    found = [(int(m.group(1)), path) for path in (run_dir / "checkpoints").glob("snapshot_*.pt")
             if (m := re.fullmatch(r"snapshot_(\d+)\.pt", path.name))]
    return [path for _, path in sorted(found)]


def resolve_checkpoints(run_dir: Path, names: Sequence[str] | None) -> list[Path]:
    """Checkpoint files from names (``snapshot_2``, ``last``), paths, or by default the run's snapshots."""
    if not names:
        paths = snapshot_paths(run_dir)
        if not paths:
            raise FileNotFoundError(f"{run_dir}/checkpoints holds no snapshot_<k>.pt; train with --snapshots and "
                                    "--schedule sgdr:..., or name checkpoints with --checkpoints")
        return paths
    paths = []
    for name in names:
        path = Path(name)
        if not path.is_file():
            path = run_dir / "checkpoints" / (name if name.endswith(".pt") else f"{name}.pt")
        if not path.is_file():
            raise FileNotFoundError(f"no checkpoint {name!r}: neither a file nor {path}")
        paths.append(path)
    return paths


def bn_loader(config: TrainConfig, run_dir: Path, batch_size: int, workers: int) -> DataLoader:
    """Images of the run's training split with its training augmentation (for BatchNorm statistics)."""
    from herbarium.data.augment import build_train_transform
    from herbarium.data.dataset import ImageDataset, collate
    from herbarium.engine import read_train_val

    train, _ = read_train_val(config)
    stats = json.loads((run_dir / "stats.json").read_text())
    data = config.data
    transform = build_train_transform(data.augment, data.size, tuple(stats["mean"]), tuple(stats["std"]))
    dataset = ImageDataset(train, config.loss.levels, transform, decode_min_side=2 * data.size,
                           skip_bad_images=data.skip_bad_images)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate)


def swa(run_dir: str | Path, checkpoints: Sequence[str] | None = None, out: str | Path | None = None,
        recompute_bn: bool = True, device: str = "auto", batch_size: int = BN_BATCH_SIZE, workers: int | None = None,
        seed: int = 0) -> Path:
    """Average checkpoints' weights, recompute BatchNorm statistics, write a checkpoint ``tta_eval`` loads.

    Returns the written file (default ``RUN/checkpoints/swa.pt``). The file
    holds the model, config, levels and classes (no optimizer: it is for
    evaluation, not for resuming). ``tta_eval`` reads the run files
    (config, taxonomy, stats) two folders up from a checkpoint, so a file
    written elsewhere gets copies of them there.
    """
    from herbarium.engine import resolve_device
    from herbarium.models import build_model
    from herbarium.stats import default_workers

    run_dir = Path(run_dir)
    paths = resolve_checkpoints(run_dir, checkpoints)
    states = [load_checkpoint(path) for path in paths]
    for path, state in zip(paths[1:], states[1:]):
        if state["classes"] != states[0]["classes"]:
            raise ValueError(f"{path} has other heads than {paths[0]}: {state['classes']} vs {states[0]['classes']}")
    config = TrainConfig.from_dict(states[-1]["config"])
    torch_device = resolve_device(device)
    model = build_model(replace(config.model, pretrained=False, weights=None), states[0]["classes"])
    model.load_state_dict(average_state_dicts([state["model"] for state in states]))
    model.to(torch_device)
    skipped = 0
    if recompute_bn:
        loader = bn_loader(config, run_dir, batch_size, default_workers() if workers is None else workers)

        def images():
            nonlocal skipped
            for batch in loader:
                skipped += batch["skipped"]
                if "image" in batch:
                    yield batch["image"]

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # the augmentation draws
            update_bn(images(), model, torch_device)
        if skipped:
            print(f"swa: skipped {skipped} unreadable training images in the BatchNorm pass (--skip-bad-images of the run)")
    out = Path(out) if out else run_dir / "checkpoints" / "swa.pt"
    state = {"model": {k: v.cpu() for k, v in model.state_dict().items()}, "config": states[-1]["config"],
             "levels": states[-1]["levels"], "classes": states[-1]["classes"],
             "swa": {"checkpoints": [str(path) for path in paths], "bn_recomputed": recompute_bn}}
    save_checkpoint(state, out)
    target_run = out.parent.parent
    if target_run.resolve() != run_dir.resolve():
        for name in RUN_FILES:
            if not (target_run / name).exists():
                shutil.copy2(run_dir / name, target_run / name)
    return out


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="herbarium swa", description="Stochastic weight averaging of a run's checkpoints "
                                     "(default: its SGDR snapshots), BatchNorm statistics recomputed on its training split.")
    parser.add_argument("run", help="run directory")
    parser.add_argument("--checkpoints", nargs="+", default=None, help="checkpoint names (snapshot_2, last) or files (default: every checkpoints/snapshot_<k>.pt)")
    parser.add_argument("--out", default=None, help="checkpoint file to write (default: RUN/checkpoints/swa.pt)")
    parser.add_argument("--no-update-bn", dest="update_bn", action="store_false", help="keep the last checkpoint's BatchNorm statistics (default: recompute them)")
    parser.add_argument("--batch-size", type=int, default=BN_BATCH_SIZE, help=f"batch size of the BatchNorm pass (default: {BN_BATCH_SIZE})")
    parser.add_argument("--workers", type=int, default=None, help="decoding processes (default: all cores)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the augmentation in the BatchNorm pass (default: 0)")
    return parser


@command
def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    out = swa(args.run, args.checkpoints, args.out, args.update_bn, args.device, args.batch_size, args.workers, args.seed)
    print(f"wrote {out}; evaluate it with: tta_eval.py {out} --data DATA")
    return 0
