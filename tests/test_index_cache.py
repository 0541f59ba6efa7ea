"""The cached, memory-mapped index of a split (herbarium/data/index_cache.py, sample_table.py) and the vectorised path check."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from herbarium.data import index_cache
from herbarium.data.dataset import ImageDataset
from herbarium.demo import make_demo_data
from herbarium.data.index_cache import read_split_indexed
from herbarium.data.readers import DatasetError, read_split, safe_relative_path, safe_relative_paths
from herbarium.data.sample_table import SampleTable, class_counts
from herbarium.data.splits import select_images, stratified_holdout

RANKS = ("family", "genus", "species")


def as_tuples(split) -> list[tuple]:
    return [(s.image_id, s.file_name, s.category_id) for s in split.samples]


@pytest.mark.parametrize("layout", ["herbarium2020", "herbarium2021", "herbarium2022"])
def test_the_cached_index_holds_exactly_what_the_parse_gives(layout, request):
    written = request.getfixturevalue(layout)
    root = (written["train"] if isinstance(written, dict) else written).root
    ranks = ("order", "family", "genus", "species") if layout == "herbarium2021" else RANKS
    before = sorted(root.parent.rglob("*"))
    parsed = read_split(root, "train", ranks)
    built = read_split_indexed(root, "train", ranks)  # parses and saves
    cached = read_split_indexed(root, "train", ranks)  # memory-maps what was saved
    assert isinstance(cached.samples.image_ids, np.memmap)
    for split in (built, cached):
        assert as_tuples(split) == as_tuples(parsed)
        assert split.taxonomy.to_dict() == parsed.taxonomy.to_dict()
        assert (split.name, split.image_root, split.source, split.layout) == \
            (parsed.name, parsed.image_root, parsed.source, parsed.layout)
        assert [type(s.image_id) for s in split.samples] == [type(s.image_id) for s in parsed.samples]
        assert torch.equal(ImageDataset(split, ranks, transform=None).targets,
                           ImageDataset(parsed, ranks, transform=None).targets)
        for rank in ranks:
            assert class_counts(split.samples, split.taxonomy, rank) == parsed.taxonomy.counts(parsed.category_ids(), rank)
    assert sorted(root.parent.rglob("*")) == before  # nothing written beside the data


def test_a_changed_metadata_file_is_parsed_again_and_its_old_index_removed(herbarium2021):
    root, ranks = herbarium2021.root, ("order", "family", "genus", "species")
    first = read_split_indexed(root, "train", ranks)
    metadata = root / "metadata.json"
    meta = json.loads(metadata.read_text())
    moved = meta["annotations"][0]
    other = next(c["id"] for c in meta["categories"] if c["id"] != moved["category_id"])
    moved["category_id"] = other
    metadata.write_text(json.dumps(meta))
    os.utime(metadata, ns=(metadata.stat().st_atime_ns, metadata.stat().st_mtime_ns + 1_000_000))
    again = read_split_indexed(root, "train", ranks)
    assert as_tuples(again) == as_tuples(read_split(root, "train", ranks)) != as_tuples(first)
    image = next(i for i, s in enumerate(again.samples) if s.image_id == moved["image_id"])
    assert again.samples[image].category_id == other
    assert len(list(index_cache.cache_root().glob(f"{index_cache.index_folder(metadata, 'train', 'x').name[:-1]}*/"))) == 1


def test_no_writable_cache_falls_back_to_parsing(herbarium2021, tmp_path, monkeypatch):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("HERBARIUM_CACHE", str(blocked / "index"))
    split = read_split_indexed(herbarium2021.root, "train", ("order", "family", "genus", "species"))
    assert isinstance(split.samples, list) and len(split) == len(read_split(herbarium2021.root, "train", ("order", "family", "genus", "species")))


def loop_holdout(samples, fraction: float, seed: int) -> list[int]:
    """The hold-out as it was chosen before it was vectorised: a dict of classes and a loop."""
    rng, by_class, held = np.random.default_rng(seed), {}, []
    for index, sample in enumerate(samples):
        by_class.setdefault(sample.category_id, []).append(index)
    for category_id in sorted(by_class, key=str):
        members = np.array(by_class[category_id])
        take = min(int(round(fraction * len(members))), len(members) - 1)
        if take > 0:
            held.extend(rng.choice(members, size=take, replace=False).tolist())
    return sorted(held)


def test_holdout_and_selection_are_the_same_on_a_table_a_list_and_the_loop_they_replace(tmp_path):
    make_demo_data(tmp_path / "demo", seed=1, image_size=16, max_per_class=9, min_per_class=1, test_per_class=1,
                   num_families=2, genera_per_family=2, species_per_genus=3)
    parsed, cached = read_split(tmp_path / "demo", "train"), read_split_indexed(tmp_path / "demo", "train")
    for fraction, seed in ((0.2, 4), (0.5, 0)):
        from_list, from_table = stratified_holdout(parsed, fraction, seed), stratified_holdout(cached, fraction, seed)
        assert isinstance(from_table[0].samples, SampleTable)
        assert [as_tuples(s) for s in from_list] == [as_tuples(s) for s in from_table]
        expected = loop_holdout(parsed.samples, fraction, seed)
        assert as_tuples(from_list[1]) == [as_tuples(parsed)[i] for i in expected]
    ids = {str(s.image_id) for s in parsed.samples[::3]}
    assert as_tuples(select_images(parsed, ids, "ids.csv")) == as_tuples(select_images(cached, ids, "ids.csv"))
    with pytest.raises(ValueError, match=r"1 image id\(s\) are not in split 'train', e.g. \['nope'\]"):
        select_images(cached, ids | {"nope"}, "ids.csv")


# ----------------------------------------------------------------------------------------- path check
ESCAPING = ["../secret.jpg", "/etc/passwd", "a/../../b.jpg", "..", "C:/x.jpg", "c:x.jpg", "", "\\\\server\\share\\x.jpg",
            "..\\up.jpg"]


@pytest.mark.parametrize("bad", ESCAPING)
def test_the_vectorised_check_still_refuses_paths_that_escape_the_root(bad, tmp_path):
    names = ["images/000/1.jpg", bad, "images/000/2.jpg"]
    with pytest.raises(DatasetError, match=r"image 'b' has path .*which escapes the dataset root"):
        safe_relative_paths(names, ["a", "b", "c"], tmp_path / "metadata.json")


def test_the_vectorised_check_normalises_as_the_per_path_one(tmp_path):
    names = ["images/000/1.jpg", "./a//b/c.jpg", "a/./b.jpg", "a/../b.jpg", "dir/", "sub\\x.jpg", "ok..jpg", "a/.hidden.jpg", 7]
    source = tmp_path / "metadata.json"
    assert safe_relative_paths(names, list(range(len(names))), source) == \
        [safe_relative_path(name, i, source) for i, name in enumerate(names)]


def test_a_table_joins_and_compares_as_a_list_of_samples(herbarium2021):
    root, ranks = herbarium2021.root, ("order", "family", "genus", "species")
    parsed, cached = read_split(root, "train", ranks), read_split_indexed(root, "train", ranks)
    assert cached.samples == parsed.samples and cached.samples[:2] == parsed.samples[:2]
    assert cached.samples + cached.samples[:1] == parsed.samples + parsed.samples[:1]
    assert parsed.samples[:1] + cached.samples == parsed.samples[:1] + parsed.samples
    assert cached.samples * 2 == parsed.samples * 2
