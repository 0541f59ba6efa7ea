"""The samples of a split as a few arrays instead of a list of objects.

A list of 2.26 million :class:`~herbarium.data.readers.Sample` objects (the
Herbarium 2021 train split) costs about a gigabyte per process, and every
DataLoader worker touches, and so copies, its reference counts. A
:class:`SampleTable` holds the same samples as numpy arrays (image ids,
UTF-8 file names, category ids and whether each has one) that can be saved
as ``.npy`` files and memory-mapped: processes on one machine share their
pages, and nothing is copied into the workers. It is a sequence of
``Sample`` (``table[i]``, ``len``, iteration), so code written for the list
still works; the vectorised questions (class indices under a taxonomy,
labelled or not) are answered on the arrays.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd

from herbarium.data.readers import Sample
from herbarium.taxonomy import Taxonomy, TaxonomyError

ARRAYS = ("image_ids", "file_names", "category_ids", "labelled")
UNLABELLED, UNKNOWN = -1, -2  # class indices of a sample without a label, and of one whose category has no record


def _id_array(values: Sequence[Any]) -> np.ndarray:
    """Integers stay int64 (the Herbarium layouts); anything else is kept as text, as fixed-width unicode."""
    if all(isinstance(value, (int, np.integer)) and not isinstance(value, bool) for value in values):
        return np.asarray(values, dtype=np.int64)
    return np.asarray([str(value) for value in values], dtype=np.str_)


class SampleTable(Sequence):
    """Samples as arrays: ``image_ids`` [N], ``file_names`` [N] (UTF-8 bytes), ``category_ids`` [N], ``labelled`` [N] bool."""

    def __init__(self, image_ids: np.ndarray, file_names: np.ndarray, category_ids: np.ndarray, labelled: np.ndarray) -> None:
        self.image_ids, self.file_names = image_ids, file_names
        self.category_ids, self.labelled = category_ids, labelled

    @classmethod
    def from_samples(cls, samples: Sequence[Sample]) -> "SampleTable":
        labelled = np.fromiter((s.category_id is not None for s in samples), dtype=bool, count=len(samples))
        first_label = next((s.category_id for s in samples if s.category_id is not None), 0)
        categories = _id_array([first_label if s.category_id is None else s.category_id for s in samples])
        names = np.asarray([s.file_name.encode("utf-8") for s in samples], dtype=np.bytes_)
        return cls(_id_array([s.image_id for s in samples]), names, categories, labelled)

    # ------------------------------------------------------------- sequence
    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.take(np.arange(len(self))[index])
        return Sample(self.image_ids[index].item(), self.file_names[index].decode("utf-8"),
                      self.category_ids[index].item() if self.labelled[index] else None)

    def __iter__(self) -> Iterator[Sample]:
        for index in range(len(self)):
            yield self[index]

    def __add__(self, other: Sequence[Sample]) -> list[Sample]:
        """Joined with other samples: a list, as two lists joined would be."""
        return list(self) + list(other)

    def __radd__(self, other: Sequence[Sample]) -> list[Sample]:
        return list(other) + list(self)

    def __mul__(self, times: int) -> list[Sample]:
        return list(self) * times

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None

    def take(self, indices: np.ndarray) -> "SampleTable":
        """The samples at ``indices`` (a boolean mask or positions), as a new table in memory."""
        return SampleTable(*(np.asarray(getattr(self, name))[indices] for name in ARRAYS))

    # ----------------------------------------------------------- questions
    def category_indices(self, taxonomy: Taxonomy) -> np.ndarray:
        """Finest-rank class index of every sample under ``taxonomy``: int64 [N], :data:`UNLABELLED` or :data:`UNKNOWN`."""
        integers = self.category_ids.dtype.kind == "i" and all(isinstance(c, int) for c in taxonomy.category_ids)
        known = pd.Index(list(taxonomy.category_ids) if integers else [str(c) for c in taxonomy.category_ids])
        indices = known.get_indexer(np.asarray(self.category_ids)).astype(np.int64)
        indices[indices < 0] = UNKNOWN
        indices[~np.asarray(self.labelled)] = UNLABELLED
        return indices

    def image_id_text(self) -> np.ndarray:
        """Image ids as text (how lists of ids in CSV files name them)."""
        return np.asarray(self.image_ids).astype(np.str_)

    # ---------------------------------------------------------------- files
    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for name in ARRAYS:
            np.save(folder / f"{name}.npy", np.asarray(getattr(self, name)), allow_pickle=False)

    @classmethod
    def load(cls, folder: Path) -> "SampleTable":
        """Memory-mapped: every process reading the same files shares their pages."""
        return cls(*(np.load(folder / f"{name}.npy", mmap_mode="r", allow_pickle=False) for name in ARRAYS))


def category_indices(samples: Sequence[Sample], taxonomy: Taxonomy) -> np.ndarray:
    """Finest-rank class index of every sample (int64 [N], :data:`UNLABELLED` or :data:`UNKNOWN`), a table or a list alike."""
    if isinstance(samples, SampleTable):
        return samples.category_indices(taxonomy)
    ids = pd.Series([s.category_id for s in samples], dtype=object)
    indices = pd.Index(list(taxonomy.category_ids), dtype=object).get_indexer(ids).astype(np.int64)
    indices[indices < 0] = UNKNOWN
    indices[ids.isna().to_numpy()] = UNLABELLED
    return indices


def take_samples(samples: Sequence[Sample], indices: np.ndarray) -> Sequence[Sample]:
    """The samples at ``indices`` (positions, in order), as a table for a table and a list for a list."""
    if isinstance(samples, SampleTable):
        return samples.take(indices)
    return [samples[i] for i in indices.tolist()]


def image_id_texts(samples: Sequence[Sample]) -> np.ndarray:
    """Every sample's image id as text, as lists of ids in CSV files name them."""
    if isinstance(samples, SampleTable):
        return samples.image_id_text()
    return np.asarray([str(s.image_id) for s in samples], dtype=np.str_)


def category_keys(samples: Sequence[Sample]) -> np.ndarray:
    """Every sample's category id as text (``"None"`` unlabelled): what a split stratifies on."""
    if isinstance(samples, SampleTable):
        return np.where(np.asarray(samples.labelled), np.asarray(samples.category_ids).astype(np.str_), "None")
    return np.asarray([str(s.category_id) for s in samples], dtype=np.str_)


def class_counts(samples: Sequence[Sample], taxonomy: Taxonomy, rank: str) -> list[int]:
    """Labelled samples per class at ``rank`` (``Taxonomy.counts`` of their category ids), in one bincount."""
    indices = category_indices(samples, taxonomy)
    if (indices == UNKNOWN).any():
        first = samples[int(np.flatnonzero(indices == UNKNOWN)[0])]
        raise TaxonomyError(f"category id {first.category_id!r} has no category record")
    classes = taxonomy.path_table([rank])[:, 0].numpy()[indices[indices >= 0]]
    return np.bincount(classes, minlength=taxonomy.num_classes(rank)).tolist()
