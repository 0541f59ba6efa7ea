"""Classification heads: pooled features [B, F] -> logits [B, num_classes].

One head per taxonomic rank. Heads are kept apart from the trunk so that a new
kind of head only has to be added to ``HEADS``. A head whose training logits
depend on the label (ArcFace's margin is applied to the target class only)
sets ``uses_targets = True``; :class:`~herbarium.models.MultiRankModel` then
passes it the rank's targets during training and nothing at evaluation.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


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

    uses_targets = False

    def __init__(self, in_features: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.in_features = in_features
        self.num_classes = num_classes
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(features))  # [B, F] -> [B, num_classes]


class ArcFaceHead(nn.Module):
    """Additive angular margin (ArcFace, Deng et al. 2019), optionally with sub-centres.

    The logits are ``scale * cos(theta_c)``, the cosine between the
    L2-normalised features and the L2-normalised centre of class c, so the
    features live on a sphere where classes are compared by angle, which is
    what a retrieval gallery needs. In training the target class's angle gets
    the margin: its logit becomes ``scale * cos(theta_y + margin)``, which
    forces a gap between each class and its neighbours (the Lotte 1st place
    and the Google Landmark solutions; sub-centre ArcFace won Herbarium 2022).

    With ``subcenters = k > 1`` each class has k centres and its cosine is the
    largest of the k (Deng et al. 2020): a noisy or atypical image can sit by
    a minor centre without pulling the dominant one away.

    Without targets (evaluation) the logits are ``scale * cos(theta)``: plain
    scaled cosines that the softmax, TTA and decoding read like any logits.

    Args:
        in_features: size F of the features.
        num_classes: classes of this rank.
        dropout: drop probability applied to the features.
        margin: additive angular margin in radians (0.3 ~ 17 degrees).
        scale: the norm the cosines are multiplied by (the softmax temperature).
        subcenters: centres per class.
    """

    uses_targets = True

    def __init__(self, in_features: int, num_classes: int, dropout: float = 0.0, margin: float = 0.3,
                 scale: float = 30.0, subcenters: int = 1, ignore_index: int = -1) -> None:
        super().__init__()
        if not 0.0 <= margin < math.pi / 2:
            raise ValueError(f"ArcFace margin must be in [0, pi/2) radians, got {margin}")
        if scale <= 0:
            raise ValueError(f"ArcFace scale must be > 0, got {scale}")
        if subcenters < 1:
            raise ValueError(f"ArcFace needs at least 1 sub-centre per class, got {subcenters}")
        self.in_features = in_features
        self.num_classes = num_classes
        self.margin = float(margin)
        self.scale = float(scale)
        self.subcenters = int(subcenters)
        self.ignore_index = ignore_index
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.weight = nn.Parameter(torch.empty(num_classes * subcenters, in_features))  # [C*k, F]
        nn.init.xavier_uniform_(self.weight)

    def cosine(self, features: torch.Tensor) -> torch.Tensor:
        """Features [B, F] -> cosine to the nearest centre of each class [B, C], in float32."""
        # In float32, autocast off: in bf16 the cosines of near neighbours collide.
        with torch.autocast(features.device.type, enabled=False):
            unit_features = F.normalize(features.float(), dim=1)  # [B, F]
            unit_centres = F.normalize(self.weight.float(), dim=1)  # [C*k, F]
            cosines = unit_features @ unit_centres.t()  # [B, C*k]
        return cosines.view(len(features), self.num_classes, self.subcenters).amax(dim=2)  # [B, C]

    def forward(self, features: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """Features [B, F], target [B] or None -> float32 logits [B, C] (margin on the target class when given)."""
        cosine = self.cosine(self.drop(features))  # [B, C]
        if target is None:
            return self.scale * cosine
        labelled = target != self.ignore_index  # [B]
        rows = torch.nonzero(labelled).squeeze(1)
        target_cosine = cosine[rows, target[rows]].clamp(-1.0, 1.0)  # [L]
        # cos(theta + m) = cos(theta) cos(m) - sin(theta) sin(m), with sin(theta) >= 0 on [0, pi].
        sine = (1.0 - target_cosine.square()).clamp_min(0.0).sqrt()
        with_margin = target_cosine * math.cos(self.margin) - sine * math.sin(self.margin)
        # Past theta = pi - m, cos(theta + m) would rise again; continue the curve linearly
        # (insightface's rule) so the target logit keeps falling as the angle grows.
        threshold = math.cos(math.pi - self.margin)
        fallback = target_cosine - math.sin(math.pi - self.margin) * self.margin
        with_margin = torch.where(target_cosine > threshold, with_margin, fallback)
        cosine = cosine.index_put((rows, target[rows]), with_margin)
        return self.scale * cosine

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, num_classes={self.num_classes}, margin={self.margin}, "
                f"scale={self.scale}, subcenters={self.subcenters}")


HEADS: dict[str, type[nn.Module]] = {
    "linear": LinearHead,
    "arcface": ArcFaceHead,
}


def build_head(kind: str, in_features: int, num_classes: int, dropout: float, **settings: float) -> nn.Module:
    """Return a head of kind ``kind`` (one of ``HEADS``); ``settings`` go to heads that take them.

    ``settings`` are ArcFace's ``margin``, ``scale`` and ``subcenters``; a
    linear head ignores them.
    """
    if kind not in HEADS:
        raise ValueError(f"unknown head {kind!r}; valid choices: {', '.join(HEADS)}")
    if kind == "linear":
        return LinearHead(in_features, num_classes, dropout)
    return HEADS[kind](in_features, num_classes, dropout, **settings)
