"""The engine contract: public signatures, argument checks, the capability table, dispatch, NaN policy.

Everything a caller can rely on whatever the backend is decided here, once:

Options — one vocabulary for every backend
    ``block_q`` / ``block_k``: queries / keys per tile (``None``: the backend's default). They are
    tuning only and never change the answer. Each backend states which values it takes in the
    capability table (``block_sizes``); powers of two ≥ 16 are valid everywhere (Triton also needs
    ``block_q × block_k ≤ 8192`` for ``by="global"``). A backend's own extras are listed in its row of
    the table (``options``): ``threads``, ``isa``, ``sample_cols`` (cpu); ``precision``,
    ``n_splits``, ``program_k`` (triton). Rule: an option no backend knows is a ``ValueError`` naming
    it and the accepted ones; an option of another backend is a ``ValueError`` when the backend was
    named, and is ignored under ``backend="auto"`` (so one call can carry the tuning of every device).

Capability table (:data:`CAPABILITIES`, :func:`capabilities` adds what is available here)
    per backend: devices, dtypes, largest k, dual support, block-size rule, whether inputs must be
    C-contiguous, extras. ``backend="auto"`` takes the first backend of :data:`AUTO_ORDER` for the
    inputs' device whose row admits the call (device usable here, dtype, k, operation) — the torch
    reference admits every call. A named backend that does not admit the call raises an error that
    says which entry of its row refuses it. Under ``"auto"`` inputs that the chosen backend needs
    C-contiguous are copied (``.contiguous()``); a named ``backend="cpu"`` never copies and refuses them.

NaN policy — the same on every backend
    A NaN score is an error: ``ValueError`` naming the operation and the first NaN pair in (query, key)
    order, with the values that made it, e.g. ``pair_topk(score='exp', by='global'): the score of pair
    (query 0, key 1) is NaN: exp(queries[0]·keys[1]) = exp(200) = inf in float32, times key_weight[1]
    = 0``. Inputs must be finite (checked), so a score is NaN only through overflow: a dot product
    reaching inf (then inf × 0, or inf − inf inside it), or exp(q·k) = inf times a zero key weight.
    Before any backend runs, Cauchy–Schwarz on the largest row norms rules this out for ordinary
    inputs (every |dot| ≤ finfo.max / 1024; for ``exp``, q·k ≤ log(finfo.max) − 1 against the
    zero-weight keys); only when it cannot are the suspect pairs scored by the torch reference, tile by
    tile, to find the first NaN (queries × zero-weight keys for ``exp``, all pairs when a dot product
    may overflow). As a backstop every result is checked: the torch and Triton backends rank any NaN
    first, so one they compute reaches that check (the C++ core leaves NaNs out, and raises if fewer
    than k scores remain). Infinite scores (overflow without a
    zero factor) are numbers: they rank as ±inf, ties by the lower index, alike on every backend.
    Pairs within float rounding of the overflow bound may overflow on one backend and not another
    (different exp and summation order).
"""
from __future__ import annotations

import importlib
import math
import numbers
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Literal, Mapping, Optional

import numpy as np
import torch

By = Literal["global", "query", "key"]
Score = Literal["signed", "absolute", "exp"]
BY_CHOICES = ("global", "query", "key")
SCORE_CHOICES = ("signed", "absolute", "exp")
BACKENDS = ("torch", "cpu", "triton")
# Backend name -> module implementing ``topk(request, **options)`` (both operations; the request says
# which), ``is_available()`` and optionally ``probe(device_type) -> None | reason``.
_BACKEND_MODULES = {
    "torch": "attnrules.engine.torch_backend",
    "cpu": "attnrules.engine.cpu_backend",
    "triton": "attnrules.engine.triton_backend",
}

# Options every backend takes, with their meaning.
ANY_DEVICE = "any"  # in Capability.devices: every device torch runs on

COMMON_OPTIONS: Mapping[str, str] = MappingProxyType({
    "block_q": "queries per tile (None: the backend's default)",
    "block_k": "keys per tile (None: the backend's default)",
})  # fmt: skip


