"""herbarium at Herbarium scale: each step that grows with the images or the classes, timed with its peak memory.

Writes synthetic metadata of the real sizes and layouts (no image files, but
for a few sheets where a step opens images) and runs every step in its own
process, so each peak resident memory is that of one process doing that step
alone, as each rank of a ``torchrun`` job would:

    python bench/scale.py --out /tmp/scale                       # Herbarium 2020 and 2021, full size
    python bench/scale.py --sizes h2020 --steps evaluate,gallery --out /tmp/scale
    python bench/scale.py --scale 0.001 --out /tmp/scale_small   # the same, a thousandth of the images and classes
    python bench/scale.py --steps evaluate --device cuda --out /tmp/scale_gpu   # the runner's per-batch work on a GPU

Prints a table and writes ``scale.json`` and ``scale.md`` under ``--out``.
A step is a function of (size, data folder, arguments) returning a dict of
figures; :data:`STEPS` names them, so adding or re-pointing a step is a
few lines.

Sizes: Herbarium 2020 (FGVC7) 1,030,747 train / 138,292 test images,
32,093 species, 3,700 genera, 310 families, train metadata in latin-1;
Herbarium 2021 (FGVC8) 2,257,759 / 243,020 images, 64,500 species in four
ranks (the order, family and genus counts are ours: the competitions'
published figures fix only the species). Training counts per species are long-tailed (Zipf, at least one
image each).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable
from unittest import mock

import numpy as np
import torch
from PIL import Image
from torch import nn

from herbarium import retrieval
from herbarium.data.dataset import ImageDataset
from herbarium.data.gpu import loader_workers
from herbarium.data.index_cache import read_split_indexed
from herbarium.data.readers import DatasetSplit, Sample, read_split
from herbarium.evaluation import decoding, runner
from herbarium.evaluation.settings import EvaluationSettings
from herbarium.evaluation.tta import InputProfile
from herbarium.models.config import ModelConfig
from herbarium.models.multi_rank import MultiRankModel
from herbarium.runtime import default_workers
from herbarium.stats import compute_stats
from herbarium.taxonomy import Taxonomy


@dataclass(frozen=True)
class Size:
    """One competition's size: images per split and classes per rank (coarse to fine)."""

    layout: str  # "2020" or "2021": category records and folders as that year's files have them
    train: int
    test: int
    classes: dict[str, int]

    def scaled(self, factor: float) -> "Size":
        classes = {rank: max(2, round(n * factor)) for rank, n in self.classes.items()}
        finest = list(classes)[-1]
        train = max(classes[finest], round(self.train * factor))
        return replace(self, train=train, test=max(1, round(self.test * factor)), classes=classes)


SIZES = {
    "h2020": Size("2020", 1_030_747, 138_292, {"family": 310, "genus": 3_700, "species": 32_093}),
    "h2021": Size("2021", 2_257_759, 243_020, {"order": 60, "family": 600, "genus": 6_000, "species": 64_500}),
}
LATIN1_AUTHOR = "Müll.Arg."  # an author with an umlaut: the 2020 train file is latin-1, not UTF-8
TAIL_EXPONENT = 0.8  # Zipf exponent of the training counts per species


