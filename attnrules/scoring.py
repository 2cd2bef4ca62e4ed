"""Value scores, REF's candidate table and weight ordering, and the exhaustive pair ranking.

value-score(k) = value_proj[k] · u and attn-score(q, k) = query_proj[q] · key_proj[k] (see
:mod:`attnrules.circuit`). All-pairs work goes through :mod:`attnrules.engine`.

On a rotary head a pair's attn-score is taken at its best offset among the circuit's ``offsets``
(the largest A_δ, the lowest offset among equals), found exactly over all pairs by
``engine.offset_topk``; tables and rankings say which offset (``offsets``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import pandas as pd
import torch

import attnrules.engine as engine
from attnrules.circuit import HeadCircuit
from attnrules.files import plain


def value_scores(circuit: HeadCircuit, features: Union[int, Sequence[int], None] = None) -> torch.Tensor:
    """value-score of every input feature: ``[n_in]`` for one output feature, ``[n_in, len(features)]``
    for a list, ``[n_in, n_out]`` for all (None)."""
    if features is None:
        return circuit.value_proj @ circuit.out_encoder
    if isinstance(features, int):
        return circuit.value_proj @ circuit.encoder_vector(features)
    cols = [circuit.check_feature(f) for f in features]
    return circuit.value_proj @ circuit.out_encoder[:, cols]


def attn_scores(circuit: HeadCircuit, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """attn-score of the listed pairs (index tensors that broadcast), at each pair's best offset on a
    rotary head."""
    if circuit.rotary is None:
        return (circuit.query_proj[queries] * circuit.key_proj[keys]).sum(-1)
    queries, keys = torch.broadcast_tensors(torch.as_tensor(queries), torch.as_tensor(keys))
    return circuit.best_attn(queries.flatten(), keys.flatten())[0].reshape(queries.shape)


def attn_row(circuit: HeadCircuit, query: int) -> torch.Tensor:
    """``[n_in]`` attn-scores of one query with every key (best offsets on a rotary head)."""
    if circuit.rotary is None:
        return circuit.key_proj @ circuit.query_proj[query]
    every = torch.arange(circuit.n_inputs)
    return circuit.best_attn(torch.full_like(every, query), every)[0]


def attn_column(circuit: HeadCircuit, key: int) -> torch.Tensor:
    """``[n_in]`` attn-scores of every query with one key (best offsets on a rotary head)."""
    if circuit.rotary is None:
        return circuit.query_proj @ circuit.key_proj[key]
    every = torch.arange(circuit.n_inputs)
    return circuit.best_attn(every, torch.full_like(every, key))[0]


def _offset_inputs(circuit: HeadCircuit) -> dict:
    """``engine.offset_topk``'s layout of a rotary circuit: canonical projections and offset tables."""
    rotary, dtype = circuit.rotary, circuit.query_proj.dtype
    cos, sin = rotary.tables(circuit.offsets)
    return {"queries": rotary.canonical(circuit.query_proj).contiguous(),
            "keys": rotary.canonical(circuit.key_proj).contiguous(), "cos": cos.to(dtype), "sin": sin.to(dtype)}


def top_keys(circuit: HeadCircuit, queries: torch.Tensor, k: int, *, backend: str = "auto") -> engine.TopK:
    """The k keys with the highest attn-score for each of ``queries`` (``[len(queries), k]``, best first;
    best offsets on a rotary head), through the engine."""
    if circuit.rotary is None:
        return engine.pair_topk(circuit.query_proj[queries], circuit.key_proj, k, by="query", backend=backend)
    inputs = _offset_inputs(circuit)
    inputs["queries"] = inputs["queries"][queries]
    return engine.offset_topk(k=k, by="query", backend=backend, **inputs)


def _stable_top(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest values, ties by lower index."""
    return torch.sort(values, descending=True, stable=True).indices[:k]


@dataclass(frozen=True)
class PairTable:
    """Scored (key, query) pairs of one output feature: REF's candidate table (key-major, §3.1,
    ``score = exp(attn_score + 1e-10) · value_score``, ``value_score`` = |V| with
    ``negative_values=True``) or an exhaustive ranking (best first, ``score`` as asked for). On a rotary
    head ``offsets`` holds each row's best offset, where ``attn_score`` is taken."""

    feature: int
    feature_name: str
    keys: torch.Tensor  # [n] input-feature index of each row's key
    queries: torch.Tensor  # [n]
    attn_score: torch.Tensor  # [n]
    value_score: torch.Tensor  # [n]
    score: torch.Tensor  # [n]
    offsets: Optional[torch.Tensor] = None  # [n] rotary heads: the offset of each row's attn_score

    def __len__(self) -> int:
        return self.keys.numel()

    def top(self, n: int) -> "PairTable":
        """The first n rows by ``score`` (REF: ``nlargest(n, "score", keep="first")``)."""
        if not 1 <= n:
            raise ValueError(f"n must be a positive number of terms, got {n}")
        order = _stable_top(self.score, n)
        return self._rows(order)

    def _rows(self, index: torch.Tensor) -> "PairTable":
        return PairTable(
            self.feature,
            self.feature_name,
            self.keys[index],
            self.queries[index],
            self.attn_score[index],
            self.value_score[index],
            self.score[index],
            None if self.offsets is None else self.offsets[index],
        )

    def to_frame(self) -> pd.DataFrame:
        frame = pd.DataFrame(
            {
                "feature": self.feature_name,
                "key": plain(self.keys),
                "query": plain(self.queries),
                "attn_score": plain(self.attn_score),
                "value_score": plain(self.value_score),
                "score": plain(self.score),
            }
        )
        if self.offsets is not None:
            frame["offset"] = plain(self.offsets)
        return frame

    def to_json(self) -> str:
        return json.dumps(self.to_frame().to_dict(orient="list"))


