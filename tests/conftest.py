"""Shared fixtures: tiny datasets in each real layout, written fresh for every test."""

from __future__ import annotations

from pathlib import Path

import pytest

from fixtures import Written, write_herbarium2020, write_herbarium2021, write_herbarium2022


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
