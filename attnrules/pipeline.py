"""The whole pipeline for one head: scores → candidates → importances → rules → evaluation.

Besides REF's candidate-based rules, every feature also gets the exhaustive top pairs over all
n_in × n_in (query, key) pairs, by A×V and by importance (``exhaustive_k``; through the engine).

:func:`extract_head` runs REF's procedure (reference-behaviour §3–5) for the sampled features of one
head and returns a :class:`HeadResult`; with ``out_dir`` every finished feature is written at once
(atomically) and a rerun with the same settings skips it, so long runs can be resumed.
Where a requested number exceeds what exists (REF's top-100 keys on an SAE with fewer input
features), it is capped, with a warning kept in the result's metadata.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pandas as pd
import torch

from attnrules.circuit import HeadCircuit
from attnrules.descriptions import InputDescriptions, describe_input_features
from attnrules.evaluation import SweepPoint, n_terms_grid, sweep
from attnrules.exemplars import input_activations, sample_exemplars, sample_features, scan_output_features
from attnrules.importance import paper_importance, rank_all_pairs_by_importance
from attnrules.results import plain, write_csv, write_json
from attnrules.rules import SkipgramRuleSet, rules_from_importance, rules_from_weights
from attnrules.scoring import candidate_table, rank_all_pairs


@dataclass(frozen=True)
class ExtractSettings:
    """REF's defaults (reference-behaviour §8), each a knob."""

    features: Optional[tuple[int, ...]] = None  # explicit output features; None: sample as REF
    num_features: Optional[int] = 100
    min_count: int = 150
    max_count: Optional[int] = None  # None: n_sequences - min_count
    examples_per_bin: int = 150
    num_values: int = 100
    num_queries: int = 100
    max_rules: int = 4096
    negative_values: bool = False
    absolute: bool = True
    loss_type: str = "activation"
    threshold: float = 0.0
    seed: int = 0
    batch_size: int = 64
    backend: str = "auto"
    show_terms: int = 8
    exhaustive_k: int = 100  # also rank all n_in × n_in pairs by A×V and by importance (0: skip)

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(plain(dataclasses.asdict(self)), sort_keys=True).encode()).hexdigest()[:16]


def _rules_to_dict(rules: SkipgramRuleSet, describe: InputDescriptions) -> dict:
    return {
        "method": rules.method,
        "key_power": rules.key_power,
        "terms": rules.to_frame(describe).drop(columns=["feature", "method"]).to_dict(orient="records"),
        "text": rules.render(describe),
    }


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

    def pairs_frame(self) -> pd.DataFrame:
        return pd.DataFrame([{"feature": f.name, **row} for f in self.features for row in f.pairs])

    def to_dict(self) -> dict:
        return {"layer": self.layer, "head": self.head, "metadata": self.metadata,
                "features": [f.to_dict() for f in self.features]}

    def write(self, out_dir: Path | str) -> list[Path]:
        """results.json, rules.csv, metrics.csv and pairs.csv in ``out_dir`` (each written atomically)."""
        out = Path(out_dir)
        return [
            write_json(out / "results.json", self.to_dict()),
            write_csv(out / "rules.csv", self.rules_frame()),
            write_csv(out / "metrics.csv", self.metrics_frame()),
            write_csv(out / "pairs.csv", self.pairs_frame()),
        ]

    def summary(self, n_terms: Optional[int] = None) -> str:
        """The top rules of each feature as text and a P/R/F1 table by method and N."""
        lines = [f"Head L{self.layer}H{self.head}: {len(self.features)} features"]
        for f in self.features:
            lines.append(f"\n{f.name}  (train {f.n_train}, val {f.n_val} exemplars)")
            for method, rules in f.rules.items():
                lines.append(f"  {method}:")
                lines += [f"    {t}" for t in rules["text"][:n_terms]]
        frame = self.metrics_frame()
        if not frame.empty:
            table = frame.pivot_table(index="num_rules", columns="method", values=["precision", "recall", "f1"],
                                      aggfunc="mean")
            lines += ["", "Mean precision / recall / F1 over features, by number of terms N:",
                      table.to_string(float_format=lambda v: f"{v:.3f}")]
        return "\n".join(lines)


def _capped(name: str, asked: int, available: int, notes: list[str]) -> int:
    if asked <= available:
        return asked
    message = f"{name}={asked} capped to {available} (the number of input features)"
    warnings.warn(message, stacklevel=3)
    notes.append(message)
    return available


def _first_appearance(index: torch.Tensor) -> torch.Tensor:
    """Unique values in order of first appearance (REF's ``Series.unique()``)."""
    return torch.tensor(pd.unique(index.numpy()), dtype=torch.int64)


