"""Reliability (issue 15): resume keeps the run's own settings, no silent loss in a submission, skipped images
counted everywhere, a NaN policy that protects the model, one step numbering, one-line errors."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fixtures import tiny_demo_data, tiny_train_config, truncate
from herbarium.run_dir import RunDir
from herbarium.data import splits
from herbarium import engine
from herbarium.checkpoint import load_checkpoint
from herbarium.config import DataConfig, OptimConfig, TrainConfig
from herbarium.errors import UsageError, command, is_expected
from herbarium.evaluation.cli import main as eval_main
from herbarium.stats import main as stats_main
from herbarium.train_cli import RESUME_CHANGEABLE, SHORTCUTS, build_parser, config_field, main as train_main

REPO = Path(__file__).resolve().parents[1]

# The tiny run of every test here: 8 species, 32 px, resnet10t, batches of 8, no loader workers.
TRAIN = ["--val-split", "test", "--size", "32", "--batch-size", "8", "--workers", "0", "--trunk", "resnet10t", "--no-pretrained",
         "--dropout", "0.2", "--optim", "adam@2e-3:0", "--schedule", "cosine", "--seed", "3", "--device", "cpu",
         "--log-every", "1"]


def tiny_data(out: Path) -> Path:
    return tiny_demo_data(out)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return tiny_data(tmp_path_factory.mktemp("tiny") / "data")


@pytest.fixture
def own_data(tmp_path) -> Path:
    """A dataset this test may damage."""
    return tiny_data(tmp_path / "own_data")


def tiny_config(data_dir: Path, out: Path, **changes) -> TrainConfig:
    return tiny_train_config(data_dir, out, epochs=1, batch_size=8, log_every=1, **changes)


def log_records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def saved_config(run: Path) -> dict:
    return json.loads((run / "config.json").read_text())


def one_error_line(stderr: str) -> str:
    """The one ``error: ...`` line of a failed command (progress bars aside), and no traceback."""
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.strip() and not line.startswith("epoch ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


def crash_at_forward(monkeypatch, n: int) -> None:
    """Make the n-th forward pass raise, as a kill mid-epoch would stop the run."""
    real, calls = engine.forward_loss, {"n": 0}

    def crashing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt("simulated kill")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "forward_loss", crashing)


# ------------------------------------------------------------- 1. resume keeps the run's config
def test_resume_without_epochs_continues_with_the_runs_own_config(data, tmp_path, monkeypatch, capsys):
    run = tmp_path / "kA"
    crash_at_forward(monkeypatch, 4)
    assert train_main([str(data), *TRAIN, "--epochs", "2", "--checkpoint-every", "2", "--out", str(run)]) == 130  # Ctrl-C
    monkeypatch.undo()
    assert load_checkpoint(run / "checkpoints" / "last.pt")["run"]["batches_done"] == 2

    assert train_main(["--resume", str(run)]) == 0
    assert [r["epoch"] for r in log_records(run)] == [1, 2]  # to its own 2 epochs, not the default 20
    config = saved_config(run)
    assert (config["epochs"], config["checkpoint_every"], config["changes"]) == (2, 2, [])
    assert "epoch 2/2" in capsys.readouterr().out


def test_resume_applies_changeable_options_records_them_and_refuses_the_others(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert train_main([str(data), *TRAIN, "--epochs", "1", "--out", str(run)]) == 0
    steps = load_checkpoint(run / "checkpoints" / "last.pt")["run"]["global_step"]

    assert train_main(["--resume", str(run), "--epochs", "2", "--log-every", "3"]) == 0
    config = saved_config(run)
    assert (config["epochs"], config["log_every"]) == (2, 3)
    expected = [{"option": "--epochs", "from": 1, "to": 2, "epoch": 1, "step": steps},
                {"option": "--log-every", "from": 1, "to": 3, "epoch": 1, "step": steps}]
    assert config["changes"] == expected
    records = log_records(run)
    assert [r["epoch"] for r in records] == [1, 2] and records[1]["config_changes"] == expected
    assert "--epochs: 1 -> 2 (recorded in config.json)" in capsys.readouterr().out

    # The same values again change nothing; another batch size, trunk or loss is refused naming the option.
    assert train_main(["--resume", str(run), "--epochs", "2", "--trunk", "resnet10t", str(data)]) == 0
    assert saved_config(run)["changes"] == expected
    capsys.readouterr()
    for flag, value, was, given in (("--batch-size", "4", 8, 4), ("--trunk", "resnet18", "resnet10t", "resnet18"),
                                    ("--loss", "ce", "logit_adjusted", "ce")):
        assert train_main(["--resume", str(run), flag, value]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert line.startswith(f"error: {flag}: the run in {run} was trained with {was!r}, this command gives {given!r}; ")
        assert "--resume keeps the run's own settings and may change only --epochs" in line
    assert saved_config(run) == config  # nothing written by a refused resume


def test_resume_under_other_package_versions_warns_naming_them(data, tmp_path, recwarn):
    run = tmp_path / "run"
    assert train_main([str(data), *TRAIN, "--epochs", "1", "--out", str(run)]) == 0
    assert train_main(["--resume", str(run), "--epochs", "2"]) == 0
    assert not [w for w in recwarn if "package versions" in str(w.message)]  # the same versions: silent

    config = saved_config(run)
    config["environment"]["timm"] = "0.0.1"
    (run / "config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match=r"other package versions .*\(timm 0\.0\.1 -> \d"):
        assert train_main(["--resume", str(run), "--epochs", "3"]) == 0
    assert saved_config(run)["environment"]["timm"] == "0.0.1"  # the record stays the run's start


def test_every_train_option_has_a_resume_policy():
    parser = build_parser()
    for action in parser._actions:
        if action.dest in ("help", "version", "resume", "resume_if_exists", "overwrite", "quiet", "config"):
            continue
        if action.dest in SHORTCUTS:  # --lr, --warmup-epochs, --min-lr, --data rewrite the fields they name
            assert all(config_field(dest) for dest in SHORTCUTS[action.dest])
            continue
        config_field(action.dest)  # every option sets a config field, compared on resume
    assert set(RESUME_CHANGEABLE) <= {action.dest for action in parser._actions}


def test_resume_if_exists_and_torchrun_restarts_continue_the_run(data, tmp_path, monkeypatch, capsys):
    run = tmp_path / "again"
    command_line = [str(data), *TRAIN, "--epochs", "2", "--out", str(run)]
    assert train_main([*command_line, "--resume-if-exists", "--stop-after-epoch", "1"]) == 0  # nothing to resume: starts
    assert [r["epoch"] for r in log_records(run)] == [1]

    assert train_main(command_line) == 2  # a plain re-run still refuses the folder
    assert "already holds a run" in one_error_line(capsys.readouterr().err)

    assert train_main([*command_line, "--resume-if-exists", "--size", "48"]) == 2  # the whole command must match
    assert one_error_line(capsys.readouterr().err).startswith(f"error: --size: the run in {run} was trained with 32")

    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # torchrun --max-restarts: the same command again
    assert train_main(command_line) == 0
    assert [r["epoch"] for r in log_records(run)] == [1, 2]
    assert "resuming" in capsys.readouterr().out


def test_resume_of_a_missing_run_names_the_folder(tmp_path, capsys):
    assert train_main(["--resume", "no/such/run"]) == 2
    assert one_error_line(capsys.readouterr().err) == "error: --resume no/such/run: no such run folder or checkpoint file"
    (tmp_path / "empty").mkdir()
    assert train_main(["--resume", str(tmp_path / "empty")]) == 2
    assert f"{tmp_path / 'empty'} is not a run folder (it has no config.json)" in one_error_line(capsys.readouterr().err)
    assert train_main([str(tmp_path), "--resume-if-exists", "--overwrite"]) == 2
    assert "--resume-if-exists continues the run in --out and --overwrite replaces it" in one_error_line(capsys.readouterr().err)


# ------------------------------------------------ 2. every test id gets a row in the submission
def test_skipped_test_image_keeps_its_row_with_the_documented_fallback(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert train_main([str(data), *TRAIN, "--epochs", "1", "--out", str(run)]) == 0
    damaged = tmp_path / "damaged"
    shutil.copytree(data, damaged)
    metadata = json.loads((damaged / "test" / "metadata.json").read_text())
    bad = metadata["images"][3]
    truncate(damaged / "test" / bad["file_name"])
    capsys.readouterr()

    assert eval_main([str(run), "--data", str(damaged), "--split", "test", "--skip-bad-images", "--workers", "0",
                      "--device", "cpu", "--views", "2", "--out", str(tmp_path / "eval")]) == 0
    out = capsys.readouterr().out
    submission = list(csv.DictReader((tmp_path / "eval" / "submission.csv").open()))
    assert [row["Id"] for row in submission] == [str(image["id"]) for image in metadata["images"]]  # every id, in order

    counts = RunDir(run).read_normalization()["train_counts"]["species"]
    taxonomy = json.loads((run / "taxonomy.json").read_text())
    most_frequent = taxonomy["category_ids"][int(np.argmax(counts))]
    assert submission[3]["Predicted"] == str(most_frequent)
    predictions = list(csv.DictReader((tmp_path / "eval" / "predictions.csv").open()))
    assert [row["fallback"] for row in predictions].count("") == len(predictions) - 1
    assert predictions[3]["fallback"] == "unreadable image: the most frequent training class"
    assert predictions[3]["top1_category_id"] == str(most_frequent)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["skipped_bad_images"] == 1 and metrics["fallback"]["images"] == 1
    assert f"skipped 1 unreadable images (--skip-bad-images); they are in submission.csv with the most frequent training class ({most_frequent})" in out


# ------------------------------------------------------------ 3. unreadable validation images are counted
def test_unreadable_images_in_the_holdout_and_in_training_are_counted_and_printed(own_data, tmp_path, capsys):
    cfg = tiny_config(own_data, tmp_path / "run")
    cfg.data = DataConfig(data=str(own_data), holdout=0.3, size=32, batch_size=8, workers=0, skip_bad_images=True)
    train, val = splits.read_train_val(cfg)
    truncate(val.path(val.samples[0]))
    truncate(train.path(train.samples[0]))

    record = engine.train(cfg)
    assert (record["skipped_bad_images_train"], record["skipped_bad_images_val"], record["skipped_bad_images"]) == (1, 1, 2)
    assert log_records(tmp_path / "run")[-1]["skipped_bad_images_val"] == 1
    out = capsys.readouterr().out
    assert "skipped unreadable images (--skip-bad-images): 1 of the training split and 1 of the validation split" in out


# ---------------------------------------------------------------- 4. and 5. the NaN policy
def nan_at(monkeypatch, bad_calls: set[int], snapshot_at: int | None = None, compare_at: int | None = None) -> dict:
    """NaN images at the given forward calls; optionally snapshot the model before one call and compare before another."""
    real, seen = engine.forward_loss, {"n": 0, "snapshot": None, "compared": False}

    def forward(model, loss_fn, batch, *args, **kwargs):
        seen["n"] += 1
        state = lambda: {k: v.detach().clone() for k, v in model.state_dict().items()}
        if seen["n"] == snapshot_at:
            seen["snapshot"] = state()
        if seen["n"] == compare_at:
            now = state()
            differ = [k for k in now if not torch.equal(now[k], seen["snapshot"][k])]
            assert not differ, f"the skipped step changed {differ[:5]}"
            seen["compared"] = True
        if seen["n"] in bad_calls:
            batch = {**batch, "image": torch.full_like(batch["image"], float("nan"))}
        return real(model, loss_fn, batch, *args, **kwargs)

    monkeypatch.setattr(engine, "forward_loss", forward)
    return seen


@pytest.mark.parametrize("accum", [1, 2])
def test_skipped_step_leaves_the_model_exactly_as_it_was_and_is_counted(data, tmp_path, monkeypatch, capsys, accum):
    # accum 2: the window of forward calls 3 and 4 holds the bad batch 4; the model must be as before call 3.
    bad, first = (3, 3) if accum == 1 else (4, 3)
    seen = nan_at(monkeypatch, {bad}, snapshot_at=first, compare_at=bad + 1)
    cfg = tiny_config(data, tmp_path / "run", nan_policy="skip", nan_skip_limit=0.5)
    cfg.optim = OptimConfig(optim="adam@2e-3:0", schedule="cosine", accum_steps=accum)
    record = engine.train(cfg)
    assert seen["compared"]
    assert record["skipped_nonfinite_steps"] == 1 and math.isfinite(record["loss"])
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    assert state["run"]["skipped_steps"] == 1
    assert "skipped 1 optimizer steps whose loss was NaN or infinite (--nan-policy skip)" in capsys.readouterr().out


def test_diverging_run_under_skip_policy_stops_with_an_error_and_finite_checkpoints(data, tmp_path, capsys):
    run = tmp_path / "diverged"
    code = train_main([str(data), *TRAIN, "--optim", "adam@1e30:0", "--nan-policy", "skip", "--epochs", "2",
                       "--checkpoint-every", "1", "--out", str(run)])
    assert code == 2
    line = one_error_line(capsys.readouterr().err)
    assert "optimizer steps in a row" in line and "had a NaN or infinite loss and were skipped" in line
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    bad = [k for k, t in state["model"].items() if t.is_floating_point() and not torch.isfinite(t).all()]
    assert not bad, f"non-finite tensors in the checkpoint: {bad[:5]}"
    assert state["run"]["skipped_steps"] >= 1


def test_nan_stop_names_the_step_tensorboard_shows(data, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    nan_at(monkeypatch, {3})
    with pytest.raises(engine.NonFiniteLossError, match=r"at optimizer step 3 \(epoch 1;"):
        engine.train(tiny_config(data, tmp_path / "run"))
    events = EventAccumulator(str(tmp_path / "run" / "tb"))
    events.Reload()
    losses = {event.step: event.value for event in events.Scalars("train/loss")}
    assert [step for step, value in sorted(losses.items()) if not math.isfinite(value)] == [3]


def test_nan_skip_numbers_skipped_steps_like_taken_ones(data, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    nan_at(monkeypatch, {3})
    engine.train(tiny_config(data, tmp_path / "run", nan_policy="skip", nan_skip_limit=0.5))
    events = EventAccumulator(str(tmp_path / "run" / "tb"))
    events.Reload()
    losses = {event.step: event.value for event in events.Scalars("train/loss")}
    steps = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["run"]["global_step"]
    assert sorted(losses) == list(range(1, steps + 1))  # one step number per batch, skipped or not
    assert [step for step, value in losses.items() if not math.isfinite(value)] == [3]


# ------------------------------------------------------------------------- 6. one-line errors
def _script(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_scripts_print_one_line_and_exit_2(tmp_path):
    done = _script("train.py", "--resume", "no/such/run")
    assert done.returncode == 2
    assert one_error_line(done.stderr) == "error: --resume no/such/run: no such run folder or checkpoint file"

    class_path = tmp_path / "evil.py"
    class_path.write_text("class Opaque:\n    pass\n")
    evil = tmp_path / "runs" / "x" / "checkpoints" / "evil.pt"
    evil.parent.mkdir(parents=True)
    subprocess.run([sys.executable, "-c", "import torch, evil; torch.save({'model': {}, 'x': evil.Opaque()}, "
                    f"{str(evil)!r})"], cwd=tmp_path, check=True)
    done = _script("tta_eval.py", str(evil), "--data", str(tmp_path))
    assert done.returncode == 2
    line = one_error_line(done.stderr)
    assert "refused to load: it holds pickled Python objects (it needs evil.Opaque)" in line
    assert "Never load a pickle you do not trust" in line and "weights_only=False" not in line


def test_holdout_zero_trains_without_validation(data, tmp_path, capsys):
    options = [o for o in TRAIN if o not in ("--val-split", "test")]
    assert train_main([str(data), *options, "--holdout", "0", "--epochs", "1", "--out", str(tmp_path / "novalid")]) == 0
    record = log_records(tmp_path / "novalid")[0]
    assert record["val"] == {} and record["best_macro_f1"] is None
    assert (tmp_path / "novalid" / "checkpoints" / "last.pt").is_file()
    assert not (tmp_path / "novalid" / "checkpoints" / "best.pt").exists()
    assert "val: none (no validation split)" in capsys.readouterr().out
    assert train_main([str(data), *options, "--holdout", "1.5", "--out", str(tmp_path / "bad")]) == 2
    assert "--holdout 0 trains without validation" in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("encoding, named", [("utf-8-sig", "UTF-8 with a byte-order mark (BOM)"), ("utf-16", "UTF-16")])
def test_metadata_encoding_problems_are_named(own_data, capsys, encoding, named):
    metadata = own_data / "train" / "metadata.json"
    metadata.write_bytes(metadata.read_text(encoding="utf-8").encode(encoding))
    assert stats_main([str(own_data), "--size", "32", "--workers", "0", "--quiet"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line == (f"error: {metadata}: encoding problem: the file is {named}; it must be UTF-8 without a byte-order mark "
                    "(re-save it as UTF-8, e.g. with iconv -t UTF-8, or as 'UTF-8' rather than 'UTF-8 with BOM')")


def test_utf16_csv_is_named_and_a_spreadsheet_bom_is_read(tmp_path):
    from herbarium.data.readers import DatasetError, read_labels_csv

    labels = tmp_path / "labels.csv"
    labels.write_bytes("image_id,category_id\n1,2\n".encode("utf-8-sig"))
    assert read_labels_csv(labels) == {"1": 2}
    labels.write_bytes("image_id,category_id\n1,2\n".encode("utf-16"))
    with pytest.raises(DatasetError, match="labels.csv: encoding problem: the file is UTF-16"):
        read_labels_csv(labels)


def test_expected_errors_are_one_line_and_bugs_keep_their_traceback(capsys):
    @command
    def ours(argv):
        raise UsageError("--size: must be positive")

    @command
    def bug(argv):
        np.zeros(2).reshape(3)  # a ValueError from inside numpy: a bug, not the user's to fix

    assert ours([]) == 2
    assert capsys.readouterr().err == "error: --size: must be positive\n"
    with pytest.raises(ValueError, match="cannot reshape"):
        bug([])
    assert is_expected(FileNotFoundError(2, "No such file or directory", "x.csv"))
    assert not is_expected(RuntimeError("CUDA error"))
