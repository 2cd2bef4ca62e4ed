"""The Triton backend: fused streaming top-k kernels (``attnrules.kernels``) for CUDA tensors.

Each kernel program holds a block of queries (or keys, for ``by="key"``), streams the other side
past it tile by tile, scores each tile with ``tl.dot`` and keeps only the scores above a running
k-th threshold; the small candidate set is merged in torch with exact tie-breaking. See
``kernels/topk_stream.py`` for the scheme and ``notes/readme-gpu-engine.md`` for limits.

Options (keyword arguments of ``engine.pair_topk`` / ``engine.dual_topk`` with backend="triton"):
``precision`` ("ieee" fp32, the default; "tf32"; "tf32x3"), ``block_r``, ``block_c`` (powers of two
≥ 16; ``block_c=None`` autotunes on a GPU), ``n_splits`` (column splits per row block) and, for
by="global", ``program_k`` (candidates each program keeps; k above it is verified and repaired).

CPU tensors run only in Triton's interpreter (``TRITON_INTERPRET=1`` set before attnrules is
imported), which is how the tests check every kernel on this machine.
"""
from __future__ import annotations

import os
from dataclasses import replace
from typing import Optional

import torch

from attnrules.engine import torch_backend
from attnrules.engine.contract import Request, TopK
from attnrules.kernels import topk_stream
from attnrules.kernels.dual_topk import dual_topk as _dual_kernel
from attnrules.kernels.pair_topk import pair_topk as _pair_kernel


def is_available() -> bool:
    """True with a CUDA GPU, or when the kernels were built for Triton's CPU interpreter."""
    return topk_stream.INTERPRETED or torch.cuda.is_available()


def _check_inputs(request: Request) -> None:
    device = request.queries.device
    if device.type == "cpu" and not topk_stream.INTERPRETED:
        hint = (
            "TRITON_INTERPRET=1 is set but attnrules.kernels was imported before it was"
            if os.environ.get("TRITON_INTERPRET") == "1"
            else "set TRITON_INTERPRET=1 before importing attnrules to run the kernels in Triton's CPU interpreter"
        )
        raise RuntimeError(f"the triton backend needs CUDA tensors, got queries on {device} ({hint})")
    if request.queries.dtype != torch.float32:
        raise TypeError(
            f"the triton backend computes in float32, got queries of dtype {request.queries.dtype}: "
            "pass float32 tensors or use backend='torch'"
        )


def _repair(request: Request, found: topk_stream.Result, run_exact) -> topk_stream.Result:
    """Merge in the exact top-k of the regions the kernel could not vouch for (global, k > program_k)."""
    if not found.unresolved:
        return found
    scores, rows, cols = [found.scores], [found.query_idx], [found.key_idx]
    for q0, q1, c0, c1 in found.unresolved:
        sub = replace(
            request,
            queries=request.queries[q0:q1],
            keys=request.keys[c0:c1],
            k=min(request.k, (q1 - q0) * (c1 - c0)),
            key_weight=None if request.key_weight is None else request.key_weight[c0:c1],
            query_acts=None if request.query_acts is None else request.query_acts[q0:q1],
            key_acts=None if request.key_acts is None else request.key_acts[c0:c1],
        )
        part = run_exact(sub)
        scores.append(part.scores.to(found.scores.dtype))
        rows.append(part.query_idx + q0)
        cols.append(part.key_idx + c0)
    s, r, c = topk_stream.merge_pairs(
        torch.cat(scores), torch.cat(rows), torch.cat(cols), request.keys.shape[0], request.k
    )
    return topk_stream.Result(s, r, c, [])


def _result(request: Request, found: topk_stream.Result) -> TopK:
    return TopK(found.scores, found.query_idx, found.key_idx, request.by)


def topk(
    request: Request,
    *,
    precision: str = "ieee",
    block_r: Optional[int] = None,
    block_c: Optional[int] = None,
    n_splits: Optional[int] = None,
    program_k: Optional[int] = None,
) -> TopK:
    """``engine.pair_topk`` — fused top-k of (q·k) × key_weight (signed / absolute / exp) — or
    ``engine.dual_topk`` — of (q·k) × (query_acts[q]·key_acts[k]) — on the GPU (the request says which)."""
    _check_inputs(request)
    options = dict(by=request.by, score=request.score, precision=precision, block_r=block_r, block_c=block_c,
                   n_splits=n_splits, program_k=program_k)
    if request.query_acts is None:
        found = _pair_kernel(request.queries, request.keys, request.k, key_weight=request.key_weight, **options)
    else:
        found = _dual_kernel(request.queries, request.keys, request.query_acts, request.key_acts, request.k, **options)
    return _result(request, _repair(request, found, torch_backend.topk))
