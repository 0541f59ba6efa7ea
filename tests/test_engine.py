"""Training loop: short runs on the demo data, exact resume, DDP on CPU with gloo."""

from __future__ import annotations

import dataclasses
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from fixtures import tiny_train_config

from herbarium import build
from herbarium.data import splits
from herbarium.data.readers import read_split
from herbarium import engine
from herbarium.checkpoint import load_checkpoint
from herbarium.config import DataConfig, OptimConfig, TrainConfig
from herbarium.demo import make_demo_data
from herbarium.models.config import ModelConfig


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    make_demo_data(out, seed=0, image_size=32, max_per_class=40, min_per_class=2, test_per_class=6)
    return out


def tiny_config(data_dir: Path, out: Path, **changes) -> TrainConfig:
    return tiny_train_config(data_dir, out, **changes)


def weights_of(run_dir: Path, name: str = "last") -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "checkpoints" / f"{name}.pt")["model"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def test_short_run_learns_every_rank_and_writes_the_run_directory(demo, tmp_path):
    cfg = tiny_config(demo, tmp_path / "run", epochs=8)
    record = engine.train(cfg)
    chance = {"species": 1 / 18, "genus": 1 / 6, "family": 1 / 3}
    for rank, floor in chance.items():
        assert record["val"][rank]["top1"] > floor + 0.25, (rank, record["val"][rank])
    run = Path(cfg.out)
    for name in ("config.json", "taxonomy.json", "normalization.json", "log.jsonl", "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (run / name).is_file(), name
    assert len((run / "log.jsonl").read_text().splitlines()) == 8
    assert TrainConfig.load(run / "config.json") == cfg
    assert list((run / "tb").iterdir()), "no TensorBoard events"


def test_resume_at_epoch_end_equals_an_uninterrupted_run(demo, tmp_path):
    engine.train(tiny_config(demo, tmp_path / "straight"))
    engine.train(tiny_config(demo, tmp_path / "paused", stop_after_epoch=1))
    paused = load_checkpoint(tmp_path / "paused" / "checkpoints" / "last.pt")
    assert paused["run"]["epoch"] == 1
    engine.train(tiny_config(demo, tmp_path / "paused"), resume=tmp_path / "paused")
    assert_same_weights(weights_of(tmp_path / "straight"), weights_of(tmp_path / "paused"))


def test_accumulation_windows_cover_every_batch_and_the_short_last_window_still_updates():
    windows = engine.AccumulationWindows(batches=14, accum_steps=3)
    closing = [position for position in range(14) if windows.closes(position)]
    assert closing == [2, 5, 8, 11, 13] and windows.steps == 5
    assert [windows.size(position) for position in (0, 11, 12, 13)] == [3, 3, 2, 2]


def test_resume_with_accum_steps_equals_an_uninterrupted_run(demo, tmp_path):
    # 239 training images in batches of 16 (drop_last): 14 batches, so each epoch ends on a window of 2, not 3.
    accumulated = dict(optim=OptimConfig(optim="adam@2e-3:0", schedule="cosine", accum_steps=3))
    engine.train(tiny_config(demo, tmp_path / "straight", **accumulated))
    engine.train(tiny_config(demo, tmp_path / "paused", stop_after_epoch=1, **accumulated))
    engine.train(tiny_config(demo, tmp_path / "paused", **accumulated), resume=tmp_path / "paused")
    assert_same_weights(weights_of(tmp_path / "straight"), weights_of(tmp_path / "paused"))
    assert load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")["run"]["global_step"] == 2 * 5


def test_resume_mid_epoch_equals_an_uninterrupted_run(demo, tmp_path, monkeypatch):
    engine.train(tiny_config(demo, tmp_path / "straight"))
    real_forward_loss, calls = engine.forward_loss, {"n": 0}

    def crash_after_five(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt("simulated crash")
        return real_forward_loss(*args, **kwargs)

    monkeypatch.setattr(engine, "forward_loss", crash_after_five)
    with pytest.raises(KeyboardInterrupt):
        engine.train(tiny_config(demo, tmp_path / "crashed", checkpoint_every=4))
    monkeypatch.setattr(engine, "forward_loss", real_forward_loss)
    assert load_checkpoint(tmp_path / "crashed" / "checkpoints" / "last.pt")["run"]["batches_done"] == 4
    engine.train(tiny_config(demo, tmp_path / "crashed", checkpoint_every=4), resume=tmp_path / "crashed")
    assert_same_weights(weights_of(tmp_path / "straight"), weights_of(tmp_path / "crashed"))


def test_phase_switch_happens_at_the_configured_epoch(demo, tmp_path):
    cfg = tiny_config(demo, tmp_path / "switch", epochs=3, optim=OptimConfig(optim="adam@1e-3:0,sgd@0.01:2", schedule="constant"))
    engine.train(cfg)
    lines = [line for line in (tmp_path / "switch" / "log.jsonl").read_text().splitlines()]
    import json

    records = [json.loads(line) for line in lines]
    assert [r["optimizer"] for r in records] == ["adam", "adam", "sgd"]
    assert [r["lr"] for r in records] == pytest.approx([1e-3, 1e-3, 1e-2])


def test_nonfinite_loss_stops_naming_the_step(demo, tmp_path, monkeypatch):
    real_forward_loss, calls = engine.forward_loss, {"n": 0}

    def nan_at_third(*args, **kwargs):
        calls["n"] += 1
        result = real_forward_loss(*args, **kwargs)
        if calls["n"] == 3:
            result.total = result.total * float("nan")
            result.finite = torch.isfinite(result.total.detach())
        return result

    monkeypatch.setattr(engine, "forward_loss", nan_at_third)
    with pytest.raises(engine.NonFiniteLossError, match=r"optimizer step 3 \(epoch 1; the step numbers of TensorBoard"):
        engine.train(tiny_config(demo, tmp_path / "nan", epochs=1))
    calls["n"] = 0
    record = engine.train(tiny_config(demo, tmp_path / "skip", epochs=1, nan_policy="skip"))
    assert record["skipped_nonfinite_steps"] == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, cfg_dict: dict, out: str) -> None:
    os.environ.update(WORLD_SIZE=str(world_size), RANK=str(rank), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    trainer = engine.Trainer(TrainConfig.from_dict(cfg_dict))
    trainer.fit()
    torch.save({k: v.clone() for k, v in trainer.model.state_dict().items()}, Path(out) / f"rank{rank}.pt")


def test_ddp_two_processes_on_gloo_hold_the_same_weights(demo, tmp_path):
    cfg = tiny_config(demo, tmp_path / "ddp", epochs=1, data=DataConfig(data=str(demo), val_split="test", size=32, batch_size=8, workers=0))
    mp.spawn(_ddp_worker, args=(2, _free_port(), cfg.to_dict(), str(tmp_path)), nprocs=2, join=True)
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert_same_weights(rank0, rank1)
    saved = weights_of(tmp_path / "ddp")
    assert_same_weights(rank0, saved)


# ------------------------------------------------------- defaults and rules
def test_normalisation_rule_weights_own_then_dataset_stats_then_imagenet(demo, tmp_path):
    stats = tmp_path / "stats.json"
    stats.write_text('{"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]}')
    pretrained = dataclasses.replace(tiny_config(demo, tmp_path / "run"),
                                     model=ModelConfig(trunk="efficientnet_lite0", pretrained=True))
    weights = build.resolve_normalization(pretrained)
    assert (weights.mean, weights.std) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # the packaged weights' own
    assert "efficientnet_lite0" in weights.source
    explicit = dataclasses.replace(pretrained, data=dataclasses.replace(pretrained.data, stats=str(stats)))
    assert build.resolve_normalization(explicit).mean == (0.1, 0.2, 0.3)  # --stats always wins
    scratch = tiny_config(demo, tmp_path / "run")
    (demo / "train" / "stats.json").write_text(stats.read_text())
    try:
        assert build.resolve_normalization(scratch).std == (0.4, 0.5, 0.6)  # collect-stats' file of the split
    finally:
        (demo / "train" / "stats.json").unlink()
    assert build.resolve_normalization(scratch).source == "imagenet"


def test_without_a_validation_split_every_image_trains_and_last_is_the_checkpoint(demo, tmp_path):
    cfg = tiny_config(demo, tmp_path / "run", epochs=1)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, val_split=None))
    assert cfg.data.holdout == 0.0  # the default
    trainer = engine.Trainer(cfg)
    assert trainer.val_split is None and len(trainer.train_split) == len(read_split(demo, "train"))
    record = trainer.fit()
    assert record["val"] == {} and record["best_macro_f1"] is None
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()
    assert not (tmp_path / "run" / "checkpoints" / "best.pt").exists()
    held = dataclasses.replace(cfg, out=str(tmp_path / "held"), data=dataclasses.replace(cfg.data, holdout=0.1))
    train, val = splits.read_train_val(held)
    assert len(train) + len(val) == len(trainer.train_split) and len(val) > 0
    plateau = dataclasses.replace(cfg, out=str(tmp_path / "p"), optim=dataclasses.replace(cfg.optim, plateau_patience=2))
    with pytest.raises(ValueError, match="needs a validation split"):
        engine.Trainer(plateau)


def test_validating_does_not_change_what_is_trained(demo, tmp_path):
    # Validation draws from no generator the training uses, so a run without a validation split trains the same
    # weights: its accuracy is that of the validated run's last epoch (how bench/accuracy.py reads the no-val target).
    engine.train(tiny_config(demo, tmp_path / "validated"))
    engine.train(tiny_config(demo, tmp_path / "unvalidated", data=DataConfig(data=str(demo), size=32, batch_size=16, workers=0)))
    assert_same_weights(weights_of(tmp_path / "validated"), weights_of(tmp_path / "unvalidated"))


def test_recipe_moves_defaults_and_explicit_flags_still_win():
    from herbarium import train_cli

    def parsed(*argv: str) -> TrainConfig:
        return train_cli.config_from_args(train_cli.parse_train_args(train_cli.build_parser(), ["DATA", *argv]))

    default = parsed()
    assert (default.recipe, default.optim.optim, default.optim.schedule, default.loss.loss) == \
        ("default", "adamw:0", "cosine:warmup=1", "logit_adjusted")
    card = parsed("--recipe", "herbarium2020")
    assert (card.recipe, card.optim.optim, card.optim.schedule, card.loss.loss, card.loss.class_weights) == \
        ("herbarium2020", "adam:0", "step:5", "focal", "effective")
    assert (card.loss.level_weights, card.model.dropout, card.data.holdout) == ({"species": 1.5}, 0.5, 0.1)
    assert parsed("--recipe", "herbarium2020", "--loss", "ce").loss.loss == "ce"
    with pytest.raises(SystemExit):
        parsed("--recipe", "nonsense")
