"""Using a trained run: the Python API, ``herbarium predict`` and ``herbarium export``."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import herbarium
from herbarium import cli
from herbarium.config import TrainConfig
from herbarium.data.images import BadImageError
from herbarium.data.readers import read_split
from herbarium.evaluation.runner import load_run
from herbarium.predict import expand_images
from herbarium.run_dir import RunDir, locate_checkpoint


@pytest.fixture(scope="module")
def trained(tiny_run) -> tuple[Path, Path]:
    return tiny_run


def image_files(data: Path) -> list[Path]:
    split = read_split(data, "test")
    return [split.path(sample) for sample in split.samples]


# ------------------------------------------------------- which checkpoint
@pytest.mark.parametrize(("early_stop", "files", "chosen"), [
    (None, ("last.pt", "best.pt"), "last.pt"),  # the end of the schedule, not a noisy best epoch
    (3, ("last.pt", "best.pt"), "best.pt"),  # --early-stop ends past the best epoch by design
    (None, ("best.pt",), "best.pt"),  # herbarium rebalance writes best.pt alone
    (3, ("last.pt",), "last.pt"),
])
def test_a_run_folder_stands_for_its_last_checkpoint_unless_it_stopped_early(tmp_path, early_stop, files, chosen):
    run = RunDir(tmp_path)
    TrainConfig(early_stop=early_stop).save(run.config_file)
    run.checkpoints.mkdir()
    for name in files:
        (run.checkpoints / name).write_bytes(b"")
    assert locate_checkpoint(tmp_path) == (run.checkpoints / chosen, run)


# ------------------------------------------------------------------ the API
def test_load_exposes_model_taxonomy_and_transform(trained):
    data, run_dir = trained
    run = herbarium.load(run_dir, device="cpu")
    assert isinstance(run, herbarium.Run)
    assert run.checkpoint == run_dir / "checkpoints" / "last.pt"  # the end of the schedule, not the best epoch
    assert run.ranks == ("genus", "species")
    assert run.taxonomy.ranks == ("family", "genus", "species")
    tensor = run.transform(Image.open(image_files(data)[0]))
    assert tensor.shape == (3, 32, 32)
    with torch.no_grad():
        logits = run.model(tensor[None])
    assert set(logits) == {"species", "genus"} and logits["species"].shape == (1, run.taxonomy.num_classes("species"))
    assert "resnet10t" in repr(run)


def test_predict_round_trip_matches_the_model(trained):
    data, run_dir = trained
    run = herbarium.load(run_dir, device="cpu")
    files = image_files(data)[:4]
    predictions = run.predict(files + [Image.open(files[1]).convert("L")], topk=3, batch_size=2)
    assert [p.index for p in predictions] == [0, 1, 2, 3, 4]
    assert predictions[0].path == str(files[0]) and predictions[4].path is None
    with torch.no_grad():
        logits = run.model(torch.stack([run.transform(Image.open(f).convert("RGB")) for f in files]))
    taxonomy = run.taxonomy
    for row, p in enumerate(predictions[:4]):
        assert set(p.top) == {"genus", "species"}
        for rank in p.top:
            names = [name for name, _ in p.top[rank]]
            probabilities = [probability for _, probability in p.top[rank]]
            expected = torch.softmax(logits[rank][row], 0).topk(3)
            assert names == [taxonomy.names[rank][i] for i in expected.indices.tolist()]
            assert probabilities == pytest.approx(expected.values.tolist(), abs=1e-5)
        # the consistent path is a real path of the tree, one name per rank
        species = taxonomy.names["species"].index(p.consistent["species"])
        assert [taxonomy.names[r][i] for r, i in zip(taxonomy.ranks, taxonomy.paths[species])] == list(p.consistent.values())
        assert p.category_id == taxonomy.category_ids[species]
        assert 0 < p.consistent_probability <= 1
    # a grey PIL image is converted, not refused
    assert len(predictions[4].top["species"]) == 3
    # views are the evaluation's: 4 views (3 seeded training augmentations) give repeatable numbers
    first, second = run.predict(files[:2], views="4"), run.predict(files[:2], views="4")
    assert first == second


def test_predict_names_an_unreadable_file_or_skips_it(trained, tmp_path):
    data, run_dir = trained
    run = herbarium.load(run_dir, device="cpu")
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    good = image_files(data)[0]
    with pytest.raises(BadImageError, match="broken.jpg"):
        run.predict([good, bad])
    assert [p.path for p in run.predict([good, bad], skip_bad_images=True)] == [str(good)]


# -------------------------------------------------------------- the command
def test_expand_images_folders_globs_and_files(tmp_path):
    for name in ("a/1.jpg", "a/b/2.PNG", "a/notes.txt", "c/3.jpeg"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    found = expand_images([str(tmp_path / "a"), str(tmp_path / "c" / "*.jpeg"), str(tmp_path / "a" / "1.jpg")])
    assert found == [tmp_path / "a/1.jpg", tmp_path / "a/b/2.PNG", tmp_path / "c/3.jpeg"]
    with pytest.raises(FileNotFoundError, match="nothing_here"):
        expand_images([str(tmp_path / "nothing_here*.jpg")])


def test_predict_command_on_a_folder(trained, tmp_path, capsys):
    data, run_dir = trained
    folder = tmp_path / "my photos"
    files = image_files(data)[:3]
    for i, file in enumerate(files):
        (folder / f"sub{i % 2}").mkdir(parents=True, exist_ok=True)
        shutil.copy(file, folder / f"sub{i % 2}" / f"sheet{i}.jpg")
    out = tmp_path / "predictions.csv"
    assert cli.main(["predict", str(run_dir), str(folder), "--out", str(out), "--topk", "2", "--device", "cpu",
                     "--workers", "0", "--quiet"]) == 0
    assert f"3 images -> {out}" in capsys.readouterr().out
    rows = list(csv.DictReader(out.open()))
    assert [Path(row["path"]).name for row in rows] == ["sheet0.jpg", "sheet2.jpg", "sheet1.jpg"]
    assert list(rows[0]) == ["path", "consistent_family", "consistent_genus", "consistent_species", "consistent_prob",
                             "category_id", "genus_top1", "genus_top1_prob", "genus_top2", "genus_top2_prob",
                             "species_top1", "species_top1_prob", "species_top2", "species_top2_prob"]
    expected = herbarium.load(run_dir, device="cpu").predict([Path(row["path"]) for row in rows], topk=2)
    for row, p in zip(rows, expected):
        assert row["consistent_species"] == p.consistent["species"]
        assert row["species_top1"] == p.top["species"][0][0]
        assert float(row["genus_top2_prob"]) == pytest.approx(p.top["genus"][1][1], abs=1e-6)


def test_predict_command_refuses_a_missing_input(trained, tmp_path, capsys):
    _, run_dir = trained
    assert cli.main(["predict", str(run_dir), str(tmp_path / "missing.jpg")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing.jpg: no such file or folder" in err and err.count("\n") == 1


# ------------------------------------------------------------------ export
@pytest.fixture(scope="module")
def reference(trained):
    """The run's own model and a batch of inputs, with its logits."""
    _, run_dir = trained
    loaded = load_run(run_dir, torch.device("cpu"))
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = loaded.model(images)
    return loaded, images, logits


