"""The model's configuration: one typed dataclass, the single source of its defaults."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .heads import HEADS
from .pooling import POOLS


@dataclass
class ModelConfig:
    """What to build: trunk, pooling, optional embedding and one head per rank.

    Attributes:
        trunk: a timm model name (``legacy_seresnext50_32x4d``, ``resnet50``,
            ...), ``timm:NAME`` to bypass aliases, ``pretrainedmodels:NAME``
            for the Cadene ``pretrainedmodels`` package, or an alias with
            packaged weights (``efficientnet_lite0``/``1``/``2``).
        pretrained: load ImageNet weights shipped in an installed pip package;
            nothing is ever downloaded.
        weights: a local ``.safetensors`` / ``.pth`` state dict for the trunk.
        pool: global pooling, one of ``avg``, ``max``, ``gem``.
        dropout: dropout before each head (0.5 worked for AliProducts).
        embedding_dim: if > 0, a Linear + BatchNorm1d maps the pooled features
            to this size before the heads; 0 puts the heads on the pooled
            features directly.
        head: kind of head, one of ``heads.HEADS``.
        drop_path: stochastic depth rate of the trunk (timm trunks that
            support it).
    """

    trunk: str = "legacy_seresnext50_32x4d"
    pretrained: bool = False
    weights: str | None = None
    pool: str = "avg"
    dropout: float = 0.5
    embedding_dim: int = 0
    head: str = "linear"
    drop_path: float = 0.0

    def __post_init__(self) -> None:
        if self.pool not in POOLS:
            raise ValueError(f"unknown pool {self.pool!r}; valid choices: {', '.join(POOLS)}")
        if self.head not in HEADS:
            raise ValueError(f"unknown head {self.head!r}; valid choices: {', '.join(HEADS)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {self.drop_path}")
        if self.embedding_dim < 0:
            raise ValueError(f"embedding_dim must be >= 0 (0 = no embedding), got {self.embedding_dim}")
        if self.pretrained and self.weights:
            raise ValueError(
                "pretrained=True and weights=FILE both ask for trunk weights; choose one"
            )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelConfig":
        """Build from ``to_dict()`` output; unknown keys are an error, missing ones take defaults."""
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"unknown ModelConfig keys {unknown}; valid keys: {', '.join(sorted(known))}"
            )
        return cls(**values)
