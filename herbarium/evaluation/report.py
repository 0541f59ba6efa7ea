"""The evaluation report: metrics.json, report.md, a self-contained report.html and plots.

The report is what people read instead of logs, so it opens with a table of
contents and the answer (the headline macro-F1 with its 95% interval, the
primary variant's accuracy per rank), then what TTA and consistent
decoding bought, then where the model fails (worst classes with their
training counts, the most confused pairs, how far up the tree mistakes go)
and how fast it ran.

``metrics`` is shaped::

    {"variants": {name: {rank: rank_metrics(...)}},   # ranks coarse to fine; absent/empty if unlabelled
     "primary": name,                                 # the variant to headline
     "headline": {"variant", "rank", "macro_f1", "low", "high", "images", ...,   # optional: its 95% interval, and
                  "best_other": {"variant", "delta", "low", "high", ...}},       # a higher variant's paired margin
     "baseline": name,                                # optional; gains are against it
     "taxonomy_disagreement": {name: fraction, ...},  # optional
     "throughput": {"images_per_s", "hardware", "views", "batch_size", ...},
     ...}                                             # anything else: listed as it is

Markdown and HTML are rendered from the same sections, and every number
they show is read from the JSON document written beside them, so the three
files cannot disagree. Plots are drawn with matplotlib's Agg canvas on
``Figure`` objects (no pyplot state), written as PNG files for the Markdown
and embedded as base64 data URIs in the HTML, which therefore needs no
other file and no network. The HTML reads in a 700 px window: numbers and
intervals never wrap, and tables and plots wider than the window scroll in
their own box instead of shrinking their text.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import json
import math
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from herbarium.data.images import IMAGE_ERRORS, load_rgb
from herbarium.evaluation.metrics import SHOT_GROUPS
from herbarium.evaluation.submission import write_atomic

KNOWN_KEYS = ("variants", "primary", "primary_choice", "headline", "baseline", "taxonomy_disagreement", "throughput", "mistakes",
              "unlabelled_predictions", "posthoc_tau")  # posthoc_tau: shown in the Run section, from the context
DEFAULT_BASELINE = "single_view_heads"
WORST_CLASSES = 20
CONFUSED_PAIRS = 15
MISSING = "—"
THUMBNAIL_SIDE = 160  # pixels of the longer side of a mistake's thumbnail
PLOT_WIDTH = 6.6  # inches at 100 dpi: a plot this wide shows unscaled, labels as drawn, in a 700 px window
MISTAKE_COLUMNS = 3  # thumbnails of PLOT_WIDTH / 3 inches
CAPTION_CHARACTERS = 26  # a thumbnail caption's line length at its font size
LEGEND_COLUMNS = 5  # at most; fewer when the labels are too long for the figure
LIST_ITEMS_SHOWN = 10
NO_LABELS = "No labels for this split: predictions and throughput only."


# --------------------------------------------------------------- JSON
def to_jsonable(value: Any) -> Any:
    """Plain JSON types from numpy/torch scalars, tensors, paths, dates and tuples.

    Non-finite floats become None, because ``NaN`` is not valid JSON.
    """
    if isinstance(value, Mapping):
        return {str(key): to_jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [to_jsonable(item) for item in value]
    if isinstance(value, torch.Tensor):
        return to_jsonable(value.detach().cpu().tolist())
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        return to_jsonable(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, (dt.date, dt.datetime)):
        return value.isoformat()
    return str(value)  # paths and anything else: as people would write them


# ------------------------------------------------------------- formatting
def fmt_fraction(value: float | None) -> str:
    """Accuracies and F1s: 4 decimals, as in metrics.json rounded."""
    return MISSING if value is None else f"{value:.4f}"


def fmt_gain(value: float | None) -> str:
    return MISSING if value is None else f"{value:+.4f}"


def fmt_value(value: Any) -> str:
    """Any value in a key/value table."""
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.4f}"
    if isinstance(value, list):
        shown = ", ".join(fmt_value(item) for item in value[:LIST_ITEMS_SHOWN])
        return shown if len(value) <= LIST_ITEMS_SHOWN else f"{shown}, … ({len(value):,} in all)"
    return str(value)


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested dicts as (dotted key, value) rows."""
    rows = []
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            rows.extend(flatten(value, f"{name}."))
        else:
            rows.append((name, value))
    return rows