@dataclass(frozen=True)
class Capability:
    """One backend's row of the capability table.

    ``devices``: device types it can run on at all (``"any"``: wherever torch runs); ``available``
    and ``devices_here``: whether / on which of them it runs in this process, with ``why_not`` saying
    why each missing one is missing (filled by :func:`capabilities`; None / empty in the static table).
    ``requires``: what it needs to be available.
    ``max_k_per_row``: largest k for ``by="query"`` / ``by="key"`` (None: only the number of
    candidates bounds it); ``max_k_global`` likewise for ``by="global"``. ``contiguous``: reads the
    inputs in place, so they must be C-contiguous (``"auto"`` copies them, a named backend refuses).
    ``options``: its own options beyond :data:`COMMON_OPTIONS`, name -> meaning.
    """

    backend: str
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    max_k_per_row: Optional[int]
    max_k_global: Optional[int]
    dual: bool
    scores: tuple[str, ...]
    block_sizes: str
    contiguous: bool
    options: Mapping[str, str]
    requires: str
    available: Optional[bool] = None
    devices_here: tuple[str, ...] = ()
    why_not: Mapping[str, str] = field(default_factory=dict)

    def accepted_options(self) -> tuple[str, ...]:
        return tuple(COMMON_OPTIONS) + tuple(self.options)


# The table. Limits the kernels enforce are repeated here (tests check that they agree) so that
# "auto" and the error messages never need to import a backend to know them.
CAPABILITIES: Mapping[str, Capability] = MappingProxyType({
    "torch": Capability(
        backend="torch", devices=(ANY_DEVICE,), dtypes=(torch.float32, torch.float64),
        max_k_per_row=None, max_k_global=None, dual=True, scores=SCORE_CHOICES,
        block_sizes="any positive int (default 1024 × 1024)", contiguous=False,
        options=MappingProxyType({}), requires="torch only",
    ),
    "cpu": Capability(
        backend="cpu", devices=("cpu",), dtypes=(torch.float32,),
        max_k_per_row=None, max_k_global=None, dual=True, scores=SCORE_CHOICES,
        block_sizes="any positive int (default: sized for the L2 cache)", contiguous=True,
        options=MappingProxyType({
            "threads": "OpenMP threads (None: all cores)",
            "isa": "'auto', or force 'avx512' / 'avx2' / 'generic'",
            "sample_cols": "by='query'/'key': columns sampled to guess thresholds (None: automatic, 0: never)",
        }),
        requires="attnrules._C, the C++ core built with the package",
    ),
    "triton": Capability(
        backend="triton", devices=("cuda", "cpu"), dtypes=(torch.float32,),
        max_k_per_row=1024, max_k_global=None, dual=True, scores=SCORE_CHOICES,
        block_sizes="powers of two ≥ 16, block_q × block_k ≤ 8192 for by='global' (default: planned: "
                    "16 rows (32 per row for pair_topk, k ≤ 128) × 64 columns on a GPU)",
        contiguous=False,
        options=MappingProxyType({
            "precision": "'tf32' (default: tensor-core filter, fp32 rescore of possible survivors: the fp32 answer), "
                         "'tf32x3' (the same with a three-pass filter), 'ieee' (fp32 only)",
            "n_splits": "column ranges per row block run by separate programs (None: ~4 programs per SM)",
            "program_k": "by='global': candidates kept per program (None: min(k, 1024))",
        }),
        requires="Triton and a CUDA GPU (CPU tensors are copied to it and the answer back); without one, "
                 "CPU tensors only in Triton's interpreter (TRITON_INTERPRET=1 set before attnrules is imported, "
                 "for tests)",
    ),
})  # fmt: skip

# What "auto" tries, in order, for the inputs' device type; the torch reference takes anything else.
AUTO_ORDER: Mapping[str, tuple[str, ...]] = MappingProxyType({"cuda": ("triton", "torch"), "cpu": ("cpu", "torch")})
_INT_OPTIONS = ("block_q", "block_k", "threads", "sample_cols", "n_splits", "program_k")


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

    @property
    def dual(self) -> bool:
        return self.query_acts is not None

    @property
    def operation(self) -> str:
        """How the call reads in an error message, e.g. ``pair_topk(score='exp', by='global')``."""
        return f"{'dual_topk' if self.dual else 'pair_topk'}(score={self.score!r}, by={self.by!r})"

    def tensors(self) -> dict[str, torch.Tensor]:
        named = {"queries": self.queries, "keys": self.keys, "key_weight": self.key_weight,
                 "query_acts": self.query_acts, "key_acts": self.key_acts}  # fmt: skip
        return {name: x for name, x in named.items() if x is not None}


