"""A small synthetic dataset in the Herbarium 2020 layout, for demos and tests.

Each species is a drawing whose three visual cues follow the taxonomy:

* **family** = the shape (disc, square, triangle, ...), drawn large and near
  the centre with random offset, size and rotation;
* **genus** = the colour palette the shape is painted with. Palettes repeat
  across families (genus ``g`` of family ``f`` gets palette ``(f + g) mod
  (genera + 1)``), so colour alone names neither the family nor the genus:
  a model has to combine shape and colour;
* **species** = the texture inside the shape (horizontal stripes, vertical
  stripes, dots, ...), with random period, phase and a small tilt.

Sheets are a noisy paper-coloured background, sometimes with a small specimen
label in a corner. The train split is long-tailed (exponential counts from
``max_per_class`` down to ``min_per_class``), the test split balanced and
labelled. Every image is drawn from its own random generator seeded by
``(seed, split, index)``, so two runs with the same seed write identical bytes.

Layout written under ``out/`` (file names relative to each split folder)::

    train/metadata.json   info, licenses, images, annotations, categories, regions
    train/images/<category_id // 100>/<category_id % 100>/<image_id>.jpg
    test/metadata.json    the same keys, annotations included
    test/images/<image_id // 1000>/<image_id>.jpg
    test/labels.csv       image_id,category_id
    README.md
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

from herbarium.arguments import ArgumentParser
from herbarium.errors import command

SHAPES: tuple[str, ...] = ("disc", "square", "triangle", "cross", "star", "ring")
TEXTURES: tuple[str, ...] = (
    "horizontal stripes",
    "vertical stripes",
    "dots",
    "checker",
    "diagonal stripes",
    "concentric rings",
)
# (name, base RGB, accent RGB): a dark base and a light accent, so that the
# texture shows and the shape stands out from the pale sheet.
PALETTES: tuple[tuple[str, tuple[int, int, int], tuple[int, int, int]], ...] = (
    ("red/gold", (185, 35, 35), (250, 205, 60)),
    ("blue/sky", (30, 55, 165), (130, 205, 250)),
    ("green/lime", (25, 115, 45), (175, 235, 110)),
    ("purple/pink", (110, 35, 140), (245, 150, 205)),
    ("brown/orange", (95, 60, 25), (245, 145, 45)),
    ("teal/white", (10, 110, 115), (235, 245, 245)),
)
PAPER_RGB = (232, 226, 208)
JPEG_QUALITY = 90
SUPERSAMPLE = 4  # shape masks are drawn this many times larger, then box-filtered
REGIONS = ({"id": 0, "name": "Demo region North"}, {"id": 1, "name": "Demo region South"})
LICENSES = ({"id": 0, "name": "Public Domain (synthetic images)", "url": "https://creativecommons.org/publicdomain/zero/1.0/"},)
SPLIT_SEEDS = {"train": 1, "test": 2}
FIRST_CATEGORY_ID = 100


@dataclass(frozen=True)
class DemoSpecies:
    """One demo category: its record fields and the cues that draw it."""

    category_id: int
    name: str
    genus: str
    family: str
    shape: str
    palette: int
    texture: str

    def record(self) -> dict[str, Any]:
        """The Herbarium 2020 category record."""
        return {"id": self.category_id, "name": self.name, "genus": self.genus, "family": self.family}


# ------------------------------------------------------------------ taxonomy
def build_demo_species(num_families: int = 3, genera_per_family: int = 2, species_per_genus: int = 3) -> list[DemoSpecies]:
    """The demo taxonomy, in taxonomic order.

    Category ids start at 100 and leave gaps (100, 103, 106, 110, ...), so code
    that mistakes a category id for a class index fails loudly.
    """
    _check_at_most("num_families", num_families, len(SHAPES), "shapes")
    _check_at_most("genera_per_family", genera_per_family, len(PALETTES), "palettes")
    _check_at_most("species_per_genus", species_per_genus, len(TEXTURES), "textures")
    num_palettes = min(genera_per_family + 1, len(PALETTES))
    species = []
    for f in range(num_families):
        family_letter = chr(ord("A") + f)
        family = f"Demo-family {family_letter}"
        for g in range(genera_per_family):
            genus = f"Genus {family_letter}{g + 1}"
            genus_index = f * genera_per_family + g
            for s in range(species_per_genus):
                species.append(
                    DemoSpecies(
                        category_id=FIRST_CATEGORY_ID + 10 * genus_index + 3 * s,
                        name=f"{genus} species {s + 1}",
                        genus=genus,
                        family=family,
                        shape=SHAPES[f],
                        palette=(f + g) % num_palettes,
                        texture=TEXTURES[s],
                    )
                )
    return species


def _check_at_most(name: str, value: int, limit: int, what: str) -> None:
    if not 1 <= value <= limit:
        raise ValueError(f"{name} must be between 1 and {limit} (there are {limit} {what}), got {value}")


def long_tail_counts(num_classes: int, max_per_class: int, min_per_class: int) -> list[int]:
    """Exponentially decaying counts from ``max_per_class`` down to ``min_per_class``.

    Count k (k = 0 .. num_classes - 1) is ``round(max * (min / max) ** (k / (num_classes - 1)))``,
    so the first is exactly ``max_per_class`` and the last exactly ``min_per_class``.
    """
    if not 1 <= min_per_class <= max_per_class:
        raise ValueError(f"need 1 <= min_per_class <= max_per_class, got {min_per_class} and {max_per_class}")
    if num_classes == 1:
        return [max_per_class]
    ratio = min_per_class / max_per_class
    return [round(max_per_class * ratio ** (k / (num_classes - 1))) for k in range(num_classes)]


def spread_counts(species: Sequence[DemoSpecies], counts: Sequence[int], rng: np.random.Generator) -> dict[int, int]:
    """Give the sorted ``counts`` to species so that every genus gets head and tail classes.

    The counts are cut into rounds of one count per genus (the largest first);
    each round goes to the genera in a fresh random order, and within a genus
    the species take the rounds in random order. Returns ``{category_id: count}``.
    """
    genera = sorted({sp.genus for sp in species})
    members = {genus: [sp for sp in species if sp.genus == genus] for genus in genera}
    sorted_counts = sorted(counts, reverse=True)
    per_genus = len(species) // len(genera)
    order = {genus: rng.permutation(per_genus) for genus in genera}
    assigned = {}
    for round_index in range(per_genus):
        for position, genus_index in enumerate(rng.permutation(len(genera))):
            genus = genera[genus_index]
            sp = members[genus][order[genus][round_index]]
            assigned[sp.category_id] = sorted_counts[round_index * len(genera) + position]
    return assigned


# ----------------------------------------------------------------- rendering
def _shape_vertices(shape: str, cx: float, cy: float, radius: float, angle: float) -> list[tuple[float, float]]:
    """Polygon vertices of a shape centred at (cx, cy), rotated by ``angle`` radians."""
    if shape == "square":
        points = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        points = [(x * 0.82, y * 0.82) for x, y in points]  # a square of about the disc's area
    elif shape == "triangle":
        points = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        points = [(x * 1.15, y * 1.15 + 0.12) for x, y in points]
    elif shape == "cross":
        w = 0.38
        points = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)]
    elif shape == "star":
        points = []
        for k in range(10):
            a = -math.pi / 2 + k * math.pi / 5
            r = 1.1 if k % 2 == 0 else 0.5
            points.append((r * math.cos(a), r * math.sin(a)))
    else:
        raise ValueError(f"no polygon for shape {shape!r}")
    cos_a, sin_a = math.cos(angle), math.sin(angle)
    return [(cx + radius * (x * cos_a - y * sin_a), cy + radius * (x * sin_a + y * cos_a)) for x, y in points]


def shape_mask(shape: str, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """Anti-aliased coverage of a jittered shape: float32 [image_size, image_size] in [0, 1]."""
    big = image_size * SUPERSAMPLE
    cx, cy = big * (0.5 + rng.uniform(-0.08, 0.08, size=2))
    radius = big * rng.uniform(0.30, 0.38)
    angle = math.radians(rng.uniform(-20, 20))
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    if shape in ("disc", "ring"):
        # slightly elliptic, then rotated like the polygons
        rx, ry = radius * rng.uniform(0.9, 1.1), radius * rng.uniform(0.9, 1.1)
        draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=255)
        if shape == "ring":
            draw.ellipse((cx - 0.5 * rx, cy - 0.5 * ry, cx + 0.5 * rx, cy + 0.5 * ry), fill=0)
        canvas = canvas.rotate(math.degrees(angle), resample=Image.Resampling.BILINEAR, center=(cx, cy))
    else:
        draw.polygon(_shape_vertices(shape, cx, cy, radius, angle), fill=255)
    small = canvas.resize((image_size, image_size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def texture_pattern(texture: str, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """Accent weight of a jittered texture: float32 [image_size, image_size] in [0, 1]."""
    period = image_size * rng.uniform(0.17, 0.23)
    tilt = math.radians(rng.uniform(-10, 10))
    phase_u, phase_v = rng.uniform(0, 1, size=2)
    ys, xs = np.mgrid[0:image_size, 0:image_size].astype(np.float32) + 0.5
    # u runs along the (tilted) x axis, v along the (tilted) y axis, both in periods
    u = (xs * math.cos(tilt) + ys * math.sin(tilt)) / period + phase_u
    v = (-xs * math.sin(tilt) + ys * math.cos(tilt)) / period + phase_v
    if texture == "horizontal stripes":
        wave = np.cos(2 * np.pi * v)
    elif texture == "vertical stripes":
        wave = np.cos(2 * np.pi * u)
    elif texture == "dots":
        du, dv = u - np.round(u), v - np.round(v)
        wave = 1.0 - 2.0 * np.sqrt(du**2 + dv**2) / 0.3  # positive inside dots of radius 0.3 periods
    elif texture == "checker":
        wave = np.cos(np.pi * u) * np.cos(np.pi * v)
    elif texture == "diagonal stripes":
        wave = np.cos(2 * np.pi * (u + v) / math.sqrt(2))
    elif texture == "concentric rings":
        centre = image_size / 2 / period
        wave = np.cos(2 * np.pi * np.hypot(u - phase_u - centre, v - phase_v - centre))
    else:
        raise ValueError(f"unknown texture {texture!r}; valid: {list(TEXTURES)}")
    # a steep but smooth step: sharp edges without aliasing
    return np.clip(0.5 + 1.5 * wave, 0.0, 1.0).astype(np.float32)


def _paper(image_size: int, rng: np.random.Generator) -> np.ndarray:
    """A noisy sheet, sometimes with a small specimen label: float32 [H, W, 3]."""
    tint = np.asarray(PAPER_RGB, dtype=np.float32) + rng.uniform(-12, 12, size=3)
    sheet = np.broadcast_to(tint, (image_size, image_size, 3)).copy()
    if rng.random() < 0.5:
        label_w, label_h = int(image_size * 0.28), int(image_size * 0.16)
        x0 = int(rng.choice([1, image_size - label_w - 1]))
        y0 = int(rng.choice([1, image_size - label_h - 1]))
        sheet[y0 : y0 + label_h, x0 : x0 + label_w] = 250.0
        for row in range(y0 + 2, y0 + label_h - 1, 3):
            sheet[row, x0 + 2 : x0 + label_w - 2 - int(rng.integers(0, label_w // 3 + 1))] = 90.0
    return sheet


def render_image(species: DemoSpecies, image_size: int, rng: np.random.Generator) -> Image.Image:
    """One RGB image of ``species``: its shape, painted in its palette with its texture."""
    sheet = _paper(image_size, rng)
    mask = shape_mask(species.shape, image_size, rng)[..., None]  # [H, W, 1]
    accent_weight = texture_pattern(species.texture, image_size, rng)[..., None]  # [H, W, 1]
    _, base, accent = PALETTES[species.palette]
    brightness = rng.uniform(0.88, 1.08)
    base_rgb = (np.asarray(base, dtype=np.float32) + rng.uniform(-15, 15, size=3)) * brightness
    accent_rgb = (np.asarray(accent, dtype=np.float32) + rng.uniform(-15, 15, size=3)) * brightness
    paint = base_rgb * (1.0 - accent_weight) + accent_rgb * accent_weight  # [H, W, 3]
    pixels = sheet * (1.0 - mask) + paint * mask
    pixels += rng.normal(0.0, 7.0, size=pixels.shape)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


# ------------------------------------------------------------------- writing
def _train_file_name(category_id: int, image_id: int) -> str:
    # as in Herbarium 2020/2021: images/<category id in two folders>/<image id>.jpg
    return f"images/{category_id // 100:03d}/{category_id % 100:02d}/{image_id}.jpg"


def _test_file_name(category_id: int, image_id: int) -> str:
    # test folders must not give the label away
    return f"images/{image_id // 1000:03d}/{image_id}.jpg"


def _write_split(
    split_dir: Path,
    split: str,
    species_of_images: Sequence[DemoSpecies],
    image_ids: Sequence[int],
    seed: int,
    image_size: int,
    categories: list[dict[str, Any]],
) -> dict[str, Any]:
    """Render, save and index one split; returns its metadata."""
    file_name_of = _train_file_name if split == "train" else _test_file_name
    images, annotations = [], []
    for index, (sp, image_id) in enumerate(zip(species_of_images, image_ids)):
        rng = np.random.default_rng([seed, SPLIT_SEEDS[split], index])
        file_name = file_name_of(sp.category_id, image_id)
        path = split_dir / file_name
        path.parent.mkdir(parents=True, exist_ok=True)
        render_image(sp, image_size, rng).save(path, format="JPEG", quality=JPEG_QUALITY)
        images.append({"id": image_id, "file_name": file_name, "width": image_size, "height": image_size, "license": 0})
        annotations.append(
            {"id": image_id, "image_id": image_id, "category_id": sp.category_id, "region_id": int(rng.integers(len(REGIONS)))}
        )
    metadata = {
        "info": {
            "description": f"herbarium demo data ({split}): synthetic shapes, shape = family, colour = genus, texture = species",
            "version": "1.0",
            "year": 2020,
            "contributor": "herbarium.demo",
            "seed": seed,
        },
        "licenses": list(LICENSES),
        "images": images,
        "annotations": annotations,
        "categories": categories,
        "regions": list(REGIONS),
    }
    with open(split_dir / "metadata.json", "w", encoding="utf-8") as f:
        json.dump(metadata, f, indent=1)
    return metadata


def _write_labels_csv(path: Path, annotations: Sequence[dict[str, Any]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["image_id", "category_id"])
        for annotation in annotations:
            writer.writerow([annotation["image_id"], annotation["category_id"]])


def _readme(species: Sequence[DemoSpecies], summary: dict[str, Any], train_counts: dict[int, int]) -> str:
    lines = [
        "# herbarium demo data",
        "",
        "Synthetic images in the Kaggle Herbarium 2020 layout, written by `herbarium make-demo-data`",
        f"(`herbarium.demo.make_demo_data`, seed {summary['seed']}, {summary['image_size']} px JPEG).",
        "Family = shape, genus = colour palette (palettes repeat across families), species = texture.",
        f"Train: {summary['images']['train']} images, long-tailed (imbalance {summary['imbalance']:g}).",
        f"Test: {summary['images']['test']} images, balanced; labels in `test/metadata.json` and `test/labels.csv`.",
        "",
        "| category_id | name | genus | family | shape | palette | texture | train images |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for sp in species:
        lines.append(
            f"| {sp.category_id} | {sp.name} | {sp.genus} | {sp.family} | {sp.shape} | "
            f"{PALETTES[sp.palette][0]} | {sp.texture} | {train_counts[sp.category_id]} |"
        )
    return "\n".join(lines) + "\n"


def _prepare_out(out: Path, overwrite: bool) -> None:
    """Create ``out``; refuse a non-empty one unless ``overwrite``, then clear only what this module writes."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"output folder {out} is not empty; pass overwrite=True (--overwrite) to replace the demo data in it")
        for name in ("train", "test"):
            shutil.rmtree(out / name, ignore_errors=True)
        (out / "README.md").unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def make_demo_data(
    out: Path | str,
    seed: int = 0,
    image_size: int = 64,
    max_per_class: int = 100,
    min_per_class: int = 2,
    test_per_class: int = 10,
    num_families: int = 3,
    genera_per_family: int = 2,
    species_per_genus: int = 3,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the demo dataset under ``out`` and return a summary.

    Args:
        out: output folder; must be empty or absent unless ``overwrite``.
        seed: the same seed gives byte-identical files.
        image_size: side of the square RGB images, in pixels (at least 16).
        max_per_class, min_per_class: train images of the most and least
            frequent species; counts in between decay exponentially.
        test_per_class: test images per species (a balanced split).
        num_families, genera_per_family, species_per_genus: the taxonomy.
        overwrite: replace ``out/train``, ``out/test`` and ``out/README.md``
            in a non-empty ``out`` (other files there are left alone).

    Returns:
        ``{"out", "seed", "image_size", "images": {"train", "test"},
        "classes": {"family", "genus", "species"}, "train_per_class": {"max", "min"},
        "test_per_class", "imbalance"}``.

    Raises:
        FileExistsError: ``out`` is not empty and ``overwrite`` is false.
        ValueError: a size or count out of range.
    """
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16 pixels, got {image_size}")
    if test_per_class < 0:
        raise ValueError(f"test_per_class must be >= 0, got {test_per_class}")
    species = build_demo_species(num_families, genera_per_family, species_per_genus)
    counts = long_tail_counts(len(species), max_per_class, min_per_class)
    out = Path(out)
    _prepare_out(out, overwrite)

    rng = np.random.default_rng([seed, 0])
    train_counts = spread_counts(species, counts, rng)
    train_species = [sp for sp in species for _ in range(train_counts[sp.category_id])]
    test_species = [sp for sp in species for _ in range(test_per_class)]
    # shuffle image order so classes interleave, as in the real files
    train_species = [train_species[i] for i in rng.permutation(len(train_species))]
    test_species = [test_species[i] for i in rng.permutation(len(test_species))]
    # image ids: unique across splits, increasing within each, with gaps so that
    # an image id is never its list index
    num_images = len(train_species) + len(test_species)
    image_ids = np.sort(rng.choice(np.arange(1, 10 * num_images + 1), size=num_images, replace=False)).tolist()
    train_ids, test_ids = image_ids[: len(train_species)], image_ids[len(train_species) :]

    categories = [sp.record() for sp in species]
    _write_split(out / "train", "train", train_species, train_ids, seed, image_size, categories)
    test_metadata = _write_split(out / "test", "test", test_species, test_ids, seed, image_size, categories)
    _write_labels_csv(out / "test" / "labels.csv", test_metadata["annotations"])

    summary = {
        "out": str(out),
        "seed": seed,
        "image_size": image_size,
        "images": {"train": len(train_species), "test": len(test_species)},
        "classes": {
            "family": len({sp.family for sp in species}),
            "genus": len({sp.genus for sp in species}),
            "species": len(species),
        },
        "train_per_class": {"max": max(counts), "min": min(counts)},
        "test_per_class": test_per_class,
        "imbalance": max(counts) / min(counts),
    }
    (out / "README.md").write_text(_readme(species, summary, train_counts), encoding="utf-8")
    return summary


# ----------------------------------------------------------------------- CLI
def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = ArgumentParser(
        description="Write a small synthetic dataset in the Kaggle Herbarium 2020 layout "
        "(family = shape, genus = colour, species = texture).",
        add_help=add_help,
    )
    parser.add_argument("out", metavar="OUT", type=Path, help="output folder (required; must be empty unless --overwrite)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed writes identical files (default: 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace demo data in a non-empty OUT (default: off)")
    images = parser.add_argument_group("images")
    images.add_argument("--size", type=int, default=64, help="side of the square images in pixels (default: 64)")
    images.add_argument("--max-per-class", type=int, default=100, help="train images of the most frequent species (default: 100)")
    images.add_argument("--min-per-class", type=int, default=2, help="train images of the rarest species (default: 2)")
    images.add_argument("--test-per-class", type=int, default=10, help="test images per species, balanced (default: 10)")
    taxonomy = parser.add_argument_group("taxonomy")
    taxonomy.add_argument("--families", type=int, default=3, help=f"number of families, one shape each, at most {len(SHAPES)} (default: 3)")
    taxonomy.add_argument("--genera-per-family", type=int, default=2, help=f"genera per family, one palette each, at most {len(PALETTES)} (default: 2)")
    taxonomy.add_argument("--species-per-genus", type=int, default=3, help=f"species per genus, one texture each, at most {len(TEXTURES)} (default: 3)")
    return parser


@command
def main(argv: Sequence[str] | None = None) -> None:
    """``herbarium make-demo-data``: write the demo data and print its summary."""
    args = get_args_parser().parse_args(argv)
    summary = make_demo_data(
            args.out,
            seed=args.seed,
            image_size=args.size,
            max_per_class=args.max_per_class,
            min_per_class=args.min_per_class,
            test_per_class=args.test_per_class,
            num_families=args.families,
            genera_per_family=args.genera_per_family,
            species_per_genus=args.species_per_genus,
            overwrite=args.overwrite,
        )
    classes = summary["classes"]
    print(
        f"wrote {summary['out']}: {summary['images']['train']} train and {summary['images']['test']} test images, "
        f"{classes['family']} families / {classes['genus']} genera / {classes['species']} species, "
        f"{summary['image_size']} px, train imbalance {summary['imbalance']:g} "
        f"({summary['train_per_class']['max']} to {summary['train_per_class']['min']} per species)"
    )


if __name__ == "__main__":
    raise SystemExit(main())
