"""herbarium: hierarchical, long-tailed, fine-grained image classification.

One trunk, one head per taxonomic rank (species -> genus -> family), losses
for long tails and noisy labels, an Adam <-> SGD phased optimizer, and a
test-time-augmentation evaluator that writes a report.
"""

from herbarium.taxonomy import DEFAULT_RANKS, Taxonomy, TaxonomyError

__version__ = "0.1.0"

__all__ = ["DEFAULT_RANKS", "Taxonomy", "TaxonomyError", "__version__"]
