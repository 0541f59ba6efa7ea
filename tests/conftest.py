"""Shared fixtures: tiny datasets in each real layout, written fresh for every test."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from fixtures import Written, write_herbarium2020, write_herbarium2021, write_herbarium2022


@pytest.fixture(autouse=True, scope="session")
def index_cache(tmp_path_factory) -> Iterator[Path]:
    """The cached split indexes of the test runs go to a folder of their own, not the user's ~/.cache."""
    folder = tmp_path_factory.mktemp("index_cache")
    patch = pytest.MonkeyPatch()
    patch.setenv("HERBARIUM_CACHE", str(folder))
    yield folder
    patch.undo()


@pytest.fixture
def herbarium2020(tmp_path: Path) -> dict[str, Written]:
    """``{"train": ..., "test": ...}`` of a Herbarium 2020 layout under ``tmp_path / "nybg2020"``."""
    return write_herbarium2020(tmp_path / "nybg2020")


@pytest.fixture
def herbarium2021(tmp_path: Path) -> Written:
    return write_herbarium2021(tmp_path / "herbarium2021")


@pytest.fixture
def herbarium2022(tmp_path: Path) -> dict[str, Written]:
    return write_herbarium2022(tmp_path / "herbarium2022")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> tuple[Path, Path]:
    """``(data, run_dir)``: a one-epoch resnet10t run on small demo data, heads on species and genus only
    (family comes from the tree). Shared by the tests that use a trained run without changing it."""
    from herbarium import engine
    from herbarium.config import DataConfig, LossConfig, OptimConfig, TrainConfig
    from herbarium.demo import make_demo_data
    from herbarium.models.config import ModelConfig

    root = tmp_path_factory.mktemp("tiny_run")
    data = root / "demo"
    make_demo_data(data, seed=3, image_size=32, max_per_class=6, min_per_class=2, test_per_class=1)
    cfg = TrainConfig(
        out=str(root / "run"), epochs=1, seed=0, device="cpu",
        data=DataConfig(data=str(data), size=32, batch_size=16, workers=0, holdout=0.1),
        model=ModelConfig(pretrained=False, trunk="resnet10t", dropout=0.0),
        loss=LossConfig(levels=("species", "genus")),
        optim=OptimConfig(optim="adam@2e-3:0", schedule="constant"),
    )
    engine.train(cfg, quiet=True)
    return data, Path(cfg.out)
