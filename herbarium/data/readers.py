"""Readers for the dataset layouts people actually have.

Every reader turns a layout into the same thing: a :class:`DatasetSplit`, a
list of samples (image id, file relative to an image root, category id or
``None``) and the :class:`~herbarium.taxonomy.Taxonomy` of the categories.

Layouts, detected from the files present under ``DATA``:

* Herbarium 2020 / 2021 (``DATA/<split>/metadata.json``; ``DATA`` may also be
  the split folder itself). 2021 categories have ``order`` and no ``genus``:
  the genus is the first word of the species name.
* Herbarium 2022 (``DATA/<split>_metadata.json``, images under
  ``DATA/<split>_images/``; the test file is a bare list of images).
* A CSV manifest (``DATA/<split>.csv``): one row per image, a path column and
  one column per rank.

A test split without annotations is read for prediction; its labels may come
from a separate ``image_id,category_id`` CSV (``labels=``, or the split's own
``labels.csv`` when its metadata has none).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from herbarium.data.confine import confined
from herbarium.errors import HerbariumError
from herbarium.taxonomy import DEFAULT_RANKS, Taxonomy, TaxonomyError


class DatasetError(HerbariumError, ValueError):
    """The dataset's files are missing, malformed or inconsistent."""


@dataclass(frozen=True)
class Sample:
    image_id: Any
    file_name: str  # relative to DatasetSplit.image_root
    category_id: Any | None = None


@dataclass
class DatasetSplit:
    """One split of a dataset: its samples, where their files live, and the taxonomy."""

    name: str
    image_root: Path
    samples: Sequence[Sample]  # a list, or a memory-mapped SampleTable (herbarium.data.sample_table) read from the index
    taxonomy: Taxonomy
    source: Path
    layout: str
    notes: list[str] = field(default_factory=list)

    @property
    def labelled(self) -> bool:
        return all(sample.category_id is not None for sample in self.samples)

    def path(self, sample: Sample) -> Path:
        return self.image_root / sample.file_name

    def readable_path(self, sample: Sample) -> Path:
        """The file to open for ``sample``: refused when a symbolic link takes it out of the root (see confine)."""
        return confined(self.path(sample), self.image_root, sample.image_id)

    def category_ids(self) -> list[Any]:
        return [sample.category_id for sample in self.samples]

    def __len__(self) -> int:
        return len(self.samples)


