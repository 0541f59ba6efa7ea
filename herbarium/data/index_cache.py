"""Parse a split's metadata once per machine: a cached, memory-mapped index of its samples.

Every process of a ``torchrun`` job reads the training split. Parsing the
Herbarium 2021 metadata (2.26 million images) takes a process a minute and
gigabytes of memory, eight times over on an 8-GPU node. Here the first
process to need a split parses it (:func:`~herbarium.data.readers.read_split`)
and saves its samples as ``.npy`` arrays (:class:`SampleTable`) and its
taxonomy as JSON; the others wait for it (a file lock), and every later
start memory-maps the arrays.

The index lives under ``$HERBARIUM_CACHE`` (default
``~/.cache/herbarium/index``), on the machine that reads it; nothing is
written beside the data, which is often read-only or shared. It is keyed
by the metadata file's path, size and modification time (and those of a
labels file), the ranks and the CSV columns, so an edited metadata file is
parsed again, and the index it replaces is removed.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from herbarium.data.readers import CsvColumns, DatasetSplit, locate_metadata, read_split
from herbarium.data.sample_table import SampleTable
from herbarium.taxonomy import DEFAULT_RANKS, Taxonomy

INDEX_VERSION = 1  # bump when the saved arrays change meaning


def _stamp(path: Path) -> list:
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def index_key(metadata: Path, ranks: Sequence[str], labels: Path | None, csv_columns: CsvColumns) -> str:
    """What the index depends on, hashed: a change to any of it is a new index."""
    parts = [INDEX_VERSION, _stamp(metadata), _stamp(labels) if labels else None, list(ranks),
             dataclasses.asdict(csv_columns)]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=dict).encode()).hexdigest()[:16]


def cache_root() -> Path:
    return Path(os.environ.get("HERBARIUM_CACHE") or Path.home() / ".cache" / "herbarium" / "index")


def index_folder(metadata: Path, split: str, key: str) -> Path:
    """``<cache>/<which metadata file>-<split>-<key>``: one folder per version of a split's metadata."""
    source = hashlib.sha256(str(metadata.resolve()).encode()).hexdigest()[:12]
    return cache_root() / f"{source}-{split}-{key}"


def _remove_older_versions(folder: Path) -> None:
    """Indexes of earlier versions of the same metadata file are of no further use."""
    prefix = folder.name.rsplit("-", 1)[0] + "-"
    for old in folder.parent.glob(f"{prefix}*"):
        if old.is_dir() and old != folder:
            shutil.rmtree(old, ignore_errors=True)
            Path(f"{old}.lock").unlink(missing_ok=True)


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Hold ``folder``'s lock: one process builds an index while the others on the machine wait for it."""
    with open(folder.parent / f"{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _writable(folder: Path) -> bool:
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder.parent, os.W_OK)


def _save(split: DatasetSplit, folder: Path, key: str) -> None:
    """Arrays first, the description last (renamed into place): an index without ``split.json`` is not one."""
    folder.mkdir(parents=True, exist_ok=True)
    SampleTable.from_samples(split.samples).save(folder)
    description = {"key": key, "name": split.name, "image_root": str(split.image_root), "source": str(split.source),
                   "layout": split.layout, "notes": split.notes, "taxonomy": split.taxonomy.to_dict()}
    partial = folder / "split.json.tmp"
    partial.write_text(json.dumps(description))
    os.replace(partial, folder / "split.json")


def _load(folder: Path, key: str) -> DatasetSplit | None:
    try:
        description = json.loads((folder / "split.json").read_text())
        if description.get("key") != key:
            return None
        samples = SampleTable.load(folder)
    except (OSError, ValueError):
        return None
    return DatasetSplit(description["name"], Path(description["image_root"]), samples,
                        Taxonomy.from_dict(description["taxonomy"]), Path(description["source"]), description["layout"],
                        list(description["notes"]))


def read_split_indexed(
    data: str | Path,
    split: str = "train",
    ranks: Sequence[str] = DEFAULT_RANKS,
    *,
    labels: str | Path | None = None,
    csv_columns: CsvColumns = CsvColumns(),
) -> DatasetSplit:
    """:func:`~herbarium.data.readers.read_split`, from the cached index when there is a valid one (built if not).

    The split's samples are a memory-mapped :class:`SampleTable` and its
    taxonomy is its own (as ``read_split`` without ``taxonomy=``).
    """
    metadata = locate_metadata(Path(data), split)
    beside = metadata.parent / "labels.csv"  # read_split's default labels for a split without annotations
    key = index_key(metadata, ranks, Path(labels) if labels else (beside if beside.is_file() else None), csv_columns)
    folder = index_folder(metadata, split, key)
    loaded = _load(folder, key)
    if loaded is not None:
        return loaded
    if not _writable(folder):  # nowhere to keep it: parse, as read_split does
        return read_split(data, split, ranks, labels=labels, csv_columns=csv_columns)
    with _locked(folder):
        loaded = _load(folder, key)  # another process may have built it while this one waited
        if loaded is None:
            _save(read_split(data, split, ranks, labels=labels, csv_columns=csv_columns), folder, key)
            _remove_older_versions(folder)
            loaded = _load(folder, key)
    return loaded
