"""One self-contained HTML report of ``attnrules extract`` results.

The report reads the ``results.json`` of each head folder and writes a single HTML file with
inline CSS and plots embedded as base64 PNGs, so it opens offline and can be mailed or archived
as one file. Per head: a feature summary table and the F1-vs-N curves; per feature: its rules,
precision/recall/F1 vs N, highlighted exemplars, and the distractor and counting evidence.
"""
from __future__ import annotations

import base64
import html
import io
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from attnrules.files import write_atomic

METHODS = ("weights", "importance", "exact")  # orderings; "exact" only when exact mode ran
METRICS = ("precision", "recall", "f1")
DEFAULT_MODEL = "gpt2-small"  # Neuronpedia model id when the results do not name one
# A Neuronpedia input description above layer 0: "{sae id}/{feature index}", e.g. "3-res-jb/1234".
NEURONPEDIA_ID = re.compile(r"\[([A-Za-z0-9_.-]+/\d+)\]")

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
    found = sorted(root.glob("*/results.json"))
    if not found:
        raise FileNotFoundError(f"no results.json in RESULTS_DIR {root} or its subfolders; "
                                "run `attnrules extract --out DIR` first")
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
        r.items(f.get("exemplars"), f"{where}.exemplars", ("sequence", "position", "tokens", "acts", "dfa"))
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
    body = "\n".join(_head_section(h) for h in heads)
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>'
            f"<style>{CSS}</style></head>\n<body>\n<h1>{_esc(title)}</h1>\n<nav>{nav}</nav>\n{body}\n</body></html>\n")
    # Non-ASCII characters (rule arrows, tokens) as character references: the file reads right in any encoding.
    return page.encode("ascii", "xmlcharrefreplace").decode("ascii")


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
        f'<ul class="notes">{notes}</ul>' if notes else "",
        settings_html,
        _summary_table(head),
        f'<p class="distractor-share">{_esc(share)}</p>',
    ]
    if features:
        parts.append(_head_curves(head))
    evidence = {d["feature"]: d for d in head.get("distractors") or []}
    parts += [_feature_section(f, head, evidence.get(f["name"])) for f in features]
    parts.append("</section>")
    return "\n".join(p for p in parts if p)


def _summary_table(head: dict) -> str:
    header = (["feature"] + [f"best F1 ({m}) @ N" for m in METHODS] + [f"F1 @ N=8 ({m})" for m in METHODS]
              + ["absence rules", "counting rule", "distractor"])
    rows = []
    for f in head["features"]:
        best = [_best_f1(f["sweep"], m) for m in METHODS]
        at8 = [_f1_at(f["sweep"], m, 8) for m in METHODS]
        rows.append(
            [f'<a href="#{_feature_id(f["name"])}">{_esc(f["name"])}</a>']
            + [_num_cell(f"{_fmt(v)} @ {n}" if v is not None else "—") for v, n in best]
            + [_num_cell(_fmt(v)) for v in at8]
            + [_num_cell(str(len(f.get("absence") or []))),
               _esc(f["counting"]["text"]) if f.get("counting") else "—",
               "yes" if _has_distractor(f) else "no"]
        )
    return _table(header, rows, "summary")


def _best_f1(sweep: list, method: str) -> tuple[float | None, int | None]:
    """The best F1 of ``method`` and the smallest N that reaches it."""
    points = [(p["f1"], p["num_rules"]) for p in sweep if p["method"] == method and p["f1"] is not None]
    if not points:
        return None, None
    f1 = max(v for v, _ in points)
    return f1, min(n for v, n in points if v == f1)


def _f1_at(sweep: list, method: str, n: int) -> float | None:
    return next((p["f1"] for p in sweep if p["method"] == method and p["num_rules"] == n), None)


def _has_distractor(feature: dict) -> bool:
    return bool((feature.get("paper_distractor") or {}).get("has_distractor"))


