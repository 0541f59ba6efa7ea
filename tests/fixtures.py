"""Writers of tiny datasets in each real layout (see KAGGLE_FORMATS.md), with real JPEGs.

Every builder returns what it wrote (ids, files, category records), so tests
compare the readers' output with the fixture's own tables instead of with
numbers copied by hand.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from herbarium.config import DataConfig, LossConfig, OptimConfig, TrainConfig
from herbarium.data import gpu
from herbarium.demo import make_demo_data
from herbarium.evaluation.runner import LoadedModel
from herbarium.evaluation.tta import InputProfile
from herbarium.models.config import ModelConfig
from herbarium.models.multi_rank import MultiRankModel
from herbarium.taxonomy import Taxonomy

# Herbarium 2020 categories: ids with a gap, a name with a latin-1 character.
CATEGORIES_2020 = [
    {"id": 0, "name": "Poa glauca Vahl", "genus": "Poa", "family": "Poaceae"},
    {"id": 1, "name": "Poa annua L.", "genus": "Poa", "family": "Poaceae"},
    {"id": 2, "name": "Carex aquatilis Wahlenb.", "genus": "Carex", "family": "Cyperaceae"},
    {"id": 3, "name": "Ranunculus acris Müll.", "genus": "Ranunculus", "family": "Ranunculaceae"},
    {"id": 5, "name": "Achillea millefolium L.", "genus": "Achillea", "family": "Asteraceae"},
]
# Images per category id: a long tail, with singletons.
COUNTS_2020 = {0: 3, 1: 2, 2: 2, 3: 1, 5: 1}

# Herbarium 2021 categories: an order, no genus (it is the name's first word).
CATEGORIES_2021 = [
    {"id": 10, "name": "Poa glauca Vahl", "family": "Poaceae", "order": "Poales"},
    {"id": 11, "name": "Carex aquatilis Wahlenb.", "family": "Cyperaceae", "order": "Poales"},
    {"id": 12, "name": "Ranunculus acris L.", "family": "Ranunculaceae", "order": "Ranunculales"},
    {"id": 13, "name": "Ranunculus repens L.", "family": "Ranunculaceae", "order": "Ranunculales"},
]
COUNTS_2021 = {10: 2, 11: 1, 12: 2, 13: 1}

# Herbarium 2022 categories: the epithet "vulgaris" repeats across genera, ids have gaps.
CATEGORIES_2022 = [
    {"category_id": 0, "scientificName": "Abies alba Mill.", "authors": "Mill.", "family": "Pinaceae", "genus": "Abies", "species": "alba"},
    {"category_id": 3, "scientificName": "Abies vulgaris L.", "authors": "L.", "family": "Pinaceae", "genus": "Abies", "species": "vulgaris"},
    {"category_id": 4, "scientificName": "Thymus vulgaris L.", "authors": "L.", "family": "Lamiaceae", "genus": "Thymus", "species": "vulgaris"},
]
GENERA_2022 = [{"genus_id": 1, "genus": "Abies"}, {"genus_id": 2, "genus": "Thymus"}]
COUNTS_2022 = {0: 2, 3: 1, 4: 2}


@dataclass
class Written:
    """What a builder wrote: the dataset folder, its images and categories."""

    root: Path
    image_ids: list[Any] = field(default_factory=list)
    files: dict[Any, Path] = field(default_factory=dict)  # image id -> absolute path
    labels: dict[Any, Any] = field(default_factory=dict)  # image id -> category id
    categories: list[dict[str, Any]] = field(default_factory=list)


def load_bench_script(name: str) -> ModuleType:
    """``bench/<name>.py`` as a module (the bench folder is scripts, not a package)."""
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def write_jpeg(path: Path, width: int, height: int, seed: int, quality: int = 90) -> Path:
    """A small JPEG with a smooth gradient plus noise, different for every seed."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    base = np.stack([xs * 255 / max(width - 1, 1), ys * 255 / max(height - 1, 1), np.full_like(xs, 40 * (seed % 6))], -1)
    pixels = np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, "RGB").save(path, format="JPEG", quality=quality)
    return path


