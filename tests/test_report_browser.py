"""report.html laid out by a real headless browser, in a wide (1400 px) and a narrow (700 px) window.

The report is that of a real evaluation of the tiny run, rendered again with
one species given a long name and a variant clearly better on the split (so
the headline has a warning to come before). A measuring script injected into
a copy of the page writes what the browser laid out into the DOM, which
``--dump-dom`` hands back: no number or interval broken over two lines, no
word of a table cut in two, the headline before the warning, every plot at
the size it was drawn (its labels and captions as legible as drawn), and no
page wider than the window (wide tables and plots scroll in their own box).

Marked ``browser`` and skipped without Chromium or Chrome (``$HERBARIUM_BROWSER``
or ``chromium``, ``chromium-browser``, ``google-chrome`` on PATH). With
``HERBARIUM_SCREENSHOTS=DIR`` the full-page screenshots are saved in DIR.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from herbarium.evaluation import write_report
from herbarium.evaluation.runner import evaluate
from herbarium.evaluation.settings import EvaluationSettings

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
BROWSER_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync")
WINDOWS = (1400, 700)  # pixels wide
LONG_NAME = "Pseudognaphalium obtusifolium subsp. saxicola var. longissimum"
WORD_BREAKS = "/"  # the only place a word of a table may break: file and class paths, between their parts


def find_browser() -> str | None:
    """$HERBARIUM_BROWSER (a name on PATH or a file), else the first Chromium or Chrome on PATH."""
    named = os.environ.get("HERBARIUM_BROWSER")
    if named:
        return shutil.which(named) or (named if Path(named).is_file() else None)
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


BROWSER = find_browser()
NO_BROWSER = (f"no headless browser: HERBARIUM_BROWSER={os.environ['HERBARIUM_BROWSER']} is neither a command nor a file"
              if os.environ.get("HERBARIUM_BROWSER") else
              "no headless browser: set HERBARIUM_BROWSER or put chromium, chromium-browser or google-chrome on PATH")
pytestmark = [pytest.mark.browser, pytest.mark.skipif(BROWSER is None, reason=NO_BROWSER)]

# Runs once the page and its images have loaded; writes its findings as JSON into <pre id="measured">.
MEASURE = """
<script>
addEventListener("load", () => {
  const lines = range => {  // distinct line boxes a range lies on
    const tops = [...range.getClientRects()].filter(box => box.width > 0).map(box => box.top)
      .sort((a, b) => a - b);
    return tops.filter((top, i) => i === 0 || top - tops[i - 1] > 2).length;
  };
  const spanOf = (node, start, end) => { const r = document.createRange(); r.setStart(node, start); r.setEnd(node, end); return r; };
  const contentsOf = element => { const r = document.createRange(); r.selectNodeContents(element); return r; };
  const textNodes = root => {
    const walker = document.createTreeWalker(root, NodeFilter.SHOW_TEXT), nodes = [];
    while (walker.nextNode()) nodes.push(walker.currentNode);
    return nodes;
  };
  const matches = (root, pattern) => textNodes(root).flatMap(node =>
    [...node.data.matchAll(pattern)].map(m => ({text: m[0], lines: lines(spanOf(node, m.index, m.index + m[0].length))})));
  const number = /^[-+]?[\\d.,]+%?( \\(n=[\\d,]+\\))?$/;
  const cells = [...document.querySelectorAll("td, th")];
  const fits = element => element.scrollWidth <= element.clientWidth + 1;
  const scrolls = element => ["auto", "scroll"].includes(getComputedStyle(element).overflowX);
  const summary = document.querySelector("section");
  const measured = {
    window: innerWidth,
    view_width: document.documentElement.clientWidth,
    page_width: document.documentElement.scrollWidth,
    page_height: document.documentElement.scrollHeight,
    wrapped_numbers: cells.filter(c => number.test(c.textContent.trim()) && lines(contentsOf(c)) > 1).map(c => c.textContent),
    broken_words: cells.flatMap(c => matches(c, /[^\\s/]+/g)).filter(m => m.lines > 1).map(m => m.text),
    broken_intervals: matches(document.body, /\\[[^\\[\\]]*\\]/g).filter(m => m.lines > 1).map(m => m.text),
    summary_paragraphs: [...summary.querySelectorAll("p")].map(p => p.textContent.split(":")[0]),
    plots: [...document.querySelectorAll("figure img")].map(img => ({
      alt: img.alt, drawn: img.naturalWidth, shown: img.getBoundingClientRect().width,
      reachable: fits(img.parentElement) || scrolls(img.parentElement)})),
    unreachable_tables: [...document.querySelectorAll("table")].filter(t => !(fits(t.parentElement) || scrolls(t.parentElement)))
      .map(t => t.querySelector("th").textContent),
    overflowing_text: [...document.querySelectorAll("figcaption, p, h1, h2, nav")].filter(e => !fits(e))
      .map(e => e.textContent.slice(0, 60)),
  };
  const out = document.createElement("pre");
  out.id = "measured";
  out.textContent = JSON.stringify(measured);
  document.body.append(out);
});
</script>
"""


def browse(page: Path, width: int, height: int, profile: Path, *action: str) -> str:
    """Run the browser on ``page`` in a ``width`` x ``height`` window; its stdout."""
    done = subprocess.run([BROWSER, *BROWSER_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
                           *action, page.as_uri()], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def measure(report: Path, width: int, profile: Path) -> dict:
    """What the browser laid out for ``report`` in a window ``width`` px wide (see MEASURE)."""
    probe = report.with_name(f"measure-{width}.html")
    probe.write_text(report.read_text().replace("</body>", MEASURE + "</body>"))
    dom = browse(probe, width, 2000, profile, "--dump-dom")
    found = re.search(r'<pre id="measured">(.*?)</pre>', dom, re.S)
    assert found, "the measuring script did not run"
    return json.loads(html.unescape(found.group(1)))


@pytest.fixture(scope="module")
def report(tiny_run, tmp_path_factory) -> Path:
    """report.html of the tiny run's test split, one species renamed LONG_NAME, another variant clearly better."""
    data, run_dir = tiny_run
    evaluated = tmp_path_factory.mktemp("evaluation")
    settings = EvaluationSettings(views=("plain", "flip"), workers=0, device="cpu", batch_size=8)
    evaluate([run_dir], data, "test", out=evaluated, settings=settings)
    text = (evaluated / "metrics.json").read_text()
    document = json.loads(text)
    mistaken = document["mistakes"][0]["true"].split(" / ")[-1]  # shown in the tables, the confusion matrix, the thumbnails
    for old, new in ((f'"{mistaken}"', f'"{LONG_NAME}"'), (f' / {mistaken}"', f' / {LONG_NAME}"')):  # the name, its paths
        text = text.replace(old, new)
    document = json.loads(text)
    title, context = document.pop("title"), document.pop("context")
    other = next(name for name in document["variants"] if name != document["primary"])
    document["headline"]["best_other"] = {"variant": other, "delta": 0.2, "low": 0.05, "high": 0.35}
    out = tmp_path_factory.mktemp("report")
    paths = write_report(document, out, title, context)
    page = paths["html"].read_text()
    assert LONG_NAME in page and "Warning: " in page and {"confusion", "mistakes"} <= set(paths)
    return paths["html"]


