"""Models: a trunk yields pooled features, a head per taxonomic rank maps them to logits.

``build_model(ModelConfig(...), {"species": 32093, "genus": 3678, "family": 310})``
returns a ``MultiRankModel`` whose forward gives ``{rank: logits}``.
"""
from .config import ModelConfig
from .heads import HEADS, ArcFaceHead, LinearHead, build_head
from .multi_rank import MultiRankModel, build_model, parents_in_state_dict
from .pooling import POOLS, GeM, GlobalAvgPool, GlobalMaxPool, build_pool
from .pretrained import (
    PACKAGED_WEIGHTS,
    PackagedWeights,
    WeightsReport,
    load_efficientnet_lite_imagenet,
    load_packaged_weights,
    load_trunk_weights,
    map_state_by_position,
    packaged_weights_for,
    pretrained_normalization,
    pretrained_source,
    read_state_dict,
)
from .hub import PretrainedWeightsError
from .trunks import (
    TRUNK_ALIASES, PretrainedModelsTrunk, TimmTrunk, Trunk, create_trunk, resolve_trunk_name,
)

__all__ = [
    "HEADS",
    "PACKAGED_WEIGHTS",
    "POOLS",
    "TRUNK_ALIASES",
    "ArcFaceHead",
    "GeM",
    "GlobalAvgPool",
    "GlobalMaxPool",
    "LinearHead",
    "ModelConfig",
    "MultiRankModel",
    "PackagedWeights",
    "PretrainedModelsTrunk",
    "PretrainedWeightsError",
    "TimmTrunk",
    "Trunk",
    "WeightsReport",
    "build_head",
    "build_model",
    "build_pool",
    "create_trunk",
    "load_efficientnet_lite_imagenet",
    "load_packaged_weights",
    "load_trunk_weights",
    "map_state_by_position",
    "packaged_weights_for",
    "parents_in_state_dict",
    "pretrained_normalization",
    "pretrained_source",
    "read_state_dict",
    "resolve_trunk_name",
]
