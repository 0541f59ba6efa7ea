"""Trunks: images [B, 3, H, W] -> pooled features [B, F], at any input size.

Two sources of architectures:

* timm (any ``timm.list_models()`` name). The default,
  ``legacy_seresnext50_32x4d``, has the same layers and state-dict keys as the
  ``se_resnext50_32x4d`` of the Cadene ``pretrainedmodels`` package used by
  the Herbarium 2020 solutions, so those weight files load unchanged.
* ``pretrainedmodels:NAME`` (the Cadene package). Its models end in a fixed
  7x7 average pool that only fits 224 px inputs, so only ``features()`` is
  used here and our own pooling follows.

Models are built with random initialisation and weights come from local
files or installed packages (see ``pretrained.py``), except for a timm
model's own ImageNet weights (pretrained, the default, for any trunk without
packaged weights): timm reads them from the hub's cache, or downloads them
there when the hub can be reached; when neither works,
:class:`~herbarium.models.hub.PretrainedWeightsError` says at once what to
do (see :mod:`herbarium.models.hub`).
"""
from __future__ import annotations

import difflib

import timm
import torch
import torch.nn as nn

from .config import ModelConfig
from .hub import PretrainedWeightsError, create_pretrained
from .pooling import build_pool

# Names that mean "this timm architecture, with weights from a pip package".
# The aliases always apply, pretrained or not, so that a run trained with
# pretrained=True is rebuilt identically for evaluation. ``timm:NAME`` reaches
# timm's own model of the same name.
TRUNK_ALIASES: dict[str, str] = {
    "efficientnet_lite0": "tf_efficientnet_lite0",
    "efficientnet_lite1": "tf_efficientnet_lite1",
    "efficientnet_lite2": "tf_efficientnet_lite2",
}

TIMM_PREFIX = "timm:"
PRETRAINEDMODELS_PREFIX = "pretrainedmodels:"


def resolve_trunk_name(trunk: str) -> tuple[str, str]:
    """Split a trunk name into ``(source, architecture)``.

    ``source`` is ``"timm"`` or ``"pretrainedmodels"``; aliases are resolved.
    The architecture is not checked here (see ``create_trunk``).
    """
    if trunk.startswith(PRETRAINEDMODELS_PREFIX):
        return "pretrainedmodels", trunk[len(PRETRAINEDMODELS_PREFIX):]
    if trunk.startswith(TIMM_PREFIX):
        return "timm", trunk[len(TIMM_PREFIX):]
    return "timm", TRUNK_ALIASES.get(trunk, trunk)