def _size(seed: int) -> tuple[int, int]:
    """Varied, non-square sizes so resizing and cropping matter."""
    return 24 + 5 * (seed % 4), 20 + 7 * (seed % 3)


def _dump(path: Path, data: Any, encoding: str = "utf-8") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(json.dumps(data, ensure_ascii=False).encode(encoding))


def _coco_split(root: Path, counts: dict[Any, int] | None, first_id: int, n_unlabelled: int = 0) -> tuple[list, list, Written]:
    """Images under ``root/images/<a>/<b>/<id>.jpg``; annotations when ``counts`` is given."""
    written = Written(root)
    images, annotations = [], []
    plan = [cid for cid, n in (counts or {}).items() for _ in range(n)] or [None] * n_unlabelled
    for offset, category_id in enumerate(plan):
        image_id = first_id + offset
        file_name = f"images/{image_id % 7:03d}/{image_id % 3:02d}/{image_id}.jpg"
        width, height = _size(image_id)
        write_jpeg(root / file_name, width, height, seed=image_id)
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height, "license": 0})
        written.image_ids.append(image_id)
        written.files[image_id] = root / file_name
        if category_id is not None:
            annotations.append({"id": image_id, "image_id": image_id, "category_id": category_id, "region_id": 0})
            written.labels[image_id] = category_id
    return images, annotations, written


def write_herbarium2020(data: Path, n_test: int = 3) -> dict[str, Written]:
    """``data/train/metadata.json`` (latin-1 bytes) and ``data/test/metadata.json`` (no annotations)."""
    images, annotations, train = _coco_split(data / "train", COUNTS_2020, first_id=100)
    train.categories = CATEGORIES_2020
    _dump(data / "train" / "metadata.json", {
        "images": images, "annotations": annotations, "categories": CATEGORIES_2020,
        "regions": [{"id": 0, "name": "New York"}], "licenses": [{"id": 0, "name": "CC"}], "info": {"year": 2020},
    }, encoding="latin-1")
    test_images, _, test = _coco_split(data / "test", None, first_id=900, n_unlabelled=n_test)
    _dump(data / "test" / "metadata.json", {"images": test_images, "info": {"year": 2020}, "licenses": []})
    return {"train": train, "test": test}


def write_herbarium2021(data: Path) -> Written:
    """``data/train/metadata.json`` with 2021 categories (order, no genus)."""
    images, annotations, train = _coco_split(data / "train", COUNTS_2021, first_id=400)
    for annotation in annotations:
        annotation.pop("region_id")
        annotation["institution_id"] = 0
    train.categories = CATEGORIES_2021
    _dump(data / "train" / "metadata.json", {
        "images": images, "annotations": annotations, "categories": CATEGORIES_2021,
        "institutions": [{"id": 0, "name": "NYBG"}], "licenses": [], "info": {"year": 2021},
    })
    return train


def write_herbarium2022(data: Path, n_test: int = 2) -> dict[str, Written]:
    """``train_metadata.json`` (string ids, ``license`` singular) and a bare-list ``test_metadata.json``."""
    train, images, annotations = Written(data), [], []
    genus_id = {g["genus"]: g["genus_id"] for g in GENERA_2022}
    by_id = {c["category_id"]: c for c in CATEGORIES_2022}
    seed = 0
    for category_id, n in COUNTS_2022.items():
        for k in range(1, n + 1):
            image_id = f"{category_id:05d}__{k:03d}"
            file_name = f"{category_id // 100:03d}/{category_id % 100:02d}/{image_id}.jpg"
            write_jpeg(data / "train_images" / file_name, *_size(seed), seed=seed)
            seed += 1
            images.append({"image_id": image_id, "file_name": file_name, "license": 0})
            annotations.append({"image_id": image_id, "category_id": category_id,
                                "genus_id": genus_id[by_id[category_id]["genus"]], "institution_id": 0})
            train.image_ids.append(image_id)
            train.files[image_id] = data / "train_images" / file_name
            train.labels[image_id] = category_id
    train.categories = CATEGORIES_2022
    _dump(data / "train_metadata.json", {
        "annotations": annotations, "images": images, "categories": CATEGORIES_2022, "genera": GENERA_2022,
        "institutions": [{"institution_id": 0, "collectionCode": "NY"}],
        "distances": [{"genus_id_x": 1, "genus_id_y": 2, "distance": 0.5}], "license": [{"id": 0, "name": "CC"}],
    })
    test, test_images = Written(data), []
    for k in range(n_test):
        image_id, file_name = f"test-{k:06d}", f"000/test-{k:06d}.jpg"
        write_jpeg(data / "test_images" / file_name, *_size(50 + k), seed=50 + k)
        test_images.append({"image_id": image_id, "file_name": file_name, "license": 0})
        test.image_ids.append(image_id)
        test.files[image_id] = data / "test_images" / file_name
    _dump(data / "test_metadata.json", test_images)
    return {"train": train, "test": test}