# ---------------------------------------------------------------------------------------- checks


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


def all_finite(x: torch.Tensor) -> bool:
    """Whether ``x`` holds no NaN or ±inf, from its min and max (they propagate NaN and show ±inf): one
    read of x and no temporary of its size (``torch.isfinite(x).all()`` allocates 1.7 bytes an element)."""
    return x.numel() == 0 or all(bool(torch.isfinite(v)) for v in torch.aminmax(x))


def _check_values(name: str, x: torch.Tensor) -> None:
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name} must be float32 (or float64 for the torch backend), got {x.dtype}")
    if not all_finite(x):
        raise ValueError(f"{name} contains NaN or infinite values")


def _positive_int(name: str, value: object, what: str = "a positive int") -> int:
    """``value`` as a Python int (numpy and other integral types accepted), or a ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 1:
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return int(value)


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
    k = _positive_int("k", k, "a positive int")
    request = Request(queries, keys, k, by, score, key_weight, query_acts, key_acts)
    if k > request.n_candidates:
        raise ValueError(f"k={k} is larger than the number of candidates ({request.n_candidates}) for by={by!r}")
    return request


# ------------------------------------------------------------------------------ capability table


def _module(name: str):
    return importlib.import_module(_BACKEND_MODULES[name])


def _probe(name: str) -> Capability:
    """The backend's row with what this process can run filled in."""
    cap = CAPABILITIES[name]
    try:
        module = _module(name)
    except ImportError as exc:
        reason = f"its module does not import ({exc}); it needs {cap.requires}"
        return replace(cap, available=False, why_not={d: reason for d in cap.devices})
    probe = getattr(module, "probe", None)
    usable = bool(getattr(module, "is_available", lambda: True)())
    why_not = {}
    for device in cap.devices:
        reason = probe(device) if probe is not None else (None if usable else f"it needs {cap.requires}")
        if reason is not None:
            why_not[device] = reason
    here = tuple(d for d in cap.devices if d not in why_not)
    return replace(cap, available=bool(here), devices_here=here, why_not=MappingProxyType(why_not))


def capabilities() -> dict[str, Capability]:
    """The capability table, each row with ``available``, ``devices_here`` and ``why_not`` for this process."""
    return {name: _probe(name) for name in BACKENDS}


def available_backends() -> list[str]:
    """Backends that can run here on some device (their module imports and their core is present)."""
    return [name for name, cap in capabilities().items() if cap.available]


def _refusal(cap: Capability, request: Request) -> Optional[tuple[type, str]]:
    """Why ``cap`` cannot run ``request`` here, as (exception type, message), or None if it can."""
    name = cap.backend
    device = request.queries.device
    reasons = set(cap.why_not.values())
    if not cap.available and len(reasons) == 1:  # one cause for every device: a missing component
        return RuntimeError, f"backend {name!r} is not available here: {reasons.pop()}"
    if ANY_DEVICE in cap.devices:
        pass
    elif device.type not in cap.devices:
        return ValueError, (
            f"backend {name!r} runs on {' / '.join(cap.devices)} tensors, got queries on {device}: "
            "move them or use backend='auto'"
        )
    elif device.type not in cap.devices_here:
        return ValueError, f"backend {name!r} cannot run on {device.type} tensors here: {cap.why_not[device.type]}"
    if request.queries.dtype not in cap.dtypes:
        allowed = " or ".join(str(d).replace("torch.", "") for d in cap.dtypes)
        return TypeError, (
            f"queries must be {allowed} for backend={name!r}, got {request.queries.dtype}: "
            "convert it (.float()) or use backend='torch'"
        )
    if request.dual and not cap.dual:
        return ValueError, f"backend {name!r} does not compute dual_topk"
    if request.score not in cap.scores:
        return ValueError, f"backend {name!r} does not compute score={request.score!r}"
    limit = cap.max_k_global if request.by == "global" else cap.max_k_per_row
    if limit is not None and request.k > limit:
        kind = "global" if request.by == "global" else "per-row"
        return ValueError, (
            f"k={request.k} is above the {kind} limit of {limit} of backend {name!r} (by={request.by!r}): "
            "use backend='auto', 'cpu' or 'torch'"
        )
    return None


