"""``summary.csv`` beside ``log.jsonl``: one row per epoch, as timm's ``summary.csv``, for a spreadsheet or pandas.

``log.jsonl`` keeps everything, nested; this is its flat, fixed-column view:
``epoch``, ``train_loss`` and one ``train_loss_<rank>`` per head, ``lr``,
``optimizer``, ``images_per_s``, then ``val_<rank>_<metric>`` for every
validation number. The header is the first epoch's; a resumed run appends
under it.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

TRAIN_COLUMNS = ("epoch", "train_loss", "lr", "optimizer", "images_per_s")


def row(record: dict[str, Any]) -> dict[str, Any]:
    """The flat row of one epoch's ``log.jsonl`` record."""
    flat: dict[str, Any] = {"epoch": record["epoch"], "train_loss": record["loss"]}
    flat.update({f"train_loss_{rank}": value for rank, value in record["loss_terms"].items()})
    flat.update({name: record[name] for name in TRAIN_COLUMNS[2:]})
    for rank, metrics in record.get("val", {}).items():
        flat.update({f"val_{rank}_{name}": value for name, value in metrics.items()})
    return flat


def append(path: Path, record: dict[str, Any]) -> None:
    """Append the epoch's row, writing the header first when the file is new."""
    values = row(record)
    header = _header(path) or list(values)
    new = not path.is_file() or path.stat().st_size == 0
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow(values)


def _header(path: Path) -> list[str] | None:
    if not path.is_file():
        return None
    with path.open(newline="") as handle:
        return next(csv.reader(handle), None)
