"""One self-contained HTML report of ``attnrules extract`` results.

The report reads the ``results.json`` of each head folder (an ``extract`` output, or a ``sweep``
output's ``shards/``) and writes a single HTML file with inline CSS, plots embedded as base64 PNGs and
one small inline script (sortable tables), so it opens offline and can be mailed or archived as one
file. With several heads: a whole-model view (head metrics table and scatter plot, each head linking
to its section). Per head: its attention metrics, a sortable feature overview and the F1-vs-N curves,
and the input features its rules name, described from the corpus; per feature: its rules (A, V, A×V),
precision/recall/F1 vs N on random and pattern negatives, the activation histogram over the corpus,
the counting response, exemplars (top-activating, pattern negatives, activation deciles) with the
tokens the rule terms match marked, and the distractor and counting evidence.
"""
from __future__ import annotations

import base64
import html
import io
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Optional

from matplotlib.figure import Figure

from attnrules.files import write_atomic
from attnrules.rules.term_table import format_number, term_rows

METHODS = ("weights", "importance", "exact")  # orderings; "exact" only when exact mode ran
METRICS = ("precision", "recall", "f1")
NEGATIVES = ("random", "pattern")  # REF's random inactive sequences; positions where the rule's terms match
GOOD_F1 = 0.8  # the whole-model view counts features whose best rule set reaches this F1
DEFAULT_MODEL = "gpt2-small"  # Neuronpedia model id when the results do not name one
# A Neuronpedia input id above layer 0, "{sae id}/{feature index}" (e.g. "3-res-jb/1234"), as rule text
# shows it: "[3-res-jb/1234]" or, described from the corpus, '[" vehicle" (3-res-jb/1234)]'.
NEURONPEDIA_ID = re.compile(r"(?<=[\[(])([A-Za-z0-9_.-]+/\d+)(?=[\])])")

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 2px solid #888; margin-top: 2em; }
h3 { border-bottom: 1px solid #ccc; margin-top: 1.8em; } h4 { margin: 1em 0 0.3em; }
table { border-collapse: collapse; margin: 0.4em 0; }
th, td { border: 1px solid #ccc; padding: 2px 8px; text-align: left; vertical-align: top; }
th { background: #f0f0f0; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.rules td.rule { font-family: ui-monospace, monospace; }
img.plot { display: block; max-width: 100%; margin: 0.4em 0; }
.meta, .legend, .none { color: #555; } nav a { margin-right: 0.8em; }
div.exemplar { margin: 0.5em 0 0.8em; font-family: ui-monospace, monospace; font-size: 13px; }
div.exemplar .caption { font-family: system-ui, sans-serif; color: #555; }
div.exemplar .row { display: flex; align-items: baseline; line-height: 1.7; }
div.exemplar .label { flex: 0 0 5.5em; color: #555; font-family: system-ui, sans-serif; }
div.exemplar .toks { display: flex; flex-wrap: wrap; gap: 3px; }
span.tok { white-space: pre; padding: 0 1px; border-radius: 2px; }
span.tok.scored { outline: 2px solid #c00; }
span.tok.match-key { box-shadow: inset 0 -3px 0 #1a7f37; }
span.tok.match-query { box-shadow: inset 0 -3px 0 #8250df; }
span.tok.cond-distractor { box-shadow: inset 0 -3px 0 #d00; text-decoration: line-through #d00; }
span.tok.cond-count { box-shadow: inset 0 -3px 0 #d07000; }
span.mk { padding: 0 3px; margin-right: 0.6em; }
div.columns { display: flex; gap: 1.5em; align-items: flex-start; }
div.columns > div { flex: 1 1 0; min-width: 0; }
div.exemplar.negative { border-left: 3px solid #d00; padding-left: 0.5em; }
table.sortable th { cursor: pointer; user-select: none; }
table.sortable th[data-order="asc"]::after { content: " \\25B2"; }
table.sortable th[data-order="desc"]::after { content: " \\25BC"; }
table.inputs td.context { font-family: ui-monospace, monospace; white-space: pre-wrap; }
table.inputs b { background: rgba(255,140,0,0.45); font-weight: normal; }
p.head-metrics { font-variant-numeric: tabular-nums; }
"""

# Sorts a table.sortable by the clicked column (numbers as numbers, the rest as text); a second click reverses.
SCRIPT = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("thead th").forEach(function (th, col) {
    th.title = "click to sort";
    th.addEventListener("click", function () {
      var asc = th.dataset.order !== "asc";
      table.querySelectorAll("thead th").forEach(function (h) { delete h.dataset.order; });
      th.dataset.order = asc ? "asc" : "desc";
      var key = function (row) {
        var cell = row.cells[col], text = cell.dataset.sort || cell.textContent.trim(), x = parseFloat(text);
        return isNaN(x) ? text : x;
      };
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = key(a), y = key(b), c;
        if (typeof x === "number" && typeof y === "number") c = x - y;
        else if (typeof x === "number") c = -1;
        else if (typeof y === "number") c = 1;
        else c = String(x).localeCompare(String(y));
        return asc ? c : -c;
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
});
"""


def find_results(results_dir: Path | str) -> list[Path]:
    """The ``results.json`` files under ``results_dir``: its own, or one per head folder inside it."""
    root = Path(results_dir)
    if not root.exists():
        raise FileNotFoundError(f"RESULTS_DIR {root} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"RESULTS_DIR {root} is not a directory")
    if (root / "results.json").is_file():
        return [root / "results.json"]
    found = sorted(root.glob("*/results.json")) or sorted(root.glob("shards/*/results.json"))  # extract, sweep
    if not found:
        raise FileNotFoundError(f"no results.json in RESULTS_DIR {root}, its subfolders or its shards/; "
                                "run `attnrules extract --out DIR` or `attnrules sweep --out DIR` first")
    return found


def load_results(results_dir: Path | str) -> list[dict]:
    """Every head's results under ``results_dir``, ordered by (layer, head). A file that is not valid
    JSON, or lacks something the report reads, is a ValueError naming the file and what is missing."""
    heads = []
    for path in find_results(results_dir):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        check_results(data, path)
        heads.append(data)
    return sorted(heads, key=lambda h: (h["layer"], h["head"]))


class _Results:
    """Checks one results file against what the report reads; the first problem is a ValueError."""

    def __init__(self, path: Path | str) -> None:
        self.path = path

    def fail(self, where: str, problem: str) -> None:
        raise ValueError(f"{self.path} is not a complete attnrules results file: {where} {problem} "
                         "(write it again with `attnrules extract`)")

    def obj(self, value: Any, where: str, keys: Sequence[str] = ()) -> dict:
        if not isinstance(value, dict):
            self.fail(where, f"must be a JSON object, got {_json_kind(value)}")
        missing = [k for k in keys if k not in value]
        if missing:
            self.fail(where, f"has no key {missing[0]!r}" + (f" (nor {', '.join(map(repr, missing[1:]))})"
                                                            if missing[1:] else ""))
        return value

    def items(self, value: Any, where: str, keys: Sequence[str] = ()) -> list[dict]:
        """``value`` as a list of objects with ``keys`` (None or absent: empty)."""
        if value is None:
            return []
        if not isinstance(value, list):
            self.fail(where, f"must be a JSON list, got {_json_kind(value)}")
        return [self.obj(v, f"{where}[{i}]", keys) for i, v in enumerate(value)]

    def int(self, value: Any, where: str) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(where, f"must be an integer, got {_json_kind(value)}")


def _json_kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def check_results(data: Any, path: Path | str) -> dict:
    """``data`` (one head's ``results.json``) if it holds everything the report reads, else a ValueError
    naming ``path``, where in the file (e.g. ``features[1] (L0H0.1).sweep[3]``) and the missing key."""
    r = _Results(path)
    missing = [k for k in ("layer", "head", "features") if not isinstance(data, dict) or k not in data]
    if missing:
        raise ValueError(f"{path} is not an attnrules results file (missing {', '.join(missing)})")
    head = r.obj(data, "the file")
    r.int(head["layer"], "layer")
    r.int(head["head"], "head")
    if head.get("metadata") is not None:
        meta = r.obj(head["metadata"], "metadata")
        if meta.get("notes") is not None and not isinstance(meta["notes"], list):
            r.fail("metadata.notes", f"must be a JSON list, got {_json_kind(meta['notes'])}")
    if not isinstance(head["features"], list):
        r.fail("features", f"must be a JSON list, got {_json_kind(head['features'])}")
    for i, f in enumerate(r.items(head["features"], "features")):
        where = f"features[{i}]" + (f" ({f['name']})" if isinstance(f.get("name"), str) else "")
        r.obj(f, where, ("name", "sweep", "rules"))
        r.items(f["sweep"], f"{where}.sweep", ("method", "num_rules", "precision", "recall", "f1"))
        for method, rules in r.obj(f["rules"], f"{where}.rules").items():
            rules = r.obj(rules, f"{where}.rules.{method}")
            if rules.get("text") is not None and not isinstance(rules["text"], list):
                r.fail(f"{where}.rules.{method}.text", f"must be a JSON list, got {_json_kind(rules['text'])}")
            r.items(rules.get("terms"), f"{where}.rules.{method}.terms", ("query", "key", "query_desc", "key_desc"))
        r.items(f.get("pairs"), f"{where}.pairs", ("query", "key", "query_desc", "key_desc"))
        for views in ("exemplars", "pattern_negatives", "decile_exemplars"):
            for j, v in enumerate(r.items(f.get(views), f"{where}.{views}", ("sequence", "position", "tokens", "acts", "dfa"))):
                r.items(v.get("matches"), f"{where}.{views}[{j}].matches", ("method", "rank", "key_position"))
                r.items(v.get("conditions"), f"{where}.{views}[{j}].conditions", ("kind", "positions"))
        if f.get("histogram") is not None:
            r.obj(f["histogram"], f"{where}.histogram", ("edges", "counts", "n_inactive"))
        absence = r.items(f.get("absence"), f"{where}.absence", ("text",))
        dropped = r.items(f.get("absence_dropped"), f"{where}.absence_dropped")
        for kind, rows in (("absence", absence), ("absence_dropped", dropped)):
            for j, a in enumerate(rows):
                checks = r.items(a.get("checks"), f"{where}.{kind}[{j}].checks", ("status",))
                if any(c["status"] in ("cleared", "unconfirmed") for c in checks):
                    r.obj(a, f"{where}.{kind}[{j}]", ("query", "key"))
                    for k, c in enumerate(checks):
                        if c["status"] in ("cleared", "unconfirmed"):
                            r.obj(c, f"{where}.{kind}[{j}].checks[{k}]", ("distractor", "mean_act_without",
                                                                         "mean_act_with", "logit_distractor", "logit_key"))
        if f.get("counting") is not None:
            counting = r.obj(f["counting"], f"{where}.counting", ("text", "kind", "threshold", "evidence"))
            r.obj(counting["evidence"], f"{where}.counting.evidence", ("counts", "mean_act", "active_share"))
        check = f.get("counting_check")
        if check is not None and r.obj(check, f"{where}.counting_check").get("status") == "undetermined":
            r.obj(check, f"{where}.counting_check", ("reason",))
        if f.get("paper_distractor") is not None:
            pd_ = r.obj(f["paper_distractor"], f"{where}.paper_distractor", ("has_distractor", "k", "q"))
            if pd_["has_distractor"]:
                r.obj(pd_, f"{where}.paper_distractor", ("k_", "attn_score_", "value_score_", "k_rank_",
                                                          "attn_score", "value_score", "k_rank"))
    for i, d in enumerate(r.items(head.get("distractors"), "distractors",
                                  ("feature", "kq_count", "kkq_count", "mean_act_without", "mean_act_with"))):
        if d.get("insertion") is not None:
            r.obj(d["insertion"], f"distractors[{i}].insertion", ("counts", "mean_act", "n_examples"))
    return head


def write_report(results_dir: Path | str, out: Path | str | None = None) -> Path:
    """Write the HTML report of ``results_dir`` to ``out`` (default: RESULTS_DIR/report.html), atomically."""
    out = Path(out) if out is not None else Path(results_dir) / "report.html"
    if out.is_dir():
        raise IsADirectoryError(f"--out {out} is a directory; give a file name such as {out / 'report.html'}")
    page = render_report(load_results(results_dir), title=f"attnrules report: {Path(results_dir).resolve().name}")
    return write_atomic(out, page)


def render_report(heads: Sequence[dict], *, title: str = "attnrules report") -> str:
    """The report page for the given head results (as loaded by :func:`load_results`), as ASCII HTML."""
    nav = " ".join(f'<a href="#{_head_id(h)}">{_head_name(h)} ({len(h["features"])} features)</a>' for h in heads)
    model = _model_view(heads) if len(heads) > 1 else ""
    body = "\n".join(_head_section(h) for h in heads)
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>'
            f"<style>{CSS}</style></head>\n<body>\n<h1>{_esc(title)}</h1>\n<nav>{nav}</nav>\n{model}\n{body}\n"
            f"<script>{SCRIPT}</script>\n</body></html>\n")
    return _ascii(page)


def head_html(head: dict) -> str:
    """One head's section with its styles and script, for a notebook (``HeadResult._repr_html_``)."""
    return _ascii(f'<div class="attnrules-report"><style>{CSS}</style>{_head_section(head)}<script>{SCRIPT}</script></div>')


def _ascii(page: str) -> str:
    # Non-ASCII characters (rule arrows, tokens) as character references: the file reads right in any encoding.
    return page.encode("ascii", "xmlcharrefreplace").decode("ascii")


# ----------------------------------------------------------------------------------------------------------
# Whole model


def head_summary(head: dict) -> dict[str, Any]:
    """One head's row of the whole-model view: its attention metrics (from the corpus pass), the share of
    its features whose best rule set reaches F1 ≥ GOOD_F1 on random and on pattern negatives, its
    distractor share and the counting rules found."""
    features = head["features"]
    metrics = (head.get("metadata") or {}).get("head_metrics") or {}
    row: dict[str, Any] = {"head": _head_name(head), "features": len(features)}
    row.update({k: metrics.get(k) for k in ("prev_token", "induction", "entropy", "entropy_norm")})
    for negatives in NEGATIVES:
        best = [_best_any(f["sweep"], negatives) for f in features]
        known = [b for b in best if b is not None]
        row[f"good_{negatives}"] = sum(b >= GOOD_F1 for b in known) / len(known) if known else None
    row["distractor_share"] = sum(map(_has_distractor, features)) / len(features) if features else None
    row["counting"] = sum(bool(f.get("counting")) for f in features)
    return row


def _best_any(sweep: list, negatives: str) -> Optional[float]:
    """The best F1 of any rule set (ordering or combined) on ``negatives``."""
    values = [p["f1"] for p in sweep if _negatives(p) == negatives and p["f1"] is not None]
    return max(values) if values else None


def _model_view(heads: Sequence[dict]) -> str:
    rows = [head_summary(h) for h in heads]
    header = ["head", "features", "previous-token score", "induction score", "attention entropy (nats)",
              "entropy / log(t+1)", f"share F1 ≥ {GOOD_F1} (random negatives)", f"share F1 ≥ {GOOD_F1} (pattern negatives)",
              "distractor share", "counting rules"]
    cells = [[f'<a href="#head-{r["head"]}">{r["head"]}</a>', _num_cell(str(r["features"]))]
             + [_num_cell(_fmt(r[k])) for k in ("prev_token", "induction", "entropy", "entropy_norm")]
             + [_num_cell(_pct(r[k])) for k in ("good_random", "good_pattern", "distractor_share")]
             + [_num_cell(str(r["counting"]))] for r in rows]
    return "\n".join([
        '<section class="model" id="model">', "<h2>Whole model</h2>",
        _esc_p(f"Per head: attention metrics over the corpus (previous-token score: attention on t − 1; induction "
               f"score: attention on the token after an earlier copy of the current one; entropy of the attention, "
               f"mean over positions t ≥ 1), the share of its features whose best rule set reaches F1 ≥ {GOOD_F1} on "
               "random and on pattern negatives, the share with a distractor key, and the counting rules found. "
               "Click a column to sort; a head's name or its point leads to its section.", "legend"),
        _table(header, cells, "heads sortable"), _head_scatter(rows), "</section>"])


def _head_scatter(rows: list[dict]) -> str:
    """Heads as points: previous-token vs induction score, coloured by the share of good features
    (random negatives); and that share against the attention entropy. Each point links to its head."""
    fig = Figure(figsize=(9, 3.6), dpi=90, layout="constrained")
    left, right = fig.subplots(1, 2)
    x = [_nan(r["prev_token"]) for r in rows]
    y = [_nan(r["induction"]) for r in rows]
    good = [_nan(r["good_random"]) for r in rows]
    points = left.scatter(x, y, c=good, cmap="viridis", vmin=0, vmax=1, s=40, edgecolors="k", linewidths=0.5)
    fig.colorbar(points, ax=left, label=f"share F1 ≥ {GOOD_F1} (random)")
    left.set_xlabel("previous-token score")
    left.set_ylabel("induction score")
    left.set_xlim(-0.03, 1.03)
    left.set_ylim(-0.03, 1.03)
    right.set_xlim(-0.03, 1.03)
    ent = [_nan(r["entropy_norm"]) for r in rows]
    right.scatter(ent, good, marker="o", label="random negatives", s=30)
    right.scatter(ent, [_nan(r["good_pattern"]) for r in rows], marker="x", label="pattern negatives", s=30)
    right.set_xlabel("attention entropy / log(t+1)")
    right.set_ylabel(f"share of features, F1 ≥ {GOOD_F1}")
    right.set_ylim(-0.05, 1.05)
    right.legend(fontsize=7)
    for ax, ys in ((left, y), (right, good)):
        ax.grid(alpha=0.3)
        for r, xi, yi in zip(rows, x if ax is left else ent, ys):
            if xi == xi and yi == yi:  # not NaN
                ax.annotate(r["head"], (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points")
    fig.draw_without_rendering()  # the layout is final: point positions in pixels, for the links
    height = fig.bbox.height
    areas = []
    for ax, xs, ys in ((left, x, y), (right, ent, good)):
        for r, xi, yi in zip(rows, xs, ys):
            if xi == xi and yi == yi:
                px, py = ax.transData.transform((xi, yi))
                areas.append(f'<area shape="circle" coords="{px:.0f},{height - py:.0f},7" href="#head-{r["head"]}" '
                             f'alt="{r["head"]}" title="{r["head"]}">')
    return (_img(fig, "heads: previous-token vs induction score, and the share of good features vs attention entropy",
                 "heads-scatter", usemap="heads-map") + f'<map name="heads-map">{"".join(areas)}</map>')


def _nan(value: Optional[float]) -> float:
    return float("nan") if value is None else value


def _pct(value: Optional[float]) -> str:
    return "—" if value is None else f"{value:.0%}"


# ----------------------------------------------------------------------------------------------------------
# Head


def _head_name(head: dict) -> str:
    return f"L{head['layer']}H{head['head']}"


def _head_id(head: dict) -> str:
    return f"head-{_head_name(head)}"


def _feature_id(name: str) -> str:
    return "feature-" + re.sub(r"[^A-Za-z0-9_-]", "-", name)


def _head_section(head: dict) -> str:
    meta = head.get("metadata") or {}
    features = head["features"]
    facts = [f"{meta[k]} {label}" for k, label in (("n_sequences", "sequences"), ("seq_len", "tokens each"),
                                                  ("n_inputs", "input features"), ("n_outputs", "output features"))
             if k in meta]
    notes = "".join(f"<li>{_esc(n)}</li>" for n in meta.get("notes", []))
    settings = meta.get("settings")
    settings_html = (f"<details><summary>settings</summary><pre>{_esc(json.dumps(settings, indent=1))}</pre></details>"
                     if settings else "")
    flagged = sum(_has_distractor(f) for f in features)
    share = (f"{flagged} of {len(features)} features ({flagged / len(features):.0%}) have a distractor key "
             "(REF's check: a key with negative value score ranks above the top key in its query's attention)."
             if features else "No features were explained.")
    parts = [
        f'<section class="head" id="{_head_id(head)}">',
        f"<h2>Head {_head_name(head)}</h2>",
        f'<p class="meta">{_esc(", ".join(facts))}</p>' if facts else "",
        _head_metrics(meta.get("head_metrics")),
        f'<ul class="notes">{notes}</ul>' if notes else "",
        settings_html,
        _summary_table(head),
        f'<p class="distractor-share">{_esc(share)}</p>',
    ]
    if features:
        parts.append(_head_curves(head))
    parts.append(_inputs_table(meta.get("input_features") or {}))
    evidence = {d["feature"]: d for d in head.get("distractors") or []}
    parts += [_feature_section(f, head, evidence.get(f["name"])) for f in features]
    parts.append("</section>")
    return "\n".join(p for p in parts if p)


def _head_metrics(metrics: Optional[dict]) -> str:
    if not metrics:
        return ""
    return _esc_p(f"Attention over the corpus ({metrics.get('n_positions')} query positions): previous-token score "
                  f"{_fmt(metrics.get('prev_token'))}, induction score {_fmt(metrics.get('induction'))} (over "
                  f"{metrics.get('n_induction')} positions whose token occurred before), entropy "
                  f"{_fmt(metrics.get('entropy'))} nats ({_fmt(metrics.get('entropy_norm'))} of the uniform).",
                  "head-metrics")


def _summary_table(head: dict) -> str:
    """One row per feature: the best F1 of each ordering (and of the best combined rule set) with the smallest
    N reaching it, on random negatives and (after "·") on pattern negatives; F1 at N = 8 of each ordering;
    absence and counting rules; whether it has a distractor key."""
    features = head["features"]
    pattern = any(_negatives(p) == "pattern" for f in features for p in f["sweep"])
    combined = any(_is_combined(p["method"]) for f in features for p in f["sweep"])
    both = " (random · pattern negatives)" if pattern else ""
    header = (["feature"] + [f"best F1 @ N, {m}{both}" for m in METHODS]
              + ([f"best F1 @ N, combined set{both}"] if combined else [])
              + ["F1 @ N=8 (" + " / ".join(METHODS) + ")", "absence rules", "counting rule", "distractor"])
    negatives = NEGATIVES if pattern else NEGATIVES[:1]
    rows = []
    for f in features:
        sweep = f["sweep"]
        row = [f'<a href="#{_feature_id(f["name"])}">{_esc(f["name"])}</a>']
        row += [_best_cell([_best_f1(sweep, m, n) + (m,) for n in negatives]) for m in METHODS]
        if combined:
            row.append(_best_cell([max(((*_best_f1(sweep, m, n), m) for m in _methods(sweep) if _is_combined(m)
                                        and _best_f1(sweep, m, n)[0] is not None),
                                       key=lambda x: (x[0], -x[1]), default=(None, None, None)) for n in negatives]))
        row += [_num_cell(" / ".join(_fmt(_f1_at(sweep, m, 8)) for m in METHODS)),
                _num_cell(str(len(f.get("absence") or []))),
                _esc(f["counting"]["text"]) if f.get("counting") else "—",
                "yes" if _has_distractor(f) else "no"]
        rows.append(row)
    return _table(header, rows, "summary sortable")


def _best_cell(best: list[tuple[Optional[float], Optional[int], Optional[str]]]) -> str:
    """(F1, N, rule set) on each evaluation as "F1 @ N · F1 @ N"; the rule sets named in the hover."""
    text = " · ".join(f"{_fmt(v)} @ {n}" if v is not None else "—" for v, n, _ in best)
    names = "; ".join(f"{neg}: {m}" for (v, _, m), neg in zip(best, NEGATIVES) if v is not None and m)
    return f'<td class="num" title="{_esc(names)}">{_esc(text)}</td>'


def _negatives(point: dict) -> str:
    return point.get("negatives") or "random"  # results written before pattern negatives: REF's random ones


def _is_combined(method: str) -> bool:
    return "+" in method


def _methods(sweep: list) -> list[str]:
    """The rule sets swept, orderings first (in METHODS order), then the others as they come."""
    found = list(dict.fromkeys(p["method"] for p in sweep))
    return [m for m in METHODS if m in found] + [m for m in found if m not in METHODS]


def _best_f1(sweep: list, method: str, negatives: str = "random") -> tuple[Optional[float], Optional[int]]:
    """The best F1 of ``method`` on ``negatives`` and the smallest N that reaches it."""
    points = [(p["f1"], p["num_rules"]) for p in sweep
              if p["method"] == method and _negatives(p) == negatives and p["f1"] is not None]
    if not points:
        return None, None
    f1 = max(v for v, _ in points)
    return f1, min(n for v, n in points if v == f1)


def _f1_at(sweep: list, method: str, n: int, negatives: str = "random") -> Optional[float]:
    return next((p["f1"] for p in sweep if p["method"] == method and p["num_rules"] == n
                 and _negatives(p) == negatives), None)


def _has_distractor(feature: dict) -> bool:
    return bool((feature.get("paper_distractor") or {}).get("has_distractor"))


def _head_curves(head: dict) -> str:
    """F1 vs N of every feature (random negatives): colour by feature, line style by method."""
    fig = Figure(figsize=(8.5, 3.4), dpi=90, layout="constrained")
    ax = fig.add_subplot()
    colours = [f"C{i % 10}" for i in range(len(head["features"]))]
    for f, colour in zip(head["features"], colours):
        for method, style in zip(METHODS, ("-", "--", ":")):
            xs, ys = _series(f["sweep"], method, "f1")
            if xs:
                ax.plot(xs, ys, style, color=colour, marker=".", label=f"{f['name']} {method}")
    _log2_axes(ax, "F1")
    ax.set_title(f"{_head_name(head)}: F1 vs N, random negatives (solid: weights, dashed: importance, dotted: exact)",
                 fontsize=10)
    if len(head["features"]) <= 8:
        fig.legend(fontsize=7, ncol=2, loc="outside right center")
    return _img(fig, f"F1 vs number of terms N for every feature of {_head_name(head)}", "f1-curves")


def _inputs_table(records: dict) -> str:
    """The input features the head's rules name, as described: label, where it comes from, frequency over
    the corpus and the top-activating contexts (the active token in bold)."""
    if not records:
        return ""
    rows = []
    for key in sorted(records, key=int):
        r = records[key]
        freq = r.get("frequency")
        contexts = "<br>".join(
            f'{"".join(_esc(t) for t in c["tokens"][: c["at"]])}<b>{_esc(c["tokens"][c["at"]])}</b>'
            f'{"".join(_esc(t) for t in c["tokens"][c["at"] + 1:])} <span class="meta">({c["act"]:.3g})</span>'
            for c in (r.get("contexts") or [])[:5])
        name = _esc(r.get("name", r["id"]))
        if r.get("url"):
            name = f'<a href="{_esc(r["url"])}" target="_blank" rel="noopener">{name}</a>'
        rows.append([_num_cell(str(r["id"])), name, _esc(r["label"]), _esc(r.get("source", "")),
                     _num_cell(f"{freq:.3%}" if freq is not None else "—"), f'<td class="context">{contexts or "—"}</td>'])
    return (f"<details class=\"inputs\"><summary>Input features named in these rules ({len(rows)}), described "
            "from the corpus</summary>"
            + _table(["index", "id", "label", "from", "active on (tokens)", "top-activating contexts"], rows,
                     "inputs sortable") + "</details>")


# ----------------------------------------------------------------------------------------------------------
# Feature


def _feature_section(feature: dict, head: dict, evidence: Optional[dict]) -> str:
    name = feature["name"]
    parts = [
        f'<section class="feature" id="{_feature_id(name)}">',
        f"<h3>{_esc(name)}</h3>",
        f'<p class="meta">{feature.get("n_train", "?")} train and {feature.get("n_val", "?")} validation exemplars</p>',
        "<h4>Rules</h4>", _rules_table(feature, head),
        "<h4>Precision, recall and F1 vs number of terms N (validation)</h4>", _feature_curves(feature),
    ]
    if feature.get("histogram"):
        parts += ["<h4>Activation over the corpus</h4>", _histogram(feature)]
    parts += ["<h4>Exemplars</h4>", _exemplars(feature)]
    if feature.get("decile_exemplars"):
        parts += ["<h4>Across the activation range (one sequence per decile)</h4>", _deciles(feature)]
    parts += ["<h4>Distractor evidence</h4>", _distractor(feature, evidence, _input_names(head))]
    if feature.get("counting"):
        parts += ["<h4>Counting evidence</h4>", _counting(feature["counting"])]
    parts.append("</section>")
    return "\n".join(parts)


def _rules_table(feature: dict, head: dict) -> str:
    """Skip-gram rules of each ordering with A, V and A×V (or the exact importance), terms that cannot
    contribute left out and counted; then absence rules, the distractors the evidence dropped
    (unconfirmed by insertion, cleared by exact mode), and the counting rule (or why it is undetermined)."""
    model = _model_id(head)
    cells, notes = [], []
    for method in METHODS:
        view = feature["rules"].get(method)
        if not view:
            continue
        terms = [_Term(t) for t in view.get("terms") or []]
        rows, last, left_out = term_rows(terms, feature["name"])
        for i, (text, a, v, x) in enumerate(rows):
            cells.append([_esc(method), _num_cell(str(i + 1)), f'<td class="rule">{_rule_html(text, head["layer"], model)}</td>',
                          _num_cell(format_number(a)), _num_cell(format_number(v)),
                          _num_cell(f"{format_number(x)}" + (" (importance)" if last == "importance" else ""))])
        if left_out:
            notes.append(f"{method}: {left_out} of {len(terms)} stored terms left out (A×V = 0 or no firing offset: "
                         "they cannot contribute; rules.csv keeps them)")
    other = [("absence", str(i + 1), a["text"]) for i, a in enumerate(feature.get("absence") or [])]
    dropped = [(a, c) for a in (feature.get("absence") or []) + (feature.get("absence_dropped") or [])
               for c in a.get("checks", []) if c["status"] in ("cleared", "unconfirmed")]
    other += [(f"not a distractor ({c['status']})", str(i + 1),
               f"distractor {c['distractor']} of term ({a['query']}, {a['key']}): activation "
               f"{c['mean_act_without']:.3g} → {c['mean_act_with']:.3g} when inserted; real logit "
               f"{c['logit_distractor']:.3g} vs key {c['logit_key']:.3g}") for i, (a, c) in enumerate(dropped)]
    if feature.get("counting"):
        other.append(("counting", "1", feature["counting"]["text"]))
    elif (feature.get("counting_check") or {}).get("status") == "undetermined":
        other.append(("counting", "–", f"undetermined: {feature['counting_check']['reason']}"))
    cells += [[_esc(kind), _num_cell(rank), f'<td class="rule">{_rule_html(text, head["layer"], model)}</td>', "", "", ""]
              for kind, rank, text in other]
    table = _table(["kind", "#", "rule", "A", "V", "A×V"], cells, "rules")
    return table + "".join(_esc_p(n, "legend") for n in notes)


class _Term:
    """A stored rule term (JSON) with the attributes :func:`term_rows` reads."""

    def __init__(self, data: dict) -> None:
        self.query_desc, self.key_desc = data["query_desc"], data["key_desc"]
        self.attn_score, self.value_score = data.get("attn_score"), data.get("value_score")
        self.weight, self.offsets = data.get("weight"), data.get("offsets")


def _model_id(head: dict) -> str:
    """Neuronpedia's model id: named in the metadata or settings if the run recorded it, else gpt2-small."""
    meta = head.get("metadata") or {}
    return meta.get("model") or (meta.get("settings") or {}).get("model") or DEFAULT_MODEL


def _rule_html(text: str, layer: int, model: str) -> str:
    """Escaped rule text; above layer 0, each input feature's Neuronpedia id links to its page."""
    escaped = _esc(text)
    if layer == 0:
        return escaped
    return NEURONPEDIA_ID.sub(
        lambda m: f'<a href="https://neuronpedia.org/{model}/{m.group(1)}" target="_blank" rel="noopener">'
                  f"{m.group(1)}</a>", escaped)


def _feature_curves(feature: dict) -> str:
    """Precision, recall and F1 vs N, one panel per metric, one line per rule set; a row for REF's random
    negatives and, when evaluated, a row for pattern negatives."""
    sweep = feature["sweep"]
    rows = [n for n in NEGATIVES if any(_negatives(p) == n for p in sweep)] or ["random"]
    fig = Figure(figsize=(9, 2.3 * len(rows) + 0.3), dpi=90, layout="constrained")
    axes = fig.subplots(len(rows), len(METRICS), sharey=True, squeeze=False)
    styles = {"weights": "-o", "importance": "--s", "exact": ":^"}
    for r, negatives in enumerate(rows):
        for ax, metric in zip(axes[r], METRICS):
            for i, method in enumerate(_methods(sweep)):
                xs, ys = _series(sweep, method, metric, negatives)
                if xs:
                    ax.plot(xs, ys, styles.get(method, "-."), markersize=3, label=method,
                            color=f"C{i % 10}")
            _log2_axes(ax, f"{metric}")
            ax.set_title(f"{metric}, {negatives} negatives", fontsize=9)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, fontsize=7, loc="outside right center")
    return _img(fig, f"precision, recall and F1 vs N for {feature['name']}, on {' and '.join(rows)} negatives", "metrics")


def _series(sweep: list, method: str, metric: str, negatives: str = "random") -> tuple[list[int], list[float]]:
    """(N, metric) points of one method on ``negatives``, by N; undefined values (None) become gaps."""
    points = sorted((p["num_rules"], p[metric]) for p in sweep if p["method"] == method and _negatives(p) == negatives)
    return [n for n, _ in points], [float("nan") if v is None else v for _, v in points]


def _log2_axes(ax, ylabel: str) -> None:
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("N (terms)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def _histogram(feature: dict) -> str:
    """The max activation of every corpus sequence where the feature fires (log count), and how many never fire."""
    h = feature["histogram"]
    total = sum(h["counts"]) + h["n_inactive"]
    text = (f"Active in {sum(h['counts'])} of {total} corpus sequences (each sequence counted at its max activation); "
            f"silent in {h['n_inactive']}.")
    if not h["counts"]:
        return _esc_p(text + " It never fires.", "none")
    fig = Figure(figsize=(6, 2.2), dpi=90, layout="constrained")
    ax = fig.add_subplot()
    edges = h["edges"]
    ax.bar(edges[:-1], h["counts"], width=[b - a for a, b in zip(edges, edges[1:])], align="edge", color="C1")
    ax.set_yscale("log")
    ax.set_xlabel("max activation in the sequence")
    ax.set_ylabel("sequences")
    ax.grid(alpha=0.3)
    return _esc_p(text, "legend") + _img(fig, f"histogram of the max activation of {feature['name']} per sequence",
                                         "histogram")


def _exemplars(feature: dict) -> str:
    """Top-activating exemplars, and the pattern negatives beside them, each with its token rows."""
    views = feature.get("exemplars") or []
    negatives = feature.get("pattern_negatives") or []
    if not views and not negatives:
        return '<p class="none">No exemplars stored.</p>'
    everything = views + negatives + (feature.get("decile_exemplars") or [])
    scales = (_scale(v["acts"] for v in everything), _scale(v["dfa"] for v in everything))
    terms = _term_texts(feature)
    legend = ('<p class="legend">Orange: positive, blue: negative; intensity relative to the largest value over '
              "this feature's exemplars; outlined: the scored position. Hover a token for its value and the rule "
              'terms it matches. Underlined: <span class="tok match-key mk">key</span> and '
              '<span class="tok match-query mk">query</span> of a rule term that fires at the scored position; '
              '<span class="tok cond-distractor mk">distractor</span> of an absence rule present, '
              '<span class="tok cond-count mk">too few</span> copies of a counted key. Activation row: the '
              "feature's activation at each position; DFA row: each key position's direct contribution to the "
              "scored position's activation.</p>")
    left = "".join(_exemplar(v, scales, terms) for v in views) or '<p class="none">None stored.</p>'
    columns = f'<div><h5>Top-activating (validation)</h5>{left}</div>'
    if negatives:
        right = "".join(_exemplar(v, scales, terms, negative=True) for v in negatives)
        columns += ('<div><h5>Pattern negatives: the rule terms match, the feature stays silent</h5>'
                    f"{right}</div>")
    return legend + f'<div class="columns">{columns}</div>'


def _deciles(feature: dict) -> str:
    views = feature["decile_exemplars"]
    everything = (feature.get("exemplars") or []) + (feature.get("pattern_negatives") or []) + views
    scales = (_scale(v["acts"] for v in everything), _scale(v["dfa"] for v in everything))
    terms = _term_texts(feature)
    return ('<p class="legend">Active corpus sequences ranked by their max activation, one from each tenth of '
            "the ranks, weakest first: how the rule reads where the feature fires weakly.</p>"
            + "".join(_exemplar(v, scales, terms, label=f"decile {i + 1}") for i, v in enumerate(views)))


def _term_texts(feature: dict) -> dict[tuple[str, int], str]:
    """(method, rank) → the term as read, e.g. "[If] … [then]"."""
    out = {}
    for method, view in feature["rules"].items():
        for t in view.get("terms") or []:
            out[method, t["rank"]] = f"[{t['key_desc']}] … [{t['query_desc']}]"
    return out


def _exemplar(view: dict, scales: tuple[float, float], terms: dict, *, negative: bool = False, label: str = "") -> str:
    t = view["position"]
    marks: dict[int, tuple[set, list]] = {}

    def mark(pos: int, cls: str, text: str) -> None:
        classes, texts = marks.setdefault(pos, (set(), []))
        classes.add(cls)
        texts.append(text)

    # each term once per role and position, with every ordering that ranks it: "key of [If] … [then] (weights #1, ...)"
    ranked: dict[tuple[int, str, str], list[str]] = {}
    for m in view.get("matches") or []:
        term = terms.get((m["method"], m["rank"]), f"term {m['rank'] + 1}")
        for pos, role in ((m["key_position"], "key"), (t, "query")):
            ranked.setdefault((pos, role, term), []).append(f"{m['method']} #{m['rank'] + 1}")
    for (pos, role, term), where in ranked.items():
        mark(pos, f"match-{role}", f"{role} of {term} ({', '.join(dict.fromkeys(where))})")
    for c in view.get("conditions") or []:
        if c["kind"] == "distractor":
            for p in c["positions"]:
                mark(p, "cond-distractor", f"distractor {c.get('feature')} of the term ({c.get('query')}, {c.get('key')}): "
                                           "its absence rule silences it")
        else:
            for p in c["positions"]:
                mark(p, "cond-count", f"only {len(c['positions'])} of the {c.get('min_count')} copies the counting "
                                      "rule needs")
    found = ", ".join(sorted({m["method"] for m in view.get("matches") or []}))
    conditions = [c["kind"] for c in view.get("conditions") or []]
    caption = (f"{label + ': ' if label else ''}sequence {view['sequence']}, scored position {t} "
               f"({view['tokens'][t]!r}), activation {view['acts'][t]:.3g}"
               + (f"; terms of {found} fire" if found else "")
               + (f"; {', '.join(sorted(set(conditions)))} condition holds" if conditions else ""))
    cls = "exemplar negative" if negative else "exemplar"
    return (f'<div class="{cls}"><div class="caption">{_esc(caption)}</div>'
            f'{_token_row("activation", "act", view["tokens"], view["acts"], scales[0], t, marks)}'
            f'{_token_row("DFA", "dfa", view["tokens"], view["dfa"], scales[1], t, marks)}</div>')


def _scale(rows: Iterable[Sequence[float]]) -> float:
    """The largest absolute value over ``rows`` (1 when all are zero), so shading is comparable across rows."""
    return max((abs(x) for row in rows for x in row), default=0.0) or 1.0


def _token_row(label: str, attr: str, tokens: Sequence[str], values: Sequence[float], scale: float,
               scored: int, marks: Optional[dict] = None) -> str:
    spans = []
    for t, (token, value) in enumerate(zip(tokens, values)):
        classes, texts = (marks or {}).get(t, ((), []))
        cls = " ".join(["tok"] + (["scored"] if t == scored else []) + sorted(classes))
        title = "; ".join([f"{label} {value:.4g}", *texts])
        alpha = min(1.0, abs(value) / scale) * 0.85
        rgb = "255,140,0" if value >= 0 else "40,110,255"
        spans.append(f'<span class="{cls}" data-{attr}="{value:.4g}" title="{_esc(title)}" '
                     f'style="background:rgba({rgb},{alpha:.2f})">{_esc(token)}</span>')
    return (f'<div class="row {attr}"><span class="label">{label}</span>'
            f'<span class="toks">{"".join(spans)}</span></div>')


def _input_names(head: dict) -> dict[int, str]:
    """Input feature index -> description, from every rule term and exhaustive pair of the head."""
    names = {}
    for f in head["features"]:
        rows = [t for rules in f["rules"].values() for t in rules.get("terms", [])] + list(f.get("pairs") or [])
        for row in rows:
            names[row["query"]] = row["query_desc"]
            names[row["key"]] = row["key_desc"]
    return names


def _distractor(feature: dict, evidence: dict | None, names: dict[int, str]) -> str:
    """REF's distractor check, then natural prevalence and counterfactual insertion when measured."""
    check = feature.get("paper_distractor")
    if not check:
        return '<p class="none">Not checked.</p>'

    def name(i: int) -> str:
        return f"[{names[i]}]" if i in names else f"input {i}"

    key, query = name(check["k"]), name(check["q"])
    if not check["has_distractor"]:
        return _esc_p(f"No distractor key: nothing with a negative value score ranks above the top key {key} "
                      f"in the attention of its query {query}.", "none")
    parts = [_esc_p(f"Distractor key {name(check['k_'])} (A={check['attn_score_']:.3g}, V={check['value_score_']:.3g}, "
                    f"attention rank {check['k_rank_']}) outranks the top key {key} (A={check['attn_score']:.3g}, "
                    f"V={check['value_score']:.3g}, rank {check['k_rank']}) for the query {query}.")]
    if evidence is None:
        return parts[0]
    total = evidence["kq_count"] + evidence["kkq_count"]
    parts.append(_table(
        ["corpus sequences with the skip-gram", "count", "mean activation at the query"],
        [["without the distractor before the query", _num_cell(str(evidence["kq_count"])),
          _num_cell(_fmt(evidence["mean_act_without"]))],
         ["with the distractor before the query", _num_cell(str(evidence["kkq_count"])),
          _num_cell(_fmt(evidence["mean_act_with"]))],
         ["share with the distractor", _num_cell(f"{evidence['kkq_count'] / total:.0%}" if total else "—"), ""]],
        "prevalence"))
    insertion = evidence.get("insertion")
    if insertion:
        parts.append("<p>Counterfactual insertion of the distractor's token n times into sequences without it:</p>")
        parts.append(_table(["n inserted", "mean activation", "examples"],
                            [[_num_cell(str(n)), _num_cell(_fmt(a)), _num_cell(str(k))] for n, a, k in
                             zip(insertion["counts"], insertion["mean_act"], insertion["n_examples"])],
                            "insertion"))
    return "\n".join(parts)


def _counting(rule: dict) -> str:
    """The activation and active share of the feature by the number of key copies the detector inserted."""
    ev = rule["evidence"]
    with_other = rule.get("other_token") is not None
    header = ["key copies"] + (["other copies"] if with_other else []) + ["mean activation", "active share"]
    rows = [[_num_cell(str(c[0]))] + ([_num_cell(str(c[1]))] if with_other else [])
            + [_num_cell(_fmt(a)), _num_cell(f"{s:.0%}" if s is not None else "—")]
            for c, a, s in zip(ev["counts"], ev["mean_act"], ev["active_share"])]
    base = f" ({ev['n_base']} base sequences per count)" if "n_base" in ev else ""
    return (_esc_p(f"{rule['text']}: kind {rule['kind']}, threshold {rule['threshold']}{base}.")
            + _counting_plot(rule) + _table(header, rows, "counting"))


def _counting_plot(rule: dict) -> str:
    """Mean activation and active share against the number of key copies inserted (for a difference rule,
    against key copies minus other copies), the threshold marked."""
    ev = rule["evidence"]
    xs = [c[0] - c[1] if rule.get("other_token") is not None else c[0] for c in ev["counts"]]
    fig = Figure(figsize=(6, 2.4), dpi=90, layout="constrained")
    ax = fig.add_subplot()
    ax.plot(xs, [_nan(a) for a in ev["mean_act"]], "o-", color="C1", label="mean activation")
    ax.set_xlabel("key copies" + (" − other copies" if rule.get("other_token") is not None else ""))
    ax.set_ylabel("mean activation")
    share = ax.twinx()
    share.plot(xs, [_nan(s) for s in ev["active_share"]], "s--", color="C0", label="active share")
    share.set_ylim(-0.03, 1.03)
    share.set_ylabel("active share")
    if rule.get("threshold") is not None:
        ax.axvline(rule["threshold"] - 0.5, color="k", lw=0.8, ls=":")
    ax.grid(alpha=0.3)
    fig.legend(fontsize=7, loc="outside upper center", ncol=2)
    return _img(fig, f"counting response of {rule.get('feature_name', 'the feature')}", "counting-response")


# ----------------------------------------------------------------------------------------------------------
# HTML pieces


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _esc_p(text: str, cls: str = "") -> str:
    attr = f' class="{cls}"' if cls else ""
    return f"<p{attr}>{_esc(text)}</p>"


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.3g}"


def _num_cell(html_text: str) -> str:
    return f'<td class="num">{html_text}</td>'


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], cls: str) -> str:
    """A table of HTML cells; a cell that is not already a ``<td>`` is wrapped in one. Header text is escaped."""
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(c if c.startswith("<td") else f"<td>{c}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _img(fig: Figure, alt: str, cls: str, usemap: str = "") -> str:
    """The figure (with a constrained layout, so one draw suffices) as an inline PNG ``img.plot``
    (``usemap``: the name of the ``<map>`` of links over it)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    use = f' usemap="#{usemap}"' if usemap else ""
    return f'<img class="plot {cls}" alt="{_esc(alt)}"{use} src="data:image/png;base64,{data}">'