def _head_curves(head: dict) -> str:
    """F1 vs N of every feature: colour by feature, line style by method."""
    fig = Figure(figsize=(8.5, 3.4), dpi=90, layout="constrained")
    ax = fig.add_subplot()
    colours = [f"C{i % 10}" for i in range(len(head["features"]))]
    for f, colour in zip(head["features"], colours):
        for method, style in zip(METHODS, ("-", "--", ":")):
            xs, ys = _series(f["sweep"], method, "f1")
            if xs:
                ax.plot(xs, ys, style, color=colour, marker=".", label=f"{f['name']} {method}")
    _log2_axes(ax, "F1")
    ax.set_title(f"{_head_name(head)}: F1 vs N (solid: weights, dashed: importance, dotted: exact)", fontsize=10)
    if len(head["features"]) <= 8:
        fig.legend(fontsize=7, ncol=2, loc="outside right center")
    return _img(fig, f"F1 vs number of terms N for every feature of {_head_name(head)}", "f1-curves")


# ----------------------------------------------------------------------------------------------------------
# Feature


def _feature_section(feature: dict, head: dict, evidence: dict | None) -> str:
    name = feature["name"]
    parts = [
        f'<section class="feature" id="{_feature_id(name)}">',
        f"<h3>{_esc(name)}</h3>",
        f'<p class="meta">{feature.get("n_train", "?")} train and {feature.get("n_val", "?")} validation exemplars</p>',
        "<h4>Rules</h4>", _rules_table(feature, head),
        "<h4>Precision, recall and F1 vs number of terms N (validation)</h4>", _feature_curves(feature),
        "<h4>Top-activating exemplars</h4>", _exemplars(feature),
        "<h4>Distractor evidence</h4>", _distractor(feature, evidence, _input_names(head)),
    ]
    if feature.get("counting"):
        parts += ["<h4>Counting evidence</h4>", _counting(feature["counting"])]
    parts.append("</section>")
    return "\n".join(parts)


def _rules_table(feature: dict, head: dict) -> str:
    """Skip-gram rules of each ordering, then absence rules, the distractors the evidence dropped
    (unconfirmed by insertion, cleared by exact mode), and the counting rule (or why it is undetermined)."""
    rows = [(method, str(i + 1), text)
            for method in METHODS for i, text in enumerate(feature["rules"].get(method, {}).get("text", []))]
    rows += [("absence", str(i + 1), a["text"]) for i, a in enumerate(feature.get("absence") or [])]
    dropped = [(a, c) for a in (feature.get("absence") or []) + (feature.get("absence_dropped") or [])
               for c in a.get("checks", []) if c["status"] in ("cleared", "unconfirmed")]
    rows += [(f"not a distractor ({c['status']})", str(i + 1),
              f"distractor {c['distractor']} of term ({a['query']}, {a['key']}): activation "
              f"{c['mean_act_without']:.3g} → {c['mean_act_with']:.3g} when inserted; real logit "
              f"{c['logit_distractor']:.3g} vs key {c['logit_key']:.3g}") for i, (a, c) in enumerate(dropped)]
    if feature.get("counting"):
        rows.append(("counting", "1", feature["counting"]["text"]))
    elif (feature.get("counting_check") or {}).get("status") == "undetermined":
        rows.append(("counting", "–", f"undetermined: {feature['counting_check']['reason']}"))
    model = _model_id(head)
    cells = [[_esc(kind), _num_cell(rank), f'<td class="rule">{_rule_html(text, head["layer"], model)}</td>']
             for kind, rank, text in rows]
    return _table(["kind", "#", "rule"], cells, "rules")


def _model_id(head: dict) -> str:
    """Neuronpedia's model id: named in the metadata or settings if the run recorded it, else gpt2-small."""
    meta = head.get("metadata") or {}
    return meta.get("model") or (meta.get("settings") or {}).get("model") or DEFAULT_MODEL


