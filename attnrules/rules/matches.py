"""REF's evaluation rows and aggregation types: how a rule set's matches in an exemplar make its
predicted score (reference §4.2–4.4, ``aggregate_predictions``).

A rule set evaluated on N exemplars (each scored at one position t) gives one row per match:

- "kq" rows (skip-gram terms): a term whose query feature is active at t and whose key feature is
  active at t' ≤ t; ``score`` is REF's ``predicted_score`` (weights: F[t,q]·F[t',k]²·A·V; importance:
  F[t,q]·F[t',k]·A, without V) and ``kv_score`` its ``predicted_kv_score`` (F[t,q]·F[t',k]^p·A·V);
- "value" rows: a value feature active at t' ≤ t, ``score`` = F[t',v]·V(v) (REF's importance rule, with
  the first N value features and no key position; the unigram rule, with the key position t').

When an exemplar has no row of a kind the rule set emits, REF adds one row of that kind with score 0
(a kq 0-row and a unigram 0-row sit at t' = t; an importance 0-value-row has no key position).
:meth:`Matches.aggregate` then reduces each exemplar's rows as REF's ``--aggregation_type`` says:

========================  ===============================================================
``max`` / ``sum``         max / sum of ``score`` over all rows
``kq_max`` / ``kq_sum``   over kq rows, ``score``
``kqv_max`` / ``kqv_sum`` over kq rows, ``kv_score``
``value_max`` / ``_sum``  over value rows, ``score``
``value_last``            max over value rows at t' = t (only the unigram rule's have one)
``pos_sum_max``           sum per key position t', then max over t' (rows without t' left out)
``pos_max_sum``           max per key position t', then sum over t'
========================  ===============================================================

An exemplar with no selected row gets NaN (REF's left join), which predicts "not active" and makes
Spearman's rho NaN. REF's defaults: ``kqv_max`` for the importance rule, ``max`` for the others.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

AGGREGATIONS = ("max", "sum", "kq_max", "kq_sum", "kqv_max", "kqv_sum", "value_max", "value_sum", "value_last",
                "pos_sum_max", "pos_max_sum")
# REF's default aggregation of each ordering (run_rules: "kqv_max" for importance, "max" for the others)
DEFAULT_AGGREGATION = {"weights": "max", "importance": "kqv_max", "exact": "max", "unigram": "max"}


def default_aggregation(method: str) -> str:
    """REF's default aggregation of an ordering (a combined set "{ordering}+…" takes its ordering's)."""
    return DEFAULT_AGGREGATION.get(method.split("+")[0], "max")


def check_aggregation(aggregation: str) -> str:
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {aggregation!r}")
    return aggregation


@dataclass(frozen=True)
class Matches:
    """The rows of one rule set on ``n`` exemplars (module docstring), without REF's 0-rows.

    ``kinds``: the row kinds this rule set emits (each gets a 0-row where an exemplar has none);
    ``value_key``: whether its value rows carry a key position (unigram) or not (importance)."""

    n: int
    seq_len: int
    positions: torch.Tensor  # [n] scored position of each exemplar
    kinds: tuple[str, ...]
    value_key: bool
    exemplar: torch.Tensor  # [M] long
    kq: torch.Tensor  # [M] bool: a kq row (else a value row)
    term: torch.Tensor  # [M] long: the term (kq) or value feature (value) index in its rule set
    key_position: torch.Tensor  # [M] long: t' (-1: none)
    score: torch.Tensor  # [M]
    kv_score: torch.Tensor  # [M] (value rows: their score)

    def __len__(self) -> int:
        return self.exemplar.numel()

    def select(self, keep: torch.Tensor) -> "Matches":
        """The rows where ``keep [M]`` holds (the 0-rows are made afterwards, where a kind is left empty)."""
        return replace(self, exemplar=self.exemplar[keep], kq=self.kq[keep], term=self.term[keep],
                       key_position=self.key_position[keep], score=self.score[keep], kv_score=self.kv_score[keep])

    def with_zero_rows(self) -> "Matches":
        """The rows plus REF's 0-row of each emitted kind for every exemplar without a row of that kind."""
        parts = [self]
        for kind in self.kinds:
            is_kq = kind == "kq"
            has = torch.zeros(self.n, dtype=torch.bool)
            has[self.exemplar[self.kq == is_kq]] = True
            missing = torch.nonzero(~has).flatten()
            if missing.numel() == 0:
                continue
            key = self.positions[missing] if is_kq or self.value_key else torch.full_like(missing, -1)
            zero = torch.zeros(missing.numel(), dtype=self.score.dtype)
            parts.append(replace(self, exemplar=missing, kq=torch.full_like(missing, is_kq, dtype=torch.bool),
                                 term=torch.full_like(missing, -1), key_position=key, score=zero, kv_score=zero))
        return concat_matches(parts)

    def aggregate(self, aggregation: str) -> torch.Tensor:
        """Each exemplar's predicted score ``[n]`` under REF's ``aggregation`` (NaN: no selected row)."""
        rows = self.with_zero_rows()
        how = check_aggregation(aggregation)
        keep = torch.ones(len(rows), dtype=torch.bool)
        if how.startswith("kq"):
            keep = rows.kq
        elif how.startswith("value"):
            keep = ~rows.kq
            if how == "value_last":
                keep = keep & (rows.key_position == self.positions[rows.exemplar])
        elif how.startswith("pos"):
            keep = rows.key_position >= 0
        values = (rows.kv_score if how.startswith("kqv") else rows.score)[keep]
        ex = rows.exemplar[keep]
        if how.startswith("pos"):
            group = ex * self.seq_len + rows.key_position[keep]
            first, second = ("sum", "max") if how == "pos_sum_max" else ("max", "sum")
            per_position = _reduce(group, values, self.n * self.seq_len, first).view(self.n, self.seq_len)
            present = ~torch.isnan(per_position)
            if second == "max":
                out = per_position.masked_fill(~present, float("-inf")).amax(dim=1)
            else:
                out = per_position.nan_to_num(0.0).sum(dim=1)
            return torch.where(present.any(dim=1), out, torch.full_like(out, float("nan")))
        return _reduce(ex, values, self.n, "max" if how.endswith("max") or how == "value_last" else "sum")


