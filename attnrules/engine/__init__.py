"""The one dispatch point for all-pairs top-k scoring.

Two operations, defined once here and implemented by every backend:

``pair_topk(queries [Nq, d], keys [Nk, d], k)``
    score(q, k) = (queries[q] · keys[k]) × key_weight[k]   (``score="signed"``),
    its absolute value (``"absolute"``), or REF's ``exp(A) · key_weight[k]`` (``"exp"``).
``dual_topk(queries, keys, query_acts [Nq, n], key_acts [Nk, n], k)``
    score(q, k) = (queries[q] · keys[k]) × (query_acts[q] · key_acts[k])  — importances.

``by="global"`` returns the k best pairs overall, ``by="query"`` the k best keys of every query and
``by="key"`` the k best queries of every key; always sorted best first, ties broken by the lower
(query, key) index, so that every backend returns the same answer. No backend allocates Nq × Nk:
scores are computed tile by tile and consumed at once.

Backends: ``"torch"`` (blocked plain torch, the reference), ``"cpu"`` (C++ core, ``attnrules._C``),
``"triton"`` (GPU kernels, ``attnrules.kernels``); ``"auto"`` picks the fastest one available for
the inputs' device.
"""
from __future__ import annotations

from attnrules.engine.contract import (
    BACKENDS,
    BY_CHOICES,
    SCORE_CHOICES,
    TopK,
    available_backends,
    dual_topk,
    pair_topk,
)

__all__ = [
    "BACKENDS",
    "BY_CHOICES",
    "SCORE_CHOICES",
    "TopK",
    "available_backends",
    "dual_topk",
    "pair_topk",
]
