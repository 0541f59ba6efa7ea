"""Classification heads: pooled features [B, F] -> logits [B, num_classes].

One head per taxonomic rank. Heads are kept apart from the trunk so that a new
kind of head (a margin-based ArcFace head, say) only has to be added to
``HEADS``.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class LinearHead(nn.Module):
    """Dropout then a linear layer.

    Dropout sits right before the classifier because that is where it helped in
    the AliProducts and Herbarium solutions (p = 0.5): the features of a
    fine-grained trunk are strongly co-adapted and the classifier of a
    long-tailed rank is trained on few images per class.

    Args:
        in_features: size F of the pooled features.
        num_classes: classes of this rank.
        dropout: drop probability applied to the features.
    """

    def __init__(self, in_features: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.in_features = in_features
        self.num_classes = num_classes
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(features))  # [B, F] -> [B, num_classes]


# The place for more kinds of head. An ArcFace head (cosine logits with an
# additive angular margin on the target class during training) is planned
# here; it will need the targets in its forward, which MultiRankModel then has
# to pass through.
HEADS: dict[str, type[nn.Module]] = {
    "linear": LinearHead,
}


def build_head(kind: str, in_features: int, num_classes: int, dropout: float) -> nn.Module:
    """Return a head of kind ``kind`` (one of ``HEADS``)."""
    if kind not in HEADS:
        raise ValueError(f"unknown head {kind!r}; valid choices: {', '.join(HEADS)}")
    return HEADS[kind](in_features, num_classes, dropout)