def test_export_safetensors_and_torchscript_reload_with_the_same_logits(trained, reference, tmp_path, capsys):
    from herbarium.export import load_safetensors

    _, run_dir = trained
    loaded, images, logits = reference
    out = tmp_path / "export"
    assert cli.main(["export", str(run_dir), "--format", "safetensors,torchscript", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "model.safetensors" in printed and "model.torchscript.pt" in printed
    # weights only: far smaller than the checkpoint with its optimizer state
    assert (out / "model.safetensors").stat().st_size < 0.6 * (run_dir / "checkpoints" / "best.pt").stat().st_size
    info = json.loads((out / "preprocessing.json").read_text())
    assert info["size"] == 32 and info["resize"] == 36 and info["mean"] == list(loaded.profile.mean)
    assert info["outputs"] == ["species", "genus"]
    assert json.loads((out / "taxonomy.json").read_text()) == loaded.taxonomy.to_dict()

    model, config, taxonomy, _ = load_safetensors(out)
    traced = torch.jit.load(str(out / "model.torchscript.pt"))
    with torch.no_grad():
        rebuilt, scripted = model(images), traced(images)
        scripted_one = traced(images[:1])  # another batch size than the trace's
    for rank in ("species", "genus"):
        torch.testing.assert_close(rebuilt[rank], logits[rank])
        torch.testing.assert_close(scripted[rank], logits[rank], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(scripted_one[rank], logits[rank][:1], rtol=1e-4, atol=1e-5)
    # the export folder loads through the API too, and predicts as the run does
    files = image_files(trained[0])[:2]
    assert herbarium.load(out, device="cpu").predict(files) == herbarium.load(run_dir, device="cpu").predict(files)


def test_export_onnx_reloads_with_the_same_logits(trained, reference, tmp_path):
    pytest.importorskip("onnx")
    runtime = pytest.importorskip("onnxruntime")
    from herbarium.export import export

    _, run_dir = trained
    loaded, images, logits = reference
    written = export(run_dir, ["onnx"], tmp_path)
    session = runtime.InferenceSession(str(written["onnx"]))
    assert [output.name for output in session.get_outputs()] == ["species", "genus"]
    metadata = session.get_modelmeta().custom_metadata_map  # class names and normalisation travel with the graph
    assert json.loads(metadata["ranks"]) == ["species", "genus"]
    assert json.loads(metadata["class_names"])["genus"] == loaded.taxonomy.names["genus"]
    assert json.loads(metadata["mean"]) == list(loaded.profile.mean) and metadata["size"] == "32"
    outputs = session.run(None, {"images": images.numpy()})
    for rank, value in zip(("species", "genus"), outputs):
        torch.testing.assert_close(torch.from_numpy(value), logits[rank], rtol=1e-4, atol=1e-4)


def test_export_onnx_without_the_package_says_what_to_install(trained, tmp_path, monkeypatch, capsys):
    import sys

    _, run_dir = trained
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx raises ImportError
    assert cli.main(["export", str(run_dir), "--format", "onnx", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "pip install 'herbarium-taxa[onnx]'" in err and "pip install -e '.[onnx]'" in err and err.count("\n") == 1
    assert not (tmp_path / "x").exists()  # nothing written


# ------------------------------------------------- the API on arrays and tensors
def test_predict_takes_numpy_and_tensors_pixels_and_model_input(trained):
    data, run_dir = trained
    run = herbarium.load(run_dir, device="cpu")
    files = image_files(data)[:3]
    pils = [Image.open(f).convert("RGB") for f in files]
    expected = run.predict(pils, topk=3)
    by_array = run.predict([np.asarray(image) for image in pils], topk=3)
    by_uint8_tensor = run.predict([torch.from_numpy(np.array(image)).permute(2, 0, 1) for image in pils], topk=3)
    normalised = torch.stack([run.transform(image) for image in pils])  # [3, 3, 32, 32] float: fed as it is
    by_model_input = run.predict(normalised, topk=3, batch_size=2)
    for got in (by_array, by_uint8_tensor, by_model_input):
        assert [(p.index, p.path, p.consistent) for p in got] == [(p.index, None, p.consistent) for p in expected]
        for mine, theirs in zip(got, expected):
            for rank in run.ranks:
                assert [n for n, _ in mine.top[rank]] == [n for n, _ in theirs.top[rank]]
                assert [q for _, q in mine.top[rank]] == pytest.approx([q for _, q in theirs.top[rank]], abs=1e-5)
    # one array, and a mixed list in input order
    assert len(run.predict(np.asarray(pils[0]))) == 1
    mixed = run.predict([files[0], normalised[1], np.asarray(pils[2])], topk=3)
    assert [p.consistent for p in mixed] == [p.consistent for p in expected]
    assert [p.path for p in mixed] == [str(files[0]), None, None]


@pytest.mark.parametrize(("image", "message"), [
    (np.zeros((8, 8, 3), dtype=np.float32), "numpy array of shape \\[8, 8, 3\\] and dtype float32"),
    (torch.zeros(3, 20, 20), "float32 tensor of shape \\[3, 20, 20\\]: .*float tensors \\[3, 32, 32\\]"),
    (torch.zeros(1, 32, 32, dtype=torch.uint8), "tensor of shape \\[1, 32, 32\\]"),
])
def test_predict_names_the_rule_for_a_wrong_array(trained, image, message):
    run = herbarium.load(trained[1], device="cpu")
    with pytest.raises(ValueError, match=message):
        run.predict(image)


def test_model_input_refuses_tta_views_and_decoding_is_public(trained):
    run = herbarium.load(trained[1], device="cpu")
    with pytest.raises(ValueError, match="needs images to augment"):
        run.predict(torch.zeros(3, 32, 32), views="flip")
    scores = run.log_probs(torch.zeros(2, 1, 3, 32, 32))
    decoded = run.decode(scores)
    assert set(decoded) == set(run.taxonomy.ranks) and decoded["species"].shape == (2,)
    species = run.predict(torch.zeros(3, 32, 32))[0].consistent["species"]
    assert run.taxonomy.names["species"][int(decoded["species"][0])] == species


def test_load_is_listed_by_dir():
    assert {"load", "Run", "Prediction"} <= set(dir(herbarium))


def test_run_to_returns_the_run_on_the_device(trained):
    run = herbarium.load(trained[1], device="cpu")
    assert run.to("cpu") is run and run.device == torch.device("cpu")
    assert next(run.model.parameters()).device == torch.device("cpu")


# ----------------------------------------------------- exports without herbarium
def test_the_safetensors_export_is_a_timm_model_folder_with_the_same_features(trained, reference, tmp_path):
    import timm
    from safetensors.torch import load_file

    from herbarium.export import export

    _, run_dir = trained
    loaded, images, logits = reference
    written = export(run_dir, ["safetensors"], tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architecture"] == "resnet10t" and config["num_features"] == 512
    assert config["pretrained_cfg"]["mean"] == list(loaded.profile.mean)
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    assert config["label_names_by_rank"]["species"] == loaded.taxonomy.names["species"]
    trunk = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    with torch.no_grad():
        features = trunk(images)
        torch.testing.assert_close(features, loaded.model.trunk(images))
    heads = load_file(str(tmp_path / "heads.safetensors"))  # the README's recipe for the logits without herbarium
    species = features @ heads["heads.species.fc.weight"].T + heads["heads.species.fc.bias"]
    torch.testing.assert_close(species, logits["species"], rtol=1e-4, atol=1e-5)
    assert list(timm.data.resolve_data_config({}, model=trunk)["mean"]) == list(loaded.profile.mean)
    for path in written.values():
        assert path.stat().st_mode & 0o777 == 0o644, path


def test_torch_export_program_reloads_with_the_same_logits(trained, reference, tmp_path, capsys):
    _, run_dir = trained
    _, images, logits = reference
    assert cli.main(["export", str(run_dir), "--format", "export", "--out", str(tmp_path)]) == 0
    assert "model.pt2" in capsys.readouterr().out
    program = torch.export.load(str(tmp_path / "model.pt2")).module()
    with torch.no_grad():
        outputs, one = program(images), program(images[:1])  # another batch size than the example's
    for rank in ("species", "genus"):
        torch.testing.assert_close(outputs[rank], logits[rank], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(one[rank], logits[rank][:1], rtol=1e-4, atol=1e-5)
    assert (tmp_path / "model.pt2").stat().st_mode & 0o777 == 0o644
