"""Tests for herbarium/demo.py: layout, determinism, taxonomy, long tail, learnability."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from herbarium.demo import build_demo_species, get_args_parser, long_tail_counts, main, make_demo_data
from herbarium.taxonomy import Taxonomy


def _metadata(root: Path, split: str) -> dict:
    with open(root / split / "metadata.json", encoding="utf-8") as f:
        return json.load(f)


def _taxonomy(categories: list[dict]) -> Taxonomy:
    """A 2020 category record names its species in ``name``."""
    return Taxonomy.from_categories([{**category, "species": category["name"]} for category in categories])


def _files(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, dict]:
    """The default dataset (seed 0), written once for the whole module."""
    root = tmp_path_factory.mktemp("demo") / "data"
    return root, make_demo_data(root, seed=0)


# ------------------------------------------------------------------ layout
def test_layout_and_summary(demo):
    root, summary = demo
    for path in ("train/metadata.json", "test/metadata.json", "test/labels.csv", "README.md"):
        assert (root / path).is_file(), path
    train, test = _metadata(root, "train"), _metadata(root, "test")
    for metadata in (train, test):
        assert set(metadata) == {"info", "licenses", "images", "annotations", "categories", "regions"}
    assert summary["images"] == {"train": len(train["images"]), "test": len(test["images"])}
    assert summary["classes"] == {"family": 3, "genus": 6, "species": 18}
    assert summary["images"]["test"] == 180
    assert 400 <= summary["images"]["train"] <= 600


def test_images_and_annotations_are_index_aligned_and_files_exist(demo):
    root, _ = demo
    seen_ids = []
    region_ids = {region["id"] for region in _metadata(root, "train")["regions"]}
    for split in ("train", "test"):
        metadata = _metadata(root, split)
        category_ids = {category["id"] for category in metadata["categories"]}
        assert len(metadata["images"]) == len(metadata["annotations"])
        for image, annotation in zip(metadata["images"], metadata["annotations"]):
            assert annotation["image_id"] == image["id"]
            assert annotation["id"] == image["id"]
            assert annotation["category_id"] in category_ids
            assert annotation["region_id"] in region_ids
            assert image["file_name"].startswith("images/") and image["file_name"].endswith(".jpg")
            with Image.open(root / split / image["file_name"]) as jpeg:
                assert jpeg.format == "JPEG" and jpeg.mode == "RGB"
                assert jpeg.size == (image["width"], image["height"]) == (64, 64)
            seen_ids.append(image["id"])
    assert len(seen_ids) == len(set(seen_ids)), "image ids must be unique across train and test"


def test_test_file_names_do_not_reveal_the_label(demo):
    root, _ = demo
    test = _metadata(root, "test")
    for image in test["images"]:
        assert image["file_name"] == f"images/{image['id'] // 1000:03d}/{image['id']}.jpg"


def test_labels_csv_matches_test_annotations(demo):
    root, _ = demo
    with open(root / "test" / "labels.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    annotations = _metadata(root, "test")["annotations"]
    assert [(int(row["image_id"]), int(row["category_id"])) for row in rows] == [
        (annotation["image_id"], annotation["category_id"]) for annotation in annotations
    ]


# ------------------------------------------------------------- determinism
def test_same_seed_writes_identical_files(demo, tmp_path):
    root, _ = demo
    make_demo_data(tmp_path / "again", seed=0)
    first, second = _files(root), _files(tmp_path / "again")
    assert first.keys() == second.keys()
    assert first == second


def test_different_seeds_differ(demo, tmp_path):
    root, _ = demo
    make_demo_data(tmp_path / "other", seed=1)
    assert _metadata(root, "train") != _metadata(tmp_path / "other", "train")
    first_image = _metadata(root, "test")["images"][0]["file_name"]
    other_image = _metadata(tmp_path / "other", "test")["images"][0]["file_name"]
    assert (root / "test" / first_image).read_bytes() != (tmp_path / "other" / "test" / other_image).read_bytes()


# ---------------------------------------------------------------- taxonomy
def test_taxonomy_is_a_tree_with_3_6_18_classes(demo):
    root, _ = demo
    train, test = _metadata(root, "train"), _metadata(root, "test")
    assert train["categories"] == test["categories"]
    taxonomy = _taxonomy(train["categories"])  # raises on a genus with two families
    assert [taxonomy.num_classes(rank) for rank in ("family", "genus", "species")] == [3, 6, 18]
    species_per_family = Counter(category["family"] for category in train["categories"])
    assert set(species_per_family.values()) == {6}  # 2 genera x 3 species in every family


def test_category_ids_are_not_indices(demo):
    root, _ = demo
    ids = sorted(category["id"] for category in _metadata(root, "train")["categories"])
    assert ids[0] >= 100
    assert ids != list(range(ids[0], ids[0] + len(ids))), "ids should have gaps"


def test_taxonomy_sizes_are_parameters(tmp_path):
    summary = make_demo_data(
        tmp_path / "small",
        image_size=32,
        max_per_class=8,
        min_per_class=1,
        test_per_class=1,
        num_families=2,
        genera_per_family=3,
        species_per_genus=2,
    )
    assert summary["classes"] == {"family": 2, "genus": 6, "species": 12}
    taxonomy = _taxonomy(_metadata(tmp_path / "small", "train")["categories"])
    assert taxonomy.num_categories == 12
    with Image.open(tmp_path / "small" / "test" / _metadata(tmp_path / "small", "test")["images"][0]["file_name"]) as jpeg:
        assert jpeg.size == (32, 32)


def test_genera_of_a_family_have_different_palettes_and_species_different_textures():
    species = build_demo_species()
    for family in {sp.family for sp in species}:
        members = [sp for sp in species if sp.family == family]
        assert len({sp.shape for sp in members}) == 1
        palettes = {sp.genus: sp.palette for sp in members}
        assert len(set(palettes.values())) == len(palettes)
    for genus in {sp.genus for sp in species}:
        members = [sp for sp in species if sp.genus == genus]
        assert len({sp.palette for sp in members}) == 1
        assert len({sp.texture for sp in members}) == len(members)
    # palettes repeat across families, so colour alone does not name a family
    assert len({sp.palette for sp in species}) < len({sp.genus for sp in species})


def test_too_large_taxonomy_is_refused(tmp_path):
    with pytest.raises(ValueError, match="num_families must be between 1 and 6"):
        make_demo_data(tmp_path / "x", num_families=7)
    with pytest.raises(ValueError, match="image_size"):
        make_demo_data(tmp_path / "y", image_size=8)


# --------------------------------------------------------------- long tail
def test_long_tail_counts_formula():
    counts = long_tail_counts(18, 100, 2)
    assert counts[0] == 100 and counts[-1] == 2
    assert counts == sorted(counts, reverse=True)
    ratio = 2 / 100
    assert counts == [round(100 * ratio ** (k / 17)) for k in range(18)]
    assert long_tail_counts(1, 7, 3) == [7]
    with pytest.raises(ValueError):
        long_tail_counts(5, 2, 3)


def test_train_is_long_tailed_and_test_balanced(demo):
    root, summary = demo
    train_counts = Counter(annotation["category_id"] for annotation in _metadata(root, "train")["annotations"])
    test_counts = Counter(annotation["category_id"] for annotation in _metadata(root, "test")["annotations"])
    assert len(train_counts) == len(test_counts) == 18
    assert max(train_counts.values()) / min(train_counts.values()) >= 50
    assert summary["imbalance"] == max(train_counts.values()) / min(train_counts.values())
    assert set(test_counts.values()) == {10}


def test_tail_is_spread_over_genera(demo):
    root, _ = demo
    metadata = _metadata(root, "train")
    genus_of = {category["id"]: category["genus"] for category in metadata["categories"]}
    train_counts = Counter(annotation["category_id"] for annotation in metadata["annotations"])
    ranked = sorted(train_counts, key=lambda category_id: -train_counts[category_id])
    # every genus has one of the 6 most frequent and one of the 6 rarest species
    assert {genus_of[category_id] for category_id in ranked[:6]} == set(genus_of.values())
    assert {genus_of[category_id] for category_id in ranked[-6:]} == set(genus_of.values())


# ------------------------------------------------------------ learnability
def _pixels_and_labels(root: Path, split: str, rank: str) -> tuple[np.ndarray, list[str]]:
    """16x16 downsampled pixels [N, 768] in [0, 1] and the label at ``rank`` per image."""
    metadata = _metadata(root, split)
    rank_of = {category["id"]: category[rank] for category in metadata["categories"]}
    pixels = []
    for image in metadata["images"]:
        with Image.open(root / split / image["file_name"]) as jpeg:
            small = jpeg.convert("RGB").resize((16, 16), Image.Resampling.BOX)
        pixels.append(np.asarray(small, dtype=np.float32).ravel() / 255.0)
    return np.stack(pixels), [rank_of[annotation["category_id"]] for annotation in metadata["annotations"]]


@pytest.mark.parametrize("rank, min_accuracy", [("family", 0.6), ("genus", 0.6)])
def test_nearest_centroid_beats_chance(demo, rank, min_accuracy):
    # Measured on seeds 0-4 at 64 and 32 px: family 0.75-0.81 (chance 1/3),
    # genus 0.82-0.87 (chance 1/6).
    root, _ = demo
    train_pixels, train_labels = _pixels_and_labels(root, "train", rank)
    test_pixels, test_labels = _pixels_and_labels(root, "test", rank)
    classes = sorted(set(train_labels))
    centroids = np.stack([train_pixels[[label == c for label in train_labels]].mean(axis=0) for c in classes])
    distances = ((test_pixels[:, None, :] - centroids[None, :, :]) ** 2).sum(axis=-1)  # [N_test, num_classes]
    predicted = [classes[i] for i in distances.argmin(axis=1)]
    accuracy = np.mean([p == t for p, t in zip(predicted, test_labels)])
    assert accuracy >= min_accuracy, f"{rank} nearest-centroid accuracy {accuracy:.3f}"


# ------------------------------------------------------- overwrite and CLI
def test_refuses_to_overwrite_a_non_empty_folder(tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=str(out)):
        make_demo_data(out, image_size=16, max_per_class=2, min_per_class=1, test_per_class=1)
    make_demo_data(out, image_size=16, max_per_class=2, min_per_class=1, test_per_class=1, overwrite=True)
    stale = out / "train" / "images" / "stale.jpg"
    stale.write_bytes(b"old")
    make_demo_data(out, image_size=16, max_per_class=2, min_per_class=1, test_per_class=1, overwrite=True)
    assert not stale.exists()
    assert (out / "keep.txt").read_text() == "mine"


def test_empty_existing_folder_is_fine(tmp_path):
    make_demo_data(tmp_path, image_size=16, max_per_class=2, min_per_class=1, test_per_class=1)
    assert (tmp_path / "train" / "metadata.json").is_file()


def test_main_writes_data_and_prints_summary(tmp_path, capsys):
    out = tmp_path / "cli"
    argv = [str(out), "--seed", "3", "--size", "32", "--max-per-class", "6", "--min-per-class", "1", "--test-per-class", "2"]
    main(argv)
    printed = capsys.readouterr().out
    assert str(out) in printed and "18 species" in printed and "imbalance 6" in printed
    assert len(_metadata(out, "test")["images"]) == 36
    assert main(argv) == 2  # one line, status 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and "not empty" in error and error.count("\n") == 1
    main(argv + ["--overwrite"])


def test_every_option_help_states_its_default():
    for action in get_args_parser()._actions:
        if action.option_strings and action.dest not in ("help", "version"):
            assert "(default:" in action.help, action.dest
