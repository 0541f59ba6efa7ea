"""Trust: a run folder is one run's alone, a checkpoint knows its classes, every image is read as it looks,
and every expected failure is one line (``error: ...``, status 2; Ctrl-C: one line, status 130)."""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fixtures import tiny_demo_data, write_herbarium2022
from herbarium import atomic, cli, engine, load
from herbarium.checkpoint import save_checkpoint
from herbarium.data.confine import OutsideRootError
from herbarium.data.dataset import ImageDataset
from herbarium.data.gpu import BytesDataset, GpuBatchDecoder, device_decodable
from herbarium.data.images import load_rgb
from herbarium.data.readers import DatasetError, read_split
from herbarium.errors import command, message
from herbarium.evaluation import runner
from herbarium.evaluation.cli import main as eval_main
from herbarium.train_cli import main as train_main

REPO = Path(__file__).resolve().parents[1]
TRAIN = ["--val-split", "test", "--size", "32", "--batch-size", "8", "--workers", "0", "--trunk", "resnet10t", "--no-pretrained",
         "--optim", "adam@2e-3:0", "--schedule", "cosine", "--seed", "3", "--device", "cpu", "--quiet"]
EVAL = ["--split", "test", "--views", "plain", "--workers", "0", "--device", "cpu", "--batch-size", "16"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return tiny_demo_data(tmp_path_factory.mktemp("trust") / "data", max_per_class=6)


@pytest.fixture(scope="module")
def run(data, tmp_path_factory) -> Path:
    """One tiny trained run (1 epoch) that the tests here read but never change."""
    out = tmp_path_factory.mktemp("trust_run") / "run"
    assert train_main([str(data), *TRAIN, "--epochs", "1", "--out", str(out)]) == 0
    return out


WARNING = re.compile(r"^\S+:\d+: \w*Warning: ")  # a Python warning line; its source line follows, indented
PROGRESS = re.compile(r"\d+%\|")  # a tqdm progress bar


def one_error_line(stderr: str) -> str:
    """The one ``error: ...`` line of a failed command, and no traceback."""
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.strip()]
    lines = [line for line in lines if not WARNING.match(line) and not line.startswith("  ")  # warnings aside
             and not PROGRESS.search(line)]  # and progress bars
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with the hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}  # .lock: the pid of its last holder


def foreign_folder(folder: Path) -> Path:
    """A folder of the user's own that happens to use names training writes."""
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "tb").mkdir()
    (folder / "config.json").write_text('{"mine": true}')
    (folder / "log.jsonl").write_text("my own log\n")
    (folder / "stats.json").write_text('{"mean": [0.5]}')
    (folder / "checkpoints" / "weights.pt").write_bytes(b"my weights")
    (folder / "tb" / "events.out.tfevents.1.mine").write_bytes(b"my events")
    return folder


def crash_at_forward(monkeypatch, n: int) -> None:
    """Make the n-th forward pass raise KeyboardInterrupt, as Ctrl-C would."""
    real, calls = engine.forward_loss, {"n": 0}

    def crashing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "forward_loss", crashing)


