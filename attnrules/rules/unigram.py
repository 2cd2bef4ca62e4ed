"""REF's unigram baseline (``--method unigram``, reference §3.5): the feature predicted from its value
keys alone, with no query.

The rule's N terms are the top N keys by value score (REF's top ``num_values`` candidates, so N ≥ 100
saturates); each key feature k active at t' ≤ t gives a value row F[t',k]·V(k) and, with REF's default
``max`` aggregation, the exemplar's score is the largest (0 when no key is active). Comparing it with
the skip-gram orderings says how much the query adds.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import pandas as pd
import torch

from attnrules.files import plain
from attnrules.rules.matches import Matches, default_aggregation, no_matches
from attnrules.scoring import PairTable


@dataclass(frozen=True)
class UnigramRuleSet:
    """N value keys of one output feature, in rank order (value score, |V| with ``negative_values``)."""

    feature_name: str
    keys: torch.Tensor  # [n] input-feature index of each term
    value_score: torch.Tensor  # [n]
    max_offset: Optional[int] = None  # sliding-window heads: keys farther back than this never count
    method: str = "unigram"

    def __len__(self) -> int:
        return self.keys.numel()

    def predict(self, acts: torch.Tensor, positions: torch.Tensor, *, aggregation: Optional[str] = None,
                act_scale: Optional[float] = None) -> torch.Tensor:
        """Predicted score ``[N]`` of each exemplar under ``aggregation`` (default REF's "max");
        ``act_scale`` is unused (no activation floor), accepted as for the other rule sets."""
        return self.matches(acts, positions).aggregate(aggregation or default_aggregation(self.method))

    def matches(self, acts: torch.Tensor, positions: torch.Tensor, *, act_scale: Optional[float] = None) -> Matches:
        """A value row per active term key at t' ≤ t (with its key position t')."""
        if acts.dim() != 3:
            raise ValueError(f"acts must be [n_exemplars, seq_len, n_inputs], got shape {tuple(acts.shape)}")
        if positions.shape != (acts.shape[0],):
            raise ValueError(f"positions must be [n_exemplars={acts.shape[0]}], got shape {tuple(positions.shape)}")
        n, t_len, _ = acts.shape
        empty = no_matches(n, t_len, positions, ("value",), True, acts.dtype)
        k_act = acts[:, :, self.keys]  # [N, T, terms]
        upto = torch.arange(t_len)[None, :] <= positions[:, None]
        if self.max_offset is not None:
            upto &= positions[:, None] - torch.arange(t_len)[None, :] <= self.max_offset
        e, key_pos, term = torch.nonzero((k_act > 0) & upto[:, :, None], as_tuple=True)
        score = k_act[e, key_pos, term] * self.value_score.to(acts.dtype)[term]
        return Matches(n, t_len, positions, empty.kinds, True, e, torch.zeros_like(e, dtype=torch.bool), term,
                       key_pos, score, score)

    def render(self, describe: Callable[[int], str], limit: Optional[int] = None) -> list[str]:
        """Terms as text, e.g. ``[If] → L0H0.0   (V=1)``."""
        return [f"[{describe(k)}] → {self.feature_name}   (V={v:.3g})"
                for k, v in list(zip(self.keys.tolist(), self.value_score.tolist()))[:limit]]

    def to_frame(self, describe: Optional[Callable[[int], str]] = None) -> pd.DataFrame:
        frame = pd.DataFrame({"feature": self.feature_name, "method": self.method, "rank": range(len(self)),
                              "key": plain(self.keys), "value_score": plain(self.value_score)})
        if describe is not None:
            frame["key_desc"] = [describe(k) for k in plain(self.keys)]
        return frame


def rules_from_values(table: PairTable, n: int, max_offset: Optional[int] = None) -> UnigramRuleSet:
    """REF's unigram rule from the candidate table: its first N keys (the table is key-major in value-score
    order) with their value scores."""
    if n < 1:
        raise ValueError(f"n must be a positive number of terms, got {n}")
    keys, first = _first_rows(table.keys)
    return UnigramRuleSet(table.feature_name, keys[:n], table.value_score[first[:n]], max_offset)


def _first_rows(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct values of ``index`` in order of first appearance, and the row of each first appearance."""
    _, first = np.unique(index.numpy(), return_index=True)
    rows = torch.from_numpy(np.sort(first)).long()
    return index[rows], rows
