"""Turning per-rank scores into predictions, independently or along the tree.

Each rank has its own head, and their argmaxes need not agree: the species
head may pick a species whose genus is not the genus head's choice.
*Consistent decoding* scores every root-to-leaf path (one per finest
category) by a weighted sum of the heads' log-probabilities along it,

    score(path) = sum over ranks r with a head of  w_r * log_softmax(head_r)[path[r]]

and returns the best path's class at every rank. The answer is always a
valid path, ranks without a head included, and the coarse heads can overrule
a species head that is unsure between species of different genera.

Memory: the path scores are a [batch, num_categories] matrix, 512 x 65,000
floats (133 MB) at Herbarium 2021 scale. They are computed for a block of
images at a time, with at most ``max_elements`` entries per block, so the
peak extra memory is about ``2 * max_elements * 4`` bytes (64 MiB by
default) whatever the batch size.

Speed: the sum is built down the tree and the per-rank maxima up it (see
:meth:`PathDecoder._path_scores` and :meth:`PathDecoder._best_through_classes`),
so a batch costs one gather, one sum, one scatter-max and one max over the
path matrix, whatever the number of ranks.
"""

from __future__ import annotations

from typing import Iterator, Mapping, TypeVar

import torch
from torch import Tensor

from herbarium.taxonomy import Taxonomy

DEFAULT_MAX_ELEMENTS = 2**23
Scores = TypeVar("Scores")  # what a caller keeps per rank: scores [B, C], or the top-k taken from them

# The variants an evaluation scores, named "<scores>_<decoding>": the scores of the TTA mean, of the plain view
# alone, or of TTA mixed with retrieval, each decoded per head (independent argmaxes), consistently along the tree,
# or "hybrid": the finest rank from its own head and the coarser ranks from the tree.
SCORE_SOURCES = ("tta", "single_view", "retrieval")
DECODINGS = ("heads", "consistent", "hybrid")
VARIANTS = tuple(f"{source}_{decoding}" for source in SCORE_SOURCES for decoding in DECODINGS)


