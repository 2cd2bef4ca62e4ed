"""Skip-gram rule sets and their predictions (REF §4).

A rule set is a disjunction of N terms ``[k] … [q] → feature``: input feature q active at the
current position t and input feature k active at some position t' ≤ t (t itself and BOS included).
Each match scores ``F[t,q] · F[t',k]^p · A(q,k) · V(k)`` — REF's weight rules square the key
activation (p = 2), its importance rules do not (p = 1) — and an exemplar's predicted score is the
maximum over matches, 0 when nothing matches (importance rules, paper or exact, count only matches
with A ≠ 0, as REF's do). With threshold 0 the feature is predicted active iff
some match has A·V > 0 (REF also fires when both are negative).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import pandas as pd
import torch

from attnrules.circuit import HeadCircuit
from attnrules.importance import select_terms
from attnrules.results import plain
from attnrules.scoring import PairTable, attn_scores, value_scores


@dataclass(frozen=True)
class SkipgramRuleSet:
    """N skip-gram terms for one output feature, in rank order."""

    feature_name: str
    queries: torch.Tensor  # [n] input-feature index of each term's query
    keys: torch.Tensor  # [n]
    attn_score: torch.Tensor  # [n]
    value_score: torch.Tensor  # [n]
    key_power: int = 2
    method: str = "weights"

    def __len__(self) -> int:
        return self.queries.numel()

    def predict(self, acts: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Predicted score ``[N]`` of each exemplar (input-SAE acts ``[N, T, n_in]``, scored position ``[N]``)."""
        if acts.dim() != 3:
            raise ValueError(f"acts must be [n_exemplars, seq_len, n_inputs], got shape {tuple(acts.shape)}")
        if positions.shape != (acts.shape[0],):
            raise ValueError(f"positions must be [n_exemplars={acts.shape[0]}], got shape {tuple(positions.shape)}")
        n, t_len, _ = acts.shape
        best = torch.full((n,), float("-inf"), dtype=acts.dtype)
        weight = (self.attn_score * self.value_score).to(acts.dtype)
        q_act = acts[torch.arange(n), positions][:, self.queries]  # [N, terms]
        # only (exemplar, term) pairs whose query feature is active at t can match
        ex, term = torch.nonzero(q_act > 0, as_tuple=True)
        if ex.numel():
            k_act = acts[ex, :, self.keys[term]]  # [P, T]
            match = (torch.arange(t_len)[None, :] <= positions[ex][:, None]) & (k_act > 0)
            if self.method != "weights":  # REF's importance rules list only the nonzero F[t,q]·F[t',k]·A terms
                match &= (self.attn_score[term] != 0)[:, None]
            score = q_act[ex, term][:, None] * k_act**self.key_power * weight[term][:, None]
            per_pair = score.masked_fill(~match, float("-inf")).amax(dim=1)
            best = best.scatter_reduce(0, ex, per_pair, reduce="amax")
        return torch.where(torch.isinf(best), torch.zeros_like(best), best)

    def render(self, describe: Callable[[int], str], limit: Optional[int] = None) -> list[str]:
        """Terms as text, e.g. ``[If] … [then] → L0H0.94`` (A and V in brackets)."""
        lines = []
        for q, k, a, v in list(zip(self.queries.tolist(), self.keys.tolist(), self.attn_score.tolist(),
                                   self.value_score.tolist()))[:limit]:
            lines.append(f"[{describe(k)}] … [{describe(q)}] → {self.feature_name}   (A={a:.3g}, V={v:.3g})")
        return lines

    def to_frame(self, describe: Optional[Callable[[int], str]] = None) -> pd.DataFrame:
        frame = pd.DataFrame(
            {
                "feature": self.feature_name,
                "method": self.method,
                "rank": range(len(self)),
                "query": plain(self.queries),
                "key": plain(self.keys),
                "attn_score": plain(self.attn_score),
                "value_score": plain(self.value_score),
            }
        )
        if describe is not None:
            frame["query_desc"] = [describe(q) for q in plain(self.queries)]
            frame["key_desc"] = [describe(k) for k in plain(self.keys)]
        return frame


def rules_from_weights(table: PairTable, n: int) -> SkipgramRuleSet:
    """REF's weight-based rule: the top-N rows of the candidate table by exp(A)·V."""
    top = table.top(min(n, len(table)))
    return SkipgramRuleSet(table.feature_name, top.queries, top.keys, top.attn_score, top.value_score, 2, "weights")


def rules_from_importance(
    circuit: HeadCircuit,
    feature: int,
    keys: torch.Tensor,
    queries: torch.Tensor,
    importance: torch.Tensor,
    n: int,
    *,
    absolute: bool = True,
    method: str = "importance",
) -> SkipgramRuleSet:
    """REF's gradient-based rule: the pairs of the K × Q cross product selected from the importance
    matrix ``[len(keys), len(queries)]`` (:func:`attnrules.importance.select_terms`), ranked by it.
    ``method`` labels where the importances came from ("importance": paper mode, "exact": exact mode)."""
    selected = select_terms(importance, n, absolute=absolute)
    ranking = importance.abs() if absolute else importance
    rows, cols = torch.nonzero(selected, as_tuple=True)
    order = torch.sort(ranking[rows, cols], descending=True, stable=True).indices
    rows, cols = rows[order], cols[order]
    q, k = queries[cols], keys[rows]
    return SkipgramRuleSet(
        circuit.feature_name(feature), q, k, attn_scores(circuit, q, k), value_scores(circuit, feature)[k], 1, method
    )
