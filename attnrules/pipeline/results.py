"""What an extraction returns and writes: :class:`FeatureResult` per output feature and
:class:`HeadResult` per head (tables, text summary, the files of an output folder).

Every result type is a frozen dataclass of typed fields (:class:`Record`) with ``to_json()`` (a
JSON-ready dict), ``from_json()`` (the same object back) and ``to_frame()`` (a table). Values are
kept as they read back from JSON, so a result equals its reloaded copy: tuples (never tensors or
lists), plain ints and floats, and None for an undefined number (NaN, e.g. Spearman's rho on constant
input). Input features are named query first, then key, as the engine orders them.

A head folder (written by :meth:`HeadResult.write`, last of all the completion marker ``DONE.json``)::

    results.json                       HeadResult.to_json()
    rules.csv metrics.csv pairs.csv absence.csv distractor_checks.csv counting.csv predictions.csv
    DONE.json                          {"inputs": content hashes, "run": RunInfo, "files": [...]}

(plus what resuming needs, see :mod:`attnrules.pipeline.resume`: ``RUN.json``, ``scan.pt`` and
``features/*.json``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from attnrules.files import write_csv, write_json
from attnrules.evaluation.counts import CountingCheck
from attnrules.evaluation.insertion import InsertionResult
from attnrules.exemplars import ExemplarView
from attnrules.records import Record, _dump
from attnrules.rules.absence import AbsenceRule, PaperDistractor
from attnrules.rules.counting import CountingRule
from attnrules.rules.term_table import term_table

RESULTS_FILE = "results.json"
MARKER_FILE = "DONE.json"  # written last: a head folder without it is not complete
CSV_FILES = ("rules.csv", "metrics.csv", "pairs.csv", "absence.csv", "distractor_checks.csv", "counting.csv",
             "predictions.csv")
HEAD_FILES = (RESULTS_FILE, *CSV_FILES, MARKER_FILE)

# ----------------------------------------------------------------------------------------------------------
# Per feature


@dataclass(frozen=True)
class StepError(Record):
    """A step of one feature (or of the head) that raised; the run went on without it."""

    step: str
    error: str  # "ExceptionType: message"


@dataclass(frozen=True)
class RuleTerm(Record):
    """One term of a rule set as stored: rank, input features (query, key), A and V, their descriptions,
    and the exact-mode weight (None for the other orderings). A pseudo-feature key has no V (None). On a
    rotary head: the best ``offset`` (where A is taken; -1 for a pseudo term) and the ``offsets`` where
    the term fires, as text ("δ=1", "any", ...); None on heads with absolute positions."""

    rank: int
    query: int
    key: int
    attn_score: Optional[float]
    value_score: Optional[float]
    query_desc: str
    key_desc: str
    weight: Optional[float] = None
    offset: Optional[int] = None
    offsets: Optional[str] = None

    def to_json(self) -> dict:  # the columns of SkipgramRuleSet.to_frame, in its order
        data = {"rank": self.rank, "query": self.query, "key": self.key, "attn_score": self.attn_score,
                "value_score": self.value_score}
        if self.weight is not None:
            data["weight"] = self.weight
        if self.offset is not None:
            data["offset"], data["offsets"] = self.offset, self.offsets
        return {**data, "query_desc": self.query_desc, "key_desc": self.key_desc}


@dataclass(frozen=True)
class RuleSetView(Record):
    """The top ``show_terms`` terms of one ordering ("weights", "importance", "exact"), with their text."""

    method: str
    key_power: int
    terms: tuple[RuleTerm, ...]
    text: tuple[str, ...]

    @classmethod
    def from_rules(cls, rules, describe) -> "RuleSetView":
        """From a :class:`~attnrules.rules.SkipgramRuleSet` and the input descriptions."""
        terms = rules.to_frame(describe).drop(columns=["feature", "method"]).to_dict(orient="records")
        return cls(rules.method, rules.key_power, tuple(RuleTerm.from_json(t) for t in terms),
                   tuple(rules.render(describe)))

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame([{"method": self.method, **t.to_json()} for t in self.terms])


@dataclass(frozen=True)
class SweepRecord(Record):
    """One point of the sweep over N: the ordering, N asked for, the terms the rule really has, and its
    metrics on the validation exemplars (the row of ``metrics.csv``).

    ``negatives``: "random" — REF's evaluation (the val split: top-activating sequences and random
    sequences where the feature never fires); "pattern" — the same positives and pattern negatives
    (positions where the feature's rule terms fire but the feature does not;
    :mod:`attnrules.evaluation.negatives`). ``method`` is an ordering ("weights", "importance", "exact",
    "unigram") or a combined rule set, ``"{ordering}+absence+counting"`` (its terms with their absence
    conditions and counting threshold, :class:`~attnrules.rules.combined.CombinedRuleSet`).
    ``aggregation``: how the matches of an exemplar make its predicted score (REF's aggregation types)."""

    method: str
    num_rules: int
    num_terms: int
    tp: int
    fp: int
    fn: int
    tn: int
    precision: Optional[float]
    recall: Optional[float]
    f1: Optional[float]
    spearman: Optional[float]  # None: undefined (constant input)
    pvalue: Optional[float]
    negatives: str = "random"
    aggregation: Optional[str] = None

    @classmethod
    def from_point(cls, point) -> "SweepRecord":
        """From an :class:`~attnrules.evaluation.SweepPoint`."""
        return cls.from_json(point.to_dict())


@dataclass(frozen=True)
class PredictedLabels(Record):
    """One rule set's predictions on an evaluation set: ``predicted`` holds one character per exemplar,
    in the set's order, "1" when the rule predicts the feature active and "0" when not."""

    method: str
    num_rules: int
    predicted: str


@dataclass(frozen=True)
class Predictions(Record):
    """Per-example predictions of one evaluation (``negatives`` "random" or "pattern", as in
    :class:`SweepRecord`): each exemplar's corpus row, scored position and true max activation (active:
    above the threshold), and every (method, N) of the sweep's predicted labels. ``n_candidates``: for
    pattern negatives, how many (sequence, position) candidates the search found before sampling."""

    negatives: str
    sequence: tuple[int, ...]
    position: tuple[int, ...]
    act_max: tuple[float, ...]
    labels: tuple[PredictedLabels, ...] = ()
    n_candidates: Optional[int] = None

    @classmethod
    def from_points(cls, negatives: str, sequence, position, act_max, points, n_candidates: Optional[int] = None
                    ) -> "Predictions":
        """From an evaluation set (tensors ``[N]``) and the sweep points evaluated on it (those of
        ``negatives`` with predicted labels, :class:`~attnrules.evaluation.SweepPoint`)."""
        labels = tuple(PredictedLabels(p.method, p.n_terms, "".join("1" if x else "0" for x in p.predicted.tolist()))
                       for p in points if p.negatives == negatives and p.predicted is not None)
        return cls(negatives, tuple(sequence.tolist()), tuple(position.tolist()), tuple(act_max.tolist()), labels,
                   n_candidates)

    def to_frame(self) -> pd.DataFrame:
        """One row per exemplar; per method a string of its labels over the sweep's N (ascending)."""
        frame = pd.DataFrame({"negatives": self.negatives, "example": range(len(self.sequence)),
                              "sequence": self.sequence, "position": self.position, "act_max": self.act_max})
        for method in dict.fromkeys(label.method for label in self.labels):
            runs = sorted((label.num_rules, label.predicted) for label in self.labels if label.method == method)
            frame[method] = ["".join(p[i] for _, p in runs) for i in range(len(self.sequence))]
        return frame


@dataclass(frozen=True)
class PairRecord(Record):
    """One of the exhaustive top pairs over all n_in × n_in (query, key) pairs."""

    ranking: str  # "weights_all_pairs" (by A×V) or "importance_all_pairs" (by |importance|)
    rank: int
    query: int
    key: int
    score: Optional[float]
    query_desc: str
    key_desc: str
    offset: Optional[int] = None  # rotary heads, weights ranking: the pair's best offset


@dataclass(frozen=True)
class UnseenKey(Record):
    """A candidate key with a significant positive value that no train positive holds."""

    key: int
    key_desc: str
    value_score: float


@dataclass(frozen=True)
class ActivationHistogram(Record):
    """The feature's activation over the whole corpus, from the scan: each sequence's max activation,
    binned over the active sequences (``edges``: bin bounds, ``counts``: sequences per bin), and the
    number of sequences where it never fires."""

    edges: tuple[float, ...]
    counts: tuple[int, ...]
    n_inactive: int

    @classmethod
    def of(cls, act_max, bins: int = 30) -> "ActivationHistogram":
        """From every sequence's max activation (``act_max [n_sequences]``, e.g. a scan's column)."""
        values = np.asarray(act_max, dtype=np.float64)
        active = values[values > 0]
        if active.size == 0:
            return cls((), (), int(values.size))
        counts, edges = np.histogram(active, bins=bins, range=(0.0, float(active.max())))
        return cls(tuple(edges.tolist()), tuple(counts.tolist()), int(values.size - active.size))


@dataclass(frozen=True)
class FeatureResult(Record):
    """Rules and their evaluation for one output feature."""

    feature: int
    name: str
    n_train: int
    n_val: int
    rules: tuple[RuleSetView, ...] = ()  # one per ordering, the top ``show_terms`` terms
    sweep: tuple[SweepRecord, ...] = ()
    pairs: tuple[PairRecord, ...] = ()  # exhaustive top pairs
    absence: tuple[AbsenceRule, ...] = ()  # top terms with a distractor kept
    paper_distractor: Optional[PaperDistractor] = None  # REF's single check (reference §6.1)
    counting: Optional[CountingRule] = None  # when the feature counts
    exemplars: tuple[ExemplarView, ...] = ()  # the top validation exemplars
    absence_dropped: tuple[AbsenceRule, ...] = ()  # absence terms whose every tested distractor was
    # unconfirmed by insertion or cleared by exact mode (with the evidence)
    counting_check: Optional[CountingCheck] = None  # what the counting detector did, and why
    unseen_keys: tuple[UnseenKey, ...] = ()  # candidate keys with V > 0 never present in a train positive
    notes: tuple[str, ...] = ()  # e.g. "no key's value score rises above float noise"
    errors: tuple[StepError, ...] = ()  # each step that failed for this feature
    pattern_negatives: tuple[ExemplarView, ...] = ()  # sampled pattern negatives, with the matched terms and
    # the conditions of the combined rule sets that hold there
    predictions: tuple[Predictions, ...] = ()  # per-example predictions, one per evaluation (random, pattern)
    histogram: Optional[ActivationHistogram] = None  # the max activation of every corpus sequence
    decile_exemplars: tuple[ExemplarView, ...] = ()  # one active sequence per decile of the activation, weakest first

    @property
    def methods(self) -> tuple[str, ...]:
        return tuple(r.method for r in self.rules)

    def rule_set(self, method: str) -> RuleSetView:
        """The rules of one ordering ("weights", "importance", "exact")."""
        for r in self.rules:
            if r.method == method:
                return r
        raise KeyError(f"{self.name} has no {method!r} rules (it has {list(self.methods)})")

    def to_json(self) -> dict:
        data = super().to_json()
        data["rules"] = {r.method: r.to_json() for r in self.rules}
        return data

    @classmethod
    def from_json(cls, data: dict) -> "FeatureResult":
        if isinstance(data, cls):
            return data
        rules = data.get("rules") or {}
        if isinstance(rules, dict):
            rules = [{"method": m, **r} for m, r in rules.items()]
        return super().from_json({**data, "rules": rules})

    def summary_row(self) -> dict:
        """The feature's row of the sweep's ``features`` table."""
        return {"feature": self.name,
                "has_distractor": bool(self.paper_distractor and self.paper_distractor.has_distractor),
                "n_absence_rules": len(self.absence),
                "counting_rule": self.counting.text if self.counting else None,
                "counting_status": self.counting_check.status if self.counting_check else None,
                "failed_steps": "; ".join(e.step for e in self.errors),
                "n_train": self.n_train, "n_val": self.n_val}

    def to_frame(self) -> pd.DataFrame:
        """One row: :meth:`summary_row`."""
        return pd.DataFrame([self.summary_row()])


# ----------------------------------------------------------------------------------------------------------
# Per head


@dataclass(frozen=True)
class PrevalenceExample(Record):
    """A corpus sequence with the skip-gram: first key (k1), distractor (k2, when before q) and query positions."""

    idx: int
    kind: str  # "no_distractor" | "has_distractor"
    q_pos: int
    act_out: float
    k1_pos: Optional[int] = None
    k2_pos: Optional[int] = None

    def to_json(self) -> dict:
        data = {"idx": self.idx}
        data.update({k: v for k, v in (("k1_pos", self.k1_pos), ("k2_pos", self.k2_pos)) if v is not None})
        return {**data, "q_pos": self.q_pos, "kind": self.kind, "act_out": _dump(self.act_out)}


@dataclass(frozen=True)
class DistractorEvidence(Record):
    """REF's distractor evidence for a flagged feature: natural prevalence of the skip-gram (key … query)
    with and without the distractor over the corpus, and counterfactual insertion."""

    feature: str  # the feature's name
    query: int
    key: int
    distractor: int
    kq_count: int
    kkq_count: int
    mean_act_without: Optional[float]
    mean_act_with: Optional[float]
    examples: tuple[PrevalenceExample, ...] = ()
    insertion: Optional[InsertionResult] = None

    @property
    def share_with_distractor(self) -> Optional[float]:
        total = self.kq_count + self.kkq_count
        return self.kkq_count / total if total else None

    def _derived(self) -> dict:
        return {"share_with_distractor": self.share_with_distractor}


@dataclass(frozen=True)
class KeptActs(Record):
    """What a corpus pass kept of the corpus's input-SAE activations: rows, bytes, and whether the bound
    (``corpus_acts_mib``) was reached (rows past it were left to the exemplar passes)."""

    rows: int
    bytes: int
    full: bool


@dataclass(frozen=True)
class RunInfo(Record):
    """How a run produced its result (not part of result equality): the corpus scan ("computed",
    "cached": read from the folder, "given": passed in, "none": the head was complete and only read),
    the features computed by this run and those reused from an earlier one, and what the corpus pass
    kept of the input activations (``corpus_acts``: rows, bytes, whether its bound was reached; None:
    nothing kept, e.g. a cached scan)."""

    scan: str = "computed"
    computed: tuple[str, ...] = ()
    reused: tuple[str, ...] = ()
    corpus_acts: Optional["KeptActs"] = None


@dataclass(frozen=True)
class HeadResult(Record):
    """The results of one head. ``metadata`` is the run's JSON-ready record (settings, notes, sizes,
    ``inputs``: the content hashes of model, SAEs, corpus and settings, ``head_metrics``: the head's
    attention metrics over the corpus, ``input_features``: the description of every input feature its
    rules name, ...); ``run`` says how this object was produced and is left out of equality and of
    ``results.json`` (it goes to ``DONE.json``). In a notebook it shows as its report section."""

    layer: int
    head: int
    features: tuple[FeatureResult, ...]
    metadata: dict = field(default_factory=dict)
    distractors: tuple[DistractorEvidence, ...] = ()
    run: Optional[RunInfo] = field(default=None, compare=False)

    def _repr_html_(self) -> str:
        """The head's section of the HTML report (:mod:`attnrules.report`), for notebooks."""
        from attnrules.report import head_html

        return head_html(self.to_json())

    def feature(self, name: str) -> FeatureResult:
        for f in self.features:
            if f.name == name:
                return f
        raise KeyError(f"no feature {name!r} in L{self.layer}H{self.head}")

    def to_json(self) -> dict:
        return {"layer": self.layer, "head": self.head, "metadata": self.metadata,
                "features": [f.to_json() for f in self.features], "distractors": [d.to_json() for d in self.distractors]}

    @classmethod
    def from_json(cls, data: dict, run: Optional[RunInfo] = None) -> "HeadResult":
        if isinstance(data, cls):
            return data
        return cls(data["layer"], data["head"], tuple(FeatureResult.from_json(f) for f in data["features"]),
                   data.get("metadata") or {}, tuple(DistractorEvidence.from_json(d) for d in data.get("distractors") or ()),
                   run)

    def to_frame(self) -> pd.DataFrame:
        """One row per feature (layer, head and :meth:`FeatureResult.summary_row`)."""
        columns = ["layer", "head", "feature", "has_distractor", "n_absence_rules", "counting_rule", "counting_status",
                   "failed_steps", "n_train", "n_val"]
        return pd.DataFrame([{"layer": self.layer, "head": self.head, **f.summary_row()} for f in self.features],
                            columns=columns)

    def metrics_frame(self) -> pd.DataFrame:
        return pd.DataFrame([{"feature": f.name, **p.to_json()} for f in self.features for p in f.sweep])

    def rules_frame(self) -> pd.DataFrame:
        return pd.DataFrame([{"feature": f.name, "method": r.method, **t.to_json()}
                             for f in self.features for r in f.rules for t in r.terms])

    def absence_frame(self) -> pd.DataFrame:
        rows = [{"feature": f.name, "query": a.query, "key": a.key, "distractors": list(a.distractors), "text": a.text}
                for f in self.features for a in f.absence]
        return pd.DataFrame(rows, columns=["feature", "query", "key", "distractors", "text"])

    def distractor_checks_frame(self) -> pd.DataFrame:
        """One row per distractor tested by insertion: its status (confirmed / unconfirmed / cleared /
        untested), the mean activation without and with it, and the real logits and values."""
        rows = [{"feature": f.name, "query": a.query, "key": a.key, **c.to_json()}
                for f in self.features for a in f.absence + f.absence_dropped for c in a.checks]
        columns = ["feature", "query", "key", "distractor", "token", "status", "n_examples", "mean_act_without",
                   "mean_act_with", "logit_key", "logit_distractor", "value_key", "value_distractor"]
        return pd.DataFrame(rows, columns=columns)

    def counting_frame(self) -> pd.DataFrame:
        """One row per counting rule; ``counts`` is a list of [key copies, other copies] and ``mean_act``
        the mean activation at each (JSON lists, the same for fresh and resumed features)."""
        rows = [{"feature": f.name, "kind": f.counting.kind, "threshold": f.counting.threshold, "text": f.counting.text,
                 "counts": _dump(f.counting.evidence.counts), "mean_act": _dump(f.counting.evidence.mean_act)}
                for f in self.features if f.counting]
        return pd.DataFrame(rows, columns=["feature", "kind", "threshold", "text", "counts", "mean_act"])

    def pairs_frame(self) -> pd.DataFrame:
        return pd.DataFrame([{"feature": f.name, **row.to_json()} for f in self.features for row in f.pairs])

    def predictions_frame(self) -> pd.DataFrame:
        """One row per (feature, evaluation, exemplar): its corpus row, position and true max activation,
        and per method its predicted labels over N as a string ("0011…": character i is the i-th N)."""
        frames = [p.to_frame().assign(feature=f.name) for f in self.features for p in f.predictions]
        if not frames:
            return pd.DataFrame(columns=["feature", "negatives", "example", "sequence", "position", "act_max"])
        frame = pd.concat(frames, ignore_index=True)
        return frame[["feature", *[c for c in frame.columns if c != "feature"]]]

    def marker(self) -> dict:
        """The completion marker's content: the inputs' hashes, how the run went, the files it completes."""
        return {"layer": self.layer, "head": self.head, "inputs": self.metadata.get("inputs"),
                "run": self.run.to_json() if self.run is not None else None, "files": list(HEAD_FILES[:-1])}

    def write(self, out_dir: Path | str) -> list[Path]:
        """results.json and rules, metrics, pairs, absence, distractor-check and counting CSVs in
        ``out_dir`` (each written atomically), then the completion marker DONE.json (an older marker is
        removed first, so a folder killed while being written never looks complete)."""
        out = Path(out_dir)
        (out / MARKER_FILE).unlink(missing_ok=True)
        frames = (self.rules_frame(), self.metrics_frame(), self.pairs_frame(), self.absence_frame(),
                  self.distractor_checks_frame(), self.counting_frame(), self.predictions_frame())
        written = [write_json(out / RESULTS_FILE, self.to_json())]
        written += [write_csv(out / name, frame) for name, frame in zip(CSV_FILES, frames)]
        return written + [write_json(out / MARKER_FILE, self.marker())]

    def summary(self, n_terms: Optional[int] = None) -> str:
        """The top rules of each feature as text and a P/R/F1 table by method and N."""
        lines = [f"Head L{self.layer}H{self.head}: {len(self.features)} features"]
        for f in self.features:
            lines.append(f"\n{f.name}  (train {f.n_train}, val {f.n_val} exemplars)")
            for rules in f.rules:
                table, left_out = term_table(rules.terms, f.name, n_terms)
                label = f"  {rules.method}:"
                head = "    " + table[0] if table else ""  # the column titles, aligned with the terms below
                lines.append(label + " no term can contribute" if not table else label + head[len(label):]
                             if head[:len(label)].isspace() else f"{label}\n{head}")
                lines += [f"    {t}" for t in table[1:]]
                if left_out:
                    lines.append(f"    ({left_out} of {len(rules.terms)} stored terms left out: A×V = 0 or no firing "
                                 "offset, they cannot contribute; rules.csv keeps them)")
            if f.absence:
                lines.append("  absence:")
                lines += [f"    {a.text}" for a in f.absence]
            status = [st for a in f.absence + f.absence_dropped for st in a.statuses]
            if "cleared" in status or "unconfirmed" in status:
                lines.append(f"  paper-mode distractors dropped: {status.count('cleared')} cleared by exact mode, "
                             f"{status.count('unconfirmed')} unconfirmed by insertion")
            if f.counting:
                lines.append(f"  counting:\n    {f.counting.text}")
            elif f.counting_check and f.counting_check.status == "undetermined":
                lines.append(f"  counting: undetermined ({f.counting_check.reason})")
            lines += [f"  note: {n}" for n in f.notes]
            lines += [f"  failed step {e.step}: {e.error}" for e in f.errors]
        failed = [e for f in self.features for e in f.errors]
        if failed:
            lines.append(f"\n{len(failed)} failed steps in {sum(bool(f.errors) for f in self.features)} features "
                         f"(recorded in their results; the run went on)")
        groups = self.metadata.get("exact_logit_groups")
        if groups:
            top = sorted(groups, key=lambda g: -g["share"])[:6]
            lines.append("\nExact mode: the real attention logit by term group (share of mean |term|): "
                         + ", ".join(f"{g['group']} {g['share']:.1%}" for g in top))
        for d in self.distractors:
            lines.append(f"\n{d.feature}: distractor in {d.kkq_count} of {d.kkq_count + d.kq_count} natural "
                         f"skip-gram sequences; mean activation {_fmt(d.mean_act_without)} without, "
                         f"{_fmt(d.mean_act_with)} with")
            if d.insertion:
                lines.append("  inserted n times: " + ", ".join(
                    f"n={n}: {_fmt(a)}" for n, a in zip(d.insertion.counts, d.insertion.mean_act)))
        frame = self.metrics_frame()
        if not frame.empty:
            ref = frame[(frame["negatives"] == "random") & ~frame["method"].str.contains("+", regex=False)]
            table = ref.pivot_table(index="num_rules", columns="method", values=["precision", "recall", "f1"],
                                    aggfunc="mean")
            lines += ["", "Mean precision / recall / F1 over features, by number of terms N:",
                      table.to_string(float_format=lambda v: f"{v:.3f}")]
            if len(ref) < len(frame):  # combined sets or pattern negatives: F1 per evaluation and method
                table = frame.pivot_table(index=["negatives", "method"], columns="num_rules", values="f1", aggfunc="mean")
                lines += ["", "Mean F1 by N on REF's exemplars (random) and on pattern negatives (the val positives "
                          "and silent positions where the rule terms fire); +absence+counting: the combined sets:",
                          table.to_string(float_format=lambda v: f"{v:.3f}")]
        return "\n".join(lines)


def _fmt(value: Optional[float]) -> str:
    return "nan" if value is None else f"{value:.3f}"
