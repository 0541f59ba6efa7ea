"""One loss per taxonomic rank, summed with rank weights.

The model has one head per rank (species, genus, family).  The coarser ranks
have far fewer, better-populated classes, so their heads give the shared
trunk a denser signal for tail species; the Herbarium 2020 recipe weighted
them 1.5 * species + genus + family.
"""
from __future__ import annotations

from typing import Mapping

from torch import Tensor, nn

__all__ = ["MultiRankLoss"]


class MultiRankLoss(nn.Module):
    """total = sum_r rank_weight[r] * loss_r(logits[r], targets[r], sample_weight).

    Each per-rank loss must accept ``(logits, target, sample_weight=None)``.
    The per-sample weight is shared by all ranks (it describes the sample, e.g.
    how much its label is trusted).  A rank whose targets are all
    ``ignore_index`` contributes 0 and the total still backpropagates.

    Args:
        losses: rank -> loss module; its order is the order of the terms.
        rank_weights: rank -> weight, with exactly the ranks of ``losses``;
            None weights every rank 1.
    """

    def __init__(self, losses: Mapping[str, nn.Module], rank_weights: Mapping[str, float] | None = None) -> None:
        super().__init__()
        if not losses:
            raise ValueError("MultiRankLoss needs at least one rank")
        if rank_weights is None:
            rank_weights = {rank: 1.0 for rank in losses}
        if set(rank_weights) != set(losses):
            raise ValueError(f"rank_weights ranks {sorted(rank_weights)} != loss ranks {sorted(losses)}")
        self.losses = nn.ModuleDict(dict(losses))
        self.rank_weights: dict[str, float] = {rank: float(rank_weights[rank]) for rank in losses}

    @property
    def ranks(self) -> tuple[str, ...]:
        return tuple(self.losses.keys())

    def forward(
        self,
        logits: Mapping[str, Tensor],
        targets: Mapping[str, Tensor],
        sample_weight: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """logits {rank: [B, C_r]}, targets {rank: [B]} -> (total scalar, {rank: detached scalar}).

        The returned terms are the unweighted per-rank losses, for logging.
        """
        missing = [rank for rank in self.ranks if rank not in logits or rank not in targets]
        if missing:
            raise KeyError(f"no logits or targets for ranks {missing}; expected ranks {list(self.ranks)}")
        total: Tensor | None = None
        terms: dict[str, Tensor] = {}
        for rank, loss_fn in self.losses.items():
            rank_loss = loss_fn(logits[rank], targets[rank], sample_weight=sample_weight)
            terms[rank] = rank_loss.detach()
            weighted = self.rank_weights[rank] * rank_loss
            total = weighted if total is None else total + weighted
        assert total is not None
        return total, terms

    def extra_repr(self) -> str:
        return "rank_weights=" + ", ".join(f"{rank}:{weight:g}" for rank, weight in self.rank_weights.items())
