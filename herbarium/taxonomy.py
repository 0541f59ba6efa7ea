"""The label tree: ranks, class indices per rank, and parent links between ranks.

A taxonomy is built from *category records*, one per finest-rank class (a
species in Herbarium, a leaf category in a product catalogue). Each record
carries an id and one value per rank. The finest rank is keyed by category id,
because names there need not be unique (Herbarium 2022 species epithets repeat
across genera); coarser ranks are keyed by their value, which must name one
class with one parent.

Ranks are ordered coarse to fine (``family > genus > species``), as a
taxonomist reads them. Class indices are contiguous per rank and sorted by
value (category id at the finest rank), so they do not depend on record order.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch

from herbarium.errors import HerbariumError

DEFAULT_RANKS: tuple[str, ...] = ("family", "genus", "species")


class TaxonomyError(HerbariumError, ValueError):
    """The category records do not form a valid tree."""


def _examples(items: Sequence[Any], limit: int = 5) -> str:
    """First few offenders and how many there are, for error messages."""
    shown = ", ".join(repr(item) for item in items[:limit])
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return f"{shown}{more} ({len(items)} in all)"


@dataclass
class Taxonomy:
    """Ranks, class names per rank and the parent of every class.

    Build it with :meth:`from_categories`; the constructor takes the already
    validated tables and is what :meth:`from_dict` uses.
    """

    ranks: tuple[str, ...]
    category_ids: list[Any]
    names: dict[str, list[str]]
    # paths[i][r] = class index at rank r of the category with index i.
    paths: list[tuple[int, ...]]
    _category_index: dict[Any, int] = field(init=False, repr=False)
    # Tables derived from ``paths``, built on first use: at 65k categories a Python pass over the paths
    # takes a large fraction of a second, and evaluation asks for the same maps on every batch.
    _derived: dict[Any, torch.Tensor] = field(init=False, repr=False, compare=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.ranks = tuple(self.ranks)
        self.paths = [tuple(path) for path in self.paths]
        self._category_index = {cid: i for i, cid in enumerate(self.category_ids)}

    # ----------------------------------------------------------- construction
    @classmethod
    def from_categories(
        cls,
        categories: Iterable[Mapping[str, Any]],
        ranks: Sequence[str] = DEFAULT_RANKS,
        id_key: str = "id",
    ) -> "Taxonomy":
        """Validate category records and index them.

        Args:
            categories: one mapping per finest-rank class with ``id_key`` and
                one key per rank.
            ranks: rank names, coarse to fine.
            id_key: the key holding the category id.

        Raises:
            TaxonomyError: duplicate ids, a missing rank value, a rank the
                records do not have, or a class with two parents.
        """
        records = list(categories)
        ranks = tuple(ranks)
        if not ranks:
            raise TaxonomyError("a taxonomy needs at least one rank")
        if not records:
            raise TaxonomyError("no category records: the taxonomy is empty")
        _check_rank_names(records, ranks, id_key)
        _check_unique_ids(records, id_key)
        _check_values_present(records, ranks, id_key)
        _check_single_parents(records, ranks, id_key)

        records = sorted(records, key=lambda record: _sort_key(record[id_key]))
        category_ids = [record[id_key] for record in records]
        names: dict[str, list[str]] = {}
        for rank in ranks[:-1]:
            names[rank] = sorted({str(record[rank]) for record in records})
        names[ranks[-1]] = [str(record[ranks[-1]]) for record in records]

        index_of = {rank: {name: i for i, name in enumerate(names[rank])} for rank in ranks[:-1]}
        paths = []
        for finest_index, record in enumerate(records):
            coarse = tuple(index_of[rank][str(record[rank])] for rank in ranks[:-1])
            paths.append(coarse + (finest_index,))
        return cls(ranks=ranks, category_ids=category_ids, names=names, paths=paths)

    # ------------------------------------------------------------------ query
    @property
    def finest(self) -> str:
        """The finest rank, whose classes are the categories themselves."""
        return self.ranks[-1]

    @property
    def num_categories(self) -> int:
        return len(self.category_ids)

    def num_classes(self, rank: str) -> int:
        return len(self.names[self.check_rank(rank)])

    def check_rank(self, rank: str) -> str:
        """Return ``rank`` or fail with the ranks this taxonomy has."""
        if rank not in self.ranks:
            raise TaxonomyError(f"unknown rank {rank!r}; this taxonomy has ranks {list(self.ranks)}")
        return rank

    def rank_index(self, rank: str) -> int:
        return self.ranks.index(self.check_rank(rank))

    def has_category(self, category_id: Any) -> bool:
        return category_id in self._category_index

    def category_index(self, category_id: Any) -> int:
        """Finest-rank class index of a category id."""
        try:
            return self._category_index[category_id]
        except KeyError:
            raise TaxonomyError(f"category id {category_id!r} has no category record") from None

    def targets(self, category_id: Any, ranks: Sequence[str] | None = None) -> dict[str, int]:
        """Class index at each rank for one category id."""
        path = self.paths[self.category_index(category_id)]
        return {rank: path[self.rank_index(rank)] for rank in (ranks or self.ranks)}

    def path_table(self, ranks: Sequence[str] | None = None) -> torch.Tensor:
        """Class indices of every category at the given ranks: LongTensor [num_categories, len(ranks)]."""
        columns = [self.rank_index(rank) for rank in (ranks or self.ranks)]
        return self._full_path_table()[:, columns]  # indexing copies: the cached table stays untouched

    def parents(self, rank: str) -> torch.Tensor:
        """Index of each class's parent one rank up: LongTensor [num_classes(rank)].

        Used to decode consistent predictions (species -> genus -> family).
        """
        r = self.rank_index(rank)
        if r == 0:
            raise TaxonomyError(f"rank {rank!r} is the coarsest rank and has no parent")
        return self.ancestor_map(rank, self.ranks[r - 1])

    def ancestor_map(self, rank: str, ancestor: str) -> torch.Tensor:
        """Map classes of ``rank`` to their class at a coarser ``ancestor`` rank: LongTensor [num_classes(rank)].

        Built once per pair of ranks and cached; each call returns a copy.
        """
        r, a = self.rank_index(rank), self.rank_index(ancestor)
        if a > r:
            raise TaxonomyError(f"{ancestor!r} is finer than {rank!r}")
        key = ("ancestor", r, a)
        if key not in self._derived:
            table = self._full_path_table()  # [num_categories, num_ranks]
            mapping = torch.full((self.num_classes(rank),), -1, dtype=torch.long)
            mapping[table[:, r]] = table[:, a]  # every path through a class has the same ancestor: a tree
            self._derived[key] = mapping
        return self._derived[key].clone()

    def parents_among(self, levels: Sequence[str]) -> dict[str, tuple[str, torch.Tensor]]:
        """Each of ``levels`` with a coarser rank among them -> (the nearest such rank, ``ancestor_map`` to it).

        The tree a model sees when it trains on a subset of the ranks
        (``--levels species,family`` makes family the parent of species).
        """
        order = sorted(levels, key=self.rank_index)  # coarsest first
        return {rank: (coarser, self.ancestor_map(rank, coarser)) for coarser, rank in zip(order, order[1:])}

    def _full_path_table(self) -> torch.Tensor:
        """The cached LongTensor [num_categories, num_ranks] of ``paths``; callers must not modify it."""
        if "paths" not in self._derived:
            self._derived["paths"] = torch.tensor(self.paths, dtype=torch.long).reshape(len(self.paths), len(self.ranks))
        return self._derived["paths"]

    def counts(self, category_ids: Iterable[Any], rank: str) -> list[int]:
        """Number of samples per class at ``rank`` for a list of category ids."""
        r = self.rank_index(rank)
        counts = [0] * self.num_classes(rank)
        for category_id, n in Counter(category_ids).items():
            counts[self.paths[self.category_index(category_id)][r]] += n
        return counts

    # ------------------------------------------------------------- round trip
    def to_dict(self) -> dict[str, Any]:
        return {
            "ranks": list(self.ranks),
            "category_ids": list(self.category_ids),
            "names": {rank: list(values) for rank, values in self.names.items()},
            "paths": [list(path) for path in self.paths],
        }

    def fingerprint(self) -> str:
        """A short hash of the classes (ids, names per rank, paths) in index order: equal iff the heads mean the same classes.

        A checkpoint carries it, so that weights are never read with the
        class names of another run that happens to have as many classes.
        """
        text = json.dumps(self.to_dict(), sort_keys=True, ensure_ascii=False, default=str)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Taxonomy":
        return cls(
            ranks=tuple(data["ranks"]),
            category_ids=list(data["category_ids"]),
            names={rank: list(values) for rank, values in data["names"].items()},
            paths=[tuple(path) for path in data["paths"]],
        )


def _sort_key(value: Any) -> tuple[int, Any]:
    """Ids sort numerically when they are numbers and as text otherwise."""
    return (0, value) if isinstance(value, (int, float)) else (1, str(value))


def _check_rank_names(records: list[Mapping[str, Any]], ranks: tuple[str, ...], id_key: str) -> None:
    keys = set().union(*(record.keys() for record in records))
    if id_key not in keys:
        raise TaxonomyError(f"category records have no id field {id_key!r}; fields: {sorted(keys)}")
    missing = [rank for rank in ranks if rank not in keys]
    if missing:
        raise TaxonomyError(f"rank(s) {missing} not found in the category records; fields: {sorted(keys)}")


def _check_unique_ids(records: list[Mapping[str, Any]], id_key: str) -> None:
    counts = Counter(record[id_key] for record in records)
    duplicates = sorted((cid for cid, n in counts.items() if n > 1), key=_sort_key)
    if duplicates:
        raise TaxonomyError(f"duplicate category ids: {_examples(duplicates)}")


def _check_values_present(records: list[Mapping[str, Any]], ranks: tuple[str, ...], id_key: str) -> None:
    for rank in ranks:
        empty = [record[id_key] for record in records if record.get(rank) in (None, "")]
        if empty:
            raise TaxonomyError(f"categories with no {rank!r} value: {_examples(empty)}")


def _check_single_parents(records: list[Mapping[str, Any]], ranks: tuple[str, ...], id_key: str) -> None:
    """Every class above the finest rank must have exactly one parent."""
    for parent_rank, child_rank in zip(ranks[:-2], ranks[1:-1]):
        parents_of: dict[str, set[str]] = defaultdict(set)
        for record in records:
            parents_of[str(record[child_rank])].add(str(record[parent_rank]))
        conflicts = sorted(f"{child} (under {sorted(parents)})" for child, parents in parents_of.items() if len(parents) > 1)
        if conflicts:
            raise TaxonomyError(
                f"{child_rank} classes under more than one {parent_rank}: {_examples(conflicts)}"
            )