def independent_predictions(scores: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Each head's own argmax: ``{rank: LongTensor [B]}`` from ``{rank: [B, C]}``."""
    return {rank: rank_scores.max(dim=-1).indices for rank, rank_scores in scores.items()}  # argmax's first-best rule


def hybrid_decoding(heads: Mapping[str, Tensor], scores: Mapping[str, Scores], path_predictions: Mapping[str, Tensor],
                    path_scores: Mapping[str, Scores], finest: str) -> tuple[dict[str, Tensor], dict[str, Scores]]:
    """The finest rank's own head (argmax and scores), every coarser rank from the best path.

    Consistent decoding lets confident coarse heads overrule the species head;
    where the coarse heads are right but the species head knows its rare
    species better than the path sum does, that costs species. This keeps the
    species head's answer and takes the ranks above from the tree.

    ``scores`` and ``path_scores`` may be anything kept per rank (the scores,
    or the top-k already taken from them): each rank's is taken whole from one side.
    """
    if finest not in heads:
        return dict(path_predictions), dict(path_scores)
    return {**path_predictions, finest: heads[finest]}, {**path_scores, finest: scores[finest]}


def available_ranks(scores: Mapping[str, Tensor], taxonomy: Taxonomy) -> list[str]:
    """The ranks of ``scores`` in the taxonomy's coarse-to-fine order; fails on unknown ranks."""
    for rank in scores:
        taxonomy.check_rank(rank)
    ranks = [rank for rank in taxonomy.ranks if rank in scores]
    if not ranks:
        raise ValueError(f"no scores given; expected some of the ranks {list(taxonomy.ranks)}")
    return ranks


class PathDecoder:
    """Consistent decoding over a fixed taxonomy.

    Holds the path table and the maps between ranks (a copy per device),
    so that decoding many batches does not rebuild or copy them each time.

    Args:
        taxonomy: the label tree.
        rank_weights: weight ``w_r`` of each rank's log-probability; ranks
            not named weigh 1.0.
        max_elements: path-score entries computed at once (bounds memory).
    """

    def __init__(
        self,
        taxonomy: Taxonomy,
        rank_weights: Mapping[str, float] | None = None,
        max_elements: int = DEFAULT_MAX_ELEMENTS,
    ) -> None:
        for rank in rank_weights or {}:
            taxonomy.check_rank(rank)
        self.taxonomy = taxonomy
        self.rank_weights = {rank: float((rank_weights or {}).get(rank, 1.0)) for rank in taxonomy.ranks}
        self.max_elements = int(max_elements)
        self._tables: dict[torch.device, Tensor] = {}
        self._ancestor_maps: dict[tuple[str, str, torch.device], Tensor] = {}

    def path_table(self, device: torch.device) -> Tensor:
        """LongTensor [num_categories, num_ranks] on ``device``, all ranks coarse to fine."""
        if device not in self._tables:
            self._tables[device] = self.taxonomy.path_table().to(device)
        return self._tables[device]

    def path_score_blocks(self, log_probs: Mapping[str, Tensor], normalised: bool = False) -> Iterator[tuple[slice, Tensor]]:
        """Yield ``(image slice, FloatTensor [b, num_categories])`` path scores, block by block.

        ``log_probs`` may be raw logits (log_softmax is idempotent); ``normalised``
        says they are float32 log-probabilities already, which saves a pass over them.
        """
        ranks = available_ranks(log_probs, self.taxonomy)
        batch_size = self._check_shapes(log_probs, ranks)
        if normalised:
            normalised_scores = {rank: log_probs[rank] for rank in ranks}
        else:
            normalised_scores = {rank: torch.log_softmax(log_probs[rank].float(), dim=-1) for rank in ranks}
        block = max(1, self.max_elements // self.taxonomy.num_categories)
        for start in range(0, max(batch_size, 1), block):  # an empty batch still yields one (empty) block
            rows = slice(start, min(start + block, batch_size))
            yield rows, self._path_scores({rank: scores[rows] for rank, scores in normalised_scores.items()})

    def _path_scores(self, log_probs: Mapping[str, Tensor]) -> Tensor:
        """Path scores [b, num_categories] of normalised ``log_probs``, summed down the tree one rank at a time.

        The partial sum of the ranks down to r is a [b, C_r] matrix (every
        path through a class shares it), spread to the next rank's classes
        by one gather; so only the finest rank's gather and sum touch a
        [b, num_categories] matrix. The terms are added coarse to fine, as
        summing each path's terms would add them.
        """
        first = next(iter(log_probs.values()))
        scores = torch.zeros(first.shape[0], self.taxonomy.num_classes(self.taxonomy.ranks[0]), device=first.device)
        for coarser, rank in zip((None, *self.taxonomy.ranks), self.taxonomy.ranks):
            if coarser is not None:
                scores = scores.index_select(1, self.ancestor_map(rank, coarser, first.device))  # [b, C_rank]
            if rank in log_probs:
                scores.add_(log_probs[rank], alpha=self.rank_weights[rank])
        return scores

    def predictions(self, log_probs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Best path's class at every taxonomy rank: ``{rank: LongTensor [B]}``."""
        best_paths = torch.cat([scores.max(dim=1).indices for _, scores in self.path_score_blocks(log_probs)])  # [B]
        return self._classes_on_paths(best_paths)

    def rank_scores(self, log_probs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Per rank, the best path score through each class: ``{rank: FloatTensor [B, C_rank]}``.

        Their argmax at every rank is the consistent prediction (up to ties),
        so top-k accuracy of the consistent variant can be read from them.
        These are sums of weighted log-probabilities, not normalised.
        """
        return self.decode(log_probs)[1]

    def decode(self, log_probs: Mapping[str, Tensor], normalised: bool = False) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """``(predictions(log_probs), rank_scores(log_probs))`` from one pass over the path scores.

        ``normalised``: as in :meth:`path_score_blocks`.
        """
        blocks: dict[str, list[Tensor]] = {rank: [] for rank in self.taxonomy.ranks}
        best_paths = []
        for _, scores in self.path_score_blocks(log_probs, normalised):
            best_paths.append(scores.max(dim=1).indices)  # the first best path, as argmax (and faster on the CPU)
            for rank, best in self._best_through_classes(scores).items():
                blocks[rank].append(best)
        rank_scores = {rank: parts[0] if len(parts) == 1 else torch.cat(parts) for rank, parts in blocks.items()}
        return self._classes_on_paths(torch.cat(best_paths)), rank_scores

    def _best_through_classes(self, path_scores: Tensor) -> dict[str, Tensor]:
        """Per rank, the best path score through each class [b, C_rank], climbing the tree from the paths.

        The best path through a class is the best through one of its
        children, so each rank is a max over the next finer rank's classes:
        only the first step reads the [b, num_categories] path scores.
        """
        best = {self.taxonomy.finest: path_scores}  # one path per finest class, in class order
        for rank, finer in zip(self.taxonomy.ranks[-2::-1], self.taxonomy.ranks[::-1]):
            to_rank = self.ancestor_map(finer, rank, path_scores.device)  # [C_finer]
            best[rank] = _max_per_class(best[finer], to_rank, self.taxonomy.num_classes(rank))
        return best

    def _classes_on_paths(self, paths: Tensor) -> dict[str, Tensor]:
        """Class of each path [B] at every taxonomy rank: ``{rank: LongTensor [B]}``."""
        table = self.path_table(paths.device)
        return {rank: table[paths, i] for i, rank in enumerate(self.taxonomy.ranks)}

    def ancestor_map(self, rank: str, ancestor: str, device: torch.device) -> Tensor:
        """:meth:`Taxonomy.ancestor_map` on ``device``, copied there once."""
        key = (rank, ancestor, torch.device(device))
        if key not in self._ancestor_maps:
            self._ancestor_maps[key] = self.taxonomy.ancestor_map(rank, ancestor).to(device)
        return self._ancestor_maps[key]

    def inconsistent_mask(self, predictions: Mapping[str, Tensor]) -> Tensor:
        """BoolTensor [B], on the predictions' device: True where the predicted classes do not lie on one path.

        Checks each predicted rank against the next coarser predicted rank (a
        rank without a prediction is skipped, e.g. species against family).
        """
        ranks = available_ranks(predictions, self.taxonomy)
        first = predictions[ranks[0]]
        mask = torch.zeros(first.shape[0], dtype=torch.bool, device=first.device)
        for parent, child in zip(ranks, ranks[1:]):
            to_parent = self.ancestor_map(child, parent, first.device)  # [C_child]
            mask |= to_parent[predictions[child]] != predictions[parent]
        return mask

    def _check_shapes(self, log_probs: Mapping[str, Tensor], ranks: list[str]) -> int:
        batch_sizes = {log_probs[rank].shape[0] for rank in ranks}
        if len(batch_sizes) != 1:
            raise ValueError(f"heads disagree on the batch size: {sorted(batch_sizes)}")
        for rank in ranks:
            expected = self.taxonomy.num_classes(rank)
            if log_probs[rank].dim() != 2 or log_probs[rank].shape[1] != expected:
                raise ValueError(
                    f"{rank!r} scores have shape {tuple(log_probs[rank].shape)}; expected [batch, {expected}]"
                )
        return batch_sizes.pop()


def _max_per_class(scores: Tensor, classes: Tensor, num_classes: int) -> Tensor:
    """Max of the columns of each class: [b, n] with ``classes`` [n] -> [b, num_classes]."""
    out = torch.full((scores.shape[0], num_classes), float("-inf"), device=scores.device)
    index = classes.unsqueeze(0).expand_as(scores)  # [b, n]
    return out.scatter_reduce_(1, index, scores, reduce="amax")


def consistent_predictions(
    log_probs: Mapping[str, Tensor],
    taxonomy: Taxonomy,
    rank_weights: Mapping[str, float] | None = None,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> dict[str, Tensor]:
    """Best valid taxonomy path for each image: ``{rank: LongTensor [B]}`` for every rank.

    One-off convenience over :class:`PathDecoder`; build a decoder once
    when decoding many batches.
    """
    return PathDecoder(taxonomy, rank_weights, max_elements).predictions(log_probs)


def consistent_scores(
    log_probs: Mapping[str, Tensor],
    taxonomy: Taxonomy,
    rank_weights: Mapping[str, float] | None = None,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> dict[str, Tensor]:
    """Best path score through each class, per rank (see :meth:`PathDecoder.rank_scores`)."""
    return PathDecoder(taxonomy, rank_weights, max_elements).rank_scores(log_probs)


def inconsistent_mask(predictions: Mapping[str, Tensor], taxonomy: Taxonomy) -> Tensor:
    """One-off :meth:`PathDecoder.inconsistent_mask`; build a decoder once when checking many batches."""
    return PathDecoder(taxonomy).inconsistent_mask(predictions)


def taxonomy_disagreement(predictions: Mapping[str, Tensor], taxonomy: Taxonomy) -> float:
    """Fraction of images whose per-rank predictions are not one valid path (0.0 when empty)."""
    mask = inconsistent_mask(predictions, taxonomy)
    return float(mask.float().mean()) if mask.numel() else 0.0