def _contiguous_request(request: Request, cap: Capability, *, copy: bool) -> Request:
    """The request with C-contiguous inputs for a backend that reads them in place."""
    if not cap.contiguous:
        return request
    changed = {}
    for name, x in request.tensors().items():
        if not x.is_contiguous():
            if not copy:
                raise ValueError(
                    f"{name} must be C-contiguous for backend={cap.backend!r} (inputs are never copied): "
                    f"pass {name}.contiguous(), or use backend='auto', which copies"
                )
            changed[name] = x.contiguous()
    return replace(request, **changed) if changed else request


def _options(cap: Capability, options: dict[str, Any], *, named: bool) -> dict[str, Any]:
    """The options the backend takes, normalised; errors name the option and the accepted ones."""
    accepted = cap.accepted_options()
    owners = {opt: b for b, row in CAPABILITIES.items() for opt in row.options}
    kept = {}
    for opt, value in options.items():
        if opt in accepted:
            if opt in _INT_OPTIONS and value is not None and not isinstance(value, bool) \
                    and isinstance(value, numbers.Integral):
                value = int(value)
            if opt in COMMON_OPTIONS and value is not None:
                value = _positive_int(opt, value, "a positive int or None")
            kept[opt] = value
        elif opt in owners:
            if named:
                raise ValueError(
                    f"option {opt!r} applies to backend {owners[opt]!r}, not {cap.backend!r}; "
                    f"backend {cap.backend!r} accepts {', '.join(accepted)}"
                )
            # backend="auto": options of the backends that were not chosen are ignored.
        else:
            every = "; ".join(f"{b}: {', '.join(row.options) or 'none'}" for b, row in CAPABILITIES.items())
            raise ValueError(
                f"unknown option {opt!r}: every backend accepts {', '.join(COMMON_OPTIONS)}; "
                f"backend-specific options are ({every})"
            )
    return kept


def _choose(backend: str, request: Request) -> Capability:
    if backend == "auto":
        device = request.queries.device.type
        for name in AUTO_ORDER.get(device, ("torch",)):
            cap = _probe(name)
            if _refusal(cap, request) is None:
                return cap
        return _probe("torch")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    cap = _probe(backend)
    refusal = _refusal(cap, request)
    if refusal is not None:
        error, message = refusal
        raise error(message)
    return cap


# ------------------------------------------------------------------------------------ NaN policy

_ROW_BUDGET = 1 << 22  # scores held at once while scanning for a NaN (16 MiB of float32)


def _max_norm(x: torch.Tensor) -> float:
    """Largest row norm as a Python float (inf if it overflows the dtype: then nothing is ruled out)."""
    return float(torch.linalg.vector_norm(x, dim=1).max())


@torch.no_grad()
def _could_be_nan(request: Request) -> tuple[bool, Optional[torch.Tensor]]:
    """(whether overflow may make a NaN score, the keys to scan: None = all, else key indices).

    Inputs are finite. |a·b| ≤ ‖a‖‖b‖ bounds every partial sum of a dot product, so below
    ``finfo.max / 1024`` no dot product overflows; then (q·k) × w and (q·k) × (a·b) are finite ×
    finite (never NaN), and exp(q·k) × w is NaN only for ``w == 0`` with exp(q·k) = inf.
    """
    dtype = request.queries.dtype
    fmax = torch.finfo(dtype).max
    qn = _max_norm(request.queries)
    if not qn * _max_norm(request.keys) <= fmax / 1024:
        return True, None
    if request.dual and not _max_norm(request.query_acts) * _max_norm(request.key_acts) <= fmax / 1024:
        return True, None
    if request.score == "exp" and request.key_weight is not None:
        zero = torch.nonzero(request.key_weight == 0).flatten()
        if zero.numel() and not qn * _max_norm(request.keys[zero]) <= math.log(fmax) - 1.0:
            return True, zero
    return False, None


def _scores(request: Request, rows: slice, keys: Optional[torch.Tensor]) -> torch.Tensor:
    """Reference scores (torch, input dtype) of queries[rows] × the given keys (None: all)."""
    pick = (lambda x: x) if keys is None else (lambda x: x[keys])
    a = request.queries[rows] @ pick(request.keys).T
    if request.dual:
        s = a * (request.query_acts[rows] @ pick(request.key_acts).T)
    elif request.score == "exp":
        s = torch.exp(a)
        if request.key_weight is not None:
            s = s * pick(request.key_weight)
    else:
        s = a if request.key_weight is None else a * pick(request.key_weight)
    return s.abs() if request.score == "absolute" else s