class Trunk(nn.Module):
    """A backbone plus global pooling.

    ``forward_maps`` gives the un-pooled output of the backbone (for class
    activation maps); ``forward`` gives pooled features [B, num_features].

    Attributes:
        model: the wrapped backbone; weight files are loaded into it.
        pool: the global pooling module.
        source: ``"timm"`` or ``"pretrainedmodels"``.
        model_name: the architecture's name in its source.
        num_features: F, the size of the pooled features.
    """

    source: str = ""

    def __init__(self, model: nn.Module, pool: nn.Module, model_name: str, num_features: int) -> None:
        super().__init__()
        self.model = model
        self.pool = pool
        self.model_name = model_name
        self.num_features = num_features

    def forward_maps(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class TimmTrunk(Trunk):
    """A timm model built with ``num_classes=0, global_pool=''``, pooled by us.

    After pooling, timm's ``forward_head(..., pre_logits=True)`` still runs on
    the 1x1 result, because some models keep layers there (MobileNetV3's
    1x1 conv head, ConvNeXt's final norm); skipping them would leave
    parameters that never get a gradient.
    """

    source = "timm"

    def __init__(self, model: nn.Module, pool: nn.Module, model_name: str) -> None:
        num_features = getattr(model, "head_hidden_size", None) or model.num_features
        super().__init__(model, pool, model_name, num_features)
        # Hierarchical transformers (Swin) return channels-last maps.
        self.channels_last_maps = getattr(model, "output_fmt", "NCHW") == "NHWC"

    def forward_maps(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        maps = self.model.forward_features(images)
        if maps.ndim == 3:
            # Token sequences [B, L, C] (ViT family): pool over all tokens.
            pooled = self.pool(maps.transpose(1, 2).unsqueeze(-1))  # [B, C]
            pooled_map = pooled[:, None, :]  # [B, 1, C]
        elif self.channels_last_maps:
            pooled = self.pool(maps.permute(0, 3, 1, 2))  # [B, H, W, C] -> [B, C]
            pooled_map = pooled[:, None, None, :]  # [B, 1, 1, C]
        else:
            pooled = self.pool(maps)  # [B, C, H, W] -> [B, C]
            pooled_map = pooled[:, :, None, None]  # [B, C, 1, 1]
        return self.model.forward_head(pooled_map, pre_logits=True).flatten(1)  # [B, F]


class PretrainedModelsTrunk(Trunk):
    """A Cadene ``pretrainedmodels`` model: ``features()`` then our pooling.

    Its ``last_linear`` is replaced by an identity (heads are ours, and unused
    parameters would upset DistributedDataParallel). Models whose ``logits()``
    does more than pool and classify (the NASNet family applies a final ReLU)
    lose that step here.
    """

    source = "pretrainedmodels"

    def __init__(self, model: nn.Module, pool: nn.Module, model_name: str) -> None:
        classifier = model.last_linear
        num_features = getattr(classifier, "in_features", None) or classifier.in_channels
        model.last_linear = nn.Identity()
        super().__init__(model, pool, model_name, num_features)

    def forward_maps(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.features(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.pool(self.model.features(images))  # [B, C, H, W] -> [B, C]


def _near_matches(name: str, candidates: list[str]) -> str:
    matches = difflib.get_close_matches(name, candidates, n=5, cutoff=0.6)
    return f"; close matches: {', '.join(matches)}" if matches else ""


def _create_timm_model(name: str, drop_path: float, pretrained: bool = False) -> nn.Module:
    if not timm.is_model(name):
        raise ValueError(
            f"{name!r} is not a timm model{_near_matches(name, timm.list_models())}. "
            f"timm.list_models('*pattern*') lists the names; other trunks: "
            f"{', '.join(TRUNK_ALIASES)} (packaged weights) or {PRETRAINEDMODELS_PREFIX}NAME"
        )
    kwargs = {"drop_path_rate": drop_path} if drop_path > 0 else {}
    try:
        if pretrained:
            return create_pretrained(name, num_classes=0, global_pool="", **kwargs)
        return timm.create_model(name, pretrained=False, num_classes=0, global_pool="", **kwargs)
    except TypeError as err:
        if kwargs:
            raise ValueError(f"timm model {name!r} does not support drop_path: {err}") from err
        raise


def import_pretrainedmodels():
    """Import the Cadene package lazily, with an install hint if it (or six) is missing."""
    try:
        import pretrainedmodels
    except ImportError as err:
        raise ImportError(
            f"{PRETRAINEDMODELS_PREFIX}NAME trunks need the pretrainedmodels package and six: "
            f"pip install pretrainedmodels six ({err})"
        ) from err
    return pretrainedmodels


def _create_pretrainedmodels_model(name: str, drop_path: float) -> nn.Module:
    pretrainedmodels = import_pretrainedmodels()
    if name not in pretrainedmodels.model_names:
        raise ValueError(
            f"{name!r} is not a pretrainedmodels model"
            f"{_near_matches(name, list(pretrainedmodels.model_names))}; "
            f"valid names: pretrainedmodels.model_names"
        )
    if drop_path > 0:
        raise ValueError(f"{PRETRAINEDMODELS_PREFIX}{name} does not support drop_path; set it to 0")
    # pretrained=None builds with random initialisation and downloads nothing.
    return pretrainedmodels.__dict__[name](num_classes=1000, pretrained=None)


def create_trunk(cfg: ModelConfig, timm_pretrained: bool = False) -> tuple[Trunk, int]:
    """Build the trunk named by ``cfg.trunk`` with random initialisation, or with timm's own
    pretrained weights when ``timm_pretrained`` (see :mod:`herbarium.models.hub`).

    Returns:
        ``(trunk, num_features)``: ``trunk(images)`` maps [B, 3, H, W] to
        pooled features [B, num_features] for any H, W the architecture
        accepts.
    """
    source, name = resolve_trunk_name(cfg.trunk)
    pool = build_pool(cfg.pool)
    if source == "pretrainedmodels":
        trunk: Trunk = PretrainedModelsTrunk(_create_pretrainedmodels_model(name, cfg.drop_path), pool, name)
    else:
        trunk = TimmTrunk(_create_timm_model(name, cfg.drop_path, timm_pretrained), pool, name)
    return trunk, trunk.num_features