def _reduce(index: torch.Tensor, values: torch.Tensor, size: int, how: str) -> torch.Tensor:
    """Per group ``[size]``: the max or sum of ``values`` with that ``index``; NaN for an empty group."""
    out = torch.full((size,), float("nan"), dtype=values.dtype)
    if how == "max":
        return out.scatter_reduce(0, index, values, reduce="amax", include_self=False)
    present = torch.zeros(size, dtype=torch.bool)
    present[index] = True
    total = torch.zeros(size, dtype=values.dtype).index_add(0, index, values)
    return torch.where(present, total, out)


def concat_matches(parts: list[Matches]) -> Matches:
    """The rows of several :class:`Matches` of one rule set on the same exemplars, in order."""
    if len(parts) == 1:
        return parts[0]
    fields = ("exemplar", "kq", "term", "key_position", "score", "kv_score")
    return replace(parts[0], **{f: torch.cat([getattr(p, f) for p in parts]) for f in fields})


def no_matches(n: int, seq_len: int, positions: torch.Tensor, kinds: tuple[str, ...], value_key: bool,
               dtype: torch.dtype) -> Matches:
    """An empty set of rows (every exemplar then gets REF's 0-rows)."""
    empty = torch.zeros(0, dtype=torch.long)
    return Matches(n, seq_len, positions, kinds, value_key, empty, torch.zeros(0, dtype=torch.bool), empty, empty,
                   torch.zeros(0, dtype=dtype), torch.zeros(0, dtype=dtype))
