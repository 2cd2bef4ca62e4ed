"""Public signatures of the engine, argument checking, and backend dispatch."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import torch

By = Literal["global", "query", "key"]
Score = Literal["signed", "absolute", "exp"]
BY_CHOICES = ("global", "query", "key")
SCORE_CHOICES = ("signed", "absolute", "exp")
BACKENDS = ("torch", "cpu", "triton")
# Backend name -> module implementing ``topk(request, **options)`` (both operations; the request says
# which) and ``is_available()``.
_BACKEND_MODULES = {
    "torch": "attnrules.engine.torch_backend",
    "cpu": "attnrules.engine.cpu_backend",
    "triton": "attnrules.engine.triton_backend",
}


@dataclass(frozen=True)
class TopK:
    """The k best pairs, best first.

    ``by="global"``: ``scores``, ``query_idx``, ``key_idx`` have shape ``[k]``.
    ``by="query"``: shape ``[Nq, k]`` (row i holds query i's best keys; ``query_idx[i, :] == i``).
    ``by="key"``: shape ``[Nk, k]`` (row i holds key i's best queries; ``key_idx[i, :] == i``).
    """

    scores: torch.Tensor
    query_idx: torch.Tensor
    key_idx: torch.Tensor
    by: str

    def pairs(self) -> list[tuple[int, int, float]]:
        """(query, key, score) triples in order, rows concatenated for per-row results."""
        return list(
            zip(
                self.query_idx.flatten().tolist(),
                self.key_idx.flatten().tolist(),
                self.scores.flatten().tolist(),
            )
        )


@dataclass(frozen=True)
class Request:
    """A checked engine call: what every backend receives."""

    queries: torch.Tensor
    keys: torch.Tensor
    k: int
    by: str
    score: str
    key_weight: Optional[torch.Tensor] = None
    query_acts: Optional[torch.Tensor] = None
    key_acts: Optional[torch.Tensor] = None

    @property
    def n_candidates(self) -> int:
        nq, nk = self.queries.shape[0], self.keys.shape[0]
        return {"global": nq * nk, "query": nk, "key": nq}[self.by]


def _as_tensor(x: object) -> object:
    """numpy arrays become torch tensors sharing their memory (no copy); anything else is left as is."""
    return torch.from_numpy(x) if isinstance(x, np.ndarray) else x


def _check_matrix(name: str, x: object, n_cols: Optional[int] = None) -> torch.Tensor:
    x = _as_tensor(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [n, d], got shape {tuple(x.shape)}")
    if n_cols is not None and x.shape[1] != n_cols:
        raise ValueError(f"{name} must have {n_cols} columns, got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
    return x


def _check_values(name: str, x: torch.Tensor) -> None:
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name} must be float32 (or float64 for the torch backend), got {x.dtype}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinite values")


def _check_request(
    queries: torch.Tensor,
    keys: torch.Tensor,
    k: int,
    by: str,
    score: str,
    key_weight: Optional[torch.Tensor],
    query_acts: Optional[torch.Tensor],
    key_acts: Optional[torch.Tensor],
) -> Request:
    queries = _check_matrix("queries", queries)
    keys = _check_matrix("keys", keys, queries.shape[1])
    tensors = {"queries": queries, "keys": keys}
    if by not in BY_CHOICES:
        raise ValueError(f"by must be one of {BY_CHOICES}, got {by!r}")
    if score not in SCORE_CHOICES:
        raise ValueError(f"score must be one of {SCORE_CHOICES}, got {score!r}")
    if key_weight is not None:
        key_weight = _as_tensor(key_weight)
        if not isinstance(key_weight, torch.Tensor) or key_weight.shape != (keys.shape[0],):
            shape = tuple(key_weight.shape) if isinstance(key_weight, torch.Tensor) else type(key_weight).__name__
            raise ValueError(f"key_weight must have shape [{keys.shape[0]}] (one weight per key), got {shape}")
        tensors["key_weight"] = key_weight
    if query_acts is not None or key_acts is not None:
        query_acts = _check_matrix("query_acts", query_acts)
        key_acts = _check_matrix("key_acts", key_acts, query_acts.shape[1])
        if query_acts.shape[0] != queries.shape[0]:
            raise ValueError(
                f"query_acts must have one row per query ({queries.shape[0]}), got shape {tuple(query_acts.shape)}"
            )
        if key_acts.shape[0] != keys.shape[0]:
            raise ValueError(f"key_acts must have one row per key ({keys.shape[0]}), got shape {tuple(key_acts.shape)}")
        tensors["query_acts"], tensors["key_acts"] = query_acts, key_acts
    dtype, device = queries.dtype, queries.device
    for name, x in tensors.items():
        if x.device != device:
            raise ValueError(f"{name} is on {x.device} but queries are on {device}: pass one device")
        if x.dtype != dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but queries have {dtype}: pass one dtype")
    for name, x in tensors.items():
        _check_values(name, x)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    request = Request(queries, keys, k, by, score, key_weight, query_acts, key_acts)
    if k > request.n_candidates:
        raise ValueError(f"k={k} is larger than the number of candidates ({request.n_candidates}) for by={by!r}")
    return request


def available_backends() -> list[str]:
    """Backends that can run here (their module imports and their core is present)."""
    found = []
    for name in BACKENDS:
        try:
            module = importlib.import_module(_BACKEND_MODULES[name])
        except ImportError:
            continue
        if getattr(module, "is_available", lambda: True)():
            found.append(name)
    return found


def _resolve_backend(backend: str, request: Request):
    if backend == "auto":
        preferred = ("triton",) if request.queries.is_cuda else ("cpu",)
        usable = available_backends()
        chosen = next((b for b in preferred if b in usable), "torch")
        if request.queries.dtype != torch.float32:
            chosen = "torch"  # the C++ core and the Triton kernels take float32 only
    elif backend in BACKENDS:
        chosen = backend
    else:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    try:
        module = importlib.import_module(_BACKEND_MODULES[chosen])
    except ImportError as exc:
        raise RuntimeError(f"backend {chosen!r} is not available here: {exc}") from exc
    if not getattr(module, "is_available", lambda: True)():
        raise RuntimeError(f"backend {chosen!r} is not available here (see attnrules.engine.available_backends())")
    return module


def pair_topk(
    queries: torch.Tensor,
    keys: torch.Tensor,
    k: int,
    *,
    by: By = "global",
    key_weight: Optional[torch.Tensor] = None,
    score: Score = "signed",
    backend: str = "auto",
    **options,
) -> TopK:
    """The k best (score, query, key) of score(q, k) = (queries[q]·keys[k]) × key_weight[k].

    queries ``[Nq, d]``, keys ``[Nk, d]``, key_weight ``[Nk]`` (all ones when None); ``score`` picks
    the signed product, its absolute value, or REF's ``exp(queries[q]·keys[k]) × key_weight[k]``.
    ``options`` are passed to the backend (e.g. block sizes).
    """
    request = _check_request(queries, keys, k, by, score, key_weight, None, None)
    return _resolve_backend(backend, request).topk(request, **options)


def dual_topk(
    queries: torch.Tensor,
    keys: torch.Tensor,
    query_acts: torch.Tensor,
    key_acts: torch.Tensor,
    k: int,
    *,
    by: By = "global",
    score: Literal["signed", "absolute"] = "signed",
    backend: str = "auto",
    **options,
) -> TopK:
    """The k best pairs of score(q, k) = (queries[q]·keys[k]) × (query_acts[q]·key_acts[k]).

    The second inner product runs over exemplars (``query_acts [Nq, n]``, ``key_acts [Nk, n]``): this
    is how every pair's masked-gradient importance is scored without materialising Nq × Nk.
    """
    if score == "exp":
        raise ValueError("score='exp' applies to pair_topk only; dual_topk takes 'signed' or 'absolute'")
    if query_acts is None or key_acts is None:
        raise ValueError("dual_topk needs both query_acts [Nq, n] and key_acts [Nk, n]")
    request = _check_request(queries, keys, k, by, score, None, query_acts, key_acts)
    return _resolve_backend(backend, request).topk(request, **options)
