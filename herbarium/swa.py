"""Stochastic weight averaging (Izmailov et al. 2018): ``herbarium swa RUN``.

The *weights* of several checkpoints are averaged into one model, which
costs one model at test time. Train with ``--snapshots`` and an SGDR
schedule to get ``checkpoints/snapshot_<k>.pt`` at the end of each cycle,
where the LR is at its minimum and the model at a local optimum (Huang et
al. 2017, the Shopee and AliProducts solutions); evaluating the snapshots
together (``tta_eval.py RUN/checkpoints/snapshot_*.pt``) averages their
*predictions* instead, like any ensemble. Averaged weights do not match the
BatchNorm running statistics of any checkpoint, so they are recomputed on
the training split with :func:`torch.optim.swa_utils.update_bn` (training
augmentation, as the running statistics were collected in training).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch.optim.swa_utils import update_bn
from torch.utils.data import DataLoader

from herbarium.arguments import ArgumentParser
from herbarium.checkpoint import load_checkpoint, save_checkpoint
from herbarium.config import TrainConfig
from herbarium.data.augment import build_train_transform
from herbarium.data.dataset import ImageDataset, collate
from herbarium.data.seeding import seeded
from herbarium.data.splits import read_train_val
from herbarium.errors import command
from herbarium.run_dir import RunDir, evaluated_weights, model_from_checkpoint
from herbarium.runtime import default_workers, resolve_device

BN_BATCH_SIZE = 64


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


def resolve_checkpoints(run: RunDir, names: Sequence[str] | None) -> list[Path]:
    """Checkpoint files from names (``snapshot_2``, ``last``), paths, or by default the run's snapshots."""
    if not names:
        paths = run.snapshots()
        if not paths:
            raise FileNotFoundError(f"{run.checkpoints} holds no snapshot_<k>.pt; train with --snapshots and "
                                    "--schedule sgdr:..., or name checkpoints with --checkpoints")
        return paths
    paths = []
    for name in names:
        path = Path(name)
        if not path.is_file():
            path = run.checkpoint(name)
        if not path.is_file():
            raise FileNotFoundError(f"no checkpoint {name!r}: neither a file nor {path}")
        paths.append(path)
    return paths


def bn_loader(config: TrainConfig, run: RunDir, batch_size: int, workers: int) -> DataLoader:
    """Images of the run's training split with its training augmentation (for BatchNorm statistics)."""
    train, _ = read_train_val(config)
    normalization = run.read_normalization()
    data = config.data
    transform = build_train_transform(data.augment, data.size, tuple(normalization["mean"]), tuple(normalization["std"]))
    dataset = ImageDataset(train, config.loss.levels, transform, decode_min_side=2 * data.size,
                           skip_bad_images=data.skip_bad_images)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate)


def swa(run_dir: str | Path, checkpoints: Sequence[str] | None = None, out: str | Path | None = None,
        recompute_bn: bool = True, device: str = "auto", batch_size: int = BN_BATCH_SIZE, workers: int | None = None,
        seed: int = 0) -> Path:
    """Average checkpoints' weights, recompute BatchNorm statistics, write a checkpoint ``tta_eval`` loads.

    Returns the written file (default ``RUN/checkpoints/swa.pt``). The file
    holds the model, config, levels and classes (no optimizer: it is for
    evaluation, not for resuming). Evaluation reads the run files beside a
    checkpoint's folder (:class:`~herbarium.run_dir.RunDir`), so a file
    written into another folder gets copies of them there.
    """
    run = RunDir(run_dir)
    paths = resolve_checkpoints(run, checkpoints)
    states = [load_checkpoint(path) for path in paths]
    for path, state in zip(paths[1:], states[1:]):
        if state["classes"] != states[0]["classes"]:
            raise ValueError(f"{path} has other heads than {paths[0]}: {state['classes']} vs {states[0]['classes']}")
    averaged = {key: value for key, value in states[-1].items() if key != "ema"}
    averaged["model"] = average_state_dicts([evaluated_weights(state) for state in states])
    model, config = model_from_checkpoint(averaged)
    torch_device = resolve_device(device)
    model.to(torch_device)
    if recompute_bn:
        loader = bn_loader(config, run, batch_size, default_workers() if workers is None else workers)
        recompute_batchnorm(model, loader, torch_device, seed)
    out = Path(out) if out else run.checkpoint("swa")
    state = {"model": {k: v.cpu() for k, v in model.state_dict().items()}, "config": states[-1]["config"],
             "levels": states[-1]["levels"], "classes": states[-1]["classes"],
             "swa": {"checkpoints": [str(path) for path in paths], "bn_recomputed": recompute_bn}}
    save_checkpoint(state, out)
    target = RunDir.of_checkpoint(out)
    if target.path.resolve() != run.path.resolve():
        run.copy_files_to(target)
    return out


def recompute_batchnorm(model: torch.nn.Module, loader: DataLoader, device: torch.device, seed: int) -> None:
    """BatchNorm running statistics of ``model`` recomputed over ``loader``, its augmentation seeded with ``seed``."""
    skipped = 0

    def images():
        nonlocal skipped
        for batch in loader:
            skipped += batch["skipped"]
            if "image" in batch:
                yield batch["image"]

    with seeded(seed):
        update_bn(images(), model, device)
    if skipped:
        print(f"swa: skipped {skipped} unreadable training images in the BatchNorm pass (--skip-bad-images of the run)")


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="herbarium swa", description="Stochastic weight averaging of a run's checkpoints "
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
