"""The model's configuration: one typed dataclass, the single source of its defaults and help texts."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from herbarium.config_json import from_json
from herbarium.options import option

from .heads import HEADS
from .pooling import POOLS


@dataclass
class ModelConfig:
    """What to build: trunk, pooling, optional embedding and one head per rank.

    Each field's help says what it sets; ``train.py --help`` shows them all.
    """

    trunk: str = option(
        "legacy_seresnext50_32x4d", "a timm model name (legacy_seresnext50_32x4d, resnet50, ...), timm:NAME to bypass "
                                    "aliases, pretrainedmodels:NAME for the Cadene pretrainedmodels package, or an alias "
                                    "with packaged weights (efficientnet_lite0/1/2)")
    pretrained: bool = option(
        True, "start from ImageNet weights: packaged for efficientnet_lite0/1/2, else timm's own from its hub cache "
              "(downloaded there when online; HF_HUB_OFFLINE=1 honoured); offline without them, stops at once saying "
              "which file to get. --no-pretrained: random weights", flag="--pretrained", negate="--no-pretrained",
        default_text="pretrained")
    weights: str | None = option(None, "local trunk weights: .pth/.pt or .safetensors; they take the place of the "
                                       "pretrained ones", aliases=("--trunk-weights",))
    pool: str = option("avg", "global pooling of the trunk's features", choices=POOLS)
    dropout: float = option(0.0, "dropout before each head; none by default, as in timm's train.py (0.2 scored below none "
                                 "on average on each of four long-tailed splits, see BENCHMARKS.md; 0.5 is the card's, "
                                 "for training from scratch)", default_text="0, none")
    embedding_dim: int = option(0, "if > 0, a Linear + BatchNorm1d maps the pooled features to this size before the "
                                   "heads; 0 puts the heads on the pooled features directly")
    head: str = option("linear", "head of every rank: linear, or arcface (scaled cosines, angular margin in training)",
                       choices=HEADS)
    arcface_levels: tuple[str, ...] = option((), "ranks that get an ArcFace head alongside --head for the others, "
                                                 "e.g. species")
    arcface_margin: float = option(0.3, "ArcFace additive angular margin in radians")
    arcface_scale: float = option(30.0, "ArcFace scale: logits are scale * cosine")
    arcface_subcenters: int = option(1, "ArcFace centres per class, > 1 for sub-centre ArcFace")
    drop_path: float = option(0.0, "stochastic depth rate of the trunk, timm trunks that support it")
    tree_logits: bool = option(False, "each class's logit is its head's score plus its parent's composed logit, up the "
                                      "levels (tree-based priors): a species seen once starts from its genus's and "
                                      "family's scores; every rank's loss, TTA and decoding read the composed logits")

    def __post_init__(self) -> None:
        self.arcface_levels = tuple(self.arcface_levels)  # JSON gives a list
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
        if not 0.0 <= self.arcface_margin < math.pi / 2:
            raise ValueError(f"arcface_margin must be in [0, pi/2) radians, got {self.arcface_margin}")
        if self.arcface_scale <= 0:
            raise ValueError(f"arcface_scale must be > 0, got {self.arcface_scale}")
        if self.arcface_subcenters < 1:
            raise ValueError(f"arcface_subcenters must be >= 1, got {self.arcface_subcenters}")
        if self.weights:
            self.pretrained = False  # a weights file takes the place of the pretrained weights, and the config says so

    def head_of(self, rank: str) -> str:
        """The kind of head ``rank`` gets."""
        return "arcface" if rank in self.arcface_levels else self.head

    def head_settings(self, kind: str) -> dict[str, float]:
        """Keyword settings of a head of ``kind`` (ArcFace's margin, scale and sub-centres)."""
        if kind != "arcface":
            return {}
        return {"margin": self.arcface_margin, "scale": self.arcface_scale, "subcenters": self.arcface_subcenters}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], section: str = "model") -> "ModelConfig":
        """Build from ``to_dict()`` output; unknown keys are an error, missing ones take defaults (see config_json)."""
        return from_json(cls, values, section)
