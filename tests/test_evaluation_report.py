"""The report files and the submission/prediction CSVs of herbarium.evaluation."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch

from herbarium.evaluation import (
    consistent_predictions,
    evaluate_predictions,
    independent_predictions,
    taxonomy_disagreement,
    top_k_probabilities,
    write_predictions,
    write_report,
    write_submission,
)
from herbarium.taxonomy import Taxonomy

RANKS = ("family", "genus", "species")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def taxonomy_with_awkward_names() -> Taxonomy:
    """Six species in three genera; one name needs HTML and Markdown escaping."""
    species = ["Poa <script>alert(1)</script>", "Poa annua", "Carex | flava", "Carex nigra", "Acer rubrum", "Acer_saccharum"]
    genera = ["Poa", "Poa", "Carex", "Carex", "Acer", "Acer"]
    families = ["Poaceae", "Poaceae", "Cyperaceae", "Cyperaceae", "Sapindaceae", "Sapindaceae"]
    records = [
        {"id": 100 + i, "family": f, "genus": g, "species": s}
        for i, (f, g, s) in enumerate(zip(families, genera, species))
    ]
    return Taxonomy.from_categories(records, RANKS)


def labelled_metrics(taxonomy: Taxonomy) -> dict:
    """Three variants evaluated on 60 synthetic images."""
    generator = torch.Generator().manual_seed(0)
    species_true = torch.arange(60) % 6
    paths = taxonomy.path_table()
    y_true = {rank: paths[species_true, i] for i, rank in enumerate(RANKS)}
    counts = {rank: taxonomy.counts([100, 100, 100, 101, 102, 103, 103, 104, 105, 105], rank) for rank in RANKS}
    variants, disagreement = {}, {}
    for name, noise in (("single_view_heads", 2.5), ("tta_heads", 1.5)):
        scores = {
            rank: torch.randn(60, taxonomy.num_classes(rank), generator=generator) * noise
            + torch.nn.functional.one_hot(y_true[rank], taxonomy.num_classes(rank)) * 2.0
            for rank in RANKS
        }
        predictions = independent_predictions(scores)
        variants[name] = evaluate_predictions(y_true, predictions, scores, taxonomy, counts)
        disagreement[name] = taxonomy_disagreement(predictions, taxonomy)
        if name == "tta_heads":
            consistent = consistent_predictions(scores, taxonomy)
            variants["tta_consistent"] = evaluate_predictions(y_true, consistent, scores, taxonomy, counts)
    return {
        "variants": variants,
        "primary": "tta_consistent",
        "taxonomy_disagreement": disagreement,
        "throughput": {"images_per_s": 1234.5, "hardware": "2-core CPU", "views": 4, "batch_size": 32},
    }


CONTEXT = {"split": "val", "images": 60, "checkpoints": [Path("runs/a/checkpoints/best.pt")], "tta": "4 views"}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    taxonomy = taxonomy_with_awkward_names()
    out_dir = tmp_path_factory.mktemp("report")
    metrics = labelled_metrics(taxonomy)
    return metrics, write_report(metrics, out_dir, "Grocery <val> & co", CONTEXT)


def test_report_writes_every_file_and_the_plots_are_pngs(report):
    _, paths = report
    assert {"metrics", "markdown", "html", "per_rank", "variants", "f1_vs_count", "confusion"} <= set(paths)
    for key in ("per_rank", "variants", "f1_vs_count", "confusion"):
        assert paths[key].read_bytes().startswith(PNG_MAGIC)
    assert not list(paths["html"].parent.glob(".*.tmp"))  # no temporary files left behind


def test_metrics_json_holds_the_metrics_and_the_context(report):
    metrics, paths = report
    document = json.loads(paths["metrics"].read_text())
    assert document["title"] == "Grocery <val> & co"
    assert document["context"]["checkpoints"] == ["runs/a/checkpoints/best.pt"]
    assert document["variants"]["tta_consistent"]["species"]["macro_f1"] == metrics["variants"]["tta_consistent"]["species"]["macro_f1"]
    assert document["throughput"]["images_per_s"] == 1234.5


def test_markdown_and_html_carry_the_numbers_of_metrics_json(report):
    _, paths = report
    document = json.loads(paths["metrics"].read_text())
    markdown, page = paths["markdown"].read_text(), paths["html"].read_text()
    primary = document["variants"]["tta_consistent"]["species"]
    baseline = document["variants"]["single_view_heads"]["species"]
    expected = [
        f"{primary['macro_f1']:.4f}",
        f"{primary['top1']:.4f}",
        f"{primary['top5']:.4f}",
        f"{primary['macro_f1'] - baseline['macro_f1']:+.4f}",  # gain over the single view
        f"{document['taxonomy_disagreement']['tta_heads']:.4f}",
        "1,234.5",
        "2-core CPU",
    ]
    for text in expected:
        assert text in markdown and text in page, text
    # The summary table comes before the variants comparison.
    assert page.index("Summary") < page.index("Variants") < page.index("Throughput")


def test_tables_show_class_names_escaped(report):
    _, paths = report
    markdown, page = paths["markdown"].read_text(), paths["html"].read_text()
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "Grocery &lt;val&gt; &amp; co" in page
    assert "Carex \\| flava" in markdown and "Acer\\_saccharum" in markdown
    assert "Carex nigra" in page  # names, not indices


def test_html_is_self_contained(report):
    _, paths = report
    page = paths["html"].read_text()
    links = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)""", page)
    assert links and all(link.startswith(("data:image/png;base64,", "#")) for link in links)  # images, contents
    assert "http://" not in page and "https://" not in page
    assert "<style>" in page


