"""What an extraction returns and writes: :class:`FeatureResult` per output feature and
:class:`HeadResult` per head (tables, text summary, the files of an output folder)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pandas as pd

from attnrules.files import write_csv, write_json


@dataclass(frozen=True)
class FeatureResult:
    """Rules and their evaluation for one output feature."""

    feature: int
    name: str
    n_train: int
    n_val: int
    rules: dict  # method -> {"terms": [...], "text": [...]} for the top ``show_terms`` terms
    sweep: list  # SweepPoint.to_dict() rows
    pairs: list = field(default_factory=list)  # exhaustive top pairs: {"ranking", "rank", "query", "key", "score"}
    absence: list = field(default_factory=list)  # AbsenceRule.to_dict() of the top terms that have distractors
    paper_distractor: Optional[dict] = None  # REF's single check (reference §6.1)
    counting: Optional[dict] = None  # CountingRule.to_dict() when the feature counts
    exemplars: list = field(default_factory=list)  # ExemplarView.to_dict() of the top validation exemplars
    absence_dropped: list = field(default_factory=list)  # absence terms whose every tested distractor was
    # unconfirmed by insertion or cleared by exact mode (AbsenceRule.to_dict() with the evidence)
    counting_check: Optional[dict] = None  # CountingCheck.to_dict(): what the counting detector did, and why
    unseen_keys: list = field(default_factory=list)  # candidate keys with V > 0 never present in a train positive
    notes: list = field(default_factory=list)  # e.g. "no key's value score rises above float noise"
    errors: list = field(default_factory=list)  # {"step", "error"} of each step that failed for this feature

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "FeatureResult":
        return cls(**data)


@dataclass(frozen=True)
class HeadResult:
    layer: int
    head: int
    features: list
    metadata: dict = field(default_factory=dict)
    distractors: list = field(default_factory=list)  # distractor_evidence() rows

    def metrics_frame(self) -> pd.DataFrame:
        rows = [{"feature": f.name, **point} for f in self.features for point in f.sweep]
        return pd.DataFrame(rows)

    def rules_frame(self) -> pd.DataFrame:
        rows = [
            {"feature": f.name, "method": method, **term}
            for f in self.features
            for method, rules in f.rules.items()
            for term in rules["terms"]
        ]
        return pd.DataFrame(rows)

    def absence_frame(self) -> pd.DataFrame:
        rows = [{"feature": f.name, "query": a["query"], "key": a["key"], "distractors": list(a["distractors"]),
                 "text": a["text"]} for f in self.features for a in f.absence]
        return pd.DataFrame(rows, columns=["feature", "query", "key", "distractors", "text"])

    def distractor_checks_frame(self) -> pd.DataFrame:
        """One row per distractor tested by insertion: its status (confirmed / unconfirmed / cleared /
        untested), the mean activation without and with it, and the real logits and values."""
        rows = [{"feature": f.name, "query": a["query"], "key": a["key"], **c}
                for f in self.features for a in f.absence + f.absence_dropped for c in a["checks"]]
        columns = ["feature", "query", "key", "distractor", "token", "status", "n_examples", "mean_act_without",
                   "mean_act_with", "logit_key", "logit_distractor", "value_key", "value_distractor"]
        return pd.DataFrame(rows, columns=columns)

    def counting_frame(self) -> pd.DataFrame:
        rows = [{"feature": f.name, "kind": f.counting["kind"], "threshold": f.counting["threshold"],
                 "text": f.counting["text"], "counts": f.counting["evidence"]["counts"],
                 "mean_act": f.counting["evidence"]["mean_act"]} for f in self.features if f.counting]
        return pd.DataFrame(rows, columns=["feature", "kind", "threshold", "text", "counts", "mean_act"])

    def pairs_frame(self) -> pd.DataFrame:
        return pd.DataFrame([{"feature": f.name, **row} for f in self.features for row in f.pairs])

    def to_dict(self) -> dict:
        return {"layer": self.layer, "head": self.head, "metadata": self.metadata,
                "features": [f.to_dict() for f in self.features], "distractors": self.distractors}

    def write(self, out_dir: Path | str) -> list[Path]:
        """results.json and rules, metrics, pairs, absence, distractor-check and counting CSVs in
        ``out_dir`` (each written atomically)."""
        out = Path(out_dir)
        return [
            write_json(out / "results.json", self.to_dict()),
            write_csv(out / "rules.csv", self.rules_frame()),
            write_csv(out / "metrics.csv", self.metrics_frame()),
            write_csv(out / "pairs.csv", self.pairs_frame()),
            write_csv(out / "absence.csv", self.absence_frame()),
            write_csv(out / "distractor_checks.csv", self.distractor_checks_frame()),
            write_csv(out / "counting.csv", self.counting_frame()),
        ]

    def summary(self, n_terms: Optional[int] = None) -> str:
        """The top rules of each feature as text and a P/R/F1 table by method and N."""
        lines = [f"Head L{self.layer}H{self.head}: {len(self.features)} features"]
        for f in self.features:
            lines.append(f"\n{f.name}  (train {f.n_train}, val {f.n_val} exemplars)")
            for method, rules in f.rules.items():
                lines.append(f"  {method}:")
                lines += [f"    {t}" for t in rules["text"][:n_terms]]
            if f.absence:
                lines.append("  absence:")
                lines += [f"    {a['text']}" for a in f.absence]
            status = [st for a in f.absence + f.absence_dropped for st in a["status"]]
            if "cleared" in status or "unconfirmed" in status:
                lines.append(f"  paper-mode distractors dropped: {status.count('cleared')} cleared by exact mode, "
                             f"{status.count('unconfirmed')} unconfirmed by insertion")
            if f.counting:
                lines.append(f"  counting:\n    {f.counting['text']}")
            elif f.counting_check and f.counting_check["status"] == "undetermined":
                lines.append(f"  counting: undetermined ({f.counting_check['reason']})")
            lines += [f"  note: {n}" for n in f.notes]
            lines += [f"  failed step {e['step']}: {e['error']}" for e in f.errors]
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
            line = (f"\n{d['feature']}: distractor in {d['kkq_count']} of {d['kkq_count'] + d['kq_count']} natural "
                    f"skip-gram sequences; mean activation {d['mean_act_without']:.3f} without, {d['mean_act_with']:.3f} with")
            lines.append(line)
            if d["insertion"]:
                ins = d["insertion"]
                lines.append("  inserted n times: " + ", ".join(f"n={n}: {a:.3f}" for n, a in zip(ins["counts"], ins["mean_act"])))
        frame = self.metrics_frame()
        if not frame.empty:
            table = frame.pivot_table(index="num_rules", columns="method", values=["precision", "recall", "f1"],
                                      aggfunc="mean")
            lines += ["", "Mean precision / recall / F1 over features, by number of terms N:",
                      table.to_string(float_format=lambda v: f"{v:.3f}")]
        return "\n".join(lines)
