"""Masked-gradient importance of (query, key) feature pairs, in closed form.

Paper mode reproduces REF (reference-behaviour §3.3): a surrogate of the head built from input-SAE
features only, with one mask m_kq on every pair's attention-logit term,

    logit_i = Σ_{k,q} F[i,k] · F[t,q] · A(q,k) · m_kq          (positions i ≤ t, no 1/sqrt(d_head))
    pred    = Σ_i softmax(logit)_i · Σ_k F[i,k] · V(k)          (V = value score; "activation" loss)

and I_kq = Σ_n ∂pred_n/∂m_kq at m = 1, summed over exemplars (one position t_n per sequence).
The gradient has the closed form I = A ⊙ (R^T · QA) with, per exemplar, QA_n = F_n[t, Q] and
R_n = F_n[:t+1, K]^T · (α ⊙ (s − ŝ)), where s_i = Σ_k F[i,k] V(k) and ŝ = Σ_i α_i s_i: a product of
the attention score and an inner product over exemplars, which is what ``engine.dual_topk`` scores
for all pairs without materialising them. Autograd is used only by the tests, as the oracle.

On a rotary head the surrogate's term for key position i uses the offset present, A_{t−i}(q, k), and
keys beyond the head's sliding window (or the circuit's largest offset) are masked as the model masks
them. The importance then sums over offsets, I = Σ_δ A_δ ⊙ W_δ (W_δ: the exemplars' factors at offset
δ), and no longer factorises into one product; over all pairs it is still one inner product,
I(q, k) = Σ_n F[t,q] (d_q W_Q) · Σ_i c_ni F[i,k] R_{t−i}ᵀ (d_k W_K)ᵀ, of dimension n_exemplars × d_head,
which ``engine.dual_topk`` ranks (with unit attention factors): exact, but n_exemplars × d_head / d_head
times the work of the absolute-position case.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Literal, Optional

import torch

import attnrules.engine as engine
from attnrules.engine.contract import all_finite
from attnrules.circuit import HeadCircuit
from attnrules.scoring import value_scores

LossType = Literal["activation", "post_activation"]


def _check_exemplars(acts: torch.Tensor, positions: torch.Tensor, n_inputs: int) -> None:
    if acts.dim() != 3 or acts.shape[2] != n_inputs:
        raise ValueError(f"acts must be [n_exemplars, seq_len, n_inputs={n_inputs}], got shape {tuple(acts.shape)}")
    if positions.dim() != 1 or positions.shape[0] != acts.shape[0]:
        raise ValueError(f"positions must be [n_exemplars={acts.shape[0]}], got shape {tuple(positions.shape)}")
    if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= acts.shape[1]):
        raise ValueError(f"positions must lie in [0, {acts.shape[1]}), got {positions.min()}..{positions.max()}")
    if not all_finite(acts):
        raise ValueError("acts contains NaN or infinite values")


def _attended(circuit: HeadCircuit, positions: torch.Tensor, seq_len: int) -> torch.Tensor:
    """``[N, T]`` bool: the key positions each exemplar's scored position attends to (causal, within the
    head's largest offset)."""
    delta = positions[:, None] - torch.arange(seq_len, device=positions.device)[None, :]
    allowed = delta >= 0
    if circuit.max_offset is not None:
        allowed &= delta <= circuit.max_offset
    if circuit.rotary is not None:  # offsets that are not candidates are not scored
        candidate = torch.zeros(circuit.max_offset + 1, dtype=torch.bool)
        candidate[circuit.offsets] = True
        allowed &= candidate[delta.clamp(0, circuit.max_offset)]
    return allowed


