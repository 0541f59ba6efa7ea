"""Kaggle submission and per-image prediction files.

A submission is ``Id,Predicted`` with one row per test image, ``Predicted``
being the category id as the metadata gives it (not the model's class
index). Files are written to a temporary file beside the target and renamed
into place, so an interrupted run never leaves a half-written CSV that looks
complete.
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from herbarium.atomic import write_atomic
from herbarium.evaluation.metrics import ArrayLike, as_numpy
from herbarium.taxonomy import Taxonomy

SCORE_BLOCK_ROWS = 4096  # rows of [N, C] scores turned into probabilities at once


def _csv_text(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def _check_image_ids(image_ids: Sequence[Any], count: int) -> list[Any]:
    image_ids = list(image_ids)
    if len(image_ids) != count:
        raise ValueError(f"{len(image_ids)} image ids but {count} predictions")
    repeated = [image_id for image_id, n in Counter(image_ids).items() if n > 1]
    if repeated:
        raise ValueError(f"image ids repeat ({len(repeated)} of them, e.g. {repeated[:5]})")
    return image_ids


def _check_indices(indices: ArrayLike, num_classes: int, rank: str) -> list[int]:
    values = [int(i) for i in as_numpy(indices).ravel()]
    bad = [i for i in values if not 0 <= i < num_classes]
    if bad:
        raise ValueError(f"{rank} class indices outside [0, {num_classes}): {bad[:5]}")
    return values


def write_submission(
    path: Path | str, image_ids: Sequence[Any], finest_pred_indices: ArrayLike, taxonomy: Taxonomy
) -> Path:
    """Write ``Id,Predicted`` with each finest-rank class index mapped back to its category id.

    Args:
        image_ids: [N] test image ids, in the order of the predictions; unique.
        finest_pred_indices: [N] finest-rank class indices.
    """
    indices = _check_indices(finest_pred_indices, taxonomy.num_categories, taxonomy.finest)
    image_ids = _check_image_ids(image_ids, len(indices))
    rows = [(image_id, taxonomy.category_ids[index]) for image_id, index in zip(image_ids, indices)]
    return write_atomic(path, _csv_text(["Id", "Predicted"], rows))


def top_k_probabilities(scores: Tensor, k: int, log_probs: bool = False) -> tuple[Tensor, Tensor]:
    """Softmax top-k of [N, C] scores, block by block: (probabilities [N, k], indices [N, k]).

    ``log_probs``: the scores are log-probabilities already, so the top k
    are exponentiated alone instead of softmaxing every class.
    """
    values, indices = [], []
    for start in range(0, scores.shape[0], SCORE_BLOCK_ROWS):
        block = scores[start : start + SCORE_BLOCK_ROWS].float()
        top = block.topk(k, dim=1) if log_probs else torch.softmax(block, dim=1).topk(k, dim=1)
        values.append(top.values.exp() if log_probs else top.values)
        indices.append(top.indices)
    if not values:
        return torch.zeros(0, k), torch.zeros(0, k, dtype=torch.long)
    if len(values) == 1:  # one block, as for an evaluation batch: no copy
        return values[0], indices[0]
    return torch.cat(values), torch.cat(indices)


def write_predictions(
    path: Path | str,
    image_ids: Sequence[Any],
    preds_by_rank: Mapping[str, ArrayLike],
    top_indices: ArrayLike,
    top_probabilities: ArrayLike,
    taxonomy: Taxonomy,
    paths: Sequence[Any] | None = None,
    targets: ArrayLike | None = None,
    fallback: Sequence[str] | None = None,
) -> Path:
    """Write a CSV for people to inspect: each rank's predicted name and the finest top-k.

    Columns: ``image_id``, ``path`` (the image file, when ``paths`` is given),
    ``<rank>`` (predicted name) for each predicted rank coarse to fine,
    ``category_id`` (the finest prediction's id), then with ``targets``
    ([N, number of taxonomy ranks] class indices, -1 where unknown)
    ``true_<rank>`` and ``true_category_id`` (empty when unknown), then
    ``top<i>_category_id`` and ``top<i>_prob`` for i = 1..k, from
    ``top_indices`` / ``top_probabilities`` ([N, k], best first). The top-k
    need not start with the predicted category when the predictions come
    from consistent decoding. With ``fallback`` ([N] strings, empty for a
    real prediction) a last column ``fallback`` says which rows are not the
    model's, and why (e.g. an unreadable image given the most frequent class).
    """
    ranks = [rank for rank in taxonomy.ranks if rank in preds_by_rank]
    if taxonomy.finest not in preds_by_rank:
        raise ValueError(f"predictions need the finest rank {taxonomy.finest!r}; got {sorted(preds_by_rank)}")
    preds = {rank: _check_indices(preds_by_rank[rank], taxonomy.num_classes(rank), rank) for rank in ranks}
    count = len(preds[taxonomy.finest])
    image_ids = _check_image_ids(image_ids, count)
    top_indices = torch.as_tensor(np.asarray(top_indices)).long()
    top_probabilities = torch.as_tensor(np.asarray(top_probabilities)).float()
    if top_indices.shape != top_probabilities.shape or top_indices.shape[0] != count:
        raise ValueError(f"top-k indices {tuple(top_indices.shape)} and probabilities {tuple(top_probabilities.shape)} must both be [{count}, k]")
    if fallback is not None and len(fallback) != count:
        raise ValueError(f"{len(fallback)} fallback notes but {count} predictions")
    k = top_indices.shape[1]
    if paths is not None and len(paths) != count:
        raise ValueError(f"{len(paths)} paths but {count} predictions")
    true = None if targets is None else np.asarray(targets).reshape(count, len(taxonomy.ranks))
    header = ["image_id", *(["path"] if paths is not None else []), *ranks, "category_id"]
    if true is not None:
        header += [f"true_{rank}" for rank in ranks] + ["true_category_id"]
    header += [f"top{i}_{field}" for i in range(1, k + 1) for field in ("category_id", "prob")]
    finest_column = taxonomy.rank_index(taxonomy.finest)
    header += ["fallback"] if fallback is not None else []
    rows = []
    for row, image_id in enumerate(image_ids):
        names = [taxonomy.names[rank][preds[rank][row]] for rank in ranks]
        top = [
            value
            for index, probability in zip(top_indices[row].tolist(), top_probabilities[row].tolist())
            for value in (taxonomy.category_ids[index], f"{probability:.6f}")
        ]
        known = []
        if true is not None:
            labels = [int(true[row, taxonomy.rank_index(rank)]) for rank in ranks]
            finest = int(true[row, finest_column])
            known = [taxonomy.names[rank][i] if i >= 0 else "" for rank, i in zip(ranks, labels)]
            known.append(taxonomy.category_ids[finest] if finest >= 0 else "")
        rows.append([image_id, *([str(paths[row])] if paths is not None else []), *names,
                     taxonomy.category_ids[preds[taxonomy.finest][row]], *known, *top,
                     *([fallback[row]] if fallback is not None else [])])
    return write_atomic(path, _csv_text(header, rows))
