"""Mixup and CutMix for every rank at once (timm's ``Mixup``).

A mixed image is ``lam * image_i + (1 - lam) * image_j`` (or a pasted box of
``image_j``), so its target at every rank is the same mixture of the two
labels. timm's ``Mixup`` mixes one label set; here the one-hot targets of all
ranks are laid side by side and mixed as one multi-label vector, which gives
every rank the same pairs and the same ``lam``, then split back per rank.
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from timm.data import Mixup
from torch import Tensor


class RankMixup:
    """Mix a batch of images and turn its integer targets [B, R] into probability targets per rank.

    Args:
        classes_by_rank: classes of each rank, in the column order of the targets.
        mixup_alpha: Beta(alpha, alpha) of mixup; 0 turns mixup off.
        cutmix_alpha: Beta(alpha, alpha) of CutMix; 0 turns it off. With both
            on, each batch uses one of the two (timm's ``switch_prob`` 0.5).

    A target of -1 (no label at that rank) becomes a row of zeros, which the
    losses ignore. The random draws come from numpy's global generator, which
    checkpoints save and resumes restore.
    """

    def __init__(self, classes_by_rank: Mapping[str, int], mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0) -> None:
        if mixup_alpha <= 0 and cutmix_alpha <= 0:
            raise ValueError("RankMixup needs mixup_alpha > 0 or cutmix_alpha > 0")
        self.classes_by_rank = {rank: int(n) for rank, n in classes_by_rank.items()}
        self.mixer = Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, label_smoothing=0.0,
                           num_classes=sum(self.classes_by_rank.values()), multi_label=True)

    def dense_targets(self, targets: Tensor) -> Tensor:
        """[B, R] class indices (-1: none) -> [B, sum of classes] one-hot rows laid side by side."""
        parts = []
        for column, classes in enumerate(self.classes_by_rank.values()):
            labels = targets[:, column]
            parts.append(F.one_hot(labels.clamp(min=0), classes) * (labels >= 0).unsqueeze(1))
        return torch.cat(parts, dim=1).float()

    def __call__(self, images: Tensor, targets: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """images [B, 3, H, W], targets [B, R] -> (mixed images, {rank: [B, C_rank] probabilities})."""
        dense = self.dense_targets(targets)
        even = images.shape[0] - images.shape[0] % 2  # timm mixes pairs: an odd last image stays as it is
        if even >= 2:
            images = images.clone()
            images[:even], dense[:even] = self.mixer(images[:even], dense[:even])
        return images, dict(zip(self.classes_by_rank, dense.split(list(self.classes_by_rank.values()), dim=1)))