def write_csv_manifest(data: Path, split: str, rows: Sequence[dict[str, Any]], header: Sequence[str],
                       path_column: str = "path") -> Path:
    """``data/<split>.csv`` with the given rows; a JPEG for every row's path under ``data``."""
    data.mkdir(parents=True, exist_ok=True)
    for seed, row in enumerate(rows):
        target = data / row[path_column]
        if not target.exists():
            write_jpeg(target, *_size(seed), seed=seed)
    out = data / f"{split}.csv"
    with open(out, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(header))
        writer.writeheader()
        writer.writerows(rows)
    return out


def write_labels_csv(path: Path, labels: dict[Any, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["image_id,category_id"] + [f"{image_id},{category_id}" for image_id, category_id in labels.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def truncate(path: Path, keep: float = 0.5) -> Path:
    """Cut a file short, as an interrupted download leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def tiny_train_config(data_dir: Path, out: Path, *, epochs: int = 2, batch_size: int = 16, log_every: int = 2,
                      **changes: Any) -> TrainConfig:
    """A resnet10t run on 32 px demo data validated on its test split, with ``changes`` to the top-level fields."""
    cfg = TrainConfig(
        out=str(out), epochs=epochs, seed=3, device="cpu", log_every=log_every,
        data=DataConfig(data=str(data_dir), val_split="test", size=32, batch_size=batch_size, workers=0),
        model=ModelConfig(pretrained=False, trunk="resnet10t", dropout=0.2),
        loss=LossConfig(levels=("species", "genus", "family")),
        optim=OptimConfig(optim="adam@2e-3:0", schedule="cosine"),
    )
    return dataclasses.replace(cfg, **changes)


def synthetic_model(taxonomy: Taxonomy, seed: int, train_counts: dict[str, list[int]] | None = None) -> LoadedModel:
    """A real multi-rank model over a linear trunk on 4 x 4 images: fast, and different per seed."""
    torch.manual_seed(seed)
    trunk = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 8))
    classes = {rank: taxonomy.num_classes(rank) for rank in taxonomy.ranks}
    model = MultiRankModel(trunk, 8, classes, ModelConfig(trunk="resnet10t")).eval()
    return LoadedModel(model, None, taxonomy, InputProfile(4, (0.5,) * 3, (0.25,) * 3, "none"), train_counts or {},
                       Path(f"m{seed}"))


def tiny_demo_data(out: Path, max_per_class: int = 10, test_per_class: int = 2) -> Path:
    """The demo dataset at its smallest: 8 species in 2 families, 32 px, 3 to ``max_per_class`` images each."""
    make_demo_data(out, seed=0, image_size=32, max_per_class=max_per_class, min_per_class=3,
                   test_per_class=test_per_class, num_families=2, genera_per_family=2, species_per_genus=2)
    return out


def torchrun_demo_data(out: Path) -> Path:
    """The demo data of the torchrun tests: 8 species, 47 training images of 32 px, one test image per species."""
    return tiny_demo_data(out, test_per_class=1)


def machine_with(monkeypatch, cores: int, local_processes: str | None) -> None:
    """Pretend the process may use ``cores`` cores and torchrun started ``local_processes`` on the machine (None: no torchrun)."""
    monkeypatch.setattr(gpu, "default_workers", lambda: cores)
    if local_processes:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_processes)
    else:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