# --------------------------------------------------------------- sections
@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]


@dataclass
class Section:
    """One heading's worth of report: paragraphs, tables, notes, then plots (by key)."""

    title: str
    paragraphs: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _key_value_table(rows: list[tuple[str, Any]], headers: tuple[str, str] = ("field", "value")) -> Table:
    return Table(list(headers), [[key, fmt_value(value)] for key, value in rows])


def _shot_cell(group: Mapping[str, Any] | None) -> str:
    if not group or group.get("accuracy") is None:
        return MISSING
    return f"{fmt_fraction(group['accuracy'])} (n={group['images']:,})"


def _groups(metrics: Mapping[str, Any]) -> Mapping[str, Any]:
    return metrics.get("shot_groups") or {}


def run_section(context: Mapping[str, Any]) -> Section:
    return Section("Run", tables=[_key_value_table(flatten(context))] if context else [])


def summary_section(variants: Mapping[str, Any], primary: str, choice: Mapping[str, Any] | None = None) -> Section:
    """Rank x (top-1, top-5, macro-F1, many/medium/few) for the primary variant."""
    ranks = variants[primary]
    rows = [
        [rank, f"{m['images']:,}", fmt_fraction(m.get("top1")), fmt_fraction(m.get("top5")),
         fmt_fraction(m.get("macro_f1")), *(_shot_cell(_groups(m).get(g)) for g in SHOT_GROUPS)]
        for rank, m in ranks.items()
    ]
    headers = ["rank", "images", "top-1", "top-5", "macro-F1", "many-shot", "medium-shot", "few-shot"]
    why = f" ({choice['reason']})" if choice and choice.get("reason") else ""
    intro = (
        f"Variant {primary}{why}: the one written to submission.csv. Macro-F1 as Kaggle scores it "
        "(scikit-learn, over the classes in the answers or the predictions)."
    )
    thresholds = [
        f"{rank}: {_threshold_text(*m['shot_thresholds'])}" for rank, m in ranks.items() if m.get("shot_thresholds")
    ]
    notes = []
    if thresholds:
        notes.append(
            "Shot groups by training images of the true class (accuracy, n = test images); "
            + "; ".join(thresholds) + "."
        )
    return Section("Summary", [intro], [Table(headers, rows)], ["per_rank"], notes)


def _threshold_text(low: int, high: int) -> str:
    medium = f"{low}" if low == high else f"{low}-{high}"
    return f"many > {high}, medium {medium}, few < {low}"


def variants_section(variants: Mapping[str, Any], baseline: str) -> Section:
    """Every variant side by side, with the gain over the baseline variant."""
    rows = []
    for rank in _all_ranks(variants):
        reference = variants.get(baseline, {}).get(rank, {})
        for name, ranks in variants.items():
            m = ranks.get(rank)
            if m is None:
                continue
            is_baseline = name == baseline
            rows.append([
                rank, name,
                fmt_fraction(m.get("top1")), _gain(m, reference, "top1", is_baseline),
                fmt_fraction(m.get("top5")),
                fmt_fraction(m.get("macro_f1")), _gain(m, reference, "macro_f1", is_baseline),
                _shot_cell(_groups(m).get("few")),
            ])
    headers = ["rank", "variant", "top-1", "gain", "top-5", "macro-F1", "gain", "few-shot"]
    paragraph = (
        f"Gains are against {baseline}. tta = scores averaged over the TTA views, single_view = one plain view; "
        "heads = each head's own argmax, consistent = the best path through the taxonomy."
    )
    return Section("Variants", [paragraph], [Table(headers, rows)], ["variants"])


def disagreement_section(disagreement: Mapping[str, Any]) -> Section:
    paragraph = "Share of images whose independent head predictions do not form one valid taxonomy path."
    rows = [[key, fmt_fraction(value)] for key, value in flatten(disagreement)]
    return Section("Taxonomy disagreement", [paragraph], [Table(["variant", "share of images"], rows)])