# --------------------------------------------------------------------- helpers
BYTE_ORDER_MARKS = (  # longest first: the UTF-32 LE mark starts with the UTF-16 LE one
    (b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"),
    (b"\xef\xbb\xbf", "UTF-8 with a byte-order mark (BOM)"), (b"\xff\xfe", "UTF-16"), (b"\xfe\xff", "UTF-16"),
)


def check_encoding(raw: bytes, path: Path, *, allow_utf8_bom: bool = False) -> None:
    """Name an encoding problem as one: a UTF-16/32 file, or a UTF-8 byte-order mark where JSON forbids it.

    Metadata must be UTF-8 (latin-1 is read too, for the Herbarium 2020 train
    file). Without this check such files read as "not valid JSON" or as
    garbled text.
    """
    head = raw[:4]
    for mark, name in BYTE_ORDER_MARKS:
        if head.startswith(mark):
            if allow_utf8_bom and mark == b"\xef\xbb\xbf":
                return
            wanted = "UTF-8" if allow_utf8_bom else "UTF-8 without a byte-order mark"
            raise DatasetError(f"{path}: encoding problem: the file is {name}; it must be {wanted} "
                               "(re-save it as UTF-8, e.g. with iconv -t UTF-8, or as 'UTF-8' rather than 'UTF-8 with BOM')")
    if b"\x00" in raw[:4096]:
        raise DatasetError(f"{path}: encoding problem: the file holds NUL bytes, as UTF-16 or UTF-32 text does; "
                           "metadata must be UTF-8 (re-save it as UTF-8)")


def read_csv_table(path: Path, **options: Any) -> pd.DataFrame:
    """``pd.read_csv`` with encoding problems named (a UTF-8 BOM, as spreadsheets write, is fine)."""
    path = Path(path)
    with open(path, "rb") as handle:
        check_encoding(handle.read(4096), path, allow_utf8_bom=True)
    try:
        return pd.read_csv(path, encoding="utf-8", **options)
    except UnicodeDecodeError as error:
        raise DatasetError(f"{path}: encoding problem: not valid UTF-8 ({error.reason} at byte {error.start}); "
                           "re-save it as UTF-8") from None


def read_json(path: Path) -> Any:
    """Read JSON, falling back to latin-1: the Herbarium 2020 train file is not valid UTF-8."""
    raw = Path(path).read_bytes()
    check_encoding(raw, path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise DatasetError(f"{path}: not valid JSON ({error})") from None


def safe_relative_path(file_name: str, image_id: Any, source: Path) -> str:
    """Refuse paths that would leave the dataset root (absolute, or climbing with '..')."""
    text = str(file_name).replace("\\", "/")
    normal = os.path.normpath(text).replace("\\", "/") if text else ""
    if not text or text.startswith("/") or PurePosixPath(text).is_absolute() or normal == ".." or normal.startswith("../") or ":" in PurePosixPath(text).parts[0]:
        raise DatasetError(f"{source}: image {image_id!r} has path {file_name!r}, which escapes the dataset root")
    return normal


# Paths os.path.normpath would change ('.', '..', empty segments, a trailing slash) or that may escape the root.
NEEDS_A_CLOSER_LOOK = r"(?:^|/)\.\.?(?:/|$)|//|/$|^/|^[^/]*:|^$"


def safe_relative_paths(file_names: Sequence[Any], image_ids: Sequence[Any], source: Path) -> list[str]:
    """:func:`safe_relative_path` over a whole column at once.

    One vectorised pass finds the few paths that need normalising or may
    escape the root; only those go through the per-path check, so a
    2-million-image split costs a second, not a minute.
    """
    names = pd.Series(file_names, dtype=object).astype(str).str.replace("\\", "/", regex=False)
    for position in np.flatnonzero(names.str.contains(NEEDS_A_CLOSER_LOOK, regex=True).to_numpy()):
        names.iat[position] = safe_relative_path(file_names[position], image_ids[position], source)
    return names.tolist()


def _require(record: Mapping[str, Any], key: str, what: str, source: Path) -> Any:
    if key not in record:
        raise DatasetError(f"{source}: {what} record has no {key!r} field: {dict(list(record.items())[:6])}")
    return record[key]


# ----------------------------------------------------------- category records
def _categories_2020(categories: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [{**c, "species": c.get("name")} for c in categories]


def _categories_2021(categories: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    records = []
    for c in categories:
        name = str(c.get("name") or "")
        records.append({**c, "species": name or None, "genus": c.get("genus") or (name.split()[0] if name else None)})
    return records


def _categories_2022(categories: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    records = []
    for c in categories:
        species = c.get("scientificName") or " ".join(str(c[k]) for k in ("genus", "species") if c.get(k))
        records.append({**c, "id": c.get("category_id"), "species": species or None})
    return records


def _coco_layout(categories: list[Mapping[str, Any]]) -> str:
    """Herbarium 2021 categories carry an order and no genus."""
    has_genus = any("genus" in c for c in categories)
    return "herbarium2021" if not has_genus and any("order" in c for c in categories) else "herbarium2020"


# ------------------------------------------------------------------- labels
def read_labels_csv(path: Path) -> dict[str, Any]:
    """``image_id,category_id`` rows -> {str(image_id): category_id}."""
    frame = read_csv_table(path, dtype=str)
    missing = {"image_id", "category_id"} - set(frame.columns)
    if missing:
        raise DatasetError(f"{path}: labels CSV needs columns image_id,category_id; missing {sorted(missing)}")
    check_unique(frame["image_id"], "image ids", path)
    return {row.image_id: _as_id(row.category_id) for row in frame.itertuples(index=False)}


def _as_id(value: Any) -> Any:
    """Ids read from text become ints when they are integers, as in the metadata."""
    text = str(value).strip()
    try:
        return int(text)
    except ValueError:
        return text


def check_unique(ids: Sequence[Any], what: str, source: Path) -> None:
    """Refuse ids that repeat (an image listed twice, two annotations for one image), naming them.

    A repeated id would silently give one image the other's label, or let
    the last annotation win; pandas finds them in one pass over millions.
    """
    series = pd.Series(ids, dtype=object)
    repeated = series[series.duplicated()].drop_duplicates()
    if len(repeated):
        shown = ", ".join(repr(value) for value in repeated.head(5))
        raise DatasetError(f"{source}: {what} that appear more than once: {shown} ({len(repeated)} repeated in all); "
                           "each may appear once")


def _apply_labels(samples: list[Sample], labels: Mapping[str, Any], source: Path) -> list[Sample]:
    unlabelled = [s.image_id for s in samples if str(s.image_id) not in labels]
    if unlabelled:
        raise DatasetError(f"{source}: no label for images {unlabelled[:5]} ({len(unlabelled)} in all)")
    return [Sample(s.image_id, s.file_name, labels[str(s.image_id)]) for s in samples]


def _check_categories_known(samples: list[Sample], taxonomy: Taxonomy, source: Path) -> None:
    unknown = [(s.image_id, s.category_id) for s in samples if s.category_id is not None and not taxonomy.has_category(s.category_id)]
    if unknown:
        shown = ", ".join(f"image {i!r} -> category {c!r}" for i, c in unknown[:5])
        raise DatasetError(f"{source}: annotations whose category has no record: {shown} ({len(unknown)} in all)")


# -------------------------------------------------------------------- readers
def _read_coco(metadata_path: Path, ranks: Sequence[str], taxonomy: Taxonomy | None) -> tuple[list[Sample], Taxonomy | None, str]:
    """Herbarium 2020/2021: images and annotations are index-aligned; we join by image id anyway."""
    meta = read_json(metadata_path)
    if not isinstance(meta, dict) or "images" not in meta:
        raise DatasetError(f"{metadata_path}: expected a JSON object with an 'images' list")
    categories = meta.get("categories") or []
    layout = _coco_layout(categories) if categories else "herbarium2020"
    if categories and taxonomy is None:
        to_records = _categories_2021 if layout == "herbarium2021" else _categories_2020
        taxonomy = Taxonomy.from_categories(to_records(categories), ranks)
    label_of = {}
    check_unique([a.get("image_id") if isinstance(a, dict) else None for a in meta.get("annotations") or []],
                 "annotations of images", metadata_path)
    for annotation in meta.get("annotations") or []:
        label_of[_require(annotation, "image_id", "annotation", metadata_path)] = _require(annotation, "category_id", "annotation", metadata_path)
    image_ids = [_require(image, "id", "image", metadata_path) for image in meta["images"]]
    file_names = safe_relative_paths([_require(image, "file_name", "image", metadata_path) for image in meta["images"]],
                                     image_ids, metadata_path)
    samples = [Sample(image_id, file_name, label_of.get(image_id)) for image_id, file_name in zip(image_ids, file_names)]
    return samples, taxonomy, layout


def _read_2022(metadata_path: Path, ranks: Sequence[str], taxonomy: Taxonomy | None) -> tuple[list[Sample], Taxonomy | None, str]:
    """Herbarium 2022: string image ids; the test metadata is a bare list of images."""
    meta = read_json(metadata_path)
    if isinstance(meta, list):
        images, annotations, categories = meta, [], []
    else:
        images, annotations, categories = meta.get("images", []), meta.get("annotations", []), meta.get("categories", [])
    if categories and taxonomy is None:
        taxonomy = Taxonomy.from_categories(_categories_2022(categories), ranks)
    label_of = {_require(a, "image_id", "annotation", metadata_path): _require(a, "category_id", "annotation", metadata_path) for a in annotations}
    check_unique([a["image_id"] for a in annotations], "annotations of images", metadata_path)
    image_ids = [_require(image, "image_id", "image", metadata_path) for image in images]
    file_names = safe_relative_paths([_require(image, "file_name", "image", metadata_path) for image in images],
                                     image_ids, metadata_path)
    samples = [Sample(image_id, file_name, label_of.get(image_id)) for image_id, file_name in zip(image_ids, file_names)]
    return samples, taxonomy, "herbarium2022"


@dataclass(frozen=True)
class CsvColumns:
    """Column names of a CSV manifest; ``ranks`` maps rank name -> column (default: same name)."""

    path: str = "path"
    image_id: str = "image_id"
    category_id: str = "category_id"
    ranks: Mapping[str, str] = field(default_factory=dict)

    def rank_column(self, rank: str) -> str:
        return self.ranks.get(rank, rank)


def _read_csv_manifest(path: Path, ranks: Sequence[str], taxonomy: Taxonomy | None, columns: CsvColumns = CsvColumns()) -> tuple[list[Sample], Taxonomy | None, str]:
    frame = read_csv_table(path, dtype=str, keep_default_na=False)
    path_column = columns.path if columns.path in frame.columns else "file_name"
    if path_column not in frame.columns:
        raise DatasetError(f"{path}: no path column {columns.path!r}; columns: {list(frame.columns)}")
    rank_columns = {rank: columns.rank_column(rank) for rank in ranks}
    missing = [c for c in rank_columns.values() if c not in frame.columns]
    # No rank column at all is a test manifest: read_split takes the taxonomy from the
    # train split beside it. Some rank columns but not all is a mistake.
    if taxonomy is None and missing and len(missing) < len(rank_columns):
        raise DatasetError(f"{path}: rank column(s) {missing} not found; columns: {list(frame.columns)}")
    if taxonomy is None and not missing:
        taxonomy = _taxonomy_from_rows(frame, rank_columns, columns, path)
    finest_column = rank_columns[ranks[-1]]
    samples = []
    for line, row in enumerate(frame.to_dict("records"), start=2):
        image_id = _as_id(row[columns.image_id]) if columns.image_id in frame.columns else line - 2
        file_name = safe_relative_path(row[path_column], f"{image_id} (line {line})", path)
        category = _as_id(row[columns.category_id]) if columns.category_id in frame.columns else row.get(finest_column) or None
        samples.append(Sample(image_id, file_name, category))
    return samples, taxonomy, "csv"


def _taxonomy_from_rows(frame: pd.DataFrame, rank_columns: Mapping[str, str], columns: CsvColumns, source: Path) -> Taxonomy:
    """One category per distinct finest value; a finest value with two parents is an error."""
    ranks = list(rank_columns)
    id_column = columns.category_id if columns.category_id in frame.columns else rank_columns[ranks[-1]]
    # The id column is the finest rank's own column when there is no category id column.
    table = frame[list(dict.fromkeys([id_column, *rank_columns.values()]))].drop_duplicates()
    conflicts = table[table.duplicated(subset=[id_column], keep=False)]
    if len(conflicts):
        culprits = sorted(conflicts[id_column].unique())
        raise TaxonomyError(f"{source}: {ranks[-1]} values under more than one parent: {culprits[:5]} ({len(culprits)} in all)")
    records = [{"id": _as_id(row[id_column]) if id_column == columns.category_id else row[id_column], **{rank: row[col] or None for rank, col in rank_columns.items()}} for row in table.to_dict("records")]
    return Taxonomy.from_categories(records, ranks)


# ------------------------------------------------------------------- dispatch
@dataclass(frozen=True)
class _Located:
    metadata: Path
    image_root: Path
    read: Callable[..., tuple[list[Sample], Taxonomy | None, str]]


def _locate(data: Path, split: str) -> _Located:
    """Find the metadata of ``split`` under ``data`` (or ``data`` being the split folder)."""
    candidates = [
        (data / split / "metadata.json", data / split, _read_coco),
        (data / f"{split}_metadata.json", data / f"{split}_images", _read_2022),
        (data / f"{split}.csv", data, _read_csv_manifest),
        (data / "metadata.json", data, _read_coco),
    ]
    for metadata, image_root, read in candidates:
        # DATA/metadata.json is DATA being the split folder itself: only for its own split name (or train).
        if metadata == data / "metadata.json" and split not in (data.name, "train"):
            continue
        if metadata.is_file():
            return _Located(metadata, image_root, read)
    tried = ", ".join(str(c[0]) for c in candidates)
    raise DatasetError(f"no {split!r} split found under {data}: looked for {tried}")


def locate_metadata(data: Path, split: str) -> Path:
    """The metadata file :func:`read_split` reads for ``split`` under ``data``."""
    return _locate(Path(data), split).metadata


def _taxonomy_source(data: Path, split: str) -> Path | None:
    """Where to find category records when the split's own metadata has none (a test split)."""
    for name in ("train", "val"):
        if name == split:
            continue
        for candidate in (data / name / "metadata.json", data / f"{name}_metadata.json", data / f"{name}.csv"):
            if candidate.is_file():
                return candidate
    return None


def read_split(
    data: str | Path,
    split: str = "train",
    ranks: Sequence[str] = DEFAULT_RANKS,
    *,
    taxonomy: Taxonomy | None = None,
    labels: str | Path | None = None,
    csv_columns: CsvColumns = CsvColumns(),
) -> DatasetSplit:
    """Read one split of a dataset in any supported layout.

    Args:
        data: the dataset folder (or a split folder holding ``metadata.json``).
        split: split name, e.g. ``train``, ``val``, ``test``.
        ranks: rank names, coarse to fine.
        taxonomy: use this taxonomy (e.g. a run's) instead of the split's own
            category records; annotations must still name known categories.
        labels: an ``image_id,category_id`` CSV for a split whose metadata
            has no annotations.
        csv_columns: column names of a CSV manifest.
    """
    data = Path(data)
    located = _locate(data, split)
    extra = {"columns": csv_columns} if located.read is _read_csv_manifest else {}
    samples, own_taxonomy, layout = located.read(located.metadata, ranks, taxonomy, **extra)
    notes: list[str] = []
    if not samples:
        raise DatasetError(f"{located.metadata}: the {split!r} split has no images")
    check_unique([sample.image_id for sample in samples], "image ids", located.metadata)

    taxonomy = taxonomy or own_taxonomy or _sibling_taxonomy(data, split, ranks, csv_columns, located.metadata)
    labels_path = Path(labels) if labels else None
    if labels_path is None and not any(s.category_id is not None for s in samples):
        default_labels = located.metadata.parent / "labels.csv"
        if default_labels.is_file():
            labels_path = default_labels
            notes.append(f"labels read from {default_labels}")
    if labels_path is not None:
        samples = _apply_labels(samples, read_labels_csv(labels_path), labels_path)
    _check_categories_known(samples, taxonomy, labels_path or located.metadata)
    return DatasetSplit(split, located.image_root, samples, taxonomy, located.metadata, layout, notes)


def _sibling_taxonomy(data: Path, split: str, ranks: Sequence[str], csv_columns: CsvColumns, metadata: Path) -> Taxonomy:
    source = _taxonomy_source(data, split)
    if source is None:
        raise DatasetError(f"{metadata}: has no category records and no train split was found beside it to read them from")
    located_split = source.parent.name if source.name == "metadata.json" else source.name.split("_metadata")[0].removesuffix(".csv")
    return read_split(data, located_split, ranks, csv_columns=csv_columns).taxonomy