def extract_feature(
    circuit: HeadCircuit,
    feature: int,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    settings: ExtractSettings,
    describe: InputDescriptions,
) -> tuple[dict, list[SweepPoint]]:
    """Rules of both orderings for one feature and their sweep over N on the validation exemplars.

    ``train`` = (acts ``[N, T, n_in]``, positions); ``val`` = (acts, positions, act_max).
    """
    table = candidate_table(circuit, feature, num_values=settings.num_values, num_queries=settings.num_queries,
                            negative_values=settings.negative_values, backend=settings.backend)
    keys, queries = _first_appearance(table.keys), _first_appearance(table.queries)
    importance = paper_importance(circuit, feature, keys, queries, *train, loss_type=settings.loss_type)
    builders = {
        "weights": lambda n: rules_from_weights(table, n),
        "importance": lambda n: rules_from_importance(circuit, feature, keys, queries, importance, n,
                                                      absolute=settings.absolute),
    }
    grid = n_terms_grid(settings.max_rules)
    points, rules = [], {}
    for method, build in builders.items():
        points += sweep(build, *val, grid, threshold=settings.threshold)
        rules[method] = _rules_to_dict(build(settings.show_terms), describe)
    return rules, points


def exhaustive_pairs(
    circuit: HeadCircuit, feature: int, train: tuple[torch.Tensor, torch.Tensor], k: int, backend: str,
    describe: InputDescriptions,
) -> list[dict]:
    """The k best of all n_in × n_in pairs by A×V and by |importance| (surrogate over all features)."""
    k = min(k, circuit.n_inputs**2)
    by_weight = rank_all_pairs(circuit, feature, k, backend=backend)
    by_importance = rank_all_pairs_by_importance(circuit, feature, *train, k, backend=backend)
    rows = []
    for ranking, q, kk, score in (
        ("weights_all_pairs", by_weight.queries, by_weight.keys, by_weight.score),
        ("importance_all_pairs", by_importance.query_idx, by_importance.key_idx, by_importance.scores),
    ):
        for rank, (qi, ki, si) in enumerate(zip(q.tolist(), kk.tolist(), score.tolist())):
            rows.append({"ranking": ranking, "rank": rank, "query": qi, "key": ki, "score": si,
                         "query_desc": describe(qi), "key_desc": describe(ki)})
    return rows


def extract_head(
    model,
    input_sae,
    output_sae,
    tokens: torch.Tensor,
    *,
    settings: ExtractSettings = ExtractSettings(),
    out_dir: Optional[Path | str] = None,
    progress: bool = True,
) -> HeadResult:
    """Run the pipeline on one head (the output SAE's layer and head) over a token corpus."""
    circuit = HeadCircuit.from_model(model, input_sae, output_sae)
    notes: list[str] = []
    fingerprint = settings.fingerprint()
    settings = dataclasses.replace(
        settings,
        num_values=_capped("num_values", settings.num_values, circuit.n_inputs, notes),
        num_queries=_capped("num_queries", settings.num_queries, circuit.n_inputs, notes),
    )
    scan = scan_output_features(model, output_sae, tokens, batch_size=settings.batch_size, progress=progress)
    if settings.features is not None:
        features = [circuit.check_feature(f) for f in settings.features]
    else:
        features = sample_features(scan.counts, scan.n_sequences, num_features=settings.num_features,
                                   min_count=settings.min_count, max_count=settings.max_count, seed=settings.seed)
    describe = describe_input_features(model, input_sae, backend=settings.backend)
    done_dir = Path(out_dir) / "features" if out_dir is not None else None
    results = []
    for i, g in enumerate(features):
        name = circuit.feature_name(g)
        cached = _load_done(done_dir, name, fingerprint) if done_dir else None
        if cached is not None:
            results.append(cached)
            continue
        if progress:
            print(f"[{i + 1}/{len(features)}] {name}", file=sys.stderr)
        ex = sample_exemplars(scan, g, seq_len=tokens.shape[1], examples_per_bin=settings.examples_per_bin,
                              seed=settings.seed + g)
        if ex is None:
            notes.append(f"{name} skipped: too few active or inactive sequences")
            continue
        batch = max(1, settings.batch_size // 8)
        acts = {s: input_activations(model, input_sae, tokens[getattr(ex, s).sequence], batch_size=batch)
                for s in ("train", "val")}
        rules, points = extract_feature(
            circuit, g, (acts["train"], ex.train.position),
            (acts["val"], ex.val.position, ex.val.act_max), settings, describe,
        )
        pairs = []
        if settings.exhaustive_k > 0:
            pairs = exhaustive_pairs(circuit, g, (acts["train"], ex.train.position), settings.exhaustive_k,
                                     settings.backend, describe)
        result = FeatureResult(g, name, len(ex.train), len(ex.val), rules, [p.to_dict() for p in points], pairs)
        if done_dir is not None:
            write_json(done_dir / f"{name}.json", {"settings": fingerprint, **result.to_dict()})
        results.append(result)
    metadata = {"settings": plain(dataclasses.asdict(settings)), "notes": notes, "n_sequences": scan.n_sequences,
                "seq_len": tokens.shape[1], "n_inputs": circuit.n_inputs, "n_outputs": circuit.n_outputs}
    result = HeadResult(circuit.layer, circuit.head, results, metadata)
    if out_dir is not None:
        result.write(out_dir)
    return result


def _load_done(done_dir: Path, name: str, fingerprint: str) -> Optional[FeatureResult]:
    """A feature finished by an earlier run with the same settings, if any."""
    path = done_dir / f"{name}.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    if data.pop("settings", None) != fingerprint:
        return None
    return FeatureResult.from_dict(data)