def candidate_table(
    circuit: HeadCircuit,
    feature: int,
    *,
    num_values: int = 100,
    num_queries: int = 100,
    negative_values: bool = False,
    backend: str = "auto",
) -> PairTable:
    """REF's candidates: the top ``num_values`` keys by value score, and for each the top
    ``num_queries`` queries by signed attn-score (``num_values × num_queries`` rows, key-major; on a
    rotary head by the best-offset attn-score).

    Raises ValueError when there are fewer input features than asked for (REF would crash); the
    high-level pipeline caps these numbers and says so.
    """
    circuit.check_feature(feature)
    for name, n in (("num_values", num_values), ("num_queries", num_queries)):
        if not 1 <= n <= circuit.n_inputs:
            raise ValueError(f"{name}={n} must be between 1 and the number of input features ({circuit.n_inputs})")
    v = value_scores(circuit, feature)
    ranked = v.abs() if negative_values else v
    keys = _stable_top(ranked, num_values)
    offsets = None
    if circuit.rotary is None:
        best = engine.pair_topk(circuit.query_proj, circuit.key_proj[keys], num_queries, by="key", backend=backend)
    else:
        inputs = _offset_inputs(circuit)
        inputs["keys"] = inputs["keys"][keys]
        best = engine.offset_topk(k=num_queries, by="key", backend=backend, **inputs)
        offsets = circuit.offsets[best.offset_idx].reshape(-1)
    n_rows = num_values * num_queries
    key_col = keys.repeat_interleave(num_queries)
    attn = best.scores.reshape(n_rows)
    value = ranked[keys].repeat_interleave(num_queries)
    return PairTable(
        feature=feature,
        feature_name=circuit.feature_name(feature),
        keys=key_col,
        queries=best.query_idx.reshape(n_rows),
        attn_score=attn,
        value_score=value,
        score=torch.exp(attn + 1e-10) * value,  # REF adds 1e-10 inside exp; kept for last-digit equality
        offsets=offsets,
    )


def rank_all_pairs(
    circuit: HeadCircuit,
    feature: int,
    k: int,
    *,
    score: str = "signed",
    backend: str = "auto",
    **engine_options,
) -> "PairTable":
    """Exhaustive ranking of all n_in × n_in pairs by attn-score × value-score (the paper's A×V;
    ``score="exp"`` gives REF's exp(A)·V, ``"absolute"`` ranks by |A×V|): the k best, best first. On a
    rotary head a pair scores at its best offset for that score (max_δ A_δ×V, or max_δ |A_δ×V|);
    ``"exp"`` is not offered there."""
    v = value_scores(circuit, feature)
    if circuit.rotary is None:
        best = engine.pair_topk(circuit.query_proj, circuit.key_proj, k, by="global", key_weight=v, score=score,
                                backend=backend, **engine_options)
        attn, offsets = attn_scores(circuit, best.query_idx, best.key_idx), None
    else:
        if score == "exp":
            raise ValueError("score='exp' is not offered on a rotary head: use 'signed' or 'absolute' "
                             "(pairs are ranked at their best offset)")
        best = engine.offset_topk(k=k, by="global", key_weight=v, score=score, backend=backend,
                                  **_offset_inputs(circuit), **engine_options)
        offsets = circuit.offsets[best.offset_idx]
        attn = circuit.attn(best.query_idx, best.key_idx, offsets)
    return PairTable(feature, circuit.feature_name(feature), best.key_idx, best.query_idx, attn, v[best.key_idx],
                     best.scores, offsets)


def rank_all_pairs_many(
    circuit: HeadCircuit,
    features: Optional[Sequence[int]],
    k: int,
    *,
    backend: str = "auto",
    **engine_options,
) -> list["PairTable"]:
    """:func:`rank_all_pairs` (signed A×V) for many output features at once: one ``PairTable`` per
    feature of ``features`` (None: every output feature), each equal to ``rank_all_pairs(circuit, f, k)``
    (bit for bit on the CPU core), through ``engine.multi_topk`` (the attn-score table is built once per head). Not offered on a
    rotary head: use :func:`rank_all_pairs` per feature there."""
    if circuit.rotary is not None:
        raise ValueError("rank_all_pairs_many does not rank rotary heads (pairs score at their best offset): "
                         "use rank_all_pairs per feature")
    features = list(range(circuit.n_outputs)) if features is None else [circuit.check_feature(f) for f in features]
    if not features:
        raise ValueError("features must name at least one output feature")
    # each feature's value scores as rank_all_pairs computes them (one matrix-vector product each), so
    # that the rankings are its own bit for bit
    v = torch.stack([value_scores(circuit, f) for f in features], 1)  # [n_in, len(features)]
    best = engine.multi_topk(circuit.query_proj, circuit.key_proj, v, k, backend=backend, **engine_options)
    tables = []
    for j, feature in enumerate(features):
        q, key = best.query_idx[j], best.key_idx[j]
        tables.append(PairTable(feature, circuit.feature_name(feature), key, q, attn_scores(circuit, q, key),
                                v[key, j], best.scores[j]))
    return tables