# ------------------------------------------------------------- 1. only a folder a run made is ever cleared
@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_a_folder_no_run_made_is_refused_and_left_as_it_was(data, tmp_path, capsys, overwrite):
    folder = foreign_folder(tmp_path / "mine")
    before = snapshot(folder)
    assert train_main([str(data), *TRAIN, "--epochs", "1", "--out", str(folder), *overwrite]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(folder) in line and "run.json" in line and "config.json" in line
    assert snapshot(folder) == before


def test_out_dot_on_a_folder_with_a_config_json_is_refused(data, tmp_path, capsys, monkeypatch):
    (tmp_path / "config.json").write_text('{"project": "mine"}')
    monkeypatch.chdir(tmp_path)
    assert train_main([str(data), *TRAIN, "--epochs", "1", "--out", "."]) == 2
    assert "no herbarium run made it" in one_error_line(capsys.readouterr().err)
    assert (tmp_path / "config.json").read_text() == '{"project": "mine"}'


def test_overwrite_clears_only_what_the_run_wrote(run, tmp_path, data):
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    (copy / "checkpoints" / "notes.txt").write_text("keep me")
    (copy / "tb" / "my_plot.png").write_bytes(b"keep me too")
    old_last = (copy / "checkpoints" / "last.pt").read_bytes()
    assert json.loads((copy / "run.json").read_text())["herbarium"]
    assert train_main([str(data), *TRAIN, "--epochs", "1", "--seed", "4", "--out", str(copy), "--overwrite"]) == 0
    assert (copy / "checkpoints" / "notes.txt").read_text() == "keep me"
    assert (copy / "tb" / "my_plot.png").read_bytes() == b"keep me too"
    assert (copy / "checkpoints" / "last.pt").read_bytes() != old_last
    assert len((copy / "log.jsonl").read_text().splitlines()) == 1  # the old log went with its run


# ------------------------------------------------------------- 2. one process per run folder
LOCK_HOLDER = """
import fcntl, sys, time
handle = open(sys.argv[1], "a+")
fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
handle.seek(0); handle.truncate(); handle.write("%d\\n" % __import__("os").getpid()); handle.flush()
print("locked", flush=True)
time.sleep(60)
"""


def test_a_second_training_process_on_the_same_folder_is_refused_naming_the_holder(data, tmp_path, capsys):
    out = tmp_path / "shared"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(out / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert train_main([str(data), *TRAIN, "--epochs", "1", "--out", str(out)]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert f"pid {holder.pid}" in line and str(out) in line
        assert not (out / "config.json").exists() and not (out / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()
    # The holder died (as by kill -9): the OS released its lock, nothing stale is left to block the next run.
    assert train_main([str(data), *TRAIN, "--epochs", "1", "--out", str(out)]) == 0


def test_a_training_process_holds_the_lock_while_it_runs(data, tmp_path, monkeypatch):
    out = tmp_path / "held"
    seen = {}
    real = engine.forward_loss

    def probing(*args, **kwargs):
        if not seen:
            with open(out / ".lock") as handle:
                try:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    seen["locked"] = False
                except BlockingIOError:
                    seen["locked"] = True
                seen["pid"] = handle.read().strip()
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "forward_loss", probing)
    assert train_main([str(data), *TRAIN, "--epochs", "1", "--out", str(out)]) == 0
    assert seen == {"locked": True, "pid": str(os.getpid())}


# ------------------------------------------------------------- 3. an evaluation folder holds one evaluation or none
def test_an_evaluation_interrupted_in_its_report_leaves_the_earlier_one_untouched(run, data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "eval"
    assert eval_main([str(run), "--data", str(data), *EVAL, "--out", str(out)]) == 0
    before = {name: os.stat(out / name).st_mtime_ns for name in ("submission.csv", "predictions.csv", "metrics.json")}
    contents = snapshot(out)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "write_report", interrupted)
    assert eval_main([str(run), "--data", str(data), *EVAL, "--out", str(out)]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        "interrupted; nothing was written (the output folder is as it was)"
    assert {name: os.stat(out / name).st_mtime_ns for name in before} == before
    assert snapshot(out) == contents
    assert [p.name for p in tmp_path.iterdir()] == ["eval"]  # no staging folder left behind


def test_a_new_evaluation_replaces_every_file_of_the_earlier_one(run, data, tmp_path):
    out = tmp_path / "eval"
    assert eval_main([str(run), "--data", str(data), *EVAL, "--out", str(out)]) == 0
    (out / "plots" / "stale.png").write_bytes(b"from an older evaluation")
    (out / "notes.txt").write_text("mine")
    assert eval_main([str(run), "--data", str(data), *EVAL, "--out", str(out)]) == 0
    assert not (out / "plots" / "stale.png").exists() and (out / "notes.txt").read_text() == "mine"
    assert (out / "submission.csv").is_file() and (out / "report.html").is_file()


# ------------------------------------------------------------- 4 and 11. whole files; a full disk in one line
FILE_LIMITED = """
import resource, sys
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
from herbarium.train_cli import main
sys.exit(main(["--resume", sys.argv[2], "--epochs", "2"]))
"""


def resume_under_file_limit(run: Path, limit: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", FILE_LIMITED, str(limit), str(run)], capture_output=True, text=True,
                          env=env, timeout=300)


def test_run_files_are_written_whole_or_not_at_all(run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    before = snapshot(copy)
    size = (copy / "config.json").stat().st_size
    result = resume_under_file_limit(copy, size // 2)  # config.json cannot be written in full
    assert result.returncode == 2, result.stderr
    line = one_error_line(result.stderr)
    assert "ulimit -f" in line and str(copy / "config.json") in line and "the previous file is intact" in line
    assert snapshot(copy) == before  # config.json whole and as it was; no temporary file left


def test_a_checkpoint_that_does_not_fit_keeps_the_previous_one_and_says_why(run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    last = (copy / "checkpoints" / "last.pt").read_bytes()
    result = resume_under_file_limit(copy, len(last) // 4)  # the run files fit, a checkpoint does not
    assert result.returncode == 2, result.stderr
    line = one_error_line(result.stderr)
    assert f"while writing {copy / 'checkpoints' / 'last.pt'}; the previous checkpoint is intact" in line
    assert (copy / "checkpoints" / "last.pt").read_bytes() == last
    assert not list((copy / "checkpoints").glob(".*"))  # no temporary file left


def test_torch_writer_failure_on_a_full_disk_reads_as_out_of_space(tmp_path, monkeypatch):
    target = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(2)}}, target)

    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4160 vs 4054")

    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(100, 100, 0))
    with pytest.raises(atomic.WriteError) as caught:
        save_checkpoint({"model": {}}, target)
    assert str(caught.value).startswith("no space left on ")
    assert f"while writing {target}; the previous checkpoint is intact" in str(caught.value)
    assert torch.load(target, weights_only=True)["model"]["w"].sum() == 2


def test_on_a_read_only_folder_the_failed_clean_up_does_not_hide_the_real_error(tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(torch, "save", read_only)
    monkeypatch.setattr(atomic.os, "unlink", read_only)
    with pytest.raises(atomic.WriteError, match="is a read-only file system while writing .*last.pt; no checkpoint was written"):
        save_checkpoint({"model": {}}, tmp_path / "last.pt")


# ------------------------------------------------------------- 5. a checkpoint knows its classes
def run_with_other_names(run: Path, folder: Path) -> Path:
    """``run`` copied, with two species' names swapped in its taxonomy: as many classes, other meanings."""
    shutil.copytree(run, folder)
    taxonomy = json.loads((folder / "taxonomy.json").read_text())
    names = taxonomy["names"]["species"]
    names[0], names[1] = names[1], names[0]
    (folder / "taxonomy.json").write_text(json.dumps(taxonomy))
    return folder


def test_a_checkpoint_in_a_run_with_other_classes_is_refused_by_every_loader(run, data, tmp_path, capsys):
    other = run_with_other_names(run, tmp_path / "other")
    assert eval_main([str(other), "--data", str(data), *EVAL, "--out", str(tmp_path / "eval")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(other) in line and str(run) in line and "other classes" in line
    assert not (tmp_path / "eval").exists()
    image = next((data / "test").rglob("*.jpg"))
    assert cli.main(["predict", str(other), str(image), "--out", str(tmp_path / "p.csv"), "--workers", "0"]) == 2
    assert "other classes" in one_error_line(capsys.readouterr().err) and not (tmp_path / "p.csv").exists()
    assert cli.main(["export", str(other), "--out", str(tmp_path / "export")]) == 2
    assert "other classes" in one_error_line(capsys.readouterr().err)


def test_resume_refuses_a_checkpoint_of_other_classes(run, data, tmp_path, capsys):
    other_data = tmp_path / "data"
    shutil.copytree(data, other_data)
    metadata = json.loads((other_data / "train" / "metadata.json").read_text())
    first, second = metadata["categories"][0], metadata["categories"][1]
    first["name"], second["name"] = second["name"], first["name"]
    (other_data / "train" / "metadata.json").write_text(json.dumps(metadata))
    other = tmp_path / "other"
    assert train_main([str(other_data), *TRAIN, "--epochs", "1", "--out", str(other)]) == 0
    shutil.copy(run / "checkpoints" / "last.pt", other / "checkpoints" / "last.pt")
    assert train_main(["--resume", str(other), "--epochs", "2"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "other classes" in line and str(run) in line and str(other) in line


def test_resume_takes_moved_data_and_refuses_fewer_epochs_than_trained(run, data, tmp_path, capsys):
    resumed, moved = tmp_path / "run", tmp_path / "moved"
    shutil.copytree(run, resumed)
    shutil.copytree(data, moved)
    assert train_main(["--resume", str(resumed), "--data", str(moved), "--epochs", "2"]) == 0
    assert json.loads((resumed / "config.json").read_text())["data"]["data"] == str(moved)
    capsys.readouterr()
    assert train_main(["--resume", str(resumed), "--epochs", "1"]) == 2  # not "done: epoch 2/1"
    line = one_error_line(capsys.readouterr().err)
    assert "--epochs 1" in line and "already trained 2 epochs" in line


def test_resume_accepts_the_runs_own_lr_and_refuses_another_naming_lr(run, data, tmp_path, capsys):
    resumed = tmp_path / "run"
    shutil.copytree(run, resumed)  # trained with --optim adam@2e-3:0
    assert train_main(["--resume", str(resumed), "--optim", "adam@0.002:0"]) == 0  # the same phases, spelt otherwise
    default_lr = tmp_path / "default_lr"
    shutil.copytree(run, default_lr)
    config = json.loads((default_lr / "config.json").read_text())
    config["optim"]["optim"] = "adam:0"  # a run trained with adam's own LR
    (default_lr / "config.json").write_text(json.dumps(config))
    assert train_main(["--resume", str(default_lr), "--lr", "3e-4"]) == 0  # adam's own LR: no change
    capsys.readouterr()
    assert train_main(["--resume", str(default_lr), "--lr", "0.5"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("error: --optim (set by --lr):"), line


def test_an_epoch_resumed_mid_way_says_its_loss_is_over_the_batches_after_and_stale_saves_are_cleared(
        run, data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    crash_at_forward(monkeypatch, 4)
    assert train_main([str(data), *TRAIN, "--epochs", "1", "--out", str(out), "--checkpoint-every", "1"]) == 130
    monkeypatch.undo()
    stale = out / "checkpoints" / ".last.pt.tmp"
    stale.write_bytes(b"")  # as a kill during a save leaves it
    capsys.readouterr()
    assert train_main(["--resume", str(out)]) == 0
    record = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert record["loss_from_batch"] == 4, record  # three batches were trained before the interruption
    assert "(from batch 4, resumed)" in capsys.readouterr().out
    assert "loss_from_batch" not in json.loads((run / "log.jsonl").read_text().splitlines()[-1])  # a whole epoch
    assert not stale.exists()


# ------------------------------------------------------------- 6. repeated ids, at read time
def edit_metadata(data: Path, split: str, change) -> Path:
    path = data / split / "metadata.json"
    metadata = json.loads(path.read_text())
    change(metadata)
    path.write_text(json.dumps(metadata))
    return path


@pytest.mark.parametrize("split", ["train", "test"])
def test_an_image_id_listed_twice_is_refused_naming_it(data, tmp_path, split):
    copy = tmp_path / "data"
    shutil.copytree(data, copy)

    def repeat_image(metadata):
        twin = dict(metadata["images"][1], id=metadata["images"][0]["id"])
        metadata["images"].append(twin)

    path = edit_metadata(copy, split, repeat_image)
    repeated = json.loads(path.read_text())["images"][0]["id"]
    with pytest.raises(DatasetError, match=f"{path}: image ids that appear more than once: {repeated!r}"):
        read_split(copy, split)


def test_two_annotations_of_one_image_are_refused_naming_it(data, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    path = edit_metadata(copy, "train", lambda m: m["annotations"].append(dict(m["annotations"][3], id=10**6)))
    image_id = json.loads(path.read_text())["annotations"][3]["image_id"]
    with pytest.raises(DatasetError, match=f"annotations of images that appear more than once: {image_id!r}"):
        read_split(copy, "train")


def test_a_labels_csv_with_a_repeated_image_id_is_refused(tmp_path):
    written = write_herbarium2022(tmp_path / "data")
    labels = tmp_path / "labels.csv"
    test_ids = written["test"].image_ids
    labels.write_text("image_id,category_id\n" + "".join(f"{i},0\n" for i in [*test_ids, test_ids[0]]))
    with pytest.raises(DatasetError, match=f"image ids that appear more than once: '{test_ids[0]}'"):
        read_split(tmp_path / "data", "test", labels=labels)


# ------------------------------------------------------------- 7. every image read as a viewer shows it
def encoded(image: Image.Image, fmt: str, **options) -> io.BytesIO:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    buffer.seek(0)
    return buffer


def test_16_bit_greyscale_is_scaled_not_clipped_to_white():
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    for fmt, options in (("PNG", {}), ("TIFF", {})):
        image = load_rgb(encoded(Image.fromarray(ramp), fmt, **options))
        pixels = np.asarray(image)
        assert image.mode == "RGB" and pixels.shape == (64, 64, 3)
        np.testing.assert_allclose(pixels[..., 0], np.rint(ramp / 257.0), atol=1)


@pytest.mark.parametrize("mode, values, expected", [
    ("I", np.array([[0, 32768, 65535]], dtype=np.int32), [0, 128, 255]),      # 16-bit data in a 32-bit image
    ("I", np.array([[0, 100, 255]], dtype=np.int32), [0, 100, 255]),          # 8-bit data in a 32-bit image
    ("F", np.array([[0.0, 0.5, 1.0]], dtype=np.float32), [0, 128, 255]),      # floats in 0..1
])
def test_wide_modes_map_their_range_onto_8_bits(mode, values, expected):
    image = load_rgb(encoded(Image.fromarray(values, mode), "TIFF"))
    assert np.asarray(image)[0, :, 0].tolist() == expected


def test_transparency_is_laid_on_white_and_other_modes_convert():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:2, :, 3] = 255  # top half opaque red, bottom half fully transparent
    image = np.asarray(load_rgb(encoded(Image.fromarray(rgba, "RGBA"), "PNG")))
    assert image[0, 0].tolist() == [200, 0, 0] and image[3, 3].tolist() == [255, 255, 255]
    la = Image.fromarray(np.stack([np.full((4, 4), 60, np.uint8), np.zeros((4, 4), np.uint8)], -1), "LA")
    assert np.asarray(load_rgb(encoded(la, "PNG")))[0, 0].tolist() == [255, 255, 255]
    palette = Image.fromarray(rgba[..., :3].copy(), "RGB").convert("P")
    palette.info["transparency"] = palette.getpixel((3, 3))
    assert np.asarray(load_rgb(encoded(palette, "PNG", transparency=palette.getpixel((3, 3)))))[3, 3].tolist() == [255, 255, 255]
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # pure red in print colours
    assert np.asarray(load_rgb(encoded(cmyk, "JPEG", quality=100)))[0, 0].tolist() == pytest.approx([255, 0, 0], abs=3)


def oriented_jpeg(orientation: int) -> tuple[np.ndarray, bytes]:
    """A 40x20 (W x H) JPEG whose left half is white, tagged with an EXIF orientation."""
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = 255
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = orientation
    exif[0x010F] = "camera"
    return pixels, encoded(image, "JPEG", quality=95, exif=exif.tobytes()).getvalue()


def test_exif_orientation_is_applied_on_the_cpu_and_the_device_path():
    _, data = oriented_jpeg(6)  # "rotate 90 clockwise to view"
    upright = np.asarray(load_rgb(io.BytesIO(data)))
    assert upright.shape == (40, 20, 3)
    assert upright[:10].mean() > 200 and upright[-10:].mean() < 50  # the white half is now on top
    stream = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    assert not device_decodable(stream)  # nvJPEG would ignore the tag: the device path hands it to PIL
    assert device_decodable(torch.frombuffer(bytearray(oriented_jpeg(1)[1]), dtype=torch.uint8))
    decoded = GpuBatchDecoder("cpu").decode([stream])
    assert decoded.sizes[0] == (40, 20) and torch.equal(decoded.images[0], torch.from_numpy(upright).permute(2, 0, 1))


def test_predict_reads_a_rotated_photo_upright(run, data, tmp_path):
    source = np.asarray(Image.open(sorted((data / "test").rglob("*.jpg"))[0]))
    source = np.ascontiguousarray(np.concatenate([source, source[:, ::-1] // 2], axis=1))  # not square, not symmetric
    Image.fromarray(source).save(tmp_path / "upright.png")
    rotated = Image.fromarray(np.ascontiguousarray(np.rot90(source, k=1)))  # stored turned 90 degrees anticlockwise
    exif = rotated.getexif()
    exif[0x0112] = 6  # ... and tagged "turn 90 clockwise to view"
    rotated.save(tmp_path / "rotated.png", exif=exif.tobytes())  # lossless: upright, it is the same picture
    model = load(run, device="cpu")
    upright_prediction, rotated_prediction = model.predict([tmp_path / "upright.png", tmp_path / "rotated.png"], topk=8)
    in_memory = model.predict([Image.open(tmp_path / "rotated.png")], topk=8)[0]  # a PIL image given to the API
    for prediction in (rotated_prediction, in_memory):
        for rank, top in upright_prediction.top.items():
            assert [name for name, _ in prediction.top[rank]] == [name for name, _ in top]
            assert [p for _, p in prediction.top[rank]] == pytest.approx([p for _, p in top], abs=1e-6)


# ------------------------------------------------------------- 8. symbolic links stay inside the dataset
def data_with_links_out(data: Path, folder: Path) -> tuple[Path, Path, Path]:
    """A copy of ``data`` whose first training image is a link to a file outside it, and whose second image's
    folder is a link to a folder outside it."""
    shutil.copytree(data, folder / "data")
    secret = folder / "secret"
    secret.mkdir()
    metadata = json.loads((folder / "data" / "train" / "metadata.json").read_text())
    first = folder / "data" / "train" / metadata["images"][0]["file_name"]
    shutil.copy(first, secret / "private.jpg")
    first.unlink()
    first.symlink_to(secret / "private.jpg")
    second = folder / "data" / "train" / metadata["images"][-1]["file_name"]
    shutil.copytree(second.parent, secret / "elsewhere")
    shutil.rmtree(second.parent)
    second.parent.symlink_to(secret / "elsewhere", target_is_directory=True)
    return folder / "data", first, second


def test_a_symbolic_link_out_of_the_dataset_is_refused(data, tmp_path, monkeypatch):
    linked, first, second = data_with_links_out(data, tmp_path)
    split = read_split(linked, "train")
    dataset = ImageDataset(split, split.taxonomy.ranks, lambda image: image, skip_bad_images=True)
    with pytest.raises(OutsideRootError, match=f"at {first}: a symbolic link leads out of the dataset root"):
        dataset.read_image(0)  # --skip-bad-images does not skip it: it is no unreadable image
    with pytest.raises(OutsideRootError, match=f"at {second}: a symbolic link leads out"):
        dataset.read_image(len(split) - 1)
    with pytest.raises(OutsideRootError, match=str(first)):
        BytesDataset(split, split.taxonomy.ranks).read_bytes(0)
    inside = linked / "train" / "inside.jpg"
    inside.symlink_to(linked / "train" / split.samples[1].file_name)  # a link that stays inside is fine
    assert split.readable_path(dataclasses.replace(split.samples[1], file_name="inside.jpg")) == inside
    monkeypatch.setenv("HERBARIUM_ALLOW_SYMLINKS_OUT", "1")
    assert dataset.read_image(0).size == Image.open(tmp_path / "secret" / "private.jpg").size


# ------------------------------------------------------------- 10. a worker's error is the original line
def test_a_worker_error_is_reported_as_its_original_message():
    wrapped = type("BadImageError", (RuntimeError,), {})(
        "Caught BadImageError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\n    raise BadImageError(...)\n'
        "herbarium.data.images.BadImageError: cannot read image 7 at /d/7.jpg: truncated file\n")
    assert message(wrapped) == "cannot read image 7 at /d/7.jpg: truncated file"


# ------------------------------------------------------------- 12. Ctrl-C in one line, status 130
def test_ctrl_c_in_training_says_where_and_how_to_resume(data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    crash_at_forward(monkeypatch, 3)  # after two steps (and the checkpoint --checkpoint-every 2 writes)
    assert train_main([str(data), *TRAIN, "--epochs", "2", "--checkpoint-every", "2", "--out", str(out)]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"interrupted at epoch 1 step 2; resume with: python train.py --resume {out}"
    assert "Traceback" not in "\n".join(err)
    monkeypatch.undo()
    assert train_main(["--resume", str(out)]) == 0


def test_ctrl_c_in_any_command_is_one_line_and_status_130(capsys):
    @command
    def interrupted(argv=None):
        raise KeyboardInterrupt

    assert interrupted([]) == 130
    assert capsys.readouterr().err == "interrupted\n"


# ------------------------------------------------------------- the bad-input table
def truncated_checkpoint_run(run: Path, folder: Path) -> Path:
    shutil.copytree(run, folder)
    for path in (folder / "checkpoints").glob("*.pt"):
        path.write_bytes(path.read_bytes()[:1000])
    return folder


def pickled_checkpoint_run(run: Path, folder: Path) -> Path:
    shutil.copytree(run, folder)
    for path in (folder / "checkpoints").glob("*.pt"):
        torch.save({"model": {}, "payload": Path("x")}, path)
    return folder


def data_with_a_bad_image(data: Path, folder: Path) -> tuple[Path, Path]:
    shutil.copytree(data, folder)
    metadata = json.loads((folder / "train" / "metadata.json").read_text())
    bad = folder / "train" / metadata["images"][0]["file_name"]
    bad.write_bytes(bad.read_bytes()[:40])
    return folder, bad


def data_with_a_repeated_id(data: Path, folder: Path) -> tuple[Path, str]:
    shutil.copytree(data, folder)
    metadata = json.loads((folder / "train" / "metadata.json").read_text())
    metadata["images"].append(dict(metadata["images"][1], id=metadata["images"][0]["id"]))
    (folder / "train" / "metadata.json").write_text(json.dumps(metadata))
    return folder, repr(metadata["images"][0]["id"])


def case_train_foreign_out(run, data, tmp):
    folder = foreign_folder(tmp / "mine")
    return ["train", str(data), *TRAIN, "--epochs", "1", "--out", str(folder), "--overwrite"], str(folder), folder / "run.json"


def case_train_repeated_id(run, data, tmp):
    copy, repeated = data_with_a_repeated_id(data, tmp / "data")
    return ["train", str(copy), *TRAIN, "--epochs", "1", "--out", str(tmp / "out")], repeated, tmp / "out"


def case_train_bad_image_with_workers(run, data, tmp):
    copy, bad = data_with_a_bad_image(data, tmp / "data")
    argv = ["train", str(copy), *TRAIN, "--epochs", "1", "--out", str(tmp / "out"), "--workers", "1"]
    return argv, str(bad), tmp / "out" / "checkpoints" / "last.pt"


def case_stats_bad_image_with_workers(run, data, tmp):
    copy, bad = data_with_a_bad_image(data, tmp / "data")
    out = tmp / "stats.json"
    return ["collect-stats", str(copy), "--size", "32", "--workers", "1", "--out", str(out), "--quiet"], str(bad), out


def case_train_cuda_without_gpu(run, data, tmp):
    argv = ["train", str(data), *TRAIN, "--epochs", "1", "--out", str(tmp / "out"), "--device", "cuda"]
    return argv, "--device cuda", tmp / "out"


def case_train_symlink_out_of_the_dataset_with_workers(run, data, tmp):
    linked, first, _ = data_with_links_out(data, tmp)
    argv = ["train", str(linked), *TRAIN, "--epochs", "1", "--out", str(tmp / "out"), "--workers", "1"]
    return argv, str(first), tmp / "out" / "checkpoints" / "last.pt"


def bad_option_case(*option: str):
    """A table case: ``train`` with one out-of-range option, refused by name before anything is written."""

    def case(run, data, tmp):
        return ["train", str(data), *TRAIN, "--epochs", "1", "--out", str(tmp / "out"), *option], option[0], tmp / "out"

    return case


case_train_batch_size_0 = bad_option_case("--batch-size", "0")
case_train_accum_steps_0 = bad_option_case("--accum-steps", "0")
case_train_workers_negative = bad_option_case("--workers", "-1")
case_train_lr_nan = bad_option_case("--lr", "nan")
case_train_lr_negative = bad_option_case("--lr", "-1")
case_train_optim_lr_nan = bad_option_case("--optim", "adamw@nan:0")
case_train_epochs_0 = bad_option_case("--epochs", "0")
case_train_nan_skip_limit_negative = bad_option_case("--nan-skip-limit", "-1")
case_train_stop_after_epoch_0 = bad_option_case("--stop-after-epoch", "0")


def stats_file_case(text: str):
    def case(run, data, tmp):
        stats = tmp / "stats.json"
        stats.write_text(text)
        argv = ["train", str(data), *TRAIN, "--epochs", "1", "--out", str(tmp / "out"), "--stats", str(stats)]
        return argv, str(stats), tmp / "out" / "checkpoints"

    return case


case_train_stats_not_json = stats_file_case("{not json")
case_train_stats_nan = stats_file_case('{"mean": [NaN, 0.5, 0.5], "std": [0.2, 0.2, 0.2]}')


def case_eval_not_a_run(run, data, tmp):
    (tmp / "empty").mkdir()
    return ["evaluate", str(tmp / "empty"), "--data", str(data), *EVAL], str(tmp / "empty"), tmp / "empty" / "eval"


def case_eval_truncated_checkpoint(run, data, tmp):
    folder = truncated_checkpoint_run(run, tmp / "run")
    return ["evaluate", str(folder), "--data", str(data), *EVAL], "last.pt", folder / "eval" / "test"


def case_eval_other_classes(run, data, tmp):
    folder = run_with_other_names(run, tmp / "run")
    return ["evaluate", str(folder), "--data", str(data), *EVAL], str(folder), folder / "eval" / "test"


def case_eval_repeated_test_id(run, data, tmp):
    copy = tmp / "data"
    shutil.copytree(data, copy)
    path = edit_metadata(copy, "test", lambda m: m["images"].append(dict(m["images"][1], id=m["images"][0]["id"])))
    out = tmp / "eval"
    return ["evaluate", str(run), "--data", str(copy), *EVAL, "--out", str(out)], str(path), out


def case_predict_not_a_run(run, data, tmp):
    (tmp / "empty").mkdir()
    image = next((data / "test").rglob("*.jpg"))
    return ["predict", str(tmp / "empty"), str(image), "--out", str(tmp / "p.csv")], str(tmp / "empty"), tmp / "p.csv"


def case_predict_truncated_checkpoint(run, data, tmp):
    folder = truncated_checkpoint_run(run, tmp / "run")
    image = next((data / "test").rglob("*.jpg"))
    return ["predict", str(folder), str(image), "--out", str(tmp / "p.csv")], "last.pt", tmp / "p.csv"


def case_predict_pickled_checkpoint(run, data, tmp):
    folder = pickled_checkpoint_run(run, tmp / "run")
    image = next((data / "test").rglob("*.jpg"))
    return ["predict", str(folder), str(image), "--out", str(tmp / "p.csv")], "refused to load", tmp / "p.csv"


def case_predict_unreadable_image(run, data, tmp):
    bad = tmp / "bad.jpg"
    bad.write_bytes(b"not an image")
    return ["predict", str(run), str(bad), "--out", str(tmp / "p.csv"), "--workers", "0"], str(bad), tmp / "p.csv"


def case_predict_cuda_without_gpu(run, data, tmp):
    image = next((data / "test").rglob("*.jpg"))
    return ["predict", str(run), str(image), "--out", str(tmp / "p.csv"), "--device", "cuda"], "--device cuda", tmp / "p.csv"


def case_export_not_a_run(run, data, tmp):
    (tmp / "empty").mkdir()
    return ["export", str(tmp / "empty"), "--out", str(tmp / "x")], str(tmp / "empty"), tmp / "x" / "model.safetensors"


def case_export_truncated_checkpoint(run, data, tmp):
    folder = truncated_checkpoint_run(run, tmp / "run")
    return ["export", str(folder), "--out", str(tmp / "x")], "last.pt", tmp / "x" / "model.safetensors"


CASES = [case for name, case in sorted(globals().items()) if name.startswith("case_")]
CASE_NAMES = [name[len("case_"):] for name in sorted(globals()) if name.startswith("case_")]


@pytest.mark.parametrize("case", CASES, ids=CASE_NAMES)
def test_bad_input_is_one_line_status_2_naming_the_culprit_and_leaves_nothing_to_trust(case, run, data, tmp_path, capfd):
    if "cuda" in case.__name__ and torch.cuda.is_available():
        pytest.skip("the machine has a GPU")
    argv, culprit, untrusted = case(run, data, tmp_path)
    capfd.readouterr()
    try:
        status = cli.main(argv)
    except SystemExit as exit:  # argparse's refusal of an option: its status is the process's
        status = exit.code
    assert status == 2
    line = one_error_line(capfd.readouterr().err)
    assert culprit in line, line
    assert not untrusted.exists()
