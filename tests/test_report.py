"""The HTML report: rendered from real extraction results, opened in headless Chromium, and its errors."""
import base64
import copy
import html
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser

import matplotlib.image
import pytest

from attnrules.cli import main
from attnrules.report import load_results, render_report, write_report

CHROMIUM = shutil.which("chromium")
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class Elements(HTMLParser):
    """Every element as (tag, attrs, ancestors), ancestors being (tag, class) pairs; and all text."""

    def __init__(self, page: str):
        super().__init__()
        self.elements, self.stack, self.text = [], [], []
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.elements.append((tag, attrs, list(self.stack)))
        if tag not in VOID:
            self.stack.append((tag, attrs.get("class") or ""))

    def handle_endtag(self, tag):
        while self.stack and self.stack.pop()[0] != tag:
            pass

    def handle_data(self, data):
        self.text.append(data)

    def find(self, tag, cls):
        return [(attrs, up) for t, attrs, up in self.elements if t == tag and cls in (attrs.get("class") or "").split()]


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("extract")
    assert main(["extract", "--head", "0", "--max-rules", "16", "--exhaustive-k", "0", "--quiet", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def report(results_dir):
    return write_report(results_dir)


def chromium(*args, tmp_path):
    """Run headless Chromium offline and in isolation from any user profile."""
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (scripts/test.sh installs Debian's package with apt-get)")
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout


@pytest.mark.slow
def test_report_renders_in_chromium(report, tmp_path):
    assert report.name == "report.html" and report.parent.name.startswith("extract")
    url = report.resolve().as_uri()
    shot = tmp_path / "shot.png"
    chromium(f"--screenshot={shot}", "--window-size=1280,2000", url, tmp_path=tmp_path)
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (2000, 1280) and pixels.std() > 0.05  # not a blank page

    dom = Elements(chromium("--dump-dom", url, tmp_path=tmp_path))
    assert dom.find("table", "rules") and dom.find("table", "sortable")
    plots = dom.find("img", "plot")
    assert plots and all(attrs["src"].startswith("data:image/png;base64,") for attrs, _ in plots)
    spans = dom.find("span", "tok")
    highlighted = [attrs for attrs, up in spans if "data-act" in attrs and any("exemplar" in c.split() for _, c in up)]
    assert highlighted and any(float(a["data-act"]) > 0 for a in highlighted)
    assert any("data-dfa" in attrs for attrs, _ in spans)
    assert dom.find("span", "scored")
    # the rule's terms marked where they fire, the hover naming the term
    keys = [attrs for attrs, _ in dom.find("span", "match-key") if "data-act" in attrs]
    assert any("key of [If] … [then] (weights #1" in a["title"] for a in keys)
    assert all("query of" in a["title"] for a, _ in dom.find("span", "match-query") if "data-act" in a)
    # a pattern negative beside the positives, its distractor marked
    assert [attrs for t, attrs, _ in dom.elements if t == "div" and "negative" in (attrs.get("class") or "").split()]
    marked = [a for a, up in dom.find("span", "cond-distractor") if any("negative" in c.split() for _, c in up)]
    assert marked and all("distractor" in a["title"] for a in marked)  # the distractor of a pattern negative


@pytest.mark.slow
def test_sortable_tables_sort_in_chromium(report, tmp_path):
    """Click a column of the summary table (an added script does, after the report's own) and read the DOM."""
    page = report.read_text()
    click = ('<script>var th = document.querySelectorAll("table.summary thead th");'
             'th[0].click(); th[0].click();</script></body>')  # twice: descending by feature name
    sorted_page = tmp_path / "sorted.html"
    sorted_page.write_text(page.replace("</body>", click, 1))
    dom = Elements(chromium("--dump-dom", sorted_page.resolve().as_uri(), tmp_path=tmp_path))
    names = [attrs["href"] for t, attrs, up in dom.elements
             if t == "a" and attrs.get("href", "").startswith("#feature-") and any(c == "summary sortable" for _, c in up)]
    assert names == sorted(names, reverse=True) and len(names) == 4
    headers = [attrs for t, attrs, up in dom.elements if t == "th" and any(c == "summary sortable" for _, c in up)]
    assert headers[0].get("data-order") == "desc" and "data-order" not in headers[1]


def test_report_content(report):
    page = report.read_text()
    assert page.isascii() and page.count("<script") == 1 and "<script src" not in page  # one inline script
    assert "<link" not in page and "http://" not in page  # nothing fetched
    assert not [attrs for attrs, _ in Elements(page).find("img", "plot") if not attrs["src"].startswith("data:")]
    dom = Elements(page)
    text = "".join(dom.text)
    assert "[If] … [then] → L0H0.0" in text and "[http] … [com] → L0H0.1 unless [twitter]" in text
    assert "1 of 4 features (25%) have a distractor key" in text
    assert len(dom.find("table", "summary")) == 1 and dom.find("table", "summary")[0][0]["class"] == "summary sortable"
    assert len(dom.find("table", "rules")) == 4 and len(dom.find("table", "insertion")) == 1
    assert len(dom.find("img", "f1-curves")) == 1 and len(dom.find("img", "metrics")) == 4  # head, then per feature
    assert {a["id"] for t, a, _ in dom.elements if t == "section"} == {
        "head-L0H0", "feature-L0H0-0", "feature-L0H0-1", "feature-L0H0-2", "feature-L0H0-3"}
    # the head's attention metrics and the input features its rules name, described from the corpus
    assert "previous-token score" in text and dom.find("table", "inputs")
    # rules: terms that cannot contribute are left out, and counted; A, V and A×V in columns
    assert "7 of 8 stored terms left out" in text
    # P/R/F1 on random and on pattern negatives: the summary names both
    # per feature: the activation histogram over the corpus, and exemplars across the activation deciles
    assert len(dom.find("img", "histogram")) == 4 and "decile 1: sequence" in text and "decile 10: sequence" in text
    assert "best F1 @ N, weights (random · pattern negatives)" in text and "best F1 @ N, combined set" in text
    # L0H0.1 (absence): its skip-gram terms fall short on pattern negatives, the combined set does not
    (row,) = [r for r in page.split("<tr>") if 'href="#feature-L0H0-1"' in r]
    cells = [html.unescape(c) for c in re.findall(r'<td class="num" title="[^"]*">([^<]*)</td>', row)]
    weights, combined = cells[0], cells[3]
    assert weights.startswith("1 @") and float(weights.split(" · ")[1].split(" @")[0]) < 1
    assert combined.split(" · ")[1].startswith("1 @")


def test_layer_above_0_links_neuronpedia_and_everything_is_escaped(results_dir):
    (head,) = load_results(results_dir)
    head = copy.deepcopy(head)
    head["layer"] = 3
    head["features"] = head["features"][:1]  # one feature is enough, and keeps the three renders quick
    feature = head["features"][0]
    term = feature["rules"]["weights"]["terms"][0]  # as described from the corpus, and as a bare id
    term["key_desc"], term["query_desc"] = '" vehicle" (3-res-jb/1234)', "3-res-jb/77"
    feature["absence"] = [{"text": '[" a" (3-res-jb/5)] … [3-res-jb/77] → L3H0.0 unless [3-res-jb/9]'}]
    feature["exemplars"][0]["tokens"][1] = "<script>alert(1)</script>"
    page = render_report([head])
    for j in (1234, 77, 5, 9):
        assert f'<a href="https://neuronpedia.org/gpt2-small/3-res-jb/{j}"' in page
    assert page.count("<script>") == 1 and "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # only the report's own
    head["metadata"]["model"] = "gemma-2-2b"
    assert "https://neuronpedia.org/gemma-2-2b/3-res-jb/1234" in render_report([head])
    head["layer"] = 0
    assert "neuronpedia.org" not in render_report([head])  # layer 0 shows token descriptions


def test_a_head_folder_works_alone_and_out_is_respected(results_dir, tmp_path):
    out = write_report(results_dir / "L0H0", tmp_path / "sub" / "mine.html")
    assert out == tmp_path / "sub" / "mine.html" and "Head L0H0" in out.read_text()


def test_errors_name_the_argument_or_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="RESULTS_DIR .*missing does not exist"):
        write_report(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no results.json in RESULTS_DIR"):
        write_report(tmp_path)
    bad = tmp_path / "L0H0" / "results.json"
    bad.parent.mkdir()
    bad.write_text('{"layer": 0, "head": ')
    with pytest.raises(ValueError, match=re.escape(f"{bad} is not valid JSON")):
        write_report(tmp_path)
    bad.write_text(json.dumps({"layer": 0}))
    with pytest.raises(ValueError, match="missing head, features"):
        write_report(tmp_path)
    with pytest.raises(IsADirectoryError, match="--out"):
        write_report(tmp_path, tmp_path)
    assert not (tmp_path / "report.html").exists()


def test_whole_model_view_links_every_head_and_its_point(results_dir):
    (head,) = load_results(results_dir)
    other = copy.deepcopy(head)
    other["head"] = 1
    other["metadata"]["head_metrics"] = {**head["metadata"]["head_metrics"], "head": 1, "prev_token": 0.9}
    other["features"] = [f for f in other["features"] if f["name"] != "L0H0.0"]  # a different count
    dom = Elements(render_report([head, other]))
    (model,) = [a for t, a, _ in dom.elements if t == "section" and a.get("id") == "model"]
    rows = [a["href"] for t, a, up in dom.elements if t == "a" and any(c == "heads sortable" for _, c in up)]
    assert rows == ["#head-L0H0", "#head-L0H1"]
    areas = {a["href"] for t, a, _ in dom.elements if t == "area"}
    assert areas == {"#head-L0H0", "#head-L0H1"}  # both panels' points link to the heads
    (scatter,) = [a for a, _ in dom.find("img", "heads-scatter") if a.get("usemap") == "#heads-map"]
    pixels = matplotlib.image.imread(io.BytesIO(base64.b64decode(scatter["src"].split(",", 1)[1])), format="png")
    for t, a, _ in dom.elements:  # each link's circle is centred on a drawn point, not on the white background
        if t == "area":
            x, y, _r = map(int, a["coords"].split(","))
            assert pixels[y, x, :3].min() < 0.95, a
    text = "".join(dom.text)
    assert "0.9" in text and "previous-token score" in text
    # the share of good features is the report's own reading of the sweeps: check it against them
    from attnrules.report import head_summary
    summary = head_summary(head)
    best = [max(p["f1"] for p in f["sweep"] if p.get("negatives", "random") == "random" and p["f1"] is not None)
            for f in head["features"]]
    assert summary["good_random"] == sum(b >= 0.8 for b in best) / len(best)
    assert summary["counting"] == 0 and summary["distractor_share"] == 0.25


def test_repr_html_renders_the_head_section(results_dir):
    import attnrules

    result = attnrules.load_results(results_dir / "L0H0")
    page = result._repr_html_()
    dom = Elements(page)
    assert {a["id"] for t, a, _ in dom.elements if t == "section"} == {
        "head-L0H0", "feature-L0H0-0", "feature-L0H0-1", "feature-L0H0-2", "feature-L0H0-3"}
    assert dom.find("table", "rules") and dom.find("style", "") is not None and page.isascii()


def test_a_sweep_folder_reads_its_shards(results_dir, tmp_path):
    shutil.copytree(results_dir / "L0H0", tmp_path / "shards" / "L0H0")
    assert "Head L0H0" in write_report(tmp_path).read_text()


def test_counting_response_is_plotted(results_dir):
    (head,) = load_results(results_dir)
    head = copy.deepcopy(head)
    head["features"] = head["features"][:1]
    head["features"][0]["counting"] = {
        "text": "count([games]) ≥ 2 → L0H0.0", "kind": "threshold", "threshold": 2, "feature_name": "L0H0.0",
        "evidence": {"counts": [[0, 0], [1, 0], [2, 0], [3, 0]], "mean_act": [0.0, 0.0, 0.3, 0.5],
                     "active_share": [0.0, 0.0, 1.0, 1.0]}}
    dom = Elements(render_report([head]))
    assert len(dom.find("img", "counting-response")) == 1 and len(dom.find("table", "counting")) == 1


def test_results_written_before_these_views_still_render():
    """Head results saved by an earlier attnrules (tests/fixtures/old_path: no pattern negatives, head metrics,
    histograms or matches) render, whole-model view included, with what they have."""
    from pathlib import Path

    from attnrules.report import check_results

    folder = Path(__file__).parent / "fixtures" / "old_path"
    heads = [check_results(json.loads((folder / f"{name}.json").read_text()), name) for name in ("glyph_h0", "glyph_h1")]
    dom = Elements(render_report(heads))
    assert len(dom.find("table", "heads")) == 1 and len(dom.find("table", "summary")) == 2
    assert not dom.find("div", "negative") and not dom.find("img", "histogram")