# ------------------------------------------------------------------- metadata
def category_records(size: Size) -> list[dict[str, Any]]:
    """One category record per species, as that year's metadata has them (2021: no genus, it is the name's first word)."""
    ranks = list(size.classes)
    species = size.classes[ranks[-1]]
    classes = [np.arange(species)]  # class of each species at each rank, fine to coarse: blocks of the finer rank
    for finer, coarser in zip(ranks[::-1], ranks[-2::-1]):
        classes.append(classes[-1] * size.classes[coarser] // size.classes[finer])
    columns = dict(zip(ranks[::-1], classes))
    records = []
    for i in range(species):  # 65k small dicts: the files hold them as such
        values = {rank: f"{rank.capitalize()}{int(columns[rank][i]):05d}" for rank in ranks[:-1]}
        name = f"{values['genus']} s{i:05d} {LATIN1_AUTHOR}"
        if size.layout == "2021":
            del values["genus"]
        records.append({"id": i, "name": name, **values})
    return records


def taxonomy_of(size: Size) -> Taxonomy:
    """The taxonomy :func:`herbarium.data.readers.read_split` builds from :func:`category_records`."""
    records = category_records(size)
    for record in records:
        record["genus"] = record["name"].split()[0]
        record["species"] = record["name"]
    return Taxonomy.from_categories(records, tuple(size.classes))


def train_counts(size: Size) -> np.ndarray:
    """Long-tailed images per species summing to ``size.train``: at least one each, Zipf for the rest."""
    species = size.classes[list(size.classes)[-1]]
    weights = 1.0 / np.arange(1, species + 1) ** TAIL_EXPONENT
    counts = 1 + np.floor(weights / weights.sum() * (size.train - species)).astype(np.int64)
    counts[: size.train - counts.sum()] += 1  # the rounding remainder to the head classes
    return np.random.default_rng(0).permutation(counts)


def write_metadata(size: Size, data: Path) -> None:
    """``train/metadata.json`` and ``test/metadata.json`` in the competition's layout, streamed to disk."""
    categories = category_records(size)
    counts = train_counts(size)
    labels = np.repeat(np.arange(len(counts)), counts)
    encoding = "latin-1" if size.layout == "2020" else "utf-8"
    _write_split(data / "train", np.arange(len(labels)), labels, categories, encoding)
    _write_split(data / "test", np.arange(len(labels), len(labels) + size.test), None, [], "utf-8")


def _write_split(folder: Path, image_ids: np.ndarray, labels: np.ndarray | None, categories: list[dict], encoding: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    folders = labels if labels is not None else image_ids % 1000
    with open(folder / "metadata.json", "w", encoding=encoding) as out:
        out.write('{"info": {"description": "synthetic, bench/scale.py"}, "licenses": [], "images": [')
        out.write(", ".join(f'{{"id": {i}, "file_name": "images/{f // 100:03d}/{f % 100:02d}/{i}.jpg", '
                            f'"width": 1000, "height": 661, "license": 0}}' for i, f in zip(image_ids.tolist(), folders.tolist())))
        out.write('], "annotations": [')
        if labels is not None:
            out.write(", ".join(f'{{"id": {i}, "image_id": {i}, "category_id": {c}, "region_id": 0}}'
                                for i, c in zip(image_ids.tolist(), labels.tolist())))
        out.write('], "categories": ')
        json.dump(categories, out, ensure_ascii=False)
        out.write("}")


# ---------------------------------------------------------------------- steps
def step_read_split(size: Size, data: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Row 5: what every process does before its first step: read the split, then a loader's target table."""
    started = time.perf_counter()
    split = read_split(data, "train", tuple(size.classes))
    read = time.perf_counter() - started
    started = time.perf_counter()
    ImageDataset(split, split.taxonomy.ranks, transform=lambda image: image)
    return {"images": len(split), "read_split_s": read, "target_table_s": time.perf_counter() - started}


def _cached_index(data: Path):
    """Keep the start-up index under the benchmark's own folder, not the user's cache (while the step runs)."""
    return mock.patch.dict(os.environ, {"HERBARIUM_CACHE": str(data / "index_cache")})


def step_index_build(size: Size, data: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Row 5, after: the first process of a node parses the metadata once and writes the start-up index."""
    shutil.rmtree(data / "index_cache", ignore_errors=True)
    started = time.perf_counter()
    with _cached_index(data):
        split = read_split_indexed(data, "train", tuple(size.classes))
    return {"images": len(split), "parse_and_index_s": time.perf_counter() - started}


def step_index_load(size: Size, data: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Row 5, after: what every other process does: map the cached index, then a loader's target table."""
    if not (data / "index_cache").is_dir():
        step_index_build(size, data, args)
    started = time.perf_counter()
    with _cached_index(data):
        split = read_split_indexed(data, "train", tuple(size.classes))
    read = time.perf_counter() - started
    started = time.perf_counter()
    ImageDataset(split, split.taxonomy.ranks, transform=lambda image: image)
    return {"images": len(split), "read_split_s": read, "target_table_s": time.perf_counter() - started}


def step_workers(size: Size, data: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Row 2: the loader workers one process starts when ``--workers`` is not given, as the code stands."""
    return {"cores": os.cpu_count(), "default_workers": default_workers(), "loader_workers": loader_workers(None, "cpu"),
            "local_world_size": os.environ.get("LOCAL_WORLD_SIZE")}


def step_stats(size: Size, data: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Row 6: collect-stats throughput on real sheet-sized JPEGs (a few files, read over and over)."""
    files = write_sheets(data / "sheets", args.sheets)
    samples = [Sample(i, files[i % len(files)].name, None) for i in range(args.stats_images)]
    split = DatasetSplit("sheets", files[0].parent, samples, taxonomy_of(size.scaled(1e-6)), data, "synthetic")
    stats = compute_stats(split, progress=False)
    return {"images": stats["num_images"], "images_per_s": stats["images_per_s"], "workers": stats["workers"],
            "hours_for_train_split": size.train / stats["images_per_s"] / 3600}


def write_sheets(folder: Path, count: int) -> list[Path]:
    """``count`` herbarium-sheet-sized JPEGs (1000 x 661 noise), written once."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    files = [folder / f"{i}.jpg" for i in range(count)]
    for path in files:
        if not path.is_file():
            Image.fromarray(rng.integers(0, 256, (661, 1000, 3), dtype=np.uint8)).save(path, quality=90)
    return files


class FixedFeatures(nn.Module):
    """A trunk that costs nothing: the first ``dim`` pixels of each image, so that a step times the code around the model."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1)[:, : self.dim] * self.scale


def tiny_model(size: Size, feature_dim: int) -> runner.LoadedModel:
    """A :class:`LoadedModel` with every rank's real linear head over :class:`FixedFeatures`."""
    taxonomy = taxonomy_of(size)
    classes = {rank: taxonomy.num_classes(rank) for rank in taxonomy.ranks}
    model = MultiRankModel(FixedFeatures(feature_dim), feature_dim, classes, ModelConfig(trunk="none")).eval()
    profile = InputProfile(16, (0.5,) * 3, (0.25,) * 3, "none")
    return runner.LoadedModel(model, None, taxonomy, profile, {}, Path("synthetic"))


def view_batches(count: int, batch_size: int, views: int, ranks: int, side: int = 16):
    """``count`` evaluation batches of random views [B, V, 3, side, side], as :func:`collate_views` makes them."""
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(batch_size, views, 3, side, side, generator=generator)
    for b in range(count):
        yield {"views": [images], "targets": torch.zeros(batch_size, ranks, dtype=torch.long),
               "index": torch.arange(b * batch_size, (b + 1) * batch_size), "skipped": 0}


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a timing covers it (a CUDA kernel returns before it runs)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_evaluate(size: Size, data: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Rows 1 and 4: ``runner.predict`` per batch with the default four views, its own work and its resident memory.

    The model is a linear head per rank over fixed features, so the time is
    that of the runner (averaging, decoding, top-k, disagreement) plus the
    heads' matrix products, which are timed apart and subtracted. On
    ``--device cuda`` the batches start on the host, as a loader gives them;
    the first batch is a warm-up and is not timed.
    """
    device = torch.device(args.device)
    loaded = tiny_model(size, args.feature_dim)
    loaded.model.to(device)
    settings = EvaluationSettings(device=args.device, workers=0, batch_size=args.eval_batch)
    ranks = len(loaded.taxonomy.ranks)
    batch = next(view_batches(1, args.eval_batch, len(settings.views), ranks))
    model_input = batch["views"][0].flatten(0, 1).to(device)  # [B*V, 3, H, W]
    with torch.inference_mode():
        loaded.model(model_input)  # warm-up
        synchronize(device)
        started = time.perf_counter()
        for _ in range(3):
            loaded.model(model_input)
        synchronize(device)
        model_s = (time.perf_counter() - started) / 3
    runner.predict([loaded], view_batches(1, args.eval_batch, len(settings.views), ranks), loaded.taxonomy, settings,
                   device)  # warm-up: the decoder's tables on the device, the kernels' first launches
    resident = []

    def measured(batches):
        for item in batches:
            resident.append(resident_bytes())
            yield item

    synchronize(device)
    started = time.perf_counter()
    runner.predict([loaded], measured(view_batches(args.eval_batches, args.eval_batch, len(settings.views), ranks)),
                   loaded.taxonomy, settings, device)
    synchronize(device)
    per_batch = (time.perf_counter() - started) / args.eval_batches
    resident.append(resident_bytes())
    images = args.eval_batches * args.eval_batch
    figures = {"device": device_name(device), "images": images, "batch": args.eval_batch,
               "classes": loaded.taxonomy.num_classes(loaded.taxonomy.finest),
               "batch_s": per_batch, "model_s": model_s, "runner_s": per_batch - model_s,
               "resident_after_first_batch_gb": resident[1] / 2**30, "resident_at_end_gb": resident[-1] / 2**30,
               "resident_growth_per_batch_mb": (resident[-1] - resident[1]) / max(len(resident) - 2, 1) / 2**20,
               "hours_runner_on_test_split": (per_batch - model_s) * size.test / args.eval_batch / 3600}
    if device.type == "cuda":
        figures["device_peak_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return figures


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"


def step_disagreement(size: Size, data: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Row 1, its first cause: checking one 128-image batch of per-rank predictions against the tree, as the runner does.

    Through the runner's :class:`PathDecoder` where it has the check, else the module-level function it called.
    """
    taxonomy = taxonomy_of(size)
    generator = torch.Generator().manual_seed(0)
    predictions = {rank: torch.randint(0, taxonomy.num_classes(rank), (128,), generator=generator).to(args.device)
                   for rank in taxonomy.ranks}
    decoder = decoding.PathDecoder(taxonomy)
    check = getattr(decoder, "inconsistent_mask", None) or (lambda batch: decoding.inconsistent_mask(batch, taxonomy))
    check(predictions)  # the first call builds what is cached
    times = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        int(check(predictions).sum())
        times.append(time.perf_counter() - started)
    return {"classes": taxonomy.num_classes(taxonomy.finest), "median_ms_per_batch": float(np.median(times)) * 1000}


def step_gallery(size: Size, data: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Row 7: memory of a retrieval gallery of the whole train split (``runner.build_gallery``), embeddings of ``--embedding-dim``.

    Built on the CPU for ``--gallery-images`` images at most and scaled
    linearly to the train split; the figure is the growth of the process's
    peak resident memory, so it counts every copy made while building. Where
    the code chooses a placement, the choice for the whole train split on
    two GPUs (60 and 20 GB free) is reported too.
    """
    images = min(size.train, args.gallery_images)
    loaded = tiny_model(size.scaled(1e-6), args.embedding_dim)
    split = DatasetSplit("train", data, [Sample(i, f"{i}.jpg", 0) for i in range(images)], loaded.taxonomy, data, "synthetic")
    batches = view_batches(images // args.eval_batch, args.eval_batch, 2, len(loaded.taxonomy.ranks),
                           side=int(np.ceil(np.sqrt(args.embedding_dim / 3))))
    settings = EvaluationSettings(device="cpu", workers=0, batch_size=args.eval_batch)
    before = peak_resident_bytes()
    with mock.patch.object(runner, "build_view_loader", lambda *_, **__: batches):  # the gallery, not the decoding
        gallery = runner.build_gallery(loaded, split, loaded.taxonomy, settings, torch.device("cpu"), loaded.taxonomy.ranks[-1:])
    built = len(gallery.embeddings)
    peak = peak_resident_bytes() - before
    figures = {"embedding_dim": args.embedding_dim, "images_built": built, "peak_gb_built": peak / 2**30,
               "peak_gb_train_split": peak / built * size.train / 2**30,
               "embeddings_dtype": str(gallery.embeddings.dtype).removeprefix("torch."),
               "embeddings_device": str(gallery.embeddings.device)}
    placement = getattr(retrieval, "gallery_placement", None)  # where the code decides where a gallery is kept
    if placement is not None:
        for name, free in (("80gb_gpu_60_free", {"cuda": 60 * 10**9}), ("24gb_gpu_20_free", {"cuda": 20 * 10**9})):
            chosen = placement(size.train, args.embedding_dim, torch.device("cuda"), free={"cpu": 100 * 10**9, **free})
            figures[f"train_split_on_{name}"] = f"{chosen.device.type} {str(chosen.dtype).removeprefix('torch.')}"
    return figures


METADATA_STEPS = {"read_split", "index_build", "index_load"}  # the steps that read the synthetic metadata
STEPS: dict[str, Callable[[Size, Path, argparse.Namespace], dict[str, Any]]] = {
    "evaluate": step_evaluate,
    "disagreement": step_disagreement,
    "workers": step_workers,
    "read_split": step_read_split,
    "index_build": step_index_build,
    "index_load": step_index_load,
    "stats": step_stats,
    "gallery": step_gallery,
}


# ---------------------------------------------------------------- measurement
def resident_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_resident_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def run_step(name: str, size_name: str, args: argparse.Namespace) -> dict[str, Any]:
    """The step in this process: its figures, wall time and peak resident memory (of the whole process)."""
    size = SIZES[size_name].scaled(args.scale) if args.scale != 1 else SIZES[size_name]
    started = time.perf_counter()
    figures = STEPS[name](size, Path(args.out) / size_name, args)
    return {**figures, "step_s": time.perf_counter() - started, "peak_resident_gb": peak_resident_bytes() / 2**30,
            "load_average": os.getloadavg()[0]}  # other work on the machine slows every timing


def step_in_subprocess(name: str, size_name: str, argv: list[str]) -> dict[str, Any]:
    command = [sys.executable, __file__, *argv, "--only-step", f"{name}:{size_name}"]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    lines = ["| size | step | figures |", "|---|---|---|"]
    for size_name, steps in results.items():
        for name, figures in steps.items():
            shown = ", ".join(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
                              for key, value in figures.items())
            lines.append(f"| {size_name} | {name} | {shown} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for the synthetic metadata and the results")
    parser.add_argument("--sizes", default="h2020,h2021", help=f"comma-separated, of {list(SIZES)} (default: both)")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated, of {list(STEPS)} (default: all)")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the images and classes (default 1: full size)")
    parser.add_argument("--eval-batch", type=int, default=128, help="images per evaluation batch (default 128)")
    parser.add_argument("--eval-batches", type=int, default=75, help="evaluation batches run (default 75: 9,600 images)")
    parser.add_argument("--repeats", type=int, default=9, help="repeats of the disagreement check (default 9)")
    parser.add_argument("--feature-dim", type=int, default=16, help="features of the evaluation's stand-in model (default 16)")
    parser.add_argument("--embedding-dim", type=int, default=1024, help="gallery embedding size (default 1024)")
    parser.add_argument("--gallery-images", type=int, default=262_144, help="gallery images built at most (default 262144)")
    parser.add_argument("--sheets", type=int, default=8, help="distinct 1000x661 JPEGs for the stats step (default 8)")
    parser.add_argument("--stats-images", type=int, default=256, help="images the stats step reads (default 256)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="where the evaluate and disagreement steps run; the other steps are host work (default cpu)")
    parser.add_argument("--only-step", help=argparse.SUPPRESS)  # STEP:SIZE, run in this process, JSON on stdout
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.only_step:
        name, size_name = args.only_step.split(":")
        print(json.dumps(run_step(name, size_name, args)))
        return 0
    sizes, steps = args.sizes.split(","), args.steps.split(",")
    unknown = [s for s in sizes if s not in SIZES] + [s for s in steps if s not in STEPS]
    if unknown:
        print(f"error: unknown size or step {unknown}; sizes {list(SIZES)}, steps {list(STEPS)}", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: torch sees no CUDA device here", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for size_name in sizes:
        size = SIZES[size_name].scaled(args.scale) if args.scale != 1 else SIZES[size_name]
        marker = out / size_name / "size.json"
        if METADATA_STEPS & set(steps) and (not marker.is_file() or json.loads(marker.read_text()) != asdict(size)):
            write_metadata(size, out / size_name)
            marker.write_text(json.dumps(asdict(size)))
        results[size_name] = {}
        for name in steps:
            results[size_name][name] = step_in_subprocess(name, size_name, argv)
            print(f"{size_name} {name}: {results[size_name][name]}", flush=True)
    document = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "machine": f"{platform.machine()}, {os.cpu_count()} cores", "torch": torch.__version__,
                "command": "python bench/scale.py " + " ".join(argv), "results": results}
    (out / "scale.json").write_text(json.dumps(document, indent=2))
    (out / "scale.md").write_text(table(results) + "\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