def _gain(metrics: Mapping[str, Any], reference: Mapping[str, Any], key: str, is_baseline: bool) -> str:
    if is_baseline or metrics.get(key) is None or reference.get(key) is None:
        return MISSING
    return fmt_gain(metrics[key] - reference[key])


def _all_ranks(variants: Mapping[str, Any]) -> list[str]:
    return list(dict.fromkeys(rank for ranks in variants.values() for rank in ranks))


def worst_classes_section(rank: str, metrics: Mapping[str, Any]) -> Section:
    """Lowest-F1 classes among those with test images, next to their training counts."""
    classes = [c for c in metrics.get("per_class", []) if c["support"] > 0]
    classes.sort(key=lambda c: (c["f1"], -c["support"], c["name"]))
    rows = [
        [c["name"], fmt_value(c.get("train_count")), f"{c['support']:,}", f"{c['predicted']:,}",
         fmt_fraction(c["precision"]), fmt_fraction(c["recall"]), fmt_fraction(c["f1"])]
        for c in classes[:WORST_CLASSES]
    ]
    headers = [rank, "train images", "test images", "predicted", "precision", "recall", "F1"]
    return Section(f"Worst {rank} classes by F1", tables=[Table(headers, rows)], plots=["f1_vs_count"])


def confused_pairs_section(rank: str, metrics: Mapping[str, Any]) -> Section:
    levels = (metrics.get("hierarchical_distance") or {}).get("levels", {})
    rows = [
        [p["true_name"], p["predicted_name"], f"{p['count']:,}", _shared_ancestor(p.get("distance"), levels)]
        for p in metrics.get("confused_pairs", [])[:CONFUSED_PAIRS]
    ]
    headers = [f"true {rank}", f"predicted {rank}", "images", "first shared rank"]
    return Section(f"Most confused {rank} pairs", tables=[Table(headers, rows)], plots=["confusion"])


def headline_statement(headline: Mapping[str, Any]) -> str:
    """The headline figure with its 95% bootstrap interval, so a reader knows how far the split pins it down."""
    return (f"Headline: {headline['rank']} macro-F1 {headline['macro_f1']:.4f}, 95% interval "
            f"[{headline['low']:.4f}, {headline['high']:.4f}] (bootstrap over the {headline['images']:,} labelled images).")


def headline_warning(headline: Mapping[str, Any]) -> str | None:
    """A warning when another variant is clearly better on this split (whole paired 95% interval above zero), else None.

    The headline is chosen on validation, before this split's answers are
    seen; switching to the variant that wins here would tune on the test.
    A clear win here says validation and test disagree, which is what the
    reader should look into.
    """
    other = headline.get("best_other")
    if not other or other["low"] <= 0:
        return None
    return (f"Warning: on this split {other['variant']} is clearly better than the headline variant "
            f"{headline['variant']} ({headline['rank']} macro-F1 {_margin_text(other)}). The headline was chosen on "
            "the validation split; choosing again on this split's answers would overfit them. Check that the "
            "validation split is large enough and drawn like this one, then evaluate again.")


def headline_note(headline: Mapping[str, Any]) -> str | None:
    """A note when another variant scores higher here by less than this split can tell from chance, else None."""
    other = headline.get("best_other")
    if not other or other["low"] > 0:
        return None
    return (f"{other['variant']} scores higher on this split ({headline['rank']} macro-F1 {_margin_text(other)}), "
            "a difference this split cannot tell from chance: no reason to change the headline.")


def _margin_text(margin: Mapping[str, Any]) -> str:
    return f"{margin['delta']:+.3f}, paired 95% interval [{margin['low']:+.3f}, {margin['high']:+.3f}]"


def mistakes_section(mistakes: list[Mapping[str, Any]]) -> Section:
    """The most confident wrong predictions at the finest rank, with their files."""
    rows = [[str(m["image_id"]), m["true"], m["predicted"], fmt_fraction(m["probability"]), str(m["path"])] for m in mistakes]
    paragraph = ("The labelled images the headline variant got wrong at the finest rank with the highest "
                 "confidence (probability of its top class): label errors, look-alike classes or images unlike training.")
    return Section("Most confident mistakes", [paragraph], [Table(["image", "true", "predicted", "probability", "file"], rows)],
                   ["mistakes"])


