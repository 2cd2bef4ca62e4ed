"""The settings of one extraction: REF's defaults (reference-behaviour §8) and ours, each a knob."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Optional

from attnrules.files import plain


@dataclass(frozen=True)
class ExtractSettings:
    """REF's defaults (reference-behaviour §8), each a knob."""

    features: Optional[tuple[int, ...]] = None  # explicit output features; None: sample as REF
    num_features: Optional[int] = 100
    min_count: int = 150
    max_count: Optional[int] = None  # None: n_sequences - min_count
    examples_per_bin: int = 150
    positives: str = "top"  # REF: the top-activating sequences; "quantiles": spread over activation ranks
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
    max_distractors: int = 100  # distractor keys kept per skip-gram term
    distractor_checks: int = 3  # distractors per term tested by insertion (confirmed / unconfirmed / cleared)
    counting: bool = True  # run the counting detector on each feature's top term
    counting_max: int = 8  # copies tried by the counting detector
    counting_bases: int = 64  # base sequences the counting detector uses (corpus first, then filler)
    counting_min_bases: int = 16  # fewer than this: "undetermined"
    insertion_counts: tuple[int, ...] = (0, 1, 2, 3)  # REF's counterfactual insertion counts
    show_exemplars: int = 5  # top-activating validation exemplars kept with activations and DFA
    exact: bool = True  # add the exact-mode ordering and the head's logit decomposition

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(plain(dataclasses.asdict(self)), sort_keys=True).encode()).hexdigest()[:16]
