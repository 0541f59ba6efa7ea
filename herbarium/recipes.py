"""Named recipes: sets of training defaults a run can start from with ``--recipe NAME``.

A recipe only moves defaults: a flag given on the command line still wins.
Each entry maps a ``train.py`` option (its argparse ``dest``) to the value
the recipe gives it.

* ``default``: the library's defaults (see :mod:`herbarium.config`), chosen on
  validation data: AdamW with a warm-up and a cosine to 0, logit-adjusted
  cross-entropy per rank, the pretrained weights' own normalisation, every
  training image used when no validation split is named.
* ``herbarium2020``: the Herbarium 2020 write-up's recipe (the design card's):
  Adam at 3e-4 halved every 5 epochs, a class-weighted (effective-number)
  focal loss per rank with rank weights 1.5 x species + genus + family,
  dropout 0.5 and a 10% stratified hold-out for validation.
"""

from __future__ import annotations

from typing import Any

RECIPES: dict[str, dict[str, Any]] = {
    "default": {},
    "herbarium2020": {
        "optim": "adam:0",
        "schedule": "step:5",
        "loss": "focal",
        "class_weights": "effective",
        "level_weights": {"species": 1.5},
        "dropout": 0.5,
        "holdout": 0.1,
    },
}


def recipe_defaults(name: str) -> dict[str, Any]:
    """The option defaults recipe ``name`` sets (argparse ``dest`` -> value)."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; valid recipes: {', '.join(RECIPES)}")
    return dict(RECIPES[name], recipe=name)