def unlabelled_section(summary: Mapping[str, Any]) -> Section:
    """Without labels: the most predicted classes and how confident the predictions are."""
    rank, images = summary["rank"], summary["images"]
    paragraph = (f"{images:,} images predicted ({summary['variant']}) into {summary['classes_predicted']:,} of the "
                 f"{summary['classes']:,} {rank} classes; median confidence (probability of the top class) "
                 f"{fmt_fraction(summary.get('median_confidence'))}.")
    rows = [[c["name"], f"{c['images']:,}", fmt_fraction(c["images"] / images if images else None)]
            for c in summary.get("most_predicted", [])]
    return Section("Predictions", [paragraph], [Table([f"most predicted {rank}", "images", "share"], rows)],
                   ["confidence"])


def plot_confidence(summary: Mapping[str, Any]) -> bytes | None:
    histogram = summary.get("confidence_histogram") or {}
    edges, counts = histogram.get("edges"), histogram.get("counts")
    if not edges or not counts:
        return None
    figure = _new_figure(6.0, 3.0)
    axes = figure.add_subplot()
    axes.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="#4c72b0", edgecolor="white")
    axes.set_xlabel("probability of the predicted class")
    axes.set_ylabel("images")
    axes.set_xlim(0, 1)
    return _png(figure)


def _thumbnail(path: str) -> np.ndarray | None:
    try:
        image = load_rgb(path, THUMBNAIL_SIDE)  # as the model saw it: upright, 16-bit scaled
        image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
        return np.asarray(image)
    except IMAGE_ERRORS:
        return None


def plot_mistakes(mistakes: list[Mapping[str, Any]]) -> bytes | None:
    """Thumbnails of the mistakes with the true and predicted path; None when no file can be read."""
    shown = [(m, thumb) for m in mistakes if (thumb := _thumbnail(str(m["path"]))) is not None]
    if not shown:
        return None
    columns = min(MISTAKE_COLUMNS, len(shown))
    rows = math.ceil(len(shown) / columns)
    figure = _new_figure(PLOT_WIDTH / MISTAKE_COLUMNS * columns, 3.2 * rows)
    for i, (mistake, thumb) in enumerate(shown):
        axes = figure.add_subplot(rows, columns, i + 1)
        axes.imshow(thumb)
        axes.set_axis_off()
        true = mistake["true"].split(" / ")[-1]
        predicted = mistake["predicted"].split(" / ")[-1]
        caption = [*_wrapped(f"true: {true}"), *_wrapped(f"pred: {predicted}"), f"p = {mistake['probability']:.2f}"]
        axes.set_title("\n".join(caption), fontsize=8)
    return _png(figure)


def _wrapped(text: str) -> list[str]:
    return textwrap.wrap(text, CAPTION_CHARACTERS, break_on_hyphens=False) or [text]


def _shared_ancestor(distance: int | None, levels: Mapping[str, str]) -> str:
    return MISSING if distance is None else levels.get(str(distance), str(distance))


def distance_section(ranks: Mapping[str, Any]) -> Section:
    """How far up the tree the mistakes of each rank share an ancestor."""
    rows = []
    for rank, m in ranks.items():
        summary = m.get("hierarchical_distance")
        if not summary:
            continue
        mistakes = summary["mistakes"]
        spread = ", ".join(
            f"{summary['levels'][d]} {n / mistakes:.1%}" for d, n in summary["histogram"].items() if mistakes
        )
        rows.append([rank, f"{mistakes:,}", fmt_fraction(summary["mean"]), spread or MISSING])
    paragraph = (
        "Distance = ranks up to the first shared ancestor: 1 = same parent; "
        "one more than the ranks above when none is shared."
    )
    headers = ["rank", "mistakes", "mean distance", "first shared rank (share of mistakes)"]
    return Section("Hierarchical distance of mistakes", [paragraph], [Table(headers, rows)])


