"""herbarium: hierarchical, long-tailed, fine-grained image classification.

One trunk, one head per taxonomic rank (species -> genus -> family), losses
for long tails and noisy labels, an Adam <-> SGD phased optimizer, and a
test-time-augmentation evaluator that writes a report.

Using a trained run from Python::

    import herbarium
    run = herbarium.load("runs/se50")
    predictions = run.predict(["sheet.jpg"], topk=5)
"""

import importlib
from typing import Any

__version__ = "0.1.0"  # pyproject.toml reads it from here
# The name pip knows the package by; "herbarium" on PyPI is an unrelated project. The import name stays herbarium.
DISTRIBUTION = "herbarium-taxa"

# Imported on first use: they bring in torch (seconds), timm and the evaluation code, which `--version` and
# `--help` do not need.
_LAZY = {"load": "herbarium.api", "Run": "herbarium.api", "Prediction": "herbarium.api",
         "DEFAULT_RANKS": "herbarium.taxonomy", "Taxonomy": "herbarium.taxonomy", "TaxonomyError": "herbarium.taxonomy"}

__all__ = ["DEFAULT_RANKS", "Prediction", "Run", "Taxonomy", "TaxonomyError", "__version__", "load"]


def __dir__() -> list[str]:
    """The module's names and the lazily imported ones, so ``dir(herbarium)`` and tab completion show ``load``."""
    return sorted({*globals(), *_LAZY})


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'herbarium' has no attribute {name!r}")