@pytest.fixture(scope="module", params=WINDOWS, ids=lambda width: f"{width}px")
def layout(request, report, tmp_path_factory) -> dict:
    width = request.param
    profile = tmp_path_factory.mktemp("profile")
    measured = measure(report, width, profile)
    assert measured["window"] == width
    screenshots = os.environ.get("HERBARIUM_SCREENSHOTS")
    if screenshots:
        Path(screenshots).mkdir(parents=True, exist_ok=True)
        shot = Path(screenshots).resolve() / f"report-{width}px.png"
        browse(report, width, measured["page_height"], profile, f"--screenshot={shot}")
        assert shot.is_file()
    return measured


def test_numbers_and_intervals_stay_on_one_line(layout):
    assert layout["wrapped_numbers"] == []
    assert layout["broken_intervals"] == []


def test_no_word_of_a_table_is_cut_in_two(layout):
    assert layout["broken_words"] == []


def test_the_headline_comes_before_the_warning(layout):
    paragraphs = layout["summary_paragraphs"]
    assert paragraphs[0] == "Headline" and "Warning" in paragraphs


def test_plots_are_shown_at_the_size_they_were_drawn(layout):
    """Scaled down, the labels of the confusion matrix and the captions under the thumbnails would shrink with them."""
    assert len(layout["plots"]) >= 5
    for plot in layout["plots"]:
        assert plot["shown"] >= plot["drawn"] - 1 and plot["reachable"], plot


def test_the_page_never_scrolls_sideways(layout):
    """Wide tables and plots scroll in their own box; the text around them stays in the window."""
    assert layout["page_width"] <= layout["view_width"]
    assert layout["unreachable_tables"] == [] and layout["overflowing_text"] == []
