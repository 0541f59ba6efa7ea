"""Tests for herbarium/data/readers.py on tiny files in each real layout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fixtures import (
    CATEGORIES_2020,
    CATEGORIES_2021,
    CATEGORIES_2022,
    COUNTS_2020,
    write_csv_manifest,
    write_labels_csv,
)
from herbarium.data.readers import (
    CsvColumns,
    DatasetError,
    Sample,
    read_labels_csv,
    read_split,
    safe_relative_path,
)
from herbarium.taxonomy import Taxonomy, TaxonomyError

RANKS4 = ("order", "family", "genus", "species")


def _edit_json(path: Path, change, encoding: str = "utf-8") -> None:
    """Load a metadata file, let ``change`` edit it in place, write it back in the same encoding."""
    data = json.loads(path.read_bytes().decode(encoding))
    change(data)
    path.write_bytes(json.dumps(data, ensure_ascii=False).encode(encoding))


def _check_samples(split, written) -> None:
    """Samples match the fixture's images, in metadata order, and every file is where ``path`` says."""
    assert [s.image_id for s in split.samples] == written.image_ids
    assert [s.category_id for s in split.samples] == [written.labels.get(i) for i in written.image_ids]
    assert [split.path(s) for s in split.samples] == [written.files[i] for i in written.image_ids]
    assert all(split.path(s).is_file() for s in split.samples)


# ------------------------------------------------------------ Herbarium 2020
def test_2020_train(herbarium2020):
    train = herbarium2020["train"]
    metadata = train.root / "metadata.json"
    with pytest.raises(UnicodeDecodeError):  # the fixture is latin-1, like the real file
        metadata.read_bytes().decode("utf-8")

    split = read_split(train.root.parent, "train")
    assert split.layout == "herbarium2020"
    assert split.source == metadata
    assert split.image_root == train.root
    assert len(split) == sum(COUNTS_2020.values()) == 9
    assert split.labelled
    _check_samples(split, train)
    assert split.samples[0] == Sample(100, "images/002/01/100.jpg", 0)

    taxonomy = split.taxonomy
    assert taxonomy.category_ids == [0, 1, 2, 3, 5]
    assert taxonomy.names["species"] == [c["name"] for c in CATEGORIES_2020]
    assert "Ranunculus acris Müll." in taxonomy.names["species"]
    assert taxonomy.names["genus"] == ["Achillea", "Carex", "Poa", "Ranunculus"]
    assert taxonomy.names["family"] == ["Asteraceae", "Cyperaceae", "Poaceae", "Ranunculaceae"]
    assert taxonomy.parents("species").tolist() == [2, 2, 1, 3, 0]


def test_2020_split_folder_given_directly(herbarium2020):
    train = herbarium2020["train"]
    split = read_split(train.root, "train")
    assert split.image_root == train.root
    _check_samples(split, train)


def test_2020_test_split_reads_taxonomy_from_train(herbarium2020):
    test = herbarium2020["test"]
    split = read_split(test.root.parent, "test")
    assert split.image_root == test.root
    assert not split.labelled
    assert [s.category_id for s in split.samples] == [None, None, None]
    _check_samples(split, test)
    assert split.taxonomy == read_split(test.root.parent, "train").taxonomy


def test_labels_from_an_explicit_csv(herbarium2020, tmp_path):
    test = herbarium2020["test"]
    answers = dict(zip(test.image_ids, [5, 0, 2]))
    labels = write_labels_csv(tmp_path / "answers.csv", answers)
    split = read_split(test.root.parent, "test", labels=labels)
    assert split.labelled
    assert [s.category_id for s in split.samples] == [5, 0, 2]
    assert split.notes == []


def test_labels_csv_beside_the_split_is_picked_up(herbarium2020):
    test = herbarium2020["test"]
    default = write_labels_csv(test.root / "labels.csv", dict(zip(test.image_ids, [1, 1, 3])))
    split = read_split(test.root.parent, "test")
    assert [s.category_id for s in split.samples] == [1, 1, 3]
    assert split.notes == [f"labels read from {default}"]


def test_labels_csv_missing_an_image_names_it(herbarium2020, tmp_path):
    test = herbarium2020["test"]
    labels = write_labels_csv(tmp_path / "answers.csv", {test.image_ids[0]: 0, test.image_ids[2]: 0})
    with pytest.raises(DatasetError, match=rf"no label for images \[{test.image_ids[1]}\] \(1 in all\)"):
        read_split(test.root.parent, "test", labels=labels)


