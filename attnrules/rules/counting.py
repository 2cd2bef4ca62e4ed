"""Counting rules: features whose activation depends on how many times a key occurs.

The paper shows one by hand (a feature that needs [games] at least twice: each copy competes with
an attention sink); its code has none. The detector (:mod:`attnrules.evaluation.counts`) measures
the feature's response to n copies of a key before a query; here that response is classified:

- ``threshold``: the feature is (almost) never active below a count c ≥ 2 and (almost) always from
  c on → ``count([games]) ≥ 2 → L0H1.0``;
- ``monotone``: active from one copy, but the activation keeps growing with the count (at least
  ``growth`` times its one-copy value) → ``more [k] → more F``;
- ``difference`` (for two competing keys, n1 and n2 copies): active exactly when n1 − n2 ≥ c →
  ``count([a]) − count([b]) ≥ c → F``.

A plain skip-gram (one copy is enough, more copies add little) gets no counting rule.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional

from attnrules.records import Record

ACTIVE, SILENT = 0.9, 0.1  # shares of base sequences that count as "always" and "never" active


@dataclass(frozen=True)
class CountResponse(Record):
    """Activation at the query for each tried (count of key, count of other key)."""

    counts: tuple[tuple[int, int], ...]
    mean_act: tuple[Optional[float], ...]
    active_share: tuple[Optional[float], ...]
    n_base: int


@dataclass(frozen=True)
class CountingRule(Record):
    """A counting rule of one feature, the response it was read from, and its ``text`` (:meth:`with_text`)."""

    feature_name: str
    kind: str  # "threshold" | "monotone" | "difference"
    query_token: int
    key_token: int
    other_token: Optional[int]
    threshold: Optional[int]
    evidence: CountResponse
    text: str = ""
    query: Optional[int] = None  # the input features of the skip-gram term the response was measured on
    key: Optional[int] = None  # (set by the pipeline; a combined rule set applies the threshold to that term)

    def render(self, token_str: Callable[[int], str]) -> str:
        k = f"[{token_str(self.key_token)}]"
        if self.kind == "threshold":
            return f"count({k}) ≥ {self.threshold} → {self.feature_name}"
        if self.kind == "difference":
            return f"count({k}) − count([{token_str(self.other_token)}]) ≥ {self.threshold} → {self.feature_name}"
        return f"more {k} → more {self.feature_name}"

    def with_text(self, token_str: Callable[[int], str]) -> "CountingRule":
        """The rule with ``text`` rendered from the token strings."""
        return dataclasses.replace(self, text=self.render(token_str))


def classify_counts(response: CountResponse, *, growth: float = 2.0) -> tuple[Optional[str], Optional[int]]:
    """(kind, threshold) of a single-key response; (None, None) when it is no counting rule."""
    counts = [c for c, _ in response.counts]
    share = dict(zip(counts, response.active_share))
    mean = dict(zip(counts, response.mean_act))
    for c in counts:
        if all(share[n] <= SILENT for n in counts if n < c) and all(share[n] >= ACTIVE for n in counts if n >= c):
            if c >= 2:
                return "threshold", c
            rising = [mean[n] for n in counts if n >= c]
            if len(rising) >= 3 and all(b >= a - 1e-6 for a, b in zip(rising, rising[1:])) and rising[-1] >= growth * rising[0]:
                return "monotone", None
            return None, None
    return None, None


def classify_difference(response: CountResponse) -> Optional[int]:
    """c such that the feature is active exactly when n1 − n2 ≥ c over the tried grid, else None."""
    diffs = [n1 - n2 for n1, n2 in response.counts]
    for c in sorted(set(diffs)):
        above = [s for d, s in zip(diffs, response.active_share) if d >= c]
        below = [s for d, s in zip(diffs, response.active_share) if d < c]
        if above and below and min(above) >= ACTIVE and max(below) <= SILENT:
            return c
    return None