def throughput_section(throughput: Mapping[str, Any]) -> Section:
    labels = {"images_per_s": "images/s", "hardware": "hardware", "views": "TTA views", "batch_size": "batch size",
              "input_path": "input path (where JPEGs are decoded)", "decoder_routes.device": "images decoded on the device",
              "decoder_routes.pil": "images decoded with PIL (device decoder could not)", "decoder_routes.failed": "unreadable images"}
    rows = [(labels.get(key, key), value) for key, value in flatten(throughput)]
    return Section("Throughput", tables=[_key_value_table(rows)])


def build_sections(document: Mapping[str, Any]) -> list[Section]:
    """The report's sections, in reading order, from the JSON document: the answer first."""
    variants = document.get("variants") or {}
    if variants:
        primary = primary_variant(document)
        sections = [summary_section(variants, primary, document.get("primary_choice")),
                    run_section(document.get("context") or {})]
        sections.append(variants_section(variants, baseline_variant(document)))
    else:
        choice = document.get("primary_choice") or {}
        written = [f"submission.csv holds variant {choice['variant']} ({choice['reason']})."] if choice else []
        sections = [Section("Summary", [NO_LABELS, *written]), run_section(document.get("context") or {})]
    if document.get("taxonomy_disagreement"):
        sections.append(disagreement_section(document["taxonomy_disagreement"]))
    headline = document.get("headline")
    if variants and headline:
        sections[0].paragraphs[:0] = [text for text in (headline_statement(headline), headline_warning(headline)) if text]
        sections[0].notes += [note for note in (headline_note(headline),) if note]
    if variants:
        sections += failure_sections(variants[primary])
    if document.get("mistakes"):
        sections.append(mistakes_section(document["mistakes"]))
    if document.get("unlabelled_predictions"):
        sections.append(unlabelled_section(document["unlabelled_predictions"]))
    if document.get("throughput"):
        sections.append(throughput_section(document["throughput"]))
    others = {key: value for key, value in document.items() if key not in KNOWN_KEYS + ("title", "context")}
    if others:
        sections.append(Section("Other figures", tables=[_key_value_table(flatten(others))]))
    return sections


def failure_sections(ranks: Mapping[str, Any]) -> list[Section]:
    """Where the primary variant fails: worst and most confused finest classes, distance of mistakes."""
    finest, finest_metrics = list(ranks.items())[-1]
    return [
        worst_classes_section(finest, finest_metrics),
        confused_pairs_section(finest, finest_metrics),
        distance_section(ranks),
    ]


def primary_variant(document: Mapping[str, Any]) -> str:
    variants = document["variants"]
    primary = document.get("primary") or next(iter(variants))
    if primary not in variants:
        raise ValueError(f"primary variant {primary!r} is not among the variants {list(variants)}")
    return primary


def baseline_variant(document: Mapping[str, Any]) -> str:
    variants = document["variants"]
    baseline = document.get("baseline") or (DEFAULT_BASELINE if DEFAULT_BASELINE in variants else next(iter(variants)))
    if baseline not in variants:
        raise ValueError(f"baseline variant {baseline!r} is not among the variants {list(variants)}")
    return baseline


# ------------------------------------------------------------------ plots
def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _value(x: float | None) -> float:
    return float("nan") if x is None else x


def plot_per_rank(ranks: Mapping[str, Any], primary: str) -> bytes:
    """Grouped bars per rank: top-1, macro-F1 and the shot-group accuracies."""
    series = {"top-1": [_value(m.get("top1")) for m in ranks.values()],
              "macro-F1": [_value(m.get("macro_f1")) for m in ranks.values()]}
    for group in SHOT_GROUPS:
        series[f"{group}-shot"] = [_value((_groups(m).get(group) or {}).get("accuracy")) for m in ranks.values()]
    figure = _new_figure(PLOT_WIDTH, 3.8)
    _grouped_bars(figure.subplots(), list(ranks), series, f"{primary}: per rank")
    _legend_below(figure)
    return _png(figure)


