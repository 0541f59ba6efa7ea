"""TensorBoard's HPARAMS tab for a run: its settings, the ones that matter first, against its results.

TensorBoard lists hyperparameters sorted by name, so the settings a reader
compares runs on first (trunk, starting weights, loss, optimizer and LR,
schedule, batch size, epochs, input size, sampler, augmentation) are named
with a two-digit rank (``01 trunk``); every other setting follows under its
dotted config name (``data.holdout``). A run without validation still gets
the tab, against its training loss.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

from herbarium.config import TrainConfig
from herbarium.optim import parse_phases

LEADING = ("trunk", "pretrained", "loss", "optim", "lr", "schedule", "batch size", "epochs", "size", "sampler", "augment")
RECORDS = ("changes", "environment")  # what the run recorded, not a setting to compare runs on


def leading(cfg: TrainConfig) -> dict[str, Any]:
    """The settings shown first, in :data:`LEADING` order; ``lr`` is the first optimizer phase's base LR."""
    values = {"trunk": cfg.model.trunk, "pretrained": cfg.model.pretrained, "loss": cfg.loss.loss,
              "optim": cfg.optim.optim, "lr": parse_phases(cfg.optim.optim)[0].lr, "schedule": cfg.optim.schedule,
              "batch size": cfg.data.batch_size, "epochs": cfg.epochs, "size": cfg.data.size,
              "sampler": cfg.data.sampler, "augment": cfg.data.augment}
    return {f"{number:02d} {name}": values[name] for number, name in enumerate(LEADING, start=1)}


def hparams(cfg: TrainConfig) -> dict[str, Any]:
    """Every setting as TensorBoard takes it (numbers, strings, bools), the leading ones first."""
    flat: dict[str, Any] = leading(cfg)
    for section, values in cfg.to_dict().items():
        if section in RECORDS:
            continue
        for key, value in (values.items() if isinstance(values, dict) else [("", values)]):
            name = f"{section}.{key}" if key else section
            flat[name] = value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
    return flat


def metrics(records: Sequence[dict[str, Any]], best: dict[str, Any] | None) -> dict[str, float]:
    """The last epoch's training loss, and with validation the best epoch's scores per rank."""
    values = {"hparam/final_train_loss": records[-1]["loss"]} if records else {}
    if best is not None:
        values.update({f"hparam/best_{rank}_{name}": value for rank, scores in best["val"].items()
                       for name, value in scores.items() if name in ("macro_f1", "top1")})
        values["hparam/best_epoch"] = best["epoch"]
    return values