def _coefficients(
    key_acts: torch.Tensor,
    key_vals: torch.Tensor,
    logits: torch.Tensor,
    attended: torch.Tensor,
    gate: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> torch.Tensor:
    """c ``[n_exemplars, T]``: ∂pred/∂logit_i = α_i (s_i − ŝ) of each key position.

    key_acts ``[N, T, n_keys]`` (acts of the key features at every position), key_vals ``[n_keys]``
    (their value scores), logits ``[N, T]`` (surrogate attention logits from position t_n), attended
    ``[N, T]`` the positions attended. With ``gate`` (the "post_activation" loss: pred ↦ whether the
    feature is active, REF's relu(pred + b) > 0 or the SAE's own gate) an exemplar contributes only
    where the gate is open.
    """
    alpha = torch.softmax(logits.masked_fill(~attended, float("-inf")), dim=-1)  # [N, T]
    s = key_acts @ key_vals  # [N, T]
    s_hat = (alpha * s).sum(-1, keepdim=True)
    c = alpha * (s - s_hat)
    if gate is not None:
        c = c * gate(s_hat).to(c.dtype)
    return c


def _offset_factors(c: torch.Tensor, key_acts: torch.Tensor, positions: torch.Tensor, n_offsets: int) -> torch.Tensor:
    """B ``[N, n_offsets, n_keys]``: c_{n,i} F[n,i,k] of the key position at each offset δ = t_n − i (0
    where that position does not exist)."""
    idx = positions[:, None] - torch.arange(n_offsets, device=positions.device)[None, :]  # [N, D] key position
    valid = idx >= 0
    rows = torch.arange(c.shape[0], device=c.device)[:, None]
    picked = (c[rows, idx.clamp(min=0)])[..., None] * key_acts[rows, idx.clamp(min=0)]
    return picked * valid[..., None].to(picked.dtype)


def paper_importance(
    circuit: HeadCircuit,
    feature: int,
    queries: torch.Tensor,
    keys: torch.Tensor,
    acts: torch.Tensor,
    positions: torch.Tensor,
    *,
    loss_type: LossType = "activation",
    gate: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> torch.Tensor:
    """REF's importance matrix, as ``[len(queries), len(keys)]`` (rows queries: the one order of every
    attnrules function; REF's own matrix is its transpose).

    ``loss_type="activation"`` (REF's default) differentiates the surrogate's pre-activation pred;
    ``"post_activation"`` keeps only exemplars where the feature's activation is open: REF's
    relu(pred + b_enc) (``circuit.out_bias``), or ``gate`` (pred ``[N, 1]`` ↦ bool) — the SAE's own
    decision, :meth:`attnrules.sources.OutputSAE.surrogate_gate` (JumpReLU: pred + b_enc > threshold).

    ``keys``/``queries`` are the candidate input features (REF: the unique keys and queries of the
    candidate table; the importance is over their cross product); the value features are ``keys``.
    ``acts [N, T, n_in]`` are input-SAE activations of the training exemplars and ``positions [N]``
    the position scored in each. Gradients are summed over exemplars (REF), not averaged.
    """
    circuit.check_feature(feature)
    _check_exemplars(acts, positions, circuit.n_inputs)
    if loss_type not in ("activation", "post_activation"):
        raise ValueError(f"loss_type must be 'activation' or 'post_activation', got {loss_type!r}")
    dtype = circuit.key_proj.dtype  # the candidates' columns converted, not all n_in (the same values)
    rows = torch.arange(acts.shape[0], device=acts.device)
    query_acts = acts[rows, positions][:, queries].to(dtype)  # [N, |Q|]
    key_acts = acts[:, :, keys].to(dtype)  # [N, T, |K|]
    key_vals = value_scores(circuit, feature)[keys]
    if loss_type == "post_activation" and gate is None:
        bias = circuit.out_bias[feature]
        gate = lambda pred: pred + bias > 0  # noqa: E731 - REF: relu(pred + b_enc)
    elif loss_type != "post_activation":
        gate = None
    attended = _attended(circuit, positions, acts.shape[1])
    if circuit.rotary is None:
        kq = circuit.key_proj[keys] @ circuit.query_proj[queries].T  # [|K|, |Q|]
        logits = torch.einsum("ntk,nk->nt", key_acts, query_acts @ kq.T)  # [N, T]
        c = _coefficients(key_acts, key_vals, logits, attended, gate)
        r = torch.einsum("ntk,nt->nk", key_acts, c)
        return (kq * (r.T @ query_acts)).T
    # rotary: A_δ[k, q] at every offset; the logit of key position i uses δ = t − i
    n_off = acts.shape[1]
    pairs_k, pairs_q = torch.meshgrid(keys, queries, indexing="ij")
    profile = circuit.attn_profile(pairs_q.flatten(), pairs_k.flatten())[:, :n_off]  # [|K|·|Q|, ≤ T]
    kq = torch.zeros(len(keys) * len(queries), n_off, dtype=torch.float64)
    kq[:, : profile.shape[1]] = profile.nan_to_num(0.0)
    kq = kq.T.reshape(n_off, len(keys), len(queries)).to(dtype)  # [D, |K|, |Q|]
    per_offset = torch.einsum("dkq,nq->ndk", kq, query_acts)  # [N, D, |K|]
    delta = (positions[:, None] - torch.arange(acts.shape[1])[None, :]).clamp(0, n_off - 1)  # [N, T]
    logits = (key_acts * per_offset[rows[:, None], delta]).sum(-1)  # [N, T]
    c = _coefficients(key_acts, key_vals, logits, attended, gate)
    b = _offset_factors(c, key_acts, positions, n_off)  # [N, D, |K|]
    return torch.einsum("dkq,ndk,nq->qk", kq, b, query_acts)


def exemplar_factors_all_pairs(
    circuit: HeadCircuit, feature: int, acts: torch.Tensor, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(query_acts ``[n_in, N]``, key_acts ``[n_in, N]``) such that the importance of every pair is
    attn-score(q, k) × (query_acts[q] · key_acts[k]) — the surrogate over all input features (heads
    with absolute positions; see :func:`rotary_factors_all_pairs` for rotary ones)."""
    circuit.check_feature(feature)
    _check_exemplars(acts, positions, circuit.n_inputs)
    if circuit.rotary is not None:
        raise ValueError("a rotary head's importance does not factorise this way: use rotary_factors_all_pairs")
    acts = acts.to(circuit.key_proj.dtype)
    rows = torch.arange(acts.shape[0], device=acts.device)
    query_acts = acts[rows, positions]  # [N, n_in]
    q_vec = query_acts @ circuit.query_proj  # [N, d_head]
    logits = torch.einsum("ntd,nd->nt", acts @ circuit.key_proj, q_vec)
    c = _coefficients(acts, value_scores(circuit, feature), logits, _attended(circuit, positions, acts.shape[1]))
    r = torch.einsum("ntk,nt->nk", acts, c)
    return query_acts.T.contiguous(), r.T.contiguous()


def rotary_factors_all_pairs(
    circuit: HeadCircuit, feature: int, acts: torch.Tensor, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(query_vecs ``[n_in, N·d_head]``, key_vecs ``[n_in, N·d_head]``) of a rotary head: the importance of
    every pair is query_vecs[q] · key_vecs[k] (module docstring), with query_vecs[q] = F[n,t,q] d_q W_Q per
    exemplar n and key_vecs[k] = Σ_i c_ni F[n,i,k] R_{t−i}ᵀ (d_k W_K)ᵀ."""
    circuit.check_feature(feature)
    _check_exemplars(acts, positions, circuit.n_inputs)
    rotary = circuit.rotary
    acts = acts.to(circuit.key_proj.dtype)
    n, t_len, _ = acts.shape
    rows = torch.arange(n, device=acts.device)
    query_acts = acts[rows, positions]  # [N, n_in]
    attended = _attended(circuit, positions, t_len)
    delta = (positions[:, None] - torch.arange(t_len)[None, :]).clamp(0, circuit.max_offset)  # [N, T]
    rotated = rotary.rotate(  # each exemplar's query vector rotated to each key position's offset
        (query_acts @ circuit.query_proj).repeat_interleave(t_len, 0), delta.flatten()
    ).reshape(n, t_len, -1)
    logits = torch.einsum("ntd,ntd->nt", acts @ circuit.key_proj, rotated)
    c = _coefficients(acts, value_scores(circuit, feature), logits, attended)
    cos, sin = rotary.cos[delta].to(acts.dtype), rotary.sin[delta].to(acts.dtype)  # [N, T, p]
    weighted = acts * c[..., None]  # [N, T, n_in]
    a = torch.einsum("ntk,ntj->nkj", weighted, cos)  # Σ_i c F cos_{t−i}: [N, n_in, p]
    b = torch.einsum("ntk,ntj->nkj", weighted, sin)
    g = weighted.sum(1)  # [N, n_in] (unrotated dimensions)
    K = circuit.key_proj
    ka, kb, kr = K[:, rotary.first], K[:, rotary.second], K[:, rotary.rest]
    key_vecs = torch.zeros(n, circuit.n_inputs, circuit.d_head, dtype=acts.dtype)
    key_vecs[:, :, rotary.first] = a * ka + b * kb  # A_δ = q_a (cos k_a + sin k_b) + q_b (cos k_b − sin k_a) + …
    key_vecs[:, :, rotary.second] = a * kb - b * ka
    key_vecs[:, :, rotary.rest] = g[..., None] * kr
    query_vecs = query_acts.T[:, :, None] * circuit.query_proj[:, None, :]  # [n_in, N, d_head]
    return query_vecs.reshape(circuit.n_inputs, -1).contiguous(), key_vecs.transpose(0, 1).reshape(
        circuit.n_inputs, -1).contiguous()


def rank_all_pairs_by_importance(
    circuit: HeadCircuit,
    feature: int,
    acts: torch.Tensor,
    positions: torch.Tensor,
    k: int,
    *,
    score: Literal["signed", "absolute"] = "absolute",
    backend: str = "auto",
    **engine_options,
) -> engine.TopK:
    """The k most important of all n_in × n_in pairs (paper-mode surrogate over every input feature),
    through ``engine.dual_topk``; ``score="absolute"`` ranks by |I| as REF does by default."""
    if circuit.rotary is not None:
        query_vecs, key_vecs = rotary_factors_all_pairs(circuit, feature, acts, positions)
        ones = torch.ones(circuit.n_inputs, 1, dtype=query_vecs.dtype)
        return engine.dual_topk(ones, ones, query_vecs, key_vecs, k, score=score, backend=backend, **engine_options)
    query_acts, key_acts = exemplar_factors_all_pairs(circuit, feature, acts, positions)
    if score == "absolute":
        best = _live_topk(circuit.query_proj, circuit.key_proj, query_acts, key_acts, k, backend, engine_options)
        if best is not None:
            return best
    return engine.dual_topk(
        circuit.query_proj, circuit.key_proj, query_acts, key_acts, k, score=score, backend=backend, **engine_options
    )


def _live_topk(queries: torch.Tensor, keys: torch.Tensor, query_acts: torch.Tensor, key_acts: torch.Tensor, k: int,
               backend: str, engine_options: dict) -> Optional[engine.TopK]:
    """The k best pairs by |importance| ranked among the live features only (a query active at some
    exemplar's scored position, a key with a nonzero factor: about a fifth of the queries of a GPT-2 SAE),
    or None when that does not give the whole ranking. Every other pair's importance is exactly 0, so when
    the k-th best live pair's is above 0 the two rankings are the same pairs with the same scores (each
    pair's score is computed alone; ties go to the lower index, an order the kept rows keep)."""
    live_q, live_k = torch.nonzero(query_acts.any(1)).flatten(), torch.nonzero(key_acts.any(1)).flatten()
    if live_q.numel() * live_k.numel() < k or (live_q.numel() == len(queries) and live_k.numel() == len(keys)):
        return None
    best = engine.dual_topk(queries[live_q], keys[live_k], query_acts[live_q], key_acts[live_k], k, score="absolute",
                            backend=backend, **engine_options)
    if not bool((best.scores > 0).all()):
        return None
    return dataclasses.replace(best, query_idx=live_q[best.query_idx], key_idx=live_k[best.key_idx])


def select_terms(importance: torch.Tensor, n: int, *, absolute: bool = True) -> torch.Tensor:
    """REF's choice of N terms from an importance matrix (§3.4): a boolean mask of the same shape.

    Entries strictly above the (N+1)-th largest of |I| (or relu(I) when ``absolute=False``); all
    entries when N ≥ the number of entries. So ties and zero importances give fewer than N terms.
    """
    if n < 1:
        raise ValueError(f"n must be a positive number of terms, got {n}")
    s = importance.abs() if absolute else torch.relu(importance)
    if n >= s.numel():
        return torch.ones_like(s, dtype=torch.bool)
    threshold = torch.topk(s.flatten(), n + 1).values.min()
    return s > threshold