def test_report_on_an_unlabelled_split(tmp_path):
    metrics = {
        "throughput": {"images_per_s": 987.6, "hardware": "1x H100", "views": 1, "batch_size": 256},
        "predictions": {"images": 2485, "file": "predictions.csv"},
    }
    paths = write_report(metrics, tmp_path, "Test split", {"split": "test"})
    assert set(paths) == {"metrics", "markdown", "html"}
    markdown, page = paths["markdown"].read_text(), paths["html"].read_text()
    for text in ("987.6", "1x H100", "2,485", "No labels"):
        assert text in markdown and text in page
    assert json.loads(paths["metrics"].read_text())["predictions"]["images"] == 2485


def test_report_rejects_an_unknown_primary_variant(tmp_path):
    metrics = labelled_metrics(taxonomy_with_awkward_names())
    metrics["primary"] = "nope"
    with pytest.raises(ValueError, match="tta_consistent"):
        write_report(metrics, tmp_path, "t", {})


# --------------------------------------------------------------- submission
def test_submission_has_one_row_per_image_with_category_ids(tmp_path):
    taxonomy = taxonomy_with_awkward_names()
    path = write_submission(tmp_path / "submission.csv", [7, 8, 9], torch.tensor([5, 0, 2]), taxonomy)
    rows = list(csv.reader(path.open()))
    assert rows == [["Id", "Predicted"], ["7", "105"], ["8", "100"], ["9", "102"]]
    assert [p.name for p in tmp_path.iterdir()] == ["submission.csv"]


def test_submission_rejects_mismatched_or_repeated_ids_and_bad_indices(tmp_path):
    taxonomy = taxonomy_with_awkward_names()
    with pytest.raises(ValueError, match="2 image ids but 3"):
        write_submission(tmp_path / "s.csv", [1, 2], [0, 1, 2], taxonomy)
    with pytest.raises(ValueError, match="repeat"):
        write_submission(tmp_path / "s.csv", [1, 1], [0, 1], taxonomy)
    with pytest.raises(ValueError, match="outside"):
        write_submission(tmp_path / "s.csv", [1], [6], taxonomy)
    assert not (tmp_path / "s.csv").exists()


def test_predictions_file_lists_names_and_the_finest_top_k(tmp_path):
    taxonomy = taxonomy_with_awkward_names()
    finest_scores = torch.log(torch.tensor([[0.5, 0.3, 0.1, 0.05, 0.03, 0.02], [0.0, 0.0, 0.0, 0.1, 0.2, 0.7]]) + 1e-12)
    preds = {"genus": torch.tensor([2, 0]), "species": torch.tensor([0, 5])}
    probabilities, indices = top_k_probabilities(finest_scores, 2)
    path = write_predictions(tmp_path / "p.csv", ["a", "b"], preds, indices, probabilities, taxonomy)
    rows = list(csv.DictReader(path.open()))
    assert list(rows[0]) == ["image_id", "genus", "species", "category_id",
                             "top1_category_id", "top1_prob", "top2_category_id", "top2_prob"]
    assert rows[0]["genus"] == "Poa" and rows[0]["species"] == "Poa <script>alert(1)</script>"
    assert (rows[1]["category_id"], rows[1]["top1_category_id"], rows[1]["top2_category_id"]) == ("105", "105", "104")
    assert float(rows[0]["top1_prob"]) == pytest.approx(0.5, abs=1e-5)
    assert float(rows[1]["top2_prob"]) == pytest.approx(0.2, abs=1e-5)