def plot_variants(variants: Mapping[str, Any]) -> bytes:
    """Top-1 above macro-F1 of each variant at each rank: one above the other, so that the plot fits a narrow window."""
    ranks = _all_ranks(variants)
    figure = _new_figure(PLOT_WIDTH, 6.4)
    for axes, key, label in zip(figure.subplots(2, 1, sharex=True), ("top1", "macro_f1"), ("top-1", "macro-F1")):
        series = {
            name: [_value(by_rank.get(rank, {}).get(key)) for rank in ranks] for name, by_rank in variants.items()
        }
        _grouped_bars(axes, ranks, series, label)
    _legend_below(figure)
    return _png(figure)


def _grouped_bars(axes: Any, groups: list[str], series: Mapping[str, list[float]], title: str) -> None:
    width = 0.8 / max(1, len(series))
    positions = np.arange(len(groups))
    for i, (name, values) in enumerate(series.items()):
        axes.bar(positions + (i - (len(series) - 1) / 2) * width, values, width, label=name)
    axes.set_xticks(positions, groups)
    axes.set_ylim(0, 1)
    axes.set_title(title)
    axes.grid(axis="y", alpha=0.3)


def _legend_below(figure: Figure) -> None:
    """One legend under the plots, where it hides no bar, in as many columns as fit the figure's width."""
    handles, labels = figure.axes[0].get_legend_handles_labels()
    renderer = figure.canvas.get_renderer()
    for columns in range(min(len(labels), LEGEND_COLUMNS), 0, -1):
        legend = figure.legend(handles, labels, loc="outside lower center", ncol=columns, fontsize="small")
        if columns == 1 or legend.get_window_extent(renderer).width <= figure.bbox.width:
            return
        legend.remove()


def plot_f1_vs_count(rank: str, per_class: list[Mapping[str, Any]]) -> bytes | None:
    """Per-class F1 against training count (log x), with the mean F1 per count bin.

    Classes without training images have no place on a log axis and are left out.
    """
    points = [(c["train_count"], c["f1"]) for c in per_class if c["support"] > 0 and c.get("train_count")]
    if not points:
        return None
    counts, f1 = (np.array(values, dtype=float) for values in zip(*points))
    figure = _new_figure(6.0, 4.0)
    axes = figure.subplots()
    axes.scatter(counts, f1, s=8, alpha=0.4, label="class")
    edges = np.unique(np.geomspace(counts.min(), counts.max() + 1, num=12).round())
    bins = np.digitize(counts, edges)
    centres = [counts[bins == b].mean() for b in np.unique(bins)]
    axes.plot(centres, [f1[bins == b].mean() for b in np.unique(bins)], color="C3", marker="o", label="mean per bin")
    axes.set_xscale("log")
    axes.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axes.xaxis.set_minor_formatter(NullFormatter())
    axes.set_ylim(-0.02, 1.02)
    axes.set_xlabel("training images of the class")
    axes.set_ylabel("F1")
    axes.set_title(f"{rank}: F1 against training count")
    _legend_below(figure)
    return _png(figure)


def plot_confusion(rank: str, confusion: Mapping[str, Any] | None) -> bytes | None:
    """Heat-map of the confusion counts among the classes most involved in mistakes."""
    if not confusion or not confusion.get("classes"):
        return None
    matrix = np.array(confusion["matrix"], dtype=float)
    names = [name if len(name) <= 28 else name[:27] + "…" for name in confusion["names"]]
    size = 2.5 + 0.38 * len(names)
    figure = _new_figure(size + 1.5, size)
    axes = figure.subplots()
    image = axes.imshow(matrix, cmap="Blues")
    axes.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize="small")
    axes.set_yticks(range(len(names)), names, fontsize="small")
    axes.set_xlabel(f"predicted {rank}")
    axes.set_ylabel(f"true {rank}")
    for (i, j), count in np.ndenumerate(matrix):
        if count:
            axes.text(j, i, f"{int(count)}", ha="center", va="center", fontsize="x-small",
                      color="white" if count > matrix.max() / 2 else "black")
    figure.colorbar(image, ax=axes, shrink=0.8)
    return _png(figure)


