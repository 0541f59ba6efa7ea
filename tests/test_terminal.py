"""What the commands print and accept: version, program names, start-up and end-of-run summaries, option aliases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import herbarium
from herbarium.run_dir import RunDir
from herbarium import cli, run_summary
from herbarium.config import TrainConfig
from herbarium.engine import Trainer
from herbarium.models import ModelConfig
from herbarium.train_cli import build_parser, config_from_args


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"herbarium {herbarium.__version__}"
    assert "herbarium --version" in cli.usage()


@pytest.mark.parametrize("command", ["train", "evaluate", "predict", "export"])
def test_help_names_the_herbarium_command(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: herbarium {command} ")


def test_scripts_keep_their_own_names():
    assert build_parser().prog == "train.py"


def parse(*argv: str) -> TrainConfig:
    return config_from_args(build_parser().parse_args(list(argv)))


def test_old_and_new_spellings_give_the_same_config():
    assert parse("D", "--level-weights", "species=2") == parse("D", "--rank-weights", "species=2")
    assert parse("--data", "D").data.data == parse("D").data.data == "D"
    assert parse("D", "--trunk-weights", "w.pth").model.weights == parse("D", "--weights", "w.pth").model.weights == "w.pth"
    with pytest.raises(SystemExit, match="DATA given twice"):
        parse("D", "--data", "E")


def test_timm_style_aliases_map_onto_phases_and_schedule():
    cfg = parse("D", "--lr", "1e-3", "--schedule", "cosine", "--warmup-epochs", "2", "--min-lr", "1e-5", "--drop-path", "0.1")
    assert cfg.optim.optim == "adamw@0.001:0"
    assert cfg.optim.schedule == "cosine:warmup=2:min=0.01"
    assert cfg.model.drop_path == 0.1
    # --lr fills the phases without their own @LR
    assert parse("D", "--optim", "adam:0,sgd@0.1:5", "--lr", "1e-3").optim.optim == "adam@0.001:0,sgd@0.1:5"
    with pytest.raises(SystemExit, match="--warmup-epochs applies to --schedule cosine or sgdr"):
        parse("D", "--schedule", "step:5", "--warmup-epochs", "1")
    with pytest.raises(SystemExit, match="--min-lr needs one LR for every phase"):
        parse("D", "--optim", "adam:0,sgd:5", "--schedule", "sgdr:5", "--min-lr", "1e-5")


def test_start_up_summary(tiny_run, capsys):
    data, run_dir = tiny_run
    cfg = TrainConfig.load(run_dir / "config.json")
    cfg.out = str(run_dir.parent / "summary_run")
    Trainer(cfg).announce()
    out = capsys.readouterr().out
    assert out.startswith(f"herbarium train -> {cfg.out}\n")
    assert f"data       {data} (herbarium2020); train 'train':" in out
    assert "a 10% hold-out of 'train', stratified by species" in out
    assert "classes    family 3, genus 6, species 18; heads (loss weight): species×1, genus×1" in out
    assert "trunk      resnet10t: 4.9M parameters" in out and "random initialisation" in out
    assert "normalisation from ImageNet values" in out
    assert "recipe     1 epochs, batch 16; loss logit_adjusted" in out and "optim adam@2e-3:0, schedule constant" in out
    assert "device     cpu (fp32); input path cpu (0 workers)" in out


def test_end_of_run_summary(tiny_run):
    data, run_dir = tiny_run
    cfg = TrainConfig.load(run_dir / "config.json")
    record = json.loads((run_dir / "log.jsonl").read_text().splitlines()[-1])
    lines = run_summary.end_lines(cfg, RunDir(run_dir), "species", 75.0, finished=True)
    assert lines[0] == "done: epoch 1/1 in 1m15s"
    assert lines[1].startswith(f"  best epoch 1: species macro-F1 {record['val']['species']['macro_f1']:.3f}")
    assert f"{run_dir / 'checkpoints' / 'best.pt'} (epoch 1)" in lines[2]
    assert lines[3].startswith(f"  next       python tta_eval.py {run_dir} --data {data} --split test")
    paused = run_summary.end_lines(cfg, RunDir(run_dir), "species", 5.0, finished=False)
    assert paused[0].startswith("paused") and f"--resume {run_dir}" in paused[-1]


def test_best_record_is_the_first_best():
    records = [{"epoch": e, "val": {"species": {"macro_f1": f, "top1": f}}} for e, f in ((1, 0.2), (2, 0.5), (3, 0.5), (4, 0.4))]
    assert run_summary.best_record(records, "species")["epoch"] == 2


def test_scratch_warning_for_a_large_trunk_on_few_images():
    cfg = TrainConfig(model=ModelConfig(pretrained=False, trunk="legacy_seresnext50_32x4d"))
    warning = run_summary.scratch_warning(cfg, 25_500_000, 2_000)
    assert "legacy_seresnext50_32x4d (25.5M parameters) from random initialisation on 2,000 images" in warning
    assert "drop --no-pretrained" in warning and "--weights FILE" in warning
    assert run_summary.scratch_warning(cfg, 25_500_000, 500_000) is None
    assert run_summary.scratch_warning(cfg, 4_900_000, 2_000) is None
    pretrained = TrainConfig(model=ModelConfig(trunk="legacy_seresnext50_32x4d", pretrained=True))
    assert run_summary.scratch_warning(pretrained, 25_500_000, 2_000) is None


def test_tensorboard_curves_share_the_step_axis(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run_dir = tiny_run
    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"images": 0, "tensors": 0, "scalars": 0})
    events.Reload()
    record = json.loads((run_dir / "log.jsonl").read_text().splitlines()[-1])
    steps = {event.step for event in events.Scalars("epoch/train_loss")}
    assert len(steps) == 1 and steps.pop() > 1  # the epoch ends at its last optimizer step, not at "1"
    end = events.Scalars("epoch/train_loss")[0].step
    for tag in ("val/species_macro_f1", "val/genus_top1", "val/species_loss", "val/genus_loss", "epoch/train_loss_species"):
        assert [event.step for event in events.Scalars(tag)] == [end], tag
    assert events.Scalars("epoch/train_loss")[0].value == pytest.approx(record["loss"], rel=1e-5)
    assert events.Scalars("val/species_loss")[0].value == pytest.approx(record["val"]["species"]["loss"], rel=1e-5)
    assert record["val"]["species"]["loss"] > 0
    assert "config/text_summary" in events.Tags()["tensors"]
    assert [event.value for event in events.Scalars("hparam/best_epoch")] == [1.0]  # the HPARAMS tab's metric
    image = events.Images("train/augmented_images")
    assert len(image) == 1 and image[0].width > 32


# ------------------------------------------------------------------ report
def test_report_names_the_run_files_truth_and_confident_mistakes(tiny_run, tmp_path):
    import csv

    from herbarium.data.readers import read_split
    from herbarium.evaluation.runner import evaluate
    from herbarium.evaluation.settings import EvaluationSettings

    data, run_dir = tiny_run
    settings = EvaluationSettings(views=("plain", "flip"), workers=0, device="cpu", batch_size=8)
    result = evaluate([run_dir], data, "test", out=tmp_path, settings=settings)
    split = read_split(data, "test")
    truth = {str(s.image_id): (str(split.path(s)), s.category_id) for s in split.samples}
    rows = list(csv.DictReader((tmp_path / "predictions.csv").open()))
    assert len(rows) == len(truth)
    for row in rows:
        assert (row["path"], row["true_category_id"]) == (truth[row["image_id"]][0], str(truth[row["image_id"]][1]))
        assert row["true_species"].startswith(row["true_genus"])  # demo species are named after their genus
    metrics = result["metrics"]
    context = json.loads((tmp_path / "metrics.json").read_text())["context"]
    assert context["models"] == ["resnet10t (from scratch), 32 px, heads species, genus; checkpoint last.pt at epoch 1 of 1; "
                                 "loss logit_adjusted, class weights none, optim adam@2e-3:0, schedule constant, augment crop_flip, "
                                 "sampler none"]
    wrong = [r for r in rows if r["species"] != r["true_species"]]
    mistakes = metrics["mistakes"]
    assert len(mistakes) == min(12, len(wrong))
    assert [m["probability"] for m in mistakes] == sorted((m["probability"] for m in mistakes), reverse=True)
    assert all(m["true"] != m["predicted"] and Path(m["path"]).is_file() for m in mistakes)
    report = (tmp_path / "report.md").read_text()
    if mistakes:
        assert "## Most confident mistakes" in report and (tmp_path / "plots" / "mistakes.png").is_file()
        assert "data:image/png;base64" in (tmp_path / "report.html").read_text()
