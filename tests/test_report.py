"""The HTML report: rendered from real extraction results, opened in headless Chromium, and its errors."""
import copy
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
    assert dom.find("table", "rules")
    plots = dom.find("img", "plot")
    assert plots and all(attrs["src"].startswith("data:image/png;base64,") for attrs, _ in plots)
    spans = dom.find("span", "tok")
    highlighted = [attrs for attrs, up in spans if "data-act" in attrs and any("exemplar" in c.split() for _, c in up)]
    assert highlighted and any(float(a["data-act"]) > 0 for a in highlighted)
    assert any("data-dfa" in attrs for attrs, _ in spans)
    assert dom.find("span", "scored")


def test_report_content(report):
    page = report.read_text()
    assert page.isascii() and "<script" not in page
    assert not [attrs for attrs, _ in Elements(page).find("img", "plot") if not attrs["src"].startswith("data:")]
    dom = Elements(page)
    text = "".join(dom.text)
    assert "[If] … [then] → L0H0.0" in text and "[http] … [com] → L0H0.1 unless [twitter]" in text
    assert "1 of 4 features (25%) have a distractor key" in text
    assert len(dom.find("table", "summary")) == 1
    assert len(dom.find("table", "rules")) == 4 and len(dom.find("table", "insertion")) == 1
    assert len(dom.find("img", "plot")) == 1 + 4  # the head's F1 curves, then one plot per feature
    assert {a["id"] for t, a, _ in dom.elements if t == "section"} == {
        "head-L0H0", "feature-L0H0-0", "feature-L0H0-1", "feature-L0H0-2", "feature-L0H0-3"}


def test_layer_above_0_links_neuronpedia_and_everything_is_escaped(results_dir):
    (head,) = load_results(results_dir)
    head = copy.deepcopy(head)
    head["layer"] = 3
    head["features"] = head["features"][:1]  # one feature is enough, and keeps the three renders quick
    feature = head["features"][0]
    feature["rules"]["weights"]["text"] = ["[3-res-jb/1234] … [3-res-jb/77] → L3H0.0   (A=2, V=1)"]
    feature["exemplars"][0]["tokens"][1] = "<script>alert(1)</script>"
    page = render_report([head])
    assert "https://neuronpedia.org/gpt2-small/3-res-jb/1234" in page
    assert "https://neuronpedia.org/gpt2-small/3-res-jb/77" in page
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
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
