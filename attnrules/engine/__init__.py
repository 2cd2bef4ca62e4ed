"""The one dispatch point for all-pairs top-k scoring.

Two operations, defined once here and implemented by every backend:

``pair_topk(queries [Nq, d], keys [Nk, d], k)``
    score(q, k) = (queries[q] · keys[k]) × key_weight[k]   (``score="signed"``),
    its absolute value (``"absolute"``), or REF's ``exp(A) · key_weight[k]`` (``"exp"``).
``dual_topk(queries, keys, query_acts [Nq, n], key_acts [Nk, n], k)``
    score(q, k) = (queries[q] · keys[k]) × (query_acts[q] · key_acts[k])  — importances.

``offset_topk(queries, keys, k, cos=, sin=)`` (``offsets``)
    rotary heads: score(q, k) = max over offset rows o of A_o(q, k) × key_weight[k], with ``offset_idx``.

``multi_topk(queries, keys, key_weights [Nk, G], k)`` (``features``)
    every output feature of a head at once: row g of the ``[G, k]`` answer is ``pair_topk`` with key_weight[:, g].

``by="global"`` returns the k best pairs overall, ``by="query"`` the k best keys of every query and
``by="key"`` the k best queries of every key; always sorted best first, ties broken by the lower
(query, key) index, so that every backend returns the same answer. No backend allocates Nq × Nk:
scores are computed tile by tile and consumed at once.

Backends: ``"torch"`` (blocked plain torch, the reference), ``"cpu"`` (C++ core, ``attnrules._C``),
``"triton"`` (GPU kernels, ``attnrules.kernels``); ``"auto"`` picks the fastest one that admits the
call for the inputs' device. What each backend takes (devices, dtypes, largest k, options) is the
capability table of ``contract`` (:func:`capabilities`); the options (``block_q``, ``block_k`` on
every backend, plus each backend's own) and the NaN policy (a NaN score is a ``ValueError`` on every
backend) are stated in ``contract``'s docstring. Candidates gathered in pieces are merged by
``merge``, the engine's one merge.
"""
from __future__ import annotations

from attnrules.engine.contract import (
    AUTO_ORDER,
    BACKENDS,
    BY_CHOICES,
    CAPABILITIES,
    COMMON_OPTIONS,
    SCORE_CHOICES,
    Capability,
    TopK,
    available_backends,
    capabilities,
    dual_topk,
    pair_topk,
)
from attnrules.engine.features import multi_topk
from attnrules.engine.offsets import OffsetTopK, offset_topk

__all__ = [
    "AUTO_ORDER",
    "BACKENDS",
    "BY_CHOICES",
    "CAPABILITIES",
    "COMMON_OPTIONS",
    "SCORE_CHOICES",
    "Capability",
    "OffsetTopK",
    "TopK",
    "available_backends",
    "capabilities",
    "dual_topk",
    "multi_topk",
    "offset_topk",
    "pair_topk",
]