def _rule_html(text: str, layer: int, model: str) -> str:
    """Escaped rule text; above layer 0, each input feature id links to its Neuronpedia page."""
    escaped = _esc(text)
    if layer == 0:
        return escaped
    return NEURONPEDIA_ID.sub(
        lambda m: f'[<a href="https://neuronpedia.org/{model}/{m.group(1)}" target="_blank" rel="noopener">'
                  f"{m.group(1)}</a>]", escaped)


def _feature_curves(feature: dict) -> str:
    """Precision, recall and F1 vs N, one panel per metric, one line per method."""
    fig = Figure(figsize=(9, 2.5), dpi=90, layout="constrained")
    axes = fig.subplots(1, len(METRICS), sharey=True)
    for ax, metric in zip(axes, METRICS):
        for method, style in zip(METHODS, ("-o", "--s", ":^")):
            xs, ys = _series(feature["sweep"], method, metric)
            if xs:
                ax.plot(xs, ys, style, markersize=3, label=method)
        _log2_axes(ax, metric)
        ax.set_title(metric, fontsize=10)
    axes[0].legend(fontsize=7)
    return _img(fig, f"precision, recall and F1 vs N for {feature['name']}", "metrics")


def _series(sweep: list, method: str, metric: str) -> tuple[list[int], list[float]]:
    """(N, metric) points of one method, by N; undefined values (None) become gaps."""
    points = sorted((p["num_rules"], p[metric]) for p in sweep if p["method"] == method)
    return [n for n, _ in points], [float("nan") if v is None else v for _, v in points]


def _log2_axes(ax, ylabel: str) -> None:
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("N (terms)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def _exemplars(feature: dict) -> str:
    """Each exemplar as two rows of tokens: shaded by the feature's activation, then by DFA to the scored position."""
    views = feature.get("exemplars") or []
    if not views:
        return '<p class="none">No exemplars stored.</p>'
    act_scale = _scale(v["acts"] for v in views)
    dfa_scale = _scale(v["dfa"] for v in views)
    legend = ('<p class="legend">Orange: positive, blue: negative; intensity relative to the largest value over '
              "these exemplars; outlined: the scored position. Hover a token for its value. Activation row: the "
              "feature's activation at each position; DFA row: each key position's direct contribution to the "
              "scored position's activation.</p>")
    blocks = []
    for v in views:
        t = v["position"]
        caption = (f"sequence {v['sequence']}, scored position {t} ({v['tokens'][t]!r}), "
                   f"activation {v['acts'][t]:.3g}")
        blocks.append(f'<div class="exemplar"><div class="caption">{_esc(caption)}</div>'
                      f'{_token_row("activation", "act", v["tokens"], v["acts"], act_scale, t)}'
                      f'{_token_row("DFA", "dfa", v["tokens"], v["dfa"], dfa_scale, t)}</div>')
    return legend + "\n".join(blocks)


def _scale(rows: Iterable[Sequence[float]]) -> float:
    """The largest absolute value over ``rows`` (1 when all are zero), so shading is comparable across rows."""
    return max((abs(x) for row in rows for x in row), default=0.0) or 1.0


def _token_row(label: str, attr: str, tokens: Sequence[str], values: Sequence[float], scale: float,
               scored: int) -> str:
    spans = []
    for t, (token, value) in enumerate(zip(tokens, values)):
        classes = "tok scored" if t == scored else "tok"
        alpha = min(1.0, abs(value) / scale) * 0.85
        rgb = "255,140,0" if value >= 0 else "40,110,255"
        spans.append(f'<span class="{classes}" data-{attr}="{value:.4g}" title="{label} {value:.4g}" '
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
    return _esc_p(f"{rule['text']}: kind {rule['kind']}, threshold {rule['threshold']}{base}.") + _table(header, rows, "counting")


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


def _img(fig: Figure, alt: str, cls: str) -> str:
    """The figure (with a constrained layout, so one draw suffices) as an inline PNG ``img.plot``."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img class="plot {cls}" alt="{_esc(alt)}" src="data:image/png;base64,{data}">'