def draw_plots(document: Mapping[str, Any]) -> dict[str, tuple[str, bytes]]:
    """``{key: (caption, PNG bytes)}`` for the plots the document has data for."""
    variants = document.get("variants") or {}
    if not variants:
        png = plot_confidence(document["unlabelled_predictions"]) if document.get("unlabelled_predictions") else None
        return {"confidence": ("Confidence of the predictions", png)} if png else {}
    primary = primary_variant(document)
    finest, finest_metrics = list(variants[primary].items())[-1]
    drawers: dict[str, tuple[str, Callable[[], bytes | None]]] = {
        "per_rank": (f"Per-rank accuracy ({primary})", lambda: plot_per_rank(variants[primary], primary)),
        "variants": ("Variants compared", lambda: plot_variants(variants)),
        "f1_vs_count": (f"{finest} F1 against training count",
                        lambda: plot_f1_vs_count(finest, finest_metrics.get("per_class", []))),
        "confusion": (
            f"Most confused {finest} classes", lambda: plot_confusion(finest, finest_metrics.get("confusion"))
        ),
    }
    if document.get("mistakes"):
        drawers["mistakes"] = ("Most confident mistakes: true and predicted finest class",
                               lambda: plot_mistakes(document["mistakes"]))
    plots = {}
    for key, (caption, draw) in drawers.items():
        png = draw()
        if png is not None:
            plots[key] = (caption, png)
    return plots


# -------------------------------------------------------------- rendering
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]<|#])")  # ">" only matters at a line start


def md_escape(text: str) -> str:
    return _MARKDOWN_SPECIAL.sub(r"\\\1", text).replace("\n", " ")


def anchor(title: str) -> str:
    """A heading's anchor as GitHub and common Markdown renderers make it: lower case, punctuation dropped, dashes."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def render_markdown(title: str, sections: list[Section], plots: Mapping[str, tuple[str, bytes]]) -> str:
    lines = [f"# {md_escape(title)}", "", "Contents:", ""]
    lines += [f"- [{md_escape(section.title)}](#{anchor(section.title)})" for section in sections] + [""]
    for section in sections:
        lines += [f"## {md_escape(section.title)}", ""]
        for paragraph in section.paragraphs:
            lines += [md_escape(paragraph), ""]
        for table in section.tables:
            lines += _markdown_table(table) + [""]
        for note in section.notes:
            lines += [md_escape(note), ""]
        for key in section.plots:
            if key in plots:
                lines += [f"![{md_escape(plots[key][0])}](plots/{key}.png)", ""]
    return "\n".join(lines)


def _markdown_table(table: Table) -> list[str]:
    if not table.rows:
        return ["(none)"]
    align = ["---:" if _is_numeric_column(table, i) else "---" for i in range(len(table.headers))]
    lines = ["| " + " | ".join(md_escape(h) for h in table.headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(md_escape(cell) for cell in row) + " |" for row in table.rows]
    return lines


_NUMERIC_CELL = re.compile(r"^[-+]?[\d.,]+( \(n=[\d,]+\))?%?$|^" + MISSING + "$")


def _is_numeric_column(table: Table, column: int) -> bool:
    cells = [row[column] for row in table.rows]
    return any(cell != MISSING for cell in cells) and all(_NUMERIC_CELL.match(cell) for cell in cells)


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 72rem;
       padding: 0 1rem; color: #1f2328; line-height: 1.45; }
h1 { font-size: 1.6rem; border-bottom: 1px solid #d0d7de; padding-bottom: .3rem; }
h2 { font-size: 1.25rem; margin-top: 2rem; border-bottom: 1px solid #eaeef2; padding-bottom: .2rem; }
table { border-collapse: collapse; margin: .6rem 0 1rem; font-size: .9rem; }
div.table { max-width: 100%; overflow-x: auto; }
th, td { border: 1px solid #d0d7de; padding: .25rem .6rem; text-align: left; }
th { background: #f6f8fa; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
span.interval { white-space: nowrap; }
tr:nth-child(even) td { background: #fbfcfd; }
figure { margin: .5rem 0 1.5rem; overflow-x: auto; }
figure img { max-width: none; border: 1px solid #eaeef2; }
figcaption, p.note { font-size: .9rem; color: #59636e; max-width: 48rem; }
p { max-width: 48rem; overflow-wrap: anywhere; }
nav.contents ul { margin: .3rem 0 1rem; padding-left: 1.2rem; columns: 2 16rem; }
@media (max-width: 760px) {
  body { margin: 1rem auto; padding: 0 .5rem; font-size: 1rem; }
  table { font-size: .85rem; }
  th, td { padding: .2rem .35rem; }
  nav.contents ul { columns: 1; }
}
"""