def test_labels_csv_with_unknown_category_names_image_and_category(herbarium2020, tmp_path):
    test = herbarium2020["test"]
    labels = write_labels_csv(tmp_path / "answers.csv", dict(zip(test.image_ids, [0, 77, 1])))
    with pytest.raises(DatasetError, match=rf"answers.csv: .*image {test.image_ids[1]} -> category 77 \(1 in all\)"):
        read_split(test.root.parent, "test", labels=labels)


def test_read_labels_csv(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("image_id,category_id\n00000__001,12\ntest-1,Poa annua\n")
    assert read_labels_csv(path) == {"00000__001": 12, "test-1": "Poa annua"}
    path.write_text("Id,Predicted\n1,2\n")
    with pytest.raises(DatasetError, match=r"missing \['category_id', 'image_id'\]"):
        read_labels_csv(path)


def test_given_taxonomy_is_used_and_checked(herbarium2020):
    data = herbarium2020["train"].root.parent
    smaller = Taxonomy.from_categories([{**c, "species": c["name"]} for c in CATEGORIES_2020 if c["id"] != 5])
    test = read_split(data, "test", taxonomy=smaller)
    assert test.taxonomy is smaller
    with pytest.raises(DatasetError, match=r"image 108 -> category 5 \(1 in all\)"):
        read_split(data, "train", taxonomy=smaller)


# ------------------------------------------------------------ Herbarium 2021
def test_2021_genus_is_the_first_word_and_order_is_a_rank(herbarium2021):
    split = read_split(herbarium2021.root.parent, "train", RANKS4)
    assert split.layout == "herbarium2021"
    _check_samples(split, herbarium2021)
    taxonomy = split.taxonomy
    assert taxonomy.ranks == RANKS4
    assert taxonomy.category_ids == [10, 11, 12, 13]
    assert taxonomy.names == {
        "order": ["Poales", "Ranunculales"],
        "family": ["Cyperaceae", "Poaceae", "Ranunculaceae"],
        "genus": ["Carex", "Poa", "Ranunculus"],
        "species": [c["name"] for c in CATEGORIES_2021],
    }
    assert taxonomy.parents("species").tolist() == [1, 0, 2, 2]
    assert taxonomy.parents("genus").tolist() == [0, 1, 2]
    assert taxonomy.parents("family").tolist() == [0, 0, 1]
    assert read_split(herbarium2021.root.parent, "train").taxonomy.ranks == ("family", "genus", "species")


# ------------------------------------------------------------ Herbarium 2022
def test_2022_train(herbarium2022):
    train = herbarium2022["train"]
    split = read_split(train.root, "train")
    assert split.layout == "herbarium2022"
    assert split.source == train.root / "train_metadata.json"
    assert split.image_root == train.root / "train_images"
    _check_samples(split, train)
    assert split.samples[0] == Sample("00000__001", "000/00/00000__001.jpg", 0)
    taxonomy = split.taxonomy
    assert taxonomy.category_ids == [0, 3, 4]
    assert taxonomy.names["species"] == [c["scientificName"] for c in CATEGORIES_2022]
    assert taxonomy.names["genus"] == ["Abies", "Thymus"]
    assert taxonomy.names["family"] == ["Lamiaceae", "Pinaceae"]
    assert taxonomy.parents("species").tolist() == [0, 0, 1]


def test_2022_species_from_genus_and_epithet_without_scientific_name(herbarium2022):
    root = herbarium2022["train"].root
    _edit_json(root / "train_metadata.json", lambda meta: [c.pop("scientificName") for c in meta["categories"]])
    assert read_split(root, "train").taxonomy.names["species"] == ["Abies alba", "Abies vulgaris", "Thymus vulgaris"]


def test_2022_test_is_a_bare_list(herbarium2022):
    test = herbarium2022["test"]
    assert isinstance(json.loads((test.root / "test_metadata.json").read_text()), list)
    split = read_split(test.root, "test")
    assert split.image_root == test.root / "test_images"
    assert not split.labelled
    _check_samples(split, test)
    assert split.taxonomy == read_split(test.root, "train").taxonomy


# ------------------------------------------------------------ CSV manifests
CUSTOM = CsvColumns(path="filepath", image_id="uid", category_id="label",
                    ranks={"family": "Family", "genus": "Genus", "species": "Species"})
CUSTOM_HEADER = ["uid", "filepath", "label", "Family", "Genus", "Species"]
CUSTOM_ROWS = [
    {"uid": "a1", "filepath": "img/a1.jpg", "label": 20, "Family": "Poaceae", "Genus": "Poa", "Species": "annua"},
    {"uid": "a2", "filepath": "img/a2.jpg", "label": 20, "Family": "Poaceae", "Genus": "Poa", "Species": "annua"},
    {"uid": "b1", "filepath": "img/b1.jpg", "label": 9, "Family": "Cyperaceae", "Genus": "Carex", "Species": "nigra"},
    {"uid": "c1", "filepath": "img/c1.jpg", "label": 31, "Family": "Poaceae", "Genus": "Festuca", "Species": "nigra"},
]


def test_csv_manifest_with_custom_columns(tmp_path):
    write_csv_manifest(tmp_path, "train", CUSTOM_ROWS, CUSTOM_HEADER, path_column="filepath")
    split = read_split(tmp_path, "train", csv_columns=CUSTOM)
    assert split.layout == "csv"
    assert split.image_root == tmp_path
    assert [(s.image_id, s.file_name, s.category_id) for s in split.samples] == [
        ("a1", "img/a1.jpg", 20), ("a2", "img/a2.jpg", 20), ("b1", "img/b1.jpg", 9), ("c1", "img/c1.jpg", 31)]
    assert all(split.path(s).is_file() for s in split.samples)
    taxonomy = split.taxonomy
    assert taxonomy.category_ids == [9, 20, 31]
    assert taxonomy.names == {"family": ["Cyperaceae", "Poaceae"], "genus": ["Carex", "Festuca", "Poa"],
                              "species": ["nigra", "annua", "nigra"]}
    assert [taxonomy.num_classes(rank) for rank in taxonomy.ranks] == [2, 3, 3]


def test_csv_manifest_keyed_by_species_value(tmp_path):
    """Without a category id column the finest value is the category; image ids are row numbers."""
    rows = [{"path": f"x/{i}.jpg", "family": f, "genus": g, "species": s}
            for i, (f, g, s) in enumerate([("F1", "G1", "G1 a"), ("F1", "G1", "G1 a"), ("F2", "G2", "G2 b")])]
    write_csv_manifest(tmp_path, "train", rows, ["path", "family", "genus", "species"])
    split = read_split(tmp_path, "train")
    assert [(s.image_id, s.category_id) for s in split.samples] == [(0, "G1 a"), (1, "G1 a"), (2, "G2 b")]
    assert split.taxonomy.category_ids == ["G1 a", "G2 b"]
    assert split.taxonomy.names["genus"] == ["G1", "G2"]


def test_csv_species_under_two_genera_is_named(tmp_path):
    rows = [{"path": "a.jpg", "family": "F", "genus": "G1", "species": "vulgaris"},
            {"path": "b.jpg", "family": "F", "genus": "G2", "species": "vulgaris"},
            {"path": "c.jpg", "family": "F", "genus": "G2", "species": "alba"}]
    write_csv_manifest(tmp_path, "train", rows, ["path", "family", "genus", "species"])
    with pytest.raises(TaxonomyError, match=r"train.csv: species values under more than one parent: \['vulgaris'\] \(1 in all\)"):
        read_split(tmp_path, "train")


def test_csv_category_id_with_two_parents_is_named(tmp_path):
    rows = [dict(CUSTOM_ROWS[0]), {**CUSTOM_ROWS[1], "Genus": "Festuca"}, dict(CUSTOM_ROWS[2])]
    write_csv_manifest(tmp_path, "train", rows, CUSTOM_HEADER, path_column="filepath")
    with pytest.raises(TaxonomyError, match=r"\['20'\] \(1 in all\)"):
        read_split(tmp_path, "train", csv_columns=CUSTOM)


def test_csv_test_manifest_reads_taxonomy_and_labels_beside_it(tmp_path):
    write_csv_manifest(tmp_path, "train", CUSTOM_ROWS, CUSTOM_HEADER, path_column="filepath")
    write_csv_manifest(tmp_path, "test", [{"uid": "t1", "filepath": "t/1.jpg"}, {"uid": "t2", "filepath": "t/2.jpg"}],
                       ["uid", "filepath"], path_column="filepath")
    test = read_split(tmp_path, "test", csv_columns=CUSTOM)
    assert [(s.image_id, s.category_id) for s in test.samples] == [("t1", None), ("t2", None)]
    assert test.taxonomy == read_split(tmp_path, "train", csv_columns=CUSTOM).taxonomy

    write_labels_csv(tmp_path / "labels.csv", {"t1": 31, "t2": 9})
    labelled = read_split(tmp_path, "test", csv_columns=CUSTOM)
    assert [s.category_id for s in labelled.samples] == [31, 9]


def test_csv_with_some_rank_columns_missing_names_them(tmp_path):
    write_csv_manifest(tmp_path, "train", [{"path": "a.jpg", "species": "s"}], ["path", "species"])
    with pytest.raises(DatasetError, match=r"rank column\(s\) \['family', 'genus'\] not found"):
        read_split(tmp_path, "train")


# ------------------------------------------------------------ bad input
@pytest.mark.parametrize("bad_path", ["../x.jpg", "/etc/passwd", "images/../../x.jpg", "..\\x.jpg", "C:/x.jpg", ""])
def test_path_escaping_the_root_names_the_image(herbarium2020, bad_path):
    metadata = herbarium2020["train"].root / "metadata.json"
    _edit_json(metadata, lambda meta: meta["images"][4].update(file_name=bad_path), "latin-1")
    image_id = herbarium2020["train"].image_ids[4]
    with pytest.raises(DatasetError, match=rf"image {image_id} has path .*escapes the dataset root"):
        read_split(metadata.parent, "train")


def test_path_escaping_in_a_csv_names_the_line(tmp_path):
    (tmp_path / "train.csv").write_text("path,family,genus,species\nok.jpg,F,G,s\n../../etc/passwd,F,G,s\n")
    with pytest.raises(DatasetError, match=r"image '1 \(line 3\)' has path '../../etc/passwd'"):
        read_split(tmp_path, "train")


def test_safe_relative_path_normalises_harmless_paths():
    assert safe_relative_path("images/./a/../b.jpg", 1, Path("m.json")) == "images/b.jpg"
    assert safe_relative_path("images\\12\\b.jpg", 1, Path("m.json")) == "images/12/b.jpg"


def test_annotation_of_unknown_category_names_image_and_category(herbarium2020):
    metadata = herbarium2020["train"].root / "metadata.json"
    _edit_json(metadata, lambda meta: meta["annotations"][2].update(category_id=77), "latin-1")
    image_id = herbarium2020["train"].image_ids[2]
    with pytest.raises(DatasetError, match=rf"no record: image {image_id} -> category 77 \(1 in all\)"):
        read_split(metadata.parent, "train")


def test_empty_split(herbarium2020):
    metadata = herbarium2020["test"].root / "metadata.json"
    _edit_json(metadata, lambda meta: meta.update(images=[]))
    with pytest.raises(DatasetError, match=r"the 'test' split has no images"):
        read_split(metadata.parent.parent, "test")


def test_missing_split_lists_what_was_looked_for(herbarium2020):
    data = herbarium2020["train"].root.parent
    with pytest.raises(DatasetError) as error:
        read_split(data, "val")
    message = str(error.value)
    assert "no 'val' split found" in message
    for candidate in ("val/metadata.json", "val_metadata.json", "val.csv"):
        assert str(data / candidate) in message


def test_test_split_without_a_train_split_beside_it(herbarium2020):
    shutil.rmtree(herbarium2020["train"].root)
    with pytest.raises(DatasetError, match="no category records and no train split"):
        read_split(herbarium2020["test"].root.parent, "test")


def test_record_without_a_required_field(herbarium2020):
    metadata = herbarium2020["train"].root / "metadata.json"
    _edit_json(metadata, lambda meta: meta["images"][0].pop("file_name"), "latin-1")
    with pytest.raises(DatasetError, match=r"image record has no 'file_name' field"):
        read_split(metadata.parent, "train")


def test_invalid_json_names_the_file(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "metadata.json").write_text('{"images": [')
    with pytest.raises(DatasetError, match=r"metadata.json: not valid JSON"):
        read_split(tmp_path, "train")
