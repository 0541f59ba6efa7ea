"""An export folder that timm itself loads: ``timm.create_model("local-dir:FOLDER", pretrained=True)``.

timm's ``local-dir:`` source reads ``FOLDER/config.json`` (``architecture``,
``num_features``, ``pretrained_cfg`` with mean/std/input size, ...) and the
trunk's own weights from ``FOLDER/model.safetensors``, keys as timm names
them. So the folder holds:

* ``model.safetensors``: the trunk alone, written as timm's own model with
  herbarium's pooling as its global pool (``avg`` or ``max``), so that
  ``model(images)`` gives the pooled features herbarium's heads read;
* ``heads.safetensors``: everything else of the model (the heads, the
  embedding, GeM's exponent), named as in herbarium's model;
* ``config.json``: written by timm's ``save_config_for_hf``, with the run's
  input size, mean/std and crop, the class names of every rank
  (``label_names_by_rank``) and herbarium's own config under ``herbarium``.

herbarium reads the two weight files back into one model
(:func:`merged_state`). Trunks timm cannot rebuild (``pretrainedmodels:``)
keep the whole model in ``model.safetensors`` and herbarium's config as
``config.json``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from timm.models._hub import save_config_for_hf
from torch import nn

from herbarium.data.transforms import DEFAULT_CROP_PCT
from herbarium.models.trunks import TimmTrunk

TRUNK_PREFIX = "trunk.model."  # where the timm model sits in herbarium's state dict
HEADS_FILE = "heads.safetensors"
TIMM_POOLS = {"avg": "avg", "max": "max"}  # herbarium's pools timm has under the same name; GeM it has not
METADATA = {"format": "pt", "producer": "herbarium"}


def timm_exportable(model: nn.Module) -> bool:
    return isinstance(model.trunk, TimmTrunk)


def write(model: nn.Module, folder: Path, run_config: dict[str, Any], label_names: dict[str, list[str]],
          size: int, mean: tuple[float, ...], std: tuple[float, ...], pool: str) -> list[Path]:
    """The trunk as timm saves a model, the rest beside it, and timm's config.json; returns the files."""
    trunk = copy.deepcopy(model.trunk.model)
    trunk.reset_classifier(0, global_pool=TIMM_POOLS.get(pool, ""))  # "" for GeM: timm gives the maps, pool them
    weights, heads = folder / "model.safetensors", folder / HEADS_FILE
    save_file({key: value.detach().contiguous() for key, value in trunk.state_dict().items()}, str(weights),
              metadata=METADATA)
    rest = {key: value.detach().contiguous() for key, value in model.state_dict().items()
            if not key.startswith(TRUNK_PREFIX)}
    save_file(rest, str(heads), metadata=METADATA)
    config = folder / "config.json"
    save_config_for_hf(trunk, str(config),
                       model_config={"pretrained_cfg": {"tag": "herbarium"}, "label_names_by_rank": label_names,
                                     "herbarium": run_config},
                       data_config={"input_size": (3, size, size), "mean": tuple(mean), "std": tuple(std),
                                    "crop_pct": DEFAULT_CROP_PCT, "interpolation": "bilinear"})
    return [weights, heads, config]


def is_timm_config(data: dict[str, Any]) -> bool:
    return "architecture" in data and "herbarium" in data


def merged_state(folder: Path) -> dict[str, torch.Tensor]:
    """herbarium's whole state dict from ``model.safetensors`` (the timm trunk) and ``heads.safetensors``."""
    trunk = load_file(str(folder / "model.safetensors"), device="cpu")
    return {**{TRUNK_PREFIX + key: value for key, value in trunk.items()},
            **load_file(str(folder / HEADS_FILE), device="cpu")}
