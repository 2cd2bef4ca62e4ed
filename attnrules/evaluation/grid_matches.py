"""A rule set's matches at every N of a sweep, from one evaluation of the largest set.

A sweep evaluates the N-term rule set of an ordering for every N of its grid (4, 8, …, 4096) on the
same exemplars, and a match row depends only on its own term, exemplar and key position
(:meth:`~attnrules.rules.SkipgramRuleSet.matches`). Where the N-term set is the first terms (and first
value features) of the largest one — same ids, scores, weights and settings, bit for bit — its rows
are the largest set's rows of those terms, in the same order, so the largest set is evaluated once and
each N selects its rows. Any set that is not such a prefix (a builder whose choice changes with N,
e.g. REF's term selection when it reorders) is evaluated on its own, so the rows are always those that
``rules.matches`` gives.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Optional

import torch

from attnrules.rules.matches import Matches
from attnrules.rules.skipgram import SkipgramRuleSet

# SkipgramRuleSet fields with one entry per term, and with one entry per value feature
TERM_FIELDS = ("queries", "keys", "attn_score", "value_score", "weight", "offsets", "offset_attn")
VALUE_FIELDS = ("value_features", "value_feature_scores")


def _bits(t: torch.Tensor) -> torch.Tensor:
    """``t`` as integers of its bit patterns when floating (so NaNs and signed zeros compare too)."""
    if not t.is_floating_point():
        return t
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _same_prefix(small: Optional[torch.Tensor], large: Optional[torch.Tensor], n: int) -> bool:
    if small is None or large is None:
        return small is None and large is None
    return (small.dtype == large.dtype and small.shape[0] == n <= large.shape[0]
            and small.shape[1:] == large.shape[1:] and torch.equal(_bits(small), _bits(large[:n])))


def prefix_lengths(small: object, large: object) -> Optional[tuple[int, int]]:
    """(terms, value features) of ``small`` when it is the first terms and first value features of
    ``large``, bit for bit, with the same settings (both :class:`~attnrules.rules.SkipgramRuleSet`);
    else None."""
    if not (isinstance(small, SkipgramRuleSet) and isinstance(large, SkipgramRuleSet)):
        return None
    n_values = 0 if small.value_features is None else small.value_features.numel()
    for f in dataclasses.fields(SkipgramRuleSet):
        a, b = getattr(small, f.name), getattr(large, f.name)
        if f.name in TERM_FIELDS:
            same = _same_prefix(a, b, len(small))
        elif f.name in VALUE_FIELDS:
            same = _same_prefix(a, b, n_values)
        else:
            same = a == b
        if not same:
            return None
    return len(small), n_values


def grid_matches(build: Callable[[int], object], grid: list[int], acts: torch.Tensor, positions: torch.Tensor,
                 act_scale: Callable[[object], Optional[float]]) -> Iterator[tuple[int, object, Matches]]:
    """``(n, build(n), build(n).matches(acts, positions, act_scale=act_scale(rules)))`` for every n of
    ``grid``, in order (module docstring); ``act_scale``: a rule set's activation scale
    (:func:`~attnrules.rules.skipgram.scale_for` of the full ``acts``)."""
    if not grid:
        return
    largest = build(max(grid))
    rows: Optional[Matches] = None
    if isinstance(largest, SkipgramRuleSet):
        rows = largest.matches(acts, positions, act_scale=act_scale(largest))
    for n in grid:
        rules = build(n)
        lengths = prefix_lengths(rules, largest) if rows is not None else None
        if lengths is None:
            yield n, rules, rules.matches(acts, positions, act_scale=act_scale(rules))
        else:
            n_terms, n_values = lengths
            yield n, rules, rows.select(torch.where(rows.kq, rows.term < n_terms, rows.term < n_values))