def render_html(title: str, sections: list[Section], plots: Mapping[str, tuple[str, bytes]]) -> str:
    body = [f"<h1>{html.escape(title)}</h1>", _html_contents(sections)]
    for section in sections:
        body.append(f'<section>\n<h2 id="{anchor(section.title)}">{html.escape(section.title)}</h2>')
        body += [f"<p>{_html_text(paragraph)}</p>" for paragraph in section.paragraphs]
        body += [_html_table(table) for table in section.tables]
        body += [f'<p class="note">{_html_text(note)}</p>' for note in section.notes]
        for key in section.plots:
            if key in plots:
                caption, png = plots[key]
                data = base64.b64encode(png).decode("ascii")
                body.append(
                    f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
                    f"<figcaption>{html.escape(caption)}</figcaption></figure>"
                )
        body.append("</section>")
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


_INTERVAL = re.compile(r"\[[-+]?[\d.,]+, [-+]?[\d.,]+\]")


def _html_text(text: str) -> str:
    """Escaped text whose intervals ("[0.18, 0.27]") never break over two lines."""
    return _INTERVAL.sub(lambda interval: f'<span class="interval">{interval[0]}</span>', html.escape(text))


def _html_cell(text: str) -> str:
    """An escaped table cell that may break after a "/" (file and class paths) but nowhere else inside a word."""
    return html.escape(text).replace("/", "/<wbr>")


def _html_contents(sections: list[Section]) -> str:
    links = "".join(f'<li><a href="#{anchor(s.title)}">{html.escape(s.title)}</a></li>' for s in sections)
    return f'<nav class="contents"><strong>Contents</strong>\n<ul>{links}</ul></nav>'


def _html_table(table: Table) -> str:
    if not table.rows:
        return "<p>(none)</p>"
    numeric = [_is_numeric_column(table, i) for i in range(len(table.headers))]
    css = [' class="num"' if is_numeric else "" for is_numeric in numeric]
    head = "".join(f"<th{c}>{html.escape(h)}</th>" for c, h in zip(css, table.headers))
    rows = [
        "<tr>" + "".join(f"<td{c}>{_html_cell(cell)}</td>" for c, cell in zip(css, row)) + "</tr>"
        for row in table.rows
    ]
    return ('<div class="table"><table>\n<thead><tr>' + head + "</tr></thead>\n<tbody>\n" + "\n".join(rows)
            + "\n</tbody>\n</table></div>")


# ------------------------------------------------------------------ entry
def write_report(
    metrics: Mapping[str, Any], out_dir: Path | str, title: str, context: Mapping[str, Any] | None = None
) -> dict[str, Path]:
    """Write metrics.json, report.md, report.html and plots/*.png under ``out_dir``.

    Args:
        metrics: see the module docstring; may hold no variants (unlabelled split).
        out_dir: created if missing.
        title: the report's heading.
        context: run directories, checkpoints, split, image count, TTA
            recipe, date...; shown first and stored in metrics.json.

    Returns:
        ``{"metrics": ..., "markdown": ..., "html": ..., <plot key>: ...}`` paths.
    """
    clashes = [key for key in ("title", "context") if key in metrics]
    if clashes:
        raise ValueError(f"metrics may not hold the keys {clashes}: write_report adds them")
    out_dir = Path(out_dir)
    document = to_jsonable({"title": title, "context": dict(context or {}), **metrics})
    paths = {"metrics": write_atomic(out_dir / "metrics.json", json.dumps(document, indent=2, allow_nan=False) + "\n")}
    sections = build_sections(document)
    plots = draw_plots(document)
    for key, (_, png) in plots.items():
        paths[key] = write_atomic(out_dir / "plots" / f"{key}.png", png)
    paths["markdown"] = write_atomic(out_dir / "report.md", render_markdown(title, sections, plots))
    paths["html"] = write_atomic(out_dir / "report.html", render_html(title, sections, plots))
    return paths
