"""What the report tells its reader: the headline with its interval, when (not) to doubt it, and a page that reads at 700 px."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import f1_score

from herbarium.evaluation import write_report
from herbarium.evaluation.metrics import macro_f1_interval
from herbarium.evaluation.report import anchor, build_sections, headline_note, headline_warning, md_escape
from herbarium.evaluation.runner import headline_figures
from herbarium.taxonomy import Taxonomy

from test_evaluation_report import labelled_metrics, taxonomy_with_awkward_names

NARROW_WINDOW = 700  # pixels


def split_of(images: int, classes: int, accuracies: dict[str, float], seed: int = 0) -> tuple[Taxonomy, dict]:
    """A two-rank taxonomy and ``outputs`` as the runner holds them: each variant right on about ``accuracy`` of the images."""
    taxonomy = Taxonomy.from_categories(
        [{"id": i, "genus": f"G{i // 2}", "species": f"s{i}"} for i in range(classes)], ("genus", "species"))
    rng = np.random.default_rng(seed)
    species = rng.integers(0, classes, images)
    genus = taxonomy.path_table().numpy()[species, 0]
    predictions = {name: {"species": np.where(rng.random(images) < accuracy, species, rng.integers(0, classes, images))}
                   for name, accuracy in accuracies.items()}
    return taxonomy, {"targets": np.stack([genus, species], axis=1), "predictions": predictions}


def scores_of(outputs: dict) -> dict[str, float]:
    truth = outputs["targets"][:, 1]
    return {name: f1_score(truth, p["species"], average="macro", zero_division=0)
            for name, p in outputs["predictions"].items()}


def test_macro_f1_interval_holds_scikit_learns_figure_and_narrows_with_more_images():
    rng = np.random.default_rng(0)
    widths = []
    for images in (180, 3000):
        truth = rng.integers(0, 20, images)
        predicted = np.where(rng.random(images) < 0.3, truth, rng.integers(0, 20, images))
        interval = macro_f1_interval(truth, predicted, resamples=300)
        assert interval["macro_f1"] == pytest.approx(f1_score(truth, predicted, average="macro", zero_division=0))
        assert interval["low"] < interval["macro_f1"] < interval["high"] and interval["images"] == images
        widths.append(interval["high"] - interval["low"])
    assert widths[1] < widths[0] / 2


def test_a_small_gap_on_a_small_split_is_a_note_not_a_warning():
    """0.22 against 0.23 on 180 images: within chance; the report says so and suggests no change."""
    taxonomy, outputs = split_of(180, 60, {"tta_consistent": 0.22, "tta_heads": 0.235})
    scores = scores_of(outputs)
    assert scores["tta_heads"] > scores["tta_consistent"]
    headline = headline_figures(outputs, taxonomy, "tta_consistent", scores)
    assert headline["best_other"]["variant"] == "tta_heads" and headline["best_other"]["low"] < 0
    assert headline_warning(headline) is None
    note = headline_note(headline)
    assert note.startswith("tta_heads scores higher on this split") and "cannot tell from chance" in note


def test_a_clear_win_on_the_split_warns_without_telling_to_choose_on_it():
    taxonomy, outputs = split_of(3000, 20, {"tta_consistent": 0.3, "tta_heads": 0.6})
    headline = headline_figures(outputs, taxonomy, "tta_consistent", scores_of(outputs))
    warning = headline_warning(headline)
    assert warning.startswith("Warning: on this split tta_heads is clearly better than the headline variant tta_consistent")
    assert "chosen on the validation split" in warning and "--primary" not in warning
    assert headline_note(headline) is None
    best = headline_figures(outputs, taxonomy, "tta_heads", scores_of(outputs))
    assert "best_other" not in best and headline_warning(best) is None and headline_note(best) is None


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """A report with a headline, long class names and mistakes with image files."""
    out_dir = tmp_path_factory.mktemp("report")
    for i in range(5):
        Image.new("RGB", (300, 200), (40 * i, 90, 120)).save(out_dir / f"m{i}.png")
    metrics = labelled_metrics(taxonomy_with_awkward_names())
    long_name = "Pseudognaphalium obtusifolium subsp. saxicola var. longissimum"
    metrics["mistakes"] = [{"image_id": i, "path": str(out_dir / f"m{i}.png"), "probability": 0.9,
                            "true": f"Asteraceae / Pseudognaphalium / {long_name}", "predicted": "Poaceae / Poa / Poa annua"}
                           for i in range(5)]
    metrics["headline"] = {"variant": "tta_consistent", "rank": "species", "macro_f1": 0.2221, "low": 0.1803,
                           "high": 0.2712, "images": 180, "resamples": 1000,
                           "best_other": {"variant": "tta_heads", "delta": 0.012, "low": -0.021, "high": 0.043}}
    return metrics, write_report(metrics, out_dir, "evaluation", {"split": "test"})


def test_the_report_states_the_headline_with_its_interval_first(page):
    metrics, paths = page
    statement = "Headline: species macro-F1 0.2221, 95% interval [0.1803, 0.2712] (bootstrap over the 180 labelled images)."
    page_text = re.sub(r"<[^>]+>", "", paths["html"].read_text())  # the interval sits in a span that keeps it on one line
    for text, escape in ((paths["markdown"].read_text(), md_escape), (page_text, str)):
        assert escape(statement) in text and escape("tta_heads scores higher on this split") in text
        assert "Warning" not in text and "--primary" not in text
    assert build_sections(metrics | {"title": "t", "context": {}})[0].paragraphs[0] == statement
    assert '95% interval <span class="interval">[0.1803, 0.2712]</span>' in paths["html"].read_text()


def test_a_warning_follows_the_headline_it_qualifies(page):
    metrics, _ = page
    clear_win = {"variant": "tta_heads", "delta": 0.2, "low": 0.05, "high": 0.35}
    document = metrics | {"title": "t", "context": {}, "headline": metrics["headline"] | {"best_other": clear_win}}
    paragraphs = build_sections(document)[0].paragraphs
    assert paragraphs[0].startswith("Headline: ") and paragraphs[1].startswith("Warning: ")


def test_the_report_opens_with_contents_linking_every_section(page):
    metrics, paths = page
    titles = [section.title for section in build_sections(metrics | {"title": "t", "context": {}})]
    markdown, html = paths["markdown"].read_text(), paths["html"].read_text()
    assert markdown.index("Contents:") < markdown.index("## Summary")
    assert html.index('<nav class="contents">') < html.index("<h2")
    for title in titles:
        assert f"](#{anchor(title)})" in markdown
        assert f'href="#{anchor(title)}"' in html and f'<h2 id="{anchor(title)}">' in html
    assert anchor("Worst species classes by F1") == "worst-species-classes-by-f1"


def test_the_page_reads_in_a_narrow_window(page):
    _, paths = page
    html = paths["html"].read_text()
    assert "@media (max-width: 760px)" in html
    # Wide tables scroll sideways in their box; numbers never wrap; paths break only after a "/".
    assert '<div class="table"><table>' in html and "div.table { max-width: 100%; overflow-x: auto; }" in html
    assert "white-space: nowrap" in html and "Asteraceae /<wbr> Pseudognaphalium /<wbr> " in html
    # Plots keep their size (labels legible) and scroll sideways when wider than the window.
    assert "figure img { max-width: none;" in html and "figure { margin: .5rem 0 1.5rem; overflow-x: auto; }" in html
    # Thumbnails fit the window unscaled, so their captions show at the size they were drawn.
    with Image.open(paths["mistakes"]) as thumbnails:
        assert thumbnails.width <= NARROW_WINDOW - 40