@torch.no_grad()
def first_nan_pair(request: Request, keys: Optional[torch.Tensor] = None) -> Optional[tuple[int, int]]:
    """The first (query, key) in (query, key) order whose reference score is NaN, scanning ``keys``
    (sorted key indices; None: all) tile by tile; None when there is none."""
    nq = request.queries.shape[0]
    nk = request.keys.shape[0] if keys is None else keys.numel()
    step = max(1, _ROW_BUDGET // max(1, nk))
    for q0 in range(0, nq, step):
        nan = torch.isnan(_scores(request, slice(q0, min(q0 + step, nq)), keys))
        if bool(nan.any()):
            row = int(torch.nonzero(nan.any(dim=1))[0])
            col = int(torch.nonzero(nan[row])[0])
            return q0 + row, int(col if keys is None else keys[col])
    return None


@torch.no_grad()
def nan_error(request: Request, pair: Optional[tuple[int, int]]) -> ValueError:
    """The engine's one NaN error: the operation, the first NaN pair and the values that made it."""
    if pair is None:
        where = "some pair's score is NaN"
    else:
        i, j = pair
        q, kk = request.queries[i], request.keys[j]
        dtype = str(request.queries.dtype).replace("torch.", "")
        dot = f"queries[{i}]·keys[{j}]"
        a = float(q @ kk)
        if request.dual:
            b = float(request.query_acts[i] @ request.key_acts[j])
            cause = f"{dot} = {a:g} times query_acts[{i}]·key_acts[{j}] = {b:g} in {dtype}"
        elif request.score == "exp":
            cause = f"exp({dot}) = exp({a:g}) = {float(torch.exp(q @ kk)):g} in {dtype}"
        else:
            cause = f"{dot} = {a:g} in {dtype}"
        if request.key_weight is not None:
            cause += f", times key_weight[{j}] = {float(request.key_weight[j]):g}"
        where = f"the score of pair (query {i}, key {j}) is NaN: {cause}"
    return ValueError(
        f"{request.operation}: {where}. NaN scores cannot be ranked and every backend refuses them: "
        "rescale the inputs so that no product overflows, or drop the zero-weight keys"
    )


def check_nan(request: Request) -> None:
    """Raise :func:`nan_error` if some score of the request is NaN (cheap unless overflow is possible)."""
    possible, keys = _could_be_nan(request)
    if possible:
        pair = first_nan_pair(request, keys)
        if pair is not None:
            raise nan_error(request, pair)


def _check_result(request: Request, result: TopK) -> TopK:
    """Backstop: a backend that computed a NaN (within rounding of the overflow bound) raises too."""
    nan = torch.isnan(result.scores)
    if bool(nan.any()):
        pair = first_nan_pair(request)
        if pair is None:  # the reference computes no NaN: report the backend's first one
            flat = (result.query_idx * request.keys.shape[0] + result.key_idx)[nan]
            first = int(flat.min())
            pair = (first // request.keys.shape[0], first % request.keys.shape[0])
        raise nan_error(request, pair)
    return result


# -------------------------------------------------------------------------------------- dispatch


def _run(request: Request, backend: str, options: dict[str, Any]) -> TopK:
    cap = _choose(backend, request)
    kept = _options(cap, options, named=backend != "auto")
    request = _contiguous_request(request, cap, copy=backend == "auto")
    check_nan(request)
    return _check_result(request, _module(cap.backend).topk(request, **kept))


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
    ``options``: ``block_q`` / ``block_k`` on every backend, plus the backend's own (see the module
    docstring and :data:`CAPABILITIES`). A NaN score raises ``ValueError`` on every backend.
    """
    request = _check_request(queries, keys, k, by, score, key_weight, None, None)
    return _run(request, backend, options)


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
    Options and the NaN policy are those of :func:`pair_topk`.
    """
    if score == "exp":
        raise ValueError("score='exp' applies to pair_topk only; dual_topk takes 'signed' or 'absolute'")
    if query_acts is None or key_acts is None:
        raise ValueError("dual_topk needs both query_acts [Nq, n] and key_acts [Nk, n]")
    request = _check_request(queries, keys, k, by, score, None, query_acts, key_acts)
    return _run(request, backend, options)
