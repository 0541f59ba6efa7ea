"""Tests for herbarium/prepare.py: a resized copy of a dataset that every reader reads as the original."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from PIL import Image

from fixtures import truncate, write_csv_manifest, write_jpeg
from herbarium.data.images import BadImageError
from herbarium.data.readers import read_split
from herbarium.prepare import main, prepare, shrunk_size

MAX_SIDE = 16  # below every fixture image's longer side (24 to 39 px), so all are resized


def _samples(data: Path, split: str) -> list[tuple]:
    return [(s.image_id, s.file_name, s.category_id) for s in read_split(data, split).samples]


def _files(root: Path) -> dict[str, Path]:
    return {str(path.relative_to(root)): path for path in root.rglob("*") if path.is_file()}


def _is_image(relative: str) -> bool:
    return relative.endswith((".jpg", ".png"))


def _check_copy(data: Path, out: Path, splits: list[str]) -> None:
    """Same files at the same paths, non-images byte for byte, images shrunk, and every split reads the same."""
    source_files, out_files = _files(data), _files(out)
    assert sorted(out_files) == sorted(source_files)
    for relative, path in source_files.items():
        if _is_image(relative):
            with Image.open(path) as original, Image.open(out_files[relative]) as resized:
                assert max(resized.size) == MAX_SIDE
                assert resized.size == shrunk_size(*original.size, MAX_SIDE)
                assert resized.format == original.format
        else:
            assert out_files[relative].read_bytes() == path.read_bytes()
    for split in splits:
        assert _samples(out, split) == _samples(data, split)
        assert read_split(out, split).taxonomy.to_dict() == read_split(data, split).taxonomy.to_dict()


def test_shrunk_size_bounds_the_longer_side_and_keeps_the_aspect():
    assert shrunk_size(1000, 661, 512) == (512, 338)
    assert shrunk_size(661, 1000, 512) == (338, 512)
    assert shrunk_size(400, 300, 512) == (400, 300)
    assert shrunk_size(3000, 2, 512) == (512, 1)


def test_herbarium2020_layout_with_a_process_pool(herbarium2020, tmp_path):
    data = herbarium2020["train"].root.parent
    record = prepare(data, tmp_path / "out", MAX_SIDE, workers=2, progress=False)
    _check_copy(data, tmp_path / "out", ["train", "test"])
    n_images = len(herbarium2020["train"].image_ids) + len(herbarium2020["test"].image_ids)
    assert (record["images_resized"], record["images_copied"], record["skipped_bad_images"]) == (n_images, 0, 0)
    assert record["other_files_copied"] == 2  # the two metadata.json files


def test_herbarium2021_layout(herbarium2021, tmp_path):
    data = herbarium2021.root.parent
    prepare(data, tmp_path / "out", MAX_SIDE, workers=0, progress=False)
    _check_copy(data, tmp_path / "out", ["train"])


def test_herbarium2022_layout(herbarium2022, tmp_path):
    data = herbarium2022["train"].root
    prepare(data, tmp_path / "out", MAX_SIDE, workers=0, progress=False)
    _check_copy(data, tmp_path / "out", ["train", "test"])


def test_csv_manifest_with_a_labels_file_and_a_png(tmp_path):
    data = tmp_path / "catalogue"
    rows = [{"path": f"shelf/{i}.jpg", "family": f, "genus": g, "species": s}
            for i, (f, g, s) in enumerate([("F1", "G1", "G1 a"), ("F1", "G1", "G1 b"), ("F2", "G2", "G2 c")])]
    rows.append({"path": "shelf/extra.png", "family": "F2", "genus": "G2", "species": "G2 c"})
    (data / "shelf").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 20), (10, 200, 30)).save(data / "shelf" / "extra.png")
    write_csv_manifest(data, "train", rows, ["path", "family", "genus", "species"])
    (data / "notes").mkdir()
    (data / "notes" / "labels.csv").write_text("image_id,category_id\n0,G1 a\n")
    prepare(data, tmp_path / "out", MAX_SIDE, workers=0, progress=False)
    _check_copy(data, tmp_path / "out", ["train"])


def test_resized_jpegs_are_written_at_quality_90(herbarium2020, tmp_path):
    data = herbarium2020["train"].root.parent
    prepare(data, tmp_path / "out", MAX_SIDE, workers=0, progress=False)
    written = tmp_path / "out" / herbarium2020["train"].files[herbarium2020["train"].image_ids[0]].relative_to(data)
    with Image.open(written) as image:
        tables = image.quantization
        reference = io.BytesIO()
        image.convert("RGB").save(reference, format="JPEG", quality=90)
    assert Image.open(reference).quantization == tables


def test_images_small_enough_are_copied_unchanged(herbarium2020, tmp_path):
    data = herbarium2020["train"].root.parent
    record = prepare(data, tmp_path / "out", 512, workers=0, progress=False)
    assert record["images_resized"] == 0 and record["images_copied"] > 0
    for relative, path in _files(data).items():
        assert (tmp_path / "out" / relative).read_bytes() == path.read_bytes()


def test_large_sheet_is_shrunk_to_max_side(tmp_path):
    data = tmp_path / "data"
    write_jpeg(data / "train" / "images" / "big.jpg", 1000, 661, seed=3)
    (data / "train" / "metadata.json").write_text(
        '{"images": [{"id": 1, "file_name": "images/big.jpg"}], "annotations": [{"image_id": 1, "category_id": 0}],'
        ' "categories": [{"id": 0, "name": "Poa annua", "genus": "Poa", "family": "Poaceae"}]}')
    prepare(data, tmp_path / "out", 512, workers=0, progress=False)
    with Image.open(tmp_path / "out" / "train" / "images" / "big.jpg") as image:
        assert image.size == (512, 338)


# -------------------------------------------------------------- refusals
def test_refuses_a_non_empty_out_without_overwrite(herbarium2020, tmp_path):
    data = herbarium2020["train"].root.parent
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("from before")
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare(data, out, MAX_SIDE, workers=0, progress=False)
    assert (out / "stale.txt").read_text() == "from before"
    prepare(data, out, MAX_SIDE, workers=0, progress=False, overwrite=True)
    assert not (out / "stale.txt").exists()
    _check_copy(data, out, ["train", "test"])


def test_an_empty_out_is_fine(herbarium2020, tmp_path):
    (tmp_path / "out").mkdir()
    prepare(herbarium2020["train"].root.parent, tmp_path / "out", MAX_SIDE, workers=0, progress=False)
    assert (tmp_path / "out" / "train" / "metadata.json").is_file()


def test_refuses_an_out_inside_the_dataset_even_with_overwrite(herbarium2020):
    data = herbarium2020["train"].root.parent
    with pytest.raises(ValueError, match="outside the dataset"):
        prepare(data, data / "small", MAX_SIDE, workers=0, progress=False, overwrite=True)
    with pytest.raises(ValueError, match="outside the dataset"):
        prepare(data, data.parent, MAX_SIDE, workers=0, progress=False, overwrite=True)
    assert (data / "train" / "metadata.json").is_file()


# ------------------------------------------------------------ bad images
def test_unreadable_image_fails_naming_the_file(herbarium2020, tmp_path):
    data = herbarium2020["train"].root.parent
    bad = truncate(herbarium2020["train"].files[herbarium2020["train"].image_ids[2]])
    with pytest.raises(BadImageError, match="--skip-bad-images") as error:
        prepare(data, tmp_path / "out", MAX_SIDE, workers=2, progress=False)
    assert str(bad) in str(error.value)


def test_skip_bad_images_leaves_them_out_and_counts_them(herbarium2020, tmp_path):
    data = herbarium2020["train"].root.parent
    bad = truncate(herbarium2020["train"].files[herbarium2020["train"].image_ids[2]])
    record = prepare(data, tmp_path / "out", MAX_SIDE, workers=0, progress=False, skip_bad_images=True)
    assert record["skipped_bad_images"] == 1 and record["bad_images"] == [str(bad)]
    assert not (tmp_path / "out" / bad.relative_to(data)).exists()
    n_images = len(herbarium2020["train"].image_ids) + len(herbarium2020["test"].image_ids)
    assert record["images_resized"] == n_images - 1
    assert _samples(tmp_path / "out", "train") == _samples(data, "train")


def test_a_small_unreadable_image_is_not_copied_as_if_fine(herbarium2020, tmp_path):
    data = herbarium2020["train"].root.parent
    truncate(herbarium2020["train"].files[herbarium2020["train"].image_ids[0]])
    with pytest.raises(BadImageError):
        prepare(data, tmp_path / "out", 512, workers=0, progress=False)


# ------------------------------------------------------------------- CLI
def test_command_line(herbarium2020, tmp_path, capsys):
    data = herbarium2020["train"].root.parent
    out = tmp_path / "out"
    assert main([str(data), "--max-side", str(MAX_SIDE), "--out", str(out), "--workers", "0", "--quiet"]) == 0
    assert "resized" in capsys.readouterr().out
    _check_copy(data, out, ["train", "test"])
    assert main([str(data), "--max-side", str(MAX_SIDE), "--out", str(out), "--workers", "0", "--quiet"]) == 2
    assert re.match(r"error: .*not empty.*--overwrite", capsys.readouterr().err)
