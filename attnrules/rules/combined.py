"""Combined rule sets: skip-gram terms with their absence conditions and counting thresholds, so that
the gain of an absence or counting rule over the plain skip-grams is a number.

A term (q, k) of a :class:`~attnrules.rules.SkipgramRuleSet` matches where q is active at t and k at
some t' ≤ t. In the combined set, a term that has

- an absence rule (``[k] … [q] unless [d]``, :class:`~attnrules.rules.AbsenceRule`; its kept
  distractors) does not match in an exemplar where any distractor d is active at some t'' ≤ t;
- a counting threshold (``count([k]) ≥ c``, :class:`~attnrules.rules.CountingRule` of kind
  "threshold", measured on that term) does not match where k is active at fewer than c positions ≤ t;

(positions within the head's window, as for the term's key). Terms without a condition match as
before, and the remaining matches are aggregated as the plain set's are. The method is
``"{ordering}+absence+counting"`` whether or not the feature has a condition (then it equals the plain
set), so that tables over features compare like with like. A "monotone" or "difference" counting rule
sets no threshold on the term and is not applied.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from attnrules.rules.absence import AbsenceRule
from attnrules.rules.counting import CountingRule
from attnrules.rules.matches import Matches, default_aggregation
from attnrules.rules.skipgram import SkipgramRuleSet

COMBINED = "+absence+counting"  # suffix of a combined set's method


@dataclass(frozen=True)
class Conditions:
    """The conditions of one feature's terms: per (query, key), the distractors that silence it and the
    least number of key positions it needs."""

    distractors: tuple[tuple[int, int, tuple[int, ...]], ...] = ()  # (query, key, distractors)
    min_counts: tuple[tuple[int, int, int], ...] = ()  # (query, key, c)

    @classmethod
    def of(cls, absence: Sequence[AbsenceRule] = (), counting: Optional[CountingRule] = None) -> "Conditions":
        """From a feature's absence rules (their kept distractors) and counting rule (kind "threshold",
        with the term it was measured on)."""
        distractors = tuple((a.query, a.key, a.kept) for a in absence if a.kept)
        counts = ()
        if counting is not None and counting.kind == "threshold" and counting.query is not None and counting.key is not None:
            counts = ((counting.query, counting.key, int(counting.threshold)),)
        return cls(distractors, counts)

    def __bool__(self) -> bool:
        return bool(self.distractors or self.min_counts)


@dataclass(frozen=True)
class CombinedRuleSet:
    """A skip-gram rule set whose terms obey their :class:`Conditions` (module docstring)."""

    rules: SkipgramRuleSet
    conditions: Conditions

    @property
    def method(self) -> str:
        return self.rules.method + COMBINED

    @property
    def feature_name(self) -> str:
        return self.rules.feature_name

    def __len__(self) -> int:
        return len(self.rules)

    def predict(self, acts: torch.Tensor, positions: torch.Tensor, *, aggregation: Optional[str] = None,
                act_scale: Optional[float] = None) -> torch.Tensor:
        """Predicted score ``[N]``: the matches that no condition silences, aggregated as the plain set's
        (default REF's aggregation of its ordering)."""
        return self.matches(acts, positions, act_scale=act_scale).aggregate(aggregation or default_aggregation(self.method))

    def matches(self, acts: torch.Tensor, positions: torch.Tensor, *, act_scale: Optional[float] = None) -> Matches:
        rows = self.rules.matches(acts, positions, act_scale=act_scale)
        return rows.select(~self.silenced(acts, positions, rows))

    def silenced(self, acts: torch.Tensor, positions: torch.Tensor, rows: Matches,
                 masks: Optional[list[tuple[int, int, torch.Tensor]]] = None) -> torch.Tensor:
        """``[M]`` bool: the kq rows of the plain set that a condition silences. ``masks``: the conditions'
        :func:`condition_masks` on these exemplars when already made (they depend on the exemplars only)."""
        out = torch.zeros(len(rows), dtype=torch.bool)
        if not self.conditions or not len(rows):
            return out
        if masks is None:
            masks = condition_masks(self.conditions, acts, positions, self.rules.max_offset)
        for q, k, silences in masks:
            out |= self._term_rows(rows, q, k) & silences[rows.exemplar]
        return out

    def _term_rows(self, rows: Matches, q: int, k: int) -> torch.Tensor:
        terms = torch.nonzero((self.rules.queries == q) & (self.rules.keys == k)).flatten()
        return rows.kq & torch.isin(rows.term, terms)


def condition_masks(conditions: Conditions, acts: torch.Tensor, positions: torch.Tensor,
                    max_offset: Optional[int]) -> list[tuple[int, int, torch.Tensor]]:
    """Per condition, (q, k, ``[N]`` bool): the exemplars where it silences the term (q, k) — one of its
    distractors present at or before the scored position, or fewer copies of k than its threshold
    (within ``max_offset`` when given). A sweep makes them once for all its rule sets."""
    present = presence(acts, positions, max_offset)
    masks = []
    for q, k, blockers in conditions.distractors:
        hit = torch.zeros(acts.shape[0], dtype=torch.bool)
        for d in blockers:
            hit |= present(d).any(dim=1)
        masks.append((q, k, hit))
    for q, k, c in conditions.min_counts:
        masks.append((q, k, present(k).sum(dim=1) < c))
    return masks


def presence(acts: torch.Tensor, positions: torch.Tensor, max_offset: Optional[int]):
    """``present(j) -> [N, T]`` bool: input feature j active at positions t'' ≤ t of each exemplar (within
    ``max_offset`` of t when given)."""
    t_len = acts.shape[1]
    delta = positions[:, None] - torch.arange(t_len)[None, :]
    window = delta >= 0
    if max_offset is not None:
        window &= delta <= max_offset

    def present(feature: int) -> torch.Tensor:
        return (acts[:, :, feature] > 0) & window

    return present
